//! Idempotent set-up of a Debian 12 machine: installs only what is missing and says, one line per
//! requirement, what it found or did.

use anyhow::{Context as _, bail};

use crate::process::{self, command, probe_output, run_step};

/// Debian packages the build and the tests need.
const DEBIAN_PACKAGES: &[&str] = &[
    // LLVM 22 (the nightly's LLVM) and the libraries it links, to build bpf-linker.
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // Network namespaces, veth pairs and process inspection for the integration tests.
    "iproute2",
    "procps",
    // Link offloads for the XDP tests: a veth peer needs GRO on (NAPI) to take XDP frames.
    "ethtool",
    // Backends and load generator for the benchmarks (and the iptables/nftables baselines).
    "iptables",
    "nftables",
    "nginx-light",
    "wrk",
    // Flushing netfilter's conntrack table between benchmark runs.
    "conntrack",
    // The font the benchmark chart is drawn with.
    "fonts-dejavu-core",
];

/// Where bpf-linker finds LLVM 22: without it, it looks in /usr and fails to link.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Pinned so a fresh machine gets the release known to build against LLVM 22 (its default feature
/// wants LLVM 23, which Debian 12 lacks).
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> anyhow::Result<()> {
    ensure_nightly_rust_src()?;
    ensure_debian_packages()?;
    ensure_bpf_linker()
}

/// `-Z build-std=core` compiles core for the BPF target from the nightly's sources.
fn ensure_nightly_rust_src() -> anyhow::Result<()> {
    let installed = probe_output(command("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("`rustup component list --toolchain nightly` failed: is rustup installed, with a `nightly` toolchain?")?;
    if installed
        .lines()
        .any(|component| component.trim() == "rust-src")
    {
        println!("bootstrap: rust-src for nightly: found");
        return Ok(());
    }
    println!("bootstrap: rust-src for nightly: missing, installing");
    run_step(
        "install rust-src",
        command("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
    )
}

fn ensure_debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|package| !is_debian_package_installed(package))
        .collect();
    if missing.is_empty() {
        println!(
            "bootstrap: Debian packages: all {} found",
            DEBIAN_PACKAGES.len()
        );
        return Ok(());
    }
    println!(
        "bootstrap: Debian packages: missing {}, installing",
        missing.join(" ")
    );
    process::require_root("installing Debian packages")?;
    run_step(
        "apt-get update",
        command("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    run_step(
        "apt-get install",
        command("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn is_debian_package_installed(package: &str) -> bool {
    probe_output(command("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| status.trim() == "install ok installed")
}

/// The nightly cargo links the kernel programs with bpf-linker, found through PATH (which
/// `process::command` extends with cargo's bin directory).
fn ensure_bpf_linker() -> anyhow::Result<()> {
    if let Some(version) = bpf_linker_version() {
        println!("bootstrap: bpf-linker: found {version}");
        return Ok(());
    }
    println!(
        "bootstrap: bpf-linker: missing, installing {BPF_LINKER_VERSION} into {} (takes a few minutes)",
        process::cargo_bin_dir().display()
    );
    run_step(
        "install bpf-linker",
        command("cargo")
            .args(["install", "bpf-linker", "--locked", "--version"])
            .arg(BPF_LINKER_VERSION)
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )?;
    match bpf_linker_version() {
        Some(version) => {
            println!("bootstrap: bpf-linker: installed {version}");
            Ok(())
        }
        None => bail!("bpf-linker was installed but `bpf-linker --version` still fails"),
    }
}

fn bpf_linker_version() -> Option<String> {
    probe_output(command("bpf-linker").arg("--version")).map(|version| version.trim().to_owned())
}
