"""Whole modules trained alongside an adapter (PEFT's ``modules_to_save``).

The original module stays frozen; each adapter gets its own trainable copy,
and the wrapper runs the active adapter's copy (the original when no adapter
is active or adapters are disabled).
"""

from __future__ import annotations

import copy
from typing import Optional

from torch import nn

__all__ = ["ModulesToSave"]


class ModulesToSave(nn.Module):
    """A frozen module plus one trainable copy per adapter.

    Attributes:
        original_module: the wrapped module, unchanged.
        modules_to_save: ``ModuleDict`` of copies by adapter name.
        active_adapter: the copy used in the forward, or ``None``.
        disabled: when ``True`` the original runs.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        clone = copy.deepcopy(self.original_module)
        clone.requires_grad_(True)
        self.modules_to_save[name] = clone

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_adapter(self, name: Optional[str]) -> None:
        self.active_adapter = name if name in self.modules_to_save else None

    def forward(self, *args, **kwargs):
        if self.disabled or self.active_adapter is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def __getattr__(self, name: str):
        # Code that reads attributes of the wrapped module (e.g. ``lm_head.weight``
        # for tying, ``embed_tokens.num_embeddings``) sees the module in use.
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        modules = self._modules
        active = self.__dict__.get("active_adapter")
        if active is not None and not self.__dict__.get("disabled") and active in modules["modules_to_save"]:
            return getattr(modules["modules_to_save"][active], name)
        return getattr(modules["original_module"], name)
