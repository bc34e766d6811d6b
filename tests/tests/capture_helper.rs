//! Kernel tests of the packet capture helper (`tests::capture`) itself, with no
//! agent: on the fabric bridge between two nodes a plaintext 1 MiB echo is visible byte for
//! byte, once (the bridge sees each frame on two ports), in both directions, over IPv4 and
//! IPv6; a capture on one link sees that link only; a capture in a pod's own namespace keeps
//! what the pod sends. Later tests rely on this to assert that HBONE hides the same payload.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tests::capture::{self, Capture, Segment};
use tests::workload::pattern;
use tests::{Cluster, Pod, require_root};

const MIB: u64 = 1 << 20;
const PORT: u16 = 8080;

/// `nodes` nodes with one pod each (`pod-N-0` on node N), an echo server on every pod.
fn cluster(nodes: usize) -> Cluster {
    let cluster = Cluster::builder()
        .nodes(nodes)
        .pods_per_node(1)
        .build()
        .expect("building the test cluster");
    for pod in cluster.pods() {
        pod.spawn_server(&[PORT]).expect("starting an echo server");
    }
    cluster
}

fn fabric(cluster: &Cluster) -> PathBuf {
    Path::new("/run/netns").join(cluster.fabric_netns())
}

/// The bytes `mesh-pod connect` sends (and the echo returns).
fn payload() -> Vec<u8> {
    let mut bytes = vec![0; MIB as usize];
    pattern(0, &mut bytes);
    bytes
}

/// Runs a 1 MiB echo from `client` to `to` while `captures` run; returns the client's address
/// and each capture's segments.
fn echo_captured(
    client: &Pod,
    to: SocketAddr,
    captures: Vec<Capture>,
) -> (SocketAddr, Vec<Vec<Segment>>) {
    let report = client.connect(to, MIB).expect("running the client");
    let segments = captures.into_iter().map(Capture::stop).collect();
    assert!(report.ok, "{} -> {to}: {report:?}", client.name());
    assert_eq!((report.sent, report.received), (MIB, MIB), "{report:?}");
    let local = report.local.expect("the client reports its local address");
    (local, segments)
}

/// The whole payload crossed from `client` to `server` exactly once, and came back.
fn assert_plaintext_once(segments: &[Segment], client: SocketAddr, server: SocketAddr) {
    let expected = payload();
    // A bridge or router sees each frame twice (in and out): the capture keeps one copy, so
    // what was recorded is about 1 MiB (a few TCP retransmissions aside), not 2.
    let recorded: usize = segments
        .iter()
        .filter(|s| s.src == client && s.dst == server)
        .map(|s| s.payload.len())
        .sum();
    assert!(
        recorded >= expected.len() && recorded < expected.len() * 3 / 2,
        "{client} -> {server}: {recorded} payload bytes recorded for {} sent",
        expected.len()
    );
    let sent = capture::stream(segments, client, server);
    assert_eq!(sent.len(), expected.len(), "{client} -> {server}");
    assert!(capture::contains(&sent, &expected), "{client} -> {server}");
    // The echo server writes its PEER line first, then the payload back.
    let echoed = capture::stream(segments, server, client);
    assert!(
        capture::contains(&echoed, &expected),
        "{server} -> {client}"
    );
    assert!(
        segments
            .iter()
            .any(|s| s.syn && s.src == client && s.dst == server),
        "the SYN of {client} -> {server} was captured"
    );
    assert!(
        !capture::tls_client_hello_to(segments, server.port()),
        "plaintext is not a ClientHello"
    );
}

#[test]
fn plaintext_cross_node_payload_is_visible_on_the_fabric() {
    if !require_root() {
        return;
    }
    let cluster = cluster(2);
    let (a, b) = (cluster.pod("pod-1-0"), cluster.pod("pod-2-0"));
    for to in [b.addr_v4(PORT), b.addr_v6(PORT)] {
        let capture = Capture::start(&fabric(&cluster), None).expect("starting the capture");
        let (client, segments) = echo_captured(&a, to, vec![capture]);
        assert_plaintext_once(&segments[0], client, to);
    }
}

#[test]
fn capture_on_one_interface_sees_only_that_link() {
    if !require_root() {
        return;
    }
    let cluster = cluster(3);
    let (a, b) = (cluster.pod("pod-1-0"), cluster.pod("pod-2-0"));
    let to = b.addr_v4(PORT);
    // The fabric ports of node1, node2 and node3 (bridge ports `nN`).
    let captures = ["n1", "n2", "n3"]
        .iter()
        .map(|port| Capture::start(&fabric(&cluster), Some(port)).expect("starting a capture"))
        .collect();
    let (client, segments) = echo_captured(&a, to, captures);
    assert_plaintext_once(&segments[0], client, to);
    assert_plaintext_once(&segments[1], client, to);
    let on_n3: Vec<&Segment> = segments[2]
        .iter()
        .filter(|s| s.src == client || s.dst == client)
        .collect();
    assert!(
        on_n3.is_empty(),
        "node3's link carried none of it: {on_n3:?}"
    );
}

#[test]
fn capture_in_a_pod_keeps_what_the_pod_sends() {
    if !require_root() {
        return;
    }
    let cluster = cluster(2);
    let (a, b) = (cluster.pod("pod-1-0"), cluster.pod("pod-2-0"));
    let to = b.addr_v6(PORT);
    let capture = Capture::start(a.netns_path(), None).expect("starting the capture");
    let (client, segments) = echo_captured(&a, to, vec![capture]);
    assert_plaintext_once(&segments[0], client, to);
}

#[test]
fn start_names_what_is_missing() {
    if !require_root() {
        return;
    }
    let cluster = cluster(1);
    let e = Capture::start(&fabric(&cluster), Some("no-such-if")).unwrap_err();
    assert!(format!("{e:#}").contains("no-such-if"), "{e:#}");
    let missing = Path::new("/run/netns").join(format!("{}-missing", cluster.prefix()));
    let e = Capture::start(&missing, None).unwrap_err();
    assert!(
        format!("{e:#}").contains(&*missing.to_string_lossy()),
        "{e:#}"
    );
}
