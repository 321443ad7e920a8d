//! The portable kernel: every format decoded 32 weights at a time into signed integers with
//! a scale per 16 and a minimum, then integer dot products with the quantized activations.
//! It runs where AVX2 does not, and states the arithmetic the SIMD kernels must reproduce.

use super::acts::ActRow;
use crate::quant::{GgmlType, half, scale_min_k4};

/// 32 weights: `w[e] = scale[e / 16] · q[e] + min`.
pub(super) struct Sub {
    pub q: [i8; 32],
    pub scale: [f32; 2],
    pub min: f32,
}

/// The 32-weight sub-block `sub` of one block `b` of type `ty`.
pub(super) fn decode_sub(ty: GgmlType, b: &[u8], sub: usize) -> Sub {
    let mut q = [0i8; 32];
    let nibbles = |qs: &[u8], q: &mut [i8; 32], off: i8| {
        for j in 0..16 {
            q[j] = (qs[j] & 0xF) as i8 - off;
            q[j + 16] = (qs[j] >> 4) as i8 - off;
        }
    };
    let fifth = |qh: u32, q: &mut [i8; 32]| {
        for (e, v) in q.iter_mut().enumerate() {
            *v += (((qh >> e) & 1) << 4) as i8;
        }
    };
    let (scale, min) = match ty {
        GgmlType::Q4_0 => {
            nibbles(&b[2..18], &mut q, 8);
            (half(b, 0), 0.0)
        }
        GgmlType::Q4_1 => {
            nibbles(&b[4..20], &mut q, 0);
            (half(b, 0), half(b, 2))
        }
        GgmlType::Q5_0 => {
            nibbles(&b[6..22], &mut q, 0);
            fifth(u32::from_le_bytes([b[2], b[3], b[4], b[5]]), &mut q);
            q.iter_mut().for_each(|v| *v -= 16);
            (half(b, 0), 0.0)
        }
        GgmlType::Q5_1 => {
            nibbles(&b[8..24], &mut q, 0);
            fifth(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), &mut q);
            (half(b, 0), half(b, 2))
        }
        GgmlType::Q8_0 => {
            for (v, &x) in q.iter_mut().zip(&b[2..34]) {
                *v = x as i8;
            }
            (half(b, 0), 0.0)
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let (sc, m) = scale_min_k4(sub, &b[4..16]);
            let (chunk, high) = (sub / 2, sub % 2 == 1);
            let qs_at = if ty == GgmlType::Q4_K { 16 } else { 48 };
            let qs = &b[qs_at + 32 * chunk..qs_at + 32 * chunk + 32];
            for (v, &x) in q.iter_mut().zip(qs) {
                *v = (if high { x >> 4 } else { x & 0xF }) as i8;
            }
            if ty == GgmlType::Q5_K {
                for (v, &h) in q.iter_mut().zip(&b[16..48]) {
                    *v += (((h >> sub) & 1) << 4) as i8;
                }
            }
            (half(b, 0) * sc, -half(b, 2) * m)
        }
        GgmlType::Q6_K => {
            let (hb, quarter) = (sub / 4, sub % 4);
            let ql = &b[64 * hb + 32 * (quarter % 2)..];
            let qh = &b[128 + 32 * hb..128 + 32 * hb + 32];
            for (l, v) in q.iter_mut().enumerate() {
                let low = if quarter < 2 { ql[l] & 0xF } else { ql[l] >> 4 };
                let high = (qh[l] >> (2 * quarter)) & 3;
                *v = (low | (high << 4)) as i8 - 32;
            }
            let d = half(b, 208);
            let sc = |i: usize| d * f32::from(b[192 + i] as i8);
            return Sub {
                q,
                scale: [sc(2 * sub), sc(2 * sub + 1)],
                min: 0.0,
            };
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            unreachable!("QuantMatrix::new admits block formats only")
        }
    };
    Sub {
        q,
        scale: [scale, scale],
        min,
    }
}

/// Dot product of one weight row (`w`: its blocks of type `ty`) with one quantized row.
pub(super) fn dot(ty: GgmlType, w: &[u8], x: ActRow<'_>, act_block: usize) -> f32 {
    let (bb, subs) = (ty.block_bytes(), ty.block_size() / 32);
    let mut acc = 0.0f32;
    for (bi, block) in w.chunks_exact(bb).enumerate() {
        for s in 0..subs {
            let at = (bi * subs + s) * 32;
            let sub = decode_sub(ty, block, s);
            let xq = &x.q[at..at + 32];
            let half_dot = |h: usize| -> i32 {
                (16 * h..16 * h + 16)
                    .map(|e| i32::from(sub.q[e]) * i32::from(xq[e]))
                    .sum()
            };
            let dx = x.d[at / act_block];
            acc += dx * (sub.scale[0] * half_dot(0) as f32 + sub.scale[1] * half_dot(1) as f32);
            acc += sub.min * x.xsum[at / 32];
        }
    }
    acc
}
