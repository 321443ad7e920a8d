//! Figures of `arbor bench` (speculative mode): per prompt and overall, as JSON and a table.
//! Field names are documented in the README ("`arbor bench` JSON").

use arbor_engine::{Finished, Planner, SpecStats};
use serde::Serialize;

/// Acceptance of one draft.
#[derive(Debug, Clone, Serialize)]
pub struct DraftFigures {
    pub name: String,
    pub drafted: usize,
    pub accepted: usize,
    pub alpha: f64,
    pub secs: f64,
}

/// Acceptance at one depth.
#[derive(Debug, Clone, Serialize)]
pub struct DepthFigures {
    pub depth: usize,
    pub tried: usize,
    pub accepted: usize,
    pub alpha: f64,
}

/// Speculation figures for one prompt or for all of them.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub generated_tokens: usize,
    pub steps: usize,
    pub tau: f64,
    pub alpha: f64,
    pub drafted: usize,
    pub accepted: usize,
    pub draft_secs: f64,
    pub verify_secs: f64,
    pub other_secs: f64,
    pub spec_decode_secs: f64,
    pub plain_decode_secs: f64,
    pub plain_generated_tokens: usize,
    pub spec_tokens_per_sec: f64,
    pub plain_tokens_per_sec: f64,
    pub speedup: f64,
    pub per_draft: Vec<DraftFigures>,
    pub per_depth: Vec<DepthFigures>,
}

/// One prompt's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PromptFigures {
    pub id: String,
    pub prompt_tokens: usize,
    /// Greedy only: whether speculative output equals plain output token for token.
    pub matches_plain: Option<bool>,
    #[serde(flatten)]
    pub figures: Figures,
}

/// The whole `--json` document.
#[derive(Debug, Serialize)]
pub struct Report {
    pub target: String,
    pub drafts: Vec<String>,
    pub tree: String,
    pub max_tokens: usize,
    pub temperature: f32,
    pub threads: usize,
    pub prompts_file: String,
    pub prompts: Vec<PromptFigures>,
    pub overall: Figures,
    pub planner: Planner,
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

/// Token counts and decode time of one or more generations. Decode excludes the prompt and
/// the first token (prefill).
#[derive(Debug, Clone, Copy, Default)]
pub struct Run {
    pub generated: usize,
    pub decode_tokens: usize,
    pub decode_secs: f64,
}

impl Run {
    pub fn of(f: &Finished) -> Self {
        Self {
            generated: f.stats.generated_tokens,
            decode_tokens: f.stats.generated_tokens.saturating_sub(1),
            decode_secs: f.stats.decode.as_secs_f64(),
        }
    }

    pub fn add(&mut self, o: Self) {
        self.generated += o.generated;
        self.decode_tokens += o.decode_tokens;
        self.decode_secs += o.decode_secs;
    }
}

/// Figures from speculation statistics and the speculative and plain runs.
pub fn figures(spec: &SpecStats, spec_run: Run, plain_run: Run) -> Figures {
    let (generated, spec_secs) = (spec_run.generated, spec_run.decode_secs);
    let (plain_gen, plain_secs) = (plain_run.generated, plain_run.decode_secs);
    let draft = spec.draft_time.as_secs_f64();
    let verify = spec.verify_time.as_secs_f64();
    let spec_rate = rate(spec_run.decode_tokens, spec_secs);
    let plain_rate = rate(plain_run.decode_tokens, plain_secs);
    Figures {
        generated_tokens: generated,
        steps: spec.steps,
        tau: spec.tau(),
        alpha: spec.alpha(),
        drafted: spec.drafted,
        accepted: spec.accepted,
        draft_secs: draft,
        verify_secs: verify,
        other_secs: (spec_secs - draft - verify).max(0.0),
        spec_decode_secs: spec_secs,
        plain_decode_secs: plain_secs,
        plain_generated_tokens: plain_gen,
        spec_tokens_per_sec: spec_rate,
        plain_tokens_per_sec: plain_rate,
        speedup: if plain_rate > 0.0 {
            spec_rate / plain_rate
        } else {
            0.0
        },
        per_draft: spec
            .drafts
            .iter()
            .map(|d| DraftFigures {
                name: d.name.clone(),
                drafted: d.drafted,
                accepted: d.accepted,
                alpha: d.alpha(),
                secs: d.time.as_secs_f64(),
            })
            .collect(),
        per_depth: spec
            .depths
            .iter()
            .enumerate()
            .map(|(i, d)| DepthFigures {
                depth: i + 1,
                tried: d.tried,
                accepted: d.accepted,
                alpha: d.alpha(),
            })
            .collect(),
    }
}

/// The table printed on stdout.
pub fn print_table(r: &Report) {
    println!(
        "target {} | drafts {} | tree {} | max {} tokens | T={} | {} threads",
        r.target,
        r.drafts.join(", "),
        r.tree,
        r.max_tokens,
        r.temperature,
        r.threads
    );
    println!(
        "{:<22} {:>6} {:>5} {:>5} {:>5} {:>6} {:>6} {:>9} {:>9} {:>7} {:>5}",
        "prompt",
        "prompt",
        "gen",
        "tau",
        "alpha",
        "draft%",
        "verif%",
        "spec t/s",
        "plain t/s",
        "speedup",
        "same"
    );
    let row = |id: &str, prompt: String, f: &Figures, same: &str| {
        let share = |x: f64| {
            if f.spec_decode_secs > 0.0 {
                100.0 * x / f.spec_decode_secs
            } else {
                0.0
            }
        };
        let id: String = id.chars().take(22).collect();
        println!(
            "{:<22} {:>6} {:>5} {:>5.2} {:>5.2} {:>6.1} {:>6.1} {:>9.2} {:>9.2} {:>6.2}x {:>5}",
            id,
            prompt,
            f.generated_tokens,
            f.tau,
            f.alpha,
            share(f.draft_secs),
            share(f.verify_secs),
            f.spec_tokens_per_sec,
            f.plain_tokens_per_sec,
            f.speedup,
            same
        );
    };
    for p in &r.prompts {
        let same = match p.matches_plain {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        row(&p.id, p.prompt_tokens.to_string(), &p.figures, same);
    }
    let o = &r.overall;
    let same = r.prompts.iter().filter_map(|p| p.matches_plain);
    let (n, ok) = same.fold((0, 0), |(n, ok), s| (n + 1, ok + usize::from(s)));
    let same = if n > 0 {
        format!("{ok}/{n}")
    } else {
        "-".into()
    };
    row("OVERALL", String::new(), o, &same);
    for d in &o.per_draft {
        println!(
            "  draft {:<20} alpha {:.3} ({} of {} nodes), {:.1} s",
            d.name, d.alpha, d.accepted, d.drafted, d.secs
        );
    }
    let depths: Vec<String> = o
        .per_depth
        .iter()
        .map(|d| format!("{}:{:.2}", d.depth, d.alpha))
        .collect();
    println!(
        "  acceptance by depth (accepted / tried): {}",
        depths.join("  ")
    );
}
