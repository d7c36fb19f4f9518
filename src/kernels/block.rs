//! The rest of a transformer block around attention: layer norm, RMS norm, GELU (the erf form and
//! the tanh approximation) and the SiLU-gated product of SwiGLU.
//!
//! Every kernel computes in float64 whatever its storage type (float32, float64, float16,
//! bfloat16) and rounds each output once, so a float32 or 16-bit output is the correctly rounded
//! value of the formula but for the float64 evaluation's own error (below 1e-10 relative) landing
//! next to a rounding boundary. A float64 output is within a few float64 ulp, times the size of
//! the argument of `exp` in the tails; results below float64's normal range (1e-308) are flushed
//! to zero. Rows and elements are independent and each is computed in one fixed order, so the
//! bits do not depend on the number of threads or on the code path (AVX-512, AVX2 or portable).
//!
//! ```text
//! layer_norm:  y = (h − mean(h)) / sqrt(var(h) + eps) · w + b      (biased variance, two passes)
//! rms_norm:    y = h / sqrt(mean(h²) + eps) · w
//!              h = x, or h = x + residual rounded to the storage type (returned too)
//! gelu:        x · Φ(x),   Φ(x) = erfc(−x/√2) / 2
//! gelu tanh:   x · (1 + tanh(√(2/π) (x + 0.044715 x³))) / 2 = x · σ(2 √(2/π) (x + 0.044715 x³))
//! silu_mul:    g · σ(g) · u                                      (σ the logistic function)
//! ```
//!
//! `Φ(−|x|) = erfc(z) / 2` with `z = |x|/√2` is `exp(−z²) · t · Q(2t − 1) / 2`, `t = 3 / (3 + z)`,
//! with `Q` a polynomial fitted to it (Chebyshev interpolation at 3000 nodes against 40-digit
//! values) and the rounding error of `z²` put back into `exp(−z²)`; then `Φ(x) = 1 − Φ(−x)` for
//! `x >= 0`. float64 outputs use `Q` of degree 22 (within 4e-15 relative) and a degree-13 `exp`;
//! the others, whose 24 bits or fewer need less, degree 14 (within 4e-11) and a degree-9 `exp`.
//! As the formulas evaluate (and as in PyTorch), every kernel returns NaN at `x = −inf`.
//!
//! Memory: row-major `(rows, n)` for the norms (`n` the normalized size), flat for the
//! elementwise kernels. Parallel split: blocks of rows (norms) or of elements.

use std::mem::MaybeUninit;

use crate::error::{expect_len, product, KernelError};
use crate::kernels::storage::Storage;
use crate::kernels::{
    for_each_row_block, for_each_row_block_pair, for_each_row_block_wide, Float, Rows, RowsPair,
};
use crate::pool::Par;

/// Which normalization a [`norm`] call applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// Subtract the mean, divide by the standard deviation, scale and shift.
    Layer,
    /// Divide by the root mean square, scale.
    Rms,
}

/// The shape and kind of a [`norm`] call.
#[derive(Debug, Clone, Copy)]
pub struct NormSpec {
    pub rows: usize,
    /// Elements per row (the normalized size).
    pub n: usize,
    pub eps: f64,
    pub kind: NormKind,
}

/// The inputs of a [`norm`] call: `x` and an optional `residual` (both `(rows, n)`), and the
/// optional per-element `weight` and `bias` (`n` each, in float64: any float type widens to it
/// exactly).
#[derive(Clone, Copy)]
pub struct NormInputs<'a, X> {
    pub x: &'a [X],
    pub residual: Option<&'a [X]>,
    pub weight: Option<&'a [f64]>,
    pub bias: Option<&'a [f64]>,
}

impl<X> NormInputs<'_, X> {
    fn check(&self, spec: &NormSpec, out: usize) -> Result<(), KernelError> {
        let len = product(&[spec.rows, spec.n]);
        expect_len("x", self.x.len(), len)?;
        expect_len("out", out, len)?;
        if let Some(r) = self.residual {
            expect_len("residual", r.len(), len)?;
        }
        for (arg, v) in [("weight", self.weight), ("bias", self.bias)] {
            if let Some(v) = v {
                expect_len(arg, v.len(), Some(spec.n))?;
            }
        }
        if spec.kind == NormKind::Rms && self.bias.is_some() {
            return Err(KernelError::invalid("bias", "rms_norm takes no bias"));
        }
        if spec.eps.is_nan() || spec.eps < 0.0 {
            return Err(KernelError::invalid("eps", format!("must be a number >= 0, got {}", spec.eps)));
        }
        Ok(())
    }
}

