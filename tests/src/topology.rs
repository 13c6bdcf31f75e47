//! A Kubernetes node in miniature: one network namespace for the node and one per pod, wired the
//! way Calico wires pods (a veth pair per pod, the pod's address as a /32, a link-scoped route to
//! a gateway address that the node answers on every pod link, a /32 host route per pod on the
//! node). The node-side ends are named `lxc<N>` so that the agent's `--pod-interface 'lxc*'` finds
//! them, and the node forwards between pods as any node does: ClusterIP traffic is the agent's job.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::{Context, Result};

use crate::{agent, netns::NetNs, process::ip, servers::BackendServer, unique::RunId};

/// The address every pod routes through; the node holds it on each pod link (Calico style).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);

/// The glob that matches the node side of every pod link, for `--pod-interface`.
pub const POD_INTERFACE_GLOB: &str = "lxc*";

/// `spec.nodeName` of the pods and the agent's `--node-name`, for a single-node topology.
pub const NODE_NAME: &str = "node-1";

/// A pod of the topology: what traffic and manifests need to know about it. Cheap to clone; the
/// namespace itself belongs to the [`Topology`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// Name of the pod's network namespace.
    pub netns: String,
    /// Name of the node side of the pod's veth pair.
    pub node_link: String,
    /// The Kubernetes node it runs on (`spec.nodeName`).
    pub node_name: String,
}

pub struct Topology {
    run: RunId,
    // Fields drop in declaration order: the datapath agents pinned is detached first (agents
    // borrow the topology, so they have stopped), servers close their sockets while their
    // namespaces still exist, pods go before the node that holds the other ends of their links,
    // and the scratch directory goes last.
    // Held for its Drop.
    _datapath: PinnedDatapath,
    servers: Mutex<Vec<BackendServer>>,
    pods: Mutex<Vec<NetNs>>,
    node: NetNs,
    node_name: String,
    next_link: AtomicUsize,
    scratch: ScratchDir,
}

impl Topology {
    /// A node namespace that forwards between pods, without any pod yet.
    pub fn new() -> Result<Self> {
        Self::named(NODE_NAME)
    }

    /// The same, for one node of several: `node_name` is its Kubernetes name.
    pub fn named(node_name: &str) -> Result<Self> {
        let run = RunId::next();
        let scratch = ScratchDir::create(run.scratch_dir())?;
        let node = NetNs::create(&run.netns_name("node"))?;
        node.sysctl("net/ipv4/ip_forward", "1")?;
        // Pod traffic enters the node on one pod link and leaves on another, and the agent
        // rewrites addresses in between: strict reverse-path filtering would drop it.
        node.sysctl("net/ipv4/conf/all/rp_filter", "0")?;
        node.sysctl("net/ipv4/conf/default/rp_filter", "0")?;
        Ok(Self {
            _datapath: PinnedDatapath(run.pin_dir()),
            run,
            servers: Mutex::default(),
            pods: Mutex::default(),
            node,
            node_name: node_name.to_owned(),
            next_link: AtomicUsize::new(0),
            scratch,
        })
    }

    pub fn run_id(&self) -> &RunId {
        &self.run
    }

    /// Name of the node's network namespace.
    pub fn node_netns(&self) -> &str {
        self.node.name()
    }

