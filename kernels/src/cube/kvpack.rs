//! Packing KV pages on the device, into the format [`super::attention`]'s kernel reads
//! (`u32` code words, little end first, and f32 grids): keys per channel over the page's
//! tokens (KIVI, Liu et al. 2024), values per token in channel groups after a fixed channel
//! permutation, each group's range clipped by its ratio around its middle (SKVQ, Duanmu et
//! al. 2024). Codes round to nearest on the grid `min + scale · code`, `scale = (hi − lo) /
//! (2^bits − 1)`; grids stay f32 (the CPU cache stores f16 grids, so the two backends' codes
//! may differ by a step where a value sits at a rounding edge). And back: a packed page
//! expanded into a full-precision one.
//!
//! Each kernel is launched per page and layer by [`super::kv::DevicePagedKv`].

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::attention::{CodeShape, device_array, load};
use super::kv::DeviceKvDims;
use crate::KernelError;

/// Per-channel key grids of one page (`[slot][row]`, `row = n_kv_heads · head_dim`): unit
/// per channel; writes `grids[2·qp·row + ch]` (scale) and `grids[(2·qp + 1)·row + ch]` (min).
#[cube(launch)]
pub(crate) fn key_grids(
    pages: &Array<f32>,
    grids: &mut Array<f32>,
    page: u32,
    qp: u32,
    #[comptime] row: u32,
    #[comptime] page_size: u32,
    #[comptime] bits: u32,
) {
    let ch = ABSOLUTE_POS;
    let row = comptime!(row as usize);
    if ch < row {
        let ps = comptime!(page_size as usize);
        let base = page as usize * ps * row + ch;
        let mut lo = pages[base];
        let mut hi = lo;
        for s in 1..ps {
            let x = pages[base + s * row];
            lo = min(lo, x);
            hi = max(hi, x);
        }
        let levels = comptime!(((1u32 << bits) - 1) as f32);
        let qp = qp as usize;
        grids[2 * qp * row + ch] = (hi - lo) / levels;
        grids[(2 * qp + 1) * row + ch] = lo;
    }
}

/// The code of `x` on the grid `(scale, min)`.
#[cube]
fn code(x: f32, scale: f32, m: f32, #[comptime] bits: u32) -> u32 {
    let levels = comptime!(((1u32 << bits) - 1) as f32);
    let mut q = 0.0f32;
    if scale > 0.0 {
        q = clamp(((x - m) / scale + 0.5).floor(), 0.0, levels);
    }
    u32::cast_from(q)
}

/// Per-channel key codes of one page: unit per code word (`[slot][row · bits / 32]`).
#[cube(launch)]
pub(crate) fn key_codes(
    pages: &Array<f32>,
    grids: &Array<f32>,
    codes: &mut Array<u32>,
    page: u32,
    qp: u32,
    #[comptime] row: u32,
    #[comptime] page_size: u32,
    #[comptime] bits: u32,
) {
    let w = ABSOLUTE_POS;
    let row = comptime!(row as usize);
    let words = comptime!(row * bits as usize / 32);
    let ps = comptime!(page_size as usize);
    if w < ps * words {
        let per = comptime!(32 / bits as usize);
        let slot = w / words;
        let first = (w % words) * per;
        let qp = qp as usize;
        let mut word = 0u32;
        for k in 0..per {
            let ch = first + k;
            let x = pages[(page as usize * ps + slot) * row + ch];
            let q = code(
                x,
                grids[2 * qp * row + ch],
                grids[(2 * qp + 1) * row + ch],
                bits,
            );
            word |= q << (k as u32 * bits);
        }
        codes[qp * ps * words + w] = word;
    }
}

