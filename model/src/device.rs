//! The backend Arbor runs on: the CPU (`burn-flex`) by default, CUDA with `--features cuda`.

/// The CPU backend (burn's `flex`: SIMD, multi-threaded).
pub type Cpu = burn::backend::Flex;

/// The CUDA backend (only with the `cuda` feature).
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda;

/// Checks that a CUDA device can be used, before any tensor op would panic on it.
///
/// # Errors
/// [`crate::ModelError::Input`] explaining why not (no driver, no device, feature off).
pub fn check_cuda(index: usize) -> crate::Result<()> {
    #[cfg(feature = "cuda")]
    {
        cuda_probe::probe(index)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(crate::ModelError::Input(format!(
            "CUDA device {index} requested but Arbor was built without the `cuda` feature \
             (rebuild with `--features cuda`)"
        )))
    }
}

#[cfg(feature = "cuda")]
mod cuda_probe {
    /// Looks for the driver library and a device node without touching the runtime, which
    /// panics on a machine with no GPU.
    pub fn probe(index: usize) -> crate::Result<()> {
        let driver = [
            "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
            "/usr/lib64/libcuda.so.1",
            "/usr/lib/libcuda.so.1",
        ]
        .iter()
        .any(|p| std::path::Path::new(p).exists());
        let node = std::path::Path::new(&format!("/dev/nvidia{index}")).exists();
        if driver && node {
            Ok(())
        } else {
            Err(crate::ModelError::Input(format!(
                "CUDA device {index} is not available (driver library found: {driver}, \
                 /dev/nvidia{index} present: {node})"
            )))
        }
    }
}
