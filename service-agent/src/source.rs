//! Where `service-agent run` gets its desired state: manifest files, or the Kubernetes API
//! server. Both hand the run loop the same `DesiredState`, which one syncer programs.

use anyhow::Result;
use service_agent::{
    controlplane::ControlPlaneConfig,
    kubernetes::{ApiServer, KubernetesSource},
    manifest::{ManifestEvents, ManifestSource},
    model::DesiredState,
};

use crate::RunArgs;

pub enum Source {
    Manifests {
        source: ManifestSource,
        /// inotify on the manifest paths; None when it could not be set up (polling only).
        events: Option<ManifestEvents>,
    },
    Kubernetes(KubernetesSource),
}

/// A new desired state, and what the user should fix.
pub struct Refresh {
    pub state: DesiredState,
    pub problems: usize,
}

impl Source {
    pub async fn new(args: &RunArgs) -> Result<Self> {
        // clap lets at most one of --kubeconfig, --in-cluster and --manifests through.
        let api_server = match &args.kubeconfig {
            Some(path) => Some(ApiServer::Kubeconfig(path.clone())),
            None => args.in_cluster.then(|| ApiServer::InCluster {
                server: args.api_server.clone(),
            }),
        };
        if let Some(api_server) = api_server {
            let client = api_server.client().await?;
            return Ok(Source::Kubernetes(KubernetesSource::new(
                &client,
                args.service_proxy_name.clone(),
            )));
        }
        let source = ManifestSource::new(
            args.manifests.clone(),
            ControlPlaneConfig {
                service_cidr: args.service_cidr.clone(),
                state_dir: Some(args.state_dir.clone()),
                node_port_range: args.node_port_range,
            },
        )?;
        let events = source
            .watch()
            .inspect_err(|err| tracing::warn!("{err:#}; changes are seen by polling only"))
            .ok();
        Ok(Source::Manifests { source, events })
    }

    /// Resolves when the source has news: an inotify wake-up, or a burst of watch events. Never
    /// for manifests without inotify (the run loop's poll covers them).
    pub async fn changed(&mut self) -> Result<()> {
        match self {
            Source::Manifests {
                events: Some(events),
                ..
            } => events.changed().await,
            Source::Manifests { events: None, .. } => std::future::pending().await,
            Source::Kubernetes(source) => {
                source.changed().await;
                Ok(())
            }
        }
    }

    /// The desired state when it may have changed since the last call, else None.
    pub fn refresh(&mut self) -> Result<Option<Refresh>> {
        Ok(match self {
            Source::Manifests { source, .. } => source.refresh()?.map(|refresh| Refresh {
                state: refresh.state,
                problems: refresh.problems.len(),
            }),
            Source::Kubernetes(source) => source.refresh().map(|refresh| Refresh {
                state: refresh.state,
                problems: refresh.problems.len(),
            }),
        })
    }
}

/// The node's name when neither --node-name nor NODE_NAME gives it: the hostname, as the kubelet
/// registers the node by default.
pub fn hostname() -> Option<String> {
    let mut name = [0u8; 256];
    // SAFETY: gethostname writes at most `name.len()` bytes into the buffer it is given.
    if unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) } != 0 {
        return None;
    }
    let length = name.iter().position(|&byte| byte == 0)?;
    String::from_utf8(name[..length].to_vec()).ok()
}
