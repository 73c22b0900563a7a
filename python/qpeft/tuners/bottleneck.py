"""The bottleneck adapter of one sublayer: named down/up projection pairs run by a forward hook.

A :class:`BottleneckAdapters` module is attached to an attention or
feed-forward sublayer as its child ``bottleneck`` and registered as that
sublayer's forward hook, so the sublayer's own parameters keep their names
(and their 4-bit storage) and model code that reads its attributes is
unaffected. Parameter names are ``<sublayer>.bottleneck.down.<adapter>.weight``
etc.; the file key drops the adapter name.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACTIVATIONS", "CHILD", "BottleneckAdapters", "attach", "detach"]

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}

#: Name of the child module holding the adapters on each sublayer.
CHILD = "bottleneck"


class BottleneckAdapters(nn.Module):
    """Bottleneck adapters of one sublayer, by name.

    Args:
        hidden_size: width of the sublayer's input and output.
        where: the sublayer's path, for error messages.

    Attributes:
        down, up: ``ModuleDict`` of ``nn.Linear`` by adapter name
            (``hidden -> size`` and ``size -> hidden``).
        mode, scaling, non_linearity: per-adapter settings.
        active_adapters: names applied in the forward: parallel ones summed
            from the sublayer input, then sequential ones in this order.
        disabled: when ``True`` the sublayer's output passes unchanged.
    """

    def __init__(self, hidden_size: int, where: str = "") -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.where = where
        self.down = nn.ModuleDict()
        self.up = nn.ModuleDict()
        self.dropout = nn.ModuleDict()
        self.mode: dict[str, str] = {}
        self.scaling: dict[str, float] = {}
        self.non_linearity: dict[str, str] = {}
        self.active_adapters: list[str] = []
        self.disabled = False

    def add_adapter(
        self,
        name: str,
        size: int,
        non_linearity: str = "relu",
        mode: str = "sequential",
        scaling: float = 1.0,
        dropout: float = 0.0,
        init_weights=True,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        """Add adapter ``name``; see :class:`~qpeft.tuners.BottleneckConfig` for the arguments."""
        if name in self.down:
            raise ValueError(f"adapter {name!r} already exists at {self.where}")
        if non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {sorted(ACTIVATIONS)}, got {non_linearity!r}")
        down = nn.Linear(self.hidden_size, size, dtype=dtype, device=device)
        up = nn.Linear(size, self.hidden_size, dtype=dtype, device=device)
        with torch.no_grad():
            if init_weights is False:
                nn.init.normal_(up.weight, std=1 / math.sqrt(size))
                nn.init.normal_(up.bias, std=0.02)
                nn.init.normal_(down.bias, std=0.02)
            else:
                if init_weights == "houlsby":
                    nn.init.normal_(down.weight, std=1e-2)
                    nn.init.normal_(up.weight, std=1e-2)
                else:
                    # down keeps nn.Linear's Kaiming-uniform; a zero up makes the adapter exactly zero.
                    nn.init.zeros_(up.weight)
                nn.init.zeros_(down.bias)
                nn.init.zeros_(up.bias)
        self.down[name] = down
        self.up[name] = up
        self.dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # A module added to an eval-mode model must not start in training mode.
        self.dropout[name].train(self.training)
        self.mode[name] = mode
        self.scaling[name] = float(scaling)
        self.non_linearity[name] = non_linearity

    def delete_adapter(self, name: str) -> None:
        for d in (self.down, self.up, self.dropout):
            if name in d:
                del d[name]
        for d in (self.mode, self.scaling, self.non_linearity):
            d.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_adapters(self, names: Iterable[str]) -> None:
        """Make ``names`` (those this sublayer has) the active adapters."""
        self.active_adapters = [n for n in names if n in self.down]

    def delta(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """``scaling * up(act(down(dropout(z))))`` in the adapter's dtype."""
        down, up = self.down[name], self.up[name]
        z = self.dropout[name](z.to(down.weight.dtype))
        return up(ACTIVATIONS[self.non_linearity[name]](down(z))) * self.scaling[name]

    def forward(self, x: Optional[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        """The sublayer's new output from its input ``x`` and output ``h``."""
        if self.disabled or not self.active_adapters:
            return h
        if h.shape[-1] != self.hidden_size:
            raise ValueError(
                f"the bottleneck adapter at {self.where} expects hidden size {self.hidden_size}, but the sublayer "
                f"returns last dimension {h.shape[-1]}; choose attn_modules/mlp_modules whose output is the "
                "block's hidden state"
            )
        out_dtype = h.dtype
        out = h
        parallel = [n for n in self.active_adapters if self.mode[n] == "parallel"]
        if parallel:
            if x is None or x.shape[-1] != self.hidden_size:
                raise ValueError(
                    f"the parallel bottleneck adapter at {self.where} needs the sublayer's hidden-state input "
                    f"(the first positional argument or hidden_states=); none of width {self.hidden_size} was "
                    "passed; use mode='sequential' for this sublayer"
                )
            for name in parallel:
                out = out + self.delta(name, x).to(out_dtype)
        for name in self.active_adapters:
            if self.mode[name] == "sequential":
                out = out + self.delta(name, out).to(out_dtype)
        return out

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output):
        """Forward hook (``with_kwargs=True``) of the sublayer: replaces its hidden-state output."""
        if self.disabled or not self.active_adapters:
            return None
        x = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("hidden_states")
        if isinstance(output, tuple):
            return (self(x, output[0]),) + tuple(output[1:])
        return self(x, output)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, adapters={ {n: self.mode[n] for n in self.down} }"


def attach(sublayer: nn.Module, adapters: BottleneckAdapters) -> None:
    """Make ``adapters`` the child ``bottleneck`` of ``sublayer`` and its forward hook."""
    if CHILD in sublayer._modules or hasattr(sublayer, CHILD):
        raise ValueError(f"{adapters.where} already has an attribute {CHILD!r}")
    sublayer.add_module(CHILD, adapters)
    sublayer.register_forward_hook(adapters.hook, with_kwargs=True)


def detach(sublayer: nn.Module) -> None:
    """Undo :func:`attach`: remove the hook and the child."""
    adapters = sublayer._modules.get(CHILD)
    for key, fn in list(sublayer._forward_hooks.items()):
        if getattr(fn, "__self__", None) is adapters:
            del sublayer._forward_hooks[key]
            sublayer._forward_hooks_with_kwargs.pop(key, None)
    del sublayer._modules[CHILD]
