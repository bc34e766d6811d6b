//! The proxy core in one process, without eBPF, namespaces or privileges (ztunnel's
//! `tests/direct.rs` is the model): two proxies, as the agents of two nodes, over loopback
//! addresses, with an in-memory state and an in-memory CA. A client's connection goes
//! through the first proxy's outbound side, an HBONE tunnel (real mutual TLS 1.3, real
//! HTTP/2) and the second proxy's HBONE server to an echo application. The sockets come
//! from a loopback [`PodSockets`]; the original destinations from a table the test fills.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use mesh_agent::config::Settings;
use mesh_agent::enroll::netns::Netns;
use mesh_agent::identity::{FileCa, Identity, SecretManager, tls};
use mesh_agent::metrics::Metrics;
use mesh_agent::proxy::sockets::{PodSockets, Purpose, new_socket};
use mesh_agent::proxy::{
    Limits, OriginalDestinations, PodContext, PodListeners, Proxy, ProxyParts,
};
use mesh_agent::state::{MeshState, RawObjects, Workload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

const HBONE_PORT: u16 = mesh_common::HBONE_PORT;

/// Sockets on loopback addresses: no namespace, no mark, no transparent bind (a delivery
/// binds the client's loopback address, which is local here). HBONE sockets start from the
/// pod's address, as they do in the pod's namespace.
struct LoopbackSockets;

impl PodSockets for LoopbackSockets {
    fn socket(
        &self,
        pod: &PodContext,
        family: IpAddr,
        purpose: Purpose,
    ) -> std::io::Result<TcpSocket> {
        let socket = new_socket(family)?;
        let bind = match purpose {
            Purpose::Delivery { client } => {
                socket.set_linger(Some(Duration::ZERO))?;
                Some(client)
            }
            Purpose::Passthrough => {
                socket.set_linger(Some(Duration::ZERO))?;
                None
            }
            Purpose::Hbone => pod.workload.ips.first().copied(),
        };
        if let Some(ip) = bind {
            socket.bind(&SocketAddr::new(ip, 0).into())?;
        }
        Ok(TcpSocket::from_std_stream(socket.into()))
    }
}

/// Original destinations the test records before its client connects.
#[derive(Default)]
struct Destinations(Mutex<HashMap<(u64, SocketAddr), SocketAddr>>);

impl OriginalDestinations for Destinations {
    fn take(&self, netns_cookie: u64, client: SocketAddr) -> Option<SocketAddr> {
        self.0.lock().unwrap().remove(&(netns_cookie, client))
    }
}

/// Everything the proxies log, for assertions (one subscriber for the whole test binary:
/// the runtime's threads log too).
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        struct Writer(&'static Mutex<Vec<u8>>);
        impl Write for Writer {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let _ = tracing_subscriber::fmt()
            .with_writer(move || Writer(logs))
            .with_ansi(false)
            .try_init();
        logs
    })
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

/// Loopback addresses of this test, distinct per test (and per process) so that tests run
/// in parallel can each listen on HBONE's fixed port.
fn addresses(test: u8) -> (IpAddr, IpAddr) {
    let block = (std::process::id() % 200) as u8 + 20;
    (
        IpAddr::V4(Ipv4Addr::new(127, block, test, 2)),
        IpAddr::V4(Ipv4Addr::new(127, block, test, 3)),
    )
}

fn workload(name: &str, sa: &str, ip: IpAddr, node: &str) -> Workload {
    Workload {
        uid: name.into(),
        name: name.into(),
        namespace: "shop".into(),
        node: Some(node.into()),
        service_account: sa.into(),
        ips: vec![ip],
        labels: [("app", name)].into(),
        workload_name: name.into(),
        netns: None,
        captured: true,
        host_network: false,
        dns_capture: None,
        waypoint: None,
    }
}

/// Two proxies (nodes `n1`, `n2`), the client pod `a` (sa `client`) on n1 and the server
/// pod `b` (sa `web`) on n2, an echo application in `b`.
struct World {
    client_proxy: Arc<Proxy>,
    server_proxy: Arc<Proxy>,
    destinations: Arc<Destinations>,
    /// Pod a's outbound listener (what capture would redirect its connections to).
    outbound: SocketAddr,
    /// The echo application in pod b.
    app: SocketAddr,
    a: IpAddr,
}

const COOKIE_A: u64 = 1;

async fn world(test: u8, policies: Vec<serde_json::Value>) -> World {
    let (a_ip, b_ip) = addresses(test);
    let a = workload("a", "client", a_ip, "n1");
    let b = workload("b", "web", b_ip, "n2");
    let raw = RawObjects {
        authorization_policies: policies,
        ..RawObjects::default()
    };
    let state = Arc::new(MeshState::new(vec![a.clone(), b.clone()], vec![], raw));
    let (_tx, rx) = watch::channel(state);
    // The sender lives as long as the test's runtime: the proxies keep the last state.
    std::mem::forget(_tx);
    let ca = FileCa::ephemeral();
    let destinations = Arc::new(Destinations::default());
    let proxy = |node: &str, destinations: Arc<Destinations>| {
        let certs = SecretManager::new(ca.clone(), Duration::from_secs(3600));
        let proxy = Arc::new(Proxy::new(
            node.into(),
            Settings::default(),
            Limits::default(),
            ProxyParts {
                state: rx.clone(),
                orig_dst: destinations,
                sockets: Arc::new(LoopbackSockets),
                sockmap: None,
                metrics: Arc::new(Metrics::default()),
                certs: certs.clone(),
            },
        ));
        (proxy, certs)
    };
    let (client_proxy, client_certs) = proxy("n1", destinations.clone());
    let (server_proxy, server_certs) = proxy("n2", Arc::new(Destinations::default()));
    let pod = |w: &Workload, certs: &Arc<SecretManager>, cookie: u64| {
        let identity = Identity::of("cluster.local", w);
        Arc::new(PodContext {
            workload: w.clone(),
            hbone_tls: tls::server_config(certs, &identity),
            identity,
            netns: Netns::open("/proc/self/ns/net".as_ref()).unwrap(),
            netns_cookie: cookie,
        })
    };
    for (w, certs) in [(&a, &client_certs), (&b, &server_certs)] {
        certs
            .acquire(&Identity::of("cluster.local", w))
            .await
            .unwrap();
    }
    let outbound = TcpListener::bind((a_ip, 0)).await.unwrap();
    let outbound_addr = outbound.local_addr().unwrap();
    client_proxy.serve_pod(
        pod(&a, &client_certs, COOKIE_A),
        PodListeners {
            outbound: vec![outbound],
            inbound: vec![],
            hbone: vec![],
        },
    );
    let hbone = TcpListener::bind((b_ip, HBONE_PORT)).await.unwrap();
    server_proxy.serve_pod(
        pod(&b, &server_certs, 2),
        PodListeners {
            outbound: vec![],
            inbound: vec![],
            hbone: vec![hbone],
        },
    );
    let app = TcpListener::bind((b_ip, 0)).await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, peer)) = app.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = stream.write_all(format!("PEER {peer}\n").as_bytes()).await;
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    World {
        client_proxy,
        server_proxy,
        destinations,
        outbound: outbound_addr,
        app: app_addr,
        a: a_ip,
    }
}

