//! Fault injection (VirtualService `fault`), as Envoy's fault filter applies it after the
//! route matched and before any upstream: a delay for `delay.percentage` of the requests
//! (flag `DI`), then an abort for `abort.percentage` of them (flag `FI`). Each share is
//! drawn on its own, so a request may be both delayed and aborted.

use super::flags::Flags;
use crate::l7::resilience::{Abort, Fault};

/// What the fault did to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injected {
    pub flags: Flags,
    /// Answer this instead of forwarding.
    pub abort: Option<Abort>,
}

/// Applies `fault`, drawing each share from `draw` (uniform in `[0, 1)`): waits out the
/// delay if it falls on this request, and says whether it is aborted.
pub async fn inject(fault: &Fault, mut draw: impl FnMut() -> f64) -> Injected {
    let mut injected = Injected {
        flags: Flags::NONE,
        abort: None,
    };
    if let Some((delay, share)) = fault.delay
        && share.hits(draw())
    {
        tokio::time::sleep(delay).await;
        injected.flags |= Flags::DI;
    }
    if let Some((abort, share)) = fault.abort
        && share.hits(draw())
    {
        injected.flags |= Flags::FI;
        injected.abort = Some(abort);
    }
    injected
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::l7::resilience::Percentage;

    #[tokio::test(start_paused = true)]
    async fn a_delay_falls_on_its_share_of_requests() {
        let fault = Fault {
            delay: Some((Duration::from_secs(1), Percentage(50.0))),
            abort: None,
        };
        let mut rng = fastrand::Rng::with_seed(16);
        let draws: Vec<f64> = (0..400).map(|_| rng.f64()).collect();
        // 400 requests at once; on the paused clock each takes 0 or exactly 1 s.
        let start = Instant::now();
        let requests = draws.into_iter().map(|d| {
            let fault = &fault;
            async move {
                let injected = inject(fault, || d).await;
                (injected, start.elapsed())
            }
        });
        let results = futures::future::join_all(requests).await;
        let delayed = results
            .iter()
            .filter(|(i, took)| {
                let slow = *took >= Duration::from_secs(1);
                assert_eq!(slow, i.flags == Flags::DI, "{took:?} {:?}", i.flags);
                slow
            })
            .count();
        // 50 % ± 7 %.
        assert!((172..=228).contains(&delayed), "{delayed} of 400 delayed");
        assert!(results.iter().all(|(i, _)| i.abort.is_none()));
    }

    #[tokio::test(start_paused = true)]
    async fn aborts_follow_their_percentage_including_fractions() {
        let abort = |percent: f64| Fault {
            delay: None,
            abort: Some((Abort::Http(500), Percentage(percent))),
        };
        let start = Instant::now();
        let all = inject(&abort(100.0), fastrand::f64).await;
        assert_eq!(all.abort, Some(Abort::Http(500)));
        assert_eq!(all.flags, Flags::FI);
        assert_eq!(inject(&abort(0.0), fastrand::f64).await.abort, None);
        // 0.1 %: a draw under 0.001 hits, one above does not.
        assert!(inject(&abort(0.1), || 0.0009).await.abort.is_some());
        assert!(inject(&abort(0.1), || 0.0011).await.abort.is_none());
        assert_eq!(start.elapsed(), Duration::ZERO, "no delay configured");
        // Both: delayed, then aborted with a gRPC status.
        let both = Fault {
            delay: Some((Duration::from_millis(300), Percentage(100.0))),
            abort: Some((Abort::Grpc(14), Percentage(100.0))),
        };
        let injected = inject(&both, fastrand::f64).await;
        assert_eq!(injected.flags, Flags::DI | Flags::FI);
        assert_eq!(injected.abort, Some(Abort::Grpc(14)));
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }
}
