//! `mesh-agent`: the node agent's command line.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use mesh_agent::{agent, config::Settings, ebpf::DEFAULT_PIN_DIR};

#[derive(Parser)]
#[command(
    version,
    about = "eBPF-accelerated, sidecarless service-mesh node agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capture and proxy the traffic of this node's ambient pods.
    Run {
        /// This node's name (pods are node-local when `spec.nodeName` equals it).
        #[arg(long, env = "NODE_NAME")]
        node: String,
        /// Multi-document YAML of Kubernetes objects (Namespace, Pod, Service, policies).
        #[arg(long)]
        config: PathBuf,
        /// cgroup v2 directory whose processes are captured (default: the cgroup v2 root).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// bpffs directory for pinned maps and links.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        bpffs_dir: PathBuf,
        /// SPIFFE trust domain.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Istio root namespace (mesh-wide policies).
        #[arg(long, default_value = "istio-system")]
        root_namespace: String,
    },
    /// Detach and remove every program, link and map pinned under the bpffs directory.
    Uninstall {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        bpffs_dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run {
            node,
            config,
            cgroup,
            bpffs_dir,
            trust_domain,
            root_namespace,
        } => {
            let settings = Settings {
                trust_domain,
                root_namespace,
            };
            let cfg = agent::RunConfig {
                node,
                config_file: config,
                cgroup,
                pin_dir: bpffs_dir,
                settings,
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(agent::run(cfg))
        }
        Command::Uninstall { bpffs_dir } => agent::uninstall(&bpffs_dir),
    }
}
