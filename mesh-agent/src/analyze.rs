//! `mesh-agent analyze`: static checks over a configuration, in `istioctl analyze`'s style.
//! Each finding has a level, a code (Istio's where Istio has the same check, `MSH…` where it
//! has none), the object, the field and a sentence. The checks read the same state the agent,
//! the waypoints and the gateways run on ([`MeshState`], built by the same translation), so
//! what they call a binding, a selection or a resolved host is what the data path does; the
//! AuthorizationPolicies are judged by the enforcement's own parser ([`rbac::Policies`]).
//!
//! What is checked:
//! - selectors that select no pod (policies, Istio Gateways): IST0127;
//! - references to nothing: a policy's `targetRefs`, a VirtualService's destination host,
//!   subset or gateway, an HTTPRoute's or GRPCRoute's parent or backend: IST0101; a
//!   DestinationRule's host: IST0174; its subset that a route uses but that selects no pod of
//!   the service: IST0173;
//! - identities named in a policy (`principals`, `namespaces`, `serviceAccounts`) that no
//!   workload has: MSH0001;
//! - services and pods bound to a waypoint that does not exist or has no ready pod (their
//!   traffic bypasses L7 policy): MSH0002;
//! - AuthorizationPolicies the node proxies enforce with HTTP fields (ALLOW rules never match:
//!   the selected workloads fail closed), with actions they ignore, or that do not parse
//!   (every workload they could select denies everything): IST0167 / IST0106;
//! - selector policies whose source identities are only ever the waypoint's for the traffic
//!   that goes through it: IST0167;
//! - several PeerAuthentications for one namespace or one pod: MSH0003;
//! - ports of a waypoint's services with no declared protocol (carried as TCP, no L7): MSH0004;
//! - objects of kinds or versions the mesh does not read (skipped): MSH0005.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;
use serde_json::Value;

use crate::config::file;
use crate::config::translate::{self, NetnsSource};
use crate::config::{ConfigError, Objects, Settings};
use crate::l7::routes::resolve_host;
use crate::rbac::{self, RbacError};
use crate::state::{AppProtocol, MeshState, Workload};

/// How bad a finding is; an `Error` makes `analyze` exit with status 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Level {
    Error,
    Warning,
    Info,
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub level: Level,
    /// `IST0101`, `MSH0002`…
    pub code: &'static str,
    /// Istio's message name (`ReferencedResourceNotFound`), or this mesh's.
    pub name: &'static str,
    /// `VirtualService bookinfo/reviews`.
    pub object: String,
    /// The field, as a path into the object (`spec.http[0].route[1].destination.subset`);
    /// empty for the object as a whole.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Finding {
    /// `Error [IST0101] (VirtualService bookinfo/reviews spec.http[0]…) Referenced …`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Error => "Error",
            Level::Warning => "Warning",
            Level::Info => "Info",
        };
        write!(f, "{level} [{}] ({}", self.code, self.object)?;
        if !self.field.is_empty() {
            write!(f, " {}", self.field)?;
        }
        write!(f, ") {}", self.message)
    }
}

/// The checks of one kind of problem: code, name, level.
#[derive(Clone, Copy)]
pub struct Check {
    pub code: &'static str,
    pub name: &'static str,
    pub level: Level,
}

pub const REFERENCED_RESOURCE_NOT_FOUND: Check = Check {
    code: "IST0101",
    name: "ReferencedResourceNotFound",
    level: Level::Error,
};
pub const SCHEMA_VALIDATION_ERROR: Check = Check {
    code: "IST0106",
    name: "SchemaValidationError",
    level: Level::Error,
};
pub const NO_MATCHING_WORKLOADS: Check = Check {
    code: "IST0127",
    name: "NoMatchingWorkloadsFound",
    level: Level::Warning,
};
pub const INEFFECTIVE_POLICY: Check = Check {
    code: "IST0167",
    name: "IneffectivePolicy",
    level: Level::Warning,
};
pub const SUBSET_SELECTS_NO_POD: Check = Check {
    code: "IST0173",
    name: "DestinationRuleSubsetNotSelectPods",
    level: Level::Error,
};
pub const UNKNOWN_DESTINATION_RULE_HOST: Check = Check {
    code: "IST0174",
    name: "UnknownDestinationRuleHost",
    level: Level::Warning,
};
pub const UNKNOWN_SOURCE_IDENTITY: Check = Check {
    code: "MSH0001",
    name: "UnknownSourceIdentity",
    level: Level::Warning,
};
pub const WAYPOINT_UNAVAILABLE: Check = Check {
    code: "MSH0002",
    name: "WaypointUnavailable",
    level: Level::Error,
};
pub const CONFLICTING_PEER_AUTHENTICATION: Check = Check {
    code: "MSH0003",
    name: "ConflictingPeerAuthentication",
    level: Level::Warning,
};
pub const PORT_PROTOCOL_UNDECLARED: Check = Check {
    code: "MSH0004",
    name: "PortProtocolUndeclared",
    level: Level::Warning,
};
pub const UNKNOWN_KIND: Check = Check {
    code: "MSH0005",
    name: "UnknownKind",
    level: Level::Warning,
};

