//! Speculative sampling is lossless: the first tokens emitted by draft → tree → verify have
//! exactly the target's distribution.
//!
//! Set-up: tiny random transformers with a vocabulary of 8 (a target and a different draft
//! model, plus the target's first layer as a second draft, plus the n-gram draft), several tree
//! shapes (SpecInfer expansion and dynamic), draws i.i.d., without replacement and
//! deterministic, temperatures and top-k / top-p / min-p filters. Each configuration draws
//! N = 100 000 samples of the first two emitted tokens (64 cells) and compares them with the
//! target's exact joint distribution p(t₁)·p(t₂|t₁) by a χ² test at significance 1e-4.
//!
//! Power: the test rejects with probability ≥ 0.9 once the noncentrality N·Σ(Δ²/p) exceeds the
//! value printed per case (normal approximation of the noncentral χ²): 77 at df = 63 (the
//! T = 1 case), 49–68 for the filtered cases with fewer live cells. For N = 10⁵ that is any
//! deviation with Σ Δ²/p ≥ 7.7·10⁻⁴ — e.g. moving 0.4 percentage points between two cells of
//! probability 3%. Two deliberately wrong verifiers (draws without replacement verified as if
//! i.i.d.; deterministic top-k children verified by plain speculative sampling against the
//! draft's q) are rejected by the same test with χ² ≈ 45 000 and 35 000 (critical 114). The
//! test also caught a real bug while it was written: pruning sampled children by score (as
//! deterministic dynamic trees do) gave χ² 51.5 against a critical 34.

use std::collections::HashMap;

use arbor_model::{
    Architecture, ForwardInput, ModelConfig, RandomWeights, SamplingParams, Transformer,
};
use arbor_speculators::{Draft, DraftRequest, DrawKind, NgramDraft, TokenTree, TreeShape, expand};
use arbor_verifier::verify_sampling;
use rand::{SeedableRng, rngs::StdRng};

type B = burn::backend::Flex;

const VOCAB: usize = 8;
const N: usize = 100_000;
const PROMPT: [u32; 6] = [1, 2, 3, 1, 2, 5];

/// A model's logits after `PROMPT + path`, memoized (the tests visit a few thousand paths).
struct Table {
    model: Transformer<B>,
    memo: HashMap<Vec<u32>, Vec<f32>>,
}

impl Table {
    fn new(model: Transformer<B>) -> Self {
        Self {
            model,
            memo: HashMap::new(),
        }
    }

    fn logits(&mut self, path: &[u32]) -> Vec<f32> {
        if let Some(l) = self.memo.get(path) {
            return l.clone();
        }
        let seq: Vec<u32> = PROMPT.iter().chain(path).copied().collect();
        let mut cache = self.model.new_cache();
        let l = self
            .model
            .forward_last_logits(&ForwardInput::causal(&seq, 0), &mut cache)
            .unwrap()
            .swap_remove(0);
        self.memo.insert(path.to_vec(), l.clone());
        l
    }
}

/// Which model a draft runs, or the n-gram draft.
#[derive(Clone, Copy)]
enum Source {
    Draft,
    FirstLayer,
    Ngram,
}

struct Spec {
    source: Source,
    shape: &'static str,
    draw: DrawKind,
    /// Growth gates ([`DraftRequest::gates`]).
    gates: &'static [f32],
}

#[derive(Clone, Copy, PartialEq)]
enum Wrong {
    /// Verify draws without replacement as if they were i.i.d. (no removal from q).
    WorAsIid,
    /// Verify deterministic top-k children by plain MSS against the draft's q.
    TopKAsIid,
}

struct World {
    target: Table,
    draft: Table,
    first_layer: Table,
    /// Model-draft trees that came out shallower than their shape (cut by a gate).
    gated: usize,
}

fn path_tokens(tree: &TokenTree, node: usize) -> Vec<u32> {
    tree.path(node)[1..]
        .iter()
        .map(|&i| tree.nodes()[i].token)
        .collect()
}

