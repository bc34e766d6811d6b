//! One tunnel at the waypoint: HTTP served per request, or bytes carried to an endpoint.
//!
//! A request goes through, in order: `x-request-id` (generated when absent); authorization
//! by the policies targeting this waypoint, its class or the service (403 `RBAC: access
//! denied`); routing (404 when HTTPRoutes are attached and none matches; redirects and
//! direct responses answered here); the backend by weight (500 when the weights add up to
//! 0 or the backend does not exist); injected faults (delay, abort); the backend's ready
//! endpoints by subset (503 `no healthy upstream` when there is none); the request's filters
//! and rewrites; mirrors ([`super::mirror`]); then [`super::forward`] sends it under the
//! route's timeout, retries, circuit breaker and outlier detection. Its metrics and
//! access-log line are recorded when the response body ends (or is abandoned), so streamed
//! bodies are measured whole.

use std::{
    borrow::Cow,
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::{
    Destination, TunnelContext, access_log,
    cluster::ClusterKey,
    fault,
    flags::Flags,
    forward::{self, Forwarded, Head},
    mirror,
    replay::{MAX_REPLAY, Replay},
    upstream::HashInputs,
};
use crate::{
    identity::Identity,
    l7::{
        resilience::{Abort, PoolLimits, Resilience},
        routes::{
            self, Action, Backend, ClusterPolicy, LoadBalancer, RequestView, Rule, Selection,
        },
    },
    metrics::{ConnectionLabels, Reporter, RequestHandles, RequestLabels, RequestRecord},
    proxy::hbone::io::TunnelIo,
    rbac,
    state::{MeshState, Service, ServicePort, Workload},
};

/// How long an HTTP/1.1 client has to send a request head (also the idle keep-alive
/// timeout of a tunnel's HTTP/1.1 connection).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The body of a response to the client.
pub type ResponseBody = BoxBody<Bytes, BodyError>;

/// Why a response body ended early.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// One tunnel the waypoint serves.
pub struct Tunnel {
    pub ctx: TunnelContext,
    /// The `CONNECT` authority.
    pub target: SocketAddr,
    pub destination: Destination,
    /// The metric handles of this tunnel's requests by what varies between them: the
    /// labels are built and hashed once per kind of outcome, not once per request.
    pub handles: std::sync::Mutex<HashMap<HandleKey, Arc<RequestHandles>>>,
}

/// What distinguishes the label sets of one tunnel's requests: the state they were judged
/// in (by address), the backend service (by index), the endpoint, the outcome.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct HandleKey {
    state: usize,
    service: Option<usize>,
    endpoint: Option<std::net::IpAddr>,
    code: u16,
    flags: Flags,
    grpc_status: Option<String>,
}

/// Entries kept per tunnel before the cache starts over (states change, endpoints move).
const MAX_HANDLES: usize = 64;

