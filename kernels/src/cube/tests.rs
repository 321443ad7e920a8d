//! The CubeCL kernels against the CPU references, on each runtime the build has (`super::R`):
//! wgpu always (Mesa's lavapipe where no GPU is: Debian's `mesa-vulkan-drivers` and
//! `libvulkan1`, which `.ci/run` installs), CUDA with the `cuda` feature.

use burn::backend::Flex;
use burn::tensor::{Bool, Tensor, TensorData};

use super::{R, client};
use crate::attention::attention_reference;
use crate::cube::attention::{CubePagedKv, KeyCodes, PackedPages, PageRef, PagedDims};
use crate::cube::qmatmul::{AffineGroups, CubeQuantMatrix};
use crate::kvquant::{ChannelQuantizer, RowQuantizer, StepFormat};
use crate::qmatmul::tests::{Rng, TYPES, random_matrix};

/// Every block format, 1 to 9 rows: the GPU product equals `x · Wᵀ` over the reference
/// dequantization (f64 sums), and the affine repacking reproduces the weights.
#[test]
fn gpu_qmatmul_agrees_with_the_reference_for_every_format() {
    let client = client();
    let mut rng = Rng(0x5eed);
    for ty in TYPES {
        let (n, k) = (7, 512);
        let w = random_matrix(ty, n, k, &mut rng);
        let want_w = w.dequantize();
        let affine = AffineGroups::from_blocks(&w).unwrap();
        for (a, b) in affine.dequantize().iter().zip(&want_w) {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "{ty:?}: {a} vs {b}"
            );
        }
        let gpu = CubeQuantMatrix::<R>::upload(&client, &w).unwrap();
        for m in [1, 2, 9] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.unit()).collect();
            let y = gpu.matmul_host(&x, m).unwrap();
            for r in 0..m {
                for j in 0..n {
                    let (xr, wj) = (&x[r * k..(r + 1) * k], &want_w[j * k..(j + 1) * k]);
                    let exact: f64 = xr.iter().zip(wj).map(|(a, b)| f64::from(a * b)).sum();
                    let mag: f64 = xr
                        .iter()
                        .zip(wj)
                        .map(|(a, b)| f64::from((a * b).abs()))
                        .sum();
                    let got = f64::from(y[r * n + j]);
                    assert!(
                        (got - exact).abs() <= 1e-5 * (1.0 + mag),
                        "{ty:?} m={m} ({r}, {j}): {got} vs {exact}"
                    );
                }
            }
        }
    }
}

#[test]
fn gpu_qmatmul_refuses_bad_shapes() {
    let client = client();
    let mut rng = Rng(3);
    let w = random_matrix(crate::quant::GgmlType::Q8_0, 2, 64, &mut rng);
    let gpu = CubeQuantMatrix::<R>::upload(&client, &w).unwrap();
    assert!(gpu.matmul_host(&[0.0; 63], 1).is_err());
    assert!(gpu.matmul_host(&[], 0).is_err());
}

