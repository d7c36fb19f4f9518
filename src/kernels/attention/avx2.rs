//! The float32 kernels of [`Explicit`](super::fast::Explicit) in AVX2 + FMA intrinsics.
//!
//! Each follows its generic counterpart in `tile.rs` or `decode.rs` operation for operation, so
//! the two give the same bits:
//! - a tiled-path score is the chain `fma(q[d], k[d], ·)` over d = 0, 1, … from +0; a decode
//!   score is the eight-lane form of `decode::dots` (lane t the chain over d ≡ t mod 8, padded
//!   with zeros, which add nothing), reduced by the same addition tree, except over keys in
//!   strips (`strip_dots`), where it is the tiled path's chain;
//! - masking is a select to −inf after all arithmetic; a row's maximum ignores NaN and a NaN
//!   flag is kept apart (the order of a maximum cannot matter here: a score is never −0, since a
//!   chain of fused multiply-adds from +0 only reaches zero as +0);
//! - `exp` is `Exp::exp_nonpositive` step by step (the same fused multiply-adds);
//! - sums run in eight lanes over the row's elements in order, the tail added to the first
//!   lanes, then `((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7))`;
//! - P·V is `out · alpha` followed by the chain `fma(p_j, v_j, ·)` over the keys in order.
//!
//! `unsafe` appears only where a vector is read from or written to memory, always through a
//! reference to exactly the floats it moves (an array of eight, or of four). The kernels are
//! `unsafe` to call (they need AVX2, FMA and F16C): `x86.rs` calls them, with its token as
//! proof that the CPU has the instructions.

use std::arch::x86_64::*;

use super::fast::{ScoreBlock, VBlock, BK, MR, NR};
use super::lanes::Lanes;
use crate::kernels::exp::{f32_consts as c, Exp};
use crate::kernels::simd;

