//! The fault table: steady traffic through each mode's services while its proxy dies and comes
//! back, the figure a node's users feel during a crash or a rolling update. Each mode gets a
//! fresh bed (see `modes`) with the same services, and the [`SteadyLoad`] of the fault tests: from
//! the client pod, UDP request/response, a new TCP connection per request and one long-lived TCP
//! connection to the ClusterIP; from the client outside the cluster, the same three through the
//! NodePort. Two faults:
//!
//! - kill -9 + restart: our agent gets SIGKILL, and a new one starts on the same node 3 s later
//!   (1 s in the smoke run). kube-proxy's rules stay in the kernel while it is down, and a
//!   restarted kube-proxy begins with a full sync: as long later, the same rules are loaded again
//!   the way it loads them.
//! - upgrade: our agent gets SIGTERM (a DaemonSet's rolling update) and a new one starts at once;
//!   for kube-proxy, the same full sync at once.
//!
//! The streams speak the harness's line protocol (see `integration_tests::servers`), which the
//! backend pods serve on 8080 next to nginx: the services' TCP port is pointed there (see
//! [`retarget`]).

use std::{fmt, fs, net::SocketAddrV4, path::PathBuf, thread, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use integration_tests::{
    agent::Agent,
    client::Transport,
    manifest::ManifestDir,
    netns,
    poll::{CONVERGENCE_TIMEOUT, eventually},
    servers,
    steady_load::{LoadReport, SteadyLoad, Stream, StreamKind},
};

use crate::{
    modes::{self, Bed, Mode},
    services::{HTTP_NODE_PORT, HTTP_PORT, HTTP_TARGET_PORT, ServiceSet, UDP_NODE_PORT, UDP_PORT},
};

/// Services programmed in each mode: enough that a restart has real work to redo, few enough
/// that every mode programs them in well under a second.
pub const SERVICES: usize = 1_000;
/// The modes with a proxy to kill: base has none.
const MODES: [Mode; 3] = [Mode::Iptables, Mode::Nftables, Mode::Agent];

/// How long each phase of a fault lasts.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Load before the fault.
    pub before: Duration,
    /// kill -9: how long the proxy stays down.
    pub down: Duration,
    /// Load after the new proxy is up.
    pub after: Duration,
}

impl Timing {
    pub const FULL: Timing = Timing {
        before: Duration::from_secs(2),
        down: Duration::from_secs(3),
        after: Duration::from_secs(3),
    };
    /// The smoke run's: only checks that figures come out.
    pub const QUICK: Timing = Timing {
        before: Duration::from_millis(500),
        down: Duration::from_secs(1),
        after: Duration::from_millis(500),
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    KillAndRestart,
    Upgrade,
}

impl Fault {
    const ALL: [Fault; 2] = [Fault::KillAndRestart, Fault::Upgrade];
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::KillAndRestart => "kill -9 + restart",
            Fault::Upgrade => "upgrade",
        })
    }
}

/// One mode through one fault.
#[derive(Clone, Debug)]
pub struct FaultRun {
    pub mode: Mode,
    pub fault: Fault,
    pub report: LoadReport,
}

/// Every mode through every fault, one fresh bed per mode.
pub fn measure(timing: Timing) -> Result<Vec<FaultRun>> {
    let mut runs = Vec::new();
    for mode in MODES {
        eprintln!("faults: {mode}, {SERVICES} services");
        let bed = Bed::new(mode)?;
        let mode_runs =
            measure_mode(&bed, timing).with_context(|| format!("faults through {mode}"))?;
        runs.extend(mode_runs);
    }
    Ok(runs)
}

