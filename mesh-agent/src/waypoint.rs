//! `mesh-agent waypoint`: the mesh's L7 proxy, run as a pod of its own (Istio ambient's
//! waypoint). Node agents send it, over HBONE, the traffic of the services and workloads
//! bound to it (`istio.io/use-waypoint`), with the service address (or the pod address) as
//! the `CONNECT` authority. For each tunnel it:
//!
//! 1. checks the destination is bound to this waypoint (else 503: it is not an open proxy);
//! 2. reads the port's protocol (Istio's rules, [`crate::state::ServicePort::app_protocol`]):
//!    HTTP is served per request (HTTP/1.1 or HTTP/2, detected), anything else is carried
//!    as bytes to an endpoint with the waypoint's L4 policy;
//! 3. per request ([`request`]): authorization by the policies that target this waypoint
//!    or the service, on the client's identity; routing (HTTPRoute, VirtualService);
//!    faults and mirrors; the endpoint by the DestinationRule's subset, load balancer and
//!    outlier detection ([`upstream`], [`cluster`]); the request forwarded over HBONE to
//!    the endpoint pod with the waypoint's own identity, under the route's timeout and
//!    retries ([`forward`]); Istio's request metrics with `reporter="waypoint"` and an
//!    access-log line ([`access_log`]).
//!
//! It listens on 15008 on every address of its namespace (TLS handshakes bounded as on the
//! node agents), serves readiness (15021) and metrics (15020) on every address, where the
//! kubelet probes and Prometheus scrapes a waypoint pod, and the config dump (15000) on
//! 127.0.0.1.
//!
//! The same engine runs as an ingress gateway (`mesh-agent gateway`, [`Role::Gateway`]):
//! no HBONE listener, the listeners of the gateway objects instead ([`crate::gateway`]),
//! each request a [`request::Tunnel`] whose destination is [`Destination::Gateway`].

pub mod access_log;
pub mod cluster;
pub mod fault;
pub mod flags;
pub mod forward;
pub mod mirror;
pub mod replay;
pub mod request;
pub mod upstream;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Response, StatusCode};
use mesh_common::HBONE_PORT;
use tokio::{net::TcpListener, sync::watch};

use crate::{
    admin::{self, Handler},
    agent::ConfigSource,
    config::Settings,
    ebpf::canonical,
    enroll::netns::Netns,
    identity::{Identity, SecretManager, tls},
    metrics::Metrics,
    proxy::{
        Limits, PodContext,
        hbone::{self, Stream, client::Pool, io::TunnelIo, server},
        sockets::LocalSockets,
    },
    rbac::Target,
    state::{AppProtocol, MeshState, Service, ServicePort, WaypointFor, Workload},
};

/// The GatewayClass every waypoint belongs to.
pub const WAYPOINT_CLASS: &str = crate::config::translate::WAYPOINT_CLASS;

/// What `mesh-agent waypoint` was asked to do.
#[derive(Debug, Clone)]
pub struct WaypointConfig {
    /// The Gateway this process serves.
    pub name: String,
    pub namespace: String,
    /// Its pods' service account (its identity); Istio's default is the Gateway's name.
    pub service_account: String,
    pub source: ConfigSource,
    pub settings: Settings,
    /// Where workload certificates come from.
    pub ca: crate::ca_service::CaSource,
    pub cert_lifetime: Duration,
    pub limits: Limits,
    /// Where the HBONE listener binds (default: every address, port 15008).
    pub listen: Vec<SocketAddr>,
    /// How requests are logged on stdout.
    pub access_log: access_log::Format,
    /// A waypoint, or an ingress gateway.
    pub role: Role,
    /// Where spans go, and how many new traces are sampled; none: no tracing.
    pub tracing: Option<crate::spans::Config>,
}

/// What the L7 engine serves: the mesh's traffic bound to a waypoint, over HBONE; or, as an
/// ingress gateway ([`crate::gateway`]), plain HTTP from outside the mesh on the ports of
/// the gateway objects that select it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Waypoint,
    Gateway {
        /// The gateway's own pod (its labels select Istio Gateways; its address is the
        /// source of the tunnels it opens).
        pod: Option<String>,
    },
}

