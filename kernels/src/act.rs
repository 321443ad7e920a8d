//! The MLP's gated activation `silu(g) · u` in place, and a softmax's normalizer
//! ([`sum_exp`]), vectorized: an exponential by range
//! reduction (`eˣ = 2ⁿ · eʳ`, `|r| ≤ ln 2 / 2`) and a degree-7 Taylor polynomial, written
//! branch-free so the compiler keeps it in SIMD lanes (AVX2/FMA where the CPU has them,
//! detected at run time). A scalar `expf` per element cost ~3% of a multi-row forward.
//!
//! Accuracy: within 2·10⁻⁷ relative of `f32::exp` over the range that matters (tested).
//!
//! ```
//! let mut g = vec![0.0f32, 1.0, -2.0];
//! arbor_kernels::act::silu_mul(&mut g, &[1.0, 2.0, 3.0]);
//! let silu = |x: f32| x / (1.0 + (-x).exp());
//! assert!((g[1] - 2.0 * silu(1.0)).abs() < 1e-6 && (g[2] - 3.0 * silu(-2.0)).abs() < 1e-6);
//! ```

/// `g[i] = silu(g[i]) · u[i]` with `silu(x) = x / (1 + e⁻ˣ)`.
///
/// # Panics
/// If the slices differ in length (a caller's bug).
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len(), "gate and up of different widths");
    // Many rows (a tree's verification, prefill) split over rayon's threads; one row's few
    // thousand values are done before a hand-off would pay.
    if g.len() >= PARALLEL_FROM {
        use rayon::prelude::*;
        let part = g
            .len()
            .div_ceil(rayon::current_num_threads())
            .next_multiple_of(64);
        g.par_chunks_mut(part)
            .zip(u.par_chunks(part))
            .for_each(|(g, u)| silu_mul_serial(g, u));
        return;
    }
    silu_mul_serial(g, u);
}

/// Values from which [`silu_mul`] splits the work over threads.
const PARALLEL_FROM: usize = 1 << 15;

fn silu_mul_serial(g: &mut [f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, AVX2 and FMA (checked above).
            unsafe { silu_mul_avx512(g, u) };
        } else {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            unsafe { silu_mul_avx2(g, u) };
        }
        return;
    }
    silu_mul_body(g, u);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(g: &mut [f32], u: &[f32]) {
    silu_mul_body(g, u);
}

/// [`silu_mul_body`] in 512-bit lanes: the same operations per value (the exponent's
/// multiplies and adds unfused, an IEEE division), so the same bits as the other builds; half
/// the instructions of the AVX2 build for a tree's or a prefill's many rows (8 rows of the
/// 1.5B's MLP: 8 × 8 960 values a layer, ~1.3% of an 8-node verification's samples there).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn silu_mul_avx512(g: &mut [f32], u: &[f32]) {
    silu_mul_body(g, u);
}

#[inline(always)]
fn silu_mul_body(g: &mut [f32], u: &[f32]) {
    for (x, &y) in g.iter_mut().zip(u) {
        *x = *x / (1.0 + exp(-*x)) * y;
    }
}

/// `y = x / √(mean(x²) + ε) · γ` for each row of `x` (rows of `γ.len()` values): burn's
/// `RmsNorm` arithmetic — the mean as the sum over the row length, `ε` added, the square root,
/// a division, then the weight — with the sum of squares in one fixed order: sixteen running
/// sums by position modulo 16 over whole runs of 16, those in order, then the rest in order.
/// The same bits on every machine and for any number of rows (burn's own sum follows the
/// SIMD width of the machine it runs on), so a tree's rows get their paths' values.
///
/// # Panics
/// If `x` is not whole rows of `γ.len()` values or `y` is not as long as `x` (a caller's bug).
///
/// ```
/// let mut y = [0.0f32; 4];
/// arbor_kernels::act::rms_norm(&[3.0, 4.0, 0.0, 0.0], &[1.0, 2.0], 1e-6, &mut y);
/// // Row [3, 4]: mean of squares 12.5; row [0, 0] stays 0 (ε keeps it from 0 / 0).
/// let rms = (12.5f32 + 1e-6).sqrt();
/// assert!((y[0] - 3.0 / rms).abs() < 1e-6 && (y[1] - 8.0 / rms).abs() < 1e-6);
/// assert_eq!(&y[2..], &[0.0, 0.0]);
/// ```
pub fn rms_norm(x: &[f32], gamma: &[f32], eps: f32, y: &mut [f32]) {
    let d = gamma.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d) && y.len() == x.len(),
        "rms_norm: {} values in rows of {d} into {}",
        x.len(),
        y.len()
    );
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU supports AVX-512F, AVX2 and FMA (checked above).
        unsafe { rms_norm_avx512(x, gamma, eps, y) };
        return;
    }
    rms_norm_body(x, gamma, eps, y);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn rms_norm_avx512(x: &[f32], gamma: &[f32], eps: f32, y: &mut [f32]) {
    rms_norm_body(x, gamma, eps, y);
}

