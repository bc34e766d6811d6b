//! Hitless restart: a new agent takes over the listening sockets of the agent it replaces
//! (ADR 014).
//!
//! Every socket the agent listens on (each enrolled pod's 15001/15006/15008, its resolver's
//! 15053 over TCP and UDP, the admin ports) is obtained through [`Listeners`], keyed by where
//! it listens: its network namespace (the namespace's cookie), its transport and its local
//! address. A running agent offers them on
//! a Unix socket ([`offer`]); a starting agent asks there first ([`take_over`]). The
//! predecessor passes duplicates of its descriptors (`SCM_RIGHTS`), which are the same
//! kernel sockets: a connection waiting in an accept queue is accepted by whichever process
//! gets to it, and none is refused because nothing listened for a moment. The successor
//! uses them instead of binding. Once it has applied its configuration it says so
//! ([`Predecessor::release`]); the predecessor then stops accepting, asks its HBONE peers to
//! open new connections (GOAWAY), and lets the connections it carries end, for at most its
//! drain period, before it exits.
//!
//! The exchange, on a `SOCK_SEQPACKET` socket (one record per message):
//! - successor: `HELLO 1`;
//! - predecessor: `{"keys": [...], "more": bool}` (JSON) with one descriptor per key, at
//!   most [`BATCH`] per message, until `more` is false;
//! - successor, once it serves: `TAKEN`. Either side closing before that ends the attempt,
//!   and the predecessor goes on serving as if nothing had happened.

use std::{
    collections::HashMap,
    io::{self, IoSlice},
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use nix::sys::socket::{
    self as sock, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use serde::{Deserialize, Serialize};
use socket2::Socket;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Where a listening socket listens: its network namespace's cookie, its transport and its
/// address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns: u64,
    pub addr: SocketAddr,
    /// A UDP socket (bound, receiving) rather than a listening TCP one.
    pub udp: bool,
}

impl ListenerKey {
    pub fn tcp(netns: u64, addr: SocketAddr) -> Self {
        ListenerKey {
            netns,
            addr,
            udp: false,
        }
    }

    pub fn udp(netns: u64, addr: SocketAddr) -> Self {
        ListenerKey {
            netns,
            addr,
            udp: true,
        }
    }
}

/// `<netns>/<addr>` for TCP (as agents before UDP listeners wrote every key), and
/// `<netns>/udp/<addr>`.
impl std::fmt::Display for ListenerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let transport = if self.udp { "udp/" } else { "" };
        write!(f, "{}/{transport}{}", self.netns, self.addr)
    }
}

impl std::str::FromStr for ListenerKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (netns, rest) = s
            .split_once('/')
            .ok_or_else(|| format!("no '/' in {s:?}"))?;
        let (udp, addr) = match rest.strip_prefix("udp/") {
            Some(addr) => (true, addr),
            None => (false, rest),
        };
        Ok(ListenerKey {
            netns: netns.parse().map_err(|e| format!("{s:?}: {e}"))?,
            addr: addr.parse().map_err(|e| format!("{s:?}: {e}"))?,
            udp,
        })
    }
}

/// The listening sockets of this process: those inherited from a predecessor, not yet
/// claimed, and those offered to a successor (duplicates, each held until its
/// [`Registration`] is dropped).
#[derive(Default)]
pub struct Listeners {
    inherited: Mutex<HashMap<ListenerKey, OwnedFd>>,
    offered: Mutex<HashMap<ListenerKey, (u64, OwnedFd)>>,
    ids: AtomicU64,
    /// Cancelled when a successor took the listeners over: every accept loop stops.
    handed_over: CancellationToken,
}

/// A listening socket of this process, offered to a successor until dropped.
pub struct Registration {
    listeners: Arc<Listeners>,
    key: ListenerKey,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut offered = self.listeners.offered.lock().expect("listeners lock");
        if offered.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            offered.remove(&self.key);
        }
    }
}

