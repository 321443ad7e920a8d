//! Per-token KV quantization (SKVQ, Duanmu et al., COLM 2024; KIVI arXiv 2402.02750): one
//! token's key or value row is reordered by a fixed channel permutation, cut into groups of
//! `group` channels, and each group stored as `bits`-bit codes (2, 4 or 8, packed) with an f16
//! scale and minimum over the group's range clipped by a calibrated ratio. The building block of
//! the compressed paged cache; calibration of the permutation and clip ratios is here too.
//!
//! ```
//! use arbor_kernels::kvquant::RowQuantizer;
//! let q = RowQuantizer::new(4, 32, 64, None, None)?;
//! let row: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
//! let mut packed = vec![0u8; q.packed_bytes()];
//! q.quantize(&row, &mut packed);
//! let mut back = vec![0.0; 64];
//! q.dequantize(&packed, &mut back);
//! assert_eq!(q.packed_bytes(), 2 * (16 + 4)); // two groups: 32 four-bit codes + scale + min
//! assert!(row.iter().zip(&back).all(|(a, b)| (a - b).abs() < 0.08));
//! # Ok::<(), arbor_kernels::KernelError>(())
//! ```

mod channel;
#[cfg(target_arch = "x86_64")]
mod simd;

pub use channel::{ChannelQuantizer, StepFormat};

use half::f16;

use crate::KernelError;

/// Quantizes and dequantizes rows of `channels` values.
#[derive(Debug, Clone, PartialEq)]
pub struct RowQuantizer {
    bits: u32,
    group: usize,
    channels: usize,
    /// Position `i` of the reordered row holds channel `perm[i]`.
    perm: Vec<usize>,
    /// Per group, the fraction of its half-range kept around the midpoint (1: no clipping).
    clip: Vec<f32>,
}

impl RowQuantizer {
    /// A quantizer for `bits` ∈ {2, 4, 8}, groups of `group` channels (dividing `channels`,
    /// a multiple of 4), an optional channel permutation and per-group clip ratios in (0, 1].
    ///
    /// # Errors
    /// [`KernelError::Shape`] for any inconsistent argument.
    pub fn new(
        bits: u32,
        group: usize,
        channels: usize,
        perm: Option<Vec<usize>>,
        clip: Option<Vec<f32>>,
    ) -> Result<Self, KernelError> {
        let bad = |m: String| Err(KernelError::Shape(m));
        if ![2, 4, 8].contains(&bits) {
            return bad(format!("KV quantization to {bits} bits (2, 4 or 8)"));
        }
        if group == 0 || !group.is_multiple_of(4) || !channels.is_multiple_of(group) {
            return bad(format!(
                "group of {group} channels for rows of {channels} (a multiple of 4 dividing it)"
            ));
        }
        let perm = perm.unwrap_or_else(|| (0..channels).collect());
        let mut seen = vec![false; channels];
        if perm.len() != channels
            || perm
                .iter()
                .any(|&p| p >= channels || std::mem::replace(&mut seen[p], true))
        {
            return bad(format!(
                "channel permutation is not a permutation of 0..{channels}"
            ));
        }
        let groups = channels / group;
        let clip = clip.unwrap_or_else(|| vec![1.0; groups]);
        if clip.len() != groups || clip.iter().any(|&c| !(c > 0.0 && c <= 1.0)) {
            return bad(format!(
                "{} clip ratios in (0, 1] for {groups} groups",
                clip.len()
            ));
        }
        Ok(Self {
            bits,
            group,
            channels,
            perm,
            clip,
        })
    }

    /// Bits per code.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// Channels per row.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Channels per group.
    pub fn group(&self) -> usize {
        self.group
    }

    /// The channel permutation (position `i` of a reordered row holds channel `perm()[i]`).
    pub fn perm(&self) -> &[usize] {
        &self.perm
    }

    /// Per group, the clip ratio.
    pub fn clip(&self) -> &[f32] {
        &self.clip
    }

    /// Bytes of one packed group: the codes, then the f16 scale and minimum.
    fn group_bytes(&self) -> usize {
        self.group * self.bits as usize / 8 + 4
    }

    /// Bytes of one packed row.
    pub fn packed_bytes(&self) -> usize {
        self.channels / self.group * self.group_bytes()
    }