/// Normalizes each row of `x` (plus `residual`, when given, whose rounded sum is written to
/// `summed`) into `out`, as the module documentation says.
pub fn norm<X: Storage>(
    inputs: NormInputs<'_, X>,
    spec: NormSpec,
    out: &mut [MaybeUninit<X>],
    summed: Option<&mut [MaybeUninit<X>]>,
    par: Par<'_>,
) -> Result<(), KernelError> {
    inputs.check(&spec, out.len())?;
    let kernel = Norm { inputs, spec };
    // The float64 arithmetic of 32- and 16-bit rows in AVX-512 where there is (the same bits):
    // rows of 384 at 1 thread, 1.08-1.22x in float32 and 1.67-1.79x in bfloat16; float64 rows,
    // whose loads and stores are as wide as the arithmetic, gained nothing sure (0.93-1.10x)
    // and stay in AVX2.
    let wide = std::mem::size_of::<X>() <= 4;
    match summed {
        Some(summed) => {
            if inputs.residual.is_none() {
                return Err(KernelError::invalid("summed", "is written only with a residual"));
            }
            expect_len("summed", summed.len(), Some(out.len()))?;
            for_each_row_block_pair(out, summed, spec.n, par, &kernel, wide);
        }
        None if wide => for_each_row_block_wide(out, spec.n, par, &kernel),
        None => for_each_row_block(out, spec.n, par, &kernel),
    }
    Ok(())
}

struct Norm<'a, X> {
    inputs: NormInputs<'a, X>,
    spec: NormSpec,
}

impl<X: Storage> Norm<'_, X> {
    /// Normalizes row `r`: loads `h` into `buf` in float64 (with a residual, `x + residual`
    /// rounded to `X`, also written to `summed` when given), then writes the row of `out`.
    #[inline(always)]
    fn row(
        &self,
        r: usize,
        buf: &mut [f64],
        out: &mut [MaybeUninit<X>],
        summed: Option<&mut [MaybeUninit<X>]>,
    ) {
        let n = self.spec.n;
        let (x, buf, out) = (&self.inputs.x[r * n..(r + 1) * n], &mut buf[..n], &mut out[..n]);
        match (self.inputs.residual, summed) {
            (Some(res), Some(summed)) => {
                let (res, summed) = (&res[r * n..(r + 1) * n], &mut summed[..n]);
                for i in 0..n {
                    let h = round::<X>(x[i].widen_f64() + res[i].widen_f64());
                    summed[i].write(h);
                    buf[i] = h.widen_f64();
                }
            }
            (Some(res), None) => {
                let res = &res[r * n..(r + 1) * n];
                for i in 0..n {
                    buf[i] = round::<X>(x[i].widen_f64() + res[i].widen_f64()).widen_f64();
                }
            }
            (None, _) => {
                for i in 0..n {
                    buf[i] = x[i].widen_f64();
                }
            }
        }
        let inv_n = 1.0 / n as f64;
        let (shift, rstd) = match self.spec.kind {
            NormKind::Layer => {
                let mean = sum(buf) * inv_n;
                let var = sum_squares(buf, mean) * inv_n;
                (mean, 1.0 / (var + self.spec.eps).sqrt())
            }
            NormKind::Rms => (0.0, 1.0 / (sum_squares(buf, 0.0) * inv_n + self.spec.eps).sqrt()),
        };
        match (self.inputs.weight, self.inputs.bias) {
            (Some(w), Some(b)) => {
                for i in 0..n {
                    out[i].write(round(((buf[i] - shift) * rstd).mul_add(w[i], b[i])));
                }
            }
            (Some(w), None) => {
                for i in 0..n {
                    out[i].write(round((buf[i] - shift) * rstd * w[i]));
                }
            }
            (None, Some(b)) => {
                for i in 0..n {
                    out[i].write(round((buf[i] - shift) * rstd + b[i]));
                }
            }
            (None, None) => {
                for i in 0..n {
                    out[i].write(round((buf[i] - shift) * rstd));
                }
            }
        }
    }
}

