//! `arbor serve`: flags → [`ServeConfig`], a tokio runtime, and shutdown on Ctrl-C/SIGTERM.

use std::time::Duration;

use anyhow::{Context, Result};
use arbor_engine::SchedulerConfig;
use arbor_server::drafts::DraftSpec;
use arbor_server::http::{ServeConfig, serve};
use clap::Args;

use crate::cli::{ModelArgs, with_backend};

/// `arbor serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Speculative decoding with this draft (repeatable): `ngram[:MAX_N]`, `self:N[@f16]`, or
    /// a model sharing the target's tokenizer. Requests speculate unless they send
    /// `"speculate": false`.
    #[arg(long = "draft", value_name = "DRAFT")]
    pub drafts: Vec<String>,
    /// Tree policy for speculating requests: `auto` (shape chosen every step from the
    /// measured verify cost and acceptance; plain decoding when no tree pays),
    /// `auto:WIDTH,MAX_DEPTH`, or a fixed `k1,k2,..`, `chain:N`, `dyn:DEPTH,WIDTH,BUDGET`.
    /// The scheduler cuts trees down when the batch is large.
    #[arg(long, default_value = "auto")]
    pub tree: String,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 16)]
    pub max_running: usize,
    /// Most requests waiting; more get 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_waiting: usize,
    /// Most tokens in one batched forward.
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Prompt tokens per prefill chunk.
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Speculative tree rows are added only while a step has fewer rows than this (the
    /// batch size where a forward stops being memory-bound on this machine).
    #[arg(long, default_value_t = 8)]
    pub spec_max_rows: usize,
    /// KV cache capacity in tokens, shared by all sequences.
    #[arg(long, default_value_t = 65_536)]
    pub kv_tokens: usize,
    /// Tokens per KV page.
    #[arg(long, default_value_t = 16)]
    pub page_size: usize,
    /// Per-request timeout in seconds (0: none).
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
    /// Seconds running requests get to finish after Ctrl-C/SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub grace_period: u64,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 2 << 20)]
    pub max_body_bytes: usize,
    /// Another name the model answers to in requests (repeatable).
    #[arg(long = "served-model-name")]
    pub aliases: Vec<String>,
    #[command(flatten)]
    pub kv: crate::cli::KvArgs,
}

impl ServeArgs {
    fn config(&self) -> Result<ServeConfig> {
        let scheduler = SchedulerConfig {
            max_running: self.max_running,
            max_waiting: self.max_waiting,
            max_batch_tokens: self.max_batch_tokens,
            prefill_chunk: self.prefill_chunk,
            spec_max_rows: self.spec_max_rows,
            page_size: self.page_size,
            kv_pages: self.kv_tokens.div_ceil(self.page_size.max(1)),
        };
        scheduler
            .validate()
            .map_err(|e| anyhow::anyhow!("scheduler limits: {e}"))?;
        Ok(ServeConfig {
            model: self.model.model.clone(),
            resolve: self.model.resolve_options(),
            drafts: DraftSpec::parse_all(&self.drafts)?,
            tree: self.tree.parse().context("--tree")?,
            scheduler,
            request_timeout: (self.request_timeout > 0)
                .then(|| Duration::from_secs(self.request_timeout)),
            max_body_bytes: self.max_body_bytes,
            grace: Duration::from_secs(self.grace_period),
            aliases: self.aliases.clone(),
            kv: self.kv.spec(),
        })
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

pub fn run(args: &ServeArgs) -> Result<()> {
    let config = args.config()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("binding {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "arbor: loading {}; will listen on http://{addr}",
            config.model
        );
        with_backend!(args.model.device, |B, device| {
            serve::<B>(listener, config, device, shutdown_signal()).await
        })
    })
}
