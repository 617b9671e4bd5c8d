//! Device backends behind one trait: where slots live and how bytes reach them.
//! `Host` keeps slots in host memory and copies with memcpy (CPU-only machines, CI): events and
//! streams are no-ops there, so the very same cache and queue code runs everywhere.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Host,
    Cuda,
}

impl DeviceKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Cuda => "cuda",
        }
    }
}

/// Opaque handles: a CUstream / CUevent on CUDA, a counter value on the host.
pub type StreamHandle = u64;
pub type EventHandle = u64;

/// What an event is for, which decides how it is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Ordering and completion queries only (timing disabled: cheaper to record).
    Plain,
    /// Usable with `elapsed_ms`.
    Timing,
    /// A thread waits on it with `event_synchronize` for a whole step: the wait sleeps instead
    /// of spinning a core (CUDA's blocking-sync events).
    BlockingWait,
}

/// Operations the cache needs from a device. Addresses: `usize` for host memory, `u64` for slot
/// memory (a CUdeviceptr on CUDA, a host address on the host backend).
pub trait Device: Send + Sync {
    fn kind(&self) -> DeviceKind;
    fn ordinal(&self) -> i32;
    /// Make the device usable from the calling thread (CUDA: set the primary context current).
    fn bind_thread(&self) -> Result<()>;
    /// Zeroed host memory for pools: page-locked on CUDA, page-aligned anonymous mmap on the host.
    fn alloc_pool(&self, bytes: usize) -> Result<usize>;
    fn free_pool(&self, addr: usize, bytes: usize);
    /// Slot memory owned by a cache.
    fn alloc_slots(&self, bytes: usize) -> Result<u64>;
    fn free_slots(&self, addr: u64, bytes: usize);
    fn create_stream(&self, high_priority: bool) -> Result<StreamHandle>;
    fn destroy_stream(&self, stream: StreamHandle);
    fn create_event(&self, kind: EventKind) -> Result<EventHandle>;
    fn destroy_event(&self, event: EventHandle);
    /// Queue a host-to-slot copy on `stream` (the host backend copies before returning).
    ///
    /// # Safety
    /// `src..src+n` must be readable host memory and `dst..dst+n` writable slot memory, both
    /// staying valid until the copy has landed.
    unsafe fn copy_to_slot(&self, dst: u64, src: usize, n: usize, stream: StreamHandle) -> Result<()>;
    /// Synchronous slot-to-host copy (after every copy into the slot has landed).
    ///
    /// # Safety
    /// `dst..dst+n` must be writable host memory, `src..src+n` readable slot memory.
    unsafe fn copy_from_slot(&self, dst: usize, src: u64, n: usize) -> Result<()>;
    /// Queue a device-to-host copy on `stream` (the host backend: `src` is host memory, copied
    /// before returning).
    ///
    /// # Safety
    /// `dst..dst+n` must be writable host memory (page-locked on CUDA) and `src..src+n` readable
    /// device memory, both staying valid until the copy has landed.
    unsafe fn copy_to_host_async(&self, dst: usize, src: u64, n: usize, stream: StreamHandle) -> Result<()>;
    fn record_event(&self, event: EventHandle, stream: StreamHandle) -> Result<()>;
    fn stream_wait_event(&self, stream: StreamHandle, event: EventHandle) -> Result<()>;
    fn event_synchronize(&self, event: EventHandle) -> Result<()>;
    /// True when all work captured by the event's last record has completed (or it was never
    /// recorded); false while it is still pending. Never blocks.
    fn event_done(&self, event: EventHandle) -> Result<bool>;
    /// Some(ms) between two completed timing events; None while either is still pending.
    fn elapsed_ms(&self, start: EventHandle, end: EventHandle) -> Result<Option<f32>>;
    fn stream_synchronize(&self, stream: StreamHandle) -> Result<()>;
    /// True when copies complete before `copy_to_slot` returns (host backend).
    fn copies_are_synchronous(&self) -> bool;
    /// Queue a write of the 64-bit `value` to `addr` on `stream`, ordered after the work queued
    /// there before it (the host backend stores it before returning).
    ///
    /// # Safety
    /// `addr` must be 8-byte aligned memory (device memory on CUDA) valid until the write has run.
    unsafe fn write_value64(&self, addr: u64, value: u64, stream: StreamHandle) -> Result<()>;
}

