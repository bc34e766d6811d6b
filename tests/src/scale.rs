//! The scale scenario (mesh-bench's `scale` stage): one node's agent in Kubernetes mode
//! against the in-process API server holding a large cluster: `pods` pods on `nodes` other
//! nodes, `services` Services with their EndpointSlices, across `namespaces` namespaces
//! (half of them ambient), beside two real pods on the agent's node (a client and a
//! server in the ambient namespace `shop`). It measures what the cluster's size costs the
//! agent: its memory once synced (against the same agent with only the two real pods), how
//! long its first sync takes, and the time from a policy change at the API server to its
//! enforcement on real connections between the two pods.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::apiserver::ApiServer;
use crate::cluster::{Cluster, Node, PodSpec};

/// The server's port in the pod `web`.
const APP: u16 = 8080;
/// What the prober prints once it saw the state it was not waiting for.
pub const WATCHING: &str = "WATCHING";
/// What the prober prints (with microseconds since it began) when the state changed.
pub const CHANGED: &str = "CHANGED";

/// The size of the synthetic cluster.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    pub pods: usize,
    pub services: usize,
    pub nodes: usize,
    pub namespaces: usize,
    /// Policy changes timed (each applied, then removed: two enforcements).
    pub changes: usize,
}

/// What [`run`] measured.
#[derive(Debug, Default)]
pub struct Report {
    /// The agent's RSS with only the two real pods, and with the whole cluster, in MiB.
    pub rss_small_mib: f64,
    pub rss_mib: f64,
    /// The agent's highest RSS over the whole run with the cluster (its initial lists, the
    /// policy changes), in MiB.
    pub rss_peak_mib: f64,
    /// From the agent's start to its readiness: the initial lists applied, the node's pods
    /// enrolled.
    pub synced_after: Duration,
    /// From a policy change at the API server to the first connection it governs.
    pub enforced_after: Vec<Duration>,
}

/// Builds the cluster, runs the agent with `agent_flags`, measures; `probe` is the program
/// (and leading arguments) that runs `probe-policy` in a pod, e.g. `[mesh-bench]`.
pub fn run(size: Size, agent_flags: &[&str], probe: &[&str], settle: Duration) -> Result<Report> {
    let cluster = Cluster::builder()
        .nodes(1)
        .ambient_namespace("shop")
        .pod(
            PodSpec::new("a", "shop", 0)
                .label("app", "client")
                .service_account("client"),
        )
        .pod(
            PodSpec::new("web", "shop", 0)
                .label("app", "web")
                .service_account("web"),
        )
        .build()
        .context("building the scale cluster")?;
    let (a, web) = (cluster.pod("a"), cluster.pod("web"));
    web.spawn_server(&[APP])?;
    // Every pod needs a process for /proc discovery, as a sandbox's pause process would be.
    a.spawn_server(&[9999])?;
    let node = cluster.node(0);
    let api = ApiServer::start_in(node.netns_path())?;
    let kubeconfig = api.write_kubeconfig(cluster.workdir())?;
    api.apply(namespace("shop", true))?;
    for pod in [&a, &web] {
        api.apply(pod.kube_object())?;
    }
    let mut report = Report::default();

    node.spawn_agent_kube(&kubeconfig, agent_flags)?;
    wait_synced(node, &kubeconfig, Duration::from_secs(60))?;
    std::thread::sleep(settle);
    report.rss_small_mib = rss_mib(node)?;
    node.stop_agent()?;

    let started = Instant::now();
    populate(&api, size)?;
    println!(
        "  {} pods, {} services (+ EndpointSlices), {} namespaces written to the API server in {:.1?}",
        size.pods,
        size.services,
        size.namespaces,
        started.elapsed()
    );
    let started = Instant::now();
    node.spawn_agent_kube(&kubeconfig, agent_flags)?;
    // Ready once the initial lists are applied and the node's pods enrolled.
    node.wait_agent_ready(Duration::from_secs(300))?;
    report.synced_after = started.elapsed();
    // And its view is the server's, kind by kind.
    wait_synced(node, &kubeconfig, Duration::from_secs(120))?;
    std::thread::sleep(settle);
    report.rss_mib = rss_mib(node)?;

    let to = web.addr_v4(APP);
    for _ in 0..size.changes {
        for deny in [true, false] {
            let to = to.to_string();
            let until = if deny { "denied" } else { "allowed" };
            let args = [probe, &["probe-policy", "--to", &to, "--until", until][..]].concat();
            let prober = a.spawn(&args)?;
            prober.wait_for_line(WATCHING, Duration::from_secs(30))?;
            let t0 = Instant::now();
            if deny {
                api.apply(deny_shop())?;
            } else {
                api.delete(
                    mesh_agent::config::Kind::AuthorizationPolicy,
                    Some("shop"),
                    "deny-shop",
                )?;
            }
            let at = prober.wait_exit_after(CHANGED, Duration::from_secs(60))?;
            report.enforced_after.push(at - t0);
        }
    }
    let agent = node.agent().context("no agent")?;
    report.rss_peak_mib = crate::bench::peak_rss_kib(agent.pid())? as f64 / 1024.0;
    cluster
        .teardown()
        .context("tearing the scale cluster down")?;
    Ok(report)
}

