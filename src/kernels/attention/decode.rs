//! Attention for short queries (decode: `L <= MAX_QUERIES`), split over fixed chunks of keys.
//!
//! A query row meets each key once, so nothing is worth packing: K and V are read row by row as
//! they lie, once per (batch, key/value head) for all the query heads that share them. The keys
//! are split into chunks of `CHUNK` (so a few long heads still keep every thread busy); each
//! chunk runs the online softmax of the module documentation over its key blocks and leaves a
//! partial result (running maximum, sum, unnormalised output), and [`merge`] combines the chunks
//! of each row in chunk order. The split depends on S alone, never on the thread count, and a
//! single chunk's merge reproduces the plain formula (`exp(m − m) = 1`).
//!
//! Each score is the dot product `q · k` in eight lanes (lane `t` is the chain of fused
//! multiply-adds over `d ≡ t (mod 8)`), added as `((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7))`:
//! the form that vectorises over `d` for row-major keys. It depends on the query length only
//! through this path's choice (`L`), so grouped heads equal repeated ones, bit for bit. For
//! float32 on AVX2 + FMA, groups of four rows take explicit kernels (`fast.rs`): the dot products
//! of four rows (eight with AVX-512) and two keys at a time, each key read once for all of them,
//! and P·V tiles; the rows left over (all of them without grouped heads at L = 1) take
//! single-row kernels: dot products of four keys side by side and a P·V row held in registers.
//! The explicit P·V leaves out no key, so it runs where no pair of its rows is masked or every
//! value is finite.
//!
//! Keys stored in strips (`AttnSpec::k_strips`, a `KVCache`'s) take the tiled path's order
//! instead: each score one chain of fused multiply-adds over `d` in order, lanes across the keys
//! of a strip (`strip_scores`, and `Explicit::strip_dots`). With the rest of the step the same
//! (masks, online softmax from whole key blocks, P·V, the chunk merge), a row decoded alone gets
//! the bits the tiled path gives it in one long call.

use super::fast::{VBlock, BK, MR, NR};
use super::generic::{add_pv, rows_as, score_tile};
use super::rows::{key_range, mask_row, update_row, RowAt};
use super::tile::HeadOut;
use super::{AttnFloat, AttnSpec, TaskInputs};
use crate::kernels::simd::Task;
use crate::kernels::storage::Storage;

/// The longest query that takes this path.
pub(super) const MAX_QUERIES: usize = 16;

/// One chunk's state for every row of its task, in one allocation (a decode call is short, and
/// allocations add up): the running maximum, the sum of probabilities, the unnormalised output
/// (`rows x Ev`) and, when weights are requested, the masked scores (`rows x` chunk length).
#[derive(Default)]
pub(super) struct Partial<T> {
    data: Vec<T>,
    rows: usize,
    ev: usize,
}

impl<T: AttnFloat> Partial<T> {
    fn new(rows: usize, ev: usize, width: usize) -> Self {
        let mut data = vec![T::ZERO; rows * (2 + ev + width)];
        data[..rows].fill(T::NEG_INFINITY); // m
        data[rows * (2 + ev)..].fill(T::NEG_INFINITY); // scores
        Self { data, rows, ev }
    }

    /// `(m, sum, acc, scores)`.
    fn parts(&self) -> (&[T], &[T], &[T], &[T]) {
        let (m, rest) = self.data.split_at(self.rows);
        let (sum, rest) = rest.split_at(self.rows);
        let (acc, scores) = rest.split_at(self.rows * self.ev);
        (m, sum, acc, scores)
    }

    /// `(m, sum, acc, scores)`.
    fn parts_mut(&mut self) -> (&mut [T], &mut [T], &mut [T], &mut [T]) {
        let (m, rest) = self.data.split_at_mut(self.rows);
        let (sum, rest) = rest.split_at_mut(self.rows);
        let (acc, scores) = rest.split_at_mut(self.rows * self.ev);
        (m, sum, acc, scores)
    }
}

/// Keys `keys.0..keys.1` of one (batch `b`, key/value head `g`), for the `group` query heads
/// that share it. Row `r` of the task is query position `r / group` of head `g·group + r % group`.
pub(super) struct Chunk<'a, Q, KV, T> {
    pub at: TaskInputs<'a, Q, KV, T>,
    pub keys: (usize, usize),
    pub weights: bool,
    pub partial: Partial<T>,
}

