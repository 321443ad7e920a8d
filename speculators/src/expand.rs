//! Growing a tree level by level from a draft's logits, for any draft that can score a batch
//! of tree nodes at once (one batched forward per level).

use std::sync::Arc;

use rand::rngs::StdRng;

use crate::choose::{sample, softmax, top_k};
use crate::{DraftRequest, DrawKind, SpecError, TokenTree, TreeShape};

/// Grows `req.shape` below `root` (whose draft logits are `root_logits`) to at most `depth`
/// levels.
///
/// `eval(tree, nodes)` must return the draft's logits after each of `nodes` (one batched
/// forward); it is called once per level except the last, with the nodes whose children the
/// next level needs. Greedy requests get deterministic top-k children scored by the draft's
/// softmax; others get `draw` samples from `q = req.sampling.distribution(logits)` (for
/// `draw` = [`DrawKind::Deterministic`]: the top-k of `q`).
///
/// Dynamic shapes: deterministic trees grow `width × width` per level and are then pruned to
/// the `budget` best nodes (EAGLE-2's rerank); sampled trees stop drawing at the budget instead
/// (pruning sampled children would bias verification).
///
/// Returns the tree and, for each node before pruning, its index after.
///
/// # Errors
/// Whatever `eval` returns.
pub fn expand(
    root: u32,
    root_logits: Vec<f32>,
    req: &DraftRequest<'_>,
    draw: DrawKind,
    depth: usize,
    rng: &mut StdRng,
    mut eval: impl FnMut(&TokenTree, &[usize]) -> Result<Vec<Vec<f32>>, SpecError>,
) -> Result<(TokenTree, Vec<Option<usize>>), SpecError> {
    let mut tree = TokenTree::new(root);
    let stochastic = !req.sampling.is_greedy() && draw != DrawKind::Deterministic;
    let mut frontier: Vec<(usize, Vec<f32>)> = vec![(0, root_logits)];
    for level in 0..depth.min(req.shape.depth()) {
        let k = match req.shape {
            TreeShape::Expand(k) => k[level],
            TreeShape::Dynamic { width, .. } => *width,
        };
        let mut fresh = Vec::new();
        for (node, logits) in &frontier {
            // Sampled children cannot be pruned afterwards without bias: a dynamic shape's
            // budget caps how many are drawn, decided before drawing.
            let k = match req.shape {
                TreeShape::Dynamic { budget, .. } if stochastic => {
                    k.min(budget.saturating_sub(tree.len()))
                }
                _ => k,
            };
            if k == 0 {
                break;
            }
            let (kind, q, picks) = if req.sampling.is_greedy() {
                let p = softmax(logits);
                let picks: Vec<(u32, f32)> = top_k(logits, k)
                    .into_iter()
                    .map(|i| (i as u32, p[i]))
                    .collect();
                (DrawKind::Deterministic, None, picks)
            } else if draw == DrawKind::Deterministic {
                let q = req.sampling.distribution(logits);
                let picks: Vec<(u32, f32)> = top_k(&q, k)
                    .into_iter()
                    .filter(|&i| q[i] > 0.0)
                    .map(|i| (i as u32, q[i]))
                    .collect();
                (draw, None, picks)
            } else {
                let q = req.sampling.distribution(logits);
                let picks = sample(&q, k, draw, rng);
                (draw, Some(Arc::<[f32]>::from(q)), picks)
            };
            for c in tree.propose(*node, req.id, kind, q, &picks)? {
                if !fresh.contains(&c) {
                    fresh.push(c);
                }
            }
        }
        if level + 1 == depth.min(req.shape.depth()) || fresh.is_empty() {
            break;
        }
        if let TreeShape::Dynamic { width, .. } = req.shape {
            // Choosing which nodes to expand from their scores is fine: it depends only on
            // earlier levels' draws, never on the draws it leads to.
            let nodes = tree.nodes();
            fresh.sort_by(|&a, &b| nodes[b].score.total_cmp(&nodes[a].score));
            fresh.truncate(*width);
            fresh.sort_unstable();
        }
        let logits = eval(&tree, &fresh)?;
        frontier = fresh.into_iter().zip(logits).collect();
    }
    let map = match req.shape {
        TreeShape::Dynamic { budget, .. } => tree.prune(*budget),
        TreeShape::Expand(_) => (0..tree.len()).map(Some).collect(),
    };
    Ok((tree, map))
}
