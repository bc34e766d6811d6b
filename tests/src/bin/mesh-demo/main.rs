//! `mesh-demo` (run by `cargo xtask demo`): builds a two-node netns cluster with an
//! enrolled namespace `shop` and a non-enrolled `legacy`, starts one agent per node,
//! sends traffic same-node and cross-node over IPv4 and IPv6, and reports which agent
//! carried each connection (metric deltas, access log) and that `legacy` bypassed the
//! mesh. Exits 0 only if every check holds.
//!
//! `mesh-demo bookinfo` runs Istio's Bookinfo walk-through instead ([`bookinfo`]).
#![forbid(unsafe_code)]

mod bookinfo;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use tests::cluster::strip_ansi;
use tests::metrics::Metrics;
use tests::{Cluster, ConfigOptions, ConnectReport, Pod, PodSpec};

const OPENED: &str = "istio_tcp_connections_opened_total";
const CLOSED: &str = "istio_tcp_connections_closed_total";
const SENT: &str = "istio_tcp_sent_bytes_total";
const RECEIVED: &str = "istio_tcp_received_bytes_total";
const APP_PORT: u16 = 8080;
const HOST_PORT: u16 = 8081;

#[derive(Parser)]
#[command(
    name = "mesh-demo",
    about = "mesh-agent demo on a network-namespace cluster"
)]
struct Args {
    /// Bytes echoed per connection.
    #[arg(long, default_value_t = 1 << 20)]
    bytes: u64,
    /// Print the raw metrics and the agents' whole logs at the end.
    #[arg(long)]
    verbose: bool,
    /// How long to wait for counters to settle after a connection closes.
    #[arg(long, default_value_t = 5_000)]
    settle_ms: u64,
    #[command(subcommand)]
    scenario: Option<Scenario>,
}

