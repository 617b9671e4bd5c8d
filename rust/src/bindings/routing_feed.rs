//! `RoutingFeed`: expert ids computed on the device (a decode step's routing, a predictor's top-k)
//! handed to a slot cache by a native thread, without the submitting thread waiting for them.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::args::{id_rows, int_list, stream_or_default, timeout_arg};
use super::errors::IntoPy;
use super::slot_cache::PySlotCache;
use crate::deferred::{DeferredOptions, DeferredPrefetcher};
use crate::prefetch::Lane;

#[pyclass(frozen, module = "sida_moe._native", name = "RoutingFeed")]
pub struct PyRoutingFeed {
    feed: DeferredPrefetcher,
}

#[pymethods]
impl PyRoutingFeed {
    #[new]
    fn new(cache: PyRef<'_, PySlotCache>) -> Self {
        Self { feed: DeferredPrefetcher::new(cache.cache.clone()) }
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
        let s = stream_or_default(stream)?;
        let opts = DeferredOptions { layers, width, lane: Lane::Demand, routed: true, ..Default::default() };
        let f = &self.feed;
        // SAFETY: the caller passes the address of a live int64 tensor of 2 * len(layers) * width
        // values on the cache's device (documented in the stub), written on `stream` only.
        py.detach(|| unsafe { f.submit(ids_ptr, s, opts) }).py_err()
    }

    #[pyo3(signature = (ids_ptr, layers, width, stream = None, generation = 0, priority = "prefetch",
                        future = false, skip_routed = false, remember = false, forget = false, feed_only = false,
                        after_next = false))]
    #[allow(clippy::too_many_arguments)]
    fn submit_predicted(
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
        let lane = Lane::parse(priority).py_err()?;
        let s = stream_or_default(stream)?;
        let opts = DeferredOptions {
            layers,
            width,
            generation,
            lane,
            future,
            skip_routed,
            remember,
            forget,
            routed: false,
            feed_only,
            after_next,
        };
        let f = &self.feed;
        // SAFETY: the caller passes the address of a live int64 tensor of len(layers) * width
        // elements on the cache's device (documented in the stub), written on `stream` only.
        py.detach(|| unsafe { f.submit(ids_ptr, s, opts) }).py_err()
    }

    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let t = timeout_arg(timeout)?;
        let f = &self.feed;
        Ok(py.detach(|| f.wait_idle(t)))
    }

    fn take_error(&self) -> Option<String> {
        self.feed.take_error()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let (submitted, handled, queued) = self.feed.counts();
        d.set_item("deferred_submitted", submitted as f64)?;
        d.set_item("deferred_handled", handled as f64)?;
        d.set_item("deferred_queued", queued as f64)?;
        let (hits, needed, predicted) = self.feed.prediction_counts();
        d.set_item("predicted_hits", hits as f64)?;
        d.set_item("predicted_needed", needed as f64)?;
        d.set_item("predicted_experts", predicted as f64)?;
        Ok(d)
    }

    fn reset_stats(&self) {
        self.feed.reset_prediction_counts();
    }

    fn close(&self, py: Python<'_>) {
        let f = &self.feed;
        py.detach(|| f.shutdown())
    }

    #[getter]
    fn closed(&self) -> bool {
        self.feed.is_shut_down()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) {
        self.close(py)
    }

    fn __repr__(&self) -> String {
        let (submitted, handled, _) = self.feed.counts();
        format!("RoutingFeed(submitted={submitted}, handled={handled}{})", if self.feed.is_shut_down() { ", closed" } else { "" })
    }
}
