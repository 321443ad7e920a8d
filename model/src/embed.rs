//! The token embedding, with quantized storage on the CPU fast path.
//!
//! A GGUF embedding table stays in its block format on the CPU backend (Qwen2.5-1.5B's is
//! 0.9 GB as f32, 0.13 GB as Q4_K); a lookup dequantizes only the rows it needs. When the
//! output head is tied to it, both share one copy. Elsewhere it is burn's `Embedding`.

use std::sync::Arc;

use arbor_kernels::qmatmul::QuantMatrix;
use burn::module::{Module, Param};
use burn::nn::Embedding;
use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

use crate::error::{ModelError, Result};
use crate::proj::uses_fast_path;
use crate::weights::MatrixData;

/// Token id → hidden vector.
#[derive(Module, Debug)]
pub struct Embed<B: Backend> {
    table: Option<Embedding<B>>,
    #[module(skip)]
    blocks: Option<Arc<QuantMatrix>>,
}

impl<B: Backend> Embed<B> {
    /// From a `[vocab, dim]` table.
    pub fn new(table: MatrixData, vocab: usize, dim: usize, device: &B::Device) -> Self {
        match table {
            MatrixData::Blocks(q) if uses_fast_path::<B>() => Self::from_blocks(Arc::new(q)),
            table => Self {
                table: Some(Embedding {
                    weight: Param::from_tensor(Tensor::from_data(
                        TensorData::new(table.into_f32(), [vocab, dim]),
                        device,
                    )),
                }),
                blocks: None,
            },
        }
    }

    /// From a shared quantized table (rows are dequantized on the host at lookup, so this
    /// works on any backend).
    pub fn from_blocks(q: Arc<QuantMatrix>) -> Self {
        Self {
            table: None,
            blocks: Some(q),
        }
    }

    /// # Shapes
    /// - `tokens`: `batch·n` ids, sequence-major → `[batch, n, dim]`
    ///
    /// # Errors
    /// [`ModelError::Input`] for an id past the table (callers validate ids first).
    pub fn forward(
        &self,
        tokens: &[u32],
        batch: usize,
        n: usize,
        device: &B::Device,
    ) -> Result<Tensor<B, 3>> {
        if let Some(q) = &self.blocks {
            let dim = q.k();
            let mut out = vec![0.0f32; tokens.len() * dim];
            for (&t, row) in tokens.iter().zip(out.chunks_exact_mut(dim)) {
                q.dequantize_row(t as usize, row)
                    .map_err(|e| ModelError::Input(format!("embedding token {t}: {e}")))?;
            }
            return Ok(Tensor::from_data(
                TensorData::new(out, [batch, n, dim]),
                device,
            ));
        }
        let table = self
            .table
            .as_ref()
            .expect("an embedding holds either blocks or a table");
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, n]), device);
        Ok(table.forward(ids))
    }
}
