//! Paged host storage for keys and values (the CPU backend's cache), with the compression
//! policies built on it.
//!
//! A layer's tokens live in fixed-size pages of `page_size` slots, token-major
//! (`[slot][kv_head][head_dim]`), so appending a token is a copy into the last page — never a
//! copy of the whole cache — and attention reads keys and values in place ([`LayerView`]).
//! Pages are allocated as tokens arrive and freed on truncation; the slots a rollback vacates
//! are zeroed, so a rollback leaves the storage byte-identical to before the rolled-back tokens
//! (tested).
//!
//! With a [`KvPolicy`]:
//! - quantization packs each complete page past the sinks when it completes (codes are a pure
//!   function of the page's tokens) and frees its full-precision copy once no query to come
//!   can read it (older than the window);
//! - Quest keeps each page's per-channel key range over every representation (full and
//!   codes) — also a pure function of the page — for [`LayerView`]'s page selection;
//! - H2O accumulates the votes of committed rows per KV head, and at each eviction point
//!   compacts each KV head of each layer down to the budget: every head keeps its own heavy
//!   hitters, moved down in order within the layer's pages, so slot `j` of two heads may hold
//!   different positions (each slot remembers its position per head). Every head holds the same
//!   number of slots — sinks and recent tokens are the same positions for all, and the budget
//!   fixes the rest — so new rows land in the same slots for every head, and the layer's mask
//!   is shared (each row sees every cached position). After an eviction a layer holds fewer
//!   slots than the sequence has tokens; [`PagedKv::len`] stays the sequence length (the next
//!   position).

mod view;

use std::sync::Arc;

pub use view::LayerView;

use crate::{KvCompression, KvLayout, KvPolicy, h2o};

/// Votes of one row not yet known to be committed.
#[derive(Debug, Clone, PartialEq)]
struct Pending {
    slot: usize,
    /// Per KV head, per slot of the layer at the time, the attention the row gave it (summed
    /// over the head's query heads).
    votes: Vec<Vec<f32>>,
}

/// One layer's pages. A page is held in full precision (`k`/`v` non-empty), as codes
/// (`kq`/`vq` non-empty), or both while it is still within reach of the window.
#[derive(Debug, Clone, Default, PartialEq)]
struct LayerPages {
    k: Vec<Box<[f32]>>,
    v: Vec<Box<[f32]>>,
    kq: Vec<Box<[u8]>>,
    vq: Vec<Box<[u8]>>,
    /// Quest: per page, the keys' per-channel minimum then maximum (`2 × row` floats).
    bounds: Vec<Box<[f32]>>,
    /// Slots held.
    len: usize,
    /// Tokens evicted (H2O): the sequence length is `len + evicted`.
    evicted: usize,
    /// H2O: per KV head, each slot's position in the sequence (empty without H2O: slot `j`
    /// holds position `j`).
    logical: Vec<Vec<usize>>,
    /// H2O: per KV head, each slot's accumulated votes.
    votes: Vec<Vec<f32>>,
    /// H2O: the last forward's rows, folded in when the next forward starts.
    pending: Vec<Pending>,
}

impl LayerPages {
    /// Position in the sequence of slot `j` of KV head `g`.
    #[inline]
    fn logical(&self, j: usize, g: usize) -> usize {
        if self.logical.is_empty() {
            j
        } else {
            self.logical[g][j]
        }
    }

    /// The newest position any KV head holds at slot `j`.
    fn newest(&self, j: usize) -> usize {
        self.logical.iter().map(|l| l[j]).max().unwrap_or(j)
    }

    /// The oldest position any KV head holds at slot `j`.
    fn oldest(&self, j: usize) -> usize {
        self.logical.iter().map(|l| l[j]).min().unwrap_or(j)
    }

    /// The sequence length as this layer knows it.
    fn next(&self) -> usize {
        self.len + self.evicted
    }

