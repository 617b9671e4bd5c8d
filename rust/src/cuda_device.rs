//! The CUDA backend: the device's primary context (shared with PyTorch), pinned pools
//! (cuMemHostAlloc), device slots (cuMemAlloc), non-blocking copy streams and events.

use std::ffi::c_void;

use crate::cuda_driver::*;
use crate::device::{Device, DeviceKind, EventHandle, EventKind, StreamHandle};
use crate::error::{Error, Result};

pub struct CudaDevice {
    driver: &'static Driver,
    device: CuDevice,
    ordinal: i32,
    ctx: usize,
    /// Greatest (numerically lowest) stream priority of the context, for demand loads.
    high_priority: i32,
    low_priority: i32,
}

impl CudaDevice {
    /// Retain device `ordinal`'s primary context. CudaError when there is no driver or device.
    pub fn open(ordinal: i32) -> Result<Self> {
        let d = Driver::get()?;
        let mut count = 0;
        // SAFETY: plain driver calls with valid out-pointers.
        d.check(unsafe { (d.cu_device_get_count)(&mut count) }, "cuDeviceGetCount")?;
        if ordinal >= count {
            return Err(Error::Cuda(format!("CUDA device {ordinal} requested but {count} device(s) present")));
        }
        let mut dev: CuDevice = 0;
        d.check(unsafe { (d.cu_device_get)(&mut dev, ordinal) }, "cuDeviceGet")?;
        let mut ctx: CuContext = std::ptr::null_mut();
        d.check(unsafe { (d.cu_primary_ctx_retain)(&mut ctx, dev) }, "cuDevicePrimaryCtxRetain")?;
        // From here on `me` owns the retain: its Drop releases it on every path, exactly once.
        // (Do not rebuild it with `..me`: that copies the fields and drops `me`, releasing the
        // context that the copy still uses.)
        let mut me = Self { driver: d, device: dev, ordinal, ctx: ctx as usize, high_priority: 0, low_priority: 0 };
        me.bind_thread()?;
        let (mut least, mut greatest) = (0, 0);
        d.check(unsafe { (d.cu_ctx_stream_priority_range)(&mut least, &mut greatest) }, "cuCtxGetStreamPriorityRange")?;
        me.high_priority = greatest;
        me.low_priority = least;
        Ok(me)
    }

    /// True when the driver loads and reports at least one device; never fails.
    pub fn available() -> bool {
        let Ok(d) = Driver::get() else { return false };
        let mut count = 0;
        // SAFETY: plain driver call.
        unsafe { (d.cu_device_get_count)(&mut count) == CUDA_SUCCESS && count > 0 }
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `open`.
        unsafe { (self.driver.cu_primary_ctx_release)(self.device) };
    }
}

