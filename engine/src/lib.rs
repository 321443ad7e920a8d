//! Arbor's embeddable engine.
//!
//! - [`Generator`]: plain autoregressive generation for one sequence.
//! - [`BatchEngine`]: continuous batching of many requests, one batched target forward per
//!   step (prefill chunks, plain tokens and draft trees together), for servers.
//! - [`Engine`]: speculative decoding for one sequence — drafts propose token trees, the
//!   target verifies each tree in one forward pass, the accepted path's KV rows are kept
//!   (SpecInfer, arXiv 2305.09781). Greedy output equals [`Generator`]'s token for token;
//!   sampled output has the target's distribution. Trees are a fixed [`TreePolicy::Fixed`]
//!   shape or chosen every step from measured costs ([`TreePolicy::Auto`]).
//!
//! Both stream [`Event`]s: text deltas (stop strings held back, EOS handled), per-step
//! speculation figures, and a final [`Finished`] with timings, τ and α.
//!
//! ```
//! use arbor_engine::{Engine, Event, GenerateParams, Prompt};
//! use arbor_model::{Architecture, ModelConfig, RandomWeights, Transformer};
//! use arbor_speculators::{ModelDraft, NgramDraft};
//! type B = burn::backend::Flex;
//! let dev = Default::default();
//! let tok = arbor_model::testing::byte_tokenizer();
//! let config =
//!     ModelConfig { vocab_size: tok.vocab_size(), ..ModelConfig::tiny(Architecture::Llama) };
//! let target = Transformer::<B>::from_weights(&config, &mut RandomWeights::new(1, 0.2), &dev)?;
//!
//! // Two drafts: the target's first layer, and prompt lookup. Trees shaped automatically.
//! let mut engine = Engine::new(&target, &tok, "auto".parse()?)
//!     .with_draft(ModelDraft::new("self-1", target.truncated(1)?))
//!     .with_draft(NgramDraft::default());
//! let params = GenerateParams { max_tokens: 8, ignore_eos: true, ..GenerateParams::default() };
//! let mut text = String::new();
//! for event in engine.generate(&Prompt::Text("hello hello".into()), &params)? {
//!     match event? {
//!         Event::Text(delta) => text.push_str(&delta),
//!         Event::Step(step) => assert!(step.emitted >= 1),
//!         Event::Done(done) => {
//!             assert_eq!(done.tokens.len(), 8);
//!             let spec = done.spec.unwrap();
//!             println!("tau {:.2}, alpha {:.2}", spec.tau(), spec.alpha());
//!         }
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod batch;
mod error;
mod generator;
mod output;
mod params;
mod spec;
mod stop;

pub use batch::{
    BatchEngine, BatchRequest, DraftFactory, EventSink, Load, RequestId, Scheduler,
    SchedulerConfig, SeqLoad, StepPlan, StepReport, Work,
};
pub use error::EngineError;
pub use generator::{Generation, Generator};
pub use output::{Event, Finished, GenerationStats};
pub use params::{FinishReason, GenerateParams, Prompt};
pub use spec::{
    DepthStats, DraftStats, Engine, Planner, SpecGeneration, SpecStats, StepStats, TreePolicy,
    VERIFY_SIZES, check_same_tokenizer, time_verify,
};
pub use stop::StopMatcher;
