"""The feed-forward half of a decoder layer as one autograd function that keeps only its input.

``x + down(silu(gate(n)) * up(n))`` with ``n = rmsnorm(x)``, where gate, up and
down are LoRA layers on frozen 4-bit weights. Autograd would keep ``n``, the
gate and up outputs and the down projection's input (10 of the 17 MB a
SmolLM2 layer keeps per 1,024 tokens); generic checkpointing keeps only ``x``
but replays the whole block, the down projection's matmul and three
dequantizations included. :class:`RecomputedMLP` keeps ``x`` (and the
norm's per-token scale) and in backward recomputes only the gate and up
outputs, from the same dequantized weights that their input gradient needs
anyway. Forward values are bit-identical to the LoRA layers' own forward on
the trainer's fast path (base and adapter in one matmul, rounded once).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from .. import functional
from .._scratch import scratch
from ..tuners.lora_autograd import addmm_into

__all__ = ["RecomputedMLP", "fused_mlp_parts", "rmsnorm_values"]


def _lora_parts(layer: Any) -> Optional[tuple]:
    """(packed weight, quant state, A, B, scaling) of a LoRA layer this function can take, else None."""
    from ..tuners.lora import LoraLinear

    if not isinstance(layer, LoraLinear) or not layer.is_4bit or not layer.lora_in_compute_dtype:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if layer.disabled or layer.merged_adapters or len(active) != 1:
        return None
    name = active[0]
    drop = layer.lora_dropout[name]
    if name in layer.lora_magnitude_vector or (isinstance(drop, torch.nn.Dropout) and drop.training and drop.p > 0):
        return None
    base = layer.base_layer
    if base.bias is not None:
        return None
    return base.weight, base.quant_state, layer.lora_A[name], layer.lora_B[name], float(layer.scaling[name])


def fused_mlp_parts(norm: Any, mlp: Any) -> Optional[tuple]:
    """The arguments :class:`RecomputedMLP` needs for ``mlp(norm(x))``, or None when
    a layer is not a plain single-adapter LoRA on a 4-bit weight (dropout, DoRA,
    several or merged adapters, a bias: the caller falls back to checkpointing)."""
    parts = [_lora_parts(getattr(mlp, n, None)) for n in ("gate_proj", "up_proj", "down_proj")]
    if any(p is None for p in parts):
        return None
    if norm.weight.requires_grad:
        return None  # a trained norm needs its own gradient: not computed here
    compute = mlp.gate_proj.base_layer.compute_dtype
    return (norm.weight, float(norm.variance_epsilon), compute, *parts)


def rmsnorm_values(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * (x * s).to(x.dtype), s)`` with ``s = rsqrt(mean(x^2) + eps)`` in float32:
    transformers' RMSNorm, bit for bit, with its float32 temporaries in
    scratch buffers for 16-bit ``x`` (each fresh multi-megabyte tensor costs
    page faults as well as a pass). The first value goes to ``out``
    (``x``'s shape and dtype) when given and the weight's dtype is ``x``'s."""
    if x.dtype == torch.float32:
        x32, buf = x, torch.empty_like(x)  # x32 is x itself; the result must not be a scratch buffer
    else:
        x32 = scratch("rmsnorm-x32", x.shape, torch.float32, x.device).copy_(x)
        buf = scratch("rmsnorm-square", x.shape, torch.float32, x.device)
    torch.pow(x32, 2, out=buf)
    scale = torch.rsqrt(buf.mean(-1, keepdim=True) + eps)
    return _apply_scale(x32, scale, weight, x.dtype, buf, out), scale


