"""Byte compatibility with bitsandbytes (acceptance 1 and 2 of issue 2).

Rules followed (documented in qpeft.functional):
* NF4 bytes and float32 absmax equal bitsandbytes' CPU path exactly, except
  all-zero blocks, where both give 0x77 here (bitsandbytes' CUDA path writes
  0x00); both dequantize to zeros.
* FP4 bytes and the 8-bit codes of double-quantized scales follow
  bitsandbytes' CUDA rules. bitsandbytes' CPU path differs from them near code
  boundaries; every such disagreement must be a near-tie between neighbouring
  codes, and the count is printed.
"""

import json
import math

import pytest
import torch

import qpeft
from qpeft.functional import BLOCK_SIZES

from conftest import make_input

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DISTS = ["normal", "uniform", "heavy", "zero"]
SHAPES = [(1,), (4097,), (127, 33), (64, 256)]


def bnb_reference_dequant(packed, state):
    """bitsandbytes' own torch implementation of 4-bit dequantization.

    Its C++ CPU kernel (used by ``dequantize_4bit`` when the last dimension is
    even and blocksize < 2048) indexes scales per row and gives wrong values
    when blocks cross rows (e.g. shape (64, 64) with blocksize 128); the torch
    path implements the format as written, so it is the oracle here.
    """
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    code = _get_4bit_code(state.quant_type, packed.device)
    return fn(packed.reshape(-1), absmax, code, state.blocksize, state.shape, state.dtype)


def assert_same_absmax(a1, a2, label):
    # An all-zero partial last block: bitsandbytes stores its 1e-38 clamp, qpeft 0.
    zero_tail = (a1 == 0) & (a2 <= 1e-38)
    assert torch.equal(a1[~zero_tail], a2[~zero_tail]), f"{label}: absmax differ"