    /// Slots holding positions below `pos` (in the KV head holding the fewest: a rollback
    /// below an eviction point keeps that many slots of every head).
    fn slots_below(&self, pos: usize) -> usize {
        if self.evicted == 0 {
            pos.min(self.len)
        } else {
            let below = self.logical.iter().map(|l| l.partition_point(|&x| x < pos));
            below.min().unwrap_or(0)
        }
    }
}

/// A paged cache of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct PagedKv {
    layout: KvLayout,
    layers: Vec<LayerPages>,
    policy: Option<Arc<KvPolicy>>,
}

impl PagedKv {
    /// An empty exact cache.
    ///
    /// # Panics
    /// If `page_size` is 0 (internal invariant: layouts come from validated configs).
    pub fn new(layout: KvLayout) -> Self {
        assert!(layout.page_size > 0, "page size 0");
        Self {
            layout,
            layers: vec![LayerPages::default(); layout.n_layers],
            policy: None,
        }
    }

    /// An empty cache that compresses with `policy`.
    ///
    /// # Panics
    /// If the policy does not fit the layout (internal invariant: callers run
    /// [`KvPolicy::check`] when they build it).
    pub fn with_policy(layout: KvLayout, policy: Arc<KvPolicy>) -> Self {
        if let Err(e) = policy.check(&layout) {
            panic!("{e}");
        }
        let mut layer = LayerPages::default();
        if policy.h2o.is_some() {
            layer.logical = vec![Vec::new(); layout.n_kv_heads];
            layer.votes = vec![Vec::new(); layout.n_kv_heads];
        }
        Self {
            layers: vec![layer; layout.n_layers],
            policy: Some(policy),
            ..Self::new(layout)
        }
    }

    /// Its geometry.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Its policy, if any.
    pub fn policy(&self) -> Option<&KvPolicy> {
        self.policy.as_deref()
    }

    fn compression(&self) -> Option<&KvCompression> {
        self.policy.as_deref().and_then(|p| p.compression.as_ref())
    }

