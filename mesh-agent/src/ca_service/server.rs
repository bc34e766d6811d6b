//! `mesh-agent ca serve`: the only process that holds the CA's key. It answers Istio's
//! `CreateCertificate` over HTTP/2 and TLS: authenticates the caller (a client certificate
//! signed by this CA — a node credential or a workload certificate — or, in Kubernetes mode,
//! a service-account token checked with a TokenReview), decides what it may have from the
//! mesh's state ([`super::authorize`]) and signs.

use std::{
    collections::BTreeSet, convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc,
    time::Duration,
};

use anyhow::Context;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};

use super::{
    authorize::{self, Caller, Denied},
    grpc::{self, CertificateRequest, CertificateResponse, Code, Status},
};
use crate::{
    agent::{ConfigSource, Started},
    config::Settings,
    identity::{CertificateAuthority, FileCa, Identity, ca::SubjectName, crypto_provider, tls},
    state::MeshState,
};

/// Lifetime of the certificate the service presents; renewed at half of it.
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A client has this long for TLS, and a request this long to arrive whole.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The audience Istio's proxies request their tokens for.
pub const TOKEN_AUDIENCE: &str = "istio-ca";

pub struct ServeConfig {
    /// The CA's files (either layout, see [`FileCa`]).
    pub ca_dir: PathBuf,
    pub listen: SocketAddr,
    /// Where the mesh's objects come from (which pods run where).
    pub source: ConfigSource,
    pub settings: Settings,
    pub policy: Policy,
}

/// What the service presents, grants and holds.
#[derive(Clone, Debug)]
pub struct Policy {
    /// DNS names in the certificate the service presents (clients verify one of them).
    pub server_names: Vec<String>,
    /// Lifetime of a certificate when the request names none.
    pub default_lifetime: Duration,
    /// The longest lifetime granted.
    pub max_lifetime: Duration,
    /// Service accounts (namespace, name) whose tokens authenticate a node agent
    /// (Kubernetes mode), as istiod's `CA_TRUSTED_NODE_ACCOUNTS`.
    pub trusted_node_accounts: BTreeSet<(String, String)>,
    /// Connections held at once, handshaking or open; one beyond is closed at once.
    pub max_connections: usize,
}

/// Streams (requests) at once on one connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// An HTTP/2 ping every this long; a peer that does not answer within it is dropped.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// Runs the service until SIGTERM or SIGINT.
pub async fn run(cfg: ServeConfig) -> anyhow::Result<()> {
    crate::accept::raise_fd_limit();
    let ca = FileCa::open(&cfg.ca_dir).context("opening the certificate authority (--ca-dir)")?;
    ca.watch(super::CA_POLL_INTERVAL);
    let Started { state, client, .. } = cfg
        .source
        .start("ca", &cfg.settings, None)
        .await
        .context("reading the mesh's configuration")?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    tracing::info!(listen = %cfg.listen, names = ?cfg.policy.server_names, "certificate authority serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    let service = Service {
        ca,
        state,
        tokens: client,
        trust_domain: cfg.settings.trust_domain,
        policy: cfg.policy,
    };
    serve(listener, service, shutdown).await?;
    tracing::info!("certificate authority stopping");
    Ok(())
}

/// Answers CA clients on `listener` until `shutdown` completes.
async fn serve(
    listener: TcpListener,
    service: Service,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let certificate = ServerCertificate::issue(&service.ca, &service.policy.server_names)?;
    certificate.clone().keep_fresh(service.ca.clone());
    let bundle_ca = service.ca.clone();
    let tls = tls::ca_server_config(move || bundle_ca.trust_bundle(), certificate);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let connections = Arc::new(Semaphore::new(service.policy.max_connections));
    let service = Arc::new(service);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = crate::accept::next(&listener, || "certificate authority".into()) => accepted,
            () = &mut shutdown => return Ok(()),
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = service.policy.max_connections, "too many CA client connections; closing one");
            continue;
        };
        let (acceptor, service) = (acceptor.clone(), service.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::info!(%peer, %error, "TLS handshake with a CA client failed");
                    return;
                }
                Err(_) => return,
            };
            let certificate_caller = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|leaf| authorize::caller_from_certificate(leaf, &service.trust_domain));
            let handler = hyper::service::service_fn(move |req| {
                let (service, caller) = (service.clone(), certificate_caller.clone());
                async move { Ok::<_, Infallible>(service.handle(caller, peer, req).await) }
            });
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
                .keep_alive_interval(KEEPALIVE)
                .keep_alive_timeout(KEEPALIVE)
                .serve_connection(TokioIo::new(tls), handler);
            if let Err(error) = conn.await {
                tracing::debug!(%peer, %error, "CA client connection ended with an error");
            }
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

