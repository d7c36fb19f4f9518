//! Three kernels of [`Explicit`](super::fast::Explicit) again, in AVX-512 (F and VL), for CPUs
//! that have it: the masked score tiles and the P·V tiles, which take most of a long prefill's
//! time, and the probabilities. The 32 wider registers let one micro-tile hold two groups of `MR` rows by two strips of `NR` (a strip is one 16-lane
//! register), or one group by four: 16 accumulators, twice the AVX2 tile, so each value of K or
//! V loaded feeds eight (or four) fused multiply-adds. (Decode's dot products, whose form is eight
//! lanes, take eight rows at a time where the CPU has these registers: `x86.rs` compiles the AVX2
//! kernel for them.)
//!
//! Every output element is the same chain of operations as in `avx2.rs` and the generic code (a
//! score is `fma(q[d], k[d], ·)` over d from +0, then the select to −inf; P·V is `out · alpha`
//! then `fma(p_j, v_j, ·)` over the keys in order; sums in the generic eight-lane order), except
//! `exp`, which takes two steps fewer for the same bits (see `exp16`): only how many elements
//! run side by side changes, so the bits do not.
//!
//! `unsafe` appears only where floats are read or written (sixteen through a reference to
//! exactly those, a masked tail of a slice, a value row or probability inside a length asserted
//! beforehand); the kernels are `unsafe` to call (they need AVX-512F and VL), and `x86.rs`
//! calls them with its token as proof.

use std::arch::x86_64::*;

use super::fast::{tile_shape as shape, ScoreBlock, VBlock, BK, MR, NR};
use super::lanes::Lanes;
use crate::kernels::exp::f32_consts as c;
use crate::kernels::simd;

