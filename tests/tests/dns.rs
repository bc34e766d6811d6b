//! Kernel suite for DNS in the mesh: an enrolled pod's DNS goes to the agent's resolver in
//! its namespace (eBPF `connect`, `sendmsg`, `recvmsg`, `getpeername`), which answers mesh
//! names itself and forwards the rest to the server the pod asked, unchanged; pods outside
//! the mesh, or that opt out, are left alone; with the agent stopped, DNS fails closed.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tests::capture::Capture;
use tests::dns_workload::{QueryReport, SERVER_TTL};
use tests::{Cluster, ConfigOptions, Pod, PodSpec, Process, require_root};

const REVIEWS_VIP: &str = "10.96.0.20";
const NS: &str = "bookinfo";
/// A ServiceEntry host outside the mesh: the `outsider` pod, port 8080.
const EXTERNAL: &str = "api.external.test";
const APP: u16 = 8080;

/// One node. `bookinfo` is ambient with `client`, `optout` (annotated out of DNS capture)
/// and `reviews-v1`, selected by Service `reviews`; `dns` (not enrolled) runs the test's
/// DNS server; `legacy` (not enrolled) has `outsider`. The agent runs with its defaults.
fn mesh() -> Cluster {
    let cluster = Cluster::builder()
        .nodes(1)
        .ambient_namespace(NS)
        .namespace("dns", [("team", "infra")])
        .namespace("legacy", [("team", "old")])
        .pod(PodSpec::new("client", NS, 0))
        .pod(PodSpec::new("optout", NS, 0))
        .pod(PodSpec::new("reviews-v1", NS, 0).label("app", "reviews"))
        .pod(PodSpec::new("server", "dns", 0))
        .pod(PodSpec::new("mute", "dns", 0))
        .pod(PodSpec::new("outsider", "legacy", 0))
        .build()
        .expect("building the test cluster");
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: {NS}}}\nspec:\n  clusterIP: {REVIEWS_VIP}\n  selector: {{app: reviews}}\n  ports: [{{name: http, port: 9080}}]\n"
    );
    let outsider = cluster.pod("outsider").addr_v4(APP).ip();
    let entry = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: external-api, namespace: {NS}}}\nspec:\n  hosts: [{EXTERNAL}]\n  location: MESH_EXTERNAL\n  resolution: STATIC\n  ports: [{{number: {APP}, name: tcp-api, protocol: TCP}}]\n  endpoints: [{{address: {outsider}}}]\n"
    );
    let options = ConfigOptions::default()
        .pod_annotations(
            "optout",
            [(mesh_agent::config::DNS_CAPTURE_ANNOTATION, "false")],
        )
        .document(service)
        .document(entry);
    let config = cluster.config_path();
    cluster
        .write_config(&config, &options)
        .expect("writing the config");
    cluster.start_agents(&config).expect("starting the agent");
    cluster
}

/// The test server: `example.test` and `big.test` (whose UDP answer is truncated).
fn dns_server(cluster: &Cluster) -> Process {
    cluster
        .pod("server")
        .spawn_dns_server(
            &[
                ("example.test", "192.0.2.10".parse().unwrap()),
                ("big.test", "192.0.2.11".parse().unwrap()),
            ],
            &["big.test"],
        )
        .expect("starting the DNS server")
}

/// A resolv.conf naming the test server, with a pod's search path in `NS`.
fn resolv_conf(cluster: &Cluster) -> std::path::PathBuf {
    let server = cluster.pod("server").addr_v4(53).ip();
    let path = cluster.workdir().join("resolv.conf");
    std::fs::write(
        &path,
        format!(
            "nameserver {server}\nsearch {NS}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:2 attempts:1\n"
        ),
    )
    .expect("writing resolv.conf");
    path
}

fn getaddrinfo(pod: &Pod, name: &str, conf: &std::path::Path) -> Result<Vec<IpAddr>, String> {
    let conf = conf.to_str().expect("UTF-8 path");
    match pod.run_mesh_pod(&["resolve", "--name", name, "--resolv-conf", conf]) {
        Ok(out) => Ok(serde_json::from_str(out.trim()).expect("resolve prints JSON")),
        Err(e) => Err(format!("{e:#}")),
    }
}

