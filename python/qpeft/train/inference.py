"""Using a trained adapter: load base model + adapter as training had them, generate, evaluate.

The trainer writes ``qpeft.json`` beside the PEFT files of an adapter it saves
(base model, method, compute dtype, template); PEFT ignores the file, and
here it supplies the defaults, so ``qpeft generate --adapter runs/default/adapter``
rebuilds the same 4-bit base and prompt format the adapter was trained with.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from .. import data as D
from .config import FOUR_BIT_METHODS

__all__ = ["INFO_FILE", "write_adapter_info", "load_adapter_model", "generate_text", "evaluate_file", "print_eval"]

#: File with the training settings an adapter needs to be used as trained.
INFO_FILE = "qpeft.json"


def write_adapter_info(folder: Path, model: Optional[str], method: str, compute_dtype: str, template: str) -> None:
    info = {"model": model, "method": method, "compute_dtype": compute_dtype, "template": template}
    (Path(folder) / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _info(adapter: Path) -> dict[str, Any]:
    path = adapter / INFO_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e}); delete it and pass --model/--method/--template") from None
    return info if isinstance(info, dict) else {}


def load_adapter_model(adapter: Optional[str] = None, model: Optional[str] = None, method: Optional[str] = None,
                       compute_dtype: Optional[str] = None) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, settings)``: the base model (4-bit for QLoRA and prompt adapters) with the adapter
    loaded for inference; without ``adapter``, the base model alone. Arguments override ``qpeft.json``."""
    from .. import hf
    from ..nn import quantize_model
    from ..tuners import PeftModel
    from .trainer import resolve_compute_dtype

    info: dict[str, Any] = {}
    if adapter is not None:
        folder = Path(adapter)
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{folder} is not an adapter folder (no adapter_config.json)")
        info = _info(folder)
    settings = {
        "model": model if model is not None else info.get("model"),
        "method": method or info.get("method", "qlora"),
        "compute_dtype": compute_dtype or info.get("compute_dtype", "auto"),
        "template": info.get("template", "course"),
    }
    dtype = resolve_compute_dtype(settings["compute_dtype"])
    base, tok = hf.load_model(settings["model"], dtype=dtype)
    if tok is None:
        raise ValueError("the model folder has no tokenizer; use a folder saved with its tokenizer")
    if settings["method"] in FOUR_BIT_METHODS:
        base = quantize_model(base, compute_dtype=dtype)
    net = PeftModel.from_pretrained(base, adapter) if adapter is not None else base
    net.eval()
    return net, tok, settings


def generate_text(model: Any, tokenizer: Any, instruction: str, input: str = "", template: str = "course",
                  max_new_tokens: int = 128, stream: bool = True, raw: bool = False) -> str:
    """Greedy answer to one instruction, rendered with ``template`` (or as is with ``raw``)."""
    if raw:
        prompt = instruction
    else:
        prompt = D.prompt_text(D.Example.from_instruction(instruction, "", input), template, tokenizer)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=template != "chat" or raw)
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    pad = D.pad_token_id(tokenizer)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate_file(model: Any, tokenizer: Any, path: str, template: str, limit: Optional[int] = None,
                  max_new_tokens: int = 40, max_length: int = 256, skip_bad: bool = False) -> dict[str, Any]:
    """Exact-match accuracy and target-token loss of ``model`` on a data file."""
    from .evaluate import exact_match_accuracy, mean_loss

    records = D.read_records(path, skip_bad=skip_bad, limit=limit)
    examples = [e for e in records if e.kind != "text"]
    if not examples:
        raise ValueError(f"{path} has no examples with an answer to check")
    encoded = D.encode_all(examples, tokenizer, template, max_length).examples
    pad = D.pad_token_id(tokenizer)
    result = exact_match_accuracy(model, tokenizer, examples, template, max_new_tokens)
    result["loss"] = mean_loss(model, encoded, pad)
    result["skipped"] = records.skipped
    return result


def print_eval(result: dict[str, Any], file=None) -> None:
    """One line: exact match and loss."""
    print(f"exact match {result['correct']}/{result['total']} = {100 * result['accuracy']:.1f}%, "
          f"loss {result['loss']:.4f}", file=file or sys.stdout)
