//! `arbor calibrate`: SKVQ calibration of a model's KV quantizers — per layer, a channel
//! permutation grouping channels of similar range and per-group clip ratios, fitted to the
//! keys and values the model produces on sample prompts — written as JSON for `--kv-calib`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use arbor_cache::Calibration;
use arbor_engine::Generator;
use arbor_model::{ForwardInput, KV_PAGE_SIZE, LoadedModel};
use clap::Args;

use crate::cli::{ModelArgs, with_backend};

/// `arbor calibrate`.
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sample prompts: a `.jsonl`/`.jsonl.gz` prompt file (as `bench` reads) or plain text.
    /// Prompts are joined into one sequence.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Tokens of keys and values to fit on.
    #[arg(long, default_value_t = 1024)]
    pub tokens: usize,
    /// Bits the clip ratios are fitted for (use the same `--kv-bits` when serving).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..=8))]
    pub bits: u32,
    /// Channels per group (the same `--kv-group` when serving).
    #[arg(long, default_value_t = 64)]
    pub group: usize,
    /// Where to write the calibration.
    #[arg(short, long)]
    pub output: PathBuf,
}

pub fn run(args: &CalibrateArgs) -> Result<()> {
    if ![2, 4, 8].contains(&args.bits) {
        bail!("--bits must be 2, 4 or 8");
    }
    let is_jsonl = {
        let name = args.prompts.to_string_lossy();
        name.ends_with(".jsonl") || name.ends_with(".jsonl.gz")
    };
    with_backend!(args.model.device, |B, device| {
        let m = LoadedModel::<B>::load(&args.model.model, args.model.resolve_options(), &device)?;
        let mut ids = Vec::new();
        if is_jsonl {
            let g = Generator::new(&m.model, &m.tokenizer);
            for p in crate::bench::prompts::load(&args.prompts)? {
                ids.extend(g.prompt_tokens(&p.prompt)?);
                if ids.len() >= args.tokens {
                    break;
                }
            }
        } else {
            let text = std::fs::read_to_string(&args.prompts)
                .with_context(|| format!("reading {}", args.prompts.display()))?;
            ids = m.tokenizer.encode(&text)?;
        }
        ids.truncate(args.tokens.min(m.model.max_position()));
        if ids.len() < 16 {
            bail!("{} gives only {} tokens", args.prompts.display(), ids.len());
        }
        let mut cache = m.model.new_cache_with(KV_PAGE_SIZE, None);
        let bar = indicatif::ProgressBar::new(ids.len() as u64);
        bar.set_style(indicatif::ProgressStyle::with_template(
            "calibrate {bar:30} {pos}/{len} tokens {elapsed_precise}",
        )?);
        for (c, part) in ids.chunks(128).enumerate() {
            m.model
                .forward(&ForwardInput::causal(part, c * 128), &mut cache)?;
            bar.inc(part.len() as u64);
        }
        bar.finish_and_clear();
        let Some(store) = cache.paged_store() else {
            bail!("calibration needs the CPU backend's paged cache");
        };
        let cal = Calibration::fit(store, args.bits, args.group, ids.len())?;
        std::fs::write(&args.output, serde_json::to_string(&cal)?)
            .with_context(|| format!("writing {}", args.output.display()))?;
        eprintln!(
            "{}: {} layers calibrated on {} tokens ({} bits, group {}) → {}",
            m.name,
            cal.layers.len(),
            cal.tokens,
            cal.bits,
            cal.group,
            args.output.display()
        );
        Ok(())
    })
}