/// Shared by every tunnel and request.
pub struct Waypoint {
    pub name: String,
    pub namespace: String,
    pub identity: Identity,
    pub settings: Settings,
    pub state: watch::Receiver<Arc<MeshState>>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub upstreams: upstream::Upstreams,
    pub access_log: Arc<access_log::AccessLog>,
    /// One span per request, when tracing is configured.
    pub tracer: Option<Arc<crate::spans::Tracer>>,
    /// Circuit breakers and endpoint health per destination.
    pub clusters: cluster::Clusters,
    /// TLS handshakes in progress on 15008, bounded as on the node agents.
    handshakes: Arc<crate::proxy::handshakes::Handshakes>,
    /// The policy targets that are this waypoint: its Gateway and its GatewayClass.
    own_targets: [Target; 2],
    pub role: Role,
}

/// Runs until SIGTERM or SIGINT.
pub async fn run(cfg: WaypointConfig) -> anyhow::Result<()> {
    crate::accept::raise_fd_limit();
    let node = format!("waypoint:{}/{}", cfg.namespace, cfg.name);
    // An ingress gateway's certificates: the Secrets of its own namespace.
    let secrets_in = matches!(cfg.role, Role::Gateway { .. }).then_some(cfg.namespace.as_str());
    let crate::agent::Started { state, sync, .. } =
        cfg.source.start(&node, &cfg.settings, secrets_in).await?;
    crate::memory::spawn_trimmer(crate::memory::TRIM_INTERVAL);
    let ca = cfg.ca.open().context("opening the certificate authority")?;
    let certs = SecretManager::new(ca, cfg.cert_lifetime);
    let identity = Identity {
        trust_domain: cfg.settings.trust_domain.clone(),
        namespace: cfg.namespace.clone(),
        service_account: cfg.service_account.clone(),
    };
    certs
        .acquire(&identity)
        .await
        .with_context(|| format!("certificate for {identity}"))?;
    let server_tls = tls::server_config(&certs, &identity);

    let mut listeners = Vec::new();
    let hbone = if cfg.role == Role::Waypoint {
        &cfg.listen[..]
    } else {
        &[]
    };
    for addr in hbone {
        listeners.push(
            bind(*addr)
                .await
                .with_context(|| format!("binding the HBONE listener {addr}"))?,
        );
    }
    let local_ip =
        local_address(&state.borrow(), &cfg).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let class = match cfg.role {
        Role::Waypoint => WAYPOINT_CLASS,
        Role::Gateway { .. } => crate::l7::gateways::INGRESS_CLASS,
    };
    let me = Arc::new(PodContext {
        workload: own_workload(&cfg, local_ip),
        identity: identity.clone(),
        netns: Netns::open("/proc/self/ns/net".as_ref())
            .context("opening the own network namespace")?,
        netns_cookie: 0,
        hbone_tls: server_tls.clone(),
    });
    let pool = Pool::new(
        certs.clone(),
        Arc::new(LocalSockets),
        hbone::DEFAULT_MAX_STREAMS,
        cfg.limits.pool_idle_timeout,
    );
    let metrics = Arc::new(Metrics::waypoint());
    let access_log = access_log::AccessLog::new(cfg.access_log);
    access_log.spawn_flusher();
    let tracer = cfg
        .tracing
        .as_ref()
        .map(|config| {
            let proxy = crate::spans::Proxy {
                name: cfg.name.clone(),
                namespace: cfg.namespace.clone(),
                mesh_id: cfg.settings.trust_domain.clone(),
            };
            crate::spans::Tracer::start(config, &proxy)
        })
        .transpose()?;
    let waypoint = Arc::new(Waypoint {
        tracer,
        access_log,
        clusters: cluster::Clusters::default(),
        own_targets: [
            Target::Gateway {
                namespace: cfg.namespace.clone(),
                name: cfg.name.clone(),
            },
            Target::GatewayClass {
                name: class.to_owned(),
            },
        ],
        role: cfg.role.clone(),
        upstreams: upstream::Upstreams::new(pool, me, identity.clone(), local_ip),
        handshakes: crate::proxy::handshakes::Handshakes::new(
            cfg.limits.max_handshakes,
            cfg.limits.max_handshakes_per_source,
        ),
        name: cfg.name.clone(),
        namespace: cfg.namespace.clone(),
        identity,
        settings: cfg.settings.clone(),
        state: state.clone(),
        metrics: metrics.clone(),
        limits: cfg.limits.clone(),
    });
    if cfg.role == Role::Waypoint {
        warn_if_absent(&waypoint, &state.borrow());
        let (watched, mut rx) = (waypoint.clone(), state.clone());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let s = rx.borrow_and_update().clone();
                warn_if_absent(&watched, &s);
            }
        });
        for listener in listeners {
            tokio::spawn(accept_loop(waypoint.clone(), listener, server_tls.clone()));
        }
    } else {
        tokio::spawn(crate::gateway::serve(waypoint.clone()));
    }

    let view = Arc::new(AdminView {
        waypoint: waypoint.clone(),
        sync,
        certs: certs.clone(),
    });
    // Readiness and metrics on the pod's addresses, where the kubelet probes and
    // Prometheus scrapes (as Istio's waypoints serve 15021 and 15020).
    admin::serve_ports(view.clone(), &crate::handoff::Listeners::new()).await?;
    match cfg.role {
        Role::Waypoint => {
            tracing::info!(waypoint = %format!("{}/{}", cfg.namespace, cfg.name), identity = %waypoint.identity, listen = ?cfg.listen, "waypoint ready")
        }
        Role::Gateway { .. } => {
            tracing::info!(gateway = %format!("{}/{}", cfg.namespace, cfg.name), identity = %waypoint.identity, "ingress gateway ready")
        }
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("waypoint stopping");
    Ok(())
}

