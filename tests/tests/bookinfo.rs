//! Kernel suite: Istio's Bookinfo behind the ingress gateway, walked through Istio's
//! traffic-management tasks. Two nodes with the Bookinfo pods spread over both (the Rust
//! services of `tests::bookinfo`), a waypoint for the `default` namespace, an ingress
//! gateway in `istio-system`, and a client outside the mesh. The objects are the
//! repository's `samples/bookinfo` files, applied unchanged.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tests::bookinfo::{self, Seen};
use tests::http_workload::{Call, Reply};
use tests::{Cluster, ConfigOptions, PodSpec, eventually, require_root};

const NS: &str = "default";
const GATEWAY_NS: &str = "istio-system";
const OUTSIDE: &str = "outside";
/// The ingress gateway's port (samples/bookinfo/networking/bookinfo-gateway.yaml).
const GATEWAY_PORT: u16 = 8080;

/// A file of the repository's Bookinfo sample.
fn sample(path: &str) -> String {
    let full = format!("{}/../samples/bookinfo/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("reading {full}: {e}"))
}

/// The Bookinfo Services' addresses, as samples/bookinfo/platform/bookinfo.yaml sets them.
fn service(name: &str) -> SocketAddr {
    let ip = match name {
        "details" => "10.96.90.10",
        "ratings" => "10.96.90.11",
        "reviews" => "10.96.90.12",
        "productpage" => "10.96.90.13",
        other => panic!("no Bookinfo service {other}"),
    };
    SocketAddr::new(ip.parse().unwrap(), bookinfo::PORT)
}

/// The platform, the waypoint's Gateway and the ingress; then `extra` sample files.
fn documents(extra: &[String]) -> ConfigOptions {
    let mut opts = ConfigOptions::default()
        .document(sample("platform/bookinfo.yaml"))
        .document(sample("networking/bookinfo-gateway.yaml"))
        .document(sample("networking/destination-rule-all.yaml"))
        .document(format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: waypoint, namespace: {NS}}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n"
        ));
    for d in extra {
        opts = opts.document(d.clone());
    }
    opts
}

fn apply(cluster: &Cluster, extra: &[String]) {
    cluster
        .write_config(&cluster.config_path(), &documents(extra))
        .unwrap();
}

struct Bookinfo {
    cluster: Cluster,
    _processes: Vec<tests::Process>,
}

fn bookinfo() -> Bookinfo {
    let pod = |name: &str, app: &str, version: &str, node: usize| {
        PodSpec::new(name, NS, node)
            .label("app", app)
            .label("version", version)
            .service_account(format!("bookinfo-{app}"))
    };
    let cluster = Cluster::builder()
        .nodes(2)
        .namespace(
            NS,
            [
                ("istio.io/dataplane-mode", "ambient"),
                ("istio.io/use-waypoint", "waypoint"),
            ],
        )
        .namespace(GATEWAY_NS, [("kubernetes.io/metadata.name", GATEWAY_NS)])
        .namespace(OUTSIDE, [("kubernetes.io/metadata.name", OUTSIDE)])
        .pod(pod("productpage-v1", "productpage", "v1", 0))
        .pod(pod("details-v1", "details", "v1", 1))
        .pod(pod("reviews-v1", "reviews", "v1", 0))
        .pod(pod("reviews-v2", "reviews", "v2", 1))
        .pod(pod("reviews-v3", "reviews", "v3", 0))
        .pod(pod("ratings-v1", "ratings", "v1", 1))
        .pod(
            PodSpec::new("waypoint", NS, 0)
                .label("gateway.networking.k8s.io/gateway-name", "waypoint")
                .label("istio.io/dataplane-mode", "none")
                .service_account("waypoint"),
        )
        .pod(
            PodSpec::new("istio-ingressgateway", GATEWAY_NS, 1)
                .label("istio", "ingressgateway")
                .label("app", "istio-ingressgateway")
                .service_account("istio-ingressgateway-service-account"),
        )
        .pod(PodSpec::new("curl", OUTSIDE, 0).label("app", "curl"))
        .build()
        .expect("building the test cluster");
    let backends = [
        ("details", service("details")),
        ("reviews", service("reviews")),
        ("ratings", service("ratings")),
    ];
    let mut processes = Vec::new();
    for (pod, app, version) in [
        ("productpage-v1", "productpage", "v1"),
        ("details-v1", "details", "v1"),
        ("reviews-v1", "reviews", "v1"),
        ("reviews-v2", "reviews", "v2"),
        ("reviews-v3", "reviews", "v3"),
        ("ratings-v1", "ratings", "v1"),
    ] {
        processes.push(
            cluster
                .pod(pod)
                .spawn_bookinfo(app, version, &backends)
                .expect("starting a Bookinfo service"),
        );
    }
    apply(&cluster, &[]);
    cluster.start_agents(&cluster.config_path()).unwrap();
    processes.push(
        cluster
            .pod("waypoint")
            .spawn_waypoint("waypoint", NS, &cluster.config_path(), &[])
            .expect("starting the waypoint"),
    );
    processes.push(
        cluster
            .pod("istio-ingressgateway")
            .spawn_gateway(
                "istio-ingressgateway",
                GATEWAY_NS,
                &cluster.config_path(),
                &[],
            )
            .expect("starting the ingress gateway"),
    );
    Bookinfo {
        cluster,
        _processes: processes,
    }
}

