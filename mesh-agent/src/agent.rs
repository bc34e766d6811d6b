//! The running agent: wires the config source, the kernel datapath, the proxy, enrollment
//! and the admin endpoints together, and keeps reconciling until it is told to stop.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    admin::{self, Handler, Response},
    config::{
        Settings,
        file::FileSource,
        kube::{self, KubeSource},
        sync::SyncStatus,
    },
    ebpf::{self, Datapath},
    enroll::{EnrollOptions, EnrolledDump, Enroller, netns},
    handoff::{self, Listeners},
    identity::SecretManager,
    metrics::Metrics,
    proxy::{Proxy, ProxyParts},
    state::MeshState,
};

/// How often failed enrollments are retried (e.g. a namespace that does not exist yet).
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// The configuration source: a watched file, or the Kubernetes API.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    /// In-cluster configuration, or this kubeconfig.
    Kube {
        kubeconfig: Option<PathBuf>,
    },
}

/// A started configuration source.
pub struct Started {
    /// The state, replaced on every good change.
    pub state: tokio::sync::watch::Receiver<Arc<MeshState>>,
    /// What the source applied last and refused since (`/status`).
    pub sync: Arc<SyncStatus>,
    /// The API server's client, in Kubernetes mode.
    pub client: Option<::kube::Client>,
}

impl ConfigSource {
    /// Reads the configuration for the proxy named `node` (a node, or `waypoint:NS/NAME`)
    /// and keeps watching it; the first read must succeed. `secrets_in`: the namespace whose
    /// TLS Secrets the proxy reads from the API server (an ingress gateway's own).
    pub async fn start(
        &self,
        node: &str,
        settings: &Settings,
        secrets_in: Option<&str>,
    ) -> anyhow::Result<Started> {
        match self {
            ConfigSource::File(path) => {
                let source = FileSource::new(path, node, settings.clone());
                let sync = source.sync();
                let state = source
                    .start()
                    .await
                    .context("initial configuration rejected")?;
                Ok(Started {
                    state,
                    sync,
                    client: None,
                })
            }
            ConfigSource::Kube { kubeconfig } => {
                let client = kube::client_from(kubeconfig.as_deref()).await?;
                let mut source = KubeSource::new(client.clone(), node, settings.clone());
                if let Some(namespace) = secrets_in {
                    source = source.with_secrets_in(namespace);
                }
                let sync = source.sync();
                let state = source
                    .start()
                    .await
                    .context("initial lists from the Kubernetes API")?;
                Ok(Started {
                    state,
                    sync,
                    client: Some(client),
                })
            }
        }
    }
}

/// What `mesh-agent run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub node: String,
    /// Where the Kubernetes objects come from.
    pub source: ConfigSource,
    /// The host's /proc (pod namespace discovery, per-namespace sysctls).
    pub proc_root: PathBuf,
    /// The cgroup whose processes are captured; default: the cgroup v2 root.
    pub cgroup: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub settings: Settings,
    /// Where workload certificates come from.
    pub ca: crate::ca_service::CaSource,
    /// Lifetime of workload certificates (renewed at half-life).
    pub cert_lifetime: Duration,
    /// The kernel's `sk_msg` redirect for the loopback legs and same-node connections
    /// (ADR 006, 016).
    pub sockmap: bool,
    /// Enrolled pods' DNS to the resolver in their namespace, unless a pod's annotation
    /// says otherwise (ADR 015).
    pub dns_capture: bool,
    /// What peers may hold of the proxy (handshakes, idle connections).
    pub limits: crate::proxy::Limits,
    /// The kubelet's cgroups (its probes reach pods without the proxy); empty: the
    /// cgroups, under `cgroup`, of a process named `kubelet`.
    pub kubelet_cgroups: Vec<PathBuf>,
    /// Where a running agent offers its listeners to its successor (ADR 014).
    pub handoff_socket: PathBuf,
    /// How long an agent that handed over waits for its connections to end.
    pub drain_period: Duration,
}

