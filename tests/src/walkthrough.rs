//! Istio's traffic-management walk-through on Bookinfo, on the netns cluster: two nodes
//! with the Bookinfo pods spread over both ([`crate::bookinfo`]), a waypoint for the
//! `default` namespace, an ingress gateway in `istio-system`, a client outside the mesh and
//! a Prometheus scraping every proxy. Each step applies the repository's
//! `samples/bookinfo` files, sends product pages through the gateway and says what they
//! showed. The kernel test (`tests/tests/bookinfo.rs`) and `cargo xtask demo bookinfo`
//! run the same steps.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bookinfo::{self, Seen};
use crate::http_workload::{Call, Reply};
use crate::otlp;
use crate::prometheus::{self, Edge, Prometheus};
use crate::{Cluster, ConfigOptions, PodSpec, Process, eventually};

pub const NS: &str = "default";
pub const GATEWAY_NS: &str = "istio-system";
const OUTSIDE: &str = "outside";
/// The ingress gateway's port (samples/bookinfo/networking/bookinfo-gateway.yaml).
const GATEWAY_PORT: u16 = 8080;
/// OTLP/HTTP's port, where the test's receiver listens.
const OTLP_PORT: u16 = 4318;
const HOST: &str = "bookinfo.example.com";

/// A sample file's path in the repository: `httpbin/...` under `samples/`, anything else
/// under `samples/bookinfo/`.
pub fn sample_path(path: &str) -> String {
    if path.starts_with("httpbin/") {
        format!("samples/{path}")
    } else {
        format!("samples/bookinfo/{path}")
    }
}

/// A file of the repository's samples ([`sample_path`]).
pub fn sample(path: &str) -> Result<String> {
    let full = format!("{}/../{}", env!("CARGO_MANIFEST_DIR"), sample_path(path));
    std::fs::read_to_string(&full).with_context(|| format!("reading {full}"))
}

/// The ratings pod that fails every other request: in the configuration only while the
/// retries step runs.
const FAULTY: &str = "ratings-v-faulty";
/// The httpbin Service (samples/httpbin/httpbin.yaml).
const HTTPBIN: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 90, 30)),
    8000,
);

/// The Bookinfo Services' addresses, as samples/bookinfo/platform/bookinfo.yaml sets them.
fn service(name: &str) -> SocketAddr {
    let ip = match name {
        "details" => [10, 96, 90, 10],
        "ratings" => [10, 96, 90, 11],
        "reviews" => [10, 96, 90, 12],
        _ => [10, 96, 90, 13],
    };
    SocketAddr::from((ip, bookinfo::PORT))
}

pub struct Walkthrough {
    pub cluster: Cluster,
    prometheus: Prometheus,
    /// Receives the gateway's and the waypoint's spans (every request is sampled).
    otlp: otlp::Receiver,
    _processes: Vec<Process>,
}

/// What one step did and saw.
#[derive(Debug, Clone)]
pub struct Report {
    pub name: &'static str,
    /// The sample files applied, with their text.
    pub applied: Vec<(&'static str, String)>,
    pub evidence: String,
    pub ok: bool,
}

/// A step: its name, the files it applies, and the check that tells what it saw (`Err`:
/// it did not hold).
pub struct Step {
    pub name: &'static str,
    pub files: &'static [&'static str],
    check: fn(&Walkthrough) -> Result<String>,
}

