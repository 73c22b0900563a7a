//! The input gradient of an RMSNorm, `y = w * (x * s)` with the per-row
//! `s = 1 / sqrt(mean(x^2) + eps)` kept from forward, in one pass per row:
//!
//! ```text
//! xh = x * s,  t = dy * w,  dx = s * (t - xh * mean(t * xh))
//! ```
//!
//! in float32, rounded once to x's dtype. In torch this is nine operations
//! over `[tokens, d]` tensors, with float32 copies in between.

use std::sync::Mutex;

use crate::cpu::{self, Isa};
use crate::elem::Elem;
use crate::error::{invalid, Result};
use crate::parallel;

/// Elements per task (whole rows): large enough that scheduling costs nothing.
const TASK_ELEMS: usize = 32 * 1024;

#[inline(always)]
fn rows_run<E: Elem>(x: &[E], scale: &[f32], w: &[f32], dy: &[E], dx: &mut [E]) {
    let d = w.len();
    for (((x, &s), dy), dx) in x.chunks_exact(d).zip(scale).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
        // Eight partial sums, so that the reduction vectorizes.
        let mut acc = [0f32; 8];
        let mut i = 0;
        while i + 8 <= d {
            for l in 0..8 {
                acc[l] += (dy[i + l].to_f32() * w[i + l]) * (x[i + l].to_f32() * s);
            }
            i += 8;
        }
        let mut dot: f32 = acc.iter().sum();
        for j in i..d {
            dot += (dy[j].to_f32() * w[j]) * (x[j].to_f32() * s);
        }
        let mean = dot / d as f32;
        for (((dx, &x), &dy), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
            *dx = E::from_f32(s * (dy.to_f32() * w - (x.to_f32() * s) * mean));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx512<E: Elem>(x: &[E], scale: &[f32], w: &[f32], dy: &[E], dx: &mut [E]) {
        rows_run(x, scale, w, dy, dx)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx2<E: Elem>(x: &[E], scale: &[f32], w: &[f32], dy: &[E], dx: &mut [E]) {
        rows_run(x, scale, w, dy, dx)
    }
}

fn rows_isa<E: Elem>(isa: Isa, x: &[E], scale: &[f32], w: &[f32], dy: &[E], dx: &mut [E]) {
    match isa {
        // SAFETY: cpu::usable() only passes instruction sets this CPU has.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::rows_avx512(x, scale, w, dy, dx) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::rows_avx2(x, scale, w, dy, dx) },
        _ => rows_run(x, scale, w, dy, dx),
    }
}

/// `dx` for rows of `weight.len()` elements: `x`, `dy` and `dx` hold
/// `scale.len()` rows, `scale` is the forward's per-row `1 / sqrt(mean(x^2) + eps)`.
pub fn rmsnorm_backward<E: Elem>(
    isa: Isa,
    x: &[E],
    scale: &[f32],
    weight: &[f32],
    dy: &[E],
    dx: &mut [E],
    threads: usize,
) -> Result<()> {
    let d = weight.len();
    let rows = scale.len();
    if d == 0 {
        return Err(invalid("the norm's weight is empty"));
    }
    let n = rows.checked_mul(d).ok_or_else(|| invalid("rows x features overflows"))?;
    for (len, what) in [(x.len(), "x"), (dy.len(), "the output gradient"), (dx.len(), "the input gradient")] {
        if len != n {
            return Err(invalid(format!(
                "{what} has {len} elements, but {rows} rows (scale) of {d} features (weight) make {n}"
            )));
        }
    }
    let isa = cpu::usable(isa);
    let per_task = (TASK_ELEMS / d).max(1);
    let outs: Vec<Mutex<&mut [E]>> = dx.chunks_mut(per_task * d).map(Mutex::new).collect();
    parallel::run_tasks(threads, outs.len(), &|i| {
        let mut dx = outs[i].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (r0, r1) = (i * per_task, i * per_task + dx.len() / d);
        rows_isa(isa, &x[r0 * d..r1 * d], &scale[r0..r1], weight, &dy[r0 * d..r1 * d], &mut dx);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nf4::tests::data;
    use crate::elem::Bf16;

    fn reference(x: &[f32], w: &[f32], dy: &[f32], eps: f64) -> (Vec<f32>, Vec<f64>) {
        let d = w.len();
        let mut scales = vec![];
        let mut dx = vec![];
        for (x, dy) in x.chunks(d).zip(dy.chunks(d)) {
            let s = 1.0 / (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64 + eps).sqrt();
            let dot: f64 = (0..d).map(|i| dy[i] as f64 * w[i] as f64 * x[i] as f64 * s).sum();
            for i in 0..d {
                dx.push(s * (dy[i] as f64 * w[i] as f64 - x[i] as f64 * s * dot / d as f64));
            }
            scales.push(s as f32);
        }
        (scales, dx)
    }

    #[test]
    fn matches_a_float64_reference_for_odd_widths_every_isa_and_thread_count() {
        for d in [1usize, 7, 8, 13, 576, 1000] {
            let rows = 3 * TASK_ELEMS / d + 5;
            let (x, w, dy) = (data(rows * d, 1, 3.0), data(d, 2, 1.0), data(rows * d, 3, 1.0));
            let (scale, want) = reference(&x, &w, &dy, 1e-5);
            for isa in cpu::available() {
                for threads in [1, 3] {
                    let mut dx = vec![0f32; rows * d];
                    rmsnorm_backward(isa, &x, &scale, &w, &dy, &mut dx, threads).unwrap();
                    for (r, (got, want)) in dx.chunks(d).zip(want.chunks(d)).enumerate() {
                        let mag: f64 = want.iter().map(|v| v.abs()).fold(0.0, f64::max) + scale[r] as f64;
                        for (g, w) in got.iter().zip(want) {
                            assert!((*g as f64 - w).abs() <= 1e-5 * mag, "{isa:?} d={d} row {r}: {g} vs {w}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bfloat16_input_rounds_the_float32_result_once() {
        let d = 64;
        let x: Vec<Bf16> = data(10 * d, 4, 2.0).into_iter().map(Bf16::from_f32).collect();
        let dy: Vec<Bf16> = data(10 * d, 5, 1.0).into_iter().map(Bf16::from_f32).collect();
        let w = data(d, 6, 1.0);
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let dyf: Vec<f32> = dy.iter().map(|v| v.to_f32()).collect();
        let (scale, want) = reference(&xf, &w, &dyf, 1e-6);
        let mut dx = vec![Bf16::from_f32(0.0); 10 * d];
        rmsnorm_backward(cpu::best(), &x, &scale, &w, &dy, &mut dx, 1).unwrap();
        for (g, w) in dx.iter().zip(&want) {
            assert!((g.to_f32() as f64 - w).abs() <= w.abs() * 2f64.powi(-8) + 1e-4, "{} vs {w}", g.to_f32());
        }
    }

    #[test]
    fn inconsistent_shapes_are_errors() {
        let mut dx = [0f32; 6];
        assert!(rmsnorm_backward(cpu::best(), &[0f32; 6], &[1.0; 2], &[1.0; 3], &[0f32; 5], &mut dx, 1)
            .unwrap_err()
            .to_string()
            .contains("output gradient has 5 elements"));
        assert!(rmsnorm_backward(cpu::best(), &[0f32; 6], &[1.0; 2], &[], &[0f32; 6], &mut dx, 1).is_err());
    }
}
