//! Q4_K with 8 output rows interleaved (the layout llama.cpp's CPU "repack" buffers use for
//! the same reason): one activation load meets 8 weight rows, every scale and minimum of the
//! 8 rows is applied with one vector instruction, and each row's sum lives in its own lane —
//! no per-row scale unpacking, no horizontal sums. Decoding a GGUF Q4_K row costs ~75 vector
//! instructions per 256 weights; this layout ~25, which turns a single-row product from
//! compute-bound into memory-bound on a 2-core machine.
//!
//! One interleaved block holds super-block `bi` of 8 rows ([`BLOCK`] bytes):
//!
//! | bytes | content |
//! |---|---|
//! | 0..16 | `d` of rows 0..8 (f16) |
//! | 16..32 | `dmin` of rows 0..8 (f16) |
//! | 32..96 | scale of sub-block `j`, row `r` at `32 + 8j + r` (6-bit, one byte) |
//! | 96..160 | minimums of sub-blocks `2c`, `2c+1`, row `r` at `96 + 16c + 2r` (one byte each) |
//! | 160..1184 | weights: for chunk `c` (64 weights) and group `g` (4 bytes), 32 bytes `[r][t]` = GGUF byte `16 + 32c + 4g + t` of row `r` (low nibble: weight `64c + 4g + t`, high: `64c + 32 + 4g + t`) |
//!
//! Packing is lossless ([`unpack_row`] gives back the GGUF bytes exactly), 2.8% larger than
//! the GGUF rows (the 6-bit scales are stored in bytes).

use super::acts::ActRow;

/// Bytes of one interleaved super-block of 8 rows.
pub(super) const BLOCK: usize = 1184;
/// Bytes of one GGUF Q4_K super-block.
const GGUF: usize = 144;
/// Where the weights start in an interleaved block.
const QS: usize = 160;

/// Eight rows of GGUF Q4_K super-blocks (`rows[r]` holds row `r`'s `nb` blocks) → `nb`
/// interleaved blocks, appended to `out`.
pub(super) fn pack_group(rows: [&[u8]; 8], out: &mut Vec<u8>) {
    let nb = rows[0].len() / GGUF;
    for bi in 0..nb {
        let at = out.len();
        out.resize(at + BLOCK, 0);
        let dst = &mut out[at..];
        for (r, row) in rows.iter().enumerate() {
            let b = &row[bi * GGUF..(bi + 1) * GGUF];
            dst[2 * r..2 * r + 2].copy_from_slice(&b[0..2]);
            dst[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&b[2..4]);
            let (sc, mn) = crate::quant::scales_mins_k4(&b[4..16]);
            for j in 0..8 {
                dst[32 + 8 * j + r] = sc[j];
            }
            for c in 0..4 {
                dst[96 + 16 * c + 2 * r] = mn[2 * c];
                dst[96 + 16 * c + 2 * r + 1] = mn[2 * c + 1];
            }
            for c in 0..4 {
                for g in 0..8 {
                    let to = QS + ((c * 8 + g) * 8 + r) * 4;
                    let from = 16 + 32 * c + 4 * g;
                    dst[to..to + 4].copy_from_slice(&b[from..from + 4]);
                }
            }
        }
    }
}

