"""Cross-entropy of a language-model head without materializing the logits.

A causal LM's loss is usually ``cross_entropy(lm_head(h).float(), labels)``:
for SmolLM2 (49,152-token vocabulary) and 1,024 tokens that is 100 MB of bf16
logits, 200 MB of fp32 logits, 200 MB of log-probabilities kept for backward
and 200 MB of their gradient. :class:`ChunkedLMLoss` walks the tokens in
chunks of a few MB of logits instead.

The loss is a scalar and, in fine-tuning, the head's weight is frozen, so the
gradient of the hidden states is known up to the scalar that backward will
bring: forward computes each chunk's ``(softmax - onehot) @ W`` while its
logits are at hand and keeps that (as big as the hidden states); backward only
scales it. That is one head matmul fewer than recomputing the logits in
backward (a third of the head's work; the head is a quarter of SmolLM2's
matmuls). When the weight trains too, forward keeps one fp32 log-sum-exp per
token and backward recomputes each chunk's logits.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import functional
from .._scratch import scratch
from ..data import IGNORE_INDEX
from .heap import MMAP_THRESHOLD

__all__ = ["ChunkedLMLoss", "chunk_rows", "chunked_lm_loss_sum"]

#: Bytes of fp32 logits per chunk with float32 compute: just under the mmap
#: threshold the trainer gives glibc (:data:`~qpeft.train.heap.MMAP_THRESHOLD`),
#: so the chunk's logits and gradient come from recycled heap memory instead
#: of fresh pages each time. Fewer rows cost GEMM efficiency, most of all in
#: float32: on a 2-core AVX2 EPYC a SmolLM2 head (1,020 tokens, forward and
#: input gradient) took 1.93 s in chunks of 85 rows, 1.52 s in chunks of 170;
#: on a 2-core Zen 4 (AVX2 kernels, float32) a whole SmolLM2 QLoRA step was
#: 1.4-4% faster in chunks of 341 rows than of 170 (two in-process A/B runs of
#: alternating steps; chunks past the threshold, whose pages are fresh each
#: time, gained less), for about 140 MB more peak memory, where float32 has room.
CHUNK_BYTES = MMAP_THRESHOLD - 4096  # room for malloc's header: a block of exactly the threshold is mapped

#: The same with 16-bit compute. It was half that (85 rows for SmolLM2), but
#: the head's GEMMs run well below the machine's bf16 rate on so few rows: on a
#: 2-core AVX512-BF16 EPYC (Zen 4) a SmolLM2 QLoRA step (4 x 256 tokens) took
#: 0.971x and 0.985x the time with 170-row chunks (two in-process A/B runs of
#: 30 alternating steps), and the process's peak memory did not move (1.37-1.41
#: GB either way): it comes at the end of backward, not in the loss.
CHUNK_BYTES_16BIT = 32 << 20


def chunk_rows(vocab: int, dtype: torch.dtype = torch.float32, chunk_bytes: Optional[int] = None) -> int:
    """Tokens per chunk so that a chunk's fp32 logits take about ``chunk_bytes``
    (default: :data:`CHUNK_BYTES` for float32 compute, :data:`CHUNK_BYTES_16BIT` otherwise)."""
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES if dtype == torch.float32 else CHUNK_BYTES_16BIT
    return max(16, chunk_bytes // (4 * vocab))


class ChunkedLMLoss(torch.autograd.Function):
    """Sum over tokens of ``-log softmax(h W^T)[target]``; ``target == -100`` is skipped.

    The logits are formed in ``h``'s dtype (as ``lm_head(h)`` would) and the
    softmax in fp32, as ``F.cross_entropy(logits.float(), ...)`` does.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows: int, grad_enabled: bool = True):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.to(hidden.dtype)
        # Only the hidden states need a gradient: form it now (see the module
        # docstring). Grad mode is off inside forward; the caller says whether it was on.
        eager = grad_enabled and ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if eager else None
        for i in range(0, n, rows):
            t = targets[i:i + rows]
            h = hidden[i:i + rows]
            if eager:
                # A chunk's logits and their gradient die with the chunk. In 16-bit
                # dtypes they go to scratch buffers, whose pages stay resident from
                # chunk to chunk and step to step, where the trainer's in-step heap
                # trims would have a fresh chunk faulted in each time; float32's
                # chunks (128 MB together) come from recycled heap, kept between steps.
                if h.dtype == torch.float32:
                    logits, dlogits = h @ w.t(), None
                else:
                    shape = (h.shape[0], w.shape[0])
                    logits = torch.matmul(h, w.t(), out=scratch("loss-logits", shape, h.dtype, h.device))
                    dlogits = scratch("loss-dlogits", shape, h.dtype, h.device)
                # Loss, log-sum-exp and softmax - onehot in one pass per row.
                loss, lse[i:i + rows], p = functional.cross_entropy_grad(logits, t, IGNORE_INDEX, out=dlogits)
                total += loss.sum()
                torch.matmul(p, w, out=grad_h[i:i + rows])
                continue
            logits = h @ w.t()
            logits = logits.float()
            lse[i:i + rows] = torch.logsumexp(logits, dim=-1)
            valid = t != IGNORE_INDEX
            picked = logits.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += ((lse[i:i + rows] - picked) * valid).sum()
        ctx.rows = rows
        ctx.eager = eager
        if eager:
            ctx.save_for_backward(grad_h)
        else:
            ctx.save_for_backward(hidden, weight, targets, lse)
        return total

    @staticmethod
    def backward(ctx, grad):
        if ctx.eager:
            (grad_h,) = ctx.saved_tensors
            return ((grad_h.float() * grad).to(grad_h.dtype),) + (None,) * (len(ctx.needs_input_grad) - 1)
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(hidden.dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        rows = ctx.rows
        for i in range(0, hidden.shape[0], rows):
            t = targets[i:i + rows]
            h = hidden[i:i + rows]
            # d/dlogits of the summed loss: softmax - onehot, zero on ignored tokens.
            p = (h @ w.t()).float().sub_(lse[i:i + rows].unsqueeze(1)).exp_()
            g = _dlogits(p, t, t != IGNORE_INDEX, grad).to(hidden.dtype)
            if need_h:
                grad_h[i:i + rows] = g @ w
            if need_w:
                grad_w += g.t().float() @ h.float()
        grads = (grad_h, (grad_w.to(weight.dtype) if need_w else None))
        return grads + (None,) * (len(ctx.needs_input_grad) - 2)


def _dlogits(p: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, grad) -> torch.Tensor:
    """In place: the softmax ``p`` becomes d(summed loss)/d(logits) = softmax - onehot,
    zero on ignored tokens, times ``grad`` (if given)."""
    weight = valid.to(p.dtype)
    p.scatter_add_(1, t.clamp(min=0).unsqueeze(1), -weight.unsqueeze(1))
    return p.mul_((weight if grad is None else weight * grad).unsqueeze(1))


def chunked_lm_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed next-token loss, number of target tokens) of hidden states ``[B, T, d]``
    under an output head ``weight [V, d]`` for ``labels [B, T]`` (shifted here)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    n = int((targets != IGNORE_INDEX).sum())
    rows = chunk_rows(weight.shape[0], hidden.dtype)
    return ChunkedLMLoss.apply(h, weight, targets, rows, torch.is_grad_enabled()), n
