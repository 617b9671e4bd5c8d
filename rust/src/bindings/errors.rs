//! The runtime's Python exception classes and the mapping of core errors onto them.

use pyo3::exceptions::{PyKeyError, PyMemoryError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use crate::error::Error;

// Created at import with `type(name, bases, ns)`: several inherit from a builtin too (e.g.
// BudgetError is a ValueError), which `create_exception!` cannot express.
pub(super) static SIDA_MOE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
pub(super) static BUDGET_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
pub(super) static UNKNOWN_EXPERT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
pub(super) static SLOT_STATE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
pub(super) static CLOSED_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
pub(super) static CUDA_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
pub(super) static INVALID_ARGUMENT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
pub(super) static LOAD_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
pub(super) static OUT_OF_MEMORY_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

pub(super) fn make_exception<'py>(
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

pub(super) fn b(t: Bound<'_, PyType>) -> Bound<'_, PyAny> {
    t.into_any()
}

pub(super) fn register_exceptions(m: &Bound<'_, PyModule>) -> PyResult<()> {
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
pub(super) fn to_py(e: Error) -> PyErr {
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

pub(super) trait IntoPy<T> {
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for crate::error::Result<T> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
