//! The waypoint's side towards the endpoints: which endpoint takes a request (the
//! DestinationRule's load balancer, least-request by default as in Istio's waypoints), and
//! the HTTP connections to it, each carried by an HBONE tunnel to the endpoint pod's 15008
//! with the waypoint's identity. HTTP/1.1 connections are pooled per endpoint and reused
//! once their response has ended; an HTTP/2 connection per endpoint is shared by all its
//! requests.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_common::HBONE_PORT;

use crate::{
    identity::Identity,
    l7::routes::{HashOn, LoadBalancer},
    proxy::{PodContext, hbone::client::Pool},
};

/// A tunnel to an endpoint, as a byte stream.
pub type Tunnel = crate::proxy::hbone::io::TunnelIo<crate::proxy::hbone::client::StreamSlot>;

/// The request body type sent upstream.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {endpoint}: {source}")]
    Connect {
        endpoint: SocketAddr,
        source: crate::proxy::hbone::HboneError,
    },
    #[error("HTTP to {endpoint}: {source}")]
    Http {
        endpoint: SocketAddr,
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// Whether the request never reached the endpoint (Envoy's `UF`, connect failure).
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect { .. })
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
    http2: Mutex<HashMap<SocketAddr, http2::SendRequest<Body>>>,
    /// Requests in flight per endpoint (least-request balancing).
    active: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
    round_robin: AtomicUsize,
}

type Http1Pool = HashMap<SocketAddr, Vec<http1::SendRequest<Body>>>;

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
    pub fn new(pool: Arc<Pool>, me: Arc<PodContext>, identity: Identity, local: IpAddr) -> Self {
        Self {
            pool,
            me,
            identity,
            local,
            http1: Arc::new(Mutex::new(HashMap::new())),
            http2: Mutex::new(HashMap::new()),
            active: Mutex::new(HashMap::new()),
            round_robin: AtomicUsize::new(0),
        }
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

    /// Sends `req` to `endpoint` (whose pods prove `peer`), over HTTP/2 when `h2`.
    pub async fn send(
        &self,
        endpoint: SocketAddr,
        peer: &Identity,
        h2: bool,
        req: http::Request<Body>,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        let http = |source| UpstreamError::Http { endpoint, source };
        if h2 {
            let existing = self
                .http2
                .lock()
                .expect("upstream lock")
                .get(&endpoint)
                .cloned();
            let mut sender = match existing {
                Some(s) if !s.is_closed() => s,
                _ => {
                    let io = self.tunnel(endpoint, peer).await?;
                    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                        .initial_stream_window_size(crate::proxy::hbone::STREAM_WINDOW)
                        .initial_connection_window_size(crate::proxy::hbone::CONNECTION_WINDOW)
                        .handshake(io)
                        .await
                        .map_err(http)?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(%endpoint, error = %e, "upstream HTTP/2 connection ended");
                        }
                    });
                    self.http2
                        .lock()
                        .expect("upstream lock")
                        .insert(endpoint, sender.clone());
                    sender
                }
            };
            sender.ready().await.map_err(http)?;
            return sender.send_request(req).await.map_err(http);
        }
        let idle = {
            let mut pools = self.http1.lock().expect("upstream lock");
            let list = pools.entry(endpoint).or_default();
            let mut found = None;
            while let Some(s) = list.pop() {
                if s.is_ready() {
                    found = Some(s);
                    break;
                }
            }
            found
        };
        let mut sender = match idle {
            Some(s) => s,
            None => {
                let io = self.tunnel(endpoint, peer).await?;
                let (sender, conn) = http1::Builder::new().handshake(io).await.map_err(http)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%endpoint, error = %e, "upstream HTTP/1.1 connection ended");
                    }
                });
                sender
            }
        };
        let response = sender.send_request(req).await.map_err(http)?;
        // Back to the pool once this response has been read to its end.
        let shared = self.http1.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut pools = shared.lock().expect("upstream lock");
                let list = pools.entry(endpoint).or_default();
                if list.len() < MAX_IDLE_PER_ENDPOINT {
                    list.push(sender);
                }
            }
        });
        Ok(response)
    }

    async fn tunnel(
        &self,
        endpoint: SocketAddr,
        peer: &Identity,
    ) -> Result<TokioIo<Tunnel>, UpstreamError> {
        Ok(TokioIo::new(self.open_tunnel(endpoint, peer).await?))
    }

    /// An HBONE tunnel to `endpoint` (whose pod proves `peer`), as a byte stream.
    pub async fn open_tunnel(
        &self,
        endpoint: SocketAddr,
        peer: &Identity,
    ) -> Result<Tunnel, UpstreamError> {
        let hop = SocketAddr::new(endpoint.ip(), HBONE_PORT);
        let tunnel = self
            .pool
            .tunnel(
                &self.me,
                &self.identity,
                peer,
                hop,
                endpoint,
                SocketAddr::new(self.local, 0),
            )
            .await
            .map_err(|source| UpstreamError::Connect { endpoint, source })?;
        Ok(tunnel.into_io())
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
