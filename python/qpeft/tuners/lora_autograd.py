"""LoRA (and DoRA) on a 4-bit base weight as one autograd function.

``y = x W^T + bias + s (drop(x) A^T) B^T`` where ``W`` is stored in 4 bits.
Composing :class:`qpeft.autograd.MatMul4bit` with two ``nn.Linear`` would save
``x`` twice and, for DoRA, dequantize ``W`` up to three times per step. Here
the forward dequantizes ``W`` once (or runs the fused few-token kernel), the
backward once more, and only these are kept for backward: the packed weight,
``x`` (or ``drop(x)`` and the dropout mask), ``h = drop(x) A^T`` (tokens x r),
``A``, ``B`` and, for DoRA, the magnitude and the row norms -- never a dense ``W``.

With DoRA (Liu et al. 2024, in PEFT's form) and ``g = m / ||W + s B A||``
(row norms, treated as a constant as the paper's section 4.3 suggests)::

    y = x W^T + bias + (g - 1) * (drop(x) W^T) + g * s * (h B^T)
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .. import functional
from ..autograd import _any_autocast, _autocast_dtype

__all__ = ["LoraMatMul4bit", "addmm_into", "dora_weight_norm", "lora_linear_4bit"]


def addmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``out += alpha * (a @ b)`` in place, for a contiguous ``out [..., n]`` and ``a [..., k]``.

    The product is accumulated inside the matmul (one rounding, no
    ``[tokens, n]`` temporary), which for a rank-r term costs a fraction of a
    separate product and sum: those are bound by memory traffic, not arithmetic.
    """
    out.view(-1, out.shape[-1]).addmm_(a.reshape(-1, a.shape[-1]), b, alpha=alpha)
    return out


def dora_weight_norm(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, inplace: bool = False
) -> torch.Tensor:
    """Row norms ``||W + s B A||_2`` of an ``[out, in]`` weight, in ``A``'s dtype.

    Rounded as PEFT rounds them (``W + s * (B @ A)``, then the norm): DoRA
    divides by this norm, and a last-bit difference here shows in the logits.
    With ``inplace`` the sum is formed in ``weight``'s own memory (which is
    overwritten), so no second ``[out, in]`` tensor is allocated.
    """
    if inplace and weight.dtype == A.dtype:
        W = weight.addmm_(B, A, alpha=scaling)
    else:
        W = weight.to(A.dtype) + scaling * (B @ A)
    return torch.linalg.norm(W, dim=1)


class _Forward(NamedTuple):
    """What :func:`_forward` computed, and what backward needs of it."""

    out: torch.Tensor
    compute_dtype: torch.dtype
    lora_dtype: torch.dtype
    fused: bool
    xd: torch.Tensor
    h: torch.Tensor
    norm: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]


