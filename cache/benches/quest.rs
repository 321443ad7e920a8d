//! Attention over a paged cache of 4 096 tokens at a Qwen2.5-0.5B layer shape (14 query
//! heads, 2 KV heads, head_dim 64), for one decode row: every page read vs. Quest at a 25%
//! budget (page bounds scored, then only the chosen pages read), exact and 4-bit pages.
//! `cargo bench -p arbor-cache --bench quest`.

use std::sync::Arc;

use arbor_cache::{KvCompression, KvLayout, KvPolicy, PagedKv, QuantConfig, QuestConfig};
use arbor_kernels::attention::{AttentionDims, attention_rows_with};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

fn data(n: usize, salt: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + salt) % 1000) as f32 / 1000.0 - 0.5) * (1.0 + (i % 64) as f32 / 8.0))
        .collect()
}

fn bench(c: &mut Criterion) {
    let layout = KvLayout {
        n_layers: 3,
        n_kv_heads: 2,
        head_dim: 64,
        page_size: 16,
    };
    let n = 4096;
    let (k, v) = (data(2 * n * 64, 2), data(2 * n * 64, 3));
    let q = data(14 * 64, 1);
    let quant = KvCompression::uniform(&layout, &QuantConfig::default()).unwrap();
    let quest = Some(QuestConfig::with_budget(n / 4));
    let policies = [
        ("dense", KvPolicy::default()),
        (
            "quest25",
            KvPolicy {
                quest,
                ..KvPolicy::default()
            },
        ),
        ("q4", KvPolicy::quantized(quant.clone())),
        (
            "q4_quest25",
            KvPolicy {
                compression: Some(quant),
                quest,
                h2o: None,
            },
        ),
    ];
    let mut g = c.benchmark_group("paged_attention_4096");
    g.sample_size(30);
    for (name, policy) in policies {
        let mut cache = PagedKv::with_policy(layout, Arc::new(policy));
        for layer in 0..3 {
            cache.append_head_major(layer, &k, &v, n);
        }
        cache.compress();
        let d = AttentionDims {
            batch: 1,
            n_heads: 14,
            n_kv_heads: 2,
            n_q: 1,
            n_kv: n,
            head_dim: 64,
        };
        let mask = vec![true; n];
        // Layer 2: past Quest's dense layers.
        let view = cache.layer(2);
        g.bench_with_input(BenchmarkId::new("decode", name), &(), |b, ()| {
            b.iter(|| attention_rows_with(&q, &view, &mask, Some(&[n]), d).unwrap());
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
