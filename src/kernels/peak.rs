//! The instruction peaks the benchmark reports attention's rates against: float32 fused
//! multiply-adds and bfloat16 dot products (`vdpbf16ps`) on one core, from a loop of independent
//! chains in registers (no memory traffic), timed.

use std::time::Instant;

/// Floating-point operations per second of one core's fastest float32 multiply-add (AVX-512 or
/// AVX2 + FMA) or, with `bf16`, of `vdpbf16ps` (two multiply-adds per float32 lane); `None`
/// where the CPU has neither (or the accelerated path is disabled).
pub fn peak_flops(bf16: bool) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::kernels::simd;
        let (flops_per_loop, run): (f64, fn(u64) -> f32) = if bf16 {
            if !(simd::avx512() && std::arch::is_x86_feature_detected!("avx512bf16")) {
                return None;
            }
            // SAFETY: the CPU has AVX-512F and AVX512_BF16 (checked above).
            (12.0 * 16.0 * 4.0, |n| unsafe { x86::dpbf16_loop(n) })
        } else if simd::avx512() {
            // SAFETY: the CPU has AVX-512F (`avx512`).
            (12.0 * 16.0 * 2.0, |n| unsafe { x86::fma512_loop(n) })
        } else if simd::accelerated() {
            // SAFETY: the CPU has AVX2 and FMA (`accelerated`).
            (12.0 * 8.0 * 2.0, |n| unsafe { x86::fma256_loop(n) })
        } else {
            return None;
        };
        let mut best = 0.0f64;
        let mut sink = 0.0f32;
        for _ in 0..5 {
            let n = 2_000_000;
            let start = Instant::now();
            sink += run(n);
            let seconds = start.elapsed().as_secs_f64();
            best = best.max(n as f64 * flops_per_loop / seconds);
        }
        std::hint::black_box(sink);
        Some(best)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = bf16;
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `n` rounds of 12 independent `vdpbf16ps` chains.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) fn dpbf16_loop(n: u64) -> f32 {
        // SAFETY: a vector of 32-bit words and one of bfloat16 pairs are the same 64 bytes.
        let (a, b) = unsafe {
            (
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3f80_3f80)),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(std::hint::black_box(0))),
            )
        };
        let mut acc = [_mm512_setzero_ps(); 12];
        for _ in 0..n {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, a, b);
            }
        }
        acc.iter().fold(0.0, |s, &x| s + _mm512_reduce_add_ps(x))
    }

    /// `n` rounds of 12 independent 16-lane FMA chains.
    #[target_feature(enable = "avx512f")]
    pub(super) fn fma512_loop(n: u64) -> f32 {
        let (a, b) = (_mm512_set1_ps(1.0), _mm512_set1_ps(std::hint::black_box(0.0)));
        let mut acc = [_mm512_setzero_ps(); 12];
        for _ in 0..n {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(a, b, *x);
            }
        }
        acc.iter().fold(0.0, |s, &x| s + _mm512_reduce_add_ps(x))
    }

    /// `n` rounds of 12 independent 8-lane FMA chains.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn fma256_loop(n: u64) -> f32 {
        let (a, b) = (_mm256_set1_ps(1.0), _mm256_set1_ps(std::hint::black_box(0.0)));
        let mut acc = [_mm256_setzero_ps(); 12];
        for _ in 0..n {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(a, b, *x);
            }
        }
        let mut lanes = [0.0f32; 8];
        acc.iter().fold(0.0, |s, &x| {
            // SAFETY: writes the eight floats of `lanes`.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), x) };
            s + lanes.iter().sum::<f32>()
        })
    }
}
