//! `arbor kv-eval` end to end on SmolLM2: the JSON report's fields and their invariants.

mod common;

use std::process::Command;

#[test]
fn kv_eval_reports_dense_and_compressed_settings() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("kv.json");
    let text = concat!(env!("CARGO_MANIFEST_DIR"), "/src/http/validate.rs");
    let out = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args([
            "kv-eval",
            "--no-fetch",
            "--tokens",
            "200",
            "--chunk",
            "64",
            "--calibrate",
        ])
        .args(["--settings", "8:32,2:32:4:32", "--text", text, "--model"])
        .arg(common::smollm2())
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // dense, then each setting uncalibrated and calibrated.
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[0]["setting"], "dense");
    assert_eq!(rows[2]["setting"], "8:32:4:64+cal");
    assert_eq!(rows[4]["setting"], "2:32:4:32+cal");
    assert_eq!(rows[0]["top1_agreement"], 1.0);
    for r in &rows[1..] {
        assert_eq!(r["predictions"], 199);
        let ratio = r["kv_bytes_vs_f32"].as_f64().unwrap();
        assert!(ratio > 0.0 && ratio < 0.7, "{r}");
        let agree = r["top1_agreement"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&agree), "{r}");
    }
    // 8 bits loses less than 2 bits, in agreement and in perplexity.
    let f = |i: usize, k: &str| rows[i][k].as_f64().unwrap();
    assert!(f(1, "top1_agreement") >= f(3, "top1_agreement"));
    assert!(f(1, "perplexity_delta") <= f(3, "perplexity_delta"));
    assert!(
        f(1, "top1_agreement") > 0.9,
        "8-bit should barely change the model"
    );
    // Bad settings are clear errors.
    let bad = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args([
            "kv-eval",
            "--no-fetch",
            "--settings",
            "3:128",
            "--text",
            text,
            "--model",
        ])
        .arg(common::smollm2())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("3 bits"));
}
