"""Giving freed heap memory back to the operating system during training.

PyTorch's CPU tensors come from the C library's ``malloc``. In a training
step the long-lived objects autograd creates (graph nodes, small saved
tensors) land between the short-lived activation buffers of each layer, so
the holes those buffers leave are split and never reused whole: measured on
SmolLM2-135M, the heap grew by as much free space as live data during a
forward pass (about 6.6 MB per decoder layer). glibc's ``malloc_trim(0)``
returns the free pages of every hole to the kernel (the address space stays),
which keeps the resident memory near what is really in use. Elsewhere (no
glibc) these calls do nothing.
"""

from __future__ import annotations

import os
from typing import Any, Optional

__all__ = ["MMAP_THRESHOLD", "TrimOnGrowth", "keep_freed_memory", "release_free_memory", "statm_resident_bytes"]

_libc_fn: dict = {}
_tuned: Optional[bool] = None

# glibc's mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Bytes from which glibc maps each allocation separately (and unmaps it when
#: freed) once :func:`keep_freed_memory` has run; smaller blocks are recycled
#: from the heap.
MMAP_THRESHOLD = 64 << 20


def _glibc(name: str) -> Any:
    """glibc's function ``name`` (looked up once), or None without glibc."""
    if name not in _libc_fn:
        try:
            import ctypes

            _libc_fn[name] = getattr(ctypes.CDLL("libc.so.6"), name)
        except (OSError, AttributeError):
            _libc_fn[name] = None
    return _libc_fn[name]


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``); a no-op elsewhere.

    Costs roughly 10 ms per call on a 1 GB heap (and the page faults of
    touching the returned pages again). On the memory-lean fast path the
    trainer calls it every few decoder layers and after every step; where a
    step keeps its memory for speed, only after a step that grew the process
    (:class:`TrimOnGrowth`; see ``trainer.heap_trim_after_step``).
    """
    malloc_trim = _glibc("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def statm_resident_bytes() -> Optional[int]:
    """Resident memory of this process now, from ``/proc/self/statm`` (None where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class TrimOnGrowth:
    """Hands freed heap back to the OS after a training step, but only when the process has grown.

    Trimming after every step keeps resident memory at what is live, and the
    next step faults every returned page back in: on SmolLM2 in float32
    (4 x 256 tokens, 2-core Zen 4) 470 thousand page faults and 12% of the
    step (4.9-5.0 s against 4.3 s). With batches of one shape the freed
    blocks serve the next step whole and the footprint stays put; batches of
    ever new lengths fragment the heap and the footprint creeps (2.1 to
    2.9 GB over the default run without trims). So the first call trims (what
    loading left behind), the next one takes the resident size as the
    reference, and a later call trims only when the process has grown past
    that reference by ``slack_fraction`` of it (at least ``min_slack`` bytes);
    the call after a trim takes a new reference. Where resident memory cannot
    be read every call trims. Call it once per step; returns whether it trimmed.
    """

    def __init__(self, slack_fraction: float = 1 / 16, min_slack: int = 64 << 20) -> None:
        if not slack_fraction >= 0 or min_slack < 0:
            raise ValueError(f"slack_fraction ({slack_fraction}) and min_slack ({min_slack}) must be >= 0")
        self.slack_fraction = slack_fraction
        self.min_slack = min_slack
        self._reference: Optional[int] = None
        self._trim_next = True

    def __call__(self) -> bool:
        rss = statm_resident_bytes()
        if rss is None or self._trim_next:
            release_free_memory()
            self._trim_next = False
            self._reference = None
            return True
        if self._reference is None:
            self._reference = rss
            return False
        if rss > self._reference + max(self.min_slack, self._reference * self.slack_fraction):
            release_free_memory()
            self._reference = None
            return True
        return False


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse until :func:`release_free_memory` returns it.

    By default glibc gives memory back by itself: blocks of 32 MB and more are
    mapped and unmapped per allocation, and the top of the heap is trimmed
    whenever enough of it is free. A training step frees and reallocates
    hundreds of megabytes of activations, so each of those returns costs
    page faults when the memory is touched again (on SmolLM2, 4 x 256 tokens,
    without the fast path's own trims: 35-50 thousand per step, against about
    1,300 with this). With the mapping threshold at 64 MiB and no automatic
    trimming, freed blocks wait in the heap for the next step's tensors of
    the same sizes, and the trainer's explicit trims (every few layers when
    memory-lean, after every step) decide when pages go back. Process-wide;
    once per process; returns whether the C library took it (glibc only).
    """
    global _tuned
    if _tuned is None:
        mallopt = _glibc("mallopt")
        _tuned = mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _tuned
