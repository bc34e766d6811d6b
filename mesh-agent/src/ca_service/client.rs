//! [`RemoteCa`]: the node agent's, waypoint's and gateway's way to their certificates when
//! the key lives elsewhere — `mesh-agent ca serve`, or istiod, over Istio's certificate API.
//! It asks as ztunnel does: one HTTP/2 connection over TLS (the server verified against the
//! mesh's roots and a DNS name), the pod's identity in `ImpersonatedIdentity`, and either a
//! credential certificate (file mode) or a service-account token (Kubernetes mode).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;

use super::grpc::{self, CertificateRequest, CertificateResponse, Code, Status};
use crate::identity::{
    CaError, CertificateAuthority, Identity,
    ca::{SignFuture, SignResult},
    crypto_provider, tls,
};

/// The whole exchange (connect, TLS, request, answer) has this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How a proxy proves who it is to the CA.
#[derive(Clone, Debug)]
pub enum Credential {
    /// A certificate and key (PEM) signed by the CA: a node credential, or a workload
    /// certificate of the proxy's own identity (`mesh-agent ca credential` writes both).
    Certificate { cert: PathBuf, key: PathBuf },
    /// A file holding a service-account token (re-read for every request: the kubelet
    /// rotates it), sent as `authorization: Bearer`.
    Token(PathBuf),
}

/// Where the CA is and how to reach it.
#[derive(Clone, Debug)]
pub struct RemoteCaConfig {
    /// `host:port`.
    pub address: String,
    /// The DNS name the CA's certificate must carry.
    pub server_name: String,
    /// PEM roots: they verify the CA, and are the mesh's trust bundle.
    pub roots: PathBuf,
    pub credential: Credential,
}

pub struct RemoteCa {
    config: RemoteCaConfig,
    server_name: ServerName<'static>,
    roots: Vec<CertificateDer<'static>>,
    tls: Arc<ClientConfig>,
    /// The open connection, reused while it lives.
    connection: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl RemoteCa {
    pub fn new(config: RemoteCaConfig) -> Result<Arc<RemoteCa>, CaError> {
        let invalid = |path: &Path, reason: String| CaError::InvalidRoot {
            path: path.to_owned(),
            reason,
        };
        let roots_pem = std::fs::read(&config.roots).map_err(|source| CaError::Read {
            path: config.roots.clone(),
            source,
        })?;
        let roots = rustls_pemfile::certs(&mut &roots_pem[..])
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(&config.roots, format!("not PEM: {e}")))?;
        if roots.is_empty() {
            return Err(invalid(&config.roots, "no certificate in the file".into()));
        }
        let mut store = RootCertStore::empty();
        for root in &roots {
            store
                .add(root.clone())
                .map_err(|e| invalid(&config.roots, format!("not a usable root: {e}")))?;
        }
        let server_name = ServerName::try_from(config.server_name.clone()).map_err(|e| {
            invalid(
                &config.roots,
                format!("CA server name {:?}: {e}", config.server_name),
            )
        })?;
        let builder = ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the ring provider supports TLS 1.3")
            .with_root_certificates(store);
        let mut tls = match &config.credential {
            Credential::Certificate { cert, key } => {
                let chain_pem = std::fs::read(cert).map_err(|source| CaError::Read {
                    path: cert.clone(),
                    source,
                })?;
                let chain = rustls_pemfile::certs(&mut &chain_pem[..])
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| invalid(cert, format!("not PEM: {e}")))?;
                let key_pem = std::fs::read(key).map_err(|source| CaError::Read {
                    path: key.clone(),
                    source,
                })?;
                let key = rustls_pemfile::private_key(&mut &key_pem[..])
                    .map_err(|e| invalid(key, format!("not PEM: {e}")))?
                    .ok_or_else(|| invalid(key, "no private key in the file".into()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| invalid(cert, format!("unusable credential: {e}")))?
            }
            Credential::Token(_) => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
        Ok(Arc::new(RemoteCa {
            config,
            server_name,
            roots,
            tls: Arc::new(tls),
            connection: tokio::sync::Mutex::new(None),
        }))
    }

    async fn call(&self, identity: &Identity, csr_der: &[u8], lifetime: Duration) -> SignResult {
        let remote = |reason: String| CaError::Remote {
            address: self.config.address.clone(),
            identity: identity.to_string(),
            reason,
        };
        let request = CertificateRequest {
            csr: ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", csr_der)),
            validity_duration: i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX),
            metadata: None,
        }
        .impersonating(&identity.to_string());
        let mut http = Request::post(format!(
            "https://{}{}",
            self.config.server_name,
            grpc::CREATE_CERTIFICATE
        ))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers");
        if let Credential::Token(path) = &self.config.credential {
            let token = std::fs::read_to_string(path)
                .map_err(|e| remote(format!("reading the token {}: {e}", path.display())))?;
            http = http.header(header::AUTHORIZATION, format!("Bearer {}", token.trim()));
        }
        let http = http
            .body(Full::new(grpc::encode_frame(&request)))
            .map_err(|e| remote(e.to_string()))?;

        let mut sender = self.sender().await.map_err(remote)?;
        let response = sender
            .send_request(http)
            .await
            .map_err(|e| remote(format!("request failed: {e}")))?;
        if !response.status().is_success() {
            return Err(remote(format!("HTTP status {}", response.status())));
        }
        if let Some(code) = response.headers().get("grpc-status") {
            return Err(self.status_error(identity, response.headers(), code));
        }
        let collected = http_body_util::Limited::new(response.into_body(), grpc::MAX_MESSAGE + 5)
            .collect()
            .await
            .map_err(|e| remote(format!("reading the answer: {e}")))?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let body = collected.to_bytes();
        match trailers.get("grpc-status") {
            Some(code) if code != "0" => return Err(self.status_error(identity, &trailers, code)),
            Some(_) => {}
            None => return Err(remote("the answer has no grpc-status".into())),
        }
        let answer: CertificateResponse =
            grpc::decode_frame(&body).map_err(|e| remote(e.to_string()))?;
        self.chain_of(identity, answer).map_err(remote)
    }

