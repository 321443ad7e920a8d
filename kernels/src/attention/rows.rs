//! Row-wise fused attention on the CPU: each query row walks only the keys its mask allows,
//! in cache order, with a two-pass softmax (max, then exp-sum and the weighted sum of
//! values) — no `[n_q, n_kv]` score matrix, no masked work, K/V never repeated for GQA. A
//! task takes up to 8 rows of one KV group and reads each key and value once for the rows
//! that read it the same way (a quantized page is unpacked once, not once per tree node or
//! prefill row).
//!
//! Where the CPU has AVX-512F a task runs [`wide`]'s form instead: its rows' query heads 16 to
//! a vector, scored, normalized and summed together (an 8-node tree of Qwen2.5-1.5B: ~0.5×
//! the time of the 256-bit row walk), the same operations in the same order per row.
//!
//! **Batch-invariant**: a row's arithmetic depends only on its query, the keys it sees and
//! their order — not on how many other rows, trees or sequences share the call. A tree node
//! therefore gets bitwise the result its path would get decoded alone, which keeps
//! speculative greedy output equal to plain greedy output even with 8-bit activation
//! rounding downstream (where a last-bit difference can flip a rounding).

use rayon::prelude::*;

use crate::KernelError;

#[cfg(target_arch = "x86_64")]
mod wide;

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    /// Independent sequences.
    pub batch: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (divides `n_heads`).
    pub n_kv_heads: usize,
    /// Query rows per sequence.
    pub n_q: usize,
    /// Keys per sequence (cached + new).
    pub n_kv: usize,
    /// Channels per head.
    pub head_dim: usize,
}

/// Where a call's keys and values live: contiguous tensors, or a paged (possibly quantized)
/// cache. A source may answer from its storage or write the row into `buf` (`head_dim`
/// values) and answer that — e.g. dequantized codes. `query_pos` is the position of the
/// query reading it (what a compressed cache decides the representation by).
pub trait KvSource: Sync {
    /// Key `j` of KV head `g` of sequence `b`.
    fn key<'a>(
        &'a self,
        b: usize,
        g: usize,
        j: usize,
        query_pos: usize,
        buf: &'a mut [f32],
    ) -> &'a [f32];
    /// Value `j` of KV head `g` of sequence `b`.
    fn value<'a>(
        &'a self,
        b: usize,
        g: usize,
        j: usize,
        query_pos: usize,
        buf: &'a mut [f32],
    ) -> &'a [f32];
    /// Whether key and value `j` of KV head `g` read the same for queries at `pos_a` and
    /// `pos_b` (a compressed cache reads a page as codes or in full by the query's position),
    /// so one read serves both. The default: only at the same position.
    fn same_read(&self, b: usize, g: usize, j: usize, pos_a: usize, pos_b: usize) -> bool {
        let _ = (b, g, j);
        pos_a == pos_b
    }
    /// Narrows the keys each query head of KV group `g` reads — e.g. Quest's page selection,
    /// which every head makes for itself. `keys` are the keys the mask lets the query see
    /// (increasing) and `queries` the rows of the group's heads (`group × head_dim`). Returns
    /// `false` when every head reads all of `keys` (the default: the group then reads each key
    /// once for all its heads); otherwise fills `heads[r]` (one list per head of the group)
    /// with the keys head `r` reads, a subset of `keys` in the same order.
    fn select(
        &self,
        b: usize,
        g: usize,
        query_pos: usize,
        queries: &[f32],
        keys: &[usize],
        heads: &mut [Vec<usize>],
    ) -> bool {
        let _ = (b, g, query_pos, queries, keys, heads);
        false
    }
    /// Whether [`KvSource::select`] may narrow any query's keys at all; a source that never
    /// selects says no, and callers skip gathering the queries it would be asked with. The
    /// default: it may.
    fn selects(&self) -> bool {
        true
    }
    /// Whether every key and value of KV head `g` of sequence `b` reads the same for queries
    /// at `pos_a` and `pos_b` — [`KvSource::same_read`] for every key at once, so that rows of
    /// different positions can share reads without asking key by key. The default: only at
    /// the same position (a source whose reads never depend on the position says always).
    fn reads_alike(&self, b: usize, g: usize, pos_a: usize, pos_b: usize) -> bool {
        let _ = (b, g);
        pos_a == pos_b
    }
    /// Where key (`values`: value) `j` of KV head `g` of sequence `b` is stored in full
    /// precision, if it is — a hint to fetch it into the cache ahead of its read; the default
    /// knows none.
    fn stored_at(&self, b: usize, g: usize, j: usize, values: bool) -> Option<*const f32> {
        let _ = (b, g, j, values);
        None
    }
}

/// How many keys ahead of the one being read [`walk`] asks for the next ones: a decode row's
/// keys and values stream from memory, one head's row at a time.
const PREFETCH_KEYS: usize = 8;

/// Asks for the `hd` floats at `p` to be brought into the cache (no architectural effect).
#[inline(always)]
fn prefetch_row(p: *const f32, hd: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let mut i = 0;
        while i < hd {
            // SAFETY: prefetching any address is architecturally invisible on x86.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(i).cast()) };
            i += 16;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, hd);
}

/// Row-major `[batch, n_kv_heads, n_kv, head_dim]` keys and values.
struct Contiguous<'a> {
    k: &'a [f32],
    v: &'a [f32],
    d: AttentionDims,
}

impl KvSource for Contiguous<'_> {
    fn key<'a>(&'a self, b: usize, g: usize, j: usize, _: usize, _: &'a mut [f32]) -> &'a [f32] {
        let at = ((b * self.d.n_kv_heads + g) * self.d.n_kv + j) * self.d.head_dim;
        &self.k[at..at + self.d.head_dim]
    }

    fn value<'a>(&'a self, b: usize, g: usize, j: usize, _: usize, _: &'a mut [f32]) -> &'a [f32] {
        let at = ((b * self.d.n_kv_heads + g) * self.d.n_kv + j) * self.d.head_dim;
        &self.v[at..at + self.d.head_dim]
    }

    fn same_read(&self, _: usize, _: usize, _: usize, _: usize, _: usize) -> bool {
        true
    }

    fn reads_alike(&self, _: usize, _: usize, _: usize, _: usize) -> bool {
        true
    }

    fn selects(&self) -> bool {
        false
    }
}

/// Multiply-adds below which a call runs on the calling thread: only the tiniest (a few
/// dozen keys). A decode row's attention runs serially while the other cores wait for the next
/// product, so splitting it by KV head pays well before the work hides the hand-off
/// (measured at `1 << 20` against `1 << 16`, alternated builds, 150-token prompts: Qwen2.5-0.5B
/// decode 59.6/66.3/63.5 → 73.2/71.5/72.8 tok/s, 1.5B 27.8/28.6/28.4 → 29.1/28.4/29.2).
const PARALLEL_WORK: usize = 1 << 14;

/// Most query rows one task takes (they share each key and value read).
const MAX_BLOCK_ROWS: usize = 8;

/// What every row of one call shares.
struct RowCtx<'a, S> {
    q: &'a [f32],
    kv: &'a S,
    mask: &'a [bool],
    positions: Option<&'a [usize]>,
    d: AttentionDims,
    group: usize,
    scale: f32,
    /// Whether each task also reports the attention its heads gave every key.
    votes: bool,
}

/// Per-thread buffers.
struct Scratch {
    keys: Vec<usize>,
    /// Per head of the group, the keys it reads when the source selects per head.
    heads: Vec<Vec<usize>>,
    /// The group's query rows, `[group][head_dim]`.
    queries: Vec<f32>,
    /// Per visible key, the attention the group's heads gave it (when votes are asked for).
    votes: Vec<f32>,
    /// `[group][visible keys]` scores, then probabilities.
    scores: Vec<f32>,
    /// `[group][head_dim]` accumulators, then the task's output rows.
    acc: Vec<f32>,
    buf: Vec<f32>,
    /// The group's query rows as [`score_keys`] reads them ([`transpose_queries`]).
    qt: Vec<f32>,
    /// Per head, the scores of the keys being scored together.
    block: Vec<[f32; SCORE_KEYS]>,
    /// Copies of staged key rows that were in `buf`, `[SCORE_KEYS][head_dim]`.
    copies: Vec<f32>,
    /// The 512-bit build's buffers.
    #[cfg(target_arch = "x86_64")]
    wide: wide::Wide,
}

