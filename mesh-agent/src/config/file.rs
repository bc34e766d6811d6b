//! The file configuration source: a multi-document YAML file of Kubernetes objects (what
//! `kubectl get -o yaml` prints), parsed and validated into [`Objects`], and watched for changes.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::EndpointSlice;
use k8s_openapi::Metadata;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use tokio::sync::watch;

use super::sync::{SyncStatus, ViewDigest};
use super::translate::{self, NetnsSource};
use super::{ConfigError, DocRef, Kind, ObjectKey, Objects, Settings};
use crate::state::MeshState;

/// How often [`FileSource`] looks at the file's metadata.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long a file rewritten in place must stay unchanged before it is read: it passes
/// through truncated and partly written versions, each of which parses. (A file replaced
/// by rename is whole at once and read at the next poll.)
pub const DEFAULT_SETTLE: Duration = Duration::from_millis(300);

/// Parses and validates a configuration text; `origin` (usually the file name) prefixes errors.
///
/// Documents are separated by `---`; empty ones are skipped; a `kind: List` document contributes
/// its `items`. Accepted: `v1` Namespace, Pod, Service; `discovery.k8s.io/v1` EndpointSlice;
/// `security.istio.io/v1` (or `v1beta1`) AuthorizationPolicy and PeerAuthentication. Any other
/// kind, a malformed or invalid object, or the same kind/namespace/name twice is an error naming
/// the document, the object and the field. Namespaced objects without `metadata.namespace` are
/// put in `default`, as `kubectl apply` would.
pub fn load_str(text: &str, origin: &str) -> Result<Objects, ConfigError> {
    Ok(parse(text, origin)?.objects)
}

/// An object left out by [`load_lenient`]: a kind or version this mesh does not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// `origin: document N (Kind ns/name)`.
    pub at: String,
    /// `Kind ns/name`.
    pub object: String,
    /// `kind` or `apiVersion`.
    pub field: &'static str,
    pub message: String,
}

/// [`load_str`] for a reader of someone else's files (`mesh-agent analyze`): objects of
/// kinds or versions this mesh does not read are left out and returned instead of failing
/// the file, and a file with no object is simply empty. Anything else still fails.
pub fn load_lenient(text: &str, origin: &str) -> Result<(Objects, Vec<Skipped>), ConfigError> {
    let mut parser = Parser {
        origin,
        parsed: Parsed {
            objects: Objects::default(),
            locations: HashMap::new(),
        },
        explicit_empty: true,
        skipped: Some(Vec::new()),
    };
    for (i, chunk) in documents(text).iter().enumerate() {
        parser.document(i + 1, chunk)?;
    }
    Ok((parser.parsed.objects, parser.skipped.unwrap_or_default()))
}

/// [`load_str`], then [`translate::translate`] for `node` with the file-mode rules: a captured
/// pod on `node` must carry the `mesh-agent.io/netns` annotation. Errors name the document.
pub fn load_state(
    text: &str,
    origin: &str,
    node: &str,
    settings: &Settings,
) -> Result<MeshState, ConfigError> {
    load_with_digest(text, origin, node, settings).map(|(state, _)| state)
}

/// [`load_state`], with the digest of the objects the state was built from.
fn load_with_digest(
    text: &str,
    origin: &str,
    node: &str,
    settings: &Settings,
) -> Result<(MeshState, ViewDigest), ConfigError> {
    let parsed = parse(text, origin)?;
    let digest = super::sync::digest(&parsed.objects);
    let state = translate::translate(&parsed.objects, node, NetnsSource::Annotation, settings)
        .map_err(|e| match e {
            ConfigError::Object { object, message } => match parsed.locations.get(&object) {
                Some(at) => ConfigError::Document {
                    origin: origin.to_owned(),
                    at: at.clone(),
                    message,
                },
                None => ConfigError::Object { object, message },
            },
            other => other,
        })?;
    Ok((state, digest))
}

/// A watched configuration file; see [`FileSource::start`].
#[derive(Debug, Clone)]
pub struct FileSource {
    path: PathBuf,
    node: String,
    settings: Settings,
    poll_interval: Duration,
    settle: Duration,
    sync: Arc<SyncStatus>,
}

impl FileSource {
    /// A source for the agent on `node` reading `path`, polled every [`DEFAULT_POLL_INTERVAL`].
    pub fn new(path: impl Into<PathBuf>, node: impl Into<String>, settings: Settings) -> Self {
        Self {
            path: path.into(),
            node: node.into(),
            settings,
            poll_interval: DEFAULT_POLL_INTERVAL,
            settle: DEFAULT_SETTLE,
            sync: Arc::default(),
        }
    }

    /// Changes how often the file's metadata is checked.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Changes how long a changed file must stay unchanged before it is read.
    pub fn with_settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// What the source applied last and refused since (for `/status`).
    pub fn sync(&self) -> Arc<SyncStatus> {
        self.sync.clone()
    }

    /// Reads, parses and translates the file once.
    pub async fn load(&self) -> Result<MeshState, ConfigError> {
        self.translate_read(tokio::fs::read_to_string(&self.path).await)
    }

    /// Parses and translates what was read; the outcome is recorded in [`sync`](Self::sync).
    fn translate_read(&self, read: std::io::Result<String>) -> Result<MeshState, ConfigError> {
        let result = match read {
            Ok(text) => load_with_digest(&text, &self.origin(), &self.node, &self.settings),
            Err(source) => Err(self.read_error(source)),
        };
        match result {
            Ok((state, digest)) => {
                self.sync.applied(digest, Vec::new());
                Ok(state)
            }
            Err(e) => {
                self.sync.refused(&e);
                Err(e)
            }
        }
    }

    /// Loads the file (any error is returned: the agent must not start on a broken file), then
    /// spawns a task that polls the file's metadata (device, inode, length, mtime, ctime, so a
    /// file replaced by rename is noticed) and, when it changes, re-reads and translates it:
    /// at once when it was replaced by rename, once the change has stayed for the settle
    /// time ([`DEFAULT_SETTLE`]) when it was rewritten in place. A file with no object is refused
    /// unless it is an explicit empty List ([`ConfigError::Empty`]): a file being rewritten
    /// in place is briefly empty. A good file is published if the state differs; a bad one
    /// is logged with
    /// `tracing::error!` and the previous state is kept. The task ends when every receiver is
    /// dropped. Must be called within a Tokio runtime.
    pub async fn start(self) -> Result<watch::Receiver<Arc<MeshState>>, ConfigError> {
        let fingerprint = Fingerprint::of(&self.path)
            .await
            .map_err(|source| self.read_error(source))?;
        let state = self.load().await?;
        tracing::info!(
            path = %self.path.display(),
            workloads = state.workloads.len(),
            services = state.services.len(),
            "configuration loaded"
        );
        state.log_problems();
        let (tx, rx) = watch::channel(Arc::new(state));
        tokio::spawn(self.watch(tx, fingerprint));
        Ok(rx)
    }

