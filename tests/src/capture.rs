//! A packet capture for kernel tests, without libpcap: an `AF_PACKET` socket opened inside a
//! network namespace records the TCP segments seen there, so a test can check what actually
//! crossed a link (plaintext or TLS).
//!
//! # What is recorded
//!
//! Ethernet II frames (and loopback) carrying IPv4 or IPv6 TCP or UDP; VLAN-tagged frames,
//! fragments, other protocols and non-Ethernet devices are skipped. Frames are read whole up to
//! [`MAX_FRAME`] bytes; on veth, TCP segments arrive GSO/GRO-merged (up to 64 KiB), so a
//! [`Segment`] may carry far more than one MTU of payload.
//!
//! # Duplicates
//!
//! A packet socket sees a frame each time it crosses an interface of the namespace: a bridge
//! (the cluster's fabric) sees a forwarded frame once arriving on the ingress port and once
//! leaving on the egress port (`PACKET_OUTGOING`), a router once on each side, loopback once
//! sent and once received. Dropping every outgoing frame would lose what the namespace itself
//! sends (a capture in a pod would then see one direction only, and a "no plaintext" check
//! would pass vacuously), so instead each outgoing frame is matched against the incoming ones
//! and the other way round: the same IP packet (compared without TTL / hop limit and the IPv4
//! header checksum, which routing changes) seen once in and once out is recorded once, at its
//! first sighting. The result is every packet that entered, left or crossed the namespace,
//! once; the exceptions are a bridge flooding an unknown-destination frame out of several ports
//! (extra copies stay, rare for TCP once MACs are learnt) and identical packets that are not
//! duplicates (a retransmission counts as a copy of its original only when one was sent out
//! and the other came in, never for two sightings in the same direction).
//!
//! TCP's own duplicates are real traffic and are kept: even a veth drops under load (the
//! per-CPU backlog), so retransmissions and reordering happen; [`stream`] puts a direction
//! back together by sequence number, each byte once.
//!
//! With an interface given, only frames on that interface are recorded (filtered by ifindex as
//! they are read; binding a packet socket needs a `sockaddr_ll`, which socket2 cannot build
//! without `unsafe`), both directions, and a frame crosses one interface once per direction.
#![forbid(unsafe_code)]

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::sys::socket::{LinkAddr, recvfrom, setsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};

use crate::workload::enter_netns;

/// Largest frame read whole (a GSO super-packet with BIG TCP off is at most 64 KiB + headers).
pub const MAX_FRAME: usize = 256 * 1024;
/// Receive buffer asked for (`SO_RCVBUFFORCE`, so not capped by `rmem_max` when root).
const RECV_BUFFER: usize = 64 << 20;
/// How often the capture thread looks at its stop flag while idle.
const POLL: Duration = Duration::from_millis(50);
/// How long `stop` keeps draining frames already queued on the socket.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// How many unmatched sightings are remembered for duplicate matching.
const DEDUPE_WINDOW: usize = 1 << 16;

const ETH_P_ALL: u16 = 0x0003;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_SYN: u8 = 0x02;

/// One TCP segment (or UDP datagram) as seen on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// A UDP datagram (`syn` false, `seq` 0), not a TCP segment.
    pub udp: bool,
    /// The SYN flag is set (connection open or its answer).
    pub syn: bool,
    /// TCP sequence number (of the SYN itself when `syn`; the payload then starts at `seq + 1`).
    pub seq: u32,
    /// TCP payload (may be empty).
    pub payload: Vec<u8>,
}

/// A running capture in one network namespace; [`stop`](Self::stop) returns what it saw.
/// Dropping it without `stop` ends the capture thread and discards the segments.
#[derive(Debug)]
pub struct Capture {
    netns: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Vec<Segment>>>>,
}

