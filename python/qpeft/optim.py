"""AdamW with 32-bit or blockwise 8-bit state, one fused native pass per parameter.

* :class:`AdamW` keeps float32 moments and computes what
  ``torch.optim.AdamW`` computes (its default foreach CPU path, operation by
  operation); its state uses torch's keys (``step``, ``exp_avg``,
  ``exp_avg_sq``), so state dicts move between the two.
* :class:`AdamW8bit` keeps the moments of every parameter with at least
  ``min_8bit_size`` (4096) elements as 8-bit codes with one float32 scale per
  256 elements (about 2.03 bytes per parameter instead of 8), in
  bitsandbytes' layout and keys (``state1``, ``state2``, ``absmax1``,
  ``absmax2``); smaller parameters keep float32 ``state1``/``state2`` and
  take the 32-bit update, as in bitsandbytes.

Both are ordinary :class:`torch.optim.Optimizer` subclasses: parameter
groups, learning-rate schedulers, ``zero_grad``, ``state_dict`` /
``load_state_dict`` and the Hugging Face ``Trainer`` work as with torch's
optimizers. Parameters must be float32 or bfloat16 tensors on the CPU or a
CUDA device (bfloat16 parameters keep float32 moments; the state lives with
the parameter); on the CPU the update runs on ``torch.get_num_threads()``
threads, on a GPU as one kernel launch per parameter, with the same results.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch

from . import functional as F

__all__ = ["AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "estimate_state_bytes"]


def __getattr__(name: str) -> Any:
    # The paged optimizers (qpeft/paged.py) subclass the ones here, so they are
    # imported on first use rather than at the top (which would be circular).
    if name in ("PagedAdamW", "PagedAdamW8bit"):
        from . import paged

        return getattr(paged, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_FLOAT_STATE = {
    # Keys whose tensors are float32 whatever the parameter dtype (torch would
    # cast them to the parameter's dtype when loading a state dict).
    "AdamW": ("exp_avg", "exp_avg_sq"),
    "AdamW8bit": ("state1", "state2", "absmax1", "absmax2"),
}


def _check_hyper(lr: Any, betas: Any, eps: Any, weight_decay: Any, amsgrad: Any) -> None:
    if amsgrad:
        raise ValueError("amsgrad=True is not supported by qpeft's AdamW; use torch.optim.AdamW(amsgrad=True)")
    if not isinstance(lr, torch.Tensor) and not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class _FusedAdamW(torch.optim.Optimizer):
    """Shared parameter handling; subclasses set up state and run one parameter."""

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
    ) -> None:
        _check_hyper(lr, betas, eps, weight_decay, amsgrad)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                _check_param(p)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (see :meth:`torch.optim.Optimizer.add_param_group`)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"], group.get("amsgrad", False))
        for p in group["params"]:
            _check_param(p)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Update every parameter that has a gradient; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, state)
                state["step"] += 1
                self._update(p, state, int(state["step"]), hyper)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (of this optimizer type).

        torch casts floating-point state to the parameter's dtype on load;
        the moments and scales here stay float32 for bfloat16 parameters too,
        so they are taken from ``state_dict`` as they were saved.
        """
        self._check_state_dict(state_dict)
        saved = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        float_keys = _FLOAT_STATE[self._kind]
        for pid, p in zip(saved_ids, params):
            if pid not in saved:
                continue
            state = self.state[p]
            for key in float_keys:
                value = saved[pid].get(key)
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    # A copy: the loaded state is updated in place and must not
                    # write through to the caller's state dict.
                    state[key] = value.to(device=p.device, dtype=torch.float32, copy=True).contiguous()
                elif isinstance(value, torch.Tensor):
                    state[key] = value.to(device=p.device, copy=True).contiguous()

    _kind = ""

    def _check_state_dict(self, sd: Any) -> None:
        """Raise ValueError unless ``sd`` is shaped as this optimizer's :meth:`state_dict`
        for these parameters (a state dict may come from a damaged or foreign file)."""
        def bad(why: str) -> ValueError:
            return ValueError(f"cannot load this {type(self).__name__} state dict: {why}")

        if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict) or not isinstance(
                sd.get("param_groups"), list):
            raise bad("expected a dict with 'state' (a dict) and 'param_groups' (a list)")
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups):
            raise bad(f"it has {len(groups)} parameter groups, this optimizer {len(self.param_groups)}")
        params: dict[int, torch.Tensor] = {}
        for i, (g, mine) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(g, dict) or not isinstance(g.get("params"), list):
                raise bad(f"parameter group {i} must be a dict with a 'params' list")
            if len(g["params"]) != len(mine["params"]):
                raise bad(f"parameter group {i} has {len(g['params'])} parameters, this optimizer's "
                          f"{len(mine['params'])}")
            for pid, p in zip(g["params"], mine["params"]):
                if not _is_int(pid) or pid in params:
                    raise bad(f"parameter ids must be distinct integers, got {pid!r}")
                params[pid] = p
            _check_group(g, i, bad)
        for pid, st in sd["state"].items():
            if pid not in params:
                raise bad(f"it has state for parameter id {pid!r}, which no group lists")
            if not isinstance(st, dict):
                raise bad(f"the state of parameter {pid} must be a dict")
            if st:
                _check_step(st.get("step"), pid, bad)
                self._check_param_state(params[pid], st, pid, bad)

    def _check_param_state(self, p: torch.Tensor, st: dict, pid: int, bad: Callable[[str], ValueError]) -> None:
        raise NotImplementedError

    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _update(self, p: torch.Tensor, state: dict[str, Any], step: int, hyper: dict[str, Any]) -> None:
        raise NotImplementedError


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)) and bool(
            torch.isfinite(x).all())
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_group(g: dict, i: int, bad: Callable[[str], ValueError]) -> None:
    """The hyperparameters a step reads from a loaded group."""
    for key in ("lr", "eps", "weight_decay"):
        if not _is_number(g.get(key)) or float(g[key]) < 0:
            raise bad(f"parameter group {i}: {key!r} must be a finite non-negative number, got {g.get(key)!r}")
    betas = g.get("betas")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(
            _is_number(b) and 0.0 <= float(b) < 1.0 for b in betas):
        raise bad(f"parameter group {i}: 'betas' must be two numbers in [0, 1), got {betas!r}")
    if not isinstance(g.get("maximize", False), bool):
        raise bad(f"parameter group {i}: 'maximize' must be true or false, got {g.get('maximize')!r}")


