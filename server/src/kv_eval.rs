//! `arbor kv-eval`: what KV-cache compression costs. Teacher-forces a model over a long text
//! with an exact cache and with each policy setting, and reports top-1 agreement with the
//! exact run, perplexity and its change, KV bytes per token and speed; then, per setting,
//! plain and speculative greedy decoding after the text (decode tokens/s, τ, and whether the
//! two produced the same tokens — they must).
//!
//! The text is fed in chunks. What a query reads under quantization and Quest depends on
//! positions and the query alone, so the chunk size changes speed, not the figures; H2O
//! evicts at forward starts, so settings with H2O are fed a page at a time, as decoding
//! would meet its eviction points.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use arbor_cache::{Calibration, KvCache, KvPolicy, QuantAxis, QuantConfig, StepFormat};
use arbor_engine::{Engine, Event, GenerateParams, Generator, Prompt, TreePolicy};
use arbor_model::sampling::argmax;
use arbor_model::{ForwardInput, KV_PAGE_SIZE, LoadedModel, Transformer};
use arbor_server::kv::KvSpec;
use arbor_speculators::NgramDraft;
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
    /// Policy settings, comma-separated; each joins parts with `+`:
    /// `BITS:WINDOW[:SINKS[:GROUP]]` (quantization, keys per channel), `tok` (keys per
    /// token instead), `vchan` (values per channel over a page, like keys), `ref=N` (N
    /// channels per KV head and page refined with a second code, in per-channel blocks),
    /// `f8` (per-channel blocks store each step in one byte instead of f16),
    /// `cal` (SKVQ-calibrated: `--calib`, else fitted on the exact run's first
    /// `--calibration-tokens` tokens), `quest=N` and `h2o=N` (token budgets; `N%` of
    /// `--tokens`). The exact cache always runs first.
    #[arg(long, default_value = "8:128,4:128,4:128+tok,2:128,quest=25%,h2o=50%")]
    pub settings: String,
    /// Tokens per teacher-forced forward (settings with H2O use the page size).
    #[arg(long, default_value_t = 128)]
    pub chunk: usize,
    /// A calibration from `arbor calibrate` for `cal` settings.
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Tokens whose keys and values calibrate `cal` settings without `--calib`.
    #[arg(long, default_value_t = 512)]
    pub calibration_tokens: usize,
    /// Tokens to decode after the text, plainly and speculatively (n-gram draft), per
    /// setting; 0 skips decoding.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Tokens per KV page (also the keys' per-channel quantization group). Decoding after
    /// the text runs the engine, whose pages are 16 tokens: other sizes need
    /// `--decode-tokens 0`.
    #[arg(long, default_value_t = KV_PAGE_SIZE)]
    pub page_size: usize,
    /// Tree shape of the speculative decode.
    #[arg(long, default_value = "3,1,1,1")]
    pub spec_tree: String,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One setting's figures (the `--json` fields).
#[derive(Debug, Clone, Serialize)]
pub struct KvEvalRow {
    /// `exact`, or the setting as given.
    pub setting: String,
    /// Predictions compared.
    pub predictions: usize,
    /// Fraction of positions whose argmax equals the exact run's.
    pub top1_agreement: f64,
    /// Perplexity of the text's next tokens.
    pub perplexity: f64,
    /// Perplexity minus the exact run's.
    pub perplexity_delta: f64,
    /// KV storage bytes per token of the sequence at the end (pages older than the window
    /// held only as codes; evicted tokens hold nothing).
    pub kv_bytes_per_token: f64,
    /// That over the exact (f32) cache's.
    pub kv_bytes_vs_f32: f64,
    /// Teacher-forced tokens per second.
    pub tokens_per_sec: f64,
    /// Plain greedy decoding after the text: tokens per second.
    pub decode_tokens_per_sec: Option<f64>,
    /// Speculative greedy decoding after the text: tokens per second.
    pub spec_tokens_per_sec: Option<f64>,
    /// Its tokens per verification step τ.
    pub tau: Option<f64>,
    /// Whether speculative and plain decoding produced the same tokens.
    pub spec_matches_plain: Option<bool>,
}

/// One parsed `--settings` entry.
#[derive(Debug, Clone, PartialEq)]
struct Setting {
    label: String,
    /// Quantization and budgets (no calibration file: `calibrated` picks one).
    spec: KvSpec,
    calibrated: bool,
}

