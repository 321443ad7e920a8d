//! Arbor's KV cache.
//!
//! [`KvCache`] is the `&mut` handle the model's forward takes. It holds either
//! - dense per-layer tensors on the model's device (any backend; append concatenates), or
//! - [`PagedKv`]: host pages of `page_size` tokens (the CPU backend's store; append copies
//!   into the last page, attention reads pages in place, rollback frees pages and zeroes the
//!   vacated slots so the bytes are as before), or
//! - a [`DeviceStore`]: pages resident on the model's device (the CUDA backend's
//!   [`DevicePagedKv`](arbor_kernels::cube::kv::DevicePagedKv), read in place by the CubeCL
//!   tree attention; the model appends and attends through it, the cache commits and rolls
//!   back).
//!
//! All three support commit of an accepted tree path ([`KvCache::retain`]) and rollback
//! ([`KvCache::truncate`]). The paged store takes a [`KvPolicy`] composing the compression
//! methods: SKVQ/KIVI quantization of old pages ([`compression`]), Quest page selection
//! ([`quest`]) and H2O heavy-hitter eviction ([`h2o`]), each of which can be off.
//!
//! ```
//! use arbor_cache::KvCache;
//! use burn::tensor::Tensor;
//! type B = burn::backend::Flex;
//! let dev = Default::default();
//! let mut cache = KvCache::<B>::new(1);
//! let k = Tensor::<B, 4>::zeros([1, 2, 3, 8], &dev);
//! let (all_k, _all_v) = cache.append(0, k.clone(), k);
//! assert_eq!(all_k.dims(), [1, 2, 3, 8]);
//! assert_eq!(cache.len(), 3);
//! cache.truncate(1);
//! assert_eq!(cache.len(), 1);
//! ```

pub mod compression;
mod device;
mod error;
pub mod h2o;
mod layout;
mod paged;
mod policy;
pub mod quest;

pub use compression::{Calibration, KvCompression, QuantAxis, QuantConfig, StepFormat};
pub use device::DeviceStore;
pub use error::CacheError;
pub use h2o::H2oConfig;
pub use layout::KvLayout;
pub use paged::{LayerView, PagedKv};
pub use policy::KvPolicy;
pub use quest::QuestConfig;

use arbor_kernels::cube::kv::check_retain;
use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

/// Keys and values of one layer.
///
/// # Shapes
/// - `k`, `v`: `[batch, n_kv_heads, len, head_dim]`
#[derive(Debug, Clone)]
struct LayerKv<B: Backend> {
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
}

/// The KV cache of one sequence for every layer of one model.
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<LayerKv<B>>>,
    paged: Option<PagedKv>,
    device: Option<Box<dyn DeviceStore>>,
}

impl<B: Backend> Clone for KvCache<B> {
    /// An independent copy (a device store is copied on its device).
    fn clone(&self) -> Self {
        Self {
            layers: self.layers.clone(),
            paged: self.paged.clone(),
            device: self.device.as_ref().map(|d| d.duplicate()),
        }
    }
}

