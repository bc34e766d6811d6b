//! Rate limits for log lines that a peer can cause at will (failed connections, refused
//! handshakes, unreachable targets): each call site writes at most one line per
//! [`INTERVAL`], and that line carries how many like it were left out since the one
//! before, so a flood costs a line every few seconds instead of one per attempt.
//!
//! ```
//! # let error = "boom";
//! if let Some(suppressed) = mesh_agent::log_limit::once_per_interval!() {
//!     tracing::warn!(suppressed, %error, "connection failed");
//! }
//! ```

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// At most one line per call site this often.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// The state of one call site.
#[derive(Debug, Default)]
pub struct Limiter {
    /// Milliseconds since [`epoch`] before which nothing more is written.
    next_ms: AtomicU64,
    /// Lines left out since the last one written.
    suppressed: AtomicU64,
}

impl Limiter {
    pub const fn new() -> Self {
        Limiter {
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines left out since the last one)` when a line may be written now (at most
    /// once per `every`); `None` (and counted) otherwise.
    pub fn allow(&self, every: Duration) -> Option<u64> {
        let now = epoch().elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + every.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// `Some(suppressed)` at most once per [`INTERVAL`] for the call site it is written at.
#[macro_export]
macro_rules! once_per_interval {
    () => {{
        static LIMITER: $crate::log_limit::Limiter = $crate::log_limit::Limiter::new();
        LIMITER.allow($crate::log_limit::INTERVAL)
    }};
}
pub use once_per_interval;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_of_those_left_out() {
        let limiter = Limiter::new();
        let every = Duration::from_millis(200);
        assert_eq!(limiter.allow(every), Some(0));
        for _ in 0..99 {
            assert_eq!(limiter.allow(every), None);
        }
        std::thread::sleep(every + Duration::from_millis(20));
        assert_eq!(limiter.allow(every), Some(99));
        assert_eq!(limiter.allow(every), None);
    }

    #[test]
    fn each_call_site_has_its_own_limit() {
        let site = || once_per_interval!();
        let other = || once_per_interval!();
        assert!(site().is_some());
        assert!(site().is_none());
        assert!(other().is_some());
    }
}
