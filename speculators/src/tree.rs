//! The token tree: nodes, the draft proposals that created them, trie merge and pruning.

use std::sync::Arc;

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
    /// A stochastic proposal needs the draft distribution it was drawn from.
    #[error("a {0:?} proposal needs the draft distribution, and token {1} must have q > 0 in it")]
    MissingDistribution(DrawKind, u32),
}

/// How one draft chose the children of one node. Decides the verification rule: speculative
/// sampling is lossless only for the way children were actually drawn (ALGORITHMS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrawKind {
    /// Chosen without randomness (top-k, n-gram match). Verified as if drawn from a point
    /// mass: accept with probability p(x), else remove x from p.
    Deterministic,
    /// Independent samples of `q` (repeats possible).
    Iid,
    /// Samples of `q` without replacement (distinct tokens, Sequoia).
    WithoutReplacement,
}

/// The children one draft proposed below one node, in draw order.
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal {
    /// The node the children hang below.
    pub parent: usize,
    /// Which draft proposed them.
    pub draft: usize,
    /// How they were drawn.
    pub kind: DrawKind,
    /// The draft's distribution at `parent` (after its sampling filters); `None` for
    /// [`DrawKind::Deterministic`].
    pub q: Option<Arc<[f32]>>,
    /// The drawn children's node indices, in draw order (an [`DrawKind::Iid`] draw may repeat).
    pub draws: Vec<usize>,
}

/// One node: a token proposed below `parent`.
#[derive(Debug, Clone, PartialEq)]
pub struct TreeNode {
    /// The token.
    pub token: u32,
    /// The parent's index; `None` only for the root.
    pub parent: Option<usize>,
    /// Distance from the root (root: 0).
    pub depth: usize,
    /// The draft that proposed it first (index into the engine's draft list).
    pub draft: usize,
    /// The proposing draft's probability of the whole root-to-node path (root: 1); dynamic
    /// expansion ranks nodes by it.
    pub score: f32,
}

