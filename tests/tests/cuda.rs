//! The CUDA backend against the CPU backend on tiny random models — run on a machine with an
//! NVIDIA GPU: `cargo test -p arbor-tests --features cuda --test cuda`. (Built only with the
//! `cuda` feature; this workspace's CI has no GPU, and runs the CubeCL kernels themselves on
//! lavapipe in `arbor-kernels`' and `arbor-cache`'s tests.)
//!
//! What it checks of the CUDA path: the KV cache lives on the device (a
//! [`DeviceStore`](arbor_cache::DeviceStore)) and the CubeCL tree attention reads it; logits of
//! a prompt and of a speculation tree equal the CPU backend's; commit and rollback keep them
//! equal; speculative greedy decoding equals plain greedy decoding token for token; GGUF
//! block weights multiplied on the device by the CubeCL quantized matmul give the CPU's f32
//! logits over the same weights — on tiny random models, and (ignored unless asked for:
//! `ARBOR_CUDA_GGUF=model.gguf … -- --ignored`) on a real-sized model.
#![cfg(feature = "cuda")]

use std::path::Path;

use arbor_engine::{Engine, EngineError, Event, GenerateParams, Generator, Prompt, TreePolicy};
use arbor_kernels::quant::GgmlType;
use arbor_model::device::{Cpu, Cuda, check_cuda};
use arbor_model::hub::WeightFormat;
use arbor_model::{
    Architecture, ForwardInput, LoadedModel, ModelConfig, RandomWeights, Transformer,
    testing::byte_tokenizer,
};
use arbor_speculators::{ModelDraft, NgramDraft};
use arbor_tests::fixtures::write_gguf_quantized;
use burn::tensor::backend::Backend;

fn model<B: Backend>(device: &B::Device) -> Transformer<B> {
    let cfg = ModelConfig {
        vocab_size: 256,
        num_layers: 3,
        ..ModelConfig::tiny(Architecture::Qwen2)
    };
    Transformer::from_weights(&cfg, &mut RandomWeights::new(11, 0.3), device).unwrap()
}

fn tokens(events: impl Iterator<Item = Result<Event, EngineError>>) -> Vec<u32> {
    for e in events {
        if let Event::Done(d) = e.unwrap() {
            return d.tokens;
        }
    }
    panic!("no Done event")
}

/// Every logit of `a` within `tol` (relative, plus `tol` absolute) of `b`'s, and finite.
fn close(a: &[Vec<f32>], b: &[Vec<f32>], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (r, (x, y)) in a.iter().zip(b).enumerate() {
        for (i, (p, q)) in x.iter().zip(y).enumerate() {
            assert!(
                q.is_finite() && (p - q).abs() <= tol * (1.0 + q.abs()),
                "{what} row {r} logit {i}: {p} vs {q}"
            );
        }
    }
}

/// A tree over `cached` tokens: rows 0..n with `parents`, as the verifier builds it.
fn tree(tokens: &[u32], parents: &[i32], cached: usize) -> ForwardInput {
    let n = tokens.len();
    let total = cached + n;
    let mut mask = vec![false; n * total];
    let mut positions = Vec::with_capacity(n);
    for i in 0..n {
        mask[i * total..i * total + cached].fill(true);
        let mut node = i as i32;
        let mut depth = 0;
        while node >= 0 {
            mask[i * total + cached + node as usize] = true;
            node = parents[node as usize];
            depth += 1;
        }
        positions.push(cached + depth - 1);
    }
    ForwardInput {
        batch: 1,
        n_new: n,
        tokens: tokens.to_vec(),
        positions,
        mask,
    }
}

