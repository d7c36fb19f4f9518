//! The matrix product of a linear layer with bfloat16 weights: `out = x · Wᵀ + bias`, in the
//! arithmetic of `vdpbf16ps` (see `attention/dot16.rs`), which does twice the float32
//! multiply-adds of an FMA per instruction.
//!
//! The weight `W` (`n` rows of `k`, PyTorch's `(out_features, in_features)`) is rounded once to
//! bfloat16 and packed once ([`pack_weight`]): strip `s` of sixteen output columns holds, for each
//! pair `i` of input dimensions `(2i, 2i + 1)`, sixteen 32-bit words (dimension `2i` in the low
//! half), `packed[(s · pairs + i) · NR + c]`, zeros past the last column and in an odd last
//! dimension's high half. Each call rounds the rows of `x` to bfloat16 pairs the same way (to
//! nearest even; subnormals read as zero, as the instruction reads them), then computes every
//! output as one float32 accumulator from zero, the pairs `i = 0, 1, …` in order, each a step of
//! `vdpbf16ps` (`dot16::step`), then plus the float32 bias, then (optionally) the erf-GELU of
//! [`gelu_f32`], rounded once to the output's dtype (float32 or bfloat16, chosen apart from the
//! input's).
//!
//! The x86 tiles (`x86` below, on CPUs with AVX512_BF16) and the portable ones compute those
//! exact steps, so every path and every thread count gives the same bits. Rows are split into
//! blocks of `MB` (or, for at most `MB` rows, as in decoding, columns into blocks of `NB`);
//! each output is computed by one tile whatever the split.

use std::mem::MaybeUninit;

use crate::error::KernelError;
use crate::kernels::attention::dot16::{daz, pair_words_by, step, steps};
use crate::kernels::simd::{self, Task};
use crate::kernels::storage::{Bf16, Storage};
use crate::pool::Par;

/// Output columns per strip: one 512-bit vector of float32 lanes.
pub const NR: usize = 16;
/// A tile's rows and strips: 6 × 4 accumulators of sixteen lanes (24 of the 32 registers).
const MR: usize = 6;
const SR: usize = 4;
/// Rows per task when rows are split: 8 tiles' rows, whose packed pairs stay in L2 while the
/// task runs through every strip of the weight.
const MB: usize = 8 * MR;
/// Columns per task when columns are split (few rows: decoding).
const NB: usize = 4 * SR * NR;

/// Whether the products run the `vdpbf16ps` tiles (else the portable emulation: the same bits,
/// much slower).
pub fn native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        x86::Bf16Tiles::detect().is_some()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The number of pair words of a row of `k` values.
#[inline(always)]
pub fn pairs(k: usize) -> usize {
    k.div_ceil(2)
}

/// The number of `u32` words of `n × k` packed weights.
pub fn packed_len(n: usize, k: usize) -> Option<usize> {
    n.div_ceil(NR).checked_mul(pairs(k))?.checked_mul(NR)
}

/// A float32 value rounded to bfloat16 as `vcvtne2ps2bf16` rounds it, without a branch (so that
/// loops of it vectorise): a subnormal read as zero of its sign, then to nearest even; NaN quiet.
#[inline(always)]
fn to_bf16_lanes(x: f32) -> u32 {
    let bits = x.to_bits();
    let bits = if bits & 0x7f80_0000 == 0 { bits & 0x8000_0000 } else { bits };
    let nan = bits & 0x7fff_ffff > 0x7f80_0000;
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    if nan {
        (bits >> 16) | 0x0040
    } else {
        rounded
    }
}

/// The dtypes a product reads and writes: float32 (rounded to bfloat16 pairs when read) or
/// bfloat16 (read as it is).
pub trait Operand: Storage {
    /// Row `x` (`k` values) as pair words into `out` (`pairs(k)` long).
    fn pair_words(x: &[Self], out: &mut [u32]);
    /// A float32 result rounded once to this type, to nearest even.
    fn from_f32(x: f32) -> Self;
}

impl Operand for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn pair_words(x: &[f32], out: &mut [u32]) {
        pair_words_by(x, out, to_bf16_lanes);
    }
}

