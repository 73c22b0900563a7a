"""Memory plan of a training run, before it starts: weights, adapter, gradients, optimizer state,
activations, logits, and the process's own footprint.

The model is described by its ``config.json`` alone (no weights are loaded).
Counted for Llama-style decoders (Llama, SmolLM2, Qwen2, Mistral): an
embedding, per layer q/k/v/o and gate/up/down projections and two norms, a
final norm and a head (tied or not). The figures are estimates; the trainer
records the measured peak next to them (``summary.json``), and the plan
states the assumptions it makes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .chunked_loss import chunk_rows
from .config import FOUR_BIT_METHODS, PROMPT_METHODS, TrainConfig
from .fastpath import _PLAIN_HEAD_TYPES, TRIM_EVERY

__all__ = ["MemoryPlan", "import_model_code", "plan_memory", "model_shapes", "tokenizer_for"]

_BITS_4BIT = 4.127  # NF4, blocks of 64, double-quantized scales
_GB = 2**30
_KERNEL_CACHES = 100 * 2**20  # oneDNN primitives and brgemm kernels for a few padded lengths


@dataclass
class MemoryPlan:
    """Bytes per component; ``peak`` is the largest of the load and training phases plus the process baseline."""

    items: dict[str, float] = field(default_factory=dict)
    load_peak: float = 0.0
    train_peak: float = 0.0
    baseline: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return self.baseline + max(self.load_peak, self.train_peak)

    def table(self) -> str:
        rows = [f"{k:<34} {v / _GB:8.3f} GB" for k, v in self.items.items()]
        rows += [
            f"{'process baseline (torch, model code)':<34} {self.baseline / _GB:8.3f} GB",
            f"{'peak while loading and quantizing':<34} {self.load_peak / _GB:8.3f} GB (+ baseline)",
            f"{'peak while training':<34} {self.train_peak / _GB:8.3f} GB (+ baseline)",
            f"{'planned peak resident memory':<34} {self.peak / _GB:8.3f} GB",
        ]
        return "\n".join(rows + [f"note: {n}" for n in self.notes])


def model_shapes(config: dict[str, Any]) -> dict[str, Any]:
    """Parameter counts of a Llama-style decoder from its config."""
    h = int(config["hidden_size"])
    inter = int(config["intermediate_size"])
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or h // heads)
    vocab = int(config["vocab_size"])
    tied = bool(config.get("tie_word_embeddings", False))
    q, kvp = heads * head_dim, kv * head_dim
    linear_shapes = [(q, h), (kvp, h), (kvp, h), (h, q), (inter, h), (inter, h), (h, inter)]
    per_layer_linear = sum(o * i for o, i in linear_shapes)
    return {
        "hidden": h, "intermediate": inter, "layers": layers, "vocab": vocab, "tied": tied, "q": q, "kv": kvp,
        "linear_shapes": linear_shapes,
        "linear_params": per_layer_linear * layers,
        "embed_params": vocab * h,
        "head_params": 0 if tied else vocab * h,
        "norm_params": (2 * layers + 1) * h,
    }


def _config_of(model: Optional[str]) -> tuple[dict[str, Any], Optional[Path]]:
    from .. import hf

    folder = hf.model_folder(model)
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; give a model folder or a .gguf file")
    weights = folder / "model.safetensors"
    return json.loads(cfg.read_text()), weights if weights.is_file() else None


def import_model_code(model: Optional[str]) -> None:
    """Import the transformers modeling code of ``model``'s architecture, which the
    process keeps for the whole run (with whatever transformers imports alongside
    it, e.g. torchao's 0.2 GB when that is installed), so a baseline measured
    afterwards includes it. Does nothing for a model it cannot resolve."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config, _ = _config_of(model)
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type", ""))
        if name:
            getattr(transformers, name)
    except (OSError, ValueError, KeyError, ImportError, AttributeError):
        pass


def tokenizer_for(model: Optional[str]) -> Any:
    """The tokenizer of a model folder (or of the default model), without its weights."""
    import transformers

    from .. import hf

    return transformers.AutoTokenizer.from_pretrained(hf.model_folder(model))


def plan_memory(cfg: TrainConfig, tokens_per_example: Optional[float] = None,
                baseline: Optional[float] = None) -> MemoryPlan:
    """Plan the peak resident memory of ``SFTTrainer(cfg).train()``.

    ``tokens_per_example``: the longest micro-batch's sequence length (default:
    ``cfg.max_length``; the trainer passes the data's own). ``baseline``: the
    process's memory before the model loads (default: this process's, after
    importing torch, transformers and the model's modeling code).
    """
    from .trainer import resident_bytes, resolve_compute_dtype

    import transformers  # noqa: F401  (part of the baseline)
    import torch

    model_cfg, weights_file = _config_of(cfg.model)
    if baseline is None:
        import_model_code(cfg.model)
    s = model_shapes(model_cfg)
    dtype = resolve_compute_dtype(cfg.compute_dtype)
    wbytes = torch.finfo(dtype).bits // 8
    h, inter, layers, vocab = s["hidden"], s["intermediate"], s["layers"], s["vocab"]
    plan = MemoryPlan(baseline=resident_bytes() if baseline is None else baseline)
    seq = float(tokens_per_example or cfg.max_length)
    tokens = cfg.batch_size * seq

    dense_all = (s["linear_params"] + s["embed_params"] + s["head_params"] + s["norm_params"]) * wbytes
    other = (s["embed_params"] + s["head_params"] + s["norm_params"]) * wbytes
    if cfg.method in FOUR_BIT_METHODS:
        linear = s["linear_params"] * _BITS_4BIT / 8
        plan.items["base linears (NF4)"] = linear
    else:
        linear = s["linear_params"] * wbytes
        plan.items[f"base linears ({dtype})".replace("torch.", "")] = linear
    plan.items["embeddings, norms, head"] = other
    r = 0 if cfg.method in PROMPT_METHODS else cfg.lora_r
    adapter = layers * sum(r * (o + i) for o, i in s["linear_shapes"]) * 4.0
    if cfg.method in PROMPT_METHODS:
        n = cfg.num_virtual_tokens
        # prompt: the table; ptuning: table + 3-layer MLP of width h; prefix: keys and values of every layer.
        params = {"prompt": n * h, "ptuning": n * h + 3 * (h * h + h), "prefix": n * layers * 2 * s["kv"]}
        adapter = params[cfg.method] * 4.0
        seq += n if cfg.method != "prefix" else 0
        tokens = cfg.batch_size * seq
    if cfg.method == "adapter":
        # Down and up projections with biases after the attention and the MLP of every layer.
        size = cfg.adapter_size
        adapter = layers * 2 * (2 * h * size + size + h) * 4.0
        r = 0
    plan.items["adapter (fp32)"] = adapter
    plan.items["adapter gradients"] = adapter
    kind = cfg.optimizer.removeprefix("paged_")
    state = {"adamw": 8.0, "torch": 8.0, "adamw8bit": 2.03125}[kind] / 4.0 * adapter
    if cfg.optimizer.startswith("paged_"):
        # Only the resident pages count; the rest is in the state file.
        state = min(state, float(cfg.optimizer_resident_mb << 20))
    plan.items[f"optimizer state ({cfg.optimizer})"] = state
    fast = cfg.fast_path and model_cfg.get("model_type") in _PLAIN_HEAD_TYPES
    q, kvd = s["q"], s["kv"]
    heads = int(model_cfg["num_attention_heads"])
    # Saved for backward per layer and token: the inputs of the adapted
    # projections (attention input, its output, MLP input, down-projection
    # input), the low-rank products, norms, attention and MLP intermediates.
    per_token_layer = (8 * h + 5 * inter) * wbytes + 7 * r * 4
    recompute = 0.0
    if fast and not cfg.gradient_checkpointing:
        # Attention half: norm input and output, q, k, v, the attention output,
        # one log-sum-exp per head, four low-rank products.
        per_token_layer = (3 * h + 2 * q + 2 * kvd) * wbytes + 4 * r * wbytes + 4 * heads
        if cfg.recomputes_mlp(dtype):
            # The MLP half keeps only its input and is recomputed in backward, one layer at a time.
            recompute = tokens * ((3 * inter + 2 * h) * wbytes + 2 * h * 4)
        else:
            # The MLP half keeps the norm's input, output and scale, gate, up and
            # the down projection's input, and three low-rank products.
            per_token_layer += (2 * h + 3 * inter) * wbytes + 3 * r * wbytes + 4
    if cfg.gradient_checkpointing:
        per_token_layer = h * wbytes * 2
        recompute = tokens * ((8 * h + 5 * inter) * wbytes + 2 * h * 4)
    activations = tokens * layers * per_token_layer
    plan.items["activations saved for backward"] = activations
    if recompute:
        plan.items["one layer recomputed in backward"] = recompute
    if fast:
        # The chunked loss: one chunk of logits (compute dtype, fp32, its gradient) at a time.
        rows = min(tokens, chunk_rows(vocab, dtype))
        logits = rows * vocab * (wbytes + 2 * 4) + tokens * 4
    else:
        # Logits in the compute dtype, then float32 for the loss, its softmax and the gradient.
        logits = tokens * vocab * (wbytes + 3 * 4)
    plan.items["logits and loss"] = logits
    # One dense weight being dequantized (the largest projection) as scratch.
    scratch = max(o * i for o, i in s["linear_shapes"]) * wbytes * 2
    plan.items["dequantize scratch"] = scratch
    # What the C library and PyTorch hold beyond live tensors: CPU kernels kept
    # per (padded) sequence length and, on the fast path, freed buffers not yet
    # returned to the OS (fp32 temporaries of the norms and SwiGLU of the layers
    # between two heap trims). Calibrated on SmolLM2 with the fast path
    # (4 x 256 tokens: 1.30 GB measured; the default run: 1.32 GB). With
    # recompute_mlp "off" the trainer does not trim inside the step (speed
    # over memory), and the heap holds about three times as much: measured
    # 1.70-1.75 GB against 1.55 with the trims, bf16, 4 x 256 tokens.
    overhead = _KERNEL_CACHES
    if fast and not cfg.gradient_checkpointing:
        slack_layers = TRIM_EVERY if cfg.trims_heap_in_step(dtype) else 3 * TRIM_EVERY
        overhead += tokens * slack_layers * (2 * inter + 4 * h) * 4
    plan.items["allocator slack and kernel caches"] = overhead
    mapped = weights_file.stat().st_size if weights_file is not None else 0.0
    plan.train_peak = linear + other + adapter * 2 + state + activations + recompute + logits + scratch + overhead
    if cfg.method in FOUR_BIT_METHODS:
        # Read tensor by tensor (qpeft.stream_load): the largest tensor, as stored
        # and in the compute dtype, is the only dense copy at any time.
        largest = max(s["embed_params"], max(o * i for o, i in s["linear_shapes"]))
        plan.load_peak = linear + other + largest * (4 + wbytes)
    else:
        # The checkpoint's pages (memory-mapped, resident until the process drops
        # them) and the dense model in the compute dtype.
        plan.load_peak = mapped + dense_all
        if mapped:
            plan.train_peak += mapped
            plan.items["checkpoint file pages (mmap)"] = mapped
    plan.notes.append(f"{cfg.batch_size} examples x {seq:.0f} tokens per micro-batch, {dtype} compute".replace(
        "torch.", ""))
    if fast and not cfg.gradient_checkpointing:
        plan.notes.append("feed-forward blocks " + ("recomputed in backward (--recompute-mlp on)"
                                                     if cfg.recomputes_mlp(dtype) else
                                                     "kept for backward (--recompute-mlp off)"))
    return plan
