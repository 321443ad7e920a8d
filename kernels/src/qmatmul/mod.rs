//! Activations × weights kept in their GGUF block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
//! Q5_K, Q6_K), for few rows: 1 (decode) to a few dozen (tree verification, small prefill
//! chunks).
//!
//! Decode on a CPU is bound by the bytes of weights each step reads; a 4-bit matrix is 1/8 of
//! its f32 copy. The activations are quantized to 8 bits per block ([`Q8Acts`], as llama.cpp
//! does), so each weight block is decoded once into bytes in a register and meets every row
//! with integer multiply-adds: `m` rows cost little more than one until the integer units,
//! not memory, are the limit. Rows are taken 4 at a time; output rows are spread over cores.
//!
//! Two kernels compute the same sums: AVX2 (`vpmaddubsw`/`vpmaddwd`, runtime detection) and a
//! portable one that decodes 32 weights at a time into integers. Tests compare both against
//! [`crate::matmul::matmul_reference`] over the dequantized weights, exactly (to f32 rounding)
//! for the dequantized activations and within the activations' quantization bound for the
//! original ones.
//!
//! ```
//! use arbor_kernels::qmatmul::QuantMatrix;
//! use arbor_kernels::quant::GgmlType;
//! // Two output rows of one Q8_0 block each: scale 1.0 (f16 0x3c00), weights 0..32 and all 1.
//! let mut bytes = vec![0x00, 0x3c];
//! bytes.extend(0..32u8);
//! bytes.extend([0x00, 0x3c]);
//! bytes.extend([1u8; 32]);
//! let w = QuantMatrix::new(GgmlType::Q8_0, 2, 32, bytes).unwrap();
//! let x = vec![1.0f32; 32];
//! let mut y = vec![0.0; 2];
//! w.matmul(&x, 1, &mut y).unwrap();
//! assert_eq!(y, [496.0, 32.0]);
//! ```

mod acts;
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod choice;
mod portable;
// The choices are read by the x86-64 kernels only.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
mod tuning;
mod x16;
mod x8;

pub use acts::Q8Acts;
#[cfg(target_arch = "x86_64")]
pub(crate) use tuning::prefetch_every_row;

use acts::ActRow;

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use crate::KernelError;
use crate::quant::{GgmlType, dequantize_into};

/// Which kernel runs a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust integer loops.
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// The AVX2 kernels built with AVX-512 VNNI (`vpdpbusd`, `vpdpwssd`; 256-bit lanes), and
    /// 512-bit ones over pairs of interleaved groups for many rows (AVX512F/BW).
    Avx512Vnni,
    /// [`Isa::Avx512Vnni`], with Q4_K's and Q6_K's products of several activation rows on
    /// the AMX tile unit (AMX-INT8; Linux grants the tile state on first use). The same bits.
    Amx,
}

impl Isa {
    /// The fastest kernel this CPU runs, or the one `ARBOR_KERNELS` names (`portable`,
    /// `avx2`, `avx512vnni` or `amx`; read once per process) where this CPU runs it — to
    /// compare kernels in one build.
    pub fn best() -> Self {
        Self::chosen().0
    }

    /// Whether `ARBOR_KERNELS` named [`Isa::best`] (then products of several rows run it as
    /// named, not as [`choice`] measures).
    fn named() -> bool {
        Self::chosen().1
    }

    /// [`Isa::best`], and whether `ARBOR_KERNELS` named it.
    fn chosen() -> (Self, bool) {
        static CHOSEN: std::sync::OnceLock<(Isa, bool)> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let named = std::env::var("ARBOR_KERNELS")
                .ok()
                .and_then(|v| Self::parse(&v))
                .filter(|i| i.available());
            (named.unwrap_or_else(Self::fastest), named.is_some())
        })
    }

    /// A kernel family by name (as [`Isa::best`] reads it).
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "portable" => Some(Self::Portable),
            "avx2" => Some(Self::Avx2),
            "avx512vnni" => Some(Self::Avx512Vnni),
            "amx" => Some(Self::Amx),
            _ => None,
        }
    }

    /// The fastest kernel this CPU runs.
    fn fastest() -> Self {
        #[cfg(target_arch = "x86_64")]
        if amx::available() {
            return Self::Amx;
        }
        #[cfg(target_arch = "x86_64")]
        if avx2::vnni_available() {
            return Self::Avx512Vnni;
        }
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            return Self::Avx2;
        }
        Self::Portable
    }

    /// Whether this CPU runs the kernel.
    pub fn available(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => avx2::available(),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni => avx2::vnni_available(),
            #[cfg(target_arch = "x86_64")]
            Self::Amx => amx::available(),
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx2 | Self::Avx512Vnni | Self::Amx => false,
        }
    }

    /// Whether the kernels are the AVX-512 VNNI build (as they are under [`Isa::Amx`] for
    /// everything but its tile products).
    pub(crate) fn vnni(self) -> bool {
        matches!(self, Self::Avx512Vnni | Self::Amx)
    }
}

/// `ys[i] = x·Wᵢᵀ` for several matrices that share their input `x` (`[m, k]`; each
/// `ys[i]` is `[m, nᵢ]`) — a layer's Q, K and V projections, or its gate and up projections —
/// with the fastest kernel this CPU runs.
///
/// On CPUs with AMX (unless `ARBOR_KERNELS` names a family), products of 3 or more rows
/// run on the tile unit or on the VNNI kernels, whichever this set's first matrix has
/// measured faster at that row count so far (the tiles' speed depends on what else the
/// physical core runs; the two give the same bits), comparing the two on adjacent calls
/// every 16th call.
///
/// The same sums as one [`QuantMatrix::matmul`] per matrix, bit for bit, at less cost: the
/// activations are quantized once per block size, and the output rows of all matrices are
/// spread over the cores in one parallel pass (a decode step of a 28-layer model issues ~110
/// instead of ~200; each pass wakes the workers and waits for the slowest).
///
/// # Errors
/// [`KernelError::Shape`] if the matrices' `k` differ or a slice length disagrees with `m`,
/// `k`, `nᵢ`, or if `mats` and `ys` differ in length.
///
/// ```
/// use arbor_kernels::qmatmul::{QuantMatrix, matmul_fused};
/// use arbor_kernels::quant::GgmlType;
/// // Two one-row Q8_0 matrices (scale 1.0 = f16 0x3c00): weights all 1, and all 2.
/// let block = |w: u8| [vec![0x00, 0x3c], vec![w; 32]].concat();
/// let a = QuantMatrix::new(GgmlType::Q8_0, 1, 32, block(1)).unwrap();
/// let b = QuantMatrix::new(GgmlType::Q8_0, 1, 32, block(2)).unwrap();
/// let (mut ya, mut yb) = ([0.0], [0.0]);
/// matmul_fused(&[&a, &b], &[1.0; 32], 1, &mut [&mut ya, &mut yb]).unwrap();
/// assert_eq!((ya, yb), ([32.0], [64.0]));
/// ```
pub fn matmul_fused(
    mats: &[&QuantMatrix],
    x: &[f32],
    m: usize,
    ys: &mut [&mut [f32]],
) -> Result<(), KernelError> {
    let rows = split_rows(mats, x, m, ys)?;
    fused_rows(mats, x, m, rows)
}