/// Runs until SIGTERM or SIGINT, or until a new agent took its listeners over and the
/// connections it carries ended (ADR 014; a SIGTERM while draining lets the drain run on).
/// On the way out nothing is released: pods stay captured, and fail closed until an agent
/// comes back and adopts the pinned programs.
pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "mesh-agent run must run as root (it loads eBPF programs and enters pod network namespaces)"
        );
    }
    crate::accept::raise_fd_limit();
    netns::init_host().context("opening the agent's own network namespace")?;
    // Before anything is bound: the listeners of an agent still running here, if one is.
    let (listeners, mut predecessor) = take_over(&cfg.handoff_socket).await?;
    let cgroup = match &cfg.cgroup {
        Some(c) => c.clone(),
        None => cgroup2_root()?,
    };
    if !cgroup.join("cgroup.procs").exists() {
        anyhow::bail!("{} is not a cgroup v2 directory", cgroup.display());
    }

    let Started {
        state,
        sync,
        client: kube,
    } = cfg.source.start(&cfg.node, &cfg.settings, None).await?;
    let datapath = Arc::new(Mutex::new(Datapath::install(
        &cfg.pin_dir,
        &cgroup,
        cfg.sockmap,
    )?));
    tracing::info!(cgroup = %cgroup.display(), pin_dir = %cfg.pin_dir.display(), "eBPF programs attached");
    let probers = kubelet_cgroups(&cfg, &cgroup)?;
    datapath
        .lock()
        .expect("datapath lock")
        .set_probers(&probers)?;

    crate::memory::spawn_trimmer(crate::memory::TRIM_INTERVAL);
    let ca = cfg.ca.open().context("opening the certificate authority")?;
    let certs = SecretManager::new(ca, cfg.cert_lifetime);
    let metrics = Arc::new(Metrics::default());
    let (orig_dst, sockmap, dns_servers) = {
        let dp = datapath.lock().expect("datapath lock");
        (dp.orig_dst(), dp.sockmap(), dp.dns_servers())
    };
    let proxy = Arc::new(Proxy::new(
        cfg.node.clone(),
        cfg.settings.clone(),
        cfg.limits.clone(),
        ProxyParts {
            state: state.clone(),
            orig_dst,
            sockets: Arc::new(crate::proxy::sockets::NamespaceSockets),
            sockmap,
            metrics: metrics.clone(),
            certs: certs.clone(),
        },
    ));
    let options = EnrollOptions {
        proc_root: cfg.proc_root.clone(),
        kube,
        dns_capture: cfg.dns_capture,
        resolver: crate::dns::Resolver::new(state.clone(), dns_servers, metrics.clone()),
    };
    let mut enroller = Enroller::new(
        cfg.node.clone(),
        options,
        datapath,
        proxy.clone(),
        listeners.clone(),
    );

    let view = Arc::new(AdminView {
        node: cfg.node.clone(),
        trust_domain: cfg.settings.trust_domain.clone(),
        cgroup: cgroup.clone(),
        pin_dir: cfg.pin_dir.clone(),
        state: state.clone(),
        metrics,
        certs,
        proxy: proxy.clone(),
        status: Mutex::new(Status::default()),
        sync,
    });
    // Metrics and readiness on the node's addresses too, where Prometheus scrapes them
    // (as ztunnel serves 15020 and 15021); the config dump on loopback.
    admin::serve_ports(view.clone(), &listeners).await?;

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut successor = match predecessor {
        None => offer(&cfg.handoff_socket, &listeners),
        Some(_) => None,
    };
    let mut handed_over = false;
    let mut rx = state;
    loop {
        let current = rx.borrow_and_update().clone();
        enroller.reconcile(&current).await;
        // Serving now: the predecessor may stop accepting.
        if let Some(old) = predecessor.take() {
            let unclaimed = listeners.close_unclaimed();
            if !unclaimed.is_empty() {
                tracing::info!(
                    count = unclaimed.len(),
                    "closed inherited listeners no pod here needs"
                );
            }
            match old.release() {
                Ok(()) => tracing::info!("took over from the previous agent; it drains"),
                Err(e) => tracing::warn!(error = %e, "could not tell the previous agent to drain"),
            }
            successor = offer(&cfg.handoff_socket, &listeners);
        }
        *view.status.lock().expect("status lock") = Status {
            ready: enroller.ready(),
            enrolled: enroller.dump(),
            failures: enroller.failures().clone(),
            pending: enroller.pending().clone(),
        };
        let retry = enroller.incomplete();
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(RETRY_INTERVAL), if retry => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
            taken = async { successor.as_mut().expect("guarded").await }, if successor.is_some() => {
                if taken.is_ok() {
                    handed_over = true;
                    break;
                }
                successor = None;
            }
        }
    }
    // Stops the accept loops; the datapath is the successor's from now on.
    enroller.shutdown();
    if handed_over {
        let live = proxy.drain.live();
        tracing::info!(connections = live, period = ?cfg.drain_period, "handed over to the new agent; draining");
        // A surge rollout deletes the old pod once the new one is ready: the first SIGTERM
        // lets the drain run on (the pod's grace period outlasts it); a second, or SIGINT
        // (an operator), ends it now.
        let drained = proxy.drain.drain(cfg.drain_period);
        tokio::pin!(drained);
        let mut terminated = false;
        loop {
            tokio::select! {
                left = &mut drained => {
                    match left {
                        0 => tracing::info!("drained: every connection ended"),
                        left => tracing::warn!(connections = left, "drain period over; closing the connections left"),
                    }
                    break;
                }
                _ = term.recv() => {
                    if terminated {
                        tracing::warn!(connections = proxy.drain.live(), "told to stop while draining");
                        break;
                    }
                    terminated = true;
                    tracing::info!(connections = proxy.drain.live(), "SIGTERM while draining: draining on (another ends it now)");
                }
                _ = int.recv() => {
                    tracing::warn!(connections = proxy.drain.live(), "told to stop while draining");
                    break;
                }
            }
        }
        return Ok(());
    }
    tracing::info!(
        "agent stopping; enrolled pods stay captured and fail closed until an agent returns"
    );
    Ok(())
}

