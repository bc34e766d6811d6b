//! The in-process L4 proxy. Each enrolled pod gets three listeners inside its own network
//! namespace (15001 outbound, 15006 inbound, 15008 HBONE); one runtime serves them all.
//! Per-connection concerns (routing, peer authentication, metrics, access log) are assembled
//! here; the directions live in `outbound`, `inbound` and `hbone`, the byte pump in `copy`.

pub mod copy;
pub mod handshakes;
pub mod hbone;
mod inbound;
mod outbound;
pub mod plan;
mod revocation;
pub mod sockets;
pub mod sockmap;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

use crate::{
    config::Settings,
    ebpf::Sockmap,
    enroll::netns::Netns,
    identity::{Identity, SecretManager},
    metrics::{ConnectionLabels, Metrics, Reporter},
    state::{MeshState, Workload},
};

/// How long an upstream connect may take before the downstream is reset.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The proxy's bounds on what peers may hold, with their defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// How long an HBONE peer has to finish TLS and the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// Handshakes in progress on the node's HBONE listeners, in all and per source address.
    pub max_handshakes: usize,
    pub max_handshakes_per_source: usize,
    /// An HBONE connection with no stream for this long is closed (the clients' pools
    /// drop theirs after a minute).
    pub hbone_idle_timeout: Duration,
    /// A pooled HBONE client connection with no stream for this long is closed.
    pub pool_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(5),
            max_handshakes: 1024,
            max_handshakes_per_source: 32,
            hbone_idle_timeout: Duration::from_secs(120),
            pool_idle_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no original destination recorded for {client} (captured before the agent started?)")]
    NoOriginalDestination { client: SocketAddr },
    #[error("creating a socket in the namespace of pod {pod}: {source}")]
    Socket { pod: String, source: std::io::Error },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {addr}: timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout { addr: SocketAddr },
    #[error("reading from {client}: {source}")]
    Read {
        client: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error(transparent)]
    Hbone(Box<hbone::HboneError>),
}

/// An enrolled pod as the proxy needs it.
pub struct PodContext {
    pub workload: Workload,
    pub identity: Identity,
    pub netns: Netns,
    pub netns_cookie: u64,
    /// TLS server side of the pod's HBONE listener (its certificate, client auth required).
    pub hbone_tls: Arc<rustls::ServerConfig>,
}

impl PodContext {
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.workload.namespace, self.workload.name)
    }
}

/// The listeners of one pod, bound inside its namespace.
#[derive(Debug)]
pub struct PodListeners {
    pub outbound: Vec<TcpListener>,
    pub inbound: Vec<TcpListener>,
    pub hbone: Vec<TcpListener>,
}

/// Shared by every connection.
pub struct Proxy {
    pub node: String,
    pub settings: Settings,
    pub limits: Limits,
    pub state: watch::Receiver<Arc<MeshState>>,
    /// Where captured connections were going.
    pub orig_dst: Arc<dyn OriginalDestinations>,
    /// Creates the sockets the proxy opens for pods.
    pub sockets: Arc<dyn sockets::PodSockets>,
    pub metrics: Arc<Metrics>,
    pub certs: Arc<SecretManager>,
    pub pool: Arc<hbone::client::Pool>,
    /// TLS handshakes in progress on the HBONE listeners of every pod of the node.
    handshakes: Arc<handshakes::Handshakes>,
    /// The kernel's `sk_msg` redirect, when enabled (ADR 006, 016): the loopback legs of
    /// every connection, and same-node connections past the agent; otherwise the agent's
    /// TCP-to-TCP connections take the splice(2) pump of `copy::tcp`.
    sockmap: Option<Arc<Sockmap>>,
    /// The enrolled pods of this node by address (the same-node path): read by every
    /// connection without a lock, replaced whole when a pod comes or goes.
    local_pods: ArcSwap<HashMap<IpAddr, Arc<PodContext>>>,
    /// The connections carried, for a drain after a handover (ADR 014).
    pub drain: crate::drain::Drain,
    /// Round-robin position for service endpoints.
    picks: std::sync::atomic::AtomicUsize,
}

/// Where the proxy learns where a captured connection was going: the kernel's map in the
/// agent, a table in tests without eBPF.
pub trait OriginalDestinations: Send + Sync {
    /// The original destination of the connection from `client` accepted on the outbound
    /// listener of the pod namespace `netns_cookie`, forgotten once read.
    fn take(&self, netns_cookie: u64, client: SocketAddr) -> Option<SocketAddr>;
}

