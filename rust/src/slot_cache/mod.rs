//! `SlotCache`: the slot table + a device + the prefetch queue and its copy workers.
//!
//! One job per file: options (`config`), slot loading and the copy workers (`loading`), the
//! acquire path's pinning (`pinning`), the decode path's expert table and routed visits
//! (`decode_table`), device-side timing of copies and stream waits (`copy_timing`); here the
//! cache's state, construction, queries and close.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::cache::{SlotState, SlotTable};
use crate::device::{DeviceKind, EventHandle, EventKind, SharedDevice, StreamHandle};
use crate::error::{try_vec, Error, Result};
use crate::expert_table::ExpertTable;
use crate::policy::{Key, PolicyKind};
use crate::pool::ExpertPool;
use crate::prefetch::{serve, Handler, PrefetchQueue, Workers};
use crate::stats::Stats;

mod config;
mod copy_timing;
mod decode_table;
mod loading;
mod pinning;
#[cfg(test)]
mod tests;

pub use config::{CacheConfig, MAX_COPY_WORKERS};
use copy_timing::{CopyTimer, WaitTimer};
use loading::SlotEvents;

struct Shared {
    device: SharedDevice,
    pool: Arc<ExpertPool>,
    table: Mutex<SlotTable>,
    /// Signalled when a slot becomes ready, is released, or a load fails.
    changed: Condvar,
    events: Vec<Mutex<SlotEvents>>,
    spare_events: Mutex<Vec<EventHandle>>,
    slots_addr: u64,
    slot_nbytes: usize,
    queue: Arc<PrefetchQueue>,
    demand_stream: StreamHandle,
    /// Held while one copy and its timing events are enqueued, so that threads sharing a stream
    /// never interleave inside another copy's timing window (which would overstate its time).
    demand_issue: Mutex<()>,
    prefetch_issue: Mutex<()>,
    /// One normal-priority stream shared by all copy workers: copies share the PCIe link
    /// anyway, and one FIFO of copies keeps the DMA engine streaming; several workers only
    /// parallelise the host-side issuing.
    prefetch_stream: StreamHandle,
    timer: Mutex<CopyTimer>,
    /// Open stream-wait probes: the caller streams' waits on slot-ready events are timed while > 0.
    wait_probes: AtomicUsize,
    wait_timer: Mutex<WaitTimer>,
    stats: Stats,
    closed: AtomicBool,
    acquire_timeout: Duration,
    /// Where each expert is now, for the decode kernels (attached once, see `expert_table.rs`).
    experts: OnceLock<ExpertTable>,
}

pub struct SlotCache {
    shared: Arc<Shared>,
    workers: Mutex<Option<Workers>>,
    /// Operations hold it shared; close takes it exclusively, so memory is never freed under a call.
    gate: RwLock<()>,
    owns_slots: bool,
    num_slots: usize,
    policy: PolicyKind,
}

fn closed_err() -> Error {
    Error::Closed("the SlotCache is closed".into())
}

