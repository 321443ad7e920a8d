//! Activations quantized to 8 bits for integer dot products with block-quantized weights.
//!
//! Each row is cut into blocks (32 values for the 32-weight formats, 256 for the k-quants,
//! matching the weight blocks they meet), each block stored as signed bytes `q` with one f32
//! scale `d = max|x| / 127` (`x ≈ d·q`). Beside them: the integer sum of every 16 bytes (the
//! k-quants' minimums and offsets are applied through these, once per super-block) and
//! `d·Σq` per 32 values (the same for the 32-weight formats). This is the role ggml's `q8_0` /
//! `q8_K` play for llama.cpp.

use rayon::prelude::*;

/// `m` rows of `k` activations, quantized per block.
#[derive(Debug, Clone)]
pub struct Q8Acts {
    m: usize,
    k: usize,
    block: usize,
    q: Vec<i8>,
    /// One scale per block.
    d: Vec<f32>,
    /// Σq per 16 values.
    sum16: Vec<i16>,
    /// d·Σq per 32 values.
    xsum: Vec<f32>,
    /// Σq of each 64 values as two i16 (first 32 in the low half), for the interleaved
    /// kernels' minimums (empty unless `k` is a multiple of 64).
    sum32x2: Vec<i32>,
    /// Σq of each 32 values (the interleaved Q8_0 kernel's offset correction).
    sum32: Vec<i32>,
    /// `−32·Σq` of each 16 values (Q6_K's storage offset; empty unless `block` is 256).
    off16: Vec<i32>,
}

/// 1.5 · 2²³: adding and subtracting it rounds an f32 below 2²² to an integer.
const ROUND: f32 = 12_582_912.0;

/// One block to quantize: inputs, quantized values, scale, per-16 sums.
type BlockJob<'a> = (((&'a [f32], &'a mut [i8]), &'a mut f32), &'a mut [i16]);

/// One quantized row, as the kernels read it.
#[derive(Debug, Clone, Copy)]
pub(super) struct ActRow<'a> {
    pub q: &'a [i8],
    pub d: &'a [f32],
    pub sum16: &'a [i16],
    pub xsum: &'a [f32],
    pub sum32x2: &'a [i32],
    pub sum32: &'a [i32],
    pub off16: &'a [i32],
}

impl<'a> ActRow<'a> {
    /// Blocks `b0..b1` of this row (`block` values each, the quantization's block) as a row
    /// of their own: what a kernel reads for that panel of `k`.
    pub(super) fn blocks(&self, b0: usize, b1: usize, block: usize) -> ActRow<'a> {
        let per = |v: &'a [i32], n: usize| if v.is_empty() { v } else { &v[b0 * n..b1 * n] };
        ActRow {
            q: &self.q[b0 * block..b1 * block],
            d: &self.d[b0..b1],
            sum16: &self.sum16[b0 * block / 16..b1 * block / 16],
            xsum: &self.xsum[b0 * block / 32..b1 * block / 32],
            sum32x2: per(self.sum32x2, block / 64),
            sum32: &self.sum32[b0 * block / 32..b1 * block / 32],
            off16: per(self.off16, block / 16),
        }
    }
}

/// Whether this CPU runs [`quantize_block_avx2`].
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`quantize_block`] compiled for AVX2 (the same operations in the same order, in 256-bit
/// lanes: the same bytes).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_block_avx2(job: BlockJob<'_>) {
    quantize_block(job);
}

