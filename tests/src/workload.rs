//! What a test pod runs: entering its network namespace and cgroup, a dual-stack TCP
//! echo server that first tells the client which address it saw, a client that checks
//! the echo byte for byte, and a minimal HTTP/1.1 GET for the agent's admin ports.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

/// The line an echo server writes first on every connection: `PEER <ip:port>\n`.
pub const PEER_PREFIX: &str = "PEER ";

/// The line `serve` prints on stdout once every listener is bound: `READY <port>...`.
pub const READY_PREFIX: &str = "READY";

const CHUNK: usize = 64 * 1024;

/// Moves the calling process into `cgroup` (cgroup v2 directory) and its thread into
/// the network namespace at `netns` (e.g. `/run/netns/NAME`).
///
/// Call it first thing in `main`, before any thread exists: threads started later
/// inherit the namespace, threads started earlier do not.
pub fn enter(netns: Option<&Path>, cgroup: Option<&Path>) -> Result<()> {
    if let Some(cgroup) = cgroup {
        join_cgroup(cgroup, std::process::id())?;
    }
    if let Some(netns) = netns {
        enter_netns(netns)?;
    }
    Ok(())
}

/// Writes `pid` into `<cgroup>/cgroup.procs`.
pub fn join_cgroup(cgroup: &Path, pid: u32) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    let mut file = OpenOptions::new()
        .write(true)
        .open(&procs)
        .with_context(|| format!("opening {}", procs.display()))?;
    file.write_all(format!("{pid}\n").as_bytes())
        .with_context(|| format!("moving pid {pid} into cgroup {}", cgroup.display()))
}

/// Moves the calling thread into the network namespace at `netns`.
pub fn enter_netns(netns: &Path) -> Result<()> {
    let file = File::open(netns)
        .with_context(|| format!("opening network namespace {}", netns.display()))?;
    setns(&file, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns into network namespace {}", netns.display()))
}

/// A TCP listener on `[::]:port` that also accepts IPv4 (IPV6_V6ONLY off).
pub fn bind_dual_stack(port: u16) -> Result<TcpListener> {
    let addr: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, port).into();
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))
        .context("creating an IPv6 TCP socket")?;
    socket.set_only_v6(false).context("clearing IPV6_V6ONLY")?;
    socket
        .set_reuse_address(true)
        .context("setting SO_REUSEADDR")?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    socket
        .listen(1024)
        .with_context(|| format!("listening on {addr}"))?;
    Ok(socket.into())
}

/// Runs the echo server on every port of `ports` until the process is killed.
///
/// Prints `READY <port> <port>...` on stdout once all listeners are bound. Each
/// connection gets `PEER <client ip:port>\n`, then every byte it sends echoed back
/// until it half-closes, then a half-close in return.
pub fn serve(ports: &[u16]) -> Result<std::convert::Infallible> {
    if ports.is_empty() {
        bail!("serve needs at least one --port");
    }
    let listeners = ports
        .iter()
        .map(|&port| bind_dual_stack(port))
        .collect::<Result<Vec<_>>>()?;
    let mut ready = String::from(READY_PREFIX);
    for listener in &listeners {
        ready.push_str(&format!(" {}", listener.local_addr()?.port()));
    }
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{ready}")?;
    stdout.flush()?;
    drop(stdout);

    let threads: Vec<_> = listeners
        .into_iter()
        .map(|listener| std::thread::spawn(move || accept_loop(listener)))
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    bail!("every listener stopped")
}

/// Accepts connections forever, one echo thread each.
pub fn accept_loop(listener: TcpListener) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                std::thread::spawn(move || {
                    if let Err(error) = echo(stream) {
                        eprintln!("echo: {error:#}");
                    }
                });
            }
            Err(error) => {
                eprintln!("accept: {error}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Serves one echo connection (see [`serve`]).
pub fn echo(mut stream: TcpStream) -> Result<()> {
    let peer = canonical(stream.peer_addr().context("getpeername")?);
    stream
        .write_all(format!("{PEER_PREFIX}{peer}\n").as_bytes())
        .context("writing the PEER line")?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("reading from {peer}")),
        };
        stream
            .write_all(&buf[..n])
            .with_context(|| format!("echoing to {peer}"))?;
    }
    stream
        .shutdown(Shutdown::Write)
        .with_context(|| format!("half-closing to {peer}"))
}