impl Capture {
    /// Starts capturing in the network namespace at `netns_path` (e.g. `/run/netns/NAME`), on
    /// every interface or only on `iface`. Returns once the socket is open: everything sent
    /// after this is seen.
    pub fn start(netns_path: &Path, iface: Option<&str>) -> Result<Capture> {
        let netns = netns_path.to_path_buf();
        let iface = iface.map(str::to_owned);
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let (netns, stop) = (netns.clone(), stop.clone());
            std::thread::Builder::new()
                .name("capture".into())
                .spawn(move || {
                    // A dedicated thread: it stays in the namespace until it ends.
                    let socket = match open(&netns, iface.as_deref()) {
                        Ok(opened) => {
                            let _ = ready_tx.send(Ok(()));
                            opened
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return Ok(Vec::new());
                        }
                    };
                    run(socket, &stop)
                })
                .context("spawning the capture thread")?
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Capture {
                netns,
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                bail!(
                    "capture thread in {} ended before opening its socket",
                    netns.display()
                )
            }
        }
    }

    /// Stops capturing (after reading what is already queued) and returns every TCP segment
    /// seen, in arrival order (see [`stream`] to put a direction together).
    ///
    /// # Panics
    ///
    /// If reading from the socket failed mid-capture: a test must not mistake a broken
    /// capture for "nothing was sent".
    pub fn stop(mut self) -> Vec<Segment> {
        match self.finish() {
            Ok(segments) => segments,
            Err(e) => panic!("capture in {}: {e:#}", self.netns.display()),
        }
    }

    fn finish(&mut self) -> Result<Vec<Segment>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| anyhow::anyhow!("the capture thread panicked"))?,
            None => Ok(Vec::new()),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// The opened socket and the interface filter.
struct Opened {
    socket: Socket,
    ifindex: Option<usize>,
}

/// Enters `netns` (this thread, for good) and opens the packet socket there.
fn open(netns: &Path, iface: Option<&str>) -> Result<Opened> {
    enter_netns(netns)?;
    let ifindex = match iface {
        Some(name) => Some(
            nix::net::if_::if_nametoindex(name)
                .with_context(|| format!("no interface {name} in {}", netns.display()))?
                as usize,
        ),
        None => None,
    };
    let protocol = Protocol::from(i32::from(ETH_P_ALL.to_be()));
    let socket = Socket::new(Domain::PACKET, Type::RAW, Some(protocol))
        .with_context(|| format!("opening an AF_PACKET socket in {}", netns.display()))?;
    if setsockopt(&socket, sockopt::RcvBufForce, &RECV_BUFFER).is_err() {
        socket
            .set_recv_buffer_size(RECV_BUFFER)
            .context("setting the capture socket's receive buffer")?;
    }
    socket
        .set_read_timeout(Some(POLL))
        .context("setting the capture socket's read timeout")?;
    Ok(Opened { socket, ifindex })
}

/// Reads frames until `stop`, then drains what is queued.
fn run(opened: Opened, stop: &AtomicBool) -> Result<Vec<Segment>> {
    let Opened { socket, ifindex } = opened;
    let fd = socket.as_raw_fd();
    let mut buf = vec![0u8; MAX_FRAME];
    let mut dedupe = Dedupe::default();
    let mut segments = Vec::new();
    let mut drain_until: Option<Instant> = None;
    loop {
        if drain_until.is_none() && stop.load(Ordering::Relaxed) {
            socket
                .set_nonblocking(true)
                .context("draining the capture socket")?;
            drain_until = Some(Instant::now() + DRAIN_LIMIT);
        }
        if drain_until.is_some_and(|t| Instant::now() > t) {
            break;
        }
        let (len, addr) = match recvfrom::<LinkAddr>(fd, &mut buf) {
            Ok(read) => read,
            Err(Errno::EAGAIN | Errno::EINTR) if drain_until.is_none() => continue,
            Err(Errno::EAGAIN) => break,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e).context("reading from the capture socket"),
        };
        let Some(addr) = addr else { continue };
        if ifindex.is_some_and(|i| i != addr.ifindex()) {
            continue;
        }
        let hatype = addr.hatype();
        if hatype != libc::ARPHRD_ETHER && hatype != libc::ARPHRD_LOOPBACK {
            continue;
        }
        let frame = &buf[..len];
        let Some(ip) = ip_packet(frame) else { continue };
        if !dedupe.first_sighting(ip, addr.pkttype() == libc::PACKET_OUTGOING) {
            continue;
        }
        if let Some(segment) = parse_ip(ip) {
            segments.push(segment);
        }
    }
    Ok(segments)
}

