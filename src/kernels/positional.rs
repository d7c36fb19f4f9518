//! Sinusoidal position encodings and the cos/sin tables of rotary embeddings.
//!
//! Both start from the same phase, computed in float64 from an exact integer position:
//!
//! ```text
//! phase[p, i] = f64(positions[p]) * inv_freq[i]        (one float64 multiply)
//! ```
//!
//! and evaluate `sin`/`cos` of it in float64, rounding once to the output type, so outputs are
//! within 1 ULP of the exact sine of that phase for float32 and float64. Rows whose phases all lie
//! within [`trig::MAX_ARG`] (every position up to 2^20 with frequencies up to 1) use the
//! vectorisable [`trig::sin_cos`]; other rows use the platform's libm. Frequencies are float64 and
//! never rounded to the output type.
//!
//! * sinusoidal, `h = inv_freq.len()`, `out` row-major `(positions.len(), 2h)`:
//!   `Interleaved`: `out[p, 2i] = sin`, `out[p, 2i + 1] = cos` (the original transformer);
//!   `Halves`: `out[p, i] = sin`, `out[p, h + i] = cos`.
//! * rotary: `cos[p, i] = factor * cos(phase)`, `sin[p, i] = factor * sin(phase)`, each
//!   `(positions.len(), h)`, the product taken in float64 before rounding.
//!
//! Parallel split: blocks of positions (rows).

use std::mem::MaybeUninit;

use crate::error::{expect_len, KernelError};
use crate::kernels::storage::Storage;
use crate::kernels::{for_each_row_block, for_each_row_block_pair, trig, Rows, RowsPair};
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

/// Writes the sinusoidal encoding of `positions` into `out` (`positions.len() * 2 * inv_freq.len()`).
pub fn sinusoidal<T: Storage>(
    positions: &[i64],
    inv_freq: &[f64],
    layout: SinusoidLayout,
    out: &mut [MaybeUninit<T>],
    par: Par<'_>,
) -> Result<(), KernelError> {
    check_inputs(positions, inv_freq)?;
    let half = inv_freq.len();
    let dim = 2 * half;
    expect_len("out", out.len(), positions.len().checked_mul(dim))?;
    for_each_row_block(out, dim, par, &Sinusoid { phases: Phases::new(positions, inv_freq), layout });
    Ok(())
}

/// Integer positions and float64 frequencies.
struct Phases<'a> {
    positions: &'a [i64],
    inv_freq: &'a [f64],
    /// The largest |frequency|, to bound a row's phases.
    max_freq: f64,
}

impl<'a> Phases<'a> {
    fn new(positions: &'a [i64], inv_freq: &'a [f64]) -> Self {
        let max_freq = inv_freq.iter().fold(0.0f64, |m, f| m.max(f.abs()));
        Phases { positions, inv_freq, max_freq }
    }

    /// `sin` and `cos` of `position * inv_freq[i]` for every `i`, into `s` and `c`.
    #[inline(always)]
    fn sin_cos(&self, position: i64, s: &mut [f64], c: &mut [f64]) {
        let p = position as f64;
        let values = s.iter_mut().zip(c.iter_mut()).zip(self.inv_freq);
        if p.abs() * self.max_freq <= trig::MAX_ARG {
            for ((s, c), &f) in values {
                (*s, *c) = trig::sin_cos(p * f);
            }
        } else {
            for ((s, c), &f) in values {
                (*s, *c) = (p * f).sin_cos();
            }
        }
    }
}

struct Sinusoid<'a> {
    phases: Phases<'a>,
    layout: SinusoidLayout,
}

impl<T: Storage> Rows<MaybeUninit<T>> for Sinusoid<'_> {
    #[inline(always)]
    fn rows(&self, first: usize, block: &mut [MaybeUninit<T>]) {
        let half = self.phases.inv_freq.len();
        let (mut s, mut c) = (vec![0.0; half], vec![0.0; half]);
        for (row, &p) in block.chunks_exact_mut(2 * half).zip(&self.phases.positions[first..]) {
            self.phases.sin_cos(p, &mut s, &mut c);
            match self.layout {
                SinusoidLayout::Interleaved => {
                    for ((pair, &sv), &cv) in row.chunks_exact_mut(2).zip(&s).zip(&c) {
                        pair[0].write(T::round_from_f64(sv));
                        pair[1].write(T::round_from_f64(cv));
                    }
                }
                SinusoidLayout::Halves => {
                    let (sin_half, cos_half) = row.split_at_mut(half);
                    for (o, &v) in sin_half.iter_mut().zip(&s) {
                        o.write(T::round_from_f64(v));
                    }
                    for (o, &v) in cos_half.iter_mut().zip(&c) {
                        o.write(T::round_from_f64(v));
                    }
                }
            }
        }
    }
}

/// Writes the rotary tables `cos` and `sin` (each `positions.len() * inv_freq.len()`), both
/// multiplied by `factor` (the attention factor of the scaling variants; 1 otherwise).
pub fn rope_cos_sin<T: Storage>(
    positions: &[i64],
    inv_freq: &[f64],
    factor: f64,
    cos: &mut [MaybeUninit<T>],
    sin: &mut [MaybeUninit<T>],
    par: Par<'_>,
) -> Result<(), KernelError> {
    check_inputs(positions, inv_freq)?;
    if !factor.is_finite() {
        return Err(KernelError::invalid("attention_factor", format!("must be finite, got {factor}")));
    }
    let half = inv_freq.len();
    let expected = positions.len().checked_mul(half);
    expect_len("cos", cos.len(), expected)?;
    expect_len("sin", sin.len(), expected)?;
    for_each_row_block_pair(
        cos,
        sin,
        half,
        par,
        &Rotary { phases: Phases::new(positions, inv_freq), factor },
        false,
    );
    Ok(())
}

