//! The maps of the same-node splice as the agent writes them: which two agent sockets form
//! a connection, and how many bytes the agent forwarded itself. The proxy's half (when to
//! splice, half-close, counters) is `proxy/sockmap.rs`.
//!
//! The maps belong to this process: its sockets die with it, so nothing is pinned and a
//! restarted agent starts with empty maps. All calls are plain `bpf(2)` map operations,
//! safe from any thread without a lock.

use std::{
    io,
    os::fd::{AsFd, BorrowedFd},
};

use aya::maps::MapData;
use mesh_common::SpliceState;

use super::sys;

/// The splice maps, with the stream verdict program attached to the socket map.
pub struct Sockmap {
    sockets: MapData,
    state: MapData,
    forwarded: MapData,
}

/// Why the kernel refused to splice a connection (the proxy copies it instead).
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct SpliceRefused {
    what: &'static str,
    source: io::Error,
}

/// The two sockets of a spliced connection, by socket cookie.
#[derive(Clone, Copy, Debug)]
pub struct SplicedPair {
    pub downstream: u64,
    pub upstream: u64,
}

impl Sockmap {
    pub(super) fn new(sockets: MapData, state: MapData, forwarded: MapData) -> Self {
        Sockmap {
            sockets,
            state,
            forwarded,
        }
    }

    /// Hands the bytes of `downstream` and `upstream` to the kernel. On success the
    /// verdict redirects every byte arriving on one socket out of the other; bytes it
    /// could not redirect yet stay readable on their socket for the agent to forward
    /// (see [`Sockmap::forwarded`]). On failure nothing is redirected and the agent
    /// copies the connection itself; a socket already in the map only passes bytes up.
    pub fn splice(
        &self,
        downstream: &impl AsFd,
        upstream: &impl AsFd,
    ) -> Result<SplicedPair, SpliceRefused> {
        let refused = |what| move |source| SpliceRefused { what, source };
        let pair = SplicedPair {
            downstream: sys::socket_cookie(downstream).map_err(refused("socket cookie"))?,
            upstream: sys::socket_cookie(upstream).map_err(refused("socket cookie"))?,
        };
        for (me, peer) in [
            (pair.downstream, pair.upstream),
            (pair.upstream, pair.downstream),
        ] {
            let state = SpliceState {
                peer,
                ..SpliceState::default()
            };
            if let Err(e) = sys::map_update(
                self.state.fd().as_fd(),
                &me.to_ne_bytes(),
                sys::bytes_of(&state),
            ) {
                self.forget(pair);
                return Err(refused("splice state")(e));
            }
        }
        // The downstream first: a client that already half-closed (CLOSE_WAIT) is refused
        // here, before anything entered the map.
        for (cookie, sock) in [
            (pair.downstream, downstream.as_fd()),
            (pair.upstream, upstream.as_fd()),
        ] {
            if let Err(e) = self.insert_socket(cookie, sock) {
                self.forget(pair);
                return Err(refused("socket map")(e));
            }
        }
        Ok(pair)
    }

    fn insert_socket(&self, cookie: u64, sock: BorrowedFd<'_>) -> io::Result<()> {
        use std::os::fd::AsRawFd as _;
        let fd = sock.as_raw_fd() as u32;
        sys::map_update(
            self.sockets.fd().as_fd(),
            &cookie.to_ne_bytes(),
            &fd.to_ne_bytes(),
        )
    }

    /// Records that the agent forwarded `total` bytes read from the socket `cookie` itself;
    /// once that matches what the verdict passed up, it redirects again.
    pub fn forwarded(&self, cookie: u64, total: u64) -> io::Result<()> {
        sys::map_update(
            self.forwarded.fd().as_fd(),
            &cookie.to_ne_bytes(),
            &total.to_ne_bytes(),
        )
    }

    /// Drops the bookkeeping of a connection. Sockets leave the socket map by themselves
    /// when they close.
    pub fn forget(&self, pair: SplicedPair) {
        for cookie in [pair.downstream, pair.upstream] {
            let key = cookie.to_ne_bytes();
            let _ = sys::map_delete(self.state.fd().as_fd(), &key);
            let _ = sys::map_delete(self.forwarded.fd().as_fd(), &key);
        }
    }
}
