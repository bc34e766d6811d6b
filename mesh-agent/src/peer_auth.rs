//! PeerAuthentication (`security.istio.io/v1`, `v1beta1`): which mutual-TLS mode a connection
//! into a workload's port must meet, resolved with Istio's scopes, precedence and inheritance.
//!
//! # Semantics (as istiod's `ComposePeerAuthentication`)
//!
//! - Scopes: **mesh** = a policy in the root namespace without a selector; **namespace** = a
//!   policy without a selector in the workload's namespace; **workload** = a policy in the
//!   workload's namespace whose `selector.matchLabels` are all on the pod. A selector with no
//!   labels counts as no selector. A policy with a selector in the root namespace is ignored
//!   (Istio documents this), also for workloads that live in the root namespace.
//! - At each scope the oldest policy is chosen first (`metadata.creationTimestamp`, then name;
//!   a policy without a timestamp counts as oldest, like Go's zero time), and only then is its
//!   mode read: an older `UNSET` policy shadows a newer one at the same scope.
//! - Precedence workload > namespace > mesh; `UNSET` (or no `mtls`) inherits from the parent
//!   scope; with nothing set the mode is PERMISSIVE.
//! - `portLevelMtls` is keyed by the workload's (target) port and only read on workload-scope
//!   policies; an entry overrides the policy's resolved mode for that port, `UNSET` there
//!   inherits it. On a policy without a selector it is ignored, as istiod does, and reported as
//!   [`PeerAuthError::PortLevelWithoutSelector`] (Istio's validation webhook rejects it).
//! - `DISABLE` is PERMISSIVE here (HBONE is always mutual TLS), reported as
//!   [`PeerAuthError::Disable`].
//!
//! # Fail closed
//!
//! A policy that does not validate (unknown mode, bad port key, unknown field, wrong type,
//! unreadable timestamp...) is reported as [`PeerAuthError::Invalid`] and is never read for its
//! mode. Instead it makes every workload it *could* select STRICT on every port, whatever the
//! valid policies say, until it is fixed. What it could select is read as leniently as possible
//! from the broken object: its namespace's workloads matching its selector when the
//! selector is a readable, non-empty label map (nothing in the root namespace, where Istio
//! ignores selector policies); the whole namespace when the selector is absent, empty or
//! unreadable (the whole mesh if that is the root namespace); every workload when its namespace
//! cannot be read.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::policy_json::{
    Envelope, FieldError, as_object, describe, envelope, kind_of, known_fields,
};
use crate::state::Workload;

/// The `apiVersion`s read as PeerAuthentication.
pub use crate::policy_json::API_VERSIONS;
const KIND: &str = "PeerAuthentication";

/// What a connection into a workload's port must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Only mutual TLS (HBONE); plaintext is rejected.
    Strict,
    /// Mutual TLS and plaintext are both accepted.
    Permissive,
}

/// One mode field as written: `Unset` inherits from the parent scope (DISABLE is read as
/// PERMISSIVE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setting {
    Unset,
    Mode(MtlsMode),
}

/// The validated PeerAuthentications of the mesh, ready to answer [`mode`](Self::mode) per
/// connection. Build it with [`parse`](Self::parse); `Default` is "no policy at all".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerAuthentications {
    /// Valid policies by namespace, oldest first (creation timestamp, then name).
    by_namespace: HashMap<String, Vec<Policy>>,
    /// What the invalid policies could select: STRICT for all of it.
    fail_closed: Vec<Reach>,
}

/// One valid policy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Policy {
    name: String,
    created: Option<DateTime<Utc>>,
    /// Empty: no selector (namespace scope, or mesh scope in the root namespace).
    selector: BTreeMap<String, String>,
    mode: Setting,
    /// Workload (target) port -> mode; empty unless `selector` is non-empty.
    ports: BTreeMap<u16, Setting>,
}

/// What an invalid policy could select (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reach {
    /// Its namespace could not be read: every workload.
    Everything,
    /// No selector, an empty one or an unreadable one: the namespace (the mesh when it is the
    /// root namespace).
    Namespace(String),
    /// A readable non-empty selector: the matching workloads of the namespace.
    Selector {
        namespace: String,
        labels: BTreeMap<String, String>,
    },
}

