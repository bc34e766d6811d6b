//! The node-local resolver of enrolled pods (ztunnel's DNS proxy; ADR 015).
//!
//! The kernel programs send an enrolled pod's DNS (port 53, UDP and TCP) to
//! `127.<slot>:15053` inside the pod's own namespace, where this resolver listens; the slot
//! names the server the pod asked ([`DnsServers`]). A question for an address of a name the
//! mesh knows ([`Names`]: services, ServiceEntry hosts) is answered here, from the state,
//! without a query leaving the pod. Everything else goes to the server the pod asked, from
//! the pod's namespace, on a socket the capture skips, and its answer is returned as it
//! came (TTL, NXDOMAIN, truncation: a truncated answer makes the pod ask again over TCP,
//! which is captured the same way). Answers leave from the slot's address, which the
//! kernel shows the application as the server it asked.

pub mod names;
pub mod wire;

pub use names::Names;

use std::{
    io::{self, IoSlice, IoSliceMut},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_common::{DNS_PORT, PROXY_MARK};
use nix::sys::socket::{self as sock, ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::Interest,
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{Semaphore, watch},
    task::JoinHandle,
};

use crate::{
    ebpf::DnsServers,
    metrics::{DnsLabels, Metrics},
    proxy::PodContext,
    state::MeshState,
};

/// The TTL of the answers the resolver gives itself (ztunnel's).
pub const TTL: u32 = 30;
/// How long a forwarded query waits for the server's answer (a stub resolver asks again
/// after 5 s).
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// What one pod may hold of the agent at once: forwarded UDP queries waiting for their
/// server, plus open TCP connections. A pod that goes over has its further queries dropped
/// (its stub resolver asks again) until some end: a pod flooding a dead server must not use
/// up the agent's descriptors, each forwarded query holding a socket for up to
/// [`UPSTREAM_TIMEOUT`].
const PER_POD_IN_FLIGHT: usize = 1024;
/// A TCP connection with no query for this long is closed (RFC 7766 asks servers to close
/// idle connections after a few seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The largest DNS message (over TCP; UDP ones are smaller).
const MAX_MESSAGE: usize = 65535;
/// The resolver's UDP receive buffer: a small query takes about 1 KiB of it, so the
/// default (about 200 queries) is 20 ms of a pod's 10,000 queries/s; this is 0.5 s. Asked
/// with `SO_RCVBUFFORCE` (the agent has CAP_NET_ADMIN), else as much as `rmem_max` allows.
const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// Where the resolver listens in every pod namespace: all addresses, port 15053; only
/// queries that arrived on a loopback address (a slot) are served.
pub const LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, DNS_PORT));

/// The resolver's sockets in one pod's namespace.
pub struct PodResolver {
    pub udp: UdpSocket,
    pub tcp: TcpListener,
}

/// Shared by every pod's resolver.
pub struct Resolver {
    state: watch::Receiver<Arc<MeshState>>,
    servers: Arc<DnsServers>,
    metrics: Arc<Metrics>,
}