fn measure_mode(bed: &Bed, timing: Timing) -> Result<Vec<FaultRun>> {
    let set = modes::service_set(SERVICES);
    let streams = streams(bed, &set);
    let mut proxy = Proxy::start(bed, &set)?;
    for stream in &streams {
        let transport = match stream.kind {
            StreamKind::Udp => Transport::Udp,
            StreamKind::TcpConnections | StreamKind::LongLivedTcp => Transport::Tcp,
        };
        eventually(CONVERGENCE_TIMEOUT, &format!("{stream} answered"), || {
            stream.from.request(transport, stream.to)
        })?;
    }
    let mut runs = Vec::new();
    for fault in Fault::ALL {
        let load = SteadyLoad::start(&streams)?;
        thread::sleep(timing.before);
        load.mark(proxy.go_down_event(fault));
        proxy.go_down(fault)?;
        if fault == Fault::KillAndRestart {
            thread::sleep(timing.down);
        }
        load.mark("a new proxy starts");
        proxy.come_back()?;
        load.mark("the new proxy is up");
        thread::sleep(timing.after);
        let report = load.stop()?;
        eprintln!("  {fault}: {}", report.to_string().replace('\n', "\n  "));
        for stream in &report.streams {
            ensure!(
                stream.answered() > 0,
                "{fault}: {} was never answered: the bed is broken",
                stream.stream
            );
        }
        runs.push(FaultRun {
            mode: bed.mode,
            fault,
            report,
        });
    }
    proxy.stop()?;
    Ok(runs)
}

/// The six streams: three from the client pod to the ClusterIP, three from the client outside
/// through the NodePort.
fn streams(bed: &Bed, set: &ServiceSet) -> Vec<Stream> {
    let cluster_ip = set.measured_ip();
    let tcp = SocketAddrV4::new(cluster_ip, HTTP_PORT);
    let udp = SocketAddrV4::new(cluster_ip, UDP_PORT);
    let node_tcp = SocketAddrV4::new(set.node_ip, HTTP_NODE_PORT);
    let node_udp = SocketAddrV4::new(set.node_ip, UDP_NODE_PORT);
    let (pod, outside) = (&bed.client, &bed.external_client);
    vec![
        Stream::udp(pod, udp),
        Stream::tcp_connections(pod, tcp),
        Stream::long_lived_tcp(pod, tcp),
        Stream::udp(outside, node_udp),
        Stream::tcp_connections(outside, node_tcp),
        Stream::long_lived_tcp(outside, node_tcp),
    ]
}

/// A mode's proxy, through its life and death.
enum Proxy<'b> {
    /// kube-proxy: the rules file it loads at every full sync, and the loader's command line
    /// (the file goes last).
    KubeProxy {
        node: &'b str,
        loader: &'static [&'static str],
        rules: PathBuf,
    },
    Agent {
        bed: &'b Bed,
        manifests: ManifestDir,
        /// None while it is down.
        agent: Option<Agent<'b>>,
    },
}

impl<'b> Proxy<'b> {
    fn start(bed: &'b Bed, set: &ServiceSet) -> Result<Self> {
        let scratch = bed.topology.scratch_dir();
        let mut proxy = match bed.mode {
            Mode::Iptables => {
                let rules = scratch.join("iptables.rules");
                fs::write(&rules, retarget(set, &set.iptables_restore()))?;
                Proxy::KubeProxy {
                    node: bed.topology.node_netns(),
                    loader: &["iptables-legacy-restore"],
                    rules,
                }
            }
            Mode::Nftables => {
                // A full sync of kube-proxy's nftables mode is one transaction that flushes its
                // table and fills it again; the first one finds it empty.
                let rules = scratch.join("ruleset.nft");
                let table = "ip kube-proxy";
                let ruleset = format!(
                    "add table {table}\nflush table {table}\n{}",
                    retarget(set, &set.nftables())
                );
                fs::write(&rules, ruleset)?;
                Proxy::KubeProxy {
                    node: bed.topology.node_netns(),
                    loader: &["nft", "-f"],
                    rules,
                }
            }
            Mode::Agent => {
                let manifests = ManifestDir::create(&bed.topology)?;
                manifests.write("services.json", &retarget_manifests(&set.manifests_json())?)?;
                Proxy::Agent {
                    bed,
                    manifests,
                    agent: None,
                }
            }
            Mode::Base => bail!("base has no proxy"),
        };
        proxy.come_back()?;
        Ok(proxy)
    }