impl Check {
    pub fn finding(
        self,
        object: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Finding {
        Finding {
            level: self.level,
            code: self.code,
            name: self.name,
            object: object.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same check at another level (a policy that fails closed is an error).
    const fn at(self, level: Level) -> Check {
        Check { level, ..self }
    }
}

/// Every check over `state`, sorted by object then field.
pub fn analyze(state: &MeshState, trust_domain: &str) -> Vec<Finding> {
    let cx = Cx {
        state,
        root: state.policies().root_namespace(),
        trust_domain,
    };
    let mut out = Vec::new();
    cx.selectors(&mut out);
    cx.target_refs(&mut out);
    cx.source_identities(&mut out);
    cx.virtual_services(&mut out);
    cx.gateway_api_routes(&mut out);
    cx.destination_rules(&mut out);
    cx.waypoint_bindings(&mut out);
    cx.enforcement(&mut out);
    cx.identities_behind_waypoints(&mut out);
    cx.peer_authentications(&mut out);
    cx.waypoint_ports(&mut out);
    out.sort_by(|a, b| (&a.object, &a.field, a.code).cmp(&(&b.object, &b.field, b.code)));
    out.dedup();
    out
}

/// The objects of `files` as one configuration, what could not be read of them as findings
/// (a file that does not parse: IST0106; objects of kinds or versions this mesh does not
/// read: MSH0005), and the state they make; objects the translation refuses are left out,
/// each reported (IST0106), as the Kubernetes source leaves them out.
pub fn load_files(files: &[std::path::PathBuf], settings: &Settings) -> (MeshState, Vec<Finding>) {
    let (objects, mut findings) = read_files(files);
    let (state, refused) = translate_leniently(objects, settings);
    findings.extend(refused);
    (state, findings)
}

/// The objects of `files` as one configuration, and what could not be read of them (see
/// [`load_files`]).
pub fn read_files(files: &[std::path::PathBuf]) -> (Objects, Vec<Finding>) {
    let mut objects = Objects::default();
    let mut findings = Vec::new();
    for path in files {
        let origin = path.display().to_string();
        let loaded = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|text| file::load_lenient(&text, &origin).map_err(|e| e.to_string()));
        match loaded {
            Ok((more, skipped)) => {
                objects.append(more);
                findings.extend(skipped.into_iter().map(|s| {
                    UNKNOWN_KIND.finding(
                        s.object,
                        s.field,
                        format!("{}; the object is skipped ({})", s.message, s.at),
                    )
                }));
            }
            Err(message) => findings.push(SCHEMA_VALIDATION_ERROR.finding(
                origin,
                "",
                format!("{message}; nothing of this file is analyzed"),
            )),
        }
    }
    (objects, findings)
}

/// The state of `objects`, leaving out (and reporting) each object the translation refuses.
pub fn translate_leniently(mut objects: Objects, settings: &Settings) -> (MeshState, Vec<Finding>) {
    let mut refused = Vec::new();
    loop {
        match translate::translate(&objects, "analyze", NetnsSource::Discovered, settings) {
            Ok(state) => return (state, refused),
            Err(ConfigError::Object { object, message }) if objects.remove(&object) => {
                refused.push(SCHEMA_VALIDATION_ERROR.finding(
                    object.to_string(),
                    "",
                    format!("{message}; the object is left out"),
                ));
            }
            Err(e) => {
                refused.push(SCHEMA_VALIDATION_ERROR.finding("configuration", "", e.to_string()));
                return (MeshState::default(), refused);
            }
        }
    }
}

/// The findings as `istioctl analyze` prints them, or a line saying there are none.
pub fn render_text(findings: &[Finding]) -> String {
    if findings.is_empty() {
        return "✔ No validation issues found when analyzing the configuration.\n".to_owned();
    }
    findings.iter().map(|f| format!("{f}\n")).collect()
}

/// Whether any finding is an error (`analyze` then exits with status 1).
pub fn has_errors(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.level == Level::Error)
}

struct Cx<'a> {
    state: &'a MeshState,
    root: &'a str,
    trust_domain: &'a str,
}

/// `Kind namespace/name` of a raw object.
fn describe(kind: &str, object: &Value) -> String {
    let meta = &object["metadata"];
    format!(
        "{kind} {}/{}",
        meta["namespace"].as_str().unwrap_or("default"),
        meta["name"].as_str().unwrap_or_default()
    )
}

fn namespace_of(object: &Value) -> &str {
    object["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
}

/// `spec.selector.matchLabels` (Istio's policies), or `spec.selector` (Istio's Gateway).
fn match_labels(selector: &Value) -> Option<BTreeMap<String, String>> {
    let labels = selector
        .get("matchLabels")
        .unwrap_or(selector)
        .as_object()?;
    let labels: BTreeMap<String, String> = labels
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect();
    (!labels.is_empty()).then_some(labels)
}

fn has_labels(w: &Workload, labels: &BTreeMap<String, String>) -> bool {
    labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
}

fn show_labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A string list field, with each value's index.
fn strings(v: &Value) -> impl Iterator<Item = (usize, &str)> {
    v.as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, s)| Some((i, s.as_str()?)))
}

fn items(v: &Value) -> impl Iterator<Item = (usize, &Value)> {
    v.as_array().into_iter().flatten().enumerate()
}

/// Istio's string match: exact, `*`, `prefix*` or `*suffix`.
fn string_matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return !value.is_empty();
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

/// A value with a wildcard: it names no one in particular.
fn is_pattern(s: &str) -> bool {
    s.contains('*')
}

