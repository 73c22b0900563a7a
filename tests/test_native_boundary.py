"""The Rust boundary (issue 9): qpeft._native called directly with wrong lengths, dtypes, shapes,
non-contiguous, misaligned or aliased arrays raises a Python exception (never touches memory it should
not); a panic inside Rust becomes RuntimeError; kernels called from several threads at once give the
single-thread results."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from qpeft import _native
from qpeft import functional as F

BAD = (ValueError, TypeError)


def f32(n, seed=0):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def code8():
    return np.asarray(_native.dynamic_map(True), dtype=np.float32)


def misaligned_f32(n):
    """A float32 view starting one byte into its buffer (NumPy allows it; a Rust slice may not)."""
    buf = np.zeros(4 * n + 1, dtype=np.uint8)
    a = np.frombuffer(buf.data, dtype=np.float32, count=n, offset=1)
    assert not a.flags["ALIGNED"]
    return a


def read_only(a):
    a.flags.writeable = False
    return a


def _q4(n=256, bs=64):
    packed = np.zeros((n + 1) // 2, np.uint8)
    absmax = np.zeros(-(-n // bs), np.float32)
    _native.quantize_4bit(f32(n), "float32", "nf4", bs, packed, absmax, 1)
    return packed, absmax


# ------------------------------------------------------------ wrong arguments


def quantize_4bit_cases():
    n, bs = 256, 64
    ok = dict(x=f32(n), dtype="float32", quant_type="nf4", blocksize=bs, packed=np.zeros(n // 2, np.uint8),
              absmax=np.zeros(n // bs, np.float32), threads=1)
    yield "ok", ok, None
    yield "short packed", {**ok, "packed": np.zeros(n // 2 - 1, np.uint8)}, ValueError
    yield "long absmax", {**ok, "absmax": np.zeros(n // bs + 1, np.float32)}, ValueError
    yield "bad blocksize", {**ok, "blocksize": 48}, ValueError
    yield "x float64", {**ok, "x": f32(n).astype(np.float64)}, TypeError
    yield "x 2-D", {**ok, "x": f32(n).reshape(16, 16)}, TypeError
    yield "x strided", {**ok, "x": f32(2 * n)[::2]}, ValueError
    yield "x misaligned", {**ok, "x": misaligned_f32(n)}, ValueError
    yield "dtype says bf16, x f32", {**ok, "dtype": "bfloat16"}, TypeError
    yield "dtype unknown", {**ok, "dtype": "float64"}, TypeError
    yield "packed int8", {**ok, "packed": np.zeros(n // 2, np.int8)}, TypeError
    yield "absmax read-only", {**ok, "absmax": read_only(np.zeros(n // bs, np.float32))}, BAD
    yield "quant type", {**ok, "quant_type": "int4"}, ValueError
    yield "isa", {**ok, "isa": "sse9"}, ValueError
    yield "nan", {**ok, "x": np.full(n, np.nan, np.float32)}, ValueError
    yield "a list, not an array", {**ok, "x": [0.0] * n}, TypeError


def dequantize_4bit_cases():
    n, bs = 256, 64
    packed, absmax = _q4(n, bs)
    ok = dict(packed=packed, quant_type="nf4", blocksize=bs, out=np.zeros(n, np.float32), dtype="float32",
              threads=1, absmax=absmax)
    yield "ok", ok, None
    yield "short out", {**ok, "out": np.zeros(n - 2, np.float32)}, ValueError
    yield "short absmax", {**ok, "absmax": absmax[:-1].copy()}, ValueError
    yield "no scales", {k: v for k, v in ok.items() if k != "absmax"}, ValueError
    yield "absmax and nested", {**ok, "qabsmax": np.zeros(n // bs, np.uint8)}, ValueError
    yield "nested, short code", {**{k: v for k, v in ok.items() if k != "absmax"}, "qabsmax": np.zeros(n // bs, np.uint8),
                                 "absmax2": np.ones(1, np.float32), "code2": np.zeros(255, np.float32)}, ValueError
    yield "nested, blocksize2 0", {**{k: v for k, v in ok.items() if k != "absmax"}, "qabsmax": np.zeros(n // bs, np.uint8),
                                   "absmax2": np.ones(1, np.float32), "code2": code8(), "blocksize2": 0}, ValueError
    yield "nested, absmax2 long", {**{k: v for k, v in ok.items() if k != "absmax"},
                                   "qabsmax": np.zeros(n // bs, np.uint8), "absmax2": np.ones(2, np.float32),
                                   "code2": code8()}, ValueError
    yield "out strided", {**ok, "out": np.zeros(2 * n, np.float32)[::2]}, ValueError
    yield "out read-only", {**ok, "out": np.broadcast_to(np.zeros(1, np.float32), (n,))}, BAD
    yield "out misaligned", {**ok, "out": misaligned_f32(n)}, ValueError
    yield "out bits for f32", {**ok, "out": np.zeros(n, np.int16)}, TypeError
    yield "out f32 for bf16", {**ok, "dtype": "bfloat16"}, TypeError
    yield "round_to bf16 (ok)", {**ok, "round_to": "bfloat16"}, None
    yield "round_to f16 (ok)", {**ok, "round_to": "float16"}, None
    yield "round_to float64", {**ok, "round_to": "float64"}, ValueError
    yield "round_to float32", {**ok, "round_to": "float32"}, ValueError
    yield "round_to with a 16-bit out", {**ok, "out": np.zeros(n, np.int16), "dtype": "bfloat16", "round_to": "float16"}, ValueError
    yield "negative blocksize", {**ok, "blocksize": -64}, BAD + (OverflowError,)
    yield "rows into wider rows (ok)", {**ok, "out": np.zeros(2 * 130, np.float32), "cols": 128, "stride": 130}, None
    yield "rows, stride below cols", {**ok, "out": np.zeros(2 * 100, np.float32), "cols": 128, "stride": 100}, ValueError
    yield "rows, cols only", {**ok, "cols": 128}, ValueError
    yield "rows, stride only", {**ok, "stride": 256}, ValueError
    yield "rows, cols not whole blocks", {**ok, "out": np.zeros(4 * 70, np.float32), "cols": 64 + 1, "stride": 70}, ValueError
    yield "rows, cols 0", {**ok, "cols": 0, "stride": 0}, ValueError
    yield "rows, short out", {**ok, "out": np.zeros(2 * 130 - 1, np.float32), "cols": 128, "stride": 130}, ValueError
    yield "rows, negative stride", {**ok, "cols": 128, "stride": -1}, BAD + (OverflowError,)


def gemv_weight_cases():
    """``Gemv4Weight``: the weight checked once at construction."""
    n, k, bs = 8, 64, 64
    packed, absmax = _q4(n * k, bs)
    ok = dict(packed=packed, quant_type="nf4", blocksize=bs, n=n, k=k, absmax=absmax)
    nested = dict(packed=packed, quant_type="nf4", blocksize=bs, n=n, k=k, qabsmax=np.zeros(n * k // bs, np.uint8),
                  absmax2=np.ones(1, np.float32), code2=code8(), offset=0.5, blocksize2=256)
    yield "ok", ok, None
    yield "ok nested", nested, None
    yield "n wrong", {**ok, "n": 9}, ValueError
    yield "k wrong", {**ok, "k": 32}, ValueError
    yield "n*k overflows", {**ok, "n": 2**62, "k": 2**62}, ValueError
    yield "short absmax", {**ok, "absmax": absmax[:-1].copy()}, ValueError
    yield "bad blocksize", {**ok, "blocksize": 48}, ValueError
    yield "bad quant type", {**ok, "quant_type": "int4"}, ValueError
    yield "absmax and nested", {**nested, "absmax": absmax}, ValueError
    yield "nested code 255", {**nested, "code2": code8()[:255].copy()}, ValueError
    yield "nested absmax2 short", {**nested, "absmax2": np.ones(0, np.float32)}, ValueError
    yield "packed strided", {**ok, "packed": np.repeat(packed, 2)[::2]}, ValueError
    yield "absmax misaligned", {**ok, "absmax": misaligned_f32(len(absmax))}, ValueError


def Gemv4Weight(**kwargs):  # noqa: N802 - named for the class whose construction it checks
    return _native.Gemv4Weight(**kwargs)


def gemv_run_cases():
    """``Gemv4Weight.run``: addresses and sizes (Python checks the tensors behind them; Rust what it can)."""
    n, k, bs = 8, 64, 64
    packed, absmax = _q4(n * k, bs)
    w = _native.Gemv4Weight(packed, "nf4", bs, n, k, absmax=absmax)
    x, out = f32(2 * k), np.zeros(2 * n, np.float32)
    buf = np.zeros(8 * k, np.float32)
    ok = dict(x=x.ctypes.data, out=out.ctypes.data, dtype="float32", tokens=2, threads=1)
    yield "ok", w, ok, None
    yield "ok bfloat16", w, {**ok, "dtype": "bfloat16"}, None
    yield "dtype float64", w, {**ok, "dtype": "float64"}, TypeError
    yield "null input", w, {**ok, "x": 0}, ValueError
    yield "misaligned output", w, {**ok, "out": out.ctypes.data + 1}, ValueError
    yield "input and output overlap", w, {**ok, "x": buf.ctypes.data, "out": buf.ctypes.data + 4 * k}, ValueError
    yield "tokens overflow", w, {**ok, "tokens": 2**62}, ValueError
    yield "buffer past the address space", w, {**ok, "tokens": 2**57}, ValueError
    yield "address at the end of the address space", w, {**ok, "x": 2**64 - 64}, ValueError
    yield "bad isa", w, {**ok, "isa": "sse"}, ValueError
    yield "negative address", w, {**ok, "x": -8}, BAD + (OverflowError,)
    # Keep the arrays alive for as long as the addresses are used.
    gemv_run_cases.keep = (x, out, buf)


def blockwise_cases():
    n, bs = 512, 256
    ok = dict(x=f32(n), dtype="float32", code=code8(), blocksize=bs, out=np.zeros(n, np.uint8),
              absmax=np.zeros(n // bs, np.float32), threads=1)
    yield "ok", ok, None
    yield "code 255", {**ok, "code": code8()[:255].copy()}, ValueError
    yield "code unsorted", {**ok, "code": code8()[::-1].copy()}, ValueError
    yield "code nan", {**ok, "code": np.where(np.arange(256) == 3, np.nan, code8()).astype(np.float32)}, ValueError
    yield "short out", {**ok, "out": np.zeros(n - 1, np.uint8)}, ValueError
    yield "bad blocksize", {**ok, "blocksize": 100}, ValueError
    yield "offset nan", {**ok, "offset": float("nan")}, ValueError
    yield "out and absmax the same buffer", {**ok, "out": (b := np.zeros(n, np.uint8)),
                                             "absmax": b.view(np.float32)[:n // bs]}, BAD


def dequantize_blockwise_cases():
    n, bs = 512, 256
    ok = dict(q=np.zeros(n, np.uint8), absmax=np.ones(n // bs, np.float32), code=code8(), blocksize=bs,
              out=np.zeros(n, np.float32), dtype="float32", threads=1)
    yield "ok", ok, None
    yield "short absmax", {**ok, "absmax": np.ones(1, np.float32)}, ValueError
    yield "long out", {**ok, "out": np.zeros(n + 1, np.float32)}, ValueError
    yield "code list short", {**ok, "code": code8()[:10].copy()}, ValueError


def adamw_cases():
    n = 300
    hyper = dict(decay=1.0, lerp_weight=0.1, beta2=0.999, one_minus_beta2=0.001, bc2_sqrt=0.03, eps=1e-8,
                 step_size=-1e-3, maximize=False, threads=1)
    ok = dict(p=f32(n), g=f32(n, 1), m=np.zeros(n, np.float32), v=np.zeros(n, np.float32), dtype="float32", **hyper)
    yield "ok", ok, None
    yield "short grad", {**ok, "g": f32(n - 1)}, ValueError
    yield "short v", {**ok, "v": np.zeros(n - 1, np.float32)}, ValueError
    yield "m is v", {**ok, "v": ok["m"]}, BAD
    yield "p is m", {**ok, "p": ok["m"]}, BAD
    yield "float16 params", {**ok, "dtype": "float16"}, TypeError
    yield "bf16 bits with f32 grad", {**ok, "p": np.zeros(n, np.int16), "dtype": "bfloat16"}, TypeError
    yield "m strided", {**ok, "m": np.zeros(2 * n, np.float32)[::2]}, ValueError
    yield "m float64", {**ok, "m": np.zeros(n, np.float64)}, TypeError


def adamw8_cases():
    n = 600
    hyper = dict(beta1=0.9, one_minus_beta1=0.1, beta2=0.999, one_minus_beta2=0.001, bc2_sqrt=0.03, eps=1e-8,
                 decay=1.0, step_size=-1e-3, maximize=False, threads=1)
    blocks = -(-n // 256)
    ok = dict(p=f32(n), g=f32(n, 1), qm=np.full(n, 127, np.uint8), qv=np.zeros(n, np.uint8),
              absmax_m=np.zeros(blocks, np.float32), absmax_v=np.zeros(blocks, np.float32), dtype="float32", **hyper)
    yield "ok", ok, None
    yield "short qv", {**ok, "qv": np.zeros(n - 1, np.uint8)}, ValueError
    yield "absmax_m one block short", {**ok, "absmax_m": np.zeros(blocks - 1, np.float32)}, ValueError
    yield "qm is qv", {**ok, "qv": ok["qm"]}, BAD
    yield "qm int8", {**ok, "qm": np.zeros(n, np.int8)}, TypeError


def swiglu_forward_cases():
    n = 300
    ok = dict(gate=f32(n), up=f32(n, 1), out=np.zeros(n, np.float32), dtype="float32", threads=1)
    yield "ok", ok, None
    yield "short up", {**ok, "up": f32(n - 1)}, ValueError
    yield "long out", {**ok, "out": np.zeros(n + 1, np.float32)}, ValueError
    yield "out is gate", {**ok, "out": ok["gate"]}, BAD
    yield "gate strided", {**ok, "gate": f32(2 * n)[::2]}, ValueError
    yield "gate misaligned", {**ok, "gate": misaligned_f32(n)}, ValueError
    yield "bf16 bits with f32 out", {**ok, "gate": np.zeros(n, np.int16), "up": np.zeros(n, np.int16),
                                     "dtype": "bfloat16"}, TypeError
    yield "dtype unknown", {**ok, "dtype": "float64"}, TypeError
    yield "isa", {**ok, "isa": "sse9"}, ValueError


def swiglu_backward_cases():
    n = 300
    ok = dict(gate=f32(n), up=f32(n, 1), grad=f32(n, 2), d_gate=np.zeros(n, np.float32),
              d_up=np.zeros(n, np.float32), dtype="float32", threads=1)
    yield "ok", ok, None
    yield "short grad", {**ok, "grad": f32(n - 1)}, ValueError
    yield "short d_up", {**ok, "d_up": np.zeros(n - 1, np.float32)}, ValueError
    yield "d_gate is d_up", {**ok, "d_up": ok["d_gate"]}, BAD
    yield "d_up read-only", {**ok, "d_up": read_only(np.zeros(n, np.float32))}, BAD
    yield "grad float64", {**ok, "grad": f32(n).astype(np.float64)}, TypeError


def lora_up_add_cases():
    tokens, n, r = 5, 24, 3
    ok = dict(y=f32(tokens * n), h=f32(tokens * r, 1), bt=f32(r * n, 2), rank=r, scale=2.0, dtype="float32",
              threads=1)
    yield "ok", ok, None
    yield "rank 0", {**ok, "rank": 0}, ValueError
    yield "h not a multiple of the rank", {**ok, "h": f32(tokens * r - 1)}, ValueError
    yield "y one short", {**ok, "y": f32(tokens * n - 1)}, ValueError
    yield "y is h", {**ok, "y": ok["h"], "bt": f32(r * r, 2)}, BAD
    yield "y read-only", {**ok, "y": read_only(f32(tokens * n))}, BAD
    yield "y strided", {**ok, "y": f32(2 * tokens * n)[::2]}, ValueError
    yield "bt misaligned", {**ok, "bt": misaligned_f32(r * n)}, ValueError
    yield "h float64", {**ok, "h": f32(tokens * r).astype(np.float64)}, TypeError
    yield "bf16 bits declared float32", {**ok, "y": np.zeros(tokens * n, np.int16)}, TypeError
    yield "dtype unknown", {**ok, "dtype": "float64"}, TypeError
    yield "negative threads", {**ok, "threads": -1}, OverflowError
    yield "ok, B as rows", {**ok, "b_rows": True}, None
    yield "B as rows, y one short", {**ok, "b_rows": True, "y": f32(tokens * n - 1)}, ValueError
    yield "B as rows, rank 0", {**ok, "b_rows": True, "rank": 0}, ValueError


def rmsnorm_backward_cases():
    rows, d = 5, 24
    ok = dict(x=f32(rows * d), scale=np.ones(rows, np.float32), weight=np.ones(d, np.float32),
              grad=f32(rows * d, 1), out=np.zeros(rows * d, np.float32), dtype="float32", threads=1)
    yield "ok", ok, None
    yield "one scale too many", {**ok, "scale": np.ones(rows + 1, np.float32)}, ValueError
    yield "weight of another width", {**ok, "weight": np.ones(d - 1, np.float32)}, ValueError
    yield "empty weight", {**ok, "weight": np.ones(0, np.float32)}, ValueError
    yield "out is x", {**ok, "out": ok["x"]}, BAD
    yield "scale float64", {**ok, "scale": np.ones(rows, np.float64)}, TypeError
    yield "x 2-D", {**ok, "x": f32(rows * d).reshape(rows, d)}, TypeError


def cross_entropy_grad_cases():
    rows, vocab = 4, 30
    ok = dict(logits=f32(rows * vocab), vocab=vocab, targets=np.array([0, 29, -100, 3], np.int64), ignore_index=-100,
              grad=np.zeros(rows * vocab, np.float32), lse=np.zeros(rows, np.float32),
              loss=np.zeros(rows, np.float32), dtype="float32", threads=1)
    yield "ok", ok, None
    yield "target past the vocabulary", {**ok, "targets": np.array([0, 30, -100, 3], np.int64)}, ValueError
    yield "negative target", {**ok, "targets": np.array([0, -1, -100, 3], np.int64)}, ValueError
    yield "one target too many", {**ok, "targets": np.zeros(rows + 1, np.int64)}, ValueError
    yield "vocab 0", {**ok, "vocab": 0}, ValueError
    yield "short grad", {**ok, "grad": np.zeros(rows * vocab - 1, np.float32)}, ValueError
    yield "short lse", {**ok, "lse": np.zeros(rows - 1, np.float32)}, ValueError
    yield "grad is logits", {**ok, "grad": ok["logits"]}, BAD
    yield "lse is loss", {**ok, "loss": ok["lse"]}, BAD
    yield "targets int32", {**ok, "targets": np.zeros(rows, np.int32)}, TypeError
    yield "logits strided", {**ok, "logits": f32(2 * rows * vocab)[::2]}, ValueError
    yield "dtype unknown", {**ok, "dtype": "float64"}, TypeError



def causal_softmax_grad_cases():
    keys, blocks, d = 6, 2, 4
    rows = keys * blocks
    ok = dict(scores=f32(rows * keys), dp=f32(rows * keys, 1), lse=np.zeros(rows, np.float32), out=f32(rows * d, 2),
              d_out=f32(rows * d, 3), keys=keys, head_dim=d, scale=0.5, dtype="float32", threads=2)
    yield "ok", ok, None
    yield "rows not whole blocks", {**ok, "lse": np.zeros(rows - 1, np.float32)}, ValueError
    yield "keys 0", {**ok, "keys": 0}, ValueError
    yield "head_dim 0", {**ok, "head_dim": 0}, ValueError
    yield "short dp", {**ok, "dp": f32(rows * keys - 1)}, ValueError
    yield "short scores", {**ok, "scores": f32(rows * keys + 1)}, ValueError
    yield "short out", {**ok, "out": f32(rows * d - 1)}, ValueError
    yield "dp is scores", {**ok, "dp": ok["scores"]}, BAD
    yield "scores strided", {**ok, "scores": f32(2 * rows * keys)[::2]}, ValueError
    yield "scores read-only", {**ok, "scores": read_only(f32(rows * keys))}, BAD
    yield "dtype unknown", {**ok, "dtype": "float64"}, TypeError

def causal_softmax_cases():
    keys, blocks = 6, 2
    rows = keys * blocks
    ok = dict(scores=f32(rows * keys), lse=np.zeros(rows, np.float32), keys=keys, scale=0.5, dtype="float32", threads=2)
    yield "ok", ok, None
    yield "rows not whole blocks", {**ok, "lse": np.zeros(rows - 1, np.float32)}, ValueError
    yield "keys 0", {**ok, "keys": 0}, ValueError
    yield "short scores", {**ok, "scores": f32(rows * keys - 1)}, ValueError
    yield "lse is scores", {**ok, "lse": ok["scores"][:rows]}, BAD
    yield "scores strided", {**ok, "scores": f32(2 * rows * keys)[::2]}, ValueError
    yield "scores read-only", {**ok, "scores": read_only(f32(rows * keys))}, BAD
    yield "lse read-only", {**ok, "lse": read_only(np.zeros(rows, np.float32))}, BAD
    yield "lse float64", {**ok, "lse": np.zeros(rows, np.float64)}, TypeError
    yield "dtype unknown", {**ok, "dtype": "float64"}, TypeError


CASES = [
    (fn, name, kwargs, exc)
    for fn, gen in [
        (_native.quantize_4bit, quantize_4bit_cases),
        (_native.dequantize_4bit, dequantize_4bit_cases),
        (Gemv4Weight, gemv_weight_cases),
        (_native.quantize_blockwise, blockwise_cases),
        (_native.dequantize_blockwise, dequantize_blockwise_cases),
        (_native.adamw_step, adamw_cases),
        (_native.adamw8_step, adamw8_cases),
        (_native.swiglu_forward, swiglu_forward_cases),
        (_native.swiglu_backward, swiglu_backward_cases),
        (_native.lora_up_add, lora_up_add_cases),
        (_native.rmsnorm_backward, rmsnorm_backward_cases),
        (_native.cross_entropy_grad, cross_entropy_grad_cases),
        (_native.causal_softmax_grad, causal_softmax_grad_cases),
        (_native.causal_softmax, causal_softmax_cases),
    ]
    for name, kwargs, exc in gen()
]


@pytest.mark.parametrize("fn,name,kwargs,exc", CASES, ids=[f"{c[0].__name__}-{c[1]}" for c in CASES])
def test_native_rejects_bad_arguments(fn, name, kwargs, exc):
    if exc is None:
        fn(**kwargs)  # the well-formed call each bad one is a variation of
        return
    with pytest.raises(exc) as info:
        fn(**kwargs)
    assert str(info.value), "the exception must say what was wrong"


RUN_CASES = list(gemv_run_cases())


@pytest.mark.parametrize("w,kwargs,exc", [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_gemv_run_rejects_bad_arguments(w, kwargs, exc):
    if exc is None:
        w.run(**kwargs)
        return
    with pytest.raises(exc) as info:
        w.run(**kwargs)
    assert str(info.value), "the exception must say what was wrong"


ADAMW_SCALARS = [1.0, 0.1, 0.999, 0.001, 0.03, 1e-8, -1e-3]


def paged_cases():
    """The paged optimizer's state object (rust/src/paged_adamw.rs): every method with bad arguments."""
    def fresh():
        s = _native.PagedState(4096, 1 << 20)
        return s, s.add_param(1000, "f32"), s.add_param(1000, "q8")

    def item(pid, n=1000, g=1000, kind="adamw", scalars=ADAMW_SCALARS):
        return (pid, np.zeros(n, np.float32), np.zeros(g, np.float32), "float32", kind, scalars, False)

    z = lambda n, t=np.float32: np.zeros(n, t)  # noqa: E731
    yield "page size 0", lambda: _native.PagedState(0, 1 << 20)
    yield "page size not a multiple of 4096", lambda: _native.PagedState(1001, 1 << 20)
    yield "resident smaller than a page", lambda: _native.PagedState(4096, 0)
    yield "unknown kind", lambda: fresh()[0].add_param(10, "f16")
    yield "transfer, short m", lambda: (lambda s, f, q: s.transfer_f32(f, z(999), z(1000), True))(*fresh())
    yield "transfer, unknown id", lambda: (lambda s, f, q: s.transfer_f32(99, z(1000), z(1000), True))(*fresh())
    yield "transfer, f32 into q8", lambda: (lambda s, f, q: s.transfer_f32(q, z(1000), z(1000), True))(*fresh())
    yield "transfer, short absmax", lambda: (lambda s, f, q: s.transfer_q8(
        q, z(1000, np.uint8), z(1000, np.uint8), z(1), z(4), True))(*fresh())
    yield "step, short grad", lambda: (lambda s, f, q: s.step([item(f, g=999)], 1))(*fresh())
    yield "step, unknown id", lambda: (lambda s, f, q: s.step([item(77)], 1))(*fresh())
    yield "step, adamw scalars for q8", lambda: (lambda s, f, q: s.step([item(q)], 1))(*fresh())
    yield "step, scalars short", lambda: (lambda s, f, q: s.step([item(f, scalars=[1.0])], 1))(*fresh())
    yield "step, same arrays twice", lambda: (lambda s, f, q: s.step([item(f)] * 2, 1))(*fresh())

    def closed():
        s, f, _ = fresh()
        s.close()
        s.add_param(10, "f32")

    yield "closed", closed


