//! AVX2 kernels: each weight block is decoded once into bytes in a register and multiplied
//! with `R` (1–4) activation rows by `vpmaddubsw` (unsigned weight byte × signed activation
//! byte, pairs summed to i16) and `vpmaddwd` (pairs to i32, by ones or by the sub-block's
//! integer scale). Unsigned storage offsets (Q4_0's 8, Q5_0's 16, Q6_K's 32) and the k-quants'
//! minimums are applied through the activations' per-16 sums, once per block.
//!
//! Each kernel is compiled twice: for AVX2, and with AVX-512 VNNI (256-bit lanes, AVX512VL),
//! where `vpdpbusd` does a byte dot product and its 4-way sum in one instruction and
//! `vpdpwssd` multiplies by the sub-block scale and accumulates in one. Integer sums are exact
//! either way, so both builds give the same bits.

use std::arch::x86_64::*;

use super::acts::ActRow;
use crate::quant::GgmlType;

/// The 32-weight formats, as const parameters of [`rows32`].
pub(super) const Q4_0: u8 = 0;
pub(super) const Q4_1: u8 = 1;
pub(super) const Q5_0: u8 = 2;
pub(super) const Q5_1: u8 = 3;
pub(super) const Q8_0: u8 = 4;

/// Whether this CPU runs these kernels.
pub(super) fn available() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

/// Whether this CPU runs the AVX-512 VNNI build.
pub(super) fn vnni_available() -> bool {
    available()
        && std::is_x86_feature_detected!("avx512vnni")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
}

/// `R` dot products of weight row `w` (blocks of `ty`) with rows `x`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]); `w` holds whole blocks covering
/// the rows' length.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_rows<const R: usize>(
    ty: GgmlType,
    w: &[u8],
    x: &[ActRow<'_>; R],
) -> [f32; R] {
    // SAFETY: forwarded from the caller.
    unsafe { dispatch::<R, false>(ty, w, x) }
}

