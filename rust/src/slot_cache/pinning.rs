//! Pinning slots for a layer call on the acquire path.
//!
//! acquire: pin hits and reserve victims for misses all-or-nothing (when other threads pin too
//! many slots: pin nothing, wait for a release, retry), copy the misses on the high-priority
//! demand stream, wait on the host only for slots another thread is still issuing, then make the
//! caller's stream wait on each slot's ready event. release: record a done-reading event on the
//! caller's stream, which the next copy into that slot waits for.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{closed_err, Shared, SlotCache};
use crate::cache::{dedup_in_order, AcquireOutcome, WaitStatus};
use crate::device::{DeviceKind, EventHandle, StreamHandle};
use crate::error::{Error, Result};
use crate::stats::Stats;

impl Shared {
    /// Make `stream` wait on each slot's ready event. While a stream-wait probe is open and at least one
    /// of those events still pending, the waits are bracketed by a pair of timing events recorded
    /// on `stream` (resolved by `resolve_waits`); otherwise nothing extra is recorded.
    pub(super) fn wait_for_slots(&self, slots: &[usize], stream: StreamHandle) -> Result<()> {
        let dev = &self.device;
        let readies: Vec<EventHandle> = slots.iter().map(|&s| self.events[s].lock().ready).collect();
        let mut pair = None;
        if self.wait_probes.load(Ordering::Relaxed) > 0 {
            let mut in_flight = false;
            for &e in &readies {
                if !dev.event_done(e)? {
                    in_flight = true;
                    break;
                }
            }
            if in_flight {
                pair = Some(self.take_wait_pair()?);
            }
        }
        let issued = (|| -> Result<()> {
            if let Some((start, _)) = pair {
                dev.record_event(start, stream)?;
            }
            for &e in &readies {
                dev.stream_wait_event(stream, e)?;
            }
            if let Some((_, end)) = pair {
                dev.record_event(end, stream)?;
            }
            Ok(())
        })();
        if let Some(p) = pair {
            let mut w = self.wait_timer.lock();
            if issued.is_ok() {
                w.pending.push_back(p);
                w.waits += 1;
            } else {
                w.spare.push(p);
            }
        }
        issued
    }
}