/// IPv4-mapped IPv6 addresses (what a dual-stack listener reports) as plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// What the `connect` client observed; printed as one JSON line by `mesh-pod connect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectReport {
    /// The connection was made, the PEER line read and the echo was byte-exact.
    pub ok: bool,
    /// Why not, when not ok.
    pub error: Option<String>,
    /// The client address the server reported in its PEER line.
    pub server_saw_peer: Option<SocketAddr>,
    /// `getpeername()` of the client socket: the address the application believes it
    /// is talking to.
    pub getpeername: Option<SocketAddr>,
    /// `getsockname()` of the client socket (under outbound capture, the address of
    /// the connection to the agent's loopback listener, not the pod address).
    pub local: Option<SocketAddr>,
    /// Bytes written (not counting the PEER line).
    pub sent: u64,
    /// Echoed bytes read back and found equal to what was sent.
    pub received: u64,
}

impl ConnectReport {
    /// A report of nothing done yet, ok until something fails.
    fn start() -> Self {
        ConnectReport {
            ok: true,
            error: None,
            server_saw_peer: None,
            getpeername: None,
            local: None,
            sent: 0,
            received: 0,
        }
    }

    fn failed(&mut self, error: String) {
        self.ok = false;
        if self.error.is_none() {
            self.error = Some(error);
        }
    }
}

/// Connects to `to`, reads the PEER line, sends `bytes` bytes of [`pattern`] while
/// reading the echo, half-closes, and checks that exactly the same bytes came back.
/// `eager` starts sending at once instead of after the PEER line (bytes in flight before
/// the proxy has even looked at the connection).
///
/// `timeout` bounds the connect and every single read or write.
pub fn connect(to: SocketAddr, bytes: u64, timeout: Duration, eager: bool) -> ConnectReport {
    let mut report = ConnectReport::start();
    let stream = match TcpStream::connect_timeout(&to, timeout) {
        Ok(stream) => stream,
        Err(e) => {
            report.failed(format!("connect to {to}: {e}"));
            return report;
        }
    };
    report.local = stream.local_addr().ok();
    report.getpeername = stream.peer_addr().ok();
    if let Err(e) = exchange(&stream, bytes, timeout, eager, &mut report) {
        report.failed(format!("{e:#}"));
    }
    let _ = stream.shutdown(Shutdown::Both);
    report
}

/// Like [`connect`], as request and response: `turns` writes of an equal share of
/// `bytes` (the last takes the rest), each read back in full and checked before the next.
pub fn connect_in_turns(
    to: SocketAddr,
    bytes: u64,
    timeout: Duration,
    turns: u32,
) -> ConnectReport {
    let mut report = ConnectReport::start();
    let result = (|| -> Result<()> {
        let stream =
            TcpStream::connect_timeout(&to, timeout).with_context(|| format!("connect to {to}"))?;
        report.local = stream.local_addr().ok();
        report.getpeername = stream.peer_addr().ok();
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut reader = BufReader::with_capacity(CHUNK, Patient::new(&stream, 3 * timeout));
        let mut line = Vec::new();
        (&mut reader)
            .take(256)
            .read_until(b'\n', &mut line)
            .context("reading the PEER line")?;
        let line = String::from_utf8_lossy(&line);
        let peer = line
            .trim_end()
            .strip_prefix(PEER_PREFIX)
            .with_context(|| format!("expected a PEER line, got {line:?}"))?;
        report.server_saw_peer = peer.parse().ok();
        let share = bytes / u64::from(turns.max(1));
        let (mut out, mut back) = (Vec::new(), Vec::new());
        for turn in 0..turns {
            let len = if turn + 1 == turns {
                bytes - report.sent
            } else {
                share
            } as usize;
            out.resize(len, 0);
            pattern(report.sent, &mut out);
            (&stream)
                .write_all(&out)
                .with_context(|| format!("writing turn {turn}"))?;
            report.sent += len as u64;
            back.resize(len, 0);
            reader
                .read_exact(&mut back)
                .with_context(|| format!("reading turn {turn}'s echo"))?;
            if back != out {
                bail!("the echo of turn {turn} differs");
            }
            report.received += len as u64;
        }
        stream.shutdown(Shutdown::Write)?;
        if reader.read(&mut back)? != 0 {
            bail!("the echo went on after the last turn");
        }
        Ok(())
    })();
    if let Err(e) = result {
        report.failed(format!("{e:#}"));
    }
    report
}

