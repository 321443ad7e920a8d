//! Picking children from a draft distribution: deterministic top-k, or k samples (i.i.d. or
//! without replacement). The [`DrawKind`] recorded with them decides how they are verified.

use rand::Rng;

use crate::DrawKind;

/// Indices of the `k` largest values, largest first (ties: lower index first), in
/// [`f32::total_cmp`]'s order.
///
/// A few picks from a vocabulary (a tree level's children: `k` up to [`FEW`]) take one pass
/// that keeps the best `k` and skips each run of 16 values whose largest cannot enter them
/// (~0.5 ms → tens of µs over 152k logits); more take a selection over every index.
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    if k <= FEW {
        return top_few(values, k);
    }
    let cmp = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..values.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    idx
}

/// Most picks [`top_k`] keeps in one pass.
pub const FEW: usize = 16;

/// `v`'s rank in [`f32::total_cmp`]'s order as an integer (what `total_cmp` compares).
#[inline(always)]
fn order_key(v: f32) -> i32 {
    let bits = v.to_bits() as i32;
    bits ^ ((((bits >> 31) as u32) >> 1) as i32)
}

/// [`top_k`] for `1 ≤ k ≤ FEW`: one pass in index order keeping the best `k` as (key, index),
/// best first. A value equal to the `k`-th best never displaces it (its index is higher), so
/// runs whose largest key is not above the `k`-th's are skipped whole.
fn top_few(values: &[f32], k: usize) -> Vec<usize> {
    let mut best: Vec<(i32, usize)> = Vec::with_capacity(k + 1);
    let mut floor = i32::MIN;
    for (c, run) in values.chunks(16).enumerate() {
        let top = run.iter().fold(i32::MIN, |m, &v| m.max(order_key(v)));
        if best.len() == k && top <= floor {
            continue;
        }
        for (j, &v) in run.iter().enumerate() {
            let key = order_key(v);
            if best.len() == k && key <= floor {
                continue;
            }
            // After every kept key at least as large (equal keys keep index order).
            let at = best.partition_point(|&(b, _)| b >= key);
            best.insert(at, (key, 16 * c + j));
            best.truncate(k);
            if best.len() == k {
                floor = best[k - 1].0;
            }
        }
    }
    best.into_iter().map(|(_, i)| i).collect()
}

/// The `k` largest logits' ids ([`top_k`]'s order) with their softmax probabilities at
/// temperature 1 (draft confidence, used to score deterministic picks): the normalizer comes
/// from one vectorized pass ([`arbor_kernels::act::sum_exp`]), no distribution is built.
/// Probabilities are 0 when every logit is `−∞`.
pub fn top_k_probs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let ids = top_k(logits, k);
    let Some(&first) = ids.first() else {
        return Vec::new();
    };
    let max = logits[first];
    if max == f32::NEG_INFINITY {
        return ids.into_iter().map(|i| (i as u32, 0.0)).collect();
    }
    let z = arbor_kernels::act::sum_exp(logits, max);
    ids.into_iter()
        .map(|i| (i as u32, (logits[i] - max).exp() / z))
        .collect()
}

