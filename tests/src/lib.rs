//! Test harness of the Service dataplane: builds a node and its pods out of network namespaces,
//! runs real TCP/UDP servers in the backend pods, starts `service-agent` in the node and sends
//! traffic from client pods, so that the integration tests and the demo exercise the agent exactly
//! as a kubelet-managed node would, without touching the host's own network namespace.
//!
//! Everything a [`topology::Topology`] creates (namespaces, scratch directory), everything an
//! [`agent::Agent`] creates (process, pin directory) and the cgroups of node processes
//! ([`cgroup::TestCgroup`]) are named after one [`unique::RunId`] and removed by `Drop`, on
//! success, on error and on panic alike.

pub mod agent;
pub mod apiserver;
pub mod cgroup;
pub mod client;
pub mod lan;
pub mod manifest;
pub mod netns;
pub mod node_client;
pub mod poll;
pub mod process;
pub mod servers;
pub mod steady_load;
pub mod topology;
pub mod unique;

use std::io::Write;

/// Whether this process may create network namespaces and load BPF programs. Tests call it first
/// and return early when it is false, so that an unprivileged `cargo test` passes (and says why it
/// tested nothing) instead of failing on permissions.
pub fn privileged(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    // Straight to the file descriptor: libtest captures `eprintln!` of passing tests, and a skip
    // must be visible.
    let _ = writeln!(
        std::io::stderr(),
        "skipping {what}: needs root (network namespaces and BPF)"
    );
    false
}