impl World {
    /// A connection from pod a as capture would hand it to the proxy: from a's address, to
    /// its outbound listener, with the original destination recorded.
    async fn connect(&self, to: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(self.a, 0)).unwrap();
        let local = socket.local_addr().unwrap();
        self.destinations
            .0
            .lock()
            .unwrap()
            .insert((COOKIE_A, local), to);
        socket.connect(self.outbound).await.unwrap()
    }
}

/// Sends `data` and half-closes while reading the echo; returns the PEER line and the echo.
async fn echo(stream: TcpStream, data: Vec<u8>) -> std::io::Result<(String, Vec<u8>)> {
    let (mut r, mut w) = stream.into_split();
    let send = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).await?;
    send.await.unwrap()?;
    let line_end = got
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| std::io::Error::other("no PEER line"))?;
    let peer = String::from_utf8_lossy(&got[..line_end]).into_owned();
    Ok((peer, got[line_end + 1..].to_vec()))
}

/// `proxy`'s series of bytes received as `reporter` (`source` or `destination`).
fn received_bytes(proxy: &Proxy, reporter: &str) -> String {
    let text = proxy.metrics.render();
    text.lines()
        .find(|l| {
            l.starts_with("istio_tcp_received_bytes_total")
                && l.contains(&format!("reporter=\"{reporter}\""))
        })
        .unwrap_or_else(|| panic!("no {reporter} series:\n{text}"))
        .to_owned()
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[tokio::test]
async fn ten_mib_echo_through_outbound_hbone_and_inbound_byte_exact() {
    logs();
    let world = world(1, vec![]).await;
    let data = payload(10 << 20);
    let stream = world.connect(world.app).await;
    let (peer, got) = tokio::time::timeout(Duration::from_secs(60), echo(stream, data.clone()))
        .await
        .expect("the echo stalled")
        .expect("the echo failed");
    assert!(
        got == data,
        "{} of {} bytes came back",
        got.len(),
        data.len()
    );
    // The application sees the client pod's address (the tunnel's source).
    assert!(peer.starts_with(&format!("PEER {}:", world.a)), "{peer}");
    // Both proxies counted the connection, as source and as destination, with identities.
    for (proxy, reporter) in [
        (&world.client_proxy, "source"),
        (&world.server_proxy, "destination"),
    ] {
        let line = received_bytes(proxy, reporter);
        assert!(
            line.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/client\""),
            "{line}"
        );
        assert!(
            line.contains("connection_security_policy=\"mutual_tls\""),
            "{line}"
        );
        assert!(line.ends_with(&format!(" {}", 10 << 20)), "{line}");
    }
}

