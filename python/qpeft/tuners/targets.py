"""Which modules of a model an adapter config selects.

Shared by every method that attaches to named modules: list-of-suffixes,
regex and ``"all-linear"`` targets, ``layers_to_transform`` and the output
head, with PEFT's matching rules.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Union

from torch import nn

from ..nn import Linear4bit

__all__ = ["find_targets", "is_conv1d", "layer_index", "matches_name", "output_head_names"]


def is_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D`` (a linear layer with its weight stored ``[in, out]``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def matches_name(name: str, patterns: Iterable[str]) -> bool:
    """``name`` equals one of ``patterns`` or ends with ``"." + pattern``."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str, layers_pattern: Optional[Union[str, list[str]]] = None) -> Optional[int]:
    """The index of the layer list that module ``name`` sits in (the first numbered segment)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output projection (``get_output_embeddings()``, or ``lm_head``)."""
    names = set()
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        head = None
    for name, module in model.named_modules():
        if (head is not None and module is head) or name.split(".")[-1] == "lm_head":
            names.add(name)
    return names


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Linear4bit)) or is_conv1d(module)


def find_targets(
    model: nn.Module,
    target_modules: Union[str, list[str]],
    layers_to_transform: Optional[list[int]] = None,
    layers_pattern=None,
    exclude: Iterable[str] = (),
    skip_types: tuple[type, ...] = (),
) -> list[str]:
    """Names of the modules that ``target_modules`` selects, in model order.

    Args:
        target_modules: list of names/suffixes, a regex matched against the
            whole name, or ``"all-linear"``.
        layers_to_transform: keep only modules in these layer indices.
        exclude: names/suffixes never selected (``modules_to_save``).
        skip_types: module classes whose insides are not searched (adapter
            layers already in the model).

    Raises:
        ValueError: nothing matched; the message lists the module names that could.
    """
    skip_prefixes: list[str] = []
    candidates: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in skip_prefixes):
            continue
        if skip_types and isinstance(module, skip_types):
            skip_prefixes.append(name + ".")
        candidates.append((name, module))
    exclude = list(exclude)
    if exclude:
        inside = [re.compile(rf"(^|.*\.){re.escape(e)}($|\..*)") for e in exclude]
        candidates = [(n, m) for n, m in candidates if not any(p.match(n) for p in inside)]
    if target_modules == "all-linear":
        heads = output_head_names(model)
        selected = [n for n, m in candidates if _is_linear(m) or (skip_types and isinstance(m, skip_types))]
        selected = [n for n in selected if n not in heads]
    elif isinstance(target_modules, str):
        selected = [n for n, _ in candidates if re.fullmatch(target_modules, n)]
    else:
        selected = [n for n, _ in candidates if matches_name(n, target_modules)]
        unmatched = [t for t in target_modules if not any(matches_name(n, [t]) for n in selected)]
        if unmatched:
            leaf = sorted({n.split(".")[-1] for n, m in candidates if _is_linear(m)})
            raise ValueError(
                f"target_modules {unmatched} match no module of this model; linear layers in this model "
                f"are named {leaf}"
            )
        if layers_to_transform is not None:
            wanted = set(layers_to_transform)
            selected = [n for n in selected if layer_index(n, layers_pattern) in wanted]
    if not selected:
        leaf = sorted({n.split(".")[-1] for n, m in candidates if _is_linear(m)})
        what = "layers_to_transform " + str(layers_to_transform) + " with " if layers_to_transform else ""
        raise ValueError(
            f"target_modules {target_modules!r} ({what}this model) matched no module; "
            f"linear layers in this model are named {leaf}"
        )
    return selected
