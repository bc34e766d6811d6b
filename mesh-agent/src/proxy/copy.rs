//! Bidirectional byte copy between two TCP streams with correct half-close and byte counts
//! that survive errors (so metrics stay right when a peer resets).

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const BUFFER: usize = 64 * 1024;

/// Bytes moved in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the downstream (connecting) side to the upstream side.
    pub downstream_to_upstream: u64,
    /// From the upstream side back to the downstream side.
    pub upstream_to_downstream: u64,
}

/// Copies until both directions reached EOF, forwarding each EOF as a write shutdown. If
/// either direction fails, both sockets are reset (SO_LINGER 0) so neither peer hangs.
pub async fn bidirectional(
    downstream: &mut TcpStream,
    upstream: &mut TcpStream,
) -> (Transferred, Option<std::io::Error>) {
    let mut t = Transferred::default();
    let error = {
        let (mut dr, mut dw) = downstream.split();
        let (mut ur, mut uw) = upstream.split();
        let a = one_way(&mut dr, &mut uw, &mut t.downstream_to_upstream);
        let b = one_way(&mut ur, &mut dw, &mut t.upstream_to_downstream);
        tokio::pin!(a, b);
        let (mut a_done, mut b_done) = (false, false);
        loop {
            let r = tokio::select! {
                r = &mut a, if !a_done => { a_done = true; r }
                r = &mut b, if !b_done => { b_done = true; r }
            };
            if let Err(e) = r {
                break Some(e);
            }
            if a_done && b_done {
                break None;
            }
        }
    };
    if error.is_some() {
        for s in [&*downstream, &*upstream] {
            let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
        }
    }
    (t, error)
}

async fn one_way(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
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
