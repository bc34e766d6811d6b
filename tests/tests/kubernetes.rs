//! Kernel suite for the Kubernetes issue: an agent fed by the kube source (kube-rs against
//! an in-process API server) enrolls and releases running pods as their namespace's label
//! flips, finding their network namespaces from /proc, and annotates them; service
//! ClusterIP traffic reaches only ready endpoints, spread across them.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use tests::apiserver::ApiServer;
use tests::metrics::Metrics;
use tests::{Cluster, ConfigOptions, ConnectReport, Pod, PodSpec, eventually, require_root};

const APP: u16 = 8080;
const OPENED: &str = "istio_tcp_connections_opened_total";

fn captured(r: &ConnectReport) -> bool {
    r.ok && r.local.is_some_and(|a| a.ip().is_loopback())
}

/// `mesh-agent status --kubeconfig` in the node's namespace (where the API server listens):
/// whether every proxy is SYNCED, and its output.
fn status(node: &tests::cluster::Node, kubeconfig: &Path) -> (bool, String) {
    let out = node.mesh_agent(&["status", "--kubeconfig", kubeconfig.to_str().unwrap()]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// One node; namespace `shop` (labelled ambient or not) with `a` (app client, sa client)
/// and `b` (app web, sa web, serving [`APP`]); the API server in the node's namespace
/// holding the namespace and both pods.
fn shop_on_one_node(ambient: bool) -> (Cluster, ApiServer) {
    let cluster = Cluster::builder()
        .nodes(1)
        .namespace("shop", [("team", "shop")])
        .pod(
            PodSpec::new("a", "shop", 0)
                .label("app", "client")
                .service_account("client"),
        )
        .pod(
            PodSpec::new("b", "shop", 0)
                .label("app", "web")
                .service_account("web"),
        )
        .build()
        .expect("building the test cluster");
    let (a, b) = (cluster.pod("a"), cluster.pod("b"));
    b.spawn_server(&[APP]).unwrap();
    // Every pod needs a process for /proc discovery, as a sandbox's pause process would be.
    a.spawn_server(&[9999]).unwrap();
    let node = cluster.node(0);
    let api = ApiServer::start_in(node.netns_path()).unwrap();
    api.apply(namespace_object("shop", ambient)).unwrap();
    for pod in [&a, &b] {
        api.apply(pod.kube_object()).unwrap();
    }
    (cluster, api)
}

/// Makes `token` the token of the node agent's account (`istio-system/ztunnel`, the CA's
/// trusted node account) bound to an agent pod on `node`, as TokenReview answers it.
fn node_agent_token(api: &ApiServer, node: &tests::cluster::Node, token: &str) {
    api.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "ztunnel-x1", "namespace": "istio-system", "uid": "zt-1"},
        "spec": {"nodeName": node.name(), "serviceAccountName": "ztunnel",
                 "containers": [{"name": "agent", "image": "mesh-agent"}]},
        "status": {"phase": "Running", "hostIP": node.ipv4().to_string()}}))
        .unwrap();
    api.add_token(
        token,
        json!({"username": "system:serviceaccount:istio-system:ztunnel",
               "extra": {"authentication.kubernetes.io/pod-name": ["ztunnel-x1"],
                         "authentication.kubernetes.io/node-name": [node.name()]}}),
    );
}

