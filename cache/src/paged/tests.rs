use std::sync::Arc;

use arbor_kernels::attention::KvSource;
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::*;
use crate::{H2oConfig, QuantAxis, QuantConfig, QuestConfig, StepFormat};

fn layout() -> KvLayout {
    KvLayout {
        n_layers: 2,
        n_kv_heads: 2,
        head_dim: 3,
        page_size: 4,
    }
}

/// Head-major rows whose values encode (token, head, channel).
fn rows(first: usize, n: usize, kvh: usize, hd: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for g in 0..kvh {
        for t in first..first + n {
            for c in 0..hd {
                out.push((t * 100 + g * 10 + c) as f32 + 0.5);
            }
        }
    }
    out
}

fn fill(c: &mut PagedKv, first: usize, n: usize) {
    let r = rows(first, n, 2, 3);
    let v: Vec<f32> = r.iter().map(|x| -x).collect();
    for layer in 0..2 {
        c.append_head_major(layer, &r, &v, n);
    }
}

#[test]
fn append_reads_back_and_accounts_pages_exactly() {
    let mut c = PagedKv::new(layout());
    fill(&mut c, 0, 3);
    fill(&mut c, 3, 6);
    assert_eq!(c.len(), 9);
    assert_eq!(c.pages(), 3);
    assert_eq!(c.bytes(), 3 * layout().page_bytes());
    let view = c.layer(1);
    for j in 0..9 {
        for g in 0..2 {
            let want: Vec<f32> = (0..3)
                .map(|ch| (j * 100 + g * 10 + ch) as f32 + 0.5)
                .collect();
            assert_eq!(view.key(0, g, j, 0, &mut [0.0; 3]), &want[..]);
            let neg: Vec<f32> = want.iter().map(|x| -x).collect();
            assert_eq!(view.value(0, g, j, 0, &mut [0.0; 3]), &neg[..]);
        }
    }
}

#[test]
fn prefetch_hints_point_at_the_rows_attention_reads() {
    let mut c = PagedKv::new(layout());
    fill(&mut c, 0, 9);
    let view = c.layer(1);
    for j in 0..9 {
        for g in 0..2 {
            for values in [false, true] {
                let mut buf = [0.0; 3];
                let row = if values {
                    view.value(0, g, j, 0, &mut buf)
                } else {
                    view.key(0, g, j, 0, &mut buf)
                };
                assert_eq!(
                    view.stored_at(0, g, j, values),
                    Some(row.as_ptr()),
                    "{j} {g}"
                );
            }
        }
    }
    // Past the last page there is nothing to fetch (walks ask a few keys ahead of the end).
    for j in 12..20 {
        assert_eq!(view.stored_at(0, 0, j, false), None);
    }
}

#[test]
fn rollback_is_byte_identical() {
    let mut c = PagedKv::new(layout());
    fill(&mut c, 0, 6);
    let before = c.clone();
    // A tree of 7 rows appended, all rejected.
    fill(&mut c, 50, 7);
    c.truncate(6);
    assert_eq!(c, before);
    // A tree whose rows 7 and 9 (of 6..13) are accepted.
    fill(&mut c, 50, 7);
    c.retain(6, &[7, 9]);
    assert_eq!(c.len(), 8);
    let v = c.layer(0);
    assert_eq!(
        v.key(0, 1, 6, 0, &mut [0.0; 3])[0],
        (51 * 100 + 10) as f32 + 0.5
    );
    assert_eq!(
        v.key(0, 1, 7, 0, &mut [0.0; 3])[0],
        (53 * 100 + 10) as f32 + 0.5
    );
    assert_eq!(c.pages(), 2);
    // Dropping the two kept rows again restores the original bytes.
    c.truncate(6);
    assert_eq!(c, before);
    c.clear();
    assert_eq!((c.len(), c.pages(), c.bytes()), (0, 0, 0));
}

