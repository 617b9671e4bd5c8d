//! PyO3 bindings only: argument conversion, error mapping, GIL release. No runtime logic here.

use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyKeyError, PyMemoryError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyBytes, PyDict, PyTuple, PyType};

use crate::cache;
use crate::deferred;
use crate::device::{self, SharedDevice};
use crate::error::Error;
use crate::policy::{Key, PolicyKind};
use crate::pool;
use crate::slot_cache::{self, CacheConfig};

// ------------------------------------------------------------------------------- exceptions
// Created at import with `type(name, bases, ns)`: several inherit from a builtin too (e.g.
// BudgetError is a ValueError), which `create_exception!` cannot express.
static SIDA_MOE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static BUDGET_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static UNKNOWN_EXPERT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static SLOT_STATE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static CLOSED_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static CUDA_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static INVALID_ARGUMENT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static LOAD_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static OUT_OF_MEMORY_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn make_exception<'py>(
    m: &Bound<'py, PyModule>,
    name: &str,
    doc: &str,
    bases: Vec<Bound<'py, PyAny>>,
    cell: &PyOnceLock<Py<PyType>>,
) -> PyResult<()> {
    let py = m.py();
    let ns = PyDict::new(py);
    ns.set_item("__doc__", doc)?;
    ns.set_item("__module__", "sida_moe._native")?;
    let ty = py.get_type::<PyType>().call1((name, PyTuple::new(py, bases)?, ns))?;
    let ty = ty.cast_into::<PyType>()?;
    m.add(name, &ty)?;
    let _ = cell.set(py, ty.unbind());
    Ok(())
}

