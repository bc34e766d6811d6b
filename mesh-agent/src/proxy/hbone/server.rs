//! The HBONE server on 15008 inside each enrolled pod: terminates mutual TLS with the pod's
//! certificate, learns the client's SPIFFE identity from its certificate, and for each
//! `CONNECT` whose authority is one of the pod's own `ip:port` delivers the stream to the
//! application (200), answering 400 to a malformed request or an agent port and 503 when the
//! target is not the pod's or cannot be reached. Handshakes are bounded in number
//! (`handshakes`) and time (TLS and the HTTP/2 preface together); a connection that carries
//! no stream for the idle timeout is closed.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use futures::FutureExt;
use h2::{RecvStream, server::SendResponse};
use http::{Method, Request, Response, StatusCode};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Notify,
};

use super::{
    CONNECTION_WINDOW, MAX_FRAME, MAX_HEADER_LIST, SERVER_MAX_STREAMS, STREAM_WINDOW, Stream,
    batch::{Batched, Turns},
};
use crate::{
    admission::Peer,
    ebpf::canonical,
    identity::{Identity, tls},
    metrics::Reporter,
    proxy::{
        ConnInfo, PodContext, Proxy, Tracked, copy, handshakes, inbound, labels,
        revocation::revoked,
    },
};

pub(crate) async fn accept_loop(proxy: Arc<Proxy>, pod: Arc<PodContext>, listener: TcpListener) {
    loop {
        let (stream, peer) =
            crate::accept::next(&listener, || format!("{} hbone", pod.display_name())).await;
        let local = stream.local_addr().map_or(peer.ip(), |a| a.ip());
        let slot = match proxy
            .handshakes
            .start(canonical(peer.ip()), canonical(local))
        {
            Ok(slot) => slot,
            Err(refused) => {
                // Closed unanswered: the peer holds nothing of ours.
                proxy.metrics.handshake_refused();
                if let Some(suppressed) = crate::log_limit::once_per_interval!() {
                    tracing::warn!(pod = %pod.display_name(), %peer, suppressed, "HBONE connection closed before its handshake: {refused}");
                }
                continue;
            }
        };
        let (p, pod) = (proxy.clone(), pod.clone());
        proxy.drain.spawn(async move {
            if let Err(e) = serve_connection(p, pod.clone(), stream, peer, slot).await
                && let Some(suppressed) = crate::log_limit::once_per_interval!()
            {
                tracing::warn!(pod = %pod.display_name(), %peer, error = %e, suppressed, "HBONE connection failed");
            }
        });
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A server-side HBONE connection after its handshake.
pub(crate) type Connection =
    h2::server::Connection<Batched<tokio_rustls::server::TlsStream<TcpStream>>, Bytes>;

/// Mutual TLS then the HTTP/2 preface, together within `timeout`: the client's verified
/// identity, the connection, and the turns the task that serves it must count (its
/// writes are batched per turn, `batch`).
pub(crate) async fn handshake(
    stream: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    timeout: std::time::Duration,
) -> Result<(Option<Identity>, Connection, Turns), BoxError> {
    let _ = stream.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshake = async {
        let tls = acceptor.accept(stream).await?;
        let client = tls::peer_identity(tls.get_ref().1);
        let (io, turns) = Batched::new(tls);
        let connection = h2_server().handshake::<_, Bytes>(io).await?;
        Ok::<_, BoxError>((client, connection, turns))
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(done) => done,
        Err(_) => Err("handshake timed out".into()),
    }
}

/// HTTP/2 as the HBONE server speaks it: its windows, frame size, streams and header list.
pub fn h2_server() -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(SERVER_MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST);
    builder
}

/// The target of an HBONE request: a `CONNECT` to an IP address and port (a host name is
/// not a target), canonical (IPv4-mapped IPv6 as IPv4).
pub fn connect_target(method: &Method, uri: &http::Uri) -> Option<SocketAddr> {
    if method != Method::CONNECT {
        return None;
    }
    let target = uri.authority()?.as_str().parse::<SocketAddr>().ok()?;
    Some(SocketAddr::new(canonical(target.ip()), target.port()))
}

/// What a node proxy's HBONE server makes of a request to the pod with `pod_ips`: the
/// target, or the status it is refused with and why.
pub fn pod_target(
    method: &Method,
    uri: &http::Uri,
    pod_ips: &[std::net::IpAddr],
) -> Result<SocketAddr, (StatusCode, &'static str)> {
    let target =
        connect_target(method, uri).ok_or((StatusCode::BAD_REQUEST, "malformed request"))?;
    if !pod_ips.contains(&target.ip()) {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "target is not this pod's"));
    }
    if mesh_common::is_agent_pod_port(target.port()) {
        return Err((
            StatusCode::BAD_REQUEST,
            "target is an agent port (self call)",
        ));
    }
    Ok(target)
}

