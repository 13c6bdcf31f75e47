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

async fn answer(mut stream: TcpStream, ready: bool) {
    // A probe's request fits in one read; only its request line matters.
    let mut request = [0u8; 1024];
    let Ok(length) = stream.read(&mut request).await else {
        return;
    };
    let request = String::from_utf8_lossy(&request[..length]);
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
