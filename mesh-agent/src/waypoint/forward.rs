//! Sending a request to its backend under the route's timeout and retry policy: the
//! executor of the plan `request` makes. Each attempt picks an endpoint (another one than
//! the attempts before, when there is one and the policy says so), replays the request
//! body kept so far, and waits at most the per-try timeout and what is left of the route
//! timeout; an attempt whose outcome the policy retries is followed, after a jittered
//! backoff, by the next one. The DestinationRule's circuit breaker admits the request
//! first, and every attempt's outcome feeds its outlier detection.
//!
//! The loop is written against [`Transport`], the side towards the endpoints, so that it
//! runs the same over HBONE ([`Hbone`]) and, in the unit tests, over a scripted transport
//! on tokio's paused clock.

use std::{borrow::Cow, future::Future, net::SocketAddr, sync::Arc};

use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::{
    Waypoint,
    cluster::{Admission, Cluster},
    flags::Flags,
    replay::Replay,
    upstream::{self, Active, Connection, HashInputs, Peer, UpstreamError},
};
use crate::{
    identity::Identity,
    l7::{
        resilience::{Outcome, OutlierPolicy, Resilience},
        routes::LoadBalancer,
    },
    state::MeshState,
};

/// Where a request may go and how.
pub struct Plan<'a> {
    /// The ready endpoints of the backend (subset applied), never empty.
    pub candidates: Cow<'a, [SocketAddr]>,
    pub lb: LoadBalancer,
    pub resilience: &'a Resilience,
    /// HTTP/2 upstream (the client spoke HTTP/2).
    pub h2: bool,
    /// The destination's circuit breaker and endpoint health, when its DestinationRule
    /// asks for either.
    pub cluster: Option<Arc<Cluster>>,
    pub outlier: Option<&'a OutlierPolicy>,
}

/// The request as every attempt sends it, but for its body.
pub struct Head {
    pub method: http::Method,
    pub uri: http::Uri,
    pub version: http::Version,
    pub headers: HeaderMap,
}

/// The side towards the endpoints, as the attempt loop uses it.
pub trait Transport {
    /// The response body.
    type Body;
    /// Held while a request is in flight at an endpoint (least-request balancing).
    type InFlight;
    type Error: Failure;

    /// The endpoint of one attempt among `candidates` (non-empty), by `lb`.
    fn choose(&self, candidates: &[SocketAddr], lb: &LoadBalancer, head: &Head) -> SocketAddr;

    /// Counts a request in flight at `endpoint` until the guard is dropped.
    fn start(&self, endpoint: SocketAddr) -> Self::InFlight;

    fn send(
        &self,
        endpoint: SocketAddr,
        connection: &Connection,
        req: Request<upstream::Body>,
    ) -> impl Future<Output = Result<Response<Self::Body>, Self::Error>> + Send;

    /// An attempt is followed by a retry.
    fn retried(&self) {}

    /// Outlier detection ejected `endpoint`.
    fn ejected(&self, _endpoint: SocketAddr, _outcome: Outcome) {}

    /// The circuit breaker turned a request away.
    fn overflowed(&self) {}
}

/// How an attempt that got no response failed.
pub trait Failure {
    /// `ConnectFailure`, `RefusedStream` or `Reset`.
    fn outcome(&self) -> Outcome;
}

impl Failure for UpstreamError {
    fn outcome(&self) -> Outcome {
        if self.is_connect() {
            Outcome::ConnectFailure
        } else if self.is_refused_stream() {
            Outcome::RefusedStream
        } else {
            Outcome::Reset
        }
    }
}

pub enum Forwarded<B, A> {
    Response {
        response: Response<B>,
        endpoint: SocketAddr,
        /// Counts the request in flight at the endpoint until the response ends.
        active: A,
        /// Its place in the circuit breaker, until the response ends.
        admission: Option<Admission>,
        /// When the route's timeout expires, which the response body is held to.
        deadline: Option<Instant>,
        flags: Flags,
        retries: u32,
    },
    Failed {
        status: StatusCode,
        flags: Flags,
        body: &'static str,
        endpoint: Option<SocketAddr>,
        retries: u32,
    },
}