impl Operand for Bf16 {
    #[inline(always)]
    fn from_f32(x: f32) -> Bf16 {
        Bf16::narrow(x)
    }
    #[inline(always)]
    fn pair_words(x: &[Bf16], out: &mut [u32]) {
        pair_words_by(x, out, daz);
    }
}

/// Rounds the weight `w` (`n` rows of `k`, any float dtype) once to bfloat16 and packs it into
/// `packed` (`packed_len(n, k)` words, every one written; see the module notes).
pub fn pack_weight<X: Storage>(
    w: &[X],
    n: usize,
    k: usize,
    packed: &mut [MaybeUninit<u32>],
    par: Par<'_>,
) -> Result<(), KernelError> {
    let p = pairs(k);
    if Some(w.len()) != n.checked_mul(k) {
        return Err(KernelError::invalid("weight", format!("expected {n} x {k} values, got {}", w.len())));
    }
    if Some(packed.len()) != packed_len(n, k) {
        return Err(KernelError::invalid("packed", "length does not match the weight's shape"));
    }
    if p == 0 {
        return Ok(());
    }
    let mut strips: Vec<(usize, &mut [MaybeUninit<u32>])> = packed.chunks_mut(p * NR).enumerate().collect();
    par.for_each(&mut strips, |(s, out)| {
        out.fill(MaybeUninit::new(0));
        let mut row = vec![Bf16::default(); 2 * p];
        let mut words = vec![0u32; p];
        for c in 0..NR.min(n - *s * NR) {
            let j = *s * NR + c;
            for (b, &x) in row.iter_mut().zip(&w[j * k..(j + 1) * k]) {
                *b = Bf16::round_from_f64(x.widen_f64());
            }
            Bf16::pair_words(&row[..k], &mut words);
            for (i, &word) in words.iter().enumerate() {
                out[i * NR + c] = MaybeUninit::new(word);
            }
        }
    });
    Ok(())
}

/// What is applied to each `acc + bias` before the rounding to the output's dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    None,
    /// [`gelu_f32`].
    Gelu,
}

/// `Q(s)` with `erfc(z) = exp(−z²) · t · Q(2t − 1)`, `t = 3 / (3 + z)`, for `z` in [0, 10]
/// (`s` in [−0.54, 1]): float32 coefficients, highest degree first, within 1.2e-7 relative
/// evaluated in float32 by Horner's rule (the float64 fit: 1.9e-9).
const ERFC_Q: [f32; 10] = [
    0.000_108_860_02,
    -0.000_161_861_8,
    -0.001_026_597_2,
    -0.000_408_402_96,
    0.008_946_449,
    0.039_842_956,
    0.103_488_69,
    0.196_742_77,
    0.294_464_83,
    0.358_002_3,
];

/// `e^−w` for `w >= 0`, in float32: `w = n ln 2 − r` (Cody–Waite, `r` exact), `e^−r` by its
/// Taylor polynomial of degree 7 (truncation below 5.2e-9), times `2^−n`; +0 past `e^−87`
/// (below float32's normal range). Within about 2 ulp.
#[inline(always)]
fn exp_neg_f32(w: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUNDER: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_145_75; // 16 bits: n · LN2_HI is exact for |n| < 2^8
    const LN2_LO: f32 = 1.428_606_8e-6;
    let y = -w.min(87.5);
    let shifted = y.mul_add(LOG2E, ROUNDER);
    let n = shifted - ROUNDER;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, y));
    let mut p: f32 = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, c);
    }
    // n in [−126, 0] (w <= 87.5): 2^n is normal; the rounder's bits hold n in their low bits.
    let n_int = shifted.to_bits() as i32 - ROUNDER.to_bits() as i32;
    let two_n = f32::from_bits(((n_int + 127) as u32) << 23);
    if w > 87.0 {
        0.0
    } else {
        p * two_n
    }
}

