//! Deferred prefetches: expert ids computed on the device (the predictor's top-k) reach the
//! prefetch queue without the submitting thread waiting for them.
//!
//! `submit` queues, on the caller's stream, an asynchronous copy of the ids into page-locked
//! staging memory and an event after it, and returns at once. One native thread waits on each
//! event in submission order (holding no Python lock), reads the ids, feeds the predictive policy
//! and queues the prefetches. This takes the host-side half of the run-ahead predictor (wait for
//! the top-k, build the expert lists, call `prefetch` per layer) off the Python thread that runs
//! the model, where that time, spent under the GIL, would hold up the decode.
//!
//! Routed rows (`routed`: what a decode step's layers computed through the expert table) become
//! policy accesses, each consuming one prediction index of the predictive policy; a request's rows
//! are numbered from the acquire count at submission plus the routed rows submitted before it and
//! not yet handled, so a prediction submitted right after a step's routing lines up with the next
//! step's visits (the step after it for `after_next` rows). Remembered predictions are scored
//! against the next routed rows of their layers, or the ones after for `after_next` rows
//! (`prediction_counts`).
//!
//! Ownership: staging buffers and their events belong to this struct; a buffer is in exactly one
//! place at a time (the free list, or a request in the channel / in the thread's hands) and goes
//! back to the free list only after its event completed and its ids were read.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::device::{EventHandle, EventKind, SharedDevice, StreamHandle};
use crate::error::{Error, Result};
use crate::prefetch::Lane;
use crate::slot_cache::SlotCache;

/// Page-locked host memory for one request's ids and the event recorded after their copy.
struct Staging {
    addr: usize,
    capacity: usize,
    event: EventHandle,
}

/// What to do with the ids once they have landed.
#[derive(Clone, Debug, Default)]
pub struct DeferredOptions {
    /// The MoE layer of each row of ids (rows are `width` ids each).
    pub layers: Vec<i64>,
    pub width: usize,
    pub generation: i64,
    /// The lane of the prefetches (corrections go to the demand lane).
    pub lane: Lane,
    /// The rows are the next acquire calls, in order (a forward's prediction): rows whose acquire
    /// already happened by the time the ids are read are skipped, and the rest feed `set_future`.
    pub future: bool,
    /// Rows already routed are skipped (as with `future`) without feeding the policy.
    pub skip_routed: bool,
    /// Remember the rows as the prediction that each layer's next routed row is scored against.
    pub remember: bool,
    /// Forget the remembered prediction first (a new sequence: what the last one left unused is
    /// not scored against the new one's routing).
    pub forget: bool,
    /// The rows are what each layer computed through the expert table (a decode step): they go to
    /// `SlotCache::note_routed` (hits, policy, demand loads of the misses) instead of `prefetch`.
    /// Each row is `width` ids (negative: padding) then the `width` table entries (addresses) the
    /// pairs read, which tell a hit (a slot) from a miss (the pool).
    pub routed: bool,
    /// The rows only feed the policy (`future`) and the scores (`remember`): no loads are queued,
    /// so predictions steer eviction and admission without copies of their own.
    pub feed_only: bool,
    /// The rows are the step after the next one (a predictor of the next token's routing): they
    /// are numbered one step (`layers.len()` acquire calls) later for `future` and `skip_routed`,
    /// and a remembered row is scored against the routed row of its layer after the next.
    pub after_next: bool,
}

struct Request {
    staging: Staging,
    nbytes: usize,
    acquires_at: u64,
    opts: DeferredOptions,
}

#[derive(Default)]
struct Progress {
    submitted: u64,
    handled: u64,
    /// Remembered prediction per layer, not yet scored against a routed row of that layer.
    predicted: HashMap<i64, Vec<i64>>,
    /// Remembered `after_next` predictions: each becomes the layer's `predicted` once a routed
    /// row of that layer has been scored (the row it names is then the layer's next).
    predicted_after_next: HashMap<i64, Vec<i64>>,
    /// Routed rows submitted and not yet handled: they advance the acquire count when handled.
    pending_routed_rows: u64,
    /// Scoring of remembered predictions: routed experts that were predicted, routed experts,
    /// predicted experts (of the layers scored).
    predicted_hits: u64,
    predicted_needed: u64,
    predicted_total: u64,
    /// The first error a request met since the last `take_error` (ids out of range, cache closed).
    error: Option<String>,
    queued: u64,
}

