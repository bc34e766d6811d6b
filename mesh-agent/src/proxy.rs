//! The in-process L4 proxy. Each enrolled pod gets three listeners inside its own network
//! namespace (15001 outbound, 15006 inbound, 15008 HBONE); one runtime serves them all.
//! Per-connection concerns (destination lookup, metrics, access log) are assembled here;
//! the directions live in `outbound` and `inbound`, the byte pump in `copy`.

mod copy;
mod inbound;
mod outbound;

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

use crate::{
    ebpf::Datapath,
    enroll::netns::Netns,
    metrics::{ConnectionLabels, Metrics, Reporter},
    state::{MeshState, Workload},
};

/// How long an upstream connect may take before the downstream is reset.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
}

/// An enrolled pod as the proxy needs it.
#[derive(Debug)]
pub struct PodContext {
    pub workload: Workload,
    pub netns: Netns,
    pub netns_cookie: u64,
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
    pub state: watch::Receiver<Arc<MeshState>>,
    pub datapath: Arc<Mutex<Datapath>>,
    pub metrics: Arc<Metrics>,
}

impl Proxy {
    /// Starts the accept loops of a pod; aborting the returned tasks closes its listeners.
    pub fn serve_pod(
        self: &Arc<Self>,
        pod: Arc<PodContext>,
        listeners: PodListeners,
    ) -> Vec<JoinHandle<()>> {
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
            tasks.push(tokio::spawn(inbound::hbone_accept_loop(pod.clone(), l)));
        }
        tasks
    }

    fn state(&self) -> Arc<MeshState> {
        self.state.borrow().clone()
    }
}

/// Labels of a connection from `src` to `dst` (either may be outside the mesh).
fn labels(
    reporter: Reporter,
    state: &MeshState,
    src: Option<&Workload>,
    dst: Option<&Workload>,
    dst_port: u16,
) -> ConnectionLabels {
    let unknown = || "unknown".to_owned();
    let service = dst
        .and_then(|w| {
            state
                .services_for_workload(w)
                .find(|s| s.ports.iter().any(|p| service_port_targets(p, dst_port)))
        })
        .map_or_else(unknown, |s| {
            format!("{}.{}.svc.cluster.local", s.name, s.namespace)
        });
    ConnectionLabels {
        reporter,
        source_workload: src.map_or_else(unknown, |w| w.workload_name.clone()),
        source_workload_namespace: src.map_or_else(unknown, |w| w.namespace.clone()),
        destination_workload: dst.map_or_else(unknown, |w| w.workload_name.clone()),
        destination_workload_namespace: dst.map_or_else(unknown, |w| w.namespace.clone()),
        destination_service: service,
    }
}

fn service_port_targets(p: &crate::state::ServicePort, port: u16) -> bool {
    match &p.target_port {
        crate::state::TargetPort::Number(n) => *n == port,
        crate::state::TargetPort::Named(_) => p.port == port,
    }
}

/// A connection in flight: counted as opened now, as closed (with its bytes) on `finish`,
/// and access-logged once.
struct Tracked<'a> {
    metrics: &'a Metrics,
    labels: ConnectionLabels,
    direction: &'static str,
    src: SocketAddr,
    dst: SocketAddr,
    started: Instant,
}

impl<'a> Tracked<'a> {
    fn open(
        metrics: &'a Metrics,
        labels: ConnectionLabels,
        direction: &'static str,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Self {
        metrics.connection_opened(&labels);
        Tracked {
            metrics,
            labels,
            direction,
            src,
            dst,
            started: Instant::now(),
        }
    }

    fn finish(self, t: copy::Transferred, error: Option<std::io::Error>) {
        self.metrics.connection_closed(
            &self.labels,
            t.downstream_to_upstream,
            t.upstream_to_downstream,
        );
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
            bytes_sent = t.upstream_to_downstream,
            bytes_recv = t.downstream_to_upstream,
            duration_ms = self.started.elapsed().as_millis() as u64,
            error = error.as_ref().map(tracing::field::display),
            "connection complete"
        );
    }
}

/// Creates a TCP socket inside the pod's namespace, marked so capture skips it.
fn pod_socket(
    pod: &PodContext,
    family: IpAddr,
    configure: impl FnOnce(&socket2::Socket) -> std::io::Result<()>,
) -> Result<tokio::net::TcpSocket, ProxyError> {
    let err = |source| ProxyError::Socket {
        pod: pod.display_name(),
        source,
    };
    let domain = if family.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = pod
        .netns
        .run(|| {
            socket2::Socket::new(
                domain,
                socket2::Type::STREAM.nonblocking(),
                Some(socket2::Protocol::TCP),
            )
        })
        .map_err(err)?
        .map_err(err)?;
    configure(&socket).map_err(err)?;
    Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
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

/// Accept errors that concern one connection only (keep accepting).
fn transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    )
}

/// Backs off when the process is out of descriptors instead of spinning.
async fn accept_backoff(pod: &PodContext, listener: &str, e: std::io::Error) {
    if !transient_accept_error(&e) {
        tracing::warn!(pod = %pod.display_name(), listener, error = %e, "accept failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
