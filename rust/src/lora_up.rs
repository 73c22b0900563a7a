//! The rank-r half of a LoRA layer added into an output in place:
//! `y = round(y + (h B^T) * s)` for `y [tokens, n]` (float32, bfloat16 or
//! float16), `h [tokens, r]` and `B^T [r, n]` in float32.
//!
//! In torch this is a float32 matmul with an inner dimension of r (16 or so),
//! a scale, a widening copy of `y`, a sum and a narrowing copy: five passes
//! over `[tokens, n]`, and the matmul runs at a few percent of the BLAS's
//! speed because its inner dimension is tiny (2.3 ms for 512 x 4096 x 16 on
//! two Zen 4 cores, about what the 4096 x 4096 dequantization costs). Here
//! each output element is read and written once.
//!
//! The arithmetic is torch's, operation by operation: each dot product is a
//! chain of fused multiply-adds over k = 0..r starting from zero (what MKL
//! and oneDNN compute for so short an inner dimension: bit for bit, checked
//! by the Python tests against `h @ B.t()`), then rounded products and sums:
//!
//! ```text
//! d = fma(h[r-1], B[n, r-1], ... fma(h[0], B[n, 0], 0))
//! y = round(float32(y) + d * s)
//! ```

use std::sync::Mutex;

use crate::cpu::{self, Isa};
use crate::elem::Elem;
use crate::error::{invalid, Result};
use crate::parallel;

/// Output columns per register tile (four AVX-512 or eight AVX2 registers).
const TILE: usize = 64;
/// Rows of `h` up to which [`rows_of_b`] forms each dot product from B's row directly.
const FEW_TOKENS: usize = 4;
/// Output elements per task: enough that scheduling costs nothing.
const TASK_ELEMS: usize = 64 * 1024;

/// One tile of `width` columns starting at `j` (`width <= TILE`).
#[inline(always)]
fn tile<E: Elem, const FULL: bool>(y: &mut [E], h: &[f32], bt: &[f32], n: usize, j: usize, width: usize, scale: f32) {
    let width = if FULL { TILE } else { width };
    let mut acc = [0f32; TILE];
    for (k, &hk) in h.iter().enumerate() {
        let b = &bt[k * n + j..k * n + j + width];
        for (a, &bv) in acc[..width].iter_mut().zip(b) {
            *a = hk.mul_add(bv, *a);
        }
    }
    for (yv, &d) in y[j..j + width].iter_mut().zip(&acc[..width]) {
        *yv = E::from_f32(yv.to_f32() + d * scale);
    }
}

/// The rows of `y` (each `n` long) with their rows of `h` (each `r` long).
#[inline(always)]
fn rows<E: Elem>(y: &mut [E], h: &[f32], bt: &[f32], n: usize, r: usize, scale: f32) {
    for (yr, hr) in y.chunks_exact_mut(n).zip(h.chunks_exact(r)) {
        let full = n / TILE * TILE;
        for j in (0..full).step_by(TILE) {
            tile::<E, true>(yr, hr, bt, n, j, TILE, scale);
        }
        if full < n {
            tile::<E, false>(yr, hr, bt, n, full, n - full, scale);
        }
    }
}

