//! The connections a proxy carries, tracked so that a process that handed its listeners to
//! a successor (ADR 014) can let them end before it exits: connection tasks are spawned
//! here, long-lived multiplexed connections (HBONE) watch [`Drain::signaled`] to ask their
//! peers to go elsewhere (GOAWAY), and [`Drain::drain`] waits for the rest.

use std::{future::Future, time::Duration};

use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

#[derive(Default)]
pub struct Drain {
    tasks: TaskTracker,
    signal: CancellationToken,
}

impl Drain {
    /// Spawns a connection's task, counted until it ends.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(task)
    }

    /// Cancelled when draining starts.
    pub fn signal(&self) -> &CancellationToken {
        &self.signal
    }

    /// Connections carried now.
    pub fn live(&self) -> usize {
        self.tasks.len()
    }

    /// Tells every connection that draining started and waits, for at most `period`, until
    /// they all ended; the number still open when it gave up.
    pub async fn drain(&self, period: Duration) -> usize {
        self.signal.cancel();
        self.tasks.close();
        match tokio::time::timeout(period, self.tasks.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tasks.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_connections_and_gives_up_after_its_period() {
        let drain = Drain::default();
        let signal = drain.signal().clone();
        // A connection that ends when asked to, and one that never does.
        drain.spawn(async move { signal.cancelled().await });
        drain.spawn(std::future::pending::<()>());
        assert_eq!(drain.live(), 2);
        let start = tokio::time::Instant::now();
        assert_eq!(drain.drain(Duration::from_secs(30)).await, 1);
        assert!(start.elapsed() >= Duration::from_secs(30));

        let quick = Drain::default();
        quick.spawn(tokio::time::sleep(Duration::from_secs(1)));
        let start = tokio::time::Instant::now();
        assert_eq!(quick.drain(Duration::from_secs(30)).await, 0);
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