/// Per-token value grids of one page: unit per (row of the page, group); row `rr = slot ·
/// n_kv_heads + g` holds channels `perm[at]` at positions `at`, grouped `group` at a time,
/// each group's range scaled by `clip[group]` around its middle. Writes `[scale, min]` pairs
/// at `2 · ((qp · rows + rr) · groups + gq)`.
#[cube(launch)]
pub(crate) fn value_grids(
    pages: &Array<f32>,
    perm: &Array<u32>,
    clip: &Array<f32>,
    grids: &mut Array<f32>,
    page: u32,
    qp: u32,
    #[comptime] rows: u32,
    #[comptime] head_dim: u32,
    #[comptime] group: u32,
    #[comptime] bits: u32,
) {
    let hd = comptime!(head_dim as usize);
    let gs = comptime!(group as usize);
    let groups = comptime!(head_dim as usize / group as usize);
    let rows = comptime!(rows as usize);
    let idx = ABSOLUTE_POS;
    if idx < rows * groups {
        let rr = idx / groups;
        let gq = idx % groups;
        let base = (page as usize * rows + rr) * hd;
        let mut lo = pages[base + perm[gq * gs] as usize];
        let mut hi = lo;
        for i in 1..gs {
            let x = pages[base + perm[gq * gs + i] as usize];
            lo = min(lo, x);
            hi = max(hi, x);
        }
        let mid = 0.5 * (lo + hi);
        let half = 0.5 * (hi - lo) * clip[gq];
        let levels = comptime!(((1u32 << bits) - 1) as f32);
        let gi = (qp as usize * rows + rr) * groups + gq;
        grids[2 * gi] = 2.0 * half / levels;
        grids[2 * gi + 1] = mid - half;
    }
}

/// Per-token value codes of one page: unit per code word (`[row][head_dim · bits / 32]`,
/// positions in permuted order).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn value_codes(
    pages: &Array<f32>,
    perm: &Array<u32>,
    grids: &Array<f32>,
    codes: &mut Array<u32>,
    page: u32,
    qp: u32,
    #[comptime] rows: u32,
    #[comptime] head_dim: u32,
    #[comptime] group: u32,
    #[comptime] bits: u32,
) {
    let hd = comptime!(head_dim as usize);
    let words = comptime!(head_dim as usize * bits as usize / 32);
    let rows = comptime!(rows as usize);
    let w = ABSOLUTE_POS;
    if w < rows * words {
        let per = comptime!(32 / bits as usize);
        let rr = w / words;
        let first = (w % words) * per;
        let r = qp as usize * rows + rr;
        let mut word = 0u32;
        for k in 0..per {
            let at = first + k;
            let x = pages[(page as usize * rows + rr) * hd + perm[at] as usize];
            let gi =
                r * comptime!(head_dim as usize / group as usize) + at / comptime!(group as usize);
            word |= code(x, grids[2 * gi], grids[2 * gi + 1], bits) << (k as u32 * bits);
        }
        codes[r * words + (w % words)] = word;
    }
}

/// Expands packed page `qp` into full-precision page `page` (keys or values, as `per_channel`
/// says): cube per (slot, KV head), unit per channel.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn unpack_page(
    codes: &Array<u32>,
    grids: &Array<f32>,
    inv: &Array<u32>,
    pages: &mut Array<f32>,
    page: u32,
    qp: u32,
    #[comptime] per_channel: bool,
    #[comptime] bits: u32,
    #[comptime] group: u32,
    #[comptime] n_kv_heads: u32,
    #[comptime] head_dim: u32,
    #[comptime] page_size: u32,
) {
    let slot = CUBE_POS_X as usize;
    let g = CUBE_POS_Y as usize;
    let c = UNIT_POS_X as usize;
    let ps = comptime!(page_size as usize);
    let kvh = comptime!(n_kv_heads as usize);
    let hd = comptime!(head_dim as usize);
    let j = qp as usize * ps + slot;
    let x = load(
        pages,
        codes,
        grids,
        inv,
        -1 - qp as i32,
        j,
        g,
        c,
        per_channel,
        bits,
        group,
        n_kv_heads,
        head_dim,
        page_size,
    );
    pages[((page as usize * ps + slot) * kvh + g) * hd + c] = x;
}

/// Copies `blocks` blocks of `block` elements: cube per block, 256 units striding over it.
#[cube(launch)]
fn copy_blocks<E: Numeric>(src: &Array<E>, dst: &mut Array<E>, #[comptime] block: u32) {
    let base = CUBE_POS_X as usize * comptime!(block as usize);
    let mut i = UNIT_POS_X as usize;
    while i < comptime!(block as usize) {
        dst[base + i] = src[base + i];
        i += 256;
    }
}

/// A new buffer of `capacity` blocks of `block` 32-bit words (codes, or f32 bit patterns)
/// holding the first `blocks` blocks of `src` (growth and copies of device storage).
pub(crate) fn copied_blocks<R: Runtime>(
    client: &ComputeClient<R>,
    src: &Handle,
    (blocks, capacity): (usize, usize),
    block: usize,
) -> Handle {
    let dst = client.empty(capacity.max(1) * block * 4);
    if blocks > 0 {
        // SAFETY: `src` holds at least `blocks` blocks, `dst` `capacity ≥ blocks`; the launch
        // covers exactly `blocks · block` words.
        unsafe {
            copy_blocks::launch::<u32, R>(
                client,
                CubeCount::Static(blocks as u32, 1, 1),
                CubeDim::new_1d(256),
                ArrayArg::from_raw_parts(src.clone(), blocks * block),
                ArrayArg::from_raw_parts(dst.clone(), capacity * block),
                block as u32,
            );
        }
    }
    dst
}

