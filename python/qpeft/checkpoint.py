"""Save and load 4-bit models as bitsandbytes checkpoints (FORMATS.md §4).

:func:`save_quantized` writes what ``model.save_pretrained`` writes for a model
loaded with ``BitsAndBytesConfig(load_in_4bit=True)``: ``model.safetensors``
with each 4-bit layer under bitsandbytes' keys (``weight``, ``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``), ``config.json`` with a
``quantization_config``, and the tokenizer files. transformers + bitsandbytes
load it as they load their own.

:func:`load_quantized` reads such a checkpoint, written by qpeft or by
transformers + bitsandbytes, without bitsandbytes: the model is built from
``config.json`` with its parameters on the meta device (nothing is allocated
or randomly initialised), the 4-bit layers become :class:`qpeft.nn.Linear4bit`
shells, and every tensor comes from the safetensors file. It also quantizes a
plain model folder or a GGUF file on the fly (``quantize=True``).

safetensors and transformers are imported inside the functions (``pip install
'qpeft[hf]'``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from ._files import chmod_default, staged_dir
from .functional import QuantState
from .nn import Linear4bit, quantize_model

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "load_quantized", "save_quantized"]

#: The weights file (one shard; ``model.safetensors.index.json`` names several).
WEIGHTS_FILE = "model.safetensors"
#: The model's configuration, with ``quantization_config``.
CONFIG_FILE = "config.json"
_INDEX_FILE = "model.safetensors.index.json"
_QS_KEY = ".weight.quant_state.bitsandbytes__"
# The tensors of a 4-bit weight besides the packed codes and the JSON blob.
_QS_TENSORS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

log = logging.getLogger(__name__)


# ------------------------------------------------------------------- save


def save_quantized(
    model: nn.Module,
    directory: os.PathLike | str,
    tokenizer: Any = None,
    *,
    compute_dtype: torch.dtype | str = "bfloat16",
    extra_files: Optional[Mapping[str, str | bytes]] = None,
) -> Path:
    """Write a model whose linear layers are :class:`~qpeft.nn.Linear4bit` as a bitsandbytes checkpoint.

    Writes ``model.safetensors`` (metadata ``{"format": "pt"}``; a tensor
    shared by several names, such as a head tied to the embeddings, is saved
    once under the name transformers keeps), ``config.json`` (for a
    transformers model: its config as ``save_pretrained`` writes it, plus
    ``quantization_config``), ``generation_config.json`` where the model has
    one, and the tokenizer's files when ``tokenizer`` is given.

    The folder is built beside ``directory`` and renamed into place, so a crash
    never leaves a half-written checkpoint under that name. An existing
    ``directory`` is replaced only when it is empty or holds an earlier 4-bit
    checkpoint.

    Args:
        model: the model, typically after :func:`qpeft.quantize_model`.
        directory: the folder to write.
        tokenizer: saved with its ``save_pretrained`` when given.
        compute_dtype: ``bnb_4bit_compute_dtype`` recorded in the config: the
            dtype bitsandbytes computes in when it loads the checkpoint
            (float32, float16 or bfloat16). qpeft's loader does not use it.
        extra_files: more files to write into the folder, name -> text or bytes.

    Returns:
        the folder's path.

    Raises:
        ValueError: the model has no 4-bit layer, or ``compute_dtype`` is not
            a float type.
        FileExistsError: ``directory`` is a file, or a non-empty folder that
            is not a 4-bit checkpoint.
    """
    save_file = _safetensors().save_file
    dtype_name = _dtype_name(compute_dtype, "compute_dtype")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError(
            "the model has no 4-bit (qpeft.nn.Linear4bit) layers; quantize it first with qpeft.quantize_model(model)"
        )
    bad = [name for name in (extra_files or {}) if Path(name).name != name or name in (WEIGHTS_FILE, CONFIG_FILE)]
    if bad:
        raise ValueError(f"extra_files must be plain file names other than the checkpoint's own, got {bad}")
    out = Path(directory).expanduser()
    _check_target(out)
    quant_config = _quantization_config(model, layers, dtype_name)
    config = _config_dict(model, quant_config)
    tensors = _checkpoint_tensors(model)

    with staged_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        chmod_default(tmp / WEIGHTS_FILE, 0o666)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and hasattr(generation_config, "save_pretrained"):
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            target = tmp / name
            target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    return out


def _quantization_config(model: nn.Module, layers: list[tuple[str, Linear4bit]], compute_dtype: str) -> dict:
    """``quantization_config`` as transformers' ``BitsAndBytesConfig.to_dict()`` writes it for 4-bit."""
    quant_types = Counter(m.quant_state.quant_type for _, m in layers)
    nested = Counter(m.quant_state.nested for _, m in layers)
    if len(quant_types) > 1 or len(nested) > 1:
        # Each layer's own settings travel in its quant_state; the config names one.
        log.warning(
            "the 4-bit layers mix settings (%s; double quant %s); config.json records the most common",
            dict(quant_types), dict(nested),
        )
    dense = [name for name, m in model.named_modules() if _is_dense_linear(m)]
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_types.most_common(1)[0][0],
        "bnb_4bit_use_double_quant": nested.most_common(1)[0][0],
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        # A list (even empty) stops transformers from adding its own default
        # skips (the head, tied and last modules): exactly these stay dense.
        "llm_int8_skip_modules": dense,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def _config_dict(model: nn.Module, quant_config: dict) -> dict:
    """config.json: the transformers config as ``save_pretrained`` writes it, or only the quantization."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_diff_dict"):
        return {"quantization_config": quant_config}
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        config.dtype = str(dtype).removeprefix("torch.")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, Linear4bit) and getattr(config, "tie_word_embeddings", False):
        # A quantized head no longer shares the embeddings' weight.
        config.tie_word_embeddings = False
    # transformers' own serialization (only the values that differ from the defaults).
    d = json.loads(config.to_json_string(use_diff=True))
    d["quantization_config"] = quant_config
    return d


def _is_dense_linear(module: nn.Module) -> bool:
    return not isinstance(module, Linear4bit) and (
        isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))
    )


def _checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once, as transformers saves it.

    Names of one parameter (tied weights) keep a single entry: the tie source,
    not the target transformers re-creates by tying. Any other tensors that
    share memory are copied (safetensors refuses shared memory).
    """
    sd = model.state_dict()
    param_ids = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        param_ids[name] = id(p)
    targets = set(_tie_targets(model))
    groups: dict[tuple, list[str]] = {}
    for name, t in sd.items():
        if t.numel() == 0:
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        groups.setdefault(key, []).append(name)
    for names in groups.values():
        if len(names) > 1 and all(n in param_ids for n in names) and len({param_ids[n] for n in names}) == 1:
            keep = next((n for n in names if n not in targets), names[0])
            for n in names:
                if n != keep:
                    del sd[n]
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, t in sd.items():
        t = t.detach()
        storage = (t.device, t.untyped_storage().data_ptr())
        if t.numel() and storage in seen:
            t = t.clone()
        seen.add(storage)
        out[name] = t.contiguous().cpu()
    return out