/// What the waypoint's requests come to.
pub type Hboned = Forwarded<Incoming, Active>;

const CONNECT_FAILURE: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure";
const TERMINATION: &str = "upstream connect error or disconnect/reset before headers. reset reason: connection termination";
const TIMEOUT: &str = "upstream request timeout";
const OVERFLOW: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";

/// The waypoint's transport: HBONE to the endpoints with its identity, each endpoint's
/// peer identity that of the workload at its address.
pub struct Hbone<'a> {
    pub wp: &'a Waypoint,
    pub state: &'a MeshState,
    /// The client's address (consistent hashing on the source IP).
    pub source: std::net::IpAddr,
}

impl Transport for Hbone<'_> {
    type Body = Incoming;
    type InFlight = Active;
    type Error = UpstreamError;

    fn choose(&self, candidates: &[SocketAddr], lb: &LoadBalancer, head: &Head) -> SocketAddr {
        let inputs = HashInputs {
            headers: &head.headers,
            query: head.uri.query(),
            source: self.source,
        };
        self.wp.upstreams.choose(candidates, lb, &inputs)
    }

    fn start(&self, endpoint: SocketAddr) -> Active {
        self.wp.upstreams.start(endpoint)
    }

    fn send(
        &self,
        endpoint: SocketAddr,
        connection: &Connection,
        req: Request<upstream::Body>,
    ) -> impl Future<Output = Result<Response<Incoming>, UpstreamError>> + Send {
        // A service address (an ingress gateway going through the service's waypoint):
        // one of the waypoint's pods; else the endpoint's own pod. An endpoint that is no
        // mesh workload has no identity to connect to.
        let td = &self.wp.settings.trust_domain;
        let peer = match self.state.service_by_vip(endpoint.ip(), endpoint.port()) {
            Some((service, _)) => service
                .waypoint
                .as_ref()
                .and_then(|r| self.state.waypoint(r))
                .filter(|w| !w.addresses.is_empty())
                .map(|w| Peer {
                    hop: w.addresses[fastrand::usize(..w.addresses.len())],
                    identity: Identity {
                        trust_domain: td.clone(),
                        namespace: w.namespace.clone(),
                        service_account: w.service_account.clone(),
                    },
                }),
            None => self
                .state
                .workload_by_ip(endpoint.ip())
                .map(|w| Peer::direct(endpoint, Identity::of(td, w))),
        };
        let upstreams = &self.wp.upstreams;
        let connection = connection.clone();
        async move {
            let peer = peer.ok_or(UpstreamError::NoWorkload { endpoint })?;
            upstreams.send(endpoint, &peer, &connection, req).await
        }
    }

    fn retried(&self) {
        self.wp.metrics.retry();
    }

    fn ejected(&self, endpoint: SocketAddr, outcome: Outcome) {
        self.wp.metrics.ejection();
        tracing::info!(%endpoint, ?outcome, "waypoint: endpoint ejected by outlier detection");
    }

    fn overflowed(&self) {
        self.wp.metrics.overflow();
    }
}