/// As [`matmul_fused`] into new outputs, one `[m, nᵢ]` row-major vector per matrix: each
/// job writes its own share of them, uninitialized until then, rather than the
/// caller zeroing every output first — a serial pass the other cores waited on, mostly the
/// gate and up projections' and the output head's rows. Measured in one process on the
/// 2-core Xeon guest (Qwen2.5-1.5B, forwards alternated with the zeroed buffers, 30 rounds,
/// three runs): an 8-node verification 0.97–0.99× the time, a one-node step 0.98–0.99×.
/// (Each job then zeroed its share before its products wrote it; since stop 38 nothing
/// zeroes them: in one process, zeroing against not, 60–80 rounds, two runs, an 8-node
/// verification 1.008× and 1.008× the time, a one-node step 1.004× and 0.999×.)
///
/// # Errors
/// [`KernelError::Shape`] if the matrices' `k` differ or `x` is not `m` rows of `k`.
///
/// ```
/// use arbor_kernels::qmatmul::{QuantMatrix, matmul_fused_new};
/// use arbor_kernels::quant::GgmlType;
/// // A one-row Q8_0 matrix (scale 1.0 = f16 0x3c00) of weights 3, times two rows.
/// let w = QuantMatrix::new(GgmlType::Q8_0, 1, 32, [vec![0x00, 0x3c], vec![3; 32]].concat())
///     .unwrap();
/// let x: Vec<f32> = [[1.0; 32], [-1.0; 32]].concat();
/// assert_eq!(matmul_fused_new(&[&w], &x, 2).unwrap(), vec![vec![96.0, -96.0]]);
/// ```
pub fn matmul_fused_new(
    mats: &[&QuantMatrix],
    x: &[f32],
    m: usize,
) -> Result<Vec<Vec<f32>>, KernelError> {
    let k = common_k(mats)?;
    if x.len() != m * k {
        return Err(KernelError::Shape(format!(
            "x has {} values for m={m}, k={k}",
            x.len()
        )));
    }
    let mut ys: Vec<Vec<f32>> = mats.iter().map(|w| Vec::with_capacity(m * w.n)).collect();
    let rows = mats
        .iter()
        .zip(ys.iter_mut())
        .map(|(w, y)| {
            let spare = &mut y.spare_capacity_mut()[..m * w.n];
            spare.chunks_exact_mut(w.n.max(1)).take(m).collect()
        })
        .collect();
    fused_rows_uninit(mats, x, m, rows)?;
    for (w, y) in mats.iter().zip(ys.iter_mut()) {
        // SAFETY: `fused_rows_uninit` returned Ok, so its jobs wrote every value of every
        // row (their column ranges cover each output, and every kernel writes all of its
        // columns of every row: [`scatter`], `rows_times`, the portable loop).
        unsafe { y.set_len(m * w.n) };
    }
    Ok(ys)
}

/// One activation row's outputs as the product jobs write them: uninitialized until the first
/// panel of `k` writes them (a later panel reads only what an earlier one wrote, [`gather`]),
/// so that fresh outputs need no zeroing first.
type Out<'a> = &'a mut [MaybeUninit<f32>];

