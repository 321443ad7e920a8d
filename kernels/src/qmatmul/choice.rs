//! Which kernel family runs a product of several rows where the AMX tile products and the
//! VNNI kernels both could: measured as the process runs, per matrix and row count.
//!
//! The two families give the same bits (tested), so the choice is about time only — and
//! which is faster is not a property of the CPU alone. On one 2-core Intel guest (Emerald
//! Rapids, CPUID model 207), the same binary and matrices alternated within one process
//! (40 Q4_K matrices of 1536 × 8960 from memory, fastest of 9–11 passes): in one spell the
//! tiles took 3 rows in 1.27–1.30× VNNI's time and 8 rows in 1.14×; twenty minutes later
//! 0.78–0.83× at 3–6 rows. A tile product of 8 × 64 × 16 ran at 6 ns in the first spell and
//! ~3 ns in earlier sessions on a Sapphire Rapids guest — the tile unit is shared with
//! whatever else runs on the physical core. A fixed row threshold ([`super::amx::takes`])
//! is then wrong half the time, and 3–8 rows are what tree verification uses most.
//!
//! So each matrix (the first of a fused set) compares, per row count, the two families on
//! adjacent calls ([`Measured`]): the first call runs the fixed rule's choice, the second
//! the other one, then the faster by the running ratio of their times, and every
//! [`RETRY`]th call (rarer the farther apart they are: [`retry_every`]) runs the slower
//! again — its time against the calls just before and just after it (two pairs) enters the
//! running log ratio (weight ¼ for each newest pair). A pair's two calls are a decode step
//! or two apart, so a drift of the whole host (both families slower or faster alike)
//! cancels out of the ratio; a first version kept one running time per family instead, and
//! a host slowing down between the slower family's retries read as that family having
//! become the faster.
//!
//! Measured on that host (`arbor bench --model qwen2.5-coder-1.5b --draft
//! qwen2.5-coder-0.5b --limit 4`, HumanEval prompts; this choice, `ARBOR_KERNELS=avx512vnni`
//! and `ARBOR_KERNELS=amx` — the fixed rule — alternated, five rounds): median speculative
//! rate 22.4 tok/s against 21.4 (VNNI) and 19.7 (fixed rule), spec / plain 1.70× against
//! 1.62× and 1.57×; above the fixed rule in four rounds of five. Short runs see little of
//! it: its first two products at each row count time one family each, so
//! `--verify-curve`'s fastest of 5 read it between the two fixed families; single timings
//! on a host drifting ±30% make any one choice a coin toss, and only many calls average
//! that out.
//!
//! Only [`super::matmul_fused`] and
//! [`QuantMatrix::matmul`](super::QuantMatrix::matmul) choose this way, and only where
//! [`Isa::best`] is [`Isa::Amx`] without `ARBOR_KERNELS` naming it; `…_with` calls run
//! the family they are given.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::Isa;

/// Row counts with their own comparison; more rows share the last slot (passes of
/// [`super::amx::ROWS`] rows cost alike per row).
const SLOTS: usize = 17;

/// Every `RETRY`th call at a row count runs the slower family again while the two are
/// within [`GAP`] of each other (log ratio); see [`retry_every`].
pub(super) const RETRY: u32 = 16;

/// Each further `GAP` between the families (log ratio of their times) doubles the calls
/// between retries of the slower, up to `RETRY << 3`.
const GAP: f32 = 0.1;

/// Calls between retries of the slower family at a running log ratio `ratio`: 16 while the
/// slower takes under 1.105× the faster's time, 32 under 1.22×, 64 under 1.35×, 128 beyond.
/// A retry costs the gap on that call, so the retries' share of a product's time,
/// `(r − 1) / every` for a slower family at `r×`, stays at or under ~0.7% up to 2× (0.8%
/// there) — where one interval for all had cost 1.8% at the tiles' 1.29× of an 8-row Q4_K
/// product of 17 920 × 1 536 on the Xeon guest (counted: 56 of 1 120 calls on the tiles at
/// 1.40 ms against 1.09 ms, ~0.7 ms of each 8-node verification of the 1.5B). A change of
/// host is then seen within at most 128 calls at that row count (about as many passes).
fn retry_every(ratio: f32) -> u32 {
    RETRY << ((ratio.abs() / GAP) as u32).min(3)
}

