//! `arbor kv-eval`: what KV-cache compression costs. Teacher-forces a model over a long text
//! with a dense cache and with each compression setting, and reports top-1 agreement with
//! the dense run, perplexity and its change, KV bytes per token, and speed.
//!
//! The text is fed in chunks; which keys a query reads compressed depends on positions only
//! (see `arbor_cache::KvCompression`), so the chunk size changes speed, not the figures.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use arbor_cache::{KvCache, KvCompression};
use arbor_model::sampling::argmax;
use arbor_model::{ForwardInput, LoadedModel, Transformer};
use burn::tensor::backend::Backend;
use clap::Args;
use serde::Serialize;

use crate::cli::{ModelArgs, with_backend};

/// `arbor kv-eval`.
#[derive(Debug, Args)]
pub struct KvEvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A long text to evaluate on (UTF-8; a book chapter or a source file).
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens of it to evaluate (predictions made: one fewer).
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Compression settings, comma-separated, each `BITS:WINDOW[:SINKS[:GROUP]]`
    /// (defaults: 4 sinks, group 64); the dense cache is always run first.
    #[arg(long, default_value = "8:128,4:128,2:128,4:32")]
    pub settings: String,
    /// Tokens per teacher-forced forward.
    #[arg(long, default_value_t = 128)]
    pub chunk: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also run each setting calibrated (SKVQ): per layer, a channel permutation grouping
    /// channels of similar range and per-group clip ratios, fitted to the keys and values of
    /// the dense run's first `--calibration-tokens` tokens (label suffix `+cal`).
    #[arg(long)]
    pub calibrate: bool,
    /// Tokens whose keys and values calibrate.
    #[arg(long, default_value_t = 512)]
    pub calibration_tokens: usize,
}

/// One setting's figures (the `--json` fields).
#[derive(Debug, Clone, Serialize)]
pub struct KvEvalRow {
    /// `dense` or `BITS:WINDOW:SINKS:GROUP`.
    pub setting: String,
    /// Predictions compared.
    pub predictions: usize,
    /// Fraction of positions whose argmax equals the dense run's.
    pub top1_agreement: f64,
    /// Perplexity of the text's next tokens.
    pub perplexity: f64,
    /// Perplexity minus the dense run's.
    pub perplexity_delta: f64,
    /// KV storage bytes per cached token at the end (every page past the window packed).
    pub kv_bytes_per_token: f64,
    /// That over the dense (f32) cache's.
    pub kv_bytes_vs_f32: f64,
    /// Teacher-forced tokens per second.
    pub tokens_per_sec: f64,
}

