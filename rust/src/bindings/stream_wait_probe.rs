//! `StreamWaitProbe`: while open, a slot cache times how long the caller streams wait on copies
//! still in flight (the measurement of the acquire path's stall).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::errors::IntoPy;
use super::slot_cache::PySlotCache;
use crate::slot_cache::SlotCache;

#[pyclass(frozen, module = "sida_moe._native", name = "StreamWaitProbe")]
pub struct PyStreamWaitProbe {
    cache: Arc<SlotCache>,
    open: AtomicBool,
}

impl PyStreamWaitProbe {
    fn close_once(&self) {
        if self.open.swap(false, Ordering::AcqRel) {
            self.cache.remove_stream_wait_probe();
        }
    }
}

#[pymethods]
impl PyStreamWaitProbe {
    #[new]
    fn new(cache: PyRef<'_, PySlotCache>) -> PyResult<Self> {
        cache.cache.add_stream_wait_probe().py_err()?;
        Ok(Self { cache: cache.cache.clone(), open: AtomicBool::new(true) })
    }

    fn seconds(&self, py: Python<'_>) -> PyResult<f64> {
        let c = &self.cache;
        py.detach(|| c.stream_wait_seconds()).py_err()
    }

    fn close(&self) {
        self.close_once()
    }

    #[getter]
    fn closed(&self) -> bool {
        !self.open.load(Ordering::Acquire)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: &Bound<'_, PyTuple>) {
        self.close_once()
    }

    fn __repr__(&self) -> String {
        format!("StreamWaitProbe({})", if self.closed() { "closed" } else { "open" })
    }
}

impl Drop for PyStreamWaitProbe {
    fn drop(&mut self) {
        self.close_once();
    }
}