/// Sends the request, whose body `replay` holds, through `transport`; see the module docs.
pub async fn forward<T: Transport>(
    transport: &T,
    plan: Plan<'_>,
    head: Head,
    replay: Replay,
) -> Forwarded<T::Body, T::InFlight> {
    let policy = &plan.resilience.retry;
    let deadline = plan.resilience.timeout.map(|t| Instant::now() + t);
    let admission = match &plan.cluster {
        None => None,
        Some(cluster) => {
            // Waiting for a connection slot counts against the route's timeout.
            let admitted = match deadline {
                None => Some(cluster.admit(plan.h2).await),
                Some(at) => tokio::time::timeout_at(at, cluster.admit(plan.h2))
                    .await
                    .ok(),
            };
            match admitted {
                None => return timed_out(None, 0),
                Some(None) => {
                    transport.overflowed();
                    return Forwarded::Failed {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        flags: Flags::UO,
                        body: OVERFLOW,
                        endpoint: None,
                        retries: 0,
                    };
                }
                Some(admission) => admission,
            }
        }
    };
    let connection = Connection::new(plan.h2, plan.cluster.as_deref().map(|c| c.limits()));
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut attempt = 0u32;
    // The retry in flight, counted against the circuit breaker's maxRetries.
    let mut _retrying = None;
    loop {
        let Some(endpoint) = pick(transport, &plan, &head, &tried) else {
            return Forwarded::Failed {
                status: StatusCode::SERVICE_UNAVAILABLE,
                flags: Flags::UH,
                body: "no healthy upstream",
                endpoint: None,
                retries: attempt,
            };
        };
        let mut req = Request::new(replay.attempt().boxed());
        *req.method_mut() = head.method.clone();
        *req.uri_mut() = head.uri.clone();
        *req.version_mut() = head.version;
        *req.headers_mut() = head.headers.clone();

        let active = transport.start(endpoint);
        let try_deadline = match (deadline, policy.per_try_timeout) {
            (d, None) => d,
            (None, Some(p)) => Some(Instant::now() + p),
            (Some(d), Some(p)) => Some(d.min(Instant::now() + p)),
        };
        let send = transport.send(endpoint, &connection, req);
        let result = match try_deadline {
            None => Some(send.await),
            Some(at) => tokio::time::timeout_at(at, send).await.ok(),
        };
        let outcome = match &result {
            None if deadline.is_some_and(|d| Instant::now() >= d) => {
                return timed_out(Some(endpoint), attempt);
            }
            None => Outcome::PerTryTimeout,
            Some(Ok(response)) => Outcome::Response {
                status: response.status().as_u16(),
                grpc: response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok()?.parse().ok()),
            },
            Some(Err(e)) => e.outcome(),
        };
        if let (Some(cluster), Some(outlier)) = (&plan.cluster, plan.outlier)
            && cluster.observe(
                endpoint,
                outcome,
                outlier,
                plan.candidates.len(),
                Instant::now(),
            )
        {
            transport.ejected(endpoint, outcome);
        }
        let retriable = policy.on.retries(outcome);
        let retry_slot = if retriable && attempt < policy.retries && replay.can_replay() {
            match &plan.cluster {
                // Past maxRetries in flight, the request is not retried.
                Some(cluster) => cluster.retry().map(Some),
                None => Some(None),
            }
        } else {
            None
        };
        let Some(retry_slot) = retry_slot else {
            // Envoy's URX: the retries ran out on an answer the policy would have retried.
            let exhausted = if retriable && policy.retries > 0 && attempt >= policy.retries {
                Flags::URX
            } else {
                Flags::NONE
            };
            return match result {
                Some(Ok(response)) => Forwarded::Response {
                    response,
                    endpoint,
                    active,
                    admission,
                    deadline,
                    flags: exhausted,
                    retries: attempt,
                },
                Some(Err(_)) => {
                    let connect = outcome == Outcome::ConnectFailure;
                    Forwarded::Failed {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        flags: exhausted | if connect { Flags::UF } else { Flags::UC },
                        body: if connect {
                            CONNECT_FAILURE
                        } else {
                            TERMINATION
                        },
                        endpoint: Some(endpoint),
                        retries: attempt,
                    }
                }
                None => timed_out(Some(endpoint), attempt),
            };
        };
        _retrying = retry_slot;
        drop(result);
        drop(active);
        tried.push(endpoint);
        attempt += 1;
        transport.retried();
        let wait = policy.backoff(attempt, fastrand::f64());
        match deadline {
            Some(d) if Instant::now() + wait >= d => {
                tokio::time::sleep_until(d).await;
                return timed_out(None, attempt);
            }
            _ => tokio::time::sleep(wait).await,
        }
    }
}

fn timed_out<B, A>(endpoint: Option<SocketAddr>, retries: u32) -> Forwarded<B, A> {
    Forwarded::Failed {
        status: StatusCode::GATEWAY_TIMEOUT,
        flags: Flags::UT,
        body: TIMEOUT,
        endpoint,
        retries,
    }
}

