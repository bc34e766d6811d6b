//! Kernel tests of the test cluster itself, before any agent is involved: pod and
//! node addresses route (same node, cross node, IPv4 and IPv6), echoes are byte-exact,
//! servers see the real client address, and teardown leaves nothing behind.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tests::{Cluster, ConfigOptions, Pod, PodSpec, in_netns, require_root};

const MIB: u64 = 1 << 20;

fn cluster(nodes: usize, pods_per_node: usize) -> Cluster {
    Cluster::builder()
        .nodes(nodes)
        .pods_per_node(pods_per_node)
        .build()
        .expect("building the test cluster")
}

fn same_family(pod: &Pod, to: SocketAddr) -> IpAddr {
    match to {
        SocketAddr::V4(_) => pod.ipv4().into(),
        SocketAddr::V6(_) => pod.ipv6().into(),
    }
}

/// Connects `client` to `to` with a 1 MiB echo and checks everything the report says.
fn assert_echo(client: &Pod, to: SocketAddr) {
    let report = client.connect(to, MIB).expect("running the client");
    assert!(report.ok, "{} -> {to}: {report:?}", client.name());
    assert_eq!((report.sent, report.received), (MIB, MIB), "{report:?}");
    let client_ip = same_family(client, to);
    assert_eq!(
        report.server_saw_peer.map(|a| a.ip()),
        Some(client_ip),
        "the server must see the client pod's own address: {report:?}"
    );
    assert_eq!(report.local.map(|a| a.ip()), Some(client_ip), "{report:?}");
    assert_eq!(
        report.server_saw_peer, report.local,
        "no NAT anywhere: {report:?}"
    );
    assert_eq!(report.getpeername, Some(to), "{report:?}");
}

#[test]
fn pod_to_pod_cross_node_over_ipv4_and_ipv6() {
    if !require_root() {
        return;
    }
    let cluster = cluster(2, 2);
    let (a, b) = (cluster.pod("pod-1-0"), cluster.pod("pod-2-1"));
    b.spawn_server(&[8080, 9090]).unwrap();
    for to in [
        b.addr_v4(8080),
        b.addr_v6(8080),
        b.addr_v4(9090),
        b.addr_v6(9090),
    ] {
        assert_echo(&a, to);
    }
    // And back the other way.
    a.spawn_server(&[7070]).unwrap();
    assert_echo(&b, a.addr_v4(7070));
    assert_echo(&b, a.addr_v6(7070));
}

#[test]
fn pod_to_pod_same_node_over_ipv4_and_ipv6() {
    if !require_root() {
        return;
    }
    let cluster = cluster(1, 2);
    let (a, b) = (cluster.pod("pod-1-0"), cluster.pod("pod-1-1"));
    b.spawn_server(&[8080]).unwrap();
    assert_echo(&a, b.addr_v4(8080));
    assert_echo(&a, b.addr_v6(8080));
}

#[test]
fn pods_reach_node_addresses_across_the_fabric() {
    if !require_root() {
        return;
    }
    let cluster = cluster(3, 1);
    let node3 = cluster.node(2);
    node3.spawn_server(&[8081]).unwrap();
    let pod = cluster.pod("pod-1-0");
    for to in [
        SocketAddr::new(node3.ipv4().into(), 8081),
        SocketAddr::new(node3.ipv6().into(), 8081),
    ] {
        let report = pod.connect(to, 64 * 1024).unwrap();
        assert!(report.ok, "{to}: {report:?}");
        assert_eq!(
            report.server_saw_peer.map(|a| a.ip()),
            Some(same_family(&pod, to))
        );
    }
    // Node to node, from the node's own namespace.
    let out = cluster
        .node(0)
        .exec(&["ip", "-6", "route", "get", "fd00:201:3::10"])
        .unwrap();
    assert!(out.contains("via fd00:200::3"), "{out}");
}