fn query(pod: &Pod, server: SocketAddr, name: &str, tcp: bool) -> Result<QueryReport, String> {
    let server = server.to_string();
    let mut args = vec!["dns-query", "--server", &server, "--name", name];
    if tcp {
        args.push("--tcp");
    }
    match pod.run_mesh_pod(&args) {
        Ok(out) => Ok(serde_json::from_str(out.trim()).expect("dns-query prints JSON")),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// The server's `QUERY` lines for `name`.
fn asked(server: &Process, name: &str) -> Vec<String> {
    server
        .log_text()
        .lines()
        .filter(|l| l.starts_with("QUERY ") && l.split_whitespace().nth(2) == Some(name))
        .map(str::to_owned)
        .collect()
}

#[test]
fn mesh_names_are_answered_in_the_pod_and_the_rest_goes_to_the_server_asked() {
    if !require_root() {
        return;
    }
    let cluster = mesh();
    let server = dns_server(&cluster);
    let conf = resolv_conf(&cluster);
    let (client, outsider, optout) = (
        cluster.pod("client"),
        cluster.pod("outsider"),
        cluster.pod("optout"),
    );
    let server_addr = cluster.pod("server").addr_v4(53);
    let vip: IpAddr = REVIEWS_VIP.parse().unwrap();

    // Mesh names, in every form, through getaddrinfo: answered without a packet on eth0.
    let capture = Capture::start(client.netns_path(), Some("eth0")).expect("starting a capture");
    for name in [
        "reviews",
        "reviews.bookinfo",
        "reviews.bookinfo.svc",
        "reviews.bookinfo.svc.cluster.local",
    ] {
        assert_eq!(
            getaddrinfo(&client, name, &conf),
            Ok(vec![vip]),
            "getaddrinfo({name}) from an enrolled pod"
        );
    }
    // Over TCP too (a stub resolver's retry after truncation).
    let over_tcp = query(
        &client,
        server_addr,
        "reviews.bookinfo.svc.cluster.local",
        true,
    )
    .expect("a mesh name over TCP");
    assert_eq!((over_tcp.rcode, over_tcp.addrs), (0, vec![vip]));
    let seen = capture.stop();
    let dns: Vec<_> = seen
        .iter()
        .filter(|s| s.src.port() == 53 || s.dst.port() == 53)
        .collect();
    assert!(dns.is_empty(), "DNS left the pod for mesh names: {dns:?}");
    assert!(
        server.log_text().lines().all(|l| !l.contains("reviews")),
        "the server was asked for a mesh name:\n{}",
        server.log_text()
    );

    // Another name: forwarded to the server the pod asked, the answer returned unchanged
    // and seen as coming from that server.
    assert_eq!(
        getaddrinfo(&client, "example.test", &conf),
        Ok(vec!["192.0.2.10".parse().unwrap()])
    );
    assert!(!asked(&server, "example.test").is_empty());
    let forwarded = query(&client, server_addr, "example.test", false).expect("forwarded");
    assert_eq!(forwarded.from, server_addr, "the answer's source");
    assert_eq!(forwarded.ttls, vec![SERVER_TTL], "the server's TTL");
    let missing = query(&client, server_addr, "nothing.test", false).expect("NXDOMAIN");
    assert_eq!((missing.rcode, missing.from), (3, server_addr));
    // Truncated over UDP: returned truncated; the stub asks again over TCP, captured too.
    let cut = query(&client, server_addr, "big.test", false).expect("a truncated answer");
    assert!(cut.truncated && cut.addrs.is_empty(), "{cut:?}");
    assert_eq!(
        getaddrinfo(&client, "big.test", &conf),
        Ok(vec!["192.0.2.11".parse().unwrap()])
    );
    assert!(
        asked(&server, "big.test")
            .iter()
            .any(|l| l.starts_with("QUERY tcp")),
        "the retry over TCP reached the server:\n{}",
        server.log_text()
    );

    // ztunnel's DNS series, by query type, transport and the asking pod.
    let text = cluster.nodes()[0].metrics().unwrap();
    let dns = tests::metrics::Metrics::parse(&text);
    let of = |name: &str, filter: &[(&str, &str)]| {
        let mut all = vec![("source_canonical_service", "client")];
        all.extend_from_slice(filter);
        dns.sum(name, &all)
    };
    assert!(
        of(
            "istio_dns_requests_total",
            &[("request_query_type", "a"), ("request_protocol", "udp")]
        ) >= 4.0,
        "{text}"
    );
    assert!(
        of(
            "istio_dns_requests_total",
            &[("request_query_type", "aaaa")]
        ) >= 4.0,
        "{text}"
    );
    assert!(
        of("istio_dns_requests_total", &[("request_protocol", "tcp")]) >= 2.0,
        "{text}"
    );
    assert!(
        of(
            "istio_dns_upstream_requests_total",
            &[("request_query_type", "a")]
        ) >= 3.0,
        "{text}"
    );
    assert_eq!(of("istio_dns_upstream_failures_total", &[]), 0.0, "{text}");

    // A pod outside the mesh, and an enrolled pod that opted out: straight to the server.
    for pod in [&outsider, &optout] {
        let before = asked(&server, "reviews.bookinfo.svc.cluster.local").len();
        let answer = query(
            pod,
            server_addr,
            "reviews.bookinfo.svc.cluster.local",
            false,
        )
        .expect("the server answers");
        assert_eq!(answer.rcode, 3, "{}: the server's own NXDOMAIN", pod.name());
        assert_eq!(
            asked(&server, "reviews.bookinfo.svc.cluster.local").len(),
            before + 1,
            "{}: the query reached the server",
            pod.name()
        );
    }

    // A ServiceEntry host: resolved to the address allocated for it, its traffic routed to
    // its endpoint and counted under its name.
    let Ok(found) = getaddrinfo(&client, EXTERNAL, &conf) else {
        panic!("{EXTERNAL} did not resolve");
    };
    let [IpAddr::V4(allocated)] = found[..] else {
        panic!("{EXTERNAL}: {found:?}");
    };
    assert_eq!(
        allocated.octets()[..2],
        [240, 240],
        "Istio's range: {allocated}"
    );
    assert!(
        asked(&server, EXTERNAL).is_empty(),
        "a ServiceEntry host was forwarded"
    );
    cluster
        .pod("outsider")
        .spawn_server(&[APP])
        .expect("starting the endpoint's server");
    let report = client
        .connect(SocketAddr::from((allocated, APP)), 4096)
        .expect("running the client");
    assert!(report.ok, "to {EXTERNAL} ({allocated}): {report:?}");
    let text = cluster.nodes()[0].metrics().unwrap();
    let metrics = tests::metrics::Metrics::parse(&text);
    let opened = metrics.sum(
        "istio_tcp_connections_opened_total",
        &[
            ("destination_service", EXTERNAL),
            ("destination_service_name", EXTERNAL),
            ("destination_service_namespace", NS),
        ],
    );
    assert!(
        opened >= 1.0,
        "no connection counted under {EXTERNAL}:\n{}",
        text.lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // A pod flooding a server that never answers holds at most its share of the agent:
    // each forwarded query keeps a socket until its timeout, and past the pod's limit
    // further queries are dropped.
    cluster
        .pod("mute")
        .spawn_dns_server_with(&[], &[], &["--mute"])
        .expect("starting the mute server");
    let agent = cluster.nodes()[0].agent().expect("the agent").pid();
    let descriptors_before = tests::bench::fd_count(agent).unwrap();
    let mute = cluster.pod("mute").addr_v4(53).to_string();
    let pod_bin = tests::locate_binary("mesh-pod", "MESH_POD_BIN").expect("mesh-pod");
    let flood = client
        .spawn(&[
            pod_bin.to_str().expect("a UTF-8 path"),
            "dns-load",
            "--server",
            &mute,
            "--name",
            "example.test",
            "--rate",
            "2000",
            "--seconds",
            "2",
        ])
        .expect("starting the flood");
    let mut most = 0;
    while flood.is_running() {
        most = most.max(tests::bench::fd_count(agent).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        most > descriptors_before + 500,
        "the flood did not reach the agent ({descriptors_before} -> {most} descriptors)"
    );
    assert!(
        most <= descriptors_before + 1024 + 16,
        "a pod held more than its share: {descriptors_before} -> {most} descriptors"
    );
    // Their timeouts free them all.
    assert!(
        tests::eventually(Duration::from_secs(15), || {
            tests::bench::fd_count(agent).is_ok_and(|n| n <= descriptors_before + 16)
        }),
        "the forwarded queries' sockets were not freed"
    );

    // With the agent stopped the programs stay: the pod's DNS fails closed, like its TCP.
    cluster.nodes()[0].stop_agent().expect("stopping the agent");
    let before = server.log_text();
    let stopped = query(&client, server_addr, "example.test", false);
    assert!(stopped.is_err(), "DNS with the agent stopped: {stopped:?}");
    assert_eq!(
        server.log_text(),
        before,
        "a query bypassed the stopped agent"
    );
    // A fresh agent serves again.
    cluster.nodes()[0]
        .start_agent(&cluster.config_path())
        .expect("restarting the agent");
    assert!(
        tests::eventually(Duration::from_secs(10), || {
            query(&client, server_addr, "reviews", false).is_ok_and(|r| r.addrs == vec![vip])
        }),
        "the restarted agent answers"
    );
}
