//! Endpoints of Services without a selector: the Endpoints and EndpointSlice objects that whoever
//! manages such a Service writes (an external controller, or the manifests themselves).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
};

use super::{
    endpoint_set::EndpointSet,
    objects::{AddressType, EndpointPort, EndpointSlice, Endpoints, KubernetesObject, Located},
};
use crate::model::{Endpoint, Protocol, ServiceName};

/// Every usable address of Endpoints objects and IPv4 EndpointSlices, by the Service they serve.
pub struct EndpointObjectIndex {
    by_service: HashMap<ServiceName, Vec<EndpointGroup>>,
}

/// Addresses that all serve the same ports: an Endpoints subset or an EndpointSlice.
struct EndpointGroup {
    ports: Vec<GroupPort>,
    members: Vec<GroupMember>,
}

struct GroupPort {
    name: String,
    port: u16,
    protocol: Protocol,
}

struct GroupMember {
    address: Ipv4Addr,
    ready: bool,
    serving: bool,
    terminating: bool,
    node_name: Option<String>,
}

impl EndpointObjectIndex {
    /// Malformed addresses and ports are left out and reported in `problems`.
    pub fn new<'a>(
        endpoints: &[Located<Endpoints>],
        slices: impl IntoIterator<Item = &'a Located<EndpointSlice>>,
        problems: &mut Vec<String>,
    ) -> Self {
        let mut by_service: HashMap<ServiceName, Vec<EndpointGroup>> = HashMap::new();
        for located in endpoints {
            let metadata = &located.object.metadata;
            let service = ServiceName {
                namespace: metadata.namespace().to_owned(),
                name: metadata.name.clone(),
            };
            for (index, subset) in located.object.subsets.iter().enumerate() {
                let field = format!("subsets[{index}]");
                let mut members = Vec::new();
                // notReadyAddresses are left out: nothing would send them traffic.
                for (index, address) in subset.addresses.iter().enumerate() {
                    let field = format!("{field}.addresses[{index}].ip");
                    match address.ip.parse::<IpAddr>() {
                        Ok(IpAddr::V4(address_v4)) => members.push(GroupMember {
                            address: address_v4,
                            ready: true,
                            serving: true,
                            terminating: false,
                            node_name: address.node_name.clone(),
                        }),
                        // An IPv6 Service's endpoints: not for this dataplane.
                        Ok(IpAddr::V6(_)) => {}
                        Err(_) => problems.push(format!(
                            "{}: {field}: {:?} is not an IP address; the address is left out",
                            located.context(),
                            address.ip
                        )),
                    }
                }
                let ports = group_ports(located, &field, &subset.ports, problems);
                by_service
                    .entry(service.clone())
                    .or_default()
                    .push(EndpointGroup { ports, members });
            }
        }
        for located in slices {
            let slice = &located.object;
            let Some(service_name) = slice.metadata.labels.get(EndpointSlice::SERVICE_NAME_LABEL)
            else {
                tracing::debug!(
                    "{}: no {} label; no Service uses it",
                    located.context(),
                    EndpointSlice::SERVICE_NAME_LABEL
                );
                continue;
            };
            if slice.address_type != AddressType::IPv4 {
                tracing::debug!(
                    "{}: addressType {:?} is not served by this IPv4 dataplane",
                    located.context(),
                    slice.address_type
                );
                continue;
            }
            let mut members = Vec::new();
            for (index, endpoint) in slice.endpoints.iter().enumerate() {
                // The API says addresses are fungible and consumers may use only the first,
                // which is what kube-proxy does.
                let Some(first) = endpoint.addresses.first() else {
                    problems.push(format!(
                        "{}: endpoints[{index}].addresses: must list at least one address",
                        located.context()
                    ));
                    continue;
                };
                let Ok(address) = first.parse::<Ipv4Addr>() else {
                    problems.push(format!(
                        "{}: endpoints[{index}].addresses[0]: {first:?} is not an IPv4 address; \
                         the endpoint is left out",
                        located.context()
                    ));
                    continue;
                };
                // Defaults of an absent condition, as discovery.k8s.io/v1 documents them.
                let conditions = endpoint.conditions;
                let ready = conditions.ready.unwrap_or(true);
                members.push(GroupMember {
                    address,
                    ready,
                    serving: conditions.serving.unwrap_or(ready),
                    terminating: conditions.terminating.unwrap_or(false),
                    node_name: endpoint.node_name.clone(),
                });
            }
            let ports = group_ports(located, "", &slice.ports, problems);
            let service = ServiceName {
                namespace: slice.metadata.namespace().to_owned(),
                name: service_name.clone(),
            };
            by_service
                .entry(service)
                .or_default()
                .push(EndpointGroup { ports, members });
        }
        EndpointObjectIndex { by_service }
    }

    /// The endpoints of one port of `service`, from all its Endpoints subsets and slices,
    /// sorted and without duplicates.
    pub fn endpoints(
        &self,
        service: &ServiceName,
        service_port_count: usize,
        port_name: &str,
        protocol: Protocol,
    ) -> Vec<Endpoint> {
        let mut endpoints = EndpointSet::default();
        for group in self.by_service.get(service).into_iter().flatten() {
            let Some(group_port) = group.ports.iter().find(|group_port| {
                group_port.protocol == protocol
                    && (group_port.name == port_name
                        // A controller that wrote a single-port Service's endpoints may leave
                        // the port unnamed even when the Service names it.
                        || (service_port_count == 1
                            && group.ports.len() == 1
                            && group_port.name.is_empty()))
            }) else {
                continue;
            };
            for member in &group.members {
                // Like pods: not ready and not terminating means nothing should use it.
                if !member.ready && !member.terminating {
                    continue;
                }
                endpoints.insert(Endpoint {
                    address: member.address,
                    port: group_port.port,
                    ready: member.ready,
                    serving: member.serving,
                    terminating: member.terminating,
                    node_name: member.node_name.clone(),
                });
            }
        }
        endpoints.into_sorted()
    }
}

