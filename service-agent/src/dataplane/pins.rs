//! The pin root (`--pin-dir`): what lives there, making sure it is on bpffs, and removing all
//! of it (`service-agent cleanup`).
//!
//! ```text
//! <pin-dir>/
//!   v6/                  the maps, one directory per layout (see `layout`)
//!     SERVICES_V4 ...
//!   links/               the program attachments (see `links`), kept across layouts
//!     pod_ingress@lxc1a2b ...
//! ```

use std::{
    ffi::CString,
    fs, io, mem,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use super::links::{LINKS_DIR, remove_link_pin};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where systemd (and the host of a DaemonSet) mounts bpffs.
const SYS_FS_BPF: &str = "/sys/fs/bpf";

/// Whether `name` is a layout directory's name: `v<digits>`, optionally followed by `-<sizes>`.
pub fn is_layout_name(name: &str) -> bool {
    let version = name.split('-').next().unwrap_or_default();
    version.len() > 1
        && version.starts_with('v')
        && version[1..].bytes().all(|byte| byte.is_ascii_digit())
}

/// The layout directories under `root` other than `current`, newest first.
pub fn other_layouts(root: &Path, current: &str) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(root) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("listing {}", root.display())),
    };
    let mut layouts = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", root.display()))?;
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
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
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
    let links = root.join(LINKS_DIR);
    match fs::read_dir(&links) {
        Ok(entries) => {
            for entry in entries {
                let path = entry
                    .with_context(|| format!("listing {}", links.display()))?
                    .path();
                remove_link_pin(&path)?;
                removed.links += 1;
            }
            fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("listing {}", links.display())),
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

/// Makes sure `root` lies on a bpffs, where pins outlive the agent. If the nearest existing
/// directory on its path is not on one, bpffs is mounted (at /sys/fs/bpf when `root` is below
/// it, as systemd would have, else at `root` itself), as Cilium does, but only in the host's
/// mount namespace: a bpffs mounted in a private one (`ip netns exec` makes one, and remounts
/// /sys) vanishes with it, and the pins and the datapath with them.
pub fn ensure_bpffs(root: &Path) -> Result<()> {
    let existing = root
        .ancestors()
        .find(|path| path.exists())
        .unwrap_or(Path::new("/"));
    if filesystem_type(existing)? == BPF_FS_MAGIC {
        return Ok(());
    }
    let mount_point = if root.starts_with(SYS_FS_BPF) {
        PathBuf::from(SYS_FS_BPF)
    } else {
        root.to_owned()
    };
    if !in_host_mount_namespace()? {
        bail!(
            "--pin-dir {}: {} is not on bpffs in this mount namespace, which is not the host's \
             (`ip netns exec` makes a private one and remounts /sys, hiding the host's \
             /sys/fs/bpf). Pins made here would vanish with it and take the datapath along: run \
             the agent in the host's mount namespace (`nsenter --net=/run/netns/NAME \
             service-agent run ...` enters only the network namespace), or mount the host's \
             bpffs at {}",
            root.display(),
            existing.display(),
            mount_point.display()
        );
    }
    fs::create_dir_all(&mount_point)
        .with_context(|| format!("creating the bpffs mount point {}", mount_point.display()))?;
    mount_bpffs(&mount_point)?;
    tracing::info!(mount_point = %mount_point.display(), "bpffs was not mounted: mounted it");
    Ok(())
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

/// Whether this process shares the mount namespace of PID 1 (the host's, or on a DaemonSet the
/// container's, whose /sys/fs/bpf is the host's bpffs mounted in). When PID 1's cannot be read
/// (some sandboxes deny it), the answer is no: refusing with an explanation beats pins that
/// vanish.
fn in_host_mount_namespace() -> Result<bool> {
    let own = fs::read_link("/proc/self/ns/mnt").context("reading /proc/self/ns/mnt")?;
    Ok(fs::read_link("/proc/1/ns/mnt").is_ok_and(|init| init == own))
}

fn mount_bpffs(at: &Path) -> Result<()> {
    let target = CString::new(at.as_os_str().as_bytes())
        .with_context(|| format!("a path with a NUL byte: {}", at.display()))?;
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let mounted = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if mounted != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("mounting bpffs at {}", at.display()));
    }
    Ok(())
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
