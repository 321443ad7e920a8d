//! Speculative generation for one sequence: draft → verify → commit.

mod policy;
mod stats;
pub(crate) mod step;
mod vocab;

use std::time::Instant;

use std::sync::Arc;

use arbor_cache::{KvCache, KvPolicy};
use arbor_model::{KV_PAGE_SIZE, Sampler, Tokenizer, Transformer};
use arbor_speculators::{Draft, ModelDraft};
use burn::tensor::backend::Backend;

pub use policy::{Planner, TreePolicy, VERIFY_SIZES, time_verify};
pub(crate) use policy::{measure_verify_cost, refresh_verify_cost};
pub use stats::{DepthStats, DraftStats, SpecStats, StepStats};
pub(crate) use vocab::check_model_draft;
pub use vocab::check_same_tokenizer;

use crate::generator::prefill;
use crate::output::{Event, Output, check_prompt, prompt_tokens};
use crate::{EngineError, GenerateParams, Prompt};
use step::{cap_depth, draft_tree, tree_capacity, verify_commit};

/// Speculative decoding of one sequence at a time: a target model, its drafts and a tree
/// policy. Greedy output equals the target's plain greedy output token for token; sampled
/// output follows the target's distribution exactly (SpecInfer verification).
pub struct Engine<'m, B: Backend> {
    target: &'m Transformer<B>,
    tokenizer: &'m Tokenizer,
    drafts: Vec<Box<dyn Draft + 'm>>,
    policy: TreePolicy,
    planner: Planner,
    kv_policy: Option<Arc<KvPolicy>>,
}

impl<B: Backend> std::fmt::Debug for Engine<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("drafts", &self.draft_names())
            .field("policy", &self.policy)
            .finish()
    }
}

impl<'m, B: Backend> Engine<'m, B> {
    /// An engine with no drafts yet (it then decodes plainly, one token per step).
    pub fn new(target: &'m Transformer<B>, tokenizer: &'m Tokenizer, policy: TreePolicy) -> Self {
        Self {
            target,
            tokenizer,
            drafts: Vec::new(),
            policy,
            planner: Planner::default(),
            kv_policy: None,
        }
    }

    /// Compresses the target's KV cache with `policy` (built and checked for
    /// [`Transformer::kv_layout`] with pages of [`KV_PAGE_SIZE`]; CPU backend). Trees are cut
    /// to the depth the policy allows, so greedy output stays that of plain decoding under the
    /// same policy.
    ///
    /// # Errors
    /// [`EngineError::KvPolicy`] if the policy does not fit the target's paged cache.
    pub fn with_kv_policy(mut self, policy: Arc<KvPolicy>) -> Result<Self, EngineError> {
        crate::error::check_kv_policy(self.target, KV_PAGE_SIZE, &policy)?;
        self.kv_policy = Some(policy);
        Ok(self)
    }

    /// Adds any draft (the caller vouches that it speaks the target's token ids).
    #[must_use]
    pub fn with_draft(mut self, draft: impl Draft + 'm) -> Self {
        self.drafts.push(Box::new(draft));
        self
    }

    /// Adds a model draft after checking that its tokenizer matches the target's.
    ///
    /// # Errors
    /// [`EngineError::DraftMismatch`] for a different tokenizer or a smaller vocabulary.
    pub fn with_model_draft(
        self,
        name: &str,
        model: &Transformer<B>,
        tokenizer: &Tokenizer,
    ) -> Result<Self, EngineError>
    where
        B: 'm,
    {
        check_model_draft(self.tokenizer, model, tokenizer, name)?;
        Ok(self.with_draft(ModelDraft::new(name, model.clone())))
    }

    /// The drafts' names, in order.
    pub fn draft_names(&self) -> Vec<String> {
        self.drafts.iter().map(|d| d.name().to_string()).collect()
    }

    /// The tree policy.
    pub fn policy(&self) -> &TreePolicy {
        &self.policy
    }