/// The default listen addresses: port 15008 on every IPv4 and IPv6 address.
pub fn default_listen() -> Vec<SocketAddr> {
    vec![
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), HBONE_PORT),
        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), HBONE_PORT),
    ]
}

pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = crate::proxy::sockets::new_socket(addr.ip())?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// This waypoint's pod address, when the state knows it (the first ready address).
fn local_address(state: &MeshState, cfg: &WaypointConfig) -> Option<IpAddr> {
    if let Role::Gateway { pod } = &cfg.role {
        return pod
            .as_ref()
            .and_then(|p| state.workload(&cfg.namespace, p))
            .and_then(|w| w.ips.first().copied());
    }
    state
        .waypoints
        .iter()
        .find(|w| w.namespace == cfg.namespace && w.name == cfg.name)
        .and_then(|w| w.addresses.first().copied())
}

fn own_workload(cfg: &WaypointConfig, ip: IpAddr) -> Workload {
    Workload {
        uid: format!("{}/{}", cfg.namespace, cfg.name),
        name: cfg.name.clone(),
        namespace: cfg.namespace.clone(),
        node: None,
        service_account: cfg.service_account.clone(),
        ips: vec![ip],
        labels: [(
            crate::state::GATEWAY_NAME_LABEL.to_owned(),
            cfg.name.clone(),
        )]
        .into(),
        workload_name: cfg.name.clone(),
        netns: None,
        captured: false,
        host_network: false,
        dns_capture: None,
        waypoint: None,
    }
}

fn warn_if_absent(waypoint: &Waypoint, state: &MeshState) {
    if !state
        .waypoints
        .iter()
        .any(|w| w.namespace == waypoint.namespace && w.name == waypoint.name)
    {
        tracing::warn!(
            "no Gateway {}/{} of class {WAYPOINT_CLASS} in the configuration: no traffic will be sent here",
            waypoint.namespace,
            waypoint.name
        );
    }
}

