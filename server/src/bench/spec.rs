//! `arbor bench --draft ... --prompts FILE`: acceptance and speed of speculative decoding,
//! with plain decoding of the same target on the same prompts in the same run.

use anyhow::{Context, Result, bail};
use arbor_engine::{Event, Finished, GenerateParams, Generator, SpecStats, TreePolicy};
use arbor_model::LoadedModel;

use super::BenchArgs;
use super::prompts::load;
use super::report::{PromptFigures, Report, Run, figures, print_table};
use crate::cli::with_backend;
use arbor_server::drafts::{DraftSpec, build_engine, load_drafts};

fn finish(
    events: impl Iterator<Item = Result<Event, arbor_engine::EngineError>>,
) -> Result<Finished> {
    for e in events {
        if let Event::Done(d) = e? {
            return Ok(d);
        }
    }
    bail!("generation ended without a final event")
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let Some(prompts_file) = &args.prompts else {
        bail!("speculative benchmarks need --prompts FILE.jsonl[.gz] (see bench/prompts/)");
    };
    let mut prompts = load(prompts_file)?;
    if let Some(n) = args.limit {
        prompts.truncate(n);
    }
    let policy: TreePolicy = args.tree.parse()?;
    let drafts = DraftSpec::parse_all(&args.drafts)?;
    let sampling = args.sampling.params();
    sampling.validate()?;
    with_backend!(args.model.device, |B, device| {
        let target =
            LoadedModel::<B>::load(&args.model.model, args.model.resolve_options(), &device)?;
        let loaded = load_drafts(&target, &drafts, args.model.resolve_options(), &device)?;
        let mut engine = build_engine(&target, &loaded, policy.clone())?;
        let mut plain = Generator::new(&target.model, &target.tokenizer);
        // Both sides under the same KV policy: the comparison is speculation, not compression.
        if let Some(kv) = args
            .kv
            .spec()
            .build(target.model.kv_layout(arbor_model::KV_PAGE_SIZE))?
        {
            engine = engine.with_kv_policy(kv.clone())?;
            plain = plain.with_kv_policy(kv)?;
        }
        let bar = indicatif::ProgressBar::new(prompts.len() as u64);
        bar.set_style(indicatif::ProgressStyle::with_template(
            "bench {bar:30} {pos}/{len} prompts {elapsed_precise} {msg}",
        )?);
        let mut results = Vec::new();
        let (mut total, mut spec_all, mut plain_all) =
            (SpecStats::default(), Run::default(), Run::default());
        for (i, p) in prompts.iter().enumerate() {
            let mut params = GenerateParams {
                max_tokens: args.max_tokens,
                ignore_eos: args.ignore_eos,
                ..GenerateParams::default()
            };
            params.sampling = sampling.clone();
            if !sampling.is_greedy() {
                params.sampling.seed = Some(sampling.seed.unwrap_or(0) + i as u64);
            }
            let prompt_tokens = plain.prompt_tokens(&p.prompt)?.len();
            let base = finish(plain.generate(&p.prompt, &params)?)?;
            let spec = finish(engine.generate(&p.prompt, &params)?)?;
            let stats = spec.spec.clone().unwrap_or_default();
            let (s_run, p_run) = (Run::of(&spec), Run::of(&base));
            total.merge(&stats);
            spec_all.add(s_run);
            plain_all.add(p_run);
            let f = figures(&stats, s_run, p_run);
            bar.set_message(format!(
                "tau {:.2}, speedup {:.2}x (last {:.2}x)",
                total.tau(),
                figures(&total, spec_all, plain_all).speedup,
                f.speedup
            ));
            bar.inc(1);
            results.push(PromptFigures {
                id: p.id.clone(),
                prompt_tokens,
                matches_plain: sampling.is_greedy().then(|| spec.tokens == base.tokens),
                figures: f,
            });
        }
        bar.finish_and_clear();
        let report = Report {
            target: target.name.clone(),
            drafts: engine.draft_names(),
            tree: policy.to_string(),
            max_tokens: args.max_tokens,
            temperature: sampling.temperature,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            prompts_file: prompts_file.display().to_string(),
            overall: figures(&total, spec_all, plain_all),
            prompts: results,
            planner: engine.planner().clone(),
        };
        print_table(&report);
        if let Some(out) = &args.json {
            std::fs::write(out, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("writing {}", out.display()))?;
        }
        if let Some(out) = &args.plot {
            super::plot::draw(&report, out)?;
        }
        Ok(())
    })
}