    fn go_down_event(&self, fault: Fault) -> &'static str {
        match (self, fault) {
            (Proxy::KubeProxy { .. }, Fault::KillAndRestart) => "kube-proxy killed",
            (Proxy::KubeProxy { .. }, Fault::Upgrade) => "kube-proxy stopped",
            (Proxy::Agent { .. }, Fault::KillAndRestart) => "kill -9 the agent",
            (Proxy::Agent { .. }, Fault::Upgrade) => "SIGTERM the agent",
        }
    }

    /// The proxy process goes away; whatever it leaves in the kernel stays.
    fn go_down(&mut self, fault: Fault) -> Result<()> {
        match self {
            // Nothing runs: the rules are all there is.
            Proxy::KubeProxy { .. } => Ok(()),
            Proxy::Agent { agent, .. } => {
                let agent = agent.take().context("the agent is not running")?;
                let status = match fault {
                    Fault::KillAndRestart => agent.kill()?,
                    Fault::Upgrade => agent.stop()?,
                };
                eprintln!("  the agent exited: {status}");
                Ok(())
            }
        }
    }

    /// A new proxy starts on the node and syncs everything.
    fn come_back(&mut self) -> Result<()> {
        match self {
            Proxy::KubeProxy {
                node,
                loader,
                rules,
            } => {
                let (program, args) = loader.split_first().context("an empty loader")?;
                modes::run_ok(netns::command(node, program)?.args(args).arg(&*rules))
            }
            Proxy::Agent {
                bed,
                manifests,
                agent,
            } => {
                *agent = Some(bed.start_agent(manifests)?);
                Ok(())
            }
        }
    }

    fn stop(self) -> Result<()> {
        if let Proxy::Agent {
            agent: Some(agent), ..
        } = self
        {
            agent.stop()?;
        }
        Ok(())
    }
}

/// kube-proxy's rules with the measured service's TCP endpoints on the line server's port
/// instead of nginx's: in both rule shapes an endpoint appears as `address:port` and nowhere
/// else so (the per-endpoint chain names are hashes, or spell it `address/port`). Best done by
/// `ServiceSet` itself, with a target port of its own.
fn retarget(set: &ServiceSet, rules: &str) -> String {
    set.backends
        .iter()
        .fold(rules.to_owned(), |rules, backend| {
            rules.replace(
                &format!("{backend}:{HTTP_TARGET_PORT}"),
                &format!("{backend}:{}", servers::TCP_PORT),
            )
        })
}

/// The same for the agent's manifests (one JSON List): the `http` port's targetPort and the
/// EndpointSlices' `http` port.
fn retarget_manifests(json: &str) -> Result<String> {
    let mut list: serde_json::Value = serde_json::from_str(json)?;
    let items = list["items"]
        .as_array_mut()
        .context("a List without items")?;
    for item in items {
        let (ports, field) = match item["kind"].as_str() {
            Some("Service") => (&mut item["spec"]["ports"], "targetPort"),
            Some("EndpointSlice") => (&mut item["ports"], "port"),
            _ => continue,
        };
        for port in ports.as_array_mut().into_iter().flatten() {
            if port["name"] == "http" {
                port[field] = servers::TCP_PORT.into();
            }
        }
    }
    Ok(list.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retargeting_moves_only_the_measured_tcp_endpoints() {
        let set = modes::service_set(10);
        let rules = retarget(&set, &set.iptables_restore());
        assert!(rules.contains("--to-destination 10.244.0.12:8080"));
        assert!(!rules.contains("10.244.0.12:8000"));
        assert!(rules.contains("--to-destination 10.244.0.12:5353"));
        let nft = retarget(&set, &set.nftables());
        assert!(nft.contains("dnat to 10.244.0.11:8080"));
        assert!(!nft.contains("dnat to 10.244.0.11:8000"));
        let json = retarget_manifests(&set.manifests_json()).unwrap();
        assert!(!json.contains("8000"), "{json}");
        assert!(json.contains("\"port\":8080") && json.contains("\"targetPort\":8080"));
    }
}
