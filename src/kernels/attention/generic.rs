//! The tiled path's matrix products in generic code, for the types and CPUs without explicit
//! kernels (`fast.rs`): register tiles written in the shapes LLVM vectorises (fixed-size arrays
//! iterated by `zip`), the exact P·V that leaves masked pairs out, and reading a key block's
//! rows in the type computed in.

use super::fast::{BK, NR};
use super::AttnFloat;
use crate::kernels::simd;
use crate::kernels::storage::Storage;

/// Rows `k0..k0 + cols` (`width` elements each, `stride` apart) of `src` as T, and the distance
/// between them: in place where `src` holds T, else widened into `scratch`.
#[inline(always)]
pub(super) fn rows_as<'s, KV: Storage>(
    src: &'s [KV],
    stride: usize,
    width: usize,
    k0: usize,
    cols: usize,
    scratch: &'s mut Vec<KV::Compute>,
) -> (&'s [KV::Compute], usize) {
    match KV::as_compute(src) {
        Some(x) => (&x[k0 * stride..], stride),
        None => {
            scratch.resize(cols * width, KV::Compute::ZERO);
            for (j, row) in scratch.chunks_exact_mut(width.max(1)).enumerate().take(cols) {
                KV::widen_slice(&src[(k0 + j) * stride..][..width], row);
            }
            (&scratch[..], width)
        }
    }
}

/// `acc = alpha · acc + Σ_j p[j] v_row(j)`, keys in order, leaving out masked pairs (`p = −0.0`)
/// so that NaN or inf in a masked value cannot reach the output; 32 columns at a time in
/// registers.
#[inline(always)]
pub(super) fn add_pv<'v, T: AttnFloat + 'v>(
    p: &[T],
    alpha: T,
    acc: &mut [T],
    v_row: impl Fn(usize) -> &'v [T],
) {
    let (chunks, tail) = acc.as_chunks_mut::<32>();
    for (c, chunk) in chunks.iter_mut().enumerate() {
        let mut t = chunk.map(|x| x * alpha);
        for (j, &pj) in p.iter().enumerate() {
            if pj.is_neg_zero() {
                continue;
            }
            for (x, &v) in t.iter_mut().zip(&v_row(j)[c * 32..c * 32 + 32]) {
                *x = pj.mul_add(v, *x);
            }
        }
        *chunk = t;
    }
    let d0 = chunks.len() * 32;
    for x in tail.iter_mut() {
        *x = *x * alpha;
    }
    for (j, &pj) in p.iter().enumerate() {
        if !pj.is_neg_zero() {
            for (x, &v) in tail.iter_mut().zip(&v_row(j)[d0..]) {
                *x = pj.mul_add(v, *x);
            }
        }
    }
}

/// `M x NR` raw scores `q_r · k_j` for M queries interleaved by dimension (`q[d][r]`) and the NR
/// keys of one packed strip (`e x NR`, `kt[d][n]`).
///
/// Written with fixed-size arrays iterated by `zip`, the form LLVM turns into a register tile:
/// `M x NR / lanes` vector accumulators, one broadcast and `NR / lanes` fused multiply-adds per
/// row and dimension, no bounds checks in the loop.
#[inline(always)]
pub(super) fn score_tile<T: AttnFloat, const M: usize>(q: &[[T; M]], strip: &[T]) -> [[T; NR]; M] {
    let (kd, _) = strip.as_chunks::<NR>();
    let mut acc = [[T::ZERO; NR]; M];
    for (qd, kd) in q.iter().zip(kd) {
        for (row, &qd) in acc.iter_mut().zip(qd) {
            for (a, &k) in row.iter_mut().zip(kd) {
                *a = qd.mul_add(k, *a);
            }
        }
    }
    acc
}

/// A key block of packed V: `strips[c]` holds rows `vt[j][0..NR]` of output columns `c·NR..`;
/// the keys used are block columns `col0..col0 + cols`.
pub struct PvBlock<'a, T> {
    pub strips: &'a [T],
    pub col0: usize,
    pub cols: usize,
    pub ev: usize,
}

/// `out[r] = alpha[r] * out[r] + sum_j p[r][j] v_j` for `M` rows (`p` rows `BK` apart), `NR`
/// output columns at a time from the packed strips (a register tile, as in [`score_tile`]), keys
/// in order; the last `ev % NR` columns from the unpacked rows `v_row(j)`.
#[inline(always)]
pub(super) fn pv_tiles<'v, T: AttnFloat + 'v, const M: usize>(
    p: &[T],
    alpha: &[T],
    out: &mut [T],
    vb: &PvBlock<'_, T>,
    v_row: &impl Fn(usize) -> &'v [T],
) {
    let (ev, cols) = (vb.ev, vb.cols);
    let full = ev / NR;
    for c in 0..full {
        let d0 = c * NR;
        let (rows_v, _) =
            vb.strips[(c * BK + vb.col0) * NR..(c * BK + vb.col0 + cols) * NR].as_chunks::<NR>();
        let mut tile = [[T::ZERO; NR]; M];
        for (r, row) in tile.iter_mut().enumerate() {
            for (t, &o) in row.iter_mut().zip(&out[r * ev + d0..r * ev + d0 + NR]) {
                *t = o * alpha[r];
            }
        }
        for (j, vj) in rows_v.iter().enumerate() {
            let pj: [T; M] = simd::array(|r| p[r * BK + j]);
            for (row, &pr) in tile.iter_mut().zip(&pj) {
                for (t, &v) in row.iter_mut().zip(vj) {
                    *t = pr.mul_add(v, *t);
                }
            }
        }
        for (r, row) in tile.iter().enumerate() {
            out[r * ev + d0..r * ev + d0 + NR].copy_from_slice(row);
        }
    }
    for r in 0..M {
        for d in full * NR..ev {
            let mut x = out[r * ev + d] * alpha[r];
            for j in 0..cols {
                x = p[r * BK + j].mul_add(v_row(j)[d], x);
            }
            out[r * ev + d] = x;
        }
    }
}
