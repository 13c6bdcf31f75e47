//! Endpoints of Services with a selector: the pods they select, found the way Kubernetes'
//! endpoints controller finds them.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
};

use super::{
    endpoint_set::EndpointSet,
    objects::{Located, Pod, PodPhase, TargetPort},
    validation::PortDefinition,
};
use crate::model::Endpoint;

/// The pods that can be endpoints at all (running or pending with an IPv4 address), by namespace.
pub struct PodIndex<'a> {
    by_namespace: HashMap<&'a str, Vec<CandidatePod<'a>>>,
}

struct CandidatePod<'a> {
    pod: &'a Pod,
    address: Ipv4Addr,
    /// The pod's Ready condition is True.
    ready: bool,
    /// deletionTimestamp is set: the pod is shutting down and takes no new connections unless
    /// nothing else serves.
    terminating: bool,
}

impl<'a> PodIndex<'a> {
    /// Pods with a malformed IP are left out and reported in `problems`.
    pub fn new(pods: &'a [Located<Pod>], problems: &mut Vec<String>) -> Self {
        let mut by_namespace: HashMap<&str, Vec<CandidatePod>> = HashMap::new();
        for located in pods {
            let pod = &located.object;
            if matches!(
                pod.status.phase,
                Some(PodPhase::Succeeded | PodPhase::Failed)
            ) {
                continue;
            }
            let address = match pod_address(located) {
                Ok(Some(address)) => address,
                // No IP yet (not scheduled or not started), or an IPv6-only pod.
                Ok(None) => continue,
                Err(problem) => {
                    problems.push(problem);
                    continue;
                }
            };
            let ready =
                pod.status.conditions.iter().any(|condition| {
                    condition.condition_type == "Ready" && condition.status == "True"
                });
            by_namespace
                .entry(pod.metadata.namespace())
                .or_default()
                .push(CandidatePod {
                    pod,
                    address,
                    ready,
                    terminating: pod.metadata.deletion_timestamp.is_some(),
                });
        }
        PodIndex { by_namespace }
    }

    /// The endpoints of one service port, sorted and without duplicates.
    pub fn endpoints(
        &self,
        namespace: &str,
        selector: &BTreeMap<String, String>,
        publish_not_ready_addresses: bool,
        port: &PortDefinition,
    ) -> Vec<Endpoint> {
        let mut endpoints = EndpointSet::default();
        let candidates = self.by_namespace.get(namespace).into_iter().flatten();
        for candidate in candidates.filter(|candidate| selects(selector, candidate.pod)) {
            let (ready, serving, terminating) = if publish_not_ready_addresses {
                // What the endpoints controller publishes: every pod, as ready. Reported as not
                // terminating too, since the model's ready implies that.
                (true, true, false)
            } else if candidate.terminating {
                (false, candidate.ready, true)
            } else if candidate.ready {
                (true, true, false)
            } else {
                continue;
            };
            let Some(target_port) = target_port(candidate.pod, port) else {
                continue;
            };
            endpoints.insert(Endpoint {
                address: candidate.address,
                port: target_port,
                ready,
                serving,
                terminating,
                node_name: candidate.pod.spec.node_name.clone(),
            });
        }
        endpoints.into_sorted()
    }
}

fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    selector
        .iter()
        .all(|(key, value)| pod.metadata.labels.get(key) == Some(value))
}

/// A named target port means "the container port of that name", which may differ from pod to
/// pod (during a rollout, say); a pod without it does not serve the port.
fn target_port(pod: &Pod, port: &PortDefinition) -> Option<u16> {
    match &port.target_port {
        TargetPort::Number(number) => Some(*number),
        TargetPort::Name(name) => pod
            .spec
            .containers
            .iter()
            .flat_map(|container| &container.ports)
            .find(|container_port| {
                container_port.name.as_deref() == Some(name.as_str())
                    && container_port.protocol.supported() == Some(port.protocol)
            })
            .map(|container_port| container_port.container_port)
            .filter(|number| *number != 0),
    }
}

