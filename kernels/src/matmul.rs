//! Activations × weights for few rows (decode: 1 row; tree verification: 2–64 rows), with the
//! weights streamed from memory once for all rows.
//!
//! General-purpose GEMMs (burn's CPU matmul through the `gemm` crate) repack the weight
//! matrix on every call; with a handful of rows that doubles the memory traffic of a step
//! that is bound by it (measured on Qwen2.5-1.5B: a verification forward of 2 rows cost 1.8×
//! one row, 8 rows 2.7×). Here weights are packed once, at load, into column panels of
//! [`PANEL`] outputs — panel `p` holds `w[kk][p·16 .. p·16+16]` for every `kk`, contiguously —
//! so each panel is one sequential read, kept in cache while every group of 4 rows passes
//! over it (AVX2/FMA micro-kernel with runtime detection, portable fallback), and panels are
//! spread over cores.
//!
//! Weights are held as f32 ([`PackedF32`]) or f16 ([`PackedF16`], half the bytes per step;
//! converted to f32 in registers with F16C) — e.g. for a draft model, whose precision only
//! affects acceptance, never the output.
//!
//! [`matmul_reference`] is the plain triple loop the tests compare against.

use half::f16;
use rayon::prelude::*;

use crate::KernelError;

/// Output columns per packed panel.
pub const PANEL: usize = 16;

/// A micro-kernel: rows of `x` (`k` values each) against one panel into `dst`.
type RowsFn<E> = unsafe fn(&[f32], &[E], usize, &mut [f32]);

/// How weights are stored in panels.
pub trait PanelElement: Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    /// From f32 (rounding).
    fn from_f32(x: f32) -> Self;
    /// To f32.
    fn to_f32(self) -> f32;
    /// The AVX2 micro-kernels (4 rows, 1 row) if this CPU runs them.
    fn simd_kernels() -> Option<(RowsFn<Self>, RowsFn<Self>)>;
}

impl PanelElement for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn simd_kernels() -> Option<(RowsFn<Self>, RowsFn<Self>)> {
        #[cfg(target_arch = "x86_64")]
        if has(&["avx2", "fma"]) {
            return Some((avx2::rows4_f32, avx2::row1_f32));
        }
        None
    }
}

impl PanelElement for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn simd_kernels() -> Option<(RowsFn<Self>, RowsFn<Self>)> {
        #[cfg(target_arch = "x86_64")]
        if has(&["avx2", "fma", "f16c"]) {
            return Some((avx2::rows4_f16, avx2::row1_f16));
        }
        None
    }
}

/// A weight matrix `W` (`k` inputs × `n` outputs) packed in column panels of `E`.
#[derive(Debug, Clone)]
pub struct Packed<E> {
    k: usize,
    n: usize,
    panels: Vec<E>,
}

/// f32 weights.
pub type PackedF32 = Packed<f32>;
/// f16 weights.
pub type PackedF16 = Packed<f16>;

impl<E: PanelElement> Packed<E> {
    /// Packs `w` stored row-major as `[n, k]` (outputs × inputs: the checkpoint layout of a
    /// linear layer, `y = x·wᵀ`).
    ///
    /// # Errors
    /// [`KernelError::Shape`] if `w.len() != n·k` or a dimension is 0.
    pub fn from_out_in(w: &[f32], n: usize, k: usize) -> Result<Self, KernelError> {
        if n == 0 || k == 0 || w.len() != n * k {
            return Err(KernelError::Shape(format!(
                "weights of {} values for [{n}, {k}]",
                w.len()
            )));
        }
        let np = n.div_ceil(PANEL);
        let mut panels = vec![E::default(); np * k * PANEL];
        panels
            .par_chunks_mut(k * PANEL)
            .enumerate()
            .for_each(|(p, dst)| {
                for c in 0..PANEL.min(n - p * PANEL) {
                    let src = &w[(p * PANEL + c) * k..(p * PANEL + c + 1) * k];
                    for (kk, &v) in src.iter().enumerate() {
                        dst[kk * PANEL + c] = E::from_f32(v);
                    }
                }
            });
        Ok(Self { k, n, panels })
    }

