//! Tree attention over a paged KV cache in CubeCL (FlashAttention-style online softmax;
//! Dao et al., arXiv 2205.14135), for decode and tree verification alike.
//!
//! One cube per (query row, query head), `head_dim` units. The keys — the sequence's cached
//! tokens, then the tree's own rows — are walked in tiles of `head_dim`: unit `u` scores key
//! `t0 + u` against the query (held in shared memory), every unit then folds the tile into
//! the running maximum and sum, and unit `u` accumulates channel `u` of the output. Keys and
//! values are read in place from the pages (`[page][slot][kv_head][head_dim]`, the CPU
//! cache's layout) through the sequence's page table, by the KV head of the query head's
//! group (GQA: nothing repeated). A tree row sees every cached token and its own ancestors
//! (from the parent pointers) and itself — the mask is never materialized.
//!
//! Pages may also be held packed, as the CPU cache's SKVQ compression makes them
//! ([`CubePagedKv::upload_packed`]): 2-, 4- or 8-bit codes in `u32` words with f32 grids —
//! values per token in permuted channel groups, keys the same way or per channel over the page
//! (KIVI). The kernel dequantizes each code where it reads it (`code · scale + min`); nothing
//! is expanded in device memory. Which copy a row reads follows the CPU cache exactly: a
//! packed page's codes once its last token is older than the window at the row's position,
//! else its full-precision copy.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::KernelError;
use crate::kvquant::{ChannelQuantizer, RowQuantizer};

/// Sizes of one call, as [`crate::attention::AttentionDims`] for one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedDims {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (divides `n_heads`).
    pub n_kv_heads: usize,
    /// Channels per head (the cube's width: at most the device's cube size).
    pub head_dim: usize,
    /// Slots per page.
    pub page_size: usize,
    /// Cached tokens before the tree (every row sees them).
    pub cached: usize,
    /// Tree rows (their keys follow the cached ones).
    pub n_q: usize,
}

/// Whether row `row` sees key `j`: every cached key; of the tree's keys, its ancestors and
/// itself — for a chain (`causal`: a prompt chunk) every earlier row, without walking; for
/// a tree by walking the parent pointers up to the key (parents precede their children, so
/// the walk stops below it).
#[cube]
fn visible(j: usize, row: usize, cached: usize, causal: u32, parents: &Array<i32>) -> bool {
    let mut seen = j < cached;
    if !seen {
        let target = (j - cached) as i32;
        if causal == 1 {
            seen = target <= row as i32;
        } else {
            let mut node = row as i32;
            while node >= target {
                if node == target {
                    seen = true;
                }
                node = parents[node as usize];
            }
        }
    }
    seen
}

/// Which copy of token `j`'s page a query at `pos` reads, as the CPU cache decides
/// (`arbor_cache`'s `LayerView`): the codes of a packed page whose last token is older than
/// the window, else its full-precision copy, else its codes. `≥ 0`: that full-precision page;
/// `< 0`: packed page `−1 − value`.
#[cube]
fn page_choice(
    full: &Array<i32>,
    packed: &Array<i32>,
    j: usize,
    pos: usize,
    window: usize,
    #[comptime] bits: u32,
    #[comptime] page_size: u32,
) -> i32 {
    let ps = comptime!(page_size as usize);
    let p = j / ps;
    let f = full[p];
    let mut choice = f;
    if comptime!(bits > 0) {
        let qp = packed[p];
        if qp >= 0 && (f < 0 || p * ps + ps - 1 + window < pos) {
            choice = -1 - qp;
        }
    }
    choice
}

