//! `mesh-agent status`: every proxy the configuration knows — the node agent of each node
//! pods are scheduled on, each waypoint pod, each ingress gateway pod — with whether it
//! answers, whether its view of the configuration is the current one, the pods it enrolled,
//! its certificates and its version (istioctl proxy-status, for a mesh without a control
//! plane).
//!
//! Each proxy serves a [`Report`] as JSON at `/status` on its metrics port (15020, every
//! address, where Prometheus already scrapes it: the report holds identities, counts and
//! digests, nothing the metrics do not already show). `status` reads the configuration
//! itself, from the same files or API server, computes the digest of what it read
//! ([`crate::config::sync`]) and compares it per kind with the one each proxy applied:
//! SYNCED when they agree, STALE (with the kinds that differ and the proxy's last refusal)
//! when not, UNREACHABLE when the proxy does not answer within [`TIMEOUT`].

use std::{
    fmt::Write as _,
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::sync::{SyncRecord, ViewDigest, epoch_seconds},
    identity::SecretManager,
    state::{GATEWAY_NAME_LABEL, MeshState},
};

/// How long a proxy has to answer `/status` (or `/config_dump`), whole.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// The largest answer read (a config dump of a large cluster is tens of MiB).
const MAX_RESPONSE: usize = 256 << 20;

/// The kind of proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A node agent (`mesh-agent run`).
    Node,
    Waypoint,
    Gateway,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Node => "node",
            Role::Waypoint => "waypoint",
            Role::Gateway => "gateway",
        })
    }
}

/// What a proxy says of itself at `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub role: Role,
    /// The node's name, or the waypoint's or gateway's `namespace/name` (its Gateway's).
    pub name: String,
    pub version: String,
    pub ready: bool,
    /// The configuration it runs and what it last refused.
    pub config: SyncRecord,
    /// A node agent's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<Pods>,
    pub certificates: Vec<Certificate>,
}

/// A node agent's pods.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pods {
    /// Captured pods scheduled on the node, by the configuration the agent runs.
    pub captured: usize,
    /// Of those, enrolled: their traffic is redirected.
    pub enrolled: usize,
    /// Enrollments that failed (readiness fails).
    pub failed: usize,
    /// Pods waiting for their network namespace.
    pub pending: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub identity: String,
    /// Seconds since the Unix epoch.
    pub not_after: u64,
}

