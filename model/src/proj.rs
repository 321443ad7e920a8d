//! A linear projection `y = x·wᵀ + b` with a CPU fast path.
//!
//! On the CPU backend the weights are held by `arbor-kernels` — in their GGUF block format
//! when the checkpoint is quantized (`qmatmul`: int8 dot products, 4–8 bits per weight read
//! per step), else in packed f32/f16 panels (`matmul`) — and the product runs in its few-rows
//! kernels (weights streamed once for every row: decode and tree verification are bound by
//! that stream). On other backends it is burn's `Linear` over f32 weights.

use std::any::TypeId;
use std::sync::Arc;

use arbor_kernels::matmul::{PackedF16, PackedF32};
use arbor_kernels::qmatmul::QuantMatrix;
use arbor_kernels::quant::GgmlType;
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{Tensor, TensorData, backend::Backend};

use crate::error::{ModelError, Result};
use crate::gpu_blocks::GpuBlocks;
use crate::weights::MatrixData;

/// One projection.
#[derive(Module, Debug)]
pub struct Proj<B: Backend> {
    /// burn's layer (weights `[in, out]`) on backends without the fast path.
    linear: Option<Linear<B>>,
    /// Bias for the fast path.
    bias: Option<Param<Tensor<B, 1>>>,
    /// Packed weights for the CPU fast path (shared by clones, e.g. truncated self-drafts).
    #[module(skip)]
    packed: Option<Packed>,
    /// Block weights on the device (the CUDA backend's fast path).
    #[module(skip)]
    gpu: Option<GpuBlocks>,
}

/// Weights of the CPU fast path.
#[derive(Debug, Clone)]
enum Packed {
    F32(Arc<PackedF32>),
    F16(Arc<PackedF16>),
    Blocks(Arc<QuantMatrix>),
}

impl Packed {
    fn n(&self) -> usize {
        match self {
            Self::F32(p) => p.n(),
            Self::F16(p) => p.n(),
            Self::Blocks(p) => p.n(),
        }
    }

    /// `x · Wᵀ` (`m` rows) into a new `[m, n]` buffer: GGUF blocks' jobs fill their own
    /// share of it ([`matmul_blocks`]: no serial zeroing first); panels write a zeroed one.
    fn product(&self, x: &[f32], m: usize) -> std::result::Result<Vec<f32>, String> {
        let zeroed =
            |run: &dyn Fn(&mut [f32]) -> std::result::Result<(), arbor_kernels::KernelError>| {
                let mut y = vec![0.0f32; m * self.n()];
                run(&mut y).map(|()| y)
            };
        match self {
            Self::F32(p) => zeroed(&|y| p.matmul(x, m, y)),
            Self::F16(p) => zeroed(&|y| p.matmul(x, m, y)),
            Self::Blocks(q) => arbor_kernels::qmatmul::matmul_fused_new(&[&**q], x, m)
                .map(|mut ys| ys.pop().expect("one product")),
        }
        .map_err(|e| e.to_string())
    }

    fn bytes(&self) -> usize {
        match self {
            Self::F32(p) => p.bytes(),
            Self::F16(p) => p.bytes(),
            Self::Blocks(p) => p.bytes(),
        }
    }
}

/// Whether `B` is the CPU backend the fast path serves.
pub fn uses_fast_path<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<crate::device::Cpu>()
}

/// A bias of `out` values as a parameter.
fn bias_param<B: Backend>(
    bias: Option<Vec<f32>>,
    out: usize,
    device: &B::Device,
) -> Result<Option<Param<Tensor<B, 1>>>> {
    match bias {
        Some(b) if b.len() != out => Err(ModelError::Input(format!(
            "bias of {} values for {out} outputs",
            b.len()
        ))),
        b => {
            Ok(b.map(|b| Param::from_tensor(Tensor::from_data(TensorData::new(b, [out]), device))))
        }
    }
}

