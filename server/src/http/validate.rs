//! Requests as sent → [`ValidRequest`]: every field checked, the prompt rendered and
//! tokenized, limits applied. Nothing past this point sees client JSON.

use arbor_engine::GenerateParams;
use arbor_model::{ChatMessage, SamplingParams, Tokenizer};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;
use super::openai::{
    CHAT_FIELDS, COMMON_FIELDS, COMPLETION_FIELDS, ChatRequest, CommonParams, CompletionRequest,
    Content, PromptInput, StopInput,
};

/// Which endpoint a request came through (decides the response shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

impl Endpoint {
    /// Label for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completion => "completion",
        }
    }
}

/// What the served model is, for validation.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Names requests may use (the first is the one reported).
    pub names: Vec<String>,
    /// Context length in tokens.
    pub context: usize,
    /// The model's tokenizer and chat template.
    pub tokenizer: Tokenizer,
}

impl ModelInfo {
    /// The reported name.
    pub fn name(&self) -> &str {
        &self.names[0]
    }
}

/// A checked request, ready for the engine.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Prompt token ids (chat template applied).
    pub prompt: Vec<u32>,
    /// Limits, sampling, stops.
    pub params: GenerateParams,
    /// Per-request speculation switch (`None`: server default).
    pub speculate: Option<bool>,
    /// Stream SSE chunks.
    pub stream: bool,
    /// Send a usage chunk at the end of a stream.
    pub include_usage: bool,
}

fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidParam {
        param,
        message: message.into(),
    }
}

/// Parses `body` as a JSON object with only the common fields and `fields`, then as `T`.
fn parse<T: DeserializeOwned>(body: &[u8], fields: &[&str]) -> Result<T, ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::BadJson(e.to_string()))?;
    let Value::Object(map) = &value else {
        return Err(ApiError::BadJson("the body must be a JSON object".into()));
    };
    let known = |k: &str| COMMON_FIELDS.contains(&k) || fields.contains(&k);
    if let Some(k) = map.keys().find(|k| !known(k)) {
        return Err(ApiError::BadJson(format!(
            "unknown field `{k}` (this endpoint accepts: {}, {})",
            COMMON_FIELDS.join(", "),
            fields.join(", ")
        )));
    }
    serde_json::from_value(value).map_err(|e| ApiError::BadJson(e.to_string()))
}

/// A chat completion request.
///
/// # Errors
/// The first problem found, as an [`ApiError`].
pub fn chat(body: &[u8], info: &ModelInfo) -> Result<ValidRequest, ApiError> {
    let req: ChatRequest = parse(body, CHAT_FIELDS)?;
    check_model(&req.model, info)?;
    if req.messages.is_empty() {
        return Err(invalid("messages", "messages must not be empty"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(invalid(
                    "messages",
                    format!(
                        "messages[{i}].role `{other}` is not supported (system, developer, user, assistant)"
                    ),
                ));
            }
        };
        let content = match &m.content {
            None if role == "assistant" => String::new(),
            None => return Err(invalid("messages", format!("messages[{i}] has no content"))),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(invalid(
                                "messages",
                                format!(
                                    "messages[{i}]: content part `{kind}` is not supported (text only)"
                                ),
                            ));
                        }
                    }
                }
                text
            }
        };
        let _ = &m.name;
        messages.push(ChatMessage::new(role, content));
    }
    if req.common.tools.as_ref().is_some_and(|t| !is_empty(t)) {
        return Err(invalid("tools", "tool calling is not supported"));
    }
    if let Some(choice) = &req.common.tool_choice
        && !(choice.is_null() || choice == "none")
    {
        return Err(invalid("tool_choice", "tool calling is not supported"));
    }
    let rendered = info
        .tokenizer
        .apply_chat_template(&messages)
        .map_err(|e| invalid("messages", format!("chat template: {e}")))?;
    let prompt = info
        .tokenizer
        .encode(&rendered)
        .map_err(|e| invalid("messages", format!("tokenizing: {e}")))?;
    let max = req.max_completion_tokens.or(req.common.max_tokens);
    finish(Endpoint::Chat, prompt, &req.common, max, info)
}

