"""The trainer's fast path: fused blocks that keep less for backward.

A QLoRA step trains only adapters, so most of what autograd keeps for a
transformers decoder is needed only to pass gradients through frozen parts.
:func:`enable_fast_path` swaps three pieces of a Llama/Qwen2/Mistral model for
functions with hand-written backward passes, each computing the same forward
values as transformers:

* RMSNorm: keeps the input (compute dtype) and one fp32 scale per token
  instead of three fp32 copies of the hidden states;
* the SwiGLU MLP's ``silu(gate) * up``: keeps ``gate`` and ``up`` only
  and recomputes the activation in backward;
* LoRA on 4-bit layers runs its two thin matmuls in the compute dtype (bf16)
  instead of casting every activation to the adapter's fp32 and back (the
  adapter weights, their gradients and the optimizer stay fp32).

and :func:`lm_loss_sum` computes the loss from the last hidden states with
:class:`~qpeft.train.chunked_loss.ChunkedLMLoss`, never forming the logits.
Models this does not know are left alone (the loss then takes the ordinary
path), so the fast path is an optimization, never a requirement.
"""

from __future__ import annotations

import types
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .chunked_loss import chunked_lm_loss_sum

__all__ = ["FusedRMSNorm", "FusedSwiGLU", "enable_fast_path", "lm_loss_sum", "lm_parts"]

# Decoder families whose RMSNorm/MLP/head are the plain Llama forms.
_RMSNORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"}
_MLPS = {"LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP"}
_PLAIN_HEAD_TYPES = {"llama", "qwen2", "qwen3", "mistral", "gpt2"}


class FusedRMSNorm(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps))`` with transformers' rounding; saves x and the scale."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.float()
        scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (x32 * scale).to(x.dtype)
        ctx.save_for_backward(x, weight, scale)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, scale = ctx.saved_tensors
        xh = x.float() * scale
        dyw = dy.float() * weight.float()
        dx = scale * (dyw - xh * (dyw * xh).mean(-1, keepdim=True))
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy.float() * xh.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx.to(x.dtype), dw, None


class FusedSwiGLU(torch.autograd.Function):
    """``silu(gate) * up``; saves gate and up, recomputes the activation in backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        g = gate.float()
        s = torch.sigmoid(g)
        silu = g * s
        dy32 = dy.float()
        d_up = (dy32 * silu).to(up.dtype)
        d_gate = (dy32 * up.float() * (s * (1 + g * (1 - s)))).to(gate.dtype)
        return d_gate, d_up


def _rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)
    return FusedRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not torch.is_grad_enabled():
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(FusedSwiGLU.apply(gate, up))


def _is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def enable_fast_path(model: nn.Module) -> list[str]:
    """Switch ``model`` (a transformers causal LM, possibly wrapped by
    :func:`qpeft.tuners.get_peft_model`) to the fused pieces above, in place.

    Returns the names of what was switched on (empty for models it does not
    know). Forward values are unchanged; only what backward keeps and how it
    is computed differ.
    """
    from ..tuners.lora import LoraLinear

    done: set[str] = set()
    for module in model.modules():
        name = type(module).__name__
        if name in _RMSNORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rmsnorm_forward, module)
            done.add("rmsnorm")
        elif name in _MLPS and _is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_mlp_forward, module)
            done.add("swiglu")
        elif isinstance(module, LoraLinear) and module.is_4bit:
            module.lora_in_compute_dtype = True
            done.add("lora-compute-dtype")
    if lm_parts(model) is not None:
        done.add("chunked-loss")
    return sorted(done)


def lm_parts(model: nn.Module) -> Optional[tuple[nn.Module, torch.Tensor]]:
    """``(decoder body, output-head weight)`` when the loss may be computed from
    hidden states (a plain bias-free linear head on a known model type, adapters
    that do not touch the input or the head); else None."""
    from ..tuners import PeftModel

    base = model
    if isinstance(model, PeftModel):
        if any(c.peft_type != "LORA" for c in model.peft_config.values()):
            return None
        base = model.get_base_model()
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if type(head) is not nn.Linear or head.bias is not None or not isinstance(body, nn.Module):
        return None
    return body, head.weight


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> Optional[tuple[torch.Tensor, int]]:
    """(summed loss, target tokens) through :func:`lm_parts` and the chunked loss, or None
    when the model does not allow it."""
    parts = lm_parts(model)
    if parts is None:
        return None
    body, weight = parts
    inputs: dict[str, Any] = {k: v for k, v in batch.items() if k != "labels"}
    hidden = body(**inputs, use_cache=False)[0]
    return chunked_lm_loss_sum(hidden, weight, batch["labels"])
