//! `_core.attention`: the fused attention kernel on 4-d arrays prepared by
//! `attnkit.scaled_dot_product_attention` (batch dimensions flattened, masks compact).

use numpy::{Element, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::kernels::attention::{
    self as kernel, Alignment, AttnFloat, AttnSpec, Masks, Outputs, StridedMask, Strides, KEY_STRIP,
};
use crate::kernels::storage::Storage;
use crate::py::arrays::{
    choice, empty_uninit, fill_new, floats, output, run, shape_str, slice, strided, typed, Floats,
};

/// `(out, lse, weights, scores)`.
type AttnResult<'py> =
    (Bound<'py, PyAny>, Option<Bound<'py, PyAny>>, Option<Bound<'py, PyAny>>, Option<Bound<'py, PyAny>>);

/// Attention over `(B, H, L, E)` arrays (`layout="bshd"`: `(B, L, H, E)`); returns
/// `(out (B, Hq, L, Ev), lse (B, Hq, L) or None, weights (B, Hq, L, S) or None, scores (B, Hq, L,
/// S) or None)`, `out` written into the caller's array where one is given.
#[pyfunction]
#[pyo3(signature = (query, key, value, layout, scale, softcap, causal, window, alignment,
                    bool_mask=None, float_mask=None, key_mask=None, alibi=None,
                    return_lse=false, return_weights=false, key_lengths=None,
                    query_lengths=None, sinks=None, return_scores=false, key_starts=None, key_strips=false,
                    out=None))]
#[allow(clippy::too_many_arguments)]
pub fn attention<'py>(
    py: Python<'py>,
    query: &Bound<'py, PyAny>,
    key: &Bound<'py, PyAny>,
    value: &Bound<'py, PyAny>,
    layout: &str,
    scale: f64,
    softcap: Option<f64>,
    causal: bool,
    window: (Option<usize>, Option<usize>),
    alignment: &str,
    bool_mask: Option<&Bound<'py, PyAny>>,
    float_mask: Option<&Bound<'py, PyAny>>,
    key_mask: Option<&Bound<'py, PyAny>>,
    alibi: Option<&Bound<'py, PyAny>>,
    return_lse: bool,
    return_weights: bool,
    key_lengths: Option<&Bound<'py, PyAny>>,
    query_lengths: Option<&Bound<'py, PyAny>>,
    sinks: Option<&Bound<'py, PyAny>>,
    return_scores: bool,
    key_starts: Option<&Bound<'py, PyAny>>,
    key_strips: bool,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<AttnResult<'py>> {
    let bshd = choice("layout", layout, &[("bhsd", false), ("bshd", true)])?;
    let alignment = choice(
        "causal_alignment",
        alignment,
        &[("top_left", Alignment::TopLeft), ("bottom_right", Alignment::BottomRight)],
    )?;
    // A bound beyond any sequence means "unlimited" on that side; clamped so the kernel's signed
    // position arithmetic holds it.
    let window = (window.0.map(|w| w.min(1 << 62)), window.1.map(|w| w.min(1 << 62)));
    let options = Options {
        bshd,
        scale,
        softcap,
        causal,
        window,
        alignment,
        return_lse,
        return_weights,
        return_scores,
        key_strips,
    };
    let extra =
        Extra { bool_mask, float_mask, key_mask, alibi, key_lengths, query_lengths, sinks, key_starts, out };
    let (o, x) = (&options, &extra);
    match (floats(query, "query")?, floats(key, "key")?, floats(value, "value")?) {
        (Floats::F32(q), Floats::F32(k), Floats::F32(v)) => typed_attention(py, &q, &k, &v, o, x),
        (Floats::F64(q), Floats::F64(k), Floats::F64(v)) => typed_attention(py, &q, &k, &v, o, x),
        (Floats::F16(q), Floats::F16(k), Floats::F16(v)) => typed_attention(py, &q, &k, &v, o, x),
        (Floats::Bf16(q), Floats::Bf16(k), Floats::Bf16(v)) => typed_attention(py, &q, &k, &v, o, x),
        // Mixed precision: a 16-bit KV cache read by float32 queries.
        (Floats::F32(q), Floats::F16(k), Floats::F16(v)) => typed_attention(py, &q, &k, &v, o, x),
        (Floats::F32(q), Floats::Bf16(k), Floats::Bf16(v)) => typed_attention(py, &q, &k, &v, o, x),
        (q, k, v) => Err(PyTypeError::new_err(format!(
            "query, key, value: dtypes {}, {}, {} do not go together: expected one dtype for all three \
             (float32, float64, float16 or bfloat16), or float32 queries with float16 or bfloat16 keys \
             and values",
            dtype_name(&q),
            dtype_name(&k),
            dtype_name(&v)
        ))),
    }
}

