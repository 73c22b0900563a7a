"""Adapter directories in Hugging Face PEFT's layout.

``<dir>/adapter_config.json`` and ``<dir>/adapter_model.safetensors`` (metadata
``{"format": "pt"}``) for the adapter named ``"default"``; any other adapter
goes to ``<dir>/<name>/``, as PEFT's ``save_pretrained`` does. Tensor keys
carry the prefix ``base_model.model.`` and no adapter name, except the prompt
methods' single tensor ``prompt_embeddings``, which PEFT writes unprefixed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

import torch

from .._files import chmod_default
from .config import CONFIG_NAME, PeftConfig, load_config

__all__ = [
    "DEFAULT_ADAPTER", "KEY_PREFIX", "TOP_LEVEL_KEYS", "WEIGHTS_NAME", "adapter_dir", "read_adapter", "write_adapter",
]

#: File holding an adapter's tensors (PEFT's name).
WEIGHTS_NAME = "adapter_model.safetensors"
#: Prefix of every key in the file: PEFT's ``PeftModel.base_model.model``.
KEY_PREFIX = "base_model.model."
#: Keys PEFT writes without :data:`KEY_PREFIX` (prompt tuning, P-tuning, prefix tuning).
TOP_LEVEL_KEYS = frozenset({"prompt_embeddings"})
#: The adapter saved at the top of a directory (the others go to subfolders by name).
DEFAULT_ADAPTER = "default"


def adapter_dir(root: Union[str, Path], adapter_name: str) -> Path:
    """Where adapter ``adapter_name`` lives under a saved directory ``root``."""
    root = Path(root)
    return root if adapter_name == DEFAULT_ADAPTER else root / adapter_name


def write_adapter(directory: Union[str, Path], config: PeftConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Write one adapter: ``tensors`` keyed relative to the base model (no prefix)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = {(k if k in TOP_LEVEL_KEYS else KEY_PREFIX + k): v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # Written beside the target and renamed, so a crash never leaves half a file.
    fd, tmp = tempfile.mkstemp(prefix=f".{WEIGHTS_NAME}.", dir=directory)
    os.close(fd)
    try:
        save_file(data, tmp, metadata={"format": "pt"})
        chmod_default(Path(tmp), 0o666)
        os.replace(tmp, directory / WEIGHTS_NAME)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    config.save(directory)


def read_adapter(directory: Union[str, Path]) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """Read one adapter directory: its config and tensors keyed relative to the base model.

    Accepts ``adapter_model.safetensors`` or PEFT's older ``adapter_model.bin``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {str(directory)!r} does not exist")
    config = load_config(directory)
    st, binary = directory / WEIGHTS_NAME, directory / "adapter_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        path = st
        try:
            raw = load_file(str(st))
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            raise ValueError(f"{str(st)!r} is not a readable safetensors file: {e}") from None
    elif binary.is_file():
        path = binary
        try:
            # weights_only: tensors and plain containers only; a pickle that
            # names any other object is refused, never run.
            raw = torch.load(binary, map_location="cpu", weights_only=True)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - pickle, zip and torch readers each raise their own types
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ValueError(f"{str(binary)!r} is not a loadable tensor file ({first}); "
                             f"qpeft reads only tensors from adapter_model.bin, never other pickled objects") from None
        if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
            raise ValueError(f"{str(binary)!r} must hold a dict of tensors")
    else:
        raise FileNotFoundError(f"{str(directory)!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    bad = [k for k in raw if not isinstance(k, str) or (not k.startswith(KEY_PREFIX) and k not in TOP_LEVEL_KEYS)]
    if bad:
        raise ValueError(
            f"{str(path)!r}: keys must start with {KEY_PREFIX!r} (PEFT's layout); found {bad[:3]}"
        )
    return config, {(k if k in TOP_LEVEL_KEYS else k[len(KEY_PREFIX):]): v for k, v in raw.items()}
