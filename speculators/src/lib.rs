//! Arbor's draft runners (filled by the tree-speculation work; nothing here yet).
//!
//! What will live here: the `TokenTree` plain data type (nodes in topological order with
//! token, parent, depth, proposing draft and its distribution; tree-attention mask and position
//! ids; trie merge; accepted-path extraction), SpecInfer expansion ⟨k₁..kₘ⟩ and a dynamic
//! budgeted expansion, and the drafts behind one small trait: a model draft, a truncated-layer
//! self-draft, and a model-free n-gram / prompt-lookup draft (SpecInfer, arXiv 2305.09781).