impl<Q, KV, T> Task for Chunk<'_, Q, KV, T>
where
    Q: Storage<Compute = T>,
    KV: Storage<Compute = T>,
    T: AttnFloat,
{
    #[inline(always)]
    fn run(&mut self) {
        let sp = self.at.spec;
        let (l, e, ev) = (sp.q_len, sp.dim_qk, sp.dim_v);
        let group = sp.heads_q / sp.heads_kv;
        let rows = group * l;
        let (c0, c1) = self.keys;
        let (b, g, masks) = (self.at.b, self.at.g, self.at.masks);
        let start = masks.key_start(b);
        let k_base = b * sp.k.batch + g * sp.k.head + start * sp.k.row;
        let v_base = b * sp.v.batch + g * sp.v.head + start * sp.v.row;
        let offset = self.at.masks.offset(sp, self.at.b);
        let slope = |h: usize| masks.slope(sp, b, h);
        let key_mask = masks.key_mask(sp, b);
        // Keys and values from the task's first row on, as stored: the explicit kernels read
        // them so (widening 16-bit elements as they load them), the generic code as T ([`rows_as`]:
        // 16-bit rows widened a key block at a time into `kw` and `vw`).
        let k_src = self.at.k.get(k_base..).unwrap_or_default();
        let v_src = self.at.v.get(v_base..).unwrap_or_default();
        let (mut kw, mut vw) = (Vec::new(), Vec::new());

        let scale = T::from_f64(sp.scale);
        // Scratch, in one allocation: the queries times `scale`, a key block's scores, and the
        // rows' rescaling factors.
        let mut work = vec![T::ZERO; rows * (e + BK + 1)];
        let (qs, rest) = work.split_at_mut(rows * e);
        let (scores, alpha) = rest.split_at_mut(rows * BK);
        for r in 0..rows {
            for (d, &x) in qs[r * e..(r + 1) * e].iter_mut().zip(self.at.q_row(r)) {
                *d = x.widen() * scale;
            }
        }
        let width = c1 - c0;
        self.partial = Partial::new(rows, ev, if self.weights { width } else { 0 });
        let (p_m, p_sum, p_acc, p_scores) = self.partial.parts_mut();
        // The explicit kernels (`fast.rs`), where they exist: tiles for whole groups of MR rows,
        // single-row kernels for the rest.
        let fast = T::detect();
        let fast_dots = fast.filter(|_| e > 0);
        let fast_pv = fast.filter(|_| ev > 0 && ev.is_multiple_of(NR));
        let fast_rows = if fast_dots.is_some() { rows / MR * MR } else { 0 };

        let (lo, hi) = key_range(sp, offset, 0, l - 1);
        let hi = hi.min(masks.keys_end(sp, b)); // no key after it is ever read
        let (lo, hi) = (lo.max(c0), hi.min(c1).max(lo.max(c0)));
        // Whole key blocks from the start, as in the tiled path (a row's sum runs in lanes
        // counted from its block's first column).
        let lo = if lo < hi { lo / BK * BK } else { hi };
        let mut k0 = lo;
        while k0 < hi {
            // Key blocks [BK·n, BK·(n + 1)), as in the tiled path, trimmed to the allowed range.
            let cols = (BK - k0 % BK).min(hi - k0);
            if key_mask.is_some_and(|km| km[k0..k0 + cols].iter().all(|&x| x == 0)) {
                k0 += cols; // a fully padded key block: nothing to compute
                continue;
            }
            let k_block = KV::stored(k_src).from(k0 * sp.k.row);
            match fast_dots {
                _ if sp.k_strips && e > 0 => {
                    // Keys in strips (`k0`, a multiple of BK, starts one): each score in the
                    // tiled path's order, from the block's whole strips.
                    let n = cols.div_ceil(NR) * NR * e;
                    match fast {
                        Some(token) => {
                            let kt = KV::stored(&k_src[..k0 * e + n]).from(k0 * e);
                            T::strip_dots(token, &qs[..rows * e], e, kt, cols, scores);
                        }
                        None => {
                            let (kt, _) = rows_as(k_src, e, e, k0, n / e, &mut kw);
                            strip_scores(&qs[..rows * e], e, &kt[..n], cols, scores);
                        }
                    }
                }
                Some(token) => {
                    if fast_rows > 0 {
                        T::dots(token, &qs[..fast_rows * e], e, k_block, sp.k.row, cols, scores);
                    }
                    for r in fast_rows..rows {
                        let (q, out) = (&qs[r * e..(r + 1) * e], &mut scores[r * BK..r * BK + cols]);
                        T::dots_row(token, q, k_block, sp.k.row, cols, out);
                    }
                }
                None => {
                    let (k, stride) = rows_as(k_src, sp.k.row, e, k0, cols, &mut kw);
                    for r in 0..rows {
                        let (q, out) = (&qs[r * e..(r + 1) * e], &mut scores[r * BK..r * BK + cols]);
                        dots(q, |j| &k[j * stride..][..e], out);
                    }
                }
            }
            for r in 0..rows {
                let (i, h) = self.at.position_head(r);
                let srow = &mut scores[r * BK..r * BK + cols];
                let at = RowAt { b, h, i, k0, offset, slope: slope(h), key_mask };
                let row_max = mask_row(sp, masks, at, srow);
                if self.weights {
                    p_scores[r * width + k0 - c0..][..cols].copy_from_slice(srow);
                }
                alpha[r] = update_row(fast, srow, row_max, &mut p_m[r], &mut p_sum[r]);
            }
            // P·V: the explicit kernels, which leave out no key, where that changes nothing: where
            // no probability is masked (−0.0), or where every value is finite (fma(−0.0, v, acc)
            // = acc then); else row by row, skipping masked pairs. The values are scanned only
            // when some pair is masked, and then once.
            // (A fold, not `any`, so that it vectorises: a row is short.)
            let masked =
                |r: usize| scores[r * BK..r * BK + cols].iter().fold(false, |m, x| m | x.is_neg_zero());
            let mut finite = None;
            let mut plain = |rows: std::ops::Range<usize>| {
                !rows.into_iter().any(masked)
                    || *finite.get_or_insert_with(|| {
                        (k0..k0 + cols)
                            .all(|j| v_src[j * sp.v.row..][..ev].iter().fold(true, |all, x| all & x.finite()))
                    })
            };
            let v_block = KV::stored(v_src).from(k0 * sp.v.row);
            let mut pv_rows = 0;
            if let Some(token) = fast_pv.filter(|_| fast_rows > 0 && plain(0..fast_rows)) {
                let vb = VBlock { v: v_block, key_stride: sp.v.row, strip_stride: NR, cols, ev };
                T::pv(token, scores, alpha, p_acc, fast_rows, &vb);
                pv_rows = fast_rows;
            }
            // The rows left take the explicit single-row kernel where `plain`, else the generic
            // code, which reads the block's values as T (made once, if any row needs them).
            let generic = (pv_rows..rows).any(|r| fast_pv.is_none() || !plain(r..r + 1));
            let v_t = generic.then(|| rows_as(v_src, sp.v.row, ev, k0, cols, &mut vw));
            for r in pv_rows..rows {
                let (pr, acc) = (&scores[r * BK..r * BK + cols], &mut p_acc[r * ev..(r + 1) * ev]);
                match (fast_pv.filter(|_| plain(r..r + 1)), v_t) {
                    (Some(token), _) => T::pv_row(token, pr, alpha[r], acc, v_block, sp.v.row),
                    (None, Some((v, stride))) => add_pv(pr, alpha[r], acc, |j| &v[j * stride..][..ev]),
                    (None, None) => {
                        unreachable!("the values as T are made when any row takes the generic code")
                    }
                }
            }
            k0 += cols;
        }
    }
}

