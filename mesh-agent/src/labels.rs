//! A label (or annotation) map kept small. The agent holds two label maps for every pod of
//! the cluster (the pod's own and its workload's in the state), and `BTreeMap<String, String>`
//! costs a 544-byte B-tree node plus two heap blocks per entry however few labels there
//! are: 690 bytes for a pod's usual two, 66 MiB across 50,000 pods. [`Labels`] keeps the
//! entries sorted by key in one string and their boundaries in one array: two blocks, some
//! 80 bytes for the same two labels. Lookups are a binary search over the keys; the maps are
//! written once and read often, never edited in place.
//!
//! It reads and writes as a JSON/YAML map, iterates in key order like a `BTreeMap`, and two
//! maps are equal when they hold the same entries.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Entries sorted by key, unique keys. `text` is every key and value concatenated in order;
/// `ends[2i]` is where key `i` ends, `ends[2i + 1]` where its value ends.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels {
    text: Box<str>,
    ends: Box<[u32]>,
}

impl Labels {
    /// No label.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.ends.len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn start(&self, slot: usize) -> usize {
        if slot == 0 {
            0
        } else {
            self.ends[slot - 1] as usize
        }
    }

    fn slot(&self, slot: usize) -> &str {
        &self.text[self.start(slot)..self.ends[slot] as usize]
    }

    fn key(&self, i: usize) -> &str {
        self.slot(2 * i)
    }

    fn value(&self, i: usize) -> &str {
        self.slot(2 * i + 1)
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.key(mid).cmp(key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(self.value(mid)),
            }
        }
        None
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The entries in key order.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            labels: self,
            next: 0,
        }
    }

    /// Kubernetes `matchLabels`: every entry of `selector` is here with the same value (an
    /// empty selector selects everything).
    pub fn matches<'s, K, V>(&self, selector: impl IntoIterator<Item = (&'s K, &'s V)>) -> bool
    where
        K: AsRef<str> + ?Sized + 's,
        V: AsRef<str> + ?Sized + 's,
    {
        selector
            .into_iter()
            .all(|(k, v)| self.get(k.as_ref()) == Some(v.as_ref()))
    }

    /// The entries of `map`, only those whose key `keep` accepts.
    pub fn filtered(map: &BTreeMap<String, String>, keep: impl Fn(&str) -> bool) -> Self {
        map.iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    /// Sets `key` to `value` (the map is rebuilt: for setting up, not for hot paths).
    pub fn insert(&mut self, key: impl AsRef<str>, value: impl AsRef<str>) {
        let key = key.as_ref();
        let entries = self
            .iter()
            .filter(|(k, _)| *k != key)
            .chain([(key, value.as_ref())]);
        *self = entries.collect();
    }

    /// As a `BTreeMap`, for the APIs that take one.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

/// From entries in any order; of a key given twice the last value is kept, as a map would.
impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Labels {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(entries: I) -> Self {
        let mut sorted: Vec<(K, V)> = entries.into_iter().collect();
        // Stable: equal keys keep their order, and the last one wins below.
        sorted.sort_by(|a, b| a.0.as_ref().cmp(b.0.as_ref()));
        let mut text = String::new();
        let mut ends: Vec<u32> = Vec::with_capacity(2 * sorted.len());
        let mut entries = sorted.iter().peekable();
        while let Some((k, v)) = entries.next() {
            if entries
                .peek()
                .is_some_and(|(next, _)| next.as_ref() == k.as_ref())
            {
                continue;
            }
            for part in [k.as_ref(), v.as_ref()] {
                text.push_str(part);
                ends.push(u32::try_from(text.len()).expect("labels under 4 GiB"));
            }
        }
        Self {
            text: text.into_boxed_str(),
            ends: ends.into_boxed_slice(),
        }
    }
}

impl<K: AsRef<str>, V: AsRef<str>, const N: usize> From<[(K, V); N]> for Labels {
    fn from(entries: [(K, V); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl From<&BTreeMap<String, String>> for Labels {
    fn from(map: &BTreeMap<String, String>) -> Self {
        map.iter().collect()
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        Self::from(&map)
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a str, &'a str);
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// The entries of a [`Labels`], in key order.
#[derive(Debug, Clone)]
pub struct Iter<'a> {
    labels: &'a Labels,
    next: usize,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        let i = self.next;
        (i < self.labels.len()).then(|| {
            self.next += 1;
            (self.labels.key(i), self.labels.value(i))
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.labels.len() - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::<String, String>::deserialize(deserializer).map(Self::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_like_the_map_it_came_from() {
        let map: BTreeMap<String, String> = [("version", "v1"), ("app", "web"), ("", "empty")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        let labels = Labels::from(&map);
        assert_eq!(labels.len(), 3);
        for (k, v) in &map {
            assert_eq!(labels.get(k), Some(v.as_str()));
        }
        assert_eq!(labels.get("ap"), None);
        assert_eq!(labels.get("zzz"), None);
        assert!(
            labels
                .iter()
                .eq(map.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        );
        assert_eq!(labels.to_map(), map);
        assert_eq!(format!("{labels:?}"), format!("{map:?}"));
        assert!(Labels::new().is_empty() && Labels::new().get("").is_none());
        let mut more = labels.clone();
        more.insert("app", "db");
        more.insert("tier", "1");
        assert_eq!(
            more,
            Labels::from([
                ("", "empty"),
                ("app", "db"),
                ("tier", "1"),
                ("version", "v1")
            ])
        );
    }

    #[test]
    fn the_last_of_a_repeated_key_wins_and_order_does_not_matter() {
        let a: Labels = [("b", "1"), ("a", "1"), ("b", "2")].into_iter().collect();
        let b: Labels = [("a", "1"), ("b", "2")].into_iter().collect();
        assert_eq!(a, b);
        assert_eq!(a.get("b"), Some("2"));
    }

    #[test]
    fn selects_as_match_labels_does() {
        let labels: Labels = [("app", "web"), ("version", "v1")].into_iter().collect();
        let selector = |entries: &[(&str, &str)]| -> BTreeMap<String, String> {
            entries
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(labels.matches(&selector(&[])));
        assert!(labels.matches(&selector(&[("app", "web")])));
        assert!(!labels.matches(&selector(&[("app", "web"), ("version", "v2")])));
        assert!(!labels.matches(&selector(&[("tier", "")])));
    }

    #[test]
    fn json_round_trips_as_a_map() {
        let labels: Labels = [("app", "web"), ("k8s.io/x", "a\u{0}b")]
            .into_iter()
            .collect();
        let json = serde_json::to_value(&labels).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"app": "web", "k8s.io/x": "a\u{0}b"})
        );
        assert_eq!(serde_json::from_value::<Labels>(json).unwrap(), labels);
    }

    #[test]
    fn two_labels_cost_two_small_blocks() {
        let labels: Labels = [("app", "svc-1234"), ("version", "v1")]
            .into_iter()
            .collect();
        assert_eq!(labels.text.len(), "appsvc-1234versionv1".len());
        assert_eq!(labels.ends.len(), 4);
        assert_eq!(std::mem::size_of::<Labels>(), 32);
    }
}
