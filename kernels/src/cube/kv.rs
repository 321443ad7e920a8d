//! One sequence's KV cache resident on a CubeCL device: pages of `page_size` tokens per
//! layer (`[page][slot][kv_head][head_dim]` f32, the CPU cache's layout), a page table
//! shared by the layers, a free-page pool, append of tree rows, commit of the accepted path,
//! rollback — and the tree attention of [`super::attention`] reading the pages in place.
//! Keys and values never leave the device; per call only the page table, the tree's parent
//! pointers and positions travel (a few hundred bytes, uploaded once per forward and shared
//! by every layer).
//!
//! Storage grows by doubling (pages are copied on the device); rollback returns whole pages
//! to the pool and zeroes the slots it vacates in the pages it keeps, so a rolled-back cache
//! reads back byte-identical to the cache before the tree.
//!
//! With [`DevicePagedKv::with_quant`] pages are compressed on the device as the CPU cache
//! compresses them: a page past the sinks is packed when it fills (keys per channel over the
//! page, KIVI; values per token in permuted, clipped groups, SKVQ — kernels in
//! `kvpack.rs`), a query reads a page's codes once its last token is older than the window
//! at the query's position, and the full-precision copy is freed when no later query can
//! read it (after a commit or rollback, against the new length). A commit that moves rows
//! into a packed page packs it again; a rollback into a page held only as codes expands it
//! back (its exact values are gone, as on the CPU).
//!
//! ```
//! use arbor_kernels::cube::kv::{DeviceKvDims, DevicePagedKv};
//! use cubecl::prelude::CubeElement;
//! use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
//! use cubecl::Runtime;
//!
//! let client = WgpuRuntime::client(&WgpuDevice::default());
//! let dims = DeviceKvDims { n_layers: 1, n_kv_heads: 1, head_dim: 4, page_size: 2 };
//! let mut kv = DevicePagedKv::<WgpuRuntime>::new(&client, dims).unwrap();
//! // One layer, three tokens: keys and values `[kv_head][token][channel]`.
//! let k = client.create_from_slice(f32::as_bytes(&[1.0; 12]));
//! let v = client.create_from_slice(f32::as_bytes(&[2.0; 12]));
//! kv.append(0, &k, &v, 3).unwrap();
//! assert_eq!(kv.len(), 3);
//! let q = client.create_from_slice(f32::as_bytes(&[0.5; 4]));
//! // A decode row (its own key is the third token): equal keys, so the mean of the values.
//! let out = kv.attention(0, q, 1, &[-1], &[2]).unwrap();
//! let out = f32::from_bytes(&client.read_one_unchecked(out)).to_vec();
//! assert_eq!(out, vec![2.0; 4]);
//! kv.truncate(1);
//! assert_eq!((kv.len(), kv.pages_in_use()), (1, 1));
//! ```

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::attention::{
    CodeShape, KvOperands, PageRef, PagedDims, TreeOperands, check_parents, device_array,
    launch_tree_attention,
};
pub use super::kvpack::{DeviceQuant, ValueCalibration};
use super::kvpack::{PackedStore, copied_blocks};
use crate::KernelError;

/// Geometry of a device cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceKvDims {
    /// Decoder layers.
    pub n_layers: usize,
    /// Key/value heads per layer.
    pub n_kv_heads: usize,
    /// Channels per head (one unit per channel: 1 to 256).
    pub head_dim: usize,
    /// Tokens per page.
    pub page_size: usize,
}

impl DeviceKvDims {
    /// Floats of one page (keys or values) of one layer.
    fn page_floats(&self) -> usize {
        self.page_size * self.n_kv_heads * self.head_dim
    }
}

/// Moves rows between pages (`[slot][kv_head][head_dim]`) and a row-major block
/// (`[kv_head][n][head_dim]`): with `to_pages`, row `i` of `src` into slot `slots[i]` of
/// `dst`; else slot `slots[i]` of `src` into row `i` of `dst`. Cube `(i, kv_head)`, unit =
/// channel.
#[cube(launch)]
fn move_rows(
    src: &Array<f32>,
    slots: &Array<u32>,
    dst: &mut Array<f32>,
    n: u32,
    #[comptime] to_pages: bool,
    #[comptime] n_kv_heads: u32,
    #[comptime] head_dim: u32,
) {
    let i = CUBE_POS_X as usize;
    let g = CUBE_POS_Y as usize;
    let c = UNIT_POS_X as usize;
    let hd = comptime!(head_dim as usize);
    let kvh = comptime!(n_kv_heads as usize);
    let paged = (slots[i] as usize * kvh + g) * hd + c;
    let row = (g * n as usize + i) * hd + c;
    if comptime!(to_pages) {
        dst[paged] = src[row];
    } else {
        dst[row] = src[paged];
    }
}

