//! A Service manifest checked the way the API server would check it, turned into the definition
//! the control plane works with. Every message names the field, so a user can fix the manifest
//! without guessing; all problems of a Service are reported at once.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
    time::SystemTime,
};

use super::{
    Ipv4Cidr, PortRange,
    objects::{self, Located, TargetPort},
};
use crate::model::{Protocol, ServiceType, TrafficPolicy};

/// A Service that passed validation and needs proxying.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceDefinition {
    pub service_type: ServiceType,
    pub cluster_ip: ClusterIpRequest,
    /// None: the Service has no selector and takes its endpoints from Endpoints and
    /// EndpointSlice objects that someone else maintains.
    pub selector: Option<BTreeMap<String, String>>,
    pub publish_not_ready_addresses: bool,
    pub ports: Vec<PortDefinition>,
    /// Whether ports without an explicit nodePort get one: always for NodePort Services, for
    /// LoadBalancers unless `allocateLoadBalancerNodePorts` is false.
    pub allocate_node_ports: bool,
    /// The IPv4 entries of `spec.externalIPs`, in order, without duplicates.
    pub external_ips: Vec<Ipv4Addr>,
    /// The `status.loadBalancer.ingress` IPs the node must translate, in order, without
    /// duplicates.
    pub load_balancer_ips: Vec<Ipv4Addr>,
    pub external_traffic_policy: TrafficPolicy,
    /// LoadBalancer with policy Local: the node serves a health check on a nodePort, this one if
    /// the manifest asks for it (`spec.healthCheckNodePort`), else an allocated one.
    pub health_check: Option<HealthCheckRequest>,
    pub created: Option<SystemTime>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheckRequest {
    pub explicit: Option<u16>,
}

