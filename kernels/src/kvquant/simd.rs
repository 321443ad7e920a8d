//! AVX2 + F16C unpacking of KV codes, eight values at a time: codes widened to i32 lanes, then
//! `q·s + m` as a multiply and an add (no FMA: the portable loops' rounding, so the same bits).

use std::arch::x86_64::*;

use super::StepFormat;

/// Whether this CPU runs these routines.
pub(super) fn available() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c")
}

/// Codes `i..i + 8` of a packed row of `bits`-bit codes, as i32 lanes.
///
/// # Safety
/// AVX2; `i` a multiple of 8 with `(i + 8) · bits / 8` bytes readable at `row`.
#[inline(always)]
unsafe fn codes8(bits: u32, row: *const u8, i: usize) -> __m256i {
    // SAFETY: forwarded from the caller.
    unsafe {
        let at = row.add(i * bits as usize / 8);
        match bits {
            8 => _mm256_cvtepu8_epi32(_mm_loadl_epi64(at.cast())),
            4 => {
                let w = at.cast::<u32>().read_unaligned();
                let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
                _mm256_and_si256(
                    _mm256_srlv_epi32(_mm256_set1_epi32(w as i32), shifts),
                    _mm256_set1_epi32(0xF),
                )
            }
            _ => {
                let w = at.cast::<u16>().read_unaligned();
                let shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
                _mm256_and_si256(
                    _mm256_srlv_epi32(_mm256_set1_epi32(i32::from(w)), shifts),
                    _mm256_set1_epi32(3),
                )
            }
        }
    }
}

/// Per-channel grids: channel `from + j` of `row` → `out[j]`, with steps stored as `steps`
/// and f16 minimums per channel (an F8 step widens to its f16 with a shift, then converts like
/// an f16 one: the portable loop's values exactly).
///
/// # Safety
/// AVX2 and F16C; `from` and `out.len()` multiples of 8 within the row's channels; `scales`
/// holds `steps.bytes()` bytes per channel and `mins` two.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn per_channel(
    bits: u32,
    steps: StepFormat,
    scales: &[u8],
    mins: &[u8],
    row: &[u8],
    from: usize,
    out: &mut [f32],
) {
    for (k, dst) in out.chunks_exact_mut(8).enumerate() {
        let i = from + 8 * k;
        // SAFETY: channels `i..i + 8` are inside the row (caller).
        unsafe {
            let halves = match steps {
                StepFormat::F16 => _mm_loadu_si128(scales.as_ptr().add(2 * i).cast()),
                StepFormat::F8 => _mm_slli_epi16::<7>(_mm_cvtepu8_epi16(_mm_loadl_epi64(
                    scales.as_ptr().add(i).cast(),
                ))),
            };
            let s = _mm256_cvtph_ps(halves);
            let m = _mm256_cvtph_ps(_mm_loadu_si128(mins.as_ptr().add(2 * i).cast()));
            let q = _mm256_cvtepi32_ps(codes8(bits, row.as_ptr(), i));
            _mm256_storeu_ps(dst.as_mut_ptr(), _mm256_add_ps(_mm256_mul_ps(q, s), m));
        }
    }
}

/// One grid for a whole group: code `j` of `codes` → `out[j]` as `q·s + m`.
///
/// # Safety
/// AVX2; `out.len()` a multiple of 8 with `out.len() · bits / 8` bytes of `codes`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn uniform(bits: u32, codes: &[u8], s: f32, m: f32, out: &mut [f32]) {
    let (s, m) = (_mm256_set1_ps(s), _mm256_set1_ps(m));
    for (k, dst) in out.chunks_exact_mut(8).enumerate() {
        // SAFETY: codes `8k..8k + 8` are inside `codes` (caller).
        unsafe {
            let q = _mm256_cvtepi32_ps(codes8(bits, codes.as_ptr(), 8 * k));
            _mm256_storeu_ps(dst.as_mut_ptr(), _mm256_add_ps(_mm256_mul_ps(q, s), m));
        }
    }
}

/// One segment's refined channels of one token (see `ChannelQuantizer::with_refinement`).
pub(super) struct Refined<'a> {
    /// Bits per residual code.
    pub bits: u32,
    /// How `scales` stores the steps.
    pub steps: StepFormat,
    /// The packed block (its steps first).
    pub packed: &'a [u8],
    /// The segment's refined channels (within the segment, ascending; a multiple of 8).
    pub index: &'a [u8],
    /// The token's residual codes (all segments').
    pub res: &'a [u8],
    /// The number of the segment's first refined channel in the block (a multiple of 8).
    pub first: usize,
    /// The segment's first channel.
    pub base: usize,
}

/// Adds a segment's residuals to the channels among `from .. from + out.len()`, eight
/// refined channels at a time: the same `(code − levels/2) · (step / levels)` and the same
/// scalar adds as the portable loop, so the same bits.
///
/// # Safety
/// AVX2 and F16C; `index.len()` and `first` multiples of 8, `first + index.len()` codes in
/// `res`, every `base + index[k]` a channel of `packed`'s block (its steps are followed by at
/// least four more bytes: the minimums).
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn refine(r: &Refined<'_>, from: usize, out: &mut [f32]) {
    let levels = ((1u32 << r.bits) - 1) as f32;
    let end = from + out.len();
    let (lv, half) = (_mm256_set1_ps(levels), _mm256_set1_ps(levels / 2.0));
    let base = _mm256_set1_epi32(r.base as i32);
    for (j, idx) in r.index.chunks_exact(8).enumerate() {
        // SAFETY: eight indices at `idx`; the gathers read inside the steps and the minimums
        // after them; codes `first + 8j ..` are inside `res` (caller).
        unsafe {
            let ch = _mm256_add_epi32(
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(idx.as_ptr().cast())),
                base,
            );
            let p = r.packed.as_ptr().cast::<i32>();
            let bits16 = match r.steps {
                StepFormat::F16 => _mm256_and_si256(
                    _mm256_i32gather_epi32::<1>(p, _mm256_slli_epi32::<1>(ch)),
                    _mm256_set1_epi32(0xffff),
                ),
                StepFormat::F8 => _mm256_slli_epi32::<7>(_mm256_and_si256(
                    _mm256_i32gather_epi32::<1>(p, ch),
                    _mm256_set1_epi32(0xff),
                )),
            };
            // Eight 16-bit halves in the low 128 bits, in order, for the conversion.
            let packed16 = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(bits16, bits16));
            let step = _mm256_cvtph_ps(_mm256_castsi256_si128(packed16));
            let codes = _mm256_cvtepi32_ps(codes8(r.bits, r.res.as_ptr(), r.first + 8 * j));
            let v = _mm256_mul_ps(_mm256_sub_ps(codes, half), _mm256_div_ps(step, lv));
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), v);
            for (&i, &x) in idx.iter().zip(&lanes) {
                let c = r.base + usize::from(i);
                if (from..end).contains(&c) {
                    out[c - from] += x;
                }
            }
        }
    }
}
