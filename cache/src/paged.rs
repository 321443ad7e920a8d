//! Paged host storage for keys and values (the CPU backend's cache).
//!
//! A sequence's tokens live in fixed-size pages of `page_size` tokens; page `p` holds tokens
//! `p·P .. (p+1)·P` of every layer, token-major (`[slot][kv_head][head_dim]`), so appending a
//! token is a copy into the last page — never a copy of the whole cache — and attention reads
//! keys and values in place ([`KvSource`]). Pages are allocated as tokens arrive and freed on
//! truncation; the slots a rollback vacates are zeroed, so a rollback leaves the storage
//! byte-identical to before the rolled-back tokens (tested).

use std::sync::Arc;

use arbor_kernels::KernelError;
use arbor_kernels::attention::KvSource;
use arbor_kernels::kvquant::{RowQuantizer, calibrate_clip, range_permutation};

/// SKVQ compression of a paged cache: tokens that are neither among the first `sinks` nor
/// within `window` of the reading query are read as their quantized codes. Whole pages older
/// than the window are stored only as codes.
///
/// Which representation a query reads depends on positions alone (key `j`, query at `i`:
/// full precision iff `j < sinks` or `j + window >= i`), never on when a page happened to be
/// packed — so plain and speculative decoding, and a sequence alone or batched, see the same
/// values and keep producing the same greedy tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCompression {
    /// Full-precision attention sinks at the start.
    pub sinks: usize,
    /// Full-precision recent tokens.
    pub window: usize,
    /// Per layer, the quantizer of one token's keys of one KV head (`head_dim` channels).
    pub keys: Vec<RowQuantizer>,
    /// Per layer, the same for values.
    pub values: Vec<RowQuantizer>,
}

impl KvCompression {
    /// The same uncalibrated quantizer (identity permutation, no clipping) for every layer.
    ///
    /// # Errors
    /// Bits not 2/4/8, or a group that does not divide `head_dim`.
    pub fn uniform(
        layout: &KvLayout,
        bits: u32,
        group: usize,
        sinks: usize,
        window: usize,
    ) -> Result<Self, KernelError> {
        let q = RowQuantizer::new(
            bits,
            group.min(layout.head_dim),
            layout.head_dim,
            None,
            None,
        )?;
        Ok(Self {
            sinks,
            window,
            keys: vec![q.clone(); layout.n_layers],
            values: vec![q; layout.n_layers],
        })
    }

    /// SKVQ calibration: per layer, a channel permutation grouping channels of similar range
    /// ([`range_permutation`]) and the per-group clip ratios with the least squared error
    /// ([`calibrate_clip`], ratios 1.0, 0.95 … 0.5), fitted to the first `tokens` keys and values
    /// of `store` (a full-precision cache of sample text).
    ///
    /// # Errors
    /// As [`KvCompression::uniform`].
    pub fn calibrated(
        store: &PagedKv,
        bits: u32,
        group: usize,
        sinks: usize,
        window: usize,
        tokens: usize,
    ) -> Result<Self, KernelError> {
        let layout = store.layout();
        let hd = layout.head_dim;
        let group = group.min(hd);
        let grid: Vec<f32> = (0..=10).map(|i| 1.0 - 0.05 * i as f32).collect();
        let fit = |rows: &[Vec<f32>]| -> Result<RowQuantizer, KernelError> {
            let perm = range_permutation(rows, hd);
            let base = RowQuantizer::new(bits, group, hd, Some(perm.clone()), None)?;
            let clip = calibrate_clip(&base, rows, &grid)?;
            RowQuantizer::new(bits, group, hd, Some(perm), Some(clip))
        };
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let mut buf = vec![0.0f32; hd];
        for layer in 0..layout.n_layers {
            let view = store.layer(layer);
            let (mut k, mut v) = (Vec::new(), Vec::new());
            for j in 0..tokens.min(store.layer_len(layer)) {
                for g in 0..layout.n_kv_heads {
                    // A query at position 0 reads every token in full precision.
                    k.push(view.key(0, g, j, 0, &mut buf).to_vec());
                    v.push(view.value(0, g, j, 0, &mut buf).to_vec());
                }
            }
            keys.push(fit(&k)?);
            values.push(fit(&v)?);
        }
        Ok(Self {
            sinks,
            window,
            keys,
            values,
        })
    }