impl SlotCache {
    pub fn new(pool: Arc<ExpertPool>, cfg: CacheConfig) -> Result<Self> {
        cfg.check(&pool)?;
        let table = SlotTable::new(cfg.num_slots, cfg.policy)?;
        let queue = Arc::new(PrefetchQueue::new(cfg.queue_capacity)?);
        let device = pool.device().clone();
        device.bind_thread()?;
        let slot_nbytes = pool.record_nbytes();
        let total = cfg
            .num_slots
            .checked_mul(slot_nbytes)
            .ok_or_else(|| Error::Budget(format!("{} slots of {slot_nbytes} bytes overflow", cfg.num_slots)))?;
        if let Some(addr) = cfg.slots_addr {
            if addr == 0 || addr % 16 != 0 {
                return Err(Error::InvalidArgument(format!(
                    "slots_ptr must be a non-null 16-byte aligned address, got {addr:#x}"
                )));
            }
        }
        pool.add_user()?;
        // From here on, every early return must undo what was created: collect it in `undo`.
        let mut created_events = Vec::new();
        let mut created_streams = Vec::new();
        let mut owned: Option<u64> = None;
        let result = (|| -> Result<Arc<Shared>> {
            let slots_addr = match cfg.slots_addr {
                Some(a) => a,
                None => {
                    let a = device.alloc_slots(total)?;
                    owned = Some(a);
                    a
                }
            };
            let mut events = try_vec(cfg.num_slots, "the slot events")?;
            for _ in 0..cfg.num_slots {
                let e = device.create_event(EventKind::Plain)?;
                created_events.push(e);
                events.push(Mutex::new(SlotEvents { ready: e, published: None, unpublished: None, done_reading: Vec::new() }));
            }
            let demand_stream = device.create_stream(true)?;
            created_streams.push(demand_stream);
            let prefetch_stream = device.create_stream(false)?;
            created_streams.push(prefetch_stream);
            Ok(Arc::new(Shared {
                device: device.clone(),
                pool: pool.clone(),
                table: Mutex::new(table),
                changed: Condvar::new(),
                events,
                spare_events: Mutex::new(Vec::new()),
                slots_addr,
                slot_nbytes,
                queue,
                demand_stream,
                demand_issue: Mutex::new(()),
                prefetch_stream,
                prefetch_issue: Mutex::new(()),
                timer: Mutex::new(CopyTimer::default()),
                wait_probes: AtomicUsize::new(0),
                wait_timer: Mutex::new(WaitTimer::default()),
                stats: Stats::default(),
                closed: AtomicBool::new(false),
                acquire_timeout: cfg.acquire_timeout,
                experts: OnceLock::new(),
            }))
        })();
        let shared = match result {
            Ok(s) => s,
            Err(e) => {
                for ev in created_events {
                    device.destroy_event(ev);
                }
                for s in created_streams {
                    device.destroy_stream(s);
                }
                if let Some(a) = owned {
                    device.free_slots(a, total);
                }
                pool.remove_user();
                return Err(e);
            }
        };
        let mut cache = Self {
            shared: shared.clone(),
            workers: Mutex::new(None),
            gate: RwLock::new(()),
            owns_slots: cfg.slots_addr.is_none(),
            num_slots: cfg.num_slots,
            policy: cfg.policy,
        };
        if cfg.copy_workers > 0 {
            let sh = shared.clone();
            let dev = device.clone();
            let workers = Workers::spawn_indexed(
                cfg.copy_workers,
                shared.queue.clone(),
                Arc::new(move |_worker| {
                    let sh = sh.clone();
                    let stream = sh.prefetch_stream;
                    Arc::new(move |r| sh.serve_request(r, stream)) as Handler
                }),
                Arc::new(move || {
                    let _ = dev.bind_thread();
                }),
            );
            match workers {
                Ok(w) => *cache.workers.get_mut() = Some(w),
                Err(e) => {
                    cache.close_inner();
                    return Err(Error::SlotState(format!("cannot start the copy workers: {e}")));
                }
            }
        }
        Ok(cache)
    }

