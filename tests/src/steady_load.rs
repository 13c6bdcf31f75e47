//! Steady traffic while something goes wrong: background streams of requests from pods (or a
//! client outside the cluster) that run while a test kills the agent, upgrades it, churns
//! endpoints or fills a map, and then say what every request met. A fault the dataplane hides
//! reads 0 failed; one it does not shows up as failures, a gap without answers and broken
//! long-lived connections, each with a time since the start that [`SteadyLoad::mark`]s place
//! next to the faults.
//!
//! ```no_run
//! # use integration_tests::{steady_load::{SteadyLoad, Stream}, topology::Pod};
//! # fn example(client: &Pod, to: std::net::SocketAddrV4) -> anyhow::Result<()> {
//! let load = SteadyLoad::start(&[Stream::tcp_connections(client, to)])?;
//! load.mark("kill -9");
//! // ... the fault ...
//! let report = load.stop()?;
//! println!("{report}");
//! report.ensure_no_failures()
//! # }
//! ```

use std::{
    collections::BTreeMap,
    fmt,
    io::{self, BufRead, BufReader, ErrorKind, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    panic,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail};

use crate::{client::Tally, netns, topology::Pod};

/// How long a request may go unanswered before it counts as failed. A veth hop answers in well
/// under a millisecond, and a busy 2-core VM (the agent loading its programs included) delays an
/// answer by tens of milliseconds at worst: a second without an answer is an outage, not a
/// hiccup. It is also TCP's initial retransmission timeout, so a connection whose SYN was dropped
/// fails instead of hiding the drop in a retransmission.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Between the answer to one request of a stream and the next request. With one request in
/// flight, a stream sends about 100 requests per second: a gap in the answers is seen to within
/// ~10 ms, and the six streams of a fault test (some 500 requests/s) leave both cores to the
/// agent and the kernel.
pub const REQUEST_PAUSE: Duration = Duration::from_millis(10);
/// Between two exchanges of a long-lived connection: an application that talks now and then, not
/// a bulk transfer (the issue's 20 to 50 ms).
pub const EXCHANGE_PAUSE: Duration = Duration::from_millis(25);
/// What a request says; the servers answer any line or datagram with their pod's name.
const REQUEST: &[u8] = b"hello\n";

/// What a stream sends: the three kinds of traffic whose survival the tests demand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// A datagram from a fresh socket per request (a new flow each time, as DNS clients make),
    /// answered with the backend's name.
    Udp,
    /// A new TCP connection per request: connect, one line, the answer, close.
    TcpConnections,
    /// One TCP connection that exchanges a line every 25 ms. A failed exchange breaks it: it is
    /// counted as broken and closed, and a new connection is opened in its place (see
    /// [`StreamReport::connections`]).
    LongLivedTcp,
}

impl fmt::Display for StreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StreamKind::Udp => "UDP",
            StreamKind::TcpConnections => "new TCP",
            StreamKind::LongLivedTcp => "long-lived TCP",
        })
    }
}

/// One stream of requests: what, from which pod, to which address (a ClusterIP, a NodePort, a
/// pod IP; the [`crate::servers`] must answer behind it).
#[derive(Clone, Debug)]
pub struct Stream {
    pub kind: StreamKind,
    pub from: Pod,
    pub to: SocketAddrV4,
}

impl Stream {
    pub fn udp(from: &Pod, to: SocketAddrV4) -> Self {
        Self::new(StreamKind::Udp, from, to)
    }

    pub fn tcp_connections(from: &Pod, to: SocketAddrV4) -> Self {
        Self::new(StreamKind::TcpConnections, from, to)
    }

    pub fn long_lived_tcp(from: &Pod, to: SocketAddrV4) -> Self {
        Self::new(StreamKind::LongLivedTcp, from, to)
    }

    fn new(kind: StreamKind, from: &Pod, to: SocketAddrV4) -> Self {
        Self {
            kind,
            from: from.clone(),
            to,
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} -> {}", self.kind, self.from.name, self.to)
    }
}

