//! `arbor serve`: an OpenAI-compatible HTTP API over the continuous-batching engine.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (JSON or SSE with
//! `stream: true`), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus),
//! `POST /tokenize`, `POST /detokenize`. Requests are checked into a
//! [`ValidRequest`](validate::ValidRequest) before anything runs; every failure is one
//! [`ApiError`] with OpenAI's error body and status (in-band as an SSE `data:` error once a
//! stream has begun). The engine runs on its own thread behind the [`Generate`] trait.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use arbor_server::http::{ServeConfig, serve};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! let config = ServeConfig::new("smollm2-135m");
//! serve::<arbor_model::device::Cpu>(listener, config, Default::default(), async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```

mod error;
mod metrics;
pub mod openai;
mod respond;
pub mod validate;
mod worker;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arbor_engine::{SchedulerConfig, TreePolicy};
use arbor_model::LoadedModel;
use arbor_model::hub::ResolveOptions;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use burn::tensor::backend::Backend;
use serde::Deserialize;
use serde_json::json;

pub use error::ApiError;
pub use metrics::Metrics;
pub use worker::{EngineWorker, Generate, Generation, Loaded, WorkerLimits};

use crate::drafts::{DraftSpec, load_drafts};
use validate::{Endpoint, ModelInfo};

/// Everything `arbor serve` is configured with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Target model (short name, path or hub id).
    pub model: String,
    /// How to resolve and hold it.
    pub resolve: ResolveOptions,
    /// Drafts for speculation (none: plain decoding).
    pub drafts: Vec<DraftSpec>,
    /// Tree policy for speculating requests.
    pub tree: TreePolicy,
    /// Scheduler limits.
    pub scheduler: SchedulerConfig,
    /// Per-request deadline.
    pub request_timeout: Option<Duration>,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// How long running requests may take to finish after shutdown begins.
    pub grace: Duration,
    /// Extra names the model answers to (besides its file name and `model`).
    pub aliases: Vec<String>,
    /// KV-cache compression of every sequence (CPU backend).
    pub kv: crate::kv::KvSpec,
}

impl ServeConfig {
    /// Defaults around `model`: no drafts (plain decoding; `auto` trees once drafts are
    /// added), default scheduler limits, 10 min timeout, 2 MiB bodies, 30 s grace.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            resolve: ResolveOptions::default(),
            drafts: Vec::new(),
            tree: TreePolicy::default(),
            scheduler: SchedulerConfig::default(),
            request_timeout: Some(Duration::from_secs(600)),
            max_body_bytes: 2 << 20,
            grace: Duration::from_secs(30),
            aliases: Vec::new(),
            kv: crate::kv::KvSpec::default(),
        }
    }
}

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    info: Arc<ModelInfo>,
    engine: Arc<dyn Generate>,
    metrics: Arc<Metrics>,
    max_body: usize,
}

/// The routes over `state`.
pub fn router(state: AppState) -> Router {
    let limit = state.max_body;
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Loads the model and drafts, then serves on `listener` until `shutdown` completes; then
/// stops taking requests and lets running ones finish for up to `config.grace`.
///
/// # Errors
/// The model or a draft cannot be loaded, or the listener fails.
pub async fn serve<B: Backend>(
    listener: tokio::net::TcpListener,
    config: ServeConfig,
    device: B::Device,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let limits = WorkerLimits {
        max_in_flight: config.scheduler.max_running + config.scheduler.max_waiting,
        request_timeout: config.request_timeout,
        speculate_by_default: !config.drafts.is_empty(),
    };
    let load_cfg = config.clone();
    let engine = EngineWorker::spawn::<B>(
        limits,
        metrics.clone(),
        move || {
            let target = LoadedModel::<B>::load(&load_cfg.model, load_cfg.resolve, &device)
                .with_context(|| format!("loading {}", load_cfg.model))?;
            let drafts = load_drafts(&target, &load_cfg.drafts, load_cfg.resolve, &device)?;
            Ok(Loaded {
                target,
                drafts,
                tree: Some(load_cfg.tree),
                scheduler: load_cfg.scheduler,
                kv: load_cfg.kv.clone(),
            })
        },
        ready_tx,
    );
    let (tokenizer, context, name) = ready_rx
        .await
        .context("the engine thread ended while loading")??;
    let mut names = vec![name.clone(), config.model.clone()];
    names.extend(config.aliases.iter().cloned());
    names.dedup();
    let engine: Arc<dyn Generate> = Arc::new(engine);
    let state = AppState {
        info: Arc::new(ModelInfo {
            names,
            context,
            tokenizer,
        }),
        engine: engine.clone(),
        metrics,
        max_body: config.max_body_bytes,
    };
    let addr = listener.local_addr()?;
    tracing::info!(%addr, model = %name, "listening");
    let began = Arc::new(tokio::sync::Notify::new());
    let signal = {
        let began = began.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: no new requests, letting running ones finish");
            engine.stop_accepting();
            began.notify_one();
        }
    };
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(signal);
    let grace = config.grace;
    tokio::select! {
        r = server => r.context("serving")?,
        () = async { began.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "grace period over; exiting with requests still running");
        }
    }
    Ok(())
}

