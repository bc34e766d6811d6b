//! The byte pumps between two streams, with correct half-close and byte counts that
//! survive errors (so metrics stay right when a peer resets): TCP to TCP by splice(2)
//! through a pipe (the bytes stay in the kernel) or by read(2)/write(2) (sockets the
//! kernel's redirect feeds), TCP to an HBONE tunnel by handing socket reads to HTTP/2 and
//! HTTP/2 frames to socket writes.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncWriteExt, Interest},
    net::{TcpStream, tcp},
};

use prometheus_client::metrics::counter::Counter;

use super::hbone::{self, Stream};

/// Bytes one socket read into a tunnel may take, from the smallest to the largest read.
/// Each read is allocated for that read and freed once HTTP/2 wrote it. A read that fills
/// its buffer doubles the next one (bulk transfers reach 256 KiB reads, so few system
/// calls and frames per byte); a read under a quarter of it halves the next one (requests
/// and responses stay in small allocations).
const TUNNEL_READ_MIN: usize = 16 * 1024;
const TUNNEL_READ_MAX: usize = 256 * 1024;

/// Counters a connection's bytes are added to as they move, per direction: its metric
/// series (one per record of the connection: a same-node connection is reported by its
/// source and its destination).
#[derive(Debug, Default)]
pub struct Meters {
    pub downstream_to_upstream: Vec<Counter>,
    pub upstream_to_downstream: Vec<Counter>,
}

/// One direction's bytes: its total, and the counters they are added to as they move.
struct Tally<'a> {
    total: u64,
    live: &'a [Counter],
}

impl<'a> Tally<'a> {
    fn new(live: &'a [Counter]) -> Self {
        Tally { total: 0, live }
    }

    fn add(&mut self, n: usize) {
        self.total += n as u64;
        for c in self.live {
            c.inc_by(n as u64);
        }
    }
}

/// Bytes moved in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the downstream (connecting) side to the upstream side.
    pub downstream_to_upstream: u64,
    /// From the upstream side back to the downstream side.
    pub upstream_to_downstream: u64,
}

/// How [`tcp`] moves bytes between two sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pump {
    /// `splice(2)` through a pipe: the bytes never enter the agent's memory. Sees only
    /// what arrived over TCP.
    Splice,
    /// `read(2)` and `write(2)`: what a socket in the kernel's socket map received by
    /// redirect is in a queue `splice(2)` does not read; `read(2)` takes both.
    ReadWrite,
}

/// TCP to TCP: each direction moves what one socket received into the other ([`Pump`]),
/// and an idle connection holds no buffer. If either direction fails, both
/// sockets are reset (SO_LINGER 0) so neither peer hangs or mistakes a broken transfer for
/// a clean end; once both directions ended cleanly, both close gracefully again
/// ([`graceful`]). `cancel` resolving revokes the connection (reset, reported as an error).
pub async fn tcp(
    downstream: &mut TcpStream,
    upstream: &mut TcpStream,
    pump: Pump,
    meters: &Meters,
    cancel: impl Future<Output = ()>,
) -> (Transferred, Option<std::io::Error>) {
    let mut down = Tally::new(&meters.downstream_to_upstream);
    let mut up = Tally::new(&meters.upstream_to_downstream);
    let error = match pump {
        Pump::Splice => {
            until_both(
                spliced_one_way(downstream, upstream, &mut down),
                spliced_one_way(upstream, downstream, &mut up),
                cancel,
            )
            .await
        }
        Pump::ReadWrite => {
            until_both(
                read_write_one_way(downstream, upstream, |n| {
                    down.add(n);
                    Ok(())
                }),
                read_write_one_way(upstream, downstream, |n| {
                    up.add(n);
                    Ok(())
                }),
                cancel,
            )
            .await
        }
    };
    let t = Transferred {
        downstream_to_upstream: down.total,
        upstream_to_downstream: up.total,
    };
    if error.is_some() {
        reset(downstream);
        reset(upstream);
    } else {
        graceful(downstream);
        graceful(upstream);
    }
    (t, error)
}

