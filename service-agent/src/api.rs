//! The agent's local status socket and the `get` commands that read it.
//!
//! The agent answers every connection on a Unix socket with the JSON of the services it has
//! programmed, then closes it: `service-agent get` in another process filters and prints them.
//! A Unix socket (not TCP) keeps it to local root, like the pin directory.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::watch,
};

use crate::model::{DesiredState, Service, ServiceType};

pub const DEFAULT_SOCKET: &str = "/run/service-agent/agent.sock";

/// Serves `state` on `path` until the task is dropped. Removes a stale socket file first.
pub fn serve(path: &Path, state: watch::Receiver<Arc<DesiredState>>) -> Result<ApiServer> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let snapshot = Arc::clone(&state.borrow());
            tokio::spawn(async move {
                let services: Vec<&Service> = snapshot.services.values().map(|s| &**s).collect();
                if let Ok(body) = serde_json::to_vec(&services) {
                    let _ = stream.write_all(&body).await;
                }
            });
        }
    });
    Ok(ApiServer {
        path: path.to_owned(),
        task,
    })
}

pub struct ApiServer {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Asks the running agent for its services.
pub async fn fetch(path: &Path) -> Result<Vec<Service>> {
    let mut stream = UnixStream::connect(path).await.with_context(|| {
        format!(
            "connecting to the agent at {} (is `service-agent run` running with this --api-socket?)",
            path.display()
        )
    })?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body).await?;
    serde_json::from_slice(&body).context("the agent's answer is not the expected JSON")
}

/// Which namespaces a `get` shows.
pub enum Scope {
    Namespace(String),
    All,
}

impl Scope {
    fn includes(&self, service: &Service) -> bool {
        match self {
            Scope::Namespace(ns) => service.name.namespace == *ns,
            Scope::All => true,
        }
    }
}

pub fn select(services: Vec<Service>, scope: &Scope) -> Vec<Service> {
    services.into_iter().filter(|s| scope.includes(s)).collect()
}

/// `kubectl get services`: NAME TYPE CLUSTER-IP EXTERNAL-IP PORT(S) AGE.
pub fn services_table(services: &[Service], scope: &Scope, now: SystemTime) -> String {
    let rows = services.iter().map(|s| {
        let ports = s
            .ports
            .iter()
            .map(|p| match p.node_port {
                Some(node_port) => format!("{}:{node_port}/{}", p.port, p.protocol),
                None => format!("{}/{}", p.port, p.protocol),
            })
            .collect::<Vec<_>>()
            .join(",");
        vec![
            s.name.namespace.clone(),
            s.name.name.clone(),
            s.service_type.to_string(),
            s.cluster_ip.to_string(),
            external_ip(s),
            if ports.is_empty() {
                "<none>".to_owned()
            } else {
                ports
            },
            age(s.created, now),
        ]
    });
    let header = [
        "NAMESPACE",
        "NAME",
        "TYPE",
        "CLUSTER-IP",
        "EXTERNAL-IP",
        "PORT(S)",
        "AGE",
    ];
    table(&header, rows, scope)
}

/// kubectl's EXTERNAL-IP: the load-balancer IPs, then the external IPs; `<pending>` for a
/// LoadBalancer that has neither (its load balancer is not provisioned yet).
fn external_ip(service: &Service) -> String {
    let addresses: Vec<String> = service
        .load_balancer_ips
        .iter()
        .chain(&service.external_ips)
        .map(ToString::to_string)
        .collect();
    if !addresses.is_empty() {
        addresses.join(",")
    } else if service.service_type == ServiceType::LoadBalancer {
        "<pending>".to_owned()
    } else {
        "<none>".to_owned()
    }
}

/// `kubectl get endpoints`: NAME ENDPOINTS AGE, ready endpoints only, three then "+ N more...".
pub fn endpoints_table(services: &[Service], scope: &Scope, now: SystemTime) -> String {
    let rows = services.iter().map(|s| {
        let mut addresses: Vec<String> = Vec::new();
        for port in &s.ports {
            for e in port.endpoints.iter().filter(|e| e.ready) {
                let address = format!("{}:{}", e.address, e.port);
                if !addresses.contains(&address) {
                    addresses.push(address);
                }
            }
        }
        let shown = match addresses.len() {
            0 => "<none>".to_owned(),
            1..=3 => addresses.join(","),
            n => format!("{} + {} more...", addresses[..3].join(","), n - 3),
        };
        vec![
            s.name.namespace.clone(),
            s.name.name.clone(),
            shown,
            age(s.created, now),
        ]
    });
    table(&["NAMESPACE", "NAME", "ENDPOINTS", "AGE"], rows, scope)
}

