//! Istio AuthorizationPolicy (`security.istio.io/v1`, `v1beta1`) enforced at L4 at the
//! destination, as ztunnel does: the policies are validated and indexed once per configuration
//! into [`Policies`], which then decides for each inbound connection whether it may proceed and
//! which policy decided.
//!
//! # Semantics (Istio's, as istiod translates them for ztunnel)
//!
//! - **Scope.** A policy without `selector` applies to every workload of its namespace; in the
//!   root namespace (`istio-system` by default) to every workload of the mesh. A policy with
//!   `selector.matchLabels` applies to the workloads of its namespace carrying all those labels;
//!   in the root namespace to the matching workloads of *every* namespace (istiod attaches
//!   root-namespace selector policies to workloads of all namespaces). A selector without labels
//!   counts as no selector. Policies with `targetRef`/`targetRefs` belong to a waypoint and are
//!   ignored here.
//! - **Actions.** `ALLOW` (the default) and `DENY`. `AUDIT` is a waypoint's: a matching
//!   `targetRefs` policy marks the request audited ([`Decision::audit`], written in the access
//!   log) and never changes the decision; on a selector it is ignored and reported as
//!   [`RbacError::UnsupportedAction`], as is `CUSTOM` (no external authorizer here).
//! - **Decision.** Any matching DENY denies. Otherwise, if no ALLOW policy applies to the
//!   workload the connection is allowed; otherwise it is allowed only if some ALLOW policy
//!   matches. A policy matches when any of its `rules` matches, so an ALLOW policy without rules
//!   (`spec: {}`) is Istio's allow-nothing, and a DENY policy without rules never matches. A rule
//!   matches when its `from` (any source), `to` (any operation) and `when` (every condition) all
//!   match; a missing part matches anything, so the rule `{}` matches every connection.
//! - **Sources** (every field set on a source must match): `principals` /
//!   `notPrincipals` against the peer's `<trust-domain>/ns/<ns>/sa/<sa>` (a leading
//!   `spiffe://` in the policy is accepted and ignored), `namespaces` / `notNamespaces` against
//!   the peer identity's namespace, `serviceAccounts` / `notServiceAccounts` (`ns/sa`, or `sa` in
//!   the policy's namespace), `ipBlocks` / `notIpBlocks` (CIDR or address, IPv4 or IPv6) against
//!   the source IP. Strings match exactly, by prefix (`x*`), by suffix (`*x`) or by presence
//!   (`*`). **Operations:** `ports` / `notPorts` (destination port). **Conditions:**
//!   `source.ip`, `source.namespace`, `source.principal`, `destination.ip`, `destination.port`
//!   with `values` / `notValues`, matched like the fields above.
//! - **Plaintext peers** have no identity (as in ztunnel, where their principal and namespace
//!   are empty): `principals`, `namespaces`, `serviceAccounts` (and their `when` keys) never
//!   match them, `*` included, and the `not*` twins always do, so `notPrincipals: ["*"]` selects
//!   exactly the plaintext connections. They can be matched by IP only.
//! - **HTTP attributes** (`methods`, `paths`, `hosts`, `remoteIpBlocks`, their `not*` twins,
//!   and the `when` keys `request.headers[..]`, `remote.ip`, `source.serviceAccount`) are
//!   parsed into typed matches and judged when the connection is judged for one request (a
//!   waypoint passes [`Request`] in [`Connection::request`]): methods and paths (without the
//!   query) as strings, hosts case-insensitively with or without the port, headers by any of
//!   their values, the remote address as the connection's source. At L4 they cannot be seen:
//!   in an ALLOW policy a rule using any of them never matches; in a DENY policy they are left
//!   out of the rule, so it matches more than written (stricter), and a source, operation or
//!   condition left with nothing matches every connection. Reported as
//!   [`RbacError::HttpAttributes`]. Attributes this mesh never sees (`requestPrincipals` and
//!   `request.auth.*`, as no JWT is validated; `connection.sni`; Envoy filter metadata) are
//!   treated the same way at every layer.
//! - **Dry run** (annotation `istio.io/dry-run: "true"`): the policy never changes
//!   [`Decision::allowed`]. [`Decision::dry_run_denial`] names a dry-run policy when enforcing the
//!   dry-run policies as well would deny the connection: a matching dry-run DENY, or a dry-run
//!   ALLOW that applies when no ALLOW policy (enforced or dry-run) matches.
//!
//! # Fail closed
//!
//! A policy that does not validate (unknown action, bad CIDR or port, wrong type, unknown field,
//! empty value, unknown `when` key...) is reported as [`RbacError::Invalid`], naming the policy
//! and the field, and is never read for its rules. It becomes a DENY of every connection to
//! every workload it *could* select, read as leniently as possible from the broken object: its
//! selector's workloads when the selector is a readable, non-empty label map (in every namespace
//! when it lives in the root namespace); its whole namespace when the selector is absent, empty
//! or unreadable (the whole mesh in the root namespace); every workload when its namespace
//! cannot be read; nothing when it carries a `targetRef(s)` and no selector (a waypoint's). A
//! broken policy marked dry-run (the annotation itself readable) only reports that denial.
//!
//! # Where this differs from ztunnel, on purpose
//!
//! - A DENY policy whose source/operation/condition is made only of HTTP attributes denies
//!   every connection, as Istio documents ("enforced without the HTTP rules"); ztunnel lets it
//!   match nothing (istio/istio#61126), which fails open.
//! - `selector: {}` is namespace-wide (Kubernetes and sidecar semantics); istiod attaches it to
//!   no workload at all.
//! - `principals: ["spiffe://..."]` is accepted; ztunnel never matches such a principal.
//! - Invalid policies fail closed; istiod drops what its webhook would have rejected.
//!
//! # Cost
//!
//! Everything is parsed at [`Policies::parse`]: CIDRs become masks, ports integers, selectors
//! are indexed by namespace and by one of their labels. [`Policies::evaluate`] only visits the
//! policies in scope for the destination, allocates nothing, and compares the peer principal
//! piecewise without formatting it.
#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::identity::Identity;
use crate::labels::Labels;
use crate::policy_json::{
    Envelope, FieldError, as_list, as_object, describe, envelope, kind_of, known_fields, string,
};
use crate::state::Workload;

/// The `apiVersion`s read as AuthorizationPolicy.
pub use crate::policy_json::API_VERSIONS;
const KIND: &str = "AuthorizationPolicy";
/// The annotation that puts a policy in dry-run mode (`"true"`).
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// One inbound connection, as authorization sees it.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    pub src_ip: IpAddr,
    pub src_port: u16,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    /// From the verified peer certificate (HBONE) or the agent's own knowledge of a same-node
    /// source; `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    /// The HTTP request, when the connection is judged per request (at a waypoint); `None`
    /// at L4.
    pub request: Option<&'a Request<'a>>,
}

/// One HTTP request, as authorization sees it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// `:authority` or `Host`, as sent (a port may follow).
    pub host: &'a str,
    /// The path without the query.
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// What a rule needs to see to be judged as written: the connection (L4), the request
/// (HTTP), or something this mesh never sees (JWT claims, SNI, Envoy filter metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
enum Layer {
    #[default]
    L4,
    Http,
    Never,
}

impl<'a> Connection<'a> {
    pub fn new(src: SocketAddr, dst: SocketAddr, src_identity: Option<&'a Identity>) -> Self {
        Self {
            src_ip: src.ip(),
            src_port: src.port(),
            dst_ip: dst.ip(),
            dst_port: dst.port(),
            src_identity,
            request: None,
        }
    }

    /// The same connection, judged for one of its requests.
    pub fn with_request(self, request: &'a Request<'a>) -> Self {
        Self {
            request: Some(request),
            ..self
        }
    }
}

/// The verdict on one connection. `Display` gives a short reason for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `namespace/name` of the policy that decided: the matching DENY (or the invalid policy
    /// failing closed), or the matching ALLOW. `None` when no ALLOW policy applies (allowed) or
    /// when ALLOW policies apply and none matches (denied).
    pub policy: Option<Arc<str>>,
    /// A dry-run policy that would have denied the connection (see the module docs).
    pub dry_run_denial: Option<Arc<str>>,
    /// The first matching AUDIT policy: the request is to be logged as audited.
    pub audit: Option<Arc<str>>,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.allowed, &self.policy) {
            (true, Some(p)) => write!(f, "allowed by {p}")?,
            (true, None) => write!(f, "allowed: no ALLOW policy applies")?,
            (false, Some(p)) => write!(f, "denied by {p}")?,
            (false, None) => write!(f, "denied: no ALLOW policy matched")?,
        }
        if let Some(p) = &self.dry_run_denial {
            write!(f, " (dry-run {p} would deny)")?;
        }
        if let Some(p) = &self.audit {
            write!(f, " (audited by {p})")?;
        }
        Ok(())
    }
}

/// One policy an evaluation considered ([`Policies::explain`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Considered {
    /// `namespace/name`.
    pub policy: Arc<str>,
    /// `ALLOW`, `DENY` or `AUDIT`.
    pub action: &'static str,
    pub dry_run: bool,
    /// Whether it matched; `None`: not looked at, the decision was made before it.
    pub matched: Option<bool>,
}

/// How a connection (or request) was judged: the policies in scope and the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub decision: Decision,
    pub considered: Vec<Considered>,
}

/// Why an AuthorizationPolicy was rejected or is enforced differently than written; each
/// names the policy (`namespace/name`, or its position in the input when those cannot be read).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RbacError {
    /// The policy is not used; every workload it could select denies every connection until it
    /// is fixed (a dry-run policy only reports so).
    #[error(
        "AuthorizationPolicy {policy}: {field}: {reason} (the policy is not used: every workload \
         it could select denies all connections until it is fixed)"
    )]
    Invalid {
        policy: String,
        field: String,
        reason: String,
    },
    /// `AUDIT` or `CUSTOM`: ignored by the node agent.
    #[error(
        "AuthorizationPolicy {policy}: action {action} is not enforced at L4; the policy is ignored"
    )]
    UnsupportedAction { policy: String, action: String },
    /// HTTP attributes in an ALLOW or DENY policy (see the module docs).
    #[error(
        "AuthorizationPolicy {policy}: HTTP attributes cannot be enforced at L4 (found: {}); {}",
        fields.join(", "),
        if *deny {
            "the DENY rules are enforced without them (stricter than written)"
        } else {
            "ALLOW rules using them never match (stricter than written); use a waypoint"
        }
    )]
    HttpAttributes {
        policy: String,
        deny: bool,
        fields: Vec<String>,
    },
}

impl RbacError {
    /// Whether this error made the policy fail closed (as opposed to being ignored or
    /// degraded).
    pub fn fails_closed(&self) -> bool {
        matches!(self, Self::Invalid { .. })
    }
}

/// The validated AuthorizationPolicies of the mesh, indexed for [`evaluate`](Self::evaluate).
/// `Default` is "no policy": everything is allowed.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    root_namespace: String,
    /// Fail-closed stand-ins of invalid policies whose namespace could not be read.
    everywhere: Vec<Policy>,
    by_namespace: HashMap<String, NamespacePolicies>,
    len: usize,
    any_dry_run: bool,
    /// Whether any AUDIT policy exists (a DENY then does not end the evaluation early).
    any_audit: bool,
    /// Policies with `targetRef(s)`, enforced by waypoints, by what they target.
    targeted: HashMap<Target, Vec<Policy>>,
}

/// What a waypoint's policy targets (`targetRef` / `targetRefs`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// A Gateway (a waypoint), by namespace and name.
    Gateway { namespace: String, name: String },
    /// A Service, by namespace and name.
    Service { namespace: String, name: String },
    /// Every waypoint of a GatewayClass (only from the root namespace).
    GatewayClass { name: String },
}

#[derive(Debug, Clone, Default)]
struct NamespacePolicies {
    /// Without selector, by name.
    wide: Vec<Policy>,
    /// With a selector, indexed by its first label: key -> value -> policies (by name). A
    /// workload can only be selected if it carries that label, so each matching policy is found
    /// exactly once, under that one label.
    selected: HashMap<String, HashMap<String, Vec<Selected>>>,
}

#[derive(Debug, Clone)]
struct Selected {
    /// Sorted, non-empty.
    labels: Vec<(String, String)>,
    policy: Policy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
    /// Targeted policies only: marks matching requests, decides nothing.
    Audit,
}

/// One enforceable (or dry-run) policy.
#[derive(Debug, Clone)]
struct Policy {
    /// `namespace/name`.
    key: Arc<str>,
    action: Action,
    dry_run: bool,
    /// Any matching rule matches the policy; none = matches nothing.
    rules: Vec<Rule>,
}

/// Every clause must match; within a clause, any match. No clause = matches everything.
#[derive(Debug, Clone, Default)]
struct Rule {
    clauses: Vec<Vec<Match>>,
    /// The highest layer among its attributes.
    needs: Layer,
}

/// L4 attributes that must all hold; within one field any value (`not*`: none). All empty =
/// matches everything.
#[derive(Debug, Clone, Default)]
struct Match {
    principals: Vec<StringMatch>,
    not_principals: Vec<StringMatch>,
    namespaces: Vec<StringMatch>,
    not_namespaces: Vec<StringMatch>,
    service_accounts: Vec<ServiceAccount>,
    not_service_accounts: Vec<ServiceAccount>,
    src_ips: Vec<Cidr>,
    not_src_ips: Vec<Cidr>,
    dst_ips: Vec<Cidr>,
    not_dst_ips: Vec<Cidr>,
    ports: Vec<u16>,
    not_ports: Vec<u16>,
    /// HTTP attributes: only judged when there is a request.
    http: Option<Box<HttpMatch>>,
}

/// The HTTP attributes of a [`Match`]; all must hold, as for the L4 ones.
#[derive(Debug, Clone, Default)]
struct HttpMatch {
    /// Lower-case patterns.
    hosts: Vec<StringMatch>,
    not_hosts: Vec<StringMatch>,
    methods: Vec<StringMatch>,
    not_methods: Vec<StringMatch>,
    paths: Vec<StringMatch>,
    not_paths: Vec<StringMatch>,
    /// The remote address (the connection's source: this mesh trusts no proxy header).
    remote_ips: Vec<Cidr>,
    not_remote_ips: Vec<Cidr>,
    /// `when: source.serviceAccount`.
    service_accounts: Vec<ServiceAccount>,
    not_service_accounts: Vec<ServiceAccount>,
    /// `when: request.headers[name]`.
    headers: Vec<HeaderCondition>,
}

#[derive(Debug, Clone)]
struct HeaderCondition {
    name: http::HeaderName,
    values: Vec<StringMatch>,
    not_values: Vec<StringMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum StringMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    /// `*`: any non-empty value.
    Presence,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ServiceAccount {
    namespace: Box<str>,
    name: Box<str>,
}

/// An address block, pre-masked; IPv4-mapped IPv6 blocks are stored as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cidr {
    V4 { net: u32, mask: u32 },
    V6 { net: u128, mask: u128 },
}

/// The connection's attributes, canonical.
struct Peer<'a> {
    src_ip: IpAddr,
    dst_ip: IpAddr,
    dst_port: u16,
    identity: Option<&'a Identity>,
    request: Option<&'a Request<'a>>,
}

impl Peer<'_> {
    /// The layer this peer is judged at.
    fn layer(&self) -> Layer {
        if self.request.is_some() {
            Layer::Http
        } else {
            Layer::L4
        }
    }
}

