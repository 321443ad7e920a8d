//! Two interleaved groups of 8 rows side by side in 512-bit registers: 16 rows per
//! `vpdpbusd`, for the 8-row passes of many activation rows with AVX-512 VNNI (Q6_K, Q8_0,
//! Q5_0, Q4_1), and where 512-bit units run at full width (Intel; see
//! [`tuning`](super::tuning)) Q4_K too and every pass of 4 rows or more.
//!
//! The blocks are the [`x8`](super::x8) layout as stored; a 512-bit weight vector is a group's
//! 32 bytes in its low half and the next group's 32 bytes in its high half, so each broadcast
//! activation meets 16 rows instead of 8 and the instructions per multiply-add around the
//! `vpdpbusd` (weight loads and 6-bit decoding, the offsets' broadcasts, loop and address
//! work) halve. On Zen 4 (256-bit units; a 512-bit instruction takes both halves) the
//! multiply-adds per cycle stay the same; the 8-row Q6_K kernel was not bound by them (~42%
//! of the `vpdpbusd` peak in L2, where Q4_K reaches ~69%).
//!
//! Measured (single thread, 16 groups of 1536 weights in L2, alternated builds): Q6_K 8 rows
//! 95–101 → 136–141 G MAC/s; in the `qmatmul` bench (1536 × 8960, in the last-level cache)
//! 64 rows 5.0–5.4 → 3.5–4.3 ms. From memory (`from_memory`, 600 MB) 8 rows were unchanged
//! (45–50 ms both: there the wait for weights, not the instructions, sets the pace) and 4
//! rows slower (28 → 35–43 ms), so only 8-row passes and the tails after them (groups
//! already in the cache) take this path; an 8-node verification of the 1.5B read the same
//! (74–75 ms both). Q8_0 and Q5_0 (the 0.5B draft's formats) gain in L2 at 8 rows
//! 133 → 173 and 121 → 153 G MAC/s, in the `qmatmul` bench 8 rows 614–664 → 394–422 µs
//! (Q8_0) and 543–553 → 437–448 µs (Q5_0), and from memory too (Q8_0 8 rows 42–46 →
//! 32–34 ms); the 0.5B's prefill of 128 tokens read 408–445 → 474–480 tok/s (three
//! alternated pairs). Q4_1 (SmolLM2's format), which had stayed at 4-row passes, takes 8
//! over pairs: `qmatmul` bench 8 rows 494–545 → 413–456 µs, 64 rows 3.89–3.97 → 3.07–3.14
//! ms, from memory 8 rows 58–60 → 44 ms; SmolLM2's prefill of 512 tokens 481–543 → 538–634
//! tok/s (three pairs). Q4_K over pairs, tried on Zen 4, was no faster there (README,
//! "Verification cost"); on an Intel Xeon (Emerald Rapids), where `vpdpbusd zmm` issues two
//! per cycle, with each group's weights asked for 8 KiB ahead, from memory 8 rows took
//! 0.73–0.87× the time of one group at a time and in the last-level cache 0.67×.

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{both, both8, dot16_vnni, pairs, weights as weights6};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::acts::ActRow;
    use super::super::tuning::prefetch_every_row;
    use super::super::x8::{
        BLOCK, BLOCK5, BLOCK6, BLOCK8, BLOCK41, F_Q4_1 as Q4_1, F_Q5_0 as Q5_0, F_Q8_0 as Q8_0, QS,
        QS6, ask_step,
    };
    use crate::quant::GgmlType;

    /// Whether [`dot16_vnni`] has a kernel for `ty` (Q4_K's is taken only where
    /// [`full_width_pairs`](super::super::tuning::full_width_pairs)).
    pub(in super::super) fn pairs(ty: GgmlType) -> bool {
        matches!(
            ty,
            GgmlType::Q4_K | GgmlType::Q6_K | GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q4_1
        )
    }

    /// Interleaved groups `g0` and `g1` (whole blocks of `ty`, a [`pairs`] type) times the
    /// activation rows `x`: `out[r][l]` = row `l` of `g0` (`l < 8`) or row `l − 8` of `g1`
    /// · `x[r]`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA, F16C, AVX512F/BW/VL and AVX512-VNNI; `g0` and `g1`
    /// hold the same number of whole blocks covering the rows' length.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(in super::super) unsafe fn dot16_vnni<const R: usize>(
        ty: GgmlType,
        g0: &[u8],
        g1: &[u8],
        x: &[ActRow<'_>; R],
        init: &[[f32; 16]; R],
    ) -> [[f32; 16]; R] {
        debug_assert!(pairs(ty) && g0.len() == g1.len());
        // SAFETY: forwarded from the caller.
        unsafe {
            match ty {
                GgmlType::Q8_0 => kernel32::<Q8_0, R>(g0, g1, x, init),
                GgmlType::Q5_0 => kernel32::<Q5_0, R>(g0, g1, x, init),
                GgmlType::Q4_1 => kernel32::<Q4_1, R>(g0, g1, x, init),
                GgmlType::Q4_K => kernel4(g0, g1, x, init),
                _ => kernel6(g0, g1, x, init),
            }
        }
    }

    /// Block `bi` of both groups, as `(bi, start in g0, start in g1)`.
    fn block_pairs<'a>(
        g0: &'a [u8],
        g1: &'a [u8],
        block: usize,
    ) -> impl Iterator<Item = (usize, *const u8, *const u8)> + 'a {
        g0.chunks_exact(block)
            .zip(g1.chunks_exact(block))
            .enumerate()
            .map(|(bi, (b0, b1))| (bi, b0.as_ptr(), b1.as_ptr()))
    }

    /// Step `step` of `steps` over blocks `p0` and `p1` (`len` bytes each) asks for its share
    /// of both blocks' lines ahead ([`ask_step`]; before it, a burst per block pair 8 KiB
    /// ahead: 8 rows from memory took 0.82–0.88× that time for Q4_K and 0.73–0.86× for Q6_K).
    #[inline(always)]
    unsafe fn ask_both(p0: *const u8, p1: *const u8, len: usize, step: usize, steps: usize) {
        // SAFETY: prefetching any address is architecturally invisible on x86.
        unsafe {
            ask_step(p0, len, step, steps);
            ask_step(p1, len, step, steps);
        }
    }

    /// 32 bytes at `at` of blocks `p0` and `p1`, as the low and high halves.
    #[inline(always)]
    pub(in super::super) unsafe fn both(p0: *const u8, p1: *const u8, at: usize) -> __m512i {
        // SAFETY: the callers' pointers stay inside their blocks.
        unsafe {
            let lo = _mm256_loadu_si256(p0.add(at).cast());
            let hi = _mm256_loadu_si256(p1.add(at).cast());
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
        }
    }

    /// 8 bytes at `at` of blocks `p0` and `p1`, side by side.
    #[inline(always)]
    pub(in super::super) unsafe fn both8(p0: *const u8, p1: *const u8, at: usize) -> __m128i {
        // SAFETY: the callers' pointers stay inside their blocks.
        unsafe {
            _mm_unpacklo_epi64(
                _mm_loadl_epi64(p0.add(at).cast()),
                _mm_loadl_epi64(p1.add(at).cast()),
            )
        }
    }

    /// 16 bytes at `at` of blocks `p0` and `p1`, as the low and high halves.
    #[inline(always)]
    unsafe fn both16(p0: *const u8, p1: *const u8, at: usize) -> __m256i {
        // SAFETY: the callers' pointers stay inside their blocks.
        unsafe {
            _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_loadu_si128(p0.add(at).cast())),
                _mm_loadu_si128(p1.add(at).cast()),
            )
        }
    }

    /// Q8_0, Q5_0 or Q4_1 (`F`: the 8-row kernel's format constants) as [`super::super::x8`]'s 32-weight kernel does them with
    /// VNNI (Q8_0's signed weights taken as `w + 128` less `128·Σx` per block; Q5_0's fifth
    /// bits added as 16 under a byte mask, the offset 16 as `−16·Σx`; Q4_1's minimum as
    /// `m·dx·Σq` per block), 16 rows wide.
    ///
    /// # Safety
    /// As [`dot16_vnni`].
    #[inline(always)]
    unsafe fn kernel32<const F: u8, const R: usize>(
        g0: &[u8],
        g1: &[u8],
        x: &[ActRow<'_>; R],
        init: &[[f32; 16]; R],
    ) -> [[f32; 16]; R] {
        // SAFETY: forwarded from the caller; every pointer below stays inside one block of
        // `g0`/`g1` or inside the rows' `k` values (32 per block).
        unsafe {
            let block = match F {
                Q8_0 => BLOCK8,
                Q5_0 => BLOCK5,
                _ => BLOCK41,
            };
            let (flip, low, sixteen) = (
                _mm512_set1_epi8(-128),
                _mm512_set1_epi8(0x0F),
                _mm512_set1_epi8(16),
            );
            let mut acc = starts(init);
            let ahead = prefetch_every_row();
            for (bi, p0, p1) in block_pairs(g0, g1, block) {
                let d = _mm512_cvtph_ps(both16(p0, p1, 0));
                let mut isum = [_mm512_setzero_si512(); R];
                for i in 0..8 {
                    if ahead {
                        ask_both(p0, p1, block, i, 8);
                    }
                    // 16 rows × 4 weights, and where their activations start in the block.
                    let (w, at) = if F == Q8_0 {
                        (_mm512_xor_si512(both(p0, p1, 16 + 32 * i), flip), 4 * i)
                    } else {
                        let (gi, h) = (i / 2, i % 2);
                        let qs = if F == Q5_0 { 48 } else { 32 };
                        let q = both(p0, p1, qs + 32 * gi);
                        let nib = if h == 0 { q } else { _mm512_srli_epi16::<4>(q) };
                        let w = _mm512_and_si512(nib, low);
                        if F == Q4_1 {
                            (w, 16 * h + 4 * gi)
                        } else {
                            // Bit e of each group's fifth-bit word ↔ byte e of its half.
                            let word = |p: *const u8| {
                                u64::from(p.add(16 + 8 * gi + 4 * h).cast::<u32>().read_unaligned())
                            };
                            let mask = word(p0) | (word(p1) << 32);
                            (_mm512_mask_add_epi8(w, mask, w, sixteen), 16 * h + 4 * gi)
                        }
                    };
                    for r in 0..R {
                        let xp = x[r].q.as_ptr().add(bi * 32 + at);
                        let xv = _mm512_set1_epi32(xp.cast::<i32>().read_unaligned());
                        isum[r] = _mm512_dpbusd_epi32(isum[r], w, xv);
                    }
                }
                for r in 0..R {
                    let sx = _mm512_set1_epi32(*x[r].sum32.get_unchecked(bi));
                    let s = match F {
                        Q8_0 => _mm512_sub_epi32(isum[r], _mm512_slli_epi32::<7>(sx)),
                        Q5_0 => _mm512_sub_epi32(isum[r], _mm512_slli_epi32::<4>(sx)),
                        _ => isum[r],
                    };
                    acc[r] = scaled_add(acc[r], s, d, *x[r].d.get_unchecked(bi));
                    if F == Q4_1 {
                        let m = _mm512_cvtph_ps(both16(p0, p1, 16));
                        let xs = _mm512_set1_ps(*x[r].xsum.get_unchecked(bi));
                        acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(m, xs));
                    }
                }
            }
            lanes(acc)
        }
    }

    /// Q4_K as [`super::super::x8`]'s 8-row kernel does it with VNNI (high nibbles taken in
    /// place as 16× their value; the minimums once per block), 16 rows wide — with each
    /// chunk's sums scaled in float rather than by `vpmulld` (two µops on one port, two per
    /// row and chunk: at 8 rows a quarter as many slots as the chunk's `vpdpbusd`).
    ///
    /// Still the integer sum bit for bit: a sub-block's sum is at most 32 · 15 · 128 =
    /// 61 440 in magnitude (× 16 for the high nibbles, 983 040), exact as an f32, and its
    /// product with the 6-bit scale (the high nibbles' taken as `s / 16`, exact) is an
    /// integer of at most 3 870 720; the even and the odd sub-blocks sum apart (`fa`, `fb`:
    /// four each, at most 15 482 880 < 2²⁴), so every fused multiply-add is exact, and
    /// `fa + fb` rounds the exact total once, as converting the integer sum did (test
    /// `extreme_blocks_sum_exactly_at_every_row_count`). The minimums' pairs go through one
    /// `vpdpwssd` each instead of `vpmaddwd` and an add (the same integers: no pair is near
    /// the i32 range).
    /// Measured in one process, the two versions alternated call by call (64 matrices of
    /// 8 960 × 1 536, 8 rows, median of 6–10 paired rounds, eight runs each): 2 threads from
    /// memory 0.92–1.02× the time (median of runs 0.98×), one thread in the second-level
    /// cache 0.92–1.02× (0.95×). (Unrolling the 8 steps of a chunk was faster in the cache,
    /// 0.92–0.95×, and slower from memory, 1.03–1.13×.)
    ///
    /// # Safety
    /// As [`dot16_vnni`].
    #[inline(always)]
    unsafe fn kernel4<const R: usize>(
        g0: &[u8],
        g1: &[u8],
        x: &[ActRow<'_>; R],
        init: &[[f32; 16]; R],
    ) -> [[f32; 16]; R] {
        // SAFETY: forwarded from the caller; every pointer below stays inside one block of
        // `g0`/`g1` or inside the rows' `k` values (256 per block).
        unsafe {
            let low = _mm512_set1_epi8(0x0F);
            // The row sums stay in memory between blocks (as the 8-row kernel's).
            let mut out = *init;
            let ahead = prefetch_every_row();
            for (bi, p0, p1) in block_pairs(g0, g1, BLOCK) {
                let mut fa = [_mm512_setzero_ps(); R];
                let mut fb = [_mm512_setzero_ps(); R];
                for c in 0..4 {
                    let mut alo = [_mm512_setzero_si512(); R];
                    let mut ahi = [_mm512_setzero_si512(); R];
                    for gi in 0..8 {
                        if ahead {
                            ask_both(p0, p1, BLOCK, c * 8 + gi, 32);
                        }
                        let q = both(p0, p1, QS + (c * 8 + gi) * 32);
                        let lo = _mm512_and_si512(q, low);
                        let hi = _mm512_andnot_si512(low, q);
                        for r in 0..R {
                            let xp = x[r].q.as_ptr().add(bi * 256 + 64 * c + 4 * gi);
                            let xl = _mm512_set1_epi32(xp.cast::<i32>().read_unaligned());
                            let xh = _mm512_set1_epi32(xp.add(32).cast::<i32>().read_unaligned());
                            alo[r] = _mm512_dpbusd_epi32(alo[r], lo, xl);
                            ahi[r] = _mm512_dpbusd_epi32(ahi[r], hi, xh);
                        }
                    }
                    let s_lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(both8(p0, p1, 32 + 16 * c)));
                    let s_hi = _mm512_mul_ps(
                        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(both8(p0, p1, 32 + 16 * c + 8))),
                        _mm512_set1_ps(1.0 / 16.0),
                    );
                    for r in 0..R {
                        fa[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(alo[r]), s_lo, fa[r]);
                        fb[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ahi[r]), s_hi, fb[r]);
                    }
                }
                let d = _mm512_cvtph_ps(both16(p0, p1, 0));
                let dmin = _mm512_cvtph_ps(both16(p0, p1, 16));
                for r in 0..R {
                    let mut imin = _mm512_setzero_si512();
                    for c in 0..4 {
                        let mins = _mm512_cvtepu8_epi16(both16(p0, p1, 96 + 16 * c));
                        let pair = *x[r].sum32x2.get_unchecked(bi * 4 + c);
                        imin = _mm512_dpwssd_epi32(imin, mins, _mm512_set1_epi32(pair));
                    }
                    let dx = _mm512_set1_ps(*x[r].d.get_unchecked(bi));
                    let sum = _mm512_mul_ps(_mm512_add_ps(fa[r], fb[r]), _mm512_mul_ps(d, dx));
                    let min = _mm512_mul_ps(_mm512_cvtepi32_ps(imin), _mm512_mul_ps(dmin, dx));
                    let acc = _mm512_loadu_ps(out[r].as_ptr());
                    _mm512_storeu_ps(
                        out[r].as_mut_ptr(),
                        _mm512_add_ps(acc, _mm512_sub_ps(sum, min)),
                    );
                }
            }
            out
        }
    }

    /// Q6_K as [`super::super::x8`]'s 8-row kernel does it (two sub-block positions at a time,
    /// the storage offset as each sub-block sum's starting value), 16 rows wide.
    ///
    /// # Safety
    /// As [`dot16_vnni`].
    #[inline(always)]
    unsafe fn kernel6<const R: usize>(
        g0: &[u8],
        g1: &[u8],
        x: &[ActRow<'_>; R],
        init: &[[f32; 16]; R],
    ) -> [[f32; 16]; R] {
        // SAFETY: forwarded from the caller; every pointer below stays inside one block of
        // `g0`/`g1` or inside the rows' `k` values (256 per block, 16 offsets per block).
        unsafe {
            let mut acc = starts(init);
            let ahead = prefetch_every_row();
            for (bi, p0, p1) in block_pairs(g0, g1, BLOCK6) {
                let off: [&[i32]; R] = std::array::from_fn(|r| x[r].off16.get_unchecked(bi * 16..));
                let mut isum = [_mm512_setzero_si512(); R];
                for h in 0..2 {
                    for half in 0..2 {
                        // Steps 0..32 of the block pair, 4 per call (spread requests).
                        let ask = ahead.then_some((h * 2 + half) * 8);
                        pair6::<R, 0>((p0, p1), x, bi, (h, half), &off, &mut isum, ask);
                        let ask = ask.map(|s| s + 4);
                        pair6::<R, 1>((p0, p1), x, bi, (h, half), &off, &mut isum, ask);
                    }
                }
                let d = _mm512_cvtph_ps(both16(p0, p1, 0));
                for r in 0..R {
                    acc[r] = scaled_add(acc[r], isum[r], d, *x[r].d.get_unchecked(bi));
                }
            }
            lanes(acc)
        }
    }

    /// `acc + sums · d · dx` as the 8-row kernels' `scaled_add` computes it (multiply, then
    /// add; no fused multiply-add), so that 16-row and 8-row passes agree bit for bit.
    #[inline(always)]
    unsafe fn scaled_add(acc: __m512, sums: __m512i, d: __m512, dx: f32) -> __m512 {
        // SAFETY: the caller's build enables AVX512F.
        unsafe {
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(dx));
            _mm512_add_ps(acc, _mm512_mul_ps(_mm512_cvtepi32_ps(sums), scale))
        }
    }

    /// The running sums a kernel starts from (as `x8`'s).
    #[inline(always)]
    unsafe fn starts<const R: usize>(init: &[[f32; 16]; R]) -> [__m512; R] {
        // SAFETY: the caller's build enables AVX-512F; each row holds 16 floats.
        std::array::from_fn(|r| unsafe { _mm512_loadu_ps(init[r].as_ptr()) })
    }

    /// Each row's 16 lanes.
    #[inline(always)]
    unsafe fn lanes<const R: usize>(acc: [__m512; R]) -> [[f32; 16]; R] {
        let mut out = [[0.0f32; 16]; R];
        for (o, a) in out.iter_mut().zip(acc) {
            // SAFETY: the caller's build enables AVX512F; `o` holds 16 floats.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), a) };
        }
        out
    }

    /// Sub-blocks `8h + 4·SP + half` and `+ 2` of one Q6_K block pair for `R` rows, scaled and
    /// added into `isum` (as the 8-row kernel's `q6_pair`).
    ///
    /// `ask`: this call's first step of the block pair's 32, where the weights are asked for
    /// ahead ([`ask_both`]).
    ///
    /// # Safety
    /// As [`kernel6`]: `p0`, `p1` are whole blocks, block `bi` of every row of `x`.
    #[inline(always)]
    unsafe fn pair6<const R: usize, const SP: usize>(
        (p0, p1): (*const u8, *const u8),
        x: &[ActRow<'_>; R],
        bi: usize,
        (h, half): (usize, usize),
        off: &[&[i32]; R],
        isum: &mut [__m512i; R],
        ask: Option<usize>,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            let low = _mm512_set1_epi8(0x0F);
            let j0 = 8 * h + 4 * SP + half;
            let j1 = j0 + 2;
            let mut a0 = [_mm512_setzero_si512(); R];
            let mut a1 = [_mm512_setzero_si512(); R];
            for r in 0..R {
                a0[r] = _mm512_set1_epi32(*off[r].get_unchecked(j0));
                a1[r] = _mm512_set1_epi32(*off[r].get_unchecked(j1));
            }
            for gq in 4 * half..4 * half + 4 {
                if let Some(step) = ask {
                    ask_both(p0, p1, BLOCK6, step + gq - 4 * half, 32);
                }
                let at = QS6 + (h * 8 + gq) * 96;
                let qa = both(p0, p1, at);
                let qb = both(p0, p1, at + 32);
                let qh = both(p0, p1, at + 64);
                let (w0, w1) = if SP == 0 {
                    (weights::<0>(qa, qb, qh, low), weights::<1>(qa, qb, qh, low))
                } else {
                    (weights::<2>(qa, qb, qh, low), weights::<3>(qa, qb, qh, low))
                };
                for r in 0..R {
                    let xp = x[r].q.as_ptr().add(bi * 256 + 128 * h + 4 * gq + 64 * SP);
                    let x0 = _mm512_set1_epi32(xp.cast::<i32>().read_unaligned());
                    let x1 = _mm512_set1_epi32(xp.add(32).cast::<i32>().read_unaligned());
                    a0[r] = _mm512_dpbusd_epi32(a0[r], w0, x0);
                    a1[r] = _mm512_dpbusd_epi32(a1[r], w1, x1);
                }
            }
            let sc0 = _mm512_cvtepi8_epi32(both8(p0, p1, 16 + 8 * j0));
            let sc1 = _mm512_cvtepi8_epi32(both8(p0, p1, 16 + 8 * j1));
            for r in 0..R {
                let t = _mm512_add_epi32(
                    _mm512_mullo_epi32(a0[r], sc0),
                    _mm512_mullo_epi32(a1[r], sc1),
                );
                isum[r] = _mm512_add_epi32(isum[r], t);
            }
        }
    }

    /// Q6_K's 6-bit weights at sub-block position `S` of 16 rows (as the 8-row `weights6`).
    #[inline(always)]
    pub(in super::super) unsafe fn weights<const S: usize>(
        qa: __m512i,
        qb: __m512i,
        qh: __m512i,
        low: __m512i,
    ) -> __m512i {
        // SAFETY: the caller's build enables AVX512F/BW.
        unsafe {
            let q = if S.is_multiple_of(2) { qa } else { qb };
            let nib = if S < 2 { q } else { _mm512_srli_epi16::<4>(q) };
            let hi = _mm512_and_si512(qh, _mm512_set1_epi8((3 << (2 * S)) as u8 as i8));
            let hi = match S {
                0 => _mm512_slli_epi16::<4>(hi),
                1 => _mm512_slli_epi16::<2>(hi),
                2 => hi,
                _ => _mm512_srli_epi16::<2>(hi),
            };
            _mm512_or_si512(_mm512_and_si512(nib, low), hi)
        }
    }
}
