//! The token tree.

use arbor_model::ForwardInput;

/// Errors building a tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// The parent index does not name an existing node.
    #[error("parent {parent} does not exist (tree has {len} nodes)")]
    NoSuchParent {
        /// The index given.
        parent: usize,
        /// Nodes in the tree.
        len: usize,
    },
    /// Trees with different roots cannot be merged.
    #[error("cannot merge trees with roots {0} and {1}")]
    RootMismatch(u32, u32),
}

/// One node: a token proposed below `parent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeNode {
    /// The token.
    pub token: u32,
    /// The parent's index; `None` only for the root.
    pub parent: Option<usize>,
    /// Distance from the root (root: 0).
    pub depth: usize,
    /// Which draft proposed it (index into the engine's draft list).
    pub draft: usize,
}

/// A token tree hanging below the last accepted token (node 0, the root), in topological order:
/// every parent comes before its children. Node `i` sits at position `cached + depth(i)` and
/// attends to every cached token, its ancestors and itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenTree {
    nodes: Vec<TreeNode>,
}

impl TokenTree {
    /// A tree holding only the root token.
    pub fn new(root: u32) -> Self {
        Self {
            nodes: vec![TreeNode {
                token: root,
                parent: None,
                depth: 0,
                draft: 0,
            }],
        }
    }

    /// Adds `token` below `parent` (proposed by `draft`) and returns its index. A token that
    /// `parent` already has as a child is not duplicated: its index is returned.
    ///
    /// # Errors
    /// [`TreeError::NoSuchParent`].
    pub fn push(&mut self, parent: usize, token: u32, draft: usize) -> Result<usize, TreeError> {
        let Some(p) = self.nodes.get(parent) else {
            return Err(TreeError::NoSuchParent {
                parent,
                len: self.nodes.len(),
            });
        };
        if let Some(existing) = self.child_with(parent, token) {
            return Ok(existing);
        }
        let depth = p.depth + 1;
        self.nodes.push(TreeNode {
            token,
            parent: Some(parent),
            depth,
            draft,
        });
        Ok(self.nodes.len() - 1)
    }

    /// The nodes in topological order.
    pub fn nodes(&self) -> &[TreeNode] {
        &self.nodes
    }

