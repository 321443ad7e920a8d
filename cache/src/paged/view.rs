//! One layer of a [`PagedKv`] as attention reads it: the representation rule of the
//! quantized pages and Quest's page selection.

use arbor_kernels::attention::KvSource;

use super::{LayerPages, PagedKv};
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

    /// Whether a query at `pos` reads row `j` of head `g`'s keys (`values`: values) from
    /// codes: a packed page whose last token is older than the window, or whose full copy is
    /// freed.
    #[inline(always)]
    fn reads_codes(&self, values: bool, g: usize, j: usize, pos: usize) -> bool {
        let Some(c) = self.policy.and_then(|p| p.compression.as_ref()) else {
            return false;
        };
        let ps = self.layout.page_size;
        let p = j / ps;
        let l = self.pages;
        let (full, codes) = if values {
            (&l.v[p], &l.vq[p])
        } else {
            (&l.k[p], &l.kq[p])
        };
        let old = !codes.is_empty() && l.logical((p + 1) * ps - 1, g) + c.window < pos;
        old || full.is_empty()
    }

    /// Row `j` of head `g` as a query at `pos` reads it: the codes of a packed page whose
    /// last token is older than the window, else full precision.
    #[inline(always)]
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
        // A freed page is only read by queries past the window (the model issues no other).
        if !self.reads_codes(values, g, j, pos) {
            return &full[o..o + hd];
        }
        let quant = if values { &c.values } else { &c.keys };
        quant[self.layer].read(codes, slot, g, kvh, buf);
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

    /// The same representation for both positions, keys and values alike.
    fn same_read(&self, _: usize, g: usize, j: usize, pos_a: usize, pos_b: usize) -> bool {
        self.reads_codes(false, g, j, pos_a) == self.reads_codes(false, g, j, pos_b)
            && self.reads_codes(true, g, j, pos_a) == self.reads_codes(true, g, j, pos_b)
    }

    fn selects(&self) -> bool {
        self.policy.and_then(|p| p.quest).is_some()
    }

    /// `reads_codes` at the two positions, page by page (it depends on the page, not the slot).
    fn reads_alike(&self, _: usize, g: usize, pos_a: usize, pos_b: usize) -> bool {
        if self.policy.and_then(|p| p.compression.as_ref()).is_none() {
            return true;
        }
        let ps = self.layout.page_size;
        (0..self.pages.k.len()).all(|p| {
            [false, true].into_iter().all(|values| {
                self.reads_codes(values, g, p * ps, pos_a)
                    == self.reads_codes(values, g, p * ps, pos_b)
            })
        })
    }

    fn stored_at(&self, _: usize, g: usize, j: usize, values: bool) -> Option<*const f32> {
        let KvLayout {
            page_size: ps,
            n_kv_heads: kvh,
            head_dim: hd,
            ..
        } = self.layout;
        let l = self.pages;
        let full = if values {
            l.v.get(j / ps)?
        } else {
            l.k.get(j / ps)?
        };
        full.get((j % ps * kvh + g) * hd).map(std::ptr::from_ref)
    }

    /// Quest: among the pages the query sees in full that are past the sinks and older than
    /// the recent span, each query head reads the ones its own bound ranks best, as many as
    /// fit the budget (as Quest selects per head).
    fn select(
        &self,
        _: usize,
        g: usize,
        pos: usize,
        queries: &[f32],
        keys: &[usize],
        heads: &mut [Vec<usize>],
    ) -> bool {
        let Some(q) = self.policy.and_then(|p| p.quest) else {
            return false;
        };
        if self.layer < q.dense_layers || keys.len() <= q.budget {
            return false;
        }
        let KvLayout {
            page_size: ps,
            head_dim: hd,
            ..
        } = self.layout;
        let l = self.pages;
        let mut visible = vec![0usize; l.k.len()];
        for &j in keys {
            visible[j / ps] += 1;
        }
        let pages: Vec<usize> = (0..l.k.len())
            .filter(|&p| {
                visible[p] == ps
                    && l.logical(p * ps, g) >= q.sinks
                    && l.logical((p + 1) * ps - 1, g) + q.recent < pos
            })
            .collect();
        let always = keys.len() - pages.len() * ps;
        let n = q.budget.saturating_sub(always) / ps;
        if n >= pages.len() {
            return false;
        }
        let mut read = vec![false; l.k.len()];
        for (qr, head) in queries.chunks_exact(hd).zip(heads.iter_mut()) {
            let scored: Vec<Candidate> = pages
                .iter()
                .map(|&p| {
                    let b = &l.bounds[p];
                    let (lo, hi) = b.split_at(b.len() / 2);
                    let (lo, hi) = (&lo[g * hd..(g + 1) * hd], &hi[g * hd..(g + 1) * hd]);
                    Candidate {
                        page: p,
                        score: page_bound(qr, lo, hi),
                    }
                })
                .collect();
            read.fill(true);
            for &p in &pages {
                read[p] = false;
            }
            for p in best_pages(scored, n) {
                read[p] = true;
            }
            head.clear();
            head.extend(keys.iter().copied().filter(|&j| read[j / ps]));
        }
        true
    }
}
