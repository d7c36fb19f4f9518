//! bfloat16 attention in dot-product pairs: the tiled path's matrix products for bfloat16
//! queries, keys and values, in the arithmetic of the AVX512_BF16 instruction `vdpbf16ps`, which
//! does twice the float32 multiply-adds of an FMA in one instruction.
//!
//! `vdpbf16ps` adds to each float32 lane the products of a pair of bfloat16 values. Measured on
//! AMD Zen 4 against 64 million lanes of random and subnormal-heavy inputs, bit for bit (and as
//! Intel documents it): its inputs, the accumulator included, are read with subnormals as zero
//! (DAZ); the odd product is added first, then the even one, each as a fused multiply-add
//! rounded to nearest even; each of the two results is flushed to zero if subnormal (FTZ). The
//! products of two bfloat16 values are exact in float32, so each step has one rounding.
//! [`step`] is that lane, in portable code: the tile kernels of every other CPU (AVX-512F without
//! BF16, AVX2, none) compute these exact steps, so every path gives the same bits.
//!
//! In this mode:
//! - a score is `scale · dot(q, k)`: the dot product of the raw bfloat16 query and key, pairs of
//!   dimensions `(2i, 2i + 1)` in order (an odd last dimension paired with zero), then one
//!   float32 multiplication by `scale`;
//! - the probabilities `P` are computed in float32, with [`exp_short`] (within 4.3e-6, a
//!   five-hundredth of bfloat16's rounding), and summed in float32, then rounded to bfloat16 for
//!   the product with V (as PyTorch does: its bfloat16 attention rounds P too), by the rounding of
//!   `vcvtne2ps2bf16` (to nearest even, subnormals read as zero), in one pass ([`softmax`]);
//! - `P · V` runs over pairs of keys `(2j, 2j + 1)` of each key block in order, after the output
//!   is rescaled by `alpha` in float32.
//!
//! The packed layouts: K as `kt[(strip · pairs + i) · NR + n]`, the pair `i` of key
//! `strip · NR + n` in one 32-bit word (dimension `2i` in the low half); V as `vt[j · ev + c]`,
//! column `c` of the keys `2j` (low half) and `2j + 1` (a key block's pairs are `BK / 2` rows of
//! `ev` words); zeros past the last key.

use super::fast::{Mask, BK, BQ, MR, NR};
use super::tile::sized;
use crate::kernels::exp::exp_short;
use crate::kernels::storage::Bf16;

/// `x` with a subnormal read as zero of its sign: the instruction's DAZ and FTZ.
#[inline(always)]
pub(super) fn flush(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE {
        0.0f32.copysign(x)
    } else {
        x
    }
}

/// A bfloat16 value's bits widened to float32, subnormals read as zero.
#[inline(always)]
fn wide(b: u32) -> f32 {
    flush(f32::from_bits(b << 16))
}

/// `a · b + c` rounded once, then flushed to zero of its sign where the result is tiny as x86
/// decides it: after rounding to 24 bits with an unbounded exponent, below 2^-126 in magnitude.
/// That differs from flushing the correctly rounded result only where that result is ±2^-126
/// (the smallest normal): the exact sum may lie below 2^-126 − 2^-151, where rounding without
/// a bound on the exponent gives the largest subnormal's neighbour and so a tiny result. Those
/// cases are decided on the exact sum, from float64 (the product of two bfloat16 values is
/// exact there) and its rounding error (TwoSum).
#[inline(always)]
fn fma_ftz(a: f32, b: f32, c: f32) -> f32 {
    let r = a.mul_add(b, c);
    if r.abs() != f32::MIN_POSITIVE {
        return flush(r);
    }
    let (p, c) = (a as f64 * b as f64, c as f64);
    let s = p + c;
    let z = s - p;
    let e = (p - (s - z)) + (c - z);
    let u = f32::MIN_POSITIVE as f64 - 2f64.powi(-151);
    let tiny = s.abs() < u || (s.abs() == u && e != 0.0 && (e > 0.0) != (s > 0.0));
    if tiny {
        0.0f32.copysign(r)
    } else {
        r
    }
}

/// One float32 lane of `vdpbf16ps`: `acc` plus the products of the bfloat16 pairs `a` and `b`
/// (each two values in a 32-bit word, the even one in the low half), odd first.
#[inline(always)]
pub(crate) fn step(acc: f32, a: u32, b: u32) -> f32 {
    let odd = fma_ftz(wide(a >> 16), wide(b >> 16), flush(acc));
    fma_ftz(wide(a & 0xffff), wide(b & 0xffff), odd)
}

/// [`step`] on sixteen lanes for packed inputs (no subnormal half in `a` or `b`) and an
/// accumulator that is not subnormal, in a form the compiler vectorises: each fused step is
/// flushed where its result is below the smallest normal. That is `step` exactly unless a result
/// is ±2^-126 itself, where x86's tininess after rounding needs the exact sum: then this returns
/// true, and the caller recomputes with `step`.
#[inline(always)]
pub(crate) fn steps(acc: &mut [f32; NR], a: u32, b: &[u32]) -> bool {
    let (odd, even) = (f32::from_bits(a & 0xffff_0000), f32::from_bits(a << 16));
    let ftz = |r: f32| if r.abs() < f32::MIN_POSITIVE { 0.0f32.copysign(r) } else { r };
    let mut edge = false;
    for (x, &w) in acc.iter_mut().zip(b) {
        let r = odd.mul_add(f32::from_bits(w & 0xffff_0000), *x);
        edge |= r.abs() == f32::MIN_POSITIVE;
        let r = even.mul_add(f32::from_bits(w << 16), ftz(r));
        edge |= r.abs() == f32::MIN_POSITIVE;
        *x = ftz(r);
    }
    edge
}

