//! The whole test suite, as CI runs it: each step prints its name and the first failure stops
//! the run with an error naming the step.

use std::ffi::OsString;

use crate::{
    agent::{self, AGENT_BINARY_ENV},
    bootstrap, kernel,
    process::{command, run_step},
    workspace::{self, Profile},
};

pub fn run(cargo_test_args: &[OsString]) -> anyhow::Result<()> {
    bootstrap::run()?;
    let root = workspace::root();

    run_step(
        "fmt",
        command("cargo")
            .current_dir(root)
            .args(["fmt", "--all", "--", "--check"]),
    )?;
    // The kernel crate is outside the root workspace, so `--all` above does not reach it.
    run_step(
        "fmt eBPF",
        command("cargo")
            .current_dir(workspace::ebpf_crate_dir())
            .args(["fmt", "--all", "--", "--check"]),
    )?;
    // AYA_BUILD_SKIP: linting the host crates does not need the kernel programs compiled.
    run_step(
        "clippy",
        command("cargo")
            .current_dir(root)
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .env("AYA_BUILD_SKIP", "1"),
    )?;
    run_step("clippy eBPF", &mut kernel::clippy_command())?;
    let agent_binary = agent::build(Profile::Dev)?;
    run_step(
        "test",
        command("cargo")
            .current_dir(root)
            .args(["test", "--workspace"])
            .args(cargo_test_args)
            .env(AGENT_BINARY_ENV, agent_binary),
    )?;
    // The benchmark's smoke run: every mode must produce figures; nothing is timed against a
    // threshold. Skipped when the caller filtered the tests down to a few.
    if cargo_test_args.is_empty() {
        agent::bench(true, &[])?;
    }
    Ok(())
}