impl Bookinfo {
    fn gateway(&self) -> SocketAddr {
        SocketAddr::new(
            self.cluster.pod("istio-ingressgateway").ipv4().into(),
            GATEWAY_PORT,
        )
    }

    /// `calls` from the client outside the mesh to the ingress gateway.
    fn send(&self, calls: &[Call]) -> Vec<Reply> {
        self.cluster
            .pod("curl")
            .http_calls(self.gateway(), false, calls)
            .expect("running the HTTP client")
    }

    /// `count` product pages, as `session` (a logged-in user's cookie) if given.
    fn pages(&self, count: usize, session: Option<&str>) -> Vec<Seen> {
        let call = Call {
            method: "GET".into(),
            path: "/productpage".into(),
            host: Some("bookinfo.example.com".into()),
            headers: session
                .map(|s| vec![("cookie".to_owned(), s.to_owned())])
                .unwrap_or_default(),
            count,
            upload: 0,
        };
        self.send(&[call])
            .iter()
            .map(|r| {
                assert_eq!(r.status, 200, "{r:?}");
                bookinfo::read_page(&r.body)
            })
            .collect()
    }

    /// Logs `user` in through the gateway; the session cookie.
    fn login(&self, user: &str) -> String {
        let r = self.send(&[Call {
            method: "POST".into(),
            path: format!("/login?username={user}"),
            host: Some("bookinfo.example.com".into()),
            headers: vec![("referer".into(), "/productpage".into())],
            count: 1,
            upload: 0,
        }]);
        assert_eq!(r[0].status, 302, "{:?}", r[0]);
        let cookie = r[0].headers.get("set-cookie").expect("a session cookie");
        cookie.split(';').next().unwrap().to_owned()
    }

    /// Applies `files` (sample paths) and waits until pages show `check`.
    fn step(
        &self,
        what: &str,
        files: &[&str],
        session: Option<&str>,
        check: impl Fn(&[Seen]) -> bool,
    ) {
        println!("== {what}: {files:?}");
        apply(
            &self.cluster,
            &files.iter().map(|f| sample(f)).collect::<Vec<_>>(),
        );
        let mut last = Vec::new();
        let ok = eventually(Duration::from_secs(15), || {
            last = self.pages(10, session);
            check(&last)
        });
        assert!(ok, "{what}: the pages show {last:?}");
    }
}

fn versions(seen: &[Seen]) -> Vec<&str> {
    seen.iter().map(|s| s.reviews.as_str()).collect()
}

