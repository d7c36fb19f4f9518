//! `exp` without branches for the softmax, in float32 and float64.
//!
//! `exp(x) = 2^n · e^r` with `n = round(x / ln 2)` and `r = x - n ln 2` (ln 2 split in two parts,
//! Cody–Waite), `e^r` by a polynomial on `|r| <= ln 2 / 2`, and `2^n` built in the exponent bits.
//! Results below the smallest normal number are flushed to zero (a softmax weight below 1e-38
//! next to a weight of 1 changes nothing), `exp(-inf) = 0`, and NaN stays NaN. Softmax arguments
//! are never positive (scores minus their maximum), so overflow is not handled.
//!
//! float32: Cephes `expf` (S. Moshier) evaluated with fused multiply-adds, within 2 ulp.
//! float64: Taylor polynomial of degree 13, whose truncation error on `|r| <= ln 2 / 2` is below
//! 2^-57, within 2 ulp.
//!
//! [`exp_short`] is a shorter float32 `exp` for probabilities that are rounded to bfloat16 right
//! after (8 significant bits): half the polynomial, within 4.3e-6 (2^-17.8) relative.

/// `exp(x)` for `x <= 0` (or NaN), as described in the module documentation.
pub trait Exp: Copy {
    fn exp_nonpositive(self) -> Self;
}

/// The constants of the float32 `exp`, shared with the explicit vector version of the attention
/// kernels (which must compute the same operations to give the same bits).
pub(crate) mod f32_consts {
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    pub const LN2_HI: f32 = 0.693_359_4; // 0.693359375: exact in few bits
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    pub const ROUNDER: f32 = 12_582_912.0; // 1.5 * 2^23
    /// Below this, `exp` is flushed to zero (2^n stays normal above it).
    pub const MIN: f32 = -87.0;
    /// The polynomial for (e^r − 1 − r) / r², highest degree first.
    pub const POLY: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        f32::from_bits(0x3F00_0001), // 5.0000001201e-1
    ];
}

impl Exp for f32 {
    #[inline(always)]
    fn exp_nonpositive(self) -> f32 {
        use f32_consts::*;
        let x = self.max(MIN); // keeps 2^n normal; NaN stays NaN (max ignores it only if both are)
        let x = if self.is_nan() { self } else { x };
        let shifted = x.mul_add(LOG2E, ROUNDER);
        let n = shifted - ROUNDER;
        let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
        let mut p = POLY[0];
        for &c in &POLY[1..] {
            p = p.mul_add(r, c);
        }
        let e_r = p.mul_add(r * r, r) + 1.0;
        // 2^n from the bits of `shifted` = 1.5 * 2^23 + n, whose low bits hold n as an integer:
        // integer vector operations only (`n as i32` would be a scalar, saturating conversion).
        let two_n = f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
        if self < MIN {
            0.0
        } else {
            e_r * two_n
        }
    }
}

/// The constants of [`exp_short`], shared with its explicit vector version.
pub(crate) mod short_consts {
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    pub const ROUNDER: f32 = super::f32_consts::ROUNDER;
    /// Below this, `exp_short` is flushed to zero (2^n stays normal above it).
    pub const MIN: f32 = super::f32_consts::MIN;
    /// `2^f ≈ 1 + f · q(f)` on `|f| <= 1/2`: the coefficients of `q`, highest degree first, fitted
    /// for the smallest largest relative error (Lawson's iteration), then rounded to float32.
    pub const POLY: [f32; 4] = [0.009_588_486, 0.055_919_76, 0.240_240_53, 0.693_122_27];
}

/// `exp(x)` for `x <= 0` (or NaN), for probabilities that are rounded to bfloat16 next: within
/// 4.3e-6 relative (2^-17.8; bfloat16 keeps 2^-9), at about half the cost of
/// [`Exp::exp_nonpositive`]. `exp(x) = 2^n · 2^f` with `n` the nearest integer to `y = x log2 e`
/// and `f = y − n` (both from the exact product, one fused multiply-add each), `2^f` by a degree-4
/// polynomial whose constant term is 1 (so `exp(0) = 1` exactly), `2^n` in the exponent bits.
/// Below −87 the result is +0, `exp(−inf) = 0`, NaN stays NaN.
#[inline(always)]
pub fn exp_short(x: f32) -> f32 {
    use short_consts::*;
    let shifted = x.mul_add(LOG2E, ROUNDER);
    let n = shifted - ROUNDER;
    let f = x.mul_add(LOG2E, -n);
    let mut q = POLY[0];
    for &c in &POLY[1..] {
        q = q.mul_add(f, c);
    }
    let two_f = q.mul_add(f, 1.0);
    let two_n = f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
    if x < MIN {
        0.0
    } else {
        two_f * two_n
    }
}