impl<X: Storage> Rows<MaybeUninit<X>> for Norm<'_, X> {
    #[inline(always)]
    fn rows(&self, first: usize, block: &mut [MaybeUninit<X>]) {
        let mut buf = vec![0.0; self.spec.n];
        for (k, out) in block.chunks_exact_mut(self.spec.n).enumerate() {
            self.row(first + k, &mut buf, out, None);
        }
    }
}

impl<X: Storage> RowsPair<MaybeUninit<X>> for Norm<'_, X> {
    #[inline(always)]
    fn rows(&self, first: usize, a: &mut [MaybeUninit<X>], b: &mut [MaybeUninit<X>]) {
        let n = self.spec.n;
        let mut buf = vec![0.0; n];
        for (k, (out, summed)) in a.chunks_exact_mut(n).zip(b.chunks_exact_mut(n)).enumerate() {
            self.row(first + k, &mut buf, out, Some(summed));
        }
    }
}

/// Running sums per [`sum`]: four AVX-512 registers (eight AVX2 ones), enough independent
/// additions to hide their latency.
const SUMS: usize = 32;

/// `Σ (v − center)²` over `v` in one fixed order (see [`sum`]); `center = 0` gives `Σ v²`
/// (subtracting zero is exact).
#[inline(always)]
fn sum_squares(v: &[f64], center: f64) -> f64 {
    let mut acc = [0.0f64; SUMS];
    let (chunks, rest) = v.as_chunks::<SUMS>();
    for c in chunks {
        for j in 0..SUMS {
            acc[j] += (c[j] - center) * (c[j] - center);
        }
    }
    for (j, &x) in rest.iter().enumerate() {
        acc[j] += (x - center) * (x - center);
    }
    reduce(acc)
}

/// `Σ v` in one fixed order: `SUMS` running sums (element `i` into sum `i mod SUMS`), then
/// [`reduce`]. The order is in the source, so every code path gives the same bits.
#[inline(always)]
fn sum(v: &[f64]) -> f64 {
    let mut acc = [0.0f64; SUMS];
    let (chunks, rest) = v.as_chunks::<SUMS>();
    for c in chunks {
        for j in 0..SUMS {
            acc[j] += c[j];
        }
    }
    for (j, &x) in rest.iter().enumerate() {
        acc[j] += x;
    }
    reduce(acc)
}

/// The running sums added: halves added lane by lane until one is left.
#[inline(always)]
fn reduce(mut acc: [f64; SUMS]) -> f64 {
    let mut width = SUMS;
    while width > 1 {
        width /= 2;
        for j in 0..width {
            acc[j] += acc[j + width];
        }
    }
    acc[0]
}

/// `x` rounded once to the storage type. For the 16-bit types: rounded to float32 to odd
/// (truncated, with the lowest bit set when inexact), then to nearest even; float32 keeps more
/// than two bits beyond a 16-bit significand, so the two steps round exactly as one does.
#[inline(always)]
pub fn round<X: Storage>(x: f64) -> X {
    if std::mem::size_of::<X>() == 2 {
        // The compute type of a 16-bit type is float32: the value converts to it exactly.
        X::narrow(X::Compute::from_f64(to_f32_odd(x) as f64))
    } else {
        X::round_from_f64(x)
    }
}

/// `x` rounded to float32 to odd (see [`round`]).
#[inline(always)]
fn to_f32_odd(x: f64) -> f32 {
    let r = x as f32;
    let bits = r.to_bits();
    // Rounded away from zero: step back one unit (the bits count magnitudes, sign apart).
    let bits = if (r as f64).abs() > x.abs() { bits - 1 } else { bits };
    let t = f32::from_bits(bits);
    if t as f64 != x && !x.is_nan() {
        f32::from_bits(bits | 1)
    } else {
        t
    }
}