/// One layer's SKVQ value calibration: the channel permutation and per-group clip ratios.
pub type ValueCalibration = (Vec<usize>, Vec<f32>);

/// KV quantization on the device: the CPU cache's [`QuantConfig`](../../arbor_cache) with
/// keys per channel (KIVI) — bits, value group, full-precision sinks and window — and
/// optionally each layer's SKVQ value calibration (channel permutation, per-group clip).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceQuant {
    /// Bits per code: 2, 4 or 8.
    pub bits: u32,
    /// Channels per value group (divides `head_dim`).
    pub group: usize,
    /// Full-precision sink tokens: pages holding any of them are never packed.
    pub sinks: usize,
    /// Full-precision recent tokens: a query at `pos` reads a page's codes once its last
    /// token `t` has `t + window < pos`.
    pub window: usize,
    /// Per layer, the values' channel permutation and per-group clip ratios (`None`:
    /// identity and 1).
    pub values: Option<Vec<ValueCalibration>>,
}

impl DeviceQuant {
    /// Whether the device kernels take this quantization for a cache of `d`.
    ///
    /// # Errors
    /// [`KernelError::Shape`] for bits other than 2, 4, 8, a group that does not divide
    /// `head_dim`, `head_dim · bits` not a multiple of 32, or a calibration of the wrong shape.
    pub fn check(&self, d: &DeviceKvDims) -> Result<(), KernelError> {
        self.value_calibration(d).map(|_| ())
    }

    /// Each layer's value permutation and clip ratios (identity and 1 without a
    /// calibration), after the checks of [`DeviceQuant::check`].
    fn value_calibration(&self, d: &DeviceKvDims) -> Result<Vec<ValueCalibration>, KernelError> {
        let hd = d.head_dim;
        let bad = |m: String| Err(KernelError::Shape(m));
        if ![2, 4, 8].contains(&self.bits)
            || self.group == 0
            || !hd.is_multiple_of(self.group)
            || !(hd * self.bits as usize).is_multiple_of(32)
        {
            return bad(format!(
                "device KV quantization of {} bits in groups of {} for heads of {hd}",
                self.bits, self.group
            ));
        }
        let groups = hd / self.group;
        let layers = match &self.values {
            None => vec![((0..hd).collect(), vec![1.0; groups]); d.n_layers],
            Some(v) if v.len() == d.n_layers => v.clone(),
            Some(v) => return bad(format!("{} calibrated layers for {}", v.len(), d.n_layers)),
        };
        for (layer, (perm, clip)) in layers.iter().enumerate() {
            let mut seen = vec![false; hd];
            let is_perm = perm.len() == hd
                && perm
                    .iter()
                    .all(|&c| c < hd && !std::mem::replace(&mut seen[c], true));
            if !is_perm || clip.len() != groups || !clip.iter().all(|c| c.is_finite() && *c > 0.0) {
                return bad(format!(
                    "layer {layer}: a value calibration of {} channels and {} clip ratios",
                    perm.len(),
                    clip.len()
                ));
            }
        }
        Ok(layers)
    }
}

/// Packed pages of every layer on the device, in the attention kernel's format, with their
/// own pool and growth.
pub(crate) struct PackedStore {
    pub cfg: DeviceQuant,
    /// Per layer: value permutation, its inverse, clip ratios.
    perms: Vec<[Handle; 3]>,
    /// Per layer: key codes, key grids, value codes, value grids.
    bufs: Vec<[Handle; 4]>,
    /// Placeholder for the per-token key permutation (keys are per channel here).
    no_inv: Handle,
    capacity: usize,
    free: Vec<u32>,
    /// Packed pages in use.
    pub used: usize,
}

