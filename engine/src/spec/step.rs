//! The two halves of a speculative step that single-sequence and batched generation share:
//! drafting a tree, and verifying + committing it once the target's rows are in.

use std::time::{Duration, Instant};

use arbor_cache::KvCache;
use arbor_model::Sampler;
use arbor_speculators::{Draft, DraftRequest, TokenTree, TreeShape};
use arbor_verifier::{verify_greedy, verify_sampling};
use burn::tensor::backend::Backend;

use crate::output::Output;
use crate::{EngineError, GenerateParams, StepStats};

/// A merged tree from every draft, and what drafting cost.
pub(crate) struct Drafted {
    pub tree: TokenTree,
    pub time: Duration,
    /// Each draft's seconds per level forward (for the planner).
    pub per_forward: Vec<Option<f64>>,
}

/// `shape` with its depth cut to `max_depth`.
pub(crate) fn cap_depth(shape: &TreeShape, max_depth: usize) -> TreeShape {
    match shape {
        TreeShape::Expand(k) => TreeShape::Expand(k[..k.len().min(max_depth)].to_vec()),
        TreeShape::Dynamic {
            depth,
            width,
            budget,
        } => TreeShape::Dynamic {
            depth: (*depth).min(max_depth),
            width: *width,
            budget: *budget,
        },
    }
}

/// Nodes below the root that `drafts` drafts could have proposed in a tree of `shape` as
/// deep as `tree` came out (growth gates cut trees short by design: what the planner tracks
/// as fill is how sparse the levels grown were).
pub(crate) fn tree_capacity(shape: &TreeShape, tree: &TokenTree, drafts: usize) -> usize {
    let per_draft = match cap_depth(shape, tree.depth()) {
        TreeShape::Dynamic {
            depth,
            width,
            budget,
        } => (width * depth).min(budget.saturating_sub(1)),
        cut @ TreeShape::Expand(_) => cut.max_nodes() - 1,
    };
    drafts * per_draft
}

/// Asks every draft for a tree of `shape` (under growth `gates`) below `context`'s last token
/// and merges them.
pub(crate) fn draft_tree<'m>(
    drafts: &mut [Box<dyn Draft + 'm>],
    context: &[u32],
    (shape, gates): (&TreeShape, &[f32]),
    params: &GenerateParams,
    sampler: &mut Sampler,
    output: &mut Output<'_>,
) -> Result<Drafted, EngineError> {
    let root = *context.last().expect("a started sequence has a root");
    let mut tree = TokenTree::new(root);
    let mut time = Duration::ZERO;
    let mut per_forward = vec![None; drafts.len()];
    if shape.depth() > 0 {
        for (id, draft) in drafts.iter_mut().enumerate() {
            let t0 = Instant::now();
            let req = DraftRequest {
                context,
                shape,
                sampling: &params.sampling,
                id,
                gates,
            };
            let (t, cost) = draft.propose(&req, sampler.rng())?;
            let dt = t0.elapsed();
            tree.merge(&t)?;
            time += dt;
            let s = &mut output.spec_mut().drafts[id];
            s.time += dt;
            s.forwards += cost.forwards;
            per_forward[id] = cost.secs_per_level();
        }
    }
    Ok(Drafted {
        tree,
        time,
        per_forward,
    })
}

/// What verification kept.
pub(crate) struct Verified {
    /// Tokens to emit (accepted nodes' tokens and the bonus token).
    pub tokens: Vec<u32>,
    /// The acceptance walk per depth (for the planner).
    pub walk: Vec<bool>,
    /// Target forward and acceptance walk.
    pub verify_time: Duration,
}

/// Verifies `tree` against the target's logits `rows` (one per node, the tree appended to
/// `cache` after `cached` rows), keeps the accepted path's KV rows, books the step.
#[allow(clippy::too_many_arguments)] // one call site per generation kind; all borrowed state
pub(crate) fn verify_commit<B: Backend>(
    tree: &TokenTree,
    rows: &[Vec<f32>],
    params: &GenerateParams,
    sampler: &mut Sampler,
    cache: &mut KvCache<B>,
    cached: usize,
    output: &mut Output<'_>,
    (draft_time, forward_time): (Duration, Duration),
) -> Verified {
    let t0 = Instant::now();
    let sampling = &params.sampling;
    let verified = if sampling.is_greedy() {
        verify_greedy(tree, rows)
    } else {
        verify_sampling(tree, |i| sampling.distribution(&rows[i]), sampler.rng())
    };
    let verify_time = forward_time + t0.elapsed();
    tracing::trace!(
        nodes = tree.len(),
        accepted = verified.accepted.len(),
        draft_secs = draft_time.as_secs_f64(),
        verify_secs = verify_time.as_secs_f64(),
        "step"
    );
    let t0 = Instant::now();
    let keep: Vec<usize> = std::iter::once(cached)
        .chain(verified.accepted.iter().map(|&a| cached + a))
        .collect();
    cache.retain(cached, &keep);
    let spec = output.spec_mut();
    let walk = spec.record_tree(tree, &verified.accepted);
    spec.draft_time += draft_time;
    spec.verify_time += verify_time;
    spec.emitted += verified.tokens.len();
    output.step(StepStats {
        tree_nodes: tree.len() - 1,
        tree_depth: tree.depth(),
        accepted: verified.accepted.len(),
        emitted: verified.tokens.len(),
        draft_time,
        verify_time,
    });
    output.spec_mut().commit_time += t0.elapsed();
    Verified {
        tokens: verified.tokens,
        walk,
        verify_time,
    }
}
