//! What a route says about failure, compiled from the objects (see [`super::config`]):
//! timeouts, retries and fault injection, with Envoy's meanings as Istio configures them.
//!
//! - **Timeout** (VirtualService `timeout`, HTTPRoute `timeouts.request`): none by default;
//!   it covers every attempt, the backoffs between them and the response body; expiry
//!   before the response is 504 with flag `UT`, during its body cuts it (also `UT`).
//! - **Retries** (VirtualService `retries`, HTTPRoute `retry`): `attempts` is the number of
//!   *retries* (Envoy's `num_retries`); `retryOn` takes Envoy's conditions (`5xx`,
//!   `gateway-error`, `reset`, `connect-failure`, `refused-stream`, `retriable-4xx`,
//!   `retriable-status-codes`, gRPC `cancelled`, `deadline-exceeded`, `internal`,
//!   `resource-exhausted`, `unavailable`) and numeric status codes. A route without a retry
//!   policy gets Istio's default: 2 retries on
//!   `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes`, on
//!   another endpoint first. Backoff is Envoy's: jittered exponential, 25 ms base, 250 ms
//!   cap. A per-try timeout (`perTryTimeout`, HTTPRoute `timeouts.backendRequest`) that
//!   expires is retried while attempts remain, as Istio documents.
//! - **Fault injection** (VirtualService `fault`): a delay and/or an abort, each for a
//!   percentage of the requests (fractions allowed), applied after the route matched and
//!   before any upstream: flags `DI` and `FI`.

use std::time::Duration;

use super::config::RouteError;
use super::config::{
    ConnectionPoolSettings, HttpRouteRetry, HttpRouteTimeouts, OutlierDetectionSettings, VsFault,
    VsRetries,
};

/// The resilience settings of one route rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Resilience {
    /// The whole request, all attempts included.
    pub timeout: Option<Duration>,
    pub retry: RetryPolicy,
    pub fault: Option<Fault>,
}

