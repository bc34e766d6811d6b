//! Kernel suite for the waypoint: real node agents, a real `mesh-agent waypoint` process in
//! its own (uncaptured) pod, real HBONE. The cluster is built once; each case rewrites the
//! configuration (Gateway API routes, VirtualService, policies) and checks what clients see.
//! The HTTPRoute cases replay the Gateway API GAMMA mesh conformance cases (MeshBasic,
//! MeshFrontend, MeshPorts, MeshHTTPRouteMatching, MeshHTTPRouteQueryParamMatching,
//! MeshHTTPRouteWeight, MeshHTTPRouteRequestHeaderModifier, MeshHTTPRouteRewritePath,
//! the redirect cases) against `echo` backends that report their pod and the headers they
//! received; GRPCRoute with tonic's client and server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tests::grpc_workload::{self as grpc, EchoRequest};
use tests::http_workload::{Call, Echo, Reply};
use tests::metrics::Metrics;
use tests::{Cluster, ConfigOptions, PodSpec, eventually, require_root};

const NS: &str = "mesh";
const ECHO: &str = "10.96.10.10";
const ECHO_V1: &str = "10.96.10.11";
const ECHO_V2: &str = "10.96.10.12";
const APP: u16 = 8080;
/// A plain TCP port of echo-v1 (not HTTP by Istio's rules: carried as bytes).
const TCP: u16 = 9000;
const WAYPOINT_PRINCIPAL: &str = "spiffe://cluster.local/ns/mesh/sa/waypoint";
/// A namespace outside the mesh, whose pod reaches the mesh through the ingress gateway.
const OUTSIDE: &str = "outside";

fn vip(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), 80)
}

/// The Gateway, the waypoint-bound services, and `extra` documents.
fn documents(extra: &[String]) -> ConfigOptions {
    let service = |name: &str, ip: &str, selector: &str, bound: bool| {
        let labels = if bound {
            "  labels: {istio.io/use-waypoint: waypoint}\n"
        } else {
            ""
        };
        let tcp = if name == "echo-v1" {
            format!(", {{name: tcp-echo, port: {TCP}, targetPort: {TCP}}}")
        } else {
            String::new()
        };
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {NS}\n{labels}spec:\n  clusterIP: {ip}\n  selector: {selector}\n  ports: [{{name: http, port: 80, targetPort: {APP}}}, {{name: http-alt, port: {APP}, targetPort: {APP}}}{tcp}]\n"
        )
    };
    let mut opts = ConfigOptions::default()
        .document(format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: waypoint, namespace: {NS}}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n"
        ))
        .document(service("echo", ECHO, "{app: echo}", true))
        .document(service("echo-v1", ECHO_V1, "{app: echo, version: v1}", true))
        .document(service("echo-v2", ECHO_V2, "{app: echo, version: v2}", true));
    for d in extra {
        opts = opts.document(d.clone());
    }
    opts
}

/// A process's peak resident memory (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

fn cluster() -> (Cluster, tests::Process) {
    let cluster = Cluster::builder()
        .nodes(2)
        .ambient_namespace(NS)
        .pod(
            PodSpec::new("client", NS, 0)
                .label("app", "client")
                .service_account("client"),
        )
        .pod(
            PodSpec::new("intruder", NS, 0)
                .label("app", "intruder")
                .service_account("intruder"),
        )
        .pod(
            PodSpec::new("echo-v1", NS, 1)
                .label("app", "echo")
                .label("version", "v1")
                .service_account("echo"),
        )
        .pod(
            PodSpec::new("echo-v2", NS, 1)
                .label("app", "echo")
                .label("version", "v2")
                .service_account("echo"),
        )
        .pod(
            PodSpec::new("wp", NS, 0)
                .label("gateway.networking.k8s.io/gateway-name", "waypoint")
                .label("istio.io/dataplane-mode", "none")
                .service_account("waypoint"),
        )
        .pod(
            PodSpec::new("ingress", NS, 0)
                .label("istio", "ingressgateway")
                .label("gateway.networking.k8s.io/gateway-name", "api")
                .label("istio.io/dataplane-mode", "none")
                .service_account("ingress"),
        )
        .pod(PodSpec::new("outside", OUTSIDE, 1).label("app", "outside"))
        .build()
        .expect("building the test cluster");
    for pod in ["echo-v1", "echo-v2"] {
        cluster
            .pod(pod)
            .spawn_echo(APP)
            .expect("starting an echo server");
    }
    cluster
        .pod("echo-v1")
        .spawn_server(&[TCP])
        .expect("starting a TCP echo server");
    cluster
        .write_config(&cluster.config_path(), &documents(&[]))
        .unwrap();
    cluster.start_agents(&cluster.config_path()).unwrap();
    let waypoint = cluster
        .pod("wp")
        .spawn_waypoint(
            "waypoint",
            NS,
            &cluster.config_path(),
            &["--access-log-format", "json"],
        )
        .expect("starting the waypoint");
    (cluster, waypoint)
}

/// Rewrites the configuration with `extra` documents.
fn apply(cluster: &Cluster, extra: &[String]) {
    cluster
        .write_config(&cluster.config_path(), &documents(extra))
        .unwrap();
}

/// [`apply`] for documents that are wrong on purpose (`analyze` reports them).
fn apply_broken(cluster: &Cluster, extra: &[String]) {
    cluster
        .write_config(
            &cluster.config_path(),
            &documents(extra).with_deliberate_errors(),
        )
        .unwrap();
}

fn get(path: &str) -> Call {
    Call {
        method: "GET".into(),
        path: path.into(),
        host: None,
        headers: vec![],
        count: 1,
        upload: 0,
    }
}

fn calls(cluster: &Cluster, from: &str, to: SocketAddr, calls: &[Call]) -> Vec<Reply> {
    cluster
        .pod(from)
        .http_calls(to, false, calls)
        .expect("running the HTTP client")
}

fn one(cluster: &Cluster, to: SocketAddr, call: Call) -> Reply {
    calls(cluster, "client", to, &[call]).remove(0)
}

fn echo(reply: &Reply) -> Echo {
    serde_json::from_str(&reply.body)
        .unwrap_or_else(|e| panic!("not an echo ({e}): {} {}", reply.status, reply.body))
}

/// Polls until `check` holds for a fresh reply (configuration changes take a moment).
fn until(
    cluster: &Cluster,
    to: SocketAddr,
    call: &Call,
    what: &str,
    check: impl Fn(&Reply) -> bool,
) {
    let mut last = None;
    let ok = eventually(Duration::from_secs(10), || {
        let r = one(cluster, to, call.clone());
        let ok = check(&r);
        last = Some(r);
        ok
    });
    assert!(ok, "{what}: last reply {last:?}");
}

fn http_route(name: &str, parent: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: {parent}, port: 80}}]\n  rules:\n{rules}"
    )
}

fn waypoint_metrics(cluster: &Cluster) -> Metrics {
    pod_metrics(cluster, "wp")
}