/// The two families measured against each other, as indices into [`FAMILIES`].
const FAMILIES: [Isa; 2] = [Isa::Amx, Isa::Avx512Vnni];

/// `Measured::ratio` before any pair has been timed (an f32 NaN's bits).
const NO_RATIO: u32 = 0x7fc0_0000;

/// Weight of the newest pair in the running log ratio.
const NEWEST: f32 = 0.25;

/// Per row count of one matrix: the calls seen, the last call's family and time, and the
/// running log ratio of the two families' times over adjacent calls.
pub(super) struct Measured {
    calls: [AtomicU32; SLOTS],
    /// `0` = none yet; else `(family + 1) << 32 | ns`.
    last: [AtomicU64; SLOTS],
    /// f32 bits of the running `ln(tiles' time / VNNI's time)`; [`NO_RATIO`] until a pair.
    ratio: [AtomicU32; SLOTS],
}

impl Default for Measured {
    fn default() -> Self {
        Self {
            calls: Default::default(),
            last: Default::default(),
            ratio: std::array::from_fn(|_| AtomicU32::new(NO_RATIO)),
        }
    }
}

impl Measured {
    /// The family the next product of `m` rows runs on; `fixed_amx` is what the fixed rule
    /// would run (tiles or not), tried first.
    pub(super) fn pick(&self, m: usize, fixed_amx: bool) -> Isa {
        let slot = m.min(SLOTS - 1);
        let call = self.calls[slot].fetch_add(1, Ordering::Relaxed);
        let last = unpack(self.last[slot].load(Ordering::Relaxed)).map(|(f, _)| f);
        let ratio = f32::from_bits(self.ratio[slot].load(Ordering::Relaxed));
        let ratio = (!ratio.is_nan()).then_some(ratio);
        FAMILIES[decide(ratio, last, call, usize::from(!fixed_amx))]
    }

    /// Records that a product of `m` rows took `ns` on `isa`; where the call before it at
    /// `m` rows ran the other family, the pair's log ratio enters the running one.
    pub(super) fn record(&self, m: usize, isa: Isa, ns: u64) {
        let Some(f) = FAMILIES.iter().position(|&i| i == isa) else {
            return;
        };
        let slot = m.min(SLOTS - 1);
        let ns = u32::try_from(ns).unwrap_or(u32::MAX).max(1);
        let packed = (f as u64 + 1) << 32 | u64::from(ns);
        let Some((g, before)) = unpack(self.last[slot].swap(packed, Ordering::Relaxed)) else {
            return;
        };
        if g == f {
            return;
        }
        let (amx, vnni) = if f == 0 { (ns, before) } else { (before, ns) };
        let sample = (f64::from(amx) / f64::from(vnni)).ln() as f32;
        let cell = &self.ratio[slot];
        let old = f32::from_bits(cell.load(Ordering::Relaxed));
        let new = if old.is_nan() {
            sample
        } else {
            old + NEWEST * (sample - old)
        };
        cell.store(new.to_bits(), Ordering::Relaxed);
    }

    /// Whether a pair of the two families has been timed at `m` rows (for tests).
    #[cfg(test)]
    pub(super) fn compared(&self, m: usize) -> bool {
        self.ratio[m.min(SLOTS - 1)].load(Ordering::Relaxed) != NO_RATIO
    }
}

/// `(family, ns)` of a packed last call, if any.
fn unpack(packed: u64) -> Option<(usize, u32)> {
    let family = (packed >> 32) as usize;
    (family > 0).then(|| (family - 1, packed as u32))
}

/// A fresh matrix's copy starts measuring anew (its times belong to where it runs).
impl Clone for Measured {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for Measured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Measured")
    }
}

