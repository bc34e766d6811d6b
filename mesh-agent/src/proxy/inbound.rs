//! Inbound: connections to an enrolled pod's addresses, steered by `sk_lookup` into the
//! pod's 15006 listener. The accepted socket's local address is the original destination;
//! the proxy delivers to the application over the pod's `lo`, from the client's own address
//! (transparent bind, replies routed back by the delivery mark).

use std::{net::SocketAddr, sync::Arc};

use mesh_common::DELIVERY_MARK;
use tokio::net::{TcpListener, TcpStream};

use super::{
    PodContext, Proxy, ProxyError, Tracked, accept_backoff, connect, copy, labels, pod_socket,
};
use crate::metrics::Reporter;

pub(super) async fn accept_loop(proxy: Arc<Proxy>, pod: Arc<PodContext>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let (proxy, pod) = (proxy.clone(), pod.clone());
                tokio::spawn(async move {
                    if let Err(e) = handle(&proxy, &pod, stream, peer).await {
                        tracing::warn!(pod = %pod.display_name(), direction = "inbound", error = %e, "connection failed");
                    }
                });
            }
            Err(e) => accept_backoff(&pod, "inbound", e).await,
        }
    }
}

async fn handle(
    proxy: &Proxy,
    pod: &PodContext,
    mut downstream: TcpStream,
    peer: SocketAddr,
) -> Result<(), ProxyError> {
    let orig = downstream
        .local_addr()
        .map_err(|source| ProxyError::Socket {
            pod: pod.display_name(),
            source,
        })?;
    let _ = downstream.set_nodelay(true);
    let state = proxy.state();
    let src_workload = state.workload_by_ip(peer.ip());

    let socket = pod_socket(pod, orig.ip(), |s| {
        if peer.is_ipv4() {
            s.set_ip_transparent_v4(true)?;
        } else {
            s.set_ip_transparent_v6(true)?;
        }
        s.set_mark(DELIVERY_MARK)?;
        s.bind(&SocketAddr::new(peer.ip(), 0).into())
    })?;
    let mut upstream = connect(socket, orig).await?;

    let labels = labels(
        Reporter::Destination,
        &state,
        src_workload,
        Some(&pod.workload),
        orig.port(),
    );
    let tracked = Tracked::open(&proxy.metrics, labels, "inbound", peer, orig);
    let (t, error) = copy::bidirectional(&mut downstream, &mut upstream).await;
    tracked.finish(t, error);
    Ok(())
}

/// HBONE (mutual TLS, HTTP/2 CONNECT) terminates here once identities exist; until then the
/// port is held so nothing else can take it, and connections are refused with a log line.
pub(super) async fn hbone_accept_loop(pod: Arc<PodContext>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tracing::warn!(pod = %pod.display_name(), %peer, "HBONE connection refused: mTLS identities not configured");
                let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
            }
            Err(e) => accept_backoff(&pod, "hbone", e).await,
        }
    }
}
