//! Outbound: connections an enrolled pod's applications open, redirected by
//! `cgroup/connect4/6` to the pod's 15001 listener. The proxy looks up the original
//! destination recorded by `sockops`, asks the planner (`plan`) what to do with it, and
//! executes the plan from the pod's own namespace: same-node delivery, an HBONE tunnel
//! (to the destination pod or a waypoint), or passthrough.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

use super::{
    ConnInfo, PodContext, Proxy, ProxyError, Tracked, connect, copy, deny,
    hbone::client::Connect,
    inbound, labels,
    plan::{self, Hbone, Plan},
    pod_socket,
    revocation::revoked,
    sockets::Purpose,
};
use crate::{
    admission::Peer,
    metrics::Reporter,
    state::{MeshState, Service},
};

pub(super) async fn accept_loop(proxy: Arc<Proxy>, pod: Arc<PodContext>, listener: TcpListener) {
    loop {
        let (stream, peer) =
            crate::accept::next(&listener, || format!("{} outbound", pod.display_name())).await;
        // Until the connection ends cleanly, closing it (or the agent dying) resets it.
        copy::reset(&stream);
        let (p, pod) = (proxy.clone(), pod.clone());
        proxy.drain.spawn(async move {
            if let Err(e) = handle(&p, &pod, stream, peer).await {
                super::connection_failed(&pod, "outbound", &e);
            }
        });
    }
}

/// One captured connection: decide, then execute. Every early return drops `downstream`,
/// which resets it (it is armed at accept).
async fn handle(
    proxy: &Proxy,
    pod: &Arc<PodContext>,
    downstream: TcpStream,
    peer: SocketAddr,
) -> Result<(), ProxyError> {
    let orig = proxy
        .orig_dst
        .take(pod.netns_cookie, peer)
        .ok_or(ProxyError::NoOriginalDestination { client: peer })?;
    let _ = downstream.set_nodelay(true);
    let (state, config) = proxy.config();
    let plan = plan::plan(
        &state,
        &proxy.node,
        &proxy.settings.trust_domain,
        &pod.workload,
        orig,
        proxy.next_pick(),
    )?;
    // The pod's own address in the destination's family: the source the destination sees.
    let family = match &plan {
        Plan::SameNode { target, .. } | Plan::Passthrough { target, .. } => *target,
        Plan::Hbone(h) => h.authority,
    };
    let pod_ip = pod
        .workload
        .ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == family.is_ipv4())
        .unwrap_or(peer.ip());
    let call = Call {
        proxy,
        pod,
        state: &state,
        config,
        downstream,
        client: SocketAddr::new(pod_ip, peer.port()),
    };
    match plan {
        Plan::SameNode {
            target,
            workload,
            service,
        } => match proxy.local_pod(target.ip()) {
            Some(dst) => call.same_node(&dst, target, service).await,
            // Known to the state, not enrolled here (yet): its own inbound side takes it.
            None => call.passthrough(target, Some(workload), service).await,
        },
        Plan::Hbone(hbone) => call.hbone(hbone).await,
        Plan::Passthrough {
            target,
            workload,
            service,
        } => call.passthrough(target, workload, service).await,
    }
}

/// What executing a plan needs.
struct Call<'a> {
    proxy: &'a Proxy,
    pod: &'a Arc<PodContext>,
    state: &'a Arc<MeshState>,
    /// The states after `state`, for the revocation of a live connection.
    config: watch::Receiver<Arc<MeshState>>,
    downstream: TcpStream,
    /// The pod's address (in the destination's family) and the application's port.
    client: SocketAddr,
}