#[test]
fn bookinfo_through_the_ingress_gateway_follows_istios_tasks() {
    if !require_root() {
        return;
    }
    let b = bookinfo();

    // Without routes, reviews answers from all three versions; the page is whole.
    let mut seen = Vec::new();
    let ok = eventually(Duration::from_secs(20), || {
        let replies = b.send(&[Call {
            method: "GET".into(),
            path: "/productpage".into(),
            host: None,
            headers: vec![],
            count: 1,
            upload: 0,
        }]);
        replies[0].status == 200
    });
    assert!(ok, "the product page never came through the gateway");
    for _ in 0..4 {
        seen.extend(b.pages(15, None));
    }
    let page = &seen[0];
    assert!(page.details, "{page:?}");
    for v in ["v1", "v2", "v3"] {
        assert!(
            versions(&seen).contains(&v),
            "no {v} among {:?}",
            versions(&seen)
        );
    }
    assert!(seen.iter().all(|s| {
        s.served_by
            .as_deref()
            .is_some_and(|p| p.starts_with("reviews-"))
    }));
    // Paths the gateway's VirtualService does not route: 404.
    let other = b.send(&[Call {
        method: "GET".into(),
        path: "/health".into(),
        host: None,
        headers: vec![],
        count: 1,
        upload: 0,
    }]);
    assert_eq!(other[0].status, 404);

    // Request routing: everything to v1; then jason to v2.
    b.step(
        "all traffic to v1",
        &["networking/virtual-service-all-v1.yaml"],
        None,
        |s| versions(s).iter().all(|v| *v == "v1"),
    );
    let jason = b.login("jason");
    b.step(
        "end-user jason to v2",
        &["networking/virtual-service-reviews-test-v2.yaml"],
        Some(&jason),
        |s| {
            s.iter()
                .all(|p| p.reviews == "v2" && p.user.as_deref() == Some("jason"))
        },
    );
    assert!(b.pages(10, None).iter().all(|p| p.reviews == "v1"));

    // Traffic shifting: 50/50 between v1 and v3, then all to v3.
    b.step(
        "reviews 50 % v1, 50 % v3",
        &["networking/virtual-service-reviews-50-v3.yaml"],
        None,
        |s| versions(s).contains(&"v3"),
    );
    let shifted = b.pages(100, None);
    let v3 = shifted.iter().filter(|s| s.reviews == "v3").count();
    assert!(
        shifted
            .iter()
            .all(|s| s.reviews == "v1" || s.reviews == "v3"),
        "{:?}",
        versions(&shifted)
    );
    assert!((30..=70).contains(&v3), "{v3} of 100 to v3");
    b.step(
        "reviews 100 % v3",
        &["networking/virtual-service-reviews-v3.yaml"],
        None,
        |s| versions(s).iter().all(|v| *v == "v3"),
    );

    // Fault injection: an abort for jason's ratings calls.
    b.step(
        "ratings abort 500 for jason",
        &[
            "networking/virtual-service-reviews-test-v2.yaml",
            "networking/virtual-service-ratings-test-abort.yaml",
        ],
        Some(&jason),
        |s| s.iter().all(|p| p.reviews == "v2" && p.ratings_unavailable),
    );
    assert!(
        b.pages(5, None)
            .iter()
            .all(|p| p.reviews == "v1" && !p.ratings_unavailable)
    );

    // A 7 s delay for jason: productpage gives up on reviews after two 3 s tries.
    b.step(
        "ratings delay 7 s for jason",
        &[
            "networking/virtual-service-reviews-test-v2.yaml",
            "networking/virtual-service-ratings-test-delay.yaml",
        ],
        None,
        |s| versions(s).iter().all(|v| *v == "v1"),
    );
    let started = Instant::now();
    let slow = b.pages(1, Some(&jason));
    let took = started.elapsed();
    assert_eq!(slow[0].reviews, "unavailable", "{slow:?}");
    assert!(
        took >= Duration::from_secs(6) && took < Duration::from_secs(8),
        "the page took {took:?}"
    );

    // Request timeouts: reviews v2 within 0.5 s while ratings takes 2 s: two 504s, the
    // reviews error after about a second.
    b.step(
        "reviews timeout 0.5 s, ratings delay 2 s",
        &["networking/task-request-timeouts.yaml"],
        None,
        |s| versions(s).iter().all(|v| *v == "unavailable"),
    );
    let started = Instant::now();
    let timed_out = b.pages(1, None);
    let took = started.elapsed();
    assert_eq!(timed_out[0].reviews, "unavailable");
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(2500),
        "the page took {took:?}"
    );
}
