//! A Service as the API server serves it, turned into the model's frontends. The API server has
//! already validated it and assigned its clusterIP and nodePorts, so unlike manifest mode nothing
//! is allocated here: what is left is kube-proxy's choice of what to serve, and the shape checks
//! a hand-edited or future object could still fail.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::SystemTime,
};

use k8s_openapi::api::core::v1 as core;

use crate::model::{Protocol, Service, ServiceName, ServicePort, ServiceType, TrafficPolicy};

/// The label by which a Service asks to be served by one particular proxy (kube-proxy skips every
/// Service that has it; a proxy started with that name serves them).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// What this node does with one Service.
#[derive(Debug, PartialEq)]
pub enum Conversion {
    /// Served: the model's Service, with no endpoints yet (they come from EndpointSlices).
    Served(Service),
    /// Nothing for a proxy to do, and why (for debug logs).
    Skipped(&'static str),
}

/// Converts `service`; `proxy_name` is `--service-proxy-name`. An error names the object and the
/// field, for the log; the caller keeps the Service's last good conversion.
pub fn convert(service: &core::Service, proxy_name: Option<&str>) -> Result<Conversion, String> {
    let name = service_name(service);
    let context = |field: &str, problem: String| format!("Service {name}: {field}: {problem}");
    let labels = service.metadata.labels.as_ref();
    if let Some(wanted) = labels.and_then(|labels| labels.get(SERVICE_PROXY_NAME_LABEL))
        && proxy_name != Some(wanted.as_str())
    {
        return Ok(Conversion::Skipped("served by another proxy"));
    }
    let Some(spec) = &service.spec else {
        return Err(context("spec", "missing".into()));
    };
    let service_type = match spec.type_.as_deref() {
        None | Some("ClusterIP") => ServiceType::ClusterIP,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => return Ok(Conversion::Skipped("ExternalName (DNS only)")),
        Some(other) => return Err(context("spec.type", format!("unknown type {other:?}"))),
    };
    let Some(cluster_ip) =
        cluster_ipv4(spec).map_err(|problem| context("spec.clusterIPs", problem))?
    else {
        return Ok(Conversion::Skipped("headless or IPv6 only"));
    };
    let external_traffic_policy = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => TrafficPolicy::Cluster,
        Some("Local") => TrafficPolicy::Local,
        Some(other) => {
            return Err(context(
                "spec.externalTrafficPolicy",
                format!("unknown policy {other:?}"),
            ));
        }
    };
    let mut ports = Vec::new();
    for (index, port) in spec.ports.iter().flatten().enumerate() {
        let field = |leaf: &str| format!("spec.ports[{index}].{leaf}");
        let protocol = match port.protocol.as_deref() {
            None | Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            // SCTP is valid but not translated by this dataplane.
            Some("SCTP") => continue,
            Some(other) => {
                return Err(context(
                    &field("protocol"),
                    format!("unknown protocol {other:?}"),
                ));
            }
        };
        let number = |value: i32, leaf: &str| {
            u16::try_from(value)
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| context(&field(leaf), format!("{value} is not a port number")))
        };
        let node_port = match (service_type, port.node_port) {
            (ServiceType::NodePort | ServiceType::LoadBalancer, Some(node_port))
                if node_port != 0 =>
            {
                Some(number(node_port, "nodePort")?)
            }
            _ => None,
        };
        ports.push(ServicePort {
            name: port.name.clone().unwrap_or_default(),
            port: number(port.port, "port")?,
            protocol,
            node_port,
            endpoints: Vec::new(),
        });
    }
    let external_ips = ipv4_addresses(
        spec.external_ips.iter().flatten().map(String::as_str),
        |index, problem| context(&format!("spec.externalIPs[{index}]"), problem),
    )?;
    let ingress = service
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|load_balancer| load_balancer.ingress.as_ref());
    // An ingress with ipMode Proxy is a load balancer that proxies itself: traffic reaches the
    // nodes addressed to the node, not to the ingress IP.
    let load_balancer_ips = ipv4_addresses(
        ingress
            .into_iter()
            .flatten()
            .filter(|ingress| ingress.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|ingress| ingress.ip.as_deref()),
        |index, problem| context(&format!("status.loadBalancer.ingress[{index}].ip"), problem),
    )?;
    // The API server allocated it for a LoadBalancer with policy Local; anything else has none.
    let health_check_node_port = match spec.health_check_node_port {
        Some(port) if port != 0 && external_traffic_policy == TrafficPolicy::Local => {
            Some(u16::try_from(port).map_err(|_| {
                context(
                    "spec.healthCheckNodePort",
                    format!("{port} is not a port number"),
                )
            })?)
        }
        _ => None,
    };
    let created = service
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or_else(SystemTime::now, |time| SystemTime::from(time.0));
    Ok(Conversion::Served(Service {
        name,
        service_type,
        cluster_ip,
        external_ips,
        load_balancer_ips,
        external_traffic_policy,
        health_check_node_port,
        ports,
        created,
    }))
}

