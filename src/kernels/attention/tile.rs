//! One (batch, key/value head) of attention for queries longer than the decode path's: the rows
//! of all query heads that share the key/value head (grouped-query attention; one head without
//! it), in blocks of `BQ` rows against key blocks of `BK` keys, with the online softmax of the
//! module documentation. Row `r` of a task is query position `r / G` of its `r % G`-th head (`G`
//! heads per group), so one block's rows share their key range, and K is packed once for the
//! whole group. When there are few groups for the threads, a group's positions are split into
//! parts of whole query blocks (`first`, `positions`), each a task of its own that packs the keys
//! its rows can reach; every block computes exactly what it would unsplit.
//!
//! K is packed once per task into 16-wide strips, and so is V where the generic P·V runs (the
//! explicit kernel reads the value rows as they lie). Per query block the queries are packed
//! times `scale`; per key block, 4 x 16 register tiles of fused multiply-adds build the scores
//! (`s[j] += q[d] · kt[d][j]`), which are capped and biased, then masked by selects (after all
//! arithmetic) while the row maximum is found; `exp` turns them into probabilities (masked ones
//! into −0.0) and their sum; and 4 x 16 tiles add `P · V` to the output rows, rescaled first when
//! the maximum grew. A block's last group of rows is padded to a whole micro-tile with copies of
//! its last row. Fused multiply-adds are correctly rounded, so every code path (AVX-512, AVX2 or
//! portable, any tile shape) gives the same bits.
//!
//! The loops are written in the shapes LLVM vectorises (fixed-size arrays, `zip`, `for`): small
//! changes can make one scalar and cost half the speed, so measure after every edit. For float32
//! on AVX2 + FMA, the K transpose, the score tiles with their masks, the probabilities and the
//! P·V tiles run as explicit kernels instead (`fast.rs`, `avx2.rs`, and `avx512.rs` where the
//! CPU has AVX-512F), with the same operations in the same order.
//!
//! bfloat16 queries, keys and values take the pair mode of `dot16.rs` instead: its own packing,
//! matrix products and softmax step (whose masked probabilities are +0); its flushes can make an
//! output −0.0, so every output zero is written +0.

use std::mem::MaybeUninit;

use super::fast::{Mask, ScoreBlock, VBlock, BK, BQ, MR, NR};
use super::generic::{add_pv, pv_tiles, rows_as, score_tile, PvBlock};
use super::merge::{self, CHUNK};
use super::rows::{key_range, mask_row, update_row, RowAt};
use super::{dot16, AttnFloat, TaskInputs};
use crate::kernels::exp::exp_short;
use crate::kernels::simd::{self, Task};
use crate::kernels::storage::{Storage, Stored};

/// One head's rows of `out` (stored as `O`), `lse`, `weights` and `scores` (as `T`).
pub(super) struct HeadOut<'o, O, T> {
    pub out: &'o mut [MaybeUninit<O>],
    pub lse: Option<&'o mut [MaybeUninit<T>]>,
    pub weights: Option<&'o mut [MaybeUninit<T>]>,
    pub scores: Option<&'o mut [MaybeUninit<T>]>,
}

impl<'o, O, T> HeadOut<'o, O, T> {
    /// Splits off the rows from query position `i` on (`ev` values and `s` weights a row).
    pub fn split_off(&mut self, i: usize, ev: usize, s: usize) -> Self {
        fn split<'o, X>(x: &mut &'o mut [X], at: usize) -> &'o mut [X] {
            let (head, tail) = std::mem::take(x).split_at_mut(at);
            *x = head;
            tail
        }
        Self {
            out: split(&mut self.out, i * ev),
            lse: self.lse.as_mut().map(|x| split(x, i)),
            weights: self.weights.as_mut().map(|x| split(x, i * s)),
            scores: self.scores.as_mut().map(|x| split(x, i * s)),
        }
    }
}