impl Default for Resilience {
    /// What a request gets without a route, or with a route that says nothing: no timeout,
    /// Istio's default retries, no fault.
    fn default() -> Self {
        Self {
            timeout: None,
            retry: RetryPolicy::istio_default(),
            fault: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    /// Retry on another endpoint when there is one.
    pub ignore_previous_hosts: bool,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl RetryPolicy {
    /// Istio's retry policy for a route that sets none.
    pub fn istio_default() -> Self {
        Self {
            retries: 2,
            per_try_timeout: None,
            on: RetryOn::parse(
                "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
            )
            .expect("Istio's default retryOn parses"),
            ignore_previous_hosts: true,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
        }
    }

    /// No retries at all (`attempts: 0`).
    pub fn none() -> Self {
        Self {
            retries: 0,
            ..Self::istio_default()
        }
    }

    /// The wait before retry number `retry` (1 for the first retry): Envoy's fully jittered
    /// exponential backoff, a random time in `[0, min(base × 2^(retry-1), max))`... at least
    /// 1 ms.
    pub fn backoff(&self, retry: u32, random: f64) -> Duration {
        let ceiling = self
            .backoff_base
            .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
            .min(self.backoff_max);
        ceiling
            .mul_f64(random.clamp(0.0, 1.0))
            .max(Duration::from_millis(1))
    }
}

/// Envoy's `retry_on` conditions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    bits: u32,
    /// `retriable-status-codes` (and numeric entries).
    codes: Vec<u16>,
}

const FIVE_XX: u32 = 1;
const GATEWAY_ERROR: u32 = 1 << 1;
const RESET: u32 = 1 << 2;
const CONNECT_FAILURE: u32 = 1 << 3;
const REFUSED_STREAM: u32 = 1 << 4;
const RETRIABLE_4XX: u32 = 1 << 5;
const STATUS_CODES: u32 = 1 << 6;
const GRPC_CANCELLED: u32 = 1 << 7;
const GRPC_DEADLINE: u32 = 1 << 8;
const GRPC_INTERNAL: u32 = 1 << 9;
const GRPC_EXHAUSTED: u32 = 1 << 10;
const GRPC_UNAVAILABLE: u32 = 1 << 11;

/// How one attempt ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No connection to the endpoint.
    ConnectFailure,
    /// The endpoint refused the HTTP/2 stream.
    RefusedStream,
    /// The connection or stream broke before a response.
    Reset,
    /// The per-try timeout expired.
    PerTryTimeout,
    /// A response, with the `grpc-status` of its headers (a trailers-only gRPC answer).
    Response { status: u16, grpc: Option<u32> },
}

impl RetryOn {
    /// Parses Istio's comma-separated `retryOn`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut on = Self::default();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if let Ok(code) = item.parse::<u16>() {
                if !(100..=599).contains(&code) {
                    return Err(format!("{code} is not an HTTP status code"));
                }
                on.bits |= STATUS_CODES;
                on.codes.push(code);
                continue;
            }
            on.bits |= match item {
                "5xx" => FIVE_XX,
                "gateway-error" => GATEWAY_ERROR,
                "reset" | "reset-before-request" => RESET,
                "connect-failure" => CONNECT_FAILURE,
                "refused-stream" => REFUSED_STREAM,
                "retriable-4xx" => RETRIABLE_4XX,
                "retriable-status-codes" => STATUS_CODES,
                "cancelled" => GRPC_CANCELLED,
                "deadline-exceeded" => GRPC_DEADLINE,
                "internal" => GRPC_INTERNAL,
                "resource-exhausted" => GRPC_EXHAUSTED,
                "unavailable" => GRPC_UNAVAILABLE,
                // Conditions about HTTP/3 and headers Envoy knows; accepted, never true here.
                "http3-post-connect-failure" | "retriable-headers" | "envoy-ratelimited" => 0,
                other => return Err(format!("unknown retry condition {other:?}")),
            };
        }
        Ok(on)
    }

    /// The status codes of `retriable-status-codes`.
    pub fn with_codes(mut self, codes: &[u16]) -> Self {
        self.bits |= STATUS_CODES;
        self.codes.extend_from_slice(codes);
        self
    }

    /// Whether an attempt that ended so is retried.
    pub fn retries(&self, outcome: Outcome) -> bool {
        let any = |bits: u32| self.bits & bits != 0;
        match outcome {
            Outcome::ConnectFailure => any(CONNECT_FAILURE | FIVE_XX | GATEWAY_ERROR | RESET),
            Outcome::RefusedStream => any(REFUSED_STREAM | FIVE_XX | GATEWAY_ERROR | RESET),
            Outcome::Reset => any(FIVE_XX | GATEWAY_ERROR | RESET),
            Outcome::PerTryTimeout => true,
            Outcome::Response { status, grpc } => {
                (any(FIVE_XX) && (500..600).contains(&status))
                    || (any(GATEWAY_ERROR) && matches!(status, 502..=504))
                    || (any(RETRIABLE_4XX) && status == 409)
                    || (any(STATUS_CODES) && self.codes.contains(&status))
                    || match grpc {
                        Some(1) => any(GRPC_CANCELLED),
                        Some(4) => any(GRPC_DEADLINE),
                        Some(8) => any(GRPC_EXHAUSTED),
                        Some(13) => any(GRPC_INTERNAL),
                        Some(14) => any(GRPC_UNAVAILABLE),
                        _ => false,
                    }
            }
        }
    }
}

/// Injected faults.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub delay: Option<(Duration, Percentage)>,
    pub abort: Option<(Abort, Percentage)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    Http(u16),
    /// A gRPC status code, answered as HTTP 200 with `grpc-status`.
    Grpc(u32),
}

/// A share of requests, 0–100 with fractions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentage(pub f64);

impl Percentage {
    /// Whether a request drawn `random` (uniform in `[0, 1)`) falls in the share.
    pub fn hits(self, random: f64) -> bool {
        random * 100.0 < self.0
    }
}