    async fn watch(self, tx: watch::Sender<Arc<MeshState>>, mut last: Fingerprint) {
        let mut ticker = tokio::time::interval(self.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A missing or unreadable file is reported once, not on every poll.
        let mut missing = false;
        // A version of the file not applied yet, and when it was first seen.
        let mut changed: Option<(Fingerprint, tokio::time::Instant)> = None;
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = ticker.tick() => {}
            }
            let fingerprint = match Fingerprint::of(&self.path).await {
                Ok(f) => f,
                Err(source) => {
                    if !missing {
                        missing = true;
                        let e = self.read_error(source);
                        tracing::error!("{e}; keeping the previous configuration");
                        self.sync.refused(&e);
                    }
                    last = Fingerprint::default();
                    continue;
                }
            };
            missing = false;
            if fingerprint == last {
                changed = None;
                continue;
            }
            // A file put in place by rename (an editor, a ConfigMap's symlink swap) is
            // whole at once; one rewritten in place passes through partial versions, so
            // it is read only once it stayed the same for the settle time.
            let replaced =
                last.ino != 0 && (fingerprint.ino, fingerprint.dev) != (last.ino, last.dev);
            match changed {
                _ if replaced => {}
                Some((seen, since)) if seen == fingerprint => {
                    if since.elapsed() < self.settle {
                        continue;
                    }
                }
                _ => {
                    changed = Some((fingerprint, tokio::time::Instant::now()));
                    continue;
                }
            }
            changed = None;
            let read = tokio::fs::read_to_string(&self.path).await;
            if Fingerprint::of(&self.path).await.ok() != Some(fingerprint) {
                // Written while we read it: look again on the next tick.
                continue;
            }
            last = fingerprint;
            let result = self.translate_read(read);
            match result {
                Ok(state) => {
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
                            path = %self.path.display(),
                            workloads,
                            services,
                            "configuration reloaded"
                        );
                        state.log_problems();
                    } else {
                        tracing::debug!(path = %self.path.display(), "configuration file changed, state unchanged");
                    }
                }
                Err(e) => tracing::error!("{e}; keeping the previous configuration"),
            }
        }
    }

    fn origin(&self) -> String {
        self.path.display().to_string()
    }

    fn read_error(&self, source: std::io::Error) -> ConfigError {
        ConfigError::Read {
            origin: self.origin(),
            source,
        }
    }
}

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Fingerprint {
    async fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = tokio::fs::metadata(path).await?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// Parsed objects and where each came from (to put file context on translation errors).
struct Parsed {
    objects: Objects,
    locations: HashMap<ObjectKey, DocRef>,
}

fn parse(text: &str, origin: &str) -> Result<Parsed, ConfigError> {
    let mut parser = Parser {
        origin,
        parsed: Parsed {
            objects: Objects::default(),
            locations: HashMap::new(),
        },
        explicit_empty: false,
        skipped: None,
    };
    for (i, chunk) in documents(text).iter().enumerate() {
        parser.document(i + 1, chunk)?;
    }
    // An empty file is what a writer leaves between truncating and writing: applying it
    // would release every pod and drop every policy. Only an explicit empty List says
    // "no objects" on purpose.
    if parser.parsed.objects.is_empty() && !parser.explicit_empty {
        return Err(ConfigError::Empty {
            origin: origin.to_owned(),
        });
    }
    Ok(parser.parsed)
}

/// One YAML document's text and where it starts in the file.
#[derive(Debug)]
struct Chunk<'a> {
    text: &'a str,
    /// 0-based line of the file where `text` starts.
    line: usize,
    /// Column where `text` starts (3 after a `---` marker on the same line).
    column: usize,
    /// Started by an explicit `---` marker.
    explicit: bool,
}

impl Chunk<'_> {
    /// The text preceded by blank space so that parser locations are those of the file. Only
    /// built on the error path.
    fn padded(&self) -> String {
        let mut s = "\n".repeat(self.line);
        s.push_str(&" ".repeat(self.column));
        s.push_str(self.text);
        s
    }

    /// Only blank lines and comments.
    fn is_blank(&self) -> bool {
        self.text.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#')
        })
    }
}

/// Splits a YAML stream into documents at `---` and `...` markers (column 0, followed by
/// blank or end of line), as YAML does even inside block scalars. Text before the first marker
/// or after `...` counts as a document only if it is not blank, so the indices match what
/// `serde_yaml_ng` and `kubectl` see.
fn documents(text: &str) -> Vec<Chunk<'_>> {
    fn is_marker(line: &str, marker: &str) -> bool {
        line.strip_prefix(marker)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
    }
    let mut chunks = Vec::new();
    let mut current = Chunk {
        text: "",
        line: 0,
        column: 0,
        explicit: false,
    };
    let mut start = 0;
    let mut offset = 0;
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        let start_marker = is_marker(line, "---");
        if start_marker || is_marker(line, "...") {
            current.text = &text[start..offset];
            chunks.push(current);
            current = if start_marker {
                start = offset + 3;
                Chunk {
                    text: "",
                    line: line_no,
                    column: 3,
                    explicit: true,
                }
            } else {
                start = offset + line.len();
                Chunk {
                    text: "",
                    line: line_no + 1,
                    column: 0,
                    explicit: false,
                }
            };
        }
        offset += line.len();
    }
    current.text = &text[start..];
    chunks.push(current);
    chunks.retain(|c| c.explicit || !c.is_blank());
    chunks
}

/// Kinds a cluster's manifests carry next to the mesh's objects that the agent has no use
/// for (the pods they make are what it reads): skipped, so one file applies to a cluster
/// and to the file mode unchanged.
fn unused_kind(api_version: &str, kind: &str) -> bool {
    matches!(
        (api_version, kind),
        ("v1", "ServiceAccount" | "ConfigMap")
            | (
                "apps/v1",
                "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet"
            )
    )
}

