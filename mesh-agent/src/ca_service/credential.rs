//! `mesh-agent ca credential`: what a proxy shows `ca serve` in file mode, where there are no
//! service-account tokens. Run where the CA's key is; the output directory goes to the
//! proxy, the key never does.

use std::{fs, path::Path, time::Duration};

use anyhow::Context;

use super::{authorize::node_credential_uri, server::pem};
use crate::identity::{
    CertificateAuthority, FileCa, Identity,
    ca::{SubjectName, write_new},
};

/// The credential's certificate (leaf, then the chain) in the output directory.
pub const CERT_FILE: &str = "cert.pem";
/// Its key (mode 0600).
pub const KEY_FILE: &str = "key.pem";
/// The mesh's roots, which the proxy passes as `--ca-root-cert`.
pub const ROOT_FILE: &str = "root-cert.pem";

/// Whom a credential is for.
#[derive(Clone, Debug)]
pub enum Subject {
    /// A node agent: it may ask for the identities of the captured pods on this node.
    Node(String),
    /// A waypoint or gateway: it may ask for this identity only.
    Workload(Identity),
}

/// Writes a credential for `subject`, signed by the CA in `ca_dir`, to `out` (created; an
/// existing credential there is not overwritten).
pub fn write(
    ca_dir: &Path,
    subject: &Subject,
    trust_domain: &str,
    lifetime: Duration,
    out: &Path,
) -> anyhow::Result<()> {
    let ca = FileCa::open(ca_dir).context("opening the certificate authority (--ca-dir)")?;
    let uri = match subject {
        Subject::Node(node) => {
            anyhow::ensure!(
                !node.is_empty() && !node.contains('/'),
                "--node {node:?}: not a node name"
            );
            node_credential_uri(trust_domain, node)
        }
        Subject::Workload(id) => {
            anyhow::ensure!(
                id.trust_domain == trust_domain,
                "--identity {id} is not in trust domain {trust_domain}"
            );
            id.to_string()
        }
    };
    let (chain, key) = ca.sign_new_key(&[SubjectName::Uri(uri)], lifetime)?;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let chain_pem: String = chain.iter().map(pem).collect();
    let roots_pem: String = ca.trust_bundle().iter().map(pem).collect();
    write_new(&out.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&out.join(CERT_FILE), chain_pem.as_bytes(), 0o644)?;
    write_new(&out.join(ROOT_FILE), roots_pem.as_bytes(), 0o644)?;
    Ok(())
}
