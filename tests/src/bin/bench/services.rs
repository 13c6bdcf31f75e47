//! The service set a benchmark round programs: N ClusterIP services with 3 endpoints each, written
//! out in the three forms the modes consume (kube-proxy's iptables-restore input, kube-proxy's
//! nftables ruleset, and Kubernetes manifests for the agent). All three describe the same services.
//!
//! Each service has one TCP port (80 -> 8000). The measured service sits in the middle of the set
//! (so iptables' linear KUBE-SERVICES scan passes half the rules before it) and is the only one
//! whose endpoints exist: the three nginx pods of the topology. It also has a UDP port (53 ->
//! 5353) for the UDP figures, and it is of type NodePort (30080 for TCP, 30053 for UDP) for the
//! figures from outside the cluster. The other services' endpoints are addresses nobody answers
//! on.

use std::{fmt::Write, net::Ipv4Addr};

/// The pod network (`! -s` of kube-proxy's masquerade rule: pod clients are not masqueraded).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// Where nginx listens in each backend pod.
pub const HTTP_TARGET_PORT: u16 = 8000;
pub const HTTP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
/// Where the backend pods' UDP server listens (the harness's [`integration_tests::servers`]).
pub const UDP_TARGET_PORT: u16 = integration_tests::servers::UDP_PORT;
/// The measured service's nodePorts.
pub const HTTP_NODE_PORT: u16 = 30080;
pub const UDP_NODE_PORT: u16 = 30053;

const FIRST_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Endpoints of the services that are not measured: never routed, never answered.
const FIRST_DUMMY_ENDPOINT: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 1);

pub struct ServiceSet {
    pub count: usize,
    /// The addresses of the measured service's endpoints (the topology's backend pods).
    pub backends: [Ipv4Addr; 3],
    /// The node's address, where nodePorts answer.
    pub node_ip: Ipv4Addr,
}

struct ServiceSpec {
    namespace: &'static str,
    name: String,
    cluster_ip: Ipv4Addr,
    endpoints: [Ipv4Addr; 3],
    /// Only the measured service has the UDP port and is a NodePort service.
    measured: bool,
}

impl ServiceSet {
    pub fn measured_index(&self) -> usize {
        self.count / 2
    }

    pub fn measured_ip(&self) -> Ipv4Addr {
        offset(FIRST_CLUSTER_IP, self.measured_index())
    }

