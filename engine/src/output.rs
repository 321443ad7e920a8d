//! What a generation emits: text deltas through stop strings and end-of-generation checks,
//! timings, and the final event. Shared by plain and speculative generation.

use std::collections::VecDeque;
use std::time::Duration;

use arbor_model::{TextStream, Tokenizer, Transformer};
use burn::tensor::backend::Backend;
use serde::Serialize;

use crate::{EngineError, FinishReason, GenerateParams, Prompt, SpecStats, StepStats, StopMatcher};

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
    /// Speculation figures (speculative generations only).
    pub spec: Option<SpecStats>,
}

/// One item of a generation stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text (complete UTF-8, never part of a stop string).
    Text(String),
    /// One speculative draft → verify → commit step finished (before its text).
    Step(StepStats),
    /// The end; always the last event.
    Done(Finished),
}

/// Token ids of `prompt` (chat prompts rendered with the model's template).
pub(crate) fn prompt_tokens(tok: &Tokenizer, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
    Ok(match prompt {
        Prompt::Text(t) => tok.encode(t)?,
        Prompt::Chat(m) => tok.encode(&tok.apply_chat_template(m)?)?,
        Prompt::Tokens(t) => t.clone(),
    })
}

/// Refuses empty, over-long and out-of-vocabulary prompts.
pub(crate) fn check_prompt<B: Backend>(
    ids: &[u32],
    model: &Transformer<B>,
) -> Result<(), EngineError> {
    if ids.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    let context = model.max_position();
    if ids.len() >= context {
        return Err(EngineError::PromptTooLong {
            prompt: ids.len(),
            context,
        });
    }
    let vocab = model.vocab_size();
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(EngineError::InvalidParams(format!(
            "prompt token {bad} outside vocabulary {vocab}"
        )));
    }
    Ok(())
}

/// Turns generated tokens into events.
pub(crate) struct Output<'t> {
    tokenizer: &'t Tokenizer,
    stream: TextStream<'t>,
    stop: StopMatcher,
    max_tokens: usize,
    ignore_eos: bool,
    generated: Vec<u32>,
    stats: GenerationStats,
    spec: Option<SpecStats>,
    out: VecDeque<Event>,
    done: bool,
}

impl<'t> Output<'t> {
    pub(crate) fn new(tokenizer: &'t Tokenizer, params: &GenerateParams, prompt: usize) -> Self {
        Self {
            tokenizer,
            stream: tokenizer.decode_stream(true),
            stop: StopMatcher::new(params.stop.clone()),
            max_tokens: params.max_tokens,
            ignore_eos: params.ignore_eos,
            generated: Vec::new(),
            stats: GenerationStats {
                prompt_tokens: prompt,
                ..Default::default()
            },
            spec: None,
            out: VecDeque::new(),
            done: false,
        }
    }

    /// Tokens generated so far.
    pub(crate) fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// Tokens still allowed by `max_tokens`.
    pub(crate) fn remaining(&self) -> usize {
        self.max_tokens.saturating_sub(self.generated.len())
    }

    /// Counts `d` as prefill time until the first token exists, decode time after.
    pub(crate) fn add_time(&mut self, d: Duration) {
        if self.generated.is_empty() {
            self.stats.prefill += d;
        } else {
            self.stats.decode += d;
        }
    }

    /// Speculation figures to report at the end.
    pub(crate) fn spec_mut(&mut self) -> &mut SpecStats {
        self.spec.get_or_insert_with(SpecStats::default)
    }

    /// Queues a step event.
    pub(crate) fn step(&mut self, s: StepStats) {
        self.out.push_back(Event::Step(s));
    }

    /// Adds one token (with `context_left` positions still free after it) and queues its text;
    /// returns the finish reason if the generation ends with it.
    pub(crate) fn push(
        &mut self,
        token: u32,
        context_left: usize,
    ) -> Result<Option<FinishReason>, EngineError> {
        debug_assert!(!self.done, "token pushed after the end");
        self.generated.push(token);
        self.stats.generated_tokens += 1;
        if !self.ignore_eos && self.tokenizer.is_end_of_generation(token) {
            self.finish(FinishReason::Stop, true);
            return Ok(Some(FinishReason::Stop));
        }
        let piece = self.stream.step(token)?.unwrap_or_default();
        let (text, stopped) = self.stop.push(&piece);
        if !text.is_empty() {
            self.out.push_back(Event::Text(text));
        }
        let reason = if stopped {
            self.finish(FinishReason::Stop, false);
            Some(FinishReason::Stop)
        } else if self.generated.len() >= self.max_tokens || context_left == 0 {
            self.finish(FinishReason::Length, true);
            Some(FinishReason::Length)
        } else {
            None
        };
        Ok(reason)
    }

    /// Adds `tokens` in order (appending each to `context`) until one ends the generation;
    /// `first_pos` is the position the first takes in a context of `max_position`. Returns
    /// whether the generation ended.
    pub(crate) fn push_all(
        &mut self,
        context: &mut Vec<u32>,
        tokens: &[u32],
        first_pos: usize,
        max_position: usize,
    ) -> Result<bool, EngineError> {
        for (k, &t) in tokens.iter().enumerate() {
            context.push(t);
            let left = max_position.saturating_sub(first_pos + k + 1);
            if self.push(t, left)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Queues held-back text and the final event.
    fn finish(&mut self, reason: FinishReason, flush: bool) {
        self.done = true;
        let rest = self.stop.flush();
        if flush && !rest.is_empty() {
            self.out.push_back(Event::Text(rest));
        }
        self.out.push_back(Event::Done(Finished {
            reason,
            stats: self.stats.clone(),
            tokens: std::mem::take(&mut self.generated),
            spec: self.spec.take(),
        }));
    }

    /// The next queued event.
    pub(crate) fn pop(&mut self) -> Option<Event> {
        self.out.pop_front()
    }
}
