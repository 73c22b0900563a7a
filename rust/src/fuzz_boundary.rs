//! Property tests of every kernel entry point the Python bindings call, with
//! arbitrary lengths, block sizes, thread counts, instruction sets and values:
//! each call returns `Ok` exactly when its arguments are consistent and an
//! `Err` otherwise, and never panics or reads outside a slice (a panic fails
//! the test; an out-of-bounds read in the SIMD paths would show up as a wrong
//! answer or a crash under these lengths).
//!
//! Each buffer length is either the right one or, one time in three, an
//! arbitrary one, so both sides of every check are exercised.

use proptest::prelude::*;

use crate::adamw::{adamw_step_isa, AdamW32};
use crate::adamw8::{adamw8_step_isa, AdamW8, BLOCK};
use crate::blockwise8::{self, dequantize_blockwise, quantize_blockwise, Code8};
use crate::codebook::QuantType;
use crate::cpu::Isa;
use crate::dynamic_map::dynamic_signed;
use crate::gemv::{gemv_4bit_isa, Weight4};
use crate::nf4::{self, dequantize_4bit_isa, packed_len, quantize_4bit_isa, Nested, Scales};

const ISAS: [Isa; 4] = [Isa::Scalar, Isa::Neon, Isa::Avx2, Isa::Avx512];

/// Valid 4-bit block sizes and a few invalid ones.
fn blocksize() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => prop::sample::select(nf4::BLOCK_SIZES.to_vec()),
        1 => prop::sample::select(vec![0usize, 1, 16, 48, 100, 8192]),
    ]
}

/// Per buffer: `None` for the right length, `Some(len)` for an arbitrary one.
fn lengths(k: usize) -> impl Strategy<Value = Vec<Option<usize>>> {
    prop::collection::vec(prop_oneof![2 => Just(None), 1 => (0usize..800).prop_map(Some)], k)
}

fn pick(len: Option<usize>, right: usize) -> usize {
    len.unwrap_or(right)
}

