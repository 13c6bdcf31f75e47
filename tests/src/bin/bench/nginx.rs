//! nginx from Debian in a backend pod: one worker answering every request with a small 200, so
//! that the backends are never what limits connections per second (three of them share the load).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use integration_tests::{netns, poll::eventually, process::wait_within, topology::Pod};

use crate::services::HTTP_TARGET_PORT;

pub struct Nginx {
    child: Child,
}

impl Nginx {
    pub fn start(pod: &Pod, scratch: &Path) -> Result<Self> {
        let dir = scratch.join(format!("nginx-{}", pod.name));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let config = dir.join("nginx.conf");
        fs::write(&config, config_text(&dir, &pod.name))?;
        let child = netns::command(&pod.netns, "nginx")?
            .arg("-c")
            .arg(&config)
            .args(["-e", "stderr", "-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("stderr.log"))?)
            .spawn()
            .context("cannot start nginx (is Debian's nginx-light installed?)")?;
        let nginx = Self { child };
        let address = format!("{}:{HTTP_TARGET_PORT}", pod.ip);
        eventually(Duration::from_secs(10), "nginx listening", || {
            netns::enter(&pod.netns, || {
                std::net::TcpStream::connect(&address).with_context(|| format!("connect {address}"))
            })
        })?;
        Ok(nginx)
    }
}

impl Drop for Nginx {
    /// SIGTERM, nginx's fast shutdown: the master stops its worker and waits for it. SIGKILL
    /// would leave the worker running, orphaned, holding the pod's port.
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill has no memory effects; the child is not reaped yet, so the pid is ours.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if wait_within(&mut self.child, STOP_TIMEOUT).is_err() {
            eprintln!("warning: nginx did not stop on SIGTERM; killing it");
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How long nginx may take to stop its worker and exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

fn config_text(dir: &Path, pod: &str) -> String {
    let path = |name: &str| -> PathBuf { dir.join(name) };
    format!(
        "\
worker_processes 1;
pid {pid};
error_log {error_log} warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {body};
    keepalive_timeout 0;
    server {{
        listen {HTTP_TARGET_PORT} reuseport backlog=8192;
        location / {{ return 200 \"{pod}\\n\"; }}
    }}
}}
",
        pid = path("nginx.pid").display(),
        error_log = path("error.log").display(),
        body = path("body").display(),
    )
}
