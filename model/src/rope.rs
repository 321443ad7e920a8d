//! Rotary position embedding (RoFormer, arXiv 2104.09864) with explicit per-token positions.
//!
//! Positions are arbitrary, not a contiguous range: tree nodes at the same depth share one.
//! Pairs are rotated in the "half-split" layout (channel `i` with `i + head_dim/2`), as in HF
//! Llama and Qwen2; GGUF Llama checkpoints, whose q/k rows are interleaved, are permuted into
//! this layout when loaded.

use burn::tensor::{Tensor, TensorData, backend::Backend};

/// Cosines and sines for a batch of positions.
///
/// # Shapes
/// - `cos`, `sin`: `[batch, 1, n, head_dim / 2]`
#[derive(Debug, Clone)]
pub struct RopeAngles<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    /// The same angles on the host, `[batch · n][head_dim / 2]` (the CPU fast path).
    cos_host: Vec<f32>,
    sin_host: Vec<f32>,
}

impl<B: Backend> RopeAngles<B> {
    /// Angles for `positions` (`batch * n` of them, row-major).
    pub fn new(
        positions: &[usize],
        batch: usize,
        head_dim: usize,
        theta: f64,
        device: &B::Device,
    ) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| theta.powf(-2.0 * i as f64 / head_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let shape = [batch, 1, positions.len() / batch.max(1), half];
        Self {
            cos: Tensor::from_data(TensorData::new(cos.clone(), shape), device),
            sin: Tensor::from_data(TensorData::new(sin.clone(), shape), device),
            cos_host: cos,
            sin_host: sin,
        }
    }

    /// Rotates host rows in place, bit for bit as [`RopeAngles::apply`] does.
    ///
    /// # Shapes
    /// - `x`: `[tokens][heads][head_dim]` (token-major, the projections' output layout), the
    ///   tokens being those the angles were made for, from `first` on
    ///
    /// # Panics
    /// If `x` holds more tokens than the angles from `first` (internal invariant).
    pub fn apply_host(&self, x: &mut [f32], first: usize, heads: usize, head_dim: usize) {
        let half = head_dim / 2;
        for (t, token) in x.chunks_exact_mut(heads * head_dim).enumerate() {
            let at = (first + t) * half;
            let (c, s) = (&self.cos_host[at..at + half], &self.sin_host[at..at + half]);
            for head in token.chunks_exact_mut(head_dim) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * c[i] - b * s[i];
                    x2[i] = b * c[i] + a * s[i];
                }
            }
        }
    }

    /// Rotates `x`.
    ///
    /// # Shapes
    /// - `x`: `[batch, heads, n, head_dim]` → same
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        if let Some(y) = crate::device_ops::rope(&x, &self.cos, &self.sin) {
            return y;
        }
        let [_, _, _, d] = x.dims();
        let half = d / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.narrow(3, half, half);
        let (c, s) = (self.cos.clone(), self.sin.clone());
        Tensor::cat(
            vec![
                x1.clone() * c.clone() - x2.clone() * s.clone(),
                x2 * c + x1 * s,
            ],
            3,
        )
    }
}

/// Row permutation that turns GGUF Llama's interleaved q/k rows (pairs `2i, 2i+1`) into the
/// half-split layout (pairs `i, i + head_dim/2`): new row `j*half + i` of each head takes old row
/// `2i + j`. Returns, for each new row, the old row index.
pub fn interleaved_to_half_split(n_heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut perm = Vec::with_capacity(n_heads * head_dim);
    for h in 0..n_heads {
        for j in 0..2 {
            for i in 0..half {
                perm.push(h * head_dim + 2 * i + j);
            }
        }
    }
    perm
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn host_rotation_is_bitwise_the_tensor_rotation() {
        let dev = Default::default();
        let (heads, d, n) = (3, 8, 4);
        let vals: Vec<f32> = (0..n * heads * d)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let angles = RopeAngles::<Flex>::new(&[5, 9, 9, 200], 1, d, 1e6, &dev);
        // Tensor path: [1, heads, n, d] from the token-major rows.
        let t =
            Tensor::<Flex, 3>::from_data(TensorData::new(vals.clone(), [1, n, heads * d]), &dev)
                .reshape([1, n, heads, d])
                .swap_dims(1, 2);
        let want = angles
            .apply(t)
            .swap_dims(1, 2)
            .reshape([1, n, heads * d])
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let mut got = vals;
        angles.apply_host(&mut got[heads * d..], 1, heads, d);
        angles.apply_host(&mut got[..heads * d], 0, heads, d);
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn rotation_preserves_norm_and_relative_position() {
        let dev = Default::default();
        let (d, theta) = (8, 10_000.0);
        let q = Tensor::<Flex, 4>::from_data(
            TensorData::new(
                (0..8).map(|i| i as f32 * 0.3 - 1.0).collect::<Vec<_>>(),
                [1, 1, 1, d],
            ),
            &dev,
        );
        let k = Tensor::<Flex, 4>::from_data(
            TensorData::new(
                (0..8).map(|i| (i as f32).sin()).collect::<Vec<_>>(),
                [1, 1, 1, d],
            ),
            &dev,
        );
        let dot = |pq: usize, pk: usize| {
            let rq = RopeAngles::<Flex>::new(&[pq], 1, d, theta, &dev).apply(q.clone());
            let rk = RopeAngles::<Flex>::new(&[pk], 1, d, theta, &dev).apply(k.clone());
            (rq * rk).sum().into_scalar()
        };
        // q·k after rotation depends only on the distance between positions.
        assert!((dot(7, 3) - dot(104, 100)).abs() < 1e-4);
        assert!((dot(7, 3) - dot(3, 7)).abs() > 1e-3);
        let r = RopeAngles::<Flex>::new(&[5], 1, d, theta, &dev).apply(q.clone());
        let n0 = q.square().sum().into_scalar();
        let n1 = r.square().sum().into_scalar();
        assert!((n0 - n1).abs() < 1e-4);
    }

    #[test]
    fn interleaved_permutation_is_a_bijection_per_head() {
        let p = interleaved_to_half_split(2, 6);
        assert_eq!(&p[..6], &[0, 2, 4, 1, 3, 5]);
        assert_eq!(&p[6..], &[6, 8, 10, 7, 9, 11]);
    }
}
