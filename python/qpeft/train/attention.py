"""Causal self-attention through dense score matrices: a few matmuls and one Rust pass each way.

PyTorch's CPU flash-attention kernel is slow backward: measured on
SmolLM2-135M (4 x 256 tokens, 9 query and 3 key/value heads, bf16) it took
19-21 ms per layer, and its forward 4.5-5.2 ms. A training step of a small
model attends over short sequences, where the whole score matrix of one layer
is a few MB, so :class:`CausalAttention` forms it: forward as ``q k^T`` in the
compute dtype, the masked softmax and its log-sum-exp in one Rust pass per
query row (:func:`qpeft.functional.causal_softmax`) and ``p v`` (2.9 ms per
layer); backward from the same scores recomputed, four batched matmuls around
:func:`qpeft.functional.causal_softmax_grad`, which forms the probabilities
and the score gradient in float32 in one pass per query row (about 7 ms per
layer; the same algebra as a dozen torch operations took 21 ms). Both passes
form the probabilities with the same exponential from the same bf16 scores
and log-sum-exp, so backward differentiates exactly the forward's softmax.
The score buffers are reused from layer to layer (:data:`SCORES_BYTES` at
most; longer sequences keep flash attention, and so does float32, where its
backward is as fast).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .. import functional
from .._scratch import scratch

__all__ = ["CausalAttention", "DTYPES", "IMPLEMENTATION", "SCORES_BYTES", "causal_attention", "use_dense_backward_attention"]

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

#: Bytes of each of the two [T, T] score buffers backward keeps per thread. Backward
#: goes through the batch in slices that fit; attention whose single sequence
#: does not fit (about T > 1,300 for 9 bf16 heads) keeps PyTorch's flash backward.
SCORES_BYTES = 32 << 20


#: Whether the forward of 16-bit attention whose scores fit :data:`SCORES_BYTES` takes the dense
#: path (two batched matmuls around one Rust softmax pass) instead of PyTorch's flash kernel.
DENSE_FORWARD = True


#: Dtypes whose attention backward this module computes. In float32 PyTorch's
#: flash backward is as fast (27 ms per SmolLM2 layer either way), so it is kept.
DTYPES = (torch.bfloat16, torch.float16)


def _sequence_scores_bytes(heads: int, t: int, dtype: torch.dtype) -> int:
    """Bytes of one sequence's [heads, T, T] score matrix."""
    return heads * t * t * dtype.itemsize


def _batch_slices(b: int, h: int, t: int, dtype: torch.dtype):
    """``(slice, size)`` of the batch, as many sequences at a time as fit :data:`SCORES_BYTES`."""
    step = max(1, SCORES_BYTES // _sequence_scores_bytes(h, t, dtype))
    for b0 in range(0, b, step):
        sl = slice(b0, min(b, b0 + step))
        yield sl, sl.stop - b0


def _scores(which: int, nb: int, hkv: int, g: int, t: int, dtype: torch.dtype) -> torch.Tensor:
    """Score buffer ``which`` (0 or 1), ``[nb, Hkv, G*T, T]``: reused from layer to layer (fresh
    multi-MB tensors per layer cost page faults once freed memory goes back to the OS)."""
    return scratch(("attention-scores", which), (nb, hkv, g * t, t), dtype, "cpu")


def _grouped_q(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """``q [B, H, T, D]`` as ``[B, Hkv, G*T, D]``: the query heads of one key/value head side by
    side. transformers hands q over as a transposed view; its grouped copy is a scratch buffer."""
    b, h, t, d = q.shape
    g = h // hkv
    if q.is_contiguous():
        return q.view(b, hkv, g * t, d)
    qg = scratch("attention-q", (b, hkv, g * t, d), q.dtype, q.device)
    qg.view(b, hkv, g, t, d).copy_(q.view(b, hkv, g, t, d))
    return qg


def _dense_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, T, D], lse [B, H, T])`` as flash attention returns them: ``q k^T`` in
    the compute dtype, the masked softmax in one Rust pass per row
    (:func:`qpeft.functional.causal_softmax`), then ``p v``, a slice of the batch at a time."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    qg = _grouped_q(q, hkv)
    out = torch.empty(b, hkv, g * t, d, dtype=q.dtype)
    lse = torch.empty(b, h, t, dtype=torch.float32)
    for sl, nb in _batch_slices(b, h, t, q.dtype):
        scores = _scores(0, nb, hkv, g, t, q.dtype)
        torch.matmul(qg[sl], k[sl].transpose(-1, -2), out=scores)
        p, lse_sl = functional.causal_softmax(scores.view(nb, hkv, g, t, t), scale, inplace=True)
        lse[sl] = lse_sl.view(nb, h, t)
        torch.matmul(p.view(nb, hkv, g * t, t), v[sl], out=out[sl])
    return out.view(b, h, t, d), lse


