//! Kernel suite for the kernel's redirect (`mesh-agent run --sockmap`, opt-in; ADR 006,
//! 016): real pods and real agents, whose `sk_msg` verdict moves what one socket
//! sends into another's receive queue. Same node, what one application sends goes into
//! the other application's receive queue: bytes arrive complete and in order both ways
//! (including the server's greeting, and a client that sends before its route exists),
//! end of stream propagates, the agent forwards almost nothing itself, the counters are
//! exact, a policy change cuts a redirected connection. Cross node, the payload skips
//! both pods' loopback (their `lo` counters, against the agents without the redirect).
//! A reader that does not read holds a fast sender to a bounded queue, and then gets
//! every byte in order.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tests::metrics::Metrics;
use tests::{Cluster, ConfigOptions, PodSpec, eventually, require_root};

const MIB: u64 = 1 << 20;
const APP: u16 = 8080;
const SAME_NODE: &str = "mesh_agent_same_node_connections_total";
const FORWARDED: &str = "mesh_agent_redirect_forwarded_bytes_total";
const RECEIVED: &str = "istio_tcp_received_bytes_total";
const SENT: &str = "istio_tcp_sent_bytes_total";
/// The slow reader's port, and how long it leaves each connection unread.
const SLOW: u16 = 9090;
const SLOW_PAUSE: Duration = Duration::from_millis(3000);
/// How long the sender floods it (well inside the pause).
const FLOOD: Duration = Duration::from_millis(1500);

/// Two nodes; `shop` is ambient with the client `a` and the server `b` on node 1 and
/// the server `c` on node 2; both agents run with `--sockmap`, and `b` and `c` also run a
/// slow reader on [`SLOW`].
fn cluster() -> Cluster {
    let cluster = Cluster::builder()
        .nodes(2)
        .ambient_namespace("shop")
        .pod(
            PodSpec::new("a", "shop", 0)
                .label("app", "client")
                .service_account("client"),
        )
        .pod(PodSpec::new("b", "shop", 0).label("app", "web"))
        .pod(PodSpec::new("c", "shop", 1).label("app", "web"))
        .build()
        .expect("building the test cluster");
    let pod_bin = pod_bin();
    for pod in ["b", "c"] {
        let pod = cluster.pod(pod);
        pod.spawn_server(&[APP]).expect("starting a server");
        let pause = SLOW_PAUSE.as_millis().to_string();
        let slow = pod
            .spawn(&[
                &pod_bin,
                "serve-slow",
                "--port",
                &SLOW.to_string(),
                "--pause-ms",
                &pause,
            ])
            .expect("starting the slow reader");
        slow.wait_for_line("READY", Duration::from_secs(10))
            .expect("the slow reader did not start");
    }
    let config = cluster.config_path();
    cluster
        .write_config(&config, &ConfigOptions::default())
        .expect("writing the config");
    cluster
        .start_agents_with(&config, &["--sockmap"])
        .expect("starting the agents");
    cluster
}

fn pod_bin() -> String {
    let bin = tests::locate_binary("mesh-pod", "MESH_POD_BIN").expect("finding mesh-pod");
    bin.to_str().expect("a UTF-8 path").to_owned()
}

fn metrics(cluster: &Cluster) -> Metrics {
    Metrics::parse(&cluster.node(0).metrics().expect("reading /metrics"))
}

