//! Kernel suite for what careless or hostile clients do to a node agent: connections to the
//! agent's own ports (a self-loop through its listeners), ports nobody listens on, an agent
//! that dies mid-transfer, floods of half-open handshakes, and many idle connections. Each
//! test builds its own cluster and real agents.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tests::{Cluster, ConfigOptions, PodSpec, require_root};

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

/// Starts `mesh-pod hold` (a little data both ways every 20 ms) from `client` to `to`.
fn hold(cluster: &Cluster, client: &str, to: SocketAddr) -> tests::Process {
    let pod_bin = tests::locate_binary("mesh-pod", "MESH_POD_BIN").unwrap();
    let to = to.to_string();
    cluster
        .pod(client)
        .spawn(&[
            pod_bin.to_str().unwrap(),
            "hold",
            "--to",
            &to,
            "--seconds",
            "30",
        ])
        .unwrap()
}

/// Waits for `hold` to end and returns what it printed.
fn broken(process: &tests::Process) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    while process.is_running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!process.is_running(), "the connection survived its agent");
    process.log_text()
}

#[test]
fn a_dying_agent_resets_the_connections_it_carries_instead_of_ending_them() {
    if !require_root() {
        return;
    }
    let cluster = mesh(&[]);
    let (b, c) = (cluster.pod("b"), cluster.pod("c"));
    // Node 1's agent carries all three: same node, HBONE source side, plaintext inbound.
    let held = [
        ("a -> b", hold(&cluster, "a", b.addr_v4(APP))),
        ("a -> c", hold(&cluster, "a", c.addr_v4(APP))),
        ("l1 -> b", hold(&cluster, "l1", b.addr_v4(APP))),
    ];
    std::thread::sleep(Duration::from_millis(500));
    cluster.node(0).kill_agent().unwrap();
    for (what, process) in &held {
        let log = broken(process);
        assert!(
            log.contains("reset by peer"),
            "{what}: a killed agent must reset the application's connection, not end it: {log}"
        );
    }
    // And the destination side: node 2's agent dies under a cross-node connection.
    cluster.node(0).start_agent(&cluster.config_path()).unwrap();
    let cross = hold(&cluster, "a", c.addr_v4(APP));
    std::thread::sleep(Duration::from_millis(500));
    assert!(cross.is_running(), "{}", cross.log_text());
    cluster.node(1).kill_agent().unwrap();
    let log = broken(&cross);
    assert!(log.contains("reset by peer"), "a -> c: {log}");
}

/// Descriptors the process `pid` holds.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn an_idle_proxied_connection_holds_no_more_than_its_two_sockets() {
    if !require_root() {
        return;
    }
    const HELD: usize = 500;
    let cluster = mesh(&[]);
    let agent = cluster.node(0).agent().unwrap().pid();
    let before = open_fds(agent);
    let pod_bin = tests::locate_binary("mesh-pod", "MESH_POD_BIN").unwrap();
    let to = cluster.pod("b").addr_v4(APP).to_string();
    let count = HELD.to_string();
    let holder = cluster
        .pod("a")
        .spawn(&[
            pod_bin.to_str().unwrap(),
            "hold-idle",
            "--to",
            &to,
            "--count",
            &count,
            "--seconds",
            "60",
        ])
        .unwrap();
    assert!(
        tests::eventually(Duration::from_secs(20), || holder
            .log_text()
            .contains("READY")),
        "the connections did not open: {}",
        holder.log_text()
    );
    // Same node: the agent holds the accepted and the delivery socket of each (plus at
    // most 32 empty pipes per worker thread, kept for the next burst).
    let per_connection = (open_fds(agent) - before) as f64 / HELD as f64;
    assert!(
        per_connection <= 2.5,
        "{per_connection:.2} descriptors per idle same-node connection (2 sockets expected)"
    );
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    tests::bench::rss_kib(pid).unwrap()
}

#[test]
fn memory_a_flood_of_connections_took_goes_back_once_they_closed() {
    if !require_root() {
        return;
    }
    const FLOOD: usize = 3000;
    // Idle pooled HBONE connections (what the flood needed) are let go within seconds.
    let cluster = mesh(&["--hbone-pool-idle-timeout", "2s"]);
    let agent = cluster.node(0).agent().unwrap().pid();
    let pod_bin = tests::locate_binary("mesh-pod", "MESH_POD_BIN").unwrap();
    // Warm up once (certificates, pools, first allocations), then measure from there.
    let to = cluster.pod("c").addr_v4(APP).to_string();
    let flood = |count: usize| {
        let count = count.to_string();
        let holder = cluster
            .pod("a")
            .spawn(&[
                pod_bin.to_str().unwrap(),
                "hold-idle",
                "--to",
                &to,
                "--count",
                &count,
                "--seconds",
                "60",
            ])
            .unwrap();
        assert!(
            tests::eventually(Duration::from_secs(60), || holder
                .log_text()
                .contains("READY")),
            "the connections did not open: {}",
            holder.log_text()
        );
        holder
    };
    flood(10).stop().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let before = rss_kib(agent);
    let holder = flood(FLOOD);
    let peak = rss_kib(agent);
    holder.stop().unwrap();
    // The connections close, the pool lets its idle connections go, and the heap is
    // trimmed within its interval.
    let settled = tests::eventually(mesh_agent::memory::TRIM_INTERVAL * 3, || {
        rss_kib(agent) < before + (peak - before) / 4
    });
    let after = rss_kib(agent);
    println!(
        "agent RSS: {before} KiB before, {peak} KiB with {FLOOD} connections, {after} KiB after"
    );
    assert!(
        peak > before + 10_000,
        "the flood took only {} KiB",
        peak - before
    );
    assert!(
        settled,
        "the agent kept {after} KiB after the flood ({before} KiB before, {peak} KiB at its peak)"
    );
}
