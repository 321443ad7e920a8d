//! Q4_K, Q6_K, Q8_0, Q5_0 and Q4_1 with 8 output rows interleaved (the layout llama.cpp's CPU
//! "repack" buffers use for the same reason): one activation load meets 8 weight rows, every
//! scale and minimum of the 8 rows is applied with one vector instruction, and each row's sum
//! lives in its own lane — no per-row scale unpacking, no horizontal sums. Decoding a GGUF
//! Q4_K row costs ~75 vector instructions per 256 weights; this layout ~25, which turns a
//! single-row product from compute-bound into memory-bound on a 2-core machine.
//!
//! One interleaved Q4_K block holds super-block `bi` of 8 rows ([`BLOCK`] bytes):
//!
//! | bytes | content |
//! |---|---|
//! | 0..16 | `d` of rows 0..8 (f16) |
//! | 16..32 | `dmin` of rows 0..8 (f16) |
//! | 32..96 | scale of sub-block `j`, row `r` at `32 + 8j + r` (6-bit, one byte) |
//! | 96..160 | minimums of sub-blocks `2c`, `2c+1`, row `r` at `96 + 16c + 2r` (one byte each) |
//! | 160..1184 | weights: for chunk `c` (64 weights) and group `g` (4 bytes), 32 bytes `[r][t]` = GGUF byte `16 + 32c + 4g + t` of row `r` (low nibble: weight `64c + 4g + t`, high: `64c + 32 + 4g + t`) |
//!
//! One interleaved Q6_K block ([`BLOCK6`] bytes, exactly 8 GGUF blocks):
//!
//! | bytes | content |
//! |---|---|
//! | 0..16 | `d` of rows 0..8 (f16) |
//! | 16..144 | scale of sub-block `j` (16 weights), row `r` at `16 + 8j + r` (i8) |
//! | 144..1680 | for half `h` (128 weights) and group `g` (4 bytes), 96 bytes: `[r][t]` = GGUF `ql[64h + 4g + t]`, then `ql[64h + 32 + 4g + t]`, then `qh[32h + 4g + t]` of row `r` |
//!
//! One interleaved Q8_0 block ([`BLOCK8`] bytes, exactly 8 GGUF blocks of 32 weights): `d`
//! of rows 0..8 (f16, 16 bytes), then for group `g` (4 weights) 32 bytes `[r][t]` = weight
//! `4g + t` of row `r`. The kernel takes the signed weights as `w + 128` (unsigned, for
//! `vpdpbusd`) and subtracts `128·Σx` per block.
//!
//! One interleaved Q5_0 block ([`BLOCK5`] bytes, exactly 8 GGUF blocks): `d` of rows 0..8
//! (f16, 16 bytes); the fifth bits as 8 words — for group `g` and half `h`, bit `4r + t` of
//! word `2g + h` is the fifth bit of weight `16h + 4g + t` of row `r` — (32 bytes); then for
//! group `g` 32 bytes `[r][t]` = GGUF `qs[4g + t]` of row `r` (low nibble: weight `4g + t`,
//! high: `16 + 4g + t`). The storage offset 16 enters as `−16·Σx` per block.
//!
//! One interleaved Q4_1 block ([`BLOCK41`] bytes, exactly 8 GGUF blocks): `d` of rows 0..8
//! (f16), their minimums `m` (f16), then for group `g` 32 bytes `[r][t]` = GGUF `qs[4g + t]` of
//! row `r` (low nibble: weight `4g + t`, high: `16 + 4g + t`); `m·Σx` is added per block.
//!
//! Packing is lossless ([`unpack_row`] gives back the GGUF bytes exactly); Q4_K's is 2.8%
//! larger than its GGUF rows (the 6-bit scales are stored in bytes), Q6_K's the same size.

use super::acts::ActRow;

use crate::quant::GgmlType;

/// Bytes of one interleaved Q4_K super-block of 8 rows.
pub(super) const BLOCK: usize = 1184;
/// Bytes of one interleaved Q6_K super-block of 8 rows.
pub(super) const BLOCK6: usize = 1680;
/// Bytes of one GGUF Q6_K super-block.
const GGUF6: usize = 210;
/// Where the weights start in an interleaved Q6_K block.
pub(super) const QS6: usize = 144;

/// Bytes of one interleaved Q8_0 block of 8 rows.
pub(super) const BLOCK8: usize = 272;
/// Bytes of one GGUF Q8_0 block.
const GGUF8: usize = 34;

/// Bytes of one interleaved Q5_0 block of 8 rows.
pub(super) const BLOCK5: usize = 176;
/// Bytes of one GGUF Q5_0 block.
const GGUF5: usize = 22;

/// Bytes of one interleaved Q4_1 block of 8 rows.
pub(super) const BLOCK41: usize = 160;
/// Bytes of one GGUF Q4_1 block.
const GGUF41: usize = 20;

/// Whether matrices of `ty` are held interleaved.
pub(super) fn interleaves(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_K | GgmlType::Q6_K | GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q4_1
    )
}

