//! Prometheus metrics (`GET /metrics`, text format 0.0.4) through `prometheus-client`.

use std::sync::atomic::AtomicU64;

use arbor_engine::{Finished, Load, StepReport};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    running: Gauge,
    waiting: Gauge,
    kv_tokens: Gauge,
    kv_bytes: Gauge,
    kv_pages_used: Gauge,
    kv_pages_free: Gauge,
    prompt_tokens: Counter,
    generated_tokens: Counter,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    steps: Counter,
    step_rows: Histogram,
    preempted: Counter,
    spec_steps: Counter,
    spec_accepted: Counter,
    spec_tau: FloatGauge,
    draft_drafted: Family<Labels, Counter>,
    draft_accepted: Family<Labels, Counter>,
    draft_alpha: Family<Labels, FloatGauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric at zero.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("arbor");
        let latency = || Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let m = Self {
            requests: Family::default(),
            running: Gauge::default(),
            waiting: Gauge::default(),
            kv_tokens: Gauge::default(),
            kv_bytes: Gauge::default(),
            kv_pages_used: Gauge::default(),
            kv_pages_free: Gauge::default(),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            ttft: latency(),
            itl: latency(),
            e2e: latency(),
            steps: Counter::default(),
            step_rows: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            preempted: Counter::default(),
            spec_steps: Counter::default(),
            spec_accepted: Counter::default(),
            spec_tau: FloatGauge::default(),
            draft_drafted: Family::default(),
            draft_accepted: Family::default(),
            draft_alpha: Family::default(),
            registry: Registry::default(),
        };
        r.register(
            "requests",
            "Requests answered, by endpoint and HTTP status",
            m.requests.clone(),
        );
        r.register(
            "running_sequences",
            "Sequences running in the engine",
            m.running.clone(),
        );
        r.register(
            "queue_depth",
            "Requests waiting to start",
            m.waiting.clone(),
        );
        r.register(
            "kv_tokens",
            "KV cache tokens held by running sequences",
            m.kv_tokens.clone(),
        );
        r.register("kv_bytes", "Bytes of KV storage held", m.kv_bytes.clone());
        r.register("kv_pages_used", "KV pages in use", m.kv_pages_used.clone());
        r.register("kv_pages_free", "KV pages free", m.kv_pages_free.clone());
        r.register(
            "prompt_tokens",
            "Prompt tokens of finished requests",
            m.prompt_tokens.clone(),
        );
        r.register(
            "generated_tokens",
            "Tokens generated for finished requests",
            m.generated_tokens.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "Arrival to first content, seconds",
            m.ttft.clone(),
        );
        r.register(
            "inter_token_latency_seconds",
            "Time between content deltas of one stream, seconds",
            m.itl.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Arrival to end, seconds",
            m.e2e.clone(),
        );
        r.register("engine_steps", "Engine steps run", m.steps.clone());
        r.register(
            "engine_step_rows",
            "Rows per batched target forward",
            m.step_rows.clone(),
        );
        r.register(
            "preemptions",
            "Sequences preempted for KV pages",
            m.preempted.clone(),
        );
        r.register(
            "spec_steps",
            "Speculative verification steps",
            m.spec_steps.clone(),
        );
        r.register(
            "spec_accepted",
            "Draft nodes accepted",
            m.spec_accepted.clone(),
        );
        r.register(
            "spec_tau",
            "Tokens per verification step over all finished requests",
            m.spec_tau.clone(),
        );
        r.register(
            "draft_drafted",
            "Nodes proposed, per draft",
            m.draft_drafted.clone(),
        );
        r.register(
            "draft_accepted",
            "Nodes accepted, per draft",
            m.draft_accepted.clone(),
        );
        r.register(
            "draft_alpha",
            "Acceptance rate per draft",
            m.draft_alpha.clone(),
        );
        Self { registry: r, ..m }
    }

    /// Counts an answered request.
    pub fn request(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&vec![
                ("endpoint", endpoint.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    /// After each engine step.
    pub fn step(&self, report: &StepReport, load: &Load) {
        self.running.set(load.running as i64);
        self.waiting.set(load.waiting as i64);
        self.kv_tokens.set(load.kv_tokens as i64);
        self.kv_bytes.set(load.kv_bytes as i64);
        self.kv_pages_used.set(load.kv_pages_used as i64);
        self.kv_pages_free
            .set(load.kv_pages_total.saturating_sub(load.kv_pages_used) as i64);
        if report.rows > 0 {
            self.steps.inc();
            self.step_rows.observe(report.rows as f64);
        }
        self.preempted.inc_by(report.preempted as u64);
    }

    /// First content of a request, `secs` after it arrived.
    pub fn first_token(&self, secs: f64) {
        self.ttft.observe(secs);
    }

    /// A later content delta, `secs` after the previous one.
    pub fn next_token(&self, secs: f64) {
        self.itl.observe(secs);
    }

    /// A request's end.
    pub fn finished(&self, f: &Finished, secs: f64) {
        self.prompt_tokens.inc_by(f.stats.prompt_tokens as u64);
        self.generated_tokens
            .inc_by(f.stats.generated_tokens as u64);
        self.e2e.observe(secs);
        let Some(spec) = &f.spec else { return };
        let steps = self.spec_steps.inc_by(spec.steps as u64) + spec.steps as u64;
        let accepted = self.spec_accepted.inc_by(spec.accepted as u64) + spec.accepted as u64;
        if steps > 0 {
            self.spec_tau.set((accepted + steps) as f64 / steps as f64);
        }
        for d in &spec.drafts {
            let l = vec![("draft", d.name.clone())];
            let drafted = self
                .draft_drafted
                .get_or_create(&l)
                .inc_by(d.drafted as u64)
                + d.drafted as u64;
            let acc = self
                .draft_accepted
                .get_or_create(&l)
                .inc_by(d.accepted as u64)
                + d.accepted as u64;
            if drafted > 0 {
                self.draft_alpha
                    .get_or_create(&l)
                    .set(acc as f64 / drafted as f64);
            }
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