/// Tree attention over shuffled pages equals the tensor-op reference with the mask the
/// parent pointers describe: GQA, ragged page fill, decode (one row) and trees.
#[test]
fn gpu_paged_tree_attention_agrees_with_the_reference() {
    let client = client();
    let mut rng = Rng(0xa77e);
    let cases: [(usize, usize, usize, usize, usize, usize); 4] = [
        (4, 2, 16, 4, 9, 1),
        (6, 2, 32, 8, 37, 7),
        (2, 2, 8, 16, 0, 5),
        (14, 2, 64, 16, 150, 13),
    ];
    for (case, &(n_heads, n_kv_heads, head_dim, page_size, cached, n_q)) in cases.iter().enumerate()
    {
        let n_kv = cached + n_q;
        let pages = n_kv.div_ceil(page_size) + 2;
        let row = n_kv_heads * head_dim;
        let k: Vec<f32> = (0..pages * page_size * row).map(|_| rng.unit()).collect();
        let v: Vec<f32> = (0..k.len()).map(|_| rng.unit()).collect();
        // Logical page p lives at stored page table[p] (reversed, skipping page 0).
        let table: Vec<u32> = (0..n_kv.div_ceil(page_size))
            .map(|p| (pages - 1 - p) as u32)
            .collect();
        let parents = random_parents(n_q, &mut rng);
        let q: Vec<f32> = (0..n_heads * n_q * head_dim).map(|_| rng.unit()).collect();
        let d = PagedDims {
            n_heads,
            n_kv_heads,
            head_dim,
            page_size,
            cached,
            n_q,
        };
        let kv = CubePagedKv::<R>::upload(&client, &k, &v, &table, d).unwrap();
        let got = kv.attention(&q, &parents).unwrap();
        // The keys split into parts (flash-decoding) give the same rows.
        for splits in [2, 3, 7] {
            let kv = CubePagedKv::<R>::upload(&client, &k, &v, &table, d)
                .unwrap()
                .with_key_splits(splits);
            let split = kv.attention(&q, &parents).unwrap();
            for (i, (a, b)) in split.iter().zip(&got).enumerate() {
                assert!(
                    (a - b).abs() < 1e-5,
                    "case {case}, {splits} splits, entry {i}: {a} vs {b}"
                );
            }
        }
        // Reference: contiguous [kv_head][token][channel] and the mask from the parents.
        let gather = |src: &[f32]| -> Vec<f32> {
            let mut out = Vec::with_capacity(n_kv * row);
            for g in 0..n_kv_heads {
                for j in 0..n_kv {
                    let at = ((table[j / page_size] as usize * page_size + j % page_size)
                        * n_kv_heads
                        + g)
                        * head_dim;
                    out.extend_from_slice(&src[at..at + head_dim]);
                }
            }
            out
        };
        let mut mask = vec![false; n_q * n_kv];
        for i in 0..n_q {
            mask[i * n_kv..i * n_kv + cached].fill(true);
            let mut node = i as i32;
            while node >= 0 {
                mask[i * n_kv + cached + node as usize] = true;
                node = parents[node as usize];
            }
        }
        let heads = (n_heads, n_kv_heads, head_dim);
        let want = reference(&q, &gather(&k), &gather(&v), &mask, heads);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-5, "case {case} entry {i}: {a} vs {b}");
        }
    }
}

#[test]
fn gpu_paged_attention_refuses_bad_operands() {
    let client = client();
    let d = PagedDims {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        page_size: 2,
        cached: 3,
        n_q: 1,
    };
    let (k, v) = (vec![0.0; 16], vec![0.0; 16]);
    let up = |table: &[u32], d| CubePagedKv::<R>::upload(&client, &k, &v, table, d);
    assert!(up(&[0], d).is_err(), "table too short");
    assert!(up(&[0, 9], d).is_err(), "table past the pages");
    assert!(up(&[0, 1], PagedDims { n_kv_heads: 3, ..d }).is_err());
    let kv = up(&[1, 0], d).unwrap();
    assert!(
        kv.attention(&[0.0; 8], &[0]).is_err(),
        "a row cannot be its own parent"
    );
    assert!(kv.attention(&[0.0; 7], &[-1]).is_err());
    assert_eq!(kv.attention(&[0.0; 8], &[-1]).unwrap().len(), 8);
}

/// `attention_reference` for rows `q` (`[n_heads][n_q][head_dim]`) over contiguous keys and
/// values (`[kv_head][token][channel]`) under `mask` (`[n_q][n_kv]`).
pub(super) fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[bool],
    (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
) -> Vec<f32> {
    let n_q = q.len() / (n_heads * head_dim);
    let n_kv = mask.len() / n_q;
    let dev = Default::default();
    let t = |x: &[f32], s: [usize; 4]| {
        Tensor::<Flex, 4>::from_data(TensorData::new(x.to_vec(), s), &dev)
    };
    attention_reference(
        t(q, [1, n_heads, n_q, head_dim]),
        t(k, [1, n_kv_heads, n_kv, head_dim]),
        t(v, [1, n_kv_heads, n_kv, head_dim]),
        Tensor::<Flex, 3, Bool>::from_data(TensorData::new(mask.to_vec(), [1, n_q, n_kv]), &dev),
    )
    .into_data()
    .to_vec::<f32>()
    .unwrap()
}

