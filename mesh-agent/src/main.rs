//! `mesh-agent`: the node agent's command line.
#![forbid(unsafe_code)]

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
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
enum CaCommand {
    /// Write a new development root certificate and key.
    Init {
        #[arg(long)]
        out: PathBuf,
    },
    /// Serve Istio's certificate API (CreateCertificate over gRPC and mutual TLS): the only
    /// process that holds the CA's key. Node agents get the identities of the captured pods
    /// on their node, any other caller its own.
    Serve(Box<CaServeArgs>),
    /// Write a credential with which a proxy authenticates to `ca serve` in file mode:
    /// `cert.pem` (with its chain), `key.pem` and the mesh's `root-cert.pem`.
    Credential(Box<CaCredentialArgs>),
}

/// `mesh-agent ca serve`.
#[derive(Args)]
struct CaServeArgs {
    /// The CA's files: root-cert.pem + root-key.pem, or Istio's plug-in ca-cert.pem,
    /// ca-key.pem, cert-chain.pem, root-cert.pem.
    #[arg(long)]
    ca_dir: PathBuf,
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: std::net::SocketAddr,
    /// DNS names of the service's certificate (repeatable).
    #[arg(long = "server-name", default_values_t = [String::from(DEFAULT_CA_SERVER_NAME)])]
    server_names: Vec<String>,
    /// Multi-document YAML of Kubernetes objects (which pods run on which node) instead of
    /// the Kubernetes API.
    #[arg(long, conflicts_with = "kubeconfig")]
    config: Option<PathBuf>,
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// Lifetime of a certificate whose request names none.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_lifetime: Duration,
    /// The longest lifetime granted (Istio's MAX_WORKLOAD_CERT_TTL).
    #[arg(long, default_value = "2160h", value_parser = parse_duration)]
    max_cert_lifetime: Duration,
    /// A service account, NAMESPACE/NAME, whose tokens authenticate node agents (Kubernetes
    /// mode; repeatable), as istiod's CA_TRUSTED_NODE_ACCOUNTS.
    #[arg(long = "trusted-node-account", default_values_t = [String::from("istio-system/ztunnel")])]
    trusted_node_accounts: Vec<String>,
    /// Client connections held at once (handshaking or open); one beyond is closed.
    #[arg(long, default_value = "4096")]
    max_connections: std::num::NonZeroUsize,
}

/// `mesh-agent ca credential`.
#[derive(Args)]
#[command(group(clap::ArgGroup::new("subject").required(true).args(["node", "identity"])))]
struct CaCredentialArgs {
    #[arg(long)]
    ca_dir: PathBuf,
    /// A node agent's credential: the node's name.
    #[arg(long)]
    node: Option<String>,
    /// A waypoint's or gateway's credential: its SPIFFE identity.
    #[arg(long)]
    identity: Option<String>,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, default_value = "8760h", value_parser = parse_duration)]
    lifetime: Duration,
}

/// The name `ca serve` presents and proxies expect by default: istiod's.
const DEFAULT_CA_SERVER_NAME: &str = "istiod.istio-system.svc";

/// Where a proxy's certificates come from: a CA directory on this machine, or a CA service.
#[derive(Args)]
struct CaArgs {
    /// Directory with the CA's files (`mesh-agent ca init` writes one; Istio's plug-in
    /// layout works too): sign here, with the key on this machine.
    #[arg(
        long,
        required_unless_present = "ca_address",
        conflicts_with = "ca_address"
    )]
    ca_dir: Option<PathBuf>,
    /// A CA service (`mesh-agent ca serve`, or istiod), HOST:PORT: the key stays there.
    #[arg(long, requires = "ca_root_cert")]
    ca_address: Option<String>,
    /// The name the CA service's certificate must carry.
    #[arg(long, default_value = DEFAULT_CA_SERVER_NAME)]
    ca_server_name: String,
    /// The mesh's roots (PEM): they verify the CA service and every peer.
    #[arg(long)]
    ca_root_cert: Option<PathBuf>,
    /// Directory with this proxy's credential for the CA service, cert.pem and key.pem
    /// (`mesh-agent ca credential`).
    #[arg(long, conflicts_with = "ca_token_file")]
    ca_credential: Option<PathBuf>,
    /// A service-account token for the CA service (Kubernetes mode), re-read per request.
    #[arg(long)]
    ca_token_file: Option<PathBuf>,
}

