//! Arbor's embeddable engine.
//!
//! Today: [`Generator`], plain autoregressive generation for one sequence with streaming text
//! deltas, stop strings, EOS handling and timing. The speculative draft → verify → commit loop,
//! the continuous-batching scheduler and metrics are built on the same request types next.
//!
//! ```
//! use arbor_engine::{GenerateParams, Generator, Prompt, Event};
//! use arbor_model::{Architecture, ModelConfig, RandomWeights, Transformer};
//! type B = burn::backend::Flex;
//! let dev = Default::default();
//! let tok = arbor_model::testing::byte_tokenizer();
//! let config =
//!     ModelConfig { vocab_size: tok.vocab_size(), ..ModelConfig::tiny(Architecture::Llama) };
//! let model = Transformer::<B>::from_weights(&config, &mut RandomWeights::new(1, 0.2), &dev)?;
//! let generator = Generator::new(&model, &tok);
//! let params = GenerateParams { max_tokens: 5, ignore_eos: true, ..GenerateParams::default() };
//! let mut text = String::new();
//! for event in generator.generate(&Prompt::Text("hello".into()), &params)? {
//!     match event? {
//!         Event::Text(delta) => text.push_str(&delta),
//!         Event::Done(done) => assert_eq!(done.stats.generated_tokens, 5),
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
mod generator;
mod output;
mod params;
mod spec;
mod stop;

pub use error::EngineError;
pub use generator::{Generation, Generator};
pub use output::{Event, Finished, GenerationStats};
pub use params::{FinishReason, GenerateParams, Prompt};
pub use spec::{
    DepthStats, DraftStats, Engine, Planner, SpecGeneration, SpecStats, StepStats, TreePolicy,
    VERIFY_SIZES, check_same_tokenizer,
};
pub use stop::StopMatcher;
