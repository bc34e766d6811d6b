//! The waypoint's side towards the endpoints: which endpoint takes a request (the
//! DestinationRule's load balancer, least-request by default as in Istio's waypoints), and
//! the HTTP connections to it, each carried by an HBONE tunnel to the endpoint pod's 15008
//! with the waypoint's identity. HTTP/1.1 connections are pooled per endpoint and reused
//! once their response has ended; an HTTP/2 connection per endpoint is shared by all its
//! requests. The destination's DestinationRule says how connections are made and kept
//! ([`Connection`]): `tcp.connectTimeout` bounds opening one (tunnel and HTTP handshake),
//! `http.maxRequestsPerConnection` retires a connection after that many requests, and
//! `http.idleTimeout` closes one unused for that long.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_common::HBONE_PORT;
use tokio::time::Instant;

use crate::{
    identity::Identity,
    l7::{
        resilience::PoolLimits,
        routes::{HashOn, LoadBalancer},
    },
    proxy::{
        PodContext,
        hbone::client::{Connect, Pool},
    },
};

/// A tunnel to an endpoint, as a byte stream.
pub type Tunnel = crate::proxy::hbone::io::TunnelIo<crate::proxy::hbone::client::StreamSlot>;

/// The request body type sent upstream.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// How often idle connections past their idle timeout are looked for.
const IDLE_SWEEP: Duration = Duration::from_secs(1);

/// How the connections of one request's destination are made and kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Connection {
    /// HTTP/2 (the client spoke HTTP/2), else HTTP/1.1.
    pub h2: bool,
    /// `tcp.connectTimeout`: opening the tunnel and the HTTP handshake.
    pub connect_timeout: Duration,
    /// `http.idleTimeout`: a connection without requests for this long is closed.
    pub idle_timeout: Duration,
    /// `http.maxRequestsPerConnection`: requests a connection carries (0: no limit).
    pub max_requests: u32,
}

impl Connection {
    /// The settings of `limits` (a DestinationRule's `connectionPool`), or Istio's defaults.
    pub fn new(h2: bool, limits: Option<&PoolLimits>) -> Self {
        let defaults;
        let limits = match limits {
            Some(l) => l,
            None => {
                defaults = PoolLimits::default();
                &defaults
            }
        };
        Self {
            h2,
            connect_timeout: limits.connect_timeout,
            idle_timeout: limits.idle_timeout,
            max_requests: limits.max_requests_per_connection,
        }
    }

    /// Whether a connection that has carried `used` requests takes no more.
    fn spent(&self, used: u32) -> bool {
        self.max_requests != 0 && used >= self.max_requests
    }
}

/// A pooled connection.
struct Pooled<S> {
    sender: S,
    /// Requests it has carried.
    used: u32,
    /// When it last started or finished one.
    since: Instant,
    idle_timeout: Duration,
}

impl<S> Pooled<S> {
    fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.since) >= self.idle_timeout
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {endpoint}: {source}")]
    Connect {
        endpoint: SocketAddr,
        source: crate::proxy::hbone::HboneError,
    },
    #[error("connecting to {endpoint}: no connection within {timeout:?}")]
    ConnectTimeout {
        endpoint: SocketAddr,
        timeout: Duration,
    },
    #[error("{endpoint} is not a workload of the mesh")]
    NoWorkload { endpoint: SocketAddr },
    #[error("HTTP to {endpoint}: {source}")]
    Http {
        endpoint: SocketAddr,
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// Whether the request never reached the endpoint (Envoy's `UF`, connect failure).
    pub fn is_connect(&self) -> bool {
        !matches!(self, Self::Http { .. })
    }

    /// Whether the endpoint refused the HTTP/2 stream (`REFUSED_STREAM`: never processed).
    pub fn is_refused_stream(&self) -> bool {
        let Self::Http { source, .. } = self else {
            return false;
        };
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source);
        while let Some(e) = cause {
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            cause = e.source();
        }
        false
    }
}