/// One task: queries `rows` of sequence `b` for every head of KV group `g` (GQA heads share
/// the keys and values, so each is read once for all of them — and once for all the rows that
/// read it the same way, [`KvSource::same_read`]: a quantized page is unpacked once per task,
/// not once per row). Each head's arithmetic is exactly that of a lone row — its scores over
/// the visible keys in order, softmax, weighted sum — so grouping heads or rows changes speed,
/// not results. Rows whose heads select their own keys take [`per_head`].
#[inline(always)]
fn block_body<S: KvSource, const V: bool>(
    c: &RowCtx<'_, S>,
    s: &mut Scratch,
    (b, g): (usize, usize),
    rows: std::ops::Range<usize>,
    out: &mut Vec<TaskOut>,
) {
    let d = c.d;
    let (hd, gs) = (d.head_dim, c.group);
    let mut shared: Vec<RowWork> = Vec::with_capacity(rows.len());
    for i in rows {
        let pos = c.positions.map_or(0, |p| p[b * d.n_q + i]);
        let m = &c.mask[(b * d.n_q + i) * d.n_kv..(b * d.n_q + i + 1) * d.n_kv];
        s.keys.clear();
        s.keys
            .extend(m.iter().enumerate().filter(|(_, ok)| **ok).map(|(j, _)| j));
        // The group's query rows, gathered once: the source's selection and the scores read
        // them.
        s.queries.clear();
        for h in g * gs..(g + 1) * gs {
            let row = (b * d.n_heads + h) * d.n_q + i;
            s.queries.extend_from_slice(&c.q[row * hd..(row + 1) * hd]);
        }
        s.votes.clear();
        if c.votes {
            s.votes.resize(s.keys.len(), 0.0);
        }
        if c.kv.select(b, g, pos, &s.queries, &s.keys, &mut s.heads) {
            per_head::<S, V>(c, s, pos, b, g);
            out.push(TaskOut::take(s, i, c.votes));
            continue;
        }
        let nk = s.keys.len();
        shared.push(RowWork {
            pos,
            mask: m,
            nk,
            qt: {
                let mut qt = Vec::new();
                transpose_queries(&s.queries, hd, &mut qt);
                qt
            },
            block: vec![[0.0; SCORE_KEYS]; gs],
            scores: vec![0.0; gs * nk],
            stage: Vec::with_capacity(STAGE),
            copies: vec![0.0; STAGE * hd],
            staged_from: 0,
            out: TaskOut {
                i,
                rows: vec![0.0; gs * hd],
                keys: if c.votes { s.keys.clone() } else { Vec::new() },
                votes: s.votes.clone(),
            },
        });
    }
    if !shared.is_empty() {
        shared_rows::<S, V>(c, s, (b, g), &mut shared);
        out.extend(shared.into_iter().map(|w| w.out));
    }
}

/// One row of a block whose heads all read every visible key.
struct RowWork<'m> {
    pos: usize,
    mask: &'m [bool],
    /// Visible keys.
    nk: usize,
    /// The group's query rows as [`score_keys`] reads them.
    qt: Vec<f32>,
    /// Per head, the scores of the staged keys.
    block: Vec<[f32; SCORE_KEYS]>,
    /// `[group][visible keys]` scores, then probabilities.
    scores: Vec<f32>,
    /// Up to [`STAGE`] key rows not yet scored (then value rows not yet added into
    /// `out.rows`): where each starts (`head_dim` values) — in the source's storage, which
    /// the call borrows throughout, or in `copies` for a row the source wrote into the shared
    /// buffer (dequantized codes).
    stage: Vec<*const f32>,
    /// `[STAGE][head_dim]` copies of staged rows that were in the shared buffer.
    copies: Vec<f32>,
    /// The visible-key index of the first staged row.
    staged_from: usize,
    out: TaskOut,
}

/// Where a staged row is read from later: `x` itself, or — where `x` lies in the call's
/// shared buffer (`shared`), which the next read overwrites — its copy in slot `slot` of
/// `copies` (`[slots][x.len()]`).
#[inline(always)]
fn staged_at(
    x: &[f32],
    shared: &std::ops::Range<*const f32>,
    copies: &mut [f32],
    slot: usize,
) -> *const f32 {
    if shared.contains(&x.as_ptr()) {
        let copy = &mut copies[slot * x.len()..(slot + 1) * x.len()];
        copy.copy_from_slice(x);
        copy.as_ptr()
    } else {
        x.as_ptr()
    }
}

/// Value rows a row's heads add into their sums at once ([`add_values`]): each head's sums
/// are loaded and stored once per this many keys instead of once per key (each sum still adds
/// its terms one key at a time, in key order — the same operations as one key at a time).
const STAGE: usize = 8;

impl RowWork<'_> {
    /// Stages the row at `x` (`head_dim` values) ([`staged_at`]).
    #[inline(always)]
    fn stage_row(&mut self, x: &[f32], shared: &std::ops::Range<*const f32>) {
        let at = staged_at(x, shared, &mut self.copies, self.stage.len());
        self.stage.push(at);
    }

    /// Scores the staged key rows for every head (into `scores`), and empties the stage.
    #[inline(always)]
    fn flush_scores<const V: bool>(&mut self, hd: usize, scale: f32) {
        let n = self.stage.len();
        if n == 0 {
            return;
        }
        let t0 = self.staged_from;
        // SAFETY: each staged pointer starts `hd` values the source returned during this
        // call (its storage is borrowed, unchanged, for the whole call) or in `copies`.
        unsafe { score_keys::<V>(&self.qt, &self.stage, hd, scale, &mut self.block) };
        for (r, row) in self.block.iter().enumerate() {
            self.scores[r * self.nk + t0..r * self.nk + t0 + n].copy_from_slice(&row[..n]);
        }
        self.staged_from += n;
        self.stage.clear();
    }

    /// Adds the staged value rows, weighted by each head's probabilities, into the heads'
    /// sums, and empties the stage.
    #[inline(always)]
    fn flush<const V: bool>(&mut self, hd: usize) {
        let n = self.stage.len();
        if n == 0 {
            return;
        }
        let t0 = self.staged_from;
        for (r, acc) in self.out.rows.chunks_exact_mut(hd).enumerate() {
            let p = &self.scores[r * self.nk + t0..r * self.nk + t0 + n];
            // SAFETY: each staged pointer starts `hd` values the source returned during this
            // call (its storage is borrowed, unchanged, for the whole call) or in `copies`.
            unsafe { add_values::<V>(acc, p, &self.stage) };
        }
        self.staged_from += n;
        self.stage.clear();
    }
}