/// Whether this CPU runs [`quantize_block_avx512`].
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`quantize_block`] in 512-bit lanes, written out: the same bytes (the same maximum — NaNs
/// passed over as `f32::max` does —, the same multiply then add, the integer's low byte;
/// test `every_block_body_gives_the_same_bytes_even_for_odd_values`). The loops the compiler
/// makes of [`quantize_block`] carry `f32::max`'s NaN handling (a compare and a blend per
/// vector) and run 256 bits wide at most. Measured (`qmatmul` bench,
/// `between_products/quantize`, rows of 8 960):
/// 1 row 7.8 → 2.8 µs, 8 rows (two threads) 50 → 30 µs; in one process, an 8-node
/// verification of the 1.5B took 0.986–0.992× the time, a one-node step 0.99–1.0×.
///
/// # Safety
/// The CPU must support AVX512F; the block's length is a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_block_avx512((((xb, qb), db), s16): BlockJob<'_>) {
    use std::arch::x86_64::*;
    debug_assert!(xb.len().is_multiple_of(16) && qb.len() == xb.len());
    debug_assert!(s16.len() == xb.len() / 16);
    let abs = _mm512_set1_epi32(0x7FFF_FFFF);
    let load = |c: &[f32]| {
        // SAFETY: `c` holds 16 floats (a chunk of 16).
        unsafe { _mm512_loadu_ps(c.as_ptr()) }
    };
    // Four running maximums (a chain of `vmaxps` is four cycles a step); none ever holds a
    // NaN, so how they combine does not change the result.
    let (mut t0, mut t1, mut t2, mut t3) = (
        _mm512_setzero_ps(),
        _mm512_setzero_ps(),
        _mm512_setzero_ps(),
        _mm512_setzero_ps(),
    );
    let magnitude =
        |c: &[f32]| _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(load(c)), abs));
    let mut fours = xb.chunks_exact(64);
    for c in &mut fours {
        // `vmaxps` returns its second operand where either is NaN: a NaN value is passed over.
        t0 = _mm512_max_ps(magnitude(&c[..16]), t0);
        t1 = _mm512_max_ps(magnitude(&c[16..32]), t1);
        t2 = _mm512_max_ps(magnitude(&c[32..48]), t2);
        t3 = _mm512_max_ps(magnitude(&c[48..]), t3);
    }
    for c in fours.remainder().chunks_exact(16) {
        t0 = _mm512_max_ps(magnitude(c), t0);
    }
    let top = _mm512_max_ps(_mm512_max_ps(t0, t1), _mm512_max_ps(t2, t3));
    let amax = _mm512_reduce_max_ps(top);
    let scale = amax / 127.0;
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let (inv, round) = (_mm512_set1_ps(inv), _mm512_set1_ps(ROUND));
    let bits = _mm512_set1_epi32(ROUND.to_bits() as i32);
    let (flip, zero) = (_mm_set1_epi8(-128), _mm_setzero_si128());
    for ((c, q), s) in xb
        .chunks_exact(16)
        .zip(qb.chunks_exact_mut(16))
        .zip(s16.iter_mut())
    {
        let t = _mm512_add_ps(_mm512_mul_ps(load(c), inv), round);
        let b = _mm512_cvtepi32_epi8(_mm512_sub_epi32(_mm512_castps_si512(t), bits));
        // SAFETY: `q` holds 16 bytes.
        unsafe { _mm_storeu_si128(q.as_mut_ptr().cast(), b) };
        // Σ(q + 128) of each 8 bytes, less 16 · 128.
        let sad = _mm_sad_epu8(_mm_xor_si128(b, flip), zero);
        *s = (_mm_cvtsi128_si64(sad) + _mm_extract_epi64::<1>(sad) - 2048) as i16;
    }
    *db = scale;
}

/// One block: its scale `max|x| / 127`, its values rounded to nearest (ties to even) in units
/// of it, and their sums per 16.
#[inline(always)]
fn quantize_block((((xb, qb), db), s16): BlockJob<'_>) {
    let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    for (qv, &v) in qb.iter_mut().zip(xb) {
        // |v·inv| ≤ 127. Rounded to nearest, ties to even (as llama.cpp's SIMD quantizers
        // do), by the float adder: exact below 2²², free of a libm call per value, and the
        // integer is read from the sum's low mantissa bits — integer lanes, where a
        // saturating `as` from f32 is a scalar convert and compares per value.
        let bits = (v * inv + ROUND).to_bits() as i32;
        *qv = bits.wrapping_sub(ROUND.to_bits() as i32) as i8;
    }
    *db = scale;
    for (s, chunk) in s16.iter_mut().zip(qb.chunks_exact(16)) {
        *s = chunk.iter().map(|&v| i16::from(v)).sum();
    }
}