impl Resolver {
    pub fn new(
        state: watch::Receiver<Arc<MeshState>>,
        servers: Arc<DnsServers>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Resolver {
            state,
            servers,
            metrics,
        })
    }

    /// Serves `pod`'s DNS on its sockets until the tasks are aborted.
    pub fn serve_pod(
        self: &Arc<Self>,
        pod: Arc<PodContext>,
        sockets: PodResolver,
    ) -> Vec<JoinHandle<()>> {
        let in_flight = Arc::new(Semaphore::new(PER_POD_IN_FLIGHT));
        vec![
            tokio::spawn(self.clone().serve_udp(
                pod.clone(),
                Arc::new(sockets.udp),
                in_flight.clone(),
            )),
            tokio::spawn(self.clone().serve_tcp(pod, sockets.tcp, in_flight)),
        ]
    }

    /// What to do with `msg`, a query of `pod` sent to the slot `local` over TCP (`tcp`) or
    /// UDP.
    fn decide(&self, pod: &PodContext, local: Ipv4Addr, msg: &[u8], tcp: bool) -> Decision {
        let query = wire::parse_query(msg);
        let labels = DnsLabels::new(query.as_ref().map(|q| q.qtype), tcp, &pod.workload);
        self.metrics.dns_request(&labels);
        if let Some(q) = query.as_ref().filter(|q| q.asks_address()) {
            let state = self.state.borrow();
            if let Some(addrs) = state.names().lookup(&q.name, &pod.workload.namespace) {
                let limit = if tcp { MAX_MESSAGE } else { q.udp_limit() };
                return Decision::Answer(wire::answer(msg, q, addrs, TTL, limit));
            }
        }
        match self.servers.server(pod.netns_cookie, local) {
            Some(server) => Decision::Forward(server, labels),
            // The slot is gone (its map entry evicted): the pod asks again and gets a new one.
            None => match query {
                Some(q) => Decision::Answer(wire::servfail(msg, &q)),
                None => Decision::Drop,
            },
        }
    }

    async fn serve_udp(
        self: Arc<Self>,
        pod: Arc<PodContext>,
        socket: Arc<UdpSocket>,
        in_flight: Arc<Semaphore>,
    ) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let pool = Arc::new(UdpPool::default());
        loop {
            let (len, client, local) = match recv_with_local(&socket, &mut buf).await {
                Ok(received) => received,
                Err(e) => {
                    crate::accept::backoff(&|| format!("{} resolver (UDP)", pod.display_name()), e)
                        .await;
                    continue;
                }
            };
            // Only the slots on `lo`: the pod's own addresses are not a resolver.
            let Some(local) = local.filter(Ipv4Addr::is_loopback) else {
                continue;
            };
            let msg = &buf[..len];
            match self.decide(&pod, local, msg, false) {
                Decision::Answer(answer) => {
                    let _ = send_from(&socket, &answer, client, local).await;
                }
                Decision::Forward(server, labels) => {
                    let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                        over_limit(&pod);
                        continue;
                    };
                    let (pod, socket, msg) = (pod.clone(), socket.clone(), msg.to_vec());
                    let (pool, metrics) = (pool.clone(), self.metrics.clone());
                    tokio::spawn(async move {
                        let _permit = permit;
                        let started = std::time::Instant::now();
                        let forwarded = forward_udp(&pod, &pool, server, &msg).await;
                        metrics.dns_forwarded(&labels, started.elapsed(), forwarded.is_ok());
                        match forwarded {
                            Ok(answer) => {
                                let _ = send_from(&socket, &answer, client, local).await;
                            }
                            Err(e) => {
                                tracing::debug!(pod = %pod.display_name(), %server, error = %e, "DNS query not answered by its server")
                            }
                        }
                    });
                }
                Decision::Drop => {}
            }
        }
    }

    async fn serve_tcp(
        self: Arc<Self>,
        pod: Arc<PodContext>,
        listener: TcpListener,
        in_flight: Arc<Semaphore>,
    ) {
        let describe = || format!("{} resolver (TCP)", pod.display_name());
        loop {
            let (stream, _) = crate::accept::next(&listener, describe).await;
            let local = match stream.local_addr().map(|a| a.ip()) {
                Ok(IpAddr::V4(ip)) if ip.is_loopback() => ip,
                _ => continue,
            };
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                over_limit(&pod);
                continue;
            };
            let (this, pod) = (self.clone(), pod.clone());
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = this.serve_tcp_connection(&pod, stream, local).await {
                    tracing::debug!(pod = %pod.display_name(), error = %e, "DNS over TCP ended");
                }
            });
        }
    }

    /// Queries one after the other on one connection; forwarded ones over one connection
    /// to the server, opened at the first.
    async fn serve_tcp_connection(
        &self,
        pod: &PodContext,
        mut client: TcpStream,
        local: Ipv4Addr,
    ) -> io::Result<()> {
        let mut upstream: Option<TcpStream> = None;
        while let Ok(read) = tokio::time::timeout(TCP_IDLE, read_message(&mut client)).await {
            let Some(msg) = read? else {
                break;
            };
            let answer = match self.decide(pod, local, &msg, true) {
                Decision::Answer(answer) => answer,
                Decision::Drop => return Ok(()),
                Decision::Forward(server, labels) => {
                    let started = std::time::Instant::now();
                    let answer = forward_tcp(pod, &mut upstream, server, &msg).await;
                    self.metrics
                        .dns_forwarded(&labels, started.elapsed(), answer.is_ok());
                    answer?
                }
            };
            write_message(&mut client, &answer).await?;
        }
        Ok(())
    }
}