/// Compiles a VirtualService route's `timeout`, `retries` and `fault`; `field` is the route's
/// path (`spec.http[2]`).
pub fn from_virtual_service(
    timeout: Option<&str>,
    retries: Option<&VsRetries>,
    fault: Option<&VsFault>,
    field: &str,
) -> Result<Resilience, RouteError> {
    let mut r = Resilience {
        timeout: timeout
            .map(|t| duration(t, &format!("{field}.timeout")))
            .transpose()?
            .filter(|d| !d.is_zero()),
        ..Resilience::default()
    };
    if let Some(retries) = retries {
        let at = |f: &str| format!("{field}.retries.{f}");
        let mut policy = RetryPolicy::istio_default();
        policy.retries = retries.attempts.unwrap_or(policy.retries);
        if let Some(t) = &retries.per_try_timeout {
            policy.per_try_timeout =
                Some(duration(t, &at("perTryTimeout"))?).filter(|d| !d.is_zero());
        }
        if let Some(on) = &retries.retry_on {
            policy.on = RetryOn::parse(on).map_err(|e| RouteError::new(at("retryOn"), e))?;
        }
        if let Some(b) = &retries.backoff {
            policy.backoff_base = duration(b, &at("backoff"))?;
            policy.backoff_max = policy.backoff_base * 10;
        }
        policy.ignore_previous_hosts = retries.retry_ignore_previous_hosts.unwrap_or(true);
        r.retry = policy;
    }
    if let Some(f) = fault {
        r.fault = Some(compile_fault(f, &format!("{field}.fault"))?);
    }
    Ok(r)
}

/// Compiles an HTTPRoute rule's `timeouts` and `retry`; `field` is the rule's path.
pub fn from_http_route(
    timeouts: Option<&HttpRouteTimeouts>,
    retry: Option<&HttpRouteRetry>,
    field: &str,
) -> Result<Resilience, RouteError> {
    let mut r = Resilience::default();
    if let Some(t) = timeouts {
        if let Some(req) = &t.request {
            r.timeout =
                Some(duration(req, &format!("{field}.timeouts.request"))?).filter(|d| !d.is_zero());
        }
        if let Some(b) = &t.backend_request {
            r.retry.per_try_timeout =
                Some(duration(b, &format!("{field}.timeouts.backendRequest"))?)
                    .filter(|d| !d.is_zero());
        }
    }
    if let Some(retry) = retry {
        r.retry.retries = retry.attempts.unwrap_or(r.retry.retries);
        if !retry.codes.is_empty() {
            // The codes replace the conditions (GEP-1731), connection failures aside.
            r.retry.on = RetryOn::parse("connect-failure,refused-stream")
                .expect("parses")
                .with_codes(&retry.codes);
        }
        if let Some(b) = &retry.backoff {
            r.retry.backoff_base = duration(b, &format!("{field}.retry.backoff"))?;
            r.retry.backoff_max = r.retry.backoff_base * 10;
        }
    }
    Ok(r)
}

fn compile_fault(f: &VsFault, field: &str) -> Result<Fault, RouteError> {
    let percentage = |p: Option<super::config::Percent>, legacy: Option<u32>, at: &str| {
        let value = match (p, legacy) {
            (Some(p), _) => p.value,
            (None, Some(l)) => f64::from(l),
            (None, None) => 100.0,
        };
        if !(0.0..=100.0).contains(&value) {
            return Err(RouteError::new(
                format!("{at}.percentage.value"),
                format!("{value} is not within 0 and 100"),
            ));
        }
        Ok(Percentage(value))
    };
    let delay = match &f.delay {
        None => None,
        Some(d) => {
            let at = format!("{field}.delay");
            let Some(fixed) = &d.fixed_delay else {
                return Err(RouteError::new(
                    format!("{at}.fixedDelay"),
                    "required (exponentialDelay is not supported)",
                ));
            };
            Some((
                duration(fixed, &format!("{at}.fixedDelay"))?,
                percentage(d.percentage, d.percent, &at)?,
            ))
        }
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => {
            let at = format!("{field}.abort");
            let kind = match (a.http_status, &a.grpc_status) {
                (Some(s), None) if (200..600).contains(&s) => Abort::Http(s),
                (Some(s), None) => {
                    return Err(RouteError::new(
                        format!("{at}.httpStatus"),
                        format!("{s} is not an HTTP status"),
                    ));
                }
                (None, Some(g)) => Abort::Grpc(grpc_code(g).ok_or_else(|| {
                    RouteError::new(
                        format!("{at}.grpcStatus"),
                        format!("unknown gRPC status {g:?}"),
                    )
                })?),
                _ => {
                    return Err(RouteError::new(
                        at,
                        "exactly one of httpStatus and grpcStatus is supported",
                    ));
                }
            };
            Some((kind, percentage(a.percentage, None, &at)?))
        }
    };
    Ok(Fault { delay, abort })
}

/// A gRPC status by its name (`UNAVAILABLE`) or number.
fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    name.parse()
        .ok()
        .filter(|n| *n < 17)
        .or_else(|| NAMES.iter().position(|n| *n == name).map(|i| i as u32))
}

