//! Turning a [`Generation`] into OpenAI's responses: one JSON body, or an SSE stream of
//! chunks ending in `data: [DONE]`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arbor_engine::{EngineError, Event, FinishReason, Finished};
use axum::Json;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Serialize;

use super::AppState;
use super::error::ApiError;
use super::openai::{
    AssistantMessage, ChatChoice, ChatChunkChoice, Delta, Envelope, SpecSummary, TextChoice, Usage,
};
use super::validate::{Endpoint, ValidRequest};
use super::worker::Generation;

/// Identity shared by a response and all its chunks.
struct Reply {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
}

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn spec_summary(f: &Finished) -> Option<SpecSummary> {
    f.spec.as_ref().map(|s| SpecSummary {
        steps: s.steps,
        drafted: s.drafted,
        accepted: s.accepted,
        tau: s.tau(),
        alpha: s.alpha(),
    })
}

fn usage(f: &Finished) -> Usage {
    Usage::new(f.stats.prompt_tokens, f.stats.generated_tokens)
}

impl Reply {
    fn new(endpoint: Endpoint, model: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        Self {
            id: format!("{prefix}-{created:x}{n:06x}"),
            created,
            model: model.to_string(),
            endpoint,
        }
    }

    fn envelope<C>(&self, object: &'static str, choices: Vec<C>) -> Envelope<C> {
        Envelope {
            id: self.id.clone(),
            object,
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: None,
            system_fingerprint: None,
            arbor: None,
        }
    }

    /// A stream chunk: the role (first chunk of a chat), text, or the finish (with the
    /// speculation figures).
    fn chunk(
        &self,
        role: bool,
        text: Option<String>,
        finish: Option<&'static str>,
        arbor: Option<SpecSummary>,
    ) -> String {
        match self.endpoint {
            Endpoint::Chat => to_json(&with_arbor(
                self.envelope(
                    "chat.completion.chunk",
                    vec![ChatChunkChoice {
                        index: 0,
                        delta: Delta {
                            role: role.then_some("assistant"),
                            content: text,
                        },
                        finish_reason: finish,
                        logprobs: None,
                    }],
                ),
                arbor,
            )),
            Endpoint::Completion => to_json(&with_arbor(
                self.envelope(
                    "text_completion",
                    vec![TextChoice {
                        index: 0,
                        text: text.unwrap_or_default(),
                        finish_reason: finish,
                        logprobs: None,
                    }],
                ),
                arbor,
            )),
        }
    }

    /// The last chunk: finish reason and speculation figures.
    fn final_chunk(&self, f: &Finished) -> String {
        let content = (self.endpoint == Endpoint::Completion).then(String::new);
        self.chunk(
            false,
            content,
            Some(finish_reason(f.reason)),
            spec_summary(f),
        )
    }

    /// The usage chunk (`stream_options.include_usage`): no choices.
    fn usage_chunk(&self, f: &Finished) -> String {
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        let mut e = self.envelope::<TextChoice>(object, vec![]);
        e.usage = Some(usage(f));
        to_json(&e)
    }

