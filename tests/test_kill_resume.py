"""A training run killed with SIGKILL and resumed ends where an uninterrupted run does (issue 6, acceptance 3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytestmark = pytest.mark.slow


def _steps(run):
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip().endswith("}")]
    return max((r["step"] for r in lines if "loss" in r), default=0)


def test_sigkill_mid_run_then_resume(tmp_path, tiny_llama_dir):
    model_dir = tiny_llama_dir
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({
        "model": str(model_dir), "max_steps": 16, "n_train": 64, "n_eval": 4, "eval_examples": 0, "batch_size": 4,
        "lora_dropout": 0.1, "lr": 1e-2, "warmup_steps": 2, "save_every": 3, "compute_dtype": "float32",
        "threads": 1}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "qpeft", "train", "--config", str(conf), "--out-dir"]

    full = subprocess.run(cmd + [str(tmp_path / "full")], capture_output=True, text=True, timeout=600, env=env)
    assert full.returncode == 0, full.stderr[-3000:]

    run = tmp_path / "killed"
    kills = 0
    for target in (5, 11):  # killed twice, each time some steps after a checkpoint
        proc = subprocess.Popen(cmd + [str(run), *(["--resume"] if kills else [])], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 300
        while _steps(run) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        assert (run / "checkpoint" / "trainer_state.json").is_file()
    resumed = subprocess.run(cmd + [str(run), "--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = safetensors_torch.load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = safetensors_torch.load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6)
    la = [json.loads(x)["loss"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 16
    assert not list(run.glob(".*tmp*")), "a temporary checkpoint folder was left behind"
