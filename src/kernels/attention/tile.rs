//! One (batch, query head) of attention: query blocks of `BQ` rows against key blocks of `BK`
//! keys, with the online softmax of the module documentation.
//!
//! Per key block: K is packed transposed (`kt[d][j]`) so each score row is built by vectorised
//! outer-product updates `s[j] += q[d] · kt[d][j]`; the scores are scaled, capped, masked and
//! biased in one pass, which also finds the row maximum; then the probabilities update the
//! running sum and the output accumulator (rescaled first when the maximum grew). All products
//! are fused multiply-adds, which are correctly rounded, so every code path gives the same bits.

use std::mem::MaybeUninit;

use super::{Alignment, AttnFloat, AttnSpec, Masks};
use crate::kernels::simd::Task;

/// Query rows per block.
const BQ: usize = 32;
/// Keys per block.
const BK: usize = 64;

pub(super) struct Head<'a, 'o, T> {
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    pub spec: &'a AttnSpec,
    pub masks: &'a Masks<'a, T>,
    pub b: usize,
    pub h: usize,
    pub out: &'o mut [MaybeUninit<T>],
    pub lse: Option<&'o mut [MaybeUninit<T>]>,
    pub weights: Option<&'o mut [MaybeUninit<T>]>,
}

impl<T: AttnFloat> Task for Head<'_, '_, T> {
    #[inline(always)]
    fn run(&mut self) {
        let sp = self.spec;
        let (l, s, e, ev) = (sp.q_len, sp.kv_len, sp.dim_qk, sp.dim_v);
        let g = self.h / (sp.heads_q / sp.heads_kv.max(1)).max(1);
        let q_base = self.b * sp.q.batch + self.h * sp.q.head;
        let k_base = self.b * sp.k.batch + g * sp.k.head;
        let v_base = self.b * sp.v.batch + g * sp.v.head;
        let offset = match sp.alignment {
            Alignment::TopLeft => 0isize,
            Alignment::BottomRight => s as isize - l as isize,
        };
        let slope = self
            .masks
            .alibi
            .map(|a| a[if a.len() == sp.heads_q { self.h } else { self.b * sp.heads_q + self.h }]);
        let key_mask = self.masks.key_mask.map(|km| &km[self.b * s..(self.b + 1) * s]);

        let mut kt = vec![T::ZERO; e * BK];
        let mut scores = [T::ZERO; BQ * BK];
        let mut valid = [false; BQ * BK];
        let mut acc = vec![T::ZERO; BQ * ev];
        let (mut m, mut sum) = ([T::NEG_INFINITY; BQ], [T::ZERO; BQ]);
        // The masked scores of the current query block, kept only when weights are requested.
        let mut block_scores = vec![T::NEG_INFINITY; if self.weights.is_some() { BQ * s } else { 0 }];

        for q0 in (0..l).step_by(BQ) {
            let rows = BQ.min(l - q0);
            m[..rows].fill(T::NEG_INFINITY);
            sum[..rows].fill(T::ZERO);
            acc[..rows * ev].fill(T::ZERO);
            block_scores.fill(T::NEG_INFINITY);
            let (lo, hi) = key_range(sp, offset, q0, q0 + rows - 1);
            let mut k0 = lo;
            while k0 < hi {
                let cols = BK.min(hi - k0);
                if key_mask.is_some_and(|km| km[k0..k0 + cols].iter().all(|&x| x == 0)) {
                    k0 += cols; // a fully padded key block: nothing to compute
                    continue;
                }
                for j in 0..cols {
                    let row = &self.k[k_base + (k0 + j) * sp.k.row..][..e];
                    for d in 0..e {
                        kt[d * BK + j] = row[d];
                    }
                }
                for r in 0..rows {
                    let i = q0 + r;
                    let qrow = &self.q[q_base + i * sp.q.row..][..e];
                    let srow = &mut scores[r * BK..r * BK + cols];
                    srow.fill(T::ZERO);
                    for d in 0..e {
                        let qd = qrow[d];
                        let ktd = &kt[d * BK..d * BK + cols];
                        for j in 0..cols {
                            srow[j] = qd.mul_add(ktd[j], srow[j]);
                        }
                    }
                    let vrow = &mut valid[r * BK..r * BK + cols];
                    let row_max = self.mask_row(i, k0, offset, slope, key_mask, srow, vrow);
                    // The running maximum propagates NaN, so a NaN score (from NaN in an unmasked
                    // query or key) makes its row NaN instead of being passed over.
                    let m_new = if row_max.is_nan() || row_max > m[r] { row_max } else { m[r] };
                    if !block_scores.is_empty() {
                        block_scores[r * s + k0..r * s + k0 + cols].copy_from_slice(srow);
                    }
                    if m_new == T::NEG_INFINITY {
                        continue; // no valid key for this row yet
                    }
                    let alpha = (m[r] - m_new).exp_nonpositive();
                    let a = &mut acc[r * ev..(r + 1) * ev];
                    if alpha != T::ONE {
                        for x in a.iter_mut() {
                            *x = *x * alpha;
                        }
                    }
                    let mut row_sum = sum[r] * alpha;
                    for j in 0..cols {
                        if !vrow[j] {
                            continue;
                        }
                        let p = (srow[j] - m_new).exp_nonpositive();
                        row_sum = row_sum + p;
                        let vr = &self.v[v_base + (k0 + j) * sp.v.row..][..ev];
                        for d in 0..ev {
                            a[d] = p.mul_add(vr[d], a[d]);
                        }
                    }
                    sum[r] = row_sum;
                    m[r] = m_new;
                }
                k0 += cols;
            }
            self.finish_rows(q0, rows, &m, &sum, &acc, &block_scores);
        }
    }
}

