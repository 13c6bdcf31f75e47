//! Named network namespaces (`ip netns`), and running code inside one.
//!
//! Code enters a namespace on a dedicated thread (`setns(2)` switches only the calling thread), so
//! the test thread itself never leaves the host's namespace. A socket belongs to the namespace it
//! was created in for its whole life: created on such a thread, it keeps working from any thread.

use std::{
    fs::{self, File},
    os::fd::AsRawFd,
    panic,
    path::Path,
    sync::Mutex,
    thread,
};

use anyhow::{Context, Result};

use crate::process::ip;

/// Where `ip netns add` mounts namespaces (bind mounts of `/proc/<pid>/ns/net`).
pub const NETNS_DIR: &str = "/run/netns";

/// A network namespace that is deleted when this is dropped.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace with its loopback up and IPv6 off (router solicitations and DAD would
    /// only add noise to the traffic under test).
    pub fn create(name: &str) -> Result<Self> {
        {
            // The first `ip netns add` of the machine turns /run/netns into a shared mount point;
            // concurrent first calls race on it, so calls from parallel tests go one at a time.
            static ADD: Mutex<()> = Mutex::new(());
            let _serialized = ADD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            ip(&["netns", "add", name])?;
        }
        let netns = Self {
            name: name.to_string(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        netns.sysctl("net/ipv6/conf/all/disable_ipv6", "1")?;
        netns.sysctl("net/ipv6/conf/default/disable_ipv6", "1")?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Writes `/proc/sys/<key>` as seen from this namespace (`key` like `net/ipv4/ip_forward`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = Path::new("/proc/sys").join(key);
        enter(&self.name, || {
            fs::write(&path, value).with_context(|| {
                format!(
                    "cannot set {} to {value} in netns {}",
                    path.display(),
                    self.name
                )
            })
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(error) = delete(&self.name) {
            eprintln!("warning: {error:#}");
        }
    }
}

/// Deletes a named namespace. Its links go with it once no process or socket holds it any more.
pub fn delete(name: &str) -> Result<()> {
    ip(&["netns", "delete", name])
}

/// Runs `f` on a thread that has entered the named namespace, and returns what it returns.
/// A panic in `f` is propagated to the caller.
pub fn enter<T: Send>(name: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = Path::new(NETNS_DIR).join(name);
    let netns =
        File::open(&path).with_context(|| format!("cannot open netns {}", path.display()))?;
    thread::scope(|scope| {
        let worker = scope.spawn(|| {
            // SAFETY: setns only reads the descriptor, which `netns` keeps open for the call.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("cannot enter netns {name}"));
            }
            f()
        });
        worker
            .join()
            .unwrap_or_else(|payload| panic::resume_unwind(payload))
    })
}

/// A command that runs in the named namespace: the child enters it between fork and exec. Unlike
/// `ip netns exec`, this does not remount /sys, so the BPF filesystem at /sys/fs/bpf stays
/// visible to the child.
pub fn command(name: &str, program: impl AsRef<std::ffi::OsStr>) -> Result<std::process::Command> {
    use std::os::unix::process::CommandExt;
    let path = Path::new(NETNS_DIR).join(name);
    let netns =
        File::open(&path).with_context(|| format!("cannot open netns {}", path.display()))?;
    let mut command = std::process::Command::new(program);
    // SAFETY: runs in the forked child before exec and makes one async-signal-safe system call
    // on a descriptor the closure owns (and so keeps open while the command exists).
    unsafe {
        command.pre_exec(move || {
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(command)
}
