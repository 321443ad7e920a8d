//! The CubeCL kernels on the default wgpu device: quantized matmul at the 1.5B's MLP shape
//! (Q4_K, 1536 → 8960) for 1 and 8 rows, and paged tree attention over 1 024 cached tokens
//! (0.5B head shape) for a decode row and a 13-row tree. On a machine without a GPU this is
//! Mesa's lavapipe — a correctness vehicle, not a GPU figure.
//! `cargo bench -p arbor-kernels --bench cube`.

use arbor_kernels::cube::attention::{CubePagedKv, PagedDims};
use arbor_kernels::cube::qmatmul::CubeQuantMatrix;
use arbor_kernels::qmatmul::QuantMatrix;
use arbor_kernels::quant::GgmlType;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use cubecl::Runtime;
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};

fn data(n: usize, salt: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + salt) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

fn bench(c: &mut Criterion) {
    let client = WgpuRuntime::client(&WgpuDevice::default());
    let (n, k) = (8960, 1536);
    let ty = GgmlType::Q4_K;
    let mut bytes: Vec<u8> = (0..ty.bytes_for(n * k).unwrap())
        .map(|i| (i * 131 % 251) as u8)
        .collect();
    for block in bytes.chunks_exact_mut(ty.block_bytes()) {
        block[..4].copy_from_slice(&[0x00, 0x20, 0x00, 0x20]); // d = dmin = 2^-7
    }
    let w = QuantMatrix::new(ty, n, k, bytes).unwrap();
    let gpu = CubeQuantMatrix::<WgpuRuntime>::upload(&client, &w).unwrap();
    let mut g = c.benchmark_group("cube");
    g.sample_size(10);
    for m in [1, 8] {
        let x = data(m * k, m);
        g.bench_with_input(BenchmarkId::new("q4_k_matmul", m), &m, |b, &m| {
            b.iter(|| gpu.matmul_host(&x, m).unwrap());
        });
    }
    for n_q in [1, 13] {
        let d = PagedDims {
            n_heads: 14,
            n_kv_heads: 2,
            head_dim: 64,
            page_size: 16,
            cached: 1024,
            n_q,
        };
        let pages = (d.cached + n_q).div_ceil(16);
        let floats = pages * 16 * 2 * 64;
        let table: Vec<u32> = (0..pages as u32).collect();
        let kv = CubePagedKv::<WgpuRuntime>::upload(
            &client,
            &data(floats, 1),
            &data(floats, 2),
            &table,
            d,
        )
        .unwrap();
        let q = data(14 * n_q * 64, 3);
        let parents: Vec<i32> = (0..n_q as i32).map(|i| i - 1).collect();
        g.bench_with_input(
            BenchmarkId::new("tree_attention_1024", n_q),
            &n_q,
            |b, _| {
                b.iter(|| kv.attention(&q, &parents).unwrap());
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
