//! A Hugging Face `tokenizer.json` built from GGUF `tokenizer.ggml.*` metadata.
//!
//! Byte-level BPE (`tokenizer.ggml.model = gpt2`) only; the pre-tokenizer is chosen by
//! `tokenizer.ggml.pre` to match llama.cpp's `llama-vocab.cpp`.

use serde_json::{Value as Json, json};

use super::{GgufFile, Value};
use crate::error::{ModelError, Result};
use crate::tokenizer::END_OF_GENERATION;

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// The GPT-2 split with `\p{N}+`; llama.cpp's "default"/"gpt-2" pre-tokenizer.
const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split(pattern: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": use_regex})
}

/// The pre-tokenizer and `ignore_merges` flag for a `tokenizer.ggml.pre` value.
fn pre_tokenizer(pre: &str) -> Result<(Json, bool)> {
    let seq = |items: Vec<Json>| json!({"type": "Sequence", "pretokenizers": items});
    Ok(match pre {
        "qwen2" | "deepseek-r1-qwen" => (seq(vec![split(QWEN2_SPLIT), byte_level(false)]), false),
        "llama-bpe" | "llama3" => (seq(vec![split(LLAMA3_SPLIT), byte_level(false)]), true),
        "smollm" | "starcoder" | "refact" => (
            seq(vec![
                json!({"type": "Digits", "individual_digits": true}),
                byte_level(true),
            ]),
            false,
        ),
        "default" | "gpt-2" | "gpt2" => (seq(vec![split(GPT2_SPLIT), byte_level(false)]), false),
        other => {
            return Err(ModelError::Tokenizer(format!(
                "unsupported tokenizer.ggml.pre `{other}` (supported: qwen2, llama-bpe, smollm, \
                 starcoder, refact, gpt-2, default)"
            )));
        }
    })
}

fn strings<'a>(f: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let bad = |why: &str| ModelError::Metadata {
        key: key.into(),
        why: why.into(),
    };
    let items = f
        .get(key)
        .ok_or_else(|| bad("absent"))?
        .as_array()
        .ok_or_else(|| bad("not an array"))?;
    items
        .iter()
        .map(|v| v.as_str().ok_or_else(|| bad("not an array of strings")))
        .collect()
}

/// Builds the `tokenizer.json` text for the vocabulary in `file`.
///
/// # Errors
/// [`ModelError::Tokenizer`] for a non-BPE vocabulary or unknown pre-tokenizer,
/// [`ModelError::Metadata`] for missing or malformed keys.
pub fn tokenizer_json_from_gguf(file: &GgufFile) -> Result<String> {
    let model = file.require("tokenizer.ggml.model", |v| v.as_str().map(str::to_owned))?;
    if model != "gpt2" {
        return Err(ModelError::Tokenizer(format!(
            "tokenizer.ggml.model `{model}` is not supported (only byte-level BPE, `gpt2`)"
        )));
    }
    let pre = file
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let (pre_tokenizer, ignore_merges) = pre_tokenizer(pre)?;
    let tokens = strings(file, "tokenizer.ggml.tokens")?;
    let merges = strings(file, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match file.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => v
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_u64().map(|u| u as i64))
                    .collect::<Option<Vec<_>>>()
            })
            .filter(|t| t.len() == tokens.len())
            .ok_or_else(|| ModelError::Metadata {
                key: "tokenizer.ggml.token_type".into(),
                why: "not an integer array as long as the token list".into(),
            })?,
    };
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
        vocab.insert((*tok).to_string(), json!(id));
        let control = *ty == TOKEN_CONTROL || END_OF_GENERATION.contains(tok);
        if control || *ty == TOKEN_USER_DEFINED {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": control,
            }));
        }
    }
    let merges: Vec<Json> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .ok_or_else(|| ModelError::Tokenizer(format!("merge `{m}` has no space")))
        })
        .collect::<Result<_>>()?;
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
            "vocab": vocab, "merges": merges,
        },
    });
    Ok(tj.to_string())
}
