//! The Kubernetes config source against an in-process API server
//! ([`tests::apiserver`]) through kube-rs's real client and watchers: the same
//! state as the file source for the same objects, live namespace opt-in, recovery from closed
//! streams, `410 Gone` and an unreachable API server without losing an update, absent Istio
//! CRDs, readiness only after the initial lists, and the redirection annotation. No root, no
//! cluster.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_agent::config::file::{self, FileSource};
use mesh_agent::config::kube::{KubeSource, REDIRECTION_ANNOTATION, annotate_pod};
use mesh_agent::config::translate::{self, NetnsSource};
use mesh_agent::config::{Kind, Settings};
use mesh_agent::state::MeshState;
use serde_json::{Value, json};
use tests::apiserver::ApiServer;
use tokio::sync::watch;
use tokio::time::Instant;

const NODE: &str = "node-a";
/// The bound for a namespace label flip to show in the state.
const LABEL_FLIP: Duration = Duration::from_secs(2);
/// Recovery after an outage: the watchers retry at most 4 s apart, then list.
const RECOVERY: Duration = Duration::from_secs(5);

// ---- objects -------------------------------------------------------------------------

fn namespace(name: &str, mode: Option<&str>) -> Value {
    let mut ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    if let Some(mode) = mode {
        ns["metadata"]["labels"] = json!({ "istio.io/dataplane-mode": mode });
    }
    ns
}

/// A running pod with container port `http` 8080.
fn pod(ns: &str, name: &str, node: &str, ips: &[&str]) -> Value {
    let app = name.split('-').next().unwrap_or(name);
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
        "spec": {
            "nodeName": node,
            "serviceAccountName": format!("{app}-sa"),
            "containers": [{
                "name": "app",
                "image": "registry.example/app:1",
                "env": [{"name": "MODE", "value": "prod"}],
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
            }],
        },
        "status": {
            "phase": "Running",
            "podIP": ips[0],
            "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
            "hostIP": "192.168.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "app", "image": "app:1", "imageID": "sha256:1",
                                   "ready": true, "restartCount": 0}],
        },
    })
}

fn service(ns: &str, name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "selector": {"app": name},
            "ports": [
                {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                {"name": "metrics", "port": 9090},
            ],
        },
    })
}

fn endpoint_slice(ns: &str, service: &str, endpoints: &[(&str, bool)]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-abcde"),
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": endpoints.iter().map(|(ip, ready)| json!({
            "addresses": [ip],
            "conditions": {"ready": ready, "serving": ready, "terminating": false},
            "nodeName": NODE,
        })).collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

fn authorization_policy(ns: &str, name: &str, action: &str) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "action": action,
            "selector": {"matchLabels": {"app": "web"}},
            "rules": [{
                "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client-sa"]}}],
                "to": [{"operation": {"ports": ["8080"]}}],
            }],
        },
    })
}

fn peer_authentication(ns: &str, mode: &str) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": ns},
        "spec": {"mtls": {"mode": mode}},
    })
}