    /// The whole (non-stream) response.
    fn full(&self, text: String, f: &Finished) -> Response {
        let reason = Some(finish_reason(f.reason));
        let body = match self.endpoint {
            Endpoint::Chat => {
                let mut e = self.envelope(
                    "chat.completion",
                    vec![ChatChoice {
                        index: 0,
                        message: AssistantMessage {
                            role: "assistant",
                            content: text,
                        },
                        finish_reason: reason,
                        logprobs: None,
                    }],
                );
                e.usage = Some(usage(f));
                e.arbor = spec_summary(f);
                to_json(&e)
            }
            Endpoint::Completion => {
                let mut e = self.envelope(
                    "text_completion",
                    vec![TextChoice {
                        index: 0,
                        text,
                        finish_reason: reason,
                        logprobs: None,
                    }],
                );
                e.usage = Some(usage(f));
                e.arbor = spec_summary(f);
                to_json(&e)
            }
        };
        (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

fn with_arbor<C>(mut e: Envelope<C>, arbor: Option<SpecSummary>) -> Envelope<C> {
    e.arbor = arbor;
    e
}

fn to_json(v: &impl Serialize) -> String {
    serde_json::to_string(v).expect("response types serialize")
}

/// Latency bookkeeping for one request.
struct Clock {
    arrived: Instant,
    last: Option<Instant>,
}

impl Clock {
    fn content(&mut self, state: &AppState) {
        let now = Instant::now();
        match self.last {
            None => state
                .metrics
                .first_token((now - self.arrived).as_secs_f64()),
            Some(t) => state.metrics.next_token((now - t).as_secs_f64()),
        }
        self.last = Some(now);
    }
}

/// Answers `req` from `generation`: a JSON body or an SSE stream.
///
/// # Errors
/// For non-streaming requests, the engine's error; streams report errors in-band.
pub async fn respond(
    state: AppState,
    req: ValidRequest,
    generation: Generation,
) -> Result<Response, ApiError> {
    let reply = Reply::new(req.endpoint, state.info.name());
    if req.stream {
        state.metrics.request(req.endpoint.name(), 200);
        let stream = sse_stream(state, reply, req.include_usage, generation);
        return Ok(Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let mut g = generation;
    let mut clock = Clock {
        arrived: g.arrived,
        last: None,
    };
    let mut text = String::new();
    loop {
        match g.events.recv().await {
            Some(Ok(Event::Text(t))) => {
                clock.content(&state);
                text.push_str(&t);
            }
            Some(Ok(Event::Step(_))) => {}
            Some(Ok(Event::Done(f))) => {
                state
                    .metrics
                    .finished(&f, g.arrived.elapsed().as_secs_f64());
                state.metrics.request(req.endpoint.name(), 200);
                return Ok(reply.full(text, &f));
            }
            Some(Err(e)) => return Err(e.into()),
            None => return Err(engine_gone()),
        }
    }
}

fn engine_gone() -> ApiError {
    ApiError::Internal("the engine stopped before the request finished".into())
}

struct StreamState {
    state: AppState,
    reply: Reply,
    include_usage: bool,
    generation: Generation,
    clock: Clock,
    queue: VecDeque<SseEvent>,
    done: bool,
}

impl StreamState {
    fn push(&mut self, data: String) {
        self.queue.push_back(SseEvent::default().data(data));
    }

    fn fail(&mut self, e: ApiError) {
        tracing::warn!(error = %e, id = %self.reply.id, "stream ended with an error");
        self.push(to_json(&e.body()));
        self.push("[DONE]".into());
        self.done = true;
    }

    fn on(&mut self, item: Option<Result<Event, EngineError>>) {
        match item {
            Some(Ok(Event::Text(t))) => {
                self.clock.content(&self.state);
                let c = self.reply.chunk(false, Some(t), None, None);
                self.push(c);
            }
            Some(Ok(Event::Step(_))) => {}
            Some(Ok(Event::Done(f))) => {
                let elapsed = self.generation.arrived.elapsed().as_secs_f64();
                self.state.metrics.finished(&f, elapsed);
                let c = self.reply.final_chunk(&f);
                self.push(c);
                if self.include_usage {
                    let u = self.reply.usage_chunk(&f);
                    self.push(u);
                }
                self.push("[DONE]".into());
                self.done = true;
            }
            Some(Err(e)) => self.fail(e.into()),
            None => self.fail(engine_gone()),
        }
    }
}

fn sse_stream(
    state: AppState,
    reply: Reply,
    include_usage: bool,
    generation: Generation,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let mut s = StreamState {
        clock: Clock {
            arrived: generation.arrived,
            last: None,
        },
        state,
        include_usage,
        generation,
        queue: VecDeque::new(),
        done: false,
        reply,
    };
    // The first chunk carries the role (chat) before any content.
    if s.reply.endpoint == Endpoint::Chat {
        let c = s.reply.chunk(true, Some(String::new()), None, None);
        s.push(c);
    }
    futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(e) = s.queue.pop_front() {
                return Some((Ok(e), s));
            }
            if s.done {
                return None;
            }
            let item = s.generation.events.recv().await;
            s.on(item);
        }
    })
}

/// `Json` with a status, for small fixed bodies.
pub fn json(status: axum::http::StatusCode, v: serde_json::Value) -> Response {
    (status, Json(v)).into_response()
}