/// A `kind:` with its `apiVersion:`, resolved to the kinds this agent knows.
fn resolve_kind(api_version: &str, kind: &str) -> Result<Kind, String> {
    const CORE: &str = "v1";
    const DISCOVERY: &str = "discovery.k8s.io/v1";
    const SECURITY: &str = "security.istio.io/v1";
    const GATEWAY: &str = "gateway.networking.k8s.io/v1";
    const NETWORKING: &str = "networking.istio.io/v1";
    let known = match kind {
        "Namespace" => Some((Kind::Namespace, CORE)),
        "Pod" => Some((Kind::Pod, CORE)),
        "Service" => Some((Kind::Service, CORE)),
        "Secret" => Some((Kind::Secret, CORE)),
        "EndpointSlice" => Some((Kind::EndpointSlice, DISCOVERY)),
        "AuthorizationPolicy" => Some((Kind::AuthorizationPolicy, SECURITY)),
        "PeerAuthentication" => Some((Kind::PeerAuthentication, SECURITY)),
        "Gateway" if api_version.starts_with("networking.istio.io/") => {
            Some((Kind::IstioGateway, NETWORKING))
        }
        "Gateway" => Some((Kind::Gateway, GATEWAY)),
        "HTTPRoute" => Some((Kind::HttpRoute, GATEWAY)),
        "GRPCRoute" => Some((Kind::GrpcRoute, GATEWAY)),
        "VirtualService" => Some((Kind::VirtualService, NETWORKING)),
        "DestinationRule" => Some((Kind::DestinationRule, NETWORKING)),
        "ServiceEntry" => Some((Kind::ServiceEntry, NETWORKING)),
        _ => None,
    };
    // Earlier versions of the same API that are served with the same schema.
    let older: &[&str] = match known {
        Some((_, SECURITY)) => &["security.istio.io/v1beta1"],
        Some((_, GATEWAY)) => &["gateway.networking.k8s.io/v1beta1"],
        Some((_, NETWORKING)) => &[
            "networking.istio.io/v1beta1",
            "networking.istio.io/v1alpha3",
        ],
        _ => &[],
    };
    match known {
        Some((k, want)) if api_version == want || older.contains(&api_version) => Ok(k),
        Some((_, want)) => Err(format!(
            "apiVersion: {api_version:?} is not supported for kind {kind} (expected {want})"
        )),
        None => Err(format!(
            "kind: unsupported kind {kind:?} (apiVersion {api_version:?}); a config file holds \
             only Namespace, Pod and Service ({CORE}), EndpointSlice ({DISCOVERY}), \
             AuthorizationPolicy and PeerAuthentication ({SECURITY}), Gateway, HTTPRoute and \
             GRPCRoute ({GATEWAY}), VirtualService, DestinationRule, Gateway and \
             ServiceEntry ({NETWORKING}), or a List of them (ServiceAccounts, ConfigMaps and apps/v1 \
             workloads are skipped)"
        )),
    }
}

/// `kind`, `apiVersion`, namespace and name read from an untyped document.
struct Header<'a> {
    api_version: &'a str,
    kind: &'a str,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
}

impl<'a> Header<'a> {
    fn of(value: &'a serde_yaml_ng::Value) -> Result<Self, String> {
        if !value.is_mapping() {
            return Err(format!(
                "expected a Kubernetes object (a mapping), found {}",
                describe_yaml(value)
            ));
        }
        let str_field = |v: &'a serde_yaml_ng::Value, field: &str| match v.get(field) {
            None | Some(serde_yaml_ng::Value::Null) => Ok(None),
            Some(serde_yaml_ng::Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(format!(
                "{field}: expected a string, found {}",
                describe_yaml(other)
            )),
        };
        let meta = value.get("metadata").unwrap_or(&serde_yaml_ng::Value::Null);
        let name = str_field(meta, "name").unwrap_or(None);
        let namespace = str_field(meta, "namespace").unwrap_or(None);
        let kind = str_field(value, "kind")?.ok_or("kind: missing")?;
        let api_version = str_field(value, "apiVersion")?.ok_or("apiVersion: missing")?;
        Ok(Self {
            api_version,
            kind,
            namespace,
            name,
        })
    }

    /// `Pod default/web-1`; as much as is known.
    fn describe(&self) -> String {
        let namespaced = self.kind != "Namespace" && self.kind != "List";
        match (self.name, self.namespace) {
            (Some(name), Some(ns)) if namespaced => format!("{} {ns}/{name}", self.kind),
            (Some(name), None) if namespaced => format!("{} default/{name}", self.kind),
            (Some(name), _) => format!("{} {name}", self.kind),
            (None, _) => self.kind.to_owned(),
        }
    }
}

fn describe_yaml(v: &serde_yaml_ng::Value) -> &'static str {
    match v {
        serde_yaml_ng::Value::Null => "null",
        serde_yaml_ng::Value::Bool(_) => "a boolean",
        serde_yaml_ng::Value::Number(_) => "a number",
        serde_yaml_ng::Value::String(_) => "a string",
        serde_yaml_ng::Value::Sequence(_) => "a sequence",
        serde_yaml_ng::Value::Mapping(_) => "a mapping",
        serde_yaml_ng::Value::Tagged(_) => "a tagged value",
    }
}

/// Where one object's text is: a whole document, or an item of a `kind: List` document.
enum Source<'a> {
    Document(&'a Chunk<'a>),
    Item {
        chunk: &'a Chunk<'a>,
        /// 0-based index in `items`.
        index: usize,
        value: &'a serde_yaml_ng::Value,
    },
}

impl Source<'_> {
    /// Deserializes the object. On failure the message carries serde_yaml_ng's field path and the
    /// file's line and column (the fast path parses without them; the error path re-parses the
    /// document so that both are right).
    fn parse<T: DeserializeOwned>(&self) -> Result<T, String> {
        let fast = match self {
            Source::Document(chunk) => serde_yaml_ng::from_str::<T>(chunk.text),
            Source::Item { value, .. } => {
                serde_yaml_ng::to_string(value).and_then(|text| serde_yaml_ng::from_str::<T>(&text))
            }
        };
        let error = match fast {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let precise = match self {
            Source::Document(chunk) => serde_yaml_ng::from_str::<T>(&chunk.padded()).err(),
            Source::Item { chunk, index, .. } => ListItem::<T>::new(*index)
                .deserialize(serde_yaml_ng::Deserializer::from_str(&chunk.padded()))
                .err(),
        };
        Err(precise.unwrap_or(error).to_string())
    }
}

/// Deserializes only `items[index]` of a List document (as `T`), skipping everything else, so
/// that errors carry the path `items[N]...` and the document's own line numbers.
struct ListItem<T> {
    index: usize,
    _t: PhantomData<T>,
}

impl<T> ListItem<T> {
    fn new(index: usize) -> Self {
        Self {
            index,
            _t: PhantomData,
        }
    }
}

