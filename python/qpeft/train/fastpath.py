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
* LoRA on 4-bit layers runs in the compute dtype (bf16) instead of casting
  every activation to the adapter's fp32 and back (the adapter weights, their
  gradients and the optimizer stay fp32), with base and adapter terms summed
  inside one matmul and rounded once
  (:func:`qpeft.functional.lora_matmul`), so small adapter
  updates are not rounded away: the loss then follows the fp32-activation
  QLoRA of bitsandbytes + PEFT (0.14% apart after 20 steps of bench/sft.py);
* the feed-forward half of each decoder layer (post-attention norm, gate,
  up, SwiGLU, down) keeps only its input for backward and is recomputed there
  (``recompute_mlp``): it holds 10 of the 17 MB a SmolLM2 layer keeps per
  1,024 tokens, while its recomputation costs about a sixth of the step, less
  than the whole-layer gradient checkpointing of transformers;
* causal self-attention in 16-bit dtypes, where a layer's score matrix is a
  few MB, goes through dense scores both ways (:mod:`qpeft.train.attention`):
  forward in two batched matmuls around a Rust softmax pass (0.65x the time
  of PyTorch's CPU flash-attention forward), backward from recomputed scores
  (a quarter of the time of the flash-attention backward)
  (``dense_attention_backward``);
* freed heap memory is handed back to the OS every few decoder layers in
  forward (:mod:`qpeft.train.heap`), so fragmentation does not double what
  the step keeps resident; backward, where memory only shrinks, keeps its
  freed pages for the next layer's temporaries (handing them back there cost
  ~60,000 page faults, about 4% of a SmolLM2 step, for ~4% less peak memory).

and :func:`lm_loss_sum` computes the loss from the last hidden states with
:class:`~qpeft.train.chunked_loss.ChunkedLMLoss`, never forming the logits
(a right-padding mask is dropped there: causal attention already hides the
padding from every real token, and without a mask attention takes the fast
causal kernels).
Models this does not know are left alone (the loss then takes the ordinary
path), so the fast path is an optimization, never a requirement.
"""

from __future__ import annotations

import types
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import functional
from .chunked_loss import chunked_lm_loss_sum
from .heap import release_free_memory
from .mlp_block import RecomputedMLP, fused_mlp_parts, rmsnorm_values

__all__ = ["FusedRMSNorm", "FusedSwiGLU", "enable_fast_path", "lm_loss_sum", "lm_parts"]

# Decoder families whose RMSNorm/MLP/head are the plain Llama forms.
_RMSNORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"}
_MLPS = {"LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP"}
_PLAIN_HEAD_TYPES = {"llama", "qwen2", "qwen3", "mistral", "gpt2"}
_DECODER_LAYERS = {"LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer", "MistralDecoderLayer"}

#: Decoder layers between two returns of free heap memory to the OS (in forward; in backward too with ``trim_in_backward``).
TRIM_EVERY = 5
#: Whether the fast path switches attention to :mod:`qpeft.train.attention` by default.
DENSE_ATTENTION_BACKWARD = True


class FusedRMSNorm(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps))`` with transformers' rounding; saves x and the scale."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        y, scale = rmsnorm_values(x, weight, eps)
        ctx.save_for_backward(x, weight, scale)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, scale = ctx.saved_tensors
        dx = functional.rmsnorm_backward(x, scale, weight, dy)
        dw = None
        if ctx.needs_input_grad[1]:
            xh = (x.float() * scale).to(x.dtype).float()
            dw = (dy.float() * xh).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


class FusedSwiGLU(torch.autograd.Function):
    """``silu(gate) * up``; saves gate and up, recomputes the activation in backward.

    The forward is torch's own expression, so values are transformers' bit for
    bit (the Rust :func:`qpeft.functional.swiglu` agrees only to the rounding
    of ``exp``, and is no faster: one read of two tensors and a write either
    way); the backward is :func:`qpeft.functional.swiglu_backward`'s one pass
    instead of ten torch operations.
    """

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)  # the product in place: one temporary fewer, same rounding

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return functional.swiglu_backward(gate, up, dy)


def _rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)
    return FusedRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not torch.is_grad_enabled():
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(FusedSwiGLU.apply(gate, up))


def _deferred_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # Under autograd the MLP applies this norm inside its recomputed block.
    if not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)
    return hidden_states


def _norm_then_mlp(mlp: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return _mlp_forward(mlp, _rmsnorm_forward(mlp.__dict__["_qpeft_norm"], hidden_states))


def _recomputed_mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return _mlp_forward(self, hidden_states)
    norm = self.__dict__["_qpeft_norm"]
    parts = fused_mlp_parts(norm, self)
    if parts is not None:
        weight, eps, compute, gate, up, down = parts
        return RecomputedMLP.apply(hidden_states, weight, eps, compute, gate, up, down,
                                   gate[2], gate[3], up[2], up[3], down[2], down[3])
    # Anything else (dropout, DoRA, several adapters, a trained norm):
    # non-reentrant checkpoint, which replays LoRA dropout with the same random
    # state and keeps only the block's input.
    return checkpoint(_norm_then_mlp, self, hidden_states, use_reentrant=False)


def _recompute_mlp(layer: nn.Module) -> bool:
    """Fold ``layer``'s post-attention norm into its MLP and recompute both in backward."""
    norm, mlp = getattr(layer, "post_attention_layernorm", None), getattr(layer, "mlp", None)
    if type(norm).__name__ not in _RMSNORMS or type(mlp).__name__ not in _MLPS or not _is_silu(
            getattr(mlp, "act_fn", None)):
        return False
    # In __dict__ rather than as an attribute: not a submodule (state_dict keys
    # stay those of transformers), yet deepcopy carries it with the layer.
    mlp.__dict__["_qpeft_norm"] = norm
    norm.__dict__["_qpeft_mlp"] = True
    norm.forward = types.MethodType(_deferred_norm_forward, norm)
    mlp.forward = types.MethodType(_recomputed_mlp_forward, mlp)
    return True


