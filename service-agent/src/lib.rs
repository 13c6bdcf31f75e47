//! The node agent of the Service dataplane: sources -> desired model -> diff -> BPF maps.

pub mod api;
pub mod conntrack_gc;
pub mod controlplane;
pub mod dataplane;
pub mod health;
pub mod interfaces;
pub mod kubernetes;
pub mod manifest;
pub mod model;
pub mod service_health;
pub mod socket_hooks;
pub mod sync;
pub mod xdp;
