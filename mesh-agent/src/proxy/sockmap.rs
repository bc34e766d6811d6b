//! Same-node connections redirected in the kernel: once a connection is authorized, what
//! the client application sends goes straight into the server application's receive
//! queue and back (`sk_msg` verdict), skipping the agent, which leaves the data path.
//! What stays in user space: end of stream, errors, policy cuts, the bytes sent before the
//! redirect started (forwarded by the agent), and the byte counters, the agent's own plus
//! the verdict's.
//!
//! The four sockets: the client application's (C), the agent's accepted socket (A1), the
//! agent's delivery socket (A2) and the server application's accepted socket (S). The
//! kernel tracks all four by itself (`sockops`): C and A1 are the two ends of the captured
//! loopback connection, A2 and S of the delivery connection, and each end's sends go into
//! the other's receive queue without a TCP traversal (ADR 016). The agent adds only two
//! routes: S's sends to C, and C's to S. Until those apply (the agent forwarded what went
//! to it first), each socket's sends go to the agent as they would without them.

use std::{io, net::SocketAddr};

use mesh_common::SockKey;
use tokio::net::{TcpSocket, TcpStream};

use super::copy::{self, Transferred};
use crate::ebpf::{Sockmap, sockmap::sock_key};

/// Why a connection is not redirected (the caller copies it instead).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the client's socket is not in the socket map")]
    ClientUntracked,
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

/// The keys of the connection's two application sockets.
#[derive(Clone, Copy, Debug)]
struct Keys {
    client: SockKey,
    server: SockKey,
}

/// A connection routed before its delivery socket connects: the server's sends already
/// go to the client. Dropped unstarted (the connect failed), it forgets its routes.
pub struct Prepared<'a> {
    routes: Routes<'a>,
}

/// A connection whose bytes the kernel moves.
pub struct Redirected<'a> {
    routes: Routes<'a>,
    /// The client's sends are routed to the server too.
    client_routed: bool,
}

/// The routes and state of a connection's application sockets, forgotten when it ends,
/// whichever way (the agent's own sockets' state goes with them).
struct Routes<'a> {
    map: &'a Sockmap,
    keys: Keys,
}

impl Drop for Routes<'_> {
    fn drop(&mut self) {
        let k = self.keys;
        self.map.forget(&[k.client, k.server]);
    }
}

/// Routes the server's side of a same-node connection before the agent connects to it:
/// `downstream` is the agent's accepted socket in namespace `client_netns`, `delivery`
/// the agent's bound (not yet connected) socket to `target` in `server_netns`.
pub fn prepare<'a>(
    map: &'a Sockmap,
    client_netns: u64,
    downstream: &TcpStream,
    server_netns: u64,
    delivery: &TcpSocket,
    target: SocketAddr,
) -> Result<Prepared<'a>, Refused> {
    let io = |what| move |source| Refused::Io { what, source };
    let (down_local, down_peer) = (
        downstream.local_addr().map_err(io("accepted socket"))?,
        downstream.peer_addr().map_err(io("accepted socket"))?,
    );
    let up_local = delivery.local_addr().map_err(io("delivery socket"))?;
    let keys = Keys {
        client: sock_key(client_netns, down_peer, down_local),
        server: sock_key(server_netns, target, up_local),
    };
    if map.state(&keys.client).is_none() {
        return Err(Refused::ClientUntracked);
    }
    let routes = Routes { map, keys };
    map.route(&keys.server, &keys.client, 0)
        .map_err(io("routing the server"))?;
    Ok(Prepared { routes })
}

impl<'a> Prepared<'a> {
    /// Routes the client's side once the delivery socket is connected. The route applies
    /// once the server's socket is tracked (the kernel adds it as its handshake completes)
    /// and the agent forwarded what the client sent before: nothing waits for either.
    pub fn start(self) -> Redirected<'a> {
        let k = self.routes.keys;
        let client_routed = match self.routes.map.route(&k.client, &k.server, 0) {
            Ok(()) => true,
            Err(e) => {
                // Its sends keep going to the agent, which forwards them.
                tracing::debug!(error = %e, "client sends go through the agent");
                false
            }
        };
        Redirected {
            routes: self.routes,
            client_routed,
        }
    }
}

/// How a redirected connection ended.
#[derive(Debug)]
pub struct Outcome {
    /// Bytes each way: what the agent forwarded plus what the kernel redirected.
    pub transferred: Transferred,
    /// Of those, the bytes the agent forwarded itself (sent before the redirect started).
    pub forwarded_by_agent: u64,
    /// Why it ended early, if it did (both agent sockets were reset, which resets both
    /// applications).
    pub error: Option<io::Error>,
}

impl Redirected<'_> {
    /// Runs the connection to its end. On error (or `cancel`) both agent sockets are
    /// reset, and with them the applications' connections; after a clean end both close
    /// gracefully.
    pub async fn run(
        self,
        downstream: &TcpStream,
        upstream: &TcpStream,
        cancel: impl Future<Output = ()>,
    ) -> Outcome {
        // References, not copies: what lives across an await is held by every idle
        // connection.
        let (map, k) = (self.routes.map, &self.routes.keys);
        let (mut down, mut up) = (0u64, 0u64);
        let client_route = self.client_routed.then_some((&k.client, &k.server));
        let server_route = Some((&k.server, &k.client));
        let error = copy::until_both(
            self.one_way(downstream, upstream, client_route, &mut down),
            self.one_way(upstream, downstream, server_route, &mut up),
            cancel,
        )
        .await;
        if error.is_some() {
            copy::reset(downstream);
            copy::reset(upstream);
        } else {
            copy::graceful(downstream);
            copy::graceful(upstream);
        }
        let redirected = |app| map.state(app).map_or(0, |s| s.redirected);
        Outcome {
            transferred: Transferred {
                downstream_to_upstream: down + redirected(&k.client),
                upstream_to_downstream: up + redirected(&k.server),
            },
            forwarded_by_agent: down + up,
            error,
        }
    }

    /// Forwards what the application behind `from` sent to the agent instead of past it,
    /// telling the verdict how far the agent got (`route`: the application's socket and
    /// its target), until the application ends its stream; then ends `to`'s.
    async fn one_way(
        &self,
        from: &TcpStream,
        to: &TcpStream,
        route: Option<(&SockKey, &SockKey)>,
        forwarded: &mut u64,
    ) -> io::Result<()> {
        copy::read_write_one_way(from, to, |n| {
            *forwarded += n as u64;
            match route {
                Some((app, target)) => self.routes.map.route(app, target, *forwarded),
                None => Ok(()),
            }
        })
        .await
    }
}