async fn serve_connection(
    proxy: Arc<Proxy>,
    pod: Arc<PodContext>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: handshakes::Slot,
) -> Result<(), BoxError> {
    // TLS and the HTTP/2 preface both count against the handshake's time and place.
    let (client, connection, turns) = handshake(
        stream,
        pod.hbone_tls.clone(),
        proxy.limits.handshake_timeout,
    )
    .await?;
    drop(slot);
    let drain = proxy.drain.signal().clone();
    turns
        .count(serve_streams(
            connection,
            proxy.limits.hbone_idle_timeout,
            &drain,
            |request, respond| {
                let (proxy, pod, client) = (proxy.clone(), pod.clone(), client.clone());
                handle(proxy, pod, peer, client, request, respond)
            },
        ))
        .await?;
    Ok(())
}

/// Accepts the connection's streams, each handled by the future `open` returns (spawned),
/// until the peer ends the connection or it carries no stream for `idle_timeout`, when it
/// is closed (GOAWAY). Once `drain` is cancelled (the process hands over to a successor)
/// the peer is told to open no more streams here (GOAWAY); the streams it opened before it
/// heard are served, and the connection ends with the last of them. Accepting drives the
/// connection: every stream's frames move while this runs.
pub async fn serve_streams<T, F, Fut>(
    mut connection: h2::server::Connection<T, Bytes>,
    idle_timeout: std::time::Duration,
    drain: &tokio_util::sync::CancellationToken,
    mut open: F,
) -> Result<(), h2::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    F: FnMut(Request<RecvStream>, SendResponse<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let streams = Arc::new(Streams::default());
    let mut idle_since = Some(tokio::time::Instant::now());
    let mut draining = false;
    loop {
        // A draining connection ends with its streams, not on the idle timer.
        let idle_deadline = idle_since
            .filter(|_| !draining)
            .map(|since| since + idle_timeout);
        tokio::select! {
            request = connection.accept() => {
                let Some(request) = request else { break };
                let (request, respond) = request?;
                idle_since = None;
                let guard = streams.open();
                // `map`, not an async block awaiting it: a future moved into an async block
                // and awaited there is stored twice, which doubled each tunnel's memory.
                let task = open(request, respond).map(move |()| drop(guard));
                tokio::spawn(task);
            }
            () = drain.cancelled(), if !draining => {
                draining = true;
                connection.graceful_shutdown();
            }
            () = streams.idle.notified(), if idle_since.is_none() => {
                if streams.open.load(Ordering::Acquire) == 0 {
                    idle_since = Some(tokio::time::Instant::now());
                }
            }
            () = sleep_until_some(idle_deadline) => {
                connection.graceful_shutdown();
                // Streams opened meanwhile are refused by the shutdown; drive it to the end.
                while let Some(request) = connection.accept().await {
                    let (_request, respond) = request?;
                    refuse(respond, StatusCode::SERVICE_UNAVAILABLE);
                }
                break;
            }
        }
    }
    Ok(())
}

/// The streams open on one HBONE connection; `idle` is notified when the last one ends.
#[derive(Default)]
struct Streams {
    open: AtomicUsize,
    idle: Notify,
}

/// One open stream; dropping it closes it.
struct StreamGuard(Arc<Streams>);

impl Streams {
    fn open(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_one();
        }
    }
}

/// Sleeps until `deadline`; forever when there is none.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Answers a `CONNECT` with `code` and ends the stream.
pub fn refuse(mut respond: SendResponse<Bytes>, code: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = code;
    // Fails only if the client already reset the stream: nothing left to tell.
    let _ = respond.send_response(response, true);
}