impl PackedStore {
    /// An empty store for `d` packing with `cfg`.
    ///
    /// # Errors
    /// [`KernelError::Shape`] for bits other than 2, 4, 8, a group that does not divide
    /// `head_dim`, `head_dim · bits` not a multiple of 32, or a calibration of the wrong shape.
    pub fn new<R: Runtime>(
        client: &ComputeClient<R>,
        d: DeviceKvDims,
        cfg: DeviceQuant,
    ) -> Result<Self, KernelError> {
        let hd = d.head_dim;
        let mut perms = Vec::with_capacity(d.n_layers);
        for (perm, clip) in cfg.value_calibration(&d)? {
            let mut inv = vec![0u32; hd];
            for (i, &c) in perm.iter().enumerate() {
                inv[c] = i as u32;
            }
            let perm: Vec<u32> = perm.iter().map(|&c| c as u32).collect();
            perms.push([
                client.create_from_slice(u32::as_bytes(&perm)),
                client.create_from_slice(u32::as_bytes(&inv)),
                client.create_from_slice(f32::as_bytes(&clip)),
            ]);
        }
        Ok(Self {
            cfg,
            perms,
            bufs: Vec::new(),
            no_inv: device_array(client, &[0u32]).0,
            capacity: 0,
            free: Vec::new(),
            used: 0,
        })
    }

    /// Elements per packed page of key codes, key grids, value codes, value grids.
    fn sizes(&self, d: &DeviceKvDims) -> [usize; 4] {
        let words = d.page_size * d.n_kv_heads * d.head_dim * self.cfg.bits as usize / 32;
        let row = d.n_kv_heads * d.head_dim;
        let groups = d.page_size * d.n_kv_heads * (d.head_dim / self.cfg.group);
        [words, 2 * row, words, 2 * groups]
    }

    /// Bytes of the packed pages in use (every layer).
    pub fn bytes(&self, d: &DeviceKvDims) -> usize {
        self.used * self.sizes(d).iter().sum::<usize>() * 4 * d.n_layers
    }

    /// Bytes of device memory reserved for packed pages.
    pub fn reserved_bytes(&self, d: &DeviceKvDims) -> usize {
        self.capacity * self.sizes(d).iter().sum::<usize>() * 4 * d.n_layers
    }

    /// A packed page index, growing the storage (doubling, copied on the device) when the
    /// pool is empty.
    pub fn alloc<R: Runtime>(&mut self, client: &ComputeClient<R>, d: &DeviceKvDims) -> u32 {
        if self.free.is_empty() {
            let (old, cap) = (self.capacity, (2 * self.capacity).max(1));
            let sizes = self.sizes(d);
            let grown = |h: Option<&Handle>, size: usize| match h {
                Some(h) => copied_blocks(client, h, (old, cap), size),
                None => client.empty(cap * size * 4),
            };
            self.bufs = (0..d.n_layers)
                .map(|l| std::array::from_fn(|i| grown(self.bufs.get(l).map(|b| &b[i]), sizes[i])))
                .collect();
            self.free.extend((old..cap).rev().map(|p| p as u32));
            self.capacity = cap;
        }
        self.used += 1;
        self.free.pop().expect("the pool was just grown")
    }

    /// Returns packed page `qp` to the pool.
    pub fn release(&mut self, qp: u32) {
        self.used -= 1;
        self.free.push(qp);
    }

    /// Packs full-precision page `page` of `layer` (`full`: its keys and values, `floats`
    /// elements each) into packed page `qp`.
    pub fn pack<R: Runtime>(
        &self,
        client: &ComputeClient<R>,
        d: &DeviceKvDims,
        layer: usize,
        (full, floats): (&[Handle; 2], usize),
        page: u32,
        qp: u32,
    ) {
        let [kc, kg, vc, vg] = &self.bufs[layer];
        let [perm, _, clip] = &self.perms[layer];
        let s = self.sizes(d);
        let n = self.capacity;
        let (bits, group) = (self.cfg.bits, self.cfg.group as u32);
        let row = (d.n_kv_heads * d.head_dim) as u32;
        let rows = (d.page_size * d.n_kv_heads) as u32;
        let count = |units: usize| CubeCount::Static(units.div_ceil(256) as u32, 1, 1);
        // SAFETY: each handle holds the `len` elements given with it (callers' sizes).
        let arr = |h: &Handle, len: usize| unsafe { ArrayArg::from_raw_parts(h.clone(), len) };
        let groups = d.page_size * d.n_kv_heads * (d.head_dim / self.cfg.group);
        // `full` holds `floats ≥ (page + 1) · page floats` elements, the packed buffers
        // `capacity > qp` pages of `sizes()`; every unit checks its index.
        {
            key_grids::launch::<R>(
                client,
                count(row as usize),
                CubeDim::new_1d(256),
                arr(&full[0], floats),
                arr(kg, n * s[1]),
                page,
                qp,
                row,
                d.page_size as u32,
                bits,
            );
            key_codes::launch::<R>(
                client,
                count(s[0]),
                CubeDim::new_1d(256),
                arr(&full[0], floats),
                arr(kg, n * s[1]),
                arr(kc, n * s[0]),
                page,
                qp,
                row,
                d.page_size as u32,
                bits,
            );
            value_grids::launch::<R>(
                client,
                count(groups),
                CubeDim::new_1d(256),
                arr(&full[1], floats),
                arr(perm, d.head_dim),
                arr(clip, d.head_dim / self.cfg.group),
                arr(vg, n * s[3]),
                page,
                qp,
                rows,
                d.head_dim as u32,
                group,
                bits,
            );
            value_codes::launch::<R>(
                client,
                count(s[2]),
                CubeDim::new_1d(256),
                arr(&full[1], floats),
                arr(perm, d.head_dim),
                arr(vg, n * s[3]),
                arr(vc, n * s[2]),
                page,
                qp,
                rows,
                d.head_dim as u32,
                group,
                bits,
            );
        }
    }

