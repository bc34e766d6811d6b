//! The agent's configuration model: the Kubernetes objects it consumes ([`Objects`]), the
//! static [`Settings`], and the sources that turn objects into a [`MeshState`](crate::state::MeshState).
//!
//! # Pipeline
//!
//! ```text
//! YAML file ──file::load_str──▶ Objects ──translate::translate──▶ MeshState
//! (kube API, later) ─────────▶ Objects ─┘
//! ```
//!
//! Both sources produce the same typed [`Objects`] and share one pure translation, so the
//! state (and its `/config_dump` JSON) is identical whichever source fed it.
//!
//! # API
//!
//! - [`file::load_str`]`(text, origin) -> Result<Objects, ConfigError>`: parse and validate a
//!   multi-document YAML (`kubectl get -o yaml` output, `---`-separated, `kind: List` flattened).
//! - [`file::load_state`]`(text, origin, node) -> Result<MeshState, ConfigError>`: the above,
//!   then [`translate::translate`] with the file-mode rules ([`translate::NetnsSource::Annotation`]).
//! - [`translate::translate`]`(objects, node, netns) -> Result<MeshState, ConfigError>`.
//! - [`file::FileSource`]: the watched file. Typical use from `main`:
//!
//! ```no_run
//! # async fn f() -> Result<(), mesh_agent::config::ConfigError> {
//! use mesh_agent::config::{Settings, file::FileSource};
//! let rx = FileSource::new("/etc/mesh/config.yaml", "node-a", Settings::default())
//!     .start()
//!     .await?; // a broken or missing file is an error here: refuse to start
//! let state = rx.borrow().clone(); // Arc<MeshState>, replaced on every good change
//! # Ok(()) }
//! ```
//!
//!   `start` loads the file once (returning any error), then spawns a task that polls the file's
//!   metadata (device, inode, length, mtime, ctime) every [`file::DEFAULT_POLL_INTERVAL`], so an
//!   editor that replaces the file by rename is seen too. A changed file is re-read, parsed and
//!   translated: at once when it was replaced by rename, once it stayed unchanged for
//!   [`file::DEFAULT_SETTLE`] when it was rewritten in place (it passes through partial
//!   versions); a good one is published (only if the state differs), a
//!   broken one is logged with `tracing::error!` and the previous state is kept. A file with no
//!   object at all is refused ([`ConfigError::Empty`]) unless it is an explicit empty `List`.
//!   The task ends when every receiver is dropped.
//!
//! Errors are one [`ConfigError`]; file errors name the file, the 1-based document (and list
//! item), the object and the field, e.g.
//! `config.yaml: document 3 (Pod default/web-1): spec.containers: invalid type: ...`.

use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub use self::endpoint_slice::EndpointSlice;
pub use self::pod::Pod;

pub mod endpoint_slice;
pub mod file;
pub mod kube;
pub mod pod;
pub mod service_entry;
pub mod sync;
pub mod translate;

/// What the agent keeps of an object's metadata besides its labels: its identity (name,
/// namespace, uid, resourceVersion) and whether it is being deleted. Managed fields, owner
/// references, annotations (often kubectl's copy of the whole object) are dropped as the
/// slim kinds ([`Pod`], [`EndpointSlice`]) are read.
fn identity(meta: ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        deletion_timestamp: meta.deletion_timestamp,
        ..ObjectMeta::default()
    }
}

/// Annotation naming a file-mode pod's network namespace (`/run/netns/NAME`).
pub const NETNS_ANNOTATION: &str = "mesh-agent.io/netns";
/// Istio's ambient opt-in label, on namespaces and pods.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Value of [`DATAPLANE_MODE_LABEL`] that enrolls a namespace or pod.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// Value of [`DATAPLANE_MODE_LABEL`] on a pod that opts it out of an ambient namespace.
pub const DATAPLANE_MODE_NONE: &str = "none";
/// Annotation set on pods that carry an Istio sidecar; such pods are never captured.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// Istio's pod annotation turning the capture of a pod's DNS on (`"true"`) or off
/// (`"false"`) whatever the agent's default (`--dns-capture`).
pub const DNS_CAPTURE_ANNOTATION: &str = "ambient.istio.io/dns-capture";

/// Static settings of the agent, fixed for the life of the process.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Settings {
    /// SPIFFE trust domain of workload identities.
    pub trust_domain: String,
    /// Namespace whose policies apply mesh-wide.
    pub root_namespace: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".to_owned(),
            root_namespace: "istio-system".to_owned(),
        }
    }
}

