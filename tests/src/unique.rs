//! Names of everything one topology creates on the machine: network namespaces, its scratch
//! directory, the agent's BPF pin directory and the cgroups of node processes all carry the same
//! `<pid>-<counter>` id, so that parallel tests never collide and leftovers of a killed test run
//! can be recognised and removed.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    sync::{
        Once,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::{cgroup, netns};

/// Where the agent's pin directories go: on the BPF filesystem, as in production.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Prefix of network namespace, scratch directory and cgroup names (`sdp-<pid>-<counter>-...`).
const PREFIX: &str = "sdp-";
/// Prefix of pin directory names (`sdp-test-<pid>-<counter>`).
const PIN_PREFIX: &str = "sdp-test-";

/// Identifies one topology of this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunId {
    pid: u32,
    counter: usize,
}

impl RunId {
    /// A fresh id. The first call also removes what killed runs of the harness left behind (a
    /// SIGKILLed test never runs its `Drop`s), so that one crash does not poison later runs.
    pub fn next() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        static SWEEP: Once = Once::new();
        SWEEP.call_once(remove_leftovers_of_dead_runs);
        Self {
            pid: std::process::id(),
            counter: COUNTER.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Name of a network namespace of this run; `role` is unique within the run (`node`, a pod
    /// name).
    pub fn netns_name(&self, role: &str) -> String {
        format!("{PREFIX}{self}-{role}")
    }

    pub fn scratch_dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("{PREFIX}{self}"))
    }

    /// Name of a cgroup of this run, under the cgroup v2 root; `role` is unique within the run.
    pub fn cgroup_name(&self, role: &str) -> String {
        format!("{PREFIX}{self}-{role}")
    }

    pub fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS).join(format!("{PIN_PREFIX}{self}"))
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.pid, self.counter)
    }
}

/// Best effort: a leftover that cannot be removed is reported and skipped, it must not fail the
/// test that happens to start first.
fn remove_leftovers_of_dead_runs() {
    for name in names_of_dead_runs(Path::new(netns::NETNS_DIR), PREFIX) {
        if let Err(error) = netns::delete(&name) {
            eprintln!("warning: leftover network namespace {name}: {error:#}");
        }
    }
    let dirs = [
        (std::env::temp_dir(), PREFIX),
        (PathBuf::from(BPFFS), PIN_PREFIX),
    ];
    for (parent, prefix) in dirs {
        for name in names_of_dead_runs(&parent, prefix) {
            let path = parent.join(name);
            if let Err(error) = fs::remove_dir_all(&path) {
                eprintln!("warning: leftover {}: {error}", path.display());
            }
        }
    }
    // Cgroups are removed with rmdir once their processes are gone, not file by file.
    if let Ok(root) = cgroup::root() {
        for name in names_of_dead_runs(&root, PREFIX) {
            if let Err(error) = cgroup::remove(&root.join(name)) {
                eprintln!("warning: leftover cgroup: {error:#}");
            }
        }
    }
}

/// Entries of `dir` named `<prefix><pid>-...` whose process is gone.
fn names_of_dead_runs(dir: &Path, prefix: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| {
            let Some(pid) = name
                .strip_prefix(prefix)
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                return false;
            };
            !Path::new("/proc").join(pid.to_string()).exists()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_name_everything_alike() {
        let (a, b) = (RunId::next(), RunId::next());
        assert_ne!(a, b);
        let pid = std::process::id();
        assert_eq!(
            a.netns_name("node"),
            format!("sdp-{pid}-{}-node", a.counter)
        );
        assert_eq!(
            a.cgroup_name("clients"),
            format!("sdp-{pid}-{}-clients", a.counter)
        );
        assert_eq!(
            a.pin_dir(),
            PathBuf::from(format!("/sys/fs/bpf/sdp-test-{pid}-{}", a.counter))
        );
    }

    #[test]
    fn only_entries_of_dead_processes_are_leftovers() {
        let dir = std::env::temp_dir().join(format!("leftover-check-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let alive = format!("sdp-{}-0-node", std::process::id());
        // Pids are below 2^22 on Linux: this one cannot be running.
        let dead = "sdp-4294967-3-node";
        for name in [alive.as_str(), dead, "sdp-notapid-1", "unrelated"] {
            fs::create_dir_all(dir.join(name)).unwrap();
        }
        let leftovers = names_of_dead_runs(&dir, PREFIX);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(leftovers, vec![dead.to_string()]);
    }
}