impl OriginalDestinations for crate::ebpf::OrigDstMap {
    fn take(&self, netns_cookie: u64, client: SocketAddr) -> Option<SocketAddr> {
        crate::ebpf::OrigDstMap::take(self, netns_cookie, client)
    }
}

/// What a [`Proxy`] is built from besides its configuration.
pub struct ProxyParts {
    pub state: watch::Receiver<Arc<MeshState>>,
    pub orig_dst: Arc<dyn OriginalDestinations>,
    pub sockets: Arc<dyn sockets::PodSockets>,
    /// The `sk_msg` redirect, when enabled and loaded.
    pub sockmap: Option<Arc<Sockmap>>,
    pub metrics: Arc<Metrics>,
    pub certs: Arc<SecretManager>,
}

impl Proxy {
    pub fn new(node: String, settings: Settings, limits: Limits, parts: ProxyParts) -> Self {
        let ProxyParts {
            state,
            orig_dst,
            sockets,
            sockmap,
            metrics,
            certs,
        } = parts;
        let pool_idle_timeout = limits.pool_idle_timeout;
        Proxy {
            node,
            settings,
            handshakes: handshakes::Handshakes::new(
                limits.max_handshakes,
                limits.max_handshakes_per_source,
            ),
            limits,
            state,
            orig_dst,
            metrics,
            pool: hbone::client::Pool::new(
                certs.clone(),
                sockets.clone(),
                hbone::DEFAULT_MAX_STREAMS,
                pool_idle_timeout,
            ),
            sockets,
            certs,
            picks: std::sync::atomic::AtomicUsize::new(0),
            sockmap,
            local_pods: ArcSwap::default(),
            drain: crate::drain::Drain::default(),
        }
    }

    /// TLS handshakes in progress on the HBONE listeners (for `/config_dump`).
    pub fn handshakes_in_progress(&self) -> usize {
        self.handshakes.in_progress()
    }

    /// The SPIFFE identity of a workload in this trust domain.
    pub fn identity_of(&self, w: &Workload) -> Identity {
        Identity {
            trust_domain: self.settings.trust_domain.clone(),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
        }
    }

    /// The next round-robin position.
    fn next_pick(&self) -> usize {
        self.picks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether `w` is an enrolled pod of this node (its traffic passed through us).
    fn is_local_mesh(&self, w: &Workload) -> bool {
        w.captured && w.node.as_deref() == Some(self.node.as_str())
    }

    /// How connections between two of the agent's TCP sockets are pumped: with the
    /// kernel's redirect on, the sockets of captured and delivery connections receive by
    /// redirect, which splice(2) does not see.
    fn pump(&self) -> copy::Pump {
        if self.sockmap.is_some() {
            copy::Pump::ReadWrite
        } else {
            copy::Pump::Splice
        }
    }

    /// Routes an authorized same-node connection for the kernel's redirect before the
    /// agent connects to the destination; `None` when it is not enabled or the kernel did
    /// not take the client's socket: the caller then pumps the bytes itself ([`Self::pump`]).
    fn sockmap_prepare<'a>(
        &'a self,
        pod: &PodContext,
        downstream: &TcpStream,
        dst: &PodContext,
        delivery: &tokio::net::TcpSocket,
        target: std::net::SocketAddr,
    ) -> Option<Box<sockmap::Prepared<'a>>> {
        // Boxed: the connection's task holds only a pointer while it connects, and
        // connections that are not redirected pay nothing for it.
        let prepared = self.sockmap.as_deref().and_then(|map| {
            sockmap::prepare(
                map,
                pod.netns_cookie,
                downstream,
                dst.netns_cookie,
                delivery,
                target,
            )
            .inspect_err(
                |e| tracing::debug!(error = %e, "sockmap refused; the agent pumps the bytes"),
            )
            .ok()
            .map(Box::new)
        });
        self.metrics.same_node_datapath(prepared.is_some());
        prepared
    }

    /// The enrolled pod of this node that owns `ip`. Lock-free.
    fn local_pod(&self, ip: IpAddr) -> Option<Arc<PodContext>> {
        self.local_pods.load().get(&ip).cloned()
    }

    /// The pod no longer takes same-node connections (released or shutting down).
    pub fn forget_pod(&self, pod: &PodContext) {
        self.local_pods.rcu(|local| {
            let mut local = HashMap::clone(local);
            for ip in &pod.workload.ips {
                local.remove(ip);
            }
            local
        });
    }

    /// Starts the accept loops of a pod; aborting the returned tasks closes its listeners.
    pub fn serve_pod(
        self: &Arc<Self>,
        pod: Arc<PodContext>,
        listeners: PodListeners,
    ) -> Vec<JoinHandle<()>> {
        self.local_pods.rcu(|local| {
            let mut local = HashMap::clone(local);
            for ip in &pod.workload.ips {
                local.insert(*ip, pod.clone());
            }
            local
        });
        let mut tasks = Vec::new();
        for l in listeners.outbound {
            tasks.push(tokio::spawn(outbound::accept_loop(
                self.clone(),
                pod.clone(),
                l,
            )));
        }
        for l in listeners.inbound {
            tasks.push(tokio::spawn(inbound::accept_loop(
                self.clone(),
                pod.clone(),
                l,
            )));
        }
        for l in listeners.hbone {
            tasks.push(tokio::spawn(hbone::server::accept_loop(
                self.clone(),
                pod.clone(),
                l,
            )));
        }
        tasks
    }

    /// The current state, and a receiver of the states after it (a connection admitted
    /// under this state is re-admitted under each later one).
    fn config(&self) -> (Arc<MeshState>, watch::Receiver<Arc<MeshState>>) {
        let mut config = self.state.clone();
        let state = config.borrow_and_update().clone();
        (state, config)
    }
}

