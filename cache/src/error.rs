//! The cache crate's error type.

use arbor_kernels::KernelError;

/// What can go wrong configuring a cache policy.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A policy setting that cannot work (with the reason).
    #[error("KV cache policy: {0}")]
    Policy(String),
    /// A quantizer rejected its parameters.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// A calibration file that does not parse or does not fit the model.
    #[error("KV calibration: {0}")]
    Calibration(String),
}
