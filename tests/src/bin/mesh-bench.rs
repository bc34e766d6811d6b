//! `mesh-bench` (run by `cargo xtask bench`): measures what the mesh costs, each figure
//! next to a baseline measured in the same run, reported as a ratio. On a two-node
//! network-namespace cluster with real agents it compares three paths, interleaved
//! run by run: no mesh (pods of a namespace without the ambient label, cross-node), mesh
//! same-node and mesh cross-node (HBONE): bulk throughput (iperf3), keep-alive request
//! latency (wrk, and a fixed-rate client of its own), connection churn (wrk with
//! `Connection: close`), the agents' and the whole machine's CPU per GB and per 10k
//! requests, the agents' memory per idle connection, and, on a one-node cluster, idle
//! memory with 100 enrolled pods and enrollment time. `--smoke` runs every case briefly so CI proves the benchmarks still
//! work; its numbers mean nothing. docs/benchmarks.md explains each figure.
//!
//! The subcommands are what the benchmark runs inside pods (it starts itself there).
#![forbid(unsafe_code)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use mesh_agent::identity::{FileCa, Identity, SecretManager, testing::handshake, tls};
use mesh_agent::rbac::{BenchCase, Connection, Policies, bench_policies};
use tests::bench::{self, CAPTURED, HTTP_BODY_BYTES, PROBING, RateReport, Summary, WRK_SCRIPT};
use tests::{Cluster, ConfigOptions, Node, Pod, PodSpec, Process, require_root};

/// Counts this process's heap: the scale stage's breakdown of the agent's memory.
#[global_allocator]
static HEAP: tests::heap::Counting = tests::heap::Counting;

#[derive(Parser)]
#[command(
    name = "mesh-bench",
    about = "mesh-agent benchmarks (ratios against a baseline of the same run)"
)]
struct Args {
    /// A few iterations of everything: checks the benchmarks run, not how fast.
    #[arg(long)]
    smoke: bool,
    /// Rounds of every interleaved case (default: 3, smoke 1).
    #[arg(long)]
    reps: Option<usize>,
    /// Seconds of every iperf3, wrk and fixed-rate run (default: 5, smoke 1).
    #[arg(long)]
    seconds: Option<u64>,
    /// Idle connections held for the memory figure (default: 1000, smoke 20).
    #[arg(long)]
    idle_connections: Option<usize>,
    /// Pods enrolled at once (default: 100, smoke 5).
    #[arg(long)]
    enroll_pods: Option<usize>,
    /// Worker threads of each agent (default 1: the two simulated nodes share this
    /// machine's cores; 0: the agent's own default, one per CPU).
    #[arg(long)]
    agent_threads: Option<usize>,
    /// Run the agents with `--sockmap`: the kernel moves the bytes of the loopback legs,
    /// and of same-node connections past the agent (ADR 006, 016), instead of TCP over
    /// loopback and splice(2).
    #[arg(long)]
    sockmap: bool,
    /// Connections of every wrk run, keep-alive and churn (default 16): few connections
    /// is how most applications talk to one service, and batches less per wake-up.
    #[arg(long)]
    wrk_connections: Option<usize>,
    /// Run only these stages (repeatable; default: all): to A/B one change quickly.
    #[arg(long, value_enum)]
    only: Vec<Stage>,
    /// Storm only these paths (repeatable: nomesh, same, cross; default: all).
    #[arg(long)]
    storm_path: Vec<String>,
    /// Pods and services of the scale stage's cluster (default: 50,000 and 10,000; smoke
    /// 500 and 100).
    #[arg(long)]
    scale_pods: Option<usize>,
    #[arg(long)]
    scale_services: Option<usize>,
    #[command(subcommand)]
    pod: Option<PodCommand>,
}

/// What the benchmark runs inside a pod (through `mesh-pod exec`).
#[derive(Subcommand)]
enum PodCommand {
    /// Keep-alive HTTP/1.1 server answering every request with a fixed-size body.
    ServeHttp {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = HTTP_BODY_BYTES)]
        body_bytes: usize,
    },
    /// Open-loop keep-alive GETs at a fixed rate; prints one JSON report line.
    LoadRate {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[arg(long)]
        seconds: f64,
    },
    /// Opens COUNT connections (one GET each), prints READY, keeps them idle.
    HoldConns {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        seconds: u64,
    },
    /// A new connection (one GET, `Connection: close`) every 1/RATE s for SECONDS, with
    /// LIVE keep-alive connections held through it; prints one JSON report line.
    Storm {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        seconds: f64,
        /// How long each connection stays open between its two GETs.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        #[arg(long, default_value_t = 0)]
        live: usize,
    },
    /// One connection with one GET; prints the client socket's local address.
    CheckPath {
        #[arg(long)]
        to: SocketAddr,
    },
    /// Exchanges a few bytes with the echo server TO every INTERVAL; once an exchange went
    /// the other way, exits 0 at the first that is UNTIL: `denied` (it fails) or `allowed`.
    ProbePolicy {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, value_parser = ["denied", "allowed"])]
        until: String,
        #[arg(long, default_value_t = 1000)]
        interval_us: u64,
        #[arg(long, default_value_t = 60_000)]
        timeout_ms: u64,
    },
    /// Connects every INTERVAL until the connection is captured (local address on
    /// loopback); exits 0 then.
    ProbeCapture {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        interval_us: u64,
        #[arg(long, default_value_t = 60_000)]
        timeout_ms: u64,
    },
}

