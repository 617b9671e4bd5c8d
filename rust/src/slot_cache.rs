//! `SlotCache`: the slot table + a device + the prefetch queue and its copy workers.
//!
//! acquire: pin hits and reserve victims for misses all-or-nothing (when other threads pin too
//! many slots: pin nothing, wait for a release, retry), copy the misses on the high-priority
//! demand stream, wait on the host only for slots another thread is still issuing, then make the
//! caller's stream wait on each slot's ready event. release: record a done-reading event on the
//! caller's stream, which the next copy into that slot waits for.
//!
//! Stream waits (opt-in, `set_measure_stream_waits`): when an acquire finds a slot whose ready
//! event has not completed yet (its copy is still in flight), it brackets its waits with two
//! timing events on the caller's stream; `stream_wait_seconds` sums the device time between them,
//! i.e. the time the caller's stream spent blocked on copies. Acquires whose copies have all
//! landed record nothing: their wait is zero.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::cache::{dedup_in_order, AcquireOutcome, PrefetchOutcome, SlotState, SlotTable, WaitStatus};
use crate::device::{DeviceKind, EventHandle, EventKind, SharedDevice, StreamHandle};
use crate::error::{try_vec, Error, Result};
use crate::expert_table::ExpertTable;
use crate::policy::{Key, PolicyKind};
use crate::pool::ExpertPool;
use crate::prefetch::{serve, Handler, PrefetchQueue, Request, Workers, MAX_QUEUE_CAPACITY, ROUTED_MISS};
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

/// Most copy worker threads one cache starts.
pub const MAX_COPY_WORKERS: usize = 64;

impl CacheConfig {
    /// The config of Python-shaped arguments (signed counts, a policy name, seconds as a float):
    /// only the conversions are checked here, the ranges by `SlotCache::new`.
    pub fn from_args(
        num_slots: i64,
        policy: &str,
        slots_ptr: Option<i64>,
        copy_workers: i64,
        queue_capacity: i64,
        acquire_timeout: f64,
    ) -> Result<Self> {
        let count = |v: i64, err: &dyn Fn() -> Error| usize::try_from(v).map_err(|_| err());
        let num_slots = count(num_slots, &|| Error::Budget(format!("num_slots must be >= 1, got {num_slots}")))?;
        let policy = PolicyKind::parse(policy)?;
        let copy_workers = count(copy_workers, &|| {
            Error::InvalidArgument(format!("copy_workers must be in 0..={MAX_COPY_WORKERS}, got {copy_workers}"))
        })?;
        let queue_capacity = count(queue_capacity, &|| {
            Error::InvalidArgument(format!("queue_capacity must be in 1..={MAX_QUEUE_CAPACITY}, got {queue_capacity}"))
        })?;
        let slots_addr = match slots_ptr {
            Some(p) if p <= 0 => {
                return Err(Error::InvalidArgument(format!("slots_ptr must be a non-null address, got {p}")))
            }
            p => p.map(|p| p as u64),
        };
        let bad_timeout = || Error::InvalidArgument(format!("acquire_timeout must be > 0 seconds, got {acquire_timeout}"));
        if !(acquire_timeout.is_finite() && acquire_timeout > 0.0) {
            return Err(bad_timeout());
        }
        let acquire_timeout = Duration::try_from_secs_f64(acquire_timeout)
            .map_err(|_| Error::InvalidArgument(format!("acquire_timeout {acquire_timeout} s is too large")))?;
        Ok(Self { num_slots, policy, slots_addr, copy_workers, queue_capacity, acquire_timeout })
    }