impl Walkthrough {
    /// Builds the cluster and starts everything on it.
    pub fn start() -> Result<Self> {
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
                    // The gateway goes through the waypoint too, so that L7 policies
                    // apply to its requests.
                    ("istio.io/ingress-use-waypoint", "true"),
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
            .pod(pod(FAULTY, "ratings", "v-faulty", 1))
            .pod(
                PodSpec::new("httpbin", NS, 1)
                    .label("app", "httpbin")
                    .label("version", "v1")
                    .service_account("httpbin"),
            )
            .pod(
                PodSpec::new("fortio", NS, 0)
                    .label("app", "fortio")
                    .service_account("fortio"),
            )
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
            .pod(PodSpec::new("prometheus", GATEWAY_NS, 0).label("app", "prometheus"))
            .pod(PodSpec::new("curl", OUTSIDE, 0).label("app", "curl"))
            .build()
            .context("building the cluster")?;
        let backends = ["details", "reviews", "ratings"].map(|s| (s, service(s)));
        let mut processes = Vec::new();
        for (pod, app, version) in [
            ("productpage-v1", "productpage", "v1"),
            ("details-v1", "details", "v1"),
            ("reviews-v1", "reviews", "v1"),
            ("reviews-v2", "reviews", "v2"),
            ("reviews-v3", "reviews", "v3"),
            ("ratings-v1", "ratings", "v1"),
            (FAULTY, "ratings", "v-faulty"),
        ] {
            processes.push(cluster.pod(pod).spawn_bookinfo(app, version, &backends)?);
        }
        processes.push(cluster.pod("httpbin").spawn_echo(8080)?);
        cluster.write_config(&cluster.config_path(), &documents(&[], false)?)?;
        cluster.start_agents(&cluster.config_path())?;
        // An OTLP receiver beside Prometheus; the L7 proxies sample every request.
        let collector = cluster.pod("prometheus");
        let otlp = otlp::Receiver::start(
            collector.netns_path(),
            SocketAddr::from((collector.ipv4(), OTLP_PORT)),
        )?;
        let endpoint = otlp.endpoint();
        let tracing = ["--otlp-endpoint", &endpoint, "--trace-sampling", "100"];
        processes.push(cluster.pod("waypoint").spawn_waypoint(
            "waypoint",
            NS,
            &cluster.config_path(),
            &tracing,
        )?);
        processes.push(cluster.pod("istio-ingressgateway").spawn_gateway(
            "istio-ingressgateway",
            GATEWAY_NS,
            &cluster.config_path(),
            &tracing,
        )?);
        let metrics = |ip: std::net::Ipv4Addr| SocketAddr::from((ip, crate::cluster::METRICS_PORT));
        let mut targets = vec![
            ("waypoint", metrics(cluster.pod("waypoint").ipv4())),
            (
                "ingressgateway",
                metrics(cluster.pod("istio-ingressgateway").ipv4()),
            ),
        ];
        let node_jobs = ["node0", "node1"];
        for (i, job) in node_jobs.iter().enumerate() {
            targets.push((job, metrics(cluster.node(i).ipv4())));
        }
        let dir = cluster
            .config_path()
            .parent()
            .context("the config's directory")?
            .join("prometheus");
        let prometheus = Prometheus::start(&cluster.pod("prometheus"), &dir, &targets)?;
        Ok(Self {
            cluster,
            prometheus,
            otlp,
            _processes: processes,
        })
    }

    fn gateway(&self) -> SocketAddr {
        SocketAddr::new(
            self.cluster.pod("istio-ingressgateway").ipv4().into(),
            GATEWAY_PORT,
        )
    }

    /// `calls` from the client outside the mesh to the ingress gateway.
    fn send(&self, calls: &[Call]) -> Result<Vec<Reply>> {
        self.cluster
            .pod("curl")
            .http_calls(self.gateway(), false, calls)
    }

    /// A product page through the gateway, sent as the child of a client span of a new trace
    /// (`traceparent`, sampled): the trace id and the client's span id.
    pub fn traced_page(&self) -> Result<(String, String)> {
        let hex = |n: u128, digits: usize| format!("{n:0digits$x}");
        let trace = hex(fastrand::u128(1..), 32);
        let span = hex(u128::from(fastrand::u64(1..)), 16);
        let r = self.send(&[Call {
            method: "GET".into(),
            path: "/productpage".into(),
            host: Some(HOST.into()),
            headers: vec![("traceparent".into(), format!("00-{trace}-{span}-01"))],
            count: 1,
            upload: 0,
        }])?;
        if r[0].status != 200 {
            bail!("the traced product page answered {}", r[0].status);
        }
        Ok((trace, span))
    }

    /// The spans of `trace_id` the proxies exported so far.
    pub fn trace(&self, trace_id: &str) -> Vec<otlp::ReceivedSpan> {
        self.otlp.trace(trace_id)
    }

