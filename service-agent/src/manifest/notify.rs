//! Wakes the agent as soon as something changes in its manifest paths (inotify), so that a change
//! is applied within milliseconds instead of at the next poll. The poll stays as the safety net:
//! it sees what inotify cannot (paths that do not exist yet, network filesystems, a watch limit
//! reached), and a wake-up that changed nothing costs only a few `stat` calls. The events also
//! tell which files their writers finished, so that a `ManifestSource` uses those versions at
//! once instead of waiting for them to settle.

use std::{
    collections::HashMap,
    ffi::{CString, OsStr},
    io, mem,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use tokio::io::{Interest, unix::AsyncFd};

use super::{files, settle::Finished};

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

/// A file its writer finished: closed after writing, or renamed into place.
const FINISHED: u32 = libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO;

pub struct ManifestEvents {
    inotify: AsyncFd<OwnedFd>,
    /// The directory of each watch, as the manifest paths name it (so that a file's path
    /// built from an event is the one a scan lists).
    directories: HashMap<i32, PathBuf>,
    /// Where the files seen finished go (see `ManifestSource::watch`); None: wake-ups only.
    finished: Option<Finished>,
}

impl ManifestEvents {
    /// Watches each path that is a directory, and the directory of each path that is a file (so
    /// that a file replaced by rename is seen), recording in `finished` every file whose writer
    /// finished. Paths that do not exist yet are left to the poll.
    pub(super) fn watch_into(paths: &[PathBuf], finished: Option<Finished>) -> Result<Self> {
        // SAFETY: inotify_init1 takes no pointers; a non-negative result is a new descriptor that
        // nothing else owns.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("inotify_init1");
        }
        // SAFETY: `fd` is a fresh descriptor owned by nothing else (see above).
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut directories = HashMap::new();
        for path in paths {
            // Events name files under the directory as the paths do (a file named without a
            // directory lies in the current one).
            let dir = if path.is_dir() {
                path.clone()
            } else {
                path.parent().map(Path::to_owned).unwrap_or_default()
            };
            let watched = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                &dir
            };
            if watched.is_dir() {
                directories.insert(add_watch(&fd, watched)?, dir);
            }
        }
        // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it until dropped, so the
        // descriptor stays open and the same for the AsyncFd's whole life.
        let inotify = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(io::Error::from)
            .context("registering the inotify descriptor")?;
        Ok(Self {
            inotify,
            directories,
            finished,
        })
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
                    self.record_finished(&buffer[..read as usize]);
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

    /// Records the files that `events` (whole `struct inotify_event`s, as read() returns them)
    /// say their writers finished, each with its stamp now.
    fn record_finished(&self, mut events: &[u8]) {
        let Some(finished) = &self.finished else {
            return;
        };
        let header = mem::size_of::<libc::inotify_event>();
        while events.len() >= header {
            // SAFETY: `events` holds at least one header; read_unaligned needs no alignment.
            let event: libc::inotify_event = unsafe {
                events
                    .as_ptr()
                    .cast::<libc::inotify_event>()
                    .read_unaligned()
            };
            let end = (header + event.len as usize).min(events.len());
            // The name is NUL-padded.
            let name = events[header..end].split(|byte| *byte == 0).next();
            events = &events[end..];
            let (Some(name), Some(dir)) = (name, self.directories.get(&event.wd)) else {
                continue;
            };
            if event.mask & FINISHED != 0 && !name.is_empty() {
                let file = dir.join(OsStr::from_bytes(name));
                let stamp = files::stamp(&file);
                finished.lock().expect("never poisoned").insert(file, stamp);
            }
        }
    }
}

/// Watches `dir`, and returns the descriptor its events carry.
fn add_watch(fd: &OwnedFd, dir: &Path) -> Result<i32> {
    let path = CString::new(dir.as_os_str().as_bytes())
        .with_context(|| format!("{} contains a NUL byte", dir.display()))?;
    // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
    let watch = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), MASK) };
    if watch < 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("cannot watch {} for changes", dir.display()));
    }
    Ok(watch)
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
        let events = ManifestEvents::watch_into(std::slice::from_ref(&dir), None).unwrap();
        let staged = std::env::temp_dir().join(format!("notify-staged-{}", std::process::id()));
        fs::write(&staged, "kind: Service\n").unwrap();
        fs::rename(&staged, dir.join("svc.yaml")).unwrap();
        let woke = tokio::time::timeout(Duration::from_secs(5), events.changed()).await;
        fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(woke, Ok(Ok(()))), "no wake-up: {woke:?}");
    }
}