/// A (legacy) text completion request.
///
/// # Errors
/// The first problem found, as an [`ApiError`].
pub fn completion(body: &[u8], info: &ModelInfo) -> Result<ValidRequest, ApiError> {
    let req: CompletionRequest = parse(body, COMPLETION_FIELDS)?;
    check_model(&req.model, info)?;
    if req.echo == Some(true) {
        return Err(invalid("echo", "echo is not supported"));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_null()) {
        return Err(invalid("suffix", "suffix is not supported"));
    }
    let encode = |t: &str| {
        info.tokenizer
            .encode(t)
            .map_err(|e| invalid("prompt", format!("tokenizing: {e}")))
    };
    let prompt = match &req.prompt {
        PromptInput::Text(t) => encode(t)?,
        PromptInput::Texts(ts) if ts.len() == 1 => encode(&ts[0])?,
        PromptInput::Texts(ts) => {
            return Err(invalid(
                "prompt",
                format!("one prompt per request is supported, got {}", ts.len()),
            ));
        }
        PromptInput::Tokens(ids) => token_ids(ids, info, "prompt")?,
    };
    finish(
        Endpoint::Completion,
        prompt,
        &req.common,
        req.common.max_tokens,
        info,
    )
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Client token ids as vocabulary ids, or an error naming `param`.
///
/// # Errors
/// [`ApiError::InvalidParam`] for a negative id or one outside the vocabulary.
pub fn token_ids(ids: &[i64], info: &ModelInfo, param: &'static str) -> Result<Vec<u32>, ApiError> {
    let vocab = info.tokenizer.vocab_size();
    ids.iter()
        .map(|&t| {
            u32::try_from(t)
                .ok()
                .filter(|&t| (t as usize) < vocab)
                .ok_or_else(|| {
                    invalid(
                        param,
                        format!("token id {t} outside the vocabulary of {vocab}"),
                    )
                })
        })
        .collect()
}

/// That requests name a model this server serves.
///
/// # Errors
/// [`ApiError::UnknownModel`].
pub fn check_model(model: &str, info: &ModelInfo) -> Result<(), ApiError> {
    if info.names.iter().any(|n| n == model) {
        Ok(())
    } else {
        Err(ApiError::UnknownModel(model.to_string()))
    }
}

/// Checks the shared parameters and the lengths.
fn finish(
    endpoint: Endpoint,
    prompt: Vec<u32>,
    c: &CommonParams,
    max_tokens: Option<u64>,
    info: &ModelInfo,
) -> Result<ValidRequest, ApiError> {
    if c.n.is_some_and(|n| n != 1) {
        return Err(invalid("n", "only n = 1 is supported"));
    }
    for (name, v) in [
        ("presence_penalty", c.presence_penalty),
        ("frequency_penalty", c.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(invalid(name, format!("{name} is not supported (only 0)")));
        }
    }
    if c.logprobs
        .as_ref()
        .is_some_and(|v| !(v.is_null() || *v == Value::Bool(false) || *v == 0))
    {
        return Err(invalid("logprobs", "logprobs are not supported"));
    }
    if c.top_logprobs.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(invalid("top_logprobs", "logprobs are not supported"));
    }
    if c.logit_bias.as_ref().is_some_and(|v| !is_empty(v)) {
        return Err(invalid("logit_bias", "logit_bias is not supported"));
    }
    if let Some(f) = &c.response_format
        && f.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(invalid(
            "response_format",
            "only {\"type\": \"text\"} is supported",
        ));
    }
    if c.stream_options.is_some() && !c.stream {
        return Err(invalid(
            "stream_options",
            "stream_options needs stream: true",
        ));
    }

    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(invalid(
            "temperature",
            format!("temperature {temperature} is outside [0, 2]"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid("top_p", format!("top_p {top_p} is outside (0, 1]")));
    }
    let top_k = match c.top_k {
        None | Some(-1 | 0) => 0,
        Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
        Some(k) => {
            return Err(invalid(
                "top_k",
                format!("top_k {k} must be positive (or -1/0: off)"),
            ));
        }
    };
    let min_p = c.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(invalid("min_p", format!("min_p {min_p} is outside [0, 1]")));
    }
    let seed = match c.seed {
        None => None,
        Some(s) => {
            Some(u64::try_from(s).map_err(|_| invalid("seed", "seed must not be negative"))?)
        }
    };
    let stop = match &c.stop {
        None => Vec::new(),
        Some(StopInput::One(s)) => vec![s.clone()],
        Some(StopInput::Many(v)) => v.clone(),
    };
    if stop.len() > 4 {
        return Err(invalid("stop", "at most 4 stop sequences"));
    }
    if stop.iter().any(String::is_empty) {
        return Err(invalid("stop", "stop sequences must not be empty"));
    }

    if prompt.is_empty() {
        return Err(invalid("prompt", "the prompt is empty"));
    }
    let room = info.context.saturating_sub(prompt.len());
    if room == 0 {
        return Err(ApiError::ContextLength(format!(
            "this model's maximum context length is {} tokens; the prompt has {}",
            info.context,
            prompt.len()
        )));
    }
    let max_tokens = match max_tokens {
        None => room,
        Some(0) => return Err(invalid("max_tokens", "max_tokens must be at least 1")),
        Some(n) if n > room as u64 => {
            return Err(ApiError::ContextLength(format!(
                "this model's maximum context length is {} tokens; the prompt has {} and {n} \
                 were requested",
                info.context,
                prompt.len()
            )));
        }
        Some(n) => n as usize,
    };
    Ok(ValidRequest {
        endpoint,
        prompt,
        params: GenerateParams {
            max_tokens,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_k,
                top_p: top_p as f32,
                min_p: min_p as f32,
                seed,
            },
            stop,
            ignore_eos: c.ignore_eos.unwrap_or(false),
            ..GenerateParams::default()
        },
        speculate: c.speculate,
        stream: c.stream,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}
