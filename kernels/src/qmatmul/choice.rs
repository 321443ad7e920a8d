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
//! So each matrix (the first of a fused set) keeps, per row count, a running time of each
//! family ([`Measured`]): the first call runs the fixed rule's choice, the second the other
//! one, then the faster of the two runs, and every [`RETRY`]th call runs the slower again
//! so that a change of the host's state is noticed. Running times are exponential averages
//! (weight ¼ for the newest call).
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

use std::sync::atomic::{AtomicU32, Ordering};

use super::Isa;

/// Row counts with their own running times; more rows share the last slot (passes of
/// [`super::amx::ROWS`] rows cost alike per row).
const SLOTS: usize = 17;

/// Every `RETRY`th call at a row count runs the slower family again.
pub(super) const RETRY: u32 = 16;

/// The two families measured against each other, as indices into [`Measured`]'s times.
const FAMILIES: [Isa; 2] = [Isa::Amx, Isa::Avx512Vnni];

/// Running times (ns, 0 = not yet measured) of each family per row count, and the calls seen
/// per row count, for one matrix.
#[derive(Default)]
pub(super) struct Measured {
    ns: [[AtomicU32; 2]; SLOTS],
    calls: [AtomicU32; SLOTS],
}

impl Measured {
    /// The family the next product of `m` rows runs on; `fixed_amx` is what the fixed rule
    /// would run (tiles or not), tried first.
    pub(super) fn pick(&self, m: usize, fixed_amx: bool) -> Isa {
        let slot = m.min(SLOTS - 1);
        let call = self.calls[slot].fetch_add(1, Ordering::Relaxed);
        let ns = [0, 1].map(|f| self.ns[slot][f].load(Ordering::Relaxed));
        FAMILIES[decide(ns, call, usize::from(!fixed_amx))]
    }

    /// Folds the time a product of `m` rows took on `isa` into its running time.
    pub(super) fn record(&self, m: usize, isa: Isa, ns: u64) {
        let Some(f) = FAMILIES.iter().position(|&i| i == isa) else {
            return;
        };
        let ns = u32::try_from(ns).unwrap_or(u32::MAX).max(1);
        let cell = &self.ns[m.min(SLOTS - 1)][f];
        let old = cell.load(Ordering::Relaxed);
        let new = if old == 0 {
            ns
        } else {
            ((3 * u64::from(old) + u64::from(ns)) / 4) as u32
        };
        cell.store(new.max(1), Ordering::Relaxed);
    }

    /// Whether both families have a running time at `m` rows (for tests).
    #[cfg(test)]
    pub(super) fn both_measured(&self, m: usize) -> bool {
        let slot = m.min(SLOTS - 1);
        (0..2).all(|f| self.ns[slot][f].load(Ordering::Relaxed) > 0)
    }
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

/// Which of the two families (index into `ns`) the `call`th product runs on, given their
/// running times `ns` (0 = none yet) and the fixed rule's choice `fixed`: the fixed choice
/// until it has a time, then the other until it has one, then the faster — but the slower on
/// every [`RETRY`]th call.
fn decide(ns: [u32; 2], call: u32, fixed: usize) -> usize {
    let other = 1 - fixed;
    if ns[fixed] == 0 {
        return fixed;
    }
    if ns[other] == 0 {
        return other;
    }
    let faster = if ns[0] <= ns[1] { 0 } else { 1 };
    if call % RETRY == RETRY - 1 {
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
        // Nothing measured: the fixed rule's choice, whichever it is.
        assert_eq!(decide([0, 0], 0, 0), 0);
        assert_eq!(decide([0, 0], 0, 1), 1);
        // The fixed choice measured: the other once.
        assert_eq!(decide([500, 0], 1, 0), 1);
        assert_eq!(decide([0, 500], 1, 1), 0);
        // Both measured: the faster, except every RETRY-th call.
        for call in 2..4 * RETRY {
            let retry = call % RETRY == RETRY - 1;
            assert_eq!(decide([300, 500], call, 0), usize::from(retry));
            assert_eq!(decide([500, 300], call, 0), usize::from(!retry));
        }
    }

    #[test]
    fn running_times_follow_the_host() {
        let m = Measured::default();
        let amx = true;
        assert_eq!(m.pick(4, amx), Isa::Amx);
        m.record(4, Isa::Amx, 1_000);
        assert_eq!(m.pick(4, amx), Isa::Avx512Vnni);
        m.record(4, Isa::Avx512Vnni, 600);
        assert!(m.both_measured(4));
        // VNNI is faster now; the tiles get a retry within RETRY calls.
        let picks: Vec<Isa> = (0..RETRY).map(|_| m.pick(4, amx)).collect();
        assert_eq!(picks.iter().filter(|&&i| i == Isa::Amx).count(), 1);
        // The tiles speed up (the host's other load left): a few calls move the choice.
        for _ in 0..4 {
            m.record(4, Isa::Amx, 200);
        }
        assert_eq!(m.pick(4, amx), Isa::Amx);
        // Row counts are measured apart, and a copy starts afresh.
        assert!(!m.both_measured(8));
        assert!(!m.clone().both_measured(4));
        // Other families are not measured here.
        m.record(4, Isa::Avx2, 1);
        assert_eq!(m.ns[4][1].load(Ordering::Relaxed), 600);
    }
}
