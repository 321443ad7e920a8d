//! The decoder's row-wise steps — RoPE, RMSNorm, the gated MLP's `silu(g) · u` — as one
//! CubeCL launch each on the CUDA backend ([`arbor_kernels::cube::rope`], `norm`, `act`),
//! burn's tensor operations elsewhere. On a GPU a forward's launches cost host time whatever
//! the kernels cost: with burn's operations these steps were ~60% of a forward's ~1 570
//! launches (Qwen2.5-1.5B; README, "A dry run without a GPU").

use burn::nn::RmsNorm;
use burn::tensor::activation::silu;
use burn::tensor::{Tensor, backend::Backend};

/// `norm(x)`.
///
/// # Shapes
/// - `x`: `[batch, n, hidden]` → same
pub(crate) fn rms_norm<B: Backend>(norm: &RmsNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    #[cfg(feature = "cuda")]
    if crate::device_kv::on_device::<B>() {
        return cuda::rms_norm(norm, x);
    }
    norm.forward(x)
}

/// `silu(gate) · up`.
///
/// # Shapes
/// - `gate`, `up`: `[batch, n, inter]` → same
pub(crate) fn silu_mul<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    #[cfg(feature = "cuda")]
    if crate::device_kv::on_device::<B>() {
        return cuda::silu_mul(gate, up);
    }
    silu(gate) * up
}

/// [`crate::RopeAngles::apply`]'s rotation on the CUDA backend; `None` elsewhere (and for
/// heads wider than the kernel takes).
///
/// # Shapes
/// - `x`: `[batch, heads, n, head_dim]`, `cos`, `sin`: `[batch, 1, n, head_dim / 2]` → as `x`
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub(crate) fn rope<B: Backend>(
    x: &Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Option<Tensor<B, 4>> {
    #[cfg(feature = "cuda")]
    if crate::device_kv::on_device::<B>() && x.dims()[3] <= arbor_kernels::cube::rope::MAX_HEAD_DIM
    {
        return Some(cuda::rope(x.clone(), cos, sin));
    }
    None
}

/// The launches, on burn's CUDA tensors (the caller checked the backend).
///
/// # Panics
/// Every function here, if `B` is not the CUDA backend or on shapes the model does not build
/// (internal invariants).
#[cfg(feature = "cuda")]
mod cuda {
    use arbor_kernels::cube::{act, norm, rope as rotary};
    use burn::nn::RmsNorm;
    use burn::tensor::{Tensor, backend::Backend};

    use crate::cube_tensor::{from_cube, into_cube};

    pub(super) fn rms_norm<B: Backend>(n: &RmsNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let shape = x.dims();
        let [batch, rows, dim] = shape;
        let x = into_cube(x);
        let gamma = into_cube(n.gamma.val());
        let y = norm::rms_norm(
            &x.client,
            &x.handle,
            &gamma.handle,
            batch * rows,
            dim,
            n.epsilon as f32,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        from_cube(&x, y, shape)
    }

    pub(super) fn silu_mul<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
        let shape = gate.dims();
        let (g, u) = (into_cube(gate), into_cube(up));
        let y = act::silu_mul(&g.client, &g.handle, &u.handle, shape.iter().product())
            .unwrap_or_else(|e| panic!("{e}"));
        from_cube(&g, y, shape)
    }

    pub(super) fn rope<B: Backend>(
        x: Tensor<B, 4>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let shape = x.dims();
        let x = into_cube(x);
        let (c, s) = (into_cube(cos.clone()), into_cube(sin.clone()));
        let y = rotary::rope(&x.client, &x.handle, (&c.handle, &s.handle), shape)
            .unwrap_or_else(|e| panic!("{e}"));
        from_cube(&x, y, shape)
    }
}