    /// `count` product pages through the gateway, as `session` (a cookie) if given.
    fn pages(&self, count: usize, session: Option<&str>) -> Result<Vec<Seen>> {
        let call = Call {
            method: "GET".into(),
            path: "/productpage".into(),
            host: Some(HOST.into()),
            headers: session
                .map(|s| vec![("cookie".to_owned(), s.to_owned())])
                .unwrap_or_default(),
            count,
            upload: 0,
        };
        self.send(&[call])?
            .iter()
            .map(|r| {
                if r.status != 200 {
                    bail!("a product page answered {}: {}", r.status, r.body);
                }
                Ok(bookinfo::read_page(&r.body))
            })
            .collect()
    }

    /// Logs `user` in through the gateway; the session cookie.
    fn login(&self, user: &str) -> Result<String> {
        let r = self.send(&[Call {
            method: "POST".into(),
            path: format!("/login?username={user}"),
            host: Some(HOST.into()),
            headers: vec![("referer".into(), "/productpage".into())],
            count: 1,
            upload: 0,
        }])?;
        if r[0].status != 302 {
            bail!("login answered {}", r[0].status);
        }
        let cookie = r[0]
            .headers
            .get("set-cookie")
            .context("login set no cookie")?;
        Ok(cookie.split(';').next().unwrap_or_default().to_owned())
    }

    /// Applies `files` and polls (10 pages at a time, up to 15 s) until `check` holds.
    fn until(
        &self,
        files: &[&str],
        session: Option<&str>,
        check: impl Fn(&[Seen]) -> bool,
    ) -> Result<Vec<Seen>> {
        apply(&self.cluster, files)?;
        let mut last = Vec::new();
        let mut error = None;
        let ok = eventually(Duration::from_secs(15), || match self.pages(10, session) {
            Ok(seen) => {
                let ok = check(&seen);
                last = seen;
                ok
            }
            Err(e) => {
                error = Some(e);
                false
            }
        });
        if !ok {
            bail!(
                "never held within 15 s; last pages: {} {}",
                tally(&last),
                error.map(|e| format!("({e:#})")).unwrap_or_default()
            );
        }
        Ok(last)
    }

    /// Runs every step, telling `on_step` each report as it comes.
    pub fn run(&self, mut on_step: impl FnMut(&Report)) -> Vec<Report> {
        let mut reports = Vec::new();
        for step in steps() {
            let applied = step
                .files
                .iter()
                .map(|f| (*f, sample(f).unwrap_or_else(|e| format!("{e:#}"))))
                .collect();
            let (evidence, ok) = match (step.check)(self) {
                Ok(e) => (e, true),
                Err(e) => (format!("{e:#}"), false),
            };
            let report = Report {
                name: step.name,
                applied,
                evidence,
                ok,
            };
            on_step(&report);
            reports.push(report);
        }
        reports
    }

    /// The service graph from Prometheus, by Kiali's query, once every Bookinfo edge is in
    /// it (up to 30 s); with the TCP edges Kiali adds.
    pub fn graph(&self) -> Result<(Vec<Edge>, Vec<prometheus::Sample>)> {
        let wanted = [
            ("istio-ingressgateway.istio-system", "productpage.default"),
            ("productpage.default", "details.default"),
            ("productpage.default", "reviews.default"),
            ("reviews.default", "ratings.default"),
        ];
        let mut edges = Vec::new();
        let ok = eventually(Duration::from_secs(30), || {
            // Traffic in the window the rate looks at.
            let _ = self.pages(5, None);
            edges = self
                .prometheus
                .query(&prometheus::kiali_request_query("1m"))
                .map(|s| prometheus::graph(&s))
                .unwrap_or_default();
            wanted.iter().all(|(from, to)| {
                edges
                    .iter()
                    .any(|e| e.source.starts_with(from) && e.destination.starts_with(to))
            })
        });
        if !ok {
            bail!(
                "Prometheus never showed every Bookinfo edge; targets {:?}; edges {edges:?}",
                self.prometheus.targets_up().unwrap_or_default()
            );
        }
        let tcp = self.prometheus.query(&prometheus::kiali_tcp_query("1m"))?;
        Ok((edges, tcp))
    }

