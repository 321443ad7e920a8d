//! `--draft` values shared by `generate`, `bench` and `serve`, loading them, and building an
//! [`Engine`] or a [`BatchEngine`] from them.

use anyhow::{Context, Result, bail};
use arbor_engine::{BatchEngine, Engine, SchedulerConfig, TreePolicy, check_same_tokenizer};
use arbor_kernels::quant::GgmlType;
use arbor_model::hub::ResolveOptions;
use arbor_model::{LoadedModel, Transformer};
use arbor_speculators::NgramDraft;

use crate::coarse::Coarse;
use burn::tensor::backend::Backend;

/// A `--draft` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DraftSpec {
    /// `ngram` or `ngram:MAX_N`: prompt lookup.
    Ngram(usize),
    /// `self:N[@f16]`: the target's first N layers with its norm and head (sharing the
    /// target's weights, or an f16 copy of them).
    SelfLayers(usize, bool),
    /// Anything else: a model (short name, path or hub id) sharing the target's tokenizer.
    Model(ModelDraft),
}

/// A model `--draft`: `NAME[@f16|@f32][@q4_1][@head=…][@coarse[=RANK:CANDIDATES]|@exact]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDraft {
    /// Short name, path or hub id.
    pub name: String,
    /// Weights held as f32 (float checkpoints, `--f32-weights`) become f16 (unless `@f32`);
    /// block-quantized (GGUF) weights are used as stored.
    pub f16: bool,
    /// `@q4_1`: every GGUF-block projection re-quantized to Q4_1 at load
    /// ([`Transformer::with_weights_requantized`]).
    pub q4_1: bool,
    /// `@head=…`: a change to its output head.
    pub head: Option<HeadChange>,
    /// `@coarse[=RANK:CANDIDATES]`: its head scored in two passes ([`crate::coarse`]); the
    /// default where [`crate::coarse::by_default`] says so.
    pub coarse: Option<Coarse>,
    /// `@exact`: no two-pass head, even where it would be the default.
    pub exact: bool,
}

/// A model draft's `@head=…` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadChange {
    /// `@head=N`: only the first N token ids ([`Transformer::with_head_rows`]).
    Rows(usize),
    /// `@head=q4_1`: the head re-quantized to Q4_1 ([`Transformer::with_head_requantized`]).
    /// The default for drafts whose head is Q8_0 ([`DEFAULT_HEAD_Q4_1`]).
    Q4_1,
    /// `@head=keep`: the head as stored (no default re-quantization).
    Keep,
}

/// Draft heads stored in these formats are re-quantized to Q4_1 unless `@head=…` says
/// otherwise: measured on Qwen2.5-Coder-0.5B (Q8_0 head, 144 → 85 MB) as the 1.5B's draft,
/// HumanEval × 16, `chain:3`: acceptance 0.869 → 0.877 (1 049 vs 1 051 accepted nodes), draft
/// time −14%.
pub const DEFAULT_HEAD_Q4_1: [GgmlType; 1] = [GgmlType::Q8_0];

impl HeadChange {
    fn parse(v: &str) -> Option<Self> {
        match v {
            "q4_1" => return Some(Self::Q4_1),
            "keep" => return Some(Self::Keep),
            _ => {}
        }
        match v.parse::<usize>() {
            Ok(n) if n >= 8 && n.is_multiple_of(8) => Some(Self::Rows(n)),
            _ => None,
        }
    }
}

impl std::fmt::Display for HeadChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Rows(n) => write!(f, "{n}"),
            Self::Q4_1 => f.write_str("q4_1"),
            Self::Keep => f.write_str("keep"),
        }
    }
}

impl DraftSpec {
    pub fn parse(spec: &str) -> Result<Self> {
        let mut parts = spec.split('@');
        let s = parts.next().unwrap_or_default();
        let (mut f16, mut head, mut q4_1, mut coarse, mut exact) = (None, None, false, None, false);
        for opt in parts {
            match opt {
                "f16" => f16 = Some(true),
                "f32" => f16 = Some(false),
                "q4_1" => q4_1 = true,
                "exact" => exact = true,
                _ if opt.starts_with("coarse") => match Coarse::parse(&opt["coarse".len()..]) {
                    Some(c) => coarse = Some(c),
                    None => bail!(
                        "bad --draft {spec:?}: @coarse takes no value or =RANK:CANDIDATES (RANK a \
                         multiple of 32, CANDIDATES at least 1)"
                    ),
                },
                _ => match opt.strip_prefix("head=").and_then(HeadChange::parse) {
                    Some(h) => head = Some(h),
                    None => bail!(
                        "bad --draft {spec:?}: options are @f16, @f32, @q4_1, @head=N (N a \
                         multiple of 8), @head=q4_1, @head=keep, @coarse[=RANK:CANDIDATES] and \
                         @exact"
                    ),
                },
            }
        }
        let num = |x: &str| -> Result<usize> {
            match x.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => bail!("bad --draft {s:?}: expected a positive number after ':'"),
            }
        };
        Ok(if s == "ngram" || s.starts_with("ngram:") {
            if f16.is_some() || head.is_some() || q4_1 || coarse.is_some() || exact {
                bail!("bad --draft {spec:?}: the n-gram draft has no weights");
            }
            match s.strip_prefix("ngram:") {
                Some(n) => Self::Ngram(num(n)?),
                None => Self::Ngram(NgramDraft::default().max_n),
            }
        } else if let Some(n) = s.strip_prefix("self:") {
            if head.is_some() || q4_1 || coarse.is_some() || exact {
                bail!(
                    "bad --draft {spec:?}: @head=…, @q4_1, @coarse and @exact are for model drafts"
                );
            }
            Self::SelfLayers(num(n)?, f16.unwrap_or(false))
        } else {
            if q4_1 && head == Some(HeadChange::Q4_1) {
                bail!("bad --draft {spec:?}: @q4_1 already re-quantizes the head");
            }
            if coarse.is_some() && exact {
                bail!("bad --draft {spec:?}: @coarse and @exact contradict each other");
            }
            if coarse.is_some() && matches!(head, Some(HeadChange::Rows(_))) {
                bail!("bad --draft {spec:?}: @coarse scores the whole head; @head=N cuts it");
            }
            Self::Model(ModelDraft {
                name: s.to_string(),
                f16: f16.unwrap_or(true),
                q4_1,
                head,
                coarse,
                exact,
            })
        })
    }
}

