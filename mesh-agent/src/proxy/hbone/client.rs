//! The HBONE client: opens (or reuses) a mutual-TLS HTTP/2 connection from the source pod's
//! namespace to the destination's 15008 and sends `CONNECT` for the original destination.
//! Connections are pooled per (source pod address, source identity, destination identity,
//! destination address) with a cap of streams per connection and idle expiry. The source
//! address is part of the key because the destination presents the tunnel's source
//! address to the application and to policy: pods sharing a service account must not
//! share tunnels. At most one connection per key is being opened at a time: tunnels that
//! need one while it is opened wait for that handshake instead of starting their own (a
//! burst of new connections costs one handshake, and the destination never sees a burst
//! of handshakes from one source). A pooled connection is pinged only while it carries no
//! stream: a connection busy with streams proves itself by its traffic, and a peer too
//! loaded to answer a ping in time must not lose every tunnel it carries.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use rustls_pki_types::ServerName;

use super::{
    CONNECTION_WINDOW, HboneError, MAX_FRAME, STREAM_WINDOW, Stream, batch::Batched, traceparent,
};
use crate::{
    identity::{Identity, SecretManager, tls},
    proxy::{
        PodContext, connect, pod_socket,
        sockets::{PodSockets, Purpose},
    },
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection pings its peer this often, and is closed when a ping goes unanswered for
/// [`PING_TIMEOUT`] (a peer that vanished without a FIN or RST).
const PING_INTERVAL: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Connections a tunnel may see opened for it before it gives up (each one's streams
/// were all taken by others, or it closed at once).
const DIAL_ATTEMPTS: usize = 3;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    /// The source pod's address: the tunnel starts in its namespace, from it.
    src_ip: std::net::IpAddr,
    src: Identity,
    dst: Identity,
    addr: SocketAddr,
}

struct Pooled {
    sender: SendRequest<Bytes>,
    /// Set when the connection ended; it is then never handed out again.
    closed: Arc<AtomicBool>,
    streams: Arc<AtomicUsize>,
    idle_since: Mutex<Instant>,
}

impl Pooled {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Reusable HBONE connections of this agent.
pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<Arc<Pooled>>>>,
    /// The connection being opened for a key, if one is: its outcome, shared by every
    /// tunnel waiting for it.
    dialing: Mutex<HashMap<PoolKey, Dial>>,
    max_streams: usize,
    /// How long a connection with no stream stays pooled.
    idle_timeout: Duration,
    certs: Arc<SecretManager>,
    sockets: Arc<dyn PodSockets>,
}

/// The outcome of opening one connection, awaited by every tunnel that needs it.
type Dial = Shared<BoxFuture<'static, Result<Arc<Pooled>, Arc<HboneError>>>>;

/// What a tunnel asks its peer for.
pub struct Connect {
    /// The peer's HBONE address: the destination pod's 15008, or a waypoint's.
    pub hbone: SocketAddr,
    /// The `CONNECT` authority: where the peer delivers the stream.
    pub target: SocketAddr,
    /// The source the peer presents to the application and to its policy.
    pub client: SocketAddr,
    /// The client's first bytes, when it sent some before the tunnel opened: they go with
    /// the `CONNECT`, in the same write, without waiting for its answer. The peer holds
    /// them in the stream's window and hands them to its application once connected; a
    /// refusal discards them with the stream. Empty for none.
    pub early: Bytes,
}

/// An open tunnel; holds its stream slot in the pooled connection until dropped.
pub struct Tunnel {
    pub stream: Stream,
    _slot: StreamSlot,
}

impl Tunnel {
    /// The tunnel as a byte stream, holding its slot until dropped.
    pub fn into_io(self) -> super::io::TunnelIo<StreamSlot> {
        super::io::TunnelIo::with_guard(self.stream, self._slot)
    }
}

/// A tunnel's place among its connection's streams; freed when dropped.
pub struct StreamSlot(Arc<Pooled>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().expect("pool lock") = Instant::now();
        }
    }
}