class CausalAttention(torch.autograd.Function):
    """``softmax(q k^T * scale + causal) v`` for ``q [B, H, T, D]`` and ``k, v [B, Hkv, T, D]``
    (``H`` a multiple of ``Hkv``: grouped-query attention); returns ``[B, H, T, D]``."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        b, h, t, _ = q.shape
        if DENSE_FORWARD and q.device.type == "cpu" and q.dtype in DTYPES and (
                _sequence_scores_bytes(h, t, q.dtype) <= SCORES_BYTES):
            out, lse = _dense_forward(q, k, v, scale)
        else:
            out, lse = _flash(q, k, v, 0.0, True, scale=scale)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        b, h, t, d = q.shape
        hkv = k.shape[1]
        g = h // hkv
        qg = _grouped_q(q, hkv)
        dog = d_out.to(q.dtype).reshape(b, hkv, g * t, d)
        og = out.to(q.dtype).reshape(b, hkv, g, t, d)
        lg = lse.reshape(b, hkv, g, t)
        dq, dk, dv = torch.empty_like(qg), torch.empty(k.shape, dtype=k.dtype), torch.empty(v.shape, dtype=v.dtype)
        # The [T, T] matrices in the reused score buffers, a slice of the batch at a time.
        for sl, nb in _batch_slices(b, h, t, q.dtype):
            scores, dp = _scores(0, nb, hkv, g, t, q.dtype), _scores(1, nb, hkv, g, t, q.dtype)
            torch.matmul(qg[sl], k[sl].transpose(-1, -2), out=scores)
            torch.matmul(dog[sl], v[sl].transpose(-1, -2), out=dp)
            p, ds = functional.causal_softmax_grad(
                scores.view(nb, hkv, g, t, t), dp.view(nb, hkv, g, t, t), lg[sl], og[sl],
                dog[sl].view(nb, hkv, g, t, d), ctx.scale, inplace=True,
            )
            pc, ds = p.view(nb, hkv, g * t, t), ds.view(nb, hkv, g * t, t)
            torch.matmul(pc.transpose(-1, -2), dog[sl], out=dv[sl])
            torch.matmul(ds, k[sl], out=dq[sl])
            torch.matmul(ds.transpose(-1, -2), qg[sl], out=dk[sl])
        return dq.view(b, h, t, d), dk, dv, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """:class:`CausalAttention` with the default scale ``1/sqrt(D)``."""
    return CausalAttention.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)


#: The attention implementation name :func:`use_dense_backward_attention` gives a transformers model.
IMPLEMENTATION = "qpeft_sdpa"


def _attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                       scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    t = query.shape[2]
    plain_causal = (
        attention_mask is None and dropout == 0.0 and t > 1 and key.shape[2] == t and query.device.type == "cpu"
        and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        and query.dtype in DTYPES and query.shape[1] % key.shape[1] == 0 and _sequence_scores_bytes(query.shape[1], t, query.dtype) <= SCORES_BYTES
        and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
        and not kwargs.get("output_attentions", False)
        and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    )
    if not plain_causal:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = causal_attention(query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def use_dense_backward_attention(model) -> bool:
    """Give a transformers model that attends with ``sdpa`` the implementation above:
    unmasked causal self-attention under autograd takes :class:`CausalAttention`,
    everything else (masks, packing, decoding, no_grad) transformers' own SDPA
    path, with the same masks. Returns whether the model was switched."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", IMPLEMENTATION):
        return False
    if IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, _attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)
    # Not written by save_pretrained (transformers drops it from config.json).
    config._attn_implementation = IMPLEMENTATION
    return True
