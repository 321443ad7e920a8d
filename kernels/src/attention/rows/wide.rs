//! A task's rows of one KV group scored, normalized and summed together in 512-bit lanes
//! (AVX-512F): every query vector of the task (each row's heads of the group) against every key
//! any of its rows sees.
//!
//! [`super::block_body`] reads each key once per task but scores and sums row by row: per row
//! and key a run of one row's heads (6 of 8 lanes for Qwen2.5-1.5B's groups) times a broadcast
//! channel, each row's softmax on its own, and per row, head and key a weighted value row in
//! 256-bit vectors, four running sums each (chains of fused multiply-adds, bound by their
//! latency). An 8-node tree of the 1.5B over a 128-token prompt took ~125 µs per KV group
//! and layer there (one thread): ~4 ms of a 55 ms verification, at 19 G MAC/s.
//!
//! Here the task's query vectors sit 16 to a vector (`[key][vector]` scores): one broadcast
//! channel of a key meets up to 48 of them (three vectors of sums per key); the softmax runs
//! across 16 vectors at once, each lane over the keys its row sees; and the value rows are
//! added 32 channels at a time into up to 12 vectors' sums held in registers, each value row
//! loaded once per group of them. A tree's rows share all but a few keys; a score a row does
//! not see is computed and dropped.
//!
//! **The same bits as the row-by-row builds**: each score is one running sum over the
//! channels in order, a fused multiply-add each, times the scale; each row's softmax is
//! [`super::exp_sum`]'s arithmetic over the scores of the keys it sees — the maximum, then
//! `exp(x − max)` ([`crate::act::exp`]), eight running sums by position modulo 8 over whole
//! runs of 8, then those in order and the last few in order; each value sum adds its keys'
//! weighted values in key order, a fused multiply-add each, from zero, then times `1 / sum`
//! — the operations of [`super::score_keys`], [`super::exp_sum`] and [`super::add_values`],
//! only grouped otherwise (test `wide_blocks_equal_the_row_builds_bitwise`). A row skips the
//! keys it does not see (no multiply by zero, which could turn a −0 sum into +0).
//!
//! Taken where no row selects keys per head (Quest's rows take the row path) and every row
//! that sees a key reads it alike ([`KvSource::reads_alike`], else
//! [`KvSource::same_read`] key by key): a compressed cache at the edge of its window, where
//! rows of one task read a page as codes or in full, takes the row path too.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{KvSource, PREFETCH_KEYS, RowCtx, Scratch, TaskOut, prefetch_row};
use crate::act::exp;

/// Query vectors per 512-bit vector.
const LANES: usize = 16;
/// Keys scored at once.
const KEYS: usize = 8;
/// Most runs of 16 query vectors scored at once (their sums: `RUNS × KEYS` registers).
const RUNS: usize = 3;
/// Most query vectors whose value sums (two vectors of 16 channels each) stay in registers.
const GROUP: usize = 12;

/// Per-thread buffers of [`block`].
#[derive(Default)]
pub(super) struct Wide {
    /// The task's query vectors (rows × the group's heads) per run of 16 as `[head_dim][16]`
    /// (lanes past the last zero).
    qt: Vec<f32>,
    /// Keys some row of the task sees, increasing.
    union: Vec<usize>,
    /// Per union key, whether every row of the task sees it.
    all: Vec<bool>,
    /// Per union key and run, the lanes whose rows see it.
    vis: Vec<u16>,
    /// Per key, the rows that see it (bit `r`).
    seen_by: Vec<u8>,
    /// Copies of rows the source wrote into its shared buffer.
    copies: Vec<f32>,
    /// `[union][runs × 16]` scores, then softmax numerators (lanes a row does not see: stale).
    scores: Vec<f32>,
    /// `[query vectors][head_dim]` value sums.
    acc: Vec<f32>,
}