    /// Every range, before anything is allocated: each size here becomes an allocation.
    fn check(&self, pool: &ExpertPool) -> Result<()> {
        let experts = pool.keys().len();
        if !(1..=experts).contains(&self.num_slots) {
            return Err(Error::Budget(format!(
                "num_slots must be in 1..={experts} (one slot per expert of the pool at most), got {}",
                self.num_slots
            )));
        }
        if self.copy_workers > MAX_COPY_WORKERS {
            return Err(Error::InvalidArgument(format!(
                "copy_workers must be in 0..={MAX_COPY_WORKERS}, got {}",
                self.copy_workers
            )));
        }
        if !(1..=MAX_QUEUE_CAPACITY).contains(&self.queue_capacity) {
            return Err(Error::InvalidArgument(format!(
                "queue_capacity must be in 1..={MAX_QUEUE_CAPACITY}, got {}",
                self.queue_capacity
            )));
        }
        if self.acquire_timeout.is_zero() {
            return Err(Error::InvalidArgument("acquire_timeout must be > 0 seconds, got 0".into()));
        }
        Ok(())
    }
}

/// Per-slot events. Touched by the thread loading the slot and by threads releasing it.
struct SlotEvents {
    ready: EventHandle,
    /// The key whose expert-table entry points at this slot (set after its copy was queued).
    published: Option<Key>,
    /// Recorded on the reader stream after that entry was pointed back at the pool (CUDA).
    unpublished: Option<EventHandle>,
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

/// Device-side timing of the caller streams' waits on slot-ready events (`measure_waits`).
#[derive(Default)]
struct WaitTimer {
    /// (start, end) timing events recorded around one acquire's waits, not yet resolved.
    pending: VecDeque<(EventHandle, EventHandle)>,
    /// Resolved (or discarded) pairs, reused before new events are created.
    spare: Vec<(EventHandle, EventHandle)>,
    /// Resolved wait time since the last `reset_stats`.
    seconds: f64,
    /// Acquires since the last `reset_stats` that found a copy still in flight and were timed.
    waits: u64,
}

/// Completed pairs are folded in (without blocking) once this many are pending ...
const RESOLVE_WAITS_AT: usize = 64;
/// ... and an acquire blocks on the oldest pair when this many are still pending.
const MAX_PENDING_WAITS: usize = 4096;

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
    /// Time the caller streams' waits on slot-ready events (off by default).
    measure_waits: AtomicBool,
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
        Ok(Some((self.device.create_event(EventKind::Timing)?, self.device.create_event(EventKind::Timing)?)))
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