struct Rotary<'a> {
    phases: Phases<'a>,
    factor: f64,
}

impl<T: Storage> RowsPair<MaybeUninit<T>> for Rotary<'_> {
    #[inline(always)]
    fn rows(&self, first: usize, cos: &mut [MaybeUninit<T>], sin: &mut [MaybeUninit<T>]) {
        let half = self.phases.inv_freq.len();
        let (mut s, mut c) = (vec![0.0; half], vec![0.0; half]);
        let rows = cos.chunks_exact_mut(half).zip(sin.chunks_exact_mut(half));
        for ((cos_row, sin_row), &p) in rows.zip(&self.phases.positions[first..]) {
            self.phases.sin_cos(p, &mut s, &mut c);
            for (((co, so), &sv), &cv) in cos_row.iter_mut().zip(sin_row.iter_mut()).zip(&s).zip(&c) {
                co.write(T::round_from_f64(self.factor * cv));
                so.write(T::round_from_f64(self.factor * sv));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::output::{collect, collect_pair};

    fn inv_freq(dim: usize) -> Vec<f64> {
        (0..dim / 2).map(|i| 1.0 / 10000f64.powf((2 * i) as f64 / dim as f64)).collect()
    }

    fn table<T: Storage>(
        positions: &[i64],
        f: &[f64],
        layout: SinusoidLayout,
    ) -> Result<Vec<T>, KernelError> {
        collect("out", positions.len() * 2 * f.len(), |out| sinusoidal(positions, f, layout, out, Par::SEQ))
    }

    fn rope<T: Storage>(
        positions: &[i64],
        f: &[f64],
        factor: f64,
        par: Par<'_>,
    ) -> Result<(Vec<T>, Vec<T>), KernelError> {
        collect_pair(("cos", "sin"), positions.len() * f.len(), |c, s| {
            rope_cos_sin(positions, f, factor, c, s, par)
        })
    }

    #[test]
    fn sinusoidal_matches_the_formula_in_both_layouts() {
        let positions = [0i64, 1, 5, -3, 1 << 20];
        let f = inv_freq(6);
        let a: Vec<f64> = table(&positions, &f, SinusoidLayout::Interleaved).unwrap();
        let b: Vec<f64> = table(&positions, &f, SinusoidLayout::Halves).unwrap();
        for (p, &pos) in positions.iter().enumerate() {
            for i in 0..3 {
                let phase = pos as f64 * f[i];
                let close = |x: f64, y: f64| (x - y).abs() <= f64::EPSILON * y.abs().max(f64::MIN_POSITIVE);
                assert!(close(a[p * 6 + 2 * i], phase.sin()) && close(a[p * 6 + 2 * i + 1], phase.cos()));
                assert_eq!((b[p * 6 + i], b[p * 6 + 3 + i]), (a[p * 6 + 2 * i], a[p * 6 + 2 * i + 1]));
            }
        }
    }

    #[test]
    fn rope_tables_round_once_and_scale() {
        let positions = [3i64, 7000];
        let f = inv_freq(4);
        let (c, s) = rope::<f32>(&positions, &f, 1.25, Par::SEQ).unwrap();
        for (p, &pos) in positions.iter().enumerate() {
            for i in 0..2 {
                let (sv, cv) = trig::sin_cos(pos as f64 * f[i]);
                assert_eq!(c[p * 2 + i], (1.25 * cv) as f32);
                assert_eq!(s[p * 2 + i], (1.25 * sv) as f32);
            }
        }
    }

    #[test]
    fn rejects_inexact_positions_bad_frequencies_and_lengths() {
        let f = [1.0];
        let halves = SinusoidLayout::Halves;
        assert!(table::<f32>(&[(1 << 53) + 1], &f, halves).is_err());
        assert!(table::<f32>(&[i64::MIN], &f, halves).is_err());
        assert!(table::<f32>(&[1], &[f64::NAN], halves).is_err());
        let mut short = vec![MaybeUninit::<f32>::uninit(); 2];
        assert!(sinusoidal(&[1, 2], &f, halves, &mut short, Par::SEQ).is_err());
        let (mut c, mut s) = (vec![MaybeUninit::<f32>::uninit(); 1], vec![MaybeUninit::<f32>::uninit(); 2]);
        assert!(rope_cos_sin(&[1], &f, 1.0, &mut c, &mut s, Par::SEQ).is_err());
        assert!(rope::<f32>(&[1], &f, f64::INFINITY, Par::SEQ).is_err());
    }

    #[test]
    fn empty_inputs_give_empty_outputs() {
        assert!(table::<f32>(&[], &inv_freq(8), SinusoidLayout::Interleaved).unwrap().is_empty());
        assert!(table::<f32>(&[1, 2], &[], SinusoidLayout::Interleaved).unwrap().is_empty());
    }

    #[test]
    fn rows_beyond_the_fast_range_use_libm() {
        let far = [1i64 << 40, -(1i64 << 40) - 7];
        let f = inv_freq(8);
        let out: Vec<f64> = table(&far, &f, SinusoidLayout::Halves).unwrap();
        for (p, &pos) in far.iter().enumerate() {
            for i in 0..4 {
                let (s, c) = (pos as f64 * f[i]).sin_cos();
                assert_eq!((out[p * 8 + i], out[p * 8 + 4 + i]), (s, c));
            }
        }
    }

    #[test]
    fn parallel_split_gives_identical_bits() {
        let positions: Vec<i64> = (0..3000).collect();
        let f = inv_freq(64);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let seq = rope::<f32>(&positions, &f, 1.0, Par::SEQ).unwrap();
        assert_eq!(rope::<f32>(&positions, &f, 1.0, Par::on(&pool)).unwrap(), seq);
    }
}