impl Pool {
    pub fn new(
        certs: Arc<SecretManager>,
        sockets: Arc<dyn PodSockets>,
        max_streams: usize,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        let pool = Arc::new(Pool {
            conns: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
            max_streams,
            idle_timeout,
            certs,
            sockets,
        });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(idle_timeout / 4);
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.expire();
            }
        });
        pool
    }

    /// Drops closed connections and those idle for longer than the idle timeout.
    fn expire(&self) {
        let mut conns = self.conns.lock().expect("pool lock");
        for list in conns.values_mut() {
            list.retain(|c| {
                let idle = c.streams.load(Ordering::Acquire) == 0
                    && c.idle_since.lock().expect("pool lock").elapsed() > self.idle_timeout;
                !c.is_closed() && !idle
            });
        }
        conns.retain(|_, list| !list.is_empty());
    }

    /// Number of pooled HTTP/2 connections (for `/config_dump` and tests).
    pub fn connections(&self) -> usize {
        self.conns
            .lock()
            .expect("pool lock")
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Opens a tunnel from `pod` (identity `src`) through `connect.hbone` (expected to
    /// present `dst`) to `connect.target`.
    pub async fn tunnel(
        self: &Arc<Self>,
        pod: &Arc<PodContext>,
        src: &Identity,
        dst: &Identity,
        connect: Connect,
    ) -> Result<Tunnel, HboneError> {
        let Connect { hbone, target, .. } = connect;
        let key = PoolKey {
            src_ip: connect.client.ip(),
            src: src.clone(),
            dst: dst.clone(),
            addr: hbone,
        };
        let http = |source| HboneError::Http {
            addr: hbone,
            source,
        };
        // A peer that is draining (a restart hands its listeners over, ADR 014) refuses the
        // streams it did not process: those never reached the application and are opened
        // again, once, on a new connection (with the same early bytes).
        let mut retried = false;
        let (response, send, slot) = loop {
            let conn = self.connection(pod, key.clone()).await?;
            let slot = StreamSlot(conn.clone());
            match open_stream(&conn, &connect).await {
                Ok((response, send)) => break (response, send, slot),
                Err(e) if !retried && unprocessed(&e) => {
                    tracing::debug!(%hbone, error = %e, "HBONE peer going away; opening the stream on a new connection");
                    conn.closed.store(true, Ordering::Release);
                    retried = true;
                }
                Err(e) => return Err(http(e)),
            }
        };
        if response.status() != StatusCode::OK {
            return Err(HboneError::Status {
                addr: hbone,
                target,
                status: response.status(),
            });
        }
        Ok(Tunnel {
            stream: Stream {
                send,
                recv: response.into_body(),
            },
            _slot: slot,
        })
    }

    /// A connection for `key` with a stream slot taken: a pooled one with a free stream,
    /// else the one being opened for the key, else a new one.
    async fn connection(
        self: &Arc<Self>,
        pod: &Arc<PodContext>,
        key: PoolKey,
    ) -> Result<Arc<Pooled>, HboneError> {
        for _ in 0..DIAL_ATTEMPTS {
            if let Some(conn) = self.reuse(&key) {
                return Ok(conn);
            }
            let conn = self.dial(pod, &key).await.map_err(HboneError::Dial)?;
            if self.take_slot(&conn) {
                return Ok(conn);
            }
            // Opened for others too, and they took its streams first (or the peer closed
            // it at once): look again.
        }
        Err(HboneError::Busy { addr: key.addr })
    }

    /// The opening of a connection for `key`: the one in progress, or a new one. It runs
    /// as a task of its own, so it completes (and is pooled) even if every tunnel that
    /// waited for it gave up.
    fn dial(self: &Arc<Self>, pod: &Arc<PodContext>, key: &PoolKey) -> Dial {
        let mut dialing = self.dialing.lock().expect("pool lock");
        if let Some(dial) = dialing.get(key) {
            return dial.clone();
        }
        let (pool, pod, key2) = (self.clone(), pod.clone(), key.clone());
        let task = tokio::spawn(async move {
            let opened = pool.open(&pod, key2.clone()).await;
            pool.dialing.lock().expect("pool lock").remove(&key2);
            opened.map_err(Arc::new)
        });
        let dial = async move {
            task.await
                .unwrap_or_else(|e| Err(Arc::new(HboneError::Task(e.to_string()))))
        }
        .boxed()
        .shared();
        dialing.insert(key.clone(), dial.clone());
        dial
    }

    /// A pooled connection with a free stream, its slot already taken.
    fn reuse(&self, key: &PoolKey) -> Option<Arc<Pooled>> {
        let conns = self.conns.lock().expect("pool lock");
        conns.get(key)?.iter().find(|c| self.take_slot(c)).cloned()
    }

    /// Takes a stream slot of `conn` if it is open and has one free.
    fn take_slot(&self, conn: &Pooled) -> bool {
        !conn.is_closed()
            && conn
                .streams
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.max_streams).then_some(n + 1)
                })
                .is_ok()
    }

    /// Opens a connection and pools it, with no stream slot taken.
    async fn open(&self, pod: &PodContext, key: PoolKey) -> Result<Arc<Pooled>, HboneError> {
        let addr = key.addr;
        let socket =
            pod_socket(&*self.sockets, pod, addr.ip(), Purpose::Hbone).map_err(Box::new)?;
        let tcp = connect(socket, addr).await.map_err(|e| match e {
            crate::proxy::ProxyError::Connect { source, .. } => {
                HboneError::Connect { addr, source }
            }
            _ => HboneError::Timeout { addr },
        })?;
        let config = tls::client_config(&self.certs, &key.src, &key.dst);
        let server_name = ServerName::IpAddress(addr.ip().into());
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(config).connect(server_name, tcp),
        )
        .await
        .map_err(|_| HboneError::Timeout { addr })?
        .map_err(|source| HboneError::Tls { addr, source })?;
        let (io, turns) = Batched::new(tls);
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|source| HboneError::Http { addr, source })?;
        let closed = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(AtomicUsize::new(0));
        let ping = connection.ping_pong();
        let (ended, busy) = (closed.clone(), streams.clone());
        tokio::spawn(turns.count(async move {
            tokio::select! {
                r = &mut connection => if let Err(e) = r {
                    tracing::debug!(%addr, error = %e, "HBONE connection ended");
                },
                () = keep_alive(ping, busy) => {
                    tracing::info!(%addr, "HBONE connection closed: peer stopped answering pings");
                }
            }
            ended.store(true, Ordering::Release);
        }));
        let pooled = Arc::new(Pooled {
            sender,
            closed,
            streams,
            idle_since: Mutex::new(Instant::now()),
        });
        self.conns
            .lock()
            .expect("pool lock")
            .entry(key)
            .or_default()
            .push(pooled.clone());
        Ok(pooled)
    }
}