    /// The node's Kubernetes name: its pods' `spec.nodeName` and the agent's `--node-name`.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// A directory for this topology's files (manifests, agent state and log); removed with it.
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch.0
    }

    /// Adds a pod with address `ip` (from 10.244.0.0/16, not the gateway).
    pub fn add_pod(&self, name: &str, ip: Ipv4Addr) -> Result<Pod> {
        self.wire_pod(name, ip)
            .with_context(|| format!("cannot add pod {name} ({ip})"))
    }

    /// Adds a pod that runs the [`BackendServer`]s, as a Deployment's pod runs its container.
    pub fn add_backend_pod(&self, name: &str, ip: Ipv4Addr) -> Result<Pod> {
        let pod = self.add_pod(name, ip)?;
        let server = BackendServer::start(&pod)?;
        lock(&self.servers).push(server);
        Ok(pod)
    }

    /// Adds a client outside the cluster on a link of its own to the node, as a router's would
    /// be: the node side `link` gets `node_ip`/24, the client `client_ip`/24 and its default
    /// route through the node. Like the LAN of several nodes (see `lan`), the link behaves like
    /// a wire: the client computes its checksums, and its end has GRO on so that frames the
    /// node's XDP program sends it are taken.
    pub fn add_external_client(
        &self,
        name: &str,
        client_ip: Ipv4Addr,
        node_ip: Ipv4Addr,
        link: &str,
    ) -> Result<Pod> {
        let netns = NetNs::create(&self.run.netns_name(name))?;
        let client = Pod {
            name: name.to_string(),
            ip: client_ip,
            netns: netns.name().to_string(),
            node_link: link.to_string(),
            node_name: String::new(),
        };
        lock(&self.pods).push(netns);
        let (node, ns) = (self.node.name(), client.netns.as_str());
        ip(&[
            "-n", node, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{client_ip}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &node_ip.to_string(),
        ])?;
        ip(&[
            "netns", "exec", ns, "ethtool", "-K", "eth0", "tx", "off", "gro", "on",
        ])?;
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            &format!("{node_ip}/24"),
            "dev",
            link,
        ])?;
        ip(&["-n", node, "link", "set", link, "up"])?;
        Ok(client)
    }

    fn wire_pod(&self, name: &str, address: Ipv4Addr) -> Result<Pod> {
        let netns = NetNs::create(&self.run.netns_name(name))?;
        let pod = Pod {
            name: name.to_string(),
            ip: address,
            netns: netns.name().to_string(),
            node_link: format!("lxc{}", self.next_link.fetch_add(1, Ordering::Relaxed)),
            node_name: self.node_name.clone(),
        };
        lock(&self.pods).push(netns);
        let (node, link, pod_ns) = (self.node.name(), pod.node_link.as_str(), pod.netns.as_str());
        let (pod_cidr, gateway) = (format!("{address}/32"), POD_GATEWAY.to_string());

        // Created across the two namespaces at once: the pod end never exists in the node.
        ip(&[
            "-n", node, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns",
            pod_ns,
        ])?;

        ip(&["-n", pod_ns, "addr", "add", &pod_cidr, "dev", "eth0"])?;
        ip(&["-n", pod_ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", pod_ns, "route", "add", &gateway, "dev", "eth0"])?;
        ip(&[
            "-n", pod_ns, "route", "add", "default", "via", &gateway, "dev", "eth0",
        ])?;

        self.node
            .sysctl(&format!("net/ipv4/conf/{link}/rp_filter"), "0")?;
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            &format!("{gateway}/32"),
            "dev",
            link,
        ])?;
        ip(&["-n", node, "link", "set", link, "up"])?;
        ip(&["-n", node, "route", "add", &pod_cidr, "dev", link])?;
        Ok(pod)
    }
}

/// A lock that survives a panicking holder: `Drop` must still clean up after a failed test.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The pin directory of the topology's agents (maps and links: the datapath), which outlives
/// each agent as on a real node, removed with `service-agent cleanup` as an operator would.
struct PinnedDatapath(PathBuf);

impl Drop for PinnedDatapath {
    fn drop(&mut self) {
        if !self.0.exists() {
            return;
        }
        match agent::cleanup(&self.0) {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "warning: `service-agent cleanup --pin-dir {}` failed ({}): {}",
                self.0.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(error) => eprintln!("warning: {error:#}"),
        }
        if self.0.exists() {
            eprintln!(
                "warning: cleanup left {} behind; removing it",
                self.0.display()
            );
            if let Err(error) = fs::remove_dir_all(&self.0) {
                eprintln!("warning: cannot remove {}: {error}", self.0.display());
            }
        }
    }
}

struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create(path: PathBuf) -> Result<Self> {
        fs::create_dir_all(&path)
            .with_context(|| format!("cannot create scratch dir {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(error) = fs::remove_dir_all(&self.0) {
            eprintln!("warning: cannot remove {}: {error}", self.0.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use super::*;
    use crate::{netns::NETNS_DIR, servers};

    /// Pods reach each other through the node, both ways, and over both protocols; everything is
    /// gone afterwards.
    #[test]
    fn pods_reach_each_other_through_the_node_and_nothing_is_left() -> Result<()> {
        crate::require_root("pods_reach_each_other_through_the_node_and_nothing_is_left");
        let topology = Topology::new()?;
        let client = topology.add_pod("client", Ipv4Addr::new(10, 244, 0, 10))?;
        let backend = topology.add_backend_pod("backend", Ipv4Addr::new(10, 244, 0, 20))?;
        let (tcp, udp) = (
            SocketAddrV4::new(backend.ip, servers::TCP_PORT),
            SocketAddrV4::new(backend.ip, servers::UDP_PORT),
        );
        assert_eq!(client.tcp_request(tcp)?, "backend");
        assert_eq!(client.udp_request(udp)?, "backend");

        let names = [
            topology.node_netns().to_string(),
            client.netns.clone(),
            backend.netns.clone(),
        ];
        let scratch = topology.scratch_dir().to_path_buf();
        drop(topology);
        for name in names {
            assert!(
                !Path::new(NETNS_DIR).join(&name).exists(),
                "{name} left behind"
            );
        }
        assert!(!scratch.exists(), "{} left behind", scratch.display());
        Ok(())
    }
}