impl Policies {
    /// Validates `objects` (AuthorizationPolicy objects as JSON, e.g.
    /// `MeshState.raw.authorization_policies`) for a mesh whose root namespace is
    /// `root_namespace`. Every problem is reported; an invalid policy is kept as a DENY of every
    /// connection to whatever it could select (see the module docs). The caller reports the
    /// errors (ignored actions and HTTP attributes among them).
    pub fn parse(objects: &[Value], root_namespace: &str) -> (Self, Vec<RbacError>) {
        let mut set = Policies {
            root_namespace: root_namespace.to_owned(),
            ..Self::default()
        };
        let mut errors = Vec::new();
        for (index, object) in objects.iter().enumerate() {
            match parse_policy(object, root_namespace) {
                Ok(Parsed::Targeted { targets, policy }) => {
                    set.len += 1;
                    set.any_dry_run |= policy.dry_run;
                    set.any_audit |= policy.action == Action::Audit;
                    for target in targets {
                        set.targeted.entry(target).or_default().push(policy.clone());
                    }
                }
                Ok(Parsed::Unsupported { policy, action }) => {
                    errors.push(RbacError::UnsupportedAction { policy, action });
                }
                Ok(Parsed::Policy {
                    namespace,
                    selector,
                    policy,
                    http,
                }) => {
                    if !http.is_empty() {
                        errors.push(RbacError::HttpAttributes {
                            policy: policy.key.to_string(),
                            deny: policy.action == Action::Deny,
                            fields: http.into_iter().collect(),
                        });
                    }
                    set.insert(Some(namespace), selector, policy);
                }
                Err(e) => {
                    let key = describe(object, index);
                    errors.push(RbacError::Invalid {
                        policy: key.clone(),
                        field: e.field,
                        reason: e.reason,
                    });
                    if let Some(targets) = lenient_targets(object, root_namespace) {
                        let policy = Policy {
                            key: key.clone().into(),
                            action: Action::Deny,
                            dry_run: dry_run_of(object),
                            rules: vec![Rule::default()],
                        };
                        set.len += 1;
                        for target in targets {
                            set.targeted.entry(target).or_default().push(policy.clone());
                        }
                    }
                    if let Some(reach) = reach(object) {
                        let policy = Policy {
                            key: key.into(),
                            action: Action::Deny,
                            dry_run: reach.dry_run,
                            rules: vec![Rule::default()],
                        };
                        set.insert(reach.namespace, reach.selector, policy);
                    }
                }
            }
        }
        set.sort();
        (set, errors)
    }

    /// The verdict on `conn` into `dst` (see the module docs). Allocates nothing.
    pub fn evaluate(&self, dst: &Workload, conn: &Connection<'_>) -> Decision {
        self.decide(self.in_scope(dst), conn)
    }

    /// The verdict of a waypoint on `conn` (with its request, at L7) for the policies that
    /// target any of `targets` (the waypoint's Gateway, its GatewayClass, the destination
    /// Service), with the same evaluation as [`evaluate`](Self::evaluate).
    pub fn evaluate_targeted(&self, targets: &[Target], conn: &Connection<'_>) -> Decision {
        let policies = targets
            .iter()
            .filter_map(|t| self.targeted.get(t))
            .flatten();
        self.decide(policies, conn)
    }

    /// Whether any policy targets one of `targets`.
    pub fn has_targeted(&self, targets: &[Target]) -> bool {
        targets.iter().any(|t| self.targeted.contains_key(t))
    }

    /// How `conn` into `dst` is judged: every policy in scope, in Istio's order of
    /// evaluation (DENY, then ALLOW, then AUDIT), each with whether it matched, and the
    /// decision — which is [`evaluate`](Self::evaluate)'s, by the same code.
    pub fn explain(&self, dst: &Workload, conn: &Connection<'_>) -> Explanation {
        self.explained(self.in_scope(dst).collect(), conn)
    }

    /// [`explain`](Self::explain) for a waypoint ([`evaluate_targeted`](Self::evaluate_targeted)).
    pub fn explain_targeted(&self, targets: &[Target], conn: &Connection<'_>) -> Explanation {
        let policies = targets
            .iter()
            .filter_map(|t| self.targeted.get(t))
            .flatten()
            .collect();
        self.explained(policies, conn)
    }

    fn explained(&self, policies: Vec<&Policy>, conn: &Connection<'_>) -> Explanation {
        let mut matched: Vec<(*const Policy, bool)> = Vec::new();
        let decision = self.decide_observed(policies.iter().copied(), conn, &mut |p, m| {
            matched.push((std::ptr::from_ref(p), m));
        });
        let mut considered: Vec<Considered> = policies
            .iter()
            .map(|p| Considered {
                policy: p.key.clone(),
                action: match p.action {
                    Action::Allow => "ALLOW",
                    Action::Deny => "DENY",
                    Action::Audit => "AUDIT",
                },
                dry_run: p.dry_run,
                matched: matched
                    .iter()
                    .find(|(q, _)| std::ptr::eq(*q, *p))
                    .map(|(_, m)| *m),
            })
            .collect();
        let rank = |a: &str| match a {
            "DENY" => 0,
            "ALLOW" => 1,
            _ => 2,
        };
        considered.sort_by_key(|c| rank(c.action));
        Explanation {
            decision,
            considered,
        }
    }

    fn decide<'a>(
        &'a self,
        policies: impl Iterator<Item = &'a Policy>,
        conn: &Connection<'_>,
    ) -> Decision {
        self.decide_observed(policies, conn, &mut |_, _| {})
    }

    /// The evaluation, telling `observe` each policy it matched against the connection and
    /// the outcome (enforcement observes nothing, at no cost).
    fn decide_observed<'a>(
        &'a self,
        policies: impl Iterator<Item = &'a Policy>,
        conn: &Connection<'_>,
        observe: &mut impl FnMut(&Policy, bool),
    ) -> Decision {
        let peer = Peer {
            src_ip: conn.src_ip.to_canonical(),
            dst_ip: conn.dst_ip.to_canonical(),
            dst_port: conn.dst_port,
            identity: conn.src_identity,
            request: conn.request,
        };
        let mut deny = None;
        let mut allow_applies = false;
        let mut allowed_by = None;
        let mut dry_deny = None;
        let mut dry_allow = None;
        let mut dry_allow_matched = false;
        let mut audit = None;
        let mut check = |policy: &Policy| {
            let matched = policy.matches(&peer);
            observe(policy, matched);
            matched
        };
        for policy in policies {
            match (policy.action, policy.dry_run) {
                (Action::Audit, _) => {
                    if audit.is_none() && check(policy) {
                        audit = Some(policy.key.clone());
                    }
                }
                (Action::Deny, false) => {
                    if deny.is_none() && check(policy) {
                        deny = Some(policy);
                        if !self.any_dry_run && !self.any_audit {
                            break;
                        }
                    }
                }
                (Action::Allow, false) => {
                    allow_applies = true;
                    if allowed_by.is_none() && check(policy) {
                        allowed_by = Some(policy);
                    }
                }
                (Action::Deny, true) => {
                    if dry_deny.is_none() && check(policy) {
                        dry_deny = Some(policy);
                    }
                }
                (Action::Allow, true) => {
                    dry_allow.get_or_insert(policy);
                    if !dry_allow_matched && check(policy) {
                        dry_allow_matched = true;
                    }
                }
            }
        }
        let (allowed, decided) = match (deny, allowed_by) {
            (Some(p), _) => (false, Some(p)),
            (None, Some(p)) => (true, Some(p)),
            (None, None) => (!allow_applies, None),
        };
        let dry_run_denial = dry_deny.or(match dry_allow {
            Some(p) if !dry_allow_matched && allowed_by.is_none() => Some(p),
            _ => None,
        });
        Decision {
            allowed,
            policy: decided.map(|p| p.key.clone()),
            dry_run_denial: dry_run_denial.map(|p| p.key.clone()),
            audit,
        }
    }

    /// How many policies are enforced or dry-run (fail-closed stand-ins of invalid policies
    /// included; ignored ones not).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The root namespace this set was parsed for.
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// `None` namespace: everywhere. Empty `labels`: namespace-wide.
    fn insert(&mut self, namespace: Option<String>, labels: Vec<(String, String)>, policy: Policy) {
        self.len += 1;
        self.any_dry_run |= policy.dry_run;
        let Some(namespace) = namespace else {
            self.everywhere.push(policy);
            return;
        };
        let ns = self.by_namespace.entry(namespace).or_default();
        let Some((key, value)) = labels.first().cloned() else {
            ns.wide.push(policy);
            return;
        };
        ns.selected
            .entry(key)
            .or_default()
            .entry(value)
            .or_default()
            .push(Selected { labels, policy });
    }

    fn sort(&mut self) {
        self.everywhere.sort_by(|a, b| a.key.cmp(&b.key));
        for list in self.targeted.values_mut() {
            list.sort_by(|a, b| a.key.cmp(&b.key));
        }
        for ns in self.by_namespace.values_mut() {
            ns.wide.sort_by(|a, b| a.key.cmp(&b.key));
            for list in ns.selected.values_mut().flat_map(|m| m.values_mut()) {
                list.sort_by(|a, b| a.policy.key.cmp(&b.policy.key));
            }
        }
    }

    /// The policies that apply to `dst`: the invalid ones of unknown namespace, the root
    /// namespace's, then its own namespace's; namespace-wide before selected.
    fn in_scope<'a>(&'a self, dst: &'a Workload) -> impl Iterator<Item = &'a Policy> + 'a {
        let root = self.by_namespace.get(&self.root_namespace);
        let own = if dst.namespace == self.root_namespace {
            None
        } else {
            self.by_namespace.get(&dst.namespace)
        };
        self.everywhere
            .iter()
            .chain(root.into_iter().flat_map(|ns| ns.applying(&dst.labels)))
            .chain(own.into_iter().flat_map(|ns| ns.applying(&dst.labels)))
    }
}

impl NamespacePolicies {
    fn applying<'a>(&'a self, labels: &'a Labels) -> impl Iterator<Item = &'a Policy> + 'a {
        let selected = (!self.selected.is_empty()).then_some(&self.selected);
        let by_label = selected.into_iter().flat_map(move |index| {
            labels.iter().flat_map(move |(key, value)| {
                index
                    .get(key)
                    .and_then(|values| values.get(value))
                    .into_iter()
                    .flatten()
                    .filter(move |s| labels.matches(s.labels.iter().map(|(k, v)| (k, v))))
                    .map(|s| &s.policy)
            })
        });
        self.wide.iter().chain(by_label)
    }
}

impl Policy {
    /// A rule that needs more than the peer's layer shows: in an ALLOW policy it never matches;
    /// in a DENY policy it is judged without what cannot be seen (it matches more).
    fn matches(&self, peer: &Peer<'_>) -> bool {
        let layer = peer.layer();
        self.rules
            .iter()
            .any(|rule| (rule.needs <= layer || self.action == Action::Deny) && rule.matches(peer))
    }
}

impl Rule {
    fn matches(&self, peer: &Peer<'_>) -> bool {
        self.clauses
            .iter()
            .all(|clause| clause.iter().any(|m| m.matches(peer)))
    }
}

/// Some of `positive` (or it is empty) and none of `negative` holds.
fn field<T>(positive: &[T], negative: &[T], holds: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&holds)) && !negative.iter().any(&holds)
}

impl Match {
    fn matches(&self, peer: &Peer<'_>) -> bool {
        let id = peer.identity;
        field(&self.ports, &self.not_ports, |p| *p == peer.dst_port)
            && field(&self.src_ips, &self.not_src_ips, |c| {
                c.contains(peer.src_ip)
            })
            && field(&self.dst_ips, &self.not_dst_ips, |c| {
                c.contains(peer.dst_ip)
            })
            && field(&self.namespaces, &self.not_namespaces, |m| {
                id.is_some_and(|id| m.matches(&id.namespace))
            })
            && field(&self.principals, &self.not_principals, |m| {
                id.is_some_and(|id| m.matches_principal(id))
            })
            && field(&self.service_accounts, &self.not_service_accounts, |sa| {
                id.is_some_and(|id| sa.is(id))
            })
            && match (&self.http, peer.request) {
                (Some(http), Some(request)) => http.matches(peer, request),
                _ => true,
            }
    }

    /// Whether no field is set (matches everything).
    fn is_empty(&self) -> bool {
        self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.src_ips.is_empty()
            && self.not_src_ips.is_empty()
            && self.dst_ips.is_empty()
            && self.not_dst_ips.is_empty()
            && self.ports.is_empty()
            && self.not_ports.is_empty()
            && self.http.is_none()
    }
}

impl HttpMatch {
    fn matches(&self, peer: &Peer<'_>, request: &Request<'_>) -> bool {
        let id = peer.identity;
        let host = request.host;
        let bare_host = strip_port(host);
        field(&self.methods, &self.not_methods, |m| {
            m.matches(request.method)
        }) && field(&self.paths, &self.not_paths, |m| m.matches(request.path))
            && field(&self.hosts, &self.not_hosts, |m| {
                m.matches_ignore_case(host) || m.matches_ignore_case(bare_host)
            })
            && field(&self.remote_ips, &self.not_remote_ips, |c| {
                c.contains(peer.src_ip)
            })
            && field(&self.service_accounts, &self.not_service_accounts, |sa| {
                id.is_some_and(|id| sa.is(id))
            })
            && self.headers.iter().all(|h| {
                let values = || request.headers.get_all(&h.name).iter();
                let holds =
                    |m: &StringMatch| values().any(|v| v.to_str().is_ok_and(|v| m.matches(v)));
                (h.values.is_empty() || h.values.iter().any(holds))
                    && !h.not_values.iter().any(holds)
            })
    }
}

/// `host` without a trailing `:port` (IPv6 literals keep their brackets).
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!name.contains(':') || name.ends_with(']')) =>
        {
            name
        }
        _ => host,
    }
}

impl ServiceAccount {
    fn is(&self, id: &Identity) -> bool {
        *id.namespace == *self.namespace && *id.service_account == *self.name
    }
}

impl StringMatch {
    /// Istio's pattern syntax: `*` presence, `*x` suffix, `x*` prefix, else exact.
    fn parse(pattern: &str) -> Self {
        if pattern == "*" {
            Self::Presence
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            Self::Suffix(suffix.into())
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            Self::Prefix(prefix.into())
        } else {
            Self::Exact(pattern.into())
        }
    }

