//! The expert table: one 64-bit address per pool key saying where that expert's bytes are right
//! now -- its GPU slot once a copy into it has landed, otherwise its record in the pinned pool
//! (read through its unified address). Decode kernels read weights through it, so they never
//! wait for a copy and never need the host to decide anything.
//!
//! Invariant: every entry points at complete bytes of its expert at every moment.
//! - `publish` (after a copy into a slot) is written on the copy's own stream after the copy, so
//!   the entry flips only once the bytes have landed.
//! - `unpublish` (before a slot is overwritten) points the entry back at the pool, ordered on the
//!   reader stream, and the overwrite waits until no read that may have seen the old address can
//!   still be running: on CUDA an event recorded on the reader stream after the write, on the host
//!   backend the reads bracketed by `begin_read` / `end_read` that began before the write.
//! - `switch_reader_stream` (before reads are queued on another stream) makes the new reader
//!   stream wait for everything queued on the old one, so a fence recorded on the new stream also
//!   follows the reads still queued on the old; no unpublish runs between the two (a read-write
//!   lock), so each one's write and fence are on one reader stream, and reads queued after the
//!   switch see every write made before it.
//!
//! Owner: the `SlotCache` that attached it; entries change only through these two calls, made by
//! the thread loading the slot under the slot's event lock.

use std::collections::BTreeSet;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::device::{DeviceKind, EventHandle, StreamHandle};
use crate::error::{Error, Result};
use crate::policy::Key;
use crate::pool::ExpertPool;

/// Reads in progress on the host backend, by ticket (tickets grow in the order reads begin).
#[derive(Default)]
struct Readers {
    next: u64,
    active: BTreeSet<u64>,
}

pub struct ExpertTable {
    /// `entries` u64 values at `addr` (device memory on CUDA, host memory on the host backend).
    addr: u64,
    entries: usize,
    /// Where table reads are queued (CUDA); written by `switch_reader_stream`, held by `unpublish`.
    reader_stream: RwLock<StreamHandle>,
    readers: Mutex<Readers>,
    read_ended: Condvar,
}