fn exchange(
    stream: &TcpStream,
    bytes: u64,
    timeout: Duration,
    eager: bool,
    report: &mut ConnectReport,
) -> Result<()> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let spawn_sender = || -> Result<std::thread::JoinHandle<(u64, Result<()>)>> {
        let writer = stream
            .try_clone()
            .context("cloning the socket for the writer")?;
        Ok(std::thread::spawn(move || send_pattern(writer, bytes)))
    };
    let early = if eager { Some(spawn_sender()?) } else { None };
    let mut reader = BufReader::with_capacity(CHUNK, Patient::new(stream, 3 * timeout));
    let mut line = Vec::new();
    (&mut reader)
        .take(256)
        .read_until(b'\n', &mut line)
        .context("reading the PEER line")?;
    if !line.ends_with(b"\n") {
        bail!(
            "connection closed before the server's PEER line (got {:?}): nothing that echoes answered",
            String::from_utf8_lossy(&line)
        );
    }
    let line = String::from_utf8_lossy(&line);
    let peer = line
        .trim_end()
        .strip_prefix(PEER_PREFIX)
        .with_context(|| format!("expected a PEER line, got {line:?}"))?;
    report.server_saw_peer = Some(
        peer.parse()
            .with_context(|| format!("PEER line carries no address: {line:?}"))?,
    );

    let sender = match early {
        Some(sender) => sender,
        None => spawn_sender()?,
    };

    let verified = verify_echo(&mut reader, bytes);
    if verified.is_err() {
        // Unblock the writer if it is stuck behind a peer that stopped reading.
        let _ = stream.shutdown(Shutdown::Both);
    }
    let sent = sender
        .join()
        .unwrap_or_else(|_| (0, Err(anyhow::anyhow!("writer panicked"))));
    report.sent = sent.0;
    let received = verified?;
    report.received = received;
    sent.1?;
    if report.sent != bytes {
        bail!("sent {} of {bytes} bytes", report.sent);
    }
    Ok(())
}

fn send_pattern(mut stream: TcpStream, bytes: u64) -> (u64, Result<()>) {
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while sent < bytes {
        let n = CHUNK.min((bytes - sent) as usize);
        pattern(sent, &mut buf[..n]);
        if let Err(e) = stream.write_all(&buf[..n]) {
            return (
                sent,
                Err(e).with_context(|| format!("writing at byte {sent}")),
            );
        }
        sent += n as u64;
    }
    let closed = stream
        .shutdown(Shutdown::Write)
        .context("half-closing after sending");
    (sent, closed)
}

/// A blocking reader that takes `EAGAIN` before its deadline for what it is on a socket
/// in the kernel's socket map (`--sockmap`): the kernel ends a blocking read woken
/// without data with it (ADR 016), where a plain socket would go on waiting. Retrying
/// is what CPython's sockets do in timeout mode. Past the deadline it is the timeout.
pub struct Patient<R> {
    inner: R,
    deadline: Instant,
}

impl<R> Patient<R> {
    pub fn new(inner: R, timeout: Duration) -> Self {
        Patient {
            inner,
            deadline: Instant::now() + timeout,
        }
    }
}

impl<R: Read> Read for Patient<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) && Instant::now() < self.deadline => {}
                other => return other,
            }
        }
    }
}

/// Reads until EOF and compares with the pattern; returns the number of bytes that
/// matched (an error as soon as one does not, or on more or fewer than `bytes`).
fn verify_echo(reader: &mut impl Read, bytes: u64) -> Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut expected = vec![0u8; CHUNK];
    let mut received = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("reading the echo after {received} of {bytes} bytes")
                });
            }
        };
        if received + n as u64 > bytes {
            bail!(
                "echo longer than what was sent: {} bytes for {bytes}",
                received + n as u64
            );
        }
        pattern(received, &mut expected[..n]);
        if let Some(i) = buf[..n]
            .iter()
            .zip(&expected[..n])
            .position(|(a, b)| a != b)
        {
            bail!("echo differs at byte {}", received + i as u64);
        }
        received += n as u64;
    }
    if received != bytes {
        bail!("echo ended after {received} of {bytes} bytes");
    }
    Ok(received)
}