/// [`rows`] for `B` itself (`[n, r]`, row-major) instead of `B^T`: each tile's
/// columns of `B^T` are gathered into a buffer once and serve every row.
#[inline(always)]
fn rows_of_b<E: Elem>(y: &mut [E], h: &[f32], b: &[f32], n: usize, r: usize, scale: f32) {
    let tokens = h.len() / r;
    if tokens <= FEW_TOKENS {
        // Few tokens: each output's dot product straight from B's row (the
        // gather into tiles would cost more than the products).
        for (yr, hr) in y.chunks_exact_mut(n).zip(h.chunks_exact(r)) {
            for (yv, br) in yr.iter_mut().zip(b.chunks_exact(r)) {
                let mut d = 0f32;
                for (&hk, &bk) in hr.iter().zip(br) {
                    d = hk.mul_add(bk, d);
                }
                *yv = E::from_f32(yv.to_f32() + d * scale);
            }
        }
        return;
    }
    let mut bt_tile = vec![0f32; r * TILE];
    for j in (0..n).step_by(TILE) {
        let width = TILE.min(n - j);
        for i in 0..width {
            for (k, &v) in b[(j + i) * r..(j + i + 1) * r].iter().enumerate() {
                bt_tile[k * width + i] = v;
            }
        }
        for t in 0..tokens {
            let (yr, hr) = (&mut y[t * n + j..t * n + j + width], &h[t * r..(t + 1) * r]);
            if width == TILE {
                tile::<E, true>(yr, hr, &bt_tile, TILE, 0, TILE, scale);
            } else {
                tile::<E, false>(yr, hr, &bt_tile, width, 0, width, scale);
            }
        }
    }
}

