//! ggml block formats, as stored in GGUF files.
//!
//! Layouts follow ggml's `ggml-common.h` (block structs) and `ggml-quants.c` (reference
//! dequantization). They are checked against the `gguf` Python package's dequantizer by
//! fixtures that `scripts/make-quant-fixtures.py` writes.

mod blocks;
mod encode;
mod kquants;

pub use encode::quantize;

pub(crate) use blocks::half;
pub(crate) use kquants::{pack_scales_mins_k4, scale_min_k4, scales_mins_k4};

use crate::KernelError;

/// A ggml tensor type, with its GGUF type id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[allow(non_camel_case_types)] // ggml's own names
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 32 weights, f16 scale, 4-bit signed (offset 8).
    Q4_0,
    /// 32 weights, f16 scale and min, 4-bit unsigned.
    Q4_1,
    /// 32 weights, f16 scale, 5-bit signed (offset 16).
    Q5_0,
    /// 32 weights, f16 scale and min, 5-bit unsigned.
    Q5_1,
    /// 32 weights, f16 scale, 8-bit signed.
    Q8_0,
    /// 256-weight super-blocks of 8×32, 6-bit scales and mins, 4-bit weights.
    Q4_K,
    /// 256-weight super-blocks of 8×32, 6-bit scales and mins, 5-bit weights.
    Q5_K,
    /// 256-weight super-blocks of 16×16, 8-bit scales, 6-bit weights.
    Q6_K,
}

impl GgmlType {
    /// Every type Arbor decodes.
    pub const ALL: [Self; 11] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
    ];

    /// Decodes a GGUF tensor type id.
    ///
    /// # Errors
    /// [`KernelError::UnsupportedType`] for ids Arbor does not decode (e.g. Q2_K, IQ formats).
    pub fn from_id(id: u32) -> Result<Self, KernelError> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            30 => Self::BF16,
            other => return Err(KernelError::UnsupportedType(type_name(other).to_string())),
        })
    }

    /// The GGUF type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::BF16 => 30,
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => 32,
            Self::Q4_K | Self::Q5_K | Self::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
        }
    }

    /// Bytes needed for `elements` elements, or an error if they do not fill whole blocks.
    ///
    /// # Errors
    /// [`KernelError::RaggedBlocks`] when `elements` is not a multiple of the block size.
    pub fn bytes_for(self, elements: usize) -> Result<usize, KernelError> {
        let block = self.block_size();
        if !elements.is_multiple_of(block) {
            return Err(KernelError::RaggedBlocks {
                ty: format!("{self:?}"),
                elements,
                block,
            });
        }
        Ok(elements / block * self.block_bytes())
    }
}

/// ggml's name for a type id, for error messages about types Arbor does not decode.
fn type_name(id: u32) -> String {
    const NAMES: [&str; 31] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
        "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    NAMES
        .get(id as usize)
        .map_or_else(|| format!("type id {id}"), |n| (*n).to_string())
}

/// Dequantizes `elements` values stored as `ty` in `bytes` into a new `Vec<f32>`.
///
/// # Errors
/// If `elements` does not fill whole blocks or `bytes` has the wrong length.
pub fn dequantize(ty: GgmlType, bytes: &[u8], elements: usize) -> Result<Vec<f32>, KernelError> {
    let mut out = vec![0.0f32; elements];
    dequantize_into(ty, bytes, &mut out)?;
    Ok(out)
}

/// Dequantizes into `out` (its length is the element count).
///
/// # Errors
/// If `out.len()` does not fill whole blocks or `bytes` has the wrong length.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), KernelError> {
    let expected = ty.bytes_for(out.len())?;
    if bytes.len() != expected {
        return Err(KernelError::ByteLength {
            ty: format!("{ty:?}"),
            elements: out.len(),
            expected,
            actual: bytes.len(),
        });
    }
    let bb = ty.block_bytes();
    let bs = ty.block_size();
    let decode: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => blocks::f32,
        GgmlType::F16 => blocks::f16,
        GgmlType::BF16 => blocks::bf16,
        GgmlType::Q4_0 => blocks::q4_0,
        GgmlType::Q4_1 => blocks::q4_1,
        GgmlType::Q5_0 => blocks::q5_0,
        GgmlType::Q5_1 => blocks::q5_1,
        GgmlType::Q8_0 => blocks::q8_0,
        GgmlType::Q4_K => kquants::q4_k,
        GgmlType::Q5_K => kquants::q5_k,
        GgmlType::Q6_K => kquants::q6_k,
    };
    // Large tensors are decoded in parallel, in runs of blocks.
    const RUN: usize = 1024;
    use rayon::prelude::*;
    bytes
        .par_chunks(bb * RUN)
        .zip(out.par_chunks_mut(bs * RUN))
        .for_each(|(bytes, out)| {
            for (block, y) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bs)) {
                decode(block, y);
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_sizes_match_ggml() {
        for ty in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(ty.id()).unwrap(), ty);
        }
        assert_eq!(GgmlType::Q4_K.bytes_for(512).unwrap(), 288);
        assert!(GgmlType::Q4_K.bytes_for(100).is_err());
    }

    #[test]
    fn unsupported_type_is_named() {
        let err = GgmlType::from_id(10).unwrap_err().to_string();
        assert!(err.contains("Q2_K"), "{err}");
        assert!(
            GgmlType::from_id(999)
                .unwrap_err()
                .to_string()
                .contains("999")
        );
    }

    #[test]
    fn wrong_byte_length_is_an_error() {
        let err = dequantize(GgmlType::Q8_0, &[0u8; 33], 32).unwrap_err();
        assert!(matches!(
            err,
            KernelError::ByteLength {
                expected: 34,
                actual: 33,
                ..
            }
        ));
    }

    #[test]
    fn q4_0_decodes_by_hand() {
        // scale 2.0 (f16 0x4000); low nibbles 0..16, high nibbles 15.
        let mut b = vec![0x00, 0x40];
        b.extend((0..16u8).map(|j| j | 0xF0));
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        assert_eq!(y[0], -16.0);
        assert_eq!(y[15], 14.0);
        assert_eq!(y[16], 14.0);
    }
}