#[test]
fn retain_across_pages_matches_a_fresh_append() {
    let mut c = PagedKv::new(layout());
    fill(&mut c, 0, 5);
    fill(&mut c, 20, 10);
    c.retain(5, &[6, 9, 14]);
    let mut fresh = PagedKv::new(layout());
    fill(&mut fresh, 0, 5);
    for t in [21, 24, 29] {
        fill(&mut fresh, t, 1);
    }
    assert_eq!(c, fresh);
}

const WIDE: KvLayout = KvLayout {
    n_layers: 2,
    n_kv_heads: 2,
    head_dim: 8,
    page_size: 4,
};

/// Rows of `hd` channels for `kvh` heads, head-major, smooth in the channel, with one wide
/// channel offset (like real keys).
fn wide_rows(first: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
    let mut k = Vec::new();
    for g in 0..WIDE.n_kv_heads {
        for t in first..first + n {
            for c in 0..WIDE.head_dim {
                let x = ((t * 7 + g * 3 + c) as f32 * 0.37).sin();
                k.push(if c == 5 { 20.0 + x } else { x });
            }
        }
    }
    let v = k.iter().map(|x| 1.0 - x).collect();
    (k, v)
}

fn add(c: &mut PagedKv, first: usize, n: usize) {
    let (k, v) = wide_rows(first, n);
    for layer in 0..WIDE.n_layers {
        c.append_head_major(layer, &k, &v, n);
    }
}

fn quant(bits: u32, sinks: usize, window: usize, keys: QuantAxis) -> KvCompression {
    quant_with(
        bits,
        sinks,
        window,
        (keys, QuantAxis::Token, 0, StepFormat::F16),
    )
}

/// Quantizers with keys and values on the given axes, `refine` refined channels and steps
/// stored as `steps`.
fn quant_with(
    bits: u32,
    sinks: usize,
    window: usize,
    (keys, values, refine, steps): (QuantAxis, QuantAxis, usize, StepFormat),
) -> KvCompression {
    let cfg = QuantConfig {
        bits,
        group: 8,
        sinks,
        window,
        keys,
        values,
        refine,
        steps,
    };
    KvCompression::uniform(&WIDE, &cfg).unwrap()
}

fn read(c: &PagedKv, values: bool, j: usize, pos: usize) -> Vec<f32> {
    let mut buf = [0.0f32; 8];
    let view = c.layer(1);
    if values {
        view.value(0, 1, j, pos, &mut buf).to_vec()
    } else {
        view.key(0, 1, j, pos, &mut buf).to_vec()
    }
}