/// Matches each packet seen leaving against those seen arriving and vice versa (module docs).
#[derive(Default)]
struct Dedupe {
    /// Packet key -> unmatched sightings (positive: incoming, negative: outgoing).
    pending: HashMap<u64, i64>,
    /// Sightings in order, to forget the oldest beyond the window.
    order: VecDeque<(u64, bool)>,
}

impl Dedupe {
    /// Whether this sighting should be recorded (it is not the second copy of a packet).
    fn first_sighting(&mut self, ip: &[u8], outgoing: bool) -> bool {
        let key = packet_key(ip);
        let step = if outgoing { -1 } else { 1 };
        let count = self.pending.entry(key).or_insert(0);
        if *count != 0 && count.signum() == -step {
            // The opposite sighting of a packet already recorded.
            *count += step;
            if *count == 0 {
                self.pending.remove(&key);
            }
            return false;
        }
        *count += step;
        self.order.push_back((key, outgoing));
        while self.order.len() > DEDUPE_WINDOW {
            let Some((old, old_outgoing)) = self.order.pop_front() else {
                break;
            };
            if let Some(c) = self.pending.get_mut(&old) {
                // Forget one unmatched sighting of that direction, if any is left.
                let old_step = if old_outgoing { -1 } else { 1 };
                if c.signum() == old_step {
                    *c -= old_step;
                }
                if *c == 0 {
                    self.pending.remove(&old);
                }
            }
        }
        true
    }
}

/// A hash of the IP packet without what forwarding changes (TTL / hop limit, IPv4 checksum):
/// the headers, the first 64 payload bytes of the transport and the length.
fn packet_key(ip: &[u8]) -> u64 {
    let mut head = [0u8; 128];
    let n = ip.len().min(head.len());
    head[..n].copy_from_slice(&ip[..n]);
    match ip.first().map(|b| b >> 4) {
        Some(4) if n >= 20 => {
            head[8] = 0; // TTL
            head[10] = 0; // header checksum
            head[11] = 0;
        }
        Some(6) if n >= 40 => head[7] = 0, // hop limit
        _ => {}
    }
    let mut hasher = DefaultHasher::new();
    ip.len().hash(&mut hasher);
    head[..n].hash(&mut hasher);
    hasher.finish()
}

/// The IP packet inside an Ethernet II frame, `None` for anything else (VLAN, ARP...).
fn ip_packet(frame: &[u8]) -> Option<&[u8]> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    match ethertype {
        ETH_P_IP | ETH_P_IPV6 => Some(&frame[14..]),
        _ => None,
    }
}

/// Parses one Ethernet II frame into a TCP segment or UDP datagram, `None` for anything else.
pub fn parse_frame(frame: &[u8]) -> Option<Segment> {
    parse_ip(ip_packet(frame)?)
}

