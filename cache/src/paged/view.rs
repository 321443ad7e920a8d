//! One layer of a [`PagedKv`] as attention reads it: the representation rule of the
//! quantized pages and Quest's page selection.

use arbor_kernels::attention::KvSource;

use super::{LayerPages, PagedKv};
use crate::compression::read_row;
use crate::quest::{Candidate, best_pages, page_bound};
use crate::{KvLayout, KvPolicy};

/// One layer of a [`PagedKv`], read in place by attention.
#[derive(Debug, Clone, Copy)]
pub struct LayerView<'a> {
    pages: &'a LayerPages,
    layout: KvLayout,
    layer: usize,
    policy: Option<&'a KvPolicy>,
}

impl<'a> LayerView<'a> {
    pub(super) fn new(cache: &'a PagedKv, layer: usize) -> Self {
        Self {
            pages: &cache.layers[layer],
            layout: cache.layout,
            layer,
            policy: cache.policy.as_deref(),
        }
    }

    /// Row `j` of head `g` as a query at `pos` reads it: the codes of a packed page whose
    /// last token is older than the window, else full precision.
    #[inline]
    fn read<'b>(
        &'b self,
        values: bool,
        g: usize,
        j: usize,
        pos: usize,
        buf: &'b mut [f32],
    ) -> &'b [f32] {
        let KvLayout {
            page_size: ps,
            n_kv_heads: kvh,
            head_dim: hd,
            ..
        } = self.layout;
        let (p, slot) = (j / ps, j % ps);
        let o = (slot * kvh + g) * hd;
        let l = self.pages;
        let full = if values { &l.v[p] } else { &l.k[p] };
        let Some(c) = self.policy.and_then(|p| p.compression.as_ref()) else {
            return &full[o..o + hd];
        };
        let codes = if values { &l.vq[p] } else { &l.kq[p] };
        let old = !codes.is_empty() && l.logical((p + 1) * ps - 1) + c.window < pos;
        // A freed page is only read by queries past the window (the model issues no other).
        if !old && !full.is_empty() {
            return &full[o..o + hd];
        }
        if values {
            read_row(&c.values[self.layer], codes, slot * kvh + g, buf);
        } else {
            c.keys[self.layer].read(codes, slot, g, kvh, buf);
        }
        buf
    }
}

impl KvSource for LayerView<'_> {
    #[inline]
    fn key<'b>(
        &'b self,
        _: usize,
        g: usize,
        j: usize,
        pos: usize,
        buf: &'b mut [f32],
    ) -> &'b [f32] {
        self.read(false, g, j, pos, buf)
    }

    #[inline]
    fn value<'b>(
        &'b self,
        _: usize,
        g: usize,
        j: usize,
        pos: usize,
        buf: &'b mut [f32],
    ) -> &'b [f32] {
        self.read(true, g, j, pos, buf)
    }

    /// Quest: among the pages the query sees in full that are past the sinks and older than
    /// the recent span, keeps the best-bounded ones that fit the budget.
    fn select(&self, _: usize, g: usize, pos: usize, queries: &[f32], keys: &mut Vec<usize>) {
        let Some(q) = self.policy.and_then(|p| p.quest) else {
            return;
        };
        if self.layer < q.dense_layers || keys.len() <= q.budget {
            return;
        }
        let KvLayout {
            page_size: ps,
            head_dim: hd,
            ..
        } = self.layout;
        let l = self.pages;
        let mut visible = vec![0usize; l.k.len()];
        for &j in keys.iter() {
            visible[j / ps] += 1;
        }
        let candidates: Vec<Candidate> = (0..l.k.len())
            .filter(|&p| {
                visible[p] == ps
                    && l.logical(p * ps) >= q.sinks
                    && l.logical((p + 1) * ps - 1) + q.recent < pos
            })
            .map(|p| {
                let b = &l.bounds[p];
                let (lo, hi) = b.split_at(b.len() / 2);
                let (lo, hi) = (&lo[g * hd..(g + 1) * hd], &hi[g * hd..(g + 1) * hd]);
                let score = queries
                    .chunks_exact(hd)
                    .map(|qr| page_bound(qr, lo, hi))
                    .sum();
                Candidate { page: p, score }
            })
            .collect();
        let always = keys.len() - candidates.len() * ps;
        let n = q.budget.saturating_sub(always) / ps;
        if n >= candidates.len() {
            return;
        }
        let mut skipped = vec![false; l.k.len()];
        for c in &candidates {
            skipped[c.page] = true;
        }
        for p in best_pages(candidates, n) {
            skipped[p] = false;
        }
        keys.retain(|&j| !skipped[j / ps]);
    }
}
