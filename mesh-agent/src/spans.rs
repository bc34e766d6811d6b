//! Distributed tracing at the L7 proxies: one span per request at the waypoint and at the
//! ingress gateway, exported over OTLP/HTTP.
//!
//! A request's trace context is taken from `traceparent` (W3C), else from B3 (`b3`, else
//! `x-b3-traceid` / `x-b3-spanid` / `x-b3-sampled`); the proxy's span is its child, and the
//! request goes upstream carrying the proxy's span as the parent, in both encodings (Envoy
//! propagates what its provider speaks; applications such as Bookinfo copy either). A request
//! with no context starts a trace. Sampling is parent-based, as Envoy's: a context that says
//! sampled or not is obeyed; a new trace is sampled at the configured percentage (Istio's
//! `sampling`, default 1 %). Unsampled requests still propagate a context (flag 0), so the
//! next proxy does not sample a trace whose beginning was dropped.
//!
//! The span carries Envoy's and Istio's tags (`http.url`, `http.method`, `http.status_code`,
//! `response_flags`, `upstream_cluster`, `guid:x-request-id`, `istio.canonical_service`,
//! `istio.namespace`, `istio.mesh_id`...) and the request's source and destination workload
//! and namespace, as its metrics label them. Spans are exported by one task in batches
//! (whatever is queued when the previous post ends, at most [`BATCH`]) as OTLP's JSON
//! encoding, which every OTLP/HTTP receiver accepts, to `ENDPOINT/v1/traces`; a full queue
//! ([`QUEUE`]) drops spans and counts them rather than slowing requests.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Spans waiting for export at most; more are dropped (and counted).
pub const QUEUE: usize = 4096;
/// Spans per export request at most.
pub const BATCH: usize = 512;
/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where spans go and how many traces are sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `http://HOST:PORT` (spans are posted to `/v1/traces` under it) or a full URL with a
    /// path.
    pub endpoint: String,
    /// Percentage of new traces sampled (0–100).
    pub sampling: f64,
}

/// A trace context: the trace and the span that is the parent of the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// Absent: no decision was propagated (B3 may leave it out).
    pub sampled: Option<bool>,
}

/// The context a request carries, if any: `traceparent`, else B3.
pub fn extract(headers: &HeaderMap) -> Option<Context> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(tp) = text("traceparent") {
        // version-traceid-parentid-flags; a version this code does not know is read as 00.
        let mut parts = tp.trim().split('-');
        let (_, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let flags = u8::from_str_radix(flags, 16).ok()?;
        return valid(hex_array(trace)?, hex_array(span)?, Some(flags & 1 == 1));
    }
    if let Some(b3) = text("b3") {
        // traceid-spanid[-sampled[-parentspanid]], or only the sampling decision.
        let parts: Vec<&str> = b3.trim().split('-').collect();
        if parts.len() >= 2 {
            return valid(
                b3_trace_id(parts[0])?,
                hex_array(parts[1])?,
                parts.get(2).and_then(|s| b3_sampled(s)),
            );
        }
        return None;
    }
    valid(
        b3_trace_id(text("x-b3-traceid")?)?,
        hex_array(text("x-b3-spanid")?)?,
        text("x-b3-sampled")
            .and_then(b3_sampled)
            .or_else(|| (text("x-b3-flags") == Some("1")).then_some(true)),
    )
}

/// All-zero ids are invalid in both encodings.
fn valid(trace_id: [u8; 16], span_id: [u8; 8], sampled: Option<bool>) -> Option<Context> {
    (trace_id != [0; 16] && span_id != [0; 8]).then_some(Context {
        trace_id,
        span_id,
        sampled,
    })
}

/// B3 trace ids are 64 or 128 bits; a 64-bit one is the low half.
fn b3_trace_id(s: &str) -> Option<[u8; 16]> {
    match s.len() {
        32 => hex_array(s),
        16 => {
            let low: [u8; 8] = hex_array(s)?;
            let mut id = [0; 16];
            id[8..].copy_from_slice(&low);
            Some(id)
        }
        _ => None,
    }
}

fn b3_sampled(s: &str) -> Option<bool> {
    match s {
        "1" | "true" | "d" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 * bytes.len());
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A request's span, from its arrival to the end of its response.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub sampled: bool,
    pub start: SystemTime,
}

