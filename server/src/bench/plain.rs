//! `arbor bench --plain`: prefill and decode throughput of plain decoding.

use anyhow::{Result, bail};
use arbor_engine::{Event, GenerateParams, Generator, Prompt};
use arbor_model::LoadedModel;
use serde::Serialize;

use super::BenchArgs;
use crate::cli::with_backend;

/// Results of `arbor bench --plain` (the `--json` output).
#[derive(Debug, Serialize)]
struct PlainBench {
    model: String,
    threads: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
    repeats: usize,
    /// Mean prompt tokens per second over the runs.
    prefill_tokens_per_sec: f64,
    /// Mean generated tokens per second (after the first token) over the runs.
    decode_tokens_per_sec: f64,
    /// The prompt's token ids (so other engines can be measured on the same input).
    prompt: Vec<u32>,
}

/// Source text for benchmark prompts: real prose, repeated to the length asked for.
const TEXT: &str = "The old lighthouse keeper climbed the spiral stairs every evening at dusk, \
counting the one hundred and twelve steps as his father had taught him. From the lamp room he \
could see the fishing boats returning, their lanterns bobbing on the grey water like fireflies. \
He wrote the weather in a leather ledger: wind from the north-east, a falling glass, rain by \
morning. def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n";

/// `n` tokens of [`TEXT`], repeated as needed.
pub(super) fn synthetic_prompt(tok: &arbor_model::Tokenizer, n: usize) -> Result<Vec<u32>> {
    let unit = tok.encode(TEXT)?;
    Ok(unit.iter().copied().cycle().take(n).collect())
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if args.prompt_tokens == 0 || args.gen_tokens == 0 || args.repeats == 0 {
        bail!("--prompt-tokens, --gen-tokens and --repeats must be at least 1");
    }
    with_backend!(args.model.device, |B, device| {
        let loaded =
            LoadedModel::<B>::load(&args.model.model, args.model.resolve_options(), &device)?;
        let tok = &loaded.tokenizer;
        let prompt = synthetic_prompt(tok, args.prompt_tokens)?;
        let params = GenerateParams {
            max_tokens: args.gen_tokens,
            ignore_eos: true,
            sampling: args.sampling.params(),
            ..GenerateParams::default()
        };
        let mut generator = Generator::new(&loaded.model, tok);
        if let Some(kv) = args
            .kv
            .spec()
            .build(loaded.model.kv_layout(arbor_model::KV_PAGE_SIZE))?
        {
            generator = generator.with_kv_policy(kv)?;
        }
        let bar = indicatif::ProgressBar::new((args.repeats + 1) as u64);
        bar.set_style(indicatif::ProgressStyle::with_template(
            "bench {bar:30} {pos}/{len} runs {msg}",
        )?);
        let (mut pre, mut dec) = (0.0, 0.0);
        for run in 0..=args.repeats {
            let mut stats = None;
            for ev in generator.generate(&Prompt::Tokens(prompt.clone()), &params)? {
                if let Event::Done(d) = ev? {
                    stats = Some(d.stats);
                }
            }
            let s = stats.expect("a generation always ends with Done");
            if run > 0 {
                pre += s.prefill_tokens_per_sec();
                dec += s.decode_tokens_per_sec();
            }
            bar.set_message(format!("decode {:.1} tok/s", s.decode_tokens_per_sec()));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let r = PlainBench {
            model: loaded.name.clone(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            prompt_tokens: args.prompt_tokens,
            gen_tokens: args.gen_tokens,
            repeats: args.repeats,
            prefill_tokens_per_sec: pre / args.repeats as f64,
            decode_tokens_per_sec: dec / args.repeats as f64,
            prompt,
        };
        println!(
            "{:<40} prefill {:>8.1} tok/s   decode {:>7.2} tok/s   ({} prompt, {} generated, {} threads)",
            r.model,
            r.prefill_tokens_per_sec,
            r.decode_tokens_per_sec,
            r.prompt_tokens,
            r.gen_tokens,
            r.threads
        );
        if let Some(p) = &args.json {
            std::fs::write(p, serde_json::to_string_pretty(&r)?)?;
        }
        Ok(())
    })
}
