//! `_core.pack_bf16` and `_core.linear_bf16`: the matrix product of a linear layer with bfloat16
//! weights (`kernels/linear.rs`).

use numpy::{Element, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::kernels::linear::{self as kernel, Activation, Shape};
use crate::kernels::storage::Storage;
use crate::py::arrays::{fill_new, floats, slice, typed, Floats};

/// The weight `weight` (`n × k`, any float dtype) rounded once to bfloat16 and packed: a uint32
/// array for [`linear_bf16`].
#[pyfunction]
pub fn pack_bf16<'py>(py: Python<'py>, weight: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    fn run<'py, X: Storage + Element>(
        py: Python<'py>,
        w: &PyReadonlyArrayDyn<'py, X>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let &[n, k] = w.shape() else {
            return Err(PyValueError::new_err(format!(
                "weight: expected 2 dimensions, got shape {:?}",
                w.shape()
            )));
        };
        let len = kernel::packed_len(n, k)
            .ok_or_else(|| PyValueError::new_err(format!("weight: shape ({n}, {k}) is too large")))?;
        let ws = slice(w, "weight")?;
        fill_new(py, &[len], "packed weight", &[], |out, par| kernel::pack_weight(ws, n, k, out, par))
    }
    match floats(weight, "weight")? {
        Floats::F32(w) => run(py, &w),
        Floats::F64(w) => run(py, &w),
        Floats::F16(w) => run(py, &w),
        Floats::Bf16(w) => run(py, &w),
    }
}

/// `x · Wᵀ + bias` for `x` of shape `(..., k)` (float32 or bfloat16; the output has its dtype and
/// shape `(..., n)`), `packed` from [`pack_bf16`] of an `n × k` weight, `bias` float32 of `n`.
#[pyfunction]
#[pyo3(signature = (x, packed, bias, n, k))]
pub fn linear_bf16<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    packed: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
    n: usize,
    k: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let packed = typed::<u32>(packed, "packed", "uint32")?;
    let bias = bias.map(|b| typed::<f32>(b, "bias", "float32")).transpose()?;
    let words = slice(&packed, "packed")?;
    let bias = bias.as_ref().map(|b| slice(b, "bias")).transpose()?;
    fn run<'py, X: Activation + Element>(
        py: Python<'py>,
        x: &PyReadonlyArrayDyn<'py, X>,
        words: &[u32],
        bias: Option<&[f32]>,
        (n, k): (usize, usize),
    ) -> PyResult<Bound<'py, PyAny>> {
        let shape = x.shape();
        if shape.last() != Some(&k) {
            return Err(PyValueError::new_err(format!(
                "x: expected a last axis of {k}, got shape {shape:?}"
            )));
        }
        let m = shape[..shape.len() - 1].iter().product();
        let mut out_shape = shape.to_vec();
        *out_shape.last_mut().expect("checked above") = n;
        let xs = slice(x, "x")?;
        fill_new(py, &out_shape, "out", &[], |out, par| {
            kernel::linear(xs, words, bias, Shape { m, k, n }, out, par)
        })
    }
    match floats(x, "x")? {
        Floats::F32(x) => run(py, &x, words, bias, (n, k)),
        Floats::Bf16(x) => run(py, &x, words, bias, (n, k)),
        _ => Err(PyTypeError::new_err("x: expected a float32 or bfloat16 array")),
    }
}
