//! Plain autoregressive generation for one sequence.

use std::time::Instant;

use std::sync::Arc;

use arbor_cache::{KvCache, KvPolicy};
use arbor_model::{ForwardInput, KV_PAGE_SIZE, Sampler, Tokenizer, Transformer};
use burn::tensor::backend::Backend;

use crate::output::{Event, Output, check_prompt, prompt_tokens};
use crate::{EngineError, GenerateParams, Prompt};

/// Generates text with one model (no speculation).
#[derive(Debug)]
pub struct Generator<'m, B: Backend> {
    model: &'m Transformer<B>,
    tokenizer: &'m Tokenizer,
    kv_policy: Option<Arc<KvPolicy>>,
}

impl<'m, B: Backend> Generator<'m, B> {
    /// A generator over `model` and its `tokenizer`.
    pub fn new(model: &'m Transformer<B>, tokenizer: &'m Tokenizer) -> Self {
        Self {
            model,
            tokenizer,
            kv_policy: None,
        }
    }

    /// Compresses the KV cache with `policy` (built and checked for
    /// [`Transformer::kv_layout`] with pages of [`KV_PAGE_SIZE`]; CPU backend).
    ///
    /// # Errors
    /// [`EngineError::KvPolicy`] if the policy does not fit the model's paged cache.
    pub fn with_kv_policy(mut self, policy: Arc<KvPolicy>) -> Result<Self, EngineError> {
        crate::error::check_kv_policy(self.model, KV_PAGE_SIZE, &policy)?;
        self.kv_policy = Some(policy);
        Ok(self)
    }

    /// Token ids of `prompt` (chat prompts rendered with the model's template).
    ///
    /// # Errors
    /// Tokenizer or template failures.
    pub fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        prompt_tokens(self.tokenizer, prompt)
    }

    /// Starts a generation. Work happens as the returned iterator is advanced.
    ///
    /// # Errors
    /// Invalid parameters, an empty or over-long prompt, or tokenizer failures.
    pub fn generate(
        &self,
        prompt: &Prompt,
        params: &GenerateParams,
    ) -> Result<Generation<'m, B>, EngineError> {
        params.validate()?;
        let prompt_ids = prompt_tokens(self.tokenizer, prompt)?;
        check_prompt(&prompt_ids, self.model)?;
        Ok(Generation {
            model: self.model,
            cache: self
                .model
                .new_cache_with(KV_PAGE_SIZE, self.kv_policy.clone()),
            sampler: Sampler::new(params.sampling.clone()),
            output: Output::new(self.tokenizer, params, prompt_ids.len()),
            params: params.clone(),
            pending: Some(prompt_ids),
        })
    }
}

/// A running generation; iterate it for [`Event`]s.
pub struct Generation<'m, B: Backend> {
    model: &'m Transformer<B>,
    cache: KvCache<B>,
    sampler: Sampler,
    output: Output<'m>,
    params: GenerateParams,
    /// Tokens to feed next: the prompt, then each sampled token; `None` once finished.
    pending: Option<Vec<u32>>,
}

impl<B: Backend> std::fmt::Debug for Generation<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("generated", &self.output.generated().len())
            .finish()
    }
}

/// Feeds `tokens` causally in chunks of `chunk` and returns the logits after the last one.
pub(crate) fn prefill<B: Backend>(
    model: &Transformer<B>,
    cache: &mut KvCache<B>,
    tokens: &[u32],
    chunk: usize,
) -> Result<Vec<f32>, EngineError> {
    let mut logits = Vec::new();
    for part in tokens.chunks(chunk) {
        let input = ForwardInput::causal(part, cache.len());
        logits = model.forward_last_logits(&input, cache)?.swap_remove(0);
    }
    Ok(logits)
}

impl<B: Backend> Generation<'_, B> {
    /// One token: forward, sample, then hand it to the output; queues events.
    fn step(&mut self, feed: Vec<u32>) -> Result<(), EngineError> {
        let t0 = Instant::now();
        let logits = prefill(
            self.model,
            &mut self.cache,
            &feed,
            self.params.prefill_chunk,
        )?;
        let token = self.sampler.sample(&logits);
        self.output.add_time(t0.elapsed());
        let context_left = self
            .model
            .max_position()
            .saturating_sub(self.cache.len() + 1);
        if self.output.push(token, context_left)?.is_none() {
            self.pending = Some(vec![token]);
        }
        Ok(())
    }
}

impl<B: Backend> Iterator for Generation<'_, B> {
    type Item = Result<Event, EngineError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.output.pop() {
                return Some(Ok(e));
            }
            let feed = self.pending.take()?;
            if let Err(e) = self.step(feed) {
                self.pending = None;
                return Some(Err(e));
            }
        }
    }
}
