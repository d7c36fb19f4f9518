//! The kernels of `dot16.rs` with `vdpbf16ps` (AVX512_BF16): the score and P·V tiles of
//! bfloat16 attention, two multiply-adds per float32 lane in one instruction, and the softmax
//! step that rounds the probabilities to bfloat16 with `vcvtne2ps2bf16` as it computes them.
//! Each computes exactly what its portable counterpart in `dot16.rs` computes, whose `step` is
//! this instruction's lane; the tiles have
//! the shapes of `avx512.rs` (up to 16 accumulators: two groups of MR rows by two strips of 16
//! columns, or one group by four).
//!
//! `unsafe` appears where memory is read or written (inside lengths asserted first) and where
//! [`Bf16Dot`] enters the kernels, whose existence proves the CPU has the instructions.

use std::arch::x86_64::*;

use super::fast::{tile_shape as shape, Mask, BK, BQ, MR, NR};
use crate::kernels::exp::short_consts as c;
use crate::kernels::simd;
use crate::kernels::storage::Bf16;

/// Proof that this CPU runs AVX-512F, AVX-512VL and AVX512_BF16, and that the accelerated path
/// (with AVX-512) is enabled: only [`Bf16Dot::detect`] makes one.
#[derive(Clone, Copy)]
pub struct Bf16Dot(());

impl Bf16Dot {
    #[inline(always)]
    pub(super) fn detect() -> Option<Self> {
        (simd::avx512() && std::arch::is_x86_feature_detected!("avx512bf16")).then_some(Self(()))
    }

    /// See `dot16::scores`; with `mask`, also the masks of `dot16::Mask` (a select to −inf
    /// after all arithmetic) and each row's largest valid score into `max`, NaN passed over
    /// (`dot16::softmax` makes a row with a NaN score NaN).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn scores(
        self,
        q: &[u32],
        p: usize,
        kt: &[u32],
        rows: usize,
        tiles: (usize, usize),
        scale: f32,
        out: &mut [f32],
        mask: Option<(&Mask<'_>, &mut [f32])>,
    ) {
        // SAFETY: `self` exists only on a CPU with these instructions.
        unsafe { scores(q, p, kt, rows, tiles, scale, out, mask) }
    }

    /// See `dot16::softmax`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn softmax(
        self,
        scores: &[f32],
        cols: usize,
        row_max: &[f32],
        m: &mut [f32],
        sums: &mut [[f32; NR]],
        alpha: &mut [f32],
        pw: &mut [u32],
    ) {
        // SAFETY: as in `scores`.
        unsafe { softmax(scores, cols, row_max, m, sums, alpha, pw) }
    }

    /// See `dot16::pack_keys`.
    #[inline(always)]
    pub(super) fn pack_keys(self, k: &[Bf16], stride: usize, e: usize, n: usize, kt: &mut [u32]) {
        // SAFETY: as in `scores`.
        unsafe { pack_keys(k, stride, e, n, kt) }
    }

    /// See `dot16::pv`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn pv(
        self,
        pw: &[u32],
        alpha: &[f32],
        out: &mut [f32],
        rows: usize,
        vt: &[u32],
        ev: usize,
        cols: usize,
    ) {
        // SAFETY: as in `scores`.
        unsafe { pv(pw, alpha, out, rows, vt, ev, cols) }
    }
}

/// Sixteen pair words as bfloat16 pairs.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
fn load_pairs(x: &[u32; NR]) -> __m512bh {
    // SAFETY: reads the sixteen words of `x`; a vector of 32-bit words and one of bfloat16
    // pairs are the same 64 bytes.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(x.as_ptr().cast())) }
}

/// One pair word in every lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
fn broadcast(w: u32) -> __m512bh {
    // SAFETY: a vector of 32-bit words and one of bfloat16 pairs are the same 64 bytes.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(w as i32)) }
}

/// The running maximum of up to two groups of MR rows' valid scores, NaN passed over.
type RowMax = [[__m512; MR]; 2];

