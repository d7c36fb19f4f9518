//! Embedding lookup and bag reductions.
//!
//! Formulas, with `weight` a row-major `(rows, dim)` table:
//!
//! * lookup: `out[n, :] = weight[ids[n], :]`, or `weight[ids[n], :] * scale` when a scale is given.
//!   Without a scale the rows are copied bit for bit (NaN payloads and -0.0 kept).
//! * bags: bag `b` holds `ids[bounds[b]..bounds[b + 1]]`; entries equal to `padding_idx` are left
//!   out. `sum` adds the rows (each times `per_sample_weights[j]` when given), `mean` divides that
//!   sum by the number of entries left, `max` takes the element-wise maximum (NaN wins). A bag with
//!   no entries left is all zeros. Sums are accumulated in float64 in bag order and rounded once.
//!
//! Memory: `ids` flat, `out` row-major `(ids.len(), dim)` for lookup and `(bags, dim)` for bags.
//! Parallel split: blocks of output rows, each written by one task, so any thread count gives the
//! same bits.

use std::mem::MaybeUninit;

use crate::error::{expect_len, KernelError};
use crate::kernels::storage::Storage;
use crate::kernels::{for_each_row_block, simd, Rows};
use crate::pool::Par;

/// An integer type usable as a token id.
pub trait TokenId: Copy + Send + Sync {
    /// The id as a row index, or `None` when it is negative or does not fit in `usize`.
    fn to_row(self) -> Option<usize>;
    /// The id's value, for error messages.
    fn value(self) -> i128;
}

macro_rules! impl_token_id {
    ($($t:ty),*) => {$(
        impl TokenId for $t {
            #[inline(always)]
            fn to_row(self) -> Option<usize> {
                usize::try_from(self).ok()
            }
            fn value(self) -> i128 {
                self as i128
            }
        }
    )*};
}
impl_token_id!(i8, i16, i32, i64, u8, u16, u32, u64);

/// Rows are prefetched this many ids ahead of their use: rows picked at random from a table larger
/// than the cache cost a memory round trip each, which the prefetch overlaps with the work on the
/// rows before them.
const PREFETCH_AHEAD: usize = 4;
const PREFETCH_BYTES: usize = 256;

/// Bag entries whose rows are summed in one pass over the columns.
const GROUP: usize = 4;

/// How [`embedding_bag`] reduces the rows of a bag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BagMode {
    Sum,
    Mean,
    Max,
}

fn check_table<T>(weight: &[T], rows: usize, dim: usize) -> Result<(), KernelError> {
    match rows.checked_mul(dim) {
        Some(n) if n == weight.len() => Ok(()),
        _ => Err(KernelError::invalid(
            "weight",
            format!("expected {rows} x {dim} = rows * dim elements, got {}", weight.len()),
        )),
    }
}

/// Converts every id to a row index, or reports the first one outside `[0, rows)`.
pub fn rows_of<I: TokenId>(ids: &[I], rows: usize) -> Result<Vec<usize>, KernelError> {
    ids.iter()
        .enumerate()
        .map(|(flat_index, &id)| match id.to_row() {
            Some(r) if r < rows => Ok(r),
            _ => Err(KernelError::IndexOutOfRange { arg: "ids", flat_index, value: id.value(), size: rows }),
        })
        .collect()
}

/// Embedding lookup: `out[n, :] = weight[ids[n], :] (* scale)`. `out` has `ids.len() * dim` elements.
///
/// A 16-bit table's rows are copied bit for bit; with `scale`, each element is widened, multiplied
/// in the compute type and rounded once.
pub fn embedding<T: Storage, I: TokenId>(
    ids: &[I],
    weight: &[T],
    rows: usize,
    dim: usize,
    scale: Option<T::Compute>,
    out: &mut [MaybeUninit<T>],
    par: Par<'_>,
) -> Result<(), KernelError> {
    check_table(weight, rows, dim)?;
    expect_len("out", out.len(), ids.len().checked_mul(dim))?;
    let row_index = rows_of(ids, rows)?;
    let table = Table { weight, row_index: &row_index, dim };
    for_each_row_block(out, dim, par, &Lookup { table, scale });
    Ok(())
}

/// Rows of `weight` picked by validated row indices.
struct Table<'a, T> {
    weight: &'a [T],
    row_index: &'a [usize],
    dim: usize,
}

