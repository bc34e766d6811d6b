//! Kernel suite for the foundation: eBPF capture of enrolled pods, the L4 proxy, the
//! watched file config, fail-closed behaviour with the agent down, adoption on restart,
//! and `mesh-agent uninstall`. Every test builds its own cluster of network namespaces,
//! cgroups and bpffs pins, and real agents.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use mesh_agent::ebpf::{AttachType, attached_count};
use tests::metrics::Metrics;
use tests::{Cluster, ConfigOptions, ConnectReport, Pod, PodSpec, eventually, require_root};

const MIB: u64 = 1 << 20;
const OPENED: &str = "istio_tcp_connections_opened_total";
const RECEIVED: &str = "istio_tcp_received_bytes_total";
const SENT: &str = "istio_tcp_sent_bytes_total";
const APP: u16 = 8080;
const SAME_NODE: &str = "mesh_agent_same_node_connections_total";

/// Two nodes; `shop` is ambient with `a`, `b` on node 1 and `c` on node 2; `legacy` is
/// not enrolled, with `l1` on node 1 and `l2` on node 2. Agents running.
fn mesh() -> Cluster {
    let cluster = Cluster::builder()
        .nodes(2)
        .ambient_namespace("shop")
        .namespace("legacy", [("team", "old")])
        .pod(PodSpec::new("a", "shop", 0).label("app", "client"))
        .pod(PodSpec::new("b", "shop", 0).label("app", "web"))
        .pod(PodSpec::new("c", "shop", 1).label("app", "web"))
        .pod(PodSpec::new("l1", "legacy", 0))
        .pod(PodSpec::new("l2", "legacy", 1))
        .build()
        .expect("building the test cluster");
    for pod in ["b", "c", "l1", "l2"] {
        cluster
            .pod(pod)
            .spawn_server(&[APP])
            .expect("starting a server");
    }
    let config = cluster.config_path();
    cluster
        .write_config(&config, &ConfigOptions::default())
        .expect("writing the config");
    cluster.start_agents(&config).expect("starting the agents");
    cluster
}

fn metrics(cluster: &Cluster, node: usize) -> Metrics {
    Metrics::parse(&cluster.node(node).metrics().expect("reading /metrics"))
}

/// Whether the client's connection went through its agent's outbound listener: under
/// capture the application's socket is connected to the loopback listener.
fn captured(report: &ConnectReport) -> bool {
    report.local.is_some_and(|a| a.ip().is_loopback())
}

fn assert_carried(client: &Pod, to: SocketAddr, bytes: u64) -> ConnectReport {
    let report = client.connect(to, bytes).expect("running the client");
    assert!(report.ok, "{} -> {to}: {report:?}", client.name());
    assert_eq!(
        (report.sent, report.received),
        (bytes, bytes),
        "byte-exact both ways: {report:?}"
    );
    let own = if to.is_ipv4() {
        client.ipv4().into()
    } else {
        std::net::IpAddr::from(client.ipv6())
    };
    assert_eq!(
        report.server_saw_peer.map(|a| a.ip()),
        Some(own),
        "server must see the client pod: {report:?}"
    );
    assert_eq!(
        report.getpeername,
        Some(to),
        "getpeername must return what was dialed: {report:?}"
    );
    assert!(
        captured(&report),
        "{} -> {to} was not captured: {report:?}",
        client.name()
    );
    report
}

fn source_filter<'a>(src: &'a str, dst: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![
        ("reporter", "source"),
        ("source_workload", src),
        ("destination_workload", dst),
    ]
}