#[tokio::test]
async fn a_denial_at_the_destination_names_the_deciding_policy() {
    logs();
    let deny = serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-client", "namespace": "shop"},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]}]},
    });
    let world = world(2, vec![deny]).await;
    let stream = world.connect(world.app).await;
    let result = tokio::time::timeout(Duration::from_secs(10), echo(stream, payload(1024)))
        .await
        .expect("the denied connection hung");
    assert!(
        result.is_err(),
        "a denied connection carried data: {result:?}"
    );
    let denied = world.server_proxy.metrics.render();
    assert!(
        denied
            .lines()
            .any(|l| l.starts_with("mesh_agent_connections_denied_total")
                && l.contains("reason=\"authorization_policy\"")
                && l.ends_with(" 1")),
        "{denied}"
    );
    let logged = log_text();
    assert!(
        logged.contains("connection denied: AuthorizationPolicy: denied by shop/no-client"),
        "{logged}"
    );
}

#[tokio::test]
async fn sixty_four_first_connections_to_one_destination_share_one_handshake() {
    logs();
    let world = Arc::new(world(3, vec![]).await);
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let world = world.clone();
            tokio::spawn(async move {
                let stream = world.connect(world.app).await;
                echo(stream, payload(4096)).await
            })
        })
        .collect();
    for client in clients {
        let (_, got) = client.await.unwrap().expect("a client failed");
        assert_eq!(got, payload(4096));
    }
    assert_eq!(
        world.client_proxy.pool.connections(),
        1,
        "64 concurrent first connections opened more than one HBONE connection"
    );
}

/// Clients that send at once and half-close: their first bytes go with the CONNECT when
/// they arrived before the tunnel opened, later otherwise; either way every byte arrives
/// once, in order, and is counted once by each proxy.
#[tokio::test]
async fn first_bytes_sent_with_the_connect_arrive_once_and_are_counted_once() {
    logs();
    let world = world(4, vec![]).await;
    const CONNECTIONS: usize = 20;
    for i in 0..CONNECTIONS {
        let data = payload(100 + i);
        let stream = world.connect(world.app).await;
        let (_, got) = tokio::time::timeout(Duration::from_secs(10), echo(stream, data.clone()))
            .await
            .expect("the echo stalled")
            .expect("the echo failed");
        assert_eq!(got, data, "connection {i}");
    }
    let sent: usize = (0..CONNECTIONS).map(|i| 100 + i).sum();
    for (proxy, reporter) in [
        (&world.client_proxy, "source"),
        (&world.server_proxy, "destination"),
    ] {
        let line = received_bytes(proxy, reporter);
        assert!(line.ends_with(&format!(" {sent}")), "{line}");
    }
}