/// [`dot_rows`] with AVX-512 VNNI.
///
/// # Safety
/// As [`dot_rows`], and the CPU must support AVX512-VNNI and AVX512VL ([`vnni_available`]).
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(super) unsafe fn dot_rows_vnni<const R: usize>(
    ty: GgmlType,
    w: &[u8],
    x: &[ActRow<'_>; R],
) -> [f32; R] {
    // SAFETY: forwarded from the caller.
    unsafe { dispatch::<R, true>(ty, w, x) }
}

/// The kernel for `ty`, inlined into the build that calls it.
///
/// # Safety
/// As [`dot_rows`] (and [`dot_rows_vnni`] when `V`).
#[inline(always)]
unsafe fn dispatch<const R: usize, const V: bool>(
    ty: GgmlType,
    w: &[u8],
    x: &[ActRow<'_>; R],
) -> [f32; R] {
    // SAFETY: forwarded from the callers.
    unsafe {
        match ty {
            GgmlType::Q4_0 => rows32::<Q4_0, R, V>(w, x),
            GgmlType::Q4_1 => rows32::<Q4_1, R, V>(w, x),
            GgmlType::Q5_0 => rows32::<Q5_0, R, V>(w, x),
            GgmlType::Q5_1 => rows32::<Q5_1, R, V>(w, x),
            GgmlType::Q8_0 => rows32::<Q8_0, R, V>(w, x),
            GgmlType::Q4_K => rows_k45::<false, R, V>(w, x),
            GgmlType::Q5_K => rows_k45::<true, R, V>(w, x),
            GgmlType::Q6_K => rows_q6k::<R, V>(w, x),
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                unreachable!("QuantMatrix::new admits block formats only")
            }
        }
    }
}

/// `Σ pairs of a·sa + Σ pairs of c·sc` (i16 × i16 → i32): `vpmaddwd` then `vpdpwssd` with
/// VNNI, else two `vpmaddwd` and an add. (Two products per call keep the accumulation chain
/// short: a single row is latency-bound on it.)
///
/// # Safety
/// The caller's build enables AVX2, and AVX512-VNNI/VL when `V`.
#[inline(always)]
unsafe fn madd2<const V: bool>(a: __m256i, sa: __m256i, c: __m256i, sc: __m256i) -> __m256i {
    // SAFETY: forwarded from the caller.
    unsafe {
        if V {
            _mm256_dpwssd_epi32(_mm256_madd_epi16(a, sa), c, sc)
        } else {
            _mm256_add_epi32(_mm256_madd_epi16(a, sa), _mm256_madd_epi16(c, sc))
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes.
    let bits = unsafe { p.cast::<u16>().read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

#[target_feature(enable = "avx2,fma")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

#[target_feature(enable = "avx2")]
#[inline]
unsafe fn load(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// 16 bytes of packed nibbles → 32 bytes: low nibbles first, then high nibbles.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn nibbles16(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes.
    let v = unsafe { _mm_loadu_si128(p.cast()) };
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(v), v);
    _mm256_and_si256(both, _mm256_set1_epi8(0xF))
}

/// Bit `e` of the 32-bit mask at `p` → byte `e` set to 16 or 0.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn fifth_bits(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 4 readable bytes.
    let bits = unsafe { p.cast::<u32>().read_unaligned() } as i32;
    // Byte e takes mask byte e / 8, then tests bit e % 8.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let select = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
    _mm256_and_si256(set, _mm256_set1_epi8(16))
}

/// `((bytes >> shift) & mask) << 4` per byte: the high bits of 5- and 6-bit weights.
#[target_feature(enable = "avx2")]
#[inline]
fn high_bits(bytes: __m256i, shift: i32, mask: i8) -> __m256i {
    let v = _mm256_srl_epi16(bytes, _mm_cvtsi32_si128(shift));
    _mm256_slli_epi16::<4>(_mm256_and_si256(v, _mm256_set1_epi8(mask)))
}

/// Σ over 32 byte pairs of `u·s` as 8 i32 lanes (lane `l` holds values `4l..4l+4`).
///
/// # Safety
/// The caller's build enables AVX2, and AVX512-VNNI/VL when `V`.
#[inline(always)]
unsafe fn dot_u8_i8<const V: bool>(u: __m256i, s: __m256i) -> __m256i {
    // SAFETY: forwarded from the caller.
    unsafe {
        if V {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }
    }
}

/// The 32-weight formats: per block `d·Σ q·x` (+ a per-block minimum or offset term).
/// # Safety
/// The caller's build enables AVX2/FMA/F16C (and AVX512-VNNI/VL when `V`); `w` holds whole
/// blocks and `x`'s rows cover them.
#[inline(always)]
unsafe fn rows32<const F: u8, const R: usize, const V: bool>(
    w: &[u8],
    x: &[ActRow<'_>; R],
) -> [f32; R] {
    // SAFETY: forwarded from the caller.
    unsafe {
        let bb = match F {
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            _ => 34,
        };
        let mut acc = [_mm256_setzero_ps(); R];
        let mut acc_min = [0.0f32; R];
        for (bi, b) in w.chunks_exact(bb).enumerate() {
            let p = b.as_ptr();
            // `b` is one whole block of format F; `x` rows cover 32 values per block.
            {
                let d = f16_at(p);
                // Unsigned weight bytes and the term added per block: coef · (d_x·Σq_x).
                let (wq, coef) = match F {
                    Q4_0 => (nibbles16(p.add(2)), -8.0 * d),
                    Q4_1 => (nibbles16(p.add(4)), f16_at(p.add(2))),
                    Q5_0 => (
                        _mm256_or_si256(nibbles16(p.add(6)), fifth_bits(p.add(2))),
                        -16.0 * d,
                    ),
                    Q5_1 => (
                        _mm256_or_si256(nibbles16(p.add(8)), fifth_bits(p.add(4))),
                        f16_at(p.add(2)),
                    ),
                    _ => (load(p.add(2)), 0.0),
                };
                for r in 0..R {
                    let xr = &x[r];
                    let xq = load(xr.q.as_ptr().add(bi * 32).cast());
                    let dots = if F == Q8_0 {
                        // Signed × signed: |w| × (x with w's sign).
                        dot_u8_i8::<V>(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq))
                    } else {
                        dot_u8_i8::<V>(wq, xq)
                    };
                    let dd = _mm256_set1_ps(d * *xr.d.get_unchecked(bi));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), dd, acc[r]);
                    if F != Q8_0 {
                        acc_min[r] += coef * *xr.xsum.get_unchecked(bi);
                    }
                }
            }
        }
        std::array::from_fn(|r| hsum(acc[r]) + acc_min[r])
    }
}

/// The 8 six-bit scales and 8 minimums of a Q4_K/Q5_K super-block's 12 scale bytes (at
/// `p`), as 16 i16 lanes: scales in the low half, minimums in the high half.
///
/// # Safety
/// The caller's build enables AVX2; `p` has 12 readable bytes.
#[inline(always)]
unsafe fn k4_scales(p: *const u8) -> __m256i {
    // SAFETY: forwarded from the caller.
    unsafe {
        let word = |i: usize| p.add(4 * i).cast::<u32>().read_unaligned();
        let (a, b, c) = (word(0), word(1), word(2));
        let low6 = 0x3f3f_3f3f;
        let nib = 0x0f0f_0f0f;
        let top2 = 0x0303_0303;
        let sc1 = (c & nib) | (((a >> 6) & top2) << 4);
        let mn1 = ((c >> 4) & nib) | (((b >> 6) & top2) << 4);
        _mm256_cvtepu8_epi16(_mm_set_epi32(
            mn1 as i32,
            (b & low6) as i32,
            sc1 as i32,
            (a & low6) as i32,
        ))
    }
}

/// A byte shuffle that fills 128-bit lane 0 with i16 element `lo` of its lane and lane 1
/// with element `hi` of its lane (`_mm256_shuffle_epi8` stays inside lanes).
#[target_feature(enable = "avx2")]
#[inline]
fn pick_i16(lo: i8, hi: i8) -> __m256i {
    let pair = |e: i8| (i16::from(2 * e + 1) << 8) | i16::from(2 * e);
    _mm256_set_m128i(_mm_set1_epi16(pair(hi)), _mm_set1_epi16(pair(lo)))
}

/// `d` and the second f16 after it at `p`, times `dx`, broadcast: `(d·dx, d2·dx)`.
///
/// # Safety
/// The caller's build enables AVX2/F16C; `p` has 4 readable bytes.
#[inline(always)]
unsafe fn f16_pair_times(p: *const u8, dx: f32) -> (__m256, __m256) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let bits = p.cast::<u32>().read_unaligned() as i32;
        let v = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)), _mm_set1_ps(dx));
        (
            _mm256_broadcastss_ps(v),
            _mm256_broadcastss_ps(_mm_movehdup_ps(v)),
        )
    }
}

