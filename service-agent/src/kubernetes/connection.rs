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
    /// `--in-cluster`: KUBERNETES_SERVICE_HOST/PORT, the token and CA under
    /// /var/run/secrets/kubernetes.io/serviceaccount.
    InCluster,
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
            ApiServer::InCluster => Config::incluster()
                .context("--in-cluster: reading the service account's token and CA")?,
        };
        tracing::info!(api_server = %config.cluster_url, "Kubernetes API server");
        Client::try_from(config).context("building the Kubernetes client")
    }
}