/// Parents of a random tree of `n` rows (row 0 at the root).
pub(super) fn random_parents(n: usize, rng: &mut Rng) -> Vec<i32> {
    (0..n)
        .map(|i| {
            if i == 0 {
                -1
            } else {
                (rng.next() % i as u64) as i32
            }
        })
        .collect()
}

/// Tree attention over a mix of full-precision and packed pages (2, 4 and 8 bits; keys per
/// channel and per token; values permuted and clipped) equals, row by row, the reference over
/// the keys and values that row reads by the CPU cache's rule: codes (dequantized by
/// `kvquant` on the CPU) for packed pages whose last token is older than the window — also
/// where a full-precision copy is still held — and full precision otherwise. Sink pages and
/// the pages of recent and tree tokens are full precision only; some old pages keep both.
#[test]
fn gpu_tree_attention_reads_packed_pages_as_the_cpu_cache_does() {
    let client = client();
    let mut rng = Rng(0x9a11);
    // (dims: n_heads, n_kv_heads, head_dim, page_size, cached, n_q), window, group
    type Case = ((usize, usize, usize, usize, usize, usize), usize, usize);
    let cases: [Case; 3] = [
        ((4, 2, 32, 4, 37, 5), 8, 16),
        ((14, 2, 64, 16, 150, 9), 32, 32),
        ((2, 1, 16, 8, 40, 1), 8, 16),
    ];
    let mut differed = false;
    for (case, &((n_heads, n_kv_heads, hd, ps, cached, n_q), window, group)) in
        cases.iter().enumerate()
    {
        for bits in [2u32, 4, 8] {
            for per_channel in [true, false] {
                let what = format!("case {case}, {bits} bits, per channel {per_channel}");
                let n_kv = cached + n_q;
                let row = n_kv_heads * hd;
                let n_pages = n_kv.div_ceil(ps);
                // Keys with a few wide, offset channels (like Qwen2's key bias).
                let keys: Vec<f32> = (0..n_pages * ps * row)
                    .map(|i| rng.unit() + if i % hd % 7 == 0 { 20.0 } else { 0.0 })
                    .collect();
                let values: Vec<f32> = (0..keys.len()).map(|_| rng.unit()).collect();
                let shuffled = |n: usize, rng: &mut Rng| {
                    let mut p: Vec<usize> = (0..n).collect();
                    for i in (1..n).rev() {
                        p.swap(i, (rng.next() % (i as u64 + 1)) as usize);
                    }
                    p
                };
                let vq = RowQuantizer::new(
                    bits,
                    group,
                    hd,
                    Some(shuffled(hd, &mut rng)),
                    Some((0..hd / group).map(|g| 1.0 - 0.05 * g as f32).collect()),
                )
                .unwrap();
                // 2-bit keys store their steps in one byte (codes() widens them).
                let steps = if bits == 2 {
                    StepFormat::F8
                } else {
                    StepFormat::F16
                };
                let kq_channel = ChannelQuantizer::new(bits, ps, row)
                    .unwrap()
                    .with_steps(steps);
                let kq_token =
                    RowQuantizer::new(bits, group, hd, Some(shuffled(hd, &mut rng)), None).unwrap();
                // Pages past the first (the sinks), complete and wholly cached, are packed;
                // those still within reach of the window for some row keep their full copy,
                // and every third older one too.
                let packs = |p: usize| p >= 1 && (p + 1) * ps <= cached;
                let keeps_full = |p: usize| {
                    !packs(p) || (p + 1) * ps - 1 + window >= cached || p.is_multiple_of(3)
                };
                let page_of = |x: &[f32], p: usize| x[p * ps * row..(p + 1) * ps * row].to_vec();
                let mut packed_bytes: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
                let (mut full_k, mut full_v) = (Vec::new(), Vec::new());
                let mut table = vec![PageRef::default(); n_pages];
                // Stored in reverse order, so logical and stored indices differ.
                for p in (0..n_pages).rev() {
                    if keeps_full(p) {
                        table[p].full = Some((full_k.len() / (ps * row)) as u32);
                        full_k.extend(page_of(&keys, p));
                        full_v.extend(page_of(&values, p));
                    }
                    if packs(p) {
                        table[p].packed = Some(packed_bytes.len() as u32);
                        let (kp, vp) = (page_of(&keys, p), page_of(&values, p));
                        let kb = if per_channel {
                            let mut b = vec![0u8; kq_channel.packed_bytes()];
                            kq_channel.quantize(&kp, &mut b);
                            b
                        } else {
                            pack_rows(&kq_token, &kp)
                        };
                        packed_bytes.push((kb, pack_rows(&vq, &vp)));
                    }
                }
                let packed = PackedPages {
                    keys: if per_channel {
                        KeyCodes::Channel(&kq_channel)
                    } else {
                        KeyCodes::Token(&kq_token)
                    },
                    values: &vq,
                    window,
                    pages: packed_bytes
                        .iter()
                        .map(|(k, v)| (k.as_slice(), v.as_slice()))
                        .collect(),
                };
                let d = PagedDims {
                    n_heads,
                    n_kv_heads,
                    head_dim: hd,
                    page_size: ps,
                    cached,
                    n_q,
                };
                let kv =
                    CubePagedKv::<R>::upload_packed(&client, &full_k, &full_v, &table, &packed, d)
                        .unwrap();
                let parents = random_parents(n_q, &mut rng);
                let q: Vec<f32> = (0..n_heads * n_q * hd).map(|_| rng.unit()).collect();
                let got = kv.attention(&q, &parents).unwrap();

                // Row by row: what the CPU cache would have it read.
                let mut depth = vec![0usize; n_q];
                for i in 0..n_q {
                    if parents[i] >= 0 {
                        depth[i] = depth[parents[i] as usize] + 1;
                    }
                }
                for i in 0..n_q {
                    let pos = cached + depth[i];
                    let mut mask = vec![false; n_kv];
                    mask[..cached].fill(true);
                    let mut node = i as i32;
                    while node >= 0 {
                        mask[cached + node as usize] = true;
                        node = parents[node as usize];
                    }
                    let (mut k, mut v) = (Vec::new(), Vec::new());
                    let mut buf = vec![0.0f32; hd];
                    for g in 0..n_kv_heads {
                        for j in 0..n_kv {
                            let (p, slot) = (j / ps, j % ps);
                            let at = (j * n_kv_heads + g) * hd;
                            let r = table[p];
                            let codes = r.packed.is_some()
                                && (r.full.is_none() || (p + 1) * ps - 1 + window < pos);
                            if !codes {
                                k.extend_from_slice(&keys[at..at + hd]);
                                v.extend_from_slice(&values[at..at + hd]);
                                continue;
                            }
                            let (kb, vb) = &packed_bytes[r.packed.unwrap() as usize];
                            let rb = |q: &RowQuantizer, b: &[u8]| {
                                let n = q.packed_bytes();
                                b[(slot * n_kv_heads + g) * n..][..n].to_vec()
                            };
                            if per_channel {
                                kq_channel.dequantize(kb, slot, g * hd, &mut buf);
                            } else {
                                kq_token.dequantize(&rb(&kq_token, kb), &mut buf);
                            }
                            k.extend_from_slice(&buf);
                            vq.dequantize(&rb(&vq, vb), &mut buf);
                            v.extend_from_slice(&buf);
                        }
                    }
                    let qi: Vec<f32> = (0..n_heads)
                        .flat_map(|h| q[(h * n_q + i) * hd..][..hd].to_vec())
                        .collect();
                    let want = reference(&qi, &k, &v, &mask, (n_heads, n_kv_heads, hd));
                    let contiguous = |x: &[f32]| -> Vec<f32> {
                        (0..n_kv_heads)
                            .flat_map(|g| {
                                (0..n_kv).flat_map(move |j| {
                                    let at = (j * n_kv_heads + g) * hd;
                                    x[at..at + hd].to_vec()
                                })
                            })
                            .collect()
                    };
                    let exact = reference(
                        &qi,
                        &contiguous(&keys),
                        &contiguous(&values),
                        &mask,
                        (n_heads, n_kv_heads, hd),
                    );
                    for h in 0..n_heads {
                        for c in 0..hd {
                            let (a, b) = (got[(h * n_q + i) * hd + c], want[h * hd + c]);
                            assert!(
                                (a - b).abs() < 2e-4 * (1.0 + b.abs()),
                                "{what}, row {i}, head {h}, channel {c}: {a} vs {b}"
                            );
                            differed |= (a - exact[h * hd + c]).abs() > 1e-3;
                        }
                    }
                }
            }
        }
    }
    assert!(differed, "no row read codes that changed its result");
}