struct Options {
    bshd: bool,
    scale: f64,
    softcap: Option<f64>,
    causal: bool,
    window: (Option<usize>, Option<usize>),
    alignment: Alignment,
    return_lse: bool,
    return_weights: bool,
    return_scores: bool,
    /// The key is `(B, Hkv, S / 16, E, 16)`: strips of 16 keys, transposed (`AttnSpec::k_strips`).
    key_strips: bool,
}

struct Extra<'a, 'py> {
    bool_mask: Option<&'a Bound<'py, PyAny>>,
    float_mask: Option<&'a Bound<'py, PyAny>>,
    key_mask: Option<&'a Bound<'py, PyAny>>,
    alibi: Option<&'a Bound<'py, PyAny>>,
    key_lengths: Option<&'a Bound<'py, PyAny>>,
    query_lengths: Option<&'a Bound<'py, PyAny>>,
    sinks: Option<&'a Bound<'py, PyAny>>,
    key_starts: Option<&'a Bound<'py, PyAny>>,
    /// The caller's array for the output (shape and dtype those of the output), or None.
    out: Option<&'a Bound<'py, PyAny>>,
}

/// `(batch, heads, rows, dim)` and the element strides (`strided`'s) of a 4-d array in the given
/// layout.
fn dims(shape: &[usize], strides: &[usize], bshd: bool, arg: &str) -> PyResult<([usize; 4], Strides)> {
    let ([b, x, y, d], [sb, sx, sy, _]) = (shape, strides) else {
        return Err(PyValueError::new_err(format!(
            "{arg}: expected a 4-d array, got shape {}",
            shape_str(shape)
        )));
    };
    Ok(if bshd {
        ([*b, *y, *x, *d], Strides { batch: *sb, head: *sy, row: *sx })
    } else {
        ([*b, *x, *y, *d], Strides { batch: *sb, head: *sx, row: *sy })
    })
}

/// `(batch, heads, rows, dim)` and the element strides of keys in strips: a `(B, Hkv, S / 16, E,
/// 16)` array whose strips (its last two axes) are contiguous, addressed as rows of `E`
/// (`AttnSpec::k_strips`).
fn strip_dims(shape: &[usize], strides: &[usize], bshd: bool) -> PyResult<([usize; 4], Strides)> {
    let bad = |what: String| PyValueError::new_err(format!("key: keys in strips {what}"));
    if bshd {
        return Err(bad("take layout 'bhsd'".into()));
    }
    let ([b, h, n, e, w], [sb, sh, sn, se, _]) = (shape, strides) else {
        return Err(bad(format!("are a 5-d array, got shape {}", shape_str(shape))));
    };
    // (`strided` gives 0 for the stride of an axis of length 1.)
    const W: usize = KEY_STRIP;
    if *w != W || *n > 1 && *sn != e * W || *e > 1 && *se != W {
        return Err(bad(format!("need contiguous strips of {W} keys, got shape {}", shape_str(shape))));
    }
    Ok(([*b, *h, n * W, *e], Strides { batch: *sb, head: *sh, row: *e }))
}

/// Element strides that broadcast a compact 4-d mask over `(B, Hq, L, S)`.
fn mask_strides(shape: &[usize], target: [usize; 4], arg: &str) -> PyResult<[usize; 4]> {
    let bad = || {
        PyValueError::new_err(format!(
            "{arg}: shape {} does not broadcast to {}",
            shape_str(shape),
            shape_str(&target)
        ))
    };
    let [_, h, l, s] = *shape else { return Err(bad()) };
    let dense = [h * l * s, l * s, s, 1];
    let mut strides = [0; 4];
    for a in 0..4 {
        strides[a] = match shape[a] {
            n if n == target[a] => dense[a],
            1 => 0,
            _ => return Err(bad()),
        };
    }
    Ok(strides)
}

