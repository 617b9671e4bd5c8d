//! `simulate_policy`: an eviction policy replayed over a trace of visits, without a device.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::args::{type_name, visit_list};
use super::errors::IntoPy;
use crate::simulate;
use crate::policy::PolicyKind;

/// `path` of simulate_policy: one name for every visit (default "acquire") or a sequence of one per visit.
fn sim_paths(path: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<simulate::SimPath>> {
    let Some(path) = path else { return Ok(vec![simulate::SimPath::Acquire]) };
    if let Ok(name) = path.extract::<String>() {
        return Ok(vec![simulate::SimPath::parse(&name).py_err()?]);
    }
    let names: Vec<String> = path.extract().map_err(|_| {
        PyTypeError::new_err(format!("path must be \"acquire\", \"table\", \"prefetch\" or a sequence of them, got {}", type_name(path)))
    })?;
    names.iter().map(|n| simulate::SimPath::parse(n).py_err()).collect()
}

#[pyfunction]
#[pyo3(signature = (policy, num_slots, trace, future = true, path = None, count_from = 0))]
pub(super) fn simulate_policy<'py>(
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
    let keys = simulate::trace_keys(&trace).py_err()?;
    let c = py.detach(|| simulate::simulate_steps(kind, num_slots, &keys, future, &paths, count_from)).py_err()?;
    let d = PyDict::new(py);
    d.set_item("hits", c.hits)?;
    d.set_item("misses", c.misses)?;
    d.set_item("evictions", c.evictions)?;
    d.set_item("loads", c.loads)?;
    d.set_item("prefetches", c.prefetches)?;
    d.set_item("prefetch_used", c.prefetch_used)?;
    Ok(d)
}
