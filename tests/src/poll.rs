//! Waiting for the agent to converge: it applies manifest changes asynchronously (it polls the
//! files), so tests retry an observation until it holds or a deadline passes.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

/// How long the agent gets to apply a manifest change: many of its 250 ms polls plus the sync, so
/// that a loaded machine running tests in parallel is not mistaken for a lost update.
pub const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(5);

const RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// Retries `attempt` until it succeeds or `timeout` has passed; then fails with the last
/// attempt's error, so the failure says what was last observed.
pub fn eventually<T>(
    timeout: Duration,
    what: &str,
    mut attempt: impl FnMut() -> Result<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match attempt() {
            Ok(value) => return Ok(value),
            Err(error) if Instant::now() >= deadline => {
                return Err(error).with_context(|| format!("{what}: not within {timeout:?}"));
            }
            Err(_) => thread::sleep(RETRY_INTERVAL),
        }
    }
}
