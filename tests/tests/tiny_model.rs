//! Correctness of the model on tiny random-weight checkpoints.

use arbor_engine::{Event, GenerateParams, Generator, Prompt};
use arbor_model::hub::{ModelFiles, ResolveOptions, resolve};
use arbor_model::{Architecture, ForwardInput, LoadedModel, ModelConfig, device::Cpu};
use arbor_tests::fixtures::{write_gguf, write_hf_dir};

fn tiny(arch: Architecture) -> ModelConfig {
    ModelConfig {
        vocab_size: 257,
        ..ModelConfig::tiny(arch)
    }
}

fn last_logits(m: &LoadedModel<Cpu>, tokens: &[u32]) -> Vec<f32> {
    let mut cache = m.model.new_cache();
    m.model
        .forward_last_logits(&ForwardInput::causal(tokens, 0), &mut cache)
        .unwrap()
        .remove(0)
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(worst <= tol, "{what}: max difference {worst} > {tol}");
}

/// One pass over n tokens gives the same logits as n single-token passes through the cache,
/// and as chunked passes (chunked prefill).
#[test]
fn cache_append_equivalence() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        write_gguf(&path, &tiny(arch), 3);
        let m = LoadedModel::<Cpu>::from_gguf(&path, &Default::default()).unwrap();
        let tokens: Vec<u32> = (0..23).map(|i| (i * 37 % 250) as u32).collect();
        let mut cache = m.model.new_cache();
        let hidden = m
            .model
            .forward(&ForwardInput::causal(&tokens, 0), &mut cache)
            .unwrap();
        let all = m.model.logits(hidden).into_data().to_vec::<f32>().unwrap();
        let v = m.config.vocab_size;

        let mut cache = m.model.new_cache();
        for (i, &t) in tokens.iter().enumerate() {
            let step = m
                .model
                .forward_last_logits(&ForwardInput::causal(&[t], i), &mut cache)
                .unwrap();
            assert_close(
                &step[0],
                &all[i * v..(i + 1) * v],
                1e-4,
                &format!("{arch:?} token {i}"),
            );
        }
        assert_eq!(cache.len(), tokens.len());

        let mut cache = m.model.new_cache();
        let mut done = 0;
        for chunk in tokens.chunks(5) {
            let out = m
                .model
                .forward_last_logits(&ForwardInput::causal(chunk, done), &mut cache)
                .unwrap();
            done += chunk.len();
            assert_close(
                &out[0],
                &all[(done - 1) * v..done * v],
                1e-4,
                &format!("{arch:?} chunk"),
            );
        }
        // Rollback: truncating and re-feeding gives the same result.
        cache.truncate(10);
        let again = m
            .model
            .forward_last_logits(&ForwardInput::causal(&tokens[10..], 10), &mut cache)
            .unwrap();
        assert_close(&again[0], &all[22 * v..23 * v], 1e-4, "after truncate");
    }
}

/// A GGUF Llama checkpoint (q/k rows interleaved for llama.cpp's RoPE) and a safetensors folder
/// of the same weights (HF layout) load into the same model; Qwen2 with q/k/v biases too.
#[test]
fn gguf_and_safetensors_checkpoints_agree() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let dir = tempfile::tempdir().unwrap();
        let c = tiny(arch);
        let params = write_gguf(&dir.path().join("m.gguf"), &c, 5);
        write_hf_dir(&dir.path().join("hf"), &c, &params);
        let a =
            LoadedModel::<Cpu>::from_gguf(&dir.path().join("m.gguf"), &Default::default()).unwrap();
        let b =
            LoadedModel::<Cpu>::from_hf_dir(&dir.path().join("hf"), &Default::default()).unwrap();
        assert_eq!(a.config, b.config);
        let tokens = [1, 50, 99, 200, 7, 7, 3];
        assert_close(
            &last_logits(&a, &tokens),
            &last_logits(&b, &tokens),
            1e-4,
            &format!("{arch:?}"),
        );
        assert!(b.tokenizer.is_end_of_generation(256));
        assert_eq!(b.tokenizer.encode("hi").unwrap(), vec![104, 105]);
    }
}

