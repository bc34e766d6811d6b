//! DNS for kernel tests and benchmarks: a small authoritative server (what the test pods'
//! "cluster DNS" is), a raw query client that reports where the answer came from, and
//! `getaddrinfo` under a resolv.conf of the test's (bind-mounted in a private mount
//! namespace of the calling process).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_agent::dns::wire;
use serde::{Deserialize, Serialize};

/// The TTL of the test server's answers (distinct from the mesh resolver's own).
pub const SERVER_TTL: u32 = 123;

/// What the test server answers.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    pub port: u16,
    /// Names (lowercase) and their address; any other name is NXDOMAIN.
    pub answers: BTreeMap<String, IpAddr>,
    /// Names answered over UDP with the truncation flag and no record.
    pub truncate: Vec<String>,
    /// Answer nothing at all (a server that is down without refusing).
    pub mute: bool,
}

/// Serves `config` over UDP and TCP on 0.0.0.0:PORT until killed; prints `READY <port>`,
/// then `QUERY <udp|tcp> <name> <type>` for every query.
pub fn serve(config: ServerConfig) -> Result<std::convert::Infallible> {
    let addr = SocketAddr::from(([0, 0, 0, 0], config.port));
    let udp = UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
    let tcp = TcpListener::bind(addr).with_context(|| format!("binding TCP {addr}"))?;
    let config = Arc::new(config);
    println!("READY {}", config.port);
    let _ = std::io::stdout().flush();
    let tcp_config = config.clone();
    std::thread::spawn(move || {
        for stream in tcp.incoming().flatten() {
            let config = tcp_config.clone();
            std::thread::spawn(move || serve_tcp(stream, &config));
        }
    });
    let mut buf = [0u8; 4096];
    loop {
        let (n, from) = udp.recv_from(&mut buf)?;
        if let Some(answer) = respond(&buf[..n], &config, false) {
            let _ = udp.send_to(&answer, from);
        }
    }
}

fn serve_tcp(mut stream: TcpStream, config: &ServerConfig) {
    loop {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).is_err() {
            return;
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut msg).is_err() {
            return;
        }
        let Some(answer) = respond(&msg, config, true) else {
            return;
        };
        let mut out = (answer.len() as u16).to_be_bytes().to_vec();
        out.extend(answer);
        if stream.write_all(&out).is_err() {
            return;
        }
    }
}

fn respond(msg: &[u8], config: &ServerConfig, tcp: bool) -> Option<Vec<u8>> {
    if config.mute {
        return None;
    }
    let query = wire::parse_query(msg)?;
    println!(
        "QUERY {} {} {}",
        if tcp { "tcp" } else { "udp" },
        query.name,
        query.qtype
    );
    let _ = std::io::stdout().flush();
    if !tcp && config.truncate.contains(&query.name) {
        let mut out = wire::answer(msg, &query, &[], SERVER_TTL, wire::CLASSIC_UDP);
        out[2] |= 0x02; // TC
        return Some(out);
    }
    match config.answers.get(&query.name) {
        Some(addr) => Some(wire::answer(
            msg,
            &query,
            &[*addr],
            SERVER_TTL,
            usize::from(u16::MAX),
        )),
        None => {
            let mut out = wire::answer(msg, &query, &[], SERVER_TTL, usize::from(u16::MAX));
            out[2] &= !0x04; // not authoritative for what it does not have
            out[3] = (out[3] & 0xf0) | 3; // NXDOMAIN
            Some(out)
        }
    }
}

/// What one raw query got.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryReport {
    /// Where the answer came from (UDP); the server asked, for TCP.
    pub from: SocketAddr,
    pub rcode: u16,
    pub truncated: bool,
    pub addrs: Vec<IpAddr>,
    pub ttls: Vec<u32>,
}