struct Service {
    ca: Arc<FileCa>,
    state: watch::Receiver<Arc<MeshState>>,
    /// The API server, for TokenReviews (Kubernetes mode).
    tokens: Option<kube::Client>,
    trust_domain: String,
    policy: Policy,
}

impl Service {
    async fn handle(
        &self,
        certificate_caller: Option<Caller>,
        peer: SocketAddr,
        req: Request<Incoming>,
    ) -> Response<Body> {
        match self.create_certificate(certificate_caller, peer, req).await {
            Ok(response) => grpc_ok(&response),
            Err(status) => grpc_error(&status),
        }
    }

    async fn create_certificate(
        &self,
        certificate_caller: Option<Caller>,
        peer: SocketAddr,
        req: Request<Incoming>,
    ) -> Result<CertificateResponse, Status> {
        if req.uri().path() != grpc::CREATE_CERTIFICATE {
            return Err(Status::new(
                Code::Unimplemented,
                format!("no method {}", req.uri().path()),
            ));
        }
        let token = bearer_token(req.headers());
        let body = tokio::time::timeout(
            REQUEST_TIMEOUT,
            Limited::new(req.into_body(), grpc::MAX_MESSAGE + 5).collect(),
        )
        .await
        .map_err(|_| Status::new(Code::Unavailable, "the request did not arrive in time"))?
        .map_err(|e| Status::new(Code::InvalidArgument, format!("reading the request: {e}")))?
        .to_bytes();
        let request: CertificateRequest = grpc::decode_frame(&body)?;
        let caller = match (certificate_caller, token) {
            (Some(caller), _) => caller,
            (None, Some(token)) => self.review(&token).await?,
            (None, None) => {
                return Err(Status::new(
                    Code::Unauthenticated,
                    "no client certificate of this mesh and no bearer token",
                ));
            }
        };
        let requested = request.impersonated_identity();
        let state = self.state.borrow().clone();
        let identity = authorize::authorize(&caller, requested, &state, &self.trust_domain)
            .map_err(|Denied(reason)| {
                tracing::warn!(%caller, %peer, requested = requested.unwrap_or("(own)"), %reason, "certificate refused");
                Status::new(Code::PermissionDenied, reason)
            })?;
        let csr = csr_der(&request.csr)?;
        let lifetime = match u64::try_from(request.validity_duration) {
            Ok(secs) if secs > 0 => Duration::from_secs(secs).min(self.policy.max_lifetime),
            _ => self.policy.default_lifetime,
        };
        let chain = self
            .ca
            .sign_now(&csr, &identity, lifetime)
            .map_err(|e| Status::new(Code::InvalidArgument, e.to_string()))?;
        tracing::info!(%caller, %peer, %identity, lifetime_s = lifetime.as_secs(), "certificate signed");
        let roots: String = self.ca.trust_bundle().iter().map(|c| pem(c)).collect();
        Ok(CertificateResponse {
            cert_chain: chain.iter().map(|c| pem(c)).chain([roots]).collect(),
        })
    }

