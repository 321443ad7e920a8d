//! How each step's tree is shaped: a fixed shape, or `auto` — chosen every step from measured
//! costs and acceptance to maximize expected tokens per second (Sequoia's hardware-aware tree
//! size, arXiv 2402.12374, with EAGLE-2's draft-confidence growth, arXiv 2406.16858), and
//! grown only while the draft's confidence pays for another level (growth gates).

use std::fmt;
use std::str::FromStr;

use std::time::Instant;

use arbor_cache::KvCache;
use arbor_model::Transformer;
use arbor_speculators::{ShapeParseError, TokenTree, TreeShape};
use burn::tensor::backend::Backend;
use serde::Serialize;

use crate::EngineError;

/// The tree policy of an [`Engine`](crate::Engine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreePolicy {
    /// Every draft grows this shape every step (depth capped by `max_tokens` and the context).
    Fixed(TreeShape),
    /// Width picked every step by the [`Planner`], depth by growth gates as the tree grows
    /// ([`Planner::plan_gated`], alone and in batched generation).
    Auto {
        /// Children per expanded node and expanded nodes per level (2 by default).
        width: usize,
        /// Deepest tree considered (8 by default).
        max_depth: usize,
    },
}

impl Default for TreePolicy {
    fn default() -> Self {
        Self::Auto {
            width: 2,
            max_depth: 8,
        }
    }
}

impl FromStr for TreePolicy {
    type Err = ShapeParseError;

    /// `auto`, `auto:WIDTH,MAX_DEPTH`, or a [`TreeShape`] (`2,2,1`, `chain:4`, `dyn:6,2,16`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "auto" {
            return Ok(Self::default());
        }
        if let Some(body) = s.strip_prefix("auto:") {
            let nums: Vec<usize> = body
                .split(',')
                .map(|x| x.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .map_err(|_| ShapeParseError(s.into()))?;
            return match nums[..] {
                [width, max_depth] if (1..=8).contains(&width) && (1..=32).contains(&max_depth) => {
                    Ok(Self::Auto { width, max_depth })
                }
                _ => Err(ShapeParseError(s.into())),
            };
        }
        s.parse().map(Self::Fixed)
    }
}

impl fmt::Display for TreePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(s) => write!(f, "{s}"),
            Self::Auto { width, max_depth } => write!(f, "auto:{width},{max_depth}"),
        }
    }
}

/// Prior acceptance at depth 1 before anything was measured, and its weight in pseudo-steps.
/// Deeper depths borrow the estimate of the depth above as their prior.
const PRIOR_ALPHA: f64 = 0.7;
const PRIOR_WEIGHT: f64 = 2.0;
/// Old statistics fade by this factor per step (drafts do better on some text than others).
const DECAY: f64 = 0.97;
/// Below this much (decayed) evidence at depth 1, a planner that would stop speculating takes
/// one speculative step instead, to measure again. Two steps' worth: at 0.5 one rejected first
/// tree (the prior's α 0.7 then reads 0.47) switched speculation off for the next 23 steps.
const STALE: f64 = 2.0;
/// Node counts at which the verify cost is measured.
pub const VERIFY_SIZES: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];
/// Verifications after which a measured size that none of them had may be timed again
/// ([`Planner::refresh_due`]).
const REFRESH_AGE: usize = 16;
/// Share of the observed verification time that re-timings of sizes nobody suspects may
/// spend (about 0.5% of a speculative step, whose other half is drafting).
const REFRESH_SHARE: f64 = 0.01;
/// A timing below this fraction of another of the same size says one of them was taken on a
/// busy moment: two calibration rounds that far apart, or a step or re-timing that far below
/// its size's cost, make the sizes concerned suspect ([`Planner::refresh_due`]).
const REPRICED: f64 = 0.8;

/// The cost model behind `auto`: verify time by tree size (measured once on the target),
/// time per draft level forward (running average per draft), per-step overhead, and
/// conditional acceptance per tree width and depth (decaying counts).
///
/// Each step it picks the width `w` and depth `d` maximizing
/// `E[tokens] / (d · Σ draft level cost + verify(1 + fill·drafts·w·d) + overhead)` with
/// `E[tokens] = 1 + Σ_{i≤d} Π_{j≤i} α_w(j)`, or plain decoding (depth 0) when nothing beats
/// `1 / (verify(1) + overhead)`. [`Planner::plan_gated`] then lets that width grow up to the
/// deepest level while each level pays for itself ([`Planner::gates`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Planner {
    /// `(nodes, seconds)` of one verification forward, increasing in nodes.
    pub verify_cost: Vec<(usize, f64)>,
    /// Seconds per level forward of each draft (`None`: costs nothing, e.g. n-gram).
    pub draft_cost: Vec<Option<f64>>,
    /// Seconds per step outside drafting and verification.
    pub overhead: f64,
    /// `(tried, accepted)` per width (index 0 = width 1) and depth (index 0 = depth 1),
    /// decayed.
    pub depth_counts: Vec<Vec<(f64, f64)>>,
    /// Nodes a merged tree actually had below its root over what the drafts could have
    /// proposed (`drafts · width · depth`), running average; `None` before any tree. Below 1
    /// where a draft often proposes nothing (an n-gram draft without a match) or drafts
    /// agree (merged nodes are shared): without it, a model draft plus an n-gram draft
    /// looked twice as dear to verify as it was and `auto` fell back to plain decoding.
    pub node_fill: Option<f64>,
    /// `(tokens, seconds)` of speculative steps, decayed per step like the acceptance
    /// counts: their ratio is the rate growth gates are priced at.
    pub spec_steps: (f64, f64),
    /// Measured sizes timed again on their own, outside the steps ([`Planner::refresh_due`]).
    pub refreshes: usize,
    /// Verifications observed since each `verify_cost` size was last timed (by a step of
    /// that size, the calibration or a re-timing); missing entries read 0.
    #[serde(skip)]
    verify_age: Vec<usize>,
    /// Sizes whose cost may have been measured on a busy moment (parallel to `verify_cost`):
    /// timed again at the next step that does not verify that many nodes, free of the
    /// credit.
    #[serde(skip)]
    suspect: Vec<bool>,
    /// Seconds of re-timing the observed verifications have paid for (`REFRESH_SHARE` of
    /// each), spent on sizes nobody suspects; below zero while one is being paid off.
    #[serde(skip)]
    refresh_credit: f64,
}

