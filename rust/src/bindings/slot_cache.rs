//! `SlotCache`: the GPU slot cache (acquire path, prefetches, the decode path's expert table,
//! stats, the stream-wait measurement).

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

use super::args::{int_list, stream_arg, stream_or_default, visit_list};
use super::errors::{to_py, IntoPy};
use super::pool::PyExpertPool;
use crate::error::Error;
use crate::prefetch::Lane;
use crate::slot_cache::{self, CacheConfig};

#[pyclass(frozen, module = "sida_moe._native", name = "SlotCache")]
pub struct PySlotCache {
    pub(super) cache: Arc<slot_cache::SlotCache>,
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
        Ok(Self { cache })
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
        let s = stream_or_default(stream)?;
        let c = &self.cache;
        py.detach(|| c.acquire(layer, &experts, s)).py_err()
    }

    #[pyo3(signature = (slots, stream = None))]
    fn release(&self, py: Python<'_>, slots: &Bound<'_, PyAny>, stream: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let slots = int_list(slots, "slots")?;
        let s = stream_or_default(stream)?;
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
        let lane = Lane::parse(priority).py_err()?;
        let c = &self.cache;
        py.detach(|| c.prefetch(layer, &experts, lane, generation)).py_err()
    }

    /// See the stub: the expert table of the decode path.
    #[pyo3(signature = (table_ptr, stream = None))]
    fn attach_expert_table(&self, py: Python<'_>, table_ptr: i64, stream: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        if table_ptr <= 0 {
            return Err(to_py(Error::InvalidArgument(format!("table_ptr must be a non-null address, got {table_ptr}"))));
        }
        let s = stream_or_default(stream)?;
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
            d.set_item(k, s)?;
        }
        Ok(d)
    }

    fn lookup(&self, layer: i64, expert: i64) -> PyResult<Option<usize>> {
        self.cache.lookup(layer, expert).py_err()
    }

    fn slot_states(&self) -> PyResult<Vec<(&'static str, u32, Option<(u64, u64)>)>> {
        Ok(self.cache.slot_states().py_err()?.into_iter().map(|(s, r, k)| (s.name(), r, k)).collect())
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
        let d = PyDict::new(py);
        for (k, x) in py.detach(|| c.stats()) {
            d.set_item(k, x)?;
        }
        Ok(d)
    }

    fn reset_stats(&self) {
        self.cache.reset_stats();
    }

    fn close(&self, py: Python<'_>) {
        let c = &self.cache;
        py.detach(|| c.close())
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

/// See the stub: the cache options that need no pool, checked where the cache checks them.
#[pyfunction]
pub(super) fn check_cache_options(policy: &str, copy_workers: i64) -> PyResult<()> {
    CacheConfig::check_options(policy, copy_workers).py_err().map(|_| ())
}