pub struct Upstreams {
    pool: Arc<Pool>,
    me: Arc<PodContext>,
    identity: Identity,
    local: IpAddr,
    http1: Arc<Mutex<Http1Pool>>,
    http2: Arc<Mutex<Http2Pool>>,
    /// Requests in flight per endpoint (least-request balancing).
    active: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
    round_robin: AtomicUsize,
}

type Http1Pool = HashMap<SocketAddr, Vec<Pooled<http1::SendRequest<Body>>>>;
type Http2Pool = HashMap<SocketAddr, Pooled<http2::SendRequest<Body>>>;

/// Where an HBONE tunnel goes: the pod whose 15008 it reaches and the identity that pod
/// proves. Usually the endpoint's own pod; for an ingress gateway sending a service's
/// traffic through its waypoint, a waypoint pod (the tunnel then asks for the service
/// address).
#[derive(Debug, Clone)]
pub struct Peer {
    pub hop: IpAddr,
    pub identity: Identity,
}

impl Peer {
    /// The pod at `endpoint` itself, proving `identity`.
    pub fn direct(endpoint: SocketAddr, identity: Identity) -> Self {
        Self {
            hop: endpoint.ip(),
            identity,
        }
    }
}

/// A request in flight to an endpoint; counted until dropped.
pub struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a consistent hash is computed from, per request.
pub struct HashInputs<'a> {
    pub headers: &'a http::HeaderMap,
    pub query: Option<&'a str>,
    pub source: IpAddr,
}

impl Upstreams {
    /// Starts, on the current runtime, the task that closes idle connections.
    pub fn new(pool: Arc<Pool>, me: Arc<PodContext>, identity: Identity, local: IpAddr) -> Self {
        let http1 = Arc::new(Mutex::new(HashMap::new()));
        let http2 = Arc::new(Mutex::new(HashMap::new()));
        tokio::spawn(sweep_idle(Arc::downgrade(&http1), Arc::downgrade(&http2)));
        Self {
            pool,
            me,
            identity,
            local,
            http1,
            http2,
            active: Mutex::new(HashMap::new()),
            round_robin: AtomicUsize::new(0),
        }
    }

    /// The waypoint's own pod, as the tunnels it opens present it.
    pub fn me(&self) -> &PodContext {
        &self.me
    }

    /// HBONE connections open to endpoints.
    pub fn connections(&self) -> usize {
        self.pool.connections()
    }

    /// The endpoint for one request among `candidates` (non-empty), by `lb`.
    pub fn choose(
        &self,
        candidates: &[SocketAddr],
        lb: &LoadBalancer,
        inputs: &HashInputs<'_>,
    ) -> SocketAddr {
        let n = candidates.len();
        if n == 1 {
            return candidates[0];
        }
        match lb {
            LoadBalancer::RoundRobin => {
                candidates[self.round_robin.fetch_add(1, Ordering::Relaxed) % n]
            }
            LoadBalancer::Random => candidates[fastrand::usize(..n)],
            LoadBalancer::LeastRequest => {
                // Power of two choices: two distinct random endpoints, the less busy wins.
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                let active = self.active.lock().expect("upstream lock");
                let load = |i: usize| {
                    active
                        .get(&candidates[i])
                        .map_or(0, |c| c.load(Ordering::Acquire))
                };
                if load(b) < load(a) {
                    candidates[b]
                } else {
                    candidates[a]
                }
            }
            LoadBalancer::Hash(on) => match hash_key(on, inputs) {
                Some(key) => candidates[jump_hash(key, n)],
                None => candidates[fastrand::usize(..n)],
            },
        }
    }

    /// Counts a request in flight to `endpoint` until the guard is dropped.
    pub fn start(&self, endpoint: SocketAddr) -> Active {
        let counter = self
            .active
            .lock()
            .expect("upstream lock")
            .entry(endpoint)
            .or_default()
            .clone();
        counter.fetch_add(1, Ordering::AcqRel);
        Active(counter)
    }