/// The Kubernetes objects the agent consumes, as read from a source (in source order).
///
/// Typed objects are shared (`Arc`): the kube source's stores already hold them so, and a
/// snapshot of a large cluster, taken at every change, then copies pointers rather than the
/// objects; the state keeps the EndpointSlices it indexes the same way. Kinds that later
/// features interpret are kept raw (`serde_json::Value`) so that they can be typed when
/// needed without changing the sources.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Objects {
    pub namespaces: Vec<Arc<Namespace>>,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<Service>>,
    /// `discovery.k8s.io/v1` EndpointSlice.
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// `security.istio.io/v1` AuthorizationPolicy.
    pub authorization_policies: Vec<serde_json::Value>,
    /// `security.istio.io/v1` PeerAuthentication.
    pub peer_authentications: Vec<serde_json::Value>,
    /// `gateway.networking.k8s.io/v1` Gateway (waypoints: class `istio-waypoint`).
    pub gateways: Vec<serde_json::Value>,
    /// `gateway.networking.k8s.io/v1` HTTPRoute.
    pub http_routes: Vec<serde_json::Value>,
    /// `gateway.networking.k8s.io/v1` GRPCRoute.
    pub grpc_routes: Vec<serde_json::Value>,
    /// `networking.istio.io/v1` VirtualService.
    pub virtual_services: Vec<serde_json::Value>,
    /// `networking.istio.io/v1` DestinationRule.
    pub destination_rules: Vec<serde_json::Value>,
    /// `networking.istio.io/v1` Gateway (ingress gateways).
    pub istio_gateways: Vec<serde_json::Value>,
    /// `networking.istio.io/v1` ServiceEntry.
    pub service_entries: Vec<serde_json::Value>,
    /// `v1` Secret of type `kubernetes.io/tls` (ingress gateways' certificates; file mode).
    pub secrets: Vec<Arc<k8s_openapi::api::core::v1::Secret>>,
}

impl Objects {
    /// No object of any kind.
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.pods.is_empty()
            && self.services.is_empty()
            && self.endpoint_slices.is_empty()
            && self.authorization_policies.is_empty()
            && self.peer_authentications.is_empty()
            && self.gateways.is_empty()
            && self.http_routes.is_empty()
            && self.grpc_routes.is_empty()
            && self.virtual_services.is_empty()
            && self.destination_rules.is_empty()
            && self.istio_gateways.is_empty()
            && self.service_entries.is_empty()
            && self.secrets.is_empty()
    }

    /// Adds every object of `other`.
    pub fn append(&mut self, mut other: Objects) {
        self.namespaces.append(&mut other.namespaces);
        self.pods.append(&mut other.pods);
        self.services.append(&mut other.services);
        self.endpoint_slices.append(&mut other.endpoint_slices);
        self.authorization_policies
            .append(&mut other.authorization_policies);
        self.peer_authentications
            .append(&mut other.peer_authentications);
        self.gateways.append(&mut other.gateways);
        self.http_routes.append(&mut other.http_routes);
        self.grpc_routes.append(&mut other.grpc_routes);
        self.virtual_services.append(&mut other.virtual_services);
        self.destination_rules.append(&mut other.destination_rules);
        self.istio_gateways.append(&mut other.istio_gateways);
        self.service_entries.append(&mut other.service_entries);
        self.secrets.append(&mut other.secrets);
    }

    /// Removes the object `key`; whether it was there.
    pub fn remove(&mut self, key: &ObjectKey) -> bool {
        let objects = self;
        fn matches(meta: &ObjectMeta, key: &ObjectKey) -> bool {
            let namespace = key
                .kind
                .is_namespaced()
                .then(|| meta.namespace.as_deref().unwrap_or("default"));
            meta.name.as_deref() == Some(key.name.as_str()) && namespace == key.namespace.as_deref()
        }
        fn raw_matches(v: &serde_json::Value, key: &ObjectKey) -> bool {
            let meta = &v["metadata"];
            meta["name"].as_str() == Some(key.name.as_str())
                && meta["namespace"].as_str() == key.namespace.as_deref()
        }
        fn retain<T>(list: &mut Vec<T>, keep: impl Fn(&T) -> bool) -> bool {
            let before = list.len();
            list.retain(keep);
            list.len() != before
        }
        match key.kind {
            Kind::Namespace => retain(&mut objects.namespaces, |o| !matches(&o.metadata, key)),
            Kind::Pod => retain(&mut objects.pods, |o| !matches(&o.metadata, key)),
            Kind::Service => retain(&mut objects.services, |o| !matches(&o.metadata, key)),
            Kind::EndpointSlice => {
                retain(&mut objects.endpoint_slices, |o| !matches(&o.metadata, key))
            }
            Kind::AuthorizationPolicy => retain(&mut objects.authorization_policies, |o| {
                !raw_matches(o, key)
            }),
            Kind::PeerAuthentication => {
                retain(&mut objects.peer_authentications, |o| !raw_matches(o, key))
            }
            Kind::Gateway => retain(&mut objects.gateways, |o| !raw_matches(o, key)),
            Kind::HttpRoute => retain(&mut objects.http_routes, |o| !raw_matches(o, key)),
            Kind::GrpcRoute => retain(&mut objects.grpc_routes, |o| !raw_matches(o, key)),
            Kind::VirtualService => retain(&mut objects.virtual_services, |o| !raw_matches(o, key)),
            Kind::DestinationRule => {
                retain(&mut objects.destination_rules, |o| !raw_matches(o, key))
            }
            Kind::IstioGateway => retain(&mut objects.istio_gateways, |o| !raw_matches(o, key)),
            Kind::ServiceEntry => retain(&mut objects.service_entries, |o| !raw_matches(o, key)),
            Kind::Secret => retain(&mut objects.secrets, |o| !matches(&o.metadata, key)),
        }
    }
}

