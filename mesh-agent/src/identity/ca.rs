//! Certificate authorities that sign workload certificates, behind one trait. [`FileCa`]
//! signs with a key and certificate read from a directory (`--ca-dir`): a self-signed root of
//! our own ([`init_ca`] writes one), or Istio's plug-in layout (an intermediate with its
//! chain and the root above it; RSA or ECDSA), and picks up a rotation without a restart.
//! [`crate::ca_service::RemoteCa`] asks a `mesh-agent ca serve` (or istiod) instead.

mod keys;

use std::{
    fs,
    future::Future,
    io,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
    string::{Ia5String, PrintableString},
};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::task::JoinHandle;
use x509_parser::{
    asn1_rs::{Oid, Tag},
    certificate::X509Certificate,
    certification_request::X509CertificationRequest,
    extensions::ParsedExtension,
    oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256},
    prelude::FromDer,
    x509::X509Name,
};

use super::{Identity, crypto_provider, random_bytes};

/// The root certificate(s) in a CA directory (PEM). With [`ROOT_KEY_FILE`] beside it: the
/// one self-signed root that signs leaves; with [`CA_KEY_FILE`]: the roots leaves verify
/// against (Istio's plug-in layout, several during a root rotation).
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The root's private key in our own layout (PEM; PKCS#8, SEC1 or PKCS#1).
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// Istio's plug-in layout: the certificate that signs leaves (an intermediate, or the root).
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// Istio's plug-in layout: the key of [`CA_CERT_FILE`] (ECDSA P-256/P-384 or RSA).
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Istio's plug-in layout: [`CA_CERT_FILE`] and the intermediates above it, up to (and
/// optionally including) the root; leaves carry it after themselves, without the root.
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
/// How far in the past a certificate's notBefore is set, so that a peer whose clock is
/// behind ours still accepts it. notAfter does not move with it: it is always
/// issue time + lifetime.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// Lifetime of a development root written by [`init_ca`].
pub const DEV_ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The least time a replaced root stays trusted (see [`FileCa`] for the rule).
pub const DEFAULT_MIN_ROOT_OVERLAP: Duration = Duration::from_secs(48 * 3600);
/// Shortest leaf lifetime the file CA signs (certificate times have a resolution of 1 s).
const MIN_LEAF_LIFETIME: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{} already exists; refusing to overwrite an existing root", path.display())]
    AlreadyExists { path: PathBuf },
    #[error("certificate authority files in {}: {reason}", path.display())]
    InvalidRoot { path: PathBuf, reason: String },
    #[error("the certificate authority at {address} refused {identity}: {reason}")]
    Refused {
        address: String,
        identity: String,
        reason: String,
    },
    #[error("asking the certificate authority at {address} for {identity}: {reason}")]
    Remote {
        address: String,
        identity: String,
        reason: String,
    },
    #[error("certificate signing request for {identity}: {reason}")]
    InvalidCsr { identity: String, reason: String },
    #[error("signing a certificate for {identity}: {reason}")]
    Sign { identity: String, reason: String },
    #[error("generating a development root: {reason}")]
    Generate { reason: String },
}

/// What [`CertificateAuthority::sign`] returns: the leaf first, then any intermediates (never
/// the root).
pub type SignResult = Result<Vec<CertificateDer<'static>>, CaError>;
/// A signature in progress (local CAs answer at once, remote ones over the network).
pub type SignFuture<'a> = Pin<Box<dyn Future<Output = SignResult> + Send + 'a>>;

/// Something that signs workload certificates and says which roots to trust.
pub trait CertificateAuthority: Send + Sync + 'static {
    /// Signs a CSR (DER) for `identity`.
    ///
    /// The CSR only proves possession of the key: the certificate names `identity`, whatever
    /// the CSR asks for.
    fn sign<'a>(
        &'a self,
        csr_der: &'a [u8],
        identity: &'a Identity,
        lifetime: Duration,
    ) -> SignFuture<'a>;

    /// The roots to trust now (during a root rotation: old and new).
    fn trust_bundle(&self) -> Vec<CertificateDer<'static>>;
}

/// A CA whose key and certificates are files in one directory, in either of two layouts:
///
/// - ours: a self-signed root ([`ROOT_CERT_FILE`], [`ROOT_KEY_FILE`]) signs the leaves;
/// - Istio's plug-in CA (when [`CA_KEY_FILE`] exists): [`CA_CERT_FILE`] and [`CA_KEY_FILE`]
///   sign, [`CERT_CHAIN_FILE`] is the chain from it up towards the root (default: the signing
///   certificate alone, or nothing when it is itself a root) and [`ROOT_CERT_FILE`] holds the
///   roots peers trust.
///
/// Signing keys may be ECDSA P-256, ECDSA P-384 or RSA (signing with SHA-256). Leaves are for
/// ECDSA P-256 keys, with exactly one URI SAN (the identity), an empty subject (so no
/// common name) and the SAN marked critical, no DNS SAN, key usage digitalSignature +
/// keyEncipherment, EKU serverAuth + clientAuth, basicConstraints CA:false, notBefore
/// [`CLOCK_SKEW`] in the past, notAfter = now + lifetime (rounded up to the second, capped at
/// the signing certificate's notAfter) and a random 126-bit serial. The chain returned is the
/// leaf and the intermediates; the trust bundle is the roots.
///
/// **Root rotation** ([`FileCa::watch`]): when the files change and hold a valid new CA,
/// new leaves are signed by it at once, and each replaced root stays in the trust bundle
/// until the latest of
/// - the rotation time + twice the longest lifetime this CA has signed,
/// - the rotation time + the minimum overlap (default [`DEFAULT_MIN_ROOT_OVERLAP`]),
/// - the notAfter of the last leaf the replaced root signed here.
///
/// Twice the lifetime covers the leaves this node signed before the rotation and those a
/// node that sees the rotation later (up to one lifetime later) keeps signing with the old
/// root. A change that does not load (unreadable, not PEM, key not matching the certificate,
/// not a CA, expired) is logged and ignored: the current root stays, and the same files are
/// not retried until they change again.
pub struct FileCa {
    /// `None` for an in-memory CA (tests), which never rotates.
    dir: Option<PathBuf>,
    min_overlap: Duration,
    longest_lifetime: Mutex<Duration>,
    state: RwLock<State>,
}