/// Every kind, with the cases the translation cares about: an ambient and a plain namespace,
/// dual-stack, remote, opted-out and host-network pods, a named target port, ready and
/// unready endpoints, both policy kinds (one in the root namespace). The objects carry
/// `managedFields` and a `last-applied-configuration`, as objects made by `kubectl apply` do.
/// With `netns`, the captured pod on this node carries the file-mode netns annotation.
fn world(netns: bool) -> Vec<Value> {
    let mut web1 = pod("shop", "web-1", NODE, &["10.0.0.1", "fd00::1"]);
    if netns {
        web1["metadata"]["annotations"] = json!({"mesh-agent.io/netns": "/run/netns/web-1"});
    }
    let mut opted_out = pod("shop", "batch-1", NODE, &["10.0.0.3"]);
    opted_out["metadata"]["labels"]["istio.io/dataplane-mode"] = "none".into();
    let mut host = pod("shop", "agent-1", NODE, &["192.168.0.1"]);
    host["spec"]["hostNetwork"] = true.into();
    let mut objects = vec![
        namespace("shop", Some("ambient")),
        namespace("plain", None),
        namespace("istio-system", None),
        web1,
        pod("shop", "web-2", "node-b", &["10.0.1.2"]),
        opted_out,
        host,
        pod("plain", "db-1", NODE, &["10.0.0.9"]),
        service("shop", "web", "10.96.0.10"),
        service("plain", "db", "None"),
        endpoint_slice("shop", "web", &[("10.0.0.1", true), ("10.0.1.2", false)]),
        authorization_policy("shop", "allow-client", "ALLOW"),
        authorization_policy("istio-system", "deny-nothing", "DENY"),
        peer_authentication("istio-system", "STRICT"),
    ];
    for object in &mut objects {
        object["metadata"]["managedFields"] = json!([{
            "manager": "kubectl-client-side-apply",
            "operation": "Update",
            "apiVersion": object["apiVersion"].clone(),
            "time": "2025-01-01T00:00:00Z",
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {}},
        }]);
        let last = serde_json::to_string(object).unwrap();
        let annotations = object["metadata"]
            .as_object_mut()
            .unwrap()
            .entry("annotations")
            .or_insert_with(|| json!({}));
        annotations["kubectl.kubernetes.io/last-applied-configuration"] = last.into();
    }
    objects
}

fn apply_all(server: &ApiServer, objects: &[Value]) -> anyhow::Result<()> {
    for object in objects {
        server.apply(object)?;
    }
    Ok(())
}

/// What `kubectl get namespaces,pods,services,endpointslices,authorizationpolicies,
/// peerauthentications -A -o yaml` prints for the server's objects: a `List` of them as
/// stored (resourceVersion, uid, creationTimestamp), without `managedFields`.
fn kubectl_get_yaml(server: &ApiServer) -> anyhow::Result<String> {
    let items: Vec<Value> = server
        .objects()
        .into_iter()
        .map(|mut o| {
            o["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("managedFields");
            o
        })
        .collect();
    let list = json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items});
    Ok(serde_yaml_ng::to_string(&list)?)
}

// ---- helpers -------------------------------------------------------------------------

async fn start(server: &ApiServer) -> anyhow::Result<watch::Receiver<Arc<MeshState>>> {
    let rx = KubeSource::new(server.client()?, NODE, Settings::default())
        .with_initial_sync_timeout(Duration::from_secs(10))
        .start()
        .await?;
    Ok(rx)
}

fn captured(state: &MeshState) -> Vec<String> {
    state
        .workloads
        .iter()
        .filter(|w| w.captured)
        .map(|w| format!("{}/{}", w.namespace, w.name))
        .collect()
}

fn workloads(state: &MeshState) -> Vec<String> {
    state
        .workloads
        .iter()
        .map(|w| format!("{}/{}", w.namespace, w.name))
        .collect()
}

/// Waits until the published state satisfies `pred`.
async fn wait_for(
    rx: &mut watch::Receiver<Arc<MeshState>>,
    within: Duration,
    what: &str,
    pred: impl Fn(&MeshState) -> bool,
) -> anyhow::Result<Arc<MeshState>> {
    let deadline = Instant::now() + within;
    loop {
        let state = rx.borrow_and_update().clone();
        if pred(&state) {
            return Ok(state);
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            bail!(
                "{what}: not within {within:?}; last state: workloads {:?}, captured {:?}",
                workloads(&state),
                captured(&state)
            );
        }
    }
}

/// A uniquely named file under the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(test: &str, text: &str) -> anyhow::Result<Self> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "mesh-agent-kube-source-{}-{}-{test}.yaml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn count(server: &ApiServer, f: impl Fn(&tests::apiserver::RecordedRequest) -> bool) -> usize {
    server.requests().iter().filter(|r| f(r)).count()
}

