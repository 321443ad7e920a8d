//! burn's CUDA tensors as CubeCL buffers and back (the seam through which Arbor's own CubeCL
//! kernels run on the model's tensors, with no copy through the host).

use std::any::Any;

use burn::tensor::{DType, Shape, Tensor, TensorPrimitive, backend::Backend};
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;
use cubecl::server::Handle;

/// `x` as a contiguous CubeCL tensor (row-major in its dimensions).
///
/// # Panics
/// If `B` is not the CUDA backend or `x` is not f32 (internal invariants: callers check
/// the backend, and the model computes in f32).
pub(crate) fn into_cube<B: Backend, const D: usize>(x: Tensor<B, D>) -> CubeTensor<CudaRuntime> {
    let prim: Box<dyn Any> = Box::new(x.into_primitive().tensor());
    let x = prim
        .downcast::<CubeTensor<CudaRuntime>>()
        .expect("CUDA backend tensors are CubeCL tensors");
    let x = burn_cubecl::kernel::into_contiguous(*x);
    assert_eq!(x.dtype, DType::F32, "activations are f32");
    x
}

/// An f32 buffer `handle` on the device of `like`, as a burn tensor of `shape`.
///
/// # Panics
/// If `B` is not the CUDA backend (internal invariant, as [`into_cube`]).
pub(crate) fn from_cube<B: Backend, const D: usize>(
    like: &CubeTensor<CudaRuntime>,
    handle: Handle,
    shape: [usize; D],
) -> Tensor<B, D> {
    let y = CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        Shape::new(shape),
        handle,
        DType::F32,
    );
    let prim: Box<dyn Any> = Box::new(y);
    let prim = prim
        .downcast::<B::FloatTensorPrimitive>()
        .expect("the CUDA backend's float tensors");
    Tensor::from_primitive(TensorPrimitive::Float(*prim))
}