    fn specs(&self) -> impl Iterator<Item = ServiceSpec> + '_ {
        (0..self.count).map(|index| {
            let measured = index == self.measured_index();
            let endpoints = if measured {
                self.backends
            } else {
                [0, 1, 2].map(|k| offset(FIRST_DUMMY_ENDPOINT, 3 * index + k))
            };
            ServiceSpec {
                namespace: "bench",
                name: format!("svc-{index}"),
                cluster_ip: offset(FIRST_CLUSTER_IP, index),
                endpoints,
                measured,
            }
        })
    }

    /// kube-proxy's iptables mode (pkg/proxy/iptables/proxier.go), for iptables-legacy-restore:
    /// KUBE-SERVICES with one rule per service port, a KUBE-SVC chain per service port choosing
    /// an endpoint with `statistic --mode random`, a KUBE-SEP chain per endpoint with the DNAT,
    /// and KUBE-MARK-MASQ / KUBE-POSTROUTING's MASQUERADE. The filter table's KUBE-FORWARD too.
    pub fn iptables_restore(&self) -> String {
        let mut nat_chains = String::new();
        let mut nat_rules = String::new();
        for spec in self.specs() {
            for (port_name, proto, port, target, node_port) in spec.ports() {
                let id = format!("{}/{}:{port_name}", spec.namespace, spec.name);
                let svc_chain = format!("KUBE-SVC-{}", chain_hash(&id));
                let vip = spec.cluster_ip;
                writeln!(nat_chains, ":{svc_chain} - [0:0]").unwrap();
                if let Some(node_port) = node_port {
                    // Traffic to a nodePort is always masqueraded (policy Cluster).
                    let ext_chain = format!("KUBE-EXT-{}", chain_hash(&id));
                    writeln!(nat_chains, ":{ext_chain} - [0:0]").unwrap();
                    writeln!(
                        nat_rules,
                        "-A KUBE-NODEPORTS -p {proto} -m comment --comment \"{id}\" -m {proto} --dport {node_port} -j {ext_chain}"
                    )
                    .unwrap();
                    writeln!(
                        nat_rules,
                        "-A {ext_chain} -m comment --comment \"masquerade traffic for {id} external destinations\" -j KUBE-MARK-MASQ"
                    )
                    .unwrap();
                    writeln!(nat_rules, "-A {ext_chain} -j {svc_chain}").unwrap();
                }
                writeln!(
                    nat_rules,
                    "-A KUBE-SERVICES -d {vip}/32 -p {proto} -m comment --comment \"{id} cluster IP\" -m {proto} --dport {port} -j {svc_chain}"
                )
                .unwrap();
                writeln!(
                    nat_rules,
                    "-A {svc_chain} ! -s {CLUSTER_CIDR} -d {vip}/32 -p {proto} -m comment --comment \"{id} cluster IP\" -m {proto} --dport {port} -j KUBE-MARK-MASQ"
                )
                .unwrap();
                let count = spec.endpoints.len();
                for (i, endpoint) in spec.endpoints.iter().enumerate() {
                    let sep_chain = format!(
                        "KUBE-SEP-{}",
                        chain_hash(&format!("{id}{endpoint}:{target}"))
                    );
                    writeln!(nat_chains, ":{sep_chain} - [0:0]").unwrap();
                    let remaining = count - i;
                    let statistic = if remaining > 1 {
                        format!(
                            " -m statistic --mode random --probability {:.11}",
                            1.0 / remaining as f64
                        )
                    } else {
                        String::new()
                    };
                    writeln!(
                        nat_rules,
                        "-A {svc_chain} -m comment --comment \"{id} -> {endpoint}:{target}\"{statistic} -j {sep_chain}"
                    )
                    .unwrap();
                    writeln!(
                        nat_rules,
                        "-A {sep_chain} -s {endpoint}/32 -m comment --comment \"{id}\" -j KUBE-MARK-MASQ"
                    )
                    .unwrap();
                    writeln!(
                        nat_rules,
                        "-A {sep_chain} -p {proto} -m comment --comment \"{id}\" -m {proto} -j DNAT --to-destination {endpoint}:{target}"
                    )
                    .unwrap();
                }
            }
        }
        format!(
            "\
*filter
:KUBE-FORWARD - [0:0]
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
{nat_chains}-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
{nat_rules}-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
"
        )
    }

    /// kube-proxy's nftables mode (pkg/proxy/nftables/proxier.go), for `nft -f`: one `service-ips`
    /// verdict map keyed by daddr . l4proto . dport, a chain per service port choosing an endpoint
    /// with `numgen random mod N vmap`, a chain per endpoint with the DNAT.
    pub fn nftables(&self) -> String {
        let table = "ip kube-proxy";
        let mut out = format!(
            "\
add table {table} {{ comment \"rules for kube-proxy\" ; }}
add chain {table} mark-for-masquerade
add rule {table} mark-for-masquerade mark set mark or 0x4000
add chain {table} masquerading
add rule {table} masquerading mark and 0x4000 == 0 return
add rule {table} masquerading mark set mark xor 0x4000
add rule {table} masquerading masquerade fully-random
add chain {table} services
add chain {table} filter-forward {{ type filter hook forward priority -110 ; }}
add rule {table} filter-forward ct state invalid drop
add chain {table} nat-prerouting {{ type nat hook prerouting priority -100 ; }}
add rule {table} nat-prerouting jump services
add chain {table} nat-output {{ type nat hook output priority -100 ; }}
add rule {table} nat-output jump services
add chain {table} nat-postrouting {{ type nat hook postrouting priority 100 ; }}
add rule {table} nat-postrouting jump masquerading
add map {table} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}
add set {table} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}
add map {table} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}
add rule {table} services ip daddr . meta l4proto . th dport vmap @service-ips
add rule {table} services fib daddr type local ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
add element {table} nodeport-ips {{ {} }}
",
            self.node_ip
        );
        for spec in self.specs() {
            for (port_name, proto, port, target, node_port) in spec.ports() {
                let id = format!("{}/{}/{proto}/{port_name}", spec.namespace, spec.name);
                let svc_chain = format!("service-{}-{id}", &chain_hash(&id)[..8]);
                let vip = spec.cluster_ip;
                writeln!(out, "add chain {table} {svc_chain}").unwrap();
                writeln!(
                    out,
                    "add rule {table} {svc_chain} ip daddr {vip} {proto} dport {port} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade"
                )
                .unwrap();
                let mut vmap = Vec::new();
                for (i, endpoint) in spec.endpoints.iter().enumerate() {
                    let ep_id = format!("{id}__{endpoint}/{target}");
                    let ep_chain = format!("endpoint-{}-{ep_id}", &chain_hash(&ep_id)[..8]);
                    writeln!(out, "add chain {table} {ep_chain}").unwrap();
                    writeln!(
                        out,
                        "add rule {table} {ep_chain} ip saddr {endpoint} jump mark-for-masquerade"
                    )
                    .unwrap();
                    writeln!(
                        out,
                        "add rule {table} {ep_chain} meta l4proto {proto} dnat to {endpoint}:{target}"
                    )
                    .unwrap();
                    vmap.push(format!("{i} : goto {ep_chain}"));
                }
                writeln!(
                    out,
                    "add rule {table} {svc_chain} numgen random mod {} vmap {{ {} }}",
                    vmap.len(),
                    vmap.join(", ")
                )
                .unwrap();
                writeln!(
                    out,
                    "add element {table} service-ips {{ {vip} . {proto} . {port} : goto {svc_chain} }}"
                )
                .unwrap();
                if let Some(node_port) = node_port {
                    let ext_chain = format!("external-{}-{id}", &chain_hash(&id)[..8]);
                    writeln!(out, "add chain {table} {ext_chain}").unwrap();
                    writeln!(out, "add rule {table} {ext_chain} jump mark-for-masquerade").unwrap();
                    writeln!(out, "add rule {table} {ext_chain} goto {svc_chain}").unwrap();
                    writeln!(
                        out,
                        "add element {table} service-nodeports {{ {proto} . {node_port} : goto {ext_chain} }}"
                    )
                    .unwrap();
                }
            }
        }
        out
    }

    /// The same services as Kubernetes objects for `service-agent --manifests`: Services without
    /// a selector and their EndpointSlices, which is what the API server hands kube-proxy too.
    pub fn manifests(&self) -> String {
        let mut out = String::new();
        for spec in self.specs() {
            let (namespace, name, vip) = (spec.namespace, &spec.name, spec.cluster_ip);
            let (service_type, http_node_port) = if spec.measured {
                ("NodePort", format!("    nodePort: {HTTP_NODE_PORT}\n"))
            } else {
                ("ClusterIP", String::new())
            };
            let udp_port = if spec.measured {
                format!(
                    "  - name: dns\n    protocol: UDP\n    port: {UDP_PORT}\n    targetPort: {UDP_TARGET_PORT}\n    nodePort: {UDP_NODE_PORT}\n"
                )
            } else {
                String::new()
            };
            let udp_slice_port = if spec.measured {
                format!("- name: dns\n  protocol: UDP\n  port: {UDP_TARGET_PORT}\n")
            } else {
                String::new()
            };
            let endpoints: String = spec
                .endpoints
                .iter()
                .map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"))
                .collect();
            write!(
                out,
                "\
---
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {namespace}
spec:
  type: {service_type}
  clusterIP: {vip}
  ports:
  - name: http
    protocol: TCP
    port: {HTTP_PORT}
    targetPort: {HTTP_TARGET_PORT}
{http_node_port}{udp_port}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-abcde
  namespace: {namespace}
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
ports:
- name: http
  protocol: TCP
  port: {HTTP_TARGET_PORT}
{udp_slice_port}endpoints:
{endpoints}"
            )
            .unwrap();
        }
        out
    }

    /// The same objects as one JSON `List`, as `kubectl get -o json` prints them and as the API
    /// server serves them: what the agent reads without YAML's parsing cost.
    pub fn manifests_json(&self) -> String {
        let mut items = Vec::new();
        for spec in self.specs() {
            let ports: Vec<_> = spec
                .ports()
                .map(|(name, proto, port, target, node_port)| {
                    let mut port = serde_json::json!({
                        "name": name, "protocol": proto.to_uppercase(), "port": port, "targetPort": target
                    });
                    if let Some(node_port) = node_port {
                        port["nodePort"] = node_port.into();
                    }
                    port
                })
                .collect();
            let slice_ports: Vec<_> = spec
                .ports()
                .map(|(name, proto, _, target, _)| {
                    serde_json::json!({"name": name, "protocol": proto.to_uppercase(), "port": target})
                })
                .collect();
            let service_type = if spec.measured {
                "NodePort"
            } else {
                "ClusterIP"
            };
            let metadata =
                |name: String| serde_json::json!({"name": name, "namespace": spec.namespace});
            items.push(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": metadata(spec.name.clone()),
                "spec": {"type": service_type, "clusterIP": spec.cluster_ip.to_string(), "ports": ports},
            }));
            let mut slice_metadata = metadata(format!("{}-abcde", spec.name));
            slice_metadata["labels"] = serde_json::json!({"kubernetes.io/service-name": spec.name});
            items.push(serde_json::json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": slice_metadata,
                "addressType": "IPv4",
                "ports": slice_ports,
                "endpoints": spec.endpoints.iter().map(|ip| serde_json::json!({
                    "addresses": [ip.to_string()], "conditions": {"ready": true}
                })).collect::<Vec<_>>(),
            }));
        }
        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
    }
}