def _forward(x, weight, quant_state, bias, A, B, magnitude, scaling: float, dropout_p: float,
             lora_dtype: Optional[torch.dtype], compute_dtype: Optional[torch.dtype]) -> _Forward:
    """The forward of :class:`LoraMatMul4bit` (arguments as there), without autograd.

    Inference calls it directly; the autograd function keeps what it returns
    for backward.
    """
    # The base matmul runs in compute_dtype; its output is widened back to
    # x's dtype before the adapter term is added (as bitsandbytes + PEFT
    # do), so with fp32 activations a small adapter update is not lost in
    # the rounding of a bf16 sum.
    out_dtype = x.dtype
    compute_dtype = out_dtype if compute_dtype is None or magnitude is not None else compute_dtype
    # The adapter's matmuls run in lora_dtype (default: the adapter's own);
    # gradients are returned in the adapter's dtype either way.
    compute_path = lora_dtype is not None and magnitude is None
    lora_dtype = lora_dtype if compute_path else A.dtype
    # (`.to` only where the dtype changes: each call costs a few us, which
    # decoding pays per layer and token.)
    A_ = A if A.dtype == lora_dtype else A.to(lora_dtype)
    B_ = B if B.dtype == lora_dtype else B.to(lora_dtype)
    xd = x if x.dtype == lora_dtype else x.to(lora_dtype)
    mask = None
    if dropout_p > 0.0:
        # Drawn as torch's CPU dropout draws it, so a seeded run matches nn.Dropout's.
        keep = torch.empty_like(xd).bernoulli_(1.0 - dropout_p).div_(1.0 - dropout_p)
        mask = keep != 0
        xd = xd * keep
    norm = None
    if compute_path and bias is None and mask is None and compute_dtype == lora_dtype:
        # The trainer's fast path: base and adapter summed inside the matmul
        # (rounded once; see functional.lora_matmul).
        out, h = functional.linear_4bit_lora(xd.reshape(-1, xd.shape[-1]), weight, quant_state, A, B, scaling)
        out = out.view(*x.shape[:-1], out.shape[-1])
        fused = True
    elif magnitude is None:
        h = xd @ A_.t()
        # Sums are formed in PEFT's order (base output with bias first, then
        # the adapter term), so equal weights give equal logits to the last bit.
        xc = x if compute_dtype == out_dtype else x.to(compute_dtype)
        result = functional.linear_4bit(xc, weight, quant_state)
        if bias is not None:
            result = result + bias.to(result.dtype)
        if result.dtype != out_dtype:
            result = result.to(out_dtype)
        # The compute-dtype path with a bias accumulates the adapter into the
        # fresh result inside the matmul: no [tokens, out] temporaries.
        fused = compute_path and result.dtype == lora_dtype and result.is_contiguous()
        if fused:
            out = addmm_into(result, h, B_.t(), scaling)
        elif lora_dtype == torch.float32:
            # PEFT's float32 sum, rounded to out_dtype, formed in result's memory.
            out = functional.lora_up_add_(result, h, B_.t(), scaling)
        else:
            out = result.to(lora_dtype) + (h @ B_.t()) * scaling
    else:
        h = xd @ A_.t()
        W = functional.dequantize_4bit(weight, quant_state).to(x.dtype)
        base = F.linear(x, W)
        result = base if bias is None else base + bias.to(base.dtype)
        if mask is None:
            base_d = base if bias is None else result - bias.to(base.dtype)
        else:
            base_d = F.linear(xd.to(x.dtype), W)
        # W is a fresh tensor and no longer needed: the norm may overwrite it.
        norm = dora_weight_norm(W, A, B, scaling, inplace=True)
        del W
        g = magnitude / norm
        fused = False
        out = result.to(lora_dtype) + ((g - 1) * base_d.to(lora_dtype) + g * (h @ B_.t()) * scaling)
    if out.dtype != out_dtype:
        out = out.to(out_dtype)
    return _Forward(out, compute_dtype, lora_dtype, fused, xd, h, norm, mask)