def _check_step(step: Any, pid: int, bad: Callable[[str], ValueError]) -> None:
    if not _is_number(step) or float(step) < 0 or float(step) != int(float(step)) or float(step) > 2**53:
        raise bad(f"parameter {pid}: 'step' must be a non-negative whole number, got {step!r}")


def _check_moment(t: Any, p: torch.Tensor, key: str, pid: int, bad: Callable[[str], ValueError],
                  dtypes: tuple[torch.dtype, ...] = ()) -> None:
    """A per-element state tensor: the parameter's shape, a float dtype (or one of ``dtypes``)."""
    if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.dtype in dtypes):
        raise bad(f"parameter {pid}: {key!r} must be a float tensor, got "
                  f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.shape != p.shape:
        raise bad(f"parameter {pid}: {key!r} has shape {list(t.shape)}, the parameter {list(p.shape)}")


def _check_param(p: torch.Tensor) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"parameters must be tensors, got {type(p).__name__}")
    if p.device.type not in ("cpu", "cuda"):
        raise ValueError(f"a parameter is on {p.device}; qpeft's AdamW updates CPU and CUDA parameters only")
    if p.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(
            f"a parameter has dtype {p.dtype}; qpeft's AdamW updates float32 and bfloat16 parameters "
            f"(convert the model with .float() or .bfloat16())"
        )


def _prepare(p: torch.Tensor) -> None:
    # The kernels update p in place and read p.grad flat: both must be dense
    # row-major. A strided parameter is made contiguous once (as bitsandbytes does).
    if not p.is_contiguous():
        p.data = p.data.contiguous()


