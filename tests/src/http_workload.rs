//! HTTP test workloads for the waypoint suites: an echo server that reports its pod, the
//! request it received and the headers (the Gateway API conformance suite's echo backend
//! does the same), and a client that sends a batch of requests over one keep-alive
//! connection (HTTP/1.1, or HTTP/2 with prior knowledge) and reports each response.

use std::{collections::BTreeMap, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};

/// What the echo server answers (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Echo {
    pub pod: String,
    pub method: String,
    /// Path and query as received.
    pub path: String,
    /// `Host` (HTTP/1.1) or `:authority` (HTTP/2).
    pub host: String,
    pub proto: String,
    /// Lower-case names; repeated headers joined with `,`.
    pub headers: BTreeMap<String, String>,
}

/// Serves the echo on `[::]:port` (dual stack) for HTTP/1.1 and HTTP/2 until killed; gRPC
/// requests go to [`crate::grpc_workload::serve`]. For the resilience cases:
/// `/delay/MS...` answers after MS milliseconds; `/flaky/CODE...` answers CODE to every
/// other request this server gets on such paths (the first included), the echo otherwise;
/// `/fail-on/POD...` answers 500 from the pod named POD. Requests to `/mirror...` are kept
/// (the last 100) and listed by `/seen` as JSON `[[path, host, body bytes], ...]`.
/// `GET /status/CODE` answers CODE; `GET /bytes/N` streams N bytes in 64 KiB chunks;
/// `/trickle/MS` sends its headers and part of its body at once, the rest after MS. The
/// echo reports the request body's length in the `x-body-bytes` response header, and which
/// of the server's connections carried the request (numbered from 1) in `x-connection`.
pub fn serve_echo(port: u16, pod: String) -> Result<Infallible> {
    let listener = crate::workload::bind_dual_stack(port)?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        println!("READY {port}");
        for connection in 1u64.. {
            let (stream, _) = listener.accept().await?;
            let pod = pod.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let pod = pod.clone();
                    async move {
                        Ok::<_, Infallible>(if crate::grpc_workload::is_grpc(&req) {
                            crate::grpc_workload::serve(&pod, req)
                                .await
                                .map(|b| b.map_err(BoxError::from).boxed_unsync())
                        } else {
                            echo(&pod, connection, req)
                                .await
                                .map(|b| b.map_err(|never| match never {}).boxed_unsync())
                        })
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
        unreachable!("2^64 connections")
    })
}

type Body = BoxBody<Bytes, Infallible>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const CHUNK: usize = 64 * 1024;

/// `n` bytes of zeros, streamed in [`CHUNK`]s.
fn zeros(n: u64) -> Body {
    let chunk = Bytes::from(vec![0u8; CHUNK]);
    let mut left = n;
    let stream = futures::stream::poll_fn(move |_| {
        if left == 0 {
            return std::task::Poll::Ready(None);
        }
        let len = left.min(CHUNK as u64) as usize;
        left -= len as u64;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk.slice(..len)))))
    });
    StreamBody::new(stream).boxed()
}

/// `first ` at once, `last` after `pause`: a response whose body outlasts its headers.
fn trickle(pause: Duration) -> Body {
    let mut sleep = Box::pin(tokio::time::sleep(pause));
    let mut sent = 0;
    let stream = futures::stream::poll_fn(move |cx| {
        sent += 1;
        let chunk: &'static [u8] = match sent {
            1 => b"first ",
            2 => {
                if sleep.as_mut().poll(cx).is_pending() {
                    sent -= 1;
                    return std::task::Poll::Pending;
                }
                b"last"
            }
            _ => return std::task::Poll::Ready(None),
        };
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
            chunk,
        )))))
    });
    StreamBody::new(stream).boxed()
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).boxed()
}

/// The requests to `/mirror...` this process received: path, host, body bytes.
static SEEN: std::sync::Mutex<std::collections::VecDeque<(String, String, u64)>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());

/// Requests to `/flaky/...` this process has answered.
static FLAKY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The leading number of `rest` (`"503/x"` → 503).
fn leading_number(rest: &str) -> Option<u64> {
    rest.split(['/', '?']).next()?.parse().ok()
}

