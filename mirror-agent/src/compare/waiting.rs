//! Requests waiting for their other halves (the live response, each mirror's answer), oldest
//! first, under a cap. The comparison of statuses and timings and the comparison of contents
//! both pair this way; each keeps what it waits with (`V`) and counts what eviction loses.

use std::collections::VecDeque;

use super::PairKey;
use crate::FastMap;

pub(super) struct Waiting<V> {
    map: FastMap<PairKey, V>,
    /// Keys in arrival order; keys resolved since leave lazily.
    order: VecDeque<PairKey>,
}

impl<V: Default> Waiting<V> {
    pub fn new() -> Self {
        Waiting {
            map: FastMap::default(),
            order: VecDeque::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The entry of `key`, new if it was not waiting. A new key first makes room, the oldest
    /// entries going to `evicted`, while `max` wait.
    pub fn entry(&mut self, key: PairKey, max: usize, mut evicted: impl FnMut(V)) -> &mut V {
        if !self.map.contains_key(&key) {
            while self.map.len() >= max.max(1) {
                match self.evict_oldest() {
                    Some(v) => evicted(v),
                    None => break,
                }
            }
            self.order.push_back(key);
            // A key that waits long (a mirror dropped its request) keeps resolved keys
            // behind it in the queue: sweep them now and then.
            if self.order.len() > 2 * max.max(1) {
                let map = &self.map;
                self.order.retain(|k| k == &key || map.contains_key(k));
            }
        }
        self.map.entry(key).or_default()
    }

    pub fn get_mut(&mut self, key: &PairKey) -> Option<&mut V> {
        self.map.get_mut(key)
    }

    /// `key` is resolved: it stops waiting.
    pub fn remove(&mut self, key: &PairKey) -> Option<V> {
        let v = self.map.remove(key);
        while let Some(k) = self.order.front() {
            if self.map.contains_key(k) {
                break;
            }
            self.order.pop_front();
        }
        v
    }

    /// Makes room: the oldest waiting entry goes. None when nothing waits.
    pub fn evict_oldest(&mut self) -> Option<V> {
        while let Some(k) = self.order.pop_front() {
            if let Some(v) = self.map.remove(&k) {
                return Some(v);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> PairKey {
        (n, 0)
    }

    #[test]
    fn the_oldest_goes_first_and_resolved_keys_are_skipped() {
        let mut w: Waiting<u32> = Waiting::new();
        let mut evicted = Vec::new();
        for n in 0..3 {
            *w.entry(key(n), 3, |v| evicted.push(v)) = n as u32;
        }
        assert_eq!(w.remove(&key(0)), Some(0));
        *w.entry(key(3), 3, |v| evicted.push(v)) = 3;
        assert!(evicted.is_empty(), "three wait: no room needed");
        *w.entry(key(4), 3, |v| evicted.push(v)) = 4;
        assert_eq!(evicted, [1], "the oldest still waiting made room");
        assert_eq!(w.len(), 3);
        assert_eq!(w.evict_oldest(), Some(2));
        assert!(w.get_mut(&key(3)).is_some() && w.get_mut(&key(4)).is_some());
    }

    #[test]
    fn a_key_that_waits_long_does_not_grow_the_queue() {
        let mut w: Waiting<u32> = Waiting::new();
        w.entry(key(0), 4, |_| {});
        for n in 1..1000 {
            w.entry(key(n), 4, |_| {});
            w.remove(&key(n));
        }
        assert_eq!(w.len(), 1);
        assert!(w.order.len() <= 9, "{}", w.order.len());
        assert_eq!(w.evict_oldest(), Some(0));
    }
}