/// Q4_K (and Q5_K with `FIFTH`): 8 sub-blocks of 32 with 6-bit scales and minimums.
/// # Safety
/// As [`rows32`].
#[inline(always)]
unsafe fn rows_k45<const FIFTH: bool, const R: usize, const V: bool>(
    w: &[u8],
    x: &[ActRow<'_>; R],
) -> [f32; R] {
    // SAFETY: forwarded from the caller.
    unsafe {
        let bb = if FIFTH { 176 } else { 144 };
        let qs_at = if FIFTH { 48 } else { 16 };
        let mut acc = [_mm256_setzero_ps(); R];
        let mut acc_min = [_mm256_setzero_ps(); R];
        let low = _mm256_set1_epi8(0xF);
        // Sub-block j's scale in every i16 lane: lane 0 of `scales` holds them, copied to 1.
        let pick: [__m256i; 8] = std::array::from_fn(|j| pick_i16(j as i8, j as i8));
        // Each minimum twice, against the activations' per-16 sums: i16 lanes m0 m0 m1 m1 …
        // from the minimums' 8 lanes (copied into both 128-bit lanes).
        let dup = _mm256_setr_epi8(
            0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7, 6, 7, //
            8, 9, 8, 9, 10, 11, 10, 11, 12, 13, 12, 13, 14, 15, 14, 15,
        );
        for (bi, b) in w.chunks_exact(bb).enumerate() {
            let p = b.as_ptr();
            // `b` is one whole super-block; `x` rows cover 256 values per super-block.
            {
                let sm = k4_scales(p.add(4));
                let scales = _mm256_permute2x128_si256::<0x00>(sm, sm);
                let mins16 = _mm256_permute2x128_si256::<0x11>(sm, sm);
                let mins = _mm256_shuffle_epi8(mins16, dup);
                let qh = if FIFTH {
                    load(p.add(16))
                } else {
                    _mm256_setzero_si256()
                };
                let mut isum = [_mm256_setzero_si256(); R];
                for chunk in 0..4 {
                    let q = load(p.add(qs_at + 32 * chunk));
                    let mut lo = _mm256_and_si256(q, low);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low);
                    if FIFTH {
                        lo = _mm256_or_si256(lo, high_bits(qh, 2 * chunk as i32, 1));
                        hi = _mm256_or_si256(hi, high_bits(qh, 2 * chunk as i32 + 1, 1));
                    }
                    let s_lo = _mm256_shuffle_epi8(scales, pick[2 * chunk]);
                    let s_hi = _mm256_shuffle_epi8(scales, pick[2 * chunk + 1]);
                    for r in 0..R {
                        let xp = x[r].q.as_ptr().add(bi * 256 + 64 * chunk).cast::<u8>();
                        let a = _mm256_maddubs_epi16(lo, load(xp));
                        let c = _mm256_maddubs_epi16(hi, load(xp.add(32)));
                        isum[r] = _mm256_add_epi32(isum[r], madd2::<V>(a, s_lo, c, s_hi));
                    }
                }
                for r in 0..R {
                    let xr = &x[r];
                    let (dd, dm) = f16_pair_times(p, *xr.d.get_unchecked(bi));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), dd, acc[r]);
                    let s16 = _mm256_loadu_si256(xr.sum16.as_ptr().add(bi * 16).cast());
                    acc_min[r] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, s16)),
                        dm,
                        acc_min[r],
                    );
                }
            }
        }
        std::array::from_fn(|r| hsum(acc[r]) - hsum(acc_min[r]))
    }
}

