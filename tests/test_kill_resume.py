"""A training run killed with SIGKILL and resumed ends where an uninterrupted run does (issue 6, acceptance 3)."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from _runs import assert_same_result, steps_done, train_command, train_env, write_config

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytestmark = pytest.mark.slow


def test_sigkill_mid_run_then_resume(tmp_path, tiny_llama_dir):
    model_dir = tiny_llama_dir
    conf = write_config(tmp_path / "c.json", model_dir, max_steps=16, n_train=64, n_eval=4, eval_examples=0,
                        batch_size=4, lora_dropout=0.1, lr=1e-2, warmup_steps=2, save_every=3)
    env = train_env()

    full = subprocess.run(train_command(conf, tmp_path / "full"), capture_output=True, text=True, timeout=600, env=env)
    assert full.returncode == 0, full.stderr[-3000:]

    run = tmp_path / "killed"
    kills = 0
    for target in (5, 11):  # killed twice, each time some steps after a checkpoint
        proc = subprocess.Popen(train_command(conf, run, resume=bool(kills)), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 300
        while steps_done(run) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        assert (run / "checkpoint" / "trainer_state.json").is_file()
    resumed = subprocess.run(train_command(conf, run, resume=True), capture_output=True, text=True, timeout=600,
                             env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert_same_result(tmp_path / "full", run, 16)
    assert not list(run.glob(".*tmp*")), "a temporary checkpoint folder was left behind"
