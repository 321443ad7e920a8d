//! `--draft NAME@coarse[=RANK:CANDIDATES]`: the draft's output head scored in two passes
//! ([`arbor_model::coarse_head`]). The basis is fitted once per model on a built-in
//! calibration text (prose and code, `server/calib/coarse-head.txt`) and cached beside the
//! models (`coarse-heads/` under the model cache), so later loads only build the coarse matrix.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use arbor_kernels::quant::GgmlType;
use arbor_model::{Tokenizer, Transformer, coarse_head};
use burn::tensor::backend::Backend;
use sha2::{Digest, Sha256};

/// The calibration text.
const TEXT: &str = include_str!("../calib/coarse-head.txt");
/// Tokens per calibration forward (each from an empty cache).
const CHUNK: usize = 512;
/// Most calibration tokens.
const MAX_TOKENS: usize = 4 * CHUNK;

/// Rank and candidates when `@coarse` gives none: measured on Qwen2.5-Coder-0.5B as the
/// 1.5B's draft (HumanEval, `chain:3`): 16 prompts, the same accepted nodes as the full head
/// (1 051 of 1 199) and draft time against verification time −13%; with 128 candidates one
/// node fewer accepted on 4 prompts, and rank 192 with 64 candidates lost acceptance
/// (0.906 → 0.883).
pub const DEFAULT_RANK: usize = 256;
/// See [`DEFAULT_RANK`].
pub const DEFAULT_CANDIDATES: usize = 256;

/// Whether a model draft gets `@coarse` without asking (`@exact` opts out): its head is held
/// as GGUF blocks on the CPU, is at least a fifth of its bytes, has at least
/// 16 × [`DEFAULT_CANDIDATES`] rows, and the hidden size is at least twice [`DEFAULT_RANK`]
/// (Qwen2.5-0.5B: a 151 936 × 896 head, 85 of 330 MB as Q4_1; SmolLM2-135M: 49 152 × 576,
/// 18 of 86 MB). The first load fits the basis (~7 s for Qwen2.5-0.5B), later ones read it.
pub fn by_default<B: Backend>(model: &Transformer<B>, hidden: usize) -> bool {
    model.head_block_type().is_some()
        && model.head_bytes() * 5 >= model.weight_bytes()
        && model.vocab_size() >= 16 * DEFAULT_CANDIDATES
        && hidden >= 2 * DEFAULT_RANK
}

/// An `@coarse[=RANK:CANDIDATES]` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coarse {
    /// Basis rank (a multiple of 32).
    pub rank: usize,
    /// Ids re-scored exactly per row.
    pub candidates: usize,
}

impl Default for Coarse {
    fn default() -> Self {
        Self {
            rank: DEFAULT_RANK,
            candidates: DEFAULT_CANDIDATES,
        }
    }
}

impl Coarse {
    /// Parses what follows `@coarse` (`""` or `"=RANK:CANDIDATES"`).
    pub fn parse(rest: &str) -> Option<Self> {
        if rest.is_empty() {
            return Some(Self::default());
        }
        let (r, k) = rest.strip_prefix('=')?.split_once(':')?;
        let (rank, candidates) = (r.parse().ok()?, k.parse().ok()?);
        (rank > 0 && usize::is_multiple_of(rank, 32) && candidates > 0)
            .then_some(Self { rank, candidates })
    }
}

impl std::fmt::Display for Coarse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "coarse={}:{}", self.rank, self.candidates)
    }
}

/// `model` (a draft named `name`, hidden size `d`) with its head scored in two passes; the
/// basis read from the cache or fitted now (and cached).
///
/// # Errors
/// A rank above `d`, a head not held as GGUF blocks on the CPU, a calibration that fails.
pub fn apply<B: Backend>(
    model: &Transformer<B>,
    tokenizer: &Tokenizer,
    name: &str,
    d: usize,
    c: Coarse,
) -> Result<Transformer<B>> {
    if c.rank > d {
        bail!(
            "@coarse rank {} is above the draft's hidden size {d}",
            c.rank
        );
    }
    let path = cache_path(model, name, d, c.rank);
    let basis = match read_basis(&path, c.rank * d) {
        Some(b) => b,
        None => {
            let t0 = std::time::Instant::now();
            let ids = tokenizer.encode(TEXT)?;
            let texts: Vec<&[u32]> = ids[..ids.len().min(MAX_TOKENS)].chunks(CHUNK).collect();
            let b = coarse_head::calibrate(model, &texts, c.rank)
                .with_context(|| format!("fitting {name}'s coarse head"))?;
            tracing::info!(
                draft = name,
                rank = c.rank,
                tokens = texts.iter().map(|t| t.len()).sum::<usize>(),
                secs = t0.elapsed().as_secs_f64(),
                path = %path.display(),
                "fitted a coarse output head"
            );
            if let Err(e) = write_basis(&path, &b) {
                tracing::warn!(path = %path.display(), error = %e, "could not cache the coarse head");
            }
            b
        }
    };
    Ok(model.with_coarse_head(&basis, c.rank, c.candidates, GgmlType::Q4_1)?)
}

/// Where the basis for this model, rank and calibration text is cached.
fn cache_path<B: Backend>(model: &Transformer<B>, name: &str, d: usize, rank: usize) -> PathBuf {
    // A digest of what the basis depends on: the model and the calibration text.
    let mut key = Sha256::new();
    key.update(format!(
        "{name}|{d}|{rank}|{}|{}|{}|",
        model.weight_bytes(),
        model.vocab_size(),
        model.num_layers()
    ));
    key.update(TEXT);
    let h: String = key.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let stem: String = name
        .chars()
        .map(|ch| {
            if ch.is_ascii_alphanumeric() || ch == '.' || ch == '-' {
                ch
            } else {
                '_'
            }
        })
        .collect();
    arbor_model::hub::models_dir()
        .join("coarse-heads")
        .join(format!("{stem}-r{rank}-{h}.f32"))
}

/// The cached basis of `len` values, if there is one of that size.
fn read_basis(path: &std::path::Path, len: usize) -> Option<Vec<f32>> {
    let bytes = std::fs::read(path).ok()?;
    (bytes.len() == 4 * len).then(|| {
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    })
}

/// Writes the basis through a temporary file (a crash leaves no partial cache entry).
fn write_basis(path: &std::path::Path, basis: &[f32]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let bytes: Vec<u8> = basis.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse() {
        assert_eq!(Coarse::parse(""), Some(Coarse::default()));
        assert_eq!(
            Coarse::parse("=128:64"),
            Some(Coarse {
                rank: 128,
                candidates: 64
            })
        );
        for bad in ["=100:64", "=128", "=128:0", "=0:8", "128:64", "=a:b"] {
            assert_eq!(Coarse::parse(bad), None, "{bad}");
        }
        assert_eq!(Coarse::default().to_string(), "coarse=256:256");
    }

    #[test]
    fn basis_files_round_trip_and_wrong_sizes_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("b.f32");
        let basis: Vec<f32> = (0..64).map(|i| i as f32 * 0.5 - 3.0).collect();
        write_basis(&path, &basis).unwrap();
        assert_eq!(read_basis(&path, 64), Some(basis));
        assert_eq!(read_basis(&path, 63), None);
        assert_eq!(read_basis(&dir.path().join("missing"), 64), None);
    }
}