#[test]
fn quantized_pages_follow_the_position_rule_shrink_storage_and_roll_back_exactly() {
    for axes in [
        (QuantAxis::Channel, QuantAxis::Token, 0, StepFormat::F16),
        (QuantAxis::Token, QuantAxis::Token, 0, StepFormat::F16),
        (QuantAxis::Channel, QuantAxis::Channel, 0, StepFormat::F16),
        (QuantAxis::Channel, QuantAxis::Channel, 2, StepFormat::F16),
        (QuantAxis::Channel, QuantAxis::Channel, 2, StepFormat::F8),
        (QuantAxis::Token, QuantAxis::Channel, 0, StepFormat::F8),
    ] {
        let axis = axes.0;
        let comp = quant_with(4, 2, 4, axes);
        let mut c = PagedKv::with_policy(WIDE, Arc::new(KvPolicy::quantized(comp.clone())));
        let mut plain = PagedKv::new(WIDE);
        add(&mut c, 0, 20);
        add(&mut plain, 0, 20);
        // Pages 1..5 are packed on completion (page 0 holds the sinks); for a query at 20
        // pages 1..4 (last token + 4 < 20) read as codes, the rest exact.
        let before: Vec<Vec<f32>> = (0..20).map(|j| read(&c, false, j, 20)).collect();
        let vals: Vec<Vec<f32>> = (0..20).map(|j| read(&c, true, j, 20)).collect();
        for j in 0..20 {
            let exact = read(&plain, false, j, 20);
            if !(4..16).contains(&j) {
                assert_eq!(
                    before[j], exact,
                    "{axes:?}: sinks' page and window exact ({j})"
                );
                assert_eq!(vals[j], read(&plain, true, j, 20));
            } else {
                assert_ne!(before[j], exact, "{axes:?}: token {j} is quantized");
                assert_ne!(vals[j], read(&plain, true, j, 20), "{axes:?}: value {j}");
                let err = before[j]
                    .iter()
                    .zip(&exact)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                // 4 bits: half a step of the widest range (per token: 21 wide, per channel:
                // at most 2 wide), plus f16 rounding.
                let bound = match axis {
                    QuantAxis::Channel => 2.0 / 15.0 / 2.0 + 2e-2,
                    QuantAxis::Token => 22.0 / 15.0 / 2.0 + 2e-2,
                };
                assert!(err <= bound, "{axis:?} 4-bit error {err} at {j}");
            }
        }
        // Freeing the full copies changes no value read.
        c.compress();
        for j in 0..20 {
            assert_eq!(read(&c, false, j, 20), before[j], "{axes:?}: key {j}");
            assert_eq!(read(&c, true, j, 20), vals[j], "{axes:?}: value {j}");
        }
        // Storage: pages 1..3 (last token + 4 < 20) codes only, page 4 both, 0 full.
        let f32_page = 4 * 2 * 8 * 4;
        let key_codes = comp.keys[0].page_bytes(&WIDE);
        let value_codes = comp.values[0].page_bytes(&WIDE);
        // Refined: 2 channels per head and page, an index byte each and a 4-bit code per token.
        // Steps: 2 bytes per channel (f16) or 1 (F8), minimums 2.
        let refined = axes.2 * 2 * (1 + 4 / 2);
        let grids = (axes.3.bytes() + 2) * 2 * 8;
        let plain_codes = |q: &crate::compression::PageQuant| match q {
            crate::compression::PageQuant::Channel(_) => grids + 4 * 2 * 8 / 2 + refined,
            crate::compression::PageQuant::Token(_) => 4 * 2 * (8 / 2 + 4),
        };
        assert_eq!(key_codes, plain_codes(&comp.keys[0]), "{axes:?}");
        assert_eq!(value_codes, plain_codes(&comp.values[0]), "{axes:?}");
        let per_layer =
            2 * f32_page + 3 * (key_codes + value_codes) + 2 * f32_page + (key_codes + value_codes);
        assert_eq!(c.bytes(), 2 * per_layer, "{axes:?}");
        assert!(c.bytes() < plain.bytes());
        // A rejected tree leaves the compressed store byte-identical; an accepted row leaves
        // the packed pages untouched.
        let snapshot = c.clone();
        add(&mut c, 90, 3);
        c.truncate(20);
        assert_eq!(c, snapshot, "{axes:?}");
        add(&mut c, 90, 3);
        c.retain(20, &[21]);
        assert_eq!(c.len(), 21);
        assert_eq!(read(&c, false, 10, 21), before[10]);
    }
}

