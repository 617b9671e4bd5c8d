//! Eviction policies (LRU, LFU, FIFO, predictive/Belady), shared by `SlotCache` and
//! `simulate_policy` so the simulator measures exactly the code that serves.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::error::{Error, Result};

/// An expert: (layer, expert id).
pub type Key = (u64, u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    Lru,
    Lfu,
    Fifo,
    Predictive,
}

impl PolicyKind {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "lru" => Ok(Self::Lru),
            "lfu" => Ok(Self::Lfu),
            "fifo" => Ok(Self::Fifo),
            "predictive" => Ok(Self::Predictive),
            other => Err(Error::InvalidArgument(format!(
                "unknown policy {other:?}; allowed: \"lru\", \"lfu\", \"fifo\", \"predictive\""
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Lru => "lru",
            Self::Lfu => "lfu",
            Self::Fifo => "fifo",
            Self::Predictive => "predictive",
        }
    }
}

/// Per-slot policy metadata (what the slot's expert looked like to the policy).
#[derive(Clone, Copy, Debug, Default)]
struct SlotMeta {
    key: Option<Key>,
    last_use: u64,
    inserted: u64,
    freq: u64,
    /// Cached next predicted use (u64::MAX = never), valid for `from` in `nu_from..=nu`.
    nu: u64,
    nu_from: u64,
    nu_valid: bool,
}

/// Bookkeeping of one cache's eviction policy. Metadata is kept per slot so that ranking the
/// candidates is a scan over an array (no hashing per candidate); `index` below is an
/// acquire-call number (0-based).
pub struct PolicyState {
    kind: PolicyKind,
    /// Event clock: every access/insert gets a unique tick, so recency never ties.
    clock: u64,
    /// Access counts kept across evictions (an expert's popularity outlives its residency).
    freq: HashMap<Key, u64>,
    meta: Vec<SlotMeta>,
    slot_of: HashMap<Key, usize>,
    future_by_index: BTreeMap<u64, Vec<Key>>,
    future_by_key: HashMap<Key, BTreeSet<u64>>,
    ranked: Vec<((u64, u64), usize)>,
}

impl PolicyState {
    pub fn new(kind: PolicyKind, num_slots: usize) -> Self {
        Self {
            kind,
            clock: 0,
            freq: HashMap::new(),
            meta: vec![SlotMeta::default(); num_slots],
            slot_of: HashMap::new(),
            future_by_index: BTreeMap::new(),
            future_by_key: HashMap::new(),
            ranked: Vec::new(),
        }
    }

    pub fn kind(&self) -> PolicyKind {
        self.kind
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// `key` was just placed into `slot`.
    pub fn on_insert(&mut self, slot: usize, key: Key) {
        let t = self.tick();
        let freq = self.freq.get(&key).copied().unwrap_or(0);
        self.meta[slot] =
            SlotMeta { key: Some(key), last_use: t, inserted: t, freq, nu: 0, nu_from: 0, nu_valid: false };
        self.slot_of.insert(key, slot);
    }

    /// `key` was requested by an acquire call (after `on_insert` when it was a miss).
    pub fn on_access(&mut self, key: Key) {
        let t = self.tick();
        let f = self.freq.entry(key).or_insert(0);
        *f += 1;
        let f = *f;
        if let Some(&slot) = self.slot_of.get(&key) {
            let m = &mut self.meta[slot];
            m.last_use = t;
            m.freq = f;
        }
    }

    /// `slot`'s expert left the cache.
    pub fn on_evict(&mut self, slot: usize) {
        if let Some(k) = self.meta[slot].key.take() {
            if self.slot_of.get(&k) == Some(&slot) {
                self.slot_of.remove(&k);
            }
        }
    }

    /// Forget predictions for acquire calls before `index` (they are in the past). Cached next
    /// uses stay valid: they are only ever asked for `from >= index`.
    pub fn advance(&mut self, index: u64) {
        while let Some((&i, _)) = self.future_by_index.first_key_value() {
            if i >= index {
                break;
            }
            if let Some((i, keys)) = self.future_by_index.pop_first() {
                self.forget(i, &keys);
            }
        }
    }

    fn forget(&mut self, index: u64, keys: &[Key]) {
        for k in keys {
            if let Some(set) = self.future_by_key.get_mut(k) {
                set.remove(&index);
                if set.is_empty() {
                    self.future_by_key.remove(k);
                }
            }
        }
    }

    fn invalidate(&mut self, key: Key) {
        if let Some(&slot) = self.slot_of.get(&key) {
            self.meta[slot].nu_valid = false;
        }
    }

    /// Replace the predictions for acquire calls `start, start+1, ...` with `visits`.
    pub fn set_future(&mut self, start: u64, visits: &[Vec<Key>]) {
        let stale = self.future_by_index.split_off(&start);
        for (i, keys) in stale {
            self.forget(i, &keys);
            for k in keys {
                self.invalidate(k);
            }
        }
        for (offset, keys) in visits.iter().enumerate() {
            let index = start + offset as u64;
            if keys.is_empty() {
                continue;
            }
            for k in keys {
                self.future_by_key.entry(*k).or_default().insert(index);
                self.invalidate(*k);
            }
            self.future_by_index.insert(index, keys.clone());
        }
    }

    /// Number of acquire calls with a prediction (for tests and stats).
    pub fn future_len(&self) -> usize {
        self.future_by_index.len()
    }

    /// Next predicted use of `key` at or after acquire call `from`.
    pub fn next_use(&self, key: Key, from: u64) -> Option<u64> {
        self.future_by_key.get(&key).and_then(|s| s.range(from..).next().copied())
    }

    /// Eviction rank of `slot`'s expert: the largest rank is evicted first. `from` is the index
    /// of the first acquire call that has not started yet.
    pub fn rank(&mut self, slot: usize, from: u64) -> (u64, u64) {
        let m = self.meta[slot];
        let age = u64::MAX - m.last_use;
        match self.kind {
            PolicyKind::Lru => (age, 0),
            PolicyKind::Lfu => (u64::MAX - m.freq, age),
            PolicyKind::Fifo => (u64::MAX - m.inserted, age),
            PolicyKind::Predictive => {
                if m.nu_valid && m.nu_from <= from && from <= m.nu {
                    return (m.nu, age);
                }
                let nu = m.key.and_then(|k| self.next_use(k, from)).unwrap_or(u64::MAX);
                let mm = &mut self.meta[slot];
                mm.nu = nu;
                mm.nu_from = from;
                mm.nu_valid = true;
                (nu, age)
            }
        }
    }

    /// Pick up to `n` victims among `candidates` (slots that may be evicted), best first.
    pub fn choose_victims(&mut self, candidates: &[usize], n: usize, from: u64) -> Vec<usize> {
        if n == 0 || candidates.is_empty() {
            return Vec::new();
        }
        if n == 1 {
            // The common case: one linear scan, no allocation beyond the result.
            let mut best = (self.rank(candidates[0], from), candidates[0]);
            for &c in &candidates[1..] {
                let r = self.rank(c, from);
                if r > best.0 {
                    best = (r, c);
                }
            }
            return vec![best.1];
        }
        let mut ranked = std::mem::take(&mut self.ranked);
        ranked.clear();
        for &c in candidates {
            ranked.push((self.rank(c, from), c));
        }
        if n < ranked.len() {
            // Only the top n matter: partial selection keeps the decision O(len).
            ranked.select_nth_unstable_by(n - 1, |a, b| b.0.cmp(&a.0));
            ranked.truncate(n);
        }
        ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0));
        let out = ranked.iter().map(|&(_, c)| c).collect();
        self.ranked = ranked;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names() {
        assert_eq!(PolicyKind::parse("lru").unwrap(), PolicyKind::Lru);
        assert_eq!(PolicyKind::parse("predictive").unwrap().name(), "predictive");
        assert!(matches!(PolicyKind::parse("LRU"), Err(Error::InvalidArgument(_))));
    }

