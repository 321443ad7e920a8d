//! Model inputs for tree nodes: depth positions and the tree-attention mask.

use arbor_model::ForwardInput;

use crate::TokenTree;

impl TokenTree {
    /// The model input that verifies the whole tree in one forward pass after `cached` tokens:
    /// tokens, depth positions and the tree-attention mask. Node `i` lands in cache row
    /// `cached + i`.
    pub fn forward_input(&self, cached: usize) -> ForwardInput {
        let all: Vec<usize> = (0..self.len()).collect();
        self.forward_input_for(&all, cached, cached, &[], cached)
    }

    /// The model input for some of the tree's nodes, when other nodes may already sit in the
    /// cache (a draft growing the tree level by level).
    ///
    /// - `nodes`: the nodes to feed, parents before children;
    /// - `prefix`: cache rows `0..prefix` are committed tokens every node sees;
    /// - `rows[i]`: the cache row of node `i` if it was fed earlier (`None`/absent otherwise);
    /// - `root_pos`: the root's position (`depth` is added for each node);
    /// - `cached`: the cache length now; the new nodes take rows `cached..`.
    ///
    /// # Panics
    /// If an ancestor of a node in `nodes` is neither in `rows` nor earlier in `nodes`
    /// (internal invariant of the caller's feeding order).
    pub fn forward_input_for(
        &self,
        nodes: &[usize],
        prefix: usize,
        cached: usize,
        rows: &[Option<usize>],
        root_pos: usize,
    ) -> ForwardInput {
        let n = nodes.len();
        let total = cached + n;
        let mut row_of: Vec<Option<usize>> = (0..self.len())
            .map(|i| rows.get(i).copied().flatten())
            .collect();
        for (k, &node) in nodes.iter().enumerate() {
            row_of[node] = Some(cached + k);
        }
        let mut mask = vec![false; n * total];
        for (k, &node) in nodes.iter().enumerate() {
            let row = &mut mask[k * total..(k + 1) * total];
            row[..prefix].fill(true);
            let mut cur = Some(node);
            while let Some(j) = cur {
                let r = row_of[j].unwrap_or_else(|| panic!("node {j} was never fed"));
                row[r] = true;
                cur = self.nodes()[j].parent;
            }
        }
        let nodes_ref = self.nodes();
        ForwardInput {
            batch: 1,
            n_new: n,
            tokens: nodes.iter().map(|&i| nodes_ref[i].token).collect(),
            positions: nodes
                .iter()
                .map(|&i| root_pos + nodes_ref[i].depth)
                .collect(),
            mask,
        }
    }
}
