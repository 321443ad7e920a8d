use std::cell::RefCell;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use arbor_model::{
    Architecture, ModelConfig, RandomWeights, SamplingParams, Tokenizer, Transformer,
};
use arbor_speculators::{
    Draft, DraftCost, DraftRequest, ModelDraft, NgramDraft, SpecError, TokenTree,
};
use rand::rngs::StdRng;

use super::*;
use crate::{Event, Finished, Generator};

type B = burn::backend::Flex;
type Rx = mpsc::Receiver<Result<Event, EngineError>>;

fn model() -> (Transformer<B>, Tokenizer) {
    let tok = arbor_model::testing::byte_tokenizer();
    let config = ModelConfig {
        vocab_size: tok.vocab_size(),
        ..ModelConfig::tiny(Architecture::Qwen2)
    };
    let m = Transformer::from_weights(
        &config,
        &mut RandomWeights::new(3, 0.3),
        &Default::default(),
    )
    .unwrap();
    (m, tok)
}

fn params(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        ignore_eos: true,
        ..GenerateParams::default()
    }
}

fn prompts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!("{i} the tree grows {} leaves, ", "ab".repeat(i % 5 + 1)).repeat(i % 3 + 1)
        })
        .collect()
}

fn submit(e: &mut BatchEngine<'_, B>, prompt: &str, p: GenerateParams, spec: bool) -> Rx {
    let (tx, rx) = mpsc::channel();
    let req = BatchRequest {
        speculate: spec,
        ..BatchRequest::new(Prompt::Text(prompt.into()), p)
    };
    e.add(req, Box::new(tx)).unwrap();
    rx
}

fn run(e: &mut BatchEngine<'_, B>) {
    let mut steps = 0;
    while e.has_work() {
        e.step();
        steps += 1;
        assert!(steps < 10_000, "engine does not finish");
    }
}

fn finished(rx: &Rx) -> (String, Finished) {
    let mut text = String::new();
    for e in rx.try_iter() {
        match e.unwrap() {
            Event::Text(t) => text.push_str(&t),
            Event::Step(_) => {}
            Event::Done(d) => return (text, d),
        }
    }
    panic!("no Done event");
}

fn plain(m: &Transformer<B>, tok: &Tokenizer, prompt: &str, p: &GenerateParams) -> Vec<u32> {
    let g = Generator::new(m, tok);
    g.generate(&Prompt::Text(prompt.into()), p)
        .unwrap()
        .find_map(|e| match e.unwrap() {
            Event::Done(d) => Some(d.tokens),
            _ => None,
        })
        .unwrap()
}

/// Sixteen requests at once — prompt chunks, plain tokens and trees in shared forwards —
/// each produce exactly the tokens plain greedy decoding of that prompt alone produces.
#[test]
fn batched_greedy_equals_plain_greedy_alone() {
    let (m, tok) = model();
    let config = SchedulerConfig {
        max_batch_tokens: 48,
        prefill_chunk: 16,
        ..SchedulerConfig::default()
    };
    for (spec, policy) in [(false, "2,1,1"), (true, "2,1,1"), (true, "auto")] {
        let mut e = BatchEngine::new(&m, &tok, config.clone())
            .unwrap()
            .with_draft(|| Box::new(NgramDraft::default()))
            .with_tree_policy(policy.parse().unwrap());
        let texts = prompts(16);
        let rxs: Vec<Rx> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| submit(&mut e, t, params(12 + i % 7), spec))
            .collect();
        run(&mut e);
        for ((t, rx), i) in texts.iter().zip(&rxs).zip(0..) {
            let (_, done) = finished(rx);
            assert_eq!(
                done.tokens,
                plain(&m, &tok, t, &params(12 + i % 7)),
                "request {i} (speculation {spec})"
            );
            assert_eq!(done.spec.is_some(), spec);
        }
        assert_eq!(
            e.load(),
            Load {
                kv_pages_total: config.kv_pages,
                ..Load::default()
            }
        );
    }
}

