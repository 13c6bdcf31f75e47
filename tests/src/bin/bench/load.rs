//! The two loads of a round, both from the client pod: new TCP connections with one HTTP request
//! each (wrk with `Connection: close`), and UDP request/response on connected sockets.

use std::{
    net::{SocketAddrV4, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use integration_tests::{cgroup::TestCgroup, netns, process::output_within};

/// What one load run measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadFigures {
    pub per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

/// Concurrent connections each wrk keeps opening; three wrk run at once (one per backend pod in
/// the base mode), enough to keep both cores busy.
const WRK_CONNECTIONS: u32 = 11;
/// Concurrent UDP requesters, each with one connected socket and one request in flight.
const UDP_REQUESTERS: usize = 8;
const UDP_REPLY_TIMEOUT: Duration = Duration::from_millis(200);

/// One `wrk` per target, all at once, from inside `netns` (and in `cgroup` when the client is a
/// pod of the node, whose sockets the agent's socket programs serve): the rates add up, the p50
/// is the mean of theirs and the p99 the worst of theirs.
pub fn tcp_connections(
    netns: &str,
    cgroup: Option<&TestCgroup>,
    targets: &[SocketAddrV4],
    duration: Duration,
) -> Result<LoadFigures> {
    let runs = thread::scope(|scope| {
        let workers: Vec<_> = targets
            .iter()
            .map(|&to| scope.spawn(move || wrk(netns, cgroup, to, duration)))
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("wrk runner panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    Ok(LoadFigures {
        per_second: runs.iter().map(|r| r.per_second).sum(),
        p50_us: runs.iter().map(|r| r.p50_us).sum::<f64>() / runs.len() as f64,
        p99_us: runs.iter().map(|r| r.p99_us).fold(0.0, f64::max),
        errors: runs.iter().map(|r| r.errors).sum(),
    })
}

/// `wrk -H 'Connection: close'` against `http://to/` from inside `netns`.
fn wrk(
    netns: &str,
    cgroup: Option<&TestCgroup>,
    to: SocketAddrV4,
    duration: Duration,
) -> Result<LoadFigures> {
    let seconds = duration.as_secs().max(1);
    let mut command = netns::command(netns, "wrk")?;
    command
        .args(["-t1", &format!("-c{WRK_CONNECTIONS}")])
        .arg(format!("-d{seconds}s"))
        .args(["--latency", "-H", "Connection: close"])
        .arg(format!("http://{to}/"));
    if let Some(cgroup) = cgroup {
        cgroup.join_before_exec(&mut command)?;
    }
    let output = output_within(&mut command, duration + Duration::from_secs(30))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            output.status,
            text,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_wrk(&text).with_context(|| format!("cannot read wrk's report:\n{text}"))
}

fn parse_wrk(text: &str) -> Result<LoadFigures> {
    let mut figures = LoadFigures::default();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", rate] => figures.per_second = rate.parse()?,
            ["50%", latency] => figures.p50_us = micros(latency)?,
            ["99%", latency] => figures.p99_us = micros(latency)?,
            ["Socket", "errors:", counts @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                for pair in counts.chunks(2) {
                    if let [_, count] = pair {
                        figures.errors += count.trim_end_matches(',').parse::<u64>()?;
                    }
                }
            }
            ["Non-2xx", "or", "3xx", "responses:", count] => {
                figures.errors += count.parse::<u64>()?
            }
            _ => {}
        }
    }
    if figures.per_second == 0.0 {
        bail!("no Requests/sec line, or no request answered");
    }
    Ok(figures)
}

/// wrk prints latencies as `812.00us`, `1.23ms` or `1.02s`.
fn micros(latency: &str) -> Result<f64> {
    let split = latency
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("latency without unit: {latency}"))?;
    let (value, unit) = latency.split_at(split);
    let value: f64 = value.parse()?;
    Ok(match unit {
        "us" => value,
        "ms" => value * 1e3,
        "s" => value * 1e6,
        "m" => value * 60e6,
        _ => bail!("unknown latency unit in {latency}"),
    })
}

/// Request/response over UDP: each requester sends a datagram and waits for the answer before
/// sending the next, for `duration`. Requesters are spread over `targets` in turn.
pub fn udp_request_response(
    netns: &str,
    targets: &[SocketAddrV4],
    duration: Duration,
) -> Result<LoadFigures> {
    let sockets = netns::enter(netns, || {
        (0..UDP_REQUESTERS)
            .map(|index| {
                let socket = UdpSocket::bind("0.0.0.0:0")?;
                socket.connect(targets[index % targets.len()])?;
                socket.set_read_timeout(Some(UDP_REPLY_TIMEOUT))?;
                Ok(socket)
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let runs: Vec<(Vec<u32>, u64)> = thread::scope(|scope| {
        let workers: Vec<_> = sockets
            .iter()
            .map(|socket| scope.spawn(move || requester(socket, deadline)))
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap_or_default())
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies: Vec<u32> = runs.iter().flat_map(|(l, _)| l.iter().copied()).collect();
    let errors = runs.iter().map(|(_, e)| e).sum();
    if latencies.is_empty() {
        bail!("no UDP request to {targets:?} was answered");
    }
    latencies.sort_unstable();
    let at = |q: f64| f64::from(latencies[((latencies.len() - 1) as f64 * q) as usize]);
    Ok(LoadFigures {
        per_second: latencies.len() as f64 / elapsed,
        p50_us: at(0.50),
        p99_us: at(0.99),
        errors,
    })
}

/// Latencies in microseconds of the answered requests, and the count of unanswered ones.
fn requester(socket: &UdpSocket, deadline: Instant) -> (Vec<u32>, u64) {
    let (mut latencies, mut errors) = (Vec::new(), 0);
    let mut reply = [0u8; 512];
    while Instant::now() < deadline {
        let sent = Instant::now();
        let answered = socket.send(b"ping").is_ok() && socket.recv(&mut reply).is_ok();
        if answered {
            latencies.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        } else {
            errors += 1;
        }
    }
    (latencies, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrks_report() {
        let report = "\
Running 2s test @ http://10.96.0.15:80/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.01ms  512.00us   9.87ms   80.00%
  Latency Distribution
     50%  812.00us
     75%    2.10ms
     90%    2.50ms
     99%    1.02s
  24000 requests in 2.00s, 3.43MB read
  Socket errors: connect 2, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  12000.50
Transfer/sec:      1.71MB
";
        let figures = parse_wrk(report).unwrap();
        assert_eq!(figures.per_second, 12000.5);
        assert_eq!(figures.p50_us, 812.0);
        assert_eq!(figures.p99_us, 1.02e6);
        assert_eq!(figures.errors, 10);
    }
}
