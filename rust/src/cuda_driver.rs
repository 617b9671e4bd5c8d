//! CUDA driver API symbols, loaded at run time from `libcuda.so.1` (the extension builds and
//! imports on machines without CUDA; a missing driver is an error value, never a panic).

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

use libloading::Library;

use crate::error::{Error, Result};

pub type CuResult = c_int;
pub type CuDevice = c_int;
pub type CuContext = *mut c_void;
pub type CuStream = *mut c_void;
pub type CuEvent = *mut c_void;
pub type CuDevicePtr = u64;

pub const CUDA_SUCCESS: CuResult = 0;
pub const CUDA_ERROR_NOT_READY: CuResult = 600;
pub const CU_STREAM_NON_BLOCKING: c_uint = 1;
pub const CU_EVENT_BLOCKING_SYNC: c_uint = 1;
pub const CU_EVENT_DISABLE_TIMING: c_uint = 2;
pub const CU_MEMHOSTALLOC_PORTABLE: c_uint = 1;

macro_rules! driver_api {
    ($( $field:ident : $sym:literal => fn($($arg:ty),*) ),* $(,)?) => {
        /// Function pointers into the driver; the library stays loaded for the process lifetime.
        pub struct Driver {
            _lib: Library,
            $( pub $field: unsafe extern "C" fn($($arg),*) -> CuResult, )*
        }

        impl Driver {
            fn load() -> Result<Self> {
                // SAFETY: loading the system CUDA driver runs its initialisers, which is expected.
                let lib = unsafe { Library::new("libcuda.so.1") }
                    .or_else(|_| unsafe { Library::new("libcuda.so") })
                    .map_err(|e| Error::Cuda(format!("cannot load the CUDA driver (libcuda.so.1): {e}")))?;
                $(
                    // SAFETY: the symbol has this signature in every CUDA 12/13 driver.
                    let $field = unsafe {
                        *lib.get::<unsafe extern "C" fn($($arg),*) -> CuResult>($sym)
                            .map_err(|e| Error::Cuda(format!("the CUDA driver lacks {}: {e}",
                                String::from_utf8_lossy(&$sym[..$sym.len() - 1]))))?
                    };
                )*
                Ok(Self { _lib: lib, $( $field, )* })
            }
        }
    };
}

driver_api! {
    cu_init: b"cuInit\0" => fn(c_uint),
    cu_device_get_count: b"cuDeviceGetCount\0" => fn(*mut c_int),
    cu_device_get: b"cuDeviceGet\0" => fn(*mut CuDevice, c_int),
    cu_primary_ctx_retain: b"cuDevicePrimaryCtxRetain\0" => fn(*mut CuContext, CuDevice),
    cu_primary_ctx_release: b"cuDevicePrimaryCtxRelease_v2\0" => fn(CuDevice),
    cu_ctx_set_current: b"cuCtxSetCurrent\0" => fn(CuContext),
    cu_ctx_stream_priority_range: b"cuCtxGetStreamPriorityRange\0" => fn(*mut c_int, *mut c_int),
    cu_stream_create_with_priority: b"cuStreamCreateWithPriority\0" => fn(*mut CuStream, c_uint, c_int),
    cu_stream_destroy: b"cuStreamDestroy_v2\0" => fn(CuStream),
    cu_stream_synchronize: b"cuStreamSynchronize\0" => fn(CuStream),
    cu_stream_wait_event: b"cuStreamWaitEvent\0" => fn(CuStream, CuEvent, c_uint),
    cu_event_create: b"cuEventCreate\0" => fn(*mut CuEvent, c_uint),
    cu_event_destroy: b"cuEventDestroy_v2\0" => fn(CuEvent),
    cu_event_record: b"cuEventRecord\0" => fn(CuEvent, CuStream),
    cu_event_synchronize: b"cuEventSynchronize\0" => fn(CuEvent),
    cu_event_query: b"cuEventQuery\0" => fn(CuEvent),
    cu_event_elapsed_time: b"cuEventElapsedTime\0" => fn(*mut f32, CuEvent, CuEvent),
    cu_mem_host_alloc: b"cuMemHostAlloc\0" => fn(*mut *mut c_void, usize, c_uint),
    cu_mem_free_host: b"cuMemFreeHost\0" => fn(*mut c_void),
    cu_mem_alloc: b"cuMemAlloc_v2\0" => fn(*mut CuDevicePtr, usize),
    cu_mem_free: b"cuMemFree_v2\0" => fn(CuDevicePtr),
    cu_memcpy_htod_async: b"cuMemcpyHtoDAsync_v2\0" => fn(CuDevicePtr, *const c_void, usize, CuStream),
    cu_memcpy_dtoh: b"cuMemcpyDtoH_v2\0" => fn(*mut c_void, CuDevicePtr, usize),
    cu_memcpy_dtoh_async: b"cuMemcpyDtoHAsync_v2\0" => fn(*mut c_void, CuDevicePtr, usize, CuStream),
    cu_stream_write_value64: b"cuStreamWriteValue64_v2\0" => fn(CuStream, CuDevicePtr, u64, c_uint),
    cu_get_error_name: b"cuGetErrorName\0" => fn(CuResult, *mut *const c_char),
}

static DRIVER: OnceLock<std::result::Result<Driver, Error>> = OnceLock::new();

// SAFETY: the struct holds a library handle and plain function pointers; the driver API is
// thread-safe.
unsafe impl Send for Driver {}
unsafe impl Sync for Driver {}

impl Driver {
    /// The process-wide driver, loaded and `cuInit`-ed once.
    pub fn get() -> Result<&'static Driver> {
        DRIVER
            .get_or_init(|| {
                let d = Driver::load()?;
                // SAFETY: plain driver call.
                d.check(unsafe { (d.cu_init)(0) }, "cuInit")?;
                Ok(d)
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Map a driver status to Ok or a CudaError naming the call and the error.
    pub fn check(&self, status: CuResult, call: &str) -> Result<()> {
        if status == CUDA_SUCCESS {
            return Ok(());
        }
        let mut name: *const c_char = std::ptr::null();
        // SAFETY: cuGetErrorName writes a static string pointer or fails.
        let ok = unsafe { (self.cu_get_error_name)(status, &mut name) } == CUDA_SUCCESS && !name.is_null();
        let label = if ok {
            // SAFETY: the driver returns a NUL-terminated static string.
            unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
        } else {
            "unknown error".to_string()
        };
        Err(Error::Cuda(format!("{call} failed: {label} ({status})")))
    }
}
