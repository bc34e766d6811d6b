//! `mesh-agent config dump [workloads|services|policies|certs]`: a proxy's `/config_dump`
//! as the tables `istioctl ztunnel-config` prints. The dump is read as JSON, not as the
//! agent's own types, so the command reads what any version of the agent serves, and a
//! field the agent left out is a `-` rather than an error.

use serde_json::Value;

use crate::{config::sync::epoch_seconds, identity::SecretManager, table};

/// Which table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Workloads,
    Services,
    Policies,
    Certs,
    /// Every table, one after another.
    All,
}

/// The tables of `section` from a `/config_dump` document.
pub fn render(dump: &Value, section: Section, now: u64) -> String {
    match section {
        Section::Workloads => workloads(dump),
        Section::Services => services(dump),
        Section::Policies => policies(dump),
        Section::Certs => certs(dump, now),
        Section::All => [
            workloads(dump),
            services(dump),
            policies(dump),
            certs(dump, now),
        ]
        .join("\n"),
    }
}

/// The certificates a proxy holds, as its `/config_dump` lists them (times in seconds since
/// the Unix epoch).
pub fn certificates(certs: &SecretManager) -> Value {
    certs
        .identities()
        .iter()
        .map(|(id, cert)| {
            serde_json::json!({
                "identity": id.to_string(),
                "serial": cert.serial,
                "not_before": epoch_seconds(cert.not_before),
                "not_after": epoch_seconds(cert.not_after),
            })
        })
        .collect()
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) if !s.is_empty() => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => "-".into(),
    }
}

fn list(v: &Value, f: impl Fn(&Value) -> String) -> String {
    let items: Vec<String> = v.as_array().into_iter().flatten().map(f).collect();
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

fn waypoint(v: &Value) -> String {
    match (v["namespace"].as_str(), v["name"].as_str()) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        _ => "-".into(),
    }
}

fn rows_of<const N: usize>(header: [&str; N], rows: Vec<[String; N]>, empty: &str) -> String {
    if rows.is_empty() {
        return format!("{empty}\n");
    }
    let mut all = vec![header.map(String::from)];
    all.extend(rows);
    table::render(&all)
}

/// NAMESPACE NAME ADDRESS NODE WAYPOINT PROTOCOL SERVICE ACCOUNT: PROTOCOL is HBONE for a
/// pod in the mesh, TCP for one outside it (ztunnel-config's column).
fn workloads(dump: &Value) -> String {
    let rows = dump["state"]["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            let protocol = if w["captured"].as_bool() == Some(true) {
                "HBONE"
            } else {
                "TCP"
            };
            [
                text(&w["namespace"]),
                text(&w["name"]),
                list(&w["ips"], text),
                text(&w["node"]),
                waypoint(&w["waypoint"]),
                protocol.to_owned(),
                text(&w["service_account"]),
            ]
        })
        .collect();
    rows_of(
        [
            "NAMESPACE",
            "NAME",
            "ADDRESS",
            "NODE",
            "WAYPOINT",
            "PROTOCOL",
            "SERVICE ACCOUNT",
        ],
        rows,
        "No workloads.",
    )
}

/// NAMESPACE NAME VIPS PORTS WAYPOINT; a port as `80/http` (its name) when it has one.
fn services(dump: &Value) -> String {
    let rows = dump["state"]["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let port = |p: &Value| match p["name"].as_str() {
                Some(name) => format!("{}/{name}", text(&p["port"])),
                None => text(&p["port"]),
            };
            [
                text(&s["namespace"]),
                text(&s["name"]),
                list(&s["vips"], text),
                list(&s["ports"], port),
                waypoint(&s["waypoint"]),
            ]
        })
        .collect();
    rows_of(
        ["NAMESPACE", "NAME", "VIPS", "PORTS", "WAYPOINT"],
        rows,
        "No services.",
    )
}

/// NAMESPACE NAME KIND ACTION SCOPE: SCOPE says what the policy applies to, as Istio
/// decides it: its targetRefs, its selector, its namespace, or the whole mesh.
fn policies(dump: &Value) -> String {
    let raw = &dump["state"]["raw"];
    let root = dump["root_namespace"].as_str().unwrap_or("istio-system");
    let mut rows = Vec::new();
    for (kind, key) in [
        ("AuthorizationPolicy", "authorization_policies"),
        ("PeerAuthentication", "peer_authentications"),
    ] {
        for p in raw[key].as_array().into_iter().flatten() {
            let meta = &p["metadata"];
            let spec = &p["spec"];
            let namespace = text(&meta["namespace"]);
            let action = match kind {
                "AuthorizationPolicy" => spec["action"].as_str().unwrap_or("ALLOW").to_owned(),
                _ => spec["mtls"]["mode"].as_str().unwrap_or("UNSET").to_owned(),
            };
            rows.push([
                namespace.clone(),
                text(&meta["name"]),
                kind.to_owned(),
                action,
                scope(spec, &namespace, root),
            ]);
        }
    }
    rows_of(
        ["NAMESPACE", "NAME", "KIND", "ACTION", "SCOPE"],
        rows,
        "No policies.",
    )
}

fn scope(spec: &Value, namespace: &str, root: &str) -> String {
    let refs: Vec<&Value> = spec["targetRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec.get("targetRef"))
        .collect();
    if !refs.is_empty() {
        return refs
            .iter()
            .map(|r| format!("{}/{}", text(&r["kind"]), text(&r["name"])))
            .collect::<Vec<_>>()
            .join(",");
    }
    if let Some(labels) = spec["selector"]["matchLabels"].as_object()
        && !labels.is_empty()
    {
        let pairs: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}={}", text(v)))
            .collect();
        return format!("selector {}", pairs.join(","));
    }
    if namespace == root {
        "mesh".into()
    } else {
        format!("namespace {namespace}")
    }
}