fn b(t: Bound<'_, PyType>) -> Bound<'_, PyAny> {
    t.into_any()
}

fn register_exceptions(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let exc = py.get_type::<pyo3::exceptions::PyException>().into_any();
    make_exception(m, "SidaMoeError", "Base class of every error raised by the runtime.", vec![exc], &SIDA_MOE_ERROR)?;
    let base = SIDA_MOE_ERROR.get(py).map(|t| t.bind(py).clone().into_any()).ok_or_else(|| {
        PyRuntimeError::new_err("SidaMoeError was not created")
    })?;
    make_exception(
        m,
        "BudgetError",
        "A budget / slot count is invalid (zero, negative, or too small for the request).",
        vec![base.clone(), b(py.get_type::<PyValueError>())],
        &BUDGET_ERROR,
    )?;
    make_exception(
        m,
        "UnknownExpertError",
        "A (layer, expert) or tensor name that the pool does not hold.",
        vec![base.clone(), b(py.get_type::<PyKeyError>())],
        &UNKNOWN_EXPERT_ERROR,
    )?;
    make_exception(
        m,
        "SlotStateError",
        "A slot operation that its state forbids (double release, release of a slot not acquired).",
        vec![base.clone(), b(py.get_type::<PyRuntimeError>())],
        &SLOT_STATE_ERROR,
    )?;
    make_exception(
        m,
        "ClosedError",
        "The object was closed (or its pool / cache was); it cannot be used any more.",
        vec![base.clone(), b(py.get_type::<PyRuntimeError>())],
        &CLOSED_ERROR,
    )?;
    make_exception(
        m,
        "CudaError",
        "A CUDA driver call failed, or CUDA was requested on a machine that has none.",
        vec![base.clone(), b(py.get_type::<PyRuntimeError>())],
        &CUDA_ERROR,
    )?;
    make_exception(
        m,
        "InvalidArgumentError",
        "A malformed argument: negative size or id, wrong buffer size, unknown policy or backend name.",
        vec![base.clone(), b(py.get_type::<PyValueError>())],
        &INVALID_ARGUMENT_ERROR,
    )?;
    make_exception(
        m,
        "LoadError",
        "Reading a weights or trace file failed, or the file is malformed.",
        vec![base.clone(), b(py.get_type::<PyOSError>())],
        &LOAD_ERROR,
    )?;
    make_exception(
        m,
        "OutOfMemoryError",
        "An allocation of a legal size failed: not enough host (or pinned) memory for the request.",
        vec![base, b(py.get_type::<PyMemoryError>())],
        &OUT_OF_MEMORY_ERROR,
    )?;
    Ok(())
}

/// Map a core error to its Python exception class.
fn to_py(e: Error) -> PyErr {
    let cell = match &e {
        Error::Budget(_) => &BUDGET_ERROR,
        Error::UnknownExpert(_) => &UNKNOWN_EXPERT_ERROR,
        Error::SlotState(_) => &SLOT_STATE_ERROR,
        Error::Closed(_) => &CLOSED_ERROR,
        Error::Cuda(_) => &CUDA_ERROR,
        Error::InvalidArgument(_) => &INVALID_ARGUMENT_ERROR,
        Error::Load(_) => &LOAD_ERROR,
        Error::OutOfMemory(_) => &OUT_OF_MEMORY_ERROR,
    };
    let msg = e.to_string();
    Python::attach(|py| match cell.get(py) {
        Some(t) => PyErr::from_type(t.bind(py).clone(), msg),
        None => PyRuntimeError::new_err(msg),
    })
}

trait IntoPy<T> {
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for crate::error::Result<T> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

fn non_negative(v: i64, what: &str) -> PyResult<u64> {
    if v < 0 {
        return Err(to_py(Error::InvalidArgument(format!("{what} must be >= 0, got {v}"))));
    }
    Ok(v as u64)
}

/// A sequence of ints from a list, tuple, range, numpy array or torch tensor (via `tolist()`).
fn int_list(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<i64>> {
    if obj.is_instance_of::<pyo3::types::PyString>() || obj.is_instance_of::<PyBytes>() {
        return Err(PyTypeError::new_err(format!("{what} must be a sequence of ints, got a string")));
    }
    let items = if obj.hasattr("tolist")? { obj.call_method0("tolist")? } else { obj.clone() };
    if items.is_instance_of::<pyo3::types::PyInt>() {
        return Err(PyTypeError::new_err(format!("{what} must be a sequence of ints, got a single int")));
    }
    let iter = items
        .try_iter()
        .map_err(|_| PyTypeError::new_err(format!("{what} must be a sequence of ints, got {}", type_name(obj))))?;
    iter.map(|x| {
        x?.extract::<i64>()
            .map_err(|_| PyTypeError::new_err(format!("{what} must contain only ints")))
    })
    .collect()
}

/// The lane a `priority` string names: true for "demand", false for "prefetch".
fn demand_lane(priority: &str) -> PyResult<bool> {
    match priority {
        "demand" => Ok(true),
        "prefetch" => Ok(false),
        other => Err(to_py(Error::InvalidArgument(format!("priority must be \"demand\" or \"prefetch\", got {other:?}")))),
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
}

/// `[(layer, experts), ...]` with experts in any form `int_list` accepts.
fn visit_list(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<(i64, Vec<i64>)>> {
    let iter = obj
        .try_iter()
        .map_err(|_| PyTypeError::new_err(format!("{what} must be a sequence of (layer, experts) pairs")))?;
    iter.map(|item| {
        let item = item?;
        let (layer, experts): (i64, Bound<'_, PyAny>) = item
            .extract()
            .map_err(|_| PyTypeError::new_err(format!("{what} must be a sequence of (layer, experts) pairs")))?;
        Ok((layer, int_list(&experts, "experts")?))
    })
    .collect()
}

fn key_tuple(k: Key) -> (u64, u64) {
    k
}

// ---------------------------------------------------------------------------------- backend
/// Where slots live and how bytes reach them (see the .pyi stub).
#[pyclass(frozen, module = "sida_moe._native", name = "Backend")]
pub struct PyBackend {
    device: SharedDevice,
}

#[pymethods]
impl PyBackend {
    #[new]
    #[pyo3(signature = (kind = "auto", device = 0))]
    fn new(py: Python<'_>, kind: &str, device: i64) -> PyResult<Self> {
        let kind = kind.to_string();
        let dev = py.detach(move || device::open(&kind, device)).py_err()?;
        Ok(Self { device: dev })
    }

    #[getter]
    fn kind(&self) -> &'static str {
        self.device.kind().name()
    }

    #[getter]
    fn device(&self) -> i32 {
        self.device.ordinal()
    }

    #[staticmethod]
    fn cuda_available(py: Python<'_>) -> bool {
        py.detach(crate::cuda_device::CudaDevice::available)
    }

    fn __repr__(&self) -> String {
        format!("Backend(kind={:?}, device={})", self.device.kind().name(), self.device.ordinal())
    }
}

// ------------------------------------------------------------------------------ expert pool
#[pyclass(frozen, module = "sida_moe._native", name = "ExpertPool")]
pub struct PyExpertPool {
    pool: Arc<pool::ExpertPool>,
}

/// Host address and size of a C-contiguous CPU buffer, plus the object that keeps it alive.
fn host_buffer<'py>(data: &Bound<'py, PyAny>) -> PyResult<(usize, usize, Bound<'py, PyAny>)> {
    let py = data.py();
    if let Ok(b) = data.cast::<PyBytes>() {
        let s = b.as_bytes();
        return Ok((s.as_ptr() as usize, s.len(), data.clone()));
    }
    // A torch tensor: no buffer protocol, but a data pointer.
    if data.hasattr("data_ptr")? && data.hasattr("untyped_storage")? {
        let dev_type: String = data.getattr("device")?.getattr("type")?.extract()?;
        if dev_type != "cpu" {
            return Err(to_py(Error::InvalidArgument(format!(
                "data must be a CPU tensor, got one on {dev_type:?}"
            ))));
        }
        if !data.call_method0("is_contiguous")?.extract::<bool>()? {
            return Err(to_py(Error::InvalidArgument("data must be a contiguous tensor".into())));
        }
        let ptr: usize = data.call_method0("data_ptr")?.extract()?;
        let n: usize = data.getattr("nbytes")?.extract()?;
        return Ok((ptr, n, data.clone()));
    }
    // Anything with the buffer protocol, seen through numpy (the limited API of Python 3.10
    // has no buffer access of its own).
    let np = py.import("numpy").map_err(|_| {
        to_py(Error::InvalidArgument("writing from a non-bytes buffer needs numpy installed".into()))
    })?;
    let arr = np.getattr("frombuffer")?.call1((data, np.getattr("uint8")?)).map_err(|e| {
        to_py(Error::InvalidArgument(format!(
            "data must be bytes, a CPU torch tensor or a C-contiguous buffer (numpy array, memoryview); \
             got {}: {e}",
            data.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        )))
    })?;
    let ptr: usize = arr.getattr("__array_interface__")?.get_item("data")?.get_item(0)?.extract()?;
    let n: usize = arr.getattr("nbytes")?.extract()?;
    Ok((ptr, n, arr))
}

#[pymethods]
impl PyExpertPool {
    #[new]
    #[pyo3(signature = (backend, layout, keys, arena_bytes = 1 << 30))]
    fn new(
        py: Python<'_>,
        backend: PyRef<'_, PyBackend>,
        layout: Vec<(String, i64)>,
        keys: Vec<(i64, i64)>,
        arena_bytes: i64,
    ) -> PyResult<Self> {
        let dev = backend.device.clone();
        let pool = py.detach(move || pool::ExpertPool::new(dev, &layout, &keys, arena_bytes)).py_err()?;
        Ok(Self { pool: Arc::new(pool) })
    }

    #[getter]
    fn expert_nbytes(&self) -> usize {
        self.pool.record_nbytes()
    }

    #[getter]
    fn tensor_offsets<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for t in &self.pool.layout().tensors {
            d.set_item(&t.name, t.offset)?;
        }
        Ok(d)
    }

    #[getter]
    fn tensor_nbytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for t in &self.pool.layout().tensors {
            d.set_item(&t.name, t.nbytes)?;
        }
        Ok(d)
    }

    #[getter]
    fn num_experts(&self) -> usize {
        self.pool.keys().len()
    }

    #[getter]
    fn num_arenas(&self) -> usize {
        self.pool.num_arenas()
    }

    #[getter]
    fn allocated_bytes(&self) -> usize {
        self.pool.allocated_bytes()
    }

    #[getter]
    fn keys(&self) -> Vec<(u64, u64)> {
        self.pool.keys().iter().copied().map(key_tuple).collect()
    }

    fn contains(&self, layer: i64, expert: i64) -> bool {
        layer >= 0 && expert >= 0 && self.pool.contains((layer as u64, expert as u64))
    }

    fn write(&self, py: Python<'_>, layer: i64, expert: i64, tensor: &str, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let key = self.pool.key_from(layer, expert).py_err()?;
        let (addr, n, _keep) = host_buffer(data)?;
        let pool = &self.pool;
        // SAFETY: `_keep` holds the buffer alive (and unresizable) for the whole copy.
        py.detach(|| unsafe { pool.write(key, tensor, addr, n) }).py_err()
    }

    fn write_ptr(&self, py: Python<'_>, layer: i64, expert: i64, tensor: &str, ptr: i64, nbytes: i64) -> PyResult<()> {
        let key = self.pool.key_from(layer, expert).py_err()?;
        if ptr <= 0 {
            return Err(to_py(Error::InvalidArgument(format!("ptr must be a non-null address, got {ptr}"))));
        }
        let n = non_negative(nbytes, "nbytes")? as usize;
        let pool = &self.pool;
        // SAFETY: the caller guarantees `nbytes` readable bytes at `ptr` (documented contract).
        py.detach(|| unsafe { pool.write(key, tensor, ptr as usize, n) }).py_err()
    }

    #[pyo3(signature = (layer, expert, tensor = None))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        layer: i64,
        expert: i64,
        tensor: Option<&str>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let key = self.pool.key_from(layer, expert).py_err()?;
        let pool = &self.pool;
        let t = tensor.map(str::to_string);
        let v = py.detach(|| pool.read(key, t.as_deref())).py_err()?;
        Ok(PyBytes::new(py, &v))
    }

    fn host_ptr(&self, layer: i64, expert: i64) -> PyResult<usize> {
        let key = self.pool.key_from(layer, expert).py_err()?;
        self.pool.record_addr(key).py_err()
    }

    fn load_safetensors(&self, py: Python<'_>, path: &str, entries: Vec<pool::LoadEntry>) -> PyResult<u64> {
        let pool = &self.pool;
        let path = path.to_string();
        py.detach(|| pool.load_safetensors(&path, &entries)).py_err()
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let pool = &self.pool;
        py.detach(|| pool.close()).py_err()
    }

    #[getter]
    fn closed(&self) -> bool {
        self.pool.is_closed()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<()> {
        self.close(py)
    }

    fn __repr__(&self) -> String {
        format!(
            "ExpertPool(num_experts={}, expert_nbytes={}, backend={:?}{})",
            self.pool.keys().len(),
            self.pool.record_nbytes(),
            self.pool.device().kind().name(),
            if self.pool.is_closed() { ", closed" } else { "" }
        )
    }
}

// ------------------------------------------------------------------------------- slot cache

/// Rows of device ids handed to the cache: a non-null address and at least one id per row.
fn id_rows(ids_ptr: i64, width: i64) -> PyResult<(u64, usize)> {
    if width <= 0 {
        return Err(to_py(Error::InvalidArgument(format!("width must be >= 1 (ids per layer), got {width}"))));
    }
    if ids_ptr <= 0 {
        return Err(to_py(Error::InvalidArgument(format!("ids_ptr must be a non-null address, got {ids_ptr}"))));
    }
    Ok((ids_ptr as u64, width as usize))
}

#[pyclass(frozen, module = "sida_moe._native", name = "SlotCache")]
pub struct PySlotCache {
    // dropped first: its thread holds a handle on the cache
    deferred: deferred::DeferredPrefetcher,
    cache: Arc<slot_cache::SlotCache>,
}

fn stream_arg(stream: &Bound<'_, PyAny>) -> PyResult<u64> {
    let v: i128 = stream.extract().map_err(|_| {
        to_py(Error::InvalidArgument("stream must be an int (a CUstream handle, 0 for the default stream)".into()))
    })?;
    if !(0..=u64::MAX as i128).contains(&v) {
        return Err(to_py(Error::InvalidArgument(format!("stream must be a non-negative handle, got {v}"))));
    }
    Ok(v as u64)
}

#[pymethods]
impl PySlotCache {
    #[new]
    #[pyo3(signature = (pool, num_slots, policy = "lru", slots_ptr = None, copy_workers = 2, queue_capacity = 4096, acquire_timeout = 60.0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        pool: PyRef<'_, PyExpertPool>,
        num_slots: i64,
        policy: &str,
        slots_ptr: Option<i64>,
        copy_workers: i64,
        queue_capacity: i64,
        acquire_timeout: f64,
    ) -> PyResult<Self> {
        let cfg = CacheConfig::from_args(num_slots, policy, slots_ptr, copy_workers, queue_capacity, acquire_timeout)
            .py_err()?;
        let p = pool.pool.clone();
        let cache = Arc::new(py.detach(move || slot_cache::SlotCache::new(p, cfg)).py_err()?);
        Ok(Self { deferred: deferred::DeferredPrefetcher::new(cache.clone()), cache })
    }

    #[getter]
    fn num_slots(&self) -> usize {
        self.cache.num_slots()
    }

    #[getter]
    fn slot_nbytes(&self) -> usize {
        self.cache.slot_nbytes()
    }

    #[getter]
    fn slots_ptr(&self) -> u64 {
        self.cache.slots_addr()
    }

    #[getter]
    fn policy(&self) -> &'static str {
        self.cache.policy().name()
    }

    #[getter]
    fn backend_kind(&self) -> &'static str {
        self.cache.device_kind().name()
    }

    #[pyo3(signature = (layer, experts, stream = None))]
    fn acquire(
        &self,
        py: Python<'_>,
        layer: i64,
        experts: &Bound<'_, PyAny>,
        stream: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<usize>> {
        let experts = int_list(experts, "experts")?;
        let s = stream.map(stream_arg).transpose()?.unwrap_or(0);
        let c = &self.cache;
        py.detach(|| c.acquire(layer, &experts, s)).py_err()
    }

    #[pyo3(signature = (slots, stream = None))]
    fn release(&self, py: Python<'_>, slots: &Bound<'_, PyAny>, stream: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let slots = int_list(slots, "slots")?;
        let s = stream.map(stream_arg).transpose()?.unwrap_or(0);
        let c = &self.cache;
        py.detach(|| c.release(&slots, s)).py_err()
    }

    #[pyo3(signature = (layer, experts, priority = "prefetch", generation = 0))]
    fn prefetch(
        &self,
        py: Python<'_>,
        layer: i64,
        experts: &Bound<'_, PyAny>,
        priority: &str,
        generation: i64,
    ) -> PyResult<usize> {
        let experts = int_list(experts, "experts")?;
        let demand = demand_lane(priority)?;
        let c = &self.cache;
        py.detach(|| c.prefetch(layer, &experts, demand, generation)).py_err()
    }

    #[pyo3(signature = (ids_ptr, layers, width, stream = None, generation = 0, priority = "prefetch",
                        future = false, skip_routed = false, remember = false, forget = false, feed_only = false,
                        after_next = false))]
    #[allow(clippy::too_many_arguments)]
    fn prefetch_deferred(
        &self,
        py: Python<'_>,
        ids_ptr: i64,
        layers: &Bound<'_, PyAny>,
        width: i64,
        stream: Option<&Bound<'_, PyAny>>,
        generation: i64,
        priority: &str,
        future: bool,
        skip_routed: bool,
        remember: bool,
        forget: bool,
        feed_only: bool,
        after_next: bool,
    ) -> PyResult<()> {
        let layers = int_list(layers, "layers")?;
        let (ids_ptr, width) = id_rows(ids_ptr, width)?;
        let demand = demand_lane(priority)?;
        let s = stream.map(stream_arg).transpose()?.unwrap_or(0);
        let opts = deferred::DeferredOptions {
            layers,
            width,
            generation,
            demand,
            future,
            skip_routed,
            remember,
            forget,
            routed: false,
            feed_only,
            after_next,
        };
        let d = &self.deferred;
        // SAFETY: the caller passes the address of a live int64 tensor of len(layers) * width
        // elements on the cache's device (documented in the stub), written on `stream` only.
        py.detach(|| unsafe { d.submit(ids_ptr, s, opts) }).py_err()
    }

    /// See the stub: the expert table of the decode path.
    #[pyo3(signature = (table_ptr, stream = None))]
    fn attach_expert_table(&self, py: Python<'_>, table_ptr: i64, stream: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        if table_ptr <= 0 {
            return Err(to_py(Error::InvalidArgument(format!("table_ptr must be a non-null address, got {table_ptr}"))));
        }
        let s = stream.map(stream_arg).transpose()?.unwrap_or(0);
        let c = &self.cache;
        // SAFETY: the caller passes a live int64 tensor of one entry per pool key on the cache's
        // device, kept alive and written by no one else until close (documented in the stub).
        py.detach(|| unsafe { c.attach_expert_table(table_ptr as u64, s) }).py_err()
    }

    fn switch_reader_stream(&self, stream: &Bound<'_, PyAny>) -> PyResult<bool> {
        let s = stream_arg(stream)?;
        self.cache.switch_reader_stream(s).py_err()
    }

    #[getter]
    fn reader_stream(&self) -> PyResult<u64> {
        self.cache.reader_stream().py_err()
    }

    fn begin_table_read(&self) -> PyResult<u64> {
        self.cache.begin_table_read().py_err()
    }

    fn end_table_read(&self, py: Python<'_>, ticket: u64) -> PyResult<()> {
        let c = &self.cache;
        py.detach(|| c.end_table_read(ticket)).py_err()
    }

    fn note_routed(&self, py: Python<'_>, layer: i64, experts: &Bound<'_, PyAny>) -> PyResult<usize> {
        let experts = int_list(experts, "experts")?;
        let c = &self.cache;
        py.detach(|| c.note_routed(layer, &experts, None)).py_err()
    }

    #[pyo3(signature = (ids_ptr, layers, width, stream = None))]
    fn submit_routed(
        &self,
        py: Python<'_>,
        ids_ptr: i64,
        layers: &Bound<'_, PyAny>,
        width: i64,
        stream: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let layers = int_list(layers, "layers")?;
        let (ids_ptr, width) = id_rows(ids_ptr, width)?;
        let s = stream.map(stream_arg).transpose()?.unwrap_or(0);
        let opts = deferred::DeferredOptions { layers, width, demand: true, routed: true, ..Default::default() };
        let d = &self.deferred;
        // SAFETY: as prefetch_deferred: a live int64 tensor of len(layers) * width ids written on
        // `stream` only (documented in the stub).
        py.detach(|| unsafe { d.submit(ids_ptr, s, opts) }).py_err()
    }

    #[pyo3(signature = (timeout = None))]
    fn wait_deferred(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let t = match timeout {
            None => None,
            Some(t) if t.is_finite() && t >= 0.0 => Some(Duration::from_secs_f64(t)),
            Some(t) => return Err(to_py(Error::InvalidArgument(format!("timeout must be >= 0 seconds or None, got {t}")))),
        };
        let d = &self.deferred;
        Ok(py.detach(|| d.wait_idle(t)))
    }

    fn take_deferred_error(&self) -> Option<String> {
        self.deferred.take_error()
    }

    fn cancel_before(&self, generation: i64) -> PyResult<()> {
        self.cache.cancel_before(generation).py_err()
    }

    #[pyo3(signature = (visits, offset = 0))]
    fn set_future(&self, py: Python<'_>, visits: &Bound<'_, PyAny>, offset: i64) -> PyResult<()> {
        let visits = visit_list(visits, "visits")?;
        let c = &self.cache;
        py.detach(|| c.set_future(&visits, offset)).py_err()
    }

    fn resident<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, s) in self.cache.resident().py_err()? {
            d.set_item(key_tuple(k), s)?;
        }
        Ok(d)
    }

    fn lookup(&self, layer: i64, expert: i64) -> PyResult<Option<usize>> {
        self.cache.lookup(layer, expert).py_err()
    }

    fn slot_states(&self) -> PyResult<Vec<(&'static str, u32, Option<(u64, u64)>)>> {
        Ok(self.cache.slot_states().py_err()?.into_iter().map(|(s, r, k)| (s.name(), r, k.map(key_tuple))).collect())
    }

    fn read_slot<'py>(&self, py: Python<'py>, slot: i64) -> PyResult<Bound<'py, PyBytes>> {
        let c = &self.cache;
        let v = py.detach(|| c.read_slot(slot)).py_err()?;
        Ok(PyBytes::new(py, &v))
    }

    fn synchronize(&self, py: Python<'_>) -> PyResult<()> {
        let c = &self.cache;
        py.detach(|| c.synchronize()).py_err()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.cache;
        let v = py.detach(|| c.stats());
        let d = PyDict::new(py);
        let (submitted, handled, queued) = self.deferred.counts();
        d.set_item("deferred_submitted", submitted as f64)?;
        d.set_item("deferred_handled", handled as f64)?;
        d.set_item("deferred_queued", queued as f64)?;
        let (hits, needed, predicted) = self.deferred.prediction_counts();
        d.set_item("predicted_hits", hits as f64)?;
        d.set_item("predicted_needed", needed as f64)?;
        d.set_item("predicted_experts", predicted as f64)?;
        for (k, x) in v {
            d.set_item(k, x)?;
        }
        Ok(d)
    }

    fn reset_stats(&self) {
        self.cache.reset_stats();
        self.deferred.reset_prediction_counts();
    }

    #[getter]
    fn measure_stream_waits(&self) -> bool {
        self.cache.measure_stream_waits()
    }

    #[setter]
    fn set_measure_stream_waits(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let on = value.cast::<PyBool>().map_err(|_| {
            PyTypeError::new_err(format!("measure_stream_waits must be a bool, got {}", type_name(value)))
        })?;
        self.cache.set_measure_stream_waits(on.is_true()).py_err()
    }

    fn stream_wait_seconds(&self, py: Python<'_>) -> PyResult<f64> {
        let c = &self.cache;
        py.detach(|| c.stream_wait_seconds()).py_err()
    }

    fn close(&self, py: Python<'_>) {
        let (c, d) = (&self.cache, &self.deferred);
        py.detach(|| {
            d.shutdown(); // handles what was submitted, so no copy into its staging is left in flight
            c.close()
        })
    }

    #[getter]
    fn closed(&self) -> bool {
        self.cache.is_closed()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) {
        self.close(py)
    }

    fn __repr__(&self) -> String {
        format!(
            "SlotCache(num_slots={}, slot_nbytes={}, policy={:?}, backend={:?}{})",
            self.cache.num_slots(),
            self.cache.slot_nbytes(),
            self.cache.policy().name(),
            self.cache.device_kind().name(),
            if self.cache.is_closed() { ", closed" } else { "" }
        )
    }
}

