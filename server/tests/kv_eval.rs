//! `arbor kv-eval` and `arbor calibrate` end to end on SmolLM2: the JSON report's fields and
//! their invariants, and a calibration file that `--kv-calib` accepts.

mod common;

use std::process::Command;

#[test]
fn kv_eval_reports_exact_and_every_policy() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("kv.json");
    let text = concat!(env!("CARGO_MANIFEST_DIR"), "/src/http/validate.rs");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_arbor"));
    cmd.args(["kv-eval", "--no-fetch", "--tokens", "240", "--chunk", "64"])
        .args(["--decode-tokens", "12", "--calibration-tokens", "128"])
        .args([
            "--settings",
            "8:32,2:32:4:32+tok+cal,quest=120,h2o=128,4:32+quest=120+h2o=160,8:32+cal",
        ])
        .args(["--text", text, "--model"])
        .arg(common::smollm2());
    let (_, rows) = common::json_report(&mut cmd, &json);
    let rows = rows.as_array().unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["setting"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "exact",
            "8:32",
            "2:32:4:32+tok+cal",
            "quest=120",
            "h2o=128",
            "4:32+quest=120+h2o=160",
            "8:32+cal"
        ]
    );
    assert_eq!(rows[0]["top1_agreement"], 1.0);
    let f = |i: usize, k: &str| rows[i][k].as_f64().unwrap();
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["predictions"], 239);
        assert!((0.0..=1.0).contains(&f(i, "top1_agreement")), "{r}");
        // Decoding after the text: speculative == plain under every policy.
        assert_eq!(r["spec_matches_plain"], true, "{r}");
        assert!(
            f(i, "tau") >= 1.0 && f(i, "decode_tokens_per_sec") > 0.0,
            "{r}"
        );
    }
    // Quantization shrinks storage, 8 bits loses less than 2, and barely anything.
    // (`cal` settings of different bits get their own fits.)
    for i in [1, 2, 5, 6] {
        assert!(f(i, "kv_bytes_vs_f32") < 0.7, "{}", rows[i]);
    }
    assert!(f(1, "top1_agreement") >= f(2, "top1_agreement"));
    assert!(f(1, "perplexity_delta") <= f(2, "perplexity_delta"));
    assert!(
        f(1, "top1_agreement") > 0.9,
        "8-bit should barely change the model"
    );
    // Quest stores everything; H2O evicts down to its budget (half the text or less).
    assert!((f(3, "kv_bytes_vs_f32") - 1.0).abs() < 0.1, "{}", rows[3]);
    assert!(f(4, "kv_bytes_vs_f32") < 0.7, "{}", rows[4]);
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
    // Another page size (keys quantized per channel over 8 tokens); decoding after the text
    // runs the engine's 16-token pages, so it is refused with it.
    let paged = |decode: &str| {
        Command::new(env!("CARGO_BIN_EXE_arbor"))
            .args(["kv-eval", "--no-fetch", "--tokens", "120", "--chunk", "64"])
            .args([
                "--settings",
                "4:16",
                "--page-size",
                "8",
                "--decode-tokens",
                decode,
            ])
            .args(["--text", text, "--model"])
            .arg(common::smollm2())
            .output()
            .unwrap()
    };
    let refused = paged("4");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--decode-tokens 0"));
    let ok = paged("0");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("4:16"));
}

/// `arbor calibrate` writes a calibration that `kv-eval --calib` and `generate --kv-calib`
/// take; one fitted for other bits is refused with a clear error.
#[test]
fn calibrate_writes_a_file_the_policy_flags_accept() {
    let dir = tempfile::tempdir().unwrap();
    let cal = dir.path().join("calib.json");
    let text = concat!(env!("CARGO_MANIFEST_DIR"), "/src/http/validate.rs");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_arbor"))
            .args(args)
            .arg("--model")
            .arg(common::smollm2())
            .output()
            .unwrap()
    };
    let out = run(&[
        "calibrate",
        "--no-fetch",
        "--prompts",
        text,
        "--tokens",
        "128",
        "--bits",
        "2",
        "-o",
        cal.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cal).unwrap()).unwrap();
    assert_eq!(v["bits"], 2);
    assert_eq!(v["tokens"], 128);
    assert_eq!(
        v["layers"].as_array().unwrap().len(),
        30,
        "SmolLM2 has 30 layers"
    );
    let generate = |bits: &str| {
        run(&[
            "generate",
            "--no-fetch",
            "-p",
            "fn main() {",
            "-n",
            "8",
            "--kv-bits",
            bits,
            "--kv-window",
            "2",
            "--kv-calib",
            cal.to_str().unwrap(),
        ])
    };
    let ok = generate("2");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = generate("4");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("fitted for 2 bits"), "{err}");
}

/// Policy flags that cannot work are refused up front with the reason.
#[test]
fn impossible_policy_flags_are_clear_errors() {
    for (flags, want) in [
        (&["--quest-budget", "10"][..], "Quest budget 10"),
        (&["--h2o-budget", "8"][..], "H2O budget 8"),
        (
            &["--kv-calib", "/nonexistent.json", "--kv-bits", "4"][..],
            "nonexistent",
        ),
        (&["--kv-bits", "4", "--kv-group", "48"][..], "group of 48"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_arbor"))
            .args(["generate", "--no-fetch", "-p", "hi", "-n", "2"])
            .args(flags)
            .arg("--model")
            .arg(common::smollm2())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flags:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{flags:?}: {err}");
        assert!(!err.contains("panicked"), "{flags:?}: {err}");
    }
}
