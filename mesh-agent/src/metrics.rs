//! Istio-compatible TCP metrics (`istio_tcp_*`) and the agent's own counters, kept with
//! `prometheus-client` and served in the OpenMetrics text format, so existing Kiali and
//! Grafana dashboards (and Prometheus) read them unchanged.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family},
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
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// The labels of one series. Unknown values are `"unknown"`, as in Istio.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_service: String,
    /// SPIFFE identities, `unknown` when not authenticated.
    pub source_principal: String,
    pub destination_principal: String,
    /// `mutual_tls` for HBONE (or the agent's own same-node path), `none` for plaintext.
    pub connection_security_policy: String,
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
    /// Same-node connections by datapath: the sk_msg redirect, or splice(2).
    same_node: Family<DatapathLabels, Counter>,
    /// Bytes of redirected connections the agent forwarded itself (sent before the
    /// redirect started).
    redirect_forwarded: Counter,
    /// HBONE connections closed before their handshake because too many were in progress.
    handshakes_refused: Counter,
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
        for datapath in ["sockmap", "splice"] {
            let _ = same_node.get_or_create(&DatapathLabels { datapath });
        }
        registry.register(
            "mesh_agent_redirect_forwarded_bytes",
            "Bytes of redirected same-node connections the agent forwarded itself.",
            redirect_forwarded.clone(),
        );
        registry.register(
            "mesh_agent_hbone_handshakes_refused",
            "HBONE connections closed before their handshake: too many in progress.",
            handshakes_refused.clone(),
        );
        registry.register(
            "mesh_agent_connections_denied",
            "Connections refused before reaching the application.",
            denied.clone(),
        );
        Metrics {
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

impl Metrics {
    pub fn connection_opened(&self, labels: &ConnectionLabels) {
        self.opened.get_or_create(labels).inc();
    }

    /// Records a closed connection with its request (`received`) and response (`sent`) bytes.
    pub fn connection_closed(&self, labels: &ConnectionLabels, received: u64, sent: u64) {
        self.closed.get_or_create(labels).inc();
        self.received.get_or_create(labels).inc_by(received);
        self.sent.get_or_create(labels).inc_by(sent);
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

    /// A same-node connection went through the sk_msg redirect (`true`) or splice(2).
    pub fn same_node_datapath(&self, sockmap: bool) {
        let datapath = if sockmap { "sockmap" } else { "splice" };
        self.same_node
            .get_or_create(&DatapathLabels { datapath })
            .inc();
    }

    /// A redirected connection ended; the agent forwarded `bytes` of it itself.
    pub fn redirect_forwarded(&self, bytes: u64) {
        self.redirect_forwarded.inc_by(bytes);
    }

    /// An HBONE connection was closed unanswered: too many handshakes in progress.
    pub fn handshake_refused(&self) {
        self.handshakes_refused.inc();
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

    fn labels() -> ConnectionLabels {
        ConnectionLabels {
            reporter: Reporter::Source,
            source_workload: "client".into(),
            source_workload_namespace: "shop".into(),
            destination_workload: "web".into(),
            destination_workload_namespace: "shop".into(),
            destination_service: "unknown".into(),
            source_principal: "spiffe://cluster.local/ns/shop/sa/client".into(),
            destination_principal: "unknown".into(),
            connection_security_policy: "mutual_tls".into(),
        }
    }

    #[test]
    fn counters_accumulate_per_label_set_in_the_text_exposition() {
        let m = Metrics::default();
        m.connection_opened(&labels());
        m.connection_opened(&labels());
        m.connection_closed(&labels(), 100, 7);
        let text = m.render();
        let l = r#"{reporter="source",source_workload="client",source_workload_namespace="shop",destination_workload="web",destination_workload_namespace="shop",destination_service="unknown",source_principal="spiffe://cluster.local/ns/shop/sa/client",destination_principal="unknown",connection_security_policy="mutual_tls"}"#;
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
            text.contains("mesh_agent_same_node_connections_total{datapath=\"splice\"} 0"),
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