#[test]
fn same_node_sends_are_redirected_between_the_applications_byte_exact_over_ipv4_and_ipv6() {
    if !require_root() {
        return;
    }
    let cluster = cluster();
    let (a, b) = (cluster.pod("a"), cluster.pod("b"));
    let source = [("reporter", "source"), ("source_workload", "client")];
    // Eager: the client sends at once, so bytes reach the agent before the client's
    // route exists and the hand-over from forwarding to redirecting is exercised.
    for (to, eager) in [
        (b.addr_v4(APP), false),
        (b.addr_v6(APP), false),
        (b.addr_v4(APP), true),
        (b.addr_v6(APP), true),
    ] {
        let before = metrics(&cluster);
        // The echo client verifies every byte against its pattern, in order.
        let report = if eager {
            a.connect_eager(to, 10 * MIB)
        } else {
            a.connect(to, 10 * MIB)
        }
        .expect("running the client");
        assert!(
            report.ok,
            "{to}: {report:?}\n{}",
            cluster.node(0).agent_log()
        );
        assert_eq!((report.sent, report.received), (10 * MIB, 10 * MIB));
        assert!(
            report.local.is_some_and(|l| l.ip().is_loopback()),
            "not captured: {report:?}"
        );
        let own: std::net::IpAddr = if to.is_ipv4() {
            a.ipv4().into()
        } else {
            a.ipv6().into()
        };
        assert_eq!(report.server_saw_peer.map(|p| p.ip()), Some(own));
        assert_eq!(report.getpeername, Some(to));

        let delta = |m: &Metrics, name, filter: &[(&str, &str)]| {
            m.sum(name, filter) - before.sum(name, filter)
        };
        assert!(
            eventually(Duration::from_secs(5), || delta(
                &metrics(&cluster),
                RECEIVED,
                &source
            ) > 0.0),
            "connection to {to} never closed in the metrics"
        );
        let after = metrics(&cluster);
        assert_eq!(
            delta(&after, SAME_NODE, &[("datapath", "sockmap")]),
            1.0,
            "{to} was not redirected:\n{}",
            cluster.node(0).agent_log()
        );
        // Request bytes exactly; the response also carries the server's greeting line.
        assert_eq!(delta(&after, RECEIVED, &source), (10 * MIB) as f64);
        let sent = delta(&after, SENT, &source);
        assert!(
            sent > (10 * MIB) as f64 && sent < (10 * MIB + 256) as f64,
            "response bytes {sent}"
        );
        // The kernel moved the bytes: the agent forwarded only what was sent before the
        // redirect started (how much depends on how busy the machine is).
        let forwarded = delta(&after, FORWARDED, &[]);
        assert!(
            forwarded < (10 * MIB) as f64,
            "the agent forwarded {forwarded} of 20 MiB itself"
        );
    }
}

/// Bytes received on a pod's `lo`, from its namespace's own counters.
fn lo_bytes(pod: &tests::Pod) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["-j", "-s", "-n", pod.netns(), "link", "show", "lo"])
        .output()
        .expect("running ip");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    links[0]["stats64"]["rx"]["bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no lo counters: {links}"))
}

/// Sends `bytes` each way from `a` to `to` as 64 requests echoed in turn, byte-exact;
/// the bytes each pod's `lo` received meanwhile.
fn exchange_counting_lo(cluster: &Cluster, to: SocketAddr, bytes: u64) -> (u64, u64) {
    let (a, c) = (cluster.pod("a"), cluster.pod("c"));
    let before = (lo_bytes(&a), lo_bytes(&c));
    let report = a
        .connect_in_turns(to, bytes, 64)
        .expect("running the client");
    assert!(
        report.ok,
        "{to}: {report:?}\n{}",
        cluster.node(0).agent_log()
    );
    assert_eq!((report.sent, report.received), (bytes, bytes));
    (lo_bytes(&a) - before.0, lo_bytes(&c) - before.1)
}

