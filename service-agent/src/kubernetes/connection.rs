//! How the agent reaches the API server: a kubeconfig file, or the pod's service account.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

#[derive(Clone, Debug)]
pub enum ApiServer {
    /// `--kubeconfig PATH`: its current context.
    Kubeconfig(PathBuf),
    /// `--in-cluster`: the token and CA under /var/run/secrets/kubernetes.io/serviceaccount,
    /// and the API server at `server` (`--api-server`) or else at KUBERNETES_SERVICE_HOST/PORT.
    InCluster { server: Option<String> },
}

impl ApiServer {
    /// A client for the API server. Nothing is sent yet: an unreachable server shows up in the
    /// watches, which retry, not here.
    pub async fn client(&self) -> Result<Client> {
        let config = match self {
            ApiServer::Kubeconfig(path) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
                Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .with_context(|| format!("using the kubeconfig {}", path.display()))?
            }
            ApiServer::InCluster { server: None } => Config::incluster()
                .context("--in-cluster: reading the service account's token and CA")?,
            // The kubelet sets KUBERNETES_SERVICE_HOST to the `kubernetes` Service's ClusterIP,
            // which only a running proxy translates: on a node whose proxy is this agent, the
            // API server's own address is what works before the first sync.
            ApiServer::InCluster {
                server: Some(server),
            } => {
                let mut config = Config::incluster_dns()
                    .context("--in-cluster: reading the service account's token and CA")?;
                config.cluster_url = server
                    .parse()
                    .with_context(|| format!("--api-server {server:?} is not a URL"))?;
                config
            }
        };
        tracing::info!(api_server = %config.cluster_url, "Kubernetes API server");
        Client::try_from(config).context("building the Kubernetes client")
    }
}
