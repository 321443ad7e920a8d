//! Arbor's numeric kernels.
//!
//! Every kernel has a plain reference beside it; the fast versions (fused tree attention,
//! quantized matmul, CubeCL) are added next to these references and tested against them.
//!
//! - [`quant`]: ggml/GGUF block formats (F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
//!   Q6_K) and their dequantization to `f32`.
//! - [`matmul`]: activations × packed f32 weights for few rows (decode, tree verification),
//!   weights streamed once for all rows; AVX2/FMA with a portable fallback.
//! - [`kvquant`]: per-token KV row quantization (SKVQ: channel permutation, clipped groups,
//!   2/4/8-bit packed codes with f16 scale and minimum) and its calibration.
//! - [`attention`]: masked, grouped-query attention as burn tensor ops: the reference for
//!   decode, prefill and tree attention alike (the mask says which keys each query sees);
//!   and [`attention::attention_rows`], the fused row-wise CPU kernel (only visible keys,
//!   no score matrix, batch-invariant: a tree row equals its path decoded alone, bitwise).
//! - [`pool`]: forwards run on rayon's pool with the other workers polling for their
//!   products between them.
//! - [`cube`]: the GPU kernels in CubeCL (quantized matmul, paged tree attention), for any
//!   CubeCL runtime; tested on wgpu against the references above.
//!
//! ```
//! use arbor_kernels::quant::{GgmlType, dequantize};
//! // One Q8_0 block: f16 scale 1.0 then 32 signed bytes.
//! let mut block = vec![0x00, 0x3c];
//! block.extend((0..32).map(|i| i as u8));
//! let values = dequantize(GgmlType::Q8_0, &block, 32).unwrap();
//! assert_eq!(values[5], 5.0);
//! ```

pub mod act;
pub mod attention;
pub mod cube;
mod error;
pub mod kvquant;
pub mod matmul;
pub mod pool;
mod prefetch;
pub mod qmatmul;
pub mod quant;
pub mod roofline;

pub use error::KernelError;