#[test]
fn cuda_logits_equal_cpu_logits_through_trees_commits_and_rollbacks() {
    check_cuda(0).expect("a CUDA device");
    let gpu = model::<Cuda>(&Default::default());
    let cpu = model::<Cpu>(&Default::default());
    let (mut gc, mut cc) = (gpu.new_cache(), cpu.new_cache());
    assert!(
        gc.device_store().is_some(),
        "the CUDA cache lives on the device"
    );
    let prompt: Vec<u32> = b"speculative decoding on a GPU"
        .iter()
        .map(|&b| b.into())
        .collect();
    let input = ForwardInput::causal(&prompt, 0);
    close(
        &gpu.forward_all_logits(&input, &mut gc).unwrap(),
        &cpu.forward_all_logits(&input, &mut cc).unwrap(),
        1e-3,
        "prompt",
    );
    assert_eq!(gc.len(), cc.len());
    let parents = [-1, 0, 0, 1, 1, 2, 3];
    for round in 0..6 {
        let cached = gc.len();
        let tokens: Vec<u32> = (0..parents.len() as u32)
            .map(|i| (round * 7 + i) % 256)
            .collect();
        let t = tree(&tokens, &parents, cached);
        close(
            &gpu.forward_all_logits(&t, &mut gc).unwrap(),
            &cpu.forward_all_logits(&t, &mut cc).unwrap(),
            1e-3,
            &format!("tree {round}"),
        );
        if round % 3 == 2 {
            gc.truncate(cached);
            cc.truncate(cached);
        } else {
            let path = [cached, cached + 1, cached + 4];
            gc.retain(cached, &path);
            cc.retain(cached, &path);
        }
        assert_eq!(gc.len(), cc.len());
    }
    let next = ForwardInput::causal(&[42], gc.len());
    close(
        &gpu.forward_all_logits(&next, &mut gc).unwrap(),
        &cpu.forward_all_logits(&next, &mut cc).unwrap(),
        1e-3,
        "decode after the commits",
    );
}

