//! The desired state of the node's Service dataplane, as every source (manifest files today, the
//! Kubernetes API later) produces it and the syncer consumes it. Nothing here knows about BPF maps.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, sync::Arc, time::SystemTime};

use serde::{Deserialize, Serialize};

/// A Service's identity: the same name in two namespaces is two services.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The L4 protocols the dataplane translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    /// The IANA protocol number, as the IPv4 header carries it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => service_common::IPPROTO_TCP,
            Protocol::Udp => service_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// `spec.type` of a Service that has a virtual IP (ExternalName and headless Services never reach
/// the model: they have nothing for a proxy to do).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl fmt::Display for ServiceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// `spec.externalTrafficPolicy`: who may serve traffic that enters the cluster through this node
/// (nodePorts, load-balancer and external IPs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrafficPolicy {
    /// Any endpoint, on any node; the client's address is replaced by the node's (SNAT) so that
    /// replies come back through this node.
    #[default]
    Cluster,
    /// Only this node's endpoints; the client's address reaches them unchanged, and a node
    /// without a local endpoint drops the traffic.
    Local,
}

/// One endpoint of one service port: the address and the resolved target port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    pub address: Ipv4Addr,
    pub port: u16,
    /// EndpointConditions of discovery.k8s.io/v1: ready implies serving and not terminating.
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The node the endpoint runs on, when the source knows it.
    pub node_name: Option<String>,
}

/// One entry of `spec.ports` with the endpoints that serve it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    /// Empty when the Service has a single unnamed port.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// The port opened on every node IP (types NodePort and LoadBalancer).
    pub node_port: Option<u16>,
    /// Sorted by (address, port), without duplicates.
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: ServiceName,
    pub service_type: ServiceType,
    pub cluster_ip: Ipv4Addr,
    /// `spec.externalIPs` (the IPv4 ones): served at the service ports by any node that
    /// receives traffic for them, whether or not the address is assigned to it.
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip` (IPv4, ipMode VIP): served like external IPs.
    pub load_balancer_ips: Vec<Ipv4Addr>,
    pub external_traffic_policy: TrafficPolicy,
    /// LoadBalancer with policy Local: where the node tells a load balancer's health check how
    /// many local endpoints it has (kube-proxy's healthCheckNodePort server).
    #[serde(default)]
    pub health_check_node_port: Option<u16>,
    pub ports: Vec<ServicePort>,
    /// metadata.creationTimestamp when the source gives one, else when this agent first saw it.
    pub created: SystemTime,
}

/// Everything the node should serve. Services are shared, so that a source hands out a new state
/// without copying the Services it did not change (and the syncer sees at once which ones it did).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    pub services: BTreeMap<ServiceName, Arc<Service>>,
}

/// The node this agent serves, as far as the desired maps depend on it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    /// `--node-ip`: where nodePorts answer; the first is the source of SNATed traffic.
    pub ips: Vec<Ipv4Addr>,
    /// `--node-name`: which endpoints are local, for externalTrafficPolicy Local.
    pub name: Option<String>,
}