/// Why a PeerAuthentication was rejected or partly ignored; each names the policy
/// (`namespace/name`, or its position in the input when those cannot be read) and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerAuthError {
    /// The policy is not used; every workload it could select is STRICT until it is fixed.
    #[error(
        "PeerAuthentication {policy}: {field}: {reason} (the policy is not used: every workload \
         it could select is STRICT until it is fixed)"
    )]
    Invalid {
        policy: String,
        field: String,
        reason: String,
    },
    /// `portLevelMtls` on a policy without a workload selector: ignored (the rest of the policy
    /// applies), as istiod does.
    #[error(
        "PeerAuthentication {policy}: spec.portLevelMtls: only allowed with a workload selector \
         (spec.selector.matchLabels); ignored"
    )]
    PortLevelWithoutSelector { policy: String },
    /// A mode is `DISABLE`: read as PERMISSIVE.
    #[error(
        "PeerAuthentication {policy}: mode DISABLE is treated as PERMISSIVE (HBONE between mesh \
         workloads is always mutual TLS)"
    )]
    Disable { policy: String },
}

impl PeerAuthError {
    /// Whether this error made the policy fail closed (as opposed to a part being ignored).
    pub fn fails_closed(&self) -> bool {
        matches!(self, Self::Invalid { .. })
    }
}

/// A policy that validated, with what parsing noticed on the way.
struct Parsed {
    namespace: String,
    policy: Policy,
    /// `portLevelMtls` was set without a selector (and dropped).
    port_level_ignored: bool,
    /// Some mode was `DISABLE`.
    disable: bool,
}

impl PeerAuthentications {
    /// Validates `objects` (PeerAuthentication objects as JSON, e.g.
    /// `MeshState.raw.peer_authentications`). Every problem is reported; an invalid policy is
    /// left out and makes every workload it could select STRICT (see the module docs). A policy
    /// that uses `DISABLE` is reported ([`PeerAuthError::Disable`]) and read as PERMISSIVE.
    pub fn parse(objects: &[Value]) -> (Self, Vec<PeerAuthError>) {
        let mut set = Self::default();
        let mut errors = Vec::new();
        for (index, object) in objects.iter().enumerate() {
            match parse_policy(object) {
                Ok(parsed) => {
                    let policy = format!("{}/{}", parsed.namespace, parsed.policy.name);
                    if parsed.port_level_ignored {
                        errors.push(PeerAuthError::PortLevelWithoutSelector {
                            policy: policy.clone(),
                        });
                    }
                    if parsed.disable {
                        errors.push(PeerAuthError::Disable {
                            policy: policy.clone(),
                        });
                    }
                    set.by_namespace
                        .entry(parsed.namespace)
                        .or_default()
                        .push(parsed.policy);
                }
                Err(e) => {
                    errors.push(PeerAuthError::Invalid {
                        policy: describe(object, index),
                        field: e.field,
                        reason: e.reason,
                    });
                    set.fail_closed.push(reach(object));
                }
            }
        }
        for policies in set.by_namespace.values_mut() {
            policies.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
        }
        (set, errors)
    }

    /// The mode a connection into `workload` on its (target) port `port` must meet, with the
    /// mesh's root namespace `root_namespace` (Settings.root_namespace, default `istio-system`).
    pub fn mode(&self, workload: &Workload, port: u16, root_namespace: &str) -> MtlsMode {
        if self
            .fail_closed
            .iter()
            .any(|reach| reach.covers(workload, root_namespace))
        {
            return MtlsMode::Strict;
        }
        let in_namespace = |ns: &str| self.by_namespace.get(ns).map_or(&[][..], Vec::as_slice);
        let mesh = in_namespace(root_namespace)
            .iter()
            .find(|p| p.selector.is_empty());
        // Policies in the root namespace are mesh scope only, also for its own workloads.
        let (namespace, selected) = if workload.namespace == root_namespace {
            (None, None)
        } else {
            let local = in_namespace(&workload.namespace);
            (
                local.iter().find(|p| p.selector.is_empty()),
                local
                    .iter()
                    .find(|p| !p.selector.is_empty() && workload.labels.matches(&p.selector)),
            )
        };
        let mut mode = MtlsMode::Permissive;
        for policy in [mesh, namespace, selected].into_iter().flatten() {
            if let Setting::Mode(m) = policy.mode {
                mode = m;
            }
        }
        if let Some(Setting::Mode(m)) = selected.and_then(|p| p.ports.get(&port)) {
            mode = *m;
        }
        mode
    }
}

