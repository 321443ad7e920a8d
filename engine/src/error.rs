use arbor_model::ModelError;

/// Errors from the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model, tokenizer or chat template failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The prompt leaves no room to generate within the model's context.
    #[error("prompt of {prompt} tokens does not fit the context of {context} tokens")]
    PromptTooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Model context.
        context: usize,
    },
    /// The prompt is empty (no tokens to condition on).
    #[error("empty prompt")]
    EmptyPrompt,
    /// A draft cannot serve this target (different tokenizer or vocabulary).
    #[error("draft {draft} does not match the target: {reason}")]
    DraftMismatch {
        /// The draft's name.
        draft: String,
        /// What differs.
        reason: String,
    },
    /// A draft failed while proposing.
    #[error(transparent)]
    Draft(#[from] arbor_speculators::SpecError),
    /// Building the token tree failed (an internal error).
    #[error(transparent)]
    Tree(#[from] arbor_speculators::TreeError),
    /// A generation parameter is out of range.
    #[error("invalid parameter: {0}")]
    InvalidParams(String),
    /// The engine holds as many requests as it may (running + waiting); try again later.
    #[error("too many requests in flight ({in_flight}, limit {limit})")]
    QueueFull {
        /// Requests running or waiting.
        in_flight: usize,
        /// `max_running + max_waiting`.
        limit: usize,
    },
    /// The request's deadline passed before it finished.
    #[error("request timed out after {after:?}")]
    Timeout {
        /// Time since the request arrived.
        after: std::time::Duration,
    },
    /// The KV page pool cannot hold this many tokens of one sequence.
    #[error("{tokens} tokens need more KV cache than the pool's {capacity} tokens")]
    KvCapacity {
        /// Tokens the sequence needs.
        tokens: usize,
        /// Tokens the pool holds.
        capacity: usize,
    },
    /// A batched forward failed; every sequence in it ends with this.
    #[error("batched forward failed: {0}")]
    Step(String),
    /// A KV-cache policy that does not fit the model (or its backend).
    #[error(transparent)]
    KvPolicy(#[from] arbor_cache::CacheError),
}

/// Checks `policy` against `target`'s paged cache with pages of `page_size` tokens.
pub(crate) fn check_kv_policy<B: burn::tensor::backend::Backend>(
    target: &arbor_model::Transformer<B>,
    page_size: usize,
    policy: &arbor_cache::KvPolicy,
) -> Result<(), EngineError> {
    let Some(layout) = target.kv_layout(page_size) else {
        return Err(arbor_cache::CacheError::Policy(
            "KV-cache compression needs a paged cache (the CPU or CUDA backend)".into(),
        )
        .into());
    };
    policy.check(&layout)?;
    Ok(target.check_kv_policy(policy)?)
}