/// Streams running on threads of their own, each in its pod's network namespace, until
/// [`SteadyLoad::stop`]. Dropping it stops them too, so that no stream outlives its topology.
pub struct SteadyLoad {
    started: Instant,
    stopping: Arc<AtomicBool>,
    marks: Mutex<Vec<Mark>>,
    workers: Vec<JoinHandle<Result<StreamReport>>>,
}

impl SteadyLoad {
    /// Starts every stream; returns once each has entered its pod's namespace.
    pub fn start(streams: &[Stream]) -> Result<Self> {
        let mut load = Self {
            started: Instant::now(),
            stopping: Arc::default(),
            marks: Mutex::default(),
            workers: Vec::new(),
        };
        for stream in streams {
            let (entered, has_entered) = mpsc::sync_channel(1);
            let (stream, started, stopping) = (stream.clone(), load.started, load.stopping.clone());
            let worker = thread::spawn(move || {
                let netns = stream.from.netns.clone();
                netns::enter(&netns, move || {
                    let _ = entered.send(());
                    Ok(run(stream, started, &stopping))
                })
            });
            if has_entered.recv().is_err() {
                // The worker never got into the namespace: its error says why. `load` stops
                // the streams already running.
                return Err(join(worker)
                    .err()
                    .unwrap_or_else(|| anyhow!("a stream ended before it started")));
            }
            load.workers.push(worker);
        }
        Ok(load)
    }

    /// Notes an event (a fault, a recovery) at the current time, so that the report can show
    /// failures next to what caused them.
    pub fn mark(&self, event: &str) {
        let mark = Mark {
            at: self.started.elapsed(),
            event: event.to_owned(),
        };
        self.marks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(mark);
    }

    /// Stops every stream (each finishes the request it is waiting for, so within
    /// [`REQUEST_TIMEOUT`]) and reports.
    pub fn stop(mut self) -> Result<LoadReport> {
        self.stopping.store(true, Ordering::SeqCst);
        let streams = self
            .workers
            .drain(..)
            .map(join)
            .collect::<Result<Vec<_>>>()?;
        let marks = std::mem::take(
            &mut *self
                .marks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        Ok(LoadReport {
            duration: self.started.elapsed(),
            marks,
            streams,
        })
    }
}

impl Drop for SteadyLoad {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// A worker's report; a panic in it is the caller's panic.
fn join(worker: JoinHandle<Result<StreamReport>>) -> Result<StreamReport> {
    worker
        .join()
        .unwrap_or_else(|payload| panic::resume_unwind(payload))
}

/// An event a test noted while the load ran.
#[derive(Clone, Debug)]
pub struct Mark {
    /// Since the load started.
    pub at: Duration,
    pub event: String,
}

/// A request that got no right answer.
#[derive(Clone, Debug)]
pub struct Failure {
    /// When the request was sent, since the load started.
    pub at: Duration,
    /// The stream's request number, from 1: consecutive failures are one outage.
    pub request: u64,
    /// What went wrong: the step (`connect`, `send`, `answer`) and the error.
    pub error: String,
    /// For an exchange on an open long-lived connection: the backend that connection reached, so
    /// that a test can excuse the connections of a backend it removed. None for the requests of
    /// the other streams and for the opening of a long-lived connection, whose backend is not
    /// known before it answers.
    pub backend: Option<String>,
}

/// One connection of a long-lived stream.
#[derive(Clone, Debug)]
pub struct Connection {
    /// The backend that answered its first exchange.
    pub backend: String,
    /// Since the load started.
    pub opened_at: Duration,
    /// When an exchange on it failed (the failure is among the stream's), if one did.
    pub broken_at: Option<Duration>,
}

/// What one stream met.
#[derive(Clone, Debug)]
pub struct StreamReport {
    pub stream: Stream,
    pub sent: u64,
    pub failures: Vec<Failure>,
    /// The longest time without an answer, from the stream's start to its end: between two
    /// answers, before the first or after the last.
    pub longest_gap: Duration,
    /// When that gap began, since the load started.
    pub longest_gap_from: Duration,
    /// How many answers each backend gave.
    pub backends: Tally,
    /// Long-lived streams: every connection, in order; after the first, each was opened because
    /// the one before broke (or could not be opened). Empty for the other kinds.
    pub connections: Vec<Connection>,
}

impl StreamReport {
    pub fn failed(&self) -> usize {
        self.failures.len()
    }