/// Serves HTTP/1.1 or HTTP/2 (detected) on the tunnel (or a gateway's connection) until it
/// ends.
pub async fn serve_http<I>(tunnel: Arc<Tunnel>, io: I)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let tunnel = tunnel.clone();
        async move { Ok::<_, Infallible>(handle(tunnel, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A client that holds a tunnel open without sending a request head (slowloris, or an
    // idle keep-alive connection) is closed after this long.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    if let Err(e) = builder.serve_connection(TokioIo::new(io), service).await {
        tracing::debug!(error = %e, "waypoint: HTTP connection ended");
    }
}

/// Carries a TCP tunnel's bytes to an endpoint, under the waypoint's L4 policy.
pub async fn serve_tcp(tunnel: Arc<Tunnel>, mut io: TunnelIo) {
    let wp = &tunnel.ctx.waypoint;
    let state = wp.state.borrow().clone();
    let conn = rbac::Connection::new(tunnel.ctx.peer, tunnel.target, tunnel.ctx.client.as_ref());
    let decision = state
        .policies()
        .authorization()
        .evaluate_targeted(&wp.targets(&tunnel.destination), &conn);
    if !decision.allowed {
        let (from, to) = (tunnel.ctx.peer, tunnel.target);
        tracing::info!(target: "access", direction = "waypoint", src.addr = %from, dst.addr = %to, "waypoint: connection denied: {decision}");
        return;
    }
    let (endpoint, workload, service) = match &tunnel.destination {
        Destination::Service { service, port } => {
            let endpoints = state.endpoints(service, port);
            if endpoints.is_empty() {
                tracing::info!(dst.addr = %tunnel.target, "waypoint: no ready endpoint");
                return;
            }
            let inputs = HashInputs {
                headers: &HeaderMap::new(),
                query: None,
                source: tunnel.ctx.peer.ip(),
            };
            let endpoint = wp
                .upstreams
                .choose(endpoints, &LoadBalancer::LeastRequest, &inputs);
            (endpoint, state.workload_by_ip(endpoint.ip()), Some(service))
        }
        Destination::Workload { workload, .. } => (tunnel.target, Some(workload), None),
        // Gateways serve HTTP only.
        Destination::Gateway { .. } => return,
    };
    let Some(peer) = workload.map(|w| Identity::of(&wp.settings.trust_domain, w)) else {
        tracing::info!(%endpoint, "waypoint: endpoint is not a mesh workload");
        return;
    };
    let labels = ConnectionLabels::new(
        Reporter::Waypoint,
        state.workload_by_ip(tunnel.ctx.peer.ip()),
        workload,
        service,
        (
            tunnel.ctx.client.as_ref().map(ToString::to_string),
            Some(peer.to_string()),
        ),
        true,
    );
    let bytes = wp.metrics.connection_opened(&labels);
    let _active = wp.upstreams.start(endpoint);
    let (mut sent, mut received) = (0, 0);
    let hop = super::upstream::Peer::direct(endpoint, peer.clone());
    match wp.upstreams.open_tunnel(endpoint, &hop).await {
        Ok(mut upstream) => match tokio::io::copy_bidirectional(&mut io, &mut upstream).await {
            Ok((up, down)) => (received, sent) = (up, down),
            Err(e) => tracing::debug!(%endpoint, error = %e, "waypoint: TCP tunnel ended"),
        },
        Err(e) => tracing::info!(%endpoint, error = %e, "waypoint: cannot reach the endpoint"),
    }
    bytes.add(received, sent);
    wp.metrics.connection_closed(&labels);
}

/// What is known of a request for its metrics and log line.
struct Record {
    tunnel: Arc<Tunnel>,
    state: Arc<MeshState>,
    start: Instant,
    method: String,
    path: String,
    version: http::Version,
    grpc: bool,
    authority: String,
    request_id: String,
    user_agent: String,
    request_bytes: Arc<AtomicU64>,
    /// The backend service, by index in the state (else the tunnel's own).
    service: Option<usize>,
    /// The backend service's port, when the route or the tunnel names one.
    service_port: Option<u16>,
    upstream: Option<SocketAddr>,
    route: String,
    /// The AUDIT policy that matched.
    audit: Option<Arc<str>>,
    /// Flags raised before the outcome (faults injected).
    flags: Flags,
    /// When the request arrived, for the access log.
    start_wall: std::time::SystemTime,
    forwarded_for: String,
    /// The request's span (its context is what the request carries upstream).
    span: Option<crate::spans::Span>,
}

impl Record {
    /// The record of a request as it arrives (an `x-request-id` added when it has none),
    /// and the authority it names.
    fn start(
        tunnel: &Arc<Tunnel>,
        state: &Arc<MeshState>,
        parts: &mut http::request::Parts,
    ) -> (Record, String) {
        if !parts.headers.contains_key("x-request-id") {
            parts.headers.insert(
                "x-request-id",
                HeaderValue::from_str(&request_id()).expect("hex"),
            );
        }
        let span = tunnel
            .ctx
            .waypoint
            .tracer
            .as_ref()
            .map(|t| t.begin(&mut parts.headers));
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| parts.uri.authority().map(|a| a.to_string()))
            .unwrap_or_else(|| tunnel.target.to_string());
        let grpc = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let record = Record {
            tunnel: tunnel.clone(),
            state: state.clone(),
            start: Instant::now(),
            method: parts.method.to_string(),
            path: record_path(&parts.uri),
            version: parts.version,
            grpc,
            authority: host.clone(),
            request_id: header_text(&parts.headers, "x-request-id"),
            user_agent: header_text(&parts.headers, "user-agent"),
            request_bytes: Arc::new(AtomicU64::new(0)),
            service: tunnel
                .destination
                .service()
                .and_then(|s| state.service_position(s)),
            service_port: None,
            upstream: None,
            route: "-".into(),
            audit: None,
            flags: Flags::NONE,
            start_wall: std::time::SystemTime::now(),
            forwarded_for: header_text(&parts.headers, "x-forwarded-for"),
            span,
        };
        (record, host)
    }
}

async fn handle(tunnel: Arc<Tunnel>, req: Request<Incoming>) -> Response<ResponseBody> {
    let wp = tunnel.ctx.waypoint.clone();
    let state = wp.state.borrow().clone();
    let (mut parts, body) = req.into_parts();
    let (mut record, host) = Record::start(&tunnel, &state, &mut parts);
    let request_bytes = record.request_bytes.clone();

    // Authorization, on the client's identity and the request.
    let decision = {
        let view = rbac::Request {
            method: parts.method.as_str(),
            host: &host,
            path: parts.uri.path(),
            headers: &parts.headers,
        };
        let conn =
            rbac::Connection::new(tunnel.ctx.peer, tunnel.target, tunnel.ctx.client.as_ref())
                .with_request(&view);
        state
            .policies()
            .authorization()
            .evaluate_targeted(&wp.targets(&tunnel.destination), &conn)
    };
    record.audit = decision.audit.clone();
    if !decision.allowed {
        record.route = decision.to_string();
        return local_reply(
            &wp,
            record,
            StatusCode::FORBIDDEN,
            Flags::NONE,
            "RBAC: access denied",
        );
    }

    // The route, and what it says to do.
    let (service, service_port) = match &tunnel.destination {
        Destination::Service { service, port } => (Some(service), Some(port)),
        Destination::Workload { .. } | Destination::Gateway { .. } => (None, None),
    };
    let view = RequestView {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        host: &host,
        scheme: match tunnel.destination {
            Destination::Gateway { tls: true, .. } => "https",
            _ => "http",
        },
        port: tunnel.target.port(),
        headers: &parts.headers,
        client_namespace: tunnel.ctx.client.as_ref().map(|c| c.namespace.as_str()),
    };
    let selection = match (&tunnel.destination, service) {
        (_, Some(svc)) => state.routes().select(svc, &view),
        // At an ingress gateway: the first gateway on this port that takes the host.
        (Destination::Gateway { port, .. }, _) => {
            let listeners = crate::gateway::listeners(&wp, &state, *port);
            match listeners.iter().find(|(_, l)| l.admits(&host)) {
                Some((gateway, listener)) => {
                    state.routes().select_gateway(gateway, listener, &view)
                }
                None => Selection::NotFound,
            }
        }
        _ => Selection::Default,
    };
    if let Destination::Gateway { tls, .. } = tunnel.destination {
        forwarded_headers(&mut parts.headers, tunnel.ctx.peer.ip(), tls);
    }
    let (rule, matched_prefix) = match selection {
        Selection::NotFound => {
            return local_reply(&wp, record, StatusCode::NOT_FOUND, Flags::NR, "");
        }
        Selection::Default => (None, None),
        Selection::Rule {
            rule,
            matched_prefix,
        } => (Some(rule.clone()), matched_prefix.map(str::to_owned)),
    };
    if let Some(rule) = &rule {
        record.route = rule.origin.clone();
        match &rule.action {
            Action::Redirect(r) => {
                let location = redirect_location(
                    r,
                    &host,
                    &parts.uri,
                    matched_prefix.as_deref(),
                    tunnel.target.port(),
                );
                let mut response = Response::new(empty());
                *response.status_mut() =
                    StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
                if let Ok(v) = HeaderValue::from_str(&location) {
                    response.headers_mut().insert(header::LOCATION, v);
                }
                rule.response_headers.apply(response.headers_mut());
                return finish_local(&wp, record, response, Flags::NONE);
            }
            Action::Direct { status, body } => {
                let mut response = Response::new(full(body.clone()));
                *response.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
                rule.response_headers.apply(response.headers_mut());
                return finish_local(&wp, record, response, Flags::NONE);
            }
            Action::Forward(_) => {}
        }
        rule.request_headers.apply(&mut parts.headers);
    }

    // Faults, after the route matched and before any upstream (Envoy's fault filter).
    let resilience: &Resilience = match &rule {
        Some(r) => &r.resilience,
        None => default_resilience(),
    };
    if let Some(fault) = &resilience.fault {
        let injected = fault::inject(fault, fastrand::f64).await;
        record.flags |= injected.flags;
        if let Some(abort) = injected.abort {
            return fault_abort(&wp, record, abort);
        }
    }

    // The backend and the endpoints it may go to.
    let target = match choose_target(&tunnel, &state, rule.as_deref(), service, service_port) {
        Ok(t) => t,
        Err((status, flags, body)) => return local_reply(&wp, record, status, flags, body),
    };
    if let Some(backend) = target.backend.as_ref() {
        backend.request_headers.apply(&mut parts.headers);
    }
    if let Some(s) = target.service {
        record.service = state.service_position(s);
    }
    record.service_port = target
        .backend
        .and_then(|b| b.port)
        .or(service_port.map(|p| p.port));

    // The request as the endpoint gets it.
    let h2 = parts.version == http::Version::HTTP_2;
    let head = match upstream_head(parts, rule.as_deref(), matched_prefix.as_deref(), &host) {
        Some(head) => head,
        None => {
            return local_reply(
                &wp,
                record,
                StatusCode::BAD_REQUEST,
                Flags::NONE,
                "bad request",
            );
        }
    };
    let replay = Replay::new(
        Counted {
            inner: body,
            bytes: request_bytes,
        }
        .boxed(),
        MAX_REPLAY,
    );
    if let Some(rule) = &rule {
        for m in &rule.mirrors {
            mirror::spawn(&wp, &state, m, &head, tunnel.target.port(), &replay);
        }
    }
    let cluster = target.policy.as_ref().map(|(policy, key)| {
        wp.clusters.get(
            key.clone(),
            policy.pool.as_ref().unwrap_or(&PoolLimits::default()),
        )
    });
    let plan = forward::Plan {
        candidates: target.candidates,
        lb: target.lb,
        resilience,
        h2,
        cluster,
        outlier: target.policy.and_then(|(p, _)| p.outlier.as_ref()),
    };

    // Sent under the route's timeout and retries.
    let transport = forward::Hbone {
        wp: &wp,
        state: &state,
        source: tunnel.ctx.peer.ip(),
    };
    let forwarded = forward::forward(&transport, plan, head, replay).await;
    respond(&wp, record, rule.as_deref(), target.backend, forwarded)
}

/// The client's response to what forwarding came to: the endpoint's, with the route's and
/// the backend's response headers, recorded when its body ends; or a local reply.
fn respond(
    wp: &Arc<super::Waypoint>,
    mut record: Record,
    rule: Option<&Rule>,
    backend: Option<&Backend>,
    forwarded: forward::Hboned,
) -> Response<ResponseBody> {
    match forwarded {
        Forwarded::Response {
            response,
            endpoint,
            active,
            admission,
            flags,
            deadline,
            ..
        } => {
            record.upstream = Some(endpoint);
            record.flags |= flags;
            let (mut parts, body) = response.into_parts();
            if let Some(rule) = rule {
                rule.response_headers.apply(&mut parts.headers);
            }
            if let Some(b) = backend {
                b.response_headers.apply(&mut parts.headers);
            }
            strip_hop_by_hop(&mut parts.headers);
            let status = parts.status.as_u16();
            let grpc_status = parts
                .headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let wp = wp.clone();
            let observed = Observed {
                inner: Some(body),
                bytes: 0,
                grpc_status,
                deadline: deadline.map(|at| Deadline { at, timer: None }),
                done: Some(Box::new(move |bytes, grpc_status, flags| {
                    drop(active);
                    drop(admission);
                    record_request(&wp, record, status, grpc_status, flags, bytes);
                })),
            };
            Response::from_parts(parts, observed.boxed())
        }
        Forwarded::Failed {
            status,
            flags,
            body,
            endpoint,
            ..
        } => {
            record.upstream = endpoint;
            if let Some(suppressed) = crate::log_limit::once_per_interval!() {
                tracing::info!(upstream = ?endpoint, %status, %flags, suppressed, "waypoint: upstream request failed");
            }
            local_reply(wp, record, status, flags, body)
        }
    }
}

/// The request as the endpoint gets it: the route's rewrite applied, hop-by-hop headers
/// gone, the authority in `Host` (HTTP/1.1) or the URI (HTTP/2). `None`: no valid URI.
fn upstream_head(
    mut parts: http::request::Parts,
    rule: Option<&Rule>,
    matched_prefix: Option<&str>,
    host: &str,
) -> Option<Head> {
    let mut path = record_path(&parts.uri);
    let mut authority = host.to_owned();
    if let Some(rewrite) = rule.and_then(|r| r.rewrite.as_ref()) {
        if let Some(p) = &rewrite.path {
            let rewritten = routes::rewrite_path(parts.uri.path(), p, matched_prefix);
            path = match parts.uri.query() {
                Some(q) => format!("{rewritten}?{q}"),
                None => rewritten,
            };
        }
        if let Some(h) = &rewrite.host {
            authority = h.clone();
        }
    }
    let h2 = parts.version == http::Version::HTTP_2;
    if let Ok(v) = HeaderValue::from_str(&authority) {
        parts.headers.insert(header::HOST, v);
    }
    strip_hop_by_hop(&mut parts.headers);
    let uri = if h2 {
        format!("http://{authority}{path}")
    } else {
        path
    };
    parts.uri = uri.parse().ok()?;
    if h2 {
        parts.headers.remove(header::HOST);
    }
    Some(Head {
        method: parts.method,
        uri: parts.uri,
        version: parts.version,
        headers: parts.headers,
    })
}

/// The resilience of a request without a route rule: Istio's defaults.
fn default_resilience() -> &'static Resilience {
    static DEFAULT: std::sync::OnceLock<Resilience> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(Resilience::default)
}

