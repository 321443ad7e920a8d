//! Where a model's parameters come from: a checkpoint or a random generator.
//!
//! Parameters are named as in GGUF (`token_embd.weight`, `blk.{i}.attn_q.weight`, …) and
//! shaped row-major as in PyTorch (`[out_features, in_features]` for projections). Each
//! checkpoint format maps its own names and layouts onto these.

use arbor_kernels::qmatmul::QuantMatrix;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::error::Result;

/// A projection's weights `[out, in]`, as the source holds them.
#[derive(Debug)]
pub enum MatrixData {
    /// Row-major f32.
    F32(Vec<f32>),
    /// GGUF blocks, kept quantized (the CPU fast path multiplies them as they are).
    Blocks(QuantMatrix),
}

impl MatrixData {
    /// The weights as row-major f32 (dequantizing blocks).
    pub fn into_f32(self) -> Vec<f32> {
        match self {
            Self::F32(w) => w,
            Self::Blocks(q) => q.dequantize(),
        }
    }
}

/// A source of named f32 parameters.
pub trait WeightSource {
    /// The parameter `name` as row-major f32 data of exactly `shape`.
    ///
    /// # Errors
    /// [`crate::ModelError::MissingTensor`], [`crate::ModelError::ShapeMismatch`], or a
    /// decoding error.
    fn load(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;

    /// Whether the source has `name` (used for optional tensors such as `output.weight`).
    fn contains(&self, name: &str) -> bool;

    /// The matrix `name` of shape `[out, inp]`, kept in its stored block format where the
    /// source has one (GGUF), else as f32.
    ///
    /// # Errors
    /// As [`WeightSource::load`].
    fn load_matrix(&mut self, name: &str, out: usize, inp: usize) -> Result<MatrixData> {
        self.load(name, &[out, inp]).map(MatrixData::F32)
    }
}

/// Random parameters for tests: normal(0, `std`) for matrices, 1 + normal(0, `std`) for norm
/// gains, small normal biases. Deterministic for a seed.
#[derive(Debug)]
pub struct RandomWeights {
    rng: StdRng,
    std: f32,
}

impl RandomWeights {
    /// A seeded generator with standard deviation `std`.
    pub fn new(seed: u64, std: f32) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            std,
        }
    }
}

impl WeightSource for RandomWeights {
    fn load(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let n: usize = shape.iter().product();
        let offset = if name.contains("norm") { 1.0 } else { 0.0 };
        Ok((0..n)
            .map(|_| offset + self.std * normal(&mut self.rng))
            .collect())
    }

    fn contains(&self, name: &str) -> bool {
        // A random model has every optional tensor except a separate output head.
        name != "output.weight"
    }
}

/// A standard normal sample (Box–Muller).
fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// Checks that `actual` equals `expected`, naming the tensor otherwise.
///
/// # Errors
/// [`crate::ModelError::ShapeMismatch`].
pub fn check_shape(name: &str, expected: &[usize], actual: &[usize]) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(crate::ModelError::ShapeMismatch {
            name: name.to_string(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        })
    }
}
