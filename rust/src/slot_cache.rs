//! `SlotCache`: the slot table + a device + the prefetch queue and its copy workers.
//!
//! acquire: pin hits and reserve victims for misses all-or-nothing (when other threads pin too
//! many slots: pin nothing, wait for a release, retry), copy the misses on the high-priority
//! demand stream, wait on the host only for slots another thread is still issuing, then make the
//! caller's stream wait on each slot's ready event. release: record a done-reading event on the
//! caller's stream, which the next copy into that slot waits for.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::cache::{dedup_in_order, AcquireOutcome, PrefetchOutcome, SlotState, SlotTable, WaitStatus};
use crate::device::{DeviceKind, EventHandle, SharedDevice, StreamHandle};
use crate::error::{Error, Result};
use crate::policy::{Key, PolicyKind};
use crate::pool::ExpertPool;
use crate::prefetch::{serve, Handler, PrefetchQueue, Request, Workers};
use crate::stats::Stats;

pub struct CacheConfig {
    pub num_slots: usize,
    pub policy: PolicyKind,
    /// Caller-owned slot memory (device memory on CUDA, host memory on the host backend).
    pub slots_addr: Option<u64>,
    pub copy_workers: usize,
    pub queue_capacity: usize,
    /// How long acquire waits for slots pinned by others before giving up.
    pub acquire_timeout: Duration,
}

/// Per-slot events. Touched by the thread loading the slot and by threads releasing it.
struct SlotEvents {
    ready: EventHandle,
    /// One done-reading event per stream that released the slot (same-stream re-records supersede).
    done_reading: Vec<(StreamHandle, EventHandle)>,
}

/// Device-side timing of copies (CUDA), resolved lazily when stats are read.
#[derive(Default)]
struct CopyTimer {
    pending: VecDeque<(EventHandle, EventHandle, u64)>,
    spare: Vec<(EventHandle, EventHandle)>,
    seconds: f64,
    bytes: u64,
}

const MAX_PENDING_TIMINGS: usize = 4096;

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
    /// parallelise the host-side issuing. (NOTES.md: stream per worker vs shared, H100.)
    prefetch_stream: StreamHandle,
    timer: Mutex<CopyTimer>,
    stats: Stats,
    closed: AtomicBool,
    acquire_timeout: Duration,
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

impl Shared {
    fn slot_addr(&self, slot: usize) -> u64 {
        self.slots_addr + (slot * self.slot_nbytes) as u64
    }

    /// Issue the copy of `key`'s record into `slot` on `stream` and record its ready event.
    fn load_into(&self, slot: usize, key: Key, stream: StreamHandle) -> Result<()> {
        let src = self.pool.record_addr(key)?;
        let n = self.slot_nbytes;
        let dev = &self.device;
        let t0 = Instant::now();
        {
            let ev = self.events[slot].lock();
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
            dev.record_event(ev.ready, stream)?;
        }
        Stats::add(&self.stats.bytes_copied, n as u64);
        if dev.copies_are_synchronous() {
            Stats::add(&self.stats.copy_ns, t0.elapsed().as_nanos() as u64);
        }
        Ok(())
    }

    /// A pair of timing events for one copy (CUDA only; None when too many are unresolved).
    fn timing_pair(&self) -> Result<Option<(EventHandle, EventHandle)>> {
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
        Ok(Some((self.device.create_event(true)?, self.device.create_event(true)?)))
    }

