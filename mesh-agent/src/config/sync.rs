//! What a configuration source last applied, so that `mesh-agent status` can tell a proxy
//! whose view lags from one that is current (istioctl proxy-status's SYNCED / STALE).
//!
//! There is no control plane that knows what each proxy acknowledged: every proxy reads the
//! objects itself. So each one publishes a [`ViewDigest`] of the objects it last applied,
//! per kind, and `status` computes the same digest from its own read of the same source
//! (the same files, or the API server) with the same code. A kind whose digests differ is
//! one the proxy has not caught up with — or has refused: the source then keeps its last
//! good state, and [`SyncStatus`] records the refusal beside the old digest.
//!
//! An object counts by its `metadata.resourceVersion` when it has one (the API server's
//! objects: cheap, and exactly "has this proxy seen this version"); otherwise (files) by a
//! SHA-256 of its JSON, so a file edited in place changes the digest.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::Objects;

/// Per kind, the first 16 hex digits of a SHA-256 over the kind's objects, sorted by
/// namespace and name. A kind with no object is absent.
pub type ViewDigest = BTreeMap<String, String>;

/// The digest of what `objects` holds; see the module docs.
pub fn digest(objects: &Objects) -> ViewDigest {
    fn typed<K: Serialize>(
        out: &mut ViewDigest,
        kind: &str,
        list: &[K],
        meta: impl Fn(&K) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) {
        let entries = list.iter().map(|o| {
            let m = meta(o);
            let version = match &m.resource_version {
                Some(rv) => format!("rv:{rv}"),
                None => content_hash(o),
            };
            (
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default(),
                version,
            )
        });
        insert(out, kind, entries);
    }
    fn raw(out: &mut ViewDigest, kind: &str, list: &[serde_json::Value]) {
        let entries = list.iter().map(|o| {
            let m = &o["metadata"];
            let version = match m["resourceVersion"].as_str() {
                Some(rv) => format!("rv:{rv}"),
                None => content_hash(o),
            };
            let field = |f: &str| m[f].as_str().unwrap_or_default().to_owned();
            (field("namespace"), field("name"), version)
        });
        insert(out, kind, entries);
    }
    let mut out = ViewDigest::new();
    typed(&mut out, "Namespace", &objects.namespaces, |o| &o.metadata);
    typed(&mut out, "Pod", &objects.pods, |o| &o.metadata);
    typed(&mut out, "Service", &objects.services, |o| &o.metadata);
    typed(&mut out, "EndpointSlice", &objects.endpoint_slices, |o| {
        &o.metadata
    });
    typed(&mut out, "Secret", &objects.secrets, |o| &o.metadata);
    for (kind, list) in [
        ("AuthorizationPolicy", &objects.authorization_policies),
        ("PeerAuthentication", &objects.peer_authentications),
        ("Gateway", &objects.gateways),
        ("HTTPRoute", &objects.http_routes),
        ("GRPCRoute", &objects.grpc_routes),
        ("VirtualService", &objects.virtual_services),
        ("DestinationRule", &objects.destination_rules),
        ("Gateway.networking.istio.io", &objects.istio_gateways),
        ("ServiceEntry", &objects.service_entries),
    ] {
        raw(&mut out, kind, list);
    }
    out
}

fn content_hash(object: &impl Serialize) -> String {
    let json = serde_json::to_vec(object).unwrap_or_default();
    hex(ring::digest::digest(&ring::digest::SHA256, &json).as_ref())
}

fn insert(
    out: &mut ViewDigest,
    kind: &str,
    entries: impl Iterator<Item = (String, String, String)>,
) {
    let mut entries: Vec<_> = entries.collect();
    if entries.is_empty() {
        return;
    }
    entries.sort();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (namespace, name, version) in &entries {
        // Separators no Kubernetes name contains.
        for part in [namespace, name, version] {
            ctx.update(part.as_bytes());
            ctx.update(b"\n");
        }
    }
    let mut digest = hex(ctx.finish().as_ref());
    digest.truncate(16);
    out.insert(kind.to_owned(), digest);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Seconds since the Unix epoch.
pub fn epoch_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What a source applied last, and what it last refused (the `config` part of a proxy's
/// `/status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRecord {
    /// The digest of the objects of the state the proxy runs.
    pub digest: ViewDigest,
    /// When that state was applied (seconds since the Unix epoch).
    pub applied_at: u64,
    /// Objects left out of it because the translation refused them (Kubernetes mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<String>,
    /// The last read that was refused after the applied one, with when: the proxy keeps its
    /// previous state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_at: Option<u64>,
}

/// Shared between a source (which records) and the admin endpoint (which reports).
#[derive(Debug, Default)]
pub struct SyncStatus(Mutex<SyncRecord>);

impl SyncStatus {
    /// A state built from objects with `digest` was applied (whether or not it differed from
    /// the previous one: the view is current either way).
    pub fn applied(&self, digest: ViewDigest, rejected: Vec<String>) {
        *self.lock() = SyncRecord {
            digest,
            applied_at: epoch_seconds(SystemTime::now()),
            rejected,
            error: None,
            error_at: None,
        };
    }

    /// A read was refused; the applied state stays.
    pub fn refused(&self, error: &impl std::fmt::Display) {
        let mut record = self.lock();
        record.error = Some(error.to_string());
        record.error_at = Some(epoch_seconds(SystemTime::now()));
    }

    pub fn snapshot(&self) -> SyncRecord {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SyncRecord> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::load_str;

    const TWO_PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: shop}
spec: {nodeName: n1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: shop}
spec: {nodeName: n2}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec: {}
"#;

    #[test]
    fn digest_is_per_kind_and_independent_of_order() {
        let objects = load_str(TWO_PODS, "t.yaml").unwrap();
        let d = digest(&objects);
        assert_eq!(d.keys().collect::<Vec<_>>(), ["AuthorizationPolicy", "Pod"]);
        let mut reversed = objects.clone();
        reversed.pods.reverse();
        assert_eq!(digest(&reversed), d);
    }

    #[test]
    fn a_changed_object_changes_its_kind_only() {
        let before = digest(&load_str(TWO_PODS, "t.yaml").unwrap());
        let after =
            digest(&load_str(&TWO_PODS.replace("nodeName: n2", "nodeName: n3"), "t.yaml").unwrap());
        assert_ne!(before["Pod"], after["Pod"]);
        assert_eq!(before["AuthorizationPolicy"], after["AuthorizationPolicy"]);
    }

    #[test]
    fn a_resource_version_stands_for_the_content() {
        let with_rv = |rv: &str, node: &str| {
            let text = TWO_PODS
                .replace(
                    "{name: a, namespace: shop}",
                    &format!("{{name: a, namespace: shop, resourceVersion: \"{rv}\"}}"),
                )
                .replace("nodeName: n1", &format!("nodeName: {node}"));
            digest(&load_str(&text, "t.yaml").unwrap())["Pod"].clone()
        };
        assert_eq!(with_rv("7", "n1"), with_rv("7", "n9"));
        assert_ne!(with_rv("7", "n1"), with_rv("8", "n1"));
    }

    #[test]
    fn a_refusal_keeps_the_applied_digest() {
        let status = SyncStatus::default();
        let d = digest(&load_str(TWO_PODS, "t.yaml").unwrap());
        status.applied(d.clone(), Vec::new());
        status.refused(&"t.yaml: document 2: bad");
        let record = status.snapshot();
        assert_eq!(record.digest, d);
        assert_eq!(record.error.as_deref(), Some("t.yaml: document 2: bad"));
        status.applied(d, Vec::new());
        assert_eq!(status.snapshot().error, None);
    }
}