pub type SharedDevice = Arc<dyn Device>;

/// Host-memory backend (memcpy). Handles are counters so that tests see distinct values.
pub struct HostDevice {
    next_handle: AtomicU64,
}

const HOST_ALIGN: usize = 4096;

impl HostDevice {
    pub fn new() -> Self {
        Self { next_handle: AtomicU64::new(1) }
    }

    /// Anonymous private mapping: zeroed, page-aligned, exactly `bytes` long (rounded to pages by
    /// the kernel only), and returned to the OS on `free` -- the global allocator would keep large
    /// freed blocks in its heap once glibc's dynamic mmap threshold has grown.
    fn alloc(bytes: usize) -> Result<usize> {
        if bytes == 0 {
            return Ok(HOST_ALIGN); // dangling but aligned; never dereferenced
        }
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::OutOfMemory(format!(
                "out of host memory allocating {bytes} bytes ({})",
                std::io::Error::last_os_error()
            )));
        }
        Ok(p as usize)
    }

    fn free(addr: usize, bytes: usize) {
        if bytes == 0 {
            return;
        }
        // SAFETY: `addr`/`bytes` describe a mapping made by `alloc` and not yet unmapped.
        unsafe { libc::munmap(addr as *mut libc::c_void, bytes) };
    }
}

impl Default for HostDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl Device for HostDevice {
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
        Self::alloc(bytes)
    }
    fn free_pool(&self, addr: usize, bytes: usize) {
        Self::free(addr, bytes)
    }
    fn alloc_slots(&self, bytes: usize) -> Result<u64> {
        Self::alloc(bytes).map(|a| a as u64)
    }
    fn free_slots(&self, addr: u64, bytes: usize) {
        Self::free(addr as usize, bytes)
    }
    fn create_stream(&self, _high_priority: bool) -> Result<StreamHandle> {
        Ok(self.next_handle.fetch_add(1, Ordering::Relaxed))
    }
    fn destroy_stream(&self, _stream: StreamHandle) {}
    fn create_event(&self, _kind: EventKind) -> Result<EventHandle> {
        Ok(self.next_handle.fetch_add(1, Ordering::Relaxed))
    }
    fn destroy_event(&self, _event: EventHandle) {}
    unsafe fn copy_to_slot(&self, dst: u64, src: usize, n: usize, _stream: StreamHandle) -> Result<()> {
        // SAFETY: the caller guarantees both ranges; pool and slot memory never overlap.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as usize as *mut u8, n) };
        Ok(())
    }
    unsafe fn copy_from_slot(&self, dst: usize, src: u64, n: usize) -> Result<()> {
        unsafe { std::ptr::copy_nonoverlapping(src as usize as *const u8, dst as *mut u8, n) };
        Ok(())
    }
    unsafe fn copy_to_host_async(&self, dst: usize, src: u64, n: usize, _stream: StreamHandle) -> Result<()> {
        // SAFETY: the caller guarantees both ranges.
        unsafe { std::ptr::copy_nonoverlapping(src as usize as *const u8, dst as *mut u8, n) };
        Ok(())
    }
    fn record_event(&self, _event: EventHandle, _stream: StreamHandle) -> Result<()> {
        Ok(())
    }
    fn stream_wait_event(&self, _stream: StreamHandle, _event: EventHandle) -> Result<()> {
        Ok(())
    }
    fn event_synchronize(&self, _event: EventHandle) -> Result<()> {
        Ok(())
    }
    fn event_done(&self, _event: EventHandle) -> Result<bool> {
        Ok(true) // copies complete before `copy_to_slot` returns
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
    unsafe fn write_value64(&self, addr: u64, value: u64, _stream: StreamHandle) -> Result<()> {
        if addr == 0 || addr % 8 != 0 {
            return Err(Error::InvalidArgument(format!("write_value64 needs an 8-byte aligned address, got {addr:#x}")));
        }
        // SAFETY: the caller guarantees an aligned, live 8-byte location; atomic so that a reader
        // thread sees either the old or the new address, never a torn one.
        unsafe { (*(addr as usize as *const AtomicU64)).store(value, Ordering::SeqCst) };
        Ok(())
    }
}