impl<'de, T: DeserializeOwned> DeserializeSeed<'de> for ListItem<T> {
    type Value = Option<T>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: DeserializeOwned> Visitor<'de> for ListItem<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a List object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<T>, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "items" {
                found = map.next_value_seed(Items::<T>(self.index, PhantomData))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

struct Items<T>(usize, PhantomData<T>);

impl<'de, T: DeserializeOwned> DeserializeSeed<'de> for Items<T> {
    type Value = Option<T>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, T: DeserializeOwned> Visitor<'de> for Items<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence of objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<T>, A::Error> {
        let mut found = None;
        let mut i = 0;
        loop {
            if i == self.0 {
                match seq.next_element::<T>()? {
                    Some(v) => found = Some(v),
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            i += 1;
        }
        Ok(found)
    }
}

struct Parser<'o> {
    origin: &'o str,
    parsed: Parsed,
    /// A `kind: List` with `items: []` was found: the file means to hold no objects.
    explicit_empty: bool,
    /// Where objects of unknown kinds and versions go instead of failing the file
    /// ([`load_lenient`]).
    skipped: Option<Vec<Skipped>>,
}

impl Parser<'_> {
    /// The kind of the object at `at`, or why it has none: an error, or `None` when a
    /// lenient parser set the object aside.
    fn kind(&mut self, at: &DocRef, header: &Header<'_>) -> Result<Option<Kind>, ConfigError> {
        let message = match resolve_kind(header.api_version, header.kind) {
            Ok(kind) => return Ok(Some(kind)),
            Err(message) => message,
        };
        let Some(skipped) = &mut self.skipped else {
            return Err(self.error(at, message));
        };
        skipped.push(Skipped {
            at: format!("{}: {at}", self.origin),
            object: header.describe(),
            field: if message.starts_with("apiVersion") {
                "apiVersion"
            } else {
                "kind"
            },
            message,
        });
        Ok(None)
    }

    fn error(&self, at: &DocRef, message: impl Into<String>) -> ConfigError {
        ConfigError::Document {
            origin: self.origin.to_owned(),
            at: at.clone(),
            message: message.into(),
        }
    }

    fn document(&mut self, document: usize, chunk: &Chunk<'_>) -> Result<(), ConfigError> {
        let mut at = DocRef {
            document,
            item: None,
            object: None,
        };
        let value: serde_yaml_ng::Value = match serde_yaml_ng::from_str(chunk.text) {
            Ok(v) => v,
            Err(_) => {
                let message = Source::Document(chunk)
                    .parse::<serde_yaml_ng::Value>()
                    .err()
                    .unwrap_or_else(|| "invalid YAML".to_owned());
                return Err(self.error(&at, message));
            }
        };
        if value.is_null() {
            return Ok(()); // An empty document.
        }
        let header = Header::of(&value).map_err(|m| self.error(&at, m))?;
        at.object = Some(header.describe());
        if unused_kind(header.api_version, header.kind) {
            tracing::debug!(object = %header.describe(), "config: skipped, the agent does not use this kind");
            return Ok(());
        }
        if header.kind != "List" {
            return match self.kind(&at, &header)? {
                Some(kind) => self.object(kind, at, Source::Document(chunk)),
                None => Ok(()),
            };
        }
        if header.api_version != "v1" {
            return Err(self.error(
                &at,
                format!(
                    "apiVersion: {:?} is not supported for kind List (expected v1)",
                    header.api_version
                ),
            ));
        }
        let items = match value.get("items") {
            None | Some(serde_yaml_ng::Value::Null) => return Ok(()),
            Some(serde_yaml_ng::Value::Sequence(items)) => {
                self.explicit_empty |= items.is_empty();
                items
            }
            Some(other) => {
                return Err(self.error(
                    &at,
                    format!("items: expected a sequence, found {}", describe_yaml(other)),
                ));
            }
        };
        for (index, item) in items.iter().enumerate() {
            let mut at = DocRef {
                document,
                item: Some(index + 1),
                object: None,
            };
            let header = Header::of(item).map_err(|m| self.error(&at, m))?;
            at.object = Some(header.describe());
            if header.kind == "List" {
                return Err(self.error(&at, "kind: a List inside a List is not supported"));
            }
            if unused_kind(header.api_version, header.kind) {
                continue;
            }
            let Some(kind) = self.kind(&at, &header)? else {
                continue;
            };
            self.object(
                kind,
                at,
                Source::Item {
                    chunk,
                    index,
                    value: item,
                },
            )?;
        }
        Ok(())
    }

    /// Deserializes, normalizes, validates and stores one object.
    fn object(&mut self, kind: Kind, at: DocRef, source: Source<'_>) -> Result<(), ConfigError> {
        match kind {
            Kind::Namespace => {
                let ns: Namespace = self.typed(kind, &at, &source)?;
                self.parsed.objects.namespaces.push(ns.into());
            }
            Kind::Pod => {
                let pod = self.typed(kind, &at, &source)?;
                translate::workload(&pod, None).map_err(|e| self.error(&at, e.to_string()))?;
                self.parsed.objects.pods.push(pod.into());
            }
            Kind::Service => {
                let svc = self.typed(kind, &at, &source)?;
                translate::service(&svc).map_err(|e| self.error(&at, e.to_string()))?;
                self.parsed.objects.services.push(svc.into());
            }
            Kind::Secret => {
                let secret: k8s_openapi::api::core::v1::Secret = self.typed(kind, &at, &source)?;
                translate::tls_secret(&secret).map_err(|e| self.error(&at, e.to_string()))?;
                self.parsed.objects.secrets.push(secret.into());
            }
            Kind::EndpointSlice => {
                let slice: EndpointSlice = self.typed(kind, &at, &source)?;
                self.parsed.objects.endpoint_slices.push(slice.into());
            }
            Kind::AuthorizationPolicy => {
                let policy = self.raw(kind, &at, &source)?;
                self.parsed.objects.authorization_policies.push(policy);
            }
            Kind::PeerAuthentication => {
                let policy = self.raw(kind, &at, &source)?;
                self.parsed.objects.peer_authentications.push(policy);
            }
            Kind::Gateway => {
                let gateway = self.raw(kind, &at, &source)?;
                crate::l7::config::validate(kind, &gateway)
                    .map_err(|e| self.error(&at, e.to_string()))?;
                self.parsed.objects.gateways.push(gateway);
            }
            Kind::ServiceEntry => {
                let entry = self.raw(kind, &at, &source)?;
                crate::config::service_entry::parse(&entry)
                    .map_err(|e| self.error(&at, e.to_string()))?;
                self.parsed.objects.service_entries.push(entry);
            }
            Kind::HttpRoute
            | Kind::GrpcRoute
            | Kind::VirtualService
            | Kind::DestinationRule
            | Kind::IstioGateway => {
                let object = self.raw(kind, &at, &source)?;
                // Routing objects are refused whole when invalid: a file is the operator's
                // own, and a route half applied sends traffic where nobody asked.
                crate::l7::config::validate(kind, &object)
                    .map_err(|e| self.error(&at, e.to_string()))?;
                let objects = &mut self.parsed.objects;
                match kind {
                    Kind::HttpRoute => objects.http_routes.push(object),
                    Kind::GrpcRoute => objects.grpc_routes.push(object),
                    Kind::VirtualService => objects.virtual_services.push(object),
                    Kind::IstioGateway => objects.istio_gateways.push(object),
                    _ => objects.destination_rules.push(object),
                }
            }
        }
        Ok(())
    }

