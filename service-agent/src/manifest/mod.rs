//! Kubernetes YAML manifests (files or directories of them) as the source of the desired state,
//! for nodes without an API server to watch, and for `service-agent check`.

mod files;
mod notify;
mod parse;
mod settle;
mod watch;

pub use notify::ManifestEvents;
pub use watch::{ManifestSource, Refresh, check};