#[derive(clap::Subcommand)]
enum Scenario {
    /// Istio's Bookinfo behind the ingress gateway, through the traffic-management tasks,
    /// watched in Prometheus.
    Bookinfo,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "mesh-demo needs root (network namespaces, cgroups, eBPF): run `cargo xtask demo`"
        );
        return ExitCode::from(2);
    }
    let outcome = match args.scenario {
        Some(Scenario::Bookinfo) => bookinfo::run(args.verbose),
        None => run(&args),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            println!("\nRESULT: FAIL: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where a connection goes and what must be true of it.
struct Case {
    title: &'static str,
    client: Arc<Pod>,
    target: String,
    to: SocketAddr,
    /// Index of the node whose agent must report it as `source` / `destination`;
    /// `None` for traffic that must bypass the mesh.
    via: Option<(usize, usize)>,
}

/// Every check of the run, and the ones of the case being run.
struct Checks {
    results: Vec<(bool, String)>,
    case_failures: Vec<String>,
}

impl Checks {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        let what = what.into();
        if !ok {
            self.case_failures.push(what.clone());
        }
        self.results.push((ok, what));
    }
}

fn run(args: &Args) -> Result<bool> {
    println!("mesh-agent demo\n===============");
    let cluster = Cluster::builder()
        .nodes(2)
        .ambient_namespace("shop")
        .namespace("legacy", std::iter::empty::<(&str, &str)>())
        .pod(PodSpec::new("frontend", "shop", 0).service_account("frontend"))
        .pod(PodSpec::new("cart", "shop", 0).service_account("cart"))
        .pod(PodSpec::new("orders", "shop", 1).service_account("orders"))
        .pod(PodSpec::new("batch", "legacy", 0).service_account("batch"))
        .build()
        .context("building the cluster")?;
    let node2 = cluster.node(1);
    let (frontend, cart, orders, batch) = (
        cluster.pod("frontend"),
        cluster.pod("cart"),
        cluster.pod("orders"),
        cluster.pod("batch"),
    );

    println!(
        "cluster {}: 2 nodes on a bridge, pods are processes in their own netns and cgroup",
        cluster.prefix()
    );
    for node in cluster.nodes() {
        println!("  {} {} {}", node.name(), node.ipv4(), node.ipv6());
        for pod in cluster.pods_on(node.index()) {
            let enrolled = cluster
                .namespaces()
                .get(pod.namespace())
                .and_then(|l| l.get("istio.io/dataplane-mode"))
                .is_some_and(|v| v == "ambient");
            println!(
                "    {:<16} {:<12} {:<16} {}",
                format!("{}/{}", pod.namespace(), pod.name()),
                pod.ipv4(),
                pod.ipv6(),
                if enrolled {
                    "ambient (enrolled)"
                } else {
                    "not enrolled"
                }
            );
        }
    }
    println!(
        "    {:<16} {:<12} {:<16} outside the mesh",
        "host server",
        format!("{}:{HOST_PORT}", node2.ipv4()),
        node2.ipv6()
    );

    for pod in [&frontend, &cart, &orders] {
        pod.spawn_server(&[APP_PORT])?;
    }
    node2.spawn_server(&[HOST_PORT])?;

    let config = cluster.config_path();
    cluster.write_config(&config, &ConfigOptions::default())?;
    println!("\nconfig: {} (Namespace and Pod objects)", config.display());
    for node in cluster.nodes() {
        node.start_agent(&config)
            .with_context(|| format!("starting the agent on {}", node.name()))?;
        let pid = node.agent().map(|a| a.pid()).unwrap_or_default();
        println!(
            "agent on {}: ready (pid {pid}, --cgroup {})",
            node.name(),
            node.cgroup().display()
        );
    }

    let host_v4 = SocketAddr::new(node2.ipv4().into(), HOST_PORT);
    let host_v6 = SocketAddr::new(node2.ipv6().into(), HOST_PORT);
    let cases = [
        Case {
            title: "same-node  IPv4",
            client: frontend.clone(),
            target: "shop/cart".into(),
            to: cart.addr_v4(APP_PORT),
            via: Some((0, 0)),
        },
        Case {
            title: "same-node  IPv6",
            client: frontend.clone(),
            target: "shop/cart".into(),
            to: cart.addr_v6(APP_PORT),
            via: Some((0, 0)),
        },
        Case {
            title: "cross-node IPv4",
            client: frontend.clone(),
            target: "shop/orders".into(),
            to: orders.addr_v4(APP_PORT),
            via: Some((0, 1)),
        },
        Case {
            title: "cross-node IPv6",
            client: orders.clone(),
            target: "shop/frontend".into(),
            to: frontend.addr_v6(APP_PORT),
            via: Some((1, 0)),
        },
        Case {
            title: "legacy     IPv4",
            client: batch.clone(),
            target: "node2 host".into(),
            to: host_v4,
            via: None,
        },
        Case {
            title: "legacy     IPv6",
            client: batch.clone(),
            target: "node2 host".into(),
            to: host_v6,
            via: None,
        },
    ];

    let mut checks = Checks {
        results: Vec::new(),
        case_failures: Vec::new(),
    };
    println!("\ntraffic ({} bytes echoed per connection)", args.bytes);
    for case in &cases {
        run_case(&cluster, case, args, &mut checks)?;
    }

    println!("\nmetrics after the run (istio_tcp_* by reporter, source -> destination)");
    for node in cluster.nodes() {
        println!("  {}:", node.name());
        match node.metrics() {
            Ok(text) => print_metrics(&Metrics::parse(&text), args.verbose),
            Err(e) => println!("    unreadable: {e:#}"),
        }
    }

    println!("\naccess log");
    for node in cluster.nodes() {
        let lines = node.access_log();
        println!("  {} ({} lines):", node.name(), lines.len());
        for line in &lines {
            println!("    {line}");
        }
    }

    let failed: Vec<&String> = checks
        .results
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, w)| w)
        .collect();
    if args.verbose || !failed.is_empty() {
        for node in cluster.nodes() {
            let log = strip_ansi(&node.agent_log());
            let lines: Vec<&str> = log.lines().collect();
            let shown = if args.verbose { lines.len() } else { 40 };
            println!(
                "\n---- {} agent log (last {} of {} lines) ----",
                node.name(),
                shown.min(lines.len()),
                lines.len()
            );
            for line in &lines[lines.len().saturating_sub(shown)..] {
                println!("{line}");
            }
        }
    }

    let total = checks.results.len();
    if failed.is_empty() {
        println!("\nRESULT: PASS ({total}/{total} checks)");
        Ok(true)
    } else {
        println!("\nRESULT: FAIL ({} of {total} checks failed)", failed.len());
        for what in failed {
            println!("  - {what}");
        }
        Ok(false)
    }
}

