//! The softmax half of causal attention's backward, one pass per query row.
//!
//! Given the recomputed scores `s = q k^T` and `dp = dO v^T` of one query row
//! (`keys` values each), the row's log-sum-exp from the forward and the rows
//! of the output `O` and its gradient `dO`:
//!
//! ```text
//! delta = sum(dO * O)
//! p[j]  = exp(s[j] * scale - lse)            (j <= i; 0 above the diagonal)
//! ds[j] = p[j] * (dp[j] - delta) * scale     (j <= i; 0 above the diagonal)
//! ```
//!
//! in float32, each output rounded once to the inputs' dtype and written over
//! the input it came from (s becomes p, dp becomes ds). `p` feeds
//! `dV = P^T dO` and `ds` feeds `dQ = dS K` and `dK = dS^T Q`. In torch this
//! is a dozen passes over the `[rows, keys]` matrices (dtype conversions,
//! subtraction, exponential, mask, products), which on a small CPU cost more
//! than the four matmuls around them; here each row stays in cache and the
//! masked half is only written.

use std::sync::Mutex;

use crate::attn_softmax::check_blocks;
use crate::cpu::{self, Isa};
use crate::elem::Elem;
use crate::error::{invalid, Result};
use crate::parallel;
use crate::swiglu::exp_f32;

/// Rows per task: enough work per task to amortize the hand-off.
const ROWS_PER_TASK: usize = 64;