fn namespace_object(name: &str, ambient: bool) -> serde_json::Value {
    let labels = if ambient {
        json!({"istio.io/dataplane-mode": "ambient"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

#[test]
fn a_namespace_label_flip_through_the_kube_source_enrolls_and_releases_running_pods() {
    if !require_root() {
        return;
    }
    let (cluster, api) = shop_on_one_node(false);
    let (a, b) = (cluster.pod("a"), cluster.pod("b"));
    let node = cluster.node(0);
    let kubeconfig = api.write_kubeconfig(cluster.workdir()).unwrap();
    node.spawn_agent_kube(&kubeconfig, &[]).unwrap();
    node.wait_agent_ready(Duration::from_secs(30)).unwrap();

    // Not labelled: untouched.
    let r = a.connect(b.addr_v4(APP), 1024).unwrap();
    assert!(r.ok && !captured(&r), "{r:?}");

    // Labelled: both running pods enrolled (namespaces found from /proc), annotated.
    api.apply(namespace_object("shop", true)).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || a
            .connect(b.addr_v4(APP), 1024)
            .is_ok_and(|r| captured(&r))),
        "pods not captured after the label:\n{}",
        node.agent_log()
    );
    let r = a.connect(b.addr_v6(APP), 64 * 1024).unwrap();
    assert!(
        captured(&r) && r.server_saw_peer.map(|p| p.ip()) == Some(a.ipv6().into()),
        "{r:?}"
    );
    // `status` from the API server: the agent's view (by resourceVersion) is the server's,
    // its two pods enrolled; and again after a change it had to take.
    let mut last = String::new();
    let synced = eventually(Duration::from_secs(5), || {
        let (ok, text) = status(node, &kubeconfig);
        last = text;
        ok && last
            .lines()
            .any(|l| l.starts_with(node.name()) && l.contains("SYNCED") && l.contains("2/2"))
    });
    assert!(synced, "status against the API server:\n{last}");
    api.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.77.7", "selector": {"app": "web"}, "ports": [{"port": 80}]}}))
        .unwrap();
    let synced = eventually(Duration::from_secs(5), || {
        let (ok, text) = status(node, &kubeconfig);
        last = text;
        ok
    });
    assert!(synced, "status after a new Service:\n{last}");
    assert!(
        eventually(Duration::from_secs(3), || api.patches().iter().any(|p| p
            .name
            == "b"
            && p.patch
                .to_string()
                .contains("\"ambient.istio.io/redirection\":\"enabled\""))),
        "no redirection annotation patch: {:?}",
        api.patches()
    );

    // The watch breaks (streams closed, history expired: 410 on re-watch) while a
    // connection is open and an update lands in the gap: the connection survives, the
    // update is not lost.
    let pod_bin = tests::locate_binary("mesh-pod", "MESH_POD_BIN").unwrap();
    let held = a
        .spawn(&[
            pod_bin.to_str().unwrap(),
            "hold",
            "--to",
            &b.addr_v4(APP).to_string(),
            "--seconds",
            "3",
        ])
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    api.expire_resource_versions();
    api.close_watches();
    let late = cluster
        .add_pod(PodSpec::new("late", "shop", 0).label("app", "late"))
        .unwrap();
    late.spawn_server(&[9999]).unwrap();
    api.apply(late.kube_object()).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || late
            .connect(b.addr_v4(APP), 1024)
            .is_ok_and(|r| captured(&r))),
        "the pod added during the watch gap was not enrolled:\n{}",
        node.agent_log()
    );
    assert!(
        eventually(Duration::from_secs(5), || held.try_wait().is_some()),
        "hold did not finish"
    );
    assert!(
        held.log_text().contains("held"),
        "the open connection broke: {}",
        held.log_text()
    );

    // Label removed: released, traffic flows outside the mesh again.
    api.apply(namespace_object("shop", false)).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || a
            .connect(b.addr_v4(APP), 1024)
            .is_ok_and(|r| r.ok && !captured(&r))),
        "pods still captured after the label went away:\n{}",
        node.agent_log()
    );
    assert!(
        eventually(Duration::from_secs(3), || api.patches().iter().any(|p| p
            .name
            == "b"
            && p.patch
                .to_string()
                .contains("\"ambient.istio.io/redirection\":null"))),
        "annotation not removed: {:?}",
        api.patches()
    );
}