impl Cx<'_> {
    /// Workloads a policy in `namespace` may select: that namespace's, or every one from the
    /// root namespace.
    fn in_scope<'s>(&'s self, namespace: &'s str) -> impl Iterator<Item = &'s Workload> + 's {
        self.state
            .workloads
            .iter()
            .filter(move |w| namespace == self.root || w.namespace == namespace)
    }

    /// The workloads `policy` (an AuthorizationPolicy or PeerAuthentication) applies to.
    fn selected<'s>(&'s self, policy: &'s Value) -> Vec<&'s Workload> {
        let labels = match_labels(&policy["spec"]["selector"]);
        self.in_scope(namespace_of(policy))
            .filter(|w| labels.as_ref().is_none_or(|l| has_labels(w, l)))
            .collect()
    }

    fn service_exists(&self, namespace: &str, name: &str) -> bool {
        self.state.service(namespace, name).is_some()
    }

    fn gateway_api_gateway_exists(&self, namespace: &str, name: &str) -> bool {
        self.state
            .raw
            .gateways
            .iter()
            .any(|g| namespace_of(g) == namespace && g["metadata"]["name"].as_str() == Some(name))
    }

    fn selectors(&self, out: &mut Vec<Finding>) {
        let raw = &self.state.raw;
        let policies = [
            ("AuthorizationPolicy", &raw.authorization_policies),
            ("PeerAuthentication", &raw.peer_authentications),
        ];
        for (kind, list) in policies {
            for p in list.iter() {
                let Some(labels) = match_labels(&p["spec"]["selector"]) else {
                    continue;
                };
                if self.selected(p).is_empty() {
                    out.push(NO_MATCHING_WORKLOADS.finding(
                        describe(kind, p),
                        "spec.selector.matchLabels",
                        format!(
                            "No matching workloads for this resource with the following labels: {}",
                            show_labels(&labels)
                        ),
                    ));
                }
            }
        }
        // Istio's Gateways select their gateway pods in any namespace.
        for g in &raw.istio_gateways {
            let Some(labels) = match_labels(&g["spec"]["selector"]) else {
                continue;
            };
            if !self.state.workloads.iter().any(|w| has_labels(w, &labels)) {
                out.push(NO_MATCHING_WORKLOADS.finding(
                    describe("Gateway", g),
                    "spec.selector",
                    format!(
                        "No matching workloads for this resource with the following labels: {}; no gateway serves it",
                        show_labels(&labels)
                    ),
                ));
            }
        }
    }

    /// An AuthorizationPolicy's `targetRef`/`targetRefs` naming nothing.
    fn target_refs(&self, out: &mut Vec<Finding>) {
        for p in &self.state.raw.authorization_policies {
            let spec = &p["spec"];
            let refs: Vec<(String, &Value)> = match (&spec["targetRef"], &spec["targetRefs"]) {
                (Value::Object(_), _) => vec![("spec.targetRef".to_owned(), &spec["targetRef"])],
                (_, refs) => items(refs)
                    .map(|(i, r)| (format!("spec.targetRefs[{i}]"), r))
                    .collect(),
            };
            let ns = namespace_of(p);
            for (field, r) in refs {
                let name = r["name"].as_str().unwrap_or_default();
                let namespace = r["namespace"].as_str().unwrap_or(ns);
                let kind = r["kind"].as_str().unwrap_or_default();
                let found = match kind {
                    "Gateway" => self.gateway_api_gateway_exists(namespace, name),
                    "Service" => self.service_exists(namespace, name),
                    "GatewayClass" => {
                        name == crate::config::translate::WAYPOINT_CLASS
                            || name == crate::l7::gateways::INGRESS_CLASS
                            || self
                                .state
                                .raw
                                .gateways
                                .iter()
                                .any(|g| g["spec"]["gatewayClassName"].as_str() == Some(name))
                    }
                    _ => true, // Refused by the enforcement itself: reported there.
                };
                if !found {
                    out.push(REFERENCED_RESOURCE_NOT_FOUND.finding(
                        describe("AuthorizationPolicy", p),
                        format!("{field}.name"),
                        format!("Referenced {kind} not found: \"{namespace}/{name}\"; the policy applies to nothing"),
                    ));
                }
            }
        }
    }

    /// `from.source.principals` / `namespaces` / `serviceAccounts` naming no workload.
    fn source_identities(&self, out: &mut Vec<Finding>) {
        let workloads = &self.state.workloads;
        let has_namespace = |ns: &str| workloads.iter().any(|w| w.namespace == ns);
        let has_account = |ns: &str, sa: &str| {
            workloads
                .iter()
                .any(|w| w.namespace == ns && w.service_account == sa)
        };
        for p in &self.state.raw.authorization_policies {
            for (i, rule) in items(&p["spec"]["rules"]) {
                for (j, from) in items(&rule["from"]) {
                    let source = &from["source"];
                    let at = |field: &str, k: usize| {
                        format!("spec.rules[{i}].from[{j}].source.{field}[{k}]")
                    };
                    let mut unknown = |field: &str, k: usize, what: String| {
                        out.push(UNKNOWN_SOURCE_IDENTITY.finding(
                            describe("AuthorizationPolicy", p),
                            at(field, k),
                            format!("{what}: no workload of the configuration has it, so this never matches"),
                        ));
                    };
                    for (k, principal) in strings(&source["principals"]) {
                        if is_pattern(principal) {
                            continue;
                        }
                        let known = principal
                            .strip_prefix(self.trust_domain)
                            .and_then(|rest| rest.strip_prefix("/ns/"))
                            .and_then(|rest| rest.split_once("/sa/"))
                            .is_some_and(|(ns, sa)| has_account(ns, sa));
                        if !known {
                            unknown("principals", k, format!("principal \"{principal}\""));
                        }
                    }
                    for (k, ns) in strings(&source["namespaces"]) {
                        if !is_pattern(ns) && !has_namespace(ns) {
                            unknown("namespaces", k, format!("namespace \"{ns}\""));
                        }
                    }
                    for (k, account) in strings(&source["serviceAccounts"]) {
                        let (ns, sa) = account
                            .split_once('/')
                            .unwrap_or((namespace_of(p), account));
                        if !has_account(ns, sa) {
                            unknown(
                                "serviceAccounts",
                                k,
                                format!("service account \"{ns}/{sa}\""),
                            );
                        }
                    }
                }
            }
        }
    }

    /// A destination host (and subset) of a routing object in `namespace`.
    fn destination(
        &self,
        object: &str,
        field: &str,
        destination: &Value,
        namespace: &str,
        out: &mut Vec<Finding>,
    ) {
        let Some(host) = destination["host"].as_str() else {
            return;
        };
        if is_pattern(host) {
            return;
        }
        let (ns, name) = resolve_host(host, namespace);
        if !self.service_exists(&ns, &name) {
            out.push(REFERENCED_RESOURCE_NOT_FOUND.finding(
                object,
                format!("{field}.host"),
                format!("Referenced host not found: \"{host}\" (no Service {ns}/{name})"),
            ));
            return;
        }
        let Some(subset) = destination["subset"].as_str() else {
            return;
        };
        let defined = self.state.raw.destination_rules.iter().any(|dr| {
            dr["spec"]["host"]
                .as_str()
                .is_some_and(|h| resolve_host(h, namespace_of(dr)) == (ns.clone(), name.clone()))
                && items(&dr["spec"]["subsets"]).any(|(_, s)| s["name"].as_str() == Some(subset))
        });
        if !defined {
            out.push(REFERENCED_RESOURCE_NOT_FOUND.finding(
                object,
                format!("{field}.subset"),
                format!(
                    "Referenced host+subset in destinationrule not found: \"{host}+{subset}\"; requests routed there fail with 503"
                ),
            ));
        }
    }

    fn virtual_services(&self, out: &mut Vec<Finding>) {
        for vs in &self.state.raw.virtual_services {
            let object = describe("VirtualService", vs);
            let ns = namespace_of(vs);
            let spec = &vs["spec"];
            let gateways: Vec<(usize, &str)> = strings(&spec["gateways"]).collect();
            let for_mesh = gateways.is_empty() || gateways.iter().any(|(_, g)| *g == "mesh");
            for (i, gateway) in &gateways {
                if *gateway == "mesh" {
                    continue;
                }
                let (gns, gname) = gateway.split_once('/').unwrap_or((ns, gateway));
                let exists = self.state.raw.istio_gateways.iter().any(|g| {
                    namespace_of(g) == gns && g["metadata"]["name"].as_str() == Some(gname)
                });
                if !exists {
                    out.push(REFERENCED_RESOURCE_NOT_FOUND.finding(
                        &object,
                        format!("spec.gateways[{i}]"),
                        format!("Referenced gateway not found: \"{gns}/{gname}\""),
                    ));
                }
            }
            if for_mesh {
                for (i, host) in strings(&spec["hosts"]) {
                    let (hns, hname) = resolve_host(host, ns);
                    if !is_pattern(host) && !self.service_exists(&hns, &hname) {
                        out.push(REFERENCED_RESOURCE_NOT_FOUND.finding(
                            &object,
                            format!("spec.hosts[{i}]"),
                            format!("Referenced host not found: \"{host}\"; the mesh applies this VirtualService to Services only"),
                        ));
                    }
                }
            }
            for section in ["http", "tcp", "tls"] {
                for (i, rule) in items(&spec[section]) {
                    for (j, route) in items(&rule["route"]) {
                        let field = format!("spec.{section}[{i}].route[{j}].destination");
                        self.destination(&object, &field, &route["destination"], ns, out);
                    }
                    if rule["mirror"].is_object() {
                        let field = format!("spec.{section}[{i}].mirror");
                        self.destination(&object, &field, &rule["mirror"], ns, out);
                    }
                    for (j, mirror) in items(&rule["mirrors"]) {
                        let field = format!("spec.{section}[{i}].mirrors[{j}].destination");
                        self.destination(&object, &field, &mirror["destination"], ns, out);
                    }
                }
            }
        }
    }

    fn gateway_api_routes(&self, out: &mut Vec<Finding>) {
        let raw = &self.state.raw;
        for (kind, routes) in [
            ("HTTPRoute", &raw.http_routes),
            ("GRPCRoute", &raw.grpc_routes),
        ] {
            for route in routes.iter() {
                let object = describe(kind, route);
                let ns = namespace_of(route);
                let spec = &route["spec"];
                for (i, parent) in items(&spec["parentRefs"]) {
                    let name = parent["name"].as_str().unwrap_or_default();
                    let pns = parent["namespace"].as_str().unwrap_or(ns);
                    let (what, exists) = match parent["kind"].as_str().unwrap_or("Gateway") {
                        "Service" => ("Service", self.service_exists(pns, name)),
                        _ => ("Gateway", self.gateway_api_gateway_exists(pns, name)),
                    };
                    if !exists {
                        out.push(REFERENCED_RESOURCE_NOT_FOUND.finding(
                            &object,
                            format!("spec.parentRefs[{i}]"),
                            format!("Referenced {what} not found: \"{pns}/{name}\"; the route is attached to nothing there"),
                        ));
                    }
                }
                for (i, rule) in items(&spec["rules"]) {
                    for (j, backend) in items(&rule["backendRefs"]) {
                        if backend["kind"].as_str().is_some_and(|k| k != "Service") {
                            continue;
                        }
                        let name = backend["name"].as_str().unwrap_or_default();
                        let bns = backend["namespace"].as_str().unwrap_or(ns);
                        if !self.service_exists(bns, name) {
                            out.push(REFERENCED_RESOURCE_NOT_FOUND.finding(
                                &object,
                                format!("spec.rules[{i}].backendRefs[{j}]"),
                                format!("Referenced Service not found: \"{bns}/{name}\"; requests sent there fail with 500"),
                            ));
                        }
                    }
                }
            }
        }
    }

    /// (namespace, service, subset) of every VirtualService destination.
    fn used_subsets(&self) -> BTreeSet<(String, String, String)> {
        let mut used = BTreeSet::new();
        for vs in &self.state.raw.virtual_services {
            let ns = namespace_of(vs);
            for section in ["http", "tcp", "tls"] {
                for (_, rule) in items(&vs["spec"][section]) {
                    let destinations = items(&rule["route"])
                        .map(|(_, r)| &r["destination"])
                        .chain(items(&rule["mirrors"]).map(|(_, m)| &m["destination"]))
                        .chain(std::iter::once(&rule["mirror"]));
                    for d in destinations {
                        if let (Some(host), Some(subset)) =
                            (d["host"].as_str(), d["subset"].as_str())
                        {
                            let (hns, hname) = resolve_host(host, ns);
                            used.insert((hns, hname, subset.to_owned()));
                        }
                    }
                }
            }
        }
        used
    }

    fn destination_rules(&self, out: &mut Vec<Finding>) {
        let used = self.used_subsets();
        for dr in &self.state.raw.destination_rules {
            let object = describe("DestinationRule", dr);
            let Some(host) = dr["spec"]["host"].as_str() else {
                continue;
            };
            let (ns, name) = resolve_host(host, namespace_of(dr));
            let Some(service) = self.state.service(&ns, &name) else {
                if !is_pattern(host) {
                    out.push(UNKNOWN_DESTINATION_RULE_HOST.finding(
                        &object,
                        "spec.host",
                        format!("The host {host} defined in the DestinationRule does not match any services in the mesh."),
                    ));
                }
                continue;
            };
            for (i, subset) in items(&dr["spec"]["subsets"]) {
                // Only a subset some route sends to: Istio's samples define subsets for
                // versions a cluster may not run.
                let subset_name = subset["name"].as_str().unwrap_or_default();
                if !used.contains(&(ns.clone(), name.clone(), subset_name.to_owned())) {
                    continue;
                }
                let labels = match_labels(&subset["labels"]).unwrap_or_default();
                let selects = self.state.workloads.iter().any(|w| {
                    w.namespace == service.namespace
                        && service.selects(&w.labels)
                        && has_labels(w, &labels)
                });
                if !selects {
                    out.push(SUBSET_SELECTS_NO_POD.finding(
                        &object,
                        format!("spec.subsets[{i}].labels"),
                        format!(
                            "The Subset {} defined in the DestinationRule does not select any pods of Service {ns}/{name} ({}). Which may lead to 503 UH (NoHealthyUpstream).",
                            subset["name"].as_str().unwrap_or_default(),
                            show_labels(&labels)
                        ),
                    ));
                }
            }
        }
    }

    /// Services and captured pods bound to a waypoint that does not exist or has no ready pod:
    /// their traffic goes straight to the destination, past every L7 policy.
    fn waypoint_bindings(&self, out: &mut Vec<Finding>) {
        let problem = |r| match self.state.waypoint(r) {
            None => Some("does not exist"),
            Some(w) if w.addresses.is_empty() => Some("has no ready pod"),
            Some(_) => None,
        };
        let field = "metadata.labels[istio.io/use-waypoint]";
        for s in &self.state.services {
            if let Some(r) = &s.waypoint
                && let Some(problem) = problem(r)
            {
                out.push(WAYPOINT_UNAVAILABLE.finding(
                    format!("Service {}/{}", s.namespace, s.name),
                    field,
                    format!("waypoint {}/{} {problem}: traffic to this service goes direct, bypassing its L7 policy and routes", r.namespace, r.name),
                ));
            }
        }
        for w in &self.state.workloads {
            if let Some(r) = &w.waypoint
                && w.captured
                && let Some(problem) = problem(r)
            {
                out.push(WAYPOINT_UNAVAILABLE.finding(
                    format!("Pod {}/{}", w.namespace, w.name),
                    field,
                    format!("waypoint {}/{} {problem}: traffic to this pod goes direct, bypassing its L7 policy", r.namespace, r.name),
                ));
            }
        }
    }

    /// What the enforcement's own parser says about the AuthorizationPolicies.
    fn enforcement(&self, out: &mut Vec<Finding>) {
        let (_, errors) = rbac::Policies::parse(&self.state.raw.authorization_policies, self.root);
        for error in errors {
            let finding = match &error {
                RbacError::Invalid { policy, field, reason } => SCHEMA_VALIDATION_ERROR.finding(
                    format!("AuthorizationPolicy {policy}"),
                    field.clone(),
                    format!("{reason}: the policy is not used, and every workload it could select denies all connections until it is fixed"),
                ),
                RbacError::UnsupportedAction { policy, action } => INEFFECTIVE_POLICY.finding(
                    format!("AuthorizationPolicy {policy}"),
                    "spec.action",
                    format!("The policy has no impact: action {action} is not enforced by the node proxies; target a waypoint (targetRefs) for it to apply"),
                ),
                RbacError::HttpAttributes { policy, deny, fields } => {
                    let effect = if *deny {
                        "its DENY rules are enforced without them, denying more than written"
                    } else {
                        "ALLOW rules using them never match, so the selected workloads fail closed for what they were meant to allow"
                    };
                    INEFFECTIVE_POLICY.at(if *deny { Level::Warning } else { Level::Error }).finding(
                        format!("AuthorizationPolicy {policy}"),
                        "spec.rules",
                        format!("The policy has no impact as written: HTTP attributes ({}) cannot be enforced by the node proxies, which see connections, not requests; {effect}. Bind the workloads to a waypoint and target the policy at it (targetRefs)", fields.join(", ")),
                    )
                }
            };
            out.push(finding);
        }
    }

    /// A selector policy (enforced at the destination's node proxy) naming source identities,
    /// on workloads behind a waypoint: what comes through the waypoint carries the waypoint's
    /// identity, so such rules only ever see it.
    fn identities_behind_waypoints(&self, out: &mut Vec<Finding>) {
        for p in &self.state.raw.authorization_policies {
            let spec = &p["spec"];
            if spec["targetRef"].is_object() || spec["targetRefs"].is_array() {
                continue;
            }
            let names_sources = items(&spec["rules"]).any(|(_, rule)| {
                items(&rule["from"]).any(|(_, from)| {
                    let s = &from["source"];
                    ["principals", "namespaces", "serviceAccounts"]
                        .iter()
                        .any(|f| s[*f].as_array().is_some_and(|a| !a.is_empty()))
                })
            });
            if !names_sources {
                continue;
            }
            let mut behind: BTreeSet<(String, String, String)> = BTreeSet::new();
            for w in self.selected(p) {
                let bound = w.waypoint.iter().chain(
                    self.state
                        .services
                        .iter()
                        .filter(|s| s.namespace == w.namespace && s.selects(&w.labels))
                        .filter_map(|s| s.waypoint.as_ref()),
                );
                for r in bound {
                    if let Some(wp) = self.state.waypoint(r) {
                        behind.insert((
                            wp.namespace.clone(),
                            wp.name.clone(),
                            wp.service_account.clone(),
                        ));
                    }
                }
            }
            for (ns, name, sa) in behind {
                let identity = format!("{}/ns/{ns}/sa/{sa}", self.trust_domain);
                let account = format!("{ns}/{sa}");
                // Some source clause the waypoint itself satisfies: the rule was written
                // for it.
                let admits_waypoint = items(&spec["rules"]).any(|(_, rule)| {
                    items(&rule["from"]).any(|(_, from)| {
                        let s = &from["source"];
                        strings(&s["principals"]).any(|(_, p)| string_matches(p, &identity))
                            || strings(&s["namespaces"]).any(|(_, n)| string_matches(n, &ns))
                            || strings(&s["serviceAccounts"]).any(|(_, a)| a == account)
                    })
                });
                if admits_waypoint {
                    continue;
                }
                out.push(INEFFECTIVE_POLICY.finding(
                    describe("AuthorizationPolicy", p),
                    "spec.rules",
                    format!("The policy has no impact on traffic through waypoint {ns}/{name}: its selected workloads are behind it, and what it forwards carries its identity {identity}, not the client's; target the policy at the waypoint or its services (targetRefs) to judge the clients"),
                ));
            }
        }
    }

    /// More than one namespace-wide (or mesh-wide) PeerAuthentication in a namespace, or
    /// more than one selecting the same pod: only one applies.
    fn peer_authentications(&self, out: &mut Vec<Finding>) {
        let pas = &self.state.raw.peer_authentications;
        let mut wide: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
        for pa in pas {
            if match_labels(&pa["spec"]["selector"]).is_none() {
                wide.entry(namespace_of(pa)).or_default().push(pa);
            }
        }
        for (ns, list) in wide {
            if list.len() > 1 {
                let names: Vec<String> = list
                    .iter()
                    .map(|p| describe("PeerAuthentication", p))
                    .collect();
                let scope = if ns == self.root {
                    "mesh-wide"
                } else {
                    "namespace-wide"
                };
                for p in &list[1..] {
                    out.push(CONFLICTING_PEER_AUTHENTICATION.finding(
                        describe("PeerAuthentication", p),
                        "spec.selector",
                        format!("{} {scope} PeerAuthentications in {ns} ({}): only one applies; keep one", list.len(), names.join(", ")),
                    ));
                }
            }
        }
        let mut by_pod: BTreeMap<(&str, &str), Vec<String>> = BTreeMap::new();
        for pa in pas {
            if match_labels(&pa["spec"]["selector"]).is_some() {
                for w in self.selected(pa) {
                    by_pod
                        .entry((&w.namespace, &w.name))
                        .or_default()
                        .push(describe("PeerAuthentication", pa));
                }
            }
        }
        for ((ns, pod), list) in by_pod {
            if list.len() > 1 {
                for p in &list[1..] {
                    out.push(CONFLICTING_PEER_AUTHENTICATION.finding(
                        p.clone(),
                        "spec.selector.matchLabels",
                        format!("Pod {ns}/{pod} is selected by {} PeerAuthentications ({}): only one applies", list.len(), list.join(", ")),
                    ));
                }
            }
        }
    }

    /// Ports of services bound to a waypoint with no declared protocol: the waypoint carries
    /// them as TCP, so their HTTP routes and policies do not apply.
    fn waypoint_ports(&self, out: &mut Vec<Finding>) {
        for s in &self.state.services {
            if s.waypoint.is_none() {
                continue;
            }
            for (i, port) in s.ports.iter().enumerate() {
                let declared = port.app_protocol.is_some()
                    || port.name.as_deref().is_some_and(|n| {
                        let prefix = n.split('-').next().unwrap_or(n);
                        PROTOCOL_NAMES.contains(&prefix.to_ascii_lowercase().as_str())
                    });
                if port.app_protocol() == AppProtocol::Tcp && !declared {
                    out.push(PORT_PROTOCOL_UNDECLARED.finding(
                        format!("Service {}/{}", s.namespace, s.name),
                        format!("spec.ports[{i}]"),
                        format!("port {} declares no protocol (name it http-… or grpc-…, or set appProtocol): its waypoint carries it as TCP, and HTTP routes and policies do not apply to it", port.port),
                    ));
                }
            }
        }
    }
}

