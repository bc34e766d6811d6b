//! HBONE, ztunnel's tunnel protocol: HTTP/2 `CONNECT` over mutual TLS 1.3 between the
//! source pod's namespace and port 15008 in the destination pod's namespace. The client
//! (with its connection pool) is in `client`, the server in `server`. Both speak HTTP/2
//! through `h2` directly: a tunnel's bytes go from a socket read straight into a DATA
//! frame and from a DATA frame straight into a socket write, with no intermediate copy
//! and no buffer held while the tunnel is idle.

pub mod batch;
pub mod client;
pub mod io;
pub mod server;

use std::sync::Arc;

use bytes::Bytes;

/// HTTP/2 flow-control windows, as ztunnel sizes them for throughput.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame we accept (fewer frames per byte than the 16 KiB default).
pub const MAX_FRAME: u32 = 256 * 1024;
/// Streams per HTTP/2 connection before the pool opens another connection.
pub const DEFAULT_MAX_STREAMS: usize = 100;
/// Concurrent streams the server accepts per connection (hyper's default).
pub const SERVER_MAX_STREAMS: u32 = 200;
/// Largest header block the server accepts (hyper's default): CONNECT needs little.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;

/// One tunnel: the two halves of the HTTP/2 stream a `CONNECT` opened.
pub struct Stream {
    pub send: h2::SendStream<Bytes>,
    pub recv: h2::RecvStream,
}

/// An HTTP/2 error as an I/O error: the peer resetting the stream reads as a reset
/// connection, which is what it means for the bytes in flight.
pub fn io_error(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        return e.into_io().expect("checked is_io");
    }
    let kind = if e.is_reset() {
        std::io::ErrorKind::ConnectionReset
    } else {
        std::io::ErrorKind::Other
    };
    std::io::Error::new(kind, e)
}

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("HBONE to {addr}: TCP connect: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("HBONE to {addr}: TLS handshake: {source}")]
    Tls {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("HBONE to {addr}: HTTP/2: {source}")]
    Http {
        addr: std::net::SocketAddr,
        source: h2::Error,
    },
    #[error("HBONE to {addr}: CONNECT {target} answered {status}")]
    Status {
        addr: std::net::SocketAddr,
        target: std::net::SocketAddr,
        status: http::StatusCode,
    },
    #[error("HBONE to {addr}: no certificate for {identity}")]
    NoCertificate {
        addr: std::net::SocketAddr,
        identity: String,
    },
    #[error("HBONE to {addr}: timed out")]
    Timeout { addr: std::net::SocketAddr },
    #[error("HBONE: {0}")]
    Socket(#[from] Box<super::ProxyError>),
    /// Opening the connection this tunnel waited for failed (shared by every waiter).
    #[error("{0}")]
    Dial(Arc<HboneError>),
    #[error("HBONE: opening a connection: {0}")]
    Task(String),
    #[error("HBONE to {addr}: every connection opened for this tunnel was taken or closed")]
    Busy { addr: std::net::SocketAddr },
}

/// A W3C `traceparent` with fresh random trace and span ids, sampled.
pub fn traceparent() -> String {
    format!(
        "00-{:032x}-{:016x}-01",
        fastrand::u128(1..),
        fastrand::u64(1..)
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn traceparent_has_w3c_shape_and_differs_each_time() {
        let (a, b) = (super::traceparent(), super::traceparent());
        assert_ne!(a, b);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [2, 32, 16, 2],
            "{a}"
        );
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    }
}
