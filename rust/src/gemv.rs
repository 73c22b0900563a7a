//! Fused 4-bit matrix multiplication for few tokens (decode, 1-16 tokens):
//! `y[t, n] = sum_k x[t, k] * W[n, k]`, where the N x K weight W is quantized
//! blockwise exactly as nf4.rs lays it out (flat element e = n*K + k, block
//! e / blocksize, byte e / 2, even e in the high nibble; blocks may cross
//! rows). A weight is `table[code] * scale[block]` in float32, products are
//! accumulated in float32, and y is rounded to x's type (round-to-nearest-even).
//!
//! A dense W is never written: every packed byte and every scale is read once
//! per call (per 16 tokens; more tokens take one pass per group of 16), decoded
//! in registers and used for every token of the pass. Rows are split among
//! threads in tasks of a few hundred rows; the threads are torch's own OpenMP
//! team when the process has one (see `openmp`), else the rayon pool.
//!
//! Paths, picked at run time:
//! * AVX-512, when K % 32 == 0 (every row starts on a 32-element tile that lies
//!   in one block). A 64-byte load holds 128 weights; dword lane j holds
//!   elements 8j..8j+8, element 8j+i in bits 4*(i^1)..+4. `vpermps` looks up
//!   the low 4 bits of each lane, so a shift (or a load one byte further on)
//!   turns the bytes into 16 weights {8j+i : j} with no unpacking; x is stored
//!   transposed per 128-element tile to match. A tile inside one block uses
//!   the table times the scale (no multiply per weight); a tile across blocks
//!   (block size 32 or 64, or a row that starts mid-block) gets a per-lane
//!   scale vector. Rows whose K is not a multiple of 128 finish with 32-element
//!   tiles in natural order (the dequantize tile of nf4.rs).
//! * AVX2 for any K (and AVX-512 when K % 32 != 0): rows cut at block
//!   boundaries, each 32-weight run decoded in registers (byte shuffles of
//!   the table's four byte planes, then unpacks), times the block's scale,
//!   and multiplied into 4 accumulators per token; odd starts and short runs
//!   one by one. When every row is whole blocks of whole 32-weight runs (K a
//!   multiple of the block size, itself a multiple of 32: every model's
//!   shapes), x is stored with each 8 elements in the order the shuffles
//!   leave the weights in ("paired" layout), which saves two of the 14
//!   shuffles per run, and each row's double-quantized scales are decoded
//!   into a small buffer before the row.
//! * Generic Rust for any K (odd K, rows starting mid-byte), which LLVM
//!   vectorizes: NEON and plain scalar.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::codebook::QuantType;
use crate::cpu::{self, Isa};
use crate::elem::{DType, Elem};
use crate::error::{invalid, Result};
use crate::nf4::{check_blocksize, nested_scale, packed_len, Nested, Scales};
use crate::parallel;

/// Tokens that share one pass over the weights.
pub const TOKENS_PER_PASS: usize = 16;

/// Elements per step of the AVX512-BF16 kernel: 32 packed bytes, two
/// registers of 32 bfloat16 weights.
const BF16_GROUP: usize = 64;

/// Weights of one AVX-512 tile (64 packed bytes).
const TILE: usize = 128;

/// Weights of a short tile: the AVX-512 row tail and the generic lanes.
const SUB: usize = 32;

/// A task should hold at least this many weights (row count times K), so
/// that scheduling it costs nothing next to the work.
const MIN_TASK_WEIGHTS: usize = 32_768;

/// Products with fewer weight-token pairs (per pass) than this run on the
/// calling thread alone: waking a helper costs more than it saves.
const MIN_PARALLEL_WORK: usize = 1 << 18;

/// A 4-bit quantized N x K matrix (row-major, bitsandbytes' layout).
#[derive(Clone, Copy)]
pub struct Weight4<'a> {
    pub packed: &'a [u8],
    pub scales: Scales<'a>,
    pub quant_type: QuantType,
    pub blocksize: usize,
    /// Rows (output features).
    pub n: usize,
    /// Columns (input features).
    pub k: usize,
}

/// `y = x @ W.T` for `tokens` rows of x (tokens x K, row-major) into y
/// (tokens x N), with the best instruction set of this CPU.
pub fn gemv_4bit<E: Elem>(w: &Weight4, x: &[E], tokens: usize, y: &mut [E], threads: usize) -> Result<()> {
    gemv_4bit_isa(cpu::best(), w, x, tokens, y, threads)
}

/// As [`gemv_4bit`] on a chosen instruction set (for tests and benches).
pub fn gemv_4bit_isa<E: Elem>(
    isa: Isa,
    w: &Weight4,
    x: &[E],
    tokens: usize,
    y: &mut [E],
    threads: usize,
) -> Result<()> {
    check(w, x.len(), tokens, y.len())?;
    let isa = cpu::usable(isa);
    let (n, k) = (w.n, w.k);
    if tokens == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        y.fill(E::from_f32(0.0));
        return Ok(());
    }
    // bfloat16 x takes bfloat16 dot products where the CPU has them, from
    // one token on: 1.6x the float32 kernel's speed at one token (Zen 4).
    let bf16_dot = E::DTYPE == DType::BF16 && cpu::has_bf16_dot();
    let layout = x_layout(isa, k, w.blocksize, bf16_dot);
    let xs = XBuf::new(x, tokens, k, layout);
    let table = w.quant_type.table();
    let pairs = pair_table(table);
    let ctx = Ctx { w, isa, layout, x: &xs, tokens, table, pairs: &pairs };
    // A small product is not worth waking other threads for.
    let work = n.saturating_mul(k).saturating_mul(tokens.min(TOKENS_PER_PASS));
    let threads = if work < MIN_PARALLEL_WORK { 1 } else { threads.max(1) };
    let rows = rows_per_task(n, k, threads);
    let n_tasks = n.div_ceil(rows);
    // Task i writes rows [i*rows, (i+1)*rows) of every token's output.
    let mut outs: Vec<Vec<&mut [E]>> = (0..n_tasks).map(|_| Vec::with_capacity(tokens)).collect();
    for yt in y.chunks_exact_mut(n) {
        for (o, part) in outs.iter_mut().zip(yt.chunks_mut(rows)) {
            o.push(part);
        }
    }
    if threads == 1 || n_tasks == 1 {
        for (i, mut o) in outs.into_iter().enumerate() {
            ctx.task(i * rows, &mut o);
        }
        return Ok(());
    }
    // The calling thread works too, from the first moment, while the pool's
    // workers wake up (which can take longer than a small product). Worker i
    // first takes the tasks of its own contiguous share of the rows, so that
    // repeated calls find the same rows in the same core's cache, then helps
    // with the shares of the others.
    let tasks: Vec<Mutex<Vec<&mut [E]>>> = outs.into_iter().map(Mutex::new).collect();
    let workers = threads.min(n_tasks);
    let share = |g: usize| g * n_tasks / workers..(g + 1) * n_tasks / workers;
    let next: Vec<AtomicUsize> = (0..workers).map(|g| AtomicUsize::new(share(g).start)).collect();
    let work = |me: usize| {
        let me = me.min(workers - 1);
        for g in (me..workers).chain(0..me) {
            let end = share(g).end;
            loop {
                let i = next[g].fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    break;
                }
                let mut o = tasks[i].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                ctx.task(i * rows, &mut o);
            }
        }
    };
    // Inside a torch process the work goes to torch's own OpenMP threads:
    // between torch operations they spin, waiting for the next one, and a
    // separate pool would have to fight them for the cores.
    #[cfg(target_os = "linux")]
    if let Some(omp) = parallel::openmp::runtime() {
        omp.parallel(workers, &work);
        return Ok(());
    }
    run_with_helpers(threads, workers - 1, &work);
    Ok(())
}

/// Runs `work(0)` on the calling thread and `work(1..=helpers)` on the pool's
/// threads, and returns as soon as the calling thread is done and no helper is
/// inside `work`: a helper that starts later finds the job closed and leaves,
/// so a slow wake-up (tens of microseconds on a virtual machine) never delays
/// the caller. `work` must therefore not rely on the helpers: every task goes
/// to whoever claims it first from a shared counter.
fn run_with_helpers(threads: usize, helpers: usize, work: &(dyn Fn(usize) + Sync)) {
    struct Job {
        /// Helpers inside `work` (or deciding whether to enter it).
        active: AtomicUsize,
        closed: AtomicBool,
        panicked: AtomicBool,
        work: *const (dyn Fn(usize) + Sync),
    }
    // SAFETY: `work` points to a Sync closure; it is only called between a
    // helper's increment of `active` and its decrement, after seeing the job
    // open, and the caller (who owns the closure) does not return before it
    // has closed the job and seen `active` drop to zero. (SeqCst: a helper
    // that saw the job open has its increment ordered before the close.)
    unsafe impl Send for Job {}
    unsafe impl Sync for Job {}
    // SAFETY: only the lifetime is erased; see above for why it is never exceeded.
    let work_ptr = unsafe {
        std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync + 'static)>(work)
    };
    let job = Arc::new(Job {
        active: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        panicked: AtomicBool::new(false),
        work: work_ptr,
    });
    let pool = parallel::pool(threads);
    for me in 1..=helpers {
        let job = Arc::clone(&job);
        pool.spawn(move || {
            job.active.fetch_add(1, Ordering::SeqCst);
            if !job.closed.load(Ordering::SeqCst) {
                // SAFETY: the job is open and counted as active (see Job).
                let f = unsafe { &*job.work };
                if catch_unwind(AssertUnwindSafe(|| f(me))).is_err() {
                    job.panicked.store(true, Ordering::SeqCst);
                }
            }
            job.active.fetch_sub(1, Ordering::SeqCst);
        });
    }
    /// Closes the job and waits for the helpers inside it, also when `work(0)` unwinds.
    struct Close<'a>(&'a Job);
    impl Drop for Close<'_> {
        fn drop(&mut self) {
            self.0.closed.store(true, Ordering::SeqCst);
            let mut spins = 0u32;
            while self.0.active.load(Ordering::SeqCst) != 0 {
                spins += 1;
                if spins < 1 << 12 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }
    {
        let _close = Close(&job);
        work(0);
    }
    if job.panicked.load(Ordering::SeqCst) {
        panic!("a gemv_4bit worker thread panicked");
    }
}

fn check(w: &Weight4, x_len: usize, tokens: usize, y_len: usize) -> Result<()> {
    check_weight(w)?;
    let (n, k) = (w.n, w.k);
    let sized = |len: usize, cols: usize, what: &str| match tokens.checked_mul(cols) {
        Some(need) if need == len => Ok(()),
        _ => Err(invalid(format!(
            "{what} must have tokens * {cols} = {tokens} * {cols} values, got {len}"
        ))),
    };
    sized(x_len, k, "input")?;
    sized(y_len, n, "output")
}

/// The weight's half of [`check`]: block size, packed length, scales.
pub fn check_weight(w: &Weight4) -> Result<()> {
    check_blocksize(w.blocksize)?;
    let (n, k) = (w.n, w.k);
    let numel = n
        .checked_mul(k)
        .ok_or_else(|| invalid(format!("a {n} x {k} weight has more elements than memory can hold")))?;
    if w.packed.len() != packed_len(numel) {
        return Err(invalid(format!(
            "packed weight must have {} bytes for a {n} x {k} matrix, got {}",
            packed_len(numel),
            w.packed.len()
        )));
    }
    w.scales.check(numel.div_ceil(w.blocksize))
}

