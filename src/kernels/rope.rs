//! Rotary position embedding (RoPE) applied to queries or keys.
//!
//! For one row `x` of `head_dim` channels at sequence position `s`, with `c = cos[s, :]` and
//! `n = sin[s, :]` of `h` entries each (the rotary dimension is `r = 2h <= head_dim`):
//!
//! ```text
//! Half        (GPT-NeoX, LLaMA):  out[i]     = x[i] c[i] - x[h+i] n[i]
//!                                  out[h+i]   = x[h+i] c[i] + x[i] n[i]        0 <= i < h
//! Interleaved (GPT-J):             out[2i]    = x[2i] c[i] - x[2i+1] n[i]
//!                                  out[2i+1]  = x[2i+1] c[i] + x[2i] n[i]
//! out[j] = x[j] for r <= j < head_dim                               (partial rotary)
//! ```
//!
//! Each output is one product, one product and one add or subtract in the input type, in that
//! order, so it matches `x * cos + rotate_half(x) * sin` in the same type bit for bit.
//!
//! Memory: `x` and `out` row-major `(batch, heads, seq, head_dim)` (`Bhsd`) or
//! `(batch, seq, heads, head_dim)` (`Bshd`); `cos`/`sin` row-major `(seq, h)` shared by the batch,
//! or `(batch, seq, h)`. Parallel split: blocks of rows.

use crate::error::KernelError;
use crate::kernels::{for_each_row_block, Float};
use crate::pool::Par;

/// Which channels are rotated together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Channel `i` with channel `i + r/2` (`rotate_half`).
    Half,
    /// Channel `2i` with channel `2i + 1`.
    Interleaved,
}

/// The order of the axes of `x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    Bhsd,
    Bshd,
}

/// The shape of an [`apply_rope`] call.
#[derive(Debug, Clone, Copy)]
pub struct RopeShape {
    pub batch: usize,
    pub heads: usize,
    pub seq: usize,
    pub head_dim: usize,
    /// `r / 2`: entries per row of `cos` and `sin`.
    pub half: usize,
    /// Whether `cos`/`sin` carry a batch axis (`(batch, seq, h)`) or are shared (`(seq, h)`).
    pub per_batch_tables: bool,
}

fn check(
    shape: &RopeShape,
    x: usize,
    cos: usize,
    sin: usize,
    out: usize,
) -> Result<(), KernelError> {
    let RopeShape {
        batch,
        heads,
        seq,
        head_dim,
        half,
        per_batch_tables,
    } = *shape;
    let rows = [batch, heads, seq]
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d));
    let x_len = rows.and_then(|r| r.checked_mul(head_dim));
    let table_len = seq
        .checked_mul(half)
        .and_then(|n| n.checked_mul(if per_batch_tables { batch } else { 1 }));
    if half.checked_mul(2).is_none_or(|r| r > head_dim) {
        return Err(KernelError::invalid(
            "cos",
            format!("rotates 2 * {half} channels, more than head_dim = {head_dim}"),
        ));
    }
    for (arg, len, expected) in [
        ("x", x, x_len),
        ("cos", cos, table_len),
        ("sin", sin, table_len),
        ("out", out, x_len),
    ] {
        if Some(len) != expected {
            return Err(KernelError::invalid(
                arg,
                format!("has {len} elements, expected {expected:?}"),
            ));
        }
    }
    Ok(())
}

/// Rotates the first `2 * shape.half` channels of every row of `x` into `out`.
pub fn apply_rope<T: Float>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    shape: RopeShape,
    layout: RopeLayout,
    style: RopeStyle,
    out: &mut [T],
    par: Par<'_>,
) -> Result<(), KernelError> {
    check(&shape, x.len(), cos.len(), sin.len(), out.len())?;
    let RopeShape {
        heads,
        seq,
        head_dim: d,
        half: h,
        per_batch_tables,
        ..
    } = shape;
    // Row r of x is (b, head, s) in Bhsd order or (b, s, head) in Bshd order.
    let table_row = move |r: usize| {
        let b = r / (heads * seq);
        let s = match layout {
            RopeLayout::Bhsd => r % seq,
            RopeLayout::Bshd => (r / heads) % seq,
        };
        if per_batch_tables {
            b * seq + s
        } else {
            s
        }
    };
    for_each_row_block(out, d, par, |first, block| {
        for (k, dst) in block.chunks_exact_mut(d).enumerate() {
            let r = first + k;
            let src = &x[r * d..(r + 1) * d];
            let t = table_row(r) * h;
            let (c, n) = (&cos[t..t + h], &sin[t..t + h]);
            match style {
                RopeStyle::Half => rotate_half(src, c, n, dst),
                RopeStyle::Interleaved => rotate_pairs(src, c, n, dst),
            }
            dst[2 * h..].copy_from_slice(&src[2 * h..]);
        }
    });
    Ok(())
}

