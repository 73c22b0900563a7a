"""qpeft's CUDA kernels, run on the CPU by a host emulation, against the Rust kernels.

No GPU is needed: tests/cuda_emulator.py compiles the exact kernel text with
the host C++ compiler and runs each grid with one OS thread per CUDA thread
(real barriers and warp shuffles). It is patched in for ``_cuda._launch``,
so ``qpeft._cuda``'s argument handling runs unchanged on CPU tensors. The
expectations are those of the GPU tests (tests/test_devices.py): the CPU's
bytes for quantization, the CPU's bits for the optimizer steps, float32
summation tolerance for the matmul. What this cannot show: that the GPU
compiler and hardware do the same (bench/gpu_check.py on a GPU does).
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qpeft
from qpeft import _cuda
from qpeft import functional as QF

from conftest import make_input
from cuda_emulator import Emulator, compiler

# About 50 s on 2 cores (thousands of OS threads): slow, still run by CI.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(compiler() is None, reason="needs a host C++ compiler (g++ or clang++)")]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return Emulator(tmp_path_factory.mktemp("cuda_emu"))


@pytest.fixture
def cuda(emu, monkeypatch):
    """qpeft._cuda with kernels launched on the emulator (2 'SMs')."""
    monkeypatch.setattr(_cuda, "_launch", emu.launch)
    monkeypatch.setattr(_cuda, "_sm_count", lambda device: 2)
    maps = {s: QF.create_dynamic_map(s) for s in (True, False)}
    monkeypatch.setattr(_cuda, "_dynamic_map", lambda device, signed: maps[signed])
    return _cuda


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("bs,n", [(32, 999), (64, 64 * 9 + 33), (128, 640), (256, 1001), (512, 1536),
                                  (1024, 2100), (2048, 2048 + 31), (4096, 2 * 4096 + 3)])
def test_quantize_4bit_gives_the_cpu_bytes(cuda, qt, bs, n):
    for dtype in DTYPES:
        x = make_input("heavy", (n,), dtype, seed=bs)
        x[bs : min(2 * bs, n)] = 0  # an all-zero block (or a zero partial block)
        packed, absmax = cuda.quantize_4bit(x, qt, bs)
        want_p, want_s = qpeft.quantize_4bit(x, blocksize=bs, quant_type=qt)
        assert torch.equal(absmax, want_s.absmax), (dtype, bs, n)
        assert torch.equal(packed, want_p), (dtype, bs, n, (packed != want_p).nonzero()[:5].tolist())


def test_quantize_reports_the_first_nonfinite_block(cuda):
    x = torch.randn(3000)
    x[2900] = float("inf")
    x[700] = float("nan")
    with pytest.raises(ValueError, match="flat element 640"):
        cuda.quantize_4bit(x, "nf4", 64)
    with pytest.raises(ValueError, match="flat element 512"):
        cuda.quantize_blockwise(x, QF.create_dynamic_map(True), 256, 0.0)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_dequantize_4bit_gives_the_cpu_values(cuda, qt, nested):
    for bs, n in ((64, 64 * 300 + 17), (4096, 4096 + 29), (32, 33)):
        x = make_input("uniform", (n,), torch.float32, seed=n)
        packed, state = qpeft.quantize_4bit(x, blocksize=bs, quant_type=qt, compress_statistics=nested)
        for dtype in DTYPES:
            s = copy.copy(state)
            s.dtype = dtype
            out = torch.empty(n, dtype=dtype)
            cuda.dequantize_4bit(packed, s, out)
            assert torch.equal(out, qpeft.dequantize_4bit(packed, s).view(-1)), (bs, n, dtype)


def test_dequantize_4bit_clamps_nested_scales_past_the_largest_float(cuda):
    # The largest float among zeros: its rebuilt nested scale rounds past float32's maximum.
    x = torch.zeros(583)
    x[0] = torch.finfo(torch.float32).max
    packed, state = qpeft.quantize_4bit(x, blocksize=64, compress_statistics=True)
    out = torch.empty(583)
    cuda.dequantize_4bit(packed, state, out)
    assert torch.equal(out, x)


@pytest.mark.parametrize("bs", [16, 64, 256, 1024])
def test_blockwise8_gives_the_cpu_codes_and_values(cuda, bs):
    code = QF.create_dynamic_map(True)
    for dtype in DTYPES:
        x = make_input("heavy", (3 * bs + 5,), dtype, seed=bs)
        for offset in (0.0, 0.25):
            q, absmax = cuda.quantize_blockwise(x, code, bs, offset)
            want_q, want_s = QF.quantize_blockwise(x, blocksize=bs, _offset=torch.tensor(offset))
            assert torch.equal(q, want_q) and torch.equal(absmax, want_s.absmax), (dtype, offset)
            out = torch.empty(x.shape, dtype=dtype)
            cuda.dequantize_blockwise(q, absmax, code, bs, offset, out)
            # The CPU path adds the offset outside the kernel for nested states; here compare with the formula.
            idx = torch.arange(x.numel()) // bs
            assert torch.equal(out, (code[q.long()] * absmax[idx] + offset).to(dtype))


@pytest.mark.parametrize("shape,bs,nested", [((24, 256), 64, True), ((10, 4096), 4096, False), ((9, 77), 32, True)])
def test_gemv_4bit_matches_the_cpu_kernel(cuda, shape, bs, nested):
    n, k = shape
    w = make_input("normal", shape, torch.float32, seed=n)
    packed, state = qpeft.quantize_4bit(w, blocksize=bs, compress_statistics=nested)
    for dtype in DTYPES:
        for tokens in (1, 3, 17):
            x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tokens)).to(dtype)
            out = torch.empty(tokens, n, dtype=dtype)
            cuda.gemv_4bit(x, packed, state, n, k, tokens, out)
            # The CUDA kernel multiplies float32 weights; so does the CPU's
            # except on its AVX512-BF16 path (see gemv_4bit), then take AVX2's.
            isa = "avx2" if QF.gemv_rounds_weights_to_bf16(dtype, tokens, k, bs) else None
            want = QF._gemv_4bit(x, packed, state, isa=isa)
            s32 = copy.copy(state)
            s32.dtype = torch.float32
            w32 = qpeft.dequantize_4bit(packed, s32)
            mag = F.linear(x.float().abs(), w32.abs())
            rel = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-9}[dtype]
            err = (out.float() - want.float()).abs()
            assert (err <= rel * want.float().abs() + 2e-5 * mag + 1e-7).all(), (dtype, tokens, err.max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_steps_give_the_cpu_bits(cuda, dtype):
    n = 256 * 5 + 37
    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(n, generator=g).to(dtype)
    grads = [torch.randn(n, generator=g).to(dtype) for _ in range(3)]
    hyper = dict(lr=1e-2, weight_decay=0.1)
    pc, mc, vc = p0.clone(), torch.zeros(n), torch.zeros(n)
    pe, me, ve = p0.clone(), torch.zeros(n), torch.zeros(n)
    for step, gr in enumerate(grads, 1):
        maximize = step == 2
        QF.adamw_step(pc, gr, mc, vc, step=step, maximize=maximize, **hyper)
        # the scalars as functional.adamw_step computes them (float64, rounded once)
        bc1, bc2 = 1 - 0.9**step, 1 - 0.999**step
        cuda.adamw_step(pe, gr, me, ve, decay=1 - 1e-2 * 0.1, lerp_weight=1 - 0.9, beta2=0.999, one_minus_beta2=1 - 0.999,
                        bc2_sqrt=bc2**0.5, eps=1e-8, step_size=(1e-2 / bc1) * -1, maximize=maximize)
    assert torch.equal(pe, pc) and torch.equal(me, mc) and torch.equal(ve, vc)
    # 8-bit state, with a NaN and an infinite gradient
    grads[1][7] = float("nan")
    grads[2][300] = float("inf")
    grads[0][5] = -1e-7  # a negative m far below its block's absmax keeps its sign
    blocks = -(-n // 256)
    stc = [torch.full((n,), 127, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8), torch.zeros(blocks), torch.zeros(blocks)]
    ste = [t.clone() for t in stc]
    pc, pe = p0.clone(), p0.clone()
    for step, gr in enumerate(grads, 1):
        QF.adamw8bit_step(pc, gr, *stc, step=step, **hyper)
        cuda.adamw8_step(pe, gr, *ste, beta1=0.9, one_minus_beta1=1 - 0.9, beta2=0.999, one_minus_beta2=1 - 0.999,
                         bc2_sqrt=np.sqrt(1 - 0.999**step), eps=1e-8, decay=1 - 1e-2 * 0.1, step_size=-1e-2 / (1 - 0.9**step),
                         maximize=False)
    assert torch.equal(pe, pc)
    for a, b in zip(ste, stc):
        assert torch.equal(a, b)


def test_copy_pages(cuda):
    src = torch.randint(0, 256, (10 * 64,), dtype=torch.uint8)
    index = torch.tensor([7, 2, 9])
    dst = torch.zeros(3 * 64, dtype=torch.uint8)
    cuda.copy_pages(src, dst, index, 64, gather=True)
    assert torch.equal(dst.view(3, 64), src.view(10, 64)[index])
    back = torch.zeros_like(src)
    cuda.copy_pages(dst, back, index, 64, gather=False)
    assert torch.equal(back.view(10, 64)[index], src.view(10, 64)[index])
    odd = torch.zeros(3 * 10, dtype=torch.uint8)
    cuda.copy_pages(src[:100], odd, index, 10, gather=True)
    assert torch.equal(odd.view(3, 10), src[:100].view(10, 10)[index])
