"""CPU microbenchmark of the fused 4-bit matmul for few tokens (decode): ``qpeft.functional.gemv_4bit``.

For each weight shape (out_features x in_features), input dtype, token count and
thread count it times ``y = x @ W.T`` done by

* ``qpeft``        ``qpeft.functional.gemv_4bit`` on the packed NF4 weight (blocksize 64,
                   double-quantized scales);
* ``dense f32``    ``F.linear`` with a dense float32 weight (x cast to float32);
* ``dense bf16``   ``F.linear`` with a dense bfloat16 weight (x cast to bfloat16);
* ``deq+linear``   ``F.linear(x, qpeft.dequantize_4bit(...))``, what a layer without a fused
                   kernel does;
* ``bnb matmul``   ``bitsandbytes.matmul_4bit`` under ``torch.no_grad`` on bitsandbytes' own
                   quantization of the same weight (same format);
* ``bnb gemv``     ``bitsandbytes.functional.gemv_4bit`` (1 token) on that standard layout;
* ``bnb Linear4bit`` ``bitsandbytes.nn.Linear4bit`` in eval mode under ``torch.no_grad``, which on
                   CPU repacks the weight once for bitsandbytes' own fused kernel.

Each time is the median of R runs after warm-up (``time.perf_counter``), the
implementations timed in turns (one run of each per round) so that a machine that is
busier for a while slows them alike; ratios are peer time / qpeft time (above 1: qpeft
is faster). Every implementation's output is
checked against ``F.linear`` on the dequantized weight first; one that disagrees is
reported as wrong instead of timed. Finally, the crossover: the smallest token
count at which ``gemv_4bit`` stops beating dequantize + ``F.linear`` (doubling from 16,
then bisection).

Run from the repository root, with the project's virtualenv active::

    python bench/gemv.py                   # 2048x2048, 4096x4096, 4096x11008; T=1,4,16; threads 1,2
    python bench/gemv.py --quick           # smoke run: 1024x1024, threads 1, no crossover
    python bench/gemv.py --shapes 2048x2048 --threads 2 --json /tmp/g.json

Results go to bench/results/gemv.json (``--json``).
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
import time
import warnings
from typing import Any, Callable, Optional

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qpeft  # noqa: E402
from qpeft import functional as QF  # noqa: E402

try:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import bitsandbytes as bnb  # noqa: E402
        import bitsandbytes.functional as bnbF  # noqa: E402
except ImportError:  # bitsandbytes is optional here
    bnb = bnbF = None

BLOCKSIZE = 64
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
IMPLS = ["qpeft", "dense f32", "dense bf16", "deq+linear", "bnb matmul", "bnb gemv", "bnb Linear4bit"]
DEFAULT_JSON = os.path.join("bench", "results", "gemv.json")
# Past this, a measurement stops early (a dense 4096x11008 float32 product on one core is slow).
OP_BUDGET_S = 3.0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def agrees(y: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, dtype: torch.dtype) -> bool:
    """Within the output dtype's rounding (bf16 weights: also their rounding) of the float32 reference."""
    rel = 2.0**-6 if dtype == torch.bfloat16 else 1e-3
    return bool(((y.float() - ref).abs() <= rel * ref.abs() + 1e-3 * mag + 1e-6).all())


