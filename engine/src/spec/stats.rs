//! Speculation figures: tokens per step τ, acceptance α per draft and per depth, time split.

use std::time::Duration;

use arbor_speculators::TokenTree;
use serde::Serialize;

/// One draft's share of a generation.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DraftStats {
    /// The draft's name.
    pub name: String,
    /// Tree nodes it proposed (a node proposed by several drafts counts for each).
    pub drafted: usize,
    /// Of those, nodes the target accepted.
    pub accepted: usize,
    /// Time spent proposing.
    pub time: Duration,
    /// Batched draft forwards run.
    pub forwards: usize,
}

impl DraftStats {
    /// Acceptance rate α = accepted / drafted.
    pub fn alpha(&self) -> f64 {
        ratio(self.accepted, self.drafted)
    }
}

/// Acceptance at one tree depth.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DepthStats {
    /// Steps whose walk reached the depth above and found at least one child to try.
    pub tried: usize,
    /// Steps that accepted a node at this depth.
    pub accepted: usize,
}

impl DepthStats {
    /// Conditional acceptance at this depth: accepted / tried.
    pub fn alpha(&self) -> f64 {
        ratio(self.accepted, self.tried)
    }
}

/// What one draft → verify → commit step did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StepStats {
    /// Tree nodes below the root (after merging every draft's tree).
    pub tree_nodes: usize,
    /// Tree depth.
    pub tree_depth: usize,
    /// Accepted nodes.
    pub accepted: usize,
    /// Tokens emitted (accepted + the bonus token, cut short by a stop).
    pub emitted: usize,
    /// Time drafting.
    pub draft_time: Duration,
    /// Time in the target's verification forward and the acceptance walk.
    pub verify_time: Duration,
}

/// Speculation totals of one generation.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SpecStats {
    /// Verification steps.
    pub steps: usize,
    /// Tree nodes verified (below the roots).
    pub drafted: usize,
    /// Nodes accepted.
    pub accepted: usize,
    /// Tokens emitted by the steps (accepted + bonus tokens).
    pub emitted: usize,
    /// Time drafting.
    pub draft_time: Duration,
    /// Time verifying (target forward + walk).
    pub verify_time: Duration,
    /// Time committing (KV rows kept) and bookkeeping.
    pub commit_time: Duration,
    /// Per draft, in the engine's order.
    pub drafts: Vec<DraftStats>,
    /// Per depth: index 0 is depth 1.
    pub depths: Vec<DepthStats>,
}

impl SpecStats {
    /// Tokens per verification step τ = (accepted + 1) per step, on average.
    pub fn tau(&self) -> f64 {
        ratio(self.accepted + self.steps, self.steps)
    }

    /// Acceptance rate α = accepted / drafted.
    pub fn alpha(&self) -> f64 {
        ratio(self.accepted, self.drafted)
    }

    /// Records a verified tree: which nodes each draft proposed, the accepted path. Returns,
    /// for each depth the acceptance walk tried (its node had children), whether it accepted.
    pub(crate) fn record_tree(&mut self, tree: &TokenTree, accepted: &[usize]) -> Vec<bool> {
        self.steps += 1;
        self.drafted += tree.len() - 1;
        self.accepted += accepted.len();
        let mut proposed: Vec<Vec<bool>> = vec![vec![false; tree.len()]; self.drafts.len()];
        for p in tree.proposals() {
            if let Some(row) = proposed.get_mut(p.draft) {
                for &n in &p.draws {
                    row[n] = true;
                }
            }
        }
        for (d, row) in self.drafts.iter_mut().zip(&proposed) {
            d.drafted += row.iter().filter(|&&x| x).count();
            d.accepted += accepted.iter().filter(|&&n| row[n]).count();
        }
        let walk = depth_walk(tree, accepted);
        if self.depths.len() < walk.len() {
            self.depths.resize(walk.len(), DepthStats::default());
        }
        for (d, &ok) in self.depths.iter_mut().zip(&walk) {
            d.tried += 1;
            d.accepted += usize::from(ok);
        }
        walk
    }

    /// Adds another generation's figures to these (totals over several generations).
    pub fn merge(&mut self, s: &SpecStats) {
        self.steps += s.steps;
        self.drafted += s.drafted;
        self.accepted += s.accepted;
        self.emitted += s.emitted;
        self.draft_time += s.draft_time;
        self.verify_time += s.verify_time;
        self.commit_time += s.commit_time;
        if self.drafts.len() < s.drafts.len() {
            self.drafts.resize(s.drafts.len(), DraftStats::default());
        }
        for (t, d) in self.drafts.iter_mut().zip(&s.drafts) {
            t.name.clone_from(&d.name);
            t.drafted += d.drafted;
            t.accepted += d.accepted;
            t.time += d.time;
            t.forwards += d.forwards;
        }
        if self.depths.len() < s.depths.len() {
            self.depths.resize(s.depths.len(), DepthStats::default());
        }
        for (t, d) in self.depths.iter_mut().zip(&s.depths) {
            t.tried += d.tried;
            t.accepted += d.accepted;
        }
    }
}

/// The acceptance walk down `tree` along the `accepted` path: one entry per depth whose node
/// had children to try, `true` where a child was accepted (the walk ends at the first `false`).
fn depth_walk(tree: &TokenTree, accepted: &[usize]) -> Vec<bool> {
    let mut walk = Vec::new();
    let mut node = 0;
    while tree.children(node).next().is_some() {
        match accepted.get(walk.len()) {
            Some(&n) => {
                walk.push(true);
                node = n;
            }
            None => {
                walk.push(false);
                break;
            }
        }
    }
    walk
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}
