//! The files in `--state-dir` where the agent keeps what the API server would keep in Service
//! objects (allocated cluster IPs and nodePorts), so that they survive an agent restart.

use std::{
    fs,
    io::{ErrorKind, Write},
    path::{Path, PathBuf},
};

use anyhow::Context;

/// The contents of `path`; None when there is no such file yet.
pub fn read_if_present(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(contents) => Ok(Some(contents)),
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

/// A crash mid-write must leave either the old or the new file, never half of one.
pub fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut temporary_path = path.as_os_str().to_owned();
    temporary_path.push(".tmp");
    let temporary_path = PathBuf::from(temporary_path);
    let mut file = fs::File::create(&temporary_path)?;
    file.write_all(contents)?;
    file.sync_all()?;
    fs::rename(&temporary_path, path)
}
