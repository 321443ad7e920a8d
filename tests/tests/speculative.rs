//! Speculative decoding through the engine on tiny random models: greedy output equals plain
//! greedy decoding token for token (many prompts, tree policies and draft mixes), sampled
//! output keeps the target's distribution, and bad drafts are refused.

use arbor_engine::{
    Engine, EngineError, Event, Finished, GenerateParams, Generator, Planner, Prompt, TreePolicy,
};
use arbor_model::{
    Architecture, ModelConfig, RandomWeights, SamplingParams, Transformer, device::Cpu,
    testing::byte_tokenizer,
};
use arbor_speculators::{ModelDraft, NgramDraft};

fn model(layers: usize, vocab: usize, seed: u64) -> Transformer<Cpu> {
    let cfg = ModelConfig {
        vocab_size: vocab,
        num_layers: layers,
        ..ModelConfig::tiny(Architecture::Llama)
    };
    Transformer::from_weights(
        &cfg,
        &mut RandomWeights::new(seed, 0.3),
        &Default::default(),
    )
    .unwrap()
}

fn finished(events: impl Iterator<Item = Result<Event, EngineError>>) -> (Finished, usize) {
    let mut steps = 0;
    for e in events {
        match e.unwrap() {
            Event::Done(d) => return (d, steps),
            Event::Step(_) => steps += 1,
            Event::Text(_) => {}
        }
    }
    panic!("no Done event")
}

const PROMPTS: [&str; 4] = [
    "the cat sat on the mat. the cat sat on the",
    "def f(x):\n    return x + 1\n\ndef g(x):\n    return",
    "Arbor",
    "1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3,",
];

#[test]
fn speculative_greedy_equals_plain_greedy() {
    let tok = byte_tokenizer();
    let target = model(3, tok.vocab_size(), 5);
    let other = model(2, tok.vocab_size(), 9);
    let params = GenerateParams {
        max_tokens: 40,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let plain = Generator::new(&target, &tok);
    let policies = ["chain:4", "2,2,1", "3", "dyn:5,2,9", "auto", "auto:1,6"];
    type Mix = for<'a> fn(Engine<'a, Cpu>, &Transformer<Cpu>, &Transformer<Cpu>) -> Engine<'a, Cpu>;
    let mixes: [(&str, Mix); 5] = [
        ("self-draft (1 of 3 layers)", |e, t, _| {
            e.with_draft(ModelDraft::new("self1", t.truncated(1).unwrap()))
        }),
        ("target as its own draft", |e, t, _| {
            e.with_draft(ModelDraft::new("oracle", t.clone()))
        }),
        ("n-gram", |e, _, _| e.with_draft(NgramDraft::default())),
        ("target with f16 weights as draft", |e, t, _| {
            e.with_draft(ModelDraft::new("f16", t.with_f16_weights()))
        }),
        ("other model + self-draft + n-gram", |e, t, o| {
            e.with_draft(ModelDraft::new("other", o.clone()))
                .with_draft(ModelDraft::new("self2", t.truncated(2).unwrap()))
                .with_draft(NgramDraft::default())
        }),
    ];
    let mut accepted_any = false;
    for prompt in PROMPTS {
        let p = Prompt::Text(prompt.into());
        let (want, _) = finished(plain.generate(&p, &params).unwrap());
        for (name, mix) in &mixes {
            for policy in policies {
                let engine = Engine::new(&target, &tok, policy.parse::<TreePolicy>().unwrap());
                let mut engine = mix(engine, &target, &other);
                // Two generations in a row: drafts must reset their state in between.
                for round in 0..2 {
                    let (got, steps) = finished(engine.generate(&p, &params).unwrap());
                    assert_eq!(
                        got.tokens, want.tokens,
                        "{name}, tree {policy}, round {round}, prompt {prompt:?}"
                    );
                    let spec = got.spec.expect("speculative stats");
                    assert_eq!(spec.steps, steps);
                    assert_eq!(
                        spec.emitted,
                        got.tokens.len() - 1,
                        "first token is prefill's"
                    );
                    assert!(spec.accepted <= spec.drafted);
                    accepted_any |= spec.accepted > 0;
                    if name.starts_with("target as") && policy == "chain:4" {
                        assert!(
                            spec.tau() > 4.0,
                            "the target as its own draft accepts every node: τ {}",
                            spec.tau()
                        );
                    }
                }
            }
        }
    }
    assert!(accepted_any);
}

#[test]
fn model_draft_with_another_tokenizer_is_refused() {
    let tok = byte_tokenizer();
    let target = model(2, tok.vocab_size(), 1);
    let json = r#"{"version":"1.0","model":{"type":"WordLevel","vocab":{"a":0,"b":1,"<unk>":2},"unk_token":"<unk>"}}"#;
    let other = arbor_model::Tokenizer::from_json(json, None, false, vec![], None).unwrap();
    let e = Engine::new(&target, &tok, TreePolicy::default())
        .with_model_draft("wordlevel", &target, &other)
        .unwrap_err();
    assert!(
        matches!(e, EngineError::DraftMismatch { .. }),
        "unexpected error {e}"
    );
    assert!(e.to_string().contains("wordlevel"), "{e}");
    Engine::new(&target, &tok, TreePolicy::default())
        .with_model_draft("same", &target.truncated(1).unwrap(), &tok)
        .unwrap();
}

