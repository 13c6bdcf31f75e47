//! cgroup v2 directories of one test run, for the processes the agent's socket programs must
//! see: the programs attach to such a directory, never to the root, since every test runs in
//! parallel with others whose own sockets must not be translated.

use std::{
    fs::{self, OpenOptions},
    io::{self, ErrorKind},
    mem,
    os::unix::{ffi::OsStrExt, io::AsRawFd, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::unique::RunId;

/// Where cgroup v2 may be mounted: the unified layout, then the hybrid one (systemd's, and this
/// machine's, where /sys/fs/cgroup holds the v1 hierarchies).
const CGROUP2_CANDIDATES: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];
/// How long the processes of a removed cgroup may take to die after `cgroup.kill`.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The cgroup v2 mount point.
pub fn root() -> Result<PathBuf> {
    CGROUP2_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|path| is_cgroup2(path))
        .with_context(|| format!("no cgroup v2 hierarchy at any of {CGROUP2_CANDIDATES:?}"))
}

fn is_cgroup2(path: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct; `path` is a valid C string.
    let mut stat: libc::statfs = unsafe { mem::zeroed() };
    (unsafe { libc::statfs(path.as_ptr(), &mut stat) } == 0)
        && stat.f_type == libc::CGROUP2_SUPER_MAGIC
}

/// A cgroup directory removed on drop, with whatever still runs in it killed first.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// Creates the run's cgroup for `role` (unique within the run).
    pub fn create(run: &RunId, role: &str) -> Result<Self> {
        let path = root()?.join(run.cgroup_name(role));
        fs::create_dir(&path)
            .with_context(|| format!("cannot create cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `command`'s process join this cgroup before it runs anything, so that the agent's
    /// socket programs see its very first socket.
    pub fn join_before_exec(&self, command: &mut Command) -> Result<()> {
        let procs_path = self.path.join("cgroup.procs");
        // `cgroup.procs`, open for writing: a process that writes "0" to it joins the cgroup.
        let procs = OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .with_context(|| format!("cannot open {}", procs_path.display()))?;
        // SAFETY: runs in the forked child before exec and makes one async-signal-safe system
        // call on a descriptor the closure owns.
        unsafe {
            command.pre_exec(move || {
                // "0" is the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(error) = remove(&self.path) {
            eprintln!("warning: {error:#}");
        }
    }
}

/// Kills the processes of the cgroup `path` and removes it (a cgroup directory is removed with
/// rmdir, once empty: its files are not real files).
pub fn remove(path: &Path) -> Result<()> {
    // cgroup.kill (Linux 5.14) SIGKILLs every process in the cgroup.
    if let Err(error) = fs::write(path.join("cgroup.kill"), "1")
        && error.kind() != ErrorKind::NotFound
    {
        eprintln!(
            "warning: cannot kill the processes of {}: {error}",
            path.display()
        );
    }
    let deadline = Instant::now() + REMOVE_TIMEOUT;
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
            // EBUSY while killed processes are still exiting.
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Err(error) => bail!("cannot remove cgroup {}: {error}", path.display()),
        }
    }
}