/// Asks `server` for `name`'s `qtype` records, once, over UDP (unconnected, as musl does) or
/// TCP.
pub fn query(server: SocketAddr, name: &str, qtype: u16, tcp: bool) -> Result<QueryReport> {
    let id = std::process::id() as u16 ^ 0x5a5a;
    let msg = wire::query(id, name, qtype);
    let timeout = Duration::from_secs(5);
    let (answer, from) = if tcp {
        let mut s = TcpStream::connect_timeout(&server, timeout)
            .with_context(|| format!("connecting to {server}"))?;
        s.set_read_timeout(Some(timeout))?;
        let mut out = (msg.len() as u16).to_be_bytes().to_vec();
        out.extend(&msg);
        s.write_all(&out)?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len)
            .context("reading the answer's length")?;
        let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut answer).context("reading the answer")?;
        (answer, server)
    } else {
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let s = UdpSocket::bind(bind)?;
        s.set_read_timeout(Some(timeout))?;
        s.send_to(&msg, server)
            .with_context(|| format!("sending to {server}"))?;
        let mut buf = vec![0u8; 65535];
        let (n, from) = s
            .recv_from(&mut buf)
            .with_context(|| format!("no answer from {server}"))?;
        buf.truncate(n);
        (buf, from)
    };
    let parsed = wire::parse_answer(&answer).context("a malformed answer")?;
    if parsed.id != id {
        bail!("an answer to another query (id {} for {id})", parsed.id);
    }
    Ok(QueryReport {
        from,
        rcode: parsed.rcode,
        truncated: parsed.truncated,
        addrs: parsed.addrs,
        ttls: parsed.ttls,
    })
}

/// `getaddrinfo(name)` with `resolv_conf` as /etc/resolv.conf for this process (a private
/// mount namespace; call before any thread starts): the addresses, sorted.
pub fn getaddrinfo(name: &str, resolv_conf: Option<&Path>) -> Result<Vec<IpAddr>> {
    if let Some(conf) = resolv_conf {
        use nix::mount::{MsFlags, mount};
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .context("making / private")?;
        mount(
            Some(conf),
            "/etc/resolv.conf",
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("bind-mounting {} on /etc/resolv.conf", conf.display()))?;
    }
    let mut addrs: Vec<IpAddr> = (name, 0)
        .to_socket_addrs()
        .with_context(|| format!("getaddrinfo({name:?})"))?
        .map(|a| a.ip())
        .collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

/// What a load of queries got: counts and answer times.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadReport {
    pub sent: u64,
    pub answered: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// Asks `server` for `name` (A) at `rate` queries/s for `duration` over UDP from one socket
/// (IDs tell the answers apart); an answer later than 1 s counts as lost.
pub fn load(server: SocketAddr, name: &str, rate: u32, duration: Duration) -> Result<LoadReport> {
    let socket = UdpSocket::bind(("0.0.0.0", 0))?;
    // Room for a burst of answers (root: beyond rmem_max), so that the client is not what
    // loses them.
    let room: usize = 16 << 20;
    if nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBufForce, &room).is_err()
    {
        socket2::SockRef::from(&socket).set_recv_buffer_size(room)?;
    }
    socket.connect(server)?;
    let receiver = socket.try_clone()?;
    receiver.set_read_timeout(Some(Duration::from_millis(100)))?;
    let total = u64::from(rate) * duration.as_secs().max(1);
    let start = Instant::now();
    let sent_at: Arc<Vec<std::sync::atomic::AtomicU64>> = Arc::new(
        (0..65536)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect(),
    );
    let recv_sent = sent_at.clone();
    let reader = std::thread::spawn(move || {
        let mut times = Vec::with_capacity(total as usize);
        let mut buf = [0u8; 2048];
        let quiet_end = duration + Duration::from_secs(1);
        while start.elapsed() < quiet_end {
            let Ok(n) = receiver.recv(&mut buf) else {
                continue;
            };
            let Some(id) = wire::id_of(&buf[..n]) else {
                continue;
            };
            let now = start.elapsed().as_nanos() as u64;
            let sent = recv_sent[usize::from(id)].swap(0, std::sync::atomic::Ordering::Relaxed);
            if sent != 0 && now - sent < 1_000_000_000 {
                times.push((now - sent) as f64 / 1000.0);
            }
        }
        times
    });
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut sent = 0u64;
    while sent < total {
        let due = start + interval.mul_f64(sent as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let id = (sent % 65536) as u16;
        let msg = wire::query(id, name, wire::TYPE_A);
        // Nanoseconds since start, never 0 (0 marks "no query outstanding").
        let now = start.elapsed().as_nanos() as u64 + 1;
        sent_at[usize::from(id)].store(now, std::sync::atomic::Ordering::Relaxed);
        socket.send(&msg)?;
        sent += 1;
    }
    let mut times = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    times.sort_by(f64::total_cmp);
    let at = |q: f64| {
        times
            .get(((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    Ok(LoadReport {
        sent,
        answered: times.len() as u64,
        p50_us: at(0.5),
        p99_us: at(0.99),
        max_us: times.last().copied().unwrap_or(0.0),
    })
}
