//! The Kubernetes configuration source: watches Namespaces, Pods, Services, EndpointSlices and
//! Istio's AuthorizationPolicy / PeerAuthentication through the API server (kube-rs watchers
//! and reflector stores) and feeds them to the same [`translate`] as the file source.
//!
//! # API
//!
//! - [`client_from`]`(kubeconfig).await -> Result<kube::Client, ClientError>`: a client from
//!   the given kubeconfig file; with `None`, the in-cluster service account when
//!   `KUBERNETES_SERVICE_HOST` is set, else `$KUBECONFIG` / `~/.kube/config`.
//! - [`KubeSource::new`]`(client, node, settings).start().await ->
//!   Result<watch::Receiver<Arc<MeshState>>, ConfigError>`: the same contract as
//!   [`FileSource::start`](super::file::FileSource::start), so the agent wires either one. The
//!   lead's one-line change in `agent.rs`:
//!
//! ```no_run
//! # async fn f(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<()> {
//! use mesh_agent::config::{Settings, kube::{KubeSource, client_from}};
//! let client = client_from(kubeconfig).await?; // --kubeconfig PATH, or in-cluster
//! let rx = KubeSource::new(client.clone(), "node-a", Settings::default())
//!     .start()
//!     .await?; // returns once the initial lists completed: readiness may follow it
//! let state = rx.borrow().clone(); // Arc<MeshState>, replaced on every change
//! # Ok(()) }
//! ```
//!
//! - [`annotate_pod`]`(&client, namespace, name, enabled)`: sets (or removes, with a JSON merge
//!   patch that sets it to `null`) the pod annotation `ambient.istio.io/redirection: enabled`,
//!   as istio-cni does when it captures a pod. Call it from enrollment after capture / release.
//!
//! # Behaviour
//!
//! One `kube::runtime::watcher` per kind (list, then watch from the list's resourceVersion,
//! with bookmarks), feeding a reflector [`Store`]. The watcher handles closed streams
//! (re-watch from the last resourceVersion), `410 Gone` (re-list at once: every restarted API
//! server answers it) and API server outages (retry after a jittered backoff capped at 4 s, so
//! a change made right after an outage applies within seconds); a re-list replaces a store's
//! contents atomically when it completes, so while disconnected or re-listing the stores, and
//! the published state, keep their last contents.
//!
//! - Pods are all watched (the address → identity index needs every pod, not only this node's)
//!   and read as [`Pod`], which keeps only what the agent reads (EndpointSlices likewise);
//!   `managedFields` are dropped from every other object, and from Namespaces, Services and
//!   Secrets kubectl's last-applied copy of the object too ([`strip_bulk`]).
//! - The Istio kinds are watched as [`DynamicObject`]s and converted to JSON in the shape the
//!   file source keeps (`apiVersion`, `kind`, `metadata`, `spec`...). A kind whose CRD is not
//!   installed (404 on list) is logged once and treated as empty; if the CRD appears later its
//!   objects are picked up on the next retry.
//! - [`KubeSource::start`] returns once the initial list of every kind completed (for the Istio
//!   kinds: completed or found absent — waiting for them too means the first state never
//!   lacks a DENY policy that exists), or fails after [`DEFAULT_INITIAL_SYNC_TIMEOUT`] with
//!   the kinds still pending and their last error.
//! - Every change (debounced by [`DEFAULT_DEBOUNCE`]: a burst of events gives one rebuild)
//!   rebuilds [`Objects`] from the stores and runs [`translate`] with
//!   [`NetnsSource::Discovered`] (pod network namespaces are found from /proc, the netns
//!   annotation is optional). The state is published only when it differs.
//! - Secrets are watched only when asked ([`KubeSource::with_secrets_in`]: an ingress
//!   gateway's namespace, for its certificates), and only in that namespace; a Secret of
//!   another type than `kubernetes.io/tls` keeps its name only ([`trim_secret`]).
//! - An object the translation rejects (e.g. an unparsable pod IP) is logged and left out,
//!   instead of blocking every other update as a broken file does; the log names the object.
//! - The background tasks end when every receiver of the state is dropped.
//!
//! With the same objects, the file and kube sources produce identical states (the integration
//! test `tests/tests/kube_source.rs` asserts it on their JSON): objects read from a file made of
//! `kubectl get -o yaml` output (which leaves out `managedFields`) are those the watchers hold.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Debug};
use std::hash::Hash;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::EndpointSlice;
use ::kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use ::kube::config::{
    InClusterError, InferConfigError, KubeConfigOptions, Kubeconfig, KubeconfigError,
};
use ::kube::runtime::reflector::{Store, store::Writer};
use ::kube::runtime::{WatchStreamExt, watcher};
use ::kube::{Client, Resource};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Pod;
use super::sync::SyncStatus;
use super::translate::{self, NetnsSource};
use super::{ConfigError, Kind, ObjectKey, Objects, Settings};
use crate::state::MeshState;