/// Parses an IPv4 or IPv6 packet carrying TCP or UDP; trailing link padding is cut by the IP
/// length.
fn parse_ip(ip: &[u8]) -> Option<Segment> {
    let (src, dst, protocol, tcp) = match ip.first()? >> 4 {
        4 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            let frag = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]);
            // More fragments, or not the first: not a whole segment.
            let protocol = *ip.get(9)?;
            if ihl < 20 || frag & 0x3fff != 0 || !matches!(protocol, IPPROTO_TCP | IPPROTO_UDP) {
                return None;
            }
            // GSO super-packets may carry 0 here; then the frame length is the packet length.
            let end = if total == 0 {
                ip.len()
            } else {
                total.min(ip.len())
            };
            let src = Ipv4Addr::from(<[u8; 4]>::try_from(ip.get(12..16)?).ok()?);
            let dst = Ipv4Addr::from(<[u8; 4]>::try_from(ip.get(16..20)?).ok()?);
            (
                IpAddr::from(src),
                IpAddr::from(dst),
                protocol,
                ip.get(ihl..end)?,
            )
        }
        6 => {
            let payload_len = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            let mut next = *ip.get(6)?;
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(ip.get(8..24)?).ok()?);
            let dst = Ipv6Addr::from(<[u8; 16]>::try_from(ip.get(24..40)?).ok()?);
            // Payload length 0: a jumbogram (BIG TCP); the frame length is the packet length.
            let end = if payload_len == 0 {
                ip.len()
            } else {
                (40 + payload_len).min(ip.len())
            };
            let mut at = 40;
            // Hop-by-hop, routing and destination options; a fragment header ends it.
            while matches!(next, 0 | 43 | 60) {
                next = *ip.get(at)?;
                at += (usize::from(*ip.get(at + 1)?) + 1) * 8;
            }
            if !matches!(next, IPPROTO_TCP | IPPROTO_UDP) {
                return None;
            }
            (IpAddr::from(src), IpAddr::from(dst), next, ip.get(at..end)?)
        }
        _ => return None,
    };
    let sport = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    if protocol == IPPROTO_UDP {
        return Some(Segment {
            src: SocketAddr::new(src, sport),
            dst: SocketAddr::new(dst, dport),
            udp: true,
            syn: false,
            seq: 0,
            payload: tcp.get(8..)?.to_vec(),
        });
    }
    let seq = u32::from_be_bytes(tcp.get(4..8)?.try_into().ok()?);
    let offset = usize::from(tcp.get(12)? >> 4) * 4;
    let flags = *tcp.get(13)?;
    if offset < 20 {
        return None;
    }
    Some(Segment {
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
        udp: false,
        syn: flags & TCP_SYN != 0,
        seq,
        payload: tcp.get(offset..)?.to_vec(),
    })
}

/// Whether `needle` occurs in `haystack` (an empty needle always does). Linear time (KMP), so
/// looking for a 1 MiB payload in a few MiB of capture is instant even for repetitive data.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() {
        return true;
    }
    if needle.len() > haystack.len() {
        return false;
    }
    // failure[i]: length of the longest proper prefix of needle[..=i] that is also its suffix.
    let mut failure = vec![0usize; needle.len()];
    let mut k = 0;
    for i in 1..needle.len() {
        while k > 0 && needle[i] != needle[k] {
            k = failure[k - 1];
        }
        if needle[i] == needle[k] {
            k += 1;
        }
        failure[i] = k;
    }
    let mut matched = 0;
    for &byte in haystack {
        while matched > 0 && byte != needle[matched] {
            matched = failure[matched - 1];
        }
        if byte == needle[matched] {
            matched += 1;
            if matched == needle.len() {
                return true;
            }
        }
    }
    false
}