impl<B: Backend> Proj<B> {
    /// From weights stored `[out, in]` (row-major) and an optional bias of `out` values.
    ///
    /// # Errors
    /// [`ModelError::Input`] if the sizes disagree.
    pub fn new(
        w: &[f32],
        out: usize,
        inp: usize,
        bias: Option<Vec<f32>>,
        device: &B::Device,
    ) -> Result<Self> {
        let bias = bias_param(bias, out, device)?;
        if uses_fast_path::<B>() {
            let packed = PackedF32::from_out_in(w, out, inp)
                .map_err(|e| ModelError::Input(format!("packing weights: {e}")))?;
            return Ok(Self {
                linear: None,
                bias,
                packed: Some(Packed::F32(Arc::new(packed))),
                gpu: None,
            });
        }
        let t = crate::transformer::transpose(w, out, inp);
        let weight = Tensor::from_data(TensorData::new(t, [inp, out]), device);
        Ok(Self {
            linear: Some(Linear {
                weight: Param::from_tensor(weight),
                bias,
            }),
            bias: None,
            packed: None,
            gpu: None,
        })
    }

    /// From weights as a source holds them: GGUF blocks stay blocks on the CPU fast path
    /// (shared, so a tied output head and the embedding hold one copy); everything else goes
    /// through [`Proj::new`].
    ///
    /// # Errors
    /// As [`Proj::new`].
    pub fn from_matrix(
        w: MatrixData,
        out: usize,
        inp: usize,
        bias: Option<Vec<f32>>,
        device: &B::Device,
    ) -> Result<Self> {
        match w {
            MatrixData::Blocks(q) if uses_fast_path::<B>() || GpuBlocks::serves::<B>() => {
                Self::from_blocks(Arc::new(q), out, inp, bias, device)
            }
            w => Self::new(&w.into_f32(), out, inp, bias, device),
        }
    }

    /// From shared GGUF blocks: kept as blocks on the CPU fast path, uploaded as device blocks
    /// on the CUDA backend, elsewhere dequantized into a burn layer.
    ///
    /// # Errors
    /// [`ModelError::Input`] if the sizes disagree.
    pub fn from_blocks(
        q: Arc<QuantMatrix>,
        out: usize,
        inp: usize,
        bias: Option<Vec<f32>>,
        device: &B::Device,
    ) -> Result<Self> {
        if q.n() != out || q.k() != inp {
            return Err(ModelError::Input(format!(
                "blocks of [{}, {}] for a [{out}, {inp}] projection",
                q.n(),
                q.k()
            )));
        }
        #[cfg(feature = "cuda")]
        if GpuBlocks::serves::<B>() {
            return Ok(Self {
                linear: None,
                bias: bias_param(bias, out, device)?,
                packed: None,
                gpu: Some(GpuBlocks::upload::<B>(&q, device)?),
            });
        }
        if !uses_fast_path::<B>() {
            return Self::new(&q.dequantize(), out, inp, bias, device);
        }
        Ok(Self {
            linear: None,
            bias: bias_param(bias, out, device)?,
            packed: Some(Packed::Blocks(q)),
            gpu: None,
        })
    }

    /// Bytes of weights a forward reads (the fast path's storage, or burn's f32 layer).
    pub fn weight_bytes(&self) -> usize {
        match (&self.packed, &self.linear, &self.gpu) {
            (Some(p), _, _) => p.bytes(),
            (None, Some(l), _) => l.weight.val().shape().num_elements() * 4,
            (None, None, Some(g)) => g.bytes(),
            (None, None, None) => 0,
        }
    }

    /// The GGUF block format of the weights on the CPU fast path (`None` for float weights
    /// and other backends).
    pub fn block_type(&self) -> Option<GgmlType> {
        match &self.packed {
            Some(Packed::Blocks(q)) if self.gpu.is_none() => Some(q.ty()),
            _ => None,
        }
    }

