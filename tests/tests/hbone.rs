//! Kernel suite for workload identity and HBONE: cross-node traffic is mutual TLS 1.3 on
//! the wire, identities are verified both ways, a handcrafted HBONE client gets ztunnel's
//! status codes, PeerAuthentication STRICT/PERMISSIVE applies to plaintext, and
//! certificates renew without breaking traffic.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_agent::identity::{FileCa, Identity, SecretManager, tls};
use tests::capture::{Capture, contains, tls_client_hello_to};
use tests::metrics::Metrics;
use tests::workload::pattern;
use tests::{Cluster, ConfigOptions, ConnectReport, PodSpec, eventually, in_netns, require_root};

const MIB: u64 = 1 << 20;
const APP: u16 = 8080;
const OPENED: &str = "istio_tcp_connections_opened_total";

/// Two nodes; `shop` ambient: `a` (sa `client`) on node 1, `c` (sa `web`) on node 2;
/// `legacy` not enrolled: `l2` on node 2. Servers in `c` and `l2`.
fn cluster() -> Cluster {
    cluster_with([])
}

/// [`cluster`] with `extra` pods besides.
fn cluster_with(extra: impl IntoIterator<Item = PodSpec>) -> Cluster {
    let builder = Cluster::builder()
        .nodes(2)
        .ambient_namespace("shop")
        .namespace("legacy", [("team", "old")])
        .pod(
            PodSpec::new("a", "shop", 0)
                .label("app", "client")
                .service_account("client"),
        )
        .pod(
            PodSpec::new("c", "shop", 1)
                .label("app", "web")
                .service_account("web"),
        )
        .pod(PodSpec::new("l2", "legacy", 1));
    let cluster = extra
        .into_iter()
        .fold(builder, |b, pod| b.pod(pod))
        .build()
        .expect("building the test cluster");
    for pod in ["c", "l2"] {
        cluster
            .pod(pod)
            .spawn_server(&[APP])
            .expect("starting a server");
    }
    cluster
        .write_config(&cluster.config_path(), &ConfigOptions::default())
        .expect("writing the config");
    cluster
}

fn metrics(cluster: &Cluster, node: usize) -> Metrics {
    Metrics::parse(&cluster.node(node).metrics().expect("reading /metrics"))
}

fn ok(report: &ConnectReport) -> bool {
    report.ok && report.server_saw_peer.is_some()
}