#[test]
fn enrolled_traffic_is_carried_same_node_and_cross_node_byte_exact_over_ipv4_and_ipv6() {
    if !require_root() {
        return;
    }
    let cluster = mesh();
    let (a, b, c) = (cluster.pod("a"), cluster.pod("b"), cluster.pod("c"));
    let cases = [
        (b.addr_v4(APP), 0), // same node
        (b.addr_v6(APP), 0),
        (c.addr_v4(APP), 1), // cross node
        (c.addr_v6(APP), 1),
    ];
    for (to, dst_node) in cases {
        let src_before = metrics(&cluster, 0);
        let dst_before = metrics(&cluster, dst_node);
        assert_carried(&a, to, 10 * MIB);
        // Counted by the source agent as `source` and by the destination agent as
        // `destination`, with the request and response bytes of the echo.
        let dst_filter = [("reporter", "destination"), ("source_workload", "client")];
        assert!(
            eventually(Duration::from_secs(5), || {
                let (s, d) = (metrics(&cluster, 0), metrics(&cluster, dst_node));
                s.sum(OPENED, &source_filter("client", "web"))
                    == src_before.sum(OPENED, &source_filter("client", "web")) + 1.0
                    && s.sum(RECEIVED, &source_filter("client", "web"))
                        >= src_before.sum(RECEIVED, &source_filter("client", "web"))
                            + (10 * MIB) as f64
                    && s.sum(SENT, &source_filter("client", "web"))
                        >= src_before.sum(SENT, &source_filter("client", "web")) + (10 * MIB) as f64
                    && d.sum(OPENED, &dst_filter) == dst_before.sum(OPENED, &dst_filter) + 1.0
            }),
            "metrics for {to}:\nsource node:\n{}\ndestination node:\n{}",
            cluster.node(0).metrics().unwrap_or_default(),
            cluster.node(dst_node).metrics().unwrap_or_default()
        );
        // Same node: carried by this node's agent alone (whichever datapath).
        let spliced = |m: &Metrics| m.sum(SAME_NODE, &[]);
        assert_eq!(
            spliced(&metrics(&cluster, 0)) - spliced(&src_before),
            if dst_node == 0 { 1.0 } else { 0.0 },
            "same-node connections for {to}"
        );
        let dst = to.to_string();
        assert!(
            eventually(Duration::from_secs(5), || cluster
                .node(0)
                .access_log()
                .iter()
                .any(|l| l.contains("direction=\"outbound\"")
                    && l.contains(&format!("dst.addr={dst}")))),
            "no outbound access-log line for {dst}:\n{}",
            cluster.node(0).agent_log()
        );
    }
}

#[test]
fn non_enrolled_pods_are_untouched_and_inbound_to_any_port_of_an_enrolled_pod_is_captured() {
    if !require_root() {
        return;
    }
    let cluster = mesh();
    let (l1, l2, c) = (cluster.pod("l1"), cluster.pod("l2"), cluster.pod("c"));
    let before = [metrics(&cluster, 0), metrics(&cluster, 1)];

    // legacy -> legacy, cross node: nothing of the mesh is involved.
    let report = l1
        .connect(l2.addr_v4(APP), MIB)
        .expect("running the client");
    assert!(report.ok, "{report:?}");
    assert_eq!(
        report.local.map(|a| a.ip()),
        Some(l1.ipv4().into()),
        "not redirected: {report:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    for (node, b) in before.iter().enumerate() {
        assert_eq!(
            metrics(&cluster, node).sum(OPENED, &[]),
            b.sum(OPENED, &[]),
            "node {node} counted non-mesh traffic"
        );
    }

    // legacy -> enrolled pod, on ports the test picks: all steered into the inbound proxy.
    c.spawn_server(&[9191, 31000])
        .expect("starting more servers");
    for port in [APP, 9191, 31000] {
        let before = metrics(&cluster, 1).sum(
            OPENED,
            &[("reporter", "destination"), ("destination_workload", "web")],
        );
        let report = l1
            .connect(c.addr_v4(port), MIB)
            .expect("running the client");
        assert!(report.ok, "{report:?}");
        assert_eq!(
            report.server_saw_peer.map(|a| a.ip()),
            Some(l1.ipv4().into()),
            "{report:?}"
        );
        assert!(
            eventually(Duration::from_secs(5), || metrics(&cluster, 1).sum(
                OPENED,
                &[("reporter", "destination"), ("destination_workload", "web")]
            ) == before + 1.0),
            "inbound to port {port} was not captured:\n{}",
            cluster.node(1).metrics().unwrap_or_default()
        );
    }
}

