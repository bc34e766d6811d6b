//! Kernel suite for what careless or hostile clients do to a node agent: connections to the
//! agent's own ports (a self-loop through its listeners), ports nobody listens on, an agent
//! that dies mid-transfer, floods of half-open handshakes, and many idle connections. Each
//! test builds its own cluster and real agents.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_agent::testing::{Cluster, ConfigOptions, PodSpec, require_root};

const APP: u16 = 8080;

/// Two nodes; `shop` is ambient with `a`, `b` on node 1 and `c` on node 2; `legacy` is
/// not enrolled, with `l1` on node 1. Echo servers on 8080 in `b`, `c` and `l1`; agents
/// running with `extra` flags.
fn mesh(extra: &[&str]) -> Cluster {
    let cluster = Cluster::builder()
        .nodes(2)
        .ambient_namespace("shop")
        .namespace("legacy", [("team", "old")])
        .pod(PodSpec::new("a", "shop", 0).label("app", "client"))
        .pod(PodSpec::new("b", "shop", 0).label("app", "web"))
        .pod(PodSpec::new("c", "shop", 1).label("app", "web"))
        .pod(PodSpec::new("l1", "legacy", 0))
        .build()
        .expect("building the test cluster");
    for pod in ["b", "c", "l1"] {
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
        .start_agents_with(&config, extra)
        .expect("starting the agents");
    cluster
}

/// Lines every agent of the cluster has logged so far.
fn log_lines(cluster: &Cluster) -> usize {
    cluster
        .nodes()
        .iter()
        .map(|n| n.agent_log().lines().count())
        .sum()
}

#[test]
fn connections_to_the_agents_own_ports_are_refused_at_once_and_do_not_loop() {
    if !require_root() {
        return;
    }
    let cluster = mesh(&[]);
    let (a, b, c) = (cluster.pod("a"), cluster.pod("b"), cluster.pod("c"));
    let mut targets: Vec<(&str, SocketAddr)> = Vec::new();
    for port in mesh_common::AGENT_POD_PORTS {
        targets.extend([
            ("a", a.addr_v4(port)), // its own address
            ("a", a.addr_v6(port)), // its own address, IPv6
            ("a", b.addr_v4(port)), // a same-node pod
            ("a", c.addr_v4(port)), // a pod on the other node (HBONE)
        ]);
        // From outside the mesh, in plaintext (15008 is the HBONE listener itself there).
        if port != mesh_common::HBONE_PORT {
            targets.push(("l1", b.addr_v4(port)));
        }
    }
    for (client, to) in &targets {
        let started = Instant::now();
        let report = cluster
            .pod(client)
            .connect_timeout(*to, 64, Duration::from_secs(3))
            .expect("running the client");
        assert!(
            !report.ok && report.server_saw_peer.is_none(),
            "{client} -> {to} must be refused: {report:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{client} -> {to} took {:?} to fail: {report:?}",
            started.elapsed()
        );
    }
    // The clients are gone. A loop through the agent's listeners would keep accepting and
    // logging on its own (thousands of lines a second); a refusal leaves the log quiet.
    std::thread::sleep(Duration::from_millis(500));
    let before = log_lines(&cluster);
    std::thread::sleep(Duration::from_secs(2));
    let grown = log_lines(&cluster) - before;
    assert!(
        grown < 5,
        "the agents kept logging after the clients left ({grown} lines in 2 s): a self-loop\n{}",
        cluster
            .node(0)
            .agent_log()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Ordinary traffic is unaffected.
    for to in [b.addr_v4(APP), c.addr_v4(APP)] {
        let report = a.connect(to, 4096).expect("running the client");
        assert!(report.ok, "a -> {to}: {report:?}");
    }
}

#[test]
fn a_port_nobody_listens_on_is_refused_as_fast_as_without_the_mesh() {
    if !require_root() {
        return;
    }
    let cluster = mesh(&[]);
    let (b, c) = (cluster.pod("b"), cluster.pod("c"));
    let cases = [
        ("a", b.addr_v4(9)), // same node, one hop
        ("a", b.addr_v6(9)),
        ("a", c.addr_v4(9)), // cross node: HBONE answers 503
        ("a", c.addr_v6(9)),
        ("l1", b.addr_v4(9)), // plaintext into the inbound listener
    ];
    for (client, to) in cases {
        let started = Instant::now();
        let report = cluster
            .pod(client)
            .connect_timeout(to, 64, Duration::from_secs(5))
            .expect("running the client");
        assert!(!report.ok, "{client} -> {to} must fail: {report:?}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{client} -> {to} took {:?} to fail (a lost reset waits for the connect timeout): {report:?}",
            started.elapsed()
        );
    }
}