/// How long [`KubeSource::start`] waits for the initial lists.
pub const DEFAULT_INITIAL_SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a change waits for more changes before the state is rebuilt.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);
/// The pod annotation istio-cni sets on a captured pod.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// Value of [`REDIRECTION_ANNOTATION`] on a captured pod.
pub const REDIRECTION_ENABLED: &str = "enabled";
/// Annotation `kubectl apply` keeps a copy of the object in; dropped from pods.
const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// API group of Istio's security kinds.
pub const ISTIO_SECURITY_GROUP: &str = "security.istio.io";
/// The version of [`ISTIO_SECURITY_GROUP`] the source watches.
pub const ISTIO_SECURITY_VERSION: &str = "v1";

/// Errors building a Kubernetes client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    #[error("in-cluster configuration (KUBERNETES_SERVICE_HOST is set): {0}")]
    InCluster(#[source] InClusterError),
    #[error("no Kubernetes configuration found (neither a kubeconfig nor in-cluster): {0}")]
    Infer(#[source] InferConfigError),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] ::kube::Error),
}

/// A Kubernetes client: from the kubeconfig file `kubeconfig` (its current context) if given;
/// else from the pod's service account when `KUBERNETES_SERVICE_HOST` is set (in-cluster);
/// else from `$KUBECONFIG` or `~/.kube/config`. Must be called within a Tokio runtime.
pub async fn client_from(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let error = |source| ClientError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(error)?;
            ::kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(error)?
        }
        None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
            ::kube::Config::incluster().map_err(ClientError::InCluster)?
        }
        None => ::kube::Config::infer().await.map_err(ClientError::Infer)?,
    };
    Client::try_from(config).map_err(ClientError::Client)
}

/// Sets (`enabled`) or removes the annotation `ambient.istio.io/redirection: enabled` on a pod
/// with a JSON merge patch (removal sets it to `null`, which also succeeds when it is absent).
pub async fn annotate_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    enabled: bool,
) -> Result<(), ::kube::Error> {
    let value = if enabled {
        serde_json::Value::from(REDIRECTION_ENABLED)
    } else {
        serde_json::Value::Null
    };
    let patch =
        serde_json::json!({ "metadata": { "annotations": { REDIRECTION_ANNOTATION: value } } });
    Api::<Pod>::namespaced(client.clone(), namespace)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// The `ApiResource` of an Istio security kind (`security.istio.io/v1`).
pub fn istio_security_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: ISTIO_SECURITY_GROUP.to_owned(),
        version: ISTIO_SECURITY_VERSION.to_owned(),
        api_version: format!("{ISTIO_SECURITY_GROUP}/{ISTIO_SECURITY_VERSION}"),
        kind: kind.to_owned(),
        plural: plural.to_owned(),
    }
}

fn authorization_policy_resource() -> ApiResource {
    istio_security_resource("AuthorizationPolicy", "authorizationpolicies")
}

fn peer_authentication_resource() -> ApiResource {
    istio_security_resource("PeerAuthentication", "peerauthentications")
}

/// A custom resource of `group/version`.
fn custom_resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.to_owned(),
        version: version.to_owned(),
        api_version: format!("{group}/{version}"),
        kind: kind.to_owned(),
        plural: plural.to_owned(),
    }
}

/// The routing kinds: Gateway API (standard channel) and Istio networking.
fn routing_resources() -> [(Kind, ApiResource); 7] {
    const GATEWAY: &str = "gateway.networking.k8s.io";
    const NETWORKING: &str = "networking.istio.io";
    [
        (
            Kind::Gateway,
            custom_resource(GATEWAY, "v1", "Gateway", "gateways"),
        ),
        (
            Kind::HttpRoute,
            custom_resource(GATEWAY, "v1", "HTTPRoute", "httproutes"),
        ),
        (
            Kind::GrpcRoute,
            custom_resource(GATEWAY, "v1", "GRPCRoute", "grpcroutes"),
        ),
        (
            Kind::VirtualService,
            custom_resource(NETWORKING, "v1", "VirtualService", "virtualservices"),
        ),
        (
            Kind::DestinationRule,
            custom_resource(NETWORKING, "v1", "DestinationRule", "destinationrules"),
        ),
        (
            Kind::IstioGateway,
            custom_resource(NETWORKING, "v1", "Gateway", "gateways"),
        ),
        (
            Kind::ServiceEntry,
            custom_resource(NETWORKING, "v1", "ServiceEntry", "serviceentries"),
        ),
    ]
}

/// The configuration read from the Kubernetes API server; see [`KubeSource::start`].
#[derive(Clone)]
pub struct KubeSource {
    client: Client,
    node: String,
    settings: Settings,
    initial_sync_timeout: Duration,
    debounce: Duration,
    /// The namespace whose Secrets are watched, if any.
    secrets_namespace: Option<String>,
    sync: Arc<SyncStatus>,
}

