//! Plays the Kubernetes control plane's part for a set of API objects: validates Services the way
//! the API server would, assigns cluster IPs and nodePorts, and finds the endpoints of every
//! Service port the way the endpoints controllers would. The result is the node's `DesiredState`.
//!
//! One bad Service never takes others down: it is reported, and if an earlier version of it was
//! accepted, that version stays in the desired state so that traffic keeps flowing.

mod allocator;
mod cidr;
pub(crate) mod endpoint_objects;
mod endpoint_set;
mod node_port_allocator;
pub mod objects;
mod port_range;
mod rfc3339;
mod selector;
mod state_file;
#[cfg(test)]
pub(crate) mod test_support;
mod validation;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::SystemTime,
};

pub use cidr::{InvalidCidr, Ipv4Cidr};
pub use port_range::{DEFAULT_NODE_PORT_RANGE, PortRange};

use self::{
    allocator::ClusterIpAllocator,
    endpoint_objects::EndpointObjectIndex,
    node_port_allocator::{NodePortAllocator, NodePortKey},
    objects::{ClusterObjects, Located},
    selector::PodIndex,
    validation::{ClusterIpRequest, PortDefinition, ServiceDefinition, Validation},
};
use crate::model::{DesiredState, Protocol, Service, ServiceName, ServicePort};

/// Kubernetes' default `--service-cluster-ip-range`.
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";

#[derive(Clone, Debug)]
pub struct ControlPlaneConfig {
    /// Where cluster IPs come from; explicit ones must be inside it too.
    pub service_cidr: Ipv4Cidr,
    /// Where allocated cluster IPs and nodePorts are kept across restarts; None = keep nothing on
    /// disk.
    pub state_dir: Option<PathBuf>,
    /// Where nodePorts are allocated; explicit ones must be inside it too.
    pub node_port_range: PortRange,
}

pub struct ControlPlane {
    service_cidr: Ipv4Cidr,
    node_port_range: PortRange,
    allocator: ClusterIpAllocator,
    node_port_allocator: NodePortAllocator,
    /// When each Service without a creationTimestamp was first seen, which stands in for it.
    first_seen: HashMap<ServiceName, SystemTime>,
    /// The last definition of each Service that made it into the desired state, for when a
    /// later version of it is invalid.
    accepted: HashMap<ServiceName, ServiceDefinition>,
    /// The cluster IPs of the last result: a Service keeps its IP against newcomers claiming it.
    cluster_ips: HashMap<ServiceName, Ipv4Addr>,
    /// The holders of the nodePorts of the last result, for the same reason.
    node_port_holders: HashMap<u16, ServiceName>,
}

/// The outcome of one reconciliation: what to serve, and what the user should fix.
pub struct Reconciled {
    pub state: DesiredState,
    pub problems: Vec<String>,
}

/// A Service as this reconciliation would like to serve it, before cluster IPs are settled.
struct Candidate<'a> {
    located: &'a Located<objects::Service>,
    definition: ServiceDefinition,
    /// The last accepted definition, when it differs from `definition` and may stand in for it.
    fallback: Option<ServiceDefinition>,
    created: SystemTime,
}

impl ControlPlane {
    pub fn new(config: &ControlPlaneConfig) -> anyhow::Result<Self> {
        Ok(ControlPlane {
            service_cidr: config.service_cidr.clone(),
            node_port_range: config.node_port_range,
            allocator: ClusterIpAllocator::new(
                config.service_cidr.clone(),
                config.state_dir.as_deref(),
            )?,
            node_port_allocator: NodePortAllocator::new(
                config.node_port_range,
                config.state_dir.as_deref(),
            )?,
            first_seen: HashMap::new(),
            accepted: HashMap::new(),
            cluster_ips: HashMap::new(),
            node_port_holders: HashMap::new(),
        })
    }

