//! The one small trait every draft implements.

use arbor_model::SamplingParams;
use rand::rngs::StdRng;

use crate::{SpecError, TokenTree, TreeShape};

/// What a draft is asked for at one step.
#[derive(Debug, Clone, Copy)]
pub struct DraftRequest<'a> {
    /// Every committed token (prompt and generated). The last one is the tree's root: accepted,
    /// but not yet in the target's cache.
    pub context: &'a [u32],
    /// The shape to grow.
    pub shape: &'a TreeShape,
    /// The target's sampling parameters: greedy requests get deterministic top-k children;
    /// otherwise model drafts sample from their own distribution under the same filters.
    pub sampling: &'a SamplingParams,
    /// This draft's index (recorded in the tree for per-draft statistics).
    pub id: usize,
}

/// Time and work one proposal took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DraftCost {
    /// Batched draft forward passes (levels) run.
    pub forwards: usize,
    /// Tokens those forwards processed (catch-up tokens included).
    pub tokens: usize,
}

/// A source of token trees. Each draft owns its state (a model draft its KV cache): it brings
/// itself in line with `context` on every call — keeping what the accepted path shares with
/// its last tree, dropping the rest.
pub trait Draft {
    /// A short name for logs and statistics.
    fn name(&self) -> &str;

    /// Proposes a tree below `req.context`'s last token.
    ///
    /// # Errors
    /// The draft model failed (e.g. the context no longer fits it).
    fn propose(
        &mut self,
        req: &DraftRequest<'_>,
        rng: &mut StdRng,
    ) -> Result<(TokenTree, DraftCost), SpecError>;

    /// Forgets all state (a new sequence starts).
    fn reset(&mut self);
}