/// In a test device wrapping a `host: HostDevice` field, the memory and copy operations forwarded
/// to it (the test device changes only what it observes: events, streams, kinds).
#[cfg(test)]
macro_rules! forward_memory_to_host {
    () => {
        fn alloc_pool(&self, bytes: usize) -> crate::error::Result<usize> {
            self.host.alloc_pool(bytes)
        }
        fn free_pool(&self, addr: usize, bytes: usize) {
            self.host.free_pool(addr, bytes)
        }
        fn alloc_slots(&self, bytes: usize) -> crate::error::Result<u64> {
            self.host.alloc_slots(bytes)
        }
        fn free_slots(&self, addr: u64, bytes: usize) {
            self.host.free_slots(addr, bytes)
        }
        fn create_stream(&self, high_priority: bool) -> crate::error::Result<crate::device::StreamHandle> {
            self.host.create_stream(high_priority)
        }
        unsafe fn copy_to_slot(&self, dst: u64, src: usize, n: usize, stream: crate::device::StreamHandle) -> crate::error::Result<()> {
            unsafe { self.host.copy_to_slot(dst, src, n, stream) }
        }
        unsafe fn copy_from_slot(&self, dst: usize, src: u64, n: usize) -> crate::error::Result<()> {
            unsafe { self.host.copy_from_slot(dst, src, n) }
        }
        unsafe fn copy_to_host_async(&self, dst: usize, src: u64, n: usize, stream: crate::device::StreamHandle) -> crate::error::Result<()> {
            unsafe { self.host.copy_to_host_async(dst, src, n, stream) }
        }
    };
}
#[cfg(test)]
pub(crate) use forward_memory_to_host;

/// Open a backend by name: "host", "cuda" (error without a usable driver/device) or "auto".
pub fn open(kind: &str, ordinal: i64) -> Result<SharedDevice> {
    if ordinal < 0 {
        return Err(Error::InvalidArgument(format!("device must be >= 0, got {ordinal}")));
    }
    match kind {
        "host" => Ok(Arc::new(HostDevice::new())),
        "cuda" => Ok(Arc::new(crate::cuda_device::CudaDevice::open(ordinal as i32)?)),
        "auto" => match crate::cuda_device::CudaDevice::open(ordinal as i32) {
            Ok(d) => Ok(Arc::new(d)),
            Err(_) => Ok(Arc::new(HostDevice::new())),
        },
        other => Err(Error::InvalidArgument(format!(
            "unknown backend kind {other:?}; allowed: \"auto\", \"cuda\", \"host\""
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_alloc_is_zeroed_aligned_and_copies() {
        let d = HostDevice::new();
        let a = d.alloc_pool(10_000).unwrap();
        assert_eq!(a % 4096, 0);
        let s = d.alloc_slots(10_000).unwrap();
        let src = unsafe { std::slice::from_raw_parts_mut(a as *mut u8, 10_000) };
        assert!(src.iter().all(|&b| b == 0));
        src[9_999] = 7;
        unsafe { d.copy_to_slot(s, a, 10_000, 0).unwrap() };
        let mut back = vec![0u8; 10_000];
        unsafe { d.copy_from_slot(back.as_mut_ptr() as usize, s, 10_000).unwrap() };
        assert_eq!(back[9_999], 7);
        d.free_pool(a, 10_000);
        d.free_slots(s, 10_000);
    }

    #[test]
    fn open_validates_kind_and_ordinal() {
        assert!(matches!(open("tpu", 0), Err(Error::InvalidArgument(_))));
        assert!(matches!(open("host", -1), Err(Error::InvalidArgument(_))));
        assert_eq!(open("host", 0).unwrap().kind(), DeviceKind::Host);
        assert!(open("auto", 0).is_ok());
    }
}