/// Draws `k` tokens from the normalized distribution `q` as `kind` says and returns each with
/// its probability under `q`. Without replacement stops early when `q`'s support runs out.
///
/// # Panics
/// For [`DrawKind::Deterministic`] (use [`top_k`]) — an internal invariant of the drafts.
pub fn sample(q: &[f32], k: usize, kind: DrawKind, rng: &mut impl Rng) -> Vec<(u32, f32)> {
    assert!(
        kind != DrawKind::Deterministic,
        "deterministic picks use top_k"
    );
    let support: Vec<usize> = (0..q.len()).filter(|&i| q[i] > 0.0).collect();
    let mut left: Vec<f64> = support.iter().map(|&i| f64::from(q[i])).collect();
    let mut out = Vec::with_capacity(k);
    for _ in 0..k {
        let total: f64 = left.iter().sum();
        if total <= 0.0 {
            break;
        }
        let u = rng.random::<f64>() * total;
        let mut acc = 0.0;
        let mut pick = None;
        for (j, &w) in left.iter().enumerate() {
            if w > 0.0 {
                acc += w;
                pick = Some(j);
                if u < acc {
                    break;
                }
            }
        }
        let j = pick.expect("positive total has a positive entry");
        out.push((support[j] as u32, q[support[j]]));
        if kind == DrawKind::WithoutReplacement {
            left[j] = 0.0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn one_pass_top_k_equals_the_full_selection() {
        // Ties, signed zeros, infinities and runs of equal values across the 16-value runs.
        let mut v: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919) % 613) as f32 / 7.0 - 40.0)
            .collect();
        v[17] = f32::INFINITY;
        v[40] = -0.0;
        v[41] = 0.0;
        v[100..140].fill(87.5);
        v[4999] = f32::NEG_INFINITY;
        let full = |v: &[f32], k: usize| {
            let mut idx: Vec<usize> = (0..v.len()).collect();
            idx.sort_by(|a, b| v[*b].total_cmp(&v[*a]).then(a.cmp(b)));
            idx.truncate(k);
            idx
        };
        for k in [1, 2, 3, 8, FEW, FEW + 1, 40] {
            assert_eq!(top_k(&v, k), full(&v, k), "k = {k}");
            let neg: Vec<f32> = v.iter().map(|x| -x).collect();
            assert_eq!(top_k(&neg, k), full(&neg, k), "k = {k}, negated");
        }
        let all_inf = vec![f32::NEG_INFINITY; 37];
        assert_eq!(top_k(&all_inf, 3), vec![0, 1, 2]);
    }

    #[test]
    fn top_k_probs_are_the_softmax_of_the_picks() {
        let logits: Vec<f32> = (0..3000)
            .map(|i| {
                if i % 3 == 0 {
                    f32::NEG_INFINITY
                } else {
                    ((i * 31) % 97) as f32 / 9.0
                }
            })
            .collect();
        let max = f64::from(logits.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let z: f64 = logits.iter().map(|&x| (f64::from(x) - max).exp()).sum();
        let p: Vec<f64> = logits
            .iter()
            .map(|&x| (f64::from(x) - max).exp() / z)
            .collect();
        let picks = top_k_probs(&logits, 4);
        assert_eq!(
            picks.iter().map(|&(i, _)| i as usize).collect::<Vec<_>>(),
            top_k(&logits, 4)
        );
        for (i, q) in picks {
            let want = p[i as usize];
            assert!((f64::from(q) - want).abs() <= 1e-6 * want, "{q} vs {want}");
        }
        assert!(
            top_k_probs(&[f32::NEG_INFINITY; 4], 2)
                .iter()
                .all(|&(_, q)| q == 0.0)
        );
    }

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        assert_eq!(top_k(&[0.1, 0.5, 0.5, 0.2], 3), vec![1, 2, 3]);
        assert_eq!(top_k(&[1.0], 4), vec![0]);
    }

    #[test]
    fn without_replacement_is_distinct_and_follows_q() {
        let q = [0.5f32, 0.3, 0.2, 0.0];
        let mut rng = StdRng::seed_from_u64(1);
        let mut first = [0usize; 4];
        for _ in 0..20_000 {
            let d = sample(&q, 5, DrawKind::WithoutReplacement, &mut rng);
            assert_eq!(d.len(), 3, "stops when the support is used up");
            let mut t: Vec<u32> = d.iter().map(|x| x.0).collect();
            first[t[0] as usize] += 1;
            t.sort_unstable();
            assert_eq!(t, vec![0, 1, 2]);
        }
        assert!((first[0] as f64 / 20_000.0 - 0.5).abs() < 0.02);
        let iid = sample(&q, 6, DrawKind::Iid, &mut rng);
        assert_eq!(iid.len(), 6);
    }
}