/// Circuit-breaking limits of one destination (DestinationRule `connectionPool`), per
/// waypoint instance and summed over its clients. Unset limits are unlimited, as Istio sets
/// them.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolLimits {
    /// HTTP/1.1 connections in use at once (`tcp.maxConnections`): one per request in flight.
    pub max_connections: u32,
    /// Requests waiting for a connection (`http.http1MaxPendingRequests`).
    pub max_pending: u32,
    /// Requests in flight at once (`http.http2MaxRequests`).
    pub max_requests: u32,
    /// Requests per upstream connection (`http.maxRequestsPerConnection`; 0: unlimited).
    pub max_requests_per_connection: u32,
    /// Opening an upstream connection (`tcp.connectTimeout`; Istio's default 10 s).
    pub connect_timeout: Duration,
    /// An upstream connection without requests is closed after (`http.idleTimeout`;
    /// Istio's default 1 h).
    pub idle_timeout: Duration,
    /// Retries in flight at once (`http.maxRetries`).
    pub max_retries: u32,
    /// `retryBudget`: retries in flight at most this share (percent) of the requests in
    /// flight, but always `min_concurrency`.
    pub budget: Option<(Percentage, u32)>,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            max_connections: u32::MAX,
            max_pending: u32::MAX,
            max_requests: u32::MAX,
            max_requests_per_connection: 0,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            max_retries: u32::MAX,
            budget: None,
        }
    }
}

/// Compiles `retryBudget` (Envoy's defaults: 20 %, at least 3) into `limits`.
pub fn retry_budget(
    b: &super::config::RetryBudgetSettings,
    limits: &mut PoolLimits,
    field: &str,
) -> Result<(), RouteError> {
    let percent = b.percent.map_or(20.0, |p| p.value);
    if !(0.0..=100.0).contains(&percent) {
        return Err(RouteError::new(
            format!("{field}.percent.value"),
            format!("{percent} is not within 0 and 100"),
        ));
    }
    limits.budget = Some((Percentage(percent), b.min_retry_concurrency.unwrap_or(3)));
    Ok(())
}

/// Compiles `connectionPool`; `field` is its path.
pub fn pool_limits(p: &ConnectionPoolSettings, field: &str) -> Result<PoolLimits, RouteError> {
    let mut limits = PoolLimits::default();
    let positive = |v: Option<u32>, at: &str| -> Result<Option<u32>, RouteError> {
        match v {
            Some(0) => Err(RouteError::new(
                format!("{field}.{at}"),
                "must be at least 1 (leave it out for no limit)",
            )),
            other => Ok(other),
        }
    };
    if let Some(tcp) = &p.tcp {
        if let Some(n) = positive(tcp.max_connections, "tcp.maxConnections")? {
            limits.max_connections = n;
        }
        if let Some(v) = &tcp.connect_timeout {
            limits.connect_timeout = nonzero(v, &format!("{field}.tcp.connectTimeout"))?;
        }
        for (value, at) in [
            (&tcp.idle_timeout, "tcp.idleTimeout"),
            (&tcp.max_connection_duration, "tcp.maxConnectionDuration"),
        ] {
            if let Some(v) = value {
                duration(v, &format!("{field}.{at}"))?;
            }
        }
    }
    if let Some(http) = &p.http {
        if let Some(n) = positive(
            http.http1_max_pending_requests,
            "http.http1MaxPendingRequests",
        )? {
            limits.max_pending = n;
        }
        if let Some(n) = positive(http.http2_max_requests, "http.http2MaxRequests")? {
            limits.max_requests = n;
        }
        limits.max_requests_per_connection = http.max_requests_per_connection.unwrap_or(0);
        if let Some(n) = http.max_retries {
            limits.max_retries = n;
        }
        if let Some(v) = &http.idle_timeout {
            limits.idle_timeout = nonzero(v, &format!("{field}.http.idleTimeout"))?;
        }
    }
    Ok(limits)
}