/// Channel `c` of KV head `g` at token `j` from the copy [`page_choice`] picked: read from a
/// full-precision page, or dequantized from a packed one (`code · scale + min`) — per token
/// in groups after the channel permutation (`inv[c]`: where channel `c` sits), or per channel
/// over the page (`per_channel`, KIVI keys; `grids` `[page][scale | min][kv_head · head_dim]`).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn load(
    pages: &Array<f32>,
    codes: &Array<u32>,
    grids: &Array<f32>,
    inv: &Array<u32>,
    choice: i32,
    j: usize,
    g: usize,
    c: usize,
    #[comptime] per_channel: bool,
    #[comptime] bits: u32,
    #[comptime] group: u32,
    #[comptime] n_kv_heads: u32,
    #[comptime] head_dim: u32,
    #[comptime] page_size: u32,
) -> f32 {
    let ps = comptime!(page_size as usize);
    let kvh = comptime!(n_kv_heads as usize);
    let hd = comptime!(head_dim as usize);
    let slot = j % ps;
    let mut out = 0.0f32;
    if choice >= 0 {
        out = pages[((choice as usize * ps + slot) * kvh + g) * hd + c];
    } else if comptime!(bits > 0) {
        let qp = (-1 - choice) as usize;
        let b = comptime!(bits as usize);
        let mask = comptime!((1u32 << bits) - 1);
        if comptime!(per_channel) {
            let row = comptime!(kvh * hd);
            let ch = g * hd + c;
            let word = codes[(qp * ps + slot) * comptime!(row * b / 32) + ch * b / 32];
            let code = f32::cast_from((word >> ((ch * b % 32) as u32)) & mask);
            out = code * grids[2 * qp * row + ch] + grids[(2 * qp + 1) * row + ch];
        } else {
            let at = inv[c] as usize;
            let r = (qp * ps + slot) * kvh + g;
            let word = codes[r * comptime!(hd * b / 32) + at * b / 32];
            let code = f32::cast_from((word >> ((at * b % 32) as u32)) & mask);
            let gi = r * comptime!(hd / group as usize) + at / comptime!(group as usize);
            out = code * grids[2 * gi] + grids[2 * gi + 1];
        }
    }
    out
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn paged_tree_attention(
    q: &Array<f32>,
    k_pages: &Array<f32>,
    v_pages: &Array<f32>,
    full: &Array<i32>,
    packed: &Array<i32>,
    parents: &Array<i32>,
    positions: &Array<u32>,
    k_codes: &Array<u32>,
    k_grids: &Array<f32>,
    k_inv: &Array<u32>,
    v_codes: &Array<u32>,
    v_grids: &Array<f32>,
    v_inv: &Array<u32>,
    out: &mut Array<f32>,
    ml: &mut Array<f32>,
    cached: u32,
    n_q: u32,
    scale: f32,
    window: u32,
    causal: u32,
    split_len: u32,
    #[comptime] split: bool,
    #[comptime] gqa: u32,
    #[comptime] n_kv_heads: u32,
    #[comptime] head_dim: u32,
    #[comptime] page_size: u32,
    #[comptime] bits: u32,
    #[comptime] keys_per_channel: bool,
    #[comptime] k_group: u32,
    #[comptime] v_group: u32,
) {
    let row = CUBE_POS_X as usize;
    let h = CUBE_POS_Y as usize;
    let z = CUBE_POS_Z as usize;
    let u = UNIT_POS_X as usize;
    let hd = comptime!(head_dim as usize);
    let g = h / comptime!(gqa as usize);
    let cached = cached as usize;
    let n_q = n_q as usize;
    // This cube's share of the keys (all of them without a split).
    let start = z * split_len as usize;
    let end = min(cached + n_q, start + split_len as usize);
    let pos = positions[row] as usize;
    let window = window as usize;
    let mut qs = SharedMemory::<f32>::new(hd);
    let mut scores = SharedMemory::<f32>::new(hd);
    let mut choices = SharedMemory::<i32>::new(hd);
    qs[u] = q[(h * n_q + row) * hd + u];
    sync_cube();
    // Scores of keys a row cannot see (WGSL has no infinity literal).
    let hidden = f32::new(-1.0e30);
    let mut run_max = hidden;
    let mut sum = 0.0f32;
    let mut acc = 0.0f32;
    let mut t0 = start;
    while t0 < end {
        let j = t0 + u;
        let mut s = hidden;
        let mut choice = 0i32;
        if j < end && visible(j, row, cached, causal, parents) {
            choice = page_choice(full, packed, j, pos, window, bits, page_size);
            let mut dot = 0.0f32;
            for c in 0..hd {
                let key = load(
                    k_pages,
                    k_codes,
                    k_grids,
                    k_inv,
                    choice,
                    j,
                    g,
                    c,
                    keys_per_channel,
                    bits,
                    k_group,
                    n_kv_heads,
                    head_dim,
                    page_size,
                );
                dot += qs[c] * key;
            }
            s = dot * scale;
        }
        scores[u] = s;
        choices[u] = choice;
        sync_cube();
        let mut tile_max = run_max;
        for t in 0..hd {
            tile_max = max(tile_max, scores[t]);
        }
        let fix = (run_max - tile_max).exp();
        sum *= fix;
        acc *= fix;
        for t in 0..hd {
            let st = scores[t];
            if st > hidden {
                let p = (st - tile_max).exp();
                sum += p;
                let value = load(
                    v_pages,
                    v_codes,
                    v_grids,
                    v_inv,
                    choices[t],
                    t0 + t,
                    g,
                    u,
                    false,
                    bits,
                    v_group,
                    n_kv_heads,
                    head_dim,
                    page_size,
                );
                acc += p * value;
            }
        }
        run_max = tile_max;
        sync_cube();
        t0 += hd;
    }
    if comptime!(split) {
        // Partial results, merged by `combine_splits`.
        let i = (z * comptime!(gqa as usize * n_kv_heads as usize) + h) * n_q + row;
        out[i * hd + u] = acc;
        if u == 0 {
            ml[2 * i] = run_max;
            ml[2 * i + 1] = sum;
        }
    } else {
        out[(h * n_q + row) * hd + u] = acc / sum;
    }
}

/// Merges the partial results of a split launch (flash-decoding: Dao et al., 2023): for row
/// `CUBE_POS_X`, head `CUBE_POS_Y`, channel `UNIT_POS_X`, the splits' sums and outputs
/// rescaled to the largest running maximum.
#[cube(launch)]
fn combine_splits(
    part: &Array<f32>,
    ml: &Array<f32>,
    out: &mut Array<f32>,
    n_q: u32,
    n_heads: u32,
    splits: u32,
    #[comptime] head_dim: u32,
) {
    let row = CUBE_POS_X as usize;
    let h = CUBE_POS_Y as usize;
    let u = UNIT_POS_X as usize;
    let hd = comptime!(head_dim as usize);
    let (n_q, n_heads) = (n_q as usize, n_heads as usize);
    let mut m = f32::new(-1.0e30);
    for z in 0..splits as usize {
        m = max(m, ml[2 * ((z * n_heads + h) * n_q + row)]);
    }
    let mut l = 0.0f32;
    let mut acc = 0.0f32;
    for z in 0..splits as usize {
        let i = (z * n_heads + h) * n_q + row;
        let w = (ml[2 * i] - m).exp();
        l += ml[2 * i + 1] * w;
        acc += part[i * hd + u] * w;
    }
    out[(h * n_q + row) * hd + u] = acc / l;
}

/// Where one logical page of a sequence lives on the device: a full-precision page, a packed
/// one, or both (a page still within reach of the window keeps its full-precision copy beside
/// its codes, as in the CPU cache). At least one is required.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageRef {
    /// Index among the full-precision pages.
    pub full: Option<u32>,
    /// Index among the packed pages.
    pub packed: Option<u32>,
}

