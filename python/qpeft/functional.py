"""Quantization primitives: blockwise NF4/FP4 and 8-bit, with bitsandbytes' layout.

This is the only module that knows which backend runs an operation: CPU
tensors go to the Rust kernels in :mod:`qpeft._native`, CUDA tensors to the
kernels of :mod:`qpeft._cuda` (compiled at run time; ``pip install
"qpeft[cuda]"``), which give the same quantization bytes. Everything else
in qpeft calls these functions.

Formats (see FORMATS.md in the design notes) are byte-compatible with
bitsandbytes: a tensor quantized here dequantizes with bitsandbytes and the
other way round, and :class:`QuantState` reads and writes bitsandbytes'
state-dict keys.

Decisions worth knowing:

* NF4 bytes equal bitsandbytes' CPU path; FP4 bytes and the 8-bit codes of
  double-quantized scales follow its CUDA kernels.
* An all-zero block stores absmax 0 and encodes every element as the code of
  0.0 (NF4 ``0x77`` like bitsandbytes' CPU path, FP4 ``0x00``); bitsandbytes'
  CUDA path writes ``0x00`` for NF4. Both dequantize to zeros.
* A NaN or infinity in a tensor to quantize raises ``ValueError`` (naming the
  first bad block): a 4-bit code cannot represent it, and silently encoding
  it would corrupt the whole block.
* Non-contiguous inputs are copied once (row-major order of their shape);
  ``out=`` tensors must be contiguous.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from typing import Any, Mapping, Optional

import torch

from . import _cuda, _native
from ._scratch import scratch

__all__ = [
    "BLOCK_SIZES",
    "QUANT_TYPES",
    "QuantState",
    "create_dynamic_map",
    "get_4bit_type",
    "quantize_4bit",
    "dequantize_4bit",
    "gemv_4bit",
    "linear_4bit",
    "grad_input_4bit",
    "lora_matmul",
    "lora_matmul_4bit",
    "linear_4bit_lora",
    "lora_up_add_",
    "dense_matmul_dtype",
    "WIDEN_16BIT_ON_CPU",
    "GEMV_MAX_TOKENS",
    "swiglu",
    "swiglu_backward",
    "rmsnorm_backward",
    "causal_softmax",
    "causal_softmax_grad",
    "cross_entropy_grad",
    "quantize_blockwise",
    "dequantize_blockwise",
    "cpu_isa",
    "gemv_rounds_weights_to_bf16",
    "OPTIM_BLOCKSIZE",
    "adamw_step",
    "adamw8bit_step",
    "paged_state",
    "paged_adamw_step",
    "paged_state_read",
    "paged_state_write",
    "copy_pages",
]

#: Block sizes accepted for 4-bit quantization (as bitsandbytes >= 0.50).
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: 4-bit data types.
QUANT_TYPES = ("nf4", "fp4")
#: Block size of the second-level quantization of 4-bit scales.
NESTED_BLOCKSIZE = 256
#: Up to this many tokens, :func:`linear_4bit` uses the fused :func:`gemv_4bit`
#: kernel for bfloat16 input on a CPU with AVX512-BF16 (see
#: :func:`gemv_rounds_weights_to_bf16`); above it, dequantize (into a reused
#: buffer) + ``F.linear``. Elsewhere the limit is 16 tokens (or this, if
#: lower; 0 turns the fused kernel off). Measured on a 2-core Zen 4, weights
#: streamed from memory, 576x576 to 4096x4096 (``bench/gemv.py`` finds the
#: crossover): at 64 tokens the bfloat16 kernel took 0.72-0.96x the time of
#: the dense path, and the crossover lay at 64-96 tokens. The float32 kernel
#: also wins to 96-128 tokens, but float32 keeps 16: past a few tokens its
#: sums (in another order than the dense matmul's) would stop matching
#: transformers and PEFT to the 1e-5 that float32 comparisons hold them to.
GEMV_MAX_TOKENS = 64

#: The limit of :data:`GEMV_MAX_TOKENS` for other dtypes and CPUs.
_GEMV_MAX_TOKENS_ELSEWHERE = 16

_wide_gemv: Optional[bool] = None


def _gemv_max_tokens(x: torch.Tensor) -> int:
    """Most tokens of ``x`` for which :func:`linear_4bit` takes the fused kernel."""
    if x.is_cpu:
        return _cpu_gemv_max_tokens(x.dtype)
    return _cuda.GEMV_MAX_TOKENS if x.device.type == "cuda" else -1


def _cpu_gemv_max_tokens(dtype: torch.dtype) -> int:
    """:func:`_gemv_max_tokens` for a CPU tensor of ``dtype``."""
    global _wide_gemv
    if dtype == torch.bfloat16:
        if _wide_gemv is None:
            _wide_gemv = _native.cpu_has_bf16_dot()  # true only on the AVX-512 path
        if _wide_gemv:
            return GEMV_MAX_TOKENS
    return min(GEMV_MAX_TOKENS, _GEMV_MAX_TOKENS_ELSEWHERE)


_CPU = torch.device("cpu")
_FLOAT_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPE_BY_NAME = {v: k for k, v in _FLOAT_DTYPES.items()}


def cpu_isa() -> str:
    """The SIMD instruction set the CPU kernels use here ('avx512', 'avx2', 'neon' or 'scalar')."""
    return _native.cpu_isa()


def _threads() -> int:
    return max(1, torch.get_num_threads())


def create_dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map: 256 ascending float32 values in [-1, 1] ([0, 1] unsigned)."""
    return torch.tensor(_native.dynamic_map(bool(signed)), dtype=torch.float32)


