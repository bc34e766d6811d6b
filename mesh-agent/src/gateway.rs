//! `mesh-agent gateway`: the waypoint's L7 engine serving traffic from outside the mesh, as
//! Istio's ingress gateway does. The gateway objects that run here are Istio `Gateway`s
//! whose `selector` matches this gateway's pod labels and the Gateway API `Gateway` of
//! class `istio` named as this gateway ([`crate::l7::gateways`]); their HTTP and HTTPS
//! listeners are bound on every address of the pod, following configuration changes. An
//! HTTPS listener terminates TLS with the certificate of its Secret, looked up in the
//! current configuration at every handshake (by SNI among the listeners of the port), so a
//! replaced Secret is served from the next connection on, without a restart. Each request
//! is served as a waypoint serves one ([`crate::waypoint::request`]): routed by the
//! VirtualServices and HTTPRoutes bound to the gateway that takes its `Host`, sent over
//! HBONE with the gateway's own identity (to the endpoints, or through the service's
//! waypoint when it asks), reported with `reporter="source"` as Istio's gateways report.
//!
//! TLS handshakes in progress on the HTTPS ports are bounded in all (the waypoint's
//! `max_handshakes`); a connection beyond the bound is closed unanswered, so clients that
//! open connections and never finish their ClientHello cannot take every descriptor. There
//! is no bound per source address, unlike on the mesh's own ports: behind a load balancer
//! that rewrites sources, one address stands for many clients (Envoy has none either).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    ebpf::canonical,
    l7::gateways::{Credential, GatewayKey, IngressGateway, Listener, Protocol},
    proxy::handshakes::Handshakes,
    state::{MeshState, TlsSecret},
    waypoint::{Destination, Role, TunnelContext, Waypoint, request},
};