/// The kinds of object a source may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    AuthorizationPolicy,
    PeerAuthentication,
    Gateway,
    HttpRoute,
    GrpcRoute,
    VirtualService,
    DestinationRule,
    /// Istio's `Gateway` (networking.istio.io), not the Gateway API's.
    IstioGateway,
    ServiceEntry,
    /// A `kubernetes.io/tls` Secret.
    Secret,
}

impl Kind {
    /// The kind's name as written in `kind:`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::Gateway => "Gateway",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::IstioGateway => "Gateway",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::Secret => "Secret",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn is_namespaced(self) -> bool {
        self != Kind::Namespace
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of one object: kind, namespace (for namespaced kinds) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    /// `Pod default/web-1`, `Namespace default`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// Where in a file an object was found: `document 3 item 2 (Pod default/web-1)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocRef {
    /// 1-based index of the YAML document in the file.
    pub document: usize,
    /// 1-based index in the `items` of a `kind: List` document.
    pub item: Option<usize>,
    /// `Kind namespace/name`, as much of it as is known.
    pub object: Option<String>,
}

impl fmt::Display for DocRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
        if let Some(item) = self.item {
            write!(f, " item {item}")?;
        }
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        Ok(())
    }
}

/// Errors of the configuration sources and of the translation.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be inspected or read.
    #[error("{origin}: cannot read: {source}")]
    Read {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    /// One document (or list item) of a file is malformed or invalid; the message starts with
    /// the field where one is known.
    #[error("{origin}: {at}: {message}")]
    Document {
        origin: String,
        at: DocRef,
        message: String,
    },
    /// The file holds no object and does not say so on purpose (an empty List): taken for a
    /// partly written file, never applied.
    #[error(
        "{origin}: no objects: an empty, comment-only or `---`-only file is taken for one being \
         written and is not applied; to run with no objects, write an empty List \
         (`apiVersion: v1`, `kind: List`, `items: []`)"
    )]
    Empty { origin: String },
    /// An object is invalid or cannot be used (translation, any source).
    #[error("{object}: {message}")]
    Object { object: ObjectKey, message: String },
}

/// A field of one object that failed validation; wrapped into a [`ConfigError`] with the object
/// (and in file mode its document) by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_default_to_istio_defaults() {
        let s = Settings::default();
        assert_eq!(s.trust_domain, "cluster.local");
        assert_eq!(s.root_namespace, "istio-system");
    }

    #[test]
    fn document_error_names_file_document_object_and_field() {
        let e = ConfigError::Document {
            origin: "config.yaml".into(),
            at: DocRef {
                document: 3,
                item: None,
                object: Some("Pod default/web-1".into()),
            },
            message: FieldError::new("spec.containers", "invalid type").to_string(),
        };
        assert_eq!(
            e.to_string(),
            "config.yaml: document 3 (Pod default/web-1): spec.containers: invalid type"
        );
    }

    #[test]
    fn object_key_display_omits_namespace_for_cluster_scoped_kinds() {
        let ns = ObjectKey {
            kind: Kind::Namespace,
            namespace: None,
            name: "default".into(),
        };
        let pod = ObjectKey {
            kind: Kind::Pod,
            namespace: Some("default".into()),
            name: "web-1".into(),
        };
        assert_eq!(ns.to_string(), "Namespace default");
        assert_eq!(pod.to_string(), "Pod default/web-1");
    }
}
