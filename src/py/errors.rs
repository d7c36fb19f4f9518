//! Python exceptions: the crate's `InternalError`, the mapping of [`KernelError`] onto the error
//! contract, and the guard that turns an escaped panic into `InternalError`.

use std::any::Any;

use pyo3::create_exception;
use pyo3::exceptions::{PyIndexError, PyMemoryError, PyRuntimeError, PyValueError};
use pyo3::PyErr;

use crate::error::KernelError;

create_exception!(
    attnkit,
    InternalError,
    PyRuntimeError,
    "A bug in attnkit (a Rust panic caught at the boundary). Please report it with the call that raised it."
);

/// `flat` as an index into an array of `shape`, written like NumPy: `[1, 2]`, or `` for 0-d.
fn multi_index(mut flat: usize, shape: &[usize]) -> String {
    let mut idx = vec![0usize; shape.len()];
    for (slot, &dim) in idx.iter_mut().zip(shape).rev() {
        if dim > 0 {
            *slot = flat % dim;
            flat /= dim;
        }
    }
    if idx.is_empty() {
        String::new()
    } else {
        format!("[{}]", idx.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", "))
    }
}

/// Maps a kernel error onto the Python exception the error contract names. `index_shape` is the
/// shape of the argument an `IndexOutOfRange` refers to, so its position reads as a NumPy index.
pub fn to_pyerr(err: KernelError, index_shape: &[usize]) -> PyErr {
    match err {
        KernelError::InvalidArgument { .. } => PyValueError::new_err(err.to_string()),
        KernelError::IndexOutOfRange { arg, flat_index, value, size } => PyIndexError::new_err(format!(
            "{arg}{} = {value} is out of range for a table of {size} rows (valid ids are 0 to {})",
            multi_index(flat_index, index_shape),
            size as i128 - 1
        )),
        KernelError::Allocation { elements: None, .. } => PyValueError::new_err(err.to_string()),
        KernelError::Allocation { elements: Some(_), .. } => PyMemoryError::new_err(err.to_string()),
    }
}

/// The `InternalError` for a panic payload.
pub fn from_panic(payload: Box<dyn Any + Send>) -> PyErr {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string());
    InternalError::new_err(format!("attnkit bug: a Rust panic reached the Python boundary: {what}"))
}