/// Which of the two families (index into [`FAMILIES`]) the `call`th product runs on, given
/// the running log ratio of their times (tiles over VNNI; `None` before any pair), the
/// family the last call ran (`None` before any) and the fixed rule's choice `fixed`: the
/// fixed choice first, then the other family until a pair has been timed, then the faster
/// by the ratio — but the slower on every [`retry_every`]th call.
fn decide(ratio: Option<f32>, last: Option<usize>, call: u32, fixed: usize) -> usize {
    let Some(ratio) = ratio else {
        return last.map_or(fixed, |l| 1 - l);
    };
    let faster = usize::from(ratio > 0.0);
    let every = retry_every(ratio);
    if call % every == every - 1 {
        1 - faster
    } else {
        faster
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_choice_first_then_the_other_then_the_faster_with_retries() {
        // Nothing timed: the fixed rule's choice, whichever it is.
        assert_eq!(decide(None, None, 0, 0), 0);
        assert_eq!(decide(None, None, 0, 1), 1);
        // No pair yet: the family the last call did not run.
        assert_eq!(decide(None, Some(0), 1, 0), 1);
        assert_eq!(decide(None, Some(1), 1, 1), 0);
        // A ratio: the faster (tiles below 0), except every `retry_every`-th call.
        for (ratio, every) in [(0.05, 16), (0.2, 64)] {
            for call in 2..4 * every {
                let retry = call % every == every - 1;
                assert_eq!(decide(Some(-ratio), Some(0), call, 1), usize::from(retry));
                assert_eq!(decide(Some(ratio), Some(1), call, 0), usize::from(!retry));
            }
        }
    }

    #[test]
    fn the_farther_apart_the_rarer_the_retries() {
        for (ratio, every) in [
            (0.0, 16),
            (0.099, 16),
            (-0.15, 32),
            (0.25, 64),
            (-0.3, 128),
            (0.69, 128),
            (5.0, 128),
        ] {
            assert_eq!(retry_every(ratio), every, "log ratio {ratio}");
        }
        // The retries' share of the time: the gap over the interval, ≤ 0.8% up to 2×.
        for step in 0..=69 {
            let ratio = step as f32 / 100.0;
            let share = (ratio.exp() - 1.0) / retry_every(ratio) as f32;
            assert!(share <= 0.008, "{share} at log ratio {ratio}");
        }
    }

    /// Runs one product of `m` rows as `matmul_fused` does, the tiles taking `amx` ns and
    /// VNNI `vnni`; returns the family it ran.
    fn call(c: &Measured, m: usize, amx: u64, vnni: u64) -> Isa {
        let isa = c.pick(m, true);
        c.record(m, isa, if isa == Isa::Amx { amx } else { vnni });
        isa
    }

    #[test]
    fn pairs_of_adjacent_calls_follow_the_host() {
        let c = Measured::default();
        // The fixed rule's family, then the other: one pair, VNNI faster.
        assert_eq!(call(&c, 4, 1_000, 600), Isa::Amx);
        assert!(!c.compared(4));
        assert_eq!(call(&c, 4, 1_000, 600), Isa::Avx512Vnni);
        assert!(c.compared(4));
        // VNNI from then on; the tiles at 1.67× its time are retried once per 128 calls
        // (calls 2 to 128: call 127).
        let runs: Vec<Isa> = (2..129).map(|_| call(&c, 4, 1_000, 600)).collect();
        assert_eq!(runs.iter().filter(|&&i| i == Isa::Amx).count(), 1);
        assert_eq!(runs[125], Isa::Amx);
        // The whole host slows down (both families alike): VNNI's calls alone, however
        // slow, form no pair and do not hand the choice to the tiles' older time (calls
        // 129 to 254; 255 is the next retry).
        for _ in 129..255 {
            assert_eq!(call(&c, 4, 2_000, 1_200), Isa::Avx512Vnni);
        }
        // The tiles speed up (the physical core's other load left): the two pairs around
        // the retry (call 255, the tiles, beside two VNNI calls) move the choice, and from
        // then on VNNI runs only on retries (now 4× faster: every 128th call).
        let runs: Vec<Isa> = (255..255 + 160).map(|_| call(&c, 4, 300, 1_200)).collect();
        assert_eq!(runs[..2], [Isa::Amx, Isa::Avx512Vnni]);
        for (i, &isa) in runs.iter().enumerate().skip(2) {
            let retry = (255 + i as u32) % 128 == 127;
            assert_eq!(isa == Isa::Avx512Vnni, retry, "call {}", 255 + i);
        }
        assert!(runs.iter().skip(2).any(|&isa| isa == Isa::Avx512Vnni));
        // Row counts are compared apart, and a copy starts afresh.
        assert!(!c.compared(8));
        assert!(!c.clone().compared(4));
        // Other families are not measured: no pair, nothing changes.
        let before = c.ratio[4].load(Ordering::Relaxed);
        c.record(4, Isa::Avx2, 1);
        assert_eq!(c.ratio[4].load(Ordering::Relaxed), before);
    }
}