async fn accept_loop(
    waypoint: Arc<Waypoint>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
) {
    loop {
        let (stream, peer) = crate::accept::next(&listener, || "waypoint HBONE".into()).await;
        let local = stream.local_addr().map_or(peer.ip(), |a| a.ip());
        let slot = match waypoint
            .handshakes
            .start(canonical(peer.ip()), canonical(local))
        {
            Ok(slot) => slot,
            Err(refused) => {
                // Closed unanswered: the peer holds nothing of ours.
                waypoint.metrics.handshake_refused();
                if let Some(suppressed) = crate::log_limit::once_per_interval!() {
                    tracing::warn!(%peer, suppressed, "waypoint: HBONE connection closed before its handshake: {refused}");
                }
                continue;
            }
        };
        let (waypoint, tls) = (waypoint.clone(), tls.clone());
        tokio::spawn(async move {
            let result = async {
                let (client, connection, turns) =
                    server::handshake(stream, tls, waypoint.limits.handshake_timeout).await?;
                drop(slot);
                // Waypoints are replaced by a rollout, not by a handover: never drained.
                let never = tokio_util::sync::CancellationToken::new();
                turns
                    .count(server::serve_streams(
                        connection,
                        waypoint.limits.hbone_idle_timeout,
                        &never,
                        |req, respond| {
                            let tunnel = TunnelContext {
                                waypoint: waypoint.clone(),
                                peer: SocketAddr::new(canonical(peer.ip()), peer.port()),
                                local: canonical(local),
                                client: client.clone(),
                            };
                            tunnel.handle(req, respond)
                        },
                    ))
                    .await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            }
            .await;
            if let Err(e) = result
                && let Some(suppressed) = crate::log_limit::once_per_interval!()
            {
                tracing::warn!(%peer, error = %e, suppressed, "waypoint: HBONE connection failed");
            }
        });
    }
}

/// What the waypoint serves for one tunnel: a service port or a workload address; or
/// what an ingress gateway serves on one of its ports.
#[derive(Clone, Debug)]
pub enum Destination {
    Service {
        service: Service,
        port: ServicePort,
    },
    Workload {
        workload: Workload,
        port: u16,
    },
    /// A gateway port (`tls`: HTTPS): the routes of the gateways listening on it decide.
    Gateway {
        port: u16,
        tls: bool,
    },
}

impl Destination {
    /// The service the tunnel is for, if any.
    pub fn service(&self) -> Option<&Service> {
        match self {
            Self::Service { service, .. } => Some(service),
            Self::Workload { .. } | Self::Gateway { .. } => None,
        }
    }
}

/// One HBONE connection's view: who is on the other end.
#[derive(Clone)]
pub struct TunnelContext {
    pub waypoint: Arc<Waypoint>,
    /// The tunnel's source (the client pod's address).
    pub peer: SocketAddr,
    /// The waypoint's address the client connected to.
    pub local: IpAddr,
    /// The client's verified identity.
    pub client: Option<Identity>,
}

impl TunnelContext {
    async fn handle(self, req: http::Request<RecvStream>, respond: SendResponse<Bytes>) {
        let Some(target) = server::connect_target(req.method(), req.uri()) else {
            return server::refuse(respond, StatusCode::BAD_REQUEST);
        };
        let state = self.waypoint.state.borrow().clone();
        let Some(destination) = self.waypoint.destination(&state, target) else {
            if let Some(suppressed) = crate::log_limit::once_per_interval!() {
                tracing::info!(peer = %self.peer, %target, suppressed, "waypoint: CONNECT to a destination not bound to this waypoint");
            }
            return server::refuse(respond, StatusCode::SERVICE_UNAVAILABLE);
        };
        let mut respond = respond;
        let send = match respond.send_response(Response::new(()), false) {
            Ok(send) => send,
            Err(_) => return,
        };
        let io = TunnelIo::new(Stream {
            send,
            recv: req.into_body(),
        });
        let protocol = match &destination {
            Destination::Service { port, .. } => port.app_protocol(),
            Destination::Gateway { .. } => AppProtocol::Http,
            Destination::Workload { workload, port } => state
                .services_for_workload(workload)
                .flat_map(|s| s.ports.iter())
                .find(|p| match &p.target_port {
                    crate::state::TargetPort::Number(n) => n == port,
                    crate::state::TargetPort::Named(_) => p.port == *port,
                })
                .map_or(AppProtocol::Tcp, ServicePort::app_protocol),
        };
        let tunnel = Arc::new(request::Tunnel {
            ctx: self,
            target,
            destination,
            handles: Default::default(),
        });
        match protocol {
            AppProtocol::Http => request::serve_http(tunnel, io).await,
            AppProtocol::Tcp => request::serve_tcp(tunnel, io).await,
        }
    }
}

