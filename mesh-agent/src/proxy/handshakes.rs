//! Bounds on the TLS handshakes in progress on this agent's HBONE listeners. A peer that
//! opens connections to 15008 and never finishes its ClientHello holds a descriptor for
//! the whole handshake timeout; without a bound, any pod could exhaust the agent's
//! descriptors and break every other pod's traffic on the node. One source address may
//! hold a few handshakes at once with each pod, and the node a bounded number in all;
//! beyond that a new connection is closed at once. A mesh client opens at most one
//! connection per destination at a time, so it never comes near the bound.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

/// Handshakes in progress, by source address and in all.
#[derive(Debug)]
pub struct Handshakes {
    max_total: usize,
    max_per_source: usize,
    in_progress: Mutex<InProgress>,
}

#[derive(Debug, Default)]
struct InProgress {
    total: usize,
    /// By (source, destination) address.
    by_source: HashMap<(IpAddr, IpAddr), usize>,
}

/// Why a handshake was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0} handshakes already in progress from this address to this pod")]
    PerSource(usize),
    #[error("{0} handshakes already in progress on this node")]
    Total(usize),
}

/// A handshake in progress; dropping it (finished or failed) frees its place.
#[derive(Debug)]
pub struct Slot {
    handshakes: Arc<Handshakes>,
    pair: (IpAddr, IpAddr),
}

impl Handshakes {
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Handshakes {
            max_total,
            max_per_source,
            in_progress: Mutex::new(InProgress::default()),
        })
    }

    /// A place for a handshake from `source` to `destination`, unless the limits are
    /// reached.
    pub fn start(self: &Arc<Self>, source: IpAddr, destination: IpAddr) -> Result<Slot, Refused> {
        let mut in_progress = self.in_progress.lock().expect("handshakes lock");
        if in_progress.total >= self.max_total {
            return Err(Refused::Total(in_progress.total));
        }
        let pair = (source, destination);
        let from_source = in_progress.by_source.entry(pair).or_default();
        if *from_source >= self.max_per_source {
            return Err(Refused::PerSource(*from_source));
        }
        *from_source += 1;
        in_progress.total += 1;
        Ok(Slot {
            handshakes: self.clone(),
            pair,
        })
    }

    /// Handshakes in progress now.
    pub fn in_progress(&self) -> usize {
        self.in_progress.lock().expect("handshakes lock").total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut in_progress = self.handshakes.in_progress.lock().expect("handshakes lock");
        in_progress.total -= 1;
        if let Some(n) = in_progress.by_source.get_mut(&self.pair) {
            *n -= 1;
            if *n == 0 {
                in_progress.by_source.remove(&self.pair);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_each_source_and_pod_pair_and_the_total_and_frees_places_on_drop() {
        let limits = Handshakes::new(5, 2);
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let (a, b, pod, other) = (
            ip("10.0.0.1"),
            ip("10.0.0.2"),
            ip("10.1.0.1"),
            ip("10.1.0.2"),
        );
        let a1 = limits.start(a, pod).unwrap();
        let _a2 = limits.start(a, pod).unwrap();
        assert_eq!(limits.start(a, pod).unwrap_err(), Refused::PerSource(2));
        // The same source to another pod has its own bound.
        let _a_other = limits.start(a, other).unwrap();
        let _b = [limits.start(b, pod).unwrap(), limits.start(b, pod).unwrap()];
        assert_eq!(limits.start(b, other).unwrap_err(), Refused::Total(5));
        drop(a1);
        assert_eq!(limits.in_progress(), 4);
        let _a3 = limits.start(a, pod).unwrap();
        assert_eq!(limits.start(b, other).unwrap_err(), Refused::Total(5));
    }
}