    /// A request from `pod` straight to `to` (plain HTTP/1.1): its status, 0 when the
    /// connection was refused or reset.
    fn direct(&self, pod: &str, to: SocketAddr, path: &str) -> Result<u16> {
        let r = self.cluster.pod(pod).http_calls(
            to,
            false,
            &[Call {
                method: "GET".into(),
                path: path.into(),
                host: None,
                headers: vec![],
                count: 1,
                upload: 0,
            }],
        )?;
        Ok(r[0].status)
    }

    /// A request through the gateway: its status.
    fn status(&self, method: &str, path: &str) -> Result<u16> {
        let r = self.send(&[Call {
            method: method.into(),
            path: path.into(),
            host: Some(HOST.into()),
            headers: vec![],
            count: 1,
            upload: 0,
        }])?;
        Ok(r[0].status)
    }

    /// The waypoint's request count for `filter`, read from its 15020.
    fn waypoint_requests(&self, filter: &[(&str, &str)]) -> Result<f64> {
        self.waypoint_metric("istio_requests_total", filter)
    }

    /// A counter of the waypoint's, summed over the series that match `filter`.
    fn waypoint_metric(&self, name: &str, filter: &[(&str, &str)]) -> Result<f64> {
        let pod = self.cluster.pod("waypoint");
        let (status, body) = crate::in_netns(pod.netns_path(), || {
            crate::workload::http_get(
                SocketAddr::from(([127, 0, 0, 1], crate::cluster::METRICS_PORT)),
                "/metrics",
                Duration::from_secs(5),
            )
        })??;
        if status != 200 {
            bail!("the waypoint's metrics answered {status}");
        }
        Ok(crate::metrics::Metrics::parse(&body).sum(name, filter))
    }

    /// The series Prometheus holds for `promql`.
    pub fn query(&self, promql: &str) -> Result<Vec<prometheus::Sample>> {
        self.prometheus.query(promql)
    }

    /// Where the graph pictures go.
    pub fn output_dir(&self) -> PathBuf {
        self.cluster
            .config_path()
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
    }
}

/// The platform, the gateway, the subsets, httpbin, the waypoint's Gateway; then `extra`
/// files; the faulty ratings pod only when `faulty`.
fn documents(extra: &[&str], faulty: bool) -> Result<ConfigOptions> {
    let mut opts = ConfigOptions::default();
    if !faulty {
        opts = opts.exclude(FAULTY);
    }
    for f in [
        "platform/bookinfo.yaml",
        "networking/bookinfo-gateway.yaml",
        "networking/destination-rule-all.yaml",
        "httpbin/httpbin.yaml",
    ]
    .iter()
    .chain(extra)
    {
        opts = opts.document(sample(f)?);
    }
    Ok(opts.document(format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: waypoint, namespace: {NS}}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n"
    )))
}

fn apply(cluster: &Cluster, files: &[&str]) -> Result<()> {
    cluster.write_config(&cluster.config_path(), &documents(files, false)?)?;
    analyzed(cluster)
}

/// [`apply`], with the faulty ratings pod among ratings' endpoints.
fn apply_with_faulty(cluster: &Cluster, files: &[&str]) -> Result<()> {
    cluster.write_config(&cluster.config_path(), &documents(files, true)?)?;
    analyzed(cluster)
}