impl Device for CudaDevice {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Cuda
    }
    fn ordinal(&self) -> i32 {
        self.ordinal
    }
    fn bind_thread(&self) -> Result<()> {
        // SAFETY: the context is retained for our lifetime.
        self.driver.check(unsafe { (self.driver.cu_ctx_set_current)(self.ctx as CuContext) }, "cuCtxSetCurrent")
    }
    fn alloc_pool(&self, bytes: usize) -> Result<usize> {
        if bytes == 0 {
            return Ok(4096);
        }
        self.bind_thread()?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the memory is zeroed before anyone sees it.
        self.driver.check(
            unsafe { (self.driver.cu_mem_host_alloc)(&mut p, bytes, CU_MEMHOSTALLOC_PORTABLE) },
            &format!("cuMemHostAlloc({bytes} bytes of pinned memory)"),
        )?;
        unsafe { std::ptr::write_bytes(p as *mut u8, 0, bytes) };
        Ok(p as usize)
    }
    fn free_pool(&self, addr: usize, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let _ = self.bind_thread();
        // SAFETY: allocated by cuMemHostAlloc.
        unsafe { (self.driver.cu_mem_free_host)(addr as *mut c_void) };
    }
    fn alloc_slots(&self, bytes: usize) -> Result<u64> {
        self.bind_thread()?;
        let mut p: CuDevicePtr = 0;
        self.driver.check(
            unsafe { (self.driver.cu_mem_alloc)(&mut p, bytes.max(1)) },
            &format!("cuMemAlloc({bytes} bytes of device memory for the slots)"),
        )?;
        Ok(p)
    }
    fn free_slots(&self, addr: u64, _bytes: usize) {
        let _ = self.bind_thread();
        // SAFETY: allocated by cuMemAlloc; no copy into it is pending (the cache synchronizes).
        unsafe { (self.driver.cu_mem_free)(addr) };
    }
    fn create_stream(&self, high_priority: bool) -> Result<StreamHandle> {
        self.bind_thread()?;
        let mut s: CuStream = std::ptr::null_mut();
        let prio = if high_priority { self.high_priority } else { self.low_priority };
        self.driver.check(
            unsafe { (self.driver.cu_stream_create_with_priority)(&mut s, CU_STREAM_NON_BLOCKING, prio) },
            "cuStreamCreateWithPriority",
        )?;
        Ok(s as u64)
    }
    fn destroy_stream(&self, stream: StreamHandle) {
        let _ = self.bind_thread();
        unsafe { (self.driver.cu_stream_destroy)(stream as usize as CuStream) };
    }
    fn create_event(&self, kind: EventKind) -> Result<EventHandle> {
        self.bind_thread()?;
        let mut e: CuEvent = std::ptr::null_mut();
        let flags = match kind {
            EventKind::Plain => CU_EVENT_DISABLE_TIMING,
            EventKind::Timing => 0,
            EventKind::BlockingWait => CU_EVENT_DISABLE_TIMING | CU_EVENT_BLOCKING_SYNC,
        };
        self.driver.check(unsafe { (self.driver.cu_event_create)(&mut e, flags) }, "cuEventCreate")?;
        Ok(e as u64)
    }
    fn destroy_event(&self, event: EventHandle) {
        let _ = self.bind_thread();
        unsafe { (self.driver.cu_event_destroy)(event as usize as CuEvent) };
    }
    unsafe fn copy_to_slot(&self, dst: u64, src: usize, n: usize, stream: StreamHandle) -> Result<()> {
        self.driver.check(
            unsafe { (self.driver.cu_memcpy_htod_async)(dst, src as *const c_void, n, stream as usize as CuStream) },
            "cuMemcpyHtoDAsync",
        )
    }
    unsafe fn copy_from_slot(&self, dst: usize, src: u64, n: usize) -> Result<()> {
        self.driver.check(unsafe { (self.driver.cu_memcpy_dtoh)(dst as *mut c_void, src, n) }, "cuMemcpyDtoH")
    }
    unsafe fn copy_to_host_async(&self, dst: usize, src: u64, n: usize, stream: StreamHandle) -> Result<()> {
        self.driver.check(
            unsafe { (self.driver.cu_memcpy_dtoh_async)(dst as *mut c_void, src, n, stream as usize as CuStream) },
            "cuMemcpyDtoHAsync",
        )
    }
    fn record_event(&self, event: EventHandle, stream: StreamHandle) -> Result<()> {
        self.driver.check(
            unsafe { (self.driver.cu_event_record)(event as usize as CuEvent, stream as usize as CuStream) },
            "cuEventRecord",
        )
    }
    fn stream_wait_event(&self, stream: StreamHandle, event: EventHandle) -> Result<()> {
        self.driver.check(
            unsafe { (self.driver.cu_stream_wait_event)(stream as usize as CuStream, event as usize as CuEvent, 0) },
            "cuStreamWaitEvent",
        )
    }
    fn event_synchronize(&self, event: EventHandle) -> Result<()> {
        self.driver.check(unsafe { (self.driver.cu_event_synchronize)(event as usize as CuEvent) }, "cuEventSynchronize")
    }
    fn event_done(&self, event: EventHandle) -> Result<bool> {
        let st = unsafe { (self.driver.cu_event_query)(event as usize as CuEvent) };
        if st == CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        self.driver.check(st, "cuEventQuery")?;
        Ok(true)
    }
    fn elapsed_ms(&self, start: EventHandle, end: EventHandle) -> Result<Option<f32>> {
        for e in [start, end] {
            let st = unsafe { (self.driver.cu_event_query)(e as usize as CuEvent) };
            if st == CUDA_ERROR_NOT_READY {
                return Ok(None);
            }
            self.driver.check(st, "cuEventQuery")?;
        }
        let mut ms = 0f32;
        self.driver.check(
            unsafe { (self.driver.cu_event_elapsed_time)(&mut ms, start as usize as CuEvent, end as usize as CuEvent) },
            "cuEventElapsedTime",
        )?;
        Ok(Some(ms))
    }
    fn stream_synchronize(&self, stream: StreamHandle) -> Result<()> {
        self.driver.check(
            unsafe { (self.driver.cu_stream_synchronize)(stream as usize as CuStream) },
            "cuStreamSynchronize",
        )
    }
    fn copies_are_synchronous(&self) -> bool {
        false
    }
    unsafe fn write_value64(&self, addr: u64, value: u64, stream: StreamHandle) -> Result<()> {
        // flags 0: the write waits for (and is ordered after) the stream's earlier memory work
        self.driver.check(
            unsafe { (self.driver.cu_stream_write_value64)(stream as usize as CuStream, addr, value, 0) },
            "cuStreamWriteValue64",
        )
    }
}