/// What is known about a connection's two ends.
struct ConnInfo<'a> {
    src: Option<&'a Workload>,
    dst: Option<&'a Workload>,
    dst_port: u16,
    src_principal: Option<String>,
    dst_principal: Option<String>,
    mutual_tls: bool,
    /// The service dialed (by VIP); else derived from the destination workload.
    service: Option<&'a crate::state::Service>,
}

/// Labels of a connection (either end may be outside the mesh).
fn labels(reporter: Reporter, state: &MeshState, c: &ConnInfo<'_>) -> ConnectionLabels {
    let derived = || {
        c.dst.and_then(|w| {
            state
                .services_for_workload(w)
                .find(|s| s.ports.iter().any(|p| service_port_targets(p, c.dst_port)))
        })
    };
    ConnectionLabels::new(
        reporter,
        c.src,
        c.dst,
        c.service.or_else(derived),
        (c.src_principal.clone(), c.dst_principal.clone()),
        c.mutual_tls,
    )
}

fn service_port_targets(p: &crate::state::ServicePort, port: u16) -> bool {
    match &p.target_port {
        crate::state::TargetPort::Number(n) => *n == port,
        crate::state::TargetPort::Named(_) => p.port == port,
    }
}

/// A connection in flight: counted as opened when created, its bytes counted as they move
/// (through [`meters`]), counted as closed and access-logged once when dropped, whichever
/// way its task ends: finished, aborted (the pod was released) or panicked. Only
/// [`finish`](Self::finish) knows the totals and the error; a record dropped without it
/// says so in the log.
struct Tracked<'a> {
    metrics: &'a Metrics,
    labels: ConnectionLabels,
    bytes: crate::metrics::ByteCounters,
    direction: &'static str,
    src: SocketAddr,
    dst: SocketAddr,
    started: Instant,
    /// Request bytes, response bytes and the error, once finished.
    outcome: Option<(u64, u64, Option<String>)>,
}

impl<'a> Tracked<'a> {
    fn open(
        metrics: &'a Metrics,
        labels: ConnectionLabels,
        direction: &'static str,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Self {
        let bytes = metrics.connection_opened(&labels);
        Tracked {
            metrics,
            labels,
            bytes,
            direction,
            src,
            dst,
            started: Instant::now(),
            outcome: None,
        }
    }

    /// Ends the record: `request` bytes went from source to destination, `response` back,
    /// counted as they moved.
    fn finish(mut self, request: u64, response: u64, error: Option<&std::io::Error>) {
        self.outcome = Some((request, response, error.map(ToString::to_string)));
    }

    /// [`finish`](Self::finish) for bytes that were not counted as they moved (the kernel
    /// redirected them): they are added now.
    fn finish_adding(self, request: u64, response: u64, error: Option<&std::io::Error>) {
        self.bytes.add(request, response);
        self.finish(request, response, error);
    }
}