def _trim_hook(grad: torch.Tensor) -> None:
    release_free_memory()


def _trim_pre_hook(module: nn.Module, args: tuple) -> None:
    # Forward: return what the last few layers freed.
    if torch.is_grad_enabled():
        release_free_memory()


def _trim_both_pre_hook(module: nn.Module, args: tuple) -> None:
    # Forward as above; backward: the same once this layer's input gradient
    # exists (its whole backward is done).
    if not torch.is_grad_enabled():
        return
    release_free_memory()
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.requires_grad:
        x.register_hook(_trim_hook)


def _is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def enable_fast_path(model: nn.Module, recompute_mlp: bool = True, trim_every: int = TRIM_EVERY,
                     dense_attention_backward: bool = DENSE_ATTENTION_BACKWARD,
                     trim_in_backward: bool = False) -> list[str]:
    """Switch ``model`` (a transformers causal LM, possibly wrapped by
    :func:`qpeft.tuners.get_peft_model`) to the fused pieces above, in place.

    ``recompute_mlp`` recomputes each decoder layer's feed-forward half in
    backward (turn it off when whole layers are checkpointed anyway, or to
    trade memory for speed); ``trim_every`` is the number of decoder layers
    between returns of free heap memory to the OS in forward (0: never), and
    ``trim_in_backward`` does the same in backward (on SmolLM2, 3% less
    peak memory for 1.4% more time; the SFT trainer turns it on with
    ``recompute_mlp``);
    ``dense_attention_backward`` computes unmasked causal attention's backward
    from recomputed scores (:mod:`qpeft.train.attention`) instead of PyTorch's
    CPU flash-attention backward (masked, padded or decoding attention keeps
    transformers' own path).

    Returns the names of what was switched on (empty for models it does not
    know). Forward values are unchanged; only what backward keeps and how it
    is computed differ.
    """
    from ..tuners.lora import LoraLinear

    done: set[str] = set()
    layers = [m for m in model.modules() if type(m).__name__ in _DECODER_LAYERS]
    for i, layer in enumerate(layers):
        if recompute_mlp and _recompute_mlp(layer):
            done.update(("recompute-mlp", "swiglu"))
        if trim_every > 0 and i % trim_every == trim_every - 1 and "_qpeft_trim" not in layer.__dict__:
            hook = _trim_both_pre_hook if trim_in_backward else _trim_pre_hook
            layer.__dict__["_qpeft_trim"] = layer.register_forward_pre_hook(hook)
            done.add("heap-trim")
    for module in model.modules():
        name = type(module).__name__
        if "_qpeft_mlp" in module.__dict__:
            continue  # a norm the MLP's recomputed block applies
        if name in _RMSNORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rmsnorm_forward, module)
            done.add("rmsnorm")
        elif name in _MLPS and "_qpeft_norm" not in module.__dict__ and _is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_mlp_forward, module)
            done.add("swiglu")
        elif isinstance(module, LoraLinear) and module.is_4bit:
            module.lora_in_compute_dtype = True
            done.add("lora-compute-dtype")
    if dense_attention_backward:
        from .attention import use_dense_backward_attention

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if use_dense_backward_attention(base):
            done.add("dense-attention-backward")
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


def _right_padding_only(mask: Any) -> bool:
    """Whether ``mask`` is a ``[batch, length]`` padding mask whose rows are ones then zeros."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.dtype.is_floating_point or mask.is_complex():
        return False
    if mask.numel() == 0:
        return True
    m = mask.to(torch.int8)
    return bool(((m == 0) | (m == 1)).all()) and bool((m[:, 1:] <= m[:, :-1]).all())


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> Optional[tuple[torch.Tensor, int]]:
    """(summed loss, target tokens) through :func:`lm_parts` and the chunked loss, or None
    when the model does not allow it."""
    parts = lm_parts(model)
    if parts is None:
        return None
    body, weight = parts
    inputs: dict[str, Any] = {k: v for k, v in batch.items() if k != "labels"}
    if _right_padding_only(inputs.get("attention_mask")) and "position_ids" not in inputs:
        # Causal attention never lets a real token see the padding after it,
        # and padded positions carry no loss: without the mask, attention is
        # plain causal (the fast kernels), and the loss and gradients are those
        # of the masked model.
        del inputs["attention_mask"]
    hidden = body(**inputs, use_cache=False)[0]
    return chunked_lm_loss_sum(hidden, weight, batch["labels"])