struct State {
    free: Mutex<Vec<Staging>>,
    progress: Mutex<Progress>,
    idle: Condvar,
}

pub struct DeferredPrefetcher {
    cache: Arc<SlotCache>,
    device: SharedDevice,
    state: Arc<State>,
    tx: Mutex<Option<Sender<Request>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    shut: AtomicBool,
}

const MIN_STAGING: usize = 4096;

/// Most ids one deferred prefetch carries (its staging buffer is 8 bytes per id): far above
/// layers x batch x top-k of any decode step.
pub const MAX_DEFERRED_IDS: usize = 1 << 24;

/// Staging bytes of `rows` rows of `width` ids, refused beyond `MAX_DEFERRED_IDS`.
fn ids_nbytes(rows: usize, width: usize) -> Result<usize> {
    match rows.checked_mul(width) {
        Some(n) if n <= MAX_DEFERRED_IDS => Ok(n * 8),
        _ => Err(Error::InvalidArgument(format!(
            "{rows} layers x width {width} ids exceed the {MAX_DEFERRED_IDS} ids one deferred prefetch may carry"
        ))),
    }
}

impl DeferredPrefetcher {
    pub fn new(cache: Arc<SlotCache>) -> Self {
        let device = cache.device().clone();
        Self {
            cache,
            device,
            state: Arc::new(State { free: Mutex::new(Vec::new()), progress: Mutex::new(Progress::default()), idle: Condvar::new() }),
            tx: Mutex::new(None),
            thread: Mutex::new(None),
            shut: AtomicBool::new(false),
        }
    }

    /// Queue the copy of `len(layers) * width` int64 ids at `src` (device memory on CUDA, host
    /// memory on the host backend) on `stream`, and their handling once landed.
    ///
    /// # Safety
    /// `src..src + 8 * len(layers) * width` must be readable device (host) memory, not written by
    /// any work queued on other streams before the copy on `stream` has run.
    pub unsafe fn submit(&self, src: u64, stream: StreamHandle, opts: DeferredOptions) -> Result<()> {
        if self.cache.is_closed() || self.shut.load(Ordering::Acquire) {
            return Err(Error::Closed("the SlotCache is closed".into()));
        }
        if opts.width == 0 || opts.layers.is_empty() {
            return Err(Error::InvalidArgument("deferred prefetch needs at least one layer and width >= 1".into()));
        }
        if opts.generation < 0 {
            return Err(Error::InvalidArgument(format!("generation must be >= 0, got {}", opts.generation)));
        }
        if let Some(&bad) = opts.layers.iter().find(|&&l| l < 0) {
            return Err(Error::InvalidArgument(format!("layers must be non-negative, got {bad}")));
        }
        if src == 0 {
            return Err(Error::InvalidArgument("ids address must be non-null".into()));
        }
        let nbytes = ids_nbytes(opts.layers.len(), if opts.routed { 2 * opts.width } else { opts.width })?;
        self.device.bind_thread()?;
        let staging = self.take_staging(nbytes)?;
        // SAFETY: the staging buffer holds `nbytes` and stays ours until the request is handled;
        // the caller guarantees the source range.
        let issued = unsafe { self.device.copy_to_host_async(staging.addr, src, nbytes, stream) }
            .and_then(|()| self.device.record_event(staging.event, stream));
        if let Err(e) = issued {
            self.state.free.lock().push(staging);
            return Err(e);
        }
        if let Err(e) = self.ensure_thread() {
            self.discard(staging);
            return Err(e);
        }
        let routed_rows = if opts.routed { opts.layers.len() as u64 } else { 0 };
        let sent = {
            // under the progress lock: the thread handles routed rows (advancing the acquire
            // count) under it too, so the count and the pending rows are read consistently
            let mut p = self.state.progress.lock();
            let acquires_at = self.cache.acquire_count() + p.pending_routed_rows;
            p.pending_routed_rows += routed_rows;
            p.submitted += 1;
            let req = Request { staging, nbytes, acquires_at, opts };
            match self.tx.lock().as_ref() {
                Some(tx) => tx.send(req).map_err(|e| e.0),
                None => Err(req),
            }
        };
        if let Err(req) = sent {
            // the thread is gone (shut down, its free list drained)
            self.discard(req.staging);
            let mut p = self.state.progress.lock();
            p.pending_routed_rows -= routed_rows;
            p.handled += 1;
            self.state.idle.notify_all();
            return Err(Error::Closed("the deferred prefetcher is shut down".into()));
        }
        Ok(())
    }