impl fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeSource")
            .field("node", &self.node)
            .field("settings", &self.settings)
            .field("initial_sync_timeout", &self.initial_sync_timeout)
            .field("debounce", &self.debounce)
            .field("secrets_namespace", &self.secrets_namespace)
            .finish_non_exhaustive()
    }
}

impl KubeSource {
    /// A source for the agent on `node`, reading through `client`.
    pub fn new(client: Client, node: &str, settings: Settings) -> Self {
        Self {
            client,
            node: node.to_owned(),
            settings,
            initial_sync_timeout: DEFAULT_INITIAL_SYNC_TIMEOUT,
            debounce: DEFAULT_DEBOUNCE,
            secrets_namespace: None,
            sync: Arc::default(),
        }
    }

    /// What the source applied last and refused since (for `/status`).
    pub fn sync(&self) -> Arc<SyncStatus> {
        self.sync.clone()
    }

    /// Also watches the Secrets of `namespace` (an ingress gateway's, where the
    /// `kubernetes.io/tls` Secrets its Gateways name live). Without it no Secret is read:
    /// node agents and waypoints have no use for them, and no right to.
    pub fn with_secrets_in(mut self, namespace: &str) -> Self {
        self.secrets_namespace = Some(namespace.to_owned());
        self
    }

    /// Changes how long [`KubeSource::start`] waits for the initial lists.
    pub fn with_initial_sync_timeout(mut self, timeout: Duration) -> Self {
        self.initial_sync_timeout = timeout;
        self
    }

