//! Replaying a trace of cache visits through a `SlotTable` without a device: hits, misses,
//! evictions and loads of a policy (with the whole trace as the predictive policy's future:
//! Belady's optimum), on the acquire path, the table path, or a path per visit; prefetch
//! visits replay a predictor's loads ahead of the visits they predict.

use crate::cache::{dedup_in_order, AcquireOutcome, PrefetchOutcome, SlotTable};
use crate::error::{Error, Result};
use crate::policy::{Key, PolicyKind};

/// What `simulate` counted over a trace.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SimCounts {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    /// Experts copied into a slot (every miss on the acquire path; admitted misses on the table
    /// path; every prefetch).
    pub loads: u64,
    /// Loads made by prefetch visits.
    pub prefetches: u64,
    /// Hits on a slot a prefetch filled that no visit had used yet.
    pub prefetch_used: u64,
}

/// How `simulate` replays each visit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimPath {
    /// `try_acquire`: every miss is loaded before the visit (prefill, the eager path).
    Acquire,
    /// `touch` + `admit`: misses are read in place, admitted ones loaded for later visits
    /// (decode through the expert table), with copies taken to land before the next visit.
    Table,
    /// A prediction, not a visit: each of its keys not resident is loaded as a speculative
    /// prefetch (which never evicts another prefetch not used yet), counting no hit or miss. A
    /// run of prefetch visits is also the policy's future for the visits after it, in order
    /// (a predictor naming the experts of the layers to come), so it cannot be combined with
    /// `future`.
    Prefetch,
}

impl SimPath {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "acquire" => Ok(Self::Acquire),
            "table" => Ok(Self::Table),
            "prefetch" => Ok(Self::Prefetch),
            other => Err(Error::InvalidArgument(format!(
                "unknown path {other:?}; allowed: \"acquire\", \"table\", \"prefetch\""
            ))),
        }
    }
}

/// Counts of `policy` over a trace of visits (each released at once). With `future`, the
/// predictive policy is told the whole trace first (Belady's optimum on the acquire path).
pub fn simulate(policy: PolicyKind, num_slots: i64, trace: &[Vec<Key>], future: bool, path: SimPath) -> Result<SimCounts> {
    simulate_steps(policy, num_slots, trace, future, &[path], 0)
}

/// The keys of a trace of `(layer, experts)` visits with signed ids, as simulated (InvalidArgument
/// naming the first visit with a negative id).
pub fn trace_keys(visits: &[(i64, Vec<i64>)]) -> Result<Vec<Vec<Key>>> {
    visits
        .iter()
        .enumerate()
        .map(|(i, (layer, experts))| {
            if *layer < 0 || experts.iter().any(|&e| e < 0) {
                return Err(Error::InvalidArgument(format!(
                    "trace step {i}: layer and experts must be >= 0, got ({layer}, {experts:?})"
                )));
            }
            Ok(experts.iter().map(|&e| (*layer as u64, e as u64)).collect())
        })
        .collect()
}