/// The proxy's side of tracing: begins spans, queues finished ones for export.
pub struct Tracer {
    sampling: f64,
    queue: mpsc::Sender<Value>,
    dropped: AtomicU64,
    /// `service.name` and the proxy's Istio tags, for every span.
    resource: Value,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("sampling", &self.sampling)
            .finish_non_exhaustive()
    }
}

/// Who the proxy is, for the spans' resource.
#[derive(Debug, Clone)]
pub struct Proxy {
    /// Its canonical service (the Gateway's name).
    pub name: String,
    pub namespace: String,
    /// The mesh (trust domain).
    pub mesh_id: String,
}

impl Tracer {
    /// A tracer exporting to `config.endpoint`, from a task spawned on the current runtime.
    pub fn start(config: &Config, proxy: &Proxy) -> anyhow::Result<Arc<Tracer>> {
        let target = Target::parse(&config.endpoint)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let attribute = |k: &str, v: &str| json!({"key": k, "value": {"stringValue": v}});
        let tracer = Arc::new(Tracer {
            sampling: config.sampling.clamp(0.0, 100.0),
            queue: tx,
            dropped: AtomicU64::new(0),
            resource: json!({"attributes": [
                attribute("service.name", &format!("{}.{}", proxy.name, proxy.namespace)),
                attribute("istio.canonical_service", &proxy.name),
                attribute("istio.namespace", &proxy.namespace),
                attribute("istio.mesh_id", &proxy.mesh_id),
            ]}),
        });
        tokio::spawn(export_loop(target, rx, tracer.resource.clone()));
        Ok(tracer)
    }

    /// Begins the span of a request: its context is read from `headers`, and `headers` are
    /// rewritten to carry the new span as the parent upstream.
    pub fn begin(&self, headers: &mut HeaderMap) -> Span {
        let incoming = extract(headers);
        let sampled = incoming
            .and_then(|c| c.sampled)
            .unwrap_or_else(|| fastrand::f64() * 100.0 < self.sampling);
        let span = Span {
            trace_id: incoming.map_or_else(new_trace_id, |c| c.trace_id),
            span_id: new_span_id(),
            parent: incoming.map(|c| c.span_id),
            sampled,
            start: SystemTime::now(),
        };
        inject(headers, &span);
        span
    }

    /// Queues a finished span with its tags (`(key, value)`), if it is sampled.
    pub fn finish(&self, span: &Span, name: &str, error: bool, tags: &[(&str, String)]) {
        if !span.sampled {
            return;
        }
        let nanos = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
                .to_string()
        };
        let mut attributes: Vec<Value> = tags
            .iter()
            .map(|(k, v)| json!({"key": k, "value": {"stringValue": v}}))
            .collect();
        attributes.push(json!({"key": "component", "value": {"stringValue": "proxy"}}));
        if error {
            attributes.push(json!({"key": "error", "value": {"stringValue": "true"}}));
        }
        let mut value = json!({
            "traceId": hex(&span.trace_id),
            "spanId": hex(&span.span_id),
            "name": name,
            // CLIENT: the proxy sends the request on, as Envoy's outbound spans.
            "kind": 3,
            "startTimeUnixNano": nanos(span.start),
            "endTimeUnixNano": nanos(SystemTime::now()),
            "attributes": attributes,
            // ERROR or UNSET.
            "status": {"code": if error { 2 } else { 0 }},
        });
        if let Some(parent) = span.parent {
            value["parentSpanId"] = hex(&parent).into();
        }
        if self.queue.try_send(value).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(dropped, "trace export queue full: spans dropped");
            }
        }
    }

    /// Spans dropped because the export queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn new_trace_id() -> [u8; 16] {
    loop {
        let id = fastrand::u128(..).to_be_bytes();
        if id != [0; 16] {
            return id;
        }
    }
}

fn new_span_id() -> [u8; 8] {
    loop {
        let id = fastrand::u64(..).to_be_bytes();
        if id != [0; 8] {
            return id;
        }
    }
}

/// Writes `span` as the parent of the next hop: `traceparent`, and B3's headers (the single
/// `b3` header is replaced by the multi-header form).
fn inject(headers: &mut HeaderMap, span: &Span) {
    let (trace, id) = (hex(&span.trace_id), hex(&span.span_id));
    let sampled = if span.sampled { "1" } else { "0" };
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::try_from(value) {
            headers.insert(name, v);
        }
    };
    set("traceparent", format!("00-{trace}-{id}-0{sampled}"));
    set("x-b3-traceid", trace);
    set("x-b3-spanid", id);
    set("x-b3-sampled", sampled.to_owned());
    match span.parent {
        Some(parent) => set("x-b3-parentspanid", hex(&parent)),
        None => {
            headers.remove("x-b3-parentspanid");
        }
    }
    headers.remove("b3");
}

