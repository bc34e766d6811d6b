//! The kernel half of mesh-agent: outbound capture (`cgroup/connect4/6`), the original
//! destination (`sockops`, `cgroup/getpeername4/6`), inbound steering (`sk_lookup`), the
//! kubelet's health probes let past the proxy (`connect4/6` + `sockops` + `sk_lookup`), the
//! redirect of the loopback legs and of same-node connections (`sockops` + `sk_msg`
//! verdict), and DNS sent to the pod's resolver (`connect4/6`, `sendmsg4/6`, `recvmsg4/6`, `getpeername4/6`).
//! Each program is a thin wrapper around a `try_*` function; every path returns a verdict.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
        bpf_probe_read_kernel,
    },
    macros::{cgroup_sock_addr, map, sk_lookup, sk_msg, sock_ops},
    maps::{Array, HashMap, LruHashMap, SockHash},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext},
};
use mesh_common::{
    AF_INET, AF_INET6, AddrKey, DELIVERY_MARK, DNS_PORT, DNS_SERVER_PORT, DnsSlot, EnrolledNetns,
    HBONE_PORT, KernelOffsets, OUTBOUND_PORT, OrigDst, OrigKey, PROXY_MARK, PROXY_MARK_MASK,
    ProbeKey, RedirectRoute, RedirectState, SockKey,
};

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = aya_ebpf::bindings::BPF_SOCK_OPS_TCP_CONNECT_CB;
const TCP_CLOSE: u32 = 7;
/// `lo` is always interface 1 in a network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// cgroup/sock_addr verdicts.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

/// 127.0.0.1 as the kernel stores it in `user_ip4` (network byte order).
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// The third word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
const MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
/// The last word of `::1`.
const LOOPBACK6_LAST: u32 = u32::from_ne_bytes([0, 0, 0, 1]);

#[map(name = "MESH_ENROLLED")]
static ENROLLED: HashMap<u64, EnrolledNetns> = HashMap::pinned(4096, 0);

#[map(name = "MESH_ORIG_COOKIE")]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65536, 0);

#[map(name = "MESH_ORIG_DST")]
static ORIG_DST: LruHashMap<OrigKey, OrigDst> = LruHashMap::pinned(65536, 0);

#[map(name = "MESH_INBOUND")]
static INBOUND_LISTENERS: SockHash<AddrKey> = SockHash::pinned(8192, 0);

#[map(name = "MESH_ENR_ADDRS")]
static ENROLLED_ADDRS: HashMap<AddrKey, u32> = HashMap::pinned(8192, 0);

/// The DNS servers enrolled namespaces asked, by the slot their queries went to instead.
#[map(name = "MESH_DNS_UPSTRM")]
static DNS_UPSTREAM: LruHashMap<DnsSlot, OrigDst> = LruHashMap::pinned(16384, 0);

#[map(name = "MESH_PROBERS")]
static PROBERS: HashMap<u64, u32> = HashMap::pinned(64, 0);

#[map(name = "MESH_PROBE_SOCKS")]
static PROBE_SOCKS: LruHashMap<u64, u32> = LruHashMap::pinned(8192, 0);

#[map(name = "MESH_PROBES")]
static PROBES: LruHashMap<ProbeKey, u32> = LruHashMap::pinned(8192, 0);

/// Hash maps allocate entries on insert: the redirect maps are empty unless `--sockmap`.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Entry 0 is set to 1 by the agent once the `sk_msg` verdict is attached (`--sockmap`):
/// only then does `sockops` add sockets to REDIRECT_SOCKS.
#[map(name = "MESH_RDR_ON")]
static REDIRECT_ON: Array<u32> = Array::with_max_entries(1, 0);

// The redirect maps belong to one agent process (its sockets die with it): not pinned.
#[map(name = "MESH_RDR_SOCKS")]
static REDIRECT_SOCKS: SockHash<SockKey> = SockHash::with_max_entries(262_144, 0);

#[map(name = "MESH_RDR_STATE")]
static REDIRECT_STATE: HashMap<SockKey, RedirectState> =
    HashMap::with_max_entries(262_144, BPF_F_NO_PREALLOC);