/// Bytes of one interleaved group of 8 rows of `ty` per `block_size` weights (an
/// [`interleaves`] type).
pub(super) fn block_bytes(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q6_K => BLOCK6,
        GgmlType::Q8_0 => BLOCK8,
        GgmlType::Q5_0 => BLOCK5,
        GgmlType::Q4_1 => BLOCK41,
        _ => BLOCK,
    }
}

/// Eight rows of GGUF blocks of `ty` → interleaved blocks, appended to `out`.
pub(super) fn pack(ty: GgmlType, rows: [&[u8]; 8], out: &mut Vec<u8>) {
    match ty {
        GgmlType::Q6_K => pack_group6(rows, out),
        GgmlType::Q8_0 => pack_group32(&Q8_0_LAYOUT, rows, out),
        GgmlType::Q5_0 => pack_group32(&Q5_0_LAYOUT, rows, out),
        GgmlType::Q4_1 => pack_group32(&Q4_1_LAYOUT, rows, out),
        _ => pack_group(rows, out),
    }
}

/// Row `r` (0..8) of a group's interleaved blocks of `ty`, as GGUF bytes appended to `out`.
pub(super) fn unpack(ty: GgmlType, group: &[u8], r: usize, out: &mut Vec<u8>) {
    match ty {
        GgmlType::Q6_K => unpack_row6(group, r, out),
        GgmlType::Q8_0 => unpack_row32(&Q8_0_LAYOUT, group, r, out),
        GgmlType::Q5_0 => unpack_row32(&Q5_0_LAYOUT, group, r, out),
        GgmlType::Q4_1 => unpack_row32(&Q4_1_LAYOUT, group, r, out),
        _ => unpack_row(group, r, out),
    }
}

/// Where a 32-weight format's fields sit in its GGUF block and in the interleaved block of 8
/// rows: f16 fields (`(gguf, interleaved)` offsets; interleaved, rows' values side by side),
/// the 4-byte runs of weights (`runs` of them from `qs`; interleaved, run `g` of row `r` at
/// `qs.1 + 4·(8g + r)`), and Q5_0's fifth bits (regrouped as the module docs say).
struct Layout32 {
    gguf: usize,
    x8: usize,
    halves: &'static [(usize, usize)],
    qs: (usize, usize),
    runs: usize,
    qh: Option<(usize, usize)>,
}

const Q8_0_LAYOUT: Layout32 = Layout32 {
    gguf: GGUF8,
    x8: BLOCK8,
    halves: &[(0, 0)],
    qs: (2, 16),
    runs: 8,
    qh: None,
};
const Q5_0_LAYOUT: Layout32 = Layout32 {
    gguf: GGUF5,
    x8: BLOCK5,
    halves: &[(0, 0)],
    qs: (6, 48),
    runs: 4,
    qh: Some((2, 16)),
};
const Q4_1_LAYOUT: Layout32 = Layout32 {
    gguf: GGUF41,
    x8: BLOCK41,
    halves: &[(0, 0), (2, 16)],
    qs: (4, 32),
    runs: 4,
    qh: None,
};

/// Bit `16h + 4g + t` of a Q5_0 `qh` ↔ bit `4r + t` of interleaved word `2g + h` (row `r`).
fn fifth_bit_moves() -> impl Iterator<Item = (usize, usize, usize)> {
    (0..4).flat_map(|g| {
        (0..2).flat_map(move |h| (0..4).map(move |t| (2 * g + h, t, 16 * h + 4 * g + t)))
    })
}

/// As [`pack_group`] for the 32-weight formats.
fn pack_group32(f: &Layout32, rows: [&[u8]; 8], out: &mut Vec<u8>) {
    pack_blocks(rows, f.gguf, f.x8, out, |dst, r, b| {
        for &(from, to) in f.halves {
            dst[to + 2 * r..to + 2 * r + 2].copy_from_slice(&b[from..from + 2]);
        }
        for g in 0..f.runs {
            let (from, to) = (f.qs.0 + 4 * g, f.qs.1 + (g * 8 + r) * 4);
            dst[to..to + 4].copy_from_slice(&b[from..from + 4]);
        }
        if let Some((from, to)) = f.qh {
            let qh = u32::from_le_bytes(b[from..from + 4].try_into().expect("4 bytes"));
            // Word bit 4r + t of little-endian word `w` is bit (4r + t) % 8 of its byte
            // (4r + t) / 8.
            for (w, t, bit) in fifth_bit_moves() {
                let (byte, shift) = (to + 4 * w + (4 * r + t) / 8, (4 * r + t) % 8);
                dst[byte] |= (((qh >> bit) & 1) as u8) << shift;
            }
        }
    });
}