/// `parent` is the field path of the port list's owner ("" for a slice's top level).
fn group_ports<T: KubernetesObject>(
    located: &Located<T>,
    parent: &str,
    ports: &[EndpointPort],
    problems: &mut Vec<String>,
) -> Vec<GroupPort> {
    let prefix = if parent.is_empty() {
        String::new()
    } else {
        format!("{parent}.")
    };
    ports
        .iter()
        .enumerate()
        .filter_map(|(index, endpoint_port)| {
            let protocol = endpoint_port.protocol.supported()?;
            // A slice port without a number means "all ports", which gives nothing to translate to.
            let port = endpoint_port.port?;
            if port == 0 {
                problems.push(format!(
                    "{}: {prefix}ports[{index}].port: must be between 1 and 65535",
                    located.context()
                ));
                return None;
            }
            Some(GroupPort {
                name: endpoint_port.name.clone().unwrap_or_default(),
                port,
                protocol,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controlplane::test_support::located;

    fn service(name: &str) -> ServiceName {
        ServiceName {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn summary(endpoints: &[Endpoint]) -> Vec<String> {
        endpoints
            .iter()
            .map(|e| {
                format!(
                    "{}:{} r={} s={} t={}",
                    e.address, e.port, e.ready as u8, e.serving as u8, e.terminating as u8
                )
            })
            .collect()
    }

    #[test]
    fn endpoints_object_ports_are_matched_by_name_and_protocol() {
        let endpoints = [located::<Endpoints>(
            "metadata: {name: db}
subsets:
- addresses: [{ip: 10.0.1.2, nodeName: n1}, {ip: 10.0.1.1}]
  notReadyAddresses: [{ip: 10.0.1.9}]
  ports: [{name: sql, port: 5432}, {name: stats, port: 9000, protocol: UDP}]
- addresses: [{ip: 10.0.1.3}]
  ports: [{name: sql, port: 6432}]",
        )];
        let mut problems = Vec::new();
        let index = EndpointObjectIndex::new(&endpoints, &[], &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let sql = index.endpoints(&service("db"), 2, "sql", Protocol::Tcp);
        assert_eq!(
            summary(&sql),
            [
                "10.0.1.1:5432 r=1 s=1 t=0",
                "10.0.1.2:5432 r=1 s=1 t=0",
                "10.0.1.3:6432 r=1 s=1 t=0"
            ]
        );
        assert_eq!(sql[1].node_name.as_deref(), Some("n1"));
        let stats = index.endpoints(&service("db"), 2, "stats", Protocol::Udp);
        assert_eq!(stats.len(), 2);
        assert!(
            index
                .endpoints(&service("db"), 2, "stats", Protocol::Tcp)
                .is_empty()
        );
        assert!(
            index
                .endpoints(&service("other"), 2, "sql", Protocol::Tcp)
                .is_empty()
        );
    }

    #[test]
    fn slices_merge_with_endpoints_and_the_most_ready_duplicate_wins() {
        let endpoints = [located::<Endpoints>(
            "metadata: {name: api, namespace: prod}
subsets: [{addresses: [{ip: 10.0.2.1}], ports: [{port: 8080}]}]",
        )];
        let slices = [
            located::<EndpointSlice>(
                "metadata: {name: api-a, namespace: prod, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [10.0.2.1]
  conditions: {ready: false, serving: false, terminating: true}
- addresses: [10.0.2.2]
- addresses: [10.0.2.3]
  conditions: {ready: false}
- addresses: [10.0.2.4]
  conditions: {ready: false, terminating: true}",
            ),
            located::<EndpointSlice>(
                "metadata: {name: api-b, namespace: prod, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [10.0.2.4]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.0.2.5]
  nodeName: n2",
            ),
            located::<EndpointSlice>(
                "metadata: {name: api-v6, namespace: prod, labels: {kubernetes.io/service-name: api}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: [\"fd00::1\"]}]",
            ),
            located::<EndpointSlice>(
                "metadata: {name: api-elsewhere, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.9.9]}]",
            ),
        ];
        let mut problems = Vec::new();
        let index = EndpointObjectIndex::new(&endpoints, &slices, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let api = ServiceName {
            namespace: "prod".into(),
            name: "api".into(),
        };
        // The Service names its only port; the unnamed endpoint ports still serve it.
        let merged = index.endpoints(&api, 1, "https", Protocol::Tcp);
        assert_eq!(
            summary(&merged),
            [
                "10.0.2.1:8080 r=1 s=1 t=0",
                "10.0.2.2:8080 r=1 s=1 t=0",
                "10.0.2.4:8080 r=0 s=1 t=1",
                "10.0.2.5:8080 r=1 s=1 t=0",
            ]
        );
        assert_eq!(merged[3].node_name.as_deref(), Some("n2"));
        // With two Service ports, names must match.
        assert!(index.endpoints(&api, 2, "https", Protocol::Tcp).is_empty());
    }

    #[test]
    fn reports_malformed_addresses_and_ports_by_field() {
        let endpoints = [located::<Endpoints>(
            "metadata: {name: db}
subsets: [{addresses: [{ip: 10.0.1.300}, {ip: 10.0.1.1}], ports: [{port: 0}]}]",
        )];
        let slices = [located::<EndpointSlice>(
            "metadata: {name: db-x, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{port: 5432}]
endpoints: [{addresses: [\"fd00::1\"]}, {addresses: []}, {addresses: [10.0.1.2]}]",
        )];
        let mut problems = Vec::new();
        let index = EndpointObjectIndex::new(&endpoints, &slices, &mut problems);
        assert_eq!(
            problems,
            [
                "test.yaml: document 1 (Endpoints default/db): subsets[0].addresses[0].ip: \"10.0.1.300\" is not an IP address; the address is left out",
                "test.yaml: document 1 (Endpoints default/db): subsets[0].ports[0].port: must be between 1 and 65535",
                "test.yaml: document 1 (EndpointSlice default/db-x): endpoints[0].addresses[0]: \"fd00::1\" is not an IPv4 address; the endpoint is left out",
                "test.yaml: document 1 (EndpointSlice default/db-x): endpoints[1].addresses: must list at least one address",
            ]
        );
        let db = index.endpoints(&service("db"), 1, "", Protocol::Tcp);
        assert_eq!(summary(&db), ["10.0.1.2:5432 r=1 s=1 t=0"]);
    }
}
