//! Block-quantized projections on the CUDA backend: the weights live on the device as
//! [`CubeQuantMatrix`] (affine groups of 4/8-bit codes) and the product runs as Arbor's
//! CubeCL kernel on burn's own device buffers — no f32 copy of the weights, no round trip
//! through the host. Without the `cuda` feature [`GpuBlocks`] has no values, so the CPU
//! build carries no GPU path.

#[cfg(not(feature = "cuda"))]
use burn::tensor::{Tensor, backend::Backend};

#[cfg(feature = "cuda")]
pub(crate) use cuda::GpuBlocks;

/// Device-resident block weights (none exist without the `cuda` feature).
#[cfg(not(feature = "cuda"))]
#[derive(Debug, Clone)]
pub(crate) enum GpuBlocks {}

#[cfg(not(feature = "cuda"))]
impl GpuBlocks {
    /// Whether `B` runs block weights on the device (never without the `cuda` feature).
    #[allow(clippy::extra_unused_type_parameters)] // the `cuda` build's signature
    pub(crate) fn serves<B: Backend>() -> bool {
        false
    }

    pub(crate) fn bytes(&self) -> usize {
        match *self {}
    }

    pub(crate) fn weights(&self) -> usize {
        match *self {}
    }

    pub(crate) fn forward<B: Backend>(&self, _: Tensor<B, 3>) -> Tensor<B, 3> {
        match *self {}
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::any::{Any, TypeId};
    use std::sync::Arc;

    use arbor_kernels::cube::qmatmul::CubeQuantMatrix;
    use arbor_kernels::qmatmul::QuantMatrix;
    use burn::tensor::{Tensor, backend::Backend};
    use cubecl::Runtime;
    use cubecl::cuda::CudaRuntime;

    use crate::cube_tensor::{from_cube, into_cube};
    use crate::error::{ModelError, Result};

    /// Block weights on a CUDA device.
    #[derive(Debug, Clone)]
    pub(crate) struct GpuBlocks(Arc<CubeQuantMatrix<CudaRuntime>>);

    impl GpuBlocks {
        /// Whether `B` is the CUDA backend (whose tensors are CubeCL buffers).
        pub(crate) fn serves<B: Backend>() -> bool {
            TypeId::of::<B>() == TypeId::of::<crate::device::Cuda>()
        }

        /// Uploads `q` to `device`.
        ///
        /// # Errors
        /// [`ModelError::Input`] for weights the kernel does not take.
        ///
        /// # Panics
        /// If `B` is not the CUDA backend (internal invariant: callers check
        /// [`GpuBlocks::serves`]).
        pub(crate) fn upload<B: Backend>(q: &QuantMatrix, device: &B::Device) -> Result<Self> {
            let device = (device as &dyn Any)
                .downcast_ref::<<CudaRuntime as Runtime>::Device>()
                .expect("the CUDA backend's device");
            let client = CudaRuntime::client(device);
            CubeQuantMatrix::upload(&client, q)
                .map(|w| Self(Arc::new(w)))
                .map_err(|e| ModelError::Input(format!("uploading block weights: {e}")))
        }

        pub(crate) fn bytes(&self) -> usize {
            self.0.bytes()
        }

        /// Weights held (outputs × inputs).
        pub(crate) fn weights(&self) -> usize {
            self.0.n() * self.0.k()
        }

        /// # Shapes
        /// - `x`: `[batch, n, in]` → `[batch, n, out]`
        ///
        /// # Panics
        /// If `B` is not the CUDA backend or `x` is not f32 (internal invariants: only
        /// [`GpuBlocks::upload`] makes these, and the model computes in f32).
        pub(crate) fn forward<B: Backend>(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
            let [batch, n, k] = x.dims();
            let x = into_cube(x);
            let y = self
                .0
                .matmul(&x.handle, batch * n)
                .unwrap_or_else(|e| panic!("projection of width {k}: {e}"));
            from_cube(&x, y, [batch, n, self.0.n()])
        }
    }
}
