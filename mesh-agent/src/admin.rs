//! The node-local admin endpoints: `/config_dump` (15000), `/metrics` and `/status` (15020)
//! and `/healthz/ready` (15021), served by hyper over HTTP/1.1 on 127.0.0.1 of the agent's
//! namespace. A request head must arrive within [`HEADER_TIMEOUT`]: a client that opens a
//! connection and sends nothing (or a byte at a time) does not hold it for ever.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::handoff::{ListenerKey, Listeners};

/// How long a client has to send a request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// What an endpoint returns.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn ok(content_type: &'static str, body: String) -> Self {
        Response {
            status: 200,
            content_type,
            body,
        }
    }
    pub fn not_found() -> Self {
        Response {
            status: 404,
            content_type: "text/plain",
            body: "not found\n".into(),
        }
    }
}

/// Answers a GET for a path.
pub trait Handler: Send + Sync + 'static {
    fn get(&self, path: &str) -> Response;

    /// A GET with a query string (`/debug/authz?from=…`); by default the query is ignored.
    fn get_with_query(&self, path: &str, _query: &str) -> Response {
        self.get(path)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("admin endpoint {addr}: {source}")]
pub struct AdminError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds `addr` now (so a taken port is a start-up error), or takes it from what a
/// predecessor passed (ADR 014), and serves it in the background until a successor takes
/// it over.
pub async fn serve(
    addr: SocketAddr,
    handler: Arc<dyn Handler>,
    listeners: &Arc<Listeners>,
) -> Result<SocketAddr, AdminError> {
    serve_with(addr, handler, HEADER_TIMEOUT, listeners).await
}

/// Serves a proxy's three admin ports as Istio's proxies do: the config dump (15000) on
/// 127.0.0.1 only; metrics (15020) and readiness (15021) on every address, where
/// Prometheus scrapes and the kubelet probes. 15020 also answers `/status`, what
/// `mesh-agent status` asks (identities, counts and digests: nothing the metrics do not
/// show already).
/// Each port answers only its own paths: the config dump and `/debug/*` never leave
/// loopback.
pub async fn serve_ports(
    handler: Arc<dyn Handler>,
    listeners: &Arc<Listeners>,
) -> Result<(), AdminError> {
    use mesh_common::{ADMIN_PORT, METRICS_PORT, READINESS_PORT};
    use std::net::{Ipv4Addr, Ipv6Addr};
    serve(
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), ADMIN_PORT),
        handler.clone(),
        listeners,
    )
    .await?;
    for (port, paths) in [
        (
            METRICS_PORT,
            &["/metrics", "/stats/prometheus", "/status"][..],
        ),
        (READINESS_PORT, &["/healthz/ready", "/healthz/live"][..]),
    ] {
        let only = Arc::new(Only {
            paths,
            inner: handler.clone(),
        });
        serve(
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port),
            only,
            listeners,
        )
        .await?;
    }
    Ok(())
}

/// A handler that answers `paths` only (404 for the rest).
struct Only {
    paths: &'static [&'static str],
    inner: Arc<dyn Handler>,
}

impl Handler for Only {
    fn get(&self, path: &str) -> Response {
        if self.paths.contains(&path) {
            self.inner.get(path)
        } else {
            Response::not_found()
        }
    }

    fn get_with_query(&self, path: &str, query: &str) -> Response {
        if self.paths.contains(&path) {
            self.inner.get_with_query(path, query)
        } else {
            Response::not_found()
        }
    }
}

async fn serve_with(
    addr: SocketAddr,
    handler: Arc<dyn Handler>,
    header_timeout: Duration,
    listeners: &Arc<Listeners>,
) -> Result<SocketAddr, AdminError> {
    let error = |source| AdminError { addr, source };
    let netns = crate::sys::current_netns_cookie().map_err(error)?;
    let listening = listeners
        .listen(ListenerKey::tcp(netns, addr), || bind(addr))
        .map_err(error)?;
    let listener = TcpListener::from_std(listening.socket.into()).map_err(error)?;
    let bound = listener.local_addr().map_err(error)?;
    let (listeners, offered) = (listeners.clone(), listening.registration);
    tokio::spawn(async move {
        let _offered = offered;
        loop {
            let (stream, _) = tokio::select! {
                accepted = crate::accept::next(&listener, || format!("admin {bound}")) => accepted,
                () = listeners.handed_over() => return,
            };
            let handler = handler.clone();
            let service = service_fn(move |request| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(answer(&request, &*handler)) }
            });
            tokio::spawn(
                http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Ok(bound)
}

/// A listening socket at `addr`, as `TcpListener::bind` makes it.
fn bind(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket)
}

fn answer(request: &Request<Incoming>, handler: &dyn Handler) -> http::Response<Full<Bytes>> {
    let response = if request.method() == Method::GET {
        let uri = request.uri();
        handler.get_with_query(uri.path(), uri.query().unwrap_or_default())
    } else {
        Response {
            status: 405,
            content_type: "text/plain",
            body: "method not allowed\n".into(),
        }
    };
    let mut http = http::Response::new(Full::new(Bytes::from(response.body)));
    *http.status_mut() =
        StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    http.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(response.content_type),
    );
    http
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_answers_only_its_own_paths() {
        struct Everything;
        impl Handler for Everything {
            fn get(&self, _: &str) -> Response {
                Response::ok("text/plain", "secret\n".into())
            }
        }
        let metrics = Only {
            paths: &["/metrics"],
            inner: Arc::new(Everything),
        };
        assert_eq!(metrics.get("/metrics").status, 200);
        assert_eq!(metrics.get("/config_dump").status, 404);
        assert_eq!(
            metrics.get_with_query("/debug/authz", "from=a/b").status,
            404
        );
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Paths;

    impl Handler for Paths {
        fn get(&self, path: &str) -> Response {
            match path {
                "/healthz/ready" => Response::ok("text/plain", "ready\n".into()),
                _ => Response::not_found(),
            }
        }
    }

    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_get_refuses_other_methods_and_drops_a_stalled_head() {
        let local = "127.0.0.1:0".parse().unwrap();
        let addr = serve_with(
            local,
            Arc::new(Paths),
            Duration::from_millis(200),
            &Listeners::new(),
        )
        .await
        .unwrap();
        let ok = exchange(addr, b"GET /healthz/ready?x=1 HTTP/1.1\r\nhost: a\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.ends_with("\r\n\r\nready\n") && ok.contains("text/plain"),
            "{ok}"
        );
        let missing = exchange(addr, b"GET /nope HTTP/1.1\r\nhost: a\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = exchange(
            addr,
            b"POST /healthz/ready HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        // Half a request head, then nothing: the server closes the connection.
        let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
        stalled.write_all(b"GET /healthz/re").await.unwrap();
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(3), stalled.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "a stalled request head kept its connection");
    }
}