#[test]
fn pods_removed_from_the_file_are_released_within_2s_and_added_pods_are_enrolled() {
    if !require_root() {
        return;
    }
    let cluster = mesh();
    let (a, c) = (cluster.pod("a"), cluster.pod("c"));
    let config = cluster.config_path();
    assert_carried(&a, c.addr_v4(APP), MIB);

    cluster
        .write_config(&config, &ConfigOptions::default().exclude("a"))
        .unwrap();
    let released = eventually(Duration::from_secs(2), || {
        a.connect(c.addr_v4(APP), 1024)
            .is_ok_and(|r| r.ok && !captured(&r))
    });
    assert!(
        released,
        "pod a still captured 2 s after leaving the file:\n{}",
        cluster.node(0).agent_log()
    );

    cluster
        .write_config(&config, &ConfigOptions::default())
        .unwrap();
    let enrolled = eventually(Duration::from_secs(2), || {
        a.connect(c.addr_v4(APP), 1024)
            .is_ok_and(|r| r.ok && captured(&r))
    });
    assert!(
        enrolled,
        "pod a not captured 2 s after returning to the file:\n{}",
        cluster.node(0).agent_log()
    );

    // A brand-new pod appears: enrolled without a restart.
    let d = cluster
        .add_pod(PodSpec::new("d", "shop", 0).label("app", "late"))
        .unwrap();
    cluster
        .write_config(&config, &ConfigOptions::default())
        .unwrap();
    let enrolled = eventually(Duration::from_secs(2), || {
        d.connect(c.addr_v4(APP), 1024)
            .is_ok_and(|r| r.ok && captured(&r))
    });
    assert!(
        enrolled,
        "new pod d not captured:\n{}",
        cluster.node(0).agent_log()
    );
}

#[test]
fn pods_of_one_service_account_each_keep_their_own_address_across_the_tunnel() {
    if !require_root() {
        return;
    }
    // a and b share node 1 and the service account `default`: one identity, two pods.
    let cluster = mesh();
    let c = cluster.pod("c");
    for to in [c.addr_v4(APP), c.addr_v6(APP)] {
        for client in ["a", "b", "a"] {
            assert_carried(&cluster.pod(client), to, 1024);
        }
    }
}

#[test]
fn enroll_and_release_cycles_leave_no_descriptor_behind() {
    if !require_root() {
        return;
    }
    let cluster = mesh();
    let node = cluster.node(0);
    let config = cluster.config_path();
    let pid = node.agent().expect("the agent runs").pid();
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let enrolled = |n: usize| {
        eventually(Duration::from_secs(5), || {
            node.config_dump()
                .is_ok_and(|d| d["enrolled"].as_array().map_or(0, Vec::len) == n)
        })
    };
    let without_a = ConfigOptions::default().exclude("a");
    cluster.write_config(&config, &without_a).unwrap();
    assert!(enrolled(1), "pod a not released:\n{}", node.agent_log());
    let baseline = fds();
    for round in 1..=5 {
        cluster
            .write_config(&config, &ConfigOptions::default())
            .unwrap();
        assert!(enrolled(2), "round {round}: pod a not enrolled");
        cluster.write_config(&config, &without_a).unwrap();
        assert!(enrolled(1), "round {round}: pod a not released");
        assert!(
            eventually(Duration::from_secs(2), || fds() <= baseline),
            "round {round}: the agent holds {} descriptors, {baseline} before the first \
             enrollment",
            fds()
        );
    }
}

#[test]
fn an_invalid_config_edit_keeps_the_previous_state_and_logs_a_clear_error() {
    if !require_root() {
        return;
    }
    let cluster = mesh();
    let (a, c) = (cluster.pod("a"), cluster.pod("c"));
    let config = cluster.config_path();
    let good = std::fs::read_to_string(&config).unwrap();
    // Break pod a's address and drop pod c: neither may take effect.
    let broken = cluster
        .config_yaml(&ConfigOptions::default().exclude("c"))
        .unwrap()
        .replace(&format!("ip: {}", a.ipv4()), "ip: 10.999.1.1");
    assert_ne!(broken, good);
    replace_file(&config, &broken);

    let logged = eventually(Duration::from_secs(3), || {
        let log = cluster.node(0).agent_log();
        log.contains("document")
            && log.contains("10.999.1.1")
            && log.contains("keeping the previous configuration")
    });
    assert!(
        logged,
        "no clear error in the log:\n{}",
        cluster.node(0).agent_log()
    );
    assert_carried(&a, c.addr_v4(APP), MIB);
    let dump = cluster.node(1).config_dump().unwrap();
    assert!(
        dump.to_string().contains("\"c\""),
        "node 2 dropped pod c: {dump}"
    );
    assert_eq!(
        cluster.node(1).http_get(15021, "/healthz/ready").unwrap().0,
        200
    );
}