/// Quest with a budget covering the context reads everything; with a small one each query
/// head reads the sink page, the recent pages and its own best-bounded pages — never more
/// than the budget.
#[test]
fn quest_reads_sinks_recent_and_best_pages_within_budget() {
    let layout = KvLayout {
        n_layers: 3,
        ..WIDE
    };
    let mut rng = StdRng::seed_from_u64(8);
    let n = 64;
    let k: Vec<f32> = (0..2 * n * 8)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let v = k.clone();
    let quest = |budget| {
        Arc::new(KvPolicy {
            quest: Some(QuestConfig {
                budget,
                recent: 8,
                sinks: 2,
                dense_layers: 2,
            }),
            ..KvPolicy::default()
        })
    };
    let mut wide = PagedKv::with_policy(layout, quest(1000));
    let mut tight = PagedKv::with_policy(layout, quest(24));
    for c in [&mut wide, &mut tight] {
        for layer in 0..3 {
            c.append_head_major(layer, &k, &v, n);
        }
    }
    let q: Vec<f32> = (0..2 * 8).map(|_| rng.random_range(-1.0..1.0)).collect();
    let all: Vec<usize> = (0..n).collect();
    let mut heads = vec![Vec::new(); 2];
    assert!(
        !wide.layer(2).select(0, 1, n, &q, &all, &mut heads),
        "budget above the context: dense"
    );
    assert!(
        !tight.layer(1).select(0, 1, n, &q, &all, &mut heads),
        "dense layers stay dense"
    );
    assert!(tight.layer(2).select(0, 1, n, &q, &all, &mut heads));
    let bound = |p: usize, h: usize| -> f32 {
        let b = &tight.layers[2].bounds[p];
        let (lo, hi) = b.split_at(b.len() / 2);
        crate::quest::page_bound(&q[h * 8..(h + 1) * 8], &lo[8..16], &hi[8..16])
    };
    for (h, keys) in heads.iter().enumerate() {
        assert!(keys.len() <= 24, "{} keys read", keys.len());
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        // Sink page (0..4) and recent pages (last token + 8 >= 64: pages 14 and 15) always
        // read.
        for j in (0..4).chain(56..64) {
            assert!(keys.contains(&j), "key {j} must be read");
        }
        // Three middle pages: exactly this head's three best-bounded ones, whole.
        let chosen: Vec<usize> = (1..14).filter(|p| keys.contains(&(p * 4))).collect();
        let mut ranked: Vec<usize> = (1..14).collect();
        ranked.sort_by(|&a, &b| bound(b, h).total_cmp(&bound(a, h)).then(a.cmp(&b)));
        ranked.truncate(3);
        ranked.sort_unstable();
        assert_eq!(chosen, ranked, "head {h}");
        assert_eq!(keys.len(), 4 * (1 + 2 + 3));
    }
    assert_ne!(heads[0], heads[1], "the heads choose for themselves");
}

fn h2o_policy(budget: usize, recent: usize) -> Arc<KvPolicy> {
    Arc::new(KvPolicy {
        h2o: Some(H2oConfig {
            budget,
            recent,
            sinks: 2,
        }),
        ..KvPolicy::default()
    })
}

/// Votes `[kv head][n_q][len]` of `n_q` rows over `len` slots: KV head `g` favours every
/// third slot, shifted by `g` (the two heads of [`WIDE`] favour different tokens).
fn votes(n_q: usize, len: usize, seed: usize) -> Vec<f32> {
    (0..WIDE.n_kv_heads * n_q * len)
        .map(|i| {
            let g = i / (n_q * len);
            if (i % len + seed + g).is_multiple_of(3) {
                1.0
            } else {
                0.01
            }
        })
        .collect()
}

/// H2O never holds more than its budget after an eviction point, always keeps sinks and
/// recent tokens, keeps the sequence length, and evicted slots are reused.
#[test]
fn h2o_evicts_to_budget_keeping_sinks_and_recent() {
    let mut c = PagedKv::with_policy(WIDE, h2o_policy(16, 6));
    let (k, v) = wide_rows(0, 1);
    let mut pages_seen = 0;
    for t in 0..100 {
        for layer in 0..2 {
            c.append_head_major(layer, &k, &v, 1);
            let len = c.layer_len(layer);
            c.record_votes(layer, &votes(1, len, t), 1);
        }
        assert_eq!(c.len(), t + 1);
        if (t + 1) % 4 == 1 && t > 16 {
            // The forward at an eviction point evicted down to the budget, then appended one.
            assert!(c.layer_len(0) <= 17, "holds {} at {t}", c.layer_len(0));
        }
        assert!(c.layer_len(0) <= 16 + 4 + 1);
        pages_seen = pages_seen.max(c.pages());
        for logical in &c.layers[0].logical {
            assert_eq!(logical.len(), c.layer_len(0));
            assert_eq!(
                logical[..2.min(t + 1)],
                [0, 1][..2.min(t + 1)],
                "sinks kept"
            );
            let recent: Vec<usize> = (t + 1 - 6.min(t + 1)..=t).collect();
            assert!(
                recent.iter().all(|p| logical.contains(p)),
                "recent kept at {t}"
            );
            assert!(logical.windows(2).all(|w| w[0] < w[1]));
        }
    }
    assert!(c.evicted(0) > 70);
    let l = &c.layers[0];
    assert_ne!(
        l.logical[0], l.logical[1],
        "each KV head keeps its own tokens"
    );
    assert!(pages_seen <= 6, "slots reused: at most {pages_seen} pages");
    // The mask of an evicted layer maps slots to their positions' columns: a two-row tree
    // whose second row does not see the first sees every cached slot and itself.
    let n = c.len();
    c.append_head_major(
        0,
        &[k.clone(), k.clone()].concat(),
        &[v.clone(), v].concat(),
        2,
    );
    let mut mask = vec![true; 2 * (n + 2)];
    mask[n + 1] = false;
    mask[n + 2 + n] = false;
    let m = c.layer_mask(0, &mask, 2);
    let width = c.layer_len(0);
    assert_eq!(m.len(), 2 * width);
    assert!(m[..width - 2].iter().all(|&x| x) && m[width..2 * width - 2].iter().all(|&x| x));
    assert_eq!(m[width - 2..width], [true, false]);
    assert_eq!(m[2 * width - 2..], [false, true]);
}

