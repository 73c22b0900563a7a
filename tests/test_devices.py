"""The CPU and CUDA backends against the same references (issue 7, item 3).

Every case runs on every available device (the ``device`` fixture: "cpu",
plus "cuda" where torch sees a GPU and CuPy is installed; the CUDA cases
skip cleanly otherwise). The references are independent of both backends:

* quantization: the algorithm of FORMATS.md written with torch operations
  in this file (absmax per block, bitsandbytes' scaling rules, nearest code
  by counting float32 midpoints); qpeft must give these bytes exactly;
* dequantization: ``code[nibble] * absmax`` in torch float32, then cast;
* matmul: ``F.linear`` on the dequantized float32 weight;
* optimizers: ``torch.optim.AdamW`` (32-bit state, tolerance of test_optim)
  and float32 AdamW for the 8-bit state (its quantization error);
* and on a GPU, additionally, the CPU kernels' results: the same bytes for
  quantization and the same bits for the optimizer steps (both follow the
  same float32 operation order with correctly rounded divide and sqrt).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import qpeft
from qpeft import functional as QF

from conftest import make_input


def _cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


_CUDA_SKIP = pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA device and CuPy (pip install 'qpeft[cuda]')")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, _CUDA_SKIP])])
def device(request):
    return torch.device(request.param)


DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ----------------------------------------------------------- references


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[:-1] + code[1:]) * 0.5


def ref_quantize_4bit(x: torch.Tensor, bs: int, qt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """FORMATS.md §2 with torch float32 operations on the CPU."""
    xf = x.detach().cpu().reshape(-1).float()
    n = xf.numel()
    nb = -(-n // bs)
    blocks = torch.zeros(nb * bs)
    blocks[:n] = xf
    blocks = blocks.view(nb, bs)
    absmax = blocks.abs().amax(1)
    a = absmax.unsqueeze(1)
    partial = torch.zeros(nb, 1, dtype=torch.bool)
    if n % bs:
        partial[-1] = True
    inv = torch.where(a > 0, 1.0 / a, torch.zeros_like(a))
    if qt == "nf4":  # bitsandbytes' CPU rule: the partial last block (and absmax < 1e-38) divides
        div = partial | ((a < 1e-38) & (a > 0))
    else:  # its CUDA rule: divide only where 1/absmax overflows
        div = torch.isinf(inv)
    scaled = torch.where(div, blocks / a.clamp_min(torch.finfo(torch.float32).tiny), blocks * inv)
    scaled = torch.where(a > 0, scaled, torch.zeros_like(scaled)).reshape(-1)[: n + (n % 2)]
    if n % 2:
        scaled[-1] = 0.0
    if qt == "nf4":
        codes = (scaled.unsqueeze(1) > _midpoints(QF.get_4bit_type("nf4")).unsqueeze(0)).sum(1)
    else:
        th = torch.tensor([0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333])
        rank = (scaled.abs().unsqueeze(1) > th.unsqueeze(0)).sum(1)
        codes = (rank ^ ((rank & 2) << 1)) | ((scaled < 0).long() << 3)
    codes = codes.to(torch.uint8).view(-1, 2)
    return ((codes[:, 0] << 4) | codes[:, 1]).view(-1, 1), absmax


def ref_dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    p = packed.detach().cpu().reshape(-1).view(torch.uint8)
    codes = torch.stack([p >> 4, p & 15], 1).reshape(-1)[: math.prod(state.shape)].long()
    scales = ref_scales(state)
    table = state.code.cpu()
    idx = torch.arange(codes.numel()) // state.blocksize
    return (table[codes] * scales[idx]).to(state.dtype).view(state.shape)


def ref_scales(state) -> torch.Tensor:
    if not state.nested:
        return state.absmax.cpu().float()
    s2 = state.state2
    idx = torch.arange(state.absmax.numel()) // s2.blocksize
    return s2.code.cpu()[state.absmax.cpu().long()] * s2.absmax.cpu()[idx] + state.offset.cpu()


def ref_quantize_blockwise(x: torch.Tensor, code: torch.Tensor, bs: int):
    xf = x.detach().cpu().reshape(-1).float()
    n = xf.numel()
    nb = -(-n // bs)
    pad = torch.zeros(nb * bs)
    pad[:n] = xf
    absmax = pad.view(nb, bs).abs().amax(1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = (pad.view(nb, bs) * inv.unsqueeze(1)).reshape(-1)[:n]
    mid = _midpoints(code)
    idx = (scaled.unsqueeze(1) > mid.unsqueeze(0)).sum(1)
    at_mid = (idx < 255) & (idx % 2 == 1) & (mid[idx.clamp(max=254)] == scaled)
    return (idx + at_mid.long()).to(torch.uint8).view(x.shape), absmax


# ------------------------------------------------------- quantization


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("bs,n", [(32, 1000), (64, 4096 + 33), (128, 255), (256, 3 * 256), (512, 999),
                                  (1024, 5000), (2048, 2048 + 7), (4096, 3 * 4096 + 1)])
def test_quantize_4bit_gives_the_reference_bytes(device, dtype, qt, bs, n):
    x = make_input("heavy", (n,), dtype, seed=bs + n)
    x[: min(bs, n) // 2] = 0  # part of the first block is zero
    packed, state = qpeft.quantize_4bit(x.to(device), blocksize=bs, quant_type=qt)
    want_p, want_a = ref_quantize_4bit(x, bs, qt)
    assert packed.device.type == device.type and state.absmax.device.type == device.type
    assert torch.equal(state.absmax.cpu(), want_a)
    assert torch.equal(packed.cpu(), want_p)
    if device.type == "cuda":
        cpu_p, cpu_s = qpeft.quantize_4bit(x, blocksize=bs, quant_type=qt)
        assert torch.equal(packed.cpu(), cpu_p) and torch.equal(state.absmax.cpu(), cpu_s.absmax)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_blocks_and_double_quantization_on_every_device(device, dtype):
    x = make_input("normal", (64 * 700 + 10,), dtype, seed=3)
    x[64:192] = 0
    packed, state = qpeft.quantize_4bit(x.to(device), compress_statistics=True)
    cpu_p, cpu_s = qpeft.quantize_4bit(x, compress_statistics=True)
    assert torch.equal(packed.cpu(), cpu_p)
    assert state.nested and state.absmax.dtype == torch.uint8
    assert torch.equal(state.absmax.cpu(), cpu_s.absmax)
    assert torch.equal(state.state2.absmax.cpu(), cpu_s.state2.absmax)
    assert float(state.offset) == float(cpu_s.offset)
    assert (packed.cpu().view(-1)[32:96] == 0x77).all()
    # nested 8-bit codes: the reference encoder on absmax - offset
    q, a2 = ref_quantize_blockwise(ref_quantize_4bit(x, 64, "nf4")[1] - cpu_s.offset, QF.create_dynamic_map(True), 256)
    assert torch.equal(state.absmax.cpu(), q) and torch.equal(state.state2.absmax.cpu(), a2)


def test_nonfinite_input_names_its_block(device):
    x = torch.randn(1000, device=device)
    x[700] = float("nan")
    with pytest.raises(ValueError, match="flat element 640"):
        qpeft.quantize_4bit(x, blocksize=64)
    with pytest.raises(ValueError, match="flat element 512"):
        qpeft.quantize_blockwise(x, blocksize=256)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_dequantize_4bit_equals_the_reference(device, dtype, nested, qt):
    for bs, n in ((64, 64 * 300 + 17), (4096, 4096 * 2 + 31), (32, 1)):
        x = make_input("uniform", (n,), dtype, seed=n)
        packed, state = qpeft.quantize_4bit(x, blocksize=bs, quant_type=qt, compress_statistics=nested)
        want = ref_dequantize_4bit(packed, state)
        got = qpeft.dequantize_4bit(packed.to(device), copy.deepcopy(state).to(device))
        assert got.device.type == device.type and got.dtype == dtype
        assert torch.equal(got.cpu(), want), (bs, n)
        # into an out= tensor, and to another dtype
        out = torch.empty(n, dtype=torch.float32, device=device)
        qpeft.dequantize_4bit(packed.to(device), absmax=ref_scales(state).to(device), out=out, blocksize=bs, quant_type=qt)
        assert torch.equal(out.cpu(), ref_dequantize_4bit(packed, _retyped(state, torch.float32)).view(-1))


def _retyped(state, dtype):
    s = copy.copy(state)
    s.dtype = dtype
    return s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [16, 64, 256, 4096])
def test_blockwise8_round_trip_equals_the_reference(device, dtype, bs):
    x = make_input("heavy", (3 * bs + 5,), dtype, seed=bs)
    code = QF.create_dynamic_map(True)
    q, state = qpeft.quantize_blockwise(x.to(device), blocksize=bs)
    want_q, want_a = ref_quantize_blockwise(x, code, bs)
    assert q.device.type == device.type
    assert torch.equal(q.cpu(), want_q) and torch.equal(state.absmax.cpu(), want_a)
    back = qpeft.dequantize_blockwise(q, state)
    idx = torch.arange(x.numel()) // bs
    assert torch.equal(back.cpu(), (code[want_q.long()] * want_a[idx]).to(dtype))
    q2, s2 = qpeft.quantize_blockwise(x.to(device), blocksize=bs, nested=True)
    assert torch.equal(q2.cpu(), ref_quantize_blockwise(x, code, bs)[0])
    scales = ref_scales(s2)  # code2[q] * absmax2 + offset
    assert torch.equal(qpeft.dequantize_blockwise(q2, s2).cpu(), (code[want_q.long()] * scales[idx]).to(dtype))


# ------------------------------------------------------------- matmul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 16, 21])
@pytest.mark.parametrize("shape,bs,nested", [((96, 256), 64, True), ((40, 4096), 4096, False), ((33, 77), 32, True)])
def test_gemv_4bit_equals_linear_on_the_dequantized_weight(device, dtype, tokens, shape, bs, nested):
    n, k = shape
    w = make_input("normal", shape, torch.float32, seed=n)
    packed, state = qpeft.quantize_4bit(w, blocksize=bs, compress_statistics=nested)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    y = qpeft.gemv_4bit(x.to(device), packed.to(device), copy.deepcopy(state).to(device))
    assert y.device.type == device.type and y.dtype == dtype and y.shape == (tokens, n)
    w32 = ref_dequantize_4bit(packed, _retyped(state, torch.float32))
    if device.type == "cpu" and qpeft.functional.gemv_rounds_weights_to_bf16(dtype, tokens, k, bs):
        w32 = w32.bfloat16().float()  # the AVX512-BF16 path multiplies bf16 weights (see gemv_4bit)
    want = F.linear(x.float(), w32)
    mag = F.linear(x.float().abs(), w32.abs())
    rel = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}[dtype]
    err = (y.cpu().float() - want).abs()
    assert (err <= rel * want.abs() + 1e-5 * mag + 1e-7).all(), err.max()


@pytest.mark.parametrize("tokens", [2, 40])
def test_linear4bit_and_lora_train_on_every_device(device, tokens):
    """Linear4bit + the LoRA autograd function: forward and gradients as on the CPU."""
    torch.manual_seed(0)
    base = torch.nn.Linear(128, 96, bias=True)
    lin = qpeft.Linear4bit.from_linear(base)
    A = (0.1 * torch.randn(4, 128)).requires_grad_()
    B = (0.1 * torch.randn(96, 4)).requires_grad_()
    x = torch.randn(tokens, 128, requires_grad=True)
    results = []
    for dev in ("cpu", device):
        layer = copy.deepcopy(lin).to(dev)
        xi, Ai, Bi = (t.detach().to(dev).requires_grad_() for t in (x, A, B))
        y = qpeft.tuners.lora_linear_4bit(xi, layer, Ai, Bi, 2.0)
        grads = torch.autograd.grad(y.square().sum(), [xi, Ai, Bi])
        assert y.device.type == torch.device(dev).type
        results.append([y.cpu()] + [g.cpu() for g in grads])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # and the plain layer against F.linear on the dequantized weight
    layer = copy.deepcopy(lin).to(device)
    want = F.linear(x.detach(), lin.dequantize().float(), base.bias.detach())
    torch.testing.assert_close(layer(x.detach().to(device)).cpu(), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------- optimizers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay,maximize", [(0.0, False), (0.1, True)])
def test_adamw_step_tracks_torch(device, dtype, weight_decay, maximize):
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(5000, generator=g).to(dtype)
    grads = [torch.randn(5000, generator=g).to(dtype) for _ in range(3)]
    p, m, v = p0.clone().to(device), torch.zeros(5000, device=device), torch.zeros(5000, device=device)
    ref = torch.nn.Parameter(p0.float().clone())
    opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=weight_decay, maximize=maximize, foreach=False)
    for step, gr in enumerate(grads, 1):
        QF.adamw_step(p, gr.to(device), m, v, step=step, lr=1e-2, weight_decay=weight_decay, maximize=maximize)
        ref.grad = gr.float()
        opt.step()
    tol = 1e-6 if dtype == torch.float32 else 2.0**-6
    torch.testing.assert_close(p.cpu().float(), ref.detach().to(dtype).float(), rtol=tol, atol=tol)
    if device.type == "cuda":  # the CPU kernel's bits
        pc, mc, vc = p0.clone(), torch.zeros(5000), torch.zeros(5000)
        for step, gr in enumerate(grads, 1):
            QF.adamw_step(pc, gr, mc, vc, step=step, lr=1e-2, weight_decay=weight_decay, maximize=maximize)
        assert torch.equal(p.cpu(), pc) and torch.equal(m.cpu(), mc) and torch.equal(v.cpu(), vc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw8bit_step_tracks_float32_adamw(device, dtype):
    n = 256 * 40 + 100
    g = torch.Generator().manual_seed(2)
    p0 = torch.randn(n, generator=g).to(dtype)
    grads = [torch.randn(n, generator=g).to(dtype) for _ in range(4)]
    grads[2][5] = float("nan")  # resets element 5's state, keeps its weight
    grads[0][6] = -1e-7  # a negative m far below its block's absmax keeps its sign
    state = [torch.full((n,), 127, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8),
             torch.zeros(41), torch.zeros(41)]
    p = p0.clone().to(device)
    st = [t.clone().to(device) for t in state]
    for step, gr in enumerate(grads, 1):
        QF.adamw8bit_step(p, gr.to(device), *st, step=step, lr=1e-3, weight_decay=0.01)
    ref = torch.nn.Parameter(p0.float().clone())
    opt = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.01, foreach=False)
    for gr in grads:
        ref.grad = torch.nan_to_num(gr.float(), nan=0.0)
        opt.step()
    assert torch.isfinite(p.cpu().float()).all()
    diff = (p.cpu().float() - ref.detach()).abs()
    moved = (ref.detach() - p0.float()).abs()
    assert diff.median() < 0.05 * moved.median() + 2.0**-8, (diff.median(), moved.median())
    if device.type == "cuda":  # the CPU kernel's bits
        pc, stc = p0.clone(), [t.clone() for t in state]
        for step, gr in enumerate(grads, 1):
            QF.adamw8bit_step(pc, gr, *stc, step=step, lr=1e-3, weight_decay=0.01)
        assert torch.equal(p.cpu(), pc)
        for a, b in zip(st, stc):
            assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("cls", [qpeft.optim.AdamW, qpeft.optim.AdamW8bit])
def test_optimizer_classes_keep_their_state_with_the_parameters(device, cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 8)).to(device)
    opt = cls(model.parameters(), lr=1e-3, min_8bit_size=4096) if cls is qpeft.optim.AdamW8bit else cls(model.parameters(), lr=1e-3)
    x = torch.randn(16, 128, device=device)
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    for p in model.parameters():
        for k, t in opt.state[p].items():
            if k != "step":
                assert t.device == p.device, k
    assert all(torch.isfinite(p).all() for p in model.parameters())
    loss = model(x).square().mean().item()
    for _ in range(20):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert model(x).square().mean().item() < loss


# --------------------------------------------------------------- pages


def test_functional_copy_pages_on_every_device(device):
    src = torch.randint(0, 256, (10 * 48,), dtype=torch.uint8).to(device)
    index = torch.tensor([7, 2, 9])
    dst = torch.zeros(3 * 48, dtype=torch.uint8, device=device)
    QF.copy_pages(src, dst, index, 48)
    assert torch.equal(dst.view(3, 48).cpu(), src.view(10, 48).cpu()[index])
    back = torch.zeros_like(src)
    QF.copy_pages(dst, back, index.to(device), 48, gather=False)
    assert torch.equal(back.view(10, 48).cpu()[index], src.view(10, 48).cpu()[index])
    with pytest.raises(ValueError, match=r"page numbers in \[0, 10\)"):
        QF.copy_pages(src, dst, torch.tensor([10]), 48)
    with pytest.raises(ValueError, match="whole number"):
        QF.copy_pages(src, dst, index, 50)
    with pytest.raises(TypeError, match="int64"):
        QF.copy_pages(src, dst, index.int(), 48)



@pytest.mark.gpu
@_CUDA_SKIP
def test_copy_pages_gathers_and_scatters():
    from qpeft import _cuda

    src = torch.randint(0, 256, (10 * 4096,), dtype=torch.uint8, device="cuda")
    index = torch.tensor([7, 2, 9], device="cuda")
    dst = torch.zeros(3 * 4096, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    _cuda.copy_pages(src, dst, index, 4096, gather=True, stream=side)
    side.synchronize()
    assert torch.equal(dst.view(3, 4096), src.view(10, 4096)[index])
    back = torch.zeros_like(src)
    _cuda.copy_pages(dst, back, index, 4096, gather=False)
    assert torch.equal(back.view(10, 4096)[index], src.view(10, 4096)[index])
    odd = torch.zeros(3 * 100, dtype=torch.uint8, device="cuda")  # pages not a multiple of 16 bytes
    _cuda.copy_pages(src[: 10 * 100], odd, index, 100, gather=True)
    assert torch.equal(odd.view(3, 100), src[: 10 * 100].view(10, 100)[index])


@pytest.mark.slow
def test_gpu_check_script_parses_its_arguments():
    """bench/gpu_check.py runs only on a GPU machine; here: it imports and its options parse."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "checked and measured" in r.stdout and "dequant-speed" in r.stdout
    r = subprocess.run([sys.executable, str(script), "--only", "nonsense"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown parts" in r.stderr
    # Its checking code itself, on the CPU against the CPU (a few parts; the rest take minutes here).
    r = subprocess.run([sys.executable, str(script), "--cpu-smoke", "--only", "gemv,optim,pages,matmul-speed"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "PASS  adamw8bit_step" in r.stdout and "FAIL" not in r.stdout
