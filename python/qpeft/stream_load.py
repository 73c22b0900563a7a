"""Quantize a plain safetensors model while reading it, one tensor at a time.

``transformers.from_pretrained`` followed by :func:`qpeft.quantize_model`
holds the whole dense model at once (and maps the weights file, whose pages
count as resident memory while mapped). Here the model is built on the meta
device and each tensor is read with plain file reads into its own buffer; a
linear layer's weight is quantized as soon as it is read and the dense copy
dropped, so peak memory is the quantized model plus the largest tensor.

The file layout (safetensors): an 8-byte little-endian header length, a JSON
header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` (offsets
relative to the end of the header), then the raw little-endian data.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

__all__ = ["load_quantizing", "read_safetensors"]

_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# A header larger than this is not a model's (and would be a way to exhaust memory).
_MAX_HEADER = 100 << 20


def _weight_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{str(index)!r} is not a valid shard index: {e!r}") from None
        files = [folder / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shards named by {str(index)!r} are missing: {missing[:3]}")
        return files
    raise FileNotFoundError(f"{str(folder)!r} has no model.safetensors (or model.safetensors.index.json)")


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` of a safetensors file in file order, each in fresh memory."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{str(path)!r} is not a safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{str(path)!r} is not a safetensors file (header length {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{str(path)!r} has a corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise ValueError(f"{str(path)!r} has a corrupt safetensors header (not a JSON object)")
        base = 8 + n
        entries = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = [int(d) for d in info["shape"]]
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{str(path)!r}: tensor {name!r} has a bad header entry {info!r}") from None
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if min(shape, default=0) < 0 or end - begin != nbytes or begin < 0 or base + end > size:
                raise ValueError(f"{str(path)!r}: tensor {name!r} (shape {shape}, {info['dtype']}) does not fit "
                                 f"its byte range [{begin}, {end}) in a {size}-byte file")
            entries.append((begin, name, dtype, shape, nbytes))
        for begin, name, dtype, shape, nbytes in sorted(entries):
            t = torch.empty(shape, dtype=dtype)
            f.seek(base + begin)
            if nbytes and f.readinto(t.view(-1).view(torch.uint8).numpy()) != nbytes:
                raise ValueError(f"{str(path)!r}: tensor {name!r} is truncated")
            yield name, t


def load_quantizing(
    folder: Path,
    dtype: torch.dtype,
    compute_dtype: Optional[torch.dtype],
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    skip: Optional[set[str]] = None,
) -> nn.Module:
    """The transformers model of ``folder`` with every linear layer but ``skip``
    (default: the output head) in 4 bits, read tensor by tensor.

    Float tensors are converted to ``dtype`` first (so the 4-bit codes are
    those :func:`qpeft.quantize_model` gives for a model loaded in ``dtype``).
    """
    from . import hf
    from .checkpoint import _describe, _empty_model, _set_module, _tie_pairs
    from .nn import Linear4bit, _is_linear, _matches, _output_head_names

    model = _empty_model(hf._transformers(), folder)
    skip_names = skip if skip is not None else _output_head_names(model)
    linears = {name: m for name, m in model.named_modules()
               if name and _is_linear(m) and not _matches(name, skip_names)}
    expected = dict(model.state_dict(keep_vars=True))
    pending: dict[str, dict[str, torch.Tensor]] = {}
    seen: set[str] = set()

    def place(name: str, t: torch.Tensor) -> None:
        owner, _, attr = name.rpartition(".")
        if owner in linears and attr in ("weight", "bias"):
            module = linears[owner]
            parts = pending.setdefault(owner, {})
            parts[attr] = t
            if "weight" in parts and ("bias" in parts or module.bias is None):
                _quantize_into(owner, module, parts)
                del pending[owner]
            return
        current = expected[name]
        if isinstance(current, nn.Parameter):
            t = nn.Parameter(t, requires_grad=current.requires_grad)
        _set_module(model, name, t)

    def _quantize_into(owner: str, module: nn.Module, parts: dict[str, torch.Tensor]) -> None:
        w = parts["weight"]
        if type(module).__name__ == "Conv1D":
            w = w.t()
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"layer {owner}: weight has {int((~torch.isfinite(w)).sum())} NaN/Inf values")
        dense = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None, device="meta")
        dense.weight = nn.Parameter(w, requires_grad=False)
        if module.bias is not None:
            dense.bias = nn.Parameter(parts["bias"], requires_grad=module.bias.requires_grad)
        new = Linear4bit.from_linear(dense, quant_type, blocksize, double_quant, compute_dtype)
        _set_module(model, owner, new)

    for path in _weight_files(folder):
        for name, t in read_safetensors(path):
            if name not in expected:
                raise ValueError(f"{str(path)!r} has tensor {name!r}, which the model does not have")
            want = tuple(expected[name].shape)
            if tuple(t.shape) != want:
                raise ValueError(f"{name!r}: the file's tensor has shape {list(t.shape)}, the model's {list(want)}")
            if t.is_floating_point():
                t = t.to(dtype)
            place(name, t)
            seen.add(name)
    # Tied parameters are stored once (transformers may keep either name).
    for target, source in _tie_pairs(model):
        if target not in seen and source in seen:
            _set_module(model, target, model.get_parameter(source))
            seen.add(target)
        elif source not in seen and target in seen:
            _set_module(model, source, model.get_parameter(target))
            seen.add(source)
    missing = sorted(set(expected) - seen - set(dict(model.named_buffers())))
    if missing or pending:
        raise ValueError(f"{str(folder)!r} lacks {_describe(missing or sorted(pending))}")
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ValueError(f"{str(folder)!r} left {_describe(still_meta)} without values")
    model.eval()
    return model
