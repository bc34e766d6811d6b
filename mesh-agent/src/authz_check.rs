//! `mesh-agent authz check` (and `/debug/authz` on the admin port): how the mesh judges a
//! connection, or an HTTP request, from one pod to a pod or a service, hop by hop, as the
//! data path would: through the destination's waypoint when it has one (the policies that
//! target the waypoint, its class or the service, at L7 for an HTTP port), then at the
//! destination's node proxy (PeerAuthentication, then the selector and namespace policies,
//! which see the waypoint's identity when the traffic came through it). Each hop is judged by
//! the enforcement's own code ([`crate::admission::PolicySet::explain`],
//! [`crate::rbac::Policies::explain_targeted`]), so the answer is what enforcement does, with
//! every policy in scope listed in Istio's order, whether it matched, and which one decided.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};

use crate::admission::{Admission, Peer};
use crate::config::translate::WAYPOINT_CLASS;
use crate::identity::Identity;
use crate::peer_auth::MtlsMode;
use crate::rbac::{self, Explanation, Target};
use crate::state::{AppProtocol, MeshState, Service, TargetPort, Workload};

/// The request judged at a waypoint on an HTTP port.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub method: String,
    pub path: String,
    /// `Host`; default: the destination's name.
    pub host: Option<String>,
    pub headers: http::HeaderMap,
}

/// Where the traffic goes.
#[derive(Debug, Clone, Copy)]
pub enum To<'a> {
    Pod(&'a Workload),
    Service(&'a Service),
}

/// One enforcement point on the way.
#[derive(Debug, Clone)]
pub enum Hop {
    /// A waypoint's targeted policies.
    Waypoint {
        name: String,
        identity: Option<Identity>,
        layer: &'static str,
        explanation: Explanation,
    },
    /// A destination outside the mesh: no proxy judges what reaches it.
    Unenforced { pod: String },
    /// The destination pod's node proxy.
    NodeProxy {
        pod: String,
        identity: Option<Identity>,
        admission: Admission,
    },
}

impl Hop {
    pub fn allowed(&self) -> bool {
        match self {
            Hop::Waypoint { explanation, .. } => explanation.decision.allowed,
            Hop::NodeProxy { admission, .. } => admission.allowed(),
            Hop::Unenforced { .. } => true,
        }
    }
}

/// The whole answer.
#[derive(Debug, Clone)]
pub struct Report {
    pub from: String,
    pub to: String,
    pub hops: Vec<Hop>,
}

impl Report {
    /// Allowed at every hop.
    pub fn allowed(&self) -> bool {
        self.hops.iter().all(Hop::allowed)
    }
}

/// Why a question cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}: expected NAMESPACE/NAME")]
    Syntax(String),
    #[error("{0}: no such pod in the configuration")]
    NoPod(String),
    #[error("{0}: no pod or service of that name, and no pod or service VIP at that address")]
    NoDestination(String),
    #[error("{0}: the service has no ready endpoint on port {1}")]
    NoEndpoint(String, u16),
}

/// `NS/NAME` as a pod of `state`.
pub fn find_pod<'a>(state: &'a MeshState, spec: &str) -> Result<&'a Workload, QueryError> {
    let (ns, name) = spec
        .split_once('/')
        .ok_or_else(|| QueryError::Syntax(spec.to_owned()))?;
    state
        .workload(ns, name)
        .ok_or_else(|| QueryError::NoPod(spec.to_owned()))
}

/// `NS/NAME:PORT` (a pod, else a service) or `IP:PORT` (a pod's address or a service VIP).
pub fn find_destination<'a>(state: &'a MeshState, spec: &str) -> Result<(To<'a>, u16), QueryError> {
    if let Ok(addr) = spec.parse::<SocketAddr>() {
        let ip = addr.ip().to_canonical();
        if let Some(w) = state.workload_by_ip(ip) {
            return Ok((To::Pod(w), addr.port()));
        }
        if let Some((s, _)) = state.service_by_vip(ip, addr.port()) {
            return Ok((To::Service(s), addr.port()));
        }
        return Err(QueryError::NoDestination(spec.to_owned()));
    }
    let (target, port) = spec
        .rsplit_once(':')
        .and_then(|(t, p)| Some((t, p.parse::<u16>().ok()?)))
        .ok_or_else(|| QueryError::Syntax(format!("{spec} (and :PORT)")))?;
    let (ns, name) = target
        .split_once('/')
        .ok_or_else(|| QueryError::Syntax(spec.to_owned()))?;
    if let Some(w) = state.workload(ns, name) {
        return Ok((To::Pod(w), port));
    }
    if let Some(s) = state.service(ns, name) {
        return Ok((To::Service(s), port));
    }
    Err(QueryError::NoDestination(spec.to_owned()))
}

