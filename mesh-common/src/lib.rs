//! Types shared by the eBPF programs (`mesh-ebpf`) and the agent: map names, map keys and
//! values, ports and socket marks. Everything here is `#[repr(C)]`, `Copy` and padding-free.
#![no_std]

/// Mark carried by every socket the agent opens (Istio's 1337). Capture skips such sockets.
pub const PROXY_MARK: u32 = 0x539;
/// Mask applied to a socket mark before comparing it with [`PROXY_MARK`].
pub const PROXY_MARK_MASK: u32 = 0xfff;
/// Mark of the sockets that deliver inbound traffic to the application from the client's
/// own address. Replies to them are routed back over `lo` by an `ip rule` matching this mark
/// (the application's accepted socket inherits it through `tcp_fwmark_accept`). Its low bits
/// are [`PROXY_MARK`], so capture skips these sockets too.
pub const DELIVERY_MARK: u32 = 0x1539;
/// Routing table, in each pod namespace, holding `local default dev lo` for [`DELIVERY_MARK`].
pub const DELIVERY_ROUTE_TABLE: u32 = 133;

/// Outbound listener inside each enrolled pod (loopback only).
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext listener inside each enrolled pod (reached through `sk_lookup`).
pub const INBOUND_PORT: u16 = 15006;
/// HBONE listener inside each enrolled pod; never steered by `sk_lookup`.
pub const HBONE_PORT: u16 = 15008;
/// The resolver's port in each enrolled pod's namespace (ztunnel's): captured DNS goes to
/// `127.<slot>:15053` (see [`DnsSlot`]).
pub const DNS_PORT: u16 = 15053;
/// The port DNS queries are captured on.
pub const DNS_SERVER_PORT: u16 = 53;
/// The agent's listeners inside an enrolled pod. On a mesh address they are never the
/// destination of a proxied connection: delivering there would hand the connection back to
/// the agent (a loop for 15006), so every path refuses them (ztunnel's "self call").
pub const AGENT_POD_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT];

/// Whether `port` is one of [`AGENT_POD_PORTS`].
pub fn is_agent_pod_port(port: u16) -> bool {
    AGENT_POD_PORTS.contains(&port)
}
/// Admin (`/config_dump`), on the node's loopback.
pub const ADMIN_PORT: u16 = 15000;
/// Prometheus `/metrics`.
pub const METRICS_PORT: u16 = 15020;
/// Readiness `/healthz/ready`.
pub const READINESS_PORT: u16 = 15021;

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Map names (shared so user space finds the maps and their pins by name).
pub mod maps {
    /// netns cookie → [`super::EnrolledNetns`]: pod namespaces whose traffic is captured.
    pub const ENROLLED: &str = "MESH_ENROLLED";
    /// socket cookie → [`super::OrigDst`]: destination an application dialed, for getpeername.
    pub const ORIG_DST_BY_COOKIE: &str = "MESH_ORIG_COOKIE";
    /// [`super::OrigKey`] → [`super::OrigDst`]: destination an application dialed, for the proxy.
    pub const ORIG_DST: &str = "MESH_ORIG_DST";
    /// [`super::AddrKey`] → inbound listener socket of the pod owning that address.
    pub const INBOUND_LISTENERS: &str = "MESH_INBOUND";
    /// [`super::AddrKey`] → u32 flags: addresses of enrolled pods (fail closed without listener).
    pub const ENROLLED_ADDRS: &str = "MESH_ENR_ADDRS";
    /// cgroup id → u32: the cgroups of the node's kubelet, whose health probes to an
    /// enrolled pod bypass the proxy (Istio exempts them from STRICT the same way).
    pub const PROBERS: &str = "MESH_PROBERS";
    /// socket cookie → u32: sockets a prober connected to an enrolled pod address.
    pub const PROBE_SOCKS: &str = "MESH_PROBE_SOCKS";
    /// [`super::ProbeKey`] → u32: the probe connections in flight, as the pod's `sk_lookup`
    /// sees their SYN; not steered into the proxy.
    pub const PROBES: &str = "MESH_PROBES";
    /// Array of one u32: 1 once the agent attached the `sk_msg` verdict (`--sockmap`).
    pub const REDIRECT_ON: &str = "MESH_RDR_ON";
    /// [`super::SockKey`] → socket whose sends the kernel may redirect (`sk_msg`
    /// verdict): both ends of every captured loopback connection and of every delivery
    /// connection, all added by `sockops` (ADR 016). Per agent process, never pinned.
    pub const REDIRECT_SOCKS: &str = "MESH_RDR_SOCKS";
    /// [`super::SockKey`] → [`super::RedirectState`] of each socket in REDIRECT_SOCKS,
    /// written by the kernel programs; the agent reads a routed socket's counters and
    /// removes its entry when the connection ends.
    pub const REDIRECT_STATE: &str = "MESH_RDR_STATE";
    /// [`super::SockKey`] → [`super::RedirectRoute`]: where a socket's sends go, written by
    /// the agent only.
    pub const REDIRECT_ROUTE: &str = "MESH_RDR_ROUTE";
    pub const DNS_UPSTREAM: &str = "MESH_DNS_UPSTRM";
}