#[test]
fn cross_node_traffic_is_mutual_tls_on_the_wire_and_identities_reach_both_sides() {
    if !require_root() {
        return;
    }
    let cluster = cluster();
    cluster.start_agents(&cluster.config_path()).unwrap();
    let (a, c) = (cluster.pod("a"), cluster.pod("c"));

    let fabric = PathBuf::from("/run/netns").join(cluster.fabric_netns());
    let capture = Capture::start(&fabric, None).expect("starting the capture");
    for to in [c.addr_v4(APP), c.addr_v6(APP)] {
        let r = a.connect(to, MIB).unwrap();
        assert!(ok(&r) && r.received == MIB, "{to}: {r:?}");
        assert_eq!(
            r.server_saw_peer.map(|p| p.ip()),
            Some(if to.is_ipv4() {
                a.ipv4().into()
            } else {
                a.ipv6().into()
            })
        );
    }
    let segments = capture.stop();
    assert!(
        tls_client_hello_to(&segments, 15008),
        "no TLS handshake to 15008 seen on the fabric"
    );
    // No 4 KiB window of the known payload appears in any segment or stream on the wire.
    let mut payload = vec![0u8; MIB as usize];
    pattern(0, &mut payload);
    let wire: Vec<u8> = segments
        .iter()
        .flat_map(|s| s.payload.iter().copied())
        .collect();
    for chunk in payload.chunks(256 * 1024) {
        assert!(
            !contains(&wire, &chunk[..4096]),
            "plaintext payload visible on the wire"
        );
    }
    assert!(
        !segments
            .iter()
            .any(|s| s.dst.port() == APP || s.src.port() == APP),
        "a connection to the application port crossed the fabric outside the tunnel"
    );

    let client_id = "spiffe://cluster.local/ns/shop/sa/client";
    let web_id = "spiffe://cluster.local/ns/shop/sa/web";
    let dst = [
        ("reporter", "destination"),
        ("source_principal", client_id),
        ("destination_principal", web_id),
        ("connection_security_policy", "mutual_tls"),
    ];
    let src = [
        ("reporter", "source"),
        ("source_principal", client_id),
        ("destination_principal", web_id),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(
        eventually(Duration::from_secs(5), || metrics(&cluster, 1)
            .sum(OPENED, &dst)
            >= 2.0
            && metrics(&cluster, 0).sum(OPENED, &src) >= 2.0),
        "node1:\n{}\nnode2:\n{}",
        cluster.node(0).metrics().unwrap_or_default(),
        cluster.node(1).metrics().unwrap_or_default()
    );
}

#[test]
fn the_client_refuses_a_server_with_another_identity_or_another_root() {
    if !require_root() {
        return;
    }
    let cluster = cluster();
    let (a, c) = (cluster.pod("a"), cluster.pod("c"));
    // Node 1 believes `c` runs as `impostor`; node 2 serves c's real certificate (`web`).
    let skewed = cluster.workdir().join("node1.yaml");
    let yaml = cluster.config_yaml(&ConfigOptions::default()).unwrap();
    let swapped = yaml.replace("serviceAccountName: web", "serviceAccountName: impostor");
    assert_ne!(yaml, swapped);
    std::fs::write(&skewed, swapped).unwrap();
    cluster.node(0).start_agent(&skewed).unwrap();
    cluster.node(1).start_agent(&cluster.config_path()).unwrap();
    let r = a
        .connect_timeout(c.addr_v4(APP), 1024, Duration::from_secs(5))
        .unwrap();
    assert!(
        !ok(&r),
        "connected to a server presenting the wrong identity: {r:?}"
    );
    assert!(
        eventually(Duration::from_secs(3), || {
            let log = cluster.node(0).agent_log();
            log.contains("sa/impostor") && log.contains("sa/web")
        }),
        "the refusal does not name expected and presented identities:\n{}",
        cluster.node(0).agent_log()
    );

    // Node 2 now signs with a root node 1 does not trust.
    cluster.node(0).stop_agent().unwrap();
    cluster.node(1).stop_agent().unwrap();
    let other_root = cluster.workdir().join("other-ca");
    tests::cluster::init_ca(&mesh_agent_bin(), &other_root).unwrap();
    cluster.node(0).start_agent(&cluster.config_path()).unwrap();
    cluster
        .node(1)
        .spawn_agent(
            &cluster.config_path(),
            &["--ca-dir", other_root.to_str().unwrap()],
        )
        .unwrap();
    cluster
        .node(1)
        .wait_agent_ready(Duration::from_secs(20))
        .unwrap();
    let r = a
        .connect_timeout(c.addr_v4(APP), 1024, Duration::from_secs(5))
        .unwrap();
    assert!(!ok(&r), "connected to a server from another root: {r:?}");
}

fn mesh_agent_bin() -> PathBuf {
    std::env::var_os("MESH_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::current_exe()
                .unwrap()
                .parent()
                .unwrap()
                .parent()
                .unwrap()
                .join("mesh-agent")
        })
}

/// A test-side HBONE client: TLS 1.3 with a certificate of `shop/tester` from the
/// cluster's root, HTTP/2, from inside a namespace of the cluster.
struct HboneClient {
    sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    server_serial: String,
}

/// Mutual TLS as `shop/tester` to `server` (expected to be `expect`), from inside `netns`.
async fn tls_to(
    ca_dir: &Path,
    netns: &Path,
    server: SocketAddr,
    expect: &Identity,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let ca = FileCa::open(ca_dir)?;
    let certs = SecretManager::new(ca, Duration::from_secs(3600));
    let me: Identity = "spiffe://cluster.local/ns/shop/sa/tester".parse()?;
    certs.acquire(&me).await?;
    let tcp = in_netns(netns, || {
        std::net::TcpStream::connect_timeout(&server, Duration::from_secs(5))
    })??;
    tcp.set_nonblocking(true)?;
    let tcp = tokio::net::TcpStream::from_std(tcp)?;
    let config = tls::client_config(&certs, &me, expect);
    let name = rustls_pki_types::ServerName::IpAddress(server.ip().into());
    Ok(tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?)
}

async fn hbone_client(
    ca_dir: &Path,
    netns: &Path,
    server: SocketAddr,
    expect: &Identity,
) -> anyhow::Result<HboneClient> {
    let tls = tls_to(ca_dir, netns, server, expect).await?;
    let serial = {
        let (_, conn) = tls.get_ref();
        let der = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .expect("server certificate")
            .to_vec();
        let (_, cert) = x509_parser::parse_x509_certificate(&der)?;
        cert.raw_serial_as_string()
    };
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tls))
        .await?;
    tokio::spawn(connection);
    Ok(HboneClient {
        sender,
        server_serial: serial,
    })
}

impl HboneClient {
    async fn send(
        &mut self,
        method: http::Method,
        uri: &str,
    ) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
        let req = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(Empty::<Bytes>::new())?;
        Ok(self.sender.send_request(req).await?)
    }
}