/// The answer to `/debug/authz?from=NS/POD&to=NS/NAME:PORT[&method=M&path=P&host=H]` (the
/// admin port's form of `mesh-agent authz check`) on `state`: the report, or why the
/// question is wrong (status 400).
pub fn answer_query(state: &MeshState, trust_domain: &str, query: &str) -> Result<Report, String> {
    let params: std::collections::HashMap<String, String> =
        form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
    let param = |name: &str| {
        params.get(name).cloned().ok_or_else(|| {
            format!("{name}: missing (from=NS/POD&to=NS/NAME:PORT[&method=M&path=P&host=H])")
        })
    };
    let from = find_pod(state, &param("from")?).map_err(|e| e.to_string())?;
    let (to, port) = find_destination(state, &param("to")?).map_err(|e| e.to_string())?;
    let wants_request = ["method", "path", "host"]
        .iter()
        .any(|k| params.contains_key(*k));
    let request = wants_request.then(|| RequestSpec {
        method: params
            .get("method")
            .cloned()
            .unwrap_or_else(|| "GET".into()),
        path: params.get("path").cloned().unwrap_or_else(|| "/".into()),
        host: params.get("host").cloned(),
        headers: http::HeaderMap::new(),
    });
    check(state, trust_domain, from, to, port, request.as_ref()).map_err(|e| e.to_string())
}

/// How a connection (with `request`, at a waypoint on an HTTP port) from `from` to `to` on
/// `port` is judged.
pub fn check(
    state: &MeshState,
    trust_domain: &str,
    from: &Workload,
    to: To<'_>,
    port: u16,
    request: Option<&RequestSpec>,
) -> Result<Report, QueryError> {
    // The pod that receives it, on which port, and the address the client used.
    let (dst, dst_port, dst_ip, service) = match to {
        To::Pod(w) => (w, port, first_ip(w, from), None),
        To::Service(s) => {
            let service_port = s.ports.iter().find(|p| p.port == port);
            let endpoint = service_port
                .and_then(|p| state.endpoints(s, p).first().copied())
                .ok_or_else(|| {
                    QueryError::NoEndpoint(format!("{}/{}", s.namespace, s.name), port)
                })?;
            let w = state.workload_by_ip(endpoint.ip()).ok_or_else(|| {
                QueryError::NoEndpoint(format!("{}/{}", s.namespace, s.name), port)
            })?;
            let vip = s.vips.first().copied().unwrap_or(endpoint.ip());
            (w, endpoint.port(), vip, Some((s, service_port)))
        }
    };
    let identity_of = |w: &Workload| w.captured.then(|| Identity::of(trust_domain, w));
    let mut hops = Vec::new();
    let mut source = (identity_of(from), first_ip(from, dst));

    let waypoint = match service {
        Some((s, _)) => s.waypoint.as_ref(),
        None => dst.waypoint.as_ref(),
    }
    .and_then(|r| state.waypoint(r))
    // A waypoint's own traffic is never sent back to it.
    .filter(|wp| !wp.addresses.is_empty() && !wp.is_pod(from));
    if let Some(wp) = waypoint {
        let mut targets = vec![
            Target::Gateway {
                namespace: wp.namespace.clone(),
                name: wp.name.clone(),
            },
            Target::GatewayClass {
                name: WAYPOINT_CLASS.to_owned(),
            },
        ];
        if let Some((s, _)) = service {
            targets.push(Target::Service {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
            });
        }
        let http = match service {
            Some((_, Some(p))) => p.app_protocol() == AppProtocol::Http,
            // A pod's port is HTTP when a service port that sends to it says so.
            _ => state
                .services_for_workload(dst)
                .flat_map(|s| s.ports.iter())
                .any(|p| {
                    p.app_protocol() == AppProtocol::Http
                        && matches!(p.target_port, TargetPort::Number(n) if n == port)
                }),
        };
        let default_request;
        let request = match (http, request) {
            (false, _) => None,
            (true, Some(r)) => Some(r),
            (true, None) => {
                default_request = RequestSpec {
                    method: "GET".into(),
                    path: "/".into(),
                    host: None,
                    headers: http::HeaderMap::new(),
                };
                Some(&default_request)
            }
        };
        let host = request
            .and_then(|r| r.host.clone())
            .unwrap_or_else(|| match service {
                Some((s, _)) => s.name.clone(),
                None => dst.name.clone(),
            });
        let request = request.map(|r| rbac::Request {
            method: &r.method,
            host: &host,
            path: &r.path,
            headers: &r.headers,
        });
        let mut conn = rbac::Connection::new(
            SocketAddr::new(source.1, 0),
            SocketAddr::new(dst_ip, port),
            source.0.as_ref(),
        );
        if let Some(r) = &request {
            conn = conn.with_request(r);
        }
        let explanation = state
            .policies()
            .authorization()
            .explain_targeted(&targets, &conn);
        let allowed = explanation.decision.allowed;
        hops.push(Hop::Waypoint {
            name: format!("{}/{}", wp.namespace, wp.name),
            identity: source.0.clone(),
            layer: if request.is_some() { "HTTP" } else { "L4" },
            explanation,
        });
        if !allowed {
            return Ok(report(from, to, port, hops));
        }
        source = (
            Some(Identity {
                trust_domain: trust_domain.to_owned(),
                namespace: wp.namespace.clone(),
                service_account: wp.service_account.clone(),
            }),
            wp.addresses[0],
        );
    }
    if !dst.captured {
        hops.push(Hop::Unenforced {
            pod: format!("{}/{}", dst.namespace, dst.name),
        });
        return Ok(report(from, to, port, hops));
    }
    let peer = Peer {
        src: SocketAddr::new(source.1, 0),
        dst: SocketAddr::new(first_ip(dst, from), dst_port),
        identity: source.0.clone(),
    };
    hops.push(Hop::NodeProxy {
        pod: format!("{}/{}", dst.namespace, dst.name),
        identity: source.0,
        admission: state.policies().explain(dst, &peer),
    });
    Ok(report(from, to, port, hops))
}

