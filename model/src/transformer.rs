//! The Llama-family decoder, generic over the burn backend.
//!
//! One model serves every architecture in [`Architecture`](crate::Architecture): differences
//! are config fields (q/k/v biases, tied head, RoPE base, GQA ratio). Its forward takes new
//! tokens with explicit positions and an explicit mask over cached + new tokens, so plain
//! causal decoding, chunked prefill and tree verification are all the same call.

use arbor_cache::{KvCache, KvLayout, KvPolicy, PagedKv};
use arbor_kernels::attention::{
    AttentionDims, attention_reference, attention_rows_voting, attention_rows_with,
};
use arbor_kernels::quant::GgmlType;
use burn::module::{Module, Param};
use std::sync::Arc;

use burn::nn::RmsNorm;
use burn::tensor::{Bool, Int, Tensor, TensorData, backend::Backend};

use crate::coarse_head::CoarseHead;
use crate::config::ModelConfig;
use crate::device_kv;
use crate::device_ops::{rms_norm, silu_mul};
use crate::embed::Embed;
use crate::error::{ModelError, Result};
use crate::input::ForwardInput;
use crate::proj::{
    Proj, forward_fused, gated_mlp_host, gated_mlp_ready, gated_mlp_rows, host_values,
    uses_fast_path,
};
use crate::rope::RopeAngles;
use crate::weights::{MatrixData, WeightSource};

/// Self-attention with GQA and optional q/k/v biases.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    wq: Proj<B>,
    wk: Proj<B>,
    wv: Proj<B>,
    wo: Proj<B>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

/// SwiGLU feed-forward.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    gate: Proj<B>,
    up: Proj<B>,
    down: Proj<B>,
}

/// One pre-norm decoder block.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    attn_norm: RmsNorm<B>,
    attn: Attention<B>,
    ffn_norm: RmsNorm<B>,
    mlp: Mlp<B>,
}

/// The whole decoder: embedding, layers, final norm and output head.
#[derive(Module, Debug)]
pub struct Transformer<B: Backend> {
    embed: Embed<B>,
    layers: Vec<DecoderLayer<B>>,
    norm: RmsNorm<B>,
    lm_head: Proj<B>,
    /// A two-pass output head for drafts ([`Transformer::with_coarse_head`]), holding the
    /// head it was fitted to: every change to `lm_head` drops it.
    #[module(skip)]
    coarse_head: Option<Arc<CoarseHead>>,
    vocab_size: usize,
    head_dim: usize,
    max_position: usize,
    rope_theta: f64,
}

/// Tokens per KV page of the CPU backend's paged cache.
pub const KV_PAGE_SIZE: usize = 16;

/// Which logits rows a sequence of a [`Transformer::forward_batch`] wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// None (a prefill chunk that is not the prompt's last).
    None,
    /// The last new token's (the end of a prompt, a plain decode step).
    Last,
    /// Every new token's (tree verification).
    All,
}

/// One sequence of a batched forward: its new tokens (`batch == 1`) and its own cache.
#[derive(Debug)]
pub struct SeqForward<'a, B: Backend> {
    /// New tokens, positions and mask over this sequence's cached + new tokens.
    pub input: &'a ForwardInput,
    /// This sequence's cache; the new tokens' keys and values are appended to it.
    pub cache: &'a mut KvCache<B>,
    /// Which logits to return.
    pub logits: LogitRows,
}

/// A run of consecutive rows of a batched forward that belong to one sequence.
struct Segment<'a, B: Backend> {
    len: usize,
    /// The mask on the device (dense caches: tensor-op attention) and on the host (paged caches:
    /// the fused kernel).
    mask: Option<Tensor<B, 3, Bool>>,
    mask_host: &'a [bool],
    /// The rows' positions (a compressed cache reads keys by query position).
    positions: &'a [usize],
    /// The rows as a tree (device caches: the CubeCL attention takes parent pointers).
    parents: Option<Vec<i32>>,
    cache: &'a mut KvCache<B>,
}

/// Builds parameters from a [`WeightSource`] on one device.
struct Builder<'a, B: Backend> {
    src: &'a mut dyn WeightSource,
    device: &'a B::Device,
}

