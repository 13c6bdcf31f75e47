//! `service-agent` under test: started in the topology's node namespace on the topology's pod
//! links, with its pins, state, API socket and log all private to the topology, and driven only
//! through its command line (`run`, `get -o json`, `check`), as an operator would drive it.

use std::{
    collections::BTreeSet,
    ffi::OsStr,
    fs::{self, File},
    net::{Ipv4Addr, SocketAddrV4},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::{
    client::Transport,
    netns,
    poll::{CONVERGENCE_TIMEOUT, eventually},
    process::{COMMAND_TIMEOUT, output_within, wait_within},
    topology::{POD_INTERFACE_GLOB, Pod, Topology},
    unique::BPFFS,
};

/// The service CIDR the agent allocates ClusterIPs from (its default, spelled out for the tests).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

/// How long the agent may take to load its programs and answer on its API socket.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the agent may take to detach and unpin after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Log lines quoted in errors and shown when a test fails.
const LOG_TAIL_LINES: usize = 40;

/// The agent binary: `$SERVICE_AGENT_BIN`, else the workspace's debug build (which `cargo xtask
/// test` builds first).
pub fn binary() -> PathBuf {
    std::env::var_os("SERVICE_AGENT_BIN").map_or_else(
        || workspace_root().join("target/debug/service-agent"),
        PathBuf::from,
    )
}

pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// `service-agent cleanup --pin-dir DIR`: detaches what agents pinned there and removes it.
pub fn cleanup(pin_dir: &Path) -> Result<Output> {
    output_within(
        Command::new(existing_binary()?)
            .arg("cleanup")
            .arg("--pin-dir")
            .arg(pin_dir),
        COMMAND_TIMEOUT,
    )
}

/// `service-agent check PATHS...`, which needs no running agent.
pub fn check(paths: &[&Path]) -> Result<Output> {
    output_within(
        Command::new(existing_binary()?).arg("check").args(paths),
        COMMAND_TIMEOUT,
    )
}

/// A running `service-agent run`. Borrowing the topology makes the compiler drop the agent
/// first, so it always stops while its namespace and links still exist. What it pinned (maps
/// and links: the datapath) outlives it, as on a real node: the next agent started on the same
/// topology adopts it, and the topology removes it (`service-agent cleanup`) when it goes.
pub struct Agent<'t> {
    topology: &'t Topology,
    child: Option<Child>,
    pin_dir: PathBuf,
    api_socket: PathBuf,
    log: PathBuf,
}

impl<'t> Agent<'t> {
    /// Starts the agent on the topology's pod links with `--manifests` for each of `manifests`,
    /// and waits until it answers on its API socket.
    pub fn start(topology: &'t Topology, manifests: &[&Path]) -> Result<Self> {
        Self::start_with(topology, manifests, &[])
    }

    /// The same with more arguments, e.g. `--external-interface` and `--node-ip`.
    pub fn start_with(
        topology: &'t Topology,
        manifests: &[&Path],
        extra_args: &[&str],
    ) -> Result<Self> {
        let source_args = manifests
            .iter()
            .flat_map(|manifest| [OsStr::new("--manifests"), manifest.as_os_str()]);
        Self::launch(topology, source_args, extra_args)
    }

    /// Starts the agent in API-server mode (`--kubeconfig`), otherwise as `start_with`.
    pub fn start_with_kubeconfig(
        topology: &'t Topology,
        kubeconfig: &Path,
        extra_args: &[&str],
    ) -> Result<Self> {
        let source_args = [OsStr::new("--kubeconfig"), kubeconfig.as_os_str()];
        Self::launch(topology, source_args, extra_args)
    }