async fn echo(pod: &str, connection: u64, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    if let Some(ms) = parts
        .uri
        .path()
        .strip_prefix("/delay/")
        .and_then(leading_number)
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if parts
        .uri
        .path()
        .strip_prefix("/fail-on/")
        .is_some_and(|rest| rest.split('/').next() == Some(pod))
    {
        let mut response = Response::new(full(Bytes::from_static(b"failing on purpose")));
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        return response;
    }
    if let Some(code) = parts
        .uri
        .path()
        .strip_prefix("/flaky/")
        .and_then(leading_number)
        && FLAKY
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(2)
        && let Ok(status) = StatusCode::from_u16(code as u16)
    {
        let mut response = Response::new(full(Bytes::from_static(b"flaky failure")));
        *response.status_mut() = status;
        return response;
    }
    // Read (and drop) the body as it comes, so large uploads stream through.
    let mut body = body;
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => received += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    if parts.uri.path() == "/seen" {
        let seen: Vec<_> = SEEN.lock().expect("seen lock").iter().cloned().collect();
        return Response::new(full(Bytes::from(
            serde_json::to_vec(&seen).unwrap_or_default(),
        )));
    }
    let host = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();
    if parts.uri.path().starts_with("/mirror") {
        let mut seen = SEEN.lock().expect("seen lock");
        if seen.len() == 100 {
            seen.pop_front();
        }
        seen.push_back((parts.uri.path().to_owned(), host.clone(), received));
    }
    if let Some(n) = parts
        .uri
        .path()
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        return Response::new(zeros(n));
    }
    if let Some(ms) = parts
        .uri
        .path()
        .strip_prefix("/trickle/")
        .and_then(leading_number)
    {
        return Response::new(trickle(Duration::from_millis(ms)));
    }
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.to_string());
    let status = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    let echo = Echo {
        pod: pod.to_owned(),
        method: parts.method.to_string(),
        path,
        host,
        proto: format!("{:?}", parts.version),
        headers,
    };
    let mut response = Response::new(full(Bytes::from(
        serde_json::to_vec(&echo).unwrap_or_default(),
    )));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response.headers_mut().insert(
        "x-body-bytes",
        http::HeaderValue::from_str(&received.to_string()).expect("digits"),
    );
    response
        .headers_mut()
        .insert("x-connection", http::HeaderValue::from(connection));
    response
}

/// One request of a batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Call {
    #[serde(default = "get")]
    pub method: String,
    pub path: String,
    /// `Host` header (default: the address).
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// How many times to send it.
    #[serde(default = "one")]
    pub count: usize,
    /// A streamed request body of this many bytes (none when 0).
    #[serde(default)]
    pub upload: u64,
}

fn get() -> String {
    "GET".into()
}

fn one() -> usize {
    1
}

/// One response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    /// The body, when under 1 MiB (else empty: see `bytes`).
    pub body: String,
    /// The body's length, read as it streamed.
    #[serde(default)]
    pub bytes: u64,
}

/// Bodies above this are counted, not kept.
const KEEP_BODY: u64 = 1024 * 1024;

/// Sends every call (each `count` times) over one connection to `to`, HTTP/2 with prior
/// knowledge when `h2`; a call that fails is a reply with status 0 and the error as body,
/// after which a new connection is opened.
pub fn run_calls(
    to: SocketAddr,
    h2: bool,
    calls: &[Call],
    timeout: Duration,
) -> Result<Vec<Reply>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut out = Vec::new();
        let mut sender: Option<Sender> = None;
        for call in calls {
            for _ in 0..call.count {
                let s = match sender.take() {
                    Some(s) => s,
                    None => match tokio::time::timeout(timeout, Sender::connect(to, h2)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            out.push(failed(format!("connect: {e:#}")));
                            continue;
                        }
                        Err(_) => {
                            out.push(failed("connect: timed out".into()));
                            continue;
                        }
                    },
                };
                let mut s = s;
                match tokio::time::timeout(timeout, s.send(to, call)).await {
                    Ok(Ok(reply)) => {
                        out.push(reply);
                        sender = Some(s);
                    }
                    Ok(Err(e)) => out.push(failed(format!("{e:#}"))),
                    Err(_) => out.push(failed("request timed out".into())),
                }
            }
        }
        Ok(out)
    })
}

