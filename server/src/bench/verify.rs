//! `arbor bench --verify-curve`: the cost of one verification forward by tree size (1 to 64
//! nodes, after a prompt of `--prompt-tokens`), beside this machine's roofline measured in the
//! same run — memory (`weight bytes / read bandwidth`) and int8 compute (`nodes · MACs per
//! token / peak`). The ratio to one node says how big a tree pays before the verifier's cost
//! grows with it (the planner of `--tree auto` measures the same curve for itself).

use anyhow::{Result, bail};
use arbor_engine::{VERIFY_SIZES, time_verify};
use arbor_kernels::roofline::Roofline;
use arbor_model::{ForwardInput, LoadedModel};
use serde::Serialize;

use super::BenchArgs;
use super::plain::synthetic_prompt;
use crate::cli::with_backend;

/// Bytes read to measure the memory bandwidth: several times any last-level cache.
const BANDWIDTH_PROBE_BYTES: usize = 512 << 20;

/// One tree size (`--json`).
#[derive(Debug, Serialize)]
struct Point {
    nodes: usize,
    /// Fastest of `--repeats` verification forwards.
    secs: f64,
    /// `secs` over the one-node (plain decode step) time.
    ratio_to_one: f64,
    /// Seconds to stream the weights once at the measured bandwidth.
    memory_floor_secs: f64,
    /// Seconds for `nodes · macs_per_token` int8 multiply-adds at the measured peak.
    compute_floor_secs: f64,
}

/// `arbor bench --verify-curve` (`--json` output).
#[derive(Debug, Serialize)]
struct VerifyCurve {
    model: String,
    threads: usize,
    prompt_tokens: usize,
    weight_bytes: usize,
    macs_per_token: usize,
    read_bytes_per_sec: f64,
    int8_macs_per_sec: f64,
    points: Vec<Point>,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if args.prompt_tokens == 0 || args.repeats == 0 || args.verify_nodes.contains(&0) {
        bail!("--prompt-tokens, --repeats and --verify-nodes must be at least 1");
    }
    let sizes = if args.verify_nodes.is_empty() {
        VERIFY_SIZES.to_vec()
    } else {
        args.verify_nodes.clone()
    };
    with_backend!(args.model.device, |B, device| {
        let loaded =
            LoadedModel::<B>::load(&args.model.model, args.model.resolve_options(), &device)?;
        let model = &loaded.model;
        let prompt = synthetic_prompt(&loaded.tokenizer, args.prompt_tokens)?;
        let mut cache = model.new_cache();
        model.forward_last_logits(&ForwardInput::causal(&prompt, 0), &mut cache)?;
        let root = *prompt.last().expect("at least one prompt token");
        let roof = Roofline::measure(BANDWIDTH_PROBE_BYTES);
        let (bytes, macs) = (model.weight_bytes(), model.macs_per_token());
        let bar = indicatif::ProgressBar::new(sizes.len() as u64);
        bar.set_style(indicatif::ProgressStyle::with_template(
            "verify {bar:30} {pos}/{len} sizes {msg}",
        )?);
        let mut points: Vec<Point> = Vec::new();
        for &n in &sizes {
            bar.set_message(format!("{n} nodes"));
            let secs = time_verify(model, &mut cache, root, n, args.repeats)?;
            let one = points.first().map_or(secs, |p| p.secs);
            points.push(Point {
                nodes: n,
                secs,
                ratio_to_one: secs / one,
                memory_floor_secs: roof.memory_secs(bytes as f64),
                compute_floor_secs: roof.compute_secs((n * macs) as f64),
            });
            bar.inc(1);
        }
        bar.finish_and_clear();
        let r = VerifyCurve {
            model: loaded.name.clone(),
            threads: roof.threads,
            prompt_tokens: args.prompt_tokens,
            weight_bytes: bytes,
            macs_per_token: macs,
            read_bytes_per_sec: roof.read_bytes_per_sec,
            int8_macs_per_sec: roof.int8_macs_per_sec,
            points,
        };
        print_table(&r);
        if let Some(p) = &args.json {
            std::fs::write(p, serde_json::to_string_pretty(&r)?)?;
        }
        Ok(())
    })
}

fn print_table(r: &VerifyCurve) {
    println!(
        "{}: {:.0} MB of weights, {:.2} G MACs per token; {} threads: read {:.1} GB/s, int8 \
         peak {:.0} G MAC/s",
        r.model,
        r.weight_bytes as f64 / 1e6,
        r.macs_per_token as f64 / 1e9,
        r.threads,
        r.read_bytes_per_sec / 1e9,
        r.int8_macs_per_sec / 1e9
    );
    println!("| nodes | verify ms | × 1 node | memory floor ms | compute floor ms | × roofline |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for p in &r.points {
        let roof = p.memory_floor_secs.max(p.compute_floor_secs);
        println!(
            "| {} | {:.1} | {:.2} | {:.1} | {:.1} | {:.2} |",
            p.nodes,
            p.secs * 1e3,
            p.ratio_to_one,
            p.memory_floor_secs * 1e3,
            p.compute_floor_secs * 1e3,
            p.secs / roof
        );
    }
}
