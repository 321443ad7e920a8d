//! Per-channel key quantization over a block of tokens (KIVI, Liu et al., ICML 2024,
//! arXiv 2402.02750): keys have a few channels of large, slowly varying magnitude (Qwen2's key
//! bias makes them hundreds of times wider than the rest), which a per-token group range
//! spreads over every channel of the group. Quantizing each channel over the tokens of a
//! block (one cache page) gives every channel its own scale and minimum instead.
//!
//! Layout of one packed block: `channels` scales (steps) in the block's [`StepFormat`] (f16,
//! or one byte each), `channels` f16 minimums, then the codes token-major (`tokens` rows of
//! `channels · bits / 8` bytes), so one token's row unpacks without touching the others —
//! eight channels at a time with AVX2 + F16C where the CPU has them (the same
//! multiply-then-add as the portable loop, so the same bits).
//!
//! The grids cost `4 · channels` bytes per block with f16 steps: at 4 bits over pages of 8
//! tokens as much again as the codes. [`StepFormat::F8`] stores each step in one byte (the
//! minimum stays f16: it must place a narrow channel sitting far from zero).
//!
//! **Refined channels** ([`ChannelQuantizer::with_refinement`]): in each segment of a block
//! (one KV head's channels) the few channels with the widest steps also get a second code per
//! token, of the same width, for the first code's rounding error — twice the bits where the
//! error is largest, in the spirit of KVQuant's dense-and-sparse outliers (Hooper et al.,
//! NeurIPS 2024, arXiv 2401.18079), chosen per block from the block itself (no calibration,
//! no state). After the codes: the refined channels' indices within their segment (`u8`,
//! ascending per segment), then `tokens` rows of their residual codes.

use half::f16;

use crate::KernelError;

/// How a per-channel block stores each channel's step (the grid's scale).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StepFormat {
    /// IEEE half precision: 2 bytes per channel.
    #[default]
    F16,
    /// An unsigned 8-bit float: 1 byte per channel, f16's five exponent bits and its top three
    /// mantissa bits (bits 7–14 of the f16, so it widens to f16 with a shift), rounded up so
    /// the grid still spans the channel's range. Four significant bits: a step is up to 1/8
    /// wider than the f16 one, which adds that much to the rounding error of the channel.
    F8,
}

impl StepFormat {
    /// Bytes per stored step.
    pub fn bytes(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F8 => 1,
        }
    }

    /// Stores `step` (non-negative, as [`super::grid`] gives it) as channel `ch`'s step in
    /// `steps`; returns the value stored.
    fn store(self, step: f16, steps: &mut [u8], ch: usize) -> f32 {
        match self {
            Self::F16 => {
                steps[2 * ch..2 * ch + 2].copy_from_slice(&step.to_le_bytes());
                step.to_f32()
            }
            Self::F8 => {
                steps[ch] = f8_up(step);
                f8_value(steps[ch])
            }
        }
    }

    /// Channel `ch`'s step in `steps`.
    fn load(self, steps: &[u8], ch: usize) -> f32 {
        match self {
            Self::F16 => half_at(steps, ch),
            Self::F8 => f8_value(steps[ch]),
        }
    }
}

/// The smallest [`StepFormat::F8`] code whose value is not below `h` (a non-negative finite
/// f16), saturating at the largest finite one (61 440).
fn f8_up(h: f16) -> u8 {
    let b = h.to_bits() & 0x7fff;
    let up = (b >> 7) + u16::from(b & 0x7f != 0);
    up.min(0xf7) as u8
}

/// The value of a [`StepFormat::F8`] code.
fn f8_value(code: u8) -> f32 {
    f16::from_bits(u16::from(code) << 7).to_f32()
}

/// Quantizes blocks of `tokens × channels` values per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelQuantizer {
    bits: u32,
    tokens: usize,
    channels: usize,
    /// Refined channels per segment (0: none).
    refined: usize,
    /// Channels per segment (the selection of refined channels is per segment).
    segment: usize,
    /// How steps are stored.
    steps: StepFormat,
}

