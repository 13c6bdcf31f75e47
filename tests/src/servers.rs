//! The workload of a backend pod: a TCP and a UDP server that answer with the pod's name, so that a
//! client can tell which backend the agent picked (what `agnhost serve-hostname` does in the
//! Kubernetes e2e tests).

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{netns, topology::Pod};

/// The backend's TCP port: reads lines, answers each with `<pod name>\n`, except
/// [`PEER_QUESTION`].
pub const TCP_PORT: u16 = 8080;
/// A line the TCP server answers with the client address it sees, so that a test can tell whether
/// the source address was kept or translated on the way.
pub const PEER_QUESTION: &str = "who am i";
/// The backend's UDP port: answers each datagram with `<pod name>`.
pub const UDP_PORT: u16 = 5353;

/// How long a connection may stay idle before the server drops it, so that a client that never
/// closes cannot keep a thread alive past its test.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a UDP server thread looks at `stopping` when no datagram comes.
const UDP_STOP_CHECK: Duration = Duration::from_millis(100);

/// The running servers of one pod; stopped, and their sockets closed, on drop.
pub struct BackendServer {
    stopping: Arc<AtomicBool>,
    /// The TCP listener's descriptor, owned by its thread.
    listener: RawFd,
    threads: Vec<JoinHandle<()>>,
}

impl BackendServer {
    pub fn start(pod: &Pod) -> Result<Self> {
        let (listener, udp) = netns::enter(&pod.netns, || {
            let any = |port| SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
            let listener = TcpListener::bind(any(TCP_PORT)).context("TCP bind")?;
            let udp = UdpSocket::bind(any(UDP_PORT)).context("UDP bind")?;
            // The UDP thread notices `stopping` within this; waking it with shutdown() instead
            // makes std's recv_from panic on the empty source address.
            udp.set_read_timeout(Some(UDP_STOP_CHECK))
                .context("UDP timeout")?;
            Ok((listener, udp))
        })
        .with_context(|| format!("cannot start the servers of pod {}", pod.name))?;

        let stopping = Arc::new(AtomicBool::new(false));
        let listener_fd = listener.as_raw_fd();
        let threads = vec![
            spawn_tcp_server(listener, pod.name.clone(), stopping.clone()),
            spawn_udp_server(udp, pod.name.clone(), stopping.clone()),
        ];
        Ok(Self {
            stopping,
            listener: listener_fd,
            threads,
        })
    }
}

impl Drop for BackendServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the thread blocked in accept; it sees `stopping`, returns, and closes the
        // listener. The descriptor is still open: only that thread closes it.
        // SAFETY: shutdown does not touch memory, and the descriptor is valid (see above).
        unsafe { libc::shutdown(self.listener, libc::SHUT_RDWR) };
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn spawn_tcp_server(
    listener: TcpListener,
    name: String,
    stopping: Arc<AtomicBool>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        for connection in listener.incoming() {
            if stopping.load(Ordering::SeqCst) {
                return;
            }
            if let Ok(connection) = connection {
                let name = name.clone();
                thread::spawn(move || answer_lines(connection, &name));
            }
        }
    })
}

/// Answers every line of the connection until the client closes it (so that a client can check
/// that one connection stays on one backend) or stays idle too long.
fn answer_lines(connection: TcpStream, name: &str) {
    if connection
        .set_read_timeout(Some(IDLE_CONNECTION_TIMEOUT))
        .is_err()
    {
        return;
    }
    let (Ok(mut writer), Ok(peer)) = (connection.try_clone(), connection.peer_addr()) else {
        return;
    };
    for line in BufReader::new(connection).lines() {
        let Ok(line) = line else {
            return;
        };
        let answer = if line == PEER_QUESTION {
            peer.ip().to_string()
        } else {
            name.to_owned()
        };
        // One write: a name and its newline in two segments would wait for the client's
        // delayed ACK (Nagle) before the second.
        if writer.write_all(format!("{answer}\n").as_bytes()).is_err() {
            return;
        }
    }
}

fn spawn_udp_server(socket: UdpSocket, name: String, stopping: Arc<AtomicBool>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut datagram = [0u8; 1500];
        while !stopping.load(Ordering::SeqCst) {
            if let Ok((_, client)) = socket.recv_from(&mut datagram) {
                let _ = socket.send_to(name.as_bytes(), client);
            }
        }
    })
}