/// A listening socket and its registration.
pub struct Listening {
    pub socket: Socket,
    /// Whether it came from the predecessor rather than a new bind.
    pub inherited: bool,
    pub registration: Registration,
}

impl Listeners {
    /// Nothing inherited (a first start, or a process that is never restarted in place).
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// The sockets a predecessor passed.
    pub fn inheriting(sockets: HashMap<ListenerKey, OwnedFd>) -> Arc<Self> {
        Arc::new(Listeners {
            inherited: Mutex::new(sockets),
            ..Listeners::default()
        })
    }

    /// The socket listening at `key`: the predecessor's if it passed one that listens there,
    /// else `bind()`'s. Either way it is offered to a successor until the registration is
    /// dropped.
    pub fn listen(
        self: &Arc<Self>,
        key: ListenerKey,
        bind: impl FnOnce() -> io::Result<Socket>,
    ) -> io::Result<Listening> {
        let inherited = self
            .inherited
            .lock()
            .expect("listeners lock")
            .remove(&key)
            .map(Socket::from)
            .filter(|s| listens_at(s, key));
        let (socket, inherited) = match inherited {
            Some(s) => (s, true),
            None => (bind()?, false),
        };
        socket.set_nonblocking(true)?;
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let dup = socket.as_fd().try_clone_to_owned()?;
        self.offered
            .lock()
            .expect("listeners lock")
            .insert(key, (id, dup));
        Ok(Listening {
            socket,
            inherited,
            registration: Registration {
                listeners: self.clone(),
                key,
                id,
            },
        })
    }

    /// Closes the inherited sockets nothing claimed (listeners of pods this process does
    /// not capture); their keys.
    pub fn close_unclaimed(&self) -> Vec<ListenerKey> {
        let mut inherited = self.inherited.lock().expect("listeners lock");
        inherited.drain().map(|(k, _)| k).collect()
    }

    /// Sockets offered now.
    pub fn offered(&self) -> usize {
        self.offered.lock().expect("listeners lock").len()
    }

    /// Resolves once a successor took the listeners over.
    pub fn handed_over(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.handed_over.cancelled()
    }

    /// Duplicates of every offered socket, for a successor.
    fn snapshot(&self) -> io::Result<Vec<(ListenerKey, OwnedFd)>> {
        let offered = self.offered.lock().expect("listeners lock");
        offered
            .iter()
            .map(|(k, (_, fd))| Ok((*k, fd.try_clone()?)))
            .collect()
    }
}

/// Whether `socket` is a TCP socket listening at `addr`.
fn listens_at(socket: &Socket, key: ListenerKey) -> bool {
    let listening = if key.udp {
        socket.r#type().is_ok_and(|t| t == socket2::Type::DGRAM)
    } else {
        socket.is_listener().unwrap_or(false)
    };
    let local = socket.local_addr().ok().and_then(|a| a.as_socket());
    if !(listening && local == Some(key.addr)) {
        tracing::warn!(%key, ?local, listening, "an inherited socket does not listen where it was said to; binding a new one");
        return false;
    }
    true
}

/// Descriptors per message (the kernel takes at most 253).
pub const BATCH: usize = 200;
const HELLO: &[u8] = b"HELLO 1";
const TAKEN: &[u8] = b"TAKEN";
/// The largest record of the exchange.
const MAX_RECORD: usize = 64 * 1024;

#[derive(Serialize, Deserialize)]
struct Batch {
    keys: Vec<String>,
    more: bool,
}