    /// Wait until every request submitted so far was handled; false on timeout.
    pub fn wait_idle(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut p = self.state.progress.lock();
        while p.handled < p.submitted {
            match deadline {
                Some(d) => {
                    if self.state.idle.wait_until(&mut p, d).timed_out() {
                        return p.handled >= p.submitted;
                    }
                }
                None => self.state.idle.wait(&mut p),
            }
        }
        true
    }

    /// (routed experts that were predicted, routed experts, predicted experts) over the layers
    /// whose remembered prediction was scored so far.
    pub fn prediction_counts(&self) -> (u64, u64, u64) {
        let p = self.state.progress.lock();
        (p.predicted_hits, p.predicted_needed, p.predicted_total)
    }

    pub fn reset_prediction_counts(&self) {
        let mut p = self.state.progress.lock();
        (p.predicted_hits, p.predicted_needed, p.predicted_total) = (0, 0, 0);
    }

    /// The first error since the last call (None: none), cleared.
    pub fn take_error(&self) -> Option<String> {
        self.state.progress.lock().error.take()
    }

    /// (submitted, handled, experts queued) since creation.
    pub fn counts(&self) -> (u64, u64, u64) {
        let p = self.state.progress.lock();
        (p.submitted, p.handled, p.queued)
    }

    /// Whether `shutdown` ran.
    pub fn is_shut_down(&self) -> bool {
        self.shut.load(Ordering::Acquire)
    }

    /// Handle what was submitted, stop the thread and free the staging memory. Idempotent; later
    /// `submit`s fail with a Closed error.
    pub fn shutdown(&self) {
        self.shut.store(true, Ordering::Release);
        drop(self.tx.lock().take()); // the thread drains the channel, then sees it closed
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
        let _ = self.device.bind_thread();
        for s in self.state.free.lock().drain(..) {
            let _ = self.device.event_synchronize(s.event);
            self.device.destroy_event(s.event);
            self.device.free_pool(s.addr, s.capacity);
        }
    }

    /// Free a staging buffer whose copy may be in flight, once it landed (after a shutdown,
    /// whose free list is not drained again).
    fn discard(&self, staging: Staging) {
        let _ = self.device.event_synchronize(staging.event);
        self.device.destroy_event(staging.event);
        self.device.free_pool(staging.addr, staging.capacity);
    }

    fn take_staging(&self, nbytes: usize) -> Result<Staging> {
        {
            let mut free = self.state.free.lock();
            if let Some(i) = free.iter().position(|s| s.capacity >= nbytes) {
                return Ok(free.swap_remove(i));
            }
        }
        let capacity = nbytes
            .max(MIN_STAGING)
            .checked_next_power_of_two()
            .ok_or_else(|| Error::InvalidArgument(format!("{nbytes} bytes of ids are too many to stage")))?;
        let addr = self.device.alloc_pool(capacity)?;
        match self.device.create_event(EventKind::BlockingWait) {
            Ok(event) => Ok(Staging { addr, capacity, event }),
            Err(e) => {
                self.device.free_pool(addr, capacity);
                Err(e)
            }
        }
    }

