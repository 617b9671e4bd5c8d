//! Device-side timing of a slot cache's copies and of the caller streams' waits on them (CUDA).
//!
//! Copies: each copy is bracketed by two timing events on its stream, resolved lazily when stats
//! are read (`copy_seconds` and the bytes they moved).
//!
//! Stream waits (opt-in: while a stream-wait probe is open, `add_stream_wait_probe`): when an acquire finds a slot whose ready
//! event has not completed yet (its copy is still in flight), it brackets its waits with two
//! timing events on the caller's stream; `stream_wait_seconds` sums the device time between them,
//! i.e. the time the caller's stream spent blocked on copies. Acquires whose copies have all
//! landed record nothing: their wait is zero.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use super::{closed_err, Shared, SlotCache};
use crate::device::{EventHandle, EventKind};
use crate::error::Result;

/// Device-side timing of copies (CUDA), resolved lazily when stats are read.
#[derive(Default)]
pub(super) struct CopyTimer {
    pub(super) pending: VecDeque<(EventHandle, EventHandle, u64)>,
    pub(super) spare: Vec<(EventHandle, EventHandle)>,
    pub(super) seconds: f64,
    pub(super) bytes: u64,
}

pub(super) const MAX_PENDING_TIMINGS: usize = 4096;

/// Device-side timing of the caller streams' waits on slot-ready events (while a probe is open).
#[derive(Default)]
pub(super) struct WaitTimer {
    /// (start, end) timing events recorded around one acquire's waits, not yet resolved.
    pub(super) pending: VecDeque<(EventHandle, EventHandle)>,
    /// Resolved (or discarded) pairs, reused before new events are created.
    pub(super) spare: Vec<(EventHandle, EventHandle)>,
    /// Resolved wait time since the last `reset_stats`.
    pub(super) seconds: f64,
    /// Acquires since the last `reset_stats` that found a copy still in flight and were timed.
    pub(super) waits: u64,
}

/// Completed pairs are folded in (without blocking) once this many are pending ...
pub(super) const RESOLVE_WAITS_AT: usize = 64;
/// ... and an acquire blocks on the oldest pair when this many are still pending.
pub(super) const MAX_PENDING_WAITS: usize = 4096;

impl Shared {
    /// A pair of timing events for one copy (CUDA only; None when too many are unresolved).
    pub(super) fn timing_pair(&self) -> Result<Option<(EventHandle, EventHandle)>> {
        if self.device.copies_are_synchronous() {
            return Ok(None);
        }
        let mut t = self.timer.lock();
        if t.pending.len() >= MAX_PENDING_TIMINGS {
            self.resolve_timings(&mut t);
            if t.pending.len() >= MAX_PENDING_TIMINGS {
                return Ok(None);
            }
        }
        if let Some(p) = t.spare.pop() {
            return Ok(Some(p));
        }
        drop(t);
        Ok(Some((self.device.create_event(EventKind::Timing)?, self.device.create_event(EventKind::Timing)?)))
    }

    pub(super) fn resolve_timings(&self, t: &mut CopyTimer) {
        while let Some(&(a, b, bytes)) = t.pending.front() {
            match self.device.elapsed_ms(a, b) {
                Ok(Some(ms)) => {
                    t.seconds += ms as f64 * 1e-3;
                    t.bytes += bytes;
                }
                Ok(None) => break,
                Err(_) => {}
            }
            t.pending.pop_front();
            t.spare.push((a, b));
        }
    }

    /// A pair of timing events for one acquire's waits: a spare one, or two new ones.
    pub(super) fn take_wait_pair(&self) -> Result<(EventHandle, EventHandle)> {
        let mut w = self.wait_timer.lock();
        if w.pending.len() >= RESOLVE_WAITS_AT {
            self.resolve_waits(&mut w, 0)?;
            if w.pending.len() >= MAX_PENDING_WAITS {
                self.resolve_waits(&mut w, 1)?;
            }
        }
        if let Some(p) = w.spare.pop() {
            return Ok(p);
        }
        drop(w);
        let start = self.device.create_event(EventKind::Timing)?;
        match self.device.create_event(EventKind::Timing) {
            Ok(end) => Ok((start, end)),
            Err(e) => {
                self.device.destroy_event(start);
                Err(e)
            }
        }
    }