impl DraftSpec {
    /// Parses every `--draft` value.
    pub fn parse_all(specs: &[String]) -> Result<Vec<Self>> {
        specs.iter().map(|d| Self::parse(d)).collect()
    }
}

/// A draft ready to use: prompt lookup, or a loaded model checked against the target.
pub enum LoadedDraft<B: Backend> {
    /// Prompt lookup up to this n-gram length.
    Ngram(usize),
    /// A model draft (label as shown in statistics).
    Model {
        /// Display name (e.g. `self:6@f16`, `qwen2.5-coder-0.5b`).
        label: String,
        /// The network.
        model: Box<Transformer<B>>,
    },
}

/// Loads the drafts `specs` for `target` (model drafts resolved and loaded now).
///
/// # Errors
/// A draft that cannot be loaded, or whose tokenizer differs from the target's.
pub fn load_drafts<B: Backend>(
    target: &LoadedModel<B>,
    specs: &[DraftSpec],
    opts: ResolveOptions,
    device: &B::Device,
) -> Result<Vec<LoadedDraft<B>>> {
    let mut out = Vec::new();
    for d in specs {
        out.push(match d {
            DraftSpec::Ngram(n) => LoadedDraft::Ngram(*n),
            DraftSpec::SelfLayers(n, f16) => {
                let mut m = target.model.truncated(*n)?;
                if *f16 {
                    m = m.with_f16_weights();
                }
                LoadedDraft::Model {
                    label: format!("self:{n}{}", if *f16 { "@f16" } else { "" }),
                    model: Box::new(m),
                }
            }
            DraftSpec::Model(m) => load_model_draft(target, m, opts, device)?,
        });
    }
    Ok(out)
}

/// Loads a model draft, checks its tokenizer against `target`'s, and applies its options.
fn load_model_draft<B: Backend>(
    target: &LoadedModel<B>,
    d: &ModelDraft,
    opts: ResolveOptions,
    device: &B::Device,
) -> Result<LoadedDraft<B>> {
    let name = &d.name;
    let loaded = LoadedModel::<B>::load(name, opts, device)
        .with_context(|| format!("loading draft {name}"))?;
    check_same_tokenizer(&target.tokenizer, &loaded.tokenizer, name)?;
    // Block-quantized weights stay as they are; only f32-held ones become f16.
    let converted = d.f16.then(|| loaded.model.with_f16_weights());
    let (mut label, mut model) = match converted {
        Some(m) if m.weight_bytes() < loaded.model.weight_bytes() => {
            (format!("{}@f16", loaded.name), m)
        }
        _ => (loaded.name.clone(), loaded.model),
    };
    if d.q4_1 {
        model = model
            .with_weights_requantized(GgmlType::Q4_1)
            .with_context(|| format!("re-quantizing draft {name} to Q4_1"))?;
        label = format!("{label}@q4_1");
    }
    // After `@q4_1` the head is Q4_1 already, so the default does not apply.
    let by_default = model
        .head_block_type()
        .is_some_and(|t| DEFAULT_HEAD_Q4_1.contains(&t));
    let head = d.head.or(by_default.then_some(HeadChange::Q4_1));
    let changed = match head {
        Some(h @ HeadChange::Rows(n)) => Some((h, model.with_head_rows(n))),
        Some(h @ HeadChange::Q4_1) => Some((h, model.with_head_requantized(GgmlType::Q4_1))),
        Some(HeadChange::Keep) | None => None,
    };
    if let Some((h, m)) = changed {
        model = m.with_context(|| format!("changing draft {name}'s head to {h}"))?;
        label = format!("{label}@head={h}");
    }
    // A cut head (`@head=N`) is not the whole head a coarse pass would stand in for.
    let default = !d.exact
        && !matches!(head, Some(HeadChange::Rows(_)))
        && crate::coarse::by_default(&model, loaded.config.hidden_size);
    if let Some(c) = d.coarse.or(default.then(Coarse::default)) {
        model = crate::coarse::apply(
            &model,
            &loaded.tokenizer,
            &loaded.name,
            loaded.config.hidden_size,
            c,
        )
        .with_context(|| format!("draft {name}'s @{c}"))?;
        label = format!("{label}@{c}");
    }
    Ok(LoadedDraft::Model {
        label,
        model: Box::new(model),
    })
}