/// `w`'s address of the family `peer` uses (IPv4 first).
fn first_ip(w: &Workload, peer: &Workload) -> IpAddr {
    let v4 = peer.ips.iter().any(IpAddr::is_ipv4);
    w.ips
        .iter()
        .find(|ip| ip.is_ipv4() == v4)
        .or(w.ips.first())
        .copied()
        .unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

fn report(from: &Workload, to: To<'_>, port: u16, hops: Vec<Hop>) -> Report {
    Report {
        from: format!("{}/{}", from.namespace, from.name),
        to: match to {
            To::Pod(w) => format!("pod {}/{}:{port}", w.namespace, w.name),
            To::Service(s) => format!("service {}/{}:{port}", s.namespace, s.name),
        },
        hops,
    }
}

fn who(identity: &Option<Identity>) -> String {
    identity
        .as_ref()
        .map_or("no identity (plaintext)".to_owned(), |i| i.to_string())
}

fn explanation(out: &mut String, e: &Explanation) {
    if e.considered.is_empty() {
        let _ = writeln!(out, "     no AuthorizationPolicy applies");
    }
    for c in &e.considered {
        let matched = match c.matched {
            Some(true) => "matched",
            Some(false) => "no match",
            None => "not evaluated (decided before)",
        };
        let decides = if e.decision.policy.as_deref() == Some(&*c.policy) {
            "  <- decides"
        } else {
            ""
        };
        let dry = if c.dry_run { " (dry-run)" } else { "" };
        let _ = writeln!(
            out,
            "     {:<5} {}{dry}: {matched}{decides}",
            c.action, c.policy
        );
    }
    let _ = writeln!(out, "     => {}", e.decision);
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = format!("{} -> {}\n", self.from, self.to);
        for (i, hop) in self.hops.iter().enumerate() {
            match hop {
                Hop::Waypoint {
                    name,
                    identity,
                    layer,
                    explanation: e,
                } => {
                    let _ = writeln!(
                        out,
                        "{}. waypoint {name} ({layer}), client {}: policies targeting it, its class and the service",
                        i + 1,
                        who(identity)
                    );
                    explanation(&mut out, e);
                }
                Hop::Unenforced { pod } => {
                    let _ = writeln!(
                        out,
                        "{}. {pod} is not in the mesh: no proxy judges what reaches it",
                        i + 1
                    );
                }
                Hop::NodeProxy {
                    pod,
                    identity,
                    admission,
                } => {
                    let mode = match admission.mtls {
                        MtlsMode::Strict => "STRICT",
                        MtlsMode::Permissive => "PERMISSIVE",
                    };
                    let _ = writeln!(
                        out,
                        "{}. node proxy of {pod}, peer {}: PeerAuthentication {mode}",
                        i + 1,
                        who(identity)
                    );
                    match &admission.authorization {
                        Some(e) => explanation(&mut out, e),
                        None => {
                            let _ = writeln!(out, "     => denied: plaintext under STRICT");
                        }
                    }
                }
            }
        }
        let verdict = if self.allowed() { "ALLOWED" } else { "DENIED" };
        let _ = writeln!(out, "verdict: {verdict}");
        f.write_str(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Settings, file};

    /// The analyzer's test world (a service behind a waypoint, one that is not), with a GET-only
    /// policy at the waypoint and, on the pods, one that admits only the waypoint.
    fn world() -> String {
        format!(
            "{}\n---\n{}",
            crate::analyze::tests::WORLD,
            r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-get-only, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: api}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-from-waypoint, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/waypoint]}}]}]