async fn handle(
    proxy: Arc<Proxy>,
    pod: Arc<PodContext>,
    peer: SocketAddr,
    client: Option<Identity>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let target = match pod_target(req.method(), req.uri(), &pod.workload.ips) {
        Ok(target) => target,
        Err((code, why)) => {
            tracing::info!(pod = %pod.display_name(), %peer, method = %req.method(), uri = %req.uri(), "HBONE: {why}");
            return refuse(respond, code);
        }
    };
    // The application sees the client pod's address: the tunnel's own source.
    let source = SocketAddr::new(canonical(peer.ip()), peer.port());
    let (state, config) = proxy.config();
    let authz_peer = Peer {
        src: source,
        dst: target,
        identity: client.clone(),
    };
    if let Err(denial) = state.policies().admit(&pod.workload, &authz_peer) {
        proxy
            .metrics
            .connection_denied(&pod.workload, denial.reason());
        tracing::info!(
            target: "access",
            direction = "inbound",
            src.addr = %source,
            dst.addr = %target,
            src.identity = client.as_ref().map(tracing::field::display),
            dst.workload = %pod.workload.workload_name,
            dst.namespace = %pod.workload.namespace,
            reason = denial.reason(),
            "connection denied: {denial}"
        );
        return refuse(respond, StatusCode::UNAUTHORIZED);
    }
    let mut app = match inbound::deliver(&proxy, &pod, source.ip(), target).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(pod = %pod.display_name(), %peer, %target, error = %e, "HBONE: target unreachable");
            return refuse(respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => {
            tracing::info!(pod = %pod.display_name(), %peer, error = %e, "HBONE: stream closed before the tunnel opened");
            return;
        }
    };
    let mut tunnel = Stream {
        send,
        recv: req.into_body(),
    };
    let revoked = revoked(config, pod.clone(), authz_peer);
    let src_workload = state.workload_by_ip(peer.ip());
    let info = ConnInfo {
        src: src_workload,
        dst: Some(&pod.workload),
        dst_port: target.port(),
        src_principal: client.as_ref().map(ToString::to_string),
        dst_principal: Some(pod.identity.to_string()),
        mutual_tls: true,
        service: None,
    };
    let labels = labels(Reporter::Destination, &state, &info);
    let tracked = Tracked::open(&proxy.metrics, labels, "inbound", peer, target);
    // Downstream here is the application: what it sends is the response.
    let request_first = crate::proxy::meters(&[&tracked]);
    let meters = copy::Meters {
        downstream_to_upstream: request_first.upstream_to_downstream,
        upstream_to_downstream: request_first.downstream_to_upstream,
    };
    let (t, error) = copy::tcp_to_tunnel(&mut app, &mut tunnel, 0, &meters, revoked).await;
    tracked.finish(
        t.upstream_to_downstream,
        t.downstream_to_upstream,
        error.as_ref(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_proxy_serves_connects_to_its_pod_and_refuses_the_rest_with_a_reason() {
        let pod: [std::net::IpAddr; 2] = ["10.1.0.7".parse().unwrap(), "fd00::7".parse().unwrap()];
        let uri = |s: &str| s.parse::<http::Uri>().unwrap();
        let ok = |m: Method, u: &str| pod_target(&m, &uri(u), &pod);
        assert_eq!(
            ok(Method::CONNECT, "10.1.0.7:8080"),
            Ok("10.1.0.7:8080".parse().unwrap())
        );
        assert_eq!(
            ok(Method::CONNECT, "[fd00::7]:80"),
            Ok("[fd00::7]:80".parse().unwrap())
        );
        assert_eq!(
            ok(Method::CONNECT, "[::ffff:10.1.0.7]:8080"),
            Ok("10.1.0.7:8080".parse().unwrap()),
            "IPv4-mapped is the IPv4 address"
        );
        let refused = [
            (Method::GET, "10.1.0.7:8080", StatusCode::BAD_REQUEST),
            (Method::CONNECT, "web.shop:8080", StatusCode::BAD_REQUEST),
            (
                Method::CONNECT,
                "10.1.0.8:8080",
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (Method::CONNECT, "10.1.0.7:15008", StatusCode::BAD_REQUEST),
            (Method::CONNECT, "10.1.0.7:15001", StatusCode::BAD_REQUEST),
        ];
        for (method, target, code) in refused {
            assert_eq!(
                ok(method.clone(), target).map_err(|(c, _)| c),
                Err(code),
                "{method} {target}"
            );
        }
    }
}
