//! Choices that follow the CPU's maker rather than its instruction set: on the two hosts the
//! kernels were measured on — AMD Zen 4 and Intel Xeon (Emerald Rapids), both 2 cores of a
//! shared machine — the same change went opposite ways.
//!
//! - Software prefetch of the weights at every row count. Intel's L2 streamer stops at each
//!   4 KiB page, so a product that streams weights leaves memory idle at every page unless it
//!   asks ahead: from memory (64 matrices of 8 960 × 1 536, 2 threads, the same binary
//!   alternating, median of 6 paired rounds), 1 activation row took 0.72× the time with 4 KiB
//!   asked ahead (Q4_K), Q6_K 0.72×, Q8_0 0.83×, Q5_0 0.86×, Q4_1 0.69×, and 4 rows 0.67–0.84×;
//!   a 1.5B decode step 78–84 → 60–65 ms (`arbor bench --verify-curve`, 1 node, three
//!   alternated pairs). The requests were later spread over each block's work and doubled
//!   by a second, farther one into the second-level cache (`x8::ask_step`): 1 row of Q4_K
//!   0.82–0.88× the time again, 8 rows of Q4_K 0.82–0.88×, of Q6_K 0.73–0.86×.
//!   On Zen 4, prefetching 1–8 KiB ahead with any hint
//!   lost at 1–4 rows and gained only at 8 (README, "Verification cost"), so there the kernels
//!   ask ahead only in 8-row passes over one group. The f32/f16 panels' kernels (`matmul`)
//!   follow the same choice: the 0.5B with f32 weights (2 GB a token) decoded at 5.2–7.9
//!   tok/s without and 8.3–10.3 with (five alternated pairs).
//! - Pairs of interleaved groups in 512-bit registers ([`x16`](super::x16)) for Q4_K and from 4
//!   activation rows. Intel's server cores run `vpdpbusd zmm` two per cycle, as many as the
//!   256-bit form (measured here: 0.20 ns per instruction either width), so a 512-bit one does
//!   twice the multiply-adds; Zen 4 splits it in two, and there Q4_K over pairs was no faster
//!   in cache and slower from memory. From memory on the Xeon, against one group at a time:
//!   Q4_K 8 rows 0.73–0.87×, 4–7 rows 0.91, 0.86, 0.77, 0.72×; Q6_K 4 and 6 rows 0.93×, 0.83×;
//!   Q4_1 0.88×, 0.77×; Q8_0 0.99×, 0.97×; Q5_0 1.05×, 0.81×.

/// What [`intel`] answers in tests that run both choices: 0 = the CPU's answer, 1 = yes,
/// 2 = no. The choices change speed only (the products are the same bits either way), so
/// tests running beside one that sets it see no difference.
#[cfg(test)]
pub(super) static AS_INTEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether the kernels take Intel's tuning: as `ARBOR_TUNING` says (`intel` or `other`; read
/// once per process — to compare the two in one build on a new host), else whether this CPU
/// is Intel's (CPUID vendor string "GenuineIntel").
pub(super) fn intel() -> bool {
    #[cfg(test)]
    match AS_INTEL.load(std::sync::atomic::Ordering::Relaxed) {
        1 => return true,
        2 => return false,
        _ => {}
    }
    static INTEL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INTEL.get_or_init(|| {
        match std::env::var("ARBOR_TUNING").ok().as_deref() {
            Some("intel") => return true,
            Some("other") => return false,
            _ => {}
        }
        vendor_is_intel()
    })
}

/// Whether CPUID names Intel as this CPU's maker.
fn vendor_is_intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
        #[allow(unused_unsafe)]
        let id = unsafe { std::arch::x86_64::__cpuid(0) };
        (id.ebx, id.edx, id.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e)
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the interleaved kernels ask for the weights ahead at every row count (else only
/// in 8-row passes over one group).
pub(crate) fn prefetch_every_row() -> bool {
    intel()
}

/// Whether Q4_K takes pairs of groups too, and every type from 4 activation rows (else only
/// the 8-row passes of the other types and the tails after them).
pub(super) fn full_width_pairs() -> bool {
    intel()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_vendor_is_read_from_cpuid() {
        // "GenuineIntel" as CPUID leaf 0 spells it, in EBX, EDX, ECX.
        let bytes: Vec<u8> = [0x756e_6547u32, 0x4965_6e69, 0x6c65_746e]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(&bytes, b"GenuineIntel");
        #[cfg(target_arch = "x86_64")]
        {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            if cpuinfo.contains("GenuineIntel") {
                assert!(super::vendor_is_intel());
            } else if cpuinfo.contains("AuthenticAMD") {
                assert!(!super::vendor_is_intel());
            }
        }
    }
}
