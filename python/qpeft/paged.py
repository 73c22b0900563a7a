"""Paged AdamW and AdamW8bit: optimizer state under a resident-memory budget.

:class:`PagedAdamW` and :class:`PagedAdamW8bit` compute exactly what
:class:`qpeft.optim.AdamW` and :class:`qpeft.optim.AdamW8bit` compute (the
same native kernels, bit for bit), but keep the moments in a native page
store (rust/src/pages.rs): fixed-size pages, at most ``max_resident_bytes``
of them in memory, the rest in a file (``backing="file"``, the default, in
``state_dir`` or the system's temporary directory) or in host memory
(``backing="host"``), least recently used out first. A step walks the
parameters in order and a background thread reads the next pages while the
current ones update. Small parameters share pages.

With ``backing="host"`` on a CPU the frames and the backing are the same
host memory, so a page in or out moves the page's buffer between them
instead of copying it (which costs next to nothing, so that walk brings
its pages in itself, without the background thread): the walk, the
least-recently-used order and the ``page_ins``/``page_outs`` counts are
those of the file backing, the frames
still hold at most ``max_resident_bytes`` of pages, and the process holds
each page once (the whole state, as host backing always does; never the
state plus the budget). The budget bounds the process's memory only with
``backing="file"``; with ``"host"`` it bounds the pages that are held out
for the update (the part that will live on the device once CUDA paging
lands, where pages are copied).

What a failure leaves behind:

* The file's space is allocated when a parameter first gets state (its
  first step, or ``load_state_dict``), before any weight of that step
  changes: a full disk or a file-size limit raises ``OSError`` and leaves
  weights, state and step counts as they were; the step can be retried.
* A deleted or truncated state file raises ``OSError`` at the start of the
  next step, before any weight changes (the state is lost: load a saved
  ``state_dict`` into a new optimizer).
* Every page carries a checksum; a page changed on disk, or an I/O error once
  the step has begun updating weights, raises ``OSError`` with the step half
  done. A page whose write fails stays in memory, so no weight is ever left
  updated with its state lost, but the optimizer then refuses every further
  call: create a new one and load a saved ``state_dict``.

The state file is removed by :meth:`close` (or the ``with`` block, or when
the optimizer is garbage-collected, or at interpreter exit); a process that
is killed leaves it behind in ``state_dir``.

CUDA parameters are not supported yet (the design keeps the pages in pinned
host memory and copies them on a side stream); they raise
``NotImplementedError``.
"""

from __future__ import annotations

import tempfile
import weakref
from typing import Any, Callable, Iterable, Optional

import torch

from . import functional as F
from .optim import AdamW, AdamW8bit, _prepare

__all__ = ["PagedAdamW", "PagedAdamW8bit", "DEFAULT_PAGE_BYTES"]

#: Default page size: large enough that a page read costs little more than its bytes.
DEFAULT_PAGE_BYTES = 1 << 20

_BACKINGS = ("file", "host")
_Q8_KEYS = ("state1", "state2", "absmax1", "absmax2")


