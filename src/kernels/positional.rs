//! Sinusoidal position encodings and the cos/sin tables of rotary embeddings.
//!
//! Both start from the same phase, computed in float64 from an exact integer position:
//!
//! ```text
//! phase[p, i] = f64(positions[p]) * inv_freq[i]        (one float64 multiply)
//! ```
//!
//! and evaluate `sin`/`cos` of it in float64 (the platform's libm), rounding once to the output
//! type, so outputs are within 1 ULP of the exact sine of that phase for float32 and float64.
//! Frequencies are float64 and never rounded to the output type.
//!
//! * sinusoidal, `h = inv_freq.len()`, `out` row-major `(positions.len(), 2h)`:
//!   `Interleaved`: `out[p, 2i] = sin`, `out[p, 2i + 1] = cos` (the original transformer);
//!   `Halves`: `out[p, i] = sin`, `out[p, h + i] = cos`.
//! * rotary: `cos[p, i] = factor * cos(phase)`, `sin[p, i] = factor * sin(phase)`, each
//!   `(positions.len(), h)`, the product taken in float64 before rounding.
//!
//! Parallel split: blocks of positions (rows).

use crate::error::KernelError;
use crate::kernels::{for_each_row_block, for_each_row_block_pair, Float};
use crate::pool::Par;

/// Positions up to this magnitude are exact in float64.
pub const MAX_EXACT_POSITION: i64 = 1 << 53;

/// Where sines and cosines go in a sinusoidal encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinusoidLayout {
    Interleaved,
    Halves,
}

fn check_inputs(positions: &[i64], inv_freq: &[f64]) -> Result<(), KernelError> {
    if let Some(p) = positions.iter().find(|p| p.unsigned_abs() > MAX_EXACT_POSITION as u64) {
        return Err(KernelError::invalid(
            "positions",
            format!("{p} is beyond ±2**53, where positions stop being exact in float64"),
        ));
    }
    if let Some(f) = inv_freq.iter().find(|f| !f.is_finite()) {
        return Err(KernelError::invalid("inv_freq", format!("must be finite, got {f}")));
    }
    Ok(())
}

fn check_len(arg: &'static str, len: usize, expected: Option<usize>) -> Result<(), KernelError> {
    if Some(len) == expected {
        Ok(())
    } else {
        Err(KernelError::invalid(arg, format!("has {len} elements, expected {expected:?}")))
    }
}

/// Writes the sinusoidal encoding of `positions` into `out` (`positions.len() * 2 * inv_freq.len()`).
pub fn sinusoidal<T: Float>(
    positions: &[i64],
    inv_freq: &[f64],
    layout: SinusoidLayout,
    out: &mut [T],
    par: Par<'_>,
) -> Result<(), KernelError> {
    check_inputs(positions, inv_freq)?;
    let half = inv_freq.len();
    let dim = 2 * half;
    check_len("out", out.len(), positions.len().checked_mul(dim))?;
    for_each_row_block(out, dim, par, |first, block| {
        for (row, &p) in block.chunks_exact_mut(dim).zip(&positions[first..]) {
            let p = p as f64;
            for (i, &f) in inv_freq.iter().enumerate() {
                let (s, c) = (p * f).sin_cos();
                let (si, ci) = match layout {
                    SinusoidLayout::Interleaved => (2 * i, 2 * i + 1),
                    SinusoidLayout::Halves => (i, half + i),
                };
                row[si] = T::from_f64(s);
                row[ci] = T::from_f64(c);
            }
        }
    });
    Ok(())
}

