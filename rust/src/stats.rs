//! Lock-free counters shared by the cache, its workers and the Python `stats()` call.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Monotonic counters (reset by `reset`). Times are kept in nanoseconds.
#[derive(Default)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub acquires: AtomicU64,
    pub releases: AtomicU64,
    pub prefetch_queued: AtomicU64,
    pub prefetch_issued: AtomicU64,
    pub prefetch_used: AtomicU64,
    pub prefetch_wasted: AtomicU64,
    pub prefetch_cancelled: AtomicU64,
    pub prefetch_dropped: AtomicU64,
    pub prefetch_queue_full: AtomicU64,
    pub prefetch_redundant: AtomicU64,
    pub evictions: AtomicU64,
    pub demand_loads: AtomicU64,
    pub load_errors: AtomicU64,
    pub bytes_copied: AtomicU64,
    pub copy_ns: AtomicU64,
    pub host_stall_ns: AtomicU64,
    /// Layer visits computed through the expert table (`note_routed`).
    pub routed_visits: AtomicU64,
    /// Experts those visits read from the pinned pool in place (the link traffic of table misses).
    pub routed_misses: AtomicU64,
    /// Loads of table-visit misses that found the expert already loaded, or no slot to evict.
    pub routed_redundant: AtomicU64,
    pub routed_dropped: AtomicU64,
    /// Table-visit misses not admitted: read in place and not copied (`SlotTable::admit`).
    pub routed_declined: AtomicU64,
    /// Acquire misses loaded into transient slots (loaded for the call, not admitted).
    pub acquire_transient: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Snapshot as (name, value) pairs. `device_timed` = (seconds, bytes) of the copies timed on
    /// the device (CUDA timing events); without it the host-measured copy time is used.
    pub fn snapshot(&self, device_timed: Option<(f64, f64)>) -> Vec<(&'static str, f64)> {
        let g = |c: &AtomicU64| c.load(Relaxed) as f64;
        let bytes = g(&self.bytes_copied);
        let (copy_s, timed_bytes) = device_timed.unwrap_or((g(&self.copy_ns) * 1e-9, bytes));
        let gbps = if copy_s > 0.0 { timed_bytes / copy_s / 1e9 } else { 0.0 };
        vec![
            ("hits", g(&self.hits)),
            ("misses", g(&self.misses)),
            ("acquires", g(&self.acquires)),
            ("routed_visits", g(&self.routed_visits)),
            ("routed_misses", g(&self.routed_misses)),
            ("routed_redundant", g(&self.routed_redundant)),
            ("routed_dropped", g(&self.routed_dropped)),
            ("routed_declined", g(&self.routed_declined)),
            ("acquire_transient", g(&self.acquire_transient)),
            ("releases", g(&self.releases)),
            ("prefetch_queued", g(&self.prefetch_queued)),
            ("prefetch_issued", g(&self.prefetch_issued)),
            ("prefetch_used", g(&self.prefetch_used)),
            ("prefetch_wasted", g(&self.prefetch_wasted)),
            ("prefetch_cancelled", g(&self.prefetch_cancelled)),
            ("prefetch_dropped", g(&self.prefetch_dropped)),
            ("prefetch_queue_full", g(&self.prefetch_queue_full)),
            ("prefetch_redundant", g(&self.prefetch_redundant)),
            ("evictions", g(&self.evictions)),
            ("demand_loads", g(&self.demand_loads)),
            ("load_errors", g(&self.load_errors)),
            ("bytes_copied", bytes),
            ("copy_seconds", copy_s),
            ("host_stall_seconds", g(&self.host_stall_ns) * 1e-9),
            ("achieved_gbps", gbps),
        ]
    }

    pub fn reset(&self) {
        for c in [
            &self.hits,
            &self.misses,
            &self.acquires,
            &self.releases,
            &self.prefetch_queued,
            &self.prefetch_issued,
            &self.prefetch_used,
            &self.prefetch_wasted,
            &self.prefetch_cancelled,
            &self.prefetch_dropped,
            &self.prefetch_queue_full,
            &self.prefetch_redundant,
            &self.evictions,
            &self.demand_loads,
            &self.load_errors,
            &self.bytes_copied,
            &self.copy_ns,
            &self.host_stall_ns,
            &self.routed_visits,
            &self.routed_misses,
            &self.routed_redundant,
            &self.routed_dropped,
            &self.routed_declined,
            &self.acquire_transient,
        ] {
            c.store(0, Relaxed);
        }
    }
}