#[test]
fn a_handcrafted_hbone_client_gets_200_400_and_503_at_once() {
    if !require_root() {
        return;
    }
    let cluster = cluster();
    cluster.start_agents(&cluster.config_path()).unwrap();
    let (a, c, l2) = (cluster.pod("a"), cluster.pod("c"), cluster.pod("l2"));
    let web: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = hbone_client(
            &cluster.workdir().join("ca"),
            l2.netns_path(),
            SocketAddr::new(c.ipv4().into(), 15008),
            &web,
        )
        .await
        .expect("HBONE handshake");
        // Allowed authority: 200 and a working byte stream to the application.
        let resp = client
            .send(http::Method::CONNECT, &c.addr_v4(APP).to_string())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut line = vec![0u8; 64];
        let n = io.read(&mut line).await.unwrap();
        let line = String::from_utf8_lossy(&line[..n]).to_string();
        assert!(
            line.starts_with(&format!("PEER {}:", l2.ipv4())),
            "the application must see the tunnel's source: {line}"
        );
        io.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        io.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
        // Malformed: not a CONNECT.
        let resp = client
            .send(http::Method::GET, &format!("http://{}/", c.addr_v4(APP)))
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        // An address the pod does not own, and a port nothing listens on.
        let resp = client
            .send(http::Method::CONNECT, &a.addr_v4(APP).to_string())
            .await
            .unwrap();
        assert_eq!(resp.status(), 503);
        // A refused port is answered at once: the kernel's reset reaches the agent.
        let started = std::time::Instant::now();
        let resp = client
            .send(http::Method::CONNECT, &c.addr_v4(9).to_string())
            .await
            .unwrap();
        assert_eq!(resp.status(), 503);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "503 for a refused port took {:?}",
            started.elapsed()
        );
        // The agent's own ports are never a target (they would loop back into it).
        for port in mesh_common::AGENT_POD_PORTS {
            let resp = client
                .send(http::Method::CONNECT, &c.addr_v4(port).to_string())
                .await
                .unwrap();
            assert_eq!(resp.status(), 400, "CONNECT to the agent's port {port}");
        }
    });
}

fn peer_auth(namespace: &str, mode: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: {namespace}}}\nspec: {{mtls: {{mode: {mode}}}}}\n"
    )
}

#[test]
fn strict_rejects_and_cuts_plaintext_permissive_admits_it_and_edits_apply_within_2s() {
    if !require_root() {
        return;
    }
    let cluster = cluster();
    cluster.start_agents(&cluster.config_path()).unwrap();
    let (a, c, l2) = (cluster.pod("a"), cluster.pod("c"), cluster.pod("l2"));
    let config = cluster.config_path();

    // PERMISSIVE (no policy): plaintext from outside the mesh is delivered, as `none`.
    let r = l2.connect(c.addr_v4(APP), 1024).unwrap();
    assert!(ok(&r), "{r:?}");
    let none = [
        ("reporter", "destination"),
        ("connection_security_policy", "none"),
    ];
    assert!(eventually(Duration::from_secs(3), || metrics(&cluster, 1)
        .sum(OPENED, &none)
        >= 1.0));

    // Live connections, plaintext and mutual TLS, when STRICT arrives.
    let pod_bin = tests::locate_binary("mesh-pod", "MESH_POD_BIN").unwrap();
    let pod_bin = pod_bin.to_str().unwrap();
    let to = c.addr_v4(APP).to_string();
    let hold = ["hold", "--to", &to, "--seconds", "20"];
    let plaintext = l2.spawn(&[&[pod_bin][..], &hold].concat()).unwrap();
    let mtls = a.spawn(&[&[pod_bin][..], &hold].concat()).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(plaintext.is_running() && mtls.is_running());

    cluster
        .write_config(
            &config,
            &ConfigOptions::default().document(peer_auth("shop", "STRICT")),
        )
        .unwrap();
    assert!(
        eventually(Duration::from_secs(2), || !plaintext.is_running()),
        "a live plaintext connection survived STRICT: {}",
        plaintext.log_text()
    );
    assert!(
        plaintext.log_text().contains("broken"),
        "{}",
        plaintext.log_text()
    );
    assert!(
        mtls.is_running(),
        "STRICT cut a mutual-TLS connection: {}",
        mtls.log_text()
    );
    let denied = "mesh_agent_connections_denied_total";
    assert!(
        eventually(Duration::from_secs(2), || l2
            .connect_timeout(c.addr_v4(APP), 1024, Duration::from_secs(1))
            .is_ok_and(|r| !ok(&r))),
        "plaintext still admitted 2 s after STRICT"
    );
    assert!(metrics(&cluster, 1).sum(denied, &[("reason", "plaintext_under_strict")]) >= 1.0);
    // Mesh traffic (HBONE) is unaffected.
    let r = a.connect(c.addr_v4(APP), MIB).unwrap();
    assert!(ok(&r), "{r:?}");

    // A mesh-wide STRICT with a namespace PERMISSIVE: the namespace wins.
    let docs = ConfigOptions::default()
        .document(peer_auth("istio-system", "STRICT"))
        .document(peer_auth("shop", "PERMISSIVE"));
    cluster.write_config(&config, &docs).unwrap();
    assert!(
        eventually(Duration::from_secs(2), || l2
            .connect(c.addr_v4(APP), 1024)
            .is_ok_and(|r| ok(&r))),
        "plaintext still rejected 2 s after PERMISSIVE"
    );
}