/// Outlier detection of one destination (DestinationRule `outlierDetection`), with Envoy's
/// defaults as Istio sets them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// Consecutive 5xx answers (and connection failures) that eject an endpoint; 0: never.
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 answers (and connection failures) that eject; 0: never.
    pub consecutive_gateway: u32,
    /// How often ejections are reviewed (an ejected endpoint returns at the first review
    /// after its ejection time).
    pub interval: Duration,
    /// Ejection time, multiplied by the times the endpoint was ejected.
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
    /// Below this share of healthy endpoints, ejections are ignored (panic mode).
    pub min_health_percent: u32,
}

/// Compiles `outlierDetection`; `field` is its path.
pub fn outlier_policy(
    o: &OutlierDetectionSettings,
    field: &str,
) -> Result<OutlierPolicy, RouteError> {
    let at = |f: &str| format!("{field}.{f}");
    let percent = |v: Option<u32>, f: &str, default: u32| match v {
        Some(p) if p > 100 => Err(RouteError::new(at(f), format!("{p} is over 100"))),
        Some(p) => Ok(p),
        None => Ok(default),
    };
    Ok(OutlierPolicy {
        consecutive_5xx: o
            .consecutive_5xx_errors
            .or(o.consecutive_errors)
            .unwrap_or(5),
        consecutive_gateway: o.consecutive_gateway_errors.unwrap_or(0),
        interval: match &o.interval {
            Some(v) => duration(v, &at("interval"))?.max(Duration::from_millis(1)),
            None => Duration::from_secs(10),
        },
        base_ejection: match &o.base_ejection_time {
            Some(v) => duration(v, &at("baseEjectionTime"))?.max(Duration::from_millis(1)),
            None => Duration::from_secs(30),
        },
        max_ejection_percent: percent(o.max_ejection_percent, "maxEjectionPercent", 10)?,
        min_health_percent: percent(o.min_health_percent, "minHealthPercent", 0)?,
    })
}

/// A duration as Istio and the Gateway API write them: `10s`, `0.5s`, `250ms`, `1m30s`,
/// `1h`; units h, m, s, ms, us (µs), ns.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration (e.g. 10s, 0.5s, 250ms, 1m30s)");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (number, tail) = rest.split_at(digits);
        let value: f64 = number.parse().map_err(|_| bad())?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let seconds = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        total += Duration::try_from_secs_f64(value * seconds).map_err(|_| bad())?;
        rest = next;
    }
    Ok(total)
}

fn duration(text: &str, field: &str) -> Result<Duration, RouteError> {
    parse_duration(text).map_err(|e| RouteError::new(field, e))
}

