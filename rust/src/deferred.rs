//! Deferred prefetches: expert ids computed on the device (the predictor's top-k) reach the
//! prefetch queue without the submitting thread waiting for them.
//!
//! `submit` queues, on the caller's stream, an asynchronous copy of the ids into page-locked
//! staging memory and an event after it, and returns at once. One native thread waits on each
//! event in submission order (holding no Python lock), reads the ids, feeds the predictive policy
//! and queues the prefetches. This takes the host-side half of the run-ahead predictor (wait for
//! the top-k, build the expert lists, call `prefetch` per layer) off the Python thread that runs
//! the model: in a host-bound decode that Python time, spent under the GIL, was most of the
//! predictor's cost to tokens/s (NOTES.md).
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

use crate::device::{EventHandle, SharedDevice, StreamHandle};
use crate::error::{Error, Result};
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
    /// Demand lane (corrections) instead of the speculative lane.
    pub demand: bool,
    /// The rows are the next acquire calls, in order (a forward's prediction): rows whose acquire
    /// already happened by the time the ids are read are skipped, and the rest feed `set_future`.
    pub future: bool,
    /// Rows already routed are skipped (as with `future`) without feeding the policy.
    pub skip_routed: bool,
    /// Remember the rows as this generation's prediction (see `predicted`).
    pub remember: bool,
    /// Leave out the experts this generation's remembered prediction already has for the layer.
    pub exclude_predicted: bool,
    /// The rows are what each layer computed through the expert table (a decode step): they go to
    /// `SlotCache::note_routed` (hits, policy, demand loads of the misses) instead of `prefetch`.
    /// Negative ids are padding.
    pub routed: bool,
}