#[inline]
#[target_feature(enable = "avx2,fma")]
fn load(x: &[f32; 8]) -> __m256 {
    // SAFETY: reads the eight floats of `x`.
    unsafe { _mm256_loadu_ps(x.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn load_i32(x: &[i32; 8]) -> __m256i {
    // SAFETY: reads the eight integers of `x`.
    unsafe { _mm256_loadu_si256(x.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn store(x: &mut [f32; 8], v: __m256) {
    // SAFETY: writes the eight floats of `x`.
    unsafe { _mm256_storeu_ps(x.as_mut_ptr(), v) }
}

/// The first and the last eight of sixteen.
#[inline(always)]
fn halves<X>(x: &[X; NR]) -> [&[X; 8]; 2] {
    let (a, b) = x.split_at(8);
    [a.try_into().unwrap(), b.try_into().unwrap()]
}

#[inline(always)]
fn halves_mut(x: &mut [f32; NR]) -> [&mut [f32; 8]; 2] {
    let (a, b) = x.split_at_mut(8);
    [a.try_into().unwrap(), b.try_into().unwrap()]
}

#[target_feature(enable = "avx2,fma")]
pub(super) fn masked_scores(blk: &ScoreBlock<'_, f32>, scores: &mut [f32], max: &mut [f32]) {
    let (e, (t0, t1)) = (blk.e, blk.tiles);
    let rows = blk.rows;
    assert!(rows.is_multiple_of(MR) && t0.is_multiple_of(NR) && t1.is_multiple_of(NR) && t1 <= BK);
    assert!(max.len() >= rows && scores.len() >= rows * BK);
    assert!(blk.mask.all_valid || blk.mask.keep.len() >= t1 && blk.mask.bounds.len() >= rows);
    let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
    let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for r0 in (0..rows).step_by(MR) {
        let (q, _) = blk.q[r0 * e..(r0 + MR) * e].as_chunks::<MR>();
        let mut row_max = [neg_inf; MR];
        let mut row_nan = [_mm256_setzero_ps(); MR];
        for j0 in (t0..t1).step_by(NR) {
            let (kt, _) = blk.kt[j0 * e..(j0 + NR) * e].as_chunks::<NR>();
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            for (kd, qd) in kt.iter().zip(q) {
                let k = halves(kd).map(|x| load(x));
                for (acc, &qr) in acc.iter_mut().zip(qd) {
                    let qr = _mm256_set1_ps(qr);
                    for (a, &k) in acc.iter_mut().zip(&k) {
                        *a = _mm256_fmadd_ps(qr, k, *a);
                    }
                }
            }
            // Valid: the key is kept and the column lies in the row's bounds. Then the select,
            // the store, the maximum and the NaN flag, while the tile is in registers.
            let mut tile = acc;
            if !blk.mask.all_valid {
                let (keep, _) = blk.mask.keep[j0..j0 + NR].as_chunks::<8>();
                let keep = [load_i32(&keep[0]), load_i32(&keep[1])];
                let col = [0, 8].map(|h| _mm256_add_epi32(_mm256_set1_epi32((j0 + h) as i32), iota));
                for (r, row) in tile.iter_mut().enumerate() {
                    let (lo, hi) = blk.mask.bounds[r0 + r];
                    let (lo, hi) = (_mm256_set1_epi32(lo as i32), _mm256_set1_epi32(hi as i32));
                    for (s, (&col, &keep)) in row.iter_mut().zip(col.iter().zip(&keep)) {
                        // lo <= col < hi, i.e. not (lo > col) and (hi > col).
                        let inside =
                            _mm256_andnot_si256(_mm256_cmpgt_epi32(lo, col), _mm256_cmpgt_epi32(hi, col));
                        let valid = _mm256_castsi256_ps(_mm256_and_si256(inside, keep));
                        *s = _mm256_blendv_ps(neg_inf, *s, valid);
                    }
                }
            }
            for (r, row) in tile.iter().enumerate() {
                let out: &mut [f32; NR] = (&mut scores[(r0 + r) * BK + j0..][..NR]).try_into().unwrap();
                for (out, &s) in halves_mut(out).into_iter().zip(row) {
                    store(out, s);
                    row_max[r] = _mm256_max_ps(s, row_max[r]); // keeps row_max where s is NaN
                    row_nan[r] = _mm256_or_ps(row_nan[r], _mm256_cmp_ps::<_CMP_UNORD_Q>(s, s));
                }
            }
        }
        for r in 0..MR {
            let mut lanes = [0.0f32; 8];
            store(&mut lanes, row_max[r]);
            let m = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
            max[r0 + r] = if _mm256_movemask_ps(row_nan[r]) != 0 { f32::NAN } else { m };
        }
    }
}

/// `exp_nonpositive` of eight floats, operation for operation.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: __m256) -> __m256 {
    let min = _mm256_set1_ps(c::MIN);
    let rounder = _mm256_set1_ps(c::ROUNDER);
    // max(MIN, x) is x when x is NaN (the instruction returns its second operand then).
    let xm = _mm256_max_ps(min, x);
    let shifted = _mm256_fmadd_ps(xm, _mm256_set1_ps(c::LOG2E), rounder);
    let n = _mm256_sub_ps(shifted, rounder);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-c::LN2_HI), xm);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-c::LN2_LO), r);
    let mut p = _mm256_set1_ps(c::POLY[0]);
    for &k in &c::POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(k));
    }
    let e_r = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
    let bits = _mm256_add_epi32(_mm256_castps_si256(shifted), _mm256_set1_epi32(127));
    let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(bits));
    // +0 below MIN.
    _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(x, min), _mm256_mul_ps(e_r, two_n))
}

