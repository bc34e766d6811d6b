//! Istio-compatible TCP metrics (`istio_tcp_*`) kept per label set and rendered in the
//! Prometheus text format, so existing Kiali and Grafana dashboards read them unchanged.

use std::{collections::BTreeMap, fmt::Write as _, sync::Mutex};

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
}

impl Metrics {
    pub fn connection_opened(&self, labels: &ConnectionLabels) {
        let mut series = self.series.lock().expect("metrics lock");
        series.entry(labels.clone()).or_default().opened += 1;
    }

    /// Records a closed connection with its request (`received`) and response (`sent`) bytes.
    pub fn connection_closed(&self, labels: &ConnectionLabels, received: u64, sent: u64) {
        let mut series = self.series.lock().expect("metrics lock");
        let c = series.entry(labels.clone()).or_default();
        c.closed += 1;
        c.received += received;
        c.sent += sent;
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
        }
    }

    #[test]
    fn counters_accumulate_per_label_set_in_prometheus_text() {
        let m = Metrics::default();
        m.connection_opened(&labels());
        m.connection_opened(&labels());
        m.connection_closed(&labels(), 100, 7);
        let text = m.render();
        let l = r#"{reporter="source",source_workload="client",source_workload_namespace="shop",destination_workload="web",destination_workload_namespace="shop",destination_service="unknown"}"#;
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
