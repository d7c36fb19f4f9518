//! The float32 explicit kernels on x86-64 ([`Explicit`] for `f32`), and which instruction set runs
//! each kernel: AVX2 + FMA (`avx2.rs`), or AVX-512 (`avx512.rs`) where the CPU has it. The kernel files
//! depend only on the micro-kernel trait and its constants (`fast.rs`) and on `lanes.rs`; this
//! file is the one place that chooses between them.

use super::fast::{Explicit, ScoreBlock, VBlock, BK, MR};
use super::lanes::Lanes;
use super::{avx2, avx512};
use crate::kernels::simd;
use crate::kernels::storage::Stored;

/// Runs `$body` with `$x` bound to the slice `$stored` holds, whichever element type it is.
macro_rules! with_lanes {
    ($stored:expr, $x:ident => $body:expr) => {
        match $stored {
            Stored::Compute($x) => $body,
            Stored::F16($x) => $body,
            Stored::Bf16($x) => $body,
        }
    };
}

/// Proof that this CPU runs AVX2, FMA and F16C (and that the accelerated path is enabled), and
/// whether it runs AVX-512F and VL too: only [`X86::detect`] makes one.
#[derive(Clone, Copy)]
pub struct X86 {
    avx512: bool,
}

impl X86 {
    #[inline(always)]
    fn detect() -> Option<Self> {
        simd::accelerated().then(|| Self { avx512: simd::avx512() })
    }

    #[inline(always)]
    fn pv<L: Lanes>(self, p: &[f32], alpha: &[f32], out: &mut [f32], rows: usize, vb: &VBlock<&[L]>) {
        if self.avx512 {
            // SAFETY: `avx512` is true only on a CPU with AVX-512F and AVX-512VL.
            return unsafe { avx512::pv(p, alpha, out, rows, vb) };
        }
        for r0 in (0..rows).step_by(MR) {
            let (p, alpha, out) =
                (&p[r0 * BK..], &alpha[r0..r0 + MR], &mut out[r0 * vb.ev..(r0 + MR) * vb.ev]);
            // SAFETY: `self` exists only on a CPU with AVX2, FMA and F16C.
            unsafe { avx2::pv(p, alpha, out, vb) }
        }
    }

    /// Eight rows at a time where the CPU has the 32 registers of AVX-512 (16 accumulators),
    /// then four.
    #[inline(always)]
    fn dots<L: Lanes>(self, q: &[f32], e: usize, k: &[L], stride: usize, n: usize, out: &mut [f32]) {
        let rows = q.len() / e;
        assert!(rows.is_multiple_of(MR));
        let mut r = 0;
        if self.avx512 {
            while r + 2 * MR <= rows {
                let (q, out) = (&q[r * e..(r + 2 * MR) * e], &mut out[r * BK..]);
                // SAFETY: as in `pv`.
                unsafe { dots_wide(q, e, k, stride, n, out) };
                r += 2 * MR;
            }
        }
        while r < rows {
            // SAFETY: as in `pv`.
            unsafe { avx2::dots(&q[r * e..(r + MR) * e], e, k, stride, n, &mut out[r * BK..]) };
            r += MR;
        }
    }
}

impl Explicit for f32 {
    type Token = X86;

    #[inline(always)]
    fn detect() -> Option<X86> {
        X86::detect()
    }

    #[inline(always)]
    fn scores(t: X86, blk: &ScoreBlock<'_, f32>, scores: &mut [f32], max: &mut [f32]) {
        if t.avx512 {
            // SAFETY: `avx512` is true only on a CPU with AVX-512F and AVX-512VL.
            return unsafe { avx512::masked_scores(blk, scores, max) };
        }
        // SAFETY: a token exists only on a CPU with AVX2, FMA and F16C.
        unsafe { avx2::masked_scores(blk, scores, max) }
    }

    #[inline(always)]
    fn probabilities(t: X86, row: &mut [f32], m: f32) -> f32 {
        if t.avx512 {
            // SAFETY: as in `scores`.
            return unsafe { avx512::probabilities(row, m) };
        }
        // SAFETY: as in `scores`.
        unsafe { avx2::probabilities(row, m) }
    }

    #[inline(always)]
    fn pv(t: X86, p: &[f32], alpha: &[f32], out: &mut [f32], rows: usize, vb: &VBlock<Stored<'_, f32>>) {
        with_lanes!(vb.v, v => t.pv(p, alpha, out, rows, &vb.with(v)))
    }

    #[inline(always)]
    fn pack_keys(_: X86, k: &[f32], stride: usize, e: usize, n: usize, kt: &mut [f32]) {
        // SAFETY: as in `scores`.
        unsafe { avx2::pack_keys(k, stride, e, n, kt) }
    }