#[test]
fn certificates_renew_and_traffic_keeps_flowing_with_new_handshakes_on_new_certificates() {
    if !require_root() {
        return;
    }
    let cluster = cluster();
    for node in cluster.nodes() {
        node.spawn_agent(&cluster.config_path(), &["--cert-lifetime", "4s"])
            .unwrap();
    }
    for node in cluster.nodes() {
        node.wait_agent_ready(Duration::from_secs(20)).unwrap();
    }
    let (a, c, l2) = (cluster.pod("a"), cluster.pod("c"), cluster.pod("l2"));
    let web: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    let hbone = SocketAddr::new(c.ipv4().into(), 15008);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let serial = || {
        rt.block_on(hbone_client(
            &cluster.workdir().join("ca"),
            l2.netns_path(),
            hbone,
            &web,
        ))
        .expect("HBONE handshake")
        .server_serial
    };
    let mut serials = vec![serial()];
    let start = Instant::now();
    // Three lifetimes: at least four certificates, traffic all along.
    while start.elapsed() < Duration::from_secs(12) {
        let r = a.connect(c.addr_v4(APP), 64 * 1024).unwrap();
        assert!(
            ok(&r),
            "traffic broke during renewal at {:?}: {r:?}",
            start.elapsed()
        );
        let s = serial();
        if serials.last() != Some(&s) {
            serials.push(s);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        serials.len() >= 4,
        "server certificate renewed too rarely: {serials:?}"
    );
}

#[test]
fn half_open_handshakes_are_bounded_per_source_and_in_time_and_idle_connections_closed() {
    if !require_root() {
        return;
    }
    let cluster = cluster();
    cluster
        .start_agents_with(
            &cluster.config_path(),
            &["--handshake-timeout", "2s", "--hbone-idle-timeout", "2s"],
        )
        .unwrap();
    let (a, c, l2) = (cluster.pod("a"), cluster.pod("c"), cluster.pod("l2"));
    let node2 = cluster.node(1);
    let agent = node2.agent().unwrap().pid();
    let fds = || {
        std::fs::read_dir(format!("/proc/{agent}/fd"))
            .unwrap()
            .count()
    };
    let before = fds();

    // A pod outside the mesh opens 2,000 connections to 15008 and sends the first bytes of a
    // ClientHello on each, never the rest.
    let pod_bin = tests::locate_binary("mesh-pod", "MESH_POD_BIN").unwrap();
    let hbone = SocketAddr::new(c.ipv4().into(), 15008).to_string();
    let flood = l2
        .spawn(&[
            pod_bin.to_str().unwrap(),
            "half-open",
            "--to",
            &hbone,
            "--count",
            "2000",
            "--send",
            "1603010200",
            "--seconds",
            "30",
        ])
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || flood
            .log_text()
            .contains("READY")),
        "the flood did not start: {}",
        flood.log_text()
    );
    let held = fds() - before;
    assert!(
        held <= 48,
        "one source holds {held} descriptors of the agent with half-open handshakes"
    );
    // Other pods' traffic to the flooded pod goes on.
    let r = a.connect(c.addr_v4(APP), MIB).unwrap();
    assert!(ok(&r), "mesh traffic failed during the flood: {r:?}");
    let refused = metrics(&cluster, 1).sum("mesh_agent_hbone_handshakes_refused_total", &[]);
    assert!(refused >= 1900.0, "{refused} handshakes refused");
    // The refusals are logged a few times, not once each.
    let lines = node2
        .agent_log()
        .lines()
        .filter(|l| l.contains("HBONE connection"))
        .count();
    assert!(lines < 10, "{lines} log lines for one flood");
    // The handshakes in progress time out and give their descriptors back.
    assert!(
        eventually(Duration::from_secs(4), || fds() <= before + 2),
        "{} descriptors still held after the handshake timeout",
        fds() - before
    );

    let web: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    let ca = cluster.workdir().join("ca");
    let server = SocketAddr::new(c.ipv4().into(), 15008);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // TLS done, but no HTTP/2 preface: closed within the handshake timeout (the
        // server's own SETTINGS arrive first).
        let mut tls = tls_to(&ca, l2.netns_path(), server, &web).await.unwrap();
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(4), tls.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "a TLS connection without an HTTP/2 preface stayed open ({} bytes read)",
            buf.len()
        );
        // HTTP/2 up, no stream ever: closed after the idle timeout.
        let client = hbone_client(&ca, l2.netns_path(), server, &web)
            .await
            .unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            while !client.sender.is_closed() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "an HBONE connection without streams stayed open"
        );
    });
}