    fn launch<'a>(
        topology: &'t Topology,
        source_args: impl IntoIterator<Item = &'a OsStr>,
        extra_args: &[&str],
    ) -> Result<Self> {
        mount_bpffs()?;
        let scratch = topology.scratch_dir();
        let agent = Self {
            topology,
            child: None,
            pin_dir: topology.run_id().pin_dir(),
            api_socket: scratch.join("agent.sock"),
            log: scratch.join("agent.log"),
        };
        let mut command = Command::new(existing_binary()?);
        command.arg("run").args(source_args);
        command
            .args(["--pod-interface", POD_INTERFACE_GLOB])
            .args(["--service-cidr", SERVICE_CIDR])
            .args(["--node-name", topology.node_name()])
            .arg("--pin-dir")
            .arg(&agent.pin_dir)
            .arg("--state-dir")
            .arg(scratch.join("agent-state"))
            .arg("--api-socket")
            .arg(&agent.api_socket)
            .args(extra_args);
        agent.spawn(command)
    }

    fn spawn(mut self, mut command: Command) -> Result<Self> {
        let log = File::create(&self.log)
            .with_context(|| format!("cannot create {}", self.log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // A log file, not a terminal: no colour escapes in what errors quote.
            .env("NO_COLOR", "1");
        let node = Path::new(netns::NETNS_DIR).join(self.topology.node_netns());
        let node = File::open(&node).with_context(|| format!("cannot open {}", node.display()))?;
        let node_fd = node.as_raw_fd();
        // SAFETY: runs in the forked child before exec, and only makes async-signal-safe system
        // calls on a descriptor that `node` keeps open until spawn returns.
        unsafe {
            command.pre_exec(move || {
                // setns rather than `ip netns exec`, which would also remount /sys and so hide
                // the bpffs at /sys/fs/bpf that the agent pins into.
                if libc::setns(node_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // An agent must not outlive a test process killed before its `Drop` ran. (The
                // signal follows the spawning *thread*: keep an Agent on the thread that started
                // it, as tests and the demo do.)
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.child = Some(
            command
                .spawn()
                .with_context(|| format!("cannot start {command:?}"))?,
        );
        self.wait_until_ready()
            .with_context(|| format!("starting {command:?}"))?;
        Ok(self)
    }

    fn wait_until_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self.child.as_mut().context("the agent is not running")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Err(self.with_log(anyhow!("the agent exited during startup ({status})")));
            }
            let last_error = match self.services() {
                Ok(_) => return Ok(()),
                Err(error) => error,
            };
            if Instant::now() >= deadline {
                return Err(self.with_log(last_error.context(format!(
                    "the agent did not answer on {} within {READY_TIMEOUT:?}",
                    self.api_socket.display()
                ))));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's process id, while it runs (to read its memory use from /proc).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> Result<String> {
        fs::read_to_string(&self.log).with_context(|| format!("reading {}", self.log.display()))
    }

    /// The `synced` lines of the agent's log, in order: one per sync that wrote the maps.
    pub fn synced_lines(&self) -> Result<Vec<String>> {
        Ok(self
            .log()?
            .lines()
            .filter(|line| line.contains(" synced "))
            .map(str::to_owned)
            .collect())
    }

    /// The agent's pin directory (`--pin-dir`), which outlives it.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// `service-agent get ARGS... --api-socket S`: its stdout, as printed for a human.
    pub fn get(&self, args: &[&str]) -> Result<String> {
        let output = output_within(
            Command::new(existing_binary()?)
                .arg("get")
                .args(args)
                .arg("--api-socket")
                .arg(&self.api_socket),
            COMMAND_TIMEOUT,
        )?;
        if !output.status.success() {
            bail!(
                "`service-agent get {}` failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        String::from_utf8(output.stdout).context("`service-agent get` printed non-UTF-8")
    }

    /// Every service the agent has programmed (`get services -A -o json`), as JSON objects.
    pub fn services(&self) -> Result<Vec<Value>> {
        let json = self.get(&["services", "-A", "-o", "json"])?;
        match serde_json::from_str(&json) {
            Ok(Value::Array(services)) => Ok(services),
            _ => bail!("`get services -o json` did not print a JSON array: {json}"),
        }
    }

    /// The ClusterIP of `namespace/name`, once the agent has programmed the service.
    pub fn wait_for_service(&self, namespace: &str, name: &str) -> Result<Ipv4Addr> {
        let what = format!("service {namespace}/{name} programmed");
        let found = eventually(CONVERGENCE_TIMEOUT, &what, || {
            let services = self.services()?;
            let service = find_service(&services, namespace, name)
                .with_context(|| format!("not among the agent's services: {}", names(&services)))?;
            cluster_ip(service)
        });
        found.map_err(|error| self.with_log(error))
    }

    /// Waits until the agent no longer lists `namespace/name`.
    pub fn wait_for_service_removal(&self, namespace: &str, name: &str) -> Result<()> {
        let what = format!("service {namespace}/{name} removed");
        let removed = eventually(CONVERGENCE_TIMEOUT, &what, || {
            let services = self.services()?;
            match find_service(&services, namespace, name) {
                Some(service) => bail!("still programmed: {service}"),
                None => Ok(()),
            }
        });
        removed.map_err(|error| self.with_log(error))
    }

    /// Waits until the requests of `client` to `to` are answered by exactly the backends named
    /// `expected` (each request a new backend choice; enough of them that every expected backend
    /// shows up). The error shows what answered, the agent's endpoints for `to` and its log.
    pub fn wait_for_backends(
        &self,
        client: &Pod,
        transport: Transport,
        to: SocketAddrV4,
        expected: &[&str],
    ) -> Result<()> {
        let expected: BTreeSet<&str> = expected.iter().copied().collect();
        let requests = 10 * expected.len().max(1);
        let what = format!("{transport} {to} answered by exactly {expected:?}");
        let converged = eventually(CONVERGENCE_TIMEOUT, &what, || {
            let tally = client.tally(transport, to, requests)?;
            let answered: BTreeSet<&str> = tally.keys().map(String::as_str).collect();
            if answered != expected {
                bail!("{requests} requests were answered by {tally:?}");
            }
            Ok(())
        });
        converged.map_err(|error| {
            let endpoints = self.services().map_or_else(
                |error| format!("unknown ({error:#})"),
                |services| service_ports(&services, *to.ip()),
            );
            self.with_log(error.context(format!("the agent's ports for {}: {endpoints}", to.ip())))
        })
    }

    /// Sends SIGTERM and waits for the agent to exit (SIGKILL after a timeout, which is an
    /// error). The datapath stays as the agent left it, pins included, as after a DaemonSet's
    /// rolling update: start another agent on the same topology to adopt it.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM)
    }

    /// Kills the agent with SIGKILL (a crash, an OOM kill) and reaps it. Like `stop`, the
    /// datapath stays.
    pub fn kill(mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGKILL)
    }

    fn signal(&mut self, signal: libc::c_int) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("the agent is not running");
        };
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        // SAFETY: kill has no memory effects; `child` is not reaped yet, so the pid is still ours.
        unsafe { libc::kill(pid, signal) };
        wait_within(&mut child, STOP_TIMEOUT)
            .with_context(|| format!("the agent did not stop on signal {signal}"))
            .map_err(|error| self.with_log(error))
    }

    /// Adds the tail of the agent's log to `error`: most failures are explained there.
    fn with_log(&self, error: anyhow::Error) -> anyhow::Error {
        anyhow!(
            "{error:#}\n--- last lines of {} ---\n{}",
            self.log.display(),
            self.log_tail()
        )
    }

    fn log_tail(&self) -> String {
        match fs::read_to_string(&self.log) {
            Ok(log) => {
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
            }
            Err(error) => format!("(cannot read the log: {error})"),
        }
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        if self.child.is_some()
            && let Err(error) = self.signal(libc::SIGTERM)
        {
            eprintln!("warning: {error:#}");
        }
        // Captured by the test harness: shown only when the test fails, where it is wanted.
        eprintln!(
            "--- last lines of {} ---\n{}",
            self.log.display(),
            self.log_tail()
        );
    }
}

fn existing_binary() -> Result<PathBuf> {
    let binary = binary();
    if !binary.is_file() {
        bail!(
            "no agent binary at {}: build it with `cargo build -p service-agent` (`cargo xtask \
             test` does) or point SERVICE_AGENT_BIN at one",
            binary.display()
        );
    }
    Ok(binary)
}

/// Mounts the BPF filesystem at /sys/fs/bpf if nothing is mounted there yet, as systemd does at
/// boot on a real node (containers and minimal VMs often lack it); the agent pins into it.
fn mount_bpffs() -> Result<()> {
    // Parallel tests would otherwise stack several mounts.
    static MOUNT: Mutex<()> = Mutex::new(());
    let _serialized = MOUNT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mounts = fs::read_to_string("/proc/self/mounts").context("cannot read mounts")?;
    let mounted = mounts.lines().any(|mount| {
        let fields: Vec<&str> = mount.split_whitespace().collect();
        fields.get(1) == Some(&BPFFS) && fields.get(2) == Some(&"bpf")
    });
    if mounted {
        return Ok(());
    }
    let output = output_within(
        Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]),
        COMMAND_TIMEOUT,
    )?;
    if !output.status.success() {
        bail!(
            "cannot mount bpffs at {BPFFS}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn find_service<'a>(services: &'a [Value], namespace: &str, name: &str) -> Option<&'a Value> {
    services.iter().find(|service| {
        service["name"]["namespace"] == namespace && service["name"]["name"] == name
    })
}

fn cluster_ip(service: &Value) -> Result<Ipv4Addr> {
    let ip = service["cluster_ip"]
        .as_str()
        .with_context(|| format!("no cluster_ip string in {service}"))?;
    ip.parse()
        .with_context(|| format!("cluster_ip {ip:?} is not an IPv4 address"))
}

fn names(services: &[Value]) -> String {
    let names: Vec<String> = services
        .iter()
        .map(|service| {
            let name = &service["name"];
            format!("{}/{}", name["namespace"], name["name"]).replace('"', "")
        })
        .collect();
    format!("[{}]", names.join(", "))
}

/// The `ports` (with their endpoints) of the service whose ClusterIP is `ip`, for error messages.
fn service_ports(services: &[Value], ip: Ipv4Addr) -> String {
    services
        .iter()
        .find(|service| cluster_ip(service).is_ok_and(|cluster_ip| cluster_ip == ip))
        .map_or_else(
            || {
                format!(
                    "no service has this ClusterIP; services: {}",
                    names(services)
                )
            },
            |service| service["ports"].to_string(),
        )
}
