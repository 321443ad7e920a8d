//! The weights' cache-line requests ahead of use, shared by the quantized kernels
//! (`qmatmul`), the f32/f16 panels (`matmul`) and the roofline's read (which must stream as
//! the kernels do to be their floor): one line asked for [`NEAR`] bytes ahead into the
//! first-level cache and [`FAR`] bytes ahead into the second. On x86-64; a no-op elsewhere.
//!
//! Measured on the Intel Xeon (README, "Requests spread over the work, and a far one into
//! L2"): the far request beside the near one took one row of Q4_K from memory to 0.82–0.93×
//! the time, 8 rows of Q6_K to 0.64–0.87×; the far one alone, or 32 KiB ahead, read 0.95–1.06×
//! the kept pair.

/// How far ahead [`ask_line`] asks into the first-level cache.
pub(crate) const NEAR: usize = 4096;

/// How far ahead [`ask_line`] asks into the second-level cache.
pub(crate) const FAR: usize = 16384;

/// Asks for the line [`NEAR`] bytes past `p` into the first-level cache and the one [`FAR`]
/// bytes past it into the second (past the end of the data too: a prefetch has no
/// architectural effect, and the address is only computed, never dereferenced).
#[inline(always)]
pub(crate) fn ask_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1, _mm_prefetch};
        // SAFETY: SSE is part of x86-64; prefetching any address is architecturally invisible.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(NEAR).cast());
            _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(FAR).cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