/// Rows `[slot][kv_head]` of a page packed one by one (the CPU cache's `pack_rows`).
fn pack_rows(q: &RowQuantizer, page: &[f32]) -> Vec<u8> {
    let n = q.packed_bytes();
    let mut out = vec![0u8; page.len() / q.channels() * n];
    for (r, dst) in page.chunks_exact(q.channels()).zip(out.chunks_exact_mut(n)) {
        q.quantize(r, dst);
    }
    out
}

#[test]
fn gpu_packed_pages_refuse_bad_operands() {
    let client = client();
    let d = PagedDims {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 16,
        page_size: 2,
        cached: 3,
        n_q: 1,
    };
    let (k, v) = (vec![0.0; 32], vec![0.0; 32]);
    let vq = RowQuantizer::new(4, 16, 16, None, None).unwrap();
    let kq = ChannelQuantizer::new(4, 2, 16).unwrap();
    let (kb, vb) = (
        vec![0u8; kq.packed_bytes()],
        vec![0u8; 2 * vq.packed_bytes()],
    );
    let packed = |keys| PackedPages {
        keys,
        values: &vq,
        window: 1,
        pages: vec![(kb.as_slice(), vb.as_slice())],
    };
    let both = PageRef {
        full: Some(0),
        packed: Some(0),
    };
    let up = |table: &[PageRef], p: &PackedPages<'_>| {
        CubePagedKv::<R>::upload_packed(&client, &k, &v, table, p, d)
    };
    let good = packed(KeyCodes::Channel(&kq));
    assert!(
        up(&[both, PageRef::default()], &good).is_err(),
        "a page with no copy"
    );
    let past = PageRef {
        full: None,
        packed: Some(1),
    };
    assert!(up(&[both, past], &good).is_err(), "past the packed pages");
    let wide = ChannelQuantizer::new(4, 4, 16).unwrap();
    assert!(
        up(&[both, both], &packed(KeyCodes::Channel(&wide))).is_err(),
        "block of 4 tokens"
    );
    let k2 = RowQuantizer::new(2, 16, 16, None, None).unwrap();
    assert!(
        up(&[both, both], &packed(KeyCodes::Token(&k2))).is_err(),
        "2-bit keys, 4-bit values"
    );
    let short = PackedPages {
        pages: vec![(&kb[1..], vb.as_slice())],
        ..good.clone()
    };
    assert!(up(&[both, both], &short).is_err(), "short key bytes");
    let kv = up(&[both, both], &good).unwrap();
    assert_eq!(kv.attention(&[0.0; 32], &[-1]).unwrap().len(), 32);
}