impl<B: Backend> Builder<'_, B> {
    fn tensor<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Result<Tensor<B, D>> {
        let data = self.src.load(name, &shape)?;
        Ok(Tensor::from_data(TensorData::new(data, shape), self.device))
    }

    /// A projection stored `[out, in]` (kept in its block format where the source has one).
    fn linear(&mut self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Proj<B>> {
        let w = self.src.load_matrix(&format!("{name}.weight"), out, inp)?;
        let bias = match bias {
            true => Some(self.src.load(&format!("{name}.bias"), &[out])?),
            false => None,
        };
        Proj::from_matrix(w, out, inp, bias, self.device)
    }

    /// The token embedding and the output head (tied to the embedding when the config says
    /// so or the source has no separate head; a tied quantized table is held once).
    fn embedding_and_head(&mut self, c: &ModelConfig) -> Result<(Embed<B>, Proj<B>)> {
        let (v, d) = (c.vocab_size, c.hidden_size);
        let table = self.src.load_matrix("token_embd.weight", v, d)?;
        if !c.tie_embeddings && self.src.contains("output.weight") {
            let head = self.linear("output", v, d, false)?;
            return Ok((Embed::new(table, v, d, self.device), head));
        }
        Ok(match table {
            MatrixData::Blocks(q) if uses_fast_path::<B>() => {
                let q = Arc::new(q);
                let head = Proj::from_blocks(q.clone(), v, d, None, self.device)?;
                (Embed::from_blocks(q), head)
            }
            table => {
                let w = table.into_f32();
                let head = Proj::new(&w, v, d, None, self.device)?;
                (Embed::new(MatrixData::F32(w), v, d, self.device), head)
            }
        })
    }

    fn norm(&mut self, name: &str, dim: usize, eps: f64) -> Result<RmsNorm<B>> {
        let gamma = self.tensor(&format!("{name}.weight"), [dim])?;
        Ok(RmsNorm {
            gamma: Param::from_tensor(gamma),
            epsilon: eps,
        })
    }
}

