//! Several nodes of one cluster and a client outside it, on one LAN: what NodePort,
//! LoadBalancer and external-IP traffic needs. A namespace holds the LAN's bridge; each node
//! (a [`Topology`] with its own pods) joins it with its external link `ext0`, and so does the
//! client. Node `i` (from 1) is 192.168.100.i and owns the pod range 10.244.i.0/24, which the
//! other nodes route through it, as a cluster's pod network does without an overlay.

use std::net::Ipv4Addr;
use std::{collections::BTreeMap, process::Command};

use anyhow::{Context, Result, ensure};

use crate::{
    netns::NetNs,
    process::{COMMAND_TIMEOUT, ip, output_within},
    topology::{Pod, Topology},
    unique::RunId,
};

/// The name of every node's link to the LAN, for `--external-interface`.
pub const EXTERNAL_INTERFACE: &str = "ext0";
/// The client outside the cluster.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 10);
/// Where load-balancer and external IPs come from; the client routes them through node 1, as
/// an upstream router or a load balancer would pick one node.
pub const EXTERNAL_RANGE: &str = "203.0.113.0/24";

/// Node `index`'s address on the LAN (index from 1).
pub fn node_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 100, index)
}

/// The address of pod `host` on node `index` (index from 1).
pub fn pod_ip(index: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, index, host)
}

pub struct Lan {
    // Dropped in this order: nodes with their pods, the client, then the bridge.
    nodes: Vec<Topology>,
    client: NetNs,
    _bridge: NetNs,
}

impl Lan {
    /// One node per name, in order: `node_names[0]` is node 1.
    pub fn new(node_names: &[&str]) -> Result<Self> {
        let run = RunId::next();
        let bridge = NetNs::create(&run.netns_name("lan"))?;
        ip(&["-n", bridge.name(), "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", bridge.name(), "link", "set", "br0", "up"])?;
        let client = NetNs::create(&run.netns_name("client"))?;
        join(&bridge, "client", client.name(), "eth0")?;
        let client_cidr = format!("{CLIENT_IP}/24");
        ip(&[
            "-n",
            client.name(),
            "addr",
            "add",
            &client_cidr,
            "dev",
            "eth0",
        ])?;
        ip(&["-n", client.name(), "link", "set", "eth0", "up"])?;
        let first_node = node_ip(1).to_string();
        ip(&[
            "-n",
            client.name(),
            "route",
            "add",
            EXTERNAL_RANGE,
            "via",
            &first_node,
        ])?;

        let mut nodes = Vec::new();
        for (index, name) in (1u8..).zip(node_names) {
            let node = Topology::named(name)?;
            join(&bridge, name, node.node_netns(), EXTERNAL_INTERFACE)
                .with_context(|| format!("joining {name} to the LAN"))?;
            let node_cidr = format!("{}/24", node_ip(index));
            let ns = node.node_netns();
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &node_cidr,
                "dev",
                EXTERNAL_INTERFACE,
            ])?;
            ip(&["-n", ns, "link", "set", EXTERNAL_INTERFACE, "up"])?;
            nodes.push(node);
        }
        // Every node reaches the others' pods through them.
        for (index, node) in (1u8..).zip(&nodes) {
            for (other, _) in (1u8..).zip(node_names).filter(|(other, _)| *other != index) {
                let pods = format!("10.244.{other}.0/24");
                let via = node_ip(other).to_string();
                ip(&["-n", node.node_netns(), "route", "add", &pods, "via", &via])?;
            }
        }
        Ok(Self {
            nodes,
            client,
            _bridge: bridge,
        })
    }

    /// Node `index` (from 1).
    pub fn node(&self, index: u8) -> &Topology {
        &self.nodes[usize::from(index) - 1]
    }

    /// The counters of node `index`'s LAN link that tell what XDP did there (`ethtool -S` of a
    /// veth: rx_queue_0_xdp_packets, rx_queue_0_xdp_redirect, ...), by name. Native XDP only:
    /// generic XDP counts nothing per link.
    pub fn xdp_counters(&self, index: u8) -> Result<BTreeMap<String, u64>> {
        let output = output_within(
            Command::new("ip").args([
                "netns",
                "exec",
                self.node(index).node_netns(),
                "ethtool",
                "-S",
                EXTERNAL_INTERFACE,
            ]),
            COMMAND_TIMEOUT,
        )?;
        ensure!(
            output.status.success(),
            "ethtool -S {EXTERNAL_INTERFACE}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let (name, value) = line.split_once(':')?;
                Some((name.trim().to_owned(), value.trim().parse().ok()?))
            })
            .filter(|(name, _): &(String, u64)| name.contains("xdp"))
            .collect())
    }

    /// The client outside the cluster, with the same request helpers as a pod.
    pub fn client(&self) -> Pod {
        Pod {
            name: "client".into(),
            ip: CLIENT_IP,
            netns: self.client.name().into(),
            node_link: String::new(),
            node_name: String::new(),
        }
    }
}

/// Joins `netns` to the bridge with a veth pair: `inside` in `netns`, `port-<label>` on the bridge.
///
/// The LAN is made to behave like a wire. `inside` computes its checksums (TX offload off): a
/// veth otherwise hands over a partial checksum, which the XDP program cannot tell from a full
/// one as it could not on a NIC's receive path. And the bridge port has GRO on, which gives it a
/// NAPI context: a veth takes frames that XDP sends to its peer (`ext0`) only with one.
fn join(bridge: &NetNs, label: &str, netns: &str, inside: &str) -> Result<()> {
    let port = format!("p-{label}");
    ip(&[
        "-n",
        bridge.name(),
        "link",
        "add",
        &port,
        "type",
        "veth",
        "peer",
        "name",
        inside,
        "netns",
        netns,
    ])?;
    ip(&["-n", bridge.name(), "link", "set", &port, "master", "br0"])?;
    ip(&["-n", bridge.name(), "link", "set", &port, "up"])?;
    ip(&[
        "netns",
        "exec",
        bridge.name(),
        "ethtool",
        "-K",
        &port,
        "gro",
        "on",
    ])?;
    ip(&["netns", "exec", netns, "ethtool", "-K", inside, "tx", "off"])
}