class LoraMatMul4bit(torch.autograd.Function):
    """Forward and backward of a LoRA (optionally DoRA) layer over a frozen 4-bit weight."""

    @staticmethod
    def forward(ctx, x, weight, quant_state, bias, A, B, magnitude, scaling: float, dropout_p: float,
                lora_dtype: Optional[torch.dtype] = None, compute_dtype: Optional[torch.dtype] = None):
        f = _forward(x, weight, quant_state, bias, A, B, magnitude, scaling, dropout_p, lora_dtype, compute_dtype)
        ctx.compute_dtype = f.compute_dtype
        ctx.lora_dtype = f.lora_dtype
        ctx.fused = f.fused
        ctx.quant_state = quant_state
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # Without dropout the LoRA input is x itself: keep x (no copy, in its own
        # dtype) and widen it in backward, which is exact.
        ctx.save_for_backward(weight, x if f.mask is None else f.xd, f.h, A, B, magnitude, f.norm, f.mask)
        return f.out

    @staticmethod
    def backward(ctx, grad_out):
        weight, xd, h, A32, B32, magnitude, norm, mask = ctx.saved_tensors
        A, B = A32.to(ctx.lora_dtype), B32.to(ctx.lora_dtype)
        xd = xd.to(A.dtype)
        g = None if magnitude is None else magnitude / norm
        s = ctx.scaling
        dy = grad_out.to(A.dtype)
        dy2 = dy.reshape(-1, dy.shape[-1])
        grad_x = grad_bias = grad_A = grad_B = grad_m = None
        # The gradient of the LoRA output (and of the DoRA direction) is dy scaled by g.
        dyg = dy if g is None else dy * g
        dh = s * (dyg @ B)
        need_x, need_A, need_B, need_m = (ctx.needs_input_grad[i] for i in (0, 4, 5, 6))
        if need_B:
            grad_B = (s * (dyg.reshape(-1, dyg.shape[-1]).t() @ h.reshape(-1, h.shape[-1]))).to(B32.dtype)
        if need_A:
            grad_A = (dh.reshape(-1, dh.shape[-1]).t() @ xd.reshape(-1, xd.shape[-1])).to(A32.dtype)
        W = None
        if g is not None and (need_m or need_x):
            # One dequantization serves both the input gradient and the magnitude's.
            W = functional.dequantize_4bit(weight, ctx.quant_state).to(A.dtype)
        if need_m:
            direction = F.linear(xd, W) + s * (h @ B.t())
            grad_m = (dy * direction).reshape(-1, dy.shape[-1]).sum(0) / norm
        if need_x:
            if g is None:
                grad_x = functional.grad_input_4bit(grad_out.to(ctx.compute_dtype), weight, ctx.quant_state)
                if mask is None and not ctx.fused and A.dtype == torch.float32:
                    # float32(grad_x) + dh A, rounded once to x's dtype, in one pass.
                    if grad_x.dtype not in (ctx.x_dtype, torch.float32):
                        grad_x = grad_x.float()
                    grad_x = functional.lora_up_add_(grad_x, dh, A)
                    lora_in = None
                else:
                    grad_x = grad_x.to(A.dtype)
                    if ctx.fused and mask is None and grad_x.is_contiguous():
                        # As in forward: the adapter's share goes into the fresh gradient.
                        addmm_into(grad_x, dh, A)
                        lora_in = None
                    else:
                        lora_in = dh @ A
            elif mask is None:
                grad_x = dyg @ W
                lora_in = dh @ A
            else:
                grad_x = dy @ W
                lora_in = (dy * (g - 1)) @ W + dh @ A
            if mask is not None:
                lora_in = lora_in * (mask.to(lora_in.dtype) / (1.0 - ctx.dropout_p))
            grad_x = (grad_x if lora_in is None else grad_x + lora_in).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = dy2.sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias, grad_A, grad_B, grad_m, None, None, None, None


def lora_linear_4bit(
    x: torch.Tensor,
    base,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    magnitude: Optional[torch.Tensor] = None,
    lora_in_compute_dtype: bool = False,
) -> torch.Tensor:
    """LoRA output of a :class:`qpeft.nn.Linear4bit` ``base`` with one adapter.

    Args:
        x: input ``[..., in_features]``; the base matmul runs in ``x``'s dtype
            (or ``base.compute_dtype`` / the autocast dtype, as
            :class:`~qpeft.nn.Linear4bit` does).
        A, B: LoRA factors ``[r, in]`` and ``[out, r]``; the LoRA path runs in
            their dtype.
        scaling: factor on ``B A``.
        dropout_p: dropout probability on the LoRA path's input (pass 0 in eval mode).
        magnitude: DoRA magnitude ``[out]``, or ``None`` for plain LoRA.
        lora_in_compute_dtype: run the LoRA matmuls in the compute dtype rather
            than the adapter's (no fp32 copies of bf16 activations; plain LoRA only).

    Returns:
        ``[..., out_features]`` in ``x``'s dtype (the autocast dtype under autocast).
    """
    qs = base.quant_state
    if x.shape[-1] != base.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {base.in_features}")
    compute_dtype = base.compute_dtype
    out_dtype = x.dtype
    auto = _autocast_dtype(x) if compute_dtype is None else None
    if auto is not None:
        compute_dtype = out_dtype = auto
    if compute_dtype is not None and x.dtype != compute_dtype and (magnitude is not None or x.dtype != out_dtype):
        # Autocast (the whole layer in its dtype) and DoRA (whose direction
        # and norm are formed in the compute dtype) take the cast input.
        x = x.to(compute_dtype)
    weight, bias = base.weight, base.bias
    args = (x, weight, qs, bias, A, B, magnitude, float(scaling), float(dropout_p),
            x.dtype if lora_in_compute_dtype else None, compute_dtype)
    with torch.autocast(x.device.type, enabled=False) if _any_autocast() else contextlib.nullcontext():
        if functional._records(*(t for t in (x, bias, A, B, magnitude) if t is not None)):
            out = LoraMatMul4bit.apply(*args)
        else:
            # Nothing to differentiate (generation, evaluation): the same
            # forward without the autograd function and what it keeps.
            out = _forward(*args).out
    return out if out.dtype == out_dtype else out.to(out_dtype)