"#
        )
    }

    fn state() -> MeshState {
        let (objects, _) = file::load_lenient(&world(), "test.yaml").unwrap();
        crate::analyze::translate_leniently(objects, &Settings::default()).0
    }

    fn ask(state: &MeshState, to: &str, method: Option<&str>) -> Report {
        let from = find_pod(state, "shop/web-v1").unwrap();
        let (to, port) = find_destination(state, to).unwrap();
        let request = method.map(|m| RequestSpec {
            method: m.into(),
            path: "/".into(),
            host: None,
            headers: http::HeaderMap::new(),
        });
        check(state, "cluster.local", from, to, port, request.as_ref()).unwrap()
    }

    #[test]
    fn through_the_waypoint_the_request_then_the_waypoints_identity_are_judged() {
        let state = state();
        let get = ask(&state, "shop/api:80", None);
        assert!(get.allowed(), "{get}");
        assert_eq!(get.hops.len(), 2, "{get}");
        match &get.hops[1] {
            Hop::NodeProxy { identity, .. } => assert_eq!(
                identity.as_ref().unwrap().to_string(),
                "spiffe://cluster.local/ns/shop/sa/waypoint"
            ),
            other => panic!("{other:?}"),
        }
        let delete = ask(&state, "shop/api:80", Some("DELETE"));
        assert!(!delete.allowed());
        assert_eq!(delete.hops.len(), 1, "denied at the waypoint: {delete}");
        assert!(delete.to_string().contains("verdict: DENIED"));
    }

    #[test]
    fn straight_to_the_pod_only_its_node_proxy_judges_with_the_clients_identity() {
        let state = state();
        for to in ["shop/api-v1:8080", "10.0.0.2:8080"] {
            let r = ask(&state, to, None);
            assert_eq!(r.hops.len(), 1, "{r}");
            assert!(!r.allowed(), "only the waypoint's identity is allowed: {r}");
            assert!(
                r.to_string()
                    .contains("ALLOW shop/api-from-waypoint: no match"),
                "{r}"
            );
        }
    }

    #[test]
    fn a_destination_outside_the_mesh_is_judged_by_no_one() {
        let outside = "apiVersion: v1\nkind: Pod\nmetadata: {name: legacy, namespace: old}\nspec: {serviceAccountName: x, nodeName: n1, containers: [{name: c, image: i}]}\nstatus: {phase: Running, podIP: 10.0.1.1, conditions: [{type: Ready, status: \"True\"}]}\n";
        let deny_all = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: old}\nspec: {action: DENY, rules: [{}]}\n";
        let text = format!("{}\n---\n{outside}---\n{deny_all}", world());
        let (objects, _) = file::load_lenient(&text, "t").unwrap();
        let state = crate::analyze::translate_leniently(objects, &Settings::default()).0;
        let r = ask(&state, "old/legacy:80", None);
        assert!(r.allowed(), "{r}");
        assert!(r.to_string().contains("not in the mesh"), "{r}");
    }

    #[test]
    fn the_admin_query_reads_the_same_question() {
        let state = state();
        let r = answer_query(
            &state,
            "cluster.local",
            "from=shop/web-v1&to=shop/api:80&method=DELETE",
        )
        .unwrap();
        assert!(!r.allowed());
        assert!(
            answer_query(&state, "cluster.local", "to=shop/api:80")
                .unwrap_err()
                .contains("from: missing")
        );
        assert!(
            answer_query(&state, "cluster.local", "from=shop/nope&to=shop/api:80")
                .unwrap_err()
                .contains("no such pod")
        );
    }
}