/// Offers this process's listeners on `path` (replacing whatever was there: a stale socket,
/// or the predecessor's, which needs it no more) from a thread of its own. The receiver
/// resolves once a successor took them; [`Listeners::handed_over`] fires at the same time.
pub fn offer(path: &Path, listeners: Arc<Listeners>) -> io::Result<oneshot::Receiver<()>> {
    let server = bind_unix(path)?;
    let (tx, rx) = oneshot::channel();
    let path = path.to_owned();
    std::thread::Builder::new()
        .name("handoff".into())
        .spawn(move || {
            loop {
                let conn = match sock::accept(server.as_raw_fd()) {
                    Ok(fd) => crate::sys::own_fd(fd),
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "handoff socket failed; restarts will not be hitless");
                        return;
                    }
                };
                match serve_successor(&conn, &listeners) {
                    Ok(passed) => {
                        tracing::info!(listeners = passed, "a new agent took over the listeners");
                        listeners.handed_over.cancel();
                        let _ = tx.send(());
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "a new agent did not complete the takeover; still serving")
                    }
                }
            }
        })?;
    Ok(rx)
}

/// A Unix `SOCK_SEQPACKET` socket listening at `path`, reachable by root only.
fn bind_unix(path: &Path) -> io::Result<OwnedFd> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let fd = sock::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    sock::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    sock::listen(&fd, sock::Backlog::new(4)?)?;
    Ok(fd)
}

/// Passes every offered listener to the successor on `conn`; the count, once it said
/// TAKEN.
fn serve_successor(conn: &OwnedFd, listeners: &Listeners) -> io::Result<usize> {
    let mut buf = vec![0u8; MAX_RECORD];
    let hello = recv(conn, &mut buf)?;
    if hello.0 != HELLO {
        return Err(io::Error::other(format!(
            "unexpected greeting {:?}",
            String::from_utf8_lossy(&hello.0)
        )));
    }
    let sockets = listeners.snapshot()?;
    let total = sockets.len();
    let mut chunks = sockets.chunks(BATCH).peekable();
    if chunks.peek().is_none() {
        send(
            conn,
            &Batch {
                keys: Vec::new(),
                more: false,
            },
            &[],
        )?;
    }
    while let Some(chunk) = chunks.next() {
        let batch = Batch {
            keys: chunk.iter().map(|(k, _)| k.to_string()).collect(),
            more: chunks.peek().is_some(),
        };
        let fds: Vec<_> = chunk.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        send(conn, &batch, &fds)?;
    }
    // The successor answers once it applied its configuration with these sockets.
    let (taken, _) = recv(conn, &mut buf)?;
    if taken != TAKEN {
        return Err(io::Error::other(if taken.is_empty() {
            "the new agent closed the handoff connection before it served".to_string()
        } else {
            format!("unexpected answer {:?}", String::from_utf8_lossy(&taken))
        }));
    }
    Ok(total)
}

/// The agent being replaced, until told it may stop accepting.
pub struct Predecessor {
    conn: OwnedFd,
}

impl Predecessor {
    /// Tells the predecessor this process now serves: it stops accepting and drains.
    pub fn release(self) -> io::Result<()> {
        sock::send(self.conn.as_raw_fd(), TAKEN, MsgFlags::MSG_NOSIGNAL)?;
        Ok(())
    }
}

/// Asks the agent offering its listeners on `path` for them. `None` when nothing offers
/// there (no file, or a socket nobody listens on: a first start, or after a crash).
pub fn take_over(path: &Path) -> io::Result<Option<(Predecessor, HashMap<ListenerKey, OwnedFd>)>> {
    let conn = sock::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    match sock::connect(conn.as_raw_fd(), &UnixAddr::new(path)?) {
        Ok(()) => {}
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ECONNREFUSED) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    sock::send(conn.as_raw_fd(), HELLO, MsgFlags::MSG_NOSIGNAL)?;
    let mut buf = vec![0u8; MAX_RECORD];
    let mut sockets = HashMap::new();
    loop {
        let (record, fds) = recv(&conn, &mut buf)?;
        if record.is_empty() {
            return Err(io::Error::other(
                "the running agent closed the handoff connection",
            ));
        }
        let batch: Batch = serde_json::from_slice(&record).map_err(io::Error::other)?;
        if batch.keys.len() != fds.len() {
            return Err(io::Error::other(format!(
                "{} keys came with {} descriptors",
                batch.keys.len(),
                fds.len()
            )));
        }
        for (key, fd) in batch.keys.iter().zip(fds) {
            let key: ListenerKey = key.parse().map_err(io::Error::other)?;
            sockets.insert(key, fd);
        }
        if !batch.more {
            break;
        }
    }
    Ok(Some((Predecessor { conn }, sockets)))
}

