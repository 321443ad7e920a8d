//! The engine thread and the one streaming seam between HTTP handlers and the engine.
//!
//! Handlers call [`Generate::generate`] with a [`ValidRequest`] and read the returned
//! [`Generation`]'s events. [`EngineWorker`] implements it over a [`BatchEngine`] running on
//! its own OS thread (model forwards are blocking CPU work; the async runtime stays free for
//! I/O). Dropping a [`Generation`] — a client that disconnected, a handler that returned —
//! closes its channel, and the engine cancels the request at its next step.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use arbor_engine::{
    BatchEngine, BatchRequest, EngineError, Event, EventSink, Prompt, SchedulerConfig, TreePolicy,
};
use arbor_model::{LoadedModel, Tokenizer};
use burn::tensor::backend::Backend;

use crate::drafts::{LoadedDraft, build_batch_engine};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::error::ApiError;
use super::metrics::Metrics;
use super::validate::ValidRequest;

/// One request's events, in order; ends after [`Event::Done`] or an error.
#[derive(Debug)]
pub struct Generation {
    /// The events.
    pub events: UnboundedReceiver<Result<Event, EngineError>>,
    /// When the request arrived.
    pub arrived: Instant,
    _permit: Permit,
}

/// The seam between the HTTP layer and whatever generates (TGI's streaming backend trait).
pub trait Generate: Send + Sync + 'static {
    /// Starts `req`.
    ///
    /// # Errors
    /// [`ApiError::Busy`] when too many requests are in flight, [`ApiError::ShuttingDown`]
    /// after shutdown began, [`ApiError::Internal`] if the engine is gone.
    fn generate(&self, req: &ValidRequest) -> Result<Generation, ApiError>;

    /// Stops taking requests (running ones go on).
    fn stop_accepting(&self);

    /// Whether requests are taken.
    fn generate_allowed(&self) -> bool;
}

/// A slot among the requests in flight; freed on drop.
#[derive(Debug)]
struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Job {
    req: BatchRequest,
    sink: ChannelSink,
}

/// An engine sink over a tokio channel.
struct ChannelSink(UnboundedSender<Result<Event, EngineError>>);

impl EventSink for ChannelSink {
    fn send(&mut self, item: Result<Event, EngineError>) -> bool {
        self.0.send(item).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// Limits the worker applies to every request.
#[derive(Debug, Clone, Copy)]
pub struct WorkerLimits {
    /// Most requests queued or running; more get 429.
    pub max_in_flight: usize,
    /// Per-request deadline.
    pub request_timeout: Option<Duration>,
    /// Speculate when a request does not say.
    pub speculate_by_default: bool,
}

/// [`Generate`] over a [`BatchEngine`] on its own thread.
pub struct EngineWorker {
    jobs: mpsc::Sender<Job>,
    in_flight: Arc<AtomicUsize>,
    accepting: AtomicBool,
    limits: WorkerLimits,
}

/// What the engine thread loads: the target, its drafts and how to run them.
pub struct Loaded<B: Backend> {
    /// The target model.
    pub target: LoadedModel<B>,
    /// Its drafts.
    pub drafts: Vec<LoadedDraft<B>>,
    /// Tree policy for speculating requests.
    pub tree: Option<TreePolicy>,
    /// Scheduler limits.
    pub scheduler: SchedulerConfig,
    /// KV cache compression.
    pub kv: crate::kv::KvSpec,
}

impl EngineWorker {
    /// Spawns the engine thread. `load` runs on it (models are loaded there and never cross
    /// threads); then the engine is built and `ready` receives the target's tokenizer and
    /// context length, or the error that stopped it.
    pub fn spawn<B: Backend>(
        limits: WorkerLimits,
        metrics: Arc<Metrics>,
        load: impl FnOnce() -> anyhow::Result<Loaded<B>> + Send + 'static,
        ready: tokio::sync::oneshot::Sender<anyhow::Result<(Tokenizer, usize, String)>>,
    ) -> Self {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("arbor-engine".into())
            .spawn(move || {
                let loaded = match load() {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let built = build_batch_engine(
                    &loaded.target,
                    &loaded.drafts,
                    loaded.tree.clone(),
                    loaded.scheduler.clone(),
                )
                .and_then(|e| with_kv_policy(e, &loaded));
                match built {
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                    Ok(mut engine) => {
                        tracing::info!(
                            model = %loaded.target.name,
                            drafts = ?engine.draft_names(),
                            tree = ?loaded.tree,
                            "engine ready"
                        );
                        let info = (
                            loaded.target.tokenizer.clone(),
                            loaded.target.model.max_position(),
                            loaded.target.name.clone(),
                        );
                        let _ = ready.send(Ok(info));
                        run_loop(&mut engine, &rx, &metrics);
                        tracing::debug!("engine thread done");
                    }
                }
            })
            .expect("spawning the engine thread");
        Self {
            jobs,
            in_flight: Arc::new(AtomicUsize::new(0)),
            accepting: AtomicBool::new(true),
            limits,
        }
    }
}

/// Adds the configured KV-cache policy to `engine` (the CPU backend's paged cache only).
fn with_kv_policy<'m, B: Backend>(
    engine: BatchEngine<'m, B>,
    loaded: &Loaded<B>,
) -> anyhow::Result<BatchEngine<'m, B>> {
    let layout = loaded.target.model.kv_layout(loaded.scheduler.page_size);
    let Some(policy) = loaded.kv.build(layout)? else {
        return Ok(engine);
    };
    tracing::info!(kv = ?loaded.kv, "KV cache policy");
    Ok(engine.with_kv_policy(policy)?)
}

/// Takes jobs and steps the engine until every handle is gone and the work is done.
fn run_loop<B: Backend>(
    engine: &mut BatchEngine<'_, B>,
    jobs: &mpsc::Receiver<Job>,
    metrics: &Metrics,
) {
    let add = |engine: &mut BatchEngine<'_, B>, job: Job| {
        let reply = job.sink.0.clone();
        // A request the engine refuses gets the error as its only event.
        if let Err(e) = engine.add(job.req, Box::new(job.sink)) {
            let _ = reply.send(Err(e));
        }
    };
    loop {
        if !engine.has_work() {
            match jobs.recv() {
                Ok(job) => add(engine, job),
                Err(_) => return,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(job) => add(engine, job),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    if !engine.has_work() {
                        return;
                    }
                    break;
                }
            }
        }
        let report = engine.step();
        metrics.step(&report, &engine.load());
    }
}

impl Generate for EngineWorker {
    fn generate(&self, req: &ValidRequest) -> Result<Generation, ApiError> {
        if !self.accepting.load(Ordering::Acquire) {
            return Err(ApiError::ShuttingDown);
        }
        let limit = self.limits.max_in_flight;
        let prev = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let permit = Permit(self.in_flight.clone());
        if prev >= limit {
            return Err(ApiError::Busy {
                in_flight: prev,
                limit,
            });
        }
        let arrived = Instant::now();
        let (tx, rx) = unbounded_channel();
        let job = Job {
            req: BatchRequest {
                prompt: Prompt::Tokens(req.prompt.clone()),
                params: req.params.clone(),
                speculate: req.speculate.unwrap_or(self.limits.speculate_by_default),
                deadline: self.limits.request_timeout.map(|t| arrived + t),
            },
            sink: ChannelSink(tx),
        };
        self.jobs
            .send(job)
            .map_err(|_| ApiError::Internal("the engine thread has stopped".into()))?;
        Ok(Generation {
            events: rx,
            arrived,
            _permit: permit,
        })
    }

    fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Release);
    }

    fn generate_allowed(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }
}