/// How packed keys are coded (the CPU cache's `PageQuant`).
#[derive(Debug, Clone, Copy)]
pub enum KeyCodes<'a> {
    /// Per channel over a page's tokens (KIVI): one block per page.
    Channel(&'a ChannelQuantizer),
    /// Per token in channel groups (SKVQ): one row per (slot, KV head).
    Token(&'a RowQuantizer),
}

/// The packed pages of one layer, in the CPU cache's byte layout.
#[derive(Debug, Clone)]
pub struct PackedPages<'a> {
    /// The keys' quantizer.
    pub keys: KeyCodes<'a>,
    /// The values' quantizer (rows of one KV head, `head_dim` channels).
    pub values: &'a RowQuantizer,
    /// Full-precision recent tokens: a query at position `pos` reads a page's codes once its
    /// last token `t` has `t + window < pos` (or when the page has no full-precision copy).
    pub window: usize,
    /// Per packed page, its keys' bytes (a [`ChannelQuantizer`] block, or rows
    /// `[slot][kv_head]` of a [`RowQuantizer`]) and its values' bytes (rows `[slot][kv_head]`).
    pub pages: Vec<(&'a [u8], &'a [u8])>,
}

/// How packed pages are coded (the kernel's compile-time parameters, and the window); all
/// zero without packed pages.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CodeShape {
    pub bits: u32,
    pub keys_per_channel: bool,
    pub k_group: usize,
    pub v_group: usize,
    pub window: usize,
}