#[target_feature(enable = "avx2,fma")]
pub(super) fn probabilities(row: &mut [f32], m: f32) -> f32 {
    let (neg_inf, neg_zero, mv) =
        (_mm256_set1_ps(f32::NEG_INFINITY), _mm256_set1_ps(-0.0), _mm256_set1_ps(m));
    let mut sum = _mm256_setzero_ps();
    let (chunks, tail) = row.as_chunks_mut::<8>();
    for chunk in chunks {
        let x = load(chunk);
        let masked = _mm256_cmp_ps::<_CMP_EQ_OQ>(x, neg_inf);
        let p = _mm256_blendv_ps(exp8(_mm256_sub_ps(x, mv)), neg_zero, masked);
        store(chunk, p);
        sum = _mm256_add_ps(sum, p);
    }
    let mut lanes = [0.0f32; 8];
    store(&mut lanes, sum);
    for (lane, x) in lanes.iter_mut().zip(tail) {
        *x = if *x == f32::NEG_INFINITY { -0.0 } else { (*x - m).exp_nonpositive() };
        *lane += *x;
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn pv<L: Lanes>(p: &[f32], alpha: &[f32], out: &mut [f32], vb: &VBlock<&[L]>) {
    const { assert!(MR == 4) };
    let (ev, cols, ks) = (vb.ev, vb.cols, vb.key_stride);
    assert!(ev.is_multiple_of(NR) && alpha.len() >= MR && out.len() >= MR * ev);
    let p: [&[f32]; MR] = simd::array(|r| &p[r * BK..r * BK + cols]);
    for c in 0..ev / NR {
        let d0 = c * NR;
        // Key j's NR values of these columns: v[j·ks..][..NR], from this strip's start.
        let v = match cols {
            0 => &[][..],
            _ => &vb.v[c * vb.strip_stride..][..(cols - 1) * ks + NR],
        };
        let v = (0..cols).map(|j| -> &[L; NR] { v[j * ks..][..NR].try_into().unwrap() });
        let mut tile = [[_mm256_setzero_ps(); 2]; MR];
        for (r, t) in tile.iter_mut().enumerate() {
            let o: &[f32; NR] = out[r * ev + d0..][..NR].try_into().unwrap();
            let a = _mm256_set1_ps(alpha[r]);
            *t = halves(o).map(|o| _mm256_mul_ps(load(o), a));
        }
        let keys = v.zip(p[0]).zip(p[1]).zip(p[2]).zip(p[3]);
        for ((((vj, &p0), &p1), &p2), &p3) in keys {
            // SAFETY: AVX2 and F16C (this function's features).
            let vj = halves(vj).map(|x| unsafe { L::load8(x) });
            for (t, pr) in tile.iter_mut().zip([p0, p1, p2, p3]) {
                let pr = _mm256_set1_ps(pr);
                for (t, &v) in t.iter_mut().zip(&vj) {
                    *t = _mm256_fmadd_ps(pr, v, *t);
                }
            }
        }
        for (r, t) in tile.iter().enumerate() {
            let o: &mut [f32; NR] = (&mut out[r * ev + d0..][..NR]).try_into().unwrap();
            for (half, &t) in halves_mut(o).into_iter().zip(t) {
                store(half, t);
            }
        }
    }
}

/// The dot products of the eight-lane form for each of `acc` (four vectors of lanes): lane
/// sums `((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7))`, in that order.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn reduce4(acc: [__m256; 4]) -> [f32; 4] {
    let [a, b, c, d] = acc;
    // [a0+a4, a1+a5, a2+a6, a3+a7 | b0+b4, ..], and the same for c, d.
    let ab = _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(a, b), _mm256_permute2f128_ps::<0x31>(a, b));
    let cd = _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(c, d), _mm256_permute2f128_ps::<0x31>(c, d));
    // hadd pairs neighbours within each half: [a01, a23, c01, c23 | b01, b23, d01, d23], then
    // [a, c, a, c | b, d, b, d].
    let h = _mm256_hadd_ps(ab, cd);
    let h = _mm256_hadd_ps(h, h);
    let abcd = _mm_unpacklo_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
    let mut out = [0.0f32; 4];
    // SAFETY: writes the four floats of `out`.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), abcd) };
    out
}

/// Eight floats from the first eight (or fewer, then zeros) of `x`. A zero lane adds
/// `fma(0, 0, l) = l` to a chain that is never −0, so a short tail changes no bit.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_padded<L: Lanes>(x: &[L]) -> __m256 {
    let mut t = [L::default(); 8];
    let n = x.len().min(8);
    t[..n].copy_from_slice(&x[..n]);
    // SAFETY: AVX2 and F16C (this function's features).
    unsafe { L::load8(&t) }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dots<L: Lanes>(q: &[f32], e: usize, k: &[L], stride: usize, n: usize, out: &mut [f32]) {
    dots_tile::<MR, L>(q, e, k, stride, n, out)
}