impl ServiceDefinition {
    /// The nodePorts the manifest asks for, each once (a TCP and a UDP port may share one).
    pub fn explicit_node_ports(&self) -> BTreeSet<u16> {
        self.ports
            .iter()
            .filter_map(|port| port.node_port)
            .chain(self.health_check.and_then(|check| check.explicit))
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterIpRequest {
    Explicit(Ipv4Addr),
    Allocate,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortDefinition {
    /// Its position in `spec.ports`, for messages: SCTP ports are left out of the definition, so
    /// it may differ from the position in `ServiceDefinition::ports`.
    pub index: usize,
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: TargetPort,
    /// The nodePort the manifest asks for (0 in a manifest means none, as in the API).
    pub node_port: Option<u16>,
}

pub enum Validation {
    /// `warnings` are about parts left out (SCTP ports, IPv6 external IPs, unreadable
    /// load-balancer IPs); the rest of the Service works.
    Proxied {
        definition: ServiceDefinition,
        warnings: Vec<String>,
    },
    /// ExternalName and headless Services: DNS serves them, a proxy has nothing to do.
    NotProxied(&'static str),
    Invalid(Vec<String>),
}

pub fn validate(
    service: &Located<objects::Service>,
    service_cidr: &Ipv4Cidr,
    node_port_range: PortRange,
) -> Validation {
    let spec = &service.object.spec;
    let service_type = match spec.service_type {
        objects::ServiceType::ExternalName => return Validation::NotProxied("ExternalName"),
        objects::ServiceType::ClusterIP => ServiceType::ClusterIP,
        objects::ServiceType::NodePort => ServiceType::NodePort,
        objects::ServiceType::LoadBalancer => ServiceType::LoadBalancer,
    };
    let mut report = Report {
        context: service.context(),
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    if service.object.metadata.name.is_empty() {
        report.error("metadata.name", "must not be empty");
    }
    let cluster_ip = match requested_cluster_ip(spec, service_cidr, &mut report) {
        Some(RequestedClusterIp::Headless) => return Validation::NotProxied("headless"),
        Some(RequestedClusterIp::Proxied(request)) => Some(request),
        None => None,
    };
    let ports = port_definitions(&spec.ports, service_type, node_port_range, &mut report);
    let allocate_node_ports = allocates_node_ports(spec, service_type, &mut report);
    let external_ips = external_ips(&spec.external_ips, &mut report);
    let external_traffic_policy = external_traffic_policy(spec, service_type, &mut report);
    let health_check = health_check(
        spec,
        service_type,
        external_traffic_policy,
        node_port_range,
        &mut report,
    );
    // A Service whose type changed from LoadBalancer may still carry the old status.
    let load_balancer_ips = if service_type == ServiceType::LoadBalancer {
        load_balancer_ips(&service.object.status.load_balancer, &mut report)
    } else {
        Vec::new()
    };
    match cluster_ip {
        Some(cluster_ip) if report.errors.is_empty() => Validation::Proxied {
            definition: ServiceDefinition {
                service_type,
                cluster_ip,
                selector: (!spec.selector.is_empty()).then(|| spec.selector.clone()),
                publish_not_ready_addresses: spec.publish_not_ready_addresses,
                ports,
                allocate_node_ports,
                external_ips,
                load_balancer_ips,
                external_traffic_policy,
                health_check,
                created: service.object.metadata.creation_timestamp,
            },
            warnings: report.warnings,
        },
        _ => Validation::Invalid(report.errors.into_iter().chain(report.warnings).collect()),
    }
}

struct Report {
    context: String,
    errors: Vec<String>,
    warnings: Vec<String>,
}

impl Report {
    fn error(&mut self, field: &str, reason: impl std::fmt::Display) {
        self.errors
            .push(format!("{}: {field}: {reason}", self.context));
    }

    fn warning(&mut self, field: &str, reason: impl std::fmt::Display) {
        self.warnings
            .push(format!("{}: {field}: {reason}", self.context));
    }
}

enum RequestedClusterIp {
    Headless,
    Proxied(ClusterIpRequest),
}

/// None when the fields are invalid (reported).
fn requested_cluster_ip(
    spec: &objects::ServiceSpec,
    service_cidr: &Ipv4Cidr,
    report: &mut Report,
) -> Option<RequestedClusterIp> {
    let single = spec.cluster_ip.as_deref().unwrap_or_default();
    if single == "None" || spec.cluster_ips.first().is_some_and(|ip| ip == "None") {
        return Some(RequestedClusterIp::Headless);
    }
    if let Some(first) = spec.cluster_ips.first()
        && !single.is_empty()
        && first != single
    {
        report.error(
            "spec.clusterIPs[0]",
            format!("{first:?} must equal spec.clusterIP ({single:?})"),
        );
        return None;
    }
    // Dual-stack Services list one IP per family; the IPv4 one is this dataplane's.
    let requested: Vec<(String, &str)> = if !spec.cluster_ips.is_empty() {
        spec.cluster_ips
            .iter()
            .enumerate()
            .map(|(index, ip)| (format!("spec.clusterIPs[{index}]"), ip.as_str()))
            .collect()
    } else if !single.is_empty() {
        vec![("spec.clusterIP".to_owned(), single)]
    } else {
        return Some(RequestedClusterIp::Proxied(ClusterIpRequest::Allocate));
    };
    let mut ipv4 = None;
    for (field, text) in &requested {
        match text.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => {
                ipv4.get_or_insert((field, ip));
            }
            Ok(IpAddr::V6(_)) => {}
            Err(_) => {
                report.error(field, format!("{text:?} is not an IP address"));
                return None;
            }
        }
    }
    let Some((field, ip)) = ipv4 else {
        report.error(
            &requested[0].0,
            "no IPv4 address; this dataplane serves IPv4 Services only",
        );
        return None;
    };
    if !service_cidr.contains(ip) {
        report.error(
            field,
            format!("{ip} is outside the service CIDR {service_cidr}"),
        );
        return None;
    }
    if !service_cidr.is_assignable(ip) {
        report.error(
            field,
            format!("{ip} is the network or broadcast address of the service CIDR {service_cidr}"),
        );
        return None;
    }
    Some(RequestedClusterIp::Proxied(ClusterIpRequest::Explicit(ip)))
}

fn port_definitions(
    ports: &[objects::ServicePort],
    service_type: ServiceType,
    node_port_range: PortRange,
    report: &mut Report,
) -> Vec<PortDefinition> {
    if ports.is_empty() {
        report.error(
            "spec.ports",
            "a Service with a cluster IP needs at least one port",
        );
    }
    let mut definitions = Vec::new();
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut numbers: HashMap<(u16, objects::Protocol), usize> = HashMap::new();
    let mut node_ports: HashMap<(u16, objects::Protocol), usize> = HashMap::new();
    for (index, port) in ports.iter().enumerate() {
        let field = format!("spec.ports[{index}]");
        if port.name.is_empty() && ports.len() > 1 {
            report.error(
                &format!("{field}.name"),
                "required when a Service has more than one port",
            );
        }
        if let Some(first) = names.get(port.name.as_str())
            && !port.name.is_empty()
        {
            report.error(
                &format!("{field}.name"),
                format!("{:?} is already the name of spec.ports[{first}]", port.name),
            );
        }
        names.entry(&port.name).or_insert(index);
        if let Some(first) = numbers.get(&(port.port, port.protocol)) {
            report.error(
                &format!("{field}.port"),
                format!(
                    "{} is already spec.ports[{first}] with the same protocol",
                    port.port
                ),
            );
        }
        numbers.entry((port.port, port.protocol)).or_insert(index);
        if port.port == 0 {
            report.error(&format!("{field}.port"), "must be between 1 and 65535");
        }
        let node_port = port.node_port.filter(|&node_port| node_port != 0);
        if let Some(node_port) = node_port {
            let node_port_field = format!("{field}.nodePort");
            if service_type == ServiceType::ClusterIP {
                report.error(
                    &node_port_field,
                    "may not be used when `type` is 'ClusterIP'",
                );
            } else if !node_port_range.contains(node_port) {
                report.error(
                    &node_port_field,
                    format!("{node_port} is outside the node port range {node_port_range}"),
                );
            }
            // One nodePort may serve a TCP and a UDP port, as it may serve TCP and UDP
            // Services, but not two ports of the same protocol.
            if let Some(first) = node_ports.get(&(node_port, port.protocol)) {
                report.error(
                    &node_port_field,
                    format!(
                        "{node_port} is already spec.ports[{first}].nodePort with the same protocol"
                    ),
                );
            }
            node_ports
                .entry((node_port, port.protocol))
                .or_insert(index);
        }
        let target_port = match &port.target_port {
            None => TargetPort::Number(port.port),
            Some(TargetPort::Number(0)) => {
                report.error(
                    &format!("{field}.targetPort"),
                    "must be between 1 and 65535",
                );
                continue;
            }
            Some(TargetPort::Name(name)) if name.is_empty() => {
                report.error(
                    &format!("{field}.targetPort"),
                    "must be a port number or the name of a container port",
                );
                continue;
            }
            Some(TargetPort::Name(name)) if name.bytes().all(|b| b.is_ascii_digit()) => {
                report.error(
                    &format!("{field}.targetPort"),
                    format!("{name:?} is a quoted number; write the port without quotes"),
                );
                continue;
            }
            Some(target_port) => target_port.clone(),
        };
        let Some(protocol) = port.protocol.supported() else {
            report.warning(
                &format!("{field}.protocol"),
                format!(
                    "SCTP is not supported by this dataplane; port {} is not served",
                    port.port
                ),
            );
            continue;
        };
        definitions.push(PortDefinition {
            index,
            name: port.name.clone(),
            port: port.port,
            protocol,
            target_port,
            node_port,
        });
    }
    definitions
}

fn allocates_node_ports(
    spec: &objects::ServiceSpec,
    service_type: ServiceType,
    report: &mut Report,
) -> bool {
    if service_type != ServiceType::LoadBalancer && spec.allocate_load_balancer_node_ports.is_some()
    {
        report.error(
            "spec.allocateLoadBalancerNodePorts",
            "may only be used when `type` is 'LoadBalancer'",
        );
    }
    match service_type {
        ServiceType::ClusterIP => false,
        ServiceType::NodePort => true,
        ServiceType::LoadBalancer => spec.allocate_load_balancer_node_ports.unwrap_or(true),
    }
}

fn external_ips(texts: &[String], report: &mut Report) -> Vec<Ipv4Addr> {
    let mut ips = Vec::new();
    for (index, text) in texts.iter().enumerate() {
        let field = format!("spec.externalIPs[{index}]");
        let ip = match text.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => {
                report.error(&field, format!("{text:?} is not an IP address"));
                continue;
            }
        };
        if let Some(reason) = reserved_address(ip) {
            report.error(&field, format!("{ip} {reason}"));
            continue;
        }
        match ip {
            IpAddr::V4(ip) => {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
            IpAddr::V6(ip) => report.warning(
                &field,
                format!("{ip} is IPv6; this dataplane serves IPv4 only, so it is not served"),
            ),
        }
    }
    ips
}

/// Why the API server refuses `ip` as an external IP, if it does: no packet arriving from outside
/// the node can be for these addresses.
fn reserved_address(ip: IpAddr) -> Option<&'static str> {
    let (unspecified, loopback, link_local, link_local_multicast) = match ip {
        IpAddr::V4(ip) => (
            ip.is_unspecified(),
            ip.is_loopback(),
            ip.is_link_local(),
            ip.octets()[..3] == [224, 0, 0],
        ),
        IpAddr::V6(ip) => (
            ip.is_unspecified(),
            ip.is_loopback(),
            ip.is_unicast_link_local(),
            ip.segments()[0] & 0xff0f == 0xff02,
        ),
    };
    if unspecified {
        Some("may not be unspecified")
    } else if loopback {
        Some("may not be in the loopback range (127.0.0.0/8, ::1/128)")
    } else if link_local {
        Some("may not be in the link-local range (169.254.0.0/16, fe80::/10)")
    } else if link_local_multicast {
        Some("may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)")
    } else {
        None
    }
}

fn external_traffic_policy(
    spec: &objects::ServiceSpec,
    service_type: ServiceType,
    report: &mut Report,
) -> TrafficPolicy {
    match spec.external_traffic_policy {
        None | Some(objects::ExternalTrafficPolicy::Cluster) => TrafficPolicy::Cluster,
        Some(objects::ExternalTrafficPolicy::Local) => {
            // Local decides which endpoints serve traffic from outside the cluster; a Service
            // that cannot be reached from outside has none.
            let externally_accessible =
                service_type != ServiceType::ClusterIP || !spec.external_ips.is_empty();
            if !externally_accessible {
                report.error(
                    "spec.externalTrafficPolicy",
                    "Local may only be set for externally-accessible services (type NodePort or \
                     LoadBalancer, or with spec.externalIPs)",
                );
            }
            TrafficPolicy::Local
        }
    }
}

/// `spec.healthCheckNodePort`, as the API server checks it: only a LoadBalancer with policy
/// Local has one (allocated when not given), and it must be in the node port range.
fn health_check(
    spec: &objects::ServiceSpec,
    service_type: ServiceType,
    policy: TrafficPolicy,
    node_port_range: PortRange,
    report: &mut Report,
) -> Option<HealthCheckRequest> {
    let explicit = spec.health_check_node_port.filter(|&port| port != 0);
    let wanted = service_type == ServiceType::LoadBalancer && policy == TrafficPolicy::Local;
    if !wanted {
        if explicit.is_some() {
            report.error(
                "spec.healthCheckNodePort",
                "may only be set when type is LoadBalancer and externalTrafficPolicy is Local",
            );
        }
        return None;
    }
    if let Some(port) = explicit
        && !node_port_range.contains(port)
    {
        report.error(
            "spec.healthCheckNodePort",
            format!("{port} is outside the node port range {node_port_range}"),
        );
    }
    Some(HealthCheckRequest { explicit })
}

/// The addresses of `status.loadBalancer.ingress` that the node must translate. The status is
/// written by the load balancer's controller, not by the user: an unreadable entry is reported
/// and skipped rather than rejecting the Service.
fn load_balancer_ips(status: &objects::LoadBalancerStatus, report: &mut Report) -> Vec<Ipv4Addr> {
    let mut ips = Vec::new();
    for (index, ingress) in status.ingress.iter().enumerate() {
        // With ipMode Proxy the load balancer delivers to the node's own address, so the IP never
        // reaches the node and kube-proxy does not program it either.
        if ingress.ip_mode == Some(objects::LoadBalancerIpMode::Proxy) {
            continue;
        }
        let Some(text) = ingress.ip.as_deref().filter(|text| !text.is_empty()) else {
            continue;
        };
        match text.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
            // A dual-stack load balancer lists an address per family; the IPv4 one is served.
            Ok(IpAddr::V6(_)) => {}
            Err(_) => report.warning(
                &format!("status.loadBalancer.ingress[{index}].ip"),
                format!("{text:?} is not an IP address; it is not served"),
            ),
        }
    }
    ips
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controlplane::{DEFAULT_NODE_PORT_RANGE, test_support::located};

    fn cidr() -> Ipv4Cidr {
        "10.96.0.0/12".parse().unwrap()
    }

    fn definition(yaml: &str) -> ServiceDefinition {
        proxied(yaml).0
    }

    /// The definition of a valid Service, with its warnings.
    fn proxied(yaml: &str) -> (ServiceDefinition, Vec<String>) {
        match validate(&located(yaml), &cidr(), DEFAULT_NODE_PORT_RANGE) {
            Validation::Proxied {
                definition,
                warnings,
            } => (definition, warnings),
            Validation::NotProxied(why) => panic!("not proxied: {why}"),
            Validation::Invalid(problems) => panic!("invalid: {problems:?}"),
        }
    }

    fn problems(yaml: &str) -> Vec<String> {
        match validate(&located(yaml), &cidr(), DEFAULT_NODE_PORT_RANGE) {
            Validation::Invalid(problems) => problems,
            Validation::Proxied { warnings, .. } => warnings,
            Validation::NotProxied(why) => panic!("not proxied: {why}"),
        }
    }

    #[test]
    fn defaults_target_port_protocol_and_type() {
        let definition = definition(
            "metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80}]}",
        );
        assert_eq!(definition.service_type, ServiceType::ClusterIP);
        assert_eq!(definition.cluster_ip, ClusterIpRequest::Allocate);
        assert_eq!(
            definition.ports,
            [PortDefinition {
                index: 0,
                name: String::new(),
                port: 80,
                protocol: Protocol::Tcp,
                target_port: TargetPort::Number(80),
                node_port: None,
            }]
        );
        assert_eq!(
            definition.selector,
            Some(BTreeMap::from([("app".into(), "web".into())]))
        );
    }

    #[test]
    fn an_empty_selector_means_no_selector() {
        let definition =
            definition("metadata: {name: ext}\nspec: {selector: {}, ports: [{port: 80}]}");
        assert_eq!(definition.selector, None);
    }

    #[test]
    fn picks_the_ipv4_cluster_ip_of_a_dual_stack_service() {
        let definition = definition(
            "metadata: {name: web}
spec:
  type: NodePort
  clusterIP: fd00::10
  clusterIPs: [fd00::10, 10.96.0.10]
  ports: [{port: 80, targetPort: http}]",
        );
        assert_eq!(definition.service_type, ServiceType::NodePort);
        assert_eq!(
            definition.cluster_ip,
            ClusterIpRequest::Explicit(Ipv4Addr::new(10, 96, 0, 10))
        );
        assert_eq!(
            definition.ports[0].target_port,
            TargetPort::Name("http".into())
        );
    }

    #[test]
    fn headless_and_external_name_services_are_not_proxied() {
        for yaml in [
            "metadata: {name: h}\nspec: {clusterIP: None, ports: [{port: 80}]}",
            "metadata: {name: h}\nspec: {clusterIPs: [None]}",
            "metadata: {name: e}\nspec: {type: ExternalName}",
        ] {
            assert!(
                matches!(
                    validate(&located(yaml), &cidr(), DEFAULT_NODE_PORT_RANGE),
                    Validation::NotProxied(_)
                ),
                "{yaml}"
            );
        }
    }

    #[test]
    fn rejects_a_cluster_ip_outside_the_cidr() {
        let problems = problems(
            "metadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.0.0.5, ports: [{port: 80}]}",
        );
        assert_eq!(
            problems,
            [
                "test.yaml: document 1 (Service shop/web): spec.clusterIP: 10.0.0.5 is outside the service CIDR 10.96.0.0/12"
            ]
        );
    }

    #[test]
    fn rejects_malformed_and_ipv6_only_cluster_ips() {
        let malformed =
            problems("metadata: {name: a}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}");
        assert!(
            malformed[0].contains("spec.clusterIP: \"10.96.0.300\" is not an IP address"),
            "{malformed:?}"
        );
        let ipv6_only =
            problems("metadata: {name: a}\nspec: {clusterIP: fd00::1, ports: [{port: 80}]}");
        assert!(
            ipv6_only[0].contains("spec.clusterIP: no IPv4 address"),
            "{ipv6_only:?}"
        );
        let mismatched = problems(
            "metadata: {name: a}\nspec: {clusterIP: 10.96.0.9, clusterIPs: [10.96.0.8], ports: [{port: 80}]}",
        );
        assert!(
            mismatched[0].contains("spec.clusterIPs[0]"),
            "{mismatched:?}"
        );
    }

    #[test]
    fn reports_every_port_problem_by_field() {
        let problems = problems(
            "metadata: {name: web}
spec:
  ports:
  - {name: http, port: 0}
  - {name: http, port: 81, targetPort: \"8080\"}
  - {port: 82, targetPort: 0}
  - {name: dns, port: 81, protocol: TCP}",
        );
        let expected = [
            "spec.ports[0].port: must be between 1 and 65535",
            "spec.ports[1].name: \"http\" is already the name of spec.ports[0]",
            "spec.ports[1].targetPort: \"8080\" is a quoted number",
            "spec.ports[2].name: required when a Service has more than one port",
            "spec.ports[2].targetPort: must be between 1 and 65535",
            "spec.ports[3].port: 81 is already spec.ports[1] with the same protocol",
        ];
        assert_eq!(problems.len(), expected.len(), "{problems:#?}");
        for (problem, expected) in problems.iter().zip(expected) {
            assert!(problem.contains(expected), "{problem:?} lacks {expected:?}");
        }
    }

    #[test]
    fn sctp_ports_are_left_out_with_a_warning() {
        let service = located(
            "metadata: {name: web}
spec: {ports: [{name: a, port: 80}, {name: b, port: 9, protocol: SCTP}]}",
        );
        let Validation::Proxied {
            definition,
            warnings,
        } = validate(&service, &cidr(), DEFAULT_NODE_PORT_RANGE)
        else {
            panic!("an SCTP port must not reject the whole Service");
        };
        assert_eq!(definition.ports.len(), 1);
        assert_eq!(definition.ports[0].name, "a");
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("spec.ports[1].protocol: SCTP is not supported"),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_service_needs_ports() {
        let problems = problems("metadata: {name: web}\nspec: {selector: {app: web}}");
        assert!(
            problems[0]
                .ends_with("spec.ports: a Service with a cluster IP needs at least one port")
        );
    }

    #[test]
    fn node_ports_are_checked_per_port() {
        assert_eq!(
            problems(
                "metadata: {name: web}
spec:
  ports: [{port: 80, nodePort: 30080}]"
            ),
            [
                "test.yaml: document 1 (Service default/web): spec.ports[0].nodePort: may not be used when `type` is 'ClusterIP'"
            ]
        );
        assert_eq!(
            problems(
                "metadata: {name: web}
spec:
  type: NodePort
  ports:
  - {name: a, port: 80, nodePort: 80}
  - {name: b, port: 81, nodePort: 30081}
  - {name: c, port: 82, nodePort: 30081}"
            ),
            [
                "test.yaml: document 1 (Service default/web): spec.ports[0].nodePort: 80 is outside the node port range 30000-32767",
                "test.yaml: document 1 (Service default/web): spec.ports[2].nodePort: 30081 is already spec.ports[1].nodePort with the same protocol",
            ]
        );
        // TCP and UDP may share a nodePort; 0 means none, as in the API.
        let definition = definition(
            "metadata: {name: dns}
spec:
  type: NodePort
  ports:
  - {name: tcp, port: 53, nodePort: 30053}
  - {name: udp, port: 53, protocol: UDP, nodePort: 30053}
  - {name: metrics, port: 9153, nodePort: 0}",
        );
        let node_ports: Vec<_> = definition.ports.iter().map(|p| p.node_port).collect();
        assert_eq!(node_ports, [Some(30053), Some(30053), None]);
        assert_eq!(definition.explicit_node_ports(), BTreeSet::from([30053]));
        assert!(definition.allocate_node_ports);
    }

    #[test]
    fn load_balancers_allocate_node_ports_unless_told_not_to() {
        let allocates = |spec: &str| {
            definition(&format!("metadata: {{name: lb}}\nspec: {{{spec}}}")).allocate_node_ports
        };
        assert!(allocates("type: LoadBalancer, ports: [{port: 80}]"));
        assert!(allocates(
            "type: LoadBalancer, allocateLoadBalancerNodePorts: true, ports: [{port: 80}]"
        ));
        assert!(!allocates(
            "type: LoadBalancer, allocateLoadBalancerNodePorts: false, ports: [{port: 80}]"
        ));
        assert!(!allocates("ports: [{port: 80}]"));
        assert_eq!(
            problems(
                "metadata: {name: web}
spec: {type: NodePort, allocateLoadBalancerNodePorts: false, ports: [{port: 80}]}"
            ),
            [
                "test.yaml: document 1 (Service default/web): spec.allocateLoadBalancerNodePorts: may only be used when `type` is 'LoadBalancer'"
            ]
        );
    }

    #[test]
    fn external_ips_keep_ipv4_skip_ipv6_and_reject_the_rest() {
        let (definition, warnings) = proxied(
            "metadata: {name: web}
spec:
  externalIPs: [192.0.2.10, 2001:db8::10, 192.0.2.11, 192.0.2.10]
  ports: [{port: 80}]",
        );
        assert_eq!(
            definition.external_ips,
            [Ipv4Addr::new(192, 0, 2, 10), Ipv4Addr::new(192, 0, 2, 11)]
        );
        assert_eq!(
            warnings,
            [
                "test.yaml: document 1 (Service default/web): spec.externalIPs[1]: 2001:db8::10 is IPv6; this dataplane serves IPv4 only, so it is not served"
            ]
        );
        assert_eq!(
            problems(
                "metadata: {name: web}
spec:
  externalIPs: [192.0.2.300, 127.0.0.1, 0.0.0.0, 169.254.1.1, 224.0.0.5, \"::1\"]
  ports: [{port: 80}]"
            ),
            [
                "test.yaml: document 1 (Service default/web): spec.externalIPs[0]: \"192.0.2.300\" is not an IP address",
                "test.yaml: document 1 (Service default/web): spec.externalIPs[1]: 127.0.0.1 may not be in the loopback range (127.0.0.0/8, ::1/128)",
                "test.yaml: document 1 (Service default/web): spec.externalIPs[2]: 0.0.0.0 may not be unspecified",
                "test.yaml: document 1 (Service default/web): spec.externalIPs[3]: 169.254.1.1 may not be in the link-local range (169.254.0.0/16, fe80::/10)",
                "test.yaml: document 1 (Service default/web): spec.externalIPs[4]: 224.0.0.5 may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)",
                "test.yaml: document 1 (Service default/web): spec.externalIPs[5]: ::1 may not be in the loopback range (127.0.0.0/8, ::1/128)",
            ]
        );
    }

    #[test]
    fn local_traffic_policy_needs_an_externally_accessible_service() {
        assert_eq!(
            problems(
                "metadata: {name: web}
spec: {externalTrafficPolicy: Local, ports: [{port: 80}]}"
            ),
            [
                "test.yaml: document 1 (Service default/web): spec.externalTrafficPolicy: Local may only be set for externally-accessible services (type NodePort or LoadBalancer, or with spec.externalIPs)"
            ]
        );
        let policy = |spec: &str| {
            definition(&format!(
                "metadata: {{name: web}}\nspec: {{{spec}, ports: [{{port: 80}}]}}"
            ))
            .external_traffic_policy
        };
        assert_eq!(
            policy("externalTrafficPolicy: Local, externalIPs: [192.0.2.10]"),
            TrafficPolicy::Local
        );
        assert_eq!(
            policy("type: NodePort, externalTrafficPolicy: Local"),
            TrafficPolicy::Local
        );
        assert_eq!(
            policy("type: LoadBalancer, externalTrafficPolicy: Local"),
            TrafficPolicy::Local
        );
        assert_eq!(policy("type: NodePort"), TrafficPolicy::Cluster);
        // The spelling older API versions used.
        assert_eq!(
            policy("type: NodePort, externalTrafficPolicy: Global"),
            TrafficPolicy::Cluster
        );
    }

    #[test]
    fn load_balancer_ips_come_from_vip_ingress_of_load_balancers() {
        let status = "status:
  loadBalancer:
    ingress:
    - {ip: 203.0.113.1}
    - {ip: 203.0.113.2, ipMode: VIP}
    - {ip: 203.0.113.3, ipMode: Proxy}
    - {hostname: lb.example.com}
    - {ip: 2001:db8::1}
    - {ip: not-an-ip}";
        let (definition, warnings) = proxied(&format!(
            "metadata: {{name: lb}}\nspec: {{type: LoadBalancer, ports: [{{port: 80}}]}}\n{status}"
        ));
        assert_eq!(
            definition.load_balancer_ips,
            [Ipv4Addr::new(203, 0, 113, 1), Ipv4Addr::new(203, 0, 113, 2)]
        );
        assert_eq!(
            warnings,
            [
                "test.yaml: document 1 (Service default/lb): status.loadBalancer.ingress[5].ip: \"not-an-ip\" is not an IP address; it is not served"
            ]
        );
        // The stale status of a Service that is no longer a LoadBalancer.
        let (definition, warnings) = proxied(&format!(
            "metadata: {{name: lb}}\nspec: {{type: NodePort, ports: [{{port: 80}}]}}\n{status}"
        ));
        assert!(definition.load_balancer_ips.is_empty());
        assert!(warnings.is_empty(), "{warnings:?}");
    }
}
