//! Test support for identity and TLS: a temporary directory that removes itself, a TLS
//! handshake over an in-memory pipe, reading the peer's certificate serial, and rotating the
//! root of a CA directory.

use std::{
    io,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use rustls::{ClientConfig, CommonState, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::DuplexStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

/// A fresh directory under the system temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(test: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "mesh-agent-identity-{test}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a client and a server handshake against each other over an in-memory pipe; the
/// client dials "10.0.0.1" as HBONE does (by IP, no SNI).
pub async fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
) -> (
    io::Result<client::TlsStream<DuplexStream>>,
    io::Result<server::TlsStream<DuplexStream>>,
) {
    let (client_end, server_end) = tokio::io::duplex(64 * 1024);
    let name = ServerName::from(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
    tokio::join!(
        TlsConnector::from(client).connect(name, client_end),
        TlsAcceptor::from(server).accept(server_end)
    )
}

/// The serial (lowercase hex) of the peer's end-entity certificate.
pub fn peer_leaf_serial(conn: &CommonState) -> String {
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("the peer presented a certificate");
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).expect("the peer certificate parses");
    cert.raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes a new development root into the CA directory `dir`, replacing the files by rename
/// as a rotation would (key first, then certificate).
pub fn replace_root(dir: &Path) {
    let staging = dir.join(".staging");
    let _ = std::fs::remove_dir_all(&staging);
    super::init_ca(&staging).expect("writing a new root");
    for file in [super::ca::ROOT_KEY_FILE, super::ca::ROOT_CERT_FILE] {
        std::fs::rename(staging.join(file), dir.join(file))
            .unwrap_or_else(|e| panic!("replacing {file} in {}: {e}", dir.display()));
    }
    let _ = std::fs::remove_dir_all(&staging);
}
