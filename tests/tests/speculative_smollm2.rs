//! Tree attention and speculative greedy decoding on the real SmolLM2-135M checkpoint.

use arbor_engine::{Engine, Event, GenerateParams, Generator, Prompt, TreePolicy};
use arbor_engine::{EngineError, Finished};
use arbor_model::{ChatMessage, ForwardInput, LoadedModel, device::Cpu};
use arbor_speculators::{NgramDraft, TokenTree};
use arbor_tests::smollm2_path;

fn load() -> LoadedModel<Cpu> {
    LoadedModel::<Cpu>::from_gguf(&smollm2_path(), &Default::default()).unwrap()
}

/// Largest |Δlogit| allowed between one tree forward and a node's path run alone with f32
/// weights: burn's f32 matmuls take different shapes and reduction orders for a tree and a
/// lone path (measured: 5e-5 on logits of size ~20).
const TREE_TOLERANCE_F32: f32 = 2e-3;

/// With the weights kept quantized (the default), every stage is row-independent — int8
/// matmuls per row, the fused row-wise attention, per-row norms — so a tree node's logits
/// equal its path run alone bit for bit (before the fused attention, a last-bit difference
/// there flipped 8-bit activation roundings and moved logits by up to 0.83).
#[test]
fn tree_logits_equal_each_path_run_alone() {
    use arbor_model::hub::WeightFormat;
    for (format, tolerance) in [
        (WeightFormat::F32, TREE_TOLERANCE_F32),
        (WeightFormat::Native, 0.0),
    ] {
        tree_vs_paths(format, tolerance);
    }
}

fn tree_vs_paths(format: arbor_model::hub::WeightFormat, tolerance: f32) {
    let m = LoadedModel::<Cpu>::from_gguf_as(&smollm2_path(), format, &Default::default()).unwrap();
    let prefix = m.tokenizer.encode("The capital of France is").unwrap();
    // A tree of real continuations and distractors, 3 levels deep.
    let words = [" Paris", " the", " a", ".", " and", " city", " known"];
    let ids: Vec<u32> = words
        .iter()
        .map(|w| m.tokenizer.encode(w).unwrap().last().copied().unwrap())
        .collect();
    let mut tree = TokenTree::new(*prefix.last().unwrap());
    let a = tree.push(0, ids[0], 0).unwrap();
    let b = tree.push(0, ids[1], 0).unwrap();
    let a1 = tree.push(a, ids[3], 0).unwrap();
    tree.push(a, ids[4], 0).unwrap();
    tree.push(b, ids[5], 0).unwrap();
    tree.push(a1, ids[6], 0).unwrap();
    tree.push(a1, ids[2], 0).unwrap();

    let cached = &prefix[..prefix.len() - 1];
    let mut cache = m.model.new_cache();
    m.model
        .forward(&ForwardInput::causal(cached, 0), &mut cache)
        .unwrap();
    let rows = m
        .model
        .forward_all_logits(&tree.forward_input(cached.len()), &mut cache)
        .unwrap();
    let mut worst = 0.0f32;
    for (i, row) in rows.iter().enumerate() {
        let seq: Vec<u32> = cached
            .iter()
            .copied()
            .chain(tree.path(i).iter().map(|&j| tree.nodes()[j].token))
            .collect();
        let mut c = m.model.new_cache();
        let alone = m
            .model
            .forward_last_logits(&ForwardInput::causal(&seq, 0), &mut c)
            .unwrap();
        let diff = alone[0]
            .iter()
            .zip(row)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        worst = worst.max(diff);
    }
    println!("{format:?}: max |Δlogit| tree vs path alone: {worst:e}");
    assert!(worst <= tolerance, "{format:?}: max |Δlogit| {worst}");
}

fn collect(events: impl Iterator<Item = Result<Event, EngineError>>) -> Finished {
    for e in events {
        if let Event::Done(d) = e.unwrap() {
            return d;
        }
    }
    panic!("no Done event")
}