impl<T> Table<'_, T> {
    /// The row that entry `n` picks.
    #[inline(always)]
    fn row(&self, n: usize) -> &[T] {
        let r = self.row_index[n];
        &self.weight[r * self.dim..(r + 1) * self.dim]
    }

    /// Starts loading the row that entry `n + PREFETCH_AHEAD` picks, if there is one: its first
    /// `PREFETCH_BYTES`, enough to start the memory access and the hardware's streaming of the
    /// rest, for a few instructions (a prefetch of every line costs a fifth of a cached lookup).
    #[inline(always)]
    fn prefetch_ahead(&self, n: usize) {
        if n + PREFETCH_AHEAD < self.row_index.len() {
            let row = self.row(n + PREFETCH_AHEAD);
            simd::prefetch(&row[..row.len().min(PREFETCH_BYTES / std::mem::size_of::<T>())]);
        }
    }
}

struct Lookup<'a, T: Storage> {
    table: Table<'a, T>,
    scale: Option<T::Compute>,
}

impl<T: Storage> Rows<MaybeUninit<T>> for Lookup<'_, T> {
    #[inline(always)]
    fn rows(&self, first: usize, block: &mut [MaybeUninit<T>]) {
        for (k, dst) in block.chunks_exact_mut(self.table.dim).enumerate() {
            let n = first + k;
            self.table.prefetch_ahead(n);
            let src = self.table.row(n);
            match self.scale {
                None => {
                    dst.write_copy_of_slice(src);
                }
                Some(s) => {
                    for (d, &w) in dst.iter_mut().zip(src) {
                        d.write(T::narrow(w.widen() * s));
                    }
                }
            }
        }
    }
}

/// The bags of [`embedding_bag`]: `bounds` has one more entry than there are bags; bag `b` is
/// `ids[bounds[b]..bounds[b + 1]]`.
pub struct Bags<'a, I> {
    pub ids: &'a [I],
    pub bounds: &'a [usize],
    pub per_sample_weights: Option<&'a [f64]>,
    pub padding_idx: Option<usize>,
}

/// Reduces each bag of rows to one row of `out` (`(bounds.len() - 1) * dim` elements), in
/// float64, each element rounded once to `T`.
pub fn embedding_bag<T: Storage, I: TokenId>(
    bags: &Bags<'_, I>,
    weight: &[T],
    rows: usize,
    dim: usize,
    mode: BagMode,
    out: &mut [MaybeUninit<T>],
    par: Par<'_>,
) -> Result<(), KernelError> {
    check_table(weight, rows, dim)?;
    let bounds = bags.bounds;
    let n_bags = bounds
        .len()
        .checked_sub(1)
        .ok_or_else(|| KernelError::invalid("offsets", "bounds must hold at least one entry (bags + 1)"))?;
    expect_len("out", out.len(), n_bags.checked_mul(dim))?;
    if bounds[0] != 0 || bounds[n_bags] != bags.ids.len() || bounds.windows(2).any(|w| w[0] > w[1]) {
        return Err(KernelError::invalid(
            "offsets",
            format!("must start at 0, never decrease and end at len(ids) = {}", bags.ids.len()),
        ));
    }
    if let Some(w) = bags.per_sample_weights {
        if mode != BagMode::Sum {
            return Err(KernelError::invalid("per_sample_weights", "is only supported with mode='sum'"));
        }
        if w.len() != bags.ids.len() {
            return Err(KernelError::invalid(
                "per_sample_weights",
                format!("has {} entries, expected one per id ({})", w.len(), bags.ids.len()),
            ));
        }
    }
    if let Some(p) = bags.padding_idx {
        if p >= rows {
            return Err(KernelError::invalid("padding_idx", format!("{p} is outside [0, {rows})")));
        }
    }
    let row_index = rows_of(bags.ids, rows)?;
    let table = Table { weight, row_index: &row_index, dim };
    let kernel = Reduce {
        table,
        bounds,
        per_sample_weights: bags.per_sample_weights,
        padding_idx: bags.padding_idx,
        mode,
    };
    for_each_row_block(out, dim, par, &kernel);
    Ok(())
}

struct Reduce<'a, T> {
    table: Table<'a, T>,
    bounds: &'a [usize],
    per_sample_weights: Option<&'a [f64]>,
    padding_idx: Option<usize>,
    mode: BagMode,
}

