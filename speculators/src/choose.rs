//! Picking children from a draft distribution: deterministic top-k, or k samples (i.i.d. or
//! without replacement). The [`DrawKind`] recorded with them decides how they are verified.

use rand::Rng;

use crate::DrawKind;

/// Indices of the `k` largest values, largest first (ties: lower index first).
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
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

/// Softmax at temperature 1 (draft confidence, used to score deterministic picks).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let z: f32 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= z);
    p
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