    /// Deserializes a typed object, puts it in `default` if it has no namespace, and registers
    /// it (rejecting a missing name and duplicates).
    fn typed<T>(&mut self, kind: Kind, at: &DocRef, source: &Source<'_>) -> Result<T, ConfigError>
    where
        T: DeserializeOwned + Metadata<Ty = ObjectMeta>,
    {
        let mut object: T = source.parse().map_err(|m| self.error(at, m))?;
        let meta = object.metadata_mut();
        if kind.is_namespaced() && meta.namespace.as_deref().is_none_or(str::is_empty) {
            meta.namespace = Some("default".to_owned());
        }
        let (namespace, name) = (meta.namespace.clone(), meta.name.clone());
        self.register(kind, at, namespace, name)?;
        Ok(object)
    }

    /// Like [`Parser::typed`] for the kinds kept as JSON.
    fn raw(
        &mut self,
        kind: Kind,
        at: &DocRef,
        source: &Source<'_>,
    ) -> Result<serde_json::Value, ConfigError> {
        let mut object: serde_json::Value = source.parse().map_err(|m| self.error(at, m))?;
        let Some(meta) = object.get_mut("metadata").and_then(|m| m.as_object_mut()) else {
            return Err(self.error(at, "metadata: missing"));
        };
        let namespace = match meta.get("namespace") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(ns)) if ns.is_empty() => None,
            Some(serde_json::Value::String(ns)) => Some(ns.clone()),
            Some(_) => return Err(self.error(at, "metadata.namespace: expected a string")),
        };
        let namespace = namespace.unwrap_or_else(|| {
            meta.insert("namespace".to_owned(), "default".into());
            "default".to_owned()
        });
        let name = match meta.get("name") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(name)) => Some(name.clone()),
            Some(_) => return Err(self.error(at, "metadata.name: expected a string")),
        };
        self.register(kind, at, Some(namespace), name)?;
        Ok(object)
    }

    /// Records where an object was defined; a missing name or a second definition is an error.
    fn register(
        &mut self,
        kind: Kind,
        at: &DocRef,
        namespace: Option<String>,
        name: Option<String>,
    ) -> Result<(), ConfigError> {
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            return Err(self.error(at, "metadata.name: missing"));
        };
        let key = ObjectKey {
            kind,
            namespace: if kind.is_namespaced() {
                namespace
            } else {
                None
            },
            name,
        };
        if let Some(first) = self.parsed.locations.get(&key) {
            let message = format!("duplicate {key}, first defined in {first}");
            return Err(self.error(at, message));
        }
        self.parsed.locations.insert(key, at.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const NS_AMBIENT: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels:
    istio.io/dataplane-mode: ambient
";

    /// A captured pod on node-a with a netns annotation.
    fn pod(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels: {{app: web}}
  annotations: {{mesh-agent.io/netns: /run/netns/{name}}}
spec:
  nodeName: node-a
  containers:
  - name: app
    image: app
status:
  phase: Running
  podIP: {ip}
"
        )
    }

    fn err(text: &str) -> String {
        load_str(text, "config.yaml").unwrap_err().to_string()
    }

    #[test]
    fn documents_are_split_at_markers_and_counted_from_one() {
        let cases: &[(&str, &[&str])] = &[
            ("a: 1\n", &["a: 1\n"]),
            ("---\na: 1\n", &["\na: 1\n"]),
            ("# header\n---\na: 1\n---\nb: 2", &["\na: 1\n", "\nb: 2"]),
            ("a: 1\n---\n---\nb: 2\n", &["a: 1\n", "\n", "\nb: 2\n"]),
            ("a: 1\n...\n---\nb: 2\n", &["a: 1\n", "\nb: 2\n"]),
            (
                "a: |\n  x\n  ---\n---x: 1\n",
                &["a: |\n  x\n  ---\n---x: 1\n"],
            ),
            ("a: 1\r\n---\r\nb: 2\r\n", &["a: 1\r\n", "\r\nb: 2\r\n"]),
        ];
        for (text, want) in cases {
            let got: Vec<_> = documents(text).iter().map(|c| c.text).collect();
            assert_eq!(&got, want, "{text:?}");
        }
    }

    #[test]
    fn empty_documents_are_skipped() {
        let text = format!(
            "---\n---\n# nothing here\n---\n{}---\n\n",
            pod("web-1", "10.0.0.1")
        );
        let objects = load_str(&text, "config.yaml").unwrap();
        assert_eq!(objects.pods.len(), 1);
    }

    #[test]
    fn a_file_without_objects_is_refused_unless_it_is_an_explicit_empty_list() {
        for text in ["", "\n\n", "# all gone\n", "---\n", "---\n---\n# x\n...\n"] {
            let e = load_str(text, "config.yaml").unwrap_err();
            assert!(matches!(e, ConfigError::Empty { .. }), "{text:?}: {e}");
            assert!(e.to_string().starts_with("config.yaml: no objects"), "{e}");
            assert!(e.to_string().contains("items: []"), "{e}");
        }
        // A List without items (or with null items) is not an explicit empty.
        for text in [
            "apiVersion: v1\nkind: List\n",
            "apiVersion: v1\nkind: List\nitems:\n",
        ] {
            assert!(matches!(
                load_str(text, "config.yaml"),
                Err(ConfigError::Empty { .. })
            ));
        }
        for text in [
            "apiVersion: v1\nkind: List\nitems: []\n",
            "# nothing on purpose\n---\napiVersion: v1\nitems: []\nkind: List\nmetadata: {}\n",
        ] {
            assert_eq!(load_str(text, "config.yaml").unwrap(), Objects::default());
        }
    }

    #[test]
    fn core_kinds_are_typed_in_file_order() {
        let text = format!(
            "{NS_AMBIENT}---\n{}---\n{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec: {{clusterIP: 10.96.0.10, selector: {{app: web}}, ports: [{{port: 80}}]}}\n",
            pod("web-2", "10.0.0.2"),
            pod("web-1", "10.0.0.1"),
        );
        let objects = load_str(&text, "config.yaml").unwrap();
        assert_eq!(objects.namespaces.len(), 1);
        let names: Vec<_> = objects
            .pods
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["web-2", "web-1"]);
        assert_eq!(objects.services[0].metadata.name.as_deref(), Some("web"));
    }

    #[test]
    fn invalid_pod_ip_error_names_document_and_field() {
        let cases = [
            (
                "podIP: 10.0.0.x",
                "status.podIP: invalid IP address \"10.0.0.x\"",
            ),
            (
                "podIPs: [{ip: 10.0.0.1}, {ip: \"fd00::zz\"}]",
                "status.podIPs[1].ip: invalid IP address \"fd00::zz\"",
            ),
        ];
        for (status, want) in cases {
            let bad = format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: web-1, namespace: default}}\nstatus:\n  {status}\n"
            );
            let text = format!("{NS_AMBIENT}---\n{}---\n{bad}", pod("web-0", "10.0.0.9"));
            assert_eq!(
                err(&text),
                format!("config.yaml: document 3 (Pod default/web-1): {want}")
            );
        }
    }

    #[test]
    fn type_error_names_document_object_field_and_file_line() {
        let text = format!(
            "{NS_AMBIENT}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web-1\n  namespace: default\nspec:\n  containers: oops\n"
        );
        let e = err(&text);
        assert!(
            e.starts_with(
                "config.yaml: document 2 (Pod default/web-1): spec.containers: invalid type: string \"oops\", expected a sequence"
            ),
            "{e}"
        );
        // `containers: oops` is on line 14 of the file, the value at column 15.
        assert!(e.ends_with("at line 14 column 15"), "{e}");
    }

    #[test]
    fn yaml_syntax_error_reports_document_and_file_line() {
        let text = format!(
            "{}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: [unclosed\n",
            pod("web-0", "10.0.0.9")
        );
        let e = err(&text);
        assert!(e.starts_with("config.yaml: document 2: "), "{e}");
        assert!(e.contains("line 19"), "{e}");
    }

    #[test]
    fn list_kind_items_are_flattened() {
        let text = format!(
            "{NS_AMBIENT}---\napiVersion: v1\nkind: List\nmetadata: {{resourceVersion: \"\"}}\nitems:\n- {}\n- {}",
            pod("web-1", "10.0.0.1").replace('\n', "\n  "),
            pod("web-2", "10.0.0.2").replace('\n', "\n  "),
        );
        let objects = load_str(&text, "config.yaml").unwrap();
        let names: Vec<_> = objects
            .pods
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["web-1", "web-2"]);
        assert_eq!(objects.namespaces.len(), 1);
        let empty = "apiVersion: v1\nkind: List\nitems: []\n";
        assert_eq!(load_str(empty, "config.yaml").unwrap(), Objects::default());
    }

    #[test]
    fn list_item_error_names_item_object_and_field() {
        let item = |body: &str| body.replace('\n', "\n  ");
        let bad_ip = item(&pod("web-2", "10.0.0.300"));
        let bad_type = item(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web-3, namespace: default}\nspec:\n  containers: 5\n",
        );
        let list = |second: &str| {
            format!(
                "apiVersion: v1\nkind: List\nitems:\n- {}\n- {second}",
                item(&pod("web-1", "10.0.0.1"))
            )
        };
        assert_eq!(
            err(&list(&bad_ip)),
            "config.yaml: document 1 item 2 (Pod default/web-2): status.podIP: invalid IP address \"10.0.0.300\""
        );
        let e = err(&list(&bad_type));
        assert!(
            e.starts_with(
                "config.yaml: document 1 item 2 (Pod default/web-3): items[1].spec.containers: invalid type: integer `5`, expected a sequence"
            ),
            "{e}"
        );
        assert!(e.ends_with("at line 24 column 17"), "{e}");
    }

    #[test]
    fn a_clusters_workload_kinds_are_skipped() {
        let text = format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: bookinfo-details}}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: details-v1}}\nspec: {{replicas: 1}}\n---\n{}",
            pod("web", "10.0.0.5")
        );
        let parsed = load_str(&text, "config.yaml").expect("skips what it does not use");
        assert_eq!(parsed.pods.len(), 1);
    }

    #[test]
    fn unknown_kind_is_rejected() {
        let cases = [
            (
                "batch/v1",
                "Job",
                "document 1 (Job default/web): kind: unsupported kind \"Job\"",
            ),
            (
                "networking.k8s.io/v1",
                "Ingress",
                "document 1 (Ingress default/web): kind: unsupported kind \"Ingress\"",
            ),
            (
                "networking.istio.io/v1",
                "Sidecar",
                "kind: unsupported kind \"Sidecar\"",
            ),
            (
                "apps/v1",
                "Pod",
                "apiVersion: \"apps/v1\" is not supported for kind Pod (expected v1)",
            ),
        ];
        for (api, kind, want) in cases {
            let text = format!(
                "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: web, namespace: default}}\n"
            );
            let e = err(&text);
            assert!(e.contains(want), "{e}");
        }
        let e = err(
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: batch/v1, kind: Job, metadata: {name: web}}\n",
        );
        assert!(
            e.starts_with("config.yaml: document 1 item 1 (Job default/web): kind: unsupported"),
            "{e}"
        );
    }

    #[test]
    fn documents_without_kind_or_not_objects_are_rejected() {
        let cases = [
            (
                "metadata: {name: web}\n",
                "config.yaml: document 1: kind: missing",
            ),
            (
                "kind: Pod\nmetadata: {name: web}\n",
                "config.yaml: document 1: apiVersion: missing",
            ),
            (
                "- a\n- b\n",
                "config.yaml: document 1: expected a Kubernetes object (a mapping), found a sequence",
            ),
            (
                "apiVersion: v1\nkind: List\nitems: 3\n",
                "config.yaml: document 1 (List): items: expected a sequence, found a number",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(err(text), want);
        }
    }

    #[test]
    fn authorization_policy_documents_are_kept() {
        let text = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: default}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/default/sa/client]}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: deny-all}