    /// Changes how long a change waits for more before the state is rebuilt.
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Starts the watchers and waits until the initial list of every kind completed (the Istio
    /// kinds: or were found absent), then translates and returns the state. The error, after
    /// the initial-sync timeout, names the kinds still pending and their last error. Then a
    /// task rebuilds the state on every change (debounced) and publishes it if it differs; it
    /// and the watchers end when every receiver is dropped. Must be called within a Tokio
    /// runtime.
    pub async fn start(self) -> Result<watch::Receiver<Arc<MeshState>>, ConfigError> {
        let secrets = self.secrets_namespace.is_some().then_some(Kind::Secret);
        let progress = Arc::new(Progress::new(WATCHED.into_iter().chain(secrets)));
        let mut changes = progress.changed.subscribe();
        let (stores, watchers) = self.spawn_watchers(&progress);

        let deadline = tokio::time::Instant::now() + self.initial_sync_timeout;
        loop {
            changes.borrow_and_update();
            let pending = progress.pending();
            if pending.is_empty() {
                break;
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Err(self.timeout_error(&progress.pending()));
            }
        }

        let mut builder = Builder {
            node: self.node.clone(),
            settings: self.settings.clone(),
            rejected: BTreeSet::new(),
            sync: self.sync.clone(),
        };
        let state = builder.build(stores.objects())?;
        tracing::info!(
            workloads = state.workloads.len(),
            services = state.services.len(),
            "configuration listed from the Kubernetes API server"
        );
        state.log_problems();
        let (tx, rx) = watch::channel(Arc::new(state));
        tokio::spawn(rebuild_on_change(
            tx,
            changes,
            stores,
            builder,
            watchers,
            self.debounce,
        ));
        Ok(rx)
    }

    fn spawn_watchers(&self, progress: &Arc<Progress>) -> (Stores, AbortOnDrop) {
        let client = &self.client;
        let mut tasks = Vec::with_capacity(10);

        let (namespaces, task) = watch_kind(
            Api::<Namespace>::all(client.clone()),
            (),
            Kind::Namespace,
            false,
            progress,
            |ns: &mut Namespace| strip_bulk(&mut ns.metadata),
        );
        tasks.push(task);
        let (pods, task) = watch_kind(
            Api::<Pod>::all(client.clone()),
            (),
            Kind::Pod,
            false,
            progress,
            // `Pod` keeps nothing else as it is read.
            |_: &mut Pod| {},
        );
        tasks.push(task);
        let (services, task) = watch_kind(
            Api::<Service>::all(client.clone()),
            (),
            Kind::Service,
            false,
            progress,
            |svc: &mut Service| strip_bulk(&mut svc.metadata),
        );
        tasks.push(task);
        let (endpoint_slices, task) = watch_kind(
            Api::<EndpointSlice>::all(client.clone()),
            (),
            Kind::EndpointSlice,
            false,
            progress,
            // `EndpointSlice` keeps nothing else as it is read.
            |_: &mut EndpointSlice| {},
        );
        tasks.push(task);
        let authz = authorization_policy_resource();
        let (authorization_policies, task) = watch_kind(
            Api::<DynamicObject>::all_with(client.clone(), &authz),
            authz.clone(),
            Kind::AuthorizationPolicy,
            true,
            progress,
            strip_managed_fields,
        );
        tasks.push(task);
        let peer = peer_authentication_resource();
        let (peer_authentications, task) = watch_kind(
            Api::<DynamicObject>::all_with(client.clone(), &peer),
            peer.clone(),
            Kind::PeerAuthentication,
            true,
            progress,
            strip_managed_fields,
        );
        tasks.push(task);
        let routing = routing_resources().map(|(kind, resource)| {
            let (store, task) = watch_kind(
                Api::<DynamicObject>::all_with(client.clone(), &resource),
                resource.clone(),
                kind,
                true,
                progress,
                strip_managed_fields,
            );
            tasks.push(task);
            (store, resource)
        });
        let [
            gateways,
            http_routes,
            grpc_routes,
            virtual_services,
            destination_rules,
            istio_gateways,
            service_entries,
        ] = routing;
        let secrets = self.secrets_namespace.as_deref().map(|namespace| {
            let (store, task) = watch_kind(
                Api::<Secret>::namespaced(client.clone(), namespace),
                (),
                Kind::Secret,
                false,
                progress,
                trim_secret,
            );
            tasks.push(task);
            store
        });

        let stores = Stores {
            namespaces,
            pods,
            services,
            endpoint_slices,
            authorization_policies: (authorization_policies, authz),
            peer_authentications: (peer_authentications, peer),
            gateways,
            http_routes,
            grpc_routes,
            virtual_services,
            destination_rules,
            istio_gateways,
            service_entries,
            secrets,
        };
        (stores, AbortOnDrop(tasks))
    }

    fn timeout_error(&self, pending: &[(Kind, Option<String>)]) -> ConfigError {
        let kinds = pending
            .iter()
            .map(|(kind, error)| match error {
                Some(e) => format!("{kind} (last error: {e})"),
                None => format!("{kind} (no answer yet)"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        ConfigError::Read {
            origin: "Kubernetes API server".to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "initial lists not complete after {:?}: {kinds}",
                    self.initial_sync_timeout
                ),
            ),
        }
    }
}

/// Keeps of a Secret what the gateway reads: the data of a `kubernetes.io/tls` one; of any
/// other type only its name. Annotations go in every case: `kubectl apply` copies the whole
/// object, data included, into one.
pub fn trim_secret(secret: &mut Secret) {
    strip_bulk(&mut secret.metadata);
    secret.metadata.annotations = None;
    if secret.type_.as_deref() != Some(translate::TLS_SECRET_TYPE) {
        secret.data = None;
        secret.string_data = None;
    }
}

/// An Istio object keeps its annotations (its JSON is the state's, and `/config_dump`'s, as
/// the file source keeps it; few such objects exist); only its managed fields go.
fn strip_managed_fields(o: &mut DynamicObject) {
    o.metadata.managed_fields = None;
}

/// Drops the bulk of an object's metadata that the agent never reads: managed fields, and
/// the copy of the whole object `kubectl apply` keeps in an annotation.
pub fn strip_bulk(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.remove(LAST_APPLIED_ANNOTATION);
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
}

/// An Istio object as the file source keeps it: the object's JSON, with `apiVersion` and
/// `kind` filled in from `resource` when the server left them out (lists of built-in kinds do).
pub fn dynamic_to_json(
    object: &DynamicObject,
    resource: &ApiResource,
) -> Result<serde_json::Value, serde_json::Error> {
    let mut value = serde_json::to_value(object)?;
    if let Some(map) = value.as_object_mut() {
        map.entry("apiVersion")
            .or_insert_with(|| resource.api_version.clone().into());
        map.entry("kind")
            .or_insert_with(|| resource.kind.clone().into());
    }
    Ok(value)
}

/// Kills the watcher tasks when the source ends.
struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// What the watcher of one kind has achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listing {
    /// No initial list yet.
    Pending,
    /// An initial list completed (later re-lists do not change this).
    Listed,
    /// The API server does not serve the kind (404): an Istio CRD that is not installed.
    Absent,
}

#[derive(Debug)]
struct KindProgress {
    listing: Listing,
    last_error: Option<String>,
    absent_logged: bool,
}

/// The watchers' progress, shared with the source; every change of a store or of a kind's
/// progress bumps `changed`.
struct Progress {
    kinds: Mutex<BTreeMap<Kind, KindProgress>>,
    changed: watch::Sender<()>,
}

/// The kinds every source watches.
const WATCHED: [Kind; 13] = [
    Kind::Namespace,
    Kind::Pod,
    Kind::Service,
    Kind::EndpointSlice,
    Kind::AuthorizationPolicy,
    Kind::PeerAuthentication,
    Kind::Gateway,
    Kind::HttpRoute,
    Kind::GrpcRoute,
    Kind::VirtualService,
    Kind::DestinationRule,
    Kind::IstioGateway,
    Kind::ServiceEntry,
];

impl Progress {
    /// Nothing listed yet of `kinds`.
    fn new(kinds: impl IntoIterator<Item = Kind>) -> Self {
        let kinds = kinds
            .into_iter()
            .map(|kind| {
                let p = KindProgress {
                    listing: Listing::Pending,
                    last_error: None,
                    absent_logged: false,
                };
                (kind, p)
            })
            .collect();
        Self {
            kinds: Mutex::new(kinds),
            changed: watch::Sender::new(()),
        }
    }