#[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
fn scores(
    q: &[u32],
    p: usize,
    kt: &[u32],
    rows: usize,
    tiles: (usize, usize),
    scale: f32,
    out: &mut [f32],
    mut mask: Option<(&Mask<'_>, &mut [f32])>,
) {
    let (s0, s1) = (tiles.0 / NR, tiles.1 / NR);
    assert!(rows.is_multiple_of(MR) && q.len() >= rows * p && kt.len() >= s1 * p * NR && s1 * NR <= BK);
    assert!(rows == 0 || out.len() >= (rows - 1) * BK + s1 * NR);
    if let Some((m, max)) = &mask {
        assert!(max.len() >= rows && (m.all_valid || m.keep.len() >= s1 * NR && m.bounds.len() >= rows));
    }
    let mut r0 = 0;
    while r0 < rows {
        let groups = shape(rows - r0, 0).0;
        let mut row: RowMax = [[_mm512_set1_ps(f32::NEG_INFINITY); MR]; 2];
        let m = mask.as_ref().map(|(m, _)| *m);
        let mut s = s0;
        while s < s1 {
            let (g, n) = shape(rows - r0, s1 - s);
            match (g, n) {
                (2, 2) => score_tile::<2, 2>(q, p, kt, r0, s, scale, out, m, &mut row),
                (2, _) => score_tile::<2, 1>(q, p, kt, r0, s, scale, out, m, &mut row),
                (_, 4) => score_tile::<1, 4>(q, p, kt, r0, s, scale, out, m, &mut row),
                (_, 2) => score_tile::<1, 2>(q, p, kt, r0, s, scale, out, m, &mut row),
                _ => score_tile::<1, 1>(q, p, kt, r0, s, scale, out, m, &mut row),
            }
            s += n;
        }
        if let Some((_, max)) = &mut mask {
            for (g, max_g) in row.iter().enumerate().take(groups) {
                for (r, &m) in max_g.iter().enumerate() {
                    // The lanes hold no NaN; see `rows::mask_row` on the order of comparison.
                    max[r0 + g * MR + r] = _mm512_reduce_max_ps(m);
                }
            }
        }
        r0 += groups * MR;
    }
}

/// `G` groups of MR rows from `r0` by `S` strips of keys from `s0`, over all `p` pairs, then
/// (with `mask`) masked and folded into `row`.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
fn score_tile<const G: usize, const S: usize>(
    q: &[u32],
    p: usize,
    kt: &[u32],
    r0: usize,
    s0: usize,
    scale: f32,
    out: &mut [f32],
    mask: Option<&Mask<'_>>,
    row: &mut RowMax,
) {
    let mut acc = [[[_mm512_setzero_ps(); S]; MR]; G];
    // Each strip's and each row's `p` pairs, as slices of that length (no bounds checks below).
    let strips: [&[[u32; NR]]; S] =
        simd::array(|s| &kt[(s0 + s) * p * NR..][..p * NR].as_chunks::<NR>().0[..p]);
    let rows: [[&[u32]; MR]; G] = simd::array(|g| simd::array(|r| &q[(r0 + g * MR + r) * p..][..p]));
    for i in 0..p {
        let k: [__m512bh; S] = simd::array(|s| load_pairs(&strips[s][i]));
        for (acc, rows) in acc.iter_mut().zip(&rows) {
            for (acc, row) in acc.iter_mut().zip(rows) {
                let a = broadcast(row[i]);
                for (x, &k) in acc.iter_mut().zip(&k) {
                    *x = _mm512_dpbf16_ps(*x, a, k);
                }
            }
        }
    }
    let scale = _mm512_set1_ps(scale);
    for acc in acc.iter_mut() {
        for acc in acc.iter_mut() {
            for x in acc.iter_mut() {
                *x = _mm512_mul_ps(*x, scale);
            }
        }
    }
    // Valid: the key is kept and the column lies in the row's bounds, lo <= col < hi.
    if let Some(m) = mask.filter(|m| !m.all_valid) {
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for s in 0..S {
            let c0 = (s0 + s) * NR;
            // SAFETY: reads the sixteen marks at c0 (c0 + NR <= s1 · NR <= keep.len(), asserted).
            let keep = unsafe { _mm512_loadu_si512(m.keep[c0..c0 + NR].as_ptr().cast()) };
            let keep = _mm512_test_epi32_mask(keep, keep);
            let col = _mm512_add_epi32(_mm512_set1_epi32(c0 as i32), iota);
            for (g, acc) in acc.iter_mut().enumerate() {
                for (r, acc) in acc.iter_mut().enumerate() {
                    let (lo, hi) = m.bounds[r0 + g * MR + r];
                    let inside = _mm512_cmpge_epi32_mask(col, _mm512_set1_epi32(lo as i32))
                        & _mm512_cmplt_epi32_mask(col, _mm512_set1_epi32(hi as i32));
                    acc[s] = _mm512_mask_blend_ps(inside & keep, neg_inf, acc[s]);
                }
            }
        }
    }
    for (g, acc) in acc.iter().enumerate() {
        for (r, acc) in acc.iter().enumerate() {
            let at = r0 + g * MR + r;
            let max = &mut row[g][r];
            for (s, &x) in acc.iter().enumerate() {
                let o: &mut [f32; NR] = (&mut out[at * BK + (s0 + s) * NR..][..NR]).try_into().unwrap();
                // SAFETY: writes the sixteen floats of `o`.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr(), x) };
                if mask.is_some() {
                    *max = _mm512_max_ps(x, *max); // keeps the maximum where x is NaN
                }
            }
        }
    }
}

/// `exp_short` of sixteen lanes: its operations in the same order (`e^f · 2^n` as one
/// `vscalefps`, which rounds the same exact product once, as the multiplication by 2^n does).
#[inline]
#[target_feature(enable = "avx512f")]
fn exp_short16(x: __m512) -> __m512 {
    let (log2e, rounder) = (_mm512_set1_ps(c::LOG2E), _mm512_set1_ps(c::ROUNDER));
    let shifted = _mm512_fmadd_ps(x, log2e, rounder);
    let n = _mm512_sub_ps(shifted, rounder);
    let f = _mm512_fmsub_ps(x, log2e, n);
    let mut q = _mm512_set1_ps(c::POLY[0]);
    for &k in &c::POLY[1..] {
        q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(k));
    }
    let two_f = _mm512_fmadd_ps(q, f, _mm512_set1_ps(1.0));
    // +0 below MIN (and at −inf, where f is NaN); NaN stays NaN.
    _mm512_maskz_scalef_ps(!_mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(c::MIN)), two_f, n)
}

