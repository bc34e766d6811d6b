//! The tokio runtime every long-running command (agent, waypoint, gateway, CA service)
//! runs on: the multi-threaded scheduler with its LIFO slot off (ADR 017).
//!
//! tokio runs the task a worker woke last before anything else it has queued. In a proxy
//! whose streams share one HTTP/2 connection that undoes batching: each stream's pump, on
//! reading from its socket, queues a frame and wakes the connection's task, which then
//! runs at once and writes that one frame (one TLS record, one `writev`, one wake-up of the
//! peer) before the next ready stream has read. With the slot off the connection's task
//! goes behind the streams already made ready by the same poll of the sockets and writes
//! all their frames at once.
//!
//! The switch is one of tokio's unstable options: the workspace builds with
//! `--cfg tokio_unstable` (`.cargo/config.toml`). A build without it (flags of its own in
//! `RUSTFLAGS` replace the configured ones) keeps the slot and says so when it starts.
use std::num::NonZeroUsize;

/// A multi-threaded runtime with `worker_threads` workers (one per CPU when `None`), I/O
/// and timers enabled, and the LIFO slot off (or a warning that this build cannot).
pub fn build(worker_threads: Option<NonZeroUsize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        runtime.worker_threads(n.get());
    }
    #[cfg(tokio_unstable)]
    runtime.disable_lifo_slot();
    #[cfg(not(tokio_unstable))]
    tracing::warn!(
        "built without --cfg tokio_unstable (RUSTFLAGS replaced .cargo/config.toml's): \
         tokio's LIFO slot stays on, and the frames of streams that share a connection are \
         written one at a time"
    );
    runtime.enable_all().build()
}

/// Whether this build turns the LIFO slot off (see the module's documentation).
pub fn lifo_slot_off() -> bool {
    cfg!(tokio_unstable)
}

#[cfg(test)]
mod tests {
    /// The workspace's configured flags reach this crate. Fails when a build environment
    /// replaces them (RUSTFLAGS), as its releases would then run with the slot on.
    #[test]
    fn the_workspace_builds_with_the_lifo_slot_off() {
        assert!(
            super::lifo_slot_off(),
            "mesh-agent was built without --cfg tokio_unstable; .cargo/config.toml sets it"
        );
    }
}
