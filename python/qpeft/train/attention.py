"""Causal self-attention whose backward is a few dense matmuls.

PyTorch's CPU flash-attention kernel is quick forward but its backward is
not: measured on SmolLM2-135M (4 x 256 tokens, 9 query and 3 key/value
heads, bf16) it took 21 ms per layer against 2.6 ms forward. A training step
of a small model attends over short sequences, where the whole score matrix
of one layer is a few MB, so :class:`CausalAttention` keeps flash attention's
forward (and what it saves: the output and one log-sum-exp per query) and
computes backward from recomputed scores with batched matmuls in the compute
dtype and the softmax algebra in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["CausalAttention", "causal_attention"]

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


class CausalAttention(torch.autograd.Function):
    """``softmax(q k^T * scale + causal) v`` for ``q [B, H, T, D]`` and ``k, v [B, Hkv, T, D]``
    (``H`` a multiple of ``Hkv``: grouped-query attention); returns ``[B, H, T, D]``."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        out, lse = _flash(q, k, v, 0.0, True, scale=scale)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        b, h, t, d = q.shape
        hkv = k.shape[1]
        g = h // hkv
        # Query heads of one key/value head side by side: [B, Hkv, G*T, D].
        qg = q.reshape(b, hkv, g * t, d)
        dog = d_out.to(q.dtype).reshape(b, hkv, g * t, d)
        scores = torch.matmul(qg, k.transpose(-1, -2)).float().view(b, hkv, g, t, t)
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).triu_(1)
        p = scores.mul_(ctx.scale).sub_(lse.view(b, hkv, g, t, 1)).exp_().masked_fill_(causal, 0.0)
        pc = p.to(q.dtype).view(b, hkv, g * t, t)
        dv = torch.matmul(pc.transpose(-1, -2), dog)
        dp = torch.matmul(dog, v.transpose(-1, -2)).float().view(b, hkv, g, t, t)
        delta = (d_out.float() * out.float()).sum(-1).view(b, hkv, g, t, 1)
        ds = p.mul_(dp.sub_(delta)).mul_(ctx.scale).to(q.dtype).view(b, hkv, g * t, t)
        del dp, pc
        dq = torch.matmul(ds, k).view(b, h, t, d)
        dk = torch.matmul(ds.transpose(-1, -2), qg)
        return dq, dk, dv, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """:class:`CausalAttention` with the default scale ``1/sqrt(D)``."""
    return CausalAttention.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