/// Program names (the functions in `mesh-ebpf`).
pub mod programs {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const GETPEERNAME4: &str = "mesh_getpeername4";
    pub const GETPEERNAME6: &str = "mesh_getpeername6";
    pub const SOCKOPS: &str = "mesh_sockops";
    pub const SK_LOOKUP: &str = "mesh_sk_lookup";
    pub const REDIRECT: &str = "mesh_redirect";
    pub const SENDMSG4: &str = "mesh_sendmsg4";
    pub const SENDMSG6: &str = "mesh_sendmsg6";
    pub const RECVMSG4: &str = "mesh_recvmsg4";
    pub const RECVMSG6: &str = "mesh_recvmsg6";
}

/// Value of the ENROLLED map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledNetns {
    /// [`EnrolledNetns::CAPTURED`], [`EnrolledNetns::DNS`].
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<EnrolledNetns>() == 8);

impl EnrolledNetns {
    /// The namespace's outbound TCP is captured (every entry has it).
    pub const CAPTURED: u32 = 1;
    /// Its DNS (port 53, UDP and TCP) goes to the agent's resolver in the namespace.
    pub const DNS: u32 = 2;
}

/// A DNS server an enrolled namespace asked, by the slot its queries were sent to instead:
/// `127.<slot>:15053`, the slot's 24 bits in the address's last three bytes. The resolver
/// reads the server from the address a query arrived on, and `recvmsg`/`getpeername` give the
/// application the server back as the answer's source, so every datagram carries its own
/// server without per-socket state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsSlot {
    pub netns_cookie: u64,
    pub slot: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<DnsSlot>() == 16);

impl DnsSlot {
    /// Slots 1 ..= 0xfffffe: never 127.0.0.0 nor 127.255.255.255 (broadcast on `lo`).
    const RANGE: u32 = 0x00ff_fffe;
    /// How many slots are tried for a server before its queries are refused.
    pub const PROBES: u32 = 4;

    /// The first slot tried for a server (address words and port as the kernel stores
    /// them): a hash, so the same server gets the same slot in every namespace.
    pub fn first(addr: &[u32; 4], port: u16) -> u32 {
        let mut h: u32 = 0x811c_9dc5;
        for w in [addr[0], addr[1], addr[2], addr[3], u32::from(port)] {
            h = (h ^ w).wrapping_mul(0x0100_0193);
            h ^= h >> 15;
        }
        h % Self::RANGE + 1
    }

    /// The slot tried after `slot`.
    pub fn next(slot: u32) -> u32 {
        slot % Self::RANGE + 1
    }

    /// `127.<slot>` as the kernel stores an IPv4 address (network byte order).
    pub fn ip4(slot: u32) -> u32 {
        u32::from_ne_bytes([127, (slot >> 16) as u8, (slot >> 8) as u8, slot as u8])
    }

    /// The slot of a `127.x.y.z` address as the kernel stores it; `None` if not in 127/8.
    pub fn of_ip4(ip: u32) -> Option<u32> {
        let b = ip.to_ne_bytes();
        if b[0] != 127 {
            return None;
        }
        Some(u32::from(b[1]) << 16 | u32::from(b[2]) << 8 | u32::from(b[3]))
    }
}

/// An original destination. `addr` holds the address in network byte order as the kernel
/// presents it to BPF (IPv4 in `addr[0]`), `port` in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 24);

/// Key of the ORIG_DST map: the captured connection as the proxy sees it after `accept`:
/// the pod namespace, the client's port (host byte order) and the family of the listener
/// it reached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrigKey {
    pub netns_cookie: u64,
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<OrigKey>() == 16);

/// A pod address (network byte order, IPv4 in `addr[0]`), key of the inbound maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub addr: [u32; 4],
    pub family: u32,
}
const _: () = assert!(core::mem::size_of::<AddrKey>() == 20);

/// One TCP connection from a prober (the kubelet) to an enrolled pod: both ends,
/// addresses in network byte order (IPv4 in `[0]`, IPv4-mapped IPv6 as IPv4), ports in host
/// byte order. Key of the PROBES map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProbeKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub family: u32,
}
const _: () = assert!(core::mem::size_of::<ProbeKey>() == 40);

/// One TCP socket as the kernel programs see it: its network namespace and its two ends
/// (addresses in network byte order, IPv4 in `addr[0]`, IPv4-mapped IPv6 addresses as
/// IPv4; ports in host byte order). Key of the redirect maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns_cookie: u64,
    pub local: [u32; 4],
    pub remote: [u32; 4],
    pub local_port: u32,
    pub remote_port: u32,
    pub family: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SockKey>() == 56);