impl Report {
    /// The report of a proxy holding `certs`, whose source recorded `config`.
    pub fn new(
        role: Role,
        name: String,
        ready: bool,
        config: SyncRecord,
        certs: &SecretManager,
    ) -> Self {
        Report {
            role,
            name,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ready,
            config,
            pods: None,
            certificates: certs
                .identities()
                .iter()
                .map(|(id, cert)| Certificate {
                    identity: id.to_string(),
                    not_after: epoch_seconds(cert.not_after),
                })
                .collect(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// A proxy the configuration knows, where to ask it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    pub role: Role,
    /// A node's name (its agent's [`Report::name`]), or a waypoint's or gateway's pod as
    /// `namespace/pod`.
    pub name: String,
    pub address: IpAddr,
}

/// Every proxy of `state`: a node agent per node pods are scheduled on (at the node's
/// first address, IPv4 first), each pod of a waypoint, each pod an ingress gateway object
/// selects. Sorted by role, then name.
pub fn targets(state: &MeshState) -> Vec<Target> {
    let mut out = Vec::new();
    for (node, ips) in &state.nodes {
        let address = ips.iter().find(|ip| ip.is_ipv4()).or(ips.first());
        if let Some(&address) = address {
            out.push(Target {
                role: Role::Node,
                name: node.clone(),
                address,
            });
        }
    }
    let gateways = state.routes().ingress_gateways();
    for w in &state.workloads {
        let Some(&address) = w.ips.iter().find(|ip| ip.is_ipv4()).or(w.ips.first()) else {
            continue;
        };
        let role = if state.waypoints.iter().any(|wp| wp.is_pod(w)) {
            Role::Waypoint
        } else {
            let own = (
                w.namespace.clone(),
                w.labels
                    .get(GATEWAY_NAME_LABEL)
                    .map(str::to_owned)
                    .unwrap_or_default(),
            );
            if !gateways.iter().any(|g| g.runs_on(&w.labels, &own)) {
                continue;
            }
            Role::Gateway
        };
        out.push(Target {
            role,
            name: format!("{}/{}", w.namespace, w.name),
            address,
        });
    }
    out.sort();
    out
}

/// Where a proxy stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "sync", rename_all = "UPPERCASE")]
pub enum Standing {
    Synced,
    /// Its view differs from the configuration in these kinds.
    Stale {
        kinds: Vec<String>,
    },
    Unreachable {
        error: String,
    },
}

/// One line of `status`.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub role: Role,
    pub name: String,
    pub address: IpAddr,
    #[serde(flatten)]
    pub standing: Standing,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<Report>,
}

/// The kinds in which `got` differs from `expected`; kinds in `unread` (what `status` did
/// not read itself, e.g. Secrets from the API server) are not compared.
pub fn differing_kinds(expected: &ViewDigest, got: &ViewDigest, unread: &[&str]) -> Vec<String> {
    let kinds: std::collections::BTreeSet<&String> = expected.keys().chain(got.keys()).collect();
    kinds
        .into_iter()
        .filter(|k| !unread.contains(&k.as_str()) && expected.get(*k) != got.get(*k))
        .cloned()
        .collect()
}

/// Asks every target at `port` (in parallel, each within [`TIMEOUT`]) and judges it against
/// `expected`.
pub fn collect(targets: &[Target], port: u16, expected: &ViewDigest, unread: &[&str]) -> Vec<Row> {
    std::thread::scope(|scope| {
        let asks: Vec<_> = targets
            .iter()
            .map(|t| {
                scope.spawn(move || {
                    fetch_json::<Report>(SocketAddr::new(t.address, port), "/status", TIMEOUT)
                })
            })
            .collect();
        targets
            .iter()
            .zip(asks)
            .map(|(t, ask)| {
                let answer = ask
                    .join()
                    .unwrap_or_else(|_| Err("the request panicked".into()));
                let (standing, report) = match answer {
                    Err(error) => (Standing::Unreachable { error }, None),
                    // Another proxy on that address: the configuration's address is wrong.
                    Ok(report)
                        if report.role != t.role
                            || (t.role == Role::Node && report.name != t.name) =>
                    {
                        (
                            Standing::Unreachable {
                                error: format!(
                                    "{} answers as {} {}",
                                    t.address, report.role, report.name
                                ),
                            },
                            Some(report),
                        )
                    }
                    Ok(report) => {
                        let kinds = differing_kinds(expected, &report.config.digest, unread);
                        let standing = if kinds.is_empty() {
                            Standing::Synced
                        } else {
                            Standing::Stale { kinds }
                        };
                        (standing, Some(report))
                    }
                };
                Row {
                    role: t.role,
                    name: t.name.clone(),
                    address: t.address,
                    standing,
                    report,
                }
            })
            .collect()
    })
}

/// GETs `path` from a proxy's admin port and parses the JSON body; errors are sentences.
pub fn fetch_json<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<T, String> {
    let body = fetch(addr, path, timeout)?;
    serde_json::from_str(&body).map_err(|e| format!("{addr}{path}: not the expected JSON: {e}"))
}

/// GETs `path` from `addr` over HTTP/1.1 (the admin server closes after one response);
/// the body of a 200, else an error naming the status.
pub fn fetch(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let fail = |e: std::io::Error| format!("{addr}: {e}");
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(fail)?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_write_timeout(Some(left)).map_err(fail)?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(fail)?;
    // Read against the deadline and a size bound, not per read: an endpoint that trickles
    // bytes, or never stops, does not hold the command.
    let mut response = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    let late = || format!("{addr}{path}: no complete answer within {timeout:?}");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(late());
        }
        stream.set_read_timeout(Some(left)).map_err(fail)?;
        // A read that waits out the rest of the deadline is the same failure as a deadline
        // passed between reads.
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(late());
            }
            Err(e) => return Err(fail(e)),
        };
        if n == 0 {
            break;
        }
        if response.len() + n > MAX_RESPONSE {
            return Err(format!("{addr}{path}: answer over {MAX_RESPONSE} bytes"));
        }
        response.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}{path}: incomplete response"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{addr}{path}: {status}"));
    }
    Ok(body.to_owned())
}

