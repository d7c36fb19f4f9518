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

use std::mem::MaybeUninit;

use crate::error::{expect_len, product, KernelError};
use crate::kernels::storage::Storage;
use crate::kernels::{for_each_row_block, Float, Rows};
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

/// The shape and kind of an [`apply_rope`] call.
#[derive(Debug, Clone, Copy)]
pub struct RopeSpec {
    pub batch: usize,
    pub heads: usize,
    pub seq: usize,
    pub head_dim: usize,
    /// `r / 2`: entries per row of `cos` and `sin`.
    pub half: usize,
    /// Whether `cos`/`sin` carry a batch axis (`(batch, seq, h)`) or are shared (`(seq, h)`).
    pub per_batch_tables: bool,
    pub layout: RopeLayout,
    pub style: RopeStyle,
}

impl RopeSpec {
    /// Checks the slice lengths against the shape (with overflow checks).
    fn check(&self, x: usize, cos: usize, sin: usize, out: usize) -> Result<(), KernelError> {
        let x_len = product(&[self.batch, self.heads, self.seq, self.head_dim]);
        let table_batch = if self.per_batch_tables { self.batch } else { 1 };
        let table_len = product(&[table_batch, self.seq, self.half]);
        if self.half.checked_mul(2).is_none_or(|r| r > self.head_dim) {
            return Err(KernelError::invalid(
                "cos",
                format!("rotates 2 * {} channels, more than head_dim = {}", self.half, self.head_dim),
            ));
        }
        for (arg, len, expected) in
            [("x", x, x_len), ("cos", cos, table_len), ("sin", sin, table_len), ("out", out, x_len)]
        {
            expect_len(arg, len, expected)?;
        }
        Ok(())
    }

    /// The row of `cos`/`sin` that row `r` of `x` uses: `r` is `(b, head, s)` in `Bhsd` order and
    /// `(b, s, head)` in `Bshd` order.
    #[inline(always)]
    fn table_row(&self, r: usize) -> usize {
        let b = r / (self.heads * self.seq);
        let s = match self.layout {
            RopeLayout::Bhsd => r % self.seq,
            RopeLayout::Bshd => (r / self.heads) % self.seq,
        };
        if self.per_batch_tables {
            b * self.seq + s
        } else {
            s
        }
    }
}

/// Rotates the first `2 * spec.half` channels of every row of `x` into `out`, in the tables' float
/// type `T` (a 16-bit `x` in float32: each element widened, rotated, rounded once).
pub fn apply_rope<X: Storage<Compute = T>, T: Float>(
    x: &[X],
    cos: &[T],
    sin: &[T],
    spec: RopeSpec,
    out: &mut [MaybeUninit<X>],
    par: Par<'_>,
) -> Result<(), KernelError> {
    spec.check(x.len(), cos.len(), sin.len(), out.len())?;
    for_each_row_block(out, spec.head_dim, par, &Rotate { x, cos, sin, spec });
    Ok(())
}

struct Rotate<'a, X, T> {
    x: &'a [X],
    cos: &'a [T],
    sin: &'a [T],
    spec: RopeSpec,
}

impl<X: Storage<Compute = T>, T: Float> Rows<MaybeUninit<X>> for Rotate<'_, X, T> {
    #[inline(always)]
    fn rows(&self, first: usize, block: &mut [MaybeUninit<X>]) {
        let (d, h) = (self.spec.head_dim, self.spec.half);
        for (k, dst) in block.chunks_exact_mut(d).enumerate() {
            let r = first + k;
            let src = &self.x[r * d..(r + 1) * d];
            let t = self.spec.table_row(r) * h;
            let (c, n) = (&self.cos[t..t + h], &self.sin[t..t + h]);
            match self.spec.style {
                RopeStyle::Half => rotate_half(src, c, n, dst),
                RopeStyle::Interleaved => rotate_pairs(src, c, n, dst),
            }
            dst[2 * h..].write_copy_of_slice(&src[2 * h..]);
        }
    }
}

