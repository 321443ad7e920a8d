//! The plain-data input of one forward pass.

use crate::error::{ModelError, Result};

/// New tokens for a batch of sequences, with their positions and attention mask.
///
/// Plain host data: schedulers, speculators and the verifier build it without touching tensors.
/// All sequences in a batch share the cache length `cached` (the tokens already in the
/// [`KvCache`](arbor_cache::KvCache)).
///
/// # Shapes (row-major)
/// - `tokens`, `positions`: `[batch, n_new]`
/// - `mask`: `[batch, n_new, cached + n_new]`, `true` where the new token may attend
///
/// ```
/// use arbor_model::ForwardInput;
/// // Three new tokens after five cached ones, plain causal attention.
/// let input = ForwardInput::causal(&[7, 8, 9], 5);
/// assert_eq!(input.positions, vec![5, 6, 7]);
/// assert!(input.mask[0 * 8 + 5] && !input.mask[0 * 8 + 6]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardInput {
    /// Sequences in the batch.
    pub batch: usize,
    /// New tokens per sequence.
    pub n_new: usize,
    /// Token ids.
    pub tokens: Vec<u32>,
    /// RoPE position of each token.
    pub positions: Vec<usize>,
    /// Which cached and new tokens each new token attends to.
    pub mask: Vec<bool>,
}

impl ForwardInput {
    /// One sequence, `tokens` appended causally after `cached` tokens.
    pub fn causal(tokens: &[u32], cached: usize) -> Self {
        let n = tokens.len();
        let total = cached + n;
        let mut mask = vec![false; n * total];
        for i in 0..n {
            mask[i * total..i * total + cached + i + 1].fill(true);
        }
        Self {
            batch: 1,
            n_new: n,
            tokens: tokens.to_vec(),
            positions: (cached..total).collect(),
            mask,
        }
    }

    /// Checks shapes and ranges against a model and its cache.
    ///
    /// # Errors
    /// [`ModelError::Input`] describing the first problem.
    pub fn validate(&self, vocab: usize, max_position: usize, cached: usize) -> Result<()> {
        let bad = |s: String| Err(ModelError::Input(s));
        let rows = self.batch * self.n_new;
        if rows == 0 {
            return bad("no tokens".into());
        }
        if self.tokens.len() != rows || self.positions.len() != rows {
            return bad(format!(
                "{} tokens and {} positions for batch {} × {}",
                self.tokens.len(),
                self.positions.len(),
                self.batch,
                self.n_new
            ));
        }
        if self.mask.len() != rows * (cached + self.n_new) {
            return bad(format!(
                "mask has {} entries, expected {} × {} × ({} cached + {} new)",
                self.mask.len(),
                self.batch,
                self.n_new,
                cached,
                self.n_new
            ));
        }
        if let Some(t) = self.tokens.iter().find(|&&t| t as usize >= vocab) {
            return bad(format!("token id {t} outside the vocabulary of {vocab}"));
        }
        if let Some(p) = self.positions.iter().find(|&&p| p >= max_position) {
            return bad(format!(
                "position {p} beyond the model's context of {max_position}"
            ));
        }
        let total = cached + self.n_new;
        if let Some(r) = self.mask.chunks(total).position(|row| !row.contains(&true)) {
            return bad(format!("mask row {r} attends to nothing"));
        }
        Ok(())
    }
}
