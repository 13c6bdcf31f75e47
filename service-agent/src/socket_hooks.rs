//! The node's own processes (`curl <ClusterIP>`, `curl 127.0.0.1:<nodePort>` on the node) never
//! cross a pod link, so the TC programs cannot translate their traffic: the cgroup sock_addr
//! programs ([`SOCKET_PROGRAMS`]) attached to `--cgroup` translate their sockets instead. Every
//! process in that cgroup and its descendants is covered; the programs themselves skip sockets
//! of other network namespaces.

use std::{
    fs::File,
    mem,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{CgroupAttachMode, cgroup_sock_addr::CgroupSockAddrLinkId};

use crate::dataplane::{Dataplane, SOCKET_PROGRAMS};

/// The socket programs attached to one cgroup.
pub struct SocketHooks {
    cgroup: PathBuf,
    links: Vec<(&'static str, CgroupSockAddrLinkId)>,
}

impl SocketHooks {
    /// Attaches every socket program to the cgroup v2 directory `cgroup`. Programs that others
    /// (a CNI, systemd, another agent) attached there keep running alongside.
    pub fn attach(dataplane: &mut Dataplane, cgroup: &Path) -> Result<Self> {
        let directory = open_cgroup_v2(cgroup)?;
        let mut hooks = Self {
            cgroup: cgroup.to_owned(),
            links: Vec::new(),
        };
        for name in SOCKET_PROGRAMS {
            let attached = dataplane
                .socket_program(name)
                // aya attaches through a bpf_link (kernel >= 5.7), which the kernel always adds
                // as one of several programs on the hook (BPF_F_ALLOW_MULTI) and which refuses
                // any mode flag (EINVAL): the default mode passes none.
                .attach(&directory, CgroupAttachMode::default())
                .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()));
            match attached {
                Ok(link) => hooks.links.push((name, link)),
                Err(err) => {
                    // All or nothing: half the hooks would translate connects whose replies
                    // nobody translates back.
                    hooks.detach(dataplane);
                    return Err(err);
                }
            }
        }
        tracing::info!(cgroup = %cgroup.display(), "socket programs attached");
        Ok(hooks)
    }

    pub fn detach(self, dataplane: &mut Dataplane) {
        for (name, link) in self.links {
            if let Err(err) = dataplane.socket_program(name).detach(link) {
                tracing::warn!(program = name, cgroup = %self.cgroup.display(), %err, "detach failed");
            }
        }
    }
}

/// Opens `path` if it is a directory of a cgroup v2 hierarchy: the sock_addr hooks exist only
/// there, and the kernel's own error for a v1 or plain directory (EBADF) says nothing useful.
fn open_cgroup_v2(path: &Path) -> Result<File> {
    let directory =
        File::open(path).with_context(|| format!("opening --cgroup {}", path.display()))?;
    // SAFETY: fstatfs fills the zeroed struct for a descriptor `directory` keeps open.
    let mut stat: libc::statfs = unsafe { mem::zeroed() };
    if unsafe { libc::fstatfs(directory.as_raw_fd(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs of --cgroup {}", path.display()));
    }
    let is_dir = directory.metadata().is_ok_and(|meta| meta.is_dir());
    if stat.f_type != libc::CGROUP2_SUPER_MAGIC || !is_dir {
        bail!(
            "--cgroup {} is not a cgroup v2 directory: give the cgroup2 mount (`findmnt -t \
             cgroup2`; usually /sys/fs/cgroup, /sys/fs/cgroup/unified on hybrid systems) or a \
             directory below it",
            path.display()
        );
    }
    Ok(directory)
}