impl ChannelQuantizer {
    /// A quantizer for `bits` ∈ {2, 4, 8} over blocks of `tokens` rows of `channels` values
    /// (`channels · bits` a multiple of 8).
    ///
    /// # Errors
    /// [`KernelError::Shape`] for an unsupported width or sizes.
    pub fn new(bits: u32, tokens: usize, channels: usize) -> Result<Self, KernelError> {
        if ![2, 4, 8].contains(&bits) {
            return Err(KernelError::Shape(format!(
                "KV quantization to {bits} bits (2, 4 or 8)"
            )));
        }
        if tokens == 0 || channels == 0 || !(channels * bits as usize).is_multiple_of(8) {
            return Err(KernelError::Shape(format!(
                "per-channel blocks of {tokens} tokens × {channels} channels at {bits} bits"
            )));
        }
        Ok(Self {
            bits,
            tokens,
            channels,
            refined: 0,
            segment: channels,
            steps: StepFormat::F16,
        })
    }

    /// The same quantizer storing its steps in `steps`.
    pub fn with_steps(self, steps: StepFormat) -> Self {
        Self { steps, ..self }
    }

    /// How steps are stored.
    pub fn steps(&self) -> StepFormat {
        self.steps
    }

    /// Bytes of a block's grids (steps, then minimums).
    fn params_bytes(&self) -> usize {
        (self.steps.bytes() + 2) * self.channels
    }

    /// The same quantizer with `per_segment` refined channels in each segment of `segment`
    /// channels (a divisor of `channels`, at most 256): the channels with the widest steps
    /// get a residual code (see the module docs). `per_segment` 0 turns refinement off.
    ///
    /// # Errors
    /// [`KernelError::Shape`] when the segment does not divide the channels, holds fewer than
    /// `per_segment` channels or more than 256, or the residual codes of a token do not fill
    /// whole bytes.
    pub fn with_refinement(self, per_segment: usize, segment: usize) -> Result<Self, KernelError> {
        if per_segment == 0 {
            return Ok(Self {
                refined: 0,
                segment: self.channels,
                ..self
            });
        }
        let total = per_segment * self.channels / segment.max(1);
        if segment == 0
            || !self.channels.is_multiple_of(segment)
            || segment > 256
            || per_segment > segment
            || !(total * self.bits as usize).is_multiple_of(8)
        {
            return Err(KernelError::Shape(format!(
                "{per_segment} refined channels per segment of {segment} in blocks of {} \
                 channels at {} bits",
                self.channels, self.bits
            )));
        }
        Ok(Self {
            refined: per_segment,
            segment,
            ..self
        })
    }

    /// Refined channels per segment.
    pub fn refined(&self) -> usize {
        self.refined
    }

    /// Refined channels per block.
    fn refined_total(&self) -> usize {
        self.refined * (self.channels / self.segment)
    }

    /// Bytes of one token's residual codes.
    fn residual_bytes(&self) -> usize {
        self.refined_total() * self.bits as usize / 8
    }

    /// Bits per code.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// Tokens per block.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Channels per token.
    pub fn channels(&self) -> usize {
        self.channels
    }

    fn row_bytes(&self) -> usize {
        self.channels * self.bits as usize / 8
    }

    /// Bytes of one packed block.
    pub fn packed_bytes(&self) -> usize {
        self.params_bytes()
            + self.tokens * self.row_bytes()
            + self.refined_total()
            + self.tokens * self.residual_bytes()
    }