/// erfc(a) = exp(−a²) · t · Q(s) for a >= 0, t = 3 / (3 + a), s = 2t − 1 in (−1, 1]: the
/// coefficients of Q in s, highest degree first, within 3.3e-15 relative (float64 outputs).
const ERFC: &[f64] = &[
    1.058794506142166e-10,
    1.3773605393375934e-09,
    -1.7375418013327387e-09,
    -1.3355538679598923e-08,
    1.7900546601796776e-08,
    7.282134658176523e-08,
    -1.388315441644803e-07,
    -3.2848983763623513e-07,
    9.238668451916292e-07,
    1.580493900596048e-06,
    -5.824527415818202e-06,
    -1.013174734564381e-05,
    3.585415536798422e-05,
    9.225904420128833e-05,
    -0.0001827699670465167,
    -0.0010113539638280306,
    -0.0004041388663650708,
    0.008942411538136963,
    0.039842587095066474,
    0.10348908730035233,
    0.1967427857013868,
    0.2944648177232924,
    0.35800230236277975,
];

/// [`ERFC`] of degree 14, within 3.1e-11 relative: enough for outputs of 24 bits or fewer.
const ERFC_SHORT: &[f64] = &[
    5.117903003730991e-07,
    7.976288410700633e-07,
    -5.22542574351046e-06,
    -9.144263813168331e-06,
    3.537534840007364e-05,
    9.156817411090419e-05,
    -0.00018255312701404683,
    -0.0010110857055309985,
    -0.00040419280858846723,
    0.008942357101670852,
    0.03984259372828857,
    0.10348909222066037,
    0.19674278538937245,
    0.2944648175938295,
    0.35800230236519404,
];

/// Lanes per step of the elementwise kernels.
const LANES: usize = 8;
type V = [f64; LANES];

/// `[e(0), …, e(7)]` for an expression `e` of the lane index.
macro_rules! lanes {
    ($j:ident => $e:expr) => {{
        let mut r: V = [0.0; LANES];
        for $j in 0..LANES {
            r[$j] = $e;
        }
        r
    }};
}

/// `p(x)` by Horner's rule, `coefficients` highest degree first.
#[inline(always)]
fn horner(coefficients: &[f64], x: V) -> V {
    let mut p = [coefficients[0]; LANES];
    for &c in &coefficients[1..] {
        p = lanes!(j => p[j].mul_add(x[j], c));
    }
    p
}

/// `exp(x)` for `x <= 0` (NaN stays NaN), reduced as the softmax's float64 `exp` is
/// ([`Exp`](crate::kernels::exp::Exp)), then `e^r` by its Taylor polynomial with fused
/// multiply-adds: of degree 13 (`FULL`, truncation below 2^-57) or 9 (below 7e-12).
#[inline(always)]
fn exp_nonpositive<const FULL: bool>(x: V) -> V {
    use crate::kernels::exp::f64_consts::*;
    use crate::kernels::exp::INV_FACTORIAL;
    let xc = lanes!(j => if x[j].is_nan() { x[j] } else { x[j].max(MIN) });
    let shifted = lanes!(j => xc[j].mul_add(LOG2E, ROUNDER));
    let n = lanes!(j => shifted[j] - ROUNDER);
    let r = lanes!(j => n[j].mul_add(-LN2_LO, n[j].mul_add(-LN2_HI, xc[j])));
    let degree = if FULL { 13 } else { 9 };
    let mut p = [if FULL { 1.0 / 6_227_020_800.0 } else { INV_FACTORIAL[9] }; LANES];
    for k in (0..degree).rev() {
        p = lanes!(j => p[j].mul_add(r[j], INV_FACTORIAL[k]));
    }
    let two_n = lanes!(j => f64::from_bits(shifted[j].to_bits().wrapping_add(1023) << 52));
    lanes!(j => if x[j] < MIN { 0.0 } else { p[j] * two_n[j] })
}

/// Φ(−a) = erfc(a/√2) / 2 for a >= 0 (NaN for NaN): within 4e-15 relative (`FULL`) or 4e-11.
#[inline(always)]
fn normal_tail<const FULL: bool>(a: V) -> V {
    // Past 27, erfc underflows float64; the clamp keeps z² and its error finite for a = inf.
    let z = lanes!(j => (a[j] * std::f64::consts::FRAC_1_SQRT_2).min(27.0));
    let t = lanes!(j => 3.0 / (3.0 + z[j]));
    let q = horner(if FULL { ERFC } else { ERFC_SHORT }, lanes!(j => t[j].mul_add(2.0, -1.0)));
    let sq = lanes!(j => z[j] * z[j]);
    let sq_err = lanes!(j => z[j].mul_add(z[j], -sq[j])); // z² = sq + sq_err exactly
    let e = exp_nonpositive::<FULL>(lanes!(j => -sq[j]));
    lanes!(j => if a[j].is_nan() { a[j] } else { 0.5 * (e[j] * (1.0 - sq_err[j]) * (t[j] * q[j])) })
}

