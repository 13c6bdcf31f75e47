//! A Service manifest checked the way the API server would check it, turned into the definition
//! the control plane works with. Every message names the field, so a user can fix the manifest
//! without guessing; all problems of a Service are reported at once.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    time::SystemTime,
};

use super::{
    Ipv4Cidr,
    objects::{self, Located, TargetPort},
};
use crate::model::{Protocol, ServiceType};

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
    pub created: Option<SystemTime>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterIpRequest {
    Explicit(Ipv4Addr),
    Allocate,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortDefinition {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: TargetPort,
}

pub enum Validation {
    /// `warnings` are about parts left out (SCTP ports); the rest of the Service works.
    Proxied {
        definition: ServiceDefinition,
        warnings: Vec<String>,
    },
    /// ExternalName and headless Services: DNS serves them, a proxy has nothing to do.
    NotProxied(&'static str),
    Invalid(Vec<String>),
}

pub fn validate(service: &Located<objects::Service>, service_cidr: &Ipv4Cidr) -> Validation {
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
    let ports = port_definitions(&spec.ports, &mut report);
    match cluster_ip {
        Some(cluster_ip) if report.errors.is_empty() => Validation::Proxied {
            definition: ServiceDefinition {
                service_type,
                cluster_ip,
                selector: (!spec.selector.is_empty()).then(|| spec.selector.clone()),
                publish_not_ready_addresses: spec.publish_not_ready_addresses,
                ports,
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

fn port_definitions(ports: &[objects::ServicePort], report: &mut Report) -> Vec<PortDefinition> {
    if ports.is_empty() {
        report.error(
            "spec.ports",
            "a Service with a cluster IP needs at least one port",
        );
    }
    let mut definitions = Vec::new();
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut numbers: HashMap<(u16, objects::Protocol), usize> = HashMap::new();
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
            name: port.name.clone(),
            port: port.port,
            protocol,
            target_port,
        });
    }
    definitions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controlplane::test_support::located;

    fn cidr() -> Ipv4Cidr {
        "10.96.0.0/12".parse().unwrap()
    }

    fn definition(yaml: &str) -> ServiceDefinition {
        match validate(&located(yaml), &cidr()) {
            Validation::Proxied { definition, .. } => definition,
            Validation::NotProxied(why) => panic!("not proxied: {why}"),
            Validation::Invalid(problems) => panic!("invalid: {problems:?}"),
        }
    }

    fn problems(yaml: &str) -> Vec<String> {
        match validate(&located(yaml), &cidr()) {
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
                name: String::new(),
                port: 80,
                protocol: Protocol::Tcp,
                target_port: TargetPort::Number(80),
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
                matches!(validate(&located(yaml), &cidr()), Validation::NotProxied(_)),
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
        } = validate(&service, &cidr())
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
}