    /// The same weights in another element type (same panel layout, each value converted).
    pub fn convert<T: PanelElement>(&self) -> Packed<T> {
        Packed {
            k: self.k,
            n: self.n,
            panels: self
                .panels
                .par_iter()
                .map(|&v| T::from_f32(v.to_f32()))
                .collect(),
        }
    }

    /// Inputs per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Outputs per row.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.panels.len() * std::mem::size_of::<E>()
    }

    /// `y = x·W` for `m` rows: `x` is `[m, k]`, `y` is `[m, n]`, both row-major.
    ///
    /// # Errors
    /// [`KernelError::Shape`] if the slice lengths disagree with `m`, `k`, `n`.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<(), KernelError> {
        let (k, n) = (self.k, self.n);
        check_operands(x, y, m, k, n)?;
        if m == 0 {
            return Ok(());
        }
        let np = n.div_ceil(PANEL);
        // Groups of 4 rows, interleaved once ([kk][4]) so the kernel's four broadcasts per
        // step read one cache line; leftover rows ride in a zero-padded group (one more pass
        // of the 4-row kernel beats passes of the 1-row kernel: measured 1536×8960, 5 rows
        // 2.50 ms with a 1-row pass, 2.16 ms as 8). Only a lone row takes the 1-row kernel.
        let groups = if m == 1 { 0 } else { m.div_ceil(4) };
        let mut xi = vec![0.0f32; groups * 4 * k];
        for (g, block) in xi.chunks_mut(4 * k).enumerate() {
            for r in 0..4.min(m - g * 4) {
                let row = &x[(g * 4 + r) * k..(g * 4 + r + 1) * k];
                for (kk, &v) in row.iter().enumerate() {
                    block[kk * 4 + r] = v;
                }
            }
        }
        // Results panel by panel ([panel][row][16]), then scattered into y's rows.
        let mut out = vec![0.0f32; np * m * PANEL];
        let simd = E::simd_kernels();
        out.par_chunks_mut(m * PANEL)
            .zip(self.panels.par_chunks(k * PANEL))
            .for_each(|(o, panel)| {
                for (g, block) in xi.chunks(4 * k).enumerate() {
                    let rows = 4.min(m - g * 4);
                    let mut dst = [0.0f32; 4 * PANEL];
                    match simd {
                        // SAFETY: `simd_kernels` only returns kernels this CPU supports; the
                        // slices have the sizes the kernels require.
                        Some((rows4, _)) => unsafe { rows4(block, panel, k, &mut dst) },
                        None => portable::rows(block, 4, 1, 4, panel, k, &mut dst),
                    }
                    o[g * 4 * PANEL..(g * 4 + rows) * PANEL].copy_from_slice(&dst[..rows * PANEL]);
                }
                if m == 1 {
                    let r = 0;
                    let row = &x[r * k..(r + 1) * k];
                    let dst = &mut o[r * PANEL..(r + 1) * PANEL];
                    match simd {
                        // SAFETY: as above.
                        Some((_, row1)) => unsafe { row1(row, panel, k, dst) },
                        None => portable::rows(row, 1, k, 1, panel, k, dst),
                    }
                }
            });
        y.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
            for (p, chunk) in row.chunks_mut(PANEL).enumerate() {
                let src = &out[(p * m + r) * PANEL..];
                chunk.copy_from_slice(&src[..chunk.len()]);
            }
        });
        Ok(())
    }
}

/// Checks that `x` is `[m, k]` and `y` is `[m, n]`.
pub(crate) fn check_operands(
    x: &[f32],
    y: &[f32],
    m: usize,
    k: usize,
    n: usize,
) -> Result<(), KernelError> {
    if x.len() != m * k || y.len() != m * n {
        return Err(KernelError::Shape(format!(
            "x has {} values and y {} for m={m}, k={k}, n={n}",
            x.len(),
            y.len()
        )));
    }
    Ok(())
}

/// `y = x·wᵀ` with `w` row-major `[n, k]`, as a plain loop (f64 accumulation).
pub fn matmul_reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; m * n];
    for r in 0..m {
        for c in 0..n {
            let mut acc = 0.0f64;
            for kk in 0..k {
                acc += f64::from(x[r * k + kk]) * f64::from(w[c * k + kk]);
            }
            y[r * n + c] = acc as f32;
        }
    }
    y
}