    /// Weights (outputs × inputs): the multiply-adds of one row through the projection.
    pub fn weights(&self) -> usize {
        match (&self.packed, &self.linear, &self.gpu) {
            (Some(Packed::F32(p)), _, _) => p.n() * p.k(),
            (Some(Packed::F16(p)), _, _) => p.n() * p.k(),
            (Some(Packed::Blocks(q)), _, _) => q.n() * q.k(),
            (None, Some(l), _) => l.weight.val().shape().num_elements(),
            (None, None, Some(g)) => g.weights(),
            (None, None, None) => 0,
        }
    }

    /// The same projection with f16 weights on the CPU fast path (half the bytes per step)
    /// where it holds f32; block-quantized weights (already smaller) and other backends are
    /// unchanged.
    pub fn to_f16(&self) -> Self {
        Self {
            linear: self.linear.clone(),
            bias: self.bias.clone(),
            packed: self.packed.as_ref().map(|p| match p {
                Packed::F32(w) => Packed::F16(Arc::new(w.convert())),
                other => other.clone(),
            }),
            gpu: self.gpu.clone(),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, n, in]` → `[batch, n, out]`
    ///
    /// # Panics
    /// If `x` is not f32 (internal invariant: the model computes in f32).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        if let Some(g) = &self.gpu {
            return self.add_bias(g.forward(x));
        }
        if self.has_host_path() {
            let [batch, n, _] = x.dims();
            let device = x.device();
            let y = self
                .forward_host(&host_values(x), batch * n)
                .expect("the host path was checked");
            return rows_tensor(y, batch, n, &device);
        }
        self.linear
            .as_ref()
            .expect("a projection holds device blocks, packed weights or a burn layer")
            .forward(x)
    }

    /// The projection onto the first `rows` outputs (GGUF blocks on the CPU fast path only).
    ///
    /// # Errors
    /// [`ModelError::Input`] for other weights, or `rows` the blocks cannot be cut at (0,
    /// more than there are, or not a multiple of 8 where rows are interleaved).
    pub fn rows_prefix(&self, rows: usize) -> Result<Self> {
        let q = self.cpu_blocks("cutting a projection's outputs")?;
        let cut = q.rows_prefix(rows).ok_or_else(|| {
            ModelError::Input(format!(
                "cannot keep {rows} of {} outputs (a multiple of 8, at least 8)",
                q.n()
            ))
        })?;
        let bias = self
            .bias
            .as_ref()
            .map(|b| Param::from_tensor(b.val().narrow(0, 0, rows)));
        Ok(Self {
            linear: None,
            bias,
            packed: Some(Packed::Blocks(Arc::new(cut))),
            gpu: None,
        })
    }

    /// The projection with its GGUF block weights re-encoded as `ty`
    /// ([`QuantMatrix::requantized`]; lossy, for drafts).
    ///
    /// # Errors
    /// [`ModelError::Input`] unless the weights are GGUF blocks on the CPU; the kernel's error
    /// for a format it cannot encode.
    pub fn requantized(&self, ty: GgmlType) -> Result<Self> {
        let q = self.cpu_blocks("re-quantizing a projection")?;
        Ok(Self {
            linear: None,
            bias: self.bias.clone(),
            packed: Some(Packed::Blocks(Arc::new(q.requantized(ty).map_err(
                |e| ModelError::Input(format!("re-quantizing to {ty:?}: {e}")),
            )?))),
            gpu: None,
        })
    }

    /// The GGUF block weights `what` needs (an input error when the projection holds
    /// other weights).
    pub(crate) fn cpu_blocks(&self, what: &str) -> Result<&Arc<QuantMatrix>> {
        match &self.packed {
            Some(Packed::Blocks(q)) => Ok(q),
            _ => Err(ModelError::Input(format!(
                "{what} needs GGUF block weights on the CPU"
            ))),
        }
    }

    /// Outputs of [`Proj::forward_host`]'s rows (`None` off the CPU fast path).
    pub(crate) fn host_outputs(&self) -> Option<usize> {
        self.packed
            .as_ref()
            .filter(|_| self.gpu.is_none())
            .map(Packed::n)
    }

    /// Whether [`Proj::forward_host`] runs (the CPU fast path).
    pub fn has_host_path(&self) -> bool {
        self.host_outputs().is_some()
    }

    /// Host rows through the projection on the CPU fast path, bias added (`None` on other
    /// paths).
    ///
    /// # Panics
    /// If `x` is not whole rows of the projection's width (internal invariant).
    pub fn forward_host(&self, x: &[f32], rows: usize) -> Option<Vec<f32>> {
        let packed = self.packed.as_ref().filter(|_| self.gpu.is_none())?;
        let mut y = packed
            .product(x, rows)
            .unwrap_or_else(|e| panic!("projection of {rows} rows: {e}"));
        self.add_bias_host(&mut y);
        Some(y)
    }

    /// As [`Proj::forward_host`], each row its own vector. GGUF blocks write every row
    /// straight into its own buffer; other weights are cut out of one product.
    ///
    /// # Panics
    /// As [`Proj::forward_host`].
    pub fn forward_host_rows(&self, x: &[f32], rows: usize) -> Option<Vec<Vec<f32>>> {
        let packed = self.packed.as_ref().filter(|_| self.gpu.is_none())?;
        let Packed::Blocks(q) = packed else {
            let y = self.forward_host(x, rows)?;
            return Some(y.chunks(packed.n()).map(<[f32]>::to_vec).collect());
        };
        let mut ys = q
            .matmul_new_rows(x, rows)
            .unwrap_or_else(|e| panic!("projection of {rows} rows: {e}"));
        for y in &mut ys {
            self.add_bias_host(y);
        }
        Some(ys)
    }

    /// Adds the bias to every row of `y` (as the tensor add does, value by value).
    fn add_bias_host(&self, y: &mut [f32]) {
        if let Some(b) = &self.bias {
            let b = b
                .val()
                .into_data()
                .into_vec::<f32>()
                .expect("biases are f32");
            for row in y.chunks_exact_mut(b.len()) {
                for (v, &c) in row.iter_mut().zip(&b) {
                    *v += c;
                }
            }
        }
    }

    fn add_bias(&self, y: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.bias {
            Some(b) => {
                let out = y.dims()[2];
                y + b.val().reshape([1, 1, out])
            }
            None => y,
        }
    }
}

/// The same input through several projections (a layer's Q, K, V; its gate and up): one
/// activation quantization and one parallel pass when all hold GGUF blocks on the CPU fast
/// path ([`arbor_kernels::qmatmul::matmul_fused`], bit-identical to one product each), else
/// one [`Proj::forward`] each.
///
/// # Shapes
/// - `x`: `[batch, n, in]` → one `[batch, n, outᵢ]` per projection
///
/// # Panics
/// If `x` is not f32 (internal invariant: the model computes in f32).
pub fn forward_fused<B: Backend, const N: usize>(
    projs: [&Proj<B>; N],
    x: Tensor<B, 3>,
) -> [Tensor<B, 3>; N] {
    if !host_fusable(&projs) {
        return projs.map(|p| p.forward(x.clone()));
    }
    let [batch, n, _] = x.dims();
    let device = x.device();
    let mut ys = fused_host(&projs, &host_values(x), batch * n)
        .expect("checked above")
        .into_iter();
    projs.map(|_| {
        rows_tensor(
            ys.next().expect("one output per projection"),
            batch,
            n,
            &device,
        )
    })
}

/// Host rows (`x`: `rows` rows) through several projections at once, biases added: `Some`
/// when every projection holds GGUF blocks on the CPU fast path (one fused product,
/// [`forward_fused`]'s arithmetic), else `None`.
pub fn fused_host<B: Backend>(projs: &[&Proj<B>], x: &[f32], rows: usize) -> Option<Vec<Vec<f32>>> {
    let mats = blocks_of(projs)?;
    let mut ys = matmul_blocks(&mats, x, rows);
    for (p, y) in projs.iter().zip(&mut ys) {
        p.add_bias_host(y);
    }
    Some(ys)
}

/// Whether [`fused_host`] takes these projections.
pub fn host_fusable<B: Backend>(projs: &[&Proj<B>]) -> bool {
    blocks_of(projs).is_some()
}

/// The GGUF blocks of every projection, if all hold them on the CPU fast path.
fn blocks_of<'a, B: Backend>(projs: &[&'a Proj<B>]) -> Option<Vec<&'a QuantMatrix>> {
    projs
        .iter()
        .map(|p| match (&p.gpu, &p.packed) {
            (None, Some(Packed::Blocks(q))) => Some(&**q),
            _ => None,
        })
        .collect()
}

/// `x · Wᵢᵀ` for each matrix, `x` being `rows` host rows.
///
/// # Panics
/// If `x` does not hold `rows` rows of the matrices' width (internal invariant).
fn matmul_blocks(mats: &[&QuantMatrix], x: &[f32], rows: usize) -> Vec<Vec<f32>> {
    arbor_kernels::qmatmul::matmul_fused_new(mats, x, rows)
        .unwrap_or_else(|e| panic!("projections of {} values per row: {e}", x.len() / rows))
}

/// A gated MLP `down(silu(gate(x)) · up(x))` kept on the host between its products when all
/// three projections are on the CPU fast path, gate and up holding GGUF blocks (fused, the
/// gating vectorized: [`arbor_kernels::act::silu_mul`]); `None` otherwise.
///
/// # Shapes
/// - `x`: `[batch, n, hidden]` → `[batch, n, hidden]`
///
/// # Panics
/// If `x` is not f32 (internal invariant: the model computes in f32).
pub fn gated_mlp_host<B: Backend>(
    gate: &Proj<B>,
    up: &Proj<B>,
    down: &Proj<B>,
    x: &Tensor<B, 3>,
) -> Option<Tensor<B, 3>> {
    if !gated_mlp_ready(gate, up, down) {
        return None;
    }
    let [batch, n, _] = x.dims();
    let y = gated_mlp_rows(gate, up, down, &host_values(x.clone()), batch * n)?;
    Some(rows_tensor(y, batch, n, &x.device()))
}

/// Whether [`gated_mlp_rows`] runs for these projections.
pub fn gated_mlp_ready<B: Backend>(gate: &Proj<B>, up: &Proj<B>, down: &Proj<B>) -> bool {
    host_fusable(&[gate, up]) && down.has_host_path()
}

/// [`gated_mlp_host`] on `rows` host rows `x` (`[rows][hidden]`), or `None` where the
/// projections have no host path.
pub fn gated_mlp_rows<B: Backend>(
    gate: &Proj<B>,
    up: &Proj<B>,
    down: &Proj<B>,
    x: &[f32],
    rows: usize,
) -> Option<Vec<f32>> {
    if !gated_mlp_ready(gate, up, down) {
        return None;
    }
    let [mut g, u]: [Vec<f32>; 2] = fused_host(&[gate, up], x, rows)?
        .try_into()
        .expect("two products");
    arbor_kernels::act::silu_mul(&mut g, &u);
    down.forward_host(&g, rows)
}

/// Host rows `[batch · n][out]` as a tensor `[batch, n, out]`.
pub(crate) fn rows_tensor<B: Backend>(
    y: Vec<f32>,
    batch: usize,
    n: usize,
    device: &B::Device,
) -> Tensor<B, 3> {
    let out = y.len() / (batch * n).max(1);
    Tensor::from_data(TensorData::new(y, [batch, n, out]), device)
}

/// A tensor's values on the host, row-major.
///
/// # Panics
/// If `x` is not f32 (internal invariant: the model computes in f32).
pub(crate) fn host_values<B: Backend, const D: usize>(x: Tensor<B, D>) -> Vec<f32> {
    x.into_data()
        .into_vec::<f32>()
        .expect("activations are f32")
}