    pub fn answered(&self) -> usize {
        self.backends.values().sum()
    }

    /// Long-lived connections that broke.
    pub fn broken(&self) -> usize {
        self.connections
            .iter()
            .filter(|connection| connection.broken_at.is_some())
            .count()
    }

    /// Runs of consecutive failed requests on the same connection (or on none): (first, last,
    /// how many).
    fn outages(&self) -> Vec<(&Failure, &Failure, usize)> {
        let mut outages: Vec<(&Failure, &Failure, usize)> = Vec::new();
        for failure in &self.failures {
            match outages.last_mut() {
                Some((_, last, count))
                    if last.request + 1 == failure.request && last.backend == failure.backend =>
                {
                    *last = failure;
                    *count += 1;
                }
                _ => outages.push((failure, failure, 1)),
            }
        }
        outages
    }

    fn describe_failures(&self, out: &mut impl fmt::Write) -> fmt::Result {
        for (first, last, count) in self.outages() {
            let backend = first.backend.as_ref().map_or(String::new(), |backend| {
                format!(" (connection to {backend})")
            });
            if count == 1 {
                write!(
                    out,
                    "\n    {} failed{backend}: {}",
                    seconds(first.at),
                    first.error
                )?;
            } else {
                write!(
                    out,
                    "\n    {count} failed from {} to {}{backend}: {}",
                    seconds(first.at),
                    seconds(last.at),
                    first.error
                )?;
                if last.error != first.error {
                    write!(out, " (the last: {})", last.error)?;
                }
            }
        }
        for connection in &self.connections {
            if let Some(broken_at) = connection.broken_at {
                write!(
                    out,
                    "\n    connection to {} opened at {} broke at {}",
                    connection.backend,
                    seconds(connection.opened_at),
                    seconds(broken_at)
                )?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for StreamReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backends: Vec<String> = self
            .backends
            .iter()
            .map(|(backend, answers)| format!("{backend} {answers}"))
            .collect();
        write!(
            f,
            "{}: sent {}, failed {}, longest gap {} (from {}), answered by {}",
            self.stream,
            self.sent,
            self.failed(),
            millis(self.longest_gap),
            seconds(self.longest_gap_from),
            if backends.is_empty() {
                "nobody".to_owned()
            } else {
                backends.join(", ")
            }
        )?;
        if self.stream.kind == StreamKind::LongLivedTcp {
            write!(
                f,
                "; connections {}, broken {}",
                self.connections.len(),
                self.broken()
            )?;
        }
        Ok(())
    }
}

/// What every stream of a [`SteadyLoad`] met, with the events marked while it ran.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub duration: Duration,
    pub marks: Vec<Mark>,
    pub streams: Vec<StreamReport>,
}

impl LoadReport {
    pub fn sent(&self) -> u64 {
        self.streams.iter().map(|stream| stream.sent).sum()
    }

    pub fn failed(&self) -> usize {
        self.streams.iter().map(StreamReport::failed).sum()
    }

    pub fn broken(&self) -> usize {
        self.streams.iter().map(StreamReport::broken).sum()
    }

    pub fn longest_gap(&self) -> Duration {
        self.streams
            .iter()
            .map(|stream| stream.longest_gap)
            .max()
            .unwrap_or_default()
    }

    /// Fails unless every request was answered, with every failure, its time and the marks in
    /// the message.
    pub fn ensure_no_failures(&self) -> Result<()> {
        self.ensure_no_failures_except(|_, _| false)
    }