    /// Make `stream` wait on each slot's ready event. With `measure_waits` on and at least one
    /// of those events still pending, the waits are bracketed by a pair of timing events recorded
    /// on `stream` (resolved by `resolve_waits`); otherwise nothing extra is recorded.
    fn wait_for_slots(&self, slots: &[usize], stream: StreamHandle) -> Result<()> {
        let dev = &self.device;
        let readies: Vec<EventHandle> = slots.iter().map(|&s| self.events[s].lock().ready).collect();
        let mut pair = None;
        if self.measure_waits.load(Ordering::Relaxed) {
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

    /// A pair of timing events for one acquire's waits: a spare one, or two new ones.
    fn take_wait_pair(&self) -> Result<(EventHandle, EventHandle)> {
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
    fn resolve_waits(&self, w: &mut WaitTimer, block: usize) -> Result<()> {
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

    fn take_event(&self) -> Result<EventHandle> {
        match self.spare_events.lock().pop() {
            Some(e) => Ok(e),
            None => self.device.create_event(EventKind::Plain),
        }
    }
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
                measure_waits: AtomicBool::new(false),
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

    /// Turn the timing of the caller streams' waits on slot-ready events on or off (see the
    /// module docs). Turning it off keeps what was measured.
    pub fn set_measure_stream_waits(&self, on: bool) -> Result<()> {
        let _g = self.gate.read();
        if self.is_closed() {
            return Err(closed_err());
        }
        self.shared.measure_waits.store(on, Ordering::Relaxed);
        Ok(())
    }

    pub fn measure_stream_waits(&self) -> bool {
        self.shared.measure_waits.load(Ordering::Relaxed)
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
        v.push(("stream_waits", sh.wait_timer.lock().waits as f64));
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
        drop(t);
        // Pending wait timings are dropped unresolved: re-recording a pending event is allowed
        // (a query then sees only the latest record), so their events are reused as they are.
        let mut w = sh.wait_timer.lock();
        let WaitTimer { pending, spare, seconds, waits } = &mut *w;
        spare.extend(pending.drain(..));
        *seconds = 0.0;
        *waits = 0;
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
        {
            // Resolve what is pending first, so that `stream_wait_seconds` after close is complete.
            let mut w = sh.wait_timer.lock();
            let _ = sh.resolve_waits(&mut w, usize::MAX);
            let WaitTimer { pending, spare, .. } = &mut *w;
            for (a, b) in pending.drain(..).chain(spare.drain(..)) {
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

    /// The host backend (memcpy, synchronous) with switchable event completion and fixed timing
    /// results, counting the timing events it creates, records and destroys.
    #[derive(Default)]
    struct InFlightDevice {
        host: HostDevice,
        in_flight: AtomicBool,
        fail_query: AtomicBool,
        /// Timings complete only once their end event was synchronized (a stream far behind).
        lagging: AtomicBool,
        synced: Mutex<Vec<EventHandle>>,
        timing_events: Mutex<Vec<EventHandle>>,
        destroyed: Mutex<Vec<EventHandle>>,
        timing_records: AtomicU64,
    }

    const WAIT_MS: f32 = 2.0;

    impl crate::device::Device for InFlightDevice {
        fn kind(&self) -> DeviceKind {
            DeviceKind::Host
        }
        fn ordinal(&self) -> i32 {
            0
        }
        fn bind_thread(&self) -> Result<()> {
            Ok(())
        }
        fn alloc_pool(&self, bytes: usize) -> Result<usize> {
            self.host.alloc_pool(bytes)
        }
        fn free_pool(&self, addr: usize, bytes: usize) {
            self.host.free_pool(addr, bytes)
        }
        fn alloc_slots(&self, bytes: usize) -> Result<u64> {
            self.host.alloc_slots(bytes)
        }
        fn free_slots(&self, addr: u64, bytes: usize) {
            self.host.free_slots(addr, bytes)
        }
        fn create_stream(&self, high_priority: bool) -> Result<StreamHandle> {
            self.host.create_stream(high_priority)
        }
        fn destroy_stream(&self, _stream: StreamHandle) {}
        fn create_event(&self, kind: EventKind) -> Result<EventHandle> {
            let e = self.host.create_event(kind)?;
            if kind == EventKind::Timing {
                self.timing_events.lock().push(e);
            }
            Ok(e)
        }
        fn destroy_event(&self, event: EventHandle) {
            self.destroyed.lock().push(event);
        }
        unsafe fn copy_to_slot(&self, dst: u64, src: usize, n: usize, stream: StreamHandle) -> Result<()> {
            unsafe { self.host.copy_to_slot(dst, src, n, stream) }
        }
        unsafe fn copy_from_slot(&self, dst: usize, src: u64, n: usize) -> Result<()> {
            unsafe { self.host.copy_from_slot(dst, src, n) }
        }
        unsafe fn copy_to_host_async(&self, dst: usize, src: u64, n: usize, stream: StreamHandle) -> Result<()> {
            unsafe { self.host.copy_to_host_async(dst, src, n, stream) }
        }
        fn record_event(&self, event: EventHandle, _stream: StreamHandle) -> Result<()> {
            if self.timing_events.lock().contains(&event) {
                self.timing_records.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }
        fn stream_wait_event(&self, _stream: StreamHandle, _event: EventHandle) -> Result<()> {
            Ok(())
        }
        fn event_synchronize(&self, event: EventHandle) -> Result<()> {
            self.synced.lock().push(event);
            Ok(())
        }
        fn event_done(&self, _event: EventHandle) -> Result<bool> {
            if self.fail_query.load(Ordering::Relaxed) {
                return Err(Error::Cuda("cuEventQuery failed: injected".into()));
            }
            Ok(!self.in_flight.load(Ordering::Relaxed))
        }
        fn elapsed_ms(&self, _start: EventHandle, end: EventHandle) -> Result<Option<f32>> {
            if self.lagging.load(Ordering::Relaxed) && !self.synced.lock().contains(&end) {
                return Ok(None);
            }
            Ok(Some(WAIT_MS))
        }
        fn stream_synchronize(&self, _stream: StreamHandle) -> Result<()> {
            Ok(())
        }
        fn copies_are_synchronous(&self) -> bool {
            true
        }
        unsafe fn write_value64(&self, addr: u64, value: u64, stream: StreamHandle) -> Result<()> {
            unsafe { self.host.write_value64(addr, value, stream) }
        }
    }

    fn in_flight_cache() -> (Arc<InFlightDevice>, Arc<ExpertPool>, SlotCache) {
        let dev = Arc::new(InFlightDevice::default());
        let keys: Vec<(i64, i64)> = (0..4).map(|e| (0, e)).collect();
        let pool = Arc::new(ExpertPool::new(dev.clone(), &[("w".into(), NBYTES as i64)], &keys, 1 << 20).unwrap());
        let c = cache(&pool, 4, 0);
        (dev, pool, c)
    }

    fn acquire_release(c: &SlotCache, experts: &[i64]) {
        let slots = c.acquire(0, experts, 7).unwrap();
        c.release(&slots.iter().map(|&s| s as i64).collect::<Vec<_>>(), 7).unwrap();
    }

    #[test]
    fn host_backend_never_times_a_stream_wait() {
        let pool = filled_pool(1, 4);
        let c = cache(&pool, 2, 0);
        assert!(!c.measure_stream_waits());
        c.set_measure_stream_waits(true).unwrap();
        assert!(c.measure_stream_waits());
        for e in 0..4 {
            acquire_release(&c, &[e]); // misses: copies land before acquire returns
            acquire_release(&c, &[e]); // hits
        }
        assert_eq!(c.stream_wait_seconds().unwrap(), 0.0);
        assert_eq!(stat(&c, "stream_waits"), 0.0);
        c.reset_stats();
        assert_eq!(c.stream_wait_seconds().unwrap(), 0.0);
        c.close();
        assert!(matches!(c.set_measure_stream_waits(false), Err(Error::Closed(_))));
        assert_eq!(c.stream_wait_seconds().unwrap(), 0.0);
    }

    #[test]
    fn waits_on_copies_in_flight_are_timed_and_reset_recycles_the_events() {
        let (dev, _pool, c) = in_flight_cache();
        dev.in_flight.store(true, Ordering::Relaxed);
        // Off (the default): nothing is recorded even with copies in flight.
        acquire_release(&c, &[0, 1]);
        assert_eq!(dev.timing_events.lock().len(), 0);
        assert_eq!((c.stream_wait_seconds().unwrap(), stat(&c, "stream_waits")), (0.0, 0.0));

        c.set_measure_stream_waits(true).unwrap();
        acquire_release(&c, &[0, 1]); // two slots in flight: one pair around both waits
        acquire_release(&c, &[2]);
        assert_eq!(dev.timing_events.lock().len(), 4);
        assert_eq!(dev.timing_records.load(Ordering::Relaxed), 4);
        assert_eq!(stat(&c, "stream_waits"), 2.0);
        let want = 2.0 * WAIT_MS as f64 * 1e-3;
        assert!((c.stream_wait_seconds().unwrap() - want).abs() < 1e-12);
        assert!((c.stream_wait_seconds().unwrap() - want).abs() < 1e-12, "resolved once, counted once");

        // Every copy landed: no wait, nothing recorded.
        dev.in_flight.store(false, Ordering::Relaxed);
        acquire_release(&c, &[0, 1, 2, 3]);
        assert_eq!(dev.timing_records.load(Ordering::Relaxed), 4);
        assert_eq!(stat(&c, "stream_waits"), 2.0);

        // Resolved pairs are reused; reset drops pending ones unresolved and reuses them too.
        dev.in_flight.store(true, Ordering::Relaxed);
        acquire_release(&c, &[3]);
        acquire_release(&c, &[1]);
        c.reset_stats();
        assert_eq!((c.stream_wait_seconds().unwrap(), stat(&c, "stream_waits")), (0.0, 0.0));
        acquire_release(&c, &[0]);
        assert_eq!(dev.timing_events.lock().len(), 4, "no new events while spare pairs exist");
        assert_eq!(stat(&c, "stream_waits"), 1.0);

        // Turning the switch off keeps what was measured.
        c.set_measure_stream_waits(false).unwrap();
        acquire_release(&c, &[2]);
        assert_eq!(stat(&c, "stream_waits"), 1.0);

        // Close resolves the pending pair and destroys every timing event.
        c.close();
        assert!((c.stream_wait_seconds().unwrap() - WAIT_MS as f64 * 1e-3).abs() < 1e-12);
        let destroyed = dev.destroyed.lock();
        assert!(dev.timing_events.lock().iter().all(|e| destroyed.iter().filter(|&d| d == e).count() == 1));
    }

    #[test]
    fn a_failed_event_query_fails_the_acquire_and_pins_nothing() {
        let (dev, _pool, c) = in_flight_cache();
        c.set_measure_stream_waits(true).unwrap();
        dev.fail_query.store(true, Ordering::Relaxed);
        assert!(matches!(c.acquire(0, &[0, 1], 7), Err(Error::Cuda(_))));
        assert!(c.slot_states().unwrap().iter().all(|&(_, rc, _)| rc == 0));
        dev.fail_query.store(false, Ordering::Relaxed);
        acquire_release(&c, &[0, 1]);
        assert_eq!(stat(&c, "acquires"), 1.0);
    }

    #[test]
    fn unresolved_wait_timings_stay_bounded() {
        for lagging in [false, true] {
            let (dev, _pool, c) = in_flight_cache();
            c.set_measure_stream_waits(true).unwrap();
            dev.in_flight.store(true, Ordering::Relaxed);
            dev.lagging.store(lagging, Ordering::Relaxed);
            let n = MAX_PENDING_WAITS + 10;
            for i in 0..n {
                acquire_release(&c, &[i as i64 % 4]);
            }
            // Completed pairs are folded in as acquires go; when the stream lags far behind, an
            // acquire waits for the oldest pair instead of piling up events.
            let created = dev.timing_events.lock().len();
            let bound = if lagging { 2 * (MAX_PENDING_WAITS + 1) } else { 2 * (RESOLVE_WAITS_AT + 1) };
            assert!(created <= bound, "{created} timing events for lagging={lagging}");
            assert_eq!(stat(&c, "stream_waits"), n as f64);
            assert!((c.stream_wait_seconds().unwrap() - n as f64 * WAIT_MS as f64 * 1e-3).abs() < 1e-9);
            c.close();
            assert_eq!(dev.destroyed.lock().iter().filter(|e| dev.timing_events.lock().contains(e)).count(), created);
        }
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

    #[test]
    fn constructor_ranges_are_checked_before_anything_is_allocated() {
        let pool = filled_pool(1, 3);
        let args = |slots: i64, workers: i64, queue: i64, timeout: f64| {
            CacheConfig::from_args(slots, "lru", None, workers, queue, timeout)
                .and_then(|cfg| SlotCache::new(pool.clone(), cfg))
                .map(|_| ())
        };
        assert!(args(3, 0, 1, 1.0).is_ok());
        assert!(matches!(args(4, 0, 1, 1.0), Err(Error::Budget(m)) if m.contains("1..=3")));
        assert!(matches!(args(1 << 31, 0, 1, 1.0), Err(Error::Budget(_))));
        assert!(matches!(args(-1, 0, 1, 1.0), Err(Error::Budget(_))));
        assert!(matches!(args(1, 65, 1, 1.0), Err(Error::InvalidArgument(_))));
        assert!(matches!(args(1, -1, 1, 1.0), Err(Error::InvalidArgument(_))));
        assert!(matches!(args(1, 0, 1 << 40, 1.0), Err(Error::InvalidArgument(m)) if m.contains("queue_capacity")));
        assert!(matches!(args(1, 0, 0, 1.0), Err(Error::InvalidArgument(_))));
        assert!(matches!(args(1, 0, 1, 0.0), Err(Error::InvalidArgument(_))));
        assert!(matches!(args(1, 0, 1, f64::INFINITY), Err(Error::InvalidArgument(_))));
        pool.close().unwrap(); // no failed constructor kept a hold on the pool
    }
}