/// The rows of [`block_body`] that read every visible key with every head: each key (and
/// value) is fetched once per run of rows that read it the same way, and each row's heads
/// do what a lone row's would.
#[inline(always)]
fn shared_rows<S: KvSource, const V: bool>(
    c: &RowCtx<'_, S>,
    s: &mut Scratch,
    (b, g): (usize, usize),
    work: &mut [RowWork<'_>],
) {
    let hd = c.d.head_dim;
    // A row in the shared buffer is overwritten by the next read: staged ones are copied.
    let shared_buf = s.buf.as_ptr_range();
    // The callbacks are inlined into the AVX2 build (a closure is compiled for the baseline
    // target unless it is inlined into its caller: the scores had run in 128-bit lanes).
    walk(
        c,
        &mut s.buf,
        (b, g),
        work,
        false,
        #[inline(always)]
        |w, t, kj| {
            debug_assert_eq!(t, w.staged_from + w.stage.len());
            w.stage_row(kj, &shared_buf);
            if w.stage.len() == SCORE_KEYS {
                w.flush_scores::<V>(hd, c.scale);
            }
        },
    );
    for w in work.iter_mut() {
        w.flush_scores::<V>(hd, c.scale);
        w.staged_from = 0;
    }
    // Plain loops: an iterator adapter's `fold` is a function of its own, compiled for the
    // baseline target (the softmax had run in 128-bit lanes outside the AVX2 build).
    let mut sums: Vec<Vec<f32>> = Vec::with_capacity(work.len());
    for w in work.iter_mut() {
        let mut row = Vec::with_capacity(c.group);
        for scores in w.scores.chunks_exact_mut(w.nk.max(1)) {
            row.push(exp_sum(scores));
        }
        sums.push(row);
    }
    walk(
        c,
        &mut s.buf,
        (b, g),
        work,
        true,
        #[inline(always)]
        |w, t, vj| {
            debug_assert_eq!(t, w.staged_from + w.stage.len());
            w.stage_row(vj, &shared_buf);
            if w.stage.len() == STAGE {
                w.flush::<V>(hd);
            }
        },
    );
    for w in work.iter_mut() {
        w.flush::<V>(hd);
    }
    for (w, sums) in work.iter_mut().zip(&sums) {
        for (acc, &sum) in w.out.rows.chunks_exact_mut(hd).zip(sums) {
            let inv = 1.0 / sum;
            for a in acc {
                *a *= inv;
            }
        }
        if c.votes {
            for (scores, &sum) in w.scores.chunks_exact(w.nk.max(1)).zip(sums) {
                for (v, &p) in w.out.votes.iter_mut().zip(scores) {
                    *v += p / sum;
                }
            }
        }
    }
}

/// Calls `f(row, t, x)` for every key `j` in cache order and every row that sees it (`t`:
/// `j`'s index among the row's visible keys), `x` key `j` (`values`: value `j`) as that row
/// reads it — fetched once per run of rows that read it alike.
#[inline(always)]
fn walk<S: KvSource>(
    c: &RowCtx<'_, S>,
    buf: &mut [f32],
    (b, g): (usize, usize),
    work: &mut [RowWork<'_>],
    values: bool,
    mut f: impl FnMut(&mut RowWork<'_>, usize, &[f32]),
) {
    let mut cursor = vec![0usize; work.len()];
    for j in 0..c.d.n_kv {
        if let Some(p) = c.kv.stored_at(b, g, j + PREFETCH_KEYS, values) {
            prefetch_row(p, c.d.head_dim);
        }
        let mut read: Option<usize> = None;
        let mut x: &[f32] = &[];
        for (w, t) in work.iter_mut().zip(cursor.iter_mut()) {
            if !w.mask[j] {
                continue;
            }
            if read.is_none_or(|p| !c.kv.same_read(b, g, j, p, w.pos)) {
                x = if values {
                    c.kv.value(b, g, j, w.pos, buf)
                } else {
                    c.kv.key(b, g, j, w.pos, buf)
                };
                read = Some(w.pos);
            }
            f(w, *t, x);
            *t += 1;
        }
    }
}

/// [`block_body`] for a row whose heads each read their own keys (`s.heads`): every head's arithmetic is
/// the shared path's for those keys alone — same order, same operations — while each key (and
/// value) any head reads is fetched once for all of them (a quantized page unpacked once).
#[inline(always)]
fn per_head<S: KvSource, const V: bool>(
    c: &RowCtx<'_, S>,
    s: &mut Scratch,
    pos: usize,
    b: usize,
    g: usize,
) {
    let hd = c.d.head_dim;
    let gs = c.group;
    // Head r's scores live at `s.scores[start[r]..start[r + 1]]`.
    let mut start = Vec::with_capacity(gs + 1);
    start.push(0);
    for h in &s.heads {
        start.push(start.last().copied().unwrap_or(0) + h.len());
    }
    s.scores.clear();
    s.scores.resize(start[gs], 0.0);
    transpose_queries(&s.queries, hd, &mut s.qt);
    let mut cur = vec![0usize; gs];
    // Keys some head reads, scored together (every head, as the shared path does) in runs
    // of up to SCORE_KEYS; each head keeps its own keys' scores.
    let (mut staged, mut ptrs) = (
        Vec::with_capacity(SCORE_KEYS),
        Vec::with_capacity(SCORE_KEYS),
    );
    let flush = |s: &mut Scratch,
                 staged: &mut Vec<usize>,
                 ptrs: &mut Vec<*const f32>,
                 cur: &mut [usize]| {
        // SAFETY: each pointer starts `hd` values of the source's storage (borrowed for the
        // call) or of `s.copies`, untouched since it was staged.
        unsafe { score_keys::<V>(&s.qt, ptrs, hd, c.scale, &mut s.block) };
        ptrs.clear();
        for (i, &j) in staged.iter().enumerate() {
            for (r, (h, at)) in s.heads.iter().zip(cur.iter_mut()).enumerate() {
                if h.get(*at) == Some(&j) {
                    s.scores[start[r] + *at] = s.block[r][i];
                    *at += 1;
                }
            }
        }
        staged.clear();
    };
    let mut seen = cur.clone();
    let shared = s.buf.as_ptr_range();
    for ki in 0..s.keys.len() {
        let j = s.keys[ki];
        if !wanted(&s.heads, &seen, j) {
            continue;
        }
        for (h, at) in s.heads.iter().zip(seen.iter_mut()) {
            if h.get(*at) == Some(&j) {
                *at += 1;
            }
        }
        let kj = c.kv.key(b, g, j, pos, &mut s.buf);
        ptrs.push(staged_at(kj, &shared, &mut s.copies, staged.len()));
        staged.push(j);
        if staged.len() == SCORE_KEYS {
            flush(s, &mut staged, &mut ptrs, &mut cur);
        }
    }
    flush(s, &mut staged, &mut ptrs, &mut cur);
    let mut sums = Vec::with_capacity(gs);
    for r in 0..gs {
        sums.push(exp_sum(&mut s.scores[start[r]..start[r + 1]]));
    }
    s.acc.clear();
    s.acc.resize(gs * hd, 0.0);
    cur.fill(0);
    for (t, &j) in s.keys.iter().enumerate() {
        if !wanted(&s.heads, &cur, j) {
            continue;
        }
        let vj = c.kv.value(b, g, j, pos, &mut s.buf);
        for (r, ((h, at), acc)) in s
            .heads
            .iter()
            .zip(cur.iter_mut())
            .zip(s.acc.chunks_exact_mut(hd))
            .enumerate()
        {
            if h.get(*at) == Some(&j) {
                let p = s.scores[start[r] + *at];
                for (a, &x) in acc.iter_mut().zip(vj) {
                    *a = p.mul_add(x, *a);
                }
                if c.votes {
                    s.votes[t] += p / sums[r];
                }
                *at += 1;
            }
        }
    }
    for (acc, &sum) in s.acc.chunks_exact_mut(hd).zip(&sums) {
        let inv = 1.0 / sum;
        for a in acc {
            *a *= inv;
        }
    }
}

/// Whether some head's next selected key is `j` (`cursor[r]` indexes head `r`'s list).
#[inline(always)]
fn wanted(heads: &[Vec<usize>], cursor: &[usize], j: usize) -> bool {
    heads
        .iter()
        .zip(cursor)
        .any(|(h, &at)| h.get(at) == Some(&j))
}

/// Softmax numerators in place (`exp(x - max)`, [`crate::act::exp`]: in SIMD lanes, where a
/// libm call per score had cost ~1.4% of a 0.5B decode step), returning their sum (eight
/// running sums, then those in order: the same order for every call).
#[inline(always)]
fn exp_sum(scores: &mut [f32]) -> f32 {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for x in scores.iter_mut() {
        *x = crate::act::exp(*x - max);
    }
    let mut acc = [0.0f32; 8];
    let (chunks, rest) = scores.as_chunks::<8>();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    acc.iter().chain(rest).fold(0.0, |s, &x| s + x)
}

/// [`block_body`] compiled for AVX2 and FMA (256-bit lanes for the same operations in the
/// same order: the fused multiply-adds are `f32::mul_add` in the portable build, one rounding
/// each in both, so results equal the portable build bit for bit).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2<S: KvSource>(
    c: &RowCtx<'_, S>,
    s: &mut Scratch,
    bg: (usize, usize),
    rows: std::ops::Range<usize>,
    out: &mut Vec<TaskOut>,
) {
    block_body::<S, true>(c, s, bg, rows, out);
}

/// Keys scored together for every head of a group ([`score_keys`]); as many as the value
/// rows staged at once, whose buffers the key rows share.
const SCORE_KEYS: usize = 8;
const _: () = assert!(SCORE_KEYS == STAGE);

/// The query rows of a group (`[heads][head_dim]`) as [`score_keys`] reads them: per run of
/// 8 heads, `[head_dim][8]` (lane `r` is head `8·run + r`; lanes past the last head zero).
fn transpose_queries(queries: &[f32], hd: usize, out: &mut Vec<f32>) {
    let heads = queries.len() / hd.max(1);
    out.clear();
    out.resize(heads.div_ceil(8) * hd * 8, 0.0);
    for (r, q) in queries.chunks_exact(hd.max(1)).enumerate() {
        let run = &mut out[(r / 8) * hd * 8..(r / 8 + 1) * hd * 8];
        for (c, &x) in q.iter().enumerate() {
            run[c * 8 + r % 8] = x;
        }
    }
}

/// `out[r][i] = (Σ_c q_r[c] · k_i[c]) · scale` for the query rows of `qt` (one per entry of `out`)
/// ([`transpose_queries`]) and the key rows `keys` (≤ [`SCORE_KEYS`], `hd` values each): one
/// running sum per head and key, channel by channel, each term a fused multiply-add
/// (`f32::mul_add`: one rounding, as `vfmadd` — a libm call where the build has no FMA, the
/// portable build on old x86 only), so that every build, and every grouping of heads, keys and
/// rows, gives the same bits. `V`: the caller is the AVX2 build, which takes
/// [`score_keys_avx2`]: 8 heads in the lanes of a vector, 8 keys side by side, a broadcast
/// channel of a key times a channel of 8 heads — no horizontal sums. The first version summed
/// each score in 32 lanes and folded them to one float per head and key (an extract, a
/// horizontal add, a shuffle and three scalar adds per score). Measured against it, calls
/// alternated within one process (medians of 100 each): the kernel alone over 2 048 keys, one
/// row 0.77–0.79× (Qwen2.5-0.5B's heads, 7 per KV head of 64 channels) and 0.85–0.91× (1.5B's,
/// 6 of 128), 8 tree rows 0.83–0.87×, 64 prefill rows over 1 024 keys 0.67–0.73×; groups of 4
/// heads (Llama 3's) 0.98× one row and 0.91× 8 rows; groups of 3 (SmolLM2) 1.01–1.03× (3 of 4
/// lanes used, one multiply and add per 3 products); in the 0.5B, layer calls alternated,
/// decode at 2 100–2 340 keys 0.83–0.91× and prefill chunks of 512 at 512–2 048 keys
/// 0.74–0.83×. Fused multiply-adds (then) against separate ones: 0.89–0.95× at 6–7 heads, ~1.0×
/// at 3–4.
///
/// # Safety
/// Each of `keys` points at `hd` readable values.
#[inline(always)]
unsafe fn score_keys<const V: bool>(
    qt: &[f32],
    keys: &[*const f32],
    hd: usize,
    scale: f32,
    out: &mut [[f32; SCORE_KEYS]],
) {
    debug_assert!(keys.len() <= SCORE_KEYS);
    debug_assert_eq!(qt.len(), out.len().div_ceil(8) * hd * 8);
    if keys.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if V {
        // SAFETY: `V` is set only inside `block_avx2`, which runs where AVX2 and FMA were
        // detected; the keys as the caller promises.
        unsafe { score_keys_avx2(qt, keys, hd, scale, out) };
        return;
    }
    for (r, o) in out.iter_mut().enumerate() {
        let q = &qt[(r / 8) * hd * 8..];
        for (i, &k) in keys.iter().enumerate() {
            // SAFETY: as the caller promises.
            let k = unsafe { std::slice::from_raw_parts(k, hd) };
            let mut sum = 0.0f32;
            for (c, &kc) in k.iter().enumerate() {
                sum = q[c * 8 + r % 8].mul_add(kc, sum);
            }
            o[i] = sum * scale;
        }
    }
}

/// [`score_keys`] in AVX2 intrinsics: per run of 8 heads, 8 running sums (one per key, a
/// head per lane), each channel's 8 query values times the key's channel broadcast. Fewer
/// keys than 8 repeat the last one (its extra sums are dropped).
///
/// # Safety
/// The CPU must support AVX2 and FMA (the caller is compiled for them); the keys and `out`
/// as [`score_keys`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn score_keys_avx2(
    qt: &[f32],
    keys: &[*const f32],
    hd: usize,
    scale: f32,
    out: &mut [[f32; SCORE_KEYS]],
) {
    use std::arch::x86_64::*;
    let (n, heads) = (keys.len(), out.len());
    let k: [*const f32; SCORE_KEYS] = std::array::from_fn(|i| keys[i.min(n - 1)]);
    // SAFETY: the query loads read 8 floats of run `run` of `qt` (`hd · 8` per run), the
    // broadcasts one value below `hd` of a key; AVX2 per the caller.
    unsafe {
        // One run of heads in vectors of `$w` lanes: 8 running sums (one per key), then the
        // lanes that are heads, scaled, into `out`.
        macro_rules! run_of_heads {
            (
                $w:literal,
                $zero:ident,
                $load:ident,
                $set1:ident,
                $fmadd:ident,
                $mul:ident,
                $store:ident
            ) => {
                for run in 0..heads.div_ceil(8) {
                    let q = qt.as_ptr().add(run * hd * 8);
                    let lanes = (heads - 8 * run).min(8);
                    if (lanes <= 4) != ($w == 4) {
                        continue;
                    }
                    let sc = $set1(scale);
                    let mut acc = [$zero(); SCORE_KEYS];
                    for c in 0..hd {
                        let qc = $load(q.add(8 * c));
                        for (a, &ki) in acc.iter_mut().zip(&k) {
                            *a = $fmadd(qc, $set1(*ki.add(c)), *a);
                        }
                    }
                    for (i, a) in acc.iter().enumerate().take(n) {
                        let mut l = [0.0f32; $w];
                        $store(l.as_mut_ptr(), $mul(*a, sc));
                        for (r, &x) in l.iter().enumerate().take(lanes) {
                            out[8 * run + r][i] = x;
                        }
                    }
                }
            };
        }
        // Full runs in 256-bit lanes; a run of up to 4 heads (SmolLM2's groups of 3) in
        // 128-bit ones, the same sums at half the work of 8 mostly empty lanes.
        run_of_heads!(
            8,
            _mm256_setzero_ps,
            _mm256_loadu_ps,
            _mm256_set1_ps,
            _mm256_fmadd_ps,
            _mm256_mul_ps,
            _mm256_storeu_ps
        );
        run_of_heads!(
            4,
            _mm_setzero_ps,
            _mm_loadu_ps,
            _mm_set1_ps,
            _mm_fmadd_ps,
            _mm_mul_ps,
            _mm_storeu_ps
        );
    }
}

/// `acc[e] += p[i] · rows[i][e]` for each staged row `i` in order: per value the same
/// fused multiply-adds as adding one key at a time, with the sums held in registers
/// across the rows. `V`: the AVX2 build ([`add_values_avx2`], the same operations).
///
/// # Safety
/// `rows` has one entry per probability, each pointing at `acc.len()` readable values.
#[inline(always)]
unsafe fn add_values<const V: bool>(acc: &mut [f32], p: &[f32], rows: &[*const f32]) {
    let hd = acc.len();
    assert_eq!(rows.len(), p.len(), "one staged row per probability");
    #[cfg(target_arch = "x86_64")]
    if V {
        // SAFETY: `V` is set only inside `block_avx2`, which runs where AVX2 and FMA were
        // detected; the rows as the caller promises.
        unsafe { add_values_avx2(acc, p, rows) };
        return;
    }
    // SAFETY: as the caller promises.
    let row = |i: usize| unsafe { std::slice::from_raw_parts(rows[i], hd) };
    let (chunks, _) = acc.as_chunks_mut::<8>();
    for (ci, a) in chunks.iter_mut().enumerate() {
        let mut x = *a;
        for (i, &pi) in p.iter().enumerate() {
            let v = &row(i)[8 * ci..8 * ci + 8];
            for l in 0..8 {
                x[l] = pi.mul_add(v[l], x[l]);
            }
        }
        *a = x;
    }
    for (e, a) in acc.iter_mut().enumerate().skip(hd / 8 * 8) {
        for (i, &pi) in p.iter().enumerate() {
            *a = pi.mul_add(row(i)[e], *a);
        }
    }
}

/// [`add_values`] in AVX2 intrinsics, 32 values at a time (four independent chains).
///
/// # Safety
/// The CPU must support AVX2 and FMA (the caller is compiled for them); the rows as
/// [`add_values`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn add_values_avx2(acc: &mut [f32], p: &[f32], rows: &[*const f32]) {
    use std::arch::x86_64::*;
    let hd = acc.len();
    // SAFETY: every access is below `hd` in `acc` and in each row.
    unsafe {
        let pa = acc.as_mut_ptr();
        let mut e = 0;
        while e + 32 <= hd {
            let mut x: [__m256; 4] = std::array::from_fn(|v| _mm256_loadu_ps(pa.add(e + 8 * v)));
            for (i, &pi) in p.iter().enumerate() {
                let w = _mm256_set1_ps(pi);
                for (v, x) in x.iter_mut().enumerate() {
                    let r = _mm256_loadu_ps(rows[i].add(e + 8 * v));
                    *x = _mm256_fmadd_ps(w, r, *x);
                }
            }
            for (v, x) in x.iter().enumerate() {
                _mm256_storeu_ps(pa.add(e + 8 * v), *x);
            }
            e += 32;
        }
        while e + 8 <= hd {
            let mut x = _mm256_loadu_ps(pa.add(e));
            for (i, &pi) in p.iter().enumerate() {
                let r = _mm256_loadu_ps(rows[i].add(e));
                x = _mm256_fmadd_ps(_mm256_set1_ps(pi), r, x);
            }
            _mm256_storeu_ps(pa.add(e), x);
            e += 8;
        }
        while e < hd {
            for (i, &pi) in p.iter().enumerate() {
                *pa.add(e) = pi.mul_add(*rows[i].add(e), *pa.add(e));
            }
            e += 1;
        }
    }
}

