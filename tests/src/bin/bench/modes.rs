//! The four modes side by side. Each gets a test bed of its own (a node namespace with a client pod
//! and three backend pods running nginx and the UDP server), identical in shape, so that the
//! netfilter hooks and conntrack that kube-proxy's rules switch on in one node cost nothing in the
//! others, and rounds can alternate between modes without reloading 50,000 services each time.

use std::{
    fmt, fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use aya::maps::{HashMap, Map, MapData};
use integration_tests::{
    agent::Agent,
    cgroup::TestCgroup,
    manifest::ManifestDir,
    netns,
    process::output_within,
    topology::{Pod, Topology},
};
use service_common::{CONNTRACK_V4_MAP, ConntrackEntryV4, ConntrackKeyV4, PIN_LAYOUT};

use crate::{
    nginx::Nginx,
    services::{
        HTTP_NODE_PORT, HTTP_PORT, HTTP_TARGET_PORT, ServiceSet, UDP_PORT, UDP_TARGET_PORT,
    },
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// No service: the client talks to the pod IPs (the routing limit).
    Base,
    Iptables,
    Nftables,
    /// This project's agent.
    Agent,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Base, Mode::Iptables, Mode::Nftables, Mode::Agent];

    /// kube-proxy's modes, which this project is compared with.
    pub fn is_peer(self) -> bool {
        matches!(self, Mode::Iptables | Mode::Nftables)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Base => "base (pod IP, no service)",
            Mode::Iptables => "kube-proxy iptables",
            Mode::Nftables => "kube-proxy nftables",
            Mode::Agent => "service-agent (eBPF)",
        })
    }
}

const BACKEND_IPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 0, 11),
    Ipv4Addr::new(10, 244, 0, 12),
    Ipv4Addr::new(10, 244, 0, 13),
];
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
/// The node's address on its link to the client outside the cluster, where nodePorts answer.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
const EXTERNAL_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 10);
const EXTERNAL_LINK: &str = "ext0";
/// How long programming may take before the bench gives up on a mode (nft takes minutes at
/// 10,000 services and grows faster than linearly: it is not waited for at 50,000).
const PROGRAMMING_TIMEOUT: Duration = Duration::from_secs(300);

pub fn service_set(count: usize) -> ServiceSet {
    ServiceSet {
        count,
        backends: BACKEND_IPS,
        node_ip: NODE_IP,
    }
}

/// One mode's node, client and backends.
pub struct Bed {
    pub mode: Mode,
    // Held to keep nginx running; dropped before the topology, while its namespaces exist.
    _nginx: Vec<Nginx>,
    pub client: Pod,
    /// A client outside the cluster, on the node's external link.
    pub external_client: Pod,
    /// The cgroup of the client pod's load generators: the agent's socket programs serve it, as
    /// they would serve the root cgroup on a real node.
    pub pods_cgroup: TestCgroup,
    pub topology: Topology,
}

impl Bed {
    pub fn new(mode: Mode) -> Result<Self> {
        let topology = Topology::new()?;
        let client = topology.add_pod("client", CLIENT_IP)?;
        let external_client =
            topology.add_external_client("outside", EXTERNAL_CLIENT_IP, NODE_IP, EXTERNAL_LINK)?;
        // Hygiene for a connection-per-request load: every ephemeral port, and TIME_WAIT reuse.
        for client in [&client, &external_client] {
            sysctl(client, "net/ipv4/ip_local_port_range", "1024 65535")?;
            sysctl(client, "net/ipv4/tcp_tw_reuse", "1")?;
            sysctl(client, "net/ipv4/tcp_max_tw_buckets", "0")?;
        }
        let mut nginx = Vec::new();
        for (index, ip) in BACKEND_IPS.into_iter().enumerate() {
            let pod = topology.add_backend_pod(&format!("backend-{index}"), ip)?;
            // No TIME_WAIT sockets: the kernel's established-socket hash is shared by every
            // namespace, and the hundreds of thousands a 10 s run leaves for 60 s would lengthen
            // its chains for the modes measured after it (base, measured first, would be the
            // only one to run on a clean table).
            sysctl(&pod, "net/ipv4/tcp_max_tw_buckets", "0")?;
            nginx.push(Nginx::start(&pod, topology.scratch_dir())?);
        }
        let pods_cgroup = TestCgroup::create(topology.run_id(), "pods")?;
        Ok(Self {
            mode,
            _nginx: nginx,
            client,
            external_client,
            pods_cgroup,
            topology,
        })
    }