/// Each KV head evicts by its own votes, so the heads keep different tokens, and after every
/// compaction each head's slots hold exactly the rows of the positions it says it kept.
#[test]
fn h2o_evicts_per_kv_head_and_moves_each_heads_rows() {
    let mut c = PagedKv::with_policy(WIDE, h2o_policy(12, 4));
    let hd = WIDE.head_dim;
    let mut buf = vec![0.0; hd];
    for t in 0..41 {
        add(&mut c, t, 1);
        for layer in 0..WIDE.n_layers {
            // Head `g` favours the positions `p` with `(p + g) % 3 == 0`.
            let vs: Vec<f32> = c.layers[layer]
                .logical
                .iter()
                .enumerate()
                .flat_map(|(g, l)| {
                    l.iter()
                        .map(move |p| [0.01, 1.0][usize::from((p + g) % 3 == 0)])
                })
                .collect();
            c.record_votes(layer, &vs, 1);
        }
        for layer in 0..WIDE.n_layers {
            let view = c.layer(layer);
            for g in 0..WIDE.n_kv_heads {
                for j in 0..c.layer_len(layer) {
                    let pos = c.layers[layer].logical[g][j];
                    let (k, v) = wide_rows(pos, 1);
                    let want = g * hd..(g + 1) * hd;
                    assert_eq!(view.key(0, g, j, t + 1, &mut buf), &k[want.clone()]);
                    assert_eq!(view.value(0, g, j, t + 1, &mut buf), &v[want]);
                }
            }
        }
    }
    assert!(c.evicted(0) >= 41 - 16);
    // Past the sinks and the recent tokens, each head kept only the positions it favours.
    for (g, logical) in c.layers[0].logical.iter().enumerate() {
        for &p in logical.iter().filter(|&&p| p >= 2 && p + 4 < 40) {
            assert_eq!((p + g) % 3, 0, "head {g} kept {p}: {logical:?}");
        }
    }
}

