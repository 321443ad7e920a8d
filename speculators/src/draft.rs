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
    /// Growth gates (empty: grow the whole shape). Level `l + 2` is grown only while the
    /// best node of level `l + 1` has a draft path probability (the product of the draft's
    /// probabilities along its path) of at least `gates[l]`: the draft's confidence is a
    /// calibrated estimate of acceptance (EAGLE-2, arXiv 2406.16858), so a level below an
    /// unlikely path costs a forward that is rarely repaid. The engine derives the gates
    /// from its cost model (`Planner::gates`). Deciding from draws already made, never from
    /// the draws it leads to, keeps sampled trees exact under SpecInfer verification.
    pub gates: &'a [f32],
}

/// Most tokens a forward may feed to count as a tree level's cost. Levels feed a few nodes,
/// and the first forward of a proposal the tokens accepted since the last one; after a run of
/// plain steps that catch-up is long and costs several levels' time — counted, it made the
/// planner think drafting dear and keep decoding plainly (seen on Qwen2.5-1.5B with the 0.5B
/// draft: `auto` at 0.96× plain where `chain:3` gave 1.24×).
pub const LEVEL_TOKENS: usize = 16;

/// Work one proposal took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DraftCost {
    /// Batched draft forward passes (levels) run.
    pub forwards: usize,
    /// Tokens those forwards processed (catch-up tokens included).
    pub tokens: usize,
    /// Seconds spent in level forwards that fed at most `LEVEL_TOKENS` tokens (a catch-up
    /// after plain steps excluded): what one more tree level costs, for the tree planner.
    pub level_secs: f64,
    /// How many forwards `level_secs` covers.
    pub levels: usize,
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

    /// Processes `context` ahead of the first proposal (during the target's prefill), so
    /// that proposing does not start with a long catch-up. Drafts without state ignore it.
    ///
    /// # Errors
    /// The draft model failed.
    fn prefill(&mut self, context: &[u32], chunk: usize) -> Result<(), SpecError> {
        let _ = (context, chunk);
        Ok(())
    }
}

impl DraftCost {
    /// Books one forward of `tokens` tokens that took `secs`.
    pub fn note_level(&mut self, tokens: usize, secs: f64) {
        if tokens <= LEVEL_TOKENS {
            self.level_secs += secs;
            self.levels += 1;
        }
    }

    /// Seconds per level forward, if any was measured.
    pub fn secs_per_level(&self) -> Option<f64> {
        (self.levels > 0).then(|| self.level_secs / self.levels as f64)
    }
}
