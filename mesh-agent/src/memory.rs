//! Gives heap memory the agent no longer uses back to the system. glibc's allocator keeps
//! what the threads' arenas freed mapped for reuse, and returns only the top of each heap:
//! after a flood of connections the agent would stay at its peak for good (300 MiB seen
//! after storms that started from 16 MiB). A task trims the heap every few seconds:
//! `malloc_trim` releases the free pages of every arena, which costs little when there is
//! little to release.

use std::time::Duration;

/// How often the heap is trimmed.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// Trims the heap every `every` for as long as the runtime runs.
pub fn spawn_trimmer(every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            trim();
        }
    });
}

/// Returns the heap's free pages to the system; whether any were.
#[cfg(target_env = "gnu")]
pub fn trim() -> bool {
    crate::sys::malloc_trim()
}

/// Other C libraries' allocators return memory on their own (or offer no call to ask).
#[cfg(not(target_env = "gnu"))]
pub fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_env = "gnu")]
    fn freed_memory_goes_back_to_the_system() {
        fn rss_kib() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap()
        }
        // Many small blocks (below the mmap threshold, so they live in the heap), every
        // other one kept so the heap's top cannot simply shrink, then the rest freed.
        let before = rss_kib();
        let mut blocks: Vec<Vec<u8>> = (0..40_000).map(|i| vec![i as u8; 4096]).collect();
        let grown = rss_kib();
        let keep: Vec<Vec<u8>> = blocks.drain(..).step_by(64).collect();
        let freed = rss_kib();
        super::trim();
        let trimmed = rss_kib();
        assert!(grown > before + 100_000, "{before} -> {grown} KiB");
        assert!(
            trimmed + 50_000 < freed,
            "freed {freed} KiB, after trim {trimmed} KiB"
        );
        drop(keep);
    }
}