// ---- (a) same objects, same state ---------------------------------------------------------

/// The whole pipelines, file mode's rules included: the captured pod on this node carries
/// the netns annotation (optional in kube mode, required in file mode), so both sources run
/// unchanged on the same objects and the full states, netns field included, must be equal.
#[tokio::test]
async fn file_and_kube_sources_yield_identical_state() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    apply_all(&server, &world(true))?;
    let kube = start(&server).await?.borrow().clone();

    let file = TempFile::new("identical", &kubectl_get_yaml(&server)?)?;
    let from_file = FileSource::new(&file.0, NODE, Settings::default())
        .start()
        .await?
        .borrow()
        .clone();

    assert_eq!(
        serde_json::to_string_pretty(&*kube)?,
        serde_json::to_string_pretty(&*from_file)?
    );
    assert_eq!(kube, from_file);
    // And the state is the interesting one, not two empty ones.
    assert_eq!(captured(&kube), ["shop/web-1", "shop/web-2"]);
    assert_eq!(kube.local_captured(NODE).count(), 1);
    assert_eq!(kube.workloads.len(), 5);
    assert_eq!(kube.services.len(), 2);
    assert_eq!(kube.raw.endpoint_slices.len(), 1);
    assert_eq!(kube.raw.authorization_policies.len(), 2);
    assert_eq!(kube.raw.peer_authentications.len(), 1);
    // managedFields are dropped by both (kubectl hides them, the kube source strips them).
    assert!(
        kube.raw.endpoint_slices[0]
            .metadata
            .managed_fields
            .is_none()
    );
    assert_eq!(
        kube.raw.authorization_policies[0]["metadata"]["resourceVersion"],
        server
            .get(
                Kind::AuthorizationPolicy,
                Some("istio-system"),
                "deny-nothing"
            )
            .unwrap()["metadata"]["resourceVersion"]
    );
    Ok(())
}

/// Kube-mode pods have no netns annotation, which file mode refuses for a captured pod on its
/// node; so the file's objects go through the file parser and the shared translation with
/// the kube-mode rule (`NetnsSource::Discovered`), which is the only difference.
#[tokio::test]
async fn file_pipeline_with_discovered_netns_equals_kube_source() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    apply_all(&server, &world(false))?;
    let kube = start(&server).await?.borrow().clone();

    let yaml = kubectl_get_yaml(&server)?;
    let e = file::load_state(&yaml, "cluster.yaml", NODE, &Settings::default()).unwrap_err();
    assert!(e.to_string().contains("mesh-agent.io/netns"), "{e}");

    let objects = file::load_str(&yaml, "cluster.yaml")?;
    let from_file = translate::translate(
        &objects,
        NODE,
        NetnsSource::Discovered,
        &Settings::default(),
    )?;
    assert_eq!(
        serde_json::to_string_pretty(&*kube)?,
        serde_json::to_string_pretty(&from_file)?
    );
    assert_eq!(kube.local_captured(NODE).count(), 1);
    assert!(kube.workloads.iter().all(|w| w.netns.is_none()));
    Ok(())
}

// ---- (b) live opt-in -------------------------------------------------------------------