struct State {
    current: Arc<Signer>,
    retired: Vec<Retired>,
    /// What the files looked like when `current` was read from them.
    loaded: Option<Fingerprint>,
    /// Files that failed to load; not retried until they change.
    rejected: Option<Fingerprint>,
}

/// A replaced root that is still trusted.
struct Retired {
    cert: CertificateDer<'static>,
    until: SystemTime,
}

/// What the CA's files look like (`None`: the file could not be stat'ed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint([Option<FileStamp>; 5]);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    mtime: i64,
    mtime_nsec: i64,
    len: u64,
    inode: u64,
    device: u64,
}

impl FileCa {
    /// Reads the root from `dir`, with the default minimum overlap for rotations.
    pub fn open(dir: &Path) -> Result<Arc<FileCa>, CaError> {
        Self::open_with_min_overlap(dir, DEFAULT_MIN_ROOT_OVERLAP)
    }

    /// Reads the root from `dir`; a replaced root stays trusted for at least `min_overlap`.
    pub fn open_with_min_overlap(
        dir: &Path,
        min_overlap: Duration,
    ) -> Result<Arc<FileCa>, CaError> {
        let fingerprint = Fingerprint::of(dir);
        let root = Signer::load(dir)?;
        Ok(Arc::new(FileCa {
            dir: Some(dir.to_owned()),
            min_overlap,
            longest_lifetime: Mutex::new(Duration::ZERO),
            state: RwLock::new(State {
                current: Arc::new(root),
                retired: Vec::new(),
                loaded: Some(fingerprint),
                rejected: None,
            }),
        }))
    }

    /// A CA with a fresh development root held only in memory (no files, no rotation).
    #[cfg(any(test, feature = "testing"))]
    pub fn ephemeral() -> Arc<FileCa> {
        let (cert, key) = generate_root().expect("generating an in-memory root");
        let root = Signer::self_signed(cert.der().clone(), key, Path::new("(memory)"))
            .expect("a freshly generated root is valid");
        Arc::new(FileCa {
            dir: None,
            min_overlap: DEFAULT_MIN_ROOT_OVERLAP,
            longest_lifetime: Mutex::new(Duration::ZERO),
            state: RwLock::new(State {
                current: Arc::new(root),
                retired: Vec::new(),
                loaded: None,
                rejected: None,
            }),
        })
    }

    /// The root new leaves chain to (the first of them, when there are several).
    pub fn current_root(&self) -> CertificateDer<'static> {
        self.read().current.roots[0].clone()
    }

    /// The certificates that follow a leaf this CA signs now (empty when the root signs).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.read().current.chain.clone()
    }

    /// Signs a CSR for `identity` (see [`CertificateAuthority::sign`]), at once.
    pub fn sign_now(&self, csr_der: &[u8], identity: &Identity, lifetime: Duration) -> SignResult {
        if lifetime < MIN_LEAF_LIFETIME {
            return Err(CaError::Sign {
                identity: identity.to_string(),
                reason: format!("lifetime {lifetime:?} is shorter than {MIN_LEAF_LIFETIME:?}"),
            });
        }
        let key = csr_public_key(csr_der).map_err(|reason| CaError::InvalidCsr {
            identity: identity.to_string(),
            reason,
        })?;
        {
            let mut longest = self
                .longest_lifetime
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            *longest = (*longest).max(lifetime);
        }
        let signer = self.read().current.clone();
        let leaf = signer.issue(&key, identity, lifetime)?;
        Ok(std::iter::once(leaf)
            .chain(signer.chain.iter().cloned())
            .collect())
    }

    /// A certificate and a key generated here for `names`: what `ca serve` presents to its
    /// clients (DNS names), and the credentials proxies authenticate to it with (a URI).
    /// Returns the chain (leaf first) and the key.
    pub fn sign_new_key(
        &self,
        names: &[SubjectName],
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, KeyPair), CaError> {
        let described: Vec<String> = names.iter().map(ToString::to_string).collect();
        let fail = |reason: String| CaError::Sign {
            identity: described.join(","),
            reason,
        };
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(e.to_string()))?;
        let signer = self.read().current.clone();
        let mut params = signer.leaf_params(lifetime).map_err(fail)?;
        params.subject_alt_names = names
            .iter()
            .map(|name| {
                let (text, make): (&str, fn(Ia5String) -> SanType) = match name {
                    SubjectName::Dns(n) => (n, SanType::DnsName),
                    SubjectName::Uri(u) => (u, SanType::URI),
                };
                Ia5String::try_from(text)
                    .map(make)
                    .map_err(|e| fail(format!("{text:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&key, &signer.issuer)
            .map_err(|e| fail(e.to_string()))?;
        let chain = std::iter::once(cert.der().clone())
            .chain(signer.chain.iter().cloned())
            .collect();
        Ok((chain, key))
    }

    /// Re-reads the files if they changed since the last look. `Ok(true)` when a new root
    /// was installed; `Ok(false)` when nothing changed (or the same root was rewritten);
    /// an error when changed files do not hold a valid root (the current root stays, and
    /// those files are not retried until they change again).
    pub fn reload(&self) -> Result<bool, CaError> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        let fingerprint = Fingerprint::of(dir);
        {
            let state = self.read();
            if Some(fingerprint) == state.loaded || Some(fingerprint) == state.rejected {
                return Ok(false);
            }
        }
        match Signer::load(dir) {
            Ok(root) => Ok(self.install(root, fingerprint)),
            Err(e) => {
                self.write().rejected = Some(fingerprint);
                Err(e)
            }
        }
    }

    /// Polls the files every `interval` and reloads them when they change (see
    /// [`FileCa`] for the rotation rule). The task ends when the CA is dropped.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(ca) = weak.upgrade() else { return };
                if ca.dir.is_none() {
                    return;
                }
                match tokio::task::spawn_blocking(move || ca.reload()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => {
                        tracing::error!(%error, "ignoring changed root CA files; keeping the current root")
                    }
                    Err(error) => tracing::error!(%error, "root CA reload task failed"),
                }
            }
        })
    }

    fn install(&self, signer: Signer, fingerprint: Fingerprint) -> bool {
        let longest = *self
            .longest_lifetime
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut state = self.write();
        state.loaded = Some(fingerprint);
        state.rejected = None;
        if signer.cert == state.current.cert
            && signer.chain == state.current.chain
            && signer.roots == state.current.roots
        {
            return false;
        }
        let now = SystemTime::now();
        let old = std::mem::replace(&mut state.current, Arc::new(signer));
        let until = (now + self.min_overlap.max(longest * 2)).max(old.last_leaf_not_after());
        let current = state.current.clone();
        let dropped: Vec<_> = old
            .roots
            .iter()
            .filter(|r| !current.roots.contains(r))
            .cloned()
            .collect();
        state.retired.retain(|r| {
            !current.roots.contains(&r.cert) && !dropped.contains(&r.cert) && r.until > now
        });
        state.retired.extend(dropped.iter().map(|cert| Retired {
            cert: cert.clone(),
            until,
        }));
        tracing::info!(
            dir = %self.dir.as_deref().unwrap_or(Path::new("(memory)")).display(),
            new_signer = %current.subject,
            old_signer = %old.subject,
            replaced_roots = dropped.len(),
            old_roots_trusted_for_s = until.duration_since(now).unwrap_or_default().as_secs(),
            "certificate authority rotated; replaced roots stay trusted during the overlap"
        );
        true
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl CertificateAuthority for FileCa {
    fn sign<'a>(
        &'a self,
        csr_der: &'a [u8],
        identity: &'a Identity,
        lifetime: Duration,
    ) -> SignFuture<'a> {
        Box::pin(std::future::ready(
            self.sign_now(csr_der, identity, lifetime),
        ))
    }

    fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
        let state = self.read();
        let now = SystemTime::now();
        state
            .current
            .roots
            .iter()
            .cloned()
            .chain(
                state
                    .retired
                    .iter()
                    .filter(|r| r.until > now)
                    .map(|r| r.cert.clone()),
            )
            .collect()
    }
}