/// [`Explicit::dots`](super::fast::Explicit::dots) for `R` rows (a multiple of four): `R` rows x
/// two keys of eight-lane chains, each query chunk loaded once for both keys and each key chunk
/// once for all rows. Eight rows take 16 accumulators, so only a caller with the 32 registers of
/// AVX-512 (`x86::dots_wide`) should ask for them.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dots_tile<const R: usize, L: Lanes>(
    q: &[f32],
    e: usize,
    k: &[L],
    stride: usize,
    n: usize,
    out: &mut [f32],
) {
    const { assert!(R.is_multiple_of(4)) };
    if n == 0 {
        return;
    }
    assert!(q.len() >= R * e && k.len() >= (n - 1) * stride + e && out.len() >= (R - 1) * BK + n);
    let full = e / 8;
    let q: [&[f32]; R] = simd::array(|r| &q[r * e..(r + 1) * e]);
    let q_tail: [__m256; R] = simd::array(|r| load_padded(&q[r][full * 8..]));
    let key = |j: usize| &k[j * stride..j * stride + e];
    let mut j = 0;
    while j + 2 <= n {
        let (k0, k1) = (key(j).as_chunks::<8>(), key(j + 1).as_chunks::<8>());
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (c, (x0, x1)) in k0.0.iter().zip(k1.0).enumerate() {
            // SAFETY: AVX2 and F16C (this function's features).
            let kv = unsafe { [L::load8(x0), L::load8(x1)] };
            for (acc, q) in acc.iter_mut().zip(&q) {
                let qv = load(q[c * 8..][..8].try_into().unwrap());
                acc[0] = _mm256_fmadd_ps(qv, kv[0], acc[0]);
                acc[1] = _mm256_fmadd_ps(qv, kv[1], acc[1]);
            }
        }
        if full * 8 < e {
            let kv = [load_padded(k0.1), load_padded(k1.1)];
            for (acc, &qv) in acc.iter_mut().zip(&q_tail) {
                acc[0] = _mm256_fmadd_ps(qv, kv[0], acc[0]);
                acc[1] = _mm256_fmadd_ps(qv, kv[1], acc[1]);
            }
        }
        for r0 in (0..R).step_by(4) {
            for h in 0..2 {
                let s = reduce4(simd::array(|r| acc[r0 + r][h]));
                for (r, &s) in s.iter().enumerate() {
                    out[(r0 + r) * BK + j + h] = s;
                }
            }
        }
        j += 2;
    }
    if j < n {
        let (kc, kt) = key(j).as_chunks::<8>();
        let mut acc = [_mm256_setzero_ps(); R];
        for (c, x) in kc.iter().enumerate() {
            // SAFETY: as above.
            let kv = unsafe { L::load8(x) };
            for (acc, q) in acc.iter_mut().zip(&q) {
                *acc = _mm256_fmadd_ps(load(q[c * 8..][..8].try_into().unwrap()), kv, *acc);
            }
        }
        if full * 8 < e {
            let kv = load_padded(kt);
            for (acc, &qv) in acc.iter_mut().zip(&q_tail) {
                *acc = _mm256_fmadd_ps(qv, kv, *acc);
            }
        }
        for r0 in (0..R).step_by(4) {
            let s = reduce4(simd::array(|r| acc[r0 + r]));
            for (r, &s) in s.iter().enumerate() {
                out[(r0 + r) * BK + j] = s;
            }
        }
    }
}

/// [`Explicit::strip_dots`](super::fast::Explicit::strip_dots): one strip after another, each
/// read for all rows while it stays in cache, against four rows at a time (eight chains of
/// eight lanes side by side), then pairs, then a single row. (Two or four strips side by side,
/// their pages read as concurrent streams, came out up to a quarter slower on decode calls that
/// stream the cache from memory: GPT-2 at batch 8, and grouped heads over long sequences.)
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn strip_dots<L: Lanes>(q: &[f32], e: usize, kt: &[L], cols: usize, out: &mut [f32]) {
    let rows = q.len() / e;
    for n in 0..cols.div_ceil(NR) {
        let kt = &kt[n * e * NR..];
        let mut r = 0;
        while r < rows {
            let (q, out) = (&q[r * e..], &mut out[r * BK..]);
            r += match rows - r {
                4.. => strip_tile::<4, 1, L>(q, e, kt, n, cols, out),
                2 | 3 => strip_tile::<2, 1, L>(q, e, kt, n, cols, out),
                _ => strip_tile::<1, 1, L>(q, e, kt, n, cols, out),
            };
        }
    }
}

