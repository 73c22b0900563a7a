"""Per-thread scratch tensors that live from call to call.

A fresh multi-megabyte CPU tensor is not free even when the allocator has
the room: the trainer hands free heap pages back to the OS every few layers
(to keep its resident size down), so every page of a new temporary is
faulted in and zeroed by the kernel again. A SmolLM2 step on the fast path
took about 190,000 such faults, half of them in four temporaries of the
feed-forward block and the adapter matmuls. Temporaries whose life ends
inside one function can instead use a buffer kept here, whose pages stay
resident.

Each use site takes its own ``key``; a buffer is valid until the same
thread asks for the same key again, so a caller must not return it or keep
it past its own call. Off the CPU this hands out fresh tensors (the CUDA
caching allocator already reuses memory).
"""

from __future__ import annotations

import threading
from typing import Hashable

import torch

__all__ = ["scratch"]

_local = threading.local()


def scratch(key: Hashable, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized contiguous tensor of ``shape``: this thread's buffer ``key`` on the CPU
    (grown when too small, never shrunk), a fresh tensor elsewhere."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    numel = 1
    for n in shape:
        numel *= n
    buf = bufs.get(key)
    # A buffer that an in-place copy under autograd tied into a graph belongs to that graph now.
    if buf is None or buf.dtype != dtype or buf.numel() < numel or buf.requires_grad:
        bufs[key] = None  # let the old one go before the new one exists
        buf = bufs[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)
