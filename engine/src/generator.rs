//! Plain autoregressive generation for one sequence.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use arbor_cache::KvCache;
use arbor_model::{ForwardInput, Sampler, TextStream, Tokenizer, Transformer};
use burn::tensor::backend::Backend;
use serde::Serialize;

use crate::{EngineError, FinishReason, GenerateParams, Prompt, StopMatcher};

/// Timing and token counts of one generation.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GenerationStats {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated (including a final end-of-generation token).
    pub generated_tokens: usize,
    /// Time to process the prompt and pick the first token.
    pub prefill: Duration,
    /// Time for every later token.
    pub decode: Duration,
}

impl GenerationStats {
    /// Prompt tokens per second.
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill)
    }
    /// Generated tokens per second after the first.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        rate(self.generated_tokens.saturating_sub(1), self.decode)
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n as f64 / d.as_secs_f64()
    }
}

/// How a generation ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finished {
    /// Why it stopped.
    pub reason: FinishReason,
    /// Counts and timings.
    pub stats: GenerationStats,
    /// Every generated token id.
    pub tokens: Vec<u32>,
}

/// One item of a generation stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text (complete UTF-8, never part of a stop string).
    Text(String),
    /// The end; always the last event.
    Done(Finished),
}

/// Generates text with one model (no speculation).
#[derive(Debug)]
pub struct Generator<'m, B: Backend> {
    model: &'m Transformer<B>,
    tokenizer: &'m Tokenizer,
}

impl<'m, B: Backend> Generator<'m, B> {
    /// A generator over `model` and its `tokenizer`.
    pub fn new(model: &'m Transformer<B>, tokenizer: &'m Tokenizer) -> Self {
        Self { model, tokenizer }
    }

    /// Token ids of `prompt` (chat prompts rendered with the model's template).
    ///
    /// # Errors
    /// Tokenizer or template failures.
    pub fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        Ok(match prompt {
            Prompt::Text(t) => self.tokenizer.encode(t)?,
            Prompt::Chat(m) => self
                .tokenizer
                .encode(&self.tokenizer.apply_chat_template(m)?)?,
            Prompt::Tokens(t) => t.clone(),
        })
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
        let prompt_ids = self.prompt_tokens(prompt)?;
        if prompt_ids.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let context = self.model.max_position();
        if prompt_ids.len() >= context {
            return Err(EngineError::PromptTooLong {
                prompt: prompt_ids.len(),
                context,
            });
        }
        let vocab = self.model.vocab_size();
        if let Some(&bad) = prompt_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::InvalidParams(format!(
                "prompt token {bad} outside vocabulary {vocab}"
            )));
        }
        Ok(Generation {
            model: self.model,
            tokenizer: self.tokenizer,
            stream: self.tokenizer.decode_stream(true),
            cache: self.model.new_cache(),
            sampler: Sampler::new(params.sampling.clone()),
            stop: StopMatcher::new(params.stop.clone()),
            params: params.clone(),
            stats: GenerationStats {
                prompt_tokens: prompt_ids.len(),
                ..Default::default()
            },
            pending: Some(prompt_ids),
            generated: Vec::new(),
            out: VecDeque::new(),
        })
    }
}

/// A running generation; iterate it for [`Event`]s.
pub struct Generation<'m, B: Backend> {
    model: &'m Transformer<B>,
    tokenizer: &'m Tokenizer,
    stream: TextStream<'m>,
    cache: KvCache<B>,
    sampler: Sampler,
    stop: StopMatcher,
    params: GenerateParams,
    /// Tokens to feed next: the prompt, then each sampled token; `None` once finished.
    pending: Option<Vec<u32>>,
    generated: Vec<u32>,
    stats: GenerationStats,
    out: VecDeque<Event>,
}

impl<B: Backend> std::fmt::Debug for Generation<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("generated", &self.generated.len())
            .finish()
    }
}

impl<B: Backend> Generation<'_, B> {
    /// Feeds `tokens` (in chunks) and returns the logits after the last one.
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let mut logits = Vec::new();
        for chunk in tokens.chunks(self.params.prefill_chunk) {
            let input = ForwardInput::causal(chunk, self.cache.len());
            logits = self
                .model
                .forward_last_logits(&input, &mut self.cache)?
                .swap_remove(0);
        }
        Ok(logits)
    }

    /// Queues held-back text and the final event.
    fn finish(&mut self, reason: FinishReason, flush: bool) {
        self.pending = None;
        let rest = self.stop.flush();
        if flush && !rest.is_empty() {
            self.out.push_back(Event::Text(rest));
        }
        self.out.push_back(Event::Done(Finished {
            reason,
            stats: self.stats.clone(),
            tokens: std::mem::take(&mut self.generated),
        }));
    }

    /// One token: forward, sample, detokenize, check for the end; queues events.
    fn step(&mut self, feed: Vec<u32>) -> Result<(), EngineError> {
        let t0 = Instant::now();
        let logits = self.feed(&feed)?;
        let token = self.sampler.sample(&logits);
        let first = self.generated.is_empty();
        *(if first {
            &mut self.stats.prefill
        } else {
            &mut self.stats.decode
        }) += t0.elapsed();
        self.generated.push(token);
        self.stats.generated_tokens += 1;

        if !self.params.ignore_eos && self.tokenizer.is_end_of_generation(token) {
            self.finish(FinishReason::Stop, true);
            return Ok(());
        }
        let piece = self.stream.step(token)?.unwrap_or_default();
        let (text, stopped) = self.stop.push(&piece);
        if !text.is_empty() {
            self.out.push_back(Event::Text(text));
        }
        if stopped {
            self.finish(FinishReason::Stop, false);
        } else if self.generated.len() >= self.params.max_tokens
            || self.cache.len() + 1 >= self.model.max_position()
        {
            self.finish(FinishReason::Length, true);
        } else {
            self.pending = Some(vec![token]);
        }
        Ok(())
    }
}

impl<B: Backend> Iterator for Generation<'_, B> {
    type Item = Result<Event, EngineError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.out.pop_front() {
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
