//! Kubernetes manifests for the agent's `--manifests` directory, written the way `kubectl get -o
//! yaml` shows the objects: the tests' Services select the topology's backend pods, and each Pod
//! carries the `status` (podIP, Ready condition) that a kubelet would report, because in manifest
//! mode the agent plays the control plane's part and derives the endpoints from it.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::{
    servers,
    topology::{Pod, Topology},
};

/// The Service's TCP port; its targetPort is the container port named `http` ([`servers::TCP_PORT`]).
pub const SERVICE_TCP_PORT: u16 = 80;
/// The Service's UDP port; its targetPort is the number [`servers::UDP_PORT`], so that the tests
/// cover both ways of naming a target port.
pub const SERVICE_UDP_PORT: u16 = 53;

/// A Pod object for a backend pod of the topology, labelled `app: <app>`, whose containers expose
/// the [`servers`] ports; `ready` is its Ready condition.
pub fn backend_pod(pod: &Pod, namespace: &str, app: &str, ready: bool) -> String {
    let (name, ip, node_name) = (&pod.name, pod.ip, &pod.node_name);
    let ready = if ready { "True" } else { "False" };
    let (tcp_port, udp_port) = (servers::TCP_PORT, servers::UDP_PORT);
    format!(
        "\
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
  labels:
    app: {app}
spec:
  nodeName: {node_name}
  containers:
  - name: {app}
    image: registry.k8s.io/e2e-test-images/agnhost:2.53
    ports:
    - name: http
      containerPort: {tcp_port}
      protocol: TCP
    - name: udp
      containerPort: {udp_port}
      protocol: UDP
status:
  phase: Running
  podIP: {ip}
  podIPs:
  - ip: {ip}
  conditions:
  - type: Ready
    status: \"{ready}\"
"
    )
}

/// [`backend_pod`], Ready, being deleted: a deletionTimestamp (its value does not matter), so the
/// endpoints controller reports the pod serving and terminating, and a proxy gives it no new
/// flows while its open ones finish.
pub fn terminating_backend_pod(pod: &Pod, namespace: &str, app: &str) -> String {
    backend_pod(pod, namespace, app, true).replacen(
        "metadata:\n",
        "metadata:\n  deletionTimestamp: \"2026-01-01T00:00:00Z\"\n",
        1,
    )
}

/// A ClusterIP Service selecting `app: <app>` with a TCP and a UDP port. Without `cluster_ip` the
/// agent allocates one from the service CIDR, as the API server would.
pub fn service(namespace: &str, name: &str, app: &str, cluster_ip: Option<Ipv4Addr>) -> String {
    let cluster_ip = cluster_ip.map_or(String::new(), |ip| format!("  clusterIP: {ip}\n"));
    let (tcp_port, udp_port, udp_target) = (SERVICE_TCP_PORT, SERVICE_UDP_PORT, servers::UDP_PORT);
    format!(
        "\
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {namespace}
spec:
  type: ClusterIP
{cluster_ip}  selector:
    app: {app}
  ports:
  - name: http
    protocol: TCP
    port: {tcp_port}
    targetPort: http
  - name: udp
    protocol: UDP
    port: {udp_port}
    targetPort: {udp_target}
"
    )
}

/// The fields of a Service beyond its selector and ports.
#[derive(Default)]
pub struct Exposure<'a> {
    pub service_type: &'a str,
    /// Explicit nodePorts for the TCP and UDP ports; allocated when absent.
    pub node_ports: Option<(u16, u16)>,
    /// externalTrafficPolicy Local (else Cluster).
    pub local_policy: bool,
    pub external_ips: &'a [Ipv4Addr],
    /// `status.loadBalancer.ingress[].ip`.
    pub ingress_ips: &'a [Ipv4Addr],
    /// The UDP port's targetPort, when not [`servers::UDP_PORT`] (e.g. a port nothing listens on).
    pub udp_target_port: Option<u16>,
    /// `spec.healthCheckNodePort` (LoadBalancer with policy Local).
    pub health_check_node_port: Option<u16>,
}

/// A Service selecting `app: <app>` with the TCP and UDP ports of [`service`], exposed as
/// `exposure` says.
pub fn exposed_service(namespace: &str, name: &str, app: &str, exposure: &Exposure) -> String {
    let (tcp_port, udp_port) = (SERVICE_TCP_PORT, SERVICE_UDP_PORT);
    let udp_target = exposure.udp_target_port.unwrap_or(servers::UDP_PORT);
    let service_type = exposure.service_type;
    let (tcp_node_port, udp_node_port) = exposure.node_ports.map_or_else(
        || (String::new(), String::new()),
        |(tcp, udp)| {
            (
                format!("    nodePort: {tcp}\n"),
                format!("    nodePort: {udp}\n"),
            )
        },
    );
    let policy = if exposure.local_policy {
        "  externalTrafficPolicy: Local\n"
    } else {
        ""
    };
    let health_check = exposure
        .health_check_node_port
        .map_or_else(String::new, |port| {
            format!("  healthCheckNodePort: {port}\n")
        });
    let list = |ips: &[Ipv4Addr], item: &str| -> String {
        ips.iter().map(|ip| format!("{item}{ip}\n")).collect()
    };
    let external_ips = match exposure.external_ips {
        [] => String::new(),
        ips => format!("  externalIPs:\n{}", list(ips, "  - ")),
    };
    let status = match exposure.ingress_ips {
        [] => String::new(),
        ips => format!(
            "status:\n  loadBalancer:\n    ingress:\n{}",
            list(ips, "    - ip: ")
        ),
    };
    format!(
        "\
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {namespace}
spec:
  type: {service_type}
{policy}{health_check}{external_ips}  selector:
    app: {app}
  ports:
  - name: http
    protocol: TCP
    port: {tcp_port}
    targetPort: http
{tcp_node_port}  - name: udp
    protocol: UDP
    port: {udp_port}
    targetPort: {udp_target}
{udp_node_port}{status}"
    )
}

/// Several objects in one file, as `kubectl apply -f` reads them.
pub fn documents(objects: impl IntoIterator<Item = String>) -> String {
    objects.into_iter().collect::<Vec<_>>().join("---\n")
}

/// The directory the agent reads with `--manifests`, in the topology's scratch directory.
pub struct ManifestDir {
    path: PathBuf,
    /// Where files are written before being renamed into `path`.
    staging: PathBuf,
}

impl ManifestDir {
    pub fn create(topology: &Topology) -> Result<Self> {
        let path = topology.scratch_dir().join("manifests");
        let staging = topology.scratch_dir().join("manifests.staging");
        for dir in [&path, &staging] {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        Ok(Self { path, staging })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes (or replaces) `file` atomically: the agent polls the directory and must never read a
    /// half-written manifest, which it would rightly reject as broken.
    pub fn write(&self, file: &str, contents: &str) -> Result<PathBuf> {
        let (staged, path) = (self.staging.join(file), self.path.join(file));
        fs::write(&staged, contents)
            .and_then(|()| fs::rename(&staged, &path))
            .with_context(|| format!("cannot write manifest {}", path.display()))?;
        Ok(path)
    }

    pub fn remove(&self, file: &str) -> Result<()> {
        let path = self.path.join(file);
        fs::remove_file(&path).with_context(|| format!("cannot remove manifest {}", path.display()))
    }
}