#[test]
fn a_closed_port_fails_fast_and_is_reported_not_an_error() {
    if !require_root() {
        return;
    }
    let cluster = cluster(2, 1);
    let to = cluster.pod("pod-2-0").addr_v6(9);
    let report = cluster
        .pod("pod-1-0")
        .connect_timeout(to, 10, Duration::from_secs(2))
        .unwrap();
    assert!(!report.ok);
    assert!(
        report.error.as_deref().unwrap_or("").contains("refused"),
        "{report:?}"
    );
}

#[test]
fn pods_added_later_route_and_removed_pods_are_gone() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .ambient_namespace("shop")
        .pod(PodSpec::new("web", "shop", 0))
        .build()
        .unwrap();
    let late = cluster
        .add_pod(PodSpec::new("late", "shop", 1).label("app", "late"))
        .unwrap();
    late.spawn_server(&[8080]).unwrap();
    let web = cluster.pod("web");
    assert_echo(&web, late.addr_v4(8080));
    let (netns, cgroup) = (late.netns().to_string(), late.cgroup().to_path_buf());
    let addr = late.addr_v4(8080);
    drop(late);
    cluster.remove_pod("late").unwrap();
    assert!(!Path::new("/run/netns").join(&netns).exists());
    assert!(!cgroup.exists());
    let report = web
        .connect_timeout(addr, 10, Duration::from_secs(1))
        .unwrap();
    assert!(!report.ok, "a removed pod still answers: {report:?}");
}

#[test]
fn pod_processes_live_in_their_pod_cgroup_and_netns() {
    if !require_root() {
        return;
    }
    let cluster = cluster(1, 1);
    let pod = cluster.pod("pod-1-0");
    let server = pod.spawn_server(&[8080]).unwrap();
    let procs = std::fs::read_to_string(pod.cgroup().join("cgroup.procs")).unwrap();
    assert!(
        procs
            .split_whitespace()
            .any(|p| p == server.pid().to_string()),
        "server {} not in {}: {procs}",
        server.pid(),
        pod.cgroup().display()
    );
    let addrs = pod
        .exec(&["ip", "-o", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(addrs.contains(&format!("{}/32", pod.ipv4())), "{addrs}");
    assert!(addrs.contains(&format!("{}/128", pod.ipv6())), "{addrs}");
    assert!(!addrs.contains("tentative"), "DAD must be off: {addrs}");
    let routes = pod.exec(&["ip", "route"]).unwrap();
    assert!(
        routes.contains("default via 10.201.1.1 dev eth0 onlink"),
        "{routes}"
    );
    assert!(pod.node_veth().starts_with("veth"));
}

#[test]
fn node_http_get_talks_to_localhost_inside_the_node() {
    if !require_root() {
        return;
    }
    let cluster = cluster(1, 0);
    let node = cluster.node(0);
    let listener = in_netns(node.netns_path(), || {
        std::net::TcpListener::bind("127.0.0.1:15021")
    })
    .unwrap()
    .unwrap();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 1024];
        let n = stream.read(&mut request).unwrap();
        let request = String::from_utf8_lossy(&request[..n]).into_owned();
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nready")
            .unwrap();
        request
    });
    let (status, body) = node.http_get(15021, "/healthz/ready").unwrap();
    assert_eq!((status, body.as_str()), (200, "ready"));
    assert!(
        server
            .join()
            .unwrap()
            .starts_with("GET /healthz/ready HTTP/1.1\r\n")
    );
    // The test process itself is not in the node's namespace: nothing listens there.
    assert!(std::net::TcpStream::connect("127.0.0.1:15021").is_err());
}

