//! The steady-load generator of the fault tests (`integration_tests::steady_load`) on its own,
//! with no agent: a client pod's streams go straight to backend pods' IPs through the node's
//! routing. Untouched, every request is answered; with a backend's route on the node turned
//! into a blackhole or an unreachable route for a while, the generator must count the failures,
//! the gap and the broken long-lived connection, and say when they happened.
//!
//! ```text
//!   client pod ──UDP──────────────> backend-0   (never blocked)
//!       │      ──new TCP──────────> backend-1   (unreachable for a while: ICMP errors, timeouts)
//!       │      ──long-lived TCP───> backend-2   (blackholed for a while: timeouts)
//!       └──────── all through the node's /32 routes
//! ```

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    thread,
    time::Duration,
};

use anyhow::{Result, ensure};
use integration_tests::{
    process::ip,
    require_root, servers,
    steady_load::{REQUEST_TIMEOUT, SteadyLoad, Stream, StreamReport},
    topology::{Pod, Topology},
};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
/// Load before and after the fault.
const STEADY: Duration = Duration::from_millis(1500);
/// How long the backends' routes stay broken: longer than a request's timeout, so that every
/// stream to a blocked backend has at least one request that fails.
const BLOCKED: Duration = Duration::from_millis(2500);

/// A client and three backends, and a stream of each kind to one backend each (see the drawing).
struct Bed {
    topology: Topology,
    backends: Vec<Pod>,
    streams: Vec<Stream>,
}

impl Bed {
    fn new() -> Result<Self> {
        let topology = Topology::new()?;
        let client = topology.add_pod("client", CLIENT_IP)?;
        let backends = (0..3)
            .map(|index| {
                let ip = Ipv4Addr::new(10, 244, 0, 20 + index);
                topology.add_backend_pod(&format!("backend-{index}"), ip)
            })
            .collect::<Result<Vec<_>>>()?;
        let (tcp, udp) = (
            |pod: &Pod| SocketAddrV4::new(pod.ip, servers::TCP_PORT),
            |pod: &Pod| SocketAddrV4::new(pod.ip, servers::UDP_PORT),
        );
        let streams = vec![
            Stream::udp(&client, udp(&backends[0])),
            Stream::tcp_connections(&client, tcp(&backends[1])),
            Stream::long_lived_tcp(&client, tcp(&backends[2])),
        ];
        Ok(Self {
            topology,
            backends,
            streams,
        })
    }

    /// Replaces the node's route to `pod` with one of `kind` (`blackhole`, `unreachable`).
    fn block(&self, pod: &Pod, kind: &str) -> Result<()> {
        let to = format!("{}/32", pod.ip);
        ip(&[
            "-n",
            self.topology.node_netns(),
            "route",
            "replace",
            kind,
            &to,
        ])
    }

    /// Puts the node's route to `pod` back on its link.
    fn unblock(&self, pod: &Pod) -> Result<()> {
        let to = format!("{}/32", pod.ip);
        let node = self.topology.node_netns();
        ip(&["-n", node, "route", "replace", &to, "dev", &pod.node_link])
    }
}

/// Every stream answered only by the backend it talks to, which answered at least `requests`
/// times.
fn ensure_each_stream_reached_its_backend(
    streams: &[StreamReport],
    backends: &[Pod],
    requests: usize,
) -> Result<()> {
    for (report, backend) in streams.iter().zip(backends) {
        ensure!(
            report.backends.keys().eq([&backend.name]),
            "{}: answered by {:?}, expected {} alone",
            report.stream,
            report.backends,
            backend.name
        );
        ensure!(
            report.answered() >= requests,
            "{}: only {} answers",
            report.stream,
            report.answered()
        );
    }
    Ok(())
}

