//! The HBONE client: opens (or reuses) a mutual-TLS HTTP/2 connection from the source pod's
//! namespace to the destination's 15008 and sends `CONNECT` for the original destination.
//! Connections are pooled per (source pod address, source identity, destination identity,
//! destination address) with a cap of streams per connection and idle expiry. The source
//! address is part of the key because the destination presents the tunnel's source
//! address to the application and to policy: pods sharing a service account must not
//! share tunnels.

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
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use mesh_common::PROXY_MARK;
use rustls_pki_types::ServerName;

use super::{CONNECTION_WINDOW, HboneError, MAX_FRAME, STREAM_WINDOW, Stream, traceparent};
use crate::{
    identity::{Identity, SecretManager, tls},
    proxy::{PodContext, connect, pod_socket},
};

/// How long a connection with no stream stays pooled.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection pings its peer this often, and is closed when a ping goes unanswered for
/// [`PING_TIMEOUT`] (a peer that vanished without a FIN or RST).
const PING_INTERVAL: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(20);

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
    max_streams: usize,
    certs: Arc<SecretManager>,
}

/// An open tunnel; holds its stream slot in the pooled connection until dropped.
pub struct Tunnel {
    pub stream: Stream,
    _slot: StreamSlot,
}

struct StreamSlot(Arc<Pooled>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().expect("pool lock") = Instant::now();
        }
    }
}

impl Pool {
    pub fn new(certs: Arc<SecretManager>, max_streams: usize) -> Arc<Self> {
        let pool = Arc::new(Pool {
            conns: Mutex::new(HashMap::new()),
            max_streams,
            certs,
        });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_TIMEOUT / 4);
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.expire();
            }
        });
        pool
    }

    /// Drops closed connections and those idle for longer than [`IDLE_TIMEOUT`].
    fn expire(&self) {
        let mut conns = self.conns.lock().expect("pool lock");
        for list in conns.values_mut() {
            list.retain(|c| {
                let idle = c.streams.load(Ordering::Acquire) == 0
                    && c.idle_since.lock().expect("pool lock").elapsed() > IDLE_TIMEOUT;
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

    /// Opens a tunnel from `pod` (identity `src`) through `hbone` (the destination pod's
    /// 15008, expected to present `dst`) to `target`.
    pub async fn tunnel(
        &self,
        pod: &PodContext,
        src: &Identity,
        dst: &Identity,
        hbone: SocketAddr,
        target: SocketAddr,
        client: SocketAddr,
    ) -> Result<Tunnel, HboneError> {
        let key = PoolKey {
            src_ip: client.ip(),
            src: src.clone(),
            dst: dst.clone(),
            addr: hbone,
        };
        let conn = match self.reuse(&key) {
            Some(c) => c,
            None => self.open(pod, key).await?,
        };
        let slot = StreamSlot(conn.clone());
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header("forwarded", format!("for=\"{client}\""))
            .header("traceparent", traceparent())
            .body(())
            .expect("valid CONNECT request");
        let http = |source| HboneError::Http {
            addr: hbone,
            source,
        };
        let mut sender = conn.sender.clone().ready().await.map_err(http)?;
        let (response, send) = sender.send_request(request, false).map_err(http)?;
        let response = response.await.map_err(http)?;
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

    /// A pooled connection with a free stream, its slot already taken.
    fn reuse(&self, key: &PoolKey) -> Option<Arc<Pooled>> {
        let conns = self.conns.lock().expect("pool lock");
        conns.get(key)?.iter().find_map(|c| {
            if c.is_closed() {
                return None;
            }
            let taken = c
                .streams
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.max_streams).then_some(n + 1)
                })
                .is_ok();
            taken.then(|| c.clone())
        })
    }

    async fn open(&self, pod: &PodContext, key: PoolKey) -> Result<Arc<Pooled>, HboneError> {
        let addr = key.addr;
        let socket = pod_socket(pod, addr.ip(), |s| s.set_mark(PROXY_MARK)).map_err(Box::new)?;
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
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| HboneError::Http { addr, source })?;
        let closed = Arc::new(AtomicBool::new(false));
        let ping = connection.ping_pong();
        let ended = closed.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = &mut connection => if let Err(e) = r {
                    tracing::debug!(%addr, error = %e, "HBONE connection ended");
                },
                () = keep_alive(ping) => {
                    tracing::info!(%addr, "HBONE connection closed: peer stopped answering pings");
                }
            }
            ended.store(true, Ordering::Release);
        });
        let pooled = Arc::new(Pooled {
            sender,
            closed,
            streams: Arc::new(AtomicUsize::new(1)),
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

/// Pings every [`PING_INTERVAL`]; returns when a ping goes unanswered (or pings cannot be
/// sent), which ends the connection.
async fn keep_alive(ping: Option<h2::PingPong>) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(PING_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}
