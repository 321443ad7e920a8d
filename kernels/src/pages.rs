//! Weight buffers in 2 MiB pages where the OS gives them (Linux transparent huge pages).
//!
//! A decode step streams every weight once, ~1 GB for a 1.5B Q4_K_M model. In 4 KiB pages
//! that is a TLB miss and a page walk every 4 KiB, and a fresh start for the hardware
//! prefetcher at every page boundary. Distributions often set THP to `madvise` (only regions
//! that ask get huge pages), so the packed weight matrices ask: [`with_capacity`] reserves the
//! buffer and marks the 2 MiB-aligned part of it `MADV_HUGEPAGE` before anything is written,
//! so the first touch faults in huge pages. Elsewhere (other systems, THP `never`, small
//! buffers) it is a plain `Vec::with_capacity`: the advice changes speed, never contents.
//!
//! ```
//! let mut w = arbor_kernels::pages::with_capacity(8 << 20);
//! w.extend_from_slice(&[1u8; 1024]);
//! assert_eq!(w.len(), 1024);
//! assert!(w.capacity() >= 8 << 20);
//! ```

/// The huge page size this module aligns its advice to.
pub const HUGE_PAGE: usize = 2 << 20;

/// A byte buffer with room for `bytes`, its whole 2 MiB pages advised to be huge pages where
/// the OS supports that (buffers under one huge page are left alone).
pub fn with_capacity(bytes: usize) -> Vec<u8> {
    let v = Vec::with_capacity(bytes);
    if bytes >= HUGE_PAGE && std::env::var_os("ARBOR_NOHUGE").is_none() {
        advise(v.as_ptr(), v.capacity());
    }
    v
}

/// `madvise(MADV_HUGEPAGE)` over the huge pages wholly inside `len` bytes from `ptr`; errors
/// (a kernel without THP) are ignored: the buffer then stays in small pages.
#[cfg(target_os = "linux")]
fn advise(ptr: *const u8, len: usize) {
    let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
    let end = (ptr as usize + len) / HUGE_PAGE * HUGE_PAGE;
    if end > start {
        // SAFETY: the range lies inside an allocation this process owns; MADV_HUGEPAGE only
        // changes how its pages are backed, not what they hold.
        let _ = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_: *const u8, _: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advised_buffers_hold_what_is_written() {
        let n = 3 * HUGE_PAGE + 12_345;
        let mut v = with_capacity(n);
        v.extend((0..n).map(|i| (i * 7 % 251) as u8));
        assert_eq!(v.len(), n);
        assert!(v.iter().enumerate().all(|(i, &b)| b == (i * 7 % 251) as u8));
        assert!(with_capacity(100).capacity() >= 100);
        assert_eq!(with_capacity(0).capacity(), 0);
    }
}