/// `R` query rows (from `q`, `e` apart) against `N` strips (`e x NR` each, from `kt`): the scores
/// of block columns `n0·NR..` up to `cols`, each a chain of fused multiply-adds over `d` from +0,
/// into `out` (rows `BK` apart); returns `R`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn strip_tile<const R: usize, const N: usize, L: Lanes>(
    q: &[f32],
    e: usize,
    kt: &[L],
    n0: usize,
    cols: usize,
    out: &mut [f32],
) -> usize {
    let (halves, _) = kt[..N * e * NR].as_chunks::<8>(); // strip n, dimension d: halves 2(n·e + d)..
    let strips: [&[[L; 8]]; N] = simd::array(|n| &halves[2 * n * e..2 * (n + 1) * e]);
    let q: [&[f32]; R] = simd::array(|r| &q[r * e..(r + 1) * e]);
    let mut acc = [[[_mm256_setzero_ps(); 2]; N]; R];
    for d in 0..e {
        let x: [__m256; R] = simd::array(|r| _mm256_set1_ps(q[r][d]));
        for (n, strip) in strips.iter().enumerate() {
            // SAFETY: AVX2 and F16C (this function's features).
            let k = unsafe { [L::load8(&strip[2 * d]), L::load8(&strip[2 * d + 1])] };
            for (acc, &x) in acc.iter_mut().zip(&x) {
                acc[n][0] = _mm256_fmadd_ps(x, k[0], acc[n][0]);
                acc[n][1] = _mm256_fmadd_ps(x, k[1], acc[n][1]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (n, acc) in acc.iter().enumerate() {
            for (h, &v) in acc.iter().enumerate() {
                let j = (n0 + n) * NR + h * 8;
                if j < cols {
                    let mut t = [0.0; 8];
                    store(&mut t, v);
                    let w = (cols - j).min(8);
                    out[r * BK + j..][..w].copy_from_slice(&t[..w]);
                }
            }
        }
    }
    R
}

/// One query row against keys four at a time: four eight-lane chains side by side, each chunk of
/// the query loaded once for the four keys, reduced together.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dots_row<L: Lanes>(q: &[f32], k: &[L], stride: usize, n: usize, out: &mut [f32]) {
    let e = q.len();
    if n == 0 {
        return;
    }
    assert!(k.len() >= (n - 1) * stride + e && out.len() >= n);
    let (qc, qt) = q.as_chunks::<8>();
    let q_tail = load_padded(qt);
    let key = |j: usize| k[j * stride..j * stride + e].as_chunks::<8>();
    let chain = |acc: &mut __m256, (kc, kt): (&[[L; 8]], &[L])| {
        for (qv, kv) in qc.iter().zip(kc) {
            // SAFETY: AVX2 and F16C (this function's features).
            *acc = _mm256_fmadd_ps(load(qv), unsafe { L::load8(kv) }, *acc);
        }
        if !qt.is_empty() {
            *acc = _mm256_fmadd_ps(q_tail, load_padded(kt), *acc);
        }
    };
    let mut j = 0;
    while j + 4 <= n {
        // (`std::array::from_fn` here, which LLVM inlines in this kernel; `simd::array` measured
        // 4% slower.)
        let keys: [(&[[L; 8]], &[L]); 4] = std::array::from_fn(|i| key(j + i));
        let mut acc = [_mm256_setzero_ps(); 4];
        // Chunk by chunk across the four keys, so the four chains advance together.
        for (c, qv) in qc.iter().enumerate() {
            let qv = load(qv);
            for (a, (kc, _)) in acc.iter_mut().zip(&keys) {
                // SAFETY: as above.
                *a = _mm256_fmadd_ps(qv, unsafe { L::load8(&kc[c]) }, *a);
            }
        }
        if !qt.is_empty() {
            for (a, (_, kt)) in acc.iter_mut().zip(&keys) {
                *a = _mm256_fmadd_ps(q_tail, load_padded(kt), *a);
            }
        }
        out[j..j + 4].copy_from_slice(&reduce4(acc));
        j += 4;
    }
    for (j, o) in out.iter_mut().enumerate().take(n).skip(j) {
        let mut acc = _mm256_setzero_ps();
        chain(&mut acc, key(j));
        *o = reduce4([acc; 4])[0];
    }
}

/// `out = alpha · out + Σ_j p[j] v_j` for one row: 64 columns (eight registers) at a time, then
/// 32, 16 and 8, each block's accumulators held in registers across all the keys.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn pv_row<L: Lanes>(p: &[f32], alpha: f32, out: &mut [f32], v: &[L], stride: usize) {
    let (ev, cols) = (out.len(), p.len());
    assert!(ev.is_multiple_of(8) && (cols == 0 || v.len() >= (cols - 1) * stride + ev));
    let mut c = 0;
    while c + 64 <= ev {
        pv_columns::<8, L>(p, alpha, &mut out[c..c + 64], &v[c..], stride);
        c += 64;
    }
    for width in [4, 2, 1] {
        if c + 8 * width <= ev {
            let (out, v) = (&mut out[c..c + 8 * width], &v[c..]);
            match width {
                4 => pv_columns::<4, L>(p, alpha, out, v, stride),
                2 => pv_columns::<2, L>(p, alpha, out, v, stride),
                _ => pv_columns::<1, L>(p, alpha, out, v, stride),
            }
            c += 8 * width;
        }
    }
}

/// [`pv_row`] for its `8·R` columns `out` (`R` registers; value `j` at `v[j·stride..]`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn pv_columns<const R: usize, L: Lanes>(p: &[f32], alpha: f32, out: &mut [f32], v: &[L], stride: usize) {
    let (out, _) = out.as_chunks_mut::<8>();
    let a = _mm256_set1_ps(alpha);
    let mut acc = [_mm256_setzero_ps(); R];
    for (acc, o) in acc.iter_mut().zip(out.iter()) {
        *acc = _mm256_mul_ps(load(o), a);
    }
    for (j, &pj) in p.iter().enumerate() {
        let pj = _mm256_set1_ps(pj);
        let (row, _) = v[j * stride..][..8 * R].as_chunks::<8>();
        for (acc, x) in acc.iter_mut().zip(row) {
            // SAFETY: AVX2 and F16C (this function's features).
            *acc = _mm256_fmadd_ps(pj, unsafe { L::load8(x) }, *acc);
        }
    }
    for (o, &acc) in out.iter_mut().zip(&acc) {
        store(o, acc);
    }
}

