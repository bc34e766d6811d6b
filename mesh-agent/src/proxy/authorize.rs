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

    /// Admits (or not) a connection at its destination `dst`: PeerAuthentication first (a
    /// peer without an identity is plaintext, refused where the mode is STRICT), then
    /// AuthorizationPolicy. Every inbound path calls this, and so does the re-evaluation of
    /// live connections after a change. Dry-run denials are logged.
    pub fn admit(&self, dst: &Workload, peer: &Peer) -> Result<Decision, Denial> {
        let admitted = self.check(dst, peer);
        if let Ok(decision) | Err(Denial::Policy(decision)) = &admitted
            && let Some(policy) = &decision.dry_run_denial
        {
            tracing::info!(
                target: "access",
                direction = "inbound",
                src.addr = %peer.src,
                dst.addr = %peer.dst,
                src.identity = peer.identity.as_ref().map(tracing::field::display),
                policy = %policy,
                "dry-run: connection would be denied"
            );
        }
        admitted
    }

    /// [`admit`](Self::admit) without logging.
    fn check(&self, dst: &Workload, peer: &Peer) -> Result<Decision, Denial> {
        let plaintext = peer.identity.is_none();
        if plaintext
            && self
                .peer_auth
                .mode(dst, peer.dst.port(), &self.root_namespace)
                == MtlsMode::Strict
        {
            return Err(Denial::PlaintextUnderStrict);
        }
        let decision = self.rbac.evaluate(dst, &peer.as_connection());
        if decision.allowed {
            Ok(decision)
        } else {
            Err(Denial::Policy(decision))
        }
    }
}

/// Why a connection was not admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// Plaintext to a port whose PeerAuthentication is STRICT.
    PlaintextUnderStrict,
    /// An AuthorizationPolicy denied it (the decision names the policy).
    Policy(Decision),
}

impl Denial {
    /// The `reason` label of `mesh_agent_connections_denied_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::PlaintextUnderStrict => "plaintext_under_strict",
            Denial::Policy(_) => "authorization_policy",
        }
    }
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denial::PlaintextUnderStrict => {
                f.write_str("plaintext under STRICT PeerAuthentication")
            }
            Denial::Policy(decision) => write!(f, "AuthorizationPolicy: {decision}"),
        }
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
            if let Err(denial) = policy.check(dst, &conn.peer) {
                tracing::info!(
                    target: "access",
                    direction = "inbound",
                    src.addr = %conn.peer.src,
                    dst.addr = %conn.peer.dst,
                    "live connection closed: {denial}"
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