impl Q8Acts {
    /// Quantizes `x` (`[m, k]` row-major) in blocks of `block` values (a multiple of 32 that
    /// divides `k`; callers check).
    pub fn quantize(x: &[f32], m: usize, k: usize, block: usize) -> Self {
        debug_assert!(block.is_multiple_of(32) && k.is_multiple_of(block) && x.len() == m * k);
        let mut q = vec![0i8; m * k];
        let mut d = vec![0.0f32; m * k / block];
        let mut sum16 = vec![0i16; m * k / 16];
        let (avx2, avx512) = (avx2(), avx512());
        let work = |job: BlockJob<'_>| {
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: the CPU supports AVX512F (checked by `avx512`); blocks are
                // multiples of 32 values.
                unsafe { quantize_block_avx512(job) };
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU supports AVX2 (checked by `avx2`).
                unsafe { quantize_block_avx2(job) };
                return;
            }
            let _ = (avx2, avx512);
            quantize_block(job);
        };
        if m * k >= 1 << 15 {
            x.par_chunks_exact(block)
                .zip(q.par_chunks_exact_mut(block))
                .zip(d.par_iter_mut())
                .zip(sum16.par_chunks_exact_mut(block / 16))
                .for_each(work);
        } else {
            x.chunks_exact(block)
                .zip(q.chunks_exact_mut(block))
                .zip(d.iter_mut())
                .zip(sum16.chunks_exact_mut(block / 16))
                .for_each(work);
        }
        let sum32: Vec<i32> = sum16
            .chunks_exact(2)
            .map(|s| i32::from(s[0]) + i32::from(s[1]))
            .collect();
        // Block by block (a division per value, to find its block, had cost more than the
        // rest of these sums together).
        let mut xsum = Vec::with_capacity(sum32.len());
        for (s, &db) in sum32.chunks_exact(block / 32).zip(&d) {
            xsum.extend(s.iter().map(|&v| db * v as f32));
        }
        // |Σq| over 32 values ≤ 32·127: each fits the i16 halves.
        let sum32x2 = if k.is_multiple_of(64) {
            sum32
                .chunks_exact(2)
                .map(|s| i32::from(s[0] as u16) | (s[1] << 16))
                .collect()
        } else {
            Vec::new()
        };
        let off16 = if block == 256 {
            sum16.iter().map(|&s| -32 * i32::from(s)).collect()
        } else {
            Vec::new()
        };
        Self {
            m,
            k,
            block,
            off16,
            q,
            d,
            sum16,
            xsum,
            sum32x2,
            sum32,
        }
    }

    /// Rows.
    pub fn m(&self) -> usize {
        self.m
    }

    /// Values per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Values per scale.
    pub fn block(&self) -> usize {
        self.block
    }

    /// The values the quantized activations stand for (`d·q`), `[m, k]` row-major: the
    /// exact input of the integer dot products, for tests.
    pub fn dequantize(&self) -> Vec<f32> {
        self.q
            .iter()
            .enumerate()
            .map(|(i, &v)| self.d[i / self.block] * f32::from(v))
            .collect()
    }

    /// Row `r`.
    pub(super) fn row(&self, r: usize) -> ActRow<'_> {
        let (k, b) = (self.k, self.block);
        ActRow {
            q: &self.q[r * k..(r + 1) * k],
            d: &self.d[r * k / b..(r + 1) * k / b],
            sum16: &self.sum16[r * k / 16..(r + 1) * k / 16],
            xsum: &self.xsum[r * k / 32..(r + 1) * k / 32],
            sum32x2: if self.sum32x2.is_empty() {
                &[]
            } else {
                &self.sum32x2[r * k / 64..(r + 1) * k / 64]
            },
            sum32: &self.sum32[r * k / 32..(r + 1) * k / 32],
            off16: if self.off16.is_empty() {
                &[]
            } else {
                &self.off16[r * k / 16..(r + 1) * k / 16]
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        let x: Vec<f32> = (0..2 * 512)
            .map(|i| ((i * 37) % 101) as f32 - 50.3)
            .collect();
        for block in [32, 256] {
            let a = Q8Acts::quantize(&x, 2, 512, block);
            let y = a.dequantize();
            for (i, (&v, &w)) in x.iter().zip(&y).enumerate() {
                let step = a.d[i / block];
                assert!((v - w).abs() <= 0.5 * step + 1e-6, "{v} vs {w}");
            }
            let r = a.row(1);
            let s: i32 = r.q[..32].iter().map(|&v| i32::from(v)).sum();
            assert_eq!(i32::from(r.sum16[0] + r.sum16[1]), s);
            assert!((r.xsum[0] - r.d[0] * s as f32).abs() < 1e-3);
        }
    }

    #[test]
    fn values_round_to_nearest_ties_to_even_on_every_path() {
        // Halves (ties) and values beside them, at both signs, and a block's extreme.
        let x: Vec<f32> = (0..4 * 256)
            .map(|i| match i % 256 {
                0 => 127.0,
                j => (j as f32 - 128.0) / 2.0 + if i % 3 == 0 { 0.0 } else { 0.01 },
            })
            .collect();
        let want: Vec<i8> = x.iter().map(|&v| v.round_ties_even() as i8).collect();
        let a = Q8Acts::quantize(&x, 4, 256, 256);
        assert_eq!(a.q, want, "scale 1: every value its own rounding");
        // The portable body gives the same bytes as the dispatched (AVX2) one.
        let mut q = vec![0i8; 256];
        let (mut d, mut s16) = (0.0f32, vec![0i16; 16]);
        quantize_block((((&x[..256], &mut q[..]), &mut d), &mut s16[..]));
        assert_eq!(q, a.q[..256]);
        assert_eq!((d.to_bits(), &s16[..]), (a.d[0].to_bits(), &a.sum16[..16]));
        // Many rows (split over threads) quantize as each row alone.
        let big: Vec<f32> = (0..64 * 1024)
            .map(|i| ((i * 7919) % 2001) as f32 / 7.0 - 140.0)
            .collect();
        let all = Q8Acts::quantize(&big, 64, 1024, 32);
        let one = Q8Acts::quantize(&big[5 * 1024..6 * 1024], 1, 1024, 32);
        assert_eq!(all.row(5).q, one.row(0).q);
    }

    /// Every block body this CPU runs, on one block: `(q, d bits, Σ per 16)` each.
    fn every_body(x: &[f32]) -> Vec<(&'static str, Vec<i8>, u32, Vec<i16>)> {
        let run = |f: &dyn Fn(BlockJob<'_>)| {
            let mut q = vec![0i8; x.len()];
            let (mut d, mut s16) = (0.0f32, vec![0i16; x.len() / 16]);
            f((((x, &mut q[..]), &mut d), &mut s16[..]));
            (q, d.to_bits(), s16)
        };
        let mut out = Vec::new();
        let (q, d, s) = run(&|j| quantize_block(j));
        out.push(("portable", q, d, s));
        #[cfg(target_arch = "x86_64")]
        {
            if avx2() {
                // SAFETY: checked just above.
                let (q, d, s) = run(&|j| unsafe { quantize_block_avx2(j) });
                out.push(("avx2", q, d, s));
            }
            if avx512() {
                // SAFETY: checked just above; 256 values.
                let (q, d, s) = run(&|j| unsafe { quantize_block_avx512(j) });
                out.push(("avx512", q, d, s));
            }
        }
        out
    }

    #[test]
    fn every_block_body_gives_the_same_bytes_even_for_odd_values() {
        // Ordinary values and the odd ones: NaNs (passed over by the maximum), ±0, subnormals,
        // an infinity (scale ∞, every value's unit 0), a block of zeros and one of NaNs.
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 40) as f32 / (1u64 << 24) as f32 * 8.0 - 4.0
        };
        let plain: Vec<f32> = (0..256).map(|_| next()).collect();
        let mut odd = plain.clone();
        for (i, v) in [
            f32::NAN,
            -0.0,
            0.0,
            1e-40,
            -1e-42,
            f32::MIN_POSITIVE,
            -f32::NAN,
        ]
        .into_iter()
        .enumerate()
        {
            odd[37 * i + 3] = v;
        }
        let mut inf = plain.clone();
        inf[100] = f32::NEG_INFINITY;
        for x in [plain, odd, inf, vec![0.0; 256], vec![f32::NAN; 256]] {
            let bodies = every_body(&x);
            let (_, q, d, s) = &bodies[0];
            for (name, q2, d2, s2) in &bodies[1..] {
                assert_eq!((q, d, s), (q2, d2, s2), "{name} against the portable body");
            }
        }
    }

    #[test]
    fn zero_rows_quantize_to_zero() {
        let a = Q8Acts::quantize(&[0.0; 64], 1, 64, 32);
        assert!(a.dequantize().iter().all(|&v| v == 0.0));
    }
}
