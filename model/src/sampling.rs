//! Turning logits into a next token: temperature, top-k, top-p, min-p, seeded randomness.
//!
//! [`SamplingParams::distribution`] gives the exact distribution a token is drawn from; the
//! speculative verifier uses the same function, so speculative sampling reproduces it.

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// How to pick each token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose mass reaches `top_p` (1: off).
    pub top_p: f32,
    /// Drop tokens with probability below `min_p` × the top probability (0: off).
    pub min_p: f32,
    /// Seed for reproducible sampling; `None` draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Whether this is argmax decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks ranges.
    ///
    /// # Errors
    /// [`ModelError::Input`] for a negative or non-finite temperature, `top_p` outside (0, 1],
    /// `min_p` outside [0, 1].
    pub fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(ModelError::Input(s));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!(
                "temperature {} must be finite and ≥ 0",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p {} must be in [0, 1]", self.min_p));
        }
        Ok(())
    }

    /// The probability of every token after temperature, top-k, top-p and min-p
    /// (zeros for removed tokens; sums to 1). Greedy gives a one-hot vector.
    pub fn distribution(&self, logits: &[f32]) -> Vec<f32> {
        let mut p = vec![0.0f32; logits.len()];
        if self.is_greedy() {
            p[argmax(logits)] = 1.0;
            return p;
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if self.top_k > 0 {
            order.truncate(self.top_k);
        }
        let inv_t = 1.0 / f64::from(self.temperature);
        let max = f64::from(logits[order[0]]);
        let mut w: Vec<f64> = order
            .iter()
            .map(|&i| ((f64::from(logits[i]) - max) * inv_t).exp())
            .collect();
        let z: f64 = w.iter().sum();
        w.iter_mut().for_each(|x| *x /= z);
        let mut keep = w.len();
        if self.top_p < 1.0 {
            let mut mass = 0.0;
            for (i, x) in w.iter().enumerate() {
                mass += x;
                if mass >= f64::from(self.top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        if self.min_p > 0.0 {
            let floor = f64::from(self.min_p) * w[0];
            keep = keep.min(w.iter().take_while(|&&x| x >= floor).count().max(1));
        }
        let z: f64 = w[..keep].iter().sum();
        for (&i, x) in order[..keep].iter().zip(&w) {
            p[i] = (x / z) as f32;
        }
        p
    }
}

/// Index of the largest logit (the first one on ties; NaNs are never picked unless first).
///
/// The largest value is found in eight lanes (one `vmaxps` per eight logits: a scan with a
/// branch per value had cost ~0.1 ms over a 152k vocabulary, per decoded token and per tree
/// node verified), then the first index holding it.
pub fn argmax(logits: &[f32]) -> usize {
    let Some(&first) = logits.first() else {
        return 0;
    };
    let mut lanes = [first; 8];
    let (chunks, rest) = logits.as_chunks::<8>();
    for c in chunks {
        for l in 0..8 {
            if c[l] > lanes[l] {
                lanes[l] = c[l];
            }
        }
    }
    let top = lanes
        .iter()
        .chain(rest)
        .fold(first, |m, &x| if x > m { x } else { m });
    logits.iter().position(|&x| x == top).unwrap_or(0)
}

/// Draws tokens with a seeded generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler for `params` (seeded from `params.seed` or the OS).
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The generator (the verifier draws its acceptance tests from it).
    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    /// Picks the next token from `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits) as u32;
        }
        sample_from(&self.params.distribution(logits), &mut self.rng) as u32
    }
}

/// Draws an index with probability proportional to `p` (non-negative weights, f32 or f64;
/// accumulated in f64, so rounding in a normalized `p` cannot skew the last entries).
pub fn sample_from<T: Copy + Into<f64>>(p: &[T], rng: &mut impl Rng) -> usize {
    let total: f64 = p.iter().map(|&x| x.into()).filter(|&x| x > 0.0).sum();
    let u = rng.random::<f64>() * total;
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &x) in p.iter().enumerate() {
        let x: f64 = x.into();
        if x > 0.0 {
            acc += x;
            last = i;
            if u < acc {
                return i;
            }
        }
    }
    last
}

#[cfg(test)]
mod tests {
    #[test]
    fn argmax_is_the_first_largest_as_a_scan_finds_it() {
        let scan = |v: &[f32]| {
            let mut best = 0;
            for (i, &x) in v.iter().enumerate() {
                if x > v[best] {
                    best = i;
                }
            }
            best
        };
        let mut v: Vec<f32> = (0..1003)
            .map(|i| ((i * 7919) % 499) as f32 - 300.0)
            .collect();
        let cases: Vec<Vec<f32>> = vec![
            v.clone(),
            {
                v[600] = 1e9;
                v[900] = 1e9;
                v.clone()
            },
            {
                v[3] = f32::NAN;
                v[1001] = 2e9;
                v.clone()
            },
            [f32::NAN, 1.0, 5.0].to_vec(),
            [-0.0, -1.0, 0.0, -0.0].to_vec(),
            vec![f32::NEG_INFINITY; 20],
            vec![3.0],
            Vec::new(),
        ];
        for c in cases {
            assert_eq!(super::argmax(&c), scan(&c), "{:?}", &c[..c.len().min(5)]);
        }
    }

    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            seed: Some(1),
        }
    }

    #[test]
    fn filters_compose_as_documented() {
        let logits = [2.0f32, 1.0, 0.0, -1.0, 3.0];
        let p = params(1.0, 0, 1.0, 0.0).distribution(&logits);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[4] > p[0] && p[0] > p[1]);
        let p = params(1.0, 2, 1.0, 0.0).distribution(&logits);
        assert_eq!(p.iter().filter(|&&x| x > 0.0).count(), 2);
        assert!(p[4] > 0.0 && p[0] > 0.0);
        // softmax: 0.636, 0.234, 0.086, ... top_p 0.8 keeps the first two.
        let p = params(1.0, 0, 0.8, 0.0).distribution(&logits);
        assert_eq!(p.iter().filter(|&&x| x > 0.0).count(), 2);
        // min_p 0.3 keeps tokens with p ≥ 0.3·0.636.
        let p = params(1.0, 0, 1.0, 0.3).distribution(&logits);
        assert_eq!(p.iter().filter(|&&x| x > 0.0).count(), 2);
        let g = SamplingParams::greedy().distribution(&logits);
        assert_eq!(g, vec![0.0, 0.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn low_temperature_sharpens() {
        let logits = [1.0f32, 0.5];
        let hot = params(2.0, 0, 1.0, 0.0).distribution(&logits);
        let cold = params(0.1, 0, 1.0, 0.0).distribution(&logits);
        assert!(cold[0] > 0.99 && hot[0] < 0.6);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(seed),
                ..params(1.0, 0, 1.0, 0.0)
            });
            (0..4000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let ones = draw(7).iter().filter(|&&t| t == 1).count() as f64 / 4000.0;
        // σ = sqrt(.75·.25/4000) ≈ 0.0068; 5σ bound.
        assert!((ones - 0.75).abs() < 0.035, "{ones}");
    }

    #[test]
    fn invalid_params_are_rejected() {
        assert!(params(-1.0, 0, 1.0, 0.0).validate().is_err());
        assert!(params(1.0, 0, 1.5, 0.0).validate().is_err());
        assert!(params(1.0, 0, 0.0, 0.0).validate().is_err());
        assert!(params(f32::NAN, 0, 1.0, 0.0).validate().is_err());
        assert!(params(0.7, 40, 0.9, 0.05).validate().is_ok());
    }
}