/// How [`XBuf`] lays x out for a kernel.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum XLayout {
    /// Token t at t * stride, in order (the generic and general AVX2 paths).
    Natural,
    /// As `Natural`, but each 8 elements 8g..8g+8 stored in the order
    /// [`PAIRED`] (the AVX2 kernel for rows of whole 32-weight runs).
    Paired,
    /// Tokens interleaved per 128-element tile (the AVX-512 kernel).
    Tiled,
    /// bfloat16 bits, tokens interleaved per 64-element group, even and odd
    /// elements apart (the AVX512-BF16 dot-product kernel; see [`XBuf`]).
    Bf16Pairs,
}

/// Element 8g + PAIRED[j] of x is stored at 8g + j in the paired layout:
/// `decode32_paired` puts even elements in the low 128-bit lane and odd
/// ones in the high lane.
const PAIRED: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// `bf16_dot`: x is bfloat16 (so its bits are exact) and the CPU has
/// AVX512-BF16 ([`cpu::has_bf16_dot`]).
fn x_layout(isa: Isa, k: usize, bs: usize, bf16_dot: bool) -> XLayout {
    if !cfg!(target_arch = "x86_64") {
        XLayout::Natural
    } else if isa == Isa::Avx512 && bf16_dot && k.is_multiple_of(BF16_GROUP) && bs.is_multiple_of(BF16_GROUP) {
        XLayout::Bf16Pairs
    } else if isa == Isa::Avx512 && k.is_multiple_of(SUB) {
        XLayout::Tiled
    } else if isa == Isa::Avx2 && k.is_multiple_of(bs) && bs.is_multiple_of(SUB) {
        XLayout::Paired
    } else {
        XLayout::Natural
    }
}

/// Rows per task: about four tasks per thread (a busy core takes fewer),
/// none smaller than [`MIN_TASK_WEIGHTS`].
fn rows_per_task(n: usize, k: usize, threads: usize) -> usize {
    if threads <= 1 {
        return n.max(1);
    }
    let even = n.div_ceil(threads * 4);
    let min_rows = MIN_TASK_WEIGHTS.div_ceil(k.max(1));
    even.max(min_rows).max(1)
}

/// 16 float32 values on one cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// x as float32, converted once per call into the layout the kernels read,
/// 64-byte aligned.
///
/// Tiled (AVX-512) layout: tokens in groups of [`TOKENS_PER_PASS`]; a group of
/// `nt` tokens starts at float g0 * K and holds the K / 16 lines ("slots") of
/// every token interleaved, slot-major: slot v of token t at (v * nt + t) * 16,
/// so one pass over a row reads x front to back. Slot 8c + i of a full
/// 128-element tile c holds x[128c + 8j + i] in lane j (the nibble order of a
/// 64-byte load); the 32-element tail tiles keep their order.
///
/// Bf16Pairs layout (K and the block size multiples of 64): a group of `nt`
/// tokens starts at u16 g0 * K; 64-element group q of token t is 64 u16 at
/// (q * nt + t) * 64: bf16(x[64q + 2w]) at w, then bf16(x[64q + 2w + 1]) at
/// 32 + w (w < 32), the order in which the kernel decodes a group's 32 bytes
/// (high nibbles: even elements; low nibbles: odd ones).
///
/// Natural (generic) layout: token t at t * stride, stride >= K padded so that
/// tokens do not fall into the same cache sets. The paired layout is the
/// natural one with each 8 elements permuted (see [`XLayout::Paired`]).
struct XBuf {
    lines: Vec<Line>,
    /// Floats per token.
    stride: usize,
}

impl XBuf {
    fn new<E: Elem>(x: &[E], tokens: usize, k: usize, layout: XLayout) -> XBuf {
        let tiled = layout == XLayout::Tiled;
        let stride = if tiled {
            k
        } else if layout == XLayout::Bf16Pairs {
            k / 2
        } else {
            let s = k.next_multiple_of(16);
            if (s * 4).is_multiple_of(4096) { s + 16 } else { s }
        };
        let mut lines = vec![Line([0.0; 16]); (tokens * stride).div_ceil(16)];
        // SAFETY: Line is 16 f32 with no padding.
        let out = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut f32, lines.len() * 16) };
        if layout == XLayout::Bf16Pairs {
            // SAFETY: the lines hold tokens * K / 2 floats, i.e. tokens * K u16.
            let out = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u16, tokens * k) };
            for g0 in (0..tokens).step_by(TOKENS_PER_PASS) {
                let nt = TOKENS_PER_PASS.min(tokens - g0);
                let og = &mut out[g0 * k..(g0 + nt) * k];
                for t in 0..nt {
                    let xr = &x[(g0 + t) * k..(g0 + t + 1) * k];
                    for q in 0..k / BF16_GROUP {
                        let o = &mut og[(q * nt + t) * BF16_GROUP..(q * nt + t + 1) * BF16_GROUP];
                        let xq = &xr[q * BF16_GROUP..(q + 1) * BF16_GROUP];
                        for w in 0..BF16_GROUP / 2 {
                            // bfloat16 inputs: the top half of the float is the value exactly.
                            o[w] = (xq[2 * w].to_f32().to_bits() >> 16) as u16;
                            o[BF16_GROUP / 2 + w] = (xq[2 * w + 1].to_f32().to_bits() >> 16) as u16;
                        }
                    }
                }
            }
        } else if tiled {
            let tiles = k / TILE;
            for g0 in (0..tokens).step_by(TOKENS_PER_PASS) {
                let nt = TOKENS_PER_PASS.min(tokens - g0);
                let og = &mut out[g0 * k..(g0 + nt) * k];
                for t in 0..nt {
                    let xr = &x[(g0 + t) * k..(g0 + t + 1) * k];
                    for v in 0..k / 16 {
                        let o = &mut og[(v * nt + t) * 16..(v * nt + t + 1) * 16];
                        if v < tiles * 8 {
                            let (c, i) = (v / 8, v % 8);
                            for (j, d) in o.iter_mut().enumerate() {
                                *d = xr[TILE * c + 8 * j + i].to_f32();
                            }
                        } else {
                            for (d, s) in o.iter_mut().zip(&xr[16 * v..16 * v + 16]) {
                                *d = s.to_f32();
                            }
                        }
                    }
                }
            }
        } else if layout == XLayout::Paired {
            for (o, xr) in out.chunks_mut(stride).zip(x.chunks_exact(k)) {
                for (o8, x8) in o.chunks_exact_mut(8).zip(xr.chunks_exact(8)) {
                    for (d, &j) in o8.iter_mut().zip(&PAIRED) {
                        *d = x8[j].to_f32();
                    }
                }
            }
        } else {
            for (o, xr) in out.chunks_mut(stride).zip(x.chunks_exact(k)) {
                for (d, s) in o.iter_mut().zip(xr) {
                    *d = s.to_f32();
                }
            }
        }
        XBuf { lines, stride }
    }

    /// The floats of tokens [g0, g0 + nt) (a group of the tiled layout).
    fn group(&self, g0: usize, nt: usize) -> &[f32] {
        // SAFETY: as in `new`.
        let all = unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const f32, self.lines.len() * 16) };
        &all[g0 * self.stride..(g0 + nt) * self.stride]
    }
}

/// Byte -> (value of the high nibble, value of the low nibble).
fn pair_table(table: &[f32; 16]) -> [[f32; 2]; 256] {
    let mut p = [[0f32; 2]; 256];
    for (b, v) in p.iter_mut().enumerate() {
        *v = [table[b >> 4], table[b & 15]];
    }
    p
}

/// Scales of blocks [b_lo, b_hi) of a nested state, as [`Scales::get`] computes them.
#[inline(always)]
fn decode_nested_generic(s: &Nested, b_lo: usize, out: &mut [f32]) {
    walk_nested(s, b_lo, out, |_, _, _| 0)
}

/// Decodes the scales of blocks [b_lo, b_lo + out.len()) of a nested state
/// into `out`, one group of `blocksize2` blocks (one `absmax2`) at a time:
/// `simd(codes, out, absmax2)` decodes a leading part of the group's codes
/// and returns how many; the rest go one by one ([`nested_scale`]).
#[inline(always)]
fn walk_nested(s: &Nested, b_lo: usize, out: &mut [f32], mut simd: impl FnMut(&[u8], &mut [f32], f32) -> usize) {
    let b_hi = b_lo + out.len();
    let mut b = b_lo;
    while b < b_hi {
        let g = b / s.blocksize2;
        let end = ((g + 1) * s.blocksize2).min(b_hi);
        let (q, o) = (&s.qabsmax[b..end], &mut out[b - b_lo..end - b_lo]);
        let done = simd(q, o, s.absmax2[g]);
        for (d, &c) in o[done..].iter_mut().zip(&q[done..]) {
            *d = nested_scale(s.code[c as usize], s.absmax2[g], s.offset);
        }
        b = end;
    }
}

thread_local! {
    /// Decoded scales of the task this thread runs, kept from call to call:
    /// a fresh buffer of a task's scales (128 KiB for a quarter of a
    /// 4096 x 4096 weight) is fresh pages, whose faults cost a one-token
    /// call more than decoding the scales does.
    static DECODED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Scales of blocks [b_lo, b_lo + out.len()) of a nested state into `out`.
fn decode_nested(isa: Isa, s: &Nested, b_lo: usize, out: &mut [f32]) {
    match isa {
        // SAFETY: cpu::usable() only passes instruction sets this CPU has.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::decode_nested_avx512(s, b_lo, out) },
        _ => decode_nested_generic(s, b_lo, out),
    }
}

/// What every task shares.
struct Ctx<'a> {
    w: &'a Weight4<'a>,
    isa: Isa,
    layout: XLayout,
    x: &'a XBuf,
    tokens: usize,
    table: &'a [f32; 16],
    pairs: &'a [[f32; 2]; 256],
}

/// One task's rows [r0, r1) and the scales of the blocks they touch,
/// starting at block `b_lo`.
struct Part<'a> {
    packed: &'a [u8],
    /// Floats per token in x (natural or paired layout).
    xs: usize,
    /// x is in the paired layout (and every row is whole blocks of whole
    /// 32-weight runs); only the x86 kernels have that layout.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    paired: bool,
    /// Decoded scales of blocks from `b_lo` (empty when `nested` is set).
    sc: &'a [f32],
    /// Double-quantized scales, decoded by the natural and paired kernels as
    /// they go (the row walk one at a time, the paired kernel a row at a
    /// time): a separate pass over a task's scales into a fresh buffer took
    /// about a sixth of a one-token call.
    nested: Option<&'a Nested<'a>>,
    b_lo: usize,
    bs: usize,
    k: usize,
    table: &'a [f32; 16],
    pairs: &'a [[f32; 2]; 256],
    r0: usize,
    r1: usize,
    /// One pass over the weight (at most [`TOKENS_PER_PASS`] tokens): the
    /// AVX-512 kernels prefetch it non-temporally (see `prefetch`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    once: bool,
}

