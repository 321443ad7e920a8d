//! Masked GQA attention: the fused row-wise kernel against the burn tensor-op reference, at a
//! Qwen2.5-1.5B layer shape (12 query heads, 2 KV heads, head_dim 128), for a decode row and a
//! 16-node tree over 1024 and 4096 cached tokens. `cargo bench -p arbor-kernels --bench attention`.

use arbor_kernels::attention::{AttentionDims, attention_reference, attention_rows};
use burn::backend::Flex;
use burn::tensor::{Bool, Tensor, TensorData};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

type B = Flex;

fn data(n: usize, salt: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + salt) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    g.sample_size(20);
    for &(n_q, cached) in &[(1usize, 1024usize), (16, 1024), (1, 4096), (16, 4096)] {
        let n_kv = cached + n_q;
        let d = AttentionDims {
            batch: 1,
            n_heads: 12,
            n_kv_heads: 2,
            n_q,
            n_kv,
            head_dim: 128,
        };
        let q = data(12 * n_q * 128, 1);
        let k = data(2 * n_kv * 128, 2);
        let v = data(2 * n_kv * 128, 3);
        // Causal over the new rows (a chain); trees cost the same per visible key.
        let mut mask = vec![false; n_q * n_kv];
        for i in 0..n_q {
            mask[i * n_kv..i * n_kv + cached + i + 1].fill(true);
        }
        let id = format!("q{n_q}_kv{cached}");
        g.bench_with_input(BenchmarkId::new("rows", &id), &(), |b, ()| {
            b.iter(|| attention_rows(&q, &k, &v, &mask, d).unwrap());
        });
        let dev = Default::default();
        let t = |x: &[f32], s: [usize; 4]| {
            Tensor::<B, 4>::from_data(TensorData::new(x.to_vec(), s), &dev)
        };
        let (qt, kt, vt) = (
            t(&q, [1, 12, n_q, 128]),
            t(&k, [1, 2, n_kv, 128]),
            t(&v, [1, 2, n_kv, 128]),
        );
        let mt =
            Tensor::<B, 3, Bool>::from_data(TensorData::new(mask.clone(), [1, n_q, n_kv]), &dev);
        g.bench_with_input(BenchmarkId::new("reference", &id), &(), |b, ()| {
            b.iter(|| {
                attention_reference(qt.clone(), kt.clone(), vt.clone(), mt.clone()).into_data()
            });
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
