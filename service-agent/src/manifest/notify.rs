//! Wakes the agent as soon as something changes in its manifest paths (inotify), so that a change
//! is applied within milliseconds instead of at the next poll. The poll stays as the safety net:
//! it sees what inotify cannot (paths that do not exist yet, network filesystems, a watch limit
//! reached), and a wake-up that changed nothing costs only a few `stat` calls.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use tokio::io::{Interest, unix::AsyncFd};

/// Events that mean a manifest may have changed. Not IN_CREATE or IN_MODIFY: a file being written
/// in place is read when its writer closes it (IN_CLOSE_WRITE), not half-way through; editors and
/// `kubectl`-style tools that rename a finished file into place give IN_MOVED_TO, and ConfigMap
/// volumes swap a symlink by rename.
const MASK: u32 = libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_DELETE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

pub struct ManifestEvents {
    inotify: AsyncFd<OwnedFd>,
}

impl ManifestEvents {
    /// Watches each path that is a directory, and the directory of each path that is a file (so
    /// that a file replaced by rename is seen). Paths that do not exist yet are left to the poll.
    pub fn watch(paths: &[PathBuf]) -> Result<Self> {
        // SAFETY: inotify_init1 takes no pointers; a non-negative result is a new descriptor that
        // nothing else owns.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("inotify_init1");
        }
        // SAFETY: `fd` is a fresh descriptor owned by nothing else (see above).
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        for path in paths {
            let dir = if path.is_dir() {
                Some(path.as_path())
            } else {
                path.parent().map(|p| {
                    if p.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        p
                    }
                })
            };
            if let Some(dir) = dir.filter(|dir| dir.is_dir()) {
                add_watch(&fd, dir)?;
            }
        }
        // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it until dropped, so the
        // descriptor stays open and the same for the AsyncFd's whole life.
        let inotify = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(io::Error::from)
            .context("registering the inotify descriptor")?;
        Ok(Self { inotify })
    }

    /// Waits until at least one event arrived, and consumes every event queued so far (a burst
    /// of events is one wake-up).
    pub async fn changed(&self) -> Result<()> {
        loop {
            let mut ready = self.inotify.readable().await?;
            let mut buffer = [0u8; 4096];
            let mut drained_any = false;
            loop {
                let fd = ready.get_inner().as_raw_fd();
                // SAFETY: reads at most buffer.len() bytes into a buffer that lives across the call.
                let read = unsafe { libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len()) };
                if read > 0 {
                    drained_any = true;
                    continue;
                }
                let error = io::Error::last_os_error();
                if read < 0 && error.kind() == io::ErrorKind::WouldBlock {
                    ready.clear_ready();
                    break;
                }
                return Err(error).context("reading inotify events");
            }
            if drained_any {
                return Ok(());
            }
        }
    }
}

fn add_watch(fd: &OwnedFd, dir: &Path) -> Result<()> {
    let path = CString::new(dir.as_os_str().as_bytes())
        .with_context(|| format!("{} contains a NUL byte", dir.display()))?;
    // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
    let watch = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), MASK) };
    if watch < 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("cannot watch {} for changes", dir.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{fs, time::Duration};

    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_file_renamed_into_a_watched_directory_wakes_the_watcher() {
        let dir = std::env::temp_dir().join(format!("notify-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let events = ManifestEvents::watch(std::slice::from_ref(&dir)).unwrap();
        let staged = std::env::temp_dir().join(format!("notify-staged-{}", std::process::id()));
        fs::write(&staged, "kind: Service\n").unwrap();
        fs::rename(&staged, dir.join("svc.yaml")).unwrap();
        let woke = tokio::time::timeout(Duration::from_secs(5), events.changed()).await;
        fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(woke, Ok(Ok(()))), "no wake-up: {woke:?}");
    }
}