/// A probability rounded to bfloat16 as `vcvtne2ps2bf16` rounds it: to nearest even, a subnormal
/// read as zero.
#[inline(always)]
pub(super) fn round_p(x: f32) -> u32 {
    crate::kernels::storage::f32_to_bf16(flush(x)) as u32
}

/// The number of dimension pairs of a row of `e` values.
#[inline(always)]
pub(super) fn pairs(e: usize) -> usize {
    e.div_ceil(2)
}

/// A bfloat16 value's bits with a subnormal read as zero of its sign, as the instruction reads
/// its inputs. The packing applies it, so that [`steps`] need not (the instruction's result is
/// the same either way).
#[inline(always)]
pub(crate) fn daz(b: Bf16) -> u32 {
    let b = b.0 as u32;
    if b & 0x7f80 == 0 {
        b & 0x8000
    } else {
        b
    }
}

/// [`daz`] without a branch, for loops that vectorise.
#[inline(always)]
fn daz_lanes(b: Bf16) -> u32 {
    let b = b.0 as u32;
    b & (0x8000 | (u32::from(b & 0x7f80 != 0) * 0x7fff))
}

/// Row `row` (`e` values) as pairs in 32-bit words, the even dimension in the low half, an odd
/// last one paired with zero; subnormal values read as zero.
#[inline(always)]
pub(super) fn pair_words(row: &[Bf16], out: &mut [u32]) {
    pair_words_by(row, out, daz);
}

/// `row` as pairs of 16-bit words `word(x)` in 32-bit words, the even element in the low half, an
/// odd last one paired with zero.
#[inline(always)]
pub(crate) fn pair_words_by<T: Copy>(row: &[T], out: &mut [u32], word: impl Fn(T) -> u32) {
    let (pairs, last) = row.as_chunks::<2>();
    for (w, &[lo, hi]) in out.iter_mut().zip(pairs) {
        *w = word(lo) | word(hi) << 16;
    }
    if let (Some(w), [lo]) = (out.get_mut(pairs.len()), last) {
        *w = word(*lo);
    }
}

/// Packs keys `0..n` (rows of `e` values, `stride` apart) into `kt` (see the module notes).
#[inline(always)]
pub(super) fn pack_keys(k: &[Bf16], stride: usize, e: usize, n: usize, kt: &mut [u32]) {
    let p = pairs(e);
    let mut words = vec![0u32; p];
    for j in 0..n {
        let (strip, col) = (j / NR, j % NR);
        pair_words(&k[j * stride..][..e], &mut words);
        for (i, &w) in words.iter().enumerate() {
            kt[(strip * p + i) * NR + col] = w;
        }
    }
}

/// Packs keys `0..n` stored in strips of `NR` (`ks[(j / NR · e + d) · NR + j % NR]`) into `kt`,
/// as [`pack_keys`] packs rows: each pair of a strip's dimension rows interleaved into one row of
/// words, columns past `n` left zero.
#[inline(always)]
pub(super) fn pack_key_strips(ks: &[Bf16], e: usize, n: usize, kt: &mut [u32]) {
    let p = pairs(e);
    let zeros = [Bf16::default(); NR];
    for strip in 0..n.div_ceil(NR) {
        let cols = NR.min(n - strip * NR);
        let (rows, _) = ks[strip * e * NR..(strip + 1) * e * NR].as_chunks::<NR>();
        let (out, _) = kt[strip * p * NR..(strip + 1) * p * NR].as_chunks_mut::<NR>();
        for (i, out) in out.iter_mut().enumerate() {
            let (lo, hi) = (&rows[2 * i], rows.get(2 * i + 1).unwrap_or(&zeros));
            for (w, (&a, &b)) in out.iter_mut().zip(lo.iter().zip(hi)) {
                *w = daz_lanes(a) | daz_lanes(b) << 16;
            }
            out[cols..].fill(0);
        }
    }
}

/// Packs values `0..n` (rows of `ev` values, `stride` apart) into `vt` (see the module notes):
/// each pair of rows interleaved into one row of words.
#[inline(always)]
pub(super) fn pack_values(v: &[Bf16], stride: usize, ev: usize, n: usize, vt: &mut [u32]) {
    for (j, out) in vt.chunks_exact_mut(ev.max(1)).enumerate().take(n.div_ceil(2)) {
        let lo = &v[2 * j * stride..][..ev];
        match (2 * j + 1 < n).then(|| &v[(2 * j + 1) * stride..][..ev]) {
            Some(hi) => {
                for (w, (&a, &b)) in out.iter_mut().zip(lo.iter().zip(hi)) {
                    *w = daz(a) | daz(b) << 16;
                }
            }
            None => {
                for (w, &a) in out.iter_mut().zip(lo) {
                    *w = daz(a);
                }
            }
        }
    }
}

