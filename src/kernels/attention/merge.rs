//! Attention over disjoint key sets, combined: the one arithmetic by which every path finishes a
//! row whose keys span more than one chunk, and by which `merge_attention` combines the results
//! of separate calls.
//!
//! Keys are split into chunks of `CHUNK` positions, `[c·CHUNK, (c + 1)·CHUNK)`, whatever the path
//! (the decode path runs one task per chunk; the tiled path walks a row's chunks in turn). Each
//! chunk's online softmax ends as a partial result, normalised: `out_c = acc_c / sum_c` and
//! `lse_c = m_c + ln sum_c` (−inf where the chunk has no valid key, and then left out). The
//! partials of a row merge, in chunk order, by their log-sum-exp: with `M` the largest `lse_c`
//! (NaN, once met, stays) and `w_c = exp(lse_c − M)`,
//!
//! ```text
//! out = Σ_c w_c · out_c / Σ_c w_c,      lse = M + ln Σ_c w_c
//! ```
//!
//! (a sink logit `σ` joins `M` and adds `exp(σ − M)` to the denominator). With one partial this
//! is the partial itself, bit for bit (`w = 1`), so a row inside one chunk finishes as it always
//! did; and since results of separate calls over each chunk's keys are these partials,
//! `merge_attention` of them gives the bits of one call over all the keys.

use super::AttnFloat;

/// Keys per chunk, a multiple of the key block `BK`.
pub(super) const CHUNK: usize = 512;

/// One row's running softmax state (`m`, `sum`, `acc`) as a normalised partial: writes
/// `acc / sum` (+0 for a zero) to `out` and returns `m + ln sum`; a row with no valid key
/// (`m = −inf`) gives zeros and −inf. Without `lse` (where nobody reads it) every row returns
/// −inf, and the logarithm is not taken.
#[inline(always)]
pub(super) fn normalise<T: AttnFloat>(m: T, sum: T, acc: &[T], out: &mut [T], lse: bool) -> T {
    if m == T::NEG_INFINITY {
        out.fill(T::ZERO);
        return T::NEG_INFINITY;
    }
    for (o, &a) in out.iter_mut().zip(acc) {
        *o = a / sum + T::ZERO;
    }
    match lse {
        true => m + sum.ln(),
        false => T::NEG_INFINITY,
    }
}

/// The weight of `score` in a partial whose maximum is `m` and sum `sum`, and whose share of its
/// row is `share` (see [`merge_row`]): `exp(score − m) / sum · share`, 0 in a partial with no
/// valid key. `exp` is the path's exponential.
#[inline(always)]
pub(super) fn weight<T: AttnFloat>(score: T, m: T, sum: T, share: T, exp: impl Fn(T) -> T) -> T {
    match m == T::NEG_INFINITY {
        true => T::ZERO,
        false => exp(score - m) / sum * share,
    }
}

/// Merges one row's partials (`lses[c]`, `out_of(c)`) in order, with an optional sink logit, into
/// `out`; returns the row's log-sum-exp and leaves in `factors[c]` the share `w_c / Σ w` of
/// partial `c` (0 for one left out), by which its own weights scale. A row with no partial and no
/// sink gives zeros and −inf.
#[inline(always)]
pub(super) fn merge_row<'o, T: AttnFloat + 'o>(
    lses: &[T],
    out_of: impl Fn(usize) -> &'o [T],
    sink: Option<T>,
    out: &mut [T],
    factors: &mut [T],
) -> T {
    let mut big = T::NEG_INFINITY;
    for &lse in lses.iter().chain(&sink) {
        if !big.is_nan() && (lse.is_nan() || lse > big) {
            big = lse;
        }
    }
    factors.fill(T::ZERO);
    if big == T::NEG_INFINITY {
        out.fill(T::ZERO);
        return T::NEG_INFINITY;
    }
    let mut total = T::ZERO;
    for (f, &lse) in factors.iter_mut().zip(lses) {
        if lse != T::NEG_INFINITY {
            *f = (lse - big).exp_nonpositive();
            total = total + *f;
        }
    }
    if let Some(sink) = sink {
        total = total + (sink - big).exp_nonpositive();
    }
    out.fill(T::ZERO);
    for (c, (&w, &lse)) in factors.iter().zip(lses).enumerate() {
        if lse != T::NEG_INFINITY {
            for (o, &x) in out.iter_mut().zip(out_of(c)) {
                *o = x.mul_add(w, *o);
            }
        }
    }
    for o in out.iter_mut() {
        *o = *o / total + T::ZERO;
    }
    for f in factors.iter_mut() {
        *f = *f / total;
    }
    big + total.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_partial_merges_to_itself_bit_for_bit() {
        let out_c = [0.1f32, -2.5, 3.75, 0.0];
        for lse in [-3.0f32, 0.0, 17.25] {
            let mut out = [9.0f32; 4];
            let mut f = [0.0f32; 3];
            let lses = [f32::NEG_INFINITY, lse, f32::NEG_INFINITY];
            let got = merge_row(
                &lses,
                |c| if c == 1 { &out_c[..] } else { &[f32::NAN; 4][..] },
                None,
                &mut out,
                &mut f,
            );
            assert_eq!(got.to_bits(), lse.to_bits());
            assert_eq!(out.map(f32::to_bits), out_c.map(f32::to_bits));
            assert_eq!(f, [0.0, 1.0, 0.0]);
        }
    }

    #[test]
    fn nan_stays_and_nothing_gives_zeros() {
        let (mut out, mut f) = ([1.0f64; 2], [0.0f64; 2]);
        let lse = merge_row(&[f64::NAN, 5.0], |_| &[1.0, 2.0][..], None, &mut out, &mut f);
        assert!(lse.is_nan() && out.iter().all(|x| x.is_nan()));
        let lse = merge_row(&[f64::NEG_INFINITY; 2], |_| &[1.0, 2.0][..], None, &mut out, &mut f);
        assert_eq!((lse, out), (f64::NEG_INFINITY, [0.0; 2]));
        let lse = merge_row(&[f64::NEG_INFINITY; 2], |_| &[1.0, 2.0][..], Some(0.5), &mut out, &mut f);
        assert_eq!((lse, out), (0.5, [0.0; 2]));
    }
}
