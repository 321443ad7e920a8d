//! SpecInfer multi-step speculative sampling, lossless for the way each child was drawn.

use arbor_model::sampling::sample_from;
use rand::Rng;

use crate::{TokenTree, Verified};
use arbor_speculators::DrawKind;

/// Stochastic verification (SpecInfer's multi-step speculative sampling, arXiv 2305.09781,
/// §4.3; Sequoia's correction for draws without replacement, arXiv 2402.12374).
///
/// `target(i)` is the target's distribution after node `i` under the request's sampling
/// filters (`SamplingParams::distribution` of that node's logits); it is only called for the
/// nodes the walk reaches. At node `u` with target distribution `p`, every proposal below `u`
/// is tried in order, and each of its draws `x` in draw order:
/// - accept `x` with probability `min(1, p(x) / q(x))`, then continue at `x`;
/// - on rejection `p ← norm(max(p − q, 0))`; for [`DrawKind::WithoutReplacement`] also
///   `q ← norm(q without x)`; a [`DrawKind::Deterministic`] draw has `q = δ(x)`, so it is
///   accepted with probability `p(x)` and a rejection removes `x` from `p`.
///
/// When every child is rejected (or `u` is a leaf) the bonus token is drawn from the final `p`.
/// The emitted tokens are then distributed exactly as the target's own samples.
pub fn verify_sampling(
    tree: &TokenTree,
    mut target: impl FnMut(usize) -> Vec<f32>,
    rng: &mut impl Rng,
) -> Verified {
    let nodes = tree.nodes();
    let mut node = 0;
    let mut accepted = Vec::new();
    let mut tokens = Vec::new();
    'walk: loop {
        let mut p: Vec<f64> = target(node).into_iter().map(f64::from).collect();
        for prop in tree.proposals_at(node) {
            let mut q: Option<Vec<f64>> = match prop.kind {
                DrawKind::Deterministic => None,
                _ => prop
                    .q
                    .as_ref()
                    .map(|q| q.iter().map(|&x| f64::from(x)).collect()),
            };
            for &child in &prop.draws {
                let x = nodes[child].token as usize;
                let px = p.get(x).copied().unwrap_or(0.0);
                let qx = q.as_ref().map_or(1.0, |q| q.get(x).copied().unwrap_or(0.0));
                if qx <= 0.0 {
                    // Not drawable from q: the tree builder refuses these; never accept.
                    continue;
                }
                if rng.random::<f64>() * qx < px {
                    accepted.push(child);
                    tokens.push(x as u32);
                    node = child;
                    continue 'walk;
                }
                match q.as_mut() {
                    None => {
                        if let Some(v) = p.get_mut(x) {
                            *v = 0.0;
                        }
                        normalize(&mut p);
                    }
                    Some(qv) => {
                        residual(&mut p, qv);
                        if prop.kind == DrawKind::WithoutReplacement {
                            qv[x] = 0.0;
                            normalize(qv);
                        }
                    }
                }
            }
        }
        tokens.push(sample_from(&p, rng) as u32);
        return Verified { accepted, tokens };
    }
}

/// `p ← norm(max(p − q, 0))`; leaves `p` alone if nothing would remain (only reachable by
/// rounding, since a rejection has probability 0 when `p ≤ q` everywhere).
fn residual(p: &mut [f64], q: &[f64]) {
    let r: Vec<f64> = p
        .iter()
        .enumerate()
        .map(|(i, &pi)| (pi - q.get(i).copied().unwrap_or(0.0)).max(0.0))
        .collect();
    if r.iter().sum::<f64>() > 0.0 {
        p.copy_from_slice(&r);
        normalize(p);
    }
}

fn normalize(v: &mut [f64]) {
    let z: f64 = v.iter().sum();
    if z > 0.0 {
        v.iter_mut().for_each(|x| *x /= z);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};
    use std::sync::Arc;

    #[test]
    fn deterministic_child_is_accepted_with_its_target_probability() {
        let mut t = TokenTree::new(0);
        t.push(0, 1, 0).unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        let n = 20_000;
        let mut hits = 0;
        let mut after_reject = [0usize; 3];
        for _ in 0..n {
            let v = verify_sampling(&t, |_| vec![0.2, 0.3, 0.5], &mut rng);
            if v.accepted.is_empty() {
                after_reject[v.tokens[0] as usize] += 1;
            } else {
                hits += 1;
            }
        }
        assert!((hits as f64 / n as f64 - 0.3).abs() < 0.015);
        assert_eq!(after_reject[1], 0, "a rejected token is removed from p");
    }

    #[test]
    fn equal_draft_and_target_always_accept() {
        let q: Arc<[f32]> = Arc::from(vec![0.25f32, 0.75]);
        let mut t = TokenTree::new(0);
        t.propose(0, 0, DrawKind::Iid, Some(q), &[(0, 0.25)])
            .unwrap();
        let mut rng = StdRng::seed_from_u64(4);
        for _ in 0..1000 {
            let v = verify_sampling(&t, |_| vec![0.25, 0.75], &mut rng);
            assert_eq!(v.accepted, vec![1]);
        }
    }
}