/// An injected abort: the HTTP status, or for gRPC an HTTP 200 carrying the gRPC status
/// (trailers-only), as Envoy's fault filter answers.
fn fault_abort(wp: &super::Waypoint, record: Record, abort: Abort) -> Response<ResponseBody> {
    const BODY: &str = "fault filter abort";
    match abort {
        Abort::Http(status) => local_reply(
            wp,
            record,
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Flags::NONE,
            BODY,
        ),
        Abort::Grpc(code) => {
            let mut response = Response::new(empty());
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", HeaderValue::from(code));
            headers.insert("grpc-message", HeaderValue::from_static(BODY));
            record_request(wp, record, 200, Some(code.to_string()), Flags::NONE, 0);
            response
        }
    }
}

/// Where a request may go: the ready endpoints of its backend (subset applied), the load
/// balancer among them, and what they belong to.
struct Target<'a> {
    candidates: Cow<'a, [SocketAddr]>,
    lb: LoadBalancer,
    service: Option<&'a Service>,
    backend: Option<&'a Backend>,
    /// The DestinationRule's policy for this destination, and the destination's key.
    policy: Option<(&'a ClusterPolicy, ClusterKey)>,
}

pub(super) type Failure = (StatusCode, Flags, &'static str);

fn choose_target<'a>(
    tunnel: &Tunnel,
    state: &'a MeshState,
    rule: Option<&'a Rule>,
    service: Option<&'a Service>,
    service_port: Option<&'a ServicePort>,
) -> Result<Target<'a>, Failure> {
    // A workload address: that pod, as it is.
    if matches!(tunnel.destination, Destination::Workload { .. }) {
        return Ok(Target {
            candidates: Cow::Owned(vec![tunnel.target]),
            lb: LoadBalancer::default(),
            service: None,
            backend: None,
            policy: None,
        });
    }
    let no_healthy = (
        StatusCode::SERVICE_UNAVAILABLE,
        Flags::NC,
        "no healthy upstream",
    );
    let backend = match rule {
        Some(r) if matches!(r.action, Action::Forward(_)) => match r.pick() {
            Some(b) => Some(b),
            // No backend, or weights adding up to 0 (Gateway API: 500).
            None => return Err((StatusCode::INTERNAL_SERVER_ERROR, Flags::NR, "")),
        },
        _ => None,
    };
    let gateway_api = rule.is_some_and(|r| r.gateway_api);
    let (svc, port) = match (backend, service, service_port) {
        (None, Some(service), Some(port)) => (service, port),
        // At a gateway, only a route's backend.
        (None, _, _) => return Err((StatusCode::SERVICE_UNAVAILABLE, Flags::NR, "no route")),
        (Some(b), _, _) => {
            let Some(svc) = state.service(&b.namespace, &b.name) else {
                return Err(if gateway_api {
                    (StatusCode::INTERNAL_SERVER_ERROR, Flags::NR, "")
                } else {
                    no_healthy
                });
            };
            // The backend's port, else the one the request came to, else the service's
            // only port (Istio lets a VirtualService leave it out then).
            let tcp = || svc.ports.iter().filter(|p| p.protocol == "TCP");
            let found = match b.port.or(service_port.map(|p| p.port)) {
                Some(wanted) => tcp().find(|p| p.port == wanted),
                None if tcp().count() == 1 => tcp().next(),
                None => None,
            };
            let Some(port) = found else {
                return Err(no_healthy);
            };
            (svc, port)
        }
    };
    // An ingress gateway sends the traffic of a service that asks for it through the
    // service's waypoint, to the service address: the waypoint routes it and applies its
    // policies.
    if matches!(tunnel.destination, Destination::Gateway { .. })
        && svc.ingress_use_waypoint
        && let Some(vip) = svc.vips.first()
        && svc
            .waypoint
            .as_ref()
            .and_then(|r| state.waypoint(r))
            .is_some_and(|w| !w.addresses.is_empty())
    {
        return Ok(Target {
            candidates: Cow::Owned(vec![SocketAddr::new(*vip, port.port)]),
            lb: LoadBalancer::default(),
            service: Some(svc),
            backend,
            policy: None,
        });
    }
    let subset = backend.and_then(|b| b.subset.as_deref());
    let (candidates, destination) = endpoints(state, svc, port, subset)?;
    let policy = destination.map(|d| d.policy(subset));
    Ok(Target {
        candidates,
        lb: policy.map(|p| p.lb.clone()).unwrap_or_default(),
        service: Some(svc),
        backend,
        policy: policy
            .filter(|p| p.pool.is_some() || p.outlier.is_some())
            .map(|p| {
                let key = (
                    svc.namespace.clone(),
                    svc.name.clone(),
                    port.port,
                    subset.map(str::to_owned),
                );
                (p, key)
            }),
    })
}

