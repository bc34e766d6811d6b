//! Inbound: connections to an enrolled pod's addresses, steered by `sk_lookup` into the
//! pod's 15006 listener. The accepted socket's local address is the original destination;
//! the proxy delivers to the application over the pod's `lo`, from the client's own address
//! (transparent bind, replies routed back by the delivery mark).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::net::{TcpListener, TcpStream};

use super::{
    ConnInfo, PodContext, Proxy, ProxyError, Tracked, connect, copy, deny, labels, pod_socket,
    revocation::revoked,
};
use crate::admission::Peer;
use crate::{ebpf::canonical, metrics::Reporter};

pub(super) async fn accept_loop(proxy: Arc<Proxy>, pod: Arc<PodContext>, listener: TcpListener) {
    loop {
        let (stream, peer) =
            crate::accept::next(&listener, || format!("{} inbound", pod.display_name())).await;
        // Until the connection ends cleanly, closing it (or the agent dying) resets it.
        copy::reset(&stream);
        let (p, pod) = (proxy.clone(), pod.clone());
        proxy.drain.spawn(async move {
            if let Err(e) = handle(&p, &pod, stream, peer).await {
                super::connection_failed(&pod, "inbound", &e);
            }
        });
    }
}

async fn handle(
    proxy: &Proxy,
    pod: &Arc<PodContext>,
    mut downstream: TcpStream,
    peer: SocketAddr,
) -> Result<(), ProxyError> {
    let orig = downstream
        .local_addr()
        .map_err(|source| ProxyError::Socket {
            pod: pod.display_name(),
            source,
        })?;
    let orig = SocketAddr::new(canonical(orig.ip()), orig.port());
    let _ = downstream.set_nodelay(true);
    let (state, config) = proxy.config();
    let src_workload = state.workload_by_ip(peer.ip());
    // Plaintext reaching 15006 is authenticated only when it comes from an enrolled pod of
    // this node: then it went through this agent's own outbound side (same-node path).
    let local_mesh = src_workload.filter(|w| proxy.is_local_mesh(w));
    let authz_peer = Peer {
        src: peer,
        dst: orig,
        identity: local_mesh.map(|w| proxy.identity_of(w)),
    };
    if let Err(denial) = state.policies().admit(&pod.workload, &authz_peer) {
        deny(&proxy.metrics, &pod.workload, peer, orig, &denial);
        return Ok(());
    }
    let mut upstream = match deliver(proxy, pod, peer.ip(), orig).await {
        Ok(u) => u,
        Err(e) => return Err(e),
    };
    let info = ConnInfo {
        src: src_workload,
        dst: Some(&pod.workload),
        dst_port: orig.port(),
        src_principal: authz_peer.identity.as_ref().map(ToString::to_string),
        dst_principal: Some(pod.identity.to_string()),
        mutual_tls: local_mesh.is_some(),
        service: None,
    };
    let labels = labels(Reporter::Destination, &state, &info);
    let tracked = Tracked::open(&proxy.metrics, labels, "inbound", peer, orig);
    let revoked = revoked(config, pod.clone(), authz_peer);
    let meters = super::meters(&[&tracked]);
    let (t, error) = copy::tcp(
        &mut downstream,
        &mut upstream,
        proxy.pump(),
        &meters,
        revoked,
    )
    .await;
    tracked.finish(
        t.downstream_to_upstream,
        t.upstream_to_downstream,
        error.as_ref(),
    );
    Ok(())
}

/// Connects to the application at `target` over the pod's `lo`, from `client` (the real
/// client address, transparently bound), marked so the replies come back the same way.
pub(crate) async fn deliver(
    proxy: &Proxy,
    pod: &PodContext,
    client: IpAddr,
    target: SocketAddr,
) -> Result<TcpStream, ProxyError> {
    connect(delivery_socket(proxy, pod, client, target)?, target).await
}

/// The socket [`deliver`] connects, bound (its local address is known) but not connected.
/// A target on one of the agent's own ports is refused ([`super::plan::PlanError::SelfCall`]).
pub(crate) fn delivery_socket(
    proxy: &Proxy,
    pod: &PodContext,
    client: IpAddr,
    target: SocketAddr,
) -> Result<tokio::net::TcpSocket, ProxyError> {
    // The pod's own agent listens there: delivering would accept the connection again.
    if mesh_common::is_agent_pod_port(target.port()) {
        return Err(super::plan::PlanError::SelfCall { addr: target }.into());
    }
    pod_socket(
        &*proxy.sockets,
        pod,
        target.ip(),
        super::sockets::Purpose::Delivery { client },
    )
}