    /// Where the loads go: the service's ClusterIP, or for the base mode each backend pod itself.
    pub fn tcp_targets(&self, set: &ServiceSet) -> Vec<SocketAddrV4> {
        match self.mode {
            Mode::Base => self.pod_ip_targets(),
            _ => vec![SocketAddrV4::new(set.measured_ip(), HTTP_PORT); 3],
        }
    }

    /// The pod IPs themselves, for every mode: traffic that is not for a service.
    pub fn pod_ip_targets(&self) -> Vec<SocketAddrV4> {
        BACKEND_IPS
            .map(|ip| SocketAddrV4::new(ip, HTTP_TARGET_PORT))
            .to_vec()
    }

    /// Where the load from outside goes: the node's nodePort, or for the base mode each backend
    /// pod itself (routed by the node).
    pub fn node_port_targets(&self) -> Vec<SocketAddrV4> {
        match self.mode {
            Mode::Base => self.pod_ip_targets(),
            _ => vec![SocketAddrV4::new(NODE_IP, HTTP_NODE_PORT); 3],
        }
    }

    /// Starts the agent on this bed's node, serving its external link and the client pod's
    /// cgroup as well (with its defaults: pods' TCP connections are balanced at connect()).
    pub fn start_agent<'b>(&'b self, manifests: &ManifestDir) -> Result<Agent<'b>> {
        let node_ip = NODE_IP.to_string();
        let cgroup = self
            .pods_cgroup
            .path()
            .to_str()
            .context("non-UTF-8 cgroup path")?;
        Agent::start_with(
            &self.topology,
            &[manifests.path()],
            &[
                "--external-interface",
                EXTERNAL_LINK,
                "--node-ip",
                &node_ip,
                "--cgroup",
                cgroup,
            ],
        )
    }

    pub fn udp_targets(&self, set: &ServiceSet) -> Vec<SocketAddrV4> {
        match self.mode {
            Mode::Base => BACKEND_IPS
                .map(|ip| SocketAddrV4::new(ip, UDP_TARGET_PORT))
                .to_vec(),
            _ => vec![SocketAddrV4::new(set.measured_ip(), UDP_PORT)],
        }
    }

    /// Empties the node's conntrack table (netfilter's, and the agent's own map for our mode),
    /// so that no run starts with flows an earlier run left.
    pub fn flush_conntrack(&self, agent: Option<&Agent>) -> Result<()> {
        match self.mode {
            Mode::Iptables | Mode::Nftables => {
                // Exits non-zero when the table is already empty: only a failure to run counts.
                output_within(
                    netns::command(self.topology.node_netns(), "conntrack")?.arg("-F"),
                    Duration::from_secs(30),
                )
                .context("conntrack -F (Debian package conntrack)")?;
            }
            Mode::Agent => {
                if let Some(agent) = agent {
                    flush_agent_conntrack(agent.pin_dir())?;
                }
            }
            Mode::Base => {}
        }
        Ok(())
    }
}

fn sysctl(pod: &Pod, key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key);
    netns::enter(&pod.netns, || {
        fs::write(&path, value).with_context(|| format!("cannot set {}", path.display()))
    })
}

fn flush_agent_conntrack(pin_dir: &Path) -> Result<()> {
    let path = pin_dir.join(PIN_LAYOUT).join(CONNTRACK_V4_MAP);
    let data = MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?;
    let mut map: HashMap<_, ConntrackKeyV4, ConntrackEntryV4> =
        HashMap::try_from(Map::LruHashMap(data))?;
    let keys: Vec<ConntrackKeyV4> = map.keys().collect::<Result<_, _>>()?;
    for key in keys {
        // A flow may age out between listing and deleting: that is not an error.
        let _ = map.remove(&key);
    }
    Ok(())
}