/// As [`unpack_row`] for the 32-weight formats.
fn unpack_row32(f: &Layout32, group: &[u8], r: usize, out: &mut Vec<u8>) {
    unpack_blocks(group, f.x8, f.gguf, out, |b, blk| {
        for &(to, from) in f.halves {
            b[to..to + 2].copy_from_slice(&blk[from + 2 * r..from + 2 * r + 2]);
        }
        for g in 0..f.runs {
            let (to, from) = (f.qs.0 + 4 * g, f.qs.1 + (g * 8 + r) * 4);
            b[to..to + 4].copy_from_slice(&blk[from..from + 4]);
        }
        if let Some((to, from)) = f.qh {
            let word = |i: usize| {
                u32::from_le_bytes(
                    blk[from + 4 * i..from + 4 * i + 4]
                        .try_into()
                        .expect("4 bytes"),
                )
            };
            let mut qh = 0u32;
            for (w, t, bit) in fifth_bit_moves() {
                qh |= ((word(w) >> (4 * r + t)) & 1) << bit;
            }
            b[to..to + 4].copy_from_slice(&qh.to_le_bytes());
        }
    });
}

/// The three 32-byte runs of Q6_K half `h`, group `g`: (interleaved offset, GGUF offset).
fn runs6(h: usize, g: usize) -> [(usize, usize); 3] {
    let at = QS6 + (h * 8 + g) * 96;
    [
        (at, 64 * h + 4 * g),
        (at + 32, 64 * h + 32 + 4 * g),
        (at + 64, 128 + 32 * h + 4 * g),
    ]
}

/// As [`pack_group`] for Q6_K.
fn pack_group6(rows: [&[u8]; 8], out: &mut Vec<u8>) {
    pack_blocks(rows, GGUF6, BLOCK6, out, |dst, r, b| {
        dst[2 * r..2 * r + 2].copy_from_slice(&b[208..210]);
        for j in 0..16 {
            dst[16 + 8 * j + r] = b[192 + j];
        }
        for (to, from) in (0..2).flat_map(|h| (0..8).flat_map(move |g| runs6(h, g))) {
            dst[to + 4 * r..to + 4 * r + 4].copy_from_slice(&b[from..from + 4]);
        }
    });
}

/// As [`unpack_row`] for Q6_K.
fn unpack_row6(group: &[u8], r: usize, out: &mut Vec<u8>) {
    unpack_blocks(group, BLOCK6, GGUF6, out, |b, blk| {
        b[208..210].copy_from_slice(&blk[2 * r..2 * r + 2]);
        for j in 0..16 {
            b[192 + j] = blk[16 + 8 * j + r];
        }
        for (from, to) in (0..2).flat_map(|h| (0..8).flat_map(move |g| runs6(h, g))) {
            b[to..to + 4].copy_from_slice(&blk[from + 4 * r..from + 4 * r + 4]);
        }
    });
}
/// Bytes of one GGUF Q4_K super-block.
const GGUF: usize = 144;
/// Where the weights start in an interleaved block.
pub(super) const QS: usize = 160;

/// Eight rows of GGUF Q4_K super-blocks (`rows[r]` holds row `r`'s `nb` blocks) → `nb`
/// interleaved blocks, appended to `out`.
fn pack_group(rows: [&[u8]; 8], out: &mut Vec<u8>) {
    pack_blocks(rows, GGUF, BLOCK, out, |dst, r, b| {
        dst[2 * r..2 * r + 2].copy_from_slice(&b[0..2]);
        dst[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&b[2..4]);
        let (sc, mn) = crate::quant::scales_mins_k4(&b[4..16]);
        for j in 0..8 {
            dst[32 + 8 * j + r] = sc[j];
            dst[96 + 16 * (j / 2) + 2 * r + j % 2] = mn[j];
        }
        for (to, from) in runs4(r) {
            dst[to..to + 4].copy_from_slice(&b[from..from + 4]);
        }
    });
}

/// Q4_K's 4-byte weight runs of row `r`: (interleaved offset, GGUF offset).
fn runs4(r: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..4).flat_map(move |c| {
        (0..8).map(move |g| (QS + ((c * 8 + g) * 8 + r) * 4, 16 + 32 * c + 4 * g))
    })
}

/// Appends one interleaved block of `x8` bytes per GGUF block of `gguf` bytes in the rows,
/// `fill(dst, r, b)` writing row `r`'s block `b` into it.
fn pack_blocks(
    rows: [&[u8]; 8],
    gguf: usize,
    x8: usize,
    out: &mut Vec<u8>,
    mut fill: impl FnMut(&mut [u8], usize, &[u8]),
) {
    for bi in 0..rows[0].len() / gguf {
        let at = out.len();
        out.resize(at + x8, 0);
        for (r, row) in rows.iter().enumerate() {
            fill(&mut out[at..], r, &row[bi * gguf..(bi + 1) * gguf]);
        }
    }
}

