//! The agent's workload certificates: one short-lived certificate per service account with a
//! pod on this node, fetched before the pod is captured, renewed at half-life and dropped
//! with the last pod. Keys are generated here and never leave the process.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType,
    string::Ia5String,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{sync::watch, task::JoinHandle};

use super::{
    CaError, CertificateAuthority, Identity, ca::to_system_time, crypto_provider, random_bytes,
    spiffe::certificate_identities,
};

/// First retry delay after a failed renewal; doubles per failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Each retry delay is multiplied by a random factor in `1 ± BACKOFF_JITTER`.
const BACKOFF_JITTER: f64 = 0.2;

/// Errors carry the identity as text (SPIFFE ID), which keeps them small.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    #[error("generating a key and CSR for {identity}: {reason}")]
    Key { identity: String, reason: String },
    #[error("certificate for {identity}: {source}")]
    Ca {
        identity: String,
        #[source]
        source: Arc<CaError>,
    },
    #[error("certificate for {identity} returned by the CA is unusable: {reason}")]
    InvalidCertificate { identity: String, reason: String },
    #[error("certificate for {identity}: released while it was being fetched")]
    Released { identity: String },
}

/// A workload certificate with its key, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: Identity,
    /// Leaf first, then any intermediates (not the root).
    pub chain: Vec<CertificateDer<'static>>,
    pub certified_key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The leaf's serial number in lowercase hex.
    pub serial: String,
}

impl WorkloadCert {
    /// Checks what a CA returned for `key` and `identity`: a leaf naming exactly `identity`,
    /// not expired, for this key.
    fn new(
        identity: &Identity,
        chain: Vec<CertificateDer<'static>>,
        key: &KeyPair,
    ) -> Result<WorkloadCert, IdentityError> {
        let invalid = |reason: String| IdentityError::InvalidCertificate {
            identity: identity.to_string(),
            reason,
        };
        let leaf = chain
            .first()
            .ok_or_else(|| invalid("empty certificate chain".into()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| invalid(format!("leaf does not parse: {e}")))?;
        let named = certificate_identities(leaf);
        if named != [identity.clone()] {
            let named: Vec<String> = named.iter().map(Identity::to_string).collect();
            return Err(invalid(format!(
                "leaf names {named:?}, not exactly {identity}"
            )));
        }
        let not_before = to_system_time(parsed.validity().not_before.timestamp());
        let not_after = to_system_time(parsed.validity().not_after.timestamp());
        if not_after <= SystemTime::now() {
            return Err(invalid("leaf has already expired".into()));
        }
        let serial = parsed
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = crypto_provider()
            .key_provider
            .load_private_key(pkcs8)
            .map_err(|e| invalid(format!("loading the private key: {e}")))?;
        let certified_key = CertifiedKey::new(chain.clone(), signing_key);
        certified_key
            .keys_match()
            .map_err(|e| invalid(format!("leaf is not for the key in the CSR: {e}")))?;
        Ok(WorkloadCert {
            identity: identity.clone(),
            chain,
            certified_key: Arc::new(certified_key),
            not_before,
            not_after,
            serial,
        })
    }
}

/// Holds one certificate per identity in use, with a count of users (pods).
///
/// [`acquire`](Self::acquire) fetches a certificate the first time an identity is used (a
/// fresh P-256 key, a CSR, the CA's signature) and then a task renews it at half of its
/// remaining validity (new key each time), retrying failures after 1 s doubling to 60 s,
/// ±20%. A renewal swaps the certificate atomically: handshakes after it present the new one,
/// established connections keep theirs. [`release`](Self::release) of the last user drops
/// the certificate and stops its renewal.
pub struct SecretManager {
    ca: Arc<dyn CertificateAuthority>,
    lifetime: Duration,
    entries: Mutex<HashMap<Identity, Entry>>,
    generations: AtomicU64,
}

struct Entry {
    /// Tells this entry from a later one for the same identity.
    generation: u64,
    users: usize,
    state: watch::Sender<CertState>,
    /// Fetches, then renews; aborted when the entry goes.
    task: JoinHandle<()>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
enum CertState {
    Fetching,
    Ready(Arc<WorkloadCert>),
    Failed(IdentityError),
}

impl SecretManager {
    pub fn new(ca: Arc<dyn CertificateAuthority>, lifetime: Duration) -> Arc<Self> {
        Arc::new(SecretManager {
            ca,
            lifetime,
            entries: Mutex::new(HashMap::new()),
            generations: AtomicU64::new(0),
        })
    }

