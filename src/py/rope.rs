//! `_core.apply_rope`.

use numpy::{Element, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::kernels::rope::{self as kernel, RopeLayout, RopeSpec, RopeStyle};
use crate::kernels::storage::Storage;
use crate::kernels::Float;
use crate::py::arrays::{choice, fill_new, floats, shape_str, slice, Floats};

/// Rotates `x` (4-d, `layout` order) by the tables `cos`/`sin` (`(seq, r/2)` or `(batch, seq, r/2)`).
#[pyfunction]
pub fn apply_rope<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    cos: &Bound<'py, PyAny>,
    sin: &Bound<'py, PyAny>,
    style: &str,
    layout: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let style =
        choice("style", style, &[("half", RopeStyle::Half), ("interleaved", RopeStyle::Interleaved)])?;
    let layout = choice("layout", layout, &[("bhsd", RopeLayout::Bhsd), ("bshd", RopeLayout::Bshd)])?;
    match (floats(x, "x")?, floats(cos, "cos")?, floats(sin, "sin")?) {
        (Floats::F32(x), Floats::F32(c), Floats::F32(s)) => rotate(py, &x, &c, &s, style, layout),
        (Floats::F64(x), Floats::F64(c), Floats::F64(s)) => rotate(py, &x, &c, &s, style, layout),
        (Floats::F16(x), Floats::F32(c), Floats::F32(s)) => rotate(py, &x, &c, &s, style, layout),
        (Floats::Bf16(x), Floats::F32(c), Floats::F32(s)) => rotate(py, &x, &c, &s, style, layout),
        _ => Err(PyTypeError::new_err(
            "cos, sin: must have the dtype of x (float32 or float64), or float32 for a float16 or bfloat16 x",
        )),
    }
}

fn rotate<'py, X: Storage<Compute = T> + Element, T: Float + Element>(
    py: Python<'py>,
    x: &PyReadonlyArrayDyn<'py, X>,
    cos: &PyReadonlyArrayDyn<'py, T>,
    sin: &PyReadonlyArrayDyn<'py, T>,
    style: RopeStyle,
    layout: RopeLayout,
) -> PyResult<Bound<'py, PyAny>> {
    let spec = table_shape(x.shape(), cos.shape(), sin.shape(), layout, style)?;
    let (xs, cs, ss) = (slice(x, "x")?, slice(cos, "cos")?, slice(sin, "sin")?);
    fill_new(py, x.shape(), "out (the shape of x)", &[], |out, par| {
        kernel::apply_rope(xs, cs, ss, spec, out, par)
    })
}

/// Checks that the tables fit `x` and describes the call.
fn table_shape(
    x: &[usize],
    cos: &[usize],
    sin: &[usize],
    layout: RopeLayout,
    style: RopeStyle,
) -> PyResult<RopeSpec> {
    let [batch, a, b, head_dim] = *x else {
        let want = match layout {
            RopeLayout::Bhsd => "(batch, heads, seq, head_dim)",
            RopeLayout::Bshd => "(batch, seq, heads, head_dim)",
        };
        return Err(PyValueError::new_err(format!(
            "x: expected a 4-d array {want}, got shape {}",
            shape_str(x)
        )));
    };
    let (heads, seq) = match layout {
        RopeLayout::Bhsd => (a, b),
        RopeLayout::Bshd => (b, a),
    };
    if cos != sin {
        return Err(PyValueError::new_err(format!(
            "cos, sin: shapes differ: {} and {}",
            shape_str(cos),
            shape_str(sin)
        )));
    }
    let bad = || {
        PyValueError::new_err(format!(
            "cos: expected shape ({seq}, r/2) or ({batch}, {seq}, r/2) with r <= head_dim = {head_dim} \
             for x of shape {}, got {}",
            shape_str(x),
            shape_str(cos)
        ))
    };
    let (per_batch_tables, half) = match *cos {
        [s, h] if s == seq => (false, h),
        [bt, s, h] if bt == batch && s == seq => (true, h),
        _ => return Err(bad()),
    };
    if 2 * half > head_dim {
        return Err(bad());
    }
    Ok(RopeSpec { batch, heads, seq, head_dim, half, per_batch_tables, layout, style })
}