impl ServiceSpec {
    /// (name, protocol, port, targetPort, nodePort) of each port: http for every service, and
    /// for the measured one dns too and nodePorts.
    fn ports(&self) -> impl Iterator<Item = (&'static str, &'static str, u16, u16, Option<u16>)> {
        let http = (
            "http",
            "tcp",
            HTTP_PORT,
            HTTP_TARGET_PORT,
            self.measured.then_some(HTTP_NODE_PORT),
        );
        let dns = ("dns", "udp", UDP_PORT, UDP_TARGET_PORT, Some(UDP_NODE_PORT));
        std::iter::once(http).chain(self.measured.then_some(dns))
    }
}

fn offset(base: Ipv4Addr, by: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + by as u32)
}

/// A stable 16-character chain suffix, as kube-proxy derives one from a hash of the port's name.
fn chain_hash(id: &str) -> String {
    // FNV-1a: only stability and spread matter here.
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016X}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(count: usize) -> ServiceSet {
        ServiceSet {
            count,
            backends: [11, 12, 13].map(|o| Ipv4Addr::new(10, 244, 0, o)),
            node_ip: Ipv4Addr::new(192, 168, 100, 1),
        }
    }

    #[test]
    fn the_measured_service_is_in_the_middle_and_points_at_the_pods() {
        let set = set(10);
        assert_eq!(set.measured_ip(), Ipv4Addr::new(10, 96, 0, 15));
        let rules = set.iptables_restore();
        assert!(rules.contains("-j DNAT --to-destination 10.244.0.12:8000"));
        assert!(rules.contains("-d 10.96.0.15/32 -p udp"));
        assert_eq!(rules.matches("-A KUBE-SERVICES -d ").count(), 11);
        let nft = set.nftables();
        assert_eq!(
            nft.matches("add element ip kube-proxy service-ips").count(),
            11
        );
        assert!(nft.contains("numgen random mod 3 vmap"));
        let manifests = set.manifests();
        assert_eq!(manifests.matches("kind: Service\n").count(), 10);
        assert_eq!(manifests.matches("kind: EndpointSlice\n").count(), 10);
        let json: serde_json::Value = serde_json::from_str(&set.manifests_json()).unwrap();
        assert_eq!(json["items"].as_array().unwrap().len(), 20);
    }
}
