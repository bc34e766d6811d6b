//! The rustls configurations of HBONE (wire-compatible with ztunnel): TLS 1.3 only, ALPN
//! `h2`, no SNI, no resumption, and SPIFFE identities instead of host names. Each side
//! presents its workload certificate from the [`SecretManager`] and verifies the peer against
//! the trust bundle as it is at handshake time, so renewals and root rotations apply to new
//! handshakes without rebuilding configurations.

use std::{fmt, sync::Arc};

use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, ServerConfig, SignatureScheme,
    client::{
        ResolvesClientCert, Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    server::{
        ClientHello, NoServerSessionStorage, ResolvesServerCert,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{Identity, SecretManager, crypto_provider, spiffe::certificate_identities};

/// The only application protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a peer certificate was refused; carried inside the rustls error
/// (`InvalidCertificate(Other(..))`), so it shows in the handshake error. (rustls formats it
/// with `Debug`, which therefore writes the message.)
#[derive(thiserror::Error)]
pub enum TlsError {
    #[error("server certificate rejected: expected {expected}, presented {presented}: {reason}")]
    ServerCertificate {
        expected: Identity,
        presented: String,
        reason: String,
    },
    #[error("client certificate rejected: presented {presented}: {reason}")]
    ClientCertificate { presented: String, reason: String },
}

impl fmt::Debug for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Server side of HBONE for the pod(s) with identity `id`: TLS 1.3 only, ALPN `h2`, no
/// session resumption or tickets, the certificate resolved per handshake from
/// `manager.current(id)` (so renewals apply), and a client certificate required and verified
/// against `manager.trust_bundle()` read at handshake time (so root rotation applies). The
/// client's identity is then [`peer_identity`].
pub fn server_config(manager: &Arc<SecretManager>, id: &Identity) -> Arc<ServerConfig> {
    let provider = crypto_provider();
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .with_client_cert_verifier(Arc::new(ClientVerifier {
            bundle: {
                let manager = manager.clone();
                Box::new(move || manager.trust_bundle())
            },
            mandatory: true,
            provider,
        }))
        .with_cert_resolver(Arc::new(WorkloadCertResolver {
            manager: manager.clone(),
            id: id.clone(),
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// The server side of the certificate authority's API: TLS 1.3, ALPN `h2`, the server's
/// certificate from `certificate`, and a client certificate optional (a caller may instead
/// send a token) but, when presented, verified against `bundle()` read at handshake time.
/// Which caller a certificate names is for the service to decide.
pub fn ca_server_config(
    bundle: impl Fn() -> Vec<CertificateDer<'static>> + Send + Sync + 'static,
    certificate: Arc<dyn ResolvesServerCert>,
) -> Arc<ServerConfig> {
    let provider = crypto_provider();
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .with_client_cert_verifier(Arc::new(ClientVerifier {
            bundle: Box::new(bundle),
            mandatory: false,
            provider,
        }))
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

/// Client side of HBONE from identity `src` to a server that must be `expected_server`: TLS
/// 1.3 only, ALPN `h2`, SNI disabled, no resumption, the client certificate resolved per
/// handshake from `manager.current(src)`. The server's chain is verified against the trust
/// bundle (signatures, validity, EKU serverAuth) and one of its URI SANs must be
/// `expected_server`; the server name passed to the connector is ignored (dial by IP with
/// `ServerName::IpAddress`). A refusal names the expected and the presented identity.
pub fn client_config(
    manager: &Arc<SecretManager>,
    src: &Identity,
    expected_server: &Identity,
) -> Arc<ClientConfig> {
    let provider = crypto_provider();
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier {
            manager: manager.clone(),
            expected: expected_server.clone(),
            provider,
        }))
        .with_client_cert_resolver(Arc::new(WorkloadCertResolver {
            manager: manager.clone(),
            id: src.clone(),
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

/// The verified peer identity of an established connection: the first SPIFFE URI SAN of the
/// peer's end-entity certificate, if any.
pub fn peer_identity(conn: &CommonState) -> Option<Identity> {
    let leaf = conn.peer_certificates()?.first()?;
    certificate_identities(leaf).into_iter().next()
}

/// Presents the current certificate of one identity, on either side of the handshake.
struct WorkloadCertResolver {
    manager: Arc<SecretManager>,
    id: Identity,
}

impl WorkloadCertResolver {
    fn resolve(&self) -> Option<Arc<CertifiedKey>> {
        let cert = self.manager.current(&self.id);
        if cert.is_none() {
            tracing::warn!(identity = %self.id, "TLS handshake without a certificate for the identity");
        }
        cert.map(|c| c.certified_key.clone())
    }
}

impl fmt::Debug for WorkloadCertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkloadCertResolver({})", self.id)
    }
}

impl ResolvesServerCert for WorkloadCertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        WorkloadCertResolver::resolve(self)
    }
}

impl ResolvesClientCert for WorkloadCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        WorkloadCertResolver::resolve(self)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Client side: the server must chain to the bundle and be `expected`.
struct ServerVerifier {
    manager: Arc<SecretManager>,
    expected: Identity,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for ServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerVerifier(expected {})", self.expected)
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = certificate_identities(end_entity);
        let reject = |reason: String| {
            certificate_error(TlsError::ServerCertificate {
                expected: self.expected.clone(),
                presented: describe_identities(&presented),
                reason,
            })
        };
        verify_chain(
            &self.provider,
            &self.manager.trust_bundle(),
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )
        .map_err(reject)?;
        if !presented.contains(&self.expected) {
            return Err(reject("identity mismatch".into()));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server side: a client certificate is required, must chain to the bundle and carry a
/// SPIFFE identity (which one is for authorization to decide).
struct ClientVerifier {
    /// The roots as they are now.
    bundle: Box<dyn Fn() -> Vec<CertificateDer<'static>> + Send + Sync>,
    /// HBONE: a certificate with a SPIFFE identity is required. Otherwise (the CA's API) a
    /// client may present none.
    mandatory: bool,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientVerifier")
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    /// No hints: the bundle changes, and clients present their one certificate anyway.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let presented = certificate_identities(end_entity);
        let reject = |reason: String| {
            certificate_error(TlsError::ClientCertificate {
                presented: describe_identities(&presented),
                reason,
            })
        };
        verify_chain(
            &self.provider,
            &(self.bundle)(),
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )
        .map_err(reject)?;
        if self.mandatory && presented.is_empty() {
            return Err(reject("no SPIFFE identity in the URI SANs".into()));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Path validation with rustls-webpki against `bundle` (signatures, validity at `now`, CA
/// constraints, EKU `usage`). Names are not checked here: the callers check SPIFFE IDs.
pub(crate) fn verify_chain(
    provider: &CryptoProvider,
    bundle: &[CertificateDer<'static>],
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), String> {
    let anchors: Vec<_> = bundle
        .iter()
        .filter_map(|root| webpki::anchor_from_trusted_cert(root).ok())
        .collect();
    if anchors.is_empty() {
        return Err("no trusted root".into());
    }
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| describe_error(&e))?;
    cert.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| describe_error(&e))
}

fn describe_error(e: &webpki::Error) -> String {
    match e {
        // With several roots of one subject (a rotation), a foreign leaf fails the signature
        // check instead of the name match.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            format!("not issued by a trusted root ({e:?})")
        }
        webpki::Error::CertExpired { .. } => format!("expired ({e:?})"),
        webpki::Error::CertNotValidYet { .. } => format!("not valid yet ({e:?})"),
        webpki::Error::RequiredEkuNotFoundContext(_) => {
            format!("not valid for this use (extended key usage: {e:?})")
        }
        _ => format!("{e:?}"),
    }
}

fn describe_identities(ids: &[Identity]) -> String {
    match ids {
        [] => "no SPIFFE identity".into(),
        [one] => one.to_string(),
        many => many
            .iter()
            .map(Identity::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn certificate_error(e: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::{HandshakeKind, ProtocolVersion};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::identity::{
        CertificateAuthority, FileCa,
        testing::{TempDir, handshake, replace_root},
    };

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "default", sa)
    }

    async fn manager_with(
        ca: Arc<dyn CertificateAuthority>,
        ids: &[&Identity],
    ) -> Arc<SecretManager> {
        let manager = SecretManager::new(ca, Duration::from_secs(3600));
        for id in ids {
            manager.acquire(id).await.unwrap();
        }
        manager
    }

    /// Signs with `signer`'s root but trusts exactly `trust`.
    struct FixedTrustCa {
        signer: Arc<FileCa>,
        trust: Vec<CertificateDer<'static>>,
    }

    impl CertificateAuthority for FixedTrustCa {
        fn sign<'a>(
            &'a self,
            csr_der: &'a [u8],
            identity: &'a Identity,
            lifetime: Duration,
        ) -> crate::identity::ca::SignFuture<'a> {
            self.signer.sign(csr_der, identity, lifetime)
        }

        fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
            self.trust.clone()
        }
    }

    #[derive(Debug)]
    struct Later(Duration);

    impl rustls::time_provider::TimeProvider for Later {
        fn current_time(&self) -> Option<UnixTime> {
            Some(UnixTime::since_unix_epoch(
                UnixTime::now()
                    .as_secs()
                    .checked_add(self.0.as_secs())
                    .map(Duration::from_secs)?,
            ))
        }
    }

    #[tokio::test]
    async fn mutual_tls_handshake_exposes_client_identity_to_server() {
        let (client, server) = (id("productpage"), id("reviews"));
        let manager = manager_with(FileCa::ephemeral(), &[&client, &server]).await;
        let (c, s) = handshake(
            client_config(&manager, &client, &server),
            server_config(&manager, &server),
        )
        .await;
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        assert_eq!(peer_identity(s.get_ref().1), Some(client.clone()));
        assert_eq!(peer_identity(c.get_ref().1), Some(server.clone()));
        c.write_all(b"hello").await.unwrap();
        c.flush().await.unwrap();
        let mut buf = [0; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[tokio::test]
    async fn client_rejects_server_with_other_service_account() {
        let (client, expected, actual) = (id("productpage"), id("reviews"), id("ratings"));
        let manager = manager_with(FileCa::ephemeral(), &[&client, &actual]).await;
        let (c, s) = handshake(
            client_config(&manager, &client, &expected),
            server_config(&manager, &actual),
        )
        .await;
        let err = c.unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "expected {expected}, presented {actual}: identity mismatch"
            )),
            "{err}"
        );
        assert!(s.is_err(), "the server sees the alert");
    }

    #[tokio::test]
    async fn client_rejects_server_from_other_root() {
        let (client, server) = (id("productpage"), id("reviews"));
        let client_side = manager_with(FileCa::ephemeral(), &[&client]).await;
        let server_side = manager_with(FileCa::ephemeral(), &[&server]).await;
        let (c, _s) = handshake(
            client_config(&client_side, &client, &server),
            server_config(&server_side, &server),
        )
        .await;
        let err = c.unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "expected {server}, presented {server}: not issued by a trusted root"
            )),
            "{err}"
        );
    }

    #[tokio::test]
    async fn client_rejects_expired_server_certificate() {
        let (client, server) = (id("productpage"), id("reviews"));
        let manager = manager_with(FileCa::ephemeral(), &[&client, &server]).await;
        let mut config = (*client_config(&manager, &client, &server)).clone();
        config.time_provider = Arc::new(Later(Duration::from_secs(2 * 3600)));
        let (c, _s) = handshake(Arc::new(config), server_config(&manager, &server)).await;
        let err = c.unwrap_err().to_string();
        assert!(
            err.contains(&format!("expected {server}, presented {server}: expired")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn server_rejects_client_without_certificate() {
        let (client, server) = (id("productpage"), id("reviews"));
        // The client identity was never acquired, so the client has no certificate to send.
        let manager = manager_with(FileCa::ephemeral(), &[&server]).await;
        let (c, s) = handshake(
            client_config(&manager, &client, &server),
            server_config(&manager, &server),
        )
        .await;
        let err = s.unwrap_err().to_string();
        assert!(err.contains("no certificates"), "{err}");
        assert_client_is_refused(c).await;
    }

    #[tokio::test]
    async fn server_rejects_client_from_other_root() {
        let (client, server) = (id("productpage"), id("reviews"));
        let server_ca = FileCa::ephemeral();
        let server_side = manager_with(server_ca.clone(), &[&server]).await;
        // The client trusts the server's root but its own certificate is from another root.
        let client_root = FileCa::ephemeral();
        let client_ca = Arc::new(FixedTrustCa {
            trust: vec![client_root.current_root(), server_ca.current_root()],
            signer: client_root,
        });
        let client_side = manager_with(client_ca, &[&client]).await;
        let (c, s) = handshake(
            client_config(&client_side, &client, &server),
            server_config(&server_side, &server),
        )
        .await;
        let err = s.unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "client certificate rejected: presented {client}: not issued by a trusted root"
            )),
            "{err}"
        );
        assert_client_is_refused(c).await;
    }

    /// In TLS 1.3 the client finishes first; a refusal of its certificate arrives as an
    /// alert on its first read.
    async fn assert_client_is_refused(
        c: std::io::Result<tokio_rustls::client::TlsStream<tokio::io::DuplexStream>>,
    ) {
        if let Ok(mut c) = c {
            let mut buf = [0; 1];
            let read = c.read(&mut buf).await;
            assert!(matches!(read, Err(_) | Ok(0)), "{read:?}");
        }
    }

    #[tokio::test]
    async fn only_tls13_and_h2_are_negotiated() {
        let (client, server) = (id("productpage"), id("reviews"));
        let manager = manager_with(FileCa::ephemeral(), &[&client, &server]).await;
        let server_cfg = server_config(&manager, &server);

        // Our client: TLS 1.3 and h2.
        let (c, s) = handshake(
            client_config(&manager, &client, &server),
            server_cfg.clone(),
        )
        .await;
        let (c, s) = (c.unwrap(), s.unwrap());
        let common: [&CommonState; 2] = [c.get_ref().1, s.get_ref().1];
        for conn in common {
            assert_eq!(conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
            assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
        }

        // A client offering only http/1.1 is refused (no_application_protocol).
        let mut http1 = (*client_config(&manager, &client, &server)).clone();
        http1.alpn_protocols = vec![b"http/1.1".to_vec()];
        let (_c, s) = handshake(Arc::new(http1), server_cfg.clone()).await;
        let err = s.unwrap_err().to_string();
        assert!(err.contains("doesn't support any known protocol"), "{err}");

        // A TLS 1.2 ClientHello gets a protocol_version alert.
        let (mut raw, server_end) = tokio::io::duplex(16 * 1024);
        let accept = tokio::spawn(tokio_rustls::TlsAcceptor::from(server_cfg).accept(server_end));
        raw.write_all(&tls12_client_hello()).await.unwrap();
        let mut alert = [0u8; 7];
        raw.read_exact(&mut alert).await.unwrap();
        assert_eq!(alert[0], 0x15, "an alert record: {alert:?}");
        assert_eq!(alert[5..], [2, 70], "fatal protocol_version: {alert:?}");
        assert!(accept.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn handshakes_never_resume_sessions() {
        let (client, server) = (id("productpage"), id("reviews"));
        let manager = manager_with(FileCa::ephemeral(), &[&client, &server]).await;
        let client_cfg = client_config(&manager, &client, &server);
        let server_cfg = server_config(&manager, &server);
        assert_eq!(server_cfg.send_tls13_tickets, 0);
        for _ in 0..3 {
            let (c, s) = handshake(client_cfg.clone(), server_cfg.clone()).await;
            let (mut c, mut s) = (c.unwrap(), s.unwrap());
            // Exchange data so that any ticket would have been sent and received.
            s.write_all(b"x").await.unwrap();
            s.flush().await.unwrap();
            let mut buf = [0; 1];
            c.read_exact(&mut buf).await.unwrap();
            assert_eq!(c.get_ref().1.handshake_kind(), Some(HandshakeKind::Full));
            assert_eq!(s.get_ref().1.handshake_kind(), Some(HandshakeKind::Full));
        }
    }

    #[tokio::test]
    async fn rotated_root_is_trusted_alongside_the_old_one_during_overlap() {
        let dir = TempDir::new("rotation");
        crate::identity::init_ca(dir.path()).unwrap();
        let ca = FileCa::open(dir.path()).unwrap();
        let manager = SecretManager::new(ca.clone(), Duration::from_secs(3600));
        let (old, new) = (id("signed-by-old-root"), id("signed-by-new-root"));
        manager.acquire(&old).await.unwrap();
        let old_root = ca.current_root();

        let _watch = ca.watch(Duration::from_millis(20));
        replace_root(dir.path());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while ca.current_root() == old_root {
            assert!(
                tokio::time::Instant::now() < deadline,
                "rotation not picked up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(manager.trust_bundle(), vec![ca.current_root(), old_root]);
        manager.acquire(&new).await.unwrap();

        // Each leaf verifies, as client and as server, against the bundle of both roots.
        for (src, dst) in [(&old, &new), (&new, &old)] {
            let (c, s) = handshake(
                client_config(&manager, src, dst),
                server_config(&manager, dst),
            )
            .await;
            let (c, s) = (c.unwrap(), s.unwrap());
            assert_eq!(peer_identity(s.get_ref().1).as_ref(), Some(src));
            assert_eq!(peer_identity(c.get_ref().1).as_ref(), Some(dst));
        }

        // Without the overlap, a peer that only knows the new root refuses the old leaf.
        let new_only = SecretManager::new(
            Arc::new(FixedTrustCa {
                signer: ca.clone(),
                trust: vec![ca.current_root()],
            }),
            Duration::from_secs(3600),
        );
        new_only.acquire(&new).await.unwrap();
        let (_c, s) = handshake(
            client_config(&manager, &old, &new),
            server_config(&new_only, &new),
        )
        .await;
        let err = s.unwrap_err().to_string();
        assert!(err.contains("not issued by a trusted root"), "{err}");
    }

    /// A TLS 1.2-only ClientHello (no supported_versions extension).
    fn tls12_client_hello() -> Vec<u8> {
        let mut body = vec![0x03, 0x03]; // client_version
        body.extend([0x11; 32]); // random
        body.push(0); // no session id
        body.extend([0x00, 0x02, 0xc0, 0x2b]); // ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        body.extend([0x01, 0x00]); // null compression
        let mut ext = Vec::new();
        ext.extend([0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x17, 0x00, 0x1d]); // groups
        ext.extend([0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]); // point formats
        ext.extend([0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04, 0x03]); // sig algs
        ext.extend([0x00, 0x10, 0x00, 0x05, 0x00, 0x03, 0x02, b'h', b'2']); // ALPN h2
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut handshake = vec![0x01]; // ClientHello
        handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend(body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend((handshake.len() as u16).to_be_bytes());
        record.extend(handshake);
        record
    }
}