/// The listeners of the agent offering them at `path`, and that agent (to release once
/// this one serves); nothing inherited when no agent offers there.
async fn take_over(path: &Path) -> anyhow::Result<(Arc<Listeners>, Option<handoff::Predecessor>)> {
    let at = path.to_owned();
    let taken = tokio::task::spawn_blocking(move || handoff::take_over(&at))
        .await?
        .with_context(|| format!("taking over the listeners offered at {}", path.display()))?;
    Ok(match taken {
        Some((predecessor, sockets)) => {
            tracing::info!(listeners = sockets.len(), socket = %path.display(), "an agent is running here: taking over its listeners");
            (Listeners::inheriting(sockets), Some(predecessor))
        }
        None => (Listeners::new(), None),
    })
}

/// Offers `listeners` to a successor at `path`; a restart is not hitless if that fails,
/// which is said, not fatal.
fn offer(path: &Path, listeners: &Arc<Listeners>) -> Option<tokio::sync::oneshot::Receiver<()>> {
    handoff::offer(path, listeners.clone())
        .inspect_err(|e| {
            tracing::warn!(socket = %path.display(), error = %e, "cannot offer the listeners to a successor: a restart will refuse connections until it is up")
        })
        .ok()
}

/// The cgroup ids of the node's kubelet: the ones given, or those found under `cgroup`.
/// None found is not an error (the node may have no kubelet), but health probes to pods
/// under STRICT will then be refused: said loudly.
fn kubelet_cgroups(cfg: &RunConfig, cgroup: &Path) -> anyhow::Result<Vec<u64>> {
    let dirs = if cfg.kubelet_cgroups.is_empty() {
        crate::probes::find_kubelet_cgroups(cgroup, &cfg.proc_root)
    } else {
        cfg.kubelet_cgroups.clone()
    };
    if dirs.is_empty() {
        tracing::warn!(
            cgroup = %cgroup.display(),
            "no kubelet process found under the captured cgroup: kubelet health probes to \
             pods under STRICT PeerAuthentication will be refused (--kubelet-cgroup names it)"
        );
    }
    dirs.iter()
        .map(|dir| {
            let id = crate::probes::cgroup_id(dir)
                .with_context(|| format!("kubelet cgroup {}", dir.display()))?;
            tracing::info!(cgroup = %dir.display(), id, "kubelet probes bypass the proxy");
            Ok(id)
        })
        .collect()
}

/// The cgroup v2 mount point, from /proc/mounts (it moves between distributions).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, ty) = (f.next()?, f.next()?, f.next()?);
            (ty == "cgroup2").then(|| PathBuf::from(dir))
        })
        .context("no cgroup v2 hierarchy is mounted (needed to attach the capture programs)")
}

#[derive(Debug, Default)]
struct Status {
    ready: bool,
    enrolled: Vec<EnrolledDump>,
    failures: std::collections::BTreeMap<String, String>,
    /// Pods waiting for their network namespace (not a failure).
    pending: std::collections::BTreeMap<String, String>,
}

