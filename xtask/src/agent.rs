//! The userspace agent: building it, running it, and running the demo against it.

use std::{ffi::OsString, os::unix::process::CommandExt as _, path::PathBuf};

use anyhow::Context as _;

use crate::{
    bootstrap,
    process::{self, command, run_step},
    workspace::{self, Profile},
};

/// The environment variable through which the integration tests and the demo find the agent.
pub const AGENT_BINARY_ENV: &str = "SERVICE_AGENT_BIN";

/// Builds service-agent (its build script compiles and embeds the kernel programs) and returns
/// the binary's absolute path.
pub fn build(profile: Profile) -> anyhow::Result<PathBuf> {
    run_step(
        "build agent",
        command("cargo")
            .current_dir(workspace::root())
            .args(["build", "--package", "service-agent"])
            .args(profile.cargo_flag()),
    )?;
    Ok(workspace::agent_binary(profile))
}

/// Builds the agent and replaces this process with `service-agent run AGENT_ARGS...`, so signals
/// reach the agent directly and its exit code is ours.
pub fn build_and_load(profile: Profile, agent_args: &[OsString]) -> anyhow::Result<()> {
    // Checked first so a non-root user learns it before waiting for a build.
    process::require_root("loading the eBPF programs")?;
    bootstrap::run()?;
    let binary = build(profile)?;
    println!("==> run agent: {} run", binary.display());
    let exec_error = command(&binary).arg("run").args(agent_args).exec();
    Err(exec_error).with_context(|| format!("could not execute {}", binary.display()))
}

/// Runs the integration-tests crate's demo against a freshly built agent.
pub fn demo() -> anyhow::Result<()> {
    bootstrap::run()?;
    let binary = build(Profile::Dev)?;
    run_step(
        "demo",
        command("cargo")
            .current_dir(workspace::root())
            .args(["run", "--package", "integration-tests", "--bin", "demo"])
            .env(AGENT_BINARY_ENV, binary),
    )
}

/// Runs the benchmark against a freshly built agent: the release build for real figures, the
/// debug build (which the test suite has just built) for the smoke run.
pub fn bench(quick: bool, bench_args: &[OsString]) -> anyhow::Result<()> {
    process::require_root("the benchmark")?;
    bootstrap::run()?;
    let profile = if quick {
        Profile::Dev
    } else {
        Profile::Release
    };
    let binary = build(profile)?;
    run_step(
        "bench",
        command("cargo")
            .current_dir(workspace::root())
            .args(["run", "--package", "integration-tests", "--bin", "bench"])
            .args(profile.cargo_flag())
            .arg("--")
            .args(quick.then_some("--quick"))
            .args(bench_args)
            .env(AGENT_BINARY_ENV, binary),
    )
}
