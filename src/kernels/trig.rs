//! `sin` and `cos` of float64 arguments, without branches, so LLVM can vectorise loops of them.
//!
//! The method is fdlibm's (Sun Microsystems, 1993), as in FreeBSD's msun and the Rust `libm`
//! crate, reorganised to be branch-free:
//!
//! 1. `n = round(x * 2/π)`; `x - n π/2 = y0 + y1` by Cody–Waite reduction with π/2 split into
//!    three 33-bit parts and a tail (`e_rem_pio2.c`'s medium case). Each `n * part` is exact for
//!    `|n| < 2^20`; fdlibm runs the second and third stages only after cancellation, when their
//!    subtractions are exact, while here all run and each one's rounding error is carried along.
//! 2. `sin` and `cos` of `y0 + y1` on `[-π/4, π/4]` by the minimax polynomials of `k_sin.c` and
//!    `k_cos.c` (error below 1 ulp).
//! 3. The quadrant `n mod 4` swaps the two and sets their signs, by bit operations.
//!
//! Arguments beyond `MAX_ARG` need the long reduction of `k_rem_pio2.c`; callers check the bound
//! and use the platform's libm there.

/// The largest `|x|` the reduction handles: `2^20 π/2`, where `n π/2` stops being exact.
pub const MAX_ARG: f64 = (1u64 << 20) as f64 * std::f64::consts::FRAC_PI_2;

// The constants of fdlibm, by their published bits (decimal values in the comments).
const INV_PIO2: f64 = f64::from_bits(0x3FE4_5F30_6DC9_C883); // 2/π = 6.36619772367581382433e-01
const PIO2_1: f64 = f64::from_bits(0x3FF9_21FB_5440_0000); // first 33 bits of π/2: 1.57079632673412561417
const PIO2_2: f64 = f64::from_bits(0x3DD0_B461_1A60_0000); // next 33 bits: 6.07710050630396597660e-11
const PIO2_3: f64 = f64::from_bits(0x3BA3_198A_2E00_0000); // next 33 bits: 2.02226624871116645580e-21
const PIO2_3T: f64 = f64::from_bits(0x397B_839A_2520_49C1); // the rest: 8.47842766036889956997e-32
/// Adding and subtracting 1.5 * 2^52 rounds to the nearest integer (ties to even) for |v| < 2^51,
/// and leaves that integer in the low bits of the sum.
const ROUNDER: f64 = 6755399441055744.0;

const S1: f64 = f64::from_bits(0xBFC5_5555_5555_5549); // -1.66666666666666324348e-01
const S2: f64 = f64::from_bits(0x3F81_1111_1110_F8A6); //  8.33333333332248946124e-03
const S3: f64 = f64::from_bits(0xBF2A_01A0_19C1_61D5); // -1.98412698298579493134e-04
const S4: f64 = f64::from_bits(0x3EC7_1DE3_57B1_FE7D); //  2.75573137070700676789e-06
const S5: f64 = f64::from_bits(0xBE5A_E5E6_8A2B_9CEB); // -2.50507602534068634195e-08
const S6: f64 = f64::from_bits(0x3DE5_D93A_5ACF_D57C); //  1.58969099521155010221e-10

const C1: f64 = f64::from_bits(0x3FA5_5555_5555_554C); //  4.16666666666666019037e-02
const C2: f64 = f64::from_bits(0xBF56_C16C_16C1_5177); // -1.38888888888741095749e-03
const C3: f64 = f64::from_bits(0x3EFA_01A0_19CB_1590); //  2.48015872894767294178e-05
const C4: f64 = f64::from_bits(0xBE92_7E4F_809C_52AD); // -2.75573143513906633035e-07
const C5: f64 = f64::from_bits(0x3E21_EE9E_BDB4_B1C4); //  2.08757232129817482790e-09
const C6: f64 = f64::from_bits(0xBDA8_FAE9_BE88_38D4); // -1.13596475577881948265e-11

// Checked when compiling: n * part is exact for |n| < 2^20 only if each part of π/2 has at most 33
// significant bits, and the parts must add up to π/2.
const _: () = {
    assert!(PIO2_1.to_bits() & 0xF_FFFF == 0 && PIO2_2.to_bits() & 0xF_FFFF == 0);
    assert!(PIO2_3.to_bits() & 0xF_FFFF == 0);
    assert!(PIO2_1 + PIO2_2 == std::f64::consts::FRAC_PI_2);
    assert!(PIO2_3 + PIO2_3T < PIO2_2 * 1e-10);
    assert!(INV_PIO2 == std::f64::consts::FRAC_2_PI);
};