/// Writes the synthetic cluster: namespaces `ns-K` (even ones ambient), Services `svc-J`
/// (ClusterIP 10.96.0.0/16, selector `app: svc-J`) each with an EndpointSlice of its
/// pods, and pods `p-I` on nodes `scale-N` (10.128.0.0/9), labelled for service I mod
/// services.
fn populate(api: &ApiServer, size: Size) -> Result<()> {
    for object in cluster_objects(size) {
        api.apply(object)?;
    }
    Ok(())
}

/// The synthetic cluster's objects, as [`populate`] writes them.
fn cluster_objects(size: Size) -> impl Iterator<Item = Value> {
    let pod_ip = |i: usize| Ipv4Addr::from(0x0a80_0000u32 + i as u32);
    let namespaces = (0..size.namespaces).map(|k| namespace(&format!("ns-{k}"), k % 2 == 0));
    let pods = (0..size.pods).map(move |i| {
        let svc = i % size.services;
        let ns = svc % size.namespaces;
        let ip = pod_ip(i).to_string();
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("p-{i}"), "namespace": format!("ns-{ns}"),
                         "labels": {"app": format!("svc-{svc}"), "version": "v1"}},
            "spec": {"nodeName": format!("scale-{}", i % size.nodes),
                     "serviceAccountName": format!("sa-{svc}"),
                     "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "conditions": [{"type": "Ready", "status": "True"}]},
        })
    });
    let services = (0..size.services).flat_map(move |j| {
        let ns = format!("ns-{}", j % size.namespaces);
        let name = format!("svc-{j}");
        let ip = Ipv4Addr::from(0x0a60_0000u32 + j as u32);
        let endpoints: Vec<Value> = (j..size.pods)
            .step_by(size.services)
            .map(|i| {
                json!({"addresses": [pod_ip(i).to_string()], "conditions": {"ready": true},
                       "nodeName": format!("scale-{}", i % size.nodes)})
            })
            .collect();
        [
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"clusterIP": ip.to_string(), "selector": {"app": name},
                         "ports": [{"name": "http", "port": 80, "targetPort": APP}]},
            }),
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-abc"), "namespace": ns,
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": APP}],
                "endpoints": endpoints,
            }),
        ]
    });
    namespaces.chain(pods).chain(services)
}

/// What the synthetic cluster costs on the heap, counted in this process with the agent's
/// own types and translation (needs [`crate::heap::Counting`] installed).
#[derive(Debug, Default)]
pub struct Heap {
    /// The objects as the sources keep them.
    pub objects_mib: f64,
    /// The state translated from them, beside the objects.
    pub state_mib: f64,
    /// The most live during the translation, above the objects.
    pub translate_peak_mib: f64,
}