/// The endpoints of a destination and its DestinationRule, if any.
pub(super) type Endpoints<'a> = (Cow<'a, [SocketAddr]>, Option<&'a Arc<routes::Destination>>);

/// The ready endpoints of a service port, narrowed to a DestinationRule subset, and the
/// service's DestinationRule.
pub(super) fn endpoints<'a>(
    state: &'a MeshState,
    svc: &'a Service,
    port: &ServicePort,
    subset: Option<&str>,
) -> Result<Endpoints<'a>, Failure> {
    let no_healthy = (
        StatusCode::SERVICE_UNAVAILABLE,
        Flags::NC,
        "no healthy upstream",
    );
    let destination = state.routes().destination(&svc.namespace, &svc.name);
    let subset_labels = match (subset, destination) {
        (None, _) => None,
        (Some(name), Some(d)) => match d.subsets.get(name) {
            Some(labels) => Some(labels),
            None => return Err(no_healthy),
        },
        (Some(_), None) => return Err(no_healthy),
    };
    let all = state.endpoints(svc, port);
    let candidates: Cow<'a, [SocketAddr]> = match subset_labels {
        None => Cow::Borrowed(all),
        Some(labels) => Cow::Owned(
            all.iter()
                .copied()
                .filter(|e| {
                    state
                        .workload_by_ip(e.ip())
                        .is_some_and(|w| labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                })
                .collect(),
        ),
    };
    if candidates.is_empty() {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            Flags::UH,
            "no healthy upstream",
        ));
    }
    Ok((candidates, destination))
}