/// Bytes of the TCP stream from `src` to `dst`, put together by sequence number: each byte once
/// (retransmissions and reordered segments do happen on a busy veth), starting at the SYN when
/// it was captured, else at the lowest sequence number seen. Bytes the capture missed are
/// simply absent (the pieces either side are joined). Assumes one connection per address pair
/// in `segments` (no port reuse within one capture).
pub fn stream(segments: &[Segment], src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let flow: Vec<&Segment> = segments
        .iter()
        .filter(|s| !s.udp && s.src == src && s.dst == dst)
        .collect();
    let Some(first) = flow.first() else {
        return Vec::new();
    };
    // Sequence numbers relative to the first segment seen (wrapping), of each payload's start.
    let relative = |s: &Segment| {
        i64::from(s.seq.wrapping_add(u32::from(s.syn)).wrapping_sub(first.seq) as i32)
    };
    let start = flow
        .iter()
        .find(|s| s.syn)
        .map(|s| relative(s))
        .unwrap_or_else(|| flow.iter().map(|s| relative(s)).min().unwrap_or(0));
    let mut pieces: Vec<(i64, &[u8])> = flow
        .iter()
        .filter(|s| !s.payload.is_empty())
        .map(|s| (relative(s) - start, s.payload.as_slice()))
        .collect();
    // Stable: among pieces at the same position the first to arrive is used.
    pieces.sort_by_key(|&(at, _)| at);
    let mut out = Vec::new();
    // Stream position of the end of `out`.
    let mut end: i64 = 0;
    for (at, payload) in pieces {
        let piece_end = at + payload.len() as i64;
        if piece_end <= end {
            continue;
        }
        let skip = usize::try_from(end - at).unwrap_or(0);
        out.extend_from_slice(&payload[skip..]);
        end = piece_end;
    }
    out
}