#[inline]
#[target_feature(enable = "avx512f")]
fn load(x: &[f32; NR]) -> __m512 {
    // SAFETY: reads the sixteen floats of `x`.
    unsafe { _mm512_loadu_ps(x.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn load_i32(x: &[i32; NR]) -> __m512i {
    // SAFETY: reads the sixteen integers of `x`.
    unsafe { _mm512_loadu_si512(x.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn store(x: &mut [f32; NR], v: __m512) {
    // SAFETY: writes the sixteen floats of `x`.
    unsafe { _mm512_storeu_ps(x.as_mut_ptr(), v) }
}

/// See [`Explicit::scores`](super::fast::Explicit::scores).
#[target_feature(enable = "avx512f")]
pub(super) fn masked_scores(blk: &ScoreBlock<'_, f32>, scores: &mut [f32], max: &mut [f32]) {
    let (e, (t0, t1)) = (blk.e, blk.tiles);
    let rows = blk.rows;
    assert!(rows.is_multiple_of(MR) && t0.is_multiple_of(NR) && t1.is_multiple_of(NR) && t1 <= BK);
    assert!(
        max.len() >= rows && scores.len() >= rows * BK && blk.q.len() >= rows * e && blk.kt.len() >= t1 * e
    );
    assert!(blk.mask.all_valid || blk.mask.keep.len() >= t1 && blk.mask.bounds.len() >= rows);
    let mut r0 = 0;
    while r0 < rows {
        let groups = shape(rows - r0, 0).0;
        let mut row = RowMax { max: [[_mm512_set1_ps(f32::NEG_INFINITY); MR]; 2], nan: [[0; MR]; 2] };
        let mut j0 = t0;
        while j0 < t1 {
            let (g, n) = shape(rows - r0, (t1 - j0) / NR);
            match (g, n) {
                (2, 2) => score_tile::<2, 2>(blk, r0, j0, scores, &mut row),
                (2, _) => score_tile::<2, 1>(blk, r0, j0, scores, &mut row),
                (_, 4) => score_tile::<1, 4>(blk, r0, j0, scores, &mut row),
                (_, 2) => score_tile::<1, 2>(blk, r0, j0, scores, &mut row),
                _ => score_tile::<1, 1>(blk, r0, j0, scores, &mut row),
            }
            j0 += n * NR;
        }
        for (g, (max_g, nan_g)) in row.max.iter().zip(&row.nan).enumerate().take(groups) {
            for (r, (&m, &nan)) in max_g.iter().zip(nan_g).enumerate() {
                // The lanes hold no NaN; see `rows::mask_row` on the order of comparison.
                max[r0 + g * MR + r] = if nan != 0 { f32::NAN } else { _mm512_reduce_max_ps(m) };
            }
        }
        r0 += groups * MR;
    }
}

/// The running maximum of up to two groups of `MR` rows' valid scores (NaN passed over), and
/// their NaN flags.
struct RowMax {
    max: [[__m512; MR]; 2],
    nan: [[__mmask16; MR]; 2],
}

/// The scores of `G` groups of `MR` rows from row `r0` and the `S` strips of keys from block
/// column `j0`, masked, stored and folded into `row`.
#[inline]
#[target_feature(enable = "avx512f")]
fn score_tile<const G: usize, const S: usize>(
    blk: &ScoreBlock<'_, f32>,
    r0: usize,
    j0: usize,
    scores: &mut [f32],
    row: &mut RowMax,
) {
    let e = blk.e;
    // Group g's queries of dimension d: q[g][d][0..MR]; strip s's keys: kt[s][d][0..NR].
    let q: [&[[f32; MR]]; G] = simd::array(|g| blk.q[(r0 + g * MR) * e..][..MR * e].as_chunks().0);
    let kt: [&[[f32; NR]]; S] = simd::array(|s| blk.kt[(j0 + s * NR) * e..][..NR * e].as_chunks().0);
    let mut acc = [[[_mm512_setzero_ps(); S]; MR]; G];
    for d in 0..e {
        let k: [__m512; S] = simd::array(|s| load(&kt[s][d]));
        for (acc, q) in acc.iter_mut().zip(&q) {
            for (acc, &qr) in acc.iter_mut().zip(&q[d]) {
                let qr = _mm512_set1_ps(qr);
                for (a, &k) in acc.iter_mut().zip(&k) {
                    *a = _mm512_fmadd_ps(qr, k, *a);
                }
            }
        }
    }
    // Valid: the key is kept and the column lies in the row's bounds, lo <= col < hi.
    if !blk.mask.all_valid {
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for s in 0..S {
            let c0 = j0 + s * NR;
            let keep = load_i32(blk.mask.keep[c0..c0 + NR].try_into().unwrap());
            let keep = _mm512_test_epi32_mask(keep, keep);
            let col = _mm512_add_epi32(_mm512_set1_epi32(c0 as i32), iota);
            for (g, acc) in acc.iter_mut().enumerate() {
                for (r, acc) in acc.iter_mut().enumerate() {
                    let (lo, hi) = blk.mask.bounds[r0 + g * MR + r];
                    let inside = _mm512_cmpge_epi32_mask(col, _mm512_set1_epi32(lo as i32))
                        & _mm512_cmplt_epi32_mask(col, _mm512_set1_epi32(hi as i32));
                    acc[s] = _mm512_mask_blend_ps(inside & keep, neg_inf, acc[s]);
                }
            }
        }
    }
    for (g, acc) in acc.iter().enumerate() {
        for (r, acc) in acc.iter().enumerate() {
            let (max, nan) = (&mut row.max[g][r], &mut row.nan[g][r]);
            for (s, &x) in acc.iter().enumerate() {
                store((&mut scores[(r0 + g * MR + r) * BK + j0 + s * NR..][..NR]).try_into().unwrap(), x);
                *max = _mm512_max_ps(x, *max); // keeps the maximum where x is NaN
                *nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
            }
        }
    }
}

/// `exp_nonpositive` of sixteen floats, with the same bits (as `avx2::exp8`) in two steps fewer:
/// x is not raised to `MIN` first, since every lane below it is set to +0 at the end and the
/// others are unchanged by it; and `e^r · 2^n` is one `vscalefps`, which rounds the same exact
/// product once, as the multiplication by 2^n built in the exponent bits does.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp16(x: __m512) -> __m512 {
    let min = _mm512_set1_ps(c::MIN);
    let rounder = _mm512_set1_ps(c::ROUNDER);
    let shifted = _mm512_fmadd_ps(x, _mm512_set1_ps(c::LOG2E), rounder);
    let n = _mm512_sub_ps(shifted, rounder);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-c::LN2_HI), x);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-c::LN2_LO), r);
    let mut p = _mm512_set1_ps(c::POLY[0]);
    for &k in &c::POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(k));
    }
    let e_r = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0));
    // +0 below MIN (and at −inf, where r is NaN); NaN stays NaN.
    _mm512_maskz_scalef_ps(!_mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, min), e_r, n)
}