    /// Number of nodes, the root included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the tree is only its root.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() == 1
    }

    /// Children of `node`, in insertion order.
    pub fn children(&self, node: usize) -> impl Iterator<Item = usize> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .filter(move |(_, n)| n.parent == Some(node))
            .map(|(i, _)| i)
    }

    fn child_with(&self, node: usize, token: u32) -> Option<usize> {
        self.children(node).find(|&c| self.nodes[c].token == token)
    }

    /// Indices from the root down to `node`, both included.
    ///
    /// # Panics
    /// If `node` is out of range (internal invariant: indices come from this tree).
    pub fn path(&self, node: usize) -> Vec<usize> {
        let mut path = vec![node];
        let mut cur = self.nodes[node].parent;
        while let Some(p) = cur {
            path.push(p);
            cur = self.nodes[p].parent;
        }
        path.reverse();
        path
    }

    /// Merges `other` into this tree as a trie: equal token paths share nodes. Returns, for each
    /// node of `other`, its index here.
    ///
    /// # Errors
    /// [`TreeError::RootMismatch`] if the roots differ.
    pub fn merge(&mut self, other: &TokenTree) -> Result<Vec<usize>, TreeError> {
        if other.nodes[0].token != self.nodes[0].token {
            return Err(TreeError::RootMismatch(
                self.nodes[0].token,
                other.nodes[0].token,
            ));
        }
        let mut map = Vec::with_capacity(other.len());
        map.push(0);
        for n in &other.nodes[1..] {
            let parent = map[n.parent.expect("only the root has no parent")];
            map.push(self.push(parent, n.token, n.draft)?);
        }
        Ok(map)
    }

    /// The model input that verifies the whole tree in one forward pass after `cached` tokens:
    /// tokens, depth positions and the tree-attention mask.
    pub fn forward_input(&self, cached: usize) -> ForwardInput {
        let n = self.nodes.len();
        let total = cached + n;
        let mut mask = vec![false; n * total];
        for i in 0..n {
            let row = &mut mask[i * total..(i + 1) * total];
            row[..cached].fill(true);
            let mut cur = Some(i);
            while let Some(j) = cur {
                row[cached + j] = true;
                cur = self.nodes[j].parent;
            }
        }
        ForwardInput {
            batch: 1,
            n_new: n,
            tokens: self.nodes.iter().map(|x| x.token).collect(),
            positions: self.nodes.iter().map(|x| cached + x.depth).collect(),
            mask,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbor_model::{Architecture, ModelConfig, RandomWeights, Transformer};
    type B = burn::backend::Flex;

    fn sample_tree() -> TokenTree {
        let mut t = TokenTree::new(5);
        let a = t.push(0, 7, 0).unwrap();
        let b = t.push(0, 9, 1).unwrap();
        let c = t.push(a, 3, 0).unwrap();
        t.push(a, 4, 0).unwrap();
        t.push(b, 3, 1).unwrap();
        t.push(c, 8, 0).unwrap();
        t
    }

    #[test]
    fn structure_paths_and_errors() {
        let t = sample_tree();
        assert_eq!(t.len(), 7);
        assert_eq!(t.children(1).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(t.path(6), vec![0, 1, 3, 6]);
        assert_eq!(t.nodes()[6].depth, 3);
        let mut t2 = t.clone();
        assert_eq!(t2.push(1, 3, 5).unwrap(), 3, "an existing child is reused");
        assert!(matches!(
            t2.push(99, 1, 0),
            Err(TreeError::NoSuchParent { parent: 99, .. })
        ));
    }

    #[test]
    fn trie_merge_shares_equal_paths() {
        let mut t = sample_tree();
        let mut other = TokenTree::new(5);
        let x = other.push(0, 7, 2).unwrap(); // same as node 1
        other.push(x, 4, 2).unwrap(); // same as node 4
        other.push(x, 6, 2).unwrap(); // new
        let map = t.merge(&other).unwrap();
        assert_eq!(map, vec![0, 1, 4, 7]);
        assert_eq!(t.nodes()[7].draft, 2);
        assert!(matches!(
            t.merge(&TokenTree::new(6)),
            Err(TreeError::RootMismatch(5, 6))
        ));
    }

    /// The target's logits at every tree node equal those of running that node's path alone:
    /// the mask and positions make one forward over the tree equivalent to |tree| causal runs.
    #[test]
    fn tree_forward_equals_each_path_run_alone() {
        let dev = Default::default();
        for arch in [Architecture::Llama, Architecture::Qwen2] {
            let cfg = ModelConfig::tiny(arch);
            let model = Transformer::<B>::from_weights(&cfg, &mut RandomWeights::new(4, 0.3), &dev)
                .unwrap();
            let prefix = [1u32, 2, 3, 4, 5];
            let tree = sample_tree();
            let mut cache = model.new_cache();
            model
                .forward(&ForwardInput::causal(&prefix, 0), &mut cache)
                .unwrap();
            let hidden = model
                .forward(&tree.forward_input(prefix.len()), &mut cache)
                .unwrap();
            let got = model.logits(hidden).into_data().to_vec::<f32>().unwrap();
            let v = cfg.vocab_size;
            for i in 0..tree.len() {
                let seq: Vec<u32> = prefix
                    .iter()
                    .copied()
                    .chain(tree.path(i).iter().map(|&j| tree.nodes()[j].token))
                    .collect();
                let mut c = model.new_cache();
                let alone = model
                    .forward_last_logits(&ForwardInput::causal(&seq, 0), &mut c)
                    .unwrap();
                let worst = alone[0]
                    .iter()
                    .zip(&got[i * v..(i + 1) * v])
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(worst < 1e-4, "{arch:?} node {i}: max difference {worst}");
            }
        }
    }
}