/// The erf form of GELU, `x · Φ(x)`, in float32 arithmetic for the product's epilogue: within
/// 1e-6 relative of the exact value where that is a normal float32 (measured by the tests), and
/// within 2^-126 absolute below (a tail past `e^−87` is flushed to zero); NaN for NaN and −inf,
/// as PyTorch. `Φ(−a) = erfc(a/√2)/2`
/// by `ERFC_Q`, with `e^(−a²/2)` from `a²` split exactly into `sq + sq_err` (so the
/// exponent's rounding costs nothing).
#[inline(always)]
pub fn gelu_f32(x: f32) -> f32 {
    let a = x.abs().min(14.0); // Φ(−14) is below float32's normal range; NaN reads 14 (x stays NaN)
    let sq = a * a;
    let sq_err = a.mul_add(a, -sq);
    let z = (a * std::f32::consts::FRAC_1_SQRT_2).min(10.0);
    let t = 3.0 / (3.0 + z);
    let s = t.mul_add(2.0, -1.0);
    let mut q = ERFC_Q[0];
    for &c in &ERFC_Q[1..] {
        q = q.mul_add(s, c);
    }
    let e = exp_neg_f32(0.5 * sq) * (-0.5f32).mul_add(sq_err, 1.0);
    let tail = 0.5 * e * (t * q); // Φ(−a)
    x * if x < 0.0 { tail } else { 1.0 - tail }
}

/// The shapes of one product: `m` rows of `k` in, `n` columns out.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

/// `out = epilogue(x · Wᵀ + bias)` (see the module notes): `x` has `m` rows of `k`, `packed` is
/// [`pack_weight`]'s `n × k` weight, `bias` has `n` float32 values, `out` `m` rows of `n`.
#[allow(clippy::too_many_arguments)]
pub fn linear<X: Operand, Y: Operand>(
    x: &[X],
    packed: &[u32],
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    shape: Shape,
    out: &mut [MaybeUninit<Y>],
    par: Par<'_>,
) -> Result<(), KernelError> {
    let Shape { m, k, n } = shape;
    if Some(x.len()) != m.checked_mul(k) {
        return Err(KernelError::invalid("x", format!("expected {m} x {k} values, got {}", x.len())));
    }
    if Some(packed.len()) != packed_len(n, k) {
        return Err(KernelError::invalid(
            "packed",
            format!("expected {:?} words for {n} x {k}", packed_len(n, k)),
        ));
    }
    if bias.is_some_and(|b| b.len() != n) {
        return Err(KernelError::invalid("bias", format!("expected {n} values")));
    }
    if Some(out.len()) != m.checked_mul(n) {
        return Err(KernelError::invalid("out", format!("expected {m} x {n} values")));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let product = Product { x, packed, bias, epilogue, p: pairs(k), k, n };
    if m > MB {
        // Rows split: each task writes its own rows of `out`.
        let mut tasks: Vec<(usize, &mut [MaybeUninit<Y>])> = out.chunks_mut(MB * n).enumerate().collect();
        par.for_each(&mut tasks, |(b, rows)| {
            let r0 = *b * MB;
            let rows_here = rows.len() / n;
            simd::task_wide(&mut Block {
                product: &product,
                rows: (r0, rows_here),
                a: None,
                cols: (0, n),
                out: Out::Rows(rows),
            });
        });
    } else {
        // Few rows: columns split, each task into its own buffer, copied out after.
        // The rows' pair words once, shared by every task.
        let mut a = vec![0u32; m * product.p];
        simd::task_wide(&mut PackRows { x, k, first: 0, out: &mut a });
        let mut tasks: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(NB)).map(|b| (b, Vec::new())).collect();
        par.for_each(&mut tasks, |(b, buf)| {
            let cols = (*b * NB, NB.min(n - *b * NB));
            buf.resize(m * cols.1, 0.0);
            simd::task_wide(&mut Block {
                product: &product,
                rows: (0, m),
                a: Some(&a),
                cols,
                out: Out::<Y>::Buffer(buf),
            });
        });
        if par.stopped() {
            return Ok(());
        }
        for (b, buf) in &tasks {
            let c0 = b * NB;
            let cols = NB.min(n - c0);
            for (r, row) in buf.chunks_exact(cols).enumerate() {
                for (o, &v) in out[r * n + c0..][..cols].iter_mut().zip(row) {
                    *o = MaybeUninit::new(Y::from_f32(v));
                }
            }
        }
    }
    Ok(())
}

/// What every task of one call reads.
struct Product<'a, X> {
    x: &'a [X],
    packed: &'a [u32],
    bias: Option<&'a [f32]>,
    epilogue: Epilogue,
    p: usize,
    k: usize,
    n: usize,
}