/// Appends one GGUF block of `gguf` bytes per interleaved block of `x8` bytes in `group`,
/// `fill(b, blk)` writing it from the interleaved block `blk`.
fn unpack_blocks(
    group: &[u8],
    x8: usize,
    gguf: usize,
    out: &mut Vec<u8>,
    mut fill: impl FnMut(&mut [u8], &[u8]),
) {
    for blk in group.chunks_exact(x8) {
        let at = out.len();
        out.resize(at + gguf, 0);
        fill(&mut out[at..], blk);
    }
}

/// Row `r` (0..8) of a group's interleaved blocks, as GGUF Q4_K bytes appended to `out`.
fn unpack_row(group: &[u8], r: usize, out: &mut Vec<u8>) {
    unpack_blocks(group, BLOCK, GGUF, out, |b, blk| {
        b[0..2].copy_from_slice(&blk[2 * r..2 * r + 2]);
        b[2..4].copy_from_slice(&blk[16 + 2 * r..16 + 2 * r + 2]);
        let sc: [u8; 8] = std::array::from_fn(|j| blk[32 + 8 * j + r]);
        let mn: [u8; 8] = std::array::from_fn(|j| blk[96 + 16 * (j / 2) + 2 * r + j % 2]);
        b[4..16].copy_from_slice(&crate::quant::pack_scales_mins_k4(&sc, &mn));
        for (from, to) in runs4(r) {
            b[to..to + 4].copy_from_slice(&blk[from..from + 4]);
        }
    });
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{F_Q4_1, F_Q5_0, F_Q8_0, ask_step, dot8, dot8_vnni};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::avx2::fifth_bits;
    use super::super::tuning::prefetch_every_row;
    use super::{ActRow, BLOCK, BLOCK5, BLOCK6, BLOCK8, BLOCK41, GgmlType, QS, QS6};

    /// The 8 rows of one interleaved group of `ty` (`g`: its blocks) times activation rows
    /// `x`: `out[r][l]` = row `l` of the group · `x[r]`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `g` holds whole blocks covering the rows'
    /// length.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in super::super) unsafe fn dot8<const R: usize>(
        ty: GgmlType,
        g: &[u8],
        x: &[ActRow<'_>; R],
        init: &[[f32; 8]; R],
    ) -> [[f32; 8]; R] {
        // SAFETY: forwarded from the caller.
        unsafe { dispatch::<R, false>(ty, g, x, init) }
    }

    /// [`dot8`] with AVX-512 VNNI (`vpdpbusd`).
    ///
    /// # Safety
    /// As [`dot8`], and the CPU must support AVX512-VNNI, AVX512BW and AVX512VL.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
    pub(in super::super) unsafe fn dot8_vnni<const R: usize>(
        ty: GgmlType,
        g: &[u8],
        x: &[ActRow<'_>; R],
        init: &[[f32; 8]; R],
    ) -> [[f32; 8]; R] {
        // SAFETY: forwarded from the caller.
        unsafe { dispatch::<R, true>(ty, g, x, init) }
    }

    /// The kernel for `ty`, inlined into the build that calls it.
    ///
    /// # Safety
    /// As [`dot8`] (and [`dot8_vnni`] when `V`).
    #[inline(always)]
    unsafe fn dispatch<const R: usize, const V: bool>(
        ty: GgmlType,
        g: &[u8],
        x: &[ActRow<'_>; R],
        init: &[[f32; 8]; R],
    ) -> [[f32; 8]; R] {
        // SAFETY: forwarded from the callers.
        unsafe {
            match ty {
                GgmlType::Q6_K => kernel6::<R, V>(g, x, init),
                GgmlType::Q8_0 => kernel32::<F_Q8_0, R, V>(g, x, init),
                GgmlType::Q5_0 => kernel32::<F_Q5_0, R, V>(g, x, init),
                GgmlType::Q4_1 => kernel32::<F_Q4_1, R, V>(g, x, init),
                _ => kernel::<R, V>(g, x, init),
            }
        }
    }

    /// The 32-weight formats as [`kernel32`]'s const parameter.
    pub(in super::super) const F_Q8_0: u8 = 0;
    pub(in super::super) const F_Q5_0: u8 = 1;
    pub(in super::super) const F_Q4_1: u8 = 2;

    /// Q8_0, Q5_0 and Q4_1 (one scale per 32 weights). Q8_0: VNNI takes the signed weights
    /// as `w + 128` and subtracts `128·Σx` per block (exact in i32); AVX2's `vpmaddubsw`
    /// would saturate on that, so it multiplies `|w|` by `x` with `w`'s sign instead. Q5_0:
    /// nibbles and fifth bits assembled into 5-bit weights (0..32) per 32 bytes, the offset 16
    /// entering as `−16·Σx` per block. Q4_1: nibbles, and `m · dx·Σq` added per block.
    ///
    /// # Safety
    /// As [`dot8`] (and [`dot8_vnni`] when `V`).
    #[inline(always)]
    unsafe fn kernel32<const F: u8, const R: usize, const V: bool>(
        g: &[u8],
        x: &[ActRow<'_>; R],
        init: &[[f32; 8]; R],
    ) -> [[f32; 8]; R] {
        // SAFETY: forwarded from the callers; every pointer below stays inside one block of
        // `g` or inside the rows' `k` values (32 per block).
        unsafe {
            let (flip, low) = (_mm256_set1_epi8(-128), _mm256_set1_epi8(0x0F));
            let block = match F {
                F_Q8_0 => BLOCK8,
                F_Q5_0 => BLOCK5,
                _ => BLOCK41,
            };
            let mut acc = starts(init);
            let split = if R <= 2 { 2 } else { 1 };
            let spread = prefetch_every_row();
            for (bi, blk) in g.chunks_exact(block).enumerate() {
                let p = blk.as_ptr();
                let d = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
                let mut isum = [[_mm256_setzero_si256(); 2]; R];
                for i in 0..8 {
                    if spread {
                        ask_step(p, block, i, 8);
                    }
                    // 8 rows × 4 weights, and where their activations start in the block.
                    let (w, at) = if F == F_Q8_0 {
                        (_mm256_loadu_si256(p.add(16 + 32 * i).cast()), 4 * i)
                    } else {
                        let (gi, h) = (i / 2, i % 2);
                        let qs = if F == F_Q5_0 { 48 } else { 32 };
                        let q = _mm256_loadu_si256(p.add(qs + 32 * gi).cast());
                        let nib = if h == 0 { q } else { _mm256_srli_epi16::<4>(q) };
                        let w = _mm256_and_si256(nib, low);
                        let w = if F == F_Q5_0 && V {
                            // Bit e of the group's fifth-bit word ↔ byte e: 16 added under a
                            // byte mask (one instruction against the AVX2 build's five).
                            let bits = p.add(16 + 8 * gi + 4 * h).cast::<u32>().read_unaligned();
                            _mm256_mask_add_epi8(w, bits, w, _mm256_set1_epi8(16))
                        } else if F == F_Q5_0 {
                            _mm256_or_si256(w, fifth_bits(p.add(16 + 8 * gi + 4 * h)))
                        } else {
                            w
                        };
                        (w, 16 * h + 4 * gi)
                    };
                    let e = i % split;
                    for r in 0..R {
                        let xp = x[r].q.as_ptr().add(bi * 32 + at);
                        let xv = _mm256_set1_epi32(xp.cast::<i32>().read_unaligned());
                        isum[r][e] = match (F == F_Q8_0, V) {
                            (true, true) => {
                                _mm256_dpbusd_epi32(isum[r][e], _mm256_xor_si256(w, flip), xv)
                            }
                            (true, false) => {
                                let p = _mm256_maddubs_epi16(
                                    _mm256_sign_epi8(w, w),
                                    _mm256_sign_epi8(xv, w),
                                );
                                _mm256_add_epi32(
                                    isum[r][e],
                                    _mm256_madd_epi16(p, _mm256_set1_epi16(1)),
                                )
                            }
                            (false, _) => dot4::<V>(isum[r][e], w, xv),
                        };
                    }
                }
                for r in 0..R {
                    let mut s = _mm256_add_epi32(isum[r][0], isum[r][1]);
                    let sx = _mm256_set1_epi32(*x[r].sum32.get_unchecked(bi));
                    if F == F_Q5_0 {
                        s = _mm256_sub_epi32(s, _mm256_slli_epi32::<4>(sx));
                    } else if F == F_Q8_0 && V {
                        s = _mm256_sub_epi32(s, _mm256_slli_epi32::<7>(sx));
                    }
                    acc[r] = scaled_add(acc[r], s, d, *x[r].d.get_unchecked(bi));
                    if F == F_Q4_1 {
                        let m = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast()));
                        let xs = _mm256_set1_ps(*x[r].xsum.get_unchecked(bi));
                        acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(m, xs));
                    }
                }
            }
            lanes(acc)
        }
    }

    /// Q6_K: each 32-byte run of low nibbles and of 2-bit high parts is assembled into the
    /// 6-bit weights (0..64) of 8 rows × 4 positions; the storage offset 32 enters as
    /// `−32·Σx` per 16 activations, the starting value of each sub-block's sum.
    ///
    /// # Safety
    /// As [`dot8`] (and [`dot8_vnni`] when `V`).
    #[inline(always)]
    unsafe fn kernel6<const R: usize, const V: bool>(
        g: &[u8],
        x: &[ActRow<'_>; R],
        init: &[[f32; 8]; R],
    ) -> [[f32; 8]; R] {
        // SAFETY: forwarded from the callers; every pointer below stays inside one block of
        // `g` or inside the rows' `k` values (256 per block).
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            let mut acc = starts(init);
            let spread = prefetch_every_row();
            let burst = R == 8 && !spread;
            for (bi, blk) in g.chunks_exact(BLOCK6).enumerate() {
                let p = blk.as_ptr();
                if burst {
                    prefetch_ahead(p, AHEAD, BLOCK6);
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
                // −32·Σx over each 16 activations of this block, per row (computed once with
                // the activations, not per block and group).
                let off: [&[i32]; R] = std::array::from_fn(|r| x[r].off16.get_unchecked(bi * 16..));
                let mut isum = [_mm256_setzero_si256(); R];
                if R > 4 {
                    // Five to eight rows: two sub-block positions at a time (2R accumulators, 4
                    // deep each) instead of all four (4R would not fit the registers), each pair
                    // with its positions known at compile time (a runtime position had cost
                    // branches and address arithmetic inside the loop).
                    for h in 0..2 {
                        for half in 0..2 {
                            // Steps 0..32 of the block, 4 per call (spread requests).
                            let ask = spread.then_some((h * 2 + half) * 8);
                            q6_pair::<R, V, 0>(p, x, bi, (h, half), &off, &mut isum, ask);
                            let ask = ask.map(|s| s + 4);
                            q6_pair::<R, V, 1>(p, x, bi, (h, half), &off, &mut isum, ask);
                        }
                    }
                } else {
                    for h in 0..2 {
                        for half in 0..2 {
                            // Sub-blocks 8h + 2s + half for s = 0..4 (weights 128h + 32s + …).
                            let mut a: [[__m256i; 4]; R] = std::array::from_fn(|r| {
                                std::array::from_fn(|s| {
                                    _mm256_set1_epi32(*off[r].get_unchecked(8 * h + 2 * s + half))
                                })
                            });
                            for gq in 4 * half..4 * half + 4 {
                                if spread {
                                    ask_step(p, BLOCK6, (h * 2 + half) * 4 + gq - 4 * half, 16);
                                }
                                let at = p.add(QS6 + (h * 8 + gq) * 96);
                                let qa = _mm256_loadu_si256(at.cast());
                                let qb = _mm256_loadu_si256(at.add(32).cast());
                                let qh = _mm256_loadu_si256(at.add(64).cast());
                                let w = [
                                    weights6::<0>(qa, qb, qh, low),
                                    weights6::<1>(qa, qb, qh, low),
                                    weights6::<2>(qa, qb, qh, low),
                                    weights6::<3>(qa, qb, qh, low),
                                ];
                                for r in 0..R {
                                    let xp = x[r].q.as_ptr().add(bi * 256 + 128 * h + 4 * gq);
                                    for s in 0..4 {
                                        let xv = _mm256_set1_epi32(
                                            xp.add(32 * s).cast::<i32>().read_unaligned(),
                                        );
                                        a[r][s] = dot4::<V>(a[r][s], w[s], xv);
                                    }
                                }
                            }
                            for s in 0..4 {
                                let j = 8 * h + 2 * s + half;
                                let sc =
                                    _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(16 + 8 * j).cast()));
                                for (sum, a) in isum.iter_mut().zip(&a) {
                                    *sum = _mm256_add_epi32(*sum, _mm256_mullo_epi32(a[s], sc));
                                }
                            }
                        }
                    }
                }
                for r in 0..R {
                    acc[r] = scaled_add(acc[r], isum[r], d, *x[r].d.get_unchecked(bi));
                }
            }
            lanes(acc)
        }
    }

    /// Sub-blocks `8h + 4·SP + half` and `8h + 4·SP + half + 2` of one Q6_K block (weights
    /// `128h + 64·SP + …` and `+ 32`) for `R` rows, scaled and added into `isum`.
    ///
    /// `ask`: this call's first step of the block's 32, where the weights are asked for
    /// ahead ([`ask_step`]).
    ///
    /// # Safety
    /// As [`kernel6`]: `p` is a whole interleaved block, block `bi` of every row of `x`.
    #[inline(always)]
    unsafe fn q6_pair<const R: usize, const V: bool, const SP: usize>(
        p: *const u8,
        x: &[ActRow<'_>; R],
        bi: usize,
        (h, half): (usize, usize),
        off: &[&[i32]; R],
        isum: &mut [__m256i; R],
        ask: Option<usize>,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            let j0 = 8 * h + 4 * SP + half;
            let j1 = j0 + 2;
            let mut a0: [__m256i; R] =
                std::array::from_fn(|r| _mm256_set1_epi32(*off[r].get_unchecked(j0)));
            let mut a1: [__m256i; R] =
                std::array::from_fn(|r| _mm256_set1_epi32(*off[r].get_unchecked(j1)));
            for gq in 4 * half..4 * half + 4 {
                if let Some(step) = ask {
                    ask_step(p, BLOCK6, step + gq - 4 * half, 32);
                }
                let at = p.add(QS6 + (h * 8 + gq) * 96);
                let qa = _mm256_loadu_si256(at.cast());
                let qb = _mm256_loadu_si256(at.add(32).cast());
                let qh = _mm256_loadu_si256(at.add(64).cast());
                let (w0, w1) = if SP == 0 {
                    (
                        weights6::<0>(qa, qb, qh, low),
                        weights6::<1>(qa, qb, qh, low),
                    )
                } else {
                    (
                        weights6::<2>(qa, qb, qh, low),
                        weights6::<3>(qa, qb, qh, low),
                    )
                };
                for r in 0..R {
                    let xp = x[r].q.as_ptr().add(bi * 256 + 128 * h + 4 * gq + 64 * SP);
                    let x0 = _mm256_set1_epi32(xp.cast::<i32>().read_unaligned());
                    let x1 = _mm256_set1_epi32(xp.add(32).cast::<i32>().read_unaligned());
                    a0[r] = dot4::<V>(a0[r], w0, x0);
                    a1[r] = dot4::<V>(a1[r], w1, x1);
                }
            }
            let sc0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(16 + 8 * j0).cast()));
            let sc1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(16 + 8 * j1).cast()));
            for r in 0..R {
                let t = _mm256_add_epi32(
                    _mm256_mullo_epi32(a0[r], sc0),
                    _mm256_mullo_epi32(a1[r], sc1),
                );
                isum[r] = _mm256_add_epi32(isum[r], t);
            }
        }
    }

    /// Q6_K's 6-bit weights (0..64) at sub-block position `S` of one group: 8 rows × 4
    /// positions, from the low-nibble run `qa` (S = 0, 2) or `qb` (S = 1, 3) and the 2-bit
    /// field `S` of `qh`.
    #[inline(always)]
    unsafe fn weights6<const S: usize>(
        qa: __m256i,
        qb: __m256i,
        qh: __m256i,
        low: __m256i,
    ) -> __m256i {
        // SAFETY: the caller's build enables AVX2.
        unsafe {
            let q = if S.is_multiple_of(2) { qa } else { qb };
            let nib = if S < 2 { q } else { _mm256_srli_epi16::<4>(q) };
            let hi = _mm256_and_si256(qh, _mm256_set1_epi8((3 << (2 * S)) as u8 as i8));
            let hi = match S {
                0 => _mm256_slli_epi16::<4>(hi),
                1 => _mm256_slli_epi16::<2>(hi),
                2 => hi,
                _ => _mm256_srli_epi16::<2>(hi),
            };
            _mm256_or_si256(_mm256_and_si256(nib, low), hi)
        }
    }

    /// `acc + sums · d · dx` (integer block sums of 8 rows, their scales `d`, the activation
    /// block's scale `dx`).
    #[inline(always)]
    unsafe fn scaled_add(acc: __m256, sums: __m256i, d: __m256, dx: f32) -> __m256 {
        // SAFETY: the caller's build enables AVX2.
        unsafe {
            let scale = _mm256_mul_ps(d, _mm256_set1_ps(dx));
            _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(sums), scale))
        }
    }

    /// The running sums a kernel starts from, `init`'s rows as vectors: zeros for a group's
    /// first panel of `k`, the sums so far for the next (so they add up in one order however
    /// the rows are cut).
    #[inline(always)]
    unsafe fn starts<const R: usize>(init: &[[f32; 8]; R]) -> [__m256; R] {
        // SAFETY: the caller's build enables AVX2; each row holds 8 floats.
        std::array::from_fn(|r| unsafe { _mm256_loadu_ps(init[r].as_ptr()) })
    }

    /// Each row's 8 lanes.
    #[inline(always)]
    unsafe fn lanes<const R: usize>(acc: [__m256; R]) -> [[f32; 8]; R] {
        let mut out = [[0.0f32; 8]; R];
        for (o, a) in out.iter_mut().zip(acc) {
            // SAFETY: the caller's build enables AVX2; `o` holds 8 floats.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), a) };
        }
        out
    }

    /// How far ahead of the block being multiplied the kernels ask for weights in one burst
    /// per block where they do not spread their requests ([`ask_step`]): in 8-row passes
    /// with that much arithmetic per byte the hardware prefetcher alone leaves them waiting on
    /// memory (measured on Zen 4 from memory, 8 rows of 80 × 1536 × 8960 Q4_K: 50 → 41 ms; of
    /// 56 × 1536 × 8960 Q6_K: 58 → 46–51 ms, 2–8 KiB ahead alike; at 4 rows Q6_K lost 25 → 31
    /// ms, and fewer rows of Q4_K gained nothing or lost a little).
    const AHEAD: usize = 4096;

    /// Asks for the `len` bytes `ahead` bytes past `p` to be brought into the cache (past the
    /// end of the data too: a prefetch has no architectural effect, and the address is only
    /// computed, never dereferenced).
    #[inline(always)]
    unsafe fn prefetch_ahead(p: *const u8, ahead: usize, len: usize) {
        let mut i = 0;
        while i < len {
            // SAFETY: prefetching any address is architecturally invisible on x86.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead + i).cast()) };
            i += 64;
        }
    }

    /// Where [`prefetch_every_row`] (Intel): step `step` of the `steps` a kernel's inner loop
    /// takes over a block of `len` bytes at `p` asks for its share of the block's cache lines
    /// ([`crate::prefetch::ask_line`]: 4 KiB ahead into the first-level cache and 16 KiB into
    /// the second) — spread over the block's work rather than all at its start (likely: a burst of
    /// 18–27 requests per block fills the core's line-fill buffers and holds the loads behind
    /// it up), and with the far requests keeping more lines on the way (the second-level
    /// cache tracks more misses than the first). Past the end of the data too, as
    /// `prefetch_ahead`.
    ///
    /// Measured from memory on the Xeon (2 threads, 64–80 matrices of 1536 × 8960, the same
    /// binary alternating, median of 9–11 paired rounds), against a burst 4 KiB (one group)
    /// or 8 KiB (two) ahead per block into the first-level cache: 1 row of Q4_K 0.82–0.88×
    /// the time, 8 rows of Q4_K 0.82–0.88×, of Q6_K 0.73–0.86×; the far requests alone
    /// (16–64 KiB) did as well at 8 rows and less well at 1 (0.86–0.89×).
    #[inline(always)]
    pub(in super::super) unsafe fn ask_step(p: *const u8, len: usize, step: usize, steps: usize) {
        let per = len.div_ceil(64).div_ceil(steps);
        for l in 0..per {
            let line = (step * per + l) * 64;
            if line < len {
                crate::prefetch::ask_line(p.wrapping_add(line));
            }
        }
    }

    /// `acc + Σ` over each 4 bytes of `u·s` (unsigned × signed) per i32 lane: one `vpdpbusd`
    /// with VNNI, else `vpmaddubsw` + `vpmaddwd` by ones (exact while `u ≤ 128`: pairs of
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
        init: &[[f32; 8]; R],
    ) -> [[f32; 8]; R] {
        // SAFETY: forwarded from the callers; every pointer below stays inside one block of
        // `g` or inside the rows' `k` values (256 per block).
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            // Row sums stay in memory between blocks and the minimums are applied once per
            // block (fewer live registers; the per-row arithmetic is the same whatever `R`
            // is: a row's result does not depend on the rows beside it).
            let mut out = *init;
            let spread = prefetch_every_row();
            let burst = R == 8 && !spread;
            for (bi, blk) in g.chunks_exact(BLOCK).enumerate() {
                let p = blk.as_ptr();
                if burst {
                    prefetch_ahead(p, AHEAD, BLOCK);
                }
                let mut isum = [_mm256_setzero_si256(); R];
                for c in 0..4 {
                    // One or two rows: two sums per row and nibble half (even and odd groups),
                    // else `vpdpbusd`'s latency bounds the few chains; more rows have chains
                    // enough (and would run out of registers).
                    let split = if R <= 2 { 2 } else { 1 };
                    let mut alo = [[_mm256_setzero_si256(); 2]; R];
                    let mut ahi = [[_mm256_setzero_si256(); 2]; R];
                    for gi in 0..8 {
                        if spread {
                            ask_step(p, BLOCK, c * 8 + gi, 32);
                        }
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
                            let e = gi % split;
                            alo[r][e] = dot4::<V>(alo[r][e], lo, xl);
                            ahi[r][e] = dot4::<V>(ahi[r][e], hi, xh);
                        }
                    }
                    let s_lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(32 + 16 * c).cast()));
                    let s_hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(32 + 16 * c + 8).cast()));
                    for r in 0..R {
                        let lo = _mm256_add_epi32(alo[r][0], alo[r][1]);
                        let hi = _mm256_add_epi32(ahi[r][0], ahi[r][1]);
                        let hi = if V { _mm256_srai_epi32::<4>(hi) } else { hi };
                        let s = _mm256_add_epi32(
                            _mm256_mullo_epi32(lo, s_lo),
                            _mm256_mullo_epi32(hi, s_hi),
                        );
                        isum[r] = _mm256_add_epi32(isum[r], s);
                    }
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
                let dmin = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast()));
                for r in 0..R {
                    // Σ minimum · (Σq of the activations over its sub-block), pairs of
                    // sub-blocks at a time.
                    let mut imin = _mm256_setzero_si256();
                    for c in 0..4 {
                        let mins = _mm256_cvtepu8_epi16(_mm_loadu_si128(p.add(96 + 16 * c).cast()));
                        let pair = *x[r].sum32x2.get_unchecked(bi * 4 + c);
                        imin = _mm256_add_epi32(
                            imin,
                            _mm256_madd_epi16(mins, _mm256_set1_epi32(pair)),
                        );
                    }
                    let dx = _mm256_set1_ps(*x[r].d.get_unchecked(bi));
                    let sum = _mm256_mul_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_mul_ps(d, dx));
                    let min = _mm256_mul_ps(_mm256_cvtepi32_ps(imin), _mm256_mul_ps(dmin, dx));
                    let acc = _mm256_loadu_ps(out[r].as_ptr());
                    _mm256_storeu_ps(
                        out[r].as_mut_ptr(),
                        _mm256_add_ps(acc, _mm256_sub_ps(sum, min)),
                    );
                }
            }
            out
        }
    }
}