#[test]
fn an_emptied_or_half_written_config_never_releases_pods_or_drops_policies() {
    if !require_root() {
        return;
    }
    let cluster = mesh();
    let (a, c) = (cluster.pod("a"), cluster.pod("c"));
    let config = cluster.config_path();
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-web, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules:\n  - to:\n    - operation: {ports: [\"8080\"]}\n";
    let without_policy = cluster.config_yaml(&ConfigOptions::default()).unwrap();
    let full = cluster
        .config_yaml(&ConfigOptions::default().document(deny))
        .unwrap();
    replace_file(&config, &full);
    assert!(
        eventually(Duration::from_secs(3), || !a
            .connect_timeout(c.addr_v4(APP), 64, Duration::from_secs(1))
            .unwrap()
            .ok),
        "the DENY never applied"
    );

    // A client keeps trying the denied port while the file is rewritten in place five
    // times: truncated, then written without the policy, then whole, each version
    // visible for 150 ms. Not one connection may get through.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (a, to, stop) = (a.clone(), c.addr_v4(APP), stop.clone());
        std::thread::spawn(move || {
            let (mut tried, mut through) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = a.connect_timeout(to, 64, Duration::from_secs(1)).unwrap();
                tried += 1;
                through += usize::from(r.ok);
            }
            (tried, through)
        })
    };
    for _ in 0..5 {
        for version in ["", without_policy.as_str(), full.as_str()] {
            std::fs::write(&config, version).unwrap();
            std::thread::sleep(Duration::from_millis(150));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (tried, through) = prober.join().unwrap();
    assert!(tried >= 20, "only {tried} probes ran");
    assert_eq!(
        through, 0,
        "{through} of {tried} connections to a DENY'd port got through"
    );

    // Left empty (or comments only, or `---` only), the file is refused and said so; the
    // pods stay captured and the policy stays.
    for empty in ["", "# everything removed\n", "---\n"] {
        std::fs::write(&config, empty).unwrap();
        std::thread::sleep(Duration::from_millis(1200));
        let r = a
            .connect_timeout(c.addr_v4(APP), 64, Duration::from_secs(1))
            .unwrap();
        // Denied after the agent accepted it: the reset may land before the client's
        // connect returns (a loaded machine), and then there is no local address to show
        // the capture; only a captured connection is reset, the server itself echoes.
        let reset = r
            .error
            .as_deref()
            .is_some_and(|e| e.contains("reset by peer"));
        assert!(!r.ok && (captured(&r) || reset), "{empty:?} applied: {r:?}");
    }
    let log = cluster.node(0).agent_log();
    assert!(
        log.contains("no objects") && log.contains("items: []"),
        "{log}"
    );

    // An explicit empty List releases every pod: traffic flows outside the mesh.
    std::fs::write(&config, "apiVersion: v1\nkind: List\nitems: []\n").unwrap();
    assert!(
        eventually(Duration::from_secs(3), || a
            .connect(c.addr_v4(APP), 1024)
            .is_ok_and(|r| r.ok && !captured(&r))),
        "an explicit empty List did not release the pods"
    );
}

/// As in the DaemonSet's container: `/proc/sys` is read-only, and the host's procfs is
/// mounted writable elsewhere (the manifest mounts it at /host/proc and passes
/// `--proc-root`). Enrollment writes its sysctls inside each pod's namespace through
/// `--proc-root`; with the default it cannot.
#[test]
fn in_a_container_with_a_read_only_proc_sys_enrollment_writes_through_proc_root() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(1)
        .ambient_namespace("shop")
        .pod(PodSpec::new("a", "shop", 0).label("app", "client"))
        .pod(PodSpec::new("b", "shop", 0).label("app", "web"))
        .build()
        .expect("building the test cluster");
    let (a, b) = (cluster.pod("a"), cluster.pod("b"));
    b.spawn_server(&[APP]).unwrap();
    let config = cluster.config_path();
    cluster
        .write_config(&config, &ConfigOptions::default())
        .unwrap();
    let host_proc = cluster.workdir().join("host-proc");
    std::fs::create_dir_all(&host_proc).unwrap();
    let host_proc = host_proc.to_str().unwrap();
    // A private mount namespace: a fresh procfs at host-proc, then /proc/sys read-only.
    let container = format!(
        "mount -t proc proc {host_proc} && mount --bind /proc/sys /proc/sys && \
         mount -o remount,bind,ro /proc/sys && exec \"$@\""
    );
    let wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-ec",
        &container,
        "sh",
    ];
    let node = cluster.node(0);

    node.spawn_agent_wrapped(&config, &[], &wrapper).unwrap();
    let refused = eventually(Duration::from_secs(10), || {
        node.http_get(15021, "/healthz/ready")
            .is_ok_and(|(status, body)| status == 503 && body.contains("Read-only file system"))
    });
    assert!(refused, "{}", node.agent_log());
    node.stop_agent().unwrap();

    node.spawn_agent_wrapped(&config, &["--proc-root", host_proc], &wrapper)
        .unwrap();
    node.wait_agent_ready(Duration::from_secs(10)).unwrap();
    assert_carried(&a, b.addr_v4(APP), MIB);
}

