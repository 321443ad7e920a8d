//! Block-quantized matmul: time against the number of rows (1 = plain decode, 2–64 = tree
//! verification) for each GGUF format, at a Qwen2.5-1.5B MLP shape (1536 → 8960), beside the
//! f32 panels of `matmul` for scale; where the CPU has AVX-512 VNNI, also the AVX2 build of
//! the same kernels, and where it has AMX, Q4_K on the VNNI kernels alone (`matmul` there
//! runs whichever of the tiles and VNNI it has measured faster; `ARBOR_KERNELS=amx` pins the
//! fixed rule); and the work between
//! the products (activation quantization, the MLP's gating) at the 1.5B's widest row.
//! `cargo bench -p arbor-kernels --bench qmatmul`.

use arbor_kernels::matmul::PackedF32;
use arbor_kernels::qmatmul::{Isa, Q8Acts, QuantMatrix};
use arbor_kernels::quant::GgmlType;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// Deterministic blocks with finite f16 scales.
fn matrix(ty: GgmlType, n: usize, k: usize) -> QuantMatrix {
    let bytes = ty.bytes_for(n * k).expect("whole blocks");
    let mut data: Vec<u8> = (0..bytes).map(|i| (i * 7919 % 251) as u8).collect();
    let fields: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q6_K => &[208],
        _ => &[0, 2],
    };
    for block in data.chunks_exact_mut(ty.block_bytes()) {
        for &at in fields {
            block[at..at + 2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        }
    }
    QuantMatrix::new(ty, n, k, data).expect("valid matrix")
}

fn rows_curve(c: &mut Criterion) {
    let (k, n) = (1536usize, 8960usize);
    let types = [
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q8_0,
        GgmlType::Q5_0,
        GgmlType::Q4_1,
    ];
    let mats: Vec<QuantMatrix> = types.iter().map(|&t| matrix(t, n, k)).collect();
    let w: Vec<f32> = (0..k * n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let f32w = PackedF32::from_out_in(&w, n, k).expect("valid shape");
    let mut group = c.benchmark_group("qmatmul_1536x8960");
    group.sample_size(20);
    for m in [1usize, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 / 13.0 - 0.4).collect();
        let mut y = vec![0.0f32; m * n];
        group.throughput(Throughput::Elements(m as u64));
        for (ty, mat) in types.iter().zip(&mats) {
            group.bench_with_input(BenchmarkId::new(format!("{ty:?}"), m), &m, |b, &m| {
                b.iter(|| mat.matmul(&x, m, &mut y).expect("sizes match"));
            });
        }
        // The same kernels without VNNI (what `Isa::best` picks on CPUs without it).
        for (ty, mat) in types.iter().zip(&mats) {
            if !Isa::Avx2.available() || Isa::best() == Isa::Avx2 {
                break;
            }
            group.bench_with_input(BenchmarkId::new(format!("{ty:?}-avx2"), m), &m, |b, &m| {
                b.iter(|| {
                    mat.matmul_with(Isa::Avx2, &x, m, &mut y)
                        .expect("sizes match")
                });
            });
        }
        // Q4_K without the AMX tile products (what `Isa::best` picks on CPUs without AMX).
        if Isa::best() == Isa::Amx {
            group.bench_with_input(BenchmarkId::new("Q4_K-vnni", m), &m, |b, &m| {
                b.iter(|| {
                    mats[0]
                        .matmul_with(Isa::Avx512Vnni, &x, m, &mut y)
                        .expect("sizes match")
                });
            });
        }
        if m <= 8 {
            group.bench_with_input(BenchmarkId::new("Q4_K-portable", m), &m, |b, &m| {
                b.iter(|| {
                    mats[0]
                        .matmul_with(Isa::Portable, &x, m, &mut y)
                        .expect("sizes match")
                });
            });
        }
        group.bench_with_input(BenchmarkId::new("f32", m), &m, |b, &m| {
            b.iter(|| f32w.matmul(&x, m, &mut y).expect("sizes match"));
        });
    }
    group.finish();
}

/// A decode step's worth of weights streamed from memory (~600 MB of 1536 × 8960 matrices
/// per format — far past the last-level cache, as a model's layers are) at 1, 2, 4, 6 and 8 rows,
/// beside a plain two-thread read of as many bytes: the kernels against this machine's memory
/// roofline.
fn from_memory(c: &mut Criterion) {
    use rayon::prelude::*;
    let (k, n) = (1536usize, 8960usize);
    let mut group = c.benchmark_group("from_memory");
    group.sample_size(10);
    let x: Vec<f32> = (0..8 * k).map(|i| (i % 13) as f32 / 13.0 - 0.4).collect();
    let mut y = vec![0.0f32; 8 * n];
    let mut bytes = 0;
    for (ty, copies) in [
        (GgmlType::Q4_K, 80usize),
        (GgmlType::Q6_K, 56),
        (GgmlType::Q8_0, 40),
        (GgmlType::Q5_0, 64),
        (GgmlType::Q4_1, 72),
    ] {
        let mats: Vec<QuantMatrix> = (0..copies).map(|_| matrix(ty, n, k)).collect();
        bytes = mats.iter().map(QuantMatrix::bytes).sum();
        group.throughput(Throughput::Bytes(bytes as u64));
        // One row (plain decode), two (a draft level after an accepted chain, the smallest
        // tree), four to eight (trees' verification).
        for rows in [1usize, 2, 4, 6, 8] {
            group.bench_function(format!("{ty:?}-{rows}row"), |b| {
                b.iter(|| {
                    for m in &mats {
                        m.matmul(&x[..rows * k], rows, &mut y[..rows * n])
                            .expect("sizes match");
                    }
                });
            });
        }
    }
    let words: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    group.bench_function("read", |b| {
        b.iter(|| {
            words
                .par_chunks(1 << 16)
                .map(|c| c.iter().fold(0u64, |a, &w| a ^ w))
                .reduce(|| 0, |a, b| a ^ b)
        });
    });
    group.finish();
}

/// What runs between a layer's products, on rows of 8 960 (the 1.5B's MLP width): the
/// activations' 8-bit quantization (k-quant blocks; every product starts with it) and
/// `silu(g) · u`.
fn between_products(c: &mut Criterion) {
    let k = 8960usize;
    let mut group = c.benchmark_group("between_products");
    for m in [1usize, 4, 8] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 97) as f32 / 19.0 - 2.5).collect();
        group.bench_with_input(BenchmarkId::new("quantize", m), &m, |b, &m| {
            b.iter(|| Q8Acts::quantize(&x, m, k, 256));
        });
        let u: Vec<f32> = x.iter().rev().copied().collect();
        let mut g = x.clone();
        group.bench_with_input(BenchmarkId::new("silu_mul", m), &m, |b, _| {
            b.iter(|| {
                g.copy_from_slice(&x);
                arbor_kernels::act::silu_mul(&mut g, &u);
            });
        });
    }
    group.finish();
}

criterion_group!(benches, rows_curve, from_memory, between_products);
criterion_main!(benches);