/// Fills `buf` with the deterministic pseudo-random byte stream starting at `offset`
/// (a splitmix64 of each 8-byte word index), so any chunking produces the same bytes.
pub fn pattern(offset: u64, buf: &mut [u8]) {
    for (i, byte) in buf.iter_mut().enumerate() {
        let pos = offset + i as u64;
        let mut x = (pos / 8).wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        *byte = x.to_le_bytes()[(pos % 8) as usize];
    }
}

/// A plain HTTP/1.1 `GET path` to `addr` with `Connection: close`; returns the status
/// code and the body (chunked transfer encoding decoded, lossily UTF-8).
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr} for GET {path}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: mesh-test\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("sending GET {path} to {addr}"))?;
    let mut reader = BufReader::new(stream);

    let mut status_line = String::new();
    reader
        .read_line(&mut status_line)
        .with_context(|| format!("reading the status line of GET {path} from {addr}"))?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad HTTP status line from {addr}: {status_line:?}"))?;

    let mut content_length = None;
    let mut chunked = false;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            bail!("connection closed inside the response headers from {addr}");
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            }
        }
    }

    let mut body = Vec::new();
    if chunked {
        loop {
            if Instant::now() > deadline {
                bail!("GET {path} from {addr} timed out");
            }
            let mut size_line = String::new();
            reader.read_line(&mut size_line)?;
            let size_hex = size_line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size_hex, 16)
                .with_context(|| format!("bad chunk size {size_line:?} from {addr}"))?;
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf)?;
        }
    } else if let Some(len) = content_length {
        body.resize(len, 0);
        reader
            .read_exact(&mut body)
            .with_context(|| format!("reading a {len}-byte body from {addr}"))?;
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Holds a connection open for `duration`, echoing 1 KiB every 20 ms, to observe a live
/// connection being cut. `Ok(())` if it lasted; the error says when and how it broke.
pub fn hold(to: SocketAddr, duration: Duration) -> Result<()> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))
        .with_context(|| format!("connecting to {to}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .context("reading the PEER line")?;
    let chunk = [0x5au8; 1024];
    let mut back = [0u8; 1024];
    while start.elapsed() < duration {
        let step = stream
            .write_all(&chunk)
            .and_then(|()| reader.read_exact(&mut back));
        if let Err(e) = step {
            bail!(
                "connection broke after {} ms: {e}",
                start.elapsed().as_millis()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = stream.shutdown(Shutdown::Both);
    Ok(())
}

/// What [`churn`] counted.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ChurnReport {
    /// Connections attempted, and those that carried their exchange to the end.
    pub attempts: u64,
    pub ok: u64,
    /// Failures by kind: refused (nothing listened), reset, timed out, anything else.
    pub refused: u64,
    pub reset: u64,
    pub timeout: u64,
    pub other: u64,
    /// The first failures, as text.
    pub errors: Vec<String>,
}

impl ChurnReport {
    pub fn failures(&self) -> u64 {
        self.refused + self.reset + self.timeout + self.other
    }

    fn add(&mut self, other: ChurnReport) {
        self.attempts += other.attempts;
        self.ok += other.ok;
        self.refused += other.refused;
        self.reset += other.reset;
        self.timeout += other.timeout;
        self.other += other.other;
        self.errors.extend(other.errors);
        self.errors.truncate(10);
    }
}

/// New connections to each echo server in `to`, one after another per target (a thread
/// each) for `duration`: connect, read the PEER line, send a few bytes, read them back,
/// close. Every failure is counted by its kind.
pub fn churn(to: &[SocketAddr], duration: Duration) -> ChurnReport {
    let threads: Vec<_> = to
        .iter()
        .map(|&to| std::thread::spawn(move || churn_one(to, duration)))
        .collect();
    let mut report = ChurnReport::default();
    for t in threads {
        report.add(t.join().unwrap_or_default());
    }
    report
}

fn churn_one(to: SocketAddr, duration: Duration) -> ChurnReport {
    let start = Instant::now();
    let mut report = ChurnReport::default();
    while start.elapsed() < duration {
        report.attempts += 1;
        match short_exchange(to, Duration::from_secs(5)) {
            Ok(()) => report.ok += 1,
            Err(e) => {
                match e.kind() {
                    io::ErrorKind::ConnectionRefused => report.refused += 1,
                    io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof => report.reset += 1,
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => report.timeout += 1,
                    _ => report.other += 1,
                }
                if report.errors.len() < 10 {
                    report.errors.push(format!(
                        "{to} after {} ms: {e}",
                        start.elapsed().as_millis()
                    ));
                }
            }
        }
    }
    report
}

/// One short connection to an echo server: connect, read the PEER line, send a few bytes,
/// read them back, close; `timeout` for the connect and for each read and write.
pub fn short_exchange(to: SocketAddr, timeout: Duration) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&to, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let ping = *b"churn-ping-0123";
    stream.write_all(&ping)?;
    let mut back = [0u8; 15];
    reader.read_exact(&mut back)?;
    if back != ping {
        return Err(io::Error::other("the echo differs"));
    }
    stream.shutdown(Shutdown::Write)?;
    // The server's close: the whole exchange ended cleanly.
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest)?;
    Ok(())
}

/// Opens `count` connections to an echo server at `to`, exchanges one byte on each (so
/// every direction carried data), prints `READY <count>` and keeps them open and idle for
/// `duration`.
pub fn hold_idle(to: SocketAddr, count: usize, duration: Duration) -> Result<()> {
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .with_context(|| format!("connection {i} to {to}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .with_context(|| format!("connection {i}: reading the PEER line"))?;
        stream.write_all(b"x")?;
        let mut back = [0u8; 1];
        reader
            .read_exact(&mut back)
            .with_context(|| format!("connection {i}: reading the echo"))?;
        held.push(stream);
    }
    println!("{READY_PREFIX} {count}");
    io::stdout().flush()?;
    std::thread::sleep(duration);
    Ok(())
}

/// Opens `count` connections to `to`, sends `send` on each and nothing more (a handshake
/// begun and never finished), prints `READY <opened>`, and holds them for `duration`.
/// Raises its own descriptor limit first.
pub fn half_open(to: SocketAddr, count: usize, send: &[u8], duration: Duration) -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))
            .with_context(|| format!("connection {i} to {to}"))?;
        // The peer may already have closed it; the connection still counts as made.
        let _ = stream.write_all(send);
        held.push(stream);
    }
    println!("{READY_PREFIX} {}", held.len());
    io::stdout().flush()?;
    std::thread::sleep(duration);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_does_not_depend_on_chunking() {
        let mut whole = vec![0u8; 1000];
        pattern(5, &mut whole);
        let mut pieces = vec![0u8; 1000];
        for (i, chunk) in pieces.chunks_mut(7).enumerate() {
            pattern(5 + 7 * i as u64, chunk);
        }
        assert_eq!(whole, pieces);
        assert!(
            whole.windows(8).any(|w| w[0] != w[1]),
            "pattern is not constant"
        );
    }

    #[test]
    fn echo_over_loopback_is_verified_byte_exact() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || accept_loop(listener));
        for eager in [false, true] {
            let report = connect(addr, 3 * CHUNK as u64 + 17, Duration::from_secs(5), eager);
            assert!(report.ok, "{report:?}");
            assert_eq!(report.received, 3 * CHUNK as u64 + 17);
            assert_eq!(report.server_saw_peer, report.local);
            assert_eq!(report.getpeername, Some(addr));
        }
    }

    #[test]
    fn a_server_that_closes_at_once_is_a_failure_not_a_hang() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let _ = listener.accept();
        });
        let report = connect(addr, 10, Duration::from_secs(5), false);
        assert!(!report.ok);
        assert!(report.error.unwrap().contains("PEER"));
    }

    #[test]
    fn http_get_reads_content_length_and_chunked_bodies() {
        for response in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nready",
            "HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nrea\r\n2\r\ndy\r\n0\r\n\r\n",
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            std::thread::spawn(move || {
                let (mut stream, _) = listener.accept().unwrap();
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf);
                stream.write_all(response.as_bytes()).unwrap();
            });
            let (status, body) = http_get(addr, "/healthz/ready", Duration::from_secs(5)).unwrap();
            assert!(status == 200 || status == 503);
            assert_eq!(body, "ready");
        }
    }
}