/// One line per (reporter, source, destination, service) with the four TCP counters;
/// `raw` also prints the exposition lines themselves.
fn print_metrics(metrics: &Metrics, raw: bool) {
    let label = |s: &tests::metrics::Sample, k: &str| {
        s.labels.get(k).cloned().unwrap_or_else(|| "-".into())
    };
    let mut rows: BTreeMap<(String, String, String, String), [f64; 4]> = BTreeMap::new();
    for sample in &metrics.samples {
        let Some(column) = [OPENED, CLOSED, SENT, RECEIVED]
            .iter()
            .position(|n| *n == sample.name)
        else {
            continue;
        };
        let key = (
            label(sample, "reporter"),
            format!(
                "{}/{}",
                label(sample, "source_workload_namespace"),
                label(sample, "source_workload")
            ),
            format!(
                "{}/{}",
                label(sample, "destination_workload_namespace"),
                label(sample, "destination_workload")
            ),
            label(sample, "destination_service"),
        );
        rows.entry(key).or_default()[column] += sample.value;
    }
    if rows.is_empty() {
        println!("    (no istio_tcp samples)");
    }
    for ((reporter, source, destination, service), [opened, closed, sent, received]) in rows {
        println!(
            "    {reporter:<11} {source:>16} -> {destination:<16} service={service:<8} \
             opened {opened} closed {closed} sent {sent} received {received}"
        );
    }
    if raw {
        for sample in metrics
            .samples
            .iter()
            .filter(|s| s.name.starts_with("istio_tcp_"))
        {
            println!("    {sample}");
        }
    }
}

/// One `/metrics` scrape per node (an error when the agent did not answer).
type Scrape = Vec<Result<Metrics, String>>;

fn scrape(cluster: &Cluster) -> Scrape {
    cluster
        .nodes()
        .iter()
        .map(|n| {
            n.metrics()
                .map(|t| Metrics::parse(&t))
                .map_err(|e| format!("{e:#}"))
        })
        .collect()
}

/// Counter movement on one node for one reporter: (opened, closed, sent, received);
/// NaN when a scrape failed, so no check on it can pass.
fn movement(
    after: &Result<Metrics, String>,
    before: &Result<Metrics, String>,
    reporter: &str,
) -> [f64; 4] {
    let filter = [("reporter", reporter)];
    match (after, before) {
        (Ok(after), Ok(before)) => {
            [OPENED, CLOSED, SENT, RECEIVED].map(|name| after.delta(before, name, &filter))
        }
        _ => [f64::NAN; 4],
    }
}

/// How much any istio_tcp counter moved on one node, whatever its labels.
fn total_movement(after: &Result<Metrics, String>, before: &Result<Metrics, String>) -> f64 {
    match (after, before) {
        (Ok(after), Ok(before)) => [OPENED, CLOSED, SENT, RECEIVED]
            .iter()
            .map(|name| after.delta(before, name, &[]).abs())
            .sum(),
        _ => f64::NAN,
    }
}

/// Why a node's movement cannot be shown, if it cannot.
fn unreadable(after: &Result<Metrics, String>, before: &Result<Metrics, String>) -> Option<String> {
    match (before, after) {
        (Err(e), _) => Some(format!("metrics unreadable before the connection: {e}")),
        (_, Err(e)) => Some(format!("metrics unreadable after the connection: {e}")),
        _ => None,
    }
}

fn describe(m: [f64; 4]) -> String {
    format!(
        "opened +{} closed +{} sent +{} received +{}",
        m[0], m[1], m[2], m[3]
    )
}