fn nonzero(text: &str, field: &str) -> Result<Duration, RouteError> {
    match duration(text, field)? {
        Duration::ZERO => Err(RouteError::new(field, "must be longer than 0s")),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_pools_compile_with_istios_defaults() {
        let pool: ConnectionPoolSettings = serde_yaml_ng::from_str(
            "tcp: {maxConnections: 4, connectTimeout: 250ms}\nhttp: {idleTimeout: 30s, maxRequestsPerConnection: 2, maxRetries: 0}",
        )
        .unwrap();
        let limits = pool_limits(&pool, "spec.trafficPolicy.connectionPool").unwrap();
        assert_eq!(limits.max_connections, 4);
        assert_eq!(limits.connect_timeout, Duration::from_millis(250));
        assert_eq!(limits.idle_timeout, Duration::from_secs(30));
        assert_eq!(limits.max_requests_per_connection, 2);
        assert_eq!(limits.max_retries, 0);
        let defaults = pool_limits(&ConnectionPoolSettings::default(), "x").unwrap();
        assert_eq!(defaults, PoolLimits::default());
        assert_eq!(defaults.connect_timeout, Duration::from_secs(10));
        assert_eq!(defaults.idle_timeout, Duration::from_secs(3600));
        let zero: ConnectionPoolSettings =
            serde_yaml_ng::from_str("tcp: {connectTimeout: 0s}").unwrap();
        let e = pool_limits(&zero, "spec.trafficPolicy.connectionPool").unwrap_err();
        assert!(
            e.to_string()
                .contains("spec.trafficPolicy.connectionPool.tcp.connectTimeout"),
            "{e}"
        );
    }

    #[test]
    fn durations_parse_in_istios_and_gateway_apis_forms() {
        for (text, ms) in [
            ("10s", 10_000),
            ("0.5s", 500),
            ("250ms", 250),
            ("1m30s", 90_000),
            ("1h", 3_600_000),
            ("1.5s", 1_500),
        ] {
            assert_eq!(
                parse_duration(text).unwrap(),
                Duration::from_millis(ms),
                "{text}"
            );
        }
        for bad in ["", "10", "s", "10x", "-1s", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn retry_conditions_follow_envoy() {
        let five = RetryOn::parse("5xx").unwrap();
        let response = |status| Outcome::Response { status, grpc: None };
        assert!(five.retries(response(503)) && five.retries(response(500)));
        assert!(!five.retries(response(404)) && !five.retries(response(200)));
        assert!(five.retries(Outcome::Reset) && five.retries(Outcome::ConnectFailure));
        let gateway = RetryOn::parse("gateway-error").unwrap();
        assert!(gateway.retries(response(502)) && !gateway.retries(response(500)));
        let codes = RetryOn::parse("retriable-status-codes,418").unwrap();
        assert!(codes.retries(response(418)) && !codes.retries(response(500)));
        assert!(
            RetryOn::parse("retriable-4xx")
                .unwrap()
                .retries(response(409))
        );
        let connect = RetryOn::parse("connect-failure").unwrap();
        assert!(connect.retries(Outcome::ConnectFailure) && !connect.retries(Outcome::Reset));
        let grpc = RetryOn::parse("unavailable,cancelled").unwrap();
        let with_grpc = |code| Outcome::Response {
            status: 200,
            grpc: Some(code),
        };
        assert!(grpc.retries(with_grpc(14)) && grpc.retries(with_grpc(1)));
        assert!(!grpc.retries(with_grpc(13)) && !grpc.retries(with_grpc(0)));
        assert!(RetryOn::parse("5xx,sometimes").is_err());
        assert!(RetryOn::parse("99").is_err());
    }

    #[test]
    fn istios_default_retries_connection_failures_twice_but_not_5xx() {
        let d = RetryPolicy::istio_default();
        assert_eq!(d.retries, 2);
        assert!(d.on.retries(Outcome::ConnectFailure) && d.on.retries(Outcome::RefusedStream));
        assert!(!d.on.retries(Outcome::Response {
            status: 503,
            grpc: None
        }));
        assert!(d.on.retries(Outcome::Response {
            status: 200,
            grpc: Some(14)
        }));
    }

    #[test]
    fn backoff_is_jittered_exponential_and_capped() {
        let p = RetryPolicy::istio_default();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        assert!((ms(p.backoff(1, 0.999_999)) - 25.0).abs() < 0.01);
        assert!((ms(p.backoff(2, 0.5)) - 25.0).abs() < 0.01);
        assert!((ms(p.backoff(10, 0.999_999)) - 250.0).abs() < 0.01);
        assert_eq!(p.backoff(1, 0.0), Duration::from_millis(1));
    }

    #[test]
    fn virtual_service_fields_compile_with_their_paths_in_errors() {
        let retries = VsRetries {
            attempts: Some(3),
            per_try_timeout: Some("0.2s".into()),
            retry_on: Some("5xx,gateway-error".into()),
            ..VsRetries::default()
        };
        let fault: VsFault = serde_json::from_value(serde_json::json!({
            "delay": {"fixedDelay": "1s", "percentage": {"value": 50}},
            "abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 0.5}}
        }))
        .unwrap();
        let r = from_virtual_service(Some("0.5s"), Some(&retries), Some(&fault), "spec.http[0]")
            .unwrap();
        assert_eq!(r.timeout, Some(Duration::from_millis(500)));
        assert_eq!(r.retry.retries, 3);
        assert_eq!(r.retry.per_try_timeout, Some(Duration::from_millis(200)));
        let f = r.fault.unwrap();
        assert_eq!(f.delay, Some((Duration::from_secs(1), Percentage(50.0))));
        assert_eq!(f.abort, Some((Abort::Grpc(14), Percentage(0.5))));
        let bad = VsRetries {
            retry_on: Some("5xx,often".into()),
            ..VsRetries::default()
        };
        let e = from_virtual_service(None, Some(&bad), None, "spec.http[1]").unwrap_err();
        assert_eq!(e.field, "spec.http[1].retries.retryOn");
        let e = from_virtual_service(Some("soon"), None, None, "spec.http[0]").unwrap_err();
        assert_eq!(e.field, "spec.http[0].timeout");
        assert!(Percentage(50.0).hits(0.49) && !Percentage(50.0).hits(0.5));
    }
}