#[test]
fn cross_node_payload_skips_both_pods_loopback_and_not_without_the_redirect() {
    if !require_root() {
        return;
    }
    let cluster = cluster();
    let c = cluster.pod("c");
    let source = [("reporter", "source"), ("source_workload", "client")];
    let payload = 8 * MIB;
    for to in [c.addr_v4(APP), c.addr_v6(APP)] {
        let before = metrics(&cluster);
        let (client_lo, server_lo) = exchange_counting_lo(&cluster, to, payload);
        println!("{to}: lo carried {client_lo} bytes (client pod), {server_lo} (server pod)");
        // Handshakes, ACKs and FINs still cross `lo`; 16 MiB of payload did not. (A
        // sender that outruns its receiver falls back to TCP, which `a_reader_that_...`
        // covers; requests and responses do not.)
        assert!(
            client_lo < MIB && server_lo < MIB,
            "{to}: lo carried {client_lo} bytes in the client pod, {server_lo} in the \
             server pod, for {payload} bytes each way"
        );
        // The agent still counts every byte.
        let received = |m: &Metrics| m.sum(RECEIVED, &source) - before.sum(RECEIVED, &source);
        assert!(
            eventually(Duration::from_secs(5), || received(&metrics(&cluster))
                == payload as f64),
            "{to}: request bytes counted {}",
            received(&metrics(&cluster))
        );
    }
    let m = metrics(&cluster);
    assert_eq!(
        m.sum(SAME_NODE, &[]),
        0.0,
        "cross-node counted as same-node"
    );
    assert_eq!(m.sum(FORWARDED, &[]), 0.0);

    // The same exchange with the redirect off: the counters do see the payload on `lo`.
    for node in cluster.nodes() {
        node.stop_agent().expect("stopping an agent");
    }
    cluster
        .start_agents_with(&cluster.config_path(), &[])
        .expect("restarting the agents");
    let (client_lo, server_lo) = exchange_counting_lo(&cluster, c.addr_v4(APP), payload);
    println!("without the redirect: lo carried {client_lo} and {server_lo} bytes");
    assert!(
        client_lo >= 2 * payload && server_lo >= 2 * payload,
        "without the redirect lo carried only {client_lo} and {server_lo} bytes"
    );
}

#[test]
fn a_reader_that_does_not_read_bounds_a_fast_senders_queue_same_and_cross_node() {
    if !require_root() {
        return;
    }
    let cluster = cluster();
    let (a, pod_bin) = (cluster.pod("a"), pod_bin());
    let flood_ms = FLOOD.as_millis().to_string();
    for server in ["b", "c"] {
        let to = cluster.pod(server).addr_v4(SLOW).to_string();
        let out = a
            .exec(&[&pod_bin, "flood", "--to", &to, "--flood-ms", &flood_ms])
            .expect("running the sender");
        let report: tests::flood_workload::FloodReport =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        // Unbounded (ADR 006), only the node's TCP memory limit would stop the sender
        // (not run: it would fail every socket's sends). Bounded: the receive buffers
        // and windows along the path.
        let grown = report.tcp_mem_during.saturating_sub(report.tcp_mem_before);
        println!("to {server}: {report:?}, TCP memory grew by {grown}");
        assert!(
            report.written < 64 * MIB && grown < 64 * MIB,
            "to {server}: the sender queued {} bytes while nobody read; the node's TCP \
             memory grew by {grown}",
            report.written
        );
        // Then the reader gets every byte, in order.
        assert!(
            report.read == report.written && report.in_order,
            "to {server}: {report:?}"
        );
    }
}

#[test]
fn a_deny_cuts_a_redirected_connection_within_2s() {
    if !require_root() {
        return;
    }
    let cluster = cluster();
    let (a, b) = (cluster.pod("a"), cluster.pod("b"));
    let pod_bin = pod_bin();
    let to: SocketAddr = b.addr_v4(APP);
    let held = a
        .spawn(&[&pod_bin, "hold", "--to", &to.to_string(), "--seconds", "20"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(held.is_running(), "{}", held.log_text());
    assert_eq!(
        metrics(&cluster).sum(SAME_NODE, &[("datapath", "sockmap")]),
        1.0,
        "the held connection was not redirected:\n{}",
        cluster.node(0).agent_log()
    );
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-client\n  namespace: shop\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source: {principals: [\"*/sa/client\"]}\n";
    let opts = ConfigOptions::default().document(deny.to_owned());
    cluster.write_config(&cluster.config_path(), &opts).unwrap();
    let written = Instant::now();
    while written.elapsed() < Duration::from_secs(2) && held.try_wait().is_none() {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        held.try_wait().is_some(),
        "redirected connection still open 2 s after the DENY: {}",
        held.log_text()
    );
    assert!(held.log_text().contains("broken"), "{}", held.log_text());
}
