//! The softmax of causal attention's forward, one pass per query row, in place.
//!
//! Given the scores `s = q k^T` of one query row (`keys` values, unscaled):
//!
//! ```text
//! lse  = log(sum(exp(s[j] * scale)))   over the visible keys j <= i
//! p[j] = exp(s[j] * scale - lse)       (j <= i; 0 above the diagonal)
//! ```
//!
//! in float32, `p` rounded once to the scores' dtype and written over them,
//! `lse` kept for backward ([`crate::attn_grad`] recomputes `p` from the same
//! scores and `lse` with the same exponential, so both passes see the same
//! probabilities). PyTorch's CPU flash-attention forward took 5.2 ms for a
//! SmolLM2 layer (4 x 256 tokens, 9 query and 3 key/value heads, bf16); its two
//! batched matmuls alone take 1.6 ms, and in torch the masked softmax between
//! them is half a dozen passes over the score matrix.

use std::sync::Mutex;

use crate::cpu::{self, Isa};
use crate::elem::Elem;
use crate::error::{invalid, Result};
use crate::parallel;
use crate::swiglu::exp_f32;

/// Rows per task: enough work per task to amortize the hand-off.
const ROWS_PER_TASK: usize = 64;

/// Independent partial maxima and sums per row, so that the reductions vectorize.
const LANES: usize = 16;

#[inline(always)]
fn rows_run<E: Elem>(first_row: usize, keys: usize, scale: f32, s: &mut [E], lse: &mut [f32]) {
    let zero = E::from_f32(0.0);
    for (r, l) in lse.iter_mut().enumerate() {
        // Query position within its [keys x keys] block: keys 0..=i are visible.
        let visible = (first_row + r) % keys + 1;
        let (sv, sm) = s[r * keys..(r + 1) * keys].split_at_mut(visible);
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let chunks = sv.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for (m, v) in lanes.iter_mut().zip(c) {
                *m = m.max(v.to_f32() * scale);
            }
        }
        // f32::max skips NaN, so a NaN score shows up below, in the sum.
        let m = tail.iter().fold(lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)), |a, v| a.max(v.to_f32() * scale));
        let mut sums = [0f32; LANES];
        let chunks = sv.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for (a, v) in sums.iter_mut().zip(c) {
                *a += exp_f32(v.to_f32() * scale - m);
            }
        }
        let sum = tail.iter().fold(sums.iter().sum::<f32>(), |a, v| a + exp_f32(v.to_f32() * scale - m));
        let lr = m + sum.ln();
        // The same expression as the backward's (crate::attn_grad), so both see the same p.
        for v in sv.iter_mut() {
            *v = E::from_f32(exp_f32(v.to_f32() * scale - lr));
        }
        sm.iter_mut().for_each(|v| *v = zero);
        *l = lr;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx512<E: Elem>(first_row: usize, keys: usize, scale: f32, s: &mut [E], lse: &mut [f32]) {
        rows_run(first_row, keys, scale, s, lse)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx2<E: Elem>(first_row: usize, keys: usize, scale: f32, s: &mut [E], lse: &mut [f32]) {
        rows_run(first_row, keys, scale, s, lse)
    }
}

fn rows_isa<E: Elem>(isa: Isa, first_row: usize, keys: usize, scale: f32, s: &mut [E], lse: &mut [f32]) {
    match isa {
        // SAFETY: cpu::usable() only passes instruction sets this CPU has.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::rows_avx512(first_row, keys, scale, s, lse) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::rows_avx2(first_row, keys, scale, s, lse) },
        _ => rows_run(first_row, keys, scale, s, lse),
    }
}

/// Checks that `rows` query rows make whole `[keys, keys]` blocks and that each
/// of the score matrices `(length, name)` holds `keys` values for each row
/// (both passes of the softmax lay their scores out so).
pub(crate) fn check_blocks(rows: usize, keys: usize, scores: &[(usize, &str)]) -> Result<()> {
    if keys == 0 {
        return Err(invalid("keys must be positive"));
    }
    if !rows.is_multiple_of(keys) {
        return Err(invalid(format!(
            "{rows} query rows are not whole [{keys}, {keys}] blocks: causal self-attention needs as many queries as keys"
        )));
    }
    let n = rows.checked_mul(keys).ok_or_else(|| invalid("rows x keys overflows"))?;
    for &(len, what) in scores {
        if len != n {
            return Err(invalid(format!("{what} has {len} elements, but {rows} rows of {keys} keys make {n}")));
        }
    }
    Ok(())
}