/// Rows `r[0..8]` transposed: `out[d][i] = r[i][d]`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    let u = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    [
        _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
        _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
    ]
}

#[target_feature(enable = "avx2,fma")]
pub(super) fn pack_keys(k: &[f32], stride: usize, e: usize, n: usize, kt: &mut [f32]) {
    if n == 0 || e == 0 {
        return;
    }
    assert!(k.len() >= (n - 1) * stride + e && kt.len() >= n.next_multiple_of(NR) * e);
    let key = |j: usize| &k[j * stride..j * stride + e];
    // Eight keys by eight dimensions at a time, transposed in registers; what is left, one by one.
    let (groups, dims) = (n / 8 * 8, e / 8 * 8);
    for j0 in (0..groups).step_by(8) {
        let rows: [&[f32]; 8] = simd::array(|i| key(j0 + i));
        // The next eight keys, to be in cache when their turn comes.
        for j in (j0 + 8..j0 + 16).take_while(|&j| j < n) {
            simd::prefetch(key(j));
        }
        let (strip, n0) = (j0 / NR, j0 % NR);
        let dst = &mut kt[strip * e * NR..(strip + 1) * e * NR];
        for d0 in (0..dims).step_by(8) {
            let cols = transpose8(rows.map(|r| load(r[d0..d0 + 8].try_into().unwrap())));
            for (d, col) in cols.into_iter().enumerate() {
                store((&mut dst[(d0 + d) * NR + n0..][..8]).try_into().unwrap(), col);
            }
        }
        for (i, row) in rows.iter().enumerate() {
            for (d, &x) in row.iter().enumerate().skip(dims) {
                dst[d * NR + n0 + i] = x;
            }
        }
    }
    for j in groups..n {
        let (strip, n0) = (j / NR, j % NR);
        for (d, &x) in key(j).iter().enumerate() {
            kt[(strip * e + d) * NR + n0] = x;
        }
    }
}
