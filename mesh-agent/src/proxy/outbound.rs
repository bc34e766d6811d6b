//! Outbound: connections an enrolled pod's applications open, redirected by
//! `cgroup/connect4/6` to the pod's 15001 listener. The proxy looks up the original
//! destination recorded by `sockops` and connects to it from the pod's own namespace.

use std::{net::SocketAddr, sync::Arc};

use mesh_common::PROXY_MARK;
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
                        tracing::warn!(pod = %pod.display_name(), direction = "outbound", error = %e, "connection failed");
                    }
                });
            }
            Err(e) => accept_backoff(&pod, "outbound", e).await,
        }
    }
}

async fn handle(
    proxy: &Proxy,
    pod: &PodContext,
    mut downstream: TcpStream,
    peer: SocketAddr,
) -> Result<(), ProxyError> {
    let orig = proxy
        .datapath
        .lock()
        .expect("datapath lock")
        .take_orig_dst(pod.netns_cookie, peer)
        .ok_or(ProxyError::NoOriginalDestination { client: peer })?;
    let _ = downstream.set_nodelay(true);
    let state = proxy.state();
    let dst_workload = state.workload_by_ip(orig.ip());

    let socket = pod_socket(pod, orig.ip(), |s| s.set_mark(PROXY_MARK))?;
    let mut upstream = connect(socket, orig).await?;
    // The connection as the destination sees it: from the pod's address.
    let src = upstream.local_addr().unwrap_or(peer);

    let labels = labels(
        Reporter::Source,
        &state,
        Some(&pod.workload),
        dst_workload,
        orig.port(),
    );
    let tracked = Tracked::open(&proxy.metrics, labels, "outbound", src, orig);
    let (t, error) = copy::bidirectional(&mut downstream, &mut upstream).await;
    tracked.finish(t, error);
    Ok(())
}