    pub fn num_slots(&self) -> usize {
        self.num_slots
    }
    pub fn slot_nbytes(&self) -> usize {
        self.shared.slot_nbytes
    }
    pub fn slots_addr(&self) -> u64 {
        self.shared.slots_addr
    }
    /// Whether `addr` lies in the slot memory (an expert-table entry pointing at a slot).
    pub fn is_slot_address(&self, addr: u64) -> bool {
        let sh = &*self.shared;
        addr >= sh.slots_addr && addr < sh.slots_addr + (self.num_slots * sh.slot_nbytes) as u64
    }
    pub fn policy(&self) -> PolicyKind {
        self.policy
    }
    pub fn device(&self) -> &SharedDevice {
        &self.shared.device
    }
    /// Acquire calls made so far (monotonic; `reset_stats` does not touch it).
    pub fn acquire_count(&self) -> u64 {
        self.shared.table.lock().acquires()
    }
    pub fn device_kind(&self) -> DeviceKind {
        self.shared.device.kind()
    }
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }
    pub fn pool(&self) -> &Arc<ExpertPool> {
        &self.shared.pool
    }

    fn open_guard(&self) -> Result<parking_lot::RwLockReadGuard<'_, ()>> {
        let g = self.gate.read();
        if self.is_closed() {
            return Err(closed_err());
        }
        self.shared.device.bind_thread()?;
        Ok(g)
    }

    fn keys(&self, layer: i64, experts: &[i64]) -> Result<Vec<Key>> {
        experts.iter().map(|&e| self.shared.pool.key_from(layer, e)).collect()
    }

    pub fn cancel_before(&self, generation: i64) -> Result<()> {
        let _g = self.open_guard()?;
        if generation < 0 {
            return Err(Error::InvalidArgument(format!("generation must be >= 0, got {generation}")));
        }
        self.shared.queue.cancel_before(generation as u64);
        Ok(())
    }

    pub fn set_future(&self, visits: &[(i64, Vec<i64>)], offset: i64) -> Result<()> {
        let _g = self.open_guard()?;
        if offset < 0 {
            return Err(Error::InvalidArgument(format!("offset must be >= 0, got {offset}")));
        }
        let mut v = Vec::with_capacity(visits.len());
        for (layer, experts) in visits {
            v.push(self.keys(*layer, experts)?);
        }
        self.shared.table.lock().set_future(offset as u64, &v);
        Ok(())
    }

    pub fn resident(&self) -> Result<Vec<(Key, usize)>> {
        let _g = self.open_guard()?;
        Ok(self.shared.table.lock().resident())
    }

    pub fn lookup(&self, layer: i64, expert: i64) -> Result<Option<usize>> {
        let _g = self.open_guard()?;
        if layer < 0 || expert < 0 {
            return Ok(None);
        }
        Ok(self.shared.table.lock().lookup((layer as u64, expert as u64)))
    }

    pub fn slot_states(&self) -> Result<Vec<(SlotState, u32, Option<Key>)>> {
        let _g = self.open_guard()?;
        Ok(self.shared.table.lock().slots().iter().map(|s| (s.state, s.refcount, s.key)).collect())
    }

    /// Copy of `slot`'s bytes, after its copy has landed.
    pub fn read_slot(&self, slot: i64) -> Result<Vec<u8>> {
        let _g = self.open_guard()?;
        if slot < 0 || slot as usize >= self.num_slots {
            return Err(Error::InvalidArgument(format!(
                "slot {slot} is out of range; the cache has {} slots (0..{})",
                self.num_slots, self.num_slots
            )));
        }
        let slot = slot as usize;
        let sh = &*self.shared;
        let mut t = sh.table.lock();
        while t.slot(slot).state == SlotState::Loading {
            sh.changed.wait_for(&mut t, Duration::from_millis(10));
        }
        // Holding the table lock keeps the slot from being reserved for another load meanwhile.
        let ready = sh.events[slot].lock().ready;
        sh.device.event_synchronize(ready)?;
        let mut out = vec![0u8; sh.slot_nbytes];
        // SAFETY: the slot range lies inside the slot memory; `out` has the room.
        unsafe { sh.device.copy_from_slot(out.as_mut_ptr() as usize, sh.slot_addr(slot), sh.slot_nbytes)? };
        drop(t);
        Ok(out)
    }

    /// Serve every queued request (helping the workers from this thread), then wait for copies.
    pub fn synchronize(&self) -> Result<()> {
        let _g = self.open_guard()?;
        let sh = &self.shared;
        let handler: Handler = {
            let sh = sh.clone();
            Arc::new(move |r| sh.serve_request(r, sh.prefetch_stream))
        };
        while let Some(r) = sh.queue.pop() {
            serve(&sh.queue, &handler, r);
        }
        sh.queue.wait_idle();
        sh.device.stream_synchronize(sh.demand_stream)?;
        sh.device.stream_synchronize(sh.prefetch_stream)?;
        Ok(())
    }

    pub fn stats(&self) -> Vec<(&'static str, f64)> {
        let sh = &self.shared;
        let mut v = sh.stats.snapshot(sh.copy_timings());
        v.push(("stream_waits", sh.wait_timer.lock().waits as f64));
        v.push(("queue_len", sh.queue.len() as f64));
        v.push(("num_slots", self.num_slots as f64));
        v
    }

    pub fn reset_stats(&self) {
        let sh = &self.shared;
        let _ = sh.device.bind_thread();
        sh.stats.reset();
        sh.reset_timings();
    }

    /// Join the workers, wait for copies, free owned slot memory. Idempotent.
    pub fn close(&self) {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // Wake acquirers waiting for room so they see `closed` and drop their gate guards.
        self.shared.changed.notify_all();
        let _g = self.gate.write();
        self.teardown();
    }

    fn close_inner(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.teardown();
    }

    fn teardown(&self) {
        let sh = &self.shared;
        if let Some(mut w) = self.workers.lock().take() {
            w.shutdown();
        }
        let _ = sh.device.bind_thread();
        while sh.queue.pop().is_some() {
            Stats::add(&sh.stats.prefetch_cancelled, 1);
            sh.queue.done();
        }
        let dev = &sh.device;
        let _ = dev.stream_synchronize(sh.demand_stream);
        let _ = dev.stream_synchronize(sh.prefetch_stream);
        for ev in &sh.events {
            let ev = ev.lock();
            dev.destroy_event(ev.ready);
            if let Some(f) = ev.unpublished {
                dev.destroy_event(f);
            }
            for &(_, e) in &ev.done_reading {
                dev.destroy_event(e);
            }
        }
        for e in sh.spare_events.lock().drain(..) {
            dev.destroy_event(e);
        }
        sh.destroy_timing_events();
        dev.destroy_stream(sh.demand_stream);
        dev.destroy_stream(sh.prefetch_stream);
        if self.owns_slots {
            dev.free_slots(sh.slots_addr, self.num_slots * sh.slot_nbytes);
        }
        sh.pool.remove_user();
    }
}

impl Drop for SlotCache {
    fn drop(&mut self) {
        self.close();
    }
}
