//! What the kernels read from memory (the storage type) and what they compute in.
//!
//! Float32 and float64 are computed in themselves. The 16-bit types, IEEE binary16 ([`F16`],
//! NumPy's `float16`) and bfloat16 ([`Bf16`], `ml_dtypes.bfloat16`), are computed in float32:
//! each value is widened exactly when it is read, and each output is rounded once, to nearest,
//! ties to even. Since widening is exact, a kernel gives a 16-bit input the bits it gives the
//! same values held in float32.
//!
//! Widening has one answer per input bit pattern on every code path: the F16C and AVX-512 forms
//! of [`Storage::widen_slice`] are tested against the portable one on all 65 536 patterns. A
//! signalling NaN comes out quiet (the quiet bit set, the rest of its payload kept), which is what
//! the conversion instructions do. Rounding ([`narrow`]) is portable code only: outputs are few
//! next to the arithmetic that makes them, and one implementation cannot disagree with itself.

use crate::kernels::attention::AttnFloat;

/// An IEEE 754 binary16 value (NumPy's `float16`), as its bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct F16(pub u16);

/// A bfloat16 value (`ml_dtypes.bfloat16`: the upper half of a float32), as its bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

/// A 16-bit float format: its mantissa bits (without the implicit one) and exponent bits.
#[derive(Debug, Clone, Copy)]
pub struct Format {
    pub mantissa: u32,
    pub exponent: u32,
}

pub const F16_FORMAT: Format = Format { mantissa: 10, exponent: 5 };
pub const BF16_FORMAT: Format = Format { mantissa: 7, exponent: 8 };

/// `x` rounded once to `fmt` (to nearest, ties to even; overflow to ±inf; gradual underflow to
/// the format's subnormals), as bits. NaN stays NaN, quiet, with the top of its payload.
///
/// Every step is exact in float64 except the one rounding (`round_ties_even` of `x` in units of
/// the target's quantum at `x`'s exponent), so a float32 input, widened exactly first, is
/// rounded once too.
pub fn narrow(x: f64, fmt: Format) -> u16 {
    let (m, ebits) = (fmt.mantissa, fmt.exponent);
    let sign = ((x.to_bits() >> 63) as u16) << 15;
    let exp_ones = ((1u16 << ebits) - 1) << m;
    if x.is_nan() {
        let payload = ((x.to_bits() >> (52 - m)) as u16) & ((1 << m) - 1);
        return sign | exp_ones | (1 << (m - 1)) | payload;
    }
    let bias = (1i32 << (ebits - 1)) - 1;
    let (emin, emax) = (1 - bias, bias);
    let a = x.abs();
    if a == 0.0 {
        return sign;
    }
    // Exponent of a (a float64 subnormal is far below any 16-bit format's range).
    let e = ((a.to_bits() >> 52) as i32 - 1023).max(emin);
    let quantum = pow2(e - m as i32);
    let v = (a / quantum).round_ties_even() * quantum; // the one rounding
    if v >= pow2(emax + 1) {
        return sign | exp_ones; // infinity
    }
    if v == 0.0 {
        return sign;
    }
    let ev = ((v.to_bits() >> 52) as i32 - 1023).max(emin);
    let field = if v < pow2(emin) { 0 } else { (ev + bias) as u16 };
    let mantissa = (v / pow2(ev - m as i32)) as u16 & ((1 << m) - 1);
    sign | (field << m) | mantissa
}