/// Rows `rows` of sequence `b` for every head of KV group `g`, as [`super::block_body`]
/// computes them, appended to `out`; `false` (and nothing appended) where a row selects its
/// own keys per head or rows read a key differently.
///
/// # Safety
/// The CPU must support AVX-512F, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn block<S: KvSource>(
    c: &RowCtx<'_, S>,
    s: &mut Scratch,
    (b, g): (usize, usize),
    rows: Range<usize>,
    out: &mut Vec<TaskOut>,
) -> bool {
    let d = c.d;
    let (hd, gs, nk) = (d.head_dim, c.group, d.n_kv);
    let nr = rows.len();
    let mask = |r: usize| &c.mask[(b * d.n_q + rows.start + r) * nk..][..nk];
    let pos = |r: usize| c.positions.map_or(0, |p| p[b * d.n_q + rows.start + r]);
    let w = &mut s.wide;
    // Per-head selection (Quest) takes the row path.
    if c.kv.selects() {
        for r in 0..nr {
            s.queries.clear();
            for h in g * gs..(g + 1) * gs {
                let row = (b * d.n_heads + h) * d.n_q + rows.start + r;
                s.queries.extend_from_slice(&c.q[row * hd..(row + 1) * hd]);
            }
            s.keys.clear();
            s.keys.extend(
                mask(r)
                    .iter()
                    .enumerate()
                    .filter(|(_, ok)| **ok)
                    .map(|(j, _)| j),
            );
            if c.kv.select(b, g, pos(r), &s.queries, &s.keys, &mut s.heads) {
                return false;
            }
        }
    }
    let nqv = nr * gs;
    let runs = nqv.div_ceil(LANES);
    let pad = runs * LANES;
    // The lanes of each run that are query vectors of row `r`: `lanes[r * runs + run]`.
    let lanes: Vec<u16> = (0..nr * runs)
        .map(|i| {
            let (r, run) = (i / runs, i % runs);
            let (lo, hi) = (
                (r * gs).max(run * LANES),
                ((r + 1) * gs).min((run + 1) * LANES),
            );
            if lo >= hi {
                0
            } else {
                (((1u32 << (hi - lo)) - 1) << (lo - run * LANES)) as u16
            }
        })
        .collect();
    // Per key, the rows that see it (bit `r`: at most 8 rows, as tasks hold).
    if nr > 8 {
        return false;
    }
    w.seen_by.clear();
    w.seen_by.resize(nk, 0);
    for r in 0..nr {
        for (bits, &m) in w.seen_by.iter_mut().zip(mask(r)) {
            *bits |= u8::from(m) << r;
        }
    }
    let every = ((1u16 << nr) - 1) as u8;
    let run_lanes = |bits: u8, run: usize| {
        (0..nr)
            .filter(|&r| bits >> r & 1 == 1)
            .fold(0, |l, r| l | lanes[r * runs + run])
    };
    let all_lanes: Vec<u16> = (0..runs).map(|run| run_lanes(every, run)).collect();
    w.union.clear();
    w.all.clear();
    w.vis.clear();
    for (j, &bits) in w.seen_by.iter().enumerate() {
        if bits == 0 {
            continue;
        }
        w.union.push(j);
        w.all.push(bits == every);
        if bits == every {
            w.vis.extend_from_slice(&all_lanes);
        } else {
            w.vis.extend((0..runs).map(|run| run_lanes(bits, run)));
        }
    }
    let nu = w.union.len();
    // Every row that sees a key must read it as the first of them does.
    let p0 = pos(0);
    if !(1..nr).all(|r| c.kv.reads_alike(b, g, p0, pos(r))) {
        for &j in &w.union {
            let mut first = None;
            for r in (0..nr).filter(|&r| mask(r)[j]) {
                match first {
                    None => first = Some(pos(r)),
                    Some(p) if p != pos(r) && !c.kv.same_read(b, g, j, p, pos(r)) => return false,
                    Some(_) => {}
                }
            }
        }
    }
    // The first row that sees each union key reads it for all.
    let reader: Vec<usize> = w
        .union
        .iter()
        .map(|&j| pos(w.seen_by[j].trailing_zeros() as usize))
        .collect();
    // Where each union key's row (`values`: value row) starts, as its first reader reads it.
    let mut rows_of = |values| {
        gather(
            c,
            &mut s.buf,
            &mut w.copies,
            (b, g),
            &w.union,
            &reader,
            values,
        )
    };
    // Scores.
    let ptrs = rows_of(false);
    let query = |v: usize| ((b * d.n_heads + g * gs + v % gs) * d.n_q + rows.start + v / gs) * hd;
    // SAFETY: AVX-512F per the caller; every query row lies inside `c.q` (checked by
    // `attention_impl` against the call's dimensions).
    unsafe { transpose(c.q, query, hd, nqv, &mut w.qt) };
    // Every value is written before it is read: only grown, never cleared.
    if w.scores.len() < nu * pad {
        w.scores.resize(nu * pad, 0.0);
    }
    // SAFETY: AVX-512F and FMA per the caller; `ptrs` start `hd` values each of the source's
    // storage (borrowed for the call) or of `copies`; `qt` holds every run; `scores` is
    // `nu × pad`.
    unsafe { score(&w.qt, &ptrs, hd, runs, c.scale, &mut w.scores) };
    // Softmax numerators in place, and each lane's sum.
    let mut sums = vec![0.0f32; pad];
    let seen: Vec<u32> = (0..nr)
        .map(|r| mask(r).iter().filter(|&&m| m).count() as u32)
        .collect();
    for run in 0..runs {
        let counts: [u32; LANES] = std::array::from_fn(|l| {
            let v = run * LANES + l;
            if v < nqv { seen[v / gs] } else { 0 }
        });
        let sight = Sight {
            all: &w.all,
            vis: &w.vis,
            runs,
        };
        // SAFETY: AVX-512F per the caller; `scores` holds `nu × pad` values.
        let s16 = unsafe { softmax_run(&mut w.scores, sight, run, &counts) };
        sums[run * LANES..(run + 1) * LANES].copy_from_slice(&s16);
    }
    // Value sums.
    let ptrs = rows_of(true);
    if w.acc.len() < nqv * hd {
        w.acc.resize(nqv * hd, 0.0);
    }
    let groups = nqv.div_ceil(GROUP);
    let values = Values {
        ptrs: &ptrs,
        sight: Sight {
            all: &w.all,
            vis: &w.vis,
            runs,
        },
        scores: &w.scores,
        hd,
    };
    // 32 channels of every group before the next 32: those of the value rows stay in the
    // first-level cache across the groups.
    for e in (0..hd).step_by(2 * LANES) {
        for gi in 0..groups {
            // Groups of near-equal size (48 vectors: 4 × 12; 14: 2 × 7).
            let (lo, hi) = (gi * nqv / groups, (gi + 1) * nqv / groups);
            // SAFETY: AVX-512F and FMA per the caller; the pointers as above; `acc` holds
            // `nqv · hd` values.
            unsafe { add_group(&values, lo..hi, e, &mut w.acc) };
        }
    }
    for r in 0..nr {
        let mut rows_out = Vec::with_capacity(gs * hd);
        for (h, acc) in w.acc[r * gs * hd..(r + 1) * gs * hd]
            .chunks_exact(hd)
            .enumerate()
        {
            let inv = 1.0 / sums[r * gs + h];
            rows_out.extend(acc.iter().map(|a| a * inv));
        }
        let (keys, votes) = if c.votes {
            let us: Vec<usize> = (0..nu).filter(|&u| mask(r)[w.union[u]]).collect();
            let mut votes = vec![0.0f32; us.len()];
            for h in 0..gs {
                let v = r * gs + h;
                for (vote, &u) in votes.iter_mut().zip(&us) {
                    *vote += w.scores[u * pad + v] / sums[v];
                }
            }
            (us.iter().map(|&u| w.union[u]).collect(), votes)
        } else {
            (Vec::new(), Vec::new())
        };
        out.push(TaskOut {
            i: rows.start + r,
            rows: rows_out,
            keys,
            votes,
        });
    }
    true
}