    /// The kinds without an initial list yet, with their last error.
    fn pending(&self) -> Vec<(Kind, Option<String>)> {
        self.lock()
            .iter()
            .filter(|(_, p)| p.listing == Listing::Pending)
            .map(|(kind, p)| (*kind, p.last_error.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Kind, KindProgress>> {
        self.kinds.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn touch(&self) {
        self.changed.send_modify(|_| {});
    }

    /// Applies `f` to the progress of `kind`; notifies if `f` says the stores or the
    /// readiness changed.
    fn update(&self, kind: Kind, f: impl FnOnce(&mut KindProgress) -> bool) {
        let notify = self.lock().get_mut(&kind).is_some_and(f);
        if notify {
            self.touch();
        }
    }

    fn listed(&self, kind: Kind, objects: usize) {
        self.update(kind, |p| {
            match p.listing {
                Listing::Pending => tracing::info!(%kind, objects, "initial list complete"),
                Listing::Absent => tracing::info!(%kind, objects, "kind now served, listed"),
                Listing::Listed if p.last_error.is_some() => {
                    tracing::info!(%kind, objects, "re-listed after a watch error")
                }
                Listing::Listed => tracing::debug!(%kind, objects, "re-listed"),
            }
            p.listing = Listing::Listed;
            p.last_error = None;
            true // The store was (re)filled.
        });
    }

    fn absent(&self, kind: Kind) {
        self.update(kind, |p| {
            if !p.absent_logged {
                p.absent_logged = true;
                tracing::warn!(
                    %kind,
                    "the API server does not serve {kind} (CRD not installed?); running without them"
                );
            }
            p.last_error = None;
            // Retries keep failing with 404 every backoff period: notify only once.
            let newly = p.listing == Listing::Pending;
            if newly {
                p.listing = Listing::Absent;
            }
            newly
        });
    }

    fn error(&self, kind: Kind, error: &watcher::Error) {
        tracing::warn!(%kind, "watch failed, retrying with backoff: {error}");
        // Nothing changed for the state: the stores keep their contents.
        self.update(kind, |p| {
            p.last_error = Some(error.to_string());
            false
        });
    }
}

/// Whether a watcher error is the API server saying the kind does not exist.
fn is_not_found(error: &watcher::Error) -> bool {
    matches!(
        error,
        watcher::Error::InitialListFailed(::kube::Error::Api(e))
            | watcher::Error::WatchStartFailed(::kube::Error::Api(e))
            | watcher::Error::WatchFailed(::kube::Error::Api(e))
            if e.code == 404
    )
}

/// Whether a watcher error is the API server saying the watch's resourceVersion expired.
fn is_gone(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::WatchError(e) if e.code == 410)
        || matches!(
            error,
            watcher::Error::WatchStartFailed(::kube::Error::Api(e)) if e.code == 410
        )
}

/// How long a watcher waits after a failure: doubling from [`RetryBackoff::FIRST`] up to
/// [`RetryBackoff::MAX`], each delay drawn at random from its upper half so that the
/// watchers of every node do not come back in step; back to the start after a success.
/// The cap is low because the agent is a reader of the API server, not a controller
/// hammering it: after an outage it must catch up within seconds, not half a minute.
#[derive(Debug, Default)]
struct RetryBackoff {
    failures: u32,
}

impl RetryBackoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(4);

    fn next_delay(&mut self) -> Duration {
        let ceiling = Self::FIRST
            .saturating_mul(1 << self.failures.min(16))
            .min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        ceiling / 2 + ceiling.mul_f64(fastrand::f64() / 2.0)
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Starts the watcher of one kind; its store and the task driving it.
fn watch_kind<K>(
    api: Api<K>,
    dyntype: K::DynamicType,
    kind: Kind,
    optional: bool,
    progress: &Arc<Progress>,
    trim: fn(&mut K),
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let writer = Writer::new(dyntype);
    let store = writer.as_reader();
    let progress = progress.clone();
    let reader = store.clone();
    let task = tokio::spawn(async move {
        let events = watcher(api, watcher::Config::default())
            .modify(trim)
            .reflect(writer);
        let mut events = std::pin::pin!(events);
        let mut backoff = RetryBackoff::default();
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    backoff.reset();
                    match event {
                        watcher::Event::Apply(_) | watcher::Event::Delete(_) => progress.touch(),
                        // A (re-)list is buffered by the reflector until it completes.
                        watcher::Event::Init | watcher::Event::InitApply(_) => {}
                        watcher::Event::InitDone => progress.listed(kind, reader.len()),
                    }
                }
                // The watch fell behind (every restarted API server says so): the watcher
                // re-lists on its next poll; waiting first would only delay catching up.
                Err(e) if is_gone(&e) => {
                    tracing::info!(%kind, "watch expired (410 Gone); listing again");
                    backoff.reset();
                }
                Err(e) => {
                    if optional && is_not_found(&e) {
                        progress.absent(kind);
                    } else {
                        progress.error(kind, &e);
                    }
                    // Not polled while sleeping: no request goes out meanwhile.
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    });
    (store, task)
}

/// The reflector stores of every kind.
struct Stores {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    authorization_policies: (Store<DynamicObject>, ApiResource),
    peer_authentications: (Store<DynamicObject>, ApiResource),
    gateways: (Store<DynamicObject>, ApiResource),
    http_routes: (Store<DynamicObject>, ApiResource),
    grpc_routes: (Store<DynamicObject>, ApiResource),
    virtual_services: (Store<DynamicObject>, ApiResource),
    destination_rules: (Store<DynamicObject>, ApiResource),
    istio_gateways: (Store<DynamicObject>, ApiResource),
    service_entries: (Store<DynamicObject>, ApiResource),
    /// Only with [`KubeSource::with_secrets_in`].
    secrets: Option<Store<Secret>>,
}

impl Stores {
    /// A snapshot of the stores, as the file source would have parsed them.
    fn objects(&self) -> Objects {
        fn typed<K: Clone + Resource + 'static>(store: &Store<K>) -> Vec<Arc<K>>
        where
            K::DynamicType: Eq + Hash + Clone,
        {
            store.state()
        }
        fn raw((store, resource): &(Store<DynamicObject>, ApiResource)) -> Vec<serde_json::Value> {
            store
                .state()
                .iter()
                .filter_map(|o| match dynamic_to_json(o, resource) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        tracing::error!(kind = %resource.kind, name = ?o.metadata.name, "cannot convert to JSON, ignored: {e}");
                        None
                    }
                })
                .collect()
        }
        Objects {
            namespaces: typed(&self.namespaces),
            pods: typed(&self.pods),
            services: typed(&self.services),
            endpoint_slices: typed(&self.endpoint_slices),
            authorization_policies: raw(&self.authorization_policies),
            peer_authentications: raw(&self.peer_authentications),
            gateways: raw(&self.gateways),
            http_routes: raw(&self.http_routes),
            grpc_routes: raw(&self.grpc_routes),
            virtual_services: raw(&self.virtual_services),
            destination_rules: raw(&self.destination_rules),
            istio_gateways: raw(&self.istio_gateways),
            service_entries: raw(&self.service_entries),
            secrets: self.secrets.as_ref().map(typed).unwrap_or_default(),
        }
    }
}

/// Translates snapshots, leaving out (and logging once) the objects the translation rejects.
struct Builder {
    node: String,
    settings: Settings,
    rejected: BTreeSet<ObjectKey>,
    sync: Arc<SyncStatus>,
}

impl Builder {
    /// Translates `objects`; the outcome is recorded in `sync`.
    fn build(&mut self, mut objects: Objects) -> Result<MeshState, ConfigError> {
        let digest = super::sync::digest(&objects);
        let mut rejected = BTreeSet::new();
        let result = loop {
            match translate::translate(
                &objects,
                &self.node,
                NetnsSource::Discovered,
                &self.settings,
            ) {
                Ok(state) => break Ok(state),
                Err(ConfigError::Object { object, message }) if objects.remove(&object) => {
                    if !self.rejected.contains(&object) {
                        tracing::error!("{object}: {message}; leaving this object out");
                    }
                    rejected.insert(object);
                }
                Err(e) => break Err(e),
            }
        };
        for object in self.rejected.difference(&rejected) {
            tracing::info!("{object}: no longer rejected");
        }
        match &result {
            Ok(_) => self
                .sync
                .applied(digest, rejected.iter().map(ToString::to_string).collect()),
            Err(e) => self.sync.refused(e),
        }
        self.rejected = rejected;
        result
    }
}

/// Rebuilds and publishes the state after changes until every receiver is gone; the watchers
/// are aborted when this ends.
async fn rebuild_on_change(
    tx: watch::Sender<Arc<MeshState>>,
    mut changes: watch::Receiver<()>,
    stores: Stores,
    mut builder: Builder,
    watchers: AbortOnDrop,
    debounce: Duration,
) {
    let _watchers = watchers;
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
        // Let a burst of events settle; what arrives after this is seen by the next round.
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(debounce) => {}
        }
        changes.borrow_and_update();
        let state = match builder.build(stores.objects()) {
            Ok(state) => state,
            Err(e) => {
                tracing::error!("{e}; keeping the previous configuration");
                continue;
            }
        };
        let (workloads, services) = (state.workloads.len(), state.services.len());
        let state = Arc::new(state);
        let changed = tx.send_if_modified(|current| {
            if **current == *state {
                return false;
            }
            *current = state.clone();
            true
        });
        if changed {
            tracing::info!(
                workloads,
                services,
                "configuration updated from the API server"
            );
            state.log_problems();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NETNS_ANNOTATION;
    use crate::config::file::load_str;
    use crate::labels::Labels;

    const FULL_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  uid: 1234-abcd
  generateName: web-
  resourceVersion: "42"
  labels: {app: web, istio.io/dataplane-mode: ambient}
  annotations:
    mesh-agent.io/netns: /run/netns/web-1
    sidecar.istio.io/status: "{}"
    kubectl.kubernetes.io/last-applied-configuration: "{}"
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-5d, uid: u1}]
  finalizers: [x]
  managedFields: [{manager: kubelet, operation: Update}]
spec:
  nodeName: node-a
  serviceAccountName: web-sa
  hostNetwork: false
  containers:
  - name: app
    image: app:1
    command: [app, --serve]
    env: [{name: A, value: b}]
    ports: [{name: http, containerPort: 8080, protocol: TCP}]
  initContainers:
  - {name: proxy, image: p, restartPolicy: Always, ports: [{containerPort: 15001}]}
  volumes: [{name: data, emptyDir: {}}]
status:
  phase: Running
  podIP: 10.0.0.1
  podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]
  hostIP: 192.168.1.1
  conditions: [{type: Ready, status: "True"}]
  containerStatuses:
  - {name: app, image: app:1, imageID: x, ready: true, restartCount: 0}
"#;

