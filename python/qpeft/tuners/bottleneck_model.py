"""Bottleneck adapters over a whole model, and their directory format.

Houlsby et al. (2019) insert a small bottleneck (down-projection,
non-linearity, up-projection, residual) after the attention and the
feed-forward sublayer of every block; He et al. (2022, "Towards a unified view
of parameter-efficient transfer learning") compute it from the sublayer's
input instead and add it, scaled, to the sublayer's output ("parallel"
adapter). :class:`BottleneckModel` attaches them to a dense or 4-bit
(:func:`qpeft.quantize_model`) model through forward hooks, so the base
model's parameter names and storage do not change.

Files. PEFT has no such method, so the directory uses PEFT's layout with a
``peft_type`` of qpeft's own; ``peft.PeftModel.from_pretrained`` refuses it
with its own error, :meth:`qpeft.tuners.PeftModel.from_pretrained` loads it:

* ``adapter_config.json``: ``"peft_type": "QPEFT_BOTTLENECK"`` and the fields
  of :class:`~qpeft.tuners.BottleneckConfig` (``bottleneck_size``,
  ``non_linearity``, ``placement``, ``mode``, ``scaling``, ``dropout``,
  ``layers_to_transform``, ``init_weights``, and ``attn_modules`` /
  ``mlp_modules`` with the sublayer names actually used), plus
  ``task_type``, ``base_model_name_or_path`` and ``inference_mode``.
* ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``): for every
  adapted sublayer ``P`` four float tensors,
  ``base_model.model.P.bottleneck.down.weight`` ``(bottleneck_size, hidden)``,
  ``...down.bias`` ``(bottleneck_size,)``, ``...up.weight``
  ``(hidden, bottleneck_size)`` and ``...up.bias`` ``(hidden,)``, e.g.
  ``base_model.model.model.layers.0.mlp.bottleneck.up.weight``.
* Further named adapters go to subfolders by name, as PEFT does.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Optional

import torch
from torch import nn

from .bottleneck import CHILD, BottleneckAdapters, attach, detach
from .bottleneck_config import BottleneckConfig
from .targets import layer_index, matches_name

__all__ = ["BottleneckModel"]

_PARTS = ("down", "up")


def _hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError(
            "bottleneck adapters read the hidden size from model.config.hidden_size, which this model lacks; "
            "use a transformers model"
        )
    return size


class BottleneckModel(nn.Module):
    """A model with bottleneck adapters hooked onto its attention and feed-forward sublayers.

    Args:
        model: the model to adapt (modified in place).
        config: the first adapter's :class:`~qpeft.tuners.BottleneckConfig`.
        adapter_name: its name.
    """

    def __init__(self, model: nn.Module, config: BottleneckConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, BottleneckConfig] = {}
        self.active_adapters: list[str] = []
        self.inject_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ---------------------------------------------------------------- layers

    def bottleneck_layers(self) -> Iterator[tuple[str, BottleneckAdapters]]:
        """``(sublayer path, adapters)`` for every adapted sublayer, paths relative to :attr:`model`."""
        for name, module in self.model.named_modules():
            if isinstance(module, BottleneckAdapters):
                yield name.rpartition(".")[0], module

    def _select(self, config: BottleneckConfig) -> list[str]:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        wanted = config.sublayer_names(model_type)
        names = [n for n, _ in self.model.named_modules() if n and f".{CHILD}" not in n]
        selected: list[str] = []
        for kind, patterns in wanted.items():
            for pattern in patterns:
                hits = [n for n in names if matches_name(n, [pattern])]
                if not hits:
                    # The names one level below a numbered block are the sublayers to choose from.
                    inside = sorted({n.rsplit(".", 1)[-1] for n in names if re.search(r"\.\d+\.[^.]+$", n)})
                    raise ValueError(
                        f"{kind}_modules entry {pattern!r} matches no module of this model; the blocks of this "
                        f"model contain {inside}"
                    )
                selected.extend(h for h in hits if h not in selected)
        if config.layers_to_transform is not None:
            keep = set(config.layers_to_transform)
            selected = [n for n in selected if layer_index(n + ".") in keep]
            if not selected:
                raise ValueError(
                    f"layers_to_transform {config.layers_to_transform} selects no block of this model; "
                    "layer indices start at 0"
                )
        order = {n: i for i, n in enumerate(names)}
        return sorted(selected, key=order.__getitem__)

    def inject_adapter(self, name: str, config: BottleneckConfig) -> None:
        """Add adapter ``name`` to every sublayer ``config`` selects."""
        if not isinstance(config, BottleneckConfig):
            raise TypeError(f"bottleneck adapters need a BottleneckConfig, got {type(config).__name__}")
        if name in self.peft_config:
            raise ValueError(f"an adapter named {name!r} already exists; delete_adapter({name!r}) first")
        if not name or "." in name:
            raise ValueError(f"adapter names must be non-empty and contain no '.', got {name!r}")
        config = dataclasses.replace(config)
        hidden = _hidden_size(self.model)
        paths = self._select(config)
        # Adapters train in float32 on 16-bit and 4-bit bases (float64 stays float64).
        floats = [p for p in self.model.parameters() if p.is_floating_point()]
        dtype = torch.float64 if floats and floats[0].dtype == torch.float64 else torch.float32
        device = floats[0].device if floats else None
        for path in paths:
            sublayer = self.model.get_submodule(path)
            adapters = sublayer._modules.get(CHILD)
            if adapters is None:
                adapters = BottleneckAdapters(hidden, path)
                adapters.train(sublayer.training)
                attach(sublayer, adapters)
            adapters.add_adapter(
                name, config.bottleneck_size, config.non_linearity, config.mode, config.scaling, config.dropout,
                config.init_weights, dtype=dtype, device=device,
            )
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        # The file records the sublayer names actually used, so it does not depend on defaults.
        for kind, names in config.sublayer_names(model_type).items():
            setattr(config, f"{kind}_modules", names)
        self.peft_config[name] = config

    # -------------------------------------------------------------- adapters

    def set_adapter(self, names) -> None:
        """Activate one adapter (a name) or several (a list)."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapter named {unknown}; adapters: {sorted(self.peft_config)}")
        for _, layer in self.bottleneck_layers():
            layer.set_adapters(names)
        self.active_adapters = names

    def delete_adapter(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r}; adapters: {sorted(self.peft_config)}")
        for path, layer in list(self.bottleneck_layers()):
            layer.delete_adapter(name)
            if not layer.down:
                detach(self.model.get_submodule(path))
        del self.peft_config[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_disabled(self, disabled: bool) -> None:
        for _, layer in self.bottleneck_layers():
            layer.disabled = disabled

    def mark_trainable(self, trainable: bool) -> None:
        """Only the active adapters' parameters require gradients."""
        self.model.requires_grad_(False)
        if not trainable:
            return
        for _, layer in self.bottleneck_layers():
            for name in self.active_adapters:
                if name in layer.down:
                    layer.down[name].requires_grad_(True)
                    layer.up[name].requires_grad_(True)

    def unload(self) -> nn.Module:
        """Remove every adapter; returns the original model."""
        for path, _ in list(self.bottleneck_layers()):
            detach(self.model.get_submodule(path))
        return self.model

    # ---------------------------------------------------------- file keys

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors under the file's keys (relative to the model, no adapter name)."""
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r}; adapters: {sorted(self.peft_config)}")
        out = {}
        for path, layer in self.bottleneck_layers():
            if name not in layer.down:
                continue
            for part in _PARTS:
                linear = getattr(layer, part)[name]
                out[f"{path}.{CHILD}.{part}.weight"] = linear.weight.detach()
                out[f"{path}.{CHILD}.{part}.bias"] = linear.bias.detach()
        return out

    @torch.no_grad()
    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy file-keyed ``tensors`` into adapter ``name`` (already injected); shapes must fit."""
        targets = {}
        for path, layer in self.bottleneck_layers():
            if name in layer.down:
                for part in _PARTS:
                    linear = getattr(layer, part)[name]
                    targets[f"{path}.{CHILD}.{part}.weight"] = linear.weight
                    targets[f"{path}.{CHILD}.{part}.bias"] = linear.bias
        unexpected = sorted(k for k in tensors if k not in targets)
        if unexpected:
            raise ValueError(
                f"adapter file has {len(unexpected)} key(s) that fit no bottleneck adapter of this model: "
                f"{unexpected[:5]}; is it an adapter for another model, or were attn_modules/mlp_modules/"
                "layers_to_transform edited?"
            )
        errors = [
            f"{k}: file has shape {tuple(v.shape)}, this model needs {tuple(targets[k].shape)}"
            for k, v in tensors.items()
            if tuple(v.shape) != tuple(targets[k].shape)
        ]
        if errors:
            raise ValueError(
                "adapter file does not fit this model (bottleneck_size in adapter_config.json and the model's "
                "hidden size must match the tensors): " + "; ".join(errors[:5])
            )
        missing = sorted(set(targets) - set(tensors))
        if missing:
            raise ValueError(f"adapter file lacks {len(missing)} tensor(s) this config needs: {missing[:5]}")
        for k, v in tensors.items():
            targets[k].copy_(v.to(targets[k].dtype))

    # --------------------------------------------------------------- merging

    @staticmethod
    def _cannot_merge(*_args, **_kwargs):
        raise ValueError(
            "bottleneck adapters put a non-linearity between their two projections, so they cannot be folded "
            "into the base weights; keep the adapter attached (or use LoRA, which merges)"
        )

    merge = _cannot_merge
    merge_and_unload = _cannot_merge

    def unmerge(self) -> None:
        """Nothing is ever merged."""
