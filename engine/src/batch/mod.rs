//! Continuous batching: many sequences, one target forward per step.
//!
//! [`BatchEngine`] keeps a queue of waiting requests and a set of running sequences. Each
//! [`step`](BatchEngine::step) asks the [`Scheduler`] what every sequence does (a prompt chunk,
//! one plain token, or a draft tree of some size), drafts the trees, runs **one** batched
//! target forward over all of it ([`Transformer::forward_batch`]: ragged sequences, each
//! with its own cache and mask), then verifies each tree, commits the accepted rows and
//! hands the sequence's events to its [`EventSink`]. Requests join between steps; a sink
//! whose receiver is gone cancels its request at the next step and frees its cache.
//!
//! ```
//! use std::sync::mpsc;
//! use arbor_engine::{BatchEngine, BatchRequest, Event, GenerateParams, Prompt, SchedulerConfig};
//! use arbor_model::{Architecture, ModelConfig, RandomWeights, Transformer};
//! use arbor_speculators::NgramDraft;
//! type B = burn::backend::Flex;
//! let dev = Default::default();
//! let tok = arbor_model::testing::byte_tokenizer();
//! let config =
//!     ModelConfig { vocab_size: tok.vocab_size(), ..ModelConfig::tiny(Architecture::Llama) };
//! let target = Transformer::<B>::from_weights(&config, &mut RandomWeights::new(1, 0.2), &dev)?;
//! let mut engine = BatchEngine::new(&target, &tok, SchedulerConfig::default())?
//!     .with_draft(|| Box::new(NgramDraft::default()))
//!     .with_tree("chain:3".parse()?);
//! let params = GenerateParams { max_tokens: 5, ignore_eos: true, ..GenerateParams::default() };
//! let mut streams = Vec::new();
//! for text in ["abcabc", "hello"] {
//!     let (tx, rx) = mpsc::channel();
//!     let req = BatchRequest::new(Prompt::Text(text.into()), params.clone());
//!     engine.add(req, Box::new(tx))?;
//!     streams.push(rx);
//! }
//! while engine.has_work() {
//!     engine.step();
//! }
//! for rx in streams {
//!     let done = rx.try_iter().find_map(|e| match e {
//!         Ok(Event::Done(d)) => Some(d),
//!         _ => None,
//!     });
//!     assert_eq!(done.unwrap().tokens.len(), 5);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod scheduler;
mod sequence;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbor_cache::KvPolicy;
use arbor_model::{SeqForward, Tokenizer, Transformer};
use arbor_speculators::{Draft, ModelDraft, TreeShape};
use burn::tensor::backend::Backend;

pub use scheduler::{Scheduler, SchedulerConfig, SeqLoad, StepPlan, Work};

use crate::output::{Event, Output, check_prompt, prompt_tokens};
use crate::spec::{check_model_draft, measure_verify_cost, refresh_verify_cost};
use crate::{DraftStats, EngineError, GenerateParams, Prompt};
use crate::{Planner, TreePolicy};
use sequence::Sequence;

/// Identifies a request within one [`BatchEngine`].
pub type RequestId = u64;

/// Where a request's events go. Implemented for `std::sync::mpsc::Sender`; servers wrap
/// their async channels.
pub trait EventSink {
    /// Delivers one item; `false` if the receiver is gone (the request is then cancelled).
    fn send(&mut self, item: Result<Event, EngineError>) -> bool;

    /// Whether the receiver is gone, checked before every step (a client that disconnected
    /// while nothing was sent to it is noticed within one step).
    fn is_closed(&self) -> bool {
        false
    }
}

impl EventSink for std::sync::mpsc::Sender<Result<Event, EngineError>> {
    fn send(&mut self, item: Result<Event, EngineError>) -> bool {
        std::sync::mpsc::Sender::send(self, item).is_ok()
    }
}

/// Builds a fresh draft for one sequence (drafts hold per-sequence state).
pub type DraftFactory<'m> = Box<dyn Fn() -> Box<dyn Draft + 'm> + 'm>;