/// Masked grouped-query attention, one task per query row; same contract as
/// [`attention_reference`](super::attention_reference).
///
/// # Shapes (row-major host data)
/// - `q`: `[batch, n_heads, n_q, head_dim]`
/// - `k`, `v`: `[batch, n_kv_heads, n_kv, head_dim]`
/// - `mask`: `[batch, n_q, n_kv]`
/// - returns `[batch, n_heads, n_q, head_dim]`
///
/// # Errors
/// [`KernelError::Shape`] if a length disagrees with `dims`, `n_heads` is not a multiple of
/// `n_kv_heads`, or a mask row allows no key.
pub fn attention_rows(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[bool],
    d: AttentionDims,
) -> Result<Vec<f32>, KernelError> {
    let nk = d.batch * d.n_kv_heads * d.n_kv * d.head_dim;
    if k.len() != nk || v.len() != nk {
        return Err(KernelError::Shape(format!(
            "attention operands k {} v {} for {d:?}",
            k.len(),
            v.len()
        )));
    }
    attention_rows_with(q, &Contiguous { k, v, d }, mask, None, d)
}

/// [`attention_rows`] over any [`KvSource`] (e.g. a paged cache), `d.n_kv` keys per sequence;
/// `positions` (`[batch, n_q]`) are the queries' positions, handed to the source.
///
/// # Errors
/// As [`attention_rows`], and for `positions` of the wrong length.
pub fn attention_rows_with<S: KvSource>(
    q: &[f32],
    kv: &S,
    mask: &[bool],
    positions: Option<&[usize]>,
    d: AttentionDims,
) -> Result<Vec<f32>, KernelError> {
    attention_impl(q, kv, mask, positions, d, false, Build::best()).map(|(out, _)| out)
}

