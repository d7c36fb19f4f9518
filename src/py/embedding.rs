//! `_core.embedding` and `_core.embedding_bag`.

use numpy::{Element, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::kernels::embedding::{self as kernel, BagMode, Bags, TokenId};
use crate::kernels::storage::Storage;
use crate::py::arrays::{choice, expect_ndim, fill_new, floats, ints, slice, typed, with_ints, Floats, Ints};

/// `(rows, dim)` of a 2-d embedding table.
fn table_dims<T: Element>(weight: &PyReadonlyArrayDyn<'_, T>) -> PyResult<(usize, usize)> {
    let shape = weight.shape();
    expect_ndim(shape, 2, "weight", "(num_embeddings, embedding_dim)")?;
    Ok((shape[0], shape[1]))
}

/// `out[..., :] = weight[ids[...], :] (* scale)`; returns `ids.shape + (dim,)`.
#[pyfunction]
#[pyo3(signature = (ids, weight, scale=None))]
pub fn embedding<'py>(
    py: Python<'py>,
    ids: &Bound<'py, PyAny>,
    weight: &Bound<'py, PyAny>,
    scale: Option<f64>,
) -> PyResult<Bound<'py, PyAny>> {
    let ids = ints(ids, "ids")?;
    if let Some(s) = scale.filter(|s| !s.is_finite()) {
        return Err(PyValueError::new_err(format!("scale: must be finite, got {s}")));
    }
    match floats(weight, "weight")? {
        Floats::F32(w) => lookup(py, &ids, &w, scale.map(|s| s as f32)),
        Floats::F64(w) => lookup(py, &ids, &w, scale),
        Floats::F16(w) => lookup(py, &ids, &w, scale.map(|s| s as f32)),
        Floats::Bf16(w) => lookup(py, &ids, &w, scale.map(|s| s as f32)),
    }
}

fn lookup<'py, T: Storage + Element>(
    py: Python<'py>,
    ids: &Ints<'py>,
    weight: &PyReadonlyArrayDyn<'py, T>,
    scale: Option<T::Compute>,
) -> PyResult<Bound<'py, PyAny>> {
    let (rows, dim) = table_dims(weight)?;
    let table = slice(weight, "weight")?;
    with_ints!(ids, a => gather(py, slice(a, "ids")?, a.shape(), table, rows, dim, scale))
}

fn gather<'py, T: Storage + Element, I: TokenId>(
    py: Python<'py>,
    ids: &[I],
    ids_shape: &[usize],
    table: &[T],
    rows: usize,
    dim: usize,
    scale: Option<T::Compute>,
) -> PyResult<Bound<'py, PyAny>> {
    let shape: Vec<usize> = ids_shape.iter().copied().chain([dim]).collect();
    fill_new(py, &shape, "out (ids.shape + (dim,): set by ids and weight)", ids_shape, |out, par| {
        kernel::embedding(ids, table, rows, dim, scale, out, par)
    })
}

/// Bag reductions over 1-d `ids` split at `bounds` (`bags + 1` entries); returns `(bags, dim)`.
#[pyfunction]
#[pyo3(signature = (ids, weight, bounds, mode, per_sample_weights=None, padding_idx=None))]
pub fn embedding_bag<'py>(
    py: Python<'py>,
    ids: &Bound<'py, PyAny>,
    weight: &Bound<'py, PyAny>,
    bounds: &Bound<'py, PyAny>,
    mode: &str,
    per_sample_weights: Option<&Bound<'py, PyAny>>,
    padding_idx: Option<i64>,
) -> PyResult<Bound<'py, PyAny>> {
    let mode =
        choice("mode", mode, &[("sum", BagMode::Sum), ("mean", BagMode::Mean), ("max", BagMode::Max)])?;
    let ids = ints(ids, "ids")?;
    let bounds = typed::<i64>(bounds, "offsets", "int64")?;
    expect_ndim(bounds.shape(), 1, "offsets", "of bag boundaries")?;
    let bounds: Vec<usize> = slice(&bounds, "offsets")?
        .iter()
        .map(|&b| usize::try_from(b))
        .collect::<Result<_, _>>()
        .map_err(|_| PyValueError::new_err("offsets: must not be negative"))?;
    let psw = per_sample_weights.map(|w| typed::<f64>(w, "per_sample_weights", "float64")).transpose()?;
    let psw = psw.as_ref().map(|w| slice(w, "per_sample_weights")).transpose()?;
    let padding_idx = padding_idx
        .map(|p| {
            usize::try_from(p).map_err(|_| PyValueError::new_err(format!("padding_idx: {p} is negative")))
        })
        .transpose()?;
    let weight = floats(weight, "weight")?;
    with_ints!(&ids, a => {
        expect_ndim(a.shape(), 1, "ids", "(flattened bags)")?;
        let bags = Bags { ids: slice(a, "ids")?, bounds: &bounds, per_sample_weights: psw, padding_idx };
        match &weight {
            Floats::F32(w) => reduce(py, &bags, w, mode),
            Floats::F64(w) => reduce(py, &bags, w, mode),
            Floats::F16(w) => reduce(py, &bags, w, mode),
            Floats::Bf16(w) => reduce(py, &bags, w, mode),
        }
    })
}

fn reduce<'py, T: Storage + Element, I: TokenId>(
    py: Python<'py>,
    bags: &Bags<'_, I>,
    weight: &PyReadonlyArrayDyn<'py, T>,
    mode: BagMode,
) -> PyResult<Bound<'py, PyAny>> {
    let (rows, dim) = table_dims(weight)?;
    let table = slice(weight, "weight")?;
    let shape = [bags.bounds.len().saturating_sub(1), dim];
    fill_new(
        py,
        &shape,
        "out (bags, dim: set by offsets or ids, and weight)",
        &[bags.ids.len()],
        |out, par| kernel::embedding_bag(bags, table, rows, dim, mode, out, par),
    )
}