/// A float32 value rounded once to binary16: [`narrow`]'s answer, from integer operations on
/// the bits (the outputs of a 16-bit call are many: this is several times faster).
#[inline(always)]
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let a = bits & 0x7fff_ffff;
    if a > 0x7f80_0000 {
        return sign | 0x7e00 | ((a >> 13) & 0x3ff) as u16; // NaN: quiet, the top of its payload
    }
    if a >= 0x4780_0000 {
        return sign | 0x7c00; // 2^16 or more (infinity included): infinity
    }
    if a >= 0x3880_0000 {
        // Normal in binary16 (2^-14 or more): rebias the exponent (127 to 15), then round the
        // 23-bit mantissa to 10, ties to even; a carry moves into the exponent, up to infinity.
        let r = a - 0x3800_0000;
        return sign | ((r + 0xfff + ((r >> 13) & 1)) >> 13) as u16;
    }
    if a <= 0x3300_0000 {
        return sign; // 2^-25 or less: zero (2^-25 itself is the tie with the smallest subnormal)
    }
    // Subnormal in binary16: the value in units of 2^-24, rounded to nearest even.
    let m = (a & 0x7f_ffff) | 0x80_0000;
    let shift = 126 - (a >> 23);
    let (q, rem, half) = (m >> shift, m & ((1 << shift) - 1), 1 << (shift - 1));
    sign | (q + u32::from(rem > half || (rem == half && q & 1 == 1))) as u16
}

