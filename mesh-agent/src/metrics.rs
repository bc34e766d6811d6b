//! Istio-compatible TCP metrics (`istio_tcp_*`) and the agent's own counters, kept with
//! `prometheus-client` and served in the OpenMetrics text format, so existing Kiali and
//! Grafana dashboards (and Prometheus) read them unchanged.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which side of a connection reports it (Istio's `reporter` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reporter {
    Source,
    Destination,
    Waypoint,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
            Reporter::Waypoint => "waypoint",
        }
    }
}

/// The labels of one request series, as Istio's proxies report them (Kiali and Istio's
/// Grafana dashboards group by these). Unknown values are `"unknown"`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_cluster: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_cluster: String,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// The `grpc-status` of a gRPC response; `-` otherwise.
    pub grpc_response_status: String,
    /// Envoy's flags (`-`, `NR`, `UH`, `UF`, `URX`, ...).
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// Envoy's default histogram buckets (milliseconds), which Istio's duration metric uses.
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's size buckets (bytes): 1 to 10^8, by powers of ten.
const SIZE_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS)
}

type HistogramFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// The series of one request label set ([`Metrics::request_handles`]).
#[derive(Debug, Clone)]
pub struct RequestHandles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl RequestHandles {
    /// One finished request.
    pub fn record(&self, record: &RequestRecord) {
        self.requests.inc();
        self.duration.observe(record.duration_ms);
        self.request_bytes.observe(record.request_bytes as f64);
        self.response_bytes.observe(record.response_bytes as f64);
    }
}