/// The engine wiring of speculative sampling (draft randomness, recorded q, verification,
/// commit): the second generated token — the first one produced by a verification step — has
/// the target's marginal distribution. 3 000 generations, χ² over the 8 tokens at 1e-3: this
/// only catches gross errors (noncentrality ≥ ~40, Σ Δ²/p ≥ 0.013); the verifier's own test
/// (`verifier/tests/sampling_lossless.rs`, 10⁵ samples) carries the power.
#[test]
fn speculative_sampling_keeps_the_second_token_distribution() {
    let tok = byte_tokenizer();
    let vocab = 8;
    let target = model(2, vocab, 21);
    let draft = model(2, vocab, 22);
    let sampling = SamplingParams {
        temperature: 0.9,
        top_k: 6,
        ..SamplingParams::default()
    };
    let prompt = vec![1u32, 2, 3, 1, 2, 5];
    let dist = |ctx: &[u32]| {
        let mut c = target.new_cache();
        let l = target
            .forward_last_logits(&arbor_model::ForwardInput::causal(ctx, 0), &mut c)
            .unwrap();
        sampling.distribution(&l[0])
    };
    let p1 = dist(&prompt);
    let mut exact = vec![0.0f64; vocab];
    for (a, &pa) in p1.iter().enumerate() {
        if pa > 0.0 {
            let mut ctx = prompt.clone();
            ctx.push(a as u32);
            for (b, &pb) in dist(&ctx).iter().enumerate() {
                exact[b] += f64::from(pa) * f64::from(pb);
            }
        }
    }
    let mut engine = Engine::new(&target, &tok, "2,2".parse().unwrap())
        .with_draft(ModelDraft::new("draft", draft))
        .with_draft(NgramDraft::default());
    let n = 3000;
    let mut counts = vec![0usize; vocab];
    for seed in 0..n {
        let params = GenerateParams {
            max_tokens: 2,
            ignore_eos: true,
            sampling: SamplingParams {
                seed: Some(seed),
                ..sampling.clone()
            },
            ..GenerateParams::default()
        };
        let (d, _) = finished(
            engine
                .generate(&Prompt::Tokens(prompt.clone()), &params)
                .unwrap(),
        );
        counts[d.tokens[1] as usize] += 1;
    }
    let mut stat = 0.0;
    let mut cells = 0;
    for (&o, &p) in counts.iter().zip(&exact) {
        if p == 0.0 {
            assert_eq!(o, 0);
            continue;
        }
        let e = p * n as f64;
        stat += (o as f64 - e).powi(2) / e;
        cells += 1;
    }
    // χ² critical values at 1e-3 for 1..=7 degrees of freedom.
    let critical = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32][cells - 2];
    assert!(
        stat < critical,
        "χ² {stat:.1} ≥ {critical} (counts {counts:?}, exact {exact:?})"
    );
}

#[test]
fn auto_calibrates_only_the_trees_it_can_build() {
    let tok = byte_tokenizer();
    let target = model(3, tok.vocab_size(), 5);
    let params = GenerateParams {
        max_tokens: 6,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    // One draft: `auto:W,D` trees hold at most 1 + W·D nodes; sizes past that are
    // extrapolated, not measured (a tiny model's forwards cost about the same at any size, so
    // only this bound stops the calibration short of 64 nodes).
    for (policy, most) in [("auto:1,6", 7), ("auto:2,8", 17)] {
        let mut engine = Engine::new(&target, &tok, policy.parse::<TreePolicy>().unwrap())
            .with_draft(ModelDraft::new("self1", target.truncated(1).unwrap()));
        finished(
            engine
                .generate(&Prompt::Text("Arbor".into()), &params)
                .unwrap(),
        );
        let sizes: Vec<usize> = engine.planner().verify_cost.iter().map(|c| c.0).collect();
        assert!(sizes.starts_with(&[1, 2]), "{policy}: {sizes:?}");
        assert!(
            sizes.iter().all(|&n| n <= most),
            "{policy}: measured {sizes:?}, past {most} nodes"
        );
    }
}

#[test]
fn auto_times_again_a_verify_curve_measured_on_a_busy_moment() {
    let tok = byte_tokenizer();
    let target = model(3, tok.vocab_size(), 5);
    let engine = |planner: Planner| {
        Engine::new(&target, &tok, TreePolicy::default())
            .with_draft(ModelDraft::new("self1", target.truncated(1).unwrap()))
            .with_planner(planner)
    };
    let params = GenerateParams {
        max_tokens: 40,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let prompt = Prompt::Text(PROMPTS[1].into());
    let (want, _) = finished(
        Generator::new(&target, &tok)
            .generate(&prompt, &params)
            .unwrap(),
    );
    let mut first = engine(Planner::default());
    finished(first.generate(&prompt, &params).unwrap());
    let quiet = first.planner().verify_cost.clone();
    // The same curve as if both calibration rounds had met a busy neighbour: every size 100×
    // dearer, its two rounds far apart.
    let mut busy = Planner::default();
    let timings: Vec<_> = quiet
        .iter()
        .map(|&(n, s)| (n, 100.0 * s, 150.0 * s))
        .collect();
    busy.set_calibration(&timings);
    let mut second = engine(busy);
    let (got, steps) = finished(second.generate(&prompt, &params).unwrap());
    assert_eq!(
        got.tokens, want.tokens,
        "re-timings must leave the cache as it was"
    );
    let p = second.planner();
    assert!(p.refreshes > 0, "nothing timed again in {steps} steps");
    for (&(n, now), &(_, q)) in p.verify_cost.iter().zip(&quiet) {
        assert!(now < 50.0 * q, "{n} nodes still at {now} s (quiet {q} s)");
    }
}
