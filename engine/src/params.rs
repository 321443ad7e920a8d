use arbor_model::{ChatMessage, SamplingParams};
use serde::{Deserialize, Serialize};

use crate::EngineError;

/// What to continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Raw text, tokenized as is (BOS added if the model wants it).
    Text(String),
    /// Chat messages, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Token ids.
    Tokens(Vec<u32>),
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// End-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
}

/// Everything that shapes one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerateParams {
    /// Most new tokens to produce.
    pub max_tokens: usize,
    /// Token choice.
    pub sampling: SamplingParams,
    /// Generation stops before the first occurrence of any of these; the text is not emitted.
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Most prompt tokens per prefill forward (bounds memory for long prompts).
    pub prefill_chunk: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            ignore_eos: false,
            prefill_chunk: 512,
        }
    }
}

impl GenerateParams {
    /// Checks ranges.
    ///
    /// # Errors
    /// [`EngineError::InvalidParams`].
    pub fn validate(&self) -> Result<(), EngineError> {
        self.sampling
            .validate()
            .map_err(|e| EngineError::InvalidParams(e.to_string()))?;
        if self.max_tokens == 0 {
            return Err(EngineError::InvalidParams(
                "max_tokens must be at least 1".into(),
            ));
        }
        if self.prefill_chunk == 0 {
            return Err(EngineError::InvalidParams(
                "prefill_chunk must be at least 1".into(),
            ));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(EngineError::InvalidParams(
                "stop strings must not be empty".into(),
            ));
        }
        Ok(())
    }
}
