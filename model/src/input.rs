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

    /// The new tokens as a tree over the `cached` tokens, for attention kernels that take
    /// parent pointers instead of a mask: `parents[i]` is the new token row `i` hangs from
    /// (`-1`: it follows the cached tokens directly). Defined only for one sequence whose
    /// mask is a tree mask — each row sees every cached token, itself and exactly its
    /// ancestors (its parent being the nearest earlier row it sees) — as causal chunks and
    /// speculation trees are.
    ///
    /// ```
    /// use arbor_model::ForwardInput;
    /// assert_eq!(ForwardInput::causal(&[1, 2, 3], 4).tree_parents(4).unwrap(), vec![-1, 0, 1]);
    /// ```
    ///
    /// # Errors
    /// [`ModelError::Input`] for a batch of several sequences, a mask of the wrong size, or a
    /// mask that is not a tree mask.
    pub fn tree_parents(&self, cached: usize) -> Result<Vec<i32>> {
        let total = cached + self.n_new;
        if self.batch != 1 || self.mask.len() != self.n_new * total {
            return Err(ModelError::Input(format!(
                "tree parents of a batch of {} with a mask of {} entries over {total} tokens",
                self.batch,
                self.mask.len()
            )));
        }
        let mut parents: Vec<i32> = Vec::with_capacity(self.n_new);
        for (i, row) in self.mask.chunks(total).enumerate() {
            let tree = &row[cached..];
            let parent = tree[..i].iter().rposition(|&m| m).map_or(-1, |j| j as i32);
            let mut want = vec![false; self.n_new];
            want[i] = true;
            let mut node = parent;
            while node >= 0 {
                want[node as usize] = true;
                node = parents[node as usize];
            }
            if !row[..cached].iter().all(|&m| m) || tree != want {
                return Err(ModelError::Input(format!(
                    "mask row {i} is not a tree row (every cached token, itself and its \
                     ancestors)"
                )));
            }
            parents.push(parent);
        }
        Ok(parents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree mask over `cached` tokens from parent pointers.
    fn tree_input(parents: &[i32], cached: usize) -> ForwardInput {
        let n = parents.len();
        let total = cached + n;
        let mut mask = vec![false; n * total];
        for i in 0..n {
            mask[i * total..i * total + cached].fill(true);
            let mut node = i as i32;
            while node >= 0 {
                mask[i * total + cached + node as usize] = true;
                node = parents[node as usize];
            }
        }
        ForwardInput {
            batch: 1,
            n_new: n,
            tokens: vec![0; n],
            positions: vec![0; n],
            mask,
        }
    }

    #[test]
    fn tree_parents_recovers_every_tree_and_refuses_other_masks() {
        for parents in [
            vec![-1],
            vec![-1, 0, 0, 1, 1, 2, 5],
            vec![-1, -1, 1, 0],
            vec![-1, 0, 1, 2, 3],
        ] {
            for cached in [0, 3] {
                let input = tree_input(&parents, cached);
                assert_eq!(input.tree_parents(cached).unwrap(), parents);
            }
        }
        let good = tree_input(&[-1, 0, 0, 1], 2);
        let total = 6;
        let flipped = |at: usize| {
            let mut x = good.clone();
            x.mask[at] = !x.mask[at];
            x
        };
        assert!(
            flipped(total).tree_parents(2).is_err(),
            "row 1 misses a cached token"
        );
        assert!(
            flipped(3 * total + 2 + 2).tree_parents(2).is_err(),
            "row 3 sees a row off its path"
        );
        assert!(
            flipped(2).tree_parents(2).is_err(),
            "row 0 sees a later row"
        );
        assert!(
            flipped(3 * total + 2).tree_parents(2).is_err(),
            "row 3 misses its grandparent"
        );
        assert!(good.tree_parents(3).is_err(), "mask of another width");
        let two = ForwardInput {
            batch: 2,
            ..good.clone()
        };
        assert!(two.tree_parents(2).is_err());
    }
}