fn values(n: usize, seed: u64, wild: bool) -> Vec<f32> {
    // A cheap generator: proptest shrinks the seed, not megabytes of floats.
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            if wild && s.is_multiple_of(97) {
                [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN_POSITIVE][(s >> 8) as usize % 5]
            } else {
                ((s >> 11) as f32 / (1u64 << 53) as f32 - 0.5) * 4.0
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn quantize_4bit_any_lengths(n in 0usize..1500, bs in blocksize(), lens in lengths(2), seed in any::<u64>(),
                                 wild in any::<bool>(), isa in 0usize..4, threads in 1usize..4, fp4 in any::<bool>()) {
        let x = values(n, seed, wild);
        let mut packed = vec![0u8; pick(lens[0], packed_len(n))];
        let mut absmax = vec![0f32; pick(lens[1], n.div_ceil(bs.max(1)))];
        let qt = if fp4 { QuantType::Fp4 } else { QuantType::Nf4 };
        let got = quantize_4bit_isa(ISAS[isa], &x, qt, bs, &mut packed, &mut absmax, threads);
        let consistent = nf4::check_blocksize(bs).is_ok() && packed.len() == packed_len(n)
            && absmax.len() == n.div_ceil(bs);
        let finite = x.iter().all(|v| v.is_finite());
        prop_assert_eq!(got.is_ok(), consistent && finite, "{:?}", got);
    }

    #[test]
    fn dequantize_4bit_any_lengths(n in 0usize..1500, bs in blocksize(), lens in lengths(3), seed in any::<u64>(),
                                   nested in any::<bool>(), bs2 in 0usize..300, isa in 0usize..4, threads in 1usize..4) {
        let n_blocks = n.div_ceil(bs.max(1));
        let packed: Vec<u8> = values(pick(lens[0], packed_len(n)), seed, false).iter().map(|v| v.to_bits() as u8).collect();
        let absmax = values(pick(lens[1], n_blocks), seed ^ 1, true);
        let qabsmax: Vec<u8> = absmax.iter().map(|v| v.to_bits() as u8).collect();
        let absmax2 = values(pick(lens[2], qabsmax.len().div_ceil(bs2.max(1))), seed ^ 2, true);
        let code = dynamic_signed();
        let scales = if nested {
            Scales::Nested(Nested { qabsmax: &qabsmax, absmax2: &absmax2, code: &code, offset: 0.25, blocksize2: bs2 })
        } else {
            Scales::Plain(&absmax)
        };
        let mut out = vec![0f32; n];
        let got = dequantize_4bit_isa(ISAS[isa], &packed, scales, QuantType::Nf4, bs, &mut out, threads);
        let scales_ok = absmax.len() == n_blocks
            && (!nested || (bs2 > 0 && absmax2.len() == qabsmax.len().div_ceil(bs2)));
        let consistent = nf4::check_blocksize(bs).is_ok() && packed.len() == packed_len(n) && scales_ok;
        prop_assert_eq!(got.is_ok(), consistent, "{:?}", got);
    }

    #[test]
    fn gemv_4bit_any_shapes(n in 0usize..24, k in 0usize..160, tokens in 0usize..20, bs in blocksize(),
                            lens in lengths(4), seed in any::<u64>(), isa in 0usize..4, threads in 1usize..4) {
        let numel = n * k;
        let packed: Vec<u8> = values(pick(lens[0], packed_len(numel)), seed, false).iter().map(|v| v.to_bits() as u8).collect();
        let absmax = values(pick(lens[1], numel.div_ceil(bs.max(1))), seed ^ 1, false);
        let x = values(pick(lens[2], tokens * k), seed ^ 2, true);
        let mut y = vec![0f32; pick(lens[3], tokens * n)];
        let w = Weight4 { packed: &packed, scales: Scales::Plain(&absmax), quant_type: QuantType::Nf4, blocksize: bs, n, k };
        let got = gemv_4bit_isa(ISAS[isa], &w, &x, tokens, &mut y, threads);
        let consistent = nf4::check_blocksize(bs).is_ok() && packed.len() == packed_len(numel)
            && absmax.len() == numel.div_ceil(bs) && x.len() == tokens * k && y.len() == tokens * n;
        prop_assert_eq!(got.is_ok(), consistent, "{:?}", got);
    }

    #[test]
    fn blockwise8_any_lengths(n in 0usize..1500, bs in prop::sample::select(vec![0usize, 3, 16, 64, 256, 100, 4096]),
                              lens in lengths(2), seed in any::<u64>(), wild in any::<bool>(),
                              offset in prop_oneof![Just(0.0f32), Just(f32::NAN), -1.0f32..1.0],
                              threads in 1usize..4) {
        let x = values(n, seed, wild);
        let code = Code8::new(dynamic_signed()).unwrap();
        let n_blocks = n.div_ceil(bs.max(1));
        let mut q = vec![0u8; pick(lens[0], n)];
        let mut absmax = vec![0f32; pick(lens[1], n_blocks)];
        let got = quantize_blockwise(&x, offset, &code, bs, &mut q, &mut absmax, threads);
        let consistent = blockwise8::check_blocksize(bs).is_ok() && q.len() == n && absmax.len() == n_blocks;
        let finite = offset.is_finite() && x.iter().all(|v| v.is_finite());
        prop_assert_eq!(got.is_ok(), consistent && finite, "{:?}", got);

        let mut out = vec![0f32; pick(lens[0], q.len())];
        let got = dequantize_blockwise(&q, &absmax, offset, &dynamic_signed(), bs, &mut out, threads);
        let consistent = blockwise8::check_blocksize(bs).is_ok() && out.len() == q.len()
            && absmax.len() == q.len().div_ceil(bs.max(1));
        prop_assert_eq!(got.is_ok(), consistent, "{:?}", got);
    }

    #[test]
    fn adamw_any_lengths(n in 0usize..3000, lens in lengths(3), seed in any::<u64>(), isa in 0usize..4,
                         threads in 1usize..4, maximize in any::<bool>()) {
        let mut p = values(n, seed, true);
        let g = values(pick(lens[0], n), seed ^ 1, true);
        let mut m = values(pick(lens[1], n), seed ^ 2, false);
        let mut v: Vec<f32> = values(pick(lens[2], n), seed ^ 3, false).iter().map(|x| x.abs()).collect();
        let h = AdamW32 { decay: 0.999, lerp_weight: 0.1, beta2: 0.999, one_minus_beta2: 0.001, bc2_sqrt: 0.03,
                          eps: 1e-8, step_size: -1e-3, maximize };
        let got = adamw_step_isa(ISAS[isa], &mut p, &g, &mut m, &mut v, &h, threads);
        prop_assert_eq!(got.is_ok(), g.len() == n && m.len() == n && v.len() == n, "{:?}", got);
    }

    #[test]
    fn adamw8_any_lengths(n in 0usize..3000, lens in lengths(5), seed in any::<u64>(), isa in 0usize..4,
                          threads in 1usize..4) {
        let n_blocks = n.div_ceil(BLOCK);
        let mut p = values(n, seed, true);
        let g = values(pick(lens[0], n), seed ^ 1, true);
        let bytes = |len: usize, s: u64| -> Vec<u8> { values(len, s, false).iter().map(|v| v.to_bits() as u8).collect() };
        let mut qm = bytes(pick(lens[1], n), seed ^ 2);
        let mut qv = bytes(pick(lens[2], n), seed ^ 3);
        let mut am: Vec<f32> = values(pick(lens[3], n_blocks), seed ^ 4, true).iter().map(|x| x.abs()).collect();
        let mut av: Vec<f32> = values(pick(lens[4], n_blocks), seed ^ 5, true).iter().map(|x| x.abs()).collect();
        let h = AdamW8 { beta1: 0.9, one_minus_beta1: 0.1, beta2: 0.999, one_minus_beta2: 0.001, bc2_sqrt: 0.03,
                         eps: 1e-8, decay: 0.999, step_size: -1e-3, maximize: false };
        let got = adamw8_step_isa(ISAS[isa], &mut p, &g, &mut qm, &mut qv, &mut am, &mut av, &h, threads);
        let consistent = g.len() == n && qm.len() == n && qv.len() == n && am.len() == n_blocks && av.len() == n_blocks;
        prop_assert_eq!(got.is_ok(), consistent, "{:?}", got);
    }
}
