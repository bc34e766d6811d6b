//! Workload identity: SPIFFE IDs per service account ([`spiffe`]), the certificate authority
//! that signs them ([`ca`]), the per-agent manager of short-lived workload certificates
//! ([`manager`]) and the mutual-TLS configurations HBONE uses ([`tls`]).
#![forbid(unsafe_code)]

pub mod ca;
pub mod manager;
pub mod spiffe;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

pub use ca::{CaError, CertificateAuthority, FileCa, init_ca};
pub use manager::{IdentityError, SecretManager, WorkloadCert};
pub use spiffe::{Identity, SpiffeError};

/// The one crypto provider of all identity and TLS code: ring, chosen explicitly (never a
/// process-wide default).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Fills `buf` from the provider's secure random source.
fn random_bytes(buf: &mut [u8]) -> Result<(), String> {
    crypto_provider()
        .secure_random
        .fill(buf)
        .map_err(|_| "the system random source failed".to_string())
}
