//! The node-local admin endpoints: `/config_dump` (15000), `/metrics` (15020) and
//! `/healthz/ready` (15021), served over plain HTTP/1.1 on 127.0.0.1 of the agent's namespace.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// The largest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;

/// What an endpoint returns.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn ok(content_type: &'static str, body: String) -> Self {
        Response {
            status: 200,
            content_type,
            body,
        }
    }
    pub fn not_found() -> Self {
        Response {
            status: 404,
            content_type: "text/plain",
            body: "not found\n".into(),
        }
    }
}

/// Answers a GET for a path.
pub trait Handler: Send + Sync + 'static {
    fn get(&self, path: &str) -> Response;
}

#[derive(Debug, thiserror::Error)]
#[error("admin endpoint {addr}: {source}")]
pub struct AdminError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds `addr` now (so a taken port is a start-up error) and serves it in the background.
pub async fn serve(addr: SocketAddr, handler: Arc<dyn Handler>) -> Result<(), AdminError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError { addr, source })?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let _ = answer(stream, &*handler).await;
            });
        }
    });
    Ok(())
}

async fn answer(mut stream: TcpStream, handler: &dyn Handler) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or("/"),
    );
    let path = target.split('?').next().unwrap_or(target);
    let response = if method == "GET" {
        handler.get(path)
    } else {
        Response {
            status: 405,
            content_type: "text/plain",
            body: "method not allowed\n".into(),
        }
    };
    let reason = match response.status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(response.body.as_bytes()).await?;
    stream.shutdown().await
}