/// `&mut [f32]` as `&mut [MaybeUninit<f32>]`, for outputs that the products only ever write
/// initialized values into.
fn as_uninit(y: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: same size and alignment; callers (this module's product jobs) write only
    // initialized `f32`s, so the slice stays initialized for its owner.
    unsafe { &mut *(std::ptr::from_mut(y) as *mut [MaybeUninit<f32>]) }
}

/// As [`fused_rows`] over outputs that may be uninitialized (every value is written).
fn fused_rows_uninit(
    mats: &[&QuantMatrix],
    x: &[f32],
    m: usize,
    rows: Vec<Vec<&mut [MaybeUninit<f32>]>>,
) -> Result<(), KernelError> {
    choose_and_run(mats, m, |isa| fused_rows_with(isa, mats, x, m, rows))
}

/// As [`matmul_fused`] over outputs given row by row (`rows[i][r]`: row `r` of matrix `i`'s
/// product, `nᵢ` values; checked by the callers), choosing the kernel family as it does.
fn fused_rows(
    mats: &[&QuantMatrix],
    x: &[f32],
    m: usize,
    rows: Vec<Vec<&mut [f32]>>,
) -> Result<(), KernelError> {
    fused_rows_uninit(mats, x, m, uninit_rows(rows))
}

/// Runs `run` with the kernel family [`matmul_fused`] takes: where AMX tiles and VNNI both
/// could, the one the lead matrix's measured choice picks, timed for it; else [`Isa::best`].
fn choose_and_run(
    mats: &[&QuantMatrix],
    m: usize,
    run: impl FnOnce(Isa) -> Result<(), KernelError>,
) -> Result<(), KernelError> {
    let isa = Isa::best();
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Amx && !Isa::named() && m >= 3 {
        let tiles = |m| mats.iter().any(|w| amx::takes(w.ty, m));
        // Where some matrix has tile products at some row count (Q4_K, Q6_K).
        if let Some(lead) = mats.first().filter(|_| tiles(amx::ROWS)) {
            let chosen = lead.measured.pick(m, tiles(m));
            let start = std::time::Instant::now();
            run(chosen)?;
            let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            lead.measured.record(m, chosen, ns);
            return Ok(());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (mats, m);
    run(isa)
}

/// Row slices of initialized outputs as [`fused_rows_with`] takes them.
fn uninit_rows(rows: Vec<Vec<&mut [f32]>>) -> Vec<Vec<&mut [MaybeUninit<f32>]>> {
    rows.into_iter()
        .map(|r| r.into_iter().map(as_uninit).collect())
        .collect()
}

/// As [`matmul_fused`] with a chosen kernel.
///
/// # Errors
/// As [`matmul_fused`]; [`KernelError::UnsupportedType`] if this CPU does not run `isa`.
pub fn matmul_fused_with(
    isa: Isa,
    mats: &[&QuantMatrix],
    x: &[f32],
    m: usize,
    ys: &mut [&mut [f32]],
) -> Result<(), KernelError> {
    let rows = split_rows(mats, x, m, ys)?;
    fused_rows_with(isa, mats, x, m, uninit_rows(rows))
}

/// Checks [`matmul_fused`]'s operands and cuts each output into its `m` rows.
fn split_rows<'y>(
    mats: &[&QuantMatrix],
    x: &[f32],
    m: usize,
    ys: &'y mut [&mut [f32]],
) -> Result<Vec<Vec<&'y mut [f32]>>, KernelError> {
    if mats.len() != ys.len() {
        return Err(KernelError::Shape(format!(
            "{} matrices and {} outputs",
            mats.len(),
            ys.len()
        )));
    }
    let k = common_k(mats)?;
    let mut rows = Vec::with_capacity(mats.len());
    for (w, y) in mats.iter().zip(ys.iter_mut()) {
        crate::matmul::check_operands(x, y, m, k, w.n)?;
        rows.push(y.chunks_exact_mut(w.n.max(1)).take(m).collect());
    }
    Ok(rows)
}

/// The input width all of `mats` take (0 for none); an error if they differ.
fn common_k(mats: &[&QuantMatrix]) -> Result<usize, KernelError> {
    let k = mats.first().map_or(0, |w| w.k);
    match mats.iter().find(|w| w.k != k) {
        Some(w) => Err(KernelError::Shape(format!(
            "fused matrices take {k} and {} inputs",
            w.k
        ))),
        None => Ok(k),
    }
}

/// [`matmul_fused_with`] over checked outputs given row by row (as [`fused_rows`]), which
/// may be uninitialized: each job's products write all of its columns of every row, so on
/// `Ok` every value has been written.
fn fused_rows_with(
    isa: Isa,
    mats: &[&QuantMatrix],
    x: &[f32],
    m: usize,
    rows_out: Vec<Vec<&mut [MaybeUninit<f32>]>>,
) -> Result<(), KernelError> {
    let Some(k) = mats.first().map(|w| w.k) else {
        return Ok(());
    };
    if !isa.available() {
        return Err(KernelError::UnsupportedType(format!(
            "{isa:?} kernels on this CPU"
        )));
    }
    if m == 0 {
        return Ok(());
    }
    // One quantization per block size (the k-quants and the 32-weight formats differ).
    let mut acts: Vec<Q8Acts> = Vec::new();
    for w in mats {
        if !acts.iter().any(|a| a.block() == w.act_block()) {
            acts.push(Q8Acts::quantize(x, m, k, w.act_block()));
        }
    }
    let rows: Vec<Vec<ActRow<'_>>> = acts
        .iter()
        .map(|a| (0..m).map(|r| a.row(r)).collect())
        .collect();
    let rows_of = |w: &QuantMatrix| {
        let at = acts
            .iter()
            .position(|a| a.block() == w.act_block())
            .expect("quantized for every block size above");
        &rows[at][..]
    };
    // Output rows of all matrices in `JOBS_PER_THREAD` chunks per core, each one job a
    // worker can take (see the constant). Each job writes its columns of every activation row
    // straight into `ys` (no transposed copy to zero, fill and scatter afterwards: that
    // serial pass was ~7% of a 4-node verification).
    let total: usize = mats.iter().map(|w| w.n).sum();
    let chunk = total
        .div_ceil(JOBS_PER_THREAD * rayon::current_num_threads())
        .max(8);
    let mut jobs = Vec::new();
    for (w, y) in mats.iter().zip(rows_out) {
        let acts = rows_of(w);
        // Interleaved groups of 8 rows first (chunks of whole groups), then GGUF rows.
        let grouped = 8 * w.groups;
        // An even number of groups per job: the 512-bit kernels take them in pairs (`x16`).
        let gchunk = chunk.div_ceil(16) * 2;
        let rdata = &w.data[w.groups * w.group_bytes()..];
        let mut bounds: Vec<(usize, usize, bool)> = (0..grouped)
            .step_by(8 * gchunk)
            .map(|j| (j, (j + 8 * gchunk).min(grouped), true))
            .collect();
        bounds.extend(
            (grouped..w.n)
                .step_by(chunk)
                .map(|j| (j, (j + chunk).min(w.n), false)),
        );
        let mut outs: Vec<Vec<&mut [MaybeUninit<f32>]>> =
            bounds.iter().map(|_| Vec::with_capacity(m)).collect();
        for mut row in y {
            for (out, &(j0, j1, _)) in outs.iter_mut().zip(&bounds) {
                let (cols, rest) = row.split_at_mut(j1 - j0);
                out.push(cols);
                row = rest;
            }
        }
        for (out, (j0, j1, grouped)) in outs.into_iter().zip(bounds) {
            let part = if grouped {
                Part::Groups(j0 / 8, j1 / 8)
            } else {
                let at = (j0 - 8 * w.groups) * w.row_bytes();
                Part::Rows(&rdata[at..at + (j1 - j0) * w.row_bytes()])
            };
            jobs.push((*w, acts, out, part));
        }
    }
    jobs.into_par_iter()
        .with_max_len(1)
        .for_each(|(w, acts, mut out, part)| {
            // Debug builds (the tests') poison the outputs first, so that a value no kernel
            // wrote reads as NaN instead of as whatever the allocation held.
            if cfg!(debug_assertions) {
                for o in &mut out {
                    o.fill(MaybeUninit::new(f32::NAN));
                }
            }
            match part {
                Part::Groups(g0, g1) => w.groups_times(isa, g0..g1, acts, &mut out),
                Part::Rows(data) => w.rows_times(isa, data, acts, &mut out),
            }
        });
    Ok(())
}

/// Jobs per thread of a product ([`matmul_fused`]), each one a worker can take (rayon's
/// `with_max_len(1)`; by default it splits a parallel iterator only as far as idle workers
/// steal, so a worker that started three jobs in a row could not hand the third over).
/// Earlier, 3 per thread: 8 had spent ~10% of a Qwen2.5-1.5B decode step waking and parking
/// rayon's workers. Forwards now keep the other workers polling ([`crate::pool`]), and the
/// finer split lets the worker that finishes first take the other's last jobs: measured in
/// one process (2-core Xeon guest, Qwen2.5-1.5B, alternated, 30 rounds, two runs), both with
/// polling, 12 per thread against 3: an 8-node verification 0.97–0.98× the time, a one-node
/// step 0.96–1.0× (24 and 48 per thread: no better than 12).
const JOBS_PER_THREAD: usize = 12;

/// How a product's activation rows go over each interleaved group: `wide` of them 8 at a
/// time (two groups at once where `pair`), the rest `rest` at a time.
/// Where `amx` holds the activation rows' spacing in bytes (Q4_K and Q6_K, as
/// `amx::takes` says), pairs of groups take every row on the AMX tile unit instead,
/// [`amx::ROWS`] at a time.
struct Passes {
    wide: usize,
    rest: usize,
    pair: bool,
    amx: Option<usize>,
}

/// One job's share of a matrix: interleaved groups `g0..g1`, or whole GGUF rows.
enum Part<'a> {
    Groups(usize, usize),
    Rows(&'a [u8]),
}

/// Weights of `k` per panel of the interleaved layout (see [`QuantMatrix`]): a few activation
/// rows of a panel (2 KiB each as bytes) stay close while the panel's weights stream past
/// them. Measured from memory (README, "Verification cost"): 2–4 rows of the down projections
/// 25–35% faster than whole rows, 1 row the same, 8 rows 5–12% slower; 1 024–1 536 were as
/// good at 4 rows and worse at 8, 3 072 gained nothing.
const PANEL_WEIGHTS: usize = 2048;

/// The panels of `k` (`(b0, b1)`: blocks `b0..b1` of each row) a matrix of `ty` with rows of
/// `k` weights is stored in: as few as keep each within [`PANEL_WEIGHTS`], as even as the
/// blocks allow.
fn panels(ty: GgmlType, k: usize) -> impl Iterator<Item = (usize, usize)> {
    let blocks = k / ty.block_size();
    let most = (PANEL_WEIGHTS / ty.block_size()).max(1);
    let per = blocks.div_ceil(blocks.div_ceil(most)).max(1);
    (0..blocks)
        .step_by(per)
        .map(move |b0| (b0, (b0 + per).min(blocks)))
}

/// How far ahead of the row being multiplied its successors are fetched into the cache.
const PREFETCH_ROWS: usize = 6;

/// Asks for `len` bytes of `data` from `at` on (what lies inside `data`) to be brought into
/// the cache: the kernels do enough arithmetic per byte that the hardware prefetcher alone
/// leaves them waiting on memory.
#[inline(always)]
fn prefetch(data: &[u8], at: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let end = (at + len).min(data.len());
        let mut i = at;
        while i < end {
            // SAFETY: `i < data.len()`; prefetching has no architectural effect.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    data.as_ptr().add(i).cast(),
                );
            }
            i += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, at, len);
}