    /// Packs `block` (`tokens × channels`, token-major) into `out` (`packed_bytes()`).
    ///
    /// # Panics
    /// If the lengths are wrong (internal invariant: callers size buffers from this type).
    pub fn quantize(&self, block: &[f32], out: &mut [u8]) {
        let c = self.channels;
        assert!(
            block.len() == self.tokens * c && out.len() == self.packed_bytes(),
            "quantize sizes"
        );
        let levels = ((1u32 << self.bits) - 1) as f32;
        let (params, rest) = out.split_at_mut(self.params_bytes());
        let (steps, mins) = params.split_at_mut(self.steps.bytes() * c);
        rest.fill(0);
        let (codes, refinement) = rest.split_at_mut(self.tokens * self.row_bytes());
        let mut sm = Vec::with_capacity(c);
        for ch in 0..c {
            let (lo, hi) = block
                .iter()
                .skip(ch)
                .step_by(c)
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                    (a.min(x), b.max(x))
                });
            let (scale, min) = super::grid(lo, hi, self.bits);
            let s = self.steps.store(scale, steps, ch);
            mins[2 * ch..2 * ch + 2].copy_from_slice(&min.to_le_bytes());
            sm.push((s, min.to_f32()));
        }
        for (row, dst) in block
            .chunks_exact(c)
            .zip(codes.chunks_exact_mut(self.row_bytes()))
        {
            for (i, (&x, &(s, m))) in row.iter().zip(&sm).enumerate() {
                let q = if s > 0.0 {
                    ((x - m) / s).round().clamp(0.0, levels) as u32
                } else {
                    0
                };
                put_code(dst, i, self.bits, q as u8);
            }
        }
        if self.refined > 0 {
            self.refine(block, &sm, codes, refinement);
        }
    }

    /// Picks each segment's refined channels (widest stored steps first, ties to the lower
    /// index) and writes their indices and residual codes: the residual of `x` against its
    /// first code's value `v` is coded on a grid of `scale / levels` centred on `v`, so it
    /// needs no range of its own.
    fn refine(&self, block: &[f32], sm: &[(f32, f32)], codes: &[u8], refinement: &mut [u8]) {
        let (c, bits) = (self.channels, self.bits);
        let levels = ((1u32 << bits) - 1) as f32;
        let total = self.refined_total();
        let (index, residuals) = refinement.split_at_mut(total);
        let mut chosen = Vec::with_capacity(total);
        for (seg, idx) in index.chunks_exact_mut(self.refined).enumerate() {
            let base = seg * self.segment;
            let mut order: Vec<usize> = (0..self.segment).collect();
            order.sort_by(|&a, &b| sm[base + b].0.total_cmp(&sm[base + a].0).then(a.cmp(&b)));
            let pick = &mut order[..self.refined];
            pick.sort_unstable();
            for (slot, &ch) in idx.iter_mut().zip(&*pick) {
                *slot = ch as u8;
                chosen.push(base + ch);
            }
        }
        for (t, dst) in residuals
            .chunks_exact_mut(self.residual_bytes())
            .enumerate()
        {
            let row = &codes[t * self.row_bytes()..(t + 1) * self.row_bytes()];
            for (k, &ch) in chosen.iter().enumerate() {
                let (s, m) = sm[ch];
                let v = f32::from(get_code(row, ch, bits)) * s + m;
                let r = if s > 0.0 {
                    ((block[t * c + ch] - v) / (s / levels) + levels / 2.0)
                        .round()
                        .clamp(0.0, levels) as u8
                } else {
                    0
                };
                put_code(dst, k, bits, r);
            }
        }
    }

    /// Adds token `t`'s residuals to the refined channels among `from .. from + out.len()`.
    /// `vector`: eight refined channels at a time where the CPU can (AVX2 + F16C) and the
    /// segments hold a multiple of 8 (the same bits either way).
    fn apply_refinement(
        &self,
        packed: &[u8],
        t: usize,
        from: usize,
        out: &mut [f32],
        vector: bool,
    ) {
        let bits = self.bits;
        let levels = ((1u32 << bits) - 1) as f32;
        let total = self.refined_total();
        let at = self.params_bytes() + self.tokens * self.row_bytes();
        let index = &packed[at..at + total];
        let rb = self.residual_bytes();
        let res = &packed[at + total + t * rb..at + total + (t + 1) * rb];
        let end = from + out.len();
        // The segments the range touches; `k` numbers the refined channels of the block.
        #[cfg(target_arch = "x86_64")]
        let vector = vector && self.refined.is_multiple_of(8) && super::simd::available();
        for seg in from / self.segment..end.div_ceil(self.segment) {
            let (base, first) = (seg * self.segment, seg * self.refined);
            let seg_index = &index[first..first + self.refined];
            #[cfg(target_arch = "x86_64")]
            if vector {
                let r = super::simd::Refined {
                    bits,
                    steps: self.steps,
                    packed,
                    index: seg_index,
                    res,
                    first,
                    base,
                };
                // SAFETY: AVX2 and F16C were detected; `refined` (so `first`) is a multiple
                // of 8, the indices are the segment's channels and the codes `res`'s.
                unsafe { super::simd::refine(&r, from, out) };
                continue;
            }
            for (k, &i) in (first..).zip(seg_index) {
                let ch = base + usize::from(i);
                if ch >= end {
                    break; // indices ascend within a segment
                }
                if ch >= from {
                    let r = f32::from(get_code(res, k, bits)) - levels / 2.0;
                    out[ch - from] += r * (self.steps.load(packed, ch) / levels);
                }
            }
        }
    }

    /// Unpacks channels `from .. from + out.len()` of token `t` of a packed block.
    ///
    /// # Panics
    /// If the token or channel range is outside the block (internal invariant).
    pub fn dequantize(&self, packed: &[u8], t: usize, from: usize, out: &mut [f32]) {
        assert!(
            packed.len() == self.packed_bytes()
                && t < self.tokens
                && from + out.len() <= self.channels,
            "dequantize range"
        );
        let (scales, mins, row) = self.parts(packed, t);
        #[cfg(target_arch = "x86_64")]
        if from.is_multiple_of(8) && out.len().is_multiple_of(8) && super::simd::available() {
            // SAFETY: AVX2 and F16C were detected; the ranges were checked above.
            unsafe {
                super::simd::per_channel(self.bits, self.steps, scales, mins, row, from, out);
            };
        } else {
            self.dequantize_portable(packed, t, from, out);
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.dequantize_portable(packed, t, from, out);
        if self.refined > 0 {
            self.apply_refinement(packed, t, from, out, true);
        }
    }

    /// The codes and grids of a packed block, for kernels that dequantize elsewhere (the GPU
    /// attention): `codes` token-major (`tokens × channels`), `grids[ch]` channel `ch`'s
    /// `[scale, min]` (a value is `code · scale + min`).
    ///
    /// # Panics
    /// If the lengths are wrong (internal invariant).
    pub fn codes(&self, packed: &[u8], codes: &mut [u8], grids: &mut [[f32; 2]]) {
        let c = self.channels;
        assert!(
            packed.len() == self.packed_bytes()
                && codes.len() == self.tokens * c
                && grids.len() == c,
            "codes sizes"
        );
        for (t, dst) in codes.chunks_exact_mut(c).enumerate() {
            let (_, _, row) = self.parts(packed, t);
            for (i, q) in dst.iter_mut().enumerate() {
                *q = get_code(row, i, self.bits);
            }
        }
        let (scales, mins, _) = self.parts(packed, 0);
        for (i, g) in grids.iter_mut().enumerate() {
            *g = [self.steps.load(scales, i), half_at(mins, i)];
        }
    }

    /// Scales, minimums and token `t`'s codes of a packed block.
    fn parts<'a>(&self, packed: &'a [u8], t: usize) -> (&'a [u8], &'a [u8], &'a [u8]) {
        let c = self.channels;
        let (params, codes) = packed.split_at(self.params_bytes());
        let (scales, mins) = params.split_at(self.steps.bytes() * c);
        (
            scales,
            mins,
            &codes[t * self.row_bytes()..(t + 1) * self.row_bytes()],
        )
    }

    /// [`ChannelQuantizer::dequantize`] with the portable loops only (what tests compare the
    /// vector paths with).
    #[cfg(test)]
    fn dequantize_all_portable(&self, packed: &[u8], t: usize, from: usize, out: &mut [f32]) {
        self.dequantize_portable(packed, t, from, out);
        if self.refined > 0 {
            self.apply_refinement(packed, t, from, out, false);
        }
    }

    /// [`ChannelQuantizer::dequantize`] with the portable loop (also what tests compare the
    /// vector path with).
    fn dequantize_portable(&self, packed: &[u8], t: usize, from: usize, out: &mut [f32]) {
        let (scales, mins, row) = self.parts(packed, t);
        for (k, o) in out.iter_mut().enumerate() {
            let i = from + k;
            *o = f32::from(get_code(row, i, self.bits)) * self.steps.load(scales, i)
                + half_at(mins, i);
        }
    }
}

