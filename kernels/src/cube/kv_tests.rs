//! The device-resident KV cache against a host mirror: a speculative session (prefill in
//! chunks, trees appended, attention, commits of random paths, rollbacks) with every layer's
//! contents and every attention output checked, storage growth and page reuse included.

use cubecl::prelude::ComputeClient;
use cubecl::prelude::CubeElement;
use cubecl::server::Handle;
use cubecl::wgpu::WgpuRuntime;

use super::kv::{DeviceKvDims, DevicePagedKv};
use super::tests::{client, random_parents, reference};
use crate::qmatmul::tests::Rng;

type Kv = DevicePagedKv<WgpuRuntime>;

/// Per layer, keys and values `[kv_head][token][head_dim]` as the cache should hold them.
struct Mirror {
    dims: DeviceKvDims,
    layers: Vec<[Vec<Vec<f32>>; 2]>,
}

impl Mirror {
    fn new(dims: DeviceKvDims) -> Self {
        Self {
            dims,
            layers: (0..dims.n_layers)
                .map(|_| [vec![], vec![]].map(|v: Vec<Vec<f32>>| v))
                .collect(),
        }
    }

    /// Tokens as rows `[token][kv_head · head_dim]`, per layer `k` then `v`.
    fn push(&mut self, layer: usize, k: &[Vec<f32>], v: &[Vec<f32>]) {
        self.layers[layer][0].extend(k.iter().cloned());
        self.layers[layer][1].extend(v.iter().cloned());
    }

    fn retain(&mut self, prefix: usize, rows: &[usize]) {
        for kv in &mut self.layers {
            for x in kv.iter_mut() {
                let kept: Vec<Vec<f32>> = rows.iter().map(|&r| x[r].clone()).collect();
                x.truncate(prefix);
                x.extend(kept);
            }
        }
    }

    fn truncate(&mut self, len: usize) {
        for kv in &mut self.layers {
            kv.iter_mut().for_each(|x| x.truncate(len));
        }
    }

    /// `[kv_head][token][head_dim]` of one layer's keys (0) or values (1).
    fn head_major(&self, layer: usize, which: usize) -> Vec<f32> {
        let (g, hd) = (self.dims.n_kv_heads, self.dims.head_dim);
        let rows = &self.layers[layer][which];
        (0..g)
            .flat_map(|h| {
                rows.iter()
                    .flat_map(move |r| r[h * hd..(h + 1) * hd].to_vec())
            })
            .collect()
    }
}

fn rows(n: usize, width: usize, rng: &mut Rng) -> Vec<Vec<f32>> {
    (0..n)
        .map(|_| (0..width).map(|_| rng.unit()).collect())
        .collect()
}

/// Rows `[token][kv_head · head_dim]` as the model hands them over: `[kv_head][n][head_dim]`
/// on the device.
fn upload(client: &ComputeClient<WgpuRuntime>, x: &[Vec<f32>], dims: DeviceKvDims) -> Handle {
    let hd = dims.head_dim;
    let flat: Vec<f32> = (0..dims.n_kv_heads)
        .flat_map(|g| x.iter().flat_map(move |r| r[g * hd..(g + 1) * hd].to_vec()))
        .collect();
    client.create_from_slice(f32::as_bytes(&flat))
}