    /// The sequence length (the next position) as the last layer knows it.
    pub fn len(&self) -> usize {
        self.layers.last().map_or(0, LayerPages::next)
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slots `layer` holds (its keys for attention).
    pub fn layer_len(&self, layer: usize) -> usize {
        self.layers[layer].len
    }

    /// Tokens evicted from `layer` so far.
    pub fn evicted(&self, layer: usize) -> usize {
        self.layers[layer].evicted
    }

    /// Pages allocated (in the layer holding the most).
    pub fn pages(&self) -> usize {
        self.layers.iter().map(|l| l.k.len()).max().unwrap_or(0)
    }

    /// Bytes of key/value storage allocated (full-precision pages and packed pages): without a
    /// policy, exactly pages × [`KvLayout::page_bytes`] when every layer holds the same tokens.
    pub fn bytes(&self) -> usize {
        let f = std::mem::size_of::<f32>();
        self.layers
            .iter()
            .map(|l| {
                let full: usize = l.k.iter().chain(&l.v).map(|p| p.len() * f).sum();
                let codes: usize = l.kq.iter().chain(&l.vq).map(|p| p.len()).sum();
                full + codes
            })
            .sum()
    }

    /// Whether the model should report attention votes for this cache (H2O).
    pub fn wants_votes(&self) -> bool {
        self.policy.as_ref().is_some_and(|p| p.h2o.is_some())
    }

    /// Full-precision key and value of head `g` at slot `j` of `layer` (for calibration).
    ///
    /// # Panics
    /// If the page was freed (internal invariant: calibration runs on exact caches).
    pub fn full_rows(&self, layer: usize, g: usize, j: usize) -> (&[f32], &[f32]) {
        let (p, o) = self.at(g, j);
        let l = &self.layers[layer];
        let hd = self.layout.head_dim;
        (&l.k[p][o..o + hd], &l.v[p][o..o + hd])
    }

    #[inline]
    fn at(&self, g: usize, j: usize) -> (usize, usize) {
        let ps = self.layout.page_size;
        let off = ((j % ps) * self.layout.n_kv_heads + g) * self.layout.head_dim;
        (j / ps, off)
    }

    /// Frees the full-precision copy of every packed page no query to come can read in full
    /// precision (queries come at positions `>= len`). Idempotent;
    /// [`PagedKv::append_head_major`] calls it before appending.
    pub fn compress(&mut self) {
        for layer in 0..self.layers.len() {
            self.free_old(layer);
        }
    }

    fn free_old(&mut self, layer: usize) {
        let Some(window) = self.compression().map(|c| c.window) else {
            return;
        };
        let ps = self.layout.page_size;
        let l = &mut self.layers[layer];
        let next = l.next();
        for p in 0..l.k.len() {
            let last = (p + 1) * ps - 1;
            if last >= l.len || l.newest(last) + window >= next {
                break;
            }
            if !l.kq[p].is_empty() {
                l.k[p] = Box::default();
                l.v[p] = Box::default();
            }
        }
    }

    /// Brings pages `from..` of `layer` back to full precision only (from their codes where
    /// the full copy was freed: lossy), before their slots are rewritten.
    fn unpack_from(&mut self, layer: usize, from: usize) {
        let Some(c) = self.policy.clone() else {
            return;
        };
        let Some(c) = c.compression.as_ref() else {
            return;
        };
        let KvLayout {
            n_kv_heads: kvh,
            head_dim: hd,
            ..
        } = self.layout;
        let floats = self.layout.page_floats();
        let l = &mut self.layers[layer];
        for p in from..l.kq.len() {
            if l.kq[p].is_empty() {
                continue;
            }
            if l.k[p].is_empty() {
                let mut k = vec![0.0f32; floats];
                let mut v = vec![0.0f32; floats];
                for (r, (kr, vr)) in k
                    .chunks_exact_mut(hd)
                    .zip(v.chunks_exact_mut(hd))
                    .enumerate()
                {
                    c.keys[layer].read(&l.kq[p], r / kvh, r % kvh, kvh, kr);
                    c.values[layer].read(&l.vq[p], r / kvh, r % kvh, kvh, vr);
                }
                l.k[p] = k.into_boxed_slice();
                l.v[p] = v.into_boxed_slice();
            }
            l.kq[p] = Box::default();
            l.vq[p] = Box::default();
        }
    }

    /// Re-derives pages `from..` of `layer` from their full-precision contents: codes for every
    /// complete page past the sinks, and Quest's key ranges.
    fn refresh_from(&mut self, layer: usize, from: usize) {
        let Some(policy) = self.policy.clone() else {
            return;
        };
        let KvLayout {
            n_kv_heads: kvh,
            head_dim: hd,
            page_size: ps,
            ..
        } = self.layout;
        let row = self.layout.row();
        let l = &mut self.layers[layer];
        let quest = policy.quest.is_some();
        for p in from..l.k.len() {
            let complete = (p + 1) * ps <= l.len;
            if let Some(c) = &policy.compression
                && complete
                && l.oldest(p * ps) >= c.sinks
                && l.kq[p].is_empty()
            {
                l.kq[p] = c.keys[layer].pack(&l.k[p]);
                l.vq[p] = c.values[layer].pack(&l.v[p]);
            }
            if quest {
                let mut b = vec![f32::INFINITY; row];
                b.extend(std::iter::repeat_n(f32::NEG_INFINITY, row));
                let (lo, hi) = b.split_at_mut(row);
                let slots = ps.min(l.len - p * ps);
                let mut buf = vec![0.0f32; hd];
                for s in 0..slots {
                    for g in 0..kvh {
                        let at = (s * kvh + g) * hd;
                        let mut widen = |x: &[f32]| {
                            for (c, &val) in x.iter().enumerate() {
                                lo[g * hd + c] = lo[g * hd + c].min(val);
                                hi[g * hd + c] = hi[g * hd + c].max(val);
                            }
                        };
                        if !l.k[p].is_empty() {
                            widen(&l.k[p][at..at + hd]);
                        }
                        if let Some(c) = &policy.compression
                            && !l.kq[p].is_empty()
                        {
                            c.keys[layer].read(&l.kq[p], s, g, kvh, &mut buf);
                            widen(&buf);
                        }
                    }
                }
                l.bounds[p] = b.into_boxed_slice();
            }
        }
    }

    /// H2O, before a forward appends to `layer`: folds the last forward's votes (its rows
    /// are committed by now) and, at an eviction point (a sequence length that is a multiple
    /// of the page size), evicts each KV head down to the budget.
    fn fold_and_evict(&mut self, layer: usize) {
        let Some(cfg) = self.policy.as_ref().and_then(|p| p.h2o) else {
            return;
        };
        let ps = self.layout.page_size;
        let l = &mut self.layers[layer];
        for p in std::mem::take(&mut l.pending) {
            for (acc, v) in l.votes.iter_mut().zip(&p.votes) {
                for (a, x) in acc.iter_mut().zip(v) {
                    *a += x;
                }
            }
        }
        let next = l.next();
        if !next.is_multiple_of(ps) {
            return;
        }
        let keep: Option<Vec<Vec<usize>>> = l
            .logical
            .iter()
            .zip(&l.votes)
            .map(|(logical, votes)| h2o::kept_slots(&cfg, logical, votes, next))
            .collect();
        if let Some(keep) = keep {
            self.compact(layer, &keep);
        }
    }

    /// Keeps only slots `keep[g]` (increasing) of each KV head `g` of `layer`, moved down in
    /// order; the rest are evicted.
    ///
    /// # Panics
    /// If the heads keep different numbers of slots (internal invariant: every head holds the
    /// same sinks and recent positions and the same count of slots, so [`h2o::kept_slots`]
    /// keeps the same count of each).
    fn compact(&mut self, layer: usize, keep: &[Vec<usize>]) {
        let KvLayout {
            page_size: ps,
            n_kv_heads: kvh,
            head_dim: hd,
            ..
        } = self.layout;
        let kept = keep[0].len();
        assert!(
            keep.iter().all(|k| k.len() == kept),
            "heads keep unequal slots"
        );
        let first = keep
            .iter()
            .map(|k| {
                k.iter()
                    .enumerate()
                    .position(|(i, &s)| i != s)
                    .unwrap_or(kept)
            })
            .min()
            .unwrap_or(kept);
        self.unpack_from(layer, first / ps);
        let l = &mut self.layers[layer];
        for (g, keep) in keep.iter().enumerate() {
            for (i, &s) in keep.iter().enumerate().skip(first) {
                if s != i {
                    let (from, to) = ((s % ps * kvh + g) * hd, (i % ps * kvh + g) * hd);
                    for pages in [&mut l.k, &mut l.v] {
                        move_floats(pages, (s / ps, from), (i / ps, to), hd);
                    }
                }
                l.logical[g][i] = l.logical[g][s];
                l.votes[g][i] = l.votes[g][s];
            }
        }
        let removed = l.len - kept;
        self.cut(layer, kept);
        self.layers[layer].evicted += removed;
        self.refresh_from(layer, first / ps);
    }

    /// Keeps the first `slots` slots of `layer` (pages past them freed, the vacated slots of
    /// the last page zeroed), leaving `evicted` as is.
    fn cut(&mut self, layer: usize, slots: usize) {
        let ps = self.layout.page_size;
        let row = self.layout.row();
        let l = &mut self.layers[layer];
        let pages = slots.div_ceil(ps);
        for v in [&mut l.k, &mut l.v] {
            v.truncate(pages);
        }
        for v in [&mut l.kq, &mut l.vq] {
            v.truncate(pages);
        }
        l.bounds.truncate(pages);
        if !slots.is_multiple_of(ps) {
            let from = (slots % ps) * row;
            l.k[pages - 1][from..].fill(0.0);
            l.v[pages - 1][from..].fill(0.0);
        }
        l.len = slots;
        for v in &mut l.logical {
            v.truncate(slots);
        }
        for v in &mut l.votes {
            v.truncate(slots);
        }
        l.pending.retain(|p| p.slot < slots);
        for p in &mut l.pending {
            for v in &mut p.votes {
                v.truncate(slots);
            }
        }
    }

    /// Appends `n` tokens to `layer`; `k` and `v` are head-major `[n_kv_heads, n, head_dim]`
    /// (a burn tensor's layout).
    ///
    /// # Panics
    /// If the lengths are not `n_kv_heads * n * head_dim` (internal invariant: the model
    /// builds them from its config).
    pub fn append_head_major(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) {
        let KvLayout {
            n_kv_heads: kvh,
            head_dim: hd,
            page_size: ps,
            ..
        } = self.layout;
        assert!(
            k.len() == kvh * n * hd && v.len() == k.len(),
            "append of {} / {} floats for {n} tokens",
            k.len(),
            v.len()
        );
        self.fold_and_evict(layer);
        self.free_old(layer);
        let floats = self.layout.page_floats();
        let quest = self.policy.as_ref().is_some_and(|p| p.quest.is_some());
        let l = &mut self.layers[layer];
        let first_page = l.len / ps;
        for t in 0..n {
            let slot = l.len + t;
            if slot / ps == l.k.len() {
                l.k.push(vec![0.0; floats].into_boxed_slice());
                l.v.push(vec![0.0; floats].into_boxed_slice());
                l.kq.push(Box::default());
                l.vq.push(Box::default());
                if quest {
                    l.bounds.push(Box::default());
                }
            }
            let (page, at) = (slot / ps, slot % ps);
            for g in 0..kvh {
                let src = (g * n + t) * hd;
                let dst = (at * kvh + g) * hd;
                l.k[page][dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                l.v[page][dst..dst + hd].copy_from_slice(&v[src..src + hd]);
            }
            let pos = l.next() + t;
            for (logical, votes) in l.logical.iter_mut().zip(&mut l.votes) {
                logical.push(pos);
                votes.push(0.0);
            }
        }
        l.len += n;
        self.refresh_from(layer, first_page);
    }

    /// H2O: the votes of the `n_q` rows just appended to `layer` (`[n_kv_heads][n_q]
    /// [layer_len]`, from [`arbor_kernels::attention::attention_rows_voting`]). They count
    /// once the rows are committed — when the next forward starts and they are still here.
    ///
    /// # Panics
    /// If the sizes disagree with the layer (internal invariant).
    pub fn record_votes(&mut self, layer: usize, votes: &[f32], n_q: usize) {
        if !self.wants_votes() {
            return;
        }
        let kvh = self.layout.n_kv_heads;
        let l = &mut self.layers[layer];
        let len = l.len;
        assert!(n_q <= len && votes.len() == kvh * n_q * len, "votes shape");
        let first = len - n_q;
        for i in 0..n_q {
            l.pending.push(Pending {
                slot: first + i,
                votes: (0..kvh)
                    .map(|g| votes[(g * n_q + i) * len..(g * n_q + i + 1) * len].to_vec())
                    .collect(),
            });
        }
    }

    /// Drops every token at position `len` and later in every layer (rollback), freeing
    /// whole pages and zeroing vacated slots; no-op for layers holding fewer.
    pub fn truncate(&mut self, len: usize) {
        let ps = self.layout.page_size;
        for layer in 0..self.layers.len() {
            let l = &self.layers[layer];
            if len >= l.next() {
                continue;
            }
            let keep = l.slots_below(len);
            if !keep.is_multiple_of(ps) {
                self.unpack_from(layer, keep / ps);
            }
            self.cut(layer, keep);
            let l = &mut self.layers[layer];
            l.evicted = len - keep;
            self.refresh_from(layer, keep / ps);
        }
    }

    /// Commit after tree verification: keeps positions `0..prefix`, then `rows` (positions,
    /// increasing, each `>= prefix`) moved down to follow them; drops the rest.
    ///
    /// # Panics
    /// If `rows` is not increasing, starts below `prefix` or reaches past the cache (internal
    /// invariant: rows come from the tree just appended).
    pub fn retain(&mut self, prefix: usize, rows: &[usize]) {
        let ps = self.layout.page_size;
        let row = self.layout.row();
        arbor_kernels::cube::kv::check_retain(prefix, rows, self.len());
        for layer in 0..self.layers.len() {
            let l = &self.layers[layer];
            if prefix >= l.next() {
                continue;
            }
            // Positions from `prefix` on are the tree's rows: contiguous slots from `base`.
            let base = l.slots_below(prefix);
            self.unpack_from(layer, base / ps);
            let l = &mut self.layers[layer];
            let slot = |r: usize| base + (r - prefix);
            for (i, &r) in rows.iter().enumerate() {
                move_row(l, slot(r), base + i, ps, row);
                for (logical, votes) in l.logical.iter_mut().zip(&mut l.votes) {
                    logical[base + i] = prefix + i;
                    votes[base + i] = votes[slot(r)];
                }
            }
            let kept = base + rows.len();
            let remap = |old: &[f32]| -> Vec<f32> {
                let mut v = old[..base.min(old.len())].to_vec();
                v.extend(
                    rows.iter()
                        .map(|&r| old.get(slot(r)).copied().unwrap_or(0.0)),
                );
                v
            };
            l.pending = std::mem::take(&mut l.pending)
                .into_iter()
                .filter_map(|p| {
                    let slot = if p.slot < base {
                        p.slot
                    } else {
                        base + rows.iter().position(|&r| slot(r) == p.slot)?
                    };
                    Some(Pending {
                        slot,
                        votes: p.votes.iter().map(|v| remap(v)).collect(),
                    })
                })
                .collect();
            self.cut(layer, kept);
            self.refresh_from(layer, base / ps);
        }
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// `layer`'s keys and values, for attention.
    pub fn layer(&self, layer: usize) -> LayerView<'_> {
        LayerView::new(self, layer)
    }

    /// The mask of `layer` for a forward's `n` new rows: `mask` is over the sequence's
    /// positions (`[n][len + n]`, `len` before the forward); after evictions the layer's slots
    /// are a subset of them, and each slot takes its position's column. The KV heads share
    /// it: they hold different cached positions but each row sees every cached position
    /// (internal invariant of causal and tree masks), and the new rows' slots are the same.
    pub fn layer_mask<'m>(
        &self,
        layer: usize,
        mask: &'m [bool],
        n: usize,
    ) -> std::borrow::Cow<'m, [bool]> {
        let l = &self.layers[layer];
        if l.evicted == 0 {
            return std::borrow::Cow::Borrowed(mask);
        }
        let width = mask.len() / n.max(1);
        let mut out = Vec::with_capacity(n * l.len);
        for r in mask.chunks_exact(width) {
            debug_assert!(
                r[..width - n].iter().all(|&m| m),
                "a row misses a cached position"
            );
            out.extend((0..l.len).map(|j| r[l.logical(j, 0)]));
        }
        std::borrow::Cow::Owned(out)
    }
}

/// Copies slot `from` of a layer to slot `to` (keys and values of every KV head, full
/// precision).
fn move_row(l: &mut LayerPages, from: usize, to: usize, ps: usize, row: usize) {
    if from == to {
        return;
    }
    for pages in [&mut l.k, &mut l.v] {
        move_floats(
            pages,
            (from / ps, from % ps * row),
            (to / ps, to % ps * row),
            row,
        );
    }
}

/// Copies `n` floats at (page, offset) `from` to `to`, an earlier place.
fn move_floats(pages: &mut [Box<[f32]>], from: (usize, usize), to: (usize, usize), n: usize) {
    let ((sp, so), (dp, doff)) = (from, to);
    if sp == dp {
        pages[sp].copy_within(so..so + n, doff);
    } else {
        let (lo, hi) = pages.split_at_mut(sp);
        lo[dp][doff..doff + n].copy_from_slice(&hi[0][so..so + n]);
    }
}

#[cfg(test)]
mod tests;
