//! The pin root (`--pin-dir`): what lives there, making sure it is on bpffs, and removing all
//! of it (`service-agent cleanup`).
//!
//! ```text
//! <pin-dir>/
//!   v6/                  the maps, one directory per layout (see `layout`)
//!     SERVICES_V4 ...
//!   incoming-v6-lb.../   a layout being built: renamed to its own name once its maps hold
//!                        what the node serves, and only then do links run programs using it
//!   links/               the program attachments (see `links`), kept across layouts
//!     pod_ingress@lxc1a2b ...
//! ```

use std::{
    ffi::CString,
    fs::{self, File},
    io, mem,
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use super::links::{LINKS_DIR, remove_link_pin};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The prefix of a layout directory being built (see the module's comment).
const INCOMING: &str = "incoming-";

/// Where the layout `name` is built before it serves.
pub fn incoming_dir(root: &Path, name: &str) -> PathBuf {
    root.join(format!("{INCOMING}{name}"))
}

/// Removes the layouts left half-built under `root` (an agent that stopped while building
/// one): no link runs a program that uses their maps, since links are pointed at a layout only
/// once it has its own name.
pub fn remove_incoming(root: &Path) -> Result<()> {
    for entry in entries_if_any(root)?.unwrap_or_default() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with(INCOMING))
        {
            remove_layout(&entry.path())?;
            tracing::info!(layout = %entry.path().display(), "half-built map layout removed");
        }
    }
    Ok(())
}

/// The entries of `dir`; None if it does not exist.
pub(super) fn entries_if_any(dir: &Path) -> Result<Option<Vec<fs::DirEntry>>> {
    let listing = || format!("listing {}", dir.display());
    match fs::read_dir(dir) {
        Ok(entries) => Ok(Some(
            entries.collect::<io::Result<_>>().with_context(listing)?,
        )),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(listing),
    }
}

/// The agent's hold on a pin root: one agent (or `cleanup`) at a time. Two agents on one pin
/// directory would hand out the same backend ids for different backends and undo each other's
/// writes. An advisory lock on the directory (`flock`), released by the kernel when the holder
/// exits, however it exits.
pub struct PinRootLock {
    _directory: File,
}

impl PinRootLock {
    /// Takes the lock, creating `root` if needed; fails at once, saying why, if another process
    /// holds it.
    pub fn acquire(root: &Path) -> Result<Self> {
        fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let directory = File::open(root).with_context(|| format!("opening {}", root.display()))?;
        // SAFETY: flock takes a descriptor `directory` keeps open, and no pointers.
        if unsafe { libc::flock(directory.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock {
                bail!(
                    "another service-agent (or cleanup) is using --pin-dir {}: stop it first \
                     (two agents on one node would undo each other's writes)",
                    root.display()
                );
            }
            return Err(err).with_context(|| format!("locking {}", root.display()));
        }
        Ok(Self {
            _directory: directory,
        })
    }
}
/// Whether `name` is a layout directory's name: `v<digits>`, optionally followed by `-<sizes>`.
pub fn is_layout_name(name: &str) -> bool {
    let version = name.split('-').next().unwrap_or_default();
    version.len() > 1
        && version.starts_with('v')
        && version[1..].bytes().all(|byte| byte.is_ascii_digit())
}

/// The layout directories under `root` other than `current`, newest first.
pub fn other_layouts(root: &Path, current: &str) -> Result<Vec<PathBuf>> {
    let mut layouts = Vec::new();
    for entry in entries_if_any(root)?.unwrap_or_default() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name != current && is_layout_name(name) && entry.path().is_dir() {
            let modified = entry.metadata().and_then(|meta| meta.modified()).ok();
            layouts.push((modified, entry.path()));
        }
    }
    layouts.sort_by_key(|layout| std::cmp::Reverse(layout.0));
    Ok(layouts.into_iter().map(|(_, path)| path).collect())
}

/// Removes a layout directory: its pins, then the directory. The maps themselves go when the
/// last program using them does.
pub fn remove_layout(dir: &Path) -> Result<()> {
    let Some(entries) = entries_if_any(dir)? else {
        return Ok(());
    };
    for entry in entries {
        let path = entry.path();
        fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
    }
    fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub links: usize,
    pub layouts: Vec<String>,
}

/// `service-agent cleanup`: detaches every pinned link and removes every pinned map under
/// `root`, then `root` itself if nothing else is left there. Only what the agent makes is
/// touched: the links directory and layout directories.
pub fn cleanup(root: &Path) -> Result<Removed> {
    let mut removed = Removed::default();
    if !root.exists() {
        return Ok(removed);
    }
    let _lock = PinRootLock::acquire(root)?;
    let links = root.join(LINKS_DIR);
    if let Some(entries) = entries_if_any(&links)? {
        for entry in entries {
            remove_link_pin(&entry.path())?;
            removed.links += 1;
        }
        fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
    }
    for layout in other_layouts(root, "")? {
        remove_layout(&layout)?;
        removed.layouts.push(
            layout
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into(),
        );
    }
    // Only if empty: the root may hold things that are not ours.
    let _ = fs::remove_dir(root);
    Ok(removed)
}

/// Makes sure `root` lies on a bpffs, where pins outlive the agent, or says exactly what to do.
/// The agent does not mount one itself: it cannot tell a bpffs that outlives it from one that
/// does not (in a container without the host's /sys/fs/bpf, or under `ip netns exec`, which
/// makes a private mount namespace with a fresh /sys, a bpffs mounted here would vanish with
/// the container or the command, taking the datapath along).
pub fn ensure_bpffs(root: &Path) -> Result<()> {
    let existing = root
        .ancestors()
        .find(|path| path.exists())
        .unwrap_or(Path::new("/"));
    if filesystem_type(existing)? == BPF_FS_MAGIC {
        return Ok(());
    }
    bail!(
        "--pin-dir {}: {} is not on bpffs, so nothing pinned there would outlive the agent. On \
         the host, mount it where systemd does (`mount -t bpf bpf /sys/fs/bpf`); in a container, \
         mount the host's /sys/fs/bpf (deploy/daemonset.yaml does). Under `ip netns exec`, \
         which remounts /sys and hides the host's bpffs, enter only the network namespace \
         instead: `nsenter --net=/run/netns/NAME service-agent run ...`",
        root.display(),
        existing.display()
    )
}

fn filesystem_type(path: &Path) -> Result<i64> {
    let name = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("a path with a NUL byte: {}", path.display()))?;
    // SAFETY: statfs fills the zeroed struct it is given for a NUL-terminated path.
    let mut stat: libc::statfs = unsafe { mem::zeroed() };
    if unsafe { libc::statfs(name.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(stat.f_type)
}

#[cfg(test)]
mod tests {
    use super::is_layout_name;

    #[test]
    fn layout_names() {
        assert!(is_layout_name("v6"));
        assert!(is_layout_name("v5"));
        assert!(is_layout_name("v6-lb4096-ct8192"));
        assert!(!is_layout_name("links"));
        assert!(!is_layout_name("v"));
        assert!(!is_layout_name("vx"));
        assert!(!is_layout_name("maps.debug"));
    }
}
