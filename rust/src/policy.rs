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

/// A layer's counts are halved after this many times its share of slots in accesses (the
/// sample window of frequency-based admission: long enough to tell popular experts from a
/// passing burst, short enough to follow a change of text).
const DECAY_WINDOW: u64 = 32;

/// One MoE layer's access counts, halved every `DECAY_WINDOW` shares of that layer's accesses so
/// that they follow the text being served rather than its history.
#[derive(Debug, Default)]
struct LayerCounts {
    /// Decayed accesses per expert (absent: zero).
    counts: HashMap<u64, u64>,
    /// Accesses of the layer since its counts were last halved.
    since_decay: u64,
}

/// Per-slot policy metadata (what the slot's expert looked like to the policy).
#[derive(Clone, Copy, Debug, Default)]
struct SlotMeta {
    key: Option<Key>,
    last_use: u64,
    inserted: u64,
    freq: u64,
    /// The slot's entry in `order` (None when the slot holds nothing).
    rank: Option<(u64, u64)>,
}

/// Bookkeeping of one cache's eviction policy. Resident slots are kept in an ordered set by
/// eviction rank, so a decision walks from the top and skips the few slots that may not be
/// evicted (pinned, loading): O(log n) per change and per victim instead of a scan of all slots.
///
/// Time is counted in acquire calls: `now` is the index of the next acquire call that has not
/// started; predictions for earlier calls are dropped by `advance`, so a key's next predicted
/// use is simply the first entry of its prediction set.
pub struct PolicyState {
    kind: PolicyKind,
    /// Event clock: every access/insert gets a unique tick, so recency never ties.
    clock: u64,
    /// Access counts per MoE layer, kept across evictions (an expert's popularity outlives its
    /// residency).
    freq: HashMap<u64, LayerCounts>,
    meta: Vec<SlotMeta>,
    slot_of: HashMap<Key, usize>,
    /// (rank, slot) of every resident slot; the largest rank is evicted first.
    order: BTreeSet<((u64, u64), usize)>,
    /// The same entries per MoE layer: a layer's own victims without a scan of the others.
    by_layer: HashMap<u64, BTreeSet<((u64, u64), usize)>>,
    now: u64,
    future_by_index: BTreeMap<u64, Vec<Key>>,
    future_by_key: HashMap<Key, BTreeSet<u64>>,
}