/// Packed pages repacked for the device: codes in `u32` words (little end first), grids as
/// f32 `[scale, min]` pairs, and the inverse channel permutations (empty where unused).
#[derive(Debug, Default)]
struct DeviceCodes {
    shape: CodeShape,
    k_codes: Vec<u32>,
    k_grids: Vec<f32>,
    k_inv: Vec<u32>,
    v_codes: Vec<u32>,
    v_grids: Vec<f32>,
    v_inv: Vec<u32>,
}

/// Appends `codes` of `bits` bits to `words`, `32 / bits` per word, little end first.
fn push_words(words: &mut Vec<u32>, codes: &[u8], bits: u32) {
    let per = (32 / bits) as usize;
    words.extend(codes.chunks(per).map(|c| {
        c.iter()
            .enumerate()
            .fold(0u32, |w, (i, &q)| w | u32::from(q) << (i as u32 * bits))
    }));
}

/// Where each channel sits in a permuted row.
fn inverse(perm: &[usize]) -> Vec<u32> {
    let mut inv = vec![0u32; perm.len()];
    for (i, &c) in perm.iter().enumerate() {
        inv[c] = i as u32;
    }
    inv
}

/// Per-token rows (`rows` of `q.channels()` channels, `q.packed_bytes()` bytes each) as
/// device codes and grids, appended.
fn push_rows(q: &RowQuantizer, bytes: &[u8], codes: &mut Vec<u32>, grids: &mut Vec<f32>) {
    let (mut c, mut g) = (
        vec![0u8; q.channels()],
        vec![[0.0f32; 2]; q.channels() / q.group()],
    );
    for row in bytes.chunks_exact(q.packed_bytes()) {
        q.codes(row, &mut c, &mut g);
        push_words(codes, &c, q.bits());
        grids.extend(g.iter().flatten());
    }
}

