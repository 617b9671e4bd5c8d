//! `Backend`: where slots live and how bytes reach them.

use pyo3::prelude::*;

use super::errors::IntoPy;
use crate::device::{self, SharedDevice};

/// Where slots live and how bytes reach them (see the .pyi stub).
#[pyclass(frozen, module = "sida_moe._native", name = "Backend")]
pub struct PyBackend {
    pub(super) device: SharedDevice,
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