#[tokio::test]
async fn namespace_label_enrolls_and_releases_running_pods() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let mut opted_out = pod("shop", "batch-1", NODE, &["10.0.0.3"]);
    opted_out["metadata"]["labels"]["istio.io/dataplane-mode"] = "none".into();
    let mut host = pod("shop", "agent-1", NODE, &["192.168.0.1"]);
    host["spec"]["hostNetwork"] = true.into();
    apply_all(
        &server,
        &[
            namespace("shop", None),
            pod("shop", "web-1", NODE, &["10.0.0.1"]),
            pod("shop", "web-2", "node-b", &["10.0.1.2"]),
            opted_out,
            host,
        ],
    )?;
    let mut rx = start(&server).await?;
    assert!(captured(&rx.borrow_and_update()).is_empty());

    let t = Instant::now();
    server.apply(namespace("shop", Some("ambient")))?;
    let state = wait_for(&mut rx, LABEL_FLIP, "enrolled", |s| captured(s).len() == 2).await?;
    assert_eq!(captured(&state), ["shop/web-1", "shop/web-2"]);
    println!("enrolled after {:?}", t.elapsed());

    // A pod started in the labelled namespace is enrolled too.
    server.apply(pod("shop", "web-3", NODE, &["10.0.0.4"]))?;
    wait_for(&mut rx, LABEL_FLIP, "new pod enrolled", |s| {
        captured(s).contains(&"shop/web-3".to_owned())
    })
    .await?;

    let t = Instant::now();
    server.apply(namespace("shop", None))?;
    wait_for(&mut rx, LABEL_FLIP, "released", |s| captured(s).is_empty()).await?;
    println!("released after {:?}", t.elapsed());
    Ok(())
}

// ---- (c) watch interruption -------------------------------------------------------------

#[tokio::test]
async fn closed_watch_streams_resume_without_losing_an_update() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    apply_all(
        &server,
        &[
            namespace("shop", Some("ambient")),
            pod("shop", "web-1", NODE, &["10.0.0.1"]),
        ],
    )?;
    let mut rx = start(&server).await?;
    let watches_before = count(&server, |r| r.is_watch_of(Kind::Pod));

    for round in 2..5 {
        server.close_watches();
        let name = format!("web-{round}");
        server.apply(pod("shop", &name, NODE, &[&format!("10.0.0.{round}")]))?;
        wait_for(
            &mut rx,
            RECOVERY,
            &format!("{name} after a closed stream"),
            |s| workloads(s).contains(&format!("shop/{name}")),
        )
        .await?;
    }
    // Resumed by re-watching from the last resourceVersion, not by re-listing.
    assert!(count(&server, |r| r.is_watch_of(Kind::Pod)) > watches_before);
    assert_eq!(count(&server, |r| r.is_list_of(Kind::Pod)), 1);
    Ok(())
}

#[tokio::test]
async fn gone_resource_version_relists() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    apply_all(
        &server,
        &[
            namespace("shop", Some("ambient")),
            pod("shop", "web-1", NODE, &["10.0.0.1"]),
        ],
    )?;
    let mut rx = start(&server).await?;
    assert_eq!(count(&server, |r| r.is_list_of(Kind::Pod)), 1);

    server.expire_resource_versions();
    server.close_watches();
    server.apply(pod("shop", "web-2", NODE, &["10.0.0.2"]))?;
    wait_for(&mut rx, RECOVERY, "web-2 after 410 Gone", |s| {
        workloads(s).contains(&"shop/web-2".to_owned())
    })
    .await?;
    // Every kind's re-watch got 410 and re-listed.
    for kind in [
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
    ] {
        assert!(
            count(&server, |r| r.is_watch_of(kind) && r.gone) >= 1,
            "{kind}'s watch did not get 410"
        );
        assert!(
            count(&server, |r| r.is_list_of(kind)) >= 2,
            "{kind} was not re-listed"
        );
    }
    Ok(())
}

