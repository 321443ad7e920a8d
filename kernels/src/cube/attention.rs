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

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::KernelError;

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

#[cube]
fn visible(j: usize, row: usize, cached: usize, parents: &Array<i32>) -> bool {
    let mut seen = j < cached;
    if !seen {
        let target = (j - cached) as i32;
        let mut node = row as i32;
        while node >= 0 {
            if node == target {
                seen = true;
            }
            node = parents[node as usize];
        }
    }
    seen
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn paged_tree_attention(
    q: &Array<f32>,
    k_pages: &Array<f32>,
    v_pages: &Array<f32>,
    table: &Array<u32>,
    parents: &Array<i32>,
    out: &mut Array<f32>,
    cached: u32,
    n_q: u32,
    scale: f32,
    #[comptime] group: u32,
    #[comptime] n_kv_heads: u32,
    #[comptime] head_dim: u32,
    #[comptime] page_size: u32,
) {
    let row = CUBE_POS_X as usize;
    let h = CUBE_POS_Y as usize;
    let u = UNIT_POS_X as usize;
    let hd = comptime!(head_dim as usize);
    let ps = comptime!(page_size as usize);
    let kvh = comptime!(n_kv_heads as usize);
    let g = h / comptime!(group as usize);
    let cached = cached as usize;
    let n_q = n_q as usize;
    let n_kv = cached + n_q;
    let mut qs = SharedMemory::<f32>::new(hd);
    let mut scores = SharedMemory::<f32>::new(hd);
    qs[u] = q[(h * n_q + row) * hd + u];
    sync_cube();
    // Scores of keys a row cannot see (WGSL has no infinity literal).
    let hidden = f32::new(-1.0e30);
    let mut run_max = hidden;
    let mut sum = 0.0f32;
    let mut acc = 0.0f32;
    let mut t0 = 0usize;
    while t0 < n_kv {
        let j = t0 + u;
        let mut s = hidden;
        if j < n_kv && visible(j, row, cached, parents) {
            let at = ((table[j / ps] as usize * ps + j % ps) * kvh + g) * hd;
            let mut dot = 0.0f32;
            for c in 0..hd {
                dot += qs[c] * k_pages[at + c];
            }
            s = dot * scale;
        }
        scores[u] = s;
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
                let jj = t0 + t;
                let p = (st - tile_max).exp();
                sum += p;
                let at = ((table[jj / ps] as usize * ps + jj % ps) * kvh + g) * hd;
                acc += p * v_pages[at + u];
            }
        }
        run_max = tile_max;
        sync_cube();
        t0 += hd;
    }
    out[(h * n_q + row) * hd + u] = acc / sum;
}

/// One sequence's paged KV on a CubeCL device, and its tree attention.
pub struct CubePagedKv<R: Runtime> {
    client: ComputeClient<R>,
    k: Handle,
    v: Handle,
    table: Handle,
    floats: usize,
    pages: usize,
    d: PagedDims,
}

impl<R: Runtime> std::fmt::Debug for CubePagedKv<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CubePagedKv")
            .field("pages", &self.pages)
            .field("dims", &self.d)
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> CubePagedKv<R> {
    /// Uploads pages (`[pages][page_size][n_kv_heads][head_dim]` keys and values) and the
    /// sequence's page table (logical page → stored page, covering cached + tree tokens).
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
        let need = (d.cached + d.n_q).div_ceil(d.page_size);
        if table.len() < need || table.iter().any(|&p| p as usize >= pages) {
            return bad(format!("page table {table:?} for {need} pages of {pages}"));
        }
        Ok(Self {
            client: client.clone(),
            k: client.create_from_slice(f32::as_bytes(k)),
            v: client.create_from_slice(f32::as_bytes(v)),
            table: client.create_from_slice(u32::as_bytes(table)),
            floats: k.len(),
            pages: table.len(),
            d,
        })
    }

    /// Attention of the tree rows: `q` is `[n_heads, n_q, head_dim]`, `parents[i]` the tree
    /// row row `i` hangs from (`-1`: it follows the cached tokens; parents come before their
    /// children). Returns `[n_heads, n_q, head_dim]`.
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
        if parents
            .iter()
            .enumerate()
            .any(|(i, &p)| p >= i as i32 || p < -1)
        {
            return Err(KernelError::Shape(format!(
                "parents {parents:?} are not a tree"
            )));
        }
        let c = &self.client;
        let qh = c.create_from_slice(f32::as_bytes(q));
        let ph = c.create_from_slice(i32::as_bytes(parents));
        let out = c.empty(q.len() * 4);
        // SAFETY: every handle holds exactly the elements given with it, and `upload`
        // checked the table against the pages.
        unsafe {
            paged_tree_attention::launch::<R>(
                c,
                CubeCount::Static(d.n_q as u32, d.n_heads as u32, 1),
                CubeDim::new_1d(d.head_dim as u32),
                ArrayArg::from_raw_parts(qh, q.len()),
                ArrayArg::from_raw_parts(self.k.clone(), self.floats),
                ArrayArg::from_raw_parts(self.v.clone(), self.floats),
                ArrayArg::from_raw_parts(self.table.clone(), self.pages),
                ArrayArg::from_raw_parts(ph, d.n_q),
                ArrayArg::from_raw_parts(out.clone(), q.len()),
                d.cached as u32,
                d.n_q as u32,
                (d.head_dim as f32).powf(-0.5),
                (d.n_heads / d.n_kv_heads) as u32,
                d.n_kv_heads as u32,
                d.head_dim as u32,
                d.page_size as u32,
            );
        }
        Ok(f32::from_bytes(&c.read_one_unchecked(out)).to_vec())
    }
}
