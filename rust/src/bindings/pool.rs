//! `ExpertPool`: the pinned host pool of every expert's bytes.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

use super::args::non_negative;
use super::backend::PyBackend;
use super::errors::{to_py, IntoPy};
use crate::error::Error;
use crate::pool;

#[pyclass(frozen, module = "sida_moe._native", name = "ExpertPool")]
pub struct PyExpertPool {
    pub(super) pool: Arc<pool::ExpertPool>,
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
        self.pool.keys().to_vec()
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