fn send(conn: &OwnedFd, batch: &Batch, fds: &[std::os::fd::RawFd]) -> io::Result<()> {
    let body = serde_json::to_vec(batch).map_err(io::Error::other)?;
    let iov = [IoSlice::new(&body)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    sock::sendmsg::<()>(conn.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// One record and the descriptors that came with it (an empty record: the peer closed).
fn recv(conn: &OwnedFd, buf: &mut [u8]) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let (len, fds) = crate::sys::recv_with_fds(conn, buf, BATCH)?;
    Ok((buf[..len].to_vec(), fds))
}

/// The default handoff socket: under the agent's run directory, one per pin directory (two
/// agents of one node never share one).
pub fn default_path(pin_dir: &Path) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "mesh-agent".into());
    PathBuf::from("/var/run/mesh-agent").join(format!("{name}.handoff.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpStream};

    fn bind_loopback() -> io::Result<Socket> {
        let s = Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
        s.listen(16)?;
        Ok(s)
    }

    #[test]
    fn a_successor_gets_the_same_sockets_and_the_predecessor_hears_when() {
        let dir = std::env::temp_dir().join(format!("handoff-test-{}", std::process::id()));
        let path = dir.join("h.sock");
        let old = Listeners::new();
        let first = bind_loopback().unwrap();
        let addr = first.local_addr().unwrap().as_socket().unwrap();
        let key = ListenerKey::tcp(7, addr);
        let held = old.listen(key, || Ok(first)).unwrap();
        // Released sockets are not offered.
        let gone = old
            .listen(
                ListenerKey::tcp(7, SocketAddr::from((Ipv4Addr::LOCALHOST, 1))),
                bind_loopback,
            )
            .unwrap();
        drop(gone);
        assert_eq!(old.offered(), 1);

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let taken = offer(&path, old.clone()).unwrap();
        // A connection made before the takeover waits in the accept queue...
        let early = TcpStream::connect(addr).unwrap();
        let (predecessor, sockets) = take_over(&path).unwrap().expect("an offer");
        assert_eq!(sockets.keys().copied().collect::<Vec<_>>(), vec![key]);
        let new = Listeners::inheriting(sockets);
        let mut bound = false;
        let l = new
            .listen(key, || {
                bound = true;
                bind_loopback()
            })
            .unwrap();
        assert!(l.inherited && !bound);
        // ...and is accepted by the successor, on the same socket.
        let listener = std::net::TcpListener::from(l.socket);
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), early.local_addr().unwrap());
        drop(held);
        predecessor.release().unwrap();
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(5), taken)
                .await
                .expect("handed over in time")
                .unwrap();
            old.handed_over().await;
        });
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn nothing_offered_is_no_predecessor() {
        let path = std::env::temp_dir().join(format!("handoff-none-{}.sock", std::process::id()));
        assert!(take_over(&path).unwrap().is_none());
        // A stale socket file (its agent died) is not a predecessor either.
        let stale = bind_unix(&path).unwrap();
        drop(stale);
        assert!(take_over(&path).unwrap().is_none());
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn keys_round_trip() {
        for s in [
            "1234/127.0.0.1:15001",
            "9/[::1]:15001",
            "5/[::]:15008",
            "5/udp/0.0.0.0:15053",
        ] {
            assert_eq!(s.parse::<ListenerKey>().unwrap().to_string(), s);
        }
        assert!("x/1.2.3.4:5".parse::<ListenerKey>().is_err());
    }
}