impl DeviceCodes {
    fn new(p: &PackedPages<'_>, d: &PagedDims) -> Result<Self, KernelError> {
        let bad = |m: String| Err(KernelError::Shape(m));
        let (hd, row) = (d.head_dim, d.n_kv_heads * d.head_dim);
        let v = p.values;
        let bits = v.bits();
        let (k_bits, keys_per_channel, k_group) = match p.keys {
            KeyCodes::Channel(k) => (k.bits(), true, 0),
            KeyCodes::Token(k) => (k.bits(), false, k.group()),
        };
        if k_bits != bits || v.channels() != hd || !(hd * bits as usize).is_multiple_of(32) {
            return bad(format!(
                "packed pages of {k_bits}-bit keys and {bits}-bit values over {} channels for \
                 heads of {hd} (one width, head_dim · bits a multiple of 32)",
                v.channels()
            ));
        }
        match p.keys {
            KeyCodes::Channel(k) if k.tokens() != d.page_size || k.channels() != row => {
                return bad(format!(
                    "per-channel key blocks of {} × {} for pages of {} × {row}",
                    k.tokens(),
                    k.channels(),
                    d.page_size
                ));
            }
            KeyCodes::Token(k) if k.channels() != hd => {
                return bad(format!(
                    "key rows of {} channels for heads of {hd}",
                    k.channels()
                ));
            }
            KeyCodes::Channel(k) if k.refined() > 0 => {
                return bad(
                    "refined key channels (residual codes) are read on the CPU only".into(),
                );
            }
            _ => {}
        }
        let rows = d.page_size * d.n_kv_heads;
        let mut out = Self {
            shape: CodeShape {
                bits,
                keys_per_channel,
                k_group,
                v_group: v.group(),
                window: p.window,
            },
            k_inv: match p.keys {
                KeyCodes::Token(k) => inverse(k.perm()),
                KeyCodes::Channel(_) => Vec::new(),
            },
            v_inv: inverse(v.perm()),
            ..Self::default()
        };
        let k_len = match p.keys {
            KeyCodes::Channel(k) => k.packed_bytes(),
            KeyCodes::Token(k) => rows * k.packed_bytes(),
        };
        for (i, &(kb, vb)) in p.pages.iter().enumerate() {
            if kb.len() != k_len || vb.len() != rows * v.packed_bytes() {
                return bad(format!(
                    "packed page {i}: {} / {} bytes of keys / values, expected {k_len} / {}",
                    kb.len(),
                    vb.len(),
                    rows * v.packed_bytes()
                ));
            }
            match p.keys {
                KeyCodes::Channel(k) => {
                    let mut c = vec![0u8; d.page_size * row];
                    let mut g = vec![[0.0f32; 2]; row];
                    k.codes(kb, &mut c, &mut g);
                    push_words(&mut out.k_codes, &c, bits);
                    out.k_grids.extend(g.iter().map(|[s, _]| s));
                    out.k_grids.extend(g.iter().map(|[_, m]| m));
                }
                KeyCodes::Token(k) => push_rows(k, kb, &mut out.k_codes, &mut out.k_grids),
            }
            push_rows(v, vb, &mut out.v_codes, &mut out.v_grids);
        }
        Ok(out)
    }
}

/// Whether `parents` describe a tree whose rows come after their parents (`-1`: the root's
/// parent, the cached tokens).
///
/// # Errors
/// [`KernelError::Shape`] otherwise.
pub(crate) fn check_parents(parents: &[i32]) -> Result<(), KernelError> {
    if parents
        .iter()
        .enumerate()
        .any(|(i, &p)| p >= i as i32 || p < -1)
    {
        return Err(KernelError::Shape(format!(
            "parents {parents:?} are not a tree"
        )));
    }
    Ok(())
}

/// `x` on the device, and its element count (wgpu refuses empty buffers: an empty `x` is one
/// zero, which the kernel never reads).
pub(crate) fn device_array<R: Runtime, E: CubeElement + Default>(
    client: &ComputeClient<R>,
    x: &[E],
) -> (Handle, usize) {
    let zero = [E::default()];
    let x = if x.is_empty() { &zero[..] } else { x };
    (client.create_from_slice(E::as_bytes(x)), x.len())
}

/// One sequence's paged KV on a CubeCL device, and its tree attention.
pub struct CubePagedKv<R: Runtime> {
    client: ComputeClient<R>,
    k: Handle,
    v: Handle,
    full: Handle,
    packed: Handle,
    /// Codes, grids and inverse permutations of keys, then of values.
    codes: [Handle; 6],
    lens: [usize; 6],
    floats: usize,
    pages: usize,
    d: PagedDims,
    shape: CodeShape,
    /// Parts the keys are split into (`None`: chosen from the launch's size).
    splits: Option<usize>,
}