    /// The same, leaving out the failures that `expected` accepts: those of connections to a
    /// backend the test removed, say (`|_, failure| failure.backend.as_deref() ==
    /// Some("web-2")`).
    pub fn ensure_no_failures_except(
        &self,
        expected: impl Fn(&Stream, &Failure) -> bool,
    ) -> Result<()> {
        let unexpected: Vec<StreamReport> = self
            .streams
            .iter()
            .map(|report| StreamReport {
                failures: report
                    .failures
                    .iter()
                    .filter(|failure| !expected(&report.stream, failure))
                    .cloned()
                    .collect(),
                ..report.clone()
            })
            .filter(|report| !report.failures.is_empty())
            .collect();
        if unexpected.is_empty() {
            return Ok(());
        }
        let failed: usize = unexpected.iter().map(StreamReport::failed).sum();
        let mut message = format!(
            "{failed} of {} requests failed during {} of steady load{}",
            self.sent(),
            seconds(self.duration),
            self.marks_text()
        );
        for report in &unexpected {
            message.push_str(&format!("\n  {}:", report.stream));
            report
                .describe_failures(&mut message)
                .expect("writing to a String");
        }
        bail!("{message}")
    }

    fn marks_text(&self) -> String {
        if self.marks.is_empty() {
            return String::new();
        }
        let marks: Vec<String> = self
            .marks
            .iter()
            .map(|mark| format!("{} {}", seconds(mark.at), mark.event))
            .collect();
        format!(" (marks: {})", marks.join(", "))
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "steady load for {}: sent {}, failed {}, broken long-lived connections {}, longest gap \
             {}{}",
            seconds(self.duration),
            self.sent(),
            self.failed(),
            self.broken(),
            millis(self.longest_gap()),
            self.marks_text()
        )?;
        for report in &self.streams {
            write!(f, "\n  {report}")?;
            report.describe_failures(f)?;
        }
        Ok(())
    }
}

fn seconds(duration: Duration) -> String {
    format!("{:.3} s", duration.as_secs_f64())
}

fn millis(duration: Duration) -> String {
    format!("{} ms", duration.as_millis())
}

/// A stream's loop, on a thread in its pod's namespace, until `stopping`.
fn run(stream: Stream, started: Instant, stopping: &AtomicBool) -> StreamReport {
    let mut tracker = Tracker::new(stream, started);
    let mut open: Option<OpenConnection> = None;
    while !stopping.load(Ordering::SeqCst) {
        let to = tracker.report.stream.to;
        let sent = Instant::now();
        let pause = match tracker.report.stream.kind {
            StreamKind::Udp => {
                tracker.record(sent, udp_request(to), None);
                REQUEST_PAUSE
            }
            StreamKind::TcpConnections => {
                tracker.record(sent, tcp_request(to), None);
                REQUEST_PAUSE
            }
            StreamKind::LongLivedTcp => {
                open = tracker.exchange(open, sent);
                EXCHANGE_PAUSE
            }
        };
        thread::sleep(pause);
    }
    tracker.finish()
}

/// The figures of one stream as its requests come back.
struct Tracker {
    report: StreamReport,
    started: Instant,
    last_answer: Instant,
}

impl Tracker {
    fn new(stream: Stream, started: Instant) -> Self {
        let now = Instant::now();
        Self {
            report: StreamReport {
                stream,
                sent: 0,
                failures: Vec::new(),
                longest_gap: Duration::ZERO,
                longest_gap_from: now - started,
                backends: BTreeMap::new(),
                connections: Vec::new(),
            },
            started,
            last_answer: now,
        }
    }

    /// Counts a request sent at `sent` and what came of it; returns its answer.
    fn record(
        &mut self,
        sent: Instant,
        outcome: Result<String, String>,
        backend: Option<&str>,
    ) -> Option<String> {
        self.report.sent += 1;
        match outcome {
            Ok(answer) => {
                let now = Instant::now();
                self.close_gap(now);
                self.last_answer = now;
                *self.report.backends.entry(answer.clone()).or_default() += 1;
                Some(answer)
            }
            Err(error) => {
                self.report.failures.push(Failure {
                    at: sent - self.started,
                    request: self.report.sent,
                    error,
                    backend: backend.map(str::to_owned),
                });
                None
            }
        }
    }