/// The weight operand: `B^T` (`[r, n]`) or `B` (`[n, r]`), row-major.
#[derive(Clone, Copy)]
enum Up<'a> {
    Transposed(&'a [f32]),
    Rows(&'a [f32]),
}

#[inline(always)]
fn rows_any<E: Elem>(y: &mut [E], h: &[f32], w: Up, n: usize, r: usize, scale: f32) {
    match w {
        Up::Transposed(bt) => rows(y, h, bt, n, r, scale),
        Up::Rows(b) => rows_of_b(y, h, b, n, r, scale),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx512<E: Elem>(y: &mut [E], h: &[f32], w: Up, n: usize, r: usize, scale: f32) {
        rows_any(y, h, w, n, r, scale)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx2<E: Elem>(y: &mut [E], h: &[f32], w: Up, n: usize, r: usize, scale: f32) {
        rows_any(y, h, w, n, r, scale)
    }
}

fn rows_isa<E: Elem>(isa: Isa, y: &mut [E], h: &[f32], w: Up, n: usize, r: usize, scale: f32) {
    match isa {
        // SAFETY: cpu::usable() only passes instruction sets this CPU has.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::rows_avx512(y, h, w, n, r, scale) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::rows_avx2(y, h, w, n, r, scale) },
        _ => rows_any(y, h, w, n, r, scale),
    }
}

/// `y = round(y + (h B^T) * scale)` in place, where `h` is `[tokens, rank]`,
/// `bt` is `B^T`, `[rank, n]` (or, with `b_rows`, `B` itself, `[n, rank]`:
/// what a LoRA layer stores, so that a caller with few tokens need not
/// transpose it first), and `y` is `[tokens, n]`, all row-major (see the
/// module docs for the rounding; both layouts give the same bits).
#[allow(clippy::too_many_arguments)]
pub fn lora_up_add<E: Elem>(
    isa: Isa,
    y: &mut [E],
    h: &[f32],
    bt: &[f32],
    rank: usize,
    scale: f32,
    threads: usize,
    b_rows: bool,
) -> Result<()> {
    if rank == 0 {
        return Err(invalid("the LoRA rank must be at least 1"));
    }
    if !h.len().is_multiple_of(rank) || !bt.len().is_multiple_of(rank) {
        return Err(invalid(format!(
            "h has {} and B^T {} elements, not multiples of the rank {rank}",
            h.len(),
            bt.len()
        )));
    }
    let (tokens, n) = (h.len() / rank, bt.len() / rank);
    if tokens.checked_mul(n) != Some(y.len()) {
        return Err(invalid(format!(
            "the output has {} elements, h [{tokens}, {rank}] and B^T [{rank}, {n}] make {tokens} x {n}",
            y.len()
        )));
    }
    if y.is_empty() {
        return Ok(());
    }
    let isa = cpu::usable(isa);
    let rows_per_task = (TASK_ELEMS / n).max(1);
    let tasks: Vec<Mutex<&mut [E]>> = y.chunks_mut(rows_per_task * n).map(Mutex::new).collect();
    parallel::run_tasks(threads, tasks.len(), &|i| {
        let mut y = tasks[i].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let t0 = i * rows_per_task;
        let hr = &h[t0 * rank..(t0 + y.len() / n) * rank];
        let w = if b_rows { Up::Rows(bt) } else { Up::Transposed(bt) };
        rows_isa(isa, &mut y, hr, w, n, rank, scale);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elem::{Bf16, F16};
    use crate::nf4::tests::data;

    /// The module docs' arithmetic, one element at a time.
    fn reference<E: Elem>(y: &[E], h: &[f32], bt: &[f32], n: usize, r: usize, scale: f32) -> Vec<E> {
        let mut out = y.to_vec();
        for (t, row) in out.chunks_exact_mut(n).enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                let mut d = 0f32;
                for k in 0..r {
                    d = h[t * r + k].mul_add(bt[k * n + j], d);
                }
                *v = E::from_f32(v.to_f32() + d * scale);
            }
        }
        out
    }

    fn check<E: Elem + PartialEq + std::fmt::Debug>(tokens: usize, n: usize, r: usize, scale: f32) {
        let y: Vec<E> = data(tokens * n, 1, 3.0).into_iter().map(E::from_f32).collect();
        let (h, bt) = (data(tokens * r, 2, 1.0), data(r * n, 3, 0.05));
        let want = reference(&y, &h, &bt, n, r, scale);
        // B itself, [n, r]: the b_rows layout.
        let b: Vec<f32> = (0..n * r).map(|e| bt[(e % r) * n + e / r]).collect();
        for isa in cpu::available() {
            for threads in [1, 3] {
                for b_rows in [false, true] {
                    let mut got = y.clone();
                    lora_up_add(isa, &mut got, &h, if b_rows { &b } else { &bt }, r, scale, threads, b_rows).unwrap();
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            g.to_f32().to_bits() == w.to_f32().to_bits(),
                            "{isa:?} {threads} threads, b_rows {b_rows}, element {i}: {g:?} vs {w:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_isa_matches_the_reference_bit_for_bit() {
        for (tokens, n, r) in [(1, 1, 1), (3, 64, 16), (5, 130, 8), (70, 1000, 3), (2, 4096, 64), (1, 1536, 16), (4, 100, 5)] {
            check::<f32>(tokens, n, r, 2.0);
            check::<Bf16>(tokens, n, r, 0.5);
            check::<F16>(tokens, n, r, 1.0);
        }
    }

    #[test]
    fn non_finite_values_propagate() {
        let mut y = [f32::NAN, 1.0, 1.0, 0.0];
        let h = [1.0f32, f32::INFINITY];
        let bt = [1.0f32, 0.0];
        lora_up_add(cpu::best(), &mut y, &h, &bt, 1, 1.0, 1, false).unwrap();
        assert!(y[0].is_nan());
        assert_eq!(y[1], 1.0);
        assert_eq!(y[2], f32::INFINITY);
        assert!(y[3].is_nan()); // inf * 0, as torch's matmul gives
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let mut y = [0f32; 6];
        for b_rows in [false, true] {
            let up = |y: &mut [f32], h: &[f32], bt: &[f32], r| lora_up_add(cpu::best(), y, h, bt, r, 1.0, 1, b_rows);
            assert!(up(&mut y, &[1.0; 4], &[1.0; 6], 0).unwrap_err().to_string().contains("rank"));
            assert!(up(&mut y, &[1.0; 3], &[1.0; 6], 2).is_err());
            let err = up(&mut y, &[1.0; 4], &[1.0; 8], 2).unwrap_err();
            assert!(err.to_string().contains("the output has 6 elements"), "{err}");
            up(&mut [] as &mut [f32], &[], &[1.0; 8], 2).unwrap();
        }
    }
}