/// [`attention_rows_with`], also returning the attention every query row gave every key,
/// per KV head and summed over its query heads (H2O's votes, Zhang et al., NeurIPS 2023, arXiv
/// 2306.14048): `[batch, n_kv_heads, n_q, n_kv]`, 0 for keys the row's heads did not read.
/// Summed in head order, so the votes are as batch-invariant as the outputs.
///
/// # Errors
/// As [`attention_rows_with`].
pub fn attention_rows_voting<S: KvSource>(
    q: &[f32],
    kv: &S,
    mask: &[bool],
    positions: Option<&[usize]>,
    d: AttentionDims,
) -> Result<(Vec<f32>, Vec<f32>), KernelError> {
    attention_impl(q, kv, mask, positions, d, true, Build::best())
}

/// Which compiled form of the row kernels a call runs; all give the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Build {
    /// [`wide::block`] where it applies (AVX-512F), else as `Avx2`.
    Wide,
    /// [`block_avx2`]: AVX2 and FMA.
    Avx2,
    /// [`block_body`] for the baseline target.
    Portable,
}

impl Build {
    /// The fastest form this CPU runs.
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return if std::arch::is_x86_feature_detected!("avx512f") {
                Self::Wide
            } else {
                Self::Avx2
            };
        }
        Self::Portable
    }
}

fn attention_impl<S: KvSource>(
    q: &[f32],
    kv: &S,
    mask: &[bool],
    positions: Option<&[usize]>,
    d: AttentionDims,
    votes: bool,
    build: Build,
) -> Result<(Vec<f32>, Vec<f32>), KernelError> {
    let hd = d.head_dim;
    let bad = |m: String| Err(KernelError::Shape(m));
    if d.n_kv_heads == 0 || !d.n_heads.is_multiple_of(d.n_kv_heads) {
        return bad(format!(
            "{} heads over {} KV heads",
            d.n_heads, d.n_kv_heads
        ));
    }
    let nq = d.batch * d.n_heads * d.n_q * hd;
    if q.len() != nq
        || mask.len() != d.batch * d.n_q * d.n_kv
        || positions.is_some_and(|p| p.len() != d.batch * d.n_q)
    {
        return bad(format!(
            "attention operands q {} mask {} for {d:?}",
            q.len(),
            mask.len()
        ));
    }
    if let Some(r) = mask
        .chunks(d.n_kv.max(1))
        .position(|row| !row.contains(&true))
    {
        return bad(format!("mask row {r} attends to nothing"));
    }
    let ctx = RowCtx {
        q,
        kv,
        mask,
        positions,
        d,
        group: d.n_heads / d.n_kv_heads,
        scale: (hd as f32).powf(-0.5),
        votes,
    };
    let mut out = vec![0.0f32; nq];
    // Rows per task: enough tasks for every thread, at most 8 rows sharing each key read.
    let rows_total = d.batch * d.n_kv_heads * d.n_q;
    let per_task = (rows_total / rayon::current_num_threads().max(1)).clamp(1, MAX_BLOCK_ROWS);
    let blocks = d.n_q.div_ceil(per_task);
    let run = |s: &mut Scratch, task: usize| -> Vec<TaskOut> {
        let blk = task % blocks;
        let g = (task / blocks) % d.n_kv_heads;
        let b = task / (blocks * d.n_kv_heads);
        let rows = blk * per_task..((blk + 1) * per_task).min(d.n_q);
        let mut outs = Vec::with_capacity(rows.len());
        // SAFETY: `build` is `Wide` only where AVX-512F, AVX2 and FMA were detected
        // ([`Build::best`]).
        #[cfg(target_arch = "x86_64")]
        if build == Build::Wide && unsafe { wide::block(&ctx, s, (b, g), rows.clone(), &mut outs) }
        {
            return outs;
        }
        #[cfg(target_arch = "x86_64")]
        if build != Build::Portable {
            // SAFETY: `Wide` and `Avx2` only where AVX2 and FMA were detected.
            unsafe { block_avx2(&ctx, s, (b, g), rows, &mut outs) };
            return outs;
        }
        block_body::<S, false>(&ctx, s, (b, g), rows, &mut outs);
        outs
    };
    let scratch = || Scratch {
        keys: Vec::new(),
        heads: vec![Vec::new(); ctx.group],
        queries: Vec::new(),
        votes: Vec::new(),
        scores: Vec::new(),
        acc: Vec::new(),
        buf: vec![0.0f32; hd],
        qt: Vec::new(),
        block: vec![[0.0; SCORE_KEYS]; ctx.group],
        copies: vec![0.0; SCORE_KEYS * hd],
        #[cfg(target_arch = "x86_64")]
        wide: wide::Wide::default(),
    };
    let tasks = d.batch * d.n_kv_heads * blocks;
    // Tiny calls cost less than waking the pool; either way each row is computed by the same
    // code, so results do not depend on it.
    let results: Vec<Vec<TaskOut>> = if d.batch * d.n_heads * d.n_q * d.n_kv * hd < PARALLEL_WORK {
        let mut s = scratch();
        (0..tasks).map(|t| run(&mut s, t)).collect()
    } else {
        (0..tasks)
            .into_par_iter()
            .map_init(scratch, |s, t| run(s, t))
            .collect()
    };
    let mut voted = vec![
        0.0f32;
        if votes {
            d.batch * d.n_kv_heads * d.n_q * d.n_kv
        } else {
            0
        }
    ];
    for (task, outs) in results.iter().enumerate() {
        let g = (task / blocks) % d.n_kv_heads;
        let b = task / (blocks * d.n_kv_heads);
        for res in outs {
            let i = res.i;
            for (r, row) in res.rows.chunks_exact(hd).enumerate() {
                let at = ((b * d.n_heads + g * ctx.group + r) * d.n_q + i) * hd;
                out[at..at + hd].copy_from_slice(row);
            }
            if votes {
                let dst = &mut voted[((b * d.n_kv_heads + g) * d.n_q + i) * d.n_kv..];
                for (&j, &v) in res.keys.iter().zip(&res.votes) {
                    dst[j] = v;
                }
            }
        }
    }
    Ok((out, voted))
}