    /// Whether key `j` is read quantized by a query at `pos`.
    fn quantized(&self, j: usize, pos: usize) -> bool {
        j >= self.sinks && j + self.window < pos
    }
}

/// Largest packed row the on-stack scratch holds.
const MAX_PACKED: usize = 1024;

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

/// One layer's pages. A page is held either in full precision (`k`/`v` non-empty) or as codes
/// (`kq`/`vq` non-empty, `[slot][kv_head][packed row]`).
#[derive(Debug, Clone, Default, PartialEq)]
struct LayerPages {
    k: Vec<Box<[f32]>>,
    v: Vec<Box<[f32]>>,
    kq: Vec<Box<[u8]>>,
    vq: Vec<Box<[u8]>>,
    len: usize,
}

/// A paged cache of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct PagedKv {
    layout: KvLayout,
    layers: Vec<LayerPages>,
    compression: Option<Arc<KvCompression>>,
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
            compression: None,
        }
    }

    /// An empty cache that compresses old tokens with `compression`.
    ///
    /// # Panics
    /// If `page_size` is 0, the quantizers do not cover every layer, or a packed row is
    /// larger than 1 KiB (internal invariants: built by [`KvCompression::uniform`] or a
    /// calibration for this layout).
    pub fn compressed(layout: KvLayout, compression: Arc<KvCompression>) -> Self {
        assert!(
            compression.keys.len() == layout.n_layers
                && compression.values.len() == layout.n_layers
                && compression
                    .keys
                    .iter()
                    .chain(&compression.values)
                    .all(|q| q.channels() == layout.head_dim && q.packed_bytes() <= MAX_PACKED),
            "compression does not fit the layout"
        );
        Self {
            compression: Some(compression),
            ..Self::new(layout)
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

    /// Bytes of key/value storage allocated (full-precision pages and packed pages): without
    /// compression, exactly pages × [`KvLayout::page_bytes`] when every layer holds the same
    /// tokens.
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

    /// Packs every page of every layer that is complete, past the sinks and wholly older
    /// than the window of any query still to come (queries come at positions `>= len`), and
    /// frees its full-precision copy. Idempotent; [`PagedKv::append_head_major`] calls it
    /// before appending.
    pub fn compress(&mut self) {
        for layer in 0..self.layers.len() {
            self.compress_layer(layer);
        }
    }

    fn compress_layer(&mut self, layer: usize) {
        let Some(c) = self.compression.clone() else {
            return;
        };
        let KvLayout {
            page_size: ps,
            n_kv_heads: kvh,
            head_dim: hd,
            ..
        } = self.layout;
        let (qk, qv) = (&c.keys[layer], &c.values[layer]);
        let l = &mut self.layers[layer];
        let old = l.len.saturating_sub(c.window);
        for p in c.sinks.div_ceil(ps)..old / ps {
            if l.k[p].is_empty() {
                continue;
            }
            let pack = |full: &[f32], q: &RowQuantizer| -> Box<[u8]> {
                let bytes = q.packed_bytes();
                let mut out = vec![0u8; ps * kvh * bytes];
                for (row, dst) in full.chunks_exact(hd).zip(out.chunks_exact_mut(bytes)) {
                    q.quantize(row, dst);
                }
                out.into_boxed_slice()
            };
            l.kq[p] = pack(&l.k[p], qk);
            l.vq[p] = pack(&l.v[p], qv);
            l.k[p] = Box::default();
            l.v[p] = Box::default();
        }
    }

    /// Brings packed pages holding tokens at `from` or later back to full precision (from
    /// their codes: lossy), before a rollback or commit rewrites them. The target model never
    /// needs this (its rollbacks stay inside the window); a draft's deep rollback may.
    fn unpack_from(&mut self, from: usize) {
        let Some(c) = self.compression.clone() else {
            return;
        };
        let hd = self.layout.head_dim;
        let ps = self.layout.page_size;
        let floats = self.layout.page_floats();
        for (layer, l) in self.layers.iter_mut().enumerate() {
            for p in from / ps..l.kq.len() {
                if l.kq[p].is_empty() {
                    continue;
                }
                let unpack = |codes: &[u8], q: &RowQuantizer| -> Box<[f32]> {
                    let mut out = vec![0.0f32; floats];
                    for (src, row) in codes
                        .chunks_exact(q.packed_bytes())
                        .zip(out.chunks_exact_mut(hd))
                    {
                        q.dequantize(src, row);
                    }
                    out.into_boxed_slice()
                };
                l.k[p] = unpack(&l.kq[p], &c.keys[layer]);
                l.v[p] = unpack(&l.vq[p], &c.values[layer]);
                l.kq[p] = Box::default();
                l.vq[p] = Box::default();
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
        self.compress_layer(layer);
        let floats = self.layout.page_floats();
        let l = &mut self.layers[layer];
        for t in 0..n {
            let pos = l.len + t;
            if pos / ps == l.k.len() {
                l.k.push(vec![0.0; floats].into_boxed_slice());
                l.v.push(vec![0.0; floats].into_boxed_slice());
                l.kq.push(Box::default());
                l.vq.push(Box::default());
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
        self.unpack_from(len);
        for l in &mut self.layers {
            if len >= l.len {
                continue;
            }
            let pages = len.div_ceil(ps);
            l.k.truncate(pages);
            l.v.truncate(pages);
            l.kq.truncate(pages);
            l.vq.truncate(pages);
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
        crate::check_retain(prefix, rows, self.len());
        self.unpack_from(prefix);
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
            compression: self
                .compression
                .as_deref()
                .map(|c| (c, &c.keys[layer], &c.values[layer])),
        }
    }
}

/// One layer of a [`PagedKv`], read in place by attention.
#[derive(Debug, Clone, Copy)]
pub struct LayerView<'a> {
    pages: &'a LayerPages,
    layout: KvLayout,
    compression: Option<(&'a KvCompression, &'a RowQuantizer, &'a RowQuantizer)>,
}

impl LayerView<'_> {
    #[inline]
    fn at(&self, g: usize, j: usize) -> (usize, usize) {
        let ps = self.layout.page_size;
        let off = ((j % ps) * self.layout.n_kv_heads + g) * self.layout.head_dim;
        (j / ps, off)
    }
}

impl<'v> LayerView<'v> {
    /// Row `j` of head `g` as a query at `pos` reads it: stored full precision, stored codes
    /// unpacked, or (a page not packed yet) full precision packed and unpacked on the fly —
    /// bit for bit what its codes will hold.
    #[inline]
    fn read<'a>(
        &'a self,
        values: bool,
        g: usize,
        j: usize,
        pos: usize,
        buf: &'a mut [f32],
    ) -> &'a [f32] {
        let hd = self.layout.head_dim;
        let (p, o) = self.at(g, j);
        let (full, codes) = if values {
            (&self.pages.v, &self.pages.vq)
        } else {
            (&self.pages.k, &self.pages.kq)
        };
        let Some((c, qk, qv)) = self.compression else {
            return &full[p][o..o + hd];
        };
        // Full precision when the query is within reach of the token — unless the page was
        // packed before this query (the model never issues one): then the codes are all left.
        if !c.quantized(j, pos) && !full[p].is_empty() {
            return &full[p][o..o + hd];
        }
        let q = if values { qv } else { qk };
        let bytes = q.packed_bytes();
        if codes[p].is_empty() {
            let mut scratch = [0u8; MAX_PACKED];
            q.quantize(&full[p][o..o + hd], &mut scratch[..bytes]);
            q.dequantize(&scratch[..bytes], buf);
        } else {
            let at = (o / hd) * bytes;
            q.dequantize(&codes[p][at..at + bytes], buf);
        }
        buf
    }
}

impl KvSource for LayerView<'_> {
    #[inline]
    fn key<'a>(
        &'a self,
        _b: usize,
        g: usize,
        j: usize,
        pos: usize,
        buf: &'a mut [f32],
    ) -> &'a [f32] {
        self.read(false, g, j, pos, buf)
    }

    #[inline]
    fn value<'a>(
        &'a self,
        _b: usize,
        g: usize,
        j: usize,
        pos: usize,
        buf: &'a mut [f32],
    ) -> &'a [f32] {
        self.read(true, g, j, pos, buf)
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
                assert_eq!(view.key(0, g, j, 0, &mut [0.0; 3]), &want[..]);
                let neg: Vec<f32> = want.iter().map(|x| -x).collect();
                assert_eq!(view.value(0, g, j, 0, &mut [0.0; 3]), &neg[..]);
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
        assert_eq!(
            v.key(0, 1, 6, 0, &mut [0.0; 3])[0],
            (51 * 100 + 10) as f32 + 0.5
        );
        assert_eq!(
            v.key(0, 1, 7, 0, &mut [0.0; 3])[0],
            (53 * 100 + 10) as f32 + 0.5
        );
        assert_eq!(c.pages(), 2);
        // Dropping the two kept rows again restores the original bytes.
        c.truncate(6);
        assert_eq!(c, before);
        c.clear();
        assert_eq!((c.len(), c.pages(), c.bytes()), (0, 0, 0));
    }

    /// Rows of `hd` channels for `kvh` heads, head-major, smooth in the channel.
    fn wide_rows(first: usize, n: usize, kvh: usize, hd: usize) -> Vec<f32> {
        let mut out = Vec::new();
        for g in 0..kvh {
            for t in first..first + n {
                for c in 0..hd {
                    out.push(((t * 7 + g * 3 + c) as f32 * 0.37).sin());
                }
            }
        }
        out
    }

    #[test]
    fn compressed_pages_read_as_on_the_fly_codes_shrink_storage_and_roll_back_exactly() {
        let layout = KvLayout {
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 8,
            page_size: 4,
        };
        let comp = Arc::new(KvCompression::uniform(&layout, 4, 8, 2, 4).unwrap());
        let mut c = PagedKv::compressed(layout, comp.clone());
        let mut plain = PagedKv::new(layout);
        let add = |c: &mut PagedKv, first: usize, n: usize| {
            let r = wide_rows(first, n, 2, 8);
            let v: Vec<f32> = r.iter().map(|x| 1.0 - x).collect();
            for layer in 0..2 {
                c.append_head_major(layer, &r, &v, n);
            }
        };
        add(&mut c, 0, 20);
        add(&mut plain, 0, 20);
        let read = |c: &PagedKv, values: bool, j: usize, pos: usize| -> Vec<f32> {
            let mut buf = [0.0f32; 8];
            let view = c.layer(1);
            if values {
                view.value(0, 1, j, pos, &mut buf).to_vec()
            } else {
                view.key(0, 1, j, pos, &mut buf).to_vec()
            }
        };
        // Not packed yet: old tokens are quantized on the fly for a query at 20.
        let before: Vec<Vec<f32>> = (0..20).map(|j| read(&c, false, j, 20)).collect();
        let vals_before: Vec<Vec<f32>> = (0..20).map(|j| read(&c, true, j, 20)).collect();
        c.compress();
        for j in 0..20 {
            assert_eq!(
                read(&c, false, j, 20),
                before[j],
                "key {j}: codes == on-the-fly"
            );
            assert_eq!(read(&c, true, j, 20), vals_before[j], "value {j}");
            let exact = read(&plain, false, j, 20);
            if j < 2 || j + 4 >= 20 {
                assert_eq!(before[j], exact, "sinks and window stay exact ({j})");
            } else {
                assert_ne!(before[j], exact, "token {j} is quantized");
                let err = before[j]
                    .iter()
                    .zip(&exact)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(err <= 2.0 / 15.0 / 2.0 + 1e-2, "4-bit error {err} at {j}");
            }
        }
        // Pages 1..4 (tokens 4..16) are packed: 8 codes × 4 bits + f16 scale and min = 8 bytes
        // per (token, head) instead of 32.
        let f32_page = 4 * 2 * 8 * 4;
        let packed_page = 4 * 2 * 8;
        assert_eq!(c.bytes(), 2 * 2 * (2 * f32_page + 3 * packed_page));
        assert_eq!(plain.bytes(), 2 * 2 * 5 * f32_page);
        // A rejected tree leaves the compressed store byte-identical.
        let snapshot = c.clone();
        add(&mut c, 90, 3);
        c.truncate(20);
        assert_eq!(c, snapshot);
        // Accepting one of them: the packed pages are untouched.
        add(&mut c, 90, 3);
        c.retain(20, &[21]);
        assert_eq!(c.len(), 21);
        assert_eq!(read(&c, false, 10, 21), before[10]);
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