/// `simulate` with a path per visit (`paths[i]`; one path serves every visit) that counts only
/// the visits from `count_from` on: the earlier ones still fill the cache and feed the policy,
/// as a recorded warm-up does before the part a benchmark times.
pub fn simulate_steps(
    policy: PolicyKind,
    num_slots: i64,
    trace: &[Vec<Key>],
    future: bool,
    paths: &[SimPath],
    count_from: i64,
) -> Result<SimCounts> {
    if num_slots <= 0 {
        return Err(Error::Budget(format!("num_slots must be >= 1, got {num_slots}")));
    }
    if paths.len() != 1 && paths.len() != trace.len() {
        return Err(Error::InvalidArgument(format!(
            "give one path for every visit or one per visit: {} paths for {} visits",
            paths.len(),
            trace.len()
        )));
    }
    let count_from = match usize::try_from(count_from) {
        Ok(n) if n <= trace.len() => n,
        _ => return Err(Error::InvalidArgument(format!("count_from must be in [0, {}], got {count_from}", trace.len()))),
    };
    let path_of = |i: usize| paths[if paths.len() == 1 { 0 } else { i }];
    if future && (0..trace.len()).any(|i| path_of(i) == SimPath::Prefetch) {
        return Err(Error::InvalidArgument(
            "future=true feeds the policy the trace itself; prefetch visits feed it their predictions: use one".into(),
        ));
    }
    // Slots beyond the trace's distinct experts would stay empty and change no count, so the
    // table never needs more (a budget sweep may ask for any number).
    let distinct: std::collections::HashSet<Key> = trace.iter().flatten().copied().collect();
    let mut table = SlotTable::new((num_slots as u64).min(distinct.len().max(1) as u64) as usize, policy)?;
    if future {
        table.set_future(0, trace);
    }
    let mut counted = SimCounts::default();
    let mut warm = SimCounts::default(); // the visits before count_from
    for (i, step) in trace.iter().enumerate() {
        let c = if i < count_from { &mut warm } else { &mut counted };
        let mut keys = step.clone();
        dedup_in_order(&mut keys);
        match path_of(i) {
            SimPath::Prefetch => {
                if i == 0 || path_of(i - 1) != SimPath::Prefetch {
                    let run = (i..trace.len()).take_while(|&j| path_of(j) == SimPath::Prefetch).count();
                    table.set_future(0, &trace[i..i + run]);
                }
                for key in keys {
                    let outcome = table.reserve_prefetch(key, false);
                    c.prefetches += land(&mut table, outcome, c) as u64;
                }
            }
            SimPath::Table => {
                let touch = table.touch(&keys);
                c.hits += touch.hits;
                c.misses += touch.missing.len() as u64;
                c.prefetch_used += touch.prefetch_used;
                for key in touch.admitted {
                    let outcome = table.reserve_load(key, true, false);
                    land(&mut table, outcome, c);
                }
            }
            SimPath::Acquire => {
                let plan = match table.try_acquire(&keys) {
                    Ok(AcquireOutcome::Planned(p)) => p,
                    Ok(AcquireOutcome::NoRoom { .. }) => {
                        return Err(Error::SlotState(format!("internal: no room at trace step {i} with nothing pinned")))
                    }
                    Err(Error::Budget(m)) => return Err(Error::Budget(format!("trace step {i}: {m}"))),
                    Err(e) => return Err(e),
                };
                for &(slot, _) in &plan.loads {
                    table.finish_load(slot, true);
                }
                table.release(&plan.slots)?;
                c.hits += plan.hits;
                c.misses += plan.misses;
                c.evictions += plan.evictions;
                c.loads += plan.loads.len() as u64;
                c.prefetch_used += plan.prefetch_used;
            }
        }
    }
    Ok(counted)
}