    /// The scale and minimum a group gets (both f16, as stored; see [`grid`]).
    fn params(&self, values: impl Iterator<Item = f32> + Clone, clip: f32) -> (f16, f16) {
        let (lo, hi) = values.fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), x| {
            (a.min(x), b.max(x))
        });
        let mid = 0.5 * (lo + hi);
        let half = 0.5 * (hi - lo) * clip;
        grid(mid - half, mid + half, self.bits)
    }

    /// Packs `row` (`channels` values) into `out` (`packed_bytes()` bytes).
    ///
    /// # Panics
    /// If the lengths are wrong (internal invariant: callers size buffers from this type).
    pub fn quantize(&self, row: &[f32], out: &mut [u8]) {
        assert!(
            row.len() == self.channels && out.len() == self.packed_bytes(),
            "quantize sizes"
        );
        let max = (1u32 << self.bits) - 1;
        let per_byte = 8 / self.bits as usize;
        for (g, dst) in out.chunks_exact_mut(self.group_bytes()).enumerate() {
            let idx = &self.perm[g * self.group..(g + 1) * self.group];
            let (scale, min) = self.params(idx.iter().map(|&c| row[c]), self.clip[g]);
            let (s, m) = (scale.to_f32(), min.to_f32());
            let (codes, params) = dst.split_at_mut(dst.len() - 4);
            codes.fill(0);
            for (i, &c) in idx.iter().enumerate() {
                let q = if s > 0.0 {
                    ((row[c] - m) / s).round().clamp(0.0, max as f32) as u32
                } else {
                    0
                };
                codes[i / per_byte] |= (q as u8) << ((i % per_byte) as u32 * self.bits);
            }
            params[..2].copy_from_slice(&scale.to_le_bytes());
            params[2..].copy_from_slice(&min.to_le_bytes());
        }
    }

    /// The codes and grids of a packed row, for kernels that dequantize elsewhere (the GPU
    /// attention): `codes[i]` is position `i` of the reordered row (channel `perm()[i]`),
    /// `grids[g]` group `g`'s `[scale, min]` (a value is `code · scale + min`).
    ///
    /// # Panics
    /// If the lengths are wrong (internal invariant).
    pub fn codes(&self, packed: &[u8], codes: &mut [u8], grids: &mut [[f32; 2]]) {
        assert!(
            packed.len() == self.packed_bytes()
                && codes.len() == self.channels
                && grids.len() == self.channels / self.group,
            "codes sizes"
        );
        let mask = ((1u32 << self.bits) - 1) as u8;
        let per_byte = 8 / self.bits as usize;
        for ((src, dst), grid) in packed
            .chunks_exact(self.group_bytes())
            .zip(codes.chunks_exact_mut(self.group))
            .zip(grids.iter_mut())
        {
            let (bytes, params) = src.split_at(src.len() - 4);
            for (i, c) in dst.iter_mut().enumerate() {
                *c = (bytes[i / per_byte] >> ((i % per_byte) as u32 * self.bits)) & mask;
            }
            *grid = [
                f16::from_le_bytes([params[0], params[1]]).to_f32(),
                f16::from_le_bytes([params[2], params[3]]).to_f32(),
            ];
        }
    }

    /// Unpacks a row into `out` (`channels` values, original channel order).
    ///
    /// # Panics
    /// If the lengths are wrong (internal invariant).
    pub fn dequantize(&self, packed: &[u8], out: &mut [f32]) {
        assert!(
            out.len() == self.channels && packed.len() == self.packed_bytes(),
            "dequantize sizes"
        );
        #[cfg(target_arch = "x86_64")]
        let vector = self.group.is_multiple_of(8) && self.group <= 512 && simd::available();
        let mask = ((1u32 << self.bits) - 1) as u8;
        let per_byte = 8 / self.bits as usize;
        for (g, src) in packed.chunks_exact(self.group_bytes()).enumerate() {
            let (codes, params) = src.split_at(src.len() - 4);
            let s = f16::from_le_bytes([params[0], params[1]]).to_f32();
            let m = f16::from_le_bytes([params[2], params[3]]).to_f32();
            let perm = &self.perm[g * self.group..(g + 1) * self.group];
            #[cfg(target_arch = "x86_64")]
            if vector {
                let mut tmp = [0.0f32; 512];
                let tmp = &mut tmp[..self.group];
                // SAFETY: AVX2 was detected; `tmp` is the group's length, a multiple of 8,
                // and `codes` holds its codes.
                unsafe { simd::uniform(self.bits, codes, s, m, tmp) };
                for (&c, &v) in perm.iter().zip(tmp.iter()) {
                    out[c] = v;
                }
                continue;
            }
            for (i, &c) in perm.iter().enumerate() {
                let q = (codes[i / per_byte] >> ((i % per_byte) as u32 * self.bits)) & mask;
                out[c] = f32::from(q) * s + m;
            }
        }
    }
}