    #[inline(always)]
    fn dots_row(_: X86, q: &[f32], k: Stored<'_, f32>, stride: usize, n: usize, out: &mut [f32]) {
        // SAFETY: as in `scores`.
        with_lanes!(k, k => unsafe { avx2::dots_row(q, k, stride, n, out) })
    }

    #[inline(always)]
    fn strip_dots(_: X86, q: &[f32], e: usize, kt: Stored<'_, f32>, cols: usize, out: &mut [f32]) {
        // SAFETY: as in `scores`.
        with_lanes!(kt, kt => unsafe { avx2::strip_dots(q, e, kt, cols, out) })
    }

    #[inline(always)]
    fn pv_row(_: X86, p: &[f32], alpha: f32, out: &mut [f32], v: Stored<'_, f32>, stride: usize) {
        // SAFETY: as in `scores`.
        with_lanes!(v, v => unsafe { avx2::pv_row(p, alpha, out, v, stride) })
    }

    #[inline(always)]
    fn dots(t: X86, q: &[f32], e: usize, k: Stored<'_, f32>, stride: usize, n: usize, out: &mut [f32]) {
        with_lanes!(k, k => t.dots(q, e, k, stride, n, out))
    }
}

/// The AVX2 dot-product tile for eight rows, compiled where AVX-512VL gives it 32 registers.
#[target_feature(enable = "avx512f,avx512vl")]
fn dots_wide<L: Lanes>(q: &[f32], e: usize, k: &[L], stride: usize, n: usize, out: &mut [f32]) {
    avx2::dots_tile::<{ 2 * MR }, L>(q, e, k, stride, n, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::attention::fast::NR;
    use crate::kernels::attention::rows;
    use crate::kernels::exp::f32_consts as c;

    /// Scores minus their maximum across exp's whole range and its edges: the flush to zero
    /// below `MIN` and the smallest results above it, −inf (masked), NaN, and a tail that is not
    /// a whole vector.
    fn edge_row() -> Vec<f32> {
        let mut row: Vec<f32> = (0..2400).map(|i| -(i as f32) * 0.0419).collect();
        let min = c::MIN;
        row.extend([min, min.next_up(), min.next_down(), -87.33, -87.34, -103.0, -104.0, -0.0, -1e-30]);
        row.extend([f32::NEG_INFINITY, f32::NAN, f32::MIN, -f32::MIN_POSITIVE]);
        row
    }

    #[test]
    fn explicit_strip_dots_give_the_portable_bits() {
        let Some(token) = X86::detect() else { return }; // no AVX2 here: nothing to compare
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 20001) as f32 / 10000.0 - 1.0
        };
        // Rows in fours, pairs and one left over; key counts ending inside a strip; odd E.
        for (e, rows, cols) in
            [(64usize, 1usize, 128usize), (64, 3, 37), (128, 5, 100), (7, 8, 16), (32, 2, 1), (64, 9, 128)]
        {
            let q: Vec<f32> = (0..rows * e).map(|_| rnd()).collect();
            let kt: Vec<f32> = (0..cols.div_ceil(NR) * NR * e).map(|_| rnd()).collect();
            let (mut want, mut got) = (vec![0.0f32; rows * BK], vec![0.0f32; rows * BK]);
            super::super::decode::strip_scores(&q, e, &kt, cols, &mut want);
            f32::strip_dots(token, &q, e, Stored::Compute(&kt), cols, &mut got);
            for r in 0..rows {
                let bits =
                    |x: &[f32]| x[r * BK..r * BK + cols].iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "e {e}, rows {rows}, cols {cols}, row {r}");
            }
        }
    }

    #[test]
    fn explicit_probabilities_give_the_portable_bits_at_the_edges_of_exp() {
        let Some(token) = X86::detect() else { return }; // no AVX2 here: nothing to compare
        let levels = if token.avx512 { vec![false, true] } else { vec![false] };
        let full = edge_row().len();
        for (m, len) in [(0.0f32, full), (0.5, full), (0.0, full - 4), (0.5, 2400 + 7), (0.0, 13)] {
            let mut want = edge_row();
            want.truncate(len);
            let want_sum = rows::probabilities(&mut want, m);
            if len == full {
                // The row reaches exp's edges: results flushed to +0, and exp(MIN) = 1.6e-38.
                assert!(want.iter().any(|x| x.to_bits() == 0) && want.iter().any(|&x| x > 0.0 && x < 2e-38));
            }
            for &avx512 in &levels {
                let mut got = edge_row();
                got.truncate(len);
                let sum = f32::probabilities(X86 { avx512 }, &mut got, m);
                assert_eq!(sum.to_bits(), want_sum.to_bits(), "avx512 {avx512}, m {m}, length {len}");
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "avx512 {avx512}, m {m}, element {i}: {g:e} vs {w:e}"
                    );
                }
            }
        }
    }
}
