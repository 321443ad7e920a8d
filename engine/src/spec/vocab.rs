//! A model draft must speak the target's tokenizer: same ids for the same tokens.

use arbor_model::{Tokenizer, Transformer};
use burn::tensor::backend::Backend;

use crate::EngineError;

/// Checks that `draft` maps every token to the same id as `target`.
///
/// # Errors
/// [`EngineError::DraftMismatch`] naming the first difference.
pub fn check_same_tokenizer(
    target: &Tokenizer,
    draft: &Tokenizer,
    draft_name: &str,
) -> Result<(), EngineError> {
    let mismatch = |reason: String| EngineError::DraftMismatch {
        draft: draft_name.to_string(),
        reason,
    };
    let (t, d) = (target.vocab_size(), draft.vocab_size());
    if t != d {
        return Err(mismatch(format!(
            "its tokenizer has {d} tokens, the target's {t}"
        )));
    }
    let (ti, di) = (target.inner(), draft.inner());
    for id in 0..t as u32 {
        let (a, b) = (ti.id_to_token(id), di.id_to_token(id));
        if a != b {
            return Err(mismatch(format!(
                "token {id} is {b:?} for the draft but {a:?} for the target"
            )));
        }
    }
    Ok(())
}

/// Checks that a model draft can serve a target with tokenizer `target`: same tokenizer, and
/// an output layer covering the whole vocabulary.
///
/// # Errors
/// [`EngineError::DraftMismatch`].
pub(crate) fn check_model_draft<B: Backend>(
    target: &Tokenizer,
    model: &Transformer<B>,
    tokenizer: &Tokenizer,
    name: &str,
) -> Result<(), EngineError> {
    check_same_tokenizer(target, tokenizer, name)?;
    if model.vocab_size() < target.vocab_size() {
        return Err(EngineError::DraftMismatch {
            draft: name.into(),
            reason: format!(
                "its output layer has {} rows for {} tokens",
                model.vocab_size(),
                target.vocab_size()
            ),
        });
    }
    Ok(())
}
