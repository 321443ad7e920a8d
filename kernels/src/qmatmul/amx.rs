//! Q4_K and Q6_K times several activation rows on Intel's AMX tile unit (AMX-INT8: Sapphire
//! Rapids and later), for tree verification and prefill; one row stays on the VNNI kernels.
//!
//! With VNNI, 8 activation rows of Q4_K cost one 8-lane `vpdpbusd` per row and per 4 weights
//! of 8 outputs, plus a broadcast of the activations for each — bound by those instructions
//! well before memory (README, "Verification cost"). A tile product (`tdpbsud`) multiplies
//! up to 16 activation rows by 64 weights of 16 outputs in one instruction; what is left is
//! laying the weights out as tile bytes.
//!
//! Per chunk of 64 weights of two interleaved groups (16 outputs, [`x8`](super::x8)'s layout
//! as stored), the two groups' nibbles are put side by side as the rows of two weight
//! tiles, each weight times one of two factors of its sub-block's 6-bit scale `s`
//! (`s mod 16`, `s div 16`: `vpmullw` on byte pairs, the products stay bytes); the
//! activations' 64-byte spans are loaded as tiles straight from the quantized rows. A
//! super-block's four chunks sum into two tiles (`Σ x·q·s` = first + 16 · second), read back
//! once per block. A first version kept one tile of sums per sub-block of 32 weights and
//! scaled them with vector multiplies: a tile store of 8 rows cost as much as 1.5 products
//! and did not overlap them, and 8 rows ran no faster than VNNI.
//!
//! Integers are exact, and the super-block's float arithmetic is the VNNI kernel's, lane for
//! lane: results are bit for bit those of the other builds, whatever the number of rows.
//! Measured (one thread, 16 outputs × 1536 in L2, ns per super-block of 16 outputs, VNNI →
//! AMX): 1 row 55 → 127, 4 rows 133 → 141, 8 rows 253 → 177, 16 rows 507 → 251 — a fixed
//! ~120 ns for the layout (128 `vpmullw` and 128 stores of 64 bytes) against ~31 ns per row
//! on VNNI; from memory, where the weights' arrival sets the pace, 3 rows or more gain
//! ([`takes`]).
//!
//! Q6_K the same way, its 6-bit weights and signed 8-bit scales as one signed 16-bit product
//! per weight cut into a low (unsigned) and a high (signed) byte ([`dot16`]).
//!
//! The weights are asked for ahead as the VNNI kernels ask for them (`x8::ask_step`, a
//! share of each block's lines per chunk): from memory (2 threads, 64 and 44 matrices of
//! 1536 × 8960, three alternated pairs of builds on a busy host) 8 rows of Q4_K took
//! 0.81–0.98 ms against 1.05–1.22 without, of Q6_K 0.86–1.32 against 1.15–1.38.
//!
//! Linux hands out the tile state on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, once per
//! process); elsewhere, or where that is refused, [`available`] says no.

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{ROWS, available, dot16};

#[cfg(target_arch = "x86_64")]
use crate::quant::GgmlType;