spec: {}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
";
        let objects = load_str(text, "config.yaml").unwrap();
        assert_eq!(objects.authorization_policies.len(), 2);
        let allow = &objects.authorization_policies[0];
        assert_eq!(allow["spec"]["action"], "ALLOW");
        assert_eq!(
            allow["spec"]["rules"][0]["from"][0]["source"]["principals"][0],
            "cluster.local/ns/default/sa/client"
        );
        // No namespace means `default`, as kubectl apply does.
        assert_eq!(
            objects.authorization_policies[1]["metadata"]["namespace"],
            "default"
        );
        assert_eq!(
            objects.peer_authentications[0]["spec"]["mtls"]["mode"],
            "STRICT"
        );
        let state = load_state(text, "config.yaml", "node-a", &Settings::default()).unwrap();
        assert_eq!(state.raw.authorization_policies.len(), 2);
        assert_eq!(state.raw.peer_authentications.len(), 1);
    }

    #[test]
    fn endpoint_slice_documents_are_kept_typed() {
        let text = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abcde
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: true}
ports:
- {name: http, port: 8080, protocol: TCP}
";
        let objects = load_str(text, "config.yaml").unwrap();
        assert_eq!(
            objects.endpoint_slices[0].endpoints[0].addresses,
            ["10.0.0.1"]
        );
        let state = load_state(text, "config.yaml", "node-a", &Settings::default()).unwrap();
        assert_eq!(
            state.raw.endpoint_slices[0].endpoints[0].addresses,
            ["10.0.0.1"]
        );
    }

    #[test]
    fn duplicate_pod_rejected() {
        let text = format!(
            "{}---\n{}---\n{}",
            pod("web-1", "10.0.0.1"),
            pod("web-2", "10.0.0.2"),
            pod("web-1", "10.0.0.3")
        );
        assert_eq!(
            err(&text),
            "config.yaml: document 3 (Pod default/web-1): duplicate Pod default/web-1, first defined in document 1 (Pod default/web-1)"
        );
        // Inside a List too, and a missing namespace is `default`.
        let text = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-1}}\n",
            pod("web-1", "10.0.0.1").replace('\n', "\n  ")
        );
        assert!(
            err(&text).contains("duplicate Pod default/web-1, first defined in document 1 item 1")
        );
    }

    #[test]
    fn same_name_in_other_namespace_or_kind_is_not_a_duplicate() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: a}\n---
apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: b}\n---
apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: a}\n---
apiVersion: v1\nkind: Namespace\nmetadata: {name: web}\n---
apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: web, namespace: a}\n";
        assert!(load_str(text, "config.yaml").is_ok());
        let twice = "apiVersion: v1\nkind: Namespace\nmetadata: {name: web}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: web}\n";
        assert!(err(twice).contains("duplicate Namespace web"));
        let policies = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: default}\n";
        assert!(err(policies).contains("duplicate AuthorizationPolicy default/p"));
    }

    #[test]
    fn objects_without_name_are_rejected() {
        let cases = [
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {namespace: default}\n",
                "document 1 (Pod): metadata.name: missing",
            ),
            (
                "apiVersion: v1\nkind: Pod\nspec: {containers: []}\n",
                "document 1 (Pod): metadata.name: missing",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: \"\"}\n",
                "metadata.name: missing",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {}\n",
                "metadata.name: missing",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nspec: {}\n",
                "metadata: missing",
            ),
        ];
        for (text, want) in cases {
            let e = err(text);
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn netns_annotation_must_be_an_absolute_path() {
        let text = pod("web-1", "10.0.0.1").replace("/run/netns/web-1", "run/netns/web-1");
        assert_eq!(
            err(&text),
            "config.yaml: document 1 (Pod default/web-1): metadata.annotations[mesh-agent.io/netns]: must be an absolute path (e.g. /run/netns/NAME), got \"run/netns/web-1\""
        );
    }

    #[test]
    fn service_cluster_ips_must_parse_or_be_none() {
        let svc = |spec: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec: {spec}\n"
            )
        };
        let ok = [
            "{clusterIP: None}",
            "{clusterIP: 10.96.0.1}",
            "{clusterIPs: [10.96.0.1, \"fd00::1\"]}",
            "{}",
        ];
        for spec in ok {
            assert!(load_str(&svc(spec), "config.yaml").is_ok(), "{spec}");
        }
        let bad = [
            (
                "{clusterIP: 10.96.0.256}",
                "spec.clusterIP: invalid IP address \"10.96.0.256\"",
            ),
            (
                "{clusterIPs: [10.96.0.1, nope]}",
                "spec.clusterIPs[1]: invalid IP address \"nope\"",
            ),
        ];
        for (spec, want) in bad {
            assert_eq!(
                err(&svc(spec)),
                format!("config.yaml: document 1 (Service default/web): {want}")
            );
        }
    }

    #[test]
    fn missing_namespace_defaults_to_default() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: web-1}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: \"\"}\n";
        let objects = load_str(text, "config.yaml").unwrap();
        assert_eq!(
            objects.pods[0].metadata.namespace.as_deref(),
            Some("default")
        );
        assert_eq!(
            objects.services[0].metadata.namespace.as_deref(),
            Some("default")
        );
    }

    #[test]
    fn captured_local_pod_without_netns_error_names_document_and_annotation() {
        let bare = pod("web-2", "10.0.0.2").replace(
            "  annotations: {mesh-agent.io/netns: /run/netns/web-2}\n",
            "",
        );
        let text = format!("{NS_AMBIENT}---\n{}---\n{bare}", pod("web-1", "10.0.0.1"));
        let e = load_state(&text, "config.yaml", "node-a", &Settings::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "config.yaml: document 3 (Pod default/web-2): metadata.annotations[mesh-agent.io/netns]: missing"
            ),
            "{e}"
        );
        // The agent on another node does not enroll it, so does not need it.
        assert!(load_state(&text, "config.yaml", "node-b", &Settings::default()).is_ok());
    }

    // ---- the watcher -------------------------------------------------------------------

    /// A uniquely named file under the temp dir, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(test: &str, text: &str) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let name = format!(
                "mesh-agent-config-{}-{}-{test}.yaml",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            );
            let file = Self(std::env::temp_dir().join(name));
            file.write(text);
            file
        }

        /// Rewrites the file in place.
        fn write(&self, text: &str) {
            std::fs::write(&self.0, text).unwrap();
        }

        /// Replaces the file by rename, as editors and ConfigMap mounts do.
        fn replace(&self, text: &str) {
            let tmp = self.0.with_extension("yaml.tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &self.0).unwrap();
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    const POLL: Duration = Duration::from_millis(10);
    const SETTLE: Duration = Duration::from_millis(40);

    async fn start(file: &TempFile) -> Result<watch::Receiver<Arc<MeshState>>, ConfigError> {
        FileSource::new(&file.0, "node-a", Settings::default())
            .with_poll_interval(POLL)
            .with_settle(SETTLE)
            .start()
            .await
    }

    async fn next(rx: &mut watch::Receiver<Arc<MeshState>>) -> Arc<MeshState> {
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("no new state within 5s")
            .unwrap();
        rx.borrow_and_update().clone()
    }

    fn pod_names(state: &MeshState) -> Vec<&str> {
        state.workloads.iter().map(|w| w.name.as_str()).collect()
    }

    #[tokio::test]
    async fn initial_state_is_available_at_once() {
        let file = TempFile::new(
            "initial",
            &format!("{NS_AMBIENT}---\n{}", pod("web-1", "10.0.0.1")),
        );
        let rx = start(&file).await.unwrap();
        let state = rx.borrow().clone();
        assert_eq!(pod_names(&state), ["web-1"]);
        assert_eq!(state.local_captured("node-a").count(), 1);
    }

    #[tokio::test]
    async fn broken_initial_file_fails_start() {
        let file = TempFile::new(
            "broken-initial",
            &format!("{}---\nkind: Deployment\n", pod("web-1", "10.0.0.1")),
        );
        let e = start(&file).await.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: document 2", file.0.display())),
            "{e}"
        );
    }

    #[tokio::test]
    async fn missing_initial_file_fails_start() {
        let path = std::env::temp_dir().join(format!(
            "mesh-agent-config-{}-absent.yaml",
            std::process::id()
        ));
        let e = FileSource::new(&path, "node-a", Settings::default())
            .start()
            .await
            .unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        assert!(
            e.to_string()
                .starts_with(&format!("{}: cannot read: ", path.display())),
            "{e}"
        );
    }

    #[tokio::test]
    async fn added_pod_is_published() {
        let one = format!("{NS_AMBIENT}---\n{}", pod("web-1", "10.0.0.1"));
        let file = TempFile::new("added", &one);
        let mut rx = start(&file).await.unwrap();
        file.write(&format!("{one}---\n{}", pod("web-2", "10.0.0.2")));
        let state = next(&mut rx).await;
        assert_eq!(pod_names(&state), ["web-1", "web-2"]);
        assert_eq!(
            state
                .workload_by_ip("10.0.0.2".parse().unwrap())
                .unwrap()
                .name,
            "web-2"
        );
    }

    #[tokio::test]
    async fn file_replaced_by_rename_is_published() {
        let one = format!("{NS_AMBIENT}---\n{}", pod("web-1", "10.0.0.1"));
        let file = TempFile::new("renamed", &one);
        let mut rx = start(&file).await.unwrap();
        // Same length as before: only the inode (and times) tell the versions apart.
        file.replace(&one.replace("10.0.0.1", "10.0.0.7"));
        let state = next(&mut rx).await;
        assert_eq!(
            state.workloads[0].ips,
            ["10.0.0.7".parse::<std::net::IpAddr>().unwrap()]
        );
    }

    #[tokio::test]
    async fn broken_edit_keeps_previous_state() {
        let one = format!("{NS_AMBIENT}---\n{}", pod("web-1", "10.0.0.1"));
        let file = TempFile::new("broken-edit", &one);
        let mut rx = start(&file).await.unwrap();
        let before = rx.borrow_and_update().clone();

        let broken = [
            format!("{one}---\n{}", pod("web-2", "10.0.0.x")),
            format!("{one}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\n"),
            format!("{one}---\n{}", pod("web-1", "10.0.0.2")),
            format!("{one}---\nmetadata: [unclosed\n"),
        ];
        for text in &broken {
            file.write(text);
            tokio::time::sleep(SETTLE * 3).await;
            assert!(
                !rx.has_changed().unwrap(),
                "published a broken file:\n{text}"
            );
            assert_eq!(*rx.borrow(), before);
        }
        // A deleted file keeps the state too, and the watcher recovers when it is back.
        std::fs::remove_file(&file.0).unwrap();
        tokio::time::sleep(SETTLE * 3).await;
        assert!(!rx.has_changed().unwrap());

        file.write(&format!("{one}---\n{}", pod("web-2", "10.0.0.2")));
        let state = next(&mut rx).await;
        assert_eq!(pod_names(&state), ["web-1", "web-2"]);
    }

    #[tokio::test]
    async fn a_file_replaced_by_rename_is_applied_without_waiting_to_settle() {
        let one = format!("{NS_AMBIENT}---\n{}", pod("web-1", "10.0.0.1"));
        let file = TempFile::new("rename-now", &one);
        let mut rx = FileSource::new(&file.0, "node-a", Settings::default())
            .with_poll_interval(POLL)
            .with_settle(Duration::from_secs(30))
            .start()
            .await
            .unwrap();
        file.replace(&format!("{one}---\n{}", pod("web-2", "10.0.0.2")));
        let state = tokio::time::timeout(Duration::from_secs(2), rx.changed()).await;
        assert!(state.is_ok(), "a renamed file waited for the settle time");
        assert_eq!(pod_names(&rx.borrow_and_update()), ["web-1", "web-2"]);
        // Rewritten in place, the same file waits.
        file.write(&one);
        tokio::time::sleep(POLL * 20).await;
        assert!(!rx.has_changed().unwrap());
    }

    #[tokio::test]
    async fn a_file_rewritten_in_place_is_applied_only_once_it_settled() {
        let one = format!("{NS_AMBIENT}---\n{}", pod("web-1", "10.0.0.1"));
        let two = format!("{one}---\n{}", pod("web-2", "10.0.0.2"));
        let file = TempFile::new("settle", &two);
        let mut rx = start(&file).await.unwrap();
        rx.borrow_and_update();
        // Truncated, then half written, then complete: each version lives for less than
        // the settle time, so only the last one is read.
        for partial in ["", one.as_str()] {
            file.write(partial);
            tokio::time::sleep(SETTLE / 2).await;
        }
        file.write(&format!("{two}---\n{}", pod("web-3", "10.0.0.3")));
        let state = next(&mut rx).await;
        assert_eq!(pod_names(&state), ["web-1", "web-2", "web-3"]);
        // An emptied file stays refused however long it stays.
        let before = state;
        for empty in ["", "# all gone\n", "---\n"] {
            file.write(empty);
            tokio::time::sleep(SETTLE * 3).await;
            assert!(!rx.has_changed().unwrap(), "published {empty:?}");
            assert_eq!(*rx.borrow(), before);
        }
        // An explicit empty List is applied.
        file.write("apiVersion: v1\nkind: List\nitems: []\n");
        assert!(next(&mut rx).await.workloads.is_empty());
    }

    #[tokio::test]
    async fn unchanged_state_is_not_republished() {
        let one = format!("{NS_AMBIENT}---\n{}", pod("web-1", "10.0.0.1"));
        let file = TempFile::new("unchanged", &one);
        let mut rx = start(&file).await.unwrap();
        rx.borrow_and_update();
        file.replace(&format!(
            "# a comment changes the file, not the state\n{one}"
        ));
        tokio::time::sleep(SETTLE * 3).await;
        assert!(!rx.has_changed().unwrap());
    }

    #[tokio::test]
    async fn watcher_stops_when_receivers_are_dropped() {
        let file = TempFile::new("stops", &pod("web-1", "10.0.0.1"));
        let rx = start(&file).await.unwrap();
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        assert_eq!(tasks, 1);
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), async {
            while tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
                > 0
            {
                tokio::time::sleep(POLL).await;
            }
        })
        .await
        .expect("watcher task still alive after its receivers were dropped");
    }
}
