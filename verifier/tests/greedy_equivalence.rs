//! Speculative greedy decoding with tree verification produces exactly the target's plain
//! greedy output, token for token, on tiny random models and varied tree shapes.

use arbor_model::{Architecture, ForwardInput, ModelConfig, RandomWeights, Transformer};
use arbor_speculators::TokenTree;
use arbor_verifier::verify_greedy;

type B = burn::backend::Flex;

fn plain_greedy(m: &Transformer<B>, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = m.new_cache();
    let mut logits = m
        .forward_last_logits(&ForwardInput::causal(prompt, 0), &mut cache)
        .unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let t = arbor_model::sampling::argmax(&logits[0]) as u32;
        out.push(t);
        logits = m
            .forward_last_logits(&ForwardInput::causal(&[t], cache.len()), &mut cache)
            .unwrap();
    }
    out
}

/// A tree below `root` mixing the true continuation `truth` (so some steps accept) with decoys;
/// `shape` picks how many decoys per level and where the truth branch is cut.
fn tree(root: u32, truth: &[u32], shape: usize, vocab: u32) -> TokenTree {
    let mut t = TokenTree::new(root);
    let mut node = 0;
    let depth = 1 + shape % 4;
    for (d, &tok) in truth.iter().take(depth).enumerate() {
        for k in 0..(shape % 3) {
            let decoy = (tok + 1 + (k + d) as u32 * 7) % vocab;
            let decoy_node = t.push(node, decoy, 1).unwrap();
            t.push(decoy_node, (decoy * 3) % vocab, 1).unwrap();
        }
        if d == depth - 1 && shape % 2 == 1 {
            // Wrong token at the last level: a rejection inside the tree.
            t.push(node, (tok + 5) % vocab, 0).unwrap();
            break;
        }
        node = t.push(node, tok, 0).unwrap();
    }
    t
}

#[test]
fn speculative_greedy_equals_plain_greedy() {
    let dev = Default::default();
    for (arch, seed) in [
        (Architecture::Llama, 1),
        (Architecture::Qwen2, 2),
        (Architecture::Llama, 3),
    ] {
        let cfg = ModelConfig::tiny(arch);
        let m =
            Transformer::<B>::from_weights(&cfg, &mut RandomWeights::new(seed, 0.3), &dev).unwrap();
        let prompt: Vec<u32> = (0..6).map(|i| (i * 13 + seed as u32) % 97).collect();
        let n = 24;
        let want = plain_greedy(&m, &prompt, n + 8);

        let mut cache = m.new_cache();
        let first = m
            .forward_last_logits(&ForwardInput::causal(&prompt, 0), &mut cache)
            .unwrap();
        let mut out = vec![arbor_model::sampling::argmax(&first[0]) as u32];
        let mut shape = 0;
        let mut steps = 0;
        while out.len() < n {
            let cached = cache.len();
            let root = *out.last().unwrap();
            let truth = &want[out.len()..];
            let t = tree(root, truth, shape, cfg.vocab_size as u32);
            shape += 1;
            steps += 1;
            let hidden = m.forward(&t.forward_input(cached), &mut cache).unwrap();
            let flat = m.logits(hidden).into_data().to_vec::<f32>().unwrap();
            let rows: Vec<Vec<f32>> = flat.chunks(cfg.vocab_size).map(<[f32]>::to_vec).collect();
            let v = verify_greedy(&t, &rows);
            // Commit by rollback and re-feed of the accepted path (the paged cache will move
            // rows instead).
            cache.truncate(cached);
            let path: Vec<u32> = std::iter::once(root)
                .chain(v.accepted.iter().map(|&i| t.nodes()[i].token))
                .collect();
            m.forward(&ForwardInput::causal(&path, cached), &mut cache)
                .unwrap();
            out.extend(&v.tokens);
        }
        assert_eq!(out[..n], want[..n], "{arch:?} seed {seed}");
        assert!(
            steps < n,
            "no step accepted anything: the test would not exercise acceptance"
        );
    }
}