/// Whether `m` activation rows of a matrix of `ty` go to the tile products under
/// [`Isa::Amx`](super::Isa::Amx), and which family `matmul_fused` tries first before it
/// has timed both (see `choice`; a later host read quite other figures): Q4_K from 3
/// rows, Q6_K from 3 rows but 8 (the VNNI build's 8-row pass over pairs of groups is its best
/// case). From memory (40 matrices of 8960 × 1536, 2 threads, fastest of 7, VNNI → AMX):
/// Q4_K 5 rows 29.0 → 23.3 ms, 8: 28.1 → 25.2, 16: 44.3 → 31.0, 32: 80.7 → 50.6, 1–4 rows
/// alike (memory-bound); Q6_K 3 rows 41.8–42.4 → 40.6–41.5, 4: 44.4–45.2 → 41.7–41.8, 6: 50.2
/// → 41.8, 8: 40.7–41.1 → 43.1–43.8, 12: 53.2–53.3 → 45.2–46.5, 16: 59.8 → 43.8, 32: 104.1 →
/// 66.3 (Q6_K's layout — 6-bit weights, signed 16-bit products — is the heavier of the two).
/// In the cache Q4_K's tiles pay only from 5 rows (their fixed cost is the layout); in the
/// 1.5B (`arbor bench --verify-curve`, three alternated pairs, 4 nodes over 1 node) Q4_K
/// from 5 rows read 1.72, 1.91, 1.71, from 3 rows 1.57, 1.56, 1.70. Since the VNNI kernels
/// prefetch at every row count and take Q4_K over pairs of groups on Intel
/// ([`tuning`](super::tuning)), they beat the tiles from memory at 4 and 8 rows (in one
/// process, against the VNNI kernels before: 0.65× and 0.74× the time, the tiles 1.19× and
/// 0.96×); which runs is then the measured choice's call, matrix by matrix.
#[cfg(target_arch = "x86_64")]
pub(super) fn takes(ty: GgmlType, m: usize) -> bool {
    match ty {
        GgmlType::Q4_K => m >= 3,
        GgmlType::Q6_K => m >= 3 && m != 8,
        _ => false,
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;
    use std::sync::OnceLock;

    use super::super::acts::ActRow;
    use super::super::tuning::prefetch_every_row;
    use super::super::x8::{BLOCK, BLOCK6, QS, QS6, ask_step};
    use super::super::x16::{both, both8, weights6};
    use crate::quant::GgmlType;

    /// Most activation rows per tile product.
    pub(in super::super) const ROWS: usize = 16;

    /// Whether this CPU and OS run the tile products (asks the OS for the tile state the
    /// first time).
    pub(in super::super) fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| super::super::avx2::vnni_available() && has_amx() && request_tiles())
    }

    /// CPUID leaf 7: AMX-TILE (EDX bit 24) and AMX-INT8 (bit 25).
    #[allow(unused_unsafe)]
    fn has_amx() -> bool {
        // SAFETY: CPUID exists on every x86-64 CPU.
        let (max, edx) = unsafe { (__cpuid(0).eax, __cpuid_count(7, 0).edx) };
        max >= 7 && edx & (1 << 24) != 0 && edx & (1 << 25) != 0
    }

    /// Asks Linux for the tile data state (XTILEDATA) for this process.
    #[cfg(target_os = "linux")]
    fn request_tiles() -> bool {
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` only widens which
        // register state this process may use; the `syscall` instruction clobbers rcx and r11.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    }

    #[cfg(not(target_os = "linux"))]
    fn request_tiles() -> bool {
        false
    }

    /// The tile shapes (`ldtilecfg`'s 64-byte operand, palette 1): tmm0 and tmm1 hold
    /// `rows` × 16 i32 sums, tmm4 and tmm5 `rows` × 64 activation bytes, tmm2, tmm3, tmm6 and
    /// tmm7 weights, 16 rows of 16 outputs × 4 bytes (even chunks in tmm4, tmm6 and tmm7, odd
    /// ones in tmm5, tmm2 and tmm3, so that a chunk's loads need not wait for the last
    /// chunk's products to have read their tiles).
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    impl TileConfig {
        fn new(rows: usize) -> Self {
            let mut c = Self {
                palette: 1,
                start_row: 0,
                reserved: [0; 14],
                colsb: [0; 16],
                rows: [0; 16],
            };
            let rows = u8::try_from(rows).expect("at most ROWS rows");
            let weights = [(2, 16), (3, 16), (6, 16), (7, 16)];
            for (t, rows) in [(0, rows), (1, rows), (4, rows), (5, rows)]
                .into_iter()
                .chain(weights)
            {
                c.colsb[t] = 64;
                c.rows[t] = rows;
            }
            c
        }
    }

    /// 64-byte aligned scratch for tiles to load from and store to.
    #[repr(C, align(64))]
    struct Aligned<T>(T);

    /// Weight tiles of one block: per chunk `c` of 64 weights, `q·(s mod 16)` then
    /// `q·(s div 16)` (16 rows of 64 bytes each).
    type Weights = [[[u8; 1024]; 2]; 4];

    /// A block's two tiles of sums (first and second scale factors), `ROWS` rows each.
    type Sums = [[[i32; 16]; ROWS]; 2];

    /// The formats [`run`] takes, as its const parameter.
    const Q4K: u8 = 0;
    const Q6K: u8 = 1;

    /// Interleaved groups `g0` and `g1` of `ty` (Q4_K or Q6_K, see [`takes`](super::takes))
    /// times the activation rows `x` (`R` ≤ [`ROWS`]), added to `out`: `out[r][l]` += row
    /// `l` of `g0` (`l < 8`) or row `l − 8` of `g1` · `x[r]`, summed as the VNNI kernels sum
    /// them.
    ///
    /// Q4_K: each 6-bit sub-block scale `s` enters the weight bytes as two factors, `s mod 16`
    /// and `s div 16` (`q·(s mod 16)` ≤ 225 and `q·(s div 16)` ≤ 45 are bytes): a
    /// super-block's 256 weights then sum into two tiles, `Σ x·q·s` = first + 16 · second,
    /// exact — two tile stores per block instead of one per sub-block (a store of 8 rows had
    /// cost as much as one and a half products, and did not overlap them). Q6_K: each
    /// weight's signed product with its sub-block's scale, `(q − 32)·s` (|·| ≤ 4096, 16 bits
    /// from `vpmullw`), is cut into its low byte (unsigned) and high byte (signed): two tiles
    /// again, `Σ x·(q − 32)·s` = low + 256 · high (`tdpbsud` and `tdpbssd`), exact.
    ///
    /// # Safety
    /// [`available`]; `g0` and `g1` hold the same number of whole interleaved blocks of `ty`
    /// covering the rows' length; row `r`'s bytes start `r · stride` bytes after row 0's.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(in super::super) unsafe fn dot16<const R: usize>(
        ty: GgmlType,
        g0: &[u8],
        g1: &[u8],
        x: &[ActRow<'_>; R],
        stride: usize,
        out: &mut [[f32; 16]; R],
    ) {
        debug_assert!(matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K));
        // SAFETY: forwarded from the caller.
        unsafe {
            if ty == GgmlType::Q4_K {
                run::<Q4K, R>(g0, g1, x, stride, out);
            } else {
                run::<Q6K, R>(g0, g1, x, stride, out);
            }
        }
    }

    /// The tile products of format `F` ([`Q4K`], [`Q6K`]) for [`dot16`].
    ///
    /// # Safety
    /// As [`dot16`], and the caller's build enables AVX-512 (BW, VL) and F16C.
    #[inline(always)]
    unsafe fn run<const F: u8, const R: usize>(
        g0: &[u8],
        g1: &[u8],
        x: &[ActRow<'_>; R],
        stride: usize,
        out: &mut [[f32; 16]; R],
    ) {
        debug_assert!(R <= ROWS && g0.len() == g1.len());
        debug_assert!(
            (0..R).all(|r| x[r].q.as_ptr() as usize == x[0].q.as_ptr() as usize + r * stride)
        );
        let bytes = if F == Q4K { BLOCK } else { BLOCK6 };
        // Lays out block `bi`'s weights for chunk `c` (Q6_K: both chunks of half `c / 2`, at
        // its odd chunk) into the 2 KiB per chunk at `w`.
        let layout = |p0: *const u8, p1: *const u8, c: usize, w: *mut u8| {
            // SAFETY: forwarded from the caller: whole blocks, 64-byte aligned scratch.
            unsafe {
                if F == Q4K {
                    weight_chunk(p0, p1, c, w.add(2048 * c));
                } else if c % 2 == 1 {
                    weight_half6(p0, p1, c / 2, w.add(2048 * (c - 1)));
                }
            }
        };
        // SAFETY: forwarded from the caller: tiles are configured before use; the tile loads
        // read `R` rows of 64 bytes inside the activation rows (block `bi` of each) and 16
        // rows of 64 bytes inside `w`; the stores write `R` rows of 64 bytes inside `sums`.
        unsafe {
            let cfg = TileConfig::new(R);
            asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
            // A tile load waits for the stores it reads to reach the cache, vector loads of a
            // tile store wait for it, and tile instructions wait long for their data: each
            // block's products are issued chunk by chunk between the vector work of laying
            // out the next block's weights (in the other half of `w`), and its sums are read
            // back one block later.
            // Scratch, written before it is read (left uninitialized: zeroing 20 KiB per call
            // had cost more than the products of a short row).
            let mut w = MaybeUninit::<Aligned<[Weights; 2]>>::uninit();
            let mut sums = MaybeUninit::<Aligned<[Sums; 2]>>::uninit();
            let wp = w.as_mut_ptr().cast::<Weights>();
            let sp = sums.as_mut_ptr().cast::<Sums>();
            let nb = g0.len() / bytes;
            // The weights asked for ahead as the VNNI kernels ask for them (`x8::ask_step`).
            let spread = prefetch_every_row();
            let block = |bi: usize| (g0.as_ptr().add(bytes * bi), g1.as_ptr().add(bytes * bi));
            let x0 = x[0].q.as_ptr();
            if nb > 0 {
                let (p0, p1) = block(0);
                for c in 0..4 {
                    layout(p0, p1, c, wp.cast::<u8>());
                }
            }
            for bi in 0..=nb {
                if bi < nb {
                    let (cur, next) = (bi % 2, 1 - bi % 2);
                    let xa = x0.add(256 * bi);
                    asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
                    let (p0, p1) = block(bi);
                    for c in 0..4 {
                        if spread {
                            ask_step(p0, bytes, c, 4);
                            ask_step(p1, bytes, c, 4);
                        }
                        let tiles = wp.add(cur).cast::<u8>().add(2048 * c);
                        chunk_products::<F>(c % 2 == 0, xa.add(64 * c), stride, tiles);
                        if bi + 1 < nb {
                            let (q0, q1) = block(bi + 1);
                            layout(q0, q1, c, wp.add(next).cast::<u8>());
                        }
                    }
                    asm!(
                        "tilestored [{c} + {s}*1], tmm0",
                        "tilestored [{c} + {s}*1 + 1024], tmm1",
                        c = in(reg) sp.add(cur),
                        s = in(reg) 64usize,
                        options(nostack),
                    );
                }
                if bi > 0 {
                    let bp = bi - 1;
                    let (p0, p1) = block(bp);
                    block_sums::<F, R>(p0, p1, bp, x, &*sp.add(bp % 2), out);
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    }

    /// Block `bi`'s tile sums (`sums`, [`chunk_products`]: Q4_K's first and second scale
    /// factors, Q6_K's low and high bytes) with its scales (and Q4_K's minimums), added to
    /// `out` as the VNNI kernels add them.
    ///
    /// # Safety
    /// `p0` and `p1` are whole interleaved blocks of format `F`, block `bi` of the activation
    /// rows `x`; the build enables AVX-512 and F16C.
    #[inline(always)]
    unsafe fn block_sums<const F: u8, const R: usize>(
        p0: *const u8,
        p1: *const u8,
        bi: usize,
        x: &[ActRow<'_>; R],
        sums: &Sums,
        out: &mut [[f32; 16]; R],
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            let [s0, s1] = sums;
            let d = halves_ps(p0, p1, 0);
            if F == Q6K {
                for r in 0..R {
                    let isum = _mm512_add_epi32(
                        _mm512_load_si512(s0[r].as_ptr().cast()),
                        _mm512_slli_epi32::<8>(_mm512_load_si512(s1[r].as_ptr().cast())),
                    );
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(*x[r].d.get_unchecked(bi)));
                    let acc = _mm512_loadu_ps(out[r].as_ptr());
                    _mm512_storeu_ps(
                        out[r].as_mut_ptr(),
                        _mm512_add_ps(acc, _mm512_mul_ps(_mm512_cvtepi32_ps(isum), scale)),
                    );
                }
                return;
            }
            let dmin = halves_ps(p0, p1, 16);
            let mins: [__m512i; 4] = std::array::from_fn(|c| {
                let m0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(p0.add(96 + 16 * c).cast()));
                let m1 = _mm256_cvtepu8_epi16(_mm_loadu_si128(p1.add(96 + 16 * c).cast()));
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(m0), m1)
            });
            for r in 0..R {
                let isum = _mm512_add_epi32(
                    _mm512_load_si512(s0[r].as_ptr().cast()),
                    _mm512_slli_epi32::<4>(_mm512_load_si512(s1[r].as_ptr().cast())),
                );
                let mut imin = _mm512_setzero_si512();
                for (c, m) in mins.iter().enumerate() {
                    let pair = *x[r].sum32x2.get_unchecked(bi * 4 + c);
                    imin = _mm512_add_epi32(imin, _mm512_madd_epi16(*m, _mm512_set1_epi32(pair)));
                }
                let dx = _mm512_set1_ps(*x[r].d.get_unchecked(bi));
                let sum = _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, dx));
                let min = _mm512_mul_ps(_mm512_cvtepi32_ps(imin), _mm512_mul_ps(dmin, dx));
                let acc = _mm512_loadu_ps(out[r].as_ptr());
                _mm512_storeu_ps(
                    out[r].as_mut_ptr(),
                    _mm512_add_ps(acc, _mm512_sub_ps(sum, min)),
                );
            }
        }
    }

    /// Chunk `c` (64 weights) of one block of two groups (`p0`, `p1`) as its two weight
    /// tiles ([`Weights`]): row `i` holds weights `64c + 4i..+4` (low nibbles for `i < 8`,
    /// then the high nibbles', `64c + 32 + 4(i − 8)..`) of 16 outputs, 8 from each group,
    /// times the first or the second factor of its sub-block's scale.
    ///
    /// # Safety
    /// `p0` and `p1` are whole interleaved Q4_K blocks; the build enables AVX-512.
    #[inline(always)]
    unsafe fn weight_chunk(p0: *const u8, p1: *const u8, c: usize, tiles: *mut u8) {
        // SAFETY: forwarded from the caller; every store is 64 bytes inside the 2 KiB at
        // `tiles` (64-byte aligned: [`Aligned`]).
        unsafe {
            let low = _mm512_set1_epi8(0x0F);
            // Each output's scale in both 16-bit halves of its 4 bytes: `vpmullw` then
            // multiplies each byte by it (products below 256 do not carry).
            let factors = |at: usize| {
                let s = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(
                    _mm_loadl_epi64(p0.add(at).cast()),
                    _mm_loadl_epi64(p1.add(at).cast()),
                ));
                let s = _mm512_or_si512(s, _mm512_slli_epi32::<16>(s));
                (
                    _mm512_and_si512(s, _mm512_set1_epi16(0x0F)),
                    _mm512_srli_epi16::<4>(s),
                )
            };
            let (lo0, lo1) = factors(32 + 16 * c);
            let (hi0, hi1) = factors(40 + 16 * c);
            let (t0, t1) = (tiles, tiles.add(1024));
            for u in 0..4 {
                let at = QS + 256 * c + 64 * u;
                let a = _mm512_loadu_si512(p0.add(at).cast());
                let b = _mm512_loadu_si512(p1.add(at).cast());
                for (i, row) in [
                    (2 * u, _mm512_shuffle_i64x2::<0x44>(a, b)),
                    (2 * u + 1, _mm512_shuffle_i64x2::<0xEE>(a, b)),
                ] {
                    let ql = _mm512_and_si512(row, low);
                    let qh = _mm512_and_si512(_mm512_srli_epi16::<4>(row), low);
                    let (l, h) = (64 * i, 64 * (i + 8));
                    _mm512_store_si512(t0.add(l).cast(), _mm512_mullo_epi16(ql, lo0));
                    _mm512_store_si512(t1.add(l).cast(), _mm512_mullo_epi16(ql, lo1));
                    _mm512_store_si512(t0.add(h).cast(), _mm512_mullo_epi16(qh, hi0));
                    _mm512_store_si512(t1.add(h).cast(), _mm512_mullo_epi16(qh, hi1));
                }
            }
        }
    }

    /// One chunk's tile products: its activations (64 bytes of each row, rows `stride`
    /// apart from `xa`) times its two weight tiles, added to tmm0 (first tile, unsigned
    /// bytes) and tmm1 (second; unsigned for [`Q4K`], signed for [`Q6K`]). Even chunks use
    /// tmm4, tmm6 and tmm7, odd ones tmm5, tmm2 and tmm3.
    ///
    /// # Safety
    /// Tiles configured by [`TileConfig::new`]; `xa` starts 64 bytes inside every row; `w`
    /// holds the chunk's two 1 KiB tiles.
    #[inline(always)]
    unsafe fn chunk_products<const F: u8>(even: bool, xa: *const i8, stride: usize, w: *const u8) {
        macro_rules! products {
            ($a:literal, $w0:literal, $w1:literal, $second:literal) => {
                asm!(
                    concat!("tileloadd ", $a, ", [{x} + {xs}*1]"),
                    concat!("tileloadd ", $w0, ", [{w0} + {s}*1]"),
                    concat!("tileloadd ", $w1, ", [{w1} + {s}*1]"),
                    concat!("tdpbsud tmm0, ", $a, ", ", $w0),
                    concat!($second, " tmm1, ", $a, ", ", $w1),
                    x = in(reg) xa,
                    xs = in(reg) stride,
                    w0 = in(reg) w,
                    w1 = in(reg) w.add(1024),
                    s = in(reg) 64usize,
                    options(nostack, readonly),
                )
            };
        }
        // SAFETY: forwarded from the caller; loads stay in the rows' chunk and in `w`.
        unsafe {
            match (F == Q4K, even) {
                (true, true) => products!("tmm4", "tmm6", "tmm7", "tdpbsud"),
                (true, false) => products!("tmm5", "tmm2", "tmm3", "tdpbsud"),
                (false, true) => products!("tmm4", "tmm6", "tmm7", "tdpbssd"),
                (false, false) => products!("tmm5", "tmm2", "tmm3", "tdpbssd"),
            }
        }
    }

    /// Half `h` (128 weights: chunks `2h` and `2h + 1`) of one Q6_K block of two groups
    /// (`p0`, `p1`) as its weight tiles at `w` (2 KiB per chunk): row `i` of chunk `2h + c`
    /// holds weights `64(2h + c) + 4i..+4` of 16 outputs, 8 from each group, as the low
    /// bytes (first tile) and high bytes (second) of `(q − 32)·s`.
    ///
    /// # Safety
    /// `p0` and `p1` are whole interleaved Q6_K blocks; `w` is 4 KiB, 64-byte aligned; the
    /// build enables AVX-512 (BW).
    #[inline(always)]
    unsafe fn weight_half6(p0: *const u8, p1: *const u8, h: usize, w: *mut u8) {
        // SAFETY: forwarded from the caller; every store is 64 bytes inside `w`.
        unsafe {
            let low = _mm512_set1_epi8(0x0F);
            let bias = _mm512_set1_epi8(32);
            let (lo_bytes, hi_bytes) = (_mm512_set1_epi16(0x00FF), _mm512_set1_epi16(-256));
            for gq in 0..2 {
                // Sub-block `8h + 2S + gq`'s scales of the 16 outputs, in both 16-bit halves
                // of each output's 4 bytes.
                let scales: [__m512i; 4] = std::array::from_fn(|s| {
                    let v = _mm512_cvtepi8_epi32(both8(p0, p1, 16 + 8 * (8 * h + 2 * s + gq)));
                    _mm512_mask_blend_epi16(0xAAAA_AAAA, v, _mm512_slli_epi32::<16>(v))
                });
                for g in 4 * gq..4 * gq + 4 {
                    let at = QS6 + (h * 8 + g) * 96;
                    let (qa, qb, qh) = (
                        both(p0, p1, at),
                        both(p0, p1, at + 32),
                        both(p0, p1, at + 64),
                    );
                    let q = [
                        weights6::<0>(qa, qb, qh, low),
                        weights6::<1>(qa, qb, qh, low),
                        weights6::<2>(qa, qb, qh, low),
                        weights6::<3>(qa, qb, qh, low),
                    ];
                    for (s, (q, sc)) in q.into_iter().zip(scales).enumerate() {
                        // Signed weights, each byte of a 16-bit pair sign-extended on its own.
                        let q = _mm512_sub_epi8(q, bias);
                        let even = _mm512_srai_epi16::<8>(_mm512_slli_epi16::<8>(q));
                        let odd = _mm512_srai_epi16::<8>(q);
                        let pe = _mm512_mullo_epi16(even, sc);
                        let po = _mm512_mullo_epi16(odd, sc);
                        // (a & c) | b: low bytes in place, then the high bytes.
                        let lo = _mm512_ternarylogic_epi32::<0xEC>(
                            pe,
                            _mm512_slli_epi16::<8>(po),
                            lo_bytes,
                        );
                        let hi = _mm512_ternarylogic_epi32::<0xEC>(
                            po,
                            _mm512_srli_epi16::<8>(pe),
                            hi_bytes,
                        );
                        let row = w.add(2048 * (s / 2) + 64 * (8 * (s % 2) + g));
                        _mm512_store_si512(row.cast(), lo);
                        _mm512_store_si512(row.add(1024).cast(), hi);
                    }
                }
            }
        }
    }

    /// The 8 f16 at `at` of blocks `p0` and `p1` as 16 f32.
    #[inline(always)]
    unsafe fn halves_ps(p0: *const u8, p1: *const u8, at: usize) -> __m512 {
        // SAFETY: the caller's pointers are whole blocks; the build enables AVX-512 and F16C.
        unsafe {
            let h = _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_loadu_si128(p0.add(at).cast())),
                _mm_loadu_si128(p1.add(at).cast()),
            );
            _mm512_cvtph_ps(h)
        }
    }
}
