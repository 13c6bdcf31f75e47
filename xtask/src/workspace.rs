//! Where things are in the workspace.

use std::{
    env,
    path::{Path, PathBuf},
};

/// The cargo profile a binary is built with, which also decides its directory under `target/`.
#[derive(Clone, Copy)]
pub enum Profile {
    Dev,
    Release,
}

impl Profile {
    pub fn from_release_flag(release: bool) -> Self {
        if release { Self::Release } else { Self::Dev }
    }

    /// The flag that selects this profile on a cargo command line, if any.
    pub fn cargo_flag(self) -> Option<&'static str> {
        match self {
            Self::Dev => None,
            Self::Release => Some("--release"),
        }
    }

    fn target_subdir(self) -> &'static str {
        match self {
            Self::Dev => "debug",
            Self::Release => "release",
        }
    }
}

/// The workspace root: the parent of this crate's manifest directory.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in a subdirectory of the workspace")
}

/// The kernel programs' crate, which is its own workspace (excluded from the root one).
pub fn ebpf_crate_dir() -> PathBuf {
    root().join("service-ebpf")
}

/// The absolute path of the agent binary that `cargo build -p service-agent` produces.
pub fn agent_binary(profile: Profile) -> PathBuf {
    target_dir()
        .join(profile.target_subdir())
        .join("service-agent")
}

/// Cargo's target directory for the root workspace, honouring `CARGO_TARGET_DIR`.
fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        // A relative CARGO_TARGET_DIR is relative to where cargo runs, which is the root here.
        Some(dir) => root().join(dir),
        None => root().join("target"),
    }
}