impl Reach {
    fn covers(&self, workload: &Workload, root_namespace: &str) -> bool {
        match self {
            Reach::Everything => true,
            Reach::Namespace(ns) => ns == root_namespace || *ns == workload.namespace,
            Reach::Selector { namespace, labels } => {
                namespace != root_namespace
                    && *namespace == workload.namespace
                    && workload.labels.matches(labels)
            }
        }
    }
}

/// What an invalid policy could select, read leniently (see the module docs).
fn reach(object: &Value) -> Reach {
    let Some(namespace) = object["metadata"]["namespace"]
        .as_str()
        .filter(|s| !s.is_empty())
    else {
        return Reach::Everything;
    };
    let namespace = namespace.to_owned();
    let labels = object["spec"]["selector"]["matchLabels"]
        .as_object()
        .and_then(|m| {
            m.iter()
                .map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect::<Option<BTreeMap<_, _>>>()
        })
        .unwrap_or_default();
    if labels.is_empty() {
        Reach::Namespace(namespace)
    } else {
        Reach::Selector { namespace, labels }
    }
}

/// An `mtls` object (`{mode: ...}`, absent or null = UNSET); sets `disable` on DISABLE.
fn mtls(value: Option<&Value>, field: &str, disable: &mut bool) -> Result<Setting, FieldError> {
    let Some(map) = as_object(value, field)? else {
        return Ok(Setting::Unset);
    };
    known_fields(map, field, &["mode"])?;
    let field = format!("{field}.mode");
    match map.get("mode") {
        None | Some(Value::Null) => Ok(Setting::Unset),
        Some(Value::String(mode)) => match mode.as_str() {
            "UNSET" => Ok(Setting::Unset),
            "PERMISSIVE" => Ok(Setting::Mode(MtlsMode::Permissive)),
            "STRICT" => Ok(Setting::Mode(MtlsMode::Strict)),
            "DISABLE" => {
                *disable = true;
                Ok(Setting::Mode(MtlsMode::Permissive))
            }
            other => Err(FieldError::new(
                field,
                format!("unknown mode {other:?} (expected UNSET, DISABLE, PERMISSIVE or STRICT)"),
            )),
        },
        Some(other) => Err(FieldError::new(
            field,
            format!("expected a string, got {}", kind_of(other)),
        )),
    }
}

/// Validates one object and converts it.
fn parse_policy(object: &Value) -> Result<Parsed, FieldError> {
    let Envelope {
        top,
        meta,
        name,
        namespace,
    } = envelope(object, KIND)?;
    let (name, namespace) = (name.to_owned(), namespace.to_owned());
    let created = match meta.get("creationTimestamp") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            DateTime::parse_from_rfc3339(s)
                .map_err(|e| {
                    FieldError::new(
                        "metadata.creationTimestamp",
                        format!("{s:?} is not an RFC 3339 time: {e}"),
                    )
                })?
                .with_timezone(&Utc),
        ),
        Some(other) => {
            return Err(FieldError::new(
                "metadata.creationTimestamp",
                format!("expected a string, got {}", kind_of(other)),
            ));
        }
    };

    let empty = Map::new();
    let spec = as_object(top.get("spec"), "spec")?.unwrap_or(&empty);
    known_fields(spec, "spec", &["selector", "mtls", "portLevelMtls"])?;

    let mut selector = BTreeMap::new();
    if let Some(sel) = as_object(spec.get("selector"), "spec.selector")? {
        known_fields(sel, "spec.selector", &["matchLabels"])?;
        if let Some(labels) = as_object(sel.get("matchLabels"), "spec.selector.matchLabels")? {
            for (key, value) in labels {
                let field = format!("spec.selector.matchLabels.{key}");
                if key.is_empty() {
                    return Err(FieldError::new(field, "empty label key"));
                }
                let Value::String(value) = value else {
                    return Err(FieldError::new(
                        field,
                        format!("expected a string, got {}", kind_of(value)),
                    ));
                };
                selector.insert(key.clone(), value.clone());
            }
        }
    }

    let mut disable = false;
    let mode = mtls(spec.get("mtls"), "spec.mtls", &mut disable)?;

    let mut ports = BTreeMap::new();
    if let Some(entries) = as_object(spec.get("portLevelMtls"), "spec.portLevelMtls")? {
        for (key, value) in entries {
            let field = format!("spec.portLevelMtls.{key}");
            let port = key
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| FieldError::new(&field, "not a port number (1-65535)"))?;
            if value.is_null() {
                return Err(FieldError::new(field, "cannot be null"));
            }
            ports.insert(port, mtls(Some(value), &field, &mut disable)?);
        }
    }
    let port_level_ignored = selector.is_empty() && !ports.is_empty();
    if port_level_ignored {
        ports.clear();
    }

    Ok(Parsed {
        namespace,
        policy: Policy {
            name,
            created,
            selector,
            mode,
            ports,
        },
        port_level_ignored,
        disable,
    })
}