/// `(sin x, cos x)` for `|x| <= MAX_ARG`, each within 1 ulp.
#[inline(always)]
pub fn sin_cos(x: f64) -> (f64, f64) {
    let shifted = x * INV_PIO2 + ROUNDER;
    let n = shifted - ROUNDER;
    let quadrant = shifted.to_bits() & 3;

    // x - n π/2 = x - n (P1 + P2 + P3 + P3T), where each n * Pk is exact. Each subtraction's
    // rounding error is recovered exactly (Fast2Sum: a - b = r + ((a - r) - b)), so that
    // x - n π/2 = r3 + e2 + e3 - n P3T, renormalised into y0 + y1.
    let (p2, p3) = (n * PIO2_2, n * PIO2_3);
    let r1 = x - n * PIO2_1; // exact
    let r2 = r1 - p2;
    let e2 = (r1 - r2) - p2;
    let r3 = r2 - p3;
    let e3 = (r2 - r3) - p3;
    let tail = (e2 + e3) - n * PIO2_3T;
    let y0 = r3 + tail;
    let y1 = (r3 - y0) + tail;

    let s = kernel_sin(y0, y1);
    let c = kernel_cos(y0, y1);
    // Quadrant q: sin x = (s, c, -s, -c)[q] and cos x = (c, -s, -c, s)[q].
    let swap = quadrant & 1 == 1;
    let (a, b) = if swap { (c, s) } else { (s, c) };
    let sin = f64::from_bits(a.to_bits() ^ ((quadrant & 2) << 62));
    let cos = f64::from_bits(b.to_bits() ^ (((quadrant + 1) & 2) << 62));
    (sin, cos)
}

/// sin(x + y) for |x| <= π/4, y the tail of x (k_sin.c).
#[inline(always)]
fn kernel_sin(x: f64, y: f64) -> f64 {
    let z = x * x;
    let w = z * z;
    let r = S2 + z * (S3 + z * S4) + z * w * (S5 + z * S6);
    let v = z * x;
    x - ((z * (0.5 * y - v * r) - y) - v * S1)
}

/// cos(x + y) for |x| <= π/4, y the tail of x (k_cos.c).
#[inline(always)]
fn kernel_cos(x: f64, y: f64) -> f64 {
    let z = x * x;
    let w = z * z;
    let r = z * (C1 + z * (C2 + z * C3)) + w * w * (C4 + z * (C5 + z * C6));
    let hz = 0.5 * z;
    let w = 1.0 - hz;
    w + (((1.0 - w) - hz) + (z * r - x * y))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f64, b: f64) -> u64 {
        if a == b {
            return 0;
        }
        let key = |x: f64| {
            let bits = x.to_bits() as i64;
            if bits < 0 {
                i64::MIN - bits
            } else {
                bits
            }
        };
        key(a).abs_diff(key(b))
    }

    #[test]
    fn within_one_ulp_of_libm_over_the_whole_range() {
        // libm (glibc) is correctly rounded here, and ours is within 1 ulp of the exact value, so the
        // two differ by at most 1 ulp. Arguments: a dense sweep near zero, quadrant boundaries, and
        // a pseudo-random spread up to MAX_ARG, including phases pos * inv_freq as the kernels make.
        let mut args: Vec<f64> = (0..200_000).map(|i| (i as f64 - 100_000.0) * 1e-4).collect();
        for k in -1000i64..1000 {
            let b = k as f64 * std::f64::consts::FRAC_PI_4;
            args.extend([b, b.next_up(), b.next_down()]);
        }
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..300_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            args.push((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 * MAX_ARG - MAX_ARG);
        }
        for pos in [1u64 << 20, 999_983, 65_537] {
            for i in 0..64 {
                args.push(pos as f64 * (1.0 / 10000f64.powf(2.0 * i as f64 / 128.0)));
            }
        }
        for x in args {
            let (s, c) = sin_cos(x);
            assert!(ulps(s, x.sin()) <= 1, "sin({x:e}) = {s:e}, libm {:e}", x.sin());
            assert!(ulps(c, x.cos()) <= 1, "cos({x:e}) = {c:e}, libm {:e}", x.cos());
        }
    }

    #[test]
    fn exact_at_zero_and_signed() {
        assert_eq!(sin_cos(0.0), (0.0, 1.0));
        let (s, c) = sin_cos(-1.0);
        assert_eq!((s, c), (-(1.0f64.sin()), 1.0f64.cos()));
    }
}
