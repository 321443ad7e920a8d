//! Arbor's draft side of speculative decoding.
//!
//! Today: [`TokenTree`], the plain data type through which drafts and the verifier meet
//! (SpecInfer, arXiv 2305.09781): nodes in topological order with token, parent, depth and the
//! proposing draft; the tree-attention mask and position ids as a model [`ForwardInput`]; trie
//! merge of trees from several drafts; root-to-node paths.
//!
//! Still to come here (tree-speculation issue): expansion ⟨k₁..kₘ⟩ and budgeted dynamic
//! expansion, and the drafts behind one small trait (model draft, truncated-layer self-draft,
//! n-gram / prompt-lookup draft).
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

mod tree;

pub use tree::{TokenTree, TreeError, TreeNode};

/// Model input types the tree produces.
pub use arbor_model::ForwardInput;