    /// A principal pattern: as [`parse`](Self::parse) after dropping a leading `spiffe://`.
    fn parse_principal(pattern: &str) -> Self {
        Self::parse(pattern.strip_prefix("spiffe://").unwrap_or(pattern))
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(s) => value == &**s,
            Self::Prefix(s) => value.starts_with(&**s),
            Self::Suffix(s) => value.ends_with(&**s),
            Self::Presence => !value.is_empty(),
        }
    }

    /// As [`matches`](Self::matches), ASCII case-insensitively (the pattern is lower-case).
    fn matches_ignore_case(&self, value: &str) -> bool {
        let v = value.as_bytes();
        match self {
            Self::Exact(s) => v.eq_ignore_ascii_case(s.as_bytes()),
            Self::Prefix(s) => {
                v.len() >= s.len() && v[..s.len()].eq_ignore_ascii_case(s.as_bytes())
            }
            Self::Suffix(s) => {
                v.len() >= s.len() && v[v.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
            Self::Presence => !v.is_empty(),
        }
    }

    /// Matches `<td>/ns/<ns>/sa/<sa>` without building it.
    fn matches_principal(&self, id: &Identity) -> bool {
        let parts: [&[u8]; 5] = [
            id.trust_domain.as_bytes(),
            b"/ns/",
            id.namespace.as_bytes(),
            b"/sa/",
            id.service_account.as_bytes(),
        ];
        match self {
            Self::Exact(s) => {
                parts.iter().map(|p| p.len()).sum::<usize>() == s.len()
                    && concat_starts_with(&parts, s.as_bytes())
            }
            Self::Prefix(s) => concat_starts_with(&parts, s.as_bytes()),
            Self::Suffix(s) => concat_ends_with(&parts, s.as_bytes()),
            Self::Presence => true,
        }
    }
}

/// Whether the concatenation of `parts` starts with `pattern`.
fn concat_starts_with(parts: &[&[u8]], mut pattern: &[u8]) -> bool {
    for part in parts {
        if pattern.len() <= part.len() {
            return part.starts_with(pattern);
        }
        match pattern.strip_prefix(*part) {
            Some(rest) => pattern = rest,
            None => return false,
        }
    }
    pattern.is_empty()
}

/// Whether the concatenation of `parts` ends with `pattern`.
fn concat_ends_with(parts: &[&[u8]], mut pattern: &[u8]) -> bool {
    for part in parts.iter().rev() {
        if pattern.len() <= part.len() {
            return part.ends_with(pattern);
        }
        match pattern.strip_suffix(*part) {
            Some(rest) => pattern = rest,
            None => return false,
        }
    }
    pattern.is_empty()
}

impl Cidr {
    /// A CIDR (`10.0.0.0/8`, `fd00::/8`) or a single address; host bits are ignored, as Istio
    /// does.
    fn parse(text: &str) -> Result<Self, String> {
        let (addr, bits) = match text.split_once('/') {
            Some((addr, bits)) => (addr, Some(bits)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR range"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) if !b.is_empty() && b.len() <= 3 && b.bytes().all(|c| c.is_ascii_digit()) => {
                let n: u32 = b.parse().unwrap_or(u32::MAX);
                if n > max {
                    return Err(format!("{text:?}: prefix length {n} exceeds {max}"));
                }
                n
            }
            Some(_) => return Err(format!("{text:?}: bad prefix length")),
        };
        Ok(match addr {
            IpAddr::V4(a) => Self::v4(u32::from(a), bits),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) if bits >= 96 => Self::v4(u32::from(v4), bits - 96),
                _ => {
                    let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                    Self::V6 {
                        net: u128::from(a) & mask,
                        mask,
                    }
                }
            },
        })
    }

    fn v4(addr: u32, bits: u32) -> Self {
        let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
        Self::V4 {
            net: addr & mask,
            mask,
        }
    }

    /// `ip` must be canonical (IPv4-mapped IPv6 as IPv4).
    fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (Self::V4 { net, mask }, IpAddr::V4(a)) => u32::from(a) & mask == *net,
            (Self::V6 { net, mask }, IpAddr::V6(a)) => u128::from(a) & mask == *net,
            _ => false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing and validation.

/// What one valid object is to the node agent.
enum Parsed {
    Policy {
        namespace: String,
        /// Sorted; empty = namespace-wide.
        selector: Vec<(String, String)>,
        policy: Policy,
        /// HTTP attributes found (left out or making rules never match).
        http: BTreeSet<String>,
    },
    /// `targetRef(s)`: enforced by a waypoint, per request.
    Targeted {
        targets: Vec<Target>,
        policy: Policy,
    },
    /// AUDIT or CUSTOM.
    Unsupported { policy: String, action: String },
}

/// What an invalid policy could select.
struct Reach {
    /// `None`: every namespace.
    namespace: Option<String>,
    selector: Vec<(String, String)>,
    dry_run: bool,
}

/// What an invalid policy could select, read leniently (see the module docs); `None` for a
/// waypoint's policy.
fn reach(object: &Value) -> Option<Reach> {
    let spec = &object["spec"];
    let has_selector = !spec["selector"].is_null();
    let targeted = spec["targetRef"].is_object()
        || spec["targetRefs"].as_array().is_some_and(|a| !a.is_empty());
    if targeted && !has_selector {
        return None;
    }
    let dry_run = dry_run_of(object);
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let selector = match (&namespace, spec["selector"]["matchLabels"].as_object()) {
        (Some(_), Some(m)) => m
            .iter()
            .map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    let mut selector = selector;
    selector.sort();
    Some(Reach {
        namespace,
        selector,
        dry_run,
    })
}

/// Go's `strconv.ParseBool`, which Istio uses for the dry-run annotation.
fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// An optional list of non-empty strings (absent, `null` and `[]` are all empty).
fn strings<'a>(value: Option<&'a Value>, field: &str) -> Result<Vec<&'a str>, FieldError> {
    as_list(value, field)?
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) if !s.is_empty() => Ok(s.as_str()),
            Value::String(_) => Err(FieldError::new(
                format!("{field}[{i}]"),
                "empty value not allowed",
            )),
            other => Err(FieldError::new(
                format!("{field}[{i}]"),
                format!("expected a string, got {}", kind_of(other)),
            )),
        })
        .collect()
}

fn cidrs(value: Option<&Value>, field: &str) -> Result<Vec<Cidr>, FieldError> {
    let mut out = Vec::new();
    for (i, text) in strings(value, field)?.into_iter().enumerate() {
        out.push(Cidr::parse(text).map_err(|e| FieldError::new(format!("{field}[{i}]"), e))?);
    }
    Ok(out)
}

/// Port strings (`"8080"`, as the CRD types them); a YAML integer is accepted too.
fn ports(value: Option<&Value>, field: &str) -> Result<Vec<u16>, FieldError> {
    let list = as_list(value, field)?.unwrap_or_default();
    let mut out = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let port = match v {
            Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                s.parse::<u16>().ok()
            }
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            _ => None,
        };
        out.push(port.ok_or_else(|| {
            FieldError::new(
                format!("{field}[{i}]"),
                format!("{v} is not a port number (0-65535)"),
            )
        })?);
    }
    Ok(out)
}

fn string_matches(value: Option<&Value>, field: &str) -> Result<Vec<StringMatch>, FieldError> {
    Ok(strings(value, field)?
        .into_iter()
        .map(StringMatch::parse)
        .collect())
}

fn principal_matches(value: Option<&Value>, field: &str) -> Result<Vec<StringMatch>, FieldError> {
    Ok(strings(value, field)?
        .into_iter()
        .map(StringMatch::parse_principal)
        .collect())
}

/// `ns/sa`, or `sa` in the policy's namespace; no wildcards (as Istio validates them).
fn service_accounts(
    value: Option<&Value>,
    field: &str,
    policy_namespace: &str,
) -> Result<Vec<ServiceAccount>, FieldError> {
    let mut out = Vec::new();
    for (i, text) in strings(value, field)?.into_iter().enumerate() {
        let bad =
            |reason: &str| FieldError::new(format!("{field}[{i}]"), format!("{text:?}: {reason}"));
        if text.contains('*') {
            return Err(bad("wildcards are not allowed"));
        }
        let (namespace, name) = match text.split_once('/') {
            Some((ns, sa)) => (ns, sa),
            None => (policy_namespace, text),
        };
        if namespace.is_empty() || name.is_empty() || name.contains('/') {
            return Err(bad(
                "expected 'serviceAccount' or 'namespace/serviceAccount'",
            ));
        }
        out.push(ServiceAccount {
            namespace: namespace.into(),
            name: name.into(),
        });
    }
    Ok(out)
}

const SOURCE_FIELDS: [&str; 12] = [
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "serviceAccounts",
    "notServiceAccounts",
    "ipBlocks",
    "notIpBlocks",
    "requestPrincipals",
    "notRequestPrincipals",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
];
const OPERATION_FIELDS: [&str; 8] = [
    "ports",
    "notPorts",
    "hosts",
    "notHosts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
];

/// Whether a list field is set (non-empty); its type is checked separately.
fn is_set(map: &Map<String, Value>, key: &str) -> bool {
    map.get(key)
        .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
}

/// One `from[].source`: its L4 match, and the HTTP fields it sets.
fn source(
    map: &Map<String, Value>,
    field: &str,
    namespace: &str,
    seen: &mut Seen,
) -> Result<Match, FieldError> {
    known_fields(map, field, &SOURCE_FIELDS)?;
    if !SOURCE_FIELDS.iter().any(|k| is_set(map, k)) {
        return Err(FieldError::new(field, "must not be empty"));
    }
    let f = |key: &str| format!("{field}.{key}");
    for key in ["requestPrincipals", "notRequestPrincipals"] {
        strings(map.get(key), &f(key))?;
        seen.mark(map, key, Layer::Never);
    }
    let http = HttpMatch {
        remote_ips: cidrs(map.get("remoteIpBlocks"), &f("remoteIpBlocks"))?,
        not_remote_ips: cidrs(map.get("notRemoteIpBlocks"), &f("notRemoteIpBlocks"))?,
        ..HttpMatch::default()
    };
    for key in ["remoteIpBlocks", "notRemoteIpBlocks"] {
        seen.mark(map, key, Layer::Http);
    }
    Ok(Match {
        http: seen.http(http),
        principals: principal_matches(map.get("principals"), &f("principals"))?,
        not_principals: principal_matches(map.get("notPrincipals"), &f("notPrincipals"))?,
        namespaces: string_matches(map.get("namespaces"), &f("namespaces"))?,
        not_namespaces: string_matches(map.get("notNamespaces"), &f("notNamespaces"))?,
        service_accounts: service_accounts(
            map.get("serviceAccounts"),
            &f("serviceAccounts"),
            namespace,
        )?,
        not_service_accounts: service_accounts(
            map.get("notServiceAccounts"),
            &f("notServiceAccounts"),
            namespace,
        )?,
        src_ips: cidrs(map.get("ipBlocks"), &f("ipBlocks"))?,
        not_src_ips: cidrs(map.get("notIpBlocks"), &f("notIpBlocks"))?,
        ..Match::default()
    })
}

/// One `to[].operation`: its L4 match, and the HTTP fields it sets.
fn operation(map: &Map<String, Value>, field: &str, seen: &mut Seen) -> Result<Match, FieldError> {
    known_fields(map, field, &OPERATION_FIELDS)?;
    if !OPERATION_FIELDS.iter().any(|k| is_set(map, k)) {
        return Err(FieldError::new(field, "must not be empty"));
    }
    let f = |key: &str| format!("{field}.{key}");
    let lower = |key: &str| -> Result<Vec<StringMatch>, FieldError> {
        Ok(strings(map.get(key), &f(key))?
            .into_iter()
            .map(|s| StringMatch::parse(&s.to_ascii_lowercase()))
            .collect())
    };
    let http = HttpMatch {
        hosts: lower("hosts")?,
        not_hosts: lower("notHosts")?,
        methods: string_matches(map.get("methods"), &f("methods"))?,
        not_methods: string_matches(map.get("notMethods"), &f("notMethods"))?,
        paths: string_matches(map.get("paths"), &f("paths"))?,
        not_paths: string_matches(map.get("notPaths"), &f("notPaths"))?,
        ..HttpMatch::default()
    };
    for key in [
        "hosts",
        "notHosts",
        "methods",
        "notMethods",
        "paths",
        "notPaths",
    ] {
        seen.mark(map, key, Layer::Http);
    }
    Ok(Match {
        http: seen.http(http),
        ports: ports(map.get("ports"), &format!("{field}.ports"))?,
        not_ports: ports(map.get("notPorts"), &format!("{field}.notPorts"))?,
        ..Match::default()
    })
}

/// The `when` keys enforced at L4.
const L4_KEYS: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

/// `key[name]` with a non-empty name.
fn bracketed(key: &str, prefix: &str) -> bool {
    key.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('['))
        .and_then(|rest| rest.strip_suffix(']'))
        .is_some_and(|name| !name.is_empty())
}

/// The attributes above L4 that a rule uses: their names (for the node's report) and the
/// highest layer among them.
#[derive(Default)]
struct Seen {
    fields: Vec<String>,
    needs: Layer,
}

impl Seen {
    fn add(&mut self, key: &str, layer: Layer) {
        self.fields.push(key.to_owned());
        self.needs = self.needs.max(layer);
    }

    /// Records `key` when it is set in `map`.
    fn mark(&mut self, map: &Map<String, Value>, key: &str, layer: Layer) {
        if is_set(map, key) {
            self.add(key, layer);
        }
    }

    /// `http`, unless it holds nothing.
    fn http(&self, http: HttpMatch) -> Option<Box<HttpMatch>> {
        (!http.is_empty()).then(|| Box::new(http))
    }
}

impl HttpMatch {
    fn is_empty(&self) -> bool {
        self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.remote_ips.is_empty()
            && self.not_remote_ips.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.headers.is_empty()
    }
}

/// One `when` condition: `Ok(Some(match))` for an attribute this mesh can see (at L4 or per
/// request), `Ok(None)` for one it never sees; either way recorded in `seen` when above L4.
fn condition(
    map: &Map<String, Value>,
    field: &str,
    seen: &mut Seen,
) -> Result<Option<Match>, FieldError> {
    known_fields(map, field, &["key", "values", "notValues"])?;
    let key = string(map.get("key"), &format!("{field}.key"))?;
    let values_field = format!("{field}.values");
    let not_field = format!("{field}.notValues");
    let values = map.get("values");
    let not = map.get("notValues");
    if strings(values, &values_field)?.is_empty() && strings(not, &not_field)?.is_empty() {
        return Err(FieldError::new(
            field,
            format!("at least one of values or notValues must be set for key {key}"),
        ));
    }
    let mut m = Match::default();
    match key {
        "source.ip" => {
            m.src_ips = cidrs(values, &values_field)?;
            m.not_src_ips = cidrs(not, &not_field)?;
        }
        "destination.ip" => {
            m.dst_ips = cidrs(values, &values_field)?;
            m.not_dst_ips = cidrs(not, &not_field)?;
        }
        "destination.port" => {
            m.ports = ports(values, &values_field)?;
            m.not_ports = ports(not, &not_field)?;
        }
        "source.namespace" => {
            m.namespaces = string_matches(values, &values_field)?;
            m.not_namespaces = string_matches(not, &not_field)?;
        }
        "source.principal" => {
            m.principals = principal_matches(values, &values_field)?;
            m.not_principals = principal_matches(not, &not_field)?;
        }
        "remote.ip" => {
            m.http = Some(Box::new(HttpMatch {
                remote_ips: cidrs(values, &values_field)?,
                not_remote_ips: cidrs(not, &not_field)?,
                ..HttpMatch::default()
            }));
            seen.add(key, Layer::Http);
        }
        "source.serviceAccount" => {
            m.http = Some(Box::new(HttpMatch {
                service_accounts: service_accounts(values, &values_field, "-")?,
                not_service_accounts: service_accounts(not, &not_field, "-")?,
                ..HttpMatch::default()
            }));
            seen.add(key, Layer::Http);
        }
        _ if bracketed(key, "request.headers") => {
            let name = &key["request.headers[".len()..key.len() - 1];
            let name = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                FieldError::new(
                    format!("{field}.key"),
                    format!("{name:?} is not a valid header name"),
                )
            })?;
            m.http = Some(Box::new(HttpMatch {
                headers: vec![HeaderCondition {
                    name,
                    values: string_matches(values, &values_field)?,
                    not_values: string_matches(not, &not_field)?,
                }],
                ..HttpMatch::default()
            }));
            seen.add(key, Layer::Http);
        }
        "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter"
        | "connection.sni" => {
            seen.add(key, Layer::Never);
            return Ok(None);
        }
        _ if bracketed(key, "request.experimental.inline.headers")
            || bracketed(key, "request.auth.claims")
            || (key.starts_with("experimental.envoy.filters.") && key.ends_with(']')) =>
        {
            seen.add(key, Layer::Never);
            return Ok(None);
        }
        _ => {
            return Err(FieldError::new(
                format!("{field}.key"),
                format!(
                    "unknown or unsupported attribute {key:?} (L4 keys: {})",
                    L4_KEYS.join(", ")
                ),
            ));
        }
    }
    Ok(Some(m))
}