/// A subject alternative name of a certificate made by [`FileCa::sign_new_key`].
#[derive(Clone, Debug)]
pub enum SubjectName {
    Dns(String),
    Uri(String),
}

impl std::fmt::Display for SubjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubjectName::Dns(n) | SubjectName::Uri(n) => f.write_str(n),
        }
    }
}

/// `mesh-agent ca init --out DIR`: writes a new self-signed development root (ECDSA P-256,
/// CA:true, keyCertSign + cRLSign, 10 years) to `out`, the key with mode 0600. Refuses to
/// overwrite an existing root. Prints nothing.
pub fn init_ca(out: &Path) -> Result<(), CaError> {
    fs::create_dir_all(out).map_err(|source| CaError::Write {
        path: out.to_owned(),
        source,
    })?;
    let cert_path = out.join(ROOT_CERT_FILE);
    let key_path = out.join(ROOT_KEY_FILE);
    for path in [&cert_path, &key_path] {
        if path.symlink_metadata().is_ok() {
            return Err(CaError::AlreadyExists { path: path.clone() });
        }
    }
    let (cert, key) = generate_root()?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    if let Err(e) = write_new(&cert_path, cert.pem().as_bytes(), 0o644) {
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    Ok(())
}

/// Creates `path` (never replacing a file) with `mode` and writes `contents`.
pub(crate) fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    use std::io::Write;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => CaError::AlreadyExists {
                path: path.to_owned(),
            },
            _ => CaError::Write {
                path: path.to_owned(),
                source,
            },
        })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|source| CaError::Write {
            path: path.to_owned(),
            source,
        })
}

/// A new self-signed development root and its key.
pub(crate) fn generate_root() -> Result<(rcgen::Certificate, KeyPair), CaError> {
    let generate = |e: rcgen::Error| CaError::Generate {
        reason: e.to_string(),
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
    let mut params = CertificateParams::default();
    let serial = random_serial().map_err(|reason| CaError::Generate { reason })?;
    // A distinct subject per root keeps roots apart in logs and path building.
    let tag: String = serial.to_bytes()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "mesh-agent");
    params.distinguished_name.push(
        DnType::CommonName,
        format!("mesh-agent development root {tag}"),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + DEV_ROOT_LIFETIME).into();
    params.serial_number = Some(serial);
    let cert = params.self_signed(&key).map_err(generate)?;
    Ok((cert, key))
}

/// A certificate and key that sign leaves, with what leaves carry and verify against.
struct Signer {
    /// The certificate that signs leaves: the root itself, or an intermediate.
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// Whether the signing certificate has a subjectKeyIdentifier (then leaves carry it as
    /// their authorityKeyIdentifier).
    has_ski: bool,
    subject: String,
    not_after: SystemTime,
    /// What follows a leaf on the wire: the signing certificate when it is not a root, and
    /// the intermediates above it (never a root).
    chain: Vec<CertificateDer<'static>>,
    /// The roots leaves verify against: the trust bundle.
    roots: Vec<CertificateDer<'static>>,
    /// notAfter of the last leaf this signer signed.
    last_leaf_not_after: Mutex<SystemTime>,
}

impl Signer {
    /// Reads and validates the CA in `dir`, in whichever layout it is (see [`FileCa`]).
    fn load(dir: &Path) -> Result<Signer, CaError> {
        if dir.join(CA_KEY_FILE).symlink_metadata().is_ok() {
            return Self::load_plugin(dir);
        }
        let cert_path = dir.join(ROOT_CERT_FILE);
        let cert = one_certificate(&cert_path, &read_file(&cert_path)?)?;
        let key = read_key(&dir.join(ROOT_KEY_FILE))?;
        Signer::self_signed(cert, key, dir)
    }