impl Waypoint {
    /// The destination of a `CONNECT` to `target`, if it is bound to this waypoint for that
    /// kind of traffic.
    fn destination(&self, state: &MeshState, target: SocketAddr) -> Option<Destination> {
        let me = state
            .waypoints
            .iter()
            .find(|w| w.namespace == self.namespace && w.name == self.name)?;
        let bound = |r: Option<&crate::state::WaypointRef>| {
            r.is_some_and(|r| r.namespace == self.namespace && r.name == self.name)
        };
        if let Some((service, port)) = state.service_by_vip(target.ip(), target.port()) {
            if bound(service.waypoint.as_ref())
                && matches!(me.traffic, WaypointFor::Service | WaypointFor::All)
            {
                return Some(Destination::Service {
                    service: service.clone(),
                    port: port.clone(),
                });
            }
            return None;
        }
        let workload = state.workload_by_ip(target.ip())?;
        (bound(workload.waypoint.as_ref())
            && matches!(me.traffic, WaypointFor::Workload | WaypointFor::All))
        .then(|| Destination::Workload {
            workload: workload.clone(),
            port: target.port(),
        })
    }

    /// The policy targets for traffic to `destination`: this waypoint, its class, and the
    /// service.
    pub fn targets(&self, destination: &Destination) -> Vec<Target> {
        let mut targets = self.own_targets.to_vec();
        if let Some(s) = destination.service() {
            targets.push(Target::Service {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
            });
        }
        targets
    }
}

struct AdminView {
    waypoint: Arc<Waypoint>,
    /// What the configuration source applied last.
    sync: Arc<crate::config::sync::SyncStatus>,
    certs: Arc<SecretManager>,
}

impl Handler for AdminView {
    fn get(&self, path: &str) -> admin::Response {
        match path {
            "/metrics" | "/stats/prometheus" => {
                admin::Response::ok(crate::metrics::CONTENT_TYPE, self.waypoint.metrics.render())
            }
            "/status" => {
                let role = match self.waypoint.role {
                    Role::Waypoint => crate::status::Role::Waypoint,
                    Role::Gateway { .. } => crate::status::Role::Gateway,
                };
                let name = format!("{}/{}", self.waypoint.namespace, self.waypoint.name);
                let report =
                    crate::status::Report::new(role, name, true, self.sync.snapshot(), &self.certs);
                admin::Response::ok("application/json", report.to_json())
            }
            "/healthz/ready" => admin::Response::ok("text/plain", "ready\n".into()),
            "/healthz/live" => admin::Response::ok("text/plain", "live\n".into()),
            "/config_dump" => {
                let state = self.waypoint.state.borrow().clone();
                let me = state.waypoints.iter().find(|w| {
                    w.namespace == self.waypoint.namespace && w.name == self.waypoint.name
                });
                let bound: Vec<String> = state
                    .services
                    .iter()
                    .filter(|s| {
                        s.waypoint.as_ref().is_some_and(|r| {
                            r.namespace == self.waypoint.namespace && r.name == self.waypoint.name
                        })
                    })
                    .map(|s| format!("{}/{}", s.namespace, s.name))
                    .collect();
                let dump = serde_json::json!({
                    "waypoint": {
                        "namespace": self.waypoint.namespace,
                        "name": self.waypoint.name,
                        "identity": self.waypoint.identity.to_string(),
                        "gateway": me,
                    },
                    "bound_services": bound,
                    "warnings": state.warnings,
                    "upstream_connections": self.waypoint.upstreams.connections(),
                    "certificates": crate::dump::certificates(&self.certs),
                    "root_namespace": state.policies().root_namespace(),
                    "state": &*state,
                });
                admin::Response::ok(
                    "application/json",
                    serde_json::to_string_pretty(&dump).unwrap_or_default(),
                )
            }
            _ => admin::Response::not_found(),
        }
    }
}
