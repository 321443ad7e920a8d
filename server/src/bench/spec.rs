//! `arbor bench --draft ... --prompts FILE`: acceptance and speed of speculative decoding,
//! with plain decoding of the same target on the same prompts in the same run.

use anyhow::{Context, Result, bail};
use arbor_engine::{Engine, Event, Finished, GenerateParams, Generator, SpecStats, TreePolicy};
use arbor_model::LoadedModel;
use arbor_speculators::NgramDraft;

use super::BenchArgs;
use super::prompts::load;
use super::report::{PromptFigures, Report, Run, add, figures, print_table};
use crate::cli::with_backend;

/// A `--draft` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DraftSpec {
    /// `ngram` or `ngram:MAX_N`: prompt lookup.
    Ngram(usize),
    /// `self:N[@f16]`: the target's first N layers with its norm and head (sharing the
    /// target's weights, or an f16 copy of them).
    SelfLayers(usize, bool),
    /// Anything else: a model (short name, path or hub id) sharing the target's tokenizer,
    /// with f16 weights unless `@f32` is appended.
    Model(String, bool),
}

impl DraftSpec {
    pub fn parse(spec: &str) -> Result<Self> {
        let (s, f16) = match spec.rsplit_once('@') {
            Some((s, "f16")) => (s, Some(true)),
            Some((s, "f32")) => (s, Some(false)),
            Some(_) => bail!("bad --draft {spec:?}: the precision suffix is @f16 or @f32"),
            None => (spec, None),
        };
        let num = |x: &str| -> Result<usize> {
            match x.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => bail!("bad --draft {s:?}: expected a positive number after ':'"),
            }
        };
        Ok(if s == "ngram" || s.starts_with("ngram:") {
            if f16.is_some() {
                bail!("bad --draft {spec:?}: the n-gram draft has no weights");
            }
            match s.strip_prefix("ngram:") {
                Some(n) => Self::Ngram(num(n)?),
                None => Self::Ngram(NgramDraft::default().max_n),
            }
        } else if let Some(n) = s.strip_prefix("self:") {
            Self::SelfLayers(num(n)?, f16.unwrap_or(false))
        } else {
            Self::Model(s.to_string(), f16.unwrap_or(true))
        })
    }
}

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
    let drafts: Vec<DraftSpec> = args
        .drafts
        .iter()
        .map(|d| DraftSpec::parse(d))
        .collect::<Result<_>>()?;
    let sampling = args.sampling.params();
    sampling.validate()?;
    with_backend!(args.model.device, |B, device| {
        let target =
            LoadedModel::<B>::load(&args.model.model, args.model.resolve_options(), &device)?;
        let mut engine = Engine::new(&target.model, &target.tokenizer, policy.clone());
        for d in &drafts {
            engine = match d {
                DraftSpec::Ngram(n) => engine.with_draft(NgramDraft {
                    max_n: *n,
                    ..NgramDraft::default()
                }),
                DraftSpec::SelfLayers(n, f16) => {
                    let mut m = target.model.truncated(*n)?;
                    if *f16 {
                        m = m.with_f16_weights();
                    }
                    let name = format!("self:{n}{}", if *f16 { "@f16" } else { "" });
                    engine.with_model_draft(&name, &m, &target.tokenizer)?
                }
                DraftSpec::Model(name, f16) => {
                    let loaded =
                        LoadedModel::<B>::load(name, args.model.resolve_options(), &device)
                            .with_context(|| format!("loading draft {name}"))?;
                    let (m, label) = if *f16 {
                        (
                            loaded.model.with_f16_weights(),
                            format!("{}@f16", loaded.name),
                        )
                    } else {
                        (loaded.model.clone(), loaded.name.clone())
                    };
                    drop(loaded.model);
                    engine.with_model_draft(&label, &m, &loaded.tokenizer)?
                }
            };
        }
        let plain = Generator::new(&target.model, &target.tokenizer);
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
            add(&mut total, &stats);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draft_specs() {
        let p = |s: &str| DraftSpec::parse(s).unwrap();
        assert_eq!(p("ngram"), DraftSpec::Ngram(4));
        assert_eq!(p("ngram:2"), DraftSpec::Ngram(2));
        assert_eq!(p("self:6"), DraftSpec::SelfLayers(6, false));
        assert_eq!(p("self:6@f16"), DraftSpec::SelfLayers(6, true));
        assert_eq!(p("qwen"), DraftSpec::Model("qwen".into(), true));
        assert_eq!(
            p("./m.gguf@f32"),
            DraftSpec::Model("./m.gguf".into(), false)
        );
        for bad in ["self:0", "ngram:x", "ngram@f16", "m@q4"] {
            assert!(DraftSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