/// `out[j] = q · k_row(j)` in the eight-lane form of the module documentation. Each key is one
/// short chain of vector multiply-adds; out-of-order execution overlaps consecutive keys. (Written
/// for LLVM to vectorise, four keys interleaved by hand or a tile of rows and keys came out a
/// third slower; the explicit kernel, `Explicit::dots`, does tile them.)
#[inline(always)]
fn dots<'k, T: AttnFloat + 'k>(q: &[T], k_row: impl Fn(usize) -> &'k [T], out: &mut [T]) {
    let (qc, qt) = q.as_chunks::<8>();
    for (j, o) in out.iter_mut().enumerate() {
        let (kc, kt) = k_row(j)[..q.len()].as_chunks::<8>();
        let mut l = [T::ZERO; 8];
        for (qv, kv) in qc.iter().zip(kc) {
            for ((a, &x), &y) in l.iter_mut().zip(qv).zip(kv) {
                *a = x.mul_add(y, *a);
            }
        }
        for ((a, &x), &y) in l.iter_mut().zip(qt).zip(kt) {
            *a = x.mul_add(y, *a);
        }
        *o = ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
    }
}

/// `scores[r·BK + j] = q_r · k_j` for the rows of `qs` (`e` apart) and the `cols` keys whose
/// strips `kt` holds (`kt[(j / NR · e + d) · NR + j % NR]`), in the tiled path's arithmetic
/// ([`score_tile`]: each score one chain of fused multiply-adds over `d` in order, from zero).
/// (The explicit kernel, `Explicit::strip_dots`, takes four rows at a time against each strip.)
#[inline(always)]
pub(super) fn strip_scores<T: AttnFloat>(qs: &[T], e: usize, kt: &[T], cols: usize, scores: &mut [T]) {
    for (q, out) in qs.chunks_exact(e).zip(scores.chunks_mut(BK)) {
        let (q, _) = q.as_chunks::<1>();
        for n in 0..cols.div_ceil(NR) {
            let [tile] = score_tile(q, &kt[n * e * NR..(n + 1) * e * NR]);
            let w = NR.min(cols - n * NR);
            out[n * NR..n * NR + w].copy_from_slice(&tile[..w]);
        }
    }
}