/// One finished request, for [`RequestHandles::record`].
pub struct RequestRecord {
    pub duration_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// Istio's canonical service of a workload: label `service.istio.io/canonical-name`, else
/// `app.kubernetes.io/name`, else `app`, else the workload name.
pub fn canonical_service(w: &crate::state::Workload) -> String {
    [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .iter()
    .find_map(|k| w.labels.get(k))
    .map(str::to_owned)
    .unwrap_or_else(|| w.workload_name.clone())
}

/// Istio's canonical revision: `service.istio.io/canonical-revision`, else
/// `app.kubernetes.io/version`, else `version`, else `latest`.
pub fn canonical_revision(w: &crate::state::Workload) -> String {
    [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .iter()
    .find_map(|k| w.labels.get(k))
    .map(str::to_owned)
    .unwrap_or_else(|| "latest".to_owned())
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// The labels of one TCP series: Istio's, every one Kiali's graph and Istio's Grafana
/// dashboards group by. Unknown values are `"unknown"`, as in Istio.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    /// SPIFFE identities, `unknown` when not authenticated.
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_cluster: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    /// `name.namespace.svc.cluster.local`.
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_cluster: String,
    /// Always `tcp`.
    pub request_protocol: &'static str,
    /// `-`: a TCP connection carries none of Envoy's flags here.
    pub response_flags: &'static str,
    /// `mutual_tls` for HBONE (or the agent's own same-node path), `none` for plaintext.
    pub connection_security_policy: String,
}

/// The cluster name Istio's proxies report when none is configured.
pub const CLUSTER: &str = "Kubernetes";

impl ConnectionLabels {
    /// The labels of a connection from `src` to `dst` (either may be outside the mesh:
    /// `None`), to `service` when known (named by its host, its name and namespace), with the
    /// peers' identities when authenticated. The app, version and canonical names come from
    /// the pods' labels as Istio reads them.
    pub fn new(
        reporter: Reporter,
        src: Option<&crate::state::Workload>,
        dst: Option<&crate::state::Workload>,
        service: Option<&crate::state::Service>,
        principals: (Option<String>, Option<String>),
        mutual_tls: bool,
    ) -> Self {
        let unknown = || "unknown".to_owned();
        let label = |w: Option<&crate::state::Workload>, key: &str| {
            w.and_then(|w| w.labels.get(key).map(str::to_owned))
                .unwrap_or_else(unknown)
        };

        ConnectionLabels {
            reporter,
            source_workload: src.map_or_else(unknown, |w| w.workload_name.clone()),
            source_workload_namespace: src.map_or_else(unknown, |w| w.namespace.clone()),
            source_principal: principals.0.unwrap_or_else(unknown),
            source_app: label(src, "app"),
            source_version: label(src, "version"),
            source_canonical_service: src.map_or_else(unknown, canonical_service),
            source_canonical_revision: src.map_or_else(unknown, canonical_revision),
            source_cluster: CLUSTER.to_owned(),
            destination_workload: dst.map_or_else(unknown, |w| w.workload_name.clone()),
            destination_workload_namespace: dst.map_or_else(unknown, |w| w.namespace.clone()),
            destination_principal: principals.1.unwrap_or_else(unknown),
            destination_app: label(dst, "app"),
            destination_version: label(dst, "version"),
            destination_service: service.map_or_else(unknown, crate::state::Service::fqdn),
            destination_service_name: service.map_or_else(unknown, |s| s.name.clone()),
            destination_service_namespace: service.map_or_else(unknown, |s| s.namespace.clone()),
            destination_canonical_service: dst.map_or_else(unknown, canonical_service),
            destination_canonical_revision: dst.map_or_else(unknown, canonical_revision),
            destination_cluster: CLUSTER.to_owned(),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: if mutual_tls { "mutual_tls" } else { "none" }.to_owned(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DeniedLabels {
    destination_workload: String,
    destination_workload_namespace: String,
    reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DatapathLabels {
    datapath: &'static str,
}

/// The labels of ztunnel's DNS series: the question's type, the transport, and the asking
/// pod's canonical service and revision.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DnsLabels {
    request_query_type: String,
    request_protocol: &'static str,
    source_canonical_service: String,
    source_canonical_revision: String,
}

impl DnsLabels {
    /// A query of type `qtype` (`None`: not one plain query) from `source`.
    pub fn new(qtype: Option<u16>, tcp: bool, source: &crate::state::Workload) -> Self {
        let request_query_type = match qtype {
            None => "unknown".to_owned(),
            Some(t) => match t {
                1 => "a",
                2 => "ns",
                5 => "cname",
                6 => "soa",
                12 => "ptr",
                15 => "mx",
                16 => "txt",
                28 => "aaaa",
                33 => "srv",
                65 => "https",
                _ => return Self::other(t, tcp, source),
            }
            .to_owned(),
        };
        DnsLabels {
            request_query_type,
            request_protocol: if tcp { "tcp" } else { "udp" },
            source_canonical_service: canonical_service(source),
            source_canonical_revision: canonical_revision(source),
        }
    }

    fn other(qtype: u16, tcp: bool, source: &crate::state::Workload) -> Self {
        DnsLabels {
            request_query_type: format!("type{qtype}"),
            ..Self::new(None, tcp, source)
        }
    }
}

/// ztunnel's DNS series, by [`DnsLabels`].
#[derive(Debug)]
struct DnsSeries {
    requests: Family<DnsLabels, Counter>,
    forwarded: Family<DnsLabels, Counter>,
    failures: Family<DnsLabels, Counter>,
    duration: Family<DnsLabels, Histogram, fn() -> Histogram>,
}

fn dns_duration_histogram() -> Histogram {
    // ztunnel's buckets, in seconds.
    Histogram::new([0.0005, 0.001, 0.01, 0.1, 1.0, 5.0])
}

impl DnsSeries {
    fn register(registry: &mut Registry) -> Self {
        let series = DnsSeries {
            requests: Family::default(),
            forwarded: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(dns_duration_histogram),
        };
        registry.register(
            "istio_dns_requests",
            "DNS requests from enrolled pods.",
            series.requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_requests",
            "DNS requests forwarded to the server the pod asked.",
            series.forwarded.clone(),
        );
        registry.register(
            "istio_dns_upstream_failures",
            "Forwarded DNS requests that got no answer.",
            series.failures.clone(),
        );
        registry.register_with_unit(
            "istio_dns_upstream_request_duration",
            "Time to get a forwarded DNS request's answer from its server.",
            prometheus_client::registry::Unit::Seconds,
            series.duration.clone(),
        );
        series
    }
}

/// Every series of this agent, and the registry that serves them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    opened: Family<ConnectionLabels, Counter>,
    closed: Family<ConnectionLabels, Counter>,
    /// Bytes from the destination back to the source (Istio: "sent during response").
    sent: Family<ConnectionLabels, Counter>,
    /// Bytes from the source to the destination (Istio: "received during request").
    received: Family<ConnectionLabels, Counter>,
    denied: Family<DeniedLabels, Counter>,
    /// Same-node connections by datapath: past the agent by the sk_msg redirect
    /// ("sockmap"), or pumped by the agent ("agent").
    same_node: Family<DatapathLabels, Counter>,
    /// Bytes of redirected connections the agent forwarded itself (sent before the
    /// redirect started).
    redirect_forwarded: Counter,
    /// HBONE connections closed before their handshake because too many were in progress.
    handshakes_refused: Counter,
    requests: Family<RequestLabels, Counter>,
    /// Upstream attempts a waypoint made after the first, by its retry policies.
    retries: Counter,
    /// Endpoints a waypoint's outlier detection ejected.
    ejections: Counter,
    /// Requests a waypoint's circuit breakers turned away (`UO`).
    overflows: Counter,
    request_duration: HistogramFamily,
    request_bytes: HistogramFamily,
    response_bytes: HistogramFamily,
    dns: DnsSeries,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let opened = Family::<ConnectionLabels, Counter>::default();
        let closed = Family::<ConnectionLabels, Counter>::default();
        let sent = Family::<ConnectionLabels, Counter>::default();
        let received = Family::<ConnectionLabels, Counter>::default();
        let denied = Family::<DeniedLabels, Counter>::default();
        let same_node = Family::<DatapathLabels, Counter>::default();
        let redirect_forwarded = Counter::default();
        let handshakes_refused = Counter::default();
        registry.register(
            "istio_tcp_connections_opened",
            "Total TCP connections opened.",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "Total TCP connections closed.",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent during response (destination to source).",
            sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received during request (source to destination).",
            received.clone(),
        );
        registry.register(
            "mesh_agent_same_node_connections",
            "Same-node connections by the kernel mechanism that moved their bytes.",
            same_node.clone(),
        );
        // Both datapaths are always shown, at zero until used.
        for datapath in ["sockmap", "agent"] {
            let _ = same_node.get_or_create(&DatapathLabels { datapath });
        }
        registry.register(
            "mesh_agent_redirect_forwarded_bytes",
            "Bytes of redirected same-node connections the agent forwarded itself.",
            redirect_forwarded.clone(),
        );
        registry.register(
            "mesh_agent_hbone_handshakes_refused",
            "TLS connections (HBONE, and an ingress gateway's HTTPS) closed before their handshake: too many in progress.",
            handshakes_refused.clone(),
        );
        registry.register(
            "mesh_agent_connections_denied",
            "Connections refused before reaching the application.",
            denied.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration: HistogramFamily = Family::new_with_constructor(duration_histogram);
        let request_bytes: HistogramFamily = Family::new_with_constructor(size_histogram);
        let response_bytes: HistogramFamily = Family::new_with_constructor(size_histogram);
        registry.register("istio_requests", "Total requests.", requests.clone());
        let retries = Counter::default();
        let ejections = Counter::default();
        let overflows = Counter::default();
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration, milliseconds.",
            request_duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request sizes, bytes.",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response sizes, bytes.",
            response_bytes.clone(),
        );
        let dns = DnsSeries::register(&mut registry);
        Metrics {
            dns,
            requests,
            retries,
            ejections,
            overflows,
            request_duration,
            request_bytes,
            response_bytes,
            registry,
            opened,
            closed,
            sent,
            received,
            denied,
            same_node,
            redirect_forwarded,
            handshakes_refused,
        }
    }
}

/// One connection's byte counters (`istio_tcp_received_bytes_total`: request bytes, from
/// source to destination; `istio_tcp_sent_bytes_total`: response bytes), shared with its
/// series.
#[derive(Debug, Clone, Default)]
pub struct ByteCounters {
    pub received: Counter,
    pub sent: Counter,
}

impl ByteCounters {
    /// Adds bytes that were not counted as they moved.
    pub fn add(&self, received: u64, sent: u64) {
        self.received.inc_by(received);
        self.sent.inc_by(sent);
    }
}

impl Metrics {
    /// A waypoint's metrics: the node agent's, and the series only a waypoint has.
    pub fn waypoint() -> Self {
        let mut m = Self::default();
        m.registry.register(
            "mesh_waypoint_upstream_retries",
            "Upstream attempts made after the first by a route's retry policy.",
            m.retries.clone(),
        );
        m.registry.register(
            "mesh_waypoint_outlier_ejections",
            "Endpoints ejected by a DestinationRule's outlier detection.",
            m.ejections.clone(),
        );
        m.registry.register(
            "mesh_waypoint_upstream_overflows",
            "Requests a DestinationRule's circuit breaker turned away (response flag UO).",
            m.overflows.clone(),
        );
        m
    }

    /// Counts an opened connection; the counters its bytes go to, taken now so that they are
    /// added as they move (a scrape sees a long connection's throughput, as ztunnel
    /// reports it, not only its total once it closed).
    pub fn connection_opened(&self, labels: &ConnectionLabels) -> ByteCounters {
        self.opened.get_or_create(labels).inc();
        ByteCounters {
            received: self.received.get_or_create(labels).clone(),
            sent: self.sent.get_or_create(labels).clone(),
        }
    }

    /// Counts a closed connection (its bytes went to its [`ByteCounters`]).
    pub fn connection_closed(&self, labels: &ConnectionLabels) {
        self.closed.get_or_create(labels).inc();
    }

    /// A connection refused before any byte reached the application, with the reason.
    pub fn connection_denied(&self, destination: &crate::state::Workload, reason: &'static str) {
        self.denied
            .get_or_create(&DeniedLabels {
                destination_workload: destination.workload_name.clone(),
                destination_workload_namespace: destination.namespace.clone(),
                reason,
            })
            .inc();
    }

    /// A same-node connection went past the agent by the sk_msg redirect (`true`) or
    /// through the agent's pump.
    pub fn same_node_datapath(&self, sockmap: bool) {
        let datapath = if sockmap { "sockmap" } else { "agent" };
        self.same_node
            .get_or_create(&DatapathLabels { datapath })
            .inc();
    }

    /// A redirected connection ended; the agent forwarded `bytes` of it itself.
    pub fn redirect_forwarded(&self, bytes: u64) {
        self.redirect_forwarded.inc_by(bytes);
    }

    /// An HBONE connection was closed unanswered: too many handshakes in progress.
    /// A DNS query a pod's resolver received.
    pub fn dns_request(&self, labels: &DnsLabels) {
        self.dns.requests.get_or_create(labels).inc();
    }

    /// A DNS query forwarded to its server, and how it ended after `elapsed`.
    pub fn dns_forwarded(&self, labels: &DnsLabels, elapsed: std::time::Duration, answered: bool) {
        self.dns.forwarded.get_or_create(labels).inc();
        if answered {
            self.dns
                .duration
                .get_or_create(labels)
                .observe(elapsed.as_secs_f64());
        } else {
            self.dns.failures.get_or_create(labels).inc();
        }
    }

    pub fn handshake_refused(&self) {
        self.handshakes_refused.inc();
    }

    /// A waypoint retried a request upstream.
    pub fn retry(&self) {
        self.retries.inc();
    }

    /// A waypoint's outlier detection ejected an endpoint.
    pub fn ejection(&self) {
        self.ejections.inc();
    }

    /// A waypoint's circuit breaker turned a request away.
    pub fn overflow(&self) {
        self.overflows.inc();
    }

    /// The series of one label set, to record requests into without looking them up again.
    pub fn request_handles(&self, labels: &RequestLabels) -> RequestHandles {
        RequestHandles {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.request_duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        }
    }

    /// The OpenMetrics text exposition of every series ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String does not fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, labels: &[(&str, &str)]) -> crate::state::Workload {
        crate::state::Workload {
            uid: name.into(),
            name: format!("{name}-0"),
            namespace: "shop".into(),
            node: None,
            service_account: name.into(),
            ips: vec![],
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            workload_name: name.into(),
            netns: None,
            captured: true,
            host_network: false,
            dns_capture: None,
            waypoint: None,
        }
    }

    fn labels() -> ConnectionLabels {
        ConnectionLabels::new(
            Reporter::Source,
            Some(&workload("client", &[("app", "client")])),
            Some(&workload("web", &[("app", "web"), ("version", "v2")])),
            Some(&crate::state::Service {
                name: "web".into(),
                namespace: "shop".into(),
                ..Default::default()
            }),
            (
                Some("spiffe://cluster.local/ns/shop/sa/client".into()),
                None,
            ),
            true,
        )
    }

    #[test]
    fn counters_accumulate_per_label_set_in_the_text_exposition() {
        let m = Metrics::default();
        m.connection_opened(&labels());
        let bytes = m.connection_opened(&labels());
        bytes.add(60, 7);
        // Counted while the connection is open.
        assert!(m.render().contains(" 60\n"), "{}", m.render());
        bytes.received.inc_by(40);
        m.connection_closed(&labels());
        let text = m.render();
        let l = concat!(
            r#"{reporter="source",source_workload="client",source_workload_namespace="shop","#,
            r#"source_principal="spiffe://cluster.local/ns/shop/sa/client",source_app="client","#,
            r#"source_version="unknown",source_canonical_service="client","#,
            r#"source_canonical_revision="latest",source_cluster="Kubernetes","#,
            r#"destination_workload="web",destination_workload_namespace="shop","#,
            r#"destination_principal="unknown",destination_app="web",destination_version="v2","#,
            r#"destination_service="web.shop.svc.cluster.local",destination_service_name="web","#,
            r#"destination_service_namespace="shop",destination_canonical_service="web","#,
            r#"destination_canonical_revision="v2",destination_cluster="Kubernetes","#,
            r#"request_protocol="tcp",response_flags="-",connection_security_policy="mutual_tls"}"#
        );
        for (series, value) in [
            ("istio_tcp_connections_opened_total", 2),
            ("istio_tcp_connections_closed_total", 1),
            ("istio_tcp_received_bytes_total", 100),
            ("istio_tcp_sent_bytes_total", 7),
        ] {
            assert!(text.contains(&format!("{series}{l} {value}\n")), "{text}");
        }
        assert!(
            text.contains("# TYPE istio_tcp_sent_bytes counter"),
            "{text}"
        );
        assert!(
            text.contains("mesh_agent_same_node_connections_total{datapath=\"agent\"} 0"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::default();
        let mut l = labels();
        l.source_workload = "a\"b\\c".into();
        m.connection_opened(&l);
        assert!(
            m.render().contains(r#"source_workload="a\"b\\c""#),
            "{}",
            m.render()
        );
    }
}