    fn translate_one(pod: Pod, ns_labels: Option<&str>) -> MeshState {
        let mut ns = Namespace::default();
        ns.metadata.name = Some("shop".into());
        if let Some(mode) = ns_labels {
            ns.metadata.labels = Some([("istio.io/dataplane-mode".into(), mode.into())].into());
        }
        let objects = Objects {
            namespaces: vec![ns.into()],
            pods: vec![pod.into()],
            ..Default::default()
        };
        translate::translate(
            &objects,
            "node-a",
            NetnsSource::Discovered,
            &Settings::default(),
        )
        .unwrap()
    }

    #[test]
    fn a_pod_is_read_from_its_full_object_with_what_translation_needs() {
        let full = Pod::clone(&load_str(FULL_POD, "pod.yaml").unwrap().pods[0]);
        // Sidecar annotation on and off, ambient namespace or not, host network or not.
        let mut no_sidecar = full.clone();
        no_sidecar.annotations = Labels::from([(NETNS_ANNOTATION, "/run/netns/web-1")]);
        let mut host = no_sidecar.clone();
        host.spec.as_mut().unwrap().host_network = Some(true);
        let mut finished = no_sidecar.clone();
        finished.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let cases = [
            (&full, [false, false]),
            (&no_sidecar, [true, true]),
            (&host, [false, false]),
            (&finished, [false, false]),
        ];
        for (pod, captured) in cases {
            for (ns, captured) in [None, Some("ambient")].into_iter().zip(captured) {
                let state = translate_one(pod.clone(), ns);
                let w = &state.workloads[0];
                assert_eq!(w.captured, captured, "{pod:?} in {ns:?}");
                assert_eq!(w.labels.get("app"), Some("web"));
                assert_eq!(w.netns.as_deref(), Some(Path::new("/run/netns/web-1")));
            }
        }
    }

