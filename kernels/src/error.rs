/// Errors raised by kernels on inputs they cannot handle.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A ggml tensor type id that Arbor does not (yet) decode.
    #[error("unsupported ggml tensor type {0}")]
    UnsupportedType(String),
    /// The byte length does not match the element count for this type.
    #[error("{ty}: {elements} elements need {expected} bytes, got {actual}")]
    ByteLength {
        /// The tensor type.
        ty: String,
        /// Elements requested.
        elements: usize,
        /// Bytes that many elements occupy.
        expected: usize,
        /// Bytes supplied.
        actual: usize,
    },
    /// The element count is not a multiple of the block size.
    #[error("{ty}: {elements} elements is not a multiple of the block size {block}")]
    RaggedBlocks {
        /// The tensor type.
        ty: String,
        /// Elements requested.
        elements: usize,
        /// Elements per block.
        block: usize,
    },
    /// Operand sizes disagree with the shapes given.
    #[error("shape mismatch: {0}")]
    Shape(String),
}
