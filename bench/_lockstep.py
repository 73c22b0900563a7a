"""Lock-step scheduling for benchmarks whose contenders run in separate processes.

Each contender gets its own process (so its peak memory is its own), but a
shared machine's slow and quiet moments would land on whichever process
happened to run then. In lock step every process loads first, then the driver
hands out turns one step at a time, rotating who goes first, so that every
contender meets the same share of them; steps never overlap.

Protocol: a worker writes ``ready`` once loaded, then for each step waits for
``go`` on stdin and writes ``done`` after it, one line each, on its original
stdout (anything else it prints goes to stderr).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable

__all__ = ["Turns", "lockstep"]


class Turns:
    """A worker's side of the lock step. Without a driver (``enabled=False``)
    every method is a no-op, so the same worker code runs stand-alone."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:
            # The protocol keeps the real stdout; anything the libraries print
            # (TRL prints its logs) goes to stderr instead.
            self.channel = os.fdopen(os.dup(1), "w")
            sys.stdout.flush()
            os.dup2(2, 1)

    def ready(self) -> None:
        self._say("ready")

    def wait(self) -> None:
        if self.enabled and sys.stdin.readline().strip() != "go":
            raise SystemExit("bench driver went away")

    def done(self) -> None:
        self._say("done")

    def _say(self, word: str) -> None:
        if self.enabled:
            self.channel.write(word + "\n")
            self.channel.flush()


def lockstep(names: list[str], command: Callable[[str], list[str]], steps: int, env: dict) -> list[str]:
    """Start ``command(name)`` for every name, then hand out ``steps`` turns to
    each; returns the names whose process finished every turn and exited 0."""
    print(f"{', '.join(names)}: loading, then {steps} steps each in turn ...", flush=True)
    procs = {n: subprocess.Popen(command(n), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for n in names}
    alive = [n for n in names if procs[n].stdout.readline().strip() == "ready"]
    for i in range(steps):
        # Rotate who goes first, so that no contender always follows the same one.
        for name in (alive[i % len(alive):] + alive[:i % len(alive)]) if alive else []:
            p = procs[name]
            try:
                p.stdin.write("go\n")
                p.stdin.flush()
                ok = p.stdout.readline().strip() == "done"
            except BrokenPipeError:
                ok = False
            if not ok:
                alive.remove(name)
    finished = []
    for name, p in procs.items():
        try:
            p.stdin.close()
        except BrokenPipeError:
            pass
        code = p.wait()
        if code != 0 or name not in alive:
            print(f"{name}: failed with exit code {code}", flush=True)
        else:
            finished.append(name)
    return finished