/// `auto` in a batch times again a verify curve measured on a busy moment, row count by row
/// count, on a live sequence's cache, which it leaves as it was.
#[test]
fn auto_times_again_a_verify_curve_measured_on_a_busy_moment() {
    let (m, tok) = model();
    let texts = prompts(2);
    let run_with = |planner: Planner| {
        let mut e = BatchEngine::new(&m, &tok, SchedulerConfig::default())
            .unwrap()
            .with_draft(|| Box::new(NgramDraft::default()))
            .with_tree_policy("auto".parse().unwrap())
            .with_planner(planner);
        let rxs: Vec<Rx> = texts
            .iter()
            .map(|t| submit(&mut e, t, params(40), true))
            .collect();
        run(&mut e);
        for (t, rx) in texts.iter().zip(&rxs) {
            assert_eq!(finished(rx).1.tokens, plain(&m, &tok, t, &params(40)));
        }
        e.planner().clone()
    };
    let quiet = run_with(Planner::default()).verify_cost;
    let mut busy = Planner::default();
    let timings: Vec<_> = quiet
        .iter()
        .map(|&(n, s)| (n, 100.0 * s, 150.0 * s))
        .collect();
    busy.set_calibration(&timings);
    let p = run_with(busy);
    assert!(p.refreshes > 0, "{:?}", p.verify_cost);
    // Row counts past what a step can hold stay as they were; the rest came back down.
    let timed = p
        .verify_cost
        .iter()
        .zip(&quiet)
        .filter(|(c, q)| c.1 < 50.0 * q.1);
    assert!(timed.count() >= 3, "{:?} vs quiet {quiet:?}", p.verify_cost);
}

/// Speculation really runs in a batch: trees are verified, and some nodes accepted on a
/// repetitive prompt (prompt lookup), while the output stays the plain greedy one.
#[test]
fn trees_are_verified_inside_batched_steps() {
    let (m, tok) = model();
    let mut e = BatchEngine::new(&m, &tok, SchedulerConfig::default())
        .unwrap()
        .with_draft(|| Box::new(NgramDraft::default()))
        .with_tree("chain:4".parse().unwrap());
    // The model's own greedy output, repeated, is what prompt lookup will find.
    let seed = plain(&m, &tok, "xyz", &params(40));
    let cont = tok.decode(&seed, false).unwrap();
    let prompt = format!("xyz{cont}xyz");
    let rx = submit(&mut e, &prompt, params(30), true);
    let mut tree_rows = 0;
    while e.has_work() {
        tree_rows += e.step().tree_rows;
    }
    let (_, done) = finished(&rx);
    assert_eq!(done.tokens, plain(&m, &tok, &prompt, &params(30)));
    let spec = done.spec.unwrap();
    assert!(
        tree_rows > 0 && spec.drafted == tree_rows,
        "{tree_rows} {spec:?}"
    );
    assert!(spec.accepted > 0, "{spec:?}");
}

/// Continuous batching: a request that arrives while others decode joins between steps,
/// and a long prompt is fed in chunks while the running stream keeps emitting.
#[test]
fn requests_join_between_steps_and_long_prompts_do_not_stall_streams() {
    let (m, tok) = model();
    let config = SchedulerConfig {
        max_batch_tokens: 24,
        prefill_chunk: 16,
        ..SchedulerConfig::default()
    };
    let mut e = BatchEngine::new(&m, &tok, config).unwrap();
    let first = submit(&mut e, "hello", params(40), false);
    for _ in 0..3 {
        e.step();
    }
    let long = "a long prompt that needs many chunks. ".repeat(4);
    let second = submit(&mut e, &long, params(5), false);
    let mut texts_during_prefill = 0;
    let mut prefill_steps = 0;
    while e.has_work() {
        let r = e.step();
        if r.prefill_rows > 0 {
            prefill_steps += 1;
            assert!(r.rows <= 24);
            texts_during_prefill += usize::from(r.sequences == 2);
        }
    }
    assert!(prefill_steps >= long.len() / 16, "{prefill_steps} chunks");
    assert!(texts_during_prefill >= prefill_steps - 1);
    assert_eq!(
        finished(&first).1.tokens,
        plain(&m, &tok, "hello", &params(40))
    );
    assert_eq!(
        finished(&second).1.tokens,
        plain(&m, &tok, &long, &params(5))
    );
}

