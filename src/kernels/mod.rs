//! Pure-Rust kernels: slices and dimensions in, output slices out.
//!
//! Every kernel validates what memory safety and the documented semantics need and returns a
//! [`KernelError`](crate::KernelError) otherwise; none panics on user input. Parallel kernels split
//! their output into pieces whose contents do not depend on the number of threads, so results are
//! bitwise identical for any thread count.

pub mod attention;
pub mod block;
pub mod embedding;
pub mod exp;
pub mod linear;
pub mod output;
pub mod peak;
pub mod positional;
pub mod rope;
pub mod simd;
pub mod storage;
pub mod trig;

use crate::pool::Par;

/// The float types the kernels compute in.
pub trait Float:
    Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + std::fmt::Debug
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + 'static
{
    /// Rounds a float64 value to this type (round to nearest even).
    fn from_f64(x: f64) -> Self;
    /// Converts to float64 (exact).
    fn to_f64(self) -> f64;
    fn is_nan(self) -> bool;
}

impl Float for f32 {
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
}

impl Float for f64 {
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
}

/// Below this many output elements a kernel runs on the calling thread: waking the pool costs
/// 10–100 µs, more than the work itself.
pub const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;

/// Rows per parallel block: about 4096 elements (16 KiB of float32), big enough to amortise
/// scheduling and small enough to balance two to sixteen threads.
fn rows_per_block(row_len: usize) -> usize {
    (4096 / row_len.max(1)).max(1)
}

/// The work of a row-parallel kernel: writing one block of consecutive output rows.
///
/// `rows` and everything it calls must be `#[inline(always)]`: [`simd`] compiles it inside a
/// function built for AVX2, which only happens to code inlined there. For the same reason the loops
/// in `rows` are `for` loops, not `Iterator::for_each`: `for_each` goes through `fold`, which LLVM
/// may leave out of line and so compile for the baseline instruction set.
pub(crate) trait Rows<T>: Sync {
    /// Writes output rows `first..` into `block` (a whole number of rows).
    fn rows(&self, first: usize, block: &mut [T]);
}

/// Runs `kernel` over consecutive blocks of `row_len`-element rows of `out`.
///
/// The blocks are fixed by `out.len()` and `row_len` only, and each row is written by exactly one
/// call, so the result is the same whether the blocks run on one thread or many.
pub(crate) fn for_each_row_block<T: Send, K: Rows<T>>(
    out: &mut [T],
    row_len: usize,
    par: Par<'_>,
    kernel: &K,
) {
    row_blocks(out, row_len, par, kernel, simd::rows)
}

/// [`for_each_row_block`] with each block run through [`simd::rows_wide`] (AVX-512 where there
/// is, for float64 vector code).
pub(crate) fn for_each_row_block_wide<T: Send, K: Rows<T>>(
    out: &mut [T],
    row_len: usize,
    par: Par<'_>,
    kernel: &K,
) {
    row_blocks(out, row_len, par, kernel, simd::rows_wide)
}

fn row_blocks<T: Send, K: Rows<T>>(
    out: &mut [T],
    row_len: usize,
    par: Par<'_>,
    kernel: &K,
    run: fn(&K, usize, &mut [T]),
) {
    if out.is_empty() || row_len == 0 {
        return;
    }
    let rows = rows_per_block(row_len);
    let par = if out.len() >= PARALLEL_MIN_ELEMENTS { par } else { par.sequential() };
    let per_task = blocks_per_task(out.len().div_ceil(rows * row_len));
    let mut tasks: Vec<_> = out.chunks_mut(per_task * rows * row_len).enumerate().collect();
    par.for_each(&mut tasks, |(t, task)| {
        for (i, block) in task.chunks_mut(rows * row_len).enumerate() {
            run(kernel, (*t * per_task + i) * rows, block);
        }
    });
}

/// Blocks per task for `blocks` blocks: at most about 256 tasks, so that taking a task (a lock)
/// and asking whether the call must stop cost little against the work.
fn blocks_per_task(blocks: usize) -> usize {
    blocks.div_ceil(256).max(1)
}

/// [`Rows`] for kernels with two outputs of the same shape.
pub(crate) trait RowsPair<T>: Sync {
    /// Writes rows `first..` of both outputs into `a` and `b` (a whole number of rows each).
    fn rows(&self, first: usize, a: &mut [T], b: &mut [T]);
}

/// [`for_each_row_block`] over two outputs of the same shape, blocked identically; with `wide`,
/// each block runs through [`simd::rows_pair_wide`] (AVX-512 where there is, for float64
/// vector code), else [`simd::rows_pair`].
pub(crate) fn for_each_row_block_pair<T: Send, K: RowsPair<T>>(
    a: &mut [T],
    b: &mut [T],
    row_len: usize,
    par: Par<'_>,
    kernel: &K,
    wide: bool,
) {
    let run = if wide { simd::rows_pair_wide } else { simd::rows_pair };
    if a.is_empty() || row_len == 0 {
        return;
    }
    let rows = rows_per_block(row_len);
    let block = rows * row_len;
    let par = if a.len() >= PARALLEL_MIN_ELEMENTS { par } else { par.sequential() };
    let per_task = blocks_per_task(a.len().div_ceil(block));
    let mut tasks: Vec<_> =
        a.chunks_mut(per_task * block).zip(b.chunks_mut(per_task * block)).enumerate().collect();
    par.for_each(&mut tasks, |(t, (x, y))| {
        for (i, (x, y)) in x.chunks_mut(block).zip(y.chunks_mut(block)).enumerate() {
            run(kernel, (*t * per_task + i) * rows, x, y);
        }
    });
}