/// Where a task's outputs go: its rows of `out` (all `n` columns), rounded to the output's
/// dtype; or a float32 buffer of its columns (`rows × cols`), bias and epilogue applied.
enum Out<'a, Y> {
    Rows(&'a mut [MaybeUninit<Y>]),
    Buffer(&'a mut [f32]),
}

/// Rows `first..` of `x` (rows of `k`) as pair words into `out` (whole rows of `pairs(k)`).
struct PackRows<'a, 'b, X> {
    x: &'a [X],
    k: usize,
    first: usize,
    out: &'b mut [u32],
}

impl<X: Operand> Task for PackRows<'_, '_, X> {
    #[inline(always)]
    fn run(&mut self) {
        let (k, first) = (self.k, self.first);
        for (r, words) in self.out.chunks_exact_mut(pairs(k).max(1)).enumerate() {
            X::pair_words(&self.x[(first + r) * k..][..k], words);
        }
    }
}

/// One task: rows `rows.0..rows.0 + rows.1` by columns `cols.0..cols.0 + cols.1` (`cols.0` a
/// multiple of NR); `a`: those rows' pair words, when packed before the tasks (else the task
/// packs its rows).
struct Block<'a, 'b, X, Y> {
    product: &'b Product<'a, X>,
    rows: (usize, usize),
    a: Option<&'b [u32]>,
    cols: (usize, usize),
    out: Out<'b, Y>,
}

impl<X: Operand, Y: Operand> Task for Block<'_, '_, X, Y> {
    #[inline(always)]
    fn run(&mut self) {
        let Product { x, packed, bias, epilogue, p, k, n } = *self.product;
        let (r0, m) = self.rows;
        let (c0, cols) = self.cols;
        let own;
        let a = match self.a {
            Some(a) => a,
            None => {
                let mut words = vec![0u32; m * p];
                PackRows { x, k, first: r0, out: &mut words }.run();
                own = words;
                &own
            }
        };
        #[cfg(target_arch = "x86_64")]
        let fast = x86::Bf16Tiles::detect();
        let mut tile = [[[0.0f32; NR]; SR]; MR];
        let s_end = (c0 + cols).div_ceil(NR);
        let mut s = c0 / NR;
        while s < s_end {
            let strips = SR.min(s_end - s);
            let b = &packed[s * p * NR..(s + strips) * p * NR];
            let mut t = 0;
            while t < m {
                let rows = MR.min(m - t);
                let a = &a[t * p..(t + rows) * p];
                #[cfg(target_arch = "x86_64")]
                if let Some(fast) = fast {
                    fast.tile(a, rows, b, strips, p, &mut tile);
                } else {
                    portable_tile(a, rows, b, strips, p, &mut tile);
                }
                #[cfg(not(target_arch = "x86_64"))]
                portable_tile(a, rows, b, strips, p, &mut tile);
                // The tile's valid columns, with the bias, into the task's output.
                for (r, tile_row) in tile.iter().enumerate().take(rows) {
                    for (st, lanes) in tile_row.iter().enumerate().take(strips) {
                        let j0 = (s + st) * NR;
                        let valid = NR.min(c0 + cols - j0);
                        let (lanes, bias) = (&lanes[..valid], bias.map(|b| &b[j0..j0 + valid]));
                        match (&mut self.out, epilogue) {
                            (Out::Rows(o), Epilogue::None) => {
                                finish(lanes, bias, &mut o[(t + r) * n + j0..][..valid], |v| {
                                    MaybeUninit::new(Y::from_f32(v))
                                })
                            }
                            (Out::Rows(o), Epilogue::Gelu) => {
                                finish(lanes, bias, &mut o[(t + r) * n + j0..][..valid], |v| {
                                    MaybeUninit::new(Y::from_f32(gelu_f32(v)))
                                })
                            }
                            (Out::Buffer(o), Epilogue::None) => {
                                finish(lanes, bias, &mut o[(t + r) * cols + j0 - c0..][..valid], |v| v)
                            }
                            (Out::Buffer(o), Epilogue::Gelu) => {
                                finish(lanes, bias, &mut o[(t + r) * cols + j0 - c0..][..valid], gelu_f32)
                            }
                        }
                    }
                }
                t += rows;
            }
            s += strips;
        }
    }
}

/// `out[c] = put(acc[c] + bias[c])` (no bias: `put(acc[c])`), in a loop that vectorises.
#[inline(always)]
fn finish<T>(acc: &[f32], bias: Option<&[f32]>, out: &mut [T], put: impl Fn(f32) -> T) {
    // A whole strip as arrays of sixteen: straight-line vector code, without a loop's remainder.
    if let (Ok(acc), Ok(out)) = (<&[f32; NR]>::try_from(acc), <&mut [T; NR]>::try_from(&mut *out)) {
        let sums: [f32; NR] = match bias.map(<&[f32; NR]>::try_from) {
            Some(Ok(bias)) => std::array::from_fn(|c| acc[c] + bias[c]),
            _ => *acc,
        };
        if bias.is_none() || bias.is_some_and(|b| b.len() == NR) {
            for (o, &v) in out.iter_mut().zip(&sums) {
                *o = put(v);
            }
            return;
        }
    }
    match bias {
        Some(bias) => {
            for ((o, &a), &b) in out.iter_mut().zip(acc).zip(bias) {
                *o = put(a + b);
            }
        }
        None => {
            for (o, &a) in out.iter_mut().zip(acc) {
                *o = put(a);
            }
        }
    }
}

/// The portable tile: `rows` rows of pair words `a` by `strips` strips of `b`, over all `p`
/// pairs, into `tile`; exactly the steps of `vdpbf16ps` (`dot16::steps`, and `dot16::step` where
/// a result lands on ±2^-126).
#[inline(always)]
fn portable_tile(
    a: &[u32],
    rows: usize,
    b: &[u32],
    strips: usize,
    p: usize,
    tile: &mut [[[f32; NR]; SR]; MR],
) {
    for (r, tile_row) in tile.iter_mut().enumerate().take(rows) {
        let a = &a[r * p..(r + 1) * p];
        for (st, acc) in tile_row.iter_mut().enumerate().take(strips) {
            let b = &b[st * p * NR..(st + 1) * p * NR];
            *acc = [0.0; NR];
            let mut edge = false;
            for (&w, k) in a.iter().zip(b.chunks_exact(NR)) {
                edge |= steps(acc, w, k);
            }
            if edge {
                *acc = [0.0; NR];
                for (&w, k) in a.iter().zip(b.chunks_exact(NR)) {
                    for (x, &kw) in acc.iter_mut().zip(k) {
                        *x = step(*x, w, kw);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The tile with `vdpbf16ps`. `unsafe` appears where vectors are loaded and stored (inside
    //! slices whose lengths are checked first) and where [`Bf16Tiles`] enters the kernel, whose
    //! existence proves the CPU has the instructions.

    use std::arch::x86_64::*;

    use super::{MR, NR, SR};
    use crate::kernels::simd;

    /// Proof that this CPU runs AVX-512F and AVX512_BF16 and that the AVX-512 path is enabled.
    #[derive(Clone, Copy)]
    pub struct Bf16Tiles(());

    impl Bf16Tiles {
        #[inline(always)]
        pub fn detect() -> Option<Self> {
            (simd::avx512() && std::arch::is_x86_feature_detected!("avx512bf16")).then_some(Self(()))
        }

        /// See `portable_tile`.
        #[inline(always)]
        pub fn tile(
            self,
            a: &[u32],
            rows: usize,
            b: &[u32],
            strips: usize,
            p: usize,
            tile: &mut [[[f32; NR]; SR]; MR],
        ) {
            assert!(
                (1..=MR).contains(&rows)
                    && (1..=SR).contains(&strips)
                    && a.len() >= rows * p
                    && b.len() >= strips * p * NR
            );
            macro_rules! shapes {
                ($($r:literal),*) => {
                    match (rows, strips) {
                        $(
                            ($r, 4) => tile_rs::<$r, 4>(a, b, p, tile),
                            ($r, 3) => tile_rs::<$r, 3>(a, b, p, tile),
                            ($r, 2) => tile_rs::<$r, 2>(a, b, p, tile),
                            ($r, 1) => tile_rs::<$r, 1>(a, b, p, tile),
                        )*
                        _ => {}
                    }
                };
            }
            // SAFETY: `self` exists only on a CPU with these instructions.
            unsafe { shapes!(1, 2, 3, 4, 5, 6) }
        }
    }

    /// `R` rows of `a` by `S` strips of `b` (consecutive, `p · NR` words each), all `p` pairs.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn tile_rs<const R: usize, const S: usize>(
        a: &[u32],
        b: &[u32],
        p: usize,
        tile: &mut [[[f32; NR]; SR]; MR],
    ) {
        let strips: [&[[u32; NR]]; S] = simd::array(|s| &b[s * p * NR..][..p * NR].as_chunks::<NR>().0[..p]);
        let rows: [&[u32]; R] = simd::array(|r| &a[r * p..][..p]);
        let mut acc = [[_mm512_setzero_ps(); S]; R];
        for i in 0..p {
            // SAFETY: reads the sixteen words of a strip's pair; a vector of 32-bit words and
            // one of bfloat16 pairs are the same 64 bytes.
            let k: [__m512bh; S] = simd::array(|s| unsafe {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(strips[s][i].as_ptr().cast()))
            });
            for (acc, row) in acc.iter_mut().zip(&rows) {
                // SAFETY: as above, for one word in every lane.
                let a = unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(row[i] as i32)) };
                for (x, &k) in acc.iter_mut().zip(&k) {
                    *x = _mm512_dpbf16_ps(*x, a, k);
                }
            }
        }
        for (acc, out) in acc.iter().zip(tile.iter_mut()) {
            for (&x, out) in acc.iter().zip(out.iter_mut()) {
                // SAFETY: writes the sixteen floats of `out`.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr(), x) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::simd;

    fn rnd(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
    }

    /// The module's definition, one output at a time.
    fn reference(x: &[f32], w: &[f32], bias: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f32> {
        let bf = |v: f32| to_bf16_lanes(v);
        let mut out = vec![0.0; m * n];
        for r in 0..m {
            for j in 0..n {
                let mut acc = 0.0f32;
                for i in 0..pairs(k) {
                    let word = |row: &[f32]| bf(row[2 * i]) | row.get(2 * i + 1).map_or(0, |&v| bf(v)) << 16;
                    let wb = |v: f32| Bf16::round_from_f64(v as f64).0 as u32;
                    let wrow = &w[j * k..(j + 1) * k];
                    let ww = wb(wrow[2 * i]) | wrow.get(2 * i + 1).map_or(0, |&v| wb(v)) << 16;
                    acc = step(acc, word(&x[r * k..(r + 1) * k]), ww);
                }
                out[r * n + j] = acc + bias[j];
            }
        }
        out
    }

    #[test]
    fn every_path_and_split_gives_the_definition() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let mut seed = 7;
        for &(m, k, n) in &[(1, 1, 1), (3, 7, 17), (7, 33, 70), (50, 64, 129), (100, 130, 40), (13, 384, 200)]
        {
            let x: Vec<f32> = (0..m * k).map(|_| rnd(&mut seed)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rnd(&mut seed)).collect();
            let bias: Vec<f32> = (0..n).map(|_| rnd(&mut seed)).collect();
            let want = reference(&x, &w, &bias, (m, k, n));
            let mut packed = vec![MaybeUninit::uninit(); packed_len(n, k).unwrap()];
            pack_weight(&w, n, k, &mut packed, Par::SEQ).unwrap();
            let packed: Vec<u32> = packed.iter().map(|w| unsafe { w.assume_init() }).collect();
            for (accelerated, wide) in [(true, true), (true, false), (false, false)] {
                simd::set_enabled(accelerated);
                simd::set_avx512_enabled(wide);
                for par in [Par::SEQ, Par::on(&pool)] {
                    let mut out = vec![MaybeUninit::<f32>::uninit(); m * n];
                    linear(&x, &packed, Some(&bias), Epilogue::None, Shape { m, k, n }, &mut out, par)
                        .unwrap();
                    let got: Vec<u32> = out.iter().map(|v| unsafe { v.assume_init() }.to_bits()).collect();
                    let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "m {m} k {k} n {n} accelerated {accelerated} wide {wide}");
                }
            }
            simd::set_enabled(true);
            simd::set_avx512_enabled(true);
        }
    }
}
