//! `scripts/gguf-hollow.py`, the GPU checks' stand-in for a model too big to carry to a GPU
//! machine: a GGUF file's header is kept (`hollow`) and its weights put back as random valid
//! blocks (`fill`). Checked here on a small model holding every block format Arbor reads: the
//! same header and tensor table, every weight finite and within the script's ±1/16, norm gains
//! 1 and biases 0, a seed that decides the bytes, and a model that loads and gives finite
//! logits. Needs `python3` (standard library only).

use std::path::Path;
use std::process::Command;

use arbor_kernels::quant::GgmlType;
use arbor_model::device::Cpu;
use arbor_model::gguf::{GgufFile, GgufWriter};
use arbor_model::{Architecture, ForwardInput, LoadedModel, ModelConfig};
use arbor_tests::fixtures::{gguf_metadata, parameter_shapes};

fn script(args: &[&Path]) -> std::process::Output {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gguf-hollow.py");
    Command::new("python3")
        .arg(path)
        .args(args)
        .output()
        .expect("python3 runs (the README's requirements)")
}

fn run(args: &[&Path]) {
    let out = script(args);
    assert!(
        out.status.success(),
        "gguf-hollow.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Qwen2 model whose matrices cycle through every format (zero bytes: only the layout
/// matters to `hollow`).
fn source(path: &Path) {
    let cfg = ModelConfig {
        vocab_size: 257,
        hidden_size: 256,
        intermediate_size: 512,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        ..ModelConfig::tiny(Architecture::Qwen2)
    };
    let mut w = GgufWriter::default();
    gguf_metadata(&mut w, &cfg);
    let matrix_types = [
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::F32,
    ];
    let mut next = matrix_types.iter().cycle();
    for (name, shape) in parameter_shapes(&cfg) {
        let ty = if shape.len() == 2 {
            *next.next().expect("a cycle")
        } else {
            GgmlType::F32
        };
        let bytes = ty.bytes_for(shape.iter().product()).expect("whole blocks");
        w.tensor_raw(&name, &shape, ty.id(), vec![0; bytes]);
    }
    std::fs::write(path, w.to_bytes()).unwrap();
}

#[test]
fn hollow_then_fill_gives_a_valid_model_of_the_same_layout() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    source(&p("src.gguf"));
    run(&[Path::new("hollow"), &p("src.gguf"), &p("m.hollow")]);
    let src = std::fs::read(p("src.gguf")).unwrap();
    let hollow = std::fs::read(p("m.hollow")).unwrap();
    assert!(
        hollow.len() < src.len() / 4,
        "{} of {}",
        hollow.len(),
        src.len()
    );
    assert_eq!(hollow, src[..hollow.len()], "the header is kept as it was");

    run(&[Path::new("fill"), &p("m.hollow"), &p("a.gguf")]);
    let filled = std::fs::read(p("a.gguf")).unwrap();
    assert_eq!(filled.len(), src.len());
    assert_eq!(filled[..hollow.len()], hollow);

    let (want, got) = (
        GgufFile::open(p("src.gguf")).unwrap(),
        GgufFile::open(p("a.gguf")).unwrap(),
    );
    let sorted = |f: &GgufFile| {
        let mut v: Vec<String> = f.tensor_names().map(String::from).collect();
        v.sort();
        v
    };
    let names = sorted(&want);
    assert_eq!(sorted(&got), names);
    let mut types = std::collections::BTreeSet::new();
    for name in &names {
        let (a, b) = (want.tensor(name).unwrap().0, got.tensor(name).unwrap().0);
        assert_eq!(
            (&a.dims, a.ty, &a.range),
            (&b.dims, b.ty, &b.range),
            "{name}"
        );
        types.insert(format!("{:?}", b.ty));
        let (_, w) = got.tensor_f32(name).unwrap();
        if name.contains("norm") {
            assert!(w.iter().all(|&x| x == 1.0), "{name}: norm gains are 1");
        } else if name.contains("bias") {
            assert!(w.iter().all(|&x| x == 0.0), "{name}: biases are 0");
        } else {
            let worst = w.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            assert!(
                w.iter().all(|x| x.is_finite()) && worst <= 0.0626,
                "{name}: {worst}"
            );
            let rms = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
            assert!(
                rms > 0.005,
                "{name} ({:?}): random, not blank ({rms})",
                b.ty
            );
        }
    }
    assert_eq!(types.len(), 11, "every format went through: {types:?}");

    let m = LoadedModel::<Cpu>::from_gguf(&p("a.gguf"), &Default::default()).unwrap();
    let logits = m
        .model
        .forward_all_logits(
            &ForwardInput::causal(&[1, 2, 3, 4], 0),
            &mut m.model.new_cache(),
        )
        .unwrap();
    assert!(logits.iter().flatten().all(|x| x.is_finite()));

    // The seed decides the bytes.
    run(&[Path::new("fill"), &p("m.hollow"), &p("b.gguf")]);
    assert!(
        std::fs::read(p("b.gguf")).unwrap() == filled,
        "same seed, same file"
    );
    run(&[
        Path::new("fill"),
        &p("m.hollow"),
        &p("c.gguf"),
        Path::new("--seed"),
        Path::new("2"),
    ]);
    assert!(
        std::fs::read(p("c.gguf")).unwrap() != filled,
        "another seed, other weights"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"not a model").unwrap();
    for cmd in ["hollow", "fill"] {
        let out = script(&[Path::new(cmd), &bad, &dir.path().join("out")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("not a GGUF file"),
            "{cmd}: {err}"
        );
    }
    let missing = script(&[Path::new("fill"), &dir.path().join("none"), &bad]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("No such file"));
}
