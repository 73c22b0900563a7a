//! Cross-entropy of rows of logits together with its gradient, three passes
//! over each row while it sits in cache:
//!
//! ```text
//! m = max(x),  lse = m + ln(sum(exp(x - m)))
//! loss = lse - x[t],  grad = round(exp(x - lse) - onehot(t))
//! ```
//!
//! in float32 (`round`: to the logits' dtype); rows whose target is the
//! ignore index get zero loss and a zero gradient. In torch this is a
//! float32 copy of the logits, a log-sum-exp, a subtraction, an exponential,
//! a scatter, a mask and a copy back, each a pass over `[rows, vocab]` in memory.
//! Non-finite logits give a non-finite loss (never an error), as in torch.

use std::sync::Mutex;

use crate::cpu::{self, Isa};
use crate::elem::Elem;
use crate::error::{invalid, Result};
use crate::parallel;
use crate::swiglu::exp_f32;

/// Lanes of the partial reductions, so that they vectorize.
const LANES: usize = 16;

#[inline(always)]
fn row_max<E: Elem>(x: &[E]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max(c[l].to_f32());
        }
    }
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, v| m.max(v.to_f32()));
    acc.iter().fold(tail, |m, &v| m.max(v))
}

#[inline(always)]
fn row_sum_exp<E: Elem>(x: &[E], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] += exp_f32(c[l].to_f32() - m);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| exp_f32(v.to_f32() - m)).sum();
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn rows_run<E: Elem>(logits: &[E], targets: &[Option<usize>], grad: &mut [E], lse: &mut [f32], loss: &mut [f32]) {
    let vocab = logits.len() / targets.len().max(1);
    let rows = logits.chunks_exact(vocab).zip(grad.chunks_exact_mut(vocab));
    for (((x, g), t), (lse, loss)) in rows.zip(targets).zip(lse.iter_mut().zip(loss.iter_mut())) {
        let m = row_max(x);
        let l = m + row_sum_exp(x, m).ln();
        *lse = l;
        match *t {
            None => {
                *loss = 0.0;
                g.iter_mut().for_each(|g| *g = E::from_f32(0.0));
            }
            Some(t) => {
                let xt = x[t].to_f32();
                *loss = l - xt;
                for (g, &v) in g.iter_mut().zip(x) {
                    *g = E::from_f32(exp_f32(v.to_f32() - l));
                }
                g[t] = E::from_f32(exp_f32(xt - l) - 1.0);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx512<E: Elem>(
        logits: &[E],
        targets: &[Option<usize>],
        grad: &mut [E],
        lse: &mut [f32],
        loss: &mut [f32],
    ) {
        rows_run(logits, targets, grad, lse, loss)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx2<E: Elem>(
        logits: &[E],
        targets: &[Option<usize>],
        grad: &mut [E],
        lse: &mut [f32],
        loss: &mut [f32],
    ) {
        rows_run(logits, targets, grad, lse, loss)
    }
}

fn rows_isa<E: Elem>(isa: Isa, logits: &[E], targets: &[Option<usize>], grad: &mut [E], lse: &mut [f32], loss: &mut [f32]) {
    match isa {
        // SAFETY: cpu::usable() only passes instruction sets this CPU has.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::rows_avx512(logits, targets, grad, lse, loss) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::rows_avx2(logits, targets, grad, lse, loss) },
        _ => rows_run(logits, targets, grad, lse, loss),
    }
}

/// One row's outputs: (gradient, log-sum-exp), loss.
type RowOut<'a, E> = ((&'a mut [E], &'a mut f32), &'a mut f32);

/// Cross-entropy of each row of `logits` (`targets.len()` rows of `vocab`
/// values) against its target, with the gradient of the summed loss with
/// respect to the logits written to `grad` and the log-sum-exp of each row to
/// `lse`. A target equal to `ignore_index` skips its row (zero loss, zero
/// gradient); any other target must lie in `0..vocab`.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_grad<E: Elem>(
    isa: Isa,
    logits: &[E],
    vocab: usize,
    targets: &[i64],
    ignore_index: i64,
    grad: &mut [E],
    lse: &mut [f32],
    loss: &mut [f32],
    threads: usize,
) -> Result<()> {
    let rows = targets.len();
    if vocab == 0 {
        return Err(invalid("the vocabulary is empty (0 logits per row)"));
    }
    let n = rows.checked_mul(vocab).ok_or_else(|| invalid("rows x vocabulary overflows"))?;
    for (len, what) in [(logits.len(), "logits"), (grad.len(), "the gradient")] {
        if len != n {
            return Err(invalid(format!("{what} has {len} elements, but {rows} rows (targets) of {vocab} make {n}")));
        }
    }
    for (len, what) in [(lse.len(), "lse"), (loss.len(), "loss")] {
        if len != rows {
            return Err(invalid(format!("{what} has {len} elements, one per row ({rows}) is needed")));
        }
    }
    let mut checked = Vec::with_capacity(rows);
    for (row, &t) in targets.iter().enumerate() {
        checked.push(if t == ignore_index {
            None
        } else if (0..vocab as i64).contains(&t) {
            Some(t as usize)
        } else {
            return Err(invalid(format!(
                "target {t} of row {row} is outside the vocabulary (0..{vocab}) and is not the ignore index {ignore_index}"
            )));
        });
    }
    let isa = cpu::usable(isa);
    let outs: Vec<Mutex<RowOut<E>>> = grad
        .chunks_mut(vocab).zip(lse.iter_mut()).zip(loss.iter_mut()).map(Mutex::new).collect();
    parallel::run_tasks(threads, rows, &|i| {
        let mut guard = outs[i].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let ((g, lse), loss) = &mut *guard;
        rows_isa(
            isa,
            &logits[i * vocab..(i + 1) * vocab],
            &checked[i..i + 1],
            g,
            std::slice::from_mut(*lse),
            std::slice::from_mut(*loss),
        );
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elem::Bf16;

    fn reference(x: &[f32], t: usize) -> (f64, f64, Vec<f64>) {
        let m = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let s: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
        let lse = m + s.ln();
        let mut g: Vec<f64> = x.iter().map(|&v| (v as f64 - lse).exp()).collect();
        g[t] -= 1.0;
        (lse, lse - x[t] as f64, g)
    }

    fn logits(rows: usize, vocab: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..rows * vocab)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 24.0
            })
            .collect()
    }

    #[test]
    fn matches_a_float64_reference_on_every_isa_and_thread_count() {
        let (rows, vocab) = (7, 1003);
        let x = logits(rows, vocab, 3);
        let targets: Vec<i64> = vec![0, 1002, -100, 17, 500, -100, 3];
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
            for threads in [1, 3] {
                let (mut g, mut lse, mut loss) = (vec![0f32; rows * vocab], vec![0f32; rows], vec![0f32; rows]);
                cross_entropy_grad(isa, &x, vocab, &targets, -100, &mut g, &mut lse, &mut loss, threads).unwrap();
                for r in 0..rows {
                    let row = &x[r * vocab..(r + 1) * vocab];
                    let gr = &g[r * vocab..(r + 1) * vocab];
                    if targets[r] == -100 {
                        assert_eq!(loss[r], 0.0);
                        assert!(gr.iter().all(|&v| v == 0.0));
                        continue;
                    }
                    let (l, want, gw) = reference(row, targets[r] as usize);
                    assert!((lse[r] as f64 - l).abs() < 1e-5 * l.abs().max(1.0), "{} {l}", lse[r]);
                    assert!((loss[r] as f64 - want).abs() < 1e-5 * want.abs().max(1.0));
                    for (a, b) in gr.iter().zip(&gw) {
                        assert!((*a as f64 - b).abs() < 1e-6 + 1e-5 * b.abs(), "{a} {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_gradient_is_the_rounded_float32_gradient() {
        let (rows, vocab) = (2, 300);
        let x32: Vec<f32> = logits(rows, vocab, 9).iter().map(|&v| Bf16::from_f32(v).to_f32()).collect();
        let x16: Vec<Bf16> = x32.iter().map(|&v| Bf16::from_f32(v)).collect();
        let targets = [5i64, 299];
        let (mut g32, mut l32, mut s32) = (vec![0f32; rows * vocab], vec![0f32; rows], vec![0f32; rows]);
        let (mut g16, mut l16, mut s16) = (vec![Bf16::from_f32(0.0); rows * vocab], vec![0f32; rows], vec![0f32; rows]);
        cross_entropy_grad(Isa::Avx512, &x32, vocab, &targets, -100, &mut g32, &mut l32, &mut s32, 1).unwrap();
        cross_entropy_grad(Isa::Avx512, &x16, vocab, &targets, -100, &mut g16, &mut l16, &mut s16, 2).unwrap();
        assert_eq!(l32, l16);
        assert_eq!(s32, s16);
        for (a, b) in g16.iter().zip(&g32) {
            assert_eq!(a.to_f32(), Bf16::from_f32(*b).to_f32());
        }
    }

    #[test]
    fn bad_targets_and_lengths_are_errors() {
        let x = vec![0f32; 6];
        let (mut g, mut lse, mut loss) = (vec![0f32; 6], vec![0f32; 2], vec![0f32; 2]);
        let e = cross_entropy_grad(Isa::Scalar, &x, 3, &[0, 3], -100, &mut g, &mut lse, &mut loss, 1).unwrap_err();
        assert!(e.to_string().contains("target 3 of row 1"), "{e}");
        let e = cross_entropy_grad(Isa::Scalar, &x, 3, &[0, -1], -100, &mut g, &mut lse, &mut loss, 1).unwrap_err();
        assert!(e.to_string().contains("ignore index -100"), "{e}");
        let e = cross_entropy_grad(Isa::Scalar, &x, 4, &[0, 1], -100, &mut g, &mut lse, &mut loss, 1).unwrap_err();
        assert!(e.to_string().contains("logits has 6 elements"), "{e}");
        let e = cross_entropy_grad(Isa::Scalar, &x, 0, &[], -100, &mut g, &mut lse, &mut loss, 1).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
    }

    #[test]
    fn non_finite_logits_give_a_non_finite_loss() {
        let x = vec![0.0f32, f32::NAN, 1.0];
        let (mut g, mut lse, mut loss) = (vec![0f32; 3], vec![0f32; 1], vec![0f32; 1]);
        cross_entropy_grad(Isa::Avx512, &x, 3, &[0], -100, &mut g, &mut lse, &mut loss, 1).unwrap();
        assert!(!loss[0].is_finite());
    }
}
