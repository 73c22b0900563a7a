"""Soak test (issue 9): 2,000 QLoRA steps of a very tiny model through SFTTrainer, with evaluation and
checkpoints every few hundred steps, in a subprocess of its own: resident memory does not grow after
warm-up (the slope is printed, in MB per 1000 steps), open file descriptors do not grow, and no file is
left behind in the output folder or the temporary folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytestmark = pytest.mark.slow

STEPS = 2000
WARMUP = 300
# A leak of one small tensor per step (a few KB) would show as several MB per 1000 steps; the steady
# process wobbles by well under 1 MB over the run (allocator and page-cache noise).
MAX_SLOPE_MB_PER_1000 = 1.0

DRIVER = r"""
import json, os, random, sys
import torch, transformers
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from qpeft.train import SFTTrainer, TrainConfig
from qpeft.train.trainer import resident_bytes

out, data = sys.argv[1], sys.argv[2]
# A byte-level tokenizer: 256 byte tokens and <eos>, so the model's vocabulary is tiny.
alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
vocab = {ch: i for i, ch in enumerate(alphabet)}
vocab["<eos>"] = len(vocab)
tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tk.decoder = decoders.ByteLevel()
tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")
torch.manual_seed(0)
cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=32)
model = transformers.LlamaForCausalLM(cfg)
config = TrainConfig(method="qlora", data=[data + "/train.jsonl"], eval_data=data + "/eval.jsonl",
                     max_steps=int(sys.argv[3]), batch_size=4, max_length=16, lora_r=4, lora_alpha=8, lr=3e-3,
                     warmup_steps=20, eval_every=250, eval_examples=4, max_new_tokens=4, save_every=100,
                     compute_dtype="float32", threads=1, out_dir=out)
samples = []
def progress(r):
    samples.append((r["step"], resident_bytes(), len(os.listdir("/proc/self/fd"))))
trainer = SFTTrainer(config, model=model, tokenizer=tok, progress=progress)
trainer.train()
def size(x):
    if isinstance(x, dict):
        return sys.getsizeof(x) + sum(size(k) + size(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return sys.getsizeof(x) + sum(size(v) for v in x)
    return sys.getsizeof(x)
# What the run keeps by design, one record per step: the trainer's metrics history and these samples.
kept = (size(trainer.history) + size(samples)) / len(samples)
print(json.dumps({"samples": samples, "kept_bytes_per_step": kept}))
"""


def _line_fit_slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def test_two_thousand_steps_leak_nothing(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(10) for b in range(10)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:90]))
    (data / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[90:]))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(out), str(data), str(STEPS)], capture_output=True,
                          text=True, timeout=900, env=env)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    samples = result["samples"]
    kept = result["kept_bytes_per_step"] * 1000 / 2**20
    assert [s[0] for s in samples] == list(range(1, STEPS + 1))

    steady = [s for s in samples if s[0] > WARMUP]
    slope = _line_fit_slope([s[0] for s in steady], [s[1] for s in steady]) * 1000 / 2**20
    rss_first, rss_last = steady[0][1] / 2**20, steady[-1][1] / 2**20
    fds = [s[2] for s in steady]
    print(f"\nsoak: {STEPS} steps in {elapsed:.0f} s; resident memory after step {WARMUP}: {rss_first:.1f} MB -> "
          f"{rss_last:.1f} MB, slope {slope:+.3f} MB per 1000 steps, of which {kept:.3f} MB is the per-step "
          f"metrics the run keeps by design; open fds {min(fds)}..{max(fds)}")
    assert slope - kept < MAX_SLOPE_MB_PER_1000, f"resident memory grows by {slope:.2f} MB per 1000 steps"
    assert max(fds) <= fds[0], f"open file descriptors grew from {fds[0]} to {max(fds)}"

    # torch makes its compile-cache folder (torchinductor_<user>) there on import; it is torch's, and empty.
    left = [p for p in tmp.iterdir() if not (p.name.startswith("torchinductor_") and not any(p.rglob("*")))]
    assert not left, f"left in the temporary folder: {sorted(p.name for p in left)}"
    kept = sorted(p.name for p in out.iterdir())
    assert kept == ["adapter", "checkpoint", "config.json", "loss.png", "metrics.jsonl", "summary.json"], kept
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval" in m]
    assert len([m for m in metrics if "loss" in m]) == STEPS and len(evals) == 2 + (STEPS - 1) // 250
