//! A small least-recently-used map with a fixed capacity (JWT-SVID cache, executable hashes).
//!
//! Invariant: `map` and `order` hold the same keys, at most `capacity` of them.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// A least-recently-used map of at most `capacity` entries.
#[derive(Debug)]
pub struct Lru<K, V> {
    capacity: usize,
    tick: u64,
    map: HashMap<K, (V, u64)>,
    order: BTreeMap<u64, K>,
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    /// An empty map holding at most `capacity` (≥ 1) entries.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            tick: 0,
            map: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// The value for `k`, marked as most recently used.
    pub fn get(&mut self, k: &K) -> Option<&V> {
        self.tick += 1;
        let tick = self.tick;
        let (v, t) = self.map.get_mut(k)?;
        if let Some(key) = self.order.remove(t) {
            self.order.insert(tick, key);
        }
        *t = tick;
        Some(v)
    }

    /// Inserts or replaces `k`, evicting the least recently used entry when full.
    pub fn insert(&mut self, k: K, v: V) {
        self.remove(&k);
        while self.map.len() >= self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.map.remove(&oldest);
        }
        self.tick += 1;
        self.order.insert(self.tick, k.clone());
        self.map.insert(k, (v, self.tick));
    }

    /// Removes `k`.
    pub fn remove(&mut self, k: &K) -> Option<V> {
        let (v, t) = self.map.remove(k)?;
        self.order.remove(&t);
        Some(v)
    }

    /// Keeps only the entries for which `keep` is true (order of the rest unchanged).
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        let order = &mut self.order;
        self.map.retain(|k, (v, t)| {
            let kept = keep(k, v);
            if !kept {
                order.remove(t);
            }
            kept
        });
    }

    /// The values held, in no particular order (does not count as a use).
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.map.values().map(|(v, _)| v)
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_least_recently_used() {
        let mut c = Lru::new(2);
        c.insert("a", 1);
        c.insert("b", 2);
        assert_eq!(c.get(&"a"), Some(&1));
        c.insert("c", 3);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&"b"), None);
        assert_eq!(c.get(&"a"), Some(&1));
        c.insert("a", 10);
        assert_eq!(c.len(), 2);
        assert_eq!(c.remove(&"a"), Some(10));
        assert_eq!(c.len(), 1);
        for i in 0..1000 {
            c.insert("x", i);
        }
        assert_eq!(c.len(), 2);
        assert_eq!(c.order.len(), 2);
    }
}