def _tie_targets(model: nn.Module) -> list[str]:
    """State-dict names transformers re-creates by tying (so need not be saved)."""
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ()
    names = list(tied) if isinstance(tied, (dict, list, tuple, set)) else []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names += [f"{n}.weight" for n, m in model.named_modules() if head is not None and m is head]
    return names


def _is_checkpoint_dir(folder: Path) -> bool:
    """An earlier 4-bit checkpoint: a bitsandbytes config.json, a weights file, no subfolders."""
    try:
        qc = json.loads((folder / CONFIG_FILE).read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    has_weights = (folder / WEIGHTS_FILE).is_file() or (folder / _INDEX_FILE).is_file()
    return (
        isinstance(qc, dict)
        and qc.get("quant_method") == "bitsandbytes"
        and has_weights
        and not any(p.is_dir() for p in folder.iterdir())
    )


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{str(out)!r} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not _is_checkpoint_dir(out):
        raise FileExistsError(
            f"{str(out)!r} exists, is not empty and does not hold a 4-bit checkpoint; "
            "remove it or choose another folder"
        )


# ------------------------------------------------------------------- load


def load_quantized(
    path: os.PathLike | str,
    *,
    compute_dtype: Optional[torch.dtype | str] = None,
    device: torch.device | str = "cpu",
    quantize: bool = False,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> tuple[nn.Module, Any]:
    """Load a 4-bit checkpoint (qpeft's or transformers + bitsandbytes') without bitsandbytes.

    A layer is 4-bit exactly when the checkpoint has its
    ``<layer>.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``) entry;
    every other tensor is loaded as saved (dtype included). Tied weights are
    tied as the config says.

    Args:
        path: a folder with ``config.json`` and ``model.safetensors`` (or a
            sharded ``model.safetensors.index.json``); with ``quantize=True``
            also a plain (not quantized) model folder or a ``.gguf`` file.
        compute_dtype: dtype of the 4-bit matmuls; ``None`` computes in the
            input's dtype (:class:`~qpeft.nn.Linear4bit`'s default). The
            checkpoint's ``bnb_4bit_compute_dtype`` is not applied.
        device: where the model goes.
        quantize: quantize a plain model on the fly, layer by layer, with
            :func:`qpeft.quantize_model` (every linear layer but the head).
            A folder that already holds a 4-bit checkpoint is loaded as it is.
        quant_type, blocksize, double_quant: the settings for ``quantize=True``.

    Returns:
        ``(model, tokenizer)``, the model in eval mode; ``tokenizer`` is
        ``None`` when the folder has no tokenizer files.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no weights.
        ValueError: the checkpoint is not 4-bit, or a tensor is missing,
            mis-shaped or corrupt (the message names the layer).
        ImportError: transformers or safetensors is not installed.
    """
    from . import hf

    source = Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"{str(source)!r} does not exist")
    cdtype = None if compute_dtype is None else _COMPUTE_DTYPES[_dtype_name(compute_dtype, "compute_dtype")]
    is_folder = source.is_dir() and (source / CONFIG_FILE).is_file()
    config = _read_config(source) if is_folder else None
    if quantize and not (config is not None and _is_bnb_config(config)):
        return _load_and_quantize(source, config, cdtype, device, quant_type, blocksize, double_quant)
    if not is_folder:
        raise ValueError(
            f"{str(source)!r} is not a 4-bit checkpoint folder (no config.json); "
            "pass quantize=True to quantize a .gguf file or a plain model on the fly"
        )
    _check_4bit_config(config, source)
    transformers = hf._transformers()
    tensors = _read_tensors(source, torch.device(device))
    model = _build_4bit_model(transformers, source, config, tensors, cdtype, torch.device(device))
    tokenizer = None
    if hf._has_tokenizer(source):
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    return model, tokenizer


def _load_and_quantize(source, config, compute_dtype, device, quant_type, blocksize, double_quant):
    from . import hf
    from .stream_load import load_quantizing

    folder = hf.model_folder(source)
    config = config if config is not None else _read_config(folder)
    # Weights other than the 4-bit ones take the compute dtype, else the folder's
    # own float dtype (a GGUF dequantizes to float32).
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = compute_dtype or (_COMPUTE_DTYPES.get(name, torch.float32) if isinstance(name, str) else torch.float32)
    if any(folder.glob("*.safetensors")):
        model = load_quantizing(folder, dtype, compute_dtype, quant_type, blocksize, double_quant)
    else:  # e.g. a folder of pytorch_model.bin: transformers reads it (weights_only), then quantize
        model, _ = hf.load_model(folder, dtype=dtype)
        quantize_model(
            model, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype
        )
    model.to(device)
    model.eval()
    tokenizer = None
    if hf._has_tokenizer(folder):
        tokenizer = hf._transformers().AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(folder / CONFIG_FILE)!r} is not readable JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(folder / CONFIG_FILE)!r} must hold a JSON object")
    return config


