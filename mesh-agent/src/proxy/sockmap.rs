//! Same-node connections spliced in the kernel: once a connection is authorized and
//! delivered, the stream verdict moves every byte between the agent's two sockets (the
//! client's accepted socket and the delivery socket into the destination pod) and the proxy
//! leaves the data path. What stays in user space: end-of-stream, errors, policy cuts, the
//! rare bytes the verdict passed up instead of redirecting, and the byte counters, read
//! from the kernel at close.

use std::{io, net::Shutdown, time::Duration};

use tokio::net::TcpStream;

use super::copy::{self, Transferred};
use crate::ebpf::{
    Sockmap,
    sockmap::{SpliceRefused, SplicedPair},
    sys,
};

/// How long a half-close waits, at most between two checks, for the kernel to hand the
/// last redirected bytes to the other socket.
const DRAIN_POLL_MAX: Duration = Duration::from_millis(10);
/// Bytes read at once when the verdict passed data up (rare: see `SpliceState`).
const PASSED_CHUNK: usize = 16 * 1024;

/// A connection whose bytes the kernel moves.
pub struct Spliced<'a> {
    sockmap: &'a Sockmap,
    pair: SplicedPair,
}

impl Drop for Spliced<'_> {
    fn drop(&mut self) {
        self.sockmap.forget(self.pair);
    }
}

/// Hands the connection to the kernel, or says why not (the caller copies it instead).
pub fn start<'a>(
    sockmap: &'a Sockmap,
    downstream: &TcpStream,
    upstream: &TcpStream,
) -> Result<Spliced<'a>, SpliceRefused> {
    let pair = sockmap.splice(downstream, upstream)?;
    Ok(Spliced { sockmap, pair })
}

/// How a spliced connection ended.
#[derive(Debug)]
pub struct Outcome {
    /// Bytes each way, as the kernel counted them.
    pub transferred: Transferred,
    /// Of those, the bytes the agent had to forward itself (the verdict passed them up).
    pub forwarded_by_agent: u64,
    /// Why it ended early, if it did (both sockets were reset).
    pub error: Option<io::Error>,
}

impl Spliced<'_> {
    /// Runs the connection to its end. Byte counts come from the kernel, so they hold on
    /// every path; on error (or `cancel`) both sockets are reset.
    pub async fn run(
        self,
        downstream: &TcpStream,
        upstream: &TcpStream,
        cancel: impl Future<Output = ()>,
    ) -> Outcome {
        let (mut down, mut up) = (Direction::default(), Direction::default());
        let error = copy::until_both(
            self.one_way(downstream, upstream, self.pair.downstream, &mut down),
            self.one_way(upstream, downstream, self.pair.upstream, &mut up),
            cancel,
        )
        .await;
        let transferred = Transferred {
            downstream_to_upstream: down.received(downstream),
            upstream_to_downstream: up.received(upstream),
        };
        if error.is_some() {
            copy::reset(downstream);
            copy::reset(upstream);
        }
        Outcome {
            transferred,
            forwarded_by_agent: down.forwarded + up.forwarded,
            error,
        }
    }

    /// Watches `from` until its peer ends the stream, forwarding whatever the verdict
    /// passed up instead of redirecting, then forwards the end of stream to `to`.
    async fn one_way(
        &self,
        from: &TcpStream,
        to: &TcpStream,
        cookie: u64,
        dir: &mut Direction,
    ) -> io::Result<()> {
        loop {
            from.readable().await?;
            // Usually nothing: the wake-up came from bytes the kernel already redirected.
            // The read also makes the kernel run the verdict on bytes that arrived before
            // the socket entered the map.
            let passed = {
                let mut buf = [0u8; PASSED_CHUNK];
                match from.try_read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => buf[..n].to_vec(),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            };
            write_all(to, &passed).await?;
            dir.forwarded += passed.len() as u64;
            self.sockmap.forwarded(cookie, dir.forwarded)?;
        }
        dir.ended = true;
        // Every byte `from` received must be queued on `to` before `to` sends its FIN;
        // redirected bytes reach `to` asynchronously (a kernel work item), so wait for them.
        let received = dir.received(from);
        let mut delay = Duration::from_micros(20);
        loop {
            let out = sys::tcp_bytes(to)?;
            if out.queued >= received {
                break;
            }
            if !out.can_send {
                return Err(to.take_error()?.unwrap_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "peer closed before the stream ended",
                    )
                }));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(DRAIN_POLL_MAX);
        }
        match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
            // The peer may already be gone; nothing was lost on our side.
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
            _ => Ok(()),
        }
    }
}

/// What one direction saw.
#[derive(Default)]
struct Direction {
    /// Bytes the agent forwarded itself.
    forwarded: u64,
    /// The sender ended the stream (its FIN arrived).
    ended: bool,
}

impl Direction {
    /// Data bytes `from` received: the kernel's count, which includes the FIN.
    fn received(&self, from: &TcpStream) -> u64 {
        let with_fin = sys::tcp_bytes(from).map_or(0, |b| b.received);
        with_fin.saturating_sub(u64::from(self.ended))
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
