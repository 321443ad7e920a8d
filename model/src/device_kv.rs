//! The KV cache on the CUDA backend: a [`DevicePagedKv`] per sequence — pages on the device,
//! appended to in place from the projections' output buffers and read in place by Arbor's
//! CubeCL tree attention (parent pointers instead of a mask, GQA without repeating K/V).
//! Nothing of the cache crosses to the host; per forward only the page table, parents and
//! positions go up. Other backends have no device store: the CPU backend uses the host
//! [`PagedKv`](arbor_cache::PagedKv), and without the `cuda` feature these functions
//! decline.
//!
//! [`DevicePagedKv`]: arbor_kernels::cube::kv::DevicePagedKv

use arbor_cache::StepFormat;
use arbor_cache::compression::PageQuant;
use arbor_cache::{DeviceStore, KvCache, KvLayout, KvPolicy};
use arbor_kernels::cube::kv::DeviceQuant;
use burn::tensor::{Tensor, backend::Backend};

use crate::error::{ModelError, Result};

/// The quantization a device cache applies for `policy` (`None`: none asked for).
///
/// # Errors
/// [`ModelError::Input`] for the parts that run on the CPU backend only: Quest page
/// selection, H2O eviction, keys quantized per token.
pub(crate) fn device_quant(policy: &KvPolicy) -> Result<Option<DeviceQuant>> {
    let cpu_only = |what: &str| {
        Err(ModelError::Input(format!(
            "{what} runs on the CPU backend only (the CUDA cache quantizes pages: \
             --kv-bits with keys per channel)"
        )))
    };
    if policy.quest.is_some() {
        return cpu_only("Quest page selection");
    }
    if policy.h2o.is_some() {
        return cpu_only("H2O eviction");
    }
    let Some(c) = &policy.compression else {
        return Ok(None);
    };
    let mut bits = None;
    for k in &c.keys {
        match k {
            PageQuant::Channel(q) if q.refined() > 0 => {
                return cpu_only("refined key channels (--kv-refine)");
            }
            PageQuant::Channel(q) if q.steps() != StepFormat::F16 => {
                return cpu_only("8-bit steps (--kv-steps f8)");
            }
            PageQuant::Channel(q) => bits = Some(q.bits()),
            PageQuant::Token(_) => return cpu_only("per-token key quantization"),
        }
    }
    let mut values = Vec::with_capacity(c.values.len());
    for v in &c.values {
        match v {
            PageQuant::Token(v) => values.push(v),
            PageQuant::Channel(_) => return cpu_only("per-channel value quantization"),
        }
    }
    let (Some(bits), Some(first)) = (bits, values.first()) else {
        return Ok(None);
    };
    Ok(Some(DeviceQuant {
        bits,
        group: first.group(),
        sinks: c.sinks,
        window: c.window,
        values: Some(
            values
                .iter()
                .map(|v| (v.perm().to_vec(), v.clip().to_vec()))
                .collect(),
        ),
    }))
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::{Backend, DeviceStore, KvCache, KvLayout, KvPolicy, Tensor};

    /// A device cache for `B` (none without the `cuda` feature).
    pub(crate) fn new_cache<B: Backend>(
        _: &B::Device,
        _: KvLayout,
        _: Option<&KvPolicy>,
    ) -> Option<KvCache<B>> {
        None
    }

    /// Whether `B` keeps its KV cache on the device (never without the `cuda` feature).
    #[allow(clippy::extra_unused_type_parameters)] // the `cuda` build's signature
    pub(crate) fn on_device<B: Backend>() -> bool {
        false
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

    use arbor_kernels::cube::kv::DevicePagedKv;
    use cubecl::Runtime;
    use cubecl::cuda::CudaRuntime;

    use super::{Backend, DeviceStore, KvCache, KvLayout, KvPolicy, Tensor, device_quant};
    use crate::cube_tensor::{from_cube, into_cube};

    type Store = DevicePagedKv<CudaRuntime>;

    /// Whether `B` keeps its KV cache on the device (the CUDA backend).
    pub(crate) fn on_device<B: Backend>() -> bool {
        TypeId::of::<B>() == TypeId::of::<crate::device::Cuda>()
    }

    /// A device cache on `device` when `B` is the CUDA backend, quantizing as `policy` asks
    /// (`None` elsewhere, or for heads wider than the attention kernel's 256 channels: then
    /// the dense cache serves). Parts of `policy` a device cache cannot apply were refused
    /// by [`crate::Transformer::check_kv_policy`] when the policy was accepted.
    pub(crate) fn new_cache<B: Backend>(
        device: &B::Device,
        layout: KvLayout,
        policy: Option<&KvPolicy>,
    ) -> Option<KvCache<B>> {
        if !on_device::<B>() {
            return None;
        }
        let device = (device as &dyn Any).downcast_ref::<<CudaRuntime as Runtime>::Device>()?;
        let dims = layout.into();
        let client = CudaRuntime::client(device);
        let uncompressed = |e: String| {
            tracing::debug!("device KV cache without compression: {e}");
            Store::new(&client, dims)
        };
        let quant = policy.and_then(|p| {
            device_quant(p)
                .inspect_err(|e| tracing::debug!("device KV cache without compression: {e}"))
                .ok()
                .flatten()
        });
        let store = match quant {
            Some(q) => Store::with_quant(&client, dims, q).or_else(|e| uncompressed(e.to_string())),
            None => Store::new(&client, dims),
        }
        .ok()?;
        Some(KvCache::on_device(layout.n_layers, Box::new(store)))
    }

    /// Whether `B`'s attention reads `store` (a CUDA store on the CUDA backend).
    pub(crate) fn reads<B: Backend>(store: &mut dyn DeviceStore) -> bool {
        on_device::<B>() && store.as_any_mut().is::<Store>()
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

pub(crate) use imp::{attention, new_cache, on_device, reads};

#[cfg(test)]
mod tests {
    use arbor_cache::{
        KvCompression, KvLayout, KvPolicy, QuantAxis, QuantConfig, QuestConfig, StepFormat,
    };

    use super::device_quant;

    const LAYOUT: KvLayout = KvLayout {
        n_layers: 2,
        n_kv_heads: 2,
        head_dim: 32,
        page_size: 16,
    };

    #[test]
    fn device_quantization_follows_the_policy_and_refuses_cpu_only_parts() {
        let config = QuantConfig {
            bits: 2,
            group: 16,
            sinks: 8,
            window: 64,
            ..QuantConfig::default()
        };
        let policy = KvPolicy::quantized(KvCompression::uniform(&LAYOUT, &config).unwrap());
        let q = device_quant(&policy)
            .unwrap()
            .expect("quantization asked for");
        assert_eq!((q.bits, q.group, q.sinks, q.window), (2, 16, 8, 64));
        let values = q.values.expect("each layer's values");
        assert_eq!(values.len(), 2);
        assert!(
            values
                .iter()
                .all(|(p, c)| *p == (0..32).collect::<Vec<_>>() && c == &[1.0; 2])
        );
        assert_eq!(device_quant(&KvPolicy::default()).unwrap(), None);
        let tokens = QuantConfig {
            keys: QuantAxis::Token,
            ..config
        };
        let per_token = KvPolicy::quantized(KvCompression::uniform(&LAYOUT, &tokens).unwrap());
        assert!(device_quant(&per_token).is_err());
        for cpu_only in [
            QuantConfig {
                values: QuantAxis::Channel,
                ..config
            },
            QuantConfig {
                refine: 2,
                ..config
            },
            QuantConfig {
                steps: StepFormat::F8,
                ..config
            },
        ] {
            let p = KvPolicy::quantized(KvCompression::uniform(&LAYOUT, &cpu_only).unwrap());
            assert!(device_quant(&p).is_err(), "{cpu_only:?}");
        }
        let quest = KvPolicy {
            quest: Some(QuestConfig::with_budget(256)),
            ..policy
        };
        assert!(device_quant(&quest).is_err());
    }
}