/// Appends `n` random tokens to every layer of both; checks attention of those tokens as a
/// tree (`parents`) in every layer against the reference over the mirror.
fn step(
    kv: &mut Kv,
    mirror: &mut Mirror,
    parents: &[i32],
    n_heads: usize,
    rng: &mut Rng,
    what: &str,
) {
    let client = client();
    let d = kv.dims();
    let width = d.n_kv_heads * d.head_dim;
    let n = parents.len();
    let cached = kv.len();
    let mut positions: Vec<u32> = Vec::new();
    for &p in parents {
        positions.push(if p < 0 {
            cached as u32
        } else {
            positions[p as usize] + 1
        });
    }
    let n_kv = cached + n;
    let mut mask = vec![false; n * n_kv];
    for i in 0..n {
        mask[i * n_kv..i * n_kv + cached].fill(true);
        let mut node = i as i32;
        while node >= 0 {
            mask[i * n_kv + cached + node as usize] = true;
            node = parents[node as usize];
        }
    }
    for layer in 0..d.n_layers {
        let (k, v) = (rows(n, width, rng), rows(n, width, rng));
        kv.append(layer, &upload(&client, &k, d), &upload(&client, &v, d), n)
            .unwrap();
        mirror.push(layer, &k, &v);
        let q: Vec<f32> = (0..n_heads * n * d.head_dim).map(|_| rng.unit()).collect();
        let out = kv
            .attention(
                layer,
                client.create_from_slice(f32::as_bytes(&q)),
                n_heads,
                parents,
                &positions,
            )
            .unwrap();
        let got = f32::from_bytes(&client.read_one_unchecked(out)).to_vec();
        let heads = (n_heads, d.n_kv_heads, d.head_dim);
        let want = reference(
            &q,
            &mirror.head_major(layer, 0),
            &mirror.head_major(layer, 1),
            &mask,
            heads,
        );
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() < 1e-5,
                "{what} layer {layer} entry {i}: {a} vs {b}"
            );
        }
    }
}

fn check_contents(kv: &Kv, mirror: &Mirror, what: &str) {
    for layer in 0..kv.dims().n_layers {
        let (k, v) = kv.read_layer(layer);
        assert!(
            k == mirror.head_major(layer, 0),
            "{what}: keys of layer {layer}"
        );
        assert!(
            v == mirror.head_major(layer, 1),
            "{what}: values of layer {layer}"
        );
    }
}

/// A root-to-node path of the tree: the rows a commit keeps (increasing).
fn random_path(parents: &[i32], rng: &mut Rng) -> Vec<usize> {
    let mut node = (rng.next() % parents.len() as u64) as i32;
    let mut path = Vec::new();
    while node >= 0 {
        path.push(node as usize);
        node = parents[node as usize];
    }
    path.reverse();
    path
}

#[test]
fn device_kv_cache_follows_a_speculative_session() {
    let cases = [
        (4, 2, 16, 4),  // GQA 2, small pages: many pages, several doublings
        (6, 3, 32, 16), // GQA 2, the default page size
        (2, 2, 8, 5),   // no GQA, a page size that is no power of two
    ];
    let mut rng = Rng(0xd1ce);
    for (case, &(n_heads, n_kv_heads, head_dim, page_size)) in cases.iter().enumerate() {
        let dims = DeviceKvDims {
            n_layers: 2,
            n_kv_heads,
            head_dim,
            page_size,
        };
        let mut kv = Kv::new(&client(), dims).unwrap();
        let mut mirror = Mirror::new(dims);
        // Prefill in two causal chunks.
        for (c, n) in [9i32, 14].into_iter().enumerate() {
            let chain: Vec<i32> = (0..n).map(|i| i - 1).collect();
            step(
                &mut kv,
                &mut mirror,
                &chain,
                n_heads,
                &mut rng,
                &format!("case {case} prefill {c}"),
            );
        }
        check_contents(&kv, &mirror, "prefill");
        for round in 0..12 {
            let what = format!("case {case} round {round}");
            let n = 1 + (rng.next() % 9) as usize;
            let parents = random_parents(n, &mut rng);
            let prefix = kv.len();
            let before = kv.read_pages();
            let pages = kv.pages_in_use();
            step(&mut kv, &mut mirror, &parents, n_heads, &mut rng, &what);
            if round % 4 == 3 {
                // Rejected tree: rollback restores the bytes and returns the pages.
                kv.truncate(prefix);
                mirror.truncate(prefix);
                assert_eq!(kv.pages_in_use(), pages, "{what}");
                assert!(
                    kv.read_pages() == before,
                    "{what}: rollback is not byte-identical"
                );
            } else {
                let path: Vec<usize> = random_path(&parents, &mut rng)
                    .into_iter()
                    .map(|r| prefix + r)
                    .collect();
                kv.retain(prefix, &path);
                mirror.retain(prefix, &path);
            }
            assert_eq!(kv.len(), prefix + mirror.layers[0][0].len() - prefix);
            check_contents(&kv, &mirror, &what);
            assert_eq!(kv.pages_in_use(), kv.len().div_ceil(page_size), "{what}");
            let page_bytes = 2 * 2 * page_size * n_kv_heads * head_dim * 4;
            assert_eq!(kv.bytes(), kv.pages_in_use() * page_bytes, "{what}");
            assert!(kv.reserved_bytes() >= kv.bytes());
        }
        // A copy is independent of the original.
        let copy = kv.duplicate();
        let len = kv.len();
        kv.clear();
        assert_eq!((kv.len(), kv.pages_in_use(), kv.bytes()), (0, 0, 0));
        assert_eq!(copy.len(), len);
        check_contents(&copy, &mirror, "copy after the original was cleared");
    }
}