/// The body, or why it cannot be read.
fn body(b: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    b.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge { limit }
        } else {
            ApiError::BadJson(e.body_text())
        }
    })
}

/// The body as `T` (a request type that rejects unknown fields).
fn json_body<T: serde::de::DeserializeOwned>(
    state: &AppState,
    b: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body(b, state.max_body)?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::BadJson(e.to_string()))
}

async fn generate_endpoint(
    state: AppState,
    endpoint: Endpoint,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let bytes = body(b, state.max_body)?;
        let req = match endpoint {
            Endpoint::Chat => validate::chat(&bytes, &state.info)?,
            Endpoint::Completion => validate::completion(&bytes, &state.info)?,
        };
        let generation = state.engine.generate(&req)?;
        respond::respond(state.clone(), req, generation).await
    }
    .await;
    result.unwrap_or_else(|e| {
        state.metrics.request(endpoint.name(), e.status().as_u16());
        e.into_response()
    })
}

async fn chat(State(state): State<AppState>, b: Result<Bytes, BytesRejection>) -> Response {
    generate_endpoint(state, Endpoint::Chat, b).await
}

async fn completions(State(state): State<AppState>, b: Result<Bytes, BytesRejection>) -> Response {
    generate_endpoint(state, Endpoint::Completion, b).await
}

fn model_card(name: &str) -> serde_json::Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "arbor"})
}

async fn models(State(state): State<AppState>) -> Response {
    let cards: Vec<_> = state.info.names.iter().map(|n| model_card(n)).collect();
    respond::json(StatusCode::OK, json!({"object": "list", "data": cards}))
}

async fn model(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match validate::check_model(&id, &state.info) {
        Ok(()) => respond::json(StatusCode::OK, model_card(&id)),
        Err(e) => e.into_response(),
    }
}

async fn health(State(state): State<AppState>) -> Response {
    match state.engine.generate_allowed() {
        true => respond::json(StatusCode::OK, json!({"status": "ok"})),
        false => ApiError::ShuttingDown.into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<arbor_model::ChatMessage>>,
}

async fn tokenize(State(state): State<AppState>, b: Result<Bytes, BytesRejection>) -> Response {
    reply(tokenize_json(&state, b))
}

fn tokenize_json(
    state: &AppState,
    b: Result<Bytes, BytesRejection>,
) -> Result<serde_json::Value, ApiError> {
    let req: TokenizeRequest = json_body(state, b)?;
    if let Some(m) = &req.model {
        validate::check_model(m, &state.info)?;
    }
    let tok = &state.info.tokenizer;
    let invalid = |m: String| ApiError::InvalidParam {
        param: "prompt",
        message: m,
    };
    let text = match (req.prompt, req.messages) {
        (Some(p), None) => p,
        (None, Some(m)) => tok
            .apply_chat_template(&m)
            .map_err(|e| invalid(format!("chat template: {e}")))?,
        _ => {
            return Err(invalid(
                "give exactly one of `prompt` and `messages`".into(),
            ));
        }
    };
    let tokens = tok
        .encode(&text)
        .map_err(|e| invalid(format!("tokenizing: {e}")))?;
    Ok(json!({"count": tokens.len(), "max_model_len": state.info.context, "tokens": tokens}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<i64>,
}

async fn detokenize(State(state): State<AppState>, b: Result<Bytes, BytesRejection>) -> Response {
    reply(detokenize_json(&state, b))
}

fn detokenize_json(
    state: &AppState,
    b: Result<Bytes, BytesRejection>,
) -> Result<serde_json::Value, ApiError> {
    let req: DetokenizeRequest = json_body(state, b)?;
    if let Some(m) = &req.model {
        validate::check_model(m, &state.info)?;
    }
    let tok = &state.info.tokenizer;
    let ids = validate::token_ids(&req.tokens, &state.info, "tokens")?;
    let text = tok
        .decode(&ids, false)
        .map_err(|e| ApiError::InvalidParam {
            param: "tokens",
            message: e.to_string(),
        })?;
    Ok(json!({"prompt": text}))
}

/// A JSON body, or the error's.
fn reply(r: Result<serde_json::Value, ApiError>) -> Response {
    match r {
        Ok(v) => respond::json(StatusCode::OK, v),
        Err(e) => e.into_response(),
    }
}

async fn not_found(uri: Uri) -> Response {
    ApiError::NotFound(uri.path().to_string()).into_response()
}