/// Row `r` (0..8) of a group's interleaved blocks, as GGUF Q4_K bytes appended to `out`.
pub(super) fn unpack_row(group: &[u8], r: usize, out: &mut Vec<u8>) {
    for blk in group.chunks_exact(BLOCK) {
        let at = out.len();
        out.resize(at + GGUF, 0);
        let b = &mut out[at..];
        b[0..2].copy_from_slice(&blk[2 * r..2 * r + 2]);
        b[2..4].copy_from_slice(&blk[16 + 2 * r..16 + 2 * r + 2]);
        let sc: [u8; 8] = std::array::from_fn(|j| blk[32 + 8 * j + r]);
        let mn: [u8; 8] = std::array::from_fn(|j| blk[96 + 16 * (j / 2) + 2 * r + j % 2]);
        b[4..16].copy_from_slice(&crate::quant::pack_scales_mins_k4(&sc, &mn));
        for c in 0..4 {
            for g in 0..8 {
                let from = QS + ((c * 8 + g) * 8 + r) * 4;
                let to = 16 + 32 * c + 4 * g;
                b[to..to + 4].copy_from_slice(&blk[from..from + 4]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{dot8, dot8_vnni};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{ActRow, BLOCK, QS};

    /// The 8 rows of one interleaved group (`g`: its blocks) times activation rows `x`:
    /// `out[r][l]` = row `l` of the group · `x[r]`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `g` holds whole blocks covering the rows'
    /// length.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in super::super) unsafe fn dot8<const R: usize>(
        g: &[u8],
        x: &[ActRow<'_>; R],
    ) -> [[f32; 8]; R] {
        // SAFETY: forwarded from the caller.
        unsafe { kernel::<R, false>(g, x) }
    }

    /// [`dot8`] with AVX-512 VNNI (`vpdpbusd`).
    ///
    /// # Safety
    /// As [`dot8`], and the CPU must support AVX512-VNNI and AVX512VL.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub(in super::super) unsafe fn dot8_vnni<const R: usize>(
        g: &[u8],
        x: &[ActRow<'_>; R],
    ) -> [[f32; 8]; R] {
        // SAFETY: forwarded from the caller.
        unsafe { kernel::<R, true>(g, x) }
    }

    /// `acc + Σ` over each 4 bytes of `u·s` (unsigned × signed) per i32 lane: one `vpdpbusd`
    /// with VNNI, else `vpmaddubsw` + `vpmaddwd` by ones (exact while `u ≤ 15`: pairs of
    /// `u·s` stay inside i16).
    #[inline(always)]
    unsafe fn dot4<const V: bool>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: the caller's build enables AVX2 (and AVX512-VNNI/VL when `V`).
        unsafe {
            if V {
                _mm256_dpbusd_epi32(acc, u, s)
            } else {
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
                _mm256_add_epi32(acc, p)
            }
        }
    }

    /// # Safety
    /// As [`dot8`] (and [`dot8_vnni`] when `V`).
    #[inline(always)]
    unsafe fn kernel<const R: usize, const V: bool>(
        g: &[u8],
        x: &[ActRow<'_>; R],
    ) -> [[f32; 8]; R] {
        // SAFETY: forwarded from the callers; every pointer below stays inside one block of
        // `g` or inside the rows' `k` values (256 per block).
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); R];
            for (bi, blk) in g.chunks_exact(BLOCK).enumerate() {
                let p = blk.as_ptr();
                let d = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
                let dmin = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast()));
                let mut isum = [_mm256_setzero_si256(); R];
                let mut imin = [_mm256_setzero_si256(); R];
                for c in 0..4 {
                    let mut alo = [_mm256_setzero_si256(); R];
                    let mut ahi = [_mm256_setzero_si256(); R];
                    for gi in 0..8 {
                        let q = _mm256_loadu_si256(p.add(QS + (c * 8 + gi) * 32).cast());
                        let lo = _mm256_and_si256(q, low);
                        // VNNI takes the high nibbles in place (16× their value, exact in
                        // i32, divided out below); `vpmaddubsw` needs them shifted down.
                        let hi = if V {
                            _mm256_andnot_si256(low, q)
                        } else {
                            _mm256_and_si256(_mm256_srli_epi16::<4>(q), low)
                        };
                        for r in 0..R {
                            let xp = x[r].q.as_ptr().add(bi * 256 + 64 * c + 4 * gi);
                            let xl = _mm256_set1_epi32(xp.cast::<i32>().read_unaligned());
                            let xh = _mm256_set1_epi32(xp.add(32).cast::<i32>().read_unaligned());
                            alo[r] = dot4::<V>(alo[r], lo, xl);
                            ahi[r] = dot4::<V>(ahi[r], hi, xh);
                        }
                    }
                    let s_lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(32 + 16 * c).cast()));
                    let s_hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(32 + 16 * c + 8).cast()));
                    let mins = _mm256_cvtepu8_epi16(_mm_loadu_si128(p.add(96 + 16 * c).cast()));
                    for r in 0..R {
                        let hi = if V {
                            _mm256_srai_epi32::<4>(ahi[r])
                        } else {
                            ahi[r]
                        };
                        let s = _mm256_add_epi32(
                            _mm256_mullo_epi32(alo[r], s_lo),
                            _mm256_mullo_epi32(hi, s_hi),
                        );
                        isum[r] = _mm256_add_epi32(isum[r], s);
                        // Σq of the activations over sub-blocks 2c and 2c+1, as an i16 pair.
                        let s16 = x[r].sum16.as_ptr().add(bi * 16 + 4 * c);
                        let pair = i32::from(*s16 + *s16.add(1)) & 0xFFFF
                            | i32::from(*s16.add(2) + *s16.add(3)) << 16;
                        imin[r] = _mm256_add_epi32(
                            imin[r],
                            _mm256_madd_epi16(mins, _mm256_set1_epi32(pair)),
                        );
                    }
                }
                for r in 0..R {
                    let dx = _mm256_set1_ps(*x[r].d.get_unchecked(bi));
                    let sum = _mm256_mul_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_mul_ps(d, dx));
                    let min = _mm256_mul_ps(_mm256_cvtepi32_ps(imin[r]), _mm256_mul_ps(dmin, dx));
                    acc[r] = _mm256_add_ps(acc[r], _mm256_sub_ps(sum, min));
                }
            }
            let mut out = [[0.0f32; 8]; R];
            for r in 0..R {
                _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
            }
            out
        }
    }
}
