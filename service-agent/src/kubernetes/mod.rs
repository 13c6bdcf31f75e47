//! The Kubernetes API server as the source of the desired state (`--kubeconfig`,
//! `--in-cluster`): the cluster's own Services and EndpointSlices, watched. The API server has
//! already done the control plane's work (validation, clusterIP and nodePort allocation, the
//! endpoints), so objects are turned into the model directly; only kube-proxy's rules about what
//! a proxy serves apply here.

mod cluster_state;
mod connection;
mod endpoint_slice;
mod service;
mod source;

pub use connection::ApiServer;
pub use source::{KubernetesRefresh, KubernetesSource};