/// What an ingress gateway adds for the backends, as Envoy does at the edge: the client's
/// address appended to `x-forwarded-for`, and `x-forwarded-proto`.
fn forwarded_headers(headers: &mut HeaderMap, client: std::net::IpAddr, tls: bool) {
    let forwarded = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {client}"),
        None => client.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.insert("x-forwarded-for", v);
    }
    // The edge sets it: what the client sent is not trusted.
    headers.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
}

/// The `Location` of a redirect.
fn redirect_location(
    r: &routes::Redirect,
    host: &str,
    uri: &http::Uri,
    matched_prefix: Option<&str>,
    listener_port: u16,
) -> String {
    let scheme = r.scheme.clone().unwrap_or_else(|| "http".into());
    let (req_host, req_port) = split_host_port(host);
    let hostname = r.host.clone().unwrap_or_else(|| req_host.to_owned());
    let port = if r.gateway_api {
        // Gateway API: an explicit port; else the scheme's well-known port when a scheme is
        // given; else the listener's (the service port).
        Some(r.port.unwrap_or(match r.scheme.as_deref() {
            Some("http") => 80,
            Some("https") => 443,
            _ => listener_port,
        }))
    } else {
        r.port.or(req_port)
    };
    let port = match (scheme.as_str(), port) {
        ("http", Some(80)) | ("https", Some(443)) | (_, None) => String::new(),
        (_, Some(p)) => format!(":{p}"),
    };
    let path = match &r.path {
        Some(p) => routes::rewrite_path(uri.path(), p, matched_prefix),
        None => uri.path().to_owned(),
    };
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    format!("{scheme}://{hostname}{port}{path}{query}")
}

