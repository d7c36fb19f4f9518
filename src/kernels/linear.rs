//! The matrix product of a linear layer, `out = x · Wᵀ + bias`, with the weight packed once for
//! attnkit's own tiles: bfloat16 weights in the arithmetic of `vdpbf16ps` (see
//! `attention/dot16.rs`), which does twice the float32 multiply-adds of an FMA per instruction;
//! or float32 weights, by fused multiply-adds.
//!
//! The weight `W` (`n` rows of `k`, PyTorch's `(out_features, in_features)`) is packed once
//! ([`pack_weight`]) in strips of sixteen output columns, each strip a run of `depth` words of
//! sixteen lanes, `packed[(s · depth + i) · NR + c]`, zeros past the last column:
//! - [`Bf16Weights`]: the weight rounded once to bfloat16; word `i` of a lane holds the pair of
//!   input dimensions `(2i, 2i + 1)` (dimension `2i` in the low half, zero in an odd last
//!   dimension's high half), so `depth = ⌈k / 2⌉`. Each call rounds the rows of `x` to bfloat16
//!   pairs the same way (to nearest even; subnormals read as zero, as the instruction reads them)
//!   and sums each pair as a step of `vdpbf16ps` (`dot16::step`).
//! - [`F32Weights`]: the weight rounded once to float32, `depth = k`; the rows of `x` are read as
//!   they are. The input dimensions run in blocks of `KB`: each block's sum is one float32
//!   accumulator from zero, each dimension a fused multiply-add (one rounding), and the blocks'
//!   sums are added in order to the output's total.
//!
//! Every output is one float32 accumulator from zero, the words `i = 0, 1, …` in order (in blocks
//! for float32), then plus the float32 bias, then (optionally) the erf-GELU of [`gelu_f32`],
//! rounded once to the output's dtype (float32 or bfloat16, chosen apart from the input's).
//!
//! The x86 tiles (`x86` below: AVX512_BF16 for bfloat16, AVX-512F for float32) and the portable
//! ones compute those exact steps, so every path and every thread count gives the same bits, and
//! a row's outputs do not depend on the other rows of the call. Rows are split into blocks of
//! `MB` (or, for at most `MB` rows, as in decoding, columns into blocks of `NB`); each output is
//! computed by one tile whatever the split. A strip is one sequential stream of the weight, so a
//! call with few rows reads the weight at the memory's streaming rate.

use std::borrow::Cow;
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
/// Rows per task when rows are split: 8 tiles' rows, whose words stay in L2 while the task runs
/// through every strip of the weight.
const MB: usize = 8 * MR;
/// Columns per task when columns are split (few rows: decoding).
const NB: usize = 4 * SR * NR;

/// Input dimensions per block of a float32 sum: each output sums each block in an accumulator of
/// its own, then adds it to its total (rounding errors grow with √KB + √(k/KB), not √k).
const KB: usize = 64;

/// One tile's accumulators, as the tiles hand them back.
type Tile = [[[f32; NR]; SR]; MR];

/// Whether the bfloat16 products run the `vdpbf16ps` tiles (else the portable emulation: the same
/// bits, much slower).
pub fn native() -> bool {
    Bf16Weights::detect().fast.is_some()
}

/// The number of pair words of a row of `k` values.
#[inline(always)]
pub fn pairs(k: usize) -> usize {
    k.div_ceil(2)
}

/// One kind of packed weight: its words, how a row becomes words, and the tile that sums rows of
/// words by strips (see the module notes).
pub trait Weights: Copy + Send + Sync {
    /// A word of a packed weight or of a row of `x`.
    type Word: Copy + Default + Send + Sync;
    /// The words of a row of `k` values.
    fn depth(k: usize) -> usize;
    /// The weights' tiles on this CPU.
    fn detect() -> Self;
    /// A row of the weight (`k` values, any float dtype) rounded once and as `depth(k)` words.
    fn weight_words<X: Storage>(row: &[X], out: &mut [Self::Word]);
    /// `rows` rows of words `a` (`depth` apart) by `strips` strips of `b`, over all `depth`
    /// words, into `tile`.
    fn tile(
        self,
        a: &[Self::Word],
        rows: usize,
        b: &[Self::Word],
        strips: usize,
        depth: usize,
        tile: &mut Tile,
    );
}

