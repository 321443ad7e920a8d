//! Few-rows matmul: time against the number of rows (1 = plain decode, 2–64 = tree
//! verification), f32 and f16 weights, at a Qwen2.5-1.5B MLP shape (1536 → 8960, 55 MB of f32
//! weights: well beyond the caches, as in a real forward). `cargo bench -p arbor-kernels`.

use arbor_kernels::matmul::{PackedF16, PackedF32};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn rows_curve(c: &mut Criterion) {
    let (k, n) = (1536usize, 8960usize);
    let w: Vec<f32> = (0..k * n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let f32w = PackedF32::from_out_in(&w, n, k).expect("valid shape");
    let f16w = PackedF16::from_out_in(&w, n, k).expect("valid shape");
    let mut group = c.benchmark_group("matmul_1536x8960");
    group.sample_size(20);
    for m in [1usize, 2, 4, 8, 16, 32, 64] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 / 13.0).collect();
        let mut y = vec![0.0f32; m * n];
        group.throughput(Throughput::Elements(m as u64));
        group.bench_with_input(BenchmarkId::new("f32", m), &m, |b, &m| {
            b.iter(|| f32w.matmul(&x, m, &mut y).expect("sizes match"));
        });
        group.bench_with_input(BenchmarkId::new("f16", m), &m, |b, &m| {
            b.iter(|| f16w.matmul(&x, m, &mut y).expect("sizes match"));
        });
    }
    group.finish();
}

criterion_group!(benches, rows_curve);
criterion_main!(benches);