/// Query positions per split unit of a group: lcm(BQ, group) task rows, whole positions of every
/// head and whole query blocks, so a split leaves every query block as it was.
pub(super) fn positions_per_unit(group: usize) -> usize {
    let rows = BQ / gcd(BQ, group) * group; // lcm(BQ, group)
    rows / group
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The work of one (batch, key/value head) on query positions `first..first + positions`:
/// `heads[n]` holds those rows of the outputs of query head `g * heads.len() + n`.
pub(super) struct Group<'a, 'o, Q, KV, T> {
    pub at: TaskInputs<'a, Q, KV, T>,
    pub first: usize,
    pub positions: usize,
    pub heads: Vec<HeadOut<'o, Q, T>>,
}

impl<Q, KV, T> Task for Group<'_, '_, Q, KV, T>
where
    Q: Storage<Compute = T>,
    KV: Storage<Compute = T>,
    T: AttnFloat,
{
    #[inline(always)]
    fn run(&mut self) {
        let mut scratch = T::scratch().take();
        self.run_in(&mut scratch);
        if scratch.bytes() <= Scratch::<T>::KEPT {
            T::scratch().set(scratch);
        }
    }
}

/// A task's working buffers, which each thread keeps from one task to the next (up to `KEPT`
/// bytes): allocated and zeroed afresh, they took about a sixth of a task over MiniLM's short
/// sentences (some 24 tokens). Every element a task reads it has written first, but for `kt`
/// (zeros past the last key), which is zeroed.
#[derive(Default)]
pub struct Scratch<T> {
    kept_before: Vec<u32>,
    kt: Vec<T>,
    nonfinite: Vec<u32>,
    qpack: Vec<T>,
    q_wide: Vec<T>,
    scores: Vec<T>,
    acc: Vec<T>,
    /// The bfloat16 pair mode's.
    dot: dot16::Buffers,
}

impl<T> Scratch<T> {
    /// The most bytes a thread keeps between tasks.
    const KEPT: usize = 1 << 20;

    fn bytes(&self) -> usize {
        let words = self.kept_before.capacity() + self.nonfinite.capacity();
        let values = self.kt.capacity()
            + self.qpack.capacity()
            + self.q_wide.capacity()
            + self.scores.capacity()
            + self.acc.capacity();
        4 * words + std::mem::size_of::<T>() * values + self.dot.bytes()
    }
}

/// A kept buffer as `n` elements: all `fill`, or with `stale`, whatever the first ones held
/// before (where the task writes every element before it reads it). Its allocation is reused.
pub(super) fn sized<T: Copy>(buf: &mut Vec<T>, n: usize, fill: T, stale: bool) -> &mut [T] {
    if !stale {
        buf.clear();
    }
    buf.truncate(n);
    buf.resize(n, fill);
    buf
}

impl<Q, KV, T> Group<'_, '_, Q, KV, T>
where
    Q: Storage<Compute = T>,
    KV: Storage<Compute = T>,
    T: AttnFloat,
{
    /// The task, its buffers from `scratch`.
    #[inline(always)]
    fn run_in(&mut self, scratch: &mut Scratch<T>) {
        let sp = self.at.spec;
        let (s, e, ev) = (sp.kv_len, sp.dim_qk, sp.dim_v);
        let group = self.heads.len();
        let start = self.at.masks.key_start(self.at.b);
        let k_base = self.at.b * sp.k.batch + self.at.g * sp.k.head + start * sp.k.row;
        let v_base = self.at.b * sp.v.batch + self.at.g * sp.v.head + start * sp.v.row;
        let offset = self.at.masks.offset(sp, self.at.b);
        // Task row r: query position and head at.position_head(r).
        let (at, b, masks) = (self.at, self.at.b, self.at.masks);
        let slope = |h: usize| masks.slope(sp, b, h);
        let key_mask = masks.key_mask(sp, b);
        // How many keys before each the key mask keeps (`kept_before[j]`, for keys `< j`), so that
        // a key block's count is one subtraction.
        let kept_before = &mut scratch.kept_before;
        kept_before.clear();
        if let Some(km) = key_mask {
            kept_before.extend(std::iter::once(0).chain(km.iter().scan(0, |n, &x| {
                *n += u32::from(x != 0);
                Some(*n)
            })));
        }
        // No key after this is ever read: trailing padding, and keys past the last position's
        // causal or window bound.
        let last = self.first + self.positions - 1;
        let keys_end = masks.keys_end(sp, b).min(key_range(sp, offset, last, last).1);

        // K is packed once per task, transposed, as strips of NR keys: strip t of key block n
        // holds `kt[d][0..NR]` for its keys, contiguous (`e x NR`), zero-padded past S.
        let fast = T::detect();
        // The task's keys and values from their first row on (16-bit ones are widened as they
        // are packed, or read by kernels that widen them: the loops below compute in T alone).
        let k_src = self.at.k.get(k_base..).unwrap_or_default();
        let v_src = self.at.v.get(v_base..).unwrap_or_default();
        // Keys in strips (`AttnSpec::k_strips`): the whole strips the task reads.
        let strips_end = keys_end.div_ceil(NR) * NR;
        // bfloat16 queries, keys and values (value rows of whole strips): the matrix products in
        // the dot-product pairs of `dot16.rs`, which packs K and V itself.
        let mut dot = match (Q::as_bf16(self.at.q), KV::as_bf16(k_src), KV::as_bf16(v_src)) {
            (Some(q), Some(k), Some(v)) if dot16::fits(ev) => {
                let keys = match sp.k_strips {
                    true => dot16::Keys::Strips(&k[..strips_end * e]),
                    false => dot16::Keys::Rows { k, stride: sp.k.row },
                };
                // (A task with one query block reads each key block once: it packs them one at
                // a time, and holds one, as a decode step through a `KVCache` needs.)
                let one_block = self.positions * group <= BQ;
                let bufs = std::mem::take(&mut scratch.dot);
                Some(dot16::Dot::new(q, keys, v, sp.v.row, e, ev, keys_end, one_block, bufs))
            }
            _ => None,
        };
        let fast_pv = fast.filter(|_| dot.is_none() && ev > 0 && ev.is_multiple_of(NR));
        // K in whole strips up to the last key read: no tile reads past them (a block's tiles
        // end at its last column rounded up to a strip), and short sequences zero no more.
        let kt = sized(&mut scratch.kt, if dot.is_none() { strips_end * e } else { 0 }, T::ZERO, false);
        match (fast, KV::as_compute(k_src)) {
            _ if dot.is_some() => {}
            // Already packed: as T.
            _ if sp.k_strips => KV::widen_slice(&k_src[..strips_end * e], &mut kt[..strips_end * e]),
            (Some(token), Some(k)) if keys_end > 0 => T::pack_keys(token, k, sp.k.row, e, keys_end, kt),
            (Some(token), None) if keys_end > 0 && e > 0 => {
                // 16-bit keys: a key block at a time widened (rows e apart), then transposed.
                let mut rows = Vec::new();
                for j0 in (0..keys_end).step_by(BK) {
                    let n = BK.min(keys_end - j0);
                    let (block, _) = rows_as(k_src, sp.k.row, e, j0, n, &mut rows);
                    T::pack_keys(token, block, e, e, n, &mut kt[j0 * e..]);
                }
            }
            _ => {
                let mut row = vec![T::ZERO; e];
                for j in 0..keys_end {
                    let (strip, n) = (j / NR, j % NR);
                    KV::widen_slice(&k_src[j * sp.k.row..][..e], &mut row);
                    for (d, &x) in row.iter().enumerate() {
                        kt[(strip * e + d) * NR + n] = x;
                    }
                }
            }
        }
        // V packed likewise for the generic P·V (the explicit kernel reads the rows as they lie,
        // 16-bit ones widened as it loads them, which costs it nothing and saves the copy): for
        // key block n and output columns c·NR.., `vt[j][0..NR]` for its keys, contiguous
        // (`BK x NR`). In the same pass, how many value rows before each are not finite
        // (`nonfinite[j]`, for rows `< j`): where none of a block's is, masked pairs need no
        // skipping.
        let ev_strips = ev / NR;
        let pack_v = fast_pv.is_none() && dot.is_none();
        let packed = keys_end.div_ceil(BK) * BK; // whole key blocks up to the last key read
        let mut vt = vec![T::ZERO; if pack_v { packed * ev_strips * NR } else { 0 }];
        let nonfinite = sized(&mut scratch.nonfinite, keys_end + 1, 0, true);
        nonfinite[0] = 0;
        let v_stored = |j: usize| &v_src[j * sp.v.row..][..ev];
        // The generic code's values as T: the rows as they lie, or 16-bit ones widened (rows
        // `ev` apart).
        let mut v_generic = Vec::new();
        // 16-bit values for the explicit P·V: widened once here where the task has several
        // query blocks to read them (each would widen them again), else widened as loaded.
        let widen_v = fast_pv.is_some() && KV::as_compute(v_src).is_none() && self.positions * group > 2 * BQ;
        let v_widened = pack_v || widen_v;
        let (v_data, v_stride) = match v_widened {
            true => rows_as(v_src, sp.v.row, ev, 0, keys_end, &mut v_generic),
            false => (&[][..], 0),
        };
        // What the explicit P·V reads: those widened rows, or the rows as stored.
        let (v_explicit, v_explicit_stride) = match widen_v {
            true => (Stored::Compute(v_data), v_stride),
            false => (KV::stored(v_src), sp.v.row),
        };
        let v_row = |j: usize| &v_data[j * v_stride..][..ev];
        for j in 0..keys_end {
            let (block, jj) = (j / BK, j % BK);
            // The row eight ahead, to be in cache when its turn comes: rows that lie apart
            // (layout bshd, a row of every head in between) are not streamed in by the hardware.
            if j + 8 < keys_end {
                simd::prefetch(v_stored(j + 8));
            }
            if pack_v {
                let row = v_row(j);
                for c in 0..ev_strips {
                    let at = ((block * ev_strips + c) * BK + jj) * NR;
                    vt[at..at + NR].copy_from_slice(&row[c * NR..(c + 1) * NR]);
                }
            }
            let finite = v_stored(j).iter().fold(true, |all, x| all & x.finite());
            nonfinite[j + 1] = nonfinite[j] + u32::from(!finite);
        }
        let mut v_scratch = Vec::new(); // a key block's values as T, for `add_pv` beside the explicit P·V
        let qpack = sized(&mut scratch.qpack, BQ * e, T::ZERO, true); // the query block, times `scale`
        let q_wide = sized(&mut scratch.q_wide, MR * e, T::ZERO, true); // a group of 16-bit query rows, widened
        let widen_q = Q::as_compute(&[]).is_none(); // queries of a 16-bit type
        let scale = T::from_f64(sp.scale);
        let scores = sized(&mut scratch.scores, BQ * BK, T::ZERO, true);
        let acc = sized(&mut scratch.acc, BQ * ev, T::ZERO, true);
        let (mut m, mut sum, mut alpha) = ([T::NEG_INFINITY; BQ], [T::ZERO; BQ], [T::ONE; BQ]);
        // The explicit kernels, where they exist (`fast.rs`); the score kernel handles causal and
        // window bounds and key padding, nothing else.
        let simple_masks = sp.softcap.is_none()
            && masks.alibi.is_none()
            && masks.float_mask.is_none()
            && masks.bool_mask.is_none();
        let fast_scores = fast.filter(|_| simple_masks && dot.is_none());
        // The bfloat16 score kernel masks as it stores, likewise, where it is explicit.
        let dot_masks = simple_masks && dot.as_ref().is_some_and(|d| d.explicit());
        let (mut bounds, mut keep, mut row_maxima) = ([(0, 0); BQ], [0i32; BK], [T::ZERO; BQ]);
        // The key columns (k0, cols) whose marks `keep` holds: query blocks that share them (all
        // of a task's, without causal or window bounds) build them once.
        let mut keep_for = None;
        // The masked scores of the current query block, kept only when weights are requested.
        let keep_scores = self.heads[0].weights.is_some() || self.heads[0].scores.is_some();
        let mut block_scores = vec![T::NEG_INFINITY; if keep_scores { BQ * s } else { 0 }];

        // Rows whose keys span several chunks (or that have a sink logit) finish by merging the
        // partial results of their chunks (`merge.rs`), kept here: per chunk met, each row's
        // normalised output, log-sum-exp, maximum and sum.
        let mut stash = Stash::default();
        let sinks = self.at.masks.sinks.is_some();

        // This task's rows (whole query blocks: `first · group` is a multiple of BQ).
        let (start, end) = (self.first * group, (self.first + self.positions) * group);
        for q0 in (start..end).step_by(BQ) {
            if self.at.par.stopped() {
                return; // the call's outputs are discarded
            }
            let rows = BQ.min(end - q0);
            // Tiles work on whole groups of MR rows: rows past `rows` repeat the last one, are
            // computed alike and dropped at the end.
            let padded = rows.next_multiple_of(MR);
            m[..padded].fill(T::NEG_INFINITY);
            sum[..padded].fill(T::ZERO);
            acc[..padded * ev].fill(T::ZERO);
            block_scores.fill(T::NEG_INFINITY);
            // Pack the block's queries times `scale`, each group of MR rows interleaved by
            // dimension (`qpack[r0·e + d·MR + r]`, r0 the group's first row), so a micro-tile
            // reads its MR queries of dimension d from one place.
            // (16-bit queries are widened a group of rows at a time first, with the conversion
            // instructions.)
            if let Some(dot) = &mut dot {
                dot.pack_queries(padded, |r| at.q_start(q0 + r.min(rows - 1)));
            }
            for r0 in (0..padded).step_by(MR).filter(|_| dot.is_none()) {
                let row = |r: usize| at.q_row(q0 + (r0 + r).min(rows - 1));
                if widen_q {
                    for (r, wide) in q_wide.chunks_exact_mut(e.max(1)).enumerate() {
                        Q::widen_slice(row(r), wide);
                    }
                }
                let src: [&[T]; MR] =
                    simd::array(|r| Q::as_compute(row(r)).unwrap_or(&q_wide[r * e..(r + 1) * e]));
                let (dst, _) = qpack[r0 * e..(r0 + MR) * e].as_chunks_mut::<MR>();
                // Four rows zipped, which LLVM interleaves in vectors (indexed, each a scalar
                // store: about 5% of a task over 24 keys).
                const { assert!(MR == 4) };
                let rows = src[0].iter().zip(src[1]).zip(src[2]).zip(src[3]);
                for (x, (((&a, &b), &c), &d)) in dst.iter_mut().zip(rows) {
                    *x = [a * scale, b * scale, c * scale, d * scale];
                }
            }
            // Key blocks are the packed ones: [BK·n, BK·(n + 1)), from the block holding the
            // first allowed key, the last trimmed to the allowed range. A block is never trimmed
            // at its start: a row's sum of probabilities runs in lanes counted from the block's
            // first column, so where that column moved with the rows sharing the query block
            // (a left window bound), grouped heads or another batch split would change the bits.
            let (lo, hi) = key_range(sp, offset, q0 / group, (q0 + rows - 1) / group);
            let hi = hi.min(keys_end).max(lo);
            let lo = if lo < hi { lo / BK * BK } else { hi };
            stash.clear();
            let mut chunk = None;
            let mut k0 = lo;
            while k0 < hi {
                if chunk.is_some_and(|c| c != k0 / CHUNK) {
                    // A chunk ends: its partial results are kept, and the next starts afresh.
                    if let (Some(dot), Some(sum)) = (&mut dot, T::as_f32_mut(&mut sum)) {
                        dot.sums(&mut sum[..padded]);
                        dot.restart();
                    }
                    stash.close(rows, ev, &mut m, &mut sum, acc);
                }
                chunk = Some(k0 / CHUNK);
                let block = k0 / BK;
                let col0 = k0 % BK;
                let cols = (BK - col0).min(hi - k0);
                let kept = match key_mask {
                    Some(_) => (kept_before[k0 + cols] - kept_before[k0]) as usize,
                    None => cols,
                };
                if kept == 0 {
                    k0 += cols; // a fully padded key block: nothing to compute
                    continue;
                }
                // Scores of the block's columns col0..col0 + cols, MR rows x NR keys at a time
                // (whole NR-column tiles; the columns outside are dropped).
                let (t0, t1) = (col0 / NR * NR, (col0 + cols).next_multiple_of(NR).min(BK));
                // Every pair valid (most blocks away from a causal diagonal, with no padding):
                // the tiles are exactly the columns, no key is padding, and the bounds of the
                // block's first row (the smallest upper bound) and last row (the largest lower
                // bound) hold them all. Else the masks, column by column and row by row.
                let mut all_valid = true;
                if fast_scores.is_some() || dot_masks {
                    let (first, last) = (q0 / group, (q0 + rows - 1) / group);
                    all_valid = (t0, t1) == (col0, col0 + cols)
                        && kept == cols
                        && key_range(sp, offset, last, last).0 <= k0
                        && key_range(sp, offset, first, first).1 >= k0 + cols;
                    // Block column c is key block·BK + c.
                    let base = block * BK;
                    if !all_valid {
                        if keep_for != Some((k0, cols)) {
                            for (c, kp) in keep.iter_mut().enumerate().take(t1).skip(t0) {
                                let inside = (col0..col0 + cols).contains(&c);
                                *kp = -i32::from(inside && key_mask.is_none_or(|km| km[base + c] != 0));
                            }
                            keep_for = Some((k0, cols));
                        }
                        for (r, bound) in bounds[..padded].iter_mut().enumerate() {
                            let i = (q0 + r.min(rows - 1)) / group;
                            let (lo, hi) = key_range(sp, offset, i, i);
                            *bound = (lo.saturating_sub(base).min(BK), hi.saturating_sub(base).min(BK));
                        }
                    }
                }
                let mask = Mask { all_valid, bounds: &bounds[..padded], keep: &keep };
                if let Some(dot) = &mut dot {
                    dot.load(block);
                }
                // Whether the score kernel masked the scores and took the row maxima itself.
                let masked = if let (Some(dot), Some(out)) = (&dot, T::as_f32_mut(scores)) {
                    let mask = T::as_f32_mut(&mut row_maxima).filter(|_| dot_masks).map(|max| (&mask, max));
                    dot.scores(block, (t0, t1), padded, sp.scale as f32, out, mask)
                } else if let Some(token) = fast_scores {
                    let kt = &kt[block * BK * e..((block + 1) * BK * e).min(kt.len())];
                    let blk =
                        ScoreBlock { q: &qpack[..padded * e], kt, e, tiles: (t0, t1), rows: padded, mask };
                    T::scores(token, &blk, scores, &mut row_maxima);
                    true
                } else {
                    let kt = &kt[block * BK * e..((block + 1) * BK * e).min(kt.len())];
                    for r0 in (0..padded).step_by(MR) {
                        let (qs, _) = qpack[r0 * e..(r0 + MR) * e].as_chunks::<MR>();
                        for j0 in (t0..t1).step_by(NR) {
                            let tile = score_tile(qs, &kt[j0 * e..(j0 + NR) * e]);
                            for (r, tile_row) in tile.iter().enumerate() {
                                scores[(r0 + r) * BK + j0..(r0 + r) * BK + j0 + NR].copy_from_slice(tile_row);
                            }
                        }
                    }
                    false
                };
                // From here on, a row's scores are scores[r·BK + col0..][..cols].
                // Per row: scale, biases, masks, maximum, probabilities, sum.
                for r in 0..padded {
                    // The next block's queries, likewise (its packing reads them first), a row
                    // at a time: all at once, they stalled on the memory system.
                    if k0 == lo && q0 + BQ + r < end {
                        simd::prefetch(at.q_row(q0 + BQ + r));
                    }
                    let srow = &mut scores[r * BK + col0..r * BK + col0 + cols];
                    let row_max = match masked {
                        true => row_maxima[r],
                        false => {
                            let row = q0 + r.min(rows - 1);
                            let (i, h) = at.position_head(row);
                            let at = RowAt { b, h, i, k0, offset, slope: slope(h), key_mask };
                            mask_row(sp, self.at.masks, at, srow)
                        }
                    };
                    if r < rows && !block_scores.is_empty() {
                        block_scores[r * s + k0..r * s + k0 + cols].copy_from_slice(srow);
                    }
                    match dot {
                        Some(_) => row_maxima[r] = row_max, // the pair mode's softmax: all rows at once
                        None => alpha[r] = update_row(fast, srow, row_max, &mut m[r], &mut sum[r]),
                    }
                }
                let f32s = (T::as_f32(scores), T::as_f32(&row_maxima[..padded]));
                if let (Some(dot), (Some(scores), Some(row_max))) = (&mut dot, f32s) {
                    if let (Some(m), Some(alpha)) = (T::as_f32_mut(&mut m), T::as_f32_mut(&mut alpha)) {
                        dot.softmax(scores, cols, row_max, m, alpha);
                    }
                }
                // out = alpha * out + P V.
                // The bfloat16 P·V reads whole key pairs: with an odd number of columns, also the
                // value after the last (its probability +0, and +0 · inf is NaN), where it was packed.
                let read = if dot.is_some() { (cols + cols % 2).min(keys_end - k0) } else { cols };
                if nonfinite[k0 + read] == nonfinite[k0] {
                    // P is −0.0 at masked pairs and V is finite, so fma(−0, v, acc) leaves acc
                    // unchanged bit for bit (acc is never −0): no need to skip them one by one.
                    // (The bfloat16 pair mode's P is +0 there, and its flushes can make acc −0,
                    // whose sign a masked value's sign can then change: `finish_rows` makes
                    // every zero output +0, so that it cannot show.)
                    let f32s = (T::as_f32(&alpha), T::as_f32_mut(acc));
                    if let (Some(dot), (Some(alpha), Some(out))) = (&dot, f32s) {
                        dot.pv(block, alpha, out, padded, cols);
                    } else if let Some(token) = fast_pv {
                        // Value rows from key k0 on (ev is a multiple of NR: whole strips).
                        let v = v_explicit.from(k0 * v_explicit_stride);
                        let vb = VBlock { v, key_stride: v_explicit_stride, strip_stride: NR, cols, ev };
                        T::pv(token, &scores[col0..], &alpha, acc, padded, &vb);
                    } else {
                        let vstrips = &vt[block * ev_strips * BK * NR..(block + 1) * ev_strips * BK * NR];
                        let vb = PvBlock { strips: vstrips, col0, cols, ev };
                        for r0 in (0..padded).step_by(MR) {
                            let out = &mut acc[r0 * ev..(r0 + MR) * ev];
                            let (p, alpha) = (&scores[r0 * BK + col0..], &alpha[r0..r0 + MR]);
                            pv_tiles::<T, MR>(p, alpha, out, &vb, &|j| v_row(k0 + j));
                        }
                    }
                } else {
                    // Some value is NaN or infinite: leave masked pairs out one by one (so they
                    // cannot turn 0 * inf into NaN); each output element is the same chain of
                    // fused multiply-adds, in key order, as in `pv_tiles`.
                    let v_bf16 = KV::as_bf16(v_src);
                    let f32s = (T::as_f32(scores), T::as_f32(&alpha), T::as_f32_mut(acc));
                    if let (Some(dot), Some(v), (Some(scores), Some(alpha), Some(acc))) = (&dot, v_bf16, f32s)
                    {
                        // The pairs' steps with masked keys left out (`dot16.rs`).
                        for r in 0..rows {
                            let (s, out) = (&scores[r * BK..r * BK + cols], &mut acc[r * ev..(r + 1) * ev]);
                            let v_row = |j: usize| &v[(k0 + j) * sp.v.row..][..ev];
                            dot16::pv_skipping_masked(s, dot.probabilities(r), alpha[r], out, v_row);
                        }
                    } else {
                        let (v, stride) = match v_widened {
                            true => (&v_data[k0 * v_stride..], v_stride),
                            false => rows_as(v_src, sp.v.row, ev, k0, cols, &mut v_scratch),
                        };
                        for r in 0..rows {
                            let p = &scores[r * BK + col0..r * BK + col0 + cols];
                            add_pv(p, alpha[r], &mut acc[r * ev..(r + 1) * ev], |j| &v[j * stride..][..ev]);
                        }
                    }
                }
                k0 += cols;
            }
            // The pair mode keeps its sums in lanes until now.
            if let (Some(dot), Some(sum)) = (&dot, T::as_f32_mut(&mut sum)) {
                dot.sums(&mut sum[..padded]);
            }
            if stash.chunks == 0 && !sinks {
                self.finish_rows(q0, rows, &m, &sum, acc, &block_scores, dot.is_some());
            } else {
                if chunk.is_some() {
                    stash.close(rows, ev, &mut m, &mut sum, acc);
                }
                let first_chunk = chunk.map_or(0, |c| c + 1 - stash.chunks);
                self.finish_merged(q0, rows, &stash, first_chunk, &block_scores, dot.is_some());
            }
        }
        if let Some(dot) = dot {
            scratch.dot = dot.into_buffers();
        }
    }
}

/// The partial results of a query block's rows, one chunk of keys after another (see
/// `merge.rs`): per chunk, `rows` log-sum-exps, maxima and sums, and `rows x ev` outputs.
#[derive(Default)]
struct Stash<T> {
    chunks: usize,
    lse: Vec<T>,
    m: Vec<T>,
    sum: Vec<T>,
    out: Vec<T>,
}

impl<T: AttnFloat> Stash<T> {
    fn clear(&mut self) {
        self.chunks = 0;
        self.lse.clear();
        self.m.clear();
        self.sum.clear();
        self.out.clear();
    }

    /// Keeps rows `0..rows` of the running state as the next chunk's partials, and resets it.
    #[inline(always)]
    fn close(&mut self, rows: usize, ev: usize, m: &mut [T], sum: &mut [T], acc: &mut [T]) {
        let at = self.out.len();
        self.out.resize(at + rows * ev, T::ZERO); // (in cache, written once a query block)
        for r in 0..rows {
            let out = &mut self.out[at + r * ev..at + (r + 1) * ev];
            self.lse.push(merge::normalise(m[r], sum[r], &acc[r * ev..(r + 1) * ev], out, true));
        }
        self.m.extend_from_slice(&m[..rows]);
        self.sum.extend_from_slice(&sum[..rows]);
        self.chunks += 1;
        m.fill(T::NEG_INFINITY);
        sum.fill(T::ZERO);
        acc.fill(T::ZERO);
    }
}

impl<Q: Storage<Compute = T>, KV, T: AttnFloat> Group<'_, '_, Q, KV, T> {
    /// [`Group::finish_rows`] for rows whose partials `stash` holds, chunk `first_chunk` on:
    /// merged (`merge.rs`), with the rows' sink logits. (Inlined, as everything a task runs, so
    /// that it compiles with the task's instruction set: `mul_add` is a library call outside.)
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn finish_merged(
        &mut self,
        q0: usize,
        rows: usize,
        stash: &Stash<T>,
        first_chunk: usize,
        scores: &[T],
        pairs: bool,
    ) {
        let (exp, ev) = (path_exp::<T>(pairs), self.at.spec.dim_v);
        let (group, n) = (self.heads.len(), stash.chunks);
        let (mut row, mut lses, mut factors) = (vec![T::ZERO; ev], vec![T::ZERO; n], vec![T::ZERO; n]);
        for r in 0..rows {
            let sink = self.at.masks.sink(self.at.g * group + (q0 + r) % group).map(T::from_f64);
            for (c, l) in lses.iter_mut().enumerate() {
                *l = stash.lse[c * rows + r];
            }
            let out_of = |c: usize| &stash.out[(c * rows + r) * ev..(c * rows + r + 1) * ev];
            let lse = merge::merge_row(&lses, out_of, sink, &mut row, &mut factors);
            // Key j's weight, from its chunk's maximum and sum and the chunk's share of the row.
            let weight = |j: usize, score: T| {
                let c = (j / CHUNK).wrapping_sub(first_chunk);
                match c < n {
                    true => {
                        merge::weight(score, stash.m[c * rows + r], stash.sum[c * rows + r], factors[c], exp)
                    }
                    false => T::ZERO,
                }
            };
            self.write_row(q0 + r, &row, lse, scores, r, weight);
        }
    }

    /// Writes `out`, `lse` and normalised `weights` for task rows `q0..q0 + rows` (`pairs`: of
    /// the bfloat16 pair mode, whose probabilities are `exp_short`'s): each row normalised as a
    /// chunk's partial is (`merge::normalise`), which is what a row inside one chunk merges to.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn finish_rows(
        &mut self,
        q0: usize,
        rows: usize,
        m: &[T],
        sum: &[T],
        acc: &[T],
        scores: &[T],
        pairs: bool,
    ) {
        let (exp, ev) = (path_exp::<T>(pairs), self.at.spec.dim_v);
        let mut row = vec![T::ZERO; ev];
        let with_lse = self.heads.iter().any(|h| h.lse.is_some()); // (a logarithm a row)
        for r in 0..rows {
            let lse = merge::normalise(m[r], sum[r], &acc[r * ev..(r + 1) * ev], &mut row, with_lse);
            self.write_row(q0 + r, &row, lse, scores, r, |_, score| {
                merge::weight(score, m[r], sum[r], T::ONE, exp)
            });
        }
    }

    /// Task row `row`'s results: its output `out` (rounded to `Q`), its log-sum-exp, and the
    /// weights (`weight(j, score)`) and scores of its row `r` of `scores`, where asked for.
    #[inline(always)]
    fn write_row(
        &mut self,
        row: usize,
        out: &[T],
        lse: T,
        scores: &[T],
        r: usize,
        weight: impl Fn(usize, T) -> T,
    ) {
        let (s, ev, group) = (self.at.spec.kv_len, self.at.spec.dim_v, self.heads.len());
        let (i, head) = (row / group - self.first, &mut self.heads[row % group]);
        Q::narrow_slice(out, &mut head.out[i * ev..(i + 1) * ev]);
        if let Some(l) = head.lse.as_deref_mut() {
            l[i].write(lse);
        }
        if let Some(w) = head.weights.as_deref_mut() {
            for (j, (x, &score)) in
                w[i * s..(i + 1) * s].iter_mut().zip(&scores[r * s..(r + 1) * s]).enumerate()
            {
                x.write(weight(j, score));
            }
        }
        if let Some(out) = head.scores.as_deref_mut() {
            for (x, &score) in out[i * s..(i + 1) * s].iter_mut().zip(&scores[r * s..(r + 1) * s]) {
                x.write(score);
            }
        }
    }
}

/// The exponential of a path's probabilities: `exp_short`'s in the bfloat16 pair mode (`T` is
/// float32 there, so the round trip is exact), `exp_nonpositive` elsewhere.
#[inline(always)]
fn path_exp<T: AttnFloat>(pairs: bool) -> impl Fn(T) -> T + Copy {
    move |x: T| match pairs {
        true => T::from_f64(exp_short(x.to_f64() as f32) as f64),
        false => x.exp_nonpositive(),
    }
}