def check_nested_codes(ours, theirs, scales, offset, label):
    """Nested 8-bit codes: identical, or qpeft's is the nearest and bitsandbytes' is a near miss.

    bitsandbytes' CPU 8-bit quantizer is an approximate lookup table: where it
    disagrees with the exact (CUDA) rule, its value must still be within 1% of
    the map's own worst rounding error (half its widest gap) of the nearest.
    Returns the number of disagreements.
    """
    q1, q2 = ours.absmax.long(), theirs.absmax.long()
    assert torch.equal(ours.state2.absmax, theirs.state2.absmax), f"{label}: nested absmax differ"
    code = ours.state2.code
    tolerance = 0.01 * (code[1:] - code[:-1]).max().item() / 2
    diff = (q1 != q2).nonzero().flatten()
    for b in diff.tolist():
        if ours.state2.absmax[b // 256] == 0:
            continue  # all-zero 8-bit block: any code times 0 gives the offset back
        x = ((scales[b] - offset) * (1.0 / ours.state2.absmax[b // 256])).item()
        d_ours, d_theirs = abs(x - code[q1[b]].item()), abs(x - code[q2[b]].item())
        assert d_ours <= d_theirs + 1e-7, f"{label}: block {b}: ours is not nearest ({x})"
        assert d_theirs - d_ours <= tolerance, f"{label}: block {b}: codes {q1[b]} vs {q2[b]} for {x}"
    return len(diff)


def check_fp4_bytes(p1, p2, x, absmax, bs, label):
    """FP4: check that every nibble disagreement is a near-tie; return their count.

    Codes 0 and 8 (+0 and -0) are not counted: bitsandbytes' CPU path sorts
    them arbitrarily for values that round to zero; both dequantize to 0.
    """
    table = qpeft.get_4bit_type("fp4")
    n = x.numel()
    nib = lambda p: torch.stack([p.view(-1) >> 4, p.view(-1) & 15], 1).view(-1)[:n].long()  # noqa: E731
    c1, c2 = nib(p1), nib(p2)
    signed_zero = (c1 & 7 == 0) & (c2 & 7 == 0)
    bad = ((c1 != c2) & ~signed_zero).nonzero().flatten()
    xs = x.reshape(-1).float()
    for e in bad.tolist():
        v1, v2 = table[c1[e]].item(), table[c2[e]].item()
        a = absmax[e // bs].item()
        s = xs[e].item() / a if a else 0.0
        mid = (v1 + v2) / 2
        assert abs(s - mid) < 2e-6, f"{label}: element {e}: {s} is not near the boundary {mid} ({v1} vs {v2})"
    return len(bad)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCK_SIZES)
@pytest.mark.parametrize("dist", DISTS)
def test_nf4_matches_bitsandbytes(bnb, dist, blocksize, dtype, shape):
    x = make_input(dist, shape, dtype, seed=blocksize)
    if dist != "zero" and x.numel() > blocksize:
        x.view(-1)[blocksize : 2 * blocksize] = 0  # one all-zero block in every input
    label = f"{dist} bs={blocksize} {dtype} {shape}"
    for dq in (False, True):
        p1, s1 = qpeft.quantize_4bit(x, blocksize=blocksize, compress_statistics=dq, quant_type="nf4")
        p2, s2 = bnb.quantize_4bit(x, blocksize=blocksize, compress_statistics=dq, quant_type="nf4")
        assert p1.shape == p2.shape and p1.dtype == p2.dtype
        assert torch.equal(p1, p2), f"{label}: NF4 bytes differ ({(p1 != p2).sum().item()})"
        if dq:
            _, plain_state = qpeft.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
            zero_tail = x.numel() % blocksize and not x.view(-1)[-(x.numel() % blocksize) :].any()
            if not zero_tail:  # else bitsandbytes' mean includes its 1e-38 clamp
                assert s1.offset.item() == s2.offset.item()
                check_nested_codes(s1, s2, plain_state.absmax, s1.offset, label)
        else:
            assert_same_absmax(s1.absmax, s2.absmax, label)
        # bitsandbytes' data and state, dequantized by qpeft, give bitsandbytes' output.
        ours = qpeft.dequantize_4bit(p2, s2)
        assert ours.dtype == dtype and ours.shape == x.shape
        assert torch.equal(ours, bnb_reference_dequant(p2, s2)), label
        if len(shape) == 1 or shape[-1] % blocksize == 0:
            assert torch.equal(ours, bnb.dequantize_4bit(p2, s2)), label
        if dist == "zero":
            assert torch.equal(ours, torch.zeros_like(ours))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCK_SIZES)
@pytest.mark.parametrize("dist", DISTS)
def test_fp4_follows_cuda_rules(bnb, dist, blocksize, dtype):
    x = make_input(dist, (96, 130), dtype, seed=blocksize + 1)
    label = f"fp4 {dist} bs={blocksize} {dtype}"
    p1, s1 = qpeft.quantize_4bit(x, blocksize=blocksize, quant_type="fp4")
    p2, s2 = bnb.quantize_4bit(x, blocksize=blocksize, quant_type="fp4")
    assert_same_absmax(s1.absmax, s2.absmax, label)
    # Every disagreement is checked to be a near-tie; bf16 inputs sit on a
    # coarse lattice, so exact-looking ties are common there.
    check_fp4_bytes(p1, p2, x, s1.absmax, blocksize, label)
    ours = qpeft.dequantize_4bit(p2, s2)
    assert torch.equal(ours, bnb_reference_dequant(p2, s2)), label
    if dist == "zero":
        assert torch.equal(ours, torch.zeros_like(ours))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_weight_matches_bitsandbytes(bnb, dtype, capsys):
    x = make_input("normal", (4096, 4096), dtype, seed=7)
    for qt in ("nf4", "fp4"):
        p1, s1 = qpeft.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type=qt)
        p2, s2 = bnb.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type=qt)
        _, plain = qpeft.quantize_4bit(x, blocksize=64, quant_type=qt)
        n_nested = check_nested_codes(s1, s2, plain.absmax, s1.offset, f"{qt} 4096x4096 {dtype}")
        if qt == "nf4":
            assert torch.equal(p1, p2)
            n_fp4 = 0
        else:
            n_fp4 = check_fp4_bytes(p1, p2, x, plain.absmax, 64, f"fp4 4096x4096 {dtype}")
        assert torch.equal(qpeft.dequantize_4bit(p2, s2), bnb.dequantize_4bit(p2, s2))
        with capsys.disabled():
            print(
                f"\n  4096x4096 {qt} {dtype}: nested codes differing from bitsandbytes CPU: "
                f"{n_nested} of {s1.absmax.numel()}; FP4 nibbles differing: {n_fp4}"
            )


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_quant_state_dict_interchange(bnb, quant_type, nested):
    x = make_input("normal", (300, 70), torch.bfloat16, seed=3)
    p1, s1 = qpeft.quantize_4bit(x, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    p2, s2 = bnb.quantize_4bit(x, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    d1, d2 = s1.as_dict(packed=True), s2.as_dict(packed=True)
    assert sorted(d1) == sorted(d2)
    for k in d1:
        assert d1[k].dtype == d2[k].dtype and d1[k].shape == d2[k].shape, k
    key = f"quant_state.bitsandbytes__{quant_type}"
    j1 = json.loads(bytes(d1[key].numpy()))
    j2 = json.loads(bytes(d2[key].numpy()))
    assert list(j1) == list(j2) and j1 == j2
    assert torch.equal(d1["quant_map"], d2["quant_map"])
    if nested:
        assert torch.equal(d1["nested_quant_map"], d2["nested_quant_map"])
    # Each library loads the other's dict and dequantizes to the same values.
    ours_from_bnb = qpeft.QuantState.from_dict({f"weight.{k}": v for k, v in d2.items()})
    bnb_from_ours = bnb.QuantState.from_dict(dict(d1), device=torch.device("cpu"))
    assert torch.equal(qpeft.dequantize_4bit(p2, ours_from_bnb), bnb_reference_dequant(p2, s2))
    assert torch.equal(bnb_reference_dequant(p1, bnb_from_ours), qpeft.dequantize_4bit(p1, s1))
    unpacked1, unpacked2 = s1.as_dict(), s2.as_dict()
    assert sorted(unpacked1) == sorted(unpacked2)


def test_code_tables_match_bitsandbytes(bnb):
    for qt in ("nf4", "fp4"):
        assert torch.equal(qpeft.get_4bit_type(qt), bnb.get_4bit_type(qt, device="cpu"))
    for signed in (True, False):
        assert torch.equal(qpeft.create_dynamic_map(signed), bnb.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_blockwise8_matches_bitsandbytes(bnb, blocksize, dtype):
    x = make_input("normal", (5000,), dtype, seed=blocksize)
    q1, s1 = qpeft.quantize_blockwise(x, blocksize=blocksize)
    q2, s2 = bnb.quantize_blockwise(x, blocksize=blocksize)
    assert torch.equal(s1.absmax, s2.absmax)
    diff = (q1.long() - q2.long()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= math.ceil(0.01 * x.numel())
    # bitsandbytes' codes dequantize identically with qpeft.
    ours = qpeft.dequantize_blockwise(q2, s2, dtype=dtype)
    assert torch.equal(ours, bnb.dequantize_blockwise(q2, s2).to(dtype))
