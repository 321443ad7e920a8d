//! KV row quantization: pack and unpack 1024 rows of 256 channels (2 KV heads × 128, a
//! Qwen2.5-1.5B layer's keys for 1024 tokens) at 2, 4 and 8 bits, group 64.
//! `cargo bench -p arbor-kernels --bench kvquant`.

use arbor_kernels::kvquant::RowQuantizer;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let (rows, channels) = (1024usize, 256usize);
    let data: Vec<f32> = (0..rows * channels)
        .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
        .collect();
    let mut g = c.benchmark_group("kvquant");
    g.sample_size(20);
    for bits in [2u32, 4, 8] {
        let q = RowQuantizer::new(bits, 64, channels, None, None).expect("valid");
        let mut packed = vec![0u8; rows * q.packed_bytes()];
        g.bench_with_input(BenchmarkId::new("quantize", bits), &(), |b, ()| {
            b.iter(|| {
                for (r, p) in data
                    .chunks_exact(channels)
                    .zip(packed.chunks_exact_mut(q.packed_bytes()))
                {
                    q.quantize(r, p);
                }
            });
        });
        let mut back = vec![0.0f32; rows * channels];
        g.bench_with_input(BenchmarkId::new("dequantize", bits), &(), |b, ()| {
            b.iter(|| {
                for (p, r) in packed
                    .chunks_exact(q.packed_bytes())
                    .zip(back.chunks_exact_mut(channels))
                {
                    q.dequantize(p, r);
                }
            });
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