def _apply_scale(x32: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype,
                 buf: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """``weight * (x32 * scale).to(dtype)``, using ``buf`` (float32, ``x32``'s shape) for the product."""
    torch.mul(x32, scale, out=buf)
    in_place = weight.dtype == dtype and weight.shape == x32.shape[-1:]
    if out is not None and in_place:
        xs = out.copy_(buf)
    else:
        xs = buf.to(dtype) if dtype != torch.float32 else buf
    # weight * xs, computed in place where the result has xs's dtype (products commute exactly).
    if in_place:
        return xs.mul_(weight)
    return weight * xs


def _lora_out(x: torch.Tensor, wq: torch.Tensor, qs: Any, A: torch.Tensor, B: torch.Tensor, s: float,
              slot: int, key: str) -> tuple:
    # Backward's recomputation: the forward's values (functional.linear_4bit_lora)
    # and the dense weight the input gradient needs anyway (valid until the
    # slot's next use); returns (output, x A^T, W), the first two shaped as x.
    # The output is a scratch buffer (``key``): it dies with the backward.
    flat, out = _flat_and_out(x, qs, key)
    y, a, W = functional.lora_matmul_4bit(flat, wq, qs, A, B, s, slot, out=out)
    return y.view(*x.shape[:-1], y.shape[-1]), a.view(*x.shape[:-1], a.shape[-1]), W


def _lora_out_4bit(x: torch.Tensor, wq: torch.Tensor, qs: Any, A: torch.Tensor, B: torch.Tensor, s: float,
                   key: Optional[str] = None):
    # With ``key``, the output is that scratch buffer (a temporary of the caller).
    flat, out = _flat_and_out(x, qs, key)
    y, _ = functional.linear_4bit_lora(flat, wq, qs, A, B, s, out=out)
    return y.view(*x.shape[:-1], y.shape[-1])


def _flat_and_out(x: torch.Tensor, qs: Any, key: Optional[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``x`` as ``[tokens, in]`` and, with ``key``, that scratch buffer as ``[tokens, out]`` for the product."""
    flat = x.reshape(-1, x.shape[-1])
    return flat, None if key is None else scratch(key, (flat.shape[0], int(qs.shape[0])), x.dtype, x.device)


def _scratch_for(key: str, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return scratch(key, tuple(like.shape), dtype or like.dtype, like.device)


class RecomputedMLP(torch.autograd.Function):
    """``down(silu(gate(n)) * up(n))``, ``n = rmsnorm(x)``; see the module docstring.

    Arguments after ``x``: the norm's weight and epsilon, the compute dtype and,
    for gate, up and down, ``(packed weight, quant_state, A, B, scaling)``.
    Gradients flow to ``x`` and to the six adapter matrices.
    """

    @staticmethod
    def forward(ctx, x, norm_w, eps, compute, gate, up, down, *adapters):
        dtype = compute or x.dtype
        # n, the gate and up outputs and their product die here: scratch buffers.
        n, scale = rmsnorm_values(x, norm_w, eps, out=_scratch_for("mlp-norm", x) if dtype == x.dtype else None)
        n = n.to(dtype)
        parts = []
        for (wq, qs, _, _, s), (A, B), key in zip((gate, up), (adapters[0:2], adapters[2:4]), ("mlp-gate", "mlp-up")):
            parts.append(_lora_out_4bit(n, wq, qs, A, B, s, key))
        # In place: the gate output is not kept, and a fresh multi-megabyte tensor costs page faults.
        h = F.silu(parts[0], inplace=True).mul_(parts[1])
        del parts
        wq, qs, _, _, s = down
        out = _lora_out_4bit(h, wq, qs, adapters[4], adapters[5], s)
        ctx.eps, ctx.dtype, ctx.x_dtype = eps, dtype, x.dtype
        ctx.states = (gate[1], up[1], down[1])
        ctx.scalings = (gate[4], up[4], down[4])
        ctx.save_for_backward(x, scale, norm_w, gate[0], up[0], down[0], *adapters)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, d_out):
        x, scale, norm_w, wg, wu, wd, Ag, Bg, Au, Bu, Ad, Bd = ctx.saved_tensors
        dtype = ctx.dtype
        (qg, qu, qd), (sg, su, sd) = ctx.states, ctx.scalings
        # The forward's n, gate and up outputs again, in scratch buffers (they die here).
        x32 = _scratch_for("rmsnorm-x32", x, torch.float32).copy_(x)
        same = dtype == x.dtype
        n = _apply_scale(x32, scale, norm_w, x.dtype, x32, _scratch_for("mlp-norm", x) if same else None).to(dtype)
        # Two slots: both dense weights serve the input gradient below.
        g, ag, Wg = _lora_out(n, wg, qg, Ag, Bg, sg, 0, "mlp-gate")
        u, au, Wu = _lora_out(n, wu, qu, Au, Bu, su, 1, "mlp-up")
        # Exactly the forward's down-projection input.
        h = torch.ops.aten.silu.out(g, out=_scratch_for("mlp-product", g)).mul_(u)
        dy = d_out.to(dtype)
        flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
        # Down projection: LoRA gradients, then the input gradient.
        ad = h @ Ad.to(dtype).t()
        grads = [None] * 6
        grads[5] = (sd * (flat(dy).t() @ flat(ad))).to(Bd.dtype)
        td = sd * (dy @ Bd.to(dtype))
        grads[4] = (flat(td).t() @ flat(h)).to(Ad.dtype)
        # The gradients below die here too: scratch buffers.
        dh = addmm_into(functional.grad_input_4bit(dy, wd, qd, out=_scratch_for("mlp-dh", h)), td, Ad.to(dtype))
        del h, ad, td
        dg, du = functional.swiglu_backward(g, u, dh, out=(_scratch_for("mlp-dgate", g), _scratch_for("mlp-dup", u)))
        del dh, g, u
        dn = None
        for dyk, ak, W, A, B, s, i in ((dg, ag, Wg, Ag, Bg, sg, 0), (du, au, Wu, Au, Bu, su, 2)):
            grads[i + 1] = (s * (flat(dyk).t() @ flat(ak))).to(B.dtype)
            t = s * (dyk @ B.to(dtype))
            grads[i] = (flat(t).t() @ flat(n)).to(A.dtype)
            dn = torch.matmul(dyk, W, out=_scratch_for("mlp-dn", x, dtype)) if dn is None else addmm_into(dn, dyk, W)
            addmm_into(dn, t, A.to(dtype))
        # The norm's weight is frozen here (fused_mlp_parts checks).
        dx = functional.rmsnorm_backward(x, scale, norm_w, dn)
        return (dx.to(ctx.x_dtype), None, None, None, None, None, None, *grads)