/// Where each union key's row (`values`: value row) starts, as the source reads it for the
/// query position `reader[u]`; rows the source wrote into `buf` are copied into `copies`.
fn gather<S: KvSource>(
    c: &RowCtx<'_, S>,
    buf: &mut [f32],
    copies: &mut Vec<f32>,
    (b, g): (usize, usize),
    union: &[usize],
    reader: &[usize],
    values: bool,
) -> Vec<*const f32> {
    let shared = buf.as_ptr_range();
    copies.clear();
    // A row in storage, or the offset of its copy (placed once `copies` stops growing).
    let mut at: Vec<Result<*const f32, usize>> = Vec::with_capacity(union.len());
    for (&j, &pos) in union.iter().zip(reader) {
        let x = if values {
            c.kv.value(b, g, j, pos, buf)
        } else {
            c.kv.key(b, g, j, pos, buf)
        };
        if shared.contains(&x.as_ptr()) {
            at.push(Err(copies.len()));
            copies.extend_from_slice(x);
        } else {
            at.push(Ok(x.as_ptr()));
        }
    }
    at.into_iter()
        .map(|a| a.unwrap_or_else(|o| copies[o..].as_ptr()))
        .collect()
}

/// `nqv` query vectors as runs of 16: `[run][hd][16]`, lanes past the last vector zero;
/// vector `v` is the `hd` values at `base + at(v)` (one gather of 16 vectors per channel).
///
/// # Safety
/// AVX-512F; every `at(v) + hd` is within the slice `base` starts.
#[inline(always)]
unsafe fn transpose(
    base: &[f32],
    at: impl Fn(usize) -> usize,
    hd: usize,
    nqv: usize,
    qt: &mut Vec<f32>,
) {
    let runs = nqv.div_ceil(LANES);
    // Every value is written below: only grown, never cleared.
    if qt.len() < runs * hd * LANES {
        qt.resize(runs * hd * LANES, 0.0);
    }
    // SAFETY: the gathers read `at(v) + ch` below `base.len()` for the lanes in `live`; the
    // stores write run `run`'s `hd × 16` values inside `qt`.
    unsafe {
        for run in 0..runs {
            let lanes = (nqv - run * LANES).min(LANES);
            let live = lanes_below(lanes);
            let idx: [i32; LANES] = std::array::from_fn(|l| {
                if l < lanes {
                    at(run * LANES + l) as i32
                } else {
                    0
                }
            });
            let mut idx = _mm512_loadu_si512(idx.as_ptr().cast());
            let one = _mm512_set1_epi32(1);
            let out = qt.as_mut_ptr().add(run * hd * LANES);
            for ch in 0..hd {
                let x = _mm512_mask_i32gather_ps::<4>(
                    _mm512_setzero_ps(),
                    live,
                    idx,
                    base.as_ptr().cast(),
                );
                _mm512_storeu_ps(out.add(ch * LANES), x);
                idx = _mm512_add_epi32(idx, one);
            }
        }
    }
}

