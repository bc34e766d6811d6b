//! Outbound: connections an enrolled pod's applications open, redirected by
//! `cgroup/connect4/6` to the pod's 15001 listener. The proxy looks up the original
//! destination recorded by `sockops` and connects to it from the pod's own namespace.

use std::{net::SocketAddr, sync::Arc};

use mesh_common::{HBONE_PORT, PROXY_MARK};
use tokio::net::{TcpListener, TcpStream};

use super::{
    ConnInfo, PodContext, Proxy, ProxyError, Route, Tracked, accept_backoff, authorize::Peer,
    connect, copy, deny, inbound, labels, pod_socket, self_call,
};
use crate::{lb, metrics::Reporter};

pub(super) async fn accept_loop(proxy: Arc<Proxy>, pod: Arc<PodContext>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Until the connection ends cleanly, closing it (or the agent dying) resets it.
                copy::reset(&stream);
                let (proxy, pod) = (proxy.clone(), pod.clone());
                tokio::spawn(async move {
                    if let Err(e) = handle(&proxy, &pod, stream, peer).await {
                        super::connection_failed(&pod, "outbound", &e);
                    }
                });
            }
            Err(e) => accept_backoff(&pod, "outbound", e).await,
        }
    }
}

async fn handle(
    proxy: &Proxy,
    pod: &Arc<PodContext>,
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
    // A service VIP: the proxy balances over the ready endpoints itself (capture happens
    // before any kube-proxy rule could). The application still sees the VIP it dialed.
    let vip = orig;
    let service = state.service_by_vip(orig.ip(), orig.port());
    let orig = match service {
        None => orig,
        Some((svc, port)) => {
            let endpoints = lb::ready_endpoints(&state, svc, port);
            match lb::pick(&endpoints, orig.ip(), proxy.next_pick()) {
                Some(endpoint) => endpoint,
                None => {
                    return Err(ProxyError::NoEndpoints {
                        service: format!("{}/{}", svc.namespace, svc.name),
                        vip,
                    });
                }
            }
        }
    };
    if self_call(&state, orig) {
        return Err(ProxyError::SelfCall { addr: orig });
    }
    let service_name =
        service.map(|(s, _)| format!("{}.{}.svc.cluster.local", s.name, s.namespace));
    let dst_workload = state.workload_by_ip(orig.ip());
    // The pod's own address in the destination's family: the source the destination sees.
    let pod_ip = pod
        .workload
        .ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == orig.is_ipv4())
        .unwrap_or(peer.ip());
    match proxy.route(orig.ip(), dst_workload) {
        Route::Local { dst } => {
            let src_ip = pod_ip;
            let src = SocketAddr::new(src_ip, peer.port());
            // The destination side's checks, done here: the agent knows both ends.
            let peer_id = Peer {
                src,
                dst: orig,
                identity: Some(pod.identity.clone()),
            };
            if let Err(denial) = proxy.authz.policy(&state).admit(&dst.workload, &peer_id) {
                deny(&proxy.metrics, &dst.workload, src, orig, &denial);
                return Ok(());
            }
            let delivered = match inbound::delivery_socket(&dst, src_ip, orig) {
                Ok(socket) => {
                    let prepared = proxy.sockmap_prepare(pod, &downstream, &dst, &socket, orig);
                    connect(socket, orig).await.map(|u| (u, prepared))
                }
                Err(e) => Err(e),
            };
            let (mut upstream, prepared) = match delivered {
                Ok(d) => d,
                Err(e) => return Err(e),
            };
            let info = ConnInfo {
                src: Some(&pod.workload),
                dst: Some(&dst.workload),
                dst_port: orig.port(),
                src_principal: Some(pod.identity.to_string()),
                dst_principal: Some(dst.identity.to_string()),
                mutual_tls: true,
                service: service_name.clone(),
            };
            let live = proxy.authz.register(&dst.workload, peer_id);
            let as_source = Tracked::open(
                &proxy.metrics,
                labels(Reporter::Source, &state, &info),
                "outbound",
                src,
                orig,
            );
            let as_destination = Tracked::open(
                &proxy.metrics,
                labels(Reporter::Destination, &state, &info),
                "inbound",
                src,
                orig,
            );
            let (t, error) = match prepared {
                Some(prepared) => {
                    let redirected = prepared.start(&upstream).await;
                    let outcome = redirected.run(&downstream, &upstream, live.closed()).await;
                    proxy.metrics.redirect_forwarded(outcome.forwarded_by_agent);
                    (outcome.transferred, outcome.error)
                }
                None => copy::tcp(&mut downstream, &mut upstream, live.closed()).await,
            };
            as_source.finish(
                t.downstream_to_upstream,
                t.upstream_to_downstream,
                error.as_ref(),
            );
            as_destination.finish(
                t.downstream_to_upstream,
                t.upstream_to_downstream,
                error.as_ref(),
            );
        }
        Route::Hbone { dst } => {
            // The tunnel starts in the pod's namespace, so its source is the pod's address.
            let src = pod_ip;
            let hbone = SocketAddr::new(orig.ip(), HBONE_PORT);
            let client = SocketAddr::new(src, peer.port());
            let mut tunnel = match proxy
                .pool
                .tunnel(pod, &pod.identity, &dst, hbone, orig, client)
                .await
            {
                Ok(t) => t,
                Err(e) => return Err(ProxyError::Hbone(Box::new(e))),
            };
            let info = ConnInfo {
                src: Some(&pod.workload),
                dst: dst_workload,
                dst_port: orig.port(),
                src_principal: Some(pod.identity.to_string()),
                dst_principal: Some(dst.to_string()),
                mutual_tls: true,
                service: service_name.clone(),
            };
            let tracked = Tracked::open(
                &proxy.metrics,
                labels(Reporter::Source, &state, &info),
                "outbound",
                client,
                orig,
            );
            let (t, error) =
                copy::tcp_to_tunnel(&mut downstream, &mut tunnel.stream, copy::never()).await;
            tracked.finish(
                t.downstream_to_upstream,
                t.upstream_to_downstream,
                error.as_ref(),
            );
        }
        Route::Direct => {
            let socket = pod_socket(pod, orig.ip(), |s| {
                s.set_mark(PROXY_MARK)?;
                // Reset on close until the connection ended cleanly (see `copy::reset`).
                s.set_linger(Some(std::time::Duration::ZERO))
            })?;
            let mut upstream = match connect(socket, orig).await {
                Ok(u) => u,
                Err(e) => return Err(e),
            };
            // The connection as the destination sees it: from the pod's address.
            let src = upstream.local_addr().unwrap_or(peer);
            // Same-node enrolled destination: our own inbound side takes it, identity known.
            let local_mesh = dst_workload.filter(|w| proxy.is_local_mesh(w));
            let info = ConnInfo {
                src: Some(&pod.workload),
                dst: dst_workload,
                dst_port: orig.port(),
                src_principal: Some(pod.identity.to_string()),
                dst_principal: local_mesh.map(|w| proxy.identity_of(w).to_string()),
                mutual_tls: local_mesh.is_some(),
                service: service_name.clone(),
            };
            let tracked = Tracked::open(
                &proxy.metrics,
                labels(Reporter::Source, &state, &info),
                "outbound",
                src,
                orig,
            );
            let (t, error) = copy::tcp(&mut downstream, &mut upstream, copy::never()).await;
            tracked.finish(
                t.downstream_to_upstream,
                t.upstream_to_downstream,
                error.as_ref(),
            );
        }
    }
    Ok(())
}