impl Call<'_> {
    /// An enrolled pod of this node: the destination's checks are made here (the agent
    /// knows both ends), then the connection is delivered straight into its namespace.
    async fn same_node(
        mut self,
        dst: &Arc<PodContext>,
        target: SocketAddr,
        service: Option<&Service>,
    ) -> Result<(), ProxyError> {
        let (proxy, pod, state) = (self.proxy, self.pod, self.state);
        let src = self.client;
        let peer_id = Peer {
            src,
            dst: target,
            identity: Some(pod.identity.clone()),
        };
        if let Err(denial) = state.policies().admit(&dst.workload, &peer_id) {
            deny(&proxy.metrics, &dst.workload, src, target, &denial);
            return Ok(());
        }
        let socket = inbound::delivery_socket(proxy, dst, src.ip(), target)?;
        let prepared = proxy.sockmap_prepare(pod, &self.downstream, dst, &socket, target);
        let mut upstream = connect(socket, target).await?;
        let info = ConnInfo {
            src: Some(&pod.workload),
            dst: Some(&dst.workload),
            dst_port: target.port(),
            src_principal: Some(pod.identity.to_string()),
            dst_principal: Some(dst.identity.to_string()),
            mutual_tls: true,
            service,
        };
        let revoked = revoked(self.config, dst.clone(), peer_id);
        let as_source = Tracked::open(
            &proxy.metrics,
            labels(Reporter::Source, state, &info),
            "outbound",
            src,
            target,
        );
        let as_destination = Tracked::open(
            &proxy.metrics,
            labels(Reporter::Destination, state, &info),
            "inbound",
            src,
            target,
        );
        match prepared {
            // The kernel moves most bytes: counted when the connection ends.
            Some(prepared) => {
                let redirected = prepared.start();
                let outcome = redirected.run(&self.downstream, &upstream, revoked).await;
                proxy.metrics.redirect_forwarded(outcome.forwarded_by_agent);
                let (t, error) = (outcome.transferred, outcome.error);
                for record in [as_source, as_destination] {
                    record.finish_adding(
                        t.downstream_to_upstream,
                        t.upstream_to_downstream,
                        error.as_ref(),
                    );
                }
            }
            None => {
                let meters = super::meters(&[&as_source, &as_destination]);
                let (t, error) = copy::tcp(
                    &mut self.downstream,
                    &mut upstream,
                    proxy.pump(),
                    &meters,
                    revoked,
                )
                .await;
                for record in [as_source, as_destination] {
                    record.finish(
                        t.downstream_to_upstream,
                        t.upstream_to_downstream,
                        error.as_ref(),
                    );
                }
            }
        }
        Ok(())
    }

    /// HBONE through `plan.hop` (the destination pod's 15008 or a waypoint's), the tunnel
    /// starting in the pod's namespace, from the pod's address.
    async fn hbone(mut self, plan: Hbone<'_>) -> Result<(), ProxyError> {
        let (proxy, pod, state) = (self.proxy, self.pod, self.state);
        // What the application already sent rides with the CONNECT.
        let early = copy::early_read(&self.downstream).map_err(|source| ProxyError::Read {
            client: self.client,
            source,
        })?;
        let sent_early = early.len();
        let mut tunnel = proxy
            .pool
            .tunnel(
                pod,
                &pod.identity,
                &plan.hop_identity,
                Connect {
                    hbone: plan.hop,
                    target: plan.authority,
                    client: self.client,
                    early,
                },
            )
            .await
            .map_err(|e| ProxyError::Hbone(Box::new(e)))?;
        let info = ConnInfo {
            src: Some(&pod.workload),
            dst: plan.workload,
            dst_port: plan.authority.port(),
            src_principal: Some(pod.identity.to_string()),
            dst_principal: Some(plan.hop_identity.to_string()),
            mutual_tls: true,
            service: plan.service,
        };
        let tracked = Tracked::open(
            &proxy.metrics,
            labels(Reporter::Source, state, &info),
            "outbound",
            self.client,
            plan.authority,
        );
        let meters = super::meters(&[&tracked]);
        let (t, error) = copy::tcp_to_tunnel(
            &mut self.downstream,
            &mut tunnel.stream,
            sent_early,
            &meters,
            copy::never(),
        )
        .await;
        tracked.finish(
            t.downstream_to_upstream,
            t.upstream_to_downstream,
            error.as_ref(),
        );
        Ok(())
    }

    /// Connected from the pod's namespace to `target` as it is (marked, so capture skips
    /// the agent's own socket). A same-node enrolled destination's inbound side takes it.
    async fn passthrough(
        mut self,
        target: SocketAddr,
        workload: Option<&crate::state::Workload>,
        service: Option<&Service>,
    ) -> Result<(), ProxyError> {
        let (proxy, pod, state) = (self.proxy, self.pod, self.state);
        let socket = pod_socket(&*proxy.sockets, pod, target.ip(), Purpose::Passthrough)?;
        let mut upstream = connect(socket, target).await?;
        // The connection as the destination sees it: from the pod's address.
        let src = upstream.local_addr().unwrap_or(self.client);
        // A same-node enrolled destination: our own inbound side takes it, identity known.
        let local_mesh = workload.filter(|w| proxy.is_local_mesh(w));
        let info = ConnInfo {
            src: Some(&pod.workload),
            dst: workload,
            dst_port: target.port(),
            src_principal: Some(pod.identity.to_string()),
            dst_principal: local_mesh.map(|w| proxy.identity_of(w).to_string()),
            mutual_tls: local_mesh.is_some(),
            service,
        };
        let tracked = Tracked::open(
            &proxy.metrics,
            labels(Reporter::Source, state, &info),
            "outbound",
            src,
            target,
        );
        let meters = super::meters(&[&tracked]);
        let (t, error) = copy::tcp(
            &mut self.downstream,
            &mut upstream,
            proxy.pump(),
            &meters,
            copy::never(),
        )
        .await;
        tracked.finish(
            t.downstream_to_upstream,
            t.upstream_to_downstream,
            error.as_ref(),
        );
        Ok(())
    }
}