class AdamW(_FusedAdamW):
    """AdamW (decoupled weight decay) with float32 state, fused in one native pass per parameter.

    Agrees with ``torch.optim.AdamW`` (default foreach path) for float32
    parameters: same update formula and operation order; torch's vectorized
    ``sqrt`` is not always correctly rounded, so a few elements per step can
    differ in the last bit (see tests/test_optim.py for the tolerance). State
    keys are torch's, so a state dict of ``torch.optim.AdamW`` loads here
    and the other way round.

    Args:
        params: parameters or parameter groups (float32/bfloat16 CPU tensors).
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator.
        weight_decay: decoupled weight decay (``p *= 1 - lr * weight_decay``).
        amsgrad: not supported; ``True`` raises ``ValueError``.
        maximize: maximize the objective instead of minimizing it.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = AdamW(model.parameters(), lr=1e-2)
        >>> model(torch.randn(3, 4)).sum().backward()
        >>> opt.step(); opt.zero_grad()
    """

    _kind = "AdamW"

    def _check_param_state(self, p: torch.Tensor, st: dict, pid: int, bad: Callable[[str], ValueError]) -> None:
        for key in ("exp_avg", "exp_avg_sq"):
            _check_moment(st.get(key), p, key, pid, bad)
        if bool((st["exp_avg_sq"] < 0).any()):
            # Its square root would be NaN: the file is damaged.
            raise bad(f"parameter {pid}: 'exp_avg_sq' has negative values")

    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        _prepare(p)
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    def _update(self, p: torch.Tensor, state: dict[str, Any], step: int, hyper: dict[str, Any]) -> None:
        _prepare(p)
        F.adamw_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"], step=step, **hyper)


