//! The CubeCL kernels against the CPU references, on wgpu (Mesa's lavapipe where no GPU is:
//! Debian's `mesa-vulkan-drivers` and `libvulkan1`, which `.ci/run` installs).

use burn::backend::Flex;
use burn::tensor::{Bool, Tensor, TensorData};
use cubecl::Runtime;
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};

use super::attention::{CubePagedKv, PagedDims};
use super::qmatmul::{AffineGroups, CubeQuantMatrix};
use crate::attention::attention_reference;
use crate::qmatmul::tests::{Rng, TYPES, random_matrix};

fn client() -> cubecl::prelude::ComputeClient<WgpuRuntime> {
    WgpuRuntime::client(&WgpuDevice::default())
}

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
        let gpu = CubeQuantMatrix::<WgpuRuntime>::upload(&client, &w).unwrap();
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
    let gpu = CubeQuantMatrix::<WgpuRuntime>::upload(&client, &w).unwrap();
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
        let parents: Vec<i32> = (0..n_q)
            .map(|i| {
                if i == 0 {
                    -1
                } else {
                    (rng.next() % i as u64) as i32
                }
            })
            .collect();
        let q: Vec<f32> = (0..n_heads * n_q * head_dim).map(|_| rng.unit()).collect();
        let d = PagedDims {
            n_heads,
            n_kv_heads,
            head_dim,
            page_size,
            cached,
            n_q,
        };
        let kv = CubePagedKv::<WgpuRuntime>::upload(&client, &k, &v, &table, d).unwrap();
        let got = kv.attention(&q, &parents).unwrap();
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
        let dev = Default::default();
        let t =
            |x: Vec<f32>, s: [usize; 4]| Tensor::<Flex, 4>::from_data(TensorData::new(x, s), &dev);
        let want = attention_reference(
            t(q.clone(), [1, n_heads, n_q, head_dim]),
            t(gather(&k), [1, n_kv_heads, n_kv, head_dim]),
            t(gather(&v), [1, n_kv_heads, n_kv, head_dim]),
            Tensor::<Flex, 3, Bool>::from_data(TensorData::new(mask, [1, n_q, n_kv]), &dev),
        )
        .into_data()
        .to_vec::<f32>()
        .unwrap();
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
    let up = |table: &[u32], d| CubePagedKv::<WgpuRuntime>::upload(&client, &k, &v, table, d);
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