/// `status`'s table: one line per proxy, then what is wrong with each that is not SYNCED.
pub fn render(rows: &[Row], now: SystemTime) -> String {
    let now = epoch_seconds(now);
    let mut table = vec![
        [
            "NAME", "ROLE", "ADDRESS", "SYNC", "CONFIG", "PODS", "CERTS", "VERSION",
        ]
        .map(String::from),
    ];
    let mut notes = String::new();
    for row in rows {
        let (sync, config, pods, certs, version) = match &row.report {
            None => Default::default(),
            Some(r) => (
                String::new(),
                format!(
                    "{} ({} ago)",
                    short_digest(&r.config.digest),
                    ago(now, r.config.applied_at)
                ),
                r.pods
                    .map_or("-".into(), |p| format!("{}/{}", p.enrolled, p.captured)),
                certificates(&r.certificates, now),
                r.version.clone(),
            ),
        };
        let sync = match &row.standing {
            Standing::Synced => "SYNCED".to_owned(),
            Standing::Stale { .. } => "STALE".to_owned(),
            Standing::Unreachable { .. } => "UNREACHABLE".to_owned(),
        } + &sync;
        table.push([
            row.name.clone(),
            row.role.to_string(),
            row.address.to_string(),
            sync,
            or_dash(config),
            or_dash(pods),
            or_dash(certs),
            or_dash(version),
        ]);
        let _ = match (&row.standing, &row.report) {
            (Standing::Unreachable { error }, _) => {
                writeln!(notes, "{}: unreachable: {error}", row.name)
            }
            (Standing::Stale { kinds }, _) => writeln!(
                notes,
                "{}: stale: its view of {} differs from the configuration",
                row.name,
                kinds.join(", ")
            ),
            _ => Ok(()),
        };
        if let Some(r) = &row.report {
            if let (Some(error), Some(at)) = (&r.config.error, r.config.error_at) {
                let _ = writeln!(
                    notes,
                    "{}: refused a configuration {} ago, runs the previous one: {error}",
                    row.name,
                    ago(now, at)
                );
            }
            for object in &r.config.rejected {
                let _ = writeln!(notes, "{}: leaves out {object}", row.name);
            }
            if let Some(p) = r.pods.filter(|p| p.failed > 0 || p.pending > 0) {
                let _ = writeln!(
                    notes,
                    "{}: {} pod(s) failed to enroll, {} waiting for their network namespace",
                    row.name, p.failed, p.pending
                );
            }
            if !r.ready {
                let _ = writeln!(notes, "{}: not ready", row.name);
            }
        }
    }
    let mut out = crate::table::render(&table);
    out.push_str(&notes);
    out
}

fn or_dash(s: String) -> String {
    if s.is_empty() { "-".into() } else { s }
}

/// One short digest for a whole view (the table's CONFIG column; the per-kind digests are in
/// `-o json`).
pub fn short_digest(digest: &ViewDigest) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (kind, d) in digest {
        ctx.update(kind.as_bytes());
        ctx.update(b"=");
        ctx.update(d.as_bytes());
        ctx.update(b"\n");
    }
    ctx.finish().as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `3`, with the earliest expiry: `3 (23h59m)`, or `EXPIRED`.
fn certificates(certs: &[Certificate], now: u64) -> String {
    match certs.iter().map(|c| c.not_after).min() {
        None => "0".into(),
        Some(first) if first <= now => format!("{} (EXPIRED)", certs.len()),
        Some(first) => format!("{} ({})", certs.len(), span(first - now)),
    }
}

fn ago(now: u64, then: u64) -> String {
    span(now.saturating_sub(then))
}

