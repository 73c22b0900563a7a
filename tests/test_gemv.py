"""Fused 4-bit matmul for few tokens: ``qpeft.functional.gemv_4bit`` (issue "Linear4bit").

The oracle is ``F.linear(A.float(), W)`` with ``W`` the float32 weights
``dequantize_4bit`` computes (``code[nibble] * absmax[block]``), rounded to
bfloat16 where the kernel rounds them (bfloat16 input on an AVX512-BF16 CPU:
``gemv_rounds_weights_to_bf16``). Tolerances:
float32 output within 1e-5 of ``|A| @ |W|.T`` (the size of the terms summed);
16-bit output additionally within its own rounding (2^-8 of |y| for bfloat16,
2^-10 for float16).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qpeft
from qpeft import functional as QF
from qpeft.functional import BLOCK_SIZES

from conftest import make_input

OUT_REL = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def quantized(n, k, blocksize=64, quant_type="nf4", nested=False, wdtype=torch.float32, seed=0):
    w = make_input("normal", (n, k), wdtype, seed)
    return qpeft.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


def float32_weight(packed, state):
    """The weights as gemv_4bit uses them: float32, whatever dtype the state records."""
    s32 = copy.copy(state)
    s32.dtype = torch.float32
    return qpeft.dequantize_4bit(packed, s32)


def assert_matches(y, A, packed, state, label="", isa=None):
    w = float32_weight(packed, state)
    n, k = state.shape
    if QF.gemv_rounds_weights_to_bf16(A.dtype, A.numel() // max(k, 1), k, state.blocksize, isa):
        # The AVX512-BF16 path multiplies the weights a dense bf16 matmul would get.
        w = w.bfloat16().float()
    assert y.dtype == A.dtype, label
    assert y.shape == (*A.shape[:-1], n), label
    a = A.float().reshape(-1, k)
    want = F.linear(a, w).reshape(y.shape)
    mag = F.linear(a.abs(), w.abs()).reshape(y.shape)
    err = (y.float() - want).abs()
    tol = OUT_REL[A.dtype] * want.abs() + 1e-5 * mag + 1e-7
    worst = (err - tol).flatten().argmax() if err.numel() else None
    assert bool((err <= tol).all()), (
        f"{label}: |error| {err.flatten()[worst].item():.3g} > tol {tol.flatten()[worst].item():.3g} "
        f"(got {y.flatten()[worst].item()}, want {want.flatten()[worst].item()})"
    )


def isas():
    best = qpeft.cpu_isa()
    return {"avx512": ["scalar", "avx2", "avx512"], "avx2": ["scalar", "avx2"], "neon": ["scalar", "neon"]}.get(
        best, ["scalar"]
    )


# K % 128 == 0, K % 32 == 0 with a 32-wide tail, K % 32 != 0, odd K (blocks and bytes across rows).
SHAPES = [(24, 256), (20, 96), (13, 200), (11, 33)]


@pytest.mark.parametrize("blocksize", BLOCK_SIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_matches_dequantize_then_linear(blocksize, quant_type, nested):
    for i, (n, k) in enumerate(SHAPES):
        packed, state = quantized(n, k, blocksize, quant_type, nested, seed=i)
        for tokens in list(range(1, 17)) + [17, 40]:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                A = make_input("normal", (tokens, k), dtype, seed=tokens) * 50
                y = QF.gemv_4bit(A, packed, state)
                assert_matches(y, A, packed, state, f"{n}x{k} T={tokens} {dtype}")


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("shape", [(64, 1024), (40, 416), (30, 99)])
def test_every_instruction_set_agrees(isa, shape):
    n, k = shape
    for nested, blocksize, tokens in [(False, 64, 1), (True, 32, 3), (True, 256, 8), (False, 4096, 16), (True, 128, 21)]:
        packed, state = quantized(n, k, blocksize, "nf4", nested, seed=tokens)
        for dtype in (torch.float32, torch.bfloat16):
            A = make_input("uniform", (tokens, k), dtype, seed=blocksize)
            y = QF._gemv_4bit(A, packed, state, isa=isa)
            assert_matches(y, A, packed, state, f"{isa} {shape} bs={blocksize} T={tokens} {dtype}", isa)


def test_leading_dimensions_and_one_dimensional_input():
    packed, state = quantized(48, 160)
    A = make_input("normal", (2, 3, 160), torch.bfloat16, 1)
    y = qpeft.functional.gemv_4bit(A, packed, state)
    assert y.shape == (2, 3, 48)
    assert torch.equal(y, QF.gemv_4bit(A.reshape(6, 160), packed, state).reshape(2, 3, 48))
    v = make_input("normal", (160,), torch.float32, 2)
    yv = QF.gemv_4bit(v, packed, state)
    assert yv.shape == (48,)
    assert_matches(yv, v, packed, state)


def test_results_do_not_depend_on_thread_count():
    packed, state = quantized(1000, 1024, 64, "nf4", True)
    threads = torch.get_num_threads()
    try:
        for tokens in (1, 5, 16, 33):
            A = make_input("normal", (tokens, 1024), torch.float32, tokens)
            torch.set_num_threads(1)
            y1 = QF.gemv_4bit(A, packed, state)
            torch.set_num_threads(3)
            y3 = QF.gemv_4bit(A, packed, state)
            assert torch.equal(y1, y3)
            assert_matches(y3, A, packed, state, f"T={tokens}")
    finally:
        torch.set_num_threads(threads)


def test_larger_matrix_many_tokens():
    packed, state = quantized(512, 4096, 64, "nf4", True, wdtype=torch.bfloat16)
    for tokens in (1, 16, 64):
        A = make_input("normal", (tokens, 4096), torch.bfloat16, tokens)
        assert_matches(QF.gemv_4bit(A, packed, state), A, packed, state, f"T={tokens}")


def test_zero_weights_and_inputs_give_zeros():
    packed, state = qpeft.quantize_4bit(torch.zeros(32, 128), quant_type="fp4", compress_statistics=True)
    y = QF.gemv_4bit(torch.randn(3, 128), packed, state)
    assert torch.equal(y, torch.zeros(3, 32))
    packed, state = quantized(32, 128)
    assert torch.equal(QF.gemv_4bit(torch.zeros(2, 128), packed, state), torch.zeros(2, 32))


def test_empty_shapes():
    packed, state = quantized(16, 64)
    y = QF.gemv_4bit(torch.empty(0, 64), packed, state)
    assert y.shape == (0, 16)
    packed0, state0 = qpeft.quantize_4bit(torch.empty(5, 0))
    y0 = QF.gemv_4bit(torch.empty(3, 0, dtype=torch.bfloat16), packed0, state0)
    assert y0.shape == (3, 5) and y0.dtype == torch.bfloat16 and not y0.any()


def test_non_contiguous_input_and_other_storage_dtypes():
    packed, state = quantized(40, 128)
    A = make_input("normal", (128, 6), torch.float32, 3).t()
    assert not A.is_contiguous()
    y = QF.gemv_4bit(A, packed, state)
    assert torch.equal(y, QF.gemv_4bit(A.contiguous(), packed, state))
    # quant_storage other than uint8, and bitsandbytes' transposed view of the packed weight.
    w = make_input("normal", (40, 128), torch.float32, 0)
    packed_bf16, state_bf16 = qpeft.quantize_4bit(w, quant_storage=torch.bfloat16)
    assert torch.equal(QF.gemv_4bit(A, packed_bf16, state_bf16), y)
    assert torch.equal(QF.gemv_4bit(A, packed.t(), state), y)


def test_input_requiring_grad_is_read_without_grad():
    packed, state = quantized(40, 128)
    A = torch.randn(2, 128, requires_grad=True)
    y = QF.gemv_4bit(A, packed, state)
    assert not y.requires_grad
    assert_matches(y, A.detach(), packed, state)


def test_out_argument():
    packed, state = quantized(40, 128)
    A = torch.randn(2, 128, dtype=torch.bfloat16)
    out = torch.empty(2, 40, dtype=torch.bfloat16)
    assert QF.gemv_4bit(A, packed, state, out=out) is out
    assert torch.equal(out, QF.gemv_4bit(A, packed, state))
    with pytest.raises(TypeError, match="dtype"):
        QF.gemv_4bit(A, packed, state, out=torch.empty(2, 40))
    with pytest.raises(ValueError, match="elements"):
        QF.gemv_4bit(A, packed, state, out=torch.empty(2, 39, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        QF.gemv_4bit(A, packed, state, out=torch.empty(40, 2, dtype=torch.bfloat16).t())
    # The kernel gets addresses: an output that is (part of) the input is refused, not raced.
    square, sq_state = quantized(128, 128)
    B = torch.randn(2, 128)
    with pytest.raises(ValueError, match="overlap"):
        QF.gemv_4bit(B, square, sq_state, out=B)
    buf = torch.randn(3, 128)
    with pytest.raises(ValueError, match="overlap"):
        QF.gemv_4bit(buf[:2], square, sq_state, out=buf[1:])


def test_scale_cache_follows_changes_to_the_state():
    packed, state = quantized(40, 128)
    A = torch.randn(3, 128)
    y = QF.gemv_4bit(A, packed, state)
    state.absmax.mul_(2)  # in place
    assert torch.allclose(QF.gemv_4bit(A, packed, state), 2 * y)
    state.absmax = state.absmax / 4  # replaced
    assert torch.allclose(QF.gemv_4bit(A, packed, state), y / 2)
    packed, nested = quantized(40, 128, nested=True)
    y = QF.gemv_4bit(A, packed, nested)
    nested.state2.absmax.mul_(3)
    assert_matches(QF.gemv_4bit(A, packed, nested), A, packed, nested)
    assert not torch.allclose(QF.gemv_4bit(A, packed, nested), y)
    # The native handle copies the nested code book: changing it in place must be seen.
    nested.state2.code.mul_(0.5)
    assert_matches(QF.gemv_4bit(A, packed, nested), A, packed, nested)
    # The packed bytes are read where they lie: in-place changes and swapped memory both count.
    before = QF.gemv_4bit(A, packed, nested)
    packed.copy_(packed.flip(0))
    assert_matches(QF.gemv_4bit(A, packed, nested), A, packed, nested)
    packed.data = packed.data.flip(0).clone()
    assert torch.equal(QF.gemv_4bit(A, packed, nested), before)


# ---------------------------------------------------------------- bitsandbytes


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_states(bnb, nested, quant_type):
    w = make_input("normal", (96, 192), torch.bfloat16, 7)
    packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    A = make_input("normal", (4, 192), torch.bfloat16, 8)
    y = QF.gemv_4bit(A, packed, state)
    want = F.linear(A.float(), bnb.dequantize_4bit(packed, state).float())
    # The state records bfloat16 weights: bitsandbytes' dequantization rounds
    # them to bfloat16, gemv_4bit uses them in float32.
    assert (y.float() - want).abs().max() <= 2**-7 * want.abs().max()
    assert_matches(y, A, packed, state)
    # bitsandbytes passes the packed weight transposed.
    assert torch.equal(QF.gemv_4bit(A, packed.t(), state), y)


# ------------------------------------------------------------------ bad input


def test_bad_input_raises_with_advice():
    packed, state = quantized(40, 128)
    A = torch.randn(2, 128)
    with pytest.raises(TypeError, match="torch.Tensor"):
        QF.gemv_4bit([1.0] * 128, packed, state)
    with pytest.raises(TypeError, match=r"float32, float16 and bfloat16.*A\.float\(\)"):
        QF.gemv_4bit(torch.ones(2, 128, dtype=torch.int32), packed, state)
    with pytest.raises(TypeError, match="float64"):
        QF.gemv_4bit(A.double(), packed, state)
    with pytest.raises(ValueError, match=r"last dimension must be in_features = 128"):
        QF.gemv_4bit(torch.randn(2, 127), packed, state)
    with pytest.raises(ValueError, match=r"last dimension"):
        QF.gemv_4bit(torch.tensor(1.0), packed, state)
    with pytest.raises(ValueError, match=r"\.cpu\(\)"):
        QF.gemv_4bit(torch.empty(2, 128, device="meta"), packed, state)
    with pytest.raises(TypeError, match="quant_state"):
        QF.gemv_4bit(A, packed, None)
    with pytest.raises(TypeError, match="torch.Tensor"):
        QF.gemv_4bit(A, packed.numpy(), state)
    with pytest.raises(ValueError, match="needs 2560"):
        QF.gemv_4bit(A, packed[:-1], state)


def test_weight_must_be_a_matrix():
    for shape in [(4096,), (8, 16, 32)]:
        packed, state = qpeft.quantize_4bit(torch.randn(shape))
        with pytest.raises(ValueError, match=r"2-D weight.*reshape"):
            QF.gemv_4bit(torch.randn(1, shape[-1]), packed, state)


def test_bad_state_fields():
    packed, state = quantized(40, 128)
    bad = copy.copy(state)
    bad.blocksize = 48
    with pytest.raises(ValueError, match="blocksize must be one of"):
        QF.gemv_4bit(torch.randn(1, 128), packed, bad)
    bad = copy.copy(state)
    bad.quant_type = "int4"
    with pytest.raises(ValueError, match="quant_type"):
        QF.gemv_4bit(torch.randn(1, 128), packed, bad)
    bad = copy.copy(state)
    bad.absmax = state.absmax.double()
    with pytest.raises(TypeError, match="absmax must be torch.float32"):
        QF.gemv_4bit(torch.randn(1, 128), packed, bad)
    bad = copy.copy(state)
    bad.absmax = state.absmax[:-1]
    with pytest.raises(ValueError, match="block scales"):
        QF.gemv_4bit(torch.randn(1, 128), packed, bad)


# ------------------------------------------------------------------ properties


@SETTINGS
@given(
    n=st.integers(1, 70),
    k=st.integers(1, 600),
    tokens=st.integers(1, 20),
    blocksize=st.sampled_from(BLOCK_SIZES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    nested=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_any_shape_matches(n, k, tokens, blocksize, quant_type, nested, dtype, seed):
    packed, state = quantized(n, k, blocksize, quant_type, nested, seed=seed)
    A = make_input("uniform", (tokens, k), dtype, seed + 1)
    assert_matches(QF.gemv_4bit(A, packed, state), A, packed, state)


def test_rayon_pool_when_openmp_is_not_used(tmp_path):
    """Inside torch the kernel runs on torch's OpenMP threads; QPEFT_NO_OPENMP=1 selects its own pool."""
    import os
    import subprocess
    import sys

    packed, state = quantized(700, 1024, 64, "nf4", True)
    A = make_input("normal", (3, 1024), torch.bfloat16, 5)
    torch.save({"A": A, "packed": packed, "state": state.as_dict(packed=True), "y": QF.gemv_4bit(A, packed, state)},
               tmp_path / "case.pt")
    script = (
        "import sys, torch, qpeft\n"
        "from qpeft import functional as QF\n"
        "torch.set_num_threads(2)\n"
        f"d = torch.load({str(tmp_path / 'case.pt')!r}, weights_only=False)\n"
        "state = QF.QuantState.from_dict(d['state'])\n"
        "sys.exit(0 if torch.equal(QF.gemv_4bit(d['A'], d['packed'], state), d['y']) else 1)\n"
    )
    env = {**os.environ, "QPEFT_NO_OPENMP": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