    /// Istio's plug-in layout: ca-cert.pem and ca-key.pem sign, cert-chain.pem follows the
    /// leaves, root-cert.pem is trusted.
    fn load_plugin(dir: &Path) -> Result<Signer, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let cert = one_certificate(&cert_path, &read_file(&cert_path)?)?;
        let key = read_key(&dir.join(CA_KEY_FILE))?;
        let roots_path = dir.join(ROOT_CERT_FILE);
        let roots = certificates(&roots_path, &read_file(&roots_path)?)?;
        if roots.is_empty() {
            return Err(invalid(&roots_path, "no certificate in the file".into()));
        }
        let chain_path = dir.join(CERT_CHAIN_FILE);
        let chain = match fs::read(&chain_path) {
            Ok(pem) => {
                let listed = certificates(&chain_path, &pem)?;
                if listed.first() != Some(&cert) && !roots.contains(&cert) {
                    return Err(invalid(
                        &chain_path,
                        format!(
                            "the chain must begin with {CA_CERT_FILE}, the certificate that signs"
                        ),
                    ));
                }
                listed.into_iter().filter(|c| !roots.contains(c)).collect()
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if roots.contains(&cert) {
                    Vec::new()
                } else {
                    vec![cert.clone()]
                }
            }
            Err(source) => {
                return Err(CaError::Read {
                    path: chain_path,
                    source,
                });
            }
        };
        Signer::new(cert, key, chain, roots, dir)
    }

    /// A self-signed root that signs leaves itself.
    fn self_signed(
        cert: CertificateDer<'static>,
        key: KeyPair,
        dir: &Path,
    ) -> Result<Signer, CaError> {
        Signer::new(cert.clone(), key, Vec::new(), vec![cert], dir)
    }

    /// Validates the signing certificate, its key and the roots, and proves that leaves it
    /// signs verify against the roots through the chain.
    fn new(
        cert: CertificateDer<'static>,
        key: KeyPair,
        chain: Vec<CertificateDer<'static>>,
        roots: Vec<CertificateDer<'static>>,
        dir: &Path,
    ) -> Result<Signer, CaError> {
        let invalid = |reason: String| invalid(dir, reason);
        let now = SystemTime::now();
        for root in &roots {
            let (_, parsed) = X509Certificate::from_der(root)
                .map_err(|e| invalid(format!("a root in {ROOT_CERT_FILE} does not parse: {e}")))?;
            let subject = parsed.subject().to_string();
            if !matches!(parsed.basic_constraints(), Ok(Some(bc)) if bc.value.ca) {
                return Err(invalid(format!(
                    "root {subject:?} is not a CA (basicConstraints CA:true missing)"
                )));
            }
            if to_system_time(parsed.validity().not_after.timestamp()) <= now {
                return Err(invalid(format!("root {subject:?} has expired")));
            }
        }
        let (_, parsed) = X509Certificate::from_der(&cert)
            .map_err(|e| invalid(format!("the signing certificate does not parse: {e}")))?;
        let subject = parsed.subject().to_string();
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(invalid(format!(
                "the {} key is not the key of the certificate {subject:?}",
                keys::describe(&key)
            )));
        }
        if !matches!(parsed.basic_constraints(), Ok(Some(bc)) if bc.value.ca) {
            return Err(invalid(format!(
                "certificate {subject:?} is not a CA (basicConstraints CA:true missing)"
            )));
        }
        let not_after = to_system_time(parsed.validity().not_after.timestamp());
        if not_after <= now {
            return Err(invalid(format!("certificate {subject:?} has expired")));
        }
        let distinguished_name = rcgen_name(parsed.subject())
            .map_err(|e| invalid(format!("subject {subject:?}: {e}")))?;
        let ski = parsed
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            });
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name;
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let has_ski = ski.is_some();
        if let Some(ski) = ski {
            params.key_identifier_method = KeyIdMethod::PreSpecified(ski);
        }
        let signer = Signer {
            issuer: Issuer::new(params, key),
            has_ski,
            subject,
            not_after,
            chain,
            roots,
            last_leaf_not_after: Mutex::new(UNIX_EPOCH),
            cert,
        };
        signer.probe().map_err(|e| {
            invalid(format!(
                "leaves signed by {:?} do not verify against {ROOT_CERT_FILE}: {e}",
                signer.subject
            ))
        })?;
        Ok(signer)
    }

    /// Signs a throwaway leaf and verifies it, with the chain, against the roots alone:
    /// catches a subject that cannot be reproduced byte for byte as the leaves' issuer, a
    /// chain that does not lead to a root, and a root that is not the chain's.
    fn probe(&self) -> Result<(), String> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let probe_id = Identity::new("probe.invalid", "probe", "probe");
        let leaf = self
            .sign_leaf(&key, &probe_id, Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
        let anchors = self
            .roots
            .iter()
            .map(|root| webpki::anchor_from_trusted_cert(root).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let leaf = webpki::EndEntityCert::try_from(&leaf).map_err(|e| e.to_string())?;
        leaf.verify_for_usage(
            crypto_provider().signature_verification_algorithms.all,
            &anchors,
            &self.chain,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
    }

    /// Signs a leaf for `identity` and remembers its notAfter for the overlap rule.
    fn issue(
        &self,
        key: &impl PublicKeyData,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<CertificateDer<'static>, CaError> {
        let leaf = self.sign_leaf(key, identity, lifetime)?;
        let not_after = leaf_not_after(SystemTime::now(), lifetime, self.not_after);
        let mut last = self
            .last_leaf_not_after
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *last = (*last).max(not_after);
        Ok(leaf)
    }

    /// What every leaf of this signer has: no subject, CA:false, digitalSignature +
    /// keyEncipherment, the validity window and a random serial.
    fn leaf_params(&self, lifetime: Duration) -> Result<CertificateParams, String> {
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = leaf_not_after(now, lifetime, self.not_after).into();
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = self.has_ski;
        Ok(params)
    }

    fn sign_leaf(
        &self,
        key: &impl PublicKeyData,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<CertificateDer<'static>, CaError> {
        let fail = |reason: String| CaError::Sign {
            identity: identity.to_string(),
            reason,
        };
        let uri = Ia5String::try_from(identity.to_string()).map_err(|e| fail(e.to_string()))?;
        let mut params = self.leaf_params(lifetime).map_err(fail)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(key, &self.issuer)
            .map_err(|e| fail(e.to_string()))?;
        Ok(cert.der().clone())
    }

    fn last_leaf_not_after(&self) -> SystemTime {
        *self
            .last_leaf_not_after
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

fn invalid(path: &Path, reason: String) -> CaError {
    CaError::InvalidRoot {
        path: path.to_owned(),
        reason,
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, CaError> {
    fs::read(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    keys::load_signing_key(&read_file(path)?).map_err(|reason| invalid(path, reason))
}

/// Every certificate in a PEM file.
fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CaError> {
    rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("not PEM: {e}")))
}

/// Exactly one certificate in a PEM file.
fn one_certificate(path: &Path, pem: &[u8]) -> Result<CertificateDer<'static>, CaError> {
    let certs = certificates(path, pem)?;
    let [cert] = <[_; 1]>::try_from(certs).map_err(|certs| {
        invalid(
            path,
            format!("expected exactly one certificate, found {}", certs.len()),
        )
    })?;
    Ok(cert)
}

/// now + lifetime, rounded up to the second (certificate times have no fractions, and a
/// leaf must not live shorter than asked), but never past the root's own notAfter.
fn leaf_not_after(now: SystemTime, lifetime: Duration, root_not_after: SystemTime) -> SystemTime {
    let end = (now + lifetime)
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let rounded =
        UNIX_EPOCH + Duration::from_secs(end.as_secs() + u64::from(end.subsec_nanos() > 0));
    rounded.min(root_not_after)
}

pub(super) fn to_system_time(unix_seconds: i64) -> SystemTime {
    match u64::try_from(unix_seconds) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH,
    }
}

/// A positive 126-bit random serial of fixed length (16 bytes).
fn random_serial() -> Result<SerialNumber, String> {
    let mut bytes = [0u8; 16];
    random_bytes(&mut bytes)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// The subject public key of a CSR, once its signature proves possession of the key.
struct CsrKey(Vec<u8>);

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// Parses a PKCS#10 CSR, requires an ECDSA P-256 key and an ecdsa-with-SHA256 signature,
/// and checks the signature (proof of possession).
fn csr_public_key(csr_der: &[u8]) -> Result<CsrKey, String> {
    let (rest, csr) = X509CertificationRequest::from_der(csr_der)
        .map_err(|e| format!("not a DER PKCS#10 request: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the request".into());
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| Oid::try_from(p).ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        return Err("the key is not ECDSA P-256".into());
    }
    if csr.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
        return Err(format!(
            "signature algorithm {} is not ecdsa-with-SHA256",
            csr.signature_algorithm.algorithm
        ));
    }
    let key = spki.subject_public_key.data.to_vec();
    webpki::ring::ECDSA_P256_SHA256
        .verify_signature(&key, info.raw, &csr.signature_value.data)
        .map_err(|_| "the signature does not verify with the request's key".to_string())?;
    Ok(CsrKey(key))
}

/// Re-creates an X.509 name for rcgen so that leaves carry the root's subject byte for byte
/// as their issuer (checked afterwards by [`Root::probe`]).
fn rcgen_name(name: &X509Name<'_>) -> Result<DistinguishedName, String> {
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err("empty or multi-valued RDNs are not supported".into());
        };
        let oid = attr.attr_type();
        let arcs: Vec<u64> = oid
            .iter()
            .ok_or_else(|| format!("attribute type {oid} does not fit in 64-bit arcs"))?
            .collect();
        let ty = DnType::from_oid(&arcs);
        if dn.get(&ty).is_some() {
            return Err(format!("attribute {oid} appears twice"));
        }
        let value = attr.attr_value();
        let text = std::str::from_utf8(value.data)
            .map_err(|_| format!("attribute {oid} is not valid text"))?;
        let value = match value.header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
            Tag::PrintableString => DnValue::PrintableString(
                PrintableString::try_from(text).map_err(|e| format!("attribute {oid}: {e}"))?,
            ),
            Tag::Ia5String => DnValue::Ia5String(
                Ia5String::try_from(text).map_err(|e| format!("attribute {oid}: {e}"))?,
            ),
            tag => return Err(format!("attribute {oid} has unsupported string type {tag}")),
        };
        dn.push(ty, value);
    }
    Ok(dn)
}