impl<B: Backend> KvCache<B> {
    /// An empty dense cache for a model with `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            paged: None,
            device: None,
        }
    }

    /// A cache held by a store on the model's device, for a model of `n_layers` layers.
    pub fn on_device(n_layers: usize, store: Box<dyn DeviceStore>) -> Self {
        Self {
            layers: vec![None; n_layers],
            paged: None,
            device: Some(store),
        }
    }

    /// The device store, if this cache lives on the device.
    pub fn device_store(&self) -> Option<&dyn DeviceStore> {
        self.device.as_deref()
    }

    /// The device store, mutably, if this cache lives on the device.
    pub fn device_store_mut(&mut self) -> Option<&mut (dyn DeviceStore + 'static)> {
        self.device.as_deref_mut()
    }

    /// Whether the model's forward reads a tensor mask for this cache (dense caches only:
    /// paged stores take the host mask or parent pointers).
    pub fn takes_tensor_mask(&self) -> bool {
        self.paged.is_none() && self.device.is_none()
    }

    /// An empty paged host cache.
    pub fn paged(layout: KvLayout) -> Self {
        Self {
            layers: Vec::new(),
            paged: Some(PagedKv::new(layout)),
            device: None,
        }
    }

    /// An empty paged host cache compressing with `policy`.
    ///
    /// # Panics
    /// If the policy does not fit `layout` (internal invariant: callers check it with
    /// [`KvPolicy::check`] when they build it).
    pub fn paged_with(layout: KvLayout, policy: std::sync::Arc<KvPolicy>) -> Self {
        Self {
            layers: Vec::new(),
            paged: Some(PagedKv::with_policy(layout, policy)),
            device: None,
        }
    }

    /// The paged store, if this cache is paged.
    pub fn paged_store(&self) -> Option<&PagedKv> {
        self.paged.as_ref()
    }

    /// The paged store, mutably, if this cache is paged.
    pub fn paged_store_mut(&mut self) -> Option<&mut PagedKv> {
        self.paged.as_mut()
    }

    /// The deepest speculation tree that keeps speculative decoding equal to plain decoding
    /// under this cache's policy at its current length (`None`: no limit). See
    /// [`KvPolicy::max_tree_depth`].
    pub fn max_tree_depth(&self) -> Option<usize> {
        if let Some(d) = &self.device {
            return d.max_tree_depth();
        }
        let p = self.paged.as_ref()?;
        p.policy()?.max_tree_depth(p.len(), p.layout().page_size)
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        match &self.paged {
            Some(p) => p.layout().n_layers,
            None => self.layers.len(),
        }
    }

    /// Tokens held (by the last layer, i.e. fully processed tokens).
    pub fn len(&self) -> usize {
        match (&self.paged, &self.device) {
            (Some(p), _) => p.len(),
            (None, Some(d)) => d.len(),
            (None, None) => self.layer_len(self.layers.len().saturating_sub(1)),
        }
    }

    /// Bytes of key/value storage held: exact for a paged cache (whole pages, host or
    /// device), the tensors' element bytes for a dense one.
    pub fn bytes(&self) -> usize {
        if let Some(d) = &self.device {
            return d.bytes();
        }
        match &self.paged {
            Some(p) => p.bytes(),
            None => self
                .layers
                .iter()
                .flatten()
                .map(|l| 2 * l.k.shape().num_elements() * std::mem::size_of::<f32>())
                .sum(),
        }
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn layer_len(&self, layer: usize) -> usize {
        self.layers
            .get(layer)
            .and_then(Option::as_ref)
            .map_or(0, |l| l.k.dims()[2])
    }

    /// Appends new keys and values to `layer` and returns the layer's whole K and V.
    ///
    /// # Shapes
    /// - `k`, `v`: `[batch, n_kv_heads, n_new, head_dim]`
    /// - returns two tensors `[batch, n_kv_heads, len + n_new, head_dim]`
    ///
    /// # Panics
    /// If `layer` is out of range or the cache is paged (internal invariants: the model owns
    /// the layer count, and feeds paged caches through [`KvCache::paged_store_mut`] and
    /// [`KvCache::device_store_mut`]).
    pub fn append(
        &mut self,
        layer: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        assert!(self.takes_tensor_mask(), "tensor append on a paged cache");
        let slot = &mut self.layers[layer];
        let merged = match slot.take() {
            None => LayerKv { k, v },
            Some(old) => LayerKv {
                k: Tensor::cat(vec![old.k, k], 2),
                v: Tensor::cat(vec![old.v, v], 2),
            },
        };
        let out = (merged.k.clone(), merged.v.clone());
        *slot = Some(merged);
        out
    }

    /// Drops every token at position `len` and later (rollback); no-op if `len >= self.len()`.
    pub fn truncate(&mut self, len: usize) {
        if let Some(p) = &mut self.paged {
            p.truncate(len);
            return;
        }
        if let Some(d) = &mut self.device {
            d.truncate(len);
            return;
        }
        for slot in &mut self.layers {
            if let Some(l) = slot.take() {
                let cur = l.k.dims()[2];
                if len == 0 {
                    continue;
                }
                *slot = Some(if len >= cur {
                    l
                } else {
                    LayerKv {
                        k: l.k.narrow(2, 0, len),
                        v: l.v.narrow(2, 0, len),
                    }
                });
            }
        }
    }

    /// Commit after tree verification: keeps rows `0..prefix`, then `rows` (absolute row
    /// indices, increasing, each `>= prefix`) moved down to follow them; drops the rest.
    ///
    /// # Panics
    /// If `rows` is not increasing, starts below `prefix`, or reaches past the cache (internal
    /// invariant: rows come from the tree that was just appended).
    pub fn retain(&mut self, prefix: usize, rows: &[usize]) {
        if let Some(p) = &mut self.paged {
            p.retain(prefix, rows);
            return;
        }
        if let Some(d) = &mut self.device {
            d.retain(prefix, rows);
            return;
        }
        check_retain(prefix, rows, self.len());
        if rows.iter().enumerate().all(|(i, &r)| r == prefix + i) {
            self.truncate(prefix + rows.len());
            return;
        }
        let keep: Vec<i64> = (0..prefix)
            .chain(rows.iter().copied())
            .map(|r| r as i64)
            .collect();
        for slot in &mut self.layers {
            if let Some(l) = slot.take() {
                let device = l.k.device();
                let idx = Tensor::<B, 1, Int>::from_data(
                    TensorData::new(keep.clone(), [keep.len()]),
                    &device,
                );
                *slot = Some(LayerKv {
                    k: l.k.select(2, idx.clone()),
                    v: l.v.select(2, idx),
                });
            }
        }
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        if let Some(p) = &mut self.paged {
            p.clear();
        }
        if let Some(d) = &mut self.device {
            d.truncate(0);
        }
        self.layers.iter_mut().for_each(|s| *s = None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tensor};
    type B = burn::backend::Flex;

    #[test]
    fn append_then_truncate_restores_prefix() {
        let dev = Default::default();
        let mut c = KvCache::<B>::new(2);
        let a = Tensor::<B, 4>::random([1, 2, 4, 3], Distribution::Default, &dev);
        let b = Tensor::<B, 4>::random([1, 2, 2, 3], Distribution::Default, &dev);
        for layer in 0..2 {
            c.append(layer, a.clone(), a.clone());
        }
        assert_eq!(c.len(), 4);
        for layer in 0..2 {
            let (k, _) = c.append(layer, b.clone(), b.clone());
            assert_eq!(k.dims(), [1, 2, 6, 3]);
        }
        c.truncate(4);
        assert_eq!(c.len(), 4);
        let (k, _) = c.append(0, b.clone(), b);
        let head = k.narrow(2, 0, 4).into_data();
        head.assert_eq(&a.into_data(), true);
        c.clear();
        assert!(c.is_empty());
    }

    #[test]
    fn retain_moves_kept_rows_down() {
        let dev = Default::default();
        let mut c = KvCache::<B>::new(1);
        let rows: Vec<f32> = (0..6).map(|x| x as f32).collect();
        let t = Tensor::<B, 4>::from_data(TensorData::new(rows, [1, 1, 6, 1]), &dev);
        c.append(0, t.clone(), t.clone() * 10.0);
        c.retain(2, &[3, 5]);
        assert_eq!(c.len(), 4);
        let (k, v) = c.append(0, t.clone().narrow(2, 0, 1), t.narrow(2, 0, 1));
        assert_eq!(
            k.into_data().to_vec::<f32>().unwrap(),
            vec![0., 1., 3., 5., 0.]
        );
        assert_eq!(
            v.into_data().to_vec::<f32>().unwrap(),
            vec![0., 10., 30., 50., 0.]
        );
        c.retain(3, &[3]);
        assert_eq!(c.len(), 4, "a contiguous keep is a truncate");
    }
}