/// One generation request.
#[derive(Debug, Clone)]
pub struct BatchRequest {
    /// What to continue.
    pub prompt: Prompt,
    /// Sampling, stops and limits (`prefill_chunk` is the scheduler's here).
    pub params: GenerateParams,
    /// Speculate for this request (when the engine has drafts and a tree shape).
    pub speculate: bool,
    /// Fail with [`EngineError::Timeout`] if not finished by then.
    pub deadline: Option<Instant>,
}

impl BatchRequest {
    /// A request that speculates (if the engine can) and has no deadline.
    pub fn new(prompt: Prompt, params: GenerateParams) -> Self {
        Self {
            prompt,
            params,
            speculate: true,
            deadline: None,
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Rows in the step's target forward.
    pub rows: usize,
    /// Sequences in that forward.
    pub sequences: usize,
    /// Prompt tokens fed.
    pub prefill_rows: usize,
    /// Tree nodes verified beyond the roots.
    pub tree_rows: usize,
    /// Sequences admitted from the queue.
    pub admitted: usize,
    /// Sequences preempted (cache dropped, back in the queue).
    pub preempted: usize,
    /// Sequences that ended (finished, failed, cancelled or timed out).
    pub ended: usize,
}

/// A snapshot of the engine's load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Sequences running.
    pub running: usize,
    /// Requests waiting.
    pub waiting: usize,
    /// KV tokens held by running sequences.
    pub kv_tokens: usize,
    /// Bytes of KV storage they hold (whole pages on the CPU's paged cache).
    pub kv_bytes: usize,
    /// KV pages they occupy.
    pub kv_pages_used: usize,
    /// KV pages in all.
    pub kv_pages_total: usize,
}

/// Continuous batching with speculative decoding over one target model.
pub struct BatchEngine<'m, B: Backend> {
    target: &'m Transformer<B>,
    tokenizer: &'m Tokenizer,
    drafts: Vec<(String, DraftFactory<'m>)>,
    policy: Option<TreePolicy>,
    planner: Planner,
    scheduler: Scheduler,
    waiting: VecDeque<Sequence<'m, B>>,
    running: Vec<Sequence<'m, B>>,
    next_id: RequestId,
    kv_policy: Option<Arc<KvPolicy>>,
}

impl<B: Backend> std::fmt::Debug for BatchEngine<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchEngine")
            .field("load", &self.load())
            .field("policy", &self.policy)
            .finish()
    }
}

impl<'m, B: Backend> BatchEngine<'m, B> {
    /// An engine with no drafts (plain decoding) under `config`'s limits.
    ///
    /// # Errors
    /// [`EngineError::InvalidParams`] for inconsistent limits.
    pub fn new(
        target: &'m Transformer<B>,
        tokenizer: &'m Tokenizer,
        config: SchedulerConfig,
    ) -> Result<Self, EngineError> {
        Ok(Self {
            target,
            tokenizer,
            drafts: Vec::new(),
            policy: None,
            planner: Planner::default(),
            scheduler: Scheduler::new(config).map_err(EngineError::InvalidParams)?,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            kv_policy: None,
        })
    }

    /// Adds a draft, built afresh for every sequence by `factory` (the caller vouches that it
    /// speaks the target's token ids).
    #[must_use]
    pub fn with_draft(mut self, factory: impl Fn() -> Box<dyn Draft + 'm> + 'm) -> Self {
        let name = factory().name().to_string();
        self.drafts.push((name, Box::new(factory)));
        self
    }

    /// Adds a model draft after checking its tokenizer; each sequence gets its own cache over
    /// the shared weights.
    ///
    /// # Errors
    /// [`EngineError::DraftMismatch`] for a different tokenizer or a smaller vocabulary.
    pub fn with_model_draft(
        self,
        name: &str,
        model: &'m Transformer<B>,
        tokenizer: &Tokenizer,
    ) -> Result<Self, EngineError> {
        check_model_draft(self.tokenizer, model, tokenizer, name)?;
        let name = name.to_string();
        Ok(self.with_draft(move || Box::new(ModelDraft::new(name.clone(), model.clone()))))
    }