#[map(name = "MESH_RDR_ROUTE")]
static REDIRECT_ROUTE: HashMap<SockKey, RedirectRoute> =
    HashMap::with_max_entries(262_144, BPF_F_NO_PREALLOC);

/// Where the verdict finds, in this kernel's structures, what bounds a receiver's queue
/// (set by the agent from the kernel's BTF when it loads the programs).
#[unsafe(no_mangle)]
static MESH_KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    sk_user_data: 0,
    sk_rcvbuf: 0,
    copied_seq: 0,
    write_seq: 0,
    msg_tot_len: 0,
    _pad: 0,
};
/// What a receiver may have queued by redirect and not read yet, at least, before sends
/// to it go over TCP: its receive buffer does not grow with use as TCP's does (autotuning
/// runs on TCP reads only), so its initial size (128 KiB) would turn every burst of a bulk
/// transfer into a fallback.
const REDIRECT_QUEUE_FLOOR: u32 = 1 << 20;
/// `sk_user_data` carries flags in its low bits (`SK_USER_DATA_*`).
const SK_USER_DATA_PTRMASK: u64 = !7;

fn is_loopback4(ip: u32) -> bool {
    ip.to_ne_bytes()[0] == 127
}

/// What `connect4/6` and `sendmsg4/6` do with a socket.
enum Connect {
    /// An enrolled pod's TCP socket (not one of the agent's own): redirect to the proxy.
    Capture,
    /// An enrolled pod's DNS (port 53, UDP or TCP): redirect to its resolver.
    Dns,
    /// A socket of the node's kubelet (outside the mesh): note it if it dials a pod.
    Probe,
    Leave,
}

fn classify(ctx: &SockAddrContext) -> Connect {
    // SAFETY: the kernel hands a valid context; fields are read as the verifier allows.
    unsafe {
        let sa = ctx.sock_addr;
        let protocol = (*sa).protocol;
        if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
            return Connect::Leave;
        }
        let netns = bpf_get_netns_cookie(sa as *mut c_void);
        let Some(enrolled) = ENROLLED.get(netns) else {
            return if protocol == IPPROTO_TCP && PROBERS.get(bpf_get_current_cgroup_id()).is_some()
            {
                Connect::Probe
            } else {
                Connect::Leave
            };
        };
        let sk = (*sa).__bindgen_anon_1.sk;
        if sk.is_null() || (*sk).mark & PROXY_MARK_MASK == PROXY_MARK {
            return Connect::Leave;
        }
        if enrolled.flags & EnrolledNetns::DNS != 0
            && (*sa).user_port as u16 == DNS_SERVER_PORT.to_be()
        {
            return Connect::Dns;
        }
        if protocol == IPPROTO_TCP {
            Connect::Capture
        } else {
            Connect::Leave
        }
    }
}

/// The slot the namespace's queries to `orig` go to: the one that already holds `orig`,
/// else the first free one (a few probed). Refuses when every probed slot holds another
/// server: the query would otherwise leave the pod unseen.
fn dns_slot(ctx: &SockAddrContext, orig: &OrigDst) -> Result<u32, i32> {
    // SAFETY: valid context pointer from the kernel.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut c_void) };
    let mut slot = DnsSlot::first(&orig.addr, orig.port);
    for _ in 0..DnsSlot::PROBES {
        let key = DnsSlot {
            netns_cookie,
            slot,
            _pad: 0,
        };
        // SAFETY: map lookup of a plain key; the value is copied out.
        match unsafe { DNS_UPSTREAM.get(key) }.copied() {
            Some(held) if held == *orig => return Ok(slot),
            Some(_) => slot = DnsSlot::next(slot),
            None => {
                DNS_UPSTREAM.insert(key, orig, 0).map_err(|_| REJECT)?;
                return Ok(slot);
            }
        }
    }
    Err(REJECT)
}

/// The server behind `127.<slot>:15053` for the socket's namespace (address and port as
/// the kernel stores them), if it is one.
fn dns_server(ctx: &SockAddrContext, ip4: u32, port: u32) -> Option<OrigDst> {
    if port as u16 != DNS_PORT.to_be() {
        return None;
    }
    let slot = DnsSlot::of_ip4(ip4)?;
    let key = DnsSlot {
        // SAFETY: valid context pointer from the kernel.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut c_void) },
        slot,
        _pad: 0,
    };
    // SAFETY: map lookup of a plain key; the value is copied out.
    unsafe { DNS_UPSTREAM.get(key) }.copied()
}