/// A captured device program (a CUDA graph) whose output ids are prefetched: `run_program` copies
/// the caller's inputs into the program's static buffers on the caller's stream, launches the graph
/// on the program's own stream after them, and submits its ids. Owned here: its two events.
struct Program {
    exec: u64,
    inputs: Vec<(u64, usize)>,
    ids: u64,
    layers: Vec<i64>,
    width: usize,
    stream: StreamHandle,
    /// Recorded on the caller's stream after the input copies; the program's stream waits on it.
    ready: EventHandle,
    /// Recorded on the program's stream after a launch: the next run's input copies wait on it,
    /// so they never overwrite inputs the previous launch is still reading.
    done: EventHandle,
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
    /// The newest generation with a remembered prediction, and its rows per layer.
    predicted_generation: Option<i64>,
    predicted: HashMap<i64, Vec<i64>>,
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
    programs: Mutex<Vec<Option<Program>>>,
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
            programs: Mutex::new(Vec::new()),
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
        let nbytes = ids_nbytes(opts.layers.len(), opts.width)?;
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
        let req = Request { staging, nbytes, acquires_at: self.cache.acquire_count(), opts };
        self.state.progress.lock().submitted += 1;
        let sent = match self.tx.lock().as_ref() {
            Some(tx) => tx.send(req).map_err(|e| e.0),
            None => Err(req),
        };
        if let Err(req) = sent {
            // the thread is gone (shut down, its free list drained)
            self.discard(req.staging);
            let mut p = self.state.progress.lock();
            p.handled += 1;
            self.state.idle.notify_all();
            return Err(Error::Closed("the deferred prefetcher is shut down".into()));
        }
        Ok(())
    }

    /// Register a program (see `Program`): `exec` a `CUgraphExec` (0: no graph, only the copies and
    /// the ids -- the host backend, tests), `inputs` its static input buffers (address, bytes),
    /// `ids` its output of `len(layers) * width` int64 ids, `stream` where it runs. Returns its id.
    ///
    /// # Safety
    /// Every address must stay valid, and `exec` live, until `clear_programs` (or shutdown).
    pub unsafe fn register_program(
        &self,
        exec: u64,
        inputs: Vec<(u64, usize)>,
        ids: u64,
        layers: Vec<i64>,
        width: usize,
        stream: StreamHandle,
    ) -> Result<usize> {
        if self.cache.is_closed() || self.shut.load(Ordering::Acquire) {
            return Err(Error::Closed("the SlotCache is closed".into()));
        }
        if ids == 0 || inputs.iter().any(|&(a, n)| a == 0 || n == 0) {
            return Err(Error::InvalidArgument("program buffers must be non-null and non-empty".into()));
        }
        if width == 0 || layers.is_empty() || layers.iter().any(|&l| l < 0) {
            return Err(Error::InvalidArgument("a program needs at least one layer (>= 0) and width >= 1".into()));
        }
        ids_nbytes(layers.len(), width)?;
        if exec != 0 && self.device.kind() != crate::device::DeviceKind::Cuda {
            return Err(Error::InvalidArgument("CUDA graph programs need the CUDA backend".into()));
        }
        self.device.bind_thread()?;
        let ready = self.device.create_event(false)?;
        let done = match self.device.create_event(false) {
            Ok(e) => e,
            Err(e) => {
                self.device.destroy_event(ready);
                return Err(e);
            }
        };
        let mut programs = self.programs.lock();
        programs.push(Some(Program { exec, inputs, ids, layers, width, stream, ready, done }));
        Ok(programs.len() - 1)
    }

    /// Run program `id` on `inputs` (device addresses, one per registered input, each of its
    /// size) written by work on `stream` (see `Program`), and submit its ids with `opts`.
    ///
    /// # Safety
    /// Each input address must be readable for its registered size at this point of `stream`.
    /// `opts` as for `submit`, except `layers` and `width`, which are the program's.
    pub unsafe fn run_program(&self, id: usize, inputs: &[u64], stream: StreamHandle, opts: DeferredOptions) -> Result<()> {
        let programs = self.programs.lock();
        let p = programs
            .get(id)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::InvalidArgument(format!("unknown program {id} (cleared, or never registered)")))?;
        if inputs.len() != p.inputs.len() || inputs.contains(&0) {
            return Err(Error::InvalidArgument(format!(
                "program {id} takes {} non-null input addresses, got {:?}",
                p.inputs.len(),
                inputs
            )));
        }
        let dev = &self.device;
        dev.bind_thread()?;
        dev.stream_wait_event(stream, p.done)?;
        for (&(dst, n), &src) in p.inputs.iter().zip(inputs) {
            // SAFETY: registered buffer (valid until cleared) and the caller's input.
            unsafe { dev.copy_on_device_async(dst, src, n, stream)? };
        }
        dev.record_event(p.ready, stream)?;
        dev.stream_wait_event(p.stream, p.ready)?;
        if p.exec != 0 {
            // SAFETY: registered as live until cleared.
            unsafe { dev.launch_graph(p.exec, p.stream)? };
        }
        dev.record_event(p.done, p.stream)?;
        let sub = DeferredOptions { layers: p.layers.clone(), width: p.width, ..opts };
        // SAFETY: the ids buffer is registered; it is written only by the program on its stream.
        unsafe { self.submit(p.ids, p.stream, sub) }
    }

    /// Forget every program, after their last launches completed (before their graphs are freed).
    pub fn clear_programs(&self) {
        let _ = self.device.bind_thread();
        // slots are emptied, not removed: a stale id never names a newer program
        for p in self.programs.lock().iter_mut().filter_map(Option::take) {
            let _ = self.device.event_synchronize(p.done);
            self.device.destroy_event(p.ready);
            self.device.destroy_event(p.done);
        }
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

    /// The remembered prediction of `generation` for `layer` (sorted, distinct), once handled.
    pub fn predicted(&self, generation: i64, layer: i64) -> Option<Vec<i64>> {
        let p = self.state.progress.lock();
        if p.predicted_generation != Some(generation) {
            return None;
        }
        p.predicted.get(&layer).cloned()
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

    /// Handle what was submitted, stop the thread and free the staging memory. Idempotent; later
    /// `submit`s fail with a Closed error.
    pub fn shutdown(&self) {
        self.shut.store(true, Ordering::Release);
        self.clear_programs();
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
        match self.device.create_event(false) {
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

/// Wait for `event` without spinning a core for the whole step (a blocking event synchronize
/// busy-waits on CUDA): poll, sleeping a little longer each time, up to 100 us between polls.
fn wait_politely(device: &SharedDevice, event: EventHandle) -> Result<()> {
    let mut nap = Duration::from_micros(5);
    while !device.event_done(event)? {
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_micros(100));
    }
    Ok(())
}

/// Read one request's ids (after its event) and act on them; returns the experts queued.
fn handle(req: &Request, cache: &SlotCache, device: &SharedDevice, state: &State) -> Result<usize> {
    wait_politely(device, req.staging.event)?;
    let o = &req.opts;
    // SAFETY: the copy into the staging buffer has landed (event above); it holds `nbytes` bytes
    // and the allocation is 8-byte aligned (page-aligned host or pinned memory).
    let ids = unsafe { std::slice::from_raw_parts(req.staging.addr as *const i64, req.nbytes / 8) };
    let mut rows: Vec<(i64, Vec<i64>)> = o
        .layers
        .iter()
        .zip(ids.chunks_exact(o.width))
        .map(|(&layer, row)| {
            let mut experts: Vec<i64> = row.iter().copied().filter(|&e| !o.routed || e >= 0).collect();
            experts.sort_unstable();
            experts.dedup();
            (layer, experts)
        })
        .collect();
    if o.remember {
        let mut p = state.progress.lock();
        p.predicted_generation = Some(o.generation);
        p.predicted = rows.iter().cloned().collect();
    }
    if o.exclude_predicted {
        let p = state.progress.lock();
        if p.predicted_generation == Some(o.generation) {
            for (layer, experts) in rows.iter_mut() {
                if let Some(known) = p.predicted.get(layer) {
                    experts.retain(|e| known.binary_search(e).is_err());
                }
            }
        }
    }
    if o.future || o.skip_routed {
        // row i is acquire call `acquires_at + i`; those already made need nothing any more
        let routed = cache.acquire_count().saturating_sub(req.acquires_at) as usize;
        rows.drain(..routed.min(rows.len()));
        if o.future {
            cache.set_future(&rows, 0)?;
        }
    }
    let mut queued = 0;
    for (layer, experts) in &rows {
        if o.routed {
            queued += cache.note_routed(*layer, experts)?;
        } else if !experts.is_empty() {
            queued += cache.prefetch(*layer, experts, o.demand, o.generation)?;
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
    fn prediction_rows_are_prefetched_remembered_and_corrections_exclude_them() {
        let c = cache(3, 8, 16);
        let d = DeferredPrefetcher::new(c.clone());
        // three layers, two tokens x two experts each, with a duplicate in layer 1
        let ids = [1, 2, 2, 3, 0, 5, 5, 0, 7, 6, 7, 6];
        let opts = DeferredOptions { layers: vec![0, 1, 2], width: 4, generation: 3, future: true, remember: true, ..Default::default() };
        submit(&d, &ids, opts).unwrap();
        assert!(d.wait_idle(Some(Duration::from_secs(10))));
        c.synchronize().unwrap();
        assert_eq!(d.predicted(3, 0), Some(vec![1, 2, 3]));
        assert_eq!(d.predicted(3, 1), Some(vec![0, 5]));
        assert_eq!(d.predicted(3, 2), Some(vec![6, 7]));
        assert_eq!(d.predicted(2, 0), None); // another generation
        assert_eq!(resident(&c), vec![(0, 1), (0, 2), (0, 3), (1, 0), (1, 5), (2, 6), (2, 7)]);
        // a correction of layer 2 with one expert already predicted queues only the new one
        let fix = [7, 4];
        let opts = DeferredOptions { layers: vec![2], width: 2, generation: 3, demand: true, exclude_predicted: true, ..Default::default() };
        submit(&d, &fix, opts).unwrap();
        assert!(d.wait_idle(Some(Duration::from_secs(10))));
        c.synchronize().unwrap();
        assert!(resident(&c).contains(&(2, 4)));
        let (submitted, handled, queued) = d.counts();
        assert_eq!((submitted, handled, queued), (2, 2, 8));
        assert_eq!(d.take_error(), None);
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
            let r = unsafe { d.register_program(0, vec![], good.as_ptr() as u64, vec![0], width, 0) };
            assert!(matches!(r, Err(Error::InvalidArgument(_))));
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
                        let ids = [(t + i) % 16, (t * 3 + i) % 16];
                        let layer = (t + i) % 4;
                        let opts = DeferredOptions { layers: vec![layer], width: 2, generation: i, remember: i % 7 == 0, exclude_predicted: i % 3 == 0, ..Default::default() };
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
    fn programs_copy_their_inputs_and_prefetch_their_ids() {
        let c = cache(2, 8, 8);
        let d = DeferredPrefetcher::new(c.clone());
        // host backend: no graph; the "program" output is a buffer the test fills
        let mut input = vec![0u8; 16];
        let out: Vec<i64> = vec![3, 5];
        let id = unsafe { d.register_program(0, vec![(input.as_mut_ptr() as u64, 16)], out.as_ptr() as u64, vec![1], 2, 0) }.unwrap();
        let src = [7u8; 16];
        let opts = DeferredOptions { generation: 2, remember: true, ..Default::default() };
        unsafe { d.run_program(id, &[src.as_ptr() as u64], 0, opts.clone()) }.unwrap();
        assert!(d.wait_idle(Some(Duration::from_secs(10))));
        assert_eq!(input, vec![7u8; 16]);
        assert_eq!(d.predicted(2, 1), Some(vec![3, 5]));
        c.synchronize().unwrap();
        assert_eq!(resident(&c), vec![(1, 3), (1, 5)]);
        assert!(unsafe { d.run_program(id, &[], 0, opts.clone()) }.is_err()); // wrong input count
        assert!(unsafe { d.run_program(id, &[0], 0, opts.clone()) }.is_err()); // null input
        assert!(unsafe { d.run_program(id + 1, &[1], 0, opts.clone()) }.is_err()); // unknown
        assert!(unsafe { d.register_program(9, vec![], out.as_ptr() as u64, vec![0], 2, 0) }.is_err()); // graph on host
        assert!(unsafe { d.register_program(0, vec![], out.as_ptr() as u64, vec![], 2, 0) }.is_err());
        d.clear_programs();
        assert!(unsafe { d.run_program(id, &[src.as_ptr() as u64], 0, opts) }.is_err()); // cleared
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
