"""Fault injection (issue 9): a training run killed with SIGKILL at 10 random points, several of them in
the middle of writing a checkpoint (the QPEFT_TEST_CRASH_AT hook of qpeft._files), and resumed each time
ends with the same adapter and loss history as an uninterrupted run; a checkpoint write that hits a full
disk keeps the previous checkpoint and says what happened."""

from __future__ import annotations

import hashlib
import os
import random
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _runs import assert_same_result, steps_done, train_command, train_env, write_config

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytestmark = pytest.mark.slow

# Long enough that nine kills, each letting the run go on for a few steps (a timed kill waits up to
# 0.4 s past its step, several steps of the tiny model), leave checkpoint writes for the hooks to hit.
STEPS = 60
# Every place a checkpoint write can be cut short: between its files, after all of them but before
# the swap, and between the swap's two renames.
CHECKPOINT_POINTS = ["checkpoint:weights", "checkpoint:state", "checkpoint:written", "checkpoint:swapping"]
SETTINGS = dict(max_steps=STEPS, n_train=48, n_eval=4, eval_examples=0, batch_size=2, max_length=48,
                lora_r=4, lora_alpha=8, lora_dropout=0.1, lr=1e-2, warmup_steps=2, save_every=2)


def plan_faults(rng: random.Random) -> list[tuple]:
    """Nine faults during training (five mid-checkpoint, four at random moments, some during start-up)
    in random order, then one while the final adapter is written."""
    hooks = [("hook", rng.choice(CHECKPOINT_POINTS), rng.randint(1, 2)) for _ in range(5)]
    timed = [("time", rng.randint(0, 3), rng.uniform(0.0, 0.4)) for _ in range(4)]
    faults = hooks + timed
    rng.shuffle(faults)
    # The first adapter is renamed into an empty place: there is no swap to cut in two.
    return faults + [("hook", "adapter:written", 1)]


def checkpoint_step(run: Path) -> int:
    import json

    for folder in [run / "checkpoint", *sorted(run.glob(".checkpoint.old-*"))]:
        if (folder / "trainer_state.json").is_file():
            return json.loads((folder / "trainer_state.json").read_text())["step"]
    return 0


def assert_recoverable(run: Path, ever_saved: bool) -> None:
    """After a kill, a complete checkpoint is either in place or set aside for the next start to restore."""
    candidates = [run / "checkpoint", *run.glob(".checkpoint.old-*")]
    complete = [c for c in candidates
                if all((c / f).is_file() for f in ("trainable.safetensors", "state.pt", "trainer_state.json"))]
    if ever_saved:
        assert complete, f"no complete checkpoint left in {sorted(p.name for p in run.iterdir())}"
    if (run / "checkpoint").exists():
        assert run / "checkpoint" in complete, "a half-written checkpoint took the checkpoint's place"


def test_sigkill_at_ten_random_points_then_resume(tmp_path, tiny_llama_dir):
    seed = int(os.environ.get("QPEFT_FAULT_SEED", "20261126"))
    rng = random.Random(seed)
    conf = write_config(tmp_path / "c.json", tiny_llama_dir, **SETTINGS)
    # The uninterrupted run goes alongside on the other core.
    full = subprocess.Popen(train_command(conf, tmp_path / "full"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=train_env())

    run = tmp_path / "faulted"
    survived = []
    for i, fault in enumerate(plan_faults(rng)):
        cmd = train_command(conf, run, resume=i > 0)
        if fault[0] == "hook":
            _, point, nth = fault
            # The nth write from here on must exist: a run resumed near its end has fewer left.
            nth = max(1, min(nth, (STEPS - checkpoint_step(run)) // SETTINGS["save_every"]))
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                  env=train_env(QPEFT_TEST_CRASH_AT=f"{point}:{nth}"))
            assert proc.returncode == -signal.SIGKILL, (fault, proc.returncode, proc.stderr[-3000:])
        else:
            _, ahead, delay = fault
            target = checkpoint_step(run) + ahead
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=train_env())
            started = time.monotonic()
            while proc.poll() is None and time.monotonic() - started < 300:
                # ahead == 0: somewhere in start-up (imports, model load, resume) or the first step.
                if (steps_done(run) >= target) if ahead else (time.monotonic() - started > 1 + 8 * delay):
                    break
                time.sleep(0.02)
            time.sleep(delay)
            assert proc.poll() is None, f"the run ended before fault {fault} could be injected"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        survived.append(fault)
        assert_recoverable(run, ever_saved=checkpoint_step(run) > 0 or any(run.glob(".checkpoint.old-*")))
    resumed = subprocess.run(train_command(conf, run, resume=True), capture_output=True, text=True, timeout=600,
                             env=train_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    print(f"\nfault injections survived: {len(survived)} (seed {seed}): {survived}")
    assert len(survived) == 10
    _, err = full.communicate(timeout=600)
    assert full.returncode == 0, err[-3000:]
    assert_same_result(tmp_path / "full", run, STEPS)
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary folders left behind: {leftovers}"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_full_disk_keeps_previous_checkpoint(tmp_path, tiny_llama_dir):
    from qpeft.train.trainer import read_checkpoint

    conf = write_config(tmp_path / "c.json", tiny_llama_dir, **{**SETTINGS, "max_steps": 4, "lora_dropout": 0.0})
    run = tmp_path / "run"
    first = subprocess.run(train_command(conf, run), capture_output=True, text=True, timeout=600, env=train_env())
    assert first.returncode == 0, first.stderr[-3000:]
    before = _digest(run / "checkpoint")
    limit = (run / "checkpoint" / "state.pt").stat().st_size - 1
    assert limit > 20_000, "the checkpoint is too small to leave room for the run's other files"

    def small_disk():
        # The file size limit stands in for a full disk: a write past it fails with EFBIG
        # (Python ignores SIGXFSZ, which would otherwise kill the process).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    more = subprocess.run(train_command(conf, run, resume=True) + ["--max-steps", "8"], capture_output=True,
                          text=True, timeout=600, env=train_env(), preexec_fn=small_disk)
    assert more.returncode == 1, more.stderr[-3000:]
    message = more.stderr.strip().splitlines()[-1]
    for part in ("could not write", str(run / "checkpoint"), "File too large", "free on that file system",
                 "previous 'checkpoint' is unchanged", "make room"):
        assert part in message, (part, message)
    assert _digest(run / "checkpoint") == before
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "a temporary folder was left behind"
    info, weights, _ = read_checkpoint(run / "checkpoint")
    assert info["step"] == 4 and weights
