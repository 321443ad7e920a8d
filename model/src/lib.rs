//! Arbor's model: one config-driven Llama-family transformer (Llama, SmolLM, Qwen2) in burn,
//! its checkpoint loaders (GGUF; Hugging Face safetensors from a folder or the hub), its
//! tokenizer and chat template, and token sampling.
//!
//! ```
//! use arbor_model::{Architecture, ForwardInput, ModelConfig, RandomWeights, Transformer};
//! type B = burn::backend::Flex;
//! let dev = Default::default();
//! let config = ModelConfig::tiny(Architecture::Qwen2);
//! let model = Transformer::<B>::from_weights(&config, &mut RandomWeights::new(0, 0.1), &dev)?;
//! let mut cache = model.new_cache();
//! let logits = model.forward_last_logits(&ForwardInput::causal(&[1, 2, 3], 0), &mut cache)?;
//! assert_eq!(logits[0].len(), config.vocab_size);
//! assert_eq!(cache.len(), 3);
//! # Ok::<(), arbor_model::ModelError>(())
//! ```

mod chat;
pub mod coarse_head;
mod config;
#[cfg(feature = "cuda")]
mod cube_tensor;
mod device_kv;
mod device_ops;
mod embed;
mod error;
pub mod gguf;
mod gpu_blocks;
pub mod hub;
mod input;
mod load;
mod proj;
mod rope;
pub mod safetensors;
pub mod sampling;
pub mod testing;
mod tokenizer;
mod transformer;
mod weights;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::{Architecture, ModelConfig};
pub use error::{ModelError, Result};
pub use input::ForwardInput;
pub use load::LoadedModel;
pub use rope::{RopeAngles, interleaved_to_half_split};
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::{TextStream, Tokenizer};
pub use transformer::{KV_PAGE_SIZE, LogitRows, SeqForward, Transformer};
pub use weights::{MatrixData, RandomWeights, WeightSource};

/// Backend selection shared by the engine, the CLI and tests.
pub mod device;