fn dtype_name(a: &Floats<'_>) -> &'static str {
    match a {
        Floats::F32(_) => "float32",
        Floats::F64(_) => "float64",
        Floats::F16(_) => "float16",
        Floats::Bf16(_) => "bfloat16",
    }
}

/// Attention with queries (and the output) stored as `Q`, keys and values as `KV`, computed in
/// `T` (which is also the dtype of a float mask, `lse` and the weights).
fn typed_attention<'py, Q, KV, T>(
    py: Python<'py>,
    q: &PyReadonlyArrayDyn<'py, Q>,
    k: &PyReadonlyArrayDyn<'py, KV>,
    v: &PyReadonlyArrayDyn<'py, KV>,
    o: &Options,
    extra: &Extra<'_, 'py>,
) -> PyResult<AttnResult<'py>>
where
    Q: Storage<Compute = T> + Element,
    KV: Storage<Compute = T> + Element,
    T: AttnFloat + Storage<Compute = T> + Element,
{
    // Read in place, through their strides (views into bigger buffers are never copied).
    let ((qd, q_strides), (kd, k_strides), (vd, v_strides)) =
        (strided(q, "query")?, strided(k, "key")?, strided(v, "value")?);
    let ([b, hq, l, e], qs) = dims(q.shape(), &q_strides, o.bshd, "query")?;
    let ([bk, hkv, s, ek], ks) = match o.key_strips {
        true => strip_dims(k.shape(), &k_strides, o.bshd)?,
        false => dims(k.shape(), &k_strides, o.bshd, "key")?,
    };
    let ([bv, hv, sv, ev], vs) = dims(v.shape(), &v_strides, o.bshd, "value")?;
    if (bk, bv) != (b, b) || hv != hkv || sv != s || ek != e {
        return Err(PyValueError::new_err(format!(
            "query, key, value: shapes {}, {} and {} do not fit together",
            shape_str(q.shape()),
            shape_str(k.shape()),
            shape_str(v.shape())
        )));
    }
    let spec = AttnSpec {
        batch: b,
        heads_q: hq,
        heads_kv: hkv,
        q_len: l,
        kv_len: s,
        dim_qk: e,
        dim_v: ev,
        q: qs,
        k: ks,
        v: vs,
        scale: o.scale,
        softcap: o.softcap,
        causal: o.causal,
        window: o.window,
        alignment: o.alignment,
        k_strips: o.key_strips,
    };
    let target = [b, hq, l, s];
    let bool_mask =
        extra.bool_mask.map(|m| typed::<u8>(m, "attn_mask", "uint8 (bool viewed as bytes)")).transpose()?;
    let float_mask = extra
        .float_mask
        .map(|m| typed::<T>(m, "attn_mask", &format!("{} float mask", T::NAME)))
        .transpose()?;
    let key_mask = extra.key_mask.map(|m| typed::<u8>(m, "key_mask", "uint8")).transpose()?;
    let alibi = extra.alibi.map(|a| typed::<f64>(a, "alibi_slopes", "float64")).transpose()?;
    let key_lengths = extra.key_lengths.map(|n| typed::<i64>(n, "key_lengths", "int64")).transpose()?;
    let query_lengths = extra.query_lengths.map(|n| typed::<i64>(n, "query_lengths", "int64")).transpose()?;
    let sinks = extra.sinks.map(|s| typed::<f64>(s, "sinks", "float64")).transpose()?;
    let key_starts = extra.key_starts.map(|n| typed::<i64>(n, "key_starts", "int64")).transpose()?;
    let bool_view = match &bool_mask {
        Some(m) => Some(StridedMask {
            data: slice(m, "attn_mask")?,
            strides: mask_strides(m.shape(), target, "attn_mask")?,
        }),
        None => None,
    };
    let float_view = match &float_mask {
        Some(m) => Some(StridedMask {
            data: slice(m, "attn_mask")?,
            strides: mask_strides(m.shape(), target, "attn_mask")?,
        }),
        None => None,
    };
    let masks = Masks {
        bool_mask: bool_view,
        float_mask: float_view,
        key_mask: key_mask.as_ref().map(|m| slice(m, "key_mask")).transpose()?,
        alibi: alibi.as_ref().map(|a| slice(a, "alibi_slopes")).transpose()?,
        key_lengths: key_lengths.as_ref().map(|n| slice(n, "key_lengths")).transpose()?,
        query_lengths: query_lengths.as_ref().map(|n| slice(n, "query_lengths")).transpose()?,
        sinks: sinks.as_ref().map(|s| slice(s, "sinks")).transpose()?,
        key_starts: key_starts.as_ref().map(|n| slice(n, "key_starts")).transpose()?,
    };

    let (out_shape, out_what) = match o.bshd {
        false => ([b, hq, l, ev], "batch, Hq, L, Ev: set by query and value"),
        true => ([b, l, hq, ev], "batch, L, Hq, Ev: set by query and value"),
    };
    let (out, out_borrow, out_data) = output::<Q>(py, extra.out, "out", &out_shape, out_what)?;
    // Layout bshd: the kernel writes (batch, Hq, L, Ev) here, then its rows are copied in out's
    // order. (Its tasks, one per (batch, head), could write bshd rows in place, but rows of
    // neighbouring heads, which share cache lines, were then written by different threads:
    // MiniLM's encode ran 1.5% slower at 2 threads than with this copy.)
    let by_head = o
        .bshd
        .then(|| empty_uninit::<Q>(py, &[b, hq, l, ev], "out's rows by head (batch, Hq, L, Ev)"))
        .transpose()?;
    let (_by_head_array, by_head) = by_head.map_or((None, None), |(a, d)| (Some(a), Some(d)));
    let lse = o
        .return_lse
        .then(|| empty_uninit::<T>(py, &[b, hq, l], "lse (batch, Hq, L: set by query)"))
        .transpose()?;
    let weights = o
        .return_weights
        .then(|| empty_uninit::<T>(py, &[b, hq, l, s], "weights (batch, Hq, L, S: set by query and key)"))
        .transpose()?;
    let scores = o
        .return_scores
        .then(|| empty_uninit::<T>(py, &[b, hq, l, s], "scores (batch, Hq, L, S: set by query and key)"))
        .transpose()?;
    let (lse, lse_data) = lse.map_or((None, None), |(a, d)| (Some(a), Some(d)));
    let (weights, weights_data) = weights.map_or((None, None), |(a, d)| (Some(a), Some(d)));
    let (scores, scores_data) = scores.map_or((None, None), |(a, d)| (Some(a), Some(d)));
    run(py, &[], |par| {
        let Some(by_head) = by_head else {
            let outputs =
                Outputs { out: out_data, lse: lse_data, weights: weights_data, scores: scores_data };
            return kernel::attention(qd, kd, vd, &spec, &masks, outputs, par);
        };
        let outputs =
            Outputs { out: &mut *by_head, lse: lse_data, weights: weights_data, scores: scores_data };
        kernel::attention(qd, kd, vd, &spec, &masks, outputs, par)?;
        // by_head is (batch, Hq, L, Ev), out (batch, L, Hq, Ev): each (batch, head)'s rows go
        // Hq·Ev apart.
        let item = hq * l * ev; // one batch item's values, in either order
        if item > 0 {
            for (from, to) in by_head.chunks(item).zip(out_data.chunks_mut(item)) {
                for (h, rows) in from.chunks(l * ev).enumerate() {
                    for (row, to) in rows.chunks_exact(ev).zip(to[h * ev..].chunks_mut(hq * ev)) {
                        to[..ev].copy_from_slice(row);
                    }
                }
            }
        }
        Ok(())
    })?;
    drop(out_borrow);
    Ok((out, lse, weights, scores))
}

