//! Accepting connections, the same way on every listener of the process (captured
//! traffic, HBONE, the waypoint and gateway, the admin ports, the CA service): an error that
//! concerns one connection only is skipped at once; any other — out of descriptors
//! (`EMFILE`, `ENFILE`), out of buffers or memory — is logged at most once per interval and
//! accepting pauses for [`PAUSE`] instead of spinning on a listener the kernel keeps
//! reporting ready, so the connections already held can finish and free descriptors.
//! [`raise_fd_limit`] lifts the soft descriptor limit at start so it is rarely reached.

use std::{io, net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};

/// How long accepting pauses after an error that is not one connection's.
pub const PAUSE: Duration = Duration::from_millis(50);

/// The next connection on `listener`; `describe` names the listener in the log (called only
/// when an error is logged).
pub async fn next(
    listener: &TcpListener,
    describe: impl Fn() -> String,
) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => backoff(&describe, e).await,
        }
    }
}

/// Returns at once for an error of one connection; otherwise logs (rate-limited) and
/// waits [`PAUSE`].
pub async fn backoff(describe: &impl Fn() -> String, e: io::Error) {
    if one_connections(&e) {
        return;
    }
    if let Some(suppressed) = crate::log_limit::once_per_interval!() {
        tracing::warn!(listener = %describe(), error = %e, suppressed, "accept failed; pausing accepts");
    }
    tokio::time::sleep(PAUSE).await;
}

/// Accept errors that concern one connection only (keep accepting).
fn one_connections(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    )
}

/// Descriptor exhaustion under connection storms is a known failure of node proxies: a proxy
/// holds two descriptors (more with splice's pipes) for every connection it carries, so a
/// limit sized for one application does not fit it. Raises the soft and hard
/// `RLIMIT_NOFILE` to the kernel's ceiling (`fs.nr_open`) when permitted (CAP_SYS_RESOURCE),
/// else the soft limit to the hard one. A hard limit it could not lift caps the
/// connections it carries at once (a same-node connection holds two descriptors; past
/// the cap new connections are reset): logged, and a warning when it is below
/// [`FEW_DESCRIPTORS`].
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|n| n.trim().parse::<u64>().ok());
    if let Some(ceiling) = ceiling
        && setrlimit(Resource::RLIMIT_NOFILE, ceiling, ceiling).is_ok()
    {
        return;
    }
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        tracing::warn!(error = %e, "could not raise RLIMIT_NOFILE");
        return;
    }
    let message = "RLIMIT_NOFILE stays at its hard limit (raising it needs CAP_SYS_RESOURCE): \
                   past about this many same-node connections at once, new ones are reset";
    let connections = hard / 2;
    if hard < FEW_DESCRIPTORS {
        tracing::warn!(limit = hard, wanted = ceiling, connections, "{message}");
    } else {
        tracing::info!(limit = hard, wanted = ceiling, connections, "{message}");
    }
}

/// A descriptor limit below this (65,536 same-node connections at once) is worth a
/// warning: a node's connection storm reaches it.
const FEW_DESCRIPTORS: u64 = 131_072;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn out_of_descriptors_pauses_and_one_connections_errors_do_not() {
        let describe = || "test".to_string();
        for (errno, pauses) in [
            (libc::EMFILE, true),
            (libc::ENFILE, true),
            (libc::ENOBUFS, true),
            (libc::ENOMEM, true),
            (libc::ECONNABORTED, false),
            (libc::EINTR, false),
        ] {
            let start = tokio::time::Instant::now();
            backoff(&describe, io::Error::from_raw_os_error(errno)).await;
            assert_eq!(start.elapsed() >= PAUSE, pauses, "errno {errno}");
        }
    }
}