impl World {
    fn new() -> Self {
        let dev = Default::default();
        let cfg = ModelConfig {
            vocab_size: VOCAB,
            ..ModelConfig::tiny(Architecture::Llama)
        };
        let target =
            Transformer::<B>::from_weights(&cfg, &mut RandomWeights::new(11, 0.25), &dev).unwrap();
        let draft =
            Transformer::<B>::from_weights(&cfg, &mut RandomWeights::new(12, 0.25), &dev).unwrap();
        let first_layer = target.truncated(1).unwrap();
        Self {
            target: Table::new(target),
            draft: Table::new(draft),
            first_layer: Table::new(first_layer),
            gated: 0,
        }
    }

    fn table(&mut self, s: Source) -> &mut Table {
        match s {
            Source::Draft => &mut self.draft,
            Source::FirstLayer => &mut self.first_layer,
            Source::Ngram => unreachable!("the n-gram draft has no table"),
        }
    }

    /// One speculative step after `ctx` (tokens emitted so far): the merged tree of all drafts.
    fn tree(
        &mut self,
        ctx: &[u32],
        specs: &[Spec],
        params: &SamplingParams,
        rng: &mut StdRng,
    ) -> TokenTree {
        let full: Vec<u32> = PROMPT.iter().chain(ctx).copied().collect();
        let root = *full.last().unwrap();
        let mut merged = TokenTree::new(root);
        for (id, spec) in specs.iter().enumerate() {
            let shape: TreeShape = spec.shape.parse().unwrap();
            let req = DraftRequest {
                context: &full,
                shape: &shape,
                sampling: params,
                id,
                gates: spec.gates,
            };
            let tree = match spec.source {
                Source::Ngram => NgramDraft::default().propose(&req, rng).unwrap().0,
                s => {
                    let table = self.table(s);
                    let root_logits = table.logits(ctx);
                    let (tree, _) = expand(
                        root,
                        root_logits,
                        &req,
                        spec.draw,
                        shape.depth(),
                        rng,
                        |tree, fresh| {
                            Ok(fresh
                                .iter()
                                .map(|&n| {
                                    let mut p = ctx.to_vec();
                                    p.extend(path_tokens(tree, n));
                                    table.logits(&p)
                                })
                                .collect())
                        },
                    )
                    .unwrap();
                    if tree.depth() < shape.depth() {
                        self.gated += 1;
                    }
                    tree
                }
            };
            merged.merge(&tree).unwrap();
        }
        merged
    }

    /// Rebuilds `tree` with a wrong verification recipe.
    fn corrupt(
        &mut self,
        tree: &TokenTree,
        ctx: &[u32],
        specs: &[Spec],
        params: &SamplingParams,
        wrong: Wrong,
    ) -> TokenTree {
        let mut out = TokenTree::new(tree.nodes()[0].token);
        let mut map = vec![0usize; tree.len()];
        for p in tree.proposals() {
            let draws: Vec<(u32, f32)> = p
                .draws
                .iter()
                .map(|&d| (tree.nodes()[d].token, 1.0))
                .collect();
            let (kind, q) = match (wrong, p.kind) {
                (Wrong::WorAsIid, DrawKind::WithoutReplacement) => (DrawKind::Iid, p.q.clone()),
                (Wrong::TopKAsIid, DrawKind::Deterministic) => {
                    let mut path = ctx.to_vec();
                    path.extend(path_tokens(tree, p.parent));
                    let logits = self.table(specs[p.draft].source).logits(&path);
                    (DrawKind::Iid, Some(params.distribution(&logits).into()))
                }
                _ => (p.kind, p.q.clone()),
            };
            let new = out
                .propose(map[p.parent], p.draft, kind, q, &draws)
                .unwrap();
            for (&old, new) in p.draws.iter().zip(new) {
                map[old] = new;
            }
        }
        out
    }

    /// The first two tokens of one speculative generation.
    fn sample_two(
        &mut self,
        specs: &[Spec],
        params: &SamplingParams,
        wrong: Option<Wrong>,
        rng: &mut StdRng,
    ) -> (u32, u32) {
        let mut ctx: Vec<u32> = Vec::new();
        while ctx.len() < 2 {
            let mut tree = self.tree(&ctx, specs, params, rng);
            if let Some(w) = wrong {
                tree = self.corrupt(&tree, &ctx, specs, params, w);
            }
            let target = &mut self.target;
            let v = verify_sampling(
                &tree,
                |i| {
                    let mut p = ctx.clone();
                    p.extend(path_tokens(&tree, i));
                    params.distribution(&target.logits(&p))
                },
                rng,
            );
            ctx.extend(v.tokens);
        }
        (ctx[0], ctx[1])
    }