/// One `from[].source` or `to[].operation`: its field path and its object.
type Entry<'a> = (String, &'a Map<String, Value>);

/// The `inner` objects of the rule's `key` list (`from`/`source`, `to`/`operation`); `None`
/// when the list is absent.
fn entries<'a>(
    rule: &'a Map<String, Value>,
    field: &str,
    key: &str,
    inner: &str,
) -> Result<Option<Vec<Entry<'a>>>, FieldError> {
    let list_field = format!("{field}.{key}");
    let Some(list) = as_list(rule.get(key), &list_field)? else {
        return Ok(None);
    };
    if list.is_empty() {
        return Err(FieldError::new(
            list_field,
            "must not be empty (leave it out to match anything)",
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let item_field = format!("{list_field}[{i}]");
        let item = as_object(Some(item), &item_field)?
            .ok_or_else(|| FieldError::new(&item_field, "must not be null"))?;
        known_fields(item, &item_field, &[inner])?;
        let inner_field = format!("{item_field}.{inner}");
        let inner_map = as_object(item.get(inner), &inner_field)?
            .ok_or_else(|| FieldError::new(&inner_field, "missing"))?;
        out.push((inner_field, inner_map));
    }
    Ok(Some(out))
}

/// One rule, and the names of the attributes it uses above L4 (added to `http_seen`).
fn rule(
    value: &Value,
    field: &str,
    namespace: &str,
    http_seen: &mut BTreeSet<String>,
) -> Result<Rule, FieldError> {
    let Value::Object(map) = value else {
        return Err(FieldError::new(
            field,
            format!("expected an object, got {}", kind_of(value)),
        ));
    };
    known_fields(map, field, &["from", "to", "when"])?;
    let mut seen = Seen::default();
    let mut clauses = Vec::new();

    let from = entries(map, field, "from", "source")?;
    let to = entries(map, field, "to", "operation")?;

    if let Some(from) = from {
        let mut clause = Vec::with_capacity(from.len());
        for (f, source_map) in from {
            clause.push(source(source_map, &f, namespace, &mut seen)?);
        }
        clauses.push(clause);
    }
    if let Some(to) = to {
        let mut clause = Vec::with_capacity(to.len());
        for (f, operation_map) in to {
            clause.push(operation(operation_map, &f, &mut seen)?);
        }
        clauses.push(clause);
    }
    let when_field = format!("{field}.when");
    for (i, item) in as_list(map.get("when"), &when_field)?
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let f = format!("{when_field}[{i}]");
        let item =
            as_object(Some(item), &f)?.ok_or_else(|| FieldError::new(&f, "must not be null"))?;
        if let Some(m) = condition(item, &f, &mut seen)? {
            clauses.push(vec![m]);
        }
    }
    http_seen.extend(seen.fields);
    // A clause holding a match that is empty (a source made only of attributes this mesh never
    // sees) matches everything: drop it, it constrains nothing.
    clauses.retain(|clause| !clause.iter().any(Match::is_empty));
    Ok(Rule {
        clauses,
        needs: seen.needs,
    })
}

/// The dry-run annotation, read leniently.
fn dry_run_of(object: &Value) -> bool {
    object["metadata"]["annotations"][DRY_RUN_ANNOTATION]
        .as_str()
        .and_then(parse_bool)
        .unwrap_or(false)
}

/// The targets of a broken policy, read leniently; `None` when it has none readable.
fn lenient_targets(object: &Value, root_namespace: &str) -> Option<Vec<Target>> {
    let spec = &object["spec"];
    let namespace = object["metadata"]["namespace"].as_str()?;
    let refs: Vec<&Value> = match (&spec["targetRef"], spec["targetRefs"].as_array()) {
        (Value::Object(_), _) => vec![&spec["targetRef"]],
        (_, Some(list)) if !list.is_empty() => list.iter().collect(),
        _ => return None,
    };
    let targets: Vec<Target> = refs
        .iter()
        .filter_map(|r| target_of(r, namespace, root_namespace, "").ok())
        .collect();
    (!targets.is_empty()).then_some(targets)
}

/// One `targetRef`: kind Gateway, Service or GatewayClass (the last only in the root
/// namespace).
fn target_of(
    value: &Value,
    namespace: &str,
    root_namespace: &str,
    field: &str,
) -> Result<Target, FieldError> {
    let map =
        as_object(Some(value), field)?.ok_or_else(|| FieldError::new(field, "must not be null"))?;
    known_fields(
        map,
        field,
        &["group", "kind", "name", "namespace", "sectionName"],
    )?;
    let kind = string(map.get("kind"), &format!("{field}.kind"))?;
    let name = string(map.get("name"), &format!("{field}.name"))?.to_owned();
    if let Some(ns) = map.get("namespace").and_then(Value::as_str)
        && ns != namespace
    {
        return Err(FieldError::new(
            format!("{field}.namespace"),
            "a policy can only target objects of its own namespace",
        ));
    }
    let namespace = namespace.to_owned();
    match kind {
        "Gateway" => Ok(Target::Gateway { namespace, name }),
        "Service" => Ok(Target::Service { namespace, name }),
        "GatewayClass" if namespace == root_namespace => Ok(Target::GatewayClass { name }),
        "GatewayClass" => Err(FieldError::new(
            format!("{field}.kind"),
            "a GatewayClass can only be targeted from the root namespace",
        )),
        other => Err(FieldError::new(
            format!("{field}.kind"),
            format!("{other:?} cannot be targeted (Gateway, Service or GatewayClass)"),
        )),
    }
}

/// Validates one object and converts it.
fn parse_policy(object: &Value, root_namespace: &str) -> Result<Parsed, FieldError> {
    let Envelope {
        top,
        meta,
        name,
        namespace,
    } = envelope(object, KIND)?;
    let key = format!("{namespace}/{name}");

    let mut dry_run = false;
    if let Some(annotations) = as_object(meta.get("annotations"), "metadata.annotations")? {
        let field = format!("metadata.annotations.{DRY_RUN_ANNOTATION}");
        match annotations.get(DRY_RUN_ANNOTATION) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                dry_run = parse_bool(s).ok_or_else(|| {
                    FieldError::new(&field, format!("{s:?} is not \"true\" or \"false\""))
                })?;
            }
            Some(other) => {
                return Err(FieldError::new(
                    field,
                    format!("expected a string, got {}", kind_of(other)),
                ));
            }
        }
    }

    let empty = Map::new();
    let spec = as_object(top.get("spec"), "spec")?.unwrap_or(&empty);
    known_fields(
        spec,
        "spec",
        &[
            "selector",
            "targetRef",
            "targetRefs",
            "action",
            "provider",
            "rules",
        ],
    )?;

    let mut selector = Vec::new();
    let has_selector = as_object(spec.get("selector"), "spec.selector")?.is_some();
    if let Some(sel) = as_object(spec.get("selector"), "spec.selector")? {
        known_fields(sel, "spec.selector", &["matchLabels"])?;
        if let Some(labels) = as_object(sel.get("matchLabels"), "spec.selector.matchLabels")? {
            for (k, v) in labels {
                let field = format!("spec.selector.matchLabels.{k}");
                if k.is_empty() {
                    return Err(FieldError::new(field, "empty label key"));
                }
                let Value::String(v) = v else {
                    return Err(FieldError::new(
                        field,
                        format!("expected a string, got {}", kind_of(v)),
                    ));
                };
                selector.push((k.clone(), v.clone()));
            }
        }
    }
    selector.sort();
    let mut targets = Vec::new();
    if let Some(one) = spec.get("targetRef").filter(|v| !v.is_null()) {
        targets.push(target_of(one, namespace, root_namespace, "spec.targetRef")?);
    }
    for (i, t) in as_list(spec.get("targetRefs"), "spec.targetRefs")?
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        targets.push(target_of(
            t,
            namespace,
            root_namespace,
            &format!("spec.targetRefs[{i}]"),
        )?);
    }
    let targeted = !targets.is_empty();
    if targeted && has_selector {
        return Err(FieldError::new(
            "spec.selector",
            "selector and targetRef(s) are mutually exclusive",
        ));
    }

    let action = match spec.get("action") {
        None | Some(Value::Null) => Action::Allow,
        Some(Value::String(a)) => match a.as_str() {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            "AUDIT" if targeted => Action::Audit,
            "AUDIT" | "CUSTOM" => {
                return Ok(Parsed::Unsupported {
                    policy: key,
                    action: a.clone(),
                });
            }
            other => {
                return Err(FieldError::new(
                    "spec.action",
                    format!("unknown action {other:?} (expected ALLOW, DENY, AUDIT or CUSTOM)"),
                ));
            }
        },
        Some(other) => {
            return Err(FieldError::new(
                "spec.action",
                format!("expected a string, got {}", kind_of(other)),
            ));
        }
    };
    as_object(spec.get("provider"), "spec.provider")?;

    let mut http = BTreeSet::new();
    let mut rules = Vec::new();
    for (i, value) in as_list(spec.get("rules"), "spec.rules")?
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let field = format!("spec.rules[{i}]");
        rules.push(rule(value, &field, namespace, &mut http)?);
    }

    let policy = Policy {
        key: key.into(),
        action,
        dry_run,
        rules,
    };
    if targeted {
        return Ok(Parsed::Targeted { targets, policy });
    }
    Ok(Parsed::Policy {
        namespace: namespace.to_owned(),
        selector,
        policy,
        http,
    })
}

// ---------------------------------------------------------------------------------------------
// Benchmark support.

/// `n` (at least 1) realistic policies in namespace `ns`, all in scope for
/// [`BenchCase::new(ns)`](BenchCase::new)'s workload: half DENY, half ALLOW, namespace-wide and
/// selector-based, using principals, namespaces, CIDRs (IPv4 and IPv6), ports and `when`
/// conditions. None matches the bench connection except the ALLOW policy `zzzz-allow-client`,
/// which is evaluated last, so an evaluation visits every policy and ends allowed.
#[cfg(any(test, feature = "testing"))]
pub fn bench_policies(n: usize, ns: &str) -> Vec<Value> {
    let policy = |name: String, spec: Value| {
        serde_json::json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"namespace": ns, "name": name},
            "spec": spec,
        })
    };
    let selector = serde_json::json!({"matchLabels": {"app": "bench"}});
    let mut out: Vec<Value> = (0..n.saturating_sub(1))
        .map(|i| {
            let (a, b) = (i % 250, i / 250 % 250);
            let spec = match i % 4 {
                0 => serde_json::json!({
                    "action": "DENY",
                    "rules": [{
                        "from": [{"source": {"namespaces": [format!("blocked-{i}"), "quarantine-*"]}}],
                        "to": [{"operation": {"ports": [format!("{}", 1000 + i % 60000)]}}],
                    }],
                }),
                1 => serde_json::json!({
                    "selector": selector,
                    "action": "DENY",
                    "rules": [{
                        "from": [
                            {"source": {"ipBlocks": [format!("192.168.{a}.0/24"), format!("fd00:{i:x}::/48")]}},
                            {"source": {"principals": [format!("cluster.local/ns/attacker-{i}/sa/*")]}},
                        ],
                    }],
                }),
                2 => serde_json::json!({
                    "rules": [{
                        "from": [{"source": {
                            "principals": [format!("cluster.local/ns/team-{i}/sa/frontend"), format!("*/sa/batch-{i}")],
                            "notNamespaces": ["kube-system"],
                        }}],
                        "to": [{"operation": {"ports": ["8080", "8443"], "notPorts": ["9090"]}}],
                    }],
                }),
                _ => serde_json::json!({
                    "selector": selector,
                    "rules": [{
                        "from": [{"source": {"ipBlocks": [format!("10.{}.{b}.0/24", 100 + a % 100)]}}],
                        "when": [
                            {"key": "source.namespace", "values": [format!("partner-{i}")]},
                            {"key": "destination.port", "notValues": ["15000"]},
                        ],
                    }],
                }),
            };
            policy(format!("p-{i:05}"), spec)
        })
        .collect();
    if n > 0 {
        out.push(policy(
            "zzzz-allow-client".to_owned(),
            serde_json::json!({
                "selector": selector,
                "rules": [{
                    "from": [{"source": {"principals": ["cluster.local/ns/client/sa/client"]}}],
                    "to": [{"operation": {"ports": ["8080"]}}],
                }],
            }),
        ));
    }
    out
}

/// The destination and connection [`bench_policies`] is written for: a workload labelled
/// `app: bench` in `ns`, and a mutual-TLS connection from `cluster.local/ns/client/sa/client`
/// at 10.0.0.1 to port 8080.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone)]
pub struct BenchCase {
    pub workload: Workload,
    pub identity: Identity,
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

#[cfg(any(test, feature = "testing"))]
impl BenchCase {
    pub fn new(ns: &str) -> Self {
        let dst: SocketAddr = "10.1.0.1:8080".parse().expect("valid address");
        Self {
            workload: Workload {
                uid: format!("{ns}/bench"),
                name: "bench".into(),
                namespace: ns.into(),
                node: Some("node-a".into()),
                service_account: "bench".into(),
                ips: vec![dst.ip()],
                labels: [("app", "bench"), ("version", "v1")]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                workload_name: "bench".into(),
                netns: None,
                captured: true,
                host_network: false,
                dns_capture: None,
                waypoint: None,
            },
            identity: Identity::new("cluster.local", "client", "client"),
            src: "10.0.0.1:40000".parse().expect("valid address"),
            dst,
        }
    }

    pub fn connection(&self) -> Connection<'_> {
        Connection::new(self.src, self.dst, Some(&self.identity))
    }
}

#[cfg(test)]
mod tests {

    use serde_json::json;

    use super::*;

    const ROOT: &str = "istio-system";