#[cfg(target_arch = "x86_64")]
fn has(features: &[&str]) -> bool {
    features.iter().all(|f| match *f {
        "avx2" => std::is_x86_feature_detected!("avx2"),
        "fma" => std::is_x86_feature_detected!("fma"),
        "f16c" => std::is_x86_feature_detected!("f16c"),
        _ => false,
    })
}

mod portable {
    use super::{PANEL, PanelElement};

    /// `dst[r][c] = Σ_kk x(r, kk) · panel[kk][c]` for `nrows` rows, where `x(r, kk)` is
    /// `rows[r·row_stride + kk·k_stride]` (row-major: `k, 1`; interleaved groups: `1, 4`).
    pub(super) fn rows<E: PanelElement>(
        rows: &[f32],
        nrows: usize,
        row_stride: usize,
        k_stride: usize,
        panel: &[E],
        k: usize,
        dst: &mut [f32],
    ) {
        for r in 0..nrows {
            let mut acc = [0.0f32; PANEL];
            for kk in 0..k {
                let a = rows[r * row_stride + kk * k_stride];
                let w = &panel[kk * PANEL..(kk + 1) * PANEL];
                for c in 0..PANEL {
                    acc[c] += a * w[c].to_f32();
                }
            }
            dst[r * PANEL..(r + 1) * PANEL].copy_from_slice(&acc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m128i, __m256, _mm_loadu_si128, _mm256_add_ps, _mm256_broadcast_ss, _mm256_cvtph_ps,
        _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps, _mm256_storeu_ps,
    };

    use half::f16;

    use super::PANEL;

    /// Where row `kk` of panel `w` starts a new cache line (a panel row: [`PANEL`] weights of
    /// `E`), asks for the lines ahead of it as the quantized kernels do
    /// ([`crate::prefetch::ask_line`]), where they do (`qmatmul::tuning`: Intel's L2 streamer
    /// stops at each 4 KiB page). The far request into the second-level cache, from memory
    /// (16 f32 and 24 f16 panels of 1536 × 8960, 2 threads, four alternated pairs of builds):
    /// 1 row of f32 took 0.82× the time, of f16 0.86×, 4 rows of f32 0.85–0.91×, of f16
    /// 0.88–1.17×.
    #[inline(always)]
    fn ask_ahead<E>(w: *const E, kk: usize) {
        let step = PANEL * std::mem::size_of::<E>();
        if (kk * step) % 64 < step {
            crate::prefetch::ask_line(w.cast::<u8>().wrapping_add(kk * step));
        }
    }

    /// Defines the 4-row and 1-row micro-kernels for one weight element type; `$load` turns
    /// a pointer to 8 weights into 8 f32 lanes.
    macro_rules! kernels {
        ($rows4:ident, $row1:ident, $elem:ty, $features:literal, $load:expr) => {
            /// Four rows, interleaved (`rows[kk·4 + r]`), against one panel; 8 accumulators
            /// stay in registers for the whole `k` loop.
            ///
            /// # Safety
            /// The CPU must support the enabled features; `rows` holds `4·k` values, `panel`
            /// `k·16`, `dst` 64.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $rows4(rows: &[f32], panel: &[$elem], k: usize, dst: &mut [f32]) {
                assert!(rows.len() >= 4 * k && panel.len() >= k * PANEL && dst.len() >= 4 * PANEL);
                let load: unsafe fn(*const $elem) -> __m256 = $load;
                let (x, w) = (rows.as_ptr(), panel.as_ptr());
                let mut acc: [__m256; 8] = [_mm256_setzero_ps(); 8];
                let ahead = crate::qmatmul::prefetch_every_row();
                for kk in 0..k {
                    if ahead {
                        ask_ahead(w, kk);
                    }
                    // SAFETY: kk < k keeps every offset inside the slices checked above.
                    unsafe {
                        let w0 = load(w.add(kk * PANEL));
                        let w1 = load(w.add(kk * PANEL + 8));
                        for r in 0..4 {
                            let a = _mm256_broadcast_ss(&*x.add(kk * 4 + r));
                            acc[2 * r] = _mm256_fmadd_ps(a, w0, acc[2 * r]);
                            acc[2 * r + 1] = _mm256_fmadd_ps(a, w1, acc[2 * r + 1]);
                        }
                    }
                }
                for (i, a) in acc.iter().enumerate() {
                    // SAFETY: i·8 + 8 ≤ 64 ≤ dst.len().
                    unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(i * 8), *a) };
                }
            }

            /// One row against one panel, two accumulator pairs (even / odd `kk`).
            ///
            /// # Safety
            /// The CPU must support the enabled features; `row` holds `k` values, `panel`
            /// `k·16`, `dst` 16.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $row1(row: &[f32], panel: &[$elem], k: usize, dst: &mut [f32]) {
                assert!(row.len() >= k && panel.len() >= k * PANEL && dst.len() >= PANEL);
                let load: unsafe fn(*const $elem) -> __m256 = $load;
                let (x, w) = (row.as_ptr(), panel.as_ptr());
                let mut acc = [_mm256_setzero_ps(); 4];
                let ahead = crate::qmatmul::prefetch_every_row();
                for kk in 0..k {
                    let lane = 2 * (kk & 1);
                    if ahead {
                        ask_ahead(w, kk);
                    }
                    // SAFETY: kk < k keeps every offset inside the checked slices.
                    unsafe {
                        let a = _mm256_broadcast_ss(&*x.add(kk));
                        let w0 = load(w.add(kk * PANEL));
                        let w1 = load(w.add(kk * PANEL + 8));
                        acc[lane] = _mm256_fmadd_ps(a, w0, acc[lane]);
                        acc[lane + 1] = _mm256_fmadd_ps(a, w1, acc[lane + 1]);
                    }
                }
                let lo = _mm256_add_ps(acc[0], acc[2]);
                let hi = _mm256_add_ps(acc[1], acc[3]);
                // SAFETY: dst holds 16 values.
                unsafe {
                    _mm256_storeu_ps(dst.as_mut_ptr(), lo);
                    _mm256_storeu_ps(dst.as_mut_ptr().add(8), hi);
                }
            }
        };
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_f32(p: *const f32) -> __m256 {
        // SAFETY: the caller passes a pointer to 8 readable f32.
        unsafe { _mm256_loadu_ps(p) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16(p: *const f16) -> __m256 {
        // SAFETY: the caller passes a pointer to 8 readable f16 (16 bytes).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<__m128i>())) }
    }

    kernels!(rows4_f32, row1_f32, f32, "avx2,fma", load_f32);
    kernels!(rows4_f16, row1_f16, f16, "avx2,fma,f16c", load_f16);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
                ((h >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn agrees_with_the_reference_on_ragged_shapes() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (2, 9, 18),
            (6, 20, 20),
            (7, 31, 47),
            (1, 64, 16),
            (3, 33, 17),
            (4, 96, 40),
            (5, 7, 100),
            (8, 128, 31),
            (13, 50, 64),
            (64, 40, 33),
        ] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let packed = PackedF32::from_out_in(&w, n, k).unwrap();
            let mut y = vec![f32::NAN; m * n];
            packed.matmul(&x, m, &mut y).unwrap();
            let want = matmul_reference(&x, &w, m, k, n);
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "m{m} k{k} n{n} [{i}]: {a} vs {b}"
                );
            }
            // The portable path too.
            let np = n.div_ceil(PANEL);
            let mut o = vec![0.0; m * PANEL];
            portable::rows(
                &x,
                m,
                k,
                1,
                &packed.panels[(np - 1) * k * PANEL..],
                k,
                &mut o,
            );
            let c0 = (np - 1) * PANEL;
            for r in 0..m {
                for c in 0..(n - c0) {
                    let (a, b) = (o[r * PANEL + c], want[r * n + c0 + c]);
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()));
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(PackedF32::from_out_in(&[1.0; 6], 4, 2).is_err());
        let p = PackedF32::from_out_in(&[1.0; 6], 3, 2).unwrap();
        assert!(p.matmul(&[1.0; 3], 1, &mut [0.0; 3]).is_err());
        assert!(p.matmul(&[1.0; 2], 1, &mut [0.0; 2]).is_err());
    }
}