/// A query dropped because its pod holds [`PER_POD_IN_FLIGHT`]: logged at most once per
/// interval (a flooding pod must not flood the log either).
fn over_limit(pod: &PodContext) {
    if let Some(suppressed) = crate::log_limit::once_per_interval!() {
        tracing::warn!(pod = %pod.display_name(), limit = PER_POD_IN_FLIGHT, suppressed, "DNS: the pod has too many queries in flight; dropping queries until some end");
    }
}

enum Decision {
    Answer(Vec<u8>),
    /// To the server asked; the query's labels, for the forwarded series.
    Forward(SocketAddr, DnsLabels),
    Drop,
}

/// Asks `server` over TCP, on the connection `upstream` (opened at the first query).
async fn forward_tcp(
    pod: &PodContext,
    upstream: &mut Option<TcpStream>,
    server: SocketAddr,
    msg: &[u8],
) -> io::Result<Vec<u8>> {
    let stream = match upstream {
        Some(s) => s,
        None => upstream.insert(connect_upstream(pod, server).await?),
    };
    write_message(stream, msg).await?;
    tokio::time::timeout(UPSTREAM_TIMEOUT, read_message(stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))??
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "server closed"))
}

/// The resolver's sockets for a pod, bound in the current (the pod's) namespace.
pub fn bind_udp() -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM.nonblocking(), Some(Protocol::UDP))?;
    s.set_mark(PROXY_MARK)?;
    sock::setsockopt(&s, sock::sockopt::Ipv4PacketInfo, &true).map_err(io::Error::from)?;
    if sock::setsockopt(&s, sock::sockopt::RcvBufForce, &UDP_RECEIVE_BUFFER).is_err() {
        s.set_recv_buffer_size(UDP_RECEIVE_BUFFER)?;
    }
    s.bind(&LISTEN.into())?;
    Ok(s)
}

pub fn bind_tcp() -> io::Result<Socket> {
    let s = Socket::new(
        Domain::IPV4,
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    s.set_mark(PROXY_MARK)?;
    s.bind(&LISTEN.into())?;
    s.listen(1024)?;
    Ok(s)
}

/// A datagram, who sent it and the address it was sent to (`IP_PKTINFO`).
async fn recv_with_local(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<Ipv4Addr>)> {
    socket
        .async_io(Interest::READABLE, || {
            let fd = socket.as_raw_fd();
            let mut iov = [IoSliceMut::new(buf)];
            let mut cmsg = nix::cmsg_space!(libc::in_pktinfo);
            let msg = sock::recvmsg::<SockaddrIn>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())
                .map_err(io::Error::from)?;
            let local = msg.cmsgs().map_err(io::Error::from)?.find_map(|c| match c {
                ControlMessageOwned::Ipv4PacketInfo(info) => {
                    Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)))
                }
                _ => None,
            });
            let from = msg
                .address
                .map(|a| SocketAddr::V4(SocketAddrV4::new(a.ip(), a.port())))
                .ok_or_else(|| io::Error::other("a datagram without its sender"))?;
            Ok((msg.bytes, from, local))
        })
        .await
}

