//! The 16-bit dtypes as NumPy elements: `float16` (NumPy's own) and `bfloat16` (a custom dtype
//! that `ml_dtypes` registers when it is imported).
//!
//! bfloat16 has no fixed type number: NumPy assigns one when `ml_dtypes` registers the type. So
//! it is looked up in `sys.modules` when an array might be one, and never imported here: an array
//! of that dtype can only exist once `ml_dtypes` has been imported, and everything else works
//! without it.

use numpy::npyffi::{NPY_TYPES, PY_ARRAY_API};
use numpy::{Element, PyArrayDescr, PyArrayDescrMethods};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;

use crate::kernels::storage::{Bf16, F16};

// SAFETY: F16 is a `repr(transparent)` u16 holding binary16 bits, exactly NumPy's float16
// element; it is plain data (IS_COPY).
unsafe impl Element for F16 {
    const IS_COPY: bool = true;

    fn get_dtype(py: Python<'_>) -> Bound<'_, PyArrayDescr> {
        // SAFETY: PyArray_DescrFromType returns a new reference to the (static) descriptor of a
        // built-in type number; NPY_HALF is one.
        unsafe {
            let descr = PY_ARRAY_API.PyArray_DescrFromType(py, NPY_TYPES::NPY_HALF as _);
            Bound::from_owned_ptr(py, descr.cast()).cast_into_unchecked()
        }
    }

    fn clone_ref(&self, _py: Python<'_>) -> Self {
        *self
    }
}

static BFLOAT16: PyOnceLock<Py<PyArrayDescr>> = PyOnceLock::new();

/// `ml_dtypes.bfloat16`'s descriptor, if `ml_dtypes` has been imported (remembered once found).
pub fn bfloat16(py: Python<'_>) -> Option<Bound<'_, PyArrayDescr>> {
    if let Some(descr) = BFLOAT16.get(py) {
        return Some(descr.bind(py).clone());
    }
    let modules = py.import("sys").ok()?.getattr("modules").ok()?;
    let ml_dtypes = modules.cast::<PyDict>().ok()?.get_item("ml_dtypes").ok()??;
    let descr = PyArrayDescr::new(py, ml_dtypes.getattr("bfloat16").ok()?).ok()?;
    // bfloat16 is 2 bytes; anything else under that name is not the type this binding reads.
    (descr.itemsize() == 2).then(|| BFLOAT16.get_or_init(py, || descr.unbind()).bind(py).clone())
}

// SAFETY: Bf16 is a `repr(transparent)` u16 holding bfloat16 bits, exactly ml_dtypes' bfloat16
// element (2 bytes, checked in `bfloat16`); it is plain data (IS_COPY).
unsafe impl Element for Bf16 {
    const IS_COPY: bool = true;

    /// ml_dtypes' bfloat16 where it has been imported. Without it, a dtype no bfloat16 array has
    /// (NumPy's 2-byte void, `V2`): this binding only casts an array to `Bf16` after
    /// `bfloat16` found its dtype, and only makes `Bf16` outputs for such inputs.
    fn get_dtype(py: Python<'_>) -> Bound<'_, PyArrayDescr> {
        bfloat16(py)
            .unwrap_or_else(|| PyArrayDescr::new(py, "V2").unwrap_or_else(|_| PyArrayDescr::object(py)))
    }

    fn clone_ref(&self, _py: Python<'_>) -> Self {
        *self
    }
}
