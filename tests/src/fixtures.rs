//! Tiny checkpoints written in code: a random-weight Llama-family model saved as GGUF (with
//! llama.cpp's layouts) and as a Hugging Face folder (safetensors + config + tokenizer).

use std::path::Path;

use arbor_kernels::quant::GgmlType;
use arbor_model::gguf::{GgufWriter, Value};
use arbor_model::{
    Architecture, ModelConfig, RandomWeights, WeightSource, interleaved_to_half_split,
};

/// Every parameter of `config` with its row-major shape, in GGUF naming.
pub fn parameter_shapes(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, hd) = (c.hidden_size, c.head_dim);
    let mut v = vec![("token_embd.weight".to_string(), vec![c.vocab_size, d])];
    for i in 0..c.num_layers {
        let p = format!("blk.{i}");
        v.push((format!("{p}.attn_norm.weight"), vec![d]));
        v.push((format!("{p}.attn_q.weight"), vec![c.num_heads * hd, d]));
        v.push((format!("{p}.attn_k.weight"), vec![c.num_kv_heads * hd, d]));
        v.push((format!("{p}.attn_v.weight"), vec![c.num_kv_heads * hd, d]));
        if c.attention_bias {
            v.push((format!("{p}.attn_q.bias"), vec![c.num_heads * hd]));
            v.push((format!("{p}.attn_k.bias"), vec![c.num_kv_heads * hd]));
            v.push((format!("{p}.attn_v.bias"), vec![c.num_kv_heads * hd]));
        }
        v.push((format!("{p}.attn_output.weight"), vec![d, c.num_heads * hd]));
        v.push((format!("{p}.ffn_norm.weight"), vec![d]));
        v.push((format!("{p}.ffn_gate.weight"), vec![c.intermediate_size, d]));
        v.push((format!("{p}.ffn_up.weight"), vec![c.intermediate_size, d]));
        v.push((format!("{p}.ffn_down.weight"), vec![d, c.intermediate_size]));
    }
    v.push(("output_norm.weight".to_string(), vec![d]));
    v
}

/// Random parameters (Arbor's half-split RoPE layout) for `config`.
pub fn random_parameters(c: &ModelConfig, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut src = RandomWeights::new(seed, 0.2);
    parameter_shapes(c)
        .into_iter()
        .map(|(n, s)| {
            let data = src.load(&n, &s).expect("random weights never fail");
            (n, s, data)
        })
        .collect()
}

/// GGUF metadata for `config` with the byte-level test vocabulary (`arbor_model::testing`).
pub fn gguf_metadata(w: &mut GgufWriter, c: &ModelConfig) {
    let arch = match c.architecture {
        Architecture::Llama => "llama",
        Architecture::Qwen2 => "qwen2",
    };
    let u = |x: usize| Value::U64(x as u64);
    w.meta("general.architecture", Value::String(arch.into()));
    w.meta(&format!("{arch}.context_length"), u(c.max_position));
    w.meta(&format!("{arch}.embedding_length"), u(c.hidden_size));
    w.meta(
        &format!("{arch}.feed_forward_length"),
        u(c.intermediate_size),
    );
    w.meta(&format!("{arch}.block_count"), u(c.num_layers));
    w.meta(&format!("{arch}.attention.head_count"), u(c.num_heads));
    w.meta(
        &format!("{arch}.attention.head_count_kv"),
        u(c.num_kv_heads),
    );
    w.meta(&format!("{arch}.rope.freq_base"), Value::F64(c.rope_theta));
    w.meta(
        &format!("{arch}.attention.layer_norm_rms_epsilon"),
        Value::F64(c.rms_norm_eps),
    );
    let tokens: Vec<Value> = (0..=255u8)
        .map(|b| Value::String(arbor_model::testing::byte_to_char(b).to_string()))
        .chain([Value::String("<|endoftext|>".into())])
        .collect();
    let types: Vec<Value> = (0..256)
        .map(|_| Value::I64(1))
        .chain([Value::I64(3)])
        .collect();
    w.meta("tokenizer.ggml.model", Value::String("gpt2".into()));
    w.meta("tokenizer.ggml.pre", Value::String("qwen2".into()));
    w.meta("tokenizer.ggml.tokens", Value::Array(tokens));
    w.meta("tokenizer.ggml.token_type", Value::Array(types));
    w.meta("tokenizer.ggml.merges", Value::Array(vec![]));
    w.meta("tokenizer.ggml.eos_token_id", u(256));
}

