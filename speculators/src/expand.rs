//! Growing a tree level by level from a draft's logits, for any draft that can score a batch
//! of tree nodes at once (one batched forward per level).

use std::sync::Arc;

use rand::rngs::StdRng;

use crate::choose::{sample, top_k, top_k_probs};
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
/// Growth stops below a level whose best path probability is under its gate
/// ([`DraftRequest::gates`]).
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
                (DrawKind::Deterministic, None, top_k_probs(logits, k))
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
        if let Some(&gate) = req.gates.get(level) {
            let nodes = tree.nodes();
            let best = fresh.iter().map(|&i| nodes[i].score).fold(0.0, f32::max);
            if best < gate {
                break;
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use arbor_model::SamplingParams;
    use rand::SeedableRng;

    /// Logits over 4 tokens whose top token (`top`) has probability `p`.
    fn peaked(top: usize, p: f32) -> Vec<f32> {
        (0..4)
            .map(|i| {
                if i == top {
                    p.ln()
                } else {
                    ((1.0 - p) / 3.0).ln()
                }
            })
            .collect()
    }

    /// Grows `shape` under `gates` from a draft that is 90% sure of token 1 everywhere;
    /// returns the tree and how many level forwards it took.
    fn grow(shape: &str, gates: &[f32]) -> (TokenTree, usize) {
        let shape: TreeShape = shape.parse().unwrap();
        let sampling = SamplingParams::greedy();
        let req = DraftRequest {
            context: &[3],
            shape: &shape,
            sampling: &sampling,
            id: 0,
            gates,
        };
        let mut forwards = 0;
        let mut rng = StdRng::seed_from_u64(0);
        let (tree, _) = expand(
            3,
            peaked(1, 0.9),
            &req,
            DrawKind::Deterministic,
            64,
            &mut rng,
            {
                |_, fresh| {
                    forwards += 1;
                    Ok(fresh.iter().map(|_| peaked(1, 0.9)).collect())
                }
            },
        )
        .unwrap();
        (tree, forwards)
    }

    #[test]
    fn gates_stop_growth_below_unlikely_paths() {
        // No gates: the whole chain, one forward per level but the last.
        let (tree, forwards) = grow("chain:10", &[]);
        assert_eq!((tree.depth(), forwards), (10, 9));
        // Path probabilities 0.9, 0.81, 0.729, 0.656, 0.590, 0.531, 0.478: a gate of 0.5
        // lets level 7 be grown (0.531 ≥ 0.5) and no further.
        let (tree, forwards) = grow("chain:10", &[0.5; 9]);
        assert_eq!((tree.depth(), forwards), (7, 6));
        // Gates apply per level; a missing gate means no gate.
        let (tree, _) = grow("chain:10", &[0.0, 0.85]);
        assert_eq!(tree.depth(), 2, "0.81 < 0.85 stops after level 2");
        let (tree, _) = grow("chain:4", &[0.1]);
        assert_eq!(tree.depth(), 4);
        // Wider trees are gated on their best node: the top child keeps 0.9 per level while
        // the runner-up (0.033) would have stopped at once.
        let (tree, _) = grow("2,2,2", &[0.7, 0.7]);
        assert_eq!(tree.depth(), 3);
        let (tree, _) = grow("2,2,2", &[0.7, 0.85]);
        assert_eq!(tree.depth(), 2);
        assert_eq!(tree.len(), 1 + 2 + 4);
    }
}