#[test]
fn untouched_traffic_to_pods_is_all_answered_without_gaps() -> Result<()> {
    require_root("untouched_traffic_to_pods_is_all_answered_without_gaps");
    let bed = Bed::new()?;
    let load = SteadyLoad::start(&bed.streams)?;
    thread::sleep(STEADY);
    let report = load.stop()?;
    println!("{report}");

    report.ensure_no_failures()?;
    // At one request per ~10 ms (~25 ms for the long-lived connection), at least a few dozen
    // each, even on a machine busy with other tests.
    ensure_each_stream_reached_its_backend(&report.streams, &bed.backends, 20)?;
    for stream in &report.streams {
        ensure!(
            stream.longest_gap < REQUEST_TIMEOUT,
            "{}: a gap of {:?} with nothing failing",
            stream.stream,
            stream.longest_gap
        );
    }
    let long_lived = &report.streams[2];
    ensure!(
        long_lived.connections.len() == 1 && long_lived.broken() == 0,
        "the long-lived stream did not keep its one connection: {:?}",
        long_lived.connections
    );
    ensure!(
        report.sent()
            == report
                .streams
                .iter()
                .map(|s| s.answered() as u64)
                .sum::<u64>(),
        "sent and answered disagree: {report}"
    );
    Ok(())
}

#[test]
fn blocked_backends_show_failures_gaps_and_a_broken_connection_when_they_happened() -> Result<()> {
    require_root("blocked_backends_show_failures_gaps_and_a_broken_connection_when_they_happened");
    let bed = Bed::new()?;
    let (spared, unreachable, blackholed) = (&bed.backends[0], &bed.backends[1], &bed.backends[2]);
    let load = SteadyLoad::start(&bed.streams)?;
    thread::sleep(STEADY);
    load.mark("routes broken");
    bed.block(unreachable, "unreachable")?;
    bed.block(blackholed, "blackhole")?;
    thread::sleep(BLOCKED);
    bed.unblock(unreachable)?;
    bed.unblock(blackholed)?;
    load.mark("routes back");
    // A long-lived connection being reopened may wait for its SYN's retransmission.
    thread::sleep(STEADY + REQUEST_TIMEOUT);
    let report = load.stop()?;
    println!("{report}");
    let (broken_at, restored_at) = (report.marks[0].at, report.marks[1].at);

    let [udp, new_tcp, long_lived] = &report.streams[..] else {
        panic!("three streams, three reports: {report}");
    };
    ensure!(
        udp.failed() == 0,
        "the stream to {}, never blocked, failed: {udp:?}",
        spared.name
    );
    for stream in [new_tcp, long_lived] {
        ensure!(stream.failed() > 0, "no failure counted: {stream}");
        // Nothing answered between the two route changes.
        ensure!(
            stream.longest_gap >= restored_at - broken_at,
            "{stream}: the longest gap is shorter than the {:?} the routes were broken",
            restored_at - broken_at
        );
        for failure in &stream.failures {
            // Sent while the routes were broken, or just before and unanswered when they broke.
            ensure!(
                failure.at + REQUEST_TIMEOUT >= broken_at && failure.at <= restored_at,
                "{stream}: a failure at {:?}, outside {broken_at:?}..{restored_at:?}: {}",
                failure.at,
                failure.error
            );
        }
    }
    // The long-lived connection broke on an exchange with its backend, was not silently
    // reopened, and a new one works again once the route is back.
    let first = &long_lived.connections[0];
    ensure!(
        first.backend == blackholed.name && first.broken_at.is_some(),
        "the first long-lived connection did not break: {first:?}"
    );
    ensure!(
        long_lived.failures[0].backend.as_deref() == Some(blackholed.name.as_str()),
        "the failure that broke the connection does not name its backend: {:?}",
        long_lived.failures[0]
    );
    let last = long_lived.connections.last().expect("a connection");
    ensure!(
        long_lived.connections.len() >= 2 && last.broken_at.is_none() && last.opened_at > broken_at,
        "no working connection after the route came back: {:?}",
        long_lived.connections
    );
    ensure_each_stream_reached_its_backend(&report.streams, &bed.backends, 20)?;

    // The assertion a fault test makes fails, naming the streams and the times...
    let error = report
        .ensure_no_failures()
        .expect_err("failures went unreported");
    let message = format!("{error:#}");
    for expected in [
        new_tcp.stream.to_string(),
        long_lived.stream.to_string(),
        format!("connection to {} opened at", blackholed.name),
        "routes broken".to_owned(),
    ] {
        ensure!(
            message.contains(&expected),
            "the failure message lacks {expected:?}:\n{message}"
        );
    }
    ensure!(
        !message.contains(&udp.stream.to_string()),
        "the failure message names a stream that did not fail:\n{message}"
    );
    // ... unless the test expected them, as for backends it removed.
    let blocked = [unreachable.ip, blackholed.ip];
    report.ensure_no_failures_except(|stream, _| blocked.contains(stream.to.ip()))
}