/// The meters of a pump whose downstream is the connection's source, for `records`.
fn meters(records: &[&Tracked<'_>]) -> copy::Meters {
    copy::Meters {
        downstream_to_upstream: records.iter().map(|r| r.bytes.received.clone()).collect(),
        upstream_to_downstream: records.iter().map(|r| r.bytes.sent.clone()).collect(),
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        let (request, response, error) = self.outcome.take().unwrap_or_else(|| {
            let why = "ended before the proxy finished it (task aborted or panicked)";
            (0, 0, Some(why.to_owned()))
        });
        self.metrics.connection_closed(&self.labels);
        let l = &self.labels;
        tracing::info!(
            target: "access",
            direction = self.direction,
            src.addr = %self.src,
            src.workload = %l.source_workload,
            src.namespace = %l.source_workload_namespace,
            dst.addr = %self.dst,
            dst.workload = %l.destination_workload,
            dst.namespace = %l.destination_workload_namespace,
            dst.service = %l.destination_service,
            src.identity = %l.source_principal,
            dst.identity = %l.destination_principal,
            security = %l.connection_security_policy,
            bytes_sent = response,
            bytes_recv = request,
            duration_ms = self.started.elapsed().as_millis() as u64,
            error,
            "connection complete"
        );
    }
}

/// A socket for `purpose` from `pod`, through the proxy's socket factory.
fn pod_socket(
    sockets: &dyn sockets::PodSockets,
    pod: &PodContext,
    family: IpAddr,
    purpose: sockets::Purpose,
) -> Result<tokio::net::TcpSocket, ProxyError> {
    sockets
        .socket(pod, family, purpose)
        .map_err(|source| ProxyError::Socket {
            pod: pod.display_name(),
            source,
        })
}

async fn connect(socket: tokio::net::TcpSocket, addr: SocketAddr) -> Result<TcpStream, ProxyError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(source)) => Err(ProxyError::Connect { addr, source }),
        Err(_) => Err(ProxyError::ConnectTimeout { addr }),
    }
}

/// Refuses a connection before any byte reached the application: counted and
/// access-logged with the reason; the caller drops the (armed) socket, which resets it.
fn deny(
    metrics: &Metrics,
    dst: &Workload,
    src: SocketAddr,
    to: SocketAddr,
    denial: &crate::admission::Denial,
) {
    metrics.connection_denied(dst, denial.reason());
    tracing::info!(
        target: "access",
        direction = "inbound",
        src.addr = %src,
        dst.addr = %to,
        dst.workload = %dst.workload_name,
        dst.namespace = %dst.namespace,
        reason = denial.reason(),
        "connection denied: {denial}"
    );
}

/// Logs a failed connection of `pod` (rate-limited: any peer can cause these at will).
fn connection_failed(pod: &PodContext, direction: &'static str, error: &dyn std::fmt::Display) {
    if let Some(suppressed) = crate::log_limit::once_per_interval!() {
        tracing::warn!(pod = %pod.display_name(), direction, %error, suppressed, "connection failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> ConnectionLabels {
        ConnectionLabels::new(Reporter::Source, None, None, None, (None, None), false)
    }

    fn closed(metrics: &Metrics) -> Vec<String> {
        metrics
            .render()
            .lines()
            .filter(|l| {
                l.starts_with("istio_tcp_connections_closed_total")
                    || l.starts_with("istio_tcp_received_bytes_total")
            })
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn a_connection_is_recorded_once_whether_finished_dropped_or_panicked() {
        let metrics = Metrics::default();
        let addr: SocketAddr = "10.0.0.1:1".parse().unwrap();
        // Its bytes went through the pump's meters as they moved.
        let record = Tracked::open(&metrics, labels(), "outbound", addr, addr);
        meters(&[&record]).downstream_to_upstream[0].inc_by(3);
        assert_eq!(closed(&metrics), ["3"], "counted while open");
        record.finish(3, 0, None);
        assert_eq!(closed(&metrics), ["1", "3"]);
        // Moved by the kernel: added when it ends.
        Tracked::open(&metrics, labels(), "outbound", addr, addr).finish_adding(2, 0, None);
        assert_eq!(closed(&metrics), ["2", "5"]);
        // Dropped unfinished (its task aborted).
        drop(Tracked::open(&metrics, labels(), "outbound", addr, addr));
        assert_eq!(closed(&metrics), ["3", "5"]);
        // Its task panicked.
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _record = Tracked::open(&metrics, labels(), "outbound", addr, addr);
            panic!("a pump bug");
        }));
        assert!(panicked.is_err());
        assert_eq!(closed(&metrics), ["4", "5"]);
    }
}