fn run_pod_command(command: PodCommand) -> Result<()> {
    match command {
        PodCommand::ServeHttp { port, body_bytes } => match bench::serve_http(port, body_bytes)? {},
        PodCommand::LoadRate {
            to,
            rate,
            connections,
            seconds,
        } => {
            let report = bench::rate_load(to, rate, connections, Duration::from_secs_f64(seconds))?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        PodCommand::HoldConns { to, count, seconds } => {
            bench::hold_connections(to, count, Duration::from_secs(seconds))
        }
        PodCommand::Storm {
            to,
            rate,
            seconds,
            hold_ms,
            live,
        } => {
            let report = bench::storm(
                to,
                rate,
                Duration::from_secs_f64(seconds),
                Duration::from_millis(hold_ms),
                live,
            )?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        PodCommand::CheckPath { to } => {
            println!("{}", bench::check_path(to)?);
            Ok(())
        }
        PodCommand::ProbePolicy {
            to,
            until,
            interval_us,
            timeout_ms,
        } => tests::scale::probe_policy(
            to,
            until == "denied",
            Duration::from_micros(interval_us),
            Duration::from_millis(timeout_ms),
        ),
        PodCommand::ProbeCapture {
            to,
            interval_us,
            timeout_ms,
        } => bench::probe_capture(
            to,
            Duration::from_micros(interval_us),
            Duration::from_millis(timeout_ms),
        ),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(command) = args.pod {
        return run_pod_command(command);
    }
    let mut plan = Plan::new(args.smoke);
    if let Some(reps) = args.reps {
        plan.reps = reps.max(1);
        plan.enroll_reps = reps.max(1);
    }
    if let Some(seconds) = args.seconds {
        plan.bulk_secs = seconds.max(1);
        plan.http_secs = seconds.max(1);
    }
    if let Some(n) = args.idle_connections {
        plan.idle_connections = n.max(1);
    }
    if let Some(n) = args.enroll_pods {
        plan.enroll_batch = n.max(1);
    }
    if let Some(n) = args.agent_threads {
        plan.agent_threads = n;
    }
    plan.sockmap = args.sockmap;
    if let Some(n) = args.wrk_connections {
        plan.wrk_connections = n.max(1);
        // wrk needs at least one connection per thread.
        plan.wrk_threads = plan.wrk_threads.min(plan.wrk_connections);
    }
    if let Some(n) = args.scale_pods {
        plan.scale.pods = n.max(1);
    }
    if let Some(n) = args.scale_services {
        plan.scale.services = n.max(1);
    }
    plan.storm_paths = args.storm_path.clone();
    let mut table = Table::new(&plan);
    println!("mesh-bench{}", if plan.smoke { " --smoke" } else { "" });
    machine_summary();

    let mut ran = vec![];
    let mut wanted = |stage| {
        let run = args.only.is_empty() || args.only.contains(&stage);
        if run {
            ran.push(stage);
        }
        run
    };
    if wanted(Stage::Micro) {
        micro_benchmarks(&plan, &mut table)?;
    }
    if wanted(Stage::Heap) {
        heap_benchmarks(&plan, &mut table)?;
    }
    let (traffic, enrollment, storm, waypoint, scale, dns) = (
        wanted(Stage::Traffic),
        wanted(Stage::Enrollment),
        wanted(Stage::Storm),
        wanted(Stage::Waypoint),
        wanted(Stage::Scale),
        wanted(Stage::Dns),
    );
    if (traffic || enrollment || storm || waypoint || scale || dns) && require_root() {
        bench::raise_nofile_limit();
        for tool in ["iperf3", "wrk", "ss", "nginx", "h2load"] {
            if !on_path(tool) {
                bail!("`{tool}` is not installed: run `cargo xtask setup` (as root)");
            }
        }
        let exe = std::env::current_exe().context("finding the mesh-bench executable")?;
        let started = Instant::now();
        // A stage that fails leaves its figures without numbers; the table is still
        // printed, and the missing figures make the run fail below.
        if traffic && let Err(e) = traffic_benchmarks(&plan, &mut table, &exe) {
            println!("\ntraffic benchmarks FAILED: {e:#}");
        }
        if enrollment && let Err(e) = enrollment_benchmarks(&plan, &mut table, &exe) {
            println!("\nenrollment benchmarks FAILED: {e:#}");
        }
        if storm && let Err(e) = storm_benchmarks(&plan, &mut table, &exe) {
            println!("\nstorm benchmarks FAILED: {e:#}");
        }
        if waypoint && let Err(e) = waypoint_benchmarks(&plan, &mut table, &exe) {
            println!("\nwaypoint benchmarks FAILED: {e:#}");
        }
        if scale && let Err(e) = scale_benchmarks(&plan, &mut table, &exe) {
            println!("\nscale benchmarks FAILED: {e:#}");
        }
        if dns && let Err(e) = dns_benchmarks(&plan, &mut table) {
            println!("\nDNS benchmarks FAILED: {e:#}");
        }
        println!(
            "\ncluster benchmarks took {:.0?}",
            Duration::from_secs(started.elapsed().as_secs())
        );
    } else {
        // Without root only the micro-benchmarks can run (under CI=true, require_root
        // fails instead).
        ran.retain(|s| matches!(s, Stage::Micro | Stage::Heap));
    }
    table.print(&ran);
    if plan.smoke {
        println!("(smoke run: figures are not meaningful)");
    }
    let missing = table.missing(&ran);
    if !missing.is_empty() {
        bail!(
            "{} figure(s) produced no number:\n  {}",
            missing.len(),
            missing.join("\n  ")
        );
    }
    Ok(())
}

/// Durations and counts of a full run, or of a smoke run.
struct Plan {
    smoke: bool,
    /// Repetitions of every interleaved case (the median is reported).
    reps: usize,
    bulk_secs: u64,
    http_secs: u64,
    /// wrk's load: threads and connections.
    wrk_threads: usize,
    wrk_connections: usize,
    /// The fixed-rate load: requests per second over this many connections.
    rate: f64,
    rate_connections: usize,
    /// Pause before each churn run, so the previous run's TIME_WAIT sockets drain.
    churn_pause: Duration,
    /// Warm-up runs (discarded) of every path before measuring.
    warmup: bool,
    /// Idle connections held open for the per-connection memory figure.
    idle_connections: usize,
    /// Restart the agents before each idle-connection measurement (fresh heaps).
    restart_for_memory: bool,
    /// Pods enrolled at once, and repetitions of the enrollment measurements.
    enroll_batch: usize,
    enroll_reps: usize,
    /// How long to let an agent settle before reading its idle RSS.
    settle: Duration,
    /// `mesh-agent run --worker-threads` (0: not given).
    agent_threads: usize,
    /// `mesh-agent run --sockmap`.
    sockmap: bool,
    /// Requests of each h2load run.
    h2_requests: usize,
    /// Storm rates (new connections per second), ascending, and seconds at each; a path
    /// stops at the first rate that loses a connection.
    storm_rates: Vec<f64>,
    storm_secs: Vec<f64>,
    /// Keep-alive connections held through each storm.
    storm_live: usize,
    /// How long each storm connection stays open.
    storm_hold: Duration,
    /// The paths stormed (empty: all).
    storm_paths: Vec<String>,
    /// How long the agents settle after a path's storms before their RSS is read.
    storm_settle: Duration,
    /// Churn at fixed rates (new connections per second, one GET each), every rate run
    /// for `churn_rate_secs` on every stormed path, failures counted.
    churn_rates: Vec<f64>,
    churn_rate_secs: f64,
    /// The scale stage's cluster.
    scale: tests::scale::Size,
    /// The DNS stage's load from one pod: queries per second, for this many seconds.
    dns_rate: u32,
    dns_secs: u64,
}

impl Plan {
    /// Whether the storm stage runs on the path `key` (`--storm-path`; all by default).
    fn storms(&self, key: &str) -> bool {
        self.storm_paths.is_empty() || self.storm_paths.iter().any(|p| p == key)
    }

    fn new(smoke: bool) -> Plan {
        if smoke {
            Plan {
                smoke,
                reps: 1,
                bulk_secs: 1,
                http_secs: 1,
                wrk_threads: 2,
                wrk_connections: 16,
                rate: 1000.0,
                rate_connections: 4,
                churn_pause: Duration::from_millis(200),
                warmup: false,
                idle_connections: 20,
                restart_for_memory: false,
                enroll_batch: 5,
                enroll_reps: 1,
                settle: Duration::from_millis(300),
                agent_threads: 1,
                sockmap: false,
                h2_requests: 2000,
                storm_rates: vec![200.0],
                storm_secs: vec![1.0],
                storm_live: 5,
                storm_hold: Duration::from_millis(200),
                storm_paths: vec![],
                storm_settle: Duration::from_millis(500),
                churn_rates: vec![200.0],
                churn_rate_secs: 1.0,
                scale: tests::scale::Size {
                    pods: 500,
                    services: 100,
                    nodes: 10,
                    namespaces: 10,
                    changes: 1,
                },
                dns_rate: 1000,
                dns_secs: 1,
            }
        } else {
            Plan {
                smoke,
                reps: 3,
                bulk_secs: 5,
                http_secs: 5,
                wrk_threads: 2,
                wrk_connections: 16,
                rate: 1000.0,
                rate_connections: 4,
                churn_pause: Duration::from_secs(3),
                warmup: true,
                idle_connections: 1000,
                restart_for_memory: true,
                enroll_batch: 100,
                enroll_reps: 3,
                settle: Duration::from_secs(2),
                agent_threads: 1,
                sockmap: false,
                h2_requests: 50_000,
                storm_rates: vec![1000.0, 2000.0, 3000.0],
                storm_secs: vec![30.0, 10.0, 10.0],
                storm_live: 100,
                storm_hold: Duration::from_secs(5),
                storm_paths: vec![],
                storm_settle: Duration::from_secs(10),
                churn_rates: vec![200.0, 500.0, 1000.0, 2000.0],
                churn_rate_secs: 30.0,
                dns_rate: 10_000,
                dns_secs: 10,
                scale: tests::scale::Size {
                    pods: 50_000,
                    services: 10_000,
                    nodes: 500,
                    namespaces: 100,
                    changes: 5,
                },
            }
        }
    }

    /// The agents' extra flags, as printed with the results.
    fn agent_flags_shown(&self) -> String {
        let threads = match self.agent_threads {
            0 => "default worker threads (one per CPU)".into(),
            n => format!("--worker-threads {n}"),
        };
        if self.sockmap {
            format!("{threads} --sockmap")
        } else {
            threads
        }
    }

    /// The agents' extra flags.
    fn agent_flags(&self) -> Vec<String> {
        let mut flags = vec![];
        if self.agent_threads != 0 {
            flags.extend(["--worker-threads".into(), self.agent_threads.to_string()]);
        }
        if self.sockmap {
            flags.push("--sockmap".into());
        }
        flags
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// nproc, memory, kernel and commit, for the record.
fn machine_summary() {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / (1024.0 * 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let mut commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    if git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()) {
        commit.push_str(" with uncommitted changes");
    }
    println!(
        "machine: {cpus} CPUs, {mem_gib:.1} GiB, kernel {}, commit {commit}",
        kernel.trim()
    );
}

// ---------------------------------------------------------------------------------
// The table of results.

/// What a figure should reach (issue 6's targets), judged on the medians.
#[derive(Clone, Copy)]
enum Target {
    /// value / baseline >= x
    RatioAtLeast(f64),
    /// value <= x
    AtMost(f64),
    /// value >= x
    AtLeast(f64),
    /// value / baseline <= x
    RatioAtMost(f64),
    /// value - baseline <= x
    AddedAtMost(f64),
}

enum Baseline {
    None,
    /// The median of another row.
    Row(String),
    /// A number measured alongside (the micro-benchmark's handshake).
    Value(f64),
}

struct Row {
    key: String,
    figure: String,
    unit: &'static str,
    decimals: usize,
    samples: Vec<f64>,
    baseline: Baseline,
    target: Option<Target>,
    errors: Vec<String>,
    /// The stage that measures it (the cluster's stages need root).
    stage: Stage,
}

/// The parts of a run, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Stage {
    /// In-process micro-benchmarks (no root needed).
    Micro,
    /// What the scale stage's cluster costs on the heap with the agent's own types and
    /// translation, counted in-process (no root needed): where the scale stage's RSS goes.
    Heap,
    /// Traffic on the two-node cluster: throughput, requests, churn, CPU, memory per
    /// connection.
    Traffic,
    /// Idle memory and enrollment time on the one-node cluster.
    Enrollment,
    /// Connection storms: new connections per second held with no failure.
    Storm,
    /// L7: the waypoint against the L4 mesh and against nginx as a reverse proxy.
    Waypoint,
    /// A node agent in Kubernetes mode against a large cluster: memory, first sync, and
    /// the time from a policy change to its enforcement.
    Scale,
    /// DNS from one enrolled pod at a fixed rate: mesh names answered by the agent, other
    /// names forwarded, and the test server asked directly.
    Dns,
}

struct Table {
    rows: Vec<Row>,
}

/// A figure measured on every path: key prefix, what, unit, decimals, and the targets
/// of the same-node and of the cross-node path.
type PathFigure = (
    &'static str,
    String,
    &'static str,
    usize,
    Option<Target>,
    Option<Target>,
);

/// The waypoint stage's paths, in the order every round runs them.
const L7_PATHS: [(&str, &str); 5] = [
    ("nomesh", "no mesh (cross-node)"),
    ("nginx", "nginx reverse proxy (cross-node)"),
    ("l4", "L4 mesh (HBONE, service address)"),
    ("waypoint", "L4 mesh + waypoint"),
    ("gateway", "ingress gateway (HBONE onwards)"),
];

/// The three paths, in the order every interleaved round runs them.
const PATHS: [(&str, &str); 3] = [
    ("nomesh", "no mesh (cross-node)"),
    ("same", "mesh same-node"),
    ("cross", "mesh cross-node (HBONE)"),
];

impl Table {
    /// Every figure, in the order printed, with its unit, baseline and target.
    fn new(plan: &Plan) -> Table {
        use Target::{AddedAtMost, AtLeast, AtMost, RatioAtLeast, RatioAtMost};
        let mut t = Table { rows: Vec::new() };
        let authz = t.row(
            "authz",
            "authorize 1 conn, 1,000 policies (base: mTLS handshake)",
            "µs",
            2,
        );
        authz.stage = Stage::Micro;
        let rate = plan.rate;
        let conns = plan.wrk_connections;
        #[rustfmt::skip]
        let per_path: [PathFigure; 16] = [
            ("bulk1", "bulk 1 stream".into(), "Gbit/s", 2, Some(RatioAtLeast(0.8)), Some(RatioAtLeast(0.5))),
            ("bulk4", "bulk 4 streams".into(), "Gbit/s", 2, Some(RatioAtLeast(0.8)), Some(RatioAtLeast(0.5))),
            ("ka-rps", format!("keep-alive {conns} conns: requests/s"), "req/s", 0, None, Some(RatioAtLeast(0.5))),
            ("ka-p50", "keep-alive: p50".into(), "µs", 0, Some(AddedAtMost(30.0)), None),
            ("ka-p90", "keep-alive: p90".into(), "µs", 0, None, None),
            ("ka-p99", "keep-alive: p99".into(), "µs", 0, None, None),
            ("rate-p50", format!("fixed {rate:.0} req/s: p50"), "µs", 0, Some(AddedAtMost(30.0)), None),
            ("rate-p90", format!("fixed {rate:.0} req/s: p90"), "µs", 0, None, None),
            ("rate-p99", format!("fixed {rate:.0} req/s: p99"), "µs", 0, None, None),
            ("churn-rps", "churn (conn per request): requests/s".into(), "req/s", 0, None, Some(RatioAtLeast(0.35))),
            ("churn-p50", "churn: p50".into(), "µs", 0, None, None),
            ("churn-p99", "churn: p99".into(), "µs", 0, None, None),
            ("machine-gb1", "machine CPU per GB, bulk 1 stream".into(), "CPU s", 2, None, None),
            ("machine-gb4", "machine CPU per GB, bulk 4 streams".into(), "CPU s", 2, None, None),
            ("machine-ka", "machine CPU per 10k keep-alive requests".into(), "CPU ms", 1, None, None),
            ("machine-churn", "machine CPU per 10k connections (churn)".into(), "CPU ms", 1, None, None),
        ];
        for (prefix, what, unit, decimals, same, cross) in per_path {
            for (key, label) in PATHS {
                let row = t.row(
                    &format!("{prefix}/{key}"),
                    &format!("{what}, {label}"),
                    unit,
                    decimals,
                );
                if key != "nomesh" {
                    row.baseline = Baseline::Row(format!("{prefix}/nomesh"));
                }
                row.target = match key {
                    "same" => same,
                    "cross" => cross,
                    _ => None,
                };
            }
        }
        #[rustfmt::skip]
        let per_mesh_path: [(&str, &str, &'static str, usize); 3] = [
            ("cpu-gb", "agent CPU per GB", "CPU s", 2),
            ("cpu-ka", "agent CPU per 10k keep-alive requests", "CPU ms", 1),
            ("cpu-churn", "agent CPU per 10k connections (churn)", "CPU ms", 1),
        ];
        for (prefix, what, unit, decimals) in per_mesh_path {
            for (key, label) in &PATHS[1..] {
                t.row(
                    &format!("{prefix}/{key}"),
                    &format!("{what}, {label}"),
                    unit,
                    decimals,
                );
            }
        }
        let n = plan.idle_connections;
        let batch = plan.enroll_batch;
        #[rustfmt::skip]
        let single: [(&str, String, &'static str, usize, Option<Target>); 16] = [
            ("conn/same", format!("agent RSS per idle conn ({n} held), same-node"), "KiB", 2, Some(AtMost(8.0))),
            ("conn/cross-src", format!("agent RSS per idle conn ({n} held), cross: src agent"), "KiB", 2, Some(AtMost(8.0))),
            ("conn/cross-dst", format!("agent RSS per idle conn ({n} held), cross: dst agent"), "KiB", 2, Some(AtMost(8.0))),
            ("conn-fds/same", format!("agent descriptors per idle conn ({n} held), same-node"), "fds", 2, None),
            ("conn-fds/cross-src", format!("agent descriptors per idle conn ({n} held), cross: src agent"), "fds", 2, None),
            ("conn-fds/cross-dst", format!("agent descriptors per idle conn ({n} held), cross: dst agent"), "fds", 2, None),
            ("conn-rss-left/same", format!("agent RSS above before, after the {n} closed, same-node"), "MiB", 1, None),
            ("conn-rss-left/cross-src", format!("agent RSS above before, after the {n} closed, cross: src agent"), "MiB", 1, None),
            ("conn-rss-left/cross-dst", format!("agent RSS above before, after the {n} closed, cross: dst agent"), "MiB", 1, None),
            ("conn-fds-left/same", format!("agent descriptors above before, after the {n} closed, same-node"), "fds", 0, Some(AtMost(0.0))),
            ("conn-fds-left/cross-src", format!("agent descriptors above before, after the {n} closed, cross: src agent"), "fds", 0, None),
            ("conn-fds-left/cross-dst", format!("agent descriptors above before, after the {n} closed, cross: dst agent"), "fds", 0, None),
            ("rss-0", "agent RSS idle, 0 enrolled pods".into(), "MiB", 1, None),
            ("rss-batch", format!("agent RSS idle, {batch} enrolled pods"), "MiB", 1, Some(AtMost(20.0))),
            ("enroll-1", "enrollment of 1 pod: config written to captured".into(), "ms", 0, None),
            ("enroll-batch", format!("enrollment of {batch} pods at once"), "ms", 0, Some(AtMost(1000.0))),
        ];
        for (key, what, unit, decimals, target) in single {
            let row = t.row(key, &what, unit, decimals);
            row.target = target;
            if !key.starts_with("conn/") {
                row.stage = Stage::Enrollment;
            }
        }
        let first = plan.storm_rates[0];
        #[rustfmt::skip]
        let storm: [(&str, String, &'static str, usize, Option<Target>); 3] = [
            ("storm-held", format!("storm: new conns/s held, 0 failed, 0 live lost ({}s at {first:.0}/s first)", plan.storm_secs[0]), "conn/s", 0, Some(AtLeast(1000.0))),
            ("storm-p99", format!("storm {first:.0} conn/s: p99 connect to response"), "µs", 0, None),
            ("storm-cpu", format!("storm {first:.0} conn/s: agent CPU per 10k connections"), "CPU ms", 1, None),
        ];
        for (key, label) in &PATHS[1..] {
            let before = format!("storm-rss-before/{key}");
            let row = t.row(
                &before,
                &format!("storm: agent RSS before, {label}"),
                "MiB",
                1,
            );
            row.stage = Stage::Storm;
            let row = t.row(
                &format!("storm-rss-peak/{key}"),
                &format!("storm: agent RSS as the first storm ends, {label}"),
                "MiB",
                1,
            );
            row.stage = Stage::Storm;
            row.baseline = Baseline::Row(before.clone());
            let row = t.row(
                &format!("storm-rss-after/{key}"),
                &format!("storm: agent RSS settled after the storms, {label}"),
                "MiB",
                1,
            );
            row.stage = Stage::Storm;
            row.baseline = Baseline::Row(before);
            if !plan.smoke {
                row.target = Some(RatioAtMost(1.5));
            }
        }
        // The DNS stage: what one pod's queries cost through the agent, against the server.
        let (dns_rate, dns_secs) = (plan.dns_rate, plan.dns_secs);
        for (case, label) in DNS_CASES {
            for (figure, what, unit) in [
                ("p50", "answer time p50", "µs"),
                ("p99", "answer time p99", "µs"),
                ("lost", "queries unanswered", "queries"),
            ] {
                let key = format!("dns-{figure}/{case}");
                let row = t.row(
                    &key,
                    &format!("DNS {dns_rate}/s for {dns_secs} s, {label}: {what}"),
                    unit,
                    0,
                );
                row.stage = Stage::Dns;
                match (case, figure) {
                    ("mesh", "p99") if !plan.smoke => row.target = Some(AtMost(1000.0)),
                    ("mesh", "lost") => row.target = Some(AtMost(0.0)),
                    // No loss beyond the server's own.
                    ("forward", "lost") => {
                        row.baseline = Baseline::Row("dns-lost/direct".into());
                        row.target = Some(AddedAtMost(0.0));
                    }
                    _ => {}
                }
            }
        }
        // The waypoint stage: five paths, each figure against the path it is meant to beat.
        #[rustfmt::skip]
        let h2 = plan.h2_requests;
        let l7: [(&str, String, &'static str, usize); 7] = [
            (
                "l7-rps",
                format!("L7 keep-alive {conns} conns: requests/s"),
                "req/s",
                0,
            ),
            (
                "l7-h2-rps",
                format!("L7 HTTP/2 h2load {h2} requests: requests/s"),
                "req/s",
                0,
            ),
            (
                "l7-h2-mean",
                format!("L7 HTTP/2 h2load {h2} requests: mean"),
                "µs",
                0,
            ),
            (
                "l7-p50",
                format!("L7 keep-alive {conns} conns: p50"),
                "µs",
                0,
            ),
            (
                "l7-p99",
                format!("L7 keep-alive {conns} conns: p99"),
                "µs",
                0,
            ),
            (
                "l7-rate-p50",
                format!("L7 fixed {rate:.0} req/s: p50"),
                "µs",
                0,
            ),
            (
                "l7-rate-p99",
                format!("L7 fixed {rate:.0} req/s: p99"),
                "µs",
                0,
            ),
        ];
        for (prefix, what, unit, decimals) in l7 {
            for (key, label) in L7_PATHS {
                let row = t.row(
                    &format!("{prefix}/{key}"),
                    &format!("{what}, {label}"),
                    unit,
                    decimals,
                );
                row.stage = Stage::Waypoint;
                // The waypoint is judged against the L4 mesh it adds to, the ingress
                // gateway against the other reverse proxy a client outside the mesh
                // would use; the others against no mesh.
                row.baseline = match key {
                    "nomesh" => Baseline::None,
                    "waypoint" => Baseline::Row(format!("{prefix}/l4")),
                    "gateway" => Baseline::Row(format!("{prefix}/nginx")),
                    _ => Baseline::Row(format!("{prefix}/nomesh")),
                };
                if key == "waypoint" && !plan.smoke {
                    row.target = match prefix {
                        "l7-rate-p50" => Some(AddedAtMost(500.0)),
                        "l7-rate-p99" => Some(AddedAtMost(2000.0)),
                        _ => None,
                    };
                }
            }
        }
        #[rustfmt::skip]
        let proxies: [(&str, String, &'static str, usize); 4] = [
            ("l7-cpu", "proxy CPU per 1,000 keep-alive requests".into(), "CPU ms", 1),
            ("l7-h2-cpu", "proxy CPU per 1,000 HTTP/2 requests".into(), "CPU ms", 1),
            ("l7-cores", format!("proxy cores at {rate:.0} req/s"), "cores", 3),
            ("l7-rss", format!("proxy RSS at {rate:.0} req/s"), "MiB", 1),
        ];
        for (prefix, what, unit, decimals) in proxies {
            for (key, label) in [
                ("waypoint", "waypoint"),
                ("gateway", "ingress gateway"),
                ("nginx", "nginx"),
                ("l4", "both node agents (L4)"),
            ] {
                if prefix == "l7-rss" && key == "l4" {
                    continue;
                }
                let row = t.row(
                    &format!("{prefix}/{key}"),
                    &format!("{what}, {label}"),
                    unit,
                    decimals,
                );
                row.stage = Stage::Waypoint;
                if key == "gateway" {
                    row.baseline = Baseline::Row(format!("{prefix}/nginx"));
                }
                if key == "waypoint" {
                    row.baseline = Baseline::Row(format!("{prefix}/nginx"));
                    if !plan.smoke {
                        row.target = match prefix {
                            "l7-cpu" | "l7-h2-cpu" => Some(RatioAtMost(2.0)),
                            "l7-cores" => Some(AtMost(0.15 * rate / 1000.0)),
                            "l7-rss" => Some(AtMost(40.0)),
                            _ => None,
                        };
                    }
                }
            }
        }
        let row = t.row(
            "l7-cpu/resilient",
            "proxy CPU per 1,000 keep-alive requests, waypoint with a route's timeout, retries and 0 % fault",
            "CPU ms",
            1,
        );
        row.stage = Stage::Waypoint;
        row.baseline = Baseline::Row("l7-cpu/waypoint".into());
        if !plan.smoke {
            row.target = Some(RatioAtMost(1.05));
        }
        let (pods, services) = (plan.scale.pods, plan.scale.services);
        #[rustfmt::skip]
        let scale: [(&str, String, &'static str, usize, Option<Target>); 5] = [
            ("scale-rss-small", "agent RSS, Kubernetes mode, 2 pods in the cluster".into(), "MiB", 1, None),
            ("scale-rss", format!("agent RSS, {pods} pods + {services} services in the cluster"), "MiB", 1, Some(AtMost(200.0))),
            ("scale-rss-peak", "agent RSS at its highest: the initial lists and the policy changes".into(), "MiB", 1, None),
            ("scale-sync", format!("agent start to synced, {pods} pods + {services} services"), "ms", 0, None),
            ("scale-enforce", format!("policy change at the API server to enforced, {pods} pods"), "ms", 1, Some(AtMost(1000.0))),
        ];
        for (key, what, unit, decimals, target) in scale {
            let row = t.row(key, &what, unit, decimals);
            row.stage = Stage::Scale;
            if !plan.smoke {
                row.target = target;
            }
        }
        #[rustfmt::skip]
        let heap = [
            ("heap-objects", format!("heap: {pods} pods + {services} services as the sources keep them")),
            ("heap-state", "heap: the state translated from them".into()),
            ("heap-peak", "heap: most live during a translation, above the objects".into()),
        ];
        for (key, what) in heap {
            t.row(key, &what, "MiB", 1).stage = Stage::Heap;
        }
        t.churn_rate_rows(plan);
        for (prefix, what, unit, decimals, target) in storm {
            for (key, label) in PATHS {
                if prefix == "storm-cpu" && key == "nomesh" {
                    continue;
                }
                let row = t.row(
                    &format!("{prefix}/{key}"),
                    &format!("{what}, {label}"),
                    unit,
                    decimals,
                );
                row.stage = Stage::Storm;
                if key != "nomesh" {
                    row.baseline = Baseline::Row(format!("{prefix}/nomesh"));
                    if plan.smoke {
                        continue;
                    }
                    row.target = target;
                }
            }
        }
        // The storm stage's figures of the paths it does not run (`--storm-path`) are not
        // asked for: every one of them ends in its path's key.
        t.rows.retain(|r| {
            r.stage != Stage::Storm || r.key.rsplit('/').next().is_some_and(|k| plan.storms(k))
        });
        t
    }

    /// The figures of churn at fixed rates: per path the highest rate with no failure, and
    /// per rate the failures, p99 and the agents' CPU per connection.
    fn churn_rate_rows(&mut self, plan: &Plan) {
        use Target::AtLeast;
        let secs = plan.churn_rate_secs;
        for (key, label) in PATHS {
            let row = self.row(
                &format!("crate-held/{key}"),
                &format!(
                    "churn at fixed rates ({secs} s each): highest rate with 0 failed, {label}"
                ),
                "conn/s",
                0,
            );
            row.stage = Stage::Storm;
            if key == "cross" && !plan.smoke {
                row.target = Some(AtLeast(1000.0));
            }
        }
        for &rate in &plan.churn_rates {
            for (key, label) in PATHS {
                for (figure, what, unit, decimals) in [
                    ("failed", "connections failed", "conns", 0),
                    ("p50", "p50 connect to response", "µs", 0),
                    ("p99", "p99 connect to response", "µs", 0),
                    ("cpu", "agent CPU per 10k connections", "CPU ms", 1),
                ] {
                    if figure == "cpu" && key == "nomesh" {
                        continue;
                    }
                    let row = self.row(
                        &format!("crate-{figure}/{rate}/{key}"),
                        &format!("churn {rate:.0} conn/s: {what}, {label}"),
                        unit,
                        decimals,
                    );
                    row.stage = Stage::Storm;
                    if key != "nomesh" && figure.starts_with('p') {
                        row.baseline = Baseline::Row(format!("crate-{figure}/{rate}/nomesh"));
                    }
                }
            }
        }
    }

    /// Adds a traffic figure without baseline or target.
    fn row(&mut self, key: &str, figure: &str, unit: &'static str, decimals: usize) -> &mut Row {
        self.rows.push(Row {
            key: key.into(),
            figure: figure.into(),
            unit,
            decimals,
            samples: Vec::new(),
            baseline: Baseline::None,
            target: None,
            errors: Vec::new(),
            stage: Stage::Traffic,
        });
        self.rows.last_mut().expect("just pushed")
    }

    fn get(&mut self, key: &str) -> &mut Row {
        let i = self
            .rows
            .iter()
            .position(|r| r.key == key)
            .unwrap_or_else(|| panic!("mesh-bench: no table row {key}"));
        &mut self.rows[i]
    }

    fn add(&mut self, key: &str, value: f64) {
        self.get(key).samples.push(value);
    }

    fn fail(&mut self, key: &str, error: &anyhow::Error) {
        println!("    FAILED {key}: {error:#}");
        self.get(key).errors.push(format!("{error:#}"));
    }

    fn median(&self, key: &str) -> Option<f64> {
        let row = self.rows.iter().find(|r| r.key == key)?;
        Summary::of(&row.samples).map(|s| s.median)
    }

    fn print(&self, ran: &[Stage]) {
        println!(
            "\n{:<62} {:>7} {:>10} {:>10} {:>10} {:>10} {:>7}  target",
            "figure", "unit", "median", "min", "max", "baseline", "ratio"
        );
        for row in &self.rows {
            let Some(s) = Summary::of(&row.samples) else {
                if ran.contains(&row.stage) {
                    println!("{:<62} {:>7} {:>10}", row.figure, row.unit, "n/a");
                }
                continue;
            };
            let d = row.decimals;
            let baseline = match &row.baseline {
                Baseline::None => None,
                Baseline::Row(key) => self.median(key),
                Baseline::Value(v) => Some(*v),
            };
            let ratio = baseline.map(|b| s.median / b);
            let fmt = |v: Option<f64>, d: usize| v.map_or("-".to_string(), |v| format!("{v:.d$}"));
            let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
            let target = match (row.target, baseline, ratio) {
                (Some(Target::RatioAtLeast(x)), _, Some(r)) => {
                    format!(">= {x:.2}x: {}", verdict(r >= x))
                }
                (Some(Target::AtMost(x)), _, _) => {
                    format!("<= {x} {}: {}", row.unit, verdict(s.median <= x))
                }
                (Some(Target::AtLeast(x)), _, _) => {
                    format!(">= {x} {}: {}", row.unit, verdict(s.median >= x))
                }
                (Some(Target::RatioAtMost(x)), _, Some(r)) => {
                    format!("<= {x:.2}x: {}", verdict(r <= x))
                }
                (Some(Target::AddedAtMost(x)), Some(b), _) => format!(
                    "{:+.0} {} (<= +{x}): {}",
                    s.median - b,
                    row.unit,
                    verdict(s.median - b <= x)
                ),
                _ => String::new(),
            };
            println!(
                "{:<62} {:>7} {:>10} {:>10} {:>10} {:>10} {:>7}  {target}",
                row.figure,
                row.unit,
                format!("{:.d$}", s.median),
                format!("{:.d$}", s.min),
                format!("{:.d$}", s.max),
                fmt(baseline, d),
                fmt(ratio, 3),
            );
        }
    }

    /// Figures with no number, of the stages that ran.
    fn missing(&self, ran: &[Stage]) -> Vec<String> {
        self.rows
            .iter()
            .filter(|r| ran.contains(&r.stage) && Summary::of(&r.samples).is_none())
            .map(|r| {
                let why = r.errors.first().map_or("not measured", String::as_str);
                format!("{}: {why}", r.figure)
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------
// Micro-benchmark: authorization against the cost of a handshake.

/// Median of `rounds` measurements of `per_round` calls of `f`, per call.
fn median_per_call(rounds: usize, per_round: u32, mut f: impl FnMut()) -> Duration {
    let mut samples: Vec<Duration> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..per_round {
                f();
            }
            start.elapsed() / per_round
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2]
}

fn micro_benchmarks(plan: &Plan, table: &mut Table) -> Result<()> {
    let (rounds, evals, handshakes) = if plan.smoke {
        (3, 100, 3)
    } else {
        (9, 20_000, 50)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    // Baseline: one mutual-TLS 1.3 handshake as HBONE does it (P-256, client auth).
    let certs = SecretManager::new(FileCa::ephemeral(), Duration::from_secs(3600));
    let client: Identity = "spiffe://cluster.local/ns/client/sa/client".parse()?;
    let server: Identity = "spiffe://cluster.local/ns/bench/sa/bench".parse()?;
    rt.block_on(async {
        certs.acquire(&client).await?;
        certs.acquire(&server).await
    })?;
    let client_cfg = tls::client_config(&certs, &client, &server);
    let server_cfg = tls::server_config(&certs, &server);
    let handshake_time = median_per_call(rounds, handshakes, || {
        let (c, s) = rt.block_on(handshake(client_cfg.clone(), server_cfg.clone()));
        assert!(c.is_ok() && s.is_ok(), "benchmark handshake failed");
    });

    // Authorization of one connection against 1,000 policies in the destination's scope.
    let case = BenchCase::new("bench");
    let (policies, errors) = Policies::parse(&bench_policies(1000, "bench"), "istio-system");
    anyhow::ensure!(errors.is_empty(), "benchmark policies rejected: {errors:?}");
    let conn = Connection::new(case.src, case.dst, Some(&case.identity));
    let eval_time = median_per_call(rounds, evals, || {
        black_box(policies.evaluate(black_box(&case.workload), black_box(&conn)));
    });

    let row = table.get("authz");
    row.samples.push(eval_time.as_secs_f64() * 1e6);
    row.baseline = Baseline::Value(handshake_time.as_secs_f64() * 1e6);
    println!(
        "authorize 1 connection (1,000 policies): {eval_time:.2?}; mTLS handshake: {handshake_time:.2?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// Traffic: throughput, latency, churn, CPU and memory per connection.

const IPERF_PORT: u16 = 5201;
const HTTP_PORT: u16 = 8080;
const MESH_NS: &str = "mesh";
const PLAIN_NS: &str = "plain";

/// One of the three compared paths.
struct PathCase {
    key: &'static str,
    label: &'static str,
    client: Arc<Pod>,
    server: Arc<Pod>,
    /// Nodes whose agents carry this path's traffic.
    agents: Vec<usize>,
}

impl PathCase {
    fn churn_client(&self, cluster: &Cluster, rep: usize) -> Arc<Pod> {
        cluster.pod(&churn_pod(self.key, rep))
    }
}

fn churn_pod(key: &str, rep: usize) -> String {
    format!("churn-{key}-{rep}")
}

/// Sum of the user+system CPU seconds of the agents of `nodes`.
fn agents_cpu(cluster: &Cluster, nodes: &[usize]) -> Result<f64> {
    let mut total = 0.0;
    for &n in nodes {
        total += bench::cpu_seconds(agent_pid(cluster.node(n))?)?;
    }
    Ok(total)
}

/// Descriptors the agents of `nodes` hold.
fn agents_fds(cluster: &Cluster, nodes: &[usize]) -> Result<usize> {
    let mut total = 0;
    for &n in nodes {
        let pid = agent_pid(cluster.node(n))?;
        total += std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("listing /proc/{pid}/fd"))?
            .count();
    }
    Ok(total)
}

/// Resident memory of the agents of `nodes`, in MiB.
fn agents_rss_mib(cluster: &Cluster, nodes: &[usize]) -> Result<f64> {
    let mut kib = 0;
    for &n in nodes {
        kib += bench::rss_kib(agent_pid(cluster.node(n))?)?;
    }
    Ok(kib as f64 / 1024.0)
}

fn agent_pid(node: &Node) -> Result<u32> {
    let agent = node
        .agent()
        .with_context(|| format!("{}: no agent", node.name()))?;
    if let Some(status) = agent.try_wait() {
        // The run's directory goes with the cluster: what the agent said last goes here.
        let log = agent.log_text();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n    ");
        bail!(
            "{}: the agent exited ({status}); the end of its log {}:\n    {tail}",
            node.name(),
            agent.log_path().display()
        );
    }
    Ok(agent.pid())
}

fn exe_str(exe: &Path) -> Result<&str> {
    exe.to_str()
        .with_context(|| format!("{} is not UTF-8", exe.display()))
}

fn traffic_benchmarks(plan: &Plan, table: &mut Table, exe: &Path) -> Result<()> {
    println!("\n== traffic: 2 nodes; paths: no mesh, mesh same-node, mesh cross-node ==");
    println!("agents: {}", plan.agent_flags_shown());
    let started = Instant::now();
    let mut builder = Cluster::builder()
        .nodes(2)
        .ambient_namespace(MESH_NS)
        .namespace(PLAIN_NS, std::iter::empty::<(&str, &str)>())
        .pod(PodSpec::new("m-client", MESH_NS, 0).service_account("client"))
        .pod(PodSpec::new("m-local", MESH_NS, 0).service_account("server"))
        .pod(PodSpec::new("m-remote", MESH_NS, 1).service_account("server"))
        .pod(PodSpec::new("p-client", PLAIN_NS, 0).service_account("client"))
        .pod(PodSpec::new("p-server", PLAIN_NS, 1).service_account("server"));
    // A fresh client pod (namespace) for every churn run: no TIME_WAIT left by an
    // earlier run on the client's side or on the server's side of its 4-tuples.
    for rep in 0..plan.reps {
        for (key, _) in PATHS {
            let ns = if key == "nomesh" { PLAIN_NS } else { MESH_NS };
            builder =
                builder.pod(PodSpec::new(churn_pod(key, rep), ns, 0).service_account("client"));
        }
    }
    let cluster = builder.build().context("building the cluster")?;
    let paths = vec![
        PathCase {
            key: "nomesh",
            label: PATHS[0].1,
            client: cluster.pod("p-client"),
            server: cluster.pod("p-server"),
            agents: vec![0, 1],
        },
        PathCase {
            key: "same",
            label: PATHS[1].1,
            client: cluster.pod("m-client"),
            server: cluster.pod("m-local"),
            agents: vec![0],
        },
        PathCase {
            key: "cross",
            label: PATHS[2].1,
            client: cluster.pod("m-client"),
            server: cluster.pod("m-remote"),
            agents: vec![0, 1],
        },
    ];
    // Clients: the widest ephemeral port range (churn opens tens of thousands).
    for pod in cluster.pods() {
        if pod.name().contains("client") || pod.name().starts_with("churn-") {
            widen_port_range(&pod)?;
        }
    }
    let exe_s = exe_str(exe)?;
    let port = HTTP_PORT.to_string();
    let iperf_port = IPERF_PORT.to_string();
    for name in ["m-local", "m-remote", "p-server"] {
        let pod = cluster.pod(name);
        let http = pod.spawn(&[exe_s, "serve-http", "--port", &port])?;
        http.wait_for_line("READY", Duration::from_secs(10))?;
        pod.spawn(&["iperf3", "-s", "-p", &iperf_port])?;
        wait_listening(&pod, IPERF_PORT, Duration::from_secs(10))?;
    }
    let config = cluster.config_path();
    cluster.write_config(&config, &ConfigOptions::default())?;
    start_agents(plan, cluster.nodes(), &config)?;
    println!(
        "cluster {} with {} pods and 2 agents ready in {:.1?}",
        cluster.prefix(),
        cluster.pods().len(),
        started.elapsed()
    );
    for path in &paths {
        check_path(exe_s, path)?;
    }

    if plan.warmup {
        println!("warm-up (discarded): iperf3 1 s and wrk 1 s per path");
        for path in &paths {
            let _ = iperf3(path, 1, 1);
            let _ = wrk(plan, &path.client, &path.server, 1, false, &cluster);
        }
    }

    bulk(plan, table, &cluster, &paths);
    keep_alive(plan, table, &cluster, &paths);
    fixed_rate(plan, table, &paths, exe_s);
    // Before the churn: its TIME_WAIT sockets hold the client pod's ports to the server for
    // a minute, and thousands of held connections need ports from the same range.
    idle_connections(plan, table, &cluster, &paths, exe_s, &config);
    churn(plan, table, &cluster, &paths);
    cluster
        .teardown()
        .context("tearing the traffic cluster down")
}

// ---------------------------------------------------------------------------------
// The waypoint (L7) against the L4 mesh and against nginx.

const L7_NS: &str = "l7";
const L7_PLAIN_NS: &str = "l7-plain";
const NGINX_PORT: u16 = 8081;
/// nginx's HTTP/2 (prior knowledge) listener, proxying to the same HTTP/1.1 upstream.
const NGINX_H2_PORT: u16 = 8082;
const L4_VIP: &str = "10.96.40.10";
const WAYPOINT_VIP: &str = "10.96.40.11";
/// The same server through the waypoint, with a route that carries a timeout, a retry
/// policy and a 0 % fault: what the resilience layers cost when they do nothing.
const RESILIENT_VIP: &str = "10.96.40.12";
/// The ingress gateway's HTTP listener.
const GATEWAY_PORT: u16 = 8090;

/// One L7 path: who sends, where to, and which processes carry it (for their CPU).
struct L7Path {
    key: &'static str,
    label: &'static str,
    client: Arc<Pod>,
    target: SocketAddr,
    /// Where HTTP/2 with prior knowledge goes (nginx has a listener of its own for it).
    h2_target: SocketAddr,
}

/// Sum of the CPU seconds of `pid` and all its descendants (nginx's workers).
fn tree_cpu_seconds(pid: u32) -> Result<f64> {
    let mut total = bench::cpu_seconds(pid)?;
    for child in children(pid) {
        total += tree_cpu_seconds(child).unwrap_or(0.0);
    }
    Ok(total)
}

/// Sum of the RSS of `pid` and its descendants, in KiB.
fn tree_rss_kib(pid: u32) -> Result<u64> {
    let mut total = bench::rss_kib(pid)?;
    for child in children(pid) {
        total += tree_rss_kib(child).unwrap_or(0);
    }
    Ok(total)
}

fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn nginx_conf(dir: &Path, upstream: SocketAddr) -> String {
    // One worker, as the waypoint runs one thread: the two cores are shared by everything.
    // Both proxies write an access-log line per request, buffered, as the waypoint does by
    // default.
    format!(
        "worker_processes 1;\nerror_log {dir}/nginx-error.log;\npid {dir}/nginx.pid;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log {dir}/access.log combined buffer=64k flush=1s;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
         \x20 fastcgi_temp_path {dir}/fastcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
         \x20 upstream backend {{ server {upstream}; keepalive 64; }}\n\
         \x20 keepalive_requests 1000000;\n  keepalive_timeout 300s;\n\
         \x20 server {{\n    listen {NGINX_PORT};\n    listen {NGINX_H2_PORT} http2;\n    location / {{\n      proxy_pass http://backend;\n\
         \x20     proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
        dir = dir.display()
    )
}

fn waypoint_benchmarks(plan: &Plan, table: &mut Table, exe: &Path) -> Result<()> {
    println!(
        "\n== waypoint: 2 nodes; paths: no mesh, nginx reverse proxy, L4 mesh, L4 mesh + waypoint, ingress gateway =="
    );
    let started = Instant::now();
    let cluster = Cluster::builder()
        .nodes(2)
        .ambient_namespace(L7_NS)
        .namespace(L7_PLAIN_NS, std::iter::empty::<(&str, &str)>())
        .pod(PodSpec::new("l7-client", L7_NS, 0).service_account("client"))
        .pod(
            PodSpec::new("l7-server", L7_NS, 1)
                .label("app", "server")
                .service_account("server"),
        )
        .pod(
            PodSpec::new("l7-waypoint", L7_NS, 0)
                .label("gateway.networking.k8s.io/gateway-name", "waypoint")
                .label("istio.io/dataplane-mode", "none")
                .service_account("waypoint"),
        )
        .pod(
            PodSpec::new("l7-gateway", L7_PLAIN_NS, 0)
                .label("istio", "ingressgateway")
                .label("istio.io/dataplane-mode", "none")
                .service_account("gateway"),
        )
        .pod(PodSpec::new("n-client", L7_PLAIN_NS, 0))
        .pod(PodSpec::new("n-proxy", L7_PLAIN_NS, 0))
        .pod(PodSpec::new("n-server", L7_PLAIN_NS, 1))
        .build()
        .context("building the cluster")?;
    let exe_s = exe_str(exe)?;
    let port = HTTP_PORT.to_string();
    for name in ["l7-server", "n-server"] {
        let http = cluster
            .pod(name)
            .spawn(&[exe_s, "serve-http", "--port", &port])?;
        http.wait_for_line("READY", Duration::from_secs(10))?;
    }
    let service = |name: &str, vip: &str, bound: bool| {
        let labels = if bound {
            "  labels: {istio.io/use-waypoint: waypoint}\n"
        } else {
            ""
        };
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {L7_NS}\n{labels}spec:\n  clusterIP: {vip}\n  selector: {{app: server}}\n  ports: [{{name: http, port: 80, targetPort: {HTTP_PORT}}}]\n"
        )
    };
    let opts = ConfigOptions::default()
        .document(format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: waypoint, namespace: {L7_NS}}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n"
        ))
        .document(service("server", L4_VIP, false))
        .document(service("server-wp", WAYPOINT_VIP, true))
        .document(service("server-rs", RESILIENT_VIP, true))
        .document(format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: server-rs, namespace: {L7_NS}}}\nspec:\n  hosts: [server-rs]\n  http:\n  - route: [{{destination: {{host: server-rs}}}}]\n    timeout: 10s\n    retries: {{attempts: 2, perTryTimeout: 5s, retryOn: 5xx}}\n    fault: {{delay: {{fixedDelay: 1s, percentage: {{value: 0}}}}}}\n"
        ))
        // The ingress gateway: an Istio Gateway selecting its pod, and a VirtualService
        // sending everything it takes to the server's service (not through a waypoint).
        .document(format!(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: bench, namespace: {L7_PLAIN_NS}}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers: [{{port: {{number: {GATEWAY_PORT}, name: http, protocol: HTTP}}, hosts: [\"*\"]}}]\n"
        ))
        .document(format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: bench, namespace: {L7_PLAIN_NS}}}\nspec:\n  hosts: [\"*\"]\n  gateways: [bench]\n  http: [{{route: [{{destination: {{host: server.{L7_NS}.svc.cluster.local, port: {{number: 80}}}}}}]}}]\n"
        ));
    let config = cluster.config_path();
    cluster.write_config(&config, &opts)?;
    start_agents(plan, cluster.nodes(), &config)?;
    let mut extra = vec![];
    let threads = (plan.agent_threads > 0).then(|| plan.agent_threads.to_string());
    if let Some(t) = &threads {
        extra.extend(["--worker-threads", t.as_str()]);
    }
    let waypoint = cluster
        .pod("l7-waypoint")
        .spawn_waypoint("waypoint", L7_NS, &config, &extra)?;
    let gateway =
        cluster
            .pod("l7-gateway")
            .spawn_gateway("ingress", L7_PLAIN_NS, &config, &extra)?;
    wait_listening(
        &cluster.pod("l7-gateway"),
        GATEWAY_PORT,
        Duration::from_secs(10),
    )?;
    let nginx_dir = cluster.workdir().join("nginx");
    std::fs::create_dir_all(&nginx_dir)?;
    let upstream = cluster.pod("n-server").addr_v4(HTTP_PORT);
    let conf = nginx_dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(&nginx_dir, upstream))?;
    let conf_s = conf.display().to_string();
    let nginx = cluster
        .pod("n-proxy")
        .spawn(&["nginx", "-c", &conf_s, "-g", "daemon off;"])?;
    wait_listening(&cluster.pod("n-proxy"), NGINX_PORT, Duration::from_secs(10))?;
    println!(
        "cluster {} with the waypoint, the ingress gateway and nginx ready in {:.1?}",
        cluster.prefix(),
        started.elapsed()
    );
    let paths = [
        L7Path {
            key: "nomesh",
            label: L7_PATHS[0].1,
            client: cluster.pod("n-client"),
            target: upstream,
            h2_target: upstream,
        },
        L7Path {
            key: "nginx",
            label: L7_PATHS[1].1,
            client: cluster.pod("n-client"),
            target: cluster.pod("n-proxy").addr_v4(NGINX_PORT),
            h2_target: cluster.pod("n-proxy").addr_v4(NGINX_H2_PORT),
        },
        L7Path {
            key: "l4",
            label: L7_PATHS[2].1,
            client: cluster.pod("l7-client"),
            target: SocketAddr::new(L4_VIP.parse()?, 80),
            h2_target: SocketAddr::new(L4_VIP.parse()?, 80),
        },
        L7Path {
            key: "waypoint",
            label: L7_PATHS[3].1,
            client: cluster.pod("l7-client"),
            target: SocketAddr::new(WAYPOINT_VIP.parse()?, 80),
            h2_target: SocketAddr::new(WAYPOINT_VIP.parse()?, 80),
        },
        L7Path {
            key: "gateway",
            label: L7_PATHS[4].1,
            client: cluster.pod("n-client"),
            target: cluster.pod("l7-gateway").addr_v4(GATEWAY_PORT),
            h2_target: cluster.pod("l7-gateway").addr_v4(GATEWAY_PORT),
        },
    ];
    // The processes whose CPU a path costs (the ingress gateway's own only: the server's
    // node agent that ends its tunnel is counted on the L4 path).
    let proxy_cpu = |key: &str| -> Result<f64> {
        match key {
            "waypoint" => bench::cpu_seconds(waypoint.pid()),
            "gateway" => bench::cpu_seconds(gateway.pid()),
            "nginx" => tree_cpu_seconds(nginx.pid()),
            _ => agents_cpu(&cluster, &[0, 1]),
        }
    };
    if plan.warmup {
        for path in &paths {
            let url = format!("http://{}/", path.target);
            let _ = wrk_url(plan, &path.client, &url, 1, false, &cluster);
        }
    }
    println!(
        "\n-- L7 keep-alive: wrk -t{} -c{} {} s, {} round(s) --",
        plan.wrk_threads, plan.wrk_connections, plan.http_secs, plan.reps
    );
    for rep in 0..plan.reps {
        for path in &paths {
            let url = format!("http://{}/", path.target);
            let run = || -> Result<(bench::WrkResult, f64)> {
                let before = proxy_cpu(path.key)?;
                let r = wrk_url(plan, &path.client, &url, plan.http_secs, false, &cluster)?;
                Ok((r, proxy_cpu(path.key)? - before))
            };
            match run() {
                Ok((r, cpu)) => {
                    let rps = r.requests_per_second();
                    println!(
                        "  round {} {:<36} {rps:8.0} req/s  p50 {:6.0} p99 {:6.0} µs  errors {}  proxy {cpu:.2} CPU s",
                        rep + 1,
                        path.label,
                        r.p50_us,
                        r.p99_us,
                        r.errors + r.timeouts
                    );
                    let k = path.key;
                    table.add(&format!("l7-rps/{k}"), rps);
                    table.add(&format!("l7-p50/{k}"), r.p50_us);
                    table.add(&format!("l7-p99/{k}"), r.p99_us);
                    if k != "nomesh" {
                        table.add(&format!("l7-cpu/{k}"), cpu * 1e3 / r.requests * 1e3);
                    }
                }
                Err(e) => {
                    for figure in ["l7-rps", "l7-p50", "l7-p99"] {
                        table.fail(&format!("{figure}/{}", path.key), &e);
                    }
                }
            }
        }
        // The waypoint again, through a route with a timeout, retries and a 0 % fault.
        let url = format!("http://{RESILIENT_VIP}/");
        let client = cluster.pod("l7-client");
        let run = || -> Result<(bench::WrkResult, f64)> {
            let before = bench::cpu_seconds(waypoint.pid())?;
            let r = wrk_url(plan, &client, &url, plan.http_secs, false, &cluster)?;
            Ok((r, bench::cpu_seconds(waypoint.pid())? - before))
        };
        match run() {
            Ok((r, cpu)) => {
                println!(
                    "  round {} {:<36} {:8.0} req/s  p50 {:6.0} p99 {:6.0} µs  errors {}  proxy {cpu:.2} CPU s",
                    rep + 1,
                    "waypoint, route with resilience",
                    r.requests_per_second(),
                    r.p50_us,
                    r.p99_us,
                    r.errors + r.timeouts
                );
                table.add("l7-cpu/resilient", cpu * 1e3 / r.requests * 1e3);
            }
            Err(e) => table.fail("l7-cpu/resilient", &e),
        }
    }
    println!(
        "\n-- L7 fixed rate: {:.0} req/s over {} keep-alive connections, {} s, {} round(s) --",
        plan.rate, plan.rate_connections, plan.http_secs, plan.reps
    );
    for rep in 0..plan.reps {
        for path in &paths {
            let run = || -> Result<(RateReport, f64, f64)> {
                let before = proxy_cpu(path.key)?;
                let t0 = Instant::now();
                let report = load_rate(plan, exe_s, &path.client, path.target)?;
                let elapsed = t0.elapsed().as_secs_f64();
                let cores = (proxy_cpu(path.key)? - before) / elapsed;
                let rss = match path.key {
                    "waypoint" => bench::rss_kib(waypoint.pid())? as f64 / 1024.0,
                    "gateway" => bench::rss_kib(gateway.pid())? as f64 / 1024.0,
                    "nginx" => tree_rss_kib(nginx.pid())? as f64 / 1024.0,
                    _ => 0.0,
                };
                Ok((report, cores, rss))
            };
            match run() {
                Ok((r, cores, rss)) => {
                    println!(
                        "  round {} {:<36} {:6.0} req/s  p50 {:6.0} p99 {:6.0} µs  errors {}  proxy {cores:.3} cores",
                        rep + 1,
                        path.label,
                        r.achieved,
                        r.p50_us,
                        r.p99_us,
                        r.errors
                    );
                    let k = path.key;
                    table.add(&format!("l7-rate-p50/{k}"), r.p50_us);
                    table.add(&format!("l7-rate-p99/{k}"), r.p99_us);
                    if k != "nomesh" {
                        table.add(&format!("l7-cores/{k}"), cores);
                    }
                    if k != "nomesh" && k != "l4" {
                        table.add(&format!("l7-rss/{k}"), rss);
                    }
                }
                Err(e) => {
                    for figure in ["l7-rate-p50", "l7-rate-p99"] {
                        table.fail(&format!("{figure}/{}", path.key), &e);
                    }
                }
            }
        }
    }
    h2_load(plan, table, &paths, &proxy_cpu);
    cluster
        .teardown()
        .context("tearing the waypoint cluster down")
}

/// HTTP/2 (prior knowledge) load with h2load on every L7 path: requests/s, mean time per
/// request, and the proxy's CPU per 1,000 requests.
fn h2_load(
    plan: &Plan,
    table: &mut Table,
    paths: &[L7Path],
    proxy_cpu: &dyn Fn(&str) -> Result<f64>,
) {
    let (requests, clients, streams) = (plan.h2_requests, 4, 10);
    println!(
        "\n-- L7 HTTP/2: h2load -n {requests} -c {clients} -m {streams}, {} round(s) --",
        plan.reps
    );
    for rep in 0..plan.reps {
        for path in paths {
            let run = || -> Result<(bench::H2loadResult, f64)> {
                let before = proxy_cpu(path.key)?;
                let url = format!("http://{}/", path.h2_target);
                let out = path.client.exec(&[
                    "h2load",
                    "-n",
                    &requests.to_string(),
                    "-c",
                    &clients.to_string(),
                    "-m",
                    &streams.to_string(),
                    &url,
                ])?;
                let r = bench::parse_h2load(&out)?;
                if r.succeeded == 0.0 || r.failed > 0.0 {
                    bail!(
                        "h2load: {} succeeded, {} failed:\n{out}",
                        r.succeeded,
                        r.failed
                    );
                }
                Ok((r, proxy_cpu(path.key)? - before))
            };
            match run() {
                Ok((r, cpu)) => {
                    println!(
                        "  round {} {:<36} {:8.0} req/s  mean {:6.0} µs  proxy {cpu:.2} CPU s",
                        rep + 1,
                        path.label,
                        r.requests_per_second,
                        r.mean_us
                    );
                    let k = path.key;
                    table.add(&format!("l7-h2-rps/{k}"), r.requests_per_second);
                    table.add(&format!("l7-h2-mean/{k}"), r.mean_us);
                    if k != "nomesh" {
                        table.add(&format!("l7-h2-cpu/{k}"), cpu * 1e3 / r.succeeded * 1e3);
                    }
                }
                Err(e) => {
                    for figure in ["l7-h2-rps", "l7-h2-mean"] {
                        table.fail(&format!("{figure}/{}", path.key), &e);
                    }
                }
            }
        }
    }
}

fn widen_port_range(pod: &Pod) -> Result<()> {
    tests::in_netns(pod.netns_path(), || {
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535")
    })?
    .with_context(|| format!("{}: widening ip_local_port_range", pod.name()))
}

/// Polls a process's log (its stdout) for `needle`; fails if it exits first.
/// Waits until something listens on TCP `port` in the pod (`ss`).
fn wait_listening(pod: &Pod, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let filter = format!("sport = :{port}");
    loop {
        if !pod.exec(&["ss", "-Hltn", &filter])?.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{}: nothing listens on {port} after {timeout:?}",
                pod.name()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks the path is what it claims: captured (loopback local address) for the mesh,
/// straight from the pod's address without.
fn check_path(exe: &str, path: &PathCase) -> Result<()> {
    let to = path.server.addr_v4(HTTP_PORT).to_string();
    let out = path.client.exec(&[exe, "check-path", "--to", &to])?;
    let local: SocketAddr = out
        .trim()
        .parse()
        .with_context(|| format!("check-path printed {out:?}"))?;
    let captured = local.ip().is_loopback();
    let mesh = path.key != "nomesh";
    if captured != mesh {
        bail!(
            "{}: {} -> {to} went from {local}: {} the mesh, expected {}",
            path.label,
            path.client.name(),
            if captured { "through" } else { "around" },
            if mesh { "through" } else { "around" }
        );
    }
    println!(
        "path {:<26} {} -> {to}: {}",
        path.label,
        path.client.name(),
        if captured {
            "captured by the agent"
        } else {
            "direct"
        }
    );
    Ok(())
}

/// The CPU seconds a measured run used.
struct CpuUsed {
    /// The path's agents'.
    agents: f64,
    /// The whole machine's: the applications, the agents and the kernel's work for both.
    machine: f64,
}

/// One measured run: its result and the CPU seconds used meanwhile.
fn with_cpu<T>(
    cluster: &Cluster,
    path: &PathCase,
    run: impl FnOnce() -> Result<T>,
) -> Result<(T, CpuUsed)> {
    let agents = agents_cpu(cluster, &path.agents)?;
    let machine = bench::machine_busy_seconds()?;
    let result = run()?;
    let used = CpuUsed {
        agents: agents_cpu(cluster, &path.agents)? - agents,
        machine: bench::machine_busy_seconds()? - machine,
    };
    Ok((result, used))
}

fn iperf3(path: &PathCase, secs: u64, streams: usize) -> Result<bench::IperfResult> {
    let to = path.server.ipv4().to_string();
    let (port, secs, streams) = (
        IPERF_PORT.to_string(),
        secs.to_string(),
        streams.to_string(),
    );
    let args = [
        "iperf3",
        "-c",
        &to,
        "-p",
        &port,
        "-t",
        &secs,
        "-P",
        &streams,
        "-J",
        "--connect-timeout",
        "5000",
    ];
    // The server takes one test at a time; one retry covers the end of the last one.
    let out = match path.client.exec(&args) {
        Ok(out) => out,
        Err(_) => {
            std::thread::sleep(Duration::from_secs(1));
            path.client.exec(&args)?
        }
    };
    bench::parse_iperf3(&out)
}

fn bulk(plan: &Plan, table: &mut Table, cluster: &Cluster, paths: &[PathCase]) {
    println!(
        "\n-- bulk throughput: iperf3 {} s, 1 and 4 streams, {} round(s) --",
        plan.bulk_secs, plan.reps
    );
    for rep in 0..plan.reps {
        for streams in [1, 4] {
            for path in paths {
                let key = format!("bulk{streams}/{}", path.key);
                match with_cpu(cluster, path, || iperf3(path, plan.bulk_secs, streams)) {
                    Ok((r, cpu)) => {
                        let gbit = r.bits_per_second / 1e9;
                        let gb = r.bytes as f64 / 1e9;
                        println!(
                            "  round {} {streams} stream(s) {:<26} {gbit:7.2} Gbit/s  {gb:6.2} GB  agents {:.2}, machine {:.2} CPU s",
                            rep + 1,
                            path.label,
                            cpu.agents,
                            cpu.machine
                        );
                        table.add(&key, gbit);
                        if gb > 0.0 {
                            if path.key != "nomesh" {
                                table.add(&format!("cpu-gb/{}", path.key), cpu.agents / gb);
                            }
                            table.add(
                                &format!("machine-gb{streams}/{}", path.key),
                                cpu.machine / gb,
                            );
                        }
                    }
                    Err(e) => table.fail(&key, &e),
                }
            }
        }
    }
}

fn wrk(
    plan: &Plan,
    client: &Pod,
    server: &Pod,
    secs: u64,
    close: bool,
    cluster: &Cluster,
) -> Result<bench::WrkResult> {
    let url = format!("http://{}/", server.addr_v4(HTTP_PORT));
    wrk_url(plan, client, &url, secs, close, cluster)
}

/// wrk from `client` against `url`.
fn wrk_url(
    plan: &Plan,
    client: &Pod,
    url: &str,
    secs: u64,
    close: bool,
    cluster: &Cluster,
) -> Result<bench::WrkResult> {
    let script = cluster.workdir().join("mesh-bench.lua");
    if !script.exists() {
        std::fs::write(&script, WRK_SCRIPT)
            .with_context(|| format!("writing {}", script.display()))?;
    }
    let script = script.display().to_string();
    let url = url.to_owned();
    let (threads, conns, duration) = (
        plan.wrk_threads.to_string(),
        plan.wrk_connections.to_string(),
        format!("{secs}s"),
    );
    let mut args = vec![
        "wrk",
        "-t",
        &threads,
        "-c",
        &conns,
        "-d",
        &duration,
        "--timeout",
        "5s",
        "-s",
        &script,
    ];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(&url);
    let result = bench::parse_wrk(&client.exec(&args)?)?;
    if result.requests == 0.0 {
        bail!("wrk completed no request");
    }
    Ok(result)
}

fn keep_alive(plan: &Plan, table: &mut Table, cluster: &Cluster, paths: &[PathCase]) {
    println!(
        "\n-- keep-alive requests: wrk -t{} -c{} {} s, {HTTP_BODY_BYTES}-byte responses, {} round(s) --",
        plan.wrk_threads, plan.wrk_connections, plan.http_secs, plan.reps
    );
    for rep in 0..plan.reps {
        for path in paths {
            let run = || {
                wrk(
                    plan,
                    &path.client,
                    &path.server,
                    plan.http_secs,
                    false,
                    cluster,
                )
            };
            match with_cpu(cluster, path, run) {
                Ok((r, cpu)) => {
                    let rps = r.requests_per_second();
                    println!(
                        "  round {} {:<26} {rps:8.0} req/s  p50 {:6.0} p90 {:6.0} p99 {:6.0} µs  errors {}  agents {:.2}, machine {:.2} CPU s",
                        rep + 1,
                        path.label,
                        r.p50_us,
                        r.p90_us,
                        r.p99_us,
                        r.errors + r.timeouts,
                        cpu.agents,
                        cpu.machine
                    );
                    let k = path.key;
                    table.add(&format!("ka-rps/{k}"), rps);
                    table.add(&format!("ka-p50/{k}"), r.p50_us);
                    table.add(&format!("ka-p90/{k}"), r.p90_us);
                    table.add(&format!("ka-p99/{k}"), r.p99_us);
                    if k != "nomesh" {
                        table.add(&format!("cpu-ka/{k}"), cpu.agents * 1e3 / r.requests * 1e4);
                    }
                    table.add(
                        &format!("machine-ka/{k}"),
                        cpu.machine * 1e3 / r.requests * 1e4,
                    );
                }
                Err(e) => {
                    for figure in ["ka-rps", "ka-p50", "ka-p90", "ka-p99"] {
                        table.fail(&format!("{figure}/{}", path.key), &e);
                    }
                }
            }
        }
    }
}

fn fixed_rate(plan: &Plan, table: &mut Table, paths: &[PathCase], exe: &str) {
    println!(
        "\n-- fixed rate: {:.0} req/s over {} keep-alive connections, {} s, {} round(s) --",
        plan.rate, plan.rate_connections, plan.http_secs, plan.reps
    );
    // Below saturation means well below the slowest path's keep-alive rate.
    let slowest = PATHS
        .iter()
        .filter_map(|(k, _)| table.median(&format!("ka-rps/{k}")))
        .fold(f64::INFINITY, f64::min);
    if slowest.is_finite() && plan.rate > slowest / 2.0 {
        println!(
            "  note: {:.0} req/s is more than half the slowest path's saturation ({slowest:.0} req/s)",
            plan.rate
        );
    }
    for rep in 0..plan.reps {
        for path in paths {
            let to = path.server.addr_v4(HTTP_PORT);
            match load_rate(plan, exe, &path.client, to) {
                Ok(r) => {
                    println!(
                        "  round {} {:<26} {:6.0} req/s  p50 {:6.0} p90 {:6.0} p99 {:6.0} max {:6.0} µs  errors {}",
                        rep + 1,
                        path.label,
                        r.achieved,
                        r.p50_us,
                        r.p90_us,
                        r.p99_us,
                        r.max_us,
                        r.errors
                    );
                    let k = path.key;
                    table.add(&format!("rate-p50/{k}"), r.p50_us);
                    table.add(&format!("rate-p90/{k}"), r.p90_us);
                    table.add(&format!("rate-p99/{k}"), r.p99_us);
                }
                Err(e) => {
                    for figure in ["rate-p50", "rate-p90", "rate-p99"] {
                        table.fail(&format!("{figure}/{}", path.key), &e);
                    }
                }
            }
        }
    }
}

/// `mesh-bench load-rate` from `client` to `to` at the plan's fixed rate; fails when no
/// request completed.
fn load_rate(plan: &Plan, exe: &str, client: &Pod, to: SocketAddr) -> Result<RateReport> {
    let out = client.exec(&[
        exe,
        "load-rate",
        "--to",
        &to.to_string(),
        "--rate",
        &plan.rate.to_string(),
        "--connections",
        &plan.rate_connections.to_string(),
        "--seconds",
        &plan.http_secs.to_string(),
    ])?;
    let report: RateReport =
        serde_json::from_str(out.trim()).with_context(|| format!("load-rate printed {out:?}"))?;
    if report.requests == 0 {
        bail!("load-rate: no request completed ({} errors)", report.errors);
    }
    Ok(report)
}

fn churn(plan: &Plan, table: &mut Table, cluster: &Cluster, paths: &[PathCase]) {
    println!(
        "\n-- churn: wrk -t{} -c{} {} s with `Connection: close`, a fresh client pod per run, \
         {:.1?} pause before each, {} round(s) --",
        plan.wrk_threads, plan.wrk_connections, plan.http_secs, plan.churn_pause, plan.reps
    );
    for rep in 0..plan.reps {
        for path in paths {
            std::thread::sleep(plan.churn_pause);
            let client = path.churn_client(cluster, rep);
            let run = || wrk(plan, &client, &path.server, plan.http_secs, true, cluster);
            match with_cpu(cluster, path, run) {
                Ok((r, cpu)) => {
                    let rps = r.requests_per_second();
                    println!(
                        "  round {} {:<26} {rps:8.0} req/s  p50 {:6.0} p99 {:6.0} µs  errors {}  agents {:.2}, machine {:.2} CPU s  ({})",
                        rep + 1,
                        path.label,
                        r.p50_us,
                        r.p99_us,
                        r.errors + r.timeouts,
                        cpu.agents,
                        cpu.machine,
                        client.name()
                    );
                    let k = path.key;
                    table.add(&format!("churn-rps/{k}"), rps);
                    table.add(&format!("churn-p50/{k}"), r.p50_us);
                    table.add(&format!("churn-p99/{k}"), r.p99_us);
                    if k != "nomesh" {
                        table.add(
                            &format!("cpu-churn/{k}"),
                            cpu.agents * 1e3 / r.requests * 1e4,
                        );
                    }
                    table.add(
                        &format!("machine-churn/{k}"),
                        cpu.machine * 1e3 / r.requests * 1e4,
                    );
                }
                Err(e) => {
                    for figure in ["churn-rps", "churn-p50", "churn-p99"] {
                        table.fail(&format!("{figure}/{}", path.key), &e);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Connection storms.

/// New connections at fixed rates (open loop, one GET each) on each path, with live
/// keep-alive connections held through them: the highest rate a path held with no failed
/// connection and no live connection lost. A fresh client pod per run (TIME_WAIT).
fn storm_benchmarks(plan: &Plan, table: &mut Table, exe: &Path) -> Result<()> {
    let rates = &plan.storm_rates;
    println!(
        "\n== connection storms: rates {rates:?}/s for {:?} s, each connection open {:?}, {} live connections held ==",
        plan.storm_secs, plan.storm_hold, plan.storm_live
    );
    println!("agents: {}", plan.agent_flags_shown());
    let mut builder = Cluster::builder()
        .nodes(2)
        .ambient_namespace(MESH_NS)
        .namespace(PLAIN_NS, std::iter::empty::<(&str, &str)>())
        .pod(PodSpec::new("m-local", MESH_NS, 0).service_account("server"))
        .pod(PodSpec::new("m-remote", MESH_NS, 1).service_account("server"))
        .pod(PodSpec::new("p-server", PLAIN_NS, 1).service_account("server"));
    let client = |key: &str, i: usize| format!("storm-{key}-{i}");
    for (key, _) in PATHS {
        let ns = if key == "nomesh" { PLAIN_NS } else { MESH_NS };
        for i in 0..rates.len() {
            builder = builder.pod(PodSpec::new(client(key, i), ns, 0).service_account("client"));
        }
        for i in 0..plan.churn_rates.len() {
            builder =
                builder.pod(PodSpec::new(churn_rate_pod(key, i), ns, 0).service_account("client"));
        }
    }
    let cluster = builder.build().context("building the storm cluster")?;
    let exe_s = exe_str(exe)?;
    let port = HTTP_PORT.to_string();
    for pod in cluster.pods() {
        widen_port_range(&pod)?;
    }
    for name in ["m-local", "m-remote", "p-server"] {
        let http = cluster
            .pod(name)
            .spawn(&[exe_s, "serve-http", "--port", &port])?;
        http.wait_for_line("READY", Duration::from_secs(10))?;
    }
    let config = cluster.config_path();
    cluster.write_config(&config, &ConfigOptions::default())?;
    start_agents(plan, cluster.nodes(), &config)?;
    for (key, label) in PATHS {
        if !plan.storms(key) {
            continue;
        }
        let (server, agents) = match key {
            "nomesh" => ("p-server", vec![]),
            "same" => ("m-local", vec![0]),
            _ => ("m-remote", vec![0, 1]),
        };
        let to = cluster.pod(server).addr_v4(HTTP_PORT).to_string();
        let fds_before = agents_fds(&cluster, &agents)?;
        if !agents.is_empty() {
            table.add(
                &format!("storm-rss-before/{key}"),
                agents_rss_mib(&cluster, &agents)?,
            );
        }
        let mut held = 0.0;
        for (i, (&rate, &secs)) in rates.iter().zip(&plan.storm_secs).enumerate() {
            let pod = cluster.pod(&client(key, i));
            let cpu_before = agents_cpu(&cluster, &agents)?;
            let args = [
                exe_s,
                "storm",
                "--to",
                &to,
                "--rate",
                &rate.to_string(),
                "--seconds",
                &secs.to_string(),
                "--live",
                &plan.storm_live.to_string(),
                "--hold-ms",
                &plan.storm_hold.as_millis().to_string(),
            ];
            let report = pod.exec(&args).and_then(|out| {
                let line = out.lines().last().unwrap_or_default();
                serde_json::from_str::<bench::StormReport>(line)
                    .with_context(|| format!("storm printed {out:?}"))
            });
            let cpu = agents_cpu(&cluster, &agents)? - cpu_before;
            let r = match report {
                Ok(r) => r,
                Err(e) => {
                    for figure in ["storm-held", "storm-p99", "storm-cpu"] {
                        if figure != "storm-cpu" || key != "nomesh" {
                            table.fail(&format!("{figure}/{key}"), &e);
                        }
                    }
                    break;
                }
            };
            println!(
                "  {label:<26} {rate:6.0}/s x {secs} s: {} connections, {} failed, live {}/{} lost, p50 {:.0} p99 {:.0} max {:.0} µs, agents {cpu:.2} CPU s{}",
                r.attempted,
                r.failed,
                r.live_lost,
                r.live,
                r.p50_us,
                r.p99_us,
                r.max_us,
                r.first_error
                    .as_ref()
                    .map_or(String::new(), |e| format!(" (first failure: {e})"))
            );
            if let Some(e) = &r.first_live_error {
                println!("    first live connection lost: {e}");
            }
            if i == 0 {
                if !agents.is_empty() {
                    table.add(
                        &format!("storm-rss-peak/{key}"),
                        agents_rss_mib(&cluster, &agents)?,
                    );
                }
                table.add(&format!("storm-p99/{key}"), r.p99_us);
                if key != "nomesh" && r.attempted > 0 {
                    table.add(
                        &format!("storm-cpu/{key}"),
                        cpu * 1e3 / r.attempted as f64 * 1e4,
                    );
                }
            }
            if r.failed > 0 || r.live_lost > 0 {
                break;
            }
            held = rate;
        }
        table.add(&format!("storm-held/{key}"), held);
        // Let the storm's connections close (the next path starts from a quiet node),
        // then the agents settle: what they keep of the storm's memory.
        let deadline = Instant::now() + Duration::from_secs(60);
        while agents_fds(&cluster, &agents)? > fds_before + 64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        if !agents.is_empty() {
            std::thread::sleep(plan.storm_settle);
            let rss = agents_rss_mib(&cluster, &agents)?;
            println!(
                "  {label:<26} agents' RSS {rss:.1} MiB {:?} after the storms",
                plan.storm_settle
            );
            table.add(&format!("storm-rss-after/{key}"), rss);
        }
        churn_at_rates(plan, table, &cluster, (key, label), &to, &agents, exe_s)?;
    }
    cluster.teardown().context("tearing the storm cluster down")
}

/// The client pod of a path's `i`th fixed churn rate: fresh, so no run starts among the
/// previous one's closing sockets.
fn churn_rate_pod(key: &str, i: usize) -> String {
    format!("crate-{key}-{i}")
}

/// Churn at each fixed rate of the plan on one path: a new connection every 1/rate s, one
/// GET with `Connection: close` each, for the plan's seconds; every rate runs (failures are
/// counted, not a reason to stop), and the highest rate with none is the path's figure.
fn churn_at_rates(
    plan: &Plan,
    table: &mut Table,
    cluster: &Cluster,
    (key, label): (&str, &str),
    to: &str,
    agents: &[usize],
    exe: &str,
) -> Result<()> {
    let secs = plan.churn_rate_secs;
    println!("  {label:<26} churn at fixed rates, one GET per connection, {secs} s each:");
    let (mut held, mut failing) = (0.0, false);
    for (i, &rate) in plan.churn_rates.iter().enumerate() {
        let pod = cluster.pod(&churn_rate_pod(key, i));
        let cpu_before = agents_cpu(cluster, agents)?;
        let args = [
            exe,
            "storm",
            "--to",
            to,
            "--rate",
            &rate.to_string(),
            "--seconds",
            &secs.to_string(),
            "--live",
            "0",
            "--hold-ms",
            "0",
        ];
        let report = pod.exec(&args).and_then(|out| {
            let line = out.lines().last().unwrap_or_default();
            serde_json::from_str::<bench::StormReport>(line)
                .with_context(|| format!("storm printed {out:?}"))
        });
        let cpu = agents_cpu(cluster, agents)? - cpu_before;
        let r = match report {
            Ok(r) => r,
            Err(e) => {
                for figure in ["failed", "p50", "p99", "cpu"] {
                    if figure != "cpu" || key != "nomesh" {
                        table.fail(&format!("crate-{figure}/{rate}/{key}"), &e);
                    }
                }
                failing = true;
                continue;
            }
        };
        println!(
            "    {rate:6.0}/s: {} connections, {} failed, p50 {:.0} p99 {:.0} max {:.0} µs, agents {cpu:.2} CPU s{}",
            r.attempted,
            r.failed,
            r.p50_us,
            r.p99_us,
            r.max_us,
            r.first_error
                .as_ref()
                .map_or(String::new(), |e| format!(" (first failure: {e})"))
        );
        table.add(&format!("crate-failed/{rate}/{key}"), r.failed as f64);
        table.add(&format!("crate-p50/{rate}/{key}"), r.p50_us);
        table.add(&format!("crate-p99/{rate}/{key}"), r.p99_us);
        if key != "nomesh" && r.attempted > 0 {
            table.add(
                &format!("crate-cpu/{rate}/{key}"),
                cpu * 1e3 / r.attempted as f64 * 1e4,
            );
        }
        failing |= r.failed > 0;
        if !failing {
            held = rate;
        }
    }
    table.add(&format!("crate-held/{key}"), held);
    Ok(())
}

/// Starts the agents of `nodes` with the plan's flags and waits until they are ready.
fn start_agents<'a>(
    plan: &Plan,
    nodes: impl IntoIterator<Item = &'a Node> + Clone,
    config: &Path,
) -> Result<()> {
    let flags = plan.agent_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    for node in nodes.clone() {
        node.spawn_agent(config, &flags)?;
    }
    for node in nodes {
        node.wait_agent_ready(Duration::from_secs(30))?;
    }
    Ok(())
}

/// Restarts the agents of `nodes` (they adopt their pinned datapath) and waits for them.
fn restart_agents(plan: &Plan, cluster: &Cluster, nodes: &[usize], config: &Path) -> Result<()> {
    for &n in nodes {
        cluster.node(n).stop_agent()?;
    }
    start_agents(plan, nodes.iter().map(|&n| cluster.node(n)), config)
}

fn idle_connections(
    plan: &Plan,
    table: &mut Table,
    cluster: &Cluster,
    paths: &[PathCase],
    exe: &str,
    config: &Path,
) {
    let n = plan.idle_connections;
    println!(
        "\n-- idle connections: {n} held open through the mesh; each agent's RSS and \
         descriptors before, while held and after they closed{}, {} round(s) --",
        if plan.restart_for_memory {
            " (agents restarted first)"
        } else {
            ""
        },
        plan.reps
    );
    for rep in 0..plan.reps {
        for path in paths.iter().filter(|p| p.key != "nomesh") {
            let agents: &[&str] = if path.key == "same" {
                &["same"]
            } else {
                &["cross-src", "cross-dst"]
            };
            let figures = ["conn", "conn-fds", "conn-rss-left", "conn-fds-left"];
            match idle_connections_once(plan, cluster, path, exe, config) {
                Ok(held) => {
                    for (agent, h) in agents.iter().zip(&held) {
                        let n = plan.idle_connections as f64;
                        println!(
                            "  round {} {:<26} {agent:<9} RSS {:.1} -> {:.1} -> {:.1} MiB, descriptors {} -> {} -> {} (before -> held -> closed)",
                            rep + 1,
                            path.label,
                            h.rss_kib[0] as f64 / 1024.0,
                            h.rss_kib[1] as f64 / 1024.0,
                            h.rss_kib[2] as f64 / 1024.0,
                            h.fds[0],
                            h.fds[1],
                            h.fds[2],
                        );
                        let values = [
                            (h.rss_kib[1] as f64 - h.rss_kib[0] as f64) / n,
                            (h.fds[1] as f64 - h.fds[0] as f64) / n,
                            (h.rss_kib[2] as f64 - h.rss_kib[0] as f64) / 1024.0,
                            h.fds[2] as f64 - h.fds[0] as f64,
                        ];
                        for (figure, value) in figures.iter().zip(values) {
                            table.add(&format!("{figure}/{agent}"), value);
                        }
                    }
                }
                Err(e) => {
                    for agent in agents {
                        for figure in figures {
                            table.fail(&format!("{figure}/{agent}"), &e);
                        }
                    }
                }
            }
        }
    }
}

/// One agent's RSS and open descriptors before the connections, while they are held, and
/// after they closed.
struct Held {
    rss_kib: [u64; 3],
    fds: [u64; 3],
}

/// Reads every agent of `pids`.
fn agent_readings(pids: &[u32]) -> Result<Vec<(u64, u64)>> {
    pids.iter()
        .map(|&p| Ok((bench::rss_kib(p)?, bench::fd_count(p)?)))
        .collect()
}

/// Each agent of the path: RSS and descriptors before, during and after holding
/// `plan.idle_connections` connections.
fn idle_connections_once(
    plan: &Plan,
    cluster: &Cluster,
    path: &PathCase,
    exe: &str,
    config: &Path,
) -> Result<Vec<Held>> {
    if plan.restart_for_memory {
        restart_agents(plan, cluster, &path.agents, config)?;
    }
    let to = path.server.addr_v4(HTTP_PORT).to_string();
    // Warm the path up (identities, pooled HBONE connection) before the baseline.
    path.client.exec(&[exe, "check-path", "--to", &to])?;
    std::thread::sleep(plan.settle);
    let pids: Vec<u32> = path
        .agents
        .iter()
        .map(|&n| agent_pid(cluster.node(n)))
        .collect::<Result<_>>()?;
    let before = agent_readings(&pids)?;
    for &pid in &pids {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
        if let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) {
            println!(
                "    agent {pid}: {}",
                line.split_whitespace().collect::<Vec<_>>().join(" ")
            );
        }
    }
    let count = plan.idle_connections.to_string();
    let holder = path.client.spawn(&[
        exe,
        "hold-conns",
        "--to",
        &to,
        "--count",
        &count,
        "--seconds",
        "600",
    ])?;
    let measured = (|| {
        holder.wait_for_line("READY", Duration::from_secs(300))?;
        std::thread::sleep(plan.settle);
        agent_readings(&pids)
    })();
    let _ = holder.stop();
    let during = measured?;
    // The agents close their sides once the client's are gone; the HBONE connections the
    // pool opened for them go after --hbone-pool-idle-timeout (60 s). Wait for the
    // descriptors to come back (at most 90 s), then give memory two of the agent's heap
    // trims (every 5 s) to go back.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut after = agent_readings(&pids)?;
    while std::time::Instant::now() < deadline && after.iter().zip(&before).any(|(a, b)| a.1 > b.1)
    {
        std::thread::sleep(Duration::from_millis(200));
        after = agent_readings(&pids)?;
    }
    // (A smoke run's figures mean nothing: it does not wait for the trims.)
    if !plan.smoke {
        std::thread::sleep(plan.settle.max(2 * mesh_agent::memory::TRIM_INTERVAL));
    }
    let after = agent_readings(&pids)?;
    Ok(before
        .iter()
        .zip(&during)
        .zip(&after)
        .map(|((b, d), a)| Held {
            rss_kib: [b.0, d.0, a.0],
            fds: [b.1, d.1, a.1],
        })
        .collect())
}

// ---------------------------------------------------------------------------------
// DNS.

/// The DNS stage's cases: a server-only baseline, then the agent's two paths.
const DNS_CASES: [(&str, &str); 3] = [
    ("direct", "test server, pod outside the mesh"),
    ("mesh", "mesh name, answered by the agent"),
    ("forward", "other name, forwarded by the agent"),
];
const DNS_NS: &str = "dns-bench";
const DNS_MESH_NAME: &str = "reviews.dns-bench.svc.cluster.local";
const DNS_OTHER_NAME: &str = "example.test";

/// One enrolled pod's DNS at a fixed rate for each case, interleaved, `plan.reps` times.
fn dns_benchmarks(plan: &Plan, table: &mut Table) -> Result<()> {
    println!(
        "\n== DNS: {} queries/s for {} s from one pod (UDP), 1 node ==",
        plan.dns_rate, plan.dns_secs
    );
    println!("agent: {}", plan.agent_flags_shown());
    let cluster = Cluster::builder()
        .nodes(1)
        .ambient_namespace(DNS_NS)
        .namespace(PLAIN_NS, std::iter::empty::<(&str, &str)>())
        .pod(PodSpec::new("dns-client", DNS_NS, 0))
        .pod(PodSpec::new("dns-server", PLAIN_NS, 0))
        .pod(PodSpec::new("dns-outsider", PLAIN_NS, 0))
        .build()
        .context("building the DNS cluster")?;
    let server = cluster.pod("dns-server");
    server.spawn_dns_server(&[(DNS_OTHER_NAME, "192.0.2.10".parse()?)], &[])?;
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: {DNS_NS}}}\nspec: {{clusterIP: 10.96.0.20, ports: [{{port: 9080}}], selector: {{app: reviews}}}}\n"
    );
    let config = cluster.config_path();
    cluster.write_config(&config, &ConfigOptions::default().document(service))?;
    start_agents(plan, [cluster.node(0)], &config)?;
    let to = server.addr_v4(53).to_string();
    let (rate, secs) = (plan.dns_rate.to_string(), plan.dns_secs.to_string());
    for rep in 0..plan.reps {
        for (case, label) in DNS_CASES {
            let (pod, name) = match case {
                "direct" => ("dns-outsider", DNS_OTHER_NAME),
                "mesh" => ("dns-client", DNS_MESH_NAME),
                _ => ("dns-client", DNS_OTHER_NAME),
            };
            let args = [
                "dns-load",
                "--server",
                &to,
                "--name",
                name,
                "--rate",
                &rate,
                "--seconds",
                &secs,
            ];
            let result = cluster.pod(pod).run_mesh_pod(&args).and_then(|out| {
                serde_json::from_str::<tests::dns_workload::LoadReport>(out.trim())
                    .with_context(|| format!("dns-load printed {out:?}"))
            });
            match result {
                Ok(r) => {
                    let lost = r.sent.saturating_sub(r.answered) as f64;
                    println!(
                        "  round {} {label:<40} sent {} answered {} p50 {:.0} p99 {:.0} max {:.0} µs",
                        rep + 1,
                        r.sent,
                        r.answered,
                        r.p50_us,
                        r.p99_us,
                        r.max_us
                    );
                    table.add(&format!("dns-p50/{case}"), r.p50_us);
                    table.add(&format!("dns-p99/{case}"), r.p99_us);
                    table.add(&format!("dns-lost/{case}"), lost);
                }
                Err(e) => {
                    for figure in ["p50", "p99", "lost"] {
                        table.fail(&format!("dns-{figure}/{case}"), &e);
                    }
                }
            }
        }
    }
    cluster.teardown().context("tearing the DNS cluster down")
}

// ---------------------------------------------------------------------------------
// A node agent against a large cluster.

fn heap_benchmarks(plan: &Plan, table: &mut Table) -> Result<()> {
    let size = plan.scale;
    println!(
        "\n== heap: the scale stage's cluster ({} pods, {} services) in the agent's types ==",
        size.pods, size.services
    );
    let heap = tests::scale::heap(size)?;
    println!(
        "  objects {:.1} MiB, state {:.1} MiB, translation peak +{:.1} MiB",
        heap.objects_mib, heap.state_mib, heap.translate_peak_mib
    );
    table.add("heap-objects", heap.objects_mib);
    table.add("heap-state", heap.state_mib);
    table.add("heap-peak", heap.translate_peak_mib);
    Ok(())
}

fn scale_benchmarks(plan: &Plan, table: &mut Table, exe: &Path) -> Result<()> {
    let size = plan.scale;
    println!(
        "\n== scale: 1 node's agent (Kubernetes mode), {} pods on {} nodes, {} services ==",
        size.pods, size.nodes, size.services
    );
    println!("agent: {}", plan.agent_flags_shown());
    let flags = plan.agent_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let report = tests::scale::run(size, &flags, &[exe_str(exe)?], plan.settle)?;
    println!(
        "  agent RSS {:.1} MiB with 2 pods, {:.1} MiB with the whole cluster (at most {:.1} MiB); synced {:.0?} after start",
        report.rss_small_mib, report.rss_mib, report.rss_peak_mib, report.synced_after
    );
    table.add("scale-rss-small", report.rss_small_mib);
    table.add("scale-rss", report.rss_mib);
    table.add("scale-rss-peak", report.rss_peak_mib);
    table.add("scale-sync", report.synced_after.as_secs_f64() * 1e3);
    for (k, took) in report.enforced_after.iter().enumerate() {
        let what = if k % 2 == 0 {
            "DENY applied"
        } else {
            "DENY removed"
        };
        println!(
            "  {what}: enforced after {:.1} ms",
            took.as_secs_f64() * 1e3
        );
        table.add("scale-enforce", took.as_secs_f64() * 1e3);
    }
    Ok(())
}

// Enrollment and idle memory with many pods.

const ENROLL_NS: &str = "enroll";
const SINGLE: &str = "single";

fn enrollment_benchmarks(plan: &Plan, table: &mut Table, exe: &Path) -> Result<()> {
    let n = plan.enroll_batch;
    println!("\n== enrollment and idle memory: 1 node, {n} pods enrolled at once ==");
    println!("agent: {}", plan.agent_flags_shown());
    let started = Instant::now();
    let mut builder = Cluster::builder()
        .nodes(1)
        .ambient_namespace(ENROLL_NS)
        .namespace(PLAIN_NS, std::iter::empty::<(&str, &str)>())
        .pod(PodSpec::new("sink", PLAIN_NS, 0))
        .pod(PodSpec::new(SINGLE, ENROLL_NS, 0));
    let batch: Vec<String> = (0..n).map(|k| format!("batch-{k:03}")).collect();
    for name in &batch {
        builder = builder.pod(PodSpec::new(name.clone(), ENROLL_NS, 0));
    }
    let cluster = builder.build().context("building the enrollment cluster")?;
    println!(
        "cluster {} with {} pods built in {:.1?}",
        cluster.prefix(),
        n + 2,
        started.elapsed()
    );
    let node = cluster.node(0);
    let config = cluster.config_path();
    let options = |single: bool, with_batch: bool| {
        let mut o = ConfigOptions::default();
        if !single {
            o = o.exclude(SINGLE);
        }
        if !with_batch {
            for name in &batch {
                o = o.exclude(name.clone());
            }
        }
        o
    };
    let write = |o: &ConfigOptions| -> Result<()> {
        bench::write_atomically(&config, cluster.config_yaml(o)?.as_bytes())
    };
    write(&options(false, false))?;
    start_agents(plan, [node], &config)?;
    std::thread::sleep(plan.settle);
    let pid = agent_pid(node)?;
    let idle = bench::rss_kib(pid)? as f64 / 1024.0;
    println!("agent RSS with no enrolled pod: {idle:.1} MiB");
    table.add("rss-0", idle);

    // Nothing listens on the sink's port 9: uncaptured connects are refused at once.
    let sink = cluster.pod("sink").addr_v4(9);
    let exe = exe_str(exe)?;
    for rep in 0..plan.enroll_reps {
        let result = (|| -> Result<f64> {
            let prober = spawn_prober(&cluster.pod(SINGLE), exe, sink)?;
            let t0 = Instant::now();
            write(&options(true, false))?;
            let captured = prober.wait_exit_after(CAPTURED, Duration::from_secs(60))?;
            let ms = (captured - t0).as_secs_f64() * 1e3;
            write(&options(false, false))?;
            wait_enrolled(node, 0, Duration::from_secs(60))?;
            Ok(ms)
        })();
        match result {
            Ok(ms) => {
                println!("  round {} 1 pod captured after {ms:.0} ms", rep + 1);
                table.add("enroll-1", ms);
            }
            Err(e) => table.fail("enroll-1", &e),
        }
    }
    // Each round: all pods at once, the agent's idle RSS with them, then all removed
    // again (except after the last round).
    for rep in 0..plan.enroll_reps {
        let last = rep + 1 == plan.enroll_reps;
        let timing = (|| -> Result<(f64, f64)> {
            let prober = spawn_prober(&cluster.pod(&batch[n - 1]), exe, sink)?;
            let t0 = Instant::now();
            write(&options(false, true))?;
            let listed = wait_enrolled(node, n, Duration::from_secs(120))?;
            let captured = prober.wait_exit_after(CAPTURED, Duration::from_secs(60))?;
            let ms = |t: Instant| (t - t0).as_secs_f64() * 1e3;
            Ok((ms(listed), ms(captured)))
        })();
        match timing {
            Ok((listed, captured)) => {
                println!(
                    "  round {} {n} pods: all listed enrolled after {listed:.0} ms, the last \
                     pod's traffic captured after {captured:.0} ms",
                    rep + 1
                );
                table.add("enroll-batch", listed.max(captured));
            }
            Err(e) => table.fail("enroll-batch", &e),
        }
        let idle = (|| -> Result<f64> {
            std::thread::sleep(plan.settle);
            wait_enrolled(node, n, Duration::from_secs(60))?;
            Ok(bench::rss_kib(agent_pid(node)?)? as f64 / 1024.0)
        })();
        match idle {
            Ok(mib) => {
                println!(
                    "  round {} agent RSS with {n} enrolled pods: {mib:.1} MiB",
                    rep + 1
                );
                table.add("rss-batch", mib);
            }
            Err(e) => table.fail("rss-batch", &e),
        }
        if !last {
            write(&options(false, false))?;
            wait_enrolled(node, 0, Duration::from_secs(120))?;
        }
    }
    cluster
        .teardown()
        .context("tearing the enrollment cluster down")
}

/// Starts `probe-capture` in `pod` and waits until it has seen the pod uncaptured.
fn spawn_prober(pod: &Pod, exe: &str, to: SocketAddr) -> Result<Process> {
    let to = to.to_string();
    let prober = pod.spawn(&[exe, "probe-capture", "--to", &to, "--interval-us", "1000"])?;
    if let Err(e) = prober.wait_for_line(PROBING, Duration::from_secs(10)) {
        let _ = prober.stop();
        return Err(e.context(format!(
            "{} was captured before it was enrolled",
            pod.name()
        )));
    }
    Ok(prober)
}

/// Polls `/config_dump` until exactly `count` pods are listed as enrolled.
fn wait_enrolled(node: &Node, count: usize, timeout: Duration) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let dump = node.config_dump()?;
        let enrolled = dump["enrolled"].as_array().map_or(0, Vec::len);
        if enrolled == count {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!(
                "{}: {enrolled} pods enrolled after {timeout:?}, waiting for {count}; failures: {}",
                node.name(),
                dump["failures"]
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
