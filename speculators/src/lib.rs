//! Arbor's draft side of speculative decoding (SpecInfer, arXiv 2305.09781).
//!
//! - [`TokenTree`]: the plain data type through which drafts and the verifier meet — nodes in
//!   topological order (token, parent, depth, proposing draft, draft path probability) and every
//!   draft's [`Proposal`] (which children it drew, how, and from which distribution); the
//!   tree-attention mask and depth positions as a model [`ForwardInput`]; trie merge; pruning.
//! - [`TreeShape`]: SpecInfer expansion ⟨k₁..kₘ⟩ or budgeted best-first expansion (EAGLE-2,
//!   arXiv 2406.16858; Sequoia, arXiv 2402.12374).
//! - [`Draft`], one small trait, and its drafts: [`ModelDraft`] (a smaller model sharing the
//!   tokenizer, or the target's first layers via `Transformer::truncated`) and [`NgramDraft`]
//!   (prompt lookup, no model).
//!
//! ```
//! use arbor_speculators::TokenTree;
//! // Root is the last accepted token (not yet in the KV cache); two branches below it.
//! let mut t = TokenTree::new(10);
//! let a = t.push(0, 11, 0).unwrap();
//! let b = t.push(0, 12, 0).unwrap();
//! let a2 = t.push(a, 13, 0).unwrap();
//! let input = t.forward_input(5); // 5 tokens already cached
//! assert_eq!(input.positions, vec![5, 6, 6, 7]);
//! assert_eq!(t.path(a2), vec![0, a, a2]);
//! assert!(!input.mask[a2 * 9 + 5 + b]); // a2 does not see the sibling branch
//! ```

pub mod choose;
mod draft;
mod error;
mod expand;
mod input;
mod model_draft;
mod ngram;
mod shape;
mod tree;

#[cfg(test)]
mod tests;

pub use draft::{Draft, DraftCost, DraftRequest};
pub use error::SpecError;
pub use expand::expand;
pub use model_draft::ModelDraft;
pub use ngram::NgramDraft;
pub use shape::{ShapeParseError, TreeShape};
pub use tree::{DrawKind, Proposal, TokenTree, TreeError, TreeNode};

/// Model input types the tree produces.
pub use arbor_model::ForwardInput;