impl Planner {
    /// Whether the verify cost was measured.
    pub fn calibrated(&self) -> bool {
        !self.verify_cost.is_empty()
    }

    /// Takes a measured verify curve (`(nodes, seconds)`, increasing in nodes), every size
    /// just timed and trusted.
    pub fn set_verify_cost(&mut self, costs: Vec<(usize, f64)>) {
        self.verify_age = vec![0; costs.len()];
        self.suspect = vec![false; costs.len()];
        self.verify_cost = costs;
    }

    /// Takes a calibration: `(nodes, first, second)` timings of each size, increasing in
    /// nodes, a round apart. Each size costs its faster timing (a bigger tree never less than
    /// a smaller one); a size whose two timings are far apart is suspect.
    pub fn set_calibration(&mut self, timings: &[(usize, f64, f64)]) {
        let mut costs: Vec<(usize, f64)> = timings.iter().map(|&(n, a, b)| (n, a.min(b))).collect();
        for i in (0..costs.len().saturating_sub(1)).rev() {
            costs[i].1 = costs[i].1.min(costs[i + 1].1);
        }
        self.set_verify_cost(costs);
        self.suspect = timings
            .iter()
            .map(|&(_, a, b)| a.min(b) < REPRICED * a.max(b))
            .collect();
    }

    /// Verify seconds for `n` nodes (linear between measured sizes, and beyond the last).
    pub fn verify_secs(&self, n: usize) -> f64 {
        let c = &self.verify_cost;
        let Some(&(n0, t0)) = c.first() else {
            return 0.0;
        };
        if n <= n0 || c.len() == 1 {
            return t0;
        }
        for w in c.windows(2) {
            let ((a, ta), (b, tb)) = (w[0], w[1]);
            if n <= b {
                return ta + (tb - ta) * (n - a) as f64 / (b - a) as f64;
            }
        }
        let (&(a, ta), &(b, tb)) = (&c[c.len() - 2], &c[c.len() - 1]);
        tb + (tb - ta) * (n - b) as f64 / (b - a).max(1) as f64
    }

    /// Estimated conditional acceptance at `depth` (1-based) for trees of `width`.
    pub fn alpha(&self, width: usize, depth: usize) -> f64 {
        let mut prior = PRIOR_ALPHA;
        let counts = self.depth_counts.get(width - 1);
        for d in 1..=depth {
            let (tried, acc) = counts
                .and_then(|c| c.get(d - 1))
                .copied()
                .unwrap_or_default();
            prior = (acc + prior * PRIOR_WEIGHT) / (tried + PRIOR_WEIGHT);
        }
        prior
    }

    /// Expected tokens per step (accepted + bonus) of a tree `width` wide, `depth` deep.
    pub fn expected_tokens(&self, width: usize, depth: usize) -> f64 {
        let mut reach = 1.0;
        let mut total = 1.0;
        for d in 1..=depth {
            reach *= self.alpha(width, d);
            total += reach;
        }
        total
    }

    /// The best ungated `(rate, width, depth)` over widths `1..=max_width` and depths
    /// `1..=max_depth` for `seqs` sequences decoding together, or `None` when plain decoding
    /// pays better (or nothing can be tried). Rates are the whole batch's tokens per second.
    fn best(&self, max_width: usize, max_depth: usize, seqs: usize) -> Option<(f64, usize, usize)> {
        let seqs = seqs.max(1);
        let n = seqs as f64;
        let plain = n / (self.verify_secs(seqs) + self.overhead).max(1e-9);
        let mut best: Option<(f64, usize, usize)> = None;
        for width in 1..=max_width {
            for depth in 1..=max_depth {
                let secs = self.batch_step_secs(depth, self.tree_nodes(width, depth), seqs);
                let rate = n * self.expected_tokens(width, depth) / secs.max(1e-9);
                if best.is_none_or(|b| rate > b.0) {
                    best = Some((rate, width, depth));
                }
            }
        }
        let evidence = self
            .depth_counts
            .iter()
            .filter_map(|c| c.first())
            .map(|c| c.0)
            .sum::<f64>();
        // Without evidence a tree is tried anyway (the acceptance prior is a guess) — by one
        // sequence alone: in a batch every speculating sequence pays its draft's catch-up of
        // the prompt and a level each, for what one of them would learn.
        best.filter(|b| b.0 > plain || (evidence < STALE && seqs == 1))
    }