impl PolicyState {
    pub fn new(kind: PolicyKind, num_slots: usize) -> Self {
        Self {
            kind,
            clock: 0,
            freq: HashMap::new(),
            meta: vec![SlotMeta::default(); num_slots],
            slot_of: HashMap::new(),
            order: BTreeSet::new(),
            by_layer: HashMap::new(),
            now: 0,
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

    fn compute_rank(&self, m: &SlotMeta) -> (u64, u64) {
        let age = u64::MAX - m.last_use;
        match self.kind {
            PolicyKind::Lru => (age, 0),
            PolicyKind::Lfu => (u64::MAX - m.freq, age),
            PolicyKind::Fifo => (u64::MAX - m.inserted, age),
            PolicyKind::Predictive => {
                let nu = m.key.and_then(|k| self.next_use(k)).unwrap_or(u64::MAX);
                (nu, age)
            }
        }
    }

    /// Re-file `slot` in `order` after its metadata or predictions changed.
    fn rerank(&mut self, slot: usize) {
        self.unrank(slot);
        if let Some(key) = self.meta[slot].key {
            let r = self.compute_rank(&self.meta[slot]);
            self.meta[slot].rank = Some(r);
            self.order.insert((r, slot));
            self.by_layer.entry(key.0).or_default().insert((r, slot));
        }
    }

    /// Take `slot` out of the orders (its key stays).
    fn unrank(&mut self, slot: usize) {
        if let Some(old) = self.meta[slot].rank.take() {
            self.order.remove(&(old, slot));
            if let Some(set) = self.meta[slot].key.and_then(|k| self.by_layer.get_mut(&k.0)) {
                set.remove(&(old, slot));
            }
        }
    }

    fn rerank_key(&mut self, key: Key) {
        if let Some(&slot) = self.slot_of.get(&key) {
            self.rerank(slot);
        }
    }

    /// `key` was just placed into `slot`.
    pub fn on_insert(&mut self, slot: usize, key: Key) {
        self.on_evict(slot);
        let t = self.tick();
        let freq = self.frequency(key);
        self.meta[slot] = SlotMeta { key: Some(key), last_use: t, inserted: t, freq, rank: None };
        self.slot_of.insert(key, slot);
        self.rerank(slot);
    }

    /// `key` was requested by an acquire call (after `on_insert` when it was a miss).
    pub fn on_access(&mut self, key: Key) {
        let t = self.tick();
        let layer = self.freq.entry(key.0).or_default();
        let f = layer.counts.entry(key.1).or_insert(0);
        *f += 1;
        let f = *f;
        layer.since_decay += 1;
        let since = layer.since_decay;
        if let Some(&slot) = self.slot_of.get(&key) {
            let m = &mut self.meta[slot];
            m.last_use = t;
            m.freq = f;
            self.rerank(slot);
        }
        let share = (self.meta.len() / self.freq.len()).max(1) as u64;
        if since >= DECAY_WINDOW.saturating_mul(share) {
            self.decay(key.0);
        }
    }

    /// Halve the counts of `layer`'s experts (dropping those that reach zero).
    fn decay(&mut self, layer: u64) {
        if let Some(c) = self.freq.get_mut(&layer) {
            c.since_decay = 0;
            c.counts.retain(|_, f| {
                *f /= 2;
                *f > 0
            });
        }
        let slots: Vec<usize> = self.by_layer.get(&layer).map_or(Vec::new(), |set| set.iter().map(|&(_, s)| s).collect());
        for slot in slots {
            if let Some(k) = self.meta[slot].key {
                self.meta[slot].freq = self.frequency(k);
                self.rerank(slot);
            }
        }
    }

    /// Decayed access count of `key` (0 when never accessed or decayed away).
    pub fn frequency(&self, key: Key) -> u64 {
        self.freq.get(&key.0).and_then(|c| c.counts.get(&key.1)).copied().unwrap_or(0)
    }

    /// Whether a miss of `new` is worth a slot now held by `resident` (admission of misses
    /// that were read in place): the predictive policy prefers the expert predicted to be used
    /// sooner; every policy (and the predictive one without predictions for either) prefers
    /// the expert accessed more often in the recent window. Ties keep the resident expert: a
    /// copy costs link time and pays only if the new expert is read again before the old one.
    pub fn prefers(&self, new: Key, resident: Key) -> bool {
        if self.kind == PolicyKind::Predictive {
            match (self.next_use(new), self.next_use(resident)) {
                (Some(a), Some(b)) => return a < b,
                (Some(_), None) => return true,
                (None, Some(_)) => return false,
                (None, None) => {}
            }
        }
        self.frequency(new) > self.frequency(resident)
    }

    /// `slot`'s expert left the cache.
    pub fn on_evict(&mut self, slot: usize) {
        self.unrank(slot);
        if let Some(k) = self.meta[slot].key.take() {
            if self.slot_of.get(&k) == Some(&slot) {
                self.slot_of.remove(&k);
            }
        }
    }

    /// Acquire call `index - 1` has started: drop predictions for calls before `index` and
    /// re-rank the experts they named (their next use moved on).
    pub fn advance(&mut self, index: u64) {
        if index <= self.now {
            return;
        }
        self.now = index;
        while let Some((&i, _)) = self.future_by_index.first_key_value() {
            if i >= index {
                break;
            }
            if let Some((i, keys)) = self.future_by_index.pop_first() {
                self.forget(i, &keys);
                for k in keys {
                    self.rerank_key(k);
                }
            }
        }
    }

    pub fn now(&self) -> u64 {
        self.now
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

    /// Replace the predictions for acquire calls `start, start+1, ...` with `visits` (calls
    /// before `now` are in the past and ignored).
    pub fn set_future(&mut self, start: u64, visits: &[Vec<Key>]) {
        let stale = self.future_by_index.split_off(&start);
        for (i, keys) in stale {
            self.forget(i, &keys);
            for k in keys {
                self.rerank_key(k);
            }
        }
        for (offset, keys) in visits.iter().enumerate() {
            let index = start + offset as u64;
            if keys.is_empty() || index < self.now {
                continue;
            }
            for k in keys {
                self.future_by_key.entry(*k).or_default().insert(index);
            }
            self.future_by_index.insert(index, keys.clone());
            for k in keys {
                self.rerank_key(*k);
            }
        }
    }

    /// Number of acquire calls with a prediction (for tests and stats).
    pub fn future_len(&self) -> usize {
        self.future_by_index.len()
    }

    /// Next predicted use of `key` (an acquire-call index >= `now`).
    pub fn next_use(&self, key: Key) -> Option<u64> {
        self.future_by_key.get(&key).and_then(|s| s.first().copied())
    }

    /// Up to `n` victims, best first, among resident slots for which `evictable` holds.
    pub fn choose_victims(&self, n: usize, evictable: impl Fn(usize) -> bool) -> Vec<usize> {
        if n == 0 {
            return Vec::new();
        }
        self.victims().filter(|&s| evictable(s)).take(n).collect()
    }

    /// Every resident slot, the one to evict first first.
    pub fn victims(&self) -> impl Iterator<Item = usize> + '_ {
        self.order.iter().rev().map(|&(_, slot)| slot)
    }

    /// The resident slots of MoE layer `layer`, the one to evict first first.
    pub fn layer_victims(&self, layer: u64) -> impl Iterator<Item = usize> + '_ {
        self.by_layer.get(&layer).into_iter().flat_map(|set| set.iter().rev().map(|&(_, slot)| slot))
    }

    /// Eviction rank of `slot` (None when it holds nothing); larger is evicted first.
    pub fn rank(&self, slot: usize) -> Option<(u64, u64)> {
        self.meta[slot].rank
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
        assert_eq!(p.choose_victims(1, |_| true), vec![1]);
        assert_eq!(p.choose_victims(2, |_| true), vec![1, 2]);
        assert_eq!(p.choose_victims(2, |s| s != 1), vec![2, 0]);
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
        assert_eq!(p.choose_victims(1, |_| true), vec![1]);
    }

    #[test]
    fn fifo_ignores_accesses() {
        let mut p = filled(PolicyKind::Fifo, 2);
        p.on_access((0, 0));
        assert_eq!(p.choose_victims(1, |_| true), vec![0]);
    }

    #[test]
    fn evicted_slots_leave_the_order() {
        let mut p = filled(PolicyKind::Lru, 3);
        p.on_evict(1);
        assert_eq!(p.rank(1), None);
        assert_eq!(p.choose_victims(3, |_| true), vec![0, 2]);
    }

    #[test]
    fn predictive_evicts_furthest_and_never_predicted_first() {
        let mut p = filled(PolicyKind::Predictive, 3);
        p.set_future(0, &[vec![(0, 0)], vec![(0, 1)]]);
        assert_eq!(p.choose_victims(3, |_| true), vec![2, 1, 0]);
        // Once call 0 has started, (0, 0) is never predicted again.
        p.advance(1);
        assert_eq!(p.next_use((0, 0)), None);
        let v = p.choose_victims(2, |_| true);
        assert!(v.contains(&0) && v.contains(&2), "{v:?}");
        // A new prediction for (0, 2) re-ranks it.
        p.set_future(1, &[vec![(0, 2)]]);
        assert_eq!(p.choose_victims(1, |_| true), vec![0]);
    }

    #[test]
    fn counts_are_halved_per_layer_after_the_window() {
        // One slot and one layer seen: the window is DECAY_WINDOW accesses of that layer.
        let mut p = PolicyState::new(PolicyKind::Lfu, 1);
        for _ in 0..DECAY_WINDOW - 1 {
            p.on_access((0, 0));
        }
        assert_eq!(p.frequency((0, 0)), DECAY_WINDOW - 1);
        p.on_access((0, 1));
        assert_eq!((p.frequency((0, 0)), p.frequency((0, 1))), ((DECAY_WINDOW - 1) / 2, 0));
        // Another layer's accesses leave layer 0 alone until its own window is full.
        let mut q = PolicyState::new(PolicyKind::Lfu, 2);
        for _ in 0..2 * DECAY_WINDOW - 1 {
            q.on_access((1, 0));
        }
        q.on_access((0, 3));
        assert_eq!((q.frequency((1, 0)), q.frequency((0, 3))), (2 * DECAY_WINDOW - 1, 1));
    }

    #[test]
    fn a_decayed_resident_expert_is_reranked() {
        let mut p = PolicyState::new(PolicyKind::Lfu, 4);
        p.on_insert(0, (0, 0));
        p.on_insert(1, (1, 0));
        for _ in 0..6 {
            p.on_access((0, 0));
        }
        for _ in 0..4 {
            p.on_access((1, 0));
        }
        assert_eq!(p.choose_victims(1, |_| true), vec![1]);
        // Layer 0 fills its window (4 slots / 2 layers = 2, x DECAY_WINDOW) and is halved below layer 1.
        for _ in 0..(2 * DECAY_WINDOW - 6) {
            p.on_access((0, 7));
        }
        assert_eq!(p.frequency((0, 0)), 3);
        assert_eq!(p.choose_victims(1, |_| true), vec![0]);
    }

    #[test]
    fn admission_prefers_frequent_and_then_sooner_predicted_experts() {
        let mut p = PolicyState::new(PolicyKind::Lru, 2);
        p.on_access((0, 1));
        p.on_access((0, 1));
        p.on_access((0, 2));
        assert!(p.prefers((0, 1), (0, 2)));
        assert!(!p.prefers((0, 2), (0, 1)));
        assert!(!p.prefers((0, 2), (0, 2)), "a tie keeps the resident expert");
        let mut q = PolicyState::new(PolicyKind::Predictive, 2);
        q.on_access((0, 1));
        q.on_access((0, 1));
        assert!(q.prefers((0, 1), (0, 2)), "no predictions: frequency");
        q.set_future(0, &[vec![(0, 2)], vec![(0, 1)]]);
        assert!(q.prefers((0, 2), (0, 1)) && !q.prefers((0, 1), (0, 2)));
        assert!(q.prefers((0, 2), (0, 9)) && !q.prefers((0, 9), (0, 1)));
    }

    #[test]
    fn set_future_replaces_the_tail_only() {
        let mut p = PolicyState::new(PolicyKind::Predictive, 1);
        p.set_future(0, &[vec![(0, 0)], vec![(0, 1)], vec![(0, 2)]]);
        p.set_future(1, &[vec![(0, 3)]]);
        assert_eq!(p.next_use((0, 0)), Some(0));
        assert_eq!(p.next_use((0, 1)), None);
        assert_eq!(p.next_use((0, 2)), None);
        assert_eq!(p.next_use((0, 3)), Some(1));
        assert_eq!(p.future_len(), 2);
    }
}
