//! Kernel suite for L4 AuthorizationPolicy, enforced at the destination on both the HBONE
//! (cross-node) and the same-node path: namespace isolation, principal allow-lists, DENY by
//! port, ipBlocks for clients outside the mesh, allow-nothing, live connections cut when a
//! DENY arrives, dry-run, and invalid policies failing closed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tests::metrics::Metrics;
use tests::{Cluster, ConfigOptions, Pod, PodSpec, require_root};

const APP: u16 = 8080;

/// Two nodes. `shop` (ambient): `a` (sa client) and `b` (sa web) on node 1, `c` (app web,
/// sa web) on node 2. `other` (ambient): `o` on node 1. `legacy`: `l1` on node 1, `l2` on
/// node 2. Echo servers in `b` and `c` on 8080 and 9191.
fn cluster() -> Cluster {
    let cluster = Cluster::builder()
        .nodes(2)
        .ambient_namespace("shop")
        .ambient_namespace("other")
        .namespace("legacy", [("team", "old")])
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
        .pod(
            PodSpec::new("c", "shop", 1)
                .label("app", "web")
                .service_account("web"),
        )
        .pod(
            PodSpec::new("o", "other", 0)
                .label("app", "intruder")
                .service_account("intruder"),
        )
        .pod(PodSpec::new("l1", "legacy", 0))
        .pod(PodSpec::new("l2", "legacy", 1))
        .build()
        .expect("building the test cluster");
    for pod in ["b", "c"] {
        cluster
            .pod(pod)
            .spawn_server(&[APP, 9191])
            .expect("starting a server");
    }
    cluster
        .write_config(&cluster.config_path(), &ConfigOptions::default())
        .unwrap();
    cluster.start_agents(&cluster.config_path()).unwrap();
    cluster
}

fn policy(name: &str, namespace: &str, body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\n{body}"
    )
}

/// Applies `policies` and waits until the agents run with them (a probe flips).
fn apply(cluster: &Cluster, policies: &[String]) {
    apply_options(cluster, policies, ConfigOptions::default());
}

/// [`apply`] for policies that are wrong on purpose (`analyze` reports them).
fn apply_broken(cluster: &Cluster, policies: &[String]) {
    apply_options(
        cluster,
        policies,
        ConfigOptions::default().with_deliberate_errors(),
    );
}

fn apply_options(cluster: &Cluster, policies: &[String], opts: ConfigOptions) {
    let opts = policies.iter().fold(opts, |o, p| o.document(p.clone()));
    cluster.write_config(&cluster.config_path(), &opts).unwrap();
    cluster.wait_synced(Duration::from_secs(5)).unwrap();
}

fn allowed(client: &Pod, to: SocketAddr) -> bool {
    let r = client
        .connect_timeout(to, 4096, Duration::from_secs(3))
        .expect("running the client");
    r.ok && r.server_saw_peer.is_some()
}