    fn ensure_thread(&self) -> Result<()> {
        let mut thread = self.thread.lock();
        if thread.is_some() {
            return Ok(());
        }
        if self.shut.load(Ordering::Acquire) {
            return Err(Error::Closed("the SlotCache is closed".into()));
        }
        let (tx, rx) = channel();
        let (cache, device, state) = (self.cache.clone(), self.device.clone(), self.state.clone());
        let handle = std::thread::Builder::new()
            .name("sida-deferred-prefetch".into())
            .spawn(move || run(rx, &cache, &device, &state))
            .map_err(|e| Error::InvalidArgument(format!("cannot start the deferred prefetch thread: {e}")))?;
        *self.tx.lock() = Some(tx);
        *thread = Some(handle);
        Ok(())
    }
}

impl Drop for DeferredPrefetcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(rx: Receiver<Request>, cache: &SlotCache, device: &SharedDevice, state: &State) {
    let _ = device.bind_thread();
    while let Ok(req) = rx.recv() {
        // A panic must not kill the thread (waiters would hang) nor reach Python: it becomes the
        // request's error.
        let outcome = catch_unwind(AssertUnwindSafe(|| handle(&req, cache, device, state)))
            .unwrap_or_else(|_| Err(Error::InvalidArgument("deferred prefetch handler panicked".into())));
        state.free.lock().push(req.staging);
        let mut p = state.progress.lock();
        match outcome {
            Ok(queued) => p.queued += queued as u64,
            Err(e) => {
                if p.error.is_none() {
                    p.error = Some(e.to_string());
                }
            }
        }
        p.handled += 1;
        state.idle.notify_all();
    }
}