/// The f16 scale and minimum of a quantization grid covering `[lo, hi]` with `bits`-bit codes:
/// the minimum rounded down and the scale rounded up, so the stored grid still spans the whole
/// range. (Rounding both to nearest can leave the extremes up to half an f16 step of the
/// minimum outside it — for a key channel sitting at 60 ± 0.3, that is 0.016, several 8-bit
/// steps, on every page.)
pub(crate) fn grid(lo: f32, hi: f32, bits: u32) -> (f16, f16) {
    let levels = ((1u32 << bits) - 1) as f32;
    let min = f16_down(lo);
    let scale = f16_up((hi - min.to_f32()).max(0.0) / levels);
    (scale, min)
}

/// The largest f16 not above `x` (finite `x` within f16's range).
fn f16_down(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() <= x {
        return h;
    }
    let b = h.to_bits();
    // One f16 step towards −∞: magnitude down for positives, up for negatives (and −0 → the
    // smallest negative subnormal).
    f16::from_bits(match b {
        0 => 0x8001,
        b if b & 0x8000 == 0 => b - 1,
        b => b + 1,
    })
}

/// The smallest f16 not below `x` (finite, non-negative `x` within f16's range).
fn f16_up(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() >= x {
        h
    } else {
        f16::from_bits(h.to_bits() + 1)
    }
}

/// Calibration (SKVQ): a channel order that puts channels of similar range side by side, so
/// each group's range — and with it the quantization step — is as small as it can be.
/// `rows` are samples of `channels` values; channels are sorted by their largest magnitude.
pub fn range_permutation(rows: &[Vec<f32>], channels: usize) -> Vec<usize> {
    let mut peak = vec![0.0f32; channels];
    for r in rows {
        for (p, &x) in peak.iter_mut().zip(r) {
            *p = p.max(x.abs());
        }
    }
    let mut order: Vec<usize> = (0..channels).collect();
    order.sort_by(|&a, &b| peak[a].total_cmp(&peak[b]).then(a.cmp(&b)));
    order
}