impl CaArgs {
    fn source(self) -> anyhow::Result<mesh_agent::ca_service::CaSource> {
        use mesh_agent::ca_service::{CaSource, Credential, RemoteCaConfig};
        let (Some(address), Some(roots)) = (self.ca_address, self.ca_root_cert) else {
            return Ok(CaSource::Files(
                self.ca_dir
                    .expect("clap requires --ca-dir without --ca-address"),
            ));
        };
        let credential = match (self.ca_credential, self.ca_token_file) {
            (Some(dir), _) => Credential::Certificate {
                cert: dir.join("cert.pem"),
                key: dir.join("key.pem"),
            },
            (None, Some(token)) => Credential::Token(token),
            (None, None) => anyhow::bail!(
                "--ca-address needs --ca-credential (file mode) or --ca-token-file (Kubernetes mode)"
            ),
        };
        Ok(CaSource::Remote(RemoteCaConfig {
            address,
            server_name: self.ca_server_name,
            roots,
            credential,
        }))
    }
}

/// `90s`, `30m`, `24h`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 24h, 30m, 5s"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("invalid duration unit in {s:?}: use s, m or h")),
    };
    if secs == 0 {
        return Err("duration must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

/// `mesh-agent run`.
#[derive(Args)]
struct RunArgs {
    /// This node's name (pods are node-local when `spec.nodeName` equals it).
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Multi-document YAML of Kubernetes objects (Namespace, Pod, Service, policies)
    /// instead of the Kubernetes API.
    #[arg(long, conflicts_with = "kubeconfig")]
    config: Option<PathBuf>,
    /// kubeconfig for the API server (default: in-cluster configuration, else
    /// $KUBECONFIG or ~/.kube/config). Used when --config is not given.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The host's /proc (the DaemonSet mounts it at /host/proc).
    #[arg(long, default_value = "/proc")]
    proc_root: PathBuf,
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
    #[command(flatten)]
    ca: CaArgs,
    /// Lifetime of workload certificates, e.g. `24h`, `30m`, `5s` (renewed at half-life).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_lifetime: Duration,
    /// Let the kernel move bytes between sockets of this node (sk_msg): the loopback legs
    /// between applications and the agent, and same-node connections past the agent; a
    /// receiver's queue is bounded by its receive buffer (docs/adr/006, 016). Opt-in: an
    /// application blocked in a read on a socket in the kernel's socket map can be woken
    /// with EAGAIN. Off: TCP over loopback, and splice(2) through the agent.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    sockmap: bool,
    /// Answer enrolled pods' DNS from a resolver in each pod's namespace (port 15053, as
    /// ambient does): mesh names from the mesh, the rest forwarded to the server the pod
    /// asked. A pod's annotation `ambient.istio.io/dns-capture` overrides it.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    dns_capture: bool,
    /// Threads that run the proxy (default: one per CPU this process may use).
    #[arg(long, env = "MESH_WORKER_THREADS")]
    worker_threads: Option<std::num::NonZeroUsize>,
    /// How long an HBONE peer has to finish TLS and the HTTP/2 preface.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// An HBONE connection that carries no stream for this long is closed.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    hbone_idle_timeout: Duration,
    /// A pooled HBONE connection to a peer that carries no stream for this long is closed.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    hbone_pool_idle_timeout: Duration,
    /// cgroup v2 directory of the node's kubelet, whose health probes reach pods without
    /// the proxy (repeatable; default: the cgroups of a process named `kubelet` under
    /// --cgroup).
    #[arg(long)]
    kubelet_cgroup: Vec<PathBuf>,
    /// Unix socket where the running agent offers its listeners to the next one, which
    /// takes them over instead of binding (a restart refuses no connection); default:
    /// /var/run/mesh-agent/<bpffs dir name>.handoff.sock.
    #[arg(long)]
    handoff_socket: Option<PathBuf>,
    /// After handing its listeners over, how long the old agent waits for the connections
    /// it carries to end before it exits.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_period: Duration,
}

/// `mesh-agent waypoint`.
#[derive(Args)]
struct WaypointArgs {
    /// The waypoint's Gateway (class istio-waypoint).
    #[arg(long)]
    name: String,
    /// The Gateway's namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// The service account of the waypoint's pods, its identity (default: the Gateway's
    /// name, as Istio creates it).
    #[arg(long, env = "SERVICE_ACCOUNT")]
    service_account: Option<String>,
    /// Multi-document YAML of Kubernetes objects instead of the Kubernetes API.
    #[arg(long, conflicts_with = "kubeconfig")]
    config: Option<PathBuf>,
    /// kubeconfig for the API server (default: in-cluster configuration).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    #[command(flatten)]
    ca: CaArgs,
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_lifetime: Duration,
    /// HBONE listen addresses (repeatable; default [::]:15008 and 0.0.0.0:15008).
    #[arg(long)]
    listen: Vec<std::net::SocketAddr>,
    /// Threads that run the proxy (default: one per CPU this process may use).
    #[arg(long, env = "MESH_WORKER_THREADS")]
    worker_threads: Option<std::num::NonZeroUsize>,
    /// The access log on stdout: Istio's text format, its JSON encoding, or none.
    #[arg(long, value_enum, default_value = "text")]
    access_log_format: mesh_agent::waypoint::access_log::Format,
    /// TLS handshakes in progress at once on the HBONE listener, and on an ingress gateway's
    /// HTTPS ports; a connection beyond is closed unanswered (default 1024).
    #[arg(long)]
    max_handshakes: Option<std::num::NonZeroUsize>,
    /// An OTLP/HTTP trace receiver, `http://HOST:PORT` (spans posted to /v1/traces) or a
    /// full URL; one span per request. Without it, no tracing.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Percentage of new traces sampled (a request that carries a sampling decision keeps
    /// it), as Istio's `sampling`.
    #[arg(long, default_value_t = 1.0, value_parser = parse_percentage)]
    trace_sampling: f64,
}

/// `0` to `100`.
fn parse_percentage(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?}: expected a percentage from 0 to 100")),
    }
}