    /// The lifetime certificates are requested with.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Counts a user of `id` and returns its certificate, fetching it first if `id` has none
    /// yet (concurrent callers share one fetch). On error the user is not counted; dropping
    /// the future before it completes does not count it either.
    pub async fn acquire(
        self: &Arc<Self>,
        id: &Identity,
    ) -> Result<Arc<WorkloadCert>, IdentityError> {
        let (generation, mut state) = {
            let mut entries = self.lock();
            let entry = entries.entry(id.clone()).or_insert_with(|| self.start(id));
            entry.users += 1;
            (entry.generation, entry.state.subscribe())
        };
        let mut user = PendingUser {
            manager: self,
            id,
            generation,
            counted: true,
        };
        loop {
            let current = state.borrow_and_update().clone();
            match current {
                CertState::Ready(cert) => {
                    user.counted = false;
                    return Ok(cert);
                }
                CertState::Failed(error) => return Err(error),
                CertState::Fetching => {}
            }
            if state.changed().await.is_err() {
                return Err(IdentityError::Released {
                    identity: id.to_string(),
                });
            }
        }
    }

    /// One user less; at zero the certificate is dropped and its renewal stops.
    pub fn release(&self, id: &Identity) {
        self.release_if(id, |_| true);
    }

    /// The certificate of `id` now, if it has one.
    pub fn current(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        let entries = self.lock();
        match &*entries.get(id)?.state.borrow() {
            CertState::Ready(cert) => Some(cert.clone()),
            _ => None,
        }
    }

    /// The roots to trust now.
    pub fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
        self.ca.trust_bundle()
    }

