"""LoRA over a whole model: injection, adapter bookkeeping and PEFT's tensor keys.

:class:`LoraModel` holds the user's model as ``.model`` (so parameter names
read ``base_model.model.<path>`` under :class:`~qpeft.tuners.PeftModel`, as in
PEFT), swaps the targeted layers for :class:`~qpeft.tuners.lora.LoraLinear`,
wraps ``modules_to_save``, and converts between its parameters and the keys of
PEFT's ``adapter_model.safetensors``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch
from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .lora import LoraLinear, supports_lora
from .modules_to_save import ModulesToSave
from .targets import find_targets

__all__ = ["LoraModel"]

_A, _B, _M = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"


class LoraModel(nn.Module):
    """A model with LoRA layers injected in place.

    Args:
        model: the model to adapt (modified in place).
        config: the first adapter's :class:`~qpeft.tuners.LoraConfig`.
        adapter_name: its name.
    """

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
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

    def lora_layers(self) -> Iterator[tuple[str, LoraLinear]]:
        """``(path, layer)`` for every LoRA layer, paths relative to :attr:`model`."""
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLinear):
                yield name, module

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSave):
                yield name, module

    def inject_adapter(self, name: str, config: LoraConfig) -> None:
        """Add adapter ``name`` to every module ``config`` selects (wrapping layers not yet wrapped)."""
        if not isinstance(config, LoraConfig):
            raise TypeError(f"LoRA needs a LoraConfig, got {type(config).__name__}")
        if name in self.peft_config:
            raise ValueError(f"an adapter named {name!r} already exists; delete_adapter({name!r}) first")
        if not name or "." in name:
            raise ValueError(f"adapter names must be non-empty and contain no '.', got {name!r}")
        config = dataclasses.replace(config)
        targets = find_targets(
            self.model,
            config.target_modules,
            config.layers_to_transform,
            config.layers_pattern,
            exclude=config.modules_to_save or (),
            skip_types=(LoraLinear, ModulesToSave),
        )
        modules = {t: self.model.get_submodule(t) for t in targets}
        bad = [
            f"{t} ({type(m).__name__})" for t, m in modules.items() if not isinstance(m, LoraLinear) and not supports_lora(m)
        ]
        if bad:
            raise ValueError(
                f"LoRA applies to nn.Linear, transformers Conv1D and qpeft.nn.Linear4bit; target_modules "
                f"{config.target_modules!r} also selects {bad[:5]}; narrow target_modules to linear layers"
            )
        taken = [t for t in targets if name in getattr(self.model.get_submodule(t), "lora_A", {})]
        if taken:
            raise ValueError(
                f"{taken[0]} already has a LoRA adapter named {name!r} (the model was adapted before, e.g. by "
                "an earlier get_peft_model); pass a fresh model or use add_adapter with another name"
            )
        saved = self._find_modules_to_save(config.modules_to_save or [])
        for path in saved:
            module = self.model.get_submodule(path)
            if isinstance(module, LoraLinear):
                raise ValueError(f"{path} has LoRA from another adapter; it cannot also be in modules_to_save")
            if not isinstance(module, ModulesToSave) and any(p.dtype == torch.uint8 for p in module.parameters()):
                raise ValueError(
                    f"modules_to_save module {path} has 4-bit weights, which cannot be trained; keep it dense "
                    "(qpeft.quantize_model leaves the output head dense by default)"
                )
        # Everything is checked: from here on the model changes.
        for path in targets:
            module = self.model.get_submodule(path)
            if not isinstance(module, LoraLinear):
                module = LoraLinear(module)
                module.train(module.base_layer.training)
                self._replace(path, module)
            if module.fan_in_fan_out:
                config.fan_in_fan_out = True
            module.add_adapter(
                name, config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, config.use_dora,
                config.init_lora_weights,
            )
        for path in saved:
            module = self.model.get_submodule(path)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                self._replace(path, module)
            module.add_adapter(name)
        if config.target_modules == ALL_LINEAR:
            # PEFT writes the expanded names, so the file says exactly which layers it covers.
            config.target_modules = sorted(targets)
        self.peft_config[name] = config

    def _find_modules_to_save(self, names: list[str]) -> list[str]:
        found, missing = [], []
        for target in names:
            hits = [
                n for n, _ in self.model.named_modules()
                if n and (n == target or n.endswith("." + target))
                and ".modules_to_save." not in n and ".original_module" not in n
            ]
            if not hits:
                missing.append(target)
            found.extend(h for h in hits if h not in found)
        if missing:
            top = sorted({n.split(".")[-1] for n, _ in self.model.named_modules() if n})
            raise ValueError(f"modules_to_save {missing} match no module of this model; module names: {top[:40]}")
        return found

    def _replace(self, path: str, module: nn.Module) -> None:
        parent, _, child = path.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, module)

    # -------------------------------------------------------------- adapters

    def set_adapter(self, names) -> None:
        """Activate one adapter (a name) or several (a list; LoRA outputs are summed)."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapter named {unknown}; adapters: {sorted(self.peft_config)}")
        for _, layer in self.lora_layers():
            layer.set_adapters(names)
        for _, wrapper in self.saved_modules():
            wrapper.set_adapter(next((n for n in names if n in wrapper.modules_to_save), None))
        self.active_adapters = names

    def delete_adapter(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r}; adapters: {sorted(self.peft_config)}")
        for _, layer in self.lora_layers():
            layer.delete_adapter(name)
        for _, wrapper in self.saved_modules():
            wrapper.delete_adapter(name)
        del self.peft_config[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]
        # Layers left with no adapter go back to their plain base layer.
        for path, layer in list(self.lora_layers()):
            if not layer.lora_A:
                self._replace(path, layer.base_layer)
        for path, wrapper in list(self.saved_modules()):
            if not wrapper.modules_to_save:
                self._replace(path, wrapper.original_module)

    def set_disabled(self, disabled: bool) -> None:
        for _, layer in self.lora_layers():
            layer.disabled = disabled
        for _, wrapper in self.saved_modules():
            wrapper.disabled = disabled

    def mark_trainable(self, trainable: bool) -> None:
        """Only the active adapters' parameters (and biases per ``bias``) require gradients."""
        self.model.requires_grad_(False)
        if not trainable:
            return
        for name in self.active_adapters:
            cfg = self.peft_config[name]
            for _, layer in self.lora_layers():
                for d in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
                    if name in d:
                        d[name].requires_grad_(True)
                if cfg.bias == "lora_only" and name in layer.lora_A and layer.base_layer.bias is not None:
                    layer.base_layer.bias.requires_grad_(True)
            for _, wrapper in self.saved_modules():
                if name in wrapper.modules_to_save:
                    wrapper.modules_to_save[name].requires_grad_(True)
            if cfg.bias == "all":
                for pname, p in self.model.named_parameters():
                    if pname.endswith("bias") and ".original_module." not in pname:
                        p.requires_grad_(True)

    # ---------------------------------------------------------- PEFT's keys

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors under PEFT's keys (relative to the model, no ``base_model.model.``)."""
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r}; adapters: {sorted(self.peft_config)}")
        cfg = self.peft_config[name]
        out: dict[str, torch.Tensor] = {}
        for path, layer in self.lora_layers():
            if name not in layer.lora_A:
                continue
            out[path + _A] = layer.lora_A[name]
            out[path + _B] = layer.lora_B[name]
            if name in layer.lora_magnitude_vector:
                out[path + _M] = layer.lora_magnitude_vector[name]
            if cfg.bias == "lora_only" and layer.base_layer.bias is not None:
                out[path + ".base_layer.bias"] = layer.base_layer.bias
        saved_prefixes = []
        for path, wrapper in self.saved_modules():
            saved_prefixes.append(path + ".")
            if name in wrapper.modules_to_save:
                for pname, p in wrapper.modules_to_save[name].named_parameters():
                    out[f"{path}.{pname}"] = p
        if cfg.bias == "all":
            for pname, p in self.model.named_parameters():
                if pname.endswith("bias") and not any(pname.startswith(s) for s in saved_prefixes):
                    out[pname] = p
        return {k: v.detach() for k, v in out.items()}

    @torch.no_grad()
    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy PEFT-keyed ``tensors`` into adapter ``name`` (already injected); shapes must fit."""
        layers = dict(self.lora_layers())
        wrappers = dict(self.saved_modules())
        params = dict(self.model.named_parameters())
        expected = set(self.adapter_state_dict(name))
        errors, unexpected = [], []
        for key, value in tensors.items():
            target = None
            for suffix, attr in ((_A, "lora_A"), (_B, "lora_B"), (_M, "lora_magnitude_vector")):
                if key.endswith(suffix) and key[: -len(suffix)] in layers:
                    layer = layers[key[: -len(suffix)]]
                    target = getattr(layer, attr)[name] if name in getattr(layer, attr) else None
                    break
            if target is None:
                for path, wrapper in wrappers.items():
                    if key.startswith(path + ".") and name in wrapper.modules_to_save:
                        target = dict(wrapper.modules_to_save[name].named_parameters()).get(key[len(path) + 1:])
            if target is None and key.endswith("bias"):
                target = params.get(key)
            if target is None:
                unexpected.append(key)
                continue
            if tuple(value.shape) != tuple(target.shape):
                errors.append(f"{key}: file has shape {tuple(value.shape)}, this model needs {tuple(target.shape)}")
                continue
            target.copy_(value.to(target.dtype))
        if unexpected:
            hint = ""
            if any("lora_embedding" in k for k in unexpected):
                hint = " (LoRA on embedding layers is not supported by qpeft)"
            raise ValueError(
                f"adapter file has {len(unexpected)} key(s) that fit no module of this model{hint}: "
                f"{sorted(unexpected)[:5]}; is it an adapter for another model?"
            )
        if errors:
            raise ValueError("adapter file does not fit this model: " + "; ".join(errors[:5]))
        missing = sorted(k for k in expected - set(tensors) if not k.endswith("bias"))
        if missing:
            raise ValueError(f"adapter file lacks {len(missing)} tensor(s) this config needs: {missing[:5]}")

    # --------------------------------------------------------------- merging

    def merge(self, names: Optional[list[str]] = None, keep_original: bool = False) -> dict[str, float]:
        """Merge adapters into every LoRA layer.

        Returns ``{layer path: relative error}`` for the re-quantized 4-bit layers.
        """
        names = list(self.active_adapters if names is None else names)
        errors = {}
        for path, layer in self.lora_layers():
            here = [n for n in names if n in layer.lora_A]
            layer.merge(here, keep_original=keep_original)
            if layer.is_4bit:
                for n in here:
                    errors[path if len(here) == 1 else f"{path}[{n}]"] = layer.merge_error[n]
        return errors

    def unmerge(self) -> None:
        for _, layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(self, names: Optional[list[str]], dense: Optional[bool], dtype) -> tuple[nn.Module, dict]:
        names = list(self.active_adapters if names is None else names)
        layers = list(self.lora_layers())
        if dense is None and any(layer.is_4bit for _, layer in layers):
            raise ValueError(
                "the model has 4-bit base layers: pass dense=True to get an exactly merged dense model, or "
                "dense=False to re-quantize the merged weights (the added error per layer is reported)"
            )
        errors: dict[str, float] = {}
        for path, layer in layers:
            layer.unmerge()
            here = [n for n in names if n in layer.lora_A]
            if layer.is_4bit and dense:
                self._replace(path, layer.merged_dense(here, dtype))
                continue
            layer.merge(here)
            if layer.is_4bit:
                for n in here:
                    errors[path if len(here) == 1 else f"{path}[{n}]"] = layer.merge_error[n]
            layer._merge_saved.clear()
            self._replace(path, layer.base_layer)
        for path, wrapper in list(self.saved_modules()):
            keep = next((n for n in names if n in wrapper.modules_to_save), None)
            self._replace(path, wrapper.modules_to_save[keep] if keep else wrapper.original_module)
        return self.model, errors