/// A dropped receiver cancels its request at the next step and frees its cache; an explicit
/// cancel does the same; a deadline ends a request with a timeout error.
#[test]
fn cancel_disconnect_and_timeout_free_everything() {
    let (m, tok) = model();
    let mut e = BatchEngine::new(&m, &tok, SchedulerConfig::default()).unwrap();
    let keep = submit(&mut e, "stay", params(20), false);
    let gone = submit(&mut e, "leave", params(1000), false);
    let (tx, _rx_cancelled) = mpsc::channel();
    let cancelled = e
        .add(
            BatchRequest::new(Prompt::Text("cancel".into()), params(1000)),
            Box::new(tx),
        )
        .unwrap();
    let (tx, timed) = mpsc::channel();
    let req = BatchRequest {
        deadline: Some(Instant::now() + Duration::from_millis(30)),
        ..BatchRequest::new(Prompt::Text("slow".into()), params(100_000))
    };
    e.add(req, Box::new(tx)).unwrap();
    for _ in 0..3 {
        e.step();
    }
    assert_eq!(e.load().running, 4);
    drop(gone);
    e.step();
    assert_eq!(e.load().running, 3, "the disconnected request is dropped");
    assert!(e.cancel(cancelled));
    assert!(!e.cancel(cancelled));
    std::thread::sleep(Duration::from_millis(40));
    e.step();
    assert!(matches!(
        timed.try_iter().last(),
        Some(Err(EngineError::Timeout { .. }))
    ));
    run(&mut e);
    assert_eq!(finished(&keep).1.tokens.len(), 20);
    let load = e.load();
    assert_eq!(
        (
            load.running,
            load.waiting,
            load.kv_tokens,
            load.kv_pages_used
        ),
        (0, 0, 0, 0)
    );
}

/// With too few KV pages for everyone, sequences are preempted and recomputed — and still
/// produce the plain greedy tokens. A full queue refuses new requests.
#[test]
fn preemption_recomputes_and_full_queue_refuses() {
    let (m, tok) = model();
    let config = SchedulerConfig {
        page_size: 4,
        kv_pages: 14,
        max_running: 2,
        max_waiting: 4,
        ..SchedulerConfig::default()
    };
    let mut e = BatchEngine::new(&m, &tok, config).unwrap();
    let texts: Vec<String> = (0..6).map(|i| format!("short {i}")).collect();
    let rxs: Vec<Rx> = texts
        .iter()
        .map(|t| submit(&mut e, t, params(24), false))
        .collect();
    let (tx, _rx) = mpsc::channel();
    let err = e
        .add(
            BatchRequest::new(Prompt::Text("x".into()), params(1)),
            Box::new(tx),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::QueueFull {
                in_flight: 6,
                limit: 6
            }
        ),
        "{err}"
    );
    let page_bytes = m.kv_layout(4).unwrap().page_bytes();
    let mut preempted = 0;
    while e.has_work() {
        let r = e.step();
        preempted += r.preempted;
        let load = e.load();
        assert!(load.kv_pages_used <= 14);
        // The accounting is the storage: every page counted is allocated, and nothing else.
        assert_eq!(load.kv_bytes, load.kv_pages_used * page_bytes);
    }
    assert!(preempted > 0, "the test must exercise preemption");
    for (t, rx) in texts.iter().zip(&rxs) {
        assert_eq!(finished(rx).1.tokens, plain(&m, &tok, t, &params(24)));
    }
    // A prompt the whole pool cannot hold is refused; one that outgrows it alone is ended.
    let (tx, _rx) = mpsc::channel();
    let err = e
        .add(
            BatchRequest::new(Prompt::Text("y".repeat(80)), params(1)),
            Box::new(tx),
        )
        .unwrap_err();
    assert!(
        matches!(err, EngineError::KvCapacity { capacity: 56, .. }),
        "{err}"
    );
    let rx = submit(&mut e, "grows", params(200), false);
    run(&mut e);
    assert!(matches!(
        rx.try_iter().last(),
        Some(Err(EngineError::KvCapacity { .. }))
    ));
}

