//! Services and EndpointSlices in the exact JSON shape kube-apiserver serves them (as `kubectl get
//! -o json` shows them, fields from the API reference): defaults filled in by the server, uids,
//! owner references and the EndpointSlice controller's labels included, so that the agent is
//! tested against what it will read in a cluster, not a minimal subset.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

/// One port of a Service: `port` -> `target_port`, named `name`.
#[derive(Clone, Copy, Debug)]
pub struct Port<'a> {
    pub name: &'a str,
    pub protocol: &'a str,
    pub port: u16,
    pub target_port: u16,
}

/// A ClusterIP Service `namespace/name` with `selector: {app: name}`.
pub fn service(namespace: &str, name: &str, cluster_ip: Ipv4Addr, ports: &[Port]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|port| {
            json!({"name": port.name, "protocol": port.protocol, "port": port.port,
                "targetPort": port.target_port})
        })
        .collect();
    json!({
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid(&format!("svc/{namespace}/{name}")),
            "creationTimestamp": "2024-05-01T10:00:00Z",
            "labels": {"app": name},
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "{}\n"
            }
        },
        "spec": {
            "ports": ports,
            "selector": {"app": name},
            "clusterIP": cluster_ip.to_string(),
            "clusterIPs": [cluster_ip.to_string()],
            "type": "ClusterIP",
            "sessionAffinity": "None",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster"
        },
        "status": {"loadBalancer": {}}
    })
}

/// One endpoint of a slice, with the conditions of discovery.k8s.io/v1.
#[derive(Clone, Debug)]
pub struct SliceEndpoint<'a> {
    pub pod: &'a str,
    pub address: Ipv4Addr,
    pub node_name: &'a str,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl<'a> SliceEndpoint<'a> {
    /// A running, ready pod.
    pub fn ready(pod: &'a str, address: Ipv4Addr, node_name: &'a str) -> Self {
        SliceEndpoint {
            pod,
            address,
            node_name,
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    /// The same pod once deleted, within its grace period: still serving, not ready.
    pub fn terminating(self) -> Self {
        SliceEndpoint {
            ready: false,
            terminating: true,
            ..self
        }
    }
}

/// The EndpointSlice `slice` of Service `namespace/service`, as the EndpointSlice controller
/// writes it; `ports` are the endpoint (target) ports, named as the Service's ports.
pub fn endpoint_slice(
    namespace: &str,
    service: &str,
    slice: &str,
    endpoints: &[SliceEndpoint],
    ports: &[Port],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|endpoint| {
            json!({
                "addresses": [endpoint.address.to_string()],
                "conditions": {
                    "ready": endpoint.ready,
                    "serving": endpoint.serving,
                    "terminating": endpoint.terminating
                },
                "targetRef": {
                    "kind": "Pod",
                    "namespace": namespace,
                    "name": endpoint.pod,
                    "uid": uid(&format!("pod/{namespace}/{}", endpoint.pod))
                },
                "nodeName": endpoint.node_name,
                "zone": "zone-a"
            })
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|port| json!({"name": port.name, "protocol": port.protocol, "port": port.target_port}))
        .collect();
    json!({
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": slice,
            "generateName": format!("{service}-"),
            "namespace": namespace,
            "uid": uid(&format!("slice/{namespace}/{slice}")),
            "generation": 1,
            "creationTimestamp": "2024-05-01T10:00:01Z",
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service,
                "app": service
            },
            "annotations": {
                "endpoints.kubernetes.io/last-change-trigger-time": "2024-05-01T10:00:01Z"
            },
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "Service",
                "name": service,
                "uid": uid(&format!("svc/{namespace}/{service}")),
                "controller": true,
                "blockOwnerDeletion": true
            }]
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports
    })
}

/// A stable, well-formed UUID derived from `seed` (the server makes random ones; tests want
/// repeatable objects).
fn uid(seed: &str) -> String {
    // FNV-1a, twice with different offsets, for 128 bits.
    let hash = |offset: u64| {
        seed.bytes().fold(offset, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let (high, low) = (hash(0xcbf2_9ce4_8422_2325), hash(0x6c62_272e_07bb_0142));
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        high >> 32,
        (high >> 16) & 0xffff,
        high & 0xfff,
        low >> 52,
        low & 0xffff_ffff_ffff
    )
}