/// `mesh-agent analyze` finds nothing to say about what a step applies: Istio's Bookinfo
/// objects, as the tasks apply them, are a correct configuration.
fn analyzed(cluster: &Cluster) -> Result<()> {
    let agent = crate::host::locate_binary("mesh-agent", crate::cluster::AGENT_BIN_ENV)?;
    let out = std::process::Command::new(agent)
        .arg("analyze")
        .arg("-f")
        .arg(cluster.config_path())
        .output()
        .context("running mesh-agent analyze")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains("No validation issues") {
        bail!(
            "mesh-agent analyze on the step's configuration ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `count` GETs of `path` on httpbin from the fortio pod (in the mesh): their statuses.
fn httpbin(w: &Walkthrough, path: &str, count: usize) -> Result<Vec<u16>> {
    let replies = w.cluster.pod("fortio").http_calls(
        HTTPBIN,
        false,
        &[Call {
            method: "GET".into(),
            path: path.into(),
            host: Some("httpbin:8000".into()),
            headers: vec![],
            count,
            upload: 0,
        }],
    )?;
    Ok(replies.iter().map(|r| r.status).collect())
}

/// `v1 7, v3 3`: how many pages showed each reviews version.
fn tally(seen: &[Seen]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for s in seen {
        *counts.entry(s.reviews.as_str()).or_default() += 1;
    }
    counts
        .iter()
        .map(|(v, n)| format!("{v} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn all(seen: &[Seen], version: &str) -> bool {
    seen.iter().all(|s| s.reviews == version)
}

/// The steps, in the order of Istio's tasks.
pub fn steps() -> Vec<Step> {
    vec![
        Step {
            name: "no routes: reviews from all three versions",
            files: &[],
            check: |w| {
                let ok = eventually(Duration::from_secs(20), || {
                    w.pages(1, None).is_ok_and(|s| s.len() == 1)
                });
                if !ok {
                    bail!("the product page never came through the gateway");
                }
                let seen = w.until(&[], None, |_| true)?;
                let mut seen = seen;
                seen.extend(w.pages(50, None)?);
                for v in ["v1", "v2", "v3"] {
                    if !seen.iter().any(|s| s.reviews == v) {
                        bail!("no page from reviews {v}: {}", tally(&seen));
                    }
                }
                if !seen.iter().all(|s| s.details) {
                    bail!("a page without the book's details");
                }
                let health = w.send(&[Call {
                    method: "GET".into(),
                    path: "/health".into(),
                    host: Some(HOST.into()),
                    headers: vec![],
                    count: 1,
                    upload: 0,
                }])?;
                if health[0].status != 404 {
                    bail!("/health through the gateway answered {}", health[0].status);
                }
                Ok(format!(
                    "{} pages: {}; /health (not routed by the gateway) 404",
                    seen.len(),
                    tally(&seen)
                ))
            },
        },
        Step {
            name: "request routing: all traffic to v1",
            files: &["networking/virtual-service-all-v1.yaml"],
            check: |w| {
                let seen = w.until(Step::files_of("request routing: all traffic"), None, |s| {
                    all(s, "v1")
                })?;
                let more = w.pages(20, None)?;
                if !all(&more, "v1") {
                    bail!("not all v1: {}", tally(&more));
                }
                Ok(format!(
                    "{} pages: {}",
                    seen.len() + more.len(),
                    tally(&more)
                ))
            },
        },
        Step {
            name: "request routing: end-user jason to v2",
            files: &["networking/virtual-service-reviews-test-v2.yaml"],
            check: |w| {
                let jason = w.login("jason")?;
                let seen = w.until(
                    Step::files_of("request routing: end-user"),
                    Some(&jason),
                    |s| {
                        s.iter()
                            .all(|p| p.reviews == "v2" && p.user.as_deref() == Some("jason"))
                    },
                )?;
                let anonymous = w.pages(10, None)?;
                if !all(&anonymous, "v1") {
                    bail!("anonymous pages: {}", tally(&anonymous));
                }
                Ok(format!(
                    "jason: {}; anonymous: {}",
                    tally(&seen),
                    tally(&anonymous)
                ))
            },
        },
        Step {
            name: "traffic shifting: 50 % v1, 50 % v3",
            files: &["networking/virtual-service-reviews-50-v3.yaml"],
            check: |w| {
                w.until(Step::files_of("traffic shifting: 50"), None, |s| {
                    s.iter().any(|p| p.reviews == "v3")
                })?;
                let seen = w.pages(100, None)?;
                let v3 = seen.iter().filter(|s| s.reviews == "v3").count();
                if !seen.iter().all(|s| s.reviews == "v1" || s.reviews == "v3")
                    || !(30..=70).contains(&v3)
                {
                    bail!("100 pages: {}", tally(&seen));
                }
                Ok(format!("100 pages: {}", tally(&seen)))
            },
        },
        Step {
            name: "traffic shifting: 100 % v3",
            files: &["networking/virtual-service-reviews-v3.yaml"],
            check: |w| {
                let seen = w.until(Step::files_of("traffic shifting: 100"), None, |s| {
                    all(s, "v3")
                })?;
                Ok(format!("{} pages: {}", seen.len(), tally(&seen)))
            },
        },
        Step {
            name: "fault injection: ratings abort (HTTP 500) for jason",
            files: &[
                "networking/virtual-service-reviews-test-v2.yaml",
                "networking/virtual-service-ratings-test-abort.yaml",
            ],
            check: |w| {
                let jason = w.login("jason")?;
                let seen = w.until(
                    Step::files_of("fault injection: ratings abort"),
                    Some(&jason),
                    |s| s.iter().all(|p| p.reviews == "v2" && p.ratings_unavailable),
                )?;
                let anonymous = w.pages(5, None)?;
                if anonymous.iter().any(|p| p.ratings_unavailable) {
                    bail!("anonymous users see the ratings error too");
                }
                Ok(format!(
                    "jason: {} pages with \"{}\"; anonymous: {}, ratings shown",
                    seen.len(),
                    bookinfo::RATINGS_UNAVAILABLE,
                    tally(&anonymous)
                ))
            },
        },
        Step {
            name: "fault injection: ratings delay 7 s for jason",
            files: &[
                "networking/virtual-service-reviews-test-v2.yaml",
                "networking/virtual-service-ratings-test-delay.yaml",
            ],
            check: |w| {
                let jason = w.login("jason")?;
                // Applied once jason's ratings are no longer aborted (the page is slow).
                apply(&w.cluster, Step::files_of("fault injection: ratings delay"))?;
                let mut took = Duration::ZERO;
                let mut seen = Vec::new();
                let ok = eventually(Duration::from_secs(30), || {
                    let started = Instant::now();
                    seen = w.pages(1, Some(&jason)).unwrap_or_default();
                    took = started.elapsed();
                    seen.first().is_some_and(|p| p.reviews == "unavailable")
                });
                if !ok || took < Duration::from_secs(6) || took > Duration::from_secs(8) {
                    bail!("jason's page after {took:?}: {}", tally(&seen));
                }
                Ok(format!(
                    "jason's page after {:.1} s: \"{}\" (productpage gave up after 2 x 3 s)",
                    took.as_secs_f64(),
                    bookinfo::REVIEWS_UNAVAILABLE
                ))
            },
        },
        Step {
            name: "request timeouts: reviews 0.5 s, ratings delayed 2 s",
            files: &["networking/task-request-timeouts.yaml"],
            check: |w| {
                w.until(Step::files_of("request timeouts"), None, |s| {
                    all(s, "unavailable")
                })?;
                let started = Instant::now();
                let seen = w.pages(1, None)?;
                let took = started.elapsed();
                if !all(&seen, "unavailable")
                    || took < Duration::from_millis(1000)
                    || took > Duration::from_millis(2500)
                {
                    bail!("the page after {took:?}: {}", tally(&seen));
                }
                Ok(format!(
                    "the page after {:.1} s: reviews timed out twice (504 UT at the waypoint)",
                    took.as_secs_f64()
                ))
            },
        },
    ]
    .into_iter()
    .chain(more_steps())
    .collect()
}

/// The steps about resilience, mirroring and security, after the routing ones.
fn more_steps() -> Vec<Step> {
    vec![
        Step {
            name: "retries: ratings with a faulty endpoint, retried on 5xx",
            files: &[
                "networking/virtual-service-reviews-v2-v3.yaml",
                "networking/virtual-service-ratings-retries.yaml",
            ],
            check: |w| {
                let files = Step::files_named("retries");
                // Without a retry policy (Istio's default does not retry 503s), the faulty
                // endpoint's errors reach the pages.
                apply_with_faulty(&w.cluster, &files[..1])?;
                let mut failing = 0;
                let ok = eventually(Duration::from_secs(15), || {
                    let seen = w.pages(20, None).unwrap_or_default();
                    failing = seen.iter().filter(|p| p.ratings_unavailable).count();
                    failing > 0
                });
                if !ok {
                    bail!("no page showed the faulty ratings' errors without retries");
                }
                let retries = |w: &Walkthrough| {
                    w.waypoint_metric("mesh_waypoint_upstream_retries_total", &[])
                };
                let before = retries(w)?;
                apply_with_faulty(&w.cluster, files)?;
                let ok = eventually(Duration::from_secs(15), || {
                    w.pages(10, None)
                        .is_ok_and(|s| s.iter().all(|p| !p.ratings_unavailable))
                });
                let seen = w.pages(40, None)?;
                let still = seen.iter().filter(|p| p.ratings_unavailable).count();
                if !ok || still > 0 {
                    bail!("{still} of 40 pages still showed the ratings error with retries");
                }
                let retried = retries(w)? - before;
                if retried < 1.0 {
                    bail!("no retry counted at the waypoint");
                }
                Ok(format!(
                    "without retries {failing} of 20 pages showed \"{}\"; with retries on 5xx 0 of 40 did, after {retried} retries at the waypoint",
                    bookinfo::RATINGS_UNAVAILABLE
                ))
            },
        },
        Step {
            name: "circuit breaking: httpbin with one connection and one pending request",
            files: &["httpbin/destination-rule-circuit-breaker.yaml"],
            check: |w| {
                apply(&w.cluster, Step::files_named("circuit breaking"))?;
                let overflows = |w: &Walkthrough| {
                    w.waypoint_metric("mesh_waypoint_upstream_overflows_total", &[])
                };
                let before = overflows(w)?;
                let three = || -> Vec<u16> {
                    std::thread::scope(|s| {
                        let clients: Vec<_> = (0..3)
                            .map(|_| s.spawn(|| httpbin(w, "/delay/20", 30).unwrap_or_default()))
                            .collect();
                        clients
                            .into_iter()
                            .flat_map(|c| c.join().unwrap_or_default())
                            .collect()
                    })
                };
                let mut statuses = Vec::new();
                let ok = eventually(Duration::from_secs(20), || {
                    statuses = three();
                    statuses.contains(&503)
                });
                let overflowed = statuses.iter().filter(|s| **s == 503).count();
                let succeeded = statuses.iter().filter(|s| **s == 200).count();
                if !ok || overflowed + succeeded != statuses.len() {
                    bail!(
                        "3 clients x 30: {succeeded} 200, {overflowed} 503, of {}",
                        statuses.len()
                    );
                }
                let alone = httpbin(w, "/delay/20", 20)?;
                if alone.iter().any(|s| *s != 200) {
                    bail!("one client alone got {alone:?}");
                }
                let counted = overflows(w)? - before;
                Ok(format!(
                    "3 concurrent clients x 30 requests: {succeeded} answered, {overflowed} overflowed (503, UO); 1 client x 20: all answered; the waypoint counted {counted} overflows"
                ))
            },
        },
        Step {
            name: "mirroring: reviews to v1, a copy of each request to v2",
            files: &["networking/virtual-service-reviews-v1-mirror-v2.yaml"],
            check: |w| {
                // Mirrored calls reach reviews v2, which calls ratings: counted at the
                // waypoint while every page shows v1.
                let from_v2 = [
                    ("reporter", "waypoint"),
                    ("destination_service_name", "ratings"),
                    ("source_version", "v2"),
                ];
                w.until(Step::files_named("mirroring"), None, |s| all(s, "v1"))?;
                let before = w.waypoint_requests(&from_v2)?;
                let seen = w.pages(20, None)?;
                if !all(&seen, "v1") {
                    bail!("pages: {}", tally(&seen));
                }
                let mut mirrored = 0.0;
                let ok = eventually(Duration::from_secs(10), || {
                    mirrored = w.waypoint_requests(&from_v2).unwrap_or(0.0) - before;
                    mirrored >= 20.0
                });
                if !ok {
                    bail!("{mirrored} ratings calls from reviews v2 for 20 mirrored pages");
                }
                Ok(format!(
                    "20 pages: {}; meanwhile reviews v2 (the mirror) called ratings {mirrored} times",
                    tally(&seen)
                ))
            },
        },
        Step {
            name: "authorization L7: productpage takes GET and POST from the gateway only",
            files: &["policy/productpage-viewer.yaml"],
            check: |w| {
                apply(&w.cluster, Step::files_named("authorization L7"))?;
                let mut delete = 0;
                let ok = eventually(Duration::from_secs(15), || {
                    delete = w.status("DELETE", "/productpage").unwrap_or(0);
                    delete == 403
                });
                if !ok {
                    bail!("DELETE /productpage answered {delete}");
                }
                let get = w.status("GET", "/productpage")?;
                if get != 200 {
                    bail!("GET /productpage answered {get}");
                }
                Ok(format!(
                    "GET /productpage {get}; DELETE /productpage {delete} (RBAC: access denied, at the waypoint)"
                ))
            },
        },
        Step {
            name: "authorization L4: ratings accepts only the waypoint",
            files: &["policy/ratings-from-waypoint.yaml"],
            check: |w| {
                let ratings =
                    SocketAddr::new(w.cluster.pod("ratings-v1").ipv4().into(), bookinfo::PORT);
                let before = w.direct("productpage-v1", ratings, "/ratings/0")?;
                apply(&w.cluster, Step::files_named("authorization L4"))?;
                let mut after = 0;
                let ok = eventually(Duration::from_secs(15), || {
                    after = w
                        .direct("productpage-v1", ratings, "/ratings/0")
                        .unwrap_or(0);
                    after == 0
                });
                if !ok {
                    bail!("productpage dialling the ratings pod still got {after}");
                }
                // Through the waypoint ratings still answers (the mirrored reviews v2 calls
                // it for every page).
                let answered = [
                    ("reporter", "waypoint"),
                    ("destination_service_name", "ratings"),
                    ("response_code", "200"),
                ];
                let ok_before = w.waypoint_requests(&answered)?;
                w.pages(5, None)?;
                let mut served = 0.0;
                let ok = eventually(Duration::from_secs(10), || {
                    served = w.waypoint_requests(&answered).unwrap_or(0.0) - ok_before;
                    served >= 5.0
                });
                if !ok {
                    bail!("ratings answered the waypoint {served} times for 5 pages");
                }
                Ok(format!(
                    "productpage dialling the ratings pod: {before} before, refused after; through the waypoint ratings answered {served} of 5 calls with 200"
                ))
            },
        },
        Step {
            name: "mTLS STRICT: the namespace's pods take only mutual TLS",
            files: &["policy/peer-authentication-strict.yaml"],
            check: |w| {
                let productpage = SocketAddr::new(
                    w.cluster.pod("productpage-v1").ipv4().into(),
                    bookinfo::PORT,
                );
                let before = w.direct("curl", productpage, "/productpage")?;
                apply(&w.cluster, Step::files_named("mTLS STRICT"))?;
                let mut after = 0;
                let ok = eventually(Duration::from_secs(15), || {
                    after = w.direct("curl", productpage, "/productpage").unwrap_or(0);
                    after == 0
                });
                if !ok {
                    bail!("plain text from outside the mesh still got {after}");
                }
                let seen = w.pages(5, None)?;
                Ok(format!(
                    "plain text from outside to the productpage pod: {before} before, refused after; through the gateway: {}",
                    tally(&seen)
                ))
            },
        },
    ]
}

impl Step {
    /// The files of the step whose name starts with `prefix`, with those of the steps of
    /// the security part before it (their policies stay applied).
    fn files_named(prefix: &str) -> &'static [&'static str] {
        static CUMULATIVE: std::sync::OnceLock<Vec<(&'static str, Vec<&'static str>)>> =
            std::sync::OnceLock::new();
        let table = CUMULATIVE.get_or_init(|| {
            let mut so_far: Vec<&'static str> = Vec::new();
            more_steps()
                .into_iter()
                .map(|s| {
                    // Mirroring replaces routes; the policies accumulate after it.
                    if s.name.starts_with("mirroring") {
                        so_far.clear();
                    }
                    so_far.extend_from_slice(s.files);
                    (s.name, so_far.clone())
                })
                .collect()
        });
        table
            .iter()
            .find(|(name, _)| name.starts_with(prefix))
            .map(|(_, files)| files.as_slice())
            .unwrap_or(&[])
    }

    /// The files of the step whose name starts with `prefix` (for a check to apply its own
    /// step's files).
    fn files_of(prefix: &str) -> &'static [&'static str] {
        steps()
            .into_iter()
            .find(|s| s.name.starts_with(prefix))
            .map_or(&[], |s| s.files)
    }
}