    pub fn reconcile(&mut self, objects: &ClusterObjects) -> Reconciled {
        let mut problems = Vec::new();
        let services = unique_services(&objects.services, &mut problems);
        let now = SystemTime::now();
        self.first_seen
            .retain(|name, _| services.contains_key(name));
        self.accepted.retain(|name, _| services.contains_key(name));

        let mut candidates = BTreeMap::new();
        for (name, located) in &services {
            let validation =
                validation::validate(located, &self.service_cidr, self.node_port_range);
            let (definition, fallback) = match validation {
                Validation::Proxied {
                    definition,
                    warnings,
                } => {
                    problems.extend(warnings);
                    let fallback = self
                        .accepted
                        .get(name)
                        .filter(|accepted| **accepted != definition)
                        .cloned();
                    (definition, fallback)
                }
                Validation::NotProxied(kind) => {
                    tracing::debug!("{}: {kind} Service, nothing to proxy", located.context());
                    self.accepted.remove(name);
                    continue;
                }
                Validation::Invalid(errors) => {
                    problems.extend(errors);
                    let Some(accepted) = self.accepted.get(name) else {
                        continue;
                    };
                    problems.push(format!(
                        "{}: serving its last accepted version until the manifest is fixed",
                        located.context()
                    ));
                    (accepted.clone(), None)
                }
            };
            let created = definition
                .created
                .unwrap_or_else(|| *self.first_seen.entry(name.clone()).or_insert(now));
            candidates.insert(
                name.clone(),
                Candidate {
                    located,
                    definition,
                    fallback,
                    created,
                },
            );
        }

        let mut reserved = self.reserve_explicit_cluster_ips(&mut candidates, &mut problems);
        let reserved_node_ports =
            self.reserve_explicit_node_ports(&mut candidates, &mut reserved, &mut problems);
        let to_allocate: Vec<ServiceName> = candidates
            .iter()
            .filter(|(_, candidate)| candidate.definition.cluster_ip == ClusterIpRequest::Allocate)
            .map(|(name, _)| name.clone())
            .collect();
        let allocated = self.allocator.allocate(&to_allocate, &reserved);
        if let Err(error) = self.allocator.save() {
            problems.push(format!(
                "{error:#}; Services without an explicit clusterIP may get new IPs when the agent restarts"
            ));
        }
        // A health check nodePort is allocated like a port's, under a name no port can have.
        let health_check_ports: Vec<(&ServiceName, [PortDefinition; 1])> = candidates
            .iter()
            .filter_map(|(name, candidate)| {
                let check = candidate.definition.health_check?;
                Some((name, [health_check_port(check.explicit)]))
            })
            .collect();
        let node_port_requests: Vec<(&ServiceName, &[PortDefinition])> = candidates
            .iter()
            .filter(|(_, candidate)| candidate.definition.allocate_node_ports)
            .map(|(name, candidate)| (name, candidate.definition.ports.as_slice()))
            .chain(
                health_check_ports
                    .iter()
                    .map(|(name, port)| (*name, port.as_slice())),
            )
            .collect();
        let allocated_node_ports = self
            .node_port_allocator
            .allocate(&node_port_requests, &reserved_node_ports);
        if let Err(error) = self.node_port_allocator.save() {
            problems.push(format!(
                "{error:#}; Service ports without an explicit nodePort may get new nodePorts when the agent restarts"
            ));
        }

        let pods = PodIndex::new(&objects.pods, &mut problems);
        let endpoint_objects =
            EndpointObjectIndex::new(&objects.endpoints, &objects.endpoint_slices, &mut problems);
        let mut state = DesiredState::default();
        self.cluster_ips.clear();
        self.node_port_holders.clear();
        for (name, candidate) in candidates {
            let cluster_ip = match candidate.definition.cluster_ip {
                ClusterIpRequest::Explicit(ip) => ip,
                ClusterIpRequest::Allocate => match allocated.get(&name) {
                    Some(&ip) => ip,
                    None => {
                        problems.push(format!(
                            "{}: no free cluster IP left in the service CIDR {}",
                            candidate.located.context(),
                            self.service_cidr
                        ));
                        continue;
                    }
                },
            };
            let definition = candidate.definition;
            let node_ports: Vec<Option<u16>> = definition
                .ports
                .iter()
                .map(|port| {
                    port.node_port.or_else(|| {
                        allocated_node_ports
                            .get(&NodePortKey::new(&name, port))
                            .copied()
                    })
                })
                .collect();
            let health_check_node_port = definition.health_check.map(|check| {
                check.explicit.or_else(|| {
                    allocated_node_ports
                        .get(&NodePortKey::new(&name, &health_check_port(None)))
                        .copied()
                })
            });
            if (definition.allocate_node_ports && node_ports.contains(&None))
                || health_check_node_port == Some(None)
            {
                problems.push(format!(
                    "{}: no free nodePort left in the node port range {}",
                    candidate.located.context(),
                    self.node_port_range
                ));
                continue;
            }
            let ports = definition
                .ports
                .iter()
                .zip(&node_ports)
                .map(|(port, &node_port)| ServicePort {
                    name: port.name.clone(),
                    port: port.port,
                    protocol: port.protocol,
                    node_port,
                    endpoints: match &definition.selector {
                        Some(selector) => pods.endpoints(
                            &name.namespace,
                            selector,
                            definition.publish_not_ready_addresses,
                            port,
                        ),
                        None => endpoint_objects.endpoints(
                            &name,
                            definition.ports.len(),
                            &port.name,
                            port.protocol,
                        ),
                    },
                })
                .collect();
            state.services.insert(
                name.clone(),
                Arc::new(Service {
                    name: name.clone(),
                    service_type: definition.service_type,
                    cluster_ip,
                    external_ips: definition.external_ips.clone(),
                    load_balancer_ips: definition.load_balancer_ips.clone(),
                    external_traffic_policy: definition.external_traffic_policy,
                    health_check_node_port: health_check_node_port.flatten(),
                    ports,
                    created: candidate.created,
                }),
            );
            self.cluster_ips.insert(name.clone(), cluster_ip);
            for node_port in node_ports
                .into_iter()
                .chain(health_check_node_port)
                .flatten()
            {
                self.node_port_holders.insert(node_port, name.clone());
            }
            self.accepted.insert(name, definition);
        }
        Reconciled { state, problems }
    }