/// The endpoint of the next attempt: by the load balancer, among the endpoints outlier
/// detection lets through, and among those not tried yet when the policy says so and any is
/// left; `None` when outlier detection lets none through.
fn pick<T: Transport>(
    transport: &T,
    plan: &Plan<'_>,
    head: &Head,
    tried: &[SocketAddr],
) -> Option<SocketAddr> {
    let healthy = match (&plan.cluster, plan.outlier) {
        (Some(cluster), Some(outlier)) => {
            cluster.healthy(&plan.candidates, outlier, Instant::now())
        }
        _ => Cow::Borrowed(&*plan.candidates),
    };
    if healthy.is_empty() {
        return None;
    }
    let fresh: Vec<SocketAddr>;
    let candidates: &[SocketAddr] =
        if plan.resilience.retry.ignore_previous_hosts && !tried.is_empty() {
            fresh = healthy
                .iter()
                .copied()
                .filter(|e| !tried.contains(e))
                .collect();
            if fresh.is_empty() { &healthy } else { &fresh }
        } else {
            &healthy
        };
    Some(transport.choose(candidates, &plan.lb, head))
}

#[cfg(test)]
mod tests {
    //! The attempt loop over a scripted transport on tokio's paused clock: time moves only
    //! when every task waits, so the durations below are exact.

    use std::{
        sync::{
            Mutex,
            atomic::{AtomicU32, Ordering},
        },
        time::Duration,
    };

    use bytes::Bytes;
    use http_body_util::{Empty, Full};

    use super::*;
    use crate::l7::resilience::{PoolLimits, RetryOn, RetryPolicy};
    use crate::waypoint::{cluster::Clusters, replay::MAX_REPLAY};

    /// What an endpoint does with a request: answers a status or fails, after a delay.
    type Answer = (Duration, Result<u16, Outcome>);

    struct Fail(Outcome);

    impl Failure for Fail {
        fn outcome(&self) -> Outcome {
            self.0
        }
    }

    struct Script {
        /// The answer of `endpoint` to the request numbered `n` (from 0) it gets.
        answer: Box<dyn Fn(SocketAddr, u32) -> Answer + Send + Sync>,
        calls: Mutex<Vec<(SocketAddr, Duration)>>,
        retried: AtomicU32,
        ejected: AtomicU32,
        overflowed: AtomicU32,
        t0: Instant,
    }

    impl Script {
        fn new(answer: impl Fn(SocketAddr, u32) -> Answer + Send + Sync + 'static) -> Self {
            Self {
                answer: Box::new(answer),
                calls: Mutex::default(),
                retried: AtomicU32::new(0),
                ejected: AtomicU32::new(0),
                overflowed: AtomicU32::new(0),
                t0: Instant::now(),
            }
        }

        fn calls_to(&self, endpoint: SocketAddr) -> usize {
            let calls = self.calls.lock().unwrap();
            calls.iter().filter(|(e, _)| *e == endpoint).count()
        }
    }

    impl Transport for Script {
        type Body = ();
        type InFlight = ();
        type Error = Fail;

        /// The first candidate, so that the tests know where attempts go.
        fn choose(&self, candidates: &[SocketAddr], _: &LoadBalancer, _: &Head) -> SocketAddr {
            candidates[0]
        }

        fn start(&self, _: SocketAddr) {}

        fn send(
            &self,
            endpoint: SocketAddr,
            _: &Connection,
            req: Request<upstream::Body>,
        ) -> impl Future<Output = Result<Response<()>, Fail>> + Send {
            let n = {
                let mut calls = self.calls.lock().unwrap();
                let n = calls.iter().filter(|(e, _)| *e == endpoint).count();
                calls.push((endpoint, self.t0.elapsed()));
                n as u32
            };
            let (delay, answer) = (self.answer)(endpoint, n);
            async move {
                // The endpoint reads the request's body, as a server would.
                let _ = req.into_body().collect().await;
                tokio::time::sleep(delay).await;
                answer
                    .map(|status| Response::builder().status(status).body(()).unwrap())
                    .map_err(Fail)
            }
        }

