//! Bidirectional byte copy between two streams with correct half-close and byte counts
//! that survive errors (so metrics stay right when a peer resets).

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

/// Large enough to keep a 10 Gbit/s loopback busy with few syscalls; one per direction.
const BUFFER: usize = 64 * 1024;

/// Bytes moved in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the downstream (connecting) side to the upstream side.
    pub downstream_to_upstream: u64,
    /// From the upstream side back to the downstream side.
    pub upstream_to_downstream: u64,
}

/// TCP to TCP. If either direction fails, both sockets are reset (SO_LINGER 0) so neither
/// peer hangs or mistakes a broken transfer for a clean end.
/// `cancel` resolving revokes the connection (reset, reported as an error).
pub async fn tcp(
    downstream: &mut TcpStream,
    upstream: &mut TcpStream,
    cancel: impl Future<Output = ()>,
) -> (Transferred, Option<std::io::Error>) {
    let (result, error) = {
        let (mut dr, mut dw) = downstream.split();
        let (mut ur, mut uw) = upstream.split();
        pump(&mut dr, &mut dw, &mut ur, &mut uw, cancel).await
    };
    if error.is_some() {
        reset(downstream);
        reset(upstream);
    }
    (result, error)
}

/// A TCP downstream and any other upstream stream (an HBONE tunnel).
pub async fn tcp_to_stream<S>(
    downstream: &mut TcpStream,
    upstream: S,
    cancel: impl Future<Output = ()>,
) -> (Transferred, Option<std::io::Error>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (result, error) = {
        let (mut dr, mut dw) = downstream.split();
        let (mut ur, mut uw) = tokio::io::split(upstream);
        pump(&mut dr, &mut dw, &mut ur, &mut uw, cancel).await
    };
    if error.is_some() {
        reset(downstream);
    }
    (result, error)
}

/// Makes the next close send RST instead of FIN.
pub fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
}

/// Never resolves: for connections nothing can revoke.
pub async fn never() {
    std::future::pending().await
}

/// Runs both directions until both reached EOF, one failed, or `cancel` resolved (the
/// connection was revoked: reported as an error so the sockets are reset).
async fn pump(
    dr: &mut (impl AsyncRead + Unpin),
    dw: &mut (impl AsyncWrite + Unpin),
    ur: &mut (impl AsyncRead + Unpin),
    uw: &mut (impl AsyncWrite + Unpin),
    cancel: impl Future<Output = ()>,
) -> (Transferred, Option<std::io::Error>) {
    let mut t = Transferred::default();
    let error = until_both(
        one_way(dr, uw, &mut t.downstream_to_upstream),
        one_way(ur, dw, &mut t.upstream_to_downstream),
        cancel,
    )
    .await;
    (t, error)
}

/// Drives the two directions of a connection until both ended, one failed, or `cancel`
/// resolved (reported as an error: the caller resets the sockets).
pub async fn until_both(
    a: impl Future<Output = std::io::Result<()>>,
    b: impl Future<Output = std::io::Result<()>>,
    cancel: impl Future<Output = ()>,
) -> Option<std::io::Error> {
    tokio::pin!(a, b, cancel);
    let (mut a_done, mut b_done) = (false, false);
    loop {
        let r = tokio::select! {
            r = &mut a, if !a_done => { a_done = true; r }
            r = &mut b, if !b_done => { b_done = true; r }
            () = &mut cancel => Err(std::io::Error::other("closed by policy")),
        };
        if let Err(e) = r {
            return Some(e);
        }
        if a_done && b_done {
            return None;
        }
    }
}

async fn one_way(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    total: &mut u64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n]).await?;
        *total += n as u64;
    }
    match to.shutdown().await {
        // The peer may already be gone; nothing was lost on our side.
        Err(e) if e.kind() != std::io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}
