//! Loading a model and its tokenizer from whatever [`crate::hub::resolve`] found.

use std::path::Path;

use burn::tensor::backend::Backend;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, GgufWeights};
use crate::hub::{ModelFiles, ResolveOptions, WeightFormat, resolve};
use crate::safetensors::SafetensorsWeights;
use crate::tokenizer::Tokenizer;
use crate::transformer::Transformer;

/// A model ready to run: weights on a device, tokenizer, config.
#[derive(Debug)]
pub struct LoadedModel<B: Backend> {
    /// The network.
    pub model: Transformer<B>,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its configuration.
    pub config: ModelConfig,
    /// A display name (file or folder name).
    pub name: String,
}

impl<B: Backend> LoadedModel<B> {
    /// Resolves `spec` (short name, path or hub id; see [`resolve`]) and loads it.
    ///
    /// # Errors
    /// Any resolution, parsing or shape error, each as its own [`ModelError`] variant.
    pub fn load(spec: &str, opts: ResolveOptions, device: &B::Device) -> Result<Self> {
        let weights = opts.weights;
        Self::from_files(&resolve(spec, opts)?, weights, device)
    }

    /// Loads from resolved files.
    ///
    /// # Errors
    /// As [`LoadedModel::load`].
    pub fn from_files(
        files: &ModelFiles,
        weights: WeightFormat,
        device: &B::Device,
    ) -> Result<Self> {
        match files {
            ModelFiles::Gguf(p) => Self::from_gguf_as(p, weights, device),
            ModelFiles::HfDir(p) => Self::from_hf_dir(p, device),
        }
    }

    /// Loads a GGUF file, weights kept in their block formats ([`WeightFormat::Native`]).
    ///
    /// # Errors
    /// As [`LoadedModel::load`].
    pub fn from_gguf(path: &Path, device: &B::Device) -> Result<Self> {
        Self::from_gguf_as(path, WeightFormat::Native, device)
    }

    /// Loads a GGUF file with weights held as `weights` says.
    ///
    /// # Errors
    /// As [`LoadedModel::load`].
    pub fn from_gguf_as(path: &Path, weights: WeightFormat, device: &B::Device) -> Result<Self> {
        let start = std::time::Instant::now();
        let file = GgufFile::open(path)?;
        let config = file.model_config()?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let mut src = GgufWeights::new(&file, &config);
        if weights == WeightFormat::F32 {
            src = src.dequantized();
        }
        let model = Transformer::from_weights(&config, &mut src, device)?;
        tracing::info!(path = %path.display(), layers = config.num_layers, ?weights, secs = start.elapsed().as_secs_f32(), "loaded GGUF model");
        Ok(Self {
            model,
            tokenizer,
            config,
            name: display_name(path),
        })
    }

    /// Loads a Hugging Face folder (`config.json`, `tokenizer.json`, `*.safetensors`).
    ///
    /// # Errors
    /// As [`LoadedModel::load`].
    pub fn from_hf_dir(dir: &Path, device: &B::Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let json = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let config = ModelConfig::from_hf_json(&json)?;
        let tokenizer = Tokenizer::from_hf_dir(dir)?;
        let mut weights = SafetensorsWeights::open_dir(dir)?;
        let model = Transformer::from_weights(&config, &mut weights, device)?;
        Ok(Self {
            model,
            tokenizer,
            config,
            name: display_name(dir),
        })
    }
}

fn display_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