#[cfg(test)]
mod tests {

    use serde_json::json;

    use super::MtlsMode::{Permissive, Strict};
    use super::*;

    const ROOT: &str = "istio-system";

    fn pa(namespace: &str, name: &str, spec: Value) -> Value {
        json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"namespace": namespace, "name": name},
            "spec": spec,
        })
    }

    fn created(mut policy: Value, at: &str) -> Value {
        policy["metadata"]["creationTimestamp"] = at.into();
        policy
    }

    fn strict() -> Value {
        json!({"mtls": {"mode": "STRICT"}})
    }

    fn permissive() -> Value {
        json!({"mtls": {"mode": "PERMISSIVE"}})
    }

    fn workload(namespace: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            uid: format!("{namespace}/w"),
            name: "w".into(),
            namespace: namespace.into(),
            node: Some("node-a".into()),
            service_account: "default".into(),
            ips: vec![],
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

    /// Parses `policies` (which must all be valid) and checks each (namespace, labels, port,
    /// expected mode) case.
    fn check(policies: &[Value], cases: &[(&str, Labels<'_>, u16, MtlsMode)]) {
        let (set, errors) = PeerAuthentications::parse(policies);
        assert!(
            errors
                .iter()
                .all(|e| matches!(e, PeerAuthError::Disable { .. })),
            "{errors:?}"
        );
        for &(ns, labels, port, want) in cases {
            let got = set.mode(&workload(ns, labels), port, ROOT);
            assert_eq!(got, want, "{ns} {labels:?} port {port}");
        }
    }

    #[test]
    fn no_policy_is_permissive() {
        check(&[], &[("default", &[], 8080, Permissive)]);
        let w = workload("default", &[]);
        assert_eq!(
            PeerAuthentications::default().mode(&w, 80, ROOT),
            Permissive
        );
    }

    #[test]
    fn mesh_strict_applies_to_every_namespace() {
        check(
            &[pa(ROOT, "default", strict())],
            &[
                ("default", &[], 8080, Strict),
                ("shop", &[("app", "web")], 80, Strict),
                (ROOT, &[], 15000, Strict),
            ],
        );
    }

    #[test]
    fn root_namespace_is_a_parameter() {
        let (set, _) = PeerAuthentications::parse(&[pa("mesh-root", "default", strict())]);
        let w = workload("shop", &[]);
        assert_eq!(set.mode(&w, 80, "mesh-root"), Strict);
        // With another root, the same policy is just the namespace policy of `mesh-root`.
        assert_eq!(set.mode(&w, 80, ROOT), Permissive);
    }

    #[test]
    fn selector_policy_in_root_namespace_is_ignored() {
        let selected =
            json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"}});
        check(
            &[pa(ROOT, "web", selected)],
            &[
                ("shop", &[("app", "web")], 80, Permissive),
                (ROOT, &[("app", "web")], 80, Permissive),
            ],
        );
    }

    #[test]
    fn empty_selector_is_namespace_wide() {
        for selector in [
            json!({}),
            json!({"matchLabels": {}}),
            json!({"matchLabels": null}),
        ] {
            let spec = json!({"selector": selector, "mtls": {"mode": "STRICT"}});
            check(
                &[pa("shop", "all", spec.clone())],
                &[
                    ("shop", &[("app", "web")], 80, Strict),
                    ("other", &[], 80, Permissive),
                ],
            );
            // ... and mesh-wide in the root namespace.
            check(&[pa(ROOT, "all", spec)], &[("other", &[], 80, Strict)]);
        }
    }

    #[test]
    fn namespace_policy_overrides_mesh() {
        check(
            &[
                pa(ROOT, "default", strict()),
                pa("legacy", "default", permissive()),
            ],
            &[("legacy", &[], 80, Permissive), ("shop", &[], 80, Strict)],
        );
        check(
            &[
                pa(ROOT, "default", permissive()),
                pa("shop", "default", strict()),
            ],
            &[("shop", &[], 80, Strict), ("legacy", &[], 80, Permissive)],
        );
    }

    #[test]
    fn workload_selector_overrides_namespace() {
        let web =
            json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "PERMISSIVE"}});
        let db = json!({"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "STRICT"}});
        check(
            &[
                pa(ROOT, "default", permissive()),
                pa("shop", "default", strict()),
                pa("shop", "web", web),
                pa("legacy", "db", db),
            ],
            &[
                ("shop", &[("app", "web")], 80, Permissive),
                ("shop", &[("app", "api")], 80, Strict),
                ("legacy", &[("app", "db")], 80, Strict),
                ("legacy", &[("app", "web")], 80, Permissive),
            ],
        );
    }

    #[test]
    fn unset_inherits_from_namespace() {
        let unset = [
            json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "UNSET"}}),
            json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {}}),
            json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": null}),
            json!({"selector": {"matchLabels": {"app": "web"}}}),
        ];
        for spec in unset {
            check(
                &[pa("shop", "default", strict()), pa("shop", "web", spec)],
                &[("shop", &[("app", "web")], 80, Strict)],
            );
        }
    }

    #[test]
    fn unset_namespace_inherits_from_mesh() {
        check(
            &[
                pa(ROOT, "default", strict()),
                pa("shop", "default", json!({"mtls": {"mode": "UNSET"}})),
                pa("other", "default", json!({})),
            ],
            &[("shop", &[], 80, Strict), ("other", &[], 80, Strict)],
        );
        check(
            &[pa(ROOT, "default", json!({"mtls": {"mode": "UNSET"}}))],
            &[("shop", &[], 80, Permissive)],
        );
    }

    #[test]
    fn port_level_mtls_overrides_workload_mode_for_that_port() {
        let spec = json!({
            "selector": {"matchLabels": {"app": "web"}},
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}, "9090": {"mode": "UNSET"}},
        });
        check(
            &[pa("shop", "web", spec)],
            &[
                ("shop", &[("app", "web")], 8080, Permissive),
                ("shop", &[("app", "web")], 9090, Strict),
                ("shop", &[("app", "web")], 80, Strict),
                ("shop", &[("app", "api")], 8080, Permissive),
            ],
        );
    }

    #[test]
    fn port_level_unset_and_unset_workload_inherit_from_namespace() {
        let spec = json!({
            "selector": {"matchLabels": {"app": "web"}},
            "mtls": {"mode": "UNSET"},
            "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}, "9090": {"mode": "UNSET"}},
        });
        check(
            &[pa("shop", "default", strict()), pa("shop", "web", spec)],
            &[
                ("shop", &[("app", "web")], 8080, Permissive),
                ("shop", &[("app", "web")], 9090, Strict),
                ("shop", &[("app", "web")], 80, Strict),
            ],
        );
    }

    #[test]
    fn port_level_on_namespace_policy_is_ignored() {
        let spec =
            json!({"mtls": {"mode": "PERMISSIVE"}, "portLevelMtls": {"8080": {"mode": "STRICT"}}});
        let (set, errors) = PeerAuthentications::parse(&[pa("shop", "default", spec)]);
        assert_eq!(
            errors,
            [PeerAuthError::PortLevelWithoutSelector {
                policy: "shop/default".into()
            }]
        );
        assert!(!errors[0].fails_closed());
        for port in [8080, 80] {
            assert_eq!(set.mode(&workload("shop", &[]), port, ROOT), Permissive);
        }
    }

    #[test]
    fn disable_is_treated_as_permissive() {
        let port_disable = json!({
            "selector": {"matchLabels": {"app": "web"}},
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {"8080": {"mode": "DISABLE"}},
        });
        check(
            &[
                pa(ROOT, "default", strict()),
                pa("legacy", "default", json!({"mtls": {"mode": "DISABLE"}})),
                pa("shop", "web", port_disable),
            ],
            &[
                ("legacy", &[], 80, Permissive),
                ("shop", &[("app", "web")], 8080, Permissive),
                ("shop", &[("app", "web")], 80, Strict),
            ],
        );
    }

    #[test]
    fn disable_is_reported_once_per_policy_that_uses_it() {
        let policies = [
            pa("disable", "legacy", json!({"mtls": {"mode": "DISABLE"}})),
            pa(
                "disable",
                "ports",
                json!({
                    "selector": {"matchLabels": {"app": "web"}},
                    "mtls": {"mode": "DISABLE"},
                    "portLevelMtls": {"80": {"mode": "DISABLE"}},
                }),
            ),
            pa(
                "disable",
                "strict",
                json!({"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "STRICT"}}),
            ),
        ];
        let (_, errors) = PeerAuthentications::parse(&policies);
        let policies: Vec<String> = errors
            .iter()
            .map(|e| match e {
                PeerAuthError::Disable { policy } if !e.fails_closed() => policy.clone(),
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(policies, ["disable/legacy", "disable/ports"]);
        assert!(errors[0].to_string().contains("treated as PERMISSIVE"));
    }

    #[test]
    fn oldest_policy_wins_at_same_scope() {
        // Workload scope: the older one wins whatever the input order.
        let web = |mode: &str| json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": mode}});
        let old = created(pa("shop", "z-old", web("STRICT")), "2024-01-01T00:00:00Z");
        let new = created(
            pa("shop", "a-new", web("PERMISSIVE")),
            "2024-06-01T00:00:00Z",
        );
        for policies in [[old.clone(), new.clone()], [new, old]] {
            check(&policies, &[("shop", &[("app", "web")], 80, Strict)]);
        }
        // Same time (or none): the name decides. Namespace and mesh scope alike.
        check(
            &[
                pa("shop", "b", permissive()),
                pa("shop", "a", strict()),
                pa(ROOT, "y", strict()),
                pa(ROOT, "x", permissive()),
            ],
            &[("shop", &[], 80, Strict), ("other", &[], 80, Permissive)],
        );
        // No timestamp counts as the oldest (Go's zero time).
        check(
            &[
                created(pa("shop", "a", permissive()), "1999-01-01T00:00:00Z"),
                pa("shop", "b", strict()),
            ],
            &[("shop", &[], 80, Strict)],
        );
        // Other offsets are compared as instants.
        check(
            &[
                created(pa("shop", "a", permissive()), "2024-01-01T02:00:00+00:00"),
                created(pa("shop", "b", strict()), "2024-01-01T03:00:00+02:00"),
            ],
            &[("shop", &[], 80, Strict)],
        );
    }

    #[test]
    fn oldest_policy_is_chosen_before_unset_is_resolved() {
        // Istio picks the oldest policy of a scope first: an older UNSET shadows a newer STRICT.
        check(
            &[
                created(pa("shop", "new", strict()), "2024-06-01T00:00:00Z"),
                created(
                    pa("shop", "old", json!({"mtls": {"mode": "UNSET"}})),
                    "2024-01-01T00:00:00Z",
                ),
            ],
            &[("shop", &[], 80, Permissive)],
        );
    }

    #[test]
    fn selector_must_match_all_labels() {
        let spec = json!({"selector": {"matchLabels": {"app": "web", "version": "v1"}}, "mtls": {"mode": "STRICT"}});
        check(
            &[pa("shop", "web-v1", spec)],
            &[
                ("shop", &[("app", "web"), ("version", "v1")], 80, Strict),
                (
                    "shop",
                    &[("app", "web"), ("version", "v1"), ("extra", "x")],
                    80,
                    Strict,
                ),
                ("shop", &[("app", "web")], 80, Permissive),
                ("shop", &[("app", "web"), ("version", "v2")], 80, Permissive),
                ("shop", &[], 80, Permissive),
            ],
        );
    }

    #[test]
    fn policy_in_other_namespace_does_not_apply() {
        let selected =
            json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"}});
        check(
            &[
                pa("other", "default", strict()),
                pa("other", "web", selected),
            ],
            &[
                ("shop", &[("app", "web")], 80, Permissive),
                ("other", &[], 80, Strict),
            ],
        );
    }

    #[test]
    fn v1beta1_is_accepted() {
        let mut policy = pa("shop", "default", strict());
        policy["apiVersion"] = "security.istio.io/v1beta1".into();
        check(&[policy], &[("shop", &[], 80, Strict)]);
    }

    #[test]
    fn invalid_mode_fails_closed_for_selected_workloads() {
        let bad = json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "strict"}});
        let (set, errors) = PeerAuthentications::parse(&[
            pa(ROOT, "default", permissive()),
            pa(
                "shop",
                "web-permissive",
                json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "PERMISSIVE"}}),
            ),
            pa("shop", "web", bad),
        ]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].fails_closed());
        let cases: [(&str, Labels<'_>, MtlsMode); 4] = [
            // Selected: STRICT although a valid policy says PERMISSIVE.
            ("shop", &[("app", "web")], Strict),
            ("shop", &[("app", "web"), ("v", "1")], Strict),
            ("shop", &[("app", "db")], Permissive),
            ("other", &[("app", "web")], Permissive),
        ];
        for (ns, labels, want) in cases {
            assert_eq!(
                set.mode(&workload(ns, labels), 8080, ROOT),
                want,
                "{ns} {labels:?}"
            );
        }
    }

    #[test]
    fn invalid_policy_without_readable_selector_fails_closed_for_its_namespace() {
        let cases = [
            json!({"mtls": {"mode": "MUTUAL"}}),
            json!({"selector": {"matchLabels": {"app": 1}}, "mtls": {"mode": "PERMISSIVE"}}),
            json!({"selector": "app=web"}),
            json!("STRICT"),
        ];
        for spec in cases {
            let (set, errors) = PeerAuthentications::parse(&[
                pa("shop", "bad", spec.clone()),
                pa("shop", "default", permissive()),
            ]);
            assert_eq!(errors.len(), 1, "{spec}: {errors:?}");
            assert_eq!(
                set.mode(&workload("shop", &[("app", "db")]), 80, ROOT),
                Strict,
                "{spec}"
            );
            assert_eq!(
                set.mode(&workload("other", &[]), 80, ROOT),
                Permissive,
                "{spec}"
            );
        }
    }

    #[test]
    fn invalid_root_namespace_policy_fails_closed_for_every_namespace() {
        let (set, errors) = PeerAuthentications::parse(&[
            pa(ROOT, "default", json!({"mtls": {"mode": 3}})),
            pa("legacy", "default", permissive()),
        ]);
        assert_eq!(errors.len(), 1);
        for ns in ["legacy", "shop", ROOT] {
            assert_eq!(set.mode(&workload(ns, &[]), 80, ROOT), Strict, "{ns}");
        }
        // A broken selector policy in the root namespace could select nothing (Istio ignores it).
        let bad = json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "NOPE"}});
        let (set, errors) = PeerAuthentications::parse(&[pa(ROOT, "web", bad)]);
        assert_eq!(errors.len(), 1);
        assert_eq!(
            set.mode(&workload("shop", &[("app", "web")]), 80, ROOT),
            Permissive
        );
    }

    #[test]
    fn invalid_policy_without_namespace_fails_closed_everywhere() {
        let mut policy = pa("shop", "default", permissive());
        policy["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("namespace");
        let (set, errors) = PeerAuthentications::parse(&[policy]);
        assert_eq!(errors.len(), 1);
        assert_eq!(set.mode(&workload("anything", &[]), 80, ROOT), Strict);
    }

    #[test]
    fn errors_name_the_policy_and_the_field() {
        let mut wrong_api = pa("shop", "p", strict());
        wrong_api["apiVersion"] = "security.istio.io/v1alpha1".into();
        let mut wrong_kind = pa("shop", "p", strict());
        wrong_kind["kind"] = "AuthorizationPolicy".into();
        let mut no_name = pa("shop", "p", strict());
        no_name["metadata"]["name"] = Value::Null;
        let cases = [
            (
                pa("shop", "p", json!({"mtls": {"mode": "Strict"}})),
                "shop/p",
                "spec.mtls.mode",
                "unknown mode \"Strict\"",
            ),
            (
                pa("shop", "p", json!({"mtls": {"mode": true}})),
                "shop/p",
                "spec.mtls.mode",
                "expected a string",
            ),
            (
                pa("shop", "p", json!({"mtls": {"mdoe": "STRICT"}})),
                "shop/p",
                "spec.mtls.mdoe",
                "unknown field",
            ),
            (
                pa("shop", "p", json!({"mtl": {"mode": "STRICT"}})),
                "shop/p",
                "spec.mtl",
                "unknown field",
            ),
            (
                pa("shop", "p", json!({"mtls": "STRICT"})),
                "shop/p",
                "spec.mtls",
                "expected an object",
            ),
            (
                pa(
                    "shop",
                    "p",
                    json!({"selector": {"matchLabels": {"app": 1}}}),
                ),
                "shop/p",
                "spec.selector.matchLabels.app",
                "expected a string",
            ),
            (
                pa("shop", "p", json!({"selector": {"labels": {"app": "web"}}})),
                "shop/p",
                "spec.selector.labels",
                "unknown field",
            ),
            (
                pa(
                    "shop",
                    "p",
                    json!({"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {"0": {"mode": "STRICT"}}}),
                ),
                "shop/p",
                "spec.portLevelMtls.0",
                "not a port number",
            ),
            (
                pa(
                    "shop",
                    "p",
                    json!({"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {"http": {"mode": "STRICT"}}}),
                ),
                "shop/p",
                "spec.portLevelMtls.http",
                "not a port number",
            ),
            (
                pa(
                    "shop",
                    "p",
                    json!({"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {"70000": {"mode": "STRICT"}}}),
                ),
                "shop/p",
                "spec.portLevelMtls.70000",
                "not a port number",
            ),
            (
                pa(
                    "shop",
                    "p",
                    json!({"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {"80": null}}),
                ),
                "shop/p",
                "spec.portLevelMtls.80",
                "cannot be null",
            ),
            (
                pa(
                    "shop",
                    "p",
                    json!({"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {"80": {"mode": "OFF"}}}),
                ),
                "shop/p",
                "spec.portLevelMtls.80.mode",
                "unknown mode \"OFF\"",
            ),
            (
                created(pa("shop", "p", strict()), "yesterday"),
                "shop/p",
                "metadata.creationTimestamp",
                "not an RFC 3339 time",
            ),
            (wrong_api, "shop/p", "apiVersion", "v1alpha1"),
            (wrong_kind, "shop/p", "kind", "AuthorizationPolicy"),
            (
                no_name,
                "shop/<no name> (item 0)",
                "metadata.name",
                "missing",
            ),
        ];
        for (object, policy, field, reason) in cases {
            let (_, errors) = PeerAuthentications::parse(&[object]);
            let [
                PeerAuthError::Invalid {
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

    #[test]
    fn config_file_yaml_with_numeric_port_keys_is_read() {
        let text = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: PERMISSIVE}
";
        let objects = crate::config::file::load_str(text, "config.yaml").unwrap();
        check(
            &objects.peer_authentications,
            &[
                ("shop", &[("app", "web")], 8080, Permissive),
                ("shop", &[("app", "web")], 80, Strict),
            ],
        );
    }

    #[test]
    fn mode_serializes_as_istio_spells_it() {
        assert_eq!(serde_json::to_value(Strict).unwrap(), "STRICT");
        assert_eq!(serde_json::to_value(Permissive).unwrap(), "PERMISSIVE");
    }
}