#[test]
fn speculative_greedy_equals_plain_greedy_on_smollm2() {
    let m = load();
    let plain = Generator::new(&m.model, &m.tokenizer);
    let params = GenerateParams {
        max_tokens: 32,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let prompts = [
        Prompt::Chat(vec![ChatMessage::new(
            "user",
            "Write a Python function that checks whether a number is prime.",
        )]),
        Prompt::Text("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return".into()),
    ];
    // Truncated-layer drafts of an untrained early exit are poor on SmolLM2 (α ≈ 0.01 with 8
    // of 30 layers, 0.06 with 20): they exercise rejection; the n-gram draft accepts on code.
    let self_draft = m.model.truncated(4).unwrap();
    for (mix, policy) in [("self-draft 4/30", "2,1"), ("self+ngram", "chain:4")] {
        let mut engine = Engine::new(
            &m.model,
            &m.tokenizer,
            policy.parse::<TreePolicy>().unwrap(),
        )
        .with_model_draft("self8", &self_draft, &m.tokenizer)
        .unwrap();
        if mix == "self+ngram" {
            engine = engine.with_draft(NgramDraft::default());
        }
        let mut accepted = 0;
        for prompt in &prompts {
            let want = collect(plain.generate(prompt, &params).unwrap());
            let got = collect(engine.generate(prompt, &params).unwrap());
            assert_eq!(got.tokens, want.tokens, "{mix}, {policy}, {prompt:?}");
            let spec = got.spec.unwrap();
            println!(
                "{mix} {policy}: tau {:.2}, alpha {:.2}, steps {}",
                spec.tau(),
                spec.alpha(),
                spec.steps
            );
            accepted += spec.accepted;
        }
        if mix == "self+ngram" {
            assert!(accepted > 0, "{mix}: nothing accepted on real text");
        }
    }
}

/// A draft with its head cut to the first token ids scores them exactly as the whole head
/// does, reads −∞ past them, and still drafts for an engine whose output equals plain greedy.
#[test]
fn cut_head_scores_its_ids_exactly_and_drafts_correctly() {
    let m = load();
    let vocab = m.model.vocab_size();
    let cut = m.model.with_head_rows(4096).unwrap();
    let prompt = m.tokenizer.encode("The capital of France is").unwrap();
    let full = m
        .model
        .forward_last_logits(&ForwardInput::causal(&prompt, 0), &mut m.model.new_cache())
        .unwrap()
        .swap_remove(0);
    let part = cut
        .forward_last_logits(&ForwardInput::causal(&prompt, 0), &mut cut.new_cache())
        .unwrap()
        .swap_remove(0);
    assert_eq!(part.len(), vocab);
    assert_eq!(&part[..4096], &full[..4096]);
    assert!(part[4096..].iter().all(|&v| v == f32::NEG_INFINITY));
    // Rows the blocks cannot be cut at are errors, not panics.
    assert!(m.model.with_head_rows(4095).is_err());
    assert!(m.model.with_head_rows(vocab + 8).is_err());

    let params = GenerateParams {
        max_tokens: 24,
        ..GenerateParams::default()
    };
    let text = |events: Vec<Result<Event, EngineError>>| -> String {
        events
            .into_iter()
            .map(|e| match e.unwrap() {
                Event::Text(t) => t,
                _ => String::new(),
            })
            .collect()
    };
    let p = Prompt::Text("def fibonacci(n):".into());
    let plain = text(
        Generator::new(&m.model, &m.tokenizer)
            .generate(&p, &params)
            .unwrap()
            .collect(),
    );
    let mut engine = Engine::new(
        &m.model,
        &m.tokenizer,
        "2,1,1".parse::<TreePolicy>().unwrap(),
    )
    .with_model_draft("cut", &cut, &m.tokenizer)
    .unwrap();
    let spec = text(engine.generate(&p, &params).unwrap().collect());
    assert_eq!(spec, plain);
}

/// A draft with its head re-quantized to Q4_1 reads fewer bytes, still ranks the real model's
/// top token first on a plain prompt, and drafts for an engine whose output equals plain greedy.
#[test]
fn requantized_head_reads_less_and_drafts_correctly() {
    let m = load();
    let q = m
        .model
        .with_head_requantized(arbor_kernels::quant::GgmlType::Q4_1)
        .unwrap();
    assert!(q.weight_bytes() < m.model.weight_bytes());
    let prompt = m.tokenizer.encode("The capital of France is").unwrap();
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    };
    let logits = |model: &arbor_model::Transformer<_>| {
        model
            .forward_last_logits(&ForwardInput::causal(&prompt, 0), &mut model.new_cache())
            .unwrap()
            .swap_remove(0)
    };
    let (full, requant) = (logits(&m.model), logits(&q));
    assert_eq!(argmax(&requant), argmax(&full));
    assert_ne!(requant, full, "the head was re-encoded");

    drafts_like_plain(&m, &q);
}

