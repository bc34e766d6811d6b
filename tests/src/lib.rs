//! The kernel-level suite of mesh-agent and what it is built on: a network-namespace
//! "cluster" of nodes and pods ([`cluster`]), the workloads its pods run ([`workload`]),
//! an in-process Kubernetes API server ([`apiserver`]), a packet capture ([`capture`]), a
//! reader of the agent's Prometheus metrics ([`metrics`]) and the benchmark's workloads
//! ([`bench`]). The binaries are `mesh-pod` (what a test pod runs), `mesh-demo` (the
//! `cargo xtask demo` report) and `mesh-bench` (`cargo xtask bench`); the integration tests
//! are under `tests/`.
//!
//! Errors here are `anyhow` on purpose: this is test wiring whose errors are only ever
//! printed, and every one carries the command, path or address it is about.
// One module (`heap`, a counting allocator) needs `unsafe`; it says why it is sound.
#![deny(unsafe_code)]

pub mod apiserver;
pub mod bench;
pub mod bookinfo;
pub mod capture;
pub mod cluster;
mod config;
pub mod dns_workload;
pub mod flood_workload;
pub mod grpc_workload;
pub mod heap;
mod host;
pub mod http_workload;
pub mod metrics;
pub mod otlp;
pub mod prometheus;
pub mod scale;
pub mod walkthrough;
pub mod workload;

pub use cluster::{
    Cluster, ClusterBuilder, ConfigOptions, Node, Pod, PodSpec, Process, require_root,
};
pub use host::{in_netns, locate_binary};
pub use workload::ConnectReport;

/// Polls `f` every 100 ms until it holds (true) or `limit` has passed (false).
pub fn eventually(limit: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
