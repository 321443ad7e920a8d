//! The attention block on the host, for the CPU fast path with a paged cache: the fused
//! Q/K/V product, RoPE, the cache append, the fused attention and the output projection all
//! work on host rows, with no tensor in between (as tensors, the heads' transposes and
//! RoPE's slices cost ~5% of a tree verification in strided copies). Bit for bit the tensor
//! path's arithmetic: the same products, the same RoPE operations per value, the same
//! attention kernel.

use burn::tensor::{Tensor, backend::Backend};

use super::{Attention, Segment, paged_attention_host};
use crate::proj::{fused_host, host_fusable, host_values, rows_tensor};
use crate::rope::RopeAngles;

impl<B: Backend> Attention<B> {
    /// The block on host rows, or `None` (nothing done) unless every segment has a paged
    /// cache and the projections hold GGUF blocks on the CPU fast path.
    ///
    /// # Shapes
    /// - `x`: `[1, n, hidden]` → `[1, n, n_heads · head_dim]` projected by `wo`
    pub(super) fn forward_host(
        &self,
        x: &Tensor<B, 3>,
        rope: &RopeAngles<B>,
        segments: &mut [Segment<'_, B>],
        layer: usize,
    ) -> Option<Tensor<B, 3>> {
        let [batch, n, _] = x.dims();
        if batch != 1 || !self.host_ready(segments) {
            return None;
        }
        let y = self.forward_rows(&host_values(x.clone()), n, rope, segments, layer);
        Some(rows_tensor(y, 1, n, &x.device()))
    }

    /// Whether [`Attention::forward_rows`] runs: every segment has a paged cache and the
    /// projections hold GGUF blocks on the CPU fast path.
    pub(super) fn host_ready(&self, segments: &[Segment<'_, B>]) -> bool {
        segments.iter().all(|s| s.cache.paged_store().is_some())
            && host_fusable(&[&self.wq, &self.wk, &self.wv])
            && self.wo.has_host_path()
    }

    /// The block on `n` host rows `xs` (`[n][hidden]`), where [`Attention::host_ready`].
    ///
    /// # Panics
    /// Where not [`Attention::host_ready`] (internal invariant: callers check).
    pub(super) fn forward_rows(
        &self,
        xs: &[f32],
        n: usize,
        rope: &RopeAngles<B>,
        segments: &mut [Segment<'_, B>],
        layer: usize,
    ) -> Vec<f32> {
        let [mut q, mut k, v]: [Vec<f32>; 3] = fused_host(&[&self.wq, &self.wk, &self.wv], xs, n)
            .expect("checked above")
            .try_into()
            .expect("three products");
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        rope.apply_host(&mut q, 0, h, hd);
        rope.apply_host(&mut k, 0, kvh, hd);
        let mut out = vec![0.0f32; n * h * hd];
        let mut start = 0;
        for seg in segments.iter_mut() {
            let cache = seg.cache.paged_store_mut().expect("checked above");
            let rows = (start, seg.len);
            let o = paged_attention_host(
                cache,
                layer,
                (
                    &head_major(&q, rows, h, hd),
                    &head_major(&k, rows, kvh, hd),
                    &head_major(&v, rows, kvh, hd),
                ),
                (h, kvh, hd),
                seg.mask_host,
                seg.positions,
            );
            for (head, rows_out) in o.chunks_exact(seg.len * hd).enumerate() {
                for (t, row) in rows_out.chunks_exact(hd).enumerate() {
                    let at = ((start + t) * h + head) * hd;
                    out[at..at + hd].copy_from_slice(row);
                }
            }
            start += seg.len;
        }
        self.wo.forward_host(&out, n).expect("checked above")
    }
}

/// Rows `start..start + len` of token-major `[tokens][heads][head_dim]` as head-major
/// `[heads][len][head_dim]`.
fn head_major(x: &[f32], (start, len): (usize, usize), heads: usize, hd: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; heads * len * hd];
    for t in 0..len {
        for head in 0..heads {
            let src = ((start + t) * heads + head) * hd;
            let dst = (head * len + t) * hd;
            out[dst..dst + hd].copy_from_slice(&x[src..src + hd]);
        }
    }
    out
}