    /// The cost model `auto` uses (measured figures; empty before the first generation).
    pub fn planner(&self) -> &Planner {
        &self.planner
    }

    /// Starts `auto` from a cost model measured before (e.g. another engine's
    /// [`planner`](Self::planner) on the same target and machine): a calibrated one is not
    /// measured again, only kept up to date as steps run.
    #[must_use]
    pub fn with_planner(mut self, planner: Planner) -> Self {
        self.planner = planner;
        self
    }

    /// Starts a speculative generation. Work happens as the returned iterator is advanced;
    /// besides text it yields an [`Event::Step`] per verification step.
    ///
    /// # Errors
    /// Invalid parameters, an empty or over-long prompt, or tokenizer failures.
    pub fn generate(
        &mut self,
        prompt: &Prompt,
        params: &GenerateParams,
    ) -> Result<SpecGeneration<'_, 'm, B>, EngineError> {
        params.validate()?;
        let ids = prompt_tokens(self.tokenizer, prompt)?;
        check_prompt(&ids, self.target)?;
        for d in &mut self.drafts {
            d.reset();
        }
        let mut output = Output::new(self.tokenizer, params, ids.len());
        output.spec_mut().drafts = self
            .drafts
            .iter()
            .map(|d| DraftStats {
                name: d.name().into(),
                ..DraftStats::default()
            })
            .collect();
        Ok(SpecGeneration {
            cache: self
                .target
                .new_cache_with(KV_PAGE_SIZE, self.kv_policy.clone()),
            sampler: Sampler::new(params.sampling.clone()),
            params: params.clone(),
            context: ids,
            output,
            started: false,
            finished: false,
            engine: self,
        })
    }
}

/// A running speculative generation; iterate it for [`Event`]s.
pub struct SpecGeneration<'e, 'm, B: Backend> {
    engine: &'e mut Engine<'m, B>,
    cache: KvCache<B>,
    sampler: Sampler,
    params: GenerateParams,
    /// Prompt and generated tokens; once started, the last one is the next tree's root (not
    /// yet in the cache).
    context: Vec<u32>,
    output: Output<'m>,
    started: bool,
    finished: bool,
}

impl<B: Backend> std::fmt::Debug for SpecGeneration<'_, '_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpecGeneration")
            .field("context", &self.context.len())
            .finish()
    }
}

impl<B: Backend> SpecGeneration<'_, '_, B> {
    /// Prefill and the first token (sampled by the target alone).
    fn start(&mut self) -> Result<(), EngineError> {
        let t0 = Instant::now();
        let logits = prefill(
            self.engine.target,
            &mut self.cache,
            &self.context,
            self.params.prefill_chunk,
        )?;
        let token = self.sampler.sample(&logits);
        // Drafts take in the prompt now, so their first proposal only feeds the first token.
        let mut with_first = self.context.clone();
        with_first.push(token);
        for d in &mut self.engine.drafts {
            d.prefill(&with_first, self.params.prefill_chunk)?;
        }
        self.output.add_time(t0.elapsed());
        let first_pos = self.cache.len();
        self.push(&[token], first_pos)
    }

    /// Hands emitted tokens to the output (stopping at the end) and extends the context;
    /// `first_pos` is the position the first of them will take.
    fn push(&mut self, tokens: &[u32], first_pos: usize) -> Result<(), EngineError> {
        let max = self.engine.target.max_position();
        if self
            .output
            .push_all(&mut self.context, tokens, first_pos, max)?
        {
            self.finished = true;
        }
        Ok(())
    }

    /// Measures the target's verify cost by tree size (once per engine, for `auto`), up to the
    /// largest tree `width × max_depth` per draft can merge into.
    fn calibrate(&mut self, width: usize, max_depth: usize) -> Result<(), EngineError> {
        let root = *self.context.last().expect("started");
        let most = 1 + self.engine.drafts.len() * width * max_depth;
        let timings = measure_verify_cost(
            self.engine.target,
            &mut self.cache,
            root,
            max_depth,
            Some(most),
        )?;
        self.engine.planner.set_calibration(&timings);
        Ok(())
    }