    /// Settles which Service gets each explicitly requested cluster IP. A conflict is won by the
    /// Service that already had the IP, else by the oldest (as the API server would have refused
    /// the later one). A loser falls back to its last accepted definition when that still fits,
    /// and is otherwise left out. Returns the reserved IPs and who holds them.
    fn reserve_explicit_cluster_ips(
        &self,
        candidates: &mut BTreeMap<ServiceName, Candidate>,
        problems: &mut Vec<String>,
    ) -> HashMap<Ipv4Addr, ServiceName> {
        let mut claims: BTreeMap<Ipv4Addr, Vec<&ServiceName>> = BTreeMap::new();
        for (name, candidate) in candidates.iter() {
            if let ClusterIpRequest::Explicit(ip) = candidate.definition.cluster_ip {
                claims.entry(ip).or_default().push(name);
            }
        }
        let mut reserved = HashMap::new();
        let mut losers = Vec::new();
        for (ip, mut claimants) in claims {
            claimants.sort_by_key(|name| {
                let held_before = self.cluster_ips.get(*name) == Some(&ip);
                (!held_before, candidates[*name].created, *name)
            });
            let winner = claimants[0];
            for loser in &claimants[1..] {
                problems.push(format!(
                    "{}: spec.clusterIP: {ip} is already the cluster IP of Service {winner}",
                    candidates[*loser].located.context()
                ));
                losers.push((*loser).clone());
            }
            reserved.insert(ip, winner.clone());
        }
        for loser in losers {
            let mut candidate = candidates.remove(&loser).expect("losers are candidates");
            let Some(fallback) = candidate.fallback.take() else {
                continue;
            };
            if let ClusterIpRequest::Explicit(ip) = fallback.cluster_ip {
                if reserved.contains_key(&ip) {
                    continue;
                }
                reserved.insert(ip, loser.clone());
            }
            problems.push(format!(
                "{}: serving its last accepted version until the conflict is resolved",
                candidate.located.context()
            ));
            candidate.definition = fallback;
            candidates.insert(loser, candidate);
        }
        reserved
    }

    /// Settles which Service gets each explicitly requested nodePort, as
    /// `reserve_explicit_cluster_ips` does for cluster IPs: a port number belongs to one Service,
    /// whatever the protocol. A loser that falls back to its last accepted definition gets that
    /// definition's cluster IP and nodePorts reserved, if they are free. Returns the reserved
    /// nodePorts and who holds them.
    fn reserve_explicit_node_ports(
        &self,
        candidates: &mut BTreeMap<ServiceName, Candidate>,
        reserved_ips: &mut HashMap<Ipv4Addr, ServiceName>,
        problems: &mut Vec<String>,
    ) -> HashMap<u16, ServiceName> {
        let mut claims: BTreeMap<u16, Vec<&ServiceName>> = BTreeMap::new();
        for (name, candidate) in candidates.iter() {
            for node_port in candidate.definition.explicit_node_ports() {
                claims.entry(node_port).or_default().push(name);
            }
        }
        let mut reserved = HashMap::new();
        let mut losers = BTreeSet::new();
        for (node_port, mut claimants) in claims {
            claimants.sort_by_key(|name| {
                let held_before = self.node_port_holders.get(&node_port) == Some(*name);
                (!held_before, candidates[*name].created, *name)
            });
            let winner = claimants[0];
            for loser in &claimants[1..] {
                let candidate = &candidates[*loser];
                for port in &candidate.definition.ports {
                    if port.node_port == Some(node_port) {
                        problems.push(format!(
                            "{}: spec.ports[{}].nodePort: {node_port} is already allocated to Service {winner}",
                            candidate.located.context(),
                            port.index
                        ));
                    }
                }
                if candidate
                    .definition
                    .health_check
                    .is_some_and(|check| check.explicit == Some(node_port))
                {
                    problems.push(format!(
                        "{}: spec.healthCheckNodePort: {node_port} is already allocated to Service {winner}",
                        candidate.located.context()
                    ));
                }
                losers.insert((*loser).clone());
            }
            reserved.insert(node_port, winner.clone());
        }
        // A loser is left out (or served as it was), so the nodePorts it won are not its.
        reserved.retain(|_, holder| !losers.contains(holder));
        for loser in losers {
            let mut candidate = candidates.remove(&loser).expect("losers are candidates");
            if let ClusterIpRequest::Explicit(ip) = candidate.definition.cluster_ip
                && reserved_ips.get(&ip) == Some(&loser)
            {
                reserved_ips.remove(&ip);
            }
            let Some(fallback) = candidate.fallback.take() else {
                continue;
            };
            let cluster_ip_is_free = match fallback.cluster_ip {
                ClusterIpRequest::Explicit(ip) => !reserved_ips.contains_key(&ip),
                ClusterIpRequest::Allocate => true,
            };
            let node_ports = fallback.explicit_node_ports();
            if !cluster_ip_is_free || node_ports.iter().any(|port| reserved.contains_key(port)) {
                continue;
            }
            if let ClusterIpRequest::Explicit(ip) = fallback.cluster_ip {
                reserved_ips.insert(ip, loser.clone());
            }
            for node_port in node_ports {
                reserved.insert(node_port, loser.clone());
            }
            problems.push(format!(
                "{}: serving its last accepted version until the conflict is resolved",
                candidate.located.context()
            ));
            candidate.definition = fallback;
            candidates.insert(loser, candidate);
        }
        reserved
    }
}

