//! Decoders for one block of the 32-element formats and the plain float types.
//! Each takes exactly one block's bytes and fills exactly one block of output.

use half::{bf16 as Bf16, f16 as F16};

/// The little-endian f16 at byte `at` of `b`, as f32.
#[inline]
pub(crate) fn half(b: &[u8], at: usize) -> f32 {
    F16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

pub(super) fn f32(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

pub(super) fn f16(b: &[u8], y: &mut [f32]) {
    y[0] = half(b, 0);
}

pub(super) fn bf16(b: &[u8], y: &mut [f32]) {
    y[0] = Bf16::from_le_bytes([b[0], b[1]]).to_f32();
}

/// `block_q4_0 { f16 d; u8 qs[16]; }`: y = (q - 8)·d, low nibbles first.
pub(super) fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = (i32::from(qs[j] & 0xF) - 8) as f32 * d;
        y[j + 16] = (i32::from(qs[j] >> 4) - 8) as f32 * d;
    }
}

/// `block_q4_1 { f16 d; f16 m; u8 qs[16]; }`: y = q·d + m.
pub(super) fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = f32::from(qs[j] & 0xF) * d + m;
        y[j + 16] = f32::from(qs[j] >> 4) * d + m;
    }
}

/// Fifth bits of element `j` and `j + 16` from the 32-bit `qh` mask.
#[inline]
fn fifth_bits(qh: u32, j: usize) -> (u8, u8) {
    (
        (((qh >> j) << 4) & 0x10) as u8,
        ((qh >> (j + 12)) & 0x10) as u8,
    )
}

/// `block_q5_0 { f16 d; u8 qh[4]; u8 qs[16]; }`: y = (q - 16)·d.
pub(super) fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let (h0, h1) = fifth_bits(qh, j);
        y[j] = (i32::from((qs[j] & 0xF) | h0) - 16) as f32 * d;
        y[j + 16] = (i32::from((qs[j] >> 4) | h1) - 16) as f32 * d;
    }
}

/// `block_q5_1 { f16 d; f16 m; u8 qh[4]; u8 qs[16]; }`: y = q·d + m.
pub(super) fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let (h0, h1) = fifth_bits(qh, j);
        y[j] = f32::from((qs[j] & 0xF) | h0) * d + m;
        y[j + 16] = f32::from((qs[j] >> 4) | h1) * d + m;
    }
}

/// `block_q8_0 { f16 d; i8 qs[32]; }`: y = q·d.
pub(super) fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for (j, &q) in b[2..34].iter().enumerate() {
        y[j] = f32::from(q as i8) * d;
    }
}