/// What the proxy in `pod` serves on its 15020.
fn pod_metrics(cluster: &Cluster, pod: &str) -> Metrics {
    let pod = cluster.pod(pod);
    let (status, body) = tests::in_netns(pod.netns_path(), || {
        tests::workload::http_get(
            "127.0.0.1:15020".parse().unwrap(),
            "/metrics",
            Duration::from_secs(5),
        )
    })
    .unwrap()
    .unwrap();
    assert_eq!(status, 200, "{body}");
    Metrics::parse(&body)
}

#[test]
fn a_waypoint_routes_authorizes_and_reports_like_istio() {
    if !require_root() {
        return;
    }
    let (cluster, waypoint) = cluster();

    // MeshBasic: no route, the service through the waypoint; the waypoint added a request id.
    let r = one(&cluster, vip(ECHO), get("/"));
    assert_eq!(r.status, 200, "{r:?}");
    let e = echo(&r);
    assert!(e.pod.starts_with("echo-v"), "{e:?}");
    assert!(
        e.headers.contains_key("x-request-id"),
        "not through the waypoint: {e:?}"
    );
    // The destination agent saw the waypoint's identity, not the client's.
    let dst = Metrics::parse(&cluster.node(1).metrics().unwrap());
    assert!(
        dst.sum(
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_principal", WAYPOINT_PRINCIPAL)
            ]
        ) > 0.0
    );
    assert_eq!(
        dst.sum(
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/mesh/sa/client"
                )
            ]
        ),
        0.0,
        "the client reached an echo pod without the waypoint"
    );

    // 200 MiB up and 200 MiB down stream through the waypoint: its peak memory barely moves.
    const BIG: u64 = 200 * 1024 * 1024;
    let before = peak_rss_kib(waypoint.pid());
    let upload = Call {
        method: "POST".into(),
        upload: BIG,
        ..get("/upload")
    };
    let replies = calls(
        &cluster,
        "client",
        vip(ECHO),
        &[upload, get(&format!("/bytes/{BIG}"))],
    );
    assert_eq!(replies[0].status, 200, "{:?}", replies[0]);
    assert_eq!(
        replies[0].headers.get("x-body-bytes"),
        Some(&BIG.to_string())
    );
    assert_eq!((replies[1].status, replies[1].bytes), (200, BIG));
    let grown = peak_rss_kib(waypoint.pid()).saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "the waypoint's peak RSS grew by {grown} KiB"
    );

    // A TCP port of a bound service: carried as bytes through the waypoint, which reports
    // it in its TCP metrics.
    let before = waypoint_metrics(&cluster);
    let tcp = SocketAddr::new(ECHO_V1.parse().unwrap(), TCP);
    let report = cluster.pod("client").connect(tcp, 256 * 1024).unwrap();
    assert!(report.ok, "{report:?}");
    let tcp_filter = [
        ("reporter", "waypoint"),
        ("destination_service", "echo-v1.mesh.svc.cluster.local"),
        ("source_workload", "client"),
    ];
    assert!(
        eventually(Duration::from_secs(5), || {
            waypoint_metrics(&cluster).delta(
                &before,
                "istio_tcp_connections_opened_total",
                &tcp_filter,
            ) == 1.0
        }),
        "the waypoint did not count the TCP connection"
    );

    // HTTP/2 with prior knowledge (h2c) through the waypoint.
    let h2 = cluster
        .pod("client")
        .http_calls(vip(ECHO), true, &[get("/")])
        .unwrap()
        .remove(0);
    assert_eq!(h2.status, 200, "{h2:?}");
    assert_eq!(echo(&h2).proto, "HTTP/2.0");
    assert!(echo(&h2).headers.contains_key("x-request-id"));

    // The GAMMA HTTPRoute cases.
    let routes = http_route(
        "echo",
        "echo",
        "  - matches: [{path: {type: Exact, value: /v2}}]\n    backendRefs: [{name: echo-v2, port: 80}]\n\
         \x20 - matches: [{path: {type: PathPrefix, value: /v1}}]\n    backendRefs: [{name: echo-v1, port: 80}]\n\
         \x20 - matches: [{headers: [{name: version, value: two}]}]\n    backendRefs: [{name: echo-v2, port: 80}]\n\
         \x20 - matches: [{path: {type: PathPrefix, value: /q}, queryParams: [{name: animal, value: whale}]}]\n    backendRefs: [{name: echo-v2, port: 80}]\n\
         \x20 - matches: [{path: {type: PathPrefix, value: /headers}}]\n    filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier:\n        set: [{name: X-Header-Set, value: set-overwrites-values}]\n        add: [{name: X-Header-Add, value: header-val-1}]\n        remove: [X-Header-Remove]\n    backendRefs: [{name: echo-v1, port: 80}]\n\
         \x20 - matches: [{path: {type: PathPrefix, value: /prefix/one}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}}]\n    backendRefs: [{name: echo-v1, port: 80}]\n\
         \x20 - matches: [{path: {type: PathPrefix, value: /full}}]\n    filters: [{type: URLRewrite, urlRewrite: {hostname: mydomain.example, path: {type: ReplaceFullPath, replaceFullPath: /one}}}]\n    backendRefs: [{name: echo-v1, port: 80}]\n\
         \x20 - matches: [{path: {type: PathPrefix, value: /hostname-redirect}}]\n    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org}}]\n\
         \x20 - matches: [{path: {type: PathPrefix, value: /status-code-301}}]\n    filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301}}]\n\
         \x20 - matches: [{path: {type: PathPrefix, value: /port-redirect}}]\n    filters: [{type: RequestRedirect, requestRedirect: {port: 8083}}]\n\
         \x20 - matches: [{path: {type: PathPrefix, value: /scheme-redirect}}]\n    filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]\n\
         \x20 - matches: [{path: {type: PathPrefix, value: /path-redirect}}]\n    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /replacement}}}]\n\
         \x20 - matches: [{path: {type: PathPrefix, value: /}}]\n    backendRefs: [{name: echo-v1, port: 80, weight: 70}, {name: echo-v2, port: 80, weight: 30}]\n",
    );
    let only = http_route(
        "only",
        "echo-v1",
        "  - matches: [{path: {type: Exact, value: /only}}]\n    backendRefs: [{name: echo-v1, port: 80}]\n",
    );
    apply(&cluster, &[routes.clone(), only.clone()]);
    // Only the route answers a redirect.
    until(
        &cluster,
        vip(ECHO),
        &get("/status-code-301"),
        "HTTPRoute applied",
        |r| r.status == 301,
    );
    let pod_of = |call: Call| {
        let r = one(&cluster, vip(ECHO), call.clone());
        assert_eq!(r.status, 200, "{call:?}: {r:?}");
        echo(&r).pod
    };
    // MeshHTTPRouteMatching: exact before prefix, segment-wise prefixes, headers.
    assert_eq!(pod_of(get("/v2")), "echo-v2");
    assert_eq!(pod_of(get("/v1")), "echo-v1");
    assert_eq!(pod_of(get("/v1/x")), "echo-v1");
    let mut h = get("/x");
    h.headers = vec![("version".into(), "two".into())];
    assert_eq!(pod_of(h), "echo-v2");
    // MeshHTTPRouteQueryParamMatching.
    assert_eq!(pod_of(get("/q?animal=whale")), "echo-v2");
    // MeshHTTPRouteRequestHeaderModifier.
    let mut h = get("/headers");
    h.headers = vec![
        ("X-Header-Set".into(), "some-other-value".into()),
        ("X-Header-Add".into(), "add-appends-values".into()),
        ("X-Header-Remove".into(), "val".into()),
    ];
    let e = echo(&one(&cluster, vip(ECHO), h));
    assert_eq!(
        e.headers.get("x-header-set").map(String::as_str),
        Some("set-overwrites-values")
    );
    assert_eq!(
        e.headers.get("x-header-add").map(String::as_str),
        Some("add-appends-values,header-val-1")
    );
    assert!(!e.headers.contains_key("x-header-remove"), "{e:?}");
    // MeshHTTPRouteRewritePath.
    assert_eq!(
        echo(&one(&cluster, vip(ECHO), get("/prefix/one/two"))).path,
        "/one/two"
    );
    let e = echo(&one(&cluster, vip(ECHO), get("/full/x")));
    assert_eq!(
        (e.path.as_str(), e.host.as_str()),
        ("/one", "mydomain.example")
    );
    // The redirect cases.
    for (path, status, location) in [
        (
            "/hostname-redirect",
            302,
            "http://example.org/hostname-redirect",
        ),
        (
            "/status-code-301",
            301,
            "http://10.96.10.10/status-code-301",
        ),
        (
            "/port-redirect",
            302,
            "http://10.96.10.10:8083/port-redirect",
        ),
        (
            "/scheme-redirect",
            302,
            "https://10.96.10.10/scheme-redirect",
        ),
        ("/path-redirect", 302, "http://10.96.10.10/replacement"),
    ] {
        let r = one(&cluster, vip(ECHO), get(path));
        assert_eq!(r.status, status, "{path}: {r:?}");
        assert_eq!(
            r.headers.get("location").map(String::as_str),
            Some(location),
            "{path}"
        );
    }
    // No matching rule on a service with routes: 404.
    assert_eq!(one(&cluster, vip(ECHO_V1), get("/other")).status, 404);
    assert_eq!(one(&cluster, vip(ECHO_V1), get("/only")).status, 200);
    // Routing applies to HTTP/2 requests too.
    let h2 = cluster
        .pod("client")
        .http_calls(vip(ECHO), true, &[get("/v2")])
        .unwrap()
        .remove(0);
    assert_eq!(
        (echo(&h2).pod.as_str(), echo(&h2).proto.as_str()),
        ("echo-v2", "HTTP/2.0")
    );
    // MeshFrontend: the route binds to the Service address, not to the pod's.
    let v1_pod = SocketAddr::new(cluster.pod("echo-v1").ipv4().into(), APP);
    assert_eq!(echo(&one(&cluster, v1_pod, get("/v2"))).pod, "echo-v1");
    // MeshHTTPRouteWeight: 500 requests, 70/30, within 5 %.
    let mut w = get("/weighted");
    w.count = 500;
    let replies = calls(&cluster, "client", vip(ECHO), &[w]);
    let v1 = replies.iter().filter(|r| echo(r).pod == "echo-v1").count();
    assert!(
        (325..=375).contains(&v1),
        "70 % of 500 to echo-v1, got {v1}"
    );

    // MeshPorts: a parentRef with a port binds the route to that Service port only.
    let set_header = |value: &str| {
        format!(
            "  - filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{{name: X-Header-Set, value: {value}}}]}}}}]\n    backendRefs: [{{name: echo-{value}, port: 80}}]\n"
        )
    };
    let v1_port_80 = http_route("v1-port", "echo-v1", &set_header("v1"));
    let v2_any_port = http_route("v2-any", "echo-v2", &set_header("v2")).replace(
        "name: echo-v2, port: 80}]\n  rules",
        "name: echo-v2}]\n  rules",
    );
    apply(&cluster, &[v1_port_80, v2_any_port]);
    until(
        &cluster,
        vip(ECHO_V1),
        &get("/"),
        "MeshPorts routes applied",
        |r| r.headers.get("x-header-set").map(String::as_str) == Some("v1"),
    );
    let alt = |ip: &str| SocketAddr::new(ip.parse().unwrap(), APP);
    for (to, header) in [
        (alt(ECHO_V1), None),
        (vip(ECHO_V2), Some("v2")),
        (alt(ECHO_V2), Some("v2")),
    ] {
        let r = one(&cluster, to, get("/"));
        assert_eq!(r.status, 200, "{to}: {r:?}");
        assert_eq!(
            r.headers.get("x-header-set").map(String::as_str),
            header,
            "{to}: {r:?}"
        );
    }

    // GRPCRoute, with tonic's client and server: unary and bidirectional streaming calls
    // routed by service, method and header; gRPC statuses in the metrics.
    let grpc_route = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: echo, namespace: {NS}}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: echo, port: 80}}]\n  rules:\n\
         \x20 - matches: [{{method: {{service: mesh.test.Echo, method: Stream}}}}]\n    backendRefs: [{{name: echo-v2, port: 80}}]\n\
         \x20 - matches: [{{method: {{service: mesh.test.Echo}}, headers: [{{name: x-canary, value: \"yes\"}}]}}]\n    filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{add: [{{name: x-routed-by, value: grpcroute}}]}}}}]\n    backendRefs: [{{name: echo-v2, port: 80}}]\n\
         \x20 - matches: [{{method: {{service: mesh.test.Echo}}}}]\n    backendRefs: [{{name: echo-v1, port: 80}}]\n"
    );
    apply(&cluster, &[grpc_route]);
    let client = cluster.pod("client");
    let message = |text: &str| EchoRequest {
        message: text.into(),
        fail_with: None,
    };
    let mut last = None;
    let applied = eventually(Duration::from_secs(10), || {
        let o = client.grpc_call(
            vip(ECHO),
            grpc::UNARY,
            &[message("hi")],
            &[("x-canary", "yes")],
        );
        let ok = o.as_ref().is_ok_and(|o| {
            o.code == 0
                && o.replies[0].pod == "echo-v2"
                && o.replies[0].headers.get("x-routed-by").map(String::as_str) == Some("grpcroute")
        });
        last = Some(o);
        ok
    });
    assert!(applied, "the GRPCRoute did not apply: {last:?}");
    for _ in 0..5 {
        let o = client
            .grpc_call(vip(ECHO), grpc::UNARY, &[message("hi")], &[])
            .unwrap();
        assert_eq!((o.code, o.replies[0].pod.as_str()), (0, "echo-v1"), "{o:?}");
        assert_eq!(o.replies[0].message, "hi");
    }
    let o = client
        .grpc_call(
            vip(ECHO),
            grpc::STREAM,
            &[message("one"), message("two"), message("three")],
            &[],
        )
        .unwrap();
    assert_eq!(o.code, 0, "{o:?}");
    let got: Vec<_> = o
        .replies
        .iter()
        .map(|r| (r.pod.as_str(), r.message.as_str()))
        .collect();
    assert_eq!(
        got,
        [("echo-v2", "one"), ("echo-v2", "two"), ("echo-v2", "three")]
    );
    // No rule matches: 404, which a gRPC client reads as UNIMPLEMENTED.
    let o = client
        .grpc_call(vip(ECHO), "/other.Service/Call", &[message("x")], &[])
        .unwrap();
    assert_eq!(o.code, tonic::Code::Unimplemented as i32, "{o:?}");
    // A failed call's status is in the metrics.
    let before = waypoint_metrics(&cluster);
    let failing = EchoRequest {
        fail_with: Some(tonic::Code::Unavailable as i32),
        ..message("fail")
    };
    let o = client
        .grpc_call(vip(ECHO), grpc::UNARY, &[failing], &[])
        .unwrap();
    assert_eq!(o.code, tonic::Code::Unavailable as i32, "{o:?}");
    let after = waypoint_metrics(&cluster);
    let filter = [
        ("reporter", "waypoint"),
        ("request_protocol", "grpc"),
        ("response_code", "200"),
        ("grpc_response_status", "14"),
        // The service routed to, as Istio reports it.
        ("destination_service_name", "echo-v1"),
    ];
    assert_eq!(
        after.delta(&before, "istio_requests_total", &filter),
        1.0,
        "{:?}",
        after
            .select("istio_requests_total", &[("request_protocol", "grpc")])
            .collect::<Vec<_>>()
    );

    // VirtualService and DestinationRule (Istio's reviews tasks): jason to v2, else 75/25.
    let vs = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: echo, namespace: {NS}}}\nspec:\n  hosts: [echo]\n  http:\n  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]\n    route: [{{destination: {{host: echo, subset: v2}}}}]\n  - route:\n    - {{destination: {{host: echo, subset: v1}}, weight: 75}}\n    - {{destination: {{host: echo, subset: v2}}, weight: 25}}\n"
    );
    let dr = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: echo, namespace: {NS}}}\nspec:\n  host: echo\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n"
    );
    apply(&cluster, &[vs, dr]);
    let mut jason = get("/reviews");
    jason.headers = vec![("end-user".into(), "jason".into())];
    // The HTTPRoute before it sends 30 % to v2: ten in a row is the VirtualService.
    let applied = eventually(Duration::from_secs(10), || {
        let mut ten = jason.clone();
        ten.count = 10;
        calls(&cluster, "client", vip(ECHO), &[ten])
            .iter()
            .all(|r| r.status == 200 && echo(r).pod == "echo-v2")
    });
    assert!(applied, "the VirtualService did not apply");
    let mut split = get("/reviews");
    split.count = 2000;
    let replies = calls(&cluster, "client", vip(ECHO), &[split]);
    assert!(replies.iter().all(|r| r.status == 200));
    let v1 = replies.iter().filter(|r| echo(r).pod == "echo-v1").count();
    assert!(
        (1440..=1560).contains(&v1),
        "75 % of 2000 to v1 within 3 %, got {v1}"
    );

    resilience(&cluster);
    ingress(&cluster);
    operability(&cluster);

    // L7 authorization at the waypoint, on the client's identity.
    let policy = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: get-only, namespace: {NS}}}\nspec:\n  targetRefs: [{{kind: Service, group: \"\", name: echo}}]\n  rules:\n  - from: [{{source: {{principals: [cluster.local/ns/mesh/sa/client]}}}}]\n    to: [{{operation: {{methods: [GET]}}}}]\n"
    );
    let audit = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: audit-reports, namespace: {NS}}}\nspec:\n  targetRefs: [{{kind: Service, group: \"\", name: echo}}]\n  action: AUDIT\n  rules: [{{to: [{{operation: {{paths: [/reports/*]}}}}]}}]\n"
    );
    apply(&cluster, &[policy, audit]);
    let delete = Call {
        method: "DELETE".into(),
        ..get("/")
    };
    until(&cluster, vip(ECHO), &delete, "policy applied", |r| {
        r.status == 403
    });
    let r = one(&cluster, vip(ECHO), delete.clone());
    assert_eq!((r.status, r.body.as_str()), (403, "RBAC: access denied"));
    assert_eq!(one(&cluster, vip(ECHO), get("/")).status, 200);
    let r = calls(&cluster, "intruder", vip(ECHO), &[get("/")]).remove(0);
    assert_eq!((r.status, r.body.as_str()), (403, "RBAC: access denied"));
    // `mesh-agent authz check` answers as the waypoint and the node proxy did.
    for (from, method, allowed) in [
        ("client", "DELETE", false),
        ("client", "GET", true),
        ("intruder", "GET", false),
    ] {
        let (says, report) = cluster.authz_check(from, vip(ECHO), &["--method", method]);
        assert_eq!(says, allowed, "{from} {method}: {report}");
        assert!(report.contains("waypoint mesh/waypoint (HTTP)"), "{report}");
    }
    // AUDIT: allowed as before, and the access log (JSON here) says which policy audited it.
    let mut audited = get("/reports/q3");
    audited.headers = vec![("x-request-id".into(), "audit-me-1".into())];
    assert_eq!(one(&cluster, vip(ECHO), audited).status, 200);
    let mut plain = get("/other");
    plain.headers = vec![("x-request-id".into(), "audit-me-not".into())];
    assert_eq!(one(&cluster, vip(ECHO), plain).status, 200);
    let logged = |id: &str| {
        waypoint.log_text().lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["request_id"] == id).then_some(v)
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || logged("audit-me-not").is_some()),
        "no access-log line: {}",
        waypoint.log_text()
    );
    let line = logged("audit-me-1").expect("the audited request's line");
    assert_eq!(line["audit_policy"], "mesh/audit-reports", "{line}");
    assert_eq!(line["response_code"], 200, "{line}");
    assert_eq!(line["path"], "/reports/q3", "{line}");
    assert_eq!(
        line["downstream_peer_identity"],
        "spiffe://cluster.local/ns/mesh/sa/client"
    );
    assert!(
        logged("audit-me-not")
            .unwrap()
            .get("audit_policy")
            .is_none()
    );

    // Request metrics, with Kiali's labels.
    let before = waypoint_metrics(&cluster);
    let mut ten = get("/");
    ten.count = 10;
    assert!(
        calls(&cluster, "client", vip(ECHO), &[ten])
            .iter()
            .all(|r| r.status == 200)
    );
    let after = waypoint_metrics(&cluster);
    let filter = [
        ("reporter", "waypoint"),
        ("response_code", "200"),
        ("source_workload", "client"),
        ("destination_service_name", "echo"),
    ];
    assert_eq!(after.delta(&before, "istio_requests_total", &filter), 10.0);
    let series: Vec<_> = after.select("istio_requests_total", &filter).collect();
    let labels: BTreeMap<&str, &str> = series[0]
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for key in [
        "source_workload_namespace",
        "source_principal",
        "source_app",
        "source_version",
        "source_canonical_service",
        "source_canonical_revision",
        "source_cluster",
        "destination_workload",
        "destination_workload_namespace",
        "destination_principal",
        "destination_app",
        "destination_version",
        "destination_service",
        "destination_service_namespace",
        "destination_canonical_service",
        "destination_canonical_revision",
        "destination_cluster",
        "request_protocol",
        "grpc_response_status",
        "response_flags",
        "connection_security_policy",
    ] {
        assert!(labels.contains_key(key), "{key} missing: {labels:?}");
    }
    assert_eq!(labels["destination_app"], "echo");
    assert_eq!(
        labels["source_principal"],
        "spiffe://cluster.local/ns/mesh/sa/client"
    );
    assert_eq!(labels["connection_security_policy"], "mutual_tls");
    assert!(after.sum("istio_request_duration_milliseconds_count", &filter) >= 10.0);

    // A waypoint without a ready pod: traffic goes direct (as Istio's), and it is said.
    // (`analyze` reports that binding: on purpose here.)
    let mut without = documents(&[]).with_deliberate_errors();
    without.exclude_pods.insert("wp".into());
    cluster
        .write_config(&cluster.config_path(), &without)
        .unwrap();
    until(
        &cluster,
        vip(ECHO),
        &get("/"),
        "direct without the waypoint",
        |r| r.status == 200 && !echo(r).headers.contains_key("x-request-id"),
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            cluster
                .node(0)
                .agent_log()
                .contains("waypoint mesh/waypoint has no ready pod")
        }),
        "no warning in the agent log"
    );
    let dump = cluster.node(0).config_dump().unwrap();
    assert!(
        dump.to_string().contains("has no ready pod"),
        "no warning in /config_dump"
    );
    cluster.teardown().unwrap();
}