    /// The target's exact joint distribution of the first two tokens.
    fn exact(&mut self, params: &SamplingParams) -> Vec<f64> {
        let p1 = params.distribution(&self.target.logits(&[]));
        let mut joint = vec![0.0f64; VOCAB * VOCAB];
        for a in 0..VOCAB {
            if p1[a] == 0.0 {
                continue;
            }
            let p2 = params.distribution(&self.target.logits(&[a as u32]));
            for b in 0..VOCAB {
                joint[a * VOCAB + b] = f64::from(p1[a]) * f64::from(p2[b]);
            }
        }
        joint
    }
}

/// χ² critical value (Wilson–Hilferty) for `df` degrees of freedom at upper-tail z.
fn chi2_critical(df: f64, z: f64) -> f64 {
    let a = 2.0 / (9.0 * df);
    df * (1.0 - a + z * a.sqrt()).powi(3)
}

/// z for an upper tail of 1e-4, and for power 0.9.
const Z_ALPHA: f64 = 3.719;
const Z_POWER: f64 = 1.2816;

/// The smallest noncentrality the test detects with power 0.9 (normal approximation of the
/// noncentral χ²: mean df + λ, variance 2(df + 2λ)).
fn detectable_noncentrality(df: f64) -> f64 {
    let crit = chi2_critical(df, Z_ALPHA);
    let (mut lo, mut hi) = (0.0, 1e6);
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if df + mid - crit >= Z_POWER * (2.0 * (df + 2.0 * mid)).sqrt() {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// Pearson's χ² of `counts` against `exact` (cells under 5 expected pooled); returns the
/// statistic, the critical value and the degrees of freedom. Panics if a cell the target
/// cannot produce was observed.
fn chi2(counts: &[usize], exact: &[f64], n: usize) -> (f64, f64, f64) {
    let mut stat = 0.0;
    let (mut pooled_obs, mut pooled_exp, mut cells) = (0.0, 0.0, 0usize);
    for (c, (&o, &p)) in counts.iter().zip(exact).enumerate() {
        let e = p * n as f64;
        if p == 0.0 {
            assert_eq!(
                o, 0,
                "cell {c} has probability 0 under the target but was drawn"
            );
            continue;
        }
        if e < 5.0 {
            pooled_obs += o as f64;
            pooled_exp += e;
            continue;
        }
        stat += (o as f64 - e).powi(2) / e;
        cells += 1;
    }
    if pooled_exp > 0.0 {
        stat += (pooled_obs - pooled_exp).powi(2) / pooled_exp;
        cells += 1;
    }
    let df = (cells - 1) as f64;
    (stat, chi2_critical(df, Z_ALPHA), df)
}

fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
        seed: None,
    }
}

fn run(
    world: &mut World,
    name: &str,
    specs: &[Spec],
    params: &SamplingParams,
    wrong: Option<Wrong>,
    seed: u64,
) -> (f64, f64) {
    let exact = world.exact(params);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut counts = vec![0usize; VOCAB * VOCAB];
    for _ in 0..N {
        let (a, b) = world.sample_two(specs, params, wrong, &mut rng);
        counts[a as usize * VOCAB + b as usize] += 1;
    }
    let (stat, crit, df) = chi2(&counts, &exact, N);
    let lambda: f64 = counts
        .iter()
        .zip(&exact)
        .filter(|&(_, &p)| p > 0.0)
        .map(|(&o, &p)| (o as f64 / N as f64 - p).powi(2) / p)
        .sum::<f64>()
        * N as f64;
    println!(
        "{name}: chi2 {stat:.1} (critical {crit:.1}, df {df}); observed noncentrality {lambda:.0}; \
         detectable with power 0.9: {:.0}",
        detectable_noncentrality(df)
    );
    (stat, crit)
}

