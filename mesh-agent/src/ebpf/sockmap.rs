//! The maps of the kernel's redirect as the agent reads and writes them: where a socket's
//! sends go past the agent, and what the verdict counted. The kernel programs add the
//! sockets themselves. The proxy's half (when to redirect, forwarding, counters) is
//! `proxy/sockmap.rs`.
//!
//! The maps belong to this process: its sockets die with it, so nothing is pinned and a
//! restarted agent starts with empty maps. All calls are plain `bpf(2)` map operations,
//! safe from any thread without a lock.

use std::{io, net::SocketAddr, os::fd::AsFd};

use aya::maps::MapData;
use mesh_common::{RedirectRoute, RedirectState, SockKey};

use super::addr_key;
use crate::sys;

/// The redirect maps, with the `sk_msg` verdict attached to the socket map.
pub struct Sockmap {
    /// The socket map, held open with the verdict attached (`sockops` fills it).
    _sockets: MapData,
    state: MapData,
    route: MapData,
}

/// The key of a socket in namespace `netns_cookie` with ends `local` and `remote`, as the
/// kernel programs compute it for the socket at either end.
pub fn sock_key(netns_cookie: u64, local: SocketAddr, remote: SocketAddr) -> SockKey {
    let (l, r) = (addr_key(local.ip()), addr_key(remote.ip()));
    SockKey {
        netns_cookie,
        local: l.addr,
        remote: r.addr,
        local_port: u32::from(local.port()),
        remote_port: u32::from(remote.port()),
        family: l.family,
        _pad: 0,
    }
}

impl Sockmap {
    pub(super) fn new(sockets: MapData, state: MapData, route: MapData) -> Self {
        Sockmap {
            _sockets: sockets,
            state,
            route,
        }
    }

    /// What the verdict did with the sends of an application socket; `None` if the kernel
    /// does not track it (`sockops` did not add it to the socket map).
    pub fn state(&self, app: &SockKey) -> Option<RedirectState> {
        let mut state = RedirectState::default();
        sys::map_lookup(
            self.state.fd().as_fd(),
            sys::bytes_of(app),
            sys::bytes_of_mut(&mut state),
        )
        .ok()?;
        Some(state)
    }

    /// Sends of `from` go into the receive queue of `to`, once the agent forwarded
    /// `forwarded` bytes of what `from` sent to it ([`RedirectRoute::ALWAYS`]: at once).
    pub fn route(&self, from: &SockKey, to: &SockKey, forwarded: u64) -> io::Result<()> {
        let route = RedirectRoute {
            target: *to,
            forwarded,
        };
        sys::map_update(
            self.route.fd().as_fd(),
            sys::bytes_of(from),
            sys::bytes_of(&route),
        )
    }

    /// Drops the route of one socket: its sends go over TCP again.
    pub fn forget_route(&self, key: &SockKey) -> io::Result<()> {
        sys::map_delete(self.route.fd().as_fd(), sys::bytes_of(key))
    }

    /// Drops the routes and state of these sockets. Sockets leave the socket map by
    /// themselves when they close.
    pub fn forget(&self, keys: &[SockKey]) {
        for key in keys {
            let _ = sys::map_delete(self.route.fd().as_fd(), sys::bytes_of(key));
            let _ = sys::map_delete(self.state.fd().as_fd(), sys::bytes_of(key));
        }
    }
}
