//! This machine's roofline, measured: how fast memory streams and how many int8
//! multiply-adds the cores retire, on all of rayon's threads. A decode step reads every
//! weight once, so its floor is `weight bytes / bandwidth`; verifying a tree of `n` nodes
//! multiplies `n` rows by the same weights, so its floor is the larger of that and
//! `n · MACs per token / int8 peak` — where the two meet is the tree size beyond which a
//! bigger tree costs time in proportion (Sequoia's hardware-aware tree size).
//!
//! ```
//! let r = arbor_kernels::roofline::Roofline::measure(1 << 20);
//! assert!(r.read_bytes_per_sec > 0.0 && r.int8_macs_per_sec > 0.0);
//! ```

use std::time::Instant;

use rayon::prelude::*;

use crate::qmatmul::Isa;

/// Measured limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Roofline {
    /// Bytes per second read by all threads from a buffer far larger than the caches.
    pub read_bytes_per_sec: f64,
    /// int8 multiply-adds per second (the instruction the quantized kernels use: `vpdpbusd`
    /// with AVX-512 VNNI, `vpmaddubsw` with AVX2, plain integer code elsewhere).
    pub int8_macs_per_sec: f64,
    /// Threads measured on.
    pub threads: usize,
}

impl Roofline {
    /// Measures both limits (best of three runs each); `bytes` sizes the read (use several
    /// times the last-level cache: ~0.5 GB here).
    pub fn measure(bytes: usize) -> Self {
        Self {
            read_bytes_per_sec: read_bandwidth(bytes),
            int8_macs_per_sec: int8_peak(),
            threads: rayon::current_num_threads(),
        }
    }

    /// Seconds to stream `bytes` once.
    pub fn memory_secs(&self, bytes: f64) -> f64 {
        bytes / self.read_bytes_per_sec
    }

    /// Seconds for `macs` int8 multiply-adds at the peak.
    pub fn compute_secs(&self, macs: f64) -> f64 {
        macs / self.int8_macs_per_sec
    }
}

/// Bytes per second of a parallel read of `bytes` (best of three, after touching the pages;
/// on x86-64 the better of a plain read and one that asks for each line ahead as the
/// quantized kernels do, [`crate::prefetch::ask_line`] — which
/// on the Xeon read 23–26 GB/s against 13–15 plain: the plain read alone had put the one-row
/// step below its "floor").
fn read_bandwidth(bytes: usize) -> f64 {
    let words: Vec<u64> = (0..(bytes / 8).max(1) as u64).collect();
    let mut best = f64::INFINITY;
    for ahead in [false, cfg!(target_arch = "x86_64")] {
        for _ in 0..3 {
            let t0 = Instant::now();
            let x = words
                .par_chunks(1 << 16)
                .map(|c| {
                    c.chunks(8).fold(0u64, |a, line| {
                        if ahead {
                            crate::prefetch::ask_line(line.as_ptr().cast());
                        }
                        line.iter().fold(a, |a, &w| a ^ w)
                    })
                })
                .reduce(|| 0, |a, b| a ^ b);
            std::hint::black_box(x);
            best = best.min(t0.elapsed().as_secs_f64());
        }
    }
    (words.len() * 8) as f64 / best
}

/// int8 multiply-adds per second on every thread at once (best of three; with VNNI, the
/// better of 256- and 512-bit `vpdpbusd`: the kernels use both, and a 512-bit one does twice
/// the work where the core runs it at full width — Intel's server cores — and the same on
/// Zen 4).
fn int8_peak() -> f64 {
    const ITERS: u64 = 1 << 20;
    let threads = rayon::current_num_threads();
    let isa = Isa::best();
    let widths: &[bool] = if isa.vnni() { &[false, true] } else { &[false] };
    let mut best = f64::INFINITY;
    for &wide in widths {
        for _ in 0..3 {
            let t0 = Instant::now();
            let macs: u64 = (0..threads)
                .into_par_iter()
                .map(|t| macs_on_one_thread(isa, wide, ITERS, t as i32))
                .sum();
            best = best.min(t0.elapsed().as_secs_f64() / macs as f64);
        }
    }
    1.0 / best
}

/// Runs `iters` rounds of independent multiply-add chains (512-bit ones where `wide` and
/// `isa` has VNNI); returns the MACs done.
fn macs_on_one_thread(isa: Isa, wide: bool, iters: u64, seed: i32) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        // SAFETY: `Isa::best` picked a kernel this CPU runs (AVX-512 F/BW with VNNI).
        return unsafe {
            match (isa.vnni(), wide) {
                (true, true) => x86::vnni512(iters, seed),
                (true, false) => x86::vnni(iters, seed),
                _ => x86::avx2(iters, seed),
            }
        };
    }
    let _ = (isa, wide);
    let mut acc = [seed; 16];
    for i in 0..iters {
        for (j, a) in acc.iter_mut().enumerate() {
            *a = a.wrapping_add((i as i32 & 127) * (j as i32 - 64));
        }
    }
    std::hint::black_box(acc);
    iters * 16
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Chains in flight: enough to cover the instruction's latency on every port.
    const CHAINS: usize = 12;

    /// # Safety
    /// The CPU must support AVX512-VNNI and AVX512VL.
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    pub(super) unsafe fn vnni(iters: u64, seed: i32) -> u64 {
        let u = _mm256_set1_epi8(7);
        let s = _mm256_set1_epi32(seed | 0x0101_0101);
        let mut acc = [_mm256_setzero_si256(); CHAINS];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_dpbusd_epi32(*a, u, s);
            }
        }
        std::hint::black_box(acc);
        iters * CHAINS as u64 * 32
    }

    /// [`vnni`] in 512-bit registers.
    ///
    /// # Safety
    /// The CPU must support AVX512F and AVX512-VNNI.
    #[target_feature(enable = "avx2,avx512f,avx512vnni")]
    pub(super) unsafe fn vnni512(iters: u64, seed: i32) -> u64 {
        let u = _mm512_set1_epi8(7);
        let s = _mm512_set1_epi32(seed | 0x0101_0101);
        let mut acc = [_mm512_setzero_si512(); CHAINS];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_dpbusd_epi32(*a, u, s);
            }
        }
        std::hint::black_box(acc);
        iters * CHAINS as u64 * 64
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2(iters: u64, seed: i32) -> u64 {
        let u = _mm256_set1_epi8(7);
        let s = _mm256_set1_epi32(seed | 0x0101_0101);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_si256(); CHAINS];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones);
                *a = _mm256_add_epi32(*a, p);
            }
        }
        std::hint::black_box(acc);
        iters * CHAINS as u64 * 32
    }
}
