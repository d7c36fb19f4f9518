//! The attention paths' explicit vector kernels, for the float types and CPUs that have them.
//!
//! `tile.rs` and `decode.rs` are written once, generically, in loops LLVM vectorises. For
//! float32 on x86-64 with AVX2 and FMA, their hot steps also exist as explicit kernels
//! (`avx2.rs`): the K transpose, the score micro-tiles with their masks and row maxima, the
//! probabilities with their sum, the P·V micro-tiles, and decode's dot products (over key rows,
//! and over keys in strips) and P·V for groups of four rows and for single rows. Where the CPU has AVX-512 (F and VL), the score
//! tiles, the probabilities and the P·V tiles run in 16-lane registers instead (`avx512.rs`),
//! the matrix products with tiles twice as large, and decode's dot products take eight rows at a
//! time. Each computes exactly the
//! operations of its generic counterpart, in the same order, so all give the same bits (the
//! tests compare them); what they add is control over registers, one pass where the generic code
//! takes several, and no bounds checks in the loops.
//!
//! Keys and values reach the explicit kernels as stored ([`Stored`]): float16 and bfloat16 ones
//! are widened as they are loaded (`lanes.rs`), which is exact, so the kernels compute the same
//! bits as on the widened values.
//!
//! This file is the micro-kernel trait, the block sizes and the blocks the kernels take; the
//! instruction-set files depend on it (and on `lanes.rs`) and on nothing else of attention, and
//! `x86.rs` chooses among them.
//!
//! A type opts in through [`Explicit`]: `detect` returns a token only where its kernels can run,
//! and every kernel takes that token, so they cannot be reached without it. Types and CPUs
//! without kernels have an uninhabited token: `detect` returns `None` and the kernels are never
//! called.

use crate::kernels::storage::Stored;

/// Query rows per block of the tiled path.
pub(super) const BQ: usize = 32;
/// Keys per block (both paths).
pub(super) const BK: usize = 128;
/// Query rows of a score micro-tile.
pub(super) const MR: usize = 4;
/// Keys of a score micro-tile, and output columns of a P·V micro-tile.
pub(super) const NR: usize = 16;

/// The AVX-512 micro-tile's shape for `rows` rows and `strips` strips of 16 still to do: two
/// groups of `MR` rows by two strips where there are enough, else one group by up to four strips;
/// always at most 16 accumulators (half of AVX-512's registers).
#[inline(always)]
pub(super) fn tile_shape(rows: usize, strips: usize) -> (usize, usize) {
    match (rows >= 2 * MR, strips) {
        (true, 2..) => (2, 2),
        (true, _) => (2, 1),
        (false, 4..) => (1, 4),
        (false, 2 | 3) => (1, 2),
        (false, _) => (1, 1),
    }
}

/// The causal and window bounds and the key padding of one query block against one key block,
/// for the explicit score kernels to apply as they store the scores.
pub struct Mask<'a> {
    /// Whether every pair of the tiles is valid (then `bounds` and `keep` are not read).
    pub all_valid: bool,
    /// Per row, the block columns its causal and window bounds allow, `[lo, hi)`.
    pub bounds: &'a [(usize, usize)],
    /// Per block column, −1 (all bits set) where the key may be attended: inside the key block's
    /// range and not padding.
    pub keep: &'a [i32],
}

/// The values of one key block for [`Explicit::pv`]: value column `c·NR + t` of the block's key
/// `j` is `v[j·key_stride + c·strip_stride + t]`, for keys `0..cols` and `ev` columns: value rows
/// as they lie (`tile.rs`, `decode.rs`) have `strip_stride = NR`; packed strips would have
/// `key_stride = NR`. `V` holds the values: as stored ([`Stored`]) where the trait takes them,
/// a slice of one element type inside the kernels.
pub struct VBlock<V> {
    pub v: V,
    pub key_stride: usize,
    pub strip_stride: usize,
    pub cols: usize,
    pub ev: usize,
}

impl<V> VBlock<V> {
    /// The same block with the values `v`.
    #[inline(always)]
    pub fn with<W>(&self, v: W) -> VBlock<W> {
        VBlock {
            v,
            key_stride: self.key_stride,
            strip_stride: self.strip_stride,
            cols: self.cols,
            ev: self.ev,
        }
    }
}

/// A token that cannot exist: the kernels of a type that has none.
#[derive(Clone, Copy)]
pub enum Never {}

/// The masked scores of one query block against one key block, for [`Explicit::scores`].
pub struct ScoreBlock<'a, T> {
    /// The block's queries times `scale`, each group of `MR` rows interleaved by dimension
    /// (`q[r0·e + d·MR + r]`).
    pub q: &'a [T],
    /// The key block's packed K: strip `n` (`e x NR`) holds `kt[d][0..NR]` of its keys
    /// `n·NR..(n + 1)·NR`.
    pub kt: &'a [T],
    pub e: usize,
    /// Block columns to compute, `[t0, t1)`, both multiples of `NR`.
    pub tiles: (usize, usize),
    /// Rows (a multiple of `MR`).
    pub rows: usize,
    /// The masks to apply.
    pub mask: Mask<'a>,
}