/// The probabilities of scores `s[at..]` (up to sixteen) against the maximum `m`: +0 where
/// masked (−inf) and in the lanes past the row's end (NaN rows included).
#[inline]
#[target_feature(enable = "avx512f")]
fn probabilities16(s: &[f32], at: usize, m: f32) -> __m512 {
    let n = s.len().saturating_sub(at).min(NR);
    let lanes: __mmask16 = if n == NR { 0xffff } else { (1 << n) - 1 };
    // SAFETY: the mask reads only the n <= NR floats at `at` that lie inside `s`.
    let x = unsafe { _mm512_maskz_loadu_ps(lanes, s.as_ptr().wrapping_add(at)) };
    let p = exp_short16(_mm512_sub_ps(x, _mm512_set1_ps(m)));
    if n < NR {
        _mm512_maskz_mov_ps(lanes, p)
    } else {
        p
    }
}

/// `dot16::softmax` in two passes: the new maxima and the factors `alpha` of sixteen rows at a
/// time (a row with no valid score but a NaN one is mended in the second pass), then each row's
/// probabilities (one long chain per row, from the maximum through its `alpha` to the sums, was
/// the kernel's bound).
#[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
fn softmax(
    scores: &[f32],
    cols: usize,
    row_max: &[f32],
    m: &mut [f32],
    sums: &mut [[f32; NR]],
    alpha: &mut [f32],
    pw: &mut [u32],
) {
    let rows = row_max.len();
    assert!(rows <= BQ && cols <= BK && m.len() >= rows && sums.len() >= rows && alpha.len() >= rows);
    assert!(pw.len() >= rows * BK / 2 && (rows == 0 || scores.len() >= (rows - 1) * BK + cols));
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut m_new = [0.0f32; BQ];
    for r0 in (0..rows).step_by(NR) {
        let lanes: __mmask16 = if rows - r0 >= NR { 0xffff } else { (1 << (rows - r0)) - 1 };
        // SAFETY: the mask reads and writes only rows r0.. below `rows` (of `row_max`, `m`,
        // `alpha` and `m_new`, each at least `rows` long).
        unsafe {
            let (max, old) = (
                _mm512_maskz_loadu_ps(lanes, row_max[r0..].as_ptr()),
                _mm512_maskz_loadu_ps(lanes, m[r0..].as_ptr()),
            );
            // The largest score wins, and so does a NaN one.
            let wins =
                _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(max, max) | _mm512_cmp_ps_mask::<_CMP_GT_OQ>(max, old);
            let new = _mm512_mask_blend_ps(wins, old, max);
            // No valid score yet: alpha is 1.
            let none = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(new, neg_inf);
            let a = _mm512_mask_blend_ps(none, exp_short16(_mm512_sub_ps(old, new)), _mm512_set1_ps(1.0));
            _mm512_mask_storeu_ps(m_new[r0..].as_mut_ptr(), lanes, new);
            _mm512_mask_storeu_ps(alpha[r0..].as_mut_ptr(), lanes, a);
        }
    }
    for r in 0..rows {
        let (s, pw, mut m_new) = (&scores[r * BK..][..cols], &mut pw[r * BK / 2..][..BK / 2], m_new[r]);
        if m_new == f32::NEG_INFINITY {
            if !s.iter().any(|x| x.is_nan()) {
                pw[..cols.div_ceil(2)].fill(0);
                continue;
            }
            // Its only valid scores are NaN: the row becomes NaN.
            (m_new, alpha[r]) = (f32::NAN, f32::NAN);
        }
        let mut acc = _mm512_setzero_ps();
        // Keys j.. : the low sixteen, then the high sixteen, summed and stored as pair words.
        let mut put = |j: usize, lo: __m512, hi: __m512| {
            acc = _mm512_add_ps(_mm512_add_ps(acc, lo), hi);
            let w: &mut [u32; NR] = (&mut pw[j / 2..][..NR]).try_into().unwrap();
            let bf = _mm512_cvtne2ps_pbh(hi, lo);
            // SAFETY: writes the sixteen words of `w`; a vector of bfloat16 values and one of
            // 32-bit words are the same 64 bytes.
            unsafe {
                _mm512_storeu_si512(w.as_mut_ptr().cast(), std::mem::transmute::<__m512bh, __m512i>(bf))
            };
        };
        let (whole, mv) = (cols - cols % (2 * NR), _mm512_set1_ps(m_new));
        for j in (0..whole).step_by(2 * NR) {
            // SAFETY: reads the 32 floats at j, inside `s` (j + 32 <= whole <= s.len()).
            let (x0, x1) =
                unsafe { (_mm512_loadu_ps(s.as_ptr().add(j)), _mm512_loadu_ps(s.as_ptr().add(j + NR))) };
            put(j, exp_short16(_mm512_sub_ps(x0, mv)), exp_short16(_mm512_sub_ps(x1, mv)));
        }
        if whole < cols {
            // The last keys, +0 past cols.
            put(whole, probabilities16(s, whole, m_new), probabilities16(s, whole + NR, m_new));
        }
        let sum = &mut sums[r];
        // SAFETY: reads and writes the sixteen floats of `sum`.
        unsafe {
            let running = _mm512_loadu_ps(sum.as_ptr());
            _mm512_storeu_ps(sum.as_mut_ptr(), _mm512_fmadd_ps(running, _mm512_set1_ps(alpha[r]), acc));
        }
        m[r] = m_new;
    }
}