/// Whether a TLS ClientHello (record type 0x16, handshake type 0x01) was sent to `port`: some
/// connection to that port starts its byte stream with one.
pub fn tls_client_hello_to(segments: &[Segment], port: u16) -> bool {
    let mut flows: Vec<(SocketAddr, SocketAddr)> = segments
        .iter()
        .filter(|s| !s.udp && s.dst.port() == port)
        .map(|s| (s.src, s.dst))
        .collect();
    flows.sort();
    flows.dedup();
    flows.into_iter().any(|(src, dst)| {
        let bytes = stream(segments, src, dst);
        // ContentType handshake, legacy version 3.x, length, HandshakeType client_hello.
        bytes.len() >= 6 && bytes[0] == 0x16 && bytes[1] == 0x03 && bytes[5] == 0x01
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet II frame with an IPv4 or IPv6 TCP segment.
    fn frame(src: SocketAddr, dst: SocketAddr, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut tcp = Vec::new();
        tcp.extend(src.port().to_be_bytes());
        tcp.extend(dst.port().to_be_bytes());
        tcp.extend([0, 0, 0, 1, 0, 0, 0, 0]); // seq, ack
        tcp.extend([5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]); // offset, flags, window, csum, urg
        tcp.extend(payload);
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
        match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend(ETH_P_IP.to_be_bytes());
                let total = (20 + tcp.len()) as u16;
                f.extend([0x45, 0]);
                f.extend(total.to_be_bytes());
                f.extend([0, 1, 0x40, 0, 64, IPPROTO_TCP, 0, 0]); // id, DF, ttl, proto, csum
                f.extend(s.octets());
                f.extend(d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend(ETH_P_IPV6.to_be_bytes());
                f.extend([0x60, 0, 0, 0]);
                f.extend((tcp.len() as u16).to_be_bytes());
                f.extend([IPPROTO_TCP, 64]);
                f.extend(s.octets());
                f.extend(d.octets());
            }
            _ => panic!("mixed families"),
        }
        f.extend(tcp);
        f
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_ipv4_and_ipv6_tcp() {
        for (src, dst) in [
            (addr("10.201.1.10:40000"), addr("10.201.2.10:8080")),
            (
                addr("[fd00:201:1::10]:40000"),
                addr("[fd00:201:2::10]:8080"),
            ),
        ] {
            let syn = parse_frame(&frame(src, dst, TCP_SYN, b"")).unwrap();
            assert_eq!((syn.src, syn.dst, syn.syn, syn.seq), (src, dst, true, 1));
            let data = parse_frame(&frame(src, dst, 0x18, b"hello")).unwrap();
            assert_eq!((data.syn, data.payload.as_slice()), (false, &b"hello"[..]));
        }
    }

    #[test]
    fn ethernet_padding_is_not_payload() {
        let mut f = frame(addr("10.0.0.1:1"), addr("10.0.0.2:2"), 0x10, b"");
        f.extend([0; 6]); // minimum frame size padding
        assert!(parse_frame(&f).unwrap().payload.is_empty());
    }

    #[test]
    fn skips_vlan_fragments_other_protocols_and_short_frames() {
        let good = frame(addr("10.0.0.1:1"), addr("10.0.0.2:2"), 0x18, b"x");
        let mut vlan = good.clone();
        vlan[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
        let mut icmp = good.clone();
        icmp[14 + 9] = 1;
        let mut fragment = good.clone();
        fragment[14 + 6] = 0x20; // more fragments
        let mut v6_fragment = frame(addr("[fd00::1]:1"), addr("[fd00::2]:2"), 0x18, b"x");
        v6_fragment[14 + 6] = 44;
        for (what, f) in [
            ("vlan", vlan),
            ("icmp", icmp),
            ("fragment", fragment),
            ("v6 fragment", v6_fragment),
            ("short", good[..30].to_vec()),
        ] {
            assert_eq!(parse_frame(&f), None, "{what}");
        }
    }

    #[test]
    fn a_udp_datagram_is_recorded_with_its_payload() {
        let mut f = frame(addr("10.0.0.1:5353"), addr("10.0.0.2:53"), 0x18, b"");
        f[14 + 9] = 17;
        // The UDP header: ports (as the TCP header's), length, checksum, then the payload.
        f.truncate(14 + 20 + 8);
        f.extend(b"query");
        let total = (f.len() - 14) as u16;
        f[14 + 2..14 + 4].copy_from_slice(&total.to_be_bytes());
        let s = parse_frame(&f).expect("a UDP datagram");
        assert!(s.udp && !s.syn);
        assert_eq!((s.src, s.dst), (addr("10.0.0.1:5353"), addr("10.0.0.2:53")));
        assert_eq!(s.payload, b"query");
        // Never part of a TCP stream.
        assert!(stream(std::slice::from_ref(&s), s.src, s.dst).is_empty());
    }

    #[test]
    fn ipv6_extension_headers_are_skipped() {
        let f = frame(addr("[fd00::1]:1"), addr("[fd00::2]:2"), 0x18, b"data");
        let (head, tcp) = f.split_at(14 + 40);
        let mut with_hbh = head.to_vec();
        with_hbh[14 + 6] = 0; // next header: hop-by-hop
        let len = u16::from_be_bytes([with_hbh[14 + 4], with_hbh[14 + 5]]) + 8;
        with_hbh[14 + 4..14 + 6].copy_from_slice(&len.to_be_bytes());
        with_hbh.extend([IPPROTO_TCP, 0, 1, 4, 0, 0, 0, 0]); // next: TCP, 8 bytes, PadN
        with_hbh.extend(tcp);
        assert_eq!(parse_frame(&with_hbh).unwrap().payload, b"data");
    }

    #[test]
    fn forwarded_copy_is_recorded_once_but_own_traffic_is_kept() {
        let mut dedupe = Dedupe::default();
        let a = frame(addr("10.0.0.1:1"), addr("10.0.0.2:2"), 0x18, b"a");
        let mut a_routed = a.clone();
        a_routed[14 + 8] -= 1; // TTL
        a_routed[14 + 10] = 0x12; // checksum
        let b = frame(addr("10.0.0.1:1"), addr("10.0.0.2:2"), 0x18, b"b");
        let ip = |f: &[u8]| ip_packet(f).unwrap().to_vec();
        // In on one port, out on another (bridged or routed): once.
        assert!(dedupe.first_sighting(&ip(&a), false));
        assert!(!dedupe.first_sighting(&ip(&a_routed), true));
        // Loopback order (out, then in): once.
        assert!(dedupe.first_sighting(&ip(&b), true));
        assert!(!dedupe.first_sighting(&ip(&b), false));
        // Sent by the namespace itself, twice (a retransmission): both kept.
        assert!(dedupe.first_sighting(&ip(&b), true));
        assert!(dedupe.first_sighting(&ip(&b), true));
        assert!(dedupe.pending.len() == 1 && dedupe.pending.values().all(|&c| c == -2));
    }

    #[test]
    fn contains_finds_needles_in_linear_time() {
        assert!(contains(b"abc", b""));
        assert!(contains(b"xxabcxx", b"abc"));
        assert!(!contains(b"xxabxcx", b"abc"));
        assert!(!contains(b"ab", b"abc"));
        assert!(contains(b"aaaaab", b"aaab"));
        assert!(contains(b"abababc", b"ababc"));
        // Worst case for a naive search: would be 10^12 steps.
        let mut hay = vec![0u8; 2 << 20];
        let needle = vec![0u8; 1 << 20];
        *hay.last_mut().unwrap() = 1;
        assert!(contains(&hay, &needle));
        let mut needle = needle;
        *needle.last_mut().unwrap() = 2;
        assert!(!contains(&hay, &needle));
    }

    fn segment(src: &str, dst: &str, seq: u32, payload: &[u8]) -> Segment {
        Segment {
            src: addr(src),
            dst: addr(dst),
            udp: false,
            syn: false,
            seq,
            payload: payload.to_vec(),
        }
    }

    fn syn(src: &str, dst: &str, seq: u32) -> Segment {
        Segment {
            syn: true,
            ..segment(src, dst, seq, b"")
        }
    }

    #[test]
    fn stream_puts_one_direction_together_by_sequence_number() {
        let (c, s) = ("10.0.0.1:1000", "10.0.0.2:80");
        let segments = [
            syn(c, s, 99),
            segment(c, s, 100, b"GET "),
            segment(s, c, 7, b"HTTP"),
            segment("10.0.0.1:1001", s, 100, b"other"),
            // Reordered, then retransmitted with more data, then an exact duplicate.
            segment(c, s, 110, b"/1.1"),
            segment(c, s, 104, b"/ HT"),
            segment(c, s, 104, b"/ HTTP/1.1\r\n"),
            segment(c, s, 100, b"GET "),
        ];
        assert_eq!(stream(&segments, addr(c), addr(s)), b"GET / HTTP/1.1\r\n");
        assert_eq!(stream(&segments, addr(s), addr(c)), b"HTTP");
        assert!(stream(&segments, addr(c), addr("10.0.0.3:80")).is_empty());
    }

    #[test]
    fn stream_without_syn_starts_at_lowest_sequence_and_wraps() {
        let (c, s) = ("10.0.0.1:1000", "10.0.0.2:80");
        let segments = [
            segment(c, s, 0, b"cd"),
            segment(c, s, u32::MAX - 1, b"ab"),
            segment(c, s, 2, b"ef"),
        ];
        assert_eq!(stream(&segments, addr(c), addr(s)), b"abcdef");
        // A SYN's data starts after the SYN's own sequence number; a gap is skipped.
        let segments = [
            Segment {
                payload: b"fast".to_vec(),
                ..syn(c, s, u32::MAX)
            },
            segment(c, s, 10, b"later"),
        ];
        assert_eq!(stream(&segments, addr(c), addr(s)), b"fastlater");
    }

    #[test]
    fn client_hello_is_recognised_at_the_start_of_a_stream_to_the_port() {
        let hello = [
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ];
        let (first, rest) = hello.split_at(3);
        let segments = [
            segment("10.0.0.1:1000", "10.0.0.2:15008", 0, first),
            segment("10.0.0.1:1000", "10.0.0.2:15008", 3, rest),
        ];
        assert!(tls_client_hello_to(&segments, 15008));
        assert!(!tls_client_hello_to(&segments, 8080));
        // A ServerHello (handshake type 2) or plaintext is not a ClientHello.
        let mut server_hello = hello;
        server_hello[5] = 0x02;
        for payload in [&server_hello[..], b"GET / HTTP/1.1\r\n"] {
            let segments = [segment("10.0.0.1:1000", "10.0.0.2:15008", 0, payload)];
            assert!(!tls_client_hello_to(&segments, 15008));
        }
    }
}