def get_4bit_type(quant_type: str = "nf4", device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 float32 values of a 4-bit code book, indexed by code."""
    _check_quant_type(quant_type)
    return torch.tensor(_native.code_4bit(quant_type), dtype=torch.float32, device=device)


# ------------------------------------------------------------------ checks


def _check_tensor(name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_float(name: str, t: torch.Tensor) -> str:
    dtype = _FLOAT_DTYPES.get(t.dtype)
    if dtype is None:
        raise TypeError(
            f"{name} has dtype {t.dtype}; qpeft quantizes float32, float16 and bfloat16 tensors "
            f"(convert with {name}.float())"
        )
    return dtype


def _check_cpu(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cpu":
        raise ValueError(
            f"{name} is on {t.device}, but qpeft has kernels for CPU and CUDA tensors only; "
            f"move it with {name}.cpu() or {name}.cuda()"
        )


def _on_cuda(name: str, t: torch.Tensor) -> bool:
    """The backend choice: True for a CUDA tensor (qpeft._cuda), False for a CPU one (Rust)."""
    if t.is_cuda:
        return True
    if not t.is_cpu:
        _check_cpu(name, t)
    return False


def _check_blocksize(blocksize: int) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCK_SIZES:
        raise ValueError(f"blocksize must be one of {BLOCK_SIZES}, got {blocksize!r}")
    return blocksize


def _check_blocksize8(blocksize: int) -> int:
    ok = isinstance(blocksize, int) and not isinstance(blocksize, bool)
    if not ok or blocksize < 16 or blocksize > 65536 or blocksize & (blocksize - 1):
        raise ValueError(f"8-bit blocksize must be a power of two from 16 to 65536, got {blocksize!r}")
    return blocksize


def _check_quant_type(quant_type: str) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return quant_type


def _check_out(out: torch.Tensor, numel: int, dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    _check_tensor("out", out)
    if out.device != device:
        raise ValueError(f"out is on {out.device} but the result is computed on {device}")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype}, expected {dtype}")
    if out.numel() != numel:
        raise ValueError(f"out has {out.numel()} elements, expected {numel}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (it is written in place)")
    return out


def _flat_view(t: torch.Tensor):
    """A zero-copy NumPy view of a contiguous CPU tensor, 16-bit floats as int16 bits."""
    t = t.detach().reshape(-1)
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return t.numpy()


# -------------------------------------------------------------- QuantState


class QuantState:
    """Everything needed to dequantize a blockwise-quantized tensor.

    Attribute names match ``bitsandbytes.functional.QuantState`` so either
    object can be passed where the other is expected.

    Attributes:
        absmax: float32 block scales, or uint8 codes of them when nested.
        shape: shape of the original tensor.
        code: the code book (16 values for 4-bit, 256 for 8-bit).
        blocksize: elements per block.
        quant_type: ``"nf4"``/``"fp4"`` for 4-bit states, ``None`` for 8-bit.
        dtype: dtype of the original tensor (and of dequantized output).
        offset: float32 scalar tensor subtracted before nested quantization.
        state2: the nested state (float32 scales of the uint8 ``absmax``).
    """

    _TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
    _JSON_KEYS = (
        "quant_type",
        "blocksize",
        "dtype",
        "shape",
        "nested_blocksize",
        "nested_dtype",
        "nested_offset",
    )

    def __init__(
        self,
        absmax: torch.Tensor,
        shape: Optional[torch.Size | tuple[int, ...]] = None,
        code: Optional[torch.Tensor] = None,
        blocksize: Optional[int] = None,
        quant_type: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        offset: Optional[torch.Tensor] = None,
        state2: Optional["QuantState"] = None,
    ) -> None:
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.dtype = dtype
        self.offset = offset
        self.state2 = state2

    @property
    def nested(self) -> bool:
        """True when the block scales are themselves 8-bit quantized."""
        return self.state2 is not None

    def __repr__(self) -> str:
        return (
            f"QuantState(quant_type={self.quant_type!r}, shape={tuple(self.shape) if self.shape else None}, "
            f"dtype={self.dtype}, blocksize={self.blocksize}, nested={self.nested})"
        )

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as bitsandbytes serializes it.

        With ``packed=True`` the result holds only tensors (fit for safetensors):
        ``absmax``, ``quant_map`` and, when nested, ``nested_absmax`` and
        ``nested_quant_map``, plus ``quant_state.bitsandbytes__<quant_type>``,
        the UTF-8 bytes of a JSON object with the non-tensor fields.
        """
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            d.update(
                nested_absmax=self.state2.absmax,
                nested_blocksize=self.state2.blocksize,
                # A separate copy: safetensors refuses tensors that share memory.
                nested_quant_map=self.state2.code.clone(),
                nested_dtype=_dtype_name(self.state2.dtype),
                nested_offset=float(self.offset.item() if torch.is_tensor(self.offset) else self.offset),
            )
        if not packed or self.quant_type is None:
            return d
        tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        fields = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        blob = json.dumps(fields).encode("utf-8")
        tensors[f"quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: Mapping[str, Any], device: torch.device | str = "cpu") -> "QuantState":
        """Rebuild a 4-bit state from :meth:`as_dict` output or a bitsandbytes state dict.

        Keys may carry a prefix (``"weight.absmax"``); packed and unpacked forms
        are accepted. Raises ``ValueError`` naming what is missing or malformed.
        """
        d = dict(qs_dict)
        packed_keys = [k for k, v in d.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if packed_keys:
            if len(packed_keys) != 1 or packed_keys[0].split(".")[-1] not in (
                "bitsandbytes__nf4",
                "bitsandbytes__fp4",
            ):
                raise ValueError(
                    "expected exactly one 'quant_state.bitsandbytes__nf4' or '...__fp4' entry, "
                    f"found {packed_keys}"
                )
            d.update(_unpack_json(d.pop(packed_keys[0])))
        d = {k.split(".")[-1]: v for k, v in d.items()}
        unknown = set(d) - set(cls._TENSOR_KEYS) - set(cls._JSON_KEYS)
        if unknown:
            raise ValueError(f"unexpected quantization state keys: {sorted(unknown)}")
        required = ["quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"quantization state is missing {missing}")
        quant_type = _check_quant_type(d["quant_type"])
        blocksize = _check_blocksize(d["blocksize"])
        dtype = _dtype_from_name(d["dtype"], "dtype")
        shape = d["shape"]
        if not isinstance(shape, (list, tuple)) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise ValueError(f"shape must be a list of non-negative integers, got {shape!r}")
        shape = torch.Size(shape)
        n_blocks = -(-math.prod(shape) // blocksize)
        absmax = _tensor_field(d, "absmax", device)
        code = _tensor_field(d, "quant_map", device)
        if code.dtype != torch.float32 or code.numel() != 16:
            raise ValueError(f"quant_map must be 16 float32 values, got {code.dtype} x {code.numel()}")
        if absmax.numel() != n_blocks:
            raise ValueError(
                f"absmax has {absmax.numel()} entries; shape {list(shape)} in blocks of {blocksize} needs {n_blocks}"
            )
        offset = state2 = None
        if "nested_absmax" in d:
            nested_missing = [
                k for k in ("nested_quant_map", "nested_blocksize", "nested_dtype", "nested_offset") if k not in d
            ]
            if nested_missing:
                raise ValueError(f"nested quantization state is missing {nested_missing}")
            if absmax.dtype != torch.uint8:
                raise ValueError(f"a nested state stores absmax as uint8 codes, got {absmax.dtype}")
            nested_bs = _check_blocksize8(d["nested_blocksize"])
            nested_absmax = _tensor_field(d, "nested_absmax", device)
            nested_code = _tensor_field(d, "nested_quant_map", device)
            if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != -(-n_blocks // nested_bs):
                raise ValueError(
                    f"nested_absmax must be {-(-n_blocks // nested_bs)} float32 values, "
                    f"got {nested_absmax.dtype} x {nested_absmax.numel()}"
                )
            if nested_code.dtype != torch.float32 or nested_code.numel() != 256:
                raise ValueError("nested_quant_map must be 256 float32 values")
            if not isinstance(d["nested_offset"], (int, float)) or isinstance(d["nested_offset"], bool):
                raise ValueError(f"nested_offset must be a number, got {d['nested_offset']!r}")
            offset = torch.tensor(float(d["nested_offset"]), dtype=torch.float32, device=device)
            state2 = cls(
                absmax=nested_absmax,
                code=nested_code,
                blocksize=nested_bs,
                dtype=_dtype_from_name(d["nested_dtype"], "nested_dtype"),
            )
        elif absmax.dtype != torch.float32:
            raise ValueError(f"absmax must be float32 when not nested, got {absmax.dtype}")
        return cls(
            absmax=absmax,
            shape=shape,
            code=code,
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=dtype,
            offset=offset,
            state2=state2,
        )

    def to(self, device: torch.device | str) -> "QuantState":
        """Move every tensor of the state to ``device`` (in place); returns self."""
        self.absmax = self.absmax.to(device)
        if self.code is not None:
            self.code = self.code.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.to(device)
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented
        same = lambda a, b: (a is None and b is None) or (  # noqa: E731
            a is not None and b is not None and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
        )
        return (
            self.quant_type == other.quant_type
            and self.shape == other.shape
            and self.dtype == other.dtype
            and self.blocksize == other.blocksize
            and same(self.absmax, other.absmax)
            and same(self.code, other.code)
            and same(self.offset, other.offset)
            and self.state2 == other.state2
        )

    __hash__ = None  # mutable


def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _dtype_from_name(name: Any, key: str) -> torch.dtype:
    if name not in _DTYPE_BY_NAME:
        raise ValueError(f"{key} must be one of {sorted(_DTYPE_BY_NAME)}, got {name!r}")
    return _DTYPE_BY_NAME[name]


def _tensor_field(d: Mapping[str, Any], key: str, device) -> torch.Tensor:
    v = d[key]
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"{key} must be a tensor, got {type(v).__name__}")
    return v.to(device)


def _unpack_json(t: torch.Tensor) -> dict[str, Any]:
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"the packed quant_state must be a 1-D uint8 tensor, got {t.dtype} {tuple(t.shape)}")
    try:
        fields = json.loads(bytes(t.cpu().numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the packed quant_state is not UTF-8 JSON: {e}") from None
    if not isinstance(fields, dict):
        raise ValueError("the packed quant_state must hold a JSON object")
    return fields


# ------------------------------------------------------------------ 4-bit


def quantize_4bit(
    A: torch.Tensor,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 64,
    compress_statistics: bool = False,
    quant_type: str = "nf4",
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize a tensor to 4 bits in blocks (the signature of bitsandbytes' function).

    Args:
        A: float32/float16/bfloat16 CPU or CUDA tensor of any shape; finite values
            (the result and state live on A's device; CUDA gives the CPU's bytes).
        absmax: optional float32 tensor of ``ceil(n/blocksize)`` to receive the scales.
        out: optional uint8 tensor of ``(n+1)//2`` elements to receive the packed codes.
        blocksize: elements per block, one of :data:`BLOCK_SIZES`.
        compress_statistics: double-quantize the scales (8-bit, blocks of 256,
            mean offset), about 0.127 instead of 0.5 bits per parameter.
        quant_type: ``"nf4"`` or ``"fp4"``.
        quant_storage: dtype the packed bytes are viewed as (uint8 by default).

    Returns:
        ``(packed, state)``: packed codes of shape ``((n+1)//2, 1)`` and the
        :class:`QuantState` needed to dequantize them.

    Example:
        >>> w = torch.randn(256, 128)
        >>> q, state = quantize_4bit(w, blocksize=64, compress_statistics=True)
        >>> dequantize_4bit(q, state).shape
        torch.Size([256, 128])
    """
    _check_tensor("A", A)
    dtype = _check_float("A", A)
    cuda = _on_cuda("A", A)
    _check_blocksize(blocksize)
    _check_quant_type(quant_type)
    n = A.numel()
    n_blocks = -(-n // blocksize)
    x = A.detach().contiguous()
    if cuda:
        packed, scales = _cuda.quantize_4bit(x, quant_type, blocksize)
    else:
        packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
        scales = torch.empty(n_blocks, dtype=torch.float32)
        _native.quantize_4bit(_flat_view(x), dtype, quant_type, blocksize, _flat_view(packed), _flat_view(scales), _threads())
    code = get_4bit_type(quant_type, device=A.device)
    if compress_statistics:
        # The offset is torch's CPU float32 mean on both backends, so that a
        # GPU gives the CPU's bytes (a CUDA mean may differ in the last bit).
        offset = _scale_mean(scales.cpu()).to(A.device)
        qscales, state2 = quantize_blockwise(scales, blocksize=NESTED_BLOCKSIZE, _offset=offset)
        state = QuantState(
            absmax=qscales,
            shape=A.shape,
            code=code,
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=A.dtype,
            offset=offset,
            state2=state2,
        )
    else:
        state = QuantState(absmax=scales, shape=A.shape, code=code, blocksize=blocksize, quant_type=quant_type, dtype=A.dtype)
    if out is not None:
        _check_out(out, packed.numel(), torch.uint8, A.device).view(-1).copy_(packed.view(-1))
        packed = out
    if absmax is not None:
        state.absmax = _check_out(absmax, state.absmax.numel(), state.absmax.dtype, A.device).copy_(
            state.absmax.view_as(absmax)
        )
    if quant_storage != torch.uint8:
        packed = _view_storage(packed, quant_storage)
    return packed, state


def _scale_mean(scales: torch.Tensor) -> torch.Tensor:
    """The offset of double quantization: the mean of the block scales.

    torch's own float32 mean, so the offset matches bitsandbytes to the bit;
    where that sum overflows (scales near float32's maximum) the mean is taken
    in float64 instead of storing an infinite offset.
    """
    if scales.numel() == 0:
        return torch.tensor(0.0)
    mean = scales.mean()
    if not torch.isfinite(mean):
        mean = scales.double().mean().float()
    return mean


def _view_storage(packed: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    size = torch.empty((), dtype=storage).element_size()
    if packed.numel() % size:
        raise ValueError(
            f"{packed.numel()} packed bytes cannot be viewed as {storage} ({size} bytes per element); use uint8"
        )
    return packed.view(-1).view(storage).unsqueeze(1)


def dequantize_4bit(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 64,
    quant_type: str = "nf4",
) -> torch.Tensor:
    """Dequantize packed 4-bit codes to the original shape and dtype.

    ``quant_state`` may be a qpeft or a bitsandbytes ``QuantState``. Without a
    state, ``absmax``, ``out`` (giving shape and dtype), ``blocksize`` and
    ``quant_type`` describe the data. Values are ``code[nibble] * absmax`` in
    float32, then rounded to the output dtype.
    """
    _check_tensor("A", A)
    _on_cuda("A", A)
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("pass quant_state, or both absmax and out")
        quant_state = QuantState(
            absmax=absmax, shape=out.shape, blocksize=blocksize, quant_type=quant_type, dtype=out.dtype
        )
    qs = quant_state
    _check_blocksize(qs.blocksize)
    _check_quant_type(qs.quant_type)
    dtype_name = _FLOAT_DTYPES.get(qs.dtype)
    if dtype_name is None:
        raise TypeError(f"quant_state.dtype must be float32, float16 or bfloat16, got {qs.dtype}")
    shape = torch.Size(qs.shape)
    n = math.prod(shape)
    packed = A.detach()
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    packed = packed.contiguous()
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed data has {packed.numel()} bytes, but shape {list(shape)} needs {(n + 1) // 2}"
        )
    if out is None:
        out = torch.empty(shape, dtype=qs.dtype, device=A.device)
    else:
        _check_out(out, n, qs.dtype, A.device)
    return _dequantize_4bit_into(packed, qs, out)


def _dequantize_4bit_into(packed: torch.Tensor, qs, out: torch.Tensor,
                          round_to: Optional[torch.dtype] = None, cols: Optional[int] = None) -> torch.Tensor:
    """Dequantize checked, contiguous uint8 ``packed`` into ``out`` of any float dtype.

    ``round_to`` (bfloat16 or float16, with a float32 ``out``): each value
    rounded to that dtype's precision first, as dequantizing to it and
    widening would give (in one pass on the CPU). ``cols`` (CPU only, a
    multiple of the block size): each row of ``cols`` values goes to the
    first ``cols`` columns of a row of the 2-D ``out``, the rest untouched.
    """
    rows = {} if cols is None else {"cols": cols, "stride": out.shape[1]}
    if out.is_cuda and rows:
        raise ValueError("dequantizing into the first columns of a wider matrix is CPU-only")
    if out.is_cuda:
        if round_to is None or round_to == out.dtype:
            return _cuda.dequantize_4bit(packed, qs, out)
        return out.copy_(_cuda.dequantize_4bit(packed, qs, torch.empty(out.shape, dtype=round_to, device=out.device)))
    dtype_name = _FLOAT_DTYPES[out.dtype]
    kwargs = _scale_kwargs(qs, _flat_view)
    if round_to is not None:
        kwargs["round_to"] = _FLOAT_DTYPES[round_to]
    _native.dequantize_4bit(
        _flat_view(packed), qs.quant_type, qs.blocksize, _flat_view(out), dtype_name, _threads(), **kwargs, **rows
    )
    return out


def _scale_kwargs(qs, view) -> dict[str, Any]:
    """A 4-bit state's block scales as the native kernels' keyword arguments."""
    if not qs.nested:
        return {"absmax": view(_cpu_contig(qs.absmax, torch.float32, "absmax"))}
    s2 = qs.state2
    return {
        "qabsmax": view(_cpu_contig(qs.absmax, torch.uint8, "absmax")),
        "absmax2": view(_cpu_contig(s2.absmax, torch.float32, "state2.absmax")),
        "code2": view(_cpu_contig(s2.code, torch.float32, "state2.code")),
        "offset": float(qs.offset),
        "blocksize2": _check_blocksize8(s2.blocksize),
    }


def _cpu_contig(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    _check_tensor(name, t)
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    return t.detach().cpu().contiguous()


# ------------------------------------------------------------- 4-bit matmul


def gemv_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    quant_state: QuantState,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``A @ W.T`` for a 4-bit weight ``W``, without ever building a dense ``W``.

    The fused kernel for decoding (1-16 tokens): each packed byte and scale is
    read once per call and used for every token. It computes any number of
    tokens, but past 16 it reads the weight once per 16 tokens, and for many
    tokens ``F.linear(A, dequantize_4bit(B, quant_state))`` is faster (on a
    2-core Zen 4 from about 64-96 tokens for bfloat16 input and 96-128 for
    float32, depending on the shape; ``bench/gemv.py`` measures it).
    It runs on ``torch.get_num_threads()`` threads and does not record
    autograd history (A is read detached).

    Args:
        A: float32/bfloat16/float16 CPU or CUDA tensor (B and the state on the
            same device) of shape ``[..., K]``; every
            leading index is a token.
        B: the packed weight :func:`quantize_4bit` returned (any storage dtype).
        quant_state: its qpeft or bitsandbytes ``QuantState`` (nested or not);
            ``quant_state.shape`` must be ``(N, K)``, i.e. a Linear weight
            ``(out_features, in_features)``.
        out: optional contiguous tensor with ``A.numel() // K * N`` elements
            of A's dtype to write the result to.

    Returns:
        ``[..., N]`` in A's dtype: ``y[t, n] = sum_k A[t, k] * W[n, k]`` where
        ``W[n, k] = code[nibble] * absmax[block]`` in float32 (as
        :func:`dequantize_4bit` computes it before casting), summed in float32
        and rounded to A's dtype. A bias is not added. Exception: bfloat16
        ``A`` on a CPU with AVX512-BF16 (and K and the block size multiples
        of 64) is multiplied with bfloat16 dot products, ``W`` rounded to
        bfloat16 first, as ``dequantize_4bit(...).to(torch.bfloat16)`` gives
        it to a dense bfloat16 matmul (products exact, sums in float32;
        denormal values flushed to zero): 0.6x the time of the float32 kernel
        at one token, about half at 4-16 tokens.
        :func:`gemv_rounds_weights_to_bf16` says when.

    Example:
        >>> w = torch.randn(64, 128)
        >>> q, state = quantize_4bit(w, compress_statistics=True)
        >>> gemv_4bit(torch.randn(2, 128), q, state).shape
        torch.Size([2, 64])
    """
    return _gemv_4bit(A, B, quant_state, out)


def gemv_rounds_weights_to_bf16(
    dtype: torch.dtype, tokens: int, k: int, blocksize: int, isa: Optional[str] = None
) -> bool:
    """Whether :func:`gemv_4bit` on the CPU rounds the weights to bfloat16 for
    ``tokens`` rows of a ``dtype`` input against a 4-bit weight with ``k``
    input features and block size ``blocksize`` (``isa``: an instruction set
    asked of ``_gemv_4bit``, default this CPU's best; see :func:`gemv_4bit`).
    The token count does not matter (any number from one on); it is kept
    so that callers need not know that."""
    return (
        dtype == torch.bfloat16
        and tokens >= 1
        and k % 64 == 0
        and blocksize % 64 == 0
        and (isa or cpu_isa()) == "avx512"
        and _native.cpu_has_bf16_dot()
    )


def _gemv_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    quant_state: QuantState,
    out: Optional[torch.Tensor] = None,
    isa: Optional[str] = None,
) -> torch.Tensor:
    """:func:`gemv_4bit` on a chosen instruction set (``isa``; for tests and benches).

    This runs once per layer per generated token, on matrices small enough
    that the call can cost as much as the product, so it is written to cost
    little: the weight is checked once per (B, state) and its native handle
    remembered (see :func:`_weight_handle`), and the input and output go to
    the kernel by address, checked here, with no NumPy views.
    """
    _check_tensor("A", A)
    dtype_name = _FLOAT_DTYPES.get(A.dtype)
    if dtype_name is None:
        raise TypeError(
            f"A has dtype {A.dtype}; gemv_4bit multiplies float32, float16 and bfloat16 inputs "
            f"(convert with A.float() or A.bfloat16())"
        )
    if not _on_cuda("A", A):
        return _gemv_4bit_cpu(A, B, quant_state, dtype_name, out, isa)
    n, k, packed = _weight_packed(B, quant_state, A.device)
    tokens, out = _gemv_out(A, n, k, out)
    x = A if A.is_contiguous() else A.detach().contiguous()
    _cuda.gemv_4bit(x.detach(), packed, quant_state, n, k, tokens, out.detach())
    return out


def _gemv_out(A: torch.Tensor, n: int, k: int, out: Optional[torch.Tensor]) -> tuple[int, torch.Tensor]:
    """``(tokens, out)`` for ``A @ W.T`` with an ``n x k`` weight: A's shape
    checked, ``out`` made (on A's device) or checked."""
    a_shape = A.shape
    if not a_shape or a_shape[-1] != k:
        raise ValueError(
            f"A has shape {tuple(a_shape)}, but the weight has shape ({n}, {k}): "
            f"A's last dimension must be in_features = {k}"
        )
    tokens = A.numel() // k if k else math.prod(a_shape[:-1])
    if out is None:
        # The size as separate ints and, on the CPU, a prebuilt device: both
        # parse faster (about 20 us less per one-token call when a dense layer
        # has just flushed the caches).
        out = torch.empty(*a_shape[:-1], n, dtype=A.dtype, device=_CPU if A.is_cpu else A.device)
    else:
        _check_out(out, tokens * n, A.dtype, A.device)
    return tokens, out


def _gemv_4bit_cpu(
    A: torch.Tensor,
    B: torch.Tensor,
    quant_state: QuantState,
    dtype_name: str,
    out: Optional[torch.Tensor] = None,
    isa: Optional[str] = None,
) -> torch.Tensor:
    """:func:`_gemv_4bit` for a CPU tensor ``A`` of dtype ``dtype_name`` (the
    caller has checked both; :func:`linear_4bit` comes straight here)."""
    n, k, weight = _weight_handle(B, quant_state)
    tokens, out = _gemv_out(A, n, k, out)
    # Only the memory is read (autograd records nothing): no detach needed for the address.
    x = A if A.is_contiguous() else A.detach().contiguous()
    # x is a contiguous CPU tensor of tokens * K elements of dtype_name, and
    # out one of tokens * N (made here or checked by _check_out); the kernel
    # refuses overlapping buffers.
    weight.run(x.data_ptr(), out.data_ptr(), dtype_name, tokens, _threads(), isa)
    return out


def _np_flat(t: torch.Tensor):
    """A flat NumPy view of a contiguous, detached CPU tensor (16-bit floats as int16 bits)."""
    if t.dtype is torch.bfloat16 or t.dtype is torch.float16:
        t = t.view(torch.int16)
    return t.numpy().reshape(-1)


def _weight_handle(B: torch.Tensor, qs: Any) -> tuple[int, int, Any]:
    """``(N, K, handle)``: a packed 4-bit matrix and its state, checked, as a ``_native.Gemv4Weight``.

    Checking the state and making NumPy views of its tensors costs more than a
    small matrix-vector product, so the result is remembered per state object
    (without touching the object) until the state goes away, or B or one of
    the state's fields is replaced, changed in place or re-pointed (``.data``).
    Tensors are recognized by their memory, so a fresh view of the same weight
    (``B.t()`` on every call, as bitsandbytes' layers pass it) still hits.
    """
    # Fast path: the very same objects as last time, unchanged in place.
    # (Identities by id(): the entry keeps the objects alive, so an equal id
    # is the same object. Written out rather than looped: this runs for every
    # layer of every generated token.)
    entry = _WEIGHT_CACHE.get(id(qs))
    if entry is not None and entry[0]() is qs:
        fast = entry[4]
        st2 = getattr(qs, "state2", None)
        a = qs.absmax
        try:
            if st2 is None:
                cur = (id(B), id(a), id(st2))
                snap = (B._version, B.data_ptr(), a._version, a.data_ptr())
            else:
                a2, c2, off = st2.absmax, st2.code, qs.offset
                cur = (id(B), id(a), id(st2), id(a2), id(c2), id(off))
                snap = (B._version, B.data_ptr(), a._version, a.data_ptr(), a2._version, a2.data_ptr(),
                        c2._version, c2.data_ptr())
                if isinstance(off, torch.Tensor):
                    snap += (off._version, off.data_ptr())
            hit = (
                cur == fast[0]
                and snap == fast[1]
                and (qs.shape, qs.blocksize, qs.quant_type, None if st2 is None else st2.blocksize) == fast[2]
            )
        except AttributeError:  # a field replaced by a non-tensor: the full check below says what
            hit = False
        if hit:
            return entry[3]
    _check_tensor("B", B)
    try:
        nested = qs.nested
        parts = (B, qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset) if nested else (B, qs.absmax)
        key = (qs.shape, qs.blocksize, qs.quant_type, nested, qs.state2.blocksize if nested else None) + tuple(
            (p.data_ptr(), p._version, p.dtype, p.shape, p.stride()) if isinstance(p, torch.Tensor) else (id(p),)
            for p in parts
        )
    except AttributeError:
        raise TypeError(
            f"quant_state must be the QuantState that quantize_4bit returned with B, got {type(qs).__name__}"
        ) from None
    if entry is not None and entry[0]() is qs and entry[1] == key:
        args = entry[3]
    else:
        n, k, kwargs = _check_weight(B, qs)
        args = (n, k, _native.Gemv4Weight(**kwargs))
    try:
        ref = weakref.ref(qs, lambda _, i=id(qs): _WEIGHT_CACHE.pop(i, None))
    except TypeError:  # an object without weak references: no caching
        return args
    # `parts` keeps the tensors (and so their memory) alive: nothing else can
    # take their addresses while the entry exists. The fast path compares the
    # objects themselves (and the state2 object), then their versions and
    # addresses (`.data =` keeps the object but swaps the memory), in the
    # order it builds them.
    snap: tuple = ()
    for t in parts:
        if isinstance(t, torch.Tensor):
            snap += (t._version, t.data_ptr())
    ids = (id(B), id(qs.absmax), id(qs.state2)) + ((id(parts[2]), id(parts[3]), id(parts[4])) if nested else ())
    fast = (ids, snap, (qs.shape, qs.blocksize, qs.quant_type, qs.state2.blocksize if nested else None))
    _WEIGHT_CACHE[id(qs)] = (ref, key, (parts, qs.state2), args, fast)
    return args


#: id(quant state) -> (weak reference to it, key, the tensors the key names, (N, K, handle), fast-path record); see _weight_handle.
_WEIGHT_CACHE: dict[int, tuple] = {}


def _check_weight(B: torch.Tensor, qs: Any) -> tuple[int, int, dict[str, Any]]:
    n, k, packed = _weight_packed(B, qs, torch.device("cpu"))
    kwargs: dict[str, Any] = dict(
        packed=packed.numpy().reshape(-1), quant_type=qs.quant_type, blocksize=qs.blocksize, n=n, k=k
    )
    kwargs.update(_scale_kwargs(qs, _np_flat))
    return n, k, kwargs


def _weight_packed(B: torch.Tensor, qs: Any, device: torch.device) -> tuple[int, int, torch.Tensor]:
    """``(N, K, packed)``: a 4-bit matrix's checked shape and its bytes as contiguous uint8 on ``device``."""
    _check_tensor("B", B)
    if B.device != device:
        raise ValueError(f"B is on {B.device} but A is on {device}; move the layer or the input (.to({str(device)!r}))")
    _check_blocksize(qs.blocksize)
    _check_quant_type(qs.quant_type)
    if qs.shape is None or len(qs.shape) != 2:
        shape = None if qs.shape is None else tuple(qs.shape)
        raise ValueError(
            f"gemv_4bit needs a 2-D weight (out_features, in_features), but quant_state.shape is {shape}; "
            f"quantize the weight as a matrix (reshape it to 2-D before quantize_4bit)"
        )
    n, k = int(qs.shape[0]), int(qs.shape[1])
    packed = B.detach()
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    packed = packed.contiguous()
    if packed.numel() != (n * k + 1) // 2:
        raise ValueError(
            f"B has {packed.numel()} packed bytes, but a ({n}, {k}) weight needs {(n * k + 1) // 2}; "
            f"pass the packed tensor that quantize_4bit returned together with this quant_state"
        )
    return n, k, packed

# ------------------------------------------------------------------ 8-bit


def quantize_blockwise(
    A: torch.Tensor,
    code: Optional[torch.Tensor] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 4096,
    nested: bool = False,
    *,
    _offset: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize a tensor to 8-bit codes in blocks (the signature of bitsandbytes' function).

    Each block is scaled by the float32 reciprocal of its absmax and every
    value mapped to the nearest entry of ``code`` (default: the signed dynamic
    map; ties to the even index), as bitsandbytes' CUDA kernel does.

    Returns ``(codes, state)``; codes are uint8 with A's shape.
    """
    _check_tensor("A", A)
    dtype = _check_float("A", A)
    cuda = _on_cuda("A", A)
    _check_blocksize8(blocksize)
    if code is None:
        code = create_dynamic_map(signed=True)
    code = _cpu_contig(code, torch.float32, "code")
    if code.numel() != 256:
        raise ValueError(f"code must have 256 values, got {code.numel()}")
    n = A.numel()
    x = A.detach().contiguous()
    offset = 0.0 if _offset is None else float(_offset)
    if cuda:
        q, scales = _cuda.quantize_blockwise(x, code.to(A.device), blocksize, offset)
    else:
        q = torch.empty(A.shape, dtype=torch.uint8)
        scales = torch.empty(-(-n // blocksize), dtype=torch.float32)
        _native.quantize_blockwise(
            _flat_view(x), dtype, _flat_view(code), blocksize, _flat_view(q), _flat_view(scales), _threads(), offset
        )
    code = code.to(A.device)
    if nested:
        off = _scale_mean(scales.cpu()).to(A.device)
        qscales, state2 = quantize_blockwise(scales, blocksize=blocksize, _offset=off)
        state = QuantState(absmax=qscales, code=code.clone(), blocksize=blocksize, dtype=A.dtype, offset=off, state2=state2)
    else:
        state = QuantState(absmax=scales, code=code.clone(), blocksize=blocksize, dtype=A.dtype)
    if out is not None:
        q = _check_out(out, n, torch.uint8, A.device).copy_(q.view_as(out))
    if absmax is not None:
        state.absmax = _check_out(absmax, state.absmax.numel(), state.absmax.dtype, A.device).copy_(
            state.absmax.view_as(absmax)
        )
    return q, state


def dequantize_blockwise(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    code: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 4096,
    nested: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Dequantize 8-bit codes: ``code[q] * absmax[block]`` in float32, then cast.

    ``quant_state`` may be a qpeft or a bitsandbytes ``QuantState`` (nested
    states are handled); otherwise pass ``absmax`` (and optionally ``code``).
    """
    _check_tensor("A", A)
    cuda = _on_cuda("A", A)
    if A.dtype != torch.uint8:
        raise TypeError(f"A must hold uint8 codes, got {A.dtype}")
    if quant_state is None:
        if absmax is None:
            raise ValueError("pass quant_state or absmax")
        quant_state = QuantState(
            absmax=absmax,
            code=code if code is not None else create_dynamic_map(True),
            blocksize=blocksize,
            dtype=dtype or torch.float32,
        )
    qs = quant_state
    _check_blocksize8(qs.blocksize)
    scales = qs.absmax
    if qs.nested:
        scales = dequantize_blockwise(qs.absmax, qs.state2, dtype=torch.float32)
        # Near the top of the float32 range, nested scale + offset can round
        # past the largest float (a block holding 3.4e38 among zero blocks):
        # inf would turn the block into inf and NaN. The largest float is the
        # scale such a block had.
        scales = (scales + _as_f32_scalar(qs.offset)).clamp_(max=torch.finfo(torch.float32).max)
    out_dtype = dtype or qs.dtype or torch.float32
    dtype_name = _FLOAT_DTYPES.get(out_dtype)
    if dtype_name is None:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {out_dtype}")
    q = A.detach().contiguous()
    if out is None:
        out = torch.empty(A.shape, dtype=out_dtype, device=A.device)
    else:
        _check_out(out, q.numel(), out_dtype, A.device)
    c = _cpu_contig(qs.code, torch.float32, "code")
    if c.numel() != 256:
        raise ValueError(f"code must have 256 values, got {c.numel()}")
    if cuda:
        return _cuda.dequantize_blockwise(q, scales.to(A.device), c.to(A.device), qs.blocksize, 0.0, out)
    _native.dequantize_blockwise(
        _flat_view(q),
        _flat_view(_cpu_contig(scales, torch.float32, "absmax")),
        _flat_view(c),
        qs.blocksize,
        _flat_view(out),
        dtype_name,
        _threads(),
    )
    return out


_FAST_16BIT: dict[torch.dtype, bool] = {}

#: Whether :func:`linear_4bit`'s dequantize + matmul path widens 16-bit activations to float32
#: on a CPU without 16-bit matmul hardware (see :func:`dense_matmul_dtype`).
#: Off, they run torch's 16-bit matmul: bit for bit what bitsandbytes
#: computes, several times slower there.
WIDEN_16BIT_ON_CPU = True


def _cpu_runs_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU's matmuls run ``dtype`` (bfloat16/float16) in hardware (AVX512-BF16/AMX, AVX512-FP16)."""
    fast = _FAST_16BIT.get(dtype)
    if fast is None:
        probe = {
            torch.bfloat16: "_is_mkldnn_bf16_supported",
            torch.float16: "_is_mkldnn_fp16_supported",
        }.get(dtype)
        try:
            fast = probe is None or bool(getattr(torch.ops.mkldnn, probe)())
        except (AttributeError, RuntimeError):
            fast = False
        _FAST_16BIT[dtype] = fast
    return fast


def dense_matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype in which :func:`linear_4bit`'s dequantize + matmul path multiplies activations ``x``.

    ``x``'s own dtype, except 16-bit activations on a CPU without hardware
    support for them: there torch's 16-bit matmul converts to float32 inside
    and runs several times slower than a float32 one (4096x4096 weight, 64
    tokens, 2-core AVX2 EPYC: bfloat16 112 ms, float16 90 ms, float32 44
    ms). So the weight is dequantized into ``x``'s dtype as usual (the values
    a 16-bit matmul, and bitsandbytes, would use), widened to float32, the
    matmul runs in float32 and its result is rounded to ``x``'s dtype once:
    what the 16-bit matmul computes too (float32 accumulation, one rounding),
    up to the order of the additions (:data:`WIDEN_16BIT_ON_CPU` turns this off).

    Only the forward of a plain 4-bit layer (inference, a prompt's prefill)
    takes this path; the training paths (:func:`linear_4bit_lora`,
    :func:`grad_input_4bit`) keep ``x``'s dtype, whose rounding steps the
    fused training blocks reproduce.
    """
    if (
        WIDEN_16BIT_ON_CPU
        and x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float16)
        and not _cpu_runs_natively(x.dtype)
    ):
        return torch.float32
    return x.dtype


def _as_f32_scalar(x: Any) -> torch.Tensor:
    return x.float().cpu() if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float32)


def linear_4bit(x: torch.Tensor, weight: torch.Tensor, quant_state: QuantState) -> torch.Tensor:
    """``x @ W.T`` for a 4-bit ``W`` (no bias, no autograd), by the faster path for its size.

    Few tokens (at most :data:`GEMV_MAX_TOKENS` for bfloat16 input on a
    CPU with AVX512-BF16, else 16 on the CPU, ``qpeft._cuda.GEMV_MAX_TOKENS``
    on a GPU): the fused :func:`gemv_4bit`
    kernel, which never builds a dense weight. More tokens: dequantize into
    ``x``'s dtype and ``F.linear`` (a dense matmul amortizes the dequantize),
    in float32 for 16-bit ``x`` on a CPU without 16-bit hardware
    (:func:`dense_matmul_dtype`); the result has ``x``'s dtype.
    """
    tokens = x.numel() // max(1, x.shape[-1])
    dtype_name = _FLOAT_DTYPES.get(x.dtype)
    shape = quant_state.shape
    if dtype_name is not None and shape is not None and len(shape) == 2:
        # Once per layer per generated token: the CPU call goes straight to the
        # kernel. (`x.is_cpu`, not `x.device`: see matmul_4bit.)
        if x.is_cpu:
            if tokens <= _cpu_gemv_max_tokens(x.dtype):
                return _gemv_4bit_cpu(x, weight, quant_state, dtype_name)
        elif tokens <= _gemv_max_tokens(x):
            return _gemv_4bit(x, weight, quant_state)
    w = _dense_for(x, weight, quant_state, x.requires_grad)
    return torch.nn.functional.linear(x.to(w.dtype), w).to(x.dtype)


#: Dtypes in which :func:`lora_matmul` sums base and adapter terms inside one matmul.
ROUND_ONCE_DTYPES = (torch.bfloat16, torch.float16)

def lora_matmul(x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x W^T + s (x A^T) B^T, x A^T)`` for a 2-D ``x`` and a dense ``W``, both in ``x``'s dtype.

    In 16-bit dtypes this is one matmul over ``[x | x A^T]`` and ``[W | s B]``:
    adding the adapter term to an already rounded base output rounds twice,
    and a term under half a unit in the last place (every adapter early in
    training: B starts at zero) is dropped outright -- measured on SmolLM2, a
    first LoRA update kept a tenth of its effect on the loss. Accumulating
    both products in the matmul's fp32 and rounding once keeps it on average,
    for about ``r / in`` more multiplications (the separate rank-r ``addmm_``
    it replaces costs more: it reads and writes the whole output). ``W`` may
    be a scratch buffer; it is copied, never kept. In fp32 (no such loss) the
    adapter term is added by a rank-r ``addmm_``.
    """
    dtype = x.dtype
    h = x @ A.to(dtype).t()
    if dtype not in ROUND_ONCE_DTYPES:
        return (x @ W.t()).addmm_(h, B.to(dtype).t(), alpha=scaling), h
    if _records(x, h, W, B):
        # Autograd records the product: fresh tensors, which the matmul may keep.
        return torch.cat([x, h], dim=1) @ torch.cat([W, _scaled(B, scaling).to(dtype)], dim=1).t(), h
    rows, k = W.shape
    Wa = _augmented_buffer(rows, k + h.shape[1], dtype, x.device, 0)
    Wa[:, :k].copy_(W)
    return _augmented_matmul(x, h, Wa, B, scaling), h


def _records(*ts: torch.Tensor) -> bool:
    """Whether autograd records an operation on ``ts``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _scaled(B: torch.Tensor, scaling: float) -> torch.Tensor:
    return B * scaling if scaling != 1.0 else B


def _augmented_buffer(rows: int, cols: int, dtype: torch.dtype, device: torch.device, slot: int) -> torch.Tensor:
    """A ``[rows, cols]`` view of this thread's augmented-weight buffer number ``slot`` (reused from call to call)."""
    return scratch(("augmented-weight", slot), (rows, cols), dtype, device)


def _augmented_matmul(x: torch.Tensor, h: torch.Tensor, Wa: torch.Tensor, B: torch.Tensor,
                      scaling: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[x | h] @ [W | s B]^T`` for ``Wa`` holding ``W`` in its first columns: the adapter's columns are filled here.

    ``[x | h]`` goes through a scratch buffer rather than a fresh ``torch.cat``
    (whose pages the trainer's heap trims make the kernel fault in and zero
    on every call); the result goes to ``out`` when given.
    """
    k = x.shape[1]
    if out is None and _records(x, h, B):
        # Autograd records the product: fresh tensors, which the matmul may keep.
        return torch.cat([x, h], dim=1) @ torch.cat([Wa[:, :k], _scaled(B, scaling).to(Wa.dtype)], dim=1).t()
    with torch.no_grad():  # nothing recorded into the scratch buffers, whatever the inputs
        Wa[:, k:].copy_(_scaled(B, scaling))
        xa = scratch("augmented-input", (x.shape[0], k + h.shape[1]), x.dtype, x.device)
        xa[:, :k].copy_(x)
        xa[:, k:].copy_(h)
        if out is None:
            return xa @ Wa.t()
        return torch.matmul(xa, Wa.t(), out=out)


def _dequantizes_into_rows(x: torch.Tensor, weight: torch.Tensor, qs: Any) -> bool:
    """Whether :func:`lora_matmul_4bit` writes the dense weight straight into the augmented matrix."""
    shape = qs.shape
    return (
        x.device.type == "cpu"
        and x.dtype in ROUND_ONCE_DTYPES
        and weight.device.type == "cpu"
        and shape is not None
        and len(shape) == 2
        and shape[1] % qs.blocksize == 0
        and x.dim() == 2
        and x.shape[1] == shape[1]
    )


def lora_matmul_4bit(x: torch.Tensor, weight: torch.Tensor, quant_state: QuantState, A: torch.Tensor,
                     B: torch.Tensor, scaling: float, slot: int = 0,
                     out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`lora_matmul` for a 4-bit weight (no autograd): ``(y, x A^T, W)``, ``W`` the dense weight in ``x``'s dtype.

    On the CPU in 16-bit dtypes (with ``in_features`` a multiple of the block
    size) the weight is dequantized straight into the first columns of the
    augmented matrix ``[W | s B]`` the matmul reads, in this thread's buffer
    number ``slot``, instead of into a buffer of its own and then copied
    there; ``W`` is then a view of that buffer, valid until the next call
    with the same ``slot`` (callers that need two weights at once, such as a
    feed-forward block's backward, use two slots). Elsewhere ``W`` is a fresh
    tensor and the result is :func:`lora_matmul`'s. ``y`` is written to
    ``out`` (contiguous, ``[tokens, out_features]``, ``x``'s dtype; no
    autograd history) when given.
    """
    if _dequantizes_into_rows(x, weight, quant_state):
        return _lora_matmul_rows(x, weight, quant_state, A, B, scaling, slot, out)
    W = dequantize_4bit(weight, quant_state).to(x.dtype)
    y, h = lora_matmul(x, W, A, B, scaling)
    return _into(out, y), h, W


def _into(out: Optional[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """``y``, copied into ``out`` (without autograd history) when one is given."""
    if out is None:
        return y
    with torch.no_grad():
        return out.copy_(y)


def _lora_matmul_rows(x: torch.Tensor, weight: torch.Tensor, qs: Any, A: torch.Tensor, B: torch.Tensor,
                      scaling: float, slot: int,
                      out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`lora_matmul_4bit` where :func:`_dequantizes_into_rows` holds."""
    n, k, packed = _weight_packed(weight, qs, x.device)
    h = x @ A.to(x.dtype).t()
    Wa = _augmented_buffer(n, k + h.shape[1], x.dtype, x.device, slot)
    _dequantize_4bit_into(packed, qs, Wa, cols=k)
    return _augmented_matmul(x, h, Wa, B, scaling, out), h, Wa[:, :k]


def linear_4bit_lora(x: torch.Tensor, weight: torch.Tensor, quant_state: QuantState, A: torch.Tensor,
                     B: torch.Tensor, scaling: float,
                     out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x W^T + s (x A^T) B^T, x A^T)`` for a 2-D ``x`` and a 4-bit ``W`` (no autograd), in ``x``'s dtype.

    Few tokens: the fused :func:`gemv_4bit` kernel, then the adapter term
    accumulated into its fresh output. More tokens on the CPU: the dense
    weight in this thread's scratch buffer and :func:`lora_matmul` (one
    rounding). Elsewhere: a fresh dense weight and :func:`lora_matmul`.
    The output is written to ``out`` (contiguous, ``[tokens,
    out_features]``, ``x``'s dtype; no autograd history) when given.
    """
    if x.shape[0] <= _gemv_max_tokens(x):
        h = x @ A.to(x.dtype).t()
        return _into(out, linear_4bit(x, weight, quant_state).addmm_(h, B.to(x.dtype).t(), alpha=scaling)), h
    if _dequantizes_into_rows(x, weight, quant_state):
        y, h, _ = _lora_matmul_rows(x, weight, quant_state, A, B, scaling, 0, out)
        return y, h
    y, h = lora_matmul(x, _dense_scratch(weight, quant_state, x.dtype, False), A, B, scaling)
    return _into(out, y), h


def lora_up_add_(y: torch.Tensor, h: torch.Tensor, bt: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """``y = y + (h @ bt) * scaling`` in place (no autograd), rounded as torch
    rounds ``(y.float() + (h @ bt) * scaling).to(y.dtype)``; returns ``y``.

    The rank-r up-projection of a LoRA layer with float32 adapter weights:
    ``y [..., n]`` (float32, bfloat16 or float16), ``h [..., r]`` and
    ``bt [r, n]`` in float32. On the CPU, with ``y`` contiguous, a Rust kernel
    reads and writes each element of ``y`` once and forms each dot product as
    the BLAS does for so short an inner dimension (a chain of fused
    multiply-adds from k = 0), so the result equals torch's bit for bit; in
    torch the same sum is a slow rank-r matmul, a widening copy, a scale, an
    add and a narrowing copy (about 5 ms against under 1 for 512 x 4096 x 16).
    ``bt`` may be ``B.t()`` of a contiguous ``B [n, r]`` (as a LoRA layer
    stores it): the kernel then reads ``B`` itself, with no transposed copy
    (which cost about what a decoding layer's 4-bit matmul costs). Anything
    else runs the torch expression.
    """
    if h.shape[-1] != bt.shape[0] or y.shape[-1] != bt.shape[-1] or y.shape[:-1] != h.shape[:-1]:
        raise ValueError(f"lora_up_add_: y {tuple(y.shape)}, h {tuple(h.shape)} and bt {tuple(bt.shape)} "
                         "must be [..., n], [..., r] and [r, n]")
    name = _FLOAT_DTYPES.get(y.dtype)
    if (
        name is not None
        and y.is_cpu  # not `.device`: a fresh object each, a few us per call when decoding
        and h.is_cpu
        and bt.is_cpu
        and y.is_contiguous()
        and h.dtype == torch.float32
        and bt.dtype == torch.float32
        and y.numel() > 0
    ):
        yd = y.detach()
        hc = h.detach().contiguous()
        # B^T as a view of a row-major B (a LoRA layer's): the kernel reads B.
        b_rows = not bt.is_contiguous() and bt.t().is_contiguous()
        bc = bt.detach().t() if b_rows else bt.detach().contiguous()
        _native.lora_up_add(_np_flat(yd), _np_flat(hc), _np_flat(bc), int(bt.shape[0]), float(scaling), name,
                            _threads(), None, b_rows)
        return y
    term = h @ bt
    if scaling != 1.0:
        term = term * scaling
    return y.copy_(y.to(term.dtype) + term)


def grad_input_4bit(grad_out: torch.Tensor, weight: torch.Tensor, quant_state: QuantState,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``grad_out @ W`` for a 4-bit ``W``: the input gradient of :func:`linear_4bit`
    (written to ``out``, contiguous and of the result's shape and dtype, without
    autograd history, when given)."""
    W = _dense_scratch(weight, quant_state, grad_out.dtype, grad_out.requires_grad)
    if out is None:
        return grad_out @ W
    with torch.no_grad():
        return torch.matmul(grad_out, W, out=out)


def _elementwise_native(*ts: torch.Tensor) -> bool:
    """Whether the Rust elementwise kernels (SwiGLU, RMSNorm) take these tensors:
    same shape, dtype and CPU device, floating point."""
    first = ts[0]
    return (
        first.device.type == "cpu"
        and first.dtype in _FLOAT_DTYPES
        and all(t.device == first.device and t.dtype == first.dtype and t.shape == first.shape for t in ts)
    )


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` in one pass over memory (no autograd; see :func:`swiglu_backward`).

    On the CPU (float32, bfloat16, float16; same shape and dtype) a Rust
    kernel reads each element once and rounds as torch does (the activation
    to the dtype, then the product), so results agree with torch's to the
    rounding of ``exp``. Anything else runs the torch expression.
    """
    if not _elementwise_native(gate, up):
        return torch.nn.functional.silu(gate) * up
    g, u = gate.detach().contiguous(), up.detach().contiguous()
    out = torch.empty_like(g)
    name = _FLOAT_DTYPES[g.dtype]
    _native.swiglu_forward(_np_flat(g), _np_flat(u), _np_flat(out), name, _threads())
    return out


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor,
                    out: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) of ``silu(gate) * up`` for the output gradient ``grad``.

    Computed in float32 and rounded once to the inputs' dtype:
    ``s = sigmoid(gate)``, ``d_up = grad * gate * s``,
    ``d_gate = grad * up * s * (1 + gate * (1 - s))``. One pass over memory on
    the CPU (as :func:`swiglu`); the same arithmetic in torch operations elsewhere.
    ``out``: two contiguous tensors of the inputs' shape and dtype to write
    the results to (not overlapping the inputs).
    """
    if out is not None and any(
        not o.is_contiguous() or o.shape != gate.shape or o.dtype != gate.dtype or o.device != gate.device for o in out
    ):
        raise ValueError("swiglu_backward: out must be two contiguous tensors of the gate's shape, dtype and device")
    if not _elementwise_native(gate, up, grad):
        g = gate.float()
        s = torch.sigmoid(g)
        dy = grad.float()
        d_up = (dy * (g * s)).to(up.dtype)
        d_gate = (dy * up.float() * (s * (1 + g * (1 - s)))).to(gate.dtype)
        if out is not None:
            return _into(out[0], d_gate), _into(out[1], d_up)
        return d_gate, d_up
    g, u, dy = (t.detach().contiguous() for t in (gate, up, grad))
    d_gate, d_up = out if out is not None else (torch.empty_like(g), torch.empty_like(u))
    name = _FLOAT_DTYPES[g.dtype]
    _native.swiglu_backward(_np_flat(g), _np_flat(u), _np_flat(dy), _np_flat(d_gate), _np_flat(d_up), name, _threads())
    return d_gate, d_up


def rmsnorm_backward(x: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Input gradient of the RMSNorm ``weight * (x * scale)``, ``scale = rsqrt(mean(x^2) + eps)``.

    ``x`` and ``grad`` are ``[..., d]``, ``scale`` the forward's float32
    ``[..., 1]`` and ``weight`` ``[d]`` (frozen: no gradient for it here).
    Returns ``scale * (grad * weight - xh * mean(grad * weight * xh))`` with
    ``xh = x * scale``, computed in float32 and rounded once to ``x``'s dtype
    (one pass per row in a Rust kernel on the CPU; torch operations elsewhere).
    """
    d = x.shape[-1]
    native = (
        _elementwise_native(x, grad)
        and scale.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.numel() == d
        and scale.numel() * d == x.numel()
    )
    if not native:
        xh = x.float() * scale
        dyw = grad.float() * weight.float()
        return (scale * (dyw - xh * (dyw * xh).mean(-1, keepdim=True))).to(x.dtype)
    xc, dy = x.detach().contiguous(), grad.detach().contiguous()
    s = scale.detach().float().contiguous()
    w = weight.detach().float().contiguous()
    out = torch.empty_like(xc)
    _native.rmsnorm_backward(_np_flat(xc), s.numpy().reshape(-1), w.numpy().reshape(-1), _np_flat(dy), _np_flat(out),
                             _FLOAT_DTYPES[xc.dtype], _threads())
    return out


def cross_entropy_grad(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, out: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy of each row of ``logits [rows, vocab]`` with its gradient.

    Returns ``(loss, lse, grad)``: the float32 per-row loss ``lse - logits[t]``
    (0 where the target is ``ignore_index``), the float32 per-row
    log-sum-exp, and the gradient of the summed loss with respect to the
    logits, ``softmax - onehot(t)`` (zero rows where ignored), computed in
    float32 and rounded once to the logits' dtype -- the values of
    ``F.cross_entropy(logits.float(), targets, reduction="sum")`` and its
    backward. On the CPU one Rust pass per row (it stays in cache) replaces
    the half-dozen passes over ``[rows, vocab]`` of the torch expression,
    which runs elsewhere. Targets outside ``0..vocab`` other than
    ``ignore_index`` raise ``ValueError``. The gradient is written to ``out``
    (contiguous, the logits' shape and dtype, not overlapping them) when given.
    """
    if logits.dim() != 2 or targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"logits must be [rows, vocab] and targets [rows]; got {list(logits.shape)} and {list(targets.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    rows, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits have an empty vocabulary (0 columns)")
    if out is not None and (out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {logits.dtype} tensor of shape {list(logits.shape)} "
                         f"on {logits.device}; got {out.dtype} {list(out.shape)} on {out.device}")
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target {int(targets[row])} of row {row} is outside the vocabulary (0..{vocab}) "
            f"and is not the ignore index {ignore_index}"
        )
    if logits.device.type != "cpu" or logits.dtype not in _FLOAT_DTYPES:
        x = logits.float()
        lse = torch.logsumexp(x, dim=-1)
        t = targets.clamp(0, vocab - 1).unsqueeze(1)
        weight = valid.to(x.dtype)
        loss = (lse - x.gather(1, t).squeeze(1)) * weight
        grad = x.sub_(lse.unsqueeze(1)).exp_().scatter_add_(1, t, -weight.unsqueeze(1)).mul_(weight.unsqueeze(1))
        grad = grad.to(logits.dtype)
        return loss, lse, _into(out, grad)
    x = logits.detach().contiguous()
    t = targets.detach().to(torch.int64).contiguous()
    grad = torch.empty_like(x) if out is None else out
    lse = torch.empty(rows, dtype=torch.float32)
    loss = torch.empty(rows, dtype=torch.float32)
    _native.cross_entropy_grad(_np_flat(x), vocab, t.numpy(), int(ignore_index), _np_flat(grad), lse.numpy(),
                               loss.numpy(), _FLOAT_DTYPES[x.dtype], _threads())
    return loss, lse, grad


def causal_softmax_grad(
    scores: torch.Tensor, dp: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, d_out: torch.Tensor, scale: float,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax half of causal self-attention's backward.

    For query rows laid out as ``scores [..., T, T]`` (``q k^T``, unscaled),
    ``dp [..., T, T]`` (``dO v^T``), the forward's log-sum-exp ``lse [..., T]``
    (of the scaled scores) and ``out``, ``d_out [..., T, D]`` (the attention
    output and its gradient), returns ``(p, ds)``:
    ``p = exp(scores * scale - lse)`` below and on the diagonal (the
    attention probabilities) and ``ds = p * (dp - rowsum(d_out * out)) * scale``
    (the gradient of the unscaled scores), both zero above the diagonal,
    computed in float32 and rounded once to ``scores``' dtype. Leading
    dimensions of all five must agree (``[B, H, ...]`` or any grouping of the
    rows into ``[T, T]`` blocks). With ``inplace=True`` (contiguous
    ``scores`` and ``dp`` of one dtype) ``p`` is written over ``scores`` and
    ``ds`` over ``dp``, so the backward needs no further ``[T, T]`` buffers.
    On the CPU this is one Rust pass per row instead of a dozen torch passes
    over the ``[T, T]`` matrices.
    """
    t = scores.shape[-1]
    if scores.dim() < 2 or scores.shape[-2] != t or dp.shape != scores.shape:
        raise ValueError(f"scores and dp must both be [..., T, T]; got {list(scores.shape)} and {list(dp.shape)}")
    lead = scores.shape[:-1]
    if lse.shape != lead or out.shape[:-1] != lead or d_out.shape != out.shape:
        raise ValueError(
            f"lse must be {list(lead)} and out, d_out [{', '.join(map(str, lead))}, D]; got {list(lse.shape)}, "
            f"{list(out.shape)} and {list(d_out.shape)}"
        )
    dtype = scores.dtype
    if inplace and (dp.dtype != dtype or not scores.is_contiguous() or not dp.is_contiguous()):
        raise ValueError("inplace=True needs contiguous scores and dp of one dtype")
    native = (scores.device.type == "cpu" and dtype in _FLOAT_DTYPES and dp.dtype == dtype
              and out.dtype == dtype and d_out.dtype == dtype)
    if not native:
        delta = (d_out.float() * out.float()).sum(-1, keepdim=True)
        causal = torch.ones(t, t, dtype=torch.bool, device=scores.device).triu_(1)
        p = scores.float().mul_(scale).sub_(lse.float().unsqueeze(-1)).exp_().masked_fill_(causal, 0.0)
        ds = p * (dp.float() - delta) * scale
        if inplace:
            return scores.copy_(p), dp.copy_(ds)
        return p.to(dtype), ds.to(dtype)
    p = scores.detach() if inplace else scores.detach().clone(memory_format=torch.contiguous_format)
    ds = dp.detach() if inplace else dp.detach().clone(memory_format=torch.contiguous_format)
    _native.causal_softmax_grad(
        _np_flat(p), _np_flat(ds), lse.detach().float().contiguous().numpy().reshape(-1),
        _np_flat(out.detach().contiguous()), _np_flat(d_out.detach().contiguous()), t, out.shape[-1], float(scale),
        _FLOAT_DTYPES[dtype], _threads(),
    )
    return (scores, dp) if inplace else (p, ds)


def causal_softmax(scores: torch.Tensor, scale: float, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax of causal self-attention's forward.

    For query rows laid out as ``scores [..., T, T]`` (``q k^T``, unscaled)
    returns ``(p, lse)``: ``p = softmax(scores * scale)`` over the keys on and
    below the diagonal (zero above it), computed in float32 and rounded once
    to ``scores``' dtype, and the float32 log-sum-exp ``lse [..., T]`` of the
    scaled scores, which :func:`causal_softmax_grad` takes. With
    ``inplace=True`` (contiguous ``scores``) ``p`` is written over ``scores``.
    On the CPU this is one Rust pass per row (the same exponential as
    :func:`causal_softmax_grad`'s, so backward recomputes exactly these
    probabilities) instead of half a dozen torch passes over ``[T, T]``.
    """
    if scores.dim() < 2 or scores.shape[-2] != scores.shape[-1]:
        raise ValueError(f"scores must be [..., T, T]; got {list(scores.shape)}")
    t = scores.shape[-1]
    if inplace and not scores.is_contiguous():
        raise ValueError("inplace=True needs contiguous scores")
    dtype = scores.dtype
    if scores.device.type != "cpu" or dtype not in _FLOAT_DTYPES:
        causal = torch.ones(t, t, dtype=torch.bool, device=scores.device).triu_(1)
        s = scores.float().mul_(scale).masked_fill_(causal, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = s.sub_(lse.unsqueeze(-1)).exp_().masked_fill_(causal, 0.0)
        return (scores.copy_(p) if inplace else p.to(dtype)), lse
    p = scores.detach() if inplace else scores.detach().clone(memory_format=torch.contiguous_format)
    lse = torch.empty(scores.shape[:-1], dtype=torch.float32)
    if p.numel():
        _native.causal_softmax(_np_flat(p), lse.numpy().reshape(-1), t, float(scale), _FLOAT_DTYPES[dtype], _threads())
    return (scores if inplace else p), lse



def _dense_for(x: torch.Tensor, weight: torch.Tensor, quant_state, requires_grad: bool) -> torch.Tensor:
    """The dense weight for ``x`` in :func:`dense_matmul_dtype`, its values rounded to ``x``'s dtype.

    Valid until this thread's next call, as :func:`_dense_scratch`.
    """
    mm = dense_matmul_dtype(x)
    # Widened: the values rounded to x's dtype, written as float32 in one pass.
    return _dense_scratch(weight, quant_state, mm, requires_grad, round_to=None if mm == x.dtype else x.dtype)


def _dense_scratch(weight: torch.Tensor, quant_state, dtype: torch.dtype, requires_grad: bool,
                   round_to: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense weight in ``dtype``, in a per-thread buffer reused from call to call.

    A fresh multi-megabyte tensor per call costs more in page faults than the
    dequantization itself; reusing one buffer (the size of the largest layer
    seen) removes that. The result is only valid until this thread's next
    call: callers must use it at once and never keep it (F.linear and matmul
    do not, outside autograd). With ``round_to`` (a 16-bit dtype, ``dtype``
    float32) the values are those of the weight in ``round_to``, widened.
    """
    # Under autograd the weight would be saved for backward: never hand out the buffer then.
    recorded = torch.is_grad_enabled() and (requires_grad or weight.requires_grad)
    if recorded or dtype not in _FLOAT_DTYPES or weight.device.type != "cpu":
        w = dequantize_4bit(weight, quant_state)
        if round_to is not None and w.dtype != round_to:
            w = w.to(round_to)
        return w if w.dtype == dtype else w.to(dtype)
    shape = torch.Size(quant_state.shape)
    numel = math.prod(shape)
    # One buffer per dtype: a training step can interleave 16-bit LoRA layers
    # with widened float32 plain ones, and must not reallocate at each switch.
    out = scratch(("dense-weight", dtype), tuple(shape), dtype, "cpu")
    packed = weight.detach()
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    packed = packed.contiguous()
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(f"packed data has {packed.numel()} bytes, but shape {list(shape)} needs {(numel + 1) // 2}")
    return _dequantize_4bit_into(packed, quant_state, out, round_to=round_to)


# -------------------------------------------------------------- optimizers
#
# One fused AdamW step per parameter tensor. The scalars are computed here in
# float64 exactly as the reference implementation computes them (torch's
# foreach AdamW for 32-bit state, bitsandbytes' CPU AdamW8bit for 8-bit
# state) and rounded once to float32 by the kernel call.

#: Elements per block of 8-bit optimizer state (one float32 absmax per block each for m and v).
OPTIM_BLOCKSIZE = 256

_OPTIM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def _optim_device(name: str, t: torch.Tensor, device: Optional[torch.device] = None) -> None:
    """Every tensor of an optimizer step on the parameter's device, a CPU or a CUDA one."""
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the parameter is on {device}; keep the state with the parameter")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {t.device}; qpeft's fused AdamW runs on CPU and CUDA tensors only")


def _optim_param(p: Any, grad: Any) -> tuple[str, torch.Tensor]:
    """Check a parameter and its gradient; returns the dtype name and a contiguous gradient."""
    _check_tensor("param", p)
    _check_tensor("grad", grad)
    _optim_device("param", p)
    if grad.is_sparse or grad.layout != torch.strided:
        raise TypeError("sparse gradients are not supported by qpeft's AdamW; use torch.optim.SparseAdam")
    _optim_device("grad", grad, p.device)
    dtype = _OPTIM_DTYPES.get(p.dtype)
    if dtype is None:
        raise TypeError(
            f"param has dtype {p.dtype}; qpeft's AdamW updates float32 and bfloat16 parameters "
            f"(convert the model with .float() or .bfloat16())"
        )
    if grad.dtype != p.dtype:
        raise TypeError(f"grad has dtype {grad.dtype} but param has {p.dtype}; they must match")
    if grad.shape != p.shape:
        raise ValueError(f"grad has shape {tuple(grad.shape)} but param has {tuple(p.shape)}")
    if not p.is_contiguous():
        raise ValueError("param must be contiguous (it is updated in place); call .data = p.data.contiguous() first")
    return dtype, grad if grad.is_contiguous() else grad.contiguous()


def _optim_state(name: str, t: Any, dtype: torch.dtype, numel: int, device: torch.device) -> torch.Tensor:
    _check_tensor(name, t)
    _optim_device(name, t, device)
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements, expected {numel}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is updated in place)")
    return t


def _optim_scalars(step: Any, lr: Any, beta1: Any, beta2: Any, eps: Any, weight_decay: Any) -> tuple[float, ...]:
    step, lr, beta1, beta2, eps, weight_decay = (
        float(x) if torch.is_tensor(x) else x for x in (step, lr, beta1, beta2, eps, weight_decay)
    )
    for name, x in (("lr", lr), ("beta1", beta1), ("beta2", beta2), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise TypeError(f"{name} must be a finite number, got {x!r}")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or step < 1 or step != int(step):
        raise ValueError(f"step must be a whole number >= 1 (the count including this step), got {step!r}")
    if lr < 0 or eps < 0 or weight_decay < 0:
        raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {b}")
    return float(step), float(lr), float(beta1), float(beta2), float(eps), float(weight_decay)


def adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> None:
    """One fused AdamW step (decoupled weight decay) on ``param`` in place.

    Reads ``param``, ``grad`` and the float32 moments once and writes
    ``param`` and the moments once, on ``torch.get_num_threads()`` threads,
    following ``torch.optim.AdamW``'s default (foreach) CPU arithmetic
    operation by operation. The moments agree with it to the bit; the
    parameters too, except where torch's ``sqrt`` (MKL's, not always
    correctly rounded) is one ulp off. ``torch.optim.AdamW(fused=True)``
    rounds like qpeft (bit-identical on its 16-element vectors)::

        param    *= 1 - lr * weight_decay
        exp_avg    = lerp(exp_avg, grad, 1 - beta1)
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad**2
        param     -= lr / (1 - beta1**step) * exp_avg / (sqrt(exp_avg_sq / (1 - beta2**step)) + eps)

    Args:
        param: float32 or bfloat16 contiguous CPU or CUDA tensor, the other
            tensors on its device (bfloat16 is updated
            in float32 and rounded to nearest even once).
        grad: its gradient, same dtype and shape (dense).
        exp_avg, exp_avg_sq: contiguous float32 tensors with ``param.numel()`` elements.
        step: the step count including this one (1 on the first step).
        maximize: ascend the objective (the gradient is negated).
    """
    dtype, g = _optim_param(param, grad)
    n = param.numel()
    _optim_state("exp_avg", exp_avg, torch.float32, n, param.device)
    _optim_state("exp_avg_sq", exp_avg_sq, torch.float32, n, param.device)
    scalars = _adamw_scalars(step, lr, beta1, beta2, eps, weight_decay)
    if param.is_cuda:
        return _cuda.adamw_step(param, g, exp_avg, exp_avg_sq, **scalars, maximize=bool(maximize))
    _native.adamw_step(
        _flat_view(param), _flat_view(g), _flat_view(exp_avg), _flat_view(exp_avg_sq), dtype, **scalars,
        maximize=bool(maximize), threads=_threads(),
    )


def _adamw_scalars(step: Any, lr: Any, beta1: Any, beta2: Any, eps: Any, weight_decay: Any) -> dict[str, float]:
    """The float32-state kernel's scalars, in float64 as torch computes them (rounded once by the kernel)."""
    step, lr, beta1, beta2, eps, weight_decay = _optim_scalars(step, lr, beta1, beta2, eps, weight_decay)
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    return dict(
        decay=1 - lr * weight_decay,
        lerp_weight=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        bc2_sqrt=bc2**0.5,
        eps=eps,
        step_size=(lr / bc1) * -1,
    )


def _adamw8_scalars(step: Any, lr: Any, beta1: Any, beta2: Any, eps: Any, weight_decay: Any) -> dict[str, float]:
    """The 8-bit kernel's scalars, in float64 as bitsandbytes computes them."""
    step, lr, beta1, beta2, eps, weight_decay = _optim_scalars(step, lr, beta1, beta2, eps, weight_decay)
    return dict(
        beta1=beta1,
        one_minus_beta1=1.0 - beta1,
        beta2=beta2,
        one_minus_beta2=1.0 - beta2,
        bc2_sqrt=math.sqrt(1.0 - beta2**step),
        eps=eps,
        decay=1.0 - lr * weight_decay,
        step_size=-lr / (1.0 - beta1**step),
    )


def adamw8bit_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> None:
    """One fused AdamW step with blockwise 8-bit moments (bitsandbytes' layout).

    ``state1`` holds m as uint8 codes of the signed dynamic map and
    ``state2`` v on the unsigned map, one code per element; ``absmax1`` and
    ``absmax2`` hold one float32 scale per block of :data:`OPTIM_BLOCKSIZE`
    elements. Per block the moments are dequantized, updated as
    bitsandbytes' CPU ``AdamW8bit`` updates them, ``param`` is updated, and
    the moments are re-quantized with the block's new absmax (nearest code,
    ties to the even index). Two rules go beyond bitsandbytes' CPU path (they
    follow its CUDA kernel and the format notes): a negative m never takes
    the code of 0 (it keeps its sign), and an element whose gradient is NaN
    or infinite (or whose squared gradient overflows) gets zero moments and
    keeps its parameter value, where bitsandbytes' CPU path would write NaN
    into the whole block.

    Args:
        param: float32 or bfloat16 contiguous CPU or CUDA tensor (the other
            tensors on its device; CUDA gives the CPU's bits).
        grad: its dense gradient, same dtype and shape.
        state1, state2: contiguous uint8 tensors with ``param.numel()`` elements.
        absmax1, absmax2: contiguous float32 tensors with ``ceil(numel / 256)`` elements.
        step: the step count including this one (1 on the first step).
    """
    dtype, g = _optim_param(param, grad)
    n = param.numel()
    blocks = -(-n // OPTIM_BLOCKSIZE)
    for name, t in (("state1", state1), ("state2", state2)):
        _optim_state(name, t, torch.uint8, n, param.device)
    for name, t in (("absmax1", absmax1), ("absmax2", absmax2)):
        _optim_state(name, t, torch.float32, blocks, param.device)
    scalars = _adamw8_scalars(step, lr, beta1, beta2, eps, weight_decay)
    if param.is_cuda:
        return _cuda.adamw8_step(param, g, state1, state2, absmax1, absmax2, **scalars, maximize=bool(maximize))
    _native.adamw8_step(
        _flat_view(param), _flat_view(g), _flat_view(state1), _flat_view(state2), _flat_view(absmax1),
        _flat_view(absmax2), dtype, **scalars, maximize=bool(maximize), threads=_threads(),
    )


# ------------------------------------------------------------ paged optimizer state


def paged_state(page_bytes: int, max_resident_bytes: int, state_dir: Optional[str]) -> Any:
    """A native page store for paged AdamW state (rust/src/paged_adamw.rs).

    ``state_dir`` None keeps non-resident pages in host memory; otherwise in
    a new file in that directory, removed when the store is closed.
    """
    for name, x in (("page_bytes", page_bytes), ("max_resident_bytes", max_resident_bytes)):
        if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
            raise ValueError(f"{name} must be a positive int, got {x!r}")
    if page_bytes % 4096:
        raise ValueError(f"page_bytes must be a multiple of 4096, got {page_bytes}")
    if max_resident_bytes < page_bytes:
        raise ValueError(
            f"max_resident_bytes ({max_resident_bytes}) is smaller than one page ({page_bytes} bytes); "
            f"raise max_resident_bytes or lower page_bytes"
        )
    if state_dir is not None and not os.path.isdir(state_dir):
        raise ValueError(f"state_dir {state_dir!r} is not an existing directory; create it or pass another one")
    return _native.PagedState(page_bytes, max_resident_bytes, state_dir)


def paged_adamw_step(store: Any, items: list[tuple[int, torch.Tensor, torch.Tensor, bool, dict[str, Any]]]) -> None:
    """One step of paged AdamW over ``items``, in their order.

    Each item is ``(slot, param, grad, eight_bit, hyper)`` with ``hyper`` the
    keyword arguments of :func:`adamw_step` (``step``, ``lr``, ``beta1``,
    ``beta2``, ``eps``, ``weight_decay``, ``maximize``); ``eight_bit`` picks
    :func:`adamw8bit_step`'s arithmetic, which the slot's state must match.
    The results equal those two functions bit for bit.
    """
    native_items = []
    for slot, param, grad, eight_bit, hyper in items:
        dtype, g = _optim_param(param, grad)
        hyper = dict(hyper)
        maximize = bool(hyper.pop("maximize", False))
        scalars = (_adamw8_scalars if eight_bit else _adamw_scalars)(**hyper)
        native_items.append(
            (slot, _flat_view(param), _flat_view(g), dtype, "adamw8" if eight_bit else "adamw",
             list(scalars.values()), maximize)
        )
    store.step(native_items, _threads())


def paged_state_read(store: Any, slot: int, numel: int, eight_bit: bool) -> dict[str, torch.Tensor]:
    """A parameter's paged state as new flat tensors, keyed as the unpaged optimizers key them."""
    if eight_bit:
        blocks = -(-numel // OPTIM_BLOCKSIZE)
        out = dict(
            state1=torch.empty(numel, dtype=torch.uint8),
            state2=torch.empty(numel, dtype=torch.uint8),
            absmax1=torch.empty(blocks, dtype=torch.float32),
            absmax2=torch.empty(blocks, dtype=torch.float32),
        )
        store.transfer_q8(slot, *(t.numpy() for t in out.values()), False)
    else:
        out = dict(exp_avg=torch.empty(numel, dtype=torch.float32), exp_avg_sq=torch.empty(numel, dtype=torch.float32))
        store.transfer_f32(slot, *(t.numpy() for t in out.values()), False)
    return out


def paged_state_write(store: Any, slot: int, state: dict[str, torch.Tensor], eight_bit: bool) -> None:
    """Replace a parameter's paged state with ``state`` (the keys :func:`paged_state_read` returns)."""
    keys = ("state1", "state2", "absmax1", "absmax2") if eight_bit else ("exp_avg", "exp_avg_sq")
    dtypes = (torch.uint8, torch.uint8, torch.float32, torch.float32) if eight_bit else (torch.float32, torch.float32)
    arrays = []
    for key, dtype in zip(keys, dtypes):
        t = state.get(key)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"the state to load lacks the tensor {key!r} (it has {sorted(state)})")
        if t.dtype != dtype:
            raise TypeError(f"state {key!r} must be {dtype} for this parameter, got {t.dtype}")
        # A private copy: the native side reads it while the GIL is released.
        arrays.append(t.detach().to("cpu").reshape(-1).contiguous().clone().numpy())
    if eight_bit:
        store.transfer_q8(slot, *arrays, True)
    else:
        store.transfer_f32(slot, *arrays, True)


# ------------------------------------------------------------------ pages


def copy_pages(
    src: torch.Tensor,
    dst: torch.Tensor,
    index: torch.Tensor,
    page_bytes: int,
    *,
    gather: bool = True,
    stream: Optional["torch.cuda.Stream"] = None,
) -> None:
    """Move whole pages of bytes between two buffers (for a paged optimizer).

    ``gather=True``: page ``i`` of ``dst`` = page ``index[i]`` of ``src``;
    ``gather=False``: page ``index[i]`` of ``dst`` = page ``i`` of ``src``.
    On CUDA tensors this is one kernel launch on ``stream`` (a side stream
    that overlaps the copies with compute; the caller orders it with events)
    or on the current stream; on CPU tensors, torch indexing.

    Args:
        src, dst: contiguous uint8 tensors on one device, whole pages each.
        index: int64 page numbers (on the CPU, or on the buffers' device;
            a CUDA index is range-checked with one synchronization).
        page_bytes: bytes per page (> 0).
    """
    for name, t in (("src", src), ("dst", dst), ("index", index)):
        _check_tensor(name, t)
    if src.dtype != torch.uint8 or dst.dtype != torch.uint8:
        raise TypeError(f"src and dst must be uint8 byte buffers, got {src.dtype} and {dst.dtype}")
    if index.dtype != torch.int64 or index.dim() != 1:
        raise TypeError(f"index must be a 1-D int64 tensor, got {index.dtype} with shape {tuple(index.shape)}")
    if isinstance(page_bytes, bool) or not isinstance(page_bytes, int) or page_bytes <= 0:
        raise ValueError(f"page_bytes must be a positive int, got {page_bytes!r}")
    if src.device != dst.device:
        raise ValueError(f"src is on {src.device} but dst on {dst.device}; both buffers must be on one device")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("src and dst must be contiguous")
    cuda = _on_cuda("src", src)
    for name, t in (("src", src), ("dst", dst)):
        if t.numel() % page_bytes:
            raise ValueError(f"{name} has {t.numel()} bytes, not a whole number of {page_bytes}-byte pages")
    n_pages = index.numel()
    many, few = (src, dst) if gather else (dst, src)
    if few.numel() < n_pages * page_bytes:
        raise ValueError(f"{n_pages} pages of {page_bytes} bytes do not fit in {few.numel()} bytes")
    if n_pages and (int(index.min()) < 0 or int(index.max()) >= many.numel() // page_bytes):
        raise ValueError(f"index must hold page numbers in [0, {many.numel() // page_bytes}), "
                         f"got {int(index.min())}..{int(index.max())}")
    if cuda:
        _cuda.copy_pages(src, dst, index, page_bytes, bool(gather), stream)
        return
    s_pages, d_pages = src.view(-1, page_bytes), dst.view(-1, page_bytes)
    if gather:
        d_pages[:n_pages] = s_pages[index]
    else:
        d_pages[index] = s_pages[:n_pages]
