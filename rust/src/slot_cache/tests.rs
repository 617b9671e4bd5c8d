use super::*;
use crate::prefetch::Lane;
use super::copy_timing::{MAX_PENDING_WAITS, RESOLVE_WAITS_AT};
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
                let n = c.prefetch(generation % 2, &experts, if generation % 3 == 0 { Lane::Demand } else { Lane::Speculative }, generation).unwrap();
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
    crate::device::forward_memory_to_host!();
    fn kind(&self) -> DeviceKind {
        DeviceKind::Host
    }
    fn ordinal(&self) -> i32 {
        0
    }
    fn bind_thread(&self) -> Result<()> {
        Ok(())
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
fn stream_waits_are_timed_while_any_probe_is_open() {
    let pool = filled_pool(1, 4);
    let c = cache(&pool, 2, 0);
    c.add_stream_wait_probe().unwrap();
    c.add_stream_wait_probe().unwrap();
    c.remove_stream_wait_probe();
    assert!(c.measure_stream_waits(), "one probe is still open");
    c.remove_stream_wait_probe();
    assert!(!c.measure_stream_waits());
    c.remove_stream_wait_probe(); // one close too many changes nothing
    assert!(!c.measure_stream_waits());
    c.add_stream_wait_probe().unwrap();
    assert!(c.measure_stream_waits());
}

#[test]
fn host_backend_never_times_a_stream_wait() {
    let pool = filled_pool(1, 4);
    let c = cache(&pool, 2, 0);
    assert!(!c.measure_stream_waits());
    c.add_stream_wait_probe().unwrap();
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
    assert!(matches!(c.add_stream_wait_probe(), Err(Error::Closed(_))));
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

    c.add_stream_wait_probe().unwrap();
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
    c.remove_stream_wait_probe();
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
    c.add_stream_wait_probe().unwrap();
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
        c.add_stream_wait_probe().unwrap();
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
        c.prefetch(0, &[0, 1, 2, 3], Lane::Speculative, 0).unwrap();
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
