"""Autograd for 4-bit weights: a matmul whose frozen weight is NF4/FP4.

The forward runs :func:`qpeft.functional.linear_4bit` (the fused 4-bit
kernel for a few tokens, else dequantize + ``F.linear``); the backward
dequantizes again to get the input gradient. Only
the packed weight (about 4.13 bits per parameter) is saved for backward, never
a dense copy, so a model's activations plus its 4-bit weights are all that
training holds. The weight gets no gradient (it is frozen); the bias gets one
when it requires it.

``torch.compile`` runs this function eagerly: the kernels behind it are
opaque to dynamo, which breaks the graph around each call (correct, not
fused).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import functional

__all__ = ["MatMul4bit", "matmul_4bit"]

#: Whether autocast is on for any device (torch's own private check; every
#: torch 2 has it); without it, assume it may be and ask per device.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype for ``x``'s device, or ``None`` where autocast is off.

    Asks first whether any autocast is on: ``x.device`` makes a torch.device
    object and ``is_autocast_enabled(device)`` parses it, about 50 us together
    when a dense layer has just flushed the caches (a tenth of a one-token
    4096 x 4096 call); the quick check costs a few.
    """
    if not _any_autocast():
        return None
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class MatMul4bit(torch.autograd.Function):
    """``y = x @ W.T + bias`` with W stored in 4 bits (bitsandbytes layout)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, quant_state, bias: Optional[torch.Tensor]):
        out = functional.linear_4bit(x, weight, quant_state)
        if bias is not None:
            out = out + bias.to(out.dtype)
        ctx.quant_state = quant_state
        ctx.bias_dtype = None if bias is None else bias.dtype
        # The packed weight only: the dense one is rebuilt in backward.
        ctx.save_for_backward(weight)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = functional.grad_input_4bit(grad_out, weight, ctx.quant_state)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias


def matmul_4bit(
    x: torch.Tensor,
    weight: torch.Tensor,
    quant_state,
    bias: Optional[torch.Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for a 4-bit ``weight`` described by ``quant_state``.

    Args:
        x: input of shape ``[..., in_features]``.
        weight: packed uint8 codes from :func:`qpeft.quantize_4bit`.
        quant_state: its :class:`qpeft.QuantState` (shape ``(out_features, in_features)``).
        bias: optional ``[out_features]`` bias.
        compute_dtype: dtype of the matmul; default: the autocast dtype under
            ``torch.autocast``, else ``x``'s dtype. The result has ``x``'s
            dtype (the autocast dtype under autocast), as in bitsandbytes.
    """
    if x.shape[-1] != quant_state.shape[-1]:
        raise ValueError(
            f"input has {x.shape[-1]} features but the 4-bit weight of shape "
            f"{tuple(quant_state.shape)} expects {quant_state.shape[-1]}"
        )
    out_dtype = x.dtype
    if compute_dtype is None:
        auto = _autocast_dtype(x)
        if auto is not None:
            # Like F.linear under autocast: compute and return in the autocast dtype.
            compute_dtype = out_dtype = auto
    if compute_dtype is not None and x.dtype != compute_dtype:
        x = x.to(compute_dtype)
    grad = torch.is_grad_enabled()
    if not grad or not (x.requires_grad or (bias is not None and bias.requires_grad)):
        # Inference: no graph, no saved tensors. (Nothing here requires grad, so
        # autograd records nothing even without a no_grad context, which would
        # cost more than a small decode matmul's kernel.)
        out = functional.linear_4bit(x, weight, quant_state)
        if bias is not None:
            out = out.add_(bias if bias.dtype == out.dtype else bias.to(out.dtype))
    else:
        with torch.autocast(x.device.type, enabled=False):
            out = MatMul4bit.apply(x, weight, quant_state, bias)
    # An explicit compute dtype is internal: the caller gets its own dtype back.
    return out if out.dtype == out_dtype else out.to(out_dtype)