/// A float32 value rounded once to bfloat16 (the same exponent range: rounding the low 16 bits
/// of the bits to nearest even is exact arithmetic, carries included).
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return ((bits >> 16) | 0x0040) as u16; // NaN: quiet, the top of its payload
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// 2^e, exactly, for the exponents `narrow` needs (well inside float64's normal range).
fn pow2(e: i32) -> f64 {
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// A binary16 value widened to float32 (exact; a signalling NaN comes out quiet).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if man == 0 => sign,
        // Subnormal: man · 2^-24, exact in float32.
        0 => {
            let x = man as f32 * (1.0 / 16_777_216.0);
            return if sign == 0 { x } else { -x };
        }
        0x1f if man == 0 => sign | 0x7f80_0000,
        0x1f => sign | 0x7fc0_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// A bfloat16 value widened to float32 (exact: its bits are the upper half).
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Data as stored, for the explicit kernels, which widen 16-bit elements as they load them.
#[derive(Debug, Clone, Copy)]
pub enum Stored<'a, T> {
    /// Already the compute type.
    Compute(&'a [T]),
    F16(&'a [F16]),
    Bf16(&'a [Bf16]),
}

impl<'a, T> Stored<'a, T> {
    /// The elements from `i` on.
    #[inline(always)]
    pub fn from(self, i: usize) -> Self {
        match self {
            Stored::Compute(x) => Stored::Compute(&x[i..]),
            Stored::F16(x) => Stored::F16(&x[i..]),
            Stored::Bf16(x) => Stored::Bf16(&x[i..]),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Stored::Compute(x) => x.len(),
            Stored::F16(x) => x.len(),
            Stored::Bf16(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An element type the kernels read, and the float type they compute it in.
pub trait Storage: Copy + Send + Sync + Default + std::fmt::Debug + 'static {
    type Compute: AttnFloat;
    /// The value, exactly, in the compute type.
    fn widen(self) -> Self::Compute;
    /// `x` rounded once to this type.
    fn narrow(x: Self::Compute) -> Self;
    /// `dst[i] = narrow(src[i])`, with the CPU's conversion instructions where they exist.
    #[inline(always)]
    fn narrow_slice(src: &[Self::Compute], dst: &mut [std::mem::MaybeUninit<Self>]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            d.write(Self::narrow(x));
        }
    }
    /// The value in float64 (exact).
    #[inline(always)]
    fn widen_f64(self) -> f64 {
        crate::kernels::Float::to_f64(self.widen())
    }
    /// `x` rounded once to this type (not through the compute type: no double rounding).
    fn round_from_f64(x: f64) -> Self;
    /// The data as the compute type, where it is that type already (float32, float64).
    #[inline(always)]
    fn as_compute(data: &[Self]) -> Option<&[Self::Compute]> {
        match Self::stored(data) {
            Stored::Compute(x) => Some(x),
            _ => None,
        }
    }
    /// `dst[i] = src[i].widen()`, with the CPU's conversion instructions where they exist.
    fn widen_slice(src: &[Self], dst: &mut [Self::Compute]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s.widen();
        }
    }
    /// The data as bfloat16, where it is.
    #[inline(always)]
    fn as_bf16(data: &[Self]) -> Option<&[Bf16]> {
        match Self::stored(data) {
            Stored::Bf16(x) => Some(x),
            _ => None,
        }
    }
    /// The data as the explicit kernels take it.
    fn stored(data: &[Self]) -> Stored<'_, Self::Compute>;
    /// Whether the value is finite (neither infinite nor NaN).
    #[inline(always)]
    fn finite(self) -> bool {
        self.widen().is_finite()
    }
    /// The dtype's name, for messages.
    const NAME: &'static str;
}

macro_rules! compute_in_self {
    ($t:ty, $name:literal) => {
        impl Storage for $t {
            type Compute = $t;
            #[inline(always)]
            fn widen(self) -> $t {
                self
            }
            #[inline(always)]
            fn narrow(x: $t) -> $t {
                x
            }
            #[inline(always)]
            fn round_from_f64(x: f64) -> $t {
                x as $t
            }
            #[inline(always)]
            fn stored(data: &[$t]) -> Stored<'_, $t> {
                Stored::Compute(data)
            }
            const NAME: &'static str = $name;
        }
    };
}
compute_in_self!(f32, "float32");
compute_in_self!(f64, "float64");

impl Storage for F16 {
    type Compute = f32;
    #[inline(always)]
    fn widen(self) -> f32 {
        f16_to_f32(self.0)
    }
    #[inline(always)]
    fn narrow(x: f32) -> Self {
        F16(f32_to_f16(x))
    }
    #[inline(always)]
    fn round_from_f64(x: f64) -> Self {
        F16(narrow(x, F16_FORMAT))
    }
    #[inline(always)]
    fn stored(data: &[Self]) -> Stored<'_, f32> {
        Stored::F16(data)
    }
    #[inline(always)]
    fn finite(self) -> bool {
        self.0 & 0x7c00 != 0x7c00
    }
    #[inline(always)]
    fn widen_slice(src: &[Self], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        convert(src, dst, x86::f16_to_f32, |s| s.widen());
        #[cfg(not(target_arch = "x86_64"))]
        convert(src, dst, |s| s.widen());
    }
    #[inline(always)]
    fn narrow_slice(src: &[f32], dst: &mut [std::mem::MaybeUninit<Self>]) {
        #[cfg(target_arch = "x86_64")]
        convert(src, dst, x86::f32_to_f16, |x| std::mem::MaybeUninit::new(Self::narrow(x)));
        #[cfg(not(target_arch = "x86_64"))]
        convert(src, dst, |x| std::mem::MaybeUninit::new(Self::narrow(x)));
    }
    const NAME: &'static str = "float16";
}

impl Storage for Bf16 {
    type Compute = f32;
    #[inline(always)]
    fn widen(self) -> f32 {
        bf16_to_f32(self.0)
    }
    #[inline(always)]
    fn narrow(x: f32) -> Self {
        Bf16(f32_to_bf16(x))
    }
    #[inline(always)]
    fn round_from_f64(x: f64) -> Self {
        Bf16(narrow(x, BF16_FORMAT))
    }
    #[inline(always)]
    fn stored(data: &[Self]) -> Stored<'_, f32> {
        Stored::Bf16(data)
    }
    #[inline(always)]
    fn finite(self) -> bool {
        self.0 & 0x7f80 != 0x7f80
    }
    #[inline(always)]
    fn widen_slice(src: &[Self], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        convert(src, dst, x86::bf16_to_f32, |s| s.widen());
        #[cfg(not(target_arch = "x86_64"))]
        convert(src, dst, |s| s.widen());
    }
    #[inline(always)]
    fn narrow_slice(src: &[f32], dst: &mut [std::mem::MaybeUninit<Self>]) {
        #[cfg(target_arch = "x86_64")]
        convert(src, dst, x86::f32_to_bf16, |x| std::mem::MaybeUninit::new(Self::narrow(x)));
        #[cfg(not(target_arch = "x86_64"))]
        convert(src, dst, |x| std::mem::MaybeUninit::new(Self::narrow(x)));
    }
    const NAME: &'static str = "bfloat16";
}

/// `dst[i] = one(src[i])` for the elements of both, the first ones (as many as it reports) by
/// `simd`, with the CPU's conversion instructions, where the accelerated path runs.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn convert<S: Copy, D>(
    src: &[S],
    dst: &mut [D],
    simd: unsafe fn(&[S], &mut [D]) -> usize,
    one: impl Fn(S) -> D,
) {
    let n = src.len().min(dst.len());
    let mut done = 0;
    if crate::kernels::simd::accelerated() {
        // SAFETY: the conversions need AVX2 and F16C, which `accelerated` checks.
        done = unsafe { simd(&src[..n], &mut dst[..n]) };
    }
    for (d, &s) in dst[done..n].iter_mut().zip(&src[done..n]) {
        *d = one(s);
    }
}