fn run_case(cluster: &Cluster, case: &Case, args: &Args, checks: &mut Checks) -> Result<()> {
    let client = &case.client;
    let nodes = cluster.nodes().len();
    let mut details = Vec::new();
    checks.case_failures.clear();

    let before = scrape(cluster);
    // Access-log lines naming this destination: under capture the client socket's own
    // address is that of the loopback listener, so the original destination is what
    // identifies the connection in both agents' logs.
    let dst_addr = case.to.to_string();
    let logged = |node: usize| -> usize {
        cluster
            .node(node)
            .access_log()
            .iter()
            .filter(|line| line.contains(&dst_addr))
            .count()
    };
    let logged_before: Vec<usize> = (0..nodes).map(logged).collect();

    let report: ConnectReport = client.connect(case.to, args.bytes)?;
    let client_ip = match case.to {
        SocketAddr::V4(_) => client.ipv4().into(),
        SocketAddr::V6(_) => client.ipv6().into(),
    };
    let show = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "nothing".into());
    details.push(format!(
        "echo: {} of {} bytes back{}; server saw {}; client getpeername {}",
        report.received,
        args.bytes,
        if report.ok { ", byte-exact" } else { "" },
        show(report.server_saw_peer),
        show(report.getpeername)
    ));
    checks.check(
        report.ok && report.received == args.bytes,
        format!(
            "{}: echo byte-exact ({})",
            case.title,
            report.error.as_deref().unwrap_or("ok")
        ),
    );
    checks.check(
        report.server_saw_peer.map(|a| a.ip()) == Some(client_ip),
        format!(
            "{}: the server sees the client pod address {client_ip}",
            case.title
        ),
    );
    checks.check(
        report.getpeername == Some(case.to),
        format!("{}: the client's getpeername is what it dialed", case.title),
    );

    let in_log = |node: usize| -> bool { logged(node) > logged_before[node] };
    match case.via {
        Some((src, dst)) => {
            let bytes = args.bytes as f64;
            let carried =
                |m: [f64; 4]| m[0] == 1.0 && m[1] == 1.0 && m[2] >= bytes && m[3] >= bytes;
            // Counters move when the connection closes; give them a moment.
            let deadline = Instant::now() + Duration::from_millis(args.settle_ms);
            let mut after = scrape(cluster);
            while !(carried(movement(&after[src], &before[src], "source"))
                && carried(movement(&after[dst], &before[dst], "destination")))
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(100));
                after = scrape(cluster);
            }
            for (i, node) in cluster.nodes().iter().enumerate() {
                let s = movement(&after[i], &before[i], "source");
                let d = movement(&after[i], &before[i], "destination");
                let line = if let Some(why) = unreadable(&after[i], &before[i]) {
                    why
                } else if s == [0.0; 4] && d == [0.0; 4] {
                    "no counter moved".to_string()
                } else {
                    format!("source: {} | destination: {}", describe(s), describe(d))
                };
                details.push(format!("{}: {line}", node.name()));
            }
            let (src_name, dst_name) = (cluster.node(src).name(), cluster.node(dst).name());
            checks.check(
                carried(movement(&after[src], &before[src], "source")),
                format!(
                    "{}: reported once by the {src_name} agent as source, bytes both ways",
                    case.title
                ),
            );
            checks.check(
                carried(movement(&after[dst], &before[dst], "destination")),
                format!(
                    "{}: reported once by the {dst_name} agent as destination, bytes both ways",
                    case.title
                ),
            );
            for i in (0..nodes).filter(|&i| i != src && i != dst) {
                let other = movement(&after[i], &before[i], "source")[0]
                    + movement(&after[i], &before[i], "destination")[0];
                checks.check(
                    other == 0.0,
                    format!(
                        "{}: the {} agent is not involved",
                        case.title,
                        cluster.node(i).name()
                    ),
                );
            }
            let logs: Vec<&str> = (0..nodes)
                .filter(|&i| in_log(i))
                .map(|i| cluster.node(i).name())
                .collect();
            details.push(format!(
                "access log (dst.addr={dst_addr}): {}",
                if logs.is_empty() {
                    "none".to_string()
                } else {
                    logs.join(", ")
                }
            ));
            checks.check(
                in_log(src) && in_log(dst),
                format!(
                    "{}: in the access log of {src_name}{}",
                    case.title,
                    if src == dst {
                        String::new()
                    } else {
                        format!(" and {dst_name}")
                    },
                ),
            );
        }
        None => {
            // Give a wrongly captured connection the same chance to show up.
            std::thread::sleep(Duration::from_millis(args.settle_ms.min(1_000)));
            let after = scrape(cluster);
            let mut moved = 0.0;
            for (i, node) in cluster.nodes().iter().enumerate() {
                let total = total_movement(&after[i], &before[i]);
                details.push(format!(
                    "{}: {}",
                    node.name(),
                    if let Some(why) = unreadable(&after[i], &before[i]) {
                        why
                    } else if total == 0.0 {
                        "no counter moved".to_string()
                    } else {
                        format!("counters moved by {total}")
                    }
                ));
                moved += total;
            }
            let logs: Vec<&str> = (0..nodes)
                .filter(|&i| in_log(i))
                .map(|i| cluster.node(i).name())
                .collect();
            details.push(format!(
                "access log (dst.addr={dst_addr}): {}",
                if logs.is_empty() {
                    "none".to_string()
                } else {
                    logs.join(", ")
                }
            ));
            checks.check(
                moved == 0.0,
                format!(
                    "{}: bypasses the mesh, no counter moves on any agent",
                    case.title
                ),
            );
            checks.check(
                logs.is_empty(),
                format!("{}: in no agent's access log", case.title),
            );
        }
    }

    let verdict = if checks.case_failures.is_empty() {
        "ok"
    } else {
        "FAILED"
    };
    println!(
        "  {:<6} {}  {}/{} -> {} {}",
        verdict,
        case.title,
        client.namespace(),
        client.name(),
        case.target,
        case.to
    );
    for line in details {
        println!("           {line}");
    }
    for failure in &checks.case_failures {
        println!("           FAILED: {failure}");
    }
    Ok(())
}