/// The pod's IPv4 address: status.podIPs lists one address per family, status.podIP is the
/// first of them (and all that older manifests give).
fn pod_address(pod: &Located<Pod>) -> Result<Option<Ipv4Addr>, String> {
    let status = &pod.object.status;
    let listed = status
        .pod_ips
        .iter()
        .enumerate()
        .map(|(index, pod_ip)| (format!("status.podIPs[{index}].ip"), pod_ip.ip.as_str()));
    let primary = status
        .pod_ip
        .as_deref()
        .filter(|ip| !ip.is_empty())
        .map(|ip| ("status.podIP".to_owned(), ip));
    let mut ipv4 = None;
    for (field, text) in listed.chain(primary) {
        match text.parse::<IpAddr>() {
            Ok(IpAddr::V4(address)) => {
                ipv4.get_or_insert(address);
            }
            Ok(IpAddr::V6(_)) => {}
            Err(_) => {
                return Err(format!(
                    "{}: {field}: {text:?} is not an IP address; the pod is left out",
                    pod.context()
                ));
            }
        }
    }
    Ok(ipv4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{controlplane::test_support::located, model::Protocol};

    /// A ready pod with the given metadata fields, IP and extra top-level YAML.
    fn ready_pod(metadata: &str, ip: &str, rest: &str) -> Located<Pod> {
        located(&format!(
            "metadata: {{{metadata}}}
status:
  podIP: {ip}
  conditions: [{{type: Ready, status: \"True\"}}]
{rest}"
        ))
    }

    fn http_port(target_port: TargetPort) -> PortDefinition {
        PortDefinition {
            index: 0,
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
            target_port,
            node_port: None,
        }
    }

    fn selector(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    fn addresses(endpoints: &[Endpoint]) -> Vec<String> {
        endpoints
            .iter()
            .map(|e| format!("{}:{}", e.address, e.port))
            .collect()
    }

    #[test]
    fn selects_ready_pods_of_the_namespace_matching_every_label() {
        let pods = [
            ready_pod(
                "name: a, labels: {app: web, tier: front}",
                "10.0.0.2",
                "spec: {nodeName: n1}",
            ),
            ready_pod("name: b, labels: {app: web}", "10.0.0.3", ""),
            ready_pod(
                "name: c, namespace: other, labels: {app: web, tier: front}",
                "10.0.0.4",
                "",
            ),
            ready_pod(
                "name: d, labels: {app: web, tier: front, extra: yes}",
                "10.0.0.1",
                "",
            ),
            // Ready but without an IP yet.
            located(
                "metadata: {name: e, labels: {app: web, tier: front}}
status: {conditions: [{type: Ready, status: \"True\"}]}",
            ),
        ];
        let mut problems = Vec::new();
        let index = PodIndex::new(&pods, &mut problems);
        let endpoints = index.endpoints(
            "default",
            &selector(&[("app", "web"), ("tier", "front")]),
            false,
            &http_port(TargetPort::Number(8080)),
        );
        assert_eq!(addresses(&endpoints), ["10.0.0.1:8080", "10.0.0.2:8080"]);
        assert_eq!(endpoints[1].node_name.as_deref(), Some("n1"));
        assert!(
            endpoints
                .iter()
                .all(|e| e.ready && e.serving && !e.terminating)
        );
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn unready_finished_and_terminating_pods() {
        let pods = [
            located::<Pod>(
                "metadata: {name: unready, labels: {app: web}}
status: {podIP: 10.0.0.2, conditions: [{type: Ready, status: \"False\"}]}",
            ),
            ready_pod(
                "name: done, labels: {app: web}",
                "10.0.0.3",
                "  phase: Succeeded",
            ),
            ready_pod(
                "name: leaving, labels: {app: web}, deletionTimestamp: \"2024-01-01T00:00:00Z\"",
                "10.0.0.4",
                "",
            ),
            ready_pod(
                "name: ok, labels: {app: web}",
                "10.0.0.5",
                "  phase: Running",
            ),
        ];
        let index = PodIndex::new(&pods, &mut Vec::new());
        let web = selector(&[("app", "web")]);
        let port = http_port(TargetPort::Number(80));

        let endpoints = index.endpoints("default", &web, false, &port);
        assert_eq!(addresses(&endpoints), ["10.0.0.4:80", "10.0.0.5:80"]);
        let leaving = &endpoints[0];
        assert_eq!(
            (leaving.ready, leaving.serving, leaving.terminating),
            (false, true, true)
        );

        // publishNotReadyAddresses publishes the unready and the terminating pod as ready, but
        // never a pod that has finished.
        let published = index.endpoints("default", &web, true, &port);
        assert_eq!(
            addresses(&published),
            ["10.0.0.2:80", "10.0.0.4:80", "10.0.0.5:80"]
        );
        assert!(
            published
                .iter()
                .all(|e| e.ready && e.serving && !e.terminating)
        );
    }

    #[test]
    fn resolves_a_named_target_port_per_pod() {
        let containers = |port: u16, protocol: &str| {
            format!(
                "spec:
  containers:
  - name: sidecar
    ports: [{{name: metrics, containerPort: 9090}}]
  - name: app
    ports: [{{name: http, containerPort: {port}, protocol: {protocol}}}]"
            )
        };
        let pods = [
            ready_pod(
                "name: old, labels: {app: web}",
                "10.0.0.2",
                &containers(8080, "TCP"),
            ),
            ready_pod(
                "name: new, labels: {app: web}",
                "10.0.0.3",
                &containers(8443, "TCP"),
            ),
            ready_pod(
                "name: udp, labels: {app: web}",
                "10.0.0.4",
                &containers(8080, "UDP"),
            ),
            ready_pod("name: bare, labels: {app: web}", "10.0.0.5", ""),
        ];
        let index = PodIndex::new(&pods, &mut Vec::new());
        let endpoints = index.endpoints(
            "default",
            &selector(&[("app", "web")]),
            false,
            &http_port(TargetPort::Name("http".into())),
        );
        assert_eq!(addresses(&endpoints), ["10.0.0.2:8080", "10.0.0.3:8443"]);
    }

    #[test]
    fn prefers_the_ipv4_address_and_reports_malformed_ones() {
        let pods = [
            located::<Pod>(
                "metadata: {name: dual, labels: {app: web}}
status:
  podIP: fd00::2
  podIPs: [{ip: fd00::2}, {ip: 10.0.0.2}]
  conditions: [{type: Ready, status: \"True\"}]",
            ),
            ready_pod("name: broken, labels: {app: web}", "10.0.0.999", ""),
            ready_pod("name: v6, labels: {app: web}", "fd00::3", ""),
        ];
        let mut problems = Vec::new();
        let index = PodIndex::new(&pods, &mut problems);
        let endpoints = index.endpoints(
            "default",
            &selector(&[("app", "web")]),
            false,
            &http_port(TargetPort::Number(80)),
        );
        assert_eq!(addresses(&endpoints), ["10.0.0.2:80"]);
        assert_eq!(
            problems,
            [
                "test.yaml: document 1 (Pod default/broken): status.podIP: \"10.0.0.999\" is not an IP address; the pod is left out"
            ]
        );
    }
}