def _is_bnb_config(config: dict) -> bool:
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes"


def _check_4bit_config(config: dict, folder: Path) -> None:
    qc = config.get("quantization_config")
    if not _is_bnb_config(config):
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        what = f"its quantization_config is for {method!r}" if method else "config.json has no quantization_config"
        raise ValueError(
            f"{str(folder)!r} is not a 4-bit bitsandbytes checkpoint ({what}); "
            "pass quantize=True to quantize a plain model on the fly"
        )
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise ValueError(f"{str(folder)!r} is an 8-bit (LLM.int8) checkpoint; qpeft loads 4-bit checkpoints only")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise ValueError(f"{str(folder)!r} is not a 4-bit checkpoint: its quantization_config lacks load_in_4bit")


def _read_tensors(folder: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of the (possibly sharded) safetensors checkpoint."""
    st = _safetensors()
    if (folder / WEIGHTS_FILE).is_file():
        files = [folder / WEIGHTS_FILE]
    elif (folder / _INDEX_FILE).is_file():
        try:
            weight_map = json.loads((folder / _INDEX_FILE).read_text())["weight_map"]
            files = [folder / f for f in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{str(folder / _INDEX_FILE)!r} is not a valid shard index: {e!r}") from None
    else:
        raise FileNotFoundError(
            f"{str(folder)!r} has no {WEIGHTS_FILE} (or {_INDEX_FILE}); qpeft reads safetensors checkpoints only"
        )
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"the shard {str(f)!r} named by {_INDEX_FILE} is missing")
        try:
            tensors.update(st.load_file(str(f), device=str(device)))
        except Exception as e:  # safetensors raises its own error types
            if isinstance(e, (MemoryError, KeyboardInterrupt)):
                raise
            raise ValueError(f"{str(f)!r} is not a readable safetensors file: {e}") from None
    return tensors


def _four_bit_layers(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """layer name -> its quantization tensors (keys relative to ``<layer>.weight.``), by the quant_state key."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key in tensors:
        if _QS_KEY in key:
            layers.setdefault(key.split(_QS_KEY)[0], {})
    for key, t in tensors.items():
        head, _, last = key.rpartition(".weight.")
        if head in layers:
            layers[head][key[len(head) + len(".weight."):]] = t
        elif last in _QS_TENSORS and head:
            raise ValueError(
                f"layer {head!r}: the checkpoint has its 4-bit {last!r} but no "
                f"'{head}.weight.quant_state.bitsandbytes__nf4' (or __fp4) entry; the checkpoint is incomplete"
            )
    return layers


def _layer_state(name: str, items: Mapping[str, torch.Tensor], packed: Optional[torch.Tensor]) -> QuantState:
    try:
        state = QuantState.from_dict(items, device=packed.device if packed is not None else "cpu")
    except ValueError as e:
        raise ValueError(f"layer {name!r}: {e}") from None
    if packed is None:
        raise ValueError(f"layer {name!r}: the checkpoint lacks '{name}.weight' (the packed 4-bit codes)")
    need = (math.prod(state.shape) + 1) // 2
    have = packed.numel() * packed.element_size()
    if have != need:
        raise ValueError(
            f"layer {name!r}: the packed weight has {have} bytes; shape {list(state.shape)} needs {need}"
        )
    return state


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no init); buffers stay real.

    Buffers computed at construction (rotary frequencies) are kept; every
    parameter must then come from the checkpoint.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        # An already-meta parameter is re-registered as it is, so ties survive.
        if param is not None and not param.is_meta:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _empty_model(transformers, folder: Path) -> nn.Module:
    """The transformers model of ``folder/config.json`` with meta parameters."""
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        if hasattr(config, "quantization_config"):
            # The model is built plain; transformers must not bring in bitsandbytes.
            del config.quantization_config
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch else None
        with _parameters_on_meta():
            if cls is not None and hasattr(cls, "_from_config"):
                model = cls._from_config(config)
            else:
                model = transformers.AutoModelForCausalLM.from_config(config)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - transformers and huggingface_hub raise many types for a bad config
        raise ValueError(
            f"{str(folder / CONFIG_FILE)!r} does not describe a model transformers can build "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
        ) from None
    return model