/// `scores[u][v] = (Σ_c q_v[c] · k_u[c]) · scale` for every query vector `v` (`runs` runs of
/// 16 in `qt`; `scores` rows of `runs × 16`) and key row `keys[u]`: one running sum per vector
/// and key, channel by channel, a fused multiply-add each (as [`super::score_keys`]).
///
/// # Safety
/// AVX-512F and FMA; each of `keys` starts `hd` readable values; `qt` holds `runs` runs of
/// `hd × 16`, `scores` `keys.len() × runs × 16` values.
#[inline(always)]
unsafe fn score(
    qt: &[f32],
    keys: &[*const f32],
    hd: usize,
    runs: usize,
    scale: f32,
    scores: &mut [f32],
) {
    let mut run = 0;
    while run < runs {
        let n = (runs - run).min(RUNS);
        // SAFETY: as the caller promises.
        unsafe {
            match n {
                1 => score_runs::<1>(qt, keys, hd, (run, runs), scale, scores),
                2 => score_runs::<2>(qt, keys, hd, (run, runs), scale, scores),
                _ => score_runs::<3>(qt, keys, hd, (run, runs), scale, scores),
            }
        }
        run += n;
    }
}

/// [`score`] for runs `run..run + R` of `runs`.
///
/// # Safety
/// As [`score`].
#[inline(always)]
unsafe fn score_runs<const R: usize>(
    qt: &[f32],
    keys: &[*const f32],
    hd: usize,
    (run, runs): (usize, usize),
    scale: f32,
    scores: &mut [f32],
) {
    let nu = keys.len();
    let pad = runs * LANES;
    // SAFETY: as the caller promises; every index below stays inside `qt`, the keys' rows and
    // `scores`.
    unsafe {
        let sc = _mm512_set1_ps(scale);
        let q: [*const f32; R] = std::array::from_fn(|r| qt.as_ptr().add((run + r) * hd * LANES));
        for kb in (0..nu).step_by(KEYS) {
            let n = (nu - kb).min(KEYS);
            let k: [*const f32; KEYS] = std::array::from_fn(|i| keys[kb + i.min(n - 1)]);
            for &p in keys.iter().skip(kb + PREFETCH_KEYS).take(KEYS) {
                prefetch_row(p, hd);
            }
            let mut acc = [[_mm512_setzero_ps(); KEYS]; R];
            for ch in 0..hd {
                let qc: [__m512; R] =
                    std::array::from_fn(|r| _mm512_loadu_ps(q[r].add(ch * LANES)));
                for (i, &ki) in k.iter().enumerate() {
                    let kc = _mm512_set1_ps(*ki.add(ch));
                    for r in 0..R {
                        acc[r][i] = _mm512_fmadd_ps(qc[r], kc, acc[r][i]);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (i, a) in acc.iter().enumerate().take(n) {
                    let at = scores.as_mut_ptr().add((kb + i) * pad + (run + r) * LANES);
                    _mm512_storeu_ps(at, _mm512_mul_ps(*a, sc));
                }
            }
        }
    }
}

/// Which query vectors see which union keys.
#[derive(Clone, Copy)]
struct Sight<'a> {
    /// Per union key, whether every row of the task sees it.
    all: &'a [bool],
    /// Per union key and run, the lanes whose rows see it (`[union][runs]`).
    vis: &'a [u16],
    /// Runs of 16 query vectors.
    runs: usize,
}

impl Sight<'_> {
    /// The lanes of run `run` that see union key `u`.
    #[inline(always)]
    fn lanes(&self, u: usize, run: usize) -> __mmask16 {
        self.vis[u * self.runs + run]
    }

    /// Whether query vector `v` sees union key `u`.
    #[inline(always)]
    fn sees(&self, u: usize, v: usize) -> bool {
        self.all[u] || self.lanes(u, v / LANES) >> (v % LANES) & 1 == 1
    }
}

