//! `mesh-agent gateway`: the waypoint's L7 engine serving traffic from outside the mesh, as
//! Istio's ingress gateway does. The gateway objects that run here are Istio `Gateway`s
//! whose `selector` matches this gateway's pod labels and the Gateway API `Gateway` of
//! class `istio` named as this gateway ([`crate::l7::gateways`]); their HTTP listeners are
//! bound on every address of the pod, following configuration changes. Each request is
//! served as a waypoint serves one ([`crate::waypoint::request`]): routed by the
//! VirtualServices and HTTPRoutes bound to the gateway that takes its `Host`, sent over
//! HBONE with the gateway's own identity to the endpoints, reported with
//! `reporter="source"` as Istio's gateways report.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    ebpf::canonical,
    l7::gateways::{GatewayKey, IngressGateway, Listener, Protocol},
    state::MeshState,
    waypoint::{Destination, Role, TunnelContext, Waypoint, request},
};

/// Binds and unbinds the gateway's listeners as the configuration says, until the state
/// sender is gone.
pub async fn serve(wp: Arc<Waypoint>) {
    let mut rx = wp.state.clone();
    let mut bound: BTreeMap<u16, Vec<JoinHandle<()>>> = BTreeMap::new();
    loop {
        let state = rx.borrow_and_update().clone();
        let wanted: BTreeSet<u16> = running(&wp, &state)
            .flat_map(|g| g.listeners.iter())
            .filter(|l| l.protocol == Protocol::Http)
            .map(|l| l.port)
            .collect();
        if wanted.is_empty() {
            tracing::warn!(gateway = %format!("{}/{}", wp.namespace, wp.name), "ingress gateway: no gateway object selects this gateway; nothing is served");
        }
        bound.retain(|port, tasks| {
            let keep = wanted.contains(port);
            if !keep {
                tasks.iter().for_each(JoinHandle::abort);
                tracing::info!(port, "ingress gateway: listener closed");
            }
            keep
        });
        for port in wanted {
            if bound.contains_key(&port) {
                continue;
            }
            match bind(port).await {
                Ok(listeners) => {
                    tracing::info!(port, "ingress gateway: listening");
                    let tasks = listeners
                        .into_iter()
                        .map(|l| tokio::spawn(accept_loop(wp.clone(), l, port)))
                        .collect();
                    bound.insert(port, tasks);
                }
                // Tried again at the next configuration change.
                Err(e) => {
                    tracing::error!(port, error = %e, "ingress gateway: cannot listen; this port is not served")
                }
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// The gateway objects this gateway runs: selected by its pod's labels (Istio's), or named
/// as it (the Gateway API's).
fn running<'a>(wp: &Waypoint, state: &'a MeshState) -> impl Iterator<Item = &'a IngressGateway> {
    let pod = match &wp.role {
        Role::Gateway { pod: Some(pod) } => state.workload(&wp.namespace, pod),
        _ => None,
    };
    let labels = pod.map(|w| w.labels.clone()).unwrap_or_default();
    let own: GatewayKey = (wp.namespace.clone(), wp.name.clone());
    state
        .routes()
        .ingress_gateways()
        .iter()
        .filter(move |g| g.runs_on(&labels, &own))
}

/// The HTTP listeners on `port` of the gateway objects this gateway runs, with their
/// gateway, in the order the objects sort in.
pub fn listeners(wp: &Waypoint, state: &MeshState, port: u16) -> Vec<(GatewayKey, Listener)> {
    running(wp, state)
        .flat_map(|g| {
            g.listeners
                .iter()
                .filter(|l| l.port == port && l.protocol == Protocol::Http)
                .map(|l| (g.key.clone(), l.clone()))
        })
        .collect()
}

/// `port` on every IPv6 and IPv4 address.
async fn bind(port: u16) -> std::io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    for ip in [
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    ] {
        listeners.push(crate::waypoint::bind(SocketAddr::new(ip, port)).await?);
    }
    Ok(listeners)
}

async fn accept_loop(wp: Arc<Waypoint>, listener: TcpListener, port: u16) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(port, error = %e, "ingress gateway: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().map_or(peer.ip(), |a| a.ip());
        let tunnel = Arc::new(request::Tunnel {
            ctx: TunnelContext {
                waypoint: wp.clone(),
                peer: SocketAddr::new(canonical(peer.ip()), peer.port()),
                local: canonical(local),
                client: None,
            },
            target: SocketAddr::new(canonical(local), port),
            destination: Destination::Gateway { port },
            handles: Default::default(),
        });
        tokio::spawn(request::serve_http(tunnel, stream));
    }
}