/// Sends a DNS query of an IPv4 socket (or an IPv4-mapped one) to the resolver's slot for
/// its server: rewrites `user_ip4`-style word `ip` and the port in place.
fn redirect_dns4(ctx: &SockAddrContext, ip: u32, port: u32) -> Result<Option<u32>, i32> {
    if ip == 0 || is_loopback4(ip) {
        // A resolver of the pod's own (or none): not the mesh's to answer.
        return Ok(None);
    }
    let orig = OrigDst {
        addr: [ip, 0, 0, 0],
        port: port as u16,
        family: AF_INET,
        _pad: 0,
    };
    Ok(Some(DnsSlot::ip4(dns_slot(ctx, &orig)?)))
}

/// A prober's socket dialing an enrolled pod address: remembered by cookie, so that
/// `sockops` records the connection's two ends once the kernel chose its source.
fn note_probe(ctx: &SockAddrContext, dst: AddrKey) {
    // SAFETY: map lookup of a plain key.
    if unsafe { ENROLLED_ADDRS.get(dst) }.is_some() {
        // SAFETY: valid context pointer from the kernel.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
        let _ = PROBE_SOCKS.insert(cookie, 1, 0);
    }
}

/// Remembers where the socket was going, keyed by socket cookie.
fn remember(ctx: &SockAddrContext, orig: &OrigDst) -> Result<(), i32> {
    // SAFETY: valid context pointer from the kernel.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    ORIG_DST_BY_COOKIE
        .insert(cookie, orig, 0)
        .map_err(|_| REJECT)
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    match classify(ctx) {
        Connect::Capture => {}
        Connect::Leave => return Ok(ALLOW),
        Connect::Dns => {
            // SAFETY: valid context; user_ip4/user_port are readable and writable here.
            unsafe {
                if let Some(slot_ip) = redirect_dns4(ctx, (*sa).user_ip4, (*sa).user_port)? {
                    (*sa).user_ip4 = slot_ip;
                    (*sa).user_port = u32::from(DNS_PORT.to_be());
                }
            }
            return Ok(ALLOW);
        }
        Connect::Probe => {
            // SAFETY: valid context; user_ip4 is readable in connect4.
            let ip = unsafe { (*sa).user_ip4 };
            note_probe(
                ctx,
                AddrKey {
                    addr: [ip, 0, 0, 0],
                    family: u32::from(AF_INET),
                },
            );
            return Ok(ALLOW);
        }
    }
    // SAFETY: valid context; user_ip4/user_port are readable and writable in connect4.
    unsafe {
        let ip = (*sa).user_ip4;
        if ip == 0 || is_loopback4(ip) {
            return Ok(ALLOW);
        }
        let orig = OrigDst {
            addr: [ip, 0, 0, 0],
            port: (*sa).user_port as u16,
            family: AF_INET,
            _pad: 0,
        };
        // Without a record the proxy could not forward: refuse rather than bypass.
        remember(ctx, &orig)?;
        (*sa).user_ip4 = LOOPBACK4;
        (*sa).user_port = u32::from(OUTBOUND_PORT.to_be());
    }
    Ok(ALLOW)
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    let action = classify(ctx);
    if let Connect::Leave = action {
        return Ok(ALLOW);
    }
    // SAFETY: valid context; user_ip6 is read and written one 32-bit word at a time.
    unsafe {
        let ip = [
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
        ];
        let port = (*sa).user_port as u16;
        let mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == MAPPED_PREFIX;
        if let Connect::Dns = action {
            // Only a server of the IPv4 family has slots (127/8); an IPv6 server's queries
            // are left alone (ADR 015).
            if mapped && let Some(slot_ip) = redirect_dns4(ctx, ip[3], (*sa).user_port)? {
                (*sa).user_ip6[3] = slot_ip;
                (*sa).user_port = u32::from(DNS_PORT.to_be());
            }
            return Ok(ALLOW);
        }
        if let Connect::Probe = action {
            let dst = if mapped {
                AddrKey {
                    addr: [ip[3], 0, 0, 0],
                    family: u32::from(AF_INET),
                }
            } else {
                AddrKey {
                    addr: ip,
                    family: u32::from(AF_INET6),
                }
            };
            note_probe(ctx, dst);
            return Ok(ALLOW);
        }
        let orig = if mapped {
            if ip[3] == 0 || is_loopback4(ip[3]) {
                return Ok(ALLOW);
            }
            OrigDst {
                addr: [ip[3], 0, 0, 0],
                port,
                family: AF_INET,
                _pad: 0,
            }
        } else {
            if ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && (ip[3] == 0 || ip[3] == LOOPBACK6_LAST) {
                return Ok(ALLOW);
            }
            OrigDst {
                addr: ip,
                port,
                family: AF_INET6,
                _pad: 0,
            }
        };
        remember(ctx, &orig)?;
        if mapped {
            (*sa).user_ip6[3] = LOOPBACK4;
        } else {
            (*sa).user_ip6[0] = 0;
            (*sa).user_ip6[1] = 0;
            (*sa).user_ip6[2] = 0;
            (*sa).user_ip6[3] = LOOPBACK6_LAST;
        }
        (*sa).user_port = u32::from(OUTBOUND_PORT.to_be());
    }
    Ok(ALLOW)
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: valid context; getpeername4 may rewrite user_ip4/user_port.
    unsafe {
        let cookie = bpf_get_socket_cookie(sa as *mut c_void);
        if let Some(orig) = ORIG_DST_BY_COOKIE.get(cookie)
            && orig.family == AF_INET
        {
            (*sa).user_ip4 = orig.addr[0];
            (*sa).user_port = u32::from(orig.port);
        } else if let Some(server) = dns_server(&ctx, (*sa).user_ip4, (*sa).user_port) {
            (*sa).user_ip4 = server.addr[0];
            (*sa).user_port = u32::from(server.port);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: valid context; getpeername6 may rewrite user_ip6/user_port.
    unsafe {
        let cookie = bpf_get_socket_cookie(sa as *mut c_void);
        if let Some(orig) = ORIG_DST_BY_COOKIE.get(cookie) {
            if orig.family == AF_INET6 {
                (*sa).user_ip6[0] = orig.addr[0];
                (*sa).user_ip6[1] = orig.addr[1];
                (*sa).user_ip6[2] = orig.addr[2];
                (*sa).user_ip6[3] = orig.addr[3];
            } else {
                (*sa).user_ip6[0] = 0;
                (*sa).user_ip6[1] = 0;
                (*sa).user_ip6[2] = MAPPED_PREFIX;
                (*sa).user_ip6[3] = orig.addr[0];
            }
            (*sa).user_port = u32::from(orig.port);
        } else {
            unmap_dns_server(&ctx);
        }
    }
    ALLOW
}

/// An IPv6 socket's peer or source `::ffff:127.<slot>:15053` becomes the DNS server it
/// stands for.
fn unmap_dns_server(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: valid context; user_ip6/user_port are readable and writable in the programs
    // that call this (getpeername6, recvmsg6).
    unsafe {
        if (*sa).user_ip6[0] == 0
            && (*sa).user_ip6[1] == 0
            && (*sa).user_ip6[2] == MAPPED_PREFIX
            && let Some(server) = dns_server(ctx, (*sa).user_ip6[3], (*sa).user_port)
        {
            (*sa).user_ip6[3] = server.addr[0];
            (*sa).user_port = u32::from(server.port);
        }
    }
}

/// An unconnected UDP socket's query (`sendto`): to the resolver's slot, as `connect4`
/// does for a connected one.
#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if let Connect::Dns = classify(&ctx) {
        // SAFETY: valid context; user_ip4/user_port are readable and writable in sendmsg4.
        unsafe {
            match redirect_dns4(&ctx, (*sa).user_ip4, (*sa).user_port) {
                Ok(Some(slot_ip)) => {
                    (*sa).user_ip4 = slot_ip;
                    (*sa).user_port = u32::from(DNS_PORT.to_be());
                }
                Ok(None) => {}
                Err(verdict) => return verdict,
            }
        }
    }
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if let Connect::Dns = classify(&ctx) {
        // SAFETY: valid context; user_ip6/user_port are readable and writable in sendmsg6.
        unsafe {
            if (*sa).user_ip6[0] == 0
                && (*sa).user_ip6[1] == 0
                && (*sa).user_ip6[2] == MAPPED_PREFIX
            {
                match redirect_dns4(&ctx, (*sa).user_ip6[3], (*sa).user_port) {
                    Ok(Some(slot_ip)) => {
                        (*sa).user_ip6[3] = slot_ip;
                        (*sa).user_port = u32::from(DNS_PORT.to_be());
                    }
                    Ok(None) => {}
                    Err(verdict) => return verdict,
                }
            }
        }
    }
    ALLOW
}

