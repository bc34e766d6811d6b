//! The byte pumps between two streams, with correct half-close and byte counts that
//! survive errors (so metrics stay right when a peer resets): TCP to TCP by splice(2)
//! through a pipe (the bytes stay in the kernel), TCP to an HBONE tunnel by copying.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest},
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

/// TCP to TCP, moved by the kernel: each direction `splice(2)`s from one socket into a
/// pipe and from the pipe into the other socket, so the bytes never enter the agent's
/// memory and an idle connection holds no buffer. If either direction fails, both
/// sockets are reset (SO_LINGER 0) so neither peer hangs or mistakes a broken transfer for
/// a clean end. `cancel` resolving revokes the connection (reset, reported as an error).
pub async fn tcp(
    downstream: &mut TcpStream,
    upstream: &mut TcpStream,
    cancel: impl Future<Output = ()>,
) -> (Transferred, Option<std::io::Error>) {
    let mut t = Transferred::default();
    let error = until_both(
        spliced_one_way(downstream, upstream, &mut t.downstream_to_upstream),
        spliced_one_way(upstream, downstream, &mut t.upstream_to_downstream),
        cancel,
    )
    .await;
    if error.is_some() {
        reset(downstream);
        reset(upstream);
    }
    (t, error)
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

/// One direction of [`tcp`]: socket → pipe → socket until end of stream, then FIN.
async fn spliced_one_way(from: &TcpStream, to: &TcpStream, total: &mut u64) -> io::Result<()> {
    let pipe = Pipe::new()?;
    loop {
        from.readable().await?;
        let n = match from.try_io(Interest::READABLE, || pipe.fill_from(from)) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
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
        *total += n as u64;
    }
    match socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write) {
        // The peer may already be gone; nothing was lost on our side.
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

/// A kernel pipe that bytes pass through between two sockets; its pages are only in use
/// while bytes are in flight.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 just returned these descriptors; we are their only owner.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe moves more per system call; failing to grow it is harmless.
        // SAFETY: F_SETPIPE_SZ takes an int.
        unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_BYTES as libc::c_int,
            )
        };
        Ok(Pipe { read, write })
    }

    /// Moves what `from` has received into the empty pipe; 0 at end of stream.
    fn fill_from(&self, from: &TcpStream) -> io::Result<usize> {
        splice(from.as_raw_fd(), self.write.as_raw_fd(), PIPE_BYTES)
    }

    /// Moves up to `len` bytes from the pipe into `to`.
    fn drain_into(&self, to: &TcpStream, len: usize) -> io::Result<usize> {
        splice(self.read.as_raw_fd(), to.as_raw_fd(), len)
    }
}

/// Bytes one pipe holds (and so moves per system call at most).
const PIPE_BYTES: usize = 256 * 1024;

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain descriptors, no offsets (NULL: both are a socket or a pipe).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
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
