//! The Kubernetes API objects the control plane reads, as their YAML/JSON spells them. Only the
//! fields a Service proxy needs are declared; serde ignores the rest, so real-world manifests
//! (with status, managedFields, annotations...) load as they are.
//!
//! Types here check shape only (a port is a number, a phase is a known word). Whether the values
//! make sense together is the control plane's validation, so that one bad Service is rejected on
//! its own instead of taking its whole file down.

use std::{collections::BTreeMap, fmt, time::SystemTime};

use serde::{Deserialize, Deserializer, de};

use super::rfc3339;
use crate::model::{self, ServiceName};

/// Where an object came from, for messages a user can act on: e.g. `web.yaml: document 2`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin(String);

impl Origin {
    pub fn new(description: impl Into<String>) -> Self {
        Origin(description.into())
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An object together with where it came from.
#[derive(Clone, Debug)]
pub struct Located<T> {
    pub origin: Origin,
    pub object: T,
}

impl<T: KubernetesObject> Located<T> {
    /// The prefix of every message about this object: `web.yaml: document 2 (Service default/web)`.
    pub fn context(&self) -> String {
        let metadata = self.object.metadata();
        format!(
            "{} ({} {}/{})",
            self.origin,
            T::KIND,
            metadata.namespace(),
            metadata.name
        )
    }
}

pub trait KubernetesObject {
    const KIND: &'static str;
    fn metadata(&self) -> &ObjectMeta;
}

/// Every object the control plane understands, as one manifest document holds it.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Service),
    Pod(Pod),
    Endpoints(Endpoints),
    EndpointSlice(EndpointSlice),
}

/// All objects of one load, by kind.
#[derive(Clone, Debug, Default)]
pub struct ClusterObjects {
    pub services: Vec<Located<Service>>,
    pub pods: Vec<Located<Pod>>,
    pub endpoints: Vec<Located<Endpoints>>,
    pub endpoint_slices: Vec<Located<EndpointSlice>>,
}

impl ClusterObjects {
    pub fn add(&mut self, located: Located<Object>) {
        let origin = located.origin;
        match located.object {
            Object::Service(object) => self.services.push(Located { origin, object }),
            Object::Pod(object) => self.pods.push(Located { origin, object }),
            Object::Endpoints(object) => self.endpoints.push(Located { origin, object }),
            Object::EndpointSlice(object) => self.endpoint_slices.push(Located { origin, object }),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default, deserialize_with = "rfc3339::deserialize_optional")]
    pub creation_timestamp: Option<SystemTime>,
    #[serde(default, deserialize_with = "rfc3339::deserialize_optional")]
    pub deletion_timestamp: Option<SystemTime>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl ObjectMeta {
    /// The namespace the API server would put the object in: `default` when the manifest has none.
    pub fn namespace(&self) -> &str {
        match self.namespace.as_deref() {
            None | Some("") => "default",
            Some(namespace) => namespace,
        }
    }
}

/// `protocol` of ports: the API accepts SCTP, which this dataplane does not translate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    /// The protocol as the dataplane knows it; None for SCTP, which it does not translate.
    pub fn supported(self) -> Option<model::Protocol> {
        match self {
            Protocol::Tcp => Some(model::Protocol::Tcp),
            Protocol::Udp => Some(model::Protocol::Udp),
            Protocol::Sctp => None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct Service {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
    #[serde(default)]
    pub status: ServiceStatus,
}

impl Service {
    pub fn service_name(&self) -> ServiceName {
        ServiceName {
            namespace: self.metadata.namespace().to_owned(),
            name: self.metadata.name.clone(),
        }
    }
}

impl KubernetesObject for Service {
    const KIND: &'static str = "Service";
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(rename = "type", default)]
    pub service_type: ServiceType,
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub publish_not_ready_addresses: bool,
    #[serde(default, rename = "externalIPs")]
    pub external_ips: Vec<String>,
    #[serde(default)]
    pub external_traffic_policy: Option<ExternalTrafficPolicy>,
    /// None means true for a LoadBalancer (the API server's default); other types must leave it
    /// unset.
    #[serde(default)]
    pub allocate_load_balancer_node_ports: Option<bool>,
    /// Where the node answers a load balancer's health check (LoadBalancer with policy Local);
    /// 0 or absent: allocate one.
    #[serde(default)]
    pub health_check_node_port: Option<u16>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum ExternalTrafficPolicy {
    /// Older API versions spelled it `Global`, and the API server still accepts that.
    #[serde(alias = "Global")]
    Cluster,
    Local,
}

/// Written by the load balancer's controller, not by the user.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    #[serde(default)]
    pub load_balancer: LoadBalancerStatus,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct LoadBalancerStatus {
    #[serde(default)]
    pub ingress: Vec<LoadBalancerIngress>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerIngress {
    /// None for a load balancer known by `hostname` only (which is not read: a DNS name is
    /// nothing a node can match packets against).
    #[serde(default)]
    pub ip: Option<String>,
    /// None means VIP, as before the field existed.
    #[serde(default)]
    pub ip_mode: Option<LoadBalancerIpMode>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum LoadBalancerIpMode {
    /// The load balancer delivers packets with the IP as their destination: the node must
    /// translate it like a cluster IP.
    #[serde(rename = "VIP")]
    Vip,
    /// The load balancer delivers packets to the node's own address (and port): nothing to
    /// translate for the IP.
    Proxy,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub target_port: Option<TargetPort>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub node_port: Option<u16>,
}

/// `targetPort`: Kubernetes' IntOrString, either the pods' port number or the name of a
/// container port, which each pod resolves on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

impl<'de> Deserialize<'de> for TargetPort {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TargetPortVisitor;

        impl de::Visitor<'_> for TargetPortVisitor {
            type Value = TargetPort;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a port name")
            }

            fn visit_u64<E: de::Error>(self, value: u64) -> Result<TargetPort, E> {
                u16::try_from(value)
                    .map(TargetPort::Number)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(value), &self))
            }

            fn visit_i64<E: de::Error>(self, value: i64) -> Result<TargetPort, E> {
                u16::try_from(value)
                    .map(TargetPort::Number)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(value), &self))
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<TargetPort, E> {
                Ok(TargetPort::Name(value.to_owned()))
            }
        }