/// Each case's connection is made and must be `want`; `mesh-agent authz check` on the same
/// configuration must answer the same.
fn expect(cluster: &Cluster, cases: &[(&str, SocketAddr, bool)]) {
    for (client, to, want) in cases {
        let got = allowed(&cluster.pod(client), *to);
        let (explained, report) = cluster.authz_check(client, *to, &[]);
        assert_eq!(
            explained, got,
            "{client} -> {to}: authz check says otherwise than enforcement did:\n{report}"
        );
        // The agent's own answer, on its admin port, from the state it enforces.
        let pod = cluster.pod(client);
        let (status, body) = cluster
            .node(0)
            .http_get(
                15000,
                &format!(
                    "/debug/authz?from={}/{}&to={to}",
                    pod.namespace(),
                    pod.name()
                ),
            )
            .unwrap();
        assert_eq!(status, 200, "{body}");
        let verdict = if got {
            "verdict: ALLOWED"
        } else {
            "verdict: DENIED"
        };
        assert!(
            body.contains(verdict),
            "{client} -> {to}: /debug/authz:\n{body}"
        );
        assert_eq!(
            got,
            *want,
            "{client} -> {to}: expected {}, got {}\nnode1 log:\n{}\nnode2 log:\n{}",
            if *want { "allowed" } else { "denied" },
            if got { "allowed" } else { "denied" },
            tail(&cluster.node(0).agent_log()),
            tail(&cluster.node(1).agent_log())
        );
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

#[test]
fn namespace_isolation_and_principal_allow_list_hold_same_node_and_cross_node() {
    if !require_root() {
        return;
    }
    let cluster = cluster();
    let (b, c) = (cluster.pod("b"), cluster.pod("c"));
    let own_namespace_only = policy(
        "same-namespace",
        "shop",
        "spec:\n  selector: {matchLabels: {app: web}}\n  action: ALLOW\n  rules:\n  - from:\n    - source: {namespaces: [shop]}\n",
    );
    apply(&cluster, &[own_namespace_only]);
    expect(
        &cluster,
        &[
            ("a", c.addr_v4(APP), true),   // cross node, same namespace
            ("a", b.addr_v6(APP), true),   // same node, same namespace
            ("o", c.addr_v4(APP), false),  // cross node, other namespace: 401 on the CONNECT
            ("o", b.addr_v4(APP), false),  // same node, other namespace
            ("l2", c.addr_v4(APP), false), // plaintext: no namespace at all
        ],
    );
    let denied = Metrics::parse(&cluster.node(1).metrics().unwrap()).sum(
        "mesh_agent_connections_denied_total",
        &[("reason", "authorization_policy")],
    );
    assert!(denied >= 2.0, "denials not counted on node 2: {denied}");

    let principals = policy(
        "only-client",
        "shop",
        "spec:\n  selector: {matchLabels: {app: web}}\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/shop/sa/client]}\n",
    );
    apply(&cluster, &[principals]);
    expect(
        &cluster,
        &[
            ("a", c.addr_v4(APP), true),
            ("b", c.addr_v4(APP), false),
            ("a", b.addr_v4(APP), true),
            ("o", b.addr_v4(APP), false),
        ],
    );
}

#[test]
fn deny_by_port_ip_blocks_for_plaintext_and_allow_nothing() {
    if !require_root() {
        return;
    }
    let cluster = cluster();
    let (b, c, l1) = (cluster.pod("b"), cluster.pod("c"), cluster.pod("l1"));
    let deny_port = policy(
        "no-9191",
        "shop",
        "spec:\n  action: DENY\n  rules:\n  - to:\n    - operation: {ports: [\"9191\"]}\n",
    );
    apply(&cluster, &[deny_port]);
    expect(
        &cluster,
        &[
            ("a", c.addr_v4(APP), true),
            ("a", c.addr_v4(9191), false),
            ("a", b.addr_v4(9191), false),
            ("l1", c.addr_v4(9191), false),
        ],
    );
    assert!(
        cluster.node(1).agent_log().contains("shop/no-9191"),
        "the access log must name the deciding policy"
    );

    let ip_blocks = policy(
        "from-l1",
        "shop",
        &format!(
            "spec:\n  selector: {{matchLabels: {{app: web}}}}\n  rules:\n  - from:\n    - source: {{ipBlocks: [\"{}/32\"]}}\n",
            l1.ipv4()
        ),
    );
    apply(&cluster, &[ip_blocks]);
    expect(
        &cluster,
        &[
            ("l1", c.addr_v4(APP), true),
            ("l2", c.addr_v4(APP), false),
            ("a", c.addr_v4(APP), false),
        ],
    );

    let allow_nothing = policy("allow-nothing", "shop", "spec: {}\n");
    apply(&cluster, &[allow_nothing]);
    expect(
        &cluster,
        &[
            ("a", c.addr_v4(APP), false),
            ("a", b.addr_v4(APP), false),
            ("l1", c.addr_v6(APP), false),
        ],
    );
}

#[test]
fn a_deny_added_to_the_file_cuts_live_connections_within_2s_and_dry_run_only_logs() {
    if !require_root() {
        return;
    }
    let cluster = cluster();
    let (b, c) = (cluster.pod("b"), cluster.pod("c"));
    let deny_client = |dry_run: bool| {
        let annotation = if dry_run {
            "  annotations: {istio.io/dry-run: \"true\"}\n"
        } else {
            ""
        };
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-client\n  namespace: shop\n{annotation}spec:\n  action: DENY\n  rules:\n  - from:\n    - source: {{principals: [\"*/sa/client\"]}}\n"
        )
    };

    // Dry run: traffic flows, the would-be denial is logged.
    apply(&cluster, &[deny_client(true)]);
    expect(
        &cluster,
        &[("a", c.addr_v4(APP), true), ("a", b.addr_v4(APP), true)],
    );
    assert!(
        cluster
            .node(1)
            .agent_log()
            .contains("dry-run: connection would be denied")
    );

    // Live connections, cross node (HBONE) and same node, then the DENY arrives.
    let a = cluster.pod("a");
    let pod_bin = tests::locate_binary("mesh-pod", "MESH_POD_BIN").unwrap();
    let pod_bin = pod_bin.to_str().unwrap();
    let hold = |to: SocketAddr| {
        a.spawn(&[pod_bin, "hold", "--to", &to.to_string(), "--seconds", "20"])
            .unwrap()
    };
    let (cross, same) = (hold(c.addr_v4(APP)), hold(b.addr_v4(APP)));
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        cross.is_running() && same.is_running(),
        "{}{}",
        cross.log_text(),
        same.log_text()
    );
    let opts = ConfigOptions::default().document(deny_client(false));
    cluster.write_config(&cluster.config_path(), &opts).unwrap();
    let written = Instant::now();
    let cut = |p: &tests::cluster::Process| {
        while written.elapsed() < Duration::from_secs(2) {
            if p.try_wait().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        p.try_wait().is_some()
    };
    assert!(
        cut(&cross),
        "cross-node connection still open 2 s after the DENY: {}",
        cross.log_text()
    );
    assert!(
        cut(&same),
        "same-node connection still open 2 s after the DENY: {}",
        same.log_text()
    );
    assert!(cross.log_text().contains("broken"), "{}", cross.log_text());
    expect(
        &cluster,
        &[("a", c.addr_v4(APP), false), ("b", c.addr_v4(APP), true)],
    );
}

#[test]
fn an_invalid_policy_is_rejected_by_name_and_fails_closed_for_its_workloads() {
    if !require_root() {
        return;
    }
    let cluster = cluster();
    let (b, c) = (cluster.pod("b"), cluster.pod("c"));
    let broken = policy(
        "bad-cidr",
        "shop",
        "spec:\n  selector: {matchLabels: {app: web}}\n  action: ALLOW\n  rules:\n  - from:\n    - source: {ipBlocks: [\"10.0.0.0/99\"]}\n",
    );
    apply_broken(&cluster, &[broken]);
    expect(
        &cluster,
        &[
            ("a", c.addr_v4(APP), false),
            ("a", b.addr_v4(APP), false),
            ("l1", c.addr_v4(APP), false),
        ],
    );
    let log = cluster.node(1).agent_log();
    assert!(
        log.contains("bad-cidr") && log.contains("10.0.0.0/99"),
        "the error must name the policy and value:\n{}",
        tail(&log)
    );

    let unknown_action = policy(
        "odd",
        "shop",
        "spec:\n  selector: {matchLabels: {app: web}}\n  action: MAYBE\n",
    );
    apply_broken(&cluster, &[unknown_action]);
    expect(&cluster, &[("a", c.addr_v4(APP), false)]);
    assert!(cluster.node(1).agent_log().contains("MAYBE"));
}
