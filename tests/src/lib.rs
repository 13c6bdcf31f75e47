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

/// Whether this process may create network namespaces and load BPF programs: the demo and the
/// benchmark say so and exit non-zero when it may not.
pub fn privileged(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    eprintln!("{what} needs root (network namespaces and BPF)");
    false
}

/// Tests call it first: a test that cannot run where it is fails, saying why, rather than pass
/// having tested nothing.
pub fn require_root(test: &str) {
    assert!(
        privileged(test),
        "{test} needs root (network namespaces and BPF): run `cargo xtask test` as root"
    );
}