/// The API server goes away; meanwhile a pod is deleted, another created, the namespace
/// released from ambient, and history is compacted past the agent's resourceVersion. The
/// agent keeps its last state while disconnected and, once back, relists and converges:
/// nothing made during the gap is lost, deletions included.
#[tokio::test]
async fn updates_during_an_outage_and_compaction_are_not_lost() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    apply_all(
        &server,
        &[
            namespace("shop", Some("ambient")),
            pod("shop", "web-1", NODE, &["10.0.0.1"]),
            pod("shop", "web-2", NODE, &["10.0.0.2"]),
        ],
    )?;
    let mut rx = start(&server).await?;
    let before = rx.borrow_and_update().clone();
    assert_eq!(captured(&before), ["shop/web-1", "shop/web-2"]);

    server.set_available(false);
    server.delete(Kind::Pod, Some("shop"), "web-1")?;
    server.apply(pod("shop", "web-3", NODE, &["10.0.0.3"]))?;
    let mut plain = namespace("shop", None);
    plain["metadata"]["labels"] = json!({"team": "a"});
    server.apply(plain)?;
    server.expire_resource_versions();

    // Disconnected: the last state stays.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !rx.has_changed()?,
        "a state was published while disconnected"
    );
    assert_eq!(*rx.borrow(), before);

    server.set_available(true);
    let state = wait_for(&mut rx, RECOVERY, "converged after the outage", |s| {
        workloads(s) == ["shop/web-2", "shop/web-3"] && captured(s).is_empty()
    })
    .await?;
    assert!(state.workload_by_ip("10.0.0.1".parse()?).is_none());
    assert!(
        server.requests().iter().any(|r| r.status == 503),
        "the outage was not seen"
    );
    assert!(
        count(&server, |r| r.is_watch_of(Kind::Pod) && r.gone) >= 1,
        "the compaction was not seen"
    );
    assert!(count(&server, |r| r.is_list_of(Kind::Pod) && r.status == 200) >= 2);
    Ok(())
}

/// A restarted API server: down long enough for any backoff to grow, back with every
/// resourceVersion forgotten (410 Gone). A policy created right after it is back must be in
/// the state within 5 s (a backoff of up to 30 s, re-applied on the 410, took 26-55 s).
#[tokio::test]
async fn a_change_right_after_an_api_server_restart_applies_within_5s() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    apply_all(
        &server,
        &[
            namespace("shop", Some("ambient")),
            pod("shop", "web-1", NODE, &["10.0.0.1"]),
        ],
    )?;
    let mut rx = start(&server).await?;
    rx.borrow_and_update();
    server.set_available(false);
    tokio::time::sleep(Duration::from_secs(15)).await;
    server.expire_resource_versions();
    server.set_available(true);
    server.apply(authorization_policy("shop", "after-restart", "DENY"))?;
    let applied = Instant::now();
    wait_for(
        &mut rx,
        Duration::from_secs(5),
        "the policy after the restart",
        |s| s.raw.authorization_policies.len() == 1,
    )
    .await?;
    println!(
        "applied {:?} after the API server came back",
        applied.elapsed()
    );
    Ok(())
}

// ---- (d) absent CRDs -----------------------------------------------------------------------

#[tokio::test]
async fn absent_istio_crds_are_not_an_error() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    server.set_absent(Kind::AuthorizationPolicy, true);
    server.set_absent(Kind::PeerAuthentication, true);
    apply_all(
        &server,
        &[
            namespace("shop", Some("ambient")),
            pod("shop", "web-1", NODE, &["10.0.0.1"]),
        ],
    )?;
    let mut rx = start(&server).await?;
    let state = rx.borrow_and_update().clone();
    assert_eq!(captured(&state), ["shop/web-1"]);
    assert!(state.raw.authorization_policies.is_empty());
    assert!(state.raw.peer_authentications.is_empty());
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.is_list_of(Kind::AuthorizationPolicy) && r.status == 404)
    );

    // The rest keeps working...
    server.apply(pod("shop", "web-2", NODE, &["10.0.0.2"]))?;
    wait_for(&mut rx, LABEL_FLIP, "web-2 without CRDs", |s| {
        captured(s).len() == 2
    })
    .await?;

    // ...and a CRD installed later is picked up on a retry.
    server.set_absent(Kind::AuthorizationPolicy, false);
    server.apply(authorization_policy("shop", "allow-client", "ALLOW"))?;
    let state = wait_for(
        &mut rx,
        Duration::from_secs(40),
        "policy after CRD install",
        |s| s.raw.authorization_policies.len() == 1,
    )
    .await?;
    assert_eq!(
        state.raw.authorization_policies[0]["spec"]["action"],
        "ALLOW"
    );
    Ok(())
}