        fn retried(&self) {
            self.retried.fetch_add(1, Ordering::Relaxed);
        }

        fn ejected(&self, _: SocketAddr, _: Outcome) {
            self.ejected.fetch_add(1, Ordering::Relaxed);
        }

        fn overflowed(&self) {
            self.overflowed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 80))
    }

    fn head() -> Head {
        Head {
            method: http::Method::GET,
            uri: "/".parse().unwrap(),
            version: http::Version::HTTP_11,
            headers: HeaderMap::new(),
        }
    }

    fn empty() -> Replay {
        Replay::new(Empty::new().map_err(|e| match e {}).boxed(), MAX_REPLAY)
    }

    fn retries(n: u32, on: &str) -> RetryPolicy {
        RetryPolicy {
            retries: n,
            on: RetryOn::parse(on).unwrap(),
            ..RetryPolicy::istio_default()
        }
    }

    fn resilience(retry: RetryPolicy, timeout: Option<Duration>) -> Resilience {
        Resilience {
            timeout,
            retry,
            fault: None,
        }
    }

    fn plan<'a>(endpoints: &[u8], resilience: &'a Resilience) -> Plan<'a> {
        Plan {
            candidates: endpoints
                .iter()
                .map(|n| addr(*n))
                .collect::<Vec<_>>()
                .into(),
            lb: LoadBalancer::RoundRobin,
            resilience,
            h2: false,
            cluster: None,
            outlier: None,
        }
    }

    fn status(f: &Forwarded<(), ()>) -> (u16, Flags, u32) {
        match f {
            Forwarded::Response {
                response,
                flags,
                retries,
                ..
            } => (response.status().as_u16(), *flags, *retries),
            Forwarded::Failed {
                status,
                flags,
                retries,
                ..
            } => (status.as_u16(), *flags, *retries),
        }
    }

    const OK: Result<u16, Outcome> = Ok(200);
    const UNAVAILABLE: Result<u16, Outcome> = Ok(503);
    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn a_5xx_is_retried_on_the_endpoints_not_tried_yet() {
        let t = Script::new(|e, _| (MS, if e == addr(3) { OK } else { UNAVAILABLE }));
        let r = resilience(retries(3, "5xx"), None);
        let start = Instant::now();
        let f = forward(&t, plan(&[1, 2, 3], &r), head(), empty()).await;
        assert_eq!(status(&f), (200, Flags::NONE, 2));
        let calls: Vec<_> = t.calls.lock().unwrap().iter().map(|c| c.0).collect();
        assert_eq!(calls, [addr(1), addr(2), addr(3)]);
        assert_eq!(t.retried.load(Ordering::Relaxed), 2);
        // Three 1 ms answers and two backoffs of at most 25 and 50 ms.
        let took = start.elapsed();
        assert!(took >= 5 * MS && took <= 3 * MS + 75 * MS, "{took:?}");
        // The retries ran out on a 5xx: the last answer, marked URX.
        let t = Script::new(|_, _| (MS, UNAVAILABLE));
        let f = forward(&t, plan(&[1, 2], &r), head(), empty()).await;
        assert_eq!(status(&f), (503, Flags::URX, 3));
        assert_eq!(t.calls.lock().unwrap().len(), 4);
    }

    /// How many of 1,000 requests through `r` to one endpoint that answers so succeed.
    async fn successes(
        r: &Resilience,
        answer: impl Fn(u32) -> bool + Send + Sync + 'static,
    ) -> u32 {
        let t = Script::new(move |_, n| (MS, if answer(n) { OK } else { UNAVAILABLE }));
        let mut ok = 0;
        for _ in 0..1000 {
            if status(&forward(&t, plan(&[1], r), head(), empty()).await).0 == 200 {
                ok += 1;
            }
        }
        ok
    }

    #[tokio::test(start_paused = true)]
    async fn half_failing_backend_with_and_without_a_retry_policy() {
        let three_on_5xx = resilience(retries(3, "5xx"), None);
        // Every other answer a 503 (the kernel suite's backend): all succeed with retries.
        assert_eq!(successes(&three_on_5xx, |n| n % 2 == 1).await, 1000);
        // Each answer a 503 by chance, 1 in 2: four tries all fail 1 in 16 times.
        fastrand::seed(15);
        let random = successes(&three_on_5xx, |_| fastrand::bool()).await;
        assert!((910..=965).contains(&random), "{random} of 1000 succeeded");
        // Istio's default retries do not cover 503 answers: about half fail.
        let default = successes(&Resilience::default(), |_| fastrand::bool()).await;
        assert!(
            (440..=560).contains(&default),
            "{default} of 1000 succeeded"
        );
        assert_eq!(successes(&Resilience::default(), |n| n % 2 == 1).await, 500);
    }

    #[tokio::test(start_paused = true)]
    async fn the_route_timeout_answers_504_ut_at_its_expiry() {
        let t = Script::new(|_, _| (Duration::from_secs(2), OK));
        let r = resilience(
            RetryPolicy::istio_default(),
            Some(Duration::from_millis(500)),
        );
        let start = Instant::now();
        let f = forward(&t, plan(&[1], &r), head(), empty()).await;
        assert_eq!(status(&f), (504, Flags::UT, 0));
        assert_eq!(start.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn per_try_timeouts_are_retried_then_answer_504() {
        let t = Script::new(|_, _| (Duration::from_secs(2), OK));
        let policy = RetryPolicy {
            per_try_timeout: Some(Duration::from_millis(200)),
            ..retries(2, "5xx")
        };
        let r = resilience(policy, None);
        let start = Instant::now();
        let f = forward(&t, plan(&[1], &r), head(), empty()).await;
        assert_eq!(status(&f), (504, Flags::UT, 2));
        let calls: Vec<_> = t.calls.lock().unwrap().iter().map(|c| c.1).collect();
        assert_eq!(calls.len(), 3, "three tries");
        // Each try waits 200 ms; the backoffs between them are 1–25 and 1–50 ms.
        let took = start.elapsed();
        assert!(took >= 602 * MS && took <= 675 * MS, "{took:?}");
        // Under a route timeout, the last try gets only what is left of it.
        let t = Script::new(|_, _| (Duration::from_secs(2), OK));
        let r = resilience(
            RetryPolicy {
                per_try_timeout: Some(Duration::from_millis(200)),
                ..retries(5, "5xx")
            },
            Some(Duration::from_millis(300)),
        );
        let start = Instant::now();
        let f = forward(&t, plan(&[1], &r), head(), empty()).await;
        assert_eq!((status(&f).0, status(&f).1), (504, Flags::UT));
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        assert_eq!(t.calls.lock().unwrap().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_past_the_replay_buffer_is_not_retried() {
        let t = Script::new(|_, _| (MS, UNAVAILABLE));
        let r = resilience(retries(3, "5xx"), None);
        let body = Full::new(Bytes::from(vec![7u8; 64])).map_err(|e| match e {});
        let f = forward(&t, plan(&[1, 2], &r), head(), Replay::new(body.boxed(), 16)).await;
        assert_eq!(status(&f), (503, Flags::NONE, 0));
        assert_eq!(t.calls.lock().unwrap().len(), 1);
        // Within the buffer, it is.
        let body = Full::new(Bytes::from(vec![7u8; 16])).map_err(|e| match e {});
        let f = forward(&t, plan(&[1, 2], &r), head(), Replay::new(body.boxed(), 16)).await;
        assert_eq!(status(&f), (503, Flags::URX, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn connection_failures_are_uf_and_resets_uc() {
        let t = Script::new(|e, _| {
            let failure = if e == addr(1) {
                Outcome::ConnectFailure
            } else {
                Outcome::Reset
            };
            (MS, Err(failure))
        });
        // Istio's default retries connect failures, not resets: 1 fails, 2 resets.
        let r = Resilience::default();
        let f = forward(&t, plan(&[1, 2], &r), head(), empty()).await;
        assert_eq!(status(&f), (503, Flags::UC, 1));
        let r = resilience(RetryPolicy::none(), None);
        let f = forward(&t, plan(&[1], &r), head(), empty()).await;
        assert_eq!(status(&f), (503, Flags::UF, 0));
    }

    fn cluster(limits: PoolLimits) -> Arc<Cluster> {
        Clusters::default().get(("ns".into(), "svc".into(), 80, None), &limits)
    }

    #[tokio::test(start_paused = true)]
    async fn the_circuit_breaker_overflows_with_uo_as_istios_task() {
        // maxConnections 1, http1MaxPendingRequests 1, maxRequestsPerConnection 1.
        let c = cluster(PoolLimits {
            max_connections: 1,
            max_pending: 1,
            max_requests_per_connection: 1,
            ..PoolLimits::default()
        });
        let t = Script::new(|_, _| (Duration::from_millis(20), OK));
        let r = resilience(RetryPolicy::istio_default(), None);
        let one = |_| {
            let p = Plan {
                cluster: Some(c.clone()),
                ..plan(&[1], &r)
            };
            let t = &t;
            async move { status(&forward(t, p, head(), empty()).await) }
        };
        // 3 clients × 30 requests.
        let clients = (0..3).map(|_| async {
            let mut overflowed = 0;
            for i in 0..30 {
                if one(i).await == (503, Flags::UO, 0) {
                    overflowed += 1;
                }
            }
            overflowed
        });
        let overflowed: u32 = futures::future::join_all(clients).await.into_iter().sum();
        assert!(overflowed > 45, "only {overflowed} of 90 overflowed");
        assert_eq!(t.overflowed.load(Ordering::Relaxed), overflowed);
        // One client alone never overflows.
        for i in 0..30 {
            assert_eq!(one(i).await, (200, Flags::NONE, 0));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_in_flight_stay_within_the_budget() {
        let c = cluster(PoolLimits {
            budget: Some((crate::l7::resilience::Percentage(20.0), 3)),
            ..PoolLimits::default()
        });
        let t = Script::new(|_, _| (Duration::from_millis(100), UNAVAILABLE));
        let r = resilience(retries(2, "5xx"), None);
        let requests = (0..100).map(|_| {
            let p = Plan {
                cluster: Some(c.clone()),
                ..plan(&[1, 2], &r)
            };
            let t = &t;
            async move { forward(t, p, head(), empty()).await }
        });
        futures::future::join_all(requests).await;
        // 100 first tries at once, failing together: about 20 % of them may be retried
        // (fewer as the others end), and those retries again; without the budget, 200.
        let retried = t.retried.load(Ordering::Relaxed);
        assert!((15..=40).contains(&retried), "{retried} retries");
        let late = t.calls.lock().unwrap().iter().filter(|c| c.1 > MS).count();
        assert_eq!(late as u32, retried);
    }

    #[tokio::test(start_paused = true)]
    async fn an_always_failing_endpoint_is_ejected_and_comes_back() {
        let c = cluster(PoolLimits::default());
        let outlier = crate::waypoint::cluster::tests::policy();
        let t = Script::new(|e, _| (MS, if e == addr(1) { Ok(500) } else { OK }));
        let r = resilience(RetryPolicy::none(), None);
        let run = |n: usize| {
            let (c, t, r, outlier) = (&c, &t, &r, &outlier);
            async move {
                for _ in 0..n {
                    let p = Plan {
                        cluster: Some(c.clone()),
                        outlier: Some(outlier),
                        ..plan(&[1, 2, 3], r)
                    };
                    forward(t, p, head(), empty()).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        // 40 requests over 2 s: endpoint 1 takes the first of its share, then none.
        run(40).await;
        assert_eq!(t.calls_to(addr(1)), 1);
        assert_eq!(t.ejected.load(Ordering::Relaxed), 1);
        // After the ejection time (and the review interval) it takes requests again.
        tokio::time::sleep(Duration::from_secs(2)).await;
        run(6).await;
        assert_eq!(t.calls_to(addr(1)), 2);
        assert_eq!(t.ejected.load(Ordering::Relaxed), 2);
    }
}
