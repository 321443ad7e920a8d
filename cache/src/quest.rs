//! Quest: query-aware page selection (Tang et al., ICML 2024, arXiv 2406.10774).
//!
//! Every page keeps, per key channel, the minimum `m` and maximum `M` of its keys (over every
//! representation a query can read them in). For a query `q`, `Σ_c max(q_c·M_c, q_c·m_c)` is an
//! upper bound of `q·k` for every key `k` in the page ([`page_bound`]); each query head reads
//! only the pages its own bound ranks highest that fit a token budget, plus the sink pages and
//! the recent ones, which it always reads (with GQA the heads sharing a KV head still choose
//! for themselves, as in the paper's per-head selection). The first layers stay dense (their
//! attention is too flat for a few pages to carry it).
//!
//! Selection is a pure function of the query, its position and the pages' contents; pages
//! within `recent` tokens of the query are never candidates, so a tree no deeper than `recent`
//! selects among committed pages only, and speculative decoding sees what plain decoding sees.
//!
//! ```
//! use arbor_cache::quest::page_bound;
//! let (min, max) = ([-1.0, 0.0], [2.0, 0.5]);
//! let q = [1.0, -2.0];
//! // The page's keys lie in the box [-1, 2] × [0, 0.5]: q·k ≤ 1·2 + (-2)·0.
//! assert_eq!(page_bound(&q, &min, &max), 2.0);
//! ```

/// Quest settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuestConfig {
    /// Tokens attention reads per query (sinks and recent pages included).
    pub budget: usize,
    /// Recent tokens always read (≥ the deepest speculation tree).
    pub recent: usize,
    /// Tokens at the start always read.
    pub sinks: usize,
    /// Leading layers that read every page.
    pub dense_layers: usize,
}

impl QuestConfig {
    /// Quest with `budget` tokens and the defaults: 16 recent tokens, 4 sinks, two dense layers.
    pub fn with_budget(budget: usize) -> Self {
        Self {
            budget,
            recent: 16,
            sinks: 4,
            dense_layers: 2,
        }
    }
}

/// Quest's upper bound of `q·k` over a page whose keys lie between `min` and `max` per channel.
pub fn page_bound(q: &[f32], min: &[f32], max: &[f32]) -> f32 {
    // Eight independent lanes (vectorizable; a single running sum is not).
    let mut acc = [0.0f32; 8];
    let (cq, rq) = q.as_chunks::<8>();
    let (cl, rl) = min.as_chunks::<8>();
    let (ch, rh) = max.as_chunks::<8>();
    for ((x, lo), hi) in cq.iter().zip(cl).zip(ch) {
        for l in 0..8 {
            acc[l] += (x[l] * hi[l]).max(x[l] * lo[l]);
        }
    }
    let tail: f32 = rq
        .iter()
        .zip(rl.iter().zip(rh))
        .map(|(&x, (&lo, &hi))| (x * hi).max(x * lo))
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// One page a query could skip.
pub(crate) struct Candidate {
    pub(crate) page: usize,
    pub(crate) score: f32,
}

/// The `n` best-scored pages of `candidates` (ties to the older page), in no particular order.
pub(crate) fn best_pages(mut candidates: Vec<Candidate>, n: usize) -> Vec<usize> {
    let order =
        |a: &Candidate, b: &Candidate| b.score.total_cmp(&a.score).then(a.page.cmp(&b.page));
    if n < candidates.len() {
        candidates.select_nth_unstable_by(n, order);
        candidates.truncate(n);
    }
    candidates.iter().map(|c| c.page).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// The bound is never below the true maximum of `q·k` over the page (property test over
    /// random pages and queries, including negative and mixed-sign channels).
    #[test]
    fn bound_is_at_least_every_score_in_the_page() {
        let mut rng = StdRng::seed_from_u64(17);
        for case in 0..500 {
            let hd = rng.random_range(1..40);
            let n = rng.random_range(1..20);
            let scale = if case % 3 == 0 { 100.0 } else { 1.0 };
            let keys: Vec<Vec<f32>> = (0..n)
                .map(|_| (0..hd).map(|_| rng.random_range(-scale..scale)).collect())
                .collect();
            let q: Vec<f32> = (0..hd).map(|_| rng.random_range(-2.0..2.0)).collect();
            let mut min = vec![f32::INFINITY; hd];
            let mut max = vec![f32::NEG_INFINITY; hd];
            for k in &keys {
                for c in 0..hd {
                    min[c] = min[c].min(k[c]);
                    max[c] = max[c].max(k[c]);
                }
            }
            let bound = page_bound(&q, &min, &max);
            for k in &keys {
                let s: f32 = q.iter().zip(k).map(|(a, b)| a * b).sum();
                assert!(
                    bound >= s - 1e-4 * (1.0 + s.abs()),
                    "case {case}: bound {bound} < score {s}"
                );
            }
        }
    }

    #[test]
    fn best_pages_by_score_ties_to_the_older() {
        let c = |page, score| Candidate { page, score };
        let all = || vec![c(3, 1.0), c(5, 9.0), c(7, 1.0), c(9, 4.0)];
        let mut best = best_pages(all(), 3);
        best.sort_unstable();
        assert_eq!(best, vec![3, 5, 9]);
        assert_eq!(best_pages(all(), 1), vec![5]);
        assert_eq!(best_pages(all(), 9).len(), 4);
    }
}