#[inline(always)]
fn rotate_half<T: Float>(x: &[T], c: &[T], n: &[T], out: &mut [T]) {
    let h = c.len();
    let (x1, x2) = (&x[..h], &x[h..2 * h]);
    let (o1, rest) = out.split_at_mut(h);
    let o2 = &mut rest[..h];
    for i in 0..h {
        o1[i] = x1[i] * c[i] - x2[i] * n[i];
        o2[i] = x2[i] * c[i] + x1[i] * n[i];
    }
}

#[inline(always)]
fn rotate_pairs<T: Float>(x: &[T], c: &[T], n: &[T], out: &mut [T]) {
    let h = c.len();
    for (((o, p), &ci), &ni) in out[..2 * h]
        .chunks_exact_mut(2)
        .zip(x[..2 * h].chunks_exact(2))
        .zip(c)
        .zip(n)
    {
        o[0] = p[0] * ci - p[1] * ni;
        o[1] = p[1] * ci + p[0] * ni;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The formula, one element at a time, in float64.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        x: &[f64],
        cos: &[f64],
        sin: &[f64],
        s: RopeShape,
        layout: RopeLayout,
        style: RopeStyle,
    ) -> Vec<f64> {
        let mut out = x.to_vec();
        let (h, d) = (s.half, s.head_dim);
        for b in 0..s.batch {
            for hd in 0..s.heads {
                for q in 0..s.seq {
                    let row = match layout {
                        RopeLayout::Bhsd => ((b * s.heads + hd) * s.seq + q) * d,
                        RopeLayout::Bshd => ((b * s.seq + q) * s.heads + hd) * d,
                    };
                    let t = (if s.per_batch_tables { b * s.seq + q } else { q }) * h;
                    for i in 0..h {
                        let (a, z) = match style {
                            RopeStyle::Half => (i, i + h),
                            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                        };
                        let (xa, xz) = (x[row + a], x[row + z]);
                        out[row + a] = xa * cos[t + i] - xz * sin[t + i];
                        out[row + z] = xz * cos[t + i] + xa * sin[t + i];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_naive_formula_for_every_style_layout_and_partial_rotary() {
        for (half, per_batch) in [(3, false), (2, true), (0, false), (4, true)] {
            let s = RopeShape {
                batch: 2,
                heads: 3,
                seq: 5,
                head_dim: 8,
                half,
                per_batch_tables: per_batch,
            };
            let n = 2 * 3 * 5 * 8;
            let x: Vec<f64> = (0..n)
                .map(|i| ((i * 37) % 101) as f64 / 17.0 - 2.0)
                .collect();
            let tl = if per_batch { 2 } else { 1 } * 5 * half;
            let cos: Vec<f64> = (0..tl).map(|i| (i as f64 * 0.3).cos()).collect();
            let sin: Vec<f64> = (0..tl).map(|i| (i as f64 * 0.3).sin()).collect();
            for layout in [RopeLayout::Bhsd, RopeLayout::Bshd] {
                for style in [RopeStyle::Half, RopeStyle::Interleaved] {
                    let mut out = vec![0.0; n];
                    apply_rope(&x, &cos, &sin, s, layout, style, &mut out, Par::Seq).unwrap();
                    assert_eq!(
                        out,
                        naive(&x, &cos, &sin, s, layout, style),
                        "{layout:?} {style:?} {half}"
                    );
                }
            }
        }
    }

    #[test]
    fn rejects_inconsistent_shapes() {
        let s = RopeShape {
            batch: 1,
            heads: 1,
            seq: 2,
            head_dim: 4,
            half: 3,
            per_batch_tables: false,
        };
        let mut out = vec![0.0f32; 8];
        let t = vec![0.0f32; 6];
        let err = apply_rope(
            &[0.0f32; 8],
            &t,
            &t,
            s,
            RopeLayout::Bhsd,
            RopeStyle::Half,
            &mut out,
            Par::Seq,
        );
        assert!(err.is_err());
        let s = RopeShape { half: 2, ..s };
        let err = apply_rope(
            &[0.0f32; 8],
            &t,
            &t,
            s,
            RopeLayout::Bhsd,
            RopeStyle::Half,
            &mut out,
            Par::Seq,
        );
        assert!(err.is_err());
        let s = RopeShape {
            batch: usize::MAX,
            ..s
        };
        let err = apply_rope(
            &[0.0f32; 8],
            &t[..4],
            &t[..4],
            s,
            RopeLayout::Bhsd,
            RopeStyle::Half,
            &mut out,
            Par::Seq,
        );
        assert!(err.is_err());
    }
}
