//! Conversions of Python arguments into the core's types (sequences of ids, visits, stream
//! handles, lanes, timeouts); ranges are the core's to check.

use std::time::Duration;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::errors::to_py;
use crate::error::Error;

pub(super) fn non_negative(v: i64, what: &str) -> PyResult<u64> {
    if v < 0 {
        return Err(to_py(Error::InvalidArgument(format!("{what} must be >= 0, got {v}"))));
    }
    Ok(v as u64)
}

/// A sequence of ints from a list, tuple, range, numpy array or torch tensor (via `tolist()`).
pub(super) fn int_list(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<i64>> {
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

pub(super) fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
}

/// `[(layer, experts), ...]` with experts in any form `int_list` accepts.
pub(super) fn visit_list(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<(i64, Vec<i64>)>> {
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

/// Rows of device ids handed to the cache: a non-null address and at least one id per row.
pub(super) fn id_rows(ids_ptr: i64, width: i64) -> PyResult<(u64, usize)> {
    if width <= 0 {
        return Err(to_py(Error::InvalidArgument(format!("width must be >= 1 (ids per layer), got {width}"))));
    }
    if ids_ptr <= 0 {
        return Err(to_py(Error::InvalidArgument(format!("ids_ptr must be a non-null address, got {ids_ptr}"))));
    }
    Ok((ids_ptr as u64, width as usize))
}

pub(super) fn stream_arg(stream: &Bound<'_, PyAny>) -> PyResult<u64> {
    let v: i128 = stream.extract().map_err(|_| {
        to_py(Error::InvalidArgument("stream must be an int (a CUstream handle, 0 for the default stream)".into()))
    })?;
    if !(0..=u64::MAX as i128).contains(&v) {
        return Err(to_py(Error::InvalidArgument(format!("stream must be a non-negative handle, got {v}"))));
    }
    Ok(v as u64)
}

/// A stream argument that may be left out: the default stream.
pub(super) fn stream_or_default(stream: Option<&Bound<'_, PyAny>>) -> PyResult<u64> {
    Ok(stream.map(stream_arg).transpose()?.unwrap_or(0))
}

/// A wait's timeout: None waits as long as it takes.
pub(super) fn timeout_arg(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => Ok(Some(Duration::from_secs_f64(t))),
        Some(t) => Err(to_py(Error::InvalidArgument(format!("timeout must be >= 0 seconds or None, got {t}")))),
    }
}