/// The merge of one (batch, key/value head)'s chunks into its heads' outputs, as a [`Task`] so
/// that its fused multiply-adds compile to instructions where the CPU has them (outside, they
/// are library calls).
pub(super) struct Merge<'c, 'a, 'h, 'o, Q, KV, T> {
    pub spec: &'a AttnSpec,
    pub chunks: &'c [Chunk<'a, Q, KV, T>],
    pub heads: &'h mut [HeadOut<'o, Q, T>],
}

impl<Q: Storage<Compute = T>, KV, T: AttnFloat> Task for Merge<'_, '_, '_, '_, Q, KV, T> {
    #[inline(always)]
    fn run(&mut self) {
        merge(self.spec, self.chunks, self.heads)
    }
}

/// Combines the chunks of one (batch, key/value head), in chunk order, into the outputs of its
/// query heads: each chunk's partial normalised, then merged by log-sum-exp (`merge.rs`, the
/// arithmetic the tiled path finishes with too), with the heads' sink logits.
#[inline(always)]
pub(super) fn merge<Q: Storage<Compute = T>, KV, T: AttnFloat>(
    spec: &AttnSpec,
    chunks: &[Chunk<'_, Q, KV, T>],
    heads: &mut [HeadOut<'_, Q, T>],
) {
    let (l, s, ev) = (spec.q_len, spec.kv_len, spec.dim_v);
    let group = heads.len();
    let (masks, g) = (chunks[0].at.masks, chunks[0].at.g);
    let n = chunks.len();
    let (mut lses, mut factors) = (vec![T::ZERO; n], vec![T::ZERO; n]);
    let (mut outs, mut row) = (vec![T::ZERO; n * ev], vec![T::ZERO; ev]);
    let parts: Vec<_> = chunks.iter().map(|c| c.partial.parts()).collect();
    for r in 0..group * l {
        let (i, head) = (r / group, &mut heads[r % group]);
        let sink = masks.sink(g * group + r % group).map(T::from_f64);
        // One chunk, no sink, and neither its log-sum-exp nor weights asked for: the partial is
        // the row (`merge.rs`), without the logarithms and exponential that merging it costs.
        let alone = n == 1 && sink.is_none() && head.lse.is_none() && head.weights.is_none();
        let lse = if alone {
            let (m, sum, acc, _) = parts[0];
            super::merge::normalise(m[r], sum[r], &acc[r * ev..(r + 1) * ev], &mut row, false)
        } else {
            for (c, &(m, sum, acc, _)) in parts.iter().enumerate() {
                let (acc, out) = (&acc[r * ev..(r + 1) * ev], &mut outs[c * ev..(c + 1) * ev]);
                lses[c] = super::merge::normalise(m[r], sum[r], acc, out, true);
            }
            super::merge::merge_row(&lses, |c| &outs[c * ev..(c + 1) * ev], sink, &mut row, &mut factors)
        };
        for (o, &x) in head.out[i * ev..(i + 1) * ev].iter_mut().zip(&row) {
            o.write(Q::narrow(x));
        }
        if let Some(l) = head.lse.as_deref_mut() {
            l[i].write(lse);
        }
        if let Some(out) = head.scores.as_deref_mut() {
            for (chunk, &(.., scores)) in chunks.iter().zip(&parts) {
                let (c0, c1) = chunk.keys;
                for (x, &score) in out[i * s + c0..i * s + c1].iter_mut().zip(&scores[r * (c1 - c0)..]) {
                    x.write(score);
                }
            }
        }
        if let Some(weights) = head.weights.as_deref_mut() {
            for (c, (chunk, &(m, sum, _, scores))) in chunks.iter().zip(&parts).enumerate() {
                let (c0, c1) = chunk.keys;
                let scores = &scores[r * (c1 - c0)..(r + 1) * (c1 - c0)];
                for (x, &score) in weights[i * s + c0..i * s + c1].iter_mut().zip(scores) {
                    x.write(super::merge::weight(score, m[r], sum[r], factors[c], T::exp_nonpositive));
                }
            }
        }
    }
}