/// Each lane's softmax numerators over the keys its row sees (`counts[l]` of them), in place,
/// and their sums: per lane the arithmetic of [`super::exp_sum`] on those scores in key
/// order — maximum; `exp(x − max)`; the numerators at positions `8c + l` of the first
/// `8 · (count / 8)` into running sum `l`; then the eight sums in order, then the last
/// `count % 8` numerators in order.
///
/// # Safety
/// AVX-512F.
#[inline(always)]
unsafe fn softmax_run(
    scores: &mut [f32],
    sight: Sight<'_>,
    run: usize,
    counts: &[u32; LANES],
) -> [f32; LANES] {
    let nu = sight.all.len();
    let pad = sight.runs * LANES;
    let at = |u: usize| u * pad + run * LANES;
    // SAFETY: AVX-512F per the caller; every load and store is 16 values of row `u` of
    // `scores` (`nu × pad`).
    unsafe {
        let sees = |u: usize| sight.lanes(u, run);
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        for u in 0..nu {
            let s = _mm512_loadu_ps(scores.as_ptr().add(at(u)));
            mx = _mm512_mask_max_ps(mx, sees(u), mx, s);
        }
        let mut m = [0.0f32; LANES];
        _mm512_storeu_ps(m.as_mut_ptr(), mx);
        // Where each lane's whole runs of 8 end.
        let end = _mm512_loadu_si512(
            std::array::from_fn::<u32, LANES, _>(|l| counts[l] / 8 * 8)
                .as_ptr()
                .cast(),
        );
        let mut acc = [_mm512_setzero_ps(); 8];
        // Each lane's position among the keys its row sees; while every lane agrees, one.
        let mut t = _mm512_setzero_si512();
        let mut same: Option<u32> = Some(0);
        let seven = _mm512_set1_epi32(7);
        let one = _mm512_set1_epi32(1);
        for (u, &every) in sight.all.iter().enumerate() {
            let p = scores.as_mut_ptr().add(at(u));
            let mut e = [0.0f32; LANES];
            _mm512_storeu_ps(e.as_mut_ptr(), _mm512_loadu_ps(p));
            for (x, &m) in e.iter_mut().zip(&m) {
                *x = exp(*x - m);
            }
            let ev = _mm512_loadu_ps(e.as_ptr());
            _mm512_storeu_ps(p, ev);
            let lanes = sees(u);
            let whole = _mm512_mask_cmplt_epu32_mask(lanes, t, end);
            match same {
                Some(tc) if every => {
                    let l = (tc % 8) as usize;
                    acc[l] = _mm512_mask_add_ps(acc[l], whole, acc[l], ev);
                    same = Some(tc + 1);
                }
                _ => {
                    let slot = _mm512_and_si512(t, seven);
                    for (l, a) in acc.iter_mut().enumerate() {
                        let k =
                            _mm512_mask_cmpeq_epi32_mask(whole, slot, _mm512_set1_epi32(l as i32));
                        *a = _mm512_mask_add_ps(*a, k, *a, ev);
                    }
                    same = None;
                }
            }
            t = _mm512_mask_add_epi32(t, lanes, t, one);
        }
        let mut sum = _mm512_setzero_ps();
        for a in acc {
            sum = _mm512_add_ps(sum, a);
        }
        let mut sums = [0.0f32; LANES];
        _mm512_storeu_ps(sums.as_mut_ptr(), sum);
        // The last `count % 8` numerators of each lane, in key order.
        for (l, s) in sums.iter_mut().enumerate() {
            let mut left = counts[l] % 8;
            if left == 0 {
                continue;
            }
            let mut u = nu;
            while left > 0 {
                u -= 1;
                if sees(u) >> l & 1 == 1 {
                    left -= 1;
                }
            }
            for u in u..nu {
                if sees(u) >> l & 1 == 1 {
                    *s += *scores.get_unchecked(at(u) + l);
                }
            }
        }
        sums
    }
}