class Case:
    """One weight shape: its dense and quantized forms in every variant the implementations need."""

    def __init__(self, n: int, k: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.n, self.k = n, k
        self.w32 = torch.randn((n, k), generator=g) * 0.02
        self.wbf16 = self.w32.bfloat16()
        self.q, self.state = {}, {}
        self.bnb_q, self.bnb_state, self.bnb_linear = {}, {}, {}
        for name, dtype in DTYPES.items():
            # The state records the dtype dequantize_4bit returns.
            self.q[name], self.state[name] = qpeft.quantize_4bit(
                self.w32.to(dtype), blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"
            )
            if bnb is not None:
                self.bnb_q[name], self.bnb_state[name] = bnbF.quantize_4bit(
                    self.w32.to(dtype), blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"
                )
                self.bnb_linear[name] = self._bnb_linear(dtype)
        # What each 4-bit weight is, in float32 (the reference for the 4-bit implementations).
        self.wq = {
            name: qpeft.dequantize_4bit(self.q[name], qpeft.QuantState(**{**vars(self.state[name]), "dtype": torch.float32}))
            for name in DTYPES
        }

    def _bnb_linear(self, dtype):
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                lin = bnb.nn.Linear4bit(
                    self.k, self.n, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4"
                )
                lin.weight = bnb.nn.Params4bit(
                    self.w32.to(dtype).clone(), requires_grad=False, compress_statistics=True,
                    quant_type="nf4", blocksize=BLOCKSIZE,
                )
                lin = lin.to("cpu").eval()
                with torch.no_grad():
                    lin(torch.zeros(1, self.k, dtype=dtype))  # first call repacks the weight for CPU
            return lin
        except Exception as e:  # noqa: BLE001 - report, do not crash the benchmark
            return f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''}"

    def impls(self, dtype_name: str, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
        q, state = self.q[dtype_name], self.state[dtype_name]
        fns = {
            "qpeft": lambda: QF.gemv_4bit(x, q, state),
            "dense f32": lambda: F.linear(x.float(), self.w32),
            "dense bf16": lambda: F.linear(x.bfloat16(), self.wbf16),
            "deq+linear": lambda: F.linear(x, qpeft.dequantize_4bit(q, state)),
        }
        if bnb is not None:
            bq, bs = self.bnb_q[dtype_name], self.bnb_state[dtype_name]

            def bnb_matmul():
                with torch.no_grad():
                    return bnb.matmul_4bit(x, bq.t(), quant_state=bs)

            fns["bnb matmul"] = bnb_matmul
            if x.shape[0] == 1:
                fns["bnb gemv"] = lambda: bnbF.gemv_4bit(x, bq.t(), state=bs)
            lin = self.bnb_linear[dtype_name]
            if not isinstance(lin, str):

                def bnb_linear():
                    with torch.no_grad():
                        return lin(x)

                fns["bnb Linear4bit"] = bnb_linear
        return fns


def check(fn: Callable[[], torch.Tensor], ref: torch.Tensor, mag: torch.Tensor, dtype) -> Optional[str]:
    """None if fn's output matches the reference, else why not."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            y = fn()
    except Exception as e:  # noqa: BLE001
        return f"n/a: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:60]}"
    if y.shape != ref.shape:
        return f"wrong shape {tuple(y.shape)}"
    if not agrees(y, ref, mag, dtype):
        err = (y.float() - ref).abs().max().item()
        return f"wrong result (max |err| {err:.3g} vs max |y| {ref.abs().max().item():.3g})"
    return None


def run_point(case: Case, dtype_name: str, tokens: int, threads: int, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn((tokens, case.k), generator=g).to(dtype)
    ref = F.linear(x.float(), case.wq[dtype_name])
    mag = F.linear(x.float().abs(), case.wq[dtype_name].abs())
    fns = case.impls(dtype_name, x)
    res: dict[str, Any] = {}
    timed: dict[str, Callable[[], Any]] = {}
    for name in IMPLS:
        fn = fns.get(name)
        if fn is None:
            why = "n/a"
            if bnb is None and name.startswith("bnb"):
                why = "n/a: bitsandbytes not installed"
            elif name == "bnb gemv":
                why = "n/a: 1 token only"
            elif name == "bnb Linear4bit" and bnb is not None:
                why = case.bnb_linear[dtype_name]
            res[name] = {"ms": None, "note": why}
            continue
        # Dense products are not the 4-bit weight: check those against the dense weight.
        if name.startswith("dense"):
            w = case.w32 if name == "dense f32" else case.wbf16.float()
            problem = check(fn, F.linear(x.float(), w), F.linear(x.float().abs(), w.abs()), dtype)
        else:
            problem = check(fn, ref, mag, dtype)
        if problem:
            if name == "bnb gemv" and problem.startswith("wrong"):
                problem += "; bitsandbytes' CPU gemv_4bit expects the weight repacked as Linear4bit.eval() does"
            res[name] = {"ms": None, "note": problem}
            continue
        timed[name] = fn
    for name, ms in interleaved_ms(timed, repeats).items():
        res[name] = {"ms": ms, "note": ""}
    return res


def interleaved_ms(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median ms of each function, timed in turns (one run of each per round) so that a
    machine that is busier for a while slows every implementation alike."""
    for fn in fns.values():
        for _ in range(2):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        if r >= 4 and time.perf_counter() - start > OP_BUDGET_S * len(fns):
            break
    return {name: 1e3 * statistics.median(v) for name, v in samples.items()}


def crossover(case: Case, dtype_name: str, threads: int, repeats: int, limit: int = 1024) -> dict[str, Any]:
    """Smallest token count where gemv_4bit is no faster than dequantize + F.linear."""
    torch.set_num_threads(threads)
    dtype = DTYPES[dtype_name]
    q, state = case.q[dtype_name], case.state[dtype_name]
    seen: dict[int, tuple[float, float]] = {}

    def loses(t: int) -> bool:
        x = torch.randn(t, case.k).to(dtype)
        ms = interleaved_ms(
            {"ours": lambda: QF.gemv_4bit(x, q, state), "theirs": lambda: F.linear(x, qpeft.dequantize_4bit(q, state))},
            repeats,
        )
        seen[t] = (ms["ours"], ms["theirs"])
        return ms["ours"] >= ms["theirs"]

    if loses(1):
        return {"tokens": 1, "measured": seen}
    lo, hi = 1, 16
    while not loses(hi):
        lo, hi = hi, hi * 2
        if hi > limit:
            return {"tokens": None, "note": f"> {limit}", "measured": seen}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if loses(mid):
            hi = mid
        else:
            lo = mid
    return {"tokens": hi, "measured": seen}


def fmt_ms(v: Optional[float]) -> str:
    return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def print_table(shape: str, threads: int, points: list[dict[str, Any]]) -> list[str]:
    print(f"== {shape}  threads={threads}  (median ms; in brackets: that time / qpeft's) ==")
    head = f"  {'dtype':<9} {'T':>3} " + " ".join(f"{name:>19}" for name in IMPLS)
    print(head)
    notes: list[str] = []
    for p in points:
        base = p["results"]["qpeft"]["ms"]
        cells = []
        for name in IMPLS:
            r = p["results"][name]
            if r["ms"] is None:
                if r["note"] not in notes:
                    notes.append(r["note"])
                cells.append(f"[{notes.index(r['note']) + 1}]")
            elif name == "qpeft" or base is None:
                cells.append(fmt_ms(r["ms"]))
            else:
                cells.append(f"{fmt_ms(r['ms'])} ({r['ms'] / base:.2f}x)")
        print(f"  {p['dtype']:<9} {p['tokens']:>3} " + " ".join(f"{c:>19}" for c in cells))
    for i, n in enumerate(notes, 1):
        print(f"  [{i}] {n}")
    print()
    return notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="2048x2048,4096x4096,4096x11008", help="out x in features, comma-separated")
    ap.add_argument("--tokens", default="1,4,16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--crossover-threads", default="2", help="thread counts to find the crossover at ('' for none)")
    ap.add_argument("--quick", action="store_true", help="1024x1024, threads 1, 5 repeats, no crossover")
    ap.add_argument("--json", default=DEFAULT_JSON)
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.threads, args.repeats, args.crossover_threads = "1024x1024", "1", 5, ""
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    dtypes = args.dtypes.split(",")
    cross_threads = [int(t) for t in args.crossover_threads.split(",") if t]

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "bitsandbytes": getattr(bnb, "__version__", None),
        "qpeft": qpeft.__version__,
        "qpeft_cpu_isa": qpeft.cpu_isa(),
    }
    print(f"machine: {info['cpu']} ({info['cores']} logical cores); torch {info['torch']}; "
          f"bitsandbytes {info['bitsandbytes']}; qpeft {info['qpeft']} (cpu_isa={info['qpeft_cpu_isa']})")
    print(f"weights: NF4, blocksize {BLOCKSIZE}, double-quantized scales; x: tokens x in_features\n")
    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    crossovers: list[dict[str, Any]] = []
    for n, k in shapes:
        case = Case(n, k)
        shape = f"{n}x{k}"
        for th in threads:
            points = []
            for dt in dtypes:
                for t in tokens:
                    points.append({"dtype": dt, "tokens": t, "results": run_point(case, dt, t, th, args.repeats)})
            print_table(shape, th, points)
            results.append({"shape": [n, k], "threads": th, "points": points})
        for th in cross_threads:
            for dt in dtypes:
                c = crossover(case, dt, th, max(9, args.repeats // 2))
                c.update(shape=[n, k], threads=th, dtype=dt)
                crossovers.append(c)
                where = c["tokens"] if c["tokens"] is not None else c.get("note")
                trail = ", ".join(f"T={t}: {a:.3f} vs {b:.3f}" for t, (a, b) in sorted(c["measured"].items()))
                print(f"crossover {shape} {dt} threads={th}: gemv_4bit stops beating dequantize+F.linear "
                      f"at T = {where} tokens  (ms gemv vs deq+linear: {trail})")
        if cross_threads:
            print()
        del case
        gc.collect()
    elapsed = time.perf_counter() - t_start
    print(f"elapsed {elapsed:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": info, "settings": vars(args), "results": results, "crossovers": crossovers,
                       "elapsed_s": elapsed}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
