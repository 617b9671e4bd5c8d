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
//!
//! Owner: the `SlotCache` that attached it; entries change only through these two calls, made by
//! the thread loading the slot under the slot's event lock.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};

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
    /// Where decode steps run: table reads are ordered there (CUDA).
    reader_stream: AtomicU64,
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
            reader_stream: AtomicU64::new(reader_stream),
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
        self.reader_stream.load(Ordering::Acquire)
    }

    /// Decode steps now run on `stream` (the caller has made sure no step still runs on the old
    /// one, or that both are ordered).
    pub fn set_reader_stream(&self, stream: StreamHandle) {
        self.reader_stream.store(stream, Ordering::Release);
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
            let reader = self.reader_stream();
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

    use crate::device::HostDevice;
    use crate::policy::{Key, PolicyKind};
    use crate::pool::ExpertPool;
    use crate::slot_cache::{CacheConfig, SlotCache};

    const NBYTES: usize = 1024;

    fn pattern(key: Key) -> u8 {
        (key.0 * 37 + key.1 * 5 + 3) as u8
    }

    fn setup(layers: i64, experts: i64, slots: usize, workers: usize) -> (Arc<ExpertPool>, SlotCache, Box<[u64]>) {
        let keys: Vec<(i64, i64)> = (0..layers).flat_map(|l| (0..experts).map(move |e| (l, e))).collect();
        let pool = Arc::new(ExpertPool::new(Arc::new(HostDevice::new()), &[("w".into(), NBYTES as i64)], &keys, 1 << 20).unwrap());
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
        let mut seed = 99u64;
        for _ in 0..3000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let layer = (seed >> 40) as i64 % 2;
            let e = (seed >> 20) as i64 % 8;
            cache.note_routed(layer, &[e, (e + 1) % 8], None).unwrap();
        }
        cache.synchronize().unwrap();
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
}
