//! SKVQ-style quantization of old tokens (Duanmu et al., COLM 2024, arXiv 2405.06219): the
//! first `sinks` tokens and a sliding `window` of recent ones stay full precision; whole pages
//! older than that are read as packed codes. Values are quantized per token in channel
//! groups after a calibrated channel permutation with per-group clip ratios (SKVQ); keys
//! either the same way or — the default — per channel over the tokens of a page (KIVI, Liu et
//! al., arXiv 2402.02750), because a few key channels (Qwen2's key bias) are far wider than the
//! rest and would swamp every per-token group they fall in. Values may be quantized per
//! channel too ([`QuantConfig::values`]: over a page of 8 tokens it halves their error against
//! groups of 8 channels at the same bytes), and per-channel blocks may refine their widest
//! channels with a second code ([`QuantConfig::refine`]) and store their steps in one byte
//! each ([`QuantConfig::steps`]).

pub use arbor_kernels::kvquant::StepFormat;
use arbor_kernels::kvquant::{ChannelQuantizer, RowQuantizer, calibrate_clip, range_permutation};
use serde::{Deserialize, Serialize};

use crate::{CacheError, KvLayout, PagedKv};

/// How keys or values are quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantAxis {
    /// Per channel over a page's tokens (KIVI): each channel its own scale and minimum.
    Channel,
    /// Per token in channel groups (SKVQ).
    Token,
}

/// The quantizer of one layer's keys or values.
#[derive(Debug, Clone, PartialEq)]
pub enum PageQuant {
    /// Per token (one KV head's row of `head_dim` channels).
    Token(RowQuantizer),
    /// Per channel over a page (`page_size` tokens × every KV head's channels).
    Channel(ChannelQuantizer),
}

impl PageQuant {
    /// Packs one page of keys or values (`[slot][kv_head][head_dim]`).
    pub(crate) fn pack(&self, page: &[f32]) -> Box<[u8]> {
        match self {
            Self::Token(q) => pack_rows(q, page),
            Self::Channel(q) => {
                let mut out = vec![0u8; q.packed_bytes()];
                q.quantize(page, &mut out);
                out.into_boxed_slice()
            }
        }
    }

    /// Unpacks row `slot` of head `g` of a packed page into `out` (`head_dim` values).
    pub(crate) fn read(&self, codes: &[u8], slot: usize, g: usize, kvh: usize, out: &mut [f32]) {
        match self {
            Self::Token(q) => read_row(q, codes, slot * kvh + g, out),
            Self::Channel(q) => q.dequantize(codes, slot, g * out.len(), out),
        }
    }

    /// Bytes of one packed page.
    pub fn page_bytes(&self, layout: &KvLayout) -> usize {
        match self {
            Self::Token(q) => layout.page_size * layout.n_kv_heads * q.packed_bytes(),
            Self::Channel(q) => q.packed_bytes(),
        }
    }

    fn fits(&self, layout: &KvLayout) -> bool {
        match self {
            Self::Token(q) => q.channels() == layout.head_dim,
            Self::Channel(q) => q.tokens() == layout.page_size && q.channels() == layout.row(),
        }
    }
}

/// Packs a page of rows (`[slot][kv_head]` rows of `head_dim`) row by row.
pub(crate) fn pack_rows(q: &RowQuantizer, page: &[f32]) -> Box<[u8]> {
    let bytes = q.packed_bytes();
    let mut out = vec![0u8; page.len() / q.channels() * bytes];
    for (row, dst) in page
        .chunks_exact(q.channels())
        .zip(out.chunks_exact_mut(bytes))
    {
        q.quantize(row, dst);
    }
    out.into_boxed_slice()
}

/// Unpacks row `row` of a page packed by [`pack_rows`].
pub(crate) fn read_row(q: &RowQuantizer, codes: &[u8], row: usize, out: &mut [f32]) {
    let bytes = q.packed_bytes();
    q.dequantize(&codes[row * bytes..(row + 1) * bytes], out);
}

/// SKVQ compression of a paged cache.
///
/// Which representation a query reads depends on positions alone — page `p` is read as codes
/// by a query at `pos` iff its first token is not a sink and its last token `t` has
/// `t + window < pos` — never on when a page happened to be packed, so plain and speculative
/// decoding (trees no deeper than `window`), and a sequence alone or batched, see the same
/// values and produce the same greedy tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCompression {
    /// Full-precision attention sinks at the start (their pages are never packed).
    pub sinks: usize,
    /// Full-precision recent tokens.
    pub window: usize,
    /// Per layer, the key quantizer.
    pub keys: Vec<PageQuant>,
    /// Per layer, the value quantizer.
    pub values: Vec<PageQuant>,
}

/// Quantization settings, before they are fitted to a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantConfig {
    /// Bits per code: 2, 4 or 8.
    pub bits: u32,
    /// Channels per group of a per-token row (values; keys with [`QuantAxis::Token`]).
    pub group: usize,
    /// Full-precision sink tokens.
    pub sinks: usize,
    /// Full-precision recent tokens.
    pub window: usize,
    /// How keys are quantized (default: per channel).
    pub keys: QuantAxis,
    /// How values are quantized (default: per token, SKVQ).
    pub values: QuantAxis,
    /// Per-channel quantizers: channels per KV head and page given a residual code (the widest
    /// steps of the page; 0: none). Bytes per refined channel and token: `bits / 8`, plus one
    /// index byte per refined channel and page.
    pub refine: usize,
    /// Per-channel quantizers: how each channel's step is stored per page (f16, or one byte:
    /// `channels` bytes less per page, a step up to 1/8 wider).
    pub steps: StepFormat,
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self {
            bits: 4,
            group: 64,
            sinks: 4,
            window: 128,
            keys: QuantAxis::Channel,
            values: QuantAxis::Token,
            refine: 0,
            steps: StepFormat::F16,
        }
    }
}