def _linear_shape(module: nn.Module) -> Optional[tuple[int, int]]:
    """``(out_features, in_features)`` of an nn.Linear or transformers Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        in_features, out_features = module.weight.shape
        return out_features, in_features
    return None


def _tie_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(target, source) parameter names the model ties: transformers' mapping plus shared parameters."""
    pairs = dict(getattr(model, "all_tied_weights_keys", None) or {})
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            pairs.setdefault(name, first[id(p)])
        else:
            first[id(p)] = name
    return list(pairs.items())


def _set_module(model: nn.Module, name: str, value: nn.Module | nn.Parameter) -> None:
    """Set the submodule or parameter ``name`` (a dotted path) to ``value``."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, value)


def _build_4bit_model(transformers, folder, config, tensors, compute_dtype, device) -> nn.Module:
    layers = _four_bit_layers(tensors)
    if not layers:
        raise ValueError(
            f"{str(folder)!r} says it is 4-bit but its weights have no "
            "'*.weight.quant_state.bitsandbytes__nf4' (or __fp4) entry"
        )
    states = {name: _layer_state(name, items, tensors.get(f"{name}.weight")) for name, items in layers.items()}

    model = _empty_model(transformers, folder)
    for name, state in states.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"layer {name!r}: the checkpoint has a 4-bit weight for it, the model has no such module"
            ) from None
        shape = _linear_shape(module)
        if shape is None:
            raise ValueError(f"layer {name!r}: is a {type(module).__name__}, not a linear layer, in the model")
        if tuple(state.shape) != shape:
            raise ValueError(
                f"layer {name!r}: the checkpoint's weight has shape {list(state.shape)}, the model's {list(shape)}"
            )
        shell = Linear4bit.empty(
            shape[1], shape[0], bias=getattr(module, "bias", None) is not None, dtype=state.dtype,
            quant_type=state.quant_type, blocksize=state.blocksize, double_quant=state.nested,
            compute_dtype=compute_dtype, device=device,
        )
        _set_module(model, name, shell)

    # Tied parameters are saved once: fill in the other names (either way round,
    # as transformers does) and re-tie after loading.
    state_dict = dict(tensors)
    ties = []
    for target, source in _tie_pairs(model):
        if isinstance(_owner(model, target), Linear4bit) or isinstance(_owner(model, source), Linear4bit):
            continue
        if target in state_dict and source not in state_dict:
            target, source = source, target
        if source in state_dict and target not in state_dict:
            state_dict[target] = state_dict[source]
            ties.append((target, source))

    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise ValueError(f"the checkpoint lacks {_describe(missing)}")
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        raise ValueError(f"the checkpoint has tensors the model does not: {_describe(unexpected)}")
    # The 4-bit tensors were checked against their quant states above.
    four_bit = {f"{n}.weight" for n in layers} | {f"{n}.weight.{k}" for n, items in layers.items() for k in items}
    for key, want in expected.items():
        got = state_dict[key]
        if key not in four_bit and tuple(got.shape) != tuple(want.shape):
            raise ValueError(
                f"{key!r}: the checkpoint's tensor has shape {list(got.shape)}, the model's {list(want.shape)}"
            )
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"the checkpoint does not fit the model: {e}") from None
    for target, source in ties:
        _set_module(model, target, model.get_parameter(source))
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ValueError(f"the checkpoint left {_describe(still_meta)} without values")
    model.to(device)
    model.eval()
    return model


def _owner(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name.rpartition(".")[0])
    except AttributeError:
        return None


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# ------------------------------------------------------------------ utils


def _dtype_name(dtype: Any, what: str) -> str:
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, (torch.dtype, str)) else None
    if name not in _COMPUTE_DTYPES:
        raise ValueError(f"{what} must be one of {', '.join(_COMPUTE_DTYPES)}, got {dtype!r}")
    return name


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("checkpoints need safetensors; install it with `pip install 'qpeft[hf]'`") from None
    return safetensors.torch
