//! Envoy's response flags: why a request ended as it did (`UH` no healthy upstream, `UT`
//! upstream timeout, `DI` delay injected...), in the access log and the `response_flags`
//! label, several joined by commas in Envoy's order.

use std::{
    collections::HashMap,
    fmt,
    sync::{Mutex, OnceLock},
};

/// A set of response flags.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Flags(u32);

/// Envoy's flags, in the order Envoy writes them.
const NAMES: [&str; 11] = [
    "UH", "UT", "UF", "UC", "UO", "NR", "DI", "FI", "DC", "URX", "NC",
];

impl Flags {
    pub const NONE: Flags = Flags(0);
    /// No healthy upstream.
    pub const UH: Flags = Flags(1);
    /// Upstream request timeout.
    pub const UT: Flags = Flags(1 << 1);
    /// Upstream connection failure.
    pub const UF: Flags = Flags(1 << 2);
    /// Upstream connection termination.
    pub const UC: Flags = Flags(1 << 3);
    /// Upstream overflow (circuit breaking).
    pub const UO: Flags = Flags(1 << 4);
    /// No route.
    pub const NR: Flags = Flags(1 << 5);
    /// Delay injected.
    pub const DI: Flags = Flags(1 << 6);
    /// Fault (abort) injected.
    pub const FI: Flags = Flags(1 << 7);
    /// Downstream connection termination.
    pub const DC: Flags = Flags(1 << 8);
    /// Upstream retry limit exceeded.
    pub const URX: Flags = Flags(1 << 9);
    /// No cluster (the backend service does not exist).
    pub const NC: Flags = Flags(1 << 10);

    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The flags as Envoy writes them (`-` for none). Every combination is rendered once
    /// and kept: there are few, and a label value must outlive the request.
    pub fn as_str(self) -> &'static str {
        if self.0 == 0 {
            return "-";
        }
        if self.0.is_power_of_two() {
            return NAMES[self.0.trailing_zeros() as usize];
        }
        static RENDERED: OnceLock<Mutex<HashMap<u32, &'static str>>> = OnceLock::new();
        let mut map = RENDERED
            .get_or_init(Default::default)
            .lock()
            .expect("flags lock");
        map.entry(self.0).or_insert_with(|| {
            let joined: Vec<&str> = NAMES
                .iter()
                .enumerate()
                .filter(|(i, _)| self.0 & (1 << i) != 0)
                .map(|(_, n)| *n)
                .collect();
            Box::leak(joined.join(",").into_boxed_str())
        })
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;

    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Flags {
    fn bitor_assign(&mut self, rhs: Flags) {
        self.0 |= rhs.0;
    }
}

impl fmt::Display for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_render_as_envoy_writes_them() {
        assert_eq!(Flags::NONE.as_str(), "-");
        assert_eq!(Flags::UT.as_str(), "UT");
        assert_eq!((Flags::UT | Flags::DI).as_str(), "UT,DI");
        assert_eq!((Flags::URX | Flags::DI).to_string(), "DI,URX");
        assert!((Flags::UT | Flags::DI).contains(Flags::DI));
        // Rendered once.
        assert!(std::ptr::eq(
            (Flags::UF | Flags::URX).as_str(),
            (Flags::URX | Flags::UF).as_str()
        ));
    }
}