/// One direction by `read(2)` and `write(2)` until end of stream, then FIN on `to`;
/// `moved` is told each chunk once `to` took all of it. The buffer exists only while bytes
/// are in flight, sized as reads into a tunnel are ([`next_read_size`]).
pub(super) async fn read_write_one_way(
    from: &TcpStream,
    to: &TcpStream,
    mut moved: impl FnMut(usize) -> io::Result<()>,
) -> io::Result<()> {
    let mut size = TUNNEL_READ_MIN;
    loop {
        from.readable().await?;
        let mut buf = BytesMut::with_capacity(size);
        let n = match from.try_read_buf(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        size = next_read_size(size, n);
        let mut data = &buf[..];
        while !data.is_empty() {
            to.writable().await?;
            match to.try_write(data) {
                Ok(m) => data = &data[m..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        moved(n)?;
    }
    // Everything read is in the peer's queue: each redirected send was queued before its
    // system call returned, and the rest is ahead of the FIN on TCP.
    half_close(to)
}

/// A TCP downstream and an HBONE tunnel. Each socket read becomes one or more HTTP/2 DATA
/// frames without a copy, each received frame is written to the socket as it is, and
/// buffers exist only while bytes are in flight. Flow control is HTTP/2's: what a
/// direction read goes out only as the peer's window allows, and it reads again only once
/// all of it went; a received frame's window is returned once its bytes are in the
/// socket. On failure the socket is reset and the stream cancelled; after a clean end the
/// socket closes gracefully ([`graceful`]).
///
/// `early` is what the downstream had sent before the tunnel opened and went with its
/// `CONNECT` ([`early_read`]): counted here, not read again.
pub async fn tcp_to_tunnel(
    downstream: &mut TcpStream,
    tunnel: &mut Stream,
    early: usize,
    meters: &Meters,
    cancel: impl Future<Output = ()>,
) -> (Transferred, Option<std::io::Error>) {
    let mut down = Tally::new(&meters.downstream_to_upstream);
    let mut up = Tally::new(&meters.upstream_to_downstream);
    down.add(early);
    let error = {
        let (mut read, mut write) = downstream.split();
        until_both(
            into_tunnel(&mut read, &mut tunnel.send, &mut down),
            out_of_tunnel(&mut tunnel.recv, &mut write, &mut up),
            cancel,
        )
        .await
    };
    let t = Transferred {
        downstream_to_upstream: down.total,
        upstream_to_downstream: up.total,
    };
    if error.is_some() {
        reset(downstream);
        tunnel.send.send_reset(h2::Reason::CANCEL);
    } else {
        graceful(downstream);
    }
    (t, error)
}

/// What `s` has already received, up to [`TUNNEL_READ_MIN`] bytes, without waiting: the
/// first bytes of a client that spoke first, to go with the `CONNECT` that opens its
/// tunnel (one write, one TLS record and one wake-up of the peer instead of two, and the
/// destination can write them to its application as soon as it connected, a round trip
/// sooner). Empty when nothing is there yet (a protocol whose server speaks first) or at
/// end of stream, which the pump then reads again. The socket is read directly: tokio's
/// readiness of a socket accepted a moment ago is usually not known yet, and a read that
/// finds nothing leaves it as it was.
///
/// The read goes into a buffer kept per thread and only what arrived is copied out: a
/// zeroed read-sized buffer per connection, freed a moment later between the
/// connection's long-lived allocations, stayed resident (about 4 KiB more per idle
/// connection, measured).
pub fn early_read(s: &TcpStream) -> io::Result<Bytes> {
    use std::io::Read;
    thread_local! {
        static SCRATCH: std::cell::RefCell<Box<[u8]>> =
            std::cell::RefCell::new(vec![0; TUNNEL_READ_MIN].into_boxed_slice());
    }
    let sock = socket2::SockRef::from(s);
    SCRATCH.with_borrow_mut(|buf| match (&*sock).read(buf) {
        Ok(n) => Ok(Bytes::copy_from_slice(&buf[..n])),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Bytes::new()),
        Err(e) => Err(e),
    })
}

/// Makes closing `s` send RST instead of FIN, also when the agent itself dies: a socket
/// the agent proxies is armed like this from the moment it has it, so a peer never takes a
/// transfer the agent did not finish for a complete one. [`graceful`] undoes it.
pub fn reset(s: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
}

/// The connection on `s` ended cleanly (its end of stream was forwarded both ways): closing
/// it sends FIN and lets what is still queued go out first.
pub fn graceful(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(None);
}

/// Never resolves: for connections nothing can revoke.
pub async fn never() {
    std::future::pending().await
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

/// One direction of [`tcp`]: socket → pipe → socket until end of stream, then FIN. The
/// pipe is taken from this thread's pool only once bytes are waiting and goes back as soon
/// as it is empty again, so an idle connection holds its two sockets and nothing else.
async fn spliced_one_way(
    from: &TcpStream,
    to: &TcpStream,
    total: &mut Tally<'_>,
) -> io::Result<()> {
    loop {
        from.readable().await?;
        let pipe = Pipe::take()?;
        let n = match from.try_io(Interest::READABLE, || pipe.fill_from(from)) {
            Ok(0) => {
                pipe.give_back();
                break;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe.give_back();
                continue;
            }
            // A pipe that failed midway may hold bytes: it is closed, not reused.
            Err(e) => return Err(e),
        };
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || pipe.drain_into(to, left)) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        pipe.give_back();
        total.add(n);
    }
    half_close(to)
}

/// A kernel pipe that bytes pass through between two sockets; its pages are only in use
/// while bytes are in flight. Empty pipes are kept per thread for the next burst.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

/// Empty pipes kept per worker thread (each costs two descriptors, no pages).
const PIPES_KEPT: usize = 32;

thread_local! {
    static PIPES: std::cell::RefCell<Vec<Pipe>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Pipe {
    /// An empty pipe: one this thread kept, or a new one.
    fn take() -> io::Result<Self> {
        match PIPES.with_borrow_mut(Vec::pop) {
            Some(pipe) => Ok(pipe),
            None => Self::new(),
        }
    }

    /// Keeps this pipe, which must be empty, for the next burst on this thread.
    fn give_back(self) {
        PIPES.with_borrow_mut(|pipes| {
            if pipes.len() < PIPES_KEPT {
                pipes.push(self);
            }
        });
    }

    fn new() -> io::Result<Self> {
        let (read, write) = crate::sys::pipe(PIPE_BYTES)?;
        Ok(Pipe { read, write })
    }

    /// Moves what `from` has received into the empty pipe; 0 at end of stream.
    fn fill_from(&self, from: &TcpStream) -> io::Result<usize> {
        crate::sys::splice(from.as_fd(), self.write.as_fd(), PIPE_BYTES)
    }

    /// Moves up to `len` bytes from the pipe into `to`.
    fn drain_into(&self, to: &TcpStream, len: usize) -> io::Result<usize> {
        crate::sys::splice(self.read.as_fd(), to.as_fd(), len)
    }
}

/// Bytes one pipe holds (and so moves per system call at most).
const PIPE_BYTES: usize = 256 * 1024;

/// Socket → tunnel: one allocation per read, handed to HTTP/2 as it is (split only where
/// the window ends), then END_STREAM at end of stream.
async fn into_tunnel(
    from: &mut tcp::ReadHalf<'_>,
    to: &mut h2::SendStream<Bytes>,
    total: &mut Tally<'_>,
) -> io::Result<()> {
    let mut size = TUNNEL_READ_MIN;
    loop {
        // Waits for bytes first, so an idle connection holds no buffer.
        from.readable().await?;
        let mut buf = BytesMut::with_capacity(size);
        let Some(n) = read_if_ready(from, &mut buf).await else {
            continue;
        };
        let n = n?;
        if n == 0 {
            break;
        }
        size = next_read_size(size, n);
        let mut data = buf.freeze();
        while !data.is_empty() {
            let window = send_window(to, data.len()).await?;
            to.send_data(data.split_to(window.min(data.len())), false)
                .map_err(hbone::io_error)?;
        }
        total.add(n);
    }
    to.send_data(Bytes::new(), true).map_err(hbone::io_error)
}

/// One read of `from` into `buf`, or `None` when it found nothing: tokio's readiness can be
/// stale (after [`early_read`], which reads past tokio), and waiting for bytes with `buf`
/// in hand would hold it for the rest of an idle connection's life (about 4 KiB of RSS
/// per idle connection, measured). The read goes through `poll_read`, so a read shorter
/// than the buffer also tells tokio the socket is drained; `try_read_buf` does not, and
/// costs one more read per request.
async fn read_if_ready(
    from: &mut tcp::ReadHalf<'_>,
    buf: &mut BytesMut,
) -> Option<io::Result<usize>> {
    std::future::poll_fn(|cx| {
        match tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *from), cx, buf) {
            std::task::Poll::Pending => std::task::Poll::Ready(None),
            std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
        }
    })
    .await
}

/// The size of the next read into a tunnel after one of `size` bytes returned `n`.
fn next_read_size(size: usize, n: usize) -> usize {
    if n >= size {
        (size * 2).min(TUNNEL_READ_MAX)
    } else if n < size / 4 {
        (size / 2).max(TUNNEL_READ_MIN)
    } else {
        size
    }
}

/// Waits until the stream may send (some of) `wanted` bytes; returns how many.
async fn send_window(to: &mut h2::SendStream<Bytes>, wanted: usize) -> io::Result<usize> {
    to.reserve_capacity(wanted);
    loop {
        let window = to.capacity();
        if window > 0 {
            return Ok(window);
        }
        match std::future::poll_fn(|cx| to.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(hbone::io_error(e)),
            // The stream can no longer send: the peer reset it.
            None => return Err(io::ErrorKind::ConnectionReset.into()),
        }
    }
}

/// Tunnel → socket: each DATA frame is written as received; its window goes back to the
/// peer once the socket took it. At END_STREAM the socket is half-closed.
async fn out_of_tunnel(
    from: &mut h2::RecvStream,
    to: &mut tcp::WriteHalf<'_>,
    total: &mut Tally<'_>,
) -> io::Result<()> {
    while let Some(data) = from.data().await {
        let data = data.map_err(hbone::io_error)?;
        to.write_all(&data).await?;
        // Fails only when the stream is already gone, which the next read reports.
        let _ = from.flow_control().release_capacity(data.len());
        total.add(data.len());
    }
    half_close(to.as_ref())
}

/// Sends FIN on `to`: no more bytes in this direction.
pub(super) fn half_close(to: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write) {
        // The peer may already be gone; nothing was lost on our side.
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Meters;
    use prometheus_client::metrics::counter::Counter;

    use bytes::Bytes;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::{Transferred, never, tcp_to_tunnel};
    use crate::proxy::hbone::Stream;

    /// A connected loopback pair: (the application's end, the agent's end).
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap());
        let (app, agent) = tokio::join!(app, listener.accept());
        (app.unwrap(), agent.unwrap().0)
    }

    /// An HTTP/2 stream in memory, with a small window so flow control is exercised.
    async fn h2_stream() -> (Stream, Stream) {
        const WINDOW: u32 = 16 * 1024;
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = async {
            let mut conn = h2::server::Builder::new()
                .initial_window_size(WINDOW)
                .initial_connection_window_size(WINDOW)
                .handshake::<_, Bytes>(b)
                .await
                .unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            Stream {
                send,
                recv: req.into_body(),
            }
        };
        let client = async {
            let (sender, conn) = h2::client::Builder::new()
                .initial_window_size(WINDOW)
                .initial_connection_window_size(WINDOW)
                .handshake::<_, Bytes>(a)
                .await
                .unwrap();
            tokio::spawn(conn);
            let request = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri("10.0.0.1:80")
                .body(())
                .unwrap();
            let (response, send) = sender
                .ready()
                .await
                .unwrap()
                .send_request(request, false)
                .unwrap();
            let response = response.await.unwrap();
            Stream {
                send,
                recv: response.into_body(),
            }
        };
        tokio::join!(client, server)
    }

    fn payload(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// Sends `data`, half-closes, and returns everything received until end of stream.
    async fn exchange(mut app: TcpStream, data: Vec<u8>) -> Vec<u8> {
        let (mut r, mut w) = app.split();
        let send = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        tokio::join!(send, r.read_to_end(&mut got)).1.unwrap();
        got
    }

    #[test]
    fn reads_grow_while_they_fill_and_shrink_when_small() {
        use super::{TUNNEL_READ_MAX, TUNNEL_READ_MIN, next_read_size};
        let mut size = TUNNEL_READ_MIN;
        for _ in 0..10 {
            size = next_read_size(size, size);
        }
        assert_eq!(size, TUNNEL_READ_MAX);
        assert_eq!(
            next_read_size(size, size / 2),
            size,
            "half full keeps the size"
        );
        for _ in 0..10 {
            size = next_read_size(size, 100);
        }
        assert_eq!(size, TUNNEL_READ_MIN);
    }

    #[tokio::test]
    async fn both_pumps_both_ways_with_half_close_exact_bytes_and_pipes_reused() {
        // Two spliced rounds (the second reuses the pipes), then read/write.
        for (round, pump) in [
            super::Pump::Splice,
            super::Pump::Splice,
            super::Pump::ReadWrite,
        ]
        .into_iter()
        .enumerate()
        {
            let (client_app, mut downstream) = tcp_pair().await;
            let (server_app, mut upstream) = tcp_pair().await;
            let (up, down) = (payload((2 << 20) + 3, 0x11), payload(700_001, 0x22));
            // Two series per direction, as a same-node connection has.
            let meters = Meters {
                downstream_to_upstream: vec![Counter::default(), Counter::default()],
                upstream_to_downstream: vec![Counter::default()],
            };
            let all = async {
                tokio::join!(
                    super::tcp(&mut downstream, &mut upstream, pump, &meters, never()),
                    exchange(server_app, down.clone()),
                    exchange(client_app, up.clone()),
                )
            };
            let ((t, error), got_up, got_down) = tokio::time::timeout(Duration::from_secs(30), all)
                .await
                .expect("the transfer stalled");
            assert!(error.is_none(), "{error:?}");
            assert!(
                got_up == up && got_down == down,
                "round {round}: bytes differ"
            );
            assert_eq!(
                t,
                Transferred {
                    downstream_to_upstream: up.len() as u64,
                    upstream_to_downstream: down.len() as u64,
                }
            );
            // Every series got every byte, as it moved.
            for c in &meters.downstream_to_upstream {
                assert_eq!(c.get(), up.len() as u64);
            }
            assert_eq!(meters.upstream_to_downstream[0].get(), down.len() as u64);
            // Both directions gave their pipe back (this test runs on one thread).
            let kept = super::PIPES.with_borrow(Vec::len);
            assert!((1..=2).contains(&kept), "round {round}: {kept} pipes kept");
        }
    }

    #[tokio::test]
    async fn both_ways_through_a_tunnel_with_half_close_exact_bytes_and_counts() {
        let (client_app, mut client_agent) = tcp_pair().await;
        let (server_app, mut server_agent) = tcp_pair().await;
        let (mut client_tunnel, mut server_tunnel) = h2_stream().await;
        let (up, down) = (payload(3 << 20, 0x5a), payload((1 << 20) + 17, 0xa5));
        let no_meters = Meters::default();
        let all = async {
            tokio::join!(
                tcp_to_tunnel(
                    &mut client_agent,
                    &mut client_tunnel,
                    0,
                    &no_meters,
                    never()
                ),
                tcp_to_tunnel(
                    &mut server_agent,
                    &mut server_tunnel,
                    0,
                    &no_meters,
                    never()
                ),
                exchange(server_app, down.clone()),
                exchange(client_app, up.clone()),
            )
        };
        let (c, s, got_up, got_down) = tokio::time::timeout(Duration::from_secs(30), all)
            .await
            .expect("the transfer stalled");
        assert!(
            got_up == up,
            "server application got {} bytes",
            got_up.len()
        );
        assert!(
            got_down == down,
            "client application got {} bytes",
            got_down.len()
        );
        assert!(c.1.is_none() && s.1.is_none(), "{:?} {:?}", c.1, s.1);
        let expected = Transferred {
            downstream_to_upstream: up.len() as u64,
            upstream_to_downstream: down.len() as u64,
        };
        assert_eq!(c.0, expected);
        // The server side's downstream is its application: the directions swap.
        assert_eq!(
            (s.0.upstream_to_downstream, s.0.downstream_to_upstream),
            (up.len() as u64, down.len() as u64)
        );
    }

    #[tokio::test]
    async fn a_reset_on_one_side_resets_the_application_on_the_other() {
        let (mut client_app, mut client_agent) = tcp_pair().await;
        let (server_app, mut server_agent) = tcp_pair().await;
        let (mut client_tunnel, mut server_tunnel) = h2_stream().await;
        let server = tokio::spawn(async move {
            tcp_to_tunnel(
                &mut server_agent,
                &mut server_tunnel,
                0,
                &Meters::default(),
                never(),
            )
            .await
        });
        let client = tokio::spawn(async move {
            tcp_to_tunnel(
                &mut client_agent,
                &mut client_tunnel,
                0,
                &Meters::default(),
                never(),
            )
            .await
        });
        client_app.write_all(b"hello").await.unwrap();
        // The server application resets its connection.
        super::reset(&server_app);
        drop(server_app);
        let (_, server_error) = server.await.unwrap();
        let (_, client_error) = client.await.unwrap();
        assert!(server_error.is_some() && client_error.is_some());
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), client_app.read(&mut buf))
            .await
            .expect("the client application was not told");
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );
    }
}