#[test]
fn service_cluster_ip_traffic_reaches_only_ready_endpoints_spread_across_them() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .ambient_namespace("shop")
        .pod(PodSpec::new("a", "shop", 0).label("app", "client"))
        .pod(
            PodSpec::new("web-b", "shop", 0)
                .label("app", "web-b")
                .label("svc", "web"),
        )
        .pod(
            PodSpec::new("web-c", "shop", 1)
                .label("app", "web-c")
                .label("svc", "web"),
        )
        .pod(
            PodSpec::new("web-d", "shop", 1)
                .label("app", "web-d")
                .label("svc", "web"),
        )
        .build()
        .expect("building the test cluster");
    let a = cluster.pod("a");
    let (b, c, d) = (
        cluster.pod("web-b"),
        cluster.pod("web-c"),
        cluster.pod("web-d"),
    );
    for p in [&b, &c, &d] {
        p.spawn_server(&[APP]).unwrap();
    }
    let vip: SocketAddr = "10.202.0.10:80".parse().unwrap();
    let empty_vip: SocketAddr = "10.202.0.11:80".parse().unwrap();
    let service = |name: &str, ip: std::net::IpAddr| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  clusterIP: {ip}\n  selector: {{svc: {name}}}\n  ports: [{{name: http, port: 80, targetPort: {APP}}}]\n"
        )
    };
    let endpoint = |p: &Pod, ready: bool| {
        format!(
            "  - addresses: [\"{}\"]\n    conditions: {{ready: {ready}}}\n",
            p.ipv4()
        )
    };
    let slice = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n  namespace: shop\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http, port: {APP}}}]\nendpoints:\n{}{}{}",
        endpoint(&b, true),
        endpoint(&c, true),
        endpoint(&d, false)
    );
    let empty_slice = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: empty-abc\n  namespace: shop\n  labels: {{kubernetes.io/service-name: empty}}\naddressType: IPv4\nports: [{{name: http, port: {APP}}}]\nendpoints:\n{}",
        endpoint(&d, false)
    );
    let opts = ConfigOptions::default()
        .document(service("web", vip.ip()))
        .document(slice)
        .document(service("empty", empty_vip.ip()))
        .document(empty_slice);
    cluster.write_config(&cluster.config_path(), &opts).unwrap();
    cluster.start_agents(&cluster.config_path()).unwrap();

    for _ in 0..12 {
        let r = a.connect(vip, 4096).unwrap();
        assert!(r.ok, "{r:?}");
        assert_eq!(
            r.getpeername,
            Some(vip),
            "the application must see the VIP it dialed"
        );
    }
    let m = Metrics::parse(&cluster.node(0).metrics().unwrap());
    let to = |w: &str| {
        m.sum(
            OPENED,
            &[
                ("reporter", "source"),
                ("destination_workload", w),
                ("destination_service", "web.shop.svc.cluster.local"),
            ],
        )
    };
    assert!(
        to("web-b") >= 3.0 && to("web-c") >= 3.0,
        "not spread: b {} c {}",
        to("web-b"),
        to("web-c")
    );
    assert_eq!(to("web-d"), 0.0, "an unready endpoint got traffic");
    assert_eq!(to("web-b") + to("web-c"), 12.0);

    // No ready endpoint: refused at once, not hung.
    let start = Instant::now();
    let r = a
        .connect_timeout(empty_vip, 1024, Duration::from_secs(5))
        .unwrap();
    assert!(
        !r.ok && start.elapsed() < Duration::from_secs(2),
        "{r:?} after {:?}",
        start.elapsed()
    );
}