/// Explicit kernels for one float type, behind a token that only [`Explicit::detect`] makes.
pub trait Explicit: Sized + Copy {
    type Token: Copy;

    /// The token, where this CPU runs this type's kernels.
    fn detect() -> Option<Self::Token>;

    /// Writes the block's scores (query `q[r]` times the keys), then −inf at every masked pair,
    /// to `scores` (rows `BK` apart, at block columns `[t0, t1)`), and each row's largest score
    /// to `max[r]`: NaN if any valid score is NaN, −inf if none is valid. The same as
    /// `score_tile` followed by `mask_row` without softcap, ALiBi or attention masks.
    fn scores(t: Self::Token, blk: &ScoreBlock<'_, Self>, scores: &mut [Self], max: &mut [Self]);

    /// The same as `rows::probabilities`.
    fn probabilities(t: Self::Token, row: &mut [Self], m: Self) -> Self;

    /// `out[r] = alpha[r] · out[r] + Σ_j p[r·BK + j] v_j` for `rows` rows (a multiple of `MR`),
    /// keys in order: the same as `generic::pv_tiles`, and as `generic::add_pv` where every value is
    /// finite. `vb.ev` must be a multiple of `NR`.
    fn pv(
        t: Self::Token,
        p: &[Self],
        alpha: &[Self],
        out: &mut [Self],
        rows: usize,
        vb: &VBlock<Stored<'_, Self>>,
    );

    /// `out[j] = q · k_j` for one query row and the keys `k[j·stride..][..q.len()]`, `j < n`: the
    /// same as `decode::dots`.
    fn dots_row(t: Self::Token, q: &[Self], k: Stored<'_, Self>, stride: usize, n: usize, out: &mut [Self]);

    /// `out = alpha · out + Σ_j p[j] v_j` for one row and the values `v[j·stride..][..out.len()]`,
    /// keys in order, none left out: the same as `generic::add_pv` where no `p[j]` is −0.0 or
    /// every value is finite. `out.len()` must be a multiple of 8.
    fn pv_row(t: Self::Token, p: &[Self], alpha: Self, out: &mut [Self], v: Stored<'_, Self>, stride: usize);

    /// `out[r·BK + j] = q_r · k_j` for the query rows of `q` (`e > 0` apart) and the `cols` keys
    /// whose strips `kt` holds (`kt[(j / NR · e + d) · NR + j % NR]`, whole strips): the same as
    /// `decode::strip_scores`.
    fn strip_dots(t: Self::Token, q: &[Self], e: usize, kt: Stored<'_, Self>, cols: usize, out: &mut [Self]);

    /// `kt[(j / NR · e + d) · NR + j % NR] = k[j · stride + d]` for keys `j < n` and `d < e`: the
    /// keys transposed into strips of `NR`, as `tile.rs` packs them.
    fn pack_keys(t: Self::Token, k: &[Self], stride: usize, e: usize, n: usize, kt: &mut [Self]);

    /// `out[r·BK + j] = q_r · k_j` for the query rows of `q` (`e > 0` apart, a multiple of `MR`
    /// of them) and the keys `k[j·stride..][..e]`, `j < n`: the same as `decode::dots`, each key
    /// read once for several rows.
    fn dots(
        t: Self::Token,
        q: &[Self],
        e: usize,
        k: Stored<'_, Self>,
        stride: usize,
        n: usize,
        out: &mut [Self],
    );
}

macro_rules! no_kernels {
    ($t:ty) => {
        impl Explicit for $t {
            type Token = Never;
            fn detect() -> Option<Never> {
                None
            }
            fn scores(t: Never, _: &ScoreBlock<'_, Self>, _: &mut [Self], _: &mut [Self]) {
                match t {}
            }
            fn probabilities(t: Never, _: &mut [Self], _: Self) -> Self {
                match t {}
            }
            fn pv(t: Never, _: &[Self], _: &[Self], _: &mut [Self], _: usize, _: &VBlock<Stored<'_, Self>>) {
                match t {}
            }
            fn dots(t: Never, _: &[Self], _: usize, _: Stored<'_, Self>, _: usize, _: usize, _: &mut [Self]) {
                match t {}
            }
            fn pack_keys(t: Never, _: &[Self], _: usize, _: usize, _: usize, _: &mut [Self]) {
                match t {}
            }
            fn strip_dots(t: Never, _: &[Self], _: usize, _: Stored<'_, Self>, _: usize, _: &mut [Self]) {
                match t {}
            }
            fn dots_row(t: Never, _: &[Self], _: Stored<'_, Self>, _: usize, _: usize, _: &mut [Self]) {
                match t {}
            }
            fn pv_row(t: Never, _: &[Self], _: Self, _: &mut [Self], _: Stored<'_, Self>, _: usize) {
                match t {}
            }
        }
    };
}

no_kernels!(f64);
#[cfg(not(target_arch = "x86_64"))]
no_kernels!(f32);