/// `mesh-agent gateway`.
#[derive(Args)]
struct GatewayArgs {
    #[command(flatten)]
    proxy: WaypointArgs,
    /// The gateway's own pod (in --namespace): its labels select Istio Gateways, its
    /// address is the source of the tunnels it opens.
    #[arg(long, env = "POD_NAME")]
    pod: Option<String>,
}

/// `mesh-agent analyze`.
#[derive(Args)]
struct AnalyzeArgs {
    /// Multi-document YAML files of Kubernetes objects, read as one configuration
    /// (repeatable); without any, the Kubernetes API.
    #[arg(long = "config", short = 'f')]
    config: Vec<PathBuf>,
    /// kubeconfig for the API server (default: in-cluster configuration, else ~/.kube/config).
    #[arg(long, conflicts_with = "config")]
    kubeconfig: Option<PathBuf>,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// `text` (istioctl's lines) or `json`.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Subcommand)]
enum AuthzCommand {
    /// How a connection or request from one pod to a pod or service is judged, hop by hop
    /// (the destination's waypoint, then its node proxy), by the enforcement's own code:
    /// every policy in scope, whether it matched, which one decided. Exit status 1 when
    /// denied.
    Check(Box<AuthzCheckArgs>),
}

/// `mesh-agent authz check`.
#[derive(Args)]
struct AuthzCheckArgs {
    /// Multi-document YAML files of Kubernetes objects (repeatable); without any, the
    /// Kubernetes API.
    #[arg(long = "config", short = 'f')]
    config: Vec<PathBuf>,
    #[arg(long, conflicts_with = "config")]
    kubeconfig: Option<PathBuf>,
    /// The client pod, NAMESPACE/POD.
    #[arg(long)]
    from: String,
    /// The destination: NAMESPACE/NAME:PORT (a pod, else a service) or IP:PORT.
    #[arg(long)]
    to: String,
    /// The request's method, at a waypoint on an HTTP port (default GET).
    #[arg(long)]
    method: Option<String>,
    /// The request's path (default /).
    #[arg(long)]
    path: Option<String>,
    /// The request's Host (default: the destination's name).
    #[arg(long)]
    host: Option<String>,
    /// A request header, `NAME: VALUE` (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

/// `mesh-agent status`.
#[derive(Args)]
struct StatusArgs {
    /// The configuration the proxies read, as files (repeatable); without any, the
    /// Kubernetes API.
    #[arg(long = "config", short = 'f')]
    config: Vec<PathBuf>,
    #[arg(long, conflicts_with = "config")]
    kubeconfig: Option<PathBuf>,
    /// The proxies' metrics port, where they answer /status.
    #[arg(long, default_value_t = mesh_common::METRICS_PORT)]
    port: u16,
    /// `text` (a table) or `json`.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Output,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
}

#[derive(Subcommand)]
enum ManifestCommand {
    /// Print the Kubernetes objects of an installation (what `kubectl kustomize deploy/DIR`
    /// gives): minimal = the node agents, CRDs and RBAC (deploy/agent); default = and an
    /// ingress gateway (deploy/default); demo = and Prometheus scrape annotations and a
    /// waypoint for the namespace `demo` (deploy/demo).
    Generate {
        #[arg(long, value_enum, default_value = "default")]
        profile: mesh_agent::manifest::Profile,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// A proxy's /config_dump as tables (run where its admin port is: the agent's pod, or
    /// through a port-forward).
    Dump {
        #[arg(value_enum, default_value = "all")]
        section: mesh_agent::dump::Section,
        /// The proxy's admin address.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
        /// `text` (tables) or `json` (the dump as served).
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Capture and proxy the traffic of this node's ambient pods.
    Run(Box<RunArgs>),
    /// Run as the L7 waypoint proxy of a Gateway of class istio-waypoint.
    Waypoint(Box<WaypointArgs>),
    /// Run as an ingress gateway: Istio Gateways that select this pod, and the Gateway API
    /// Gateway of class istio named --name (--listen is not used: the gateways' ports are).
    Gateway(Box<GatewayArgs>),
    /// Certificate authority tools.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Authorization tools.
    Authz {
        #[command(subcommand)]
        command: AuthzCommand,
    },
    /// Check a configuration for mistakes, as `istioctl analyze` does: each finding with its
    /// code, level, object and field; exit status 1 when one is an error.
    Analyze(Box<AnalyzeArgs>),
    /// Every node agent, waypoint and ingress gateway the configuration knows: reachable,
    /// whether the configuration it runs is the current one, pods enrolled, certificates,
    /// version (istioctl proxy-status). Exit status 1 unless every one is SYNCED.
    Status(Box<StatusArgs>),
    /// Installation manifests.
    Manifest {
        #[command(subcommand)]
        command: ManifestCommand,
    },
    /// A proxy's configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
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
        Command::Run(args) => {
            let RunArgs {
                node,
                config,
                kubeconfig,
                proc_root,
                cgroup,
                bpffs_dir,
                trust_domain,
                root_namespace,
                ca,
                cert_lifetime,
                sockmap,
                dns_capture,
                worker_threads,
                handshake_timeout,
                hbone_idle_timeout,
                hbone_pool_idle_timeout,
                kubelet_cgroup,
                handoff_socket,
                drain_period,
            } = *args;
            let settings = Settings {
                trust_domain,
                root_namespace,
            };
            let cfg = agent::RunConfig {
                node,
                source: config_source(config, kubeconfig),
                proc_root,
                cgroup,
                settings,
                ca: ca.source()?,
                cert_lifetime,
                sockmap,
                dns_capture,
                limits: mesh_agent::proxy::Limits {
                    handshake_timeout,
                    hbone_idle_timeout,
                    pool_idle_timeout: hbone_pool_idle_timeout,
                    ..Default::default()
                },
                kubelet_cgroups: kubelet_cgroup,
                handoff_socket: handoff_socket
                    .unwrap_or_else(|| mesh_agent::handoff::default_path(&bpffs_dir)),
                pin_dir: bpffs_dir,
                drain_period,
            };
            mesh_agent::runtime::build(worker_threads)?.block_on(agent::run(cfg))
        }
        Command::Waypoint(args) => run_l7(*args, mesh_agent::waypoint::Role::Waypoint),
        Command::Gateway(args) => {
            let GatewayArgs { proxy, pod } = *args;
            run_l7(proxy, mesh_agent::waypoint::Role::Gateway { pod })
        }
        Command::Authz {
            command: AuthzCommand::Check(args),
        } => {
            if !authz_check(*args)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Analyze(args) => {
            if analyze(*args)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Status(args) => {
            if !status(*args)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Config {
            command:
                ConfigCommand::Dump {
                    section,
                    admin,
                    output,
                },
        } => config_dump(section, admin, output),
        Command::Manifest {
            command: ManifestCommand::Generate { profile },
        } => {
            let objects = mesh_agent::manifest::generate(profile)?;
            let text = mesh_agent::manifest::render(&objects)?;
            // Piped into `head` or `less`: a closed pipe ends the output, not in a panic.
            match std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
        Command::Uninstall { bpffs_dir } => agent::uninstall(&bpffs_dir),
        Command::Ca {
            command: CaCommand::Init { out },
        } => agent::ca_init(&out),
        Command::Ca {
            command: CaCommand::Serve(args),
        } => ca_serve(*args),
        Command::Ca {
            command: CaCommand::Credential(args),
        } => ca_credential(*args),
    }
}

/// A configuration read by a command (not a proxy): the state, what could not be read of
/// it, and the digest of the objects (what `status` compares with the proxies').
struct Loaded {
    state: mesh_agent::state::MeshState,
    findings: Vec<mesh_agent::analyze::Finding>,
    digest: mesh_agent::config::sync::ViewDigest,
}

/// The configuration of `files` (read leniently: what cannot be read is in the findings), or
/// what the API server holds.
fn load_state(
    files: &[PathBuf],
    kubeconfig: Option<&std::path::Path>,
    settings: &Settings,
) -> anyhow::Result<Loaded> {
    use mesh_agent::{analyze, config::sync};
    if !files.is_empty() {
        let (objects, mut findings) = analyze::read_files(files);
        let digest = sync::digest(&objects);
        let (state, refused) = analyze::translate_leniently(objects, settings);
        findings.extend(refused);
        return Ok(Loaded {
            state,
            findings,
            digest,
        });
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let client = mesh_agent::config::kube::client_from(kubeconfig).await?;
            let source =
                mesh_agent::config::kube::KubeSource::new(client, "analyze", settings.clone());
            let sync = source.sync();
            let rx = source.start().await?;
            let state = (**rx.borrow()).clone();
            anyhow::Ok(Loaded {
                state,
                findings: Vec::new(),
                digest: sync.snapshot().digest,
            })
        })
}

/// Prints how the request is judged; whether it is allowed.
fn authz_check(args: AuthzCheckArgs) -> anyhow::Result<bool> {
    use mesh_agent::authz_check::{self, RequestSpec};
    let settings = Settings {
        trust_domain: args.trust_domain,
        root_namespace: args.root_namespace,
    };
    let Loaded {
        state, findings, ..
    } = load_state(&args.config, args.kubeconfig.as_deref(), &settings)?;
    for f in findings
        .iter()
        .filter(|f| f.level == mesh_agent::analyze::Level::Error)
    {
        eprintln!("{f}");
    }
    let from = authz_check::find_pod(&state, &args.from)?;
    let (to, port) = authz_check::find_destination(&state, &args.to)?;
    let mut headers = http::HeaderMap::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("--header {h:?}: expected NAME: VALUE"))?;
        headers.append(
            http::HeaderName::try_from(name.trim())?,
            http::HeaderValue::try_from(value.trim())?,
        );
    }
    let wants_request =
        args.method.is_some() || args.path.is_some() || args.host.is_some() || !headers.is_empty();
    let request = wants_request.then(|| RequestSpec {
        method: args.method.unwrap_or_else(|| "GET".into()),
        path: args.path.unwrap_or_else(|| "/".into()),
        host: args.host,
        headers,
    });
    let report = authz_check::check(
        &state,
        &settings.trust_domain,
        from,
        to,
        port,
        request.as_ref(),
    )?;
    print!("{report}");
    Ok(report.allowed())
}

/// Prints the findings over the files, or over what the API server holds; whether one is an
/// error.
fn analyze(args: AnalyzeArgs) -> anyhow::Result<bool> {
    use mesh_agent::analyze;
    let settings = Settings {
        trust_domain: args.trust_domain,
        root_namespace: args.root_namespace,
    };
    let Loaded {
        state,
        mut findings,
        ..
    } = load_state(&args.config, args.kubeconfig.as_deref(), &settings)?;
    findings.extend(analyze::analyze(&state, &settings.trust_domain));
    match args.output {
        Output::Text => print!("{}", analyze::render_text(&findings)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&findings)?),
    }
    Ok(analyze::has_errors(&findings))
}

/// Prints every proxy's standing; whether all are SYNCED.
fn status(args: StatusArgs) -> anyhow::Result<bool> {
    use mesh_agent::status;
    let settings = Settings {
        trust_domain: args.trust_domain,
        root_namespace: args.root_namespace,
    };
    let from_api = args.config.is_empty();
    let loaded = load_state(&args.config, args.kubeconfig.as_deref(), &settings)?;
    for f in loaded
        .findings
        .iter()
        .filter(|f| f.level == mesh_agent::analyze::Level::Error)
    {
        eprintln!("{f}");
    }
    // From the API server, this command reads no Secret (only a gateway does, its own).
    let unread: &[&str] = if from_api { &["Secret"] } else { &[] };
    let rows = status::collect(
        &status::targets(&loaded.state),
        args.port,
        &loaded.digest,
        unread,
    );
    match args.output {
        Output::Text => print!("{}", status::render(&rows, std::time::SystemTime::now())),
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
    }
    Ok(status::all_synced(&rows))
}

/// Prints a proxy's `/config_dump` as tables (or as it is).
fn config_dump(
    section: mesh_agent::dump::Section,
    admin: std::net::SocketAddr,
    output: Output,
) -> anyhow::Result<()> {
    let body = mesh_agent::status::fetch(admin, "/config_dump", mesh_agent::status::TIMEOUT)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    match output {
        Output::Json => println!("{body}"),
        Output::Text => {
            let dump: serde_json::Value = serde_json::from_str(&body)
                .map_err(|e| anyhow::anyhow!("{admin}/config_dump: not JSON: {e}"))?;
            let now = mesh_agent::config::sync::epoch_seconds(std::time::SystemTime::now());
            print!("{}", mesh_agent::dump::render(&dump, section, now));
        }
    }
    Ok(())
}

/// A proxy's `--config FILE`, else the API server of `--kubeconfig` (or in-cluster).
fn config_source(config: Option<PathBuf>, kubeconfig: Option<PathBuf>) -> agent::ConfigSource {
    match config {
        Some(path) => agent::ConfigSource::File(path),
        None => agent::ConfigSource::Kube { kubeconfig },
    }
}

fn ca_serve(args: CaServeArgs) -> anyhow::Result<()> {
    let trusted_node_accounts = args
        .trusted_node_accounts
        .iter()
        .map(|account| {
            account
                .split_once('/')
                .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
                .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
                .ok_or_else(|| {
                    anyhow::anyhow!("--trusted-node-account {account:?}: expected NAMESPACE/NAME")
                })
        })
        .collect::<anyhow::Result<_>>()?;
    let cfg = mesh_agent::ca_service::server::ServeConfig {
        ca_dir: args.ca_dir,
        listen: args.listen,
        source: config_source(args.config, args.kubeconfig),
        settings: Settings {
            trust_domain: args.trust_domain,
            root_namespace: args.root_namespace,
        },
        policy: mesh_agent::ca_service::server::Policy {
            server_names: args.server_names,
            default_lifetime: args.cert_lifetime.min(args.max_cert_lifetime),
            max_lifetime: args.max_cert_lifetime,
            trusted_node_accounts,
            max_connections: args.max_connections.get(),
        },
    };
    mesh_agent::runtime::build(None)?.block_on(mesh_agent::ca_service::server::run(cfg))
}

fn ca_credential(args: CaCredentialArgs) -> anyhow::Result<()> {
    let subject = match (args.node, args.identity) {
        (Some(node), _) => mesh_agent::ca_service::credential::Subject::Node(node),
        (None, Some(identity)) => mesh_agent::ca_service::credential::Subject::Workload(
            identity
                .parse()
                .map_err(|e| anyhow::anyhow!("--identity: {e}"))?,
        ),
        (None, None) => unreachable!("clap requires --node or --identity"),
    };
    mesh_agent::ca_service::credential::write(
        &args.ca_dir,
        &subject,
        &args.trust_domain,
        args.lifetime,
        &args.out,
    )
}

/// Runs the L7 engine as a waypoint or an ingress gateway.
fn run_l7(args: WaypointArgs, role: mesh_agent::waypoint::Role) -> anyhow::Result<()> {
    let cfg = mesh_agent::waypoint::WaypointConfig {
        service_account: args.service_account.unwrap_or_else(|| args.name.clone()),
        name: args.name,
        namespace: args.namespace,
        source: config_source(args.config, args.kubeconfig),
        settings: Settings {
            trust_domain: args.trust_domain,
            root_namespace: args.root_namespace,
        },
        ca: args.ca.source()?,
        cert_lifetime: args.cert_lifetime,
        limits: {
            let mut limits = mesh_agent::proxy::Limits::default();
            if let Some(n) = args.max_handshakes {
                limits.max_handshakes = n.get();
            }
            limits
        },
        access_log: args.access_log_format,
        role,
        tracing: args
            .otlp_endpoint
            .map(|endpoint| mesh_agent::spans::Config {
                endpoint,
                sampling: args.trace_sampling,
            }),
        listen: if args.listen.is_empty() {
            mesh_agent::waypoint::default_listen()
        } else {
            args.listen
        },
    };
    mesh_agent::runtime::build(args.worker_threads)?.block_on(mesh_agent::waypoint::run(cfg))
}
