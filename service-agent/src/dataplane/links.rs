//! The program attachments, pinned: every TCX, XDP and cgroup link the agent makes is pinned
//! under `<pin-dir>/links/`, so that the programs keep running when the agent exits for any
//! reason (SIGKILL, OOM, panic, an upgrade), as Cilium pins its links. A starting agent adopts a
//! pinned link by pointing it at its own newly loaded program (`BPF_LINK_UPDATE`: one atomic
//! swap, the link never detaches); removing the pin detaches the link.
//!
//! aya 0.14 attaches and pins links, and can reopen a pinned one, but tells neither what a link
//! is attached to (the interface index or cgroup id this module compares) nor updates a cgroup
//! link: `BPF_OBJ_GET`, `BPF_OBJ_GET_INFO_BY_FD`, `BPF_LINK_UPDATE` and `BPF_LINK_DETACH` are
//! made here directly, as `batch.rs` does for the batch commands.

use std::{
    collections::BTreeSet,
    ffi::CString,
    fs, io, mem,
    os::{
        fd::{AsFd as _, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::programs::{links::FdLink, loaded_programs};

use super::{pins::entries_if_any, syscall::bpf};

/// `enum bpf_cmd` values from the kernel's uapi/linux/bpf.h.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `enum bpf_link_type` values.
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;
pub const BPF_LINK_TYPE_XDP: u32 = 6;
pub const BPF_LINK_TYPE_TCX: u32 = 11;

/// The directory under the pin root that holds the links: outside the layout directories,
/// because a link outlives a change of map layout (the new programs are swapped into it).
pub const LINKS_DIR: &str = "links";

/// What the kernel says about a pinned link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// `BPF_LINK_TYPE_*`.
    pub link_type: u32,
    /// The program it runs.
    pub program_id: u32,
    /// What it is attached to: the interface index for TCX and XDP links (0 once the interface
    /// is gone: the kernel detached it), the cgroup id for cgroup links.
    pub target: u64,
}

/// The pinned links of one pin root, each named after its program and what it is attached to
/// (`pod_ingress@lxc1a2b`, `external_xdp-native@eth0`, `sock_connect4@cgroup`).
#[derive(Clone, Debug)]
pub struct LinkPins {
    dir: PathBuf,
}

impl LinkPins {
    pub fn new(pin_root: &Path) -> Self {
        Self {
            dir: pin_root.join(LINKS_DIR),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Removes the pinned links whose names start with `prefix` and are not `kept`: the
    /// attachments a previous agent made that this one does not want (an interface that no
    /// longer matches, or was deleted while no agent ran; another XDP mode).
    pub fn remove_unwanted(&self, prefix: &str, kept: impl Fn(&str) -> bool) -> Result<()> {
        for name in self.names_with_prefix(prefix)? {
            if !kept(&name) {
                self.remove(&name)?;
                tracing::info!(link = %name, "pinned link no longer wanted: removed");
            }
        }
        Ok(())
    }

    /// The names of the pinned links whose names start with `prefix`.
    fn names_with_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in entries_if_any(&self.dir)?.unwrap_or_default() {
            if let Some(name) = entry.file_name().to_str()
                && name.starts_with(prefix)
            {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// The pinned link `name` and what it is attached to, if it is pinned.
    pub fn info(&self, name: &str) -> Result<Option<LinkInfo>> {
        let Some(link) = open_pinned(&self.path(name))? else {
            return Ok(None);
        };
        link_info(link.as_fd())
            .map(Some)
            .with_context(|| format!("reading the link pinned at {}", self.path(name).display()))
    }

    /// Pins a link aya just made: from now on it outlives the agent.
    pub fn pin(&self, name: &str, link: FdLink) -> Result<()> {
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let path = self.path(name);
        link.pin(&path)
            .with_context(|| format!("pinning a link at {}", path.display()))?;
        Ok(())
    }

    /// Makes the pinned link `name` run `program` on `target` (an interface index, or a cgroup
    /// id): a link pinned there of type `link_type` and attached to `target` gets the program
    /// swapped in. Otherwise (nothing pinned, one attached elsewhere or to an interface deleted
    /// since: target 0, or a swap the kernel refused) `attach` makes a new link, which replaces
    /// the pinned one. A new link is attached before the old one goes wherever the hook runs
    /// several programs (TCX, cgroups: for a moment both translate, and a packet the first
    /// translated is no longer for a service when the second sees it), so the hook is never
    /// left empty; XDP runs one program per interface, so there the old link goes first, and
    /// for that moment TC, which stays attached behind it, does all the work.
    pub fn ensure(
        &self,
        name: &str,
        link_type: u32,
        target: u64,
        program: BorrowedFd<'_>,
        attach: impl FnOnce() -> Result<FdLink>,
    ) -> Result<Attached> {
        let path = self.path(name);
        let link = open_pinned(&path)?;
        let pinned = (link.as_ref())
            .map(|link| link_info(link.as_fd()))
            .transpose()
            .with_context(|| format!("reading the link pinned at {}", path.display()))?;
        if let (Some(link), Some(info)) = (&link, pinned)
            && info.link_type == link_type
            && info.target == target
        {
            // One atomic swap: packets see the old program or the new one, and the link is
            // never detached in between.
            match link_update(link.as_fd(), program) {
                Ok(()) => return Ok(Attached::Adopted),
                Err(err) => tracing::warn!(
                    link = name,
                    "swapping the program of {}: {err}; attaching a new link instead",
                    path.display()
                ),
            }
        }
        drop(link);
        if pinned.is_none() {
            self.pin(name, attach()?)?;
            return Ok(Attached::New);
        }
        tracing::info!(link = name, ?pinned, "pinned link not reusable: replaced");
        if link_type == BPF_LINK_TYPE_XDP {
            self.remove(name)?;
            self.pin(name, attach()?)?;
        } else {
            let incoming = format!("{name}~new");
            self.remove(&incoming)?;
            self.pin(&incoming, attach()?)?;
            self.remove(name)?;
            fs::rename(self.path(&incoming), self.path(name))
                .with_context(|| format!("renaming the pin {incoming} to {name}"))?;
        }
        Ok(Attached::New)
    }

    /// The ids of the maps that the programs of the pinned links use: which layout serves the
    /// node now. Empty when no link is pinned (or the kernel will not say).
    pub fn serving_map_ids(&self) -> BTreeSet<u32> {
        let programs: BTreeSet<u32> = (self.names_with_prefix("").unwrap_or_default().iter())
            .filter_map(|name| self.info(name).ok().flatten())
            .map(|info| info.program_id)
            .collect();
        if programs.is_empty() {
            return BTreeSet::new();
        }
        loaded_programs()
            .filter_map(Result::ok)
            .filter(|program| programs.contains(&program.id()))
            .filter_map(|program| program.map_ids().ok().flatten())
            .flatten()
            .collect()
    }

    /// Detaches the link `name` and removes its pin. Nothing to do if it is not pinned.
    pub fn remove(&self, name: &str) -> Result<()> {
        remove_link_pin(&self.path(name))
    }
}

/// Detaches the link pinned at `path` (even if some other process still holds it open) and
/// removes the pin.
pub fn remove_link_pin(path: &Path) -> Result<()> {
    if let Some(link) = open_pinned(path)? {
        // A link whose target is gone (its interface was deleted) is already detached.
        let _ = link_detach(link.as_fd());
    }
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("removing the pin {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// The pin name of one attachment: `<program>@<target>`. bpffs refuses names with a dot
/// (reserved for its own files), which interface names may have (`eth0.100`): dots are written
/// `%2E`, and `%` itself `%25`, so that two names never share a pin.
pub fn pin_name(program: &str, target: &str) -> String {
    let escape = |text: &str| text.replace('%', "%25").replace('.', "%2E");
    format!("{}@{}", escape(program), escape(target))
}

/// How [`LinkPins::ensure`] made an attachment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A pinned link was already attached there: it now runs this agent's program.
    Adopted,
    /// A new link, now pinned.
    New,
}

/// The `obj` member of `union bpf_attr` (BPF_OBJ_GET). The kernel rejects an attribute whose
/// bytes past the member are not zero: the padding is an explicit field.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// The `info` member of `union bpf_attr` (BPF_OBJ_GET_INFO_BY_FD).
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The `link_update` member of `union bpf_attr`.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// The `link_detach` member of `union bpf_attr`.
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// `struct bpf_link_info` up to the union's members used here: type, id, prog_id, then (at
/// offset 16, 8-aligned) `xdp.ifindex` / `tcx.ifindex` (u32) or `cgroup.cgroup_id` (u64). The
/// buffer is larger than the kernel needs: it writes its own size and the rest stays zero.
#[repr(C, align(8))]
struct RawLinkInfo([u8; 128]);

/// Opens the object pinned at `path`; None when nothing is pinned there.
fn open_pinned(path: &Path) -> Result<Option<OwnedFd>> {
    let name = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("a pin path with a NUL byte: {}", path.display()))?;
    let mut attr = ObjAttr {
        pathname: name.as_ptr() as u64,
        ..ObjAttr::default()
    };
    // SAFETY: an `obj` attribute with its padding zeroed; `name` outlives the call.
    match unsafe { bpf(BPF_OBJ_GET, &mut attr) } {
        // SAFETY: BPF_OBJ_GET returned a new descriptor, owned from here on.
        Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("opening the pin {}", path.display())),
    }
}

fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut info = RawLinkInfo([0; 128]);
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: mem::size_of::<RawLinkInfo>() as u32,
        info: info.0.as_mut_ptr() as u64,
    };
    // SAFETY: an `info` attribute; the kernel writes at most `info_len` bytes into `info`.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    let word = |at: usize| u32::from_ne_bytes(info.0[at..at + 4].try_into().expect("4 bytes"));
    let link_type = word(0);
    let target = if link_type == BPF_LINK_TYPE_CGROUP {
        u64::from_ne_bytes(info.0[16..24].try_into().expect("8 bytes"))
    } else {
        u64::from(word(16))
    };
    Ok(LinkInfo {
        link_type,
        program_id: word(8),
        target,
    })
}

fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: a `link_update` attribute, no pointers.
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    // SAFETY: a `link_detach` attribute, no pointers.
    unsafe { bpf(BPF_LINK_DETACH, &mut attr) }.map(drop)
}

#[cfg(test)]
mod tests {
    use super::pin_name;

    #[test]
    fn pin_names_have_no_dot_and_never_collide() {
        assert_eq!(pin_name("pod_ingress", "lxc0"), "pod_ingress@lxc0");
        assert_eq!(
            pin_name("external_xdp-native", "eth0.100"),
            "external_xdp-native@eth0%2E100"
        );
        assert_ne!(pin_name("p", "a.b"), pin_name("p", "a%2Eb"));
        assert!(!pin_name("p", "a.b.c").contains('.'));
    }
}