/// `x · Φ(x)`.
#[inline(always)]
fn gelu_erf<const FULL: bool>(x: V) -> V {
    let tail = normal_tail::<FULL>(lanes!(j => x[j].abs()));
    lanes!(j => x[j] * if x[j] < 0.0 { tail[j] } else { 1.0 - tail[j] })
}

/// The logistic function `1 / (1 + e^−v)`, from `e^−|v|` (never overflows).
#[inline(always)]
fn sigmoid<const FULL: bool>(v: V) -> V {
    let e = exp_nonpositive::<FULL>(lanes!(j => -v[j].abs()));
    lanes!(j => (if v[j] < 0.0 { e[j] } else { 1.0 }) / (1.0 + e[j]))
}

/// `x · σ(2 √(2/π) (x + 0.044715 x³))`, which is the tanh form exactly.
#[inline(always)]
fn gelu_tanh<const FULL: bool>(x: V) -> V {
    const TWO_SQRT_2_OVER_PI: f64 = 2.0 * 0.797_884_560_802_865_4; // 2 √(2/π)
    let s = sigmoid::<FULL>(lanes!(j => TWO_SQRT_2_OVER_PI * x[j] * (0.044715 * x[j]).mul_add(x[j], 1.0)));
    lanes!(j => x[j] * s[j])
}

/// `g · σ(g) · u`.
#[inline(always)]
fn silu_mul<const FULL: bool>(g: V, u: V) -> V {
    let s = sigmoid::<FULL>(g);
    lanes!(j => g[j] * s[j] * u[j])
}

/// Which form of GELU a [`gelu`] call computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gelu {
    Erf,
    Tanh,
}

/// `out[i] = gelu(x[i])`.
pub fn gelu<X: Storage>(
    x: &[X],
    form: Gelu,
    out: &mut [MaybeUninit<X>],
    par: Par<'_>,
) -> Result<(), KernelError> {
    expect_len("out", out.len(), Some(x.len()))?;
    match form {
        Gelu::Erf => for_each_row_block_wide(out, 1, par, &Elementwise(Map { x, f: GeluErf })),
        Gelu::Tanh => for_each_row_block_wide(out, 1, par, &Elementwise(Map { x, f: GeluTanh })),
    }
    Ok(())
}

/// `out[i] = silu(gate[i]) · up[i]`.
pub fn silu_mul_into<X: Storage>(
    gate: &[X],
    up: &[X],
    out: &mut [MaybeUninit<X>],
    par: Par<'_>,
) -> Result<(), KernelError> {
    expect_len("up", up.len(), Some(gate.len()))?;
    expect_len("out", out.len(), Some(gate.len()))?;
    for_each_row_block_wide(out, 1, par, &Elementwise(SiluMul { gate, up }));
    Ok(())
}

/// A function applied elementwise by [`Map`], eight lanes at a time. A trait with an
/// always-inlined method rather than a closure or `fn` value: those are called out of line, which
/// leaves them outside the AVX2 + FMA function [`simd::rows`](crate::kernels::simd) compiles (a
/// multiply-add there becomes a library call).
trait Unary: Sync {
    fn apply<const FULL: bool>(&self, x: V) -> V;
}

struct GeluErf;
struct GeluTanh;

impl Unary for GeluErf {
    #[inline(always)]
    fn apply<const FULL: bool>(&self, x: V) -> V {
        gelu_erf::<FULL>(x)
    }
}

impl Unary for GeluTanh {
    #[inline(always)]
    fn apply<const FULL: bool>(&self, x: V) -> V {
        gelu_tanh::<FULL>(x)
    }
}

/// An elementwise kernel of one input.
struct Map<'a, X, F> {
    x: &'a [X],
    f: F,
}