impl Exp for f64 {
    #[inline(always)]
    fn exp_nonpositive(self) -> f64 {
        use f64_consts::*;
        let x = if self.is_nan() { self } else { self.max(MIN_F64) };
        let shifted = x * LOG2E + ROUNDER;
        let n = shifted - ROUNDER;
        let r = x - n * LN2_HI - n * LN2_LO;
        // e^r = sum r^k / k!, k <= 13, by Horner.
        let mut p = 1.0 / 6_227_020_800.0; // 1/13!
        for k in (1..=12).rev() {
            p = p * r + INV_FACTORIAL[k];
        }
        let e_r = p * r + 1.0;
        let two_n = f64::from_bits(shifted.to_bits().wrapping_add(1023) << 52);
        if self < MIN_F64 {
            0.0
        } else {
            e_r * two_n
        }
    }
}

/// The constants of the float64 `exp`, shared with the elementwise kernels' vector version
/// (`block.rs`), which reduces the argument the same way.
pub(crate) mod f64_consts {
    pub const LOG2E: f64 = std::f64::consts::LOG2_E;
    pub const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000); // 6.93147180369123816490e-01
    pub const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76); // 1.90821492927058770002e-10
    pub const ROUNDER: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52
    /// Below this, `exp` is flushed to zero (2^n stays normal above it).
    pub const MIN: f64 = -708.0;
}
use f64_consts::MIN as MIN_F64;

/// 1/k! for k = 0..=12.
pub(crate) const INV_FACTORIAL: [f64; 13] = [
    1.0,
    1.0,
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
    1.0 / 40320.0,
    1.0 / 362880.0,
    1.0 / 3628800.0,
    1.0 / 39916800.0,
    1.0 / 479001600.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps32(a: f32, b: f32) -> u32 {
        a.to_bits().abs_diff(b.to_bits())
    }

    #[test]
    fn float32_within_2_ulp_of_libm() {
        let mut x = 0.0f32;
        while x > -87.0 {
            let (ours, libm) = (x.exp_nonpositive(), x.exp());
            assert!(ulps32(ours, libm) <= 2, "exp({x}) = {ours:e}, libm {libm:e}");
            x -= 0.000_37;
        }
    }

    #[test]
    fn float64_within_2_ulp_of_libm() {
        let mut x = 0.0f64;
        while x > -708.0 {
            let (ours, libm) = (x.exp_nonpositive(), x.exp());
            assert!(ours.to_bits().abs_diff(libm.to_bits()) <= 2, "exp({x}) = {ours:e}, libm {libm:e}");
            x -= 0.001_7;
        }
    }

    #[test]
    fn short_float32_within_its_bound_of_libm() {
        let mut x = 0.0f32;
        let mut worst = 0.0f64;
        while x > -87.0 {
            let want = (x as f64).exp();
            worst = worst.max((exp_short(x) as f64 - want).abs() / want);
            x -= if x > -1.0 { 0.000_003 } else { 0.000_37 };
        }
        assert!(worst <= 4.3e-6, "worst relative error {worst:e}");
        assert!(worst > 1e-6, "the bound is not tight: {worst:e}");
        assert_eq!(exp_short(0.0), 1.0);
        assert_eq!(exp_short(-0.0), 1.0);
        assert_eq!(exp_short(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_short(-87.5), 0.0);
        assert!(exp_short(f32::NAN).is_nan());
    }

    #[test]
    fn edge_values() {
        assert_eq!(0.0f32.exp_nonpositive(), 1.0);
        assert_eq!(f32::NEG_INFINITY.exp_nonpositive(), 0.0);
        assert_eq!((-1000.0f32).exp_nonpositive(), 0.0);
        assert!(f32::NAN.exp_nonpositive().is_nan());
        assert_eq!(0.0f64.exp_nonpositive(), 1.0);
        assert_eq!(f64::NEG_INFINITY.exp_nonpositive(), 0.0);
        assert!(f64::NAN.exp_nonpositive().is_nan());
    }
}
