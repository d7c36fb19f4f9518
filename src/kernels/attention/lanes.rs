//! The element types the explicit kernels read keys and values in, widened to float32 lanes as
//! they are loaded: float32 as it is, float16 with the conversion instruction (`vcvtph2ps`),
//! bfloat16 by moving its bits to the upper half of each lane. Every widening is exact, so a
//! kernel computes the same bits from a 16-bit input as from the same values in float32; and
//! reading 16 bits per value halves the bytes a memory-bound decode call moves.

use std::arch::x86_64::*;

use crate::kernels::storage::{Bf16, F16};

/// An element type with loads into float32 vectors.
pub(super) trait Lanes: Copy + Default {
    /// Eight elements as float32.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C, and the caller is compiled for them.
    unsafe fn load8(x: &[Self; 8]) -> __m256;

    /// Sixteen elements from `p` as float32.
    ///
    /// # Safety
    /// The CPU has AVX-512F, the caller is compiled for it, and `p` points to 16 readable
    /// elements.
    unsafe fn load16(p: *const Self) -> __m512;
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn load8(x: &[f32; 8]) -> __m256 {
        // SAFETY: reads the eight floats of `x` (AVX: the caller's contract).
        unsafe { _mm256_loadu_ps(x.as_ptr()) }
    }

    #[inline(always)]
    unsafe fn load16(p: *const f32) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe { _mm512_loadu_ps(p) }
    }
}

impl Lanes for F16 {
    #[inline(always)]
    unsafe fn load8(x: &[F16; 8]) -> __m256 {
        // SAFETY: reads the 16 bytes of `x` (F16C: the caller's contract).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().cast())) }
    }

    #[inline(always)]
    unsafe fn load16(p: *const F16) -> __m512 {
        // SAFETY: the caller's contract (32 bytes at p).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
}

impl Lanes for Bf16 {
    #[inline(always)]
    unsafe fn load8(x: &[Bf16; 8]) -> __m256 {
        // SAFETY: reads the 16 bytes of `x` (AVX2: the caller's contract).
        unsafe {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(x.as_ptr().cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
        }
    }

    #[inline(always)]
    unsafe fn load16(p: *const Bf16) -> __m512 {
        // SAFETY: the caller's contract (32 bytes at p).
        unsafe {
            let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
        }
    }
}
