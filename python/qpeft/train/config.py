"""TrainConfig: every setting of a fine-tuning run, with the defaults of the default run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

__all__ = ["FOUR_BIT_METHODS", "METHODS", "OPTIMIZERS", "PROMPT_METHODS", "RECOMPUTE_MLP", "TrainConfig"]

#: Prompt tuning, P-tuning and prefix tuning, each on a 4-bit base.
PROMPT_METHODS = ("prompt", "ptuning", "prefix")
#: Methods the trainer runs ("adapter": bottleneck adapters on a 4-bit base).
METHODS = ("qlora", "lora", "adapter") + PROMPT_METHODS
#: Methods whose base model is quantized to 4 bits.
FOUR_BIT_METHODS = ("qlora", "adapter") + PROMPT_METHODS
#: Optimizers by name; "torch" is ``torch.optim.AdamW``.
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit", "torch")

RECOMPUTE_MLP = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Settings of one run. ``TrainConfig()`` is the default run of DESIGN.md:
    QLoRA on SmolLM2-135M-Instruct with the generated instruction set.

    Attributes (grouped):
        method: ``"qlora"`` (4-bit NF4 base, double quant), ``"lora"`` (dense base), or on a
            4-bit base ``"prompt"`` (prompt tuning from sampled vocabulary), ``"ptuning"``
            (MLP prompt encoder), ``"prefix"`` (prefix tuning without projection) or
            ``"adapter"`` (bottleneck adapters).
        model: a model folder, safetensors folder or ``.gguf`` file; None: the default model.
        data / eval_data: instruction files (``.json``/``.jsonl``); no ``data``: the
            generated set (``n_train`` records, ``n_eval`` held out).
        format, template, max_length, packing, skip_bad: how records become tokens
            (see :mod:`qpeft.data`).
        batch_size, grad_accum: examples per optimizer step = batch_size * grad_accum.
        max_steps, lr, warmup_steps, min_lr_ratio, weight_decay, max_grad_norm:
            linear warm-up, then cosine decay to ``lr * min_lr_ratio``.
        compute_dtype: ``"auto"`` (bfloat16 where the CPU or GPU supports it, else
            float32), ``"bfloat16"`` or ``"float32"``.
        lora_r, lora_alpha, lora_dropout, target_modules: the adapter.
        num_virtual_tokens: virtual tokens of the prompt methods.
        adapter_size: bottleneck width of ``method="adapter"`` (Houlsby adapters after
            the attention and MLP sublayers, :class:`qpeft.tuners.BottleneckConfig`).
        optimizer: one of :data:`OPTIMIZERS`.
        optimizer_resident_mb, optimizer_state_dir: the paged optimizers' budget of
            resident state (MiB) and the directory of their state file (default:
            the system's temporary directory).
        fast_path: fused norm/MLP/LoRA pieces and the chunked loss where the model
            allows them (:mod:`qpeft.train.fastpath`); off: transformers' own modules.
        eval_every, eval_examples, max_new_tokens: held-out loss and exact-match
            accuracy (greedy generation) every ``eval_every`` steps, before training and at the end.
        save_every: checkpoint interval in steps (0: only at the end).
        out_dir: where everything is written; ``resume`` continues from its checkpoint.
    """

    method: str = "qlora"
    model: Optional[str] = None
    data: list[str] = field(default_factory=list)
    eval_data: Optional[str] = None
    n_train: int = 3000
    n_eval: int = 90
    format: str = "auto"
    template: str = "course"
    max_length: int = 256
    packing: bool = False
    skip_bad: bool = False
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 200
    lr: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    compute_dtype: str = "auto"
    gradient_checkpointing: bool = False
    fast_path: bool = True
    recompute_mlp: str = "auto"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: Any = "all-linear"
    num_virtual_tokens: int = 20
    adapter_size: int = 64
    optimizer: str = "adamw"
    optimizer_resident_mb: int = 64
    optimizer_state_dir: Optional[str] = None
    eval_every: int = 0
    eval_examples: int = 90
    max_new_tokens: int = 40
    save_every: int = 50
    seed: int = 0
    threads: Optional[int] = None
    out_dir: str = "runs/default"
    resume: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        self.validate()

    def recomputes_mlp(self, dtype: Any) -> bool:
        """Whether the fast path recomputes the feed-forward blocks in backward
        for compute dtype ``dtype`` (``recompute_mlp`` resolved; never with
        gradient checkpointing, which recomputes whole layers)."""
        import torch

        if self.gradient_checkpointing or self.recompute_mlp == "off":
            return False
        return self.recompute_mlp == "on" or dtype != torch.float32

    def trims_heap_in_step(self, dtype: Any) -> bool:
        """Whether the fast path returns freed heap to the OS inside a step
        (every few decoder layers) for compute dtype ``dtype``. It goes with
        the memory-lean setting: where the feed-forward blocks are kept for
        speed (``recompute_mlp="off"``, or "auto" in float32) the step skips
        the trims too, whose page faults cost 7-12% of a step; the trainer
        still trims between steps when the process grows."""
        if self.recompute_mlp == "off":
            return False
        return self.gradient_checkpointing or self.recomputes_mlp(dtype)

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        need(self.recompute_mlp in RECOMPUTE_MLP,
             f"recompute_mlp must be one of {RECOMPUTE_MLP}, got {self.recompute_mlp!r}")
        need(self.compute_dtype in ("auto", "bfloat16", "float32"),
             f"compute_dtype must be 'auto', 'bfloat16' or 'float32', got {self.compute_dtype!r}")
        need(not (self.method == "prefix" and self.gradient_checkpointing),
             "prefix tuning does not work with gradient_checkpointing (a recomputed layer would write its "
             "key/value prefix twice); turn gradient_checkpointing off or use method 'prompt'")
        for name in ("batch_size", "grad_accum", "max_steps", "lora_r", "max_length", "max_new_tokens",
                     "num_virtual_tokens", "adapter_size"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "eval_examples", "save_every", "n_eval", "n_train"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                 f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        need(isinstance(self.optimizer_resident_mb, int) and self.optimizer_resident_mb >= 1,
             f"optimizer_resident_mb must be a positive integer, got {self.optimizer_resident_mb!r}")
        need(self.threads is None or self.threads >= 1, f"threads must be positive, got {self.threads}")
        need(bool(self.data) or self.n_train >= 1, "n_train must be positive when no data files are given")

    def adapter_config(self) -> Any:
        """The :mod:`qpeft.tuners` config of the adapter this run trains."""
        from .. import tuners

        n = self.num_virtual_tokens
        if self.method == "prompt":
            # Lester et al. 2021: starting from real token embeddings trains better than random vectors.
            return tuners.PromptTuningConfig(num_virtual_tokens=n, prompt_tuning_init="SAMPLE_VOCAB")
        if self.method == "ptuning":
            return tuners.PromptEncoderConfig(num_virtual_tokens=n)
        if self.method == "prefix":
            return tuners.PrefixTuningConfig(num_virtual_tokens=n)
        if self.method == "adapter":
            return tuners.BottleneckConfig(bottleneck_size=self.adapter_size)
        return tuners.LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                                 target_modules=self.target_modules, task_type="CAUSAL_LM")

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: "str | Path") -> "TrainConfig":
        """Read a JSON or YAML (``.yaml``/``.yml``, needs PyYAML) config file."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ImportError("reading a YAML config needs PyYAML: pip install pyyaml (or use JSON)") from None
            values = yaml.safe_load(text)
        else:
            try:
                values = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a config file must hold a mapping of settings")
        return cls.from_dict(values)