/// What programming the services cost a mode.
#[derive(Clone, Copy, Debug, Default)]
pub struct Programming {
    /// From handing the rules or manifests over to the measured service answering.
    pub seconds: f64,
    /// The agent's resident memory once programmed (our mode only).
    pub rss_bytes: Option<u64>,
    /// Our mode only: the same services handed over as one JSON List to a fresh agent.
    pub json_seconds: Option<f64>,
    /// Set when the mode did not answer in time: how long it was given.
    pub gave_up_after: Option<f64>,
}

/// Hands `set` to the bed's dataplane and waits for the measured service to answer.
pub fn program(
    bed: &Bed,
    set: &ServiceSet,
    agent: Option<(&Agent, &ManifestDir)>,
) -> Result<Programming> {
    let scratch = bed.topology.scratch_dir();
    let node = bed.topology.node_netns();
    let mut rss_bytes = None;
    let started = match bed.mode {
        Mode::Base => return Ok(Programming::default()),
        Mode::Iptables => {
            let rules = scratch.join("iptables.rules");
            fs::write(&rules, set.iptables_restore())?;
            let started = Instant::now();
            run_ok(netns::command(node, "iptables-legacy-restore")?.arg(&rules))?;
            answered(bed, set)?;
            started
        }
        Mode::Nftables => {
            let rules = scratch.join("ruleset.nft");
            fs::write(&rules, set.nftables())?;
            let started = Instant::now();
            run_ok(netns::command(node, "nft")?.arg("-f").arg(&rules))?;
            answered(bed, set)?;
            started
        }
        Mode::Agent => {
            let (agent, manifests) = agent.context("the agent mode needs its agent")?;
            let started = hand_over(bed, set, manifests, "services.yaml", &set.manifests())?;
            rss_bytes = agent.pid().map(resident_bytes).transpose()?;
            started
        }
    };
    Ok(Programming {
        seconds: started.elapsed().as_secs_f64(),
        rss_bytes,
        ..Programming::default()
    })
}

/// Our mode: renames `file` into the agent's manifest directory and waits for the measured
/// service to answer; returns when it was handed over.
pub fn hand_over(
    bed: &Bed,
    set: &ServiceSet,
    manifests: &ManifestDir,
    file: &str,
    text: &str,
) -> Result<Instant> {
    let started = Instant::now();
    manifests.write(file, text)?;
    answered(bed, set)?;
    Ok(started)
}

/// Runs `command` (a rules loader), failing with its stderr unless it succeeds.
pub fn run_ok(command: &mut std::process::Command) -> Result<()> {
    let output = output_within(command, PROGRAMMING_TIMEOUT)?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Probes the measured service from the client every few milliseconds until one HTTP request
/// through it is answered.
fn answered(bed: &Bed, set: &ServiceSet) -> Result<()> {
    let to = SocketAddrV4::new(set.measured_ip(), HTTP_PORT);
    let since = Instant::now();
    netns::enter(&bed.client.netns, || {
        while since.elapsed() < PROGRAMMING_TIMEOUT {
            if http_get(to).is_ok() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(2));
        }
        bail!("{to} did not answer within {PROGRAMMING_TIMEOUT:?}")
    })
}

fn http_get(to: SocketAddrV4) -> Result<()> {
    // Short: before the service exists the SYN goes unanswered (an ICMP unreachable is a soft
    // error for TCP), and a long timeout would round every figure up to it. A veth hop answers
    // a SYN in well under a millisecond.
    let mut stream = TcpStream::connect_timeout(&to.into(), Duration::from_millis(10))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    if !answer.starts_with("HTTP/1.1 200") {
        bail!("unexpected answer: {answer}");
    }
    Ok(())
}

pub fn resident_bytes(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .context("no VmRSS in /proc/PID/status")?;
    Ok(kib * 1024)
}