/// Q6_K: 16 sub-blocks of 16 with signed 8-bit scales, 6-bit weights stored with offset 32.
/// # Safety
/// As [`rows32`].
#[inline(always)]
unsafe fn rows_q6k<const R: usize, const V: bool>(w: &[u8], x: &[ActRow<'_>; R]) -> [f32; R] {
    // SAFETY: forwarded from the caller.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut acc_off = [_mm256_setzero_ps(); R];
        let low = _mm256_set1_epi8(0xF);
        for (bi, b) in w.chunks_exact(210).enumerate() {
            let p = b.as_ptr();
            // `b` is one whole super-block; `x` rows cover 256 values per super-block.
            {
                let d = f16_at(p.add(208));
                let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192).cast()));
                let mut isum = [_mm256_setzero_si256(); R];
                for hb in 0..2 {
                    let ql0 = load(p.add(64 * hb));
                    let ql1 = load(p.add(64 * hb + 32));
                    let qh = load(p.add(128 + 32 * hb));
                    let quarters = [
                        _mm256_or_si256(_mm256_and_si256(ql0, low), high_bits(qh, 0, 3)),
                        _mm256_or_si256(_mm256_and_si256(ql1, low), high_bits(qh, 2, 3)),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low),
                            high_bits(qh, 4, 3),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low),
                            high_bits(qh, 6, 3),
                        ),
                    ];
                    for pair in 0..2 {
                        let sub = 4 * hb + 2 * pair;
                        // Sub-block `sub`'s two 16-value halves have scales 2·sub and 2·sub+1.
                        let sc = |i: usize| _mm_set1_epi16(i16::from(b[192 + i] as i8));
                        let s0 = _mm256_set_m128i(sc(2 * sub + 1), sc(2 * sub));
                        let s1 = _mm256_set_m128i(sc(2 * sub + 3), sc(2 * sub + 2));
                        let (q0, q1) = (quarters[2 * pair], quarters[2 * pair + 1]);
                        for r in 0..R {
                            let xp = x[r].q.as_ptr().add(bi * 256 + 32 * sub).cast::<u8>();
                            let a = _mm256_maddubs_epi16(q0, load(xp));
                            let c = _mm256_maddubs_epi16(q1, load(xp.add(32)));
                            isum[r] = _mm256_add_epi32(isum[r], madd2::<V>(a, s0, c, s1));
                        }
                    }
                }
                for r in 0..R {
                    let xr = &x[r];
                    let dx = *xr.d.get_unchecked(bi);
                    let dd = _mm256_set1_ps(d * dx);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), dd, acc[r]);
                    // The offset 32 of every weight, through the per-16 sums.
                    let s16 = _mm256_loadu_si256(xr.sum16.as_ptr().add(bi * 16).cast());
                    acc_off[r] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(_mm256_madd_epi16(sc, s16)),
                        dd,
                        acc_off[r],
                    );
                }
            }
        }
        std::array::from_fn(|r| hsum(acc[r]) - 32.0 * hsum(acc_off[r]))
    }
}