    /// Times the verify cost of a size again if the planner asks for it (a suspect size, or
    /// one no step has had for a while: [`Planner::refresh_due`]); its time is booked as
    /// decoding time.
    fn refresh_verify_cost(&mut self) -> Result<(), EngineError> {
        let t0 = Instant::now();
        let root = *self.context.last().expect("started");
        let e = &mut *self.engine;
        refresh_verify_cost(&mut e.planner, e.target, &mut self.cache, root)?;
        self.output.add_time(t0.elapsed());
        Ok(())
    }

    /// One draft → verify → commit step.
    fn step(&mut self) -> Result<(), EngineError> {
        let target = self.engine.target;
        let cached = self.cache.len();
        // Tokens a step may still emit, and tree depth the context allows.
        let max_depth = (self.output.remaining().saturating_sub(1))
            .min(target.max_position().saturating_sub(cached + 1))
            .min(self.cache.max_tree_depth().unwrap_or(usize::MAX));
        let (shape, gates) = match self.engine.policy.clone() {
            TreePolicy::Fixed(s) => (s, Vec::new()),
            TreePolicy::Auto {
                width,
                max_depth: deepest,
            } => {
                if !self.engine.planner.calibrated() && !self.engine.drafts.is_empty() {
                    self.calibrate(width, deepest)?;
                }
                self.refresh_verify_cost()?;
                let p = &self.engine.planner;
                let (shape, gates) = p.plan_gated(width, deepest);
                tracing::debug!(
                    ?shape,
                    ?gates,
                    draft_cost = ?p.draft_cost,
                    verify_cost = ?p.verify_cost,
                    overhead = p.overhead,
                    node_fill = ?p.node_fill,
                    "planned"
                );
                (shape, gates)
            }
        };
        let shape = cap_depth(&shape, max_depth);
        let step_start = Instant::now();
        let d = draft_tree(
            &mut self.engine.drafts,
            &self.context,
            (&shape, &gates),
            &self.params,
            &mut self.sampler,
            &mut self.output,
        )?;
        let t0 = Instant::now();
        let rows = target.forward_all_logits(&d.tree.forward_input(cached), &mut self.cache)?;
        let v = verify_commit(
            &d.tree,
            &rows,
            &self.params,
            &mut self.sampler,
            &mut self.cache,
            cached,
            &mut self.output,
            (d.time, t0.elapsed()),
        );
        // Time is booked before the tokens: the last one may end the generation, and the
        // final event carries the totals.
        let total = step_start.elapsed();
        self.output.add_time(total);
        self.push(&v.tokens, cached + 1)?;
        let spent = d.time + v.verify_time;
        let overhead = total.saturating_sub(spent).as_secs_f64();
        self.engine
            .planner
            .observe(shape.width(), &v.walk, &d.per_forward, overhead);
        self.engine
            .planner
            .observe_verify(d.tree.len(), v.verify_time.as_secs_f64());
        if shape.depth() > 0 {
            let capacity = tree_capacity(&shape, &d.tree, self.engine.drafts.len());
            self.engine
                .planner
                .observe_tree_step(&d.tree, v.tokens.len(), capacity);
        }
        Ok(())
    }
}

impl<B: Backend> Iterator for SpecGeneration<'_, '_, B> {
    type Item = Result<Event, EngineError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.output.pop() {
                return Some(Ok(e));
            }
            if self.finished {
                return None;
            }
            let r = if self.started {
                self.step()
            } else {
                self.started = true;
                self.start()
            };
            if let Err(e) = r {
                self.finished = true;
                return Some(Err(e));
            }
        }
    }
}