/// `BITS:WINDOW[:SINKS[:GROUP]]`.
fn parse_setting(s: &str) -> Result<(u32, usize, usize, usize)> {
    let nums: Vec<usize> = s
        .split(':')
        .map(|x| x.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad setting {s:?} (BITS:WINDOW[:SINKS[:GROUP]])"))?;
    match nums[..] {
        [b, w] => Ok((b as u32, w, 4, 64)),
        [b, w, s] => Ok((b as u32, w, s, 64)),
        [b, w, s, g] => Ok((b as u32, w, s, g)),
        _ => bail!("bad setting {s:?} (BITS:WINDOW[:SINKS[:GROUP]])"),
    }
}

/// One teacher-forced pass.
struct Pass<B: Backend> {
    /// Argmax per position.
    top: Vec<usize>,
    perplexity: f64,
    /// KV bytes per cached token at the end.
    bytes: f64,
    tokens_per_sec: f64,
    /// The cache afterwards (the dense run's feeds calibration).
    cache: KvCache<B>,
}

/// Argmax per position and the text's perplexity, through a fresh cache.
fn run<B: Backend>(
    model: &Transformer<B>,
    ids: &[u32],
    chunk: usize,
    compression: Option<Arc<KvCompression>>,
    label: &str,
) -> Result<Pass<B>> {
    let mut cache = model.new_cache_with(16, compression);
    let bar = indicatif::ProgressBar::new(ids.len() as u64);
    bar.set_style(indicatif::ProgressStyle::with_template(
        "kv-eval {msg:>14} {bar:30} {pos}/{len} tokens {elapsed_precise}",
    )?);
    bar.set_message(label.to_string());
    let (mut top, mut nll) = (Vec::with_capacity(ids.len()), 0.0f64);
    let t0 = Instant::now();
    let inputs = &ids[..ids.len() - 1];
    for (c, part) in inputs.chunks(chunk).enumerate() {
        let start = c * chunk;
        let rows = model.forward_all_logits(&ForwardInput::causal(part, start), &mut cache)?;
        for (k, row) in rows.iter().enumerate() {
            top.push(argmax(row));
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let lse = row
                .iter()
                .map(|&x| f64::from(x - max).exp())
                .sum::<f64>()
                .ln()
                + f64::from(max);
            nll += lse - f64::from(row[ids[start + k + 1] as usize]);
        }
        bar.inc(part.len() as u64);
    }
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    // Steady state: every page that has left the window packed.
    if let Some(p) = cache.paged_store_mut() {
        p.compress();
    }
    let bytes = cache.bytes() as f64 / cache.len().max(1) as f64;
    Ok(Pass {
        top,
        perplexity: (nll / inputs.len() as f64).exp(),
        bytes,
        tokens_per_sec: inputs.len() as f64 / secs,
        cache,
    })
}

pub fn run_cmd(args: &KvEvalArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading {}", args.text.display()))?;
    let settings: Vec<(u32, usize, usize, usize)> = args
        .settings
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(parse_setting)
        .collect::<Result<_>>()?;
    if args.chunk == 0 {
        bail!("--chunk must be at least 1");
    }
    with_backend!(args.model.device, |B, device| {
        let m = LoadedModel::<B>::load(&args.model.model, args.model.resolve_options(), &device)?;
        let mut ids = m.tokenizer.encode(&text)?;
        if ids.len() < 2 {
            bail!("{} has fewer than 2 tokens", args.text.display());
        }
        let n = args.tokens.min(ids.len()).min(m.model.max_position());
        ids.truncate(n);
        let Some(layout) = m.model.kv_layout(16) else {
            bail!("kv-eval needs the CPU backend's paged cache");
        };
        let dense = run(&m.model, &ids, args.chunk, None, "dense")?;
        let (dense_top, dense_ppl, dense_bytes) = (&dense.top, dense.perplexity, dense.bytes);
        let mut rows = vec![KvEvalRow {
            setting: "dense".into(),
            predictions: dense_top.len(),
            top1_agreement: 1.0,
            perplexity: dense_ppl,
            perplexity_delta: 0.0,
            kv_bytes_per_token: dense_bytes,
            kv_bytes_vs_f32: 1.0,
            tokens_per_sec: dense.tokens_per_sec,
        }];
        let mut runs = Vec::new();
        for &(bits, window, sinks, group) in &settings {
            let label = format!("{bits}:{window}:{sinks}:{group}");
            let comp = KvCompression::uniform(&layout, bits, group, sinks, window)
                .map_err(|e| anyhow::anyhow!("setting {label}: {e}"))?;
            runs.push((label.clone(), comp));
            if args.calibrate {
                let Some(store) = dense.cache.paged_store() else {
                    bail!("calibration needs the CPU backend's paged cache");
                };
                let tokens = args.calibration_tokens;
                let comp = KvCompression::calibrated(store, bits, group, sinks, window, tokens)
                    .map_err(|e| anyhow::anyhow!("calibrating {label}: {e}"))?;
                runs.push((format!("{label}+cal"), comp));
            }
        }
        let dense_top = dense_top.clone();
        drop(dense);
        for (label, comp) in runs {
            let Pass {
                top,
                perplexity: ppl,
                bytes,
                tokens_per_sec: rate,
                ..
            } = run(&m.model, &ids, args.chunk, Some(Arc::new(comp)), &label)?;
            let agree = top.iter().zip(&dense_top).filter(|(a, b)| a == b).count();
            rows.push(KvEvalRow {
                setting: label,
                predictions: top.len(),
                top1_agreement: agree as f64 / top.len() as f64,
                perplexity: ppl,
                perplexity_delta: ppl - dense_ppl,
                kv_bytes_per_token: bytes,
                kv_bytes_vs_f32: bytes / dense_bytes,
                tokens_per_sec: rate,
            });
        }
        println!(
            "{} on {} ({} tokens)",
            m.name,
            args.text.display(),
            ids.len()
        );
        println!(
            "{:<16} {:>9} {:>10} {:>8} {:>12} {:>7} {:>8}",
            "setting", "top-1", "ppl", "Δppl", "KV B/token", "×f32", "tok/s"
        );
        for r in &rows {
            println!(
                "{:<16} {:>8.2}% {:>10.3} {:>+8.3} {:>12.0} {:>7.3} {:>8.1}",
                r.setting,
                100.0 * r.top1_agreement,
                r.perplexity,
                r.perplexity_delta,
                r.kv_bytes_per_token,
                r.kv_bytes_vs_f32,
                r.tokens_per_sec
            );
        }
        if let Some(p) = &args.json {
            std::fs::write(p, serde_json::to_string_pretty(&rows)?)
                .with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(())
    })
}