/// Retries, timeouts and fault injection (Istio's VirtualService fields) on echo-v1, whose one
/// pod fails every other `/flaky/503` request and answers `/delay/MS` late. Each rule is
/// picked by the header `x-case`.
/// An ingress gateway in front of the echo services: Istio's Gateway with a VirtualService
/// that names it, and a Gateway API Gateway of class istio with an HTTPRoute; a client
/// outside the mesh reaches the services through it, and its requests are reported with
/// `reporter="source"`.
/// The ingress gateway's bound on TLS handshakes in progress (--max-handshakes).
const GATEWAY_HANDSHAKES: usize = 4;

fn ingress(cluster: &Cluster) {
    let gateway = cluster
        .pod("ingress")
        .spawn_gateway(
            "api",
            NS,
            &cluster.config_path(),
            &["--max-handshakes", &GATEWAY_HANDSHAKES.to_string()],
        )
        .expect("starting the ingress gateway");
    let istio = format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: echo-gateway, namespace: {NS}}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n  - port: {{number: 8080, name: http, protocol: HTTP}}\n    hosts: [\"*\"]\n  - port: {{number: 8443, name: https, protocol: HTTPS}}\n    hosts: [\"*\"]\n    tls: {{mode: SIMPLE, credentialName: echo-cert}}\n"
    );
    // The HTTPS server's certificate, from a kubernetes.io/tls Secret; replaced below.
    let certificate = |host: &str| {
        let c = rcgen::generate_simple_self_signed(vec![host.to_owned()]).unwrap();
        let indent = |pem: String| {
            pem.lines()
                .map(|l| format!("    {l}\n"))
                .collect::<String>()
        };
        let secret = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: echo-cert, namespace: {NS}}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
            indent(c.cert.pem()),
            indent(c.signing_key.serialize_pem())
        );
        let der: String = c.cert.der().iter().map(|b| format!("{b:02x}")).collect();
        (secret, der)
    };
    let (first_secret, first_der) = certificate("secure.example.com");
    let vs = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: echo-ingress, namespace: {NS}}}\nspec:\n  hosts: [\"*\"]\n  gateways: [echo-gateway]\n  http:\n  - match: [{{uri: {{prefix: /v2}}}}]\n    route: [{{destination: {{host: echo-v2, port: {{number: 80}}}}}}]\n  - match: [{{uri: {{prefix: /echo}}}}]\n    route: [{{destination: {{host: echo-v1, port: {{number: 80}}}}}}]\n"
    );
    let api = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: api, namespace: {NS}}}\nspec:\n  gatewayClassName: istio\n  listeners: [{{name: http, port: 8081, protocol: HTTP, hostname: api.example.com}}]\n"
    );
    let route = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: api, namespace: {NS}}}\nspec:\n  parentRefs: [{{name: api}}]\n  rules: [{{backendRefs: [{{name: echo-v2, port: 80}}]}}]\n"
    );
    apply(
        cluster,
        &[
            istio.clone(),
            vs.clone(),
            api.clone(),
            route.clone(),
            first_secret,
        ],
    );
    let ip = cluster.pod("ingress").ipv4();
    let at = |port: u16| SocketAddr::new(ip.into(), port);
    let outside = |to: SocketAddr, call: Call| calls(cluster, "outside", to, &[call]).remove(0);

    // Istio's Gateway and its VirtualService: by path, to each version.
    let ready = |to: SocketAddr, call: Call| {
        let mut last = None;
        let ok = eventually(Duration::from_secs(10), || {
            let r = outside(to, call.clone());
            let ok = r.status == 200;
            last = Some(r);
            ok
        });
        assert!(ok, "the gateway did not serve {to}: {last:?}");
    };
    ready(at(8080), get("/echo"));
    let r = outside(at(8080), get("/echo/a"));
    let e = echo(&r);
    assert_eq!(e.pod, "echo-v1", "{r:?}");
    let outside_ip = cluster.pod("outside").ipv4().to_string();
    assert_eq!(
        e.headers.get("x-forwarded-for"),
        Some(&outside_ip),
        "the client's address is forwarded: {e:?}"
    );
    assert_eq!(echo(&outside(at(8080), get("/v2/x"))).pod, "echo-v2");
    // No route for the path: 404.
    assert_eq!(outside(at(8080), get("/elsewhere")).status, 404);

    // The Gateway API Gateway: its HTTPRoute, for its listener's hostname only.
    let api_host = |host: &str| Call {
        host: Some(host.into()),
        ..get("/")
    };
    ready(at(8081), api_host("api.example.com"));
    assert_eq!(
        echo(&outside(at(8081), api_host("api.example.com"))).pod,
        "echo-v2"
    );
    assert_eq!(outside(at(8081), api_host("other.example.com")).status, 404);

    // Reported as a source, by the gateway, with its identity.
    let metrics = pod_metrics(cluster, "ingress");
    let from_gateway = metrics.sum(
        "istio_requests_total",
        &[
            ("reporter", "source"),
            ("source_workload", "ingress"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/mesh/sa/ingress",
            ),
            ("destination_service_name", "echo-v1"),
            ("destination_version", "v1"),
            ("response_code", "200"),
        ],
    );
    assert!(from_gateway >= 2.0, "{from_gateway} requests reported");

    // HTTPS with the Secret's certificate; a replaced Secret is served without a restart.
    let https = at(8443);
    let tls = |path: &str| {
        cluster
            .pod("outside")
            .tls_get(https, "secure.example.com", path)
    };
    let mut last = None;
    let ok = eventually(Duration::from_secs(10), || {
        let r = tls("/echo/tls");
        let ok = r.as_ref().is_ok_and(|r| r.status == 200);
        last = Some(r);
        ok
    });
    assert!(ok, "HTTPS through the gateway: {last:?}");
    let r = tls("/echo/tls").unwrap();
    assert_eq!(
        r.certificate, first_der,
        "the Secret's certificate is served"
    );
    let e: Echo = serde_json::from_str(&r.body).unwrap();
    assert_eq!(e.pod, "echo-v1");
    assert_eq!(
        e.headers.get("x-forwarded-proto").map(String::as_str),
        Some("https")
    );
    let (second_secret, second_der) = certificate("secure.example.com");
    apply(cluster, &[istio, vs, api, route, second_secret]);
    let ok = eventually(Duration::from_secs(10), || {
        tls("/echo/tls").is_ok_and(|r| r.certificate == second_der && r.status == 200)
    });
    assert!(
        ok,
        "the replaced Secret is not served: {:?}",
        tls("/echo/tls")
    );
    assert!(gateway.is_running(), "the gateway restarted");

    // Clients that open connections and never start their handshake hold at most
    // --max-handshakes of them; the next is closed unanswered, and once they go the gateway
    // serves again.
    let stalled = tests::in_netns(cluster.pod("outside").netns_path(), || {
        (0..GATEWAY_HANDSHAKES)
            .map(|_| std::net::TcpStream::connect(https))
            .collect::<std::io::Result<Vec<_>>>()
    })
    .unwrap()
    .unwrap();
    let refused = eventually(Duration::from_secs(5), || {
        tests::in_netns(cluster.pod("outside").netns_path(), || {
            let mut s = std::net::TcpStream::connect(https)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            // Closed at once: end of stream or a reset, not a timeout.
            let mut byte = [0u8; 1];
            Ok::<_, std::io::Error>(match std::io::Read::read(&mut s, &mut byte) {
                Ok(0) => true,
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                Ok(_) => false,
            })
        })
        .unwrap()
        .unwrap_or(false)
    });
    assert!(
        refused,
        "a connection beyond the handshakes in progress was not closed"
    );
    assert!(
        pod_metrics(cluster, "ingress").sum("mesh_agent_hbone_handshakes_refused_total", &[])
            >= 1.0,
        "the refusal is counted"
    );
    drop(stalled);
    let ok = eventually(Duration::from_secs(5), || {
        tls("/echo/tls").is_ok_and(|r| r.status == 200)
    });
    assert!(
        ok,
        "HTTPS once the stalled connections went: {:?}",
        tls("/echo/tls")
    );

    let not_found = metrics.sum(
        "istio_requests_total",
        &[("reporter", "source"), ("response_flags", "NR")],
    );
    assert_eq!(not_found, 2.0, "the 404s, with NR");

    // `mesh-agent status` knows the gateway by its pod, and it runs the current configuration.
    let gateway_row = || status(cluster).1.remove(&format!("{NS}/ingress"));
    let synced = eventually(Duration::from_secs(5), || {
        gateway_row().is_some_and(|r| r["sync"] == "SYNCED" && r["role"] == "gateway")
    });
    assert!(synced, "the gateway in status: {:?}", gateway_row());
    drop(gateway);
}