    /// Sends `req` to `endpoint` (reached through `peer`) on a connection made and kept
    /// as `connection` says.
    pub async fn send(
        &self,
        endpoint: SocketAddr,
        peer: &Peer,
        connection: &Connection,
        mut req: http::Request<Body>,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        let http = |source| UpstreamError::Http { endpoint, source };
        if connection.h2 {
            let existing = {
                let mut pool = self.http2.lock().expect("upstream lock");
                match pool.get_mut(&endpoint) {
                    Some(c) if !c.sender.is_closed() && !c.expired(Instant::now()) => {
                        c.used += 1;
                        c.since = Instant::now();
                        let sender = c.sender.clone();
                        // Its last request: later ones open a new connection.
                        if connection.spent(c.used) {
                            pool.remove(&endpoint);
                        }
                        Some(sender)
                    }
                    _ => None,
                }
            };
            let mut sender = match existing {
                Some(s) => s,
                None => {
                    let sender = self
                        .open(endpoint, peer, connection, |io| async move {
                            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                                .initial_stream_window_size(crate::proxy::hbone::STREAM_WINDOW)
                                .initial_connection_window_size(
                                    crate::proxy::hbone::CONNECTION_WINDOW,
                                )
                                .handshake(io)
                                .await
                                .map_err(http)?;
                            tokio::spawn(async move {
                                if let Err(e) = conn.await {
                                    tracing::debug!(%endpoint, error = %e, "upstream HTTP/2 connection ended");
                                }
                            });
                            Ok(sender)
                        })
                        .await?;
                    if !connection.spent(1) {
                        self.http2.lock().expect("upstream lock").insert(
                            endpoint,
                            Pooled {
                                sender: sender.clone(),
                                used: 1,
                                since: Instant::now(),
                                idle_timeout: connection.idle_timeout,
                            },
                        );
                    }
                    sender
                }
            };
            sender.ready().await.map_err(http)?;
            return sender.send_request(req).await.map_err(http);
        }
        let idle = {
            let mut pools = self.http1.lock().expect("upstream lock");
            let list = pools.entry(endpoint).or_default();
            let now = Instant::now();
            let mut found = None;
            while let Some(c) = list.pop() {
                if c.sender.is_ready() && !c.expired(now) {
                    found = Some(c);
                    break;
                }
            }
            found
        };
        let (mut sender, used) = match idle {
            Some(c) => (c.sender, c.used + 1),
            None => {
                let sender = self
                    .open(endpoint, peer, connection, |io| async move {
                        let (sender, conn) =
                            http1::Builder::new().handshake(io).await.map_err(http)?;
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!(%endpoint, error = %e, "upstream HTTP/1.1 connection ended");
                            }
                        });
                        Ok(sender)
                    })
                    .await?;
                (sender, 1)
            }
        };
        let last = connection.spent(used);
        if last {
            // The endpoint closes it after this response, as Envoy asks.
            req.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        let response = sender.send_request(req).await.map_err(http)?;
        if last {
            return Ok(response);
        }
        // Back to the pool once this response has been read to its end.
        let shared = self.http1.clone();
        let idle_timeout = connection.idle_timeout;
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut pools = shared.lock().expect("upstream lock");
                let list = pools.entry(endpoint).or_default();
                if list.len() < MAX_IDLE_PER_ENDPOINT {
                    list.push(Pooled {
                        sender,
                        used,
                        since: Instant::now(),
                        idle_timeout,
                    });
                }
            }
        });
        Ok(response)
    }

    /// A new HTTP connection to `endpoint`: a tunnel, then `handshake` on it, within the
    /// connect timeout.
    async fn open<S, F>(
        &self,
        endpoint: SocketAddr,
        peer: &Peer,
        connection: &Connection,
        handshake: impl FnOnce(TokioIo<Tunnel>) -> F,
    ) -> Result<S, UpstreamError>
    where
        F: Future<Output = Result<S, UpstreamError>>,
    {
        let timeout = connection.connect_timeout;
        let open = async {
            let io = self.tunnel(endpoint, peer).await?;
            handshake(io).await
        };
        tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout { endpoint, timeout })?
    }

    async fn tunnel(
        &self,
        endpoint: SocketAddr,
        peer: &Peer,
    ) -> Result<TokioIo<Tunnel>, UpstreamError> {
        Ok(TokioIo::new(self.open_tunnel(endpoint, peer).await?))
    }

    /// An HBONE tunnel asking `peer` for `endpoint`, as a byte stream.
    pub async fn open_tunnel(
        &self,
        endpoint: SocketAddr,
        peer: &Peer,
    ) -> Result<Tunnel, UpstreamError> {
        let hop = SocketAddr::new(peer.hop, HBONE_PORT);
        let tunnel = self
            .pool
            .tunnel(
                &self.me,
                &self.identity,
                &peer.identity,
                Connect {
                    hbone: hop,
                    target: endpoint,
                    client: SocketAddr::new(self.local, 0),
                    early: Bytes::new(),
                },
            )
            .await
            .map_err(|source| UpstreamError::Connect { endpoint, source })?;
        Ok(tunnel.into_io())
    }
}