/// The node's kubelet (a process named `kubelet` in its own cgroup of the node) probes a
/// pod under STRICT: the probe reaches the application; another host process does not.
#[test]
fn kubelet_probes_reach_pods_under_strict_and_other_host_processes_do_not() {
    if !require_root() {
        return;
    }
    let cluster = cluster();
    let (c, node2) = (cluster.pod("c"), cluster.node(1));
    let pod_bin = tests::locate_binary("mesh-pod", "MESH_POD_BIN").unwrap();
    let kubelet_bin = cluster.workdir().join("kubelet");
    std::fs::copy(&pod_bin, &kubelet_bin).unwrap();
    let kubelet_cgroup = node2.cgroup().join("_kubelet");
    std::fs::create_dir_all(&kubelet_cgroup).unwrap();
    // In the node's namespace and the kubelet's cgroup, as `kubelet`.
    let as_kubelet = |args: &[&str]| {
        let mut cmd = std::process::Command::new(&kubelet_bin);
        cmd.arg("--netns")
            .arg(node2.netns_path())
            .arg("--cgroup")
            .arg(&kubelet_cgroup)
            .args(args);
        cmd
    };
    // The long-running kubelet the agent finds at start (killed with the cluster).
    let mut kubelet = as_kubelet(&["serve", "--port", "10250"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    cluster
        .write_config(
            &cluster.config_path(),
            &ConfigOptions::default().document(peer_auth("shop", "STRICT")),
        )
        .unwrap();
    cluster.start_agents(&cluster.config_path()).unwrap();
    assert!(
        node2
            .agent_log()
            .contains("kubelet probes bypass the proxy"),
        "{}",
        node2.agent_log()
    );

    let to = c.addr_v4(APP).to_string();
    let probe = as_kubelet(&[
        "connect",
        "--to",
        &to,
        "--bytes",
        "1024",
        "--timeout-ms",
        "3000",
    ])
    .output()
    .unwrap();
    let report: ConnectReport =
        serde_json::from_slice(probe.stdout.trim_ascii()).expect("the probe's report");
    assert!(
        ok(&report),
        "the kubelet's probe was refused under STRICT: {report:?}"
    );
    let v6 = c.addr_v6(APP).to_string();
    let probe = as_kubelet(&[
        "connect",
        "--to",
        &v6,
        "--bytes",
        "1024",
        "--timeout-ms",
        "3000",
    ])
    .output()
    .unwrap();
    let report: ConnectReport =
        serde_json::from_slice(probe.stdout.trim_ascii()).expect("the probe's report");
    assert!(
        ok(&report),
        "the kubelet's IPv6 probe was refused: {report:?}"
    );

    // Any other process of the node is plaintext from outside the mesh: refused.
    let other = std::process::Command::new(&pod_bin)
        .arg("--netns")
        .arg(node2.netns_path())
        .arg("--cgroup")
        .arg(node2.cgroup().join("_host"))
        .args([
            "connect",
            "--to",
            &to,
            "--bytes",
            "1024",
            "--timeout-ms",
            "3000",
        ])
        .output()
        .unwrap();
    let report: ConnectReport =
        serde_json::from_slice(other.stdout.trim_ascii()).expect("the host process's report");
    assert!(
        !ok(&report),
        "a host process got through STRICT: {report:?}"
    );
    let _ = kubelet.kill();
    let _ = kubelet.wait();
}

/// Istio's certificate API as ztunnel speaks it, defined here apart from the agent's own
/// code (field numbers from Istio's `ca.proto`) and called through tonic.
mod istio_ca {
    use std::{net::SocketAddr, path::PathBuf, pin::Pin, sync::Arc, time::Duration};

    use hyper_util::rt::TokioIo;
    use tokio_rustls::rustls;
    use tonic::codegen::{Context, Poll, Service, http::Uri};

    pub const SERVER_NAME: &str = "istiod.istio-system.svc";

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IstioCertificateRequest {
        #[prost(string, tag = "1")]
        pub csr: String,
        #[prost(int64, tag = "3")]
        pub validity_duration: i64,
        #[prost(message, optional, tag = "4")]
        pub metadata: Option<prost_types::Struct>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IstioCertificateResponse {
        #[prost(string, repeated, tag = "1")]
        pub cert_chain: Vec<String>,
    }

    /// Dials the CA from inside a namespace, with TLS verified against `roots` and an
    /// optional client credential (a directory with cert.pem and key.pem).
    #[derive(Clone)]
    struct Dialer {
        netns: PathBuf,
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    }

    impl Service<Uri> for Dialer {
        type Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
        type Error = std::io::Error;
        type Future =
            Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Uri) -> Self::Future {
            let this = self.clone();
            Box::pin(async move {
                let tcp = tests::in_netns(&this.netns, || {
                    std::net::TcpStream::connect_timeout(&this.addr, Duration::from_secs(5))
                })
                .map_err(std::io::Error::other)??;
                tcp.set_nonblocking(true)?;
                let tcp = tokio::net::TcpStream::from_std(tcp)?;
                let name = rustls_pki_types::ServerName::try_from(SERVER_NAME).unwrap();
                let tls = tokio_rustls::TlsConnector::from(this.tls)
                    .connect(name, tcp)
                    .await?;
                Ok(TokioIo::new(tls))
            })
        }
    }

    /// `CreateCertificate` for `identity` (as ImpersonatedIdentity when `impersonate`), with
    /// a fresh P-256 key: the answer's PEM chain, or the gRPC status.
    pub async fn create_certificate(
        netns: &std::path::Path,
        addr: SocketAddr,
        roots_pem: &std::path::Path,
        credential: Option<&std::path::Path>,
        identity: &str,
    ) -> Result<Vec<String>, tonic::Status> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut &std::fs::read(roots_pem).unwrap()[..]) {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let mut tls = match credential {
            Some(dir) => {
                let chain =
                    rustls_pemfile::certs(&mut &std::fs::read(dir.join("cert.pem")).unwrap()[..])
                        .collect::<Result<Vec<_>, _>>()
                        .unwrap();
                let key = rustls_pemfile::private_key(
                    &mut &std::fs::read(dir.join("key.pem")).unwrap()[..],
                )
                .unwrap()
                .unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let dialer = Dialer {
            netns: netns.to_owned(),
            addr,
            tls: Arc::new(tls),
        };
        let channel =
            tonic::transport::Endpoint::from_static("https://istiod.istio-system.svc:15012")
                .connect_with_connector(dialer)
                .await
                .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(identity.try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let mut metadata = prost_types::Struct::default();
        metadata.fields.insert(
            "ImpersonatedIdentity".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(identity.into())),
            },
        );
        let request = IstioCertificateRequest {
            csr,
            validity_duration: 3600,
            metadata: Some(metadata),
        };
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let response: tonic::Response<IstioCertificateResponse> = grpc
            .unary(
                tonic::Request::new(request),
                "/istio.v1.auth.IstioCertificateService/CreateCertificate"
                    .parse()
                    .unwrap(),
                tonic_prost::ProstCodec::default(),
            )
            .await?;
        Ok(response.into_inner().cert_chain)
    }
}

/// Issue 18: `ca serve` holds Istio's plug-in CA files (an RSA root above an ECDSA
/// intermediate); the node agents have the root and a node credential only. Cross-node
/// traffic flows on certificates that carry the intermediate; a ztunnel-style client gets a
/// certificate for a pod of its node and is refused one of another node's pod and the
/// waypoint's; the waypoint's own credential gets its identity and nothing else.
#[test]
fn a_ca_service_holds_the_plug_in_key_and_signs_only_what_each_proxy_may_have() {
    use mesh_agent::identity::testing::{KeyKind, write_plugin_ca};
    if !require_root() {
        return;
    }
    // As Istio (and deploy/waypoint) label a waypoint's pods: not captured.
    let cluster = cluster_with([PodSpec::new("wp", "shop", 0)
        .label("gateway.networking.k8s.io/gateway-name", "waypoint")
        .label("istio.io/dataplane-mode", "none")
        .service_account("waypoint")]);
    let config = cluster.config_path();

    let work = cluster.workdir();
    let ca_dir = work.join("plugin-ca");
    write_plugin_ca(&ca_dir, KeyKind::Rsa, KeyKind::EcP256).unwrap();
    let credential = |name: &str, subject: [&str; 2]| {
        let out = work.join(format!("credential-{name}"));
        let status = std::process::Command::new(mesh_agent_bin())
            .args(["ca", "credential", "--ca-dir"])
            .arg(&ca_dir)
            .args(subject)
            .arg("--out")
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success(), "ca credential {subject:?}");
        out
    };
    let nodes: Vec<PathBuf> = cluster
        .nodes()
        .iter()
        .map(|n| credential(n.name(), ["--node", n.name()]))
        .collect();
    let waypoint = credential(
        "waypoint",
        ["--identity", "spiffe://cluster.local/ns/shop/sa/waypoint"],
    );
    let ca_key = std::fs::read(ca_dir.join("ca-key.pem")).unwrap();
    for dir in nodes.iter().chain([&waypoint]) {
        for file in std::fs::read_dir(dir).unwrap() {
            let file = file.unwrap().path();
            assert_ne!(std::fs::read(&file).unwrap(), ca_key, "{}", file.display());
        }
    }

    let ca_addr = SocketAddr::new(cluster.node(0).ipv4().into(), 15012);
    let service = cluster
        .node(0)
        .spawn_mesh_agent(
            "ca",
            &[
                "ca",
                "serve",
                "--ca-dir",
                ca_dir.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
                "--listen",
                &ca_addr.to_string(),
            ],
        )
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || in_netns(
            cluster.node(1).netns_path(),
            || std::net::TcpStream::connect_timeout(&ca_addr, Duration::from_millis(200))
        )
        .is_ok_and(|c| c.is_ok())),
        "the CA service does not listen; log:\n{}",
        service.log_text()
    );
    for (node, credential) in cluster.nodes().iter().zip(&nodes) {
        node.spawn_agent(
            &config,
            &[
                "--ca-address",
                &ca_addr.to_string(),
                "--ca-root-cert",
                credential.join("root-cert.pem").to_str().unwrap(),
                "--ca-credential",
                credential.to_str().unwrap(),
            ],
        )
        .unwrap();
    }
    for node in cluster.nodes() {
        node.wait_agent_ready(Duration::from_secs(20)).unwrap();
        let cmdline =
            std::fs::read(format!("/proc/{}/cmdline", node.agent().unwrap().pid())).unwrap();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains("ca-dir"),
            "the agent was given the CA's directory"
        );
    }

    let (a, c) = (cluster.pod("a"), cluster.pod("c"));
    let r = a
        .connect_timeout(c.addr_v4(APP), 1024, Duration::from_secs(5))
        .unwrap();
    assert!(
        ok(&r),
        "cross-node traffic on the CA service's certificates: {r:?}\nnode1:\n{}\nnode2:\n{}\nca:\n{}",
        cluster.node(0).agent_log(),
        cluster.node(1).agent_log(),
        service.log_text()
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Node 2 presents c's certificate with the intermediate after it; a client signed
        // by the same files directly verifies it against the root alone.
        let web: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let tls = tls_to(
            &ca_dir,
            cluster.node(0).netns_path(),
            SocketAddr::new(c.ipv4().into(), 15008),
            &web,
        )
        .await
        .expect("mutual TLS with node 2 under the plug-in CA");
        let presented = tls.get_ref().1.peer_certificates().unwrap().to_vec();
        let intermediate = std::fs::read(ca_dir.join("ca-cert.pem")).unwrap();
        let intermediate = rustls_pemfile::certs(&mut &intermediate[..])
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(presented.len(), 2, "leaf and intermediate");
        assert_eq!(presented[1], intermediate);

        let roots = nodes[0].join("root-cert.pem");
        let node1 = cluster.node(0).netns_path();
        let ask = |credential: Option<PathBuf>, identity: &'static str| {
            let roots = roots.clone();
            async move {
                istio_ca::create_certificate(
                    node1,
                    ca_addr,
                    &roots,
                    credential.as_deref(),
                    identity,
                )
                .await
            }
        };
        let client = "spiffe://cluster.local/ns/shop/sa/client";
        let chain = ask(Some(nodes[0].clone()), client)
            .await
            .expect("node 1 gets a's identity");
        assert_eq!(chain.len(), 3, "leaf, intermediate, root: {chain:?}");
        let leaf = rustls_pemfile::certs(&mut chain[0].as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        let sans = format!(
            "{:?}",
            leaf.subject_alternative_name().unwrap().unwrap().value
        );
        assert!(sans.contains(client), "{sans}");
        assert_eq!(
            chain[2].trim(),
            std::fs::read_to_string(ca_dir.join("root-cert.pem"))
                .unwrap()
                .trim()
        );

        let refused = [
            (
                Some(nodes[0].clone()),
                "spiffe://cluster.local/ns/shop/sa/web",
                tonic::Code::PermissionDenied,
                "no captured pod on node node1",
            ),
            (
                Some(nodes[0].clone()),
                "spiffe://cluster.local/ns/shop/sa/waypoint",
                tonic::Code::PermissionDenied,
                "no captured pod on node node1",
            ),
            (
                Some(waypoint.clone()),
                client,
                tonic::Code::PermissionDenied,
                "only its own identity",
            ),
            (
                None,
                client,
                tonic::Code::Unauthenticated,
                "no client certificate",
            ),
        ];
        for (credential, identity, code, reason) in refused {
            let who = format!("{credential:?} asking for {identity}");
            let status = ask(credential, identity).await.expect_err(&who);
            assert_eq!(status.code(), code, "{who}: {status:?}");
            assert!(status.message().contains(reason), "{who}: {status:?}");
        }
        ask(
            Some(waypoint.clone()),
            "spiffe://cluster.local/ns/shop/sa/waypoint",
        )
        .await
        .expect("the waypoint gets its own identity");
    });
    let log = service.log_text();
    assert!(log.contains("certificate refused"), "{log}");
}