    /// Nodes (root included) a merged tree `width` wide and `depth` deep is expected to
    /// hold, given how full trees have been ([`Planner::node_fill`]).
    fn tree_nodes(&self, width: usize, depth: usize) -> usize {
        let drafts = self.draft_cost.len().max(1);
        let fill = self.node_fill.unwrap_or(1.0);
        1 + (fill * (drafts * width * depth) as f64).ceil() as usize
    }

    /// The shape for the next step, without growth gates: widths `1..=max_width`, depths
    /// `0..=max_depth`.
    pub fn plan(&self, max_width: usize, max_depth: usize) -> TreeShape {
        match self.best(max_width, max_depth, 1) {
            Some((_, width, depth)) => TreeShape::Dynamic {
                depth,
                width,
                budget: 1 + width * depth,
            },
            None => TreeShape::Expand(Vec::new()),
        }
    }

    /// `auto`'s step: the width [`Planner::plan`] picks, grown up to `max_depth` levels under
    /// growth gates ([`Planner::gates`]) at the rate speculative steps reach, as the cost
    /// model prices them (before the first one, the rate the plan promises) — each tree stops
    /// where its draft's confidence no longer pays for another level. Plain decoding (an
    /// empty shape, no gates) where no tree pays.
    ///
    /// Qwen2.5-Coder-1.5B with the 0.5B draft (16 HumanEval prompts, greedy), runs paired
    /// with ungated `auto`: speculative tokens/s +1–4% in four pairs while this was tuned,
    /// spec / plain 1.23× → 1.36× and 1.34× → 1.35× with the final rule (a noisy host);
    /// `scripts/sim-growth-gates.py` had promised +8% over the best fixed chain — real steps
    /// pay 9–14 ms per verified node beyond 4 where its curve said 5–6.
    pub fn plan_gated(&self, max_width: usize, max_depth: usize) -> (TreeShape, Vec<f32>) {
        self.plan_batch(max_width, max_depth, 1)
    }

    /// [`Planner::plan_gated`] for `seqs` sequences that speculate in one batched step. Each
    /// drafts on its own (a level costs every sequence's draft forwards, one after the
    /// other) while their roots and trees share one target forward: plain decoding of the
    /// batch is `seqs` tokens for `verify(seqs)`, a tree step `seqs · E[tokens]` for
    /// `seqs · d · draft level + verify(seqs · nodes)`. With a few sequences decoding, plain
    /// rows are nearly free and speculation stops paying long before it does alone
    /// (Qwen2.5-1.5B + 0.5B draft, 4 concurrent streams: 35–37 tok/s speculating against
    /// 48–53 plainly before this). Gates are priced at the batch's planned rate (tokens of
    /// all sequences per second of the engine's time); alone, at the measured rate.
    pub fn plan_batch(
        &self,
        max_width: usize,
        max_depth: usize,
        seqs: usize,
    ) -> (TreeShape, Vec<f32>) {
        let Some((planned, width, _)) = self.best(max_width, max_depth, seqs) else {
            return (TreeShape::Expand(Vec::new()), Vec::new());
        };
        // Alone: the rate speculative steps reach (priced by this cost model, see
        // `observe_step`), once measured: the planned rate trusts
        // acceptance at depths that gates only let confident paths reach, overrates deep
        // trees and set gates too high (Qwen2.5-1.5B: trees 3.3 tokens deep where 4.4 paid).
        let (tokens, secs) = self.spec_steps;
        let rate = if secs > 0.0 && seqs <= 1 {
            tokens / secs
        } else {
            planned
        };
        let shape = TreeShape::Dynamic {
            depth: max_depth,
            width,
            budget: 1 + width * max_depth,
        };
        (shape, self.gates(width, max_depth, rate))
    }

    /// Growth gates for a tree `width` wide and up to `depth` deep, at a step rate of `rate`
    /// tokens per second ([`arbor_speculators::DraftRequest::gates`]).
    ///
    /// Level `l + 1` costs one forward of every model draft plus the verification of its
    /// nodes, and adds a token when the best path of level `l` (reached with probability ≈
    /// its draft path probability `c`) is accepted and then one of its children is (≈
    /// `α_width(l + 1)`). Growing pays while `c · α / cost ≥ rate`: the gate after level `l`
    /// is `rate · cost / α` — a stopping rule that is optimal for the long-run rate when
    /// `rate` is that rate (renewal–reward).
    pub fn gates(&self, width: usize, depth: usize, rate: f64) -> Vec<f32> {
        let model_cost = self.level_cost();
        (1..depth)
            .map(|l| {
                let verify = self.verify_secs(self.tree_nodes(width, l + 1))
                    - self.verify_secs(self.tree_nodes(width, l));
                let alpha = self.alpha(width, l + 1).max(1e-3);
                (rate * (model_cost + verify.max(0.0)) / alpha) as f32
            })
            .collect()
    }

