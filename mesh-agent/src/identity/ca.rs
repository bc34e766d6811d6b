//! Certificate authorities that sign workload certificates, behind one trait. The first one,
//! [`FileCa`], signs with a root key and certificate read from a directory (`--ca-dir`) and
//! picks up a rotated root without a restart; [`init_ca`] writes a development root there.

use std::{
    fs, io,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
    string::{Ia5String, PrintableString},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
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

/// The root certificate in a CA directory (PEM, exactly one certificate).
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The root's private key in a CA directory (PEM; PKCS#8 or SEC1, ECDSA P-256).
pub const ROOT_KEY_FILE: &str = "root-key.pem";
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
    #[error("root CA in {}: {reason}", path.display())]
    InvalidRoot { path: PathBuf, reason: String },
    #[error("certificate signing request for {identity}: {reason}")]
    InvalidCsr { identity: String, reason: String },
    #[error("signing a certificate for {identity}: {reason}")]
    Sign { identity: String, reason: String },
    #[error("generating a development root: {reason}")]
    Generate { reason: String },
}

/// Something that signs workload certificates and says which roots to trust.
pub trait CertificateAuthority: Send + Sync + 'static {
    /// Signs a CSR (DER) for `identity`, returning the leaf first then any intermediates.
    ///
    /// The CSR only proves possession of the key: the certificate names `identity`, whatever
    /// the CSR asks for.
    fn sign(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError>;

    /// The roots to trust now (during a root rotation: old and new).
    fn trust_bundle(&self) -> Vec<CertificateDer<'static>>;
}

/// A CA whose root key and certificate are files in one directory ([`ROOT_CERT_FILE`],
/// [`ROOT_KEY_FILE`]; ECDSA P-256).
///
/// Leaves are ECDSA P-256 with exactly one URI SAN (the identity), an empty subject (so no
/// common name) and the SAN marked critical, no DNS SAN, key usage digitalSignature +
/// keyEncipherment, EKU serverAuth + clientAuth, basicConstraints CA:false, notBefore
/// [`CLOCK_SKEW`] in the past, notAfter = now + lifetime (rounded up to the second, capped at
/// the root's notAfter) and a random 126-bit serial. The chain returned is the leaf alone.
///
/// **Root rotation** ([`FileCa::watch`]): when the files change and hold a valid new root,
/// new leaves are signed by it at once, and the replaced root stays in the trust bundle
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
    current: Arc<Root>,
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