impl<R: Runtime> std::fmt::Debug for CubePagedKv<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CubePagedKv")
            .field("pages", &self.pages)
            .field("dims", &self.d)
            .field("codes", &self.shape)
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> CubePagedKv<R> {
    /// Uploads full-precision pages (`[pages][page_size][n_kv_heads][head_dim]` keys and
    /// values) and the sequence's page table (logical page → stored page, covering cached +
    /// tree tokens).
    ///
    /// # Errors
    /// [`KernelError::Shape`] if the sizes disagree, the table is too short or points past
    /// the pages, `n_heads` is not a multiple of `n_kv_heads`, or `head_dim` is 0 or above
    /// 256 (one unit per channel).
    pub fn upload(
        client: &ComputeClient<R>,
        k: &[f32],
        v: &[f32],
        table: &[u32],
        d: PagedDims,
    ) -> Result<Self, KernelError> {
        let table: Vec<PageRef> = table
            .iter()
            .map(|&p| PageRef {
                full: Some(p),
                packed: None,
            })
            .collect();
        Self::build(client, k, v, &table, None, d)
    }

    /// [`CubePagedKv::upload`] with packed pages beside the full-precision ones: each logical
    /// page names its copies ([`PageRef`]); packed pages are read in place as codes and
    /// dequantized in the kernel (never expanded on the device), by the CPU cache's rule
    /// ([`PackedPages::window`]).
    ///
    /// # Errors
    /// As [`CubePagedKv::upload`], and for packed pages whose quantizers or sizes disagree
    /// with `d` (keys and values of one width; `head_dim · bits` a multiple of 32) or a page
    /// with neither copy.
    pub fn upload_packed(
        client: &ComputeClient<R>,
        k: &[f32],
        v: &[f32],
        table: &[PageRef],
        packed: &PackedPages<'_>,
        d: PagedDims,
    ) -> Result<Self, KernelError> {
        Self::build(client, k, v, table, Some(packed), d)
    }

    fn build(
        client: &ComputeClient<R>,
        k: &[f32],
        v: &[f32],
        table: &[PageRef],
        packed: Option<&PackedPages<'_>>,
        d: PagedDims,
    ) -> Result<Self, KernelError> {
        let page = d.page_size * d.n_kv_heads * d.head_dim;
        let bad = |m: String| Err(KernelError::Shape(m));
        if page == 0 || k.len() != v.len() || !k.len().is_multiple_of(page) {
            return bad(format!(
                "{} / {} floats in pages of {page}",
                k.len(),
                v.len()
            ));
        }
        if d.n_kv_heads == 0 || !d.n_heads.is_multiple_of(d.n_kv_heads) {
            return bad(format!(
                "{} heads over {} KV heads",
                d.n_heads, d.n_kv_heads
            ));
        }
        if d.head_dim > 256 {
            return bad(format!("head_dim {} above 256", d.head_dim));
        }
        let pages = k.len() / page;
        let n_packed = packed.map_or(0, |p| p.pages.len());
        let need = (d.cached + d.n_q).div_ceil(d.page_size);
        let fits = |r: &PageRef| {
            r.full.is_none_or(|p| (p as usize) < pages)
                && r.packed.is_none_or(|p| (p as usize) < n_packed)
                && (r.full.is_some() || r.packed.is_some())
        };
        if table.len() < need || !table.iter().all(fits) {
            return bad(format!(
                "page table {table:?} for {need} pages of {pages} full-precision and \
                 {n_packed} packed"
            ));
        }
        let c = packed
            .map(|p| DeviceCodes::new(p, &d))
            .transpose()?
            .unwrap_or_default();
        let index = |p: Option<u32>| p.map_or(-1, |p| p as i32);
        let full: Vec<i32> = table.iter().map(|r| index(r.full)).collect();
        let packed: Vec<i32> = table.iter().map(|r| index(r.packed)).collect();
        let parts = [
            device_array(client, &c.k_codes),
            device_array(client, &c.k_grids),
            device_array(client, &c.k_inv),
            device_array(client, &c.v_codes),
            device_array(client, &c.v_grids),
            device_array(client, &c.v_inv),
        ];
        Ok(Self {
            client: client.clone(),
            k: client.create_from_slice(f32::as_bytes(k)),
            v: client.create_from_slice(f32::as_bytes(v)),
            full: client.create_from_slice(i32::as_bytes(&full)),
            packed: client.create_from_slice(i32::as_bytes(&packed)),
            lens: parts.each_ref().map(|p| p.1),
            codes: parts.map(|p| p.0),
            floats: k.len(),
            pages: table.len(),
            d,
            shape: c.shape,
            splits: None,
        })
    }

    /// Splits the keys into `n` parts, each attended by its own cubes and merged after
    /// (flash-decoding; by default the count follows the launch's size).
    pub fn with_key_splits(mut self, n: usize) -> Self {
        self.splits = Some(n.max(1));
        self
    }

    fn operands(&self) -> KvOperands<'_> {
        KvOperands {
            k: &self.k,
            v: &self.v,
            floats: self.floats,
            full: &self.full,
            packed: &self.packed,
            pages: self.pages,
            codes: &self.codes,
            lens: self.lens,
            shape: self.shape,
        }
    }

    /// Attention of the tree rows: `q` is `[n_heads, n_q, head_dim]`, `parents[i]` the tree
    /// row row `i` hangs from (`-1`: it follows the cached tokens; parents come before their
    /// children). Row `i` sits at position `cached + depth(i)` (what decides which copy of a
    /// packed page it reads). Returns `[n_heads, n_q, head_dim]`.
    ///
    /// # Errors
    /// [`KernelError::Shape`] for operands of the wrong size or a parent that does not
    /// precede its child.
    pub fn attention(&self, q: &[f32], parents: &[i32]) -> Result<Vec<f32>, KernelError> {
        let d = self.d;
        if q.len() != d.n_heads * d.n_q * d.head_dim || parents.len() != d.n_q || d.n_q == 0 {
            return Err(KernelError::Shape(format!(
                "q {} parents {} for {d:?}",
                q.len(),
                parents.len()
            )));
        }
        check_parents(parents)?;
        let mut positions: Vec<u32> = Vec::with_capacity(d.n_q);
        for &p in parents {
            let pos = if p < 0 {
                d.cached as u32
            } else {
                positions[p as usize] + 1
            };
            positions.push(pos);
        }
        let c = &self.client;
        let q_handle = c.create_from_slice(f32::as_bytes(q));
        let tree = TreeOperands::upload(c, parents, &positions);
        let out = launch_tree_attention(c, &self.operands(), q_handle, &tree, d, self.splits);
        Ok(f32::from_bytes(&c.read_one_unchecked(out)).to_vec())
    }
}

