//! A real Prometheus (Debian's `prometheus`) run inside a test pod, scraping the proxies'
//! 15020, and the service graph Kiali draws from it: the same PromQL Kiali runs for its
//! graph (`istio_requests_total` by source workload and destination service and version,
//! reporter `waypoint` or `source`), as text and as Graphviz.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cluster::{Pod, Process};

/// Where Prometheus listens, inside its pod.
const LISTEN: &str = "127.0.0.1:9090";

pub struct Prometheus {
    _process: Process,
    netns: PathBuf,
}

/// One sample of a query's result: its labels and value.
pub type Sample = (BTreeMap<String, String>, f64);

impl Prometheus {
    /// Starts Prometheus in `pod`, its files under `dir`, scraping `/metrics` of every
    /// target once a second; returns once it is ready.
    pub fn start(pod: &Pod, dir: &Path, targets: &[(&str, SocketAddr)]) -> Result<Self> {
        let binary = which("prometheus").context(
            "prometheus is not installed (cargo xtask setup installs Debian's prometheus)",
        )?;
        std::fs::create_dir_all(dir)?;
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, target) in targets {
            writeln!(
                config,
                "- job_name: {job}\n  metrics_path: /metrics\n  static_configs:\n  - targets: ['{target}']"
            )?;
        }
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config)?;
        let process = pod.spawn(&[
            binary.to_str().context("a UTF-8 path")?,
            &format!("--config.file={}", file.display()),
            &format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
            &format!("--web.listen-address={LISTEN}"),
            "--log.level=warn",
        ])?;
        let prometheus = Self {
            _process: process,
            netns: pod.netns_path().to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = prometheus.get("/-/ready") {
                return Ok(prometheus);
            }
            if Instant::now() > deadline {
                bail!("prometheus did not become ready within 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn get(&self, path: &str) -> Result<(u16, String)> {
        let path = path.to_owned();
        crate::in_netns(&self.netns, move || {
            crate::workload::http_get(LISTEN.parse().unwrap(), &path, Duration::from_secs(10))
        })?
    }

    /// An instant query's samples.
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let encoded: String = form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let (status, body) = self.get(&format!("/api/v1/query?query={encoded}"))?;
        if status != 200 {
            bail!("query {promql}: HTTP {status}: {body}");
        }
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let mut out = Vec::new();
        for r in v["data"]["result"].as_array().into_iter().flatten() {
            let labels = r["metric"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            let value = r["value"][1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN);
            out.push((labels, value));
        }
        Ok(out)
    }

    /// The targets Prometheus scrapes, with whether the last scrape worked.
    pub fn targets_up(&self) -> Result<Vec<(String, bool)>> {
        Ok(self
            .query("up")?
            .into_iter()
            .map(|(l, v)| (l.get("job").cloned().unwrap_or_default(), v == 1.0))
            .collect())
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

/// The labels Kiali groups request traffic by for its workload graph.
pub const KIALI_GROUP_BY: &str = "source_workload, source_workload_namespace, source_canonical_service, destination_service_name, destination_service_namespace, destination_workload, destination_version, destination_canonical_service, request_protocol, response_code, response_flags";

/// Kiali's graph query: request rates by edge, as the waypoints and gateways report them.
pub fn kiali_request_query(window: &str) -> String {
    format!(
        "sum(rate(istio_requests_total{{reporter=~\"waypoint|source\"}}[{window}])) by ({KIALI_GROUP_BY})"
    )
}

/// Kiali's TCP graph query.
pub fn kiali_tcp_query(window: &str) -> String {
    format!(
        "sum(rate(istio_tcp_sent_bytes_total{{reporter=~\"source|destination\"}}[{window}])) by (source_cluster, source_workload, source_workload_namespace, source_canonical_service, source_canonical_revision, destination_cluster, destination_service_namespace, destination_service, destination_service_name, destination_workload, destination_workload_namespace, destination_canonical_service, destination_canonical_revision, response_flags)"
    )
}

/// One edge of the service graph: requests per second and the share of 5xx answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Edge {
    pub source: String,
    pub destination: String,
    pub rate: f64,
    pub errors: f64,
}

/// The request graph of a Kiali query's samples: source workload → destination service
/// and version, with the rate and error share per edge.
pub fn graph(samples: &[Sample]) -> Vec<Edge> {
    let mut edges: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
    for (labels, value) in samples {
        let get = |k: &str| labels.get(k).map_or("unknown", String::as_str);
        let source = format!(
            "{}.{}",
            get("source_workload"),
            get("source_workload_namespace")
        );
        let destination = format!(
            "{}.{} {}",
            get("destination_service_name"),
            get("destination_service_namespace"),
            get("destination_version")
        );
        let e = edges.entry((source, destination)).or_default();
        e.0 += value;
        if get("response_code").starts_with('5') {
            e.1 += value;
        }
    }
    edges
        .into_iter()
        .map(|((source, destination), (rate, errors))| Edge {
            source,
            destination,
            rate,
            errors: if rate > 0.0 { errors / rate } else { 0.0 },
        })
        .collect()
}

/// The graph as Graphviz: a node per workload and service version, an edge per pair with
/// its rate and error share, red when any request failed.
pub fn dot(edges: &[Edge]) -> String {
    let mut out = String::from(
        "digraph mesh {\n  rankdir=LR;\n  node [shape=box, style=rounded, fontname=Helvetica];\n",
    );
    for e in edges {
        let color = if e.errors > 0.0 { "red" } else { "darkgreen" };
        let _ = writeln!(
            out,
            "  \"{}\" -> \"{}\" [label=\"{:.2} rps, {:.0} % 5xx\", color={color}, fontcolor={color}];",
            e.source,
            e.destination,
            e.rate,
            e.errors * 100.0
        );
    }
    out.push_str("}\n");
    out
}

/// Renders `dot` text into `path` (`svg` or `png` by its extension) with Graphviz.
pub fn render(dot_text: &str, path: &Path) -> Result<()> {
    let format = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("svg")
        .to_owned();
    let source = path.with_extension("dot");
    std::fs::write(&source, dot_text)?;
    let status = std::process::Command::new("dot")
        .arg(format!("-T{format}"))
        .arg("-o")
        .arg(path)
        .arg(&source)
        .status()
        .context("running dot (cargo xtask setup installs graphviz)")?;
    if !status.success() {
        bail!("dot -T{format} failed on {}", source.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_sum_rates_and_error_shares() {
        let sample = |code: &str, version: &str, v: f64| {
            let labels: BTreeMap<String, String> = [
                ("source_workload", "productpage"),
                ("source_workload_namespace", "default"),
                ("destination_service_name", "reviews"),
                ("destination_service_namespace", "default"),
                ("destination_version", version),
                ("response_code", code),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
            (labels, v)
        };
        let edges = graph(&[
            sample("200", "v1", 3.0),
            sample("503", "v1", 1.0),
            sample("200", "v2", 2.0),
        ]);
        assert_eq!(edges.len(), 2);
        assert_eq!(edges[0].rate, 4.0);
        assert_eq!(edges[0].errors, 0.25);
        assert_eq!(edges[1].errors, 0.0);
        let d = dot(&edges);
        assert!(d.contains("\"productpage.default\" -> \"reviews.default v1\""));
        assert!(d.contains("25 % 5xx"));
    }
}