/// The Services by name; a name defined twice keeps its first definition, as `kubectl apply`
/// of both would leave only one object.
fn unique_services<'a>(
    services: &'a [Located<objects::Service>],
    problems: &mut Vec<String>,
) -> BTreeMap<ServiceName, &'a Located<objects::Service>> {
    let mut unique: BTreeMap<ServiceName, &Located<objects::Service>> = BTreeMap::new();
    for located in services {
        let name = located.object.service_name();
        match unique.get(&name) {
            Some(first) => {
                problems.push(format!(
                    "{}: defined again; only the definition at {} is used",
                    located.context(),
                    first.origin
                ));
            }
            None => {
                unique.insert(name, located);
            }
        }
    }
    unique
}

/// The stand-in port definition a health check nodePort is allocated and kept under: its name
/// is not a valid port name (those are lowercase), so it never meets a real port's key.
fn health_check_port(explicit: Option<u16>) -> PortDefinition {
    PortDefinition {
        index: 0,
        name: "healthCheckNodePort".into(),
        port: 0,
        protocol: Protocol::Tcp,
        target_port: objects::TargetPort::Number(0),
        node_port: explicit,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        controlplane::test_support::{TempDir, cluster_objects},
        model::{Endpoint, Protocol, ServiceType, TrafficPolicy},
    };

    fn control_plane(state_dir: Option<&std::path::Path>) -> ControlPlane {
        control_plane_with_node_ports(state_dir, DEFAULT_NODE_PORT_RANGE)
    }

    fn control_plane_with_node_ports(
        state_dir: Option<&std::path::Path>,
        node_port_range: PortRange,
    ) -> ControlPlane {
        ControlPlane::new(&ControlPlaneConfig {
            service_cidr: DEFAULT_SERVICE_CIDR.parse().unwrap(),
            state_dir: state_dir.map(Into::into),
            node_port_range,
        })
        .unwrap()
    }

    fn name(namespace: &str, name: &str) -> ServiceName {
        ServiceName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    /// A minimal Service manifest: `spec` is the inside of a flow mapping.
    fn service(metadata: &str, spec: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{{metadata}}}\nspec: {{{spec}}}\n---\n")
    }

    fn cluster_ips(state: &DesiredState) -> Vec<(String, Ipv4Addr)> {
        state
            .services
            .values()
            .map(|service| (service.name.to_string(), service.cluster_ip))
            .collect()
    }

    /// Every port's nodePort, as `namespace/name:port`.
    fn node_ports(state: &DesiredState) -> Vec<(String, Option<u16>)> {
        state
            .services
            .values()
            .flat_map(|service| {
                service
                    .ports
                    .iter()
                    .map(|port| (format!("{}:{}", service.name, port.port), port.node_port))
            })
            .collect()
    }

    fn node_port(service: &str, node_port: u16) -> (String, Option<u16>) {
        (format!("default/{service}:80"), Some(node_port))
    }

    #[test]
    fn builds_services_from_selected_pods() {
        let objects = cluster_objects(&format!(
            "{}{}{}",
            service(
                "name: web, namespace: shop, creationTimestamp: \"2024-01-01T00:00:00Z\"",
                "type: LoadBalancer, clusterIP: 10.96.0.80, selector: {app: web},
                 ports: [{name: http, port: 80, targetPort: web}, {name: dns, port: 53, protocol: UDP}]"
            ),
            "apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-a
  containers: [{ports: [{name: web, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}]}]
status: {podIP: 10.0.0.7, conditions: [{type: Ready, status: \"True\"}]}
---
",
            "apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec: {containers: [{ports: [{name: web, containerPort: 8081}]}]}
status: {podIP: 10.0.0.3, conditions: [{type: Ready, status: \"True\"}]}
"
        ));
        let reconciled = control_plane(None).reconcile(&objects);
        assert!(reconciled.problems.is_empty(), "{:?}", reconciled.problems);
        let web = &reconciled.state.services[&name("shop", "web")];
        assert_eq!(web.service_type, ServiceType::LoadBalancer);
        assert_eq!(web.cluster_ip, ip("10.96.0.80"));
        assert_eq!(
            web.created,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_067_200)
        );
        let endpoint = |address: &str, port, node_name: Option<&str>| Endpoint {
            address: ip(address),
            port,
            ready: true,
            serving: true,
            terminating: false,
            node_name: node_name.map(Into::into),
        };
        assert_eq!(
            web.ports,
            [
                ServicePort {
                    name: "http".into(),
                    port: 80,
                    protocol: Protocol::Tcp,
                    node_port: Some(30000),
                    endpoints: vec![
                        endpoint("10.0.0.3", 8081, None),
                        endpoint("10.0.0.7", 8080, Some("node-a")),
                    ],
                },
                ServicePort {
                    name: "dns".into(),
                    port: 53,
                    protocol: Protocol::Udp,
                    node_port: Some(30001),
                    endpoints: vec![
                        endpoint("10.0.0.3", 53, None),
                        endpoint("10.0.0.7", 53, Some("node-a")),
                    ],
                },
            ]
        );
    }

    #[test]
    fn services_without_selector_use_endpoint_objects() {
        let objects = cluster_objects(&format!(
            "{}{}",
            service("name: db", "clusterIP: 10.96.0.5, ports: [{port: 5432}]"),
            "apiVersion: v1
kind: Endpoints
metadata: {name: db}
subsets: [{addresses: [{ip: 192.168.1.10}], ports: [{port: 5432}]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{port: 5432}]
endpoints: [{addresses: [192.168.1.10]}, {addresses: [192.168.1.11]}]
"
        ));
        let state = control_plane(None).reconcile(&objects).state;
        let endpoints: Vec<_> = state.services[&name("default", "db")].ports[0]
            .endpoints
            .iter()
            .map(|e| (e.address, e.port))
            .collect();
        assert_eq!(
            endpoints,
            [(ip("192.168.1.10"), 5432), (ip("192.168.1.11"), 5432)]
        );
    }

    #[test]
    fn same_name_in_two_namespaces_and_unproxied_services() {
        let objects = cluster_objects(&format!(
            "{}{}{}{}",
            service("name: web, namespace: a", "ports: [{port: 80}]"),
            service("name: web, namespace: b", "ports: [{port: 80}]"),
            service("name: headless", "clusterIP: None, ports: [{port: 80}]"),
            service(
                "name: external",
                "type: ExternalName, externalName: example.com"
            ),
        ));
        let reconciled = control_plane(None).reconcile(&objects);
        assert!(reconciled.problems.is_empty(), "{:?}", reconciled.problems);
        assert_eq!(
            cluster_ips(&reconciled.state),
            [
                ("a/web".to_owned(), ip("10.96.0.2")),
                ("b/web".to_owned(), ip("10.96.0.3"))
            ]
        );
    }

    #[test]
    fn allocations_are_stable_across_control_planes_sharing_a_state_dir() {
        let dir = TempDir::new("controlplane-restart");
        let before = cluster_objects(&format!(
            "{}{}",
            service("name: m", "ports: [{port: 80}]"),
            service("name: z", "ports: [{port: 80}]"),
        ));
        let first = control_plane(Some(dir.path())).reconcile(&before).state;
        assert_eq!(
            cluster_ips(&first),
            [
                ("default/m".to_owned(), ip("10.96.0.2")),
                ("default/z".to_owned(), ip("10.96.0.3"))
            ]
        );

        // After a restart, with a newcomer that sorts first and "m" gone.
        let after = cluster_objects(&format!(
            "{}{}",
            service("name: a", "ports: [{port: 80}]"),
            service("name: z", "ports: [{port: 80}]"),
        ));
        let mut restarted = control_plane(Some(dir.path()));
        let second = restarted.reconcile(&after).state;
        assert_eq!(
            cluster_ips(&second),
            [
                ("default/a".to_owned(), ip("10.96.0.2")),
                ("default/z".to_owned(), ip("10.96.0.3"))
            ]
        );
        // And across reloads of the same instance.
        assert_eq!(restarted.reconcile(&after).state, second);
    }

    #[test]
    fn an_explicit_ip_outside_the_cidr_rejects_only_that_service() {
        let objects = cluster_objects(&format!(
            "{}{}",
            service("name: bad", "clusterIP: 172.16.0.1, ports: [{port: 80}]"),
            service("name: good", "clusterIP: 10.96.0.9, ports: [{port: 80}]"),
        ));
        let reconciled = control_plane(None).reconcile(&objects);
        assert_eq!(
            cluster_ips(&reconciled.state),
            [("default/good".to_owned(), ip("10.96.0.9"))]
        );
        assert_eq!(
            reconciled.problems,
            [
                "test.yaml: document 1 (Service default/bad): spec.clusterIP: 172.16.0.1 is outside the service CIDR 10.96.0.0/12"
            ]
        );
    }

    #[test]
    fn a_cluster_ip_conflict_names_both_services_and_the_holder_wins() {
        let mut control_plane = control_plane(None);
        let holder = service("name: zeta", "clusterIP: 10.96.0.10, ports: [{port: 80}]");
        control_plane.reconcile(&cluster_objects(&holder));

        // "alpha" is older and sorts first, but "zeta" already has the IP.
        let newcomer = service(
            "name: alpha, creationTimestamp: \"2020-01-01T00:00:00Z\"",
            "clusterIP: 10.96.0.10, ports: [{port: 80}]",
        );
        let reconciled = control_plane.reconcile(&cluster_objects(&format!("{newcomer}{holder}")));
        assert_eq!(
            cluster_ips(&reconciled.state),
            [("default/zeta".to_owned(), ip("10.96.0.10"))]
        );
        assert_eq!(
            reconciled.problems,
            [
                "test.yaml: document 1 (Service default/alpha): spec.clusterIP: 10.96.0.10 is already the cluster IP of Service default/zeta"
            ]
        );

        // Without history, the older Service wins.
        let fresh = super::tests::control_plane(None)
            .reconcile(&cluster_objects(&format!("{holder}{newcomer}")));
        assert_eq!(
            cluster_ips(&fresh.state),
            [("default/alpha".to_owned(), ip("10.96.0.10"))]
        );
        assert!(
            fresh.problems[0].contains("(Service default/zeta)"),
            "{:?}",
            fresh.problems
        );
        assert!(
            fresh.problems[0].ends_with("Service default/alpha"),
            "{:?}",
            fresh.problems
        );
    }

    #[test]
    fn an_explicit_ip_moves_an_allocated_service() {
        let mut control_plane = control_plane(None);
        let auto = service("name: auto", "ports: [{port: 80}]");
        let first = control_plane.reconcile(&cluster_objects(&auto)).state;
        assert_eq!(
            first.services[&name("default", "auto")].cluster_ip,
            ip("10.96.0.2")
        );

        let explicit = service(
            "name: explicit",
            "clusterIP: 10.96.0.2, ports: [{port: 80}]",
        );
        let second = control_plane.reconcile(&cluster_objects(&format!("{auto}{explicit}")));
        assert!(second.problems.is_empty(), "{:?}", second.problems);
        assert_eq!(
            cluster_ips(&second.state),
            [
                ("default/auto".to_owned(), ip("10.96.0.3")),
                ("default/explicit".to_owned(), ip("10.96.0.2"))
            ]
        );
    }

    #[test]
    fn an_invalid_update_keeps_the_last_accepted_version() {
        let mut control_plane = control_plane(None);
        let other = service("name: other", "ports: [{port: 81}]");
        let good = service("name: web", "clusterIP: 10.96.0.7, ports: [{port: 80}]");
        let accepted = control_plane
            .reconcile(&cluster_objects(&format!("{good}{other}")))
            .state;

        let broken = service("name: web", "clusterIP: 10.96.0.7, ports: [{port: 0}]");
        let other_changed = service("name: other", "ports: [{port: 82}]");
        let reconciled =
            control_plane.reconcile(&cluster_objects(&format!("{broken}{other_changed}")));
        let web = name("default", "web");
        assert_eq!(reconciled.state.services[&web], accepted.services[&web]);
        assert_eq!(
            reconciled.state.services[&name("default", "other")].ports[0].port,
            82
        );
        assert_eq!(
            reconciled.problems,
            [
                "test.yaml: document 1 (Service default/web): spec.ports[0].port: must be between 1 and 65535",
                "test.yaml: document 1 (Service default/web): serving its last accepted version until the manifest is fixed",
            ]
        );

        // A Service that was never accepted has nothing to fall back to.
        let fresh = super::tests::control_plane(None).reconcile(&cluster_objects(&broken));
        assert!(fresh.state.services.is_empty());

        let fixed = service("name: web", "clusterIP: 10.96.0.7, ports: [{port: 8080}]");
        let reconciled = control_plane.reconcile(&cluster_objects(&fixed));
        assert_eq!(reconciled.state.services[&web].ports[0].port, 8080);
        assert!(reconciled.problems.is_empty());
    }

    #[test]
    fn a_conflicting_update_keeps_the_last_accepted_version() {
        let mut control_plane = control_plane(None);
        let holder = service("name: a", "clusterIP: 10.96.0.10, ports: [{port: 80}]");
        let mover = service("name: b", "clusterIP: 10.96.0.20, ports: [{port: 80}]");
        control_plane.reconcile(&cluster_objects(&format!("{holder}{mover}")));

        let moved = service("name: b", "clusterIP: 10.96.0.10, ports: [{port: 80}]");
        let reconciled = control_plane.reconcile(&cluster_objects(&format!("{holder}{moved}")));
        assert_eq!(
            cluster_ips(&reconciled.state),
            [
                ("default/a".to_owned(), ip("10.96.0.10")),
                ("default/b".to_owned(), ip("10.96.0.20"))
            ]
        );
        assert_eq!(reconciled.problems.len(), 2, "{:?}", reconciled.problems);
        assert!(reconciled.problems[0].contains("is already the cluster IP of Service default/a"));
    }

    #[test]
    fn created_is_the_first_sighting_when_the_manifest_has_no_timestamp() {
        let mut control_plane = control_plane(None);
        let objects = cluster_objects(&service("name: web", "ports: [{port: 80}]"));
        let before = SystemTime::now();
        let first =
            control_plane.reconcile(&objects).state.services[&name("default", "web")].created;
        assert!(first >= before && first <= SystemTime::now());
        std::thread::sleep(Duration::from_millis(5));
        let again =
            control_plane.reconcile(&objects).state.services[&name("default", "web")].created;
        assert_eq!(again, first);

        // Deleted and recreated: a new Service, seen anew.
        control_plane.reconcile(&ClusterObjects::default());
        let recreated =
            control_plane.reconcile(&objects).state.services[&name("default", "web")].created;
        assert!(recreated > first);
    }

    #[test]
    fn a_duplicate_definition_is_reported_and_ignored() {
        let objects = cluster_objects(&format!(
            "{}{}",
            service("name: web", "ports: [{port: 80}]"),
            service("name: web", "ports: [{port: 81}]"),
        ));
        let reconciled = control_plane(None).reconcile(&objects);
        assert_eq!(
            reconciled.state.services[&name("default", "web")].ports[0].port,
            80
        );
        assert_eq!(
            reconciled.problems,
            [
                "test.yaml: document 2 (Service default/web): defined again; only the definition at test.yaml: document 1 is used"
            ]
        );
    }

    #[test]
    fn node_ports_are_allocated_from_the_range_and_kept_across_reloads_and_restarts() {
        let dir = TempDir::new("controlplane-node-ports");
        let before = cluster_objects(&format!(
            "{}{}{}",
            service("name: m", "type: NodePort, ports: [{port: 80}]"),
            service("name: plain", "ports: [{port: 80}]"),
            service("name: z", "type: LoadBalancer, ports: [{port: 80}]"),
        ));
        let first = control_plane(Some(dir.path())).reconcile(&before);
        assert!(first.problems.is_empty(), "{:?}", first.problems);
        assert_eq!(
            node_ports(&first.state),
            [
                node_port("m", 30000),
                ("default/plain:80".to_owned(), None),
                node_port("z", 30001)
            ]
        );

        // After a restart, with a newcomer that sorts first and "m" gone.
        let after = cluster_objects(&format!(
            "{}{}",
            service("name: a", "type: NodePort, ports: [{port: 80}]"),
            service("name: z", "type: LoadBalancer, ports: [{port: 80}]"),
        ));
        let mut restarted = control_plane(Some(dir.path()));
        let second = restarted.reconcile(&after).state;
        assert_eq!(
            node_ports(&second),
            [node_port("a", 30000), node_port("z", 30001)]
        );
        // And across reloads of the same instance.
        assert_eq!(restarted.reconcile(&after).state, second);
        let saved = std::fs::read_to_string(dir.path().join("nodeports.json")).unwrap();
        assert!(!saved.contains("\"m\""), "{saved}");
    }

    #[test]
    fn local_load_balancers_get_a_health_check_node_port_that_no_port_shares() {
        let mut control_plane = control_plane(None);
        let objects = cluster_objects(&format!(
            "{}{}{}",
            service(
                "name: a",
                "type: LoadBalancer, externalTrafficPolicy: Local, ports: [{port: 80}]"
            ),
            service(
                "name: b",
                "type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32000, \
                 ports: [{port: 80, nodePort: 30000}]"
            ),
            service("name: c", "type: LoadBalancer, ports: [{port: 80}]"),
        ));
        let result = control_plane.reconcile(&objects);
        assert!(result.problems.is_empty(), "{:?}", result.problems);
        let check = |name: &str| {
            result.state.services[&ServiceName {
                namespace: "default".into(),
                name: name.into(),
            }]
                .health_check_node_port
        };
        // b's explicit ports are settled first; then the ports of a (30001) and c (30002), and
        // then the health checks.
        assert_eq!(node_ports(&result.state)[0], node_port("a", 30001));
        assert_eq!(check("a"), Some(30003));
        assert_eq!(check("b"), Some(32000));
        assert_eq!(check("c"), None, "policy Cluster has no health check");

        let misplaced = service(
            "name: d",
            "type: NodePort, healthCheckNodePort: 32001, ports: [{port: 80}]",
        );
        let result = control_plane.reconcile(&cluster_objects(&misplaced));
        assert!(
            result.problems.iter().any(|problem| problem
                .contains("spec.healthCheckNodePort: may only be set when type is LoadBalancer")),
            "{:?}",
            result.problems
        );
    }

    #[test]
    fn an_explicit_node_port_moves_an_allocated_one() {
        let mut control_plane = control_plane(None);
        let auto = service("name: auto", "type: NodePort, ports: [{port: 80}]");
        let first = control_plane.reconcile(&cluster_objects(&auto)).state;
        assert_eq!(node_ports(&first), [node_port("auto", 30000)]);

        let explicit = service(
            "name: explicit",
            "type: NodePort, ports: [{port: 80, nodePort: 30000, protocol: UDP}]",
        );
        let second = control_plane.reconcile(&cluster_objects(&format!("{auto}{explicit}")));
        assert!(second.problems.is_empty(), "{:?}", second.problems);
        assert_eq!(
            node_ports(&second.state),
            [node_port("auto", 30001), node_port("explicit", 30000)]
        );
    }

    #[test]
    fn a_node_port_outside_the_range_rejects_only_that_service() {
        let objects = cluster_objects(&format!(
            "{}{}",
            service(
                "name: bad",
                "type: NodePort, ports: [{port: 80, nodePort: 8080}]"
            ),
            service(
                "name: good",
                "type: NodePort, ports: [{port: 80, nodePort: 32767}]"
            ),
        ));
        let reconciled = control_plane(None).reconcile(&objects);
        assert_eq!(node_ports(&reconciled.state), [node_port("good", 32767)]);
        assert_eq!(
            reconciled.problems,
            [
                "test.yaml: document 1 (Service default/bad): spec.ports[0].nodePort: 8080 is outside the node port range 30000-32767"
            ]
        );
    }

    #[test]
    fn a_node_port_clash_names_both_services_and_the_holder_wins() {
        let mut control_plane = control_plane(None);
        let holder = service(
            "name: zeta",
            "type: NodePort, ports: [{port: 80, nodePort: 30080}]",
        );
        control_plane.reconcile(&cluster_objects(&holder));

        // "alpha" is older and sorts first, but "zeta" already has the port; the protocol and
        // the type do not matter.
        let newcomer = service(
            "name: alpha, creationTimestamp: \"2020-01-01T00:00:00Z\"",
            "type: LoadBalancer, ports: [{name: dns, port: 53, protocol: UDP}, {name: web, port: 80, nodePort: 30080}]",
        );
        let reconciled = control_plane.reconcile(&cluster_objects(&format!("{newcomer}{holder}")));
        assert_eq!(node_ports(&reconciled.state), [node_port("zeta", 30080)]);
        assert_eq!(
            reconciled.problems,
            [
                "test.yaml: document 1 (Service default/alpha): spec.ports[1].nodePort: 30080 is already allocated to Service default/zeta"
            ]
        );

        // Without history, the older Service wins.
        let fresh = super::tests::control_plane(None)
            .reconcile(&cluster_objects(&format!("{holder}{newcomer}")));
        assert_eq!(
            node_ports(&fresh.state),
            [
                ("default/alpha:53".to_owned(), Some(30000)),
                node_port("alpha", 30080)
            ]
        );
        assert_eq!(
            fresh.problems,
            [
                "test.yaml: document 1 (Service default/zeta): spec.ports[0].nodePort: 30080 is already allocated to Service default/alpha"
            ]
        );
    }

    #[test]
    fn a_node_port_clash_keeps_the_last_accepted_version() {
        let mut control_plane = control_plane(None);
        let holder = service(
            "name: a",
            "type: NodePort, ports: [{port: 80, nodePort: 30080}]",
        );
        let mover = service(
            "name: b",
            "type: NodePort, ports: [{port: 80, nodePort: 30081}]",
        );
        control_plane.reconcile(&cluster_objects(&format!("{holder}{mover}")));

        let moved = service(
            "name: b",
            "type: NodePort, ports: [{port: 80, nodePort: 30080}]",
        );
        let reconciled = control_plane.reconcile(&cluster_objects(&format!("{holder}{moved}")));
        assert_eq!(
            node_ports(&reconciled.state),
            [node_port("a", 30080), node_port("b", 30081)]
        );
        assert_eq!(
            reconciled.problems,
            [
                "test.yaml: document 2 (Service default/b): spec.ports[0].nodePort: 30080 is already allocated to Service default/a",
                "test.yaml: document 2 (Service default/b): serving its last accepted version until the conflict is resolved",
            ]
        );
    }

    #[test]
    fn node_ports_are_released_on_delete_and_on_change_to_cluster_ip() {
        let dir = TempDir::new("controlplane-node-port-release");
        let mut control_plane = control_plane(Some(dir.path()));
        let saved = || std::fs::read_to_string(dir.path().join("nodeports.json")).unwrap();
        let deleted = service("name: deleted", "type: NodePort, ports: [{port: 80}]");
        let changed = service("name: changed", "type: NodePort, ports: [{port: 80}]");
        let first = control_plane.reconcile(&cluster_objects(&format!("{changed}{deleted}")));
        assert_eq!(
            node_ports(&first.state),
            [node_port("changed", 30000), node_port("deleted", 30001)]
        );
        assert!(saved().contains("\"deleted\""), "{}", saved());

        let cluster_ip = service("name: changed", "ports: [{port: 80}]");
        let newcomers = format!(
            "{}{}",
            service("name: new-1", "type: NodePort, ports: [{port: 80}]"),
            service("name: new-2", "type: NodePort, ports: [{port: 80}]"),
        );
        let second = control_plane.reconcile(&cluster_objects(&format!("{cluster_ip}{newcomers}")));
        assert_eq!(
            node_ports(&second.state),
            [
                ("default/changed:80".to_owned(), None),
                node_port("new-1", 30000),
                node_port("new-2", 30001)
            ]
        );
        assert!(!saved().contains("\"deleted\""), "{}", saved());
        assert!(!saved().contains("\"changed\""), "{}", saved());
    }

    #[test]
    fn a_full_node_port_range_leaves_the_service_out() {
        let range = PortRange {
            first: 30000,
            last: 30001,
        };
        let objects = cluster_objects(&format!(
            "{}{}",
            service(
                "name: a",
                "type: NodePort, ports: [{name: http, port: 80}, {name: https, port: 443}]"
            ),
            service("name: b", "type: NodePort, ports: [{port: 80}]"),
        ));
        let reconciled = control_plane_with_node_ports(None, range).reconcile(&objects);
        assert_eq!(
            reconciled.state.services.keys().collect::<Vec<_>>(),
            [&name("default", "a")]
        );
        assert_eq!(
            reconciled.problems,
            [
                "test.yaml: document 2 (Service default/b): no free nodePort left in the node port range 30000-30001"
            ]
        );
    }

    #[test]
    fn load_balancers_without_node_port_allocation_get_only_explicit_ones() {
        let objects = cluster_objects(&service(
            "name: lb",
            "type: LoadBalancer, allocateLoadBalancerNodePorts: false,
             ports: [{name: http, port: 80}, {name: https, port: 443, nodePort: 30443}]",
        ));
        let reconciled = control_plane(None).reconcile(&objects);
        assert!(reconciled.problems.is_empty(), "{:?}", reconciled.problems);
        assert_eq!(
            node_ports(&reconciled.state),
            [
                ("default/lb:80".to_owned(), None),
                ("default/lb:443".to_owned(), Some(30443))
            ]
        );
    }

    #[test]
    fn external_addresses_and_policy_reach_the_model() {
        let objects = cluster_objects(
            "apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  externalIPs: [192.0.2.10, 2001:db8::10]
  ports: [{port: 80}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.1, ipMode: VIP}, {ip: 203.0.113.2, ipMode: Proxy}]
",
        );
        let reconciled = control_plane(None).reconcile(&objects);
        let lb = &reconciled.state.services[&name("default", "lb")];
        assert_eq!(lb.external_ips, [ip("192.0.2.10")]);
        assert_eq!(lb.load_balancer_ips, [ip("203.0.113.1")]);
        assert_eq!(lb.external_traffic_policy, TrafficPolicy::Local);
        assert_eq!(
            reconciled.problems,
            [
                "test.yaml: document 1 (Service default/lb): spec.externalIPs[1]: 2001:db8::10 is IPv6; this dataplane serves IPv4 only, so it is not served"
            ]
        );
    }
}