#[test]
fn speculative_sampling_matches_the_target_distribution() {
    let mut w = World::new();
    let wor = |source, shape| Spec {
        source,
        shape,
        draw: DrawKind::WithoutReplacement,
        gates: &[],
    };
    let cases: Vec<(&str, Vec<Spec>, SamplingParams)> = vec![
        (
            "T=1, one draft, without replacement, 3,2,1",
            vec![wor(Source::Draft, "3,2,1")],
            params(1.0, 0, 1.0, 0.0),
        ),
        (
            "T=0.8 top-k 4, one draft, iid, 2,2",
            vec![Spec {
                source: Source::Draft,
                shape: "2,2",
                draw: DrawKind::Iid,
                gates: &[],
            }],
            params(0.8, 4, 1.0, 0.0),
        ),
        (
            "T=1.2 top-p 0.85, three drafts (model wor, first-layer top-k, n-gram)",
            vec![
                wor(Source::Draft, "2,1,1"),
                Spec {
                    source: Source::FirstLayer,
                    shape: "2,2",
                    draw: DrawKind::Deterministic,
                    gates: &[],
                },
                Spec {
                    source: Source::Ngram,
                    shape: "chain:3",
                    draw: DrawKind::Deterministic,
                    gates: &[],
                },
            ],
            params(1.2, 0, 0.85, 0.0),
        ),
        (
            "T=1 min-p 0.05, dynamic dyn:3,2,5, two drafts",
            vec![
                wor(Source::Draft, "dyn:3,2,5"),
                wor(Source::FirstLayer, "dyn:3,2,5"),
            ],
            params(1.0, 0, 1.0, 0.05),
        ),
    ];
    for (i, (name, specs, p)) in cases.iter().enumerate() {
        let (stat, crit) = run(&mut w, name, specs, p, None, 100 + i as u64);
        assert!(stat < crit, "{name}: χ² {stat:.1} ≥ {crit:.1}");
    }
}

/// Growth gates decide from draws already made, so cutting sampled trees short keeps the
/// target's distribution (`auto` gates every tree).
#[test]
fn gated_trees_keep_the_target_distribution() {
    let mut w = World::new();
    let specs = [
        Spec {
            source: Source::Draft,
            shape: "2,2,2",
            draw: DrawKind::WithoutReplacement,
            gates: &[0.3, 0.12],
        },
        Spec {
            source: Source::FirstLayer,
            shape: "chain:3",
            draw: DrawKind::Iid,
            gates: &[0.35, 0.2],
        },
    ];
    let name = "T=1 top-p 0.95, gated 2,2,2 (wor) and chain:3 (iid)";
    let (stat, crit) = run(&mut w, name, &specs, &params(1.0, 0, 0.95, 0.0), None, 7);
    assert!(stat < crit, "{name}: χ² {stat:.1} ≥ {crit:.1}");
    // Two trees per step, at least one step per sample: the gates must cut a good share of
    // them for the test to say anything about gating.
    let share = w.gated as f64 / (2 * N) as f64;
    println!(
        "{name}: {:.0}% of model-draft trees cut by a gate",
        100.0 * share
    );
    assert!(
        (0.2..0.95).contains(&share),
        "gates cut {share:.2} of trees"
    );
}

/// The same test rejects verifiers that ignore how children were drawn.
#[test]
fn wrong_verifiers_are_caught() {
    let mut w = World::new();
    let p = params(1.0, 0, 1.0, 0.0);
    let wor = vec![Spec {
        source: Source::Draft,
        shape: "4,1",
        draw: DrawKind::WithoutReplacement,
        gates: &[],
    }];
    let (stat, crit) = run(
        &mut w,
        "wrong: wor as iid",
        &wor,
        &p,
        Some(Wrong::WorAsIid),
        7,
    );
    assert!(
        stat > crit,
        "the biased verifier passed: χ² {stat:.1} < {crit:.1}"
    );
    let topk = vec![Spec {
        source: Source::Draft,
        shape: "3,1",
        draw: DrawKind::Deterministic,
        gates: &[],
    }];
    let (stat, crit) = run(
        &mut w,
        "wrong: top-k as iid",
        &topk,
        &p,
        Some(Wrong::TopKAsIid),
        8,
    );
    assert!(
        stat > crit,
        "the biased verifier passed: χ² {stat:.1} < {crit:.1}"
    );
    // And the right verifier on the very same draws passes.
    let (stat, crit) = run(&mut w, "right: top-k", &topk, &p, None, 8);
    assert!(stat < crit, "χ² {stat:.1} ≥ {crit:.1}");
}