/// A restart under load, first of the destination node's agent, then of the source node's:
/// each new agent takes the old one's listeners over its handoff socket, the old one drains.
/// New connections, one after another to a same-node and a cross-node server for the whole
/// time, are neither refused nor reset, and long-lived connections made before the
/// restarts last through both. Each old agent gets a SIGTERM while it drains (as a surge
/// rollout's old pod does) and drains on.
#[test]
fn a_new_agent_takes_over_the_listeners_and_the_old_one_drains_without_a_refusal_or_reset() {
    if !require_root() {
        return;
    }
    let cluster = cluster_with([PodSpec::new("b", "shop", 0)
        .label("app", "web")
        .service_account("web")]);
    cluster.pod("b").spawn_server(&[APP]).unwrap();
    let config = cluster.config_path();
    let drain = ["--drain-period", "30s"];
    cluster.start_agents_with(&config, &drain).unwrap();
    let a = cluster.pod("a");
    let (same, cross) = (
        cluster.pod("b").addr_v4(APP).to_string(),
        cluster.pod("c").addr_v4(APP).to_string(),
    );
    // Both paths work before anything starts.
    for to in [&same, &cross] {
        let report = a.connect(to.parse().unwrap(), 1024).unwrap();
        assert!(ok(&report), "{to}: {report:?}");
    }
    let pod_bin = tests::locate_binary("mesh-pod", "MESH_POD_BIN").unwrap();
    let pod_bin = pod_bin.to_str().unwrap();
    let opened_before = metrics(&cluster, 0).sum(OPENED, &[]);
    let holds = [&same, &cross].map(|to| {
        a.spawn(&[pod_bin, "hold", "--to", to, "--seconds", "8"])
            .unwrap()
    });
    // Counted at accept: both long-lived connections are carried by the first agents.
    assert!(
        eventually(Duration::from_secs(5), || metrics(&cluster, 0)
            .sum(OPENED, &[])
            >= opened_before + 2.0),
        "the long-lived connections did not open"
    );
    let churn = a
        .spawn(&[
            pod_bin,
            "churn",
            "--to",
            &same,
            "--to",
            &cross,
            "--seconds",
            "12",
        ])
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut old = Vec::new();
    for node in [1, 0] {
        let started = Instant::now();
        let process = cluster.node(node).take_over_agent(&config, &drain).unwrap();
        eprintln!("node {node}: taken over in {:?}", started.elapsed());
        // As a surge rollout's kubelet does once the new pod is ready: the old pod is
        // deleted, its agent gets a SIGTERM while it drains, and drains on.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(process.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        old.push(process);
        std::thread::sleep(Duration::from_millis(500));
    }
    // The old agents drain: each exits once the connections it carries end (the
    // long-lived ones, after 8 s), well before its 30 s drain period.
    for (process, node) in old.iter().zip([1, 0]) {
        assert!(
            eventually(Duration::from_secs(20), || process.try_wait().is_some()),
            "node {node}: the old agent did not exit after its connections ended:\n{}",
            process.log_text()
        );
        assert!(process.try_wait().unwrap().success());
        let log = process.log_text();
        assert!(log.contains("draining"), "node {node}:\n{log}");
        assert!(
            log.contains("draining on"),
            "node {node}: SIGTERM not seen:\n{log}"
        );
        assert!(log.contains("drained"), "node {node}:\n{log}");
    }
    for (hold, to) in holds.iter().zip([&same, &cross]) {
        assert!(
            eventually(Duration::from_secs(20), || hold.try_wait().is_some()),
            "hold to {to} did not end"
        );
        assert!(
            hold.try_wait().unwrap().success(),
            "the long-lived connection to {to} broke: {}",
            hold.log_text()
        );
    }
    assert!(
        eventually(Duration::from_secs(30), || churn.try_wait().is_some()),
        "churn did not end"
    );
    let text = churn.log_text();
    let report: tests::workload::ChurnReport = serde_json::from_str(
        text.lines()
            .rfind(|l| l.starts_with('{'))
            .unwrap_or_default(),
    )
    .unwrap_or_else(|e| panic!("churn output {text:?}: {e}"));
    eprintln!("churn across both restarts: {report:?}");
    assert_eq!(report.failures(), 0, "{report:?}");
    assert!(
        report.ok >= 100,
        "too few connections to prove anything: {report:?}"
    );
    // The new agents carry new connections on their own.
    for to in [&same, &cross] {
        let report = a.connect(to.parse().unwrap(), 1024).unwrap();
        assert!(ok(&report), "{to} after the restarts: {report:?}");
    }
}