    /// Every identity with a certificate, sorted (for `/config_dump`).
    pub fn identities(&self) -> Vec<(Identity, Arc<WorkloadCert>)> {
        let entries = self.lock();
        let mut out: Vec<_> = entries
            .iter()
            .filter_map(|(id, e)| match &*e.state.borrow() {
                CertState::Ready(cert) => Some((id.clone(), cert.clone())),
                _ => None,
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// A new entry for `id` with no users, and its fetch-and-renew task.
    fn start(self: &Arc<Self>, id: &Identity) -> Entry {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let (state, _) = watch::channel(CertState::Fetching);
        let task = tokio::spawn(keep_fresh(
            Arc::downgrade(self),
            self.ca.clone(),
            id.clone(),
            self.lifetime,
            generation,
            state.clone(),
        ));
        Entry {
            generation,
            users: 0,
            state,
            task,
        }
    }

    fn release_if(&self, id: &Identity, same: impl FnOnce(u64) -> bool) {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(id) else {
            return;
        };
        if !same(entry.generation) {
            return;
        }
        entry.users = entry.users.saturating_sub(1);
        if entry.users == 0 {
            entries.remove(id);
            tracing::info!(identity = %id, "last user released; certificate dropped");
        }
    }

    /// Forgets the entry of `id` if it is still `generation` (its first fetch failed).
    fn forget(&self, id: &Identity, generation: u64) {
        let mut entries = self.lock();
        if entries.get(id).is_some_and(|e| e.generation == generation) {
            entries.remove(id);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Un-counts a user whose `acquire` did not complete (error or cancellation).
struct PendingUser<'a> {
    manager: &'a SecretManager,
    id: &'a Identity,
    generation: u64,
    counted: bool,
}

impl Drop for PendingUser<'_> {
    fn drop(&mut self) {
        if self.counted {
            let generation = self.generation;
            self.manager.release_if(self.id, |g| g == generation);
        }
    }
}

/// Fetches the first certificate of `id`, then renews it at half-life for as long as the
/// entry lives (the task is aborted with it).
async fn keep_fresh(
    manager: Weak<SecretManager>,
    ca: Arc<dyn CertificateAuthority>,
    id: Identity,
    lifetime: Duration,
    generation: u64,
    state: watch::Sender<CertState>,
) {
    let mut renew_in = match fetch(&ca, &id, lifetime).await {
        Ok((cert, renew_in)) => {
            tracing::info!(identity = %id, serial = %cert.serial, renew_in_ms = renew_in.as_millis() as u64, "workload certificate issued");
            state.send_replace(CertState::Ready(cert));
            renew_in
        }
        Err(error) => {
            tracing::error!(identity = %id, %error, "fetching a workload certificate failed");
            if let Some(manager) = manager.upgrade() {
                manager.forget(&id, generation);
            }
            state.send_replace(CertState::Failed(error));
            return;
        }
    };
    let mut failures = 0;
    loop {
        tokio::time::sleep(renew_in).await;
        match fetch(&ca, &id, lifetime).await {
            Ok((cert, next)) => {
                tracing::info!(identity = %id, serial = %cert.serial, renew_in_ms = next.as_millis() as u64, "workload certificate renewed");
                state.send_replace(CertState::Ready(cert));
                failures = 0;
                renew_in = next;
            }
            Err(error) => {
                failures += 1;
                renew_in = backoff(failures, random_unit());
                tracing::warn!(identity = %id, %error, attempt = failures, retry_in_ms = renew_in.as_millis() as u64, "renewing a workload certificate failed; keeping the current one");
            }
        }
    }
}

/// One key, CSR and signature. Returns the certificate and when to renew it: half of its
/// remaining validity.
async fn fetch(
    ca: &Arc<dyn CertificateAuthority>,
    id: &Identity,
    lifetime: Duration,
) -> Result<(Arc<WorkloadCert>, Duration), IdentityError> {
    let issued = SystemTime::now();
    let (key, csr) = key_and_csr(id)?;
    let chain = ca
        .sign(&csr, id, lifetime)
        .await
        .map_err(|e| IdentityError::Ca {
            identity: id.to_string(),
            source: Arc::new(e),
        })?;
    let cert = WorkloadCert::new(id, chain, &key)?;
    let renew_in = cert.not_after.duration_since(issued).unwrap_or_default() / 2;
    Ok((Arc::new(cert), renew_in))
}

/// A fresh ECDSA P-256 key and a CSR (DER) naming `id`, as ztunnel sends them.
fn key_and_csr(id: &Identity) -> Result<(KeyPair, Vec<u8>), IdentityError> {
    let key_error = |e: rcgen::Error| IdentityError::Key {
        identity: id.to_string(),
        reason: e.to_string(),
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(key_error)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        Ia5String::try_from(id.to_string()).map_err(key_error)?,
    )];
    let csr = params.serialize_request(&key).map_err(key_error)?;
    Ok((key, csr.der().to_vec()))
}

/// Delay before retry number `attempt` (1-based): 1 s doubling up to 60 s, scaled by
/// `1 ± 20%` according to `unit` in [0, 1).
fn backoff(attempt: u32, unit: f64) -> Duration {
    let doublings = attempt.saturating_sub(1).min(16);
    let base = BACKOFF_MIN.saturating_mul(1 << doublings).min(BACKOFF_MAX);
    base.mul_f64(1.0 - BACKOFF_JITTER + 2.0 * BACKOFF_JITTER * unit.clamp(0.0, 1.0))
}

/// A random number in [0, 1) (0.5 if the random source fails: no jitter then).
fn random_unit() -> f64 {
    let mut bytes = [0u8; 4];
    match random_bytes(&mut bytes) {
        Ok(()) => f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0),
        Err(_) => 0.5,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::identity::{
        FileCa,
        testing::{handshake, peer_leaf_serial},
        tls,
    };

    /// A CA that counts calls and fails the ones it is told to.
    struct ScriptedCa {
        inner: Arc<FileCa>,
        calls: AtomicUsize,
        /// Calls with these (0-based) numbers fail.
        fail: Vec<usize>,
        /// Each call sleeps this long first (a slow CA).
        delay: Duration,
    }

    impl ScriptedCa {
        fn new(fail: Vec<usize>) -> Arc<Self> {
            Arc::new(ScriptedCa {
                inner: FileCa::ephemeral(),
                calls: AtomicUsize::new(0),
                fail,
                delay: Duration::ZERO,
            })
        }
    }

    impl CertificateAuthority for ScriptedCa {
        fn sign<'a>(
            &'a self,
            csr_der: &'a [u8],
            identity: &'a Identity,
            lifetime: Duration,
        ) -> crate::identity::ca::SignFuture<'a> {
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                let n = self.calls.fetch_add(1, Ordering::SeqCst);
                if self.fail.contains(&n) {
                    return Err(CaError::Sign {
                        identity: identity.to_string(),
                        reason: format!("scripted failure of call {n}"),
                    });
                }
                self.inner.sign_now(csr_der, identity, lifetime)
            })
        }

        fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
            self.inner.trust_bundle()
        }
    }

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "default", sa)
    }

    #[tokio::test]
    async fn acquire_fetches_once_and_counts_users() {
        let ca = ScriptedCa::new(vec![]);
        let manager = SecretManager::new(ca.clone(), Duration::from_secs(3600));
        let a_id = id("a");
        let (a, b) = tokio::join!(manager.acquire(&a_id), manager.acquire(&a_id));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(
            Arc::ptr_eq(&a, &b),
            "concurrent acquires share one certificate"
        );
        assert_eq!(ca.calls.load(Ordering::SeqCst), 1);
        assert_eq!(a.identity, id("a"));
        assert_eq!(a.chain.len(), 1);
        assert!(a.not_before < SystemTime::now() && a.not_after > SystemTime::now());
        assert_eq!(a.serial.len(), 32, "16 bytes in hex");
        manager.acquire(&id("b")).await.unwrap();
        let listed: Vec<Identity> = manager.identities().into_iter().map(|(i, _)| i).collect();
        assert_eq!(listed, vec![id("a"), id("b")]);
        assert_eq!(ca.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn release_of_last_user_drops_the_certificate() {
        let ca = ScriptedCa::new(vec![]);
        let manager = SecretManager::new(ca.clone(), Duration::from_secs(2));
        manager.acquire(&id("a")).await.unwrap();
        manager.acquire(&id("a")).await.unwrap();
        manager.release(&id("a"));
        assert!(manager.current(&id("a")).is_some(), "one user left");
        manager.release(&id("a"));
        assert!(manager.current(&id("a")).is_none());
        assert!(manager.identities().is_empty());
        // Renewal has stopped: no call after the first in more than the renewal time.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(ca.calls.load(Ordering::SeqCst), 1);
        // Releasing an unknown identity is harmless; acquiring again fetches anew.
        manager.release(&id("a"));
        manager.acquire(&id("a")).await.unwrap();
        assert_eq!(ca.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn failed_first_fetch_is_reported_and_not_counted() {
        let ca = ScriptedCa::new(vec![0]);
        let manager = SecretManager::new(ca.clone(), Duration::from_secs(3600));
        let err = manager.acquire(&id("a")).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("spiffe://cluster.local/ns/default/sa/a")
                && msg.contains("scripted failure"),
            "{msg}"
        );
        assert!(manager.current(&id("a")).is_none());
        assert!(manager.identities().is_empty());
        // The next acquire tries again.
        manager.acquire(&id("a")).await.unwrap();
        manager.release(&id("a"));
        assert!(
            manager.current(&id("a")).is_none(),
            "the failed attempt left no user behind"
        );
    }

    #[tokio::test]
    async fn cancelled_acquire_does_not_leak_a_user() {
        let ca = Arc::new(ScriptedCa {
            inner: FileCa::ephemeral(),
            calls: AtomicUsize::new(0),
            fail: vec![],
            delay: Duration::from_millis(300),
        });
        let manager = SecretManager::new(ca, Duration::from_secs(3600));
        let cancelled =
            tokio::time::timeout(Duration::from_millis(50), manager.acquire(&id("a"))).await;
        assert!(cancelled.is_err());
        assert!(
            manager.lock().is_empty(),
            "the only user went away, so did the entry"
        );
        manager.acquire(&id("a")).await.unwrap();
        manager.release(&id("a"));
        assert!(manager.lock().is_empty());
    }

    #[tokio::test]
    async fn renewal_replaces_certificate_at_half_life() {
        let ca = ScriptedCa::new(vec![]);
        let manager = SecretManager::new(ca.clone(), Duration::from_secs(2));
        let server_id = id("server");
        let first = manager.acquire(&server_id).await.unwrap();
        manager.acquire(&id("client")).await.unwrap();
        let server = tls::server_config(&manager, &server_id);
        let client = tls::client_config(&manager, &id("client"), &server_id);

        let (c, s) = handshake(client.clone(), server.clone()).await;
        let (mut first_client, mut first_server) = (c.unwrap(), s.unwrap());
        assert_eq!(peer_leaf_serial(first_client.get_ref().1), first.serial);

        // Lifetime 2 s (notAfter rounded up to the second): renewed after 1 to 1.5 s.
        let renewal_due = first.not_after.duration_since(SystemTime::now()).unwrap() / 2;
        assert!(
            renewal_due <= Duration::from_millis(1500),
            "{renewal_due:?}"
        );
        let mut serials = vec![first.serial.clone()];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
        while serials.len() < 4 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let current = manager.current(&server_id).unwrap();
            if Some(&current.serial) != serials.last() {
                assert!(current.not_after > SystemTime::now());
                // A new handshake sees the new certificate, and it verifies.
                let (c, s) = handshake(client.clone(), server.clone()).await;
                let (c, _s) = (c.unwrap(), s.unwrap());
                assert_eq!(peer_leaf_serial(c.get_ref().1), current.serial);
                serials.push(current.serial.clone());
            }
        }
        assert_eq!(serials.len(), 4, "three renewals within 8 s: {serials:?}");
        // The first connection was not disturbed by the renewals.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        first_client.write_all(b"still here").await.unwrap();
        first_client.flush().await.unwrap();
        let mut buf = [0u8; 10];
        first_server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"still here");
    }

    #[tokio::test]
    async fn renewal_retries_after_a_ca_failure_and_keeps_the_old_certificate() {
        // Call 0 is the first fetch; call 1, the first renewal (after ~1 s), fails.
        let ca = ScriptedCa::new(vec![1]);
        let manager = SecretManager::new(ca.clone(), Duration::from_secs(2));
        let first = manager.acquire(&id("a")).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
        while ca.calls.load(Ordering::SeqCst) < 2 {
            assert!(tokio::time::Instant::now() < deadline, "no renewal attempt");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            manager.current(&id("a")).unwrap().serial,
            first.serial,
            "kept after the failure"
        );
        // Retried 0.8 to 1.2 s later.
        while manager.current(&id("a")).unwrap().serial == first.serial {
            assert!(tokio::time::Instant::now() < deadline, "no retry");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(ca.calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn backoff_doubles_from_one_second_to_sixty_with_twenty_percent_jitter() {
        let cases = [
            (1, 0.5, 1_000),
            (2, 0.5, 2_000),
            (3, 0.5, 4_000),
            (6, 0.5, 32_000),
            (7, 0.5, 60_000),
            (100, 0.5, 60_000),
            (1, 0.0, 800),
            (1, 0.999_999, 1_200),
            (7, 0.0, 48_000),
            (7, 0.999_999, 72_000),
        ];
        for (attempt, unit, want_ms) in cases {
            let got = backoff(attempt, unit).as_millis();
            assert!(
                got.abs_diff(want_ms) <= 1,
                "attempt {attempt}, unit {unit}: {got} ms"
            );
        }
        for _ in 0..100 {
            let u = random_unit();
            assert!((0.0..1.0).contains(&u), "{u}");
        }
    }
}