    /// Fold completed wait timings into `w.seconds`, oldest first, moving their events to the
    /// spare list. The first `block` pairs are waited for (event synchronize); after those it
    /// stops at the first pair still pending. A pair whose query fails is discarded (its events
    /// go to the spare list) and the error returned.
    pub(super) fn resolve_waits(&self, w: &mut WaitTimer, block: usize) -> Result<()> {
        let mut waited = 0;
        while let Some(&(start, end)) = w.pending.front() {
            let r = if waited < block {
                waited += 1;
                self.device.event_synchronize(end).and_then(|()| self.device.elapsed_ms(start, end))
            } else {
                self.device.elapsed_ms(start, end)
            };
            match r {
                Ok(Some(ms)) => w.seconds += ms as f64 * 1e-3,
                Ok(None) => break,
                Err(e) => {
                    w.pending.pop_front();
                    w.spare.push((start, end));
                    return Err(e);
                }
            }
            w.pending.pop_front();
            w.spare.push((start, end));
        }
        Ok(())
    }

    /// (device seconds, bytes) of the copies timed so far, or None where copies are synchronous.
    pub(super) fn copy_timings(&self) -> Option<(f64, f64)> {
        if self.device.copies_are_synchronous() {
            return None;
        }
        // Event queries need the context current in this thread, as every driver call here.
        let _ = self.device.bind_thread();
        let mut t = self.timer.lock();
        self.resolve_timings(&mut t);
        Some((t.seconds, t.bytes as f64))
    }

    /// Zero both timings; pending wait timings are dropped unresolved (re-recording a pending
    /// event is allowed: a query then sees only the latest record, so their events are reused).
    pub(super) fn reset_timings(&self) {
        let mut t = self.timer.lock();
        self.resolve_timings(&mut t);
        t.seconds = 0.0;
        t.bytes = 0;
        drop(t);
        let mut w = self.wait_timer.lock();
        let WaitTimer { pending, spare, seconds, waits } = &mut *w;
        spare.extend(pending.drain(..));
        *seconds = 0.0;
        *waits = 0;
    }

    /// At close: destroy every timing event, resolving pending wait timings first so that
    /// `stream_wait_seconds` after close is complete.
    pub(super) fn destroy_timing_events(&self) {
        let dev = &self.device;
        {
            let mut t = self.timer.lock();
            for (a, b, _) in t.pending.drain(..) {
                dev.destroy_event(a);
                dev.destroy_event(b);
            }
            for (a, b) in t.spare.drain(..) {
                dev.destroy_event(a);
                dev.destroy_event(b);
            }
        }
        let mut w = self.wait_timer.lock();
        let _ = self.resolve_waits(&mut w, usize::MAX);
        let WaitTimer { pending, spare, .. } = &mut *w;
        for (a, b) in pending.drain(..).chain(spare.drain(..)) {
            dev.destroy_event(a);
            dev.destroy_event(b);
        }
    }
}

impl SlotCache {
    /// A stream-wait probe opens: the caller streams' waits on slot-ready events are timed while
    /// any probe is open (see the module docs).
    pub fn add_stream_wait_probe(&self) -> Result<()> {
        let _g = self.gate.read();
        if self.is_closed() {
            return Err(closed_err());
        }
        self.shared.wait_probes.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// A probe closes; the last one stops the timing, which keeps what was measured.
    pub fn remove_stream_wait_probe(&self) {
        let _ = self.shared.wait_probes.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    pub fn measure_stream_waits(&self) -> bool {
        self.shared.wait_probes.load(Ordering::Acquire) > 0
    }

    /// Seconds the caller streams spent waiting on slot-ready events since the last
    /// `reset_stats` (device time between the timing events of each timed acquire). Waits for
    /// the pending timing events to complete. After `close`: the total resolved at close.
    pub fn stream_wait_seconds(&self) -> Result<f64> {
        let _g = self.gate.read();
        let sh = &*self.shared;
        let mut w = sh.wait_timer.lock();
        if !w.pending.is_empty() && !self.is_closed() {
            sh.device.bind_thread()?;
            sh.resolve_waits(&mut w, usize::MAX)?;
        }
        Ok(w.seconds)
    }
}