    /// Folds one step's outcome in: for a tree of `width`, the acceptance walk (one entry per
    /// depth tried, `true` where a child was accepted), each draft's seconds per level
    /// forward, and the step's other time.
    pub fn observe(
        &mut self,
        width: usize,
        walk: &[bool],
        draft_secs_per_level: &[Option<f64>],
        overhead: f64,
    ) {
        for c in self.depth_counts.iter_mut().flatten() {
            c.0 *= DECAY;
            c.1 *= DECAY;
        }
        if width > 0 && !walk.is_empty() {
            if self.depth_counts.len() < width {
                self.depth_counts.resize(width, Vec::new());
            }
            let counts = &mut self.depth_counts[width - 1];
            if counts.len() < walk.len() {
                counts.resize(walk.len(), (0.0, 0.0));
            }
            for (c, &accepted) in counts.iter_mut().zip(walk) {
                c.0 += 1.0;
                c.1 += f64::from(u8::from(accepted));
            }
        }
        if self.draft_cost.len() < draft_secs_per_level.len() {
            self.draft_cost.resize(draft_secs_per_level.len(), None);
        }
        for (c, &m) in self.draft_cost.iter_mut().zip(draft_secs_per_level) {
            if let Some(m) = m {
                *c = Some(c.map_or(m, |old| track_cost(old, m)));
            }
        }
        self.overhead = track_cost(self.overhead, overhead);
    }

    /// What the cost model prices a step at: `depth` draft levels and a verification of
    /// `nodes` nodes (root included), plus the per-step overhead.
    pub fn step_secs(&self, depth: usize, nodes: usize) -> f64 {
        self.batch_step_secs(depth, nodes, 1)
    }

    /// [`Planner::step_secs`] for `seqs` sequences each growing such a tree (drafting one
    /// after the other, verified in one forward of `seqs · nodes` rows).
    fn batch_step_secs(&self, depth: usize, nodes: usize, seqs: usize) -> f64 {
        let seqs = seqs.max(1);
        self.level_cost() * (depth * seqs) as f64 + self.verify_secs(nodes * seqs) + self.overhead
    }

    /// Seconds one tree level costs in draft forwards (every model draft's; free drafts
    /// none).
    fn level_cost(&self) -> f64 {
        self.draft_cost.iter().flatten().sum()
    }

    /// Folds one verified tree in ([`Planner::observe_step`] at its priced seconds, and
    /// [`Planner::observe_tree`]): `tokens` emitted, `capacity` nodes its drafts could have
    /// proposed at the depth it reached.
    pub fn observe_tree_step(&mut self, tree: &TokenTree, tokens: usize, capacity: usize) {
        let priced = self.step_secs(tree.depth(), tree.len());
        self.observe_step(tokens, priced);
        self.observe_tree(tree.len() - 1, capacity);
    }

    /// Folds one speculative step in: the tokens it emitted and its seconds as the cost
    /// model prices them ([`Planner::step_secs`]). Not its wall time: the verify curve keeps
    /// the fastest timings while wall times carry every busy moment of a shared machine, and
    /// a rate from those would set the gates too low for the costs they are weighed against
    /// (3-round runs on a busy host: trees 4.8 deep at 1.25–1.29× plain, 4.3 at 1.41×).
    pub fn observe_step(&mut self, tokens: usize, secs: f64) {
        let (t, s) = self.spec_steps;
        self.spec_steps = (t * DECAY + tokens as f64, s * DECAY + secs);
    }

    /// Folds one step's verification time in where its node count is a measured size (plain
    /// steps are 1 node): a calibration slowed by a busy neighbour must not price trees (or
    /// plain decoding) wrongly for the whole run. Lower timings are taken at once, higher
    /// ones a tenth at a time (`track_cost`); a bigger tree is kept at least as dear as a
    /// smaller one. Every observation ages the other sizes and pays `REFRESH_SHARE` of its
    /// time towards re-timing them; one `REPRICED` below its size's cost makes the next
    /// size suspect ([`Planner::refresh_due`]).
    pub fn observe_verify(&mut self, nodes: usize, secs: f64) {
        self.verify_age.resize(self.verify_cost.len(), 0);
        for age in &mut self.verify_age {
            *age += 1;
        }
        self.refresh_credit += REFRESH_SHARE * secs;
        self.fold_verify(nodes, secs);
    }

    /// The measured size to time again before the next step, if one is due: a suspect size
    /// (its two calibration rounds a fifth apart, or a step or re-timing of the size below a
    /// fifth under that one's cost) not timed at the last step, the smallest above the largest size steps have
    /// first; else the smallest size above those that no verification has had for
    /// `REFRESH_AGE` observed steps, once earlier re-timings are paid off (the first is
    /// taken on credit; after that they spend `REFRESH_SHARE` of the verification time).
    ///
    /// Without it, sizes the growth gates stop reaching were never measured again: a
    /// calibration on a busy moment (Qwen2.5-1.5B: 4 nodes at 50.8 ms, 8 at 86, against ~41
    /// and ~75 alone) priced deeper trees too high, the gates kept trees at 2–3 nodes, and
    /// nothing corrected it for a whole run (τ 1.94 instead of ~4).
    ///
    /// `room`: the most nodes the sequence to time it on can still take.
    pub fn refresh_due(&self, room: usize) -> Option<usize> {
        let ages = &self.verify_age;
        let suspect = |i: usize| self.suspect.get(i) == Some(&true);
        // Sizes below one that steps reach are capped by its cost (a bigger tree is kept at
        // least as dear), so the ones that matter first are those just above it.
        let above = ages
            .iter()
            .rposition(|&a| a < REFRESH_AGE)
            .map_or(0, |i| i + 1);
        let fits = |&i: &usize| self.verify_cost[i].0 <= room;
        let i = (above..ages.len())
            .chain(0..above)
            .filter(fits)
            .find(|&i| suspect(i) && ages[i] > 0)
            .or_else(|| {
                let stale = (above..ages.len())
                    .filter(fits)
                    .find(|&i| ages[i] >= REFRESH_AGE);
                stale.filter(|_| self.refresh_credit >= 0.0)
            })?;
        Some(self.verify_cost[i].0)
    }

