//! The model's tokenizer: `tokenizers` BPE plus the special-token facts generation needs.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, Value, tokenizer_json_from_gguf};

/// Token texts that end generation, as llama.cpp's vocabulary loader detects them (end of turn
/// or text, and the FIM pad / repo / file-separator tokens). In GGUF vocabularies these tokens
/// are also treated as control tokens even when typed normal (llama.cpp does the same, e.g. for
/// `</s>` in Qwen2.5's vocabulary).
pub(crate) const END_OF_GENERATION: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "</s>",
    "<|eom_id|>",
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<|repo_name|>",
    "<repo_name>",
    "<reponame>",
    "<|file_sep|>",
    "<file_sep>",
];

/// A tokenizer with BOS/EOS handling and the model's chat template.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    add_bos: bool,
    eos: Option<u32>,
    eog: BTreeSet<u32>,
    chat: Option<ChatTemplate>,
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl Tokenizer {
    fn assemble(
        inner: tokenizers::Tokenizer,
        bos: Option<u32>,
        add_bos: bool,
        eos: Vec<u32>,
        template: Option<String>,
    ) -> Result<Self> {
        let mut eog: BTreeSet<u32> = eos.iter().copied().collect();
        for text in END_OF_GENERATION {
            if let Some(id) = inner.token_to_id(text) {
                let is_special = inner.get_added_vocabulary().is_special_token(text);
                if is_special {
                    eog.insert(id);
                }
            }
        }
        let token_text =
            |id: Option<u32>| id.and_then(|i| inner.id_to_token(i)).unwrap_or_default();
        let eos = eos.first().copied();
        let chat = template
            .map(|t| ChatTemplate::new(&t, &token_text(bos), &token_text(eos)))
            .transpose()?;
        Ok(Self {
            inner,
            bos,
            add_bos,
            eos,
            eog,
            chat,
        })
    }

    /// A tokenizer from `tokenizer.json` text and its special-token facts.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] for malformed JSON, [`ModelError::ChatTemplate`] for a broken
    /// template.
    pub fn from_json(
        json: &str,
        bos: Option<u32>,
        add_bos: bool,
        eos: Vec<u32>,
        chat_template: Option<String>,
    ) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json.parse().map_err(tok_err)?;
        Self::assemble(inner, bos, add_bos, eos, chat_template)
    }

    /// The tokenizer described by a GGUF file's metadata.
    ///
    /// # Errors
    /// As [`tokenizer_json_from_gguf`], or a broken chat template.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let json = tokenizer_json_from_gguf(file)?;
        let id = |k: &str| file.get(k).and_then(Value::as_u64).map(|v| v as u32);
        let eos: Vec<u32> = [
            id("tokenizer.ggml.eos_token_id"),
            id("tokenizer.ggml.eot_token_id"),
        ]
        .into_iter()
        .flatten()
        .collect();
        let add_bos = file
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let template = file
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Self::from_json(
            &json,
            id("tokenizer.ggml.bos_token_id"),
            add_bos,
            eos,
            template,
        )
    }

    /// The tokenizer of a Hugging Face model folder: `tokenizer.json`, plus
    /// `tokenizer_config.json` (BOS/EOS, chat template) and `generation_config.json` (EOS ids)
    /// when present.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] for unreadable or malformed files.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| tok_err(format!("{}: {e}", dir.join("tokenizer.json").display())))?;
        #[derive(Deserialize, Default)]
        struct TokConfig {
            add_bos_token: Option<bool>,
            bos_token: Option<serde_json::Value>,
            eos_token: Option<serde_json::Value>,
            chat_template: Option<serde_json::Value>,
        }
        let read_json = |name: &str| -> Result<Option<serde_json::Value>> {
            let p = dir.join(name);
            match std::fs::read_to_string(&p) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(ModelError::io(p, e)),
                Ok(s) => serde_json::from_str(&s)
                    .map(Some)
                    .map_err(|e| tok_err(format!("{name}: {e}"))),
            }
        };
        let cfg: TokConfig = read_json("tokenizer_config.json")?
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| tok_err(format!("tokenizer_config.json: {e}")))?
            .unwrap_or_default();
        let text_of = |v: &Option<serde_json::Value>| -> Option<String> {
            match v.as_ref()? {
                serde_json::Value::String(s) => Some(s.clone()),
                other => other.get("content")?.as_str().map(str::to_owned),
            }
        };
        let id_of = |v: &Option<serde_json::Value>| text_of(v).and_then(|t| inner.token_to_id(&t));
        let mut eos: Vec<u32> = id_of(&cfg.eos_token).into_iter().collect();
        if let Some(g) = read_json("generation_config.json")? {
            match g.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => eos.extend(n.as_u64().map(|v| v as u32)),
                Some(serde_json::Value::Array(a)) => {
                    eos.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32));
                }
                _ => {}
            }
        }
        let template = match cfg.chat_template {
            Some(serde_json::Value::String(s)) => Some(s),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
            _ => None,
        };
        let bos = id_of(&cfg.bos_token);
        Self::assemble(
            inner,
            bos,
            cfg.add_bos_token.unwrap_or(false),
            eos,
            template,
        )
    }

    /// Token ids of `text`, with BOS first if the model asks for it. Special-token texts in
    /// `text` (e.g. `<|im_start|>`) become their ids, as llama.cpp does with `parse_special`.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] if the tokenizer fails.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// As [`Tokenizer::encode`] for raw bytes, which must be UTF-8.
    ///
    /// # Errors
    /// [`ModelError::Utf8`] for invalid UTF-8.
    pub fn encode_bytes(&self, bytes: &[u8]) -> Result<Vec<u32>> {
        self.encode(std::str::from_utf8(bytes)?)
    }

    /// Text of `ids`; special tokens are dropped when `skip_special`.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] for ids outside the vocabulary.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    /// An incremental decoder for streaming: yields text only once it is complete UTF-8.
    pub fn decode_stream(&self, skip_special: bool) -> TextStream<'_> {
        TextStream {
            inner: self.inner.decode_stream(skip_special),
        }
    }

    /// Whether `id` ends generation (EOS, EOT, `<|im_end|>` …).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// The ids that end generation.
    pub fn end_of_generation_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.eog.iter().copied()
    }

    /// BOS id, if the vocabulary has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Main EOS id, if any.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// Renders `messages` with the model's chat template, ending with the assistant's prompt.
    ///
    /// # Errors
    /// [`ModelError::ChatTemplate`] if the model has none or it fails to render.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        self.chat
            .as_ref()
            .ok_or_else(|| ModelError::ChatTemplate("the model has no chat template".into()))?
            .render(messages, true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Streaming detokenizer (see [`Tokenizer::decode_stream`]).
pub struct TextStream<'a> {
    inner: tokenizers::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
}

impl std::fmt::Debug for TextStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TextStream")
    }
}

impl TextStream<'_> {
    /// Feeds one token; returns the text it completes, if any.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] for an id outside the vocabulary.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.inner.step(id).map_err(tok_err)
    }
}
