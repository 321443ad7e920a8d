//! Dequantization agrees exactly with the `gguf` Python package on random blocks of every
//! type (fixture written by `scripts/make-quant-fixtures.py`).

use arbor_kernels::quant::{GgmlType, dequantize};

#[test]
fn every_type_matches_gguf_python() {
    let text = include_str!("fixtures/quant.json");
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    let mut seen = Vec::new();
    for case in v["cases"].as_array().unwrap() {
        let ty = GgmlType::from_id(case["type_id"].as_u64().unwrap() as u32).unwrap();
        let hex = case["bytes"].as_str().unwrap();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let want: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let got = dequantize(ty, &bytes, want.len()).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // gguf computes in f32 numpy with a different operation order: allow 1 ulp-ish.
            assert!(
                (g - w).abs() <= 1e-6 + 1e-5 * w.abs(),
                "{ty:?} element {i}: {g} vs {w}"
            );
        }
        seen.push(ty);
    }
    for ty in GgmlType::ALL.into_iter().filter(|&t| t != GgmlType::F32) {
        assert!(seen.contains(&ty), "fixture lacks {ty:?}");
    }
}