impl<B: Backend> Transformer<B> {
    /// Builds the model from `config` with parameters from `src`.
    ///
    /// # Errors
    /// An invalid config, or whatever `src` reports (missing tensors, wrong shapes, bad data).
    pub fn from_weights(
        config: &ModelConfig,
        src: &mut dyn WeightSource,
        device: &B::Device,
    ) -> Result<Self> {
        config.validate()?;
        let c = config;
        let mut b = Builder::<B> { src, device };
        let (d, hd) = (c.hidden_size, c.head_dim);
        let (embed, lm_head) = b.embedding_and_head(c)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("blk.{i}");
            let bias = c.attention_bias;
            layers.push(DecoderLayer {
                attn_norm: b.norm(&format!("{p}.attn_norm"), d, c.rms_norm_eps)?,
                attn: Attention {
                    wq: b.linear(&format!("{p}.attn_q"), c.num_heads * hd, d, bias)?,
                    wk: b.linear(&format!("{p}.attn_k"), c.num_kv_heads * hd, d, bias)?,
                    wv: b.linear(&format!("{p}.attn_v"), c.num_kv_heads * hd, d, bias)?,
                    wo: b.linear(&format!("{p}.attn_output"), d, c.num_heads * hd, false)?,
                    n_heads: c.num_heads,
                    n_kv_heads: c.num_kv_heads,
                    head_dim: hd,
                },
                ffn_norm: b.norm(&format!("{p}.ffn_norm"), d, c.rms_norm_eps)?,
                mlp: Mlp {
                    gate: b.linear(&format!("{p}.ffn_gate"), c.intermediate_size, d, false)?,
                    up: b.linear(&format!("{p}.ffn_up"), c.intermediate_size, d, false)?,
                    down: b.linear(&format!("{p}.ffn_down"), d, c.intermediate_size, false)?,
                },
            });
        }
        Ok(Self {
            embed,
            layers,
            norm: b.norm("output_norm", d, c.rms_norm_eps)?,
            lm_head,
            coarse_head: None,
            vocab_size: c.vocab_size,
            head_dim: hd,
            max_position: c.max_position,
            rope_theta: c.rope_theta,
        })
    }

    /// Number of decoder layers (the size of the KV cache it needs).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Longest context the model supports.
    pub fn max_position(&self) -> usize {
        self.max_position
    }

    /// A cheap self-draft: the first `n_layers` decoder layers with this model's embedding,
    /// final norm and head. Weights are shared, not copied.
    ///
    /// # Errors
    /// [`ModelError::Input`] unless `1 <= n_layers <= num_layers()`.
    pub fn truncated(&self, n_layers: usize) -> Result<Self> {
        if n_layers == 0 || n_layers > self.layers.len() {
            return Err(ModelError::Input(format!(
                "cannot keep {n_layers} of {} layers",
                self.layers.len()
            )));
        }
        Ok(Self {
            embed: self.embed.clone(),
            layers: self.layers[..n_layers].to_vec(),
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            coarse_head: self.coarse_head.clone(),
            vocab_size: self.vocab_size,
            head_dim: self.head_dim,
            max_position: self.max_position,
            rope_theta: self.rope_theta,
        })
    }

    /// The same model scoring only the first `rows` token ids (its output head cut to them;
    /// the other logits read −∞). Meant for drafts: BPE vocabularies number tokens roughly by
    /// merge order, so the low ids are the common ones, and the head is a large share of a
    /// small model's bytes (37% of Qwen2.5-0.5B's). A draft that cannot propose a rare token
    /// loses a little acceptance, never correctness: the target verifies every token.
    ///
    /// # Errors
    /// [`ModelError::Input`] unless the head holds GGUF blocks on the CPU fast path and `rows`
    /// is a multiple of 8 in `8..=vocab_size`.
    pub fn with_head_rows(&self, rows: usize) -> Result<Self> {
        let mut m = self.clone();
        m.lm_head = self.lm_head.rows_prefix(rows)?;
        m.coarse_head = None;
        Ok(m)
    }

    /// The same model scoring its output head in two passes ([`CoarseHead`]): a low-rank
    /// coarse pass over `basis` (`rank × hidden`, row-major, rows orthonormal: the subspace
    /// the final hidden states live near) picks `candidates` ids per row, and only those get
    /// exact logits (the others read −∞). Meant for drafts: fewer bytes per token, at the
    /// cost in acceptance of the times the best id is not among the candidates.
    ///
    /// # Errors
    /// [`ModelError::Input`] unless the head holds GGUF blocks on the CPU fast path and the
    /// sizes fit ([`CoarseHead::fit`]).
    pub fn with_coarse_head(
        &self,
        basis: &[f32],
        rank: usize,
        candidates: usize,
        ty: GgmlType,
    ) -> Result<Self> {
        let head = self.lm_head.cpu_blocks("a coarse output head")?;
        if head.n() != self.vocab_size {
            return Err(ModelError::Input(
                "a coarse output head needs the whole head (not one cut by @head=N)".into(),
            ));
        }
        let coarse = CoarseHead::fit(Arc::clone(head), basis, rank, candidates, ty)?;
        let mut m = self.clone();
        m.coarse_head = Some(Arc::new(coarse));
        Ok(m)
    }

    /// The GGUF block format of the output head on the CPU fast path (`None` for float
    /// weights and other backends).
    pub fn head_block_type(&self) -> Option<GgmlType> {
        self.lm_head.block_type()
    }

    /// Bytes of the exact output head's weights (counted even when a coarse head scores it
    /// first).
    pub fn head_bytes(&self) -> usize {
        self.lm_head.weight_bytes()
    }

    /// The same model with its output head re-encoded as `ty` (`Proj::requantized`): for a
    /// draft whose head dominates its bytes (Qwen2.5-0.5B's Q8_0 head is over a third of
    /// what a token reads), fewer bytes per draft token at some cost in acceptance.
    ///
    /// # Errors
    /// [`ModelError::Input`] unless the head holds GGUF blocks on the CPU, or `ty` cannot be
    /// encoded.
    pub fn with_head_requantized(&self, ty: GgmlType) -> Result<Self> {
        let mut m = self.clone();
        m.lm_head = self.lm_head.requantized(ty)?;
        m.coarse_head = None;
        Ok(m)
    }

    /// The same model with every projection (output head included) re-encoded as `ty`
    /// (`Proj::requantized`): a Q8_0 draft re-encoded as Q4_1 reads ~40% fewer bytes per
    /// token, at some cost in acceptance (never in correctness: the target verifies).
    ///
    /// # Errors
    /// [`ModelError::Input`] unless every projection holds GGUF blocks on the CPU, or `ty`
    /// cannot be encoded at some projection's width.
    pub fn with_weights_requantized(&self, ty: GgmlType) -> Result<Self> {
        let mut m = self.with_head_requantized(ty)?;
        for l in &mut m.layers {
            for p in l.projections_mut() {
                *p = p.requantized(ty)?;
            }
        }
        Ok(m)
    }

    /// The same model with its projections' weights held as f16 on the CPU fast path: half
    /// the bytes read per token, at f16 rounding of every weight (≈5·10⁻⁴ relative). Meant
    /// for drafts, whose precision affects only acceptance, never the verified output. On
    /// other backends the model is returned unchanged.
    pub fn with_f16_weights(&self) -> Self {
        let mut m = self.clone();
        for l in &mut m.layers {
            for p in l.projections_mut() {
                *p = p.to_f16();
            }
        }
        m.lm_head = m.lm_head.to_f16();
        m.coarse_head = None;
        m
    }

    /// Bytes of projection weights (output head included; with a [`CoarseHead`], its coarse
    /// matrix instead) one forward reads.
    pub fn weight_bytes(&self) -> usize {
        let all = self.sum_over_projections(Proj::weight_bytes);
        match &self.coarse_head {
            Some(c) => all - self.head_bytes() + c.bytes(),
            None => all,
        }
    }

    /// Multiply-adds of the projections (output head included) per token: the compute one
    /// more row adds to a forward (attention over the context aside).
    pub fn macs_per_token(&self) -> usize {
        self.sum_over_projections(Proj::weights)
    }

    fn sum_over_projections(&self, f: impl Fn(&Proj<B>) -> usize) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .flat_map(|l| l.projections())
            .map(&f)
            .sum();
        layers + f(&self.lm_head)
    }

    /// A fresh, empty cache for this model: paged host storage on the CPU backend (pages of
    /// [`KV_PAGE_SIZE`] tokens, read in place by the fused attention), dense device tensors
    /// elsewhere.
    pub fn new_cache(&self) -> KvCache<B> {
        self.new_cache_with(KV_PAGE_SIZE, None)
    }

    /// The paged cache's geometry: host pages on the CPU backend, device pages on the CUDA
    /// backend (heads of at most 256 channels); `None` elsewhere (a dense device cache).
    pub fn kv_layout(&self, page_size: usize) -> Option<KvLayout> {
        let l = self.layers.first()?;
        let paged = uses_fast_path::<B>() || (device_kv::on_device::<B>() && self.head_dim <= 256);
        paged.then(|| KvLayout {
            n_layers: self.layers.len(),
            n_kv_heads: l.attn.n_kv_heads,
            head_dim: self.head_dim,
            page_size: page_size.max(1),
        })
    }

    /// A cache with pages of `page_size` tokens that compresses with `policy` (built and
    /// checked for [`Transformer::kv_layout`] and [`Transformer::check_kv_policy`]): host
    /// pages on the CPU backend (quantization, Quest, H2O); device pages on the CUDA backend,
    /// read in place by the CubeCL tree attention and quantized on the device; a dense exact
    /// device cache elsewhere.
    pub fn new_cache_with(&self, page_size: usize, policy: Option<Arc<KvPolicy>>) -> KvCache<B> {
        let layout = self.kv_layout(page_size);
        if let Some(l) = layout.filter(|_| device_kv::on_device::<B>())
            && let Some(cache) =
                device_kv::new_cache(&self.norm.gamma.device(), l, policy.as_deref())
        {
            return cache;
        }
        match (layout, policy) {
            (Some(layout), Some(p)) => KvCache::paged_with(layout, p),
            (Some(layout), None) => KvCache::paged(layout),
            _ => KvCache::new(self.layers.len()),
        }
    }

    /// Whether this backend's cache applies every part of `policy`: all of them on the CPU
    /// backend; on the CUDA backend quantization with keys per channel (Quest, H2O and
    /// per-token keys run on the CPU backend only).
    ///
    /// # Errors
    /// [`ModelError::Input`] naming the part this backend does not apply.
    pub fn check_kv_policy(&self, policy: &KvPolicy) -> Result<()> {
        if let Some(layout) = self
            .kv_layout(KV_PAGE_SIZE)
            .filter(|_| device_kv::on_device::<B>())
            && let Some(q) = device_kv::device_quant(policy)?
        {
            q.check(&layout.into())
                .map_err(|e| ModelError::Input(format!("KV quantization on the device: {e}")))?;
        }
        Ok(())
    }

    /// Runs the new tokens of `input` through the decoder, appending their keys and values to
    /// `cache`, and returns the final-norm hidden states.
    ///
    /// # Shapes
    /// - returns `[batch, n_new, hidden_size]`
    ///
    /// # Errors
    /// [`ModelError::Input`] if `input` disagrees with the model or the cache (token id out of
    /// range, position past the context, mask width not `cache.len() + n_new`).
    pub fn forward(&self, input: &ForwardInput, cache: &mut KvCache<B>) -> Result<Tensor<B, 3>> {
        let mut seqs = [SeqForward {
            input,
            cache,
            logits: LogitRows::None,
        }];
        on_pool(|| self.forward_hidden(&mut seqs, input.batch))
    }

    /// One forward over several sequences at once, each with its own cache (continuous
    /// batching). Their new tokens are concatenated into one matrix for every projection, so
    /// the weights are read once for all of them; attention runs per sequence against its own
    /// cache and mask. Each row's arithmetic is the same as in a forward of that sequence
    /// alone. Returns, per sequence, the logits rows its [`LogitRows`] asks for.
    ///
    /// # Errors
    /// [`ModelError::Input`] if a sequence's input has `batch != 1` or disagrees with the model
    /// or its cache; caches are untouched then.
    pub fn forward_batch(&self, seqs: &mut [SeqForward<'_, B>]) -> Result<Vec<Vec<Vec<f32>>>> {
        if let Some(s) = seqs.iter().find(|s| s.input.batch != 1) {
            return Err(ModelError::Input(format!(
                "a batched forward takes one sequence per input, got batch {}",
                s.input.batch
            )));
        }
        on_pool(|| self.forward_batch_on_pool(seqs))
    }

    fn forward_batch_on_pool(&self, seqs: &mut [SeqForward<'_, B>]) -> Result<Vec<Vec<Vec<f32>>>> {
        let hidden = self.forward_hidden(seqs, 1)?;
        let [_, _, d] = hidden.dims();
        let mut pick = Vec::new();
        let mut counts = Vec::with_capacity(seqs.len());
        let mut start = 0;
        for s in seqs.iter() {
            let n = s.input.n_new;
            let rows: Vec<usize> = match s.logits {
                LogitRows::None => vec![],
                LogitRows::Last => vec![start + n - 1],
                LogitRows::All => (start..start + n).collect(),
            };
            counts.push(rows.len());
            pick.extend(rows.into_iter().map(|r| r as i64));
            start += n;
        }
        let mut rows = if pick.is_empty() {
            Vec::new()
        } else {
            let device = self.norm.gamma.device();
            let idx = Tensor::<B, 1, Int>::from_data(
                TensorData::new(pick.clone(), [pick.len()]),
                &device,
            );
            let picked = hidden.select(1, idx).reshape([1, pick.len(), d]);
            self.host_logits(picked)?
        }
        .into_iter();
        Ok(counts
            .into_iter()
            .map(|c| rows.by_ref().take(c).collect())
            .collect())
    }

    /// The decoder over `seqs` (validated first), hidden states of all their new tokens
    /// concatenated along the token axis.
    fn forward_hidden(&self, seqs: &mut [SeqForward<'_, B>], batch: usize) -> Result<Tensor<B, 3>> {
        if seqs.is_empty() {
            return Err(ModelError::Input("no sequences".into()));
        }
        for s in seqs.iter_mut() {
            s.input
                .validate(self.vocab_size, self.max_position, s.cache.len())?;
            if batch != 1 && !s.cache.takes_tensor_mask() {
                return Err(ModelError::Input(format!(
                    "a paged cache holds one sequence; got a batch of {batch}"
                )));
            }
            if let Some(store) = s.cache.device_store_mut()
                && !device_kv::reads::<B>(store)
            {
                return Err(ModelError::Input(
                    "a device KV cache this backend cannot read".into(),
                ));
            }
        }
        let device = self.norm.gamma.device();
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut segments = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            let n = s.input.n_new;
            let total = s.cache.len() + n;
            // The device mask only for tensor-op attention; paged caches read the host mask,
            // device caches the tree it describes.
            let parents = s
                .cache
                .device_store()
                .map(|_| s.input.tree_parents(s.cache.len()))
                .transpose()?;
            let mask = s.cache.takes_tensor_mask().then(|| {
                Tensor::<B, 3, Bool>::from_data(
                    TensorData::new(s.input.mask.clone(), [batch, n, total]),
                    &device,
                )
            });
            tokens.extend_from_slice(&s.input.tokens);
            positions.extend_from_slice(&s.input.positions);
            segments.push(Segment {
                len: n,
                mask,
                mask_host: &s.input.mask,
                positions: &s.input.positions,
                parents,
                cache: &mut *s.cache,
            });
        }
        let n = tokens.len() / batch;
        let rope = RopeAngles::new(&positions, batch, self.head_dim, self.rope_theta, &device);
        let mut x = self.embed.forward(&tokens, batch, n, &device)?;
        if let Some(hidden) = self.layers_host(&x, &rope, &mut segments) {
            return Ok(hidden);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.attn.forward(
                rms_norm(&layer.attn_norm, x.clone()),
                &rope,
                &mut segments,
                i,
            );
            x = x + h;
            let h = layer.mlp.forward(rms_norm(&layer.ffn_norm, x.clone()));
            x = x + h;
        }
        Ok(rms_norm(&self.norm, x))
    }

    /// The layers and the final norm on host rows, where every block runs on the host (the
    /// CPU fast path: one sequence row set, paged caches, GGUF blocks): the residual stream
    /// stays a host vector from the embedding to the final norm — the norms
    /// ([`arbor_kernels::act::rms_norm`]) and residual adds in place of burn's tensor ops
    /// and their copies in and out of tensors around every block; `None` (nothing done)
    /// elsewhere.
    ///
    /// # Shapes
    /// - `x`: `[1, n, hidden]` embeddings → `[1, n, hidden]` normed hidden states
    fn layers_host(
        &self,
        x: &Tensor<B, 3>,
        rope: &RopeAngles<B>,
        segments: &mut [Segment<'_, B>],
    ) -> Option<Tensor<B, 3>> {
        let [batch, n, _] = x.dims();
        let ready = |l: &DecoderLayer<B>| {
            l.attn.host_ready(segments) && gated_mlp_ready(&l.mlp.gate, &l.mlp.up, &l.mlp.down)
        };
        if batch != 1 || !self.layers.iter().all(ready) {
            return None;
        }
        let norm = |norm: &RmsNorm<B>, x: &[f32], y: &mut [f32]| {
            let gamma = host_values(norm.gamma.val());
            arbor_kernels::act::rms_norm(x, &gamma, norm.epsilon as f32, y);
        };
        let device = x.device();
        let mut x = host_values(x.clone());
        let mut xn = vec![0.0f32; x.len()];
        for (i, layer) in self.layers.iter().enumerate() {
            norm(&layer.attn_norm, &x, &mut xn);
            let h = layer.attn.forward_rows(&xn, n, rope, segments, i);
            add_rows(&mut x, &h);
            norm(&layer.ffn_norm, &x, &mut xn);
            let m = &layer.mlp;
            let h = gated_mlp_rows(&m.gate, &m.up, &m.down, &xn, n).expect("checked above");
            add_rows(&mut x, &h);
        }
        norm(&self.norm, &x, &mut xn);
        Some(crate::proj::rows_tensor(xn, 1, n, &device))
    }

    /// Projects hidden states to vocabulary logits.
    ///
    /// # Shapes
    /// - `hidden`: `[batch, n, hidden_size]` → `[batch, n, vocab_size]`
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        if let Some(coarse) = &self.coarse_head {
            let [batch, n, _] = hidden.dims();
            let device = hidden.device();
            let y = coarse
                .logits(&host_values(hidden), batch * n)
                .expect("the hidden rows are `batch · n × d`");
            return crate::proj::rows_tensor(y, batch, n, &device);
        }
        let logits = self.lm_head.forward(hidden);
        let [batch, n, rows] = logits.dims();
        if rows == self.vocab_size {
            return logits;
        }
        // A cut head ([`Transformer::with_head_rows`]): the ids past it are never chosen.
        let rest = Tensor::full(
            [batch, n, self.vocab_size - rows],
            f32::NEG_INFINITY,
            &logits.device(),
        );
        Tensor::cat(vec![logits, rest], 2)
    }

    /// Forward, then the logits of every new token, copied to the host: one row per token,
    /// sequence-major.
    ///
    /// # Errors
    /// As [`Transformer::forward`].
    pub fn forward_all_logits(
        &self,
        input: &ForwardInput,
        cache: &mut KvCache<B>,
    ) -> Result<Vec<Vec<f32>>> {
        on_pool(|| {
            let hidden = self.forward(input, cache)?;
            self.host_logits(hidden)
        })
    }

    /// The logits of `hidden`'s rows on the host, one `Vec` per row. On the CPU fast path
    /// (a coarse head, or a whole head of packed weights) straight from the product: no
    /// tensor round trip, and each row the product's own buffer where the head holds GGUF
    /// blocks (a 152k vocabulary's rows are 0.6 MB, each copy of them ~0.1 ms).
    fn host_logits(&self, hidden: Tensor<B, 3>) -> Result<Vec<Vec<f32>>> {
        let [batch, n, _] = hidden.dims();
        let rows = batch * n;
        let flat = if let Some(coarse) = &self.coarse_head {
            coarse.logits(&host_values(hidden), rows)?
        } else if self.lm_head.host_outputs() == Some(self.vocab_size) {
            let x = host_values(hidden);
            if rows > 1 {
                // Each node's row written where it stays (a 64-node tree's logits are 39 MB).
                return Ok(self
                    .lm_head
                    .forward_host_rows(&x, rows)
                    .expect("the host path was checked"));
            }
            self.lm_head
                .forward_host(&x, rows)
                .expect("the host path was checked")
        } else {
            self.logits(hidden)
                .into_data()
                .to_vec::<f32>()
                .map_err(|e| ModelError::Input(format!("reading logits: {e:?}")))?
        };
        Ok(if rows == 1 {
            vec![flat]
        } else {
            flat.chunks(self.vocab_size).map(<[f32]>::to_vec).collect()
        })
    }

    /// Forward, then logits of the last new token of each sequence, copied to the host.
    ///
    /// # Errors
    /// As [`Transformer::forward`].
    pub fn forward_last_logits(
        &self,
        input: &ForwardInput,
        cache: &mut KvCache<B>,
    ) -> Result<Vec<Vec<f32>>> {
        on_pool(|| {
            let hidden = self.forward(input, cache)?;
            let [batch, n, d] = hidden.dims();
            let last = hidden.narrow(1, n - 1, 1).reshape([batch, 1, d]);
            self.host_logits(last)
        })
    }
}

impl<B: Backend> DecoderLayer<B> {
    /// The block's seven projections.
    fn projections(&self) -> [&Proj<B>; 7] {
        let (a, m) = (&self.attn, &self.mlp);
        [&a.wq, &a.wk, &a.wv, &a.wo, &m.gate, &m.up, &m.down]
    }

    fn projections_mut(&mut self) -> [&mut Proj<B>; 7] {
        let (a, m) = (&mut self.attn, &mut self.mlp);
        [
            &mut a.wq,
            &mut a.wk,
            &mut a.wv,
            &mut a.wo,
            &mut m.gate,
            &mut m.up,
            &mut m.down,
        ]
    }
}

impl<B: Backend> Attention<B> {
    /// Projections over all rows of `x` at once; RoPE, cache append and attention per segment
    /// (consecutive runs of rows belonging to one sequence and its cache).
    ///
    /// # Shapes
    /// - `x`: `[batch, n, hidden]` with `n` the segments' lengths summed → `[batch, n, hidden]`
    /// - each segment's `mask`: `[batch, len, cached + len]`
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeAngles<B>,
        segments: &mut [Segment<'_, B>],
        layer: usize,
    ) -> Tensor<B, 3> {
        if let Some(y) = self.forward_host(&x, rope, segments, layer) {
            return y;
        }
        let [batch, n, _] = x.dims();
        let split = |t: Tensor<B, 3>, heads: usize| {
            t.reshape([batch, n, heads, self.head_dim]).swap_dims(1, 2)
        };
        let [q, k, v] = forward_fused([&self.wq, &self.wk, &self.wv], x);
        let q = rope.apply(split(q, self.n_heads));
        let k = rope.apply(split(k, self.n_kv_heads));
        let v = split(v, self.n_kv_heads);
        let whole = segments.len() == 1;
        let mut outs = Vec::with_capacity(segments.len());
        let mut start = 0;
        for seg in segments.iter_mut() {
            let part = |t: &Tensor<B, 4>| {
                if whole {
                    t.clone()
                } else {
                    t.clone().narrow(2, start, seg.len)
                }
            };
            let qkv = || (part(&q), part(&k), part(&v));
            outs.push(match (seg.cache.paged_store_mut(), &seg.parents) {
                (Some(p), _) => paged_attention(p, layer, qkv(), seg.mask_host, seg.positions),
                (None, Some(parents)) => {
                    let store = seg
                        .cache
                        .device_store_mut()
                        .expect("parents for device caches");
                    device_kv::attention(store, layer, qkv(), parents, seg.positions)
                }
                (None, None) => {
                    let (k, v) = seg.cache.append(layer, part(&k), part(&v));
                    let mask = seg.mask.clone().expect("dense caches get a device mask");
                    attention_reference(part(&q), k, v, mask)
                }
            });
            start += seg.len;
        }
        let out = if outs.len() == 1 {
            outs.pop().expect("one segment")
        } else {
            Tensor::cat(outs, 2)
        };
        self.wo.forward(
            out.swap_dims(1, 2)
                .reshape([batch, n, self.n_heads * self.head_dim]),
        )
    }
}

/// Runs `f` on a worker of rayon's pool (inline when already on one), the other workers
/// polling for its products until it returns ([`arbor_kernels::pool::polled`]). A forward
/// issues a parallel product per projection (~200 per decode step of a 28-layer model);
/// started from a thread outside the pool, each one is handed to the workers and the caller
/// sleeps until it is done — a wake-up and a park per product (measured: ~25% of a
/// Qwen2.5-1.5B decode step spent serially on the caller while the workers parked). On a
/// worker, the product splits in place and the caller's thread computes its share; with the
/// others polling rather than asleep between products, they take their share at once.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    arbor_kernels::pool::polled(f)
}

