"""The user-facing wrapper: :func:`get_peft_model` and :class:`PeftModel`.

``PeftModel`` mirrors Hugging Face PEFT's: ``peft_model.base_model`` is the
method's model (:class:`~qpeft.tuners.lora_model.LoraModel` for LoRA) and
``peft_model.base_model.model`` the user's model, so parameter names start with
``base_model.model.`` as PEFT's do. Unlike PEFT it never upcasts the base
model's norms or embeddings: only adapter parameters are created in float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch import nn

from .bottleneck_config import BOTTLENECK
from .bottleneck_model import BottleneckModel
from .config import PeftConfig
from .files import DEFAULT_ADAPTER, adapter_dir, read_adapter, write_adapter
from .lora_model import LoraModel
from .prompt_config import PREFIX_TUNING, PROMPT_TUNING, P_TUNING
from .prompt_model import PromptLearningModel
from .tied import register_tied_hooks

__all__ = ["PeftModel", "get_peft_model"]

# peft_type -> the class that injects that method into a model.
_TUNERS: dict[str, type[nn.Module]] = {"LORA": LoraModel, BOTTLENECK: BottleneckModel}
_TUNERS.update({kind: PromptLearningModel for kind in (PROMPT_TUNING, P_TUNING, PREFIX_TUNING)})


def _tuner_for(config: PeftConfig) -> type[nn.Module]:
    cls = _TUNERS.get(config.peft_type)
    if cls is None:
        raise ValueError(f"peft_type {config.peft_type!r} is not supported; supported: {sorted(_TUNERS)}")
    return cls


class PeftModel(nn.Module):
    """A model with named adapters, saved and loaded in PEFT's directory format.

    Build one with :func:`get_peft_model` or :meth:`from_pretrained`.
    Attribute access falls through to the wrapped model, so ``generate``,
    ``config``, ``get_input_embeddings`` etc. work as on the original.

    ``state_dict()`` names a tied tensor (``lm_head.weight`` tied to
    ``embed_tokens.weight``) once, under its first name, so that safetensors
    can write it; ``load_state_dict`` (strict or not) fills the other name in.
    """

    def __init__(self, model: nn.Module, config: PeftConfig, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        if isinstance(model, PeftModel):
            raise TypeError("model is already a PeftModel; use add_adapter to add another adapter")
        self.base_model = _tuner_for(config)(model, config, adapter_name)
        self.base_model.mark_trainable(not config.inference_mode)
        self._trainable = not config.inference_mode
        #: ``{layer: relative error}`` added by the last re-quantizing merge (4-bit bases).
        self.merge_errors: dict[str, float] = {}
        # transformers' Trainer writes state_dict() with safetensors, which
        # refuses tied embeddings listed twice (see qpeft.tuners.tied).
        register_tied_hooks(self)

    # ---------------------------------------------------------------- model

    def forward(self, input_ids=None, *args, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        # Named parameters, as on transformers' models: Trainer keeps only the
        # dataset columns the forward's signature names.
        for key, value in (("attention_mask", attention_mask), ("inputs_embeds", inputs_embeds), ("labels", labels)):
            if value is not None:
                kwargs[key] = value
        if input_ids is not None:
            args = (input_ids, *args)
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """The wrapped model's ``generate``, with the active adapters applied."""
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with adapter layers in place)."""
        return self.base_model.model

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        """Adapter configs by name."""
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        """The active adapter's name (a list when several are active)."""
        active = self.base_model.active_adapters
        return active[0] if len(active) == 1 else list(active)

    # -------------------------------------------------------------- counting

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts; a 4-bit weight counts its values, not its bytes."""
        trainable = total = 0
        for p in self.parameters():
            n = p.numel() * 2 if p.dtype == torch.uint8 else p.numel()
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: N || all params: M || trainable%: P`` (PEFT's line)."""
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    # -------------------------------------------------------------- adapters

    def add_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        """Add another adapter of the same method; it is inactive until :meth:`set_adapter`."""
        if config.peft_type != next(iter(self.peft_config.values())).peft_type:
            raise ValueError("all adapters of one PeftModel must use the same method (peft_type)")
        self.base_model.inject_adapter(adapter_name, config)
        self.base_model.set_adapter(self.base_model.active_adapters)
        self.base_model.mark_trainable(self._trainable)

    def set_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        """Make ``adapter_name`` (or a list of names, summed) the active adapter(s); only they train."""
        self.base_model.set_adapter(adapter_name)
        self.base_model.mark_trainable(self._trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; layers left without adapters become their plain base layers again."""
        if len(self.peft_config) == 1 and adapter_name in self.peft_config:
            raise ValueError(f"{adapter_name!r} is the only adapter; use merge_and_unload() or unload() instead")
        self.base_model.delete_adapter(adapter_name)
        if not self.base_model.active_adapters:
            self.base_model.set_adapter(sorted(self.peft_config)[0])
        self.base_model.mark_trainable(self._trainable)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes as its base model (merged adapters are unmerged meanwhile)."""
        # Only LoRA layers can be merged; other methods have no merged state to undo.
        lora_layers = getattr(self.base_model, "lora_layers", lambda: iter(()))
        merged = {path: list(layer.merged_adapters) for path, layer in lora_layers()}
        self.base_model.unmerge()
        self.base_model.set_disabled(True)
        try:
            yield
        finally:
            self.base_model.set_disabled(False)
            for path, layer in lora_layers():
                if merged.get(path):
                    layer.merge(merged[path])

    # --------------------------------------------------------------- merging

    def merge(self, adapter_names: Optional[list[str]] = None, keep_original: bool = False) -> dict[str, float]:
        """Fold the active adapters (or ``adapter_names``) into the base weights, reversibly.

        See :meth:`qpeft.tuners.lora.LoraLinear.merge`. Returns the relative
        error re-quantizing added, by layer, for 4-bit layers (empty for dense
        models).
        """
        self.merge_errors = self.base_model.merge(adapter_names, keep_original)
        return self.merge_errors

    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        self.base_model.unmerge()

    def merge_and_unload(
        self,
        adapter_names: Optional[list[str]] = None,
        dense: Optional[bool] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> nn.Module:
        """Merge the adapters into the weights and return the plain model, without adapter layers.

        Dense base layers are merged in place. 4-bit base layers need a choice:

        * ``dense=True``: replace each with an ``nn.Linear`` holding
          ``dequant(W0) + scale * B @ A`` exactly (in ``dtype``, default the
          layer's dequantized dtype);
        * ``dense=False``: re-quantize the merged weight in the layer's own
          4-bit format; the added relative error per layer is in
          :attr:`merge_errors` afterwards.

        This wrapper must not be used afterwards.
        """
        model, self.merge_errors = self.base_model.merge_and_unload(adapter_names, dense, dtype)
        return model

    def unload(self) -> nn.Module:
        """Remove every adapter layer without merging; returns the original model."""
        if not hasattr(self.base_model, "lora_layers"):
            return self.base_model.unload()
        model = self.base_model.model
        for path, layer in list(self.base_model.lora_layers()):
            layer.unmerge()
            self.base_model._replace(path, layer.base_layer)
        for path, wrapper in list(self.base_model.saved_modules()):
            self.base_model._replace(path, wrapper.original_module)
        return model

    # ------------------------------------------------------------------ files

    def save_pretrained(self, save_directory: Union[str, Path], selected_adapters: Optional[list[str]] = None) -> None:
        """Write adapters in PEFT's layout: ``default`` in ``save_directory``, others in subfolders by name."""
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapter named {unknown}; adapters: {sorted(self.peft_config)}")
        base = self.base_model.model
        name_or_path = getattr(getattr(base, "config", None), "_name_or_path", None) or None
        for name in names:
            config = dataclasses.replace(self.peft_config[name], inference_mode=True)
            if config.base_model_name_or_path is None and name_or_path:
                config.base_model_name_or_path = str(name_or_path)
            write_adapter(adapter_dir(save_directory, name), config, self.base_model.adapter_state_dict(name))

    def load_adapter(self, model_id: Union[str, Path], adapter_name: str, is_trainable: bool = False) -> None:
        """Load an adapter directory (written by qpeft or PEFT) as ``adapter_name``."""
        config, tensors = read_adapter(model_id)
        config.inference_mode = not is_trainable
        self.base_model.inject_adapter(adapter_name, config)
        try:
            self.base_model.load_adapter_state_dict(adapter_name, tensors)
        except Exception:
            self.base_model.delete_adapter(adapter_name)
            raise
        self._trainable = is_trainable
        self.base_model.mark_trainable(is_trainable)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: Union[str, Path],
        adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False,
    ) -> "PeftModel":
        """Load a PEFT adapter directory onto ``model`` (modified in place).

        Args:
            model: the base model the adapter was trained on (dense or 4-bit).
            model_id: the adapter directory (``adapter_config.json`` +
                ``adapter_model.safetensors``).
            is_trainable: leave the adapter trainable; default: frozen, for inference.

        Raises:
            ValueError: the config uses a feature qpeft lacks, or the tensors do
                not fit ``model`` (the message names the key and both shapes).
        """
        config, tensors = read_adapter(model_id)
        config.inference_mode = not is_trainable
        peft_model = cls(model, config, adapter_name)
        try:
            peft_model.base_model.load_adapter_state_dict(adapter_name, tensors)
        except Exception:
            peft_model.unload()
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = DEFAULT_ADAPTER) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``peft_config`` (the model is modified in place).

    Only adapter parameters (plus ``modules_to_save`` copies and the biases
    ``bias`` selects) require gradients afterwards; nothing of the base model
    changes dtype.

    >>> from qpeft.tuners import LoraConfig, get_peft_model  # doctest: +SKIP
    >>> peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))  # doctest: +SKIP
    """
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(
            f"peft_config must be a qpeft.tuners config such as LoraConfig, got {type(peft_config).__name__}"
        )
    return PeftModel(model, peft_config, adapter_name)

