//! Arbor's tree verifier.
//!
//! [`verify_greedy`] is greedy verification of a [`TokenTree`] against the target's
//! logits at every node (SpecInfer, arXiv 2305.09781): walk down from the root taking the
//! target's argmax; follow a child that carries it; stop otherwise. The last argmax is always
//! emitted as the correction/bonus token, so output equals plain greedy decoding of the target.
//!
//! [`verify_sampling`] is SpecInfer's multi-step speculative sampling, lossless for the way each
//! draft drew its children (i.i.d., without replacement — Sequoia, arXiv 2402.12374 — or
//! deterministically); `verifier/tests/sampling_lossless.rs` checks it with χ² tests.
//! [`Verified::accepted`] names the nodes whose KV rows the sequence keeps (commit).
//!
//! ```
//! use arbor_speculators::TokenTree;
//! use arbor_verifier::verify_greedy;
//! let mut t = TokenTree::new(0);
//! let a = t.push(0, 1, 0).unwrap();
//! t.push(0, 2, 0).unwrap();
//! // Vocabulary of 3; the target prefers 1 after the root, then 2 after node `a`.
//! let logits = vec![vec![0.0, 5.0, 1.0], vec![0.0, 1.0, 9.0], vec![3.0, 0.0, 0.0]];
//! let v = verify_greedy(&t, &logits);
//! assert_eq!(v.accepted, vec![a]);
//! assert_eq!(v.tokens, vec![1, 2]); // accepted token 1, then bonus token 2
//! ```

mod sampling;

use arbor_model::sampling::argmax;
pub use arbor_speculators::TokenTree;
pub use sampling::verify_sampling;

/// The outcome of verifying one tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Accepted tree nodes below the root, in order (their KV rows are kept).
    pub accepted: Vec<usize>,
    /// Tokens to emit: the accepted nodes' tokens, then the bonus token.
    pub tokens: Vec<u32>,
}

/// Greedy verification; `logits[i]` is the target's logits after tree node `i`.
///
/// # Panics
/// If `logits` has fewer rows than the tree has nodes (internal invariant: one target forward
/// over the tree yields exactly one row per node).
pub fn verify_greedy(tree: &TokenTree, logits: &[Vec<f32>]) -> Verified {
    assert!(
        logits.len() >= tree.len(),
        "{} logit rows for {} nodes",
        logits.len(),
        tree.len()
    );
    let mut node = 0;
    let mut accepted = Vec::new();
    let mut tokens = Vec::new();
    loop {
        let best = argmax(&logits[node]) as u32;
        tokens.push(best);
        match tree.children(node).find(|&c| tree.nodes()[c].token == best) {
            Some(child) => {
                accepted.push(child);
                node = child;
            }
            None => return Verified { accepted, tokens },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_at_root_and_accepts_full_depth() {
        let mut t = TokenTree::new(0);
        let a = t.push(0, 1, 0).unwrap();
        let b = t.push(a, 2, 0).unwrap();
        let onehot = |k: usize| {
            (0..4)
                .map(|i| if i == k { 1.0 } else { 0.0 })
                .collect::<Vec<f32>>()
        };
        // Target wants 3 at the root: nothing accepted, bonus 3.
        let v = verify_greedy(&t, &[onehot(3), onehot(2), onehot(0)]);
        assert_eq!((v.accepted, v.tokens), (vec![], vec![3]));
        // Target follows the whole chain, then 0 after the leaf.
        let v = verify_greedy(&t, &[onehot(1), onehot(2), onehot(0)]);
        assert_eq!((v.accepted, v.tokens), (vec![a, b], vec![1, 2, 0]));
    }
}