/// Left-aligned columns three spaces apart, as kubectl prints them; the NAMESPACE column only
/// with `-A`.
fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>, scope: &Scope) -> String {
    let skip = usize::from(!matches!(scope, Scope::All));
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    lines.extend(rows);
    let lines: Vec<&[String]> = lines.iter().map(|l| &l[skip..]).collect();
    let columns = lines[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| lines.iter().map(|l| l[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for line in lines {
        let mut text = String::new();
        for (c, cell) in line.iter().enumerate() {
            if c + 1 == columns {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}   ", width = widths[c]);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

/// kubectl's short human durations: 45s, 3m12s, 25m, 5h3m, 2d4h, 12d.
fn age(created: SystemTime, now: SystemTime) -> String {
    let secs = now
        .duration_since(created)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => format!("{m}m{}s", s % 60),
        s if s < 3 * 3600 => format!("{m}m"),
        s if s < 8 * 3600 => format!("{h}h{}m", m % 60),
        s if s < 2 * 86400 => format!("{h}h"),
        s if s < 8 * 86400 => format!("{d}d{}h", h % 24),
        _ => format!("{d}d"),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::{Endpoint, Protocol, ServiceName, ServicePort, ServiceType, TrafficPolicy};

    fn service(namespace: &str, name: &str, endpoints: u8) -> Service {
        let endpoints = (1..=endpoints)
            .map(|i| Endpoint {
                address: Ipv4Addr::new(10, 244, 0, i),
                port: 8080,
                ready: true,
                serving: true,
                terminating: false,
                node_name: None,
            })
            .collect();
        Service {
            name: ServiceName {
                namespace: namespace.into(),
                name: name.into(),
            },
            service_type: ServiceType::ClusterIP,
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            external_traffic_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
                node_port: None,
                endpoints,
            }],
            created: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn services_table_is_kubectl_shaped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(330);
        let table = services_table(&[service("default", "web", 1)], &Scope::All, now);
        assert_eq!(
            table,
            "NAMESPACE   NAME   TYPE        CLUSTER-IP   EXTERNAL-IP   PORT(S)   AGE\n\
             default     web    ClusterIP   10.96.0.10   <none>        80/TCP    5m30s\n"
        );
        let table = services_table(
            &[service("default", "web", 1)],
            &Scope::Namespace("default".into()),
            now,
        );
        assert!(table.starts_with("NAME   TYPE"), "{table}");
    }

    #[test]
    fn services_table_shows_node_ports_and_external_addresses() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(330);
        let mut node_port = service("default", "np", 0);
        node_port.service_type = ServiceType::NodePort;
        node_port.ports[0].node_port = Some(30080);
        node_port.ports.push(ServicePort {
            name: "dns".into(),
            port: 53,
            protocol: Protocol::Udp,
            node_port: Some(30053),
            endpoints: Vec::new(),
        });
        let mut pending = service("default", "pending", 0);
        pending.service_type = ServiceType::LoadBalancer;
        let mut lb = pending.clone();
        lb.name.name = "lb".into();
        lb.load_balancer_ips = vec![Ipv4Addr::new(203, 0, 113, 1)];
        lb.external_ips = vec![Ipv4Addr::new(192, 0, 2, 10)];
        let mut external = service("default", "external", 0);
        external.external_ips = vec![Ipv4Addr::new(192, 0, 2, 11)];
        let table = services_table(
            &[node_port, pending, lb, external],
            &Scope::Namespace("default".into()),
            now,
        );
        assert_eq!(
            table,
            "NAME       TYPE           CLUSTER-IP   EXTERNAL-IP              PORT(S)                     AGE\n\
             np         NodePort       10.96.0.10   <none>                   80:30080/TCP,53:30053/UDP   5m30s\n\
             pending    LoadBalancer   10.96.0.10   <pending>                80/TCP                      5m30s\n\
             lb         LoadBalancer   10.96.0.10   203.0.113.1,192.0.2.10   80/TCP                      5m30s\n\
             external   ClusterIP      10.96.0.10   192.0.2.11               80/TCP                      5m30s\n"
        );
    }

    #[test]
    fn endpoints_table_shows_three_then_more() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(7200);
        let table = endpoints_table(
            &[service("default", "web", 5), service("default", "empty", 0)],
            &Scope::Namespace("default".into()),
            now,
        );
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[1],
            "web     10.244.0.1:8080,10.244.0.2:8080,10.244.0.3:8080 + 2 more...   120m"
        );
        assert!(lines[2].starts_with("empty   <none>"), "{table}");
    }

    #[test]
    fn ages_follow_kubectl() {
        let at = |secs| {
            age(
                SystemTime::UNIX_EPOCH,
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            )
        };
        assert_eq!(at(45), "45s");
        assert_eq!(at(3 * 3600 + 5 * 60), "3h5m");
        assert_eq!(at(3 * 86400 + 4 * 3600), "3d4h");
        assert_eq!(at(20 * 86400), "20d");
    }
}
