//! One sequence of the batch: its cache, drafts, sampler and output, and what it does with
//! the rows of a step's forward.

use std::time::Instant;

use arbor_cache::KvCache;
use arbor_model::{ForwardInput, LogitRows, Sampler};
use arbor_speculators::{Draft, TokenTree, TreeShape};
use burn::tensor::backend::Backend;

use super::{EventSink, RequestId, SeqLoad};
use crate::output::Output;
use crate::spec::step::{Drafted, cap_depth, draft_tree, tree_capacity, verify_commit};
use crate::{EngineError, GenerateParams};

/// The part of a sequence's step that needs the target's rows.
pub(super) enum Pending {
    /// Prompt tokens (`logits` says whether they end the prompt).
    Prefill { logits: LogitRows },
    /// One plain token (the root).
    Plain,
    /// A drafted tree.
    Tree {
        drafted: Drafted,
        /// The width of the shape it was grown with.
        width: usize,
        /// Nodes below the root its drafts could have proposed ([`tree_capacity`]).
        capacity: usize,
    },
}

/// What one verified tree tells the planner.
pub(super) struct Observed {
    pub width: usize,
    pub walk: Vec<bool>,
    pub per_forward: Vec<Option<f64>>,
    /// Tokens the step emitted.
    pub tokens: usize,
    /// The verified tree.
    pub tree: TokenTree,
    /// Nodes below the root its drafts could have proposed at the depth it reached.
    pub capacity: usize,
}

pub(super) struct Sequence<'m, B: Backend> {
    pub id: RequestId,
    pub cache: KvCache<B>,
    sampler: Sampler,
    params: GenerateParams,
    /// Prompt and generated tokens; once started, the last one is the next step's root (not
    /// yet in the cache).
    context: Vec<u32>,
    started: bool,
    pub output: Output<'m>,
    drafts: Vec<Box<dyn Draft + 'm>>,
    /// Whether this sequence speculates (it has drafts).
    speculate: bool,
    pub sink: Box<dyn EventSink>,
    pub deadline: Option<Instant>,
    pub arrived: Instant,
    /// Set when the sequence is over (finished, failed or its receiver gone).
    pub done: bool,
    /// The input of the step in flight.
    pub input: Option<ForwardInput>,
    pub pending: Option<Pending>,
}

impl<'m, B: Backend> Sequence<'m, B> {
    #[allow(clippy::too_many_arguments)] // private constructor, one call site
    pub fn new(
        id: RequestId,
        prompt: Vec<u32>,
        params: GenerateParams,
        output: Output<'m>,
        drafts: Vec<Box<dyn Draft + 'm>>,
        sink: Box<dyn EventSink>,
        deadline: Option<Instant>,
        cache: KvCache<B>,
    ) -> Self {
        Self {
            id,
            cache,
            sampler: Sampler::new(params.sampling.clone()),
            params,
            context: prompt,
            started: false,
            output,
            speculate: !drafts.is_empty(),
            drafts,
            sink,
            deadline,
            arrived: Instant::now(),
            done: false,
            input: None,
            pending: None,
        }
    }

    /// Tokens to feed before decoding: the prompt, or after a preemption the whole context
    /// but the root.
    fn pending_tokens(&self) -> usize {
        let fed = usize::from(self.started);
        (self.context.len() - fed).saturating_sub(self.cache.len())
    }

    /// What the scheduler sees, given the step's tree shape (`None`: nobody speculates).
    pub fn load(&self, max_position: usize, shape: Option<&TreeShape>) -> SeqLoad {
        let tree_nodes = match shape {
            Some(s) if self.started && self.speculate => {
                // Depth is bounded by tokens still allowed and the context left.
                let depth = self
                    .output
                    .remaining()
                    .saturating_sub(1)
                    .min(max_position.saturating_sub(self.cache.len() + 1))
                    .min(self.policy_depth());
                cap_depth(s, depth).max_nodes()
            }
            _ => 1,
        };
        SeqLoad {
            cached: self.cache.len(),
            pending: self.pending_tokens(),
            tree_nodes,
        }
    }

    /// The deepest tree the cache's compression policy allows now (speculative == plain).
    fn policy_depth(&self) -> usize {
        self.cache.max_tree_depth().unwrap_or(usize::MAX)
    }

    /// Whether it speculates and is decoding (at a commit point, its root not yet fed).
    pub fn ready_to_speculate(&self) -> bool {
        self.speculate && self.started && !self.done && self.pending_tokens() == 0
    }

    /// The next step's root token.
    pub fn root(&self) -> u32 {
        *self.context.last().expect("started")
    }

    /// Drops the cache (recompute preemption); the sequence resumes from its context.
    pub fn preempt(&mut self) {
        self.cache.clear();
        for d in &mut self.drafts {
            d.reset();
        }
    }

    /// Prepares `n` prompt tokens.
    pub fn prepare_prefill(&mut self, n: usize) {
        let start = self.cache.len();
        let ends_prompt = !self.started && start + n == self.context.len();
        let input = ForwardInput::causal(&self.context[start..start + n], start);
        self.input = Some(input);
        self.pending = Some(Pending::Prefill {
            logits: if ends_prompt {
                LogitRows::Last
            } else {
                LogitRows::None
            },
        });
    }

