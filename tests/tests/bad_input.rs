//! Bad input gets a clear, typed error — never a panic.

use arbor_engine::{EngineError, GenerateParams, Generator, Prompt};
use arbor_model::gguf::{GgufFile, GgufWriter, Value};
use arbor_model::{Architecture, LoadedModel, ModelConfig, ModelError, device::Cpu};
use arbor_tests::fixtures::{gguf_metadata, random_parameters, write_gguf};

fn tiny() -> ModelConfig {
    ModelConfig {
        vocab_size: 257,
        ..ModelConfig::tiny(Architecture::Llama)
    }
}

fn load_bytes(bytes: &[u8]) -> Result<LoadedModel<Cpu>, ModelError> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, bytes).unwrap();
    LoadedModel::<Cpu>::from_gguf(&p, &Default::default())
}

fn valid_gguf() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    write_gguf(&p, &tiny(), 1);
    std::fs::read(p).unwrap()
}

/// Writes a model whose tensor list is changed by `edit` (name, shape, type id, bytes).
fn gguf_with(edit: impl Fn(&mut Vec<(String, Vec<usize>, u32, Vec<u8>)>)) -> Vec<u8> {
    let c = tiny();
    let mut tensors: Vec<_> = random_parameters(&c, 2)
        .into_iter()
        .map(|(n, s, d)| {
            (
                n,
                s,
                0u32,
                d.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
            )
        })
        .collect();
    edit(&mut tensors);
    let mut w = GgufWriter::default();
    gguf_metadata(&mut w, &c);
    for (n, s, t, b) in tensors {
        w.tensor_raw(&n, &s, t, b);
    }
    w.to_bytes()
}

#[test]
fn valid_fixture_loads() {
    load_bytes(&valid_gguf()).unwrap();
}

#[test]
fn truncated_gguf_is_an_error_at_every_cut() {
    let bytes = valid_gguf();
    // Cut inside the header, the metadata, the tensor directory and the data.
    for cut in [
        0,
        3,
        7,
        20,
        100,
        1000,
        3000,
        bytes.len() / 2,
        bytes.len() - 1,
    ] {
        match load_bytes(&bytes[..cut]) {
            Err(ModelError::Gguf(msg)) => assert!(
                ["truncated", "magic", "exceeds"]
                    .iter()
                    .any(|w| msg.contains(w)),
                "{cut}: {msg}"
            ),
            Err(ModelError::Io { .. }) if cut == 0 => {}
            other => panic!("cut at {cut}: expected a GGUF error, got {other:?}"),
        }
    }
}

#[test]
fn corrupt_gguf_lengths_and_magic_are_errors() {
    let mut bytes = valid_gguf();
    bytes[0] = b'X';
    assert!(matches!(load_bytes(&bytes), Err(ModelError::Gguf(m)) if m.contains("magic")));
    let mut bytes = valid_gguf();
    bytes[4] = 9; // version
    assert!(matches!(load_bytes(&bytes), Err(ModelError::Gguf(m)) if m.contains("version")));
    let mut bytes = valid_gguf();
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes()); // metadata count
    assert!(matches!(load_bytes(&bytes), Err(ModelError::Gguf(_))));
    let mut bytes = valid_gguf();
    bytes[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes()); // first key's length
    assert!(matches!(load_bytes(&bytes), Err(ModelError::Gguf(m)) if m.contains("exceeds")));
}

#[test]
fn random_garbage_never_panics() {
    let valid = valid_gguf();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..200 {
        let mut bytes = valid.clone();
        for _ in 0..8 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let at = (state >> 33) as usize % 4096.min(bytes.len());
            bytes[at] = (state >> 17) as u8;
        }
        // Either loads (the flip hit data) or errors; a panic fails the test.
        let _ = load_bytes(&bytes);
    }
}

#[test]
fn unknown_architecture_is_named() {
    let mut w = GgufWriter::default();
    w.meta("general.architecture", Value::String("mamba".into()));
    w.tensor_f32("token_embd.weight", &[2, 2], &[0.0; 4]);
    let err = load_bytes(&w.to_bytes()).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnknownArchitecture(a) if a == "mamba"),
        "{err}"
    );
}

#[test]
fn unsupported_tensor_type_is_named() {
    let bytes = gguf_with(|t| {
        let q = t.iter_mut().find(|x| x.0 == "blk.0.attn_q.weight").unwrap();
        q.2 = 10; // Q2_K
    });
    let err = load_bytes(&bytes).unwrap_err().to_string();
    assert!(
        err.contains("blk.0.attn_q.weight") && err.contains("Q2_K"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let bytes = gguf_with(|t| t.retain(|x| x.0 != "blk.1.ffn_up.weight"));
    let err = load_bytes(&bytes).unwrap_err();
    assert!(
        matches!(&err, ModelError::MissingTensor(n) if n == "blk.1.ffn_up.weight"),
        "{err}"
    );
}

#[test]
fn mismatched_shape_is_named() {
    let bytes = gguf_with(|t| {
        let x = t
            .iter_mut()
            .find(|x| x.0 == "blk.0.ffn_gate.weight")
            .unwrap();
        x.1 = vec![x.1[0] / 2, x.1[1] * 2];
    });
    let err = load_bytes(&bytes).unwrap_err();
    assert!(
        matches!(&err, ModelError::ShapeMismatch { name, .. } if name == "blk.0.ffn_gate.weight"),
        "{err}"
    );
}

#[test]
fn missing_metadata_is_named() {
    let mut w = GgufWriter::default();
    w.meta("general.architecture", Value::String("llama".into()));
    w.tensor_f32("token_embd.weight", &[2, 2], &[0.0; 4]);
    let err = load_bytes(&w.to_bytes()).unwrap_err();
    assert!(
        matches!(&err, ModelError::Metadata { key, .. } if key.starts_with("llama.")),
        "{err}"
    );
}

#[test]
fn non_utf8_prompt_is_an_error() {
    let m = load_bytes(&valid_gguf()).unwrap();
    let err = m
        .tokenizer
        .encode_bytes(&[b'h', 0xff, 0xfe, b'i'])
        .unwrap_err();
    assert!(matches!(err, ModelError::Utf8(_)), "{err}");
}

#[test]
fn over_long_prompt_and_bad_params_are_errors() {
    let m = load_bytes(&valid_gguf()).unwrap();
    let g = Generator::new(&m.model, &m.tokenizer);
    let long = Prompt::Tokens(vec![1; m.config.max_position]);
    assert!(matches!(
        g.generate(&long, &GenerateParams::default()),
        Err(EngineError::PromptTooLong { .. })
    ));
    assert!(matches!(
        g.generate(&Prompt::Tokens(vec![]), &GenerateParams::default()),
        Err(EngineError::EmptyPrompt)
    ));
    let bad = GenerateParams {
        max_tokens: 0,
        ..Default::default()
    };
    assert!(matches!(
        g.generate(&Prompt::Text("a".into()), &bad),
        Err(EngineError::InvalidParams(_))
    ));
    let mut bad = GenerateParams::default();
    bad.sampling.temperature = -1.0;
    assert!(matches!(
        g.generate(&Prompt::Text("a".into()), &bad),
        Err(EngineError::InvalidParams(_))
    ));
    let oov = Prompt::Tokens(vec![5000]);
    assert!(matches!(
        g.generate(&oov, &GenerateParams::default()),
        Err(EngineError::InvalidParams(_))
    ));
}

#[test]
fn gguf_metadata_is_readable() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, valid_gguf()).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.model_config().unwrap().num_layers, 2);
}