pub fn service_name(service: &core::Service) -> ServiceName {
    ServiceName {
        namespace: service.metadata.namespace.clone().unwrap_or_default(),
        name: service.metadata.name.clone().unwrap_or_default(),
    }
}

/// The Service's IPv4 cluster IP: `clusterIPs` lists the families in order (a dual-stack Service
/// may be IPv6 first); `clusterIP` is its first entry, read when an old server sends no list.
/// None for a headless Service ("None") and an IPv6-only one.
fn cluster_ipv4(spec: &core::ServiceSpec) -> Result<Option<Ipv4Addr>, String> {
    let listed: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    for ip in listed {
        if ip == "None" || ip.is_empty() {
            return Ok(None);
        }
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => return Ok(Some(ip)),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => return Err(format!("{ip:?} is not an IP address")),
        }
    }
    Ok(None)
}

/// The IPv4 addresses of `addresses`, skipping IPv6 ones (another family's business).
fn ipv4_addresses<'a>(
    addresses: impl Iterator<Item = &'a str>,
    problem: impl Fn(usize, String) -> String,
) -> Result<Vec<Ipv4Addr>, String> {
    let mut ipv4 = Vec::new();
    for (index, address) in addresses.enumerate() {
        match address.parse::<IpAddr>() {
            Ok(IpAddr::V4(address)) => ipv4.push(address),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => return Err(problem(index, format!("{address:?} is not an IP address"))),
        }
    }
    Ok(ipv4)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Service as kube-apiserver serves it (`kubectl get svc -o json`), with `spec` merged in.
    fn service(spec: serde_json::Value) -> core::Service {
        let mut object = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "web",
                "namespace": "prod",
                "uid": "4b3c2f6e-0b7e-4d59-9a55-3c1f0b1f2a10",
                "resourceVersion": "1234",
                "creationTimestamp": "2024-05-01T10:00:00Z",
                "labels": {"app": "web"}
            },
            "spec": {
                "type": "ClusterIP",
                "clusterIP": "10.96.0.10",
                "clusterIPs": ["10.96.0.10"],
                "ipFamilies": ["IPv4"],
                "ipFamilyPolicy": "SingleStack",
                "internalTrafficPolicy": "Cluster",
                "sessionAffinity": "None",
                "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
            },
            "status": {"loadBalancer": {}}
        });
        let spec_object = object["spec"].as_object_mut().unwrap();
        for (key, value) in spec.as_object().unwrap() {
            spec_object.insert(key.clone(), value.clone());
        }
        serde_json::from_value(object).unwrap()
    }

    fn served(conversion: Result<Conversion, String>) -> Service {
        match conversion {
            Ok(Conversion::Served(service)) => service,
            other => panic!("not served: {other:?}"),
        }
    }

    #[test]
    fn a_cluster_ip_service_becomes_its_frontends() {
        let web = served(convert(&service(serde_json::json!({})), None));
        assert_eq!(web.name.to_string(), "prod/web");
        assert_eq!(web.cluster_ip, Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(web.service_type, ServiceType::ClusterIP);
        assert_eq!(web.ports.len(), 1);
        assert_eq!(
            (
                web.ports[0].name.as_str(),
                web.ports[0].port,
                web.ports[0].protocol
            ),
            ("http", 80, Protocol::Tcp)
        );
        assert_eq!(
            web.created,
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_714_557_600)
        );
    }

    #[test]
    fn node_ports_policy_and_external_addresses_come_from_the_api_server() {
        let web = served(convert(
            &service(serde_json::json!({
                "type": "LoadBalancer",
                "externalTrafficPolicy": "Local",
                "externalIPs": ["198.51.100.7", "2001:db8::7"],
                "ports": [
                    {"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080},
                    {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
                    {"name": "sig", "port": 9, "protocol": "SCTP", "nodePort": 30009}
                ]
            })),
            None,
        ));
        assert_eq!(web.external_traffic_policy, TrafficPolicy::Local);
        assert_eq!(web.external_ips, [Ipv4Addr::new(198, 51, 100, 7)]);
        let ports: Vec<(u16, Protocol, Option<u16>)> = web
            .ports
            .iter()
            .map(|port| (port.port, port.protocol, port.node_port))
            .collect();
        assert_eq!(
            ports,
            [
                (80, Protocol::Tcp, Some(30080)),
                (53, Protocol::Udp, Some(30053))
            ]
        );
    }

    #[test]
    fn load_balancer_ingress_in_proxy_mode_is_left_to_the_load_balancer() {
        let mut object = service(serde_json::json!({"type": "LoadBalancer"}));
        object.status = serde_json::from_value(serde_json::json!({"loadBalancer": {"ingress": [
            {"ip": "203.0.113.10", "ipMode": "VIP"},
            {"ip": "203.0.113.11", "ipMode": "Proxy"},
            {"hostname": "lb.example.com"}
        ]}}))
        .unwrap();
        let web = served(convert(&object, None));
        assert_eq!(web.load_balancer_ips, [Ipv4Addr::new(203, 0, 113, 10)]);
    }

    #[test]
    fn headless_external_name_and_other_proxies_services_are_skipped() {
        let headless = service(serde_json::json!({"clusterIP": "None", "clusterIPs": ["None"]}));
        assert_eq!(
            convert(&headless, None),
            Ok(Conversion::Skipped("headless or IPv6 only"))
        );
        let external_name = service(serde_json::json!({
            "type": "ExternalName", "externalName": "db.example.com", "clusterIP": null, "clusterIPs": null
        }));
        assert_eq!(
            convert(&external_name, None),
            Ok(Conversion::Skipped("ExternalName (DNS only)"))
        );
        let ipv6_only =
            service(serde_json::json!({"clusterIP": "fd00::10", "clusterIPs": ["fd00::10"]}));
        assert_eq!(
            convert(&ipv6_only, None),
            Ok(Conversion::Skipped("headless or IPv6 only"))
        );
        let dual_stack = service(
            serde_json::json!({"clusterIP": "fd00::10", "clusterIPs": ["fd00::10", "10.96.0.11"]}),
        );
        assert_eq!(
            served(convert(&dual_stack, None)).cluster_ip,
            Ipv4Addr::new(10, 96, 0, 11)
        );

        let mut other_proxy = service(serde_json::json!({}));
        other_proxy
            .metadata
            .labels
            .get_or_insert_default()
            .insert(SERVICE_PROXY_NAME_LABEL.into(), "other".into());
        assert_eq!(
            convert(&other_proxy, None),
            Ok(Conversion::Skipped("served by another proxy"))
        );
        assert_eq!(
            convert(&other_proxy, Some("this")),
            Ok(Conversion::Skipped("served by another proxy"))
        );
        assert!(matches!(
            convert(&other_proxy, Some("other")),
            Ok(Conversion::Served(_))
        ));
    }

    #[test]
    fn bad_fields_are_named() {
        let bad_ip =
            service(serde_json::json!({"clusterIP": "10.96.0.300", "clusterIPs": ["10.96.0.300"]}));
        assert_eq!(
            convert(&bad_ip, None),
            Err("Service prod/web: spec.clusterIPs: \"10.96.0.300\" is not an IP address".into())
        );
        let bad_port = service(serde_json::json!({"ports": [{"port": 80}, {"port": 70000}]}));
        assert_eq!(
            convert(&bad_port, None),
            Err("Service prod/web: spec.ports[1].port: 70000 is not a port number".into())
        );
        let bad_type = service(serde_json::json!({"type": "Magic"}));
        assert_eq!(
            convert(&bad_type, None),
            Err("Service prod/web: spec.type: unknown type \"Magic\"".into())
        );
    }
}
