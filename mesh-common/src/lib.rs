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
    /// socket cookie → agent socket of a same-node connection whose bytes the kernel
    /// moves (`sk_skb` stream verdict). Per agent process, never pinned.
    pub const SPLICE: &str = "MESH_SPLICE";
    /// socket cookie → [`super::SpliceState`] of each spliced agent socket.
    pub const SPLICE_STATE: &str = "MESH_SPLICE_ST";
    /// socket cookie → bytes the agent forwarded itself from that socket (u64), written
    /// by the agent only: the verdict redirects once the agent caught up.
    pub const SPLICE_FORWARDED: &str = "MESH_SPLICE_FWD";
}

/// Program names (the functions in `mesh-ebpf`).
pub mod programs {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const GETPEERNAME4: &str = "mesh_getpeername4";
    pub const GETPEERNAME6: &str = "mesh_getpeername6";
    pub const SOCKOPS: &str = "mesh_sockops";
    pub const SK_LOOKUP: &str = "mesh_sk_lookup";
    pub const SPLICE: &str = "mesh_splice";
}

/// Value of the ENROLLED map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledNetns {
    /// Reserved for per-pod flags (bit 0: capture outbound).
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<EnrolledNetns>() == 8);

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

/// Value of the SPLICE_STATE map, one per spliced agent socket. The agent writes it once
/// before the socket enters the SPLICE map; afterwards only the verdict program writes it.
///
/// Bytes the verdict cannot redirect (the peer is not in the SPLICE map yet) are passed to
/// the socket's own receive queue and counted in `passed`; the agent reads and forwards
/// them itself. Redirecting starts only once the agent has forwarded everything passed
/// (`SPLICE_FORWARDED == passed`), so bytes never overtake each other.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpliceState {
    /// Socket cookie of the other agent socket of the connection.
    pub peer: u64,
    /// Bytes passed to user space instead of redirected.
    pub passed: u64,
    /// 1 once the verdict has redirected: from then on every byte is redirected.
    pub redirecting: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SpliceState>() == 24);

#[cfg(feature = "user")]
mod user {
    // SAFETY: all types are repr(C), Copy and padding-free (asserted above).
    unsafe impl aya::Pod for super::EnrolledNetns {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::OrigKey {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::SpliceState {}
}
