//! Hugging Face safetensors checkpoints (one file or sharded), memory-mapped.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{ModelError, Result};
use crate::weights::{WeightSource, check_shape};

/// Maps Arbor's (GGUF-style) parameter names to Hugging Face Llama/Qwen2 names.
pub fn hf_name(name: &str) -> String {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return f.to_string();
    }
    let Some(rest) = name.strip_prefix("blk.") else {
        return name.to_string();
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return name.to_string();
    };
    let Some((part, kind)) = rest.split_once('.') else {
        return name.to_string();
    };
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return name.to_string(),
    };
    format!("model.layers.{layer}.{hf}.{kind}")
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (8-byte length + header).
    data_start: usize,
    tensors: HashMap<String, safetensors::tensor::TensorInfo>,
}

/// Weights from the `*.safetensors` files of a Hugging Face model folder.
pub struct SafetensorsWeights {
    shards: Vec<Shard>,
}

impl std::fmt::Debug for SafetensorsWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.shards.iter().map(|s| &s.path))
            .finish()
    }
}

impl SafetensorsWeights {
    /// Opens every `*.safetensors` file in `dir`.
    ///
    /// # Errors
    /// [`ModelError::Safetensors`] if there is none or one is malformed.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ModelError::Safetensors {
                path: dir.to_path_buf(),
                why: "no *.safetensors file".into(),
            });
        }
        Ok(Self {
            shards: files
                .iter()
                .map(|p| Self::open_file(p))
                .collect::<Result<_>>()?,
        })
    }

    fn open_file(path: &Path) -> Result<Shard> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: read-only map of a checkpoint that is not modified while open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let (header, meta) =
            SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::Safetensors {
                path: path.to_path_buf(),
                why: e.to_string(),
            })?;
        let tensors = meta
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        Ok(Shard {
            path: path.to_path_buf(),
            data_start: 8 + header,
            mmap,
            tensors,
        })
    }

    fn find(&self, name: &str) -> Option<(&Shard, &safetensors::tensor::TensorInfo)> {
        self.shards
            .iter()
            .find_map(|s| s.tensors.get(name).map(|t| (s, t)))
    }
}

impl WeightSource for SafetensorsWeights {
    fn load(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let hf = hf_name(name);
        let (shard, info) = self
            .find(&hf)
            .ok_or_else(|| ModelError::MissingTensor(hf.clone()))?;
        check_shape(&hf, shape, &info.shape)?;
        let (a, b) = info.data_offsets;
        let bytes = shard
            .mmap
            .get(shard.data_start + a..shard.data_start + b)
            .ok_or_else(|| ModelError::Safetensors {
                path: shard.path.clone(),
                why: format!("{hf}: data out of bounds"),
            })?;
        let bad_len = || ModelError::Safetensors {
            path: shard.path.clone(),
            why: format!(
                "{hf}: {} bytes for {} elements",
                bytes.len(),
                shape.iter().product::<usize>()
            ),
        };
        let n: usize = shape.iter().product();
        let out: Vec<f32> = match info.dtype {
            Dtype::F32 if bytes.len() == 4 * n => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 if bytes.len() == 2 * n => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 if bytes.len() == 2 * n => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F32 | Dtype::F16 | Dtype::BF16 => return Err(bad_len()),
            other => {
                return Err(ModelError::Safetensors {
                    path: shard.path.clone(),
                    why: format!("{hf}: dtype {other:?} is not supported (F32, F16, BF16)"),
                });
            }
        };
        Ok(out)
    }

    fn contains(&self, name: &str) -> bool {
        self.find(&hf_name(name)).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::hf_name;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.3.attn_q.bias"),
            "model.layers.3.self_attn.q_proj.bias"
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight"),
            "model.layers.0.mlp.down_proj.weight"
        );
        assert_eq!(
            hf_name("blk.11.ffn_norm.weight"),
            "model.layers.11.post_attention_layernorm.weight"
        );
        assert_eq!(hf_name("token_embd.weight"), "model.embed_tokens.weight");
        assert_eq!(hf_name("output.weight"), "lm_head.weight");
    }
}