@pytest.mark.parametrize("name,call", list(paged_cases()), ids=[c[0] for c in paged_cases()])
def test_paged_state_rejects_bad_arguments(name, call):
    with pytest.raises(BAD) as info:
        call()
    assert str(info.value)


@pytest.mark.parametrize("probe", [_native.cpu_isa, _native.cpu_has_bf16_dot], ids=lambda f: f.__name__)
def test_cpu_probes_take_no_arguments_and_answer_consistently(probe):
    with pytest.raises(TypeError):
        probe(1)
    assert probe() == probe()
    if probe is _native.cpu_has_bf16_dot and probe():
        # vdpbf16ps is an AVX-512 instruction: a CPU that has it reports avx512.
        assert _native.cpu_isa() == "avx512"


def test_every_native_function_is_covered():
    """A new binding must get its row of bad-argument cases above."""
    exported = {n for n in dir(_native) if callable(getattr(_native, n)) and not n.startswith("__")}
    covered = {c[0].__name__ for c in CASES} | {"cpu_isa", "cpu_has_bf16_dot", "code_4bit", "dynamic_map",
                                                 "_panic_for_test", "PagedState"}
    assert exported <= covered, f"no boundary cases for {sorted(exported - covered)}"


def test_small_bindings_reject_bad_names():
    with pytest.raises(ValueError, match="nf4"):
        _native.code_4bit("int4")
    assert len(_native.dynamic_map(False)) == 256