/// What [`add_group`] reads: the union keys' value rows (`hd` values each), who sees them,
/// and the numerators `[union][runs × 16]`.
struct Values<'a> {
    ptrs: &'a [*const f32],
    sight: Sight<'a>,
    scores: &'a [f32],
    hd: usize,
}

/// Query vectors `vs` (at most [`GROUP`]): `acc[v][e] += p_v[u] · value_u[e]` for every union
/// key `u` in order that `v`'s row sees, 32 channels at a time with the sums in registers (the
/// operations of [`super::add_values`], one key at a time).
///
/// # Safety
/// AVX-512F and FMA; each value pointer starts `hd` readable values; `acc` holds the vectors'
/// `hd` sums each.
#[inline(always)]
unsafe fn add_group(x: &Values<'_>, vs: Range<usize>, e: usize, acc: &mut [f32]) {
    debug_assert!(vs.len() <= GROUP);
    macro_rules! sizes {
        ($($n:literal),+) => {
            match vs.len() {
                // SAFETY: as the caller promises.
                $($n => unsafe { add_n::<$n>(x, vs.start, e, acc) },)+
                _ => unreachable!("groups hold 1 to {GROUP} vectors"),
            }
        };
    }
    sizes!(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12);
}

/// [`add_group`] for `N` vectors from `v0`.
///
/// # Safety
/// As [`add_group`].
#[inline(always)]
unsafe fn add_n<const N: usize>(x: &Values<'_>, v0: usize, e: usize, acc: &mut [f32]) {
    let (hd, pad, nu) = (x.hd, x.sight.runs * LANES, x.ptrs.len());
    // SAFETY: as the caller promises; masked loads and stores touch only channels below `hd`.
    unsafe {
        {
            let m0 = lanes_below(hd - e);
            let m1 = lanes_below(hd.saturating_sub(e + LANES));
            let second = LANES.min(hd - e);
            let mut a = [[_mm512_setzero_ps(); 2]; N];
            for u in 0..nu {
                if e == 0
                    && let Some(&p) = x.ptrs.get(u + PREFETCH_KEYS)
                {
                    prefetch_row(p, hd);
                }
                let row = x.ptrs[u].add(e);
                let v0r = _mm512_maskz_loadu_ps(m0, row);
                let v1r = _mm512_maskz_loadu_ps(m1, row.add(second));
                let p = x.scores.as_ptr().add(u * pad + v0);
                if x.sight.all[u] {
                    for (n, a) in a.iter_mut().enumerate() {
                        let pn = _mm512_set1_ps(*p.add(n));
                        a[0] = _mm512_fmadd_ps(pn, v0r, a[0]);
                        a[1] = _mm512_fmadd_ps(pn, v1r, a[1]);
                    }
                } else {
                    for (n, a) in a.iter_mut().enumerate() {
                        if x.sight.sees(u, v0 + n) {
                            let pn = _mm512_set1_ps(*p.add(n));
                            a[0] = _mm512_fmadd_ps(pn, v0r, a[0]);
                            a[1] = _mm512_fmadd_ps(pn, v1r, a[1]);
                        }
                    }
                }
            }
            for (n, a) in a.iter().enumerate() {
                let out = acc.as_mut_ptr().add((v0 + n) * hd + e);
                _mm512_mask_storeu_ps(out, m0, a[0]);
                _mm512_mask_storeu_ps(out.add(second), m1, a[1]);
            }
        }
    }
}

/// The mask of the first `n` of 16 lanes.
#[inline(always)]
fn lanes_below(n: usize) -> __mmask16 {
    if n >= LANES {
        0xFFFF
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}
