//! The node's own processes (`curl <ClusterIP>`, `curl 127.0.0.1:<nodePort>` on the node) never
//! cross a pod link, so the TC programs cannot translate their traffic: the cgroup sock_addr
//! programs ([`SOCKET_PROGRAMS`]) attached to `--cgroup` translate their sockets instead. Every
//! process in that cgroup and its descendants is covered; the programs themselves skip sockets
//! of other network namespaces. The attachments are pinned links, as the TC and XDP ones are.

use std::{
    fs::File,
    mem,
    os::{
        fd::{AsFd as _, AsRawFd},
        unix::fs::MetadataExt as _,
    },
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{CgroupAttachMode, links::FdLink};

use crate::dataplane::{
    Dataplane, LinkPins, SOCKET_PROGRAMS,
    links::{BPF_LINK_TYPE_CGROUP, pin_name},
};

/// The pin name of a socket program's attachment: one cgroup per agent.
fn hook_pin_name(program: &str) -> String {
    pin_name(program, "cgroup")
}

/// Attaches every socket program to the cgroup v2 directory `cgroup` as pinned links, adopting
/// those a previous agent pinned there, and removes the pins of hooks attached elsewhere.
/// Programs that others (a CNI, systemd, another agent) attached there keep running alongside.
pub fn attach(dataplane: &mut Dataplane, cgroup: &Path) -> Result<()> {
    let directory = open_cgroup_v2(cgroup)?;
    // A cgroup's id (what the kernel reports for a cgroup link) is its directory's inode.
    let cgroup_id = directory
        .metadata()
        .with_context(|| format!("stat --cgroup {}", cgroup.display()))?
        .ino();
    let pins = dataplane
        .link_pins()
        .context("socket hooks need pinned links")?;
    for name in SOCKET_PROGRAMS {
        let program = dataplane.socket_program(name);
        let program_fd = program.fd()?.try_clone()?;
        let how = pins
            .ensure(
                &hook_pin_name(name),
                BPF_LINK_TYPE_CGROUP,
                cgroup_id,
                program_fd.as_fd(),
                || {
                    // aya attaches through a bpf_link (kernel >= 5.7), which the kernel always
                    // adds as one of several programs on the hook (BPF_F_ALLOW_MULTI) and which
                    // refuses any mode flag (EINVAL): the default mode passes none.
                    let link = program.attach(&directory, CgroupAttachMode::default())?;
                    Ok(FdLink::try_from(program.take_link(link)?)?)
                },
            )
            .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
        tracing::debug!(program = name, how = ?how, "socket program attached");
    }
    tracing::info!(cgroup = %cgroup.display(), "socket programs attached");
    Ok(())
}

/// Without `--cgroup`: removes the socket hooks a previous agent pinned.
pub fn detach_pinned(pins: &LinkPins) -> Result<()> {
    for name in SOCKET_PROGRAMS {
        pins.remove(&hook_pin_name(name))?;
    }
    Ok(())
}

/// Fails with a clear message unless `path` is a cgroup v2 directory: checked before anything
/// is loaded, so that a wrong `--cgroup` changes nothing.
pub fn check_cgroup(path: &Path) -> Result<()> {
    open_cgroup_v2(path).map(drop)
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
