//! Same-node connections redirected in the kernel: once a connection is authorized, what
//! the client application sends goes straight into the server application's receive
//! queue and back (`sk_msg` verdict), skipping both TCP connections through the agent,
//! and the proxy leaves the data path. What stays in user space: end of stream, errors,
//! policy cuts, the bytes sent before the redirect started (forwarded by the agent, and
//! redirected in turn so the receiver reads every byte from one queue), and the byte
//! counters, the agent's own plus the verdict's.
//!
//! The four sockets: the client application's (C, added to the socket map by `sockops`
//! when it connected), the agent's accepted socket (A1), the agent's delivery socket
//! (A2), and the server application's accepted socket (S, added by `sockops` because the
//! agent routed it before connecting). C sends into S, S into C; A1 forwards what C sent
//! before its route was ready, into C's peer S via A2's route, and A2 likewise into C.

use std::{io, net::SocketAddr, time::Duration};

use mesh_common::{RedirectRoute, SockKey};
use tokio::net::{TcpSocket, TcpStream};

use super::copy::{self, Transferred};
use crate::ebpf::{Sockmap, sockmap::sock_key};

/// How long the agent waits, after connecting, for the kernel to add the server's
/// accepted socket to the map (its handshake completes in the kernel right after ours).
const SERVER_TRACKED_WAIT: Duration = Duration::from_millis(20);
/// Checks made between yields to the runtime before falling back to timer ticks.
const SERVER_TRACKED_YIELDS: u32 = 16;
/// Bytes read at once from an agent socket (only bytes sent before the redirect).
const FORWARD_CHUNK: usize = 16 * 1024;

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

/// The keys of a connection's four sockets.
#[derive(Clone, Copy, Debug)]
struct Keys {
    client: SockKey,
    agent_down: SockKey,
    agent_up: SockKey,
    server: SockKey,
}

/// A connection routed before its delivery socket connects: the server's sends already
/// go to the client. Dropped unstarted (the connect failed), it forgets its routes.
pub struct Prepared<'a> {
    routes: Routes<'a>,
    server_netns: u64,
}

/// A connection whose bytes the kernel moves.
pub struct Redirected<'a> {
    routes: Routes<'a>,
    /// The client's sends are redirected too (the server's socket made it into the map).
    client_routed: bool,
}

/// The routes and state of a connection's sockets, forgotten when it ends, whichever way.
struct Routes<'a> {
    map: &'a Sockmap,
    keys: Keys,
}

impl Drop for Routes<'_> {
    fn drop(&mut self) {
        let k = self.keys;
        self.map
            .forget(&[k.client, k.agent_down, k.agent_up, k.server]);
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
        agent_down: sock_key(client_netns, down_local, down_peer),
        // Known once connected.
        agent_up: SockKey::default(),
        server: sock_key(server_netns, target, up_local),
    };
    if map.state(&keys.client).is_none() {
        return Err(Refused::ClientUntracked);
    }
    let routes = Routes { map, keys };
    map.add_socket(&keys.agent_down, downstream)
        .map_err(io("adding the accepted socket"))?;
    map.route(&keys.agent_down, &keys.client, RedirectRoute::ALWAYS)
        .map_err(io("routing the accepted socket"))?;
    map.route(&keys.server, &keys.client, 0)
        .map_err(io("routing the server"))?;
    Ok(Prepared {
        routes,
        server_netns,
    })
}

impl<'a> Prepared<'a> {
    /// Routes the client's side once the delivery socket `upstream` is connected. If the
    /// server's socket does not show up in the map, the client's sends keep going through
    /// the agent (still correct: the server then receives everything over TCP).
    pub async fn start(self, upstream: &TcpStream) -> Redirected<'a> {
        let mut redirected = Redirected {
            routes: self.routes,
            client_routed: false,
        };
        let (Ok(local), Ok(peer)) = (upstream.local_addr(), upstream.peer_addr()) else {
            return redirected;
        };
        let map = redirected.routes.map;
        redirected.routes.keys.agent_up = sock_key(self.server_netns, local, peer);
        let keys = redirected.routes.keys;
        if !Box::pin(tracked(map, &keys.server)).await {
            tracing::debug!(
                "server socket not in the socket map; client sends go through the agent"
            );
            return redirected;
        }
        let routed = map
            .add_socket(&keys.agent_up, upstream)
            .and_then(|()| map.route(&keys.agent_up, &keys.server, RedirectRoute::ALWAYS))
            .and_then(|()| map.route(&keys.client, &keys.server, 0));
        match routed {
            Ok(()) => redirected.client_routed = true,
            Err(e) => {
                // Nothing went to the server yet: it can still all go over TCP.
                let _ = map.forget_route(&keys.client);
                let _ = map.forget_route(&keys.agent_up);
                tracing::debug!(error = %e, "client sends go through the agent");
            }
        }
        redirected
    }
}

/// Waits for the kernel to add an application socket to the map: usually there at once;
/// else lets the kernel's softirq run (yields), then waits in timer ticks (1 ms), up to
/// [`SERVER_TRACKED_WAIT`]. Boxed by the caller: only connections that wait hold it.
async fn tracked(map: &Sockmap, app: &SockKey) -> bool {
    let started = std::time::Instant::now();
    let mut checks = 0;
    while map.state(app).is_none() {
        if started.elapsed() >= SERVER_TRACKED_WAIT {
            return false;
        }
        checks += 1;
        if checks <= SERVER_TRACKED_YIELDS {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    true
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

    /// Forwards what the application behind `from` passed over TCP instead of being
    /// redirected, telling the verdict how far the agent got (`route`: the application's
    /// socket and its target), until the application ends its stream; then ends `to`'s.
    async fn one_way(
        &self,
        from: &TcpStream,
        to: &TcpStream,
        route: Option<(&SockKey, &SockKey)>,
        forwarded: &mut u64,
    ) -> io::Result<()> {
        loop {
            from.readable().await?;
            // Allocated for this read only: an idle connection holds no buffer.
            let mut buf = vec![0; FORWARD_CHUNK];
            match from.try_read(&mut buf) {
                Ok(0) => break,
                Ok(n) => buf.truncate(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
            write_all(to, &buf).await?;
            *forwarded += buf.len() as u64;
            if let Some((app, target)) = route {
                self.routes.map.route(app, target, *forwarded)?;
            }
        }
        // Everything the application sent is in the peer's queue: each redirected send
        // was queued before its system call returned.
        copy::half_close(to)
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