# ------------------------------------------------------------ panics


@pytest.mark.parametrize("threads", [1, 3])
def test_panic_in_rust_is_a_python_runtime_error(threads):
    """On the calling thread or on a pool worker, a panic comes back as RuntimeError, and the kernels
    (and that thread pool) keep working afterwards."""
    with pytest.raises(RuntimeError, match="internal error in qpeft's native kernel.*deliberate test panic"):
        _native._panic_for_test("deliberate test panic", threads)
    x = torch.randn(4096)
    q, st = F.quantize_4bit(x, blocksize=64)
    y = torch.empty(4096)
    packed, absmax = q.view(-1).numpy(), st.absmax.numpy()
    _native.dequantize_4bit(packed, "nf4", 64, y.numpy(), "float32", threads, absmax=absmax)
    torch.testing.assert_close(y, F.dequantize_4bit(q, st), rtol=0, atol=0)


# ------------------------------------------------------------ threads


def _workloads():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(96, 256, generator=g)
    qw, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True)
    x = torch.randn(3, 256, generator=g)
    p0 = torch.randn(5000, generator=g)
    grad = torch.randn(5000, generator=g)

    def quantize():
        q, s = F.quantize_4bit(w, blocksize=64, compress_statistics=True)
        return [q, s.absmax, s.state2.absmax]

    def dequantize():
        return [F.dequantize_4bit(qw, qs)]

    def gemv():
        return [F.gemv_4bit(x, qw, qs)]

    def adamw():
        p, m, v = p0.clone(), torch.zeros(5000), torch.zeros(5000)
        for step in range(1, 4):
            F.adamw_step(p, grad, m, v, step=step, lr=1e-2, weight_decay=0.01)
        return [p, m, v]

    def adamw8():
        p, m, v = p0.clone(), torch.full((5000,), 127, dtype=torch.uint8), torch.zeros(5000, dtype=torch.uint8)
        a1, a2 = torch.zeros(20), torch.zeros(20)
        for step in range(1, 4):
            F.adamw8bit_step(p, grad, m, v, a1, a2, step=step, lr=1e-2)
        return [p, m, v, a1, a2]

    return {"quantize": quantize, "dequantize": dequantize, "gemv": gemv, "adamw": adamw, "adamw8": adamw8}


