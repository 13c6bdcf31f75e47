//! `/healthz` and `/readyz` over plain HTTP on `--metrics-address`, for the kubelet's probes:
//! healthy while the agent runs, ready once the first full sync has programmed the maps. A few
//! lines of HTTP/1.1 on tokio's listener; no HTTP server crate is worth its build time for two
//! fixed answers.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// Serves the probes until the runtime stops. `ready` turns true after the first full sync.
pub async fn serve(address: SocketAddr, ready: watch::Receiver<bool>) -> Result<()> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the health endpoint to {address}"))?;
    tracing::info!(%address, "serving /healthz and /readyz");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let ready = *ready.borrow();
                    tokio::spawn(answer(stream, ready));
                }
                Err(error) => tracing::warn!("health endpoint: accept failed: {error}"),
            }
        }
    });
    Ok(())
}

/// How much of a request is read at most: a longer request line is cut there.
const MAX_REQUEST_LINE: usize = 1024;

/// The request line of an HTTP request (lossy UTF-8), read until it is complete: a client may
/// send it in several segments ("GET ", the path, the rest), and answering and closing after the
/// first would reset the connection under the rest. Also used by the healthCheckNodePort servers.
pub async fn read_request_line(stream: &mut TcpStream) -> String {
    let mut request = Vec::new();
    let mut chunk = [0u8; 512];
    while !request.contains(&b'\n') && request.len() < MAX_REQUEST_LINE {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(length) => request.extend_from_slice(&chunk[..length]),
        }
    }
    String::from_utf8_lossy(&request).into_owned()
}

async fn answer(mut stream: TcpStream, ready: bool) {
    let request = read_request_line(&mut stream).await;
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match path {
        "/healthz" => ("200 OK", "ok\n"),
        "/readyz" if ready => ("200 OK", "ok\n"),
        "/readyz" => ("503 Service Unavailable", "not synced yet\n"),
        _ => ("404 Not Found", "not found\n"),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // A probe that hung up early needs no answer.
    let _ = stream.write_all(response.as_bytes()).await;
}

#[cfg(test)]
mod tests {
    use tokio::{io::AsyncWriteExt as _, net::TcpListener};

    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_request_line_sent_in_pieces_is_read_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(address).await.unwrap();
            for piece in ["GET ", "/healthz", " HTTP/1.1\r\n", "Host: probe\r\n\r\n"] {
                stream.write_all(piece.as_bytes()).await.unwrap();
                stream.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            stream
        });
        let (mut server, _) = listener.accept().await.unwrap();
        let line = read_request_line(&mut server).await;
        assert!(line.starts_with("GET /healthz HTTP/1.1\r\n"), "{line:?}");
        drop(client.await.unwrap());
    }
}
