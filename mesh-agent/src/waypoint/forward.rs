//! Sending a request to its backend under the route's timeout and retry policy: the
//! executor of the plan `request` makes. Each attempt picks an endpoint (another one than
//! the attempts before, when there is one and the policy says so), replays the request
//! body kept so far, and waits at most the per-try timeout and what is left of the route
//! timeout; an attempt whose outcome the policy retries is followed, after a jittered
//! backoff, by the next one.

use std::{borrow::Cow, net::SocketAddr, sync::Arc};

use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::{
    Waypoint,
    cluster::{Admission, Cluster},
    flags::Flags,
    replay::Replay,
    upstream::{Active, HashInputs, UpstreamError},
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

pub enum Forwarded {
    Response {
        response: Response<Incoming>,
        endpoint: SocketAddr,
        /// Counts the request in flight at the endpoint until the response ends.
        active: Active,
        /// Its place in the circuit breaker, until the response ends.
        admission: Option<Admission>,
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

const CONNECT_FAILURE: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure";
const TERMINATION: &str = "upstream connect error or disconnect/reset before headers. reset reason: connection termination";
const TIMEOUT: &str = "upstream request timeout";
const OVERFLOW: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";

/// Sends the request, whose body `replay` holds; see the module docs.
pub async fn forward(
    wp: &Waypoint,
    state: &MeshState,
    plan: Plan<'_>,
    head: Head,
    replay: Replay,
    source: std::net::IpAddr,
) -> Forwarded {
    let policy = &plan.resilience.retry;
    let deadline = plan.resilience.timeout.map(|t| Instant::now() + t);
    let mut head = head;
    let admission = match &plan.cluster {
        None => None,
        Some(cluster) => {
            let Some(admission) = cluster.admit(plan.h2).await else {
                return Forwarded::Failed {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    flags: Flags::UO,
                    body: OVERFLOW,
                    endpoint: None,
                    retries: 0,
                };
            };
            if cluster.limits().max_requests_per_connection == 1 && !plan.h2 {
                head.headers.insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Some(admission)
        }
    };
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut attempt = 0u32;
    // The retry in flight, counted against the circuit breaker's maxRetries.
    let mut _retrying = None;
    loop {
        // No endpoint outlier detection lets through, or one that is not a mesh workload.
        let Some((endpoint, workload)) = pick(wp, &plan, &head, &tried, source)
            .and_then(|e| Some((e, state.workload_by_ip(e.ip())?)))
        else {
            return Forwarded::Failed {
                status: StatusCode::SERVICE_UNAVAILABLE,
                flags: Flags::UH,
                body: "no healthy upstream",
                endpoint: None,
                retries: attempt,
            };
        };
        let peer = Identity::of(&wp.settings.trust_domain, workload);
        let mut req = Request::new(replay.attempt().boxed());
        *req.method_mut() = head.method.clone();
        *req.uri_mut() = head.uri.clone();
        *req.version_mut() = head.version;
        *req.headers_mut() = head.headers.clone();

        let active = wp.upstreams.start(endpoint);
        let try_deadline = match (deadline, policy.per_try_timeout) {
            (d, None) => d,
            (None, Some(p)) => Some(Instant::now() + p),
            (Some(d), Some(p)) => Some(d.min(Instant::now() + p)),
        };
        let send = wp.upstreams.send(endpoint, &peer, plan.h2, req);
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
            Some(Err(e)) if e.is_connect() => Outcome::ConnectFailure,
            Some(Err(e)) if e.is_refused_stream() => Outcome::RefusedStream,
            Some(Err(_)) => Outcome::Reset,
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
            wp.metrics.ejection();
            tracing::info!(%endpoint, ?outcome, "waypoint: endpoint ejected by outlier detection");
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
                    flags: exhausted,
                    retries: attempt,
                },
                Some(Err(e)) => Forwarded::Failed {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    flags: exhausted | if e.is_connect() { Flags::UF } else { Flags::UC },
                    body: match e {
                        UpstreamError::Connect { .. } => CONNECT_FAILURE,
                        UpstreamError::Http { .. } => TERMINATION,
                    },
                    endpoint: Some(endpoint),
                    retries: attempt,
                },
                None => timed_out(Some(endpoint), attempt),
            };
        };
        _retrying = retry_slot;
        drop(result);
        drop(active);
        tried.push(endpoint);
        attempt += 1;
        wp.metrics.retry();
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

fn timed_out(endpoint: Option<SocketAddr>, retries: u32) -> Forwarded {
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
fn pick(
    wp: &Waypoint,
    plan: &Plan<'_>,
    head: &Head,
    tried: &[SocketAddr],
    source: std::net::IpAddr,
) -> Option<SocketAddr> {
    let inputs = HashInputs {
        headers: &head.headers,
        query: head.uri.query(),
        source,
    };
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
    Some(wp.upstreams.choose(candidates, &plan.lb, &inputs))
}