/// See [`Explicit::probabilities`](super::fast::Explicit::probabilities): sixteen at a time,
/// summed in the eight lanes of the generic form (each half added in turn, the tail past the
/// last eight added to the first lanes), so the sum has its bits.
#[target_feature(enable = "avx512f,avx512vl")]
pub(super) fn probabilities(row: &mut [f32], m: f32) -> f32 {
    let (neg_inf, neg_zero, mv) =
        (_mm512_set1_ps(f32::NEG_INFINITY), _mm512_set1_ps(-0.0), _mm512_set1_ps(m));
    let p = |x: __m512| {
        let masked = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(x, neg_inf);
        _mm512_mask_blend_ps(masked, exp16(_mm512_sub_ps(x, mv)), neg_zero)
    };
    let halves =
        |x: __m512| (_mm512_castps512_ps256(x), _mm512_castps512_ps256(_mm512_shuffle_f32x4::<0xEE>(x, x)));
    let mut sum = _mm256_setzero_ps();
    let (chunks, tail) = row.as_chunks_mut::<NR>();
    for chunk in chunks {
        let x = p(load(chunk));
        store(chunk, x);
        let (lo, hi) = halves(x);
        sum = _mm256_add_ps(_mm256_add_ps(sum, lo), hi);
    }
    if !tail.is_empty() {
        // The tail's n < 16 floats in the low lanes: lanes n.. are neither stored nor added.
        let n = tail.len();
        let lanes: __mmask16 = (1 << n) - 1;
        // SAFETY: reads and writes only the `n` floats of `tail` (the mask's lanes).
        let x = p(unsafe { _mm512_maskz_loadu_ps(lanes, tail.as_ptr()) });
        // SAFETY: as above.
        unsafe { _mm512_mask_storeu_ps(tail.as_mut_ptr(), lanes, x) };
        // Added as the generic code adds them: its elements 0..8 to lanes 0..8, then those past
        // the eighth to the first lanes; masked adds leave the other lanes as they are.
        let (lo, hi) = halves(x);
        sum = _mm256_mask_add_ps(sum, lanes as __mmask8, sum, lo);
        sum = _mm256_mask_add_ps(sum, (lanes >> 8) as __mmask8, sum, hi);
    }
    let mut l = [0.0f32; 8];
    // SAFETY: writes the eight floats of `l`.
    unsafe { _mm256_storeu_ps(l.as_mut_ptr(), sum) };
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

/// See [`Explicit::pv`](super::fast::Explicit::pv).
#[target_feature(enable = "avx512f")]
pub(super) fn pv<L: Lanes>(p: &[f32], alpha: &[f32], out: &mut [f32], rows: usize, vb: &VBlock<&[L]>) {
    let (ev, cols) = (vb.ev, vb.cols);
    assert!(
        rows.is_multiple_of(MR) && ev.is_multiple_of(NR) && alpha.len() >= rows && out.len() >= rows * ev
    );
    assert!(cols == 0 || rows == 0 || p.len() >= (rows - 1) * BK + cols);
    assert!(cols == 0 || vb.v.len() >= (ev / NR - 1) * vb.strip_stride + (cols - 1) * vb.key_stride + NR);
    let mut r0 = 0;
    while r0 < rows {
        let groups = shape(rows - r0, 0).0;
        let mut c = 0;
        while c < ev / NR {
            let (g, n) = shape(rows - r0, ev / NR - c);
            match (g, n) {
                (2, 2) => pv_tile::<2, 2, L>(p, alpha, out, vb, r0, c),
                (2, _) => pv_tile::<2, 1, L>(p, alpha, out, vb, r0, c),
                (_, 4) => pv_tile::<1, 4, L>(p, alpha, out, vb, r0, c),
                (_, 2) => pv_tile::<1, 2, L>(p, alpha, out, vb, r0, c),
                _ => pv_tile::<1, 1, L>(p, alpha, out, vb, r0, c),
            }
            c += n;
        }
        r0 += groups * MR;
    }
}

/// `out = alpha · out + P · V` for `G` groups of `MR` rows from row `r0` and the `S` strips of
/// value columns from strip `c`.
#[inline]
#[target_feature(enable = "avx512f")]
fn pv_tile<const G: usize, const S: usize, L: Lanes>(
    p: &[f32],
    alpha: &[f32],
    out: &mut [f32],
    vb: &VBlock<&[L]>,
    r0: usize,
    c: usize,
) {
    let (ev, cols, ks) = (vb.ev, vb.cols, vb.key_stride);
    let mut tile = [[[_mm512_setzero_ps(); S]; MR]; G];
    for (g, tile) in tile.iter_mut().enumerate() {
        for (r, t) in tile.iter_mut().enumerate() {
            let row = r0 + g * MR + r;
            let a = _mm512_set1_ps(alpha[row]);
            for (s, t) in t.iter_mut().enumerate() {
                *t = _mm512_mul_ps(load(out[row * ev + (c + s) * NR..][..NR].try_into().unwrap()), a);
            }
        }
    }
    if cols > 0 {
        // Row r's probabilities p[r][0..cols]; strip s's values of key j v[s][j·ks..][..NR].
        let p: [[&[f32]; MR]; G] = simd::array(|g| simd::array(|r| &p[(r0 + g * MR + r) * BK..][..cols]));
        let v: [&[L]; S] = simd::array(|s| &vb.v[(c + s) * vb.strip_stride..][..(cols - 1) * ks + NR]);
        for j in 0..cols {
            // SAFETY: j < cols, so j·ks + NR <= v[s].len() (its length above); AVX-512F (this
            // function's feature).
            let vj: [__m512; S] = simd::array(|s| unsafe { L::load16(v[s].as_ptr().add(j * ks)) });
            for (tile, p) in tile.iter_mut().zip(&p) {
                for (t, pr) in tile.iter_mut().zip(p) {
                    // SAFETY: j < cols = pr.len().
                    let pr = _mm512_set1_ps(unsafe { *pr.get_unchecked(j) });
                    for (t, &v) in t.iter_mut().zip(&vj) {
                        *t = _mm512_fmadd_ps(pr, v, *t);
                    }
                }
            }
        }
    }
    for (g, tile) in tile.iter().enumerate() {
        for (r, t) in tile.iter().enumerate() {
            let row = r0 + g * MR + r;
            for (s, &t) in t.iter().enumerate() {
                store((&mut out[row * ev + (c + s) * NR..][..NR]).try_into().unwrap(), t);
            }
        }
    }
}