    /// Folds a re-timing of `nodes` (a measured size, [`Planner::refresh_due`]) in, as a
    /// step's verification would be; one of a size nobody suspected is paid for out of the
    /// credit.
    pub fn observe_refresh(&mut self, nodes: usize, secs: f64) {
        if let Some(i) = self.verify_cost.iter().position(|c| c.0 == nodes)
            && self.suspect.get(i) != Some(&true)
        {
            self.refresh_credit -= secs;
        }
        self.refreshes += 1;
        self.fold_verify(nodes, secs);
    }

    /// The curve update of a verification of `nodes` (ignored unless a measured size), which
    /// counts as just timed and no longer suspect: `secs` `REPRICED` below its cost makes
    /// the next larger size suspect — likely measured on the same busy moment; its re-timing
    /// passes the suspicion on if it finds the same. (Every larger size at once had cost a
    /// 2-, 4-, 8- and 16-node re-timing, 0.3 s, each time a one-node step of Qwen2.5-1.5B read
    /// 23 ms against its usual 30.)
    fn fold_verify(&mut self, nodes: usize, secs: f64) {
        let Some(i) = self.verify_cost.iter().position(|&(n, _)| n == nodes) else {
            return;
        };
        self.suspect.resize(self.verify_cost.len(), false);
        if secs < REPRICED * self.verify_cost[i].1
            && let Some(next) = self.suspect.get_mut(i + 1)
        {
            *next = true;
        }
        self.suspect[i] = false;
        if let Some(age) = self.verify_age.get_mut(i) {
            *age = 0;
        }
        let t = track_cost(self.verify_cost[i].1, secs);
        self.verify_cost[i].1 = t;
        for c in &mut self.verify_cost[..i] {
            c.1 = c.1.min(t);
        }
        for c in &mut self.verify_cost[i + 1..] {
            c.1 = c.1.max(t);
        }
    }

    /// Folds one speculative step's tree size in: `nodes` below the root out of the
    /// `capacity` its drafts could have proposed.
    pub fn observe_tree(&mut self, nodes: usize, capacity: usize) {
        if capacity == 0 {
            return;
        }
        let f = (nodes as f64 / capacity as f64).clamp(0.0, 1.0);
        self.node_fill = Some(self.node_fill.map_or(f, |old| 0.9 * old + 0.1 * f));
    }
}

/// Folds a new timing into a running cost. Interference on a shared machine only ever adds
/// time, so a lower measurement is taken at once and a higher one only slowly: one slow first
/// forward (page faults, a busy neighbour) must not switch speculation off for long.
fn track_cost(old: f64, new: f64) -> f64 {
    if old == 0.0 || new < old {
        new
    } else {
        0.9 * old + 0.1 * new
    }
}

/// Measures one target forward's cost by tree size on `cache` (left as it was), with `root`
/// (the next token, not in the cache) as every node's token.
///
/// Sizes are measured upwards until one costs at least `max_depth + 1` one-node steps: a tree
/// emits at most `max_depth + 1` tokens, so no tree that size or larger can beat plain
/// decoding, and the planner extrapolates past it. With `most_nodes` (the largest tree the
/// policy builds), sizes past it are not measured either once two are (the planner
/// extrapolates from the last two): one sequence's `auto:2,8` trees hold at most 17 nodes, and
/// its 32- and 64-node forwards had been 1.5 s of a 2.4 s calibration of Qwen-1.5B on 2 cores.
/// The batched engine prices whole batches of rows and measures them all. Each size is timed
/// twice, in two rounds over the sizes: `(nodes, first, second)` for
/// [`Planner::set_calibration`].
pub(crate) fn measure_verify_cost<B: Backend>(
    target: &Transformer<B>,
    cache: &mut KvCache<B>,
    root: u32,
    max_depth: usize,
    most_nodes: Option<usize>,
) -> Result<Vec<(usize, f64, f64)>, EngineError> {
    let room = target.max_position().saturating_sub(cache.len());
    let mut costs: Vec<(usize, f64)> = Vec::new();
    for &n in VERIFY_SIZES.iter().filter(|&&n| n <= room) {
        if costs.len() >= 2 && most_nodes.is_some_and(|most| n > most) {
            break;
        }
        let secs = time_verify(target, cache, root, n)?;
        costs.push((n, secs));
        if secs >= (max_depth + 1) as f64 * costs[0].1 {
            break;
        }
    }
    // A second round over every size: a size's two timings are a round apart (~0.35 s for
    // Qwen2.5-1.5B), so a short busy moment on the shared host inflates one of them (and
    // shows as their spread), where two timings back to back had both priced that size too
    // high.
    let mut timings = Vec::with_capacity(costs.len());
    for (n, first) in costs {
        timings.push((n, first, time_verify(target, cache, root, n)?));
    }
    tracing::debug!(?timings, "verify cost by tree size");
    Ok(timings)
}