fn parse_setting(s: &str, tokens: usize) -> Result<Setting> {
    let label = s.trim().to_string();
    let mut out = Setting {
        label: label.clone(),
        spec: KvSpec::default(),
        calibrated: false,
    };
    let budget = |v: &str| -> Result<usize> {
        match v.strip_suffix('%') {
            Some(p) => Ok(tokens * p.parse::<usize>()? / 100),
            None => Ok(v.parse()?),
        }
    };
    let (mut tok, mut cal, mut vchan, mut refine) = (false, false, false, None);
    let mut f8 = false;
    for part in label.split('+').map(str::trim) {
        let bad = || format!("bad setting part {part:?} in {label:?}");
        if part == "tok" {
            tok = true;
        } else if part == "vchan" {
            vchan = true;
        } else if part == "f8" {
            f8 = true;
        } else if let Some(v) = part.strip_prefix("ref=") {
            refine = Some(v.parse::<usize>().with_context(bad)?);
        } else if part == "cal" {
            cal = true;
        } else if let Some(v) = part.strip_prefix("quest=") {
            out.spec.quest_budget = Some(budget(v).with_context(bad)?);
        } else if let Some(v) = part.strip_prefix("h2o=") {
            out.spec.h2o_budget = Some(budget(v).with_context(bad)?);
        } else {
            let nums: Vec<usize> = part
                .split(':')
                .map(|x| x.parse::<usize>())
                .collect::<Result<_, _>>()
                .with_context(bad)?;
            let (bits, window, sinks, group) = match nums[..] {
                [b, w] => (b, w, 4, 64),
                [b, w, s] => (b, w, s, 64),
                [b, w, s, g] => (b, w, s, g),
                _ => bail!("{} (BITS:WINDOW[:SINKS[:GROUP]])", bad()),
            };
            out.spec.quant = Some(QuantConfig {
                bits: bits as u32,
                group,
                sinks,
                window,
                ..QuantConfig::default()
            });
        }
    }
    match &mut out.spec.quant {
        Some(q) => {
            if tok {
                q.keys = QuantAxis::Token;
            }
            if vchan {
                q.values = QuantAxis::Channel;
            }
            q.refine = refine.unwrap_or(0);
            if f8 {
                q.steps = StepFormat::F8;
            }
        }
        None if tok || cal || vchan || f8 || refine.is_some() => {
            bail!("{label:?}: `tok`, `vchan`, `ref=N`, `f8` and `cal` qualify a BITS:WINDOW part")
        }
        None => {}
    }
    out.calibrated = cal;
    Ok(out)
}

/// One teacher-forced pass.
struct Pass<B: Backend> {
    /// Argmax per position.
    top: Vec<usize>,
    perplexity: f64,
    /// KV bytes per sequence token at the end.
    bytes: f64,
    tokens_per_sec: f64,
    /// The cache afterwards (the exact run's feeds calibration).
    cache: KvCache<B>,
}

