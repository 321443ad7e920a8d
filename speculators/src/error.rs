use arbor_model::ModelError;

use crate::TreeError;

/// Errors from drafts.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The draft model failed.
    #[error("draft model: {0}")]
    Model(#[from] ModelError),
    /// A tree operation failed (a draft bug).
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// There is no token to grow a tree below.
    #[error("empty context")]
    EmptyContext,
}