/// The invariant of a commit: `rows` increasing, from `prefix` on, inside a cache of `len`
/// (shared by every KV store: this device cache and `arbor_cache`'s host ones).
///
/// # Panics
/// If it does not hold (internal invariant: rows come from the tree just appended).
pub fn check_retain(prefix: usize, rows: &[usize], len: usize) {
    assert!(
        prefix <= len
            && rows.windows(2).all(|w| w[0] < w[1])
            && rows.first().is_none_or(|&r| r >= prefix)
            && rows.last().is_none_or(|&r| r < len),
        "bad retain: prefix {prefix}, rows {rows:?}, cache {len}"
    );
}

/// The page table, parents and positions of one forward, uploaded once for all layers.
struct Step {
    key: (Vec<PageRef>, Vec<i32>, Vec<u32>),
    full: Handle,
    packed: Handle,
    tree: TreeOperands,
}

/// One sequence's paged KV cache on a CubeCL device (see the module docs).
pub struct DevicePagedKv<R: Runtime> {
    client: ComputeClient<R>,
    dims: DeviceKvDims,
    /// Per layer, key and value pages (`capacity` pages each).
    layers: Vec<[Handle; 2]>,
    capacity: usize,
    /// Logical page → its full-precision and packed copies.
    table: Vec<PageRef>,
    /// Stored pages not in the table.
    free: Vec<u32>,
    /// Tokens held per layer (a forward appends layer by layer).
    lens: Vec<usize>,
    /// Placeholders for the kernel's packed-page operands (without quantization).
    no_codes: [Handle; 6],
    /// Packed pages (with quantization).
    quant: Option<PackedStore>,
    step: Option<Step>,
}

