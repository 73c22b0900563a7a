"""The LoRA layer: a frozen linear layer plus named low-rank updates.

``LoraLinear`` wraps an ``nn.Linear``, a transformers ``Conv1D`` (GPT-2; weight
stored ``[in, out]``) or a :class:`qpeft.nn.Linear4bit`, in the style of
microsoft/LoRA's loralib: the update ``scale * B @ A`` is added to the base
output, and :meth:`LoraLinear.merge` folds it into the weight (``W = W0 +
scale * B @ A``) so inference costs nothing extra. Several adapters live side
by side under their names; the active ones are summed.

Parameter names follow PEFT's layout where it matters for files and for
optimizers that filter by name (``base_layer``, ``lora_A``, ``lora_B``,
``lora_magnitude_vector``), so a module path maps to PEFT's key by dropping
the adapter name.
"""

from __future__ import annotations

import copy
import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional
from ..nn import Linear4bit
from .lora_autograd import dora_weight_norm, lora_linear_4bit
from .targets import is_conv1d

__all__ = ["LoraLinear", "supports_lora"]


def supports_lora(module: nn.Module) -> bool:
    """Whether :class:`LoraLinear` can wrap ``module``."""
    return isinstance(module, (nn.Linear, Linear4bit)) or is_conv1d(module)