/// Drops, every [`IDLE_SWEEP`], the pooled connections idle past their timeout (which
/// closes them), until the pools are gone.
async fn sweep_idle(http1: Weak<Mutex<Http1Pool>>, http2: Weak<Mutex<Http2Pool>>) {
    let mut tick = tokio::time::interval(IDLE_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (Some(http1), Some(http2)) = (http1.upgrade(), http2.upgrade()) else {
            return;
        };
        let now = Instant::now();
        let mut pools = http1.lock().expect("upstream lock");
        pools.retain(|_, list| {
            list.retain(|c| !c.expired(now));
            !list.is_empty()
        });
        drop(pools);
        http2
            .lock()
            .expect("upstream lock")
            .retain(|_, c| !c.expired(now) && !c.sender.is_closed());
    }
}

/// The value a consistent hash is computed from, if the request has it.
fn hash_key(on: &HashOn, inputs: &HashInputs<'_>) -> Option<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match on {
        HashOn::Header(name) => inputs.headers.get(name)?.as_bytes().hash(&mut h),
        HashOn::SourceIp => inputs.source.hash(&mut h),
        HashOn::Cookie(name) => {
            let cookies = inputs.headers.get_all(http::header::COOKIE);
            let value = cookies
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(|line| {
                    line.split(';').find_map(|kv| {
                        let (k, v) = kv.trim().split_once('=')?;
                        (k == name).then_some(v)
                    })
                })?;
            value.hash(&mut h);
        }
        HashOn::Query(name) => {
            let value = inputs.query?.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == name).then_some(v)
            })?;
            value.hash(&mut h);
        }
    }
    Some(h.finish())
}

/// Jump consistent hash (Lamping and Veach): a bucket in `0..n` that moves for only 1/n of
/// the keys when `n` grows by one.
fn jump_hash(mut key: u64, n: usize) -> usize {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < n as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_take_the_destinations_settings() {
        let default = Connection::new(false, None);
        assert_eq!(default.connect_timeout, Duration::from_secs(10));
        assert!(!default.spent(1_000_000), "no request limit by default");
        let limits = PoolLimits {
            max_requests_per_connection: 2,
            idle_timeout: Duration::from_secs(5),
            ..PoolLimits::default()
        };
        let c = Connection::new(true, Some(&limits));
        assert!(c.h2 && !c.spent(1) && c.spent(2));
        let pooled = Pooled {
            sender: (),
            used: 1,
            since: Instant::now(),
            idle_timeout: c.idle_timeout,
        };
        assert!(!pooled.expired(pooled.since + Duration::from_millis(4_999)));
        assert!(pooled.expired(pooled.since + Duration::from_secs(5)));
    }

    #[test]
    fn jump_hash_is_stable_and_spreads() {
        let mut counts = [0usize; 4];
        for key in 0..4000u64 {
            let b = jump_hash(key.wrapping_mul(0x9E37_79B9_7F4A_7C15), 4);
            assert_eq!(b, jump_hash(key.wrapping_mul(0x9E37_79B9_7F4A_7C15), 4));
            counts[b] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
        // Growing from 4 to 5 buckets moves only the keys that go to the new one.
        for key in 0..1000u64 {
            let k = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let (a, b) = (jump_hash(k, 4), jump_hash(k, 5));
            assert!(a == b || b == 4);
        }
    }
}