/// `mesh-agent status -f CONFIG -o json` from a pod outside the mesh: whether every proxy is
/// SYNCED (its exit status), and the rows by name.
fn status(cluster: &Cluster) -> (bool, BTreeMap<String, serde_json::Value>) {
    let config = cluster.config_path();
    let out = cluster.pod("outside").mesh_agent(&[
        "status",
        "-f",
        config.to_str().unwrap(),
        "-o",
        "json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "status failed: {stderr}"
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status -o json ({e}): {stderr}"));
    let rows = rows
        .into_iter()
        .map(|r| (r["name"].as_str().unwrap_or_default().to_owned(), r))
        .collect();
    (out.status.success(), rows)
}

/// Operating the mesh: `status` lists both node agents and the waypoint, SYNCED; a node
/// agent that refuses a configuration the others took (a captured pod of its node without
/// its network namespace) is STALE within 5 s, with the reason; `config dump` prints the
/// node agent's and the waypoint's tables.
fn operability(cluster: &Cluster) {
    apply(cluster, &[]);
    let (node1, node2) = (cluster.node(0).name(), cluster.node(1).name());
    let waypoint_pod = format!("{NS}/wp");
    let sync_of = |rows: &BTreeMap<String, serde_json::Value>, name: &str| {
        rows.get(name)
            .and_then(|r| r["sync"].as_str())
            .unwrap_or("absent")
            .to_owned()
    };
    let mut last = BTreeMap::new();
    let synced = eventually(Duration::from_secs(5), || {
        let (ok, rows) = status(cluster);
        last = rows;
        ok && last.len() == 3
    });
    assert!(synced, "every proxy SYNCED: {last:#?}");
    for node in [node1, node2] {
        let report = &last[node]["report"];
        assert_eq!(last[node]["role"], "node");
        let pods = &report["pods"];
        assert_eq!(pods["enrolled"], pods["captured"], "{node}: {report}");
        assert!(
            report["certificates"]
                .as_array()
                .is_some_and(|c| !c.is_empty())
        );
        assert_eq!(report["version"], env!("CARGO_PKG_VERSION"));
    }
    let waypoint = &last[&waypoint_pod];
    assert_eq!(waypoint["role"], "waypoint");
    assert!(
        waypoint["report"]["certificates"]
            .to_string()
            .contains(WAYPOINT_PRINCIPAL),
        "{waypoint}"
    );

    // A captured pod on node2 without its netns annotation: node2's agent refuses the file
    // and keeps its last good state; node1's agent and the waypoint take it.
    let ghost = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: ghost, namespace: {NS}, uid: ghost}}\nspec: {{nodeName: {node2}, containers: [{{name: app, image: none}}]}}\nstatus: {{phase: Running, podIP: 10.254.254.254, hostIP: {}}}\n",
        cluster.node(1).ipv4()
    );
    apply(cluster, &[ghost]);
    let stale = eventually(Duration::from_secs(5), || {
        let (ok, rows) = status(cluster);
        last = rows;
        // STALE shows as soon as node2 runs another digest than the file's; its refusal's
        // reason once it has read the file and refused it.
        !ok && sync_of(&last, node2) == "STALE"
            && sync_of(&last, node1) == "SYNCED"
            && sync_of(&last, &waypoint_pod) == "SYNCED"
            && !last[node2]["report"]["config"]["error"].is_null()
    });
    assert!(
        stale,
        "node2 STALE within 5 s, the others SYNCED: {last:#?}"
    );
    let error = last[node2]["report"]["config"]["error"].to_string();
    assert!(
        error.contains("ghost") && error.contains("mesh-agent.io/netns"),
        "the refusal's reason: {error}"
    );
    assert_eq!(last[node2]["kinds"], serde_json::json!(["Pod"]));
    let config = cluster.config_path();
    let text = cluster
        .pod("outside")
        .mesh_agent(&["status", "-f", config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with(node2) && l.contains("STALE"))
            && text.contains(&format!("{node2}: refused a configuration")),
        "{text}"
    );
    apply(cluster, &[]);
    let synced = eventually(Duration::from_secs(5), || {
        let (ok, rows) = status(cluster);
        last = rows;
        ok
    });
    assert!(synced, "SYNCED again once the file is fixed: {last:#?}");

    // config dump: the node agent's workloads and certificates, the waypoint's services.
    let dump = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "config dump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let row = |text: &str, needle: &str| -> Vec<String> {
        let line = text
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle} in\n{text}"));
        line.split("   ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(String::from)
            .collect()
    };
    let workloads = dump(cluster.node(0).mesh_agent(&["config", "dump", "workloads"]));
    let client = row(&workloads, " client ");
    assert_eq!(
        (&client[0][..], &client[3][..], &client[5][..]),
        (NS, node1, "HBONE"),
        "{workloads}"
    );
    assert_eq!(row(&workloads, " outside ")[5], "TCP", "{workloads}");
    let certs = dump(cluster.node(0).mesh_agent(&["config", "dump", "certs"]));
    assert_eq!(
        row(&certs, "/sa/client")[1],
        "VALID",
        "the client's certificate: {certs}"
    );
    let services = dump(
        cluster
            .pod("wp")
            .mesh_agent(&["config", "dump", "services"]),
    );
    assert_eq!(
        row(&services, ECHO_V1),
        [
            NS,
            "echo-v1",
            ECHO_V1,
            "80/http,8080/http-alt,9000/tcp-echo",
            "mesh/waypoint"
        ],
        "{services}"
    );
    let certs = dump(cluster.pod("wp").mesh_agent(&["config", "dump", "certs"]));
    assert_eq!(row(&certs, WAYPOINT_PRINCIPAL)[1], "VALID", "{certs}");
}

