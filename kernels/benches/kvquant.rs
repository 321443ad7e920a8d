//! KV row quantization: pack and unpack 1024 rows of 256 channels (2 KV heads × 128, a
//! Qwen2.5-1.5B layer's keys for 1024 tokens) at 2, 4 and 8 bits, group 64; and the same
//! 1024 tokens as per-channel blocks of 16 tokens at 4 bits, unpacked one KV head's row at a
//! time as attention reads them — plain, with 32 refined channels per head, and with 8-bit
//! steps. `cargo bench -p arbor-kernels --bench kvquant`.

use arbor_kernels::kvquant::{ChannelQuantizer, RowQuantizer, StepFormat};
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
    let (tokens, head_dim) = (16usize, 128usize);
    for (name, refine, steps) in [
        ("channel", 0, StepFormat::F16),
        ("channel-ref32", 32, StepFormat::F16),
        ("channel-ref32-f8", 32, StepFormat::F8),
    ] {
        let q = ChannelQuantizer::new(4, tokens, channels)
            .and_then(|q| q.with_refinement(refine, head_dim))
            .expect("valid")
            .with_steps(steps);
        let mut packed = vec![0u8; rows / tokens * q.packed_bytes()];
        for (block, p) in data
            .chunks_exact(tokens * channels)
            .zip(packed.chunks_exact_mut(q.packed_bytes()))
        {
            q.quantize(block, p);
        }
        let mut row = vec![0.0f32; head_dim];
        g.bench_with_input(BenchmarkId::new("dequantize-rows", name), &(), |b, ()| {
            b.iter(|| {
                let mut sum = 0.0f32;
                for p in packed.chunks_exact(q.packed_bytes()) {
                    for t in 0..tokens {
                        for from in (0..channels).step_by(head_dim) {
                            q.dequantize(p, t, from, &mut row);
                            sum += row[0];
                        }
                    }
                }
                sum
            });
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