/// IDENTITY STATE SERIAL NOT BEFORE NOT AFTER (UTC).
fn certs(dump: &Value, now: u64) -> String {
    let rows = dump["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let (before, after) = (c["not_before"].as_u64(), c["not_after"].as_u64());
            let state = match (before, after) {
                (_, Some(a)) if a <= now => "EXPIRED",
                (Some(b), _) if b > now => "NOT YET VALID",
                (Some(_), Some(_)) => "VALID",
                _ => "-",
            };
            [
                text(&c["identity"]),
                state.to_owned(),
                text(&c["serial"]),
                before.map_or("-".into(), utc),
                after.map_or("-".into(), utc),
            ]
        })
        .collect();
    rows_of(
        ["IDENTITY", "STATE", "SERIAL", "NOT BEFORE", "NOT AFTER"],
        rows,
        "No certificates.",
    )
}

/// Seconds since the Unix epoch as `2026-12-02T22:28:12Z` (the access log's timestamp
/// without its milliseconds).
pub fn utc(secs: u64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    let stamp = crate::waypoint::access_log::timestamp(at);
    format!("{}Z", &stamp[..19])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_250_492), "2026-12-02T22:28:12Z");
    }

    fn dump() -> Value {
        serde_json::json!({
            "root_namespace": "istio-system",
            "certificates": [
                {"identity": "spiffe://cluster.local/ns/shop/sa/web", "serial": "0a",
                 "not_before": 1000, "not_after": 2000},
                {"identity": "spiffe://cluster.local/ns/shop/sa/old", "serial": "0b",
                 "not_before": 100, "not_after": 200},
            ],
            "state": {
                "workloads": [
                    {"namespace": "shop", "name": "web-1", "ips": ["10.0.0.1", "fd00::1"],
                     "node": "node1", "captured": true, "service_account": "web",
                     "waypoint": {"namespace": "shop", "name": "wp"}},
                    {"namespace": "shop", "name": "db-1", "ips": ["10.0.0.2"], "node": "node2",
                     "captured": false, "service_account": "default", "waypoint": null},
                ],
                "services": [
                    {"namespace": "shop", "name": "web", "vips": ["10.96.0.1"],
                     "ports": [{"name": "http", "port": 80}, {"port": 9000}], "waypoint": null},
                ],
                "raw": {
                    "authorization_policies": [
                        {"metadata": {"namespace": "shop", "name": "deny-delete"},
                         "spec": {"action": "DENY", "targetRefs": [{"kind": "Service", "name": "web"}]}},
                        {"metadata": {"namespace": "shop", "name": "web-only"},
                         "spec": {"selector": {"matchLabels": {"app": "web"}}}},
                        {"metadata": {"namespace": "istio-system", "name": "allow-nothing"},
                         "spec": {}},
                    ],
                    "peer_authentications": [
                        {"metadata": {"namespace": "shop", "name": "strict"},
                         "spec": {"mtls": {"mode": "STRICT"}}},
                    ],
                },
            },
        })
    }

    fn line_with<'a>(text: &'a str, needle: &str) -> &'a str {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle} in\n{text}"))
    }

    fn cells(line: &str) -> Vec<&str> {
        line.split("   ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect()
    }

    #[test]
    fn workloads_table() {
        let t = render(&dump(), Section::Workloads, 1500);
        assert!(t.starts_with("NAMESPACE"), "{t}");
        assert_eq!(
            cells(line_with(&t, "web-1")),
            [
                "shop",
                "web-1",
                "10.0.0.1,fd00::1",
                "node1",
                "shop/wp",
                "HBONE",
                "web"
            ]
        );
        assert_eq!(
            cells(line_with(&t, "db-1")),
            ["shop", "db-1", "10.0.0.2", "node2", "-", "TCP", "default"]
        );
    }

    #[test]
    fn services_table() {
        let t = render(&dump(), Section::Services, 1500);
        assert_eq!(
            cells(line_with(&t, "10.96.0.1")),
            ["shop", "web", "10.96.0.1", "80/http,9000", "-"]
        );
    }

    #[test]
    fn policies_table_says_each_scope() {
        let t = render(&dump(), Section::Policies, 1500);
        assert_eq!(
            cells(line_with(&t, "deny-delete")),
            [
                "shop",
                "deny-delete",
                "AuthorizationPolicy",
                "DENY",
                "Service/web"
            ]
        );
        assert_eq!(
            cells(line_with(&t, "web-only")),
            [
                "shop",
                "web-only",
                "AuthorizationPolicy",
                "ALLOW",
                "selector app=web"
            ]
        );
        assert!(line_with(&t, "allow-nothing").ends_with("mesh"), "{t}");
        assert!(line_with(&t, "strict").contains("STRICT"), "{t}");
        assert!(line_with(&t, "strict").ends_with("namespace shop"), "{t}");
    }

    #[test]
    fn certs_table_with_states() {
        let t = render(&dump(), Section::Certs, 1500);
        assert_eq!(
            cells(line_with(&t, "sa/web")),
            [
                "spiffe://cluster.local/ns/shop/sa/web",
                "VALID",
                "0a",
                "1970-01-01T00:16:40Z",
                "1970-01-01T00:33:20Z"
            ]
        );
        assert!(line_with(&t, "sa/old").contains("EXPIRED"), "{t}");
    }

    #[test]
    fn a_dump_without_a_section_says_so() {
        let empty = serde_json::json!({});
        assert_eq!(render(&empty, Section::Workloads, 0), "No workloads.\n");
        assert!(render(&empty, Section::All, 0).contains("No certificates."));
    }
}
