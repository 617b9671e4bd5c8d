//! The decode path's side of a slot cache: its expert table (attach, the reader stream, host
//! reads) and the routed visits of layers that computed through it.

use super::SlotCache;
use crate::cache::dedup_in_order;
use crate::device::StreamHandle;
use crate::error::{Error, Result};
use crate::expert_table::ExpertTable;
use crate::prefetch::{Request, ROUTED_MISS};
use crate::stats::Stats;

impl SlotCache {
    /// Attach the expert table at `addr` (one u64 per pool key, pool key order; see
    /// `expert_table.rs`), before any slot is filled. Decode steps read it on `reader_stream`.
    ///
    /// # Safety
    /// As `ExpertTable::attach`: the memory stays valid and written by no one else until close.
    pub unsafe fn attach_expert_table(&self, addr: u64, reader_stream: StreamHandle) -> Result<()> {
        let _g = self.open_guard()?;
        let sh = &*self.shared;
        if sh.experts.get().is_some() {
            return Err(Error::InvalidArgument("this cache already has an expert table".into()));
        }
        if !sh.table.lock().resident().is_empty() {
            return Err(Error::SlotState("attach the expert table before any slot is filled".into()));
        }
        // SAFETY: forwarded from the caller.
        let table = unsafe { ExpertTable::attach(&sh.pool, addr, reader_stream)? };
        sh.experts.set(table).map_err(|_| Error::InvalidArgument("this cache already has an expert table".into()))
    }

    fn expert_table(&self) -> Result<&ExpertTable> {
        self.shared.experts.get().ok_or_else(|| Error::InvalidArgument("this cache has no expert table (attach_expert_table)".into()))
    }

    /// The stream table reads are queued on (see `switch_reader_stream`).
    pub fn reader_stream(&self) -> Result<StreamHandle> {
        Ok(self.expert_table()?.reader_stream())
    }

    /// Table reads are queued on `stream` from now on (see `ExpertTable::switch_reader_stream`);
    /// returns whether it was another stream.
    pub fn switch_reader_stream(&self, stream: StreamHandle) -> Result<bool> {
        let _g = self.open_guard()?;
        let sh = &*self.shared;
        let table = self.expert_table()?;
        if table.reader_stream() == stream {
            return Ok(false);
        }
        let event = sh.take_event()?;
        let switched = table.switch_reader_stream(&sh.pool, stream, event);
        sh.spare_events.lock().push(event); // the wait already holds the record it needs
        switched
    }

    /// Host backend: bracket a decode layer's reads through the table (see `expert_table.rs`).
    pub fn begin_table_read(&self) -> Result<u64> {
        let _g = self.open_guard()?;
        Ok(self.expert_table()?.begin_read())
    }

    pub fn end_table_read(&self, ticket: u64) -> Result<()> {
        self.expert_table()?.end_read(ticket)
    }

    pub fn expert_table_reads_in_progress(&self) -> usize {
        self.shared.experts.get().map_or(0, ExpertTable::reads_in_progress)
    }

    /// A layer computed `experts` (distinct) through the expert table (a decode step): count hits
    /// and misses, tell the policy, and queue demand loads of the misses it admits
    /// (`SlotTable::admit`) so that later steps hit. `slot_reads`: how many of them the step read from a slot (known from the
    /// table entries it read); None counts the resident ones, which overstates hits whose copy
    /// had not landed when the layer ran. Loads queued here are never cancelled by a newer
    /// forward. Returns how many were queued.
    pub fn note_routed(&self, layer: i64, experts: &[i64], slot_reads: Option<u64>) -> Result<usize> {
        let _g = self.open_guard()?;
        let mut keys = self.keys(layer, experts)?;
        dedup_in_order(&mut keys);
        let sh = &*self.shared;
        let touch = sh.table.lock().touch(&keys);
        let s = &sh.stats;
        Stats::add(&s.routed_declined, (touch.missing.len() - touch.admitted.len()) as u64);
        let hits = slot_reads.map_or(touch.hits, |n| n.min(keys.len() as u64));
        let misses = keys.len() as u64 - hits;
        Stats::add(&s.hits, hits);
        Stats::add(&s.misses, misses);
        Stats::add(&s.routed_misses, misses);
        Stats::add(&s.prefetch_used, touch.prefetch_used);
        Stats::add(&s.routed_visits, 1);
        let mut queued = 0;
        for key in touch.admitted {
            if sh.queue.push(Request { key, generation: ROUTED_MISS, demand: true }) {
                queued += 1;
            } else {
                Stats::add(&s.routed_dropped, 1);
                Stats::add(&s.prefetch_queue_full, 1);
            }
        }
        if queued > 0 {
            sh.queue.wake_workers();
        }
        Ok(queued)
    }
}