    fn status_error(
        &self,
        identity: &Identity,
        headers: &http::HeaderMap,
        code: &http::HeaderValue,
    ) -> CaError {
        let message = headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .unwrap_or("");
        let status = Status::from_wire(code.to_str().unwrap_or(""), message);
        let reason = format!("{:?}: {}", status.code, status.message);
        match status.code {
            Code::PermissionDenied | Code::Unauthenticated | Code::InvalidArgument => {
                CaError::Refused {
                    address: self.config.address.clone(),
                    identity: identity.to_string(),
                    reason,
                }
            }
            _ => CaError::Remote {
                address: self.config.address.clone(),
                identity: identity.to_string(),
                reason,
            },
        }
    }

    /// The leaf and intermediates of an answer (its last element is the root), verified
    /// against this proxy's roots, so that a certificate peers would refuse is never used.
    fn chain_of(
        &self,
        identity: &Identity,
        answer: CertificateResponse,
    ) -> Result<Vec<CertificateDer<'static>>, String> {
        let mut certs: Vec<Vec<CertificateDer<'static>>> = answer
            .cert_chain
            .iter()
            .map(|pem| {
                rustls_pemfile::certs(&mut pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("the answer's chain is not PEM: {e}"))
            })
            .collect::<Result<_, _>>()?;
        if certs.len() > 1 {
            certs.pop(); // the root(s): this proxy trusts its own
        }
        let chain: Vec<_> = certs.into_iter().flatten().collect();
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err("the answer holds no certificate".into());
        };
        tls::verify_chain(
            &crypto_provider(),
            &self.roots,
            leaf,
            intermediates,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        )
        .map_err(|e| {
            format!(
                "the certificate for {identity} does not verify against {}: {e}",
                self.config.roots.display()
            )
        })?;
        Ok(chain)
    }

    /// The open connection, or a new one.
    async fn sender(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let mut slot = self.connection.lock().await;
        if let Some(sender) = slot.as_mut()
            && !sender.is_closed()
            && sender.ready().await.is_ok()
        {
            return Ok(sender.clone());
        }
        *slot = None;
        let tcp = TcpStream::connect(&self.config.address)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS with the CA: {e}"))?;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP/2 with the CA: {e}"))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection to the CA ended");
            }
        });
        *slot = Some(sender.clone());
        Ok(sender)
    }
}

impl CertificateAuthority for RemoteCa {
    fn sign<'a>(
        &'a self,
        csr_der: &'a [u8],
        identity: &'a Identity,
        lifetime: Duration,
    ) -> SignFuture<'a> {
        Box::pin(async move {
            tokio::time::timeout(CALL_TIMEOUT, self.call(identity, csr_der, lifetime))
                .await
                .unwrap_or_else(|_| {
                    Err(CaError::Remote {
                        address: self.config.address.clone(),
                        identity: identity.to_string(),
                        reason: format!("no answer within {CALL_TIMEOUT:?}"),
                    })
                })
        })
    }

    fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }
}