/// `x[r]` becomes column `r` of the 16 x 16 matrix of 32-bit words whose rows `x` holds.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16(x: &mut [__m512i; NR]) {
    // Pairs of rows interleaved by words, then by pairs of words: in each 128-bit lane, a
    // column of four rows.
    let mut t = [_mm512_setzero_si512(); NR];
    for i in 0..NR / 2 {
        t[2 * i] = _mm512_unpacklo_epi32(x[2 * i], x[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(x[2 * i], x[2 * i + 1]);
    }
    for i in 0..NR / 4 {
        for h in 0..2 {
            x[4 * i + h] = _mm512_unpacklo_epi64(t[4 * i + h], t[4 * i + 2 + h]);
            x[4 * i + 2 + h] = _mm512_unpackhi_epi64(t[4 * i + h], t[4 * i + 2 + h]);
        }
    }
    // Lane l of x[4i + c] holds column 4l + [0, 2, 1, 3][c] of rows 4i..4i + 4: the 128-bit
    // lanes of four such vectors gathered two at a time, then again.
    for i in 0..NR / 8 {
        for c in 0..4 {
            let (a, b) = (x[c + 8 * i], x[c + 8 * i + 4]);
            t[c + 8 * i] = _mm512_shuffle_i32x4::<0b10_00_10_00>(a, b);
            t[c + 8 * i + 4] = _mm512_shuffle_i32x4::<0b11_01_11_01>(a, b);
        }
    }
    for c in 0..8 {
        let (a, b) = (t[c], t[c + 8]);
        let col = [0, 2, 1, 3][c % 4] + 4 * (c / 4);
        x[col] = _mm512_shuffle_i32x4::<0b10_00_10_00>(a, b);
        x[col + 8] = _mm512_shuffle_i32x4::<0b11_01_11_01>(a, b);
    }
}

/// `dot16::pack_keys`: sixteen keys by sixteen pairs at a time, transposed in registers (rows of
/// an even number of values), the rest as the portable code does.
#[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
fn pack_keys(k: &[Bf16], stride: usize, e: usize, n: usize, kt: &mut [u32]) {
    let p = e.div_ceil(2);
    assert!(n == 0 || k.len() >= (n - 1) * stride + e);
    assert!(kt.len() >= n.div_ceil(NR) * p * NR);
    let blocks = if e.is_multiple_of(2) { p / NR } else { 0 }; // whole 16 x 16 blocks of words
    for j0 in (0..n).step_by(NR) {
        let keys = NR.min(n - j0);
        let strip = &mut kt[j0 / NR * p * NR..][..p * NR];
        for b in (0..blocks).filter(|_| keys == NR) {
            let mut x: [__m512i; NR] = simd::array(|c| {
                let row = &k[(j0 + c) * stride + b * 2 * NR..][..2 * NR];
                // SAFETY: reads the 32 values (64 bytes) of `row`.
                unsafe { _mm512_loadu_si512(row.as_ptr().cast()) }
            });
            transpose16(&mut x);
            for (i, x) in x.iter().enumerate() {
                let w: &mut [u32; NR] = (&mut strip[(b * NR + i) * NR..][..NR]).try_into().unwrap();
                // SAFETY: writes the sixteen words of `w`.
                unsafe { _mm512_storeu_si512(w.as_mut_ptr().cast(), *x) };
            }
        }
        let done = if keys == NR { blocks * NR } else { 0 };
        for c in 0..keys {
            let row = &k[(j0 + c) * stride..][..e];
            for i in done..p {
                let hi = row.get(2 * i + 1).map_or(0, |x| x.0 as u32);
                strip[i * NR + c] = row[2 * i].0 as u32 | hi << 16;
            }
        }
    }
}

#[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
fn pv(pw: &[u32], alpha: &[f32], out: &mut [f32], rows: usize, vt: &[u32], ev: usize, cols: usize) {
    let strips = ev / NR;
    assert!(rows.is_multiple_of(MR) && ev > 0 && ev.is_multiple_of(NR) && cols <= BK);
    assert!(alpha.len() >= rows && out.len() >= rows * ev && pw.len() >= rows * BK / 2);
    assert!(vt.len() >= BK / 2 * ev);
    let mut r0 = 0;
    while r0 < rows {
        let groups = shape(rows - r0, 0).0;
        let mut c = 0;
        while c < strips {
            let (g, n) = shape(rows - r0, strips - c);
            match (g, n) {
                (2, 2) => pv_tile::<2, 2>(pw, alpha, out, vt, ev, cols, r0, c),
                (2, _) => pv_tile::<2, 1>(pw, alpha, out, vt, ev, cols, r0, c),
                (_, 4) => pv_tile::<1, 4>(pw, alpha, out, vt, ev, cols, r0, c),
                (_, 2) => pv_tile::<1, 2>(pw, alpha, out, vt, ev, cols, r0, c),
                _ => pv_tile::<1, 1>(pw, alpha, out, vt, ev, cols, r0, c),
            }
            c += n;
        }
        r0 += groups * MR;
    }
}

/// `out = alpha · out + P · V` for `G` groups of MR rows from `r0` and `S` strips of value
/// columns from strip `c`, over the key pairs of `cols` keys.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
fn pv_tile<const G: usize, const S: usize>(
    pw: &[u32],
    alpha: &[f32],
    out: &mut [f32],
    vt: &[u32],
    ev: usize,
    cols: usize,
    r0: usize,
    c: usize,
) {
    let kp = cols.div_ceil(2);
    let mut acc = [[[_mm512_setzero_ps(); S]; MR]; G];
    for (g, acc) in acc.iter_mut().enumerate() {
        for (r, acc) in acc.iter_mut().enumerate() {
            let row = r0 + g * MR + r;
            let a = _mm512_set1_ps(alpha[row]);
            for (s, x) in acc.iter_mut().enumerate() {
                let o: &[f32; NR] = out[row * ev + (c + s) * NR..][..NR].try_into().unwrap();
                // SAFETY: reads the sixteen floats of `o`.
                *x = _mm512_mul_ps(unsafe { _mm512_loadu_ps(o.as_ptr()) }, a);
            }
        }
    }
    let p: [[&[u32]; MR]; G] = simd::array(|g| simd::array(|r| &pw[(r0 + g * MR + r) * BK / 2..][..kp]));
    for (j, pairs) in vt.chunks_exact(ev).take(kp).enumerate() {
        let v: [__m512bh; S] = simd::array(|s| load_pairs(pairs[(c + s) * NR..][..NR].try_into().unwrap()));
        for (acc, p) in acc.iter_mut().zip(&p) {
            for (acc, p) in acc.iter_mut().zip(p) {
                let a = broadcast(p[j]);
                for (x, &v) in acc.iter_mut().zip(&v) {
                    *x = _mm512_dpbf16_ps(*x, a, v);
                }
            }
        }
    }
    for (g, acc) in acc.iter().enumerate() {
        for (r, acc) in acc.iter().enumerate() {
            let row = r0 + g * MR + r;
            for (s, &x) in acc.iter().enumerate() {
                let o: &mut [f32; NR] = (&mut out[row * ev + (c + s) * NR..][..NR]).try_into().unwrap();
                // SAFETY: writes the sixteen floats of `o`.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr(), x) };
            }
        }
    }
}