impl Ctx<'_> {
    /// Rows starting at `r0`, `outs[t]` being token t's slice of them.
    fn task<E: Elem>(&self, r0: usize, outs: &mut [&mut [E]]) {
        let r1 = r0 + outs[0].len();
        let (k, bs) = (self.w.k, self.w.blocksize);
        let b_lo = r0 * k / bs;
        let b_hi = (r1 * k).div_ceil(bs);
        match &self.w.scales {
            Scales::Plain(a) => self.task_on(r0, outs, &a[b_lo..b_hi], None, b_lo),
            Scales::Nested(s) if !matches!(self.layout, XLayout::Tiled | XLayout::Bf16Pairs) => {
                self.task_on(r0, outs, &[], Some(s), b_lo)
            }
            Scales::Nested(s) => DECODED.with(|buf| {
                // Tasks do not nest, so the buffer is free here.
                let mut buf = buf.borrow_mut();
                if buf.len() < b_hi - b_lo {
                    buf.resize(b_hi - b_lo, 0.0);
                }
                let sc = &mut buf[..b_hi - b_lo];
                decode_nested(self.isa, s, b_lo, sc);
                self.task_on(r0, outs, sc, None, b_lo)
            }),
        }
    }

    /// [`Ctx::task`] with the scales of blocks from `b_lo` on, decoded
    /// (`sc`) or left to the kernel (`nested`).
    fn task_on<E: Elem>(&self, r0: usize, outs: &mut [&mut [E]], sc: &[f32], nested: Option<&Nested>, b_lo: usize) {
        let rows = outs[0].len();
        let r1 = r0 + rows;
        let (k, bs) = (self.w.k, self.w.blocksize);
        let part = Part {
            packed: self.w.packed,
            xs: self.x.stride,
            paired: self.layout == XLayout::Paired,
            sc,
            nested,
            b_lo,
            bs,
            k,
            table: self.table,
            pairs: self.pairs,
            r0,
            r1,
            once: self.tokens <= TOKENS_PER_PASS,
        };
        let mut res = vec![0f32; self.tokens.min(TOKENS_PER_PASS) * rows];
        for g0 in (0..self.tokens).step_by(TOKENS_PER_PASS) {
            let nt = TOKENS_PER_PASS.min(self.tokens - g0);
            let res = &mut res[..nt * rows];
            kernel(self.isa, self.layout, nt, &part, self.x.group(g0, nt), res);
            for (o, r) in outs[g0..g0 + nt].iter_mut().zip(res.chunks_exact(rows)) {
                for (d, &v) in o.iter_mut().zip(r) {
                    *d = E::from_f32(v);
                }
            }
        }
    }
}

