//! The kernels' tests (`tests.rs`, `kv_tests.rs`) on wgpu: lavapipe in CI. Each test file is
//! compiled once per runtime, with `R` and `client` from here (`on_cuda.rs` is the other).

pub(super) type R = cubecl::wgpu::WgpuRuntime;

pub(super) fn client() -> cubecl::prelude::ComputeClient<R> {
    <R as cubecl::Runtime>::client(&Default::default())
}

#[path = "kv_tests.rs"]
mod kv_tests;
#[path = "tests.rs"]
mod tests;