/// Bad requests are refused at `add`, the engine unharmed.
#[test]
fn bad_requests_are_refused() {
    let (m, tok) = model();
    let mut e = BatchEngine::new(&m, &tok, SchedulerConfig::default()).unwrap();
    let (tx, _rx) = mpsc::channel::<Result<Event, EngineError>>();
    let bad = [
        BatchRequest::new(Prompt::Text(String::new()), params(3)),
        BatchRequest::new(Prompt::Text("x".repeat(m.max_position() + 5)), params(3)),
        BatchRequest::new(Prompt::Text("x".into()), params(0)),
        BatchRequest::new(
            Prompt::Text("x".into()),
            GenerateParams {
                sampling: SamplingParams {
                    temperature: -1.0,
                    ..SamplingParams::greedy()
                },
                ..params(3)
            },
        ),
    ];
    for req in bad {
        assert!(e.add(req, Box::new(tx.clone())).is_err());
    }
    assert!(!e.has_work());
    assert!(
        BatchEngine::new(
            &m,
            &tok,
            SchedulerConfig {
                max_running: 0,
                ..SchedulerConfig::default()
            }
        )
        .is_err()
    );
}

/// Every KV policy — quantization (per-channel and per-token keys, 2 bits, a short window),
/// Quest (a budget of a few pages), H2O (a budget below most contexts) and all three together
/// — gives a request the same tokens alone, batched with 15 others, and speculating: what a
/// query reads depends on positions and committed tokens only, and trees are cut to the depth
/// the policy allows. Each policy changes some output (so it is on); with budgets past the
/// context and no quantization the result is the dense one exactly.
#[test]
fn kv_policies_keep_greedy_equal_across_batching_and_speculation() {
    use arbor_cache::{
        H2oConfig, KvCompression, KvPolicy, QuantAxis, QuantConfig, QuestConfig, StepFormat,
    };
    use std::sync::Arc;
    let (m, tok) = model();
    let config = SchedulerConfig {
        page_size: 4,
        ..SchedulerConfig::default()
    };
    let layout = m.kv_layout(config.page_size).unwrap();
    let run = |policy: Option<&Arc<KvPolicy>>, texts: &[String], spec: bool| -> Vec<Vec<u32>> {
        let mut e = BatchEngine::new(&m, &tok, config.clone())
            .unwrap()
            .with_draft(|| Box::new(NgramDraft::default()))
            .with_tree("2,1,1".parse().unwrap());
        if let Some(p) = policy {
            e = e.with_kv_policy(p.clone()).unwrap();
        }
        let rxs: Vec<Rx> = texts
            .iter()
            .map(|t| submit(&mut e, t, params(24), spec))
            .collect();
        run(&mut e);
        rxs.iter().map(|rx| finished(rx).1.tokens).collect()
    };
    let quant_with = |keys, values, refine, steps| {
        let cfg = QuantConfig {
            bits: 2,
            group: layout.head_dim,
            sinks: 2,
            window: 8,
            keys,
            values,
            refine,
            steps,
        };
        KvCompression::uniform(&layout, &cfg).unwrap()
    };
    let quant = |keys| quant_with(keys, QuantAxis::Token, 0, StepFormat::F16);
    let quest = |budget| QuestConfig {
        budget,
        recent: 8,
        sinks: 2,
        dense_layers: 1,
    };
    let h2o = |budget| H2oConfig {
        budget,
        recent: 8,
        sinks: 2,
    };
    let policies = [
        (
            "2-bit, per-channel keys",
            KvPolicy::quantized(quant(QuantAxis::Channel)),
        ),
        (
            "2-bit, per-token keys",
            KvPolicy::quantized(quant(QuantAxis::Token)),
        ),
        (
            "2-bit, per-channel values, refined channels",
            KvPolicy::quantized(quant_with(
                QuantAxis::Channel,
                QuantAxis::Channel,
                4,
                StepFormat::F16,
            )),
        ),
        (
            "2-bit, per-channel values, refined channels, 8-bit steps",
            KvPolicy::quantized(quant_with(
                QuantAxis::Channel,
                QuantAxis::Channel,
                4,
                StepFormat::F8,
            )),
        ),
        (
            "Quest",
            KvPolicy {
                quest: Some(quest(20)),
                ..KvPolicy::default()
            },
        ),
        (
            "H2O",
            KvPolicy {
                h2o: Some(h2o(16)),
                ..KvPolicy::default()
            },
        ),
        (
            "all three",
            KvPolicy {
                compression: Some(quant(QuantAxis::Channel)),
                quest: Some(quest(20)),
                h2o: Some(h2o(24)),
            },
        ),
    ];
    let texts = prompts(16);
    let dense = run(None, &texts, false);
    for (name, policy) in policies {
        policy.check(&layout).unwrap();
        let policy = Arc::new(policy);
        let alone: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| run(Some(&policy), std::slice::from_ref(t), false).remove(0))
            .collect();
        assert_eq!(run(Some(&policy), &texts, false), alone, "{name}: batched");
        assert_eq!(
            run(Some(&policy), &texts, true),
            alone,
            "{name}: batched + speculating"
        );
        assert_ne!(
            alone, dense,
            "{name} must change some output (else it is not on)"
        );
    }
    let exact = Arc::new(KvPolicy {
        compression: None,
        quest: Some(quest(100_000)),
        h2o: Some(h2o(100_000)),
    });
    assert_eq!(
        run(Some(&exact), &texts, true),
        dense,
        "budgets past the context are exact"
    );
}