/// A weight matrix `[n, k]` (outputs × inputs, the checkpoint layout of a linear layer) held
/// as GGUF blocks: row `j` is `k / block_size` consecutive blocks. Q4_K, Q6_K, Q8_0, Q5_0 and
/// Q4_1 matrices are held with their rows interleaved 8 at a time (`x8`; the remaining
/// `n mod 8` rows as GGUF rows after them), and rows longer than `PANEL_WEIGHTS` (2 048) cut into
/// panels of `k`, panel after panel (every group's first panel, then every group's second,
/// …): a product walks the weights in storage order, one panel at a time, and reads only
/// that panel's span of the activation rows for every group (measured from memory, 4
/// activation rows of 40 Q4_K matrices of 1536 × 8960 as whole rows had taken 1.75× as long
/// as the same bytes as 8960 × 1536).
/// Lossless: [`QuantMatrix::raw`] gives back the GGUF bytes.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    ty: GgmlType,
    n: usize,
    k: usize,
    /// Interleaved groups of 8 rows at the start of `data`.
    groups: usize,
    data: Vec<u8>,
    /// The tile and VNNI kernels compared per row count, where both could run ([`choice`];
    /// boxed: a few hundred bytes of counters, kept out of every holder's size).
    measured: Box<choice::Measured>,
}