/// One layer's keys and values on the device as the kernel reads them: full-precision pages
/// (`floats` elements each of `k`, `v`), the page table (`pages` entries of `full` and
/// `packed`: stored page or `-1`), and the packed pages' codes, grids and inverse
/// permutations (keys', then values'; `lens` elements each).
pub(crate) struct KvOperands<'a> {
    pub k: &'a Handle,
    pub v: &'a Handle,
    pub floats: usize,
    pub full: &'a Handle,
    pub packed: &'a Handle,
    pub pages: usize,
    pub codes: &'a [Handle; 6],
    pub lens: [usize; 6],
    pub shape: CodeShape,
}

/// The tree's rows on the device: `parents` (`i32`, `-1` at the root) and `positions`
/// (`u32`), `n_q` each; `causal` when the tree is a chain (each row's parent the row
/// before it).
pub(crate) struct TreeOperands {
    pub parents: Handle,
    pub positions: Handle,
    pub causal: bool,
}

impl TreeOperands {
    /// Uploads `parents` and `positions`.
    pub(crate) fn upload<R: Runtime>(
        client: &ComputeClient<R>,
        parents: &[i32],
        positions: &[u32],
    ) -> Self {
        Self {
            parents: client.create_from_slice(i32::as_bytes(parents)),
            positions: client.create_from_slice(u32::as_bytes(positions)),
            causal: parents.iter().enumerate().all(|(i, &p)| p == i as i32 - 1),
        }
    }
}