mod host;

/// Appends the new keys and values to `layer` of a paged cache and attends over its pages in
/// place ([`attention_rows_with`]; batch-invariant: a tree row is bitwise its path decoded
/// alone).
///
/// # Shapes
/// - `q`: `[1, n_heads, n, head_dim]`, `k`, `v`: `[1, n_kv_heads, n, head_dim]` →
///   `[1, n_heads, n, head_dim]`
///
/// # Panics
/// On shapes the model did not build (internal invariant: validated input, batch 1).
fn paged_attention<B: Backend>(
    cache: &mut PagedKv,
    layer: usize,
    (q, k, v): (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>),
    mask: &[bool],
    positions: &[usize],
) -> Tensor<B, 4> {
    let [batch, n_heads, n_q, head_dim] = q.dims();
    let n_kv_heads = k.dims()[1];
    let device = q.device();
    let heads = (n_heads, n_kv_heads, head_dim);
    let out = paged_attention_host(
        cache,
        layer,
        (&host_values(q), &host_values(k), &host_values(v)),
        heads,
        mask,
        positions,
    );
    Tensor::from_data(
        TensorData::new(out, [batch, n_heads, n_q, head_dim]),
        &device,
    )
}

/// [`paged_attention`] on host rows, head-major: `q` `[n_heads][n][head_dim]`, `k`, `v`
/// `[n_kv_heads][n][head_dim]` → `[n_heads][n][head_dim]`.
///
/// # Panics
/// As [`paged_attention`].
fn paged_attention_host(
    cache: &mut PagedKv,
    layer: usize,
    (q, k, v): (&[f32], &[f32], &[f32]),
    (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
    mask: &[bool],
    positions: &[usize],
) -> Vec<f32> {
    let n_q = q.len() / (n_heads * head_dim);
    cache.append_head_major(layer, k, v, n_q);
    let dims = AttentionDims {
        batch: 1,
        n_heads,
        n_kv_heads,
        n_q,
        n_kv: cache.layer_len(layer),
        head_dim,
    };
    // After H2O evictions the layer holds a subset of the positions the mask covers.
    let mask = cache.layer_mask(layer, mask, n_q);
    if cache.wants_votes() {
        let (out, votes) =
            attention_rows_voting(q, &cache.layer(layer), &mask, Some(positions), dims)
                .expect("validated forward input");
        cache.record_votes(layer, &votes, n_q);
        out
    } else {
        attention_rows_with(q, &cache.layer(layer), &mask, Some(positions), dims)
            .expect("validated forward input")
    }
}

impl<B: Backend> Mlp<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        if let Some(y) = gated_mlp_host(&self.gate, &self.up, &self.down, &x) {
            return y;
        }
        let [gate, up] = forward_fused([&self.gate, &self.up], x);
        self.down.forward(silu_mul(gate, up))
    }
}

/// `x += h`, value by value (a residual add).
fn add_rows(x: &mut [f32], h: &[f32]) {
    for (a, &b) in x.iter_mut().zip(h) {
        *a += b;
    }
}

/// Row-major `[rows, cols]` → `[cols, rows]`, in parallel tiles of 64 output rows (each tile
/// reads 64 contiguous inputs per source row).
pub(crate) fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const TILE: usize = 64;
    let mut t = vec![0.0f32; w.len()];
    t.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(tile, dst)| {
            let c0 = tile * TILE;
            let n = dst.len() / rows;
            for r in 0..rows {
                let src = &w[r * cols + c0..r * cols + c0 + n];
                for (k, &x) in src.iter().enumerate() {
                    dst[k * rows + r] = x;
                }
            }
        });
    t
}

#[cfg(test)]
mod tests {
    #[test]
    fn transpose_is_exact_on_ragged_tiles() {
        let (rows, cols) = (7, 150);
        let w: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let t = super::transpose(&w, rows, cols);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(t[c * rows + r], w[r * cols + c]);
            }
        }
    }
}
