"""Helpers for tests that run `qpeft train` in a subprocess, kill it, and compare its results."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

__all__ = ["assert_same_result", "steps_done", "train_command", "train_env", "write_config"]


def steps_done(run: Path) -> int:
    """The last training step metrics.jsonl records (0 before the first); a half-written line is ignored."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip().endswith("}")]
    return max((r["step"] for r in lines if "loss" in r), default=0)


def write_config(path: Path, model_dir: Path, **settings) -> Path:
    """A TrainConfig JSON for a short float32 single-thread run of ``model_dir``."""
    conf = {"model": str(model_dir), "compute_dtype": "float32", "threads": 1, **settings}
    path.write_text(json.dumps(conf))
    return path


def train_command(conf: Path, out: Path, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "qpeft", "train", "--config", str(conf), "--out-dir", str(out),
            *(["--resume"] if resume else [])]


def train_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def assert_same_result(expected: Path, got: Path, steps: int) -> None:
    """Same final adapter tensors and the same loss at every step."""
    from safetensors.torch import load_file

    a = load_file(str(expected / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(got / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6)
    la = [json.loads(x)["loss"] for x in (expected / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (got / "metrics.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == steps