/// Runs the kernel for `nt` (1..=16) tokens: res[t * rows + r] = y[t, r0 + r].
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn kernel(isa: Isa, layout: XLayout, nt: usize, p: &Part, x: &[f32], res: &mut [f32]) {
    debug_assert!(x.len() == nt * p.xs && res.len() == nt * (p.r1 - p.r0));
    macro_rules! by_tokens {
        ($($f:ident)::+) => {
            match nt {
                1 => $($f)::+::<1>(p, x, res),
                2 => $($f)::+::<2>(p, x, res),
                3 => $($f)::+::<3>(p, x, res),
                4 => $($f)::+::<4>(p, x, res),
                5 => $($f)::+::<5>(p, x, res),
                6 => $($f)::+::<6>(p, x, res),
                7 => $($f)::+::<7>(p, x, res),
                8 => $($f)::+::<8>(p, x, res),
                9 => $($f)::+::<9>(p, x, res),
                10 => $($f)::+::<10>(p, x, res),
                11 => $($f)::+::<11>(p, x, res),
                12 => $($f)::+::<12>(p, x, res),
                13 => $($f)::+::<13>(p, x, res),
                14 => $($f)::+::<14>(p, x, res),
                15 => $($f)::+::<15>(p, x, res),
                16 => $($f)::+::<16>(p, x, res),
                _ => unreachable!("at most {TOKENS_PER_PASS} tokens per pass, got {nt}"),
            }
        };
    }
    match isa {
        // SAFETY: cpu::usable() only passes instruction sets this CPU has; the
        // tiled kernel's reads stay inside the slices (see its comments), and
        // x is in the tiled layout exactly when `layout` says so.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if layout == XLayout::Tiled => unsafe {
            // Accumulator chains per token: at least 8 independent FMA
            // chains (4 cycles latency, 2 per cycle) in flight.
            match nt {
                1 => x86::tiled_avx512::<1, 8>(p, x, res),
                2 => x86::tiled_avx512::<2, 4>(p, x, res),
                3 => x86::tiled_avx512::<3, 3>(p, x, res),
                4 => x86::tiled_avx512::<4, 2>(p, x, res),
                5 => x86::tiled_avx512::<5, 2>(p, x, res),
                6 => x86::tiled_avx512::<6, 2>(p, x, res),
                7 => x86::tiled_avx512::<7, 2>(p, x, res),
                8 => x86::tiled_avx512::<8, 1>(p, x, res),
                9 => x86::tiled_avx512::<9, 1>(p, x, res),
                10 => x86::tiled_avx512::<10, 1>(p, x, res),
                11 => x86::tiled_avx512::<11, 1>(p, x, res),
                12 => x86::tiled_avx512::<12, 1>(p, x, res),
                13 => x86::tiled_avx512::<13, 1>(p, x, res),
                14 => x86::tiled_avx512::<14, 1>(p, x, res),
                15 => x86::tiled_avx512::<15, 1>(p, x, res),
                16 => x86::tiled_avx512::<16, 1>(p, x, res),
                _ => unreachable!("at most {TOKENS_PER_PASS} tokens per pass, got {nt}"),
            }
        },
        // SAFETY: the layout is Bf16Pairs only where cpu::has_bf16_dot() holds
        // and K and the block size are multiples of 64 (x_layout).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if layout == XLayout::Bf16Pairs => unsafe {
            // Enough independent accumulator chains (tokens x CH) to hide
            // vdpbf16ps's latency, few enough to stay in registers.
            match nt {
                1 => x86::bf16_dot_avx512::<1, 4>(p, x, res),
                2 => x86::bf16_dot_avx512::<2, 4>(p, x, res),
                3 => x86::bf16_dot_avx512::<3, 2>(p, x, res),
                4 => x86::bf16_dot_avx512::<4, 2>(p, x, res),
                5 => x86::bf16_dot_avx512::<5, 2>(p, x, res),
                6 => x86::bf16_dot_avx512::<6, 1>(p, x, res),
                7 => x86::bf16_dot_avx512::<7, 1>(p, x, res),
                8 => x86::bf16_dot_avx512::<8, 1>(p, x, res),
                9 => x86::bf16_dot_avx512::<9, 1>(p, x, res),
                10 => x86::bf16_dot_avx512::<10, 1>(p, x, res),
                11 => x86::bf16_dot_avx512::<11, 1>(p, x, res),
                12 => x86::bf16_dot_avx512::<12, 1>(p, x, res),
                13 => x86::bf16_dot_avx512::<13, 1>(p, x, res),
                14 => x86::bf16_dot_avx512::<14, 1>(p, x, res),
                15 => x86::bf16_dot_avx512::<15, 1>(p, x, res),
                16 => x86::bf16_dot_avx512::<16, 1>(p, x, res),
                _ => unreachable!("at most {TOKENS_PER_PASS} tokens per pass, got {nt}"),
            }
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { by_tokens!(x86::runs_avx2) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { by_tokens!(x86::runs_avx2) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { by_tokens!(arm::generic_neon) },
        _ => by_tokens!(generic),
    }
}

/// The reference path for any K: rows are cut at block boundaries, whole
/// 32-weight runs (an even start: whole bytes) are decoded with a byte ->
/// pair table into a buffer and multiplied into 32 lanes per token, which LLVM
/// vectorizes; a row's odd first element and short runs go one by one.
/// Accumulator lanes per token in the generic path (two AVX2 registers).
const GL: usize = 16;

/// The scales of consecutive blocks from a starting one, one division in
/// all: the walk moves to the next block each turn (and, with nested
/// scales, to the next group of blocks every blocksize2 turns).
struct BlockScales {
    b: usize,
    g: usize,
    g_end: usize,
}

impl BlockScales {
    #[inline(always)]
    fn new(p: &Part, b: usize) -> BlockScales {
        match p.nested {
            Some(ns) => {
                let g = b / ns.blocksize2;
                BlockScales { b, g, g_end: (g + 1) * ns.blocksize2 }
            }
            None => BlockScales { b, g: 0, g_end: usize::MAX },
        }
    }

    /// The scale of the current block; moves to the next.
    #[inline(always)]
    fn next(&mut self, p: &Part) -> f32 {
        let b = self.b;
        self.b += 1;
        match p.nested {
            None => p.sc[b - p.b_lo],
            Some(ns) => {
                if b == self.g_end {
                    self.g += 1;
                    self.g_end += ns.blocksize2;
                }
                // As Scales::get computes it.
                nested_scale(ns.code[ns.qabsmax[b] as usize], ns.absmax2[self.g], ns.offset)
            }
        }
    }
}

/// Walks row `n` block by block: an odd first element and whatever is left
/// of a block after its whole 32-weight runs go one by one into `single`;
/// `runs(e, seg_end, s)` takes the runs from the even element `e` (scale
/// `s`) while `e + SUB <= seg_end` and returns where it stopped.
#[inline(always)]
fn walk_row<const NT: usize>(
    p: &Part,
    x: &[f32],
    n: usize,
    single: &mut [f32; NT],
    mut runs: impl FnMut(usize, usize, f32) -> usize,
) {
    let (k, bs) = (p.k, p.bs);
    let e0 = n * k;
    let end = e0 + k;
    let mut e = e0;
    let one = |e: usize, s: f32, single: &mut [f32; NT]| {
        let byte = p.packed[e / 2];
        let code = if e.is_multiple_of(2) { byte >> 4 } else { byte & 15 };
        let v = p.table[code as usize] * s;
        for (t, a) in single.iter_mut().enumerate() {
            *a += v * x[t * p.xs + (e - e0)];
        }
    };
    let mut b = e0 / bs;
    let mut scales = BlockScales::new(p, b);
    while e < end {
        let seg_end = end.min((b + 1) * bs);
        let s = scales.next(p);
        if e % 2 == 1 {
            one(e, s, single);
            e += 1;
        }
        e = runs(e, seg_end, s);
        while e < seg_end {
            one(e, s, single);
            e += 1;
        }
        b += 1;
    }
}

#[inline(always)]
fn generic<const NT: usize>(p: &Part, x: &[f32], res: &mut [f32]) {
    let rows = p.r1 - p.r0;
    for (ri, n) in (p.r0..p.r1).enumerate() {
        let mut acc = [[0f32; GL]; NT];
        let mut single = [0f32; NT];
        let e0 = n * p.k;
        walk_row(p, x, n, &mut single, |mut e, seg_end, s| {
            while e + SUB <= seg_end {
                let kk = e - e0;
                let bytes: &[u8; SUB / 2] = p.packed[e / 2..e / 2 + SUB / 2].try_into().unwrap();
                let mut wv = [0f32; SUB];
                for (w2, &byte) in wv.chunks_exact_mut(2).zip(bytes) {
                    let pr = p.pairs[byte as usize];
                    w2[0] = pr[0] * s;
                    w2[1] = pr[1] * s;
                }
                for (t, a) in acc.iter_mut().enumerate() {
                    let xt: &[f32; SUB] = x[t * p.xs + kk..t * p.xs + kk + SUB].try_into().unwrap();
                    for (w, xh) in wv.chunks_exact(GL).zip(xt.chunks_exact(GL)) {
                        for l in 0..GL {
                            a[l] += w[l] * xh[l];
                        }
                    }
                }
                e += SUB;
            }
            e
        });
        for (t, a) in acc.iter().enumerate() {
            res[t * rows + ri] = a.iter().sum::<f32>() + single[t];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// The 16 table values as four byte planes (byte j of every value,
    /// repeated in both 128-bit lanes) for [`decode32`]'s byte shuffles.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn byte_planes(table: &[f32; 16]) -> [__m256i; 4] {
        let mut planes = [[0u8; 32]; 4];
        for (c, v) in table.iter().enumerate() {
            for (j, b) in v.to_bits().to_le_bytes().into_iter().enumerate() {
                planes[j][c] = b;
                planes[j][c + 16] = b;
            }
        }
        planes.map(|p| _mm256_loadu_si256(p.as_ptr() as *const __m256i))
    }

    /// The table values of the 32 codes in the 16 packed bytes at `q` (even
    /// element in the high nibble), in element order, as four vectors of 8.
    ///
    /// Byte shuffles look up the four bytes of each value and unpacks put
    /// them together. Unpacks work within 128-bit lanes, so the codes are
    /// first arranged with elements 0-3, 8-11, 16-19, 24-27 in the low lane
    /// and the others in the high lane, which makes the unpacked vectors come
    /// out in element order. On a Zen 3 EPYC this decodes twice as fast as
    /// two lane-crossing permutes and a blend per 8 weights (4096x4096, one
    /// token, one thread: 1.9 against 4.0 ms).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn decode32(q: *const u8, planes: &[__m256i; 4]) -> [__m256; 4] {
        let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(q as *const __m128i));
        #[rustfmt::skip]
        let pick = _mm256_setr_epi8(
            0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
            2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1,
        );
        let sel = _mm256_shuffle_epi8(v, pick);
        let mask = _mm256_set1_epi8(0x0f);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(sel), mask);
        let lo = _mm256_and_si256(sel, mask);
        let codes = _mm256_unpacklo_epi8(hi, lo);
        let b0 = _mm256_shuffle_epi8(planes[0], codes);
        let b1 = _mm256_shuffle_epi8(planes[1], codes);
        let b2 = _mm256_shuffle_epi8(planes[2], codes);
        let b3 = _mm256_shuffle_epi8(planes[3], codes);
        let (l01, h01) = (_mm256_unpacklo_epi8(b0, b1), _mm256_unpackhi_epi8(b0, b1));
        let (l23, h23) = (_mm256_unpacklo_epi8(b2, b3), _mm256_unpackhi_epi8(b2, b3));
        [
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23)),
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23)),
        ]
    }

    /// [`decode32`] without putting the weights back in element order: the low
    /// 128-bit lane takes the high nibbles (even elements) and the high lane
    /// the low nibbles (odd elements), so that vector i holds elements
    /// 8i + [`PAIRED`]`[j]` in lane j, and x in the paired layout matches.
    /// One shuffle and one unpack fewer than [`decode32`] (a blend instead),
    /// on a kernel bound by shuffles.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn decode32_paired(q: *const u8, planes: &[__m256i; 4]) -> [__m256; 4] {
        let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(q as *const __m128i));
        let mask = _mm256_set1_epi8(0x0f);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
        let lo = _mm256_and_si256(v, mask);
        let codes = _mm256_blend_epi32::<0xf0>(hi, lo);
        let b0 = _mm256_shuffle_epi8(planes[0], codes);
        let b1 = _mm256_shuffle_epi8(planes[1], codes);
        let b2 = _mm256_shuffle_epi8(planes[2], codes);
        let b3 = _mm256_shuffle_epi8(planes[3], codes);
        let (l01, h01) = (_mm256_unpacklo_epi8(b0, b1), _mm256_unpackhi_epi8(b0, b1));
        let (l23, h23) = (_mm256_unpacklo_epi8(b2, b3), _mm256_unpackhi_epi8(b2, b3));
        [
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23)),
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23)),
        ]
    }

    /// [`decode_nested_generic`] 8 scales at a time (what it compiles to
    /// under AVX2, hardware gathers, cost about 4 cycles a scale on Zen 3,
    /// a tenth of a one-token call). Same operations: multiply, add, clamp
    /// at the largest float with NaN kept (`min(MAX, s)` returns a NaN `s`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn decode_nested_avx2(s: &Nested, b_lo: usize, out: &mut [f32]) {
        let (offset, top) = (_mm256_set1_ps(s.offset), _mm256_set1_ps(f32::MAX));
        walk_nested(s, b_lo, out, |q, o, a2| {
            let a2 = _mm256_set1_ps(a2);
            let full = q.len() / 8 * 8;
            for i in (0..full).step_by(8) {
                // In bounds: i + 7 < full <= q.len() = o.len(), and a byte indexes the 256 codes.
                let at = |j: usize| *s.code.get_unchecked(*q.get_unchecked(i + j) as usize);
                let c = _mm256_setr_ps(at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7));
                let v = _mm256_min_ps(top, _mm256_add_ps(_mm256_mul_ps(c, a2), offset));
                _mm256_storeu_ps(o.as_mut_ptr().add(i), v);
            }
            full
        })
    }

    /// The generic path's loop with its 32-weight runs decoded in registers
    /// ([`decode32`], then times the block's scale: the same products as
    /// dequantizing) instead of a pair-table load per 2 weights through a
    /// buffer. Odd starts and short runs go one by one as in [`generic`]; x
    /// is in the natural layout.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn runs_avx2<const NT: usize>(p: &Part, x: &[f32], res: &mut [f32]) {
        let planes = byte_planes(p.table);
        if p.paired {
            debug_assert!(p.k.is_multiple_of(p.bs) && p.bs.is_multiple_of(SUB));
            return whole_blocks::<NT>(p, x, res, &planes);
        }
        let rows = p.r1 - p.r0;
        for (ri, n) in (p.r0..p.r1).enumerate() {
            let mut acc = [[_mm256_setzero_ps(); 4]; NT];
            let mut single = [0f32; NT];
            let e0 = n * p.k;
            walk_row(p, x, n, &mut single, |mut e, seg_end, s| {
                let sv = _mm256_set1_ps(s);
                while e + SUB <= seg_end {
                    // In bounds: e is even and e + SUB <= the row's end, so the
                    // 16 bytes from e / 2 lie in the packed row, and the 32
                    // floats of x from e - e0 in the token's row.
                    let w = decode32(p.packed.as_ptr().add(e / 2), &planes).map(|v| _mm256_mul_ps(v, sv));
                    let kk = e - e0;
                    for (t, a) in acc.iter_mut().enumerate() {
                        let xt = x.as_ptr().add(t * p.xs + kk);
                        for (i, ai) in a.iter_mut().enumerate() {
                            *ai = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xt.add(8 * i)), *ai);
                        }
                    }
                    e += SUB;
                }
                e
            });
            for (t, a) in acc.iter().enumerate() {
                res[t * rows + ri] = hsum(a) + single[t];
            }
        }
    }

    /// [`runs_avx2`] for rows made of whole blocks of whole 32-weight runs
    /// (K a multiple of the block size, itself a multiple of 32: every
    /// model's shapes), x in the paired layout, without the general row
    /// walk's bookkeeping (4096x4096, one token, one thread: 2.7 against
    /// 3.3-3.7 ms). Double-quantized scales are decoded a row at a time into
    /// a buffer first: decoding each where it is used, between the shuffles,
    /// made a one-token call about 6% slower.
    #[inline(always)]
    unsafe fn whole_blocks<const NT: usize>(p: &Part, x: &[f32], res: &mut [f32], planes: &[__m256i; 4]) {
        let rows = p.r1 - p.r0;
        let per_row = p.k / p.bs;
        let runs = p.bs / SUB;
        // In bounds: rows r0..r1 hold (r1 - r0) * K / 2 packed bytes from
        // r0 * K / 2, and each token's x row K floats.
        assert!(p.r1 * p.k / 2 <= p.packed.len() && (NT - 1) * p.xs + p.k <= x.len());
        // Plain scales of rows r0..r1 start at block r0 * per_row == b_lo.
        assert!(p.nested.is_some() || p.sc.len() >= rows * per_row);
        let mut row_scales = vec![0f32; if p.nested.is_some() { per_row } else { 0 }];
        let mut q = p.packed.as_ptr().add(p.r0 * p.k / 2);
        for ri in 0..rows {
            let scales: &[f32] = match p.nested {
                Some(ns) => {
                    decode_nested_avx2(ns, (p.r0 + ri) * per_row, &mut row_scales);
                    &row_scales
                }
                None => &p.sc[ri * per_row..(ri + 1) * per_row],
            };
            let mut acc = [[_mm256_setzero_ps(); 4]; NT];
            let mut xo = x.as_ptr();
            for &s in scales {
                let sv = _mm256_set1_ps(s);
                for _ in 0..runs {
                    let w = decode32_paired(q, planes).map(|v| _mm256_mul_ps(v, sv));
                    for (t, a) in acc.iter_mut().enumerate() {
                        let xt = xo.add(t * p.xs);
                        for (i, ai) in a.iter_mut().enumerate() {
                            *ai = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xt.add(8 * i)), *ai);
                        }
                    }
                    q = q.add(SUB / 2);
                    xo = xo.add(SUB);
                }
            }
            for (t, a) in acc.iter().enumerate() {
                res[t * rows + ri] = hsum_paired(a);
            }
        }
    }

    /// The sum of the lanes of four accumulators.
    #[inline(always)]
    unsafe fn hsum(a: &[__m256; 4]) -> f32 {
        hsum8(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])))
    }

    /// [`hsum`] of accumulators whose lanes are in the paired order: the
    /// lanes are put back in element order first, so that the additions, and
    /// so the rounded result, are exactly those of the natural layout (a
    /// different order can flip a bf16 output, and a greedy continuation).
    #[inline(always)]
    unsafe fn hsum_paired(a: &[__m256; 4]) -> f32 {
        let v = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
        // Lane e takes the lane that holds element e (the inverse of PAIRED).
        hsum8(_mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)))
    }

    #[inline(always)]
    unsafe fn hsum8(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_movehdup_ps(h));
        _mm_cvtss_f32(h)
    }

    /// [`decode_nested_generic`] 16 scales at a time: the 256 codes sit in
    /// 16 registers, `vpermt2ps` looks up each 32 of them and blends by the
    /// top three bits of the byte pick among the 8 results (a gather, or one
    /// scale at a time, took a sixth of a one-token call; this about half).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn decode_nested_avx512(s: &Nested, b_lo: usize, out: &mut [f32]) {
        let (offset, top) = (_mm512_set1_ps(s.offset), _mm512_set1_ps(f32::MAX));
        let codes: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(s.code.as_ptr().add(16 * i)));
        let (bit5, bit6, bit7) = (_mm512_set1_epi32(32), _mm512_set1_epi32(64), _mm512_set1_epi32(128));
        walk_nested(s, b_lo, out, |q, o, a2| {
            let a2 = _mm512_set1_ps(a2);
            let full = q.len() / 16 * 16;
            for i in (0..full).step_by(16) {
                // In bounds: i + 15 < full <= q.len() = o.len().
                let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(q.as_ptr().add(i) as *const __m128i));
                let r: [__m512; 8] = std::array::from_fn(|j| _mm512_permutex2var_ps(codes[2 * j], idx, codes[2 * j + 1]));
                let (m5, m6, m7) =
                    (_mm512_test_epi32_mask(idx, bit5), _mm512_test_epi32_mask(idx, bit6), _mm512_test_epi32_mask(idx, bit7));
                let s01 = _mm512_mask_blend_ps(m5, r[0], r[1]);
                let s23 = _mm512_mask_blend_ps(m5, r[2], r[3]);
                let s45 = _mm512_mask_blend_ps(m5, r[4], r[5]);
                let s67 = _mm512_mask_blend_ps(m5, r[6], r[7]);
                let lo = _mm512_mask_blend_ps(m6, s01, s23);
                let hi = _mm512_mask_blend_ps(m6, s45, s67);
                let c = _mm512_mask_blend_ps(m7, lo, hi);
                // min(top, v) keeps a NaN v (minps returns its second operand then).
                let v = _mm512_min_ps(top, _mm512_add_ps(_mm512_mul_ps(c, a2), offset));
                _mm512_storeu_ps(o.as_mut_ptr().add(i), v);
            }
            full
        })
    }

    /// The 8 index vectors of a 64-byte tile at `p`: vector i holds (in the
    /// low 4 bits of lane j) the code of element 8j + i. Reads 67 bytes: the
    /// four loads at p..p+3 put byte 4j+o at the bottom of lane j, whose low
    /// nibble is element 8j+2o+1 and high nibble element 8j+2o.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn nibbles(p: *const u8) -> [__m512i; 8] {
        let l0 = _mm512_loadu_si512(p as *const __m512i);
        let l1 = _mm512_loadu_si512(p.add(1) as *const __m512i);
        let l2 = _mm512_loadu_si512(p.add(2) as *const __m512i);
        let l3 = _mm512_loadu_si512(p.add(3) as *const __m512i);
        [
            _mm512_srli_epi32::<4>(l0),
            l0,
            _mm512_srli_epi32::<4>(l1),
            l1,
            _mm512_srli_epi32::<4>(l2),
            l2,
            _mm512_srli_epi32::<4>(l3),
            l3,
        ]
    }

    /// Bytes ahead of the packed weight the AVX-512 kernels prefetch: about
    /// two rows of a 4096-wide matrix. The hardware prefetchers alone leave
    /// a weight streamed from DRAM 15-60% slower than one already in L3
    /// (4096 x 4096, 2 threads: 1 token 1.13x, 4 tokens 1.62x, 16 tokens
    /// 1.25x faster with it; 2-16 KiB ahead all did about as well).
    const PREFETCH_AHEAD: usize = 4096;

    /// Prefetches the packed weight `ahead` bytes past `pk` ([`PREFETCH_AHEAD`]
    /// for whole rows, [`chunk_ahead`] in chunks). A weight read once per
    /// call (`once`) is fetched non-temporally, so that streaming it does not
    /// push out of L2 and L3 what the rest of the model works on (decoding
    /// SmolLM2: 1.02x tokens/s, in-process A/B); one read once per 16 tokens
    /// is kept for the next pass.
    #[inline(always)]
    unsafe fn prefetch(pk: *const u8, ahead: usize, once: bool) {
        let at = pk.wrapping_add(ahead) as *const i8;
        if once {
            _mm_prefetch::<_MM_HINT_NTA>(at);
        } else {
            _mm_prefetch::<_MM_HINT_T0>(at);
        }
    }

    /// The prefetch distance when rows go through K in chunks of
    /// `chunk_bytes` packed bytes each (`row_bytes` per row): the same chunk of
    /// the row [`PREFETCH_AHEAD`] bytes of chunks later, which is what is read
    /// then (the next row's chunk, or one of the next group's rows, which
    /// stays in L2 until its turn). Along the row, the prefetches would fetch
    /// the row's next chunk, read only after the whole group's: 4096 x 11008,
    /// bf16 x, 2 threads, 2 tokens 1.38 against 1.66 ms, 4 tokens 1.75
    /// against 2.21 ms (in-process A/B; with K = 4096 no change).
    fn chunk_ahead(chunk_bytes: usize, row_bytes: usize) -> usize {
        PREFETCH_AHEAD.div_ceil(chunk_bytes.max(1)) * row_bytes
    }

    /// Bytes `nibbles` reads from the start of a tile.
    const TILE_READ: usize = TILE / 2 + 3;

    /// Bytes of x (all tokens of a pass) one K chunk should span, so that
    /// the chunk stays in L1 while a group of rows reuses it.
    const X_CHUNK_BYTES: usize = 16 << 10;

    /// x of at most this many bytes (all tokens of a pass) is read whole
    /// for every row, without chunks. Chunks cost more than L1 misses on x
    /// up to about L1's size: they cut the weight's stream into pieces of a
    /// few rows, which the prefetches (a fixed distance ahead along a row)
    /// miss. Zen 4 (L1 32 KiB), x of 16-32 KiB, 2 threads: bf16 x, 1 token of
    /// a 4096 x 11008 weight 1.02 against 1.31 ms, 3 tokens of 4096 x 4096
    /// 0.40 against 0.50 ms, 4 tokens 0.50 against 0.57 ms; float32 x, 2
    /// tokens of 4096 x 4096 0.57 against 0.64 ms (in-process A/B). Above
    /// 32 KiB, chunks win (8 tokens of 4096 x 4096: 0.91 against 0.96 ms).
    const X_WHOLE_BYTES: usize = 32 << 10;

    /// Rows that share one K chunk of x.
    const ROW_GROUP: usize = 16;

    /// Loop invariants of the tiled kernel.
    struct Consts {
        tbl: __m512,
        lane8: __m512i,
        shift: u32,
        shift_v: __m512i,
        nib: __m128i,
    }

    /// The AVX-512 kernel for K % 32 == 0, x in the tiled layout of [`XBuf`];
    /// `CH` accumulator chains per token hide the FMA latency when there are
    /// few tokens. When a row's x (all tokens) exceeds [`X_WHOLE_BYTES`], rows
    /// go in groups of [`ROW_GROUP`] through K in chunks of [`X_CHUNK_BYTES`],
    /// which fit L1, the accumulators parked in between.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn tiled_avx512<const NT: usize, const CH: usize>(p: &Part, x: &[f32], res: &mut [f32]) {
        debug_assert!(x.len() == NT * p.k && (x.as_ptr() as usize).is_multiple_of(64));
        let bs = p.bs;
        let shift = bs.trailing_zeros();
        let cx = Consts {
            tbl: _mm512_loadu_ps(p.table.as_ptr()),
            lane8: _mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120),
            shift,
            shift_v: _mm512_set1_epi32(shift as i32),
            nib: _mm_set1_epi8(0x0f),
        };
        let rows = p.r1 - p.r0;
        let tiles = p.k / TILE;
        let chunk = if NT * p.k * 4 <= X_WHOLE_BYTES { tiles } else { (X_CHUNK_BYTES / (NT * TILE * 4)).max(1) };
        let zero = [[_mm512_setzero_ps(); CH]; NT];
        if tiles <= chunk {
            for n in p.r0..p.r1 {
                let mut acc = zero;
                row_part::<NT, CH>(&cx, p, x, n, 0, tiles, true, &mut acc, PREFETCH_AHEAD);
                finish::<NT, CH>(&acc, res, rows, n - p.r0);
            }
            return;
        }
        let mut parked = [zero; ROW_GROUP];
        for g in (p.r0..p.r1).step_by(ROW_GROUP) {
            let g_end = (g + ROW_GROUP).min(p.r1);
            let mut c0 = 0;
            while c0 < tiles {
                let c1 = (c0 + chunk).min(tiles);
                let last = c1 == tiles;
                let ahead = chunk_ahead((c1 - c0) * TILE / 2, p.k / 2);
                for (n, slot) in (g..g_end).zip(parked.iter_mut()) {
                    let mut acc = if c0 == 0 { zero } else { *slot };
                    row_part::<NT, CH>(&cx, p, x, n, c0, c1, last, &mut acc, ahead);
                    if last {
                        finish::<NT, CH>(&acc, res, rows, n - p.r0);
                    } else {
                        *slot = acc;
                    }
                }
                c0 = c1;
            }
        }
    }

    /// res[t * rows + r] = the sum of token t's accumulators.
    ///
    /// `finish` and `row_part` are always inlined into the kernel (a
    /// `#[target_feature]` function cannot be `inline(always)`), so that the
    /// accumulators stay in registers; they must only be called from there.
    #[inline(always)]
    unsafe fn finish<const NT: usize, const CH: usize>(acc: &[[__m512; CH]; NT], res: &mut [f32], rows: usize, r: usize) {
        for (t, a) in acc.iter().enumerate() {
            let mut s = a[0];
            for &c in &a[1..] {
                s = _mm512_add_ps(s, c);
            }
            res[t * rows + r] = _mm512_reduce_add_ps(s);
        }
    }

    /// Adds tiles [c0, c1) of row n (and its 32-element tail tiles if `tail`)
    /// times x to the accumulators. Bounds are checked once per call; the
    /// tile loop only moves pointers.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn row_part<const NT: usize, const CH: usize>(
        cx: &Consts,
        p: &Part,
        x: &[f32],
        n: usize,
        c0: usize,
        c1: usize,
        tail: bool,
        acc: &mut [[__m512; CH]; NT],
        ahead: usize,
    ) {
        let (k, bs, shift) = (p.k, p.bs, cx.shift);
        let packed = p.packed;
        let e0 = n * k;
        let tiles = k / TILE;
        assert!(c0 <= c1 && c1 <= tiles && n >= p.r0 && n < p.r1 && x.len() == NT * k);
        if c0 < c1 {
            // The tiles' bytes [e0/2 + 64 c0, e0/2 + 64 c1) lie inside `packed`
            // (e0 + k <= n_rows * k); `nibbles` reads 3 bytes further, which the
            // matrix's very last tile may not have: that one goes via a copy.
            let first_byte = e0 / 2 + c0 * TILE / 2;
            let fast_end = if e0 / 2 + c1 * TILE / 2 + 3 <= packed.len() { c1 } else { c1 - 1 };
            // The tiles' blocks, all among this task's scales.
            let b_first = (e0 + c0 * TILE) >> shift;
            let b_last = (e0 + c1 * TILE - 1) >> shift;
            assert!(b_first >= p.b_lo && b_last < p.b_lo + p.sc.len());
            let mut pk = packed.as_ptr().add(first_byte);
            let mut sp = p.sc.as_ptr().add(b_first - p.b_lo);
            // Slot v of token t is at x + (v * NT + t) * 16; tile c's slots are 8c..8c+8.
            let mut xo = x.as_ptr().add(c0 * 8 * NT * 16);
            let mut spare = [0u8; TILE_READ];
            let mut load = |c: usize, pk: *const u8| {
                if c < fast_end {
                    nibbles(pk)
                } else {
                    std::ptr::copy_nonoverlapping(pk, spare.as_mut_ptr(), TILE / 2);
                    nibbles(spare.as_ptr())
                }
            };
            let mut off = (e0 + c0 * TILE) & (bs - 1);
            if bs <= TILE && (bs < TILE || off != 0) {
                // Every tile spans the same pattern of blocks: lane j (elements
                // 8j..8j+8) lies in block first + (off + 8j) / bs, `count` <= 4
                // blocks from `sp` on, TILE / bs blocks further each tile.
                let sidx = _mm512_srlv_epi32(_mm512_add_epi32(_mm512_set1_epi32(off as i32), cx.lane8), cx.shift_v);
                let count = ((off + TILE - 1) >> shift) + 1;
                let mask = ((1u32 << count) - 1) as __mmask16;
                let step = TILE >> shift;
                for c in c0..c1 {
                    let idx = load(c, pk);
                    prefetch(pk, ahead, p.once);
                    let sv = _mm512_permutexvar_ps(sidx, _mm512_maskz_loadu_ps(mask, sp));
                    cross_tile::<NT, CH>(&idx, cx.tbl, sv, xo, acc);
                    pk = pk.add(TILE / 2);
                    sp = sp.add(step);
                    xo = xo.add(8 * NT * 16);
                }
            } else {
                // Blocks of >= 128: a tile lies in one block, except where a
                // row starting mid-block (off % 128 != 0) crosses a boundary.
                for c in c0..c1 {
                    let idx = load(c, pk);
                    prefetch(pk, ahead, p.once);
                    if off + TILE <= bs {
                        let tab = _mm512_mul_ps(cx.tbl, _mm512_set1_ps(*sp));
                        uniform_tile::<NT, CH>(&idx, tab, xo, acc);
                    } else {
                        // Blocks sp[0] (lanes below (bs - off) / 8) and sp[1].
                        let sidx = _mm512_srlv_epi32(_mm512_add_epi32(_mm512_set1_epi32(off as i32), cx.lane8), cx.shift_v);
                        let sv = _mm512_permutexvar_ps(sidx, _mm512_maskz_loadu_ps(0b11, sp));
                        cross_tile::<NT, CH>(&idx, cx.tbl, sv, xo, acc);
                    }
                    off += TILE;
                    if off >= bs {
                        off -= bs;
                        sp = sp.add(1);
                    }
                    pk = pk.add(TILE / 2);
                    xo = xo.add(8 * NT * 16);
                }
            }
        }
        if !tail {
            return;
        }
        let k128 = tiles * TILE;
        let xp = x.as_ptr();
        for m in 0..(k - k128) / SUB {
            // 32 weights in natural order, inside one block (e % 32 == 0).
            let e = e0 + k128 + m * SUB;
            let tab = _mm512_mul_ps(cx.tbl, _mm512_set1_ps(p.sc[(e >> shift) - p.b_lo]));
            let src = &packed[e / 2..e / 2 + SUB / 2];
            let bytes = _mm_loadu_si128(src.as_ptr() as *const __m128i);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), cx.nib);
            let lo = _mm_and_si128(bytes, cx.nib);
            let w0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), tab);
            let w1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo)), tab);
            let xo = xp.add((k128 / 16 + 2 * m) * NT * 16);
            for (t, a) in acc.iter_mut().enumerate() {
                a[0] = _mm512_fmadd_ps(w0, _mm512_load_ps(xo.add(t * 16)), a[0]);
                a[1 % CH] = _mm512_fmadd_ps(w1, _mm512_load_ps(xo.add((NT + t) * 16)), a[1 % CH]);
            }
        }
    }

    /// The code book times `s` in bfloat16, in both halves of 32 16-bit lanes
    /// (`vpermw` indexes 5 bits). `vcvtne2ps2bf16` rounds to nearest even as
    /// torch does; where it differs (NaN payloads, float32 denormals read as
    /// zero) `vdpbf16ps` would read the weight as NaN or zero all the same.
    #[inline(always)]
    unsafe fn bf16_table(tbl: __m512, s: f32) -> __m512i {
        let v = _mm512_mul_ps(tbl, _mm512_set1_ps(s));
        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(v, v))
    }

    /// The AVX512-BF16 kernel: bfloat16 x (layout [`XLayout::Bf16Pairs`]),
    /// K and the block size multiples of 64. Each block's code book is scaled
    /// and rounded to bfloat16 once (the weights `dequantize_4bit(...).to(bf16)`
    /// gives), each 32 packed bytes become two registers of 32 bfloat16
    /// weights through `vpermw`, and `vdpbf16ps` multiplies them into float32
    /// accumulators: exact products, float32 sums (denormal inputs and sums
    /// flushed to zero, as the instruction does). `CH` accumulator chains per
    /// token (1, 2 or 4: few tokens need several to hide the instruction's
    /// latency; many would run out of registers). When a row's x (all
    /// tokens) exceeds [`X_WHOLE_BYTES`], rows go in groups of [`ROW_GROUP`]
    /// through K in chunks that fit L1, the accumulators parked in between
    /// (as in [`tiled_avx512`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
    pub(super) unsafe fn bf16_dot_avx512<const NT: usize, const CH: usize>(p: &Part, x: &[f32], res: &mut [f32]) {
        let (k, bs) = (p.k, p.bs);
        let groups = k / BF16_GROUP;
        assert!(k.is_multiple_of(BF16_GROUP) && bs.is_multiple_of(BF16_GROUP) && x.len() * 2 == NT * k);
        let tbl = _mm512_loadu_ps(p.table.as_ptr());
        let rows = p.r1 - p.r0;
        let chunk = if NT * k * 2 <= X_WHOLE_BYTES { groups } else { (X_CHUNK_BYTES / (NT * BF16_GROUP * 2)).max(2) };
        let zero = [[_mm512_setzero_ps(); CH]; NT];
        if groups <= chunk {
            for n in p.r0..p.r1 {
                let mut acc = zero;
                bf16_row_part::<NT, CH>(p, tbl, x, n, 0, groups, &mut acc, PREFETCH_AHEAD);
                bf16_finish::<NT, CH>(&acc, res, rows, n - p.r0);
            }
            return;
        }
        let mut parked = [zero; ROW_GROUP];
        for g in (p.r0..p.r1).step_by(ROW_GROUP) {
            let g_end = (g + ROW_GROUP).min(p.r1);
            let mut q0 = 0;
            while q0 < groups {
                let q1 = (q0 + chunk).min(groups);
                let ahead = chunk_ahead((q1 - q0) * BF16_GROUP / 2, k / 2);
                for (n, slot) in (g..g_end).zip(parked.iter_mut()) {
                    let mut acc = if q0 == 0 { zero } else { *slot };
                    bf16_row_part::<NT, CH>(p, tbl, x, n, q0, q1, &mut acc, ahead);
                    if q1 == groups {
                        bf16_finish::<NT, CH>(&acc, res, rows, n - p.r0);
                    } else {
                        *slot = acc;
                    }
                }
                q0 = q1;
            }
        }
    }

    /// res[t * rows + r] = the sum of token t's accumulators (inlined into
    /// the kernel only, as [`finish`]).
    #[inline(always)]
    unsafe fn bf16_finish<const NT: usize, const CH: usize>(acc: &[[__m512; CH]; NT], res: &mut [f32], rows: usize, r: usize) {
        for (t, a) in acc.iter().enumerate() {
            let mut s = a[0];
            for &c in &a[1..] {
                s = _mm512_add_ps(s, c);
            }
            res[t * rows + r] = _mm512_reduce_add_ps(s);
        }
    }

    /// Adds groups [q0, q1) of row n times x to the accumulators (inlined
    /// into the kernel only). Bounds are checked once per call.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn bf16_row_part<const NT: usize, const CH: usize>(
        p: &Part,
        tbl: __m512,
        x: &[f32],
        n: usize,
        q0: usize,
        q1: usize,
        acc: &mut [[__m512; CH]; NT],
        ahead: usize,
    ) {
        let (k, bs) = (p.k, p.bs);
        let e0 = n * k;
        // The groups' bytes and blocks lie inside `packed` and this task's scales,
        // their x inside `x`.
        assert!(q0 < q1 && q1 * BF16_GROUP <= k && n >= p.r0 && n < p.r1 && x.len() * 2 == NT * k);
        assert!((e0 + q1 * BF16_GROUP) / 2 <= p.packed.len());
        let e = e0 + q0 * BF16_GROUP;
        let b_first = e / bs;
        assert!(b_first >= p.b_lo && (e0 + q1 * BF16_GROUP - 1) / bs < p.b_lo + p.sc.len());
        let mut sp = p.sc.as_ptr().add(b_first - p.b_lo);
        let mut off = e % bs;
        let mut wt = bf16_table(tbl, *sp);
        let mut pk = p.packed.as_ptr().add(e / 2);
        let xw = x.as_ptr() as *const u16;
        // Groups per turn: two (four chains per token) for one or two tokens.
        let per = if CH == 4 { 2 } else { 1 };
        let mut q = q0;
        while q < q1 {
            for u in 0..per {
                if q + u >= q1 {
                    break;
                }
                if off == bs {
                    off = 0;
                    sp = sp.add(1);
                    wt = bf16_table(tbl, *sp);
                }
                let words = _mm512_cvtepu8_epi16(_mm256_loadu_si256(pk as *const __m256i));
                // One prefetch per cache line (whatever the alignment, one of
                // two consecutive 32-byte groups starts in a line's first
                // half): a second, redundant one per line cost 8-10% of a
                // one-token call streaming the weight from DRAM.
                if (pk as usize) & 63 < 32 {
                    prefetch(pk, ahead, p.once);
                }
                let wa: __m512bh = std::mem::transmute(_mm512_permutexvar_epi16(_mm512_srli_epi16::<4>(words), wt));
                let wb: __m512bh = std::mem::transmute(_mm512_permutexvar_epi16(words, wt));
                let xo = xw.add((q + u) * NT * BF16_GROUP);
                for (t, a) in acc.iter_mut().enumerate() {
                    let xa: __m512bh = std::mem::transmute(_mm512_load_si512(xo.add(t * BF16_GROUP) as *const _));
                    let xb: __m512bh =
                        std::mem::transmute(_mm512_load_si512(xo.add(t * BF16_GROUP + BF16_GROUP / 2) as *const _));
                    if CH == 1 {
                        a[0] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(a[0], wa, xa), wb, xb);
                    } else {
                        a[(2 * u) % CH] = _mm512_dpbf16_ps(a[(2 * u) % CH], wa, xa);
                        a[(2 * u + 1) % CH] = _mm512_dpbf16_ps(a[(2 * u + 1) % CH], wb, xb);
                    }
                }
                pk = pk.add(BF16_GROUP / 2);
                off += BF16_GROUP;
            }
            q += per;
        }
    }

    /// A tile inside one block: `tab` is the code book times its scale.
    #[inline(always)]
    unsafe fn uniform_tile<const NT: usize, const CH: usize>(
        idx: &[__m512i; 8],
        tab: __m512,
        xo: *const f32,
        acc: &mut [[__m512; CH]; NT],
    ) {
        for (i, &ix) in idx.iter().enumerate() {
            let w = _mm512_permutexvar_ps(ix, tab);
            for (t, a) in acc.iter_mut().enumerate() {
                a[i % CH] = _mm512_fmadd_ps(w, _mm512_load_ps(xo.add((i * NT + t) * 16)), a[i % CH]);
            }
        }
    }

    /// A tile across blocks: `sv` holds the scale of each lane.
    #[inline(always)]
    unsafe fn cross_tile<const NT: usize, const CH: usize>(
        idx: &[__m512i; 8],
        tbl: __m512,
        sv: __m512,
        xo: *const f32,
        acc: &mut [[__m512; CH]; NT],
    ) {
        if NT < 8 {
            // Sum the tile unscaled, then scale once per token (two chains
            // per token at most: the tiles' sums are independent).
            let mut ta = [[_mm512_setzero_ps(); 2]; NT];
            for (i, &ix) in idx.iter().enumerate() {
                let w = _mm512_permutexvar_ps(ix, tbl);
                for (t, a) in ta.iter_mut().enumerate() {
                    let ch = i % CH.min(2);
                    a[ch] = _mm512_fmadd_ps(w, _mm512_load_ps(xo.add((i * NT + t) * 16)), a[ch]);
                }
            }
            for (a, s) in acc.iter_mut().zip(&ta) {
                let s = if CH > 1 { _mm512_add_ps(s[0], s[1]) } else { s[0] };
                a[0] = _mm512_fmadd_ps(s, sv, a[0]);
            }
        } else {
            // Many tokens: scale the 128 weights once.
            for (i, &ix) in idx.iter().enumerate() {
                let w = _mm512_mul_ps(_mm512_permutexvar_ps(ix, tbl), sv);
                for (t, a) in acc.iter_mut().enumerate() {
                    a[i % CH] = _mm512_fmadd_ps(w, _mm512_load_ps(xo.add((i * NT + t) * 16)), a[i % CH]);
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::*;

    #[target_feature(enable = "neon")]
    pub(super) unsafe fn generic_neon<const NT: usize>(p: &Part, x: &[f32], res: &mut [f32]) {
        generic::<NT>(p, x, res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockwise8::{double_quantize, mean, Code8};
    use crate::dynamic_map::dynamic_signed;
    use crate::elem::{Bf16, F16};
    use crate::nf4::tests::data;
    use crate::nf4::{quantize_4bit, BLOCK_SIZES};

    /// A quantized matrix with plain scales and the same one with nested scales.
    struct Mat {
        packed: Vec<u8>,
        absmax: Vec<f32>,
        qabsmax: Vec<u8>,
        absmax2: Vec<f32>,
        code: [f32; 256],
        offset: f32,
        qt: QuantType,
        bs: usize,
        n: usize,
        k: usize,
    }

    impl Mat {
        fn new(n: usize, k: usize, qt: QuantType, bs: usize, seed: u64) -> Mat {
            let w = data(n * k, seed, 0.5);
            let mut packed = vec![0u8; packed_len(n * k)];
            let mut absmax = vec![0f32; (n * k).div_ceil(bs)];
            quantize_4bit(&w, qt, bs, &mut packed, &mut absmax, 1).unwrap();
            let code = Code8::new(dynamic_signed()).unwrap();
            let offset = mean(&absmax);
            let mut qabsmax = vec![0u8; absmax.len()];
            let mut absmax2 = vec![0f32; absmax.len().div_ceil(256)];
            double_quantize(&absmax, offset, &code, &mut qabsmax, &mut absmax2, 1).unwrap();
            Mat { packed, absmax, qabsmax, absmax2, code: code.values, offset, qt, bs, n, k }
        }

        fn weight(&self, nested: bool) -> Weight4<'_> {
            let scales = if nested {
                Scales::Nested(Nested {
                    qabsmax: &self.qabsmax,
                    absmax2: &self.absmax2,
                    code: &self.code,
                    offset: self.offset,
                    blocksize2: 256,
                })
            } else {
                Scales::Plain(&self.absmax)
            };
            Weight4 { packed: &self.packed, scales, quant_type: self.qt, blocksize: self.bs, n: self.n, k: self.k }
        }
    }

    /// Naive float64 reference: (y, sum |x * w|) per output.
    fn reference(w: &Weight4, x: &[f32], tokens: usize) -> (Vec<f64>, Vec<f64>) {
        reference_with(w, x, tokens, false)
    }

    /// Whether a bfloat16 call on `isa` takes the AVX512-BF16 kernel.
    fn bf16_dot_applies(isa: Isa, w: &Weight4) -> bool {
        x_layout(cpu::usable(isa), w.k, w.blocksize, cpu::has_bf16_dot()) == XLayout::Bf16Pairs
    }

    /// [`reference`] with every weight first rounded to bfloat16 if `bf16_weights`.
    fn reference_with(w: &Weight4, x: &[f32], tokens: usize, bf16_weights: bool) -> (Vec<f64>, Vec<f64>) {
        let (n, k) = (w.n, w.k);
        let table = w.quant_type.table();
        let mut y = vec![0f64; tokens * n];
        let mut mag = vec![0f64; tokens * n];
        for r in 0..n {
            for c in 0..k {
                let e = r * k + c;
                let byte = w.packed[e / 2];
                let code = if e % 2 == 0 { byte >> 4 } else { byte & 15 };
                let wv = table[code as usize] * w.scales.get(e / w.blocksize);
                let wv = if bf16_weights { Bf16::from_f32(wv).to_f32() } else { wv } as f64;
                for t in 0..tokens {
                    let p = x[t * k + c] as f64 * wv;
                    y[t * n + r] += p;
                    mag[t * n + r] += p.abs();
                }
            }
        }
        (y, mag)
    }

    fn run<E: Elem>(isa: Isa, w: &Weight4, x: &[f32], tokens: usize, threads: usize) -> Vec<f32> {
        let xe: Vec<E> = x.iter().map(|&v| E::from_f32(v)).collect();
        let mut y = vec![E::from_f32(f32::NAN); tokens * w.n];
        gemv_4bit_isa(isa, w, &xe, tokens, &mut y, threads).unwrap();
        y.iter().map(|v| v.to_f32()).collect()
    }

    /// |got - want| <= rel_out * |want| + 1e-5 * sum |x w| (+ a hair for f16 subnormals).
    fn assert_close(got: &[f32], want: &[f64], mag: &[f64], rel_out: f64, what: &str) {
        for (i, ((&g, &r), &m)) in got.iter().zip(want).zip(mag).enumerate() {
            let tol = rel_out * r.abs() + 1e-5 * m + 1e-7;
            assert!(((g as f64) - r).abs() <= tol, "{what}: output {i}: got {g}, want {r} (tol {tol})");
        }
    }

    fn check_all_paths(m: &Mat, nested: bool, tokens: usize, threads: &[usize]) {
        let w = m.weight(nested);
        let seed = (m.n * 31 + m.k * 7 + tokens) as u64;
        // Inputs that are exact in bfloat16 and float16, so every dtype has the same reference.
        let x: Vec<f32> = data(tokens * m.k, seed, 2.0).iter().map(|&v| Bf16::from_f32(v).to_f32()).collect();
        let (want, mag) = reference(&w, &x, tokens);
        let what = |isa: Isa, dt: &str, th: usize| {
            format!("{isa:?} {dt} {:?} bs={} nested={nested} n={} k={} tokens={tokens} threads={th}", m.qt, m.bs, m.n, m.k)
        };
        for isa in cpu::available() {
            for &th in threads {
                assert_close(&run::<f32>(isa, &w, &x, tokens, th), &want, &mag, 0.0, &what(isa, "f32", th));
                let (want16, mag16) = if bf16_dot_applies(isa, &w) {
                    reference_with(&w, &x, tokens, true)
                } else {
                    (want.clone(), mag.clone())
                };
                assert_close(&run::<Bf16>(isa, &w, &x, tokens, th), &want16, &mag16, 1.0 / 256.0, &what(isa, "bf16", th));
                assert_close(&run::<F16>(isa, &w, &x, tokens, th), &want, &mag, 1.0 / 1024.0, &what(isa, "f16", th));
            }
        }
    }

    /// The AVX512-BF16 kernel against the reference with bfloat16-rounded
    /// weights: block sizes from 64 up, rows starting inside a block (K = 192,
    /// 640), x past one L1 chunk (accumulators parked between chunks), several
    /// passes of 16 tokens, 1 and 2 threads. A NaN scale gives NaN in its row
    /// only.
    #[test]
    fn bf16_dot_kernel_matches_the_rounded_reference() {
        if !cpu::has_bf16_dot() {
            return;
        }
        for (n, k, bs) in [(3, 192, 128), (5, 1024, 64), (2, 4096, 4096), (7, 2048, 256), (4, 640, 128)] {
            let m = Mat::new(n, k, QuantType::Nf4, bs, 11);
            for nested in [false, true] {
                let w = m.weight(nested);
                assert!(bf16_dot_applies(Isa::Avx512, &w));
                for tokens in [1, 2, 3, 5, 8, 16, 17, 33] {
                    let x: Vec<f32> =
                        data(tokens * k, (n + k + tokens) as u64, 2.0).iter().map(|&v| Bf16::from_f32(v).to_f32()).collect();
                    let (want, mag) = reference_with(&w, &x, tokens, true);
                    for th in [1, 2] {
                        let what = format!("n={n} k={k} bs={bs} nested={nested} tokens={tokens} threads={th}");
                        assert_close(&run::<Bf16>(Isa::Avx512, &w, &x, tokens, th), &want, &mag, 1.0 / 256.0, &what);
                    }
                }
            }
        }
        let mut m = Mat::new(4, 256, QuantType::Nf4, 64, 3);
        m.absmax[5] = f32::NAN; // a block of row 1 (4 blocks per row)
        let w = m.weight(false);
        let x: Vec<f32> = data(2 * 256, 4, 1.0).iter().map(|&v| Bf16::from_f32(v).to_f32()).collect();
        let y = run::<Bf16>(Isa::Avx512, &w, &x, 2, 1);
        for t in 0..2 {
            for r in 0..4 {
                assert_eq!(y[t * 4 + r].is_nan(), r == 1, "token {t} row {r}: {}", y[t * 4 + r]);
            }
        }
    }

    #[test]
    fn nested_scales_past_the_largest_float_are_clamped() {
        // code * absmax2 + offset rounding past f32::MAX (a block holding the
        // largest float among zero blocks) must not turn into inf and NaN.
        // K = 130 takes the row walk; K = 512 the whole-block kernels, whose
        // AVX2 one decodes a row's scales 8 at a time.
        for k in [130, 512] {
            let mut m = Mat::new(3, k, QuantType::Nf4, 64, 5);
            let top = m.code.iter().position(|&c| c == 1.0).unwrap() as u8;
            m.qabsmax.iter_mut().for_each(|q| *q = top);
            m.absmax2[0] = f32::MAX;
            m.offset = f32::MAX / 4.0;
            let w = m.weight(true);
            assert_eq!(w.scales.get(0), f32::MAX);
            let x: Vec<f32> = data(2 * m.k, 9, 2e-36).iter().map(|&v| Bf16::from_f32(v).to_f32()).collect();
            let (want, mag) = reference(&w, &x, 2);
            assert!(want.iter().all(|v| v.is_finite() && *v != 0.0));
            for isa in cpu::available() {
                for th in [1, 2] {
                    assert_close(&run::<f32>(isa, &w, &x, 2, th), &want, &mag, 0.0, &format!("{isa:?} k={k} threads={th}"));
                }
                let Scales::Nested(s) = w.scales else { unreachable!() };
                let mut got = vec![0f32; m.qabsmax.len()];
                decode_nested(isa, &s, 0, &mut got);
                assert!(got.iter().all(|&v| v == f32::MAX), "{isa:?} k={k}: {got:?}");
            }
        }
    }

    /// The paired layout changes which lanes hold which products, not the
    /// sums: the whole-block AVX2 kernel gives bit for bit what the row walk
    /// on the natural layout gives (the order of additions decides bf16
    /// outputs, and with them greedy continuations).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn paired_layout_adds_in_the_natural_order() {
        if !cpu::available().contains(&Isa::Avx2) {
            return;
        }
        for (i, &(n, k, bs)) in [(5, 256, 64), (3, 4096, 64), (4, 96, 32), (2, 512, 256), (3, 128, 128)].iter().enumerate() {
            let m = Mat::new(n, k, QuantType::Nf4, bs, 40 + i as u64);
            for nested in [false, true] {
                let w = m.weight(nested);
                for tokens in [1, 3, 16] {
                    let x = data(tokens * k, 7 + i as u64, 2.0);
                    let paired = run::<f32>(Isa::Avx2, &w, &x, tokens, 1);
                    assert_eq!(x_layout(Isa::Avx2, k, bs, false), XLayout::Paired);
                    let xs = XBuf::new(&x, tokens, k, XLayout::Natural);
                    let table = w.quant_type.table();
                    let pairs = pair_table(table);
                    let ctx = Ctx { w: &w, isa: Isa::Avx2, layout: XLayout::Natural, x: &xs, tokens, table, pairs: &pairs };
                    let mut natural = vec![f32::NAN; tokens * n];
                    let mut outs: Vec<&mut [f32]> = natural.chunks_exact_mut(n).collect();
                    ctx.task(0, &mut outs);
                    for (j, (a, b)) in paired.iter().zip(&natural).enumerate() {
                        // The row walk adds a 0.0 for its (absent) single elements.
                        assert_eq!(a.to_bits(), (b + 0.0).to_bits(), "n={n} k={k} bs={bs} nested={nested} tokens={tokens} output {j}");
                    }
                }
            }
        }
    }

    /// The AVX2 row decoder of double-quantized scales gives what
    /// `Scales::get` gives, bit for bit: group boundaries anywhere in the
    /// range, ranges shorter and longer than 8, the clamp at the largest
    /// float, and NaN (a corrupt state) kept.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_row_scales_decode_like_scales_get() {
        if !cpu::available().contains(&Isa::Avx2) {
            return;
        }
        let m = Mat::new(40, 999, QuantType::Nf4, 32, 3);
        let top = m.code.iter().position(|&c| c == 1.0).unwrap() as u8;
        let mut qabsmax = m.qabsmax.clone();
        qabsmax[..40].iter_mut().for_each(|q| *q = top);
        let mut absmax2: Vec<f32> = (0..qabsmax.len()).map(|g| 0.01 + g as f32 * 1e-3).collect();
        absmax2[0] = f32::MAX;
        absmax2[2] = f32::NAN;
        for (bs2, offset) in [(256, m.offset), (3, f32::MAX / 4.0), (17, -0.5), (1, m.offset)] {
            let s = Nested { qabsmax: &qabsmax, absmax2: &absmax2[..qabsmax.len().div_ceil(bs2)], code: &m.code, offset, blocksize2: bs2 };
            for (lo, hi) in [(0, 1249), (0, 7), (7, 300), (30, 64), (255, 257), (1000, 1249)] {
                let mut got = vec![0f32; hi - lo];
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                unsafe { x86::decode_nested_avx2(&s, lo, &mut got) };
                for (b, g) in (lo..hi).zip(&got) {
                    let want = Scales::Nested(s).get(b);
                    assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "blocksize2={bs2} block {b}: {g} != {want}");
                }
            }
        }
    }

    #[test]
    fn every_path_matches_the_reference() {
        // K % 128 == 0, K % 32 == 0 with a 32-element tail, K % 32 != 0 (odd too).
        let shapes = [(3, 128), (5, 32), (4, 96), (3, 160), (2, 416), (5, 33), (4, 1), (3, 7), (3, 100), (2, 130)];
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            for &bs in &BLOCK_SIZES {
                for (i, &(n, k)) in shapes.iter().enumerate() {
                    let m = Mat::new(n, k, qt, bs, (bs + i) as u64);
                    for tokens in [1, 2, 3, 5, 8] {
                        check_all_paths(&m, i % 2 == 0, tokens, &[1]);
                    }
                }
            }
        }
    }

    #[test]
    fn every_token_count_and_thread_count() {
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            for (n, k, bs) in [(37, 256, 64), (19, 160, 32), (23, 1056, 4096), (17, 99, 128)] {
                let m = Mat::new(n, k, qt, bs, n as u64);
                for tokens in (1..=17).chain([31, 33]) {
                    check_all_paths(&m, tokens % 2 == 0, tokens, &[1, 3]);
                }
            }
        }
    }

    #[test]
    fn many_rows_split_among_tasks() {
        // Several tasks per thread, blocks that span rows (K=32, bs=4096) and
        // rows that start mid-block (K=2080, bs=256), the last tile of the matrix.
        for (n, k, bs) in [(700, 2048, 64), (3000, 32, 4096), (130, 2080, 256), (301, 1025, 32)] {
            let m = Mat::new(n, k, QuantType::Nf4, bs, k as u64);
            for tokens in [1, 4, 16] {
                check_all_paths(&m, tokens != 4, tokens, &[2, 3]);
            }
        }
    }

    #[test]
    fn nested_scales_decode_like_scales_get() {
        let mut m = Mat::new(40, 999, QuantType::Nf4, 32, 3);
        for every_code in [false, true] {
            if every_code {
                // Every byte value, in an order that mixes the top bits the
                // AVX-512 lookup blends by.
                m.qabsmax.iter_mut().enumerate().for_each(|(b, q)| *q = (b * 167 % 256) as u8);
            }
            let Scales::Nested(s) = m.weight(true).scales else { unreachable!() };
            for isa in cpu::available() {
                for (lo, hi) in [(0, 1249), (7, 300), (255, 257), (1000, 1249)] {
                    let mut got = vec![f32::NAN; hi - lo];
                    decode_nested(isa, &s, lo, &mut got);
                    let want: Vec<f32> = (lo..hi).map(|b| Scales::Nested(s).get(b)).collect();
                    assert_eq!(got, want, "{isa:?} {lo}..{hi} every_code={every_code}");
                }
            }
        }
    }

    #[test]
    fn nested_groups_of_any_size_cross_rows_and_tasks() {
        // 200 or 256 weights per row (the row walk, whole blocks) in blocks
        // of 32: groups of 1, 3 or 5 blocks start and end inside rows, and
        // tasks start inside groups.
        for m in [Mat::new(701, 200, QuantType::Nf4, 32, 5), Mat::new(701, 256, QuantType::Nf4, 32, 6)] {
            let x: Vec<f32> = data(3 * m.k, 11, 2.0);
            for bs2 in [1, 3, 5, 256] {
                let absmax2: Vec<f32> = (0..m.qabsmax.len().div_ceil(bs2)).map(|g| 0.01 + g as f32 * 1e-3).collect();
                let nested = Nested { qabsmax: &m.qabsmax, absmax2: &absmax2, code: &m.code, offset: m.offset, blocksize2: bs2 };
                let w = Weight4 { scales: Scales::Nested(nested), ..m.weight(false) };
                for tokens in [1, 3] {
                    let (want, mag) = reference(&w, &x[..tokens * m.k], tokens);
                    for isa in cpu::available() {
                        for th in [1, 2, 3] {
                            let got = run::<f32>(isa, &w, &x[..tokens * m.k], tokens, th);
                            let what = format!("{isa:?} k={} blocksize2={bs2} tokens={tokens} threads={th}", m.k);
                            assert_close(&got, &want, &mag, 0.0, &what);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn empty_shapes() {
        let m = Mat::new(4, 64, QuantType::Nf4, 64, 1);
        let w = m.weight(false);
        let mut y: Vec<f32> = vec![];
        gemv_4bit(&w, &[], 0, &mut y, 2).unwrap();
        let w0 = Weight4 { packed: &[], scales: Scales::Plain(&[]), quant_type: QuantType::Nf4, blocksize: 64, n: 3, k: 0 };
        let mut y = vec![1f32; 6];
        gemv_4bit(&w0, &[], 2, &mut y, 2).unwrap();
        assert_eq!(y, vec![0.0; 6]);
        let wn = Weight4 { n: 0, k: 5, ..w0 };
        gemv_4bit(&wn, &[0.0f32; 10], 2, &mut [], 2).unwrap();
    }

    #[test]
    fn bad_lengths_are_errors() {
        let m = Mat::new(4, 64, QuantType::Nf4, 64, 1);
        let w = m.weight(false);
        let x = vec![0.5f32; 128];
        let mut y = vec![0f32; 8];
        assert!(gemv_4bit(&w, &x, 2, &mut y, 1).is_ok());
        assert!(gemv_4bit(&w, &x[..127], 2, &mut y, 1).is_err());
        assert!(gemv_4bit(&w, &x, 3, &mut y, 1).is_err());
        assert!(gemv_4bit(&w, &x, 2, &mut y[..7], 1).is_err());
        let bad = |w2: Weight4| gemv_4bit(&w2, &x, 2, &mut y.clone(), 2).is_err();
        assert!(bad(Weight4 { packed: &m.packed[..100], ..w }));
        assert!(bad(Weight4 { scales: Scales::Plain(&m.absmax[..3]), ..w }));
        assert!(bad(Weight4 { blocksize: 48, ..w }));
        assert!(bad(Weight4 { n: 5, ..w }));
        assert!(bad(Weight4 { n: usize::MAX, k: 3, ..w }));
        let nested = m.weight(true);
        let Scales::Nested(s) = nested.scales else { unreachable!() };
        let mut w3 = nested;
        w3.scales = Scales::Nested(Nested { absmax2: &[], ..s });
        assert!(gemv_4bit(&w3, &x, 2, &mut y, 1).is_err());
        // tokens * K overflowing is an error, not a panic.
        assert!(gemv_4bit(&w, &x, usize::MAX / 2, &mut y, 1).is_err());
    }

    proptest::proptest! {
        /// Any small shape: every path agrees with the reference.
        #[test]
        fn random_shapes(n in 1usize..40, k in 1usize..300, tokens in 1usize..20, bs_i in 0usize..8,
                         fp4 in proptest::bool::ANY, nested in proptest::bool::ANY) {
            let qt = if fp4 { QuantType::Fp4 } else { QuantType::Nf4 };
            let m = Mat::new(n, k, qt, BLOCK_SIZES[bs_i], (n * k) as u64);
            check_all_paths(&m, nested, tokens, &[2]);
        }
    }
}
