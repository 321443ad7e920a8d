//! The kernels' tests (`tests.rs`, `kv_tests.rs`) on CUDA, with the `cuda` feature: `cargo
//! test -p arbor-kernels --features cuda on_cuda` on a machine with an NVIDIA GPU
//! (`scripts/gpu-kit.sh` builds them for one without a Rust toolchain).

pub(super) type R = cubecl::cuda::CudaRuntime;

pub(super) fn client() -> cubecl::prelude::ComputeClient<R> {
    <R as cubecl::Runtime>::client(&Default::default())
}

// The same files as `on_wgpu.rs`'s, on purpose: one source of cases, compiled per runtime.
#[allow(clippy::duplicate_mod)]
#[path = "kv_tests.rs"]
mod kv_tests;
#[allow(clippy::duplicate_mod)]
#[path = "tests.rs"]
mod tests;