    fn resolve_timings(&self, t: &mut CopyTimer) {
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

    fn finish(&self, slots: &[(usize, bool)]) {
        let mut t = self.table.lock();
        for &(slot, ok) in slots {
            t.finish_load(slot, ok);
        }
        drop(t);
        self.changed.notify_all();
    }

    /// A worker (or `synchronize`) serves one queued request.
    fn serve_request(&self, req: Request, stream: StreamHandle) {
        let s = &self.stats;
        if self.closed.load(Ordering::Acquire) || self.queue.is_cancelled(&req) {
            Stats::add(&s.prefetch_cancelled, 1);
            return;
        }
        let outcome = self.table.lock().reserve_prefetch(req.key, req.demand);
        match outcome {
            PrefetchOutcome::AlreadyResident => Stats::add(&s.prefetch_redundant, 1),
            PrefetchOutcome::NoRoom => Stats::add(&s.prefetch_dropped, 1),
            PrefetchOutcome::Reserved { slot, evicted, wasted } => {
                Stats::add(&s.evictions, evicted.is_some() as u64);
                Stats::add(&s.prefetch_wasted, wasted as u64);
                let ok = self.load_into(slot, req.key, stream).is_ok();
                self.finish(&[(slot, ok)]);
                Stats::add(if ok { &s.prefetch_issued } else { &s.load_errors }, 1);
            }
        }
    }

    fn take_event(&self) -> Result<EventHandle> {
        match self.spare_events.lock().pop() {
            Some(e) => Ok(e),
            None => self.device.create_event(false),
        }
    }
}

impl SlotCache {
    pub fn new(pool: Arc<ExpertPool>, cfg: CacheConfig) -> Result<Self> {
        let table = SlotTable::new(cfg.num_slots, cfg.policy)?;
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
            let mut events = Vec::with_capacity(cfg.num_slots);
            for _ in 0..cfg.num_slots {
                let e = device.create_event(false)?;
                created_events.push(e);
                events.push(Mutex::new(SlotEvents { ready: e, done_reading: Vec::new() }));
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
                queue: Arc::new(PrefetchQueue::new(cfg.queue_capacity)),
                demand_stream,
                demand_issue: Mutex::new(()),
                prefetch_stream,
                prefetch_issue: Mutex::new(()),
                timer: Mutex::new(CopyTimer::default()),
                stats: Stats::default(),
                closed: AtomicBool::new(false),
                acquire_timeout: cfg.acquire_timeout,
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
    pub fn policy(&self) -> PolicyKind {
        self.policy
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
            for &slot in &plan.slots {
                let ready = sh.events[slot].lock().ready;
                if let Err(e) = sh.device.stream_wait_event(stream, ready) {
                    unpin_all(sh);
                    return Err(e);
                }
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

    /// Queue loads of the experts not resident; returns how many were queued.
    pub fn prefetch(&self, layer: i64, experts: &[i64], demand: bool, generation: i64) -> Result<usize> {
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
            if sh.queue.push(Request { key, generation: generation as u64, demand }) {
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
        let timed = if sh.device.copies_are_synchronous() {
            None
        } else {
            // Event queries need the context current in this thread, as every driver call here.
            let _ = sh.device.bind_thread();
            let mut t = sh.timer.lock();
            sh.resolve_timings(&mut t);
            Some((t.seconds, t.bytes as f64))
        };
        let mut v = sh.stats.snapshot(timed);
        v.push(("queue_len", sh.queue.len() as f64));
        v.push(("num_slots", self.num_slots as f64));
        v
    }

    pub fn reset_stats(&self) {
        let sh = &self.shared;
        let _ = sh.device.bind_thread();
        sh.stats.reset();
        let mut t = sh.timer.lock();
        sh.resolve_timings(&mut t);
        t.seconds = 0.0;
        t.bytes = 0;
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
            for &(_, e) in &ev.done_reading {
                dev.destroy_event(e);
            }
        }
        for e in sh.spare_events.lock().drain(..) {
            dev.destroy_event(e);
        }
        {
            let mut t = sh.timer.lock();
            for (a, b, _) in t.pending.drain(..) {
                dev.destroy_event(a);
                dev.destroy_event(b);
            }
            for (a, b) in t.spare.drain(..) {
                dev.destroy_event(a);
                dev.destroy_event(b);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::HostDevice;
    use std::sync::atomic::AtomicU64;

    const NBYTES: usize = 4096;

    fn pattern(key: Key) -> u8 {
        (key.0 * 31 + key.1 * 7 + 1) as u8
    }

    fn filled_pool(layers: i64, experts: i64) -> Arc<ExpertPool> {
        let keys: Vec<(i64, i64)> = (0..layers).flat_map(|l| (0..experts).map(move |e| (l, e))).collect();
        let pool = ExpertPool::new(Arc::new(HostDevice::new()), &[("w".into(), NBYTES as i64)], &keys, 1 << 20).unwrap();
        for &(l, e) in &keys {
            let data = vec![pattern((l as u64, e as u64)); NBYTES];
            unsafe { pool.write((l as u64, e as u64), "w", data.as_ptr() as usize, NBYTES).unwrap() };
        }
        Arc::new(pool)
    }

    fn cache(pool: &Arc<ExpertPool>, slots: usize, workers: usize) -> SlotCache {
        let cfg = CacheConfig {
            num_slots: slots,
            policy: PolicyKind::Lru,
            slots_addr: None,
            copy_workers: workers,
            queue_capacity: 64,
            acquire_timeout: Duration::from_secs(30),
        };
        SlotCache::new(pool.clone(), cfg).unwrap()
    }

    fn stat(c: &SlotCache, name: &str) -> f64 {
        c.stats().into_iter().find(|(k, _)| *k == name).map(|(_, v)| v).unwrap()
    }

    #[test]
    fn concurrent_acquire_release_prefetch_keeps_bytes_and_accounting() {
        let pool = filled_pool(2, 12);
        let c = Arc::new(cache(&pool, 8, 2));
        let stop = Arc::new(AtomicBool::new(false));
        let acquired = Arc::new(AtomicU64::new(0));
        let queued = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for t in 0..4u64 {
            let (c, stop, acquired) = (c.clone(), stop.clone(), acquired.clone());
            threads.push(std::thread::spawn(move || {
                let mut x = t + 1;
                while !stop.load(Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let layer = ((x >> 33) % 2) as i64;
                    let experts: Vec<i64> = (0..3).map(|i| ((x >> (20 + 4 * i)) % 12) as i64).collect();
                    let slots = c.acquire(layer, &experts, 0).unwrap();
                    for (&e, &s) in experts.iter().zip(&slots) {
                        let addr = c.slots_addr() as usize + s * c.slot_nbytes();
                        let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, NBYTES) };
                        let want = pattern((layer as u64, e as u64));
                        assert!(bytes.iter().all(|&b| b == want), "slot {s} does not hold ({layer}, {e})");
                    }
                    let rel: Vec<i64> = slots.iter().map(|&s| s as i64).collect();
                    c.release(&rel, 0).unwrap();
                    acquired.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        {
            let (c, stop, queued) = (c.clone(), stop.clone(), queued.clone());
            threads.push(std::thread::spawn(move || {
                let mut generation = 0;
                while !stop.load(Ordering::Relaxed) {
                    generation += 1;
                    let experts: Vec<i64> = (0..4).map(|i| (generation * 5 + i) % 12).collect();
                    let n = c.prefetch(generation % 2, &experts, generation % 3 == 0, generation).unwrap();
                    queued.fetch_add(n as u64, Ordering::Relaxed);
                    if generation % 5 == 0 {
                        c.cancel_before(generation - 1).unwrap();
                    }
                }
            }));
        }
        std::thread::sleep(Duration::from_millis(400));
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        c.synchronize().unwrap();
        assert_eq!(stat(&c, "acquires") as u64, acquired.load(Ordering::Relaxed));
        assert_eq!(stat(&c, "releases") as u64, acquired.load(Ordering::Relaxed));
        let handled = stat(&c, "prefetch_issued")
            + stat(&c, "prefetch_cancelled")
            + stat(&c, "prefetch_redundant")
            + stat(&c, "prefetch_dropped")
            - stat(&c, "prefetch_queue_full")
            + stat(&c, "load_errors");
        assert_eq!(handled as u64, queued.load(Ordering::Relaxed));
        assert!(c.slot_states().unwrap().iter().all(|&(_, rc, _)| rc == 0));
        c.close();
        assert!(matches!(c.acquire(0, &[0], 0), Err(Error::Closed(_))));
    }

    #[test]
    fn drop_joins_workers_and_releases_the_pool() {
        let pool = filled_pool(1, 4);
        {
            let c = cache(&pool, 2, 3);
            c.prefetch(0, &[0, 1, 2, 3], false, 0).unwrap();
            assert!(matches!(pool.close(), Err(Error::SlotState(_))));
        }
        pool.close().unwrap();
    }
}
