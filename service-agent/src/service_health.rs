//! kube-proxy's service health check servers: every LoadBalancer Service with
//! externalTrafficPolicy Local has a healthCheckNodePort, where each node answers the load
//! balancer's probe with how many endpoints of the Service run on it: 200 when at least one,
//! 503 when none. The load balancer then sends traffic only to nodes that serve it, since the
//! others drop it (the Local policy). The answer is kube-proxy's, headers included, so load
//! balancers configured for kube-proxy read it unchanged.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
};

use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

use crate::model::{DesiredState, ServiceName};

/// One listener per health check nodePort of the published state.
pub struct ServiceHealthServers {
    node_name: Option<String>,
    state: watch::Receiver<Arc<DesiredState>>,
    servers: BTreeMap<u16, (ServiceName, JoinHandle<()>)>,
    /// Ports that could not be bound (in use by someone else): warned about once.
    unavailable: BTreeSet<u16>,
}

impl ServiceHealthServers {
    /// Servers that count the endpoints of `node_name` in the latest `state`.
    pub fn new(node_name: Option<String>, state: watch::Receiver<Arc<DesiredState>>) -> Self {
        Self {
            node_name,
            state,
            servers: BTreeMap::new(),
            unavailable: BTreeSet::new(),
        }
    }

    /// Listens on the health check ports of `desired` and closes those no Service has any more.
    /// Must run inside the tokio runtime.
    pub fn reconcile(&mut self, desired: &DesiredState) {
        let wanted: BTreeMap<u16, &ServiceName> = desired
            .services
            .values()
            .filter_map(|service| Some((service.health_check_node_port?, &service.name)))
            .collect();
        self.servers.retain(|port, (service, task)| {
            let keep = wanted.get(port) == Some(&&*service);
            if !keep {
                task.abort();
                tracing::info!(port, %service, "health check server closed");
            }
            keep
        });
        self.unavailable.retain(|port| wanted.contains_key(port));
        for (port, service) in wanted {
            if self.servers.contains_key(&port) {
                continue;
            }
            let listener = match bind(port) {
                Ok(listener) => listener,
                Err(error) => {
                    if self.unavailable.insert(port) {
                        tracing::warn!(port, %service, "health check port unavailable: {error}");
                    }
                    continue;
                }
            };
            self.unavailable.remove(&port);
            tracing::info!(port, %service, "health check server listening");
            let task = tokio::spawn(serve(
                listener,
                service.clone(),
                self.node_name.clone(),
                self.state.clone(),
            ));
            self.servers.insert(port, (service.clone(), task));
        }
    }
}

impl Drop for ServiceHealthServers {
    fn drop(&mut self) {
        for (_, task) in self.servers.values() {
            task.abort();
        }
    }
}

fn bind(port: u16) -> std::io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

async fn serve(
    listener: TcpListener,
    service: ServiceName,
    node_name: Option<String>,
    state: watch::Receiver<Arc<DesiredState>>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let count = local_endpoints(&state.borrow(), &service, node_name.as_deref());
                tokio::spawn(answer(stream, service.clone(), count));
            }
            Err(error) => tracing::warn!(%service, "health check server: accept failed: {error}"),
        }
    }
}

/// The ready endpoints of `service` on this node, each address once (kube-proxy's count).
fn local_endpoints(state: &DesiredState, service: &ServiceName, node_name: Option<&str>) -> usize {
    let Some(service) = state.services.get(service) else {
        return 0;
    };
    service
        .ports
        .iter()
        .flat_map(|port| &port.endpoints)
        .filter(|endpoint| {
            endpoint.ready && node_name.is_some() && endpoint.node_name.as_deref() == node_name
        })
        .map(|endpoint| endpoint.address)
        .collect::<BTreeSet<_>>()
        .len()
}

/// kube-proxy's answer (pkg/proxy/healthcheck/service_health.go), to any request.
fn response(service: &ServiceName, count: usize) -> String {
    let status = if count > 0 {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    let body = serde_json::json!({
        "service": {"namespace": service.namespace, "name": service.name},
        "localEndpoints": count,
        "serviceProxyHealthy": true,
    })
    .to_string();
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n\
         X-Load-Balancing-Endpoint-Weight: {count}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn answer(mut stream: TcpStream, service: ServiceName, count: usize) {
    // Its content does not change the answer, but answering before it is read would reset the
    // connection under a request still arriving.
    crate::health::read_request_line(&mut stream).await;
    // A probe that hung up early needs no answer.
    let _ = stream.write_all(response(&service, count).as_bytes()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_as_kube_proxy_does() {
        let service = ServiceName {
            namespace: "default".into(),
            name: "web".into(),
        };
        let healthy = response(&service, 2);
        assert!(healthy.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(healthy.contains("X-Load-Balancing-Endpoint-Weight: 2\r\n"));
        assert!(healthy.ends_with(
            r#"{"localEndpoints":2,"service":{"name":"web","namespace":"default"},"serviceProxyHealthy":true}"#
        ));
        assert!(response(&service, 0).starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
    }
}
