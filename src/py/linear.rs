//! `_core.pack_bf16` and `_core.linear_bf16`: the matrix product of a linear layer with bfloat16
//! weights (`kernels/linear.rs`).

use numpy::{Element, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::kernels::linear::{self as kernel, Epilogue, Operand, Shape};
use crate::kernels::storage::Bf16;
use crate::kernels::storage::Storage;
use crate::py::arrays::{choice, fill_new, floats, slice, typed, Floats};

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

/// `activation(x · Wᵀ + bias)` for `x` of shape `(..., k)` (float32 or bfloat16), `packed` from
/// [`pack_bf16`] of an `n × k` weight, `bias` float32 of `n`; `activation` "none" or "gelu"; the
/// output has shape `(..., n)` and dtype `out_dtype` ("float32" or "bfloat16"; None: x's).
#[pyfunction]
#[pyo3(signature = (x, packed, bias, n, k, activation="none", out_dtype=None))]
#[allow(clippy::too_many_arguments)]
pub fn linear_bf16<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    packed: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
    n: usize,
    k: usize,
    activation: &str,
    out_dtype: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    let epilogue = choice("activation", activation, &[("none", Epilogue::None), ("gelu", Epilogue::Gelu)])?;
    let packed = typed::<u32>(packed, "packed", "uint32")?;
    let bias = bias.map(|b| typed::<f32>(b, "bias", "float32")).transpose()?;
    let call = Call {
        words: slice(&packed, "packed")?,
        bias: bias.as_ref().map(|b| slice(b, "bias")).transpose()?,
        epilogue,
        n,
        k,
    };
    let out_bf16 = match out_dtype {
        None => None,
        Some(d) => Some(choice("out_dtype", d, &[("float32", false), ("bfloat16", true)])?),
    };
    if out_bf16 == Some(true) && crate::py::half::bfloat16(py).is_none() {
        return Err(PyTypeError::new_err(
            "out_dtype: bfloat16 outputs need ml_dtypes (import ml_dtypes first)",
        ));
    }
    match (floats(x, "x")?, out_bf16) {
        (Floats::F32(x), None | Some(false)) => call.run::<f32, f32>(py, &x),
        (Floats::F32(x), Some(true)) => call.run::<f32, Bf16>(py, &x),
        (Floats::Bf16(x), Some(false)) => call.run::<Bf16, f32>(py, &x),
        (Floats::Bf16(x), None | Some(true)) => call.run::<Bf16, Bf16>(py, &x),
        _ => Err(PyTypeError::new_err("x: expected a float32 or bfloat16 array")),
    }
}

/// One [`linear_bf16`] call's arguments besides `x`.
struct Call<'a> {
    words: &'a [u32],
    bias: Option<&'a [f32]>,
    epilogue: Epilogue,
    n: usize,
    k: usize,
}

impl Call<'_> {
    fn run<'py, X: Operand + Element, Y: Operand + Element>(
        &self,
        py: Python<'py>,
        x: &PyReadonlyArrayDyn<'py, X>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (n, k) = (self.n, self.k);
        let shape = x.shape();
        let leading = match shape.split_last() {
            Some((&last, leading)) if last == k => leading,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "x: expected a last axis of {k}, got shape {shape:?}"
                )))
            }
        };
        let m = leading.iter().product();
        let out_shape: Vec<usize> = leading.iter().copied().chain([n]).collect();
        let xs = slice(x, "x")?;
        fill_new::<Y>(py, &out_shape, "out", &[], |out, par| {
            kernel::linear(xs, self.words, self.bias, self.epilogue, Shape { m, k, n }, out, par)
        })
    }
}