/// Sends `msg` to `to` from the address `from` (the slot the query arrived on).
async fn send_from(
    socket: &UdpSocket,
    msg: &[u8],
    to: SocketAddr,
    from: Ipv4Addr,
) -> io::Result<()> {
    let SocketAddr::V4(to) = to else {
        return Err(io::Error::other("an IPv6 client on the IPv4 resolver"));
    };
    let to = SockaddrIn::from(to);
    let info = libc::in_pktinfo {
        ipi_ifindex: 0,
        ipi_spec_dst: libc::in_addr {
            s_addr: u32::from(from).to_be(),
        },
        ipi_addr: libc::in_addr { s_addr: 0 },
    };
    socket
        .async_io(Interest::WRITABLE, || {
            sock::sendmsg(
                socket.as_raw_fd(),
                &[IoSlice::new(msg)],
                &[ControlMessage::Ipv4PacketInfo(&info)],
                MsgFlags::empty(),
                Some(&to),
            )
            .map(drop)
            .map_err(io::Error::from)
        })
        .await
}

/// A TCP socket in `pod`'s namespace that the capture skips.
fn upstream_tcp_socket(pod: &PodContext, server: SocketAddr) -> io::Result<Socket> {
    pod.netns.run(|| -> io::Result<Socket> {
        let s = Socket::new(
            Domain::for_address(server),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?;
        s.set_mark(PROXY_MARK)?;
        Ok(s)
    })?
}

/// UDP sockets made in a pod's namespace ahead of use, [`POOL_BATCH`] per pair of
/// `setns` calls: each forwarded query still takes a socket of its own (its own random
/// source port, as a stub resolver's), without entering the namespace itself.
#[derive(Default)]
struct UdpPool {
    v4: Mutex<Vec<std::net::UdpSocket>>,
    v6: Mutex<Vec<std::net::UdpSocket>>,
}

/// Sockets made at once when a pod's pool is empty (and held idle until used).
const POOL_BATCH: usize = 8;

impl UdpPool {
    fn take(&self, pod: &PodContext, server: SocketAddr) -> io::Result<std::net::UdpSocket> {
        let mut idle = if server.is_ipv4() { &self.v4 } else { &self.v6 }
            .lock()
            .expect("pool lock");
        if let Some(socket) = idle.pop() {
            return Ok(socket);
        }
        let domain = Domain::for_address(server);
        let batch = pod.netns.run(|| {
            (0..POOL_BATCH)
                .map(|_| {
                    let s = Socket::new(domain, Type::DGRAM.nonblocking(), Some(Protocol::UDP))?;
                    s.set_mark(PROXY_MARK)?;
                    Ok(s.into())
                })
                .collect::<io::Result<Vec<std::net::UdpSocket>>>()
        })??;
        idle.extend(batch);
        idle.pop().ok_or_else(|| io::Error::other("no socket made"))
    }
}

/// Asks `server` from `pod`'s namespace; the first answer with the query's ID.
async fn forward_udp(
    pod: &PodContext,
    pool: &UdpPool,
    server: SocketAddr,
    msg: &[u8],
) -> io::Result<Vec<u8>> {
    let socket = UdpSocket::from_std(pool.take(pod, server)?)?;
    socket.connect(server).await?;
    socket.send(msg).await?;
    let id = wire::id_of(msg);
    tokio::time::timeout(UPSTREAM_TIMEOUT, async {
        loop {
            // Read into spare capacity: no 64 KiB zeroed per query.
            let mut buf = Vec::with_capacity(MAX_MESSAGE);
            socket.recv_buf(&mut buf).await?;
            if wire::id_of(&buf) == id {
                return Ok(buf);
            }
        }
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))?
}

async fn connect_upstream(pod: &PodContext, server: SocketAddr) -> io::Result<TcpStream> {
    let socket = upstream_tcp_socket(pod, server)?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    tokio::time::timeout(UPSTREAM_TIMEOUT, socket.connect(server))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting"))?
}

/// One length-prefixed message of DNS over TCP; `None` at a clean end.
async fn read_message(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

async fn write_message(stream: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| io::Error::other("message over 64 KiB"))?;
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    stream.write_all(&out).await
}
