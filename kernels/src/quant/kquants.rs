//! Decoders for one 256-element super-block of the k-quant formats.

use super::blocks::half;

/// 6-bit scale and min number `j` (0..8) packed in the 12-byte `scales` of Q4_K/Q5_K.
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (f32::from(sc), f32::from(m))
}

/// All 8 six-bit scales and 8 minimums packed in the 12-byte `scales` of Q4_K/Q5_K.
pub(crate) fn scales_mins_k4(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    let ints = |j| {
        let (s, m) = scale_min_k4(j, q);
        (s as u8, m as u8)
    };
    (
        std::array::from_fn(|j| ints(j).0),
        std::array::from_fn(|j| ints(j).1),
    )
}

/// The 12 packed bytes of six-bit `sc` and `mn` (the inverse of [`scales_mins_k4`]).
pub(crate) fn pack_scales_mins_k4(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for i in 0..4 {
        q[i] = sc[i] | ((sc[i + 4] >> 4) << 6);
        q[i + 4] = mn[i] | ((mn[i + 4] >> 4) << 6);
        q[i + 8] = (sc[i + 4] & 0xF) | ((mn[i + 4] & 0xF) << 4);
    }
    q
}

/// Scale and min of the two 32-element sub-blocks of 64-element `chunk` (0..4), already
/// multiplied by the super-block's `d` and `dmin` (Q4_K and Q5_K share this layout).
#[inline]
fn chunk_scales(b: &[u8], chunk: usize) -> [(f32, f32); 2] {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let scales = &b[4..16];
    [2 * chunk, 2 * chunk + 1].map(|j| {
        let (sc, m) = scale_min_k4(j, scales);
        (d * sc, dmin * m)
    })
}

/// `block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; }`.
pub(super) fn q4_k(b: &[u8], y: &mut [f32]) {
    let qs = &b[16..144];
    for chunk in 0..4 {
        let [(d1, m1), (d2, m2)] = chunk_scales(b, chunk);
        let q = &qs[32 * chunk..32 * chunk + 32];
        let out = &mut y[64 * chunk..64 * chunk + 64];
        for l in 0..32 {
            out[l] = d1 * f32::from(q[l] & 0xF) - m1;
            out[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

/// `block_q5_K { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; }`.
pub(super) fn q5_k(b: &[u8], y: &mut [f32]) {
    let qh = &b[16..48];
    let qs = &b[48..176];
    for chunk in 0..4 {
        let [(d1, m1), (d2, m2)] = chunk_scales(b, chunk);
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        let q = &qs[32 * chunk..32 * chunk + 32];
        let out = &mut y[64 * chunk..64 * chunk + 64];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16.0 } else { 0.0 };
            let h2 = if qh[l] & u2 != 0 { 16.0 } else { 0.0 };
            out[l] = d1 * (f32::from(q[l] & 0xF) + h1) - m1;
            out[l + 32] = d2 * (f32::from(q[l] >> 4) + h2) - m2;
        }
    }
}

/// `block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }`.
pub(super) fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = half(b, 208);
    for half_block in 0..2 {
        let ql = &b[64 * half_block..64 * half_block + 64];
        let qh = &b[128 + 32 * half_block..128 + 32 * half_block + 32];
        let sc = &b[192 + 8 * half_block..192 + 8 * half_block + 8];
        let out = &mut y[128 * half_block..128 * half_block + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = i32::from((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            let s = |k: usize| d * f32::from(sc[is + k] as i8);
            out[l] = s(0) * q1 as f32;
            out[l + 32] = s(2) * q2 as f32;
            out[l + 64] = s(4) * q3 as f32;
            out[l + 96] = s(6) * q4 as f32;
        }
    }
}