/// Where an OTLP/HTTP receiver listens.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
    path: String,
}

impl Target {
    fn parse(endpoint: &str) -> anyhow::Result<Target> {
        let rest = endpoint.strip_prefix("http://").ok_or_else(|| {
            anyhow::anyhow!("--otlp-endpoint {endpoint:?}: expected http://HOST:PORT[/PATH]")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) if i + 1 < rest.len() => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], "/v1/traces".to_owned()),
            None => (rest, "/v1/traces".to_owned()),
        };
        let uri: http::uri::Authority = authority
            .parse()
            .map_err(|e| anyhow::anyhow!("--otlp-endpoint {endpoint:?}: {e}"))?;
        Ok(Target {
            host: uri.host().trim_matches(['[', ']']).to_owned(),
            // OTLP/HTTP's port.
            port: uri.port_u16().unwrap_or(4318),
            path,
        })
    }
}

async fn export_loop(target: Target, mut rx: mpsc::Receiver<Value>, resource: Value) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut failures = 0u64;
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let body = json!({"resourceSpans": [{
            "resource": resource,
            "scopeSpans": [{
                "scope": {"name": "mesh-agent", "version": env!("CARGO_PKG_VERSION")},
                "spans": std::mem::take(&mut batch),
            }],
        }]});
        let posted = tokio::time::timeout(EXPORT_TIMEOUT, post(&target, body.to_string())).await;
        let error = match posted {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("timed out".to_owned()),
        };
        if let Some(error) = error {
            failures += 1;
            if failures.is_power_of_two() {
                tracing::warn!(failures, %error, endpoint = %format!("{}:{}{}", target.host, target.port, target.path), "trace export failed; spans dropped");
            }
        }
    }
}