/// The protocol prefixes of Istio's port naming convention.
const PROTOCOL_NAMES: [&str; 12] = [
    "http", "http2", "https", "grpc", "h2c", "tcp", "tls", "mongo", "mysql", "redis", "udp", "sctp",
];

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Two services in an ambient namespace, one behind a waypoint, their pods with
    /// versions and accounts, and the waypoint's pod.
    pub(crate) const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-v1, namespace: shop, labels: {app: web, version: v1}}
spec: {serviceAccountName: web, nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.0.0.1, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-v1, namespace: shop, labels: {app: api, version: v1}}
spec: {serviceAccountName: api, nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.0.0.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {serviceAccountName: waypoint, nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.0.0.9, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.2, selector: {app: api}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: shop}
spec: {clusterIP: 10.96.0.9, selector: {gateway.networking.k8s.io/gateway-name: waypoint}, ports: [{name: mesh, port: 15008}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  subsets: [{name: v1, labels: {version: v1}}]
"#;

    /// (code, object, field) of every finding over WORLD plus `extra`.
    fn findings(extra: &str) -> Vec<(&'static str, String, String)> {
        let text = format!("{WORLD}\n---\n{extra}");
        let (objects, skipped) = file::load_lenient(&text, "test.yaml").unwrap();
        let settings = Settings::default();
        let (state, mut out) = translate_leniently(objects, &settings);
        out.extend(
            skipped
                .into_iter()
                .map(|s| UNKNOWN_KIND.finding(s.object, s.field, s.message)),
        );
        out.extend(analyze(&state, &settings.trust_domain));
        out.into_iter()
            .map(|f| (f.code, f.object, f.field))
            .collect()
    }

    fn codes(extra: &str) -> Vec<&'static str> {
        findings(extra).into_iter().map(|f| f.0).collect()
    }

    #[test]
    fn the_world_itself_is_clean() {
        assert_eq!(findings(""), []);
    }

    #[test]
    fn a_selector_that_selects_no_pod() {
        let policy = |app: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  action: DENY\n  rules: [{{to: [{{operation: {{ports: [\"9\"]}}}}]}}]\n"
            )
        };
        assert_eq!(
            findings(&policy("nope")),
            [(
                "IST0127",
                "AuthorizationPolicy shop/p".into(),
                "spec.selector.matchLabels".into()
            )]
        );
        assert_eq!(codes(&policy("web")), Vec::<&str>::new());
    }

    #[test]
    fn a_target_ref_to_nothing() {
        let policy = |name: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n  targetRefs: [{{kind: Service, group: \"\", name: {name}}}]\n  action: ALLOW\n  rules: [{{to: [{{operation: {{methods: [GET]}}}}]}}]\n"
            )
        };
        assert_eq!(
            findings(&policy("nope")),
            [(
                "IST0101",
                "AuthorizationPolicy shop/p".into(),
                "spec.targetRefs[0].name".into()
            )]
        );
        assert_eq!(codes(&policy("api")), Vec::<&str>::new());
    }

    #[test]
    fn a_source_identity_no_workload_has() {
        let policy = |principal: &str, ns: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  rules: [{{from: [{{source: {{principals: [\"{principal}\"], namespaces: [\"{ns}\"]}}}}]}}]\n"
            )
        };
        assert_eq!(
            codes(&policy("cluster.local/ns/shop/sa/ghost", "elsewhere")),
            ["MSH0001", "MSH0001"]
        );
        assert_eq!(
            codes(&policy("cluster.local/ns/shop/sa/api", "shop")),
            Vec::<&str>::new()
        );
        assert_eq!(
            codes(&policy("cluster.local/ns/*", "sh*")),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn virtual_service_hosts_subsets_and_gateways_that_do_not_exist() {
        let vs = |host: &str, subset: &str, gateways: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: shop}}\nspec:\n  hosts: [web]\n  gateways: [{gateways}]\n  http: [{{route: [{{destination: {{host: {host}, subset: {subset}}}}}]}}]\n"
            )
        };
        assert_eq!(codes(&vs("web", "v1", "mesh")), Vec::<&str>::new());
        assert_eq!(
            findings(&vs("web", "v9", "mesh")),
            [(
                "IST0101",
                "VirtualService shop/web".into(),
                "spec.http[0].route[0].destination.subset".into()
            )]
        );
        assert_eq!(
            findings(&vs("ghost.shop.svc.cluster.local", "v1", "mesh")),
            [(
                "IST0101",
                "VirtualService shop/web".into(),
                "spec.http[0].route[0].destination.host".into()
            )]
        );
        assert_eq!(
            findings(&vs("web", "v1", "no-such-gateway")),
            [(
                "IST0101",
                "VirtualService shop/web".into(),
                "spec.gateways[0]".into()
            )]
        );
    }

    #[test]
    fn http_route_parents_and_backends_that_do_not_exist() {
        let route = |parent: &str, backend: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec:\n  parentRefs: [{{kind: Service, group: \"\", name: {parent}}}]\n  rules: [{{backendRefs: [{{name: {backend}, port: 80}}]}}]\n"
            )
        };
        assert_eq!(codes(&route("api", "api")), Vec::<&str>::new());
        assert_eq!(
            findings(&route("ghost", "nope")),
            [
                (
                    "IST0101",
                    "HTTPRoute shop/r".into(),
                    "spec.parentRefs[0]".into()
                ),
                (
                    "IST0101",
                    "HTTPRoute shop/r".into(),
                    "spec.rules[0].backendRefs[0]".into()
                ),
            ]
        );
    }

    #[test]
    fn destination_rule_hosts_and_subsets_that_select_nothing() {
        let dr = |host: &str, version: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: other, namespace: shop}}\nspec:\n  host: {host}\n  subsets: [{{name: s, labels: {{version: {version}}}}}]\n"
            )
        };
        let used = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: api, namespace: shop}\nspec:\n  hosts: [api]\n  http: [{route: [{destination: {host: api, subset: s}}]}]\n";
        assert_eq!(
            codes(&format!("{}---\n{used}", dr("api", "v1"))),
            Vec::<&str>::new()
        );
        // Defined for a version that does not run, and not used: nothing to say.
        assert_eq!(codes(&dr("api", "v2")), Vec::<&str>::new());
        assert_eq!(
            findings(&format!("{}---\n{used}", dr("api", "v2"))),
            [(
                "IST0173",
                "DestinationRule shop/other".into(),
                "spec.subsets[0].labels".into()
            )]
        );
        assert_eq!(codes(&dr("ghost", "v1")), ["IST0174"]);
    }

    #[test]
    fn a_binding_to_a_waypoint_that_does_not_exist() {
        let service = |waypoint: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: more, namespace: shop, labels: {{istio.io/use-waypoint: {waypoint}}}}}\nspec: {{clusterIP: 10.96.0.3, selector: {{app: web}}, ports: [{{name: http, port: 80}}]}}\n"
            )
        };
        assert_eq!(codes(&service("waypoint")), Vec::<&str>::new());
        assert_eq!(
            findings(&service("gone")),
            [(
                "MSH0002",
                "Service shop/more".into(),
                "metadata.labels[istio.io/use-waypoint]".into()
            )]
        );
    }

    #[test]
    fn http_fields_in_a_policy_the_node_proxies_enforce_fail_closed() {
        let policy = |how: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n  {how}\n  action: ALLOW\n  rules: [{{to: [{{operation: {{methods: [GET]}}}}]}}]\n"
            )
        };
        let bad = findings(&policy("selector: {matchLabels: {app: web}}"));
        assert_eq!(
            bad,
            [(
                "IST0167",
                "AuthorizationPolicy shop/p".into(),
                "spec.rules".into()
            )]
        );
        let text = format!(
            "{WORLD}\n---\n{}",
            policy("selector: {matchLabels: {app: web}}")
        );
        let (objects, _) = file::load_lenient(&text, "t").unwrap();
        let (state, _) = translate_leniently(objects, &Settings::default());
        let f = analyze(&state, "cluster.local");
        assert_eq!(f[0].level, Level::Error);
        assert!(f[0].message.contains("fail closed"), "{}", f[0].message);
        let targeted = "targetRefs: [{kind: Service, group: \"\", name: api}]";
        assert_eq!(codes(&policy(targeted)), Vec::<&str>::new());
    }

    #[test]
    fn source_identities_behind_a_waypoint_only_ever_see_the_waypoint() {
        let policy = |principal: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: api}}}}\n  rules: [{{from: [{{source: {{principals: [\"{principal}\"]}}}}]}}]\n"
            )
        };
        assert_eq!(codes(&policy("cluster.local/ns/shop/sa/web")), ["IST0167"]);
        assert_eq!(
            codes(&policy("cluster.local/ns/shop/sa/waypoint")),
            Vec::<&str>::new()
        );
        // The waypoint's identity matched by a pattern: written for it.
        assert_eq!(
            codes(&policy("cluster.local/ns/shop/*")),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn two_namespace_wide_peer_authentications() {
        let pa = |name: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{mtls: {{mode: STRICT}}}}\n"
            )
        };
        assert_eq!(codes(&pa("a")), Vec::<&str>::new());
        assert_eq!(
            findings(&format!("{}---\n{}", pa("a"), pa("b"))),
            [(
                "MSH0003",
                "PeerAuthentication shop/b".into(),
                "spec.selector".into()
            )]
        );
    }

    #[test]
    fn a_waypoint_service_port_without_a_protocol() {
        let service = |port: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: raw, namespace: shop, labels: {{istio.io/use-waypoint: waypoint}}}}\nspec: {{clusterIP: 10.96.0.4, selector: {{app: api}}, ports: [{port}]}}\n"
            )
        };
        assert_eq!(
            codes(&service("{name: http-api, port: 80}")),
            Vec::<&str>::new()
        );
        assert_eq!(
            codes(&service("{name: tcp-db, port: 5432}")),
            Vec::<&str>::new()
        );
        assert_eq!(
            findings(&service("{name: api, port: 80}")),
            [("MSH0004", "Service shop/raw".into(), "spec.ports[0]".into())]
        );
    }

    #[test]
    fn kinds_and_versions_the_mesh_does_not_read() {
        assert_eq!(
            findings(
                "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s, namespace: shop}\nspec: {}\n---\napiVersion: security.istio.io/v2\nkind: PeerAuthentication\nmetadata: {name: p, namespace: shop}\nspec: {}\n"
            ),
            [
                ("MSH0005", "Sidecar shop/s".into(), "kind".into()),
                (
                    "MSH0005",
                    "PeerAuthentication shop/p".into(),
                    "apiVersion".into()
                ),
            ]
        );
    }

    #[test]
    fn text_output_reads_like_istioctl() {
        let f = REFERENCED_RESOURCE_NOT_FOUND.finding(
            "VirtualService a/b",
            "spec.hosts[0]",
            "Referenced host not found: \"x\"",
        );
        assert_eq!(
            f.to_string(),
            "Error [IST0101] (VirtualService a/b spec.hosts[0]) Referenced host not found: \"x\""
        );
        assert!(render_text(&[]).contains("No validation issues"));
    }
}
