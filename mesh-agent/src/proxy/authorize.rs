//! Authorization at the destination: PeerAuthentication and AuthorizationPolicy parsed once
//! per configuration state, the decision for each new inbound connection, and the
//! re-evaluation of live connections whenever the configuration changes, so a connection a
//! new policy disallows is closed (within the file watcher's poll, well under 2 s).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::{Notify, watch};

use crate::{
    identity::Identity,
    peer_auth::{MtlsMode, PeerAuthentications},
    rbac::{Connection, Decision, Policies},
    state::{MeshState, Workload},
};

/// The policies of one configuration state.
pub struct Policy {
    state: Arc<MeshState>,
    peer_auth: PeerAuthentications,
    rbac: Policies,
    root_namespace: String,
}

impl Policy {
    fn new(state: Arc<MeshState>, root_namespace: &str) -> Self {
        let (peer_auth, errors) = PeerAuthentications::parse(&state.raw.peer_authentications);
        for e in errors {
            if e.fails_closed() {
                tracing::error!(error = %e, "PeerAuthentication rejected; the workloads it selects are STRICT");
            } else {
                tracing::warn!(error = %e, "PeerAuthentication partly ignored");
            }
        }
        let (rbac, errors) = Policies::parse(&state.raw.authorization_policies, root_namespace);
        for e in errors {
            if e.fails_closed() {
                tracing::error!(error = %e, "AuthorizationPolicy rejected; the workloads it selects deny everything");
            } else {
                tracing::warn!(error = %e, "AuthorizationPolicy partly ignored at L4");
            }
        }
        Policy {
            state,
            peer_auth,
            rbac,
            root_namespace: root_namespace.to_owned(),
        }
    }

    /// The mTLS mode PeerAuthentication sets for `w` on `port`.
    pub fn mtls_mode(&self, w: &Workload, port: u16) -> MtlsMode {
        self.peer_auth.mode(w, port, &self.root_namespace)
    }

    /// The AuthorizationPolicy decision for a connection to `dst`; dry-run denials are logged.
    pub fn authorize(&self, dst: &Workload, conn: &Peer) -> Decision {
        let decision = self.rbac.evaluate(dst, &conn.as_connection());
        if let Some(policy) = &decision.dry_run_denial {
            tracing::info!(
                target: "access",
                direction = "inbound",
                src.addr = %conn.src,
                dst.addr = %conn.dst,
                src.identity = conn.identity.as_ref().map(tracing::field::display),
                policy = %policy,
                "dry-run: connection would be denied"
            );
        }
        decision
    }
}

/// The source side of an inbound connection, as authorization sees it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// Verified (HBONE) or known (same-node) identity; `None` for plaintext.
    pub identity: Option<Identity>,
}

impl Peer {
    fn as_connection(&self) -> Connection<'_> {
        Connection {
            src_ip: self.src.ip(),
            src_port: self.src.port(),
            dst_ip: self.dst.ip(),
            dst_port: self.dst.port(),
            src_identity: self.identity.as_ref(),
        }
    }
}

struct Live {
    dst: Workload,
    peer: Peer,
    closed: Arc<Notify>,
}

/// Policies of the current state and the connections they govern.
pub struct Authorizer {
    root_namespace: String,
    current: Mutex<Arc<Policy>>,
    live: Mutex<HashMap<u64, Live>>,
    next_id: AtomicU64,
}

impl Authorizer {
    /// Starts following `state`: every change re-evaluates the live connections.
    pub fn new(state: watch::Receiver<Arc<MeshState>>, root_namespace: &str) -> Arc<Self> {
        let current = Arc::new(Policy::new(state.borrow().clone(), root_namespace));
        let authorizer = Arc::new(Authorizer {
            root_namespace: root_namespace.to_owned(),
            current: Mutex::new(current),
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&authorizer);
        let mut rx = state;
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let state = rx.borrow_and_update().clone();
                let Some(authorizer) = weak.upgrade() else {
                    return;
                };
                authorizer.revalidate(&state);
            }
        });
        authorizer
    }

    /// The policies of `state` (parsed once per state).
    pub fn policy(&self, state: &Arc<MeshState>) -> Arc<Policy> {
        let mut current = self.current.lock().expect("authorizer lock");
        if !Arc::ptr_eq(&current.state, state) {
            *current = Arc::new(Policy::new(state.clone(), &self.root_namespace));
        }
        current.clone()
    }

    /// Tracks an authorized connection until the guard is dropped.
    pub fn register(self: &Arc<Self>, dst: &Workload, peer: Peer) -> LiveGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let closed = Arc::new(Notify::new());
        let live = Live {
            dst: dst.clone(),
            peer,
            closed: closed.clone(),
        };
        self.live.lock().expect("authorizer lock").insert(id, live);
        LiveGuard {
            authorizer: self.clone(),
            id,
            closed,
        }
    }

    /// Closes every live connection the policies of `state` no longer allow.
    pub fn revalidate(&self, state: &Arc<MeshState>) {
        let policy = self.policy(state);
        let live = self.live.lock().expect("authorizer lock");
        for conn in live.values() {
            // Evaluate against the workload as it is now, if it is still known.
            let dst = state
                .workload_by_ip(conn.peer.dst.ip())
                .unwrap_or(&conn.dst);
            let decision = policy.rbac.evaluate(dst, &conn.peer.as_connection());
            if !decision.allowed {
                tracing::info!(
                    target: "access",
                    direction = "inbound",
                    src.addr = %conn.peer.src,
                    dst.addr = %conn.peer.dst,
                    "live connection closed: {decision}"
                );
                conn.closed.notify_one();
            }
        }
    }

    /// Number of connections under watch (for `/config_dump`).
    pub fn live_connections(&self) -> usize {
        self.live.lock().expect("authorizer lock").len()
    }
}

/// A registered connection; `closed()` resolves when policy revokes it.
pub struct LiveGuard {
    authorizer: Arc<Authorizer>,
    id: u64,
    closed: Arc<Notify>,
}

impl LiveGuard {
    pub async fn closed(&self) {
        self.closed.notified().await;
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.authorizer
            .live
            .lock()
            .expect("authorizer lock")
            .remove(&self.id);
    }
}