/// `host:port` split; a bare IPv6 address has no port.
fn split_host_port(host: &str) -> (&str, Option<u16>) {
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (host, None),
        },
        _ => (host, None),
    }
}

fn record_path(uri: &http::Uri) -> String {
    uri.path_and_query()
        .map_or_else(|| "/".into(), |p| p.to_string())
}

/// Headers that belong to one connection, not to the request.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in [
        header::CONNECTION,
        header::UPGRADE,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
}

fn header_text(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

/// A random x-request-id in UUID form.
fn request_id() -> String {
    let v = fastrand::u128(..);
    let h = format!("{v:032x}");
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn empty() -> ResponseBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn full(body: Bytes) -> ResponseBody {
    Full::new(body).map_err(|never| match never {}).boxed()
}

/// A response made here (not by an endpoint), recorded at once.
fn local_reply(
    wp: &super::Waypoint,
    record: Record,
    status: StatusCode,
    flags: Flags,
    body: &str,
) -> Response<ResponseBody> {
    let mut response = Response::new(full(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    if !body.is_empty() {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    finish_local(wp, record, response, flags)
}

fn finish_local(
    wp: &super::Waypoint,
    record: Record,
    response: Response<ResponseBody>,
    flags: Flags,
) -> Response<ResponseBody> {
    let bytes = response.body().size_hint().exact().unwrap_or(0);
    record_request(wp, record, response.status().as_u16(), None, flags, bytes);
    response
}

fn record_request(
    wp: &super::Waypoint,
    record: Record,
    status: u16,
    grpc_status: Option<String>,
    flags: Flags,
    response_bytes: u64,
) {
    let flags = record.flags | flags;
    let duration = record.start.elapsed();
    let request_bytes = record.request_bytes.load(Ordering::Relaxed);
    let key = HandleKey {
        state: Arc::as_ptr(&record.state) as usize,
        service: record.service,
        endpoint: record.upstream.map(|u| u.ip()),
        code: status,
        flags,
        grpc_status: if record.grpc { grpc_status } else { None },
    };
    if let (Some(tracer), Some(span)) = (&wp.tracer, &record.span)
        && span.sampled
    {
        let sizes = (request_bytes, response_bytes);
        finish_span(tracer, span, &record, &key, flags, sizes);
    }
    let handles = {
        let mut cache = record.tunnel.handles.lock().expect("handles lock");
        match cache.get(&key) {
            Some(h) => h.clone(),
            None => {
                let h = Arc::new(wp.metrics.request_handles(&labels(&record, &key)));
                if cache.len() >= MAX_HANDLES {
                    cache.clear();
                }
                cache.insert(key, h.clone());
                h
            }
        }
    };
    handles.record(&RequestRecord {
        duration_ms: duration.as_secs_f64() * 1000.0,
        request_bytes,
        response_bytes,
    });
    let identity = record
        .tunnel
        .ctx
        .client
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let upstream_cluster = upstream_host(&record);
    wp.access_log.log(&access_log::Entry {
        start: record.start_wall,
        method: &record.method,
        path: &record.path,
        protocol: protocol_name(record.version),
        response_code: status,
        response_flags: flags.as_str(),
        response_code_details: if record.upstream.is_some() && flags == Flags::NONE {
            "via_upstream"
        } else {
            ""
        },
        bytes_received: request_bytes,
        bytes_sent: response_bytes,
        duration,
        x_forwarded_for: &record.forwarded_for,
        user_agent: &record.user_agent,
        request_id: &record.request_id,
        authority: &record.authority,
        upstream_host: record.upstream,
        upstream_cluster: &upstream_cluster,
        downstream_local_address: record.tunnel.target,
        downstream_remote_address: record.tunnel.ctx.peer,
        route_name: &record.route,
        downstream_peer_identity: &identity,
        audit: record.audit.as_deref(),
    });
}

/// The backend service's host name (`name.namespace.svc.cluster.local`), or empty.
fn upstream_host(record: &Record) -> String {
    record
        .service
        .and_then(|i| record.state.services.get(i))
        .map(Service::fqdn)
        .unwrap_or_default()
}

/// Exports the request's span with Envoy's tags, and the workloads on both sides as the
/// metrics label them.
fn finish_span(
    tracer: &crate::spans::Tracer,
    span: &crate::spans::Span,
    record: &Record,
    key: &HandleKey,
    flags: Flags,
    (request_bytes, response_bytes): (u64, u64),
) {
    let status = key.code;
    let upstream = upstream_host(record);
    let l = labels(record, key);
    let port = record
        .service_port
        .or(record.upstream.map(|u| u.port()))
        .unwrap_or(record.tunnel.target.port());
    let name = if upstream.is_empty() {
        format!("{}/*", record.authority)
    } else {
        format!("{upstream}:{port}/*")
    };
    let cluster = format!("outbound|{port}||{upstream}");
    let tags = [
        ("guid:x-request-id", record.request_id.clone()),
        (
            "http.url",
            format!("http://{}{}", record.authority, record.path),
        ),
        ("http.method", record.method.clone()),
        ("http.protocol", protocol_name(record.version).to_owned()),
        ("http.status_code", status.to_string()),
        ("response_flags", flags.as_str().to_owned()),
        ("request_size", request_bytes.to_string()),
        ("response_size", response_bytes.to_string()),
        ("user_agent", record.user_agent.clone()),
        ("peer.address", record.tunnel.ctx.peer.ip().to_string()),
        ("upstream_cluster", cluster.clone()),
        ("upstream_cluster.name", cluster),
        (
            "upstream.address",
            record.upstream.map_or("-".into(), |u| u.to_string()),
        ),
        ("source_workload", l.source_workload),
        ("source_namespace", l.source_workload_namespace),
        ("destination_workload", l.destination_workload),
        ("destination_namespace", l.destination_workload_namespace),
        ("destination_service", l.destination_service),
    ];
    tracer.finish(span, &name, status >= 500, &tags);
}

/// `%PROTOCOL%` as Envoy writes it.
fn protocol_name(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// The request's label set (Istio's), built on a cache miss.
fn labels(record: &Record, key: &HandleKey) -> RequestLabels {
    let unknown = || "unknown".to_owned();
    let state = &record.state;
    let tunnel = &record.tunnel;
    let label = |w: Option<&Workload>, key: &str| {
        w.and_then(|w| w.labels.get(key).map(str::to_owned))
            .unwrap_or_else(unknown)
    };
    let gateway = matches!(tunnel.destination, Destination::Gateway { .. });
    let wp = &tunnel.ctx.waypoint;
    // At a gateway, the source is the gateway itself (Istio's gateways report as the
    // source of the requests they send into the mesh).
    let source = if gateway {
        state
            .workload_by_ip(tunnel.ctx.local)
            .or(Some(&wp.upstreams.me().workload))
    } else {
        state.workload_by_ip(tunnel.ctx.peer.ip())
    };
    // The endpoint's workload; for a workload address without one, the tunnel's.
    let destination =
        key.endpoint
            .and_then(|ip| state.workload_by_ip(ip))
            .or(match &tunnel.destination {
                Destination::Workload { workload, .. } => Some(workload),
                Destination::Service { .. } | Destination::Gateway { .. } => None,
            });
    let service = key
        .service
        .and_then(|i| state.services.get(i))
        .or_else(|| tunnel.destination.service());
    let td = &tunnel.ctx.waypoint.settings.trust_domain;
    RequestLabels {
        reporter: if gateway {
            Reporter::Source
        } else {
            Reporter::Waypoint
        },
        source_workload: source.map_or_else(unknown, |w| w.workload_name.clone()),
        source_workload_namespace: source.map_or_else(unknown, |w| w.namespace.clone()),
        source_principal: if gateway {
            wp.identity.to_string()
        } else {
            tunnel
                .ctx
                .client
                .as_ref()
                .map_or_else(unknown, ToString::to_string)
        },
        source_app: label(source, "app"),
        source_version: label(source, "version"),
        source_canonical_service: source.map_or_else(unknown, crate::metrics::canonical_service),
        source_canonical_revision: source.map_or_else(unknown, crate::metrics::canonical_revision),
        source_cluster: crate::metrics::CLUSTER.into(),
        destination_workload: destination.map_or_else(unknown, |w| w.workload_name.clone()),
        destination_workload_namespace: destination.map_or_else(unknown, |w| w.namespace.clone()),
        destination_principal: destination
            .map_or_else(unknown, |w| Identity::of(td, w).to_string()),
        destination_app: label(destination, "app"),
        destination_version: label(destination, "version"),
        destination_service: service.map_or_else(unknown, Service::fqdn),
        destination_service_name: service.map_or_else(unknown, |s| s.name.clone()),
        destination_service_namespace: service.map_or_else(unknown, |s| s.namespace.clone()),
        destination_canonical_service: destination
            .map_or_else(unknown, crate::metrics::canonical_service),
        destination_canonical_revision: destination
            .map_or_else(unknown, crate::metrics::canonical_revision),
        destination_cluster: crate::metrics::CLUSTER.into(),
        request_protocol: if record.grpc { "grpc" } else { "http" },
        response_code: key.code,
        grpc_response_status: key.grpc_status.clone().unwrap_or_else(|| "-".into()),
        response_flags: key.flags.as_str(),
        connection_security_policy: "mutual_tls",
    }
}

/// A request body that counts its bytes.
struct Counted {
    inner: Incoming,
    bytes: Arc<AtomicU64>,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame
            && let Some(d) = f.data_ref()
        {
            self.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Called with the bytes, the gRPC status and the flags of how the body ended: none, `DC`
/// (cut or dropped before its end) or `UT` (the route's timeout expired during it).
type Done = Box<dyn FnOnce(u64, Option<String>, Flags) + Send + Sync>;

/// A response body that counts its bytes, reads the gRPC status from its trailers, and calls
/// `done` once when it ends or is dropped (complete or not).
struct Observed {
    /// Dropped as soon as its last frame is read: an HTTP/1.1 connection returns to the pool
    /// only once its response body is read past its end or dropped, and the server that
    /// sends this body on stops polling it at its last frame.
    inner: Option<Incoming>,
    bytes: u64,
    grpc_status: Option<String>,
    /// The route's timeout, which covers the response to its end (Envoy's route timeout).
    deadline: Option<Deadline>,
    done: Option<Done>,
}

/// When a response body is cut. Checked against the clock at every frame; a timer is set
/// only once the body makes the reader wait, so the many responses that arrive whole never
/// touch the timer wheel.
struct Deadline {
    at: tokio::time::Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Deadline {
    fn passed(&self) -> bool {
        tokio::time::Instant::now() >= self.at
    }

    /// Arms the timer (once) so that a body that stalls is woken at the deadline; whether
    /// it already fired.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> bool {
        let at = self.at;
        self.timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)))
            .as_mut()
            .poll(cx)
            .is_ready()
    }
}

impl Observed {
    fn finish(&mut self, flags: Flags) {
        if let Some(done) = self.done.take() {
            done(self.bytes, self.grpc_status.take(), flags);
        }
    }

    /// Ends the body at the route's timeout: the rest is not read, the request is
    /// recorded with UT, and the client sees the stream fail.
    fn cut(&mut self) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.deadline = None;
        self.inner = None;
        self.finish(Flags::UT);
        Poll::Ready(Some(Err("upstream request timeout".into())))
    }
}

impl Body for Observed {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.inner.is_none() {
            return Poll::Ready(None);
        }
        // The route's timeout cuts a body that is still coming, whether it streams on
        // (the clock, at every frame) or stalls (the timer, once it makes us wait).
        if self.deadline.as_ref().is_some_and(Deadline::passed) {
            return self.cut();
        }
        let Some(inner) = &mut self.inner else {
            return Poll::Ready(None);
        };
        let frame = match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if self.deadline.as_mut().is_some_and(|d| d.poll_timer(cx)) {
                    return self.cut();
                }
                return Poll::Pending;
            }
        };
        let frame = frame.map(|f| f.map_err(BodyError::from));
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                } else if let Some(t) = f.trailers_ref()
                    && let Some(s) = t.get("grpc-status").and_then(|v| v.to_str().ok())
                {
                    self.grpc_status = Some(s.to_owned());
                }
                if self.inner.as_ref().is_some_and(Body::is_end_stream) {
                    self.inner = None;
                    self.finish(Flags::NONE);
                }
            }
            None => {
                self.inner = None;
                self.finish(Flags::NONE);
            }
            Some(Err(_)) => self.finish(Flags::DC),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        let flags = if self.is_end_stream() {
            Flags::NONE
        } else {
            Flags::DC
        };
        self.finish(flags);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l7::routes::{PathRewrite, Redirect};

    fn redirect(
        scheme: Option<&str>,
        host: Option<&str>,
        port: Option<u16>,
        path: Option<PathRewrite>,
        gateway_api: bool,
    ) -> Redirect {
        Redirect {
            scheme: scheme.map(Into::into),
            host: host.map(Into::into),
            port,
            path,
            status: 302,
            gateway_api,
        }
    }

    #[test]
    fn redirect_locations_follow_gateway_api_and_istio() {
        let uri: http::Uri = "/original/x?q=1".parse().unwrap();
        let cases = [
            (
                redirect(Some("https"), None, None, None, true),
                "https://echo/original/x?q=1",
            ),
            (
                redirect(None, Some("example.org"), None, None, true),
                "http://example.org/original/x?q=1",
            ),
            (
                redirect(None, None, Some(8083), None, true),
                "http://echo:8083/original/x?q=1",
            ),
            (
                redirect(Some("https"), None, Some(8443), None, true),
                "https://echo:8443/original/x?q=1",
            ),
            (
                redirect(
                    None,
                    None,
                    None,
                    Some(PathRewrite::Full("/full".into())),
                    true,
                ),
                "http://echo/full?q=1",
            ),
            (
                redirect(
                    None,
                    None,
                    None,
                    Some(PathRewrite::Prefix("/new".into())),
                    true,
                ),
                "http://echo/new/x?q=1",
            ),
            (
                redirect(None, Some("other"), None, None, false),
                "http://other:8080/original/x?q=1",
            ),
        ];
        for (r, want) in cases {
            assert_eq!(
                redirect_location(&r, "echo:8080", &uri, Some("/original"), 80),
                want,
                "{r:?}"
            );
        }
    }

    #[test]
    fn request_ids_look_like_uuids_and_differ() {
        let (a, b) = (request_id(), request_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(
            a.split('-').map(str::len).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
    }
}