/// bfloat16 weights, summed by `vdpbf16ps` or its exact emulation.
#[derive(Clone, Copy)]
pub struct Bf16Weights {
    #[cfg(target_arch = "x86_64")]
    fast: Option<x86::Bf16Tiles>,
    #[cfg(not(target_arch = "x86_64"))]
    fast: Option<()>,
}

impl Weights for Bf16Weights {
    type Word = u32;
    #[inline(always)]
    fn depth(k: usize) -> usize {
        pairs(k)
    }
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        let fast = x86::Bf16Tiles::detect();
        #[cfg(not(target_arch = "x86_64"))]
        let fast = None;
        Self { fast }
    }
    fn weight_words<X: Storage>(row: &[X], out: &mut [u32]) {
        pair_words_by(row, out, |x: X| daz(Bf16::round_from_f64(x.widen_f64())));
    }
    #[inline(always)]
    fn tile(self, a: &[u32], rows: usize, b: &[u32], strips: usize, depth: usize, tile: &mut Tile) {
        #[cfg(target_arch = "x86_64")]
        if let Some(fast) = self.fast {
            return fast.tile(a, rows, b, strips, depth, tile);
        }
        portable_bf16_tile(a, rows, b, strips, depth, tile)
    }
}

/// float32 weights, summed by fused multiply-adds.
#[derive(Clone, Copy)]
pub struct F32Weights {
    #[cfg(target_arch = "x86_64")]
    fast: Option<x86::F32Tiles>,
}

impl Weights for F32Weights {
    type Word = f32;
    #[inline(always)]
    fn depth(k: usize) -> usize {
        k
    }
    fn detect() -> Self {
        Self {
            #[cfg(target_arch = "x86_64")]
            fast: x86::F32Tiles::detect(),
        }
    }
    fn weight_words<X: Storage>(row: &[X], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(row) {
            *o = x.widen_f64() as f32;
        }
    }
    #[inline(always)]
    fn tile(self, a: &[f32], rows: usize, b: &[f32], strips: usize, depth: usize, tile: &mut Tile) {
        #[cfg(target_arch = "x86_64")]
        if let Some(fast) = self.fast {
            return fast.tile(a, rows, b, strips, depth, tile);
        }
        portable_f32_tile(a, rows, b, strips, depth, tile)
    }
}