/// Skipping the RoPE layout permutation changes the output: the equivalence above is not
/// vacuous.
#[test]
fn wrong_rope_layout_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let c = tiny(Architecture::Llama);
    write_gguf(&dir.path().join("m.gguf"), &c, 5);
    // The same GGUF loaded as Qwen2 (no q/k permutation on load): logits must differ.
    let a = LoadedModel::<Cpu>::from_gguf(&dir.path().join("m.gguf"), &Default::default()).unwrap();
    let reread = arbor_model::gguf::GgufFile::open(dir.path().join("m.gguf")).unwrap();
    let mut cfg = reread.model_config().unwrap();
    cfg.architecture = Architecture::Qwen2;
    let unpermuted = arbor_model::Transformer::<Cpu>::from_weights(
        &cfg,
        &mut arbor_model::gguf::GgufWeights::new(&reread, &cfg),
        &Default::default(),
    )
    .unwrap();
    let tokens = [4u32, 8, 15, 16, 23, 42];
    let mut cache = unpermuted.new_cache();
    let wrong = unpermuted
        .forward_last_logits(&ForwardInput::causal(&tokens, 0), &mut cache)
        .unwrap();
    let right = last_logits(&a, &tokens);
    let diff = right
        .iter()
        .zip(&wrong[0])
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(
        diff > 1e-3,
        "ignoring the interleaved layout went unnoticed ({diff})"
    );
}

