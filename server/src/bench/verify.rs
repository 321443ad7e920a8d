//! `arbor bench --verify-curve`: the cost of one verification forward by tree size (1 to 64
//! nodes, after a prompt of `--prompt-tokens`), beside this machine's roofline measured in the
//! same run — memory (`weight bytes / read bandwidth`) and int8 compute (`nodes · MACs per
//! token / peak`). The ratio to one node says how big a tree pays before the verifier's cost
//! grows with it (the planner of `--tree auto` measures the same curve for itself).
//!
//! The sizes are timed in rounds, one forward of each size per round, so that every size is
//! timed across the same stretch of time: on a shared host whose speed drifts over minutes,
//! timing all of one size before the next had priced sizes under different loads (a
//! 4-node forward read dearer than an 8-node one in one such run). Besides each size's
//! fastest forward, the median over rounds of its time over the first size's time in the
//! same round is reported: a ratio of neighbours in time, from which the host's drift
//! cancels.
//!
//! On a GPU (`--device cuda`) the curve is printed without the roofline, which measures the
//! host's CPU (the JSON's roofline fields are then `null`).

use anyhow::{Result, bail};
use arbor_engine::{VERIFY_SIZES, time_verify};
use arbor_kernels::roofline::Roofline;
use arbor_model::{ForwardInput, LoadedModel};
use serde::Serialize;

use super::BenchArgs;
use super::plain::synthetic_prompt;
use crate::cli::{DeviceKind, with_backend};

/// Bytes read to measure the memory bandwidth: several times any last-level cache.
const BANDWIDTH_PROBE_BYTES: usize = 512 << 20;

/// One tree size (`--json`).
#[derive(Debug, Serialize)]
struct Point {
    nodes: usize,
    /// Fastest of `--repeats` verification forwards.
    secs: f64,
    /// `secs` over the first size's (the one-node plain decode step's) `secs`.
    ratio_to_one: f64,
    /// Median over rounds of this size's time over the first size's time in the same round.
    paired_ratio: f64,
    /// First and third quartiles of those per-round ratios: their spread over the run (a
    /// host whose load changes within the run widens it).
    paired_ratio_quartiles: [f64; 2],
    /// Seconds to stream the weights once at the measured bandwidth (CPU only).
    memory_floor_secs: Option<f64>,
    /// Seconds for `nodes · macs_per_token` int8 multiply-adds at the measured peak (CPU
    /// only).
    compute_floor_secs: Option<f64>,
}

