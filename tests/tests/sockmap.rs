//! Kernel suite for the opt-in same-node redirect (`mesh-agent run --sockmap`, ADR 006):
//! real pods and real agents, whose `sk_msg` verdict moves what one application sends
//! into the other application's receive queue. Bytes arrive complete and in order both
//! ways (including the server's greeting, and a client that sends before its route
//! exists), end of stream propagates, the agent forwards almost nothing itself, the
//! counters are exact, a policy change cuts a redirected connection, and cross-node
//! connections, whose client sockets never enter the socket map, are carried as before.

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

/// Two nodes; `shop` is ambient with the client `a` and the server `b` on node 1 and
/// the server `c` on node 2; both agents run with `--sockmap`.
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
    for pod in ["b", "c"] {
        cluster
            .pod(pod)
            .spawn_server(&[APP])
            .expect("starting a server");
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

#[test]
fn cross_node_connections_stay_out_of_the_socket_map_and_are_carried_as_before() {
    if !require_root() {
        return;
    }
    let cluster = cluster();
    let (a, c) = (cluster.pod("a"), cluster.pod("c"));
    for to in [c.addr_v4(APP), c.addr_v6(APP)] {
        let report = a.connect_eager(to, 4 * MIB).expect("running the client");
        assert!(
            report.ok,
            "{to}: {report:?}\n{}",
            cluster.node(0).agent_log()
        );
        assert_eq!((report.sent, report.received), (4 * MIB, 4 * MIB));
    }
    let m = metrics(&cluster);
    assert_eq!(
        m.sum(SAME_NODE, &[]),
        0.0,
        "cross-node counted as same-node"
    );
    assert_eq!(m.sum(FORWARDED, &[]), 0.0);
}

#[test]
fn a_deny_cuts_a_redirected_connection_within_2s() {
    if !require_root() {
        return;
    }
    let cluster = cluster();
    let (a, b) = (cluster.pod("a"), cluster.pod("b"));
    let pod_bin = tests::locate_binary("mesh-pod", "MESH_POD_BIN").unwrap();
    let to: SocketAddr = b.addr_v4(APP);
    let held = a
        .spawn(&[
            pod_bin.to_str().unwrap(),
            "hold",
            "--to",
            &to.to_string(),
            "--seconds",
            "20",
        ])
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