/// A hub id resolves offline from a populated Hugging Face cache (models--org--name layout).
#[test]
fn hub_id_resolves_from_offline_hf_cache() {
    let home = tempfile::tempdir().unwrap();
    let repo = home
        .path()
        .join("hub")
        .join("models--arbor-test--tiny-qwen");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(commit);
    let c = tiny(Architecture::Qwen2);
    let params = arbor_tests::fixtures::random_parameters(&c, 9);
    write_hf_dir(&snapshot, &c, &params);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), commit).unwrap();
    // SAFETY: nextest runs each test in its own process; no other thread reads the environment.
    unsafe {
        std::env::set_var("HF_HOME", home.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let opts = ResolveOptions {
        fetch_missing: false,
        progress: false,
        ..ResolveOptions::default()
    };
    let files = resolve("arbor-test/tiny-qwen", opts).unwrap();
    assert_eq!(files, ModelFiles::HfDir(snapshot.clone()));
    let m = LoadedModel::<Cpu>::load("arbor-test/tiny-qwen", opts, &Default::default()).unwrap();
    assert_eq!(m.config.architecture, Architecture::Qwen2);
    let err = resolve("arbor-test/absent", opts).unwrap_err().to_string();
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}

/// Plain generation respects max_tokens, stop strings and seeds.
#[test]
fn generation_params_take_effect() {
    let dir = tempfile::tempdir().unwrap();
    write_gguf(&dir.path().join("m.gguf"), &tiny(Architecture::Llama), 11);
    let m = LoadedModel::<Cpu>::from_gguf(&dir.path().join("m.gguf"), &Default::default()).unwrap();
    let g = Generator::new(&m.model, &m.tokenizer);
    let run = |params: &GenerateParams| {
        let mut text = String::new();
        let mut done = None;
        for ev in g.generate(&Prompt::Text("abc".into()), params).unwrap() {
            match ev.unwrap() {
                Event::Text(t) => text.push_str(&t),
                Event::Done(d) => done = Some(d),
                Event::Step(_) => panic!("plain generation has no speculative steps"),
            }
        }
        (text, done.unwrap())
    };
    let base = GenerateParams {
        max_tokens: 12,
        ignore_eos: true,
        ..Default::default()
    };
    let (text, done) = run(&base);
    assert_eq!(done.tokens.len(), 12);
    assert_eq!(done.reason, arbor_engine::FinishReason::Length);
    // Stop at a string that the greedy output contains: output is cut before it.
    let chars: Vec<char> = text.chars().collect();
    assert!(
        chars.len() >= 4,
        "random model produced too little text: {text:?}"
    );
    let stop: String = chars[2..4].iter().collect();
    let (cut, d) = run(&GenerateParams {
        stop: vec![stop.clone()],
        ..base.clone()
    });
    assert_eq!(d.reason, arbor_engine::FinishReason::Stop);
    assert_eq!(cut, text[..text.find(&stop).unwrap()]);
    assert!(d.tokens.len() < 12);
    let sampled = GenerateParams {
        sampling: arbor_model::SamplingParams {
            temperature: 1.0,
            seed: Some(42),
            ..Default::default()
        },
        ..base.clone()
    };
    assert_eq!(run(&sampled).1.tokens, run(&sampled).1.tokens);
}

/// A batched forward over sequences with different cache lengths (a prompt chunk, a decode
/// step, a tree) gives each sequence the logits, and the cache, it gets alone.
#[test]
fn batched_forward_equals_each_sequence_alone() {
    use arbor_model::{LogitRows, SeqForward};
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        write_gguf(&path, &tiny(arch), 5);
        let m = LoadedModel::<Cpu>::from_gguf(&path, &Default::default()).unwrap();
        let prompt =
            |n: usize, s: u32| -> Vec<u32> { (0..n as u32).map(|i| (i * 31 + s) % 250).collect() };
        // Caches: empty, 9 tokens, 4 tokens.
        let mut caches = vec![
            m.model.new_cache(),
            m.model.new_cache(),
            m.model.new_cache(),
        ];
        for (c, n) in caches.iter_mut().zip([0, 9, 4]) {
            if n > 0 {
                m.model
                    .forward(&ForwardInput::causal(&prompt(n, 7), 0), c)
                    .unwrap();
            }
        }
        // A tree on the third: root, two children of the root, one grandchild.
        let tree = {
            let cached = 4;
            let total = cached + 4;
            let parents = [None, Some(0), Some(0), Some(1)];
            let mut mask = vec![false; 4 * total];
            for (i, p) in parents.iter().enumerate() {
                mask[i * total..i * total + cached].fill(true);
                let mut node = Some(i);
                while let Some(j) = node {
                    mask[i * total + cached + j] = true;
                    node = parents[j];
                }
                let _ = p;
            }
            ForwardInput {
                batch: 1,
                n_new: 4,
                tokens: vec![3, 60, 61, 90],
                positions: vec![4, 5, 5, 6],
                mask,
            }
        };
        let inputs = [
            ForwardInput::causal(&prompt(6, 1), 0),
            ForwardInput::causal(&[42], 9),
            tree,
        ];
        let wants = [LogitRows::Last, LogitRows::Last, LogitRows::All];

        let mut alone = Vec::new();
        let mut alone_caches = caches.clone();
        for ((input, c), want) in inputs.iter().zip(&mut alone_caches).zip(wants) {
            let rows = m.model.forward_all_logits(input, c).unwrap();
            alone.push(match want {
                LogitRows::All => rows,
                _ => vec![rows.last().unwrap().clone()],
            });
        }
        let mut seqs: Vec<SeqForward<'_, Cpu>> = inputs
            .iter()
            .zip(caches.iter_mut())
            .zip(wants)
            .map(|((input, cache), logits)| SeqForward {
                input,
                cache,
                logits,
            })
            .collect();
        let batched = m.model.forward_batch(&mut seqs).unwrap();
        assert_eq!(batched.len(), 3);
        for (s, (a, b)) in alone.iter().zip(&batched).enumerate() {
            assert_eq!(a.len(), b.len(), "{arch:?} seq {s}");
            for (ra, rb) in a.iter().zip(b) {
                assert_close(ra, rb, 1e-5, &format!("{arch:?} seq {s}"));
            }
        }
        for (a, b) in alone_caches.iter().zip(&caches) {
            assert_eq!(a.len(), b.len());
        }
        // A follow-up decode step sees the same cache contents either way.
        for (s, (a, b)) in alone_caches.iter_mut().zip(caches.iter_mut()).enumerate() {
            let next = ForwardInput::causal(&[5], a.len());
            let la = m.model.forward_last_logits(&next, a).unwrap();
            let lb = m.model.forward_last_logits(&next, b).unwrap();
            assert_close(&la[0], &lb[0], 1e-5, &format!("{arch:?} cache {s}"));
        }
        // Inputs with batch > 1 are refused, not mixed up.
        let mut two = ForwardInput::causal(&[1, 2], 0);
        two.batch = 2;
        two.n_new = 1;
        two.mask = vec![true, true];
        let mut c = m.model.new_cache();
        let err = m
            .model
            .forward_batch(&mut [SeqForward {
                input: &two,
                cache: &mut c,
                logits: LogitRows::All,
            }])
            .unwrap_err();
        assert!(err.to_string().contains("one sequence per input"), "{err}");
    }
}