impl ExpertTable {
    /// Bind the table at `addr` (one entry per pool key, in pool key order) and point every entry
    /// at its pool record.
    ///
    /// # Safety
    /// `addr..addr + 8 * pool.keys().len()` must stay valid, writable memory of the pool's device
    /// until the cache is closed, and no one else may write it.
    pub unsafe fn attach(pool: &ExpertPool, addr: u64, reader_stream: StreamHandle) -> Result<Self> {
        if addr == 0 || addr % 8 != 0 {
            return Err(Error::InvalidArgument(format!("the expert table needs a non-null 8-byte aligned address, got {addr:#x}")));
        }
        let t = Self {
            addr,
            entries: pool.keys().len(),
            reader_stream: RwLock::new(reader_stream),
            readers: Mutex::new(Readers::default()),
            read_ended: Condvar::new(),
        };
        let dev = pool.device();
        for &key in pool.keys() {
            // SAFETY: in range by construction; the caller guarantees the memory.
            unsafe { dev.write_value64(t.entry(pool, key)?, pool.record_addr(key)? as u64, reader_stream)? };
        }
        if dev.kind() == DeviceKind::Cuda {
            dev.stream_synchronize(reader_stream)?;
        }
        Ok(t)
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn entries(&self) -> usize {
        self.entries
    }

    pub fn reader_stream(&self) -> StreamHandle {
        *self.reader_stream.read()
    }

    /// Table reads are queued on `stream` from now on. On CUDA, if that is another stream, `stream`
    /// first waits for the old reader stream's work through `event` (recorded there now; free
    /// to reuse once this returns). Returns whether the stream changed.
    pub fn switch_reader_stream(&self, pool: &ExpertPool, stream: StreamHandle, event: EventHandle) -> Result<bool> {
        let mut reader = self.reader_stream.write();
        if *reader == stream {
            return Ok(false);
        }
        let dev = pool.device();
        if dev.kind() == DeviceKind::Cuda {
            dev.record_event(event, *reader)?;
            dev.stream_wait_event(stream, event)?;
        }
        *reader = stream;
        Ok(true)
    }

    fn entry(&self, pool: &ExpertPool, key: Key) -> Result<u64> {
        let idx = pool.check_key(key)?;
        Ok(self.addr + 8 * idx as u64)
    }

    /// Point `key`'s entry at `slot_addr`, on `stream` after the copy queued there.
    pub fn publish(&self, pool: &ExpertPool, key: Key, slot_addr: u64, stream: StreamHandle) -> Result<()> {
        let entry = self.entry(pool, key)?;
        // SAFETY: entry inside the attached table.
        unsafe { pool.device().write_value64(entry, slot_addr, stream) }
    }

    /// Point `key`'s entry back at its pool record; returns once an overwrite of the slot it left
    /// may be ordered: on CUDA `copy_stream` is made to wait on `fence`, recorded on the reader
    /// stream after the write (which itself waits on `old_ready`, the landing of the copy that
    /// published the slot); on the host backend after every read begun before the write ended.
    pub fn unpublish(
        &self,
        pool: &ExpertPool,
        key: Key,
        old_ready: EventHandle,
        fence: EventHandle,
        copy_stream: StreamHandle,
    ) -> Result<()> {
        let dev = pool.device();
        let entry = self.entry(pool, key)?;
        let home = pool.record_addr(key)? as u64;
        if dev.kind() == DeviceKind::Cuda {
            let guard = self.reader_stream.read(); // no switch until the fence is queued
            let reader = *guard;
            dev.stream_wait_event(reader, old_ready)?;
            // SAFETY: entry inside the attached table.
            unsafe { dev.write_value64(entry, home, reader)? };
            dev.record_event(fence, reader)?;
            dev.stream_wait_event(copy_stream, fence)
        } else {
            // SAFETY: entry inside the attached table.
            unsafe { dev.write_value64(entry, home, 0)? };
            self.wait_reads_before_now();
            Ok(())
        }
    }

    /// Host backend: a read of the table (and of the bytes it points at) begins; returns its ticket.
    pub fn begin_read(&self) -> u64 {
        let mut r = self.readers.lock();
        let t = r.next;
        r.next += 1;
        r.active.insert(t);
        t
    }

    pub fn end_read(&self, ticket: u64) -> Result<()> {
        let mut r = self.readers.lock();
        if !r.active.remove(&ticket) {
            return Err(Error::InvalidArgument(format!("table read {ticket} is not in progress (ended twice?)")));
        }
        drop(r);
        self.read_ended.notify_all();
        Ok(())
    }

    pub fn reads_in_progress(&self) -> usize {
        self.readers.lock().active.len()
    }

    /// Block until every read that began before this call has ended (later ones see new entries).
    fn wait_reads_before_now(&self) {
        let mut r = self.readers.lock();
        let horizon = r.next;
        while r.active.first().is_some_and(|&t| t < horizon) {
            self.read_ended.wait(&mut r);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Duration;

    use parking_lot::Mutex;

    use super::*;
    use crate::device::{Device, EventKind, HostDevice, SharedDevice};
    use crate::policy::PolicyKind;
    use crate::slot_cache::{CacheConfig, SlotCache};

    const NBYTES: usize = 1024;

    fn pattern(key: Key) -> u8 {
        (key.0 * 37 + key.1 * 5 + 3) as u8
    }

    fn setup(layers: i64, experts: i64, slots: usize, workers: usize) -> (Arc<ExpertPool>, SlotCache, Box<[u64]>) {
        setup_on(Arc::new(HostDevice::new()), layers, experts, slots, workers)
    }

    fn setup_on(
        device: SharedDevice,
        layers: i64,
        experts: i64,
        slots: usize,
        workers: usize,
    ) -> (Arc<ExpertPool>, SlotCache, Box<[u64]>) {
        let keys: Vec<(i64, i64)> = (0..layers).flat_map(|l| (0..experts).map(move |e| (l, e))).collect();
        let pool = Arc::new(ExpertPool::new(device, &[("w".into(), NBYTES as i64)], &keys, 1 << 20).unwrap());
        for &(l, e) in &keys {
            let data = vec![pattern((l as u64, e as u64)); NBYTES];
            unsafe { pool.write((l as u64, e as u64), "w", data.as_ptr() as usize, NBYTES).unwrap() };
        }
        let cfg = CacheConfig {
            num_slots: slots,
            policy: PolicyKind::Lru,
            slots_addr: None,
            copy_workers: workers,
            queue_capacity: 4096,
            acquire_timeout: Duration::from_secs(30),
        };
        let cache = SlotCache::new(pool.clone(), cfg).unwrap();
        let table = vec![0u64; keys.len()].into_boxed_slice();
        unsafe { cache.attach_expert_table(table.as_ptr() as u64, 0).unwrap() };
        (pool, cache, table)
    }

    fn entry(table: &[u64], idx: usize) -> u64 {
        // the cache's threads store entries atomically
        unsafe { (*(table.as_ptr().add(idx) as *const std::sync::atomic::AtomicU64)).load(std::sync::atomic::Ordering::SeqCst) }
    }

    fn bytes_at(addr: u64) -> &'static [u8] {
        unsafe { std::slice::from_raw_parts(addr as usize as *const u8, NBYTES) }
    }

    /// `steps` decode visits of two experts each over 2 layers x 8 experts, drawn from `seed`, then
    /// every load they queued landed: admissions and evictions through the table.
    fn route_randomly(cache: &SlotCache, seed: u64, steps: usize) {
        let mut seed = seed;
        for _ in 0..steps {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let layer = (seed >> 40) as i64 % 2;
            let e = (seed >> 20) as i64 % 8;
            cache.note_routed(layer, &[e, (e + 1) % 8], None).unwrap();
        }
        cache.synchronize().unwrap();
    }

    #[test]
    fn attach_points_every_entry_at_its_pool_record() {
        let (pool, cache, table) = setup(2, 4, 2, 0);
        for (i, &key) in pool.keys().iter().enumerate() {
            assert_eq!(entry(&table, i), pool.record_addr(key).unwrap() as u64);
        }
        unsafe {
            assert!(cache.attach_expert_table(table.as_ptr() as u64, 0).is_err(), "attached twice");
        }
    }

    #[test]
    fn a_routed_miss_is_loaded_and_published_then_unpublished_on_eviction() {
        let (pool, cache, table) = setup(1, 4, 1, 0);
        assert_eq!(cache.note_routed(0, &[2], None).unwrap(), 1);
        cache.synchronize().unwrap();
        let slot_addr = entry(&table, 2);
        assert_ne!(slot_addr, pool.record_addr((0, 2)).unwrap() as u64, "entry should point at the slot");
        assert_eq!(slot_addr, cache.slots_addr());
        assert!(bytes_at(slot_addr).iter().all(|&b| b == pattern((0, 2))));
        // a hit queues nothing
        assert_eq!(cache.note_routed(0, &[2], None).unwrap(), 0);
        // expert 3 is read in place until it is used more often than 2 (admission) ...
        assert_eq!(cache.note_routed(0, &[3], None).unwrap(), 0);
        assert_eq!(cache.note_routed(0, &[3], None).unwrap(), 0);
        assert_eq!(entry(&table, 3), pool.record_addr((0, 3)).unwrap() as u64);
        // ... then takes the only slot: 2 goes back to the pool before the slot is overwritten
        assert_eq!(cache.note_routed(0, &[3], None).unwrap(), 1);
        cache.synchronize().unwrap();
        assert_eq!(entry(&table, 2), pool.record_addr((0, 2)).unwrap() as u64);
        assert_eq!(entry(&table, 3), slot_addr);
        assert!(bytes_at(slot_addr).iter().all(|&b| b == pattern((0, 3))));
        let stats: std::collections::HashMap<_, _> = cache.stats().into_iter().collect();
        assert_eq!((stats["hits"], stats["misses"], stats["routed_visits"]), (1.0, 4.0, 5.0));
        assert_eq!(stats["routed_declined"], 2.0);
    }

    #[test]
    fn an_eviction_waits_for_reads_that_may_have_seen_the_slot() {
        let (_pool, cache, table) = setup(1, 4, 1, 1);
        cache.note_routed(0, &[0], None).unwrap();
        cache.synchronize().unwrap();
        let cache = Arc::new(cache);
        let ticket = cache.begin_table_read().unwrap();
        let seen = entry(&table, 0);
        assert_eq!(seen, cache.slots_addr());
        // a miss of expert 1 (used more often than 0, so admitted) evicts 0 on the worker thread ...
        assert_eq!(cache.note_routed(0, &[1], None).unwrap(), 0);
        assert_eq!(cache.note_routed(0, &[1], None).unwrap(), 1);
        std::thread::sleep(Duration::from_millis(100));
        // ... which may unpublish but must not overwrite the slot while this read is open
        assert!(bytes_at(seen).iter().all(|&b| b == pattern((0, 0))), "slot overwritten under a read");
        cache.end_table_read(ticket).unwrap();
        cache.synchronize().unwrap();
        assert!(bytes_at(seen).iter().all(|&b| b == pattern((0, 1))));
        assert!(cache.end_table_read(ticket).is_err(), "a read ends once");
    }

    #[test]
    fn readers_always_see_complete_bytes_of_the_expert_they_look_up() {
        let (pool, cache, table) = setup(2, 8, 3, 2);
        let cache = Arc::new(cache);
        let table_addr = table.as_ptr() as usize;
        let stop = Arc::new(AtomicBool::new(false));
        let keys: Vec<Key> = pool.keys().to_vec();
        let started = Arc::new(std::sync::Barrier::new(5));
        let readers: Vec<_> = (0..4)
            .map(|r| {
                let (cache, stop, keys, started) = (cache.clone(), stop.clone(), keys.clone(), started.clone());
                std::thread::spawn(move || {
                    let mut seed = 12345u64 + r;
                    let mut reads = 0u64;
                    started.wait();
                    // every reader keeps reading until the routing is over, and at least a while
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) || reads < 1000 {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let i = (seed >> 33) as usize % keys.len();
                        let t = cache.begin_table_read().unwrap();
                        let addr = unsafe { (*((table_addr + 8 * i) as *const std::sync::atomic::AtomicU64)).load(std::sync::atomic::Ordering::SeqCst) };
                        let want = pattern(keys[i]);
                        assert!(bytes_at(addr).iter().all(|&b| b == want), "torn or foreign bytes for {:?}", keys[i]);
                        cache.end_table_read(t).unwrap();
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        started.wait();
        route_randomly(&cache, 99, 3000);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let total: u64 = readers.into_iter().map(|h| h.join().unwrap()).sum();
        assert!(total > 0);
        // at rest: exactly the resident experts point at their slots, the rest at the pool
        let resident = cache.resident().unwrap();
        assert!(!resident.is_empty());
        for (i, &key) in keys.iter().enumerate() {
            let want = match resident.iter().find(|(k, _)| *k == key) {
                Some(&(_, slot)) => cache.slots_addr() + (slot * NBYTES) as u64,
                None => pool.record_addr(key).unwrap() as u64,
            };
            assert_eq!(entry(&table, i), want, "entry of {key:?}");
        }
        assert_eq!(cache.expert_table_reads_in_progress(), 0);
    }

    /// Stream-ordered operations as a CUDA device would see them, in call order.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Op {
        Record(EventHandle, StreamHandle),
        Wait(StreamHandle, EventHandle),
        Write(StreamHandle),
    }

    /// The host backend's memory and copies, reporting itself as CUDA and logging its
    /// stream-ordered calls: what the table asks of the streams, checked without a GPU.
    struct StreamLog {
        host: HostDevice,
        log: Mutex<Vec<Op>>,
    }

    impl Device for StreamLog {
        crate::device::forward_memory_to_host!();
        fn kind(&self) -> DeviceKind {
            DeviceKind::Cuda
        }
        fn ordinal(&self) -> i32 {
            0
        }
        fn bind_thread(&self) -> Result<()> {
            Ok(())
        }
        fn destroy_stream(&self, _stream: StreamHandle) {}
        fn create_event(&self, kind: EventKind) -> Result<EventHandle> {
            self.host.create_event(kind)
        }
        fn destroy_event(&self, _event: EventHandle) {}
        fn record_event(&self, event: EventHandle, stream: StreamHandle) -> Result<()> {
            self.log.lock().push(Op::Record(event, stream));
            Ok(())
        }
        fn stream_wait_event(&self, stream: StreamHandle, event: EventHandle) -> Result<()> {
            self.log.lock().push(Op::Wait(stream, event));
            Ok(())
        }
        fn event_synchronize(&self, _event: EventHandle) -> Result<()> {
            Ok(())
        }
        fn event_done(&self, _event: EventHandle) -> Result<bool> {
            Ok(true)
        }
        fn elapsed_ms(&self, _start: EventHandle, _end: EventHandle) -> Result<Option<f32>> {
            Ok(None)
        }
        fn stream_synchronize(&self, _stream: StreamHandle) -> Result<()> {
            Ok(())
        }
        fn copies_are_synchronous(&self) -> bool {
            true
        }
        unsafe fn write_value64(&self, addr: u64, value: u64, stream: StreamHandle) -> Result<()> {
            // logged under the same lock as the store: the log's order is the writes' order
            let mut log = self.log.lock();
            unsafe { self.host.write_value64(addr, value, stream)? };
            log.push(Op::Write(stream));
            Ok(())
        }
    }

    fn stream_log() -> Arc<StreamLog> {
        Arc::new(StreamLog { host: HostDevice::new(), log: Mutex::new(Vec::new()) })
    }

    // reader streams of these tests: far from the handles the device hands out (a counter from 1)
    const READERS: [StreamHandle; 3] = [1 << 40, (1 << 40) + 1, (1 << 40) + 2];

    #[test]
    fn a_switched_reader_stream_waits_for_the_old_one_and_takes_the_later_unpublishes() {
        let log = stream_log();
        let (_pool, cache, _table) = setup_on(log.clone(), 1, 4, 1, 0);
        log.log.lock().clear(); // attach's writes
        assert!(cache.switch_reader_stream(READERS[0]).unwrap());
        let ops = std::mem::take(&mut *log.log.lock());
        match ops[..] {
            [Op::Record(e, 0), Op::Wait(s, w)] => assert!(s == READERS[0] && w == e, "{ops:?}"),
            _ => panic!("a switch from stream 0 should record on it and make the new stream wait: {ops:?}"),
        }
        assert!(!cache.switch_reader_stream(READERS[0]).unwrap(), "the same stream is no switch");
        assert!(log.log.lock().is_empty(), "nothing is queued for the same stream");
        // load expert 0, then make expert 1 (used more often) evict it: the unpublish is on the new stream
        cache.note_routed(0, &[0], None).unwrap();
        for _ in 0..3 {
            cache.note_routed(0, &[1], None).unwrap();
        }
        cache.synchronize().unwrap();
        let ops = log.log.lock().clone();
        let writes: Vec<StreamHandle> =
            ops.iter().filter_map(|op| if let Op::Write(s) = *op { Some(s) } else { None }).collect();
        assert!(writes.contains(&READERS[0]), "the eviction should point expert 0 back on the reader stream: {ops:?}");
        let fence = ops.iter().position(|op| matches!(*op, Op::Record(_, s) if s == READERS[0]));
        assert!(fence.is_some(), "a fence should be recorded on the reader stream after the write: {ops:?}");
    }

    #[test]
    fn every_unpublish_stays_on_one_reader_stream_while_another_thread_switches_it() {
        let log = stream_log();
        let (_pool, cache, _table) = setup_on(log.clone(), 2, 8, 3, 2);
        let cache = Arc::new(cache);
        cache.switch_reader_stream(READERS[0]).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let switcher = {
            let (cache, stop) = (cache.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 200 {
                    n += 1;
                    cache.switch_reader_stream(READERS[n % READERS.len()]).unwrap();
                }
                n
            })
        };
        route_randomly(&cache, 7, 3000);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(switcher.join().unwrap() >= 200);
        // replay the log: a switch is a reader stream's wait on an event last recorded on another
        // reader stream; between switches every op an unpublish queues on a reader stream (its
        // wait for the copy that filled the slot, the write, the fence) is on the current reader
        let ops = log.log.lock().clone();
        let is_reader = |s: StreamHandle| READERS.contains(&s);
        let mut recorded_on = std::collections::HashMap::new();
        let mut reader = READERS[0];
        let (mut unpublishes, mut switches) = (0, 0);
        for (i, &op) in ops.iter().enumerate() {
            match op {
                Op::Wait(new, e) if is_reader(new) && recorded_on.get(&e).is_some_and(|&old| is_reader(old) && old != new) => {
                    assert_eq!(recorded_on[&e], reader, "op {i}: a switch away from a stream that was not the reader");
                    reader = new;
                    switches += 1;
                }
                Op::Wait(s, _) | Op::Record(_, s) | Op::Write(s) if is_reader(s) => {
                    assert_eq!(s, reader, "op {i}: {op:?} after the reader became {reader:#x}");
                    unpublishes += matches!(op, Op::Write(_)) as usize;
                }
                _ => {}
            }
            if let Op::Record(e, s) = op {
                recorded_on.insert(e, s);
            }
        }
        assert!(unpublishes > 100 && switches >= 200, "{unpublishes} unpublishes, {switches} switches");
    }
}