/// Writes the rotary tables `cos` and `sin` (each `positions.len() * inv_freq.len()`), both
/// multiplied by `factor` (the attention factor of the scaling variants; 1 otherwise).
pub fn rope_cos_sin<T: Float>(
    positions: &[i64],
    inv_freq: &[f64],
    factor: f64,
    cos: &mut [T],
    sin: &mut [T],
    par: Par<'_>,
) -> Result<(), KernelError> {
    check_inputs(positions, inv_freq)?;
    if !factor.is_finite() {
        return Err(KernelError::invalid("attention_factor", format!("must be finite, got {factor}")));
    }
    let half = inv_freq.len();
    let expected = positions.len().checked_mul(half);
    check_len("cos", cos.len(), expected)?;
    check_len("sin", sin.len(), expected)?;
    for_each_row_block_pair(cos, sin, half, par, |first, cos_block, sin_block| {
        let rows = cos_block.chunks_exact_mut(half).zip(sin_block.chunks_exact_mut(half));
        for ((cos_row, sin_row), &p) in rows.zip(&positions[first..]) {
            let p = p as f64;
            for ((c, s), &f) in cos_row.iter_mut().zip(sin_row.iter_mut()).zip(inv_freq) {
                let (sv, cv) = (p * f).sin_cos();
                *c = T::from_f64(factor * cv);
                *s = T::from_f64(factor * sv);
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv_freq(dim: usize) -> Vec<f64> {
        (0..dim / 2).map(|i| 1.0 / 10000f64.powf((2 * i) as f64 / dim as f64)).collect()
    }

    #[test]
    fn sinusoidal_matches_the_formula_in_both_layouts() {
        let positions = [0i64, 1, 5, -3, 1 << 20];
        let f = inv_freq(6);
        let mut a = vec![0.0f64; positions.len() * 6];
        let mut b = a.clone();
        sinusoidal(&positions, &f, SinusoidLayout::Interleaved, &mut a, Par::Seq).unwrap();
        sinusoidal(&positions, &f, SinusoidLayout::Halves, &mut b, Par::Seq).unwrap();
        for (p, &pos) in positions.iter().enumerate() {
            for i in 0..3 {
                let phase = pos as f64 * f[i];
                assert_eq!(a[p * 6 + 2 * i], phase.sin());
                assert_eq!(a[p * 6 + 2 * i + 1], phase.cos());
                assert_eq!(b[p * 6 + i], phase.sin());
                assert_eq!(b[p * 6 + 3 + i], phase.cos());
            }
        }
    }

    #[test]
    fn rope_tables_round_once_and_scale() {
        let positions = [3i64, 7000];
        let f = inv_freq(4);
        let (mut c, mut s) = (vec![0.0f32; 4], vec![0.0f32; 4]);
        rope_cos_sin(&positions, &f, 1.25, &mut c, &mut s, Par::Seq).unwrap();
        for (p, &pos) in positions.iter().enumerate() {
            for i in 0..2 {
                assert_eq!(c[p * 2 + i], (1.25 * (pos as f64 * f[i]).cos()) as f32);
                assert_eq!(s[p * 2 + i], (1.25 * (pos as f64 * f[i]).sin()) as f32);
            }
        }
    }

    #[test]
    fn rejects_inexact_positions_bad_frequencies_and_lengths() {
        let mut out = vec![0.0f32; 2];
        let f = [1.0];
        assert!(sinusoidal(&[(1 << 53) + 1], &f, SinusoidLayout::Halves, &mut out, Par::Seq).is_err());
        assert!(sinusoidal(&[i64::MIN], &f, SinusoidLayout::Halves, &mut out, Par::Seq).is_err());
        assert!(sinusoidal(&[1], &[f64::NAN], SinusoidLayout::Halves, &mut out, Par::Seq).is_err());
        assert!(sinusoidal(&[1, 2], &f, SinusoidLayout::Halves, &mut out, Par::Seq).is_err());
        let (mut c, mut s) = (vec![0.0f32; 1], vec![0.0f32; 2]);
        assert!(rope_cos_sin(&[1], &f, 1.0, &mut c, &mut s, Par::Seq).is_err());
        assert!(rope_cos_sin(&[1], &f, f64::INFINITY, &mut c, &mut s[..1], Par::Seq).is_err());
    }

    #[test]
    fn empty_inputs_give_empty_outputs() {
        let mut out: Vec<f32> = vec![];
        sinusoidal(&[], &inv_freq(8), SinusoidLayout::Interleaved, &mut out, Par::Seq).unwrap();
        sinusoidal(&[1, 2], &[], SinusoidLayout::Interleaved, &mut out, Par::Seq).unwrap();
    }

    #[test]
    fn parallel_split_gives_identical_bits() {
        let positions: Vec<i64> = (0..3000).collect();
        let f = inv_freq(64);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let (mut c1, mut s1) = (vec![0.0f32; 3000 * 32], vec![0.0f32; 3000 * 32]);
        let (mut c2, mut s2) = (c1.clone(), s1.clone());
        rope_cos_sin(&positions, &f, 1.0, &mut c1, &mut s1, Par::Seq).unwrap();
        rope_cos_sin(&positions, &f, 1.0, &mut c2, &mut s2, Par::Pool(&pool)).unwrap();
        assert_eq!((c1, s1), (c2, s2));
    }
}