/// The resolver's answer, received from `127.<slot>:15053`, comes from the server the
/// application asked (glibc drops answers from any other address).
#[cgroup_sock_addr(recvmsg4)]
pub fn mesh_recvmsg4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: valid context; user_ip4/user_port are readable and writable in recvmsg4.
    unsafe {
        if let Some(server) = dns_server(&ctx, (*sa).user_ip4, (*sa).user_port) {
            (*sa).user_ip4 = server.addr[0];
            (*sa).user_port = u32::from(server.port);
        }
    }
    // recvmsg programs may only allow.
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn mesh_recvmsg6(ctx: SockAddrContext) -> i32 {
    unmap_dns_server(&ctx);
    ALLOW
}

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    // sockops verdicts are advisory; always continue.
    let _ = try_sockops(&ctx);
    1
}

fn try_sockops(ctx: &SockOpsContext) -> Result<(), i64> {
    let ops = ctx.ops as *mut c_void;
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // SAFETY: valid context pointer from the kernel.
            let cookie = unsafe { bpf_get_socket_cookie(ops) };
            // SAFETY: the value is copied out before the map is written.
            let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(cookie) }).copied() else {
                if redirect_enabled() && is_delivery(ctx) {
                    // The agent's delivery connection to an application over the pod's
                    // `lo` (server leg).
                    track(ctx, &sock_key(ctx), RedirectState::MIRROR)?;
                    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
                }
                return Ok(());
            };
            // The proxy reached through a v6 socket may still be the v4 listener (mapped).
            let family = if ctx.family() == u32::from(AF_INET) {
                AF_INET
            } else {
                let remote = ctx.remote_ip6();
                if remote[0] == 0 && remote[1] == 0 && remote[2] == MAPPED_PREFIX {
                    AF_INET
                } else {
                    AF_INET6
                }
            };
            let key = OrigKey {
                // SAFETY: valid context pointer from the kernel.
                netns_cookie: unsafe { bpf_get_netns_cookie(ops) },
                port: ctx.local_port() as u16,
                family,
                _pad: 0,
            };
            ORIG_DST.insert(key, orig, 0)?;
            // Ask for state changes so the cookie record goes away with the socket.
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            // A captured connection to the agent over the pod's loopback (client leg):
            // its sends go straight into the agent's accepted socket once that is tracked
            // too, and stay in the map for the socket's life (the kernel can fail a
            // blocked read with EAGAIN when a socket leaves it).
            if redirect_enabled() {
                track(ctx, &sock_key(ctx), RedirectState::MIRROR)?;
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB if redirect_enabled() => {
            let key = sock_key(ctx);
            // SAFETY: map lookup of a plain key; the value is copied out.
            let mirrored = unsafe { REDIRECT_STATE.get(key.mirror()) }
                .is_some_and(|peer| peer.flags & RedirectState::MIRROR != 0);
            if mirrored {
                // The other end of a tracked loopback connection: the agent's accepted
                // socket of a captured connection, or the application's accepted socket
                // of a delivery connection.
                track(ctx, &key, RedirectState::MIRROR)?;
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            // SAFETY: map lookup of a plain key.
            } else if unsafe { REDIRECT_ROUTE.get(key) }.is_some() {
                // The application's side of a delivery socket the agent routed before
                // connecting.
                track(ctx, &key, 0)?;
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            }
        }
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // A prober's connection, about to send its SYN: its two ends are known now.
            // SAFETY: valid context pointer from the kernel; map lookup of a plain key.
            let cookie = unsafe { bpf_get_socket_cookie(ops) };
            if unsafe { PROBE_SOCKS.get(cookie) }.is_some() {
                PROBES.insert(probe_key(&sock_key(ctx)), 1, 0)?;
                // Ask for state changes so the record goes away with the connection.
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            // SAFETY: valid context pointer from the kernel.
            let cookie = unsafe { bpf_get_socket_cookie(ops) };
            let _ = ORIG_DST_BY_COOKIE.remove(cookie);
            if PROBE_SOCKS.remove(cookie).is_ok() {
                let _ = PROBES.remove(probe_key(&sock_key(ctx)));
            }
            if redirect_enabled() {
                let key = sock_key(ctx);
                // The other end no longer has a TCP peer to read.
                if let Some(peer) = REDIRECT_STATE.get_ptr_mut(key.mirror()) {
                    // SAFETY: a valid entry; a stale read of it only delays a redirect.
                    unsafe { (*peer).peer_sk = 0 };
                }
                // A routed socket's state is the agent's to read and remove (its byte
                // counts); the state of one the agent never routed goes with the socket.
                // SAFETY: map lookup of a plain key.
                if unsafe { REDIRECT_ROUTE.get(key) }.is_none() {
                    let _ = REDIRECT_STATE.remove(key);
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn redirect_enabled() -> bool {
    REDIRECT_ON.get(0).is_some_and(|on| *on == 1)
}

/// Whether the socket is one of the agent's inbound delivery sockets.
fn is_delivery(ctx: &SockOpsContext) -> bool {
    // SAFETY: the kernel hands a valid context; `sk` is null or a full socket.
    unsafe {
        let sk = (*ctx.ops).__bindgen_anon_2.sk;
        !sk.is_null() && (*sk).mark == DELIVERY_MARK
    }
}

/// Adds a socket to REDIRECT_SOCKS, then creates its state (so the state exists only for
/// sockets the verdict runs on), linked with the state of the other end of its connection
/// if that is tracked. Runs before the socket's owner can send.
fn track(ctx: &SockOpsContext, key: &SockKey, flags: u64) -> Result<(), i64> {
    // SAFETY: the kernel hands a valid, exclusive context.
    let ops = unsafe { &mut *ctx.ops };
    // The socket's address, kept only to be read with bpf_probe_read_kernel.
    // SAFETY: reading the context's socket pointer, null or a full socket.
    let sk = unsafe { ops.__bindgen_anon_2.sk } as u64;
    REDIRECT_SOCKS.update(*key, ops, 0).map_err(i64::from)?;
    let peer_sk = match REDIRECT_STATE.get_ptr_mut(key.mirror()) {
        // SAFETY: a valid entry, written by sockops only in these fields.
        Some(peer) => unsafe {
            (*peer).peer_sk = sk;
            (*peer).sk
        },
        None => 0,
    };
    let state = RedirectState {
        sk,
        peer_sk,
        flags,
        ..RedirectState::default()
    };
    REDIRECT_STATE.insert(key, state, 0).map_err(i64::from)
}

/// The key of the socket behind a context pointer of either kind that carries one:
/// `bpf_sock_ops` and `sk_msg_md` name the fields alike. Every field is read as one
/// 32-bit load, volatile, so the compiler cannot merge or narrow them or turn them into
/// loads through a modified context pointer, all of which the verifier rejects.
macro_rules! sock_key_of {
    ($ctx:expr) => {{
        let c = $ctx;
        // SAFETY: a valid context pointer from the kernel; each field read is one the
        // verifier allows for this program type.
        unsafe {
            use core::ptr::{addr_of, read_volatile as rv};
            let family = rv(addr_of!((*c).family));
            let (local, remote) = if family == u32::from(AF_INET) {
                (
                    [rv(addr_of!((*c).local_ip4)), 0, 0, 0],
                    [rv(addr_of!((*c).remote_ip4)), 0, 0, 0],
                )
            } else {
                (
                    [
                        rv(addr_of!((*c).local_ip6[0])),
                        rv(addr_of!((*c).local_ip6[1])),
                        rv(addr_of!((*c).local_ip6[2])),
                        rv(addr_of!((*c).local_ip6[3])),
                    ],
                    [
                        rv(addr_of!((*c).remote_ip6[0])),
                        rv(addr_of!((*c).remote_ip6[1])),
                        rv(addr_of!((*c).remote_ip6[2])),
                        rv(addr_of!((*c).remote_ip6[3])),
                    ],
                )
            };
            SockKey::from_kernel(
                bpf_get_netns_cookie(c as *mut c_void),
                family,
                local,
                remote,
                rv(addr_of!((*c).local_port)),
                rv(addr_of!((*c).remote_port)),
            )
        }
    }};
}

/// The key of the socket behind a sockops context.
fn sock_key(ctx: &SockOpsContext) -> SockKey {
    sock_key_of!(ctx.ops)
}

/// A prober's connection as its own socket sees it: local end = source.
fn probe_key(socket: &SockKey) -> ProbeKey {
    ProbeKey {
        src: socket.local,
        dst: socket.remote,
        src_port: socket.local_port as u16,
        dst_port: socket.remote_port as u16,
        family: socket.family,
    }
}

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: valid context; every field read here is readable in sk_lookup. The reads are
    // volatile and unconditional so the compiler cannot turn them into loads through a
    // modified context pointer, which the verifier rejects.
    let (protocol, ifindex, port, family, ip4, ip6, remote_port, remote4, remote6) = unsafe {
        use core::ptr::{addr_of, read_volatile as rv};
        (
            rv(addr_of!((*l).protocol)),
            rv(addr_of!((*l).ingress_ifindex)),
            rv(addr_of!((*l).local_port)),
            rv(addr_of!((*l).family)),
            rv(addr_of!((*l).local_ip4)),
            [
                rv(addr_of!((*l).local_ip6[0])),
                rv(addr_of!((*l).local_ip6[1])),
                rv(addr_of!((*l).local_ip6[2])),
                rv(addr_of!((*l).local_ip6[3])),
            ],
            rv(addr_of!((*l).remote_port)),
            rv(addr_of!((*l).remote_ip4)),
            [
                rv(addr_of!((*l).remote_ip6[0])),
                rv(addr_of!((*l).remote_ip6[1])),
                rv(addr_of!((*l).remote_ip6[2])),
                rv(addr_of!((*l).remote_ip6[3])),
            ],
        )
    };
    if protocol != IPPROTO_TCP || ifindex == LOOPBACK_IFINDEX || port == u32::from(HBONE_PORT) {
        return SK_PASS;
    }
    let key = if family == u32::from(AF_INET) {
        AddrKey {
            addr: [ip4, 0, 0, 0],
            family,
        }
    } else {
        AddrKey { addr: ip6, family }
    };
    // SAFETY: map lookup of a plain key.
    if unsafe { ENROLLED_ADDRS.get(key) }.is_none() {
        return SK_PASS;
    }
    // The kubelet's health probe goes straight to the application (STRICT must not fail
    // every pod's probes; Istio exempts them the same way).
    let probe = ProbeKey {
        src: if family == u32::from(AF_INET) {
            [remote4, 0, 0, 0]
        } else {
            remote6
        },
        dst: key.addr,
        src_port: u16::from_be(remote_port),
        dst_port: port as u16,
        family,
    };
    // SAFETY: map lookup of a plain key.
    if unsafe { PROBES.get(probe) }.is_some() {
        return SK_PASS;
    }
    // An enrolled pod without its inbound listener (agent down) fails closed.
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => SK_PASS,
        Err(_) => SK_DROP,
    }
}

/// The kernel moves a connection's bytes between sockets of the same node, skipping TCP
/// over loopback: an application's sends go into the agent's accepted socket and the
/// agent's back into the application's (client leg, [`RedirectState::MIRROR`]), the
/// agent's delivery sends into the application's accepted socket and back (server leg),
/// or, for a same-node connection the agent routed, between the two applications'
/// sockets ([`RedirectRoute`]). Runs for each send of a socket in REDIRECT_SOCKS,
/// serialized per socket by the kernel. Whatever it does not redirect goes over TCP as
/// without it: always correct, only slower.
#[sk_msg]
pub fn mesh_redirect(ctx: SkMsgContext) -> u32 {
    let key = sock_key_of!(ctx.msg);
    let size = u64::from(ctx.size());
    let state = REDIRECT_STATE.get_ptr_mut(key);
    // SAFETY: the state entry stays valid for the program's run; only this socket's
    // verdict writes its counters, and the kernel runs one verdict per socket at a time.
    let passed = state.map(|s| unsafe { (*s).passed });
    // SAFETY: as above.
    let mirror = state.is_some_and(|s| unsafe { (*s).flags } & RedirectState::MIRROR != 0);
    // Past the agent, to the route's application socket, once the agent forwarded every
    // byte that went to it.
    // SAFETY: map lookup of a plain key; the value is copied out.
    if let Some(route) = unsafe { REDIRECT_ROUTE.get(key) }.copied()
        && (route.forwarded == RedirectRoute::ALWAYS || Some(route.forwarded) == passed)
        && redirect(&ctx, route.target)
    {
        if let Some(s) = state {
            // SAFETY: as above.
            unsafe { (*s).redirected += size };
        }
        return SK_PASS;
    }
    // To the agent, into the other end of the socket's own connection.
    if mirror && redirect(&ctx, key.mirror()) {
        if let Some(s) = state {
            // SAFETY: as above.
            unsafe { (*s).passed += size };
        }
        return SK_PASS;
    }
    // Over TCP: not tracked at the other end, the receiver's queue full, or the target
    // gone.
    if let Some(s) = state {
        // SAFETY: as above.
        unsafe { (*s).passed += size };
    }
    SK_PASS
}

/// Redirects the message into `target`'s receive queue if [`may_enter`] allows it.
fn redirect(ctx: &SkMsgContext, mut target: SockKey) -> bool {
    may_enter(&target)
        && REDIRECT_SOCKS.redirect_msg(ctx, &mut target, u64::from(BPF_F_INGRESS))
            == i64::from(SK_PASS)
}

/// Whether a send may be redirected into `target`'s receive queue now:
/// - **order**: the receiver has read every byte its TCP peer sent it over TCP (it reads
///   redirected bytes first, so they must not overtake those);
/// - **back-pressure**: what was redirected to it and is not read yet is under its
///   receive buffer. Past it, sends go over TCP, whose window and send buffer block the
///   sender as they would without the mesh, and they come back to the redirect only once
///   the receiver has read everything (the order rule). The buffer counts as at least
///   [`REDIRECT_QUEUE_FLOOR`].
fn may_enter(target: &SockKey) -> bool {
    // SAFETY: a global the loader sets; read as the verifier sees it.
    let off = unsafe { core::ptr::read_volatile(&MESH_KERNEL_OFFSETS) };
    // SAFETY: map lookup of a plain key; the value is copied out.
    let Some(t) = (unsafe { REDIRECT_STATE.get(target) }).copied() else {
        return false;
    };
    if t.sk == 0 || t.peer_sk == 0 || off.msg_tot_len == 0 {
        return false;
    }
    let read = |addr: u64| -> Option<u32> {
        // SAFETY: a fault-tolerant kernel read; a stale address reads garbage, not memory
        // the program may write.
        unsafe { bpf_probe_read_kernel(addr as *const u32) }.ok()
    };
    let (Some(copied), Some(written)) = (
        read(t.sk + u64::from(off.copied_seq)),
        read(t.peer_sk + u64::from(off.write_seq)),
    ) else {
        return false;
    };
    if copied != written {
        return false;
    }
    // SAFETY: as above.
    let Ok(user_data) =
        (unsafe { bpf_probe_read_kernel((t.sk + u64::from(off.sk_user_data)) as *const u64) })
    else {
        return false;
    };
    let psock = user_data & SK_USER_DATA_PTRMASK;
    if psock == 0 {
        return false;
    }
    match (
        read(psock + u64::from(off.msg_tot_len)),
        read(t.sk + u64::from(off.sk_rcvbuf)),
    ) {
        (Some(queued), Some(rcvbuf)) => queued < rcvbuf.max(REDIRECT_QUEUE_FLOOR),
        _ => false,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