/// Everything a row needs besides its own slices.
#[derive(Clone, Copy)]
struct Shape {
    keys: usize,
    head_dim: usize,
    scale: f32,
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_run<E: Elem>(first_row: usize, sh: Shape, s: &mut [E], dp: &mut [E], lse: &[f32], out: &[E], d_out: &[E]) {
    let zero = E::from_f32(0.0);
    let (k, d) = (sh.keys, sh.head_dim);
    for (r, &l) in lse.iter().enumerate() {
        let delta: f32 = out[r * d..(r + 1) * d]
            .iter()
            .zip(&d_out[r * d..(r + 1) * d])
            .map(|(o, g)| o.to_f32() * g.to_f32())
            .sum();
        // Query position within its [keys x keys] block: keys 0..=i are visible.
        let visible = (first_row + r) % k + 1;
        let (sv, sm) = s[r * k..(r + 1) * k].split_at_mut(visible);
        let (dv, dm) = dp[r * k..(r + 1) * k].split_at_mut(visible);
        for (sj, dj) in sv.iter_mut().zip(dv.iter_mut()) {
            let e = exp_f32(sj.to_f32() * sh.scale - l);
            *dj = E::from_f32(e * (dj.to_f32() - delta) * sh.scale);
            *sj = E::from_f32(e);
        }
        sm.iter_mut().for_each(|v| *v = zero);
        dm.iter_mut().for_each(|v| *v = zero);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx512<E: Elem>(
        first_row: usize, sh: Shape, s: &mut [E], dp: &mut [E], lse: &[f32], out: &[E], d_out: &[E],
    ) {
        rows_run(first_row, sh, s, dp, lse, out, d_out)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx2<E: Elem>(
        first_row: usize, sh: Shape, s: &mut [E], dp: &mut [E], lse: &[f32], out: &[E], d_out: &[E],
    ) {
        rows_run(first_row, sh, s, dp, lse, out, d_out)
    }
}

#[allow(clippy::too_many_arguments)]
fn rows_isa<E: Elem>(
    isa: Isa, first_row: usize, sh: Shape, s: &mut [E], dp: &mut [E], lse: &[f32], out: &[E], d_out: &[E],
) {
    match isa {
        // SAFETY: cpu::usable() only passes instruction sets this CPU has.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::rows_avx512(first_row, sh, s, dp, lse, out, d_out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::rows_avx2(first_row, sh, s, dp, lse, out, d_out) },
        _ => rows_run(first_row, sh, s, dp, lse, out, d_out),
    }
}

/// The softmax backward of causal self-attention for `lse.len()` query rows,
/// in place: `scores` becomes the attention probabilities `p` and `dp` the
/// gradient of the unscaled scores `ds`, both zero above the diagonal.
///
/// `scores` and `dp` hold `keys` values per row, the rows of square
/// `[keys, keys]` blocks one after another (row `r` is query position
/// `r % keys`, which sees keys `0..=r % keys`); `out` and `d_out` hold
/// `head_dim` values per row in the same order.
#[allow(clippy::too_many_arguments)]
pub fn causal_softmax_grad<E: Elem>(
    isa: Isa,
    scores: &mut [E],
    dp: &mut [E],
    lse: &[f32],
    out: &[E],
    d_out: &[E],
    keys: usize,
    head_dim: usize,
    scale: f32,
    threads: usize,
) -> Result<()> {
    let rows = lse.len();
    if head_dim == 0 {
        return Err(invalid("head_dim must be positive"));
    }
    check_blocks(rows, keys, &[(scores.len(), "scores"), (dp.len(), "dp")])?;
    let nd = rows.checked_mul(head_dim).ok_or_else(|| invalid("rows x head_dim overflows"))?;
    for (len, what) in [(out.len(), "out"), (d_out.len(), "d_out")] {
        if len != nd {
            return Err(invalid(format!("{what} has {len} elements, but {rows} rows of {head_dim} make {nd}")));
        }
    }
    let isa = cpu::usable(isa);
    let sh = Shape { keys, head_dim, scale };
    let chunk = ROWS_PER_TASK * keys;
    let parts: Vec<Mutex<(&mut [E], &mut [E])>> =
        scores.chunks_mut(chunk).zip(dp.chunks_mut(chunk)).map(Mutex::new).collect();
    parallel::run_tasks(threads, parts.len(), &|t| {
        let mut guard = parts[t].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (s, d) = &mut *guard;
        let r0 = t * ROWS_PER_TASK;
        let r1 = (r0 + ROWS_PER_TASK).min(rows);
        rows_isa(isa, r0, sh, s, d, &lse[r0..r1], &out[r0 * head_dim..r1 * head_dim], &d_out[r0 * head_dim..r1 * head_dim]);
    });
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::elem::Bf16;

    /// Deterministic uniform noise in [-amp/2, amp/2) (also attn_softmax's tests).
    pub(crate) fn noise(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * amp
            })
            .collect()
    }

    /// f64 reference; lse computed from the scores themselves.
    fn reference(s: &[f32], dp: &[f32], o: &[f32], g: &[f32], k: usize, d: usize, scale: f64) -> (Vec<f64>, Vec<f64>, Vec<f32>) {
        let rows = s.len() / k;
        let (mut p, mut ds, mut lse) = (vec![0.0; rows * k], vec![0.0; rows * k], vec![0f32; rows]);
        for r in 0..rows {
            let i = r % k;
            let row = &s[r * k..r * k + i + 1];
            let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64 * scale));
            let l = m + row.iter().map(|&v| (v as f64 * scale - m).exp()).sum::<f64>().ln();
            lse[r] = l as f32;
            let delta: f64 = (0..d).map(|c| o[r * d + c] as f64 * g[r * d + c] as f64).sum();
            for j in 0..=i {
                let e = (s[r * k + j] as f64 * scale - lse[r] as f64).exp();
                p[r * k + j] = e;
                ds[r * k + j] = e * (dp[r * k + j] as f64 - delta) * scale;
            }
        }
        (p, ds, lse)
    }

    fn check<E: Elem>(isa: Isa, k: usize, blocks: usize, d: usize, tol: f64) {
        let rows = k * blocks;
        let scale = 1.0 / (d as f32).sqrt();
        let cast = |v: Vec<f32>| -> Vec<E> { v.into_iter().map(E::from_f32).collect() };
        let back = |v: &[E]| -> Vec<f32> { v.iter().map(|x| x.to_f32()).collect() };
        let (mut p, mut ds) = (cast(noise(rows * k, 1, 40.0)), cast(noise(rows * k, 2, 2.0)));
        let (o, g) = (cast(noise(rows * d, 3, 2.0)), cast(noise(rows * d, 4, 2.0)));
        let (pr, dsr, lse) = reference(&back(&p), &back(&ds), &back(&o), &back(&g), k, d, scale as f64);
        causal_softmax_grad(isa, &mut p, &mut ds, &lse, &o, &g, k, d, scale, 2).unwrap();
        for r in 0..rows {
            for j in 0..k {
                let (pv, dv) = (p[r * k + j].to_f32() as f64, ds[r * k + j].to_f32() as f64);
                if j > r % k {
                    assert_eq!((pv, dv), (0.0, 0.0), "row {r} key {j} above the diagonal");
                    continue;
                }
                let (pe, de) = (pr[r * k + j], dsr[r * k + j]);
                assert!((pv - pe).abs() <= tol * (pe.abs() + 1e-3), "p row {r} key {j}: {pv} vs {pe}");
                assert!((dv - de).abs() <= tol * (de.abs() + 1e-2), "ds row {r} key {j}: {dv} vs {de}");
            }
        }
        // Probabilities of a row sum to one.
        for r in 0..rows {
            let sum: f64 = (0..k).map(|j| p[r * k + j].to_f32() as f64).sum();
            assert!((sum - 1.0).abs() < 50.0 * tol, "row {r} sums to {sum}");
        }
    }

    #[test]
    fn matches_the_reference_for_every_isa_and_dtype() {
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
            for (k, blocks, d) in [(1, 3, 1), (7, 2, 5), (64, 3, 16), (130, 1, 64)] {
                check::<f32>(isa, k, blocks, d, 1e-5);
                check::<Bf16>(isa, k, blocks, d, 1e-2);
            }
        }
    }

    #[test]
    fn rejects_shapes_that_do_not_fit() {
        let v = [0f32; 12];
        let (mut a, mut b) = (vec![0f32; 12], vec![0f32; 12]);
        let lse = vec![0f32; 3];
        assert!(causal_softmax_grad(Isa::Scalar, &mut a, &mut b, &lse, &v[..3], &v[..3], 4, 1, 1.0, 1).is_err());
        assert!(causal_softmax_grad(Isa::Scalar, &mut a, &mut b, &lse[..2], &v[..2], &v[..2], 0, 1, 1.0, 1).is_err());
        let lse4 = vec![0f32; 4];
        let mut short = vec![0f32; 15];
        let mut full = vec![0f32; 16];
        assert!(causal_softmax_grad(Isa::Scalar, &mut short, &mut full, &lse4, &v[..4], &v[..4], 4, 1, 1.0, 1).is_err());
        assert!(causal_softmax_grad(Isa::Scalar, &mut full, &mut short, &lse4, &v[..4], &v[..3], 4, 1, 1.0, 1).is_err());
    }
}
