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

/// Per-key bookkeeping for one cache. `index` below is an acquire-call number (0-based).
pub struct PolicyState {
    kind: PolicyKind,
    /// Event clock: every access/insert gets a unique tick, so recency never ties.
    clock: u64,
    last_use: HashMap<Key, u64>,
    inserted: HashMap<Key, u64>,
    /// Access counts kept across evictions (an expert's popularity outlives its residency).
    freq: HashMap<Key, u64>,
    future_by_index: BTreeMap<u64, Vec<Key>>,
    future_by_key: HashMap<Key, BTreeSet<u64>>,
}

impl PolicyState {
    pub fn new(kind: PolicyKind) -> Self {
        Self {
            kind,
            clock: 0,
            last_use: HashMap::new(),
            inserted: HashMap::new(),
            freq: HashMap::new(),
            future_by_index: BTreeMap::new(),
            future_by_key: HashMap::new(),
        }
    }

    pub fn kind(&self) -> PolicyKind {
        self.kind
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// `key` was just loaded into a slot.
    pub fn on_insert(&mut self, key: Key) {
        let t = self.tick();
        self.inserted.insert(key, t);
        self.last_use.insert(key, t);
    }

    /// `key` was requested by an acquire call (hit or miss).
    pub fn on_access(&mut self, key: Key) {
        let t = self.tick();
        self.last_use.insert(key, t);
        *self.freq.entry(key).or_insert(0) += 1;
    }

    /// `key` left the cache.
    pub fn on_evict(&mut self, key: Key) {
        self.last_use.remove(&key);
        self.inserted.remove(&key);
    }

    /// Forget predictions for acquire calls before `index` (they are in the past).
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

    /// Replace the predictions for acquire calls `start, start+1, ...` with `visits`.
    pub fn set_future(&mut self, start: u64, visits: &[Vec<Key>]) {
        let stale = self.future_by_index.split_off(&start);
        for (i, keys) in stale {
            self.forget(i, &keys);
        }
        for (offset, keys) in visits.iter().enumerate() {
            let index = start + offset as u64;
            if keys.is_empty() {
                continue;
            }
            for k in keys {
                self.future_by_key.entry(*k).or_default().insert(index);
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

    /// Eviction rank: the candidate with the largest rank is evicted first. `from` is the index of
    /// the first acquire call that has not started yet.
    pub fn rank(&self, key: Key, from: u64) -> (u64, u64) {
        let age = u64::MAX - self.last_use.get(&key).copied().unwrap_or(0);
        match self.kind {
            PolicyKind::Lru => (age, 0),
            PolicyKind::Lfu => (u64::MAX - self.freq.get(&key).copied().unwrap_or(0), age),
            PolicyKind::Fifo => (u64::MAX - self.inserted.get(&key).copied().unwrap_or(0), age),
            PolicyKind::Predictive => (self.next_use(key, from).unwrap_or(u64::MAX), age),
        }
    }

    /// Pick up to `n` victims among `candidates` (resident keys that may be evicted), best first.
    pub fn choose_victims<T: Copy>(&self, candidates: &[(T, Key)], n: usize, from: u64) -> Vec<T> {
        if n == 0 {
            return Vec::new();
        }
        let mut ranked: Vec<((u64, u64), T)> =
            candidates.iter().map(|&(t, k)| (self.rank(k, from), t)).collect();
        if n < ranked.len() {
            // Only the top n matter: partial selection keeps the decision O(len).
            ranked.select_nth_unstable_by(n - 1, |a, b| b.0.cmp(&a.0));
            ranked.truncate(n);
        }
        ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0));
        ranked.into_iter().map(|(_, t)| t).collect()
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

    #[test]
    fn lru_evicts_least_recent() {
        let mut p = PolicyState::new(PolicyKind::Lru);
        for e in 0..3 {
            p.on_insert((0, e));
        }
        p.on_access((0, 0));
        let c = [(0usize, (0, 0)), (1, (0, 1)), (2, (0, 2))];
        assert_eq!(p.choose_victims(&c, 1, 0), vec![1]);
        assert_eq!(p.choose_victims(&c, 2, 0), vec![1, 2]);
    }

    #[test]
    fn lfu_keeps_counts_across_evictions_and_breaks_ties_by_recency() {
        let mut p = PolicyState::new(PolicyKind::Lfu);
        for _ in 0..3 {
            p.on_access((0, 0));
        }
        p.on_evict((0, 0));
        p.on_insert((0, 0));
        p.on_access((0, 1));
        p.on_access((0, 2));
        let c = [(0usize, (0, 0)), (1, (0, 1)), (2, (0, 2))];
        assert_eq!(p.choose_victims(&c, 1, 0), vec![1]);
    }

    #[test]
    fn fifo_ignores_accesses() {
        let mut p = PolicyState::new(PolicyKind::Fifo);
        p.on_insert((0, 0));
        p.on_insert((0, 1));
        p.on_access((0, 0));
        let c = [(0usize, (0, 0)), (1, (0, 1))];
        assert_eq!(p.choose_victims(&c, 1, 0), vec![0]);
    }

    #[test]
    fn predictive_evicts_furthest_and_never_predicted_first() {
        let mut p = PolicyState::new(PolicyKind::Predictive);
        for e in 0..3 {
            p.on_insert((0, e));
        }
        p.set_future(0, &[vec![(0, 0)], vec![(0, 1)]]);
        let c = [(0usize, (0, 0)), (1, (0, 1)), (2, (0, 2))];
        assert_eq!(p.choose_victims(&c, 3, 0), vec![2, 1, 0]);
        // Once call 0 is past, (0, 0) is never predicted again.
        p.advance(1);
        assert_eq!(p.next_use((0, 0), 1), None);
        assert_eq!(p.choose_victims(&c, 1, 1).len(), 1);
        assert_ne!(p.choose_victims(&c, 1, 1), vec![1]);
    }

    #[test]
    fn set_future_replaces_the_tail_only() {
        let mut p = PolicyState::new(PolicyKind::Predictive);
        p.set_future(0, &[vec![(0, 0)], vec![(0, 1)], vec![(0, 2)]]);
        p.set_future(1, &[vec![(0, 3)]]);
        assert_eq!(p.next_use((0, 0), 0), Some(0));
        assert_eq!(p.next_use((0, 1), 0), None);
        assert_eq!(p.next_use((0, 2), 0), None);
        assert_eq!(p.next_use((0, 3), 0), Some(1));
        assert_eq!(p.future_len(), 2);
    }
}