/// A reserved load lands at once (the simulation has no copy timing); counts it. Whether one was
/// reserved.
fn land(table: &mut SlotTable, outcome: PrefetchOutcome, c: &mut SimCounts) -> bool {
    let PrefetchOutcome::Reserved { slot, evicted, .. } = outcome else { return false };
    table.finish_load(slot, true);
    c.evictions += evicted.is_some() as u64;
    c.loads += 1;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulate_with_more_slots_than_experts_allocates_no_more_than_it_needs() {
        let trace: Vec<Vec<Key>> = (0..50).map(|i| vec![(0, i % 5), (1, i % 3)]).collect();
        for path in [SimPath::Acquire, SimPath::Table] {
            let fit = simulate(PolicyKind::Lru, 8, &trace, false, path).unwrap();
            assert_eq!(fit, SimCounts { hits: 92, misses: 8, evictions: 0, loads: 8, ..Default::default() });
            assert_eq!(simulate(PolicyKind::Lru, i64::MAX, &trace, false, path).unwrap(), fit);
            assert_eq!(simulate(PolicyKind::Fifo, 1 << 40, &[], false, path).unwrap(), SimCounts::default());
            assert!(matches!(simulate(PolicyKind::Lru, -2, &trace, false, path), Err(Error::Budget(_))));
        }
    }

    #[test]
    fn simulate_steps_counts_from_a_visit_after_a_warm_up_on_each_visits_path() {
        let trace: Vec<Vec<Key>> = (0..40).map(|i| vec![(i % 2, i % 7), (i % 2, (i * 3) % 5)]).collect();
        let paths: Vec<SimPath> = (0..40).map(|i| if i % 3 == 0 { SimPath::Acquire } else { SimPath::Table }).collect();
        for (policy, future) in [(PolicyKind::Lru, false), (PolicyKind::Predictive, true)] {
            let all = simulate_steps(policy, 4, &trace, future, &paths, 0).unwrap();
            let tail = simulate_steps(policy, 4, &trace, future, &paths, 25).unwrap();
            assert!(tail.hits + tail.misses > 0 && tail.hits + tail.misses < all.hits + all.misses);
            assert_eq!(simulate_steps(policy, 4, &trace, future, &paths, 40).unwrap(), SimCounts::default());
            // one path for every visit is `simulate`
            for path in [SimPath::Acquire, SimPath::Table] {
                assert_eq!(simulate_steps(policy, 4, &trace, future, &[path], 0).unwrap(), simulate(policy, 4, &trace, future, path).unwrap());
            }
        }
        assert!(matches!(simulate_steps(PolicyKind::Lru, 4, &trace, false, &paths[..3], 0), Err(Error::InvalidArgument(_))));
        for bad in [-1, 41] {
            assert!(matches!(simulate_steps(PolicyKind::Lru, 4, &trace, false, &paths, bad), Err(Error::InvalidArgument(_))));
        }
    }

    #[test]
    fn prefetch_visits_load_ahead_count_no_lookups_and_feed_their_run_as_the_future() {
        // 2 layers of top-1 over 3 tokens, each token's true experts prefetched before it
        let tokens = [[(0, 0), (1, 2)], [(0, 0), (1, 2)], [(0, 1), (1, 2)]];
        let mut trace = Vec::new();
        let mut paths = Vec::new();
        for t in tokens {
            for (v, path) in [(t, SimPath::Prefetch), (t, SimPath::Acquire)] {
                for key in v {
                    trace.push(vec![key]);
                    paths.push(path);
                }
            }
        }
        for policy in [PolicyKind::Lru, PolicyKind::Predictive] {
            let c = simulate_steps(policy, 2, &trace, false, &paths, 0).unwrap();
            assert_eq!((c.hits, c.misses, c.prefetches, c.prefetch_used), (6, 0, 3, 3));
            assert_eq!(c.loads, 3);
        }
        // a run of prefetch visits is the future of the visits after it: told "X, then B", the
        // predictive policy makes room for X by evicting A (no next use) and keeps B, while LRU
        // evicts B (least recent) and must prefetch it again
        let (a, b, x) = ((0, 0), (0, 1), (0, 2));
        let trace: Vec<Vec<Key>> = [a, b, a, x, b, x, b].iter().map(|&k| vec![k]).collect();
        let mut paths = vec![SimPath::Acquire; 7];
        paths[3] = SimPath::Prefetch;
        paths[4] = SimPath::Prefetch;
        let lru = simulate_steps(PolicyKind::Lru, 2, &trace, false, &paths, 0).unwrap();
        let predictive = simulate_steps(PolicyKind::Predictive, 2, &trace, false, &paths, 0).unwrap();
        assert_eq!((predictive.hits, predictive.misses, predictive.prefetches, predictive.prefetch_used), (3, 2, 1, 1));
        assert_eq!((lru.hits, lru.misses, lru.prefetches, lru.prefetch_used), (3, 2, 2, 2));
        assert!(matches!(simulate_steps(PolicyKind::Predictive, 2, &trace, true, &paths, 0), Err(Error::InvalidArgument(_))));
        assert_eq!(SimPath::parse("prefetch").unwrap(), SimPath::Prefetch);
    }
}