/// `arbor bench --verify-curve` (`--json` output).
#[derive(Debug, Serialize)]
struct VerifyCurve {
    model: String,
    threads: usize,
    prompt_tokens: usize,
    weight_bytes: usize,
    macs_per_token: usize,
    read_bytes_per_sec: Option<f64>,
    int8_macs_per_sec: Option<f64>,
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
        let roof = matches!(args.model.device, DeviceKind::Cpu)
            .then(|| Roofline::measure(BANDWIDTH_PROBE_BYTES));
        let (bytes, macs) = (model.weight_bytes(), model.macs_per_token());
        let bar = indicatif::ProgressBar::new(args.repeats as u64);
        bar.set_style(indicatif::ProgressStyle::with_template(
            "verify {bar:30} {pos}/{len} rounds {msg}",
        )?);
        // One untimed round first (first-touch page faults, each size's buffers).
        for &n in &sizes {
            time_verify(model, &mut cache, root, n)?;
        }
        // times[i][r]: size i's forward in round r.
        let mut times = vec![Vec::with_capacity(args.repeats); sizes.len()];
        for _ in 0..args.repeats {
            for (i, &n) in sizes.iter().enumerate() {
                bar.set_message(format!("{n} nodes"));
                times[i].push(time_verify(model, &mut cache, root, n)?);
            }
            bar.inc(1);
        }
        let fastest = |t: &[f64]| t.iter().copied().fold(f64::INFINITY, f64::min);
        let one = fastest(&times[0]);
        let points = sizes
            .iter()
            .zip(&times)
            .map(|(&n, t)| {
                let secs = fastest(t);
                let paired: Vec<f64> = t.iter().zip(&times[0]).map(|(a, b)| a / b).collect();
                Point {
                    nodes: n,
                    secs,
                    ratio_to_one: secs / one,
                    paired_ratio_quartiles: [quantile(&paired, 0.25), quantile(&paired, 0.75)],
                    paired_ratio: median(paired),
                    memory_floor_secs: roof.as_ref().map(|r| r.memory_secs(bytes as f64)),
                    compute_floor_secs: roof.as_ref().map(|r| r.compute_secs((n * macs) as f64)),
                }
            })
            .collect();
        bar.finish_and_clear();
        let r = VerifyCurve {
            model: loaded.name.clone(),
            threads: roof.as_ref().map_or_else(
                || std::thread::available_parallelism().map_or(1, |n| n.get()),
                |r| r.threads,
            ),
            prompt_tokens: args.prompt_tokens,
            weight_bytes: bytes,
            macs_per_token: macs,
            read_bytes_per_sec: roof.as_ref().map(|r| r.read_bytes_per_sec),
            int8_macs_per_sec: roof.as_ref().map(|r| r.int8_macs_per_sec),
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
    let (Some(read), Some(peak)) = (r.read_bytes_per_sec, r.int8_macs_per_sec) else {
        println!(
            "{}: {:.0} MB of weights, {:.2} G MACs per token (GPU: no roofline)",
            r.model,
            r.weight_bytes as f64 / 1e6,
            r.macs_per_token as f64 / 1e9,
        );
        println!("| nodes | verify ms | × 1 node | × 1 node, paired | paired q1–q3 |");
        println!("|---:|---:|---:|---:|---:|");
        for p in &r.points {
            println!("{}", curve_cells(p));
        }
        return;
    };
    println!(
        "{}: {:.0} MB of weights, {:.2} G MACs per token; {} threads: read {:.1} GB/s, int8 \
         peak {:.0} G MAC/s",
        r.model,
        r.weight_bytes as f64 / 1e6,
        r.macs_per_token as f64 / 1e9,
        r.threads,
        read / 1e9,
        peak / 1e9
    );
    println!(
        "| nodes | verify ms | × 1 node | × 1 node, paired | paired q1–q3 | memory floor ms \
         | compute floor ms | × roofline |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for p in &r.points {
        let (memory, compute) = (
            p.memory_floor_secs.unwrap_or(f64::NAN),
            p.compute_floor_secs.unwrap_or(f64::NAN),
        );
        println!(
            "{} {:.1} | {:.1} | {:.2} |",
            curve_cells(p),
            memory * 1e3,
            compute * 1e3,
            p.secs / memory.max(compute)
        );
    }
}

/// A table row's cells up to the paired quartiles: `| nodes | ms | ratios | q1–q3 |`.
fn curve_cells(p: &Point) -> String {
    format!(
        "| {} | {:.1} | {:.2} | {:.2} | {:.2}–{:.2} |",
        p.nodes,
        p.secs * 1e3,
        p.ratio_to_one,
        p.paired_ratio,
        p.paired_ratio_quartiles[0],
        p.paired_ratio_quartiles[1],
    )
}

/// The median of `v` (halfway between the middle two for an even count; NaN if empty).
fn median(v: Vec<f64>) -> f64 {
    quantile(&v, 0.5)
}

/// The `q` quantile of `v` (`0 ≤ q ≤ 1`), interpolated linearly between the two nearest
/// order statistics (as numpy's default); NaN if empty.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let Some(last) = v.len().checked_sub(1) else {
        return f64::NAN;
    };
    let at = q.clamp(0.0, 1.0) * last as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (at - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::{median, quantile};

    #[test]
    fn quartiles_interpolate_between_order_statistics() {
        let v = [4.0, 1.0, 3.0, 2.0, 5.0];
        assert_eq!(quantile(&v, 0.25), 2.0);
        assert_eq!(quantile(&v, 0.75), 4.0);
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 5.0);
        // Four values: the first quartile lies three quarters of the way from the first
        // order statistic to the second (numpy: 1.75).
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.25), 1.75);
        assert_eq!(
            quantile(&[1.0, 2.0, 3.0, 4.0], 0.5),
            median(vec![1.0, 2.0, 3.0, 4.0])
        );
        assert_eq!(quantile(&[7.0], 0.25), 7.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