    /// Slots 0..n hold experts (0, 0..n), inserted in order.
    fn filled(kind: PolicyKind, n: u64) -> PolicyState {
        let mut p = PolicyState::new(kind, n as usize);
        for e in 0..n {
            p.on_insert(e as usize, (0, e));
        }
        p
    }

    #[test]
    fn lru_evicts_least_recent() {
        let mut p = filled(PolicyKind::Lru, 3);
        p.on_access((0, 0));
        assert_eq!(p.choose_victims(&[0, 1, 2], 1, 0), vec![1]);
        assert_eq!(p.choose_victims(&[0, 1, 2], 2, 0), vec![1, 2]);
    }

    #[test]
    fn lfu_keeps_counts_across_evictions_and_breaks_ties_by_recency() {
        let mut p = filled(PolicyKind::Lfu, 3);
        for _ in 0..3 {
            p.on_access((0, 0));
        }
        p.on_evict(0);
        p.on_insert(0, (0, 0));
        p.on_access((0, 1));
        p.on_access((0, 2));
        assert_eq!(p.choose_victims(&[0, 1, 2], 1, 0), vec![1]);
    }

    #[test]
    fn fifo_ignores_accesses() {
        let mut p = filled(PolicyKind::Fifo, 2);
        p.on_access((0, 0));
        assert_eq!(p.choose_victims(&[0, 1], 1, 0), vec![0]);
    }

    #[test]
    fn predictive_evicts_furthest_and_never_predicted_first() {
        let mut p = filled(PolicyKind::Predictive, 3);
        p.set_future(0, &[vec![(0, 0)], vec![(0, 1)]]);
        assert_eq!(p.choose_victims(&[0, 1, 2], 3, 0), vec![2, 1, 0]);
        // Once call 0 is past, (0, 0) is never predicted again: the cached rank must not stick.
        p.advance(1);
        assert_eq!(p.next_use((0, 0), 1), None);
        let v = p.choose_victims(&[0, 1, 2], 2, 1);
        assert!(v.contains(&0) && v.contains(&2), "{v:?}");
        // A new prediction for (0, 2) re-ranks it.
        p.set_future(1, &[vec![(0, 2)]]);
        assert_eq!(p.choose_victims(&[0, 1, 2], 1, 1), vec![0]);
    }

    #[test]
    fn set_future_replaces_the_tail_only() {
        let mut p = PolicyState::new(PolicyKind::Predictive, 1);
        p.set_future(0, &[vec![(0, 0)], vec![(0, 1)], vec![(0, 2)]]);
        p.set_future(1, &[vec![(0, 3)]]);
        assert_eq!(p.next_use((0, 0), 0), Some(0));
        assert_eq!(p.next_use((0, 1), 0), None);
        assert_eq!(p.next_use((0, 2), 0), None);
        assert_eq!(p.next_use((0, 3), 0), Some(1));
        assert_eq!(p.future_len(), 2);
    }
}