/// Read one request's ids (after its event) and act on them; returns the experts queued.
fn handle(req: &Request, cache: &SlotCache, device: &SharedDevice, state: &State) -> Result<usize> {
    // a blocking-wait event (`take_staging`): the thread sleeps until the step's copy lands
    device.event_synchronize(req.staging.event)?;
    let o = &req.opts;
    // SAFETY: the copy into the staging buffer has landed (event above); it holds `nbytes` bytes
    // and the allocation is 8-byte aligned (page-aligned host or pinned memory).
    let ids = unsafe { std::slice::from_raw_parts(req.staging.addr as *const i64, req.nbytes / 8) };
    // routed rows carry, after their `width` ids, the table entry each pair read (an address)
    let row_width = if o.routed { 2 * o.width } else { o.width };
    let mut slot_reads: Vec<u64> = Vec::new();
    let mut rows: Vec<(i64, Vec<i64>)> = Vec::with_capacity(o.layers.len());
    for (&layer, row) in o.layers.iter().zip(ids.chunks_exact(row_width)) {
        let (experts, read) = row.split_at(o.width);
        let mut pairs: Vec<(i64, i64)> =
            experts.iter().copied().zip(read.iter().copied().chain(std::iter::repeat(0))).filter(|&(e, _)| !o.routed || e >= 0).collect();
        pairs.sort_unstable_by_key(|&(e, _)| e);
        pairs.dedup_by_key(|&mut (e, _)| e);
        if o.routed {
            slot_reads.push(pairs.iter().filter(|&&(_, a)| cache.is_slot_address(a as u64)).count() as u64);
        }
        rows.push((layer, pairs.into_iter().map(|(e, _)| e).collect()));
    }
    if o.routed {
        let mut queued = 0;
        for (i, ((layer, experts), &reads)) in rows.iter().zip(&slot_reads).enumerate() {
            // per row, under the progress lock: `submit` reads the acquire count and the pending
            // rows together, and waits for at most one row's bookkeeping
            let mut p = state.progress.lock();
            if let Some(pred) = p.predicted.remove(layer) {
                p.predicted_hits += experts.iter().filter(|e| pred.binary_search(e).is_ok()).count() as u64;
                p.predicted_needed += experts.len() as u64;
                p.predicted_total += pred.len() as u64;
            }
            if let Some(next) = p.predicted_after_next.remove(layer) {
                p.predicted.insert(*layer, next);
            }
            let noted = cache.note_routed(*layer, experts, Some(reads));
            match noted {
                Ok(n) => {
                    p.pending_routed_rows -= 1;
                    queued += n;
                }
                Err(e) => {
                    p.pending_routed_rows -= (rows.len() - i) as u64;
                    return Err(e);
                }
            }
        }
        return Ok(queued);
    }
    if o.forget {
        let mut p = state.progress.lock();
        p.predicted.clear();
        p.predicted_after_next.clear();
    }
    if o.remember {
        let mut p = state.progress.lock();
        let remembered: HashMap<i64, Vec<i64>> = rows.iter().cloned().collect();
        if o.after_next {
            p.predicted_after_next = remembered;
        } else {
            p.predicted = remembered;
        }
    }
    if o.future || o.skip_routed {
        // row i is acquire call `first + i`; those already made need nothing any more
        let first = req.acquires_at + if o.after_next { o.layers.len() as u64 } else { 0 };
        let now = cache.acquire_count();
        rows.drain(..(now.saturating_sub(first) as usize).min(rows.len()));
        if o.future {
            cache.set_future(&rows, first.saturating_sub(now) as i64)?;
        }
    }
    if o.feed_only {
        return Ok(0);
    }
    let mut queued = 0;
    for (layer, experts) in &rows {
        if !experts.is_empty() {
            queued += cache.prefetch(*layer, experts, o.lane, o.generation)?;
        }
    }
    Ok(queued)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::HostDevice;
    use crate::policy::PolicyKind;
    use crate::pool::ExpertPool;
    use crate::slot_cache::CacheConfig;

    const NBYTES: usize = 256;

    fn cache(layers: i64, experts: i64, slots: usize) -> Arc<SlotCache> {
        let keys: Vec<(i64, i64)> = (0..layers).flat_map(|l| (0..experts).map(move |e| (l, e))).collect();
        let pool = ExpertPool::new(Arc::new(HostDevice::new()), &[("w".into(), NBYTES as i64)], &keys, 1 << 20).unwrap();
        for &(l, e) in &keys {
            let data = vec![(l * 16 + e) as u8; NBYTES];
            unsafe { pool.write((l as u64, e as u64), "w", data.as_ptr() as usize, NBYTES).unwrap() };
        }
        let cfg = CacheConfig {
            num_slots: slots,
            policy: PolicyKind::Lru,
            slots_addr: None,
            copy_workers: 1,
            queue_capacity: 64,
            acquire_timeout: Duration::from_secs(30),
        };
        Arc::new(SlotCache::new(Arc::new(pool), cfg).unwrap())
    }

    fn resident(c: &SlotCache) -> Vec<(u64, u64)> {
        let mut keys: Vec<(u64, u64)> = c.resident().unwrap().into_iter().map(|(k, _)| k).collect();
        keys.sort_unstable();
        keys
    }

    fn submit(d: &DeferredPrefetcher, ids: &[i64], opts: DeferredOptions) -> Result<()> {
        // the host backend copies before `submit` returns, so `ids` may be dropped right after
        unsafe { d.submit(ids.as_ptr() as u64, 0, opts) }
    }

    #[test]
    fn prediction_rows_are_prefetched_and_scored_against_the_next_routed_rows() {
        let c = cache(3, 8, 16);
        let d = DeferredPrefetcher::new(c.clone());
        // three layers, two tokens x two experts each, with a duplicate in layer 1
        let ids = [1, 2, 2, 3, 0, 5, 5, 0, 7, 6, 7, 6];
        let opts = DeferredOptions { layers: vec![0, 1, 2], width: 4, generation: 3, future: true, remember: true, ..Default::default() };
        submit(&d, &ids, opts).unwrap();
        assert!(d.wait_idle(Some(Duration::from_secs(10))));
        c.synchronize().unwrap();
        assert_eq!(resident(&c), vec![(0, 1), (0, 2), (0, 3), (1, 0), (1, 5), (2, 6), (2, 7)]);
        assert_eq!(d.prediction_counts(), (0, 0, 0));
        // the step's routing: layer 0 used 1 and 4 (one predicted), layer 1 used 0 and 5 (both);
        // layer 2 not yet routed stays unscored; -1 is padding. After each row's ids, the table
        // entries its pairs read: expert 1 from a slot, the others from the pool
        let slot = c.slots_addr() as i64;
        let pool = 4096;
        let routed = [1, 4, -1, slot, pool, 0, 0, 5, -1, pool, pool, 0];
        submit(&d, &routed, DeferredOptions { layers: vec![0, 1], width: 3, routed: true, ..Default::default() }).unwrap();
        assert!(d.wait_idle(Some(Duration::from_secs(10))));
        assert_eq!(d.prediction_counts(), (3, 4, 5)); // predicted: 3 experts of layer 0, 2 of layer 1
        // hits are what the step read from slots, not what is resident by now
        let stats: HashMap<_, _> = c.stats().into_iter().collect();
        assert_eq!((stats["hits"], stats["misses"]), (1.0, 3.0));
        // a prediction is scored once: the next routing of layer 0 has nothing to be scored against
        submit(&d, &[1, 2, 0, 0], DeferredOptions { layers: vec![0], width: 2, routed: true, ..Default::default() }).unwrap();
        assert!(d.wait_idle(Some(Duration::from_secs(10))));
        assert_eq!(d.prediction_counts(), (3, 4, 5));
        // a request that forgets: layer 2's remembered prediction is not scored any more
        submit(&d, &[1], DeferredOptions { layers: vec![0], width: 1, forget: true, ..Default::default() }).unwrap();
        submit(&d, &[6, 7, 0, 0], DeferredOptions { layers: vec![2], width: 2, routed: true, ..Default::default() }).unwrap();
        assert!(d.wait_idle(Some(Duration::from_secs(10))));
        assert_eq!(d.prediction_counts(), (3, 4, 5));
        let (submitted, handled, _) = d.counts();
        assert_eq!((submitted, handled), (5, 5));
        assert_eq!(d.take_error(), None);
    }

    #[test]
    fn feed_only_rows_are_remembered_and_fed_to_the_policy_without_loads() {
        let c = cache(2, 8, 8);
        let d = DeferredPrefetcher::new(c.clone());
        let opts = DeferredOptions { layers: vec![0, 1], width: 2, future: true, remember: true, feed_only: true, ..Default::default() };
        submit(&d, &[1, 2, 3, 4], opts).unwrap();
        assert!(d.wait_idle(Some(Duration::from_secs(10))));
        c.synchronize().unwrap();
        assert_eq!(resident(&c), vec![], "nothing loaded");
        let stats: HashMap<_, _> = c.stats().into_iter().collect();
        assert_eq!(stats["prefetch_queued"], 0.0);
        // still scored against the next routing
        let pool = 4096;
        submit(&d, &[1, 5, pool, pool], DeferredOptions { layers: vec![0], width: 2, routed: true, ..Default::default() }).unwrap();
        assert!(d.wait_idle(Some(Duration::from_secs(10))));
        assert_eq!(d.prediction_counts(), (1, 2, 2));
        assert_eq!(d.take_error(), None);
    }

    #[test]
    fn a_prediction_after_routed_rows_starts_at_the_visit_after_them() {
        // Many routed rows (each a visit), then at once a prediction of the next visits: its rows
        // are numbered after the routed rows still queued, so none is dropped as already routed.
        // Numbering from the acquire count at submission alone would drop all of them once the
        // thread had handled the routed rows.
        let c = cache(2, 8, 16);
        let d = DeferredPrefetcher::new(c.clone());
        let visits = 4000;
        let routed: Vec<i64> = (0..visits).flat_map(|i| [(i % 2) as i64, 0]).collect();
        let layers: Vec<i64> = (0..visits).map(|i| (i % 2) as i64).collect();
        submit(&d, &routed, DeferredOptions { layers, width: 1, routed: true, ..Default::default() }).unwrap();
        let next = [5, 6, 7, 4];
        submit(&d, &next, DeferredOptions { layers: vec![0, 1], width: 2, future: true, ..Default::default() }).unwrap();
        assert!(d.wait_idle(Some(Duration::from_secs(30))));
        assert_eq!(d.take_error(), None);
        assert_eq!(c.acquire_count(), visits as u64);
        c.synchronize().unwrap();
        let res = resident(&c);
        for key in [(0, 5), (0, 6), (1, 7), (1, 4)] {
            assert!(res.contains(&key), "predicted {key:?} was not prefetched: {res:?}");
        }
    }

    #[test]
    fn after_next_rows_are_numbered_a_step_later_and_scored_against_the_routing_after_next() {
        let c = cache(2, 8, 16);
        let d = DeferredPrefetcher::new(c.clone());
        // a prediction of the step after next, then the next step's routing, then that step's
        let opts = DeferredOptions { layers: vec![0, 1], width: 2, remember: true, after_next: true, ..Default::default() };
        submit(&d, &[1, 2, 3, 4], opts).unwrap();
        let pool = 4096;
        let routed = || DeferredOptions { layers: vec![0, 1], width: 1, routed: true, ..Default::default() };
        submit(&d, &[1, pool, 3, pool], routed()).unwrap();
        assert!(d.wait_idle(Some(Duration::from_secs(10))));
        assert_eq!(d.prediction_counts(), (0, 0, 0), "not scored against the next step");
        submit(&d, &[2, pool, 5, pool], routed()).unwrap();
        assert!(d.wait_idle(Some(Duration::from_secs(10))));
        assert_eq!(d.prediction_counts(), (1, 2, 4), "scored against the step after next");
        assert_eq!(d.take_error(), None);

        // numbering: a step (two visits) is routed between submission and handling; the rows of
        // the step after next are still ahead, so none is skipped as already routed
        let acquires_at = c.acquire_count();
        for layer in 0..2 {
            let slots: Vec<i64> = c.acquire(layer, &[0], 0).unwrap().into_iter().map(|s| s as i64).collect();
            c.release(&slots, 0).unwrap();
        }
        let state = State { free: Mutex::new(Vec::new()), progress: Mutex::new(Progress::default()), idle: Condvar::new() };
        let ids: Vec<i64> = vec![6, 7, 6, 7];
        for (after_next, want) in [(false, 0), (true, 4)] {
            let staging = Staging { addr: ids.as_ptr() as usize, capacity: 32, event: 0 };
            let opts = DeferredOptions { layers: vec![0, 1], width: 2, skip_routed: true, after_next, ..Default::default() };
            let queued = handle(&Request { staging, nbytes: 32, acquires_at, opts }, &c, c.device(), &state).unwrap();
            assert_eq!(queued, want, "after_next {after_next}");
        }
    }

    #[test]
    fn rows_of_layers_already_routed_are_skipped() {
        let c = cache(2, 8, 16);
        let d = DeferredPrefetcher::new(c.clone());
        // the first row's acquire happens before the ids are read: hold the handler back by
        // submitting after the acquire is recorded against the submission's count
        let acquires_at = c.acquire_count();
        let slots: Vec<i64> = c.acquire(0, &[4], 0).unwrap().into_iter().map(|s| s as i64).collect();
        c.release(&slots, 0).unwrap();
        assert_eq!(c.acquire_count(), acquires_at + 1);
        let state = State { free: Mutex::new(Vec::new()), progress: Mutex::new(Progress::default()), idle: Condvar::new() };
        let ids: Vec<i64> = vec![1, 2, 3, 5];
        let staging = Staging { addr: ids.as_ptr() as usize, capacity: 32, event: 0 };
        let req = Request {
            staging,
            nbytes: 32,
            acquires_at,
            opts: DeferredOptions { layers: vec![0, 1], width: 2, generation: 0, future: true, ..Default::default() },
        };
        let queued = handle(&req, &c, c.device(), &state).unwrap();
        assert_eq!(queued, 2); // layer 1's row only
        c.synchronize().unwrap();
        assert_eq!(resident(&c), vec![(0, 4), (1, 3), (1, 5)]);
        drop(d);
    }

    #[test]
    fn bad_ids_become_an_error_and_the_thread_keeps_going() {
        let c = cache(1, 4, 4);
        let d = DeferredPrefetcher::new(c.clone());
        let bad = [9, 1];
        submit(&d, &bad, DeferredOptions { layers: vec![0], width: 2, ..Default::default() }).unwrap();
        let good = [2, 3];
        submit(&d, &good, DeferredOptions { layers: vec![0], width: 2, ..Default::default() }).unwrap();
        assert!(d.wait_idle(Some(Duration::from_secs(10))));
        let err = d.take_error().expect("an error for expert 9");
        assert!(err.contains('9'), "{err}");
        assert_eq!(d.take_error(), None); // cleared
        c.synchronize().unwrap();
        assert!(resident(&c).contains(&(0, 3)));
        // bad arguments are refused up front
        assert!(submit(&d, &good, DeferredOptions { layers: vec![], width: 2, ..Default::default() }).is_err());
        assert!(submit(&d, &good, DeferredOptions { layers: vec![-1], width: 2, ..Default::default() }).is_err());
        assert!(submit(&d, &good, DeferredOptions { layers: vec![0], width: 0, ..Default::default() }).is_err());
        assert!(submit(&d, &good, DeferredOptions { layers: vec![0], width: 2, generation: -1, ..Default::default() }).is_err());
        // a width beyond the id limit is refused before any staging is allocated (or read)
        for width in [MAX_DEFERRED_IDS + 1, usize::MAX / 2] {
            let opts = DeferredOptions { layers: vec![0, 1], width, ..Default::default() };
            assert!(matches!(submit(&d, &good, opts), Err(Error::InvalidArgument(_))));
        }
    }

    #[test]
    fn many_threads_submit_and_every_request_is_handled_once() {
        let c = cache(4, 16, 64);
        let d = Arc::new(DeferredPrefetcher::new(c.clone()));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for i in 0..200i64 {
                        let ids = [(t + i) % 16, (t * 3 + i) % 16, 0, 0]; // routed rows: ids, then addresses
                        let layer = (t + i) % 4;
                        let opts = DeferredOptions { layers: vec![layer], width: 2, generation: i, remember: i % 7 == 0, routed: i % 3 == 0, ..Default::default() };
                        submit(&d, &ids, opts).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(d.wait_idle(Some(Duration::from_secs(30))));
        let (submitted, handled, _) = d.counts();
        assert_eq!((submitted, handled), (1600, 1600));
        assert_eq!(d.take_error(), None);
        c.synchronize().unwrap();
        // every slot's bytes are its expert's
        for (key, slot) in c.resident().unwrap() {
            let bytes = c.read_slot(slot as i64).unwrap();
            assert!(bytes.iter().all(|&b| b == (key.0 * 16 + key.1) as u8), "slot {slot} holds the wrong bytes for {key:?}");
        }
    }

    #[test]
    fn shutdown_handles_what_was_submitted_and_refuses_more() {
        let c = cache(1, 8, 8);
        let d = DeferredPrefetcher::new(c.clone());
        for e in 0..8 {
            submit(&d, &[e], DeferredOptions { layers: vec![0], width: 1, ..Default::default() }).unwrap();
        }
        d.shutdown();
        let (submitted, handled, _) = d.counts();
        assert_eq!(submitted, handled);
        assert!(matches!(submit(&d, &[1], DeferredOptions { layers: vec![0], width: 1, ..Default::default() }), Err(Error::Closed(_))));
        c.close();
        let d2 = DeferredPrefetcher::new(c.clone());
        assert!(matches!(submit(&d2, &[1], DeferredOptions { layers: vec![0], width: 1, ..Default::default() }), Err(Error::Closed(_))));
    }
}
