//! Paged host storage for keys and values (the CPU backend's cache).
//!
//! A sequence's tokens live in fixed-size pages of `page_size` tokens; page `p` holds tokens
//! `p·P .. (p+1)·P` of every layer, token-major (`[slot][kv_head][head_dim]`), so appending a
//! token is a copy into the last page — never a copy of the whole cache — and attention reads
//! keys and values in place ([`KvSource`]). Pages are allocated as tokens arrive and freed on
//! truncation; the slots a rollback vacates are zeroed, so a rollback leaves the storage
//! byte-identical to before the rolled-back tokens (tested).

use arbor_kernels::attention::KvSource;

/// The geometry of one model's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Decoder layers.
    pub n_layers: usize,
    /// Key/value heads per layer.
    pub n_kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Tokens per page.
    pub page_size: usize,
}

impl KvLayout {
    /// Floats of one token's keys (or values) in one layer.
    fn row(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Floats of one page's keys (or values) in one layer.
    fn page_floats(&self) -> usize {
        self.page_size * self.row()
    }

    /// Bytes one page takes across all layers, keys and values.
    pub fn page_bytes(&self) -> usize {
        2 * self.n_layers * self.page_floats() * std::mem::size_of::<f32>()
    }
}

/// One layer's pages.
#[derive(Debug, Clone, Default, PartialEq)]
struct LayerPages {
    k: Vec<Box<[f32]>>,
    v: Vec<Box<[f32]>>,
    len: usize,
}

/// A paged cache of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct PagedKv {
    layout: KvLayout,
    layers: Vec<LayerPages>,
}

impl PagedKv {
    /// An empty cache.
    ///
    /// # Panics
    /// If `page_size` is 0 (internal invariant: layouts come from validated configs).
    pub fn new(layout: KvLayout) -> Self {
        assert!(layout.page_size > 0, "page size 0");
        Self {
            layout,
            layers: vec![LayerPages::default(); layout.n_layers],
        }
    }

    /// Its geometry.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Tokens held by the last layer (fully processed tokens).
    pub fn len(&self) -> usize {
        self.layers.last().map_or(0, |l| l.len)
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens held by `layer`.
    pub fn layer_len(&self, layer: usize) -> usize {
        self.layers[layer].len
    }

    /// Pages allocated (in the layer holding the most).
    pub fn pages(&self) -> usize {
        self.layers.iter().map(|l| l.k.len()).max().unwrap_or(0)
    }

    /// Bytes of storage allocated: exactly the pages × [`KvLayout::page_bytes`] when every
    /// layer holds the same tokens.
    pub fn bytes(&self) -> usize {
        let per = self.layout.page_floats() * std::mem::size_of::<f32>();
        self.layers
            .iter()
            .map(|l| (l.k.len() + l.v.len()) * per)
            .sum()
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
        let floats = self.layout.page_floats();
        let l = &mut self.layers[layer];
        for t in 0..n {
            let pos = l.len + t;
            if pos / ps == l.k.len() {
                l.k.push(vec![0.0; floats].into_boxed_slice());
                l.v.push(vec![0.0; floats].into_boxed_slice());
            }
            let (page, slot) = (pos / ps, pos % ps);
            for g in 0..kvh {
                let src = (g * n + t) * hd;
                let dst = (slot * kvh + g) * hd;
                l.k[page][dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                l.v[page][dst..dst + hd].copy_from_slice(&v[src..src + hd]);
            }
        }
        l.len += n;
    }

    /// Drops every token at position `len` and later in every layer (rollback), freeing
    /// whole pages and zeroing vacated slots; no-op for layers holding fewer.
    pub fn truncate(&mut self, len: usize) {
        let ps = self.layout.page_size;
        let row = self.layout.row();
        for l in &mut self.layers {
            if len >= l.len {
                continue;
            }
            let pages = len.div_ceil(ps);
            l.k.truncate(pages);
            l.v.truncate(pages);
            if !len.is_multiple_of(ps) {
                let from = (len % ps) * row;
                l.k[pages - 1][from..].fill(0.0);
                l.v[pages - 1][from..].fill(0.0);
            }
            l.len = len;
        }
    }

    /// Commit after tree verification: keeps tokens `0..prefix`, then `rows` (increasing,
    /// each `>= prefix`) moved down to follow them; drops the rest.
    ///
    /// # Panics
    /// If `rows` is not increasing, starts below `prefix` or reaches past the cache (internal
    /// invariant: rows come from the tree just appended).
    pub fn retain(&mut self, prefix: usize, rows: &[usize]) {
        let ps = self.layout.page_size;
        let row = self.layout.row();
        let len = self.len();
        assert!(
            prefix <= len
                && rows.windows(2).all(|w| w[0] < w[1])
                && rows.first().is_none_or(|&r| r >= prefix)
                && rows.last().is_none_or(|&r| r < len),
            "bad retain: prefix {prefix}, rows {rows:?}, cache {len}"
        );
        for l in &mut self.layers {
            for (i, &r) in rows.iter().enumerate() {
                let dst = prefix + i;
                if dst == r {
                    continue;
                }
                let (sp, so) = (r / ps, (r % ps) * row);
                let (dp, doff) = (dst / ps, (dst % ps) * row);
                for pages in [&mut l.k, &mut l.v] {
                    if sp == dp {
                        pages[sp].copy_within(so..so + row, doff);
                    } else {
                        let (lo, hi) = pages.split_at_mut(sp);
                        lo[dp][doff..doff + row].copy_from_slice(&hi[0][so..so + row]);
                    }
                }
            }
        }
        self.truncate(prefix + rows.len());
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// `layer`'s keys and values, for attention.
    pub fn layer(&self, layer: usize) -> LayerView<'_> {
        LayerView {
            pages: &self.layers[layer],
            layout: self.layout,
        }
    }
}

/// One layer of a [`PagedKv`], read in place by attention.
#[derive(Debug, Clone, Copy)]
pub struct LayerView<'a> {
    pages: &'a LayerPages,
    layout: KvLayout,
}

impl LayerView<'_> {
    fn at(&self, g: usize, j: usize) -> (usize, usize) {
        let ps = self.layout.page_size;
        let off = ((j % ps) * self.layout.n_kv_heads + g) * self.layout.head_dim;
        (j / ps, off)
    }
}