impl SockKey {
    /// The key from the fields the kernel gives `sockops` and `sk_msg` programs alike:
    /// `local_port` in host byte order, `remote_port` as a network-order port in the upper
    /// half of the word (little-endian hosts). An IPv6 socket talking IPv4 (mapped
    /// addresses) gets the IPv4 key, as the agent's IPv4 socket at the other end sees it.
    pub fn from_kernel(
        netns_cookie: u64,
        family: u32,
        local: [u32; 4],
        remote: [u32; 4],
        local_port: u32,
        remote_port: u32,
    ) -> Self {
        let mapped_prefix = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        let mapped = family == AF_INET6 as u32
            && remote[0] == 0
            && remote[1] == 0
            && remote[2] == mapped_prefix;
        let (family, local, remote) = if mapped {
            (AF_INET as u32, [local[3], 0, 0, 0], [remote[3], 0, 0, 0])
        } else {
            (family, local, remote)
        };
        SockKey {
            netns_cookie,
            local,
            remote,
            local_port,
            remote_port: u32::from(u16::from_be((remote_port >> 16) as u16)),
            family,
            _pad: 0,
        }
    }

    /// The key of the socket at the other end of this socket's connection, when that end
    /// is in the same network namespace (a loopback or same-pod connection).
    pub fn mirror(&self) -> Self {
        SockKey {
            netns_cookie: self.netns_cookie,
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
            family: self.family,
            _pad: 0,
        }
    }
}

/// Value of the REDIRECT_STATE map: what the `sk_msg` verdict did with the sends of one
/// socket, and where the socket and its TCP peer live in the kernel. Created by `sockops`
/// when the socket is established (so every byte is counted); the counters are updated
/// only by the verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectState {
    /// Bytes that went to the agent: over the socket's own TCP connection, or redirected
    /// into the agent's socket at the other end of it ([`RedirectState::MIRROR`]).
    pub passed: u64,
    /// Bytes redirected past the agent, into the receive queue of the application socket
    /// of the route ([`RedirectRoute`]).
    pub redirected: u64,
    /// The socket's `struct sock` (an address for `bpf_probe_read_kernel`, never
    /// dereferenced otherwise): the verdict reads its receive state (back-pressure).
    pub sk: u64,
    /// The `struct sock` of the other end of its TCP connection, once both ends are
    /// tracked (0 until then).
    pub peer_sk: u64,
    /// [`RedirectState::MIRROR`].
    pub flags: u64,
}
const _: () = assert!(core::mem::size_of::<RedirectState>() == 40);

impl RedirectState {
    /// The socket's sends go into the receive queue of the other end of its own TCP
    /// connection, in the same namespace, when that end is tracked too: an application's
    /// loopback connection to the agent (client leg) or the agent's delivery connection to
    /// the application (server leg). The bytes still reach the same socket; only the
    /// loopback TCP traversal is skipped.
    pub const MIRROR: u64 = 1;
}

/// The offsets, in this kernel's structures, that the verdict reads to bound what it
/// queues on a receiver (from the kernel's BTF, set by the agent at load time). All zero:
/// unknown, and the verdict never redirects.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct sock.sk_user_data` (the socket's `sk_psock` while it is in a socket map).
    pub sk_user_data: u32,
    /// `struct sock.sk_rcvbuf`.
    pub sk_rcvbuf: u32,
    /// `struct tcp_sock.copied_seq`: the next byte the reader will read over TCP.
    pub copied_seq: u32,
    /// `struct tcp_sock.write_seq`: the next byte the writer will queue on TCP.
    pub write_seq: u32,
    /// `struct sk_psock.msg_tot_len`: bytes redirected into the socket, not yet read.
    pub msg_tot_len: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 24);

impl KernelOffsets {
    /// Whether every offset is known.
    pub fn complete(&self) -> bool {
        self.sk_user_data != 0
            && self.sk_rcvbuf != 0
            && self.copied_seq != 0
            && self.write_seq != 0
            && self.msg_tot_len != 0
    }
}

/// Name of the verdict's [`KernelOffsets`] global.
pub const KERNEL_OFFSETS: &str = "MESH_KERNEL_OFFSETS";

/// Value of the REDIRECT_ROUTE map: the application socket a same-node application
/// socket's sends are redirected to, past the agent.
///
/// Bytes an application socket sent before its route existed, or while the agent still
/// had bytes to forward, went to the agent (`passed`: over TCP, or redirected into the
/// agent's socket of the same connection); the agent forwards them and records how many
/// in `forwarded`. The verdict takes the route only while `forwarded == passed`, so bytes
/// never overtake each other (`ALWAYS`: at once). The agent's own sockets need no route:
/// their sends go into the application socket at the other end of their connection
/// ([`RedirectState::MIRROR`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectRoute {
    pub target: SockKey,
    pub forwarded: u64,
}
const _: () = assert!(core::mem::size_of::<RedirectRoute>() == 64);

impl RedirectRoute {
    /// `forwarded` of a route that applies whatever went to the agent.
    pub const ALWAYS: u64 = u64::MAX;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all types are repr(C), Copy and padding-free (asserted above).
    unsafe impl aya::Pod for super::EnrolledNetns {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::OrigKey {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::ProbeKey {}
    unsafe impl aya::Pod for super::RedirectState {}
    unsafe impl aya::Pod for super::RedirectRoute {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::DnsSlot {}
}
