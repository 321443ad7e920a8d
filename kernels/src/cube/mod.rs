//! CubeCL kernels: the GPU side of the fast path, written once for every CubeCL runtime
//! (CUDA behind the `cuda` feature; tested here on wgpu over Mesa's software Vulkan driver).
//!
//! - [`qmatmul`]: activations × quantized weights. GGUF block formats are repacked at upload
//!   into one affine layout the kernel reads directly — per group of 16 or 32 weights an f32
//!   scale and minimum, codes of 4 or 8 bits packed in `u32` words — so weights stay quantized
//!   on the device (4.5–6 bits per weight for the 4-bit formats) and are never expanded to f32.
//! - [`attention`]: tree attention over a paged KV cache, flash-style: one cube per (query
//!   row, head), keys in tiles with an online softmax, pages found through a page table, the
//!   tree mask derived from parent pointers, GQA without repeating K/V; pages full precision
//!   or packed by the CPU cache's quantizers (2/4/8 bits, dequantized in the kernel).
//! - [`kv`]: one sequence's KV cache resident on the device — pages, page table, pool,
//!   append, commit, rollback — which that attention reads in place (the CUDA backend's
//!   cache).
//! - [`rope`]: rotary position embedding of q or k rows, [`norm`]: RMSNorm of rows,
//!   [`act`]: the gated MLP's `silu(g) · u` — each one launch where burn's tensor operations
//!   issue three to ten (a forward's launches cost its host time on a GPU).
//!
//! Each is tested against the CPU references ([`crate::quant::dequantize`] and
//! [`crate::attention::attention_reference`]) on random shapes; the device cache against a
//! host mirror through a speculative session.
//!
//! ```
//! use arbor_kernels::cube::qmatmul::CubeQuantMatrix;
//! use arbor_kernels::qmatmul::QuantMatrix;
//! use arbor_kernels::quant::GgmlType;
//! use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
//! use cubecl::Runtime;
//!
//! let client = WgpuRuntime::client(&WgpuDevice::default());
//! let mut block = vec![0x00, 0x3c]; // one Q8_0 row of 32: scale 1.0, weights 0..32
//! block.extend((0..32).map(|i| i as u8));
//! let w = QuantMatrix::new(GgmlType::Q8_0, 1, 32, block).unwrap();
//! let gpu = CubeQuantMatrix::<WgpuRuntime>::upload(&client, &w).unwrap();
//! let y = gpu.matmul_host(&vec![1.0; 32], 1).unwrap();
//! assert_eq!(y, vec![(0..32).sum::<i32>() as f32]);
//! ```

pub mod act;
pub mod attention;
pub mod kv;
mod kvpack;
pub mod norm;
pub mod qmatmul;
pub mod rope;

#[cfg(all(test, feature = "cuda"))]
mod on_cuda;
#[cfg(test)]
mod on_wgpu;