/// A model draft that records the growth gates of every request it gets.
struct GateProbe<'m> {
    inner: ModelDraft<B>,
    seen: &'m RefCell<Vec<(usize, Vec<f32>)>>,
}

impl Draft for GateProbe<'_> {
    fn name(&self) -> &str {
        "probe"
    }

    fn propose(
        &mut self,
        req: &DraftRequest<'_>,
        rng: &mut StdRng,
    ) -> Result<(TokenTree, DraftCost), SpecError> {
        self.seen
            .borrow_mut()
            .push((req.shape.depth(), req.gates.to_vec()));
        self.inner.propose(req, rng)
    }

    fn reset(&mut self) {
        self.inner.reset();
    }
}

/// `auto` hands batched drafts the planner's growth gates, as to one sequence alone (how
/// gates stop growth is `arbor_speculators`' test), a gate for every level below the first of
/// the (scheduler-cut) shape; a fixed shape none. Output stays the plain greedy one.
#[test]
fn auto_gates_batched_trees() {
    let (m, tok) = model();
    let draft = m.truncated(1).unwrap();
    let config = SchedulerConfig {
        spec_max_rows: 32,
        ..SchedulerConfig::default()
    };
    for policy in ["auto", "chain:4"] {
        let seen = RefCell::new(Vec::new());
        let mut e = BatchEngine::new(&m, &tok, config.clone())
            .unwrap()
            .with_draft(|| {
                Box::new(GateProbe {
                    inner: ModelDraft::new("self-1", draft.clone()),
                    seen: &seen,
                })
            })
            .with_tree_policy(policy.parse().unwrap());
        // One request at a time: a lone sequence tries trees before any evidence (a batch
        // of them would not, `Planner::plan_batch`).
        for t in prompts(3) {
            let rx = submit(&mut e, &t, params(24), true);
            run(&mut e);
            assert_eq!(finished(&rx).1.tokens, plain(&m, &tok, &t, &params(24)));
        }
        drop(e);
        let seen = seen.into_inner();
        assert!(!seen.is_empty(), "{policy}: trees were drafted");
        for (depth, gates) in &seen {
            if policy == "auto" {
                assert!(gates.len() + 1 >= *depth, "{depth} levels, gates {gates:?}");
                // (A gate is 0 where a level costs nothing measurable yet: a tiny model's
                // flat verify curve before the draft's level cost is known.)
                assert!(
                    gates.iter().all(|g| g.is_finite() && *g >= 0.0),
                    "{gates:?}"
                );
            } else {
                assert!(gates.is_empty(), "{gates:?}");
            }
        }
        if policy == "auto" {
            assert!(
                seen.iter().any(|(d, _)| *d > 1),
                "some tree could grow past one level"
            );
        }
    }
}