/// Merges partial attention results over disjoint key sets: `outs` `(P, N, Ev)` and `lses`
/// `(P, N)`, both float32 or both float64, into `(N, Ev + 1)`: each row's output, then its
/// log-sum-exp.
#[pyfunction]
pub fn merge_attention<'py>(
    py: Python<'py>,
    outs: &Bound<'py, PyAny>,
    lses: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    match (floats(outs, "outs")?, floats(lses, "lses")?) {
        (Floats::F32(o), Floats::F32(l)) => typed_merge(py, &o, &l),
        (Floats::F64(o), Floats::F64(l)) => typed_merge(py, &o, &l),
        (o, l) => Err(PyTypeError::new_err(format!(
            "outs, lses: dtypes {} and {}: expected both float32 or both float64",
            dtype_name(&o),
            dtype_name(&l)
        ))),
    }
}

fn typed_merge<'py, T: AttnFloat + Element + Send + Sync>(
    py: Python<'py>,
    outs: &PyReadonlyArrayDyn<'py, T>,
    lses: &PyReadonlyArrayDyn<'py, T>,
) -> PyResult<Bound<'py, PyAny>> {
    let (&[p, n, ev], &[pl, nl]) = (outs.shape(), lses.shape()) else {
        return Err(PyValueError::new_err(format!(
            "outs, lses: expected shapes (P, N, Ev) and (P, N), got {} and {}",
            shape_str(outs.shape()),
            shape_str(lses.shape())
        )));
    };
    if (pl, nl) != (p, n) {
        return Err(PyValueError::new_err(format!(
            "outs, lses: shapes {} and {} do not fit together",
            shape_str(outs.shape()),
            shape_str(lses.shape())
        )));
    }
    let (o, l) = (slice(outs, "outs")?, slice(lses, "lses")?);
    fill_new(py, &[n, ev + 1], "merged (N, Ev + 1)", &[n], |out, par| {
        kernel::merge_attention(o, l, p, ev, out, par)
    })
}