impl QuantMatrix {
    /// Wraps `data`, `n` rows of `k` weights in blocks of `ty`.
    ///
    /// # Errors
    /// [`KernelError::UnsupportedType`] for float types (they belong in
    /// [`crate::matmul::Packed`]), [`KernelError::RaggedBlocks`] if `k` is not a multiple
    /// of the block size, [`KernelError::ByteLength`] if `data` has the wrong size,
    /// [`KernelError::Shape`] for an empty matrix.
    pub fn new(ty: GgmlType, n: usize, k: usize, data: Vec<u8>) -> Result<Self, KernelError> {
        if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            return Err(KernelError::UnsupportedType(format!(
                "{ty:?} in a block-quantized matmul"
            )));
        }
        if n == 0 || k == 0 {
            return Err(KernelError::Shape(format!("empty matrix [{n}, {k}]")));
        }
        let row = ty.bytes_for(k)?;
        if data.len() != n * row {
            return Err(KernelError::ByteLength {
                ty: format!("{ty:?}"),
                elements: n * k,
                expected: n * row,
                actual: data.len(),
            });
        }
        if !x8::interleaves(ty) || n < 8 {
            return Ok(Self {
                ty,
                n,
                k,
                groups: 0,
                data,
                measured: Box::default(),
            });
        }
        let groups = n / 8;
        let mut packed = Vec::with_capacity(
            groups * (k / ty.block_size()) * x8::block_bytes(ty) + (n % 8) * row,
        );
        let gguf = ty.block_bytes();
        for (b0, b1) in panels(ty, k) {
            for g in 0..groups {
                let rows = std::array::from_fn(|r| {
                    let at = (8 * g + r) * row;
                    &data[at + b0 * gguf..at + b1 * gguf]
                });
                x8::pack(ty, rows, &mut packed);
            }
        }
        packed.extend_from_slice(&data[8 * groups * row..]);
        Ok(Self {
            ty,
            n,
            k,
            groups,
            data: packed,
            measured: Box::default(),
        })
    }

    /// The blocks in GGUF layout, row-major (rebuilt from the interleaved layout where the
    /// matrix holds one).
    pub fn raw(&self) -> Cow<'_, [u8]> {
        if self.groups == 0 {
            return Cow::Borrowed(&self.data);
        }
        let mut out = Vec::with_capacity(self.n * self.row_bytes());
        for j in 0..self.n {
            out.extend_from_slice(&self.row_gguf(j));
        }
        Cow::Owned(out)
    }

    /// Stored row `j` in GGUF layout.
    fn row_gguf(&self, j: usize) -> Cow<'_, [u8]> {
        let rb = self.row_bytes();
        if j >= 8 * self.groups {
            let at = self.groups * self.group_bytes() + (j - 8 * self.groups) * rb;
            return Cow::Borrowed(&self.data[at..at + rb]);
        }
        let mut out = Vec::with_capacity(rb);
        for span in panels(self.ty, self.k) {
            x8::unpack(self.ty, self.group_piece(j / 8, span), j % 8, &mut out);
        }
        Cow::Owned(out)
    }

    /// The first `rows` rows (outputs) as a matrix of their own, or `None` if `rows` is 0 or
    /// more than the matrix has, or (where rows are interleaved) not a multiple of 8.
    pub fn rows_prefix(&self, rows: usize) -> Option<Self> {
        if rows == 0 || rows > self.n {
            return None;
        }
        let (groups, data) = if self.groups > 0 {
            if !rows.is_multiple_of(8) || rows > 8 * self.groups {
                return None;
            }
            let groups = rows / 8;
            let mut data = Vec::with_capacity(groups * self.group_bytes());
            for span in panels(self.ty, self.k) {
                for g in 0..groups {
                    data.extend_from_slice(self.group_piece(g, span));
                }
            }
            (groups, data)
        } else {
            (0, self.data[..rows * self.row_bytes()].to_vec())
        };
        Some(Self {
            ty: self.ty,
            n: rows,
            k: self.k,
            groups,
            data,
            measured: Box::default(),
        })
    }

    /// The same matrix re-encoded as `ty` (see [`crate::quant::quantize`]), row by row (no
    /// f32 copy of the whole matrix is made). Lossy: meant for drafts, whose precision only
    /// changes how often they are accepted.
    ///
    /// # Errors
    /// As [`crate::quant::quantize`] (e.g. `ty` not supported, `k` not a multiple of its
    /// block).
    pub fn requantized(&self, ty: GgmlType) -> Result<Self, KernelError> {
        let rows: Vec<Vec<u8>> = (0..self.n)
            .into_par_iter()
            .map(|j| {
                let mut row = vec![0.0f32; self.k];
                self.dequantize_row(j, &mut row)?;
                crate::quant::quantize(ty, &row)
            })
            .collect::<Result<_, _>>()?;
        Self::new(ty, self.n, self.k, rows.concat())
    }

    /// Bytes of one interleaved group of 8 rows.
    fn group_bytes(&self) -> usize {
        self.k / self.ty.block_size() * x8::block_bytes(self.ty)
    }

    /// Interleaved group `g`'s blocks `b0..b1` (one of [`panels`]).
    fn group_piece(&self, g: usize, (b0, b1): (usize, usize)) -> &[u8] {
        let bb = x8::block_bytes(self.ty);
        let at = (self.groups * b0 + g * (b1 - b0)) * bb;
        &self.data[at..at + (b1 - b0) * bb]
    }

    /// The block format.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Outputs (rows of the stored matrix).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Bytes of one GGUF row.
    fn row_bytes(&self) -> usize {
        self.ty.block_bytes() * self.k / self.ty.block_size()
    }

    /// Stored row `j` (output `j`'s weights) as f32, into `out` (`k` values).
    ///
    /// # Errors
    /// [`KernelError::Shape`] if `j ≥ n` or `out` is not `k` long.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) -> Result<(), KernelError> {
        if j >= self.n || out.len() != self.k {
            return Err(KernelError::Shape(format!(
                "row {j} of {} into {} values (k = {})",
                self.n,
                out.len(),
                self.k
            )));
        }
        dequantize_into(self.ty, &self.row_gguf(j), out)
    }

    /// The whole matrix as f32 `[n, k]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.n * self.k];
        dequantize_into(self.ty, &self.raw(), &mut out)
            .expect("the constructor checked the byte length");
        out
    }

    /// Activations per scale when multiplying with this matrix (the weights' block size).
    fn act_block(&self) -> usize {
        self.ty.block_size()
    }

    /// `y = x·Wᵀ` for `m` rows: `x` is `[m, k]`, `y` is `[m, n]`, both row-major, with the
    /// fastest kernel this CPU runs (as [`matmul_fused`] chooses it).
    ///
    /// # Errors
    /// [`KernelError::Shape`] if the slice lengths disagree with `m`, `k`, `n`.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<(), KernelError> {
        matmul_fused(&[self], x, m, &mut [y])
    }

    /// As [`QuantMatrix::matmul`] with a chosen kernel.
    ///
    /// # Errors
    /// [`KernelError::Shape`] as there; [`KernelError::UnsupportedType`] if this CPU does not
    /// run `isa`.
    pub fn matmul_with(
        &self,
        isa: Isa,
        x: &[f32],
        m: usize,
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        matmul_fused_with(isa, &[self], x, m, &mut [y])
    }

    /// As [`QuantMatrix::matmul`] with each output row its own slice (`ys[r]`: row `r`, `n`
    /// values; `x` is `[ys.len(), k]`): a caller that keeps rows apart — a tree's logits,
    /// one vector per node — gets them without a copy (a 152k vocabulary's row is 0.6 MB).
    ///
    /// # Errors
    /// [`KernelError::Shape`] if `x` is not `ys.len()` rows of `k` or a row is not `n` long.
    pub fn matmul_into_rows(&self, x: &[f32], ys: &mut [&mut [f32]]) -> Result<(), KernelError> {
        let m = ys.len();
        if x.len() != m * self.k || ys.iter().any(|y| y.len() != self.n) {
            return Err(KernelError::Shape(format!(
                "x has {} values and rows of {:?} values for m={m}, k={}, n={}",
                x.len(),
                ys.iter().map(|y| y.len()).collect::<Vec<_>>(),
                self.k,
                self.n
            )));
        }
        fused_rows(
            &[self],
            x,
            m,
            vec![ys.iter_mut().map(|y| &mut **y).collect()],
        )
    }

    /// `y[i] = x·W[ids[i]]ᵀ` for one activation row `x` (`k` values) and a few output rows
    /// `ids` — e.g. the candidates of a two-pass output head — on the calling thread, with
    /// the fastest kernel this CPU runs. Each value is bit for bit the one a full
    /// [`QuantMatrix::matmul`] of `x` gives at that output (the same kernel over the same
    /// interleaved group and the same quantized activations); a group of 8 rows is multiplied
    /// once however many of its rows `ids` names.
    ///
    /// # Errors
    /// [`KernelError::Shape`] if `x` is not `k` long, `y` not as long as `ids`, or an id is
    /// not below `n`.
    pub fn matmul_rows(&self, x: &[f32], ids: &[u32], y: &mut [f32]) -> Result<(), KernelError> {
        if x.len() != self.k || y.len() != ids.len() {
            return Err(KernelError::Shape(format!(
                "{} inputs for k = {} and {} outputs for {} ids",
                x.len(),
                self.k,
                y.len(),
                ids.len()
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&j| j as usize >= self.n) {
            return Err(KernelError::Shape(format!("row {bad} of {}", self.n)));
        }
        let isa = Isa::best();
        let acts = Q8Acts::quantize(x, 1, self.k, self.act_block());
        let act = [acts.row(0)];
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_unstable_by_key(|&i| ids[i]);
        let (gb, rb) = (self.group_bytes(), self.row_bytes());
        let mut lanes = [0.0f32; 8];
        let mut done = None;
        for i in order {
            let j = ids[i] as usize;
            if j < 8 * self.groups {
                let g = j / 8;
                if done != Some(g) {
                    self.groups_times(isa, g..g + 1, &act, &mut [as_uninit(&mut lanes)]);
                    done = Some(g);
                }
                y[i] = lanes[j % 8];
            } else {
                let at = self.groups * gb + (j - 8 * self.groups) * rb;
                self.dot_group(isa, &self.data[at..at + rb], &act, &mut y[i..i + 1]);
            }
        }
        Ok(())
    }

    /// Stored rows `data` (whole rows) times the activation rows `x`: weight row `j` · `x[r]`
    /// into `out[r][j]`.
    fn rows_times(&self, isa: Isa, data: &[u8], x: &[ActRow<'_>], out: &mut [Out<'_>]) {
        let rb = self.row_bytes();
        for (g, group) in x.chunks(4).enumerate() {
            let out = &mut out[4 * g..4 * g + group.len()];
            for (j, wr) in data.chunks_exact(rb).enumerate() {
                if g == 0 {
                    prefetch(data, (j + PREFETCH_ROWS) * rb, rb);
                }
                let mut sums = [0.0f32; 4];
                self.dot_group(isa, wr, group, &mut sums[..group.len()]);
                for (o, v) in out.iter_mut().zip(sums) {
                    o[j] = MaybeUninit::new(v);
                }
            }
        }
    }

    /// Interleaved groups `groups` times the activation rows `x`: row `l` of group
    /// `groups.start + gi` · `x[r]` into `out[r][8·gi + l]`, one panel of `k` at a time.
    fn groups_times(&self, isa: Isa, groups: Range<usize>, x: &[ActRow<'_>], out: &mut [Out<'_>]) {
        let m = x.len();
        // With VNNI, Q4_K, Q6_K, Q5_0, Q8_0 and Q4_1 take 8 activation rows per pass over a
        // group (16 accumulators fit AVX-512's 32 registers; measured, 8 rows of Q4_K from
        // memory: two 4-row passes 50 ms, one 8-row pass 41 ms; Q6_K in cache +10% at 8 rows,
        // +17% at 16; Q5_0 and Q8_0 in cache, two alternated runs: 8–20% less time at 8, 16
        // and 64 rows; Q4_1, one group at a time, mixed: −9% to +10%, but over pairs of
        // groups 8 rows from memory 58/60 → 44/44 ms). The AVX2 build stays at 4.
        let eight = isa.vnni()
            && matches!(
                self.ty,
                GgmlType::Q4_K | GgmlType::Q6_K | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::Q4_1
            );
        // The same types take a last 5, 6 or 7 rows in one pass too, not as 4 + 1..3 (a
        // one-row pass decodes every weight again for a single row: in cache, 5 rows of Q6_K
        // had cost 1.46× 4 rows); other rows go 4 at a time.
        let (wide, rest) = match m % 8 {
            t @ 5..=7 if eight => (m - t, t),
            _ if eight => (m - m % 8, 4),
            _ => (0, 4),
        };
        // Where the type has a 512-bit kernel, 8-row passes take two groups at a time (16
        // rows per `vpdpbusd`; see `x16` for what that gains and where it does not), and the
        // 4–7 rows after them; where 512-bit units run at full width (`tuning`), Q4_K too,
        // and from 4 rows.
        #[cfg(target_arch = "x86_64")]
        let pair = x16::pairs(self.ty)
            && if tuning::full_width_pairs() {
                isa.vnni() && m >= 4
            } else {
                wide > 0 && self.ty != GgmlType::Q4_K
            };
        #[cfg(not(target_arch = "x86_64"))]
        let pair = false;
        #[cfg(target_arch = "x86_64")]
        let amx = if isa == Isa::Amx && amx::takes(self.ty, m) {
            row_stride(x)
        } else {
            None
        };
        #[cfg(not(target_arch = "x86_64"))]
        let amx = None;
        let passes = Passes {
            wide,
            rest,
            pair,
            amx,
        };
        let blocks = self.k / self.ty.block_size();
        // Rows of one panel (every projection but the long down projections) go as they are.
        let mut piece = Vec::new();
        for span in panels(self.ty, self.k) {
            let rows = if span == (0, blocks) {
                x
            } else {
                piece.clear();
                piece.extend(x.iter().map(|r| r.blocks(span.0, span.1, self.act_block())));
                &piece[..]
            };
            self.panel_times(isa, &groups, span, rows, &passes, out);
        }
    }

    /// Panel `span` of interleaved groups `groups` times the activation rows' same span `x`
    /// (as [`QuantMatrix::groups_times`]), added to the sums `out` holds from the panels
    /// before it (so the sums add up in one order, however many rows there are).
    fn panel_times(
        &self,
        isa: Isa,
        groups: &Range<usize>,
        span: (usize, usize),
        x: &[ActRow<'_>],
        &Passes {
            wide,
            rest,
            pair,
            amx,
        }: &Passes,
        out: &mut [Out<'_>],
    ) {
        let m = x.len();
        let count = groups.len();
        let group = |gi: usize| self.group_piece(groups.start + gi, span);
        let more = span.0 > 0;
        let mut gi = 0;
        while gi < count {
            #[cfg(target_arch = "x86_64")]
            if let Some(stride) = amx.filter(|_| gi + 1 < count) {
                for (a, rows) in x.chunks(amx::ROWS).enumerate() {
                    // SAFETY: `amx` is set only where `matmul_fused_with` checked that this
                    // CPU runs `Isa::Amx`, for Q4_K or Q6_K rows spaced `stride` bytes apart; the
                    // groups hold whole blocks of the rows' span.
                    unsafe {
                        amx_rows(
                            self.ty,
                            group(gi),
                            group(gi + 1),
                            rows,
                            stride,
                            (gi, a * amx::ROWS, more),
                            out,
                        );
                    }
                }
                gi += 2;
                continue;
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = amx;
            let two = pair && gi + 1 < count;
            let step = if two { 2 } else { 1 };
            #[cfg(target_arch = "x86_64")]
            for (a, rows) in x[..wide].chunks_exact(8).enumerate() {
                let rows: &[ActRow<'_>; 8] = rows.try_into().expect("chunks of 8");
                // SAFETY: `wide > 0` only where `matmul_fused_with` checked that this CPU runs
                // AVX-512 VNNI; the groups hold whole blocks of the rows' span.
                unsafe {
                    if two {
                        let init = gather(out, gi, 8 * a, more);
                        let sums = x16::dot16_vnni(self.ty, group(gi), group(gi + 1), rows, &init);
                        scatter(out, gi, 8 * a, &sums);
                    } else {
                        let init = gather(out, gi, 8 * a, more);
                        let sums = x8::dot8_vnni(self.ty, group(gi), rows, &init);
                        scatter(out, gi, 8 * a, &sums);
                    }
                }
            }
            // A last 4–7 rows take the pair's kernel too (its 8-row passes have just brought
            // both groups into the cache; from memory, 4 rows over two groups at once ran
            // slower than one group at a time).
            #[cfg(target_arch = "x86_64")]
            if two && m - wide >= 4 {
                let (g0, g1) = (group(gi), group(gi + 1));
                // SAFETY: as above.
                unsafe {
                    macro_rules! rows {
                        ($($r:ident),+) => {{
                            let init = gather(out, gi, wide, more);
                            let sums = x16::dot16_vnni(self.ty, g0, g1, &[$($r),+], &init);
                            scatter(out, gi, wide, &sums);
                        }};
                    }
                    match x[wide..] {
                        [a, b, c, d] => rows!(a, b, c, d),
                        [a, b, c, d, e] => rows!(a, b, c, d, e),
                        [a, b, c, d, e, f] => rows!(a, b, c, d, e, f),
                        [a, b, c, d, e, f, g] => rows!(a, b, c, d, e, f, g),
                        _ => unreachable!("4 to 7 rows after the 8-row passes"),
                    }
                }
                gi += step;
                continue;
            }
            for g in gi..gi + step {
                self.group_rest(isa, g, group(g), x, (wide, rest, more), out);
            }
            gi += step;
        }
    }

    /// Activation rows `x[wide..]` (`rest` at a time) times interleaved group `gi`.
    fn group_rest(
        &self,
        isa: Isa,
        gi: usize,
        group: &[u8],
        x: &[ActRow<'_>],
        (wide, rest, more): (usize, usize, bool),
        out: &mut [Out<'_>],
    ) {
        for (a, rows) in x[wide..].chunks(rest).enumerate() {
            let at = wide + rest * a;
            #[cfg(target_arch = "x86_64")]
            if isa != Isa::Portable {
                // SAFETY: `matmul_fused_with` checked that this CPU runs `isa`; `group` holds
                // whole blocks of the activation rows' span.
                unsafe {
                    let vnni = isa.vnni();
                    macro_rules! rows {
                        ($($r:ident),+) => {{
                            let init = gather(out, gi, at, more);
                            let sums = if vnni {
                                x8::dot8_vnni(self.ty, group, &[$($r),+], &init)
                            } else {
                                x8::dot8(self.ty, group, &[$($r),+], &init)
                            };
                            scatter(out, gi, at, &sums);
                        }};
                    }
                    match *rows {
                        [a] => rows!(a),
                        [a, b] => rows!(a, b),
                        [a, b, c] => rows!(a, b, c),
                        [a, b, c, d] => rows!(a, b, c, d),
                        // 5 to 7 rows only as a VNNI tail (`rest` above).
                        [a, b, c, d, e] => rows!(a, b, c, d, e),
                        [a, b, c, d, e, f] => rows!(a, b, c, d, e, f),
                        [a, b, c, d, e, f, g] => rows!(a, b, c, d, e, f, g),
                        _ => unreachable!("groups hold 1 to 7 rows"),
                    }
                }
                continue;
            }
            let _ = isa;
            let mut row = Vec::with_capacity(self.row_bytes());
            for l in 0..8 {
                row.clear();
                x8::unpack(self.ty, group, l, &mut row);
                for (r, &xr) in rows.iter().enumerate() {
                    let v = portable::dot(self.ty, &row, xr, self.act_block());
                    let o = &mut out[at + r][8 * gi + l];
                    // SAFETY: an earlier panel wrote `o` where `more`.
                    *o = MaybeUninit::new(if more {
                        (unsafe { o.assume_init() }) + v
                    } else {
                        v
                    });
                }
            }
        }
    }

    /// As [`QuantMatrix::matmul_into_rows`] into `m` new rows of `n` values, each filled by
    /// the jobs that compute it (as [`matmul_fused_new`]: no serial zeroing first).
    ///
    /// # Errors
    /// [`KernelError::Shape`] if `x` is not `m` rows of `k`.
    pub fn matmul_new_rows(&self, x: &[f32], m: usize) -> Result<Vec<Vec<f32>>, KernelError> {
        if x.len() != m * self.k {
            return Err(KernelError::Shape(format!(
                "x has {} values for m={m}, k={}",
                x.len(),
                self.k
            )));
        }
        let mut ys: Vec<Vec<f32>> = (0..m).map(|_| Vec::with_capacity(self.n)).collect();
        let rows = ys
            .iter_mut()
            .map(|y| &mut y.spare_capacity_mut()[..self.n])
            .collect();
        fused_rows_uninit(&[self], x, m, vec![rows])?;
        for y in &mut ys {
            // SAFETY: the products returned Ok: every value of every row was written.
            unsafe { y.set_len(self.n) };
        }
        Ok(ys)
    }

    /// Dot products of weight row `w` with activation rows `x` (1 to 4) into `dst`.
    fn dot_group(&self, isa: Isa, w: &[u8], x: &[ActRow<'_>], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if isa != Isa::Portable {
            let ty = self.ty;
            // SAFETY: `matmul_with` checked that this CPU runs `isa` (AVX2/FMA/F16C, plus
            // AVX512-VNNI/VL for `Avx512Vnni`); `w` is one whole stored row and the
            // activation rows are `k` long.
            unsafe {
                let vnni = isa.vnni();
                macro_rules! rows {
                    ($($r:ident),+) => {
                        if vnni {
                            avx2::dot_rows_vnni(ty, w, &[$($r),+])
                        } else {
                            avx2::dot_rows(ty, w, &[$($r),+])
                        }
                    };
                }
                match *x {
                    [a] => dst.copy_from_slice(&rows!(a)),
                    [a, b] => dst.copy_from_slice(&rows!(a, b)),
                    [a, b, c] => dst.copy_from_slice(&rows!(a, b, c)),
                    [a, b, c, d] => dst.copy_from_slice(&rows!(a, b, c, d)),
                    _ => unreachable!("groups hold 1 to 4 rows"),
                }
            }
            return;
        }
        let _ = isa;
        for (v, &row) in dst.iter_mut().zip(x) {
            *v = portable::dot(self.ty, w, row, self.act_block());
        }
    }
}

/// The spacing in bytes of the quantized activation rows `x`, if it is one (rows of one
/// [`Q8Acts`], or the same panel of each: a tile loads them with one stride).
#[cfg(target_arch = "x86_64")]
fn row_stride(x: &[ActRow<'_>]) -> Option<usize> {
    let base = x.first()?.q.as_ptr() as usize;
    let stride = x
        .get(1)
        .map_or(0, |r| (r.q.as_ptr() as usize).wrapping_sub(base));
    x.iter()
        .enumerate()
        .all(|(r, row)| row.q.as_ptr() as usize == base.wrapping_add(r.wrapping_mul(stride)))
        .then_some(stride)
}

/// Interleaved groups `gi` and `gi + 1` of `ty` (Q4_K or Q6_K; `g0`, `g1`: their span) times 1 to
/// [`amx::ROWS`] activation rows `x` (rows `at..` of the product) on the AMX tile unit, into
/// `out` as [`scatter`] writes (added to what it holds when `more`).
///
/// # Safety
/// This CPU runs [`Isa::Amx`]; the rows are spaced `stride` bytes apart; both groups hold
/// whole Q4_K blocks of the rows' span.
#[cfg(target_arch = "x86_64")]
unsafe fn amx_rows(
    ty: GgmlType,
    g0: &[u8],
    g1: &[u8],
    x: &[ActRow<'_>],
    stride: usize,
    (gi, at, more): (usize, usize, bool),
    out: &mut [Out<'_>],
) {
    macro_rules! rows {
        ($($n:literal)+) => {
            match x.len() {
                $($n => {
                    let rows: &[ActRow<'_>; $n] = x.try_into().expect("length matched");
                    let mut sums = gather::<16, $n>(out, gi, at, more);
                    // SAFETY: forwarded from the caller.
                    unsafe { amx::dot16(ty, g0, g1, rows, stride, &mut sums) };
                    scatter(out, gi, at, &sums);
                })+
                _ => unreachable!("1 to amx::ROWS rows per tile product"),
            }
        };
    }
    rows!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
}

/// The sums `out` holds for interleaved group `gi` on (`L` = 8 rows of one group, or 16 of
/// two) and activation rows `at..at + R` when `more` (a later panel of `k` adds to them),
/// else zeros: what [`scatter`] wrote there for the panels before.
#[cfg(target_arch = "x86_64")]
fn gather<const L: usize, const R: usize>(
    out: &[Out<'_>],
    gi: usize,
    at: usize,
    more: bool,
) -> [[f32; L]; R] {
    let mut init = [[0.0f32; L]; R];
    if more {
        for (i, o) in init.iter_mut().zip(&out[at..]) {
            for (i, o) in i.iter_mut().zip(&o[8 * gi..8 * gi + L]) {
                // SAFETY: the panels before this one wrote these sums ([`scatter`]).
                *i = unsafe { o.assume_init() };
            }
        }
    }
    init
}

/// Results from interleaved group `gi` on for activation rows `at..`: `sums[r][l]` (row `l`
/// from the group's first · activation row `at + r`; `L` = 8 rows of one group, or 16 of two)
/// into `out[at + r][8·gi + l]`.
#[cfg(target_arch = "x86_64")]
fn scatter<const L: usize>(out: &mut [Out<'_>], gi: usize, at: usize, sums: &[[f32; L]]) {
    for (o, lanes) in out[at..].iter_mut().zip(sums) {
        for (o, &x) in o[8 * gi..8 * gi + L].iter_mut().zip(lanes) {
            *o = MaybeUninit::new(x);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