/// Issue 18, Kubernetes mode: the agent has no CA key, only the mesh's root and a token of
/// the node account (istio-system/ztunnel) bound to its pod on node1; `ca serve` checks the
/// token with a TokenReview against the API server, finds the node from the bound pod, and
/// signs the identities of the captured pods there. A token it does not know gets nothing.
#[test]
fn in_kubernetes_mode_a_node_agent_proves_its_node_with_a_token_checked_by_tokenreview() {
    if !require_root() {
        return;
    }
    let (cluster, api) = shop_on_one_node(true);
    let (a, b) = (cluster.pod("a"), cluster.pod("b"));
    let node = cluster.node(0);
    node_agent_token(&api, node, "node1-token");
    let kubeconfig = api.write_kubeconfig(cluster.workdir()).unwrap();
    let ca_dir = cluster.workdir().join("ca-service");
    tests::cluster::init_ca(
        &tests::locate_binary("mesh-agent", "MESH_AGENT_BIN").unwrap(),
        &ca_dir,
    )
    .unwrap();
    let service = node
        .spawn_mesh_agent(
            "ca",
            &[
                "ca",
                "serve",
                "--ca-dir",
                ca_dir.to_str().unwrap(),
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
                "--listen",
                "127.0.0.1:15012",
            ],
        )
        .unwrap();
    let token = cluster.workdir().join("istio-token");
    std::fs::write(&token, "unknown-token\n").unwrap();
    let root = ca_dir.join("root-cert.pem");
    let args = [
        "--ca-address",
        "127.0.0.1:15012",
        "--ca-root-cert",
        root.to_str().unwrap(),
        "--ca-token-file",
        token.to_str().unwrap(),
    ];
    node.spawn_agent_kube(&kubeconfig, &args).unwrap();
    // An unknown token: the pods cannot be enrolled (no certificate), the agent says why.
    assert!(
        eventually(Duration::from_secs(15), || node
            .agent_log()
            .contains("invalid bearer token")),
        "agent:\n{}\nca:\n{}",
        node.agent_log(),
        service.log_text()
    );
    // The node's token (re-read per request): certificates, pods enrolled, traffic flows.
    std::fs::write(&token, "node1-token\n").unwrap();
    node.wait_agent_ready(Duration::from_secs(30)).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || a
            .connect(b.addr_v4(APP), 1024)
            .is_ok_and(|r| captured(&r))),
        "pods not captured:\n{}\nca:\n{}",
        node.agent_log(),
        service.log_text()
    );
    assert!(
        api.requests()
            .iter()
            .any(|r| r.method == "POST" && r.path.ends_with("/tokenreviews")),
        "no TokenReview reached the API server"
    );
    let log = tests::cluster::strip_ansi(&service.log_text());
    assert!(
        log.contains("certificate signed") && log.contains("caller=node node1"),
        "{log}"
    );
}