#[test]
fn device_kv_cache_reuses_freed_pages() {
    let dims = DeviceKvDims {
        n_layers: 1,
        n_kv_heads: 1,
        head_dim: 4,
        page_size: 2,
    };
    let client = client();
    let mut kv = Kv::new(&client, dims).unwrap();
    let rows = client.create_from_slice(f32::as_bytes(&[1.0f32; 40]));
    kv.append(0, &rows, &rows, 10).unwrap();
    let reserved = kv.reserved_bytes();
    for _ in 0..5 {
        kv.truncate(3);
        kv.append(0, &rows, &rows, 7).unwrap();
    }
    assert_eq!(
        kv.reserved_bytes(),
        reserved,
        "rollbacks and appends reuse the pool"
    );
    kv.clear();
    kv.append(0, &rows, &rows, 10).unwrap();
    assert_eq!(kv.reserved_bytes(), reserved);
}

#[test]
fn device_kv_cache_refuses_bad_operands() {
    let client = client();
    let good = DeviceKvDims {
        n_layers: 2,
        n_kv_heads: 1,
        head_dim: 4,
        page_size: 2,
    };
    assert!(
        Kv::new(
            &client,
            DeviceKvDims {
                head_dim: 300,
                ..good
            }
        )
        .is_err()
    );
    assert!(
        Kv::new(
            &client,
            DeviceKvDims {
                page_size: 0,
                ..good
            }
        )
        .is_err()
    );
    let mut kv = Kv::new(&client, good).unwrap();
    let rows = client.create_from_slice(f32::as_bytes(&[0.5f32; 12]));
    assert!(kv.append(2, &rows, &rows, 1).is_err(), "layer out of range");
    assert!(
        kv.append(1, &rows, &rows, 1).is_err(),
        "layer 1 ahead of layer 0"
    );
    assert!(
        kv.append(0, &rows, &rows, 20).is_err(),
        "handle shorter than its rows"
    );
    assert!(kv.append(0, &rows, &rows, 0).is_err());
    kv.append(0, &rows, &rows, 3).unwrap();
    let q = || client.create_from_slice(f32::as_bytes(&[0.5f32; 8]));
    assert!(kv.attention(0, q(), 2, &[0], &[2]).is_err(), "own parent");
    assert!(kv.attention(0, q(), 2, &[-1], &[]).is_err(), "positions");
    assert!(
        kv.attention(0, q(), 8, &[-1, 0], &[2, 3]).is_err(),
        "q too small"
    );
    assert!(kv.attention(1, q(), 2, &[-1], &[0]).is_err(), "empty layer");
    assert!(
        kv.attention(0, q(), 2, &[-1; 4], &[0; 4]).is_err(),
        "more rows than tokens"
    );
    assert!(kv.attention(0, q(), 2, &[-1], &[2]).is_ok());
    assert_eq!(kv.len(), 0, "the last layer holds nothing yet");
    assert_eq!(kv.layer_len(0), 3);
}
