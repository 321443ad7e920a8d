//! The device-resident KV cache against a host mirror: a speculative session (prefill in
//! chunks, trees appended, attention, commits of random paths, rollbacks) with every layer's
//! contents and every attention output checked, storage growth and page reuse included.

use cubecl::prelude::ComputeClient;
use cubecl::prelude::CubeElement;
use cubecl::server::Handle;

use super::tests::{random_parents, reference};
use super::{R, client};
use crate::cube::kv::{DeviceKvDims, DevicePagedKv, DeviceQuant};
use crate::qmatmul::tests::Rng;

type Kv = DevicePagedKv<R>;

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
fn upload(client: &ComputeClient<R>, x: &[Vec<f32>], dims: DeviceKvDims) -> Handle {
    let hd = dims.head_dim;
    let flat: Vec<f32> = (0..dims.n_kv_heads)
        .flat_map(|g| x.iter().flat_map(move |r| r[g * hd..(g + 1) * hd].to_vec()))
        .collect();
    client.create_from_slice(f32::as_bytes(&flat))
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

/// Commits a random root-to-node path of the tree just appended after `prefix`, in both.
fn commit_random_path(
    kv: &mut Kv,
    mirror: &mut Mirror,
    parents: &[i32],
    prefix: usize,
    rng: &mut Rng,
) {
    let path: Vec<usize> = random_path(parents, rng)
        .into_iter()
        .map(|r| prefix + r)
        .collect();
    kv.retain(prefix, &path);
    mirror.retain(prefix, &path);
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
        for n in [9i32, 14] {
            let chain: Vec<i32> = (0..n).map(|i| i - 1).collect();
            step(&mut kv, &mut mirror, &chain, n_heads, &mut rng);
        }
        check_contents(&kv, &mirror, "prefill");
        for round in 0..12 {
            let what = format!("case {case} round {round}");
            let n = 1 + (rng.next() % 9) as usize;
            let parents = random_parents(n, &mut rng);
            let prefix = kv.len();
            let before = kv.read_pages();
            let pages = kv.pages_in_use();
            step(&mut kv, &mut mirror, &parents, n_heads, &mut rng);
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
                commit_random_path(&mut kv, &mut mirror, &parents, prefix, &mut rng);
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

/// Appends a tree of random tokens to every layer of both; each row's attention output
/// equals the reference over what the cache says a query at that row's position reads
/// ([`DevicePagedKv::read_layer_at`]: with quantization, codes expanded for packed pages past
/// the window; full precision elsewhere — and without it, `check_contents` holds that to the
/// mirror).
fn step(kv: &mut Kv, mirror: &mut Mirror, parents: &[i32], n_heads: usize, rng: &mut Rng) {
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
        let hd = d.head_dim;
        for i in 0..n {
            let (keys, values) = kv.read_layer_at(layer, positions[i] as usize);
            let mut mask = vec![false; n_kv];
            mask[..cached].fill(true);
            let mut node = i as i32;
            while node >= 0 {
                mask[cached + node as usize] = true;
                node = parents[node as usize];
            }
            let qi: Vec<f32> = (0..n_heads)
                .flat_map(|h| q[(h * n + i) * hd..(h * n + i + 1) * hd].to_vec())
                .collect();
            let want = reference(&qi, &keys, &values, &mask, (n_heads, d.n_kv_heads, hd));
            for h in 0..n_heads {
                for c in 0..hd {
                    let (a, b) = (got[(h * n + i) * hd + c], want[h * hd + c]);
                    assert!(
                        (a - b).abs() < 1e-5,
                        "layer {layer} row {i} head {h}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

/// What a query at the current length reads: exact where full precision is read, within
/// half a quantization step (from the exact page's range) where codes are; returns how many
/// tokens were read as codes.
fn check_quantized(kv: &Kv, mirror: &Mirror, q: &DeviceQuant) -> usize {
    let d = kv.dims();
    let (ps, kvh, hd) = (d.page_size, d.n_kv_heads, d.head_dim);
    let len = kv.len();
    let levels = ((1u32 << q.bits) - 1) as f32;
    let mut coded = 0;
    for layer in 0..d.n_layers {
        let (k, v) = kv.read_layer(layer);
        let exact = [&mirror.layers[layer][0], &mirror.layers[layer][1]];
        for t in 0..len {
            let p = t / ps;
            let codes =
                (p + 1) * ps <= len && p * ps >= q.sinks && (p + 1) * ps - 1 + q.window < len;
            coded += usize::from(codes && layer == 0);
            for g in 0..kvh {
                for c in 0..hd {
                    let at = (g * len + t) * hd + c;
                    let (xk, xv) = (exact[0][t][g * hd + c], exact[1][t][g * hd + c]);
                    if !codes {
                        assert_eq!((k[at], v[at]), (xk, xv), "layer {layer} token {t}");
                        continue;
                    }
                    // Keys: channel (g, c) over the page's tokens.
                    let page = &exact[0][p * ps..(p + 1) * ps];
                    let (lo, hi) = page.iter().fold((f32::MAX, f32::MIN), |(a, b), r| {
                        (a.min(r[g * hd + c]), b.max(r[g * hd + c]))
                    });
                    let step = (hi - lo) / levels;
                    assert!(
                        (k[at] - xk).abs() <= 0.5 * step * 1.001 + 1e-6,
                        "key {t} {g} {c}"
                    );
                    // Values: the group of channel c in this token's row (identity or the
                    // calibrated permutation, clip 1).
                    let perm: Vec<usize> = match &q.values {
                        Some(v) => v[layer].0.clone(),
                        None => (0..hd).collect(),
                    };
                    let at_c = perm.iter().position(|&x| x == c).unwrap();
                    let grp = &perm[at_c / q.group * q.group..][..q.group];
                    let row = &exact[1][t][g * hd..(g + 1) * hd];
                    let (lo, hi) = grp.iter().fold((f32::MAX, f32::MIN), |(a, b), &x| {
                        (a.min(row[x]), b.max(row[x]))
                    });
                    let step = (hi - lo) / levels;
                    assert!(
                        (v[at] - xv).abs() <= 0.5 * step * 1.001 + 1e-6,
                        "value {t} {g} {c}"
                    );
                }
            }
        }
    }
    coded
}

#[test]
fn device_kv_cache_packs_pages_and_reads_codes_past_the_window() {
    let mut rng = Rng(0x9ac4);
    let (n_heads, kvh, hd, ps) = (4, 2, 16, 4);
    let dims = DeviceKvDims {
        n_layers: 2,
        n_kv_heads: kvh,
        head_dim: hd,
        page_size: ps,
    };
    for bits in [2, 4, 8] {
        for calibrated in [false, true] {
            let values = calibrated.then(|| {
                (0..2)
                    .map(|_| {
                        let mut perm: Vec<usize> = (0..hd).collect();
                        for i in (1..hd).rev() {
                            perm.swap(i, (rng.next() % (i as u64 + 1)) as usize);
                        }
                        (perm, vec![1.0; hd / 8])
                    })
                    .collect()
            });
            let q = DeviceQuant {
                bits,
                group: 8,
                sinks: 2,
                window: 6,
                values,
            };
            let what = format!("{bits} bits, calibrated {calibrated}");
            let mut kv = Kv::with_quant(&client(), dims, q.clone()).unwrap();
            let mut mirror = Mirror::new(dims);
            for n in [9i32, 14] {
                let chain: Vec<i32> = (0..n).map(|i| i - 1).collect();
                step(&mut kv, &mut mirror, &chain, n_heads, &mut rng);
            }
            let mut coded = check_quantized(&kv, &mirror, &q);
            for round in 0..10 {
                let n = 1 + (rng.next() % 7) as usize;
                let parents = random_parents(n, &mut rng);
                let prefix = kv.len();
                let before = (kv.read_pages(), kv.copies(), kv.read_layer(1));
                step(&mut kv, &mut mirror, &parents, n_heads, &mut rng);
                if round % 3 == 2 {
                    kv.truncate(prefix);
                    mirror.truncate(prefix);
                    let after = (kv.read_pages(), kv.copies(), kv.read_layer(1));
                    assert!(
                        after == before,
                        "{what} round {round}: rollback changed the cache"
                    );
                } else {
                    commit_random_path(&mut kv, &mut mirror, &parents, prefix, &mut rng);
                }
                coded += check_quantized(&kv, &mirror, &q);
                // Accounting: full pages and packed pages, every layer, keys and values.
                let (full, packed) = kv.copies();
                let words = ps * kvh * hd * bits as usize / 32;
                let packed_page = 2 * words + 2 * kvh * hd + 2 * ps * kvh * (hd / 8);
                let want = 2 * (full * 2 * ps * kvh * hd + packed * packed_page) * 4;
                assert_eq!(kv.bytes(), want, "{what} round {round}");
                assert!(
                    full < kv.pages_in_use(),
                    "{what}: old pages hold only codes"
                );
            }
            assert!(coded > 0, "{what}: no token was read as codes");
            // A rollback deep into pages held only as codes expands them back (their exact
            // values are gone: the page now holds what its codes said).
            kv.truncate(5);
            mirror.truncate(5);
            // Values lie in [-1, 1]: a restored one is within half a step of a 2-wide range.
            let bound = 1.0 / ((1u32 << bits) - 1) as f32 + 1e-6;
            for layer in 0..2 {
                let (k, v) = kv.read_layer(layer);
                assert!(k.len() == 5 * kvh * hd && v.len() == k.len());
                for (which, x) in [k, v].into_iter().enumerate() {
                    for t in 0..5 {
                        for g in 0..kvh {
                            let row = &mut mirror.layers[layer][which][t][g * hd..(g + 1) * hd];
                            let got = &x[(g * 5 + t) * hd..][..hd];
                            for (a, b) in got.iter().zip(row.iter()) {
                                assert!((a - b).abs() <= bound, "{what}: restored {a} vs {b}");
                            }
                            row.copy_from_slice(got);
                        }
                    }
                }
            }
            assert_eq!(check_quantized(&kv, &mirror, &q), 0);
            let chain: Vec<i32> = (0..7).map(|i| i - 1).collect();
            step(&mut kv, &mut mirror, &chain, n_heads, &mut rng);
            let copy = kv.duplicate();
            kv.clear();
            assert_eq!((kv.bytes(), kv.copies()), (0, (0, 0)), "{what}");
            check_quantized(&copy, &mirror, &q);
        }
    }
}

#[test]
fn device_quantization_refuses_bad_settings() {
    let dims = DeviceKvDims {
        n_layers: 1,
        n_kv_heads: 1,
        head_dim: 16,
        page_size: 4,
    };
    let good = DeviceQuant {
        bits: 4,
        group: 8,
        sinks: 0,
        window: 0,
        values: None,
    };
    let make = |q: DeviceQuant| Kv::with_quant(&client(), dims, q);
    assert!(make(good.clone()).is_ok());
    assert!(
        make(DeviceQuant {
            bits: 3,
            ..good.clone()
        })
        .is_err()
    );
    assert!(
        make(DeviceQuant {
            group: 5,
            ..good.clone()
        })
        .is_err()
    );
    let bad_perm = Some(vec![(vec![0; 16], vec![1.0; 2])]);
    assert!(
        make(DeviceQuant {
            values: bad_perm,
            ..good.clone()
        })
        .is_err()
    );
    let two_layers = Some(vec![((0..16).collect(), vec![1.0; 2]); 2]);
    assert!(
        make(DeviceQuant {
            values: two_layers,
            ..good
        })
        .is_err()
    );
}
