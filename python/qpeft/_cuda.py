"""CUDA backend: the kernels in ``qpeft/cuda/*.cu``, compiled at run time.

Only :mod:`qpeft.functional` calls this module (it is the one backend
chooser). The sources are compiled with NVRTC through CuPy on first use, for
the architecture of the device at hand; CuPy caches the binaries on disk and
this module keeps the loaded modules per device. Kernels run on
``torch.cuda.current_stream()`` and read and write torch tensors in place
through their ``data_ptr()`` (no copies).

Callers (``qpeft.functional``) have already checked dtypes, block sizes,
shapes and quant types; this module checks what only the GPU side needs
(one device for every tensor, 16-byte alignment for vector loads) and turns
the kernels' error flags into exceptions.

The same source text and compiler options are what the CI compile check
(tests/test_cuda_compile.py) feeds to NVRTC for sm_80 and sm_90:
:func:`kernel_source` and :func:`nvrtc_options`.
"""

from __future__ import annotations

import re
import threading
import weakref
from contextlib import nullcontext as _nullcontext
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

__all__ = [
    "KERNEL_DIR",
    "KERNEL_FILES",
    "GEMV_MAX_TOKENS",
    "kernel_source",
    "nvrtc_options",
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_blockwise",
    "dequantize_blockwise",
    "gemv_4bit",
    "adamw_step",
    "adamw8_step",
    "copy_pages",
]

#: Folder of the CUDA sources (shipped inside the package).
KERNEL_DIR = Path(__file__).with_name("cuda")
#: Every compiled source file; each becomes one module.
KERNEL_FILES = ("nf4.cu", "blockwise8.cu", "gemv4.cu", "adamw.cu", "pages.cu")
#: Up to this many tokens ``linear_4bit`` uses the fused kernel on a GPU;
#: above it, dequantize + ``F.linear`` (tensor cores). The fused kernel
#: computes on CUDA cores and reads x once per row pair, so its advantage
#: shrinks with tokens; bench/gpu_check.py measures 1, 4 and 16.
GEMV_MAX_TOKENS = 4

_INSTALL_HINT = 'pip install "qpeft[cuda]" (CUDA 12) or "qpeft[cuda13]" (CUDA 13)'
_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_]+\.cuh)"\s*$', re.M)
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_THREADS = 256
_GEMV_WARPS, _GEMV_ROWS = 4, 2
_GEMV_TOKEN_KERNELS = (1, 2, 4, 8, 16)


def kernel_source(name: str) -> str:
    """The full text of one kernel file, with its local ``#include "x.cuh"`` lines expanded.

    Expanding here (instead of passing ``-I``) makes the text the whole
    input, so CuPy's on-disk cache, keyed on the text, sees header changes.
    """
    seen: set[str] = set()

    def expand(text: str) -> str:
        def sub(m: re.Match) -> str:
            header = m.group(1)
            if header in seen:  # every header is #pragma once
                return ""
            seen.add(header)
            return expand((KERNEL_DIR / header).read_text())

        return _INCLUDE.sub(sub, text)

    return expand((KERNEL_DIR / name).read_text())


def nvrtc_options(arch: Optional[str] = None) -> tuple[str, ...]:
    """NVRTC options for every kernel; ``arch`` like ``"sm_90"`` adds ``--gpu-architecture``.

    ``--fmad=false`` keeps any multiply-add the code does not spell as an
    FMA from being contracted into one (the kernels write every rounding
    explicitly, this is the safety net); division and square root stay
    IEEE-rounded and denormals are kept, as on the CPU. The C++ dialect is
    NVRTC's default (C++17 since CUDA 12), not named, so that it cannot clash
    with one CuPy adds.
    """
    opts = ["--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true"]
    if arch is not None:
        opts.append(f"--gpu-architecture={arch}")
    return tuple(opts)


# ------------------------------------------------------------- loading

_lock = threading.Lock()
_modules: dict[tuple[int, str], Any] = {}
_kernels: dict[tuple[int, str, str], Any] = {}
_streams: dict[tuple[int, int], Any] = {}
_maps: dict[tuple[int, bool], torch.Tensor] = {}


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise ImportError(f"qpeft's CUDA kernels need CuPy (which compiles them at run time): {_INSTALL_HINT}") from e
    return cupy