    /// Authenticates a service-account token with a TokenReview: a trusted node account's
    /// token makes the caller the node its pod runs on, any other account's the account's
    /// identity.
    async fn review(&self, token: &str) -> Result<Caller, Status> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let unauthenticated = |reason: String| {
            tracing::warn!(%reason, "token refused");
            Status::new(Code::Unauthenticated, reason)
        };
        let Some(client) = &self.tokens else {
            return Err(unauthenticated(
                "bearer tokens are checked only in Kubernetes mode; present a credential certificate".into(),
            ));
        };
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]),
            },
            ..Default::default()
        };
        let reviews: kube::Api<TokenReview> = kube::Api::all(client.clone());
        let reviewed = reviews
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| Status::new(Code::Unavailable, format!("TokenReview failed: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(unauthenticated(format!(
                "the token is not valid for audience {TOKEN_AUDIENCE}: {}",
                status.error.unwrap_or_default()
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((namespace, account)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(unauthenticated(format!(
                "{username:?} is not a service account"
            )));
        };
        if !self
            .policy
            .trusted_node_accounts
            .contains(&(namespace.to_owned(), account.to_owned()))
        {
            return Ok(Caller::Workload(Identity::new(
                self.trust_domain.as_str(),
                namespace,
                account,
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let pod = first("authentication.kubernetes.io/pod-name").ok_or_else(|| {
            unauthenticated(format!(
                "the token of node account {namespace}/{account} is not bound to a pod"
            ))
        })?;
        let state = self.state.borrow().clone();
        let node = state
            .workload(namespace, &pod)
            .and_then(|w| w.node.clone())
            .ok_or_else(|| {
                unauthenticated(format!(
                    "pod {namespace}/{pod} of node account {account} is not scheduled on a known node"
                ))
            })?;
        if let Some(claimed) = first("authentication.kubernetes.io/node-name")
            && claimed != node
        {
            return Err(unauthenticated(format!(
                "the token names node {claimed} but pod {namespace}/{pod} runs on {node}"
            )));
        }
        Ok(Caller::Node(node))
    }
}

fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    (!token.is_empty()).then(|| token.trim().to_owned())
}

/// The DER of the one certificate request in a PEM string.
fn csr_der(pem: &str) -> Result<Vec<u8>, Status> {
    for item in rustls_pemfile::read_all(&mut pem.as_bytes()) {
        if let Ok(rustls_pemfile::Item::Csr(csr)) = item {
            return Ok(csr.as_ref().to_vec());
        }
    }
    Err(Status::new(
        Code::InvalidArgument,
        "the csr field holds no PEM CERTIFICATE REQUEST",
    ))
}

/// One certificate as PEM (64-column base64), as Istio's CA writes them.
pub(crate) fn pem(cert: &CertificateDer<'_>) -> String {
    ::pem::encode_config(
        &::pem::Pem::new("CERTIFICATE", cert.as_ref()),
        ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF),
    )
}

fn grpc_ok(message: &CertificateResponse) -> Response<Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames = [
        Ok(Frame::data(grpc::encode_frame(message))),
        Ok(Frame::trailers(trailers)),
    ];
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/grpc")
        .body(BodyExt::boxed(StreamBody::new(futures::stream::iter(
            frames,
        ))))
        .expect("a valid response")
}

/// A trailers-only response: the status in the headers, no body.
fn grpc_error(status: &Status) -> Response<Body> {
    let message = HeaderValue::from_str(&grpc::percent_encode(&status.message))
        .unwrap_or_else(|_| HeaderValue::from_static(""));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header("grpc-status", status.code as i32)
        .header("grpc-message", message)
        .body(BodyExt::boxed(http_body_util::Empty::new()))
        .expect("a valid response")
}

/// The certificate the service presents, re-issued at half-life.
struct ServerCertificate {
    names: Vec<String>,
    current: ArcSwap<CertifiedKey>,
}

impl std::fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCertificate")
            .field("names", &self.names)
            .finish()
    }
}

impl ServerCertificate {
    fn issue(ca: &FileCa, names: &[String]) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(ServerCertificate {
            names: names.to_vec(),
            current: ArcSwap::from_pointee(Self::sign(ca, names)?),
        }))
    }

    fn sign(ca: &FileCa, names: &[String]) -> anyhow::Result<CertifiedKey> {
        let names: Vec<_> = names.iter().cloned().map(SubjectName::Dns).collect();
        let (chain, key) = ca
            .sign_new_key(&names, SERVER_CERT_LIFETIME)
            .context("signing the service's own certificate")?;
        let key = crypto_provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            )))
            .context("loading the service's key")?;
        Ok(CertifiedKey::new(chain, key))
    }

    fn keep_fresh(self: Arc<Self>, ca: Arc<FileCa>) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SERVER_CERT_LIFETIME / 2).await;
                match Self::sign(&ca, &self.names) {
                    Ok(key) => self.current.store(Arc::new(key)),
                    Err(error) => {
                        tracing::error!(%error, "renewing the service's certificate failed")
                    }
                }
            }
        });
    }
}

impl ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