/// An elementwise kernel's blocks, computed with the polynomials its output type needs.
trait Lanewise<X>: Sync {
    fn run<const FULL: bool>(&self, first: usize, block: &mut [MaybeUninit<X>]);
}

/// A [`Lanewise`] kernel as [`Rows`]: the choice of polynomials (see [`full`]) made in one place.
struct Elementwise<K>(K);

impl<X: Storage, K: Lanewise<X>> Rows<MaybeUninit<X>> for Elementwise<K> {
    #[inline(always)]
    fn rows(&self, first: usize, block: &mut [MaybeUninit<X>]) {
        if full::<X>() {
            self.0.run::<true>(first, block)
        } else {
            self.0.run::<false>(first, block)
        }
    }
}

impl<X: Storage, F: Unary> Lanewise<X> for Map<'_, X, F> {
    #[inline(always)]
    fn run<const FULL: bool>(&self, first: usize, block: &mut [MaybeUninit<X>]) {
        let x = &self.x[first..first + block.len()];
        let ((xs, x_rest), (outs, out_rest)) = (x.as_chunks::<LANES>(), block.as_chunks_mut::<LANES>());
        for (x, out) in xs.iter().zip(outs) {
            store(out, self.f.apply::<FULL>(lanes!(j => x[j].widen_f64())));
        }
        // The last few, padded with zeros.
        store(out_rest, self.f.apply::<FULL>(lanes!(j => pad(x_rest, j))));
    }
}

struct SiluMul<'a, X> {
    gate: &'a [X],
    up: &'a [X],
}

impl<X: Storage> Lanewise<X> for SiluMul<'_, X> {
    #[inline(always)]
    fn run<const FULL: bool>(&self, first: usize, block: &mut [MaybeUninit<X>]) {
        let range = first..first + block.len();
        let (g, u) = (&self.gate[range.clone()], &self.up[range]);
        let ((gs, g_rest), (us, u_rest)) = (g.as_chunks::<LANES>(), u.as_chunks::<LANES>());
        let (outs, out_rest) = block.as_chunks_mut::<LANES>();
        for ((g, u), out) in gs.iter().zip(us).zip(outs) {
            store(out, silu_mul::<FULL>(lanes!(j => g[j].widen_f64()), lanes!(j => u[j].widen_f64())));
        }
        store(out_rest, silu_mul::<FULL>(lanes!(j => pad(g_rest, j)), lanes!(j => pad(u_rest, j))));
    }
}

/// Whether outputs of type `X` need the float64 accuracy (the polynomials of full degree):
/// float64 does; float32 and the 16-bit types keep 24 bits or fewer, for which the short ones
/// are within 1e-10 relative.
#[inline(always)]
fn full<X>() -> bool {
    std::mem::size_of::<X>() == 8
}

/// Element `j` of `x` in float64, or 0 past its end.
#[inline(always)]
fn pad<X: Storage>(x: &[X], j: usize) -> f64 {
    if j < x.len() {
        x[j].widen_f64()
    } else {
        0.0
    }
}