/// The number of words of `n × k` packed weights.
pub fn packed_len<W: Weights>(n: usize, k: usize) -> Option<usize> {
    n.div_ceil(NR).checked_mul(W::depth(k))?.checked_mul(NR)
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

/// The dtypes a bfloat16 product reads and the dtypes products write: float32 (rounded to
/// bfloat16 pairs when read) or bfloat16 (read as it is).
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

/// Rounds the weight `w` (`n` rows of `k`, any float dtype) once to `W`'s words and packs it into
/// `packed` (`packed_len::<W>(n, k)` words, every one written; see the module notes).
pub fn pack_weight<W: Weights, X: Storage>(
    w: &[X],
    n: usize,
    k: usize,
    packed: &mut [MaybeUninit<W::Word>],
    par: Par<'_>,
) -> Result<(), KernelError> {
    let depth = W::depth(k);
    if Some(w.len()) != n.checked_mul(k) {
        return Err(KernelError::invalid("weight", format!("expected {n} x {k} values, got {}", w.len())));
    }
    if Some(packed.len()) != packed_len::<W>(n, k) {
        return Err(KernelError::invalid("packed", "length does not match the weight's shape"));
    }
    if depth == 0 {
        return Ok(());
    }
    let mut strips: Vec<(usize, &mut [MaybeUninit<W::Word>])> =
        packed.chunks_mut(depth * NR).enumerate().collect();
    par.for_each(&mut strips, |(s, out)| {
        out.fill(MaybeUninit::new(W::Word::default()));
        let mut words = vec![W::Word::default(); depth];
        for c in 0..NR.min(n - *s * NR) {
            let j = *s * NR + c;
            W::weight_words(&w[j * k..(j + 1) * k], &mut words);
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

/// `e^−w` for each `w >= 0` of `w`, in float32: `w = n ln 2 − r` (Cody–Waite, `r` exact), `e^−r`
/// by its Taylor polynomial of degree 7 (truncation below 5.2e-9), times `2^−n`; +0 past `e^−87`
/// (below float32's normal range). Within about 2 ulp. (A step at a time over all lanes, as
/// [`gelu_lanes`].)
#[inline(always)]
fn exp_neg_lanes<const N: usize>(w: &[f32; N]) -> [f32; N] {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUNDER: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_145_75; // 16 bits: n · LN2_HI is exact for |n| < 2^8
    const LN2_LO: f32 = 1.428_606_8e-6;
    let y = each::<N>(|i| -w[i].min(87.5));
    let shifted = each::<N>(|i| y[i].mul_add(LOG2E, ROUNDER));
    let n = each::<N>(|i| shifted[i] - ROUNDER);
    let r = each::<N>(|i| n[i].mul_add(-LN2_LO, n[i].mul_add(-LN2_HI, y[i])));
    let mut p = [1.0f32 / 5040.0; N];
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        for (p, &r) in p.iter_mut().zip(&r) {
            *p = p.mul_add(r, c);
        }
    }
    each::<N>(|i| {
        // n in [−126, 0] (w <= 87.5): 2^n is normal; the rounder's bits hold n in their low bits.
        let n_int = shifted[i].to_bits() as i32 - ROUNDER.to_bits() as i32;
        let two_n = f32::from_bits(((n_int + 127) as u32) << 23);
        if w[i] > 87.0 {
            0.0
        } else {
            p[i] * two_n
        }
    })
}

/// One step over all lanes: `[f(0), …, f(N − 1)]`.
#[inline(always)]
fn each<const N: usize>(f: impl Fn(usize) -> f32) -> [f32; N] {
    std::array::from_fn(f)
}

/// The erf form of GELU, `x · Φ(x)`, in float32 arithmetic for the product's epilogue: within
/// 1e-6 relative of the exact value where that is a normal float32 (measured by the tests), and
/// within 2^-126 absolute below (a tail past `e^−87` is flushed to zero); NaN for NaN and −inf,
/// as PyTorch. (See [`gelu_lanes`].)
#[inline(always)]
pub fn gelu_f32(x: f32) -> f32 {
    let mut x = [x];
    gelu_lanes(&mut x);
    x[0]
}

/// [`gelu_f32`] of each of `x`, written a step at a time over all `N` lanes, so that the chains
/// of dependent steps of a product's four strips overlap (a product with k = 384 ran 1.024x
/// faster than with one strip's GELU after another). `Φ(−a) = erfc(a/√2)/2` by `ERFC_Q`, with
/// `e^(−a²/2)` from `a²` split exactly into `sq + sq_err` (so the exponent's rounding costs
/// nothing).
#[inline(always)]
fn gelu_lanes<const N: usize>(x: &mut [f32; N]) {
    // Φ(−14) is below float32's normal range; NaN reads 14 (x stays NaN).
    let a = each::<N>(|i| x[i].abs().min(14.0));
    let sq = each::<N>(|i| a[i] * a[i]);
    let sq_err = each::<N>(|i| a[i].mul_add(a[i], -sq[i]));
    let t = each::<N>(|i| 3.0 / (3.0 + (a[i] * std::f32::consts::FRAC_1_SQRT_2).min(10.0)));
    let s = each::<N>(|i| t[i].mul_add(2.0, -1.0));
    let mut q = [ERFC_Q[0]; N];
    for &c in &ERFC_Q[1..] {
        for (q, &s) in q.iter_mut().zip(&s) {
            *q = q.mul_add(s, c);
        }
    }
    let exp = exp_neg_lanes(&each::<N>(|i| 0.5 * sq[i]));
    for (i, x) in x.iter_mut().enumerate() {
        let e = exp[i] * (-0.5f32).mul_add(sq_err[i], 1.0);
        let tail = 0.5 * e * (t[i] * q[i]); // Φ(−a)
        *x = *x * if *x < 0.0 { tail } else { 1.0 - tail };
    }
}

/// The shapes of one product: `m` rows of `k` in, `n` columns out.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

/// What one call computes besides its input rows: the packed weight, the bias, the epilogue and
/// the output's shape.
#[derive(Clone, Copy)]
pub struct Call<'a, W: Weights> {
    pub packed: &'a [W::Word],
    pub bias: Option<&'a [f32]>,
    pub epilogue: Epilogue,
    pub shape: Shape,
}

impl<W: Weights> Call<'_, W> {
    /// The call's lengths against its shape; `x_len`: the values of `x`.
    fn check<Y>(&self, x_len: usize, out: &[MaybeUninit<Y>]) -> Result<(), KernelError> {
        let Shape { m, k, n } = self.shape;
        if Some(x_len) != m.checked_mul(k) {
            return Err(KernelError::invalid("x", format!("expected {m} x {k} values, got {x_len}")));
        }
        if Some(self.packed.len()) != packed_len::<W>(n, k) {
            return Err(KernelError::invalid(
                "packed",
                format!("expected {:?} words for {n} x {k}", packed_len::<W>(n, k)),
            ));
        }
        if self.bias.is_some_and(|b| b.len() != n) {
            return Err(KernelError::invalid("bias", format!("expected {n} values")));
        }
        if Some(out.len()) != m.checked_mul(n) {
            return Err(KernelError::invalid("out", format!("expected {m} x {n} values")));
        }
        Ok(())
    }
}

/// `out = epilogue(x · Wᵀ + bias)` with bfloat16 weights (see the module notes): `x` has `m` rows
/// of `k`, `call.packed` is [`pack_weight`]'s `n × k` weight, `bias` has `n` float32 values, `out`
/// `m` rows of `n`.
pub fn linear<X: Operand, Y: Operand>(
    x: &[X],
    call: Call<'_, Bf16Weights>,
    out: &mut [MaybeUninit<Y>],
    par: Par<'_>,
) -> Result<(), KernelError> {
    call.check(x.len(), out)?;
    let k = call.shape.k;
    let pack = |first: usize, words: &mut [u32]| simd::task_wide(&mut PackRows { x, k, first, out: words });
    drive(Bf16Weights::detect(), call, Rows::Pack(&pack), out, par);
    Ok(())
}

/// `out = epilogue(x · Wᵀ + bias)` with float32 weights (see the module notes), as [`linear`].
pub fn linear_f32<Y: Operand>(
    x: &[f32],
    call: Call<'_, F32Weights>,
    out: &mut [MaybeUninit<Y>],
    par: Par<'_>,
) -> Result<(), KernelError> {
    call.check(x.len(), out)?;
    drive(F32Weights::detect(), call, Rows::<f32, fn(usize, &mut [f32])>::Ready(x), out, par);
    Ok(())
}

/// Where a task finds its rows' words: all the call's rows, ready; or packed by the task, from
/// the first row and into a buffer of its rows.
enum Rows<'a, Word, F> {
    Ready(&'a [Word]),
    Pack(&'a F),
}

/// Splits a checked call into tasks (see the module notes) and runs them.
fn drive<W: Weights, Y: Operand, F: Fn(usize, &mut [W::Word]) + Sync>(
    weights: W,
    call: Call<'_, W>,
    rows: Rows<'_, W::Word, F>,
    out: &mut [MaybeUninit<Y>],
    par: Par<'_>,
) {
    let Shape { m, k, n } = call.shape;
    if m == 0 || n == 0 {
        return;
    }
    let product = Product { weights, call, depth: W::depth(k) };
    if m > MB {
        // Rows split: each task writes its own rows of `out`.
        let mut tasks: Vec<(usize, &mut [MaybeUninit<Y>])> = out.chunks_mut(MB * n).enumerate().collect();
        par.for_each(&mut tasks, |(b, rows_out)| {
            let r0 = *b * MB;
            let here = rows_out.len() / n;
            let a: Cow<'_, [W::Word]> = match rows {
                Rows::Ready(all) => Cow::Borrowed(&all[r0 * product.depth..(r0 + here) * product.depth]),
                Rows::Pack(pack) => {
                    let mut words = vec![W::Word::default(); here * product.depth];
                    pack(r0, &mut words);
                    Cow::Owned(words)
                }
            };
            simd::task_wide(&mut Block {
                product: &product,
                a: &a,
                rows: here,
                cols: (0, n),
                out: Out::Rows(rows_out),
            });
        });
    } else {
        // Few rows: columns split, each task into its own buffer, copied out after; rows to pack
        // are packed once, shared by every task.
        let owned;
        let a: &[W::Word] = match rows {
            Rows::Ready(all) => all,
            Rows::Pack(pack) => {
                let mut words = vec![W::Word::default(); m * product.depth];
                pack(0, &mut words);
                owned = words;
                &owned
            }
        };
        let mut tasks: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(NB)).map(|b| (b, Vec::new())).collect();
        par.for_each(&mut tasks, |(b, buf)| {
            let cols = (*b * NB, NB.min(n - *b * NB));
            buf.resize(m * cols.1, 0.0);
            simd::task_wide(&mut Block { product: &product, a, rows: m, cols, out: Out::<Y>::Buffer(buf) });
        });
        if par.stopped() {
            return;
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
}

/// What every task of one call reads.
struct Product<'a, W: Weights> {
    weights: W,
    call: Call<'a, W>,
    depth: usize,
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

/// One task: the `rows` rows of words `a` by columns `cols.0..cols.0 + cols.1` (`cols.0` a
/// multiple of NR).
struct Block<'a, 'b, W: Weights, Y> {
    product: &'b Product<'a, W>,
    a: &'b [W::Word],
    rows: usize,
    cols: (usize, usize),
    out: Out<'b, Y>,
}

impl<W: Weights, Y: Operand> Task for Block<'_, '_, W, Y> {
    #[inline(always)]
    fn run(&mut self) {
        let Product { weights, call, depth } = *self.product;
        let Call { packed, bias, epilogue, shape } = call;
        let n = shape.n;
        let (a, m) = (self.a, self.rows);
        let (c0, cols) = self.cols;
        let mut tile: Tile = [[[0.0f32; NR]; SR]; MR];
        let s_end = (c0 + cols).div_ceil(NR);
        let mut s = c0 / NR;
        while s < s_end {
            let strips = SR.min(s_end - s);
            let b = &packed[s * depth * NR..(s + strips) * depth * NR];
            let mut t = 0;
            while t < m {
                let rows = MR.min(m - t);
                // The tile's output lines, asked for before its sums: a store to a line that is
                // not in cache waits for it, and the sums take long enough to hide that (MiniLM
                // in float32 at 1 thread: 2-5% faster in four A/B runs; bfloat16 within noise).
                if let Out::Rows(o) = &self.out {
                    for r in 0..rows {
                        let at = (t + r) * n + s * NR;
                        simd::prefetch(&o[at..(at + strips * NR).min((t + r + 1) * n)]);
                    }
                }
                weights.tile(&a[t * depth..(t + rows) * depth], rows, b, strips, depth, &mut tile);
                // The GELU over a tile of four whole strips: each row's 64 lanes at once
                // (`gelu_lanes`), plus the bias as `finish` adds it.
                if let (Epilogue::Gelu, true, Out::Rows(o)) =
                    (epilogue, (s + SR) * NR <= c0 + cols, &mut self.out)
                {
                    let j0 = s * NR;
                    for (r, tile_row) in tile.iter().enumerate().take(rows) {
                        let lanes: &[f32; SR * NR] = tile_row.as_flattened().try_into().unwrap();
                        let mut sums: [f32; SR * NR] = match bias {
                            Some(b) => {
                                let b: &[f32; SR * NR] = b[j0..j0 + SR * NR].try_into().unwrap();
                                std::array::from_fn(|c| lanes[c] + b[c])
                            }
                            None => *lanes,
                        };
                        let out: &mut [MaybeUninit<Y>; SR * NR] =
                            (&mut o[(t + r) * n + j0..][..SR * NR]).try_into().unwrap();
                        gelu_lanes(&mut sums);
                        for (o, &v) in out.iter_mut().zip(&sums) {
                            *o = MaybeUninit::new(Y::from_f32(v));
                        }
                    }
                    t += rows;
                    continue;
                }
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

/// The portable bfloat16 tile: `rows` rows of pair words `a` by `strips` strips of `b`, over all
/// `p` pairs, into `tile`; exactly the steps of `vdpbf16ps` (`dot16::steps`, and `dot16::step`
/// where a result lands on ±2^-126).
#[inline(always)]
fn portable_bf16_tile(a: &[u32], rows: usize, b: &[u32], strips: usize, p: usize, tile: &mut Tile) {
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

/// The portable float32 tile: as [`portable_bf16_tile`], in blocks of `KB` input dimensions,
/// each dimension one fused multiply-add (`f32::mul_add`: an FMA instruction where the
/// accelerated path runs) into the block's accumulator, each block's sum then added to the total.
/// Each strip is run for a tile's rows at once (up to 6: twelve 256-bit accumulators with AVX2).
#[inline(always)]
fn portable_f32_tile(a: &[f32], rows: usize, b: &[f32], strips: usize, depth: usize, tile: &mut Tile) {
    #[inline(always)]
    fn rows_by_strip<const R: usize>(
        a: &[f32],
        b: &[f32],
        depth: usize,
        out: &mut [[[f32; NR]; SR]],
        st: usize,
    ) {
        let rows: [&[f32]; R] = simd::array(|r| &a[r * depth..][..depth]);
        let mut total = [[0.0f32; NR]; R];
        for (blk, ws) in b[..depth * NR].chunks(KB * NR).enumerate() {
            let mut acc = [[0.0f32; NR]; R];
            for (i, w) in ws.chunks_exact(NR).enumerate() {
                for (acc, row) in acc.iter_mut().zip(&rows) {
                    let x = row[blk * KB + i];
                    for (s, &w) in acc.iter_mut().zip(w) {
                        *s = x.mul_add(w, *s);
                    }
                }
            }
            for (total, acc) in total.iter_mut().zip(&acc) {
                for (t, &s) in total.iter_mut().zip(acc) {
                    *t += s;
                }
            }
        }
        for (out, total) in out.iter_mut().zip(total) {
            out[st] = total;
        }
    }
    for st in 0..strips {
        let b = &b[st * depth * NR..(st + 1) * depth * NR];
        let mut r = 0;
        while r < rows {
            let here = MR.min(rows - r);
            let (a, out) = (&a[r * depth..], &mut tile[r..r + here]);
            match here {
                6 => rows_by_strip::<6>(a, b, depth, out, st),
                5 => rows_by_strip::<5>(a, b, depth, out, st),
                4 => rows_by_strip::<4>(a, b, depth, out, st),
                3 => rows_by_strip::<3>(a, b, depth, out, st),
                2 => rows_by_strip::<2>(a, b, depth, out, st),
                _ => rows_by_strip::<1>(a, b, depth, out, st),
            }
            r += here;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The tiles with `vdpbf16ps` and with AVX-512 FMAs. `unsafe` appears where vectors are
    //! loaded and stored (inside slices whose lengths are checked first) and where [`Bf16Tiles`]
    //! and [`F32Tiles`] enter the kernels, whose existence proves the CPU has the instructions.

    use std::arch::x86_64::*;

    use super::{Tile, KB, MR, NR, SR};
    use crate::kernels::simd;

    /// Proof that this CPU runs AVX-512F and AVX512_BF16 and that the AVX-512 path is enabled.
    #[derive(Clone, Copy)]
    pub struct Bf16Tiles(());

    /// Proof that this CPU runs AVX-512F and that the AVX-512 path is enabled.
    #[derive(Clone, Copy)]
    pub struct F32Tiles(());

    /// Calls `$tile::<R, S>($args)` for the tile's `rows` (1 to 6) and `strips` (1 to 4).
    macro_rules! shapes {
        ($tile:ident, $rows:expr, $strips:expr, ($($arg:expr),*)) => {
            shapes!(@rows $tile, $rows, $strips, ($($arg),*), 1, 2, 3, 4, 5, 6)
        };
        (@rows $tile:ident, $rows:expr, $strips:expr, $args:tt, $($r:literal),*) => {
            match ($rows, $strips) {
                $(
                    ($r, 4) => shapes!(@call $tile, $r, 4, $args),
                    ($r, 3) => shapes!(@call $tile, $r, 3, $args),
                    ($r, 2) => shapes!(@call $tile, $r, 2, $args),
                    ($r, 1) => shapes!(@call $tile, $r, 1, $args),
                )*
                _ => {}
            }
        };
        (@call $tile:ident, $r:literal, $s:literal, ($($arg:expr),*)) => {
            $tile::<$r, $s>($($arg),*)
        };
    }

    /// The tile's shape against its slices (the kernels read inside them).
    #[inline(always)]
    fn check<T>(a: &[T], rows: usize, b: &[T], strips: usize, depth: usize) {
        assert!(
            (1..=MR).contains(&rows)
                && (1..=SR).contains(&strips)
                && a.len() >= rows * depth
                && b.len() >= strips * depth * NR
        );
    }

    impl Bf16Tiles {
        #[inline(always)]
        pub fn detect() -> Option<Self> {
            (simd::avx512() && std::arch::is_x86_feature_detected!("avx512bf16")).then_some(Self(()))
        }

        /// See `portable_bf16_tile`.
        #[inline(always)]
        pub fn tile(self, a: &[u32], rows: usize, b: &[u32], strips: usize, p: usize, tile: &mut Tile) {
            check(a, rows, b, strips, p);
            // SAFETY: `self` exists only on a CPU with these instructions.
            unsafe { shapes!(tile_bf16, rows, strips, (a, b, p, tile)) }
        }
    }

    impl F32Tiles {
        #[inline(always)]
        pub fn detect() -> Option<Self> {
            simd::avx512().then_some(Self(()))
        }

        /// See `portable_f32_tile`.
        #[inline(always)]
        pub fn tile(self, a: &[f32], rows: usize, b: &[f32], strips: usize, depth: usize, tile: &mut Tile) {
            check(a, rows, b, strips, depth);
            // SAFETY: `self` exists only on a CPU with these instructions.
            unsafe { shapes!(tile_f32, rows, strips, (a, b, depth, tile)) }
        }
    }

    /// `R` rows of `a` by `S` strips of `b` (consecutive, `p · NR` words each), all `p` pairs.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn tile_bf16<const R: usize, const S: usize>(a: &[u32], b: &[u32], p: usize, tile: &mut Tile) {
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
        store(&acc, tile);
    }

    /// `R` rows of `a` by `S` strips of `b` (consecutive, `depth · NR` floats each), all `depth`
    /// input dimensions in blocks of `KB`, one FMA each (see `portable_f32_tile`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn tile_f32<const R: usize, const S: usize>(a: &[f32], b: &[f32], depth: usize, tile: &mut Tile) {
        let strips: [&[[f32; NR]]; S] =
            simd::array(|s| &b[s * depth * NR..][..depth * NR].as_chunks::<NR>().0[..depth]);
        let rows: [&[f32]; R] = simd::array(|r| &a[r * depth..][..depth]);
        let mut total = [[_mm512_setzero_ps(); S]; R];
        let mut i0 = 0;
        while i0 < depth {
            let mut acc = [[_mm512_setzero_ps(); S]; R];
            for i in i0..depth.min(i0 + KB) {
                // SAFETY: reads the sixteen floats of a strip's input dimension.
                let k: [__m512; S] = simd::array(|s| unsafe { _mm512_loadu_ps(strips[s][i].as_ptr()) });
                for (acc, row) in acc.iter_mut().zip(&rows) {
                    let a = _mm512_set1_ps(row[i]);
                    for (x, &k) in acc.iter_mut().zip(&k) {
                        *x = _mm512_fmadd_ps(a, k, *x);
                    }
                }
            }
            for (total, acc) in total.iter_mut().zip(&acc) {
                for (t, &x) in total.iter_mut().zip(acc) {
                    *t = _mm512_add_ps(*t, x);
                }
            }
            i0 += KB;
        }
        store(&total, tile);
    }

    /// The accumulators into the first `R` rows and `S` strips of `tile`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn store<const R: usize, const S: usize>(acc: &[[__m512; S]; R], tile: &mut Tile) {
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

    /// float32 weights' definition, one output at a time.
    fn reference_f32(x: &[f32], w: &[f32], bias: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for r in 0..m {
            for j in 0..n {
                let mut total = 0.0f32;
                for i0 in (0..k).step_by(KB) {
                    let mut acc = 0.0f32;
                    for i in i0..k.min(i0 + KB) {
                        acc = x[r * k + i].mul_add(w[j * k + i], acc);
                    }
                    total += acc;
                }
                out[r * n + j] = total + bias[j];
            }
        }
        out
    }

    /// Runs `product` on every path (AVX-512, AVX2, portable) and split (one thread, three) of
    /// each shape and asserts the bits of `reference`'s.
    fn every_path<W: Weights>(
        reference: fn(&[f32], &[f32], &[f32], (usize, usize, usize)) -> Vec<f32>,
        product: fn(&[f32], Call<'_, W>, &mut [MaybeUninit<f32>], Par<'_>) -> Result<(), KernelError>,
    ) {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let mut seed = 7;
        for &(m, k, n) in &[(1, 1, 1), (3, 7, 17), (7, 33, 70), (50, 64, 129), (100, 130, 40), (13, 384, 200)]
        {
            let x: Vec<f32> = (0..m * k).map(|_| rnd(&mut seed)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rnd(&mut seed)).collect();
            let bias: Vec<f32> = (0..n).map(|_| rnd(&mut seed)).collect();
            let want: Vec<u32> = reference(&x, &w, &bias, (m, k, n)).iter().map(|v| v.to_bits()).collect();
            let mut packed = vec![MaybeUninit::uninit(); packed_len::<W>(n, k).unwrap()];
            pack_weight::<W, f32>(&w, n, k, &mut packed, Par::SEQ).unwrap();
            let packed: Vec<W::Word> = packed.iter().map(|w| unsafe { w.assume_init() }).collect();
            for (accelerated, wide) in [(true, true), (true, false), (false, false)] {
                simd::set_enabled(accelerated);
                simd::set_avx512_enabled(wide);
                for par in [Par::SEQ, Par::on(&pool)] {
                    let mut out = vec![MaybeUninit::<f32>::uninit(); m * n];
                    let call = Call {
                        packed: &packed,
                        bias: Some(&bias),
                        epilogue: Epilogue::None,
                        shape: Shape { m, k, n },
                    };
                    product(&x, call, &mut out, par).unwrap();
                    let got: Vec<u32> = out.iter().map(|v| unsafe { v.assume_init() }.to_bits()).collect();
                    assert_eq!(got, want, "m {m} k {k} n {n} accelerated {accelerated} wide {wide}");
                }
            }
            simd::set_enabled(true);
            simd::set_avx512_enabled(true);
        }
    }

    #[test]
    fn every_path_and_split_gives_the_definition() {
        every_path::<Bf16Weights>(reference, linear::<f32, f32>);
        every_path::<F32Weights>(reference_f32, linear_f32::<f32>);
    }
}
