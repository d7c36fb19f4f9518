//! `_core.norm`, `_core.gelu` and `_core.silu_mul`: the rest of a transformer block.

use numpy::{Element, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use pyo3::IntoPyObjectExt;

use crate::kernels::block::{self as kernel, Gelu, NormInputs, NormKind, NormSpec};
use crate::kernels::storage::Storage;
use crate::py::arrays::{choice, fill_into, fill_new, floats, output, run, slice, typed, Floats};

/// Normalizes the rows of `n` elements of `x` (plus `residual`): `(out, summed)` with a residual,
/// else `out`. `weight` and `bias` are float64 arrays of `n` (or None). The normalized rows are
/// written into `out` when given; with a residual, `out` may also be a pair of arrays (or None)
/// for the norm and the sum.
#[pyfunction]
#[pyo3(signature = (x, residual, weight, bias, n, eps, kind, out=None))]
#[allow(clippy::too_many_arguments)]
pub fn norm<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    residual: Option<&Bound<'py, PyAny>>,
    weight: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    n: usize,
    eps: f64,
    kind: &str,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let kind = choice("kind", kind, &[("layer", NormKind::Layer), ("rms", NormKind::Rms)])?;
    let weight = weight.map(|w| typed::<f64>(w, "weight", "float64")).transpose()?;
    let bias = bias.map(|b| typed::<f64>(b, "bias", "float64")).transpose()?;
    let params = Params {
        weight: weight.as_ref().map(|w| slice(w, "weight")).transpose()?,
        bias: bias.as_ref().map(|b| slice(b, "bias")).transpose()?,
        n,
        eps,
        kind,
        out,
    };
    let residual = residual.map(|r| floats(r, "residual")).transpose()?;
    match (floats(x, "x")?, residual) {
        (Floats::F32(x), None) => normalize(py, &x, None, params),
        (Floats::F64(x), None) => normalize(py, &x, None, params),
        (Floats::F16(x), None) => normalize(py, &x, None, params),
        (Floats::Bf16(x), None) => normalize(py, &x, None, params),
        (Floats::F32(x), Some(Floats::F32(r))) => normalize(py, &x, Some(&r), params),
        (Floats::F64(x), Some(Floats::F64(r))) => normalize(py, &x, Some(&r), params),
        (Floats::F16(x), Some(Floats::F16(r))) => normalize(py, &x, Some(&r), params),
        (Floats::Bf16(x), Some(Floats::Bf16(r))) => normalize(py, &x, Some(&r), params),
        _ => Err(PyTypeError::new_err("residual: expected the dtype of x")),
    }
}

/// The parameters of a [`norm`] call besides its arrays of `x`'s dtype, and `out`.
struct Params<'a, 'py> {
    weight: Option<&'a [f64]>,
    bias: Option<&'a [f64]>,
    n: usize,
    eps: f64,
    kind: NormKind,
    out: Option<&'a Bound<'py, PyAny>>,
}

fn normalize<'py, X: Storage + Element>(
    py: Python<'py>,
    x: &PyReadonlyArrayDyn<'py, X>,
    residual: Option<&PyReadonlyArrayDyn<'py, X>>,
    p: Params<'_, 'py>,
) -> PyResult<Bound<'py, PyAny>> {
    if p.n == 0 || x.len() % p.n != 0 {
        return Err(PyValueError::new_err(format!(
            "n: {} does not divide the {} elements of x",
            p.n,
            x.len()
        )));
    }
    let spec = NormSpec { rows: x.len() / p.n, n: p.n, eps: p.eps, kind: p.kind };
    let inputs = NormInputs {
        x: slice(x, "x")?,
        residual: residual.map(|r| slice(r, "residual")).transpose()?,
        weight: p.weight,
        bias: p.bias,
    };
    let shape = x.shape();
    if inputs.residual.is_some() {
        // `out`: the norm's array, or a pair of arrays for the norm and the sum (either None).
        let (names, (first, second)) = match p.out.and_then(|o| o.cast::<PyTuple>().ok()) {
            Some(t) if t.len() == 2 => (["out[0]", "out[1]"], (Some(t.get_item(0)?), Some(t.get_item(1)?))),
            Some(t) => {
                return Err(PyValueError::new_err(format!(
                    "out: expected an array or a pair of arrays (the norm's, the sum's), got {} items",
                    t.len()
                )))
            }
            None => (["out", "summed"], (p.out.cloned(), None)),
        };
        let (out, out_borrow, a) = output::<X>(py, first.as_ref(), names[0], shape, "the shape of x")?;
        let (summed, summed_borrow, b) = output::<X>(py, second.as_ref(), names[1], shape, "the shape of x")?;
        run(py, &[], |par| kernel::norm(inputs, spec, a, Some(b), par))?;
        drop((out_borrow, summed_borrow));
        PyTuple::new(py, [out, summed])?.into_bound_py_any(py)
    } else {
        fill_into(py, p.out, shape, "the shape of x", &[], |out, par| {
            kernel::norm(inputs, spec, out, None, par)
        })
    }
}

/// GELU of every element of `x`: `approximate` "none" (the erf form) or "tanh".
#[pyfunction]
pub fn gelu<'py>(py: Python<'py>, x: &Bound<'py, PyAny>, approximate: &str) -> PyResult<Bound<'py, PyAny>> {
    let form = choice("approximate", approximate, &[("none", Gelu::Erf), ("tanh", Gelu::Tanh)])?;
    fn run<'py, X: Storage + Element>(
        py: Python<'py>,
        x: &PyReadonlyArrayDyn<'py, X>,
        form: Gelu,
    ) -> PyResult<Bound<'py, PyAny>> {
        let xs = slice(x, "x")?;
        fill_new(py, x.shape(), "out", &[], |out, par| kernel::gelu(xs, form, out, par))
    }
    match floats(x, "x")? {
        Floats::F32(x) => run(py, &x, form),
        Floats::F64(x) => run(py, &x, form),
        Floats::F16(x) => run(py, &x, form),
        Floats::Bf16(x) => run(py, &x, form),
    }
}

/// `silu(gate) * up`, elementwise (same shape and dtype).
#[pyfunction]
pub fn silu_mul<'py>(
    py: Python<'py>,
    gate: &Bound<'py, PyAny>,
    up: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    fn run<'py, X: Storage + Element>(
        py: Python<'py>,
        gate: &PyReadonlyArrayDyn<'py, X>,
        up: &PyReadonlyArrayDyn<'py, X>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if gate.shape() != up.shape() {
            return Err(PyValueError::new_err("up: expected the shape of gate"));
        }
        let (g, u) = (slice(gate, "gate")?, slice(up, "up")?);
        fill_new(py, gate.shape(), "out", &[], |out, par| kernel::silu_mul_into(g, u, out, par))
    }
    match (floats(gate, "gate")?, floats(up, "up")?) {
        (Floats::F32(g), Floats::F32(u)) => run(py, &g, &u),
        (Floats::F64(g), Floats::F64(u)) => run(py, &g, &u),
        (Floats::F16(g), Floats::F16(u)) => run(py, &g, &u),
        (Floats::Bf16(g), Floats::Bf16(u)) => run(py, &g, &u),
        _ => Err(PyTypeError::new_err("up: expected the dtype of gate")),
    }
}
