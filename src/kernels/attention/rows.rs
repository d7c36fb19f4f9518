//! One row of scores against one key block, shared by the tiled and the decode path: the keys
//! that causal and window bounds allow, the masks and biases (applied as selects after all
//! arithmetic) with the row's maximum, and the online softmax's step, which turns the scores into
//! probabilities and rescales the running sum.

use super::{AttnFloat, AttnSpec, Masks};

/// The online softmax's step for one row and one key block, shared by both paths: from the
/// block's masked scores `srow` and their maximum `row_max`, the running maximum `m` grows,
/// `srow` becomes probabilities (−0.0 where masked) and `sum` is rescaled and added to; returns
/// the factor `alpha` for the row's accumulated output. The maximum propagates NaN, so a NaN
/// score (from NaN in an unmasked query or key) makes its row NaN instead of being passed over;
/// a row with no valid key yet adds nothing (its probabilities are −0.0, alpha is 1).
#[inline(always)]
pub(super) fn update_row<T: AttnFloat>(
    fast: Option<T::Token>,
    srow: &mut [T],
    row_max: T,
    m: &mut T,
    sum: &mut T,
) -> T {
    let m_new = if row_max.is_nan() || row_max > *m { row_max } else { *m };
    if m_new == T::NEG_INFINITY {
        srow.fill(-T::ZERO);
        return T::ONE;
    }
    let alpha = (*m - m_new).exp_nonpositive();
    let block_sum = match fast {
        Some(token) => T::probabilities(token, srow, m_new),
        None => probabilities(srow, m_new),
    };
    *sum = *sum * alpha + block_sum;
    *m = m_new;
    alpha
}

/// Turns a row of masked scores into probabilities `exp(x − m)` in place and returns their sum,
/// added in a fixed order (eight interleaved lanes, then pairwise), so it vectorises and depends
/// on nothing but the row. A masked score (−inf) becomes −0.0, which exp never returns, so the
/// mark survives for the exact P·V path (and adding it changes no sum).
#[inline(always)]
pub(super) fn probabilities<T: AttnFloat>(row: &mut [T], m: T) -> T {
    // Two passes: a flat loop (which LLVM vectorises whole, without masked loads and stores)
    // for the exponentials, then the sum in eight lanes.
    for x in row.iter_mut() {
        *x = if *x == T::NEG_INFINITY { -T::ZERO } else { (*x - m).exp_nonpositive() };
    }
    let mut lanes = [T::ZERO; 8];
    let (chunks, tail) = row.as_chunks::<8>();
    for chunk in chunks {
        for (lane, &p) in lanes.iter_mut().zip(chunk) {
            *lane = *lane + p;
        }
    }
    for (lane, &p) in lanes.iter_mut().zip(tail) {
        *lane = *lane + p;
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

/// The keys `[lo, hi)` that causal and window bounds allow for query rows `first..=last`.
#[inline(always)]
pub(super) fn key_range(sp: &AttnSpec, offset: isize, first: usize, last: usize) -> (usize, usize) {
    let s = sp.kv_len as isize;
    let (first, last) = (first as isize + offset, last as isize + offset);
    let mut lo = 0isize;
    let mut hi = s;
    if let Some(left) = sp.window.0 {
        lo = lo.max(first - left as isize);
    }
    if sp.causal {
        hi = hi.min(last + 1);
    }
    if let Some(right) = sp.window.1 {
        hi = hi.min(last + right as isize + 1);
    }
    let lo = lo.clamp(0, s) as usize;
    (lo, (hi.clamp(0, s) as usize).max(lo))
}

/// Where a row of scores sits: batch `b`, query head `h`, query row `i` (aligned position
/// `i + offset`), keys from `k0`, with its ALiBi slope and its batch's key mask.
#[derive(Clone, Copy)]
pub(super) struct RowAt<'m> {
    pub b: usize,
    pub h: usize,
    pub i: usize,
    pub k0: usize,
    pub offset: isize,
    pub slope: Option<f64>,
    pub key_mask: Option<&'m [u8]>,
}

/// Caps and biases one row of scores (already scaled) in place, then sets every masked one to
/// −inf (a select, after all arithmetic), and returns the largest score (NaN if any score is
/// NaN, −inf if none is valid). The largest score is exact in any order of comparison; only
/// where it is zero may its sign depend on the order (the explicit kernels compare in other
/// orders), and no result depends on that sign: `exp(x − m)`, `alpha = exp(m_old − m_new)` and
/// `lse = m + ln(sum)` are the same for `m = ±0`.
#[inline(always)]
pub(super) fn mask_row<T: AttnFloat>(
    sp: &AttnSpec,
    masks: &Masks<'_, T>,
    at: RowAt<'_>,
    srow: &mut [T],
) -> T {
    let RowAt { b, h, i, k0, offset, slope, key_mask } = at;
    let cols = srow.len();
    if let Some(c) = sp.softcap.map(T::from_f64) {
        for x in srow.iter_mut() {
            *x = c * (*x / c).tanh();
        }
    }
    let pos = i as isize + offset;
    if let Some(sl) = slope {
        for (j, x) in srow.iter_mut().enumerate() {
            *x = *x - T::from_f64(sl * (pos - (k0 + j) as isize).unsigned_abs() as f64);
        }
    }
    if let Some(fm) = masks.float_mask {
        for (j, x) in srow.iter_mut().enumerate() {
            let add = fm.at(b, h, i, k0 + j);
            *x = if add == T::NEG_INFINITY { T::NEG_INFINITY } else { *x + add };
        }
    }
    if let Some(bm) = masks.bool_mask {
        for (j, x) in srow.iter_mut().enumerate() {
            *x = if bm.at(b, h, i, k0 + j) != 0 { *x } else { T::NEG_INFINITY };
        }
    }
    // Causal/window bounds as index ranges, key padding as a select, then the maximum in
    // eight lanes and, apart, whether any score is NaN (a NaN score wins). Each is a plain
    // loop that LLVM vectorises.
    let (lo, hi) = key_range(sp, offset, i, i);
    let start = lo.saturating_sub(k0).min(cols);
    let end = hi.saturating_sub(k0).clamp(start, cols);
    srow[..start].fill(T::NEG_INFINITY);
    srow[end..].fill(T::NEG_INFINITY);
    if let Some(km) = key_mask {
        for (x, &keep) in srow.iter_mut().zip(&km[k0..k0 + cols]) {
            *x = if keep != 0 { *x } else { T::NEG_INFINITY };
        }
    }
    let mut lanes = [T::NEG_INFINITY; 8];
    let (chunks, tail) = srow.as_chunks::<8>();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    for (m, &x) in lanes.iter_mut().zip(tail) {
        *m = if x > *m { x } else { *m };
    }
    let nan = srow.iter().fold(false, |any, x| any | x.is_nan());
    let max = lanes.iter().fold(T::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    if nan {
        T::from_f64(f64::NAN)
    } else {
        max
    }
}