    fn ap(namespace: &str, name: &str, spec: Value) -> Value {
        json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"namespace": namespace, "name": name},
            "spec": spec,
        })
    }

    fn dry_run(mut policy: Value, value: &str) -> Value {
        policy["metadata"]["annotations"] = json!({ DRY_RUN_ANNOTATION: value });
        policy
    }

    fn workload(namespace: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            uid: format!("{namespace}/w"),
            name: "w".into(),
            namespace: namespace.into(),
            node: Some("node-a".into()),
            service_account: "default".into(),
            ips: vec!["10.1.0.1".parse().unwrap()],
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            workload_name: "w".into(),
            netns: None,
            captured: true,
            host_network: false,
            dns_capture: None,
            waypoint: None,
        }
    }

    /// Pod labels in a test case.
    type Labels<'a> = &'a [(&'a str, &'a str)];

    /// A test connection: source IP and identity, destination IP and port.
    #[derive(Debug, Clone)]
    struct Peer {
        src: IpAddr,
        dst: IpAddr,
        port: u16,
        id: Option<Identity>,
    }

    /// Mutual TLS from `cluster.local/ns/<ns>/sa/<sa>` at 10.0.0.1 to 10.1.0.1:8080.
    fn tls(ns: &str, sa: &str) -> Peer {
        Peer {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.1.0.1".parse().unwrap(),
            port: 8080,
            id: Some(Identity::new("cluster.local", ns, sa)),
        }
    }

    /// Plaintext from `ip` to 10.1.0.1:8080.
    fn plain(ip: &str) -> Peer {
        Peer {
            src: ip.parse().unwrap(),
            dst: "10.1.0.1".parse().unwrap(),
            port: 8080,
            id: None,
        }
    }

    impl Peer {
        fn port(mut self, port: u16) -> Self {
            self.port = port;
            self
        }
        fn src_ip(mut self, ip: &str) -> Self {
            self.src = ip.parse().unwrap();
            self
        }
        fn dst_ip(mut self, ip: &str) -> Self {
            self.dst = ip.parse().unwrap();
            self
        }
        fn td(mut self, td: &str) -> Self {
            if let Some(id) = &mut self.id {
                id.trust_domain = td.into();
            }
            self
        }
        fn connection(&self) -> Connection<'_> {
            Connection {
                src_ip: self.src,
                src_port: 40000,
                dst_ip: self.dst,
                dst_port: self.port,
                src_identity: self.id.as_ref(),
                request: None,
            }
        }
    }

    fn parse_ok(policies: &[Value]) -> Policies {
        let (set, errors) = Policies::parse(policies, ROOT);
        assert!(
            errors.iter().all(|e| !e.fails_closed()),
            "unexpected invalid policy: {errors:?}"
        );
        set
    }

    /// The decision, and (every test that decides checks it) the explanation's, which must
    /// be the same: `authz check` answers with what enforcement does.
    fn decide(set: &Policies, w: &Workload, peer: &Peer) -> Decision {
        let decision = set.evaluate(w, &peer.connection());
        let explained = set.explain(w, &peer.connection());
        assert_eq!(
            explained.decision, decision,
            "explain disagrees with evaluate"
        );
        for c in &explained.considered {
            if decision.policy.as_deref() == Some(&*c.policy) {
                assert_eq!(
                    c.matched,
                    Some(true),
                    "the deciding policy matched: {explained:?}"
                );
            }
        }
        decision
    }

    /// Parses `policies` (all valid) and checks each (peer, allowed) case against a workload in
    /// `shop` labelled `app: web`.
    fn check(policies: &[Value], cases: &[(Peer, bool)]) {
        let set = parse_ok(policies);
        let w = workload("shop", &[("app", "web")]);
        for (peer, want) in cases {
            let got = decide(&set, &w, peer);
            assert_eq!(got.allowed, *want, "{peer:?}: {got}");
        }
    }

    /// One ALLOW policy in `shop` whose only rule is `rule`.
    fn allow_rule(rule: Value) -> Vec<Value> {
        vec![ap("shop", "allow", json!({"rules": [rule]}))]
    }

    /// One DENY policy in `shop` whose only rule is `rule`.
    fn deny_rule(rule: Value) -> Vec<Value> {
        vec![ap(
            "shop",
            "deny",
            json!({"action": "DENY", "rules": [rule]}),
        )]
    }

    fn source(source: Value) -> Value {
        json!({"from": [{"source": source}]})
    }

    fn operation(operation: Value) -> Value {
        json!({"to": [{"operation": operation}]})
    }

    fn when(key: &str, values: &[&str], not_values: &[&str]) -> Value {
        let mut c = json!({"key": key});
        if !values.is_empty() {
            c["values"] = json!(values);
        }
        if !not_values.is_empty() {
            c["notValues"] = json!(not_values);
        }
        json!({"when": [c]})
    }

    // ----- precedence -----

    #[test]
    fn no_policy_allows_everything() {
        check(&[], &[(tls("a", "x"), true), (plain("192.0.2.1"), true)]);
        let w = workload("shop", &[]);
        let d = Policies::default().evaluate(&w, &tls("a", "x").connection());
        assert_eq!(
            d,
            Decision {
                allowed: true,
                policy: None,
                dry_run_denial: None,
                audit: None,
            }
        );
        assert!(Policies::default().is_empty());
    }

    #[test]
    fn allow_policies_present_deny_what_none_of_them_matches() {
        let policies = [
            ap(
                "shop",
                "from-a",
                json!({"rules": [source(json!({"namespaces": ["a"]}))]}),
            ),
            ap(
                "shop",
                "from-b",
                json!({"rules": [source(json!({"namespaces": ["b"]}))]}),
            ),
        ];
        check(
            &policies,
            &[
                (tls("a", "x"), true),
                (tls("b", "x"), true),
                (tls("c", "x"), false),
                (plain("10.0.0.1"), false),
            ],
        );
        let set = parse_ok(&policies);
        let w = workload("shop", &[]);
        let d = decide(&set, &w, &tls("b", "x"));
        assert_eq!(d.policy.as_deref(), Some("shop/from-b"));
        let d = decide(&set, &w, &tls("c", "x"));
        assert_eq!((d.allowed, d.policy.clone()), (false, None));
        assert_eq!(d.to_string(), "denied: no ALLOW policy matched");
    }

    #[test]
    fn deny_only_policies_allow_everything_they_do_not_match() {
        check(
            &deny_rule(source(json!({"namespaces": ["evil"]}))),
            &[
                (tls("evil", "x"), false),
                (tls("good", "x"), true),
                (plain("10.0.0.1"), true),
            ],
        );
    }

    #[test]
    fn deny_wins_over_allow() {
        let policies = [
            ap("shop", "allow-all", json!({"rules": [{}]})),
            ap(
                "shop",
                "deny-evil",
                json!({"action": "DENY", "rules": [source(json!({"namespaces": ["evil"]}))]}),
            ),
        ];
        check(
            &policies,
            &[(tls("evil", "x"), false), (tls("good", "x"), true)],
        );
        let set = parse_ok(&policies);
        let d = decide(&set, &workload("shop", &[]), &tls("evil", "x"));
        assert_eq!(d.policy.as_deref(), Some("shop/deny-evil"));
        assert_eq!(d.to_string(), "denied by shop/deny-evil");
        let d = decide(&set, &workload("shop", &[]), &tls("good", "x"));
        assert_eq!(d.to_string(), "allowed by shop/allow-all");
    }

    #[test]
    fn the_explanation_lists_the_policies_in_istios_order_with_what_matched() {
        let policies = [
            ap("shop", "z-allow-all", json!({"rules": [{}]})),
            ap(
                "shop",
                "deny-evil",
                json!({"action": "DENY", "rules": [source(json!({"namespaces": ["evil"]}))]}),
            ),
            ap("other", "elsewhere", json!({"rules": [{}]})),
        ];
        let set = parse_ok(&policies);
        let w = workload("shop", &[]);
        let seen = |peer: &Peer| {
            set.explain(&w, &peer.connection())
                .considered
                .iter()
                .map(|c| (c.action, c.policy.to_string(), c.matched))
                .collect::<Vec<_>>()
        };
        // Listed DENY first; the namespace's policies are looked at by name, so the DENY
        // that matches here ends the evaluation before the ALLOW (no dry-run or audit
        // policy exists to look for).
        assert_eq!(
            seen(&tls("evil", "x")),
            [
                ("DENY", "shop/deny-evil".to_owned(), Some(true)),
                ("ALLOW", "shop/z-allow-all".to_owned(), None),
            ]
        );
        assert_eq!(
            seen(&tls("good", "x")),
            [
                ("DENY", "shop/deny-evil".to_owned(), Some(false)),
                ("ALLOW", "shop/z-allow-all".to_owned(), Some(true)),
            ]
        );
    }

    #[test]
    fn empty_spec_is_allow_nothing() {
        for spec in [
            json!({}),
            json!({"action": "ALLOW"}),
            json!({"rules": []}),
            Value::Null,
        ] {
            let mut policy = ap("shop", "allow-nothing", spec.clone());
            if spec.is_null() {
                policy.as_object_mut().unwrap().remove("spec");
            }
            check(
                &[policy],
                &[(tls("shop", "x"), false), (plain("10.0.0.1"), false)],
            );
        }
    }

    #[test]
    fn empty_rule_matches_every_connection() {
        check(
            &allow_rule(json!({})),
            &[(tls("a", "x"), true), (plain("192.0.2.1").port(1), true)],
        );
        check(
            &deny_rule(json!({})),
            &[(tls("a", "x"), false), (plain("192.0.2.1"), false)],
        );
    }

    #[test]
    fn deny_policy_without_rules_matches_nothing() {
        check(
            &[ap("shop", "deny", json!({"action": "DENY"}))],
            &[(tls("a", "x"), true), (plain("10.0.0.1"), true)],
        );
    }

    #[test]
    fn rules_are_ored() {
        let policies = [ap(
            "shop",
            "p",
            json!({"rules": [
                source(json!({"namespaces": ["a"]})),
                operation(json!({"ports": ["9090"]})),
            ]}),
        )];
        check(
            &policies,
            &[
                (tls("a", "x"), true),
                (tls("b", "x").port(9090), true),
                (tls("b", "x"), false),
            ],
        );
    }

    #[test]
    fn sources_are_ored_and_fields_within_a_source_are_anded() {
        let rule = json!({"from": [
            {"source": {"namespaces": ["a"], "ipBlocks": ["10.0.0.0/24"]}},
            {"source": {"principals": ["cluster.local/ns/b/sa/y"]}},
        ]});
        check(
            &allow_rule(rule),
            &[
                (tls("a", "x"), true),
                (tls("a", "x").src_ip("10.9.0.1"), false),
                (plain("10.0.0.1"), false),
                (tls("b", "y").src_ip("10.9.0.1"), true),
                (tls("b", "z"), false),
            ],
        );
    }

    #[test]
    fn operations_are_ored() {
        let rule = json!({"to": [
            {"operation": {"ports": ["80"]}},
            {"operation": {"ports": ["443"]}},
        ]});
        check(
            &allow_rule(rule),
            &[
                (tls("a", "x").port(80), true),
                (tls("a", "x").port(443), true),
                (tls("a", "x").port(8080), false),
            ],
        );
    }

    #[test]
    fn from_to_and_every_when_condition_are_anded() {
        let rule = json!({
            "from": [{"source": {"namespaces": ["a"]}}],
            "to": [{"operation": {"ports": ["8080"]}}],
            "when": [
                {"key": "source.ip", "values": ["10.0.0.0/8"]},
                {"key": "destination.ip", "values": ["10.1.0.0/16"]},
            ],
        });
        check(
            &allow_rule(rule),
            &[
                (tls("a", "x"), true),
                (tls("b", "x"), false),
                (tls("a", "x").port(80), false),
                (tls("a", "x").src_ip("192.0.2.1"), false),
                (tls("a", "x").dst_ip("10.2.0.1"), false),
            ],
        );
    }

    // ----- source fields -----

    #[test]
    fn principals_match_exact_prefix_suffix_and_presence() {
        let cases: [(&str, &[(Peer, bool)]); 6] = [
            (
                "cluster.local/ns/a/sa/x",
                &[
                    (tls("a", "x"), true),
                    (tls("a", "y"), false),
                    (tls("a", "x").td("other.td"), false),
                ],
            ),
            (
                "cluster.local/ns/a/*",
                &[
                    (tls("a", "x"), true),
                    (tls("a", "y"), true),
                    (tls("ab", "x"), false),
                ],
            ),
            // A prefix ending inside the namespace.
            (
                "cluster.local/ns/te*",
                &[(tls("team", "x"), true), (tls("a", "x"), false)],
            ),
            (
                "*/sa/x",
                &[
                    (tls("a", "x"), true),
                    (tls("b", "x").td("other.td"), true),
                    (tls("a", "xx"), false),
                ],
            ),
            // A suffix spanning the trust domain and the namespace.
            (
                "*local/ns/a/sa/x",
                &[(tls("a", "x"), true), (tls("a", "x").td("other"), false)],
            ),
            ("*", &[(tls("a", "x"), true), (plain("10.0.0.1"), false)]),
        ];
        for (pattern, peers) in cases {
            check(&allow_rule(source(json!({"principals": [pattern]}))), peers);
        }
    }

    #[test]
    fn principals_accept_the_spiffe_scheme() {
        for pattern in [
            "spiffe://cluster.local/ns/a/sa/x",
            "spiffe://cluster.local/ns/a/*",
        ] {
            check(
                &allow_rule(source(json!({"principals": [pattern]}))),
                &[(tls("a", "x"), true), (tls("b", "x"), false)],
            );
        }
    }

    #[test]
    fn not_principals_exclude_matching_peers_and_admit_plaintext() {
        check(
            &allow_rule(source(
                json!({"notPrincipals": ["cluster.local/ns/a/sa/x", "*/sa/admin"]}),
            )),
            &[
                (tls("a", "x"), false),
                (tls("b", "admin"), false),
                (tls("a", "y"), true),
                (plain("10.0.0.1"), true),
            ],
        );
        // notPrincipals: ["*"] selects exactly the plaintext peers (Istio's "require mTLS").
        check(
            &deny_rule(source(json!({"notPrincipals": ["*"]}))),
            &[(tls("a", "x"), true), (plain("10.0.0.1"), false)],
        );
    }

    #[test]
    fn namespaces_match_the_peer_identity_namespace() {
        check(
            &allow_rule(source(
                json!({"namespaces": ["a", "team-*", "*-prod", "*"]}),
            )),
            &[(tls("a", "x"), true), (plain("10.0.0.1"), false)],
        );
        check(
            &allow_rule(source(json!({"namespaces": ["a", "team-*", "*-prod"]}))),
            &[
                (tls("a", "x"), true),
                (tls("team-red", "x"), true),
                (tls("web-prod", "x"), true),
                (tls("b", "x"), false),
                (plain("10.0.0.1"), false),
            ],
        );
    }

    #[test]
    fn not_namespaces_exclude_matching_peers_and_admit_plaintext() {
        check(
            &allow_rule(source(json!({"notNamespaces": ["a", "kube-*"]}))),
            &[
                (tls("a", "x"), false),
                (tls("kube-system", "x"), false),
                (tls("b", "x"), true),
                (plain("10.0.0.1"), true),
            ],
        );
    }

    #[test]
    fn service_accounts_match_namespace_and_name_defaulting_to_the_policy_namespace() {
        check(
            &allow_rule(source(json!({"serviceAccounts": ["a/x", "local"]}))),
            &[
                (tls("a", "x"), true),
                (tls("shop", "local"), true),
                (tls("a", "local"), false),
                (tls("b", "x"), false),
                (plain("10.0.0.1"), false),
            ],
        );
    }

    #[test]
    fn not_service_accounts_exclude_matching_peers_and_admit_plaintext() {
        check(
            &allow_rule(source(json!({"notServiceAccounts": ["a/x"]}))),
            &[
                (tls("a", "x"), false),
                (tls("a", "y"), true),
                (plain("10.0.0.1"), true),
            ],
        );
    }

    #[test]
    fn ip_blocks_match_cidrs_and_single_addresses() {
        check(
            &allow_rule(source(
                json!({"ipBlocks": ["10.0.0.0/24", "192.0.2.7", "172.16.5.9/12"]}),
            )),
            &[
                (plain("10.0.0.200"), true),
                (plain("10.0.1.1"), false),
                (plain("192.0.2.7"), true),
                (plain("192.0.2.8"), false),
                // Host bits in a CIDR are ignored.
                (plain("172.31.255.255"), true),
                // An IPv4-mapped IPv6 source is its IPv4 address.
                (plain("::ffff:10.0.0.9"), true),
                (tls("a", "x").src_ip("10.0.0.1"), true),
            ],
        );
        check(
            &allow_rule(source(json!({"ipBlocks": ["0.0.0.0/0"]}))),
            &[(plain("203.0.113.1"), true), (plain("2001:db8::1"), false)],
        );
    }

    #[test]
    fn ip_blocks_match_ipv6_cidrs() {
        check(
            &allow_rule(source(
                json!({"ipBlocks": ["fd00:10::/32", "2001:db8::5", "::ffff:10.0.0.0/120"]}),
            )),
            &[
                (plain("fd00:10:ffff::1"), true),
                (plain("fd00:11::1"), false),
                (plain("2001:db8::5"), true),
                (plain("2001:db8::6"), false),
                (plain("10.0.0.3"), true),
                (plain("10.0.1.3"), false),
            ],
        );
        check(
            &allow_rule(source(json!({"ipBlocks": ["::/0"]}))),
            &[(plain("2001:db8::1"), true), (plain("10.0.0.1"), false)],
        );
    }

    #[test]
    fn not_ip_blocks_exclude_matching_sources() {
        check(
            &allow_rule(source(json!({"notIpBlocks": ["10.0.0.0/8", "fd00::/8"]}))),
            &[
                (plain("10.9.9.9"), false),
                (plain("fd12::1"), false),
                (plain("192.0.2.1"), true),
                (tls("a", "x").src_ip("192.0.2.1"), true),
            ],
        );
    }

    // ----- operation fields -----

    #[test]
    fn ports_match_the_destination_port() {
        check(
            &allow_rule(operation(json!({"ports": ["8080", "9090"]}))),
            &[
                (tls("a", "x").port(8080), true),
                (tls("a", "x").port(9090), true),
                (tls("a", "x").port(80), false),
            ],
        );
    }

    #[test]
    fn not_ports_exclude_the_destination_port() {
        check(
            &allow_rule(operation(json!({"notPorts": ["22"]}))),
            &[
                (plain("10.0.0.1").port(22), false),
                (plain("10.0.0.1").port(80), true),
            ],
        );
        check(
            &deny_rule(operation(json!({"ports": ["22"]}))),
            &[
                (tls("a", "x").port(22), false),
                (tls("a", "x").port(80), true),
            ],
        );
    }

    #[test]
    fn yaml_integer_ports_are_accepted() {
        check(
            &allow_rule(operation(json!({"ports": [8080]}))),
            &[
                (tls("a", "x").port(8080), true),
                (tls("a", "x").port(80), false),
            ],
        );
    }

    // ----- when conditions -----

    #[test]
    fn when_conditions_match_like_the_fields_and_not_values_exclude() {
        let cases: Vec<(Value, Vec<(Peer, bool)>)> = vec![
            (
                when("source.ip", &["10.0.0.0/24", "fd00::/8"], &[]),
                vec![
                    (plain("10.0.0.5"), true),
                    (plain("fd00::1"), true),
                    (plain("10.0.1.5"), false),
                ],
            ),
            (
                when("source.ip", &[], &["10.0.0.0/24"]),
                vec![(plain("10.0.0.5"), false), (plain("10.0.1.5"), true)],
            ),
            (
                when("source.namespace", &["a", "te*"], &[]),
                vec![
                    (tls("a", "x"), true),
                    (tls("team", "x"), true),
                    (tls("b", "x"), false),
                    (plain("10.0.0.1"), false),
                ],
            ),
            (
                when("source.namespace", &[], &["a"]),
                vec![
                    (tls("a", "x"), false),
                    (tls("b", "x"), true),
                    (plain("10.0.0.1"), true),
                ],
            ),
            (
                when(
                    "source.principal",
                    &["cluster.local/ns/a/sa/x", "spiffe://cluster.local/ns/b/*"],
                    &[],
                ),
                vec![
                    (tls("a", "x"), true),
                    (tls("b", "q"), true),
                    (tls("a", "y"), false),
                    (plain("10.0.0.1"), false),
                ],
            ),
            (
                when("source.principal", &[], &["*"]),
                vec![(tls("a", "x"), false), (plain("10.0.0.1"), true)],
            ),
            (
                when("destination.ip", &["10.1.0.0/16"], &[]),
                vec![
                    (tls("a", "x"), true),
                    (tls("a", "x").dst_ip("10.2.0.1"), false),
                ],
            ),
            (
                when("destination.ip", &[], &["10.1.0.1"]),
                vec![
                    (tls("a", "x"), false),
                    (tls("a", "x").dst_ip("10.1.0.2"), true),
                ],
            ),
            (
                when("destination.port", &["8080"], &[]),
                vec![(tls("a", "x"), true), (tls("a", "x").port(80), false)],
            ),
            (
                when("destination.port", &[], &["8080"]),
                vec![(tls("a", "x"), false), (tls("a", "x").port(80), true)],
            ),
            (
                when("destination.port", &["8080", "80"], &["80"]),
                vec![(tls("a", "x"), true), (tls("a", "x").port(80), false)],
            ),
        ];
        for (rule, peers) in cases {
            let set = parse_ok(&allow_rule(rule.clone()));
            let w = workload("shop", &[]);
            for (peer, want) in peers {
                assert_eq!(decide(&set, &w, &peer).allowed, want, "{rule} {peer:?}");
            }
        }
    }

    // ----- plaintext -----

    #[test]
    fn plaintext_peers_never_match_identity_fields_but_always_match_their_not_twins() {
        let identity_fields = [
            ("principals", "notPrincipals", "*"),
            ("namespaces", "notNamespaces", "*"),
            ("serviceAccounts", "notServiceAccounts", "a/x"),
        ];
        for (positive, negative, value) in identity_fields {
            check(
                &allow_rule(source(json!({ positive: [value] }))),
                &[(plain("10.0.0.1"), false)],
            );
            check(
                &allow_rule(source(json!({ negative: [value] }))),
                &[(plain("10.0.0.1"), true)],
            );
        }
        // ... and can be admitted by address.
        check(
            &allow_rule(source(json!({"ipBlocks": ["10.0.0.0/8"]}))),
            &[(plain("10.0.0.1"), true), (plain("192.0.2.1"), false)],
        );
    }

    // ----- scopes -----

    #[test]
    fn root_namespace_policy_applies_to_every_namespace() {
        let policies = [ap(
            ROOT,
            "deny-evil",
            json!({"action": "DENY", "rules": [source(json!({"namespaces": ["evil"]}))]}),
        )];
        let set = parse_ok(&policies);
        for ns in ["shop", "other", ROOT] {
            let d = decide(&set, &workload(ns, &[]), &tls("evil", "x"));
            assert!(!d.allowed, "{ns}");
            assert_eq!(d.policy.as_deref(), Some("istio-system/deny-evil"));
        }
    }

    #[test]
    fn root_namespace_is_a_parameter() {
        let policies = [ap("mesh-root", "allow-nothing", json!({}))];
        let (set, _) = Policies::parse(&policies, "mesh-root");
        assert_eq!(set.root_namespace(), "mesh-root");
        assert!(!decide(&set, &workload("shop", &[]), &tls("a", "x")).allowed);
        let (set, _) = Policies::parse(&policies, ROOT);
        assert!(decide(&set, &workload("shop", &[]), &tls("a", "x")).allowed);
        assert!(!decide(&set, &workload("mesh-root", &[]), &tls("a", "x")).allowed);
    }

    #[test]
    fn root_namespace_selector_policy_applies_to_matching_workloads_of_every_namespace() {
        let set = parse_ok(&[ap(
            ROOT,
            "web-allow-nothing",
            json!({"selector": {"matchLabels": {"app": "web"}}}),
        )]);
        for (ns, labels, want) in [
            ("shop", &[("app", "web")][..], false),
            ("other", &[("app", "web"), ("v", "1")][..], false),
            (ROOT, &[("app", "web")][..], false),
            ("shop", &[("app", "db")][..], true),
            ("shop", &[][..], true),
        ] {
            let d = decide(&set, &workload(ns, labels), &tls("a", "x"));
            assert_eq!(d.allowed, want, "{ns} {labels:?}");
        }
    }

    #[test]
    fn namespace_policy_applies_only_to_its_namespace() {
        let set = parse_ok(&[ap("shop", "allow-nothing", json!({}))]);
        assert!(!decide(&set, &workload("shop", &[("app", "x")]), &tls("a", "x")).allowed);
        assert!(decide(&set, &workload("other", &[]), &tls("a", "x")).allowed);
        assert!(decide(&set, &workload(ROOT, &[]), &tls("a", "x")).allowed);
    }

    #[test]
    fn selector_policy_applies_to_workloads_of_its_namespace_with_all_its_labels() {
        let set = parse_ok(&[
            ap(
                "shop",
                "web-v1",
                json!({"selector": {"matchLabels": {"app": "web", "version": "v1"}}}),
            ),
            ap(
                "shop",
                "db",
                json!({"selector": {"matchLabels": {"app": "db"}}, "action": "DENY", "rules": [{}]}),
            ),
        ]);
        for (ns, labels, want) in [
            ("shop", &[("app", "web"), ("version", "v1")][..], false),
            (
                "shop",
                &[("app", "web"), ("version", "v1"), ("x", "y")][..],
                false,
            ),
            ("shop", &[("app", "web")][..], true),
            ("shop", &[("app", "web"), ("version", "v2")][..], true),
            ("shop", &[("version", "v1")][..], true),
            ("shop", &[("app", "db")][..], false),
            ("other", &[("app", "web"), ("version", "v1")][..], true),
            ("other", &[("app", "db")][..], true),
        ] {
            let d = decide(&set, &workload(ns, labels), &tls("a", "x"));
            assert_eq!(d.allowed, want, "{ns} {labels:?}");
        }
    }

    #[test]
    fn empty_selector_is_namespace_wide() {
        for selector in [
            json!({}),
            json!({"matchLabels": {}}),
            json!({"matchLabels": null}),
        ] {
            let set = parse_ok(&[ap("shop", "all", json!({"selector": selector}))]);
            assert!(!decide(&set, &workload("shop", &[("a", "b")]), &tls("a", "x")).allowed);
            assert!(decide(&set, &workload("other", &[]), &tls("a", "x")).allowed);
        }
    }

    #[test]
    fn target_ref_policies_belong_to_a_waypoint_and_are_ignored_by_the_node() {
        let service = Target::Service {
            namespace: "shop".into(),
            name: "web".into(),
        };
        let gateway = Target::Gateway {
            namespace: "shop".into(),
            name: "waypoint".into(),
        };
        let targets = [
            (
                json!({"targetRefs": [{"kind": "Service", "group": "", "name": "web"}]}),
                &service,
            ),
            (
                json!({"targetRef": {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}}),
                &gateway,
            ),
            (
                json!({"targetRefs": [{"kind": "Service", "name": "web"}], "action": "DENY",
                   "rules": [operation(json!({"methods": ["DELETE"]}))]}),
                &service,
            ),
        ];
        for (spec, target) in targets {
            let (set, errors) = Policies::parse(&[ap("shop", "waypoint", spec.clone())], ROOT);
            assert!(errors.is_empty(), "{spec}: {errors:?}");
            assert!(decide(&set, &workload("shop", &[]), &tls("a", "x")).allowed);
            assert!(set.has_targeted(std::slice::from_ref(target)), "{spec}");
        }
    }

    #[test]
    fn a_waypoint_judges_targeted_policies_per_request() {
        let spec = json!({"targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/a/sa/x"]}}],
                       "to": [{"operation": {"methods": ["GET"]}}]}]});
        let (set, errors) = Policies::parse(&[ap("shop", "get-only", spec)], ROOT);
        assert!(errors.is_empty(), "{errors:?}");
        let targets = [
            Target::Gateway {
                namespace: "shop".into(),
                name: "waypoint".into(),
            },
            Target::Service {
                namespace: "shop".into(),
                name: "web".into(),
            },
        ];
        let judge = |peer: &Peer, method: &'static str| {
            let r = req(method, "web", "/");
            let request = Request {
                method: r.method,
                host: r.host,
                path: r.path,
                headers: &r.headers,
            };
            set.evaluate_targeted(&targets, &peer.connection().with_request(&request))
        };
        assert!(judge(&tls("a", "x"), "GET").allowed);
        assert!(!judge(&tls("a", "x"), "DELETE").allowed);
        assert!(!judge(&tls("b", "y"), "GET").allowed);
        // Another service through the same waypoint: no policy applies.
        let other = [Target::Service {
            namespace: "shop".into(),
            name: "other".into(),
        }];
        assert!(!set.has_targeted(&other));
    }

    #[test]
    fn targeted_audit_policies_mark_requests_and_decide_nothing() {
        let web = json!([{"kind": "Service", "group": "", "name": "web"}]);
        let (set, errors) = Policies::parse(
            &[
                ap(
                    "shop",
                    "watch-delete",
                    json!({"targetRefs": web, "action": "AUDIT",
                           "rules": [operation(json!({"methods": ["DELETE"]}))]}),
                ),
                ap(
                    "shop",
                    "block-delete",
                    json!({"targetRefs": web, "action": "DENY",
                           "rules": [operation(json!({"methods": ["DELETE"]}))]}),
                ),
            ],
            ROOT,
        );
        assert!(errors.is_empty(), "{errors:?}");
        let targets = [Target::Service {
            namespace: "shop".into(),
            name: "web".into(),
        }];
        let judge = |method: &'static str| {
            let r = req(method, "web", "/");
            let request = Request {
                method: r.method,
                host: r.host,
                path: r.path,
                headers: &r.headers,
            };
            set.evaluate_targeted(&targets, &tls("a", "x").connection().with_request(&request))
        };
        let get = judge("GET");
        assert!(get.allowed && get.audit.is_none(), "{get}");
        // Audited even though the DENY, evaluated first, already decided.
        let delete = judge("DELETE");
        assert!(!delete.allowed, "{delete}");
        assert_eq!(delete.audit.as_deref(), Some("shop/watch-delete"));
        assert!(delete.to_string().contains("audited by shop/watch-delete"));
    }

    #[test]
    fn a_broken_targeted_policy_denies_at_its_targets() {
        let spec = json!({"targetRefs": [{"kind": "Service", "name": "web"}], "action": "MAYBE"});
        let (set, errors) = Policies::parse(&[ap("shop", "broken", spec)], ROOT);
        assert!(errors[0].fails_closed(), "{errors:?}");
        let targets = [Target::Service {
            namespace: "shop".into(),
            name: "web".into(),
        }];
        let d = set.evaluate_targeted(&targets, &tls("a", "x").connection());
        assert!(!d.allowed);
        assert_eq!(d.policy.as_deref(), Some("shop/broken"));
        // The node does not deny for it.
        assert!(decide(&set, &workload("shop", &[]), &tls("a", "x")).allowed);
    }

    #[test]
    fn audit_and_custom_policies_are_ignored_with_a_warning() {
        for action in ["AUDIT", "CUSTOM"] {
            let spec = json!({"action": action, "provider": {"name": "ext-authz"}, "rules": [{}]});
            let (set, errors) = Policies::parse(&[ap("shop", "p", spec)], ROOT);
            assert_eq!(
                errors,
                [RbacError::UnsupportedAction {
                    policy: "shop/p".into(),
                    action: action.into()
                }]
            );
            assert!(!errors[0].fails_closed());
            assert!(set.is_empty());
            assert!(decide(&set, &workload("shop", &[]), &tls("a", "x")).allowed);
        }
    }

    #[test]
    fn v1beta1_is_accepted() {
        let mut policy = ap("shop", "allow-nothing", json!({}));
        policy["apiVersion"] = "security.istio.io/v1beta1".into();
        check(&[policy], &[(tls("a", "x"), false)]);
    }

    // ----- HTTP attributes -----

    /// Each HTTP-only attribute as a rule, and the kind of place it sits in.
    fn http_rules() -> Vec<(&'static str, Value)> {
        vec![
            ("methods", operation(json!({"methods": ["GET"]}))),
            ("notMethods", operation(json!({"notMethods": ["GET"]}))),
            ("paths", operation(json!({"paths": ["/admin"]}))),
            ("notPaths", operation(json!({"notPaths": ["/health"]}))),
            ("hosts", operation(json!({"hosts": ["web.example.com"]}))),
            (
                "notHosts",
                operation(json!({"notHosts": ["web.example.com"]})),
            ),
            (
                "requestPrincipals",
                source(json!({"requestPrincipals": ["iss/sub"]})),
            ),
            (
                "notRequestPrincipals",
                source(json!({"notRequestPrincipals": ["*"]})),
            ),
            (
                "remoteIpBlocks",
                source(json!({"remoteIpBlocks": ["10.0.0.0/8"]})),
            ),
            (
                "notRemoteIpBlocks",
                source(json!({"notRemoteIpBlocks": ["10.0.0.0/8"]})),
            ),
            (
                "request.headers[x-user]",
                when("request.headers[x-user]", &["bob"], &[]),
            ),
            (
                "request.auth.claims[iss]",
                when("request.auth.claims[iss]", &["x"], &[]),
            ),
            (
                "request.auth.principal",
                when("request.auth.principal", &["x"], &[]),
            ),
            (
                "request.auth.audiences",
                when("request.auth.audiences", &["x"], &[]),
            ),
            (
                "request.auth.presenter",
                when("request.auth.presenter", &["x"], &[]),
            ),
            ("remote.ip", when("remote.ip", &["10.0.0.1"], &[])),
            (
                "connection.sni",
                when("connection.sni", &[], &["x.example.com"]),
            ),
            (
                "source.serviceAccount",
                when("source.serviceAccount", &["a/x"], &[]),
            ),
            (
                "experimental.envoy.filters.network.mysql_proxy[db.table]",
                when(
                    "experimental.envoy.filters.network.mysql_proxy[db.table]",
                    &["[update]"],
                    &[],
                ),
            ),
        ]
    }

    #[test]
    fn allow_rule_with_an_http_attribute_never_matches() {
        for (field, http_rule) in http_rules() {
            // Combined with an L4 field that would match, in the same rule.
            let mut rule = http_rule.clone();
            rule.as_object_mut()
                .unwrap()
                .entry("when")
                .or_insert(json!([]))
                .as_array_mut()
                .unwrap()
                .push(json!({"key": "source.namespace", "values": ["a"]}));
            let policies = [ap(
                "shop",
                "allow",
                json!({"rules": [rule, source(json!({"namespaces": ["b"]}))]}),
            )];
            let (set, errors) = Policies::parse(&policies, ROOT);
            assert_eq!(
                errors,
                [RbacError::HttpAttributes {
                    policy: "shop/allow".into(),
                    deny: false,
                    fields: vec![field.to_owned()],
                }],
                "{field}"
            );
            let w = workload("shop", &[]);
            assert!(!decide(&set, &w, &tls("a", "x")).allowed, "{field}");
            // The other, L4-only rule still applies.
            assert!(decide(&set, &w, &tls("b", "x")).allowed, "{field}");
        }
    }

    #[test]
    fn deny_rule_with_an_http_attribute_is_enforced_without_it() {
        for (field, http_rule) in http_rules() {
            // Alone: the rule matches every connection.
            let (set, errors) = Policies::parse(&deny_rule(http_rule.clone()), ROOT);
            assert_eq!(errors.len(), 1, "{field}: {errors:?}");
            assert!(!errors[0].fails_closed());
            let w = workload("shop", &[]);
            for peer in [tls("a", "x"), plain("192.0.2.1").port(1)] {
                assert!(!decide(&set, &w, &peer).allowed, "{field} {peer:?}");
            }
            // With an L4 field: only that field is enforced.
            let mut rule = http_rule.clone();
            rule["when"] = json!([{"key": "destination.port", "values": ["22"]}]);
            if field.contains('.') {
                // The HTTP attribute was itself a `when` condition: keep it next to the L4 one.
                rule["when"]
                    .as_array_mut()
                    .unwrap()
                    .push(http_rule["when"][0].clone());
            }
            let set = parse_ok(&deny_rule(rule));
            assert!(
                !decide(&set, &w, &tls("a", "x").port(22)).allowed,
                "{field}"
            );
            assert!(decide(&set, &w, &tls("a", "x").port(80)).allowed, "{field}");
        }
    }

    #[test]
    fn deny_source_keeps_its_l4_fields_when_http_ones_are_dropped() {
        let set = parse_ok(&deny_rule(source(json!({
            "namespaces": ["evil"],
            "requestPrincipals": ["*"],
        }))));
        let w = workload("shop", &[]);
        assert!(!decide(&set, &w, &tls("evil", "x")).allowed);
        assert!(decide(&set, &w, &tls("good", "x")).allowed);
    }

    /// One request for the L7 tests.
    struct Req {
        method: &'static str,
        host: &'static str,
        path: &'static str,
        headers: http::HeaderMap,
    }

    fn req(method: &'static str, host: &'static str, path: &'static str) -> Req {
        Req {
            method,
            host,
            path,
            headers: http::HeaderMap::new(),
        }
    }

    impl Req {
        fn header(mut self, name: &'static str, value: &'static str) -> Self {
            self.headers
                .append(name, http::HeaderValue::from_static(value));
            self
        }
    }

    fn decide_request(set: &Policies, w: &Workload, peer: &Peer, r: &Req) -> Decision {
        let request = Request {
            method: r.method,
            host: r.host,
            path: r.path,
            headers: &r.headers,
        };
        set.evaluate(w, &peer.connection().with_request(&request))
    }

    #[test]
    fn with_a_request_http_attributes_are_judged_as_written() {
        let w = workload("shop", &[("app", "web")]);
        let a = tls("a", "x");
        // (rule of an ALLOW policy, request, allowed)
        let cases = [
            (
                operation(json!({"methods": ["GET"]})),
                req("GET", "web", "/"),
                true,
            ),
            (
                operation(json!({"methods": ["GET"]})),
                req("POST", "web", "/"),
                false,
            ),
            (
                operation(json!({"notMethods": ["DELETE"]})),
                req("GET", "web", "/"),
                true,
            ),
            (
                operation(json!({"notMethods": ["DELETE"]})),
                req("DELETE", "web", "/"),
                false,
            ),
            (
                operation(json!({"paths": ["/api/*"]})),
                req("GET", "web", "/api/x"),
                true,
            ),
            (
                operation(json!({"paths": ["/api/*"]})),
                req("GET", "web", "/admin"),
                false,
            ),
            (
                operation(json!({"paths": ["*.json"]})),
                req("GET", "web", "/a.json"),
                true,
            ),
            (
                operation(json!({"notPaths": ["/admin"]})),
                req("GET", "web", "/admin"),
                false,
            ),
            // Hosts: case-insensitive, with or without the port.
            (
                operation(json!({"hosts": ["Web.Shop"]})),
                req("GET", "web.shop:8080", "/"),
                true,
            ),
            (
                operation(json!({"hosts": ["*.shop"]})),
                req("GET", "WEB.SHOP", "/"),
                true,
            ),
            (
                operation(json!({"hosts": ["web.shop"]})),
                req("GET", "other", "/"),
                false,
            ),
            (
                operation(json!({"notHosts": ["web.shop"]})),
                req("GET", "web.shop", "/"),
                false,
            ),
            // Methods and paths of one operation must all hold.
            (
                operation(json!({"methods": ["GET"], "paths": ["/ok"], "ports": ["8080"]})),
                req("GET", "web", "/ok"),
                true,
            ),
            (
                operation(json!({"methods": ["GET"], "paths": ["/ok"], "ports": ["9090"]})),
                req("GET", "web", "/ok"),
                false,
            ),
            (
                when("request.headers[x-user]", &["bob"], &[]),
                req("GET", "w", "/").header("x-user", "bob"),
                true,
            ),
            (
                when("request.headers[X-User]", &["bo*"], &[]),
                req("GET", "w", "/").header("x-user", "bob"),
                true,
            ),
            (
                when("request.headers[x-user]", &["bob"], &[]),
                req("GET", "w", "/"),
                false,
            ),
            (
                when("request.headers[x-user]", &[], &["eve"]),
                req("GET", "w", "/").header("x-user", "eve"),
                false,
            ),
            (
                when("request.headers[x-user]", &[], &["eve"]),
                req("GET", "w", "/"),
                true,
            ),
            (
                source(json!({"remoteIpBlocks": ["10.0.0.0/8"]})),
                req("GET", "w", "/"),
                true,
            ),
            (
                source(json!({"notRemoteIpBlocks": ["10.0.0.0/8"]})),
                req("GET", "w", "/"),
                false,
            ),
            (
                when("remote.ip", &["192.0.2.0/24"], &[]),
                req("GET", "w", "/"),
                false,
            ),
            (
                when("source.serviceAccount", &["a/x"], &[]),
                req("GET", "w", "/"),
                true,
            ),
            (
                when("source.serviceAccount", &["a/y"], &[]),
                req("GET", "w", "/"),
                false,
            ),
            // What this mesh never sees: an ALLOW rule using it never matches.
            (
                source(json!({"requestPrincipals": ["*"]})),
                req("GET", "w", "/"),
                false,
            ),
            (
                when("request.auth.claims[iss]", &["x"], &[]),
                req("GET", "w", "/"),
                false,
            ),
        ];
        for (rule, r, want) in cases {
            let set = parse_ok(&allow_rule(rule.clone()));
            let got = decide_request(&set, &w, &a, &r);
            assert_eq!(
                got.allowed, want,
                "{rule} {} {} {}: {got}",
                r.method, r.host, r.path
            );
            // The same rule at L4: an ALLOW rule with HTTP attributes never matches.
            assert!(!decide(&set, &w, &a).allowed, "{rule}");
        }
    }

    #[test]
    fn with_a_request_a_deny_rule_is_judged_as_written_and_without_what_is_never_seen() {
        let w = workload("shop", &[]);
        let a = tls("a", "x");
        let set = parse_ok(&deny_rule(operation(
            json!({"methods": ["DELETE"], "paths": ["/admin*"]}),
        )));
        assert!(!decide_request(&set, &w, &a, &req("DELETE", "w", "/admin/x")).allowed);
        assert!(decide_request(&set, &w, &a, &req("DELETE", "w", "/public")).allowed);
        assert!(decide_request(&set, &w, &a, &req("GET", "w", "/admin")).allowed);
        // At L4 the same rule denies everything (stricter than written).
        assert!(!decide(&set, &w, &a).allowed);
        // A DENY of requests without a JWT: no request here has one, so all are denied.
        let set = parse_ok(&deny_rule(source(json!({"notRequestPrincipals": ["*"]}))));
        assert!(!decide_request(&set, &w, &a, &req("GET", "w", "/")).allowed);
        // The deciding policy is named.
        let set = parse_ok(&deny_rule(operation(json!({"methods": ["DELETE"]}))));
        let d = decide_request(&set, &w, &a, &req("DELETE", "w", "/"));
        assert_eq!(d.policy.as_deref(), Some("shop/deny"));
    }

    #[test]
    fn a_bad_header_name_is_an_invalid_policy() {
        let (_, errors) = Policies::parse(
            &allow_rule(when("request.headers[bad header]", &["x"], &[])),
            ROOT,
        );
        assert!(errors[0].fails_closed(), "{errors:?}");
        assert!(
            errors[0].to_string().contains("spec.rules[0].when[0].key"),
            "{errors:?}"
        );
    }

    #[test]
    fn strip_port_keeps_names_and_ipv6_literals() {
        assert_eq!(strip_port("web:80"), "web");
        assert_eq!(strip_port("web"), "web");
        assert_eq!(strip_port("[fd00::1]:80"), "[fd00::1]");
        assert_eq!(strip_port("fd00::1"), "fd00::1");
        assert_eq!(strip_port("web:"), "web:");
    }

    #[test]
    fn http_attributes_and_ignored_actions_are_reported() {
        let policies = [
            ap(
                "report",
                "http",
                json!({"rules": [operation(json!({"methods": ["GET"], "paths": ["/x"]}))]}),
            ),
            ap("report", "audit", json!({"action": "AUDIT"})),
            ap(
                "report",
                "l4",
                json!({"rules": [operation(json!({"ports": ["80"]}))]}),
            ),
        ];
        let (_, errors) = Policies::parse(&policies, ROOT);
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert!(
            text[0].contains("report/http") && text[0].contains("methods, paths"),
            "{text:?}"
        );
        assert!(
            text[1].contains("report/audit") && text[1].contains("AUDIT"),
            "{text:?}"
        );
        assert!(errors.iter().all(|e| !e.fails_closed()));
    }

    #[test]
    fn dry_run_deny_is_reported_and_not_enforced() {
        let set = parse_ok(&[dry_run(
            ap(
                "shop",
                "deny-evil",
                json!({"action": "DENY", "rules": [source(json!({"namespaces": ["evil"]}))]}),
            ),
            "true",
        )]);
        let w = workload("shop", &[]);
        let d = decide(&set, &w, &tls("evil", "x"));
        assert!(d.allowed);
        assert_eq!(d.policy, None);
        assert_eq!(d.dry_run_denial.as_deref(), Some("shop/deny-evil"));
        assert_eq!(
            d.to_string(),
            "allowed: no ALLOW policy applies (dry-run shop/deny-evil would deny)"
        );
        let d = decide(&set, &w, &tls("good", "x"));
        assert_eq!((d.allowed, d.dry_run_denial), (true, None));
    }

    #[test]
    fn dry_run_allow_is_reported_when_no_allow_policy_matches() {
        let only_a = |name: &str| {
            ap(
                "shop",
                name,
                json!({"rules": [source(json!({"namespaces": ["a"]}))]}),
            )
        };
        let set = parse_ok(&[dry_run(only_a("dry-only-a"), "true")]);
        let w = workload("shop", &[]);
        let d = decide(&set, &w, &tls("b", "x"));
        assert!(d.allowed);
        assert_eq!(d.dry_run_denial.as_deref(), Some("shop/dry-only-a"));
        assert_eq!(decide(&set, &w, &tls("a", "x")).dry_run_denial, None);

        // An enforced ALLOW that matches: enforcing the dry-run one too would still allow.
        let set = parse_ok(&[
            dry_run(only_a("dry-only-a"), "true"),
            ap(
                "shop",
                "allow-b",
                json!({"rules": [source(json!({"namespaces": ["b"]}))]}),
            ),
        ]);
        let d = decide(&set, &w, &tls("b", "x"));
        assert_eq!((d.allowed, d.dry_run_denial), (true, None));
        assert_eq!(d.policy.as_deref(), Some("shop/allow-b"));
    }

    #[test]
    fn dry_run_never_changes_a_denial() {
        let set = parse_ok(&[
            ap("shop", "allow-nothing", json!({})),
            dry_run(ap("shop", "dry-allow-all", json!({"rules": [{}]})), "true"),
        ]);
        let d = decide(&set, &workload("shop", &[]), &tls("a", "x"));
        assert_eq!((d.allowed, d.policy, d.dry_run_denial), (false, None, None));
    }

    #[test]
    fn dry_run_false_is_enforced() {
        for value in ["false", "False", "0"] {
            let set = parse_ok(&[dry_run(ap("shop", "allow-nothing", json!({})), value)]);
            assert!(
                !decide(&set, &workload("shop", &[]), &tls("a", "x")).allowed,
                "{value}"
            );
        }
    }

    // ----- invalid policies fail closed -----

    #[test]
    fn invalid_policy_fails_closed_only_for_the_workloads_it_selects() {
        let bad = json!({
            "selector": {"matchLabels": {"app": "web"}},
            "rules": [source(json!({"ipBlocks": ["10.0.0.0/33"]}))],
        });
        let (set, errors) = Policies::parse(
            &[
                ap("shop", "allow-all", json!({"rules": [{}]})),
                ap("shop", "web", bad),
            ],
            ROOT,
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].fails_closed());
        assert_eq!(set.len(), 2);
        let cases: [(&str, Labels<'_>, bool); 4] = [
            ("shop", &[("app", "web")], false),
            ("shop", &[("app", "web"), ("v", "1")], false),
            ("shop", &[("app", "db")], true),
            ("other", &[("app", "web")], true),
        ];
        for (ns, labels, want) in cases {
            let d = decide(&set, &workload(ns, labels), &tls("a", "x"));
            assert_eq!(d.allowed, want, "{ns} {labels:?}");
            if !want {
                assert_eq!(d.policy.as_deref(), Some("shop/web"));
            }
        }
    }

    #[test]
    fn invalid_policy_without_readable_selector_fails_closed_for_its_namespace() {
        for spec in [
            json!({"action": "REJECT"}),
            json!({"selector": {"matchLabels": {"app": 1}}}),
            json!({"selector": "app=web"}),
            json!("ALLOW"),
        ] {
            let (set, errors) = Policies::parse(&[ap("shop", "bad", spec.clone())], ROOT);
            assert_eq!(errors.len(), 1, "{spec}: {errors:?}");
            assert!(
                !decide(&set, &workload("shop", &[("app", "db")]), &tls("a", "x")).allowed,
                "{spec}"
            );
            assert!(
                decide(&set, &workload("other", &[]), &tls("a", "x")).allowed,
                "{spec}"
            );
        }
    }

    #[test]
    fn invalid_root_namespace_policy_fails_closed_for_the_whole_mesh() {
        let (set, errors) = Policies::parse(&[ap(ROOT, "bad", json!({"action": "deny"}))], ROOT);
        assert_eq!(errors.len(), 1);
        for ns in ["shop", "other", ROOT] {
            assert!(
                !decide(&set, &workload(ns, &[]), &tls("a", "x")).allowed,
                "{ns}"
            );
        }
        // With a selector: the matching workloads of every namespace.
        let bad = json!({"selector": {"matchLabels": {"app": "web"}}, "action": 7});
        let (set, _) = Policies::parse(&[ap(ROOT, "web", bad)], ROOT);
        assert!(!decide(&set, &workload("shop", &[("app", "web")]), &tls("a", "x")).allowed);
        assert!(decide(&set, &workload("shop", &[("app", "db")]), &tls("a", "x")).allowed);
    }

    #[test]
    fn invalid_policy_without_namespace_fails_closed_everywhere() {
        let mut policy = ap("shop", "bad", json!({}));
        policy["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("namespace");
        let (set, errors) = Policies::parse(&[policy], ROOT);
        assert_eq!(errors.len(), 1);
        let d = decide(&set, &workload("anything", &[]), &tls("a", "x"));
        assert!(!d.allowed);
        assert_eq!(d.policy.as_deref(), Some("<no namespace>/bad (item 0)"));
    }

    #[test]
    fn invalid_waypoint_policy_fails_closed_at_its_targets_only() {
        let mut policy = ap(
            "shop",
            "waypoint",
            json!({"targetRefs": [{"kind": "Service", "name": "web"}]}),
        );
        policy["apiVersion"] = "security.istio.io/v1alpha1".into();
        let (set, errors) = Policies::parse(&[policy], ROOT);
        assert_eq!(errors.len(), 1);
        assert!(decide(&set, &workload("shop", &[("app", "web")]), &tls("a", "x")).allowed);
        let web = [Target::Service {
            namespace: "shop".into(),
            name: "web".into(),
        }];
        assert!(
            !set.evaluate_targeted(&web, &tls("a", "x").connection())
                .allowed
        );
        // Selector and targetRefs together: invalid, and fails closed for the selector.
        let both = json!({"selector": {"matchLabels": {"app": "web"}}, "targetRefs": [{"kind": "Service", "name": "web"}]});
        let (set, errors) = Policies::parse(&[ap("shop", "both", both)], ROOT);
        assert_eq!(errors.len(), 1);
        assert!(!decide(&set, &workload("shop", &[("app", "web")]), &tls("a", "x")).allowed);
    }

    #[test]
    fn invalid_dry_run_policy_only_reports_its_denial() {
        let bad = dry_run(ap("shop", "bad", json!({"action": "DENYY"})), "true");
        let (set, errors) = Policies::parse(&[bad], ROOT);
        assert_eq!(errors.len(), 1);
        let d = decide(&set, &workload("shop", &[]), &tls("a", "x"));
        assert!(d.allowed);
        assert_eq!(d.dry_run_denial.as_deref(), Some("shop/bad"));
        // An unreadable dry-run annotation does not count as dry run.
        let bad = dry_run(ap("shop", "bad", json!({})), "yes");
        let (set, errors) = Policies::parse(&[bad], ROOT);
        assert_eq!(errors.len(), 1);
        assert!(!decide(&set, &workload("shop", &[]), &tls("a", "x")).allowed);
    }

    #[test]
    fn errors_name_the_policy_and_the_field() {
        let mut wrong_api = ap("shop", "p", json!({}));
        wrong_api["apiVersion"] = "security.istio.io/v1alpha1".into();
        let mut wrong_kind = ap("shop", "p", json!({}));
        wrong_kind["kind"] = "PeerAuthentication".into();
        let mut no_name = ap("shop", "p", json!({}));
        no_name["metadata"]["name"] = Value::Null;
        let rule = |r: Value| json!({"rules": [r]});
        let cases: Vec<(Value, &str, &str, &str)> = vec![
            (
                ap("shop", "p", json!({"action": "deny"})),
                "shop/p",
                "spec.action",
                "unknown action \"deny\"",
            ),
            (
                ap("shop", "p", json!({"action": 1})),
                "shop/p",
                "spec.action",
                "expected a string",
            ),
            (
                ap("shop", "p", json!({"acton": "DENY"})),
                "shop/p",
                "spec.acton",
                "unknown field",
            ),
            (
                ap("shop", "p", json!({"rules": {}})),
                "shop/p",
                "spec.rules",
                "expected a list",
            ),
            (
                ap("shop", "p", json!({"rules": ["x"]})),
                "shop/p",
                "spec.rules[0]",
                "expected an object",
            ),
            (
                ap("shop", "p", rule(json!({"form": []}))),
                "shop/p",
                "spec.rules[0].form",
                "unknown field",
            ),
            (
                ap("shop", "p", rule(json!({"from": []}))),
                "shop/p",
                "spec.rules[0].from",
                "must not be empty",
            ),
            (
                ap("shop", "p", rule(json!({"from": [{}]}))),
                "shop/p",
                "spec.rules[0].from[0].source",
                "missing",
            ),
            (
                ap("shop", "p", rule(source(json!({})))),
                "shop/p",
                "spec.rules[0].from[0].source",
                "must not be empty",
            ),
            (
                ap("shop", "p", rule(source(json!({"principals": []})))),
                "shop/p",
                "spec.rules[0].from[0].source",
                "must not be empty",
            ),
            (
                ap("shop", "p", rule(source(json!({"principal": ["x"]})))),
                "shop/p",
                "spec.rules[0].from[0].source.principal",
                "unknown field",
            ),
            (
                ap("shop", "p", rule(source(json!({"principals": "x"})))),
                "shop/p",
                "spec.rules[0].from[0].source.principals",
                "expected a list",
            ),
            (
                ap("shop", "p", rule(source(json!({"principals": [""]})))),
                "shop/p",
                "spec.rules[0].from[0].source.principals[0]",
                "empty value",
            ),
            (
                ap("shop", "p", rule(source(json!({"namespaces": ["a", 3]})))),
                "shop/p",
                "spec.rules[0].from[0].source.namespaces[1]",
                "expected a string",
            ),
            (
                ap(
                    "shop",
                    "p",
                    rule(source(json!({"ipBlocks": ["10.0.0.0/33"]}))),
                ),
                "shop/p",
                "spec.rules[0].from[0].source.ipBlocks[0]",
                "exceeds 32",
            ),
            (
                ap(
                    "shop",
                    "p",
                    rule(source(json!({"notIpBlocks": ["10.0.0.256"]}))),
                ),
                "shop/p",
                "spec.rules[0].from[0].source.notIpBlocks[0]",
                "not an IP address",
            ),
            (
                ap(
                    "shop",
                    "p",
                    rule(source(json!({"ipBlocks": ["fd00::/129"]}))),
                ),
                "shop/p",
                "spec.rules[0].from[0].source.ipBlocks[0]",
                "exceeds 128",
            ),
            (
                ap(
                    "shop",
                    "p",
                    rule(source(json!({"ipBlocks": ["10.0.0.0/+8"]}))),
                ),
                "shop/p",
                "spec.rules[0].from[0].source.ipBlocks[0]",
                "bad prefix length",
            ),
            (
                ap(
                    "shop",
                    "p",
                    rule(source(json!({"remoteIpBlocks": ["nope"]}))),
                ),
                "shop/p",
                "spec.rules[0].from[0].source.remoteIpBlocks[0]",
                "not an IP address",
            ),
            (
                ap(
                    "shop",
                    "p",
                    rule(source(json!({"serviceAccounts": ["a/*"]}))),
                ),
                "shop/p",
                "spec.rules[0].from[0].source.serviceAccounts[0]",
                "wildcards",
            ),
            (
                ap(
                    "shop",
                    "p",
                    rule(source(json!({"serviceAccounts": ["a/b/c"]}))),
                ),
                "shop/p",
                "spec.rules[0].from[0].source.serviceAccounts[0]",
                "expected 'serviceAccount'",
            ),
            (
                ap("shop", "p", rule(json!({"to": [{"operation": {}}]}))),
                "shop/p",
                "spec.rules[0].to[0].operation",
                "must not be empty",
            ),
            (
                ap("shop", "p", rule(operation(json!({"ports": ["http"]})))),
                "shop/p",
                "spec.rules[0].to[0].operation.ports[0]",
                "not a port number",
            ),
            (
                ap("shop", "p", rule(operation(json!({"notPorts": ["70000"]})))),
                "shop/p",
                "spec.rules[0].to[0].operation.notPorts[0]",
                "not a port number",
            ),
            (
                ap("shop", "p", rule(operation(json!({"ports": ["-1"]})))),
                "shop/p",
                "spec.rules[0].to[0].operation.ports[0]",
                "not a port number",
            ),
            (
                ap("shop", "p", rule(operation(json!({"port": ["80"]})))),
                "shop/p",
                "spec.rules[0].to[0].operation.port",
                "unknown field",
            ),
            (
                ap("shop", "p", rule(json!({"when": [{"key": "source.ip"}]}))),
                "shop/p",
                "spec.rules[0].when[0]",
                "at least one of values or notValues",
            ),
            (
                ap("shop", "p", rule(json!({"when": [{"values": ["x"]}]}))),
                "shop/p",
                "spec.rules[0].when[0].key",
                "missing",
            ),
            (
                ap("shop", "p", rule(when("source.namesapce", &["a"], &[]))),
                "shop/p",
                "spec.rules[0].when[0].key",
                "unknown or unsupported attribute",
            ),
            (
                ap(
                    "shop",
                    "p",
                    rule(when("destination.labels[app]", &["a"], &[])),
                ),
                "shop/p",
                "spec.rules[0].when[0].key",
                "unknown or unsupported attribute",
            ),
            (
                ap("shop", "p", rule(when("request.headers", &["a"], &[]))),
                "shop/p",
                "spec.rules[0].when[0].key",
                "unknown or unsupported attribute",
            ),
            (
                ap("shop", "p", rule(when("source.ip", &["10.0.0.0/40"], &[]))),
                "shop/p",
                "spec.rules[0].when[0].values[0]",
                "exceeds 32",
            ),
            (
                ap("shop", "p", rule(when("destination.ip", &[], &["x"]))),
                "shop/p",
                "spec.rules[0].when[0].notValues[0]",
                "not an IP address",
            ),
            (
                ap(
                    "shop",
                    "p",
                    rule(when("destination.port", &["eighty"], &[])),
                ),
                "shop/p",
                "spec.rules[0].when[0].values[0]",
                "not a port number",
            ),
            (
                ap("shop", "p", rule(when("source.principal", &[""], &[]))),
                "shop/p",
                "spec.rules[0].when[0].values[0]",
                "empty value",
            ),
            (
                ap(
                    "shop",
                    "p",
                    json!({"selector": {"matchLabels": {"app": 1}}}),
                ),
                "shop/p",
                "spec.selector.matchLabels.app",
                "expected a string",
            ),
            (
                ap("shop", "p", json!({"selector": {"labels": {"app": "web"}}})),
                "shop/p",
                "spec.selector.labels",
                "unknown field",
            ),
            (
                ap(
                    "shop",
                    "p",
                    json!({"selector": {"matchLabels": {"app": "web"}}, "targetRef": {"kind": "Service", "name": "web"}}),
                ),
                "shop/p",
                "spec.selector",
                "mutually exclusive",
            ),
            (
                dry_run(ap("shop", "p", json!({})), "yes"),
                "shop/p",
                "metadata.annotations.istio.io/dry-run",
                "not \"true\" or \"false\"",
            ),
            (
                ap("shop", "p", json!("ALLOW")),
                "shop/p",
                "spec",
                "expected an object",
            ),
            (wrong_api, "shop/p", "apiVersion", "v1alpha1"),
            (wrong_kind, "shop/p", "kind", "PeerAuthentication"),
            (
                no_name,
                "shop/<no name> (item 0)",
                "metadata.name",
                "missing",
            ),
        ];
        for (object, policy, field, reason) in cases {
            let (_, errors) = Policies::parse(&[object], ROOT);
            let [
                RbacError::Invalid {
                    policy: p,
                    field: f,
                    reason: r,
                },
            ] = errors.as_slice()
            else {
                panic!("{policy} {field}: {errors:?}");
            };
            assert_eq!((p.as_str(), f.as_str()), (policy, field), "{r}");
            assert!(r.contains(reason), "{field}: {r:?} lacks {reason:?}");
            let message = errors[0].to_string();
            assert!(
                message.contains(policy) && message.contains(field),
                "{message}"
            );
        }
    }

    // ----- misc -----

    #[test]
    fn len_counts_enforced_dry_run_and_fail_closed_policies_only() {
        let (set, errors) = Policies::parse(
            &[
                ap("shop", "a", json!({})),
                dry_run(ap("shop", "b", json!({})), "true"),
                ap("shop", "c", json!({"action": "nope"})),
                ap("shop", "d", json!({"action": "AUDIT"})),
                ap(
                    "shop",
                    "e",
                    json!({"targetRefs": [{"kind": "Service", "name": "x"}]}),
                ),
            ],
            ROOT,
        );
        assert_eq!(errors.len(), 2);
        // a, b, c's stand-in, and e (a waypoint's).
        assert_eq!(set.len(), 4);
        assert!(!set.is_empty());
    }

    #[test]
    fn config_file_yaml_is_read() {
        let text = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-from-web, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/web"]
    to:
    - operation:
        ports: ["5432", 5433]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: require-mtls
  namespace: istio-system
spec:
  action: DENY
  rules:
  - from:
    - source: {notPrincipals: ["*"]}
"#;
        let objects = crate::config::file::load_str(text, "config.yaml").unwrap();
        let set = parse_ok(&objects.authorization_policies);
        let db = workload("shop", &[("app", "db")]);
        assert!(decide(&set, &db, &tls("shop", "web").port(5432)).allowed);
        assert!(decide(&set, &db, &tls("shop", "web").port(5433)).allowed);
        assert!(!decide(&set, &db, &tls("shop", "api").port(5432)).allowed);
        let d = decide(&set, &workload("other", &[]), &plain("10.0.0.1"));
        assert_eq!(d.policy.as_deref(), Some("istio-system/require-mtls"));
    }
}
