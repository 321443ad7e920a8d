//! `arbor bench`: speed and acceptance measurements.
//!
//! - `--plain`: prefill and decode tokens/s of plain decoding on a synthetic prompt.
//! - `--verify-curve`: one verification forward's cost by tree size (1–64 nodes) beside the
//!   machine's memory and int8 roofline.
//! - `--draft D [--draft D2 ..] --prompts FILE`: speculative decoding on a prompt set — τ, α
//!   per draft and per depth, draft/verify time split, and tokens/s of speculative AND plain
//!   decoding of the same target in the same run, with the speedup.

mod plain;
mod plot;
pub mod prompts;
mod report;
mod spec;
mod verify;

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use crate::cli::{ModelArgs, SamplingArgs};

/// `arbor bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The target model (`--target` is an alias of `--model`).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Plain decoding only (no drafts): prefill and decode tokens/s.
    #[arg(long, conflicts_with_all = ["drafts", "prompts"])]
    pub plain: bool,
    /// Verification cost by tree size (1 to 64 nodes, after `--prompt-tokens`; `--repeats`
    /// rounds, each timing every size once: the fastest of each size, and the median over
    /// rounds of its time over the first size's in the same round) beside this machine's
    /// memory and int8 roofline.
    #[arg(long, conflicts_with_all = ["drafts", "prompts", "plain"])]
    pub verify_curve: bool,
    /// `--verify-curve` at these tree sizes only (comma-separated; default 1,2,4,…,64). The
    /// ratios are to the first size given.
    #[arg(long, value_delimiter = ',', requires = "verify_curve")]
    pub verify_nodes: Vec<usize>,
    /// A draft (repeatable): `ngram[:MAX_N]` (prompt lookup), `self:N[@f16]` (the target's
    /// first N layers), or a model sharing the target's tokenizer (short name, path, hub id;
    /// weights held as f16 unless `@f32` is appended; `@head=N` cuts its output head to the
    /// first N token ids, `@head=q4_1` re-quantizes it to Q4_1 — the default for Q8_0 heads,
    /// `@head=keep` keeps it as stored —, `@q4_1` re-quantizes every projection, and
    /// `@coarse[=RANK:CANDIDATES]` scores its head in two passes, low-rank then exact for the
    /// best candidates — the default for drafts whose head is a fifth of their bytes or more;
    /// `@exact` opts out).
    #[arg(long = "draft", value_name = "DRAFT")]
    pub drafts: Vec<String>,
    /// Tree policy: `auto`, `auto:WIDTH,MAX_DEPTH`, `k1,k2,..` (SpecInfer expansion), `chain:N`
    /// or `dyn:DEPTH,WIDTH,BUDGET`.
    #[arg(long, default_value = "auto")]
    pub tree: String,
    /// Prompts, one JSON object per line (`.jsonl` or `.jsonl.gz`; see bench/prompts/).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Use only the first N prompts.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Most new tokens per prompt (speculative mode).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Keep generating past end-of-generation tokens (speculative mode).
    #[arg(long)]
    pub ignore_eos: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Plain mode: prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Plain mode: tokens to generate per run (EOS ignored).
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Plain mode: runs to average (after one warm-up run); `--verify-curve`: rounds over the
    /// sizes (after one warm-up round).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Write every figure as JSON to this file (fields: README, "`arbor bench` JSON").
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Speculative mode: draw acceptance by depth and per-prompt speedup into this PNG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// KV-cache compression (both sides of a comparison run under it).
    #[command(flatten)]
    pub kv: crate::cli::KvArgs,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if args.plain {
        return plain::run(args);
    }
    if args.verify_curve {
        return verify::run(args);
    }
    if args.drafts.is_empty() {
        bail!(
            "give --plain, --verify-curve, or at least one --draft (ngram, self:N or a model) with --prompts"
        );
    }
    spec::run(args)
}