#[test]
fn config_file_describes_every_pod_with_its_netns() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .ambient_namespace("shop")
        .namespace("legacy", [("team", "old")])
        .pod(PodSpec::new("a", "shop", 0).service_account("buyer"))
        .pod(PodSpec::new("b", "shop", 1).label("istio.io/dataplane-mode", "none"))
        .pod(PodSpec::new("x", "legacy", 1))
        .build()
        .unwrap();
    let path = cluster.config_path();
    cluster
        .write_config(&path, &ConfigOptions::default().exclude("x"))
        .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let docs: Vec<serde_yaml_ng::Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Namespace", "Namespace", "Pod", "Pod"], "{text}");
    let shop = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "shop")
        .unwrap();
    assert_eq!(
        shop["metadata"]["labels"]["istio.io/dataplane-mode"],
        "ambient"
    );
    let a = cluster.pod("a");
    let pod = docs.iter().find(|d| d["metadata"]["name"] == "a").unwrap();
    assert_eq!(pod["apiVersion"], "v1");
    assert_eq!(pod["metadata"]["namespace"], "shop");
    assert_eq!(
        pod["metadata"]["annotations"]["mesh-agent.io/netns"],
        a.netns_path().to_str().unwrap()
    );
    assert_eq!(pod["spec"]["nodeName"], "node1");
    assert_eq!(pod["spec"]["serviceAccountName"], "buyer");
    assert_eq!(pod["status"]["phase"], "Running");
    assert_eq!(pod["status"]["podIP"], "10.201.1.10");
    assert_eq!(pod["status"]["podIPs"][1]["ip"], "fd00:201:1::10");
    assert!(pod["metadata"]["uid"].as_str().unwrap().len() == 36);
    // Rewriting is atomic and reflects the change.
    cluster
        .write_config(&path, &ConfigOptions::default())
        .unwrap();
    assert!(std::fs::read_to_string(&path).unwrap().contains("name: x"));
}

/// Asserts nothing with this prefix exists any more.
fn assert_nothing_left(prefix: &str, cgroup_root: &Path, pins: &[std::path::PathBuf]) {
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(
        !netns.lines().any(|l| l.starts_with(prefix)),
        "network namespaces left behind:\n{netns}"
    );
    assert!(
        !cgroup_root.exists(),
        "cgroup {} left behind",
        cgroup_root.display()
    );
    for pin in pins {
        assert!(!pin.exists(), "{} left behind", pin.display());
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for entry in entries.flatten() {
            assert!(
                !entry.file_name().to_string_lossy().starts_with(prefix),
                "{} left behind",
                entry.path().display()
            );
        }
    }
}

#[test]
fn teardown_leaves_no_netns_cgroup_or_process() {
    if !require_root() {
        return;
    }
    let cluster = cluster(2, 2);
    let prefix = cluster.prefix().to_string();
    let cgroup_root = cluster.cgroup_root().to_path_buf();
    let workdir = cluster.workdir().to_path_buf();
    let pins: Vec<_> = cluster
        .nodes()
        .iter()
        .map(|n| n.bpffs_dir().to_path_buf())
        .collect();
    let servers: Vec<_> = cluster
        .pods()
        .iter()
        .map(|p| p.spawn_server(&[8080]).unwrap())
        .collect();
    assert!(cgroup_root.exists());
    cluster.teardown().unwrap();
    assert_nothing_left(&prefix, &cgroup_root, &pins);
    assert!(!workdir.exists(), "{} left behind", workdir.display());
    for server in servers {
        assert!(
            !server.is_running(),
            "server {} still running",
            server.pid()
        );
    }
}

#[test]
fn a_panicking_test_still_tears_everything_down() {
    if !require_root() {
        return;
    }
    let seen = Arc::new(Mutex::new(None));
    let result = std::panic::catch_unwind({
        let seen = seen.clone();
        move || {
            let cluster = cluster(2, 1);
            cluster.pod("pod-2-0").spawn_server(&[8080]).unwrap();
            *seen.lock().unwrap() = Some((
                cluster.prefix().to_string(),
                cluster.cgroup_root().to_path_buf(),
                cluster.workdir().to_path_buf(),
            ));
            panic!("deliberate panic with a live cluster");
        }
    });
    assert!(result.is_err());
    let (prefix, cgroup_root, workdir) = seen.lock().unwrap().take().unwrap();
    assert_nothing_left(&prefix, &cgroup_root, &[]);
    // Logs are kept after a panic, for the person reading the failure.
    assert!(workdir.exists());
    std::fs::remove_dir_all(workdir).unwrap();
}
