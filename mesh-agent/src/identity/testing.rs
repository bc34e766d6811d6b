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

/// A key kind for [`write_plugin_ca`].
#[derive(Clone, Copy, Debug)]
pub enum KeyKind {
    /// RSA 2048, PKCS#1 PEM (`RSA PRIVATE KEY`), as Istio's sample plug-in CA.
    Rsa,
    /// ECDSA P-256, SEC1 PEM (`EC PRIVATE KEY`), as `openssl ecparam -genkey` writes.
    EcP256,
    /// ECDSA P-384, PKCS#8 PEM.
    EcP384,
}

/// Writes Istio's plug-in CA layout into `dir` the way operators make it (Istio's
/// `Makefile.selfsigned.mk`, with openssl; ring cannot generate RSA keys): a root of kind
/// `root` (root-cert.pem, and its key in `root-ca-key.pem`, which the CA never reads), an
/// intermediate of kind `intermediate` signed by it (ca-cert.pem, ca-key.pem, with
/// basicConstraints CA:true, pathlen 0), and cert-chain.pem = intermediate + root.
pub fn write_plugin_ca(dir: &Path, root: KeyKind, intermediate: KeyKind) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let openssl = |args: &[&str]| -> io::Result<()> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    };
    let genkey = |kind: KeyKind, file: &str| match kind {
        KeyKind::Rsa => openssl(&["genrsa", "-traditional", "-out", file, "2048"]),
        KeyKind::EcP256 => openssl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            file,
        ]),
        KeyKind::EcP384 => openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
            "-out",
            file,
        ]),
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "[root]\nbasicConstraints = critical, CA:true\nkeyUsage = critical, keyCertSign, cRLSign, digitalSignature\nsubjectKeyIdentifier = hash\n\n\
         [intermediate]\nbasicConstraints = critical, CA:true, pathlen:0\nkeyUsage = critical, digitalSignature, nonRepudiation, keyEncipherment, keyCertSign\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid:always\nsubjectAltName = DNS:istiod.istio-system.svc\n",
    )?;
    genkey(root, "root-ca-key.pem")?;
    openssl(&[
        "req",
        "-new",
        "-key",
        "root-ca-key.pem",
        "-subj",
        "/O=Istio/CN=Root CA",
        "-out",
        "root.csr",
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-sha256",
        "-days",
        "3650",
        "-in",
        "root.csr",
        "-signkey",
        "root-ca-key.pem",
        "-extfile",
        "ext.cnf",
        "-extensions",
        "root",
        "-out",
        "root-cert.pem",
    ])?;
    genkey(intermediate, "ca-key.pem")?;
    openssl(&[
        "req",
        "-new",
        "-key",
        "ca-key.pem",
        "-subj",
        "/O=Istio/CN=Intermediate CA/L=cluster1",
        "-out",
        "ca.csr",
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-sha256",
        "-days",
        "730",
        "-in",
        "ca.csr",
        "-CA",
        "root-cert.pem",
        "-CAkey",
        "root-ca-key.pem",
        "-CAcreateserial",
        "-extfile",
        "ext.cnf",
        "-extensions",
        "intermediate",
        "-out",
        "ca-cert.pem",
    ])?;
    let chain = [
        std::fs::read(dir.join("ca-cert.pem"))?,
        std::fs::read(dir.join("root-cert.pem"))?,
    ]
    .concat();
    std::fs::write(dir.join("cert-chain.pem"), chain)?;
    for scratch in ["ext.cnf", "root.csr", "ca.csr", "root-cert.srl"] {
        let _ = std::fs::remove_file(dir.join(scratch));
    }
    Ok(())
}