impl<R: Runtime> std::fmt::Debug for DevicePagedKv<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevicePagedKv")
            .field("dims", &self.dims)
            .field("lens", &self.lens)
            .field("table", &self.table)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> DevicePagedKv<R> {
    /// An empty cache (no device memory until the first append).
    ///
    /// # Errors
    /// [`KernelError::Shape`] for zero sizes or `head_dim` above 256.
    pub fn new(client: &ComputeClient<R>, dims: DeviceKvDims) -> Result<Self, KernelError> {
        let DeviceKvDims {
            n_layers,
            n_kv_heads,
            head_dim,
            page_size,
        } = dims;
        if n_layers == 0 || n_kv_heads == 0 || page_size == 0 || !(1..=256).contains(&head_dim) {
            return Err(KernelError::Shape(format!(
                "device KV cache of {dims:?} (all sizes ≥ 1, head_dim ≤ 256)"
            )));
        }
        let none = || device_array(client, &[0u32]).0;
        Ok(Self {
            client: client.clone(),
            dims,
            layers: Vec::new(),
            capacity: 0,
            table: Vec::new(),
            free: Vec::new(),
            lens: vec![0; n_layers],
            no_codes: std::array::from_fn(|_| none()),
            quant: None,
            step: None,
        })
    }

    /// An empty cache that packs pages as the CPU cache's quantization does: a complete
    /// page past the sinks is packed when it fills (keys per channel, values per token in
    /// groups), and its full-precision copy is freed once every later query reads the codes
    /// (its last token older than the window at the length after a commit or rollback).
    ///
    /// # Errors
    /// As [`DevicePagedKv::new`], and for a quantization the kernels do not take (bits other
    /// than 2, 4, 8; a group not dividing `head_dim`; `head_dim · bits` not a multiple of 32;
    /// a calibration of the wrong shape).
    pub fn with_quant(
        client: &ComputeClient<R>,
        dims: DeviceKvDims,
        quant: DeviceQuant,
    ) -> Result<Self, KernelError> {
        let mut kv = Self::new(client, dims)?;
        kv.quant = Some(PackedStore::new(client, dims, quant)?);
        Ok(kv)
    }

    /// The cache's geometry.
    pub fn dims(&self) -> DeviceKvDims {
        self.dims
    }

    /// The quantization this cache applies, if any.
    pub fn quantization(&self) -> Option<&DeviceQuant> {
        self.quant.as_ref().map(|q| &q.cfg)
    }

    /// Tokens held (by the last layer, i.e. fully processed tokens).
    pub fn len(&self) -> usize {
        self.lens.last().copied().unwrap_or(0)
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens held by `layer`.
    pub fn layer_len(&self, layer: usize) -> usize {
        self.lens.get(layer).copied().unwrap_or(0)
    }

    /// Pages the sequence uses (the page table's length).
    pub fn pages_in_use(&self) -> usize {
        self.table.len()
    }

    /// Full-precision and packed pages held (a page may hold both).
    pub fn copies(&self) -> (usize, usize) {
        let full = self.table.iter().filter(|r| r.full.is_some()).count();
        (full, self.quant.as_ref().map_or(0, |q| q.used))
    }

    /// Bytes of key/value storage in use: whole full-precision pages and packed pages of
    /// every layer, keys and values.
    pub fn bytes(&self) -> usize {
        let packed = self.quant.as_ref().map_or(0, |q| q.bytes(&self.dims));
        self.copies().0 * self.page_bytes() + packed
    }

    /// Bytes of device memory reserved (pages in use and in the pools).
    pub fn reserved_bytes(&self) -> usize {
        let packed = self
            .quant
            .as_ref()
            .map_or(0, |q| q.reserved_bytes(&self.dims));
        self.capacity * self.page_bytes() + packed
    }

    fn page_bytes(&self) -> usize {
        2 * self.dims.n_layers * self.dims.page_floats() * std::mem::size_of::<f32>()
    }

    /// The stored slot of token `t` (its page must be in the table with a full-precision
    /// copy: pages lose theirs only once no append, commit or read can reach them).
    fn slot(&self, t: usize) -> u32 {
        let ps = self.dims.page_size;
        let page = self.table[t / ps].full.expect("a full-precision page");
        page * ps as u32 + (t % ps) as u32
    }

    /// A full-precision page from the pool (growing the storage when it is empty), zeroed.
    fn take_page(&mut self) -> u32 {
        if self.free.is_empty() {
            self.grow((2 * self.capacity).max(1));
        }
        let p = self.free.pop().expect("the pool was just grown");
        let ps = self.dims.page_size as u32;
        let slots: Vec<u32> = (p * ps..(p + 1) * ps).collect();
        self.zero(&slots);
        p
    }

    /// Makes the table cover `tokens` tokens, taking pages from the pool and growing the
    /// storage (doubling, copied on the device) when the pool is empty.
    fn reserve(&mut self, tokens: usize) {
        let need = tokens.div_ceil(self.dims.page_size);
        let missing = need.saturating_sub(self.table.len());
        if self.free.len() < missing {
            self.grow((2 * self.capacity).max(missing - self.free.len() + self.capacity));
        }
        while self.table.len() < need {
            // Pages enter the table zeroed (fresh storage is uninitialized, pooled pages
            // hold what they held): slots past the length always read as zeros.
            let p = self.take_page();
            self.table.push(PageRef {
                full: Some(p),
                packed: None,
            });
        }
    }

    /// Zeroes `slots` in every layer's keys and values.
    fn zero(&self, slots: &[u32]) {
        if slots.is_empty() {
            return;
        }
        let d = self.dims;
        let zeros = vec![0.0f32; slots.len() * d.n_kv_heads * d.head_dim];
        let zeros = self.client.create_from_slice(f32::as_bytes(&zeros));
        for [k, v] in &self.layers {
            self.write(&zeros, k, slots);
            self.write(&zeros, v, slots);
        }
    }

    fn grow(&mut self, capacity: usize) {
        let floats = self.dims.page_floats();
        let old = self.capacity;
        let layers = std::mem::take(&mut self.layers);
        self.layers = if layers.is_empty() {
            (0..self.dims.n_layers)
                .map(|_| std::array::from_fn(|_| self.client.empty(capacity * floats * 4)))
                .collect()
        } else {
            layers
                .iter()
                .map(|kv| kv.each_ref().map(|h| self.copied(h, old, capacity)))
                .collect()
        };
        // Lowest pages first out of the pool.
        self.free.extend((old..capacity).rev().map(|p| p as u32));
        self.capacity = capacity;
    }

    /// A new buffer of `capacity` pages holding the first `pages` pages of `src`.
    fn copied(&self, src: &Handle, pages: usize, capacity: usize) -> Handle {
        copied_blocks(
            &self.client,
            src,
            (pages, capacity),
            self.dims.page_floats(),
        )
    }

    /// `n` rows of `block` (`[kv_head][n][head_dim]`) into `slots` of `pages` (one of the
    /// layers' buffers).
    fn write(&self, block: &Handle, pages: &Handle, slots: &[u32]) {
        self.move_rows(block, pages, slots, true);
    }

    /// `slots` of `pages` as a new block of rows `[kv_head][n][head_dim]`.
    fn read(&self, pages: &Handle, slots: &[u32]) -> Handle {
        let d = self.dims;
        let out = self
            .client
            .empty((slots.len() * d.n_kv_heads * d.head_dim).max(1) * 4);
        self.move_rows(pages, &out, slots, false);
        out
    }

    /// Launches [`move_rows`] between `src` and `dst` (pages on the side `to_pages` says).
    fn move_rows(&self, src: &Handle, dst: &Handle, slots: &[u32], to_pages: bool) {
        let d = self.dims;
        let n = slots.len();
        let (block, pages) = (
            n * d.n_kv_heads * d.head_dim,
            self.capacity * d.page_floats(),
        );
        let (src_len, dst_len) = if to_pages {
            (block, pages)
        } else {
            (pages, block)
        };
        let slots = self.client.create_from_slice(u32::as_bytes(slots));
        // SAFETY: the block holds `n` rows of every head (callers size it: `append` checked
        // the handles, `read` allocates it), every slot lies inside the storage (slots come
        // from the table).
        unsafe {
            move_rows::launch::<R>(
                &self.client,
                CubeCount::Static(n as u32, d.n_kv_heads as u32, 1),
                CubeDim::new_1d(d.head_dim as u32),
                ArrayArg::from_raw_parts(src.clone(), src_len),
                ArrayArg::from_raw_parts(slots, n),
                ArrayArg::from_raw_parts(dst.clone(), dst_len),
                n as u32,
                to_pages,
                d.n_kv_heads as u32,
                d.head_dim as u32,
            );
        }
    }

    /// Appends `n` tokens' keys and values (`[kv_head][n][head_dim]` f32 on the device, as
    /// the model's projections leave them) to `layer`.
    ///
    /// # Errors
    /// [`KernelError::Shape`] for a layer out of range, `n == 0`, handles smaller than `n`
    /// rows, or a layer that would run ahead of an earlier one (layers append in order
    /// within a forward).
    pub fn append(
        &mut self,
        layer: usize,
        k: &Handle,
        v: &Handle,
        n: usize,
    ) -> Result<(), KernelError> {
        let d = self.dims;
        let floats = n * d.n_kv_heads * d.head_dim * 4;
        let ahead = |l: usize| l > 0 && self.lens[l] + n > self.lens[l - 1];
        if layer >= d.n_layers || n == 0 || ahead(layer) || k.size() < floats as u64 {
            return Err(KernelError::Shape(format!(
                "append of {n} tokens ({} / {} bytes) to layer {layer} of {:?}",
                k.size(),
                v.size(),
                self.lens
            )));
        }
        if v.size() < floats as u64 {
            return Err(KernelError::Shape(format!(
                "values of {} bytes for {n} tokens",
                v.size()
            )));
        }
        let start = self.lens[layer];
        self.reserve(start + n);
        let slots: Vec<u32> = (start..start + n).map(|t| self.slot(t)).collect();
        let [kp, vp] = &self.layers[layer];
        self.write(k, kp, &slots);
        self.write(v, vp, &slots);
        self.lens[layer] = start + n;
        self.pack_filled(layer, start, start + n);
        Ok(())
    }

    /// Packs `layer`'s pages that tokens `from..to` completed (past the sinks), taking a
    /// packed page for each the first time a layer gets there.
    fn pack_filled(&mut self, layer: usize, from: usize, to: usize) {
        let ps = self.dims.page_size;
        let Some(sinks) = self.quant.as_ref().map(|q| q.cfg.sinks) else {
            return;
        };
        for p in from / ps..to / ps {
            if p * ps < sinks {
                continue;
            }
            let q = self.quant.as_mut().expect("checked above");
            let qp = match self.table[p].packed {
                Some(qp) => qp,
                None => {
                    let qp = q.alloc(&self.client, &self.dims);
                    self.table[p].packed = Some(qp);
                    qp
                }
            };
            self.pack(layer, p, qp);
        }
    }

    /// Packs logical page `p` of `layer` (which holds a full-precision copy) into `qp`.
    fn pack(&self, layer: usize, p: usize, qp: u32) {
        let q = self.quant.as_ref().expect("packing needs quantization");
        let full = self.table[p]
            .full
            .expect("packed from its full-precision copy");
        let floats = self.capacity * self.dims.page_floats();
        q.pack(
            &self.client,
            &self.dims,
            layer,
            (&self.layers[layer], floats),
            full,
            qp,
        );
    }

    /// Frees the full-precision copies every later query reads as codes: packed pages whose
    /// last token is older than the window at the current length.
    fn release_old(&mut self) {
        let (ps, len) = (self.dims.page_size, self.len());
        let Some(window) = self.quant.as_ref().map(|q| q.cfg.window) else {
            return;
        };
        for (p, r) in self.table.iter_mut().enumerate() {
            if r.packed.is_some()
                && (p + 1) * ps - 1 + window < len
                && let Some(f) = r.full.take()
            {
                self.free.push(f);
            }
        }
    }

    /// Tree attention of `layer`'s last `parents.len()` tokens (just appended) over the
    /// layer's cache: `q` is `[n_heads][n_q][head_dim]` f32 on the device, `parents[i]` the
    /// row row `i` hangs from (`-1`: it follows the cached tokens), `positions[i]` its
    /// position. Returns the output's handle, `[n_heads][n_q][head_dim]`.
    ///
    /// # Errors
    /// [`KernelError::Shape`] for a layer out of range, a tree longer than the layer, parents
    /// that are not a tree, `positions` of another length, `n_heads` not a multiple of the
    /// KV heads, or a `q` smaller than its rows.
    pub fn attention(
        &mut self,
        layer: usize,
        q: Handle,
        n_heads: usize,
        parents: &[i32],
        positions: &[u32],
    ) -> Result<Handle, KernelError> {
        let n_q = parents.len();
        let len = self.layer_len(layer);
        let d = self.dims;
        if layer >= d.n_layers
            || n_q == 0
            || n_q > len
            || positions.len() != n_q
            || n_heads == 0
            || !n_heads.is_multiple_of(d.n_kv_heads)
            || q.size() < (n_heads * n_q * d.head_dim * 4) as u64
        {
            return Err(KernelError::Shape(format!(
                "attention of {n_q} rows ({} positions, {n_heads} heads, {} bytes of queries) \
                 at layer {layer} holding {len} tokens",
                positions.len(),
                q.size()
            )));
        }
        check_parents(parents)?;
        let pages = len.div_ceil(d.page_size);
        let stale = self.step.as_ref().is_none_or(|s| {
            s.key.0[..] != self.table[..pages] || s.key.1 != parents || s.key.2 != positions
        });
        if stale {
            let table = self.table[..pages].to_vec();
            let index = |p: Option<u32>| p.map_or(-1, |p| p as i32);
            let full: Vec<i32> = table.iter().map(|r| index(r.full)).collect();
            let packed: Vec<i32> = table.iter().map(|r| index(r.packed)).collect();
            let c = &self.client;
            self.step = Some(Step {
                full: c.create_from_slice(i32::as_bytes(&full)),
                packed: c.create_from_slice(i32::as_bytes(&packed)),
                tree: TreeOperands::upload(c, parents, positions),
                key: (table, parents.to_vec(), positions.to_vec()),
            });
        }
        let step = self.step.as_ref().expect("set above");
        let [k, v] = &self.layers[layer];
        let (codes, lens, shape) = match &self.quant {
            Some(q) => {
                let (codes, lens) = q.operands(&d, layer);
                (codes, lens, q.shape())
            }
            None => (self.no_codes.clone(), [1; 6], CodeShape::default()),
        };
        let kv = KvOperands {
            k,
            v,
            floats: self.capacity * d.page_floats(),
            full: &step.full,
            packed: &step.packed,
            pages,
            codes: &codes,
            lens,
            shape,
        };
        let dims = PagedDims {
            n_heads,
            n_kv_heads: d.n_kv_heads,
            head_dim: d.head_dim,
            page_size: d.page_size,
            cached: len - n_q,
            n_q,
        };
        Ok(launch_tree_attention(
            &self.client,
            &kv,
            q,
            &step.tree,
            dims,
            None,
        ))
    }

    /// Drops every token at position `len` and later in every layer (rollback); whole pages
    /// go back to the pool, vacated slots of kept pages are zeroed (as every slot past the
    /// length is). No-op past the end.
    pub fn truncate(&mut self, len: usize) {
        let d = self.dims;
        let keep = len.div_ceil(d.page_size);
        let longest = self.lens.iter().copied().max().unwrap_or(0);
        if len >= longest {
            self.release_old();
            return;
        }
        // The page `len` falls in becomes partial: it needs its full-precision copy back
        // (expanded from its codes if it was freed) and loses its codes.
        if !len.is_multiple_of(d.page_size) && keep <= self.table.len() {
            let p = keep - 1;
            if self.table[p].full.is_none() {
                let page = self.take_page();
                let qp = self.table[p]
                    .packed
                    .expect("a page holds at least one copy");
                let q = self.quant.as_ref().expect("codes need quantization");
                let floats = self.capacity * d.page_floats();
                for layer in 0..d.n_layers {
                    q.unpack(
                        &self.client,
                        &d,
                        layer,
                        qp,
                        (&self.layers[layer], floats),
                        page,
                    );
                }
                self.table[p].full = Some(page);
            }
            if let Some(qp) = self.table[p].packed.take() {
                self.release_packed(qp);
            }
        }
        // Vacated slots inside the last kept page.
        let vacated: Vec<u32> = (len..longest.min(keep * d.page_size))
            .map(|t| self.slot(t))
            .collect();
        self.zero(&vacated);
        let dropped: Vec<PageRef> = self.table.drain(keep.min(self.table.len())..).collect();
        for r in dropped.into_iter().rev() {
            self.free.extend(r.full);
            if let Some(qp) = r.packed {
                self.release_packed(qp);
            }
        }
        for l in &mut self.lens {
            *l = (*l).min(len);
        }
        self.release_old();
    }

    /// Returns packed page `qp` to its pool.
    fn release_packed(&mut self, qp: u32) {
        self.quant
            .as_mut()
            .expect("packed pages exist only with quantization")
            .release(qp);
    }

    /// Commit after tree verification: keeps tokens `0..prefix`, then tokens `rows`
    /// (increasing, each `>= prefix`) moved down to follow them, in every layer; drops the
    /// rest.
    ///
    /// # Panics
    /// If `rows` is not increasing, starts below `prefix`, or reaches past the cache
    /// (internal invariant: rows come from the tree just appended).
    pub fn retain(&mut self, prefix: usize, rows: &[usize]) {
        check_retain(prefix, rows, self.len());
        let moved: Vec<(u32, u32)> = rows
            .iter()
            .enumerate()
            .filter(|&(i, &r)| r != prefix + i)
            .map(|(i, &r)| (self.slot(r), self.slot(prefix + i)))
            .collect();
        let moved_any = !moved.is_empty();
        if moved_any {
            let (from, to): (Vec<u32>, Vec<u32>) = moved.into_iter().unzip();
            // Through a scratch copy: a row's destination may be another row's source.
            for [k, v] in &self.layers {
                for pages in [k, v] {
                    let rows = self.read(pages, &from);
                    self.write(&rows, pages, &to);
                }
            }
        }
        // Complete pages the moves rewrote are packed again from their new contents
        // (before the window can free their full-precision copies).
        let len = prefix + rows.len();
        if moved_any {
            let ps = self.dims.page_size;
            for p in prefix / ps..len / ps {
                if let Some(qp) = self.table[p].packed {
                    for layer in 0..self.dims.n_layers {
                        self.pack(layer, p, qp);
                    }
                }
            }
        }
        self.truncate(len);
    }

    /// Removes everything (pages back to the pool).
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Keys and values of `layer`'s tokens as a query at the current length reads them
    /// (codes expanded where it reads codes), read back to the host (`[kv_head][token]
    /// [head_dim]` each); for tests and inspection.
    pub fn read_layer(&self, layer: usize) -> (Vec<f32>, Vec<f32>) {
        self.read_layer_at(layer, self.len())
    }

    /// [`DevicePagedKv::read_layer`] for a query at position `pos`.
    pub fn read_layer_at(&self, layer: usize, pos: usize) -> (Vec<f32>, Vec<f32>) {
        let d = self.dims;
        let (ps, kvh, hd) = (d.page_size, d.n_kv_heads, d.head_dim);
        let len = self.layer_len(layer);
        if len == 0 || layer >= self.layers.len() {
            return (Vec::new(), Vec::new());
        }
        // Per logical page, keys and values in page layout `[slot][kv_head][head_dim]`.
        let window = self.quant.as_ref().map(|q| q.cfg.window);
        let mut pages: Vec<[Vec<f32>; 2]> = Vec::new();
        for (p, r) in self.table.iter().enumerate().take(len.div_ceil(ps)) {
            let codes = r.packed.is_some()
                && (r.full.is_none() || window.is_some_and(|w| (p + 1) * ps - 1 + w < pos));
            pages.push(if codes {
                let q = self.quant.as_ref().expect("codes need quantization");
                let tmp = [0, 1].map(|_| self.client.empty(d.page_floats() * 4));
                let qp = r.packed.expect("checked");
                q.unpack(&self.client, &d, layer, qp, (&tmp, d.page_floats()), 0);
                tmp.map(|h| f32::from_bytes(&self.client.read_one_unchecked(h)).to_vec())
            } else {
                let f = r.full.expect("a page holds at least one copy") as usize;
                let slots: Vec<u32> = (f * ps..(f + 1) * ps).map(|s| s as u32).collect();
                self.layers[layer].each_ref().map(|h| {
                    let rows = self.read(h, &slots);
                    let rows = f32::from_bytes(&self.client.read_one_unchecked(rows)).to_vec();
                    // `[kv_head][slot][head_dim]` → `[slot][kv_head][head_dim]`.
                    (0..ps)
                        .flat_map(|s| (0..kvh).map(move |g| (g * ps + s) * hd))
                        .flat_map(|at| rows[at..at + hd].to_vec())
                        .collect()
                })
            });
        }
        let side = |i: usize| -> Vec<f32> {
            (0..kvh)
                .flat_map(|g| {
                    let pages = &pages;
                    (0..len).flat_map(move |t| {
                        let at = ((t % ps) * kvh + g) * hd;
                        pages[t / ps][i][at..at + hd].to_vec()
                    })
                })
                .collect()
        };
        (side(0), side(1))
    }

    /// The full-precision pages in use, read back raw (`[layer][k | v][page in table order]
    /// [slot][kv_head][head_dim]`, pages held only as codes left out), vacated slots
    /// included; for tests of rollback.
    pub fn read_pages(&self) -> Vec<f32> {
        let mut out = Vec::new();
        let d = self.dims;
        let ps = d.page_size as u32;
        let slots: Vec<u32> = self
            .table
            .iter()
            .filter_map(|r| r.full)
            .flat_map(|p| (0..ps).map(move |s| p * ps + s))
            .collect();
        if slots.is_empty() {
            return out;
        }
        for kv in &self.layers {
            for h in kv {
                let rows = self.read(h, &slots);
                let rows = f32::from_bytes(&self.client.read_one_unchecked(rows)).to_vec();
                // `[kv_head][slot][head_dim]` → `[slot][kv_head][head_dim]`.
                let n = slots.len();
                for s in 0..n {
                    for g in 0..d.n_kv_heads {
                        let at = (g * n + s) * d.head_dim;
                        out.extend_from_slice(&rows[at..at + d.head_dim]);
                    }
                }
            }
        }
        out
    }

    /// An independent copy (its own device storage; the pool and table as they are).
    pub fn duplicate(&self) -> Self {
        Self {
            client: self.client.clone(),
            dims: self.dims,
            layers: self
                .layers
                .iter()
                .map(|kv| {
                    kv.each_ref()
                        .map(|h| self.copied(h, self.capacity, self.capacity))
                })
                .collect(),
            capacity: self.capacity,
            table: self.table.clone(),
            free: self.free.clone(),
            lens: self.lens.clone(),
            no_codes: self.no_codes.clone(),
            quant: self
                .quant
                .as_ref()
                .map(|q| q.duplicate(&self.client, &self.dims)),
            step: None,
        }
    }
}
