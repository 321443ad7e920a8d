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
use crate::weights::{WeightSource, check_shape};

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
}

impl<'a> GgufWeights<'a> {
    /// Weights of `file` for a model of `config`.
    pub fn new(file: &'a GgufFile, config: &ModelConfig) -> Self {
        let permute = (config.architecture == Architecture::Llama).then_some((
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        ));
        Self { file, permute }
    }
}

impl WeightSource for GgufWeights<'_> {
    fn load(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (actual, data) = self.file.tensor_f32(name)?;
        check_shape(name, shape, &actual)?;
        let Some((q_heads, kv_heads, head_dim)) = self.permute else {
            return Ok(data);
        };
        let heads = if name.contains(".attn_q.") {
            q_heads
        } else if name.contains(".attn_k.") {
            kv_heads
        } else {
            return Ok(data);
        };
        let row = data.len() / (heads * head_dim);
        let perm = interleaved_to_half_split(heads, head_dim);
        let mut out = Vec::with_capacity(data.len());
        for &src in &perm {
            out.extend_from_slice(&data[src * row..(src + 1) * row]);
        }
        Ok(out)
    }

    fn contains(&self, name: &str) -> bool {
        self.file.has_tensor(name)
    }
}
