use super::*;
use crate::matmul::matmul_reference;

/// The block formats the matmul takes.
pub(crate) const TYPES: [GgmlType; 8] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// A row length the interleaved layout stores as two panels of `k` (see `panels`).
fn long_k(ty: GgmlType) -> usize {
    if ty.block_size() == 256 { 2560 } else { 2112 }
}

/// Byte offsets of each block's f16 scale/min fields.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q6_K => &[208],
        _ => &[0, 2],
    }
}

/// A small deterministic generator (xorshift).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(crate) fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Random blocks: every bit random except the f16 scales, which are finite and modest.
pub(crate) fn random_matrix(ty: GgmlType, n: usize, k: usize, rng: &mut Rng) -> QuantMatrix {
    let bytes = ty.bytes_for(n * k).unwrap();
    let mut data: Vec<u8> = (0..bytes).map(|_| rng.next() as u8).collect();
    for block in data.chunks_exact_mut(ty.block_bytes()) {
        for &at in f16_fields(ty) {
            let v = half::f16::from_f32(0.05 * rng.unit());
            block[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    QuantMatrix::new(ty, n, k, data).unwrap()
}

/// Runs `f` on a pool of two threads: a product's jobs hold an even number of whole groups
/// (at least two, ~12 jobs per thread), so the matrices of these tests (59 outputs and up: 7+
/// groups) meet pairs of groups (`x16`, the tile products) and, at an odd count, a group
/// alone; two threads keep that mix the same on a machine of any size.
fn on_two_threads(f: impl FnOnce() + Send) {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a pool of two threads")
        .install(f);
}

/// `w · x` (`m` rows) with the VNNI build under each vendor tuning (`tuning`: Intel's pairs
/// of groups and prefetch, or the other's), named for messages.
fn vnni_under_both_tunings(w: &QuantMatrix, x: &[f32], m: usize) -> [(&'static str, Vec<f32>); 2] {
    use super::tuning::AS_INTEL;
    use std::sync::atomic::Ordering;
    [(1, "Intel"), (2, "other")].map(|(as_intel, name)| {
        AS_INTEL.store(as_intel, Ordering::Relaxed);
        let mut y = vec![f32::NAN; m * w.n()];
        w.matmul_with(Isa::Avx512Vnni, x, m, &mut y).unwrap();
        AS_INTEL.store(0, Ordering::Relaxed);
        (name, y)
    })
}

/// `m` rows of `k` activations that quantize to ±127 throughout, by row in turn: all +1, +1
/// then −1 by 256-value block, all −1, and ±1 alternating every `period` values.
fn extreme_rows(m: usize, k: usize, period: usize) -> Vec<f32> {
    (0..m * k)
        .map(|i| match (i / k) % 4 {
            0 => 1.0,
            1 => [1.0, -1.0][(i % k) / 256],
            2 => -1.0,
            _ => [1.0, -1.0][(i / period) % 2],
        })
        .collect()
}

/// The VNNI kernels under both vendors' tunings and the tile products, where this CPU has
/// them, give `want`'s bits.
fn vnni_and_tiles_agree(w: &QuantMatrix, x: &[f32], m: usize, want: &[f32], what: &str) {
    if Isa::Avx512Vnni.available() {
        for (name, y) in vnni_under_both_tunings(w, x, m) {
            assert_eq!(y, want, "{what} tuned as {name}");
        }
    }
    if Isa::Amx.available() {
        let mut y = vec![f32::NAN; m * w.n()];
        w.matmul_with(Isa::Amx, x, m, &mut y).unwrap();
        assert_eq!(y, want, "{what} tiles");
    }
}

/// Checks `y` against the f64 reference over `w` with per-entry tolerance `tol(r, c)`.
fn check(y: &[f32], want: &[f32], n: usize, tol: impl Fn(usize, usize) -> f32, what: &str) {
    for (i, (&a, &b)) in y.iter().zip(want).enumerate() {
        let t = tol(i / n, i % n);
        assert!(
            (a - b).abs() <= t,
            "{what}: entry {i}: {a} vs {b} (tolerance {t})"
        );
    }
}

#[test]
fn every_format_and_kernel_agrees_with_the_reference() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let isas: Vec<Isa> = [Isa::Portable, Isa::Avx2, Isa::Avx512Vnni, Isa::Amx]
        .into_iter()
        .filter(|i| i.available())
        .collect();
    for ty in TYPES {
        // The longest rows are stored as two panels of `k` (the kernels carry the row sums
        // from one panel to the next).
        let ks: &[usize] = if ty.block_size() == 256 {
            &[256, 768, 2560]
        } else {
            &[32, 96, 544, 2112]
        };
        for &k in ks {
            // 59 and 43 rows: jobs of several interleaved groups, so the VNNI build's 8-row
            // passes take groups in pairs (16 rows per 512-bit vector) and a last one alone.
            for (n, m) in [
                (1, 1),
                (5, 2),
                (37, 3),
                (9, 4),
                (13, 5),
                (6, 13),
                (11, 10),
                (59, 9),
                (43, 16),
            ] {
                let w = random_matrix(ty, n, k, &mut rng);
                let wf = w.dequantize();
                let x: Vec<f32> = (0..m * k).map(|_| 3.0 * rng.unit()).collect();
                let acts = Q8Acts::quantize(&x, m, k, w.act_block());
                let xq = acts.dequantize();
                let exact = matmul_reference(&xq, &wf, m, k, n);
                let orig = matmul_reference(&x, &wf, m, k, n);
                // f32 rounding of the block sums, relative to Σ|w·x|.
                let mag = |r: usize, c: usize, xs: &[f32]| -> f32 {
                    (0..k).map(|e| (wf[c * k + e] * xs[r * k + e]).abs()).sum()
                };
                // The activations' rounding: at most half a step per value.
                let quant = |r: usize, c: usize| -> f32 {
                    (0..k)
                        .map(|e| wf[c * k + e].abs() * 0.5 * x_step(&acts, r, e))
                        .sum()
                };
                let mut avx2 = None;
                for &isa in &isas {
                    let mut y = vec![f32::NAN; m * n];
                    w.matmul_with(isa, &x, m, &mut y).unwrap();
                    // The VNNI build and the tile products sum the same integers: the same
                    // bits as AVX2.
                    match isa {
                        Isa::Avx2 => avx2 = Some(y.clone()),
                        Isa::Avx512Vnni | Isa::Amx => {
                            assert_eq!(Some(&y), avx2.as_ref(), "{ty:?} {isa:?} vs AVX2 m={m}");
                        }
                        Isa::Portable => {}
                    }
                    let what = format!("{ty:?} {isa:?} m={m} n={n} k={k}");
                    check(&y, &exact, n, |r, c| 2e-5 * mag(r, c, &xq) + 1e-5, &what);
                    check(
                        &y,
                        &orig,
                        n,
                        |r, c| quant(r, c) + 2e-5 * mag(r, c, &x) + 1e-5,
                        &what,
                    );
                }
            }
        }
    }
}

/// The quantization step of activation `e` of row `r`.
fn x_step(acts: &Q8Acts, r: usize, e: usize) -> f32 {
    acts.row(r).d[e / acts.block()]
}

#[test]
fn many_rows_match_one_row_at_a_time() {
    on_two_threads(|| {
        let mut rng = Rng(7);
        for (ty, m, k) in TYPES.into_iter().flat_map(|t| {
            [(t, 64), (t, 7), (t, 6), (t, 5), (t, 13), (t, 2)]
                .into_iter()
                .flat_map(move |(t, m)| [(t, m, 512), (t, m, long_k(t))])
        }) {
            // Several interleaved groups per job (pairs of them in 8-row passes), and 3 GGUF rows;
            // rows of one panel of `k` and of two.
            let n = 59;
            let w = random_matrix(ty, n, k, &mut rng);
            let x: Vec<f32> = (0..m * k).map(|_| rng.unit()).collect();
            let mut all = vec![0.0; m * n];
            w.matmul(&x, m, &mut all).unwrap();
            for r in 0..m {
                let mut one = vec![0.0; n];
                w.matmul(&x[r * k..(r + 1) * k], 1, &mut one).unwrap();
                assert_eq!(
                    &all[r * n..(r + 1) * n],
                    &one[..],
                    "{ty:?} k={k} row {r} of {m}"
                );
            }
        }
    });
}

#[test]
fn rows_dequantize_like_the_whole_matrix() {
    let mut rng = Rng(3);
    let w = random_matrix(GgmlType::Q5_K, 4, 256, &mut rng);
    let all = w.dequantize();
    let mut row = vec![0.0; 256];
    w.dequantize_row(2, &mut row).unwrap();
    assert_eq!(&row[..], &all[512..768]);
    assert!(w.dequantize_row(4, &mut row).is_err());
    assert!(w.dequantize_row(0, &mut row[..10]).is_err());
}

#[test]
fn bad_inputs_are_errors() {
    assert!(matches!(
        QuantMatrix::new(GgmlType::F16, 1, 32, vec![0; 64]),
        Err(KernelError::UnsupportedType(_))
    ));
    assert!(matches!(
        QuantMatrix::new(GgmlType::Q4_K, 1, 128, vec![0; 72]),
        Err(KernelError::RaggedBlocks { .. })
    ));
    assert!(matches!(
        QuantMatrix::new(GgmlType::Q8_0, 2, 32, vec![0; 34]),
        Err(KernelError::ByteLength { .. })
    ));
    assert!(QuantMatrix::new(GgmlType::Q8_0, 0, 32, vec![]).is_err());
    let w = QuantMatrix::new(GgmlType::Q8_0, 1, 32, vec![0; 34]).unwrap();
    let mut y = vec![0.0; 2];
    assert!(matches!(
        w.matmul(&[0.0; 32], 2, &mut y),
        Err(KernelError::Shape(_))
    ));
    assert!(w.matmul(&[], 0, &mut []).is_ok());
}

#[test]
fn fused_products_equal_one_product_each() {
    let mut rng = Rng(11);
    let k = 512;
    // Mixed block sizes (256 for the k-quants, 32 otherwise) and ragged output counts.
    let mats: Vec<QuantMatrix> = [
        (GgmlType::Q4_K, 37),
        (GgmlType::Q8_0, 5),
        (GgmlType::Q6_K, 64),
    ]
    .into_iter()
    .map(|(ty, n)| random_matrix(ty, n, k, &mut rng))
    .collect();
    let refs: Vec<&QuantMatrix> = mats.iter().collect();
    for m in [1, 3, 9] {
        let x: Vec<f32> = (0..m * k).map(|_| rng.unit()).collect();
        let mut fused: Vec<Vec<f32>> = mats.iter().map(|w| vec![0.0; m * w.n()]).collect();
        let mut outs: Vec<&mut [f32]> = fused.iter_mut().map(Vec::as_mut_slice).collect();
        matmul_fused(&refs, &x, m, &mut outs).unwrap();
        // Into new outputs, each job filling its own share (no zeroed buffers first).
        let fresh = matmul_fused_new(&refs, &x, m).unwrap();
        for ((w, got), new) in mats.iter().zip(&fused).zip(&fresh) {
            let mut want = vec![0.0; m * w.n()];
            w.matmul(&x, m, &mut want).unwrap();
            assert_eq!(got, &want, "{:?}, {m} rows", w.ty());
            assert_eq!(new, &want, "{:?}, {m} rows, new outputs", w.ty());
        }
    }
    // Bad operands are errors there too; no rows, no values.
    let x = vec![0.5; k];
    assert!(matches!(
        matmul_fused_new(&refs, &x[..k - 1], 1),
        Err(KernelError::Shape(_))
    ));
    let other = random_matrix(GgmlType::Q8_0, 3, 2 * k, &mut rng);
    assert!(matches!(
        matmul_fused_new(&[refs[0], &other], &x, 1),
        Err(KernelError::Shape(_))
    ));
    let none = matmul_fused_new(&refs, &[], 0).unwrap();
    assert!(none.iter().all(Vec::is_empty) && none.len() == refs.len());
}

#[test]
fn rows_apart_equal_the_contiguous_product() {
    let mut rng = Rng(17);
    let k = 512;
    // A k-quant with the tile products (from 3 rows) and a 32-weight format; 37 outputs:
    // interleaved groups and GGUF rows after them.
    for ty in [GgmlType::Q6_K, GgmlType::Q4_K, GgmlType::Q8_0] {
        let w = random_matrix(ty, 37, k, &mut rng);
        for m in [1, 3, 8, 17] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.unit()).collect();
            let mut want = vec![0.0; m * 37];
            w.matmul(&x, m, &mut want).unwrap();
            // Rows in buffers of their own, filled with garbage first.
            let mut rows: Vec<Vec<f32>> = (0..m).map(|_| vec![f32::NAN; 37]).collect();
            let mut outs: Vec<&mut [f32]> = rows.iter_mut().map(Vec::as_mut_slice).collect();
            w.matmul_into_rows(&x, &mut outs).unwrap();
            assert_eq!(rows.concat(), want, "{ty:?}, {m} rows");
            // Into new rows, filled by the product's jobs.
            let fresh = w.matmul_new_rows(&x, m).unwrap();
            assert!(fresh.iter().all(|r| r.len() == 37));
            assert_eq!(fresh.concat(), want, "{ty:?}, {m} new rows");
        }
        assert!(matches!(
            w.matmul_new_rows(&vec![0.5; 2 * k], 3),
            Err(KernelError::Shape(_))
        ));
        assert!(w.matmul_new_rows(&[], 0).unwrap().is_empty());
        // A row of the wrong length, or activations for another row count.
        let x = vec![0.5; 2 * k];
        let (mut a, mut b) = (vec![0.0; 37], vec![0.0; 36]);
        assert!(matches!(
            w.matmul_into_rows(&x, &mut [&mut a, &mut b]),
            Err(KernelError::Shape(_))
        ));
        assert!(matches!(
            w.matmul_into_rows(&x, &mut [&mut a]),
            Err(KernelError::Shape(_))
        ));
        assert!(w.matmul_into_rows(&[], &mut []).is_ok());
    }
}

#[test]
fn fused_products_reject_bad_operands() {
    let mut rng = Rng(5);
    let a = random_matrix(GgmlType::Q8_0, 2, 64, &mut rng);
    let b = random_matrix(GgmlType::Q8_0, 2, 32, &mut rng);
    let x = vec![0.5; 64];
    let (mut ya, mut yb) = (vec![0.0; 2], vec![0.0; 2]);
    // Different input widths.
    assert!(matches!(
        matmul_fused(&[&a, &b], &x, 1, &mut [&mut ya, &mut yb]),
        Err(KernelError::Shape(_))
    ));
    // One output too few, and one too short.
    assert!(matches!(
        matmul_fused(&[&a, &a], &x, 1, &mut [&mut ya]),
        Err(KernelError::Shape(_))
    ));
    assert!(matches!(
        matmul_fused(&[&a, &a], &x, 1, &mut [&mut ya, &mut yb[..1]]),
        Err(KernelError::Shape(_))
    ));
    assert!(matmul_fused(&[], &x, 1, &mut []).is_ok());
}

#[test]
fn interleaved_formats_give_back_their_gguf_bytes() {
    let mut rng = Rng(21);
    for (ty, n) in [
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q8_0,
        GgmlType::Q5_0,
        GgmlType::Q4_1,
    ]
    .into_iter()
    .flat_map(|t| [(t, 8), (t, 19), (t, 3)])
    {
        for k in [512, long_k(ty)] {
            let bytes: Vec<u8> = (0..ty.bytes_for(n * k).unwrap())
                .map(|_| rng.next() as u8)
                .collect();
            let w = QuantMatrix::new(ty, n, k, bytes.clone()).unwrap();
            assert_eq!(w.groups, n / 8, "n = {n}");
            assert_eq!(&w.raw()[..], &bytes[..], "n = {n}");
            let mut want = vec![0.0; n * k];
            crate::quant::dequantize_into(ty, &bytes, &mut want).unwrap();
            let mut row = vec![0.0; k];
            for j in 0..n {
                w.dequantize_row(j, &mut row).unwrap();
                assert_eq!(
                    row.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want[j * k..(j + 1) * k]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    "{ty:?} row {j} of {n}, k = {k}"
                );
            }
        }
    }
}

#[test]
fn row_prefixes_multiply_like_the_whole_matrix() {
    let mut rng = Rng(33);
    for (ty, n, keep, k) in [
        (GgmlType::Q8_0, 37, 16, 256),
        (GgmlType::Q4_1, 19, 8, 256),
        (GgmlType::Q5_1, 11, 5, 256),
        // Two panels of `k`.
        (GgmlType::Q4_K, 27, 16, long_k(GgmlType::Q4_K)),
        (GgmlType::Q5_0, 19, 8, long_k(GgmlType::Q5_0)),
    ] {
        let w = random_matrix(ty, n, k, &mut rng);
        let p = w.rows_prefix(keep).unwrap();
        assert_eq!((p.n(), p.k()), (keep, k));
        let x: Vec<f32> = (0..2 * k).map(|_| rng.unit()).collect();
        let (mut all, mut part) = (vec![0.0; 2 * n], vec![0.0; 2 * keep]);
        w.matmul(&x, 2, &mut all).unwrap();
        p.matmul(&x, 2, &mut part).unwrap();
        for r in 0..2 {
            assert_eq!(&part[r * keep..(r + 1) * keep], &all[r * n..r * n + keep]);
        }
    }
    let w = random_matrix(GgmlType::Q8_0, 37, 32, &mut rng);
    // Interleaved rows come in eights; none, or more than there are, is no prefix.
    assert!(w.rows_prefix(12).is_none());
    assert!(w.rows_prefix(0).is_none());
    assert!(w.rows_prefix(38).is_none());
}

#[test]
fn requantized_rows_are_their_rows_quantized() {
    let mut rng = Rng(51);
    for (ty, n) in [
        (GgmlType::Q8_0, 19),
        (GgmlType::Q6_K, 9),
        (GgmlType::Q5_0, 3),
    ] {
        let k = 256;
        let w = random_matrix(ty, n, k, &mut rng);
        let q = w.requantized(GgmlType::Q4_1).unwrap();
        assert_eq!((q.ty(), q.n(), q.k()), (GgmlType::Q4_1, n, k));
        let (wf, qf) = (w.dequantize(), q.dequantize());
        for j in 0..n {
            let want = crate::quant::quantize(GgmlType::Q4_1, &wf[j * k..(j + 1) * k]).unwrap();
            let want = crate::quant::dequantize(GgmlType::Q4_1, &want, k).unwrap();
            assert_eq!(&qf[j * k..(j + 1) * k], &want[..], "{ty:?} row {j}");
        }
    }
    let w = random_matrix(GgmlType::Q8_0, 8, 32, &mut rng);
    assert!(matches!(
        w.requantized(GgmlType::Q6_K),
        Err(KernelError::UnsupportedType(_))
    ));
}

#[test]
fn selected_rows_equal_the_full_product_bit_for_bit() {
    let mut rng = Rng(11);
    for (ty, k) in TYPES.into_iter().flat_map(|t| [(t, 512), (t, long_k(t))]) {
        // 5 interleaved groups and 3 GGUF rows after them (where the format interleaves).
        let n = 43;
        let w = random_matrix(ty, n, k, &mut rng);
        let x: Vec<f32> = (0..k).map(|_| rng.unit()).collect();
        let mut full = vec![0.0; n];
        w.matmul(&x, 1, &mut full).unwrap();
        let ids: Vec<u32> = vec![42, 3, 0, 7, 8, 41, 3, 17, 40, 39];
        let mut y = vec![f32::NAN; ids.len()];
        w.matmul_rows(&x, &ids, &mut y).unwrap();
        for (&j, &v) in ids.iter().zip(&y) {
            assert_eq!(
                v.to_bits(),
                full[j as usize].to_bits(),
                "{ty:?} k={k} row {j}"
            );
        }
        assert!(w.matmul_rows(&x, &[43], &mut [0.0]).is_err());
        assert!(w.matmul_rows(&x[1..], &[0], &mut [0.0]).is_err());
        assert!(w.matmul_rows(&x, &[0, 1], &mut [0.0]).is_err());
    }
}

#[test]
fn panels_cover_rows_evenly_within_the_budget() {
    for ty in [
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q8_0,
        GgmlType::Q5_0,
    ] {
        for k in (1..=80).map(|b| b * ty.block_size()) {
            let spans: Vec<(usize, usize)> = super::panels(ty, k).collect();
            let blocks = k / ty.block_size();
            // Consecutive, from the first block to the last.
            assert_eq!(spans.first().map(|s| s.0), Some(0), "{ty:?} k={k}");
            assert_eq!(spans.last().map(|s| s.1), Some(blocks), "{ty:?} k={k}");
            assert!(spans.windows(2).all(|w| w[0].1 == w[1].0), "{ty:?} k={k}");
            let sizes: Vec<usize> = spans.iter().map(|(a, b)| b - a).collect();
            // Within the budget (a block is the least a panel holds), as few as that allows,
            // and as even as the blocks allow.
            let most = (super::PANEL_WEIGHTS / ty.block_size()).max(1);
            assert!(
                sizes.iter().all(|&s| s >= 1 && s <= most),
                "{ty:?} k={k}: {sizes:?}"
            );
            assert_eq!(spans.len(), blocks.div_ceil(most), "{ty:?} k={k}");
            let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(hi - lo <= spans.len(), "{ty:?} k={k}: {sizes:?}");
        }
    }
    // The 1.5B's down projection (k = 8960) in five panels of 7 Q4_K blocks.
    assert_eq!(
        super::panels(GgmlType::Q4_K, 8960).collect::<Vec<_>>(),
        [(0, 7), (7, 14), (14, 21), (21, 28), (28, 35)]
    );
}

#[test]
fn tile_products_equal_the_vnni_kernels_bit_for_bit() {
    on_two_threads(|| {
        if !Isa::Amx.available() {
            eprintln!("AMX-INT8 is not available on this CPU or OS: tile products not run");
            return;
        }
        let mut rng = Rng(11);
        // 59 outputs: pairs of interleaved groups, a group alone at a job's end, and GGUF rows;
        // past 16 rows, several tile passes; rows of one panel of `k` and of two.
        for (ty, k) in [GgmlType::Q4_K, GgmlType::Q6_K]
            .into_iter()
            .flat_map(|t| [(t, 256), (t, 2560)])
        {
            let w = random_matrix(ty, 59, k, &mut rng);
            for m in [2, 3, 7, 8, 9, 15, 16, 17, 31, 33] {
                let x: Vec<f32> = (0..m * k).map(|_| 3.0 * rng.unit()).collect();
                let mut tiles = vec![f32::NAN; m * 59];
                let mut vnni = vec![f32::NAN; m * 59];
                w.matmul_with(Isa::Amx, &x, m, &mut tiles).unwrap();
                w.matmul_with(Isa::Avx512Vnni, &x, m, &mut vnni).unwrap();
                assert_eq!(tiles, vnni, "{ty:?} k={k} m={m}");
            }
        }
    });
}

#[test]
fn measured_choice_gives_the_vnni_bits_and_measures_both_families() {
    let mut rng = Rng(12);
    let (ty, k) = (GgmlType::Q4_K, 512);
    let w = random_matrix(ty, 40, k, &mut rng);
    let x: Vec<f32> = (0..4 * k).map(|_| 3.0 * rng.unit()).collect();
    let mut want = vec![f32::NAN; 4 * 40];
    let reference = if Isa::Avx512Vnni.available() {
        Isa::Avx512Vnni
    } else {
        Isa::best()
    };
    w.matmul_with(reference, &x, 4, &mut want).unwrap();
    // Enough calls for the first two measurements and a retry of the slower family.
    for call in 0..2 * super::choice::RETRY {
        let mut y = vec![f32::NAN; 4 * 40];
        w.matmul(&x, 4, &mut y).unwrap();
        assert_eq!(y, want, "call {call}");
    }
    // Where the tiles run and `ARBOR_KERNELS` does not name a family, both were timed.
    let measuring = Isa::best() == Isa::Amx && !Isa::named();
    assert_eq!(w.measured.compared(4), measuring);
    // A product that names its family is not measured.
    let v = random_matrix(ty, 40, k, &mut rng);
    let mut y = vec![0.0; 4 * 40];
    v.matmul_with(Isa::best(), &x, 4, &mut y).unwrap();
    assert!(!v.measured.compared(4));
}

#[test]
fn both_vendor_tunings_give_the_same_bits() {
    on_two_threads(|| {
        if !Isa::Avx512Vnni.available() {
            eprintln!("AVX-512 VNNI is not available on this CPU: pairs of groups not run");
            return;
        }
        let mut rng = Rng(13);
        // 59 outputs: pairs of interleaved groups, a group alone, and GGUF rows; 4–7 rows (pairs
        // only as Intel), 8 and 12 (8-row passes and a tail), 3 and 1 (never pairs); one panel of
        // `k` and two.
        for ty in [
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::Q8_0,
            GgmlType::Q5_0,
            GgmlType::Q4_1,
        ] {
            for k in [512, long_k(ty)] {
                let w = random_matrix(ty, 59, k, &mut rng);
                for m in [1, 3, 4, 5, 7, 8, 12] {
                    let x: Vec<f32> = (0..m * k).map(|_| 3.0 * rng.unit()).collect();
                    let mut want = vec![f32::NAN; m * 59];
                    w.matmul_with(Isa::Avx2, &x, m, &mut want).unwrap();
                    for (name, y) in vnni_under_both_tunings(&w, &x, m) {
                        assert_eq!(y, want, "{ty:?} k={k} m={m} tuned as {name}");
                    }
                }
            }
        }
    });
}

#[test]
fn extreme_blocks_sum_exactly_at_every_row_count() {
    on_two_threads(|| {
        // Q4_K blocks at the bounds the float scaling of the 16-row kernel relies on (every
        // nibble 15, every 6-bit scale and minimum 63: all bytes 0xFF but the f16 fields),
        // with one 14 per sub-block, or mixed with empty bytes, against activations that
        // quantize to ±127 throughout: the largest integer sums the kernels meet. Every build
        // and row count must give the AVX2 build's bits (integer sums converted once).
        if !Isa::Avx512Vnni.available() {
            eprintln!("AVX-512 VNNI is not available on this CPU: pairs of groups not run");
            return;
        }
        let ty = GgmlType::Q4_K;
        // An odd number of groups: jobs of pairs of groups (jobs hold an even number of whole
        // groups), and one group alone at the end.
        let (n, k) = (8 * 41, 512);
        let mut rng = Rng(17);
        for fill in ["full", "odd", "mixed"] {
            let bytes = ty.bytes_for(n * k).unwrap();
            let mut data: Vec<u8> = (0..bytes)
                .map(|_| match fill {
                    "mixed" => [0x00, 0xFF, 0xF0, 0x0F][(rng.next() % 4) as usize],
                    _ => 0xFF,
                })
                .collect();
            for (i, block) in data.chunks_exact_mut(ty.block_bytes()).enumerate() {
                for at in [0, 2] {
                    block[at..at + 2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
                }
                if fill == "odd" && i % 2 == 0 {
                    // In each row's first block, one weight of 14 per sub-block (the first byte
                    // of each 32-byte chunk of nibbles): every sub-block's sum against ±127 is
                    // odd, so a running float total past 2²⁴ would round — as one sum over the
                    // block's 8 sub-blocks (3.1·10⁷) would. Against a second block of all 15s
                    // with the opposite sign (exact in any order), the two nearly cancel and
                    // leave such a rounding visible.
                    for c in 0..4 {
                        block[16 + 32 * c] = 0xEE;
                    }
                }
            }
            let w = QuantMatrix::new(ty, n, k, data).unwrap();
            for m in [1, 4, 8, 12] {
                // ±1 by 32-weight sub-block in the fourth row.
                let x = extreme_rows(m, k, 32);
                let mut want = vec![f32::NAN; m * n];
                w.matmul_with(Isa::Avx2, &x, m, &mut want).unwrap();
                vnni_and_tiles_agree(&w, &x, m, &want, &format!("{fill} m={m}"));
            }
        }
    });
}

#[test]
fn q6_k_extremes_sum_exactly_at_every_row_count() {
    on_two_threads(|| {
        // Q6_K blocks at the ends of every range — each weight −32 or +31 after the storage
        // offset, each scale −128 or 127 — against activations that quantize to ±127
        // throughout: the largest integer sums the kernels meet (a sub-block's 16 products
        // up to 65 024 in magnitude, scaled 8.3·10⁶, a block's 16 of them 1.3·10⁸ < 2³¹).
        // Every build and row count must give the AVX2 (else portable) build's bits, and
        // those the value in f64.
        let ty = GgmlType::Q6_K;
        let (n, k) = (8 * 41, 512);
        let mut rng = Rng(23);
        for fill in ["low", "high", "mixed"] {
            let bytes = ty.bytes_for(n * k).unwrap();
            let mut data = vec![0u8; bytes];
            for block in data.chunks_exact_mut(ty.block_bytes()) {
                // ql[128], qh[64]: all bits 0 (weight 0 = −32 after the offset) or 1 (63 = +31).
                let (q, scale) = match fill {
                    "low" => (0x00, 0x80),
                    "high" => (0xFF, 0x80),
                    _ => (
                        [0x00, 0xFF][(rng.next() % 2) as usize],
                        [0x80, 0x7F][(rng.next() % 2) as usize],
                    ),
                };
                block[..192].fill(q);
                block[192..208].fill(scale);
                block[208..].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
            }
            let w = QuantMatrix::new(ty, n, k, data).unwrap();
            let deq = w.dequantize();
            for m in [1, 4, 8, 12] {
                // ±1 by run of 8 in the fourth row.
                let x = extreme_rows(m, k, 8);
                let mut want = vec![f32::NAN; m * n];
                let base = if Isa::Avx2.available() {
                    Isa::Avx2
                } else {
                    Isa::Portable
                };
                w.matmul_with(base, &x, m, &mut want).unwrap();
                // And the value itself, against the dequantized weights in f64.
                for (i, &y) in want.iter().enumerate() {
                    let (r, c) = (i / n, i % n);
                    let terms = deq[c * k..(c + 1) * k].iter().zip(&x[r * k..(r + 1) * k]);
                    let (sum, size) = terms.fold((0.0f64, 0.0f64), |(s, a), (&wv, &xv)| {
                        let t = f64::from(wv) * f64::from(xv);
                        (s + t, a + t.abs())
                    });
                    assert!(
                        (f64::from(y) - sum).abs() <= 1e-5 * size,
                        "{fill} m={m} entry {i}"
                    );
                }
                vnni_and_tiles_agree(&w, &x, m, &want, &format!("{fill} m={m}"));
            }
        }
    });
}
