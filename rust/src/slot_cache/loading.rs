//! Loading slots: the copy of a pool record into a slot (with the expert table's unpublish and
//! publish around it), the copy workers' handling of queued requests, and the queueing of loads.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Shared, SlotCache};
use crate::cache::{dedup_in_order, PrefetchOutcome};
use crate::device::{EventHandle, EventKind, StreamHandle};
use crate::error::{Error, Result};
use crate::policy::Key;
use crate::prefetch::{Lane, Request, ROUTED_MISS};
use crate::stats::Stats;

/// Per-slot events. Touched by the thread loading the slot and by threads releasing it.
pub(super) struct SlotEvents {
    pub(super) ready: EventHandle,
    /// The key whose expert-table entry points at this slot (set after its copy was queued).
    pub(super) published: Option<Key>,
    /// Recorded on the reader stream after that entry was pointed back at the pool (CUDA).
    pub(super) unpublished: Option<EventHandle>,
    /// One done-reading event per stream that released the slot (same-stream re-records supersede).
    pub(super) done_reading: Vec<(StreamHandle, EventHandle)>,
}

impl Shared {
    pub(super) fn slot_addr(&self, slot: usize) -> u64 {
        self.slots_addr + (slot * self.slot_nbytes) as u64
    }

    /// Issue the copy of `key`'s record into `slot` on `stream` and record its ready event.
    pub(super) fn load_into(&self, slot: usize, key: Key, stream: StreamHandle) -> Result<()> {
        let src = self.pool.record_addr(key)?;
        let n = self.slot_nbytes;
        let dev = &self.device;
        let t0 = Instant::now();
        {
            let mut ev = self.events[slot].lock();
            if let (Some(table), Some(old)) = (self.experts.get(), ev.published) {
                // Decode steps may read this slot through the table: point them back at the pool
                // and let the copy wait until no step that saw the slot can still be running.
                let fence = match ev.unpublished {
                    Some(f) => f,
                    None => {
                        let f = self.take_event()?;
                        ev.unpublished = Some(f);
                        f
                    }
                };
                table.unpublish(&self.pool, old, ev.ready, fence, stream)?;
                ev.published = None;
            }
            // Overwrite only after every reader is done and any earlier copy into it landed.
            for &(_, e) in &ev.done_reading {
                dev.stream_wait_event(stream, e)?;
            }
            dev.stream_wait_event(stream, ev.ready)?;
            let timing = self.timing_pair()?;
            let _issue = if stream == self.demand_stream { self.demand_issue.lock() } else { self.prefetch_issue.lock() };
            if let Some((a, _)) = timing {
                dev.record_event(a, stream)?;
            }
            // SAFETY: the pool stays open while this cache is (it holds a user count); the slot
            // is reserved (Loading) by this thread, so nobody else writes it.
            unsafe { dev.copy_to_slot(self.slot_addr(slot), src, n, stream)? };
            if let Some((a, b)) = timing {
                dev.record_event(b, stream)?;
                self.timer.lock().pending.push_back((a, b, n as u64));
            }
            if let Some(table) = self.experts.get() {
                // Before the ready event, so that "ready" also means "published".
                table.publish(&self.pool, key, self.slot_addr(slot), stream)?;
                ev.published = Some(key);
            }
            dev.record_event(ev.ready, stream)?;
        }
        Stats::add(&self.stats.bytes_copied, n as u64);
        if dev.copies_are_synchronous() {
            Stats::add(&self.stats.copy_ns, t0.elapsed().as_nanos() as u64);
        }
        Ok(())
    }

    pub(super) fn finish(&self, slots: &[(usize, bool)]) {
        let mut t = self.table.lock();
        for &(slot, ok) in slots {
            t.finish_load(slot, ok);
        }
        drop(t);
        self.changed.notify_all();
    }

    /// A worker (or `synchronize`) serves one queued request.
    pub(super) fn serve_request(&self, req: Request, stream: StreamHandle) {
        let s = &self.stats;
        if self.closed.load(Ordering::Acquire) || self.queue.is_cancelled(&req) {
            Stats::add(&s.prefetch_cancelled, 1);
            return;
        }
        let routed = req.generation == ROUTED_MISS;
        let outcome = self.table.lock().reserve_load(req.key, req.demand, !routed);
        match outcome {
            PrefetchOutcome::AlreadyResident => Stats::add(if routed { &s.routed_redundant } else { &s.prefetch_redundant }, 1),
            PrefetchOutcome::NoRoom => Stats::add(if routed { &s.routed_dropped } else { &s.prefetch_dropped }, 1),
            PrefetchOutcome::Reserved { slot, evicted, wasted } => {
                Stats::add(&s.evictions, evicted.is_some() as u64);
                Stats::add(&s.prefetch_wasted, wasted as u64);
                let ok = self.load_into(slot, req.key, stream).is_ok();
                self.finish(&[(slot, ok)]);
                let issued = if routed { &s.demand_loads } else { &s.prefetch_issued };
                Stats::add(if ok { issued } else { &s.load_errors }, 1);
            }
        }
    }

    pub(super) fn take_event(&self) -> Result<EventHandle> {
        match self.spare_events.lock().pop() {
            Some(e) => Ok(e),
            None => self.device.create_event(EventKind::Plain),
        }
    }
}

impl SlotCache {
    /// Queue loads of the experts not resident; returns how many were queued.
    pub fn prefetch(&self, layer: i64, experts: &[i64], lane: Lane, generation: i64) -> Result<usize> {
        let _g = self.open_guard()?;
        if generation < 0 {
            return Err(Error::InvalidArgument(format!("generation must be >= 0, got {generation}")));
        }
        let mut keys = self.keys(layer, experts)?;
        dedup_in_order(&mut keys);
        let sh = &*self.shared;
        {
            let t = sh.table.lock();
            keys.retain(|k| t.lookup(*k).is_none());
        }
        let mut queued = 0;
        for key in keys {
            if sh.queue.push(Request { key, generation: generation as u64, demand: lane == Lane::Demand }) {
                queued += 1;
            } else {
                Stats::add(&sh.stats.prefetch_dropped, 1);
                Stats::add(&sh.stats.prefetch_queue_full, 1);
            }
        }
        Stats::add(&sh.stats.prefetch_queued, queued as u64);
        if queued > 0 {
            sh.queue.wake_workers();
        }
        Ok(queued)
    }
}