/// Binds and unbinds the gateway's listeners as the configuration says, until the state
/// sender is gone.
pub async fn serve(wp: Arc<Waypoint>) {
    let mut rx = wp.state.clone();
    let handshakes = Handshakes::new(wp.limits.max_handshakes, wp.limits.max_handshakes);
    // Port → whether it terminates TLS, and its accept loops.
    let mut bound: BTreeMap<u16, (bool, Vec<JoinHandle<()>>)> = BTreeMap::new();
    loop {
        let state = rx.borrow_and_update().clone();
        // A port is HTTPS when its first listener (in the objects' order) is.
        let mut wanted: BTreeMap<u16, bool> = BTreeMap::new();
        for l in running(&wp, &state).flat_map(|g| g.listeners.iter()) {
            if l.protocol.is_served() {
                wanted
                    .entry(l.port)
                    .or_insert(matches!(l.protocol, Protocol::Https(_)));
            }
        }
        if wanted.is_empty() {
            tracing::warn!(gateway = %format!("{}/{}", wp.namespace, wp.name), "ingress gateway: no gateway object selects this gateway; nothing is served");
        }
        bound.retain(|port, (tls, tasks)| {
            let keep = wanted.get(port) == Some(tls);
            if !keep {
                tasks.iter().for_each(JoinHandle::abort);
                tracing::info!(port, "ingress gateway: listener closed");
            }
            keep
        });
        for (port, tls) in wanted {
            if bound.contains_key(&port) {
                continue;
            }
            match bind(port).await {
                Ok(listeners) => {
                    tracing::info!(port, tls, "ingress gateway: listening");
                    let config = tls.then(|| server_config(&wp, port));
                    let tasks = listeners
                        .into_iter()
                        .map(|l| {
                            let tls = config.clone().map(|c| (c, handshakes.clone()));
                            tokio::spawn(accept_loop(wp.clone(), l, port, tls))
                        })
                        .collect();
                    bound.insert(port, (tls, tasks));
                }
                // Tried again at the next configuration change.
                Err(e) => {
                    tracing::error!(port, error = %e, "ingress gateway: cannot listen; this port is not served")
                }
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// The gateway objects this gateway runs: selected by its pod's labels (Istio's), or named
/// as it (the Gateway API's).
fn running<'a>(wp: &Waypoint, state: &'a MeshState) -> impl Iterator<Item = &'a IngressGateway> {
    let pod = match &wp.role {
        Role::Gateway { pod: Some(pod) } => state.workload(&wp.namespace, pod),
        _ => None,
    };
    let labels = pod.map(|w| w.labels.clone()).unwrap_or_default();
    let own: GatewayKey = (wp.namespace.clone(), wp.name.clone());
    state
        .routes()
        .ingress_gateways()
        .iter()
        .filter(move |g| g.runs_on(&labels, &own))
}

/// The served listeners on `port` of the gateway objects this gateway runs, with their
/// gateway, in the order the objects sort in.
pub fn listeners(wp: &Waypoint, state: &MeshState, port: u16) -> Vec<(GatewayKey, Listener)> {
    running(wp, state)
        .flat_map(|g| {
            g.listeners
                .iter()
                .filter(|l| l.port == port && l.protocol.is_served())
                .map(|l| (g.key.clone(), l.clone()))
        })
        .collect()
}

/// `port` on every IPv6 and IPv4 address.
async fn bind(port: u16) -> std::io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    for ip in [
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    ] {
        listeners.push(crate::waypoint::bind(SocketAddr::new(ip, port)).await?);
    }
    Ok(listeners)
}

/// Serves the connections of one listener: plain HTTP, or TLS with `handshakes` bounding
/// those in progress.
async fn accept_loop(
    wp: Arc<Waypoint>,
    listener: TcpListener,
    port: u16,
    tls: Option<(Arc<rustls::ServerConfig>, Arc<Handshakes>)>,
) {
    let (acceptor, handshakes) = match tls {
        Some((config, handshakes)) => (
            Some(tokio_rustls::TlsAcceptor::from(config)),
            Some(handshakes),
        ),
        None => (None, None),
    };
    loop {
        let (stream, peer) =
            crate::accept::next(&listener, || format!("ingress gateway port {port}")).await;
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().map_or(peer.ip(), |a| a.ip());
        let tunnel = Arc::new(request::Tunnel {
            ctx: TunnelContext {
                waypoint: wp.clone(),
                peer: SocketAddr::new(canonical(peer.ip()), peer.port()),
                local: canonical(local),
                client: None,
            },
            target: SocketAddr::new(canonical(local), port),
            destination: Destination::Gateway {
                port,
                tls: acceptor.is_some(),
            },
            handles: Default::default(),
        });
        let (Some(acceptor), Some(handshakes)) = (&acceptor, &handshakes) else {
            tokio::spawn(request::serve_http(tunnel, stream));
            continue;
        };
        let slot = match handshakes.start(canonical(peer.ip()), canonical(local)) {
            Ok(slot) => slot,
            Err(refused) => {
                wp.metrics.handshake_refused();
                if let Some(suppressed) = crate::log_limit::once_per_interval!() {
                    tracing::warn!(%peer, port, suppressed, "ingress gateway: connection closed before its TLS handshake: {refused}");
                }
                continue;
            }
        };
        let (acceptor, timeout) = (acceptor.clone(), wp.limits.handshake_timeout);
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(timeout, acceptor.accept(stream)).await;
            drop(slot);
            match handshake {
                Ok(Ok(tls)) => request::serve_http(tunnel, tls).await,
                Ok(Err(e)) => {
                    if let Some(suppressed) = crate::log_limit::once_per_interval!() {
                        tracing::info!(%peer, port, error = %e, suppressed, "ingress gateway: TLS handshake failed");
                    }
                }
                Err(_) => {}
            }
        });
    }
}