impl SlotCache {
    /// Pin `experts` of `layer` in slots; see the module docs.
    pub fn acquire(&self, layer: i64, experts: &[i64], stream: StreamHandle) -> Result<Vec<usize>> {
        let _g = self.open_guard()?;
        let keys = self.keys(layer, experts)?;
        let mut distinct = keys.clone();
        dedup_in_order(&mut distinct);
        let sh = &*self.shared;
        let t_start = Instant::now();
        // A huge timeout means "wait as long as it takes": clamp instead of overflowing Instant.
        let deadline = t_start
            .checked_add(sh.acquire_timeout)
            .unwrap_or_else(|| t_start + Duration::from_secs(100 * 365 * 86_400));
        loop {
            let plan = {
                let mut t = sh.table.lock();
                loop {
                    match t.try_acquire(&distinct)? {
                        AcquireOutcome::Planned(p) => break p,
                        AcquireOutcome::NoRoom { needed, evictable } => {
                            if self.is_closed() {
                                return Err(closed_err());
                            }
                            if sh.changed.wait_until(&mut t, deadline).timed_out() {
                                return Err(Error::Budget(format!(
                                    "acquire waited {:.1} s for {needed} evictable slot(s) but only {evictable} \
                                     became available: the other slots stay pinned or loading; release slots \
                                     or use more slots",
                                    sh.acquire_timeout.as_secs_f64()
                                )));
                            }
                        }
                    }
                }
            };
            Stats::add(&sh.stats.evictions, plan.evictions);
            Stats::add(&sh.stats.prefetch_wasted, plan.prefetch_wasted);
            Stats::add(&sh.stats.acquire_transient, plan.transient);
            // Demand loads of the misses.
            let mut finished = Vec::with_capacity(plan.loads.len());
            let mut load_err = None;
            for &(slot, key) in &plan.loads {
                let r = if load_err.is_none() { sh.load_into(slot, key, sh.demand_stream) } else { Err(closed_err()) };
                if let Err(e) = r {
                    load_err.get_or_insert(e);
                    finished.push((slot, false));
                } else {
                    finished.push((slot, true));
                }
            }
            if !finished.is_empty() {
                sh.finish(&finished);
            }
            let unpin_all = |sh: &Shared| {
                let mut t = sh.table.lock();
                for &s in &plan.slots {
                    t.unpin(s);
                }
                drop(t);
                sh.changed.notify_all();
            };
            if let Some(e) = load_err {
                Stats::add(&sh.stats.load_errors, 1);
                unpin_all(sh);
                return Err(e);
            }
            // Slots another thread is still issuing.
            let mut retry = false;
            if !plan.waits.is_empty() {
                let mut t = sh.table.lock();
                'waits: for &(slot, seq) in &plan.waits {
                    loop {
                        match t.wait_status(slot, seq) {
                            WaitStatus::Ready => break,
                            WaitStatus::Failed => {
                                retry = true;
                                break 'waits;
                            }
                            WaitStatus::StillLoading => {
                                if sh.changed.wait_until(&mut t, deadline).timed_out() {
                                    drop(t);
                                    unpin_all(sh);
                                    return Err(Error::SlotState(format!(
                                        "slot {slot} stayed loading for {:.1} s",
                                        sh.acquire_timeout.as_secs_f64()
                                    )));
                                }
                            }
                        }
                    }
                }
            }
            if retry {
                unpin_all(sh);
                continue;
            }
            if let Err(e) = sh.wait_for_slots(&plan.slots, stream) {
                unpin_all(sh);
                return Err(e);
            }
            let s = &sh.stats;
            Stats::add(&s.acquires, 1);
            Stats::add(&s.hits, plan.hits);
            Stats::add(&s.misses, plan.misses);
            Stats::add(&s.demand_loads, plan.loads.len() as u64);
            Stats::add(&s.prefetch_used, plan.prefetch_used);
            let stall = if plan.loads.is_empty() && plan.waits.is_empty() { 0 } else { t_start.elapsed().as_nanos() };
            Stats::add(&s.host_stall_ns, stall as u64);
            let out: Vec<usize> =
                keys.iter().map(|k| plan.slots[distinct.iter().position(|d| d == k).unwrap_or(0)]).collect();
            if out.len() > plan.slots.len() {
                // One pin per returned entry, so that one release per entry balances it.
                let mut t = sh.table.lock();
                let mut seen = vec![false; self.num_slots];
                for &s in &out {
                    if std::mem::replace(&mut seen[s], true) {
                        t.pin_again(s);
                    }
                }
            }
            return Ok(out);
        }
    }

    /// Unpin `slots` (one entry per acquired entry); readers on `stream` finish before reuse.
    pub fn release(&self, slots: &[i64], stream: StreamHandle) -> Result<()> {
        let _g = self.open_guard()?;
        let sh = &*self.shared;
        let mut idx = Vec::with_capacity(slots.len());
        for &s in slots {
            if s < 0 || s as usize >= self.num_slots {
                return Err(Error::InvalidArgument(format!(
                    "slot {s} is out of range; the cache has {} slots (0..{})",
                    self.num_slots, self.num_slots
                )));
            }
            idx.push(s as usize);
        }
        {
            // Validate before recording anything, so a bad release leaves no trace.
            let t = sh.table.lock();
            let mut check = idx.clone();
            check.sort_unstable();
            for w in check.chunk_by(|a, b| a == b) {
                let pins = t.slot(w[0]).refcount as usize;
                if pins < w.len() {
                    return Err(Error::SlotState(format!(
                        "release of slot {} {} time(s) but it is pinned {pins} time(s) (double release, or a \
                         slot that was not acquired); nothing was released",
                        w[0],
                        w.len()
                    )));
                }
            }
        }
        if sh.device.kind() == DeviceKind::Cuda {
            let mut distinct = idx.clone();
            distinct.sort_unstable();
            distinct.dedup();
            for slot in distinct {
                let mut ev = sh.events[slot].lock();
                let e = match ev.done_reading.iter().find(|(s, _)| *s == stream) {
                    Some(&(_, e)) => e,
                    None => {
                        let e = sh.take_event()?;
                        ev.done_reading.push((stream, e));
                        e
                    }
                };
                sh.device.record_event(e, stream)?;
            }
        }
        sh.table.lock().release(&idx)?;
        Stats::add(&sh.stats.releases, 1);
        sh.changed.notify_all();
        Ok(())
    }
}