#[test]
fn a_stopped_agent_fails_closed_a_restarted_one_adopts_its_pins_and_uninstall_removes_everything() {
    if !require_root() {
        return;
    }
    let cluster = mesh();
    let (a, b, c, l2) = (
        cluster.pod("a"),
        cluster.pod("b"),
        cluster.pod("c"),
        cluster.pod("l2"),
    );
    a.spawn_server(&[APP]).unwrap();
    let node = cluster.node(0);
    assert_carried(&a, c.addr_v4(APP), MIB);

    node.stop_agent().unwrap();
    // Outbound from an enrolled pod: refused, never sent around the mesh.
    for to in [c.addr_v4(APP), c.addr_v6(APP), b.addr_v4(APP)] {
        let r = a.connect_timeout(to, 1024, Duration::from_secs(2)).unwrap();
        assert!(
            !r.ok && r.server_saw_peer.is_none(),
            "outbound {to} leaked with the agent down: {r:?}"
        );
    }
    // Inbound to an enrolled pod, from a pod outside the mesh and from a meshed pod on the
    // other node: dropped, never delivered to the application.
    for (client, to) in [
        (&l2, a.addr_v4(APP)),
        (&l2, a.addr_v6(APP)),
        (&c, a.addr_v4(APP)),
    ] {
        let r = client
            .connect_timeout(to, 1024, Duration::from_secs(2))
            .unwrap();
        assert!(
            !r.ok && r.server_saw_peer.is_none(),
            "inbound {to} reached the app with the agent down: {r:?}"
        );
    }

    node.start_agent(&cluster.config_path()).unwrap();
    assert_carried(&a, c.addr_v4(APP), MIB);
    assert_carried(&c, a.addr_v6(APP), MIB);
    for (_, ty) in mesh_agent::ebpf::CGROUP_PROGRAMS {
        assert_eq!(
            attached_count(node.cgroup(), ty).unwrap(),
            1,
            "{ty:?} attached more than once after restart"
        );
    }
    assert_eq!(
        attached_count(a.netns_path(), AttachType::SkLookup).unwrap(),
        1,
        "sk_lookup attached more than once"
    );

    node.stop_agent().unwrap();
    node.uninstall().unwrap();
    for (_, ty) in mesh_agent::ebpf::CGROUP_PROGRAMS {
        assert_eq!(
            attached_count(node.cgroup(), ty).unwrap(),
            0,
            "{ty:?} still attached after uninstall"
        );
    }
    assert_eq!(
        attached_count(a.netns_path(), AttachType::SkLookup).unwrap(),
        0,
        "sk_lookup still attached"
    );
    assert!(
        !node.bpffs_dir().exists(),
        "pins left in {}",
        node.bpffs_dir().display()
    );
    // Released: traffic flows again, outside the mesh.
    let r = a.connect(l2.addr_v4(APP), 1024).unwrap();
    assert!(r.ok && !captured(&r), "{r:?}");
}

fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn enrollment_errors_name_the_pod_keep_the_agent_not_ready_and_heal_once_fixed_while_a_pod_without_namespace_waits()
 {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .ambient_namespace("shop")
        .pod(PodSpec::new("a", "shop", 0).label("app", "client"))
        .pod(PodSpec::new("b", "shop", 0).label("app", "web"))
        .pod(PodSpec::new("c", "shop", 1).label("app", "web"))
        .build()
        .expect("building the test cluster");
    let (a, b, c) = (cluster.pod("a"), cluster.pod("b"), cluster.pod("c"));
    c.spawn_server(&[APP]).unwrap();
    // Something in pod b already holds the inbound port.
    let squatter = b.spawn_server(&[15006]).unwrap();
    // A pod whose network namespace does not exist yet.
    let ghost = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: ghost, namespace: shop, uid: ghost-uid, annotations: {{mesh-agent.io/netns: /run/netns/{}-nope}}}}\nspec: {{nodeName: {}, containers: [{{name: app, image: x}}]}}\nstatus: {{phase: Running, podIP: 10.201.2.99, podIPs: [{{ip: 10.201.2.99}}]}}\n",
        cluster.prefix(),
        cluster.node(1).name()
    );
    let config = cluster.config_path();
    cluster
        .write_config(&config, &ConfigOptions::default().document(ghost))
        .unwrap();
    for node in cluster.nodes() {
        node.spawn_agent(&config, &[]).unwrap();
    }
    let not_ready = |node: usize, pod: &str, why: &str| {
        eventually(Duration::from_secs(10), || {
            cluster
                .node(node)
                .http_get(15021, "/healthz/ready")
                .is_ok_and(|(status, body)| {
                    status == 503 && body.contains(pod) && body.contains(why)
                })
        })
    };
    assert!(
        not_ready(0, "shop/b", "15006"),
        "{}",
        cluster.node(0).agent_log()
    );
    // A pod whose namespace does not exist yet cannot be captured yet: the agent is ready,
    // says the pod is pending, and says it once, not at every retry.
    let ready_pending = eventually(Duration::from_secs(10), || {
        cluster
            .node(1)
            .http_get(15021, "/healthz/ready")
            .is_ok_and(|(status, body)| {
                status == 200 && body.contains("shop/ghost: pending") && body.contains("nope")
            })
    });
    assert!(ready_pending, "{}", cluster.node(1).agent_log());
    std::thread::sleep(Duration::from_secs(3));
    let ghost_lines = cluster
        .node(1)
        .agent_log()
        .lines()
        .filter(|l| l.contains("ghost"))
        .count();
    assert_eq!(ghost_lines, 1, "{}", cluster.node(1).agent_log());
    // A failure retried every second is logged when it starts, not at every attempt.
    let failed_lines = cluster
        .node(0)
        .agent_log()
        .lines()
        .filter(|l| l.contains("enrollment failed"))
        .count();
    assert_eq!(failed_lines, 1, "{}", cluster.node(0).agent_log());
    // Not ready, yet alive: one pod's trouble must not get the agent restarted.
    assert_eq!(
        cluster.node(0).http_get(15021, "/healthz/live").unwrap().0,
        200
    );
    // The other pods are served all the same.
    assert_carried(&a, c.addr_v4(APP), MIB);

    // Once its namespace exists, the waiting pod is enrolled.
    let nope = format!("{}-nope", cluster.prefix());
    for args in [
        &["netns", "add", &nope][..],
        &["-n", &nope, "link", "set", "lo", "up"],
    ] {
        let done = std::process::Command::new("ip")
            .args(args)
            .status()
            .unwrap();
        assert!(done.success(), "ip {args:?}");
    }
    let enrolled = eventually(Duration::from_secs(5), || {
        cluster
            .node(1)
            .config_dump()
            .is_ok_and(|d| d["enrolled"].to_string().contains("ghost-uid"))
    });
    assert!(enrolled, "{}", cluster.node(1).agent_log());

    squatter.stop().unwrap();
    let healed = eventually(Duration::from_secs(5), || {
        cluster
            .node(0)
            .http_get(15021, "/healthz/ready")
            .is_ok_and(|(s, _)| s == 200)
    });
    assert!(
        healed,
        "pod b not enrolled after its port was freed:\n{}",
        cluster.node(0).agent_log()
    );
}