/// Code `i` of a packed row of `bits`-bit codes (little end first).
#[inline(always)]
fn get_code(row: &[u8], i: usize, bits: u32) -> u8 {
    // `8 / bits` codes a byte, as shifts: `bits` is 2, 4 or 8.
    let per_byte_log2 = 3 - bits.trailing_zeros();
    let within = (i & ((1 << per_byte_log2) - 1)) as u32;
    (row[i >> per_byte_log2] >> (within * bits)) & ((1u32 << bits) - 1) as u8
}

/// Sets code `i` of a zeroed packed row of `bits`-bit codes.
fn put_code(row: &mut [u8], i: usize, bits: u32, q: u8) {
    let per_byte = 8 / bits as usize;
    row[i / per_byte] |= q << ((i % per_byte) as u32 * bits);
}

/// The `i`-th little-endian f16 of `bytes`, as f32.
fn half_at(bytes: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// `codes` gives back exactly what `dequantize` computes, token by token.
    #[test]
    fn codes_and_grids_reproduce_the_dequantized_block() {
        let mut rng = StdRng::seed_from_u64(8);
        for (bits, steps) in [2, 4, 8]
            .into_iter()
            .flat_map(|b| [(b, StepFormat::F16), (b, StepFormat::F8)])
        {
            let (tokens, channels) = (16, 32);
            let block: Vec<f32> = (0..tokens * channels)
                .map(|i| (i % channels) as f32 * 3.0 + rng.random_range(-1.0..1.0))
                .collect();
            let q = ChannelQuantizer::new(bits, tokens, channels)
                .unwrap()
                .with_steps(steps);
            let mut packed = vec![0u8; q.packed_bytes()];
            q.quantize(&block, &mut packed);
            let mut codes = vec![0u8; tokens * channels];
            let mut grids = vec![[0.0f32; 2]; channels];
            q.codes(&packed, &mut codes, &mut grids);
            let mut row = vec![0.0f32; channels];
            for t in 0..tokens {
                q.dequantize(&packed, t, 0, &mut row);
                for (ch, &want) in row.iter().enumerate() {
                    let [s, m] = grids[ch];
                    let c = codes[t * channels + ch];
                    assert!(u32::from(c) < 1 << bits);
                    assert_eq!(
                        f32::from(c) * s + m,
                        want,
                        "{bits} bits, {steps:?} ({t}, {ch})"
                    );
                }
            }
        }
    }

    /// Every value within half a step of its channel's range (f16 scale and minimum as stored).
    #[test]
    fn round_trip_within_half_a_step_per_channel() {
        let mut rng = StdRng::seed_from_u64(5);
        for (bits, steps) in [2, 4, 8]
            .into_iter()
            .flat_map(|b| [(b, StepFormat::F16), (b, StepFormat::F8)])
        {
            let (tokens, channels) = (16, 24);
            // Channel offsets and widths that differ by orders of magnitude, as in real keys.
            let block: Vec<f32> = (0..tokens * channels)
                .map(|i| {
                    let ch = i % channels;
                    let offset = if ch % 7 == 0 { 80.0 } else { 0.0 };
                    offset + rng.random_range(-1.0..1.0) * (0.01 + ch as f32 * 0.1)
                })
                .collect();
            let q = ChannelQuantizer::new(bits, tokens, channels)
                .unwrap()
                .with_steps(steps);
            let mut packed = vec![0u8; q.packed_bytes()];
            q.quantize(&block, &mut packed);
            let mut row = vec![0.0f32; channels];
            for t in 0..tokens {
                q.dequantize(&packed, t, 0, &mut row);
                for (ch, &got) in row.iter().enumerate() {
                    let s = steps.load(&packed, ch);
                    let x = block[t * channels + ch];
                    // Half a step: the stored grid covers the channel's range.
                    let bound = 0.5 * s + 1e-5 * (1.0 + x.abs());
                    assert!(
                        (got - x).abs() <= bound,
                        "{bits} bits, {steps:?} ({t}, {ch}): {x} → {got}, step {s}"
                    );
                }
                // A channel sub-range reads the same values, and the vector path the same
                // bits as the portable loop.
                let mut part = vec![0.0f32; 8];
                q.dequantize(&packed, t, 8, &mut part);
                assert_eq!(part, row[8..16]);
                let mut portable = vec![0.0f32; channels];
                q.dequantize_portable(&packed, t, 0, &mut portable);
                assert_eq!(portable, row);
            }
        }
        assert_eq!(
            ChannelQuantizer::new(4, 16, 64).unwrap().packed_bytes(),
            4 * 64 + 16 * 32
        );
        assert_eq!(
            ChannelQuantizer::new(4, 16, 64)
                .unwrap()
                .with_steps(StepFormat::F8)
                .packed_bytes(),
            3 * 64 + 16 * 32
        );
        assert!(ChannelQuantizer::new(3, 16, 64).is_err());
        let q = ChannelQuantizer::new(4, 8, 128).unwrap();
        assert!(
            q.clone().with_refinement(4, 48).is_err(),
            "segment must divide"
        );
        assert!(
            q.clone().with_refinement(65, 64).is_err(),
            "more than the segment"
        );
        assert!(
            q.clone().with_refinement(1, 128).is_err(),
            "4 bits: half a byte"
        );
        assert!(
            ChannelQuantizer::new(4, 8, 512)
                .unwrap()
                .with_refinement(2, 512)
                .is_err(),
            "u8 indices"
        );
        assert_eq!(
            q.clone().with_refinement(8, 64).unwrap().packed_bytes(),
            4 * 128 + 8 * 64 + 16 + 8 * 8
        );
        assert_eq!(
            q.with_refinement(8, 64)
                .unwrap()
                .with_steps(StepFormat::F8)
                .packed_bytes(),
            3 * 128 + 8 * 64 + 16 + 8 * 8
        );
        assert!(ChannelQuantizer::new(4, 0, 64).is_err());
        assert!(ChannelQuantizer::new(2, 16, 3).is_err());
    }

    /// Refinement: in each segment the channels with the widest stored steps get a second
    /// code, which brings them within half of `step / levels`; the others keep their bound,
    /// and any channel sub-range reads the same values as the whole row.
    #[test]
    fn refined_channels_are_the_widest_and_within_a_finer_bound() {
        let mut rng = StdRng::seed_from_u64(21);
        for (bits, steps, per) in [2, 4, 8].into_iter().flat_map(|b| {
            // 4 per segment: the portable loop; 8: eight at a time where the CPU can.
            [StepFormat::F16, StepFormat::F8]
                .into_iter()
                .flat_map(move |s| [(b, s, 4), (b, s, 8)])
        }) {
            let (tokens, channels, segment) = (8, 64, 32);
            let width: Vec<f32> = (0..channels)
                .map(|_| 10f32.powf(rng.random_range(-2.0..1.0)))
                .collect();
            let block: Vec<f32> = (0..tokens * channels)
                .map(|i| {
                    let ch = i % channels;
                    (ch % 5) as f32 * 20.0 + rng.random_range(-1.0..1.0) * width[ch]
                })
                .collect();
            let q = ChannelQuantizer::new(bits, tokens, channels)
                .unwrap()
                .with_refinement(per, segment)
                .unwrap()
                .with_steps(steps);
            let mut packed = vec![0u8; q.packed_bytes()];
            q.quantize(&block, &mut packed);
            let levels = ((1u32 << bits) - 1) as f32;
            let step = |ch: usize| steps.load(&packed, ch);
            let at = (steps.bytes() + 2) * channels + tokens * channels * bits as usize / 8;
            let mut refined = vec![false; channels];
            for seg in 0..channels / segment {
                let idx = &packed[at + seg * per..at + (seg + 1) * per];
                assert!(idx.windows(2).all(|w| w[0] < w[1]), "ascending, distinct");
                for &i in idx {
                    refined[seg * segment + usize::from(i)] = true;
                }
                let narrowest_refined = idx
                    .iter()
                    .map(|&i| step(seg * segment + usize::from(i)))
                    .fold(f32::INFINITY, f32::min);
                for ch in (seg * segment..(seg + 1) * segment).filter(|&ch| !refined[ch]) {
                    assert!(step(ch) <= narrowest_refined, "{bits} bits: {ch} is wider");
                }
            }
            let mut row = vec![0.0f32; channels];
            let mut part = vec![0.0f32; 24];
            for t in 0..tokens {
                q.dequantize(&packed, t, 0, &mut row);
                for (ch, &got) in row.iter().enumerate() {
                    let x = block[t * channels + ch];
                    let s = step(ch);
                    let bound = if refined[ch] {
                        0.5 * s / levels
                    } else {
                        0.5 * s
                    };
                    assert!(
                        (got - x).abs() <= bound + 1e-5 * (1.0 + x.abs()),
                        "{bits} bits, {steps:?}, {per} ({t}, {ch}, refined {}): {x} → {got}, \
                         step {s}",
                        refined[ch]
                    );
                }
                let mut portable = vec![0.0f32; channels];
                q.dequantize_all_portable(&packed, t, 0, &mut portable);
                assert_eq!(portable, row, "{bits} bits, {steps:?}, {per} refined");
                // Ranges that start or end inside a segment, vector and portable alike.
                for from in [0, 8, 20, 40] {
                    q.dequantize(&packed, t, from, &mut part);
                    assert_eq!(
                        part,
                        row[from..from + 24],
                        "{bits} bits, {steps:?}, from {from}"
                    );
                }
            }
        }
    }

    /// F8 steps: over every non-negative finite f16, the code is the smallest whose value is
    /// not below it (so grids still span their range), and the value is within 1/8 above.
    #[test]
    fn f8_steps_round_up_to_the_nearest_code() {
        let values: Vec<f32> = (0..=0xf7u8).map(f8_value).collect();
        assert!(values.windows(2).all(|w| w[0] < w[1]), "codes in order");
        assert_eq!((values[0], values[0xf7]), (0.0, 61440.0));
        for bits in 0..0x7c00u16 {
            let h = f16::from_bits(bits);
            let x = h.to_f32();
            let code = f8_up(h);
            let v = f8_value(code);
            if x <= 61440.0 {
                assert!(v >= x, "{x} → {v}");
                assert!(
                    code == 0 || values[usize::from(code) - 1] < x,
                    "{x}: not the smallest"
                );
                // Normal values: within 1/8 (subnormals: within one subnormal f8 step).
                assert!(v - x <= (x / 8.0).max(2f32.powi(-17)), "{x} → {v}");
            } else {
                assert_eq!(code, 0xf7, "{x} saturates");
            }
        }
    }
}