/// Rows of a rejected branch never vote: a tree appended, voted and rolled back leaves the
/// accumulated votes as if it had never run.
#[test]
fn h2o_counts_only_committed_votes() {
    let mut a = PagedKv::with_policy(WIDE, h2o_policy(64, 8));
    let (k, v) = wide_rows(0, 10);
    for layer in 0..2 {
        a.append_head_major(layer, &k, &v, 10);
        a.record_votes(layer, &votes(10, 10, 0), 10);
    }
    let mut b = a.clone();
    // `a` verifies a 3-row tree (root, two children) and keeps root + second child: each row
    // sees the cached tokens, its ancestors and itself.
    let tree_votes = || {
        let mut vs = votes(3, 13, 1);
        for g in 0..WIDE.n_kv_heads {
            let at = |r: usize, j: usize| (g * 3 + r) * 13 + j;
            for (r, j) in [(0, 11), (0, 12), (1, 12), (2, 11)] {
                vs[at(r, j)] = 0.0;
            }
        }
        vs
    };
    let (tk, tv) = wide_rows(50, 3);
    for layer in 0..2 {
        a.append_head_major(layer, &tk, &tv, 3);
        a.record_votes(layer, &tree_votes(), 3);
    }
    a.retain(10, &[10, 12]);
    // `b` decodes the same two tokens one by one (same rows, same votes).
    for (i, row) in [(0usize, 0usize), (1, 2)] {
        let (k1, v1) = wide_rows(50 + row, 1);
        for layer in 0..2 {
            b.append_head_major(layer, &k1, &v1, 1);
            let full = tree_votes();
            let mut mine = Vec::new();
            for g in 0..WIDE.n_kv_heads {
                let r = &full[(g * 3 + row) * 13..(g * 3 + row + 1) * 13];
                mine.extend_from_slice(&r[..11]);
                if i == 1 {
                    mine.push(r[12]);
                }
            }
            b.record_votes(layer, &mine, 1);
        }
    }
    // Fold both (the next forward's start) and compare the votes.
    for c in [&mut a, &mut b] {
        for layer in 0..2 {
            c.fold_and_evict(layer);
        }
    }
    assert_eq!(a.layers[0].votes, b.layers[0].votes);
    assert_eq!(a.layers[1].votes, b.layers[1].votes);
    assert_eq!(a.layers[0].logical, b.layers[0].logical);
}

/// With quantization, Quest and H2O all on, a rejected tree leaves the storage byte-identical
/// (pages, codes, Quest bounds, positions; the votes of rows committed before it are folded
/// in, as by any forward), and accepting part of a tree leaves exactly the state of decoding
/// the accepted tokens one by one — votes and evictions included.
#[test]
fn rollback_is_byte_identical_under_every_policy() {
    let policy = Arc::new(KvPolicy {
        compression: Some(quant(4, 2, 4, QuantAxis::Channel)),
        quest: Some(QuestConfig {
            budget: 14,
            recent: 4,
            sinks: 2,
            dense_layers: 0,
        }),
        h2o: Some(H2oConfig {
            budget: 12,
            recent: 4,
            sinks: 2,
        }),
    });
    let step = |c: &mut PagedKv, first: usize, n: usize| {
        let (k, v) = wide_rows(first, n);
        for layer in 0..WIDE.n_layers {
            c.append_head_major(layer, &k, &v, n);
            let len = c.layer_len(layer);
            c.record_votes(layer, &votes(n, len, first), n);
        }
    };
    let mut c = PagedKv::with_policy(WIDE, policy);
    // 31 tokens one by one (evictions at 16, 20, 24, 28); the cache at 31 sits right before
    // an eviction point, and its last row's votes are pending.
    for t in 0..31 {
        step(&mut c, t, 1);
    }
    assert!(c.evicted(0) > 0 && c.layer_len(0) <= 12 + 4);
    let before = c.clone();
    step(&mut c, 90, 3);
    c.truncate(31);
    for layer in 0..WIDE.n_layers {
        assert_eq!(c.layers[layer].len, before.layers[layer].len);
        let (a, b) = (&c.layers[layer], &before.layers[layer]);
        assert_eq!((&a.k, &a.v, &a.kq, &a.vq), (&b.k, &b.v, &b.kq, &b.vq));
        assert_eq!((&a.bounds, &a.logical), (&b.bounds, &b.logical));
    }
    // One more plain step (to 32, an eviction point on the next forward); then a chain of
    // three rows at 32 (depth 2, within the policy's cap of 3) of which two are accepted,
    // against two plain steps. Row `r` votes the same in both: the cached slots, then its
    // ancestors and itself.
    let row_votes = |len: usize, r: usize, g: usize, width: usize| -> Vec<f32> {
        (0..width)
            .map(|j| {
                if j < len {
                    1.0 / (1 + (j * 7 + r + 3 * g) % 5) as f32
                } else if j <= len + r {
                    0.5
                } else {
                    0.0
                }
            })
            .collect()
    };
    let mut c = before.clone();
    step(&mut c, 31, 1);
    let mut plain = c.clone();
    assert_eq!(policy_depth(&c), Some(3));
    let (k, v) = wide_rows(90, 3);
    for layer in 0..WIDE.n_layers {
        c.append_head_major(layer, &k, &v, 3);
        let len = c.layer_len(layer) - 3;
        let vs: Vec<f32> = (0..WIDE.n_kv_heads)
            .flat_map(|g| (0..3).flat_map(move |r| row_votes(len, r, g, len + 3)))
            .collect();
        c.record_votes(layer, &vs, 3);
    }
    c.retain(32, &[32, 33]);
    for r in 0..2 {
        let (k, v) = wide_rows(90 + r, 1);
        for layer in 0..WIDE.n_layers {
            plain.append_head_major(layer, &k, &v, 1);
            let width = plain.layer_len(layer);
            let vs: Vec<f32> = (0..WIDE.n_kv_heads)
                .flat_map(|g| row_votes(width - 1 - r, r, g, width))
                .collect();
            plain.record_votes(layer, &vs, 1);
        }
    }
    for x in [&mut c, &mut plain] {
        for layer in 0..WIDE.n_layers {
            x.fold_and_evict(layer);
        }
    }
    assert_eq!(c.len(), 34);
    assert_eq!(c, plain);
}

