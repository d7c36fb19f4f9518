//! `_core.pack_bf16`, `_core.pack_f32`, `_core.linear_bf16` and `_core.linear_f32`: the matrix
//! product of a linear layer with packed bfloat16 or float32 weights (`kernels/linear.rs`).

use numpy::{Element, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::kernels::linear::{
    self as kernel, Bf16Weights, Call, Epilogue, F32Weights, Operand, Shape, Weights,
};
use crate::kernels::storage::Bf16;
use crate::kernels::storage::Storage;
use crate::py::arrays::{choice, fill_into, fill_new, floats, slice, typed, Floats};

/// The weight `weight` (`n × k`, any float dtype) rounded once to `W`'s words and packed.
fn pack<'py, W: Weights>(py: Python<'py>, weight: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>>
where
    W::Word: Element,
{
    fn run<'py, W: Weights, X: Storage + Element>(
        py: Python<'py>,
        w: &PyReadonlyArrayDyn<'py, X>,
    ) -> PyResult<Bound<'py, PyAny>>
    where
        W::Word: Element,
    {
        let &[n, k] = w.shape() else {
            return Err(PyValueError::new_err(format!(
                "weight: expected 2 dimensions, got shape {:?}",
                w.shape()
            )));
        };
        let len = kernel::packed_len::<W>(n, k)
            .ok_or_else(|| PyValueError::new_err(format!("weight: shape ({n}, {k}) is too large")))?;
        let ws = slice(w, "weight")?;
        fill_new(py, &[len], "packed weight", &[], |out, par| kernel::pack_weight::<W, X>(ws, n, k, out, par))
    }
    match floats(weight, "weight")? {
        Floats::F32(w) => run::<W, _>(py, &w),
        Floats::F64(w) => run::<W, _>(py, &w),
        Floats::F16(w) => run::<W, _>(py, &w),
        Floats::Bf16(w) => run::<W, _>(py, &w),
    }
}

/// The weight `weight` (`n × k`, any float dtype) rounded once to bfloat16 and packed: a uint32
/// array for [`linear_bf16`].
#[pyfunction]
pub fn pack_bf16<'py>(py: Python<'py>, weight: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    pack::<Bf16Weights>(py, weight)
}

/// The weight `weight` (`n × k`, any float dtype) rounded once to float32 and packed: a float32
/// array for [`linear_f32`].
#[pyfunction]
pub fn pack_f32<'py>(py: Python<'py>, weight: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    pack::<F32Weights>(py, weight)
}

/// `activation(x · Wᵀ + bias)` for `x` of shape `(..., k)` (float32 or bfloat16), `packed` from
/// [`pack_bf16`] of an `n × k` weight, `bias` float32 of `n`; `activation` "none" or "gelu"; the
/// output has shape `(..., n)` and dtype `out_dtype` ("float32" or "bfloat16"; None: x's), and
/// is written into `out` when given.
#[pyfunction]
#[pyo3(signature = (x, packed, bias, n, k, activation="none", out_dtype=None, out=None))]
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
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let call = Args::<Bf16Weights>::new(packed, "uint32", bias, activation, n, k)?;
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
        (Floats::F32(x), None | Some(false)) => call.run::<f32, f32>(py, &x, out, kernel::linear),
        (Floats::F32(x), Some(true)) => call.run::<f32, Bf16>(py, &x, out, kernel::linear),
        (Floats::Bf16(x), Some(false)) => call.run::<Bf16, f32>(py, &x, out, kernel::linear),
        (Floats::Bf16(x), None | Some(true)) => call.run::<Bf16, Bf16>(py, &x, out, kernel::linear),
        _ => Err(PyTypeError::new_err("x: expected a float32 or bfloat16 array")),
    }
}

/// `activation(x · Wᵀ + bias)` for float32 `x` of shape `(..., k)`, `packed` from [`pack_f32`]
/// of an `n × k` weight, `bias` float32 of `n`; `activation` "none" or "gelu"; the output is
/// float32 of shape `(..., n)`, written into `out` when given.
#[pyfunction]
#[pyo3(signature = (x, packed, bias, n, k, activation="none", out=None))]
#[allow(clippy::too_many_arguments)]
pub fn linear_f32<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    packed: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
    n: usize,
    k: usize,
    activation: &str,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let call = Args::<F32Weights>::new(packed, "float32", bias, activation, n, k)?;
    let x = typed::<f32>(x, "x", "float32")?;
    call.run::<f32, f32>(py, &x, out, kernel::linear_f32)
}

/// One call's arguments besides `x`: the packed weight (words of `W`), the bias, the epilogue,
/// the weight's shape.
struct Args<'py, W: Weights>
where
    W::Word: Element,
{
    packed: PyReadonlyArrayDyn<'py, W::Word>,
    bias: Option<PyReadonlyArrayDyn<'py, f32>>,
    epilogue: Epilogue,
    n: usize,
    k: usize,
}

impl<'py, W: Weights> Args<'py, W>
where
    W::Word: Element,
{
    /// The arguments checked: `packed` of dtype `word` (its NumPy name), `bias` float32,
    /// `activation` "none" or "gelu".
    fn new(
        packed: &Bound<'py, PyAny>,
        word: &str,
        bias: Option<&Bound<'py, PyAny>>,
        activation: &str,
        n: usize,
        k: usize,
    ) -> PyResult<Self> {
        Ok(Self {
            packed: typed::<W::Word>(packed, "packed", word)?,
            bias: bias.map(|b| typed::<f32>(b, "bias", "float32")).transpose()?,
            epilogue: choice(
                "activation",
                activation,
                &[("none", Epilogue::None), ("gelu", Epilogue::Gelu)],
            )?,
            n,
            k,
        })
    }

    /// The product of `x` (`(..., k)`) by `kernel`, into `out` or a new `(..., n)` array of `Y`.
    fn run<X: Storage + Element, Y: Operand + Element>(
        &self,
        py: Python<'py>,
        x: &PyReadonlyArrayDyn<'py, X>,
        out: Option<&Bound<'py, PyAny>>,
        kernel: impl Fn(
                &[X],
                Call<'_, W>,
                &mut [std::mem::MaybeUninit<Y>],
                crate::pool::Par<'_>,
            ) -> Result<(), crate::error::KernelError>
            + Sync,
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
        let call = Call {
            packed: slice(&self.packed, "packed")?,
            bias: self.bias.as_ref().map(|b| slice(b, "bias")).transpose()?,
            epilogue: self.epilogue,
            shape: Shape { m, k, n },
        };
        fill_into::<Y>(py, out, &out_shape, "x.shape[:-1] + (out_features,)", &[], |out, par| {
            kernel(xs, call, out, par)
        })
    }
}
