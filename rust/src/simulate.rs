//! Replaying a trace of cache visits through a `SlotTable` without a device: hits, misses,
//! evictions and loads of a policy (with the whole trace as the predictive policy's future:
//! Belady's optimum), on the acquire path, the table path, or a path per visit.

use crate::cache::{dedup_in_order, AcquireOutcome, PrefetchOutcome, SlotTable};
use crate::error::{Error, Result};
use crate::policy::{Key, PolicyKind};

/// What `simulate` counted over a trace.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SimCounts {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    /// Experts copied into a slot (every miss on the acquire path; admitted misses on the table path).
    pub loads: u64,
}

/// How `simulate` replays each visit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimPath {
    /// `try_acquire`: every miss is loaded before the visit (prefill, the eager path).
    Acquire,
    /// `touch` + `admit`: misses are read in place, admitted ones loaded for later visits
    /// (decode through the expert table), with copies taken to land before the next visit.
    Table,
}

impl SimPath {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "acquire" => Ok(Self::Acquire),
            "table" => Ok(Self::Table),
            other => Err(Error::InvalidArgument(format!("unknown path {other:?}; allowed: \"acquire\", \"table\""))),
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
        if paths[if paths.len() == 1 { 0 } else { i }] == SimPath::Table {
            let touch = table.touch(&keys);
            c.hits += touch.hits;
            c.misses += touch.missing.len() as u64;
            for key in touch.admitted {
                if let PrefetchOutcome::Reserved { slot, evicted, .. } = table.reserve_load(key, true, false) {
                    table.finish_load(slot, true);
                    c.evictions += evicted.is_some() as u64;
                    c.loads += 1;
                }
            }
            continue;
        }
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
    }
    Ok(counted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulate_with_more_slots_than_experts_allocates_no_more_than_it_needs() {
        let trace: Vec<Vec<Key>> = (0..50).map(|i| vec![(0, i % 5), (1, i % 3)]).collect();
        for path in [SimPath::Acquire, SimPath::Table] {
            let fit = simulate(PolicyKind::Lru, 8, &trace, false, path).unwrap();
            assert_eq!(fit, SimCounts { hits: 92, misses: 8, evictions: 0, loads: 8 });
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
}