fn ngram(max_n: usize) -> NgramDraft {
    NgramDraft {
        max_n,
        ..NgramDraft::default()
    }
}

/// A speculative engine over `target` with `drafts`.
///
/// # Errors
/// A model draft whose vocabulary is smaller than the target's.
pub fn build_engine<'m, B: Backend>(
    target: &'m LoadedModel<B>,
    drafts: &'m [LoadedDraft<B>],
    policy: TreePolicy,
) -> Result<Engine<'m, B>> {
    let mut engine = Engine::new(&target.model, &target.tokenizer, policy);
    for d in drafts {
        engine = match d {
            LoadedDraft::Ngram(n) => engine.with_draft(ngram(*n)),
            LoadedDraft::Model { label, model } => {
                engine.with_model_draft(label, model, &target.tokenizer)?
            }
        };
    }
    Ok(engine)
}

/// A continuous-batching engine over `target` with `drafts` (each sequence gets its own
/// draft state) shaping trees by `tree`.
///
/// # Errors
/// Inconsistent scheduler limits, or a model draft whose vocabulary is smaller.
pub fn build_batch_engine<'m, B: Backend>(
    target: &'m LoadedModel<B>,
    drafts: &'m [LoadedDraft<B>],
    tree: Option<TreePolicy>,
    config: SchedulerConfig,
) -> Result<BatchEngine<'m, B>> {
    let mut engine = BatchEngine::new(&target.model, &target.tokenizer, config)?;
    for d in drafts {
        engine = match d {
            LoadedDraft::Ngram(n) => {
                let n = *n;
                engine.with_draft(move || Box::new(ngram(n)))
            }
            LoadedDraft::Model { label, model } => {
                engine.with_model_draft(label, model, &target.tokenizer)?
            }
        };
    }
    Ok(match tree {
        Some(t) => engine.with_tree_policy(t),
        None => engine,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draft_specs() {
        let p = |s: &str| DraftSpec::parse(s).unwrap();
        let m = |name: &str, f16, q4_1, head| {
            DraftSpec::Model(ModelDraft {
                name: name.into(),
                f16,
                q4_1,
                head,
                coarse: None,
                exact: false,
            })
        };
        assert_eq!(p("ngram"), DraftSpec::Ngram(4));
        assert_eq!(p("ngram:2"), DraftSpec::Ngram(2));
        assert_eq!(p("self:6"), DraftSpec::SelfLayers(6, false));
        assert_eq!(p("self:6@f16"), DraftSpec::SelfLayers(6, true));
        assert_eq!(p("qwen"), m("qwen", true, false, None));
        assert_eq!(p("./m.gguf@f32"), m("./m.gguf", false, false, None));
        assert_eq!(
            p("qwen@head=32768"),
            m("qwen", true, false, Some(HeadChange::Rows(32768)))
        );
        assert_eq!(
            p("qwen@f32@head=64"),
            m("qwen", false, false, Some(HeadChange::Rows(64)))
        );
        assert_eq!(
            p("qwen@head=q4_1"),
            m("qwen", true, false, Some(HeadChange::Q4_1))
        );
        assert_eq!(p("qwen@q4_1"), m("qwen", true, true, None));
        assert_eq!(
            p("qwen@head=keep"),
            m("qwen", true, false, Some(HeadChange::Keep))
        );
        let with_coarse = |c| match m("qwen", true, false, None) {
            DraftSpec::Model(d) => DraftSpec::Model(ModelDraft {
                coarse: Some(c),
                ..d
            }),
            other => other,
        };
        assert_eq!(p("qwen@coarse"), with_coarse(Coarse::default()));
        assert_eq!(
            p("qwen@coarse=128:32"),
            with_coarse(Coarse {
                rank: 128,
                candidates: 32
            })
        );
        match p("qwen@exact") {
            DraftSpec::Model(d) => assert!(d.exact && d.coarse.is_none()),
            other => panic!("{other:?}"),
        }
        for bad in [
            "m@coarse@exact",
            "ngram@exact",
            "self:4@exact",
            "m@coarse=100:8",
            "m@coarse@head=64",
            "ngram@coarse",
            "self:4@coarse",
            "m@coarsely",
            "self:0",
            "ngram@q4_1",
            "self:4@q4_1",
            "m@q4_1@head=q4_1",
            "ngram:x",
            "ngram@f16",
            "m@q4",
            "m@head=12",
            "m@head=0",
            "m@head=q8_0",
            "self:4@head=64",
            "ngram@head=64",
        ] {
            assert!(DraftSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
