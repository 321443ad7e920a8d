//! H2O: heavy-hitter eviction (Zhang et al., NeurIPS 2023, arXiv 2306.14048).
//!
//! Every cached token accumulates the attention it receives from committed queries — the rows
//! of a tree vote only once the tree is verified and only for the accepted path. At every
//! eviction point (a forward starting at a sequence length that is a multiple of the page
//! size) a layer holding more than `budget`
//! tokens keeps its sinks, its `recent` tokens and the heavy hitters with the most votes, and
//! evicts the rest for good; their slots are reused by compacting the pages.
//!
//! Eviction is per layer and KV head, as in the paper: each KV head scores its tokens by the
//! attention its own query heads gave them and keeps its own heavy hitters (the paged cache
//! compacts each head separately within the layer's pages). Eviction points are fixed positions, so
//! speculative decoding, whose trees are cut to end at the next point, evicts exactly what
//! plain decoding evicts.

/// H2O settings (per KV head: each head of each layer holds `budget` tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H2oConfig {
    /// Tokens each KV head of a layer holds after an eviction point (sinks + recent + heavy
    /// hitters).
    pub budget: usize,
    /// Recent tokens always kept.
    pub recent: usize,
    /// Tokens at the start always kept.
    pub sinks: usize,
}

impl H2oConfig {
    /// H2O with `budget` tokens, half of them recent (as in the paper), and 4 sinks.
    pub fn with_budget(budget: usize) -> Self {
        Self {
            budget,
            recent: budget / 2,
            sinks: 4,
        }
    }
}

/// The slots one KV head of a layer keeps at an eviction point, increasing; `None` when it
/// keeps them all.
///
/// `logical[j]` is slot `j`'s position in the sequence, `votes[j]` its accumulated attention,
/// `next` the sequence length.
pub(crate) fn kept_slots(
    cfg: &H2oConfig,
    logical: &[usize],
    votes: &[f32],
    next: usize,
) -> Option<Vec<usize>> {
    let len = logical.len();
    if len <= cfg.budget {
        return None;
    }
    let candidate = |j: usize| logical[j] >= cfg.sinks && logical[j] + cfg.recent < next;
    let candidates: Vec<usize> = (0..len).filter(|&j| candidate(j)).collect();
    let heavy = cfg.budget.saturating_sub(len - candidates.len());
    if candidates.len() <= heavy {
        return None;
    }
    let mut ranked = candidates;
    ranked.sort_by(|&a, &b| votes[b].total_cmp(&votes[a]).then(a.cmp(&b)));
    let mut keep = vec![true; len];
    for &j in &ranked[heavy..] {
        keep[j] = false;
    }
    Some((0..len).filter(|&j| keep[j]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_sinks_recent_and_heaviest_within_budget() {
        let cfg = H2oConfig {
            budget: 6,
            recent: 2,
            sinks: 1,
        };
        let logical: Vec<usize> = (0..10).collect();
        let votes = [0.0, 5.0, 1.0, 9.0, 1.0, 3.0, 0.5, 7.0, 0.0, 0.0];
        let kept = kept_slots(&cfg, &logical, &votes, 10).unwrap();
        // Sink 0, recent 8 and 9, heavy hitters 3, 7, 1 (votes 9, 7, 5).
        assert_eq!(kept, vec![0, 1, 3, 7, 8, 9]);
        assert!(kept_slots(&cfg, &logical[..6], &votes[..6], 6).is_none());
    }
}