fn policy_depth(c: &PagedKv) -> Option<usize> {
    c.policy()
        .unwrap()
        .max_tree_depth(c.len(), c.layout().page_size)
}

/// `reads_alike` is `same_read` over every key at once: for every pair of query positions,
/// before and after the full copies are freed, with and without H2O's position tables, it
/// says alike exactly where every key reads alike; an uncompressed cache reads alike
/// everywhere.
#[test]
fn reads_alike_is_same_read_over_every_key() {
    let comp = quant(4, 2, 4, QuantAxis::Channel);
    // H2O keeps a table of logical positions per head, only as long as the filled slots.
    let with_h2o = KvPolicy {
        h2o: Some(H2oConfig {
            budget: 64,
            sinks: 2,
            recent: 4,
        }),
        ..KvPolicy::quantized(comp.clone())
    };
    for policy in [KvPolicy::quantized(comp), with_h2o] {
        reads_alike_under(policy);
    }
}

fn reads_alike_under(policy: KvPolicy) {
    let mut c = PagedKv::with_policy(WIDE, Arc::new(policy));
    let mut plain = PagedKv::new(WIDE);
    // 22 tokens: the last page part-filled.
    add(&mut c, 0, 22);
    add(&mut plain, 0, 22);
    let (mut alike, mut apart) = (0, 0);
    for freed in [false, true] {
        if freed {
            c.compress();
        }
        let view = c.layer(1);
        for g in 0..WIDE.n_kv_heads {
            for a in 12..30 {
                for b in 12..30 {
                    let every = (0..22).all(|j| view.same_read(0, g, j, a, b));
                    assert_eq!(view.reads_alike(0, g, a, b), every, "{a} {b} freed {freed}");
                    if every {
                        alike += 1
                    } else {
                        apart += 1
                    }
                    assert!(plain.layer(1).reads_alike(0, g, a, b));
                }
            }
        }
        assert!(!view.selects());
    }
    assert!(
        alike > 0 && apart > 0,
        "both cases met: {alike} alike, {apart} apart"
    );
    assert!(!plain.layer(0).selects());
}

/// Only a Quest policy selects keys per head.
#[test]
fn only_quest_selects() {
    let quest = PagedKv::with_policy(
        WIDE,
        Arc::new(KvPolicy {
            quest: Some(QuestConfig {
                budget: 16,
                recent: 4,
                sinks: 2,
                dense_layers: 0,
            }),
            ..KvPolicy::default()
        }),
    );
    assert!(quest.layer(0).selects());
}