impl Fingerprint {
    fn of(dir: &Path) -> Fingerprint {
        let stamp = |name| {
            fs::metadata(dir.join(name)).ok().map(|m| FileStamp {
                mtime: m.mtime(),
                mtime_nsec: m.mtime_nsec(),
                len: m.len(),
                inode: m.ino(),
                device: m.dev(),
            })
        };
        Fingerprint([
            stamp(ROOT_CERT_FILE),
            stamp(ROOT_KEY_FILE),
            stamp(CA_CERT_FILE),
            stamp(CA_KEY_FILE),
            stamp(CERT_CHAIN_FILE),
        ])
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::identity::testing::{TempDir, replace_root};

    fn csr_for(id: &Identity) -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap();
        (key, csr.der().to_vec())
    }

    fn verifies(
        leaf: &CertificateDer<'_>,
        bundle: &[CertificateDer<'static>],
    ) -> Result<(), webpki::Error> {
        let anchors: Vec<_> = bundle
            .iter()
            .map(|c| webpki::anchor_from_trusted_cert(c).unwrap())
            .collect();
        webpki::EndEntityCert::try_from(leaf)?
            .verify_for_usage(
                crypto_provider().signature_verification_algorithms.all,
                &anchors,
                &[],
                UnixTime::now(),
                webpki::KeyUsage::server_auth(),
                None,
                None,
            )
            .map(|_| ())
    }

    #[test]
    fn leaf_has_only_uri_san_and_no_common_name() {
        use x509_parser::extensions::GeneralName;
        let ca = FileCa::ephemeral();
        let id = Identity::new("cluster.local", "default", "reviews");
        let (key, csr) = csr_for(&id);
        let lifetime = Duration::from_secs(3600);
        let before = SystemTime::now();
        let chain = ca.sign_now(&csr, &id, lifetime).unwrap();
        assert_eq!(chain.len(), 1, "the leaf alone, signed by the root");
        let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();

        assert_eq!(
            leaf.subject().iter().count(),
            0,
            "empty subject: no common name"
        );
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "SAN is critical when the subject is empty");
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI(
                "spiffe://cluster.local/ns/default/sa/reviews"
            )]
        );
        assert!(!leaf.is_ca());
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment());
        assert!(!ku.key_cert_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth && !eku.any);
        assert_eq!(
            leaf.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw(),
            "the CSR's key"
        );
        assert_eq!(
            leaf.public_key().algorithm.algorithm,
            OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        assert_eq!(
            leaf.signature_algorithm.algorithm,
            OID_SIG_ECDSA_WITH_SHA256
        );
        assert_eq!(leaf.raw_serial().len(), 16);
        assert!(leaf.raw_serial()[0] & 0x80 == 0, "positive serial");

        let not_before = to_system_time(leaf.validity().not_before.timestamp());
        let not_after = to_system_time(leaf.validity().not_after.timestamp());
        assert!(not_before <= before - CLOCK_SKEW + Duration::from_secs(1));
        assert!(not_after >= before + lifetime);
        assert!(not_after <= SystemTime::now() + lifetime + Duration::from_secs(1));
        verifies(&chain[0], &ca.trust_bundle()).unwrap();
    }

    #[test]
    fn leaves_get_distinct_random_serials() {
        let ca = FileCa::ephemeral();
        let id = Identity::new("cluster.local", "default", "reviews");
        let (_, csr) = csr_for(&id);
        let serials: std::collections::HashSet<Vec<u8>> = (0..8)
            .map(|_| {
                let chain = ca.sign_now(&csr, &id, Duration::from_secs(60)).unwrap();
                X509Certificate::from_der(&chain[0])
                    .unwrap()
                    .1
                    .raw_serial()
                    .to_vec()
            })
            .collect();
        assert_eq!(serials.len(), 8);
    }

    #[test]
    fn csr_must_prove_possession_of_a_p256_key() {
        let ca = FileCa::ephemeral();
        let id = Identity::new("cluster.local", "default", "reviews");
        let (_, good) = csr_for(&id);
        let mut tampered = good.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1; // the signature's last byte
        let p384 = {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
            CertificateParams::default()
                .serialize_request(&key)
                .unwrap()
                .der()
                .to_vec()
        };
        let ed25519 = {
            let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            CertificateParams::default()
                .serialize_request(&key)
                .unwrap()
                .der()
                .to_vec()
        };
        let cases: [(&str, &[u8], Option<&str>); 5] = [
            ("valid", &good, None),
            ("bad signature", &tampered, Some("does not verify")),
            ("P-384 key", &p384, Some("not ECDSA P-256")),
            ("Ed25519 key", &ed25519, Some("not ECDSA P-256")),
            ("garbage", b"not a csr", Some("not a DER PKCS#10")),
        ];
        for (name, csr, want) in cases {
            match (ca.sign_now(csr, &id, Duration::from_secs(60)), want) {
                (Ok(_), None) => {}
                (Err(e), Some(want)) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains(want) && msg.contains(&id.to_string()),
                        "{name}: {msg}"
                    );
                }
                (r, _) => panic!("{name}: unexpected {:?}", r.map(|_| ())),
            }
        }
    }

    #[test]
    fn init_ca_refuses_to_overwrite() {
        let dir = TempDir::new("init-ca");
        init_ca(dir.path()).unwrap();
        let cert = fs::read(dir.path().join(ROOT_CERT_FILE)).unwrap();
        let key = fs::read(dir.path().join(ROOT_KEY_FILE)).unwrap();
        let mode = fs::metadata(dir.path().join(ROOT_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the key is private");

        let err = init_ca(dir.path()).unwrap_err();
        assert!(matches!(err, CaError::AlreadyExists { .. }), "{err}");
        assert!(err.to_string().contains(ROOT_CERT_FILE), "{err}");
        assert_eq!(fs::read(dir.path().join(ROOT_CERT_FILE)).unwrap(), cert);
        assert_eq!(fs::read(dir.path().join(ROOT_KEY_FILE)).unwrap(), key);

        // Either file alone already counts as a root.
        fs::remove_file(dir.path().join(ROOT_CERT_FILE)).unwrap();
        let err = init_ca(dir.path()).unwrap_err();
        assert!(err.to_string().contains(ROOT_KEY_FILE), "{err}");
        assert_eq!(fs::read(dir.path().join(ROOT_KEY_FILE)).unwrap(), key);
    }

    #[test]
    fn init_ca_output_is_a_valid_file_ca() {
        let dir = TempDir::new("init-ca-open");
        init_ca(&dir.path().join("nested")).unwrap();
        let ca = FileCa::open(&dir.path().join("nested")).unwrap();
        let root = ca.current_root();
        let (_, parsed) = X509Certificate::from_der(&root).unwrap();
        assert!(parsed.is_ca());
        assert!(parsed.key_usage().unwrap().unwrap().value.key_cert_sign());
        let years = parsed.validity().time_to_expiration().unwrap().whole_days() / 365;
        assert!((9..=10).contains(&years), "{years}");
    }

    #[test]
    fn open_rejects_invalid_roots() {
        let (cert, key) = generate_root().unwrap();
        let (_, other_key) = generate_root().unwrap();
        // A leaf and its own key: the key matches, but the certificate is no CA.
        let (leaf_pem, leaf_key) = {
            let ca = FileCa::ephemeral();
            let id = Identity::new("cluster.local", "default", "x");
            let (leaf_key, csr) = csr_for(&id);
            let der = ca
                .sign_now(&csr, &id, Duration::from_secs(60))
                .unwrap()
                .remove(0);
            (pem("CERTIFICATE", &der), leaf_key)
        };
        let sec1 = sec1_pem_of(&key);
        let cases: [(&str, String, String, &str); 6] = [
            ("missing key", cert.pem(), String::new(), "no private key"),
            (
                "key of another root",
                cert.pem(),
                other_key.serialize_pem(),
                "is not the key",
            ),
            (
                "no certificate",
                String::new(),
                key.serialize_pem(),
                "exactly one certificate, found 0",
            ),
            (
                "two certificates",
                cert.pem() + &cert.pem(),
                key.serialize_pem(),
                "found 2",
            ),
            (
                "leaf, not a CA",
                leaf_pem,
                leaf_key.serialize_pem(),
                "is not a CA",
            ),
            ("SEC1 key is accepted", cert.pem(), sec1, ""),
        ];
        for (name, cert_pem, key_pem, want) in cases {
            let dir = TempDir::new("open-invalid");
            fs::write(dir.path().join(ROOT_CERT_FILE), cert_pem).unwrap();
            fs::write(dir.path().join(ROOT_KEY_FILE), key_pem).unwrap();
            match FileCa::open(dir.path()) {
                Ok(_) => assert!(want.is_empty(), "{name}: accepted"),
                Err(e) => {
                    assert!(!want.is_empty(), "{name}: {e}");
                    assert!(e.to_string().contains(want), "{name}: {e}");
                }
            }
        }
        let missing = TempDir::new("open-missing");
        let err = FileCa::open(missing.path()).err().unwrap();
        assert!(err.to_string().contains(ROOT_CERT_FILE), "{err}");
    }

    #[test]
    fn rotated_root_leaves_the_bundle_after_the_overlap() {
        let dir = TempDir::new("overlap");
        init_ca(dir.path()).unwrap();
        let ca = FileCa::open_with_min_overlap(dir.path(), Duration::ZERO).unwrap();
        let id = Identity::new("cluster.local", "default", "x");
        let (_, csr) = csr_for(&id);
        let old_leaf = ca
            .sign_now(&csr, &id, Duration::from_secs(1))
            .unwrap()
            .remove(0);
        let old_root = ca.current_root();

        replace_root(dir.path());
        assert!(ca.reload().unwrap(), "a new root is installed");
        assert!(!ca.reload().unwrap(), "unchanged files are not reloaded");
        let new_root = ca.current_root();
        assert_ne!(new_root, old_root);
        assert_eq!(ca.trust_bundle(), vec![new_root.clone(), old_root.clone()]);
        verifies(&old_leaf, &ca.trust_bundle()).unwrap();

        // Longest lifetime 1 s, so the old root goes 2 s after the rotation.
        std::thread::sleep(Duration::from_millis(2500));
        assert_eq!(ca.trust_bundle(), vec![new_root]);
    }

    #[test]
    fn invalid_root_change_is_ignored_until_the_files_change_again() {
        let dir = TempDir::new("invalid-change");
        init_ca(dir.path()).unwrap();
        let ca = FileCa::open(dir.path()).unwrap();
        let root = ca.current_root();
        // A new key without its certificate (a half-done rotation).
        let (_, key) = generate_root().unwrap();
        fs::write(dir.path().join(ROOT_KEY_FILE), key.serialize_pem()).unwrap();
        let err = ca.reload().unwrap_err();
        assert!(err.to_string().contains("is not the key"), "{err}");
        assert!(
            !ca.reload().unwrap(),
            "the same broken files are not retried"
        );
        assert_eq!(ca.trust_bundle(), vec![root.clone()]);
        let id = Identity::new("cluster.local", "default", "x");
        let (_, csr) = csr_for(&id);
        let leaf = ca
            .sign_now(&csr, &id, Duration::from_secs(60))
            .unwrap()
            .remove(0);
        verifies(&leaf, &[root]).unwrap();
    }

    /// Verifies a chain as a peer does: the leaf, the intermediates it came with, the roots.
    fn verifies_chain(
        chain: &[CertificateDer<'static>],
        bundle: &[CertificateDer<'static>],
    ) -> Result<(), String> {
        crate::identity::tls::verify_chain(
            &crypto_provider(),
            bundle,
            &chain[0],
            &chain[1..],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        )
    }

    #[test]
    fn istio_plug_in_files_sign_leaves_that_carry_the_chain_and_verify_against_the_root() {
        use crate::identity::testing::{KeyKind, write_plugin_ca};
        use x509_parser::oid_registry::OID_PKCS1_SHA256WITHRSA;
        let cases = [
            // The issue's case: an RSA root (PKCS#1 key) above an ECDSA intermediate (SEC1).
            (KeyKind::Rsa, KeyKind::EcP256, OID_SIG_ECDSA_WITH_SHA256),
            // Istio's sample: the intermediate's own key is RSA.
            (KeyKind::EcP384, KeyKind::Rsa, OID_PKCS1_SHA256WITHRSA),
            (
                KeyKind::Rsa,
                KeyKind::EcP384,
                x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA384,
            ),
        ];
        for (root, intermediate, leaf_signature) in cases {
            let dir = TempDir::new("plugin");
            write_plugin_ca(dir.path(), root, intermediate).unwrap();
            let ca = FileCa::open(dir.path())
                .unwrap_or_else(|e| panic!("{root:?} root, {intermediate:?} intermediate: {e}"));
            let id = Identity::new("cluster.local", "default", "reviews");
            let (_, csr) = csr_for(&id);
            let chain = ca.sign_now(&csr, &id, Duration::from_secs(3600)).unwrap();
            let ca_cert = certificates(
                Path::new(CA_CERT_FILE),
                &fs::read(dir.path().join(CA_CERT_FILE)).unwrap(),
            )
            .unwrap();
            let root_cert = fs::read(dir.path().join(ROOT_CERT_FILE)).unwrap();
            let roots = certificates(Path::new(ROOT_CERT_FILE), &root_cert).unwrap();
            assert_eq!(chain.len(), 2, "leaf and intermediate, no root");
            assert_eq!(chain[1], ca_cert[0]);
            assert_eq!(ca.trust_bundle(), roots, "the bundle is the root alone");
            verifies_chain(&chain, &roots).unwrap();
            assert!(
                verifies_chain(&chain[..1], &roots).is_err(),
                "without the intermediate the leaf does not verify"
            );
            let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
            assert_eq!(leaf.signature_algorithm.algorithm, leaf_signature);
            let (_, issuer) = X509Certificate::from_der(&chain[1]).unwrap();
            assert_eq!(leaf.issuer(), issuer.subject());
        }
    }

    #[test]
    fn plug_in_files_that_do_not_fit_together_are_refused_with_the_file_and_reason() {
        use crate::identity::testing::{KeyKind, write_plugin_ca};
        let good = TempDir::new("plugin-good");
        write_plugin_ca(good.path(), KeyKind::EcP256, KeyKind::EcP256).unwrap();
        let other = TempDir::new("plugin-other");
        write_plugin_ca(other.path(), KeyKind::EcP256, KeyKind::EcP256).unwrap();
        let copy = |from: &Path, to: &Path| {
            for f in [CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE] {
                fs::copy(from.join(f), to.join(f)).unwrap();
            }
        };
        type Mutate = fn(&Path, &Path);
        let cases: [(&str, Mutate, &str); 4] = [
            (
                "root of another CA",
                |dir, other| {
                    fs::copy(other.join(ROOT_CERT_FILE), dir.join(ROOT_CERT_FILE)).unwrap();
                },
                "do not verify against root-cert.pem",
            ),
            (
                "key of another CA",
                |dir, other| {
                    fs::copy(other.join(CA_KEY_FILE), dir.join(CA_KEY_FILE)).unwrap();
                },
                "is not the key of the certificate",
            ),
            (
                "chain of another CA",
                |dir, other| {
                    fs::copy(other.join(CERT_CHAIN_FILE), dir.join(CERT_CHAIN_FILE)).unwrap();
                },
                "must begin with ca-cert.pem",
            ),
            (
                "the root's key as the signing key",
                |dir, _| {
                    fs::copy(dir.join("root-ca-key.pem"), dir.join(CA_KEY_FILE)).unwrap();
                },
                "is not the key of the certificate",
            ),
        ];
        for (name, mutate, want) in cases {
            let dir = TempDir::new("plugin-bad");
            copy(good.path(), dir.path());
            fs::copy(
                good.path().join("root-ca-key.pem"),
                dir.path().join("root-ca-key.pem"),
            )
            .unwrap();
            mutate(dir.path(), other.path());
            let err = FileCa::open(dir.path())
                .err()
                .unwrap_or_else(|| panic!("{name}: accepted"));
            assert!(err.to_string().contains(want), "{name}: {err}");
        }
        // Without cert-chain.pem the chain is the intermediate alone.
        let dir = TempDir::new("plugin-no-chain");
        copy(good.path(), dir.path());
        fs::remove_file(dir.path().join(CERT_CHAIN_FILE)).unwrap();
        let ca = FileCa::open(dir.path()).unwrap();
        assert_eq!(ca.chain().len(), 1);
    }

    #[test]
    fn a_plug_in_rotation_keeps_the_replaced_root_trusted() {
        use crate::identity::testing::{KeyKind, write_plugin_ca};
        let dir = TempDir::new("plugin-rotate");
        write_plugin_ca(dir.path(), KeyKind::Rsa, KeyKind::EcP256).unwrap();
        let ca = FileCa::open(dir.path()).unwrap();
        let old_roots = ca.trust_bundle();
        let next = TempDir::new("plugin-next");
        write_plugin_ca(next.path(), KeyKind::EcP256, KeyKind::EcP256).unwrap();
        // Key first, as a rotation by rename would; the half-done state is refused.
        fs::copy(next.path().join(CA_KEY_FILE), dir.path().join(CA_KEY_FILE)).unwrap();
        assert!(ca.reload().is_err());
        for f in [CA_CERT_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE] {
            fs::copy(next.path().join(f), dir.path().join(f)).unwrap();
        }
        assert!(ca.reload().unwrap(), "the new CA is installed");
        let bundle = ca.trust_bundle();
        assert_eq!(bundle.len(), 2, "new root and the replaced one");
        assert_eq!(bundle[1], old_roots[0]);
    }

    /// The SEC1 `ECPrivateKey` inside ring's PKCS#8 encoding of `key`, as PEM.
    fn sec1_pem_of(key: &KeyPair) -> String {
        const ALGORITHM: &[u8] = keys::P256_ALGORITHM;
        let der = key.serialize_der();
        let end = der
            .windows(ALGORITHM.len())
            .position(|w| w == ALGORITHM)
            .unwrap()
            + ALGORITHM.len();
        assert_eq!(der[end], 0x04, "OCTET STRING privateKey");
        let header = if der[end + 1] < 0x80 {
            2
        } else {
            2 + usize::from(der[end + 1] & 0x7f)
        };
        let sec1 = &der[end + header..];
        assert_eq!(
            keys::wrap_pkcs8(keys::P256_ALGORITHM, sec1),
            der,
            "wrapping undoes the extraction"
        );
        pem("EC PRIVATE KEY", sec1)
    }

    fn pem(label: &str, der: &[u8]) -> String {
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            base64(der)
        )
    }

    fn base64(data: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}
