//! Traffic from a pod: requests to the [`crate::servers`] protocol (TCP: a line out, the backend's
//! name back; UDP: a datagram out, the backend's name back), sent from inside the pod's network
//! namespace so that it crosses the pod's link and the agent's programs like real pod traffic.

use std::{
    collections::BTreeMap,
    fmt,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    netns,
    poll::{CONVERGENCE_TIMEOUT, eventually},
    topology::Pod,
};

/// How long a request may take. Generous for a veth hop, short enough that a test sampling dozens
/// of requests against a dead address still fails fast.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "TCP",
            Transport::Udp => "UDP",
        })
    }
}

/// How many requests each backend answered.
pub type Tally = BTreeMap<String, usize>;

/// One TCP connection from a pod; each request goes over the same connection.
pub struct TcpSession {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    to: SocketAddrV4,
}

impl TcpSession {
    /// Sends a line and returns the backend's answer: its pod name.
    pub fn request(&mut self) -> Result<String> {
        self.ask("hello")
    }

    /// Sends `line` and returns the backend's answer.
    pub fn ask(&mut self, line: &str) -> Result<String> {
        let to = self.to;
        writeln!(self.writer, "{line}").with_context(|| format!("TCP send to {to}"))?;
        let mut reply = String::new();
        let read = self
            .reader
            .read_line(&mut reply)
            .with_context(|| format!("TCP reply from {to}"))?;
        if read == 0 {
            bail!("TCP {to}: connection closed without a reply");
        }
        Ok(reply.trim_end().to_string())
    }
}

impl Pod {
    /// Opens a TCP connection to `to`.
    pub fn tcp_connect(&self, to: SocketAddrV4) -> Result<TcpSession> {
        let stream = netns::enter(&self.netns, || {
            Ok(TcpStream::connect_timeout(
                &SocketAddr::V4(to),
                REPLY_TIMEOUT,
            )?)
        })
        .with_context(|| format!("TCP connect {} -> {to}", self.name))?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        Ok(TcpSession {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            to,
        })
    }

    /// One request on a fresh connection: the name of the backend that answered.
    pub fn tcp_request(&self, to: SocketAddrV4) -> Result<String> {
        self.tcp_connect(to)?
            .request()
            .with_context(|| format!("from pod {}", self.name))
    }

    /// One datagram from a fresh socket: the name of the backend that answered. The socket is
    /// connected, so the kernel only delivers a reply that comes from `to` itself: an answer that
    /// the agent failed to translate back counts as no answer.
    pub fn udp_request(&self, to: SocketAddrV4) -> Result<String> {
        let socket = netns::enter(&self.netns, || {
            let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
            socket.connect(to)?;
            Ok(socket)
        })
        .with_context(|| format!("UDP socket {} -> {to}", self.name))?;
        socket.set_read_timeout(Some(REPLY_TIMEOUT))?;
        let mut reply = [0u8; 1500];
        let received = socket
            .send(b"hello")
            .and_then(|_| socket.recv(&mut reply))
            .with_context(|| format!("UDP {} -> {to}", self.name))?;
        Ok(String::from_utf8_lossy(&reply[..received]).into_owned())
    }

    pub fn request(&self, transport: Transport, to: SocketAddrV4) -> Result<String> {
        match transport {
            Transport::Tcp => self.tcp_request(to),
            Transport::Udp => self.udp_request(to),
        }
    }

    /// Waits until `to` gives no answer at all (connection refused, unreachable or timed out).
    pub fn wait_until_unanswered(&self, transport: Transport, to: SocketAddrV4) -> Result<()> {
        eventually(
            CONVERGENCE_TIMEOUT,
            &format!("{transport} {to} unanswered"),
            || match self.request(transport, to) {
                Ok(backend) => bail!("{backend} still answers"),
                Err(_) => Ok(()),
            },
        )
    }

    /// Sends `requests` requests, each on a new connection or socket (so that each is a new
    /// backend choice), and counts who answered. Fails on the first request that gets no answer.
    pub fn tally(&self, transport: Transport, to: SocketAddrV4, requests: usize) -> Result<Tally> {
        let mut tally = Tally::new();
        for request in 1..=requests {
            let backend = self
                .request(transport, to)
                .with_context(|| format!("{transport} request {request} of {requests}"))?;
            *tally.entry(backend).or_default() += 1;
        }
        Ok(tally)
    }
}
