//! `_core.sinusoidal` and `_core.rope_cos_sin`: position tables from integer positions and float64
//! inverse frequencies.

use numpy::{Element, PyUntypedArrayMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

use crate::kernels::positional::{self as kernel, SinusoidLayout};
use crate::kernels::storage::{Bf16, Storage, F16};
use crate::py::arrays::{choice, expect_ndim, fill_new, fill_new_pair, slice, typed};

/// The output dtypes of the position tables.
enum Dtype {
    F32,
    F64,
    F16,
    Bf16,
}

/// The dtype `dtype` names.
fn dtype_of(py: Python<'_>, dtype: &str) -> PyResult<Dtype> {
    match dtype {
        "float32" => Ok(Dtype::F32),
        "float64" => Ok(Dtype::F64),
        "float16" => Ok(Dtype::F16),
        "bfloat16" if crate::py::half::bfloat16(py).is_some() => Ok(Dtype::Bf16),
        "bfloat16" => {
            Err(PyTypeError::new_err("dtype: bfloat16 arrays need ml_dtypes, which is not imported"))
        }
        other => Err(PyTypeError::new_err(format!(
            "dtype: expected float32, float64, float16 or bfloat16, got {other}"
        ))),
    }
}

/// Borrowed positions, their shape and the inverse frequencies.
struct Inputs<'py> {
    positions: numpy::PyReadonlyArrayDyn<'py, i64>,
    inv_freq: numpy::PyReadonlyArrayDyn<'py, f64>,
}

impl<'py> Inputs<'py> {
    fn new(positions: &Bound<'py, PyAny>, inv_freq: &Bound<'py, PyAny>) -> PyResult<Self> {
        let positions = typed::<i64>(positions, "positions", "int64")?;
        let inv_freq = typed::<f64>(inv_freq, "inv_freq", "float64")?;
        expect_ndim(inv_freq.shape(), 1, "inv_freq", "of inverse frequencies")?;
        Ok(Self { positions, inv_freq })
    }

    fn shape_with(&self, last: usize) -> Vec<usize> {
        self.positions.shape().iter().copied().chain([last]).collect()
    }
}

/// Sinusoidal encodings of `positions`; returns `positions.shape + (2 * len(inv_freq),)`.
#[pyfunction]
pub fn sinusoidal<'py>(
    py: Python<'py>,
    positions: &Bound<'py, PyAny>,
    inv_freq: &Bound<'py, PyAny>,
    layout: &str,
    dtype: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let layout = choice(
        "layout",
        layout,
        &[("interleaved", SinusoidLayout::Interleaved), ("halves", SinusoidLayout::Halves)],
    )?;
    let inputs = Inputs::new(positions, inv_freq)?;
    match dtype_of(py, dtype)? {
        Dtype::F32 => sinusoidal_typed::<f32>(py, &inputs, layout),
        Dtype::F64 => sinusoidal_typed::<f64>(py, &inputs, layout),
        Dtype::F16 => sinusoidal_typed::<F16>(py, &inputs, layout),
        Dtype::Bf16 => sinusoidal_typed::<Bf16>(py, &inputs, layout),
    }
}

fn sinusoidal_typed<'py, T: Storage + Element>(
    py: Python<'py>,
    inputs: &Inputs<'py>,
    layout: SinusoidLayout,
) -> PyResult<Bound<'py, PyAny>> {
    let (positions, inv_freq) =
        (slice(&inputs.positions, "positions")?, slice(&inputs.inv_freq, "inv_freq")?);
    let shape = inputs.shape_with(2 * inv_freq.len());
    fill_new::<T>(py, &shape, "out (positions.shape + (dim,): set by positions and dim)", &[], |out, par| {
        kernel::sinusoidal(positions, inv_freq, layout, out, par)
    })
}

/// Rotary tables `(cos, sin)`, each `positions.shape + (len(inv_freq),)`, times `attention_factor`.
#[pyfunction]
pub fn rope_cos_sin<'py>(
    py: Python<'py>,
    positions: &Bound<'py, PyAny>,
    inv_freq: &Bound<'py, PyAny>,
    attention_factor: f64,
    dtype: &str,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let inputs = Inputs::new(positions, inv_freq)?;
    match dtype_of(py, dtype)? {
        Dtype::F32 => tables_typed::<f32>(py, &inputs, attention_factor),
        Dtype::F64 => tables_typed::<f64>(py, &inputs, attention_factor),
        Dtype::F16 => tables_typed::<F16>(py, &inputs, attention_factor),
        Dtype::Bf16 => tables_typed::<Bf16>(py, &inputs, attention_factor),
    }
}

fn tables_typed<'py, T: Storage + Element>(
    py: Python<'py>,
    inputs: &Inputs<'py>,
    factor: f64,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let (positions, inv_freq) =
        (slice(&inputs.positions, "positions")?, slice(&inputs.inv_freq, "inv_freq")?);
    let shape = inputs.shape_with(inv_freq.len());
    fill_new_pair::<T>(
        py,
        &shape,
        ["cos (positions.shape + (rotary_dim // 2,))", "sin (positions.shape + (rotary_dim // 2,))"],
        |c, s, par| kernel::rope_cos_sin(positions, inv_freq, factor, c, s, par),
    )
}
