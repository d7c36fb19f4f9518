//! Fresh output buffers, written once: how Rust code calls the kernels.
//!
//! Kernels write into `&mut [MaybeUninit<T>]` and promise to write every element; [`collect`]
//! allocates such a buffer and turns it into a `Vec<T>` once the kernel has filled it. Zero-filling
//! first would cost a whole extra pass over memory: for a memory-bound kernel such as embedding
//! lookup, that is a third of the time. (The Python binding allocates its outputs through NumPy
//! instead, in `py/arrays.rs`, so they get NumPy's allocator; the kernels' tests use this module.)

use std::mem::MaybeUninit;

use crate::error::KernelError;

/// Allocates `n` elements (an `Allocation` error naming `arg` if that fails), lets `fill` write
/// them, and returns them.
///
/// `fill` must write every element when it returns `Ok`. Every kernel in this crate does: each
/// writes its output through [`for_each_row_block`](crate::kernels) blocks that tile it exactly, and
/// each kernel's tests compare whole outputs with a reference.
pub fn collect<T>(
    arg: &'static str,
    n: usize,
    fill: impl FnOnce(&mut [MaybeUninit<T>]) -> Result<(), KernelError>,
) -> Result<Vec<T>, KernelError> {
    let mut out = Vec::new();
    out.try_reserve_exact(n).map_err(|_| KernelError::Allocation { arg, elements: Some(n) })?;
    fill(&mut out.spare_capacity_mut()[..n])?;
    // SAFETY: capacity >= n (reserved above) and `fill` returned Ok, so it initialised all n
    // elements (the contract above).
    unsafe { out.set_len(n) };
    Ok(out)
}

/// [`collect`] for a kernel with two outputs of `n` elements each.
pub fn collect_pair<T>(
    args: (&'static str, &'static str),
    n: usize,
    fill: impl FnOnce(&mut [MaybeUninit<T>], &mut [MaybeUninit<T>]) -> Result<(), KernelError>,
) -> Result<(Vec<T>, Vec<T>), KernelError> {
    let mut second = Vec::new();
    let first = collect(args.0, n, |a| {
        second = collect(args.1, n, |b| fill(a, b))?;
        Ok(())
    })?;
    Ok((first, second))
}