/// Writes a random model as a GGUF file the way llama.cpp's converter does (q/k rows of Llama
/// interleaved for its RoPE). Returns the parameters in Arbor's layout.
pub fn write_gguf(path: &Path, c: &ModelConfig, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    write_gguf_as(path, c, seed, None)
}

/// [`write_gguf`] with every matrix (the embedding and the projections) encoded as `ty`
/// blocks (Q4_1 or Q8_0: [`arbor_kernels::quant::quantize`]) where its rows fill whole blocks
/// of 32, so that loading keeps them quantized; norms and biases stay f32. Returns the
/// parameters before encoding.
///
/// # Panics
/// If `ty` is neither Q4_1 nor Q8_0.
pub fn write_gguf_quantized(
    path: &Path,
    c: &ModelConfig,
    seed: u64,
    ty: GgmlType,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    write_gguf_as(path, c, seed, Some(ty))
}

fn write_gguf_as(
    path: &Path,
    c: &ModelConfig,
    seed: u64,
    blocks: Option<GgmlType>,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let params = random_parameters(c, seed);
    let mut w = GgufWriter::default();
    gguf_metadata(&mut w, c);
    for (name, shape, data) in &params {
        let data = match c.architecture {
            Architecture::Llama if name.contains("attn_q.") => {
                to_interleaved(data, c.num_heads, c.head_dim)
            }
            Architecture::Llama if name.contains("attn_k.") => {
                to_interleaved(data, c.num_kv_heads, c.head_dim)
            }
            _ => data.clone(),
        };
        match blocks {
            Some(ty) if shape.len() == 2 && shape[1] % 32 == 0 => {
                let bytes = arbor_kernels::quant::quantize(ty, &data).expect("Q4_1 or Q8_0");
                w.tensor_raw(name, shape, ty.id(), bytes);
            }
            _ => {
                w.tensor_f32(name, shape, &data);
            }
        }
    }
    std::fs::write(path, w.to_bytes()).expect("write gguf");
    params
}

/// Inverse of Arbor's load-time permutation: half-split rows → llama.cpp's interleaved rows.
fn to_interleaved(data: &[f32], heads: usize, head_dim: usize) -> Vec<f32> {
    let perm = interleaved_to_half_split(heads, head_dim);
    let row = data.len() / perm.len();
    let mut out = vec![0.0; data.len()];
    for (new, &old) in perm.iter().enumerate() {
        out[old * row..(old + 1) * row].copy_from_slice(&data[new * row..(new + 1) * row]);
    }
    out
}

/// Writes a Hugging Face folder (config.json, tokenizer.json, tokenizer_config.json,
/// model.safetensors in bf16-free f32) holding the same parameters.
pub fn write_hf_dir(dir: &Path, c: &ModelConfig, params: &[(String, Vec<usize>, Vec<f32>)]) {
    std::fs::create_dir_all(dir).unwrap();
    let model_type = match c.architecture {
        Architecture::Llama => "llama",
        Architecture::Qwen2 => "qwen2",
    };
    let config = serde_json::json!({
        "model_type": model_type, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position, "tie_word_embeddings": c.tie_embeddings,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tok = arbor_model::testing::byte_tokenizer();
    tok.inner().save(dir.join("tokenizer.json"), false).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": "<|endoftext|>", "add_bos_token": false,
            "chat_template": "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"}"#,
    )
    .unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = params
        .iter()
        .map(|(n, s, d)| {
            (
                arbor_model::safetensors::hf_name(n),
                s.clone(),
                d.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}