    /// The tree shape speculating sequences verify (cut down by the scheduler under load).
    #[must_use]
    pub fn with_tree(self, shape: TreeShape) -> Self {
        self.with_tree_policy(TreePolicy::Fixed(shape))
    }

    /// How speculating sequences' trees are shaped: fixed, or `auto` — the [`Planner`] picks
    /// the shape every step from the target's measured verify cost (measured once, on the
    /// first speculating sequence's cache, which is left as it was) and the acceptance seen
    /// so far, pooled over all sequences; plain decoding when no tree pays. Either way the
    /// scheduler cuts trees down under load.
    #[must_use]
    pub fn with_tree_policy(mut self, policy: TreePolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// The cost model `auto` uses.
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

    /// Compresses every sequence's KV cache with `policy` (quantization, Quest, H2O; CPU
    /// backend). Build and check it for [`Transformer::kv_layout`] with this engine's page
    /// size. Trees are cut to the depth the policy allows ([`KvPolicy::max_tree_depth`]).
    ///
    /// # Errors
    /// [`EngineError::KvPolicy`] if the policy does not fit the target's paged cache.
    pub fn with_kv_policy(mut self, policy: Arc<KvPolicy>) -> Result<Self, EngineError> {
        crate::error::check_kv_policy(self.target, self.config().page_size, &policy)?;
        self.kv_policy = Some(policy);
        Ok(self)
    }

    /// The drafts' names.
    pub fn draft_names(&self) -> Vec<String> {
        self.drafts.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The scheduler's limits.
    pub fn config(&self) -> &SchedulerConfig {
        self.scheduler.config()
    }

    /// Queues a request; its events go to `sink`.
    ///
    /// # Errors
    /// Invalid parameters, an empty, over-long or out-of-vocabulary prompt, tokenizer
    /// failures, or [`EngineError::QueueFull`].
    pub fn add(
        &mut self,
        req: BatchRequest,
        sink: Box<dyn EventSink>,
    ) -> Result<RequestId, EngineError> {
        req.params.validate()?;
        let in_flight = self.waiting.len() + self.running.len();
        let limit = self.config().max_running + self.config().max_waiting;
        if in_flight >= limit {
            return Err(EngineError::QueueFull { in_flight, limit });
        }
        let ids = prompt_tokens(self.tokenizer, &req.prompt)?;
        check_prompt(&ids, self.target)?;
        let c = self.config();
        if c.pages(ids.len() + 1) > c.kv_pages {
            return Err(EngineError::KvCapacity {
                tokens: ids.len() + 1,
                capacity: c.kv_pages * c.page_size,
            });
        }
        let speculate = req.speculate && self.policy.is_some() && !self.drafts.is_empty();
        let mut output = Output::new(self.tokenizer, &req.params, ids.len());
        let drafts = if speculate {
            output.spec_mut().drafts = self
                .drafts
                .iter()
                .map(|(name, _)| DraftStats {
                    name: name.clone(),
                    ..DraftStats::default()
                })
                .collect();
            self.drafts.iter().map(|(_, f)| f()).collect()
        } else {
            Vec::new()
        };
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back(Sequence::new(
            id,
            ids,
            req.params,
            output,
            drafts,
            sink,
            req.deadline,
            self.target
                .new_cache_with(self.config().page_size, self.kv_policy.clone()),
        ));
        Ok(id)
    }

    /// Ends a request now (its cache is freed); `false` if it is not known (already over).
    pub fn cancel(&mut self, id: RequestId) -> bool {
        let before = self.running.len() + self.waiting.len();
        self.running.retain(|s| s.id != id);
        self.waiting.retain(|s| s.id != id);
        before != self.running.len() + self.waiting.len()
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// The engine's load now.
    pub fn load(&self) -> Load {
        let c = self.config();
        let kv_tokens = self.running.iter().map(|s| s.cache.len()).sum();
        // Pages allocated by paged caches; pages the tokens would fill for dense ones.
        let kv_pages_used = self
            .running
            .iter()
            .map(|s| {
                s.cache
                    .paged_store()
                    .map_or_else(|| c.pages(s.cache.len()), |p| p.pages())
            })
            .sum();
        Load {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_tokens,
            kv_bytes: self.running.iter().map(|s| s.cache.bytes()).sum(),
            kv_pages_used,
            kv_pages_total: c.kv_pages,
        }
    }

    /// Ends sequences whose receiver is gone or whose deadline passed.
    fn reap(&mut self) -> usize {
        let now = Instant::now();
        let mut ended = 0;
        for s in self.running.iter_mut().chain(self.waiting.iter_mut()) {
            if s.sink.is_closed() {
                s.done = true;
            } else if s.deadline.is_some_and(|d| now >= d) {
                s.fail(EngineError::Timeout {
                    after: now - s.arrived,
                });
            }
            ended += usize::from(s.done);
        }
        self.running.retain(|s| !s.done);
        self.waiting.retain(|s| !s.done);
        ended
    }

    /// One scheduling step: admit, prefill chunks, draft, one batched target forward, verify
    /// and commit, deliver events. Failures end only the sequences they concern.
    pub fn step(&mut self) -> StepReport {
        let mut report = StepReport {
            ended: self.reap(),
            ..StepReport::default()
        };
        let max_pos = self.target.max_position();
        let tree = self.step_shape();
        let shape = tree.as_ref().map(|(s, _)| s);
        let running: Vec<SeqLoad> = self
            .running
            .iter()
            .map(|s| s.load(max_pos, shape))
            .collect();
        let waiting: Vec<SeqLoad> = self
            .waiting
            .iter()
            .map(|s| s.load(max_pos, shape))
            .collect();
        let plan = self.scheduler.plan(&running, &waiting);
        report.admitted = plan.admit;
        for _ in 0..plan.admit {
            let s = self.waiting.pop_front().expect("planned from the queue");
            self.running.push(s);
        }
        // Preempted sequences go back to the queue's front, in their order.
        let mut work = Vec::with_capacity(plan.work.len());
        let mut kept = Vec::with_capacity(self.running.len());
        let mut preempted = Vec::new();
        let capacity = self.config().kv_pages * self.config().page_size;
        for (mut s, w) in self.running.drain(..).zip(plan.work) {
            if w == Work::Preempt {
                s.preempt();
                preempted.push(s);
            } else if w == Work::Abort {
                s.fail(EngineError::KvCapacity {
                    tokens: s.cache.len() + 1,
                    capacity,
                });
                report.ended += 1;
            } else {
                kept.push(s);
                work.push(w);
            }
        }
        report.preempted = preempted.len();
        for s in preempted.into_iter().rev() {
            tracing::debug!(id = s.id, "preempted (KV pages exhausted)");
            self.waiting.push_front(s);
        }
        self.running = kept;

        for (s, w) in self.running.iter_mut().zip(&work) {
            match *w {
                Work::Prefill(n) => {
                    s.prepare_prefill(n);
                    report.prefill_rows += n;
                }
                Work::Decode(n) => {
                    let tree = tree.as_ref().map(|(s, g)| (s, &g[..]));
                    if let Err(e) = s.prepare_decode(n, tree) {
                        s.fail(e);
                    }
                }
                Work::Idle | Work::Preempt | Work::Abort => {}
            }
        }
        self.forward(&mut report);
        for s in &mut self.running {
            s.flush();
        }
        let before = self.running.len();
        self.running.retain(|s| !s.done);
        report.ended += before - self.running.len();
        report
    }

    /// This step's tree shape and growth gates: the fixed shape (no gates), or the planner's
    /// pick for the sequences ready to speculate, [`Planner::plan_batch`] (measuring the
    /// verify cost first, on a speculating sequence at its commit point, if not done yet).
    ///
    /// A gated shape reaches the deepest level, and the scheduler books its rows before
    /// anyone drafts; that costs nothing the gates leave unused: tree rows come last, out of
    /// what prompt chunks and plain rows leave of `spec_max_rows`, and their KV pages are
    /// only checked, not held, until the commit.
    fn step_shape(&mut self) -> Option<(TreeShape, Vec<f32>)> {
        let Some(TreePolicy::Auto { width, max_depth }) = self.policy else {
            return match &self.policy {
                Some(TreePolicy::Fixed(s)) => Some((s.clone(), Vec::new())),
                _ => None,
            };
        };
        if !self.planner.calibrated()
            && let Some(s) = self.running.iter_mut().find(|s| s.ready_to_speculate())
        {
            let root = s.root();
            match measure_verify_cost(self.target, &mut s.cache, root, max_depth, None) {
                Ok(timings) => self.planner.set_calibration(&timings),
                Err(e) => s.fail(e),
            }
        }
        if !self.planner.calibrated() {
            return None;
        }
        self.refresh_verify_cost();
        let seqs = self
            .running
            .iter()
            .filter(|s| s.ready_to_speculate())
            .count();
        let (shape, gates) = self.planner.plan_batch(width, max_depth, seqs);
        let p = &self.planner;
        tracing::trace!(
            seqs,
            ?shape,
            ?gates,
            draft_cost = ?p.draft_cost,
            spec_steps = ?p.spec_steps,
            node_fill = ?p.node_fill,
            "planned"
        );
        if shape.depth() == 0 {
            // Plain decoding pays better: a plain step ages the planner's evidence, as it
            // does for one sequence alone, so that speculation is tried again later.
            if seqs > 0 {
                self.planner.observe(0, &[], &[], 0.0);
            }
            return None;
        }
        Some((shape, gates))
    }

    /// Times the verify cost of a row count again if the planner asks for it (a suspect one,
    /// or one no step has had for a while: [`Planner::refresh_due`]), on a sequence ready to
    /// speculate (as the calibration did).
    fn refresh_verify_cost(&mut self) {
        let Some(s) = self.running.iter_mut().find(|s| s.ready_to_speculate()) else {
            return;
        };
        let root = s.root();
        if let Err(e) = refresh_verify_cost(&mut self.planner, self.target, &mut s.cache, root) {
            s.fail(e);
        }
    }

    /// The batched target forward over every prepared sequence, and each one's commit.
    fn forward(&mut self, report: &mut StepReport) {
        let max_pos = self.target.max_position();
        let t0 = Instant::now();
        let mut batch: Vec<SeqForward<'_, B>> = Vec::new();
        for s in self.running.iter_mut().filter(|s| !s.done) {
            let logits = s.logit_rows();
            if let Some(input) = &s.input {
                report.rows += input.n_new;
                batch.push(SeqForward {
                    input,
                    cache: &mut s.cache,
                    logits,
                });
            }
        }
        if batch.is_empty() {
            return;
        }
        report.sequences = batch.len();
        let result = self.target.forward_batch(&mut batch);
        drop(batch);
        let forward_time: Duration = t0.elapsed();
        if result.is_ok() && report.prefill_rows == 0 {
            // A decode step's forward prices its row count on the verify curve (as one
            // sequence's steps do): a calibration slowed by a busy moment must not keep the
            // batch from speculating for the whole run.
            self.planner
                .observe_verify(report.rows, forward_time.as_secs_f64());
        }
        let mut results = match result {
            Ok(r) => r.into_iter(),
            Err(e) => {
                tracing::error!(error = %e, "batched forward failed");
                for s in self.running.iter_mut().filter(|s| s.input.is_some()) {
                    s.input = None;
                    s.pending = None;
                    s.fail(EngineError::Step(e.to_string()));
                }
                return;
            }
        };
        for s in self
            .running
            .iter_mut()
            .filter(|s| !s.done && s.input.is_some())
        {
            let rows = results.next().expect("one result per sequence");
            report.tree_rows += s.tree_rows();
            match s.finish_step(&rows, max_pos, forward_time) {
                Ok(Some(o)) => {
                    let p = &mut self.planner;
                    p.observe(o.width, &o.walk, &o.per_forward, 0.0);
                    p.observe_tree_step(&o.tree, o.tokens, o.capacity);
                }
                Ok(None) => {}
                Err(e) => s.fail(e),
            }
        }
    }
}

#[cfg(test)]
mod tests;