    #[test]
    fn a_secret_keeps_its_data_only_when_it_holds_a_certificate() {
        let secret = |type_: &str| Secret {
            metadata: ObjectMeta {
                name: Some("s".into()),
                annotations: Some(
                    [(
                        "kubectl.kubernetes.io/last-applied-configuration".to_owned(),
                        "{data}".to_owned(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            type_: Some(type_.into()),
            data: Some(
                [(
                    "tls.crt".to_owned(),
                    k8s_openapi::ByteString(b"pem".to_vec()),
                )]
                .into(),
            ),
            ..Default::default()
        };
        let mut tls = secret(translate::TLS_SECRET_TYPE);
        trim_secret(&mut tls);
        assert!(tls.metadata.annotations.is_none());
        assert_eq!(tls.data.unwrap()["tls.crt"].0, b"pem");
        let mut opaque = secret("Opaque");
        trim_secret(&mut opaque);
        assert!(opaque.metadata.annotations.is_none() && opaque.data.is_none());
        assert_eq!(opaque.metadata.name.as_deref(), Some("s"));
    }

    #[test]
    fn a_pod_keeps_ports_and_conditions_and_drops_bulk() {
        let pod = Pod::clone(&load_str(FULL_POD, "pod.yaml").unwrap().pods[0]);
        let meta = &pod.metadata;
        assert!(meta.managed_fields.is_none() && meta.owner_references.is_none());
        assert!(meta.finalizers.is_none() && meta.generate_name.is_none());
        assert!(!pod.annotations.contains_key(LAST_APPLIED_ANNOTATION));
        assert_eq!(pod.annotations.len(), 2, "{:?}", pod.annotations);
        // Images, environment, volumes, container statuses: not in the type at all.
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(
            spec.containers[0].ports.as_ref().unwrap()[0]
                .name
                .as_deref(),
            Some("http")
        );
        assert_eq!(
            spec.init_containers.as_ref().unwrap()[0]
                .restart_policy
                .as_deref(),
            Some("Always")
        );
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.conditions.as_ref().unwrap()[0].type_, "Ready");
    }

    #[test]
    fn dynamic_object_converts_to_the_file_shape() {
        let ar = authorization_policy_resource();
        let yaml = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: shop, resourceVersion: '7', uid: u-1, creationTimestamp: '2025-01-02T03:04:05Z'}
spec:
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/a]}}]}]
";
        let file = load_str(yaml, "p.yaml").unwrap().authorization_policies;
        // As a watch event carries it (with apiVersion/kind)...
        let with_types: DynamicObject = serde_json::from_value(file[0].clone()).unwrap();
        assert_eq!(dynamic_to_json(&with_types, &ar).unwrap(), file[0]);
        // ...and as a list item of a built-in-style list (without them).
        let mut bare = file[0].clone();
        bare.as_object_mut().unwrap().remove("apiVersion");
        bare.as_object_mut().unwrap().remove("kind");
        let without: DynamicObject = serde_json::from_value(bare).unwrap();
        assert!(without.types.is_none());
        assert_eq!(dynamic_to_json(&without, &ar).unwrap(), file[0]);
    }

    #[test]
    fn rejected_object_is_left_out_and_the_rest_kept() {
        let yaml = "apiVersion: v1
kind: Pod
metadata: {name: good, namespace: shop}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.1}
";
        let mut objects = load_str(yaml, "x.yaml").unwrap();
        // Objects from an API server are not validated by the file parser.
        let mut bad = Pod::clone(&objects.pods[0]);
        bad.metadata.name = Some("bad".into());
        bad.status.as_mut().unwrap().pod_ip = Some("10.0.0.300".into());
        objects.pods.push(bad.into());
        let mut bad_svc = Service::clone(&objects.services[0]);
        bad_svc.metadata.name = Some("bad-svc".into());
        bad_svc.spec.as_mut().unwrap().cluster_ip = Some("nope".into());
        objects.services.push(bad_svc.into());

        let mut builder = Builder {
            node: "node-a".into(),
            settings: Settings::default(),
            rejected: BTreeSet::new(),
            sync: Arc::default(),
        };
        let state = builder.build(objects.clone()).unwrap();
        assert_eq!(state.workloads.len(), 1);
        assert_eq!(state.workloads[0].name, "good");
        assert_eq!(state.services.len(), 1);
        let rejected: Vec<String> = builder.rejected.iter().map(|k| k.to_string()).collect();
        assert_eq!(rejected, ["Pod shop/bad", "Service shop/bad-svc"]);
        // `status` sees the view (the rejected objects included) and what was left out.
        let record = builder.sync.snapshot();
        assert_eq!(record.digest, crate::config::sync::digest(&objects));
        assert_eq!(record.rejected, rejected);

        // Fixed: accepted again.
        Arc::make_mut(&mut objects.pods[1])
            .status
            .as_mut()
            .unwrap()
            .pod_ip = Some("10.0.0.3".into());
        let state = builder.build(objects).unwrap();
        assert_eq!(state.workloads.len(), 2);
        assert_eq!(builder.rejected.len(), 1);
    }

    #[test]
    fn not_found_is_recognised_only_for_404() {
        let api = |code| {
            ::kube::Error::Api(::kube::core::ErrorResponse {
                status: "Failure".into(),
                message: String::new(),
                reason: String::new(),
                code,
            })
        };
        assert!(is_not_found(&watcher::Error::InitialListFailed(api(404))));
        assert!(is_not_found(&watcher::Error::WatchStartFailed(api(404))));
        assert!(!is_not_found(&watcher::Error::InitialListFailed(api(403))));
        assert!(!is_not_found(&watcher::Error::NoResourceVersion));
    }

    #[tokio::test]
    async fn client_from_kubeconfig_file_and_missing_file() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("mesh-agent-kubeconfig-{}.yaml", std::process::id()));
        std::fs::write(
            &path,
            "apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
",
        )
        .unwrap();
        let client = client_from(Some(&path)).await;
        std::fs::remove_file(&path).unwrap();
        assert!(client.is_ok(), "{:?}", client.err());

        let missing = dir.join("mesh-agent-no-such-kubeconfig.yaml");
        let e = client_from(Some(&missing)).await.err().unwrap().to_string();
        assert!(
            e.starts_with(&format!("kubeconfig {}: ", missing.display())),
            "{e}"
        );
    }
}