        deserializer.deserialize_any(TargetPortVisitor)
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

impl KubernetesObject for Pod {
    const KIND: &'static str = "Pod";
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub containers: Vec<Container>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Container {
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    #[serde(default)]
    pub phase: Option<PodPhase>,
    #[serde(default)]
    pub conditions: Vec<PodCondition>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    /// The API documents `Unknown`; anything newer is treated the same way.
    #[serde(other)]
    Unknown,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PodCondition {
    #[serde(rename = "type")]
    pub condition_type: String,
    pub status: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Endpoints {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub subsets: Vec<EndpointSubset>,
}

impl KubernetesObject for Endpoints {
    const KIND: &'static str = "Endpoints";
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSubset {
    #[serde(default)]
    pub addresses: Vec<EndpointAddress>,
    #[serde(default)]
    pub not_ready_addresses: Vec<EndpointAddress>,
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointAddress {
    pub ip: String,
    #[serde(default)]
    pub node_name: Option<String>,
}

/// A port of an Endpoints subset or of an EndpointSlice (both APIs spell it the same way).
#[derive(Clone, Debug, Deserialize)]
pub struct EndpointPort {
    #[serde(default)]
    pub name: Option<String>,
    /// Optional in EndpointSlices, where its absence means "all ports", which a proxy cannot use.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    pub metadata: ObjectMeta,
    pub address_type: AddressType,
    #[serde(default)]
    pub endpoints: Vec<SliceEndpoint>,
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
}

impl KubernetesObject for EndpointSlice {
    const KIND: &'static str = "EndpointSlice";
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
}

impl EndpointSlice {
    /// The label by which an EndpointSlice names the Service it belongs to.
    pub const SERVICE_NAME_LABEL: &'static str = "kubernetes.io/service-name";
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum AddressType {
    IPv4,
    IPv6,
    #[serde(rename = "FQDN")]
    Fqdn,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: EndpointConditions,
    #[serde(default)]
    pub node_name: Option<String>,
}

/// discovery.k8s.io/v1 EndpointConditions; absent fields have the defaults the API documents.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub struct EndpointConditions {
    #[serde(default)]
    pub ready: Option<bool>,
    #[serde(default)]
    pub serving: Option<bool>,
    #[serde(default)]
    pub terminating: Option<bool>,
}
