//! PyO3 bindings only: argument conversion, error mapping, GIL release; one file per Python class.
//! No runtime logic here.

mod args;
mod backend;
mod errors;
mod pool;
mod routing_feed;
mod simulate;
mod slot_cache;
mod stream_wait_probe;

use pyo3::prelude::*;

#[pymodule]
#[pyo3(name = "_native")]
fn sida_moe_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register_exceptions(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAX_COPY_WORKERS", crate::slot_cache::MAX_COPY_WORKERS)?;
    m.add_class::<backend::PyBackend>()?;
    m.add_class::<pool::PyExpertPool>()?;
    m.add_class::<slot_cache::PySlotCache>()?;
    m.add_class::<routing_feed::PyRoutingFeed>()?;
    m.add_class::<stream_wait_probe::PyStreamWaitProbe>()?;
    m.add_function(wrap_pyfunction!(simulate::simulate_policy, m)?)?;
    m.add_function(wrap_pyfunction!(slot_cache::check_cache_options, m)?)?;
    Ok(())
}