    /// Expands packed page `qp` of `layer` into full-precision page `page` of `full`.
    pub fn unpack<R: Runtime>(
        &self,
        client: &ComputeClient<R>,
        d: &DeviceKvDims,
        layer: usize,
        qp: u32,
        (full, floats): (&[Handle; 2], usize),
        page: u32,
    ) {
        let [kc, kg, vc, vg] = &self.bufs[layer];
        let [_, inv, _] = &self.perms[layer];
        let s = self.sizes(d);
        let n = self.capacity;
        // SAFETY: each handle holds the `len` elements given with it (callers' sizes).
        let arr = |h: &Handle, len: usize| unsafe { ArrayArg::from_raw_parts(h.clone(), len) };
        for (values, codes, grids, inv, inv_len) in [
            (false, kc, (kg, s[1]), &self.no_inv, 1),
            (true, vc, (vg, s[3]), inv, d.head_dim),
        ] {
            // As `pack`; the cube covers one page's slots, heads and channels.
            {
                unpack_page::launch::<R>(
                    client,
                    CubeCount::Static(d.page_size as u32, d.n_kv_heads as u32, 1),
                    CubeDim::new_1d(d.head_dim as u32),
                    arr(codes, n * s[0]),
                    arr(grids.0, n * grids.1),
                    arr(inv, inv_len),
                    arr(&full[usize::from(values)], floats),
                    page,
                    qp,
                    !values,
                    self.cfg.bits,
                    self.cfg.group as u32,
                    d.n_kv_heads as u32,
                    d.head_dim as u32,
                    d.page_size as u32,
                );
            }
        }
    }

    /// The attention kernel's packed operands for `layer` (key codes, key grids, key
    /// inverse permutation, value codes, value grids, value inverse permutation) with their
    /// element counts, and its code shape.
    pub fn operands(&self, d: &DeviceKvDims, layer: usize) -> ([Handle; 6], [usize; 6]) {
        let s = self.sizes(d);
        let n = self.capacity;
        let one = self.no_inv.clone();
        match self.bufs.get(layer) {
            Some([kc, kg, vc, vg]) => (
                [
                    kc.clone(),
                    kg.clone(),
                    one,
                    vc.clone(),
                    vg.clone(),
                    self.perms[layer][1].clone(),
                ],
                [n * s[0], n * s[1], 1, n * s[2], n * s[3], d.head_dim],
            ),
            None => (std::array::from_fn(|_| one.clone()), [1; 6]),
        }
    }

    /// The kernel's compile-time description of these codes.
    pub fn shape(&self) -> CodeShape {
        CodeShape {
            bits: self.cfg.bits,
            keys_per_channel: true,
            k_group: 0,
            v_group: self.cfg.group,
            window: self.cfg.window,
        }
    }

    /// An independent copy (its own device buffers).
    pub fn duplicate<R: Runtime>(&self, client: &ComputeClient<R>, d: &DeviceKvDims) -> Self {
        let sizes = self.sizes(d);
        let n = self.capacity;
        let copy = |h: &Handle, size: usize| copied_blocks(client, h, (n, n), size);
        Self {
            cfg: self.cfg.clone(),
            perms: self.perms.clone(),
            bufs: self
                .bufs
                .iter()
                .map(|b| std::array::from_fn(|i| copy(&b[i], sizes[i])))
                .collect(),
            no_inv: self.no_inv.clone(),
            capacity: self.capacity,
            free: self.free.clone(),
            used: self.used,
        }
    }
}