#[cfg(test)]
mod tests {
    use crate::labels::Labels;

    use super::*;
    use crate::{
        ca_service::{
            Credential, RemoteCa, RemoteCaConfig,
            credential::{self, Subject},
        },
        identity::{SecretManager, init_ca, testing::TempDir},
        state::{RawObjects, Workload},
    };

    fn pod(name: &str, sa: &str, node: &str) -> Workload {
        Workload {
            uid: name.into(),
            name: name.into(),
            namespace: "shop".into(),
            node: Some(node.into()),
            service_account: sa.into(),
            ips: vec![],
            labels: Labels::new(),
            workload_name: name.into(),
            netns: None,
            captured: true,
            host_network: false,
            dns_capture: None,
            waypoint: None,
        }
    }

    /// The service on 127.0.0.1 with a fresh CA and one pod per node; returns its address,
    /// the CA directory and a sender that stops it when dropped.
    async fn start(
        max_connections: usize,
    ) -> (SocketAddr, TempDir, tokio::sync::oneshot::Sender<()>) {
        let dir = TempDir::new("ca-serve");
        init_ca(dir.path()).unwrap();
        let state = MeshState::new(
            vec![
                pod("reviews-0", "reviews", "n1"),
                pod("ratings-0", "ratings", "n2"),
            ],
            vec![],
            RawObjects::default(),
        );
        let service = Service {
            ca: FileCa::open(dir.path()).unwrap(),
            state: watch::channel(Arc::new(state)).1,
            tokens: None,
            trust_domain: "cluster.local".into(),
            policy: Policy {
                server_names: vec!["istiod.istio-system.svc".into()],
                default_lifetime: Duration::from_secs(3600),
                max_lifetime: Duration::from_secs(3600),
                trusted_node_accounts: BTreeSet::new(),
                max_connections,
            },
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, service, async move {
            let _ = stopped.await;
        }));
        (addr, dir, stop)
    }

    fn client(addr: SocketAddr, dir: &TempDir, subject: Subject, name: &str) -> Arc<RemoteCa> {
        let out = dir.path().join(name);
        credential::write(
            dir.path(),
            &subject,
            "cluster.local",
            Duration::from_secs(3600),
            &out,
        )
        .unwrap();
        RemoteCa::new(RemoteCaConfig {
            address: addr.to_string(),
            server_name: "istiod.istio-system.svc".into(),
            roots: out.join(credential::ROOT_FILE),
            credential: Credential::Certificate {
                cert: out.join(credential::CERT_FILE),
                key: out.join(credential::KEY_FILE),
            },
        })
        .unwrap()
    }

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "shop", sa)
    }

    #[tokio::test]
    async fn a_node_credential_gets_its_pods_identities_over_the_wire_and_no_others() {
        let (addr, dir, _stop) = start(16).await;
        let node = client(addr, &dir, Subject::Node("n1".into()), "n1");
        let certs = SecretManager::new(node, Duration::from_secs(600));
        let cert = certs.acquire(&id("reviews")).await.unwrap();
        assert_eq!(cert.identity, id("reviews"));
        let err = certs.acquire(&id("ratings")).await.unwrap_err().to_string();
        assert!(
            err.contains("PermissionDenied") && err.contains("no captured pod on node n1"),
            "{err}"
        );
        // A waypoint's credential: its own identity and nothing else.
        let waypoint = client(addr, &dir, Subject::Workload(id("waypoint")), "wp");
        let certs = SecretManager::new(waypoint, Duration::from_secs(600));
        certs.acquire(&id("waypoint")).await.unwrap();
        let err = certs.acquire(&id("reviews")).await.unwrap_err().to_string();
        assert!(err.contains("only its own identity"), "{err}");
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_until_one_ends() {
        let (addr, dir, _stop) = start(2).await;
        let held: Vec<_> = (0..2)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let node = client(addr, &dir, Subject::Node("n1".into()), "n1");
        let certs = SecretManager::new(node.clone(), Duration::from_secs(600));
        let err = certs.acquire(&id("reviews")).await.unwrap_err().to_string();
        assert!(err.contains("TLS with the CA"), "{err}");
        drop(held);
        let mut ok = false;
        for _ in 0..50 {
            if certs.acquire(&id("reviews")).await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(ok, "the freed slots are taken again");
    }
}