/// SKVQ calibration of one per-token quantizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowCalibration {
    /// Channel permutation.
    pub perm: Vec<usize>,
    /// Per group, the clip ratio.
    pub clip: Vec<f32>,
}

/// SKVQ calibration of a model (`arbor calibrate` writes it as JSON): per layer, the values'
/// (and per-token keys') channel permutation and clip ratios, for one bit width and group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Bits the clip ratios were fitted for.
    pub bits: u32,
    /// Group size they were fitted for.
    pub group: usize,
    /// Tokens of sample text they were fitted on.
    pub tokens: usize,
    /// Per layer: keys (per-token form) and values.
    pub layers: Vec<[RowCalibration; 2]>,
}

impl Calibration {
    /// Fits permutations ([`range_permutation`]) and clip ratios with the least squared error
    /// ([`calibrate_clip`], ratios 1.0, 0.95 … 0.5) to the first `tokens` keys and values of
    /// `store` (a full-precision cache of sample text).
    ///
    /// # Errors
    /// Bits not 2/4/8, or a group that does not divide `head_dim`.
    pub fn fit(
        store: &PagedKv,
        bits: u32,
        group: usize,
        tokens: usize,
    ) -> Result<Self, CacheError> {
        let layout = store.layout();
        let hd = layout.head_dim;
        let group = group.min(hd);
        let grid: Vec<f32> = (0..=10).map(|i| 1.0 - 0.05 * i as f32).collect();
        let fit = |rows: &[Vec<f32>]| -> Result<RowCalibration, CacheError> {
            let perm = range_permutation(rows, hd);
            let base = RowQuantizer::new(bits, group, hd, Some(perm.clone()), None)?;
            let clip = calibrate_clip(&base, rows, &grid)?;
            Ok(RowCalibration { perm, clip })
        };
        let mut layers = Vec::new();
        let mut used = 0;
        for layer in 0..layout.n_layers {
            let (mut k, mut v) = (Vec::new(), Vec::new());
            let n = tokens.min(store.layer_len(layer));
            used = n;
            for j in 0..n {
                for g in 0..layout.n_kv_heads {
                    let (kr, vr) = store.full_rows(layer, g, j);
                    k.push(kr.to_vec());
                    v.push(vr.to_vec());
                }
            }
            layers.push([fit(&k)?, fit(&v)?]);
        }
        Ok(Self {
            bits,
            group,
            tokens: used,
            layers,
        })
    }
}

impl KvCompression {
    /// Quantizers for `layout` from `config`, calibrated by `calibration` where given (it must
    /// have been fitted for the same bits, group and layer count).
    ///
    /// # Errors
    /// [`CacheError::Kernel`] for impossible bits or groups, [`CacheError::Calibration`] for a
    /// calibration of another shape.
    pub fn new(
        layout: &KvLayout,
        config: &QuantConfig,
        calibration: Option<&Calibration>,
    ) -> Result<Self, CacheError> {
        let hd = layout.head_dim;
        let group = config.group.min(hd);
        if let Some(c) = calibration
            && (c.bits != config.bits || c.group != group || c.layers.len() != layout.n_layers)
        {
            return Err(CacheError::Calibration(format!(
                "fitted for {} bits, group {}, {} layers; asked for {} bits, group {group}, {} layers",
                c.bits,
                c.group,
                c.layers.len(),
                config.bits,
                layout.n_layers
            )));
        }
        let row = |layer: usize, which: usize| -> Result<RowQuantizer, CacheError> {
            let cal = calibration.map(|c| &c.layers[layer][which]);
            Ok(RowQuantizer::new(
                config.bits,
                group,
                hd,
                cal.map(|c| c.perm.clone()),
                cal.map(|c| c.clip.clone()),
            )?)
        };
        let page = |layer: usize, which: usize, axis: QuantAxis| -> Result<PageQuant, CacheError> {
            Ok(match axis {
                QuantAxis::Token => PageQuant::Token(row(layer, which)?),
                QuantAxis::Channel => PageQuant::Channel(
                    ChannelQuantizer::new(config.bits, layout.page_size, layout.row())?
                        .with_refinement(config.refine, hd)?
                        .with_steps(config.steps),
                ),
            })
        };
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for layer in 0..layout.n_layers {
            keys.push(page(layer, 0, config.keys)?);
            values.push(page(layer, 1, config.values)?);
        }
        Ok(Self {
            sinks: config.sinks,
            window: config.window,
            keys,
            values,
        })
    }

    /// Uncalibrated quantizers (identity permutation, no clipping) for every layer.
    ///
    /// # Errors
    /// As [`KvCompression::new`].
    pub fn uniform(layout: &KvLayout, config: &QuantConfig) -> Result<Self, CacheError> {
        Self::new(layout, config, None)
    }

    /// Whether these quantizers fit `layout`.
    pub(crate) fn fits(&self, layout: &KvLayout) -> bool {
        self.keys.len() == layout.n_layers
            && self.values.len() == layout.n_layers
            && self.keys.iter().all(|k| k.fits(layout))
            && self.values.iter().all(|v| v.fits(layout))
    }
}