fn failed(body: String) -> Reply {
    Reply {
        status: 0,
        headers: BTreeMap::new(),
        body,
        bytes: 0,
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

impl Sender {
    async fn connect(to: SocketAddr, h2: bool) -> Result<Self> {
        let stream = tokio::net::TcpStream::connect(to)
            .await
            .with_context(|| format!("connecting to {to}"))?;
        let io = TokioIo::new(stream);
        if h2 {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Ok(Self::H2(sender))
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Ok(Self::H1(sender))
        }
    }

    async fn send(&mut self, to: SocketAddr, call: &Call) -> Result<Reply> {
        let host = call.host.clone().unwrap_or_else(|| to.to_string());
        let uri = match self {
            Self::H1(_) => call.path.clone(),
            Self::H2(_) => format!("http://{host}{}", call.path),
        };
        let mut req = Request::builder().method(call.method.as_str()).uri(uri);
        if matches!(self, Self::H1(_)) {
            req = req.header(http::header::HOST, &host);
        }
        for (k, v) in &call.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let body = if call.upload > 0 {
            zeros(call.upload)
        } else {
            full(Bytes::new())
        };
        let req = req.body(body)?;
        let response = match self {
            Self::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Self::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let (parts, mut body) = response.into_parts();
        let mut kept = Vec::new();
        let mut bytes = 0u64;
        while let Some(frame) = body.frame().await {
            if let Some(d) = frame?.data_ref() {
                bytes += d.len() as u64;
                if bytes <= KEEP_BODY {
                    kept.extend_from_slice(d);
                }
            }
        }
        let body = if bytes <= KEEP_BODY {
            Bytes::from(kept)
        } else {
            Bytes::new()
        };
        Ok(Reply {
            bytes,
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// What an HTTPS GET saw: the status, and the certificate the server presented (DER,
/// hex), with the protocol ALPN chose.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TlsReply {
    pub status: u16,
    pub certificate: String,
    pub alpn: String,
    pub body: String,
}

/// `GET path` over TLS to `to`, sending `sni`, accepting any certificate (the test reads
/// which one was presented), HTTP/1.1.
pub fn tls_get(to: SocketAddr, sni: &str, path: &str, timeout: Duration) -> Result<TlsReply> {
    use tokio_rustls::rustls;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = rustls_pki_types::ServerName::try_from(sni.to_owned())?;
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(to)
                .await
                .with_context(|| format!("connecting to {to}"))?;
            let tls = connector
                .connect(name, tcp)
                .await
                .context("TLS handshake")?;
            let (_, session) = tls.get_ref();
            let certificate: String = session
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.iter().map(|b| format!("{b:02x}")).collect())
                .unwrap_or_default();
            let alpn = session
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            let req = Request::get(path)
                .header(http::header::HOST, sni)
                .body(http_body_util::Empty::<Bytes>::new())?;
            let response = sender.send_request(req).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok(TlsReply {
                status,
                certificate,
                alpn,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .context("timed out")?
    })
}

/// A verifier that takes any certificate: the tests check which one was presented.
#[derive(Debug)]
struct AnyCertificate(Arc<tokio_rustls::rustls::crypto::CryptoProvider>);

impl tokio_rustls::rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> std::result::Result<
        tokio_rustls::rustls::client::danger::ServerCertVerified,
        tokio_rustls::rustls::Error,
    > {
        Ok(tokio_rustls::rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> std::result::Result<
        tokio_rustls::rustls::client::danger::HandshakeSignatureValid,
        tokio_rustls::rustls::Error,
    > {
        tokio_rustls::rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> std::result::Result<
        tokio_rustls::rustls::client::danger::HandshakeSignatureValid,
        tokio_rustls::rustls::Error,
    > {
        tokio_rustls::rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<tokio_rustls::rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