// ---- (e) readiness ---------------------------------------------------------------------------

#[tokio::test]
async fn start_returns_only_after_the_initial_lists() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    apply_all(&server, &world(false))?;
    server.hold_lists(true);
    let source = KubeSource::new(server.client()?, NODE, Settings::default());
    let started = tokio::spawn(source.start());

    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !started.is_finished(),
        "start() returned before the lists completed"
    );
    // The watchers asked (and wait for the answers).
    assert!(server.requests().is_empty(), "{:?}", server.requests());

    server.hold_lists(false);
    let rx = tokio::time::timeout(Duration::from_secs(5), started)
        .await
        .context("start() did not return after the lists")???;
    // What it returns is the listed state, not an empty one.
    let state = rx.borrow().clone();
    assert_eq!(state.workloads.len(), 5);
    assert_eq!(state.raw.authorization_policies.len(), 2);
    assert_eq!(state.raw.peer_authentications.len(), 1);
    for kind in [
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
    ] {
        assert_eq!(
            count(&server, |r| r.is_list_of(kind) && r.status == 200),
            1,
            "{kind}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn start_fails_when_the_lists_do_not_complete_in_time() -> anyhow::Result<()> {
    // Lists never answered.
    let server = ApiServer::start().await?;
    server.hold_lists(true);
    let e = KubeSource::new(server.client()?, NODE, Settings::default())
        .with_initial_sync_timeout(Duration::from_millis(500))
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("initial lists not complete after 500ms"), "{e}");
    assert!(e.contains("Pod (no answer yet)"), "{e}");

    // The API server answers with errors: the error says which.
    let server = ApiServer::start().await?;
    server.set_available(false);
    let e = KubeSource::new(server.client()?, NODE, Settings::default())
        .with_initial_sync_timeout(Duration::from_millis(1500))
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("Namespace (last error:"), "{e}");
    assert!(e.contains("unavailable"), "{e}");
    Ok(())
}

// ---- the redirection annotation ----------------------------------------------------------------

#[tokio::test]
async fn redirection_annotation_is_set_and_removed_with_merge_patches() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    apply_all(
        &server,
        &[
            namespace("shop", Some("ambient")),
            pod("shop", "web-1", NODE, &["10.0.0.1"]),
        ],
    )?;
    let mut rx = start(&server).await?;
    rx.borrow_and_update();
    let client = server.client()?;
    let annotation = |server: &ApiServer| {
        server.get(Kind::Pod, Some("shop"), "web-1").unwrap()["metadata"]["annotations"]
            [REDIRECTION_ANNOTATION]
            .clone()
    };

    annotate_pod(&client, "shop", "web-1", true).await?;
    assert_eq!(annotation(&server), "enabled");
    annotate_pod(&client, "shop", "web-1", false).await?;
    assert_eq!(annotation(&server), Value::Null);

    let patches = server.patches();
    assert_eq!(patches.len(), 2);
    for p in &patches {
        assert_eq!(p.content_type, "application/merge-patch+json");
        assert_eq!(
            (p.kind, p.namespace.as_str(), p.name.as_str()),
            (Kind::Pod, "shop", "web-1")
        );
    }
    assert_eq!(
        patches[0].patch,
        json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: "enabled"}}})
    );
    assert_eq!(
        patches[1].patch,
        json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: null}}})
    );

    // The source saw the pod change, but the state did not change: nothing republished.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!rx.has_changed()?);

    let e = annotate_pod(&client, "shop", "nope", true)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("pods \"nope\" not found"), "{e}");
    Ok(())
}

// ---- an ingress gateway's Secrets ----------------------------------------------------------

const TLS: &str = "kubernetes.io/tls";