/// `draft` drafts for an engine whose greedy output equals plain greedy decoding, and is
/// accepted at least once.
fn drafts_like_plain(m: &LoadedModel<Cpu>, draft: &arbor_model::Transformer<Cpu>) {
    let params = GenerateParams {
        max_tokens: 24,
        ..GenerateParams::default()
    };
    let p = Prompt::Text("def fibonacci(n):".into());
    let plain = collect(
        Generator::new(&m.model, &m.tokenizer)
            .generate(&p, &params)
            .unwrap(),
    );
    let mut engine = Engine::new(
        &m.model,
        &m.tokenizer,
        "2,1,1".parse::<TreePolicy>().unwrap(),
    )
    .with_model_draft("re-quantized", draft, &m.tokenizer)
    .unwrap();
    let spec = collect(engine.generate(&p, &params).unwrap());
    assert_eq!(spec.tokens, plain.tokens);
    assert!(
        spec.spec.unwrap().accepted > 0,
        "the draft was never accepted"
    );
}

/// Every projection re-quantized to Q4_1 (`--draft M@q4_1`): SmolLM2's layers are Q4_1
/// already, so only its Q8_0 head shrinks — to exactly the head-only variant's bytes — and the
/// whole model still drafts correctly.
#[test]
fn requantized_weights_draft_correctly() {
    use arbor_kernels::quant::GgmlType::Q4_1;
    let m = load();
    let all = m.model.with_weights_requantized(Q4_1).unwrap();
    assert_eq!(
        all.weight_bytes(),
        m.model.with_head_requantized(Q4_1).unwrap().weight_bytes()
    );
    assert!(all.weight_bytes() < m.model.weight_bytes());
    drafts_like_plain(&m, &all);
}

/// A draft whose head is scored in two passes (`--draft M@coarse`): every candidate's logit
/// is the full head's bit for bit, the others read −∞, the real model's best token is among
/// the candidates on a plain prompt, a token reads fewer head bytes, and the draft drafts for
/// an engine whose greedy output equals plain greedy.
#[test]
fn coarse_head_scores_candidates_exactly_and_drafts_correctly() {
    use arbor_kernels::quant::GgmlType::Q8_0;
    use arbor_model::coarse_head;
    let m = load();
    let text = "Speculative decoding lets a small draft model propose several tokens that a \
                large target model then checks in one forward pass. def fibonacci(n):\n    \
                a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\
                The capital of France is Paris, and the capital of Italy is Rome. Rust code: \
                fn main() { let v: Vec<u32> = (0..10).collect(); println!(\"{v:?}\"); }";
    let ids = m.tokenizer.encode(text).unwrap();
    let chunks: Vec<&[u32]> = ids.chunks(64).collect();
    let basis = coarse_head::calibrate(&m.model, &chunks, 64).unwrap();
    let coarse = m.model.with_coarse_head(&basis, 64, 32, Q8_0).unwrap();
    assert!(coarse.weight_bytes() < m.model.weight_bytes());

    let prompt = m.tokenizer.encode("The capital of France is").unwrap();
    let logits = |model: &arbor_model::Transformer<Cpu>| {
        model
            .forward_last_logits(&ForwardInput::causal(&prompt, 0), &mut model.new_cache())
            .unwrap()
            .swap_remove(0)
    };
    let (full, two_pass) = (logits(&m.model), logits(&coarse));
    let kept: Vec<usize> = (0..full.len())
        .filter(|&j| two_pass[j].is_finite())
        .collect();
    assert_eq!(kept.len(), 32);
    assert!(
        kept.iter()
            .all(|&j| two_pass[j].to_bits() == full[j].to_bits())
    );
    let argmax = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
    assert_eq!(argmax(&two_pass), argmax(&full));

    // Sizes the head cannot take are errors, not panics.
    assert!(m.model.with_coarse_head(&basis, 48, 32, Q8_0).is_err());
    assert!(m.model.with_coarse_head(&basis, 64, 0, Q8_0).is_err());
    let cut = m.model.with_head_rows(4096).unwrap();
    assert!(cut.with_coarse_head(&basis, 64, 32, Q8_0).is_err());

    drafts_like_plain(&m, &coarse);
}