/// Issue 18, interop: Istio's ztunnel and this agent, both holding certificates from `ca serve`
/// on Istio's plug-in CA files (an RSA root and an ECDSA P-256 intermediate), carry each
/// other's traffic both ways. The agent runs node1 in Kubernetes mode with a node token;
/// ztunnel runs as pod `z`'s dedicated proxy on node2 (its own network namespace, workloads
/// from a local file, its certificate from `ca serve` with the pod's service-account token,
/// which the CA checks with a TokenReview). Client `a` (node1) → `z`: captured by the agent,
/// HBONE to ztunnel's 15008. `z` → `a`: ztunnel's outbound (its SOCKS5 listener, so no
/// iptables) → HBONE to the agent's 15008 in `a`'s namespace, which checks ztunnel's
/// certificate and reports its identity.
///
/// ztunnel cannot be installed from this machine's registries, so the test is ignored unless
/// asked for: `ZTUNNEL_BIN=/path/to/ztunnel cargo test -p tests --test kubernetes -- --ignored`
/// with a ztunnel built from istio/ztunnel with its `tls-ring` and `testing` features.
#[test]
#[ignore = "needs ZTUNNEL_BIN, a ztunnel binary (not installable here); run with --ignored"]
fn ztunnel_and_the_agent_carry_each_others_traffic_under_a_plug_in_ca() {
    use mesh_agent::identity::testing::{KeyKind, write_plugin_ca};
    use std::io::{BufRead, BufReader, Read, Write};
    let ztunnel = std::env::var("ZTUNNEL_BIN").expect("ZTUNNEL_BIN: a ztunnel binary");
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .namespace("shop", [("team", "shop")])
        .pod(
            PodSpec::new("a", "shop", 0)
                .label("app", "client")
                .service_account("client"),
        )
        .pod(
            PodSpec::new("z", "shop", 1)
                .label("app", "zt")
                .service_account("zt"),
        )
        .build()
        .expect("building the test cluster");
    let (a, z) = (cluster.pod("a"), cluster.pod("z"));
    let (node1, node2) = (cluster.node(0), cluster.node(1));
    a.spawn_server(&[APP]).unwrap();
    z.spawn_server(&[APP]).unwrap();

    let api = ApiServer::start_in(node1.netns_path()).unwrap();
    api.apply(namespace_object("shop", true)).unwrap();
    for pod in [&a, &z] {
        api.apply(pod.kube_object()).unwrap();
    }
    node_agent_token(&api, node1, "node1-token");
    api.add_token(
        "z-token",
        json!({"username": "system:serviceaccount:shop:zt",
               "extra": {"authentication.kubernetes.io/pod-name": ["z"]}}),
    );
    let kubeconfig = api.write_kubeconfig(cluster.workdir()).unwrap();

    let work = cluster.workdir();
    let ca_dir = work.join("plugin-ca");
    write_plugin_ca(&ca_dir, KeyKind::Rsa, KeyKind::EcP256).unwrap();
    let root = ca_dir.join("root-cert.pem");
    let ca_addr = SocketAddr::new(node1.ipv4().into(), 15012);
    let service = node1
        .spawn_mesh_agent(
            "ca",
            &[
                "ca",
                "serve",
                "--ca-dir",
                ca_dir.to_str().unwrap(),
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
                "--listen",
                &ca_addr.to_string(),
            ],
        )
        .unwrap();
    // As Kubernetes projects them: no trailing newline (ztunnel sends the file as it is).
    let token = |name: &str, value: &str| {
        let path = work.join(name);
        std::fs::write(&path, value).unwrap();
        path
    };
    let node_token = token("node1-token", "node1-token");
    node1
        .spawn_agent_kube(
            &kubeconfig,
            &[
                "--ca-address",
                &ca_addr.to_string(),
                "--ca-root-cert",
                root.to_str().unwrap(),
                "--ca-token-file",
                node_token.to_str().unwrap(),
            ],
        )
        .unwrap();
    node1.wait_agent_ready(Duration::from_secs(30)).unwrap();

    // ztunnel's view: both pods speak HBONE.
    let workload = |pod: &Pod, sa: &str, node: &str| {
        format!(
            "- uid: cluster1//v1/Pod/shop/{name}\n  name: {name}\n  namespace: shop\n  \
             serviceAccount: {sa}\n  trustDomain: cluster.local\n  workloadIps: [\"{ip}\"]\n  \
             protocol: HBONE\n  node: {node}\n  services: {{}}\n",
            name = pod.name(),
            ip = pod.ipv4(),
        )
    };
    let local = work.join("ztunnel-local.yaml");
    std::fs::write(
        &local,
        format!(
            "workloads:\n{}{}",
            workload(&a, "client", node1.name()),
            workload(&z, "zt", node2.name())
        ),
    )
    .unwrap();
    let z_token = token("z-token", "z-token");
    let env = [
        "PROXY_MODE=dedicated".to_owned(),
        "PROXY_WORKLOAD_INFO=shop/z/zt".to_owned(),
        format!("NODE_NAME={}", node2.name()),
        "XDS_ADDRESS=".to_owned(),
        format!("LOCAL_XDS_PATH={}", local.display()),
        format!("CA_ADDRESS=https://{ca_addr}"),
        format!("CA_ROOT_CA={}", root.display()),
        "ALT_CA_HOSTNAME=istiod.istio-system.svc".to_owned(),
        format!("AUTH_TOKEN={}", z_token.display()),
        "ENABLE_ORIG_SRC=false".to_owned(),
        "UNSTABLE_ENABLE_SOCKS5=true".to_owned(),
        "ISTIO_META_DNS_CAPTURE=false".to_owned(),
        "RUST_LOG=info".to_owned(),
    ];
    let mut args: Vec<&str> = vec!["env"];
    args.extend(env.iter().map(String::as_str));
    args.extend([ztunnel.as_str(), "proxy"]);
    let zt = z.spawn(&args).unwrap();
    let ready = SocketAddr::new(z.ipv4().into(), 15021);
    let get_ready = || {
        tests::in_netns(z.netns_path(), || -> std::io::Result<bool> {
            let mut s = std::net::TcpStream::connect_timeout(&ready, Duration::from_millis(200))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: z\r\nconnection: close\r\n\r\n")?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            Ok(answer.starts_with("HTTP/1.1 200"))
        })
        .is_ok_and(|r| r.unwrap_or(false))
    };
    assert!(
        eventually(Duration::from_secs(20), get_ready),
        "ztunnel not ready:\n{}",
        zt.log_text()
    );
    let logs = || {
        format!(
            "agent:\n{}\nztunnel:\n{}\nca:\n{}",
            node1.agent_log(),
            zt.log_text(),
            service.log_text()
        )
    };

    // a → z: the agent's HBONE to ztunnel.
    let r = a.connect(z.addr_v4(APP), 4096).unwrap();
    assert!(captured(&r), "a → z: {r:?}\n{}", logs());
    let m = Metrics::parse(&node1.metrics().unwrap());
    let to_z = m.sum(
        OPENED,
        &[
            ("reporter", "source"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/shop/sa/zt",
            ),
        ],
    );
    assert!(
        to_z >= 1.0,
        "no connection to ztunnel's identity\n{}",
        logs()
    );

    // z → a: ztunnel's HBONE to the agent, through its SOCKS5 listener.
    let echoed = tests::in_netns(z.netns_path(), || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect("127.0.0.1:15080")?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(&[5, 1, 0])?;
        let mut hello = [0u8; 2];
        s.read_exact(&mut hello)?;
        let mut connect = vec![5, 1, 0, 1];
        connect.extend(a.ipv4().octets());
        connect.extend(APP.to_be_bytes());
        s.write_all(&connect)?;
        let mut reply = [0u8; 10];
        s.read_exact(&mut reply)?;
        if reply[1] != 0 {
            return Err(std::io::Error::other(format!("SOCKS5 reply {}", reply[1])));
        }
        let mut reader = BufReader::new(s.try_clone()?);
        let mut peer = String::new();
        reader.read_line(&mut peer)?;
        s.write_all(b"interop\n")?;
        let mut echo = String::new();
        reader.read_line(&mut echo)?;
        Ok(format!("{peer}{echo}"))
    })
    .unwrap();
    assert!(
        echoed
            .as_ref()
            .is_ok_and(|t| t.starts_with("PEER ") && t.ends_with("interop\n")),
        "z → a: {echoed:?}\n{}",
        logs()
    );
    let m = Metrics::parse(&node1.metrics().unwrap());
    let from_z = m.sum(
        OPENED,
        &[
            ("reporter", "destination"),
            ("source_principal", "spiffe://cluster.local/ns/shop/sa/zt"),
        ],
    );
    assert!(
        from_z >= 1.0,
        "no connection from ztunnel's identity\n{}",
        logs()
    );
    // ztunnel's side of it: the agent's certificate verified as `a`'s identity, over HBONE.
    assert!(
        eventually(Duration::from_secs(5), || {
            zt.log_text().lines().any(|l| {
                l.contains("direction=\"outbound\"")
                    && l.contains("dst.identity=\"spiffe://cluster.local/ns/shop/sa/client\"")
                    && l.contains("dst.hbone_addr=")
            })
        }),
        "ztunnel logged no HBONE connection to a\n{}",
        logs()
    );
    // ztunnel's certificate came from the CA service, on the pod's own token.
    let log = tests::cluster::strip_ansi(&service.log_text());
    assert!(
        log.contains("caller=spiffe://cluster.local/ns/shop/sa/zt"),
        "{log}"
    );
}