class _Paged:
    """What PagedAdamW and PagedAdamW8bit share; mixed in before the unpaged class."""

    _f32_keys: tuple[str, str] = ("exp_avg", "exp_avg_sq")

    def _init_paging(self, max_resident_bytes: int, page_bytes: int, backing: str, state_dir: Optional[str]) -> None:
        if backing not in _BACKINGS:
            raise ValueError(f"backing must be one of {_BACKINGS}, got {backing!r}")
        if backing == "host" and state_dir is not None:
            raise ValueError("state_dir is where backing='file' puts its file; it makes no sense with backing='host'")
        if backing == "file" and state_dir is None:
            state_dir = tempfile.gettempdir()
        self._store = F.paged_state(page_bytes, max_resident_bytes, state_dir if backing == "file" else None)
        self._slots: dict[torch.Tensor, int] = {}
        # Closes the store (and removes its file) on close(), garbage collection or exit.
        self._finalizer = weakref.finalize(self, self._store.close)
        self.max_resident_bytes = max_resident_bytes
        self.page_bytes = page_bytes
        self.backing = backing
        self.state_dir = state_dir

    def _eight_bit(self, p: torch.Tensor) -> bool:
        return False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (see :meth:`torch.optim.Optimizer.add_param_group`)."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else params
        if not isinstance(params, set):  # torch rejects sets with its own message
            params = list(params)
            for p in params:
                if isinstance(p, torch.Tensor) and p.device.type == "cuda":
                    raise NotImplementedError(
                        f"a parameter is on {p.device}: {type(self).__name__} pages state for CPU parameters only "
                        f"so far (on CUDA the pages would live in pinned host memory, copied on a side stream); "
                        f"use torch.optim.AdamW(fused=True) or bitsandbytes' paged optimizers on the GPU"
                    )
        super().add_param_group({**param_group, "params": params})

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise ValueError(f"this {type(self).__name__} was closed; create a new optimizer")

    def _fresh(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """Give `p` zero state (and a page-store slot if it has none)."""
        eight_bit = self._eight_bit(p)
        slot = self._slots.get(p)
        if slot is None:
            self._slots[p] = self._store.add_param(p.numel(), "q8" if eight_bit else "f32")
        else:
            # State dropped by load_state_dict: zero the slot again.
            zero = F.paged_state_read(self._store, slot, p.numel(), eight_bit)
            for key, t in zero.items():
                t.fill_(127 if key == "state1" else 0)
            F.paged_state_write(self._store, slot, zero, eight_bit)
        state["step"] = torch.tensor(0.0)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Update every parameter that has a gradient; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_open()
        items, states = [], []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = dict(
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
            )
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(
                        f"{type(self).__name__} does not support sparse gradients; use torch.optim.SparseAdam"
                    )
                _prepare(p)
                state = self.state[p]
                if len(state) == 0 or p not in self._slots:
                    self._fresh(p, state)
                step = int(state["step"]) + 1
                items.append((self._slots[p], p, p.grad, self._eight_bit(p), dict(hyper, step=step)))
                states.append(state)
        # Every new parameter has its space by now: a full disk has failed above,
        # before any weight changed. The counts move only once the step went through.
        F.paged_adamw_step(self._store, items)
        for state in states:
            state["step"] += 1
        return loss

    def _read(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        eight_bit = self._eight_bit(p)
        st = F.paged_state_read(self._store, self._slots[p], p.numel(), eight_bit)
        if not eight_bit:
            st = dict(zip(self._f32_keys, st.values()))
        # Per-element state has the parameter's shape, as in the unpaged optimizers.
        return {k: t.view(p.shape) if t.numel() == p.numel() and not k.startswith("absmax") else t
                for k, t in st.items()}

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state with the moments as plain tensors (the unpaged optimizer's keys and layout)."""
        self._check_open()
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in sd["param_groups"] for i in g["params"]]
        for p, i in zip(params, ids):
            if i in sd["state"] and p in self._slots:
                # A new dict: torch's packed state shares the dicts of self.state.
                sd["state"][i] = {**sd["state"][i], **self._read(p)}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer, or of the unpaged one (same keys), copying the moments into pages."""
        self._check_open()
        saved = state_dict["state"]
        moment_keys = set(self._f32_keys) | set(_Q8_KEYS)
        stripped = {
            **state_dict,
            "state": {k: {kk: vv for kk, vv in v.items() if kk not in moment_keys} for k, v in saved.items()},
        }
        torch.optim.Optimizer.load_state_dict(self, stripped)
        for state in self.state.values():
            # torch keeps the caller's step tensors, which step() then increments
            # in place: loading a live optimizer's state_dict would tie the two.
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid not in saved or not moment_keys & set(saved[pid]):
                continue  # no state: the next step starts it from zero
            eight_bit = self._eight_bit(p)
            if p not in self._slots:
                self._slots[p] = self._store.add_param(p.numel(), "q8" if eight_bit else "f32")
            st = dict(saved[pid])
            if not eight_bit:
                missing = [k for k in self._f32_keys if k not in st]
                if missing:
                    raise ValueError(
                        f"the saved state of parameter {pid} lacks {missing} (it has {sorted(st)}); "
                        f"a parameter of {p.numel()} elements keeps float32 state "
                        f"{self._f32_keys} in {type(self).__name__}"
                    )
                st = {"exp_avg": st[self._f32_keys[0]], "exp_avg_sq": st[self._f32_keys[1]]}
            F.paged_state_write(self._store, self._slots[p], st, eight_bit)

    def stats(self) -> dict[str, int]:
        """Page-store counters: ``page_bytes``, ``pages``, ``total_bytes`` (all state, resident or
        not), ``max_resident_bytes``, ``resident_bytes`` (frames now allocated), ``peak_resident``,
        ``page_ins`` and ``page_outs``."""
        self._check_open()
        return dict(self._store.stats())

    @property
    def state_path(self) -> Optional[str]:
        """The backing file (None with ``backing="host"`` or once closed)."""
        path = self._store.path()
        return None if path is None else str(path)

    def close(self) -> None:
        """Free the resident pages and remove the state file; the optimizer cannot be used afterwards."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PagedAdamW(_Paged, AdamW):
    """:class:`qpeft.optim.AdamW` with its float32 moments paged (see the module docs).

    Results are bit-identical to :class:`~qpeft.optim.AdamW`; ``state_dict``
    has the same keys (``step``, ``exp_avg``, ``exp_avg_sq``), so state moves
    between the two (and ``torch.optim.AdamW``) both ways.

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize: as :class:`~qpeft.optim.AdamW`.
        max_resident_bytes: most bytes of state pages held in memory (at least one page).
        page_bytes: page size, a multiple of 4096.
        backing: ``"file"`` (pages in a file in ``state_dir``) or ``"host"`` (in host memory).
        state_dir: directory of the state file; default the system's temporary directory.

    Example:
        >>> model = torch.nn.Linear(512, 512)
        >>> with PagedAdamW(model.parameters(), max_resident_bytes=1 << 20, page_bytes=1 << 16) as opt:
        ...     model(torch.randn(3, 512)).sum().backward()
        ...     opt.step()
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        max_resident_bytes: int = 256 << 20,
        page_bytes: int = DEFAULT_PAGE_BYTES,
        backing: str = "file",
        state_dir: Optional[str] = None,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize)
        self._init_paging(max_resident_bytes, page_bytes, backing, state_dir)


class PagedAdamW8bit(_Paged, AdamW8bit):
    """:class:`qpeft.optim.AdamW8bit` with its 8-bit moments and scales paged (see the module docs).

    Results are bit-identical to :class:`~qpeft.optim.AdamW8bit`; parameters
    with fewer than ``min_8bit_size`` elements keep float32 state, also
    paged. ``state_dict`` has AdamW8bit's keys (``state1``, ``state2``,
    ``absmax1``, ``absmax2``).

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, min_8bit_size: as :class:`~qpeft.optim.AdamW8bit`.
        max_resident_bytes, page_bytes, backing, state_dir: as :class:`PagedAdamW`.
    """

    _f32_keys = ("state1", "state2")

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        min_8bit_size: int = 4096,
        max_resident_bytes: int = 256 << 20,
        page_bytes: int = DEFAULT_PAGE_BYTES,
        backing: str = "file",
        state_dir: Optional[str] = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, min_8bit_size=min_8bit_size
        )
        self._init_paging(max_resident_bytes, page_bytes, backing, state_dir)

    def _eight_bit(self, p: torch.Tensor) -> bool:
        return p.numel() >= self.min_8bit_size