/// Times the size [`Planner::refresh_due`] asks for, if any, on `cache` (left as it was, with
/// `root` as every node's token, as [`measure_verify_cost`] does) and folds it in
/// ([`Planner::observe_refresh`]); returns the size timed.
pub(crate) fn refresh_verify_cost<B: Backend>(
    planner: &mut Planner,
    target: &Transformer<B>,
    cache: &mut KvCache<B>,
    root: u32,
) -> Result<Option<usize>, EngineError> {
    let room = target.max_position().saturating_sub(cache.len());
    let Some(n) = planner.refresh_due(room) else {
        return Ok(None);
    };
    let secs = time_verify(target, cache, root, n)?;
    planner.observe_refresh(n, secs);
    tracing::debug!(nodes = n, secs, "verify cost re-timed");
    Ok(Some(n))
}

/// Seconds of one verification forward of an `n`-node tree (a chain below `root`, every
/// node's logits copied to the host, as a speculative step does) on top of what `cache`
/// holds; the cache is left as it was. Callers that want several timings interleave sizes
/// between them (a shared host's speed drifts: `arbor bench --verify-curve`, the planner's
/// two rounds).
///
/// # Errors
/// [`EngineError`] if the model refuses the input (e.g. past its context).
pub fn time_verify<B: Backend>(
    target: &Transformer<B>,
    cache: &mut KvCache<B>,
    root: u32,
    n: usize,
) -> Result<f64, EngineError> {
    let cached = cache.len();
    let mut tree = TokenTree::new(root);
    let mut node = 0;
    for _ in 1..n {
        node = tree.push(node, root, 0)?;
    }
    let t0 = Instant::now();
    let out = target.forward_all_logits(&tree.forward_input(cached), cache);
    let secs = t0.elapsed().as_secs_f64();
    cache.truncate(cached);
    out?;
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_policies() {
        assert_eq!("auto".parse(), Ok(TreePolicy::default()));
        assert_eq!(
            "auto:3,5".parse(),
            Ok(TreePolicy::Auto {
                width: 3,
                max_depth: 5
            })
        );
        assert_eq!(
            "2,1".parse(),
            Ok(TreePolicy::Fixed(TreeShape::Expand(vec![2, 1])))
        );
        assert!("auto:0,5".parse::<TreePolicy>().is_err());
        assert!("auto:x".parse::<TreePolicy>().is_err());
    }

    fn planner(draft: f64) -> Planner {
        Planner {
            verify_cost: vec![(1, 0.10), (8, 0.11), (64, 0.50)],
            draft_cost: vec![Some(draft)],
            ..Planner::default()
        }
    }

    #[test]
    fn deep_chains_when_drafting_is_cheap_and_accepted() {
        let mut p = planner(0.005);
        assert!((p.verify_secs(4) - (0.10 + 0.01 * 3.0 / 7.0)).abs() < 1e-9);
        for _ in 0..50 {
            p.observe(1, &[true; 8], &[Some(0.005)], 0.0);
        }
        assert_eq!(
            p.plan(2, 8).depth(),
            8,
            "everything accepted and drafting is cheap"
        );
        // Unmeasured depths borrow the estimate above them: still deep at 12.
        assert!(p.plan(1, 12).depth() > 8);
    }

    #[test]
    fn no_tree_when_nothing_is_accepted_then_a_retry_once_evidence_fades() {
        let mut q = planner(0.1);
        for _ in 0..200 {
            q.observe(1, &[false], &[Some(0.1)], 0.0);
            q.observe(2, &[false], &[Some(0.1)], 0.0);
        }
        assert_eq!(
            q.plan(2, 8),
            TreeShape::Expand(vec![]),
            "plain decoding pays best"
        );
        // Plain steps observe nothing; the evidence decays until one tree is tried again.
        let mut steps = 0;
        while q.plan(2, 8).depth() == 0 {
            q.observe(0, &[], &[None], 0.0);
            steps += 1;
            assert!(steps < 500, "never retried");
        }
        assert!(steps > 10, "retried too eagerly: after {steps} steps");
    }

    #[test]
    fn one_rejected_first_tree_does_not_stop_speculation() {
        let mut p = planner(0.03);
        p.verify_cost = vec![(1, 0.030), (2, 0.034), (4, 0.045), (8, 0.080)];
        p.observe(1, &[false], &[Some(0.012)], 0.0);
        assert!(p.plan(1, 8).depth() > 0, "one step is not evidence enough");
        p.observe(1, &[false], &[Some(0.012)], 0.0);
        p.observe(1, &[false], &[Some(0.012)], 0.0);
        assert_eq!(p.plan(1, 8).depth(), 0, "three rejections in a row are");
    }

    #[test]
    fn one_slow_draft_forward_is_forgotten_at_the_next_fast_one() {
        let mut p = planner(0.01);
        p.observe(1, &[true], &[Some(2.0)], 0.0);
        let c = p.draft_cost[0].unwrap();
        assert!(
            (c - 0.209).abs() < 1e-9,
            "a higher timing moves the cost a tenth: {c}"
        );
        let mut q = planner(2.0);
        q.observe(1, &[true], &[Some(0.05)], 0.0);
        assert_eq!(q.draft_cost, vec![Some(0.05)]);
    }

    #[test]
    fn sparse_merged_trees_are_priced_by_what_they_hold() {
        // A model draft and a free one (an n-gram draft) on a target whose verify cost
        // grows steeply with nodes.
        let mut p = Planner {
            verify_cost: vec![(1, 0.10), (2, 0.12), (4, 0.16), (8, 0.30)],
            draft_cost: vec![Some(0.04), None],
            ..Planner::default()
        };
        for _ in 0..40 {
            p.observe(1, &[true, true, false], &[Some(0.04), None], 0.0);
        }
        let before = p.plan(1, 8);
        // The free draft rarely proposes anything: trees hold about half the nodes the two
        // drafts could have given.
        for _ in 0..40 {
            p.observe_tree(3, 6);
        }
        assert!((p.node_fill.unwrap() - 0.5).abs() < 1e-6);
        let after = p.plan(1, 8);
        assert!(
            after.depth() > before.depth(),
            "cheaper verification than feared should buy a deeper tree: {before:?} → {after:?}"
        );
        p.observe_tree(0, 0);
        assert!(
            (p.node_fill.unwrap() - 0.5).abs() < 1e-6,
            "no capacity, no evidence"
        );
    }

    #[test]
    fn gates_price_another_level_against_the_step_rate() {
        let mut p = Planner {
            verify_cost: vec![(1, 0.030), (2, 0.032), (4, 0.040), (8, 0.072)],
            draft_cost: vec![Some(0.012)],
            ..Planner::default()
        };
        for _ in 0..100 {
            p.observe(1, &[true, true, true, false], &[Some(0.012)], 0.0);
        }
        let rate = 40.0;
        let g = p.gates(1, 8, rate);
        assert_eq!(g.len(), 7, "one gate per level that can be grown");
        // After level 1 (2 nodes): level 2 costs a draft forward and a third node.
        let cost = 0.012 + p.verify_secs(3) - p.verify_secs(2);
        let want = rate * cost / p.alpha(1, 2);
        assert!((f64::from(g[0]) - want).abs() < 1e-6, "{} vs {want}", g[0]);
        // Levels 2 and 3 cost and pay alike; depth 4 is never accepted, which prices it (and
        // the unmeasured depths below it, which borrow its estimate) out.
        assert!((g[1] / g[0] - 1.0).abs() < 0.01, "{g:?}");
        assert!(g[3] > 1.0, "depth 4 is never accepted: {g:?}");
        // A faster target rate asks more of every level; a cheaper draft less.
        assert!(p.gates(1, 8, 2.0 * rate).iter().zip(&g).all(|(a, b)| a > b));
        let mut cheap = p.clone();
        cheap.draft_cost = vec![Some(0.002)];
        assert!(cheap.gates(1, 8, rate).iter().zip(&g).all(|(a, b)| a < b));
    }

    #[test]
    fn gated_plans_grow_to_the_deepest_level_or_decode_plainly() {
        let mut p = planner(0.005);
        for _ in 0..50 {
            p.observe(1, &[true, true], &[Some(0.005)], 0.0);
        }
        let (shape, gates) = p.plan_gated(1, 8);
        assert_eq!(
            shape,
            TreeShape::Dynamic {
                depth: 8,
                width: 1,
                budget: 9
            }
        );
        assert_eq!(gates.len(), 7);
        assert!(gates.iter().all(|g| *g > 0.0));
        // Once speculative steps were measured, gates are priced at the rate they reached.
        p.observe_step(10, 0.1);
        p.observe_step(5, 0.05);
        let (_, measured) = p.plan_gated(1, 8);
        assert_eq!(measured, p.gates(1, 8, 100.0));
        assert_ne!(measured, gates);
        let mut q = planner(0.1);
        for _ in 0..200 {
            q.observe(1, &[false], &[Some(0.1)], 0.0);
        }
        assert_eq!(q.plan_gated(1, 8), (TreeShape::Expand(vec![]), vec![]));
    }

    #[test]
    fn batched_sequences_speculate_only_while_their_drafting_pays() {
        // Qwen2.5-1.5B's verify curve on this machine and the 0.5B draft's level cost.
        let mut p = Planner {
            verify_cost: vec![(1, 0.032), (2, 0.035), (4, 0.047), (8, 0.078), (16, 0.14)],
            draft_cost: vec![Some(0.014)],
            ..Planner::default()
        };
        // No evidence yet: one sequence alone tries a tree, a batch does not.
        assert!(p.plan_batch(1, 8, 1).0.depth() > 0);
        assert_eq!(p.plan_batch(1, 8, 4), (TreeShape::Expand(vec![]), vec![]));
        for _ in 0..50 {
            p.observe(1, &[true, true, true, false], &[Some(0.014)], 0.0);
        }
        assert_eq!(p.plan_batch(1, 8, 1), p.plan_gated(1, 8));
        let (alone, _) = p.plan_batch(1, 8, 1);
        assert!(alone.depth() > 0, "alone a chain pays");
        // Four sequences: four draft forwards per level against three nearly free plain
        // rows.
        assert_eq!(p.plan_batch(1, 8, 4), (TreeShape::Expand(vec![]), vec![]));
        // With a free draft (prompt lookup) trees pay in the batch too.
        p.draft_cost = vec![None];
        assert!(p.plan_batch(1, 8, 4).0.depth() > 0);
    }

    #[test]
    fn suspect_sizes_are_timed_again_at_once_others_out_of_a_share_of_the_time() {
        // A calibration whose 4-node rounds disagree: 4 is suspect, the others trusted.
        let mut p = Planner::default();
        p.set_calibration(&[
            (1, 0.030, 0.031),
            (2, 0.034, 0.033),
            (4, 0.060, 0.045),
            (8, 0.075, 0.078),
            (16, 0.130, 0.135),
        ]);
        assert_eq!(
            p.verify_cost,
            vec![(1, 0.030), (2, 0.033), (4, 0.045), (8, 0.075), (16, 0.130)]
        );
        assert_eq!(p.refresh_due(usize::MAX), None, "just timed");
        p.observe_verify(2, 0.033);
        assert_eq!(p.refresh_due(usize::MAX), Some(4));
        assert_eq!(p.refresh_due(3), None, "past the room");
        p.observe_refresh(4, 0.044);
        assert_eq!(p.verify_cost[2], (4, 0.044));
        assert_eq!(p.refreshes, 1);
        // Trusted sizes no step has had for a while: the first on credit, the smallest
        // above the steps' size (1 is capped by their cost anyway).
        for _ in 2..REFRESH_AGE {
            p.observe_verify(2, 0.033);
            assert_eq!(p.refresh_due(usize::MAX), None, "not stale yet");
        }
        p.observe_verify(2, 0.033);
        assert_eq!(
            p.refresh_due(usize::MAX),
            Some(8),
            "{REFRESH_AGE} steps without 8"
        );
        p.observe_refresh(8, 0.076);
        // The next once 1% of the verification time observed since has paid for it.
        let mut steps = 0;
        while p.refresh_due(usize::MAX).is_none() {
            p.observe_verify(2, 0.033);
            steps += 1;
            assert!(steps < 10_000, "never due");
        }
        let credit = REFRESH_SHARE * 0.033 * (REFRESH_AGE + steps) as f64 - 0.076;
        assert!(
            (0.0..REFRESH_SHARE * 0.033 + 1e-12).contains(&credit),
            "{credit}"
        );
        assert_eq!(p.refresh_due(usize::MAX), Some(4));
        // Trees that reach 8 nodes leave only 16 above them.
        p.observe_verify(8, 0.075);
        assert_eq!(p.refresh_due(usize::MAX), Some(16));
        assert_eq!(p.refresh_due(15), None, "nothing above fits");
        // No sizes, or every size just measured: nothing to do.
        assert_eq!(Planner::default().refresh_due(usize::MAX), None);
        let mut q = Planner::default();
        q.set_verify_cost(vec![(1, 0.030), (2, 0.033)]);
        for _ in 0..3 * REFRESH_AGE {
            q.observe_verify(1, 0.030);
            q.observe_verify(2, 0.033);
        }
        assert_eq!(q.refresh_due(usize::MAX), None);
    }

    #[test]
    fn a_curve_measured_on_a_busy_moment_is_timed_again_size_by_size() {
        // Both calibration rounds on a busy moment: every size ~2× its cost, consistently.
        let mut p = Planner::default();
        p.set_calibration(&[
            (1, 0.062, 0.065),
            (2, 0.066, 0.068),
            (4, 0.085, 0.090),
            (8, 0.150, 0.155),
            (16, 0.270, 0.260),
        ]);
        p.observe_verify(2, 0.066);
        assert_eq!(
            p.refresh_due(usize::MAX),
            None,
            "nothing suspect, nothing paid"
        );
        // A quiet 2-node step at half the cost: the size above is likely as wrong, and each
        // re-timing that finds the same passes the suspicion on.
        p.observe_verify(2, 0.033);
        assert_eq!(p.verify_cost[1], (2, 0.033));
        assert_eq!(p.refresh_due(usize::MAX), Some(4));
        p.observe_refresh(4, 0.042);
        // Each one free and at the next step, smallest first.
        for (n, secs) in [(8, 0.075), (16, 0.130)] {
            p.observe_verify(2, 0.033);
            assert_eq!(p.refresh_due(usize::MAX), Some(n));
            p.observe_refresh(n, secs);
        }
        assert_eq!(
            p.verify_cost[2..],
            [(4, 0.042), (8, 0.075), (16, 0.130)],
            "the curve is the quiet one"
        );
        assert_eq!(p.refreshes, 3);
        p.observe_verify(2, 0.033);
        assert_eq!(p.refresh_due(usize::MAX), None, "nothing suspect is left");
        // 1 node (below the steps' size) was capped by their cost, not re-timed.
        assert_eq!(p.verify_cost[0], (1, 0.033));
    }

    #[test]
    fn verify_costs_follow_what_steps_measure() {
        let mut p = Planner {
            verify_cost: vec![(1, 0.050), (2, 0.052), (4, 0.070)],
            ..Planner::default()
        };
        // A quieter machine: lower timings are taken at once; the curve stays increasing.
        p.observe_verify(1, 0.033);
        assert_eq!(p.verify_cost[0], (1, 0.033));
        p.observe_verify(4, 0.030);
        assert_eq!(p.verify_cost, vec![(1, 0.030), (2, 0.030), (4, 0.030)]);
        // One slow step moves a cost only a tenth of the way.
        p.observe_verify(2, 0.130);
        assert!((p.verify_cost[1].1 - 0.040).abs() < 1e-9);
        assert!((p.verify_cost[2].1 - 0.040).abs() < 1e-9);
        // Sizes that were not measured change nothing.
        let before = p.verify_cost.clone();
        p.observe_verify(3, 0.001);
        assert_eq!(p.verify_cost, before);
    }
}