/// Calibration (SKVQ): per group, the clip ratio from `grid` with the least squared
/// reconstruction error over `rows`, given the quantizer's bits, groups and permutation.
///
/// # Errors
/// As [`RowQuantizer::new`] for an empty or out-of-range grid.
pub fn calibrate_clip(
    base: &RowQuantizer,
    rows: &[Vec<f32>],
    grid: &[f32],
) -> Result<Vec<f32>, KernelError> {
    let groups = base.channels / base.group;
    let mut best = vec![(f64::INFINITY, 1.0f32); groups];
    for &ratio in grid {
        let q = RowQuantizer::new(
            base.bits,
            base.group,
            base.channels,
            Some(base.perm.clone()),
            Some(vec![ratio; groups]),
        )?;
        let mut err = vec![0.0f64; groups];
        let mut packed = vec![0u8; q.packed_bytes()];
        let mut back = vec![0.0f32; q.channels];
        for r in rows {
            q.quantize(r, &mut packed);
            q.dequantize(&packed, &mut back);
            for (i, &c) in q.perm.iter().enumerate() {
                err[i / q.group] += f64::from(r[c] - back[c]).powi(2);
            }
        }
        for (b, e) in best.iter_mut().zip(err) {
            if e < b.0 {
                *b = (e, ratio);
            }
        }
    }
    Ok(best.into_iter().map(|(_, r)| r).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn rows(rng: &mut StdRng, n: usize, channels: usize) -> Vec<Vec<f32>> {
        // Channels with very different ranges, plus rare outliers: like real keys.
        (0..n)
            .map(|_| {
                (0..channels)
                    .map(|c| {
                        let range = 0.05 + (c * 37 % channels) as f32 / channels as f32 * 4.0;
                        let x = rng.random_range(-range..range);
                        if rng.random_range(0..200) == 0 {
                            x * 8.0
                        } else {
                            x
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// `codes` gives back exactly what `dequantize` computes: `code · scale + min` at the
    /// permuted position, for every width, with a permutation and clipping.
    #[test]
    fn codes_and_grids_reproduce_the_dequantized_row() {
        let mut rng = StdRng::seed_from_u64(21);
        let channels = 64;
        let samples = rows(&mut rng, 8, channels);
        for bits in [2, 4, 8] {
            let perm = range_permutation(&samples, channels);
            let clip: Vec<f32> = (0..4).map(|g| 1.0 - 0.1 * g as f32).collect();
            let q = RowQuantizer::new(bits, 16, channels, Some(perm.clone()), Some(clip)).unwrap();
            for row in &samples {
                let mut packed = vec![0u8; q.packed_bytes()];
                q.quantize(row, &mut packed);
                let mut want = vec![0.0f32; channels];
                q.dequantize(&packed, &mut want);
                let (mut codes, mut grids) = (vec![0u8; channels], vec![[0.0f32; 2]; 4]);
                q.codes(&packed, &mut codes, &mut grids);
                for (i, &c) in perm.iter().enumerate() {
                    let [s, m] = grids[i / 16];
                    assert!(u32::from(codes[i]) < 1 << bits);
                    assert_eq!(
                        f32::from(codes[i]) * s + m,
                        want[c],
                        "{bits} bits, position {i}"
                    );
                }
            }
        }
    }

    /// Every value comes back within half a step of its group (f16 scale and minimum as
    /// stored), or — if clipped — at the nearest end of the group's range.
    #[test]
    fn round_trip_within_the_bound_the_bits_and_range_allow() {
        let mut rng = StdRng::seed_from_u64(3);
        for bits in [2, 4, 8] {
            for &(group, channels) in &[(32usize, 64usize), (64, 128), (16, 48)] {
                let data = rows(&mut rng, 20, channels);
                let perm = range_permutation(&data, channels);
                for clip in [None, Some(vec![0.8; channels / group])] {
                    let unclipped = clip.is_none();
                    let q =
                        RowQuantizer::new(bits, group, channels, Some(perm.clone()), clip).unwrap();
                    let mut packed = vec![0u8; q.packed_bytes()];
                    let mut back = vec![0.0; channels];
                    for r in &data {
                        q.quantize(r, &mut packed);
                        q.dequantize(&packed, &mut back);
                        for (g, src) in packed.chunks_exact(q.group_bytes()).enumerate() {
                            let p = &src[src.len() - 4..];
                            let s = f16::from_le_bytes([p[0], p[1]]).to_f32();
                            let m = f16::from_le_bytes([p[2], p[3]]).to_f32();
                            let top = m + s * ((1u32 << bits) - 1) as f32;
                            for &c in &q.perm[g * group..(g + 1) * group] {
                                let x = r[c];
                                let outside = (m - x).max(x - top).max(0.0);
                                // Without clipping the codes span the whole group range (up to
                                // the f16 rounding of scale and minimum).
                                assert!(
                                    !unclipped || outside <= 0.5 * s + 2e-3 * (1.0 + x.abs()),
                                    "{bits} bits: {x} outside [{m}, {top}]"
                                );
                                let bound = 0.5 * s + outside + 1e-5 * (1.0 + x.abs());
                                let err = (back[c] - x).abs();
                                assert!(
                                    err <= bound,
                                    "{bits} bits, channel {c}: {x} → {} (bound {bound})",
                                    back[c]
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The stored grid covers the range it was made for, whatever f16 rounding does.
    #[test]
    fn grid_covers_its_range() {
        let mut rng = StdRng::seed_from_u64(13);
        for _ in 0..10_000 {
            let offset = rng.random_range(-300.0f32..300.0);
            let width = rng.random_range(0.0f32..2.0);
            let (lo, hi) = (offset, offset + width);
            for bits in [2, 4, 8] {
                let (s, m) = grid(lo, hi, bits);
                let top = m.to_f32() + s.to_f32() * ((1u32 << bits) - 1) as f32;
                assert!(
                    m.to_f32() <= lo && top >= hi,
                    "{lo}..{hi} at {bits}: {m}, {top}"
                );
            }
        }
    }

    /// Unpacking (vectorized where the CPU allows) gives exactly `code · scale + minimum` of
    /// the stored bytes, in the permutation's channel order.
    #[test]
    fn unpacking_is_the_stored_affine_map_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(31);
        for bits in [2u32, 4, 8] {
            for &(group, channels) in &[(8usize, 32usize), (16, 64), (64, 128)] {
                let data = rows(&mut rng, 4, channels);
                let perm = range_permutation(&data, channels);
                for p in [None, Some(perm)] {
                    let q = RowQuantizer::new(bits, group, channels, p, None).unwrap();
                    let mut packed = vec![0u8; q.packed_bytes()];
                    let mut back = vec![0.0f32; channels];
                    for r in &data {
                        q.quantize(r, &mut packed);
                        q.dequantize(&packed, &mut back);
                        for (g, src) in packed.chunks_exact(q.group_bytes()).enumerate() {
                            let n = src.len() - 4;
                            let s = f16::from_le_bytes([src[n], src[n + 1]]).to_f32();
                            let m = f16::from_le_bytes([src[n + 2], src[n + 3]]).to_f32();
                            for i in 0..group {
                                let bit = i * bits as usize;
                                let code = (src[bit / 8] >> (bit % 8)) & ((1u32 << bits) - 1) as u8;
                                let c = q.perm[g * group + i];
                                assert_eq!(back[c], f32::from(code) * s + m, "{bits} bits, {c}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn packed_size_is_codes_plus_scale_and_min() {
        for (bits, want) in [(2, 16 + 4), (4, 32 + 4), (8, 64 + 4)] {
            let q = RowQuantizer::new(bits, 64, 128, None, None).unwrap();
            assert_eq!(q.packed_bytes(), 2 * want);
        }
        // 4-bit, group 64, 128 channels: 0.14 of f32 storage.
        let q = RowQuantizer::new(4, 64, 128, None, None).unwrap();
        assert!((q.packed_bytes() as f64) / (128.0 * 4.0) < 0.15);
    }

    /// Grouping similar ranges and clipping outliers both cut the error on outlier-heavy data.
    #[test]
    fn permutation_and_clipping_reduce_error() {
        let mut rng = StdRng::seed_from_u64(9);
        let (group, channels, bits) = (32, 128, 2);
        let data = rows(&mut rng, 64, channels);
        let mse = |q: &RowQuantizer| {
            let mut packed = vec![0u8; q.packed_bytes()];
            let mut back = vec![0.0; channels];
            let mut e = 0.0f64;
            for r in &data {
                q.quantize(r, &mut packed);
                q.dequantize(&packed, &mut back);
                e += r
                    .iter()
                    .zip(&back)
                    .map(|(a, b)| f64::from(a - b).powi(2))
                    .sum::<f64>();
            }
            e
        };
        let plain = RowQuantizer::new(bits, group, channels, None, None).unwrap();
        let perm = range_permutation(&data, channels);
        let sorted = RowQuantizer::new(bits, group, channels, Some(perm.clone()), None).unwrap();
        let grid: Vec<f32> = (0..=10).map(|i| 1.0 - 0.05 * i as f32).collect();
        let clip = calibrate_clip(&sorted, &data, &grid).unwrap();
        assert!(clip.iter().any(|&c| c < 1.0), "{clip:?}");
        let clipped = RowQuantizer::new(bits, group, channels, Some(perm), Some(clip)).unwrap();
        let (a, b, c) = (mse(&plain), mse(&sorted), mse(&clipped));
        assert!(b < 0.8 * a, "permutation: {a} → {b}");
        assert!(c < b, "clipping: {b} → {c}");
    }

    #[test]
    fn constant_groups_and_bad_arguments() {
        let q = RowQuantizer::new(2, 4, 8, None, None).unwrap();
        let row = [3.5f32; 8];
        let mut packed = vec![0u8; q.packed_bytes()];
        q.quantize(&row, &mut packed);
        let mut back = [0.0f32; 8];
        q.dequantize(&packed, &mut back);
        assert_eq!(back, row);
        assert!(RowQuantizer::new(3, 4, 8, None, None).is_err());
        assert!(RowQuantizer::new(4, 6, 12, None, None).is_err());
        assert!(RowQuantizer::new(4, 4, 10, None, None).is_err());
        assert!(RowQuantizer::new(4, 4, 8, Some(vec![0, 1, 2, 3, 4, 5, 6, 6]), None).is_err());
        assert!(RowQuantizer::new(4, 4, 8, None, Some(vec![1.0, 0.0])).is_err());
        assert!(RowQuantizer::new(4, 4, 8, None, Some(vec![1.0])).is_err());
    }
}
