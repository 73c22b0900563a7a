"""Adapter configurations, read from and written to PEFT's ``adapter_config.json``.

:class:`PeftConfig` holds what every method shares (``peft_type``,
``task_type``, ``base_model_name_or_path``, ``inference_mode``) and a registry
from ``peft_type`` to config class, so :func:`config_from_dict` can read a
file written for any method qpeft knows. :class:`LoraConfig` is LoRA's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

__all__ = ["ALL_LINEAR", "CONFIG_NAME", "LoraConfig", "PeftConfig", "config_from_dict", "load_config"]

#: File name of an adapter's configuration inside its directory (PEFT's name).
CONFIG_NAME = "adapter_config.json"

_TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
_CONFIG_CLASSES: dict[str, type["PeftConfig"]] = {}


@dataclass
class PeftConfig:
    """Fields shared by every adapter method.

    Attributes:
        task_type: PEFT's task type, e.g. ``"CAUSAL_LM"`` (or ``None``).
        base_model_name_or_path: recorded in the file for the reader's benefit.
        inference_mode: ``True`` in saved files; ``from_pretrained`` decides
            trainability from its own ``is_trainable`` argument.
    """

    peft_type: ClassVar[str] = ""
    task_type: Optional[str] = "CAUSAL_LM"
    base_model_name_or_path: Optional[str] = None
    inference_mode: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.peft_type:
            _CONFIG_CLASSES[cls.peft_type] = cls

    def __post_init__(self) -> None:
        if self.task_type is not None and self.task_type not in _TASK_TYPES:
            raise ValueError(f"task_type must be one of {list(_TASK_TYPES)} or None, got {self.task_type!r}")

    def to_dict(self) -> dict[str, Any]:
        """The dictionary written to ``adapter_config.json`` (PEFT's keys)."""
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["peft_type"] = self.peft_type
        out.update(self._peft_defaults())
        return out

    def _peft_defaults(self) -> dict[str, Any]:
        # Keys PEFT writes that qpeft does not use; written at their neutral values.
        return {}

    def save(self, directory: Union[str, Path]) -> Path:
        """Write ``adapter_config.json`` into ``directory`` as PEFT does (indent 2, sorted keys)."""
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeftConfig":
        """Build this config from a dictionary such as a parsed ``adapter_config.json``.

        Keys PEFT writes that do not change the result at their default value
        are accepted; a key that would change it, and that qpeft does not
        implement, raises ``ValueError``.
        """
        data = dict(data)
        kind = data.pop("peft_type", cls.peft_type)
        if kind != cls.peft_type:
            raise ValueError(f"{cls.__name__} reads peft_type {cls.peft_type!r}, the file says {kind!r}")
        cls._check_unsupported(data)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def _check_unsupported(cls, data: dict[str, Any]) -> None:
        pass


def _plain(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return value


# A PEFT key that qpeft does not implement, with the value(s) that mean "off".
_LORA_INERT = {
    "alpha_pattern": ({},),
    "rank_pattern": ({},),
    "exclude_modules": (None, [], ""),
    "layer_replication": (None,),
    "lora_bias": (False,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_qalora": (False,),
    "use_bdlora": (None, False),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "corda_config": (None,),
    "eva_config": (None,),
    "kasa_config": (None,),
    "lora_ga_config": (None,),
    "monteclora_config": (None,),
    "velora_config": (None,),
    "loftq_config": ({}, None),
    "megatron_config": (None,),
}
# Written by PEFT 0.21 with these values; PEFT fills in any that are missing.
_LORA_WRITTEN_DEFAULTS = {
    "alpha_pattern": {},
    "rank_pattern": {},
    "exclude_modules": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "loftq_config": {},
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "auto_mapping": None,
    "revision": None,
}

#: ``target_modules`` value that picks every linear layer except the output head.
ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig(PeftConfig):
    """LoRA (Hu et al. 2021), optionally rsLoRA and DoRA, on dense or 4-bit linear layers.

    Args:
        r: rank of the update ``B @ A`` (> 0).
        lora_alpha: the update is scaled by ``lora_alpha / r``
            (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the LoRA path's input, in ``[0, 1)``.
        target_modules: which layers get LoRA: a list of module names or
            name suffixes (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``),
            a regular expression that must match the whole module name, or
            ``"all-linear"`` (every ``nn.Linear``/``Conv1D``/``Linear4bit``
            except the output head).
        bias: ``"none"``, ``"all"`` (train every bias of the model) or
            ``"lora_only"`` (train the biases of the LoRA layers).
        modules_to_save: modules (names or suffixes) trained in full and saved
            with the adapter, e.g. ``["lm_head"]``.
        use_rslora: rank-stabilized scaling ``lora_alpha / sqrt(r)``.
        use_dora: weight-decomposed LoRA (Liu et al. 2024): a trainable
            per-output magnitude times the direction ``W + scale * B @ A``.
        init_lora_weights: ``True``: Kaiming-uniform ``A`` and zero ``B`` (the
            model starts unchanged); ``"gaussian"``: ``A ~ N(0, 1/r)``, zero
            ``B``; ``False``: both random (for tests: the model changes).
        layers_to_transform: layer indices (an int or a list) that get LoRA;
            only with a list of ``target_modules``.
        layers_pattern: name(s) of the layer list (``"layers"``, ``"h"``) that
            ``layers_to_transform`` indexes; default: the first numbered
            name segment.
        fan_in_fan_out: the target stores its weight ``[in, out]`` (GPT-2's
            ``Conv1D``); set automatically when such layers are targeted.
    """

    peft_type: ClassVar[str] = "LORA"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r (the LoRA rank) must be a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or not math.isfinite(
            self.lora_alpha
        ):
            raise ValueError(f"lora_alpha must be a finite number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"init_lora_weights must be True (Kaiming-uniform A, zero B), 'gaussian' or False, "
                f"got {self.init_lora_weights!r}"
            )
        self.target_modules = self._check_targets(self.target_modules)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise ValueError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)
        lt = self.layers_to_transform
        if lt is not None:
            if isinstance(lt, int) and not isinstance(lt, bool):
                lt = [lt]
            if not isinstance(lt, (list, tuple)) or not all(isinstance(i, int) and i >= 0 for i in lt):
                raise ValueError(f"layers_to_transform must be a layer index or a list of them, got {lt!r}")
            if isinstance(self.target_modules, str):
                raise ValueError(
                    "layers_to_transform needs target_modules as a list of names; with a regular expression, "
                    "put the layer numbers in the expression instead"
                )
            self.layers_to_transform = list(lt)
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("layers_pattern only applies together with layers_to_transform")

    @staticmethod
    def _check_targets(targets):
        if targets is None:
            raise ValueError(
                "target_modules is required: a list of module names such as ['q_proj', 'v_proj'], "
                "a regular expression, or 'all-linear'"
            )
        if isinstance(targets, str):
            if targets.lower() == ALL_LINEAR:
                return ALL_LINEAR
            try:
                re.compile(targets)
            except re.error as e:
                raise ValueError(f"target_modules {targets!r} is not a valid regular expression: {e}") from None
            return targets
        if isinstance(targets, (list, tuple, set, frozenset)):
            targets = sorted(targets) if isinstance(targets, (set, frozenset)) else list(targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"target_modules must be a non-empty list of module names, got {targets!r}")
            return targets
        raise ValueError(f"target_modules must be a list of names, a regex string or 'all-linear', got {targets!r}")

    @property
    def scaling(self) -> float:
        """The factor on ``B @ A``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def _peft_defaults(self) -> dict[str, Any]:
        return dict(_LORA_WRITTEN_DEFAULTS)

    @classmethod
    def _check_unsupported(cls, data: dict[str, Any]) -> None:
        for key, inert in _LORA_INERT.items():
            if key in data and not any(data[key] == v for v in inert):
                raise ValueError(
                    f"adapter_config.json sets {key}={data[key]!r}, which qpeft does not implement; "
                    f"qpeft reads LoRA adapters with {key} left at {inert[0]!r}"
                )
        if "init_lora_weights" in data and data["init_lora_weights"] not in (True, False, "gaussian"):
            # Initialisation schemes (pissa, olora, loftq...) only matter when
            # creating an adapter; a saved one carries its weights.
            data["init_lora_weights"] = True


def config_from_dict(data: dict[str, Any]) -> PeftConfig:
    """The config for a parsed ``adapter_config.json`` of any method qpeft implements."""
    kind = data.get("peft_type")
    if kind is None:
        raise ValueError("adapter config has no peft_type; it is not a PEFT adapter config")
    cls = _CONFIG_CLASSES.get(kind)
    if cls is None:
        raise ValueError(f"peft_type {kind!r} is not supported by qpeft; supported: {sorted(_CONFIG_CLASSES)}")
    return cls.from_dict(data)


def load_config(directory: Union[str, Path]) -> PeftConfig:
    """Read ``adapter_config.json`` from an adapter directory."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; is {str(directory)!r} an adapter directory?")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds {type(data).__name__}, expected a JSON object")
    return config_from_dict(data)
