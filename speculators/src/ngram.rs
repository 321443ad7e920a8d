//! A model-free draft: prompt lookup / n-gram matching (Saxena's prompt-lookup decoding; the
//! n-gram speculator of vLLM). Costs no forward pass.

use rand::rngs::StdRng;

use crate::{Draft, DraftCost, DraftRequest, SpecError, TokenTree};

/// Proposes continuations of earlier occurrences of the context's last n-gram.
///
/// For `n` from `max_n` down to `min_n`, every earlier place where the last `n` tokens occurred
/// (newest first) contributes the tokens that followed it, up to the tree depth, as a chain; up
/// to `branches` distinct chains are merged into the tree. Picks are deterministic, so the
/// verifier accepts a child with the target's probability of it (lossless).
#[derive(Debug, Clone)]
pub struct NgramDraft {
    /// Longest suffix to match.
    pub max_n: usize,
    /// Shortest suffix to match.
    pub min_n: usize,
    /// Most distinct continuations.
    pub branches: usize,
}

impl Default for NgramDraft {
    fn default() -> Self {
        Self {
            max_n: 4,
            min_n: 1,
            branches: 3,
        }
    }
}

impl NgramDraft {
    /// The continuations, best first (longer match, then newer).
    pub fn continuations(&self, context: &[u32], depth: usize) -> Vec<Vec<u32>> {
        let len = context.len();
        let mut out: Vec<Vec<u32>> = Vec::new();
        if depth == 0 {
            return out;
        }
        for n in (self.min_n.max(1)..=self.max_n.min(len.saturating_sub(1))).rev() {
            let suffix = &context[len - n..];
            for start in (0..len - n).rev() {
                if &context[start..start + n] != suffix {
                    continue;
                }
                let from = start + n;
                let cont = context[from..(from + depth).min(len)].to_vec();
                if !cont.is_empty() && !out.iter().any(|c| c.starts_with(&cont)) {
                    out.push(cont);
                    if out.len() >= self.branches {
                        return out;
                    }
                }
            }
        }
        out
    }
}

impl Draft for NgramDraft {
    fn name(&self) -> &str {
        "ngram"
    }

    fn propose(
        &mut self,
        req: &DraftRequest<'_>,
        _rng: &mut StdRng,
    ) -> Result<(TokenTree, DraftCost), SpecError> {
        let root = *req.context.last().ok_or(SpecError::EmptyContext)?;
        let mut tree = TokenTree::new(root);
        for (rank, chain) in self
            .continuations(req.context, req.shape.depth())
            .iter()
            .enumerate()
        {
            // Scores only rank n-gram nodes for pruning: earlier chains score higher.
            let prob = 0.5 / (rank + 1) as f32;
            let mut node = 0;
            for &t in chain {
                node = tree.propose(
                    node,
                    req.id,
                    crate::DrawKind::Deterministic,
                    None,
                    &[(t, prob)],
                )?[0];
            }
        }
        if let crate::TreeShape::Dynamic { budget, .. } = req.shape {
            tree.prune(*budget);
        }
        Ok((tree, DraftCost::default()))
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_longest_newest_matches() {
        let d = NgramDraft::default();
        //          0  1  2  3  4  5  6  7  8  9
        let ctx = [1, 2, 3, 9, 1, 2, 4, 7, 1, 2];
        let c = d.continuations(&ctx, 3);
        // "1 2" occurred at 4 (then 4 7 1) and at 0 (then 3 9 1); then "2" has nothing new.
        assert_eq!(c, vec![vec![4, 7, 1], vec![3, 9, 1]]);
        assert!(d.continuations(&[5], 3).is_empty());
        assert!(d.continuations(&[1, 2, 3], 3).is_empty());
    }
}