impl KvSource for LayerView<'_> {
    fn key(&self, _b: usize, g: usize, j: usize) -> &[f32] {
        let (p, o) = self.at(g, j);
        &self.pages.k[p][o..o + self.layout.head_dim]
    }

    fn value(&self, _b: usize, g: usize, j: usize) -> &[f32] {
        let (p, o) = self.at(g, j);
        &self.pages.v[p][o..o + self.layout.head_dim]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 3,
            page_size: 4,
        }
    }

    /// Head-major rows whose values encode (token, head, channel).
    fn rows(first: usize, n: usize, kvh: usize, hd: usize) -> Vec<f32> {
        let mut out = Vec::new();
        for g in 0..kvh {
            for t in first..first + n {
                for c in 0..hd {
                    out.push((t * 100 + g * 10 + c) as f32 + 0.5);
                }
            }
        }
        out
    }

    fn fill(c: &mut PagedKv, first: usize, n: usize) {
        let r = rows(first, n, 2, 3);
        let v: Vec<f32> = r.iter().map(|x| -x).collect();
        for layer in 0..2 {
            c.append_head_major(layer, &r, &v, n);
        }
    }

    #[test]
    fn append_reads_back_and_accounts_pages_exactly() {
        let mut c = PagedKv::new(layout());
        fill(&mut c, 0, 3);
        fill(&mut c, 3, 6);
        assert_eq!(c.len(), 9);
        assert_eq!(c.pages(), 3);
        assert_eq!(c.bytes(), 3 * layout().page_bytes());
        let view = c.layer(1);
        for j in 0..9 {
            for g in 0..2 {
                let want: Vec<f32> = (0..3)
                    .map(|ch| (j * 100 + g * 10 + ch) as f32 + 0.5)
                    .collect();
                assert_eq!(view.key(0, g, j), &want[..]);
                let neg: Vec<f32> = want.iter().map(|x| -x).collect();
                assert_eq!(view.value(0, g, j), &neg[..]);
            }
        }
    }

    #[test]
    fn rollback_is_byte_identical() {
        let mut c = PagedKv::new(layout());
        fill(&mut c, 0, 6);
        let before = c.clone();
        // A tree of 7 rows appended, all rejected.
        fill(&mut c, 50, 7);
        c.truncate(6);
        assert_eq!(c, before);
        // A tree whose rows 7 and 9 (of 6..13) are accepted.
        fill(&mut c, 50, 7);
        c.retain(6, &[7, 9]);
        assert_eq!(c.len(), 8);
        let v = c.layer(0);
        assert_eq!(v.key(0, 1, 6)[0], (51 * 100 + 10) as f32 + 0.5);
        assert_eq!(v.key(0, 1, 7)[0], (53 * 100 + 10) as f32 + 0.5);
        assert_eq!(c.pages(), 2);
        // Dropping the two kept rows again restores the original bytes.
        c.truncate(6);
        assert_eq!(c, before);
        c.clear();
        assert_eq!((c.len(), c.pages(), c.bytes()), (0, 0, 0));
    }

    #[test]
    fn retain_across_pages_matches_a_fresh_append() {
        let mut c = PagedKv::new(layout());
        fill(&mut c, 0, 5);
        fill(&mut c, 20, 10);
        c.retain(5, &[6, 9, 14]);
        let mut fresh = PagedKv::new(layout());
        fill(&mut fresh, 0, 5);
        for t in [21, 24, 29] {
            fill(&mut fresh, t, 1);
        }
        assert_eq!(c, fresh);
    }
}
