//! A process of the node for the node-local tests (see `integration_tests::node_client`): one
//! request in the [`integration_tests::servers`] protocol, over a socket that the agent's socket
//! programs translate.
//!
//! `node-client tcp|udp|udp-unconnected ADDRESS:PORT` prints `backend=NAME` with `peer=ADDR`
//! (getpeername) for connected sockets and `source=ADDR` (recvfrom) for UDP; or, when a system
//! call fails, `error ERRNO`, and exits with 1.

use std::{
    env,
    io::{self, BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    process::ExitCode,
};

use integration_tests::client::REPLY_TIMEOUT;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let [request, to] = args.as_slice() else {
        eprintln!("usage: node-client tcp|udp|udp-unconnected ADDRESS:PORT");
        return ExitCode::from(2);
    };
    let Ok(to) = to.parse::<SocketAddrV4>() else {
        eprintln!("not an IPv4 address and port: {to}");
        return ExitCode::from(2);
    };
    let result = match request.as_str() {
        "tcp" => tcp(to),
        "udp" => udp_connected(to),
        "udp-unconnected" => udp_unconnected(to),
        other => {
            eprintln!("unknown request {other}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            // A timeout has an errno too (EAGAIN); an error without one is reported as 0.
            println!("error {}", error.raw_os_error().unwrap_or(0));
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

fn tcp(to: SocketAddrV4) -> io::Result<String> {
    let stream = TcpStream::connect_timeout(&SocketAddr::V4(to), REPLY_TIMEOUT)?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    writeln!(&stream, "hello")?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    Ok(format!(
        "backend={} peer={}",
        answer.trim_end(),
        stream.peer_addr()?
    ))
}

fn udp_connected(to: SocketAddrV4) -> io::Result<String> {
    let socket = unbound_udp()?;
    socket.connect(to)?;
    socket.send(b"hello")?;
    let (answer, source) = receive(&socket)?;
    Ok(format!(
        "backend={answer} source={source} peer={}",
        socket.peer_addr()?
    ))
}

fn udp_unconnected(to: SocketAddrV4) -> io::Result<String> {
    let socket = unbound_udp()?;
    socket.send_to(b"hello", to)?;
    let (answer, source) = receive(&socket)?;
    Ok(format!("backend={answer} source={source}"))
}

fn unbound_udp() -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(REPLY_TIMEOUT))?;
    Ok(socket)
}

/// The reply and where recvfrom says it came from.
fn receive(socket: &UdpSocket) -> io::Result<(String, SocketAddr)> {
    let mut reply = [0u8; 1500];
    let (received, source) = socket.recv_from(&mut reply)?;
    Ok((
        String::from_utf8_lossy(&reply[..received]).into_owned(),
        source,
    ))
}
