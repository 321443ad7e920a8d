//! The one configuration every supported architecture maps onto.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Llama-family architectures. They differ only in what [`ModelConfig`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama, SmolLM, Mistral-style dense models.
    Llama,
    /// Qwen2 / Qwen2.5: Llama plus biases on the q, k and v projections.
    Qwen2,
}

impl Architecture {
    /// Parses a GGUF `general.architecture` or HF `model_type`.
    ///
    /// # Errors
    /// [`ModelError::UnknownArchitecture`] for anything else.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" | "mistral" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            other => Err(ModelError::UnknownArchitecture(other.to_string())),
        }
    }
}

/// Hyper-parameters of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Which variant.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// SwiGLU inner width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Longest context the model was trained for.
    pub max_position: usize,
    /// Biases on q, k, v projections (Qwen2).
    pub attention_bias: bool,
    /// Output head shares the embedding matrix.
    pub tie_embeddings: bool,
}

impl ModelConfig {
    /// Checks internal consistency.
    ///
    /// # Errors
    /// [`ModelError::Config`] naming the first inconsistency.
    pub fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(ModelError::Config(s));
        let dims = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position", self.max_position),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} is 0"));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} is odd (RoPE rotates pairs)",
                self.head_dim
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad(format!("rope_theta {}", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!("rms_norm_eps {}", self.rms_norm_eps));
        }
        Ok(())
    }

    /// Query heads that share one KV head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// A tiny configuration for tests on random weights.
    pub fn tiny(architecture: Architecture) -> Self {
        Self {
            architecture,
            vocab_size: 97,
            hidden_size: 48,
            intermediate_size: 80,
            num_layers: 2,
            num_heads: 6,
            num_kv_heads: 2,
            head_dim: 8,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-6,
            max_position: 256,
            attention_bias: architecture == Architecture::Qwen2,
            tie_embeddings: true,
        }
    }

    /// Reads a Hugging Face `config.json`.
    ///
    /// # Errors
    /// [`ModelError::Config`] for malformed JSON or missing fields,
    /// [`ModelError::UnknownArchitecture`] for an unsupported `model_type`.
    pub fn from_hf_json(json: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Hf {
            model_type: String,
            vocab_size: usize,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            rope_theta: Option<f64>,
            rms_norm_eps: Option<f64>,
            max_position_embeddings: Option<usize>,
            attention_bias: Option<bool>,
            tie_word_embeddings: Option<bool>,
            rope_scaling: Option<serde_json::Value>,
        }
        let hf: Hf = serde_json::from_str(json)
            .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        let architecture = Architecture::parse(&hf.model_type)?;
        if let Some(s) = hf.rope_scaling.filter(|v| !v.is_null()) {
            return Err(ModelError::Config(format!(
                "rope_scaling {s} is not supported yet"
            )));
        }
        let cfg = Self {
            architecture,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf
                .head_dim
                .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            max_position: hf.max_position_embeddings.unwrap_or(4096),
            attention_bias: hf
                .attention_bias
                .unwrap_or(architecture == Architecture::Qwen2),
            tie_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_for_qwen2_parses() {
        let json = r#"{"model_type":"qwen2","vocab_size":151936,"hidden_size":896,
            "intermediate_size":4864,"num_hidden_layers":24,"num_attention_heads":14,
            "num_key_value_heads":2,"rope_theta":1000000.0,"rms_norm_eps":1e-6,
            "max_position_embeddings":32768,"tie_word_embeddings":true}"#;
        let c = ModelConfig::from_hf_json(json).unwrap();
        assert_eq!(c.head_dim, 64);
        assert!(c.attention_bias);
        assert_eq!(c.group_size(), 7);
    }

    #[test]
    fn unknown_architecture_is_refused() {
        let json = r#"{"model_type":"mamba","vocab_size":1,"hidden_size":1,
            "intermediate_size":1,"num_hidden_layers":1,"num_attention_heads":1}"#;
        assert!(matches!(
            ModelConfig::from_hf_json(json),
            Err(ModelError::UnknownArchitecture(a)) if a == "mamba"
        ));
    }

    #[test]
    fn inconsistent_heads_are_refused() {
        let mut c = ModelConfig::tiny(Architecture::Llama);
        c.num_kv_heads = 4;
        assert!(c.validate().unwrap_err().to_string().contains("multiple"));
    }
}
