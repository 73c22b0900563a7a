"""Property tests of the 4-bit and 8-bit kernels (acceptance 3 of issue 2)."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import qpeft
from qpeft.functional import BLOCK_SIZES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# float32 values of every kind: zeros, subnormals, tiny and huge magnitudes.
finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
magnitudes = st.sampled_from([0.0, 1e-40, 1e-30, 1e-3, 1.0, 1e3, 1e30, 3e38])


@st.composite
def weights(draw, max_n=2500):
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(0, max_n))
    kind = draw(st.sampled_from(["any", "scaled_normal", "with_zero_blocks"]))
    if kind == "any":
        x = draw(arrays(np.float32, n, elements=finite32))
    else:
        seed = draw(st.integers(0, 2**32 - 1))
        with np.errstate(over="ignore"):  # 3e38 * normal overflows: filtered below
            x = np.random.default_rng(seed).standard_normal(n).astype(np.float32) * np.float32(draw(magnitudes))
        if kind == "with_zero_blocks" and n:
            start = draw(st.integers(0, n - 1))
            x[start : start + draw(st.integers(1, 300))] = 0
    t = torch.from_numpy(x).to(dtype)
    assume(bool(torch.isfinite(t).all()))  # float16 overflows to inf above 65504
    return t


def widest_gap(table: torch.Tensor) -> float:
    v = table.sort().values
    return (v[1:] - v[:-1]).max().item()


def block_scales(state) -> torch.Tensor:
    """The float32 scales a state dequantizes with (nested ones rebuilt)."""
    if not state.nested:
        return state.absmax
    # Clamped at float32's maximum, as the kernels do (a sum past it would be inf).
    return (qpeft.dequantize_blockwise(state.absmax, state.state2) + state.offset).clamp(max=torch.finfo(torch.float32).max)


@SETTINGS
@given(x=weights(), blocksize=st.sampled_from(BLOCK_SIZES), quant_type=st.sampled_from(["nf4", "fp4"]), nested=st.booleans())
# The largest float among zeros: its nested scale once rounded to inf.
@example(x=torch.cat([torch.tensor([torch.finfo(torch.float32).max]), torch.zeros(582)]), blocksize=64,
         quant_type="nf4", nested=True)
# Found by CI: bfloat16 subnormals, 0.8 of the block's absmax -> FP4 code 2/3, whose
# product (3.3 subnormal spacings) rounds to 3 spacings in the bfloat16 output.
@example(x=torch.tensor([4.5918e-40, 3.6734e-40]).bfloat16(), blocksize=64, quant_type="fp4", nested=False)
def test_reconstruction_error_is_bounded(x, blocksize, quant_type, nested):
    packed, state = qpeft.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    assert packed.shape == ((x.numel() + 1) // 2, 1)
    y = qpeft.dequantize_4bit(packed, state)
    assert y.shape == x.shape and y.dtype == x.dtype
    _, plain = qpeft.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    absmax = plain.absmax.double()
    scales = block_scales(state).double()
    half_gap = widest_gap(qpeft.get_4bit_type(quant_type)) / 2
    bound = half_gap * absmax
    if nested:
        # |x - c*a'| <= |x - c*a| + |c| * |a - a'|, and |a - a'| is at most half
        # the widest gap of the 8-bit map times that block's nested scale.
        nested_half_gap = widest_gap(state.state2.code) / 2
        a2 = state.state2.absmax.double().repeat_interleave(256)[: absmax.numel()]
        scale_err = (scales - absmax).abs()
        assert bool((scale_err <= nested_half_gap * a2 * (1 + 1e-5) + 1e-6 * absmax.abs() + 1e-44).all())
        bound = half_gap * absmax + scale_err
    if x.numel() == 0:
        return
    per_elem = bound.repeat_interleave(blocksize)[: x.numel()]
    err = (x.double().reshape(-1) - y.double().reshape(-1)).abs()
    # Slack for the float32 product and the rounding to a 16-bit output dtype.
    out_eps = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}[x.dtype]
    tol = per_elem * (1 + 1e-5) + y.double().reshape(-1).abs() * out_eps + 1e-44
    if x.dtype == torch.float16:
        tol = tol + 2**-24  # float16 subnormal spacing
    if x.dtype == torch.bfloat16:
        tol = tol + 2**-133  # bfloat16 subnormal spacing (the float32 one is below 1e-44)
    bad = (err > tol).nonzero()
    assert bad.numel() == 0, f"element {bad[0].item()}: {x.reshape(-1)[bad[0]].item()} -> {y.reshape(-1)[bad[0]].item()}"


@SETTINGS
@given(x=weights(), blocksize=st.sampled_from(BLOCK_SIZES), quant_type=st.sampled_from(["nf4", "fp4"]))
def test_quantize_of_dequantize_is_identity(x, blocksize, quant_type):
    packed, state = qpeft.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    y = qpeft.dequantize_4bit(packed, state).float()  # float32: no rounding of the values
    again, state2 = qpeft.quantize_4bit(y, blocksize=blocksize, quant_type=quant_type)
    codes = lambda p: torch.stack([p.view(-1) >> 4, p.view(-1) & 15], 1).view(-1)[: x.numel()]  # noqa: E731
    c1, c2 = codes(packed), codes(again)
    if quant_type == "fp4":
        c1, c2 = torch.where(c1 == 8, 0, c1), torch.where(c2 == 8, 0, c2)  # -0 comes back as +0
    # Blocks with a subnormal scale lose bits in code*absmax; the rest must be exact.
    normal = (state.absmax >= torch.finfo(torch.float32).tiny * 64).repeat_interleave(blocksize)[: x.numel()]
    assert torch.equal(c1[normal], c2[normal])
    assert torch.equal(state2.absmax[state.absmax >= torch.finfo(torch.float32).tiny * 64],
                       state.absmax[state.absmax >= torch.finfo(torch.float32).tiny * 64])


@SETTINGS
@given(n=st.integers(1, 5000), blocksize=st.sampled_from(BLOCK_SIZES), quant_type=st.sampled_from(["nf4", "fp4"]),
       dtype=st.sampled_from(DTYPES), nested=st.booleans())
def test_zero_blocks_give_zeros(n, blocksize, quant_type, dtype, nested):
    x = torch.zeros(n, dtype=dtype)
    packed, state = qpeft.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    expected_byte = 0x77 if quant_type == "nf4" else 0x00
    body = packed.view(-1)[: n // 2]
    assert bool((body == expected_byte).all())
    y = qpeft.dequantize_4bit(packed, state)
    assert bool((y == 0).all())


@pytest.mark.parametrize("n", [583, 640, 1000])
def test_largest_float_among_zeros_survives_double_quantization(n):
    # code * absmax2 + offset rounds past float32's maximum for the block that
    # held it; the kernels clamp there instead of returning inf and NaN.
    big = torch.finfo(torch.float32).max
    x = torch.zeros(n)
    x[0] = big
    packed, state = qpeft.quantize_4bit(x, blocksize=64, compress_statistics=True)
    assert torch.equal(qpeft.dequantize_4bit(packed, state), x)
    w = x[: n - n % 8].reshape(8, -1)
    packed, state = qpeft.quantize_4bit(w, blocksize=64, compress_statistics=True)
    a = torch.zeros(1, w.shape[1])
    a[0, 0] = 2.0**-10
    y = qpeft.gemv_4bit(a, packed, state)
    assert torch.equal(y, torch.tensor([[big * 2.0**-10] + [0.0] * 7]))


@SETTINGS
@given(x=weights(max_n=3000), blocksize=st.sampled_from([64, 256, 4096]), nested=st.booleans())
# The largest float among zeros: its nested scale once rounded to inf.
@example(x=torch.cat([torch.tensor([torch.finfo(torch.float32).max]), torch.zeros(582)]), blocksize=64, nested=True)
def test_blockwise8_roundtrip(x, blocksize, nested):
    q, state = qpeft.quantize_blockwise(x, blocksize=blocksize, nested=nested)
    assert q.shape == x.shape and q.dtype == torch.uint8
    y = qpeft.dequantize_blockwise(q, state, dtype=torch.float32)
    _, plain = qpeft.quantize_blockwise(x, blocksize=blocksize)
    half_gap = widest_gap(qpeft.create_dynamic_map(True)) / 2
    absmax = plain.absmax.double()
    if nested and absmax.numel():
        # A nested scale is off by at most half a gap times its nested block's
        # scale, which is at most the largest absmax.
        absmax = absmax + absmax.max()
    bound = absmax.repeat_interleave(blocksize)[: x.numel()]
    err = (x.double().reshape(-1) - y.double().reshape(-1)).abs()
    assert bool((err <= half_gap * bound * (1 + 1e-5) + 1e-6 * bound + 1e-44).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_weights_raise_value_error(bad, dtype):
    x = torch.randn(1000).to(dtype)
    x[700] = bad
    with pytest.raises(ValueError, match=r"NaN or infinity.*element 640"):
        qpeft.quantize_4bit(x, blocksize=64)
    with pytest.raises(ValueError, match="NaN or infinity"):
        qpeft.quantize_blockwise(x, blocksize=256)
