//! Developer tasks for the workspace, run as `cargo xtask <command>` (an alias in
//! `.cargo/config.toml`). Everything shells out with `std::process::Command`, so the only
//! dependencies are anyhow and clap.

mod agent;
mod bootstrap;
mod kernel;
mod process;
mod suite;
mod workspace;

use std::{ffi::OsString, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::workspace::Profile;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for the service dataplane"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need on a Debian 12 machine (idempotent; run as root).
    Bootstrap,
    /// Build only the kernel programs (service-ebpf) for bpfel-unknown-none.
    BuildEbpf,
    /// Build the agent, kernel programs included.
    Build {
        /// Build with the release profile instead of the dev profile.
        #[arg(long)]
        release: bool,
    },
    /// Build the agent and run `service-agent run ARGS...` (needs root).
    BuildAndLoad {
        /// Build and run the release binary instead of the debug one.
        #[arg(long)]
        release: bool,
        /// Arguments passed to `service-agent run`, after `--`.
        #[arg(last = true)]
        agent_args: Vec<OsString>,
    },
    /// Build the agent and run the demo from the integration-tests crate.
    Demo,
    /// Benchmark against kube-proxy's iptables and nftables rule shapes and the routing limit;
    /// writes BENCHMARKS.md and benchmarks.png (needs root).
    Bench {
        /// Smoke run: small sizes, short runs, debug build; writes under target/bench-quick/.
        #[arg(long)]
        quick: bool,
        /// Arguments passed to the bench binary, after `--` (see `-- --help`).
        #[arg(last = true)]
        bench_args: Vec<OsString>,
    },
    /// Run the whole suite: formatting, clippy (host and eBPF), build, and all tests.
    Test {
        /// Arguments passed to `cargo test`, after `--` (e.g. a test-name filter).
        #[arg(last = true)]
        cargo_test_args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    // Printed here rather than returned: anyhow would add a backtrace whenever RUST_BACKTRACE is
    // set, which only buries the message about which step failed.
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Bootstrap => bootstrap::run(),
        Task::BuildEbpf => {
            bootstrap::run()?;
            let object = kernel::build()?;
            println!("eBPF object: {}", object.display());
            Ok(())
        }
        Task::Build { release } => {
            bootstrap::run()?;
            let binary = agent::build(Profile::from_release_flag(release))?;
            println!("agent binary: {}", binary.display());
            Ok(())
        }
        Task::BuildAndLoad {
            release,
            agent_args,
        } => agent::build_and_load(Profile::from_release_flag(release), &agent_args),
        Task::Demo => agent::demo(),
        Task::Bench { quick, bench_args } => agent::bench(quick, &bench_args),
        Task::Test { cargo_test_args } => suite::run(&cargo_test_args),
    }
}