/// Launches [`paged_tree_attention`] for `d.n_q` rows of `q` (`[n_heads][n_q][head_dim]` f32
/// on the device) and returns the output's handle (same shape).
///
/// Callers guarantee that every handle holds the elements stated beside it, that the page
/// table covers `d.cached + d.n_q` tokens with pages that exist, and that the parents form a
/// tree (each before its children).
pub(crate) fn launch_tree_attention<R: Runtime>(
    c: &ComputeClient<R>,
    kv: &KvOperands<'_>,
    q: Handle,
    tree: &TreeOperands,
    d: PagedDims,
    splits: Option<usize>,
) -> Handle {
    let n = d.n_heads * d.n_q * d.head_dim;
    let n_kv = d.cached + d.n_q;
    let splits = splits
        .unwrap_or_else(|| key_splits(n_kv, d))
        .clamp(1, n_kv.max(1));
    // Keys per split, whole tiles of `head_dim`; fewer splits if the last ones would be empty.
    let split_len = n_kv.div_ceil(splits).div_ceil(d.head_dim) * d.head_dim;
    let splits = n_kv.div_ceil(split_len);
    let split = splits > 1;
    let out = c.empty(splits * n * 4);
    let ml = c.empty(if split {
        splits * d.n_heads * d.n_q * 2 * 4
    } else {
        4
    });
    // SAFETY: `lens[i]` is the element count `codes[i]` was created with.
    let arr = |i: usize| unsafe { ArrayArg::from_raw_parts(kv.codes[i].clone(), kv.lens[i]) };
    let CodeShape {
        bits,
        keys_per_channel,
        k_group,
        v_group,
        window,
    } = kv.shape;
    // SAFETY: every handle holds exactly the elements given with it (the caller's contract).
    unsafe {
        paged_tree_attention::launch::<R>(
            c,
            CubeCount::Static(d.n_q as u32, d.n_heads as u32, splits as u32),
            CubeDim::new_1d(d.head_dim as u32),
            ArrayArg::from_raw_parts(q, n),
            ArrayArg::from_raw_parts(kv.k.clone(), kv.floats),
            ArrayArg::from_raw_parts(kv.v.clone(), kv.floats),
            ArrayArg::from_raw_parts(kv.full.clone(), kv.pages),
            ArrayArg::from_raw_parts(kv.packed.clone(), kv.pages),
            ArrayArg::from_raw_parts(tree.parents.clone(), d.n_q),
            ArrayArg::from_raw_parts(tree.positions.clone(), d.n_q),
            arr(0),
            arr(1),
            arr(2),
            arr(3),
            arr(4),
            arr(5),
            ArrayArg::from_raw_parts(out.clone(), splits * n),
            ArrayArg::from_raw_parts(
                ml.clone(),
                if split {
                    splits * d.n_heads * d.n_q * 2
                } else {
                    1
                },
            ),
            d.cached as u32,
            d.n_q as u32,
            (d.head_dim as f32).powf(-0.5),
            window as u32,
            u32::from(tree.causal),
            split_len as u32,
            split,
            (d.n_heads / d.n_kv_heads) as u32,
            d.n_kv_heads as u32,
            d.head_dim as u32,
            d.page_size as u32,
            bits,
            keys_per_channel,
            k_group as u32,
            v_group as u32,
        );
    }
    if !split {
        return out;
    }
    let merged = c.empty(n * 4);
    // SAFETY: `out` holds `splits · n` partial outputs and `ml` their maxima and sums.
    unsafe {
        combine_splits::launch::<R>(
            c,
            CubeCount::Static(d.n_q as u32, d.n_heads as u32, 1),
            CubeDim::new_1d(d.head_dim as u32),
            ArrayArg::from_raw_parts(out, splits * n),
            ArrayArg::from_raw_parts(ml, splits * d.n_heads * d.n_q * 2),
            ArrayArg::from_raw_parts(merged.clone(), n),
            d.n_q as u32,
            d.n_heads as u32,
            splits as u32,
            d.head_dim as u32,
        );
    }
    merged
}

/// How many parts the keys are split into (flash-decoding): one cube per (row, head) leaves
/// most of a GPU idle when there are few rows and many keys, so small launches split the keys
/// into parts of at least four tiles, up to ~256 cubes in all.
fn key_splits(n_kv: usize, d: PagedDims) -> usize {
    let cubes = d.n_q * d.n_heads;
    if cubes >= 256 {
        return 1;
    }
    (256 / cubes)
        .min(n_kv.div_ceil(4 * d.head_dim))
        .clamp(1, 64)
}