/// Argmax per position and the text's perplexity, through a fresh cache.
fn teacher_forced<B: Backend>(
    model: &Transformer<B>,
    ids: &[u32],
    (chunk, page_size): (usize, usize),
    policy: Option<Arc<KvPolicy>>,
    label: &str,
) -> Result<Pass<B>> {
    let mut cache = model.new_cache_with(page_size, policy);
    let bar = indicatif::ProgressBar::new(ids.len() as u64);
    bar.set_style(indicatif::ProgressStyle::with_template(
        "kv-eval {msg:>22} {bar:30} {pos}/{len} tokens {elapsed_precise}",
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
    // Steady state: no full-precision copy of a page older than the window.
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

/// Decoding after the text under `policy`: plain decode tok/s, speculative tok/s, τ, and
/// whether both produced the same tokens.
struct Decode {
    plain_rate: f64,
    spec_rate: f64,
    tau: f64,
    same: bool,
}

fn decode<B: Backend>(
    m: &LoadedModel<B>,
    ids: &[u32],
    n: usize,
    tree: &TreePolicy,
    policy: Option<Arc<KvPolicy>>,
) -> Result<Decode> {
    let params = GenerateParams {
        max_tokens: n,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let prompt = Prompt::Tokens(ids.to_vec());
    let mut plain = Generator::new(&m.model, &m.tokenizer);
    let mut spec =
        Engine::new(&m.model, &m.tokenizer, tree.clone()).with_draft(NgramDraft::default());
    if let Some(p) = policy {
        plain = plain.with_kv_policy(p.clone())?;
        spec = spec.with_kv_policy(p)?;
    }
    let done = |events: &mut dyn Iterator<Item = Result<Event, arbor_engine::EngineError>>| {
        let mut last = None;
        for e in events {
            if let Event::Done(d) = e? {
                last = Some(d);
            }
        }
        last.context("generation ended without Done")
    };
    let a = done(&mut plain.generate(&prompt, &params)?)?;
    let b = done(&mut spec.generate(&prompt, &params)?)?;
    Ok(Decode {
        plain_rate: a.stats.decode_tokens_per_sec(),
        spec_rate: b.stats.decode_tokens_per_sec(),
        tau: b.spec.as_ref().map_or(1.0, arbor_engine::SpecStats::tau),
        same: a.tokens == b.tokens,
    })
}

pub fn run_cmd(args: &KvEvalArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading {}", args.text.display()))?;
    let settings: Vec<Setting> = args
        .settings
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| parse_setting(s, args.tokens))
        .collect::<Result<_>>()?;
    if args.chunk == 0 {
        bail!("--chunk must be at least 1");
    }
    let tree: TreePolicy = args.spec_tree.parse().context("--spec-tree")?;
    let calib = args
        .calib
        .as_deref()
        .map(arbor_server::kv::load_calibration)
        .transpose()?;
    with_backend!(args.model.device, |B, device| {
        let m = LoadedModel::<B>::load(&args.model.model, args.model.resolve_options(), &device)?;
        let mut ids = m.tokenizer.encode(&text)?;
        if ids.len() < 2 {
            bail!("{} has fewer than 2 tokens", args.text.display());
        }
        let room = m
            .model
            .max_position()
            .saturating_sub(args.decode_tokens + 1);
        let n = args.tokens.min(ids.len()).min(room);
        ids.truncate(n);
        if args.page_size == 0 || (args.page_size != KV_PAGE_SIZE && args.decode_tokens > 0) {
            bail!(
                "--page-size {} needs --decode-tokens 0 (decoding runs the engine's {KV_PAGE_SIZE}-token pages)",
                args.page_size
            );
        }
        let Some(layout) = m.model.kv_layout(args.page_size) else {
            bail!("kv-eval needs the CPU backend's paged cache");
        };
        // Every setting's policy is built once up front, so a bad one fails before any pass.
        let build = |s: &Setting, cal: Option<&Calibration>| -> Result<Arc<KvPolicy>> {
            s.spec
                .policy(&layout, cal)
                .with_context(|| format!("setting {}", s.label))
        };
        for s in &settings {
            build(s, calib.as_ref().filter(|_| s.calibrated))?;
        }
        let exact = teacher_forced(&m.model, &ids, (args.chunk, args.page_size), None, "exact")?;
        // Without `--calib`, one fit per (bits, group) the `cal` settings ask for.
        let mut fitted: Vec<((u32, usize), Calibration)> = Vec::new();
        if calib.is_none() {
            let store = exact.cache.paged_store().context("paged cache")?;
            for q in settings
                .iter()
                .filter(|s| s.calibrated)
                .filter_map(|s| s.spec.quant)
            {
                let key = (q.bits, q.group.min(layout.head_dim));
                if !fitted.iter().any(|(k, _)| *k == key) {
                    let cal = Calibration::fit(store, q.bits, q.group, args.calibration_tokens)?;
                    fitted.push((key, cal));
                }
            }
        }
        let (exact_top, exact_ppl, exact_bytes) =
            (exact.top.clone(), exact.perplexity, exact.bytes);
        let exact_rate = exact.tokens_per_sec;
        drop(exact);
        let mut rows = Vec::new();
        let mut push = |label: String, pass: &Pass<B>, d: Option<Decode>| {
            let agree = pass
                .top
                .iter()
                .zip(&exact_top)
                .filter(|(a, b)| a == b)
                .count();
            rows.push(KvEvalRow {
                setting: label,
                predictions: pass.top.len(),
                top1_agreement: agree as f64 / pass.top.len() as f64,
                perplexity: pass.perplexity,
                perplexity_delta: pass.perplexity - exact_ppl,
                kv_bytes_per_token: pass.bytes,
                kv_bytes_vs_f32: pass.bytes / exact_bytes,
                tokens_per_sec: pass.tokens_per_sec,
                decode_tokens_per_sec: d.as_ref().map(|d| d.plain_rate),
                spec_tokens_per_sec: d.as_ref().map(|d| d.spec_rate),
                tau: d.as_ref().map(|d| d.tau),
                spec_matches_plain: d.as_ref().map(|d| d.same),
            });
        };
        let dec = |policy: Option<Arc<KvPolicy>>| -> Result<Option<Decode>> {
            (args.decode_tokens > 0)
                .then(|| decode(&m, &ids, args.decode_tokens, &tree, policy))
                .transpose()
        };
        // The exact row again through `push` keeps one code path for every row.
        let exact = Pass {
            top: exact_top.clone(),
            perplexity: exact_ppl,
            bytes: exact_bytes,
            tokens_per_sec: exact_rate,
            cache: m.model.new_cache(),
        };
        push("exact".into(), &exact, dec(None)?);
        for s in &settings {
            let cal = match (s.calibrated, s.spec.quant) {
                (true, Some(q)) => calib.as_ref().or_else(|| {
                    let key = (q.bits, q.group.min(layout.head_dim));
                    fitted.iter().find(|(k, _)| *k == key).map(|(_, c)| c)
                }),
                _ => None,
            };
            let policy = build(s, cal)?;
            let chunk = if s.spec.h2o_budget.is_some() {
                args.chunk.min(args.page_size)
            } else {
                args.chunk
            };
            let sizes = (chunk, args.page_size);
            let pass = teacher_forced(&m.model, &ids, sizes, Some(policy.clone()), &s.label)?;
            push(s.label.clone(), &pass, dec(Some(policy))?);
        }
        println!(
            "{} on {} ({} tokens)",
            m.name,
            args.text.display(),
            ids.len()
        );
        println!(
            "{:<24} {:>8} {:>9} {:>8} {:>9} {:>6} {:>7} {:>8} {:>8} {:>5} {:>5}",
            "setting",
            "top-1",
            "ppl",
            "Δppl",
            "KV B/tok",
            "×f32",
            "tf t/s",
            "dec t/s",
            "spec t/s",
            "τ",
            "same"
        );
        let opt = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |v| format!("{v:.p$}"));
        for r in &rows {
            println!(
                "{:<24} {:>7.2}% {:>9.3} {:>+8.3} {:>9.0} {:>6.3} {:>7.1} {:>8} {:>8} {:>5} {:>5}",
                r.setting,
                100.0 * r.top1_agreement,
                r.perplexity,
                r.perplexity_delta,
                r.kv_bytes_per_token,
                r.kv_bytes_vs_f32,
                r.tokens_per_sec,
                opt(r.decode_tokens_per_sec, 1),
                opt(r.spec_tokens_per_sec, 1),
                opt(r.tau, 2),
                r.spec_matches_plain
                    .map_or("-", |s| if s { "yes" } else { "NO" }),
            );
        }
        if let Some(p) = &args.json {
            std::fs::write(p, serde_json::to_string_pretty(&rows)?)
                .with_context(|| format!("writing {}", p.display()))?;
        }
        if rows.iter().any(|r| r.spec_matches_plain == Some(false)) {
            bail!("speculative decoding diverged from plain decoding under a policy (a bug)");
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_parts_and_percentages() {
        let s = parse_setting("4:128+tok+cal+quest=25%+h2o=300", 4000).unwrap();
        let q = s.spec.quant.unwrap();
        assert_eq!((q.bits, q.window, q.sinks, q.group), (4, 128, 4, 64));
        assert_eq!(q.keys, QuantAxis::Token);
        assert!(s.calibrated);
        assert_eq!(
            (s.spec.quest_budget, s.spec.h2o_budget),
            (Some(1000), Some(300))
        );
        assert!(
            parse_setting("quest=1024", 10)
                .unwrap()
                .spec
                .quant
                .is_none()
        );
        assert!(parse_setting("tok", 10).is_err());
        let v = parse_setting("4:128:4:16+vchan+ref=8+f8", 10).unwrap();
        let q = v.spec.quant.unwrap();
        assert_eq!(
            (q.keys, q.values, q.refine, q.group, q.steps),
            (
                QuantAxis::Channel,
                QuantAxis::Channel,
                8,
                16,
                StepFormat::F8
            )
        );
        let plain = parse_setting("4:128", 10).unwrap().spec.quant.unwrap();
        assert_eq!((plain.refine, plain.steps), (0, StepFormat::F16));
        assert!(parse_setting("vchan", 10).is_err());
        assert!(parse_setting("quest=25%+f8", 10).is_err());
        assert!(parse_setting("4:128+ref=x", 10).is_err());
        assert!(parse_setting("4", 10).is_err());
        assert!(parse_setting("quest=x", 10).is_err());
    }
}