def _function(device: torch.device, file: str, name: str):
    """The kernel ``name`` of ``file`` for this device, compiled (and cached) on first use."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, file, name)
    fn = _kernels.get(key)
    if fn is not None:
        return fn, index
    cupy = _cupy()
    with _lock:
        fn = _kernels.get(key)
        if fn is None:
            try:
                with cupy.cuda.Device(index):
                    mod = _modules.get((index, file))
                    if mod is None:
                        mod = _modules[(index, file)] = cupy.RawModule(
                            code=kernel_source(file), options=nvrtc_options(), backend="nvrtc"
                        )
                    # The first kernel taken from a module compiles it.
                    fn = _kernels[key] = mod.get_function(name)
            except Exception as e:  # CuPy's error classes live in different modules across versions
                kind = type(e).__name__
                if kind == "CompileException":
                    raise RuntimeError(f"qpeft could not compile its CUDA kernels ({file}): {e}") from e
                if kind in ("CUDARuntimeError", "CUDADriverError"):
                    raise RuntimeError(
                        f"the CUDA runtime is not usable ({e}); check the driver, or reinstall CuPy: {_INSTALL_HINT}"
                    ) from e
                raise
    return fn, index


def _launch(device: torch.device, file: str, name: str, grid: int, block: int, args: tuple) -> None:
    fn, index = _function(device, file, name)
    cupy = _cupy()
    ptr = torch.cuda.current_stream(device).cuda_stream
    stream = _streams.get((index, ptr))
    if stream is None:
        stream = _streams[(index, ptr)] = cupy.cuda.ExternalStream(ptr, index)
    with cupy.cuda.Device(index), stream:
        fn((int(grid),), (int(block),), args)


def _ptr(t: Optional[torch.Tensor]) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _same_device(device: torch.device, **tensors: Optional[torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the data is on {device}; move it with .to({str(device)!r})")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy of it whose data starts on a 16-byte boundary (vector loads)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _grid(work_items: int, per_block: int) -> int:
    return max(1, -(-work_items // per_block))


def _new_bad(device: torch.device) -> torch.Tensor:
    return torch.full((1,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)


def _raise_if_bad(bad: torch.Tensor) -> None:
    first = int(bad.item())  # synchronizes: quantization is not on a hot path
    if first != torch.iinfo(torch.int64).max:
        raise ValueError(
            f"input contains NaN or infinity (first in the block holding flat element {first}); "
            f"quantization needs finite values: replace them (torch.nan_to_num) or find where they came from"
        )


def _dynamic_map(device: torch.device, signed: bool) -> torch.Tensor:
    from . import _native  # the maps' float32 bits live in one place, rust/src/dynamic_map.rs

    key = (device.index if device.index is not None else torch.cuda.current_device(), signed)
    t = _maps.get(key)
    if t is None:
        t = _maps[key] = torch.tensor(_native.dynamic_map(signed), dtype=torch.float32, device=device)
    return t


# --------------------------------------------------------------- 4-bit


def _scale_args(qs: Any, device: torch.device) -> tuple:
    """A 4-bit state's scales as kernel arguments: absmax, qabsmax, absmax2, code2, offset, bs2."""
    if not qs.nested:
        absmax = _f32(qs.absmax, "absmax", device)
        return (_ptr(absmax), _ptr(None), _ptr(None), _ptr(None), np.float32(0.0), np.int32(1)), (absmax,)
    s2 = qs.state2
    q = qs.absmax.detach().contiguous()
    if q.dtype != torch.uint8:
        raise TypeError(f"a nested state's absmax must be uint8 codes, got {q.dtype}")
    a2 = _f32(s2.absmax, "state2.absmax", device)
    code2 = _f32(s2.code, "state2.code", device)
    _same_device(device, absmax=q)
    off = _offset_value(qs.offset)
    args = (_ptr(None), _ptr(q), _ptr(a2), _ptr(code2), np.float32(off), np.int32(s2.blocksize))
    return args, (q, a2, code2)


_offsets: dict[int, tuple] = {}


def _offset_value(t: Any) -> float:
    """The float of a nested state's offset, remembered per tensor (and its version).

    Reading a CUDA scalar synchronizes the device; a matmul per layer per
    token must not do that, so the value is read once.
    """
    if not torch.is_tensor(t) or t.device.type == "cpu":
        return float(t)
    hit = _offsets.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == (t._version, t.data_ptr()):
        return hit[2]
    value = float(t)
    try:
        ref = weakref.ref(t, lambda _, i=id(t): _offsets.pop(i, None))
    except TypeError:
        return value
    _offsets[id(t)] = (ref, (t._version, t.data_ptr()), value)
    return value


