//! Masked grouped-query attention: the tensor-op reference, and the row-wise fused CPU
//! kernel beside it ([`attention_rows`], batch-invariant).
//!
//! One function covers plain causal decoding, chunked prefill and tree attention: the mask alone
//! says which keys each query may see. GQA is handled by folding the query heads that share a
//! KV head into the query-row dimension, so K and V are never repeated in memory
//! (GQA, arXiv 2305.13245).

mod rows;

pub use rows::{
    AttentionDims, KvSource, attention_rows, attention_rows_voting, attention_rows_with,
};

use burn::tensor::{Bool, Tensor, activation::softmax, backend::Backend};

/// Scaled dot-product attention with an explicit boolean mask.
///
/// Query head `h` reads KV head `h / (n_heads / n_kv_heads)`, as in Llama and Qwen2.
///
/// # Shapes
/// - `q`: `[batch, n_heads, n_q, head_dim]`
/// - `k`, `v`: `[batch, n_kv_heads, n_kv, head_dim]`
/// - `mask`: `[batch, n_q, n_kv]`, `true` where the query may attend to the key. Every row must
///   allow at least one key (a row with none yields NaN).
/// - returns `[batch, n_heads, n_q, head_dim]`
///
/// # Panics
/// If `n_heads` is not a multiple of `n_kv_heads` or the shapes disagree (internal invariant:
/// callers build these shapes from a validated model config).
pub fn attention_reference<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 3, Bool>,
) -> Tensor<B, 4> {
    let [batch, n_heads, n_q, head_dim] = q.dims();
    let [_, n_kv_heads, n_kv, _] = k.dims();
    assert!(
        n_heads % n_kv_heads == 0,
        "n_heads {n_heads} not a multiple of {n_kv_heads}"
    );
    let group = n_heads / n_kv_heads;
    let scale = (head_dim as f64).powf(-0.5);

    let q = q.reshape([batch, n_kv_heads, group * n_q, head_dim]);
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
    let scores = scores.reshape([batch, n_kv_heads, group, n_q, n_kv]);
    let blocked = mask
        .bool_not()
        .reshape([batch, 1, 1, n_q, n_kv])
        .expand([batch, n_kv_heads, group, n_q, n_kv]);
    let probs = softmax(scores.mask_fill(blocked, f32::NEG_INFINITY), 4);
    let probs = probs.reshape([batch, n_kv_heads, group * n_q, n_kv]);
    probs.matmul(v).reshape([batch, n_heads, n_q, head_dim])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    type B = Flex;

    /// Naive per-head loop with explicit repetition of K/V: a second, independent reference.
    fn naive(q: &[f32], k: &[f32], v: &[f32], mask: &[bool], dims: [usize; 5]) -> Vec<f32> {
        let [h, kvh, nq, nkv, d] = dims;
        let g = h / kvh;
        let mut out = vec![0.0; h * nq * d];
        for hi in 0..h {
            let kh = hi / g;
            for i in 0..nq {
                let qrow = &q[(hi * nq + i) * d..][..d];
                let mut s: Vec<f32> = (0..nkv)
                    .map(|j| {
                        if !mask[i * nkv + j] {
                            return f32::NEG_INFINITY;
                        }
                        let krow = &k[(kh * nkv + j) * d..][..d];
                        qrow.iter().zip(krow).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt()
                    })
                    .collect();
                let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = s
                    .iter_mut()
                    .map(|x| {
                        *x = (*x - m).exp();
                        *x
                    })
                    .sum();
                for j in 0..nkv {
                    let vrow = &v[(kh * nkv + j) * d..][..d];
                    for c in 0..d {
                        out[(hi * nq + i) * d + c] += s[j] / z * vrow[c];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn gqa_with_tree_mask_matches_naive_loop() {
        let dev = Default::default();
        let (h, kvh, nq, nkv, d) = (6, 2, 5, 9, 8);
        let q = Tensor::<B, 4>::random([1, h, nq, d], Distribution::Normal(0.0, 1.0), &dev);
        let k = Tensor::<B, 4>::random([1, kvh, nkv, d], Distribution::Normal(0.0, 1.0), &dev);
        let v = Tensor::<B, 4>::random([1, kvh, nkv, d], Distribution::Normal(0.0, 1.0), &dev);
        // 4 cached tokens, then a tree: 0 root; 1,2 children of 0; 3 child of 1; 4 child of 2.
        let parents = [None, Some(0), Some(0), Some(1), Some(2)];
        let mut mask = vec![false; nq * nkv];
        for i in 0..nq {
            for j in 0..4 {
                mask[i * nkv + j] = true;
            }
            let mut node = Some(i);
            while let Some(n) = node {
                mask[i * nkv + 4 + n] = true;
                node = parents[n];
            }
        }
        let mask_t =
            Tensor::<B, 3, Bool>::from_data(TensorData::new(mask.clone(), [1, nq, nkv]), &dev);
        let got = attention_reference(q.clone(), k.clone(), v.clone(), mask_t);
        let got = got.into_data().to_vec::<f32>().unwrap();
        let want = naive(
            &q.into_data().to_vec().unwrap(),
            &k.into_data().to_vec().unwrap(),
            &v.into_data().to_vec().unwrap(),
            &mask,
            [h, kvh, nq, nkv, d],
        );
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
