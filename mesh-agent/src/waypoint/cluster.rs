//! A destination's shared state at this waypoint (Envoy's "cluster": a service port, or one
//! subset of it): the circuit breaker's counters (DestinationRule `connectionPool`) and each
//! endpoint's health for outlier detection (`outlierDetection`). Limits are per waypoint
//! instance and summed over every client, as in ambient.
//!
//! - **Circuit breaking.** A request is admitted while fewer than `http2MaxRequests` are in
//!   flight; an HTTP/1.1 request then needs a connection slot (`tcp.maxConnections`, one per
//!   request in flight) and waits for one while fewer than `http1MaxPendingRequests` wait.
//!   Anything else overflows at once: 503 with flag `UO`. Retries in flight are bounded by
//!   `http.maxRetries`; past it a request is not retried.
//! - **Outlier detection.** Consecutive 5xx answers (connection failures and resets count as
//!   5xx, and as gateway errors) past `consecutive5xxErrors` or `consecutiveGatewayErrors`
//!   eject an endpoint for `baseEjectionTime` × the times it was ejected, as long as no more
//!   than `maxEjectionPercent` of the endpoints are out (at least one may always be); it
//!   returns by itself, and its multiplier decreases by one per `interval` it stays healthy.
//!   Below `minHealthPercent` healthy endpoints, ejections are ignored.

use std::{
    borrow::Cow,
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use crate::l7::resilience::{Outcome, OutlierPolicy, PoolLimits};

/// Ejections never last longer than this (Envoy's `max_ejection_time` default).
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// A destination: service namespace and name, port, subset.
pub type ClusterKey = (String, String, u16, Option<String>);

/// Every destination's state at this waypoint.
#[derive(Default)]
pub struct Clusters {
    map: Mutex<HashMap<ClusterKey, Arc<Cluster>>>,
}

impl Clusters {
    /// The state of `key`, made anew when its limits changed.
    pub fn get(&self, key: ClusterKey, limits: &PoolLimits) -> Arc<Cluster> {
        let mut map = self.map.lock().expect("clusters lock");
        match map.get(&key) {
            Some(c) if c.limits == *limits => c.clone(),
            _ => {
                let c = Arc::new(Cluster::new(limits.clone()));
                map.insert(key, c.clone());
                c
            }
        }
    }
}

pub struct Cluster {
    limits: PoolLimits,
    /// HTTP/1.1 connection slots.
    connections: Arc<Semaphore>,
    pending: Arc<AtomicU32>,
    requests: Arc<AtomicU32>,
    retries: Arc<AtomicU32>,
    health: Mutex<HashMap<SocketAddr, Health>>,
}

#[derive(Default)]
struct Health {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
    /// When the multiplier last changed.
    since: Option<Instant>,
}

/// A request admitted by the circuit breaker; releases its place when dropped.
pub struct Admission {
    _connection: Option<OwnedSemaphorePermit>,
    _request: Counted,
}

/// One unit of a counter, given back when dropped.
pub struct Counted(Arc<AtomicU32>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes one unit of `counter` if it stays within `limit`.
fn take(counter: &Arc<AtomicU32>, limit: u32) -> Option<Counted> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < limit).then_some(n + 1)
        })
        .ok()
        .map(|_| Counted(counter.clone()))
}

impl Cluster {
    fn new(limits: PoolLimits) -> Self {
        let slots = (limits.max_connections as usize).min(Semaphore::MAX_PERMITS);
        Self {
            connections: Arc::new(Semaphore::new(slots)),
            limits,
            pending: Arc::default(),
            requests: Arc::default(),
            retries: Arc::default(),
            health: Mutex::default(),
        }
    }

    pub fn limits(&self) -> &PoolLimits {
        &self.limits
    }