/// Opens `connect`'s stream on `conn`: the response and the request's body.
async fn open_stream(
    conn: &Pooled,
    connect: &Connect,
) -> Result<(http::Response<h2::RecvStream>, h2::SendStream<Bytes>), h2::Error> {
    let Connect {
        target,
        client,
        early,
        ..
    } = connect;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .header("forwarded", format!("for=\"{client}\""))
        .header("traceparent", traceparent())
        .body(())
        .expect("valid CONNECT request");
    let mut sender = conn.sender.clone().ready().await?;
    let (response, mut send) = sender.send_request(request, false)?;
    if !early.is_empty() {
        // Queued behind the HEADERS frame in this same poll, so both go out in one write.
        // At most one read's worth: within any stream window the peer starts with.
        send.send_data(early.clone(), false)?;
    }
    Ok((response.await?, send))
}

/// Whether the peer refused a stream without processing it: it is going away (GOAWAY, the
/// stream above its last processed one, or the connection no longer takes streams), or it
/// refused the stream outright (`REFUSED_STREAM`). Safe to open again elsewhere.
fn unprocessed(e: &h2::Error) -> bool {
    (e.is_go_away() && e.is_remote()) || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// Pings every [`PING_INTERVAL`] while the connection carries no stream; returns when a
/// ping goes unanswered (or pings cannot be sent), which ends the connection. A connection
/// with streams is left to them: their own traffic, and TCP's retransmission timeout,
/// tell a dead peer from a busy one.
async fn keep_alive(ping: Option<h2::PingPong>, streams: Arc<AtomicUsize>) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        if streams.load(Ordering::Acquire) > 0 {
            continue;
        }
        match tokio::time::timeout(PING_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A pooled connection over memory to an HTTP/2 server that answers its first
    /// `CONNECT` only once `wanted` bytes arrived on the stream (and were those).
    async fn waiting_server(wanted: Bytes) -> Pooled {
        let (a, b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(b).await.unwrap();
            let (request, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut body = request.into_body();
            let mut got = Vec::new();
            while got.len() < wanted.len() {
                let data = body.data().await.unwrap().unwrap();
                let _ = body.flow_control().release_capacity(data.len());
                got.extend_from_slice(&data);
            }
            assert_eq!(got, wanted);
            respond
                .send_response(http::Response::new(()), true)
                .unwrap();
        });
        let (sender, conn) = h2::client::handshake(a).await.unwrap();
        tokio::spawn(conn);
        Pooled {
            sender,
            closed: Arc::default(),
            streams: Arc::default(),
            idle_since: Mutex::new(Instant::now()),
        }
    }

    #[tokio::test]
    async fn early_bytes_go_before_the_answer_to_the_connect() {
        let early = Bytes::from_static(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n");
        let conn = waiting_server(early.clone()).await;
        let connect = Connect {
            hbone: "10.0.0.2:15008".parse().unwrap(),
            target: "10.0.0.2:80".parse().unwrap(),
            client: "10.0.0.1:1".parse().unwrap(),
            early,
        };
        let opened = tokio::time::timeout(Duration::from_secs(10), open_stream(&conn, &connect))
            .await
            .expect("the CONNECT was answered only after its early bytes: they were not sent");
        let (response, _send) = opened.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
}
