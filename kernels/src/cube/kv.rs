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
//! ```
//! use arbor_kernels::cube::kv::{DeviceKvDims, DevicePagedKv};
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
    CodeShape, KvOperands, PagedDims, TreeOperands, check_parents, device_array,
    launch_tree_attention,
};
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

/// Copies page `CUBE_POS_X` of `src` to `dst` (same layout): cube `(page, slot · kv_head)`,
/// unit = channel.
#[cube(launch)]
fn copy_pages(
    src: &Array<f32>,
    dst: &mut Array<f32>,
    #[comptime] rows_per_page: u32,
    #[comptime] head_dim: u32,
) {
    let at = ((CUBE_POS_X * rows_per_page + CUBE_POS_Y) * head_dim + UNIT_POS_X) as usize;
    dst[at] = src[at];
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
    key: (Vec<u32>, Vec<i32>, Vec<u32>),
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
    /// Logical page → stored page.
    table: Vec<u32>,
    /// Stored pages not in the table.
    free: Vec<u32>,
    /// Tokens held per layer (a forward appends layer by layer).
    lens: Vec<usize>,
    /// Placeholders for the kernel's packed-page operands (none here).
    no_codes: [Handle; 6],
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
            step: None,
        })
    }

    /// The cache's geometry.
    pub fn dims(&self) -> DeviceKvDims {
        self.dims
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

    /// Bytes of key/value storage in use: whole pages of every layer, keys and values.
    pub fn bytes(&self) -> usize {
        self.table.len() * self.page_bytes()
    }

    /// Bytes of device memory reserved (pages in use and in the pool).
    pub fn reserved_bytes(&self) -> usize {
        self.capacity * self.page_bytes()
    }

    fn page_bytes(&self) -> usize {
        2 * self.dims.n_layers * self.dims.page_floats() * std::mem::size_of::<f32>()
    }

    /// The stored slot of token `t` (its page must be in the table).
    fn slot(&self, t: usize) -> u32 {
        let ps = self.dims.page_size;
        self.table[t / ps] * ps as u32 + (t % ps) as u32
    }

    /// Makes the table cover `tokens` tokens, taking pages from the pool and growing the
    /// storage (doubling, copied on the device) when the pool is empty.
    fn reserve(&mut self, tokens: usize) {
        let ps = self.dims.page_size;
        let need = tokens.div_ceil(ps);
        let first = self.table.len();
        while self.table.len() < need {
            if self.free.is_empty() {
                self.grow((2 * self.capacity).max(need - self.table.len() + self.capacity));
            }
            let p = self.free.pop().expect("the pool was just grown");
            self.table.push(p);
        }
        // Pages enter the table zeroed (fresh storage is uninitialized, pooled pages hold
        // what they held): slots past the length always read as zeros.
        let slots: Vec<u32> = (first * ps..need * ps).map(|t| self.slot(t)).collect();
        self.zero(&slots);
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
        let d = self.dims;
        let floats = d.page_floats();
        let dst = self.client.empty(capacity.max(1) * floats * 4);
        if pages > 0 {
            // SAFETY: `src` holds at least `pages` pages, `dst` `capacity ≥ pages`; the
            // launch covers exactly `pages · floats` elements.
            unsafe {
                copy_pages::launch::<R>(
                    &self.client,
                    CubeCount::Static(pages as u32, (d.page_size * d.n_kv_heads) as u32, 1),
                    CubeDim::new_1d(d.head_dim as u32),
                    ArrayArg::from_raw_parts(src.clone(), pages * floats),
                    ArrayArg::from_raw_parts(dst.clone(), capacity * floats),
                    (d.page_size * d.n_kv_heads) as u32,
                    d.head_dim as u32,
                );
            }
        }
        dst
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
        Ok(())
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
            let full: Vec<i32> = table.iter().map(|&p| p as i32).collect();
            let c = &self.client;
            self.step = Some(Step {
                full: c.create_from_slice(i32::as_bytes(&full)),
                packed: c.create_from_slice(i32::as_bytes(&vec![-1; pages])),
                tree: TreeOperands::upload(c, parents, positions),
                key: (table, parents.to_vec(), positions.to_vec()),
            });
        }
        let step = self.step.as_ref().expect("set above");
        let [k, v] = &self.layers[layer];
        let kv = KvOperands {
            k,
            v,
            floats: self.capacity * d.page_floats(),
            full: &step.full,
            packed: &step.packed,
            pages,
            codes: &self.no_codes,
            lens: [1; 6],
            shape: CodeShape::default(),
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
        ))
    }

    /// Drops every token at position `len` and later in every layer (rollback); whole pages
    /// go back to the pool, vacated slots of kept pages are zeroed (as every slot past the
    /// length is). No-op past the end.
    pub fn truncate(&mut self, len: usize) {
        let d = self.dims;
        let keep = len.div_ceil(d.page_size);
        let longest = self.lens.iter().copied().max().unwrap_or(0);
        // Vacated slots inside the last kept page.
        let vacated: Vec<u32> = (len..longest.min(keep * d.page_size))
            .map(|t| self.slot(t))
            .collect();
        self.zero(&vacated);
        if self.table.len() > keep {
            self.free.extend(self.table.drain(keep..).rev());
        }
        for l in &mut self.lens {
            *l = (*l).min(len);
        }
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
        if !moved.is_empty() {
            let (from, to): (Vec<u32>, Vec<u32>) = moved.into_iter().unzip();
            // Through a scratch copy: a row's destination may be another row's source.
            for [k, v] in &self.layers {
                for pages in [k, v] {
                    let rows = self.read(pages, &from);
                    self.write(&rows, pages, &to);
                }
            }
        }
        self.truncate(prefix + rows.len());
    }

    /// Removes everything (pages back to the pool).
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Keys and values of `layer`'s tokens, read back to the host (`[kv_head][token]
    /// [head_dim]` each); for tests and inspection.
    pub fn read_layer(&self, layer: usize) -> (Vec<f32>, Vec<f32>) {
        let len = self.layer_len(layer);
        if len == 0 || layer >= self.layers.len() {
            return (Vec::new(), Vec::new());
        }
        let slots: Vec<u32> = (0..len).map(|t| self.slot(t)).collect();
        let [k, v] = &self.layers[layer];
        let host = |h: &Handle| {
            let rows = self.read(h, &slots);
            f32::from_bytes(&self.client.read_one_unchecked(rows)).to_vec()
        };
        (host(k), host(v))
    }

    /// The pages in use, read back raw (`[layer][k | v][page in table order][slot][kv_head]
    /// [head_dim]`), vacated slots included; for tests of rollback.
    pub fn read_pages(&self) -> Vec<f32> {
        let mut out = Vec::new();
        let d = self.dims;
        let slots: Vec<u32> = self
            .table
            .iter()
            .flat_map(|&p| (0..d.page_size as u32).map(move |s| p * d.page_size as u32 + s))
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
            step: None,
        }
    }
}
