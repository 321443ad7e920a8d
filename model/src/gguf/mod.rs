//! GGUF checkpoints: the reader, the model config and weights they hold, and the tokenizer
//! built from their metadata.

mod reader;
mod tokenizer;
mod writer;

pub use reader::{GgufFile, TensorInfo, Value};
pub use tokenizer::tokenizer_json_from_gguf;
pub use writer::GgufWriter;

use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};
use crate::rope::interleaved_to_half_split;
use arbor_kernels::qmatmul::QuantMatrix;
use arbor_kernels::quant::GgmlType;

use crate::weights::{MatrixData, WeightSource, check_shape};

impl GgufFile {
    /// The model configuration recorded in the metadata.
    ///
    /// # Errors
    /// [`ModelError::UnknownArchitecture`], [`ModelError::Metadata`] for missing keys,
    /// [`ModelError::Config`] if inconsistent.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let arch_name = self.require("general.architecture", |v| v.as_str().map(str::to_owned))?;
        let architecture = Architecture::parse(&arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let usize_of = |k: &str| {
            self.require(&key(k), |v| {
                v.as_u64().and_then(|x| usize::try_from(x).ok())
            })
        };
        let hidden_size = usize_of("embedding_length")?;
        let num_heads = usize_of("attention.head_count")?;
        let num_kv_heads = match self.get(&key("attention.head_count_kv")) {
            None => num_heads,
            Some(_) => usize_of("attention.head_count_kv")?,
        };
        let head_dim = match self.get(&key("attention.key_length")) {
            None => hidden_size / num_heads.max(1),
            Some(_) => usize_of("attention.key_length")?,
        };
        let (embd, _) = self.tensor("token_embd.weight")?;
        let vocab_size = embd.shape()[0];
        let cfg = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: usize_of("feed_forward_length")?,
            num_layers: usize_of("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: self
                .get(&key("rope.freq_base"))
                .map_or(Some(10_000.0), |v| v.as_f64())
                .ok_or_else(|| ModelError::Metadata {
                    key: key("rope.freq_base"),
                    why: "not a number".into(),
                })?,
            rms_norm_eps: self.require(&key("attention.layer_norm_rms_epsilon"), Value::as_f64)?,
            max_position: usize_of("context_length")?,
            attention_bias: self.has_tensor("blk.0.attn_q.bias"),
            tie_embeddings: !self.has_tensor("output.weight"),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Weights from a GGUF file, dequantized to f32 on load.
///
/// GGUF Llama checkpoints store q/k rows interleaved for llama.cpp's RoPE; they are permuted
/// into Arbor's half-split layout here (Qwen2 GGUFs already use it).
#[derive(Debug)]
pub struct GgufWeights<'a> {
    file: &'a GgufFile,
    /// Heads for `attn_q` and `attn_k` when rows must be permuted, plus the head width.
    permute: Option<(usize, usize, usize)>,
    /// Hand out matrices in their block formats (else dequantized to f32).
    keep_blocks: bool,
}

impl<'a> GgufWeights<'a> {
    /// Weights of `file` for a model of `config`.
    pub fn new(file: &'a GgufFile, config: &ModelConfig) -> Self {
        let permute = (config.architecture == Architecture::Llama).then_some((
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        ));
        Self {
            file,
            permute,
            keep_blocks: true,
        }
    }

    /// The same source handing out every matrix dequantized to f32.
    pub fn dequantized(self) -> Self {
        Self {
            keep_blocks: false,
            ..self
        }
    }
}

impl GgufWeights<'_> {
    /// The row order a tensor's rows must take (llama.cpp's interleaved q/k heads to Arbor's
    /// half-split layout), or `None` to keep them.
    fn row_permutation(&self, name: &str) -> Option<Vec<usize>> {
        let (q_heads, kv_heads, head_dim) = self.permute?;
        let heads = if name.contains(".attn_q.") {
            q_heads
        } else if name.contains(".attn_k.") {
            kv_heads
        } else {
            return None;
        };
        Some(interleaved_to_half_split(heads, head_dim))
    }
}

/// `data` cut into `perm.len()` equal rows, reassembled in the order `perm` names.
fn permute_rows<T: Copy>(data: &[T], perm: &[usize]) -> Vec<T> {
    let row = data.len() / perm.len();
    let mut out = Vec::with_capacity(data.len());
    for &src in perm {
        out.extend_from_slice(&data[src * row..(src + 1) * row]);
    }
    out
}

impl WeightSource for GgufWeights<'_> {
    fn load(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (actual, data) = self.file.tensor_f32(name)?;
        check_shape(name, shape, &actual)?;
        Ok(match self.row_permutation(name) {
            Some(perm) => permute_rows(&data, &perm),
            None => data,
        })
    }

    fn contains(&self, name: &str) -> bool {
        self.file.has_tensor(name)
    }

    fn load_matrix(&mut self, name: &str, out: usize, inp: usize) -> Result<MatrixData> {
        let (info, bytes) = self.file.tensor(name)?;
        let float = matches!(info.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
        if float || !self.keep_blocks || !inp.is_multiple_of(info.ty.block_size()) {
            return self.load(name, &[out, inp]).map(MatrixData::F32);
        }
        check_shape(name, &[out, inp], &info.shape())?;
        let bytes = match self.row_permutation(name) {
            // Whole rows of blocks move; their bytes are untouched.
            Some(perm) => permute_rows(bytes, &perm),
            None => bytes.to_vec(),
        };
        QuantMatrix::new(info.ty, out, inp, bytes)
            .map(MatrixData::Blocks)
            .map_err(|source| ModelError::TensorType {
                name: name.to_string(),
                source,
            })
    }
}