/// The softmax of causal self-attention for `lse.len()` query rows, in place:
/// `scores` (unscaled `q k^T`) become the probabilities of `scores * scale`
/// over keys `0..=i` (zero above the diagonal) and `lse` receives each row's
/// log-sum-exp of the scaled scores.
///
/// `scores` holds `keys` values per row, the rows of square `[keys, keys]`
/// blocks one after another (row `r` is query position `r % keys`).
pub fn causal_softmax<E: Elem>(
    isa: Isa,
    scores: &mut [E],
    lse: &mut [f32],
    keys: usize,
    scale: f32,
    threads: usize,
) -> Result<()> {
    check_blocks(lse.len(), keys, &[(scores.len(), "scores")])?;
    let isa = cpu::usable(isa);
    let parts: Vec<Mutex<(&mut [E], &mut [f32])>> =
        scores.chunks_mut(ROWS_PER_TASK * keys).zip(lse.chunks_mut(ROWS_PER_TASK)).map(Mutex::new).collect();
    parallel::run_tasks(threads, parts.len(), &|t| {
        let mut guard = parts[t].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (s, l) = &mut *guard;
        rows_isa(isa, t * ROWS_PER_TASK, keys, scale, s, l);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attn_grad::tests::noise;
    use crate::elem::Bf16;

    fn check<E: Elem>(isa: Isa, k: usize, blocks: usize, scale: f32, tol: f64) {
        let rows = k * blocks;
        let mut s: Vec<E> = noise(rows * k, 7, 40.0).into_iter().map(E::from_f32).collect();
        let orig: Vec<f64> = s.iter().map(|v| v.to_f32() as f64).collect();
        let mut lse = vec![0f32; rows];
        causal_softmax(isa, &mut s, &mut lse, k, scale, 2).unwrap();
        for r in 0..rows {
            let i = r % k;
            let row = &orig[r * k..r * k + i + 1];
            let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v * scale as f64));
            let l = m + row.iter().map(|&v| (v * scale as f64 - m).exp()).sum::<f64>().ln();
            assert!((lse[r] as f64 - l).abs() <= 1e-5 * (1.0 + l.abs()), "lse row {r}: {} vs {l}", lse[r]);
            let mut sum = 0.0;
            for j in 0..k {
                let p = s[r * k + j].to_f32() as f64;
                if j > i {
                    assert_eq!(p, 0.0, "row {r} key {j} above the diagonal");
                    continue;
                }
                let want = (orig[r * k + j] * scale as f64 - l).exp();
                assert!((p - want).abs() <= tol * (want + 1e-6), "p row {r} key {j}: {p} vs {want}");
                sum += p;
            }
            assert!((sum - 1.0).abs() < 50.0 * tol, "row {r} sums to {sum}");
        }
    }

    #[test]
    fn matches_the_reference_for_every_isa_and_dtype() {
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
            for (k, blocks) in [(1, 3), (7, 2), (16, 1), (64, 3), (130, 2)] {
                check::<f32>(isa, k, blocks, 0.125, 1e-5);
                check::<Bf16>(isa, k, blocks, 0.125, 1e-2);
            }
        }
    }

    #[test]
    fn probabilities_equal_those_the_backward_recomputes() {
        // The backward forms p = exp(s * scale - lse) from the same scores and lse.
        let k = 37;
        let s0: Vec<Bf16> = noise(2 * k * k, 3, 30.0).into_iter().map(Bf16::from_f32).collect();
        let mut p = s0.clone();
        let mut lse = vec![0f32; 2 * k];
        causal_softmax(Isa::Avx512, &mut p, &mut lse, k, 0.3, 1).unwrap();
        let (mut again, mut dp) = (s0.clone(), vec![Bf16::from_f32(0.0); 2 * k * k]);
        let zeros = vec![Bf16::from_f32(0.0); 2 * k];
        crate::attn_grad::causal_softmax_grad(Isa::Avx512, &mut again, &mut dp, &lse, &zeros, &zeros, k, 1, 0.3, 1).unwrap();
        assert!(p.iter().zip(&again).all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits()));
    }

    #[test]
    fn nan_scores_give_nan_rows_and_huge_ones_stay_finite() {
        let k = 4;
        let mut s = vec![1.0f32; k * k];
        s[2 * k] = f32::NAN; // row 2, key 0
        s[3 * k + 3] = 1e30; // row 3, key 3: dominates its row
        let mut lse = vec![0f32; k];
        causal_softmax(Isa::Scalar, &mut s, &mut lse, k, 1.0, 1).unwrap();
        assert!(lse[2].is_nan() && s[2 * k..2 * k + 3].iter().all(|v| v.is_nan()));
        // The other keys of row 3 underflow (to the smallest normal float, as exp_f32 clamps).
        assert!(s[3 * k..3 * k + 3].iter().all(|&v| (0.0..1e-30).contains(&v)) && s[3 * k + 3] == 1.0);
        assert_eq!(s[0], 1.0);
    }

    #[test]
    fn rejects_shapes_that_do_not_fit() {
        let mut s = vec![0f32; 12];
        assert!(causal_softmax(Isa::Scalar, &mut s, &mut [0f32; 3], 4, 1.0, 1).is_err());
        assert!(causal_softmax(Isa::Scalar, &mut s, &mut [0f32; 3], 0, 1.0, 1).is_err());
        assert!(causal_softmax(Isa::Scalar, &mut s[..11], &mut [0f32; 3], 3, 1.0, 1).is_err());
        assert!(causal_softmax(Isa::Scalar, &mut s[..9], &mut [0f32; 3], 3, 1.0, 1).is_ok());
    }
}