/// `dst[i] = one(src[i])` (no conversion instructions on this architecture).
#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn convert<S: Copy, D>(src: &[S], dst: &mut [D], one: impl Fn(S) -> D) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = one(s);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Bf16, F16};
    use std::arch::x86_64::*;

    /// Widens the first multiple of 8 elements with `vcvtph2ps`; returns how many.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) fn f16_to_f32(src: &[F16], dst: &mut [f32]) -> usize {
        let n = src.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            // SAFETY: elements i..i + 8 lie inside both slices (i + 8 <= n <= len), and the
            // loads and stores are unaligned ones.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        n
    }

    /// Rounds the first multiple of 8 elements with `vcvtps2ph` (to nearest even); returns how
    /// many.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) fn f32_to_f16(src: &[f32], dst: &mut [std::mem::MaybeUninit<F16>]) -> usize {
        let n = src.len().min(dst.len()) / 8 * 8;
        for i in (0..n).step_by(8) {
            // SAFETY: elements i..i + 8 lie inside both slices (i + 8 <= n), unaligned loads
            // and stores; MaybeUninit<F16> is a u16.
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(src.as_ptr().add(i)));
                _mm_storeu_si128(dst.as_mut_ptr().add(i).cast(), h);
            }
        }
        n
    }

    /// Rounds the first multiple of 16 elements as [`super::f32_to_bf16`] does, sixteen at a
    /// time, where the CPU has AVX-512 (none otherwise); returns how many.
    #[target_feature(enable = "avx2")]
    pub(super) fn f32_to_bf16(src: &[f32], dst: &mut [std::mem::MaybeUninit<Bf16>]) -> usize {
        if !crate::kernels::simd::avx512() {
            return 0;
        }
        // SAFETY: the CPU has AVX-512F (checked just above).
        unsafe { f32_to_bf16_avx512(src, dst) }
    }

    #[target_feature(enable = "avx512f")]
    fn f32_to_bf16_avx512(src: &[f32], dst: &mut [std::mem::MaybeUninit<Bf16>]) -> usize {
        let n = src.len().min(dst.len()) / 16 * 16;
        let (magnitude, inf, half, one, quiet) = (
            _mm512_set1_epi32(0x7fff_ffff),
            _mm512_set1_epi32(0x7f80_0000),
            _mm512_set1_epi32(0x7fff),
            _mm512_set1_epi32(1),
            _mm512_set1_epi32(0x40),
        );
        for i in (0..n).step_by(16) {
            // SAFETY: elements i..i + 16 lie inside both slices (i + 16 <= n), unaligned loads
            // and stores; MaybeUninit<Bf16> is a u16.
            unsafe {
                let bits = _mm512_loadu_si512(src.as_ptr().add(i).cast());
                let top = _mm512_srli_epi32::<16>(bits);
                // To nearest even: add 0x7fff and the lowest kept bit, keep the top half.
                let up = _mm512_add_epi32(_mm512_add_epi32(bits, half), _mm512_and_si512(top, one));
                let nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, magnitude), inf);
                let r =
                    _mm512_mask_blend_epi32(nan, _mm512_srli_epi32::<16>(up), _mm512_or_si512(top, quiet));
                _mm256_storeu_si256(dst.as_mut_ptr().add(i).cast(), _mm512_cvtepi32_epi16(r));
            }
        }
        n
    }

    /// Widens the first multiple of 8 elements by shifting each into the upper half of 32 bits;
    /// returns how many.
    #[target_feature(enable = "avx2")]
    pub(super) fn bf16_to_f32(src: &[Bf16], dst: &mut [f32]) -> usize {
        let n = src.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            // SAFETY: as in `f16_to_f32`.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
                let w = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
                _mm256_storeu_si256(dst.as_mut_ptr().add(i).cast(), w);
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::simd;

    fn all<S: Storage>(make: fn(u16) -> S) -> Vec<S> {
        (0..=u16::MAX).map(make).collect()
    }

    #[test]
    fn widening_is_exact_and_the_same_on_every_path() {
        for fast in [false, true] {
            simd::set_enabled(fast);
            let src = all(F16);
            let mut dst = vec![0.0f32; src.len()];
            F16::widen_slice(&src, &mut dst);
            for (h, &x) in src.iter().zip(&dst) {
                let scalar = h.widen();
                assert_eq!(x.to_bits(), scalar.to_bits(), "{:#06x}", h.0);
                if !x.is_nan() {
                    // Exact: rounding back gives the same bits.
                    assert_eq!(F16::narrow(x), *h, "{:#06x}", h.0);
                }
            }
            let src = all(Bf16);
            let mut dst = vec![0.0f32; src.len()];
            Bf16::widen_slice(&src, &mut dst);
            for (b, &x) in src.iter().zip(&dst) {
                assert_eq!(x.to_bits(), (b.0 as u32) << 16);
            }
        }
        simd::set_enabled(true);
    }

    /// The float32 patterns where rounding to `m` mantissa bits is decided: every value of the
    /// 16-bit format, the midpoints between neighbours and the float32 values on either side of
    /// each, and a spread of every other kind of pattern.
    fn decisive_patterns(m: u32) -> Vec<u32> {
        let mut out: Vec<u32> = (0..u32::MAX).step_by(4099).collect();
        let unit = 1u32 << (23 - m);
        for k in 0..(1u32 << (9 + m)) {
            let base = k * unit; // 16-bit values and midpoints, as float32 bit patterns
            for x in [base, base + unit / 2] {
                for d in [0, 1, 2, u32::MAX, u32::MAX - 1] {
                    let p = x.wrapping_add(d);
                    out.extend([p, p | 0x8000_0000]);
                }
            }
        }
        out
    }

    #[test]
    fn fast_rounding_is_the_reference_rounding() {
        for bits in decisive_patterns(10) {
            let x = f32::from_bits(bits);
            assert_eq!(f32_to_f16(x), narrow(x as f64, F16_FORMAT), "{bits:#010x}");
        }
        for bits in decisive_patterns(7) {
            let x = f32::from_bits(bits);
            let want = narrow(x as f64, BF16_FORMAT);
            assert_eq!(f32_to_bf16(x), want, "{bits:#010x}");
        }
    }

    /// `S::narrow_slice` of `src` against `want`, on the accelerated path and off it.
    fn narrows_as<S: Storage<Compute = f32> + PartialEq + std::fmt::Debug>(
        src: &[f32],
        want: impl Fn(f32) -> S,
    ) {
        for fast in [false, true] {
            simd::set_enabled(fast);
            let mut dst = vec![std::mem::MaybeUninit::<S>::uninit(); src.len()];
            S::narrow_slice(src, &mut dst);
            for (x, d) in src.iter().zip(&dst) {
                // SAFETY: narrow_slice wrote every element.
                assert_eq!(unsafe { d.assume_init() }, want(*x), "{:#010x}", x.to_bits());
            }
        }
        simd::set_enabled(true);
    }

    #[test]
    fn the_rounding_instruction_rounds_as_the_portable_code() {
        let src: Vec<f32> = decisive_patterns(10).into_iter().map(f32::from_bits).collect();
        narrows_as(&src, |x| F16(f32_to_f16(x)));
    }

    #[test]
    fn the_vector_bfloat16_rounding_is_the_portable_rounding() {
        let mut src: Vec<f32> = decisive_patterns(7).into_iter().map(f32::from_bits).collect();
        src.extend([f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::from_bits(0x7f80_0001)]);
        src.extend((0..4096u32).map(|i| f32::from_bits(i.wrapping_mul(0x9e37_79b9))));
        narrows_as(&src, |x| Bf16(f32_to_bf16(x)));
    }

    #[test]
    fn binary16_reference_values() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x8001), -(2f32.powi(-24)));
        assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert!(f16_to_f32(0x7c01).is_nan());
        assert!(f16_to_f32(0x8000).is_sign_negative() && f16_to_f32(0x8000) == 0.0);
    }

    #[test]
    fn rounding_is_once_to_nearest_even() {
        let f16 = |x: f64| narrow(x, F16_FORMAT);
        let bf16 = |x: f64| narrow(x, BF16_FORMAT);
        assert_eq!(f16(1.0), 0x3c00);
        assert_eq!(f16(1.0 + 2f64.powi(-11)), 0x3c00); // a tie: to even
        assert_eq!(f16(1.0 + 3.0 * 2f64.powi(-11)), 0x3c02); // a tie: to even, upwards
        assert_eq!(f16(1.0 + 2f64.powi(-11) + 2f64.powi(-40)), 0x3c01); // just above the tie
        assert_eq!(f16(65504.0), 0x7bff);
        assert_eq!(f16(65519.99), 0x7bff);
        assert_eq!(f16(65520.0), 0x7c00); // the tie with 2^16 rounds to infinity
        assert_eq!(f16(-1e10), 0xfc00);
        assert_eq!(f16(2f64.powi(-25)), 0x0000); // half the smallest subnormal: a tie, to even (0)
        assert_eq!(f16(2f64.powi(-25) * 1.0000001), 0x0001);
        assert_eq!(f16(3.0 * 2f64.powi(-25)), 0x0002);
        assert_eq!(f16(2f64.powi(-14) - 2f64.powi(-25)), 0x0400); // rounds up to the smallest normal
        assert_eq!(f16(-0.0), 0x8000);
        assert_eq!(f16(f64::NAN) & 0x7e00, 0x7e00);
        assert_eq!(bf16(1.0), 0x3f80);
        assert_eq!(bf16(1.0 + 2f64.powi(-8)), 0x3f80); // a tie: to even
        assert_eq!(bf16(1.0 + 3.0 * 2f64.powi(-8)), 0x3f82);
        // Rounded once from float64: float32 first would make this a tie and round it down.
        assert_eq!(bf16(1.0 + 2f64.powi(-8) + 2f64.powi(-30)), 0x3f81);
        assert_eq!(bf16(f32::MAX as f64), 0x7f80);
        assert_eq!(bf16(3.4e38), 0x7f80);
        assert_eq!(bf16(-3.3e38), 0xff78); // 1.9395 · 2^127: mantissa 120/128
        assert_eq!(bf16(1e-40), 0x0001); // 1.09 units of the smallest subnormal, 2^-133
        assert_eq!(bf16(f32::from_bits(1) as f64), 0x0000); // far below the smallest subnormal
        assert_eq!(bf16(f32::from_bits(0x0001_0000) as f64), 0x0001); // the smallest subnormal
    }
}