fn secret(ns: &str, name: &str, type_: &str, data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            // What `kubectl apply` leaves: the whole object, data included.
            annotations: Some(
                [(
                    "kubectl.kubernetes.io/last-applied-configuration".to_owned(),
                    format!("{{\"data\": {data:?}}}"),
                )]
                .into(),
            ),
            ..Default::default()
        },
        type_: Some(type_.into()),
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

/// An ingress gateway's source reads the `kubernetes.io/tls` Secrets of its own namespace and
/// follows their replacement; a node agent's never asks for a Secret; a broken one is left out
/// with the rest kept.
#[tokio::test]
async fn a_gateways_source_follows_the_tls_secrets_of_its_namespace_only() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    apply_all(
        &server,
        &[namespace("istio-system", None), namespace("shop", None)],
    )?;
    for s in [
        secret(
            "istio-system",
            "cert",
            TLS,
            &[("tls.crt", "CERT-1"), ("tls.key", "KEY-1")],
        ),
        secret(
            "istio-system",
            "token",
            "Opaque",
            &[("token", "not for us")],
        ),
        secret(
            "shop",
            "cert",
            TLS,
            &[("tls.crt", "SHOP"), ("tls.key", "SHOP")],
        ),
    ] {
        server.apply(s)?;
    }
    let agent = start(&server).await?;
    assert!(agent.borrow().raw.tls_secrets.is_empty());
    assert_eq!(count(&server, |r| r.path.contains("/secrets")), 0);

    let mut rx = KubeSource::new(server.client()?, "gateway", Settings::default())
        .with_secrets_in("istio-system")
        .with_initial_sync_timeout(Duration::from_secs(10))
        .start()
        .await?;
    let names = |s: &MeshState| -> Vec<String> {
        s.raw
            .tls_secrets
            .keys()
            .map(|(ns, name)| format!("{ns}/{name}"))
            .collect()
    };
    let cert = |s: &MeshState| {
        s.raw
            .tls_secrets
            .get(&("istio-system".to_owned(), "cert".to_owned()))
            .map(|t| String::from_utf8_lossy(&t.cert_pem).into_owned())
    };
    let state = rx.borrow_and_update().clone();
    assert_eq!(names(&state), ["istio-system/cert"]);
    assert_eq!(cert(&state).as_deref(), Some("CERT-1"));
    let secret_requests: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/secrets"))
        .collect();
    assert!(!secret_requests.is_empty());
    for r in &secret_requests {
        assert_eq!(r.path, "/api/v1/namespaces/istio-system/secrets", "{r:?}");
    }

    // Replaced: the new certificate, without a restart.
    server.apply(secret(
        "istio-system",
        "cert",
        TLS,
        &[("tls.crt", "CERT-2"), ("tls.key", "KEY-2")],
    ))?;
    wait_for(&mut rx, LABEL_FLIP, "the replaced certificate", |s| {
        cert(s).as_deref() == Some("CERT-2")
    })
    .await?;

    // A TLS Secret without its key is left out; the others stay, a new one arrives.
    server.apply(secret("istio-system", "broken", TLS, &[("tls.crt", "X")]))?;
    server.apply(secret(
        "istio-system",
        "other",
        TLS,
        &[("tls.crt", "OTHER"), ("tls.key", "OTHER")],
    ))?;
    let state = wait_for(&mut rx, LABEL_FLIP, "the new Secret", |s| {
        names(s).contains(&"istio-system/other".to_owned())
    })
    .await?;
    assert_eq!(names(&state), ["istio-system/cert", "istio-system/other"]);
    assert_eq!(cert(&state).as_deref(), Some("CERT-2"));

    // Deleted: gone from the state.
    server.delete(Kind::Secret, Some("istio-system"), "cert")?;
    wait_for(&mut rx, LABEL_FLIP, "the deleted Secret", |s| {
        cert(s).is_none()
    })
    .await?;
    Ok(())
}