/// Rounds the first `out.len()` (at most `LANES`) lanes of `v` into `out`.
#[inline(always)]
fn store<X: Storage>(out: &mut [MaybeUninit<X>], v: V) {
    for (o, &v) in out.iter_mut().zip(&v) {
        o.write(round(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::output::{collect, collect_pair};
    use crate::kernels::storage::{narrow, Bf16, BF16_FORMAT, F16, F16_FORMAT};

    #[test]
    fn rounding_to_16_bits_through_float32_to_odd_rounds_once() {
        // Values next to every kind of boundary: ties of the 16-bit format a float32 rounding
        // would create, subnormals, overflow, signs.
        let mut values = vec![0.0, -0.0, 1e-50, -1e-50, 1e39, -1e39, 65520.0, 65519.99, 3.4e38, 3.39e38];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let x = f64::from_bits(state);
            if x.is_finite() {
                values.push(x);
            }
            let scale = 2f64.powi((state % 80) as i32 - 40);
            let tie = (1.0 + (state >> 40) as f64 / 2f64.powi(24) + 2f64.powi(-11)) * scale;
            values.extend([tie, tie + tie * 1e-12, tie - tie * 1e-12, -tie]);
        }
        for x in values {
            assert_eq!(round::<F16>(x).0, narrow(x, F16_FORMAT), "{x:e}");
            assert_eq!(round::<Bf16>(x).0, narrow(x, BF16_FORMAT), "{x:e}");
        }
        assert!(round::<F16>(f64::NAN).0 & 0x7fff > 0x7c00);
    }

    /// Φ(x), independently of the kernel's polynomials.
    fn phi_reference(x: f64) -> f64 {
        // Φ(x) from the series Φ(x) = 1/2 + φ(x) Σ x^(2k+1) / (1·3·…·(2k+1)), all terms positive
        // for x > 0; for x < 0, symmetry; for |x| > 6, Laplace's continued fraction of the tail.
        let a = x.abs();
        let tail = if a < 2.0 {
            let (mut term, mut sum, mut k) = (a, a, 1.0);
            while term > sum * 1e-18 {
                term *= a * a / (2.0 * k + 1.0);
                sum += term;
                k += 1.0;
            }
            0.5 - (-a * a / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt() * sum
        } else {
            let mut f = 0.0;
            for k in (1..5000).rev() {
                f = k as f64 / (a + f);
            }
            (-a * a / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt() / (a + f)
        };
        if x < 0.0 {
            tail
        } else {
            1.0 - tail
        }
    }

    /// The kernel function `f` at `x` (in every lane).
    fn at(f: fn(V) -> V, x: f64) -> f64 {
        f([x; LANES])[0]
    }

    #[test]
    fn gelu_matches_a_series_reference() {
        for (f, bound) in [(gelu_erf::<true> as fn(V) -> V, 1e-13), (gelu_erf::<false>, 1e-10)] {
            let mut worst: f64 = 0.0;
            for i in -4000..=4000 {
                let x = i as f64 / 250.0; // -16 .. 16
                let (got, want) = (at(f, x), x * phi_reference(x));
                if want != 0.0 {
                    worst = worst.max(((got - want) / want).abs());
                }
            }
            // Far in the tail, the rounding of x/√2 (relative 1e-16, times x² in the exponent)
            // dominates both the kernel's error and the reference's.
            assert!(worst < bound, "worst relative error {worst:e}");
            assert_eq!(at(f, 0.0), 0.0);
            assert!(at(f, f64::NAN).is_nan() && at(f, f64::NEG_INFINITY).is_nan());
            assert_eq!(at(f, f64::INFINITY), f64::INFINITY);
            assert_eq!(at(f, -40.0), -0.0);
        }
    }

    #[test]
    fn tanh_gelu_and_silu_match_their_formulas() {
        type Pair = (fn(V) -> V, fn(V, V) -> V);
        let forms: [(Pair, f64); 2] = [
            ((gelu_tanh::<true>, silu_mul::<true>), 1e-15),
            ((gelu_tanh::<false>, silu_mul::<false>), 1e-11),
        ];
        for ((tanh, silu), bound) in forms {
            for i in -2000..=2000 {
                let x = i as f64 / 100.0;
                // x (1 + tanh y) / 2 as x e^y / (e^y + e^−y), with the standard library's exp
                // (1 + tanh y cancels for y far below zero).
                let y = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                let want = x * y.exp() / (y.exp() + (-y).exp());
                // A relative error of the exponent's argument grows with its size.
                assert!((at(tanh, x) - want).abs() <= bound * want.abs() * (1.0 + y.abs()), "{x}");
                let want = 3.0 * x / (1.0 + (-x).exp());
                let got = silu([x; LANES], [3.0; LANES])[0];
                assert!((got - want).abs() <= bound * want.abs() * (1.0 + x.abs()), "{x}");
            }
            assert_eq!(at(tanh, f64::INFINITY), f64::INFINITY);
            assert!(silu([f64::NEG_INFINITY; LANES], [1.0; LANES])[0].is_nan());
        }
    }

    #[test]
    fn elementwise_kernels_fill_every_output_whatever_the_length() {
        // Lengths around the lane count, so that the padded last group is exercised.
        for len in [0, 1, 7, 8, 9, 17, 4097] {
            let x: Vec<f32> = (0..len).map(|i| i as f32 / 50.0 - 3.0).collect();
            let g = collect("out", len, |o| gelu(&x, Gelu::Erf, o, Par::SEQ)).unwrap();
            let s = collect("out", len, |o| silu_mul_into(&x, &x, o, Par::SEQ)).unwrap();
            for i in 0..len {
                assert_eq!(g[i], round::<f32>(at(gelu_erf::<false>, x[i] as f64)), "{len} {i}");
                let v = x[i] as f64;
                assert_eq!(s[i], round::<f32>(silu_mul::<false>([v; LANES], [v; LANES])[0]), "{len} {i}");
            }
        }
    }

    fn layer_norm_naive(x: &[f64], n: usize, w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
        let mut out = vec![];
        for row in x.chunks(n) {
            let mean = row.iter().sum::<f64>() / n as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
            out.extend(row.iter().enumerate().map(|(i, v)| (v - mean) / (var + eps).sqrt() * w[i] + b[i]));
        }
        out
    }

    #[test]
    fn norms_match_their_formulas_with_and_without_a_residual() {
        let (rows, n) = (37, 29);
        let x: Vec<f32> = (0..rows * n).map(|i| ((i * 37) % 101) as f32 / 7.0 - 5.0).collect();
        let r: Vec<f32> = (0..rows * n).map(|i| ((i * 13) % 17) as f32 / 3.0).collect();
        let w: Vec<f64> = (0..n).map(|i| 0.5 + i as f64 / 10.0).collect();
        let b: Vec<f64> = (0..n).map(|i| i as f64 / 7.0 - 1.0).collect();
        let spec = NormSpec { rows, n, eps: 1e-5, kind: NormKind::Layer };
        let inputs = NormInputs { x: &x, residual: Some(&r), weight: Some(&w), bias: Some(&b) };
        let (y, h) =
            collect_pair(("out", "summed"), rows * n, |a, s| norm(inputs, spec, a, Some(s), Par::SEQ))
                .unwrap();
        let sum: Vec<f32> = x.iter().zip(&r).map(|(a, b)| a + b).collect();
        assert_eq!(h, sum);
        let want = layer_norm_naive(&sum.iter().map(|&v| v as f64).collect::<Vec<_>>(), n, &w, &b, 1e-5);
        for (g, w) in y.iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= w.abs() * 6e-8 + 1e-12, "{g} {w}");
        }
        // Without `summed`, the same normalized rows.
        let y2 = collect("out", rows * n, |a| norm(inputs, spec, a, None, Par::SEQ)).unwrap();
        assert_eq!(y, y2);
        // RMS: y = h / sqrt(mean(h²) + eps) · w.
        let spec = NormSpec { kind: NormKind::Rms, ..spec };
        let inputs = NormInputs { x: &x, residual: None, weight: Some(&w), bias: None };
        let y = collect("out", rows * n, |a| norm(inputs, spec, a, None, Par::SEQ)).unwrap();
        for (row, (xr, yr)) in x.chunks(n).zip(y.chunks(n)).enumerate() {
            let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
            for i in 0..n {
                let want = xr[i] as f64 / (ms + 1e-5).sqrt() * w[i];
                assert!((yr[i] as f64 - want).abs() <= want.abs() * 6e-8 + 1e-12, "row {row}");
            }
        }
    }

    #[test]
    fn norms_reject_inconsistent_inputs() {
        let (x, w) = ([0.0f32; 6], [1.0f64; 3]);
        let spec = NormSpec { rows: 2, n: 3, eps: 1e-5, kind: NormKind::Rms };
        let run =
            |inputs: NormInputs<'_, f32>, spec| collect("out", 6, |a| norm(inputs, spec, a, None, Par::SEQ));
        let ok = NormInputs { x: &x, residual: None, weight: Some(&w), bias: None };
        assert!(run(ok, spec).is_ok());
        assert!(run(NormInputs { weight: Some(&w[..2]), ..ok }, spec).is_err(), "weight of 2");
        assert!(run(NormInputs { bias: Some(&w), ..ok }, spec).is_err(), "rms with a bias");
        assert!(run(NormInputs { residual: Some(&x[..5]), ..ok }, spec).is_err(), "residual of 5");
        assert!(run(ok, NormSpec { eps: f64::NAN, ..spec }).is_err(), "eps NaN");
        assert!(run(ok, NormSpec { rows: usize::MAX, ..spec }).is_err(), "overflow");
    }
}
