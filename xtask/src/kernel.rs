//! The kernel programs (service-ebpf): a crate outside the root workspace, built by the nightly
//! toolchain for the BPF target with `-Z build-std=core`.

use std::{env, path::PathBuf, process::Command};

use crate::{
    process::{command, run_step},
    workspace,
};

const TARGET: &str = "bpfel-unknown-none";

/// Builds the kernel programs as service-agent's build script does (aya-build), and returns the
/// object's path.
pub fn build() -> anyhow::Result<PathBuf> {
    run_step(
        "build eBPF",
        nightly_cargo("build").args(["--release", "--target", TARGET]),
    )?;
    Ok(target_dir()
        .join(TARGET)
        .join("release")
        .join("service-ebpf"))
}

/// `cargo +nightly clippy` for the BPF target, with warnings denied.
pub fn clippy_command() -> Command {
    let mut clippy = nightly_cargo("clippy");
    clippy.args(["--target", TARGET, "--", "-D", "warnings"]);
    clippy
}

/// `cargo +nightly SUBCOMMAND -Z build-std=core` in the kernel crate, with the rustflags aya-build
/// passes, so the programs built here match those the agent embeds.
fn nightly_cargo(subcommand: &str) -> Command {
    let mut cargo = command("cargo");
    cargo
        .current_dir(workspace::ebpf_crate_dir())
        .args(["+nightly", subcommand, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir())
        .env("CARGO_ENCODED_RUSTFLAGS", aya_build_rustflags())
        // As aya-build does: an inherited RUSTC (e.g. from an outer cargo) would replace the
        // nightly compiler, and a workspace wrapper is meant for the host build.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    cargo
}

/// Named explicitly so the object is where `build` says, whatever `CARGO_TARGET_DIR` holds.
fn target_dir() -> PathBuf {
    workspace::ebpf_crate_dir().join("target")
}

/// aya-build's flags: the host architecture as `bpf_target_arch` (aya-ebpf reads it to pick
/// per-architecture definitions), full debug info, and BTF from bpf-linker. Separated by 0x1f,
/// the `CARGO_ENCODED_RUSTFLAGS` separator.
fn aya_build_rustflags() -> String {
    [
        format!("--cfg=bpf_target_arch=\"{}\"", env::consts::ARCH),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
    ]
    .join("\x1f")
}