/// Counts what the synthetic cluster's objects, and the state translated from them for a node
/// without any of their pods, cost on the heap.
pub fn heap(size: Size) -> Result<Heap> {
    use crate::heap;
    use k8s_openapi::api::core::v1 as core;
    use mesh_agent::config::{EndpointSlice, Objects, Pod, Settings, translate};
    if !heap::installed() {
        bail!("no counting allocator installed: heap figures would read 0");
    }
    const MIB: f64 = 1024.0 * 1024.0;
    let base = heap::live();
    let mut objects = Objects::default();
    for object in cluster_objects(size) {
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        match kind.as_str() {
            "Namespace" => objects
                .namespaces
                .push(serde_json::from_value::<core::Namespace>(object)?.into()),
            "Pod" => objects
                .pods
                .push(serde_json::from_value::<Pod>(object)?.into()),
            "Service" => objects
                .services
                .push(serde_json::from_value::<core::Service>(object)?.into()),
            "EndpointSlice" => objects
                .endpoint_slices
                .push(serde_json::from_value::<EndpointSlice>(object)?.into()),
            other => bail!("the scale cluster has no {other}"),
        }
    }
    let with_objects = heap::live();
    heap::reset_peak();
    let state = translate::translate(
        &objects,
        "heap-count",
        translate::NetnsSource::Discovered,
        &Settings::default(),
    )?;
    let (with_state, peak) = (heap::live(), heap::peak());
    let workloads = state.workloads.len();
    drop((state, objects));
    anyhow::ensure!(
        workloads == size.pods,
        "{workloads} workloads of {} pods",
        size.pods
    );
    Ok(Heap {
        objects_mib: (with_objects - base) as f64 / MIB,
        state_mib: (with_state - with_objects) as f64 / MIB,
        translate_peak_mib: (peak - with_objects) as f64 / MIB,
    })
}

fn namespace(name: &str, ambient: bool) -> Value {
    let labels = if ambient {
        json!({"istio.io/dataplane-mode": "ambient"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// DENY everything from namespace `shop` to the pod `web`.
fn deny_shop() -> Value {
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-shop", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
                 "rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]},
    })
}

fn rss_mib(node: &Node) -> Result<f64> {
    let agent = node.agent().context("no agent")?;
    Ok(crate::bench::rss_kib(agent.pid())? as f64 / 1024.0)
}

/// Until `mesh-agent status` finds the agent SYNCED with the API server.
fn wait_synced(node: &Node, kubeconfig: &std::path::Path, timeout: Duration) -> Result<()> {
    let kubeconfig = kubeconfig.to_str().context("a UTF-8 path")?;
    let deadline = Instant::now() + timeout;
    loop {
        let out = node.mesh_agent(&["status", "--kubeconfig", kubeconfig]);
        if out.status.success() {
            return Ok(());
        }
        if let Some(status) = node.agent().and_then(|a| a.try_wait()) {
            bail!("the agent exited ({status}) before it synced");
        }
        if Instant::now() > deadline {
            bail!(
                "not synced after {timeout:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// In a pod: connects to the echo server `to` every `interval`, prints [`WATCHING`] once a
/// connection went the other way than `until_denied` says, and exits 0 (printing
/// [`CHANGED`]) at the first that goes that way: denied (the exchange fails) or allowed (it
/// completes).
pub fn probe_policy(
    to: SocketAddr,
    until_denied: bool,
    interval: Duration,
    timeout: Duration,
) -> Result<()> {
    let start = Instant::now();
    let mut watching = false;
    loop {
        let denied = crate::workload::short_exchange(to, Duration::from_millis(500)).is_err();
        if denied == until_denied {
            if watching {
                println!("{CHANGED} {}", start.elapsed().as_micros());
                return Ok(());
            }
        } else if !watching {
            println!("{WATCHING}");
            watching = true;
        }
        if start.elapsed() > timeout {
            bail!("connections to {to} did not change within {timeout:?}");
        }
        std::thread::sleep(interval);
    }
}
