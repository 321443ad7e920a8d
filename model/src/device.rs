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
    use libloading::{Library, Symbol};

    /// Driver library names, as the dynamic loader resolves them (`LD_LIBRARY_PATH`, its
    /// cache, the system directories) — where cudarc will look too.
    const DRIVER: [&str; 2] = ["libcuda.so.1", "libcuda.so"];

    /// Asks the driver itself (`cuInit`, `cuDeviceGetCount`) instead of touching the
    /// runtime, which panics on a machine with no GPU. The library stays loaded: cudarc
    /// opens the same one afterwards.
    pub fn probe(index: usize) -> crate::Result<()> {
        let unavailable = |why: String| {
            crate::ModelError::Input(format!("CUDA device {index} is not available: {why}"))
        };
        // SAFETY: loading the NVIDIA driver runs only its own initializers, as cudarc's
        // loading does.
        let Some(lib) = DRIVER
            .iter()
            .find_map(|&name| unsafe { Library::new(name) }.ok())
        else {
            return Err(unavailable(format!(
                "no CUDA driver library ({}) on the loader's path; set LD_LIBRARY_PATH to its \
                 folder",
                DRIVER.join(" or ")
            )));
        };
        let lib: &'static Library = Box::leak(Box::new(lib));
        // SAFETY: the two entry points have these C signatures in every CUDA driver
        // (`CUresult cuInit(unsigned int)`, `CUresult cuDeviceGetCount(int *)`); the count
        // is written to a live local.
        let count = unsafe {
            let init: Symbol<'_, unsafe extern "C" fn(u32) -> i32> = lib
                .get(b"cuInit\0")
                .map_err(|e| unavailable(format!("driver library without cuInit: {e}")))?;
            let get_count: Symbol<'_, unsafe extern "C" fn(*mut i32) -> i32> =
                lib.get(b"cuDeviceGetCount\0").map_err(|e| {
                    unavailable(format!("driver library without cuDeviceGetCount: {e}"))
                })?;
            let rc = init(0);
            if rc != 0 {
                return Err(unavailable(format!(
                    "cuInit failed with CUDA error {rc} (100: no device; 35: driver older \
                     than the runtime)"
                )));
            }
            let mut count = 0i32;
            let rc = get_count(&mut count);
            if rc != 0 {
                return Err(unavailable(format!(
                    "cuDeviceGetCount failed with CUDA error {rc}"
                )));
            }
            count
        };
        if index < count.max(0) as usize {
            Ok(())
        } else {
            Err(unavailable(format!("the driver sees {count} device(s)")))
        }
    }
}