impl<T: Storage> Rows<MaybeUninit<T>> for Reduce<'_, T> {
    #[inline(always)]
    fn rows(&self, first: usize, block: &mut [MaybeUninit<T>]) {
        let mut acc = vec![0.0f64; self.table.dim];
        for (k, dst) in block.chunks_exact_mut(self.table.dim).enumerate() {
            let b = first + k;
            let kept = self.reduce(self.bounds[b]..self.bounds[b + 1], &mut acc);
            let divisor = match (self.mode, kept) {
                (BagMode::Mean, n) if n > 0 => n as f64,
                _ => 1.0,
            };
            for (d, &a) in dst.iter_mut().zip(&acc) {
                d.write(T::round_from_f64(a / divisor));
            }
        }
    }
}

impl<T: Storage> Reduce<'_, T> {
    /// Reduces the entries `range` of one bag into `acc` (float64; zeros for an empty bag) and
    /// returns how many entries were not padding.
    ///
    /// Entries are taken in groups of up to [`GROUP`], whose rows are read together in one pass
    /// over the columns: several rows stream from memory at once, and `acc` is loaded and stored
    /// once per group. For every column the additions still happen in bag order, so the result is
    /// the same as adding one row at a time.
    #[inline(always)]
    fn reduce(&self, range: std::ops::Range<usize>, acc: &mut [f64]) -> usize {
        acc.fill(0.0);
        let (mut kept, mut group, mut len) = (0, [0usize; GROUP], 0);
        for j in range {
            self.table.prefetch_ahead(j);
            if Some(self.table.row_index[j]) == self.padding_idx {
                continue;
            }
            group[len] = j;
            len += 1;
            if len == GROUP {
                self.accumulate(&group, kept == 0, acc);
                kept += len;
                len = 0;
            }
        }
        if len > 0 {
            self.accumulate(&group[..len], kept == 0, acc);
            kept += len;
        }
        kept
    }

    /// Adds (or takes the maximum of) the rows of `entries` into `acc`, in order; `first` says
    /// whether they are the first entries of the bag.
    #[inline(always)]
    fn accumulate(&self, entries: &[usize], first: bool, acc: &mut [f64]) {
        let factor = |j: usize| self.per_sample_weights.map_or(1.0, |w| w[j]);
        match (self.mode, entries) {
            (BagMode::Max, _) => {
                for (k, &j) in entries.iter().enumerate() {
                    let r = self.table.row(j);
                    if first && k == 0 {
                        for (a, &w) in acc.iter_mut().zip(r) {
                            *a = w.widen_f64();
                        }
                        continue;
                    }
                    // The maximum is a selection: exact in float64; NaN wins wherever it is.
                    for (a, &w) in acc.iter_mut().zip(r) {
                        let w = w.widen_f64();
                        if w > *a || w.is_nan() {
                            *a = w;
                        }
                    }
                }
            }
            (_, &[j0, j1, j2, j3]) => {
                let (f0, f1, f2, f3) = (factor(j0), factor(j1), factor(j2), factor(j3));
                let rows = self
                    .table
                    .row(j0)
                    .iter()
                    .zip(self.table.row(j1))
                    .zip(self.table.row(j2))
                    .zip(self.table.row(j3));
                for (a, (((&x0, &x1), &x2), &x3)) in acc.iter_mut().zip(rows) {
                    *a = *a
                        + x0.widen_f64() * f0
                        + x1.widen_f64() * f1
                        + x2.widen_f64() * f2
                        + x3.widen_f64() * f3;
                }
            }
            _ => {
                for &j in entries {
                    let f = factor(j);
                    for (a, &w) in acc.iter_mut().zip(self.table.row(j)) {
                        *a += w.widen_f64() * f;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::output::collect;

    fn table(rows: usize, dim: usize) -> Vec<f32> {
        (0..rows * dim).map(|i| (i as f32) * 0.5 - 3.0).collect()
    }

    fn lookup<I: TokenId>(
        ids: &[I],
        w: &[f32],
        rows: usize,
        dim: usize,
        scale: Option<f32>,
    ) -> Result<Vec<f32>, KernelError> {
        collect("out", ids.len() * dim, |out| embedding(ids, w, rows, dim, scale, out, Par::SEQ))
    }

    fn bag<I: TokenId>(
        bags: &Bags<'_, I>,
        w: &[f32],
        rows: usize,
        dim: usize,
        mode: BagMode,
    ) -> Result<Vec<f32>, KernelError> {
        let n = bags.bounds.len().saturating_sub(1) * dim;
        collect("out", n, |out| embedding_bag(bags, w, rows, dim, mode, out, Par::SEQ))
    }

    fn uninit(n: usize) -> Vec<MaybeUninit<f32>> {
        vec![MaybeUninit::uninit(); n]
    }

    #[test]
    fn lookup_copies_rows_bit_exactly() {
        let (rows, dim) = (7, 3);
        let mut w = table(rows, dim);
        w[3] = f32::from_bits(0x7fc0_1234); // NaN with a payload
        w[4] = -0.0;
        let ids: Vec<u16> = vec![1, 0, 6, 1];
        let out = lookup(&ids, &w, rows, dim, None).unwrap();
        for (n, &id) in ids.iter().enumerate() {
            for c in 0..dim {
                assert_eq!(out[n * dim + c].to_bits(), w[id as usize * dim + c].to_bits());
            }
        }
    }

    #[test]
    fn lookup_scales_and_handles_empty() {
        let w = table(4, 2);
        assert_eq!(lookup(&[3i64], &w, 4, 2, Some(2.0)).unwrap(), vec![w[6] * 2.0, w[7] * 2.0]);
        assert!(lookup::<i32>(&[], &w, 4, 2, None).unwrap().is_empty());
        assert!(lookup(&[0i8, 3], &[], 4, 0, None).unwrap().is_empty());
    }

    #[test]
    fn lookup_reports_first_bad_id() {
        let w = table(4, 2);
        let err = lookup(&[1i64, -1, 9], &w, 4, 2, None).unwrap_err();
        assert_eq!(err, KernelError::IndexOutOfRange { arg: "ids", flat_index: 1, value: -1, size: 4 });
        let err = lookup(&[u64::MAX], &w, 4, 2, None).unwrap_err();
        assert!(matches!(err, KernelError::IndexOutOfRange { value, .. } if value == u64::MAX as i128));
    }

    #[test]
    fn lookup_rejects_inconsistent_lengths() {
        let w = table(4, 2);
        assert!(embedding(&[1i32], &w, 4, 2, None, &mut uninit(3), Par::SEQ).is_err());
        assert!(embedding(&[1i32], &w, 5, 2, None, &mut uninit(2), Par::SEQ).is_err());
        assert!(embedding(&[1i32], &w, usize::MAX, 2, None, &mut uninit(2), Par::SEQ).is_err());
    }

    fn naive_bag(
        ids: &[i64],
        bounds: &[usize],
        w: &[f32],
        dim: usize,
        mode: BagMode,
        pad: Option<usize>,
    ) -> Vec<f64> {
        let mut out = vec![];
        for b in 0..bounds.len() - 1 {
            let kept: Vec<usize> = ids[bounds[b]..bounds[b + 1]]
                .iter()
                .map(|&i| i as usize)
                .filter(|&i| Some(i) != pad)
                .collect();
            for c in 0..dim {
                let vals: Vec<f64> = kept.iter().map(|&i| w[i * dim + c] as f64).collect();
                out.push(match (mode, vals.is_empty()) {
                    (_, true) => 0.0,
                    (BagMode::Sum, _) => vals.iter().sum(),
                    (BagMode::Mean, _) => vals.iter().sum::<f64>() / vals.len() as f64,
                    (BagMode::Max, _) => vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                });
            }
        }
        out
    }

    #[test]
    fn bags_match_naive_reduction() {
        let (rows, dim) = (9, 5);
        let w = table(rows, dim);
        let ids: Vec<i64> = vec![1, 8, 2, 2, 0, 3, 7, 7, 4];
        let bounds = [0, 3, 3, 4, 9];
        for mode in [BagMode::Sum, BagMode::Mean, BagMode::Max] {
            for pad in [None, Some(2), Some(7)] {
                let bags = Bags { ids: &ids, bounds: &bounds, per_sample_weights: None, padding_idx: pad };
                let out = bag(&bags, &w, rows, dim, mode).unwrap();
                let want = naive_bag(&ids, &bounds, &w, dim, mode, pad);
                for (o, r) in out.iter().zip(&want) {
                    assert_eq!(*o, *r as f32, "mode {mode:?} pad {pad:?}");
                }
            }
        }
    }

    #[test]
    fn bags_apply_per_sample_weights_and_propagate_nan_in_max() {
        let w = vec![1.0f32, 2.0, f32::NAN, 4.0];
        let ids = [0u8, 1];
        let weights = [2.0, -1.0];
        let bags = Bags { ids: &ids, bounds: &[0, 2], per_sample_weights: Some(&weights), padding_idx: None };
        let out = bag(&bags, &w, 2, 2, BagMode::Sum).unwrap();
        assert!(out[0].is_nan());
        assert_eq!(out[1], 0.0);
        for ids in [[0u8, 1], [1, 0]] {
            let bags = Bags { ids: &ids, bounds: &[0, 2], per_sample_weights: None, padding_idx: None };
            let out = bag(&bags, &w, 2, 2, BagMode::Max).unwrap();
            assert!(out[0].is_nan());
            assert_eq!(out[1], 4.0);
        }
    }

    #[test]
    fn grouped_sums_equal_row_by_row_sums_bit_for_bit() {
        let (rows, dim) = (11, 9);
        let w: Vec<f32> = (0..rows * dim).map(|i| ((i * 7919) % 1000) as f32 * 1.37e-3 - 0.5).collect();
        let ids: Vec<i64> = (0..23).map(|i| (i * 5) % rows as i64).collect();
        let weights: Vec<f64> = (0..23).map(|i| i as f64 * 0.3 - 2.0).collect();
        let bounds = [0, 1, 5, 9, 9, 16, 23];
        for (psw, pad) in [(None, None), (Some(&weights[..]), None), (Some(&weights[..]), Some(5))] {
            let bags = Bags { ids: &ids, bounds: &bounds, per_sample_weights: psw, padding_idx: pad };
            let out = bag(&bags, &w, rows, dim, BagMode::Sum).unwrap();
            for b in 0..bounds.len() - 1 {
                for c in 0..dim {
                    let mut sum = 0.0f64;
                    for j in bounds[b]..bounds[b + 1] {
                        if Some(ids[j] as usize) != pad {
                            sum += w[ids[j] as usize * dim + c] as f64 * psw.map_or(1.0, |p| p[j]);
                        }
                    }
                    assert_eq!(out[b * dim + c].to_bits(), (sum as f32).to_bits(), "bag {b} column {c}");
                }
            }
        }
    }

    #[test]
    fn bags_reject_bad_bounds_and_options() {
        let w = table(3, 1);
        let ids = [0i32, 1, 2];
        for bounds in [&[1usize, 2, 3][..], &[0, 2, 1], &[0, 1, 4], &[]] {
            let bags = Bags { ids: &ids, bounds, per_sample_weights: None, padding_idx: None };
            assert!(embedding_bag(&bags, &w, 3, 1, BagMode::Sum, &mut uninit(2), Par::SEQ).is_err());
        }
        let ones = [1.0; 3];
        let bags = Bags { ids: &ids, bounds: &[0, 1, 3], per_sample_weights: Some(&ones), padding_idx: None };
        assert!(bag(&bags, &w, 3, 1, BagMode::Mean).is_err());
        let bags = Bags { ids: &ids, bounds: &[0, 1, 3], per_sample_weights: None, padding_idx: Some(3) };
        assert!(bag(&bags, &w, 3, 1, BagMode::Mean).is_err());
    }

    #[test]
    fn parallel_and_portable_paths_give_identical_bits() {
        let (rows, dim) = (50, 37);
        let w = table(rows, dim);
        let ids: Vec<i64> = (0..4000).map(|i| (i * 7919) % rows as i64).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let run =
            |par| collect("out", ids.len() * dim, |out| embedding(&ids, &w, rows, dim, Some(0.3), out, par));
        let want = run(Par::SEQ).unwrap();
        assert_eq!(run(Par::on(&pool)).unwrap(), want);
        crate::kernels::simd::set_enabled(false);
        let portable = run(Par::SEQ);
        crate::kernels::simd::set_enabled(true);
        assert_eq!(portable.unwrap(), want);
    }
}