/// One row's results (placed by `i`, in any order).
struct TaskOut {
    /// The query row.
    i: usize,
    /// `[group][head_dim]` outputs.
    rows: Vec<f32>,
    /// The keys `votes` are for.
    keys: Vec<usize>,
    votes: Vec<f32>,
}

impl TaskOut {
    fn take(s: &Scratch, i: usize, votes: bool) -> Self {
        Self {
            i,
            rows: s.acc.clone(),
            keys: if votes { s.keys.clone() } else { Vec::new() },
            votes: s.votes.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::attention_reference;
    use burn::backend::Flex;
    use burn::tensor::{Tensor, TensorData};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    type B = Flex;

    fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// A tree-shaped mask: `cached` keys visible to all, then each new row sees its random
    /// ancestors (parent index below its own) and itself.
    fn tree_mask(rng: &mut StdRng, batch: usize, n_q: usize, cached: usize) -> Vec<bool> {
        let n_kv = cached + n_q;
        let mut m = vec![false; batch * n_q * n_kv];
        for b in 0..batch {
            let parents: Vec<Option<usize>> = (0..n_q)
                .map(|i| (i > 0).then(|| rng.random_range(0..i)))
                .collect();
            for i in 0..n_q {
                let row = &mut m[(b * n_q + i) * n_kv..(b * n_q + i + 1) * n_kv];
                row[..cached].fill(true);
                let mut node = Some(i);
                while let Some(j) = node {
                    row[cached + j] = true;
                    node = parents[j];
                }
            }
        }
        m
    }

    fn reference(q: &[f32], k: &[f32], v: &[f32], mask: &[bool], d: AttentionDims) -> Vec<f32> {
        let dev = Default::default();
        let t = |x: &[f32], s: [usize; 4]| {
            Tensor::<B, 4>::from_data(TensorData::new(x.to_vec(), s), &dev)
        };
        let qs = [d.batch, d.n_heads, d.n_q, d.head_dim];
        let ks = [d.batch, d.n_kv_heads, d.n_kv, d.head_dim];
        let m = Tensor::<B, 3, burn::tensor::Bool>::from_data(
            TensorData::new(mask.to_vec(), [d.batch, d.n_q, d.n_kv]),
            &dev,
        );
        attention_reference(t(q, qs), t(k, ks), t(v, ks), m)
            .into_data()
            .to_vec()
            .unwrap()
    }

    /// The AVX2 build's scores and value sums are bitwise the portable build's, for head sizes
    /// with and without whole vectors, every number of heads and keys scored together, and
    /// staged runs of every length.
    #[test]
    fn avx2_and_portable_builds_agree_bitwise() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            let mut rng = StdRng::seed_from_u64(11);
            for hd in [1usize, 7, 8, 24, 32, 40, 64, 80, 100, 128, 256] {
                // Scores of 1–17 heads (runs of 8 and partial ones) for 1–8 keys at once.
                let keys = random(&mut rng, SCORE_KEYS * hd);
                for heads in [1usize, 2, 6, 7, 8, 9, 12, 17] {
                    let queries = random(&mut rng, heads * hd);
                    let mut qt = Vec::new();
                    transpose_queries(&queries, hd, &mut qt);
                    for n in 1..=SCORE_KEYS {
                        let ptrs: Vec<*const f32> =
                            keys.chunks_exact(hd).take(n).map(<[f32]>::as_ptr).collect();
                        let (mut x, mut y) = (
                            vec![[0.0; SCORE_KEYS]; heads],
                            vec![[0.0; SCORE_KEYS]; heads],
                        );
                        // SAFETY: each pointer starts `hd` values of `keys`.
                        unsafe {
                            score_keys::<false>(&qt, &ptrs, hd, 0.125, &mut x);
                            score_keys::<true>(&qt, &ptrs, hd, 0.125, &mut y);
                        }
                        for r in 0..heads {
                            for i in 0..n {
                                // Both as one running sum in channel order.
                                let k = &keys[i * hd..(i + 1) * hd];
                                let q = &queries[r * hd..(r + 1) * hd];
                                let one =
                                    q.iter().zip(k).fold(0.0f32, |s, (a, b)| a.mul_add(*b, s))
                                        * 0.125;
                                assert_eq!(
                                    x[r][i].to_bits(),
                                    y[r][i].to_bits(),
                                    "hd {hd}, {heads} heads, {n} keys"
                                );
                                assert_eq!(
                                    x[r][i].to_bits(),
                                    one.to_bits(),
                                    "hd {hd}, {heads} heads, {n} keys"
                                );
                            }
                        }
                    }
                }
                for n in 1..=STAGE {
                    let p = random(&mut rng, n);
                    let rows = random(&mut rng, n * hd);
                    let start = random(&mut rng, hd);
                    let (mut x, mut y, mut one) = (start.clone(), start.clone(), start);
                    let at: Vec<*const f32> = rows.chunks_exact(hd).map(|r| r.as_ptr()).collect();
                    // SAFETY: each pointer starts `hd` values of `rows`.
                    unsafe {
                        add_values::<false>(&mut x, &p, &at);
                        add_values::<true>(&mut y, &p, &at);
                    }
                    // And both as adding one key at a time.
                    for (i, &pi) in p.iter().enumerate() {
                        for (a, &v) in one.iter_mut().zip(&rows[i * hd..(i + 1) * hd]) {
                            *a = pi.mul_add(v, *a);
                        }
                    }
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&x), bits(&y), "hd {hd}, {n} rows");
                    assert_eq!(bits(&x), bits(&one), "hd {hd}, {n} rows");
                }
            }
        }
    }

    #[test]
    fn agrees_with_the_tensor_reference_on_ragged_shapes() {
        let mut rng = StdRng::seed_from_u64(11);
        for &(batch, n_heads, n_kv_heads, n_q, cached, head_dim) in &[
            (1, 1, 1, 1, 0, 8),
            (1, 4, 2, 1, 37, 64),
            (2, 6, 3, 5, 11, 12),
            (1, 9, 3, 17, 40, 20),
            (3, 2, 1, 8, 0, 33),
            (1, 14, 2, 64, 100, 64),
        ] {
            let n_kv = cached + n_q;
            let d = AttentionDims {
                batch,
                n_heads,
                n_kv_heads,
                n_q,
                n_kv,
                head_dim,
            };
            let q = random(&mut rng, batch * n_heads * n_q * head_dim);
            let k = random(&mut rng, batch * n_kv_heads * n_kv * head_dim);
            let v = random(&mut rng, k.len());
            let mask = tree_mask(&mut rng, batch, n_q, cached);
            let got = attention_rows(&q, &k, &v, &mask, d).unwrap();
            let want = reference(&q, &k, &v, &mask, d);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(worst < 2e-6, "{d:?}: {worst}");
        }
    }

    /// A source whose keys and values read differently past a position (like a quantized
    /// page past the window): key `j` is scaled once the query is more than `lag` past it.
    struct Aging<'a> {
        inner: Contiguous<'a>,
        lag: usize,
        /// Whether `same_read` tells the truth (a lying source must change results).
        honest: bool,
    }

    impl Aging<'_> {
        fn aged(&self, j: usize, pos: usize) -> bool {
            j + self.lag < pos
        }

        fn read<'a>(&self, x: &[f32], j: usize, pos: usize, buf: &'a mut [f32]) -> &'a [f32] {
            let scale = if self.aged(j, pos) { 1.25 } else { 1.0 };
            for (o, &v) in buf.iter_mut().zip(x) {
                *o = v * scale;
            }
            buf
        }
    }

    impl KvSource for Aging<'_> {
        fn key<'a>(
            &'a self,
            b: usize,
            g: usize,
            j: usize,
            p: usize,
            x: &'a mut [f32],
        ) -> &'a [f32] {
            let k = self.inner.key(b, g, j, p, &mut []);
            self.read(k, j, p, x)
        }

        fn value<'a>(
            &'a self,
            b: usize,
            g: usize,
            j: usize,
            p: usize,
            x: &'a mut [f32],
        ) -> &'a [f32] {
            let v = self.inner.value(b, g, j, p, &mut []);
            self.read(v, j, p, x)
        }

        fn same_read(&self, _: usize, _: usize, j: usize, a: usize, b: usize) -> bool {
            !self.honest || self.aged(j, a) == self.aged(j, b)
        }
    }

    /// Rows that share a task read a key once only where their positions read it alike: every
    /// row of a causal block equals the same row computed alone, bit for bit.
    #[test]
    fn rows_sharing_reads_equal_rows_alone_where_positions_differ() {
        let mut rng = StdRng::seed_from_u64(17);
        let (h, kvh, hd, cached, n) = (4, 2, 16, 11, 12);
        let n_kv = cached + n;
        let k = random(&mut rng, kvh * n_kv * hd);
        let v = random(&mut rng, k.len());
        let q = random(&mut rng, h * n * hd);
        let mask: Vec<bool> = (0..n)
            .flat_map(|i| (0..n_kv).map(move |j| j <= cached + i))
            .collect();
        let positions: Vec<usize> = (0..n).map(|i| cached + i).collect();
        let d = AttentionDims {
            batch: 1,
            n_heads: h,
            n_kv_heads: kvh,
            n_q: n,
            n_kv,
            head_dim: hd,
        };
        let source = |honest| Aging {
            inner: Contiguous { k: &k, v: &v, d },
            lag: 4,
            honest,
        };
        // One thread: 8 rows per task whatever the machine (tasks are sized to the pool).
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let run = |honest| {
            pool.install(|| {
                attention_rows_with(&q, &source(honest), &mask, Some(&positions), d).unwrap()
            })
        };
        let (together, lying) = (run(true), run(false));
        assert_ne!(
            together, lying,
            "a shared read across representations shows"
        );
        for i in 0..n {
            let qi: Vec<f32> = (0..h)
                .flat_map(|hh| q[(hh * n + i) * hd..(hh * n + i + 1) * hd].to_vec())
                .collect();
            let alone = attention_rows_with(
                &qi,
                &source(true),
                &mask[i * n_kv..(i + 1) * n_kv],
                Some(&positions[i..=i]),
                AttentionDims { n_q: 1, ..d },
            )
            .unwrap();
            for hh in 0..h {
                assert_eq!(
                    &together[(hh * n + i) * hd..(hh * n + i + 1) * hd],
                    &alone[hh * hd..(hh + 1) * hd],
                    "row {i}, head {hh}"
                );
            }
        }
    }

    /// A row's result does not depend on the other rows of the call: a tree node equals its
    /// path computed alone (keys compacted to the path), bit for bit.
    #[test]
    fn tree_rows_equal_their_path_alone_bitwise() {
        let mut rng = StdRng::seed_from_u64(5);
        let (h, kvh, hd, cached) = (4, 2, 16, 9);
        // Tree: 0 root; 1, 2 children of 0; 3 child of 2; 4 child of 3.
        let parents = [None, Some(0), Some(0), Some(2), Some(3)];
        let n = parents.len();
        let n_kv = cached + n;
        let k = random(&mut rng, kvh * n_kv * hd);
        let v = random(&mut rng, k.len());
        let q = random(&mut rng, h * n * hd);
        let mut mask = vec![false; n * n_kv];
        for i in 0..n {
            mask[i * n_kv..i * n_kv + cached].fill(true);
            let mut node = Some(i);
            while let Some(j) = node {
                mask[i * n_kv + cached + j] = true;
                node = parents[j];
            }
        }
        let d = AttentionDims {
            batch: 1,
            n_heads: h,
            n_kv_heads: kvh,
            n_q: n,
            n_kv,
            head_dim: hd,
        };
        let tree = attention_rows(&q, &k, &v, &mask, d).unwrap();
        // Node 4 alone: path 0, 2, 3, 4 after the cache, one query row.
        let path = [0usize, 2, 3, 4];
        let rows: Vec<usize> = (0..cached).chain(path.iter().map(|p| cached + p)).collect();
        let pick = |x: &[f32]| -> Vec<f32> {
            (0..kvh)
                .flat_map(|g| {
                    rows.iter()
                        .flat_map(move |&r| (0..hd).map(move |c| (g, r, c)))
                })
                .map(|(g, r, c)| x[(g * n_kv + r) * hd + c])
                .collect()
        };
        let (k1, v1) = (pick(&k), pick(&v));
        let q1: Vec<f32> = (0..h)
            .flat_map(|hh| q[(hh * n + 4) * hd..(hh * n + 5) * hd].to_vec())
            .collect();
        let d1 = AttentionDims {
            n_q: 1,
            n_kv: rows.len(),
            ..d
        };
        let alone = attention_rows(&q1, &k1, &v1, &vec![true; rows.len()], d1).unwrap();
        for hh in 0..h {
            assert_eq!(
                &tree[(hh * n + 4) * hd..(hh * n + 5) * hd],
                &alone[hh * hd..(hh + 1) * hd],
                "head {hh}"
            );
        }
    }

    /// Contiguous keys and values whose selection drops, for the group's head `r`, every key
    /// `j > 0` with `(j + r) % 3 == 1` (each head reads its own keys).
    struct Sparse<'a>(Contiguous<'a>);

    fn sparse_reads(r: usize, j: usize) -> bool {
        j == 0 || (j + r) % 3 != 1
    }

    impl KvSource for Sparse<'_> {
        fn key<'a>(
            &'a self,
            b: usize,
            g: usize,
            j: usize,
            p: usize,
            x: &'a mut [f32],
        ) -> &'a [f32] {
            self.0.key(b, g, j, p, x)
        }
        fn value<'a>(
            &'a self,
            b: usize,
            g: usize,
            j: usize,
            p: usize,
            x: &'a mut [f32],
        ) -> &'a [f32] {
            self.0.value(b, g, j, p, x)
        }
        fn select(
            &self,
            _: usize,
            _: usize,
            _: usize,
            q: &[f32],
            keys: &[usize],
            heads: &mut [Vec<usize>],
        ) -> bool {
            assert_eq!(q.len(), heads.len() * self.0.d.head_dim);
            for (r, h) in heads.iter_mut().enumerate() {
                h.clear();
                h.extend(keys.iter().copied().filter(|&j| sparse_reads(r, j)));
            }
            true
        }
    }

    /// The 512-bit build (rows × heads, 16 query vectors to a vector) gives every output and
    /// every vote bit for bit as the AVX2 and the portable builds: GQA groups of 1 to 32 heads,
    /// head sizes with and without whole vectors, tree and causal masks over 1 to 13 rows (1 to
    /// 8 per task), keys read in storage or written into the source's buffer, reads that change
    /// with the query's position (where the 512-bit build must fall back) and per-head
    /// selection (Quest's rows, likewise).
    #[test]
    fn wide_blocks_equal_the_row_builds_bitwise() {
        let builds: &[Build] = if Build::best() == Build::Wide {
            &[Build::Wide, Build::Avx2, Build::Portable]
        } else if Build::best() == Build::Avx2 {
            eprintln!("no AVX-512F here: the 512-bit build is not run");
            &[Build::Avx2, Build::Portable]
        } else {
            eprintln!("no AVX2 here: only the portable build is run");
            return;
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut rng = StdRng::seed_from_u64(23);
        let mut runs = 0;
        for &(h, kvh) in &[(12, 2), (14, 2), (4, 2), (3, 1), (32, 1), (8, 8)] {
            for &hd in &[8usize, 24, 40, 64, 128] {
                let n_q = [1usize, 2, 5, 8, 13][rng.random_range(0..5)];
                let cached = [0usize, 3, 37, 130][rng.random_range(0..4)];
                let batch = rng.random_range(1..=2);
                let n_kv = cached + n_q;
                let d = AttentionDims {
                    batch,
                    n_heads: h,
                    n_kv_heads: kvh,
                    n_q,
                    n_kv,
                    head_dim: hd,
                };
                let k = random(&mut rng, batch * kvh * n_kv * hd);
                let v = random(&mut rng, k.len());
                let q = random(&mut rng, batch * h * n_q * hd);
                let mask = if rng.random_bool(0.5) {
                    tree_mask(&mut rng, batch, n_q, cached)
                } else {
                    (0..batch * n_q)
                        .flat_map(|bi| (0..n_kv).map(move |j| j <= cached + bi % n_q))
                        .collect()
                };
                let positions: Vec<usize> = (0..batch * n_q).map(|i| cached + i % n_q).collect();
                let plain = Contiguous { k: &k, v: &v, d };
                let aging = Aging {
                    inner: Contiguous { k: &k, v: &v, d },
                    lag: 4,
                    honest: true,
                };
                let sparse = Sparse(Contiguous { k: &k, v: &v, d });
                for votes in [false, true] {
                    let mut outs: Vec<[Vec<u32>; 6]> = Vec::new();
                    for &build in builds {
                        let (a, av) =
                            attention_impl(&q, &plain, &mask, Some(&positions), d, votes, build)
                                .unwrap();
                        let (b, bv) =
                            attention_impl(&q, &aging, &mask, Some(&positions), d, votes, build)
                                .unwrap();
                        let (c, cv) =
                            attention_impl(&q, &sparse, &mask, Some(&positions), d, votes, build)
                                .unwrap();
                        outs.push([
                            bits(&a),
                            bits(&av),
                            bits(&b),
                            bits(&bv),
                            bits(&c),
                            bits(&cv),
                        ]);
                    }
                    for (o, &build) in outs.iter().zip(builds).skip(1) {
                        for (i, (x, y)) in o.iter().zip(&outs[0]).enumerate() {
                            assert!(
                                x == y,
                                "{build:?} against {:?}: output {i} (plain, votes, aging, votes, \
                                 sparse, votes), {h} heads over {kvh}, hd {hd}, {n_q} rows over \
                                 {cached} cached, batch {batch}, votes {votes}",
                                builds[0]
                            );
                        }
                    }
                    runs += 1;
                }
            }
        }
        assert_eq!(runs, 60);
    }

    /// Per-head selection: each head's rows equal attention with a mask narrowed to that
    /// head's keys, and the votes are each row's attention probabilities summed over a KV
    /// head's query heads: per row and KV head they add up to the group size and vanish on
    /// keys no head read.
    #[test]
    fn selection_narrows_keys_per_head_and_votes_are_probabilities() {
        let mut rng = StdRng::seed_from_u64(21);
        let d = AttentionDims {
            batch: 2,
            n_heads: 6,
            n_kv_heads: 2,
            n_q: 4,
            n_kv: 13,
            head_dim: 8,
        };
        let group = d.n_heads / d.n_kv_heads;
        let q = random(&mut rng, d.batch * d.n_heads * d.n_q * d.head_dim);
        let k = random(&mut rng, d.batch * d.n_kv_heads * d.n_kv * d.head_dim);
        let v = random(&mut rng, k.len());
        let mask = tree_mask(&mut rng, d.batch, d.n_q, 9);
        let narrowed = |r: usize| -> Vec<bool> {
            mask.iter()
                .enumerate()
                .map(|(i, &m)| m && sparse_reads(r, i % d.n_kv))
                .collect()
        };
        let src = Sparse(Contiguous { k: &k, v: &v, d });
        let (got, votes) = attention_rows_voting(&q, &src, &mask, None, d).unwrap();
        let row = d.n_q * d.head_dim;
        for r in 0..group {
            let want = attention_rows(&q, &k, &v, &narrowed(r), d).unwrap();
            for (h, (a, b)) in got
                .chunks_exact(row)
                .zip(want.chunks_exact(row))
                .enumerate()
            {
                if h % group == r {
                    assert_eq!(a, b, "head {h}");
                }
            }
        }
        for (n, vs) in votes.chunks_exact(d.n_kv).enumerate() {
            let (b, i) = (n / (d.n_kv_heads * d.n_q), n % d.n_q);
            let ms = &mask[(b * d.n_q + i) * d.n_kv..(b * d.n_q + i + 1) * d.n_kv];
            let total: f32 = vs.iter().sum();
            assert!((total - group as f32).abs() < 1e-4, "row {n}: {total}");
            for (j, (&x, &m)) in vs.iter().zip(ms).enumerate() {
                let read = m && (0..group).any(|r| sparse_reads(r, j));
                assert!(read || x == 0.0, "row {n} voted for unread key {j}");
                assert!(!read || x > 0.0, "row {n} gave no attention to key {j}");
            }
        }
        assert_eq!(
            attention_rows_with(&q, &src, &mask, None, d).unwrap(),
            got,
            "votes change nothing"
        );
    }

    /// Without selection the votes are still per KV head: each group's rows sum to its size.
    #[test]
    fn votes_are_per_kv_head() {
        let mut rng = StdRng::seed_from_u64(22);
        let d = AttentionDims {
            batch: 1,
            n_heads: 4,
            n_kv_heads: 2,
            n_q: 3,
            n_kv: 7,
            head_dim: 4,
        };
        let q = random(&mut rng, d.n_heads * d.n_q * d.head_dim);
        let k = random(&mut rng, d.n_kv_heads * d.n_kv * d.head_dim);
        let v = random(&mut rng, k.len());
        let mask = tree_mask(&mut rng, 1, d.n_q, 4);
        let src = Contiguous { k: &k, v: &v, d };
        let (_, votes) = attention_rows_voting(&q, &src, &mask, None, d).unwrap();
        assert_eq!(votes.len(), d.n_kv_heads * d.n_q * d.n_kv);
        for vs in votes.chunks_exact(d.n_kv) {
            assert!((vs.iter().sum::<f32>() - 2.0).abs() < 1e-5);
        }
        // The two KV heads' keys differ, so their votes do too.
        assert_ne!(votes[..d.n_q * d.n_kv], votes[d.n_q * d.n_kv..]);
    }

    #[test]
    fn bad_operands_are_errors() {
        let d = AttentionDims {
            batch: 1,
            n_heads: 3,
            n_kv_heads: 2,
            n_q: 1,
            n_kv: 1,
            head_dim: 4,
        };
        assert!(attention_rows(&[0.0; 12], &[0.0; 8], &[0.0; 8], &[true], d).is_err());
        let d = AttentionDims { n_heads: 2, ..d };
        assert!(attention_rows(&[0.0; 8], &[0.0; 8], &[0.0; 8], &[false], d).is_err());
        assert!(attention_rows(&[0.0; 7], &[0.0; 8], &[0.0; 8], &[true], d).is_err());
        assert!(attention_rows(&[0.0; 8], &[0.0; 8], &[0.0; 8], &[true], d).is_ok());
    }
}