struct AdminView {
    node: String,
    /// For `/debug/authz`'s identities.
    trust_domain: String,
    cgroup: PathBuf,
    pin_dir: PathBuf,
    state: tokio::sync::watch::Receiver<Arc<MeshState>>,
    metrics: Arc<Metrics>,
    certs: Arc<SecretManager>,
    proxy: Arc<Proxy>,
    status: Mutex<Status>,
    /// What the configuration source applied last.
    sync: Arc<SyncStatus>,
}

impl AdminView {
    fn config_dump(&self) -> serde_json::Value {
        let status = self.status.lock().expect("status lock");
        let state = self.state.borrow().clone();
        let attached = |ty| ebpf::attached_count(&self.cgroup, ty).ok();
        serde_json::json!({
            "node": self.node,
            "ready": status.ready,
            "enrolled": status.enrolled,
            "failures": status.failures,
            "pending": status.pending,
            "datapath": {
                "cgroup": self.cgroup,
                "pin_dir": self.pin_dir,
                "attached": crate::ebpf::CGROUP_PROGRAMS
                    .iter()
                    .map(|(name, ty)| {
                        let count = attached(*ty);
                        (name.trim_start_matches("mesh_").to_owned(), serde_json::json!(count))
                    })
                    .collect::<serde_json::Map<_, _>>(),
            },
            "certificates": crate::dump::certificates(&self.certs),
            "hbone_pool_connections": self.proxy.pool.connections(),
            "hbone_handshakes_in_progress": self.proxy.handshakes_in_progress(),
            "root_namespace": state.policies().root_namespace(),
            "state": &*state,
        })
    }
}

impl AdminView {
    /// `/status`: what `mesh-agent status` compares.
    fn report(&self) -> crate::status::Report {
        let status = self.status.lock().expect("status lock");
        let captured = self.state.borrow().local_captured(&self.node).count();
        let mut report = crate::status::Report::new(
            crate::status::Role::Node,
            self.node.clone(),
            status.ready,
            self.sync.snapshot(),
            &self.certs,
        );
        report.pods = Some(crate::status::Pods {
            captured,
            enrolled: status.enrolled.len(),
            failed: status.failures.len(),
            pending: status.pending.len(),
        });
        report
    }
}

impl Handler for AdminView {
    fn get_with_query(&self, path: &str, query: &str) -> Response {
        if path != "/debug/authz" {
            return self.get(path);
        }
        let state = self.state.borrow().clone();
        match crate::authz_check::answer_query(&state, &self.trust_domain, query) {
            Ok(report) => Response::ok("text/plain", report.to_string()),
            Err(e) => Response {
                status: 400,
                content_type: "text/plain",
                body: format!("{e}\n"),
            },
        }
    }

    fn get(&self, path: &str) -> Response {
        match path {
            "/config_dump" => Response::ok(
                "application/json",
                serde_json::to_string_pretty(&self.config_dump()).unwrap_or_default(),
            ),
            "/metrics" | "/stats/prometheus" => {
                Response::ok(crate::metrics::CONTENT_TYPE, self.metrics.render())
            }
            "/status" => Response::ok("application/json", self.report().to_json()),
            // Liveness: the process and its runtime answer (unlike readiness, one pod that
            // cannot be enrolled yet does not fail it).
            "/healthz/live" => Response::ok("text/plain", "live\n".into()),
            "/healthz/ready" => {
                let status = self.status.lock().expect("status lock");
                if status.ready {
                    let mut body = String::from("ready\n");
                    for (pod, why) in &status.pending {
                        body.push_str(&format!("{pod}: pending: {why}\n"));
                    }
                    Response::ok("text/plain", body)
                } else {
                    let mut body = String::from("not ready\n");
                    for (pod, why) in &status.failures {
                        body.push_str(&format!("{pod}: {why}\n"));
                    }
                    Response {
                        status: 503,
                        content_type: "text/plain",
                        body,
                    }
                }
            }
            _ => Response::not_found(),
        }
    }
}

/// `mesh-agent ca init`: writes a new development root.
pub fn ca_init(out: &Path) -> anyhow::Result<()> {
    crate::identity::init_ca(out)?;
    println!(
        "wrote a new root certificate and key to {} (use it as --ca-dir)",
        out.display()
    );
    Ok(())
}

/// `mesh-agent uninstall`: detaches and unpins everything under `pin_dir`.
pub fn uninstall(pin_dir: &Path) -> anyhow::Result<()> {
    let removed = ebpf::uninstall(pin_dir)?;
    println!(
        "removed {} links and {} maps from {}",
        removed.links,
        removed.maps,
        pin_dir.display()
    );
    Ok(())
}