class LoraLinear(nn.Module):
    """A frozen linear layer with LoRA adapters.

    Args:
        base_layer: ``nn.Linear``, transformers ``Conv1D`` or ``qpeft.nn.Linear4bit``.

    Attributes:
        base_layer: the wrapped layer (its weight never trains).
        lora_A, lora_B: ``ParameterDict`` by adapter name; ``A`` is
            ``[r, in_features]``, ``B`` is ``[out_features, r]``.
        lora_magnitude_vector: DoRA magnitudes ``[out_features]`` by adapter name.
        active_adapters: names summed in the forward.
        merged_adapters: names currently folded into the base weight.
        disabled: when ``True`` the layer returns the base output.
        lora_in_compute_dtype: 4-bit base only: run the first adapter's matmuls in
            the compute dtype (bf16) instead of the adapter's fp32 when gradients
            are on (set by the trainer's fast path; off by default, which matches
            PEFT's rounding; inference always uses the adapter's dtype).
    """

    lora_in_compute_dtype: bool = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not supports_lora(base_layer):
            raise TypeError(
                f"LoRA wraps nn.Linear, transformers Conv1D or qpeft.nn.Linear4bit, got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        if isinstance(base_layer, nn.Linear) or isinstance(base_layer, Linear4bit):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            self.in_features, self.out_features = base_layer.weight.shape
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # What merge() replaced, so unmerge() can restore it bit for bit (4-bit
        # bases: the packed weight and its state, which re-quantizing loses).
        self._merge_saved: dict[str, object] = {}
        self._dora_norm: dict[str, torch.Tensor] = {}
        #: Relative error ``||Q(W') - W'|| / ||W'||`` that re-quantizing added, by adapter (4-bit bases).
        self.merge_error: dict[str, float] = {}

    @property
    def is_4bit(self) -> bool:
        return isinstance(self.base_layer, Linear4bit)

    # Model code reads ``proj.weight.dtype`` / ``proj.bias``; it gets the base layer's.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    # ------------------------------------------------------------- adapters

    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights=True,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Add adapter ``name`` with rank ``r``; see :class:`~qpeft.tuners.LoraConfig` for the arguments.

        ``dtype`` is the adapter's parameter dtype; default float32 whenever
        the base is 16-bit or 4-bit (training low-rank factors in bf16 loses
        most updates), else the base weight's dtype.
        """
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        device = self.base_layer.weight.device
        if dtype is None:
            wd = self.base_layer.weight.dtype
            dtype = wd if wd in (torch.float32, torch.float64) else torch.float32
        A = torch.empty(r, self.in_features, dtype=dtype, device=device)
        B = torch.empty(self.out_features, r, dtype=dtype, device=device)
        # Kaiming-uniform with a = sqrt(5) is nn.Linear's default init (loralib's choice for A).
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            if init_lora_weights == "gaussian":
                nn.init.normal_(A, std=1.0 / r)
            nn.init.zeros_(B)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # A module added to an eval-mode model must not start in training mode.
        self.lora_dropout[name].train(self.training)
        self.r[name] = r
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        if use_dora:
            with torch.no_grad():
                norm = dora_weight_norm(self._dense_weight(dtype), A, B, self.scaling[name])
            self.lora_magnitude_vector[name] = nn.Parameter(norm)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (it must not be merged)."""
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into this layer; unmerge it before deleting it")
        for d in (self.lora_A, self.lora_B, self.lora_magnitude_vector, self.lora_dropout):
            if name in d:
                del d[name]
        self.r.pop(name, None)
        self.scaling.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_adapters(self, names: Iterable[str]) -> None:
        """Make ``names`` (those this layer has) the active adapters."""
        self.active_adapters = [n for n in names if n in self.lora_A]

    # ------------------------------------------------------------- weights

    def _dense_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The base weight as ``[out, in]`` (dequantized for a 4-bit base)."""
        base = self.base_layer
        if self.is_4bit:
            w = base.dequantize()
        else:
            w = base.weight.detach()
            w = w.t() if self.fan_in_fan_out else w
        return w if dtype is None else w.to(dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` of adapter ``name``, ``[out, in]`` in the adapter's dtype."""
        return self.scaling[name] * (self.lora_B[name] @ self.lora_A[name])

    # ------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = [a for a in self.active_adapters if a not in self.merged_adapters]
        if self.disabled or not active:
            return self.base_layer(x)
        if self.is_4bit:
            return self._forward_4bit(x, active)
        result = self.base_layer(x)
        out_dtype = result.dtype
        for name in active:
            A, B = self.lora_A[name], self.lora_B[name]
            xa = self.lora_dropout[name](x.to(A.dtype))
            if name in self.lora_magnitude_vector:
                result = result + self._dora_term(name, x, xa, result)
            else:
                result = result + F.linear(F.linear(xa, A), B) * self.scaling[name]
        return result.to(out_dtype)

    def _dora_term(self, name: str, x: torch.Tensor, xa: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        A, B, m, s = self.lora_A[name], self.lora_B[name], self.lora_magnitude_vector[name], self.scaling[name]
        W = self._dense_weight(A.dtype)
        # The norm is a constant for the gradient (DoRA paper, section 4.3).
        g = m / dora_weight_norm(W, A.detach(), B.detach(), s)
        if isinstance(self.lora_dropout[name], nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base = result if bias is None else result - bias
        else:
            base = F.linear(xa, W)
        return (g - 1) * base + g * F.linear(F.linear(xa, A), B) * s

    def _forward_4bit(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        dora = [a for a in active if a in self.lora_magnitude_vector]
        if dora and len(active) > 1:
            raise ValueError(
                f"DoRA adapter(s) {dora} cannot be active together with other adapters on a 4-bit layer; "
                "activate one adapter at a time"
            )
        first, rest = active[0], active[1:]
        drop = self.lora_dropout[first]
        p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
        out = lora_linear_4bit(
            x, self.base_layer, self.lora_A[first], self.lora_B[first], self.scaling[first], p,
            self.lora_magnitude_vector[first] if first in self.lora_magnitude_vector else None,
            self.lora_in_compute_dtype and torch.is_grad_enabled(),
        )
        for name in rest:
            A, B = self.lora_A[name], self.lora_B[name]
            xa = self.lora_dropout[name](x.to(A.dtype))
            out = out + (F.linear(F.linear(xa, A), B) * self.scaling[name]).to(out.dtype)
        return out

    # ------------------------------------------------------------- merging

    @torch.no_grad()
    def merge(self, names: Optional[Iterable[str]] = None, keep_original: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weight.

        Dense base: ``W += scale * B @ A`` in place (DoRA: ``W = m / ||W + dW|| * (W + dW)``).
        :meth:`unmerge` subtracts it again, exact up to float rounding; with
        ``keep_original`` the original weight is kept and restored bit for bit
        (one extra copy of the weight while merged).

        4-bit base: ``dequant(W0) + scale * B @ A`` is re-quantized in place
        with the layer's own format; the packed original (small) is always
        kept, so :meth:`unmerge` is exact. The added relative error goes to
        :attr:`merge_error`.
        """
        names = list(self.active_adapters if names is None else names)
        for name in names:
            if name not in self.lora_A:
                raise ValueError(f"this layer has no adapter {name!r}; it has {sorted(self.lora_A)}")
            if name in self.merged_adapters:
                continue
            if name in self.lora_magnitude_vector and self.merged_adapters:
                raise ValueError(
                    f"DoRA adapter {name!r} must be merged into an unmerged layer; unmerge "
                    f"{self.merged_adapters} first"
                )
            if self.is_4bit:
                self._merge_4bit(name)
            else:
                self._merge_dense(name, keep_original)
            self.merged_adapters.append(name)

    def _new_dense_weight(self, name: str, W: torch.Tensor) -> torch.Tensor:
        """The merged ``[out, in]`` weight for adapter ``name`` given the current ``W`` (float32 or wider)."""
        delta = self.delta_weight(name).to(W.dtype)
        if name in self.lora_magnitude_vector:
            norm = torch.linalg.norm(W + delta, dim=1)
            self._dora_norm[name] = norm
            return (self.lora_magnitude_vector[name].to(W.dtype) / norm).unsqueeze(1) * (W + delta)
        return W + delta

    def _merge_dense(self, name: str, keep_original: bool) -> None:
        weight = self.base_layer.weight
        if keep_original:
            self._merge_saved[name] = weight.detach().clone()
        if name in self.lora_magnitude_vector:
            W = self._dense_weight(torch.promote_types(weight.dtype, torch.float32))
            new = self._new_dense_weight(name, W)
            weight.data.copy_((new.t() if self.fan_in_fan_out else new).to(weight.dtype))
            return
        delta = self.delta_weight(name)
        weight.data.add_((delta.t() if self.fan_in_fan_out else delta).to(weight.dtype))

    def _merge_4bit(self, name: str) -> None:
        base = self.base_layer
        self._merge_saved[name] = (base.weight.data, base.quant_state)
        W = base.dequantize().float()
        new = self._new_dense_weight(name, W)
        dtype = base.quant_state.dtype
        packed, state = functional.quantize_4bit(
            new.to(dtype).cpu(), blocksize=base.blocksize, compress_statistics=base.double_quant,
            quant_type=base.quant_type,
        )
        back = functional.dequantize_4bit(packed, state).float()
        self.merge_error[name] = float(torch.linalg.norm(back - new.cpu()) / torch.linalg.norm(new).clamp_min(1e-30))
        base.weight.data = packed.to(base.weight.device)
        base.quant_state = state.to(base.weight.device)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` for every merged adapter, last merged first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            saved = self._merge_saved.pop(name, None)
            norm = self._dora_norm.pop(name, None)
            if self.is_4bit:
                self.base_layer.weight.data, self.base_layer.quant_state = saved
                self.merge_error.pop(name, None)
                continue
            weight = self.base_layer.weight
            if saved is not None:
                weight.data.copy_(saved)
                continue
            delta = self.delta_weight(name)
            if norm is None:
                weight.data.sub_((delta.t() if self.fan_in_fan_out else delta).to(weight.dtype))
                continue
            # DoRA: W' = (m / norm) (W + dW), so W = W' / (m / norm) - dW with the norm from merge time.
            W = self._dense_weight(torch.promote_types(weight.dtype, torch.float32))
            m = self.lora_magnitude_vector[name].to(W.dtype)
            new = W / (m / norm).unsqueeze(1) - delta.to(W.dtype)
            weight.data.copy_((new.t() if self.fan_in_fan_out else new).to(weight.dtype))

    @torch.no_grad()
    def merged_dense(self, names: Iterable[str], dtype: Optional[torch.dtype] = None) -> nn.Module:
        """A plain layer (``nn.Linear``, or ``Conv1D`` for a Conv1D base) with ``names`` merged exactly.

        For a 4-bit base, ``W = dequant(W0) + scale * B @ A`` is computed in
        float32 and returned dense in ``dtype`` (default: the base's dequantized dtype).
        """
        W = self._dense_weight()
        W = W.to(torch.promote_types(W.dtype, torch.float32))
        for name in names:
            W = self._new_dense_weight(name, W)
            self._dora_norm.pop(name, None)
        base = self.base_layer
        if dtype is None:
            dtype = base.quant_state.dtype if self.is_4bit else base.weight.dtype
        bias = base.bias
        if self.fan_in_fan_out:
            layer = copy.deepcopy(base)
            layer.weight = nn.Parameter(W.t().to(dtype).contiguous(), requires_grad=False)
            if bias is not None:
                layer.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
            return layer
        layer = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=W.device, dtype=dtype)
        layer.weight.data.copy_(W.to(dtype))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(dtype))
        layer.requires_grad_(False)
        return layer

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.lora_A)}, active={self.active_adapters}, merged={self.merged_adapters}"
