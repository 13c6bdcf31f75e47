//! Compiles `service-ebpf` for the BPF target (nightly, build-std) and leaves the object in OUT_DIR,
//! where `dataplane.rs` embeds it. `AYA_BUILD_SKIP=1` skips that (clippy, docs, unit tests of the
//! pure modules) and embeds an empty object instead, which fails at load time with a clear error.

use std::{env, fs, path::PathBuf};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../service-ebpf").canonicalize()?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    println!("cargo:rerun-if-changed=../service-common/src");

    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        fs::write(out_dir.join("service-ebpf"), b"").context("writing the placeholder object")?;
    }
    // aya-build runs `cargo build --package service-ebpf` in the current directory; the kernel
    // crate is its own workspace root (excluded from ours), so run it from there.
    env::set_current_dir(&ebpf_dir)?;
    let package = aya_build::Package {
        name: "service-ebpf",
        root_dir: ebpf_dir.to_str().context("non-UTF-8 path")?,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