/// `42s`, `5m3s`, `23h59m`, `3d4h`.
pub fn span(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// Whether every proxy is SYNCED (`status` exits 1 otherwise).
pub fn all_synced(rows: &[Row]) -> bool {
    rows.iter().all(|r| r.standing == Standing::Synced)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(pairs: &[(&str, &str)]) -> ViewDigest {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn kinds_that_differ_or_are_missing_are_stale_unread_ones_are_not_compared() {
        let expected = digest(&[("Pod", "a"), ("Service", "b")]);
        assert!(differing_kinds(&expected, &expected, &[]).is_empty());
        let got = digest(&[("Pod", "x"), ("Service", "b"), ("Secret", "s")]);
        assert_eq!(differing_kinds(&expected, &got, &[]), ["Pod", "Secret"]);
        assert_eq!(differing_kinds(&expected, &got, &["Secret"]), ["Pod"]);
        let missing = digest(&[("Pod", "a")]);
        assert_eq!(differing_kinds(&expected, &missing, &[]), ["Service"]);
    }

    #[test]
    fn spans_read_like_kubectl() {
        assert_eq!(span(42), "42s");
        assert_eq!(span(303), "5m3s");
        assert_eq!(span(86399), "23h59m");
        assert_eq!(span(3 * 86400 + 4 * 3600), "3d4h");
    }

    fn report(name: &str, digest: ViewDigest) -> Report {
        Report {
            role: Role::Node,
            name: name.into(),
            version: "0.1.0".into(),
            ready: true,
            config: SyncRecord {
                digest,
                applied_at: 1_000,
                ..Default::default()
            },
            pods: Some(Pods {
                captured: 3,
                enrolled: 3,
                ..Default::default()
            }),
            certificates: vec![Certificate {
                identity: "spiffe://cluster.local/ns/a/sa/b".into(),
                not_after: 1_000 + 86_400,
            }],
        }
    }

    #[test]
    fn the_table_names_each_proxy_and_says_what_is_wrong() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_030);
        let expected = digest(&[("Pod", "a")]);
        let mut stale = report("node2", digest(&[("Pod", "old")]));
        stale.config.error = Some("config.yaml: document 3 (Pod x/y): bad".into());
        stale.config.error_at = Some(1_020);
        let rows = vec![
            Row {
                role: Role::Node,
                name: "node1".into(),
                address: "10.0.0.1".parse().unwrap(),
                standing: Standing::Synced,
                report: Some(report("node1", expected.clone())),
            },
            Row {
                role: Role::Node,
                name: "node2".into(),
                address: "10.0.0.2".parse().unwrap(),
                standing: Standing::Stale {
                    kinds: vec!["Pod".into()],
                },
                report: Some(stale),
            },
            Row {
                role: Role::Waypoint,
                name: "ns/wp-0".into(),
                address: "10.0.1.9".parse().unwrap(),
                standing: Standing::Unreachable {
                    error: "10.0.1.9:15020: connection refused".into(),
                },
                report: None,
            },
        ];
        let text = render(&rows, now);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("NAME") && lines[0].contains("SYNC"),
            "{text}"
        );
        assert!(
            lines[1].contains("node1")
                && lines[1].contains("SYNCED")
                && lines[1].contains("3/3")
                && lines[1].contains("1 (23h59m)")
                && lines[1].contains("(30s ago)"),
            "{text}"
        );
        assert!(lines[2].contains("STALE"), "{text}");
        assert!(
            lines[3].contains("UNREACHABLE") && lines[3].contains(" - "),
            "{text}"
        );
        assert!(
            text.contains("node2: stale: its view of Pod differs"),
            "{text}"
        );
        assert!(
            text.contains("node2: refused a configuration 10s ago, runs the previous one: config.yaml: document 3"),
            "{text}"
        );
        assert!(text.contains("ns/wp-0: unreachable: 10.0.1.9:15020: connection refused"));
        assert!(!all_synced(&rows));
        assert!(all_synced(&rows[..1]));
    }

    #[test]
    fn fetch_reads_a_report_and_names_what_went_wrong() {
        use std::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let want = report("node1", digest(&[("Pod", "a")]));
        let body = want.to_json();
        let server = std::thread::spawn(move || {
            for reply in [
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                ),
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_owned(),
            ] {
                let (mut s, _) = listener.accept().unwrap();
                // The whole request head, then the reply.
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap() == 1 {
                    head.push(byte[0]);
                }
                s.write_all(reply.as_bytes()).unwrap();
            }
        });
        let got: Report = fetch_json(addr, "/status", TIMEOUT).unwrap();
        assert_eq!(got, want);
        let e = fetch(addr, "/status", TIMEOUT).unwrap_err();
        assert!(e.contains("404"), "{e}");
        server.join().unwrap();
        // Nothing listens any more.
        let e = fetch(addr, "/status", TIMEOUT).unwrap_err();
        assert!(e.starts_with(&addr.to_string()), "{e}");
    }

    #[test]
    fn a_trickling_answer_is_cut_at_the_deadline() {
        use std::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            // A byte every 50 ms: each read succeeds, the whole never ends.
            for _ in 0..40 {
                if s.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let started = Instant::now();
        let e = fetch(addr, "/status", Duration::from_millis(300)).unwrap_err();
        assert!(e.contains("no complete answer"), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        server.join().unwrap();
    }
}
