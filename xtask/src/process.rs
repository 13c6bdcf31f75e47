//! Running child processes: the environment they get, and turning failures into errors that say
//! which step failed.

use std::{
    env,
    ffi::{OsStr, OsString},
    fs,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// A command whose PATH starts with cargo's bin directory, so tools installed by `cargo install`
/// (bpf-linker, which the nightly cargo invokes as the BPF linker) are found even when the
/// caller's PATH lacks it.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    command.env("PATH", path_with_cargo_bin());
    command
}

/// Prints the step name and command line, runs it with inherited stdio, and fails naming the
/// step if it cannot start or exits unsuccessfully.
pub fn run_step(step: &str, command: &mut Command) -> anyhow::Result<()> {
    println!("==> {step}: {}", describe(command));
    let status = command
        .status()
        .with_context(|| format!("step `{step}`: could not start `{}`", describe(command)))?;
    if !status.success() {
        bail!(
            "step `{step}` failed: `{}` exited with {status}",
            describe(command)
        );
    }
    Ok(())
}

/// Runs a probe (a query whose answer decides what to do) quietly and returns its stdout, or
/// `None` if it could not start or exited unsuccessfully.
pub fn probe_output(command: &mut Command) -> Option<String> {
    let output = command.stderr(Stdio::null()).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether this process runs with effective user id 0. Read from procfs because std has no
/// `geteuid` and the xtask avoids depending on libc.
fn is_root() -> anyhow::Result<bool> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective_uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("no effective uid in /proc/self/status")?;
    Ok(effective_uid == "0")
}

/// Fails with a message naming `what` unless this process runs as root.
pub fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root()? {
        bail!("{what} needs root; run this command as root (e.g. with sudo)");
    }
    Ok(())
}

/// `$CARGO_HOME/bin`, or `~/.cargo/bin` when `CARGO_HOME` is unset.
pub fn cargo_bin_dir() -> PathBuf {
    let cargo_home = env::var_os("CARGO_HOME").map_or_else(
        || PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cargo"),
        PathBuf::from,
    );
    cargo_home.join("bin")
}

fn path_with_cargo_bin() -> OsString {
    let inherited = env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(cargo_bin_dir()).chain(env::split_paths(&inherited));
    env::join_paths(dirs).unwrap_or(inherited)
}

/// The command line as a user would type it, for progress and error messages: the environment
/// variables the xtask sets (except PATH, which every command gets), then program and arguments.
fn describe(command: &Command) -> String {
    let assignments = command.get_envs().filter_map(|(key, value)| {
        // Escaped because CARGO_ENCODED_RUSTFLAGS separates flags with an invisible 0x1f.
        let value = value?.to_string_lossy().escape_debug().to_string();
        (key != "PATH").then(|| format!("{}={value}", key.to_string_lossy()))
    });
    let words = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|word| word.to_string_lossy().into_owned());
    assignments.chain(words).collect::<Vec<_>>().join(" ")
}
