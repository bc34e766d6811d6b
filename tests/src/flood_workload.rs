//! A fast sender and a slow reader, for back-pressure: the sender writes as fast as the
//! kernel takes bytes for a while and reports how many it took, and the node's TCP memory
//! before and after; the reader does not read at all for a while, then reads everything
//! and checks every byte's place in the pattern.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::workload::{bind_dual_stack, pattern};

const CHUNK: usize = 64 * 1024;

/// What a slow reader says after reading a connection to its end: `SINK <bytes> <ok|bad>`.
const SINK_PREFIX: &str = "SINK ";

/// Runs the slow reader on `[::]:port` until the process is killed: each connection is
/// left unread for `pause`, then read to its end, checked against the pattern, and
/// answered with `SINK <bytes> ok` (or `bad`, with the first wrong offset in the log).
pub fn serve_slow(port: u16, pause: Duration) -> Result<std::convert::Infallible> {
    let listener = bind_dual_stack(port)?;
    println!("{} {port}", crate::workload::READY_PREFIX);
    io::stdout().flush().ok();
    loop {
        let (stream, peer) = listener.accept().context("accepting")?;
        std::thread::spawn(move || {
            if let Err(e) = sink(stream, pause) {
                eprintln!("slow reader: {peer}: {e:#}");
            }
        });
    }
}

fn sink(mut stream: TcpStream, pause: Duration) -> Result<()> {
    std::thread::sleep(pause);
    let (mut total, mut expected, mut got) = (0u64, vec![0; CHUNK], vec![0; CHUNK]);
    let mut ok = true;
    loop {
        let n = stream.read(&mut got).context("reading")?;
        if n == 0 {
            break;
        }
        pattern(total, &mut expected[..n]);
        if ok && got[..n] != expected[..n] {
            let at = got[..n]
                .iter()
                .zip(&expected[..n])
                .position(|(a, b)| a != b);
            eprintln!(
                "slow reader: byte {} out of place",
                total + at.unwrap_or(0) as u64
            );
            ok = false;
        }
        total += n as u64;
    }
    let verdict = if ok { "ok" } else { "bad" };
    stream
        .write_all(format!("{SINK_PREFIX}{total} {verdict}\n").as_bytes())
        .context("answering")?;
    Ok(())
}

/// What [`flood`] reports.
#[derive(Debug, Serialize, Deserialize)]
pub struct FloodReport {
    /// Bytes the kernel took during the flood (the reader was not reading).
    pub written: u64,
    /// The node's TCP memory (`/proc/net/sockstat`, bytes) before and at the end of the
    /// flood.
    pub tcp_mem_before: u64,
    pub tcp_mem_during: u64,
    /// What the reader counted once it read everything, and whether every byte was in
    /// its place.
    pub read: u64,
    pub in_order: bool,
}

/// Connects to a slow reader at `to`, writes the pattern without blocking for `flood`
/// (waiting for writability between refusals), then ends the stream and waits (up to
/// `timeout`) for the reader's count.
pub fn flood(to: SocketAddr, flood: Duration, timeout: Duration) -> Result<FloodReport> {
    let tcp_mem_before = tcp_mem_bytes()?;
    let mut stream =
        TcpStream::connect_timeout(&to, timeout).with_context(|| format!("connecting to {to}"))?;
    stream.set_nonblocking(true)?;
    let started = Instant::now();
    let (mut written, mut buf) = (0u64, vec![0; CHUNK]);
    while started.elapsed() < flood {
        pattern(written, &mut buf);
        match stream.write(&buf) {
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = flood.saturating_sub(started.elapsed());
                wait_writable(&stream, left.min(Duration::from_millis(50)))?;
            }
            Err(e) => return Err(e).with_context(|| format!("writing after {written} bytes")),
        }
    }
    let tcp_mem_during = tcp_mem_bytes()?;
    // Whatever the kernel refused so far it takes as the reader reads; then the count
    // comes back. Non-blocking throughout, as an event-driven client reads: a socket in
    // the kernel's socket map can end a blocking read with EAGAIN (ADR 016).
    stream
        .shutdown(Shutdown::Write)
        .context("ending the stream")?;
    let line = read_line_polling(&mut stream, timeout)?;
    let Some(rest) = line.trim().strip_prefix(SINK_PREFIX) else {
        bail!("the reader answered {line:?}");
    };
    let mut words = rest.split_whitespace();
    let read = words
        .next()
        .and_then(|w| w.parse().ok())
        .with_context(|| format!("the reader answered {line:?}"))?;
    Ok(FloodReport {
        written,
        tcp_mem_before,
        tcp_mem_during,
        read,
        in_order: words.next() == Some("ok"),
    })
}

/// One line from a non-blocking `stream`, within `timeout`.
fn read_line_polling(stream: &mut TcpStream, timeout: Duration) -> Result<String> {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0; 256];
    while !got.contains(&b'\n') {
        if started.elapsed() > timeout {
            bail!(
                "no answer after {timeout:?} (got {:?})",
                String::from_utf8_lossy(&got)
            );
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_for(
                    stream,
                    nix::poll::PollFlags::POLLIN,
                    Duration::from_millis(50),
                )?;
            }
            Err(e) => return Err(e).context("reading the reader's count"),
        }
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

fn wait_writable(stream: &TcpStream, timeout: Duration) -> Result<()> {
    wait_for(stream, nix::poll::PollFlags::POLLOUT, timeout)
}

fn wait_for(stream: &TcpStream, events: nix::poll::PollFlags, timeout: Duration) -> Result<()> {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(stream.as_fd(), events)];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)).context("poll")?;
    Ok(())
}

/// The node's TCP memory in bytes: `/proc/net/sockstat`'s `TCP: ... mem <pages>`, which
/// counts every namespace's sockets.
pub fn tcp_mem_bytes() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").context("reading sockstat")?;
    let pages = text
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words
                .iter()
                .position(|w| *w == "mem")
                .and_then(|i| words.get(i + 1))
                .and_then(|w| w.parse::<u64>().ok())
        })
        .context("no TCP mem in /proc/net/sockstat")?;
    Ok(pages * 4096)
}
