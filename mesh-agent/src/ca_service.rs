//! The certificate authority as a service: `mesh-agent ca serve` holds the CA's key and signs
//! workload certificates for the proxies that may have them ([`server`], [`authorize`]), over
//! Istio's certificate API ([`grpc`]) so that a ztunnel can use it too; node agents,
//! waypoints and gateways ask it through [`client::RemoteCa`] and never see the key.

pub mod authorize;
pub mod client;
pub mod credential;
pub mod grpc;
pub mod server;

use std::{path::PathBuf, sync::Arc, time::Duration};

pub use client::{Credential, RemoteCa, RemoteCaConfig};

use crate::identity::{CaError, CertificateAuthority, FileCa};

/// How often a CA directory is looked at for a rotation.
pub const CA_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Where a proxy's workload certificates come from.
#[derive(Clone, Debug)]
pub enum CaSource {
    /// Signed in the process with the key in this directory (`--ca-dir`: single machine,
    /// tests; the key is on the node).
    Files(PathBuf),
    /// Asked of a CA service (`--ca-address`); the key stays there.
    Remote(RemoteCaConfig),
}

impl CaSource {
    /// Opens the CA; a directory is then watched for rotations (needs a runtime).
    pub fn open(&self) -> Result<Arc<dyn CertificateAuthority>, CaError> {
        match self {
            CaSource::Files(dir) => {
                let ca = FileCa::open(dir)?;
                ca.watch(CA_POLL_INTERVAL);
                Ok(ca)
            }
            CaSource::Remote(config) => Ok(RemoteCa::new(config.clone())?),
        }
    }
}
