//! `arbor bench --verify-curve` end to end on SmolLM2: every size timed in every round, the
//! JSON's fields and their invariants.

mod common;

use std::process::Command;

#[test]
fn verify_curve_times_each_size_in_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("curve.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_arbor"));
    cmd.args([
        "bench",
        "--verify-curve",
        "--no-fetch",
        "--prompt-tokens",
        "16",
    ])
    .args(["--verify-nodes", "1,4,2", "--repeats", "3", "--model"])
    .arg(common::smollm2());
    let (table, curve) = common::json_report(&mut cmd, &json);
    assert_eq!(curve["prompt_tokens"], 16);
    let points = curve["points"].as_array().unwrap();
    let nodes: Vec<u64> = points
        .iter()
        .map(|p| p["nodes"].as_u64().unwrap())
        .collect();
    assert_eq!(nodes, [1, 4, 2], "the sizes as given, in order");
    let f = |p: &serde_json::Value, k: &str| p[k].as_f64().unwrap();
    // The first size is its own reference, both ways.
    assert_eq!(f(&points[0], "ratio_to_one"), 1.0);
    assert_eq!(f(&points[0], "paired_ratio"), 1.0);
    for p in points {
        assert!(f(p, "secs") > 0.0 && f(p, "secs").is_finite(), "{p}");
        assert!(
            f(p, "paired_ratio") > 0.0 && f(p, "paired_ratio").is_finite(),
            "{p}"
        );
        let q = p["paired_ratio_quartiles"].as_array().unwrap();
        let (q1, q3) = (q[0].as_f64().unwrap(), q[1].as_f64().unwrap());
        assert!(
            q1 <= f(p, "paired_ratio") && f(p, "paired_ratio") <= q3,
            "the median between its quartiles: {p}"
        );
        let one = f(&points[0], "secs");
        assert!(
            (f(p, "ratio_to_one") - f(p, "secs") / one).abs() < 1e-9,
            "{p}"
        );
    }
    assert!(table.contains("× 1 node, paired"), "{table}");
    assert!(table.contains("paired q1–q3"), "{table}");
}

#[test]
fn verify_curve_refuses_zero_rounds() {
    let out = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args([
            "bench",
            "--verify-curve",
            "--no-fetch",
            "--repeats",
            "0",
            "--model",
        ])
        .arg(common::smollm2())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--repeats"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