def _f32(t: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    t = t.detach().contiguous()
    _same_device(device, **{name.replace(".", "_"): t})
    return t


def quantize_4bit(x: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes ``((n+1)//2, 1)`` uint8 and float32 scales of a CUDA float tensor (bytes as on the CPU)."""
    device = x.device
    x = _aligned(x.detach())
    n = x.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=device)
    if n:
        bad = _new_bad(device)
        ept = 16 if blocksize == 4096 else 8
        per_block = _THREADS // (blocksize // ept)
        grid = _grid(absmax.numel(), per_block)
        args = (_ptr(x), _ptr(packed), _ptr(absmax), _ptr(bad), np.int64(n), np.int32(blocksize),
                np.int32(quant_type == "fp4"))
        _launch(device, "nf4.cu", f"quantize_4bit_{_SUFFIX[x.dtype]}", grid, _THREADS, args)
        _raise_if_bad(bad)
    return packed, absmax


def dequantize_4bit(packed: torch.Tensor, qs: Any, out: torch.Tensor) -> torch.Tensor:
    """Dequantize contiguous uint8 ``packed`` with state ``qs`` into contiguous CUDA ``out``."""
    device = out.device
    _same_device(device, A=packed)
    packed = _aligned(packed)
    n = out.numel()
    scales, _keep = _scale_args(qs, device)
    target = out if out.data_ptr() % 16 == 0 else torch.empty_like(out)
    if n:
        args = (_ptr(packed), *scales, _ptr(target), np.int64(n), np.int32(qs.blocksize), np.int32(qs.quant_type == "fp4"))
        _launch(device, "nf4.cu", f"dequantize_4bit_{_SUFFIX[out.dtype]}", _grid(-(-n // 32), _THREADS), _THREADS, args)
    if target is not out:
        out.copy_(target)
    return out


def gemv_4bit(x: torch.Tensor, packed: torch.Tensor, qs: Any, n: int, k: int, tokens: int, out: torch.Tensor) -> torch.Tensor:
    """``out[t, :] = x[t, :] @ W.T`` for a 4-bit (n, k) weight; x and out contiguous CUDA tensors."""
    device = x.device
    _same_device(device, B=packed, out=out)
    x = _aligned(x)
    packed = _aligned(packed)
    scales, _keep = _scale_args(qs, device)
    target = out if out.data_ptr() % 16 == 0 else torch.empty_like(out)
    suffix = _SUFFIX[x.dtype]
    tiled = k % 32 == 0
    rows_per_block = _GEMV_WARPS * (_GEMV_ROWS if tiled else 1)
    grid = _grid(n, rows_per_block)
    xf, yf = x.reshape(-1), target.reshape(-1)
    for t0 in range(0, tokens, 16):
        tt = min(16, tokens - t0)
        if tiled:
            tok = next(c for c in _GEMV_TOKEN_KERNELS if c >= tt)
            name = f"gemv4_tiled_{suffix}_t{tok}"
        else:
            name = f"gemv4_generic_{suffix}"
        args = (_ptr(packed), *scales, _ptr(xf[t0 * k:]), _ptr(yf[t0 * n:]), np.int32(tt), np.int64(n), np.int64(k),
                np.int32(qs.blocksize), np.int32(qs.quant_type == "fp4"))
        _launch(device, "gemv4.cu", name, grid, _GEMV_WARPS * 32, args)
    if target is not out:
        out.copy_(target)
    return out


# --------------------------------------------------------------- 8-bit


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes (x's shape) and float32 scales of ``x - offset`` on the 256-entry ``code``."""
    device = x.device
    x = x.detach().contiguous()
    code = _f32(code, "code", device)
    n = x.numel()
    q = torch.empty(x.shape, dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=device)
    if n:
        bad = _new_bad(device)
        group = min(blocksize, _THREADS)
        grid = _grid(absmax.numel(), _THREADS // group)
        args = (_ptr(x), np.float32(offset), _ptr(code), _ptr(q), _ptr(absmax), _ptr(bad), np.int64(n), np.int32(blocksize))
        _launch(device, "blockwise8.cu", f"quantize_blockwise_{_SUFFIX[x.dtype]}", grid, _THREADS, args)
        _raise_if_bad(bad)
    return q, absmax


def dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, offset: float, out: torch.Tensor
) -> torch.Tensor:
    """``out = code[q] * absmax[block] + offset`` (multiply, then add), rounded to out's dtype."""
    device = out.device
    _same_device(device, A=q)
    q = _aligned(q)
    absmax = _f32(absmax, "absmax", device)
    code = _f32(code, "code", device)
    target = out if out.data_ptr() % 16 == 0 else torch.empty_like(out)
    n = q.numel()
    if n:
        args = (_ptr(q), _ptr(absmax), np.float32(offset), _ptr(code), _ptr(target), np.int64(n), np.int32(blocksize))
        _launch(device, "blockwise8.cu", f"dequantize_blockwise_{_SUFFIX[out.dtype]}", _grid(-(-n // 16), _THREADS), _THREADS, args)
    if target is not out:
        out.copy_(target)
    return out


# ----------------------------------------------------------- optimizers


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def adamw_step(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, decay: float, lerp_weight: float,
               beta2: float, one_minus_beta2: float, bc2_sqrt: float, eps: float, step_size: float, maximize: bool) -> None:
    """The float32-state AdamW step of rust/src/adamw.rs on contiguous CUDA tensors, in place."""
    device = p.device
    _same_device(device, grad=g, exp_avg=m, exp_avg_sq=v)
    n = p.numel()
    if not n:
        return
    grid = min(_grid(n, _THREADS), _sm_count(device) * 16)
    f = np.float32
    args = (_ptr(p), _ptr(g), _ptr(m), _ptr(v), np.int64(n), f(decay), f(lerp_weight), f(beta2), f(one_minus_beta2),
            f(bc2_sqrt), f(eps), f(step_size), np.int32(bool(maximize)))
    _launch(device, "adamw.cu", f"adamw32_{_SUFFIX[p.dtype]}", grid, _THREADS, args)


def adamw8_step(p: torch.Tensor, g: torch.Tensor, qm: torch.Tensor, qv: torch.Tensor, absmax_m: torch.Tensor,
                absmax_v: torch.Tensor, *, beta1: float, one_minus_beta1: float, beta2: float, one_minus_beta2: float,
                bc2_sqrt: float, eps: float, decay: float, step_size: float, maximize: bool) -> None:
    """The 8-bit-state AdamW step of rust/src/adamw8.rs on contiguous CUDA tensors, in place."""
    device = p.device
    _same_device(device, grad=g, state1=qm, state2=qv, absmax1=absmax_m, absmax2=absmax_v)
    n = p.numel()
    if not n:
        return
    grid = min(_grid(n, 256), _sm_count(device) * 8)
    f = np.float32
    args = (_ptr(p), _ptr(g), _ptr(qm), _ptr(qv), _ptr(absmax_m), _ptr(absmax_v), _ptr(_dynamic_map(device, True)),
            _ptr(_dynamic_map(device, False)), np.int64(n), f(beta1), f(one_minus_beta1), f(beta2), f(one_minus_beta2),
            f(bc2_sqrt), f(eps), f(decay), f(step_size), np.int32(bool(maximize)))
    _launch(device, "adamw.cu", f"adamw8_{_SUFFIX[p.dtype]}", grid, 256, args)


# ---------------------------------------------------------------- pages


def copy_pages(src: torch.Tensor, dst: torch.Tensor, index: torch.Tensor, page_bytes: int, gather: bool,
               stream: Optional[torch.cuda.Stream] = None) -> None:
    """Move whole pages between two CUDA byte buffers in one launch.

    ``gather``: page i of ``dst`` = page ``index[i]`` of ``src``; otherwise
    page ``index[i]`` of ``dst`` = page i of ``src``. Runs on ``stream``
    (a side stream of a paged optimizer) or the current stream; a CPU
    ``index`` is copied to the device on that same stream. The caller
    (``functional.copy_pages``) has checked sizes and page numbers.
    """
    device = dst.device
    _same_device(device, src=src)
    if index.dtype != torch.int64:
        raise TypeError(f"index must be int64, got {index.dtype}")
    n_pages = index.numel()
    if not n_pages:
        return
    vec = page_bytes % 16 == 0 and src.data_ptr() % 16 == 0 and dst.data_ptr() % 16 == 0
    words = n_pages * (page_bytes // 16 if vec else page_bytes)
    grid = min(_grid(words, _THREADS), _sm_count(device) * 16)
    with torch.cuda.stream(stream) if stream is not None else _nullcontext():
        index = index.to(device).contiguous()
        args = (_ptr(src), _ptr(dst), _ptr(index), np.int64(n_pages), np.int64(page_bytes), np.int32(gather),
                np.int32(vec))
        _launch(device, "pages.cu", "copy_pages", grid, _THREADS, args)
        if index.device.type == "cuda" and stream is not None:
            index.record_stream(stream)  # the copy may outlive this call on the side stream