def test_kernels_from_many_python_threads_match_single_thread():
    work = _workloads()
    expected = {name: fn() for name, fn in work.items()}
    results: dict[tuple[int, str, int], list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def worker(tid: int):
        try:
            start.wait()
            names = list(work)
            for rep in range(6):
                # Each thread runs the kernels in its own order, so different kernels overlap.
                for name in names[tid % len(names):] + names[:tid % len(names)]:
                    results[(tid, name, rep)] = work[name]()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a kernel call hung"
    assert not errors, errors
    assert len(results) == 6 * 6 * len(work)
    for (tid, name, rep), got in results.items():
        for a, b in zip(got, expected[name]):
            assert torch.equal(a, b), f"{name} in thread {tid} (repeat {rep}) differs from the single-thread result"


def test_kernels_release_the_gil():
    """While one thread is inside a long kernel call, another runs Python code: the GIL is released.
    (With the GIL held, no Python line of the main thread could run in the middle of the call.)"""
    import time

    tokens, n, k = 256, 2048, 2048
    packed, absmax = _q4(n * k, 64)
    x, out = f32(tokens * k), np.empty(tokens * n, np.float32)
    window: list[float] = []

    w = _native.Gemv4Weight(packed, "nf4", 64, n, k, absmax=absmax)

    def call():
        window.append(time.perf_counter())
        w.run(x.ctypes.data, out.ctypes.data, "float32", tokens, 1)
        window.append(time.perf_counter())

    ticks = []
    t = threading.Thread(target=call)
    t.start()
    while t.is_alive():
        ticks.append(time.perf_counter())
    t.join()
    start, end = window
    middle = [x for x in ticks if start + 0.25 * (end - start) <= x <= start + 0.75 * (end - start)]
    assert middle, f"the main thread never ran during the {1e3 * (end - start):.0f} ms native call"
