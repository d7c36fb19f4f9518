//! Runtime choice of instruction set for the kernels' inner loops.
//!
//! The crate is compiled for the baseline of its target (SSE2 on x86-64). [`dispatch`] runs a
//! closure inside a function compiled for AVX2 and FMA when the CPU has them, so the loops LLVM
//! vectorises in it (inlined there) use 256-bit registers. Rust never contracts `a * b + c` into an
//! FMA on its own, so every path computes the same operations in the same order and gives the same
//! bits; the tests run each kernel on both paths ([`set_enabled`]).

use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Allows (`true`, the default) or forbids the accelerated path, so tests can run the portable one.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Whether [`dispatch`] uses AVX2 + FMA code on this CPU.
pub fn accelerated() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        ENABLED.load(Ordering::Relaxed)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs `f`, compiled for AVX2 + FMA when [`accelerated`], else for the baseline.
#[inline(always)]
pub fn dispatch<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if accelerated() {
        // SAFETY: the CPU supports AVX2 and FMA, checked by `accelerated` just above.
        return unsafe { avx2(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}