#[inline(always)]
fn rotate_half<X: Storage<Compute = T>, T: Float>(x: &[X], c: &[T], n: &[T], out: &mut [MaybeUninit<X>]) {
    let h = c.len();
    let (x1, x2) = (&x[..h], &x[h..2 * h]);
    let (o1, rest) = out.split_at_mut(h);
    let o2 = &mut rest[..h];
    for i in 0..h {
        let (a, b) = (x1[i].widen(), x2[i].widen());
        o1[i].write(X::narrow(a * c[i] - b * n[i]));
        o2[i].write(X::narrow(b * c[i] + a * n[i]));
    }
}

#[inline(always)]
fn rotate_pairs<X: Storage<Compute = T>, T: Float>(x: &[X], c: &[T], n: &[T], out: &mut [MaybeUninit<X>]) {
    let h = c.len();
    for (((o, p), &ci), &ni) in out[..2 * h].chunks_exact_mut(2).zip(x[..2 * h].chunks_exact(2)).zip(c).zip(n)
    {
        let (a, b) = (p[0].widen(), p[1].widen());
        o[0].write(X::narrow(a * ci - b * ni));
        o[1].write(X::narrow(b * ci + a * ni));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::output::collect;

    fn run<T: Float + Storage<Compute = T>>(
        x: &[T],
        cos: &[T],
        sin: &[T],
        s: RopeSpec,
    ) -> Result<Vec<T>, KernelError> {
        collect("out", x.len(), |out| apply_rope(x, cos, sin, s, out, Par::SEQ))
    }

    /// The formula, one element at a time, in float64.
    fn naive(x: &[f64], cos: &[f64], sin: &[f64], s: RopeSpec) -> Vec<f64> {
        let mut out = x.to_vec();
        let (h, d) = (s.half, s.head_dim);
        for b in 0..s.batch {
            for hd in 0..s.heads {
                for q in 0..s.seq {
                    let row = match s.layout {
                        RopeLayout::Bhsd => ((b * s.heads + hd) * s.seq + q) * d,
                        RopeLayout::Bshd => ((b * s.seq + q) * s.heads + hd) * d,
                    };
                    let t = (if s.per_batch_tables { b * s.seq + q } else { q }) * h;
                    for i in 0..h {
                        let (a, z) = match s.style {
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

    fn spec(half: usize, per_batch_tables: bool) -> RopeSpec {
        RopeSpec {
            batch: 2,
            heads: 3,
            seq: 5,
            head_dim: 8,
            half,
            per_batch_tables,
            layout: RopeLayout::Bhsd,
            style: RopeStyle::Half,
        }
    }

    #[test]
    fn matches_naive_formula_for_every_style_layout_and_partial_rotary() {
        for (half, per_batch) in [(3, false), (2, true), (0, false), (4, true)] {
            let n = 2 * 3 * 5 * 8;
            let x: Vec<f64> = (0..n).map(|i| ((i * 37) % 101) as f64 / 17.0 - 2.0).collect();
            let tl = if per_batch { 2 } else { 1 } * 5 * half;
            let cos: Vec<f64> = (0..tl).map(|i| (i as f64 * 0.3).cos()).collect();
            let sin: Vec<f64> = (0..tl).map(|i| (i as f64 * 0.3).sin()).collect();
            for layout in [RopeLayout::Bhsd, RopeLayout::Bshd] {
                for style in [RopeStyle::Half, RopeStyle::Interleaved] {
                    let s = RopeSpec { layout, style, ..spec(half, per_batch) };
                    assert_eq!(
                        run(&x, &cos, &sin, s).unwrap(),
                        naive(&x, &cos, &sin, s),
                        "{layout:?} {style:?} {half}"
                    );
                }
            }
        }
    }

    #[test]
    fn rejects_inconsistent_shapes() {
        let s = RopeSpec { batch: 1, heads: 1, seq: 2, head_dim: 4, ..spec(3, false) };
        let (x, t) = ([0.0f32; 8], [0.0f32; 6]);
        assert!(run(&x, &t, &t, s).is_err(), "2 * 3 channels > head_dim");
        let s = RopeSpec { half: 2, ..s };
        assert!(run(&x, &t, &t, s).is_err(), "tables of 6, not 4");
        let s = RopeSpec { batch: usize::MAX, ..s };
        assert!(run(&x, &t[..4], &t[..4], s).is_err(), "overflow");
    }
}