/// TLS for an HTTPS port: HTTP/2 and HTTP/1.1 by ALPN, the certificate chosen per
/// handshake by [`Certificates`].
fn server_config(wp: &Arc<Waypoint>, port: u16) -> Arc<rustls::ServerConfig> {
    let mut config =
        rustls::ServerConfig::builder_with_provider(crate::identity::crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("the provider supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Certificates {
                wp: wp.clone(),
                port,
                parsed: Mutex::default(),
            }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// The certificates of a port's HTTPS listeners, from their Secrets in the current state:
/// the listener whose hostnames take the SNI (else the port's first), its Secret parsed
/// once per content.
struct Certificates {
    wp: Arc<Waypoint>,
    port: u16,
    parsed: Mutex<HashMap<SecretKey, Parsed>>,
}

/// A Secret by namespace and name.
type SecretKey = (String, String);

/// A Secret's content and the certified key made of it.
type Parsed = (Arc<TlsSecret>, Arc<CertifiedKey>);

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let state = self.wp.state.borrow().clone();
        let listeners = listeners(&self.wp, &state, self.port);
        let sni = hello.server_name().unwrap_or_default();
        let credential = |l: &Listener| match &l.protocol {
            Protocol::Https(c) => Some(c.clone()),
            _ => None,
        };
        let chosen = listeners
            .iter()
            .filter(|(_, l)| !sni.is_empty() && l.admits(sni))
            .chain(listeners.iter())
            .find_map(|(_, l)| credential(l))?;
        let Credential { namespace, name } = chosen;
        let key = (namespace.unwrap_or_else(|| self.wp.namespace.clone()), name);
        let Some(secret) = state.raw.tls_secrets.get(&key) else {
            if let Some(suppressed) = crate::log_limit::once_per_interval!() {
                tracing::warn!(port = self.port, secret = %format!("{}/{}", key.0, key.1), suppressed, "ingress gateway: the listener's Secret does not exist; handshake refused");
            }
            return None;
        };
        let mut parsed = self.parsed.lock().expect("certificates lock");
        if let Some((seen, certified)) = parsed.get(&key)
            && seen == secret
        {
            return Some(certified.clone());
        }
        match certified_key(secret) {
            Ok(certified) => {
                parsed.insert(key, (secret.clone(), certified.clone()));
                Some(certified)
            }
            Err(e) => {
                if let Some(suppressed) = crate::log_limit::once_per_interval!() {
                    tracing::warn!(port = self.port, secret = %format!("{}/{}", key.0, key.1), error = %e, suppressed, "ingress gateway: the listener's Secret is not a usable certificate and key");
                }
                None
            }
        }
    }
}

/// A Secret's PEM chain and key, for rustls.
fn certified_key(secret: &TlsSecret) -> Result<Arc<CertifiedKey>, String> {
    let chain = rustls_pemfile::certs(&mut secret.cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.crt: {e}"))?;
    if chain.is_empty() {
        return Err("tls.crt: no certificate".into());
    }
    let key = rustls_pemfile::private_key(&mut secret.key_pem.as_slice())
        .map_err(|e| format!("tls.key: {e}"))?
        .ok_or("tls.key: no private key")?;
    let signing = crate::identity::crypto_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("tls.key: {e}"))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| format!("tls.crt is not for tls.key: {e}"))?;
    Ok(Arc::new(certified))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_parse_into_certified_keys_and_mismatches_are_refused() {
        let one = rcgen::generate_simple_self_signed(vec!["a.example.com".into()]).unwrap();
        let two = rcgen::generate_simple_self_signed(vec!["b.example.com".into()]).unwrap();
        let secret = |cert: &rcgen::CertifiedKey<rcgen::KeyPair>,
                      key: &rcgen::CertifiedKey<rcgen::KeyPair>| TlsSecret {
            cert_pem: cert.cert.pem().into_bytes(),
            key_pem: key.signing_key.serialize_pem().into_bytes(),
        };
        assert!(certified_key(&secret(&one, &one)).is_ok());
        let e = certified_key(&secret(&one, &two)).unwrap_err();
        assert!(e.contains("not for tls.key"), "{e}");
        let e = certified_key(&TlsSecret {
            cert_pem: b"junk".to_vec(),
            key_pem: vec![],
        })
        .unwrap_err();
        assert!(e.contains("tls.crt"), "{e}");
    }
}
