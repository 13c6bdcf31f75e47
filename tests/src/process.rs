//! Running helper commands (`ip`, the agent's CLI) with errors that show what was run and what it
//! said, and with a time limit, so that a wedged command fails the test instead of hanging it.

use std::{
    io::Read,
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Limit for commands that should return at once (`ip`, `service-agent get`).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `ip ARGS...` (iproute2) and fails with its stderr if it does.
pub fn ip(args: &[&str]) -> Result<()> {
    let output = output_within(Command::new("ip").args(args), COMMAND_TIMEOUT)?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `command` to completion with captured stdout and stderr, killing it after `timeout`.
pub fn output_within(command: &mut Command, timeout: Duration) -> Result<Output> {
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {shown}"))?;
    // Drained on threads while waiting: a child blocked on a full pipe would never exit.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_within(&mut child, timeout).with_context(|| format!("running {shown}"))?;
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Waits for `child` to exit; kills it (and reaps it) if it takes longer than `timeout`.
pub fn wait_within(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("no exit within {timeout:?}: killed");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}
