//! Arbor's tree verifier (filled by the tree-speculation work; nothing here yet).
//!
//! What will live here: one target forward over a whole token tree (tree mask + depth
//! positions through the model's ordinary forward), greedy verification, and SpecInfer's
//! multi-step speculative sampling, lossless for the way children were drawn (SpecInfer,
//! arXiv 2305.09781; Sequoia, arXiv 2402.12374), and the commit of the accepted path.