/// The scores of one query block against one key block: `scores[r·BK + j] = scale · dot(q_r,
/// k_j)` for rows `0..rows` (a multiple of MR; `q` holds each row's `p` pair words) and the key
/// columns `[t0, t1)` (multiples of NR) of the block whose packed keys `kt` holds.
#[inline(always)]
pub(super) fn scores(
    q: &[u32],
    p: usize,
    kt: &[u32],
    rows: usize,
    tiles: (usize, usize),
    scale: f32,
    scores: &mut [f32],
) {
    for r0 in (0..rows).step_by(MR) {
        for strip in tiles.0 / NR..tiles.1 / NR {
            let kt = &kt[strip * p * NR..(strip + 1) * p * NR];
            let mut acc = [[0.0f32; NR]; MR];
            let mut edge = false;
            for (i, k) in kt.chunks_exact(NR).enumerate() {
                for (r, acc) in acc.iter_mut().enumerate() {
                    edge |= steps(acc, q[(r0 + r) * p + i], k);
                }
            }
            if edge {
                // A step's result was ±2^-126: the tile again, step by exact step.
                acc = [[0.0f32; NR]; MR];
                for (i, k) in kt.chunks_exact(NR).enumerate() {
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let a = q[(r0 + r) * p + i];
                        for (x, &b) in acc.iter_mut().zip(k) {
                            *x = step(*x, a, b);
                        }
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let out = &mut scores[(r0 + r) * BK + strip * NR..][..NR];
                for (o, &x) in out.iter_mut().zip(acc) {
                    *o = x * scale;
                }
            }
        }
    }
}

/// The sum of sixteen lanes, in the order the pair mode fixes: lane `i` plus lane `i + 8`, then
/// those eight likewise halved, down to one.
#[inline(always)]
fn sum_lanes(l: &[f32; NR]) -> f32 {
    let h: [f32; 8] = std::array::from_fn(|i| l[i] + l[i + 8]);
    let q: [f32; 4] = std::array::from_fn(|i| h[i] + h[i + 4]);
    (q[0] + q[2]) + (q[1] + q[3])
}

/// The online softmax's step (`rows::update_row`'s, with [`exp_short`]) for rows
/// `0..row_max.len()` of one key block at once. From the masked scores `scores[r·BK + j]`,
/// `j < cols`, and their maxima `row_max[r]` (NaN if a valid score is NaN, or NaN passed over:
/// either way the row becomes NaN), the running maximum `m[r]` grows (a NaN wins, and so does a
/// NaN score where no other is valid) and `alpha[r]` gets the factor for the row's accumulated
/// output (1 while no score is valid). The
/// probabilities, [`exp_short`] of the scores minus the new maximum (+0 where masked:
/// `exp_short(−inf)`), are written rounded ([`round_p`]) as pair words `pw[r·BK/2 + j/2]` (+0
/// past `cols`, and in rows with no valid score yet) and summed in the row's sixteen float32
/// lanes `sums[r]`, which run across the key blocks: a block's element `j` is added to a lane
/// `j % 16` of its own, in order, then each running lane becomes `fma(lane, alpha, block's
/// lane)`. [`sum_lanes`] gives the row's sum at the end.
#[inline(always)]
pub(super) fn softmax(
    scores: &[f32],
    cols: usize,
    row_max: &[f32],
    m: &mut [f32],
    sums: &mut [[f32; NR]],
    alpha: &mut [f32],
    pw: &mut [u32],
) {
    for (r, &row_max) in row_max.iter().enumerate() {
        let (s, pw) = (&scores[r * BK..][..cols], &mut pw[r * BK / 2..][..cols.div_ceil(2)]);
        let mut m_new = if row_max.is_nan() || row_max > m[r] { row_max } else { m[r] };
        if m_new == f32::NEG_INFINITY {
            if !s.iter().any(|x| x.is_nan()) {
                pw.fill(0);
                alpha[r] = 1.0;
                continue;
            }
            m_new = f32::NAN; // its only valid scores are NaN: the row becomes NaN
        }
        alpha[r] = exp_short(m[r] - m_new);
        let mut p = [0.0f32; BK];
        let mut lanes = [0.0f32; NR];
        for (j, (p, &x)) in p.iter_mut().zip(s).enumerate() {
            *p = exp_short(x - m_new);
            lanes[j % NR] += *p;
        }
        for (j, w) in pw.iter_mut().enumerate() {
            *w = round_p(p[2 * j]) | round_p(p[2 * j + 1]) << 16;
        }
        for (sum, &lane) in sums[r].iter_mut().zip(&lanes) {
            *sum = sum.mul_add(alpha[r], lane);
        }
        m[r] = m_new;
    }
}

/// `out[r] = alpha[r] · out[r] + Σ_j p[r][j] v_j` for rows `0..rows`, from the pair words `pw`
/// (rows BK/2 apart) and the packed values `vt` of one key block (BK/2 rows of `ev` pair words),
/// over the key pairs `0..cols.div_ceil(2)`.
#[inline(always)]
pub(super) fn pv(
    pw: &[u32],
    alpha: &[f32],
    out: &mut [f32],
    rows: usize,
    vt: &[u32],
    ev: usize,
    cols: usize,
) {
    let kp = cols.div_ceil(2);
    for r in 0..rows {
        let pw = &pw[r * BK / 2..][..kp];
        for (c, out) in out[r * ev..(r + 1) * ev].chunks_exact_mut(NR).enumerate() {
            // The instruction reads a subnormal accumulator as zero.
            let start: [f32; NR] = std::array::from_fn(|t| flush(out[t] * alpha[r]));
            let mut acc = start;
            let mut edge = false;
            for (&a, v) in pw.iter().zip(vt.chunks_exact(ev)) {
                edge |= steps(&mut acc, a, &v[c * NR..(c + 1) * NR]);
            }
            if edge {
                // A step's result was ±2^-126: the tile again, step by exact step.
                acc = start;
                for (&a, v) in pw.iter().zip(vt.chunks_exact(ev)) {
                    for (x, &b) in acc.iter_mut().zip(&v[c * NR..(c + 1) * NR]) {
                        *x = step(*x, a, b);
                    }
                }
            }
            out.copy_from_slice(&acc);
        }
    }
}

/// [`pv`] for one row where some value of the key block is NaN or infinite, from the row's
/// masked scores `s` and pair words `pw`: a masked key (score −inf) and the padding past
/// `s.len()` are left out of their steps, so that they cannot turn `0 · inf` into NaN; the steps
/// are otherwise [`step`]'s.
#[inline(always)]
pub(super) fn pv_skipping_masked<'v>(
    s: &[f32],
    pw: &[u32],
    alpha: f32,
    out: &mut [f32],
    v_row: impl Fn(usize) -> &'v [Bf16],
) {
    let cols = s.len();
    let kept = |j: usize| j < cols && s[j] != f32::NEG_INFINITY;
    let p = |j: usize| pw[j / 2] >> (16 * (j % 2)) & 0xffff;
    for (d, o) in out.iter_mut().enumerate() {
        let mut acc = *o * alpha;
        for j in (0..cols).step_by(2) {
            acc = flush(acc);
            for jj in [j + 1, j] {
                if kept(jj) {
                    acc = fma_ftz(wide(p(jj)), wide(v_row(jj)[d].0 as u32), acc);
                }
            }
        }
        *o = acc;
    }
}

