//! KV stores that live on the model's device, behind one object-safe trait so that
//! [`KvCache`](crate::KvCache) — generic over the burn backend, not over a CubeCL runtime —
//! can hold one and route commit, rollback and accounting to it. The model's CUDA path
//! holds a [`DevicePagedKv`] here and reaches it through [`DeviceStore::as_any_mut`].

use std::any::Any;

use arbor_kernels::cube::kv::DevicePagedKv;
use cubecl::Runtime;

/// A sequence's KV cache resident on a device.
pub trait DeviceStore: Send + Sync + std::fmt::Debug {
    /// Tokens held (by the last layer).
    fn len(&self) -> usize;
    /// Whether no token is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes of key/value storage in use.
    fn bytes(&self) -> usize;
    /// The deepest speculation tree that keeps speculative decoding equal to plain decoding
    /// (`None`: no limit): with quantization, the window, as on the CPU
    /// ([`KvPolicy::max_tree_depth`](crate::KvPolicy::max_tree_depth)).
    fn max_tree_depth(&self) -> Option<usize>;
    /// Drops every token at position `len` and later (rollback).
    fn truncate(&mut self, len: usize);
    /// Commit of an accepted tree path: as [`KvCache::retain`](crate::KvCache::retain).
    fn retain(&mut self, prefix: usize, rows: &[usize]);
    /// An independent copy (its own device storage).
    fn duplicate(&self) -> Box<dyn DeviceStore>;
    /// The concrete store, for the model's device code.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<R: Runtime> DeviceStore for DevicePagedKv<R>
where
    DevicePagedKv<R>: Send + Sync,
{
    fn len(&self) -> usize {
        DevicePagedKv::len(self)
    }

    fn bytes(&self) -> usize {
        DevicePagedKv::bytes(self)
    }

    fn max_tree_depth(&self) -> Option<usize> {
        self.quantization().map(|q| q.window)
    }

    fn truncate(&mut self, len: usize) {
        DevicePagedKv::truncate(self, len);
    }

    fn retain(&mut self, prefix: usize, rows: &[usize]) {
        DevicePagedKv::retain(self, prefix, rows);
    }

    fn duplicate(&self) -> Box<dyn DeviceStore> {
        Box::new(DevicePagedKv::duplicate(self))
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use arbor_kernels::cube::kv::{DeviceKvDims, DevicePagedKv, DeviceQuant};
    use cubecl::prelude::CubeElement;
    use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
    use cubecl::{Runtime, prelude::ComputeClient};

    use crate::KvCache;

    type Store = DevicePagedKv<WgpuRuntime>;

    fn store(cache: &mut KvCache<burn::backend::Flex>) -> &mut Store {
        cache
            .device_store_mut()
            .expect("a device cache")
            .as_any_mut()
            .downcast_mut::<Store>()
            .expect("a wgpu store")
    }

    /// Appends tokens `from..to` to both layers: token `t` holds `t` in every channel.
    fn append(
        client: &ComputeClient<WgpuRuntime>,
        cache: &mut KvCache<burn::backend::Flex>,
        from: usize,
        to: usize,
    ) {
        let x: Vec<f32> = (from..to).flat_map(|t| [t as f32; 4]).collect();
        let h = client.create_from_slice(f32::as_bytes(&x));
        for layer in 0..2 {
            store(cache).append(layer, &h, &h, to - from).unwrap();
        }
    }

    fn tokens(cache: &mut KvCache<burn::backend::Flex>) -> Vec<f32> {
        let (k, v) = store(cache).read_layer(1);
        assert_eq!(k, v);
        k.chunks(4).map(|c| c[0]).collect()
    }

    /// Commit, rollback, accounting, copies and clearing reach the device store through
    /// [`KvCache`]'s own methods.
    #[test]
    fn kv_cache_routes_commit_and_rollback_to_a_device_store() {
        let client = WgpuRuntime::client(&WgpuDevice::default());
        let dims = DeviceKvDims {
            n_layers: 2,
            n_kv_heads: 1,
            head_dim: 4,
            page_size: 4,
        };
        let kv = Store::new(&client, dims).unwrap();
        let mut cache = KvCache::<burn::backend::Flex>::on_device(2, Box::new(kv));
        assert!(!cache.takes_tensor_mask() && cache.paged_store().is_none());
        assert_eq!((cache.len(), cache.bytes()), (0, 0));
        append(&client, &mut cache, 0, 6);
        append(&client, &mut cache, 6, 11); // a tree of 5 rows
        assert_eq!(cache.len(), 11);
        cache.retain(6, &[7, 9]);
        assert_eq!(tokens(&mut cache), [0., 1., 2., 3., 4., 5., 7., 9.]);
        assert_eq!(
            cache.bytes(),
            2 * 2 * 2 * 4 * 4 * 4,
            "two pages, two layers, k and v"
        );
        let mut copy = cache.clone();
        cache.truncate(3);
        assert_eq!(tokens(&mut cache), [0., 1., 2.]);
        assert_eq!(tokens(&mut copy), [0., 1., 2., 3., 4., 5., 7., 9.]);
        cache.clear();
        assert!(cache.is_empty());
        assert_eq!(cache.bytes(), 0);
        assert_eq!(copy.len(), 8);
        assert_eq!(cache.max_tree_depth(), None);
        let quant = DeviceQuant {
            bits: 8,
            group: 4,
            sinks: 4,
            window: 8,
            values: None,
        };
        let kv = Store::with_quant(&client, dims, quant).unwrap();
        let quantized = KvCache::<burn::backend::Flex>::on_device(2, Box::new(kv));
        assert_eq!(
            quantized.max_tree_depth(),
            Some(8),
            "the window, as on the CPU"
        );
    }
}