// -------------------------------------------------------------------------------- functions
/// `path` of simulate_policy: one name for every visit (default "acquire") or a sequence of one per visit.
fn sim_paths(path: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<cache::SimPath>> {
    let Some(path) = path else { return Ok(vec![cache::SimPath::Acquire]) };
    if let Ok(name) = path.extract::<String>() {
        return Ok(vec![cache::SimPath::parse(&name).py_err()?]);
    }
    let names: Vec<String> = path.extract().map_err(|_| {
        PyTypeError::new_err(format!("path must be \"acquire\", \"table\" or a sequence of them, got {}", type_name(path)))
    })?;
    names.iter().map(|n| cache::SimPath::parse(n).py_err()).collect()
}

#[pyfunction]
#[pyo3(signature = (policy, num_slots, trace, future = true, path = None, count_from = 0))]
fn simulate_policy<'py>(
    py: Python<'py>,
    policy: &str,
    num_slots: i64,
    trace: &Bound<'py, PyAny>,
    future: bool,
    path: Option<&Bound<'py, PyAny>>,
    count_from: i64,
) -> PyResult<Bound<'py, PyDict>> {
    let trace = visit_list(trace, "trace")?;
    let kind = PolicyKind::parse(policy).py_err()?;
    let paths = sim_paths(path)?;
    let mut keys: Vec<Vec<Key>> = Vec::with_capacity(trace.len());
    for (i, (layer, experts)) in trace.iter().enumerate() {
        if *layer < 0 || experts.iter().any(|&e| e < 0) {
            return Err(to_py(Error::InvalidArgument(format!(
                "trace step {i}: layer and experts must be >= 0, got ({layer}, {experts:?})"
            ))));
        }
        keys.push(experts.iter().map(|&e| (*layer as u64, e as u64)).collect());
    }
    let c = py.detach(|| cache::simulate_steps(kind, num_slots, &keys, future, &paths, count_from)).py_err()?;
    let d = PyDict::new(py);
    d.set_item("hits", c.hits)?;
    d.set_item("misses", c.misses)?;
    d.set_item("evictions", c.evictions)?;
    d.set_item("loads", c.loads)?;
    Ok(d)
}

#[pymodule]
#[pyo3(name = "_native")]
fn sida_moe_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    register_exceptions(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAX_COPY_WORKERS", slot_cache::MAX_COPY_WORKERS)?;
    m.add_class::<PyBackend>()?;
    m.add_class::<PyExpertPool>()?;
    m.add_class::<PySlotCache>()?;
    m.add_function(wrap_pyfunction!(simulate_policy, m)?)?;
    Ok(())
}