/// A token tree hanging below the last accepted token (node 0, the root), in topological order:
/// every parent comes before its children. Node `i` sits at position `cached + depth(i)` and
/// attends to every cached token, its ancestors and itself.
///
/// Besides the nodes it keeps every draft's [`Proposal`]s: which children each draft drew at each
/// node, how, and from which distribution — what stochastic verification needs.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenTree {
    nodes: Vec<TreeNode>,
    proposals: Vec<Proposal>,
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
                score: 1.0,
            }],
            proposals: Vec::new(),
        }
    }

    /// Adds `token` below `parent` as a deterministic proposal of `draft` and returns its index.
    /// A token that `parent` already has as a child is not duplicated: its index is returned.
    ///
    /// # Errors
    /// [`TreeError::NoSuchParent`].
    pub fn push(&mut self, parent: usize, token: u32, draft: usize) -> Result<usize, TreeError> {
        let score = self.node(parent)?.score;
        let child = self.add_node(parent, token, draft, score)?;
        let existing = self
            .proposals
            .iter_mut()
            .find(|p| p.parent == parent && p.draft == draft && p.kind == DrawKind::Deterministic);
        match existing {
            Some(p) if !p.draws.contains(&child) => p.draws.push(child),
            Some(_) => {}
            None => self.proposals.push(Proposal {
                parent,
                draft,
                kind: DrawKind::Deterministic,
                q: None,
                draws: vec![child],
            }),
        }
        Ok(child)
    }

    /// Records that `draft` drew `tokens` (in order) below `parent` in the way `kind` says,
    /// from `q` (required unless deterministic), each with its draft probability. Returns the
    /// children's node indices (equal tokens share a node).
    ///
    /// # Errors
    /// [`TreeError::NoSuchParent`]; [`TreeError::MissingDistribution`] if a stochastic draw
    /// has no distribution or a token with zero probability in it.
    pub fn propose(
        &mut self,
        parent: usize,
        draft: usize,
        kind: DrawKind,
        q: Option<Arc<[f32]>>,
        tokens: &[(u32, f32)],
    ) -> Result<Vec<usize>, TreeError> {
        let base = self.node(parent)?.score;
        if kind != DrawKind::Deterministic {
            for &(t, _) in tokens {
                let ok = q
                    .as_ref()
                    .is_some_and(|q| q.get(t as usize).is_some_and(|&x| x > 0.0));
                if !ok {
                    return Err(TreeError::MissingDistribution(kind, t));
                }
            }
        }
        let mut draws = Vec::with_capacity(tokens.len());
        for &(t, prob) in tokens {
            draws.push(self.add_node(parent, t, draft, base * prob)?);
        }
        self.proposals.push(Proposal {
            parent,
            draft,
            kind,
            q: if kind == DrawKind::Deterministic {
                None
            } else {
                q
            },
            draws: draws.clone(),
        });
        Ok(draws)
    }

    fn node(&self, i: usize) -> Result<&TreeNode, TreeError> {
        self.nodes.get(i).ok_or(TreeError::NoSuchParent {
            parent: i,
            len: self.nodes.len(),
        })
    }

    fn add_node(
        &mut self,
        parent: usize,
        token: u32,
        draft: usize,
        score: f32,
    ) -> Result<usize, TreeError> {
        let depth = self.node(parent)?.depth + 1;
        if let Some(existing) = self.child_with(parent, token) {
            let n = &mut self.nodes[existing];
            n.score = n.score.max(score);
            return Ok(existing);
        }
        self.nodes.push(TreeNode {
            token,
            parent: Some(parent),
            depth,
            draft,
            score,
        });
        Ok(self.nodes.len() - 1)
    }

    /// The nodes in topological order.
    pub fn nodes(&self) -> &[TreeNode] {
        &self.nodes
    }

    /// Every proposal, in the order they were made.
    pub fn proposals(&self) -> &[Proposal] {
        &self.proposals
    }

    /// The proposals made below `node`, in order.
    pub fn proposals_at(&self, node: usize) -> impl Iterator<Item = &Proposal> + '_ {
        self.proposals.iter().filter(move |p| p.parent == node)
    }

    /// Number of nodes, the root included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the tree is only its root.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() == 1
    }

    /// Deepest node's depth.
    pub fn depth(&self) -> usize {
        self.nodes.iter().map(|n| n.depth).max().unwrap_or(0)
    }

    /// Children of `node`, in insertion order.
    pub fn children(&self, node: usize) -> impl Iterator<Item = usize> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .filter(move |(_, n)| n.parent == Some(node))
            .map(|(i, _)| i)
    }

    /// The child of `node` carrying `token`, if any.
    pub fn child_with(&self, node: usize, token: u32) -> Option<usize> {
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

    /// The deepest node reached by following `tokens` down from the root, and how many of
    /// them matched.
    pub fn follow(&self, tokens: &[u32]) -> (usize, usize) {
        let mut node = 0;
        for (i, &t) in tokens.iter().enumerate() {
            match self.child_with(node, t) {
                Some(c) => node = c,
                None => return (node, i),
            }
        }
        (node, tokens.len())
    }

    /// Merges `other` into this tree as a trie: equal token paths share nodes; `other`'s
    /// proposals are kept (pointing at the shared nodes). Returns, for each node of `other`,
    /// its index here.
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
            map.push(self.add_node(parent, n.token, n.draft, n.score)?);
        }
        for p in &other.proposals {
            self.proposals.push(Proposal {
                parent: map[p.parent],
                draws: p.draws.iter().map(|&d| map[d]).collect(),
                ..p.clone()
            });
        }
        Ok(map)
    }

    /// Shrinks the tree towards `budget` nodes (root included) by repeatedly removing the
    /// lowest-scored node that is a leaf and the last draw of every proposal holding it — so
    /// each proposal keeps a prefix of its draws.
    ///
    /// Only deterministic draws are ever removed: dropping a *sampled* child because of its
    /// score would make the kept draws no longer samples of `q`, and stochastic verification
    /// would be biased (the χ² test in `verifier/tests` caught exactly this). Stochastic trees
    /// must respect their budget while they grow, as [`crate::expand`] does.
    /// Returns, for each old node, its new index (`None` if removed).
    pub fn prune(&mut self, budget: usize) -> Vec<Option<usize>> {
        let n = self.nodes.len();
        let mut alive = vec![true; n];
        let mut children = vec![0usize; n];
        for node in &self.nodes[1..] {
            children[node.parent.expect("non-root")] += 1;
        }
        let mut count = n;
        while count > budget.max(1) {
            let removable = |i: usize| {
                alive[i]
                    && children[i] == 0
                    && self.proposals.iter().all(|p| {
                        if p.kind != DrawKind::Deterministic && p.draws.contains(&i) {
                            return false;
                        }
                        let live: Vec<usize> =
                            p.draws.iter().copied().filter(|&d| alive[d]).collect();
                        live.iter()
                            .position(|&d| d == i)
                            .is_none_or(|first| live[first..].iter().all(|&d| d == i))
                    })
            };
            let Some(victim) = (1..n)
                .filter(|&i| removable(i))
                .min_by(|&a, &b| self.nodes[a].score.total_cmp(&self.nodes[b].score))
            else {
                break;
            };
            alive[victim] = false;
            children[self.nodes[victim].parent.expect("non-root")] -= 1;
            count -= 1;
        }
        let mut map = vec![None; n];
        let mut nodes = Vec::with_capacity(count);
        for (i, node) in self.nodes.iter().enumerate() {
            if alive[i] {
                map[i] = Some(nodes.len());
                nodes.push(TreeNode {
                    parent: node
                        .parent
                        .map(|p| map[p].expect("parents outlive children")),
                    ..node.clone()
                });
            }
        }
        let proposals = self
            .proposals
            .iter()
            .filter_map(|p| {
                let draws: Vec<usize> = p.draws.iter().filter_map(|&d| map[d]).collect();
                (!draws.is_empty()).then(|| Proposal {
                    parent: map[p.parent].expect("a proposal with live draws has a live parent"),
                    draws,
                    ..p.clone()
                })
            })
            .collect();
        self.nodes = nodes;
        self.proposals = proposals;
        map
    }
}