#[test]
fn cuda_speculative_greedy_equals_plain_greedy() {
    check_cuda(0).expect("a CUDA device");
    let target = model::<Cuda>(&Default::default());
    let tok = byte_tokenizer();
    let params = GenerateParams {
        max_tokens: 32,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let p = Prompt::Text("the cat sat on the mat. the cat sat on the".into());
    let want = tokens(Generator::new(&target, &tok).generate(&p, &params).unwrap());
    let policy: TreePolicy = "2,2,1".parse().unwrap();
    let mut engine = Engine::new(&target, &tok, policy)
        .with_draft(ModelDraft::new("self1", target.truncated(1).unwrap()))
        .with_draft(NgramDraft::default());
    let got = tokens(engine.generate(&p, &params).unwrap());
    assert_eq!(got, want);
}

/// With KV quantization on the device (4-bit, window 8, calibration-free), speculative
/// greedy decoding still equals plain greedy decoding on CUDA, and old pages hold only codes.
#[test]
fn cuda_quantized_cache_keeps_speculative_equal_to_plain() {
    use arbor_cache::{KvCompression, KvPolicy, QuantConfig};
    use std::sync::Arc;
    check_cuda(0).expect("a CUDA device");
    let target = model::<Cuda>(&Default::default());
    let layout = target.kv_layout(16).expect("a paged device cache");
    let config = QuantConfig {
        bits: 4,
        group: 16,
        sinks: 4,
        window: 8,
        ..QuantConfig::default()
    };
    let policy = Arc::new(KvPolicy::quantized(
        KvCompression::uniform(&layout, &config).unwrap(),
    ));
    target.check_kv_policy(&policy).unwrap();
    let mut cache = target.new_cache_with(16, Some(policy.clone()));
    let long: Vec<u32> = (0..100u32).map(|i| (i * 37) % 256).collect();
    target
        .forward_last_logits(&ForwardInput::causal(&long, 0), &mut cache)
        .unwrap();
    cache.truncate(100); // a commit point: pages past the window drop their full copies
    let dense_bytes = 2 * 3 * 100usize.div_ceil(16) * 16 * layout.n_kv_heads * layout.head_dim * 4;
    assert!(
        cache.bytes() < dense_bytes,
        "{} vs {dense_bytes}",
        cache.bytes()
    );
    let tok = byte_tokenizer();
    let params = GenerateParams {
        max_tokens: 48,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let p = Prompt::Text("the cat sat on the mat. the cat sat on the mat. the cat".into());
    let plain = Generator::new(&target, &tok)
        .with_kv_policy(policy.clone())
        .unwrap();
    let want = tokens(plain.generate(&p, &params).unwrap());
    let tree: TreePolicy = "2,2,1".parse().unwrap();
    let mut engine = Engine::new(&target, &tok, tree)
        .with_draft(NgramDraft::default())
        .with_kv_policy(policy)
        .unwrap();
    assert_eq!(tokens(engine.generate(&p, &params).unwrap()), want);
}

/// Logits of a prompt, a tree over it, a commit and a decode step: the CUDA model (its
/// projections' GGUF blocks on the device) against the CPU model over the same weights
/// dequantized to f32 (exact arithmetic, no activation rounding).
fn compare_block_weights_with_f32(path: &Path, prompt: &[u32], tol: f32) {
    let gpu = LoadedModel::<Cuda>::from_gguf_as(path, WeightFormat::Native, &Default::default())
        .unwrap()
        .model;
    let cpu = LoadedModel::<Cpu>::from_gguf_as(path, WeightFormat::F32, &Default::default())
        .unwrap()
        .model;
    assert!(
        gpu.weight_bytes() * 5 < cpu.weight_bytes() * 3,
        "block weights stay quantized on the device: {} vs {} f32 bytes",
        gpu.weight_bytes(),
        cpu.weight_bytes()
    );
    let (mut gc, mut cc) = (gpu.new_cache(), cpu.new_cache());
    let input = ForwardInput::causal(prompt, 0);
    close(
        &gpu.forward_all_logits(&input, &mut gc).unwrap(),
        &cpu.forward_all_logits(&input, &mut cc).unwrap(),
        tol,
        "prompt",
    );
    let cached = gc.len();
    let parents = [-1, 0, 0, 1, 2, 3, 3, 4];
    let t = tree(&prompt[..parents.len()], &parents, cached);
    close(
        &gpu.forward_all_logits(&t, &mut gc).unwrap(),
        &cpu.forward_all_logits(&t, &mut cc).unwrap(),
        tol,
        "tree",
    );
    let path = [cached, cached + 1, cached + 3, cached + 5];
    gc.retain(cached, &path);
    cc.retain(cached, &path);
    let next = ForwardInput::causal(&prompt[..1], gc.len());
    close(
        &gpu.forward_all_logits(&next, &mut gc).unwrap(),
        &cpu.forward_all_logits(&next, &mut cc).unwrap(),
        tol,
        "decode after the commit",
    );
}

#[test]
fn cuda_block_weights_equal_the_cpu_f32_reference() {
    check_cuda(0).expect("a CUDA device");
    let cfg = ModelConfig {
        vocab_size: 257,
        hidden_size: 64,
        intermediate_size: 96,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        ..ModelConfig::tiny(Architecture::Qwen2)
    };
    let dir = tempfile::tempdir().unwrap();
    let prompt: Vec<u32> = b"block weights on the device"
        .iter()
        .map(|&b| b.into())
        .collect();
    for ty in [GgmlType::Q8_0, GgmlType::Q4_1] {
        let path = dir.path().join(format!("{ty:?}.gguf"));
        write_gguf_quantized(&path, &cfg, 7, ty);
        compare_block_weights_with_f32(&path, &prompt, 1e-3);
    }
}

/// The same comparison on the model `ARBOR_CUDA_GGUF` names (e.g. the Qwen2.5-Coder-1.5B
/// Q4_K_M file, or one `scripts/gguf-hollow.py` filled with random blocks of its shapes):
/// Q4_K and Q6_K at full size. Run by `scripts/gpu-run.sh`.
#[test]
#[ignore = "needs ARBOR_CUDA_GGUF=<model.gguf> and a GPU"]
fn cuda_block_weights_equal_the_cpu_f32_reference_on_a_real_sized_model() {
    check_cuda(0).expect("a CUDA device");
    let path = std::env::var("ARBOR_CUDA_GGUF").expect("ARBOR_CUDA_GGUF=<model.gguf>");
    let prompt: Vec<u32> = (0..24u32).map(|i| 9 + i * 211).collect();
    compare_block_weights_with_f32(Path::new(&path), &prompt, 2e-3);
}