/// POSTs one OTLP/HTTP JSON request on a new connection.
async fn post(target: &Target, body: String) -> anyhow::Result<()> {
    let addr: SocketAddr = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{} resolves to no address", target.host))?;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection's task ends with the export's deadline too: a receiver that never
    // answers does not keep a socket per batch.
    tokio::spawn(tokio::time::timeout(EXPORT_TIMEOUT, conn));
    let request = http::Request::post(&target.path)
        .header(
            http::header::HOST,
            format!("{}:{}", target.host, target.port),
        )
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let response = sender.send_request(request).await?;
    if !response.status().is_success() {
        anyhow::bail!("the receiver answered {}", response.status());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    #[test]
    fn traceparent_then_b3_single_then_b3_multi() {
        let w3c = extract(&headers(&[(
            "traceparent",
            &format!("00-{TRACE}-{SPAN}-01"),
        )]))
        .unwrap();
        assert_eq!(hex(&w3c.trace_id), TRACE);
        assert_eq!(hex(&w3c.span_id), SPAN);
        assert_eq!(w3c.sampled, Some(true));
        let single = extract(&headers(&[("b3", &format!("{TRACE}-{SPAN}-0"))])).unwrap();
        assert_eq!(
            (single.trace_id, single.sampled),
            (w3c.trace_id, Some(false))
        );
        let multi = extract(&headers(&[
            ("x-b3-traceid", &TRACE[16..]),
            ("x-b3-spanid", SPAN),
        ]))
        .unwrap();
        assert_eq!(
            hex(&multi.trace_id),
            format!("{}{}", "0".repeat(16), &TRACE[16..])
        );
        assert_eq!(multi.sampled, None);
        // traceparent wins over B3.
        let both = extract(&headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-00")),
            ("x-b3-traceid", "0000000000000001"),
            ("x-b3-spanid", "0000000000000002"),
        ]))
        .unwrap();
        assert_eq!(both.sampled, Some(false));
        assert_eq!(hex(&both.trace_id), TRACE);
    }

    #[test]
    fn malformed_or_zero_contexts_are_ignored() {
        for bad in [
            format!("00-{TRACE}-{SPAN}"),
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("00-{}-{SPAN}-01", &TRACE[1..]),
            format!("00-{TRACE}-{SPAN}-zz"),
        ] {
            assert_eq!(extract(&headers(&[("traceparent", &bad)])), None, "{bad}");
        }
        assert_eq!(extract(&HeaderMap::new()), None);
    }

    fn tracer(sampling: f64) -> (Tracer, mpsc::Receiver<Value>) {
        let (tx, rx) = mpsc::channel(4);
        let t = Tracer {
            sampling,
            queue: tx,
            dropped: AtomicU64::new(0),
            resource: Value::Null,
        };
        (t, rx)
    }

    #[test]
    fn a_span_continues_the_incoming_trace_and_is_the_parent_upstream() {
        let (t, mut rx) = tracer(0.0);
        let mut h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("b3", "x"),
        ]);
        let span = t.begin(&mut h);
        assert_eq!(hex(&span.trace_id), TRACE);
        assert_eq!(span.parent.map(|p| hex(&p)), Some(SPAN.to_owned()));
        assert!(span.sampled, "the parent's decision, not the 0 % rate");
        let upstream = extract(&h).unwrap();
        assert_eq!(upstream.span_id, span.span_id);
        assert_eq!(h["x-b3-spanid"], hex(&span.span_id).as_str());
        assert_eq!(h["x-b3-parentspanid"], SPAN);
        assert!(h.get("b3").is_none());
        t.finish(
            &span,
            "svc:80/*",
            false,
            &[("http.status_code", "200".into())],
        );
        let v = rx.try_recv().unwrap();
        assert_eq!(v["traceId"], TRACE);
        assert_eq!(v["parentSpanId"], SPAN);
        assert_eq!(v["spanId"], hex(&span.span_id));
        assert_eq!(v["attributes"][0]["key"], "http.status_code");
        assert_eq!(v["status"]["code"], 0);
    }

    #[test]
    fn new_traces_follow_the_rate_and_unsampled_ones_still_propagate() {
        let (never, mut rx) = tracer(0.0);
        let mut h = HeaderMap::new();
        let span = never.begin(&mut h);
        assert!(!span.sampled && span.parent.is_none());
        assert_eq!(extract(&h).unwrap().sampled, Some(false));
        never.finish(&span, "x", true, &[]);
        assert!(rx.try_recv().is_err(), "an unsampled span is not exported");
        let (always, _rx) = tracer(100.0);
        assert!(always.begin(&mut HeaderMap::new()).sampled);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (t, _rx) = tracer(100.0);
        let span = t.begin(&mut HeaderMap::new());
        for _ in 0..6 {
            t.finish(&span, "x", false, &[]);
        }
        assert_eq!(t.dropped(), 2);
    }

    #[test]
    fn endpoints() {
        let t = Target::parse("http://collector.observability:4318").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("collector.observability", 4318, "/v1/traces")
        );
        let t = Target::parse("http://[fd00::1]/otlp/v1/traces").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("fd00::1", 4318, "/otlp/v1/traces")
        );
        assert!(Target::parse("https://x:4318").is_err());
    }

    #[tokio::test]
    async fn spans_reach_a_receiver_as_otlp_json() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (got_tx, mut got) = mpsc::channel(1);
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let got_tx = got_tx.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        let body = http_body_util::BodyExt::collect(req.into_body())
                            .await
                            .unwrap()
                            .to_bytes();
                        let _ = got_tx.send((path, body)).await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::new(),
                        )))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        let config = Config {
            endpoint: format!("http://{addr}"),
            sampling: 100.0,
        };
        let proxy = Proxy {
            name: "waypoint".into(),
            namespace: "shop".into(),
            mesh_id: "cluster.local".into(),
        };
        let t = Tracer::start(&config, &proxy).unwrap();
        let span = t.begin(&mut HeaderMap::new());
        t.finish(
            &span,
            "web.shop.svc.cluster.local:80/*",
            true,
            &[("response_flags", "UF".into())],
        );
        let (path, body) = tokio::time::timeout(Duration::from_secs(5), got.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(path, "/v1/traces");
        let v: Value = serde_json::from_slice(&body).unwrap();
        let rs = &v["resourceSpans"][0];
        assert_eq!(
            rs["resource"]["attributes"][0]["value"]["stringValue"],
            "waypoint.shop"
        );
        let s = &rs["scopeSpans"][0]["spans"][0];
        assert_eq!(s["name"], "web.shop.svc.cluster.local:80/*");
        assert_eq!(s["traceId"], hex(&span.trace_id));
        assert_eq!(s["status"]["code"], 2);
        assert!(s.get("parentSpanId").is_none());
    }
}
