//! Processes of the node itself (not of a pod): the `node-client` binary of this crate, started
//! in a node's network namespace *and* in a test cgroup, as `curl` run on a node would be. Only
//! a process in the cgroup meets the agent's socket programs, so the process joins it before it
//! opens any socket.

use std::{fmt, io, net::SocketAddrV4, path::PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use crate::{cgroup::TestCgroup, netns, process::output_within};

/// How long one request may take: `node-client`'s own timeouts plus starting the process.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What `node-client` does with its socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// connect(), a line out, a line back; getpeername().
    Tcp,
    /// connect(), send(), recvfrom(); getpeername().
    UdpConnected,
    /// sendto(), recvfrom() on an unconnected socket.
    UdpUnconnected,
}

impl Request {
    /// `node-client`'s first argument.
    pub fn argument(self) -> &'static str {
        match self {
            Request::Tcp => "tcp",
            Request::UdpConnected => "udp",
            Request::UdpUnconnected => "udp-unconnected",
        }
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.argument())
    }
}

/// What a request saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The name of the backend pod that answered.
    pub backend: String,
    /// getpeername() of the socket (not for unconnected UDP).
    pub peer: Option<SocketAddrV4>,
    /// The source address of the UDP reply, as recvfrom() reported it.
    pub source: Option<SocketAddrV4>,
}

/// Starts `node-client` processes in one network namespace and one cgroup.
pub struct NodeClient<'a> {
    binary: PathBuf,
    netns: String,
    cgroup: &'a TestCgroup,
}

impl<'a> NodeClient<'a> {
    /// `binary` is `env!("CARGO_BIN_EXE_node-client")` of the calling test.
    pub fn new(binary: impl Into<PathBuf>, netns: &str, cgroup: &'a TestCgroup) -> Self {
        Self {
            binary: binary.into(),
            netns: netns.to_owned(),
            cgroup,
        }
    }

    /// One request from a fresh process. A failed system call comes back as an
    /// [`io::Error`] in the error's chain, with the errno the client got.
    pub fn request(&self, request: Request, to: SocketAddrV4) -> Result<Reply> {
        let mut command = netns::command(&self.netns, &self.binary)?;
        command.arg(request.argument()).arg(to.to_string());
        self.cgroup.join_before_exec(&mut command)?;
        let what = format!("node-client {request} {to} in {}", self.netns);
        let output = output_within(&mut command, REQUEST_TIMEOUT).with_context(|| what.clone())?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.trim();
        if let Some(errno) = line.strip_prefix("error ") {
            let errno: i32 = errno
                .parse()
                .with_context(|| format!("{what}: odd error line {line:?}"))?;
            return Err(anyhow!(io::Error::from_raw_os_error(errno)).context(what));
        }
        if !output.status.success() {
            bail!(
                "{what} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        parse_reply(line).with_context(|| format!("{what} printed {line:?}"))
    }
}

/// `backend=NAME [peer=ADDR] [source=ADDR]`.
fn parse_reply(line: &str) -> Result<Reply> {
    let mut reply = Reply {
        backend: String::new(),
        peer: None,
        source: None,
    };
    for field in line.split_whitespace() {
        let (key, value) = field.split_once('=').context("a field without '='")?;
        match key {
            "backend" => reply.backend = value.to_owned(),
            "peer" => reply.peer = Some(value.parse()?),
            "source" => reply.source = Some(value.parse()?),
            _ => bail!("unknown field {key}"),
        }
    }
    if reply.backend.is_empty() {
        bail!("no backend");
    }
    Ok(reply)
}
