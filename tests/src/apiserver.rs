//! An in-process Kubernetes API server for tests: it speaks the list/watch protocol
//! (resourceVersions, watch events, bookmarks, `410 Gone`, pagination) and merge patches for
//! the kinds the agent consumes, over plain HTTP on 127.0.0.1, so that kube-rs's real client
//! and watchers run against it without a cluster.
//!
//! # What it serves
//!
//! For Namespace, Pod, Service (`/api/v1/...`), EndpointSlice (`/apis/discovery.k8s.io/v1/...`),
//! AuthorizationPolicy and PeerAuthentication (`/apis/security.istio.io/v1/...`), Gateway and
//! HTTPRoute (`/apis/gateway.networking.k8s.io/v1/...`), VirtualService and DestinationRule
//! (`/apis/networking.istio.io/v1/...`), cluster-wide and (namespaced kinds) per namespace:
//!
//! - `GET` collection: a list (`{kind}List`, `metadata.resourceVersion` = the current global
//!   resourceVersion). `limit`/`continue` paginate (later pages are read from the current
//!   objects, not from a snapshot, but report the first page's resourceVersion, which a
//!   watcher tolerates); a `continue` token, or `resourceVersion=N&resourceVersionMatch=Exact`,
//!   older than the last [`ApiServer::expire_resource_versions`] gets HTTP 410. Items of
//!   built-in kinds carry no `apiVersion`/`kind`, as a real API server's lists.
//! - `GET` collection `?watch=true&resourceVersion=N`: JSON lines
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":...}`: the events after `N`
//!   (all current objects as `ADDED` for `N` = `0` or absent), then live ones. With
//!   `allowWatchBookmarks=true` a `BOOKMARK` carrying the stream's resourceVersion is sent
//!   every [`ApiServer::BOOKMARK_INTERVAL`]. A stream ends after `timeoutSeconds`, on
//!   [`ApiServer::close_watches`], or (as an `ERROR` event with a `Status` of code 410, reason
//!   `Expired`, like a real server's watch cache) when `N` is older than the last
//!   [`ApiServer::expire_resource_versions`] or the stream fell too far behind.
//! - `GET` object, and `PATCH` object with `application/merge-patch+json` (or the strategic
//!   merge patch type, applied as a merge patch): RFC 7386, a new resourceVersion and a
//!   `MODIFIED` event; recorded in [`ApiServer::patches`].
//! - 404 (`Status`, reason `NotFound`) for a kind marked absent ([`ApiServer::set_absent`]:
//!   CRDs not installed) and unknown paths; 503 for everything while
//!   [`ApiServer::set_available`]`(false)`; 400 for label/field selectors and streaming lists
//!   (not implemented, so a test relying on them fails loudly).
//!
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews`: a TokenReview, authenticated with the
//!   user a test registered for the token ([`ApiServer::add_token`]), else not.
//!
//! Objects get `metadata.resourceVersion` from one global counter, and a `uid` and
//! `creationTimestamp` when created (kept on update). Every request is recorded
//! ([`ApiServer::requests`]).
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use mesh_agent::config::Kind;

type Body = BoxBody<Bytes, Infallible>;

/// A served resource type.
#[derive(Debug, Clone, Copy)]
struct Type {
    kind: Kind,
    /// API group, empty for the core group.
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    /// Built-in kinds' list items carry no apiVersion/kind; custom resources' do.
    builtin: bool,
}

impl Type {
    const ALL: [Type; 14] = [
        Type::new(Kind::Namespace, "", "namespaces", true),
        Type::new(Kind::Pod, "", "pods", true),
        Type::new(Kind::Service, "", "services", true),
        Type::new(
            Kind::EndpointSlice,
            "discovery.k8s.io",
            "endpointslices",
            true,
        ),
        Type::new(
            Kind::AuthorizationPolicy,
            "security.istio.io",
            "authorizationpolicies",
            false,
        ),
        Type::new(
            Kind::PeerAuthentication,
            "security.istio.io",
            "peerauthentications",
            false,
        ),
        Type::new(
            Kind::Gateway,
            "gateway.networking.k8s.io",
            "gateways",
            false,
        ),
        Type::new(
            Kind::HttpRoute,
            "gateway.networking.k8s.io",
            "httproutes",
            false,
        ),
        Type::new(
            Kind::GrpcRoute,
            "gateway.networking.k8s.io",
            "grpcroutes",
            false,
        ),
        Type::new(
            Kind::VirtualService,
            "networking.istio.io",
            "virtualservices",
            false,
        ),
        Type::new(
            Kind::DestinationRule,
            "networking.istio.io",
            "destinationrules",
            false,
        ),
        Type::new(Kind::IstioGateway, "networking.istio.io", "gateways", false),
        Type::new(
            Kind::ServiceEntry,
            "networking.istio.io",
            "serviceentries",
            false,
        ),
        Type::new(Kind::Secret, "", "secrets", true),
    ];

    const fn new(kind: Kind, group: &'static str, plural: &'static str, builtin: bool) -> Self {
        Self {
            kind,
            group,
            version: "v1",
            plural,
            builtin,
        }
    }

    fn of(kind: Kind) -> Self {
        Self::ALL
            .into_iter()
            .find(|t| t.kind == kind)
            .expect("every kind is served")
    }

    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// Store key: kind, namespace (empty for cluster-scoped kinds), name.
type Key = (Kind, String, String);

/// One change, as kept in the history and sent to watchers.
#[derive(Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    namespace: String,
    event: &'static str,
    object: Value,
}

/// A PATCH the server received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedPatch {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub content_type: String,
    pub patch: Value,
}

/// A request the server answered (watches: when the stream started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
    /// A watch answered with an `ERROR` event of code 410 (its resourceVersion was too old).
    pub gone: bool,
}

/// Marks a watch response that is an `ERROR` 410 event (a response extension).
#[derive(Debug, Clone, Copy)]
struct WatchGone;

impl RecordedRequest {
    /// Whether this is a list (not a watch) of `kind`'s collection.
    pub fn is_list_of(&self, kind: Kind) -> bool {
        self.method == "GET"
            && self.path.ends_with(&format!("/{}", Type::of(kind).plural))
            && !is_watch(&parse_query(&self.query))
    }

    /// Whether this is a watch of `kind`'s collection.
    pub fn is_watch_of(&self, kind: Kind) -> bool {
        self.method == "GET"
            && self.path.ends_with(&format!("/{}", Type::of(kind).plural))
            && is_watch(&parse_query(&self.query))
    }
}

struct Inner {
    /// The last resourceVersion issued.
    rv: u64,
    /// resourceVersions below this are too old to watch from (410 Gone).
    compacted: u64,
    uids: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Arc<Change>>,
    absent: BTreeSet<Kind>,
    available: bool,
    patches: Vec<RecordedPatch>,
    requests: Vec<RecordedRequest>,
    /// Service-account tokens TokenReview accepts, with the `status.user` it answers.
    tokens: BTreeMap<String, Value>,
}

struct Shared {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Arc<Change>>,
    close: watch::Sender<u64>,
    hold_lists: watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The test API server; see the module docs. Stops (and drops its connections) when dropped.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl ApiServer {
    /// How often a watch with `allowWatchBookmarks=true` gets a bookmark.
    pub const BOOKMARK_INTERVAL: Duration = Duration::from_millis(500);

    /// Starts a server on 127.0.0.1 with an ephemeral port and no objects.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the test API server on 127.0.0.1")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                rv: 1,
                compacted: 0,
                uids: 0,
                objects: BTreeMap::new(),
                history: Vec::new(),
                absent: BTreeSet::new(),
                available: true,
                patches: Vec::new(),
                requests: Vec::new(),
                tokens: BTreeMap::new(),
            }),
            changes: broadcast::channel(1024).0,
            close: watch::Sender::new(0),
            hold_lists: watch::Sender::new(false),
        });
        let accept = tokio::spawn(accept(listener, shared.clone()));
        Ok(Self {
            addr,
            shared,
            accept,
        })
    }

    /// Starts a server listening on 127.0.0.1 inside the network namespace at `netns` (where
    /// the agent under test runs), served by a thread of its own.
    pub fn start_in(netns: &std::path::Path) -> anyhow::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let netns = netns.to_owned();
        std::thread::spawn(move || {
            let started = (|| {
                crate::workload::enter_netns(&netns)?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok::<_, anyhow::Error>(rt)
            })();
            match started {
                Ok(rt) => rt.block_on(async move {
                    let _ = tx.send(ApiServer::start().await);
                    std::future::pending::<()>().await
                }),
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
        rx.recv().context("the API server's thread ended")?
    }

    /// Writes `DIR/kubeconfig` pointing at this server (no credentials); its path.
    pub fn write_kubeconfig(&self, dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
        let path = dir.join("kubeconfig");
        let url = self.url();
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: t, cluster: {{server: \"{url}\"}}}}]\nusers: [{{name: t, user: {{}}}}]\ncontexts: [{{name: t, context: {{cluster: t, user: t}}}}]\ncurrent-context: t\n"
        );
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube-rs client for this server (plain HTTP, no credentials).
    pub fn client(&self) -> anyhow::Result<kube::Client> {
        let config = kube::Config::new(self.url().parse()?);
        Ok(kube::Client::try_from(config)?)
    }

    /// Creates or replaces an object (anything that serializes to a Kubernetes object of a
    /// served kind: a `serde_json::Value`, a k8s-openapi type). Namespaced objects without a
    /// namespace go to `default`. Watchers get `ADDED` or `MODIFIED`. Returns the stored object.
    pub fn apply(&self, object: impl Serialize) -> anyhow::Result<Value> {
        let mut object = serde_json::to_value(object).context("serializing the object")?;
        let (ty, namespace, name) = identify(&mut object)?;
        let mut inner = self.shared.lock();
        if inner.absent.contains(&ty.kind) {
            bail!("{} is marked absent on this API server", ty.kind);
        }
        let key = (ty.kind, namespace.clone(), name);
        let previous = inner.objects.get(&key);
        let event = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let kept = |field: &str| previous.map(|p| p["metadata"][field].clone());
        let uid = kept("uid");
        let created = kept("creationTimestamp");
        inner.rv += 1;
        let rv = inner.rv;
        let meta = object["metadata"]
            .as_object_mut()
            .expect("identify checked the metadata");
        match uid {
            Some(uid) => {
                meta.insert("uid".into(), uid);
            }
            None if !meta.contains_key("uid") => {
                inner.uids += 1;
                let uid = format!("00000000-0000-4000-8000-{:012x}", inner.uids);
                meta.insert("uid".into(), uid.into());
            }
            None => {}
        }
        match created {
            Some(created) => {
                meta.insert("creationTimestamp".into(), created);
            }
            None if !meta.contains_key("creationTimestamp") => {
                meta.insert("creationTimestamp".into(), now().into());
            }
            None => {}
        }
        meta.insert("resourceVersion".into(), rv.to_string().into());
        inner.objects.insert(key, object.clone());
        publish(&self.shared, &mut inner, ty.kind, namespace, event, &object);
        Ok(object)
    }

    /// Deletes an object (`namespace` is ignored for cluster-scoped kinds); watchers get
    /// `DELETED` with the object at a new resourceVersion. Returns the deleted object.
    pub fn delete(&self, kind: Kind, namespace: Option<&str>, name: &str) -> anyhow::Result<Value> {
        let namespace = if kind.is_namespaced() {
            namespace.unwrap_or("default").to_owned()
        } else {
            String::new()
        };
        let mut inner = self.shared.lock();
        let key = (kind, namespace.clone(), name.to_owned());
        let Some(mut object) = inner.objects.remove(&key) else {
            bail!("{kind} {namespace}/{name} does not exist");
        };
        inner.rv += 1;
        object["metadata"]["resourceVersion"] = inner.rv.to_string().into();
        publish(
            &self.shared,
            &mut inner,
            kind,
            namespace,
            "DELETED",
            &object,
        );
        Ok(object)
    }

    /// An object as stored.
    pub fn get(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Option<Value> {
        let namespace = if kind.is_namespaced() {
            namespace.unwrap_or("default").to_owned()
        } else {
            String::new()
        };
        self.shared
            .lock()
            .objects
            .get(&(kind, namespace, name.to_owned()))
            .cloned()
    }

    /// Every stored object (with `apiVersion` and `kind`), by kind, namespace and name.
    pub fn objects(&self) -> Vec<Value> {
        self.shared.lock().objects.values().cloned().collect()
    }

    /// The last resourceVersion issued.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Ends every open watch stream (cleanly, as at `timeoutSeconds`); clients re-watch.
    pub fn close_watches(&self) {
        self.shared.close.send_modify(|generation| *generation += 1);
    }

    /// Makes every resourceVersion issued so far too old, as an etcd compaction does: the next
    /// watch from one of them gets an `ERROR` event with code 410 (and a `continue` token from
    /// before gets HTTP 410), so the client must re-list. Open streams are not closed: combine
    /// with [`ApiServer::close_watches`].
    pub fn expire_resource_versions(&self) {
        let mut inner = self.shared.lock();
        // A new version, so that a list made after this returns one that is not too old.
        inner.rv += 1;
        inner.compacted = inner.rv;
        let compacted = inner.compacted;
        inner.history.retain(|c| c.rv >= compacted);
    }

    /// Marks a kind as not served (its CRD missing: 404 on list and watch), or served again.
    /// Takes effect for new requests; open watches of it are left alone.
    pub fn set_absent(&self, kind: Kind, absent: bool) {
        let mut inner = self.shared.lock();
        if absent {
            inner.absent.insert(kind);
        } else {
            inner.absent.remove(&kind);
        }
    }

    /// While unavailable, every request gets 503 and the open watches are closed: the API
    /// server is down or unreachable.
    pub fn set_available(&self, available: bool) {
        self.shared.lock().available = available;
        if !available {
            self.close_watches();
        }
    }

    /// While held, list requests wait (before answering) until released.
    pub fn hold_lists(&self, held: bool) {
        self.shared.hold_lists.send_replace(held);
    }

    /// The patches received, in order.
    pub fn patches(&self) -> Vec<RecordedPatch> {
        self.shared.lock().patches.clone()
    }

    /// The requests answered, in order.
    /// Makes `token` valid for TokenReview: the review answers authenticated, with
    /// `user` (`{"username": ..., "extra": {...}}`) and the audiences asked for.
    pub fn add_token(&self, token: &str, user: Value) {
        self.shared.lock().tokens.insert(token.to_owned(), user);
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }
}

/// Checks an object's kind and name; puts a namespaced one without namespace in `default`.
fn identify(object: &mut Value) -> anyhow::Result<(Type, String, String)> {
    let kind = object["kind"].as_str().context("kind: missing")?;
    let ty = Type::ALL
        .into_iter()
        .find(|t| t.kind.as_str() == kind)
        .with_context(|| format!("kind: {kind} is not served"))?;
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    if api_version != ty.api_version() {
        bail!(
            "apiVersion: {api_version:?} for {kind}, this server stores {}",
            ty.api_version()
        );
    }
    let meta = object
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .context("metadata: missing")?;
    let name = meta
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .context("metadata.name: missing")?
        .to_owned();
    let namespace = if ty.kind.is_namespaced() {
        let ns = meta
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
            .to_owned();
        meta.insert("namespace".into(), ns.clone().into());
        ns
    } else {
        meta.remove("namespace");
        String::new()
    };
    Ok((ty, namespace, name))
}

/// Records a change and sends it to the watchers (under the lock, so in resourceVersion order).
fn publish(
    shared: &Shared,
    inner: &mut Inner,
    kind: Kind,
    namespace: String,
    event: &'static str,
    object: &Value,
) {
    let change = Arc::new(Change {
        rv: inner.rv,
        kind,
        namespace,
        event,
        object: object.clone(),
    });
    inner.history.push(change.clone());
    // No receiver (no open watch) is fine.
    let _ = shared.changes.send(change);
}

fn now() -> String {
    k8s_openapi::chrono::Utc::now().to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true)
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    // Connections die with this task (the JoinSet aborts them when dropped).
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, say: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let shared = shared.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

/// What a path names.
#[derive(Debug)]
struct Target {
    ty: Type,
    /// For a namespaced collection or object.
    namespace: Option<String>,
    name: Option<String>,
}

/// Parses `/api/v1/...` and `/apis/GROUP/VERSION/...`.
fn route(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let find = |plural: &str| {
        Type::ALL
            .into_iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
    };
    let target = match rest {
        [plural] => Target {
            ty: find(plural)?,
            namespace: None,
            name: None,
        },
        ["namespaces", ns, plural] => Target {
            ty: find(plural).filter(|t| t.kind.is_namespaced())?,
            namespace: Some((*ns).to_owned()),
            name: None,
        },
        ["namespaces", ns, plural, name] => Target {
            ty: find(plural).filter(|t| t.kind.is_namespaced())?,
            namespace: Some((*ns).to_owned()),
            name: Some((*name).to_owned()),
        },
        [plural, name] => Target {
            ty: find(plural).filter(|t| !t.kind.is_namespaced())?,
            namespace: None,
            name: Some((*name).to_owned()),
        },
        _ => return None,
    };
    Some(target)
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn is_watch(query: &BTreeMap<String, String>) -> bool {
    matches!(query.get("watch").map(String::as_str), Some("true" | "1"))
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("JSON values serialize");
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)).boxed())
        .expect("a valid response")
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn status_response(status: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(status, &status_object(status.as_u16(), reason, message))
}

async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let response = respond(shared, req).await;
    shared.lock().requests.push(RecordedRequest {
        method: method.to_string(),
        path,
        query,
        status: response.status().as_u16(),
        gone: response.extensions().get::<WatchGone>().is_some(),
    });
    response
}

async fn respond(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    if !shared.lock().available {
        return status_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the test API server is unavailable",
        );
    }
    if req.method() == Method::POST && req.uri().path() == TOKEN_REVIEWS {
        return token_review(shared, req).await;
    }
    let Some(target) = route(req.uri().path()) else {
        return status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    if shared.lock().absent.contains(&target.ty.kind) {
        return status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    let query = parse_query(req.uri().query().unwrap_or_default());
    for unsupported in ["labelSelector", "fieldSelector", "sendInitialEvents"] {
        if query.contains_key(unsupported) {
            return status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("{unsupported} is not implemented by the test API server"),
            );
        }
    }
    match (req.method(), &target.name) {
        (&Method::GET, None) if is_watch(&query) => watch(shared, &target, &query),
        (&Method::GET, None) => list(shared, &target, &query).await,
        (&Method::GET, Some(name)) => {
            let key = key(&target, name);
            match shared.lock().objects.get(&key) {
                Some(object) => json_response(StatusCode::OK, object),
                None => not_found(&target, name),
            }
        }
        (&Method::PATCH, Some(name)) => patch(shared, &target, name.clone(), req).await,
        _ => status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the test API server serves GET (list, watch, get) and PATCH only",
        ),
    }
}

/// `POST` here: a TokenReview, answered from [`ApiServer::add_token`]'s tokens.
const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

async fn token_review(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let Ok(body) = req.into_body().collect().await else {
        return status_response(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
    };
    let Ok(mut review) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return status_response(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
    };
    let token = review["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let audiences = review["spec"]["audiences"].clone();
    review["status"] = match shared.lock().tokens.get(&token) {
        Some(user) => json!({"authenticated": true, "user": user, "audiences": audiences}),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    json_response(StatusCode::CREATED, &review)
}

fn key(target: &Target, name: &str) -> Key {
    (
        target.ty.kind,
        target.namespace.clone().unwrap_or_default(),
        name.to_owned(),
    )
}

fn not_found(target: &Target, name: &str) -> Response<Body> {
    status_response(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} \"{name}\" not found", target.ty.plural),
    )
}

fn gone(message: &str) -> Value {
    status_object(410, "Expired", message)
}

async fn list(
    shared: &Arc<Shared>,
    target: &Target,
    query: &BTreeMap<String, String>,
) -> Response<Body> {
    let mut hold = shared.hold_lists.subscribe();
    let _ = hold.wait_for(|held| !*held).await;

    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0);
    let inner = shared.lock();
    let (list_rv, offset) = match query.get("continue") {
        Some(token) => {
            let Some((rv, offset)) = token
                .split_once('.')
                .and_then(|(rv, off)| Some((rv.parse::<u64>().ok()?, off.parse::<usize>().ok()?)))
            else {
                return status_response(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "invalid continue token",
                );
            };
            if rv < inner.compacted {
                return json_response(
                    StatusCode::GONE,
                    &gone(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ),
                );
            }
            (rv, offset)
        }
        None => {
            if query.get("resourceVersionMatch").map(String::as_str) == Some("Exact") {
                let rv = query
                    .get("resourceVersion")
                    .and_then(|rv| rv.parse::<u64>().ok())
                    .unwrap_or(0);
                if rv < inner.compacted {
                    return json_response(
                        StatusCode::GONE,
                        &gone(&format!(
                            "too old resource version: {rv} ({})",
                            inner.compacted
                        )),
                    );
                }
            }
            (inner.rv, 0)
        }
    };
    let ty = target.ty;
    let all: Vec<&Value> = inner
        .objects
        .iter()
        .filter(|((kind, ns, _), _)| {
            *kind == ty.kind && target.namespace.as_ref().is_none_or(|want| want == ns)
        })
        .map(|(_, v)| v)
        .collect();
    let end = limit.map_or(all.len(), |l| (offset + l).min(all.len()));
    let items: Vec<Value> = all
        .get(offset..end)
        .unwrap_or_default()
        .iter()
        .map(|&object| {
            let mut item = object.clone();
            if ty.builtin
                && let Some(map) = item.as_object_mut()
            {
                map.remove("apiVersion");
                map.remove("kind");
            }
            item
        })
        .collect();
    let mut metadata = json!({ "resourceVersion": list_rv.to_string() });
    if end < all.len() {
        metadata["continue"] = format!("{list_rv}.{end}").into();
        metadata["remainingItemCount"] = (all.len() - end).into();
    }
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", ty.kind),
            "apiVersion": ty.api_version(),
            "metadata": metadata,
            "items": items,
        }),
    )
}

fn event_line(event: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": event, "object": object }))
        .expect("JSON values serialize");
    line.push(b'\n');
    Bytes::from(line)
}

fn watch(
    shared: &Arc<Shared>,
    target: &Target,
    query: &BTreeMap<String, String>,
) -> Response<Body> {
    let ty = target.ty;
    let namespace = target.namespace.clone();
    let matches = move |kind: Kind, ns: &str| {
        kind == ty.kind && namespace.as_deref().is_none_or(|want| want == ns)
    };
    let from = query
        .get("resourceVersion")
        .filter(|rv| !rv.is_empty() && *rv != "0")
        .map(|rv| rv.parse::<u64>());
    let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);

    // Under the lock: what to replay, and a subscription that starts right after it.
    let mut replay = Vec::new();
    let mut expired = false;
    let (mut changes, start_rv) = {
        let inner = shared.lock();
        match from {
            Some(Err(_)) => {
                return status_response(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "invalid resourceVersion",
                );
            }
            Some(Ok(rv)) if rv < inner.compacted => {
                let message = format!("too old resource version: {rv} ({})", inner.compacted);
                replay.push(event_line("ERROR", &gone(&message)));
                expired = true;
            }
            Some(Ok(rv)) => replay.extend(
                inner
                    .history
                    .iter()
                    .filter(|c| c.rv > rv && matches(c.kind, &c.namespace))
                    .map(|c| event_line(c.event, &c.object)),
            ),
            None => replay.extend(
                inner
                    .objects
                    .iter()
                    .filter(|((kind, ns, _), _)| matches(*kind, ns))
                    .map(|(_, object)| event_line("ADDED", object)),
            ),
        }
        (shared.changes.subscribe(), inner.rv)
    };

    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    let mut close = shared.close.subscribe();
    close.borrow_and_update();
    let bookmark = json!({ "kind": ty.kind.as_str(), "apiVersion": ty.api_version() });
    tokio::spawn(async move {
        for line in replay {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        if expired {
            return;
        }
        let mut last = start_rv;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval_at(
            tokio::time::Instant::now() + ApiServer::BOOKMARK_INTERVAL,
            ApiServer::BOOKMARK_INTERVAL,
        );
        loop {
            let line = tokio::select! {
                change = changes.recv() => match change {
                    Ok(change) => {
                        if change.rv <= last {
                            continue;
                        }
                        last = change.rv;
                        if !matches(change.kind, &change.namespace) {
                            continue;
                        }
                        event_line(change.event, &change.object)
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(event_line("ERROR", &gone("the watch fell behind"))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = ticker.tick(), if bookmarks => {
                    let mut object = bookmark.clone();
                    object["metadata"] = json!({ "resourceVersion": last.to_string() });
                    event_line("BOOKMARK", &object)
                }
                _ = close.changed() => return,
                _ = &mut deadline => return,
                _ = tx.closed() => return,
            };
            // A change made after the watches were closed (the server went away, then the
            // test changed objects) must not go out on a stream that lost the race to see
            // the close: `select!` picks among ready branches at random.
            if close.has_changed().unwrap_or(true) {
                return;
            }
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    let body = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|line| line.map(|l| Ok::<_, Infallible>(Frame::data(l))))
    });
    let mut response = Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(StreamBody::new(body).boxed())
        .expect("a valid response");
    if expired {
        response.extensions_mut().insert(WatchGone);
    }
    response
}

async fn patch(
    shared: &Arc<Shared>,
    target: &Target,
    name: String,
    req: Request<Incoming>,
) -> Response<Body> {
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if !matches!(
        content_type.as_str(),
        "application/merge-patch+json" | "application/strategic-merge-patch+json"
    ) {
        return status_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!("the test API server applies merge patches only, got {content_type:?}"),
        );
    }
    let body = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return status_response(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string());
        }
    };
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return status_response(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string());
        }
    };
    let key = key(target, &name);
    let mut inner = shared.lock();
    inner.patches.push(RecordedPatch {
        kind: target.ty.kind,
        namespace: key.1.clone(),
        name: name.clone(),
        content_type,
        patch: patch.clone(),
    });
    let Some(mut object) = inner.objects.get(&key).cloned() else {
        return not_found(target, &name);
    };
    merge_patch(&mut object, &patch);
    // Identity is not patchable.
    object["metadata"]["name"] = name.into();
    if target.ty.kind.is_namespaced() {
        object["metadata"]["namespace"] = key.1.clone().into();
    }
    inner.rv += 1;
    object["metadata"]["resourceVersion"] = inner.rv.to_string().into();
    inner.objects.insert(key.clone(), object.clone());
    publish(shared, &mut inner, key.0, key.1, "MODIFIED", &object);
    json_response(StatusCode::OK, &object)
}

/// RFC 7386 JSON merge patch: objects merge recursively, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let map = target.as_object_mut().expect("made an object");
    for (k, v) in patch {
        if v.is_null() {
            map.remove(k);
        } else {
            merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_to_kinds_namespaces_and_names() {
        type Routed<'a> = Option<(Kind, Option<&'a str>, Option<&'a str>)>;
        let cases: &[(&str, Routed<'_>)] = &[
            ("/api/v1/pods", Some((Kind::Pod, None, None))),
            ("/api/v1/namespaces", Some((Kind::Namespace, None, None))),
            (
                "/api/v1/namespaces/shop",
                Some((Kind::Namespace, None, Some("shop"))),
            ),
            (
                "/api/v1/namespaces/shop/pods",
                Some((Kind::Pod, Some("shop"), None)),
            ),
            (
                "/api/v1/namespaces/shop/pods/web-1",
                Some((Kind::Pod, Some("shop"), Some("web-1"))),
            ),
            (
                "/apis/discovery.k8s.io/v1/endpointslices",
                Some((Kind::EndpointSlice, None, None)),
            ),
            (
                "/apis/security.istio.io/v1/namespaces/a/peerauthentications",
                Some((Kind::PeerAuthentication, Some("a"), None)),
            ),
            (
                "/apis/security.istio.io/v1beta1/authorizationpolicies",
                None,
            ),
            ("/api/v1/pods/web-1", None), // a namespaced kind needs its namespace
            ("/api/v1/namespaces/a/namespaces", None),
            ("/api/v1/configmaps", None),
            ("/healthz", None),
        ];
        for (path, want) in cases {
            let got = route(path).map(|t| (t.ty.kind, t.namespace, t.name));
            let want = want.map(|(k, ns, n)| (k, ns.map(str::to_owned), n.map(str::to_owned)));
            assert_eq!(got, want, "{path}");
        }
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": "b", "b": "c"}),
                json!({"a": null}),
                json!({"b": "c"}),
            ),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (mut target, patch, want) in cases {
            merge_patch(&mut target, &patch);
            assert_eq!(target, want, "patch {patch}");
        }
    }

    #[test]
    fn query_strings_are_decoded() {
        let q = parse_query("watch=true&resourceVersion=12&continue=3.5&x=a%2Fb+c&flag");
        assert!(is_watch(&q));
        assert_eq!(q["resourceVersion"], "12");
        assert_eq!(q["x"], "a/b c");
        assert_eq!(q["flag"], "");
        assert_eq!(parse_query("bad=%zz%4")["bad"], "%zz%4");
    }

    #[test]
    fn apply_assigns_versions_and_keeps_identity_on_update() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let server = ApiServer::start().await.unwrap();
            let first = server
                .apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}))
                .unwrap();
            assert_eq!(first["metadata"]["namespace"], "default");
            let second = server
                .apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"a": "b"}}}))
                .unwrap();
            assert_eq!(second["metadata"]["uid"], first["metadata"]["uid"]);
            assert_eq!(
                second["metadata"]["creationTimestamp"],
                first["metadata"]["creationTimestamp"]
            );
            let rv = |v: &Value| v["metadata"]["resourceVersion"].as_str().unwrap().parse::<u64>().unwrap();
            assert!(rv(&second) > rv(&first));
            assert_eq!(rv(&second), server.resource_version());
            let e = server
                .apply(json!({"apiVersion": "v1beta1", "kind": "Pod", "metadata": {"name": "p"}}))
                .unwrap_err();
            assert!(e.to_string().contains("apiVersion"), "{e}");
            assert!(server.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}})).is_err());
            assert!(server.delete(Kind::Pod, None, "p").is_ok());
            assert!(server.delete(Kind::Pod, None, "p").is_err());
        });
    }
}