fn resilience(cluster: &Cluster) {
    let vs = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: resilience, namespace: {NS}}}\nspec:\n  hosts: [echo-v1]\n  http:\n\
         \x20 - match: [{{headers: {{x-case: {{exact: retry}}}}}}]\n    retries: {{attempts: 3, retryOn: 5xx}}\n    route: [{{destination: {{host: echo-v1}}}}]\n\
         \x20 - match: [{{headers: {{x-case: {{exact: timeout}}}}}}]\n    timeout: 0.5s\n    route: [{{destination: {{host: echo-v1}}}}]\n\
         \x20 - match: [{{headers: {{x-case: {{exact: per-try}}}}}}]\n    retries: {{attempts: 2, perTryTimeout: 0.2s}}\n    route: [{{destination: {{host: echo-v1}}}}]\n\
         \x20 - match: [{{headers: {{x-case: {{exact: delay}}}}}}]\n    fault: {{delay: {{fixedDelay: 0.1s, percentage: {{value: 50}}}}}}\n    route: [{{destination: {{host: echo-v1}}}}]\n\
         \x20 - match: [{{headers: {{end-user: {{exact: jason}}}}}}]\n    fault: {{abort: {{httpStatus: 500, percentage: {{value: 100}}}}}}\n    route: [{{destination: {{host: echo-v1}}}}]\n\
         \x20 - route: [{{destination: {{host: echo-v1}}}}]\n"
    );
    apply(cluster, &[vs]);
    let with = |path: &str, headers: &[(&str, &str)], count: usize| Call {
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        count,
        ..get(path)
    };
    until(
        cluster,
        vip(ECHO_V1),
        &with("/", &[("end-user", "jason")], 1),
        "the resilience VirtualService applied",
        |r| r.status == 500,
    );
    let r = one(
        cluster,
        vip(ECHO_V1),
        with("/", &[("end-user", "jason")], 1),
    );
    assert_eq!((r.status, r.body.as_str()), (500, "fault filter abort"));
    assert_eq!(one(cluster, vip(ECHO_V1), get("/")).status, 200);
    let echo_v1 = [
        ("reporter", "waypoint"),
        ("destination_service_name", "echo-v1"),
    ];
    let flagged = |m: &Metrics, before: &Metrics, flags: &str| {
        let mut filter = echo_v1.to_vec();
        filter.push(("response_flags", flags));
        m.delta(before, "istio_requests_total", &filter)
    };
    let retries = |m: &Metrics| m.sum("mesh_waypoint_upstream_retries_total", &[]);

    // Istio's default retries connection failures, not 503s: about half fail.
    let replies = calls(
        cluster,
        "client",
        vip(ECHO_V1),
        &[with("/flaky/503", &[], 200)],
    );
    let failed = replies.iter().filter(|r| r.status == 503).count();
    assert!((90..=110).contains(&failed), "{failed} of 200 failed");

    // retries {attempts: 3, retryOn: 5xx}: all succeed. Every other attempt fails, so a
    // request needs at most one retry (and the first attempt fails at least every other
    // request).
    let before = waypoint_metrics(cluster);
    let replies = calls(
        cluster,
        "client",
        vip(ECHO_V1),
        &[with("/flaky/503", &[("x-case", "retry")], 400)],
    );
    let ok = replies.iter().filter(|r| r.status == 200).count();
    assert!(ok >= 396, "{ok} of 400 succeeded with retries");
    let made = retries(&waypoint_metrics(cluster)) - retries(&before);
    assert!(
        (200.0..=400.0).contains(&made),
        "{made} retries for 400 requests"
    );

    // timeout: 0.5s in front of a 2 s answer: 504 UT after half a second.
    let before = waypoint_metrics(cluster);
    let started = std::time::Instant::now();
    let r = one(
        cluster,
        vip(ECHO_V1),
        with("/delay/2000", &[("x-case", "timeout")], 1),
    );
    let took = started.elapsed();
    assert_eq!(
        (r.status, r.body.as_str()),
        (504, "upstream request timeout")
    );
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(1000),
        "answered after {took:?}"
    );
    assert_eq!(flagged(&waypoint_metrics(cluster), &before, "UT"), 1.0);
    // The timeout holds the response to its end: a body still coming after 0.5 s is cut.
    let before = waypoint_metrics(cluster);
    let started = std::time::Instant::now();
    let r = one(
        cluster,
        vip(ECHO_V1),
        with("/trickle/2000", &[("x-case", "timeout")], 1),
    );
    let took = started.elapsed();
    assert_eq!(r.status, 0, "the body is cut: {r:?}");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(1000),
        "cut after {took:?}"
    );
    assert_eq!(flagged(&waypoint_metrics(cluster), &before, "UT"), 1.0);

    // perTryTimeout 0.2s, 2 retries: three tries, then 504.
    let before = waypoint_metrics(cluster);
    let started = std::time::Instant::now();
    let r = one(
        cluster,
        vip(ECHO_V1),
        with("/delay/2000", &[("x-case", "per-try")], 1),
    );
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{r:?}");
    assert!(
        took >= Duration::from_millis(600),
        "answered after {took:?}"
    );
    let after = waypoint_metrics(cluster);
    assert_eq!(retries(&after) - retries(&before), 2.0);
    assert_eq!(flagged(&after, &before, "UT"), 1.0);

    // fault.delay 0.1s for 50 %: about half the requests are delayed, flagged DI.
    let before = waypoint_metrics(cluster);
    let replies = calls(
        cluster,
        "client",
        vip(ECHO_V1),
        &[with("/", &[("x-case", "delay")], 100)],
    );
    assert!(replies.iter().all(|r| r.status == 200));
    let delayed = flagged(&waypoint_metrics(cluster), &before, "DI");
    assert!((30.0..=70.0).contains(&delayed), "{delayed} of 100 delayed");

    // Circuit breaking as Istio's task: one connection, one pending request, one request
    // per connection; three concurrent clients overflow (503 UO), one never does. Outlier
    // detection on echo: the pod that answers 500 is ejected at its first failure and
    // comes back after the ejection time.
    let breaker = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: breaker, namespace: {NS}}}\nspec:\n  host: echo-v1\n  trafficPolicy:\n    connectionPool:\n      tcp: {{maxConnections: 1}}\n      http: {{http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}}\n"
    );
    let outlier = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: outlier, namespace: {NS}}}\nspec:\n  host: echo\n  trafficPolicy:\n    outlierDetection: {{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 3s, maxEjectionPercent: 100}}\n"
    );
    // Upstream HTTP/1.1 connections are reused: eight requests in a row take few
    // connections at echo-v1 (a connection returns to the pool as its response ends, which
    // may be a moment after the client has it and sends the next request).
    let connections = |cluster: &Cluster| {
        let replies = calls(cluster, "client", vip(ECHO_V1), &[with("/", &[], 8)]);
        let ids: std::collections::BTreeSet<String> = replies
            .iter()
            .map(|r| r.headers.get("x-connection").cloned().unwrap_or_default())
            .collect();
        ids.len()
    };
    let pooled = connections(cluster);
    assert!(pooled <= 3, "{pooled} connections for 8 requests");
    apply(cluster, &[breaker, outlier]);
    // Applied once a request alone is refused no more than before but the outlier rule
    // ejects: poll until echo-v2's failure stops reaching the client.
    let before = waypoint_metrics(cluster);
    let ejected = |m: &Metrics| m.sum("mesh_waypoint_outlier_ejections_total", &[]);
    assert!(
        eventually(Duration::from_secs(10), || {
            calls(
                cluster,
                "client",
                vip(ECHO),
                &[with("/fail-on/echo-v2", &[], 4)],
            );
            ejected(&waypoint_metrics(cluster)) > ejected(&before)
        }),
        "outlier detection never ejected echo-v2"
    );
    let replies = calls(
        cluster,
        "client",
        vip(ECHO),
        &[with("/fail-on/echo-v2", &[], 20)],
    );
    let failed = replies.iter().filter(|r| r.status == 500).count();
    assert!(failed <= 1, "{failed} of 20 reached the ejected pod");
    std::thread::sleep(Duration::from_millis(3_500));
    let replies = calls(cluster, "client", vip(ECHO), &[with("/", &[], 20)]);
    assert!(
        replies.iter().any(|r| echo(r).pod == "echo-v2"),
        "echo-v2 did not come back after its ejection"
    );
    // maxRequestsPerConnection: 1: a connection per request.
    assert_eq!(connections(cluster), 8, "one request per connection");

    let one_client = calls(
        cluster,
        "client",
        vip(ECHO_V1),
        &[with("/delay/20", &[], 10)],
    );
    assert!(one_client.iter().all(|r| r.status == 200), "{one_client:?}");
    let before = waypoint_metrics(cluster);
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    calls(
                        cluster,
                        "client",
                        vip(ECHO_V1),
                        &[with("/delay/50", &[], 30)],
                    )
                })
            })
            .collect();
        clients
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect()
    });
    let overflowed = replies.iter().filter(|r| r.status == 503).count();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!(overflowed + ok, 90, "{replies:?}");
    assert!(overflowed >= 15, "only {overflowed} of 90 overflowed");
    let after = waypoint_metrics(cluster);
    assert_eq!(flagged(&after, &before, "UO"), overflowed as f64);
    assert_eq!(
        after.delta(&before, "mesh_waypoint_upstream_overflows_total", &[]),
        overflowed as f64
    );

    // Mirroring: every request to echo-v1 also reaches echo-v2, its authority suffixed
    // -shadow, body included; a mirror to a service that does not exist changes nothing.
    let mirror = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: mirror, namespace: {NS}}}\nspec:\n  hosts: [echo-v1]\n  http:\n  - route: [{{destination: {{host: echo-v1}}}}]\n    mirrors:\n    - {{destination: {{host: echo-v2}}, percentage: {{value: 100}}}}\n    - {{destination: {{host: nowhere}}}}\n"
    );
    // (A mirror to a host that does not exist is what `analyze` reports, on purpose here.)
    apply_broken(cluster, &[mirror]);
    let v2 = SocketAddr::new(cluster.pod("echo-v2").ipv4().into(), APP);
    let seen = |path: &str| -> Vec<(String, String, u64)> {
        let r = one(cluster, v2, get("/seen"));
        serde_json::from_str::<Vec<(String, String, u64)>>(&r.body)
            .unwrap()
            .into_iter()
            .filter(|s| s.0 == path)
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(10), || {
            let r = one(cluster, vip(ECHO_V1), get("/mirror/probe"));
            r.status == 200 && !seen("/mirror/probe").is_empty()
        }),
        "the mirror never reached echo-v2"
    );
    let upload = Call {
        method: "POST".into(),
        upload: 4096,
        ..get("/mirror/upload")
    };
    let r = one(cluster, vip(ECHO_V1), upload);
    assert_eq!((r.status, echo(&r).pod.as_str()), (200, "echo-v1"));
    assert!(
        eventually(Duration::from_secs(5), || !seen("/mirror/upload")
            .is_empty()),
        "the upload was not mirrored"
    );
    let (_, host, bytes) = seen("/mirror/upload").remove(0);
    assert!(host.contains("-shadow"), "mirrored with host {host:?}");
    assert_eq!(bytes, 4096);
}