/// The keys `[lo, hi)` that causal and window bounds allow for query rows `first..=last`.
#[inline(always)]
fn key_range(sp: &AttnSpec, offset: isize, first: usize, last: usize) -> (usize, usize) {
    let s = sp.kv_len as isize;
    let (first, last) = (first as isize + offset, last as isize + offset);
    let mut lo = 0isize;
    let mut hi = s;
    if let Some(left) = sp.window.0 {
        lo = lo.max(first - left as isize);
    }
    if sp.causal {
        hi = hi.min(last + 1);
    }
    if let Some(right) = sp.window.1 {
        hi = hi.min(last + right as isize + 1);
    }
    let lo = lo.clamp(0, s) as usize;
    (lo, (hi.clamp(0, s) as usize).max(lo))
}

impl<T: AttnFloat> Head<'_, '_, T> {
    /// Scales, caps, biases and masks one row of raw scores (keys `k0..`) in place, marks which
    /// keys are valid, and returns the largest valid score (−inf if none).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn mask_row(
        &self,
        i: usize,
        k0: usize,
        offset: isize,
        slope: Option<f64>,
        key_mask: Option<&[u8]>,
        srow: &mut [T],
        vrow: &mut [bool],
    ) -> T {
        let sp = self.spec;
        let (scale, cap) = (T::from_f64(sp.scale), sp.softcap.map(T::from_f64));
        let pos = i as isize + offset;
        let mut row_max = T::NEG_INFINITY;
        for (j, (sc, ok)) in srow.iter_mut().zip(vrow.iter_mut()).enumerate() {
            let key = k0 + j;
            let kp = key as isize;
            let mut good = !(sp.causal && kp > pos)
                && sp.window.0.is_none_or(|left| kp >= pos - left as isize)
                && sp.window.1.is_none_or(|right| kp <= pos + right as isize)
                && key_mask.is_none_or(|km| km[key] != 0)
                && self.masks.bool_mask.is_none_or(|bm| bm.at(self.b, self.h, i, key) != 0);
            let mut x = *sc * scale;
            if let Some(c) = cap {
                x = c * (x / c).tanh();
            }
            if let Some(fm) = self.masks.float_mask {
                let add = fm.at(self.b, self.h, i, key);
                good = good && add != T::NEG_INFINITY;
                x = x + add;
            }
            if let Some(sl) = slope {
                x = x - T::from_f64(sl * (pos - kp).unsigned_abs() as f64);
            }
            *ok = good;
            *sc = if good { x } else { T::NEG_INFINITY };
            if good && (x > row_max || x.is_nan()) {
                row_max = x;
            }
        }
        row_max
    }

    /// Writes `out`, `lse` and normalised `weights` for query rows `q0..q0 + rows`.
    #[inline(always)]
    fn finish_rows(&mut self, q0: usize, rows: usize, m: &[T], sum: &[T], acc: &[T], scores: &[T]) {
        let (s, ev) = (self.spec.kv_len, self.spec.dim_v);
        for r in 0..rows {
            let i = q0 + r;
            let empty = m[r] == T::NEG_INFINITY;
            let out = &mut self.out[i * ev..(i + 1) * ev];
            for (o, &a) in out.iter_mut().zip(&acc[r * ev..(r + 1) * ev]) {
                o.write(if empty { T::ZERO } else { a / sum[r] });
            }
            if let Some(lse) = self.lse.as_deref_mut() {
                lse[i].write(if empty { T::NEG_INFINITY } else { m[r] + sum[r].ln() });
            }
            if let Some(w) = self.weights.as_deref_mut() {
                for (x, &score) in w[i * s..(i + 1) * s].iter_mut().zip(&scores[r * s..(r + 1) * s]) {
                    x.write(if empty { T::ZERO } else { (score - m[r]).exp_nonpositive() / sum[r] });
                }
            }
        }
    }
}