    /// Admits a request (waiting for an HTTP/1.1 connection slot if it may), or `None`:
    /// overflow.
    pub async fn admit(&self, h2: bool) -> Option<Admission> {
        let request = take(&self.requests, self.limits.max_requests)?;
        if h2 {
            return Some(Admission {
                _connection: None,
                _request: request,
            });
        }
        let connection = match self.connections.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let _waiting = take(&self.pending, self.limits.max_pending)?;
                self.connections.clone().acquire_owned().await.ok()?
            }
        };
        Some(Admission {
            _connection: Some(connection),
            _request: request,
        })
    }

    /// Room for one more retry in flight, or `None`: within `maxRetries` and the retry
    /// budget (a share of the requests in flight, never below its minimum).
    pub fn retry(&self) -> Option<Counted> {
        let mut limit = self.limits.max_retries;
        if let Some((share, minimum)) = self.limits.budget {
            let requests = f64::from(self.requests.load(Ordering::Acquire));
            let budget = (requests * share.0 / 100.0) as u32;
            limit = limit.min(budget.max(minimum));
        }
        take(&self.retries, limit)
    }

    /// The endpoints outlier detection lets through (all of them below `minHealthPercent`).
    pub fn healthy<'a>(
        &self,
        candidates: &'a [SocketAddr],
        policy: &OutlierPolicy,
        now: Instant,
    ) -> Cow<'a, [SocketAddr]> {
        let health = self.health.lock().expect("health lock");
        let out = |e: &SocketAddr| {
            health
                .get(e)
                .and_then(|h| h.ejected_until)
                .is_some_and(|until| now < until)
        };
        if !candidates.iter().any(out) {
            return Cow::Borrowed(candidates);
        }
        let healthy: Vec<SocketAddr> = candidates.iter().copied().filter(|e| !out(e)).collect();
        if (healthy.len() * 100) < (policy.min_health_percent as usize * candidates.len()) {
            return Cow::Borrowed(candidates);
        }
        Cow::Owned(healthy)
    }

    /// Records how an attempt to `endpoint` ended; `endpoints` is how many the destination
    /// has. Returns whether the endpoint was ejected now.
    pub fn observe(
        &self,
        endpoint: SocketAddr,
        outcome: Outcome,
        policy: &OutlierPolicy,
        endpoints: usize,
        now: Instant,
    ) -> bool {
        let (error, gateway) = match outcome {
            Outcome::Response { status, .. } => (status >= 500, matches!(status, 502..=504)),
            Outcome::ConnectFailure
            | Outcome::RefusedStream
            | Outcome::Reset
            | Outcome::PerTryTimeout => (true, true),
        };
        let mut health = self.health.lock().expect("health lock");
        let ejected_now = health
            .values()
            .filter(|h| h.ejected_until.is_some_and(|u| now < u))
            .count();
        let h = health.entry(endpoint).or_default();
        if !error {
            h.consecutive_5xx = 0;
            h.consecutive_gateway = 0;
            // Healthy for an interval since the last change: the multiplier goes down.
            if h.times_ejected > 0
                && h.ejected_until.is_none_or(|u| now >= u)
                && h.since.is_none_or(|s| now >= s + policy.interval)
            {
                h.times_ejected -= 1;
                h.since = Some(now);
            }
            return false;
        }
        h.consecutive_5xx += 1;
        h.consecutive_gateway = if gateway {
            h.consecutive_gateway + 1
        } else {
            0
        };
        let tripped = (policy.consecutive_5xx > 0 && h.consecutive_5xx >= policy.consecutive_5xx)
            || (policy.consecutive_gateway > 0
                && h.consecutive_gateway >= policy.consecutive_gateway);
        let already = h.ejected_until.is_some_and(|u| now < u);
        // At least one endpoint may always be ejected (Envoy's rule).
        let room = ejected_now == 0
            || (ejected_now + 1) * 100 <= policy.max_ejection_percent as usize * endpoints;
        if !tripped || already || !room {
            return false;
        }
        h.times_ejected += 1;
        h.since = Some(now);
        h.consecutive_5xx = 0;
        h.consecutive_gateway = 0;
        let time = policy
            .base_ejection
            .saturating_mul(h.times_ejected)
            .min(MAX_EJECTION.max(policy.base_ejection));
        h.ejected_until = Some(now + time);
        true
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Istio's outlier task: ejected at the first 5xx for 3 s, reviewed every second.
    pub(in crate::waypoint) fn policy() -> OutlierPolicy {
        OutlierPolicy {
            consecutive_5xx: 1,
            consecutive_gateway: 0,
            interval: Duration::from_secs(1),
            base_ejection: Duration::from_secs(3),
            max_ejection_percent: 100,
            min_health_percent: 0,
        }
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 80))
    }

    const FAIL: Outcome = Outcome::Response {
        status: 500,
        grpc: None,
    };
    const OK: Outcome = Outcome::Response {
        status: 200,
        grpc: None,
    };

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_failing_is_ejected_and_returns_after_the_ejection_time() {
        let c = Cluster::new(PoolLimits::default());
        let all = [addr(1), addr(2), addr(3)];
        let p = policy();
        let t0 = Instant::now();
        assert!(c.observe(addr(1), FAIL, &p, 3, t0));
        assert_eq!(&*c.healthy(&all, &p, t0), &[addr(2), addr(3)]);
        tokio::time::advance(Duration::from_millis(2_900)).await;
        assert_eq!(c.healthy(&all, &p, Instant::now()).len(), 2);
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(c.healthy(&all, &p, Instant::now()).len(), 3);
        // Ejected again at once: twice as long.
        let t1 = Instant::now();
        assert!(c.observe(addr(1), FAIL, &p, 3, t1));
        assert_eq!(
            c.healthy(&all, &p, t1 + Duration::from_millis(5_900)).len(),
            2
        );
        assert_eq!(c.healthy(&all, &p, t1 + Duration::from_secs(6)).len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn ejections_respect_the_thresholds_and_percentages() {
        let c = Cluster::new(PoolLimits::default());
        let now = Instant::now();
        let p = OutlierPolicy {
            consecutive_5xx: 3,
            max_ejection_percent: 34,
            ..policy()
        };
        // Two failures, a success, two failures: never three in a row.
        for outcome in [FAIL, FAIL, OK, FAIL, FAIL] {
            assert!(!c.observe(addr(1), outcome, &p, 3, now));
        }
        assert!(c.observe(addr(1), FAIL, &p, 3, now));
        // A second endpoint would be 2 of 3 ejected, over 34 %.
        for _ in 0..3 {
            assert!(!c.observe(addr(2), FAIL, &p, 3, now));
        }
        // A connection failure is a gateway error.
        let gw = OutlierPolicy {
            consecutive_5xx: 0,
            consecutive_gateway: 2,
            ..policy()
        };
        let c = Cluster::new(PoolLimits::default());
        assert!(!c.observe(addr(1), Outcome::ConnectFailure, &gw, 3, now));
        assert!(c.observe(
            addr(1),
            Outcome::Response {
                status: 503,
                grpc: None
            },
            &gw,
            3,
            now
        ));
        // Below minHealthPercent every endpoint is used.
        let panic = OutlierPolicy {
            min_health_percent: 90,
            ..policy()
        };
        assert_eq!(c.healthy(&[addr(1), addr(2)], &panic, now).len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_circuit_breaker_admits_queues_and_overflows() {
        let c = Arc::new(Cluster::new(PoolLimits {
            max_connections: 1,
            max_pending: 1,
            ..PoolLimits::default()
        }));
        let first = c.admit(false).await.expect("the connection slot");
        // The second waits for the slot; the third overflows.
        let waiting = tokio::spawn({
            let c = c.clone();
            async move { c.admit(false).await.is_some() }
        });
        tokio::task::yield_now().await;
        assert!(c.admit(false).await.is_none());
        drop(first);
        assert!(waiting.await.unwrap());
        // HTTP/2 requests count against http2MaxRequests only.
        let h2 = Cluster::new(PoolLimits {
            max_requests: 2,
            ..PoolLimits::default()
        });
        let (a, b) = (h2.admit(true).await, h2.admit(true).await);
        assert!(a.is_some() && b.is_some() && h2.admit(true).await.is_none());
        // Retries in flight.
        let r = Cluster::new(PoolLimits {
            max_retries: 1,
            ..PoolLimits::default()
        });
        let one = r.retry();
        assert!(one.is_some() && r.retry().is_none());
        drop(one);
        assert!(r.retry().is_some());
        // A budget of 20 %, at least 2: 10 requests in flight allow 2 retries, 20 allow 4.
        let b = Arc::new(Cluster::new(PoolLimits {
            budget: Some((crate::l7::resilience::Percentage(20.0), 2)),
            ..PoolLimits::default()
        }));
        let mut requests = Vec::new();
        for _ in 0..10 {
            requests.push(b.admit(true).await.unwrap());
        }
        let retries: Vec<_> = (0..5).filter_map(|_| b.retry()).collect();
        assert_eq!(retries.len(), 2);
        for _ in 0..10 {
            requests.push(b.admit(true).await.unwrap());
        }
        let more: Vec<_> = (0..5).filter_map(|_| b.retry()).collect();
        assert_eq!(retries.len() + more.len(), 4);
    }
}