#[inline(always)]
fn rms_norm_body(x: &[f32], gamma: &[f32], eps: f32, y: &mut [f32]) {
    let d = gamma.len();
    for (row, out) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let mut acc = [0.0f32; 16];
        let (runs, rest) = row.as_chunks::<16>();
        for r in runs {
            for l in 0..16 {
                acc[l] += r[l] * r[l];
            }
        }
        let mut sum = 0.0f32;
        for a in acc {
            sum += a;
        }
        for &v in rest {
            sum += v * v;
        }
        let rms = (sum / d as f32 + eps).sqrt();
        for ((o, &v), &g) in out.iter_mut().zip(row).zip(gamma) {
            *o = v / rms * g;
        }
    }
}

/// `Σ exp(xᵢ − max)` over `x`: a softmax's normalizer when `max` is `x`'s largest value,
/// without writing the exponentials anywhere (the crate's `exp` in SIMD lanes, eight running sums added
/// in order at the end: the same order for every call). `−∞` entries add (next to) nothing.
///
/// ```
/// let z = arbor_kernels::act::sum_exp(&[0.0, f32::NEG_INFINITY, 2f32.ln()], 0.0);
/// assert!((z - 3.0).abs() < 1e-6);
/// ```
pub fn sum_exp(x: &[f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { sum_exp_avx2(x, max) };
    }
    sum_exp_body(x, max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_exp_avx2(x: &[f32], max: f32) -> f32 {
    sum_exp_body(x, max)
}

#[inline(always)]
fn sum_exp_body(x: &[f32], max: f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let (chunks, rest) = x.as_chunks::<8>();
    for c in chunks {
        for l in 0..8 {
            acc[l] += exp(c[l] - max);
        }
    }
    let tail = rest.iter().fold(0.0, |s, &v| s + exp(v - max));
    acc.iter().fold(0.0, |s, &v| s + v) + tail
}

/// `eˣ` for `x` in f32 range, branch-free (saturates to 0 below −87.3 and to a large finite
/// value above 88; SiLU and softmax need no more).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Rounds to nearest (ties to even) by the float adder: exact for |v| < 2²².
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let v = x * LOG2E + ROUND;
    let n = v - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // eʳ = 1 + r + r²/2! + … + r⁷/7!, Horner.
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // `n` as an integer, read from `v`'s low mantissa bits (integer lanes; `n as i32` is a
    // saturating conversion the compiler cannot keep in SIMD lanes: it had made each value
    // a scalar convert, two compares and two moves).
    let ni = (v.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    p * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_the_library_closely() {
        let mut worst = 0.0f32;
        for i in -87_000..88_000 {
            let x = i as f32 / 1000.0 + 0.000_37;
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(exp(-200.0), exp(-87.3));
        assert!(exp(200.0).is_finite());
    }

    #[test]
    fn sum_exp_matches_the_library_sum() {
        for n in [0usize, 1, 7, 8, 9, 1000, 151_936] {
            let x: Vec<f32> = (0..n)
                .map(|i| match i % 5 {
                    0 => f32::NEG_INFINITY,
                    j => ((i * 7919) % 2000) as f32 / 100.0 - 30.0 + j as f32,
                })
                .collect();
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max).max(0.0);
            let want: f64 = x.iter().map(|&v| f64::from(v - max).exp()).sum();
            let got = f64::from(sum_exp(&x, max));
            // f32 running sums of up to ~19k values a lane: ~1e-5 relative.
            assert!(
                (got - want).abs() <= 1e-4 * want.max(1e-30),
                "{n}: {got} vs {want}"
            );
        }
    }

    /// The norm is `x / √(mean(x²) + ε) · γ` within float rounding (against an f64 sum), each
    /// row alone gives its bits among many, and every build gives the portable loop's bits.
    #[test]
    fn rms_norm_is_the_formula_row_by_row_in_every_build() {
        for d in [1usize, 15, 16, 17, 896, 1536] {
            let rows = 5;
            let x: Vec<f32> = (0..rows * d)
                .map(|i| ((i * 7919) % 2003) as f32 / 250.0 - 4.0)
                .collect();
            let gamma: Vec<f32> = (0..d).map(|i| 0.5 + (i % 7) as f32 / 4.0).collect();
            let eps = 1e-6f32;
            let mut y = vec![0.0f32; x.len()];
            rms_norm(&x, &gamma, eps, &mut y);
            for (r, (row, out)) in x.chunks(d).zip(y.chunks(d)).enumerate() {
                let ms = row
                    .iter()
                    .map(|&v| f64::from(v) * f64::from(v))
                    .sum::<f64>()
                    / d as f64;
                let rms = (ms + f64::from(eps)).sqrt();
                for ((&v, &o), &g) in row.iter().zip(out).zip(&gamma) {
                    let want = f64::from(v) / rms * f64::from(g);
                    assert!(
                        (f64::from(o) - want).abs() <= 1e-5 * want.abs().max(1e-3),
                        "{d}: {o} {want}"
                    );
                }
                let mut alone = vec![0.0f32; d];
                rms_norm(row, &gamma, eps, &mut alone);
                assert!(
                    alone
                        .iter()
                        .zip(out)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "row {r}"
                );
            }
            let mut portable = vec![0.0f32; x.len()];
            rms_norm_body(&x, &gamma, eps, &mut portable);
            assert!(
                portable
                    .iter()
                    .zip(&y)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{d}"
            );
        }
        let mut y = [1.0f32; 2];
        rms_norm(&[0.0, 0.0], &[1.0, 1.0], 1e-5, &mut y);
        assert_eq!(y, [0.0, 0.0]);
    }

    #[test]
    fn silu_mul_matches_the_scalar_formula() {
        let g: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 37.0).collect();
        let u: Vec<f32> = (0..1000).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let mut out = g.clone();
        silu_mul(&mut out, &u);
        for ((&o, &x), &y) in out.iter().zip(&g).zip(&u) {
            let want = x / (1.0 + (-x).exp()) * y;
            assert!(
                (o - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{o} vs {want}"
            );
        }
        // Many values (split over threads) give the values one thread gives, bit for bit.
        let n = 3 * PARALLEL_FROM + 40;
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 37) % 1001) as f32 / 50.0 - 10.0)
            .collect();
        let u: Vec<f32> = (0..n).map(|i| ((i * 11) % 17) as f32 - 8.0).collect();
        let (mut split, mut one) = (g.clone(), g);
        silu_mul(&mut split, &u);
        silu_mul_serial(&mut one, &u);
        assert!(
            split
                .iter()
                .zip(&one)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        // Every build gives the portable loop's bits.
        let g: Vec<f32> = (0..4099)
            .map(|i| ((i * 7919) % 20011) as f32 / 100.0 - 100.0)
            .chain([0.0, -0.0, 88.5, -88.5, 1e-30, f32::MAX, f32::MIN])
            .collect();
        let u: Vec<f32> = (0..g.len())
            .map(|i| ((i * 13) % 29) as f32 - 14.5)
            .collect();
        let mut want = g.clone();
        silu_mul_body(&mut want, &u);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            let (mut a, mut b) = (g.clone(), g.clone());
            // SAFETY: AVX2 and FMA were detected just above (and AVX-512F below).
            unsafe { silu_mul_avx2(&mut a, &u) };
            assert_eq!(bits(&a), bits(&want), "AVX2");
            if std::arch::is_x86_feature_detected!("avx512f") {
                unsafe { silu_mul_avx512(&mut b, &u) };
                assert_eq!(bits(&b), bits(&want), "AVX-512");
            }
        }
        // Large negative gates go to zero, not NaN.
        let mut g = vec![-1000.0f32];
        silu_mul(&mut g, &[1.0]);
        assert!(g[0].abs() < 1e-30 && !g[0].is_nan());
    }
}
