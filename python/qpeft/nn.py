"""4-bit linear layers and whole-model quantization.

:class:`Linear4bit` is a drop-in ``nn.Linear`` whose weight is stored as
NF4/FP4 codes with (optionally double-quantized) block scales, in the exact
layout and state-dict keys of bitsandbytes' ``Linear4bit``. The weight is
frozen; the bias may train. :func:`quantize_model` swaps a model's linear
layers for it, one layer at a time.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn

from . import functional
from .autograd import matmul_4bit
from .functional import QuantState

__all__ = ["Linear4bit", "quantize_model", "dequantize_model"]


class Linear4bit(nn.Module):
    """``nn.Linear`` with a frozen 4-bit weight.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``;
            the weight is initialised as ``nn.Linear`` does, then quantized.
            ``dtype`` is the dtype the weight dequantizes to.
        quant_type: ``"nf4"`` (default) or ``"fp4"``.
        blocksize: elements per scale (default 64).
        double_quant: quantize the scales too (about 4.13 instead of 4.5 bits
            per parameter).
        compute_dtype: dtype of the matmul; ``None`` (default) uses the
            input's dtype (or the autocast dtype).

    Attributes:
        weight: the packed codes, a frozen uint8 ``Parameter`` of shape
            ``((out*in + 1) // 2, 1)``; moves with ``.to()`` like any parameter.
        quant_state: the :class:`qpeft.QuantState` (scales, code book, shape);
            its tensors follow the module across devices.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype: Optional[torch.dtype] = None,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dense = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
        self._init_from(dense.weight.detach(), dense.bias, quant_type, blocksize, double_quant, compute_dtype)
        if device is not None:
            self.to(device)

    def _init_from(self, weight, bias, quant_type, blocksize, double_quant, compute_dtype) -> None:
        self.out_features, self.in_features = weight.shape
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        packed, state = functional.quantize_4bit(
            weight.detach().cpu(), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
        )
        self.weight = nn.Parameter(packed.to(weight.device), requires_grad=False)
        self.quant_state = state.to(weight.device)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
    ) -> "Linear4bit":
        """Quantize an existing ``nn.Linear`` (or transformers ``Conv1D``) without copying it first."""
        weight = _linear_weight(linear)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_from(weight, getattr(linear, "bias", None), quant_type, blocksize, double_quant, compute_dtype)
        return layer

    @classmethod
    def from_quantized(
        cls,
        weight: torch.Tensor,
        quant_state: QuantState,
        bias: Optional[torch.Tensor] = None,
        compute_dtype: Optional[torch.dtype] = None,
    ) -> "Linear4bit":
        """A layer around an already-quantized weight: ``weight, quant_state = quantize_4bit(W)``.

        The packed weight and the state are used as they are (not copied); the
        bias is copied and keeps its ``requires_grad``.
        """
        shape = tuple(quant_state.shape) if quant_state.shape is not None else ()
        if len(shape) != 2 or quant_state.quant_type not in functional.QUANT_TYPES:
            raise ValueError(
                f"expected the state of a 4-bit [out_features, in_features] weight, got {quant_state!r}"
            )
        nbytes = weight.numel() * weight.element_size()
        if nbytes != (math.prod(shape) + 1) // 2:
            need = (math.prod(shape) + 1) // 2
            raise ValueError(f"packed weight has {nbytes} bytes, shape {list(shape)} needs {need}")
        if weight.dtype != torch.uint8:
            weight = weight.reshape(-1).view(torch.uint8).reshape(-1, 1)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features = shape
        layer.quant_type, layer.blocksize = quant_state.quant_type, quant_state.blocksize
        layer.double_quant = quant_state.nested
        layer.compute_dtype = compute_dtype
        layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
        layer.quant_state = quant_state
        if bias is None:
            layer.register_parameter("bias", None)
        else:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return layer

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: Optional[torch.dtype] = None,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> "Linear4bit":
        """A layer shell to load a 4-bit state dict into; nothing is quantized.

        The packed weight is allocated (uninitialised) with its final shape and
        the scales are zeros, so the shell computes ``x @ 0 + bias`` until
        :meth:`load_state_dict` fills it. ``dtype`` is the dtype the weight
        dequantizes to (default: torch's default dtype); the bias is zero.
        """
        functional._check_blocksize(blocksize)
        functional._check_quant_type(quant_type)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features = out_features, in_features
        layer.quant_type, layer.blocksize, layer.double_quant = quant_type, blocksize, double_quant
        layer.compute_dtype = compute_dtype
        packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device)
        layer.weight = nn.Parameter(packed, requires_grad=False)
        code = functional.get_4bit_type(quant_type, device=device)
        if double_quant:
            nested_bs = functional.NESTED_BLOCKSIZE
            state2 = QuantState(
                absmax=torch.zeros(-(-n_blocks // nested_bs), dtype=torch.float32, device=device),
                code=functional.create_dynamic_map(signed=True).to(device),
                blocksize=nested_bs,
                dtype=torch.float32,
            )
            layer.quant_state = QuantState(
                absmax=torch.zeros(n_blocks, dtype=torch.uint8, device=device),
                shape=(out_features, in_features),
                code=code,
                blocksize=blocksize,
                quant_type=quant_type,
                dtype=dtype,
                offset=torch.zeros((), dtype=torch.float32, device=device),
                state2=state2,
            )
        else:
            layer.quant_state = QuantState(
                absmax=torch.zeros(n_blocks, dtype=torch.float32, device=device),
                shape=(out_features, in_features),
                code=code,
                blocksize=blocksize,
                quant_type=quant_type,
                dtype=dtype,
            )
        if bias:
            layer.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            layer.register_parameter("bias", None)
        return layer

    def dequantize(self) -> torch.Tensor:
        """The dense weight, ``[out_features, in_features]`` in the original dtype."""
        return functional.dequantize_4bit(self.weight, self.quant_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The parameters straight from their dict: `self.weight` goes through
        # nn.Module.__getattr__, a Python call per name, about 10 us each
        # when a dense layer has just flushed the caches (a one-token
        # 4096 x 4096 call takes 0.3 ms). Anything that replaces a parameter
        # (load_state_dict, accelerate's hooks) replaces it in this dict.
        params = self._parameters
        weight, bias = params.get("weight"), params.get("bias")
        if weight is None:  # the name is something else now (a property of a subclass, ...)
            weight, bias = self.weight, self.bias
        return matmul_4bit(x, weight, self.quant_state, bias, self.compute_dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}"
        )

    # -- devices: the quant state's tensors follow the parameters, dtype unchanged

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        st = self.quant_state
        device = self.weight.device
        st.to(device)
        return self

    # -- state dict in bitsandbytes' keys: weight, weight.absmax, weight.quant_map, ...

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.quant_state.as_dict(packed=True).items():
            destination[f"{prefix}weight.{key}"] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        qs_prefix = f"{prefix}weight."
        qs_items = {k[len(qs_prefix):]: state_dict[k] for k in list(state_dict) if k.startswith(qs_prefix)}
        if qs_items:
            try:
                state = QuantState.from_dict(qs_items, device=self.weight.device)
            except ValueError as e:
                error_msgs.append(f"{prefix.rstrip('.') or 'Linear4bit'}: {e}")
                return
            if tuple(state.shape) != (self.out_features, self.in_features):
                error_msgs.append(
                    f"{prefix.rstrip('.')}: checkpoint weight has shape {tuple(state.shape)}, "
                    f"the layer expects {(self.out_features, self.in_features)}"
                )
                return
            packed = state_dict.get(f"{prefix}weight")
            if packed is not None and packed.numel() * packed.element_size() != (math.prod(state.shape) + 1) // 2:
                error_msgs.append(
                    f"{prefix.rstrip('.')}: packed weight has {packed.numel() * packed.element_size()} bytes, "
                    f"shape {tuple(state.shape)} needs {(math.prod(state.shape) + 1) // 2}"
                )
                return
            if packed is not None and packed.dtype != torch.uint8:
                state_dict[f"{prefix}weight"] = packed.reshape(-1).view(torch.uint8).reshape(-1, 1)
            for k in [k for k in state_dict if k.startswith(qs_prefix)]:
                del state_dict[k]
            self.quant_state = state
            self.quant_type, self.blocksize, self.double_quant = state.quant_type, state.blocksize, state.nested
        elif f"{prefix}weight" in state_dict:
            missing_keys.append(f"{prefix}weight.quant_state")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of an ``nn.Linear`` or a transformers ``Conv1D`` (stored ``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.detach().t()
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output projection (transformers' output embeddings, or ``lm_head``)."""
    names = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, module in model.named_modules():
        if (head is not None and module is head) or name.split(".")[-1] == "lm_head":
            names.add(name)
    return names


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def quantize_model(
    model: nn.Module,
    skip: Optional[Iterable[str]] = None,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` (and transformers ``Conv1D``) with :class:`Linear4bit`, in place.

    Layers are replaced one at a time, so peak memory stays near the quantized
    model plus one dense layer. All weights are checked for NaN/Inf before any
    layer changes: on error the model is left untouched and the message names
    the layer.

    Args:
        skip: module names (or name suffixes) to keep dense; default: the
            output head (``get_output_embeddings()`` / ``lm_head``).
        quant_type, blocksize, double_quant, compute_dtype: as for :class:`Linear4bit`.

    Returns:
        ``model``, modified in place.
    """
    functional._check_blocksize(blocksize)
    functional._check_quant_type(quant_type)
    skip_names = set(skip) if skip is not None else _output_head_names(model)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name and _is_linear(module) and not _matches(name, skip_names)
    ]
    for name, module in targets:
        w = _linear_weight(module)
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"layer {name}: weight dtype {w.dtype} cannot be quantized (float32/16 or bfloat16)")
        if not bool(torch.isfinite(w).all()):
            bad = int((~torch.isfinite(w)).sum())
            raise ValueError(f"layer {name}: weight has {bad} NaN/Inf values; no layer was quantized")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = Linear4bit.from_linear(module, quant_type, blocksize, double_quant, compute_dtype)
        new.train(module.training)
        setattr(parent, child, new)
    return model


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every :class:`Linear4bit` with an ``nn.Linear`` holding its dequantized weight, in place."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    for name, module in targets:
        w = module.dequantize()
        if dtype is not None:
            w = w.to(dtype)
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(w)
            if module.bias is not None:
                dense.bias.copy_(module.bias.to(w.dtype))
        dense.train(module.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, dense)
    return model
