"""Tied weights under one name in a :class:`~qpeft.tuners.PeftModel`'s state dict.

A model with tied embeddings (``lm_head.weight`` *is* ``embed_tokens.weight``,
as in SmolLM2) lists that tensor under both names in torch's ``state_dict()``,
and safetensors refuses to write a dict whose tensors share memory. That is
how transformers' ``Trainer`` saves any model that is not a transformers or
PEFT class, checkpoints included. So a ``PeftModel`` names each shared tensor
once, under its first name in state-dict order (transformers'
``save_pretrained`` and safetensors' ``save_model`` also write tied weights
once), and when loading gives the other names the same tensor, so that
``load_state_dict(strict=True)`` takes both this short dict and a full one.
"""

from __future__ import annotations

import itertools

from torch import nn

__all__ = ["alias_groups", "register_tied_hooks"]


def _persistent(module: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf not in module.get_submodule(owner)._non_persistent_buffers_set


def alias_groups(module: nn.Module) -> list[list[str]]:
    """Names (relative to ``module``) of each tensor registered under several names, first name first.

    Only state-dict entries count: parameters and persistent buffers. Order
    within a group is state-dict order, so the first name is the one
    ``state_dict()`` keeps.
    """
    groups: dict[int, list[str]] = {}
    params = module.named_parameters(remove_duplicate=False)
    buffers = ((n, b) for n, b in module.named_buffers(remove_duplicate=False) if _persistent(module, n))
    for name, tensor in itertools.chain(params, buffers):
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _drop_aliases(module, state_dict, prefix, local_metadata) -> None:
    for names in alias_groups(module):
        if prefix + names[0] in state_dict:
            for name in names[1:]:
                state_dict.pop(prefix + name, None)


def _restore_aliases(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    # Either name may be the one present (a dict from elsewhere may keep the
    # other), and a full dict is left as it is.
    for names in alias_groups(module):
        present = next((prefix + n for n in names if prefix + n in state_dict), None)
        if present is not None:
            for name in names:
                state_dict.setdefault(prefix + name, state_dict[present])


def register_tied_hooks(module: nn.Module) -> None:
    """Make ``module.state_dict()`` name tied tensors once and ``module.load_state_dict`` re-fill the other names."""
    # The public registration methods are recent; older torch has only the private ones.
    if hasattr(module, "register_state_dict_post_hook"):
        module.register_state_dict_post_hook(_drop_aliases)
    else:  # pragma: no cover - older torch
        module._register_state_dict_hook(_drop_aliases)
    if hasattr(module, "register_load_state_dict_pre_hook"):
        module.register_load_state_dict_pre_hook(_restore_aliases)
    else:  # pragma: no cover - older torch
        module._register_load_state_dict_pre_hook(_restore_aliases, with_module=True)