class AdamW8bit(_FusedAdamW):
    """AdamW with blockwise 8-bit moments (bitsandbytes' ``AdamW8bit`` format and arithmetic).

    Parameters with at least ``min_8bit_size`` elements keep m and v as
    uint8 codes on bitsandbytes' dynamic maps (signed for m, unsigned for v)
    with one float32 absmax per 256 elements each, re-quantized after every
    step with the new block absmax: 2 + 8/256 = 2.03 bytes of state per
    parameter. Smaller parameters keep float32 moments and take
    :class:`AdamW`'s update. Beyond bitsandbytes' CPU path, a NaN or infinite
    gradient element resets that element's moments and leaves its weight
    unchanged, and the sign of m survives re-quantization
    (see :func:`qpeft.functional.adamw8bit_step`).

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize: as :class:`AdamW`.
        min_8bit_size: parameters with fewer elements keep float32 state.
    """

    _kind = "AdamW8bit"

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
    ) -> None:
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be a non-negative int, got {min_8bit_size!r}")
        self.min_8bit_size = min_8bit_size
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize)

    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        _prepare(p)
        state["step"] = torch.tensor(0.0)
        n = p.numel()
        if n < self.min_8bit_size:
            state["state1"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["state2"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            return
        blocks = -(-n // F.OPTIM_BLOCKSIZE)
        # Codes of 0.0: 127 on the signed map, 0 on the unsigned map; absmax 0
        # makes the first dequantization give zeros either way.
        state["state1"] = torch.full(p.shape, 127, dtype=torch.uint8, device=p.device)
        state["state2"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
        state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)

    def _check_param_state(self, p: torch.Tensor, st: dict, pid: int, bad: Callable[[str], ValueError]) -> None:
        for key in ("state1", "state2"):
            _check_moment(st.get(key), p, key, pid, bad, dtypes=(torch.uint8,))
        eight_bit = [st[k].dtype == torch.uint8 for k in ("state1", "state2")]
        if eight_bit[0] != eight_bit[1]:
            raise bad(f"parameter {pid}: 'state1' and 'state2' must both be 8-bit codes or both float")
        if not eight_bit[0]:
            return
        blocks = -(-p.numel() // F.OPTIM_BLOCKSIZE)
        for key in ("absmax1", "absmax2"):
            t = st.get(key)
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() != blocks:
                raise bad(f"parameter {pid}: {key!r} must be {blocks} float values (one per {F.OPTIM_BLOCKSIZE} "
                          f"elements)")
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise bad(f"parameter {pid}: {key!r} must hold finite non-negative scales")

    def _update(self, p: torch.Tensor, state: dict[str, Any], step: int, hyper: dict[str, Any]) -> None:
        _prepare(p)
        if state["state1"].dtype == torch.uint8:
            F.adamw8bit_step(
                p, p.grad, state["state1"], state["state2"], state["absmax1"], state["absmax2"], step=step, **hyper
            )
        else:
            F.adamw_step(p, p.grad, state["state1"], state["state2"], step=step, **hyper)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("min_8bit_size", 4096)


_STATE_KINDS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")


def estimate_state_bytes(
    params: Any,
    optimizer: str = "adamw",
    min_8bit_size: int = 4096,
    *,
    max_resident_bytes: Optional[int] = None,
    page_bytes: int = 1 << 20,
) -> int:
    """Bytes of optimizer state that :class:`AdamW`, :class:`AdamW8bit` or a paged variant keeps in memory.

    Counts the tensors the optimizer allocates on its first step: for
    ``"adamw"`` two float32 moments per element; for ``"adamw8bit"`` two
    bytes per element plus two float32 scales per 256 elements for
    parameters with at least ``min_8bit_size`` elements, and float32 moments
    for smaller ones; plus a 4-byte step counter per parameter.

    For ``"paged_adamw"`` and ``"paged_adamw8bit"`` (:class:`PagedAdamW`,
    :class:`PagedAdamW8bit`) it is the resident part: the state rounded up to
    whole pages of ``page_bytes``, but at most ``max_resident_bytes`` rounded
    down to whole pages, plus the step counters. The whole state, in the
    backing file or host memory, is what the unpaged kind reports (plus up to
    63 bytes of alignment per parameter and page).

    Args:
        params: a module (its parameters that require gradients), a tensor,
            or an iterable of tensors or parameter-group dicts.
        optimizer: ``"adamw"``, ``"adamw8bit"``, ``"paged_adamw"`` or ``"paged_adamw8bit"``.
        min_8bit_size: as :class:`AdamW8bit`.
        max_resident_bytes, page_bytes: the paged optimizers' arguments (required for them).

    Example:
        >>> estimate_state_bytes([torch.zeros(4096, 4096)], "adamw8bit")
        34078724
        >>> estimate_state_bytes([torch.zeros(4096, 4096)], "paged_adamw8bit", max_resident_bytes=8 << 20)
        8388612
    """
    if optimizer not in _STATE_KINDS:
        raise ValueError(f"optimizer must be one of {_STATE_KINDS}, got {optimizer!r}")
    paged = optimizer.startswith("paged_")
    if paged and (isinstance(max_resident_bytes, bool) or not isinstance(max_resident_bytes, int)):
        raise ValueError(f"{optimizer} needs max_resident_bytes (an int), got {max_resident_bytes!r}")
    if paged and (not isinstance(page_bytes, int) or page_bytes <= 0):
        raise ValueError(f"page_bytes must be a positive int, got {page_bytes!r}")
    eight_bit = optimizer.endswith("adamw8bit")
    moments = 0
    counters = 0
    for p in _iter_params(params):
        n = p.numel()
        counters += 4  # the step counter
        if eight_bit and n >= min_8bit_size:
            moments += 2 * n + 2 * 4 * math.ceil(n / F.OPTIM_BLOCKSIZE)
        else:
            moments += 2 * 4 * n
    if paged:
        whole_pages = -(-moments // page_bytes) * page_bytes
        moments = min(whole_pages, max_resident_bytes // page_bytes * page_bytes)
    return moments + counters


def _iter_params(params: Any) -> Iterable[torch.Tensor]:
    if isinstance(params, torch.nn.Module):
        return [p for p in params.parameters() if p.requires_grad]
    if isinstance(params, torch.Tensor):
        return [params]
    out = []
    for item in params:
        if isinstance(item, dict):
            out.extend(_iter_params(item["params"]))
        elif isinstance(item, torch.Tensor):
            out.append(item)
        else:
            raise TypeError(f"params must hold tensors or parameter-group dicts, got {type(item).__name__}")
    return out
