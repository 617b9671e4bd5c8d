//! The prefetch queue: two lock-free bounded lanes (demand popped before speculative),
//! generation-based cancellation, and the copy-worker threads that serve it. Knows nothing about
//! slots or copies: workers call a handler per request.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use crossbeam_utils::sync::{Parker, Unparker};
use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::policy::Key;

/// Which lane a prefetch goes to: demand (popped first: loads a caller is about to wait for, and
/// corrections) or speculative (predictions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Lane {
    Demand,
    #[default]
    Speculative,
}

impl Lane {
    /// The lane a `priority` name says: "demand" or "prefetch".
    pub fn parse(priority: &str) -> Result<Self> {
        match priority {
            "demand" => Ok(Lane::Demand),
            "prefetch" => Ok(Lane::Speculative),
            other => Err(Error::InvalidArgument(format!("priority must be \"demand\" or \"prefetch\", got {other:?}"))),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub key: Key,
    pub generation: u64,
    pub demand: bool,
}

/// Generation of the load of an expert a decode step already read from the pool (a table
/// visit's miss): not a prediction, so no newer forward cancels it.
pub const ROUTED_MISS: u64 = u64::MAX;

pub struct PrefetchQueue {
    demand: ArrayQueue<Request>,
    speculative: ArrayQueue<Request>,
    cancel_below: AtomicU64,
    /// Pushed and not yet fully handled (queued or in a worker's hands).
    pending: AtomicUsize,
    idle: Mutex<()>,
    idle_cv: Condvar,
    shutdown: AtomicBool,
    unparkers: Mutex<Vec<Unparker>>,
}

/// Most requests one lane holds (the lanes are allocated at full capacity up front).
pub const MAX_QUEUE_CAPACITY: usize = 1 << 20;

impl PrefetchQueue {
    /// `capacity` per lane, in 1..=MAX_QUEUE_CAPACITY.
    pub fn new(capacity: usize) -> Result<Self> {
        if !(1..=MAX_QUEUE_CAPACITY).contains(&capacity) {
            return Err(Error::InvalidArgument(format!(
                "queue_capacity must be in 1..={MAX_QUEUE_CAPACITY}, got {capacity}"
            )));
        }
        Ok(Self {
            demand: ArrayQueue::new(capacity),
            speculative: ArrayQueue::new(capacity),
            cancel_below: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            idle: Mutex::new(()),
            idle_cv: Condvar::new(),
            shutdown: AtomicBool::new(false),
            unparkers: Mutex::new(Vec::new()),
        })
    }

    /// Queue a request; false when its lane is full (the caller counts it as dropped).
    pub fn push(&self, req: Request) -> bool {
        self.pending.fetch_add(1, Ordering::AcqRel);
        let lane = if req.demand { &self.demand } else { &self.speculative };
        if lane.push(req).is_err() {
            self.done();
            return false;
        }
        true
    }

    /// Demand lane first.
    pub fn pop(&self) -> Option<Request> {
        self.demand.pop().or_else(|| self.speculative.pop())
    }

    pub fn len(&self) -> usize {
        self.demand.len() + self.speculative.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_cancelled(&self, req: &Request) -> bool {
        req.generation < self.cancel_below.load(Ordering::Acquire)
    }

    /// Requests with a generation below `generation` are discarded when popped.
    pub fn cancel_before(&self, generation: u64) {
        self.cancel_below.fetch_max(generation, Ordering::AcqRel);
    }

    /// Mark one pushed request as fully handled.
    pub fn done(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _g = self.idle.lock();
            self.idle_cv.notify_all();
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Block until every pushed request has been handled.
    pub fn wait_idle(&self) {
        let mut g = self.idle.lock();
        while self.pending.load(Ordering::Acquire) != 0 {
            // Timed wait: `done` may notify between our check and the wait.
            self.idle_cv.wait_for(&mut g, Duration::from_millis(5));
        }
    }

    pub fn wake_workers(&self) {
        for u in self.unparkers.lock().iter() {
            u.unpark();
        }
    }

    pub fn is_shut_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }
}

/// Handles one request (must not panic; a panic is caught and the request counted as handled).
pub type Handler = Arc<dyn Fn(Request) + Send + Sync>;

/// Copy-worker threads. Dropping (or `shutdown`) stops and joins them.
pub struct Workers {
    queue: Arc<PrefetchQueue>,
    handles: Vec<JoinHandle<()>>,
}

/// Serve one request with panics contained (no panic may escape a worker or reach Python).
pub fn serve(queue: &PrefetchQueue, handler: &Handler, req: Request) {
    let _ = catch_unwind(AssertUnwindSafe(|| handler(req)));
    queue.done();
}

impl Workers {
    /// Start `n` workers sharing one handler.
    pub fn spawn(
        n: usize,
        queue: Arc<PrefetchQueue>,
        handler: Handler,
        init: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<Self> {
        Self::spawn_indexed(n, queue, Arc::new(move |_| handler.clone()), init)
    }

    /// Start `n` workers; worker `i` serves with `handler_for(i)` (e.g. its own copy stream)
    /// after running `init` once (e.g. to make a CUDA context current in the thread).
    pub fn spawn_indexed(
        n: usize,
        queue: Arc<PrefetchQueue>,
        handler_for: Arc<dyn Fn(usize) -> Handler + Send + Sync>,
        init: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<Self> {
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let parker = Parker::new();
            queue.unparkers.lock().push(parker.unparker().clone());
            let q = queue.clone();
            let h = handler_for(i);
            let init = init.clone();
            let spawned = std::thread::Builder::new().name(format!("sida-copy-{i}")).spawn(move || {
                let _ = catch_unwind(AssertUnwindSafe(|| init()));
                while !q.is_shut_down() {
                    match q.pop() {
                        Some(req) => serve(&q, &h, req),
                        // The timeout only bounds a missed wake-up; pushes unpark us.
                        None => parker.park_timeout(Duration::from_millis(50)),
                    }
                }
            });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    let mut w = Self { queue, handles };
                    w.shutdown();
                    return Err(e);
                }
            }
        }
        Ok(Self { queue, handles })
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Stop and join every worker (requests still queued stay queued). Idempotent.
    pub fn shutdown(&mut self) {
        self.queue.shutdown.store(true, Ordering::Release);
        self.queue.wake_workers();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn req(e: u64, generation: u64, demand: bool) -> Request {
        Request { key: (0, e), generation, demand }
    }

    #[test]
    fn capacity_is_bounded() {
        assert!(matches!(PrefetchQueue::new(0), Err(Error::InvalidArgument(_))));
        assert!(matches!(PrefetchQueue::new(MAX_QUEUE_CAPACITY + 1), Err(Error::InvalidArgument(_))));
        assert!(PrefetchQueue::new(MAX_QUEUE_CAPACITY).is_ok());
    }

    #[test]
    fn demand_lane_overtakes_speculative() {
        let q = PrefetchQueue::new(8).unwrap();
        assert!(q.push(req(1, 0, false)));
        assert!(q.push(req(2, 0, true)));
        assert_eq!(q.pop().unwrap().key, (0, 2));
        assert_eq!(q.pop().unwrap().key, (0, 1));
        assert!(q.pop().is_none());
    }

    #[test]
    fn full_lane_rejects_and_keeps_pending_exact() {
        let q = PrefetchQueue::new(2).unwrap();
        assert!(q.push(req(1, 0, false)));
        assert!(q.push(req(2, 0, false)));
        assert!(!q.push(req(3, 0, false)));
        assert!(q.push(req(3, 0, true)));
        assert_eq!(q.pending(), 3);
        while q.pop().is_some() {
            q.done();
        }
        assert_eq!(q.pending(), 0);
        q.wait_idle();
    }

    #[test]
    fn cancellation_by_generation() {
        let q = PrefetchQueue::new(4).unwrap();
        q.cancel_before(5);
        assert!(q.is_cancelled(&req(0, 4, false)));
        assert!(!q.is_cancelled(&req(0, 5, false)));
        q.cancel_before(3); // never moves backwards
        assert!(q.is_cancelled(&req(0, 4, false)));
    }

    #[test]
    fn workers_serve_every_request_exactly_once_under_contention() {
        let q = Arc::new(PrefetchQueue::new(64).unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let handler: Handler = Arc::new(move |r: Request| {
            if r.key.1 % 97 == 0 {
                panic!("contained");
            }
            s2.lock().push(r.key.1);
        });
        let mut w = Workers::spawn(3, q.clone(), handler, Arc::new(|| {})).unwrap();
        let producers: Vec<_> = (0..4u64)
            .map(|p| {
                let q = q.clone();
                std::thread::spawn(move || {
                    let mut rejected = 0u64;
                    for i in 0..5000u64 {
                        let e = p * 1_000_000 + i;
                        while !q.push(req(e, 0, i % 3 == 0)) {
                            rejected += 1;
                            std::thread::yield_now();
                        }
                        q.wake_workers();
                    }
                    rejected
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        q.wait_idle();
        w.shutdown();
        let seen = seen.lock();
        let unique: HashSet<u64> = seen.iter().copied().collect();
        assert_eq!(unique.len(), seen.len(), "a request was served twice");
        let expected = (0..4u64).flat_map(|p| (0..5000u64).map(move |i| p * 1_000_000 + i)).filter(|e| e % 97 != 0).count();
        assert_eq!(seen.len(), expected, "a request was lost");
    }
}