    /// One step of a long-lived stream: an exchange on the open connection, or opening one.
    fn exchange(&mut self, open: Option<OpenConnection>, sent: Instant) -> Option<OpenConnection> {
        match open {
            Some(mut connection) => {
                let backend = self.report.connections[connection.index].backend.clone();
                let outcome = connection.ask().and_then(|answer| {
                    if answer == backend {
                        Ok(answer)
                    } else {
                        Err(format!("answer: from {answer}, not {backend}"))
                    }
                });
                if self.record(sent, outcome, Some(&backend)).is_some() {
                    return Some(connection);
                }
                self.report.connections[connection.index].broken_at = Some(sent - self.started);
                None
            }
            None => {
                let opened = OpenConnection::open(self.report.stream.to);
                let (outcome, connection) = match opened {
                    Ok((connection, answer)) => (Ok(answer), Some(connection)),
                    Err(error) => (Err(error), None),
                };
                let backend = self.record(sent, outcome, None)?;
                let mut connection = connection?;
                connection.index = self.report.connections.len();
                self.report.connections.push(Connection {
                    backend,
                    opened_at: sent - self.started,
                    broken_at: None,
                });
                Some(connection)
            }
        }
    }

    fn close_gap(&mut self, until: Instant) {
        let gap = until - self.last_answer;
        if gap > self.report.longest_gap {
            self.report.longest_gap = gap;
            self.report.longest_gap_from = self.last_answer - self.started;
        }
    }

    fn finish(mut self) -> StreamReport {
        self.close_gap(Instant::now());
        self.report
    }
}

fn udp_request(to: SocketAddrV4) -> Result<String, String> {
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
        .map_err(|error| step("socket", &error))?;
    // Connected: the kernel delivers only a reply from `to` itself, so an answer the dataplane
    // failed to translate back counts as no answer.
    socket
        .connect(to)
        .and_then(|()| socket.set_read_timeout(Some(REQUEST_TIMEOUT)))
        .map_err(|error| step("socket", &error))?;
    socket.send(REQUEST).map_err(|error| step("send", &error))?;
    let mut answer = [0u8; 512];
    let received = socket
        .recv(&mut answer)
        .map_err(|error| step("answer", &error))?;
    name(&answer[..received])
}

fn tcp_request(to: SocketAddrV4) -> Result<String, String> {
    let (_, answer) = OpenConnection::open(to)?;
    Ok(answer)
}

/// A long-lived connection, and where its record is in the stream's report.
struct OpenConnection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    index: usize,
}

impl OpenConnection {
    /// Connects and makes the first exchange: the connection and its backend's name.
    fn open(to: SocketAddrV4) -> Result<(Self, String), String> {
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let stream = TcpStream::connect_timeout(&SocketAddr::V4(to), REQUEST_TIMEOUT)
            .map_err(|error| step("connect", &error))?;
        // The whole request, connect included, gets REQUEST_TIMEOUT.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let reader = stream
            .set_read_timeout(Some(left))
            .and_then(|()| stream.set_write_timeout(Some(REQUEST_TIMEOUT)))
            .and_then(|()| stream.try_clone())
            .map_err(|error| step("socket", &error))?;
        let mut connection = Self {
            reader: BufReader::new(reader),
            writer: stream,
            index: 0,
        };
        let answer = connection.ask()?;
        connection
            .writer
            .set_read_timeout(Some(REQUEST_TIMEOUT))
            .map_err(|error| step("socket", &error))?;
        Ok((connection, answer))
    }

    fn ask(&mut self) -> Result<String, String> {
        self.writer
            .write_all(REQUEST)
            .map_err(|error| step("send", &error))?;
        let mut answer = String::new();
        match self.reader.read_line(&mut answer) {
            Ok(0) => Err("answer: the connection was closed".to_owned()),
            Ok(_) => name(answer.trim_end().as_bytes()),
            Err(error) => Err(step("answer", &error)),
        }
    }
}

/// The backend's name out of an answer.
fn name(answer: &[u8]) -> Result<String, String> {
    match std::str::from_utf8(answer) {
        Ok("") => Err("answer: empty".to_owned()),
        Ok(name) => Ok(name.to_owned()),
        Err(_) => Err(format!("answer: not a name: {answer:?}")),
    }
}

fn step(step: &str, error: &io::Error) -> String {
    match error.kind() {
        // A receive timeout is EAGAIN.
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            format!("{step}: no answer within {REQUEST_TIMEOUT:?}")
        }
        _ => format!("{step}: {error}"),
    }
}