/// `values` in a new device buffer.
fn upload(client: &cubecl::prelude::ComputeClient<R>, values: &[f32]) -> cubecl::server::Handle {
    use cubecl::CubeElement;
    client.create_from_slice(f32::as_bytes(values))
}

/// The f32 values of a device buffer.
fn download(client: &cubecl::prelude::ComputeClient<R>, h: cubecl::server::Handle) -> Vec<f32> {
    use cubecl::CubeElement;
    f32::from_bytes(&client.read_one(h).unwrap()).to_vec()
}
/// RoPE in one launch against the rotation written out in f64 over the same f32 angles:
/// ragged shapes, batches of one and two, heads of 2 to 512 channels, angles anywhere (tree
/// nodes share positions; none are assumed contiguous). The input is left as it was.
#[test]
fn gpu_rope_rotates_every_pair_as_the_reference() {
    use crate::cube::rope::rope;
    let client = client();
    let mut rng = Rng(0x40fe);
    for [batch, heads, n, d] in [
        [1, 1, 1, 2],
        [1, 3, 5, 8],
        [2, 2, 7, 64],
        [1, 12, 3, 128],
        [2, 1, 2, 512],
    ] {
        let half = d / 2;
        let x: Vec<f32> = (0..batch * heads * n * d)
            .map(|_| rng.unit() * 4.0)
            .collect();
        let angles: Vec<f64> = (0..batch * n * half)
            .map(|_| f64::from(rng.unit()) * 300.0)
            .collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos() as f32).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin() as f32).collect();
        let [hx, hc, hs] = [&x, &cos, &sin].map(|v| upload(&client, v));
        let y = rope(&client, &hx, (&hc, &hs), [batch, heads, n, d]).unwrap();
        let y = download(&client, y);
        let x_after = download(&client, hx);
        assert_eq!(x_after, x, "the input is not written");
        for b in 0..batch {
            for h in 0..heads {
                for t in 0..n {
                    let row = ((b * heads + h) * n + t) * d;
                    for i in 0..half {
                        let at = (b * n + t) * half + i;
                        let (c, s) = (f64::from(cos[at]), f64::from(sin[at]));
                        let (x1, x2) = (f64::from(x[row + i]), f64::from(x[row + half + i]));
                        let tol = 4e-7 * (x1.abs() + x2.abs());
                        for (got, want) in [
                            (y[row + i], x1 * c - x2 * s),
                            (y[row + half + i], x2 * c + x1 * s),
                        ] {
                            assert!(
                                (f64::from(got) - want).abs() <= tol,
                                "[{batch}, {heads}, {n}, {d}] at ({b}, {h}, {t}, {i}): \
                                 {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn gpu_rope_refuses_bad_operands() {
    use crate::cube::rope::rope;
    let client = client();
    let buf = |floats: usize| upload(&client, &vec![0.5; floats]);
    let (x, c, s) = (buf(2 * 3 * 8), buf(3 * 4), buf(3 * 4));
    assert!(rope(&client, &x, (&c, &s), [1, 2, 3, 8]).is_ok());
    for (shape, what) in [
        ([1, 2, 3, 7], "odd head_dim"),
        ([1, 2, 3, 0], "no channels"),
        ([1, 2, 0, 8], "no tokens"),
        ([0, 2, 3, 8], "no batch"),
        ([1, 3, 3, 8], "x too small"),
        ([1, 1, 6, 8], "angles too small"),
        ([1, 1, 1, 1024], "head too wide"),
    ] {
        assert!(rope(&client, &x, (&c, &s), shape).is_err(), "{what}");
    }
    // (Sizes are checked as allocated, rounded up to the allocator's alignment.)
    let short = buf(4);
    assert!(
        rope(&client, &x, (&c, &short), [1, 2, 3, 8]).is_err(),
        "sin too small"
    );
}

/// RMSNorm in one launch against the norm written out in f64: rows of 1 to 3 000 values (one
/// unit's stride, several strides, a ragged tail), a row of zeros (the result is then 0, not
/// NaN, for ε > 0), values far from 1.
#[test]
fn gpu_rms_norm_equals_the_reference() {
    use crate::cube::norm::rms_norm;
    let client = client();
    let mut rng = Rng(0x4d5);
    for (rows, dim, eps, scale) in [
        (1, 1, 1e-6, 1.0),
        (3, 7, 1e-5, 30.0),
        (2, 256, 1e-6, 1.0),
        (5, 1536, 1e-6, 0.01),
        (2, 3000, 0.0, 4.0),
    ] {
        let mut x: Vec<f32> = (0..rows * dim).map(|_| rng.unit() * scale).collect();
        if eps > 0.0 && rows > 1 {
            x[dim..2 * dim].fill(0.0);
        }
        let gamma: Vec<f32> = (0..dim).map(|_| rng.unit() + 1.5).collect();
        let [hx, hg] = [&x, &gamma].map(|v| upload(&client, v));
        let y = rms_norm(&client, &hx, &hg, rows, dim, eps).unwrap();
        let y = download(&client, y);
        for r in 0..rows {
            let row = &x[r * dim..(r + 1) * dim];
            let ms = row
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                / dim as f64;
            let rms = (ms + f64::from(eps)).sqrt();
            for (i, (&v, &g)) in row.iter().zip(&gamma).enumerate() {
                let want = f64::from(v) / rms * f64::from(g);
                let got = f64::from(y[r * dim + i]);
                assert!(
                    (got - want).abs() <= 2e-6 * (1.0 + want.abs()),
                    "{rows} × {dim} at ({r}, {i}): {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn gpu_rms_norm_refuses_bad_operands() {
    use crate::cube::norm::rms_norm;
    let client = client();
    let buf = |floats: usize| upload(&client, &vec![0.5; floats]);
    let (x, g) = (buf(4 * 64), buf(64));
    assert!(rms_norm(&client, &x, &g, 4, 64, 1e-6).is_ok());
    for (rows, dim, eps, what) in [
        (0, 64, 1e-6, "no rows"),
        (4, 0, 1e-6, "no values"),
        (4, 64, -1.0, "negative eps"),
        (4, 64, f32::NAN, "NaN eps"),
        (8, 64, 1e-6, "x too small"),
        (1, 128, 1e-6, "gamma too small"),
    ] {
        assert!(rms_norm(&client, &x, &g, rows, dim, eps).is_err(), "{what}");
    }
}

/// `silu(g) · u` in one launch against the f64 formula: lengths around the cube size, values
/// far into both tails (e^(−g) overflows to infinity for g < −88: the result is −0, not NaN).
#[test]
fn gpu_silu_mul_equals_the_reference() {
    use crate::cube::act::silu_mul;
    let client = client();
    let mut rng = Rng(0x5170);
    for len in [1, 255, 256, 257, 8960 * 3] {
        let mut g: Vec<f32> = (0..len).map(|_| rng.unit() * 12.0).collect();
        let u: Vec<f32> = (0..len).map(|_| rng.unit() * 3.0).collect();
        if len > 2 {
            (g[0], g[1]) = (-100.0, 100.0);
        }
        let [hg, hu] = [&g, &u].map(|v| upload(&client, v));
        let y = silu_mul(&client, &hg, &hu, len).unwrap();
        let y = download(&client, y);
        for (i, ((&a, &b), &got)) in g.iter().zip(&u).zip(&y).enumerate() {
            let (a, b) = (f64::from(a), f64::from(b));
            let want = a / (1.0 + (-a).exp()) * b;
            assert!(
                (f64::from(got) - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{len} values at {i}: silu({a}) · {b} = {got}, not {want}"
            );
        }
    }
}

#[test]
fn gpu_silu_mul_refuses_bad_operands() {
    use crate::cube::act::silu_mul;
    let client = client();
    let buf = |floats: usize| upload(&client, &vec![0.5; floats]);
    let (g, u) = (buf(64), buf(64));
    assert!(silu_mul(&client, &g, &u, 64).is_ok());
    assert!(silu_mul(&client, &g, &u, 0).is_err(), "no values");
    assert!(silu_mul(&client, &g, &u, 128).is_err(), "buffers too small");
    assert!(silu_mul(&client, &g, &buf(16), 64).is_err(), "u too small");
}