    /// Prepares a decode step with at most `nodes` tree nodes: drafts a tree of (a cut of)
    /// the step's shape, under its growth gates, when speculating.
    pub fn prepare_decode(
        &mut self,
        nodes: usize,
        plan: Option<(&TreeShape, &[f32])>,
    ) -> Result<(), EngineError> {
        let cached = self.cache.len();
        let width = plan.map_or(0, |(s, _)| s.width());
        let plan = plan
            .filter(|_| nodes > 1 && self.speculate)
            .map(|(s, g)| (largest_within(&cap_depth(s, self.policy_depth()), nodes), g));
        match plan {
            Some((shape, gates)) if shape.depth() > 0 => {
                let drafted = draft_tree(
                    &mut self.drafts,
                    &self.context,
                    (&shape, gates),
                    &self.params,
                    &mut self.sampler,
                    &mut self.output,
                )?;
                self.input = Some(drafted.tree.forward_input(cached));
                let capacity = tree_capacity(&shape, &drafted.tree, self.drafts.len());
                self.pending = Some(Pending::Tree {
                    drafted,
                    width,
                    capacity,
                });
            }
            _ => {
                let root = *self.context.last().expect("started");
                self.input = Some(ForwardInput::causal(&[root], cached));
                self.pending = Some(Pending::Plain);
            }
        }
        Ok(())
    }

    /// Tree nodes beyond the root in the step in flight.
    pub fn tree_rows(&self) -> usize {
        match &self.pending {
            Some(Pending::Tree { drafted, .. }) => drafted.tree.len() - 1,
            _ => 0,
        }
    }

    /// Which logits the step in flight needs.
    pub fn logit_rows(&self) -> LogitRows {
        match &self.pending {
            Some(Pending::Prefill { logits }) => *logits,
            Some(Pending::Plain) => LogitRows::Last,
            Some(Pending::Tree { .. }) => LogitRows::All,
            None => LogitRows::None,
        }
    }

    /// Takes the step's logits `rows` (its cache already holds the step's new rows): samples or
    /// verifies, commits, and queues output events. For a tree, returns what the planner
    /// learns from it.
    pub fn finish_step(
        &mut self,
        rows: &[Vec<f32>],
        max_position: usize,
        forward_time: std::time::Duration,
    ) -> Result<Option<Observed>, EngineError> {
        self.input = None;
        let first_pos = self.cache.len();
        match self.pending.take() {
            Some(Pending::Prefill {
                logits: LogitRows::Last,
            }) => {
                let token = self.sampler.sample(&rows[0]);
                self.output.add_time(forward_time);
                self.started = true;
                self.push(&[token], first_pos, max_position)?;
            }
            Some(Pending::Prefill { .. }) | None => self.output.add_time(forward_time),
            Some(Pending::Plain) => {
                let token = self.sampler.sample(&rows[0]);
                self.output.add_time(forward_time);
                self.push(&[token], first_pos, max_position)?;
            }
            Some(Pending::Tree {
                drafted: d,
                width,
                capacity,
            }) => {
                let cached = first_pos - d.tree.len();
                let v = verify_commit(
                    &d.tree,
                    rows,
                    &self.params,
                    &mut self.sampler,
                    &mut self.cache,
                    cached,
                    &mut self.output,
                    (d.time, forward_time),
                );
                self.output.add_time(d.time + v.verify_time);
                self.push(&v.tokens, cached + 1, max_position)?;
                return Ok(Some(Observed {
                    width,
                    walk: v.walk,
                    per_forward: d.per_forward,
                    tokens: v.tokens.len(),
                    tree: d.tree,
                    capacity,
                }));
            }
        }
        Ok(None)
    }

    /// Hands emitted tokens to the output, stopping at the end; `first_pos` is the position
    /// the first of them takes.
    fn push(
        &mut self,
        tokens: &[u32],
        first_pos: usize,
        max_position: usize,
    ) -> Result<(), EngineError> {
        if self
            .output
            .push_all(&mut self.context, tokens, first_pos, max_position)?
        {
            self.done = true;
        }
        Ok(())
    }

    /// Sends queued events; a gone receiver ends the sequence.
    pub fn flush(&mut self) {
        while let Some(e) = self.output.pop() {
            if !self.sink.send(Ok(e)) {
                self.done = true;
                return;
            }
        }
    }

    /// Ends the sequence with `err`.
    pub fn fail(&mut self, err: EngineError) {
        self.done = true;
        self.sink.send(Err(err));
    }
}

/// The largest cut of `shape` with at most `nodes` nodes (root included): a smaller budget
/// for a dynamic shape, fewer levels for an expansion.
fn largest_within(shape: &TreeShape, nodes: usize) -> TreeShape {
    if let TreeShape::Dynamic {
        depth,
        width,
        budget,
    } = shape
    {
        return TreeShape::Dynamic {
            depth: (*depth).min(nodes.saturating_sub(1)),
            width: *width,
            budget: (*budget).min(nodes),
        };
    }
    let mut depth = shape.depth();
    while depth > 0 && cap_depth(shape, depth).max_nodes() > nodes {
        depth -= 1;
    }
    cap_depth(shape, depth)
}