/// What both files look like (`None`: the file could not be stat'ed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint([Option<FileStamp>; 2]);

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
        let root = Root::load(dir)?;
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
        let root = Root::new(cert.der().clone(), key, Path::new("(memory)"))
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

    /// The root new leaves are signed by.
    pub fn current_root(&self) -> CertificateDer<'static> {
        self.read().current.cert.clone()
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
        match Root::load(dir) {
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

    fn install(&self, root: Root, fingerprint: Fingerprint) -> bool {
        let longest = *self
            .longest_lifetime
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut state = self.write();
        state.loaded = Some(fingerprint);
        state.rejected = None;
        if root.cert == state.current.cert {
            return false;
        }
        let now = SystemTime::now();
        let old = std::mem::replace(&mut state.current, Arc::new(root));
        let until = (now + self.min_overlap.max(longest * 2)).max(old.last_leaf_not_after());
        let new_cert = state.current.cert.clone();
        state
            .retired
            .retain(|r| r.cert != new_cert && r.cert != old.cert && r.until > now);
        state.retired.push(Retired {
            cert: old.cert.clone(),
            until,
        });
        tracing::info!(
            dir = %self.dir.as_deref().unwrap_or(Path::new("(memory)")).display(),
            new_root = %state.current.subject,
            old_root = %old.subject,
            old_root_trusted_for_s = until.duration_since(now).unwrap_or_default().as_secs(),
            "root CA rotated; the old root stays trusted during the overlap"
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
    fn sign(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
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
        let root = self.read().current.clone();
        let leaf = root.issue(&key, identity, lifetime)?;
        Ok(vec![leaf])
    }

    fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
        let state = self.read();
        let now = SystemTime::now();
        std::iter::once(state.current.cert.clone())
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
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
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

/// A root that signs leaves.
struct Root {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// Whether the root has a subjectKeyIdentifier (then leaves carry it as their
    /// authorityKeyIdentifier).
    has_ski: bool,
    subject: String,
    not_after: SystemTime,
    /// notAfter of the last leaf this root signed.
    last_leaf_not_after: Mutex<SystemTime>,
}

impl Root {
    /// Reads and validates the root in `dir`.
    fn load(dir: &Path) -> Result<Root, CaError> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        let read = |path: &Path| {
            fs::read(path).map_err(|source| CaError::Read {
                path: path.to_owned(),
                source,
            })
        };
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let invalid = |path: &Path, reason: String| CaError::InvalidRoot {
            path: path.to_owned(),
            reason,
        };

        let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(&cert_path, format!("not PEM: {e}")))?;
        let [cert] = <[_; 1]>::try_from(certs).map_err(|certs| {
            invalid(
                &cert_path,
                format!("expected exactly one certificate, found {}", certs.len()),
            )
        })?;
        let key = match rustls_pemfile::private_key(&mut key_pem.as_slice()) {
            Ok(Some(PrivateKeyDer::Pkcs8(k))) => k.secret_pkcs8_der().to_vec(),
            Ok(Some(PrivateKeyDer::Sec1(k))) => sec1_p256_to_pkcs8(k.secret_sec1_der()),
            Ok(Some(_)) => {
                return Err(invalid(
                    &key_path,
                    "not an EC key (the root must be ECDSA P-256)".into(),
                ));
            }
            Ok(None) => return Err(invalid(&key_path, "no private key in the file".into())),
            Err(e) => return Err(invalid(&key_path, format!("not PEM: {e}"))),
        };
        let key = KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(key),
            &PKCS_ECDSA_P256_SHA256,
        )
        .map_err(|e| invalid(&key_path, format!("not an ECDSA P-256 private key: {e}")))?;
        Root::new(cert, key, dir)
    }

    /// Validates a root certificate and its key, and proves that leaves it signs verify.
    fn new(cert: CertificateDer<'static>, key: KeyPair, dir: &Path) -> Result<Root, CaError> {
        let invalid = |reason: String| CaError::InvalidRoot {
            path: dir.to_owned(),
            reason,
        };
        let (_, parsed) = X509Certificate::from_der(&cert)
            .map_err(|e| invalid(format!("{ROOT_CERT_FILE} does not parse: {e}")))?;
        let subject = parsed.subject().to_string();
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(invalid(format!(
                "{ROOT_KEY_FILE} is not the key of the certificate {subject:?}"
            )));
        }
        if !matches!(parsed.basic_constraints(), Ok(Some(bc)) if bc.value.ca) {
            return Err(invalid(format!(
                "certificate {subject:?} is not a CA (basicConstraints CA:true missing)"
            )));
        }
        let not_after = to_system_time(parsed.validity().not_after.timestamp());
        if not_after <= SystemTime::now() {
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
        let root = Root {
            issuer: Issuer::new(params, key),
            has_ski,
            subject,
            not_after,
            last_leaf_not_after: Mutex::new(UNIX_EPOCH),
            cert,
        };
        root.probe().map_err(|e| {
            invalid(format!(
                "leaves signed by {:?} do not verify against it: {e}",
                root.subject
            ))
        })?;
        Ok(root)
    }

    /// Signs a throwaway leaf and verifies it against this root alone, catching a subject
    /// that cannot be reproduced byte for byte as the leaves' issuer.
    fn probe(&self) -> Result<(), String> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let probe_id = Identity::new("probe.invalid", "probe", "probe");
        let leaf = self
            .sign_leaf(&key, &probe_id, Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
        let anchor = webpki::anchor_from_trusted_cert(&self.cert).map_err(|e| e.to_string())?;
        let leaf = webpki::EndEntityCert::try_from(&leaf).map_err(|e| e.to_string())?;
        leaf.verify_for_usage(
            crypto_provider().signature_verification_algorithms.all,
            &[anchor],
            &[],
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
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = leaf_not_after(now, lifetime, self.not_after).into();
        params.serial_number = Some(random_serial().map_err(fail)?);
        params.use_authority_key_identifier_extension = self.has_ski;
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

/// Wraps a SEC1 `ECPrivateKey` (PEM "EC PRIVATE KEY", as openssl writes) for P-256 into
/// PKCS#8, the only form ring loads. A key of another curve fails when loaded.
fn sec1_p256_to_pkcs8(sec1: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { id-ecPublicKey, prime256v1 }
    const ALGORITHM: &[u8] = &[
        0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
        0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ];
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = body.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len
                .to_be_bytes()
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend_from_slice(body);
        out
    }
    let mut body = vec![0x02, 0x01, 0x00]; // version 0
    body.extend_from_slice(ALGORITHM);
    body.extend(tlv(0x04, sec1));
    tlv(0x30, &body)
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
        Fingerprint([stamp(ROOT_CERT_FILE), stamp(ROOT_KEY_FILE)])
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
        let chain = ca.sign(&csr, &id, lifetime).unwrap();
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
                let chain = ca.sign(&csr, &id, Duration::from_secs(60)).unwrap();
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
            match (ca.sign(csr, &id, Duration::from_secs(60)), want) {
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
                .sign(&csr, &id, Duration::from_secs(60))
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
            .sign(&csr, &id, Duration::from_secs(1))
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
            .sign(&csr, &id, Duration::from_secs(60))
            .unwrap()
            .remove(0);
        verifies(&leaf, &[root]).unwrap();
    }

    /// The SEC1 `ECPrivateKey` inside ring's PKCS#8 encoding of `key`, as PEM.
    fn sec1_pem_of(key: &KeyPair) -> String {
        const ALGORITHM: &[u8] = &[
            0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
            0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
        ];
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
            sec1_p256_to_pkcs8(sec1),
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
