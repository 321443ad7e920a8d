//! The KV cache on the CUDA backend: a [`DevicePagedKv`] per sequence — pages on the device,
//! appended to in place from the projections' output buffers and read in place by Arbor's
//! CubeCL tree attention (parent pointers instead of a mask, GQA without repeating K/V).
//! Nothing of the cache crosses to the host; per forward only the page table, parents and
//! positions go up. Other backends have no device store: the CPU backend uses the host
//! [`PagedKv`](arbor_cache::PagedKv), and without the `cuda` feature these functions
//! decline.
//!
//! [`DevicePagedKv`]: arbor_kernels::cube::kv::DevicePagedKv

use arbor_cache::{DeviceStore, KvCache};
use burn::tensor::{Tensor, backend::Backend};

/// Geometry of a model's device cache.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // read by the `cuda` build
pub(crate) struct DeviceCacheDims {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub page_size: usize,
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::{Backend, DeviceCacheDims, DeviceStore, KvCache, Tensor};

    /// A device cache for `B` (none without the `cuda` feature).
    pub(crate) fn new_cache<B: Backend>(_: &B::Device, _: DeviceCacheDims) -> Option<KvCache<B>> {
        None
    }

    /// Whether `B`'s attention reads `store` (never without the `cuda` feature).
    #[allow(clippy::extra_unused_type_parameters)] // the `cuda` build's signature
    pub(crate) fn reads<B: Backend>(_: &mut dyn DeviceStore) -> bool {
        false
    }

    /// # Panics
    /// Always: the model's forward refuses device stores [`reads`] declines before any layer
    /// runs (internal invariant).
    pub(crate) fn attention<B: Backend>(
        _: &mut dyn DeviceStore,
        _: usize,
        _: (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>),
        _: &[i32],
        _: &[usize],
    ) -> Tensor<B, 4> {
        panic!("device stores are refused before the layers run without the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::any::{Any, TypeId};

    use arbor_kernels::cube::kv::{DeviceKvDims, DevicePagedKv};
    use cubecl::Runtime;
    use cubecl::cuda::CudaRuntime;

    use super::{Backend, DeviceCacheDims, DeviceStore, KvCache, Tensor};
    use crate::cube_tensor::{from_cube, into_cube};

    type Store = DevicePagedKv<CudaRuntime>;

    fn is_cuda<B: Backend>() -> bool {
        TypeId::of::<B>() == TypeId::of::<crate::device::Cuda>()
    }

    /// A device cache on `device` when `B` is the CUDA backend (`None` elsewhere, or for
    /// heads wider than the attention kernel's 256 channels: then the dense cache serves).
    pub(crate) fn new_cache<B: Backend>(
        device: &B::Device,
        d: DeviceCacheDims,
    ) -> Option<KvCache<B>> {
        if !is_cuda::<B>() {
            return None;
        }
        let device = (device as &dyn Any).downcast_ref::<<CudaRuntime as Runtime>::Device>()?;
        let dims = DeviceKvDims {
            n_layers: d.n_layers,
            n_kv_heads: d.n_kv_heads,
            head_dim: d.head_dim,
            page_size: d.page_size,
        };
        let store = Store::new(&CudaRuntime::client(device), dims).ok()?;
        Some(KvCache::on_device(d.n_layers, Box::new(store)))
    }

    /// Whether `B`'s attention reads `store` (a CUDA store on the CUDA backend).
    pub(crate) fn reads<B: Backend>(store: &mut dyn DeviceStore) -> bool {
        is_cuda::<B>() && store.as_any_mut().is::<Store>()
    }

    /// Appends `k`, `v` to `layer` of the store and runs the tree attention of `q` over it.
    ///
    /// # Shapes
    /// - `q`: `[1, n_heads, n, head_dim]`, `k`, `v`: `[1, n_kv_heads, n, head_dim]` →
    ///   `[1, n_heads, n, head_dim]`
    ///
    /// # Panics
    /// On a store [`reads`] declines or shapes the model did not build (internal invariants:
    /// the forward checks the store and the tree before any layer runs).
    pub(crate) fn attention<B: Backend>(
        store: &mut dyn DeviceStore,
        layer: usize,
        (q, k, v): (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>),
        parents: &[i32],
        positions: &[usize],
    ) -> Tensor<B, 4> {
        let store = store
            .as_any_mut()
            .downcast_mut::<Store>()
            .expect("a CUDA device store (checked by the forward)");
        let [_, n_heads, n, head_dim] = q.dims();
        let (q, k, v) = (into_cube(q), into_cube(k), into_cube(v));
        store
            .append(layer, &k.handle, &v.handle, n)
            .expect("validated forward input");
        let positions: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let out = store
            .attention(layer, q.handle.clone(), n_heads, parents, &positions)
            .expect("validated forward input");
        from_cube(&q, out, [1, n_heads, n, head_dim])
    }
}

pub(crate) use imp::{attention, new_cache, reads};
