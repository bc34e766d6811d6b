//! Live connections under changing policies: a connection admitted under one configuration
//! state is re-admitted under every later one, and closed (reset) as soon as a state no
//! longer admits it, within the file watcher's poll or the API server's debounce (well
//! under 2 s). Each connection watches the state itself: there is no registry of live
//! connections and no lock on the connection path.

use std::sync::Arc;

use tokio::sync::watch;

use crate::{admission::Peer, proxy::PodContext, state::MeshState};

/// Resolves when a state after the one `config` last saw no longer admits `peer` into
/// `dst`'s pod (as it is in that state, or as it was enrolled if it is gone); never, if the
/// configuration source ends. Pass it as the pump's `cancel`. It holds the pod's shared
/// context, not a copy of its workload: a connection's idle cost stays a few words.
pub async fn revoked(
    mut config: watch::Receiver<Arc<MeshState>>,
    dst: Arc<PodContext>,
    peer: Peer,
) {
    loop {
        if config.changed().await.is_err() {
            return std::future::pending().await;
        }
        let state = config.borrow_and_update().clone();
        let now = state.workload_by_ip(peer.dst.ip()).unwrap_or(&dst.workload);
        if let Err(denial) = state.policies().check(now, &peer) {
            tracing::info!(
                target: "access",
                direction = "inbound",
                src.addr = %peer.src,
                dst.addr = %peer.dst,
                "live connection closed: {denial}"
            );
            return;
        }
    }
}
