//! Istio-compatible TCP metrics (`istio_tcp_*`) kept per label set and rendered in the
//! Prometheus text format, so existing Kiali and Grafana dashboards read them unchanged.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

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

/// The labels of one series. Unknown values are `"unknown"`, as in Istio.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
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

impl ConnectionLabels {
    fn render(&self, out: &mut String) {
        let pairs = [
            ("reporter", self.reporter.as_str()),
            ("source_workload", &self.source_workload),
            ("source_workload_namespace", &self.source_workload_namespace),
            ("destination_workload", &self.destination_workload),
            (
                "destination_workload_namespace",
                &self.destination_workload_namespace,
            ),
            ("destination_service", &self.destination_service),
            ("source_principal", &self.source_principal),
            ("destination_principal", &self.destination_principal),
            (
                "connection_security_policy",
                &self.connection_security_policy,
            ),
        ];
        out.push('{');
        for (i, (k, v)) in pairs.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape(v));
        }
        out.push('}');
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    opened: u64,
    closed: u64,
    /// Bytes from the destination back to the source (Istio: "sent during response").
    sent: u64,
    /// Bytes from the source to the destination (Istio: "received during request").
    received: u64,
}

/// All series of this agent.
#[derive(Debug, Default)]
pub struct Metrics {
    series: Mutex<BTreeMap<ConnectionLabels, Counters>>,
    denied: Mutex<BTreeMap<(String, String, &'static str), u64>>,
    /// Same-node connections by datapath: the sk_msg redirect, or splice(2).
    sockmap: AtomicU64,
    splice: AtomicU64,
    /// Bytes of redirected connections the agent forwarded itself (sent before the
    /// redirect started).
    redirect_forwarded: AtomicU64,
    /// HBONE connections closed before their handshake because too many were in progress.
    handshakes_refused: AtomicU64,
}

impl Metrics {
    pub fn connection_opened(&self, labels: &ConnectionLabels) {
        self.update(labels, |c| c.opened += 1);
    }

    /// Records a closed connection with its request (`received`) and response (`sent`) bytes.
    pub fn connection_closed(&self, labels: &ConnectionLabels, received: u64, sent: u64) {
        self.update(labels, |c| {
            c.closed += 1;
            c.received += received;
            c.sent += sent;
        });
    }

    /// Updates the counters of a series, creating it (one copy of the labels) only the
    /// first time: every connection passes here twice.
    fn update(&self, labels: &ConnectionLabels, f: impl FnOnce(&mut Counters)) {
        let mut series = self.series.lock().expect("metrics lock");
        match series.get_mut(labels) {
            Some(c) => f(c),
            None => f(series.entry(labels.clone()).or_default()),
        }
    }

    /// A connection refused before any byte reached the application, with the reason
    /// (`plaintext_under_strict`, later policy denials).
    pub fn connection_denied(&self, destination: &crate::state::Workload, reason: &'static str) {
        let mut denied = self.denied.lock().expect("metrics lock");
        *denied
            .entry((
                destination.workload_name.clone(),
                destination.namespace.clone(),
                reason,
            ))
            .or_default() += 1;
    }

    /// A same-node connection went through the sk_msg redirect (`true`) or splice(2).
    pub fn same_node_datapath(&self, sockmap: bool) {
        let counter = if sockmap { &self.sockmap } else { &self.splice };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A redirected connection ended; the agent forwarded `bytes` of it itself.
    pub fn redirect_forwarded(&self, bytes: u64) {
        self.redirect_forwarded.fetch_add(bytes, Ordering::Relaxed);
    }

    /// An HBONE connection was closed unanswered: too many handshakes in progress.
    pub fn handshake_refused(&self) {
        self.handshakes_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let series = self.series.lock().expect("metrics lock").clone();
        let mut out = String::new();
        type Family = (&'static str, &'static str, fn(&Counters) -> u64);
        let families: [Family; 4] = [
            (
                "istio_tcp_connections_opened_total",
                "Total TCP connections opened.",
                |c| c.opened,
            ),
            (
                "istio_tcp_connections_closed_total",
                "Total TCP connections closed.",
                |c| c.closed,
            ),
            (
                "istio_tcp_sent_bytes_total",
                "Bytes sent during response (destination to source).",
                |c| c.sent,
            ),
            (
                "istio_tcp_received_bytes_total",
                "Bytes received during request (source to destination).",
                |c| c.received,
            ),
        ];
        for (name, help, value) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, counters) in &series {
                out.push_str(name);
                labels.render(&mut out);
                let _ = writeln!(out, " {}", value(counters));
            }
        }
        let name = "mesh_agent_same_node_connections_total";
        let _ = writeln!(
            out,
            "# HELP {name} Same-node connections by the kernel mechanism that moved their bytes.\n# TYPE {name} counter"
        );
        for (datapath, counter) in [("sockmap", &self.sockmap), ("splice", &self.splice)] {
            let n = counter.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{datapath=\"{datapath}\"}} {n}");
        }
        let name = "mesh_agent_redirect_forwarded_bytes_total";
        let _ = writeln!(
            out,
            "# HELP {name} Bytes of redirected same-node connections the agent forwarded itself.\n# TYPE {name} counter\n{name} {}",
            self.redirect_forwarded.load(Ordering::Relaxed)
        );
        let name = "mesh_agent_hbone_handshakes_refused_total";
        let _ = writeln!(
            out,
            "# HELP {name} HBONE connections closed before their handshake: too many in progress.\n# TYPE {name} counter\n{name} {}",
            self.handshakes_refused.load(Ordering::Relaxed)
        );
        let name = "mesh_agent_connections_denied_total";
        let _ = writeln!(
            out,
            "# HELP {name} Connections refused before reaching the application.\n# TYPE {name} counter"
        );
        for ((workload, namespace, reason), n) in self.denied.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "{name}{{destination_workload=\"{}\",destination_workload_namespace=\"{}\",reason=\"{reason}\"}} {n}",
                escape(workload),
                escape(namespace)
            );
        }
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
    fn counters_accumulate_per_label_set_in_prometheus_text() {
        let m = Metrics::default();
        m.connection_opened(&labels());
        m.connection_opened(&labels());
        m.connection_closed(&labels(), 100, 7);
        let text = m.render();
        let l = r#"{reporter="source",source_workload="client",source_workload_namespace="shop",destination_workload="web",destination_workload_namespace="shop",destination_service="unknown",source_principal="spiffe://cluster.local/ns/shop/sa/client",destination_principal="unknown",connection_security_policy="mutual_tls"}"#;
        assert!(
            text.contains(&format!("istio_tcp_connections_opened_total{l} 2\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("istio_tcp_connections_closed_total{l} 1\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("istio_tcp_received_bytes_total{l} 100\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("istio_tcp_sent_bytes_total{l} 7\n")),
            "{text}"
        );
        assert!(text.contains("# TYPE istio_tcp_sent_bytes_total counter"));
    }

    #[test]
    fn label_values_are_escaped() {
        let mut l = labels();
        l.source_workload = "a\"b\\c".into();
        let mut out = String::new();
        l.render(&mut out);
        assert!(out.contains(r#"source_workload="a\"b\\c""#), "{out}");
    }
}