/// The explicit kernels of this mode, where the CPU has AVX512_BF16.
#[cfg(target_arch = "x86_64")]
pub(super) type Token = super::avx512bf16::Bf16Dot;
#[cfg(not(target_arch = "x86_64"))]
pub(super) type Token = super::fast::Never;

/// The explicit kernels' token, where this CPU runs them (and the accelerated path is enabled).
#[inline(always)]
pub(super) fn detect() -> Option<Token> {
    #[cfg(target_arch = "x86_64")]
    return Token::detect();
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Whether bfloat16 queries, keys and values with values of `ev` columns take this mode: value
/// rows of whole strips. (The tiled path decides with it, and so does the choice of path for keys
/// in strips, which must agree.)
#[inline(always)]
pub(super) fn fits(ev: usize) -> bool {
    ev > 0 && ev.is_multiple_of(NR)
}

/// The keys a [`Dot`] packs: rows `stride` apart, or strips of `NR` keys
/// (`ks[(j / NR · e + d) · NR + j % NR]`, `AttnSpec::k_strips`), which pair up without a
/// transpose ([`pack_key_strips`]).
#[derive(Clone, Copy)]
pub(super) enum Keys<'k> {
    Rows { k: &'k [Bf16], stride: usize },
    Strips(&'k [Bf16]),
}

/// A [`Dot`]'s buffers, which a thread keeps from one task to the next (`tile::Scratch`).
#[derive(Default)]
pub struct Buffers {
    kt: Vec<u32>,
    vt: Vec<u32>,
    qw: Vec<u32>,
    pw: Vec<u32>,
    sums: Vec<[f32; NR]>,
}

impl Buffers {
    /// The bytes they hold.
    pub(super) fn bytes(&self) -> usize {
        4 * (self.kt.capacity() + self.vt.capacity() + self.qw.capacity() + self.pw.capacity())
            + 4 * NR * self.sums.capacity()
    }
}

/// One tiled task's state in this mode: its packed keys and values, the current query block's
/// pair words, the rounded probabilities and the lanes of the rows' sums.
pub(super) struct Dot<'a> {
    q: &'a [Bf16],
    e: usize,
    ev: usize,
    pairs: usize,
    token: Option<Token>,
    kt: Vec<u32>,
    vt: Vec<u32>,
    qw: Vec<u32>,
    pw: Vec<u32>,
    sums: Vec<[f32; NR]>,
    /// Where `kt` and `vt` hold one key block at a time ([`Dot::load`]): the keys and values it
    /// is packed from, and which block it holds; `None` where they hold every block.
    one_block: Option<(Source<'a>, usize)>,
}

/// The keys `0..n` and values (rows `v_stride` apart) a [`Dot`] packs a block at a time from.
struct Source<'a> {
    keys: Keys<'a>,
    v: &'a [Bf16],
    v_stride: usize,
    n: usize,
}

impl<'a> Dot<'a> {
    /// Packs keys and values `0..n` (`keys`, and `v` with rows `v_stride` apart) for queries
    /// `q`, all at once, or with `one_block` a key block at a time as [`Dot::load`] asks; `ev`
    /// must be a positive multiple of NR. Its buffers are `bufs`' ([`Dot::into_buffers`] hands
    /// them back). (Inlined into the task, so that the packing loops are compiled for AVX2
    /// there.)
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        q: &'a [Bf16],
        keys: Keys<'a>,
        v: &'a [Bf16],
        v_stride: usize,
        e: usize,
        ev: usize,
        n: usize,
        one_block: bool,
        bufs: Buffers,
    ) -> Self {
        let p = pairs(e);
        let blocks = if one_block { 1 } else { n.div_ceil(BK) };
        // Keys and values packed all at once are zeros past the last; one block at a time,
        // `load` zeroes them where the block is short. The queries' words, the probabilities
        // and the sums are written before they are read.
        let Buffers { mut kt, mut vt, mut qw, mut pw, mut sums } = bufs;
        sized(&mut kt, blocks * BK * p, 0, one_block);
        sized(&mut vt, blocks * BK / 2 * ev, 0, one_block);
        sized(&mut qw, BQ * p, 0, true);
        sized(&mut pw, BQ * BK / 2, 0, true);
        sized(&mut sums, BQ, [0.0; NR], true);
        let token = detect();
        let source = Source { keys, v, v_stride, n };
        let mut dot = Self { q, e, ev, pairs: p, token, kt, vt, qw, pw, sums, one_block: None };
        match one_block {
            true => dot.one_block = Some((source, usize::MAX)),
            false => dot.pack(&source, 0, n),
        }
        dot
    }

    /// The buffers, for the thread's next task.
    pub(super) fn into_buffers(self) -> Buffers {
        let Self { kt, vt, qw, pw, sums, .. } = self;
        Buffers { kt, vt, qw, pw, sums }
    }

    /// Packs keys and values `j0..j0 + n` of `src` into `kt` and `vt` from their start.
    #[inline(always)]
    fn pack(&mut self, src: &Source<'_>, j0: usize, n: usize) {
        let (e, ev) = (self.e, self.ev);
        if n == 0 {
            return;
        }
        let (kt, vt) = (&mut self.kt, &mut self.vt);
        match (src.keys, self.token) {
            #[cfg(target_arch = "x86_64")]
            (Keys::Rows { k, stride }, Some(t)) => t.pack_keys(&k[j0 * stride..], stride, e, n, kt),
            #[cfg(not(target_arch = "x86_64"))]
            (Keys::Rows { .. }, Some(t)) => match t {},
            (Keys::Rows { k, stride }, None) => pack_keys(&k[j0 * stride..], stride, e, n, kt),
            (Keys::Strips(ks), _) => pack_key_strips(&ks[j0 * e..], e, n, kt),
        }
        pack_values(&src.v[j0 * src.v_stride..], src.v_stride, ev, n, vt);
    }

    /// Makes key block `block` the one packed, where they are packed a block at a time (a task
    /// with one query block reads each key block once, and then holds one block instead of all).
    #[inline(always)]
    pub(super) fn load(&mut self, block: usize) {
        let Some((src, held)) = self.one_block.take() else { return };
        if held != block {
            let (j0, n) = (block * BK, BK.min(src.n.saturating_sub(block * BK)));
            if n < BK {
                self.kt.fill(0); // (the keys past the last are zeros, as when all are packed)
                self.vt.fill(0);
            }
            self.pack(&src, j0, n);
        }
        self.one_block = Some((src, block));
    }

    /// Where key block `block` lies in `kt` and `vt` (in blocks).
    #[inline(always)]
    fn at(&self, block: usize) -> usize {
        match &self.one_block {
            Some((_, held)) => {
                debug_assert_eq!(*held, block, "Dot::load packs a block before it is read");
                0
            }
            None => block,
        }
    }

    /// Takes the query block's rows: row `r < rows` from `q[start(r)..]`; their sums start at 0.
    #[inline(always)]
    pub(super) fn pack_queries(&mut self, rows: usize, start: impl Fn(usize) -> usize) {
        self.sums.fill([0.0; NR]);
        let (q, e, p) = (self.q, self.e, self.pairs);
        for (r, w) in self.qw.chunks_exact_mut(p.max(1)).enumerate().take(rows) {
            pair_words(&q[start(r)..][..e], w);
        }
    }

    /// Whether the explicit kernels run (and so [`Dot::scores`] can apply masks).
    #[inline(always)]
    pub(super) fn explicit(&self) -> bool {
        self.token.is_some()
    }

    /// [`scores`] of the block's rows `0..rows` against key block `block`; with `mask`, where the
    /// explicit kernels run, also the masks applied as `mask_row` would (without softcap, biases
    /// or attention masks) and each row's largest valid score into `max`, NaN passed over (where
    /// `mask_row` gives NaN: [`softmax`] makes the row NaN either way), in the same pass. Returns
    /// whether the masks were applied (the portable code leaves them to `mask_row`).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn scores(
        &self,
        block: usize,
        tiles: (usize, usize),
        rows: usize,
        scale: f32,
        out: &mut [f32],
        mask: Option<(&Mask<'_>, &mut [f32])>,
    ) -> bool {
        let at = self.at(block);
        let kt = &self.kt[at * BK * self.pairs..(at + 1) * BK * self.pairs];
        match self.token {
            #[cfg(target_arch = "x86_64")]
            Some(t) => {
                let masked = mask.is_some();
                t.scores(&self.qw, self.pairs, kt, rows, tiles, scale, out, mask);
                masked
            }
            #[cfg(not(target_arch = "x86_64"))]
            Some(t) => match t {},
            None => {
                scores(&self.qw, self.pairs, kt, rows, tiles, scale, out);
                false
            }
        }
    }

    /// [`softmax`] of the block's rows `0..row_max.len()`, its first `cols` keys: the
    /// probabilities are kept for [`Dot::pv`] and [`Dot::probabilities`], the sums' lanes for
    /// [`Dot::sums`].
    #[inline(always)]
    pub(super) fn softmax(
        &mut self,
        scores: &[f32],
        cols: usize,
        row_max: &[f32],
        m: &mut [f32],
        alpha: &mut [f32],
    ) {
        let (pw, sums) = (&mut self.pw, &mut self.sums);
        match self.token {
            #[cfg(target_arch = "x86_64")]
            Some(t) => t.softmax(scores, cols, row_max, m, sums, alpha, pw),
            #[cfg(not(target_arch = "x86_64"))]
            Some(t) => match t {},
            None => softmax(scores, cols, row_max, m, sums, alpha, pw),
        }
    }

    /// The rows' sums start again at 0 (a new chunk of keys).
    pub(super) fn restart(&mut self) {
        self.sums.fill([0.0; NR]);
    }

    /// Each row's sum of probabilities over the key blocks so far, into `sum` (one per row).
    #[inline(always)]
    pub(super) fn sums(&self, sum: &mut [f32]) {
        for (sum, lanes) in sum.iter_mut().zip(&self.sums) {
            *sum = sum_lanes(lanes);
        }
    }

    /// Row `r`'s probabilities from the last [`Dot::softmax`], as pair words.
    #[inline(always)]
    pub(super) fn probabilities(&self, r: usize) -> &[u32] {
        &self.pw[r * BK / 2..(r + 1) * BK / 2]
    }

    /// `out = alpha · out + P · V` for rows `0..rows` and the first `cols` keys of key block
    /// `block`, with the probabilities of the last [`Dot::softmax`].
    #[inline(always)]
    pub(super) fn pv(&self, block: usize, alpha: &[f32], out: &mut [f32], rows: usize, cols: usize) {
        let per_block = BK / 2 * self.ev;
        let at = self.at(block);
        let vt = &self.vt[at * per_block..(at + 1) * per_block];
        let (pw, ev) = (&self.pw, self.ev);
        match self.token {
            #[cfg(target_arch = "x86_64")]
            Some(t) => t.pv(pw, alpha, out, rows, vt, ev, cols),
            #[cfg(not(target_arch = "x86_64"))]
            Some(t) => match t {},
            None => pv(pw, alpha, out, rows, vt, ev, cols),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift: reproducible patterns, no dependency.
    pub(super) fn patterns(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    /// A 16-bit pattern that is often subnormal, often near 1, often anything.
    pub(super) fn bf16_bits(rnd: &mut (impl FnMut() -> u64 + ?Sized)) -> u32 {
        let x = rnd() as u32 & 0xffff;
        match rnd() % 4 {
            0 => x & 0x807f,            // zero or subnormal
            1 => (x & 0x80ff) | 0x3f00, // near ±1
            2 => (x & 0x8fff) | 0x3000,
            _ => x,
        }
    }

    #[test]
    fn keys_in_strips_pack_as_key_rows_do() {
        let mut rnd = patterns(7);
        for (e, n) in [(8usize, 16usize), (7, 37), (1, 5), (64, 130)] {
            let rows: Vec<Bf16> = (0..n * e).map(|_| Bf16(bf16_bits(&mut rnd) as u16)).collect();
            // The same keys in strips of NR, the columns past n holding garbage.
            let mut strips: Vec<Bf16> = (0..n.div_ceil(NR) * NR * e).map(|_| Bf16(0x7fc1)).collect();
            for j in 0..n {
                for d in 0..e {
                    strips[(j / NR * e + d) * NR + j % NR] = rows[j * e + d];
                }
            }
            let words = n.div_ceil(BK) * BK * pairs(e);
            let (mut want, mut got) = (vec![0u32; words], vec![0u32; words]);
            pack_keys(&rows, e, e, n, &mut want);
            pack_key_strips(&strips, e, n, &mut got);
            assert_eq!(got, want, "e {e}, n {n}");
        }
    }

    #[test]
    fn the_portable_step_is_the_instruction_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            if !std::arch::is_x86_feature_detected!("avx512bf16") {
                return; // nothing to compare with on this CPU
            }
            #[target_feature(enable = "avx512f,avx512bf16")]
            fn instruction(acc: &[f32; 16], a: &[u32; 16], b: &[u32; 16]) -> [f32; 16] {
                let mut out = [0.0f32; 16];
                // SAFETY: loads and stores of the sixteen lanes of each array; the vectors of
                // words and of bfloat16 pairs are the same bytes.
                unsafe {
                    let (a, b) =
                        (_mm512_loadu_si512(a.as_ptr().cast()), _mm512_loadu_si512(b.as_ptr().cast()));
                    let r = _mm512_dpbf16_ps(
                        _mm512_loadu_ps(acc.as_ptr()),
                        std::mem::transmute::<__m512i, __m512bh>(a),
                        std::mem::transmute::<__m512i, __m512bh>(b),
                    );
                    _mm512_storeu_ps(out.as_mut_ptr(), r);
                }
                out
            }
            #[target_feature(enable = "avx512f,avx512bf16")]
            fn rounding(x: &[f32; 32]) -> [u16; 32] {
                let mut out = [0u16; 32];
                // SAFETY: as above, with 32 floats in and 32 bfloat16 values out.
                unsafe {
                    let r =
                        _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x.as_ptr().add(16)), _mm512_loadu_ps(x.as_ptr()));
                    _mm512_storeu_si512(out.as_mut_ptr().cast(), std::mem::transmute::<__m512bh, __m512i>(r));
                }
                out
            }
            let mut rnd = patterns(12345);
            for _ in 0..200_000 {
                let a: [u32; 16] = std::array::from_fn(|_| bf16_bits(&mut rnd) | bf16_bits(&mut rnd) << 16);
                let b: [u32; 16] = std::array::from_fn(|_| bf16_bits(&mut rnd) | bf16_bits(&mut rnd) << 16);
                let sign = |rnd: &mut dyn FnMut() -> u64| rnd() as u32 & 0x8000_0000;
                let acc: [f32; 16] = std::array::from_fn(|_| match rnd() % 5 {
                    0 => f32::from_bits(rnd() as u32 & 0x80ff_ffff), // tiny, often subnormal
                    1 => f32::from_bits((rnd() as u32 & 0x81ff_ffff) | 0x3e00_0000),
                    // ±2^-126 and its neighbours, where tininess is decided before flushing
                    2 => f32::from_bits(sign(&mut rnd) | (0x0080_0000 + (rnd() % 3) as u32)),
                    _ => 0.0,
                });
                // Products down to 2^-150 and below, of either sign, beside the near-2^-126 sums.
                let small = |rnd: &mut dyn FnMut() -> u64| {
                    let e = 20 + rnd() % 60;
                    ((rnd() as u32 & 0x807f) | (e as u32) << 7)
                        | ((rnd() as u32 & 0x807f) | ((e as u32) + 20) << 7) << 16
                };
                let (a, b) = match rnd() % 2 {
                    0 => (a, b),
                    _ => (std::array::from_fn(|_| small(&mut rnd)), std::array::from_fn(|_| small(&mut rnd))),
                };
                // SAFETY: the CPU has AVX512_BF16 (checked above).
                let want = unsafe { instruction(&acc, &a, &b) };
                for i in 0..16 {
                    let got = step(acc[i], a[i], b[i]);
                    assert!(
                        got.to_bits() == want[i].to_bits() || got.is_nan() && want[i].is_nan(),
                        "acc {:e} a {:#010x} b {:#010x}: {got:e} vs {:e}",
                        acc[i],
                        a[i],
                        b[i],
                        want[i]
                    );
                }
                let x: [f32; 32] = std::array::from_fn(|_| {
                    f32::from_bits(match rnd() % 3 {
                        0 => rnd() as u32 & 0x80ff_ffff,
                        1 => rnd() as u32 & 0x807f_ffff,
                        _ => rnd() as u32,
                    })
                });
                // SAFETY: as above.
                let want = unsafe { rounding(&x) };
                for (x, &w) in x.iter().zip(&want) {
                    assert_eq!(round_p(*x), w as u32, "{:#010x}", x.to_bits());
                }
            }
        }
    }

    /// The sixteen-lane P·V against `step` itself, lane by lane, where sums land on ±2^-126
    /// (the accumulators start beside it and the products are tiny): the tiles that meet it
    /// take the exact fallback, and the results are the same.
    #[test]
    fn the_vector_steps_are_the_steps_at_the_smallest_normal() {
        let mut rnd = patterns(3);
        let (rows, ev, cols) = (MR, NR, 8);
        let mut edges = 0;
        for case in 0..2000 {
            // Probabilities 2^-8..2^-1 and values of ±2^-118..2^-113: products near 2^-126.
            let prob = |rnd: &mut dyn FnMut() -> u64| (0x3b80 + (rnd() % 0x380) as u32) & 0x3fff;
            let value =
                |rnd: &mut dyn FnMut() -> u64| (rnd() as u32 & 0x8000) | (0x0480 + (rnd() % 0x280) as u32);
            let mut pw: Vec<u32> =
                (0..rows * BK / 2).map(|_| prob(&mut rnd) | prob(&mut rnd) << 16).collect();
            let mut vt: Vec<u32> =
                (0..BK / 2 * ev).map(|_| value(&mut rnd) | value(&mut rnd) << 16).collect();
            let alpha = vec![1.0f32; rows];
            let mut start: Vec<f32> = (0..rows * ev)
                .map(|_| {
                    let sign = rnd() as u32 & 0x8000_0000;
                    f32::from_bits(sign | (0x0080_0000 + (rnd() % 64) as u32))
                })
                .collect();
            if case % 4 == 0 {
                // Row 0's first odd step: 2^-126 − 2^-25·(1 + 2^-7) · 2^-126, which rounds to
                // 2^-126 but is tiny after rounding with an unbounded exponent: flushed.
                pw[0] = pw[0] & 0xffff | 0x3301 << 16;
                for t in 0..ev {
                    vt[t] = vt[t] & 0xffff | 0x8080 << 16;
                    start[t] = f32::MIN_POSITIVE;
                }
            }
            let mut got = start.clone();
            pv(&pw, &alpha, &mut got, rows, &vt, ev, cols);
            for r in 0..rows {
                for t in 0..ev {
                    let mut acc = start[r * ev + t];
                    for j in 0..cols / 2 {
                        let (a, b) = (pw[r * BK / 2 + j], vt[j * ev + t]);
                        let odd =
                            f32::from_bits(a & 0xffff_0000).mul_add(f32::from_bits(b & 0xffff_0000), acc);
                        edges += usize::from(odd.abs() == f32::MIN_POSITIVE);
                        acc = step(acc, a, b);
                    }
                    assert_eq!(got[r * ev + t].to_bits(), acc.to_bits(), "case {case} row {r} lane {t}");
                }
            }
        }
        assert!(edges > 0, "no step met the smallest normal: the fallback went untested");
    }

    #[test]
    fn the_steps_add_the_odd_product_first_and_flush_subnormals() {
        let pair = |lo: f32, hi: f32| (lo.to_bits() >> 16) | (hi.to_bits() >> 16) << 16;
        // 1 + 2^-24 + 2^-24: odd first rounds 1 + 2^-24 to 1 (a tie, to even), then again.
        assert_eq!(
            step(1.0, pair(2f32.powi(-12), 2f32.powi(-12)), pair(2f32.powi(-12), 2f32.powi(-12))),
            1.0
        );
        // A subnormal accumulator is read as zero; a subnormal result is flushed.
        let tiny = f32::from_bits(0x0000_1000);
        assert_eq!(step(tiny, 0, 0), 0.0);
        assert_eq!(step(0.0, pair(0.0, 2f32.powi(-70)), pair(0.0, 2f32.powi(-70))).to_bits(), 0);
        assert_eq!(round_p(tiny), 0);
        assert_eq!(round_p(-tiny), 0x8000);
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod explicit_tests {
    use super::tests::{bf16_bits, patterns};
    use super::*;

    /// The explicit softmax step against the portable one: every column count, rows with
    /// masked scores, rows with none valid (first and later blocks), NaN and infinite maxima,
    /// probabilities down to the flush.
    #[test]
    fn explicit_softmax_is_the_portable_softmax() {
        let Some(t) = detect() else { return };
        let mut rnd = patterns(11);
        for case in 0..600 {
            let (rows, cols) = (1 + case % 13, 1 + case % BK);
            let score = |rnd: &mut dyn FnMut() -> u64| match rnd() % 8 {
                0 => f32::NEG_INFINITY,
                1 => -((rnd() % 9000) as f32) / 100.0, // down to −90: flushed below −87
                _ => ((rnd() % 20000) as f32 - 10000.0) / 1000.0,
            };
            let mut scores: Vec<f32> = (0..rows * BK).map(|_| score(&mut rnd)).collect();
            let row_max: Vec<f32> = (0..rows)
                .map(|r| {
                    let row = &mut scores[r * BK..r * BK + cols];
                    match (case + r) % 9 {
                        0 => {
                            row.fill(f32::NEG_INFINITY);
                            f32::NEG_INFINITY
                        }
                        1 => f32::NAN,
                        2 => f32::INFINITY,
                        // NaN scores passed over by the maximum, as the explicit score kernel
                        // passes them: beside valid ones, and alone.
                        3 => {
                            row[(case * 7) % cols] = f32::NAN;
                            row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
                        }
                        4 => {
                            row.fill(f32::NEG_INFINITY);
                            row[(case * 7) % cols] = f32::NAN;
                            f32::NEG_INFINITY
                        }
                        _ => row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)),
                    }
                })
                .collect();
            let m0: Vec<f32> = (0..rows)
                .map(|r| if (case + r) % 3 == 0 { f32::NEG_INFINITY } else { row_max[r].min(5.0) - 1.0 })
                .collect();
            let sum0: Vec<[f32; NR]> = (0..rows)
                .map(|r| {
                    std::array::from_fn(|t| if m0[r] == f32::NEG_INFINITY { 0.0 } else { 3.5 + t as f32 })
                })
                .collect();
            let (mut ma, mut mb) = (m0.clone(), m0);
            let (mut sa, mut sb) = (sum0.clone(), sum0);
            let (mut aa, mut ab) = (vec![0.0f32; rows], vec![0.0f32; rows]);
            let (mut pa, mut pb) = (vec![0u32; rows * BK / 2], vec![0u32; rows * BK / 2]);
            softmax(&scores, cols, &row_max, &mut ma, &mut sa, &mut aa, &mut pa);
            t.softmax(&scores, cols, &row_max, &mut mb, &mut sb, &mut ab, &mut pb);
            let same = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same(&ma, &mb) && same(sa.as_flattened(), sb.as_flattened()) && same(&aa, &ab),
                "case {case}"
            );
            for r in 0..rows {
                // A row with a valid NaN score is NaN (its sums and running maximum).
                if scores[r * BK..r * BK + cols].iter().any(|x| x.is_nan()) || row_max[r].is_nan() {
                    assert!(
                        sa[r].iter().all(|x| x.is_nan()) && ma[r].is_nan()
                            || ma[r].is_finite() && sa[r].iter().any(|x| x.is_nan()),
                        "case {case} row {r}"
                    );
                }
            }
            for r in 0..rows {
                let used = r * BK / 2..r * BK / 2 + cols.div_ceil(2);
                assert_eq!(pa[used.clone()], pb[used], "case {case} row {r}");
            }
        }
    }

    /// The explicit packing of keys against the portable one: even and odd widths, whole and
    /// partial strips and blocks of sixteen pairs, rows apart.
    #[test]
    fn explicit_pack_keys_is_the_portable_pack_keys() {
        let Some(t) = detect() else { return };
        let mut rnd = patterns(5);
        let shapes = [
            (64usize, 32usize),
            (64, 37),
            (128, 100),
            (31, 16),
            (32, 5),
            (33, 48),
            (70, 33),
            (2, 17),
            (96, 16),
        ];
        for (e, n) in shapes {
            let stride = e + (n % 3);
            let k: Vec<Bf16> = (0..n * stride).map(|_| Bf16(rnd() as u16)).collect();
            let len = n.div_ceil(NR) * pairs(e) * NR;
            let (mut a, mut b) = (vec![0u32; len], vec![0u32; len]);
            pack_keys(&k, stride, e, n, &mut a);
            t.pack_keys(&k, stride, e, n, &mut b);
            // The portable packing also reads subnormal values as zero (the instruction does).
            let b: Vec<u32> =
                b.iter().map(|&w| daz(Bf16(w as u16)) | daz(Bf16((w >> 16) as u16)) << 16).collect();
            assert_eq!(a, b, "e {e} n {n}");
        }
    }

    /// The explicit P·V against the portable one: general patterns, and values at the bottom
    /// of the normal range (their sums flush) with probabilities in [0, 1).
    #[test]
    fn explicit_pv_is_the_portable_pv() {
        let Some(t) = detect() else { return };
        let mut rnd = patterns(7);
        for case in 0..400 {
            let (rows, ev, cols) = (8, 32, 1 + case % BK);
            let bottom = case % 2 == 0;
            let value = |rnd: &mut dyn FnMut() -> u64| match bottom {
                true => rnd() as u32 & 0x80ff,
                false => bf16_bits(rnd),
            };
            // Packed values: subnormal ones read as zero, as the packing leaves them.
            let packed = |rnd: &mut dyn FnMut() -> u64| daz(Bf16(value(rnd) as u16));
            let vt: Vec<u32> =
                (0..(ev / NR) * BK / 2 * NR).map(|_| packed(&mut rnd) | packed(&mut rnd) << 16).collect();
            // Probabilities in [0, 1), none subnormal (the softmax step's rounding flushes them).
            let prob = |rnd: &mut dyn FnMut() -> u64| daz(Bf16((rnd() % 0x3f80) as u16));
            let pw: Vec<u32> = (0..rows * BK / 2).map(|_| prob(&mut rnd) | prob(&mut rnd) << 16).collect();
            let alpha: Vec<f32> =
                (0..rows).map(|r| if r % 2 == 0 { 1.0 } else { (rnd() % 1000) as f32 / 1000.0 }).collect();
            let out0: Vec<f32> = (0..rows * ev).map(|_| f32::from_bits(rnd() as u32 & 0x80ff_ffff)).collect();
            let (mut a, mut b) = (out0.clone(), out0.clone());
            pv(&pw, &alpha, &mut a, rows, &vt, ev, cols);
            t.pv(&pw, &alpha, &mut b, rows, &vt, ev, cols);
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!(x.to_bits() == y.to_bits(), "case {case} element {i}: {x:e} vs {y:e}");
            }
        }
    }
}
