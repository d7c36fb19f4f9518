//! Runtime choice of instruction set for the kernels' inner loops, prefetch hints, and [`array()`]
//! for their small arrays.
//!
//! The crate is compiled for the baseline of its target (SSE2 on x86-64). `task` runs a kernel's
//! work inside a function compiled for AVX2 and FMA when the CPU has them; the work is
//! `#[inline(always)]`, so its loops are compiled there and LLVM vectorises them with 256-bit
//! registers. Rust never contracts `a * b + c` into an FMA on its own, so both paths compute the
//! same operations in the same order and give the same bits; the tests run each kernel on both
//! ([`set_enabled`]).
//!
//! Attention also has explicit AVX2 + FMA kernels for float32 (`attention/avx2.rs`, reached through
//! `attention/fast.rs` and `attention/x86.rs`), three of them also in AVX-512 (`attention/avx512.rs`,
//! where [`avx512`]), which compute the same operations as the generic code in the same order, and
//! bfloat16 dot-product kernels (`attention/avx512bf16.rs`) whose arithmetic `attention/dot16.rs`
//! emulates exactly.
//!
//! `unsafe` code lives here (calling the AVX2 functions, prefetch), in the attention kernels'
//! files (`x86.rs` entering the kernels; `avx2.rs`, `avx512.rs`, `avx512bf16.rs` and `lanes.rs`
//! with vector loads and stores), in `linear.rs`'s `x86` module (the `vdpbf16ps` and AVX-512 FMA
//! tiles of [`Bf16Linear`'s and `F32Linear`'s products](super::linear)), in `storage.rs` (the
//! 16-bit conversions), in [`output`](super::output) (a buffer's length set after a kernel filled
//! it) and in the binding's `arrays.rs` and `half.rs` (a fresh NumPy array's memory handed to a
//! kernel; the 16-bit dtypes' descriptors), each block with a `SAFETY` note.

use crate::kernels::{Rows, RowsPair};
use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(true);
static AVX512: AtomicBool = AtomicBool::new(true);

/// Allows (`true`, the default) or forbids the accelerated path, so tests can run the portable one.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Whether the kernels run their AVX2 + FMA code on this CPU (which then has F16C too: every CPU
/// with AVX2 does, and the 16-bit conversions ask for it).
pub fn accelerated() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        ENABLED.load(Ordering::Relaxed)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Allows (`true`, the default) or forbids the AVX-512 kernels alone, so tests can compare them
/// with the AVX2 ones.
pub fn set_avx512_enabled(enabled: bool) {
    AVX512.store(enabled, Ordering::Relaxed);
}

/// Whether the kernels that have an AVX-512 form (attention's float32 matrix products) run it:
/// the CPU has AVX-512F and AVX-512VL (the 32 registers at 256 bits too), and it and the
/// accelerated path are enabled.
pub fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        accelerated()
            && AVX512.load(Ordering::Relaxed)
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A unit of kernel work: `run` executes inside a function compiled for AVX2 + FMA when
/// [`accelerated`]. `run` and everything it calls must be `#[inline(always)]`, with `for` loops,
/// to be compiled there. Row kernels ([`Rows`], [`RowsPair`]) reach it through [`rows`] and
/// [`rows_pair`]; attention's per-head tasks implement it directly.
pub(crate) trait Task {
    fn run(&mut self);
}

/// Runs `task`, compiled for AVX2 + FMA when [`accelerated`]: the one place that does.
#[inline(always)]
pub(crate) fn task<K: Task>(task: &mut K) {
    #[cfg(target_arch = "x86_64")]
    if accelerated() {
        // SAFETY: the CPU supports AVX2 and FMA, checked by `accelerated` just above.
        return unsafe { task_avx2(task) };
    }
    task.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn task_avx2<K: Task>(task: &mut K) {
    task.run()
}

/// Runs `task` compiled for AVX-512 (F, VL) + FMA when [`avx512`], else as [`task`] does: for
/// float64 vector code that gains from eight lanes (and 32 registers) per instruction, the
/// elementwise functions of `block`. The operations, and so the bits, are the same either way.
#[inline(always)]
pub(crate) fn task_wide<K: Task>(task: &mut K) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU supports AVX-512F/VL (checked by `avx512`) and AVX2 + FMA (implied
        // by `accelerated`, which `avx512` requires).
        return unsafe { task_avx512(task) };
    }
    self::task(task)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
fn task_avx512<K: Task>(task: &mut K) {
    task.run()
}

/// One block of a [`Rows`] kernel, as a [`Task`].
struct RowsTask<'a, K, T> {
    kernel: &'a K,
    first: usize,
    block: &'a mut [T],
}

impl<T, K: Rows<T>> Task for RowsTask<'_, K, T> {
    #[inline(always)]
    fn run(&mut self) {
        self.kernel.rows(self.first, self.block)
    }
}

/// One block of a [`RowsPair`] kernel, as a [`Task`].
struct RowsPairTask<'a, K, T> {
    kernel: &'a K,
    first: usize,
    a: &'a mut [T],
    b: &'a mut [T],
}

impl<T, K: RowsPair<T>> Task for RowsPairTask<'_, K, T> {
    #[inline(always)]
    fn run(&mut self) {
        self.kernel.rows(self.first, self.a, self.b)
    }
}

/// Runs `kernel.rows(first, block)` through [`task`].
#[inline(always)]
pub(crate) fn rows<T, K: Rows<T>>(kernel: &K, first: usize, block: &mut [T]) {
    task(&mut RowsTask { kernel, first, block })
}

/// Runs `kernel.rows(first, block)` through [`task_wide`].
#[inline(always)]
pub(crate) fn rows_wide<T, K: Rows<T>>(kernel: &K, first: usize, block: &mut [T]) {
    task_wide(&mut RowsTask { kernel, first, block })
}

/// Runs `kernel.rows(first, a, b)` through [`task`].
#[inline(always)]
pub(crate) fn rows_pair<T, K: RowsPair<T>>(kernel: &K, first: usize, a: &mut [T], b: &mut [T]) {
    task(&mut RowsPairTask { kernel, first, a, b })
}

/// Runs `kernel.rows(first, a, b)` through [`task_wide`].
#[inline(always)]
pub(crate) fn rows_pair_wide<T, K: RowsPair<T>>(kernel: &K, first: usize, a: &mut [T], b: &mut [T]) {
    task_wide(&mut RowsPairTask { kernel, first, a, b })
}

/// Asks the CPU to start loading `data` into cache: a hint for gathers of rows from tables too big
/// for the cache, issued a few rows ahead of their use. It never faults and changes no value.
#[inline(always)]
pub fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let base = data.as_ptr().cast::<i8>();
        for offset in (0..std::mem::size_of_val(data)).step_by(64) {
            // SAFETY: a prefetch is only a hint: it never faults and has no effect on memory
            // contents; the address is inside `data` in any case.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// `[f(0), f(1), …, f(N − 1)]`, called in that order: `std::array::from_fn` as a loop that is
/// always inlined. The kernels build their small arrays (a tile's rows, strips and vectors) with
/// it: LLVM left some `from_fn` calls out of line, a call per tile in the hottest loops.
#[inline(always)]
pub fn array<T: Copy, const N: usize>(mut f: impl FnMut(usize) -> T) -> [T; N] {
    let mut out = [f(0); N];
    for (i, x) in out.iter_mut().enumerate().skip(1) {
        *x = f(i);
    }
    out
}
