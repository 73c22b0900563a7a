"""Configuration of bottleneck adapters (Houlsby et al. 2019; parallel: He et al. 2022).

PEFT has no bottleneck adapters, so the file carries a ``peft_type`` of
qpeft's own, :data:`BOTTLENECK`; see :mod:`qpeft.tuners.bottleneck_model` for
the directory format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

from .config import PeftConfig

__all__ = ["BOTTLENECK", "BottleneckConfig", "DEFAULT_SUBLAYERS", "NON_LINEARITIES"]

#: ``peft_type`` of bottleneck adapters in ``adapter_config.json`` (qpeft's own, not a PEFT type).
BOTTLENECK = "QPEFT_BOTTLENECK"

#: Activation functions between the down- and up-projection.
NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")

#: ``model.config.model_type`` -> (attention sublayer name, feed-forward sublayer name).
DEFAULT_SUBLAYERS: dict[str, tuple[str, str]] = {
    "llama": ("self_attn", "mlp"),
    "qwen2": ("self_attn", "mlp"),
    "gpt2": ("attn", "mlp"),
}

_PLACEMENTS = ("attn", "mlp", "both")
_MODES = ("sequential", "parallel")


def _names(value: Any, field: str) -> Optional[list[str]]:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{field} must be a non-empty list of module names such as ['self_attn'], got {value!r}")
    return list(value)


@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapters after (or beside) the attention and feed-forward sublayers.

    Each adapter computes ``delta = scaling * up(act(down(dropout(z))))`` with
    ``down: hidden -> bottleneck_size`` and ``up: bottleneck_size -> hidden``
    (both with bias). With ``mode="sequential"`` (Houlsby) ``z`` is the
    sublayer's output ``h`` and the sublayer returns ``h + delta``; with
    ``mode="parallel"`` (He et al.) ``z`` is the sublayer's input and the
    sublayer returns ``h + delta``.

    Args:
        bottleneck_size: width of the bottleneck (> 0).
        non_linearity: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``.
        placement: ``"attn"``, ``"mlp"`` or ``"both"``.
        mode: ``"sequential"`` or ``"parallel"``.
        scaling: factor on the adapter's output (He et al. use 4 for a
            parallel adapter on the feed-forward sublayer).
        dropout: dropout on the adapter's input, in ``[0, 1)``.
        layers_to_transform: layer indices (an int or a list) that get adapters;
            default every layer.
        attn_modules, mlp_modules: names (or name suffixes) of the attention and
            feed-forward sublayers; default from ``model.config.model_type``
            (:data:`DEFAULT_SUBLAYERS`), written out expanded once applied.
        init_weights: ``True``: ``down`` Kaiming-uniform, ``up`` and both biases
            zero, so the model starts exactly as the base model; ``"houlsby"``:
            every weight ``N(0, 0.01^2)``, biases zero (near identity, as in
            Houlsby et al.); ``False``: random (for tests).
    """

    peft_type: ClassVar[str] = BOTTLENECK
    bottleneck_size: int = 64
    non_linearity: str = "relu"
    placement: str = "both"
    mode: str = "sequential"
    scaling: float = 1.0
    dropout: float = 0.0
    layers_to_transform: Optional[Union[list[int], int]] = None
    attn_modules: Optional[list[str]] = None
    mlp_modules: Optional[list[str]] = None
    init_weights: Union[bool, str] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        size = self.bottleneck_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"bottleneck_size must be a positive integer, got {size!r}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(f"non_linearity must be one of {list(NON_LINEARITIES)}, got {self.non_linearity!r}")
        if self.placement not in _PLACEMENTS:
            raise ValueError(f"placement must be one of {list(_PLACEMENTS)}, got {self.placement!r}")
        if self.mode not in _MODES:
            raise ValueError(
                f"mode must be 'sequential' (Houlsby: adapter on the sublayer output) or 'parallel' "
                f"(He et al.: adapter on the sublayer input), got {self.mode!r}"
            )
        s = self.scaling
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"scaling must be a finite number, got {s!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        lt = self.layers_to_transform
        if lt is not None:
            if isinstance(lt, int) and not isinstance(lt, bool):
                lt = [lt]
            if not isinstance(lt, (list, tuple)) or not lt or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in lt
            ):
                raise ValueError(f"layers_to_transform must be a layer index or a list of them, got {lt!r}")
            self.layers_to_transform = list(lt)
        self.attn_modules = _names(self.attn_modules, "attn_modules")
        self.mlp_modules = _names(self.mlp_modules, "mlp_modules")
        if self.init_weights not in (True, False, "houlsby"):
            raise ValueError(
                f"init_weights must be True (zero up-projection: exact identity), 'houlsby' (near identity) "
                f"or False, got {self.init_weights!r}"
            )

    def sublayer_names(self, model_type: Optional[str]) -> dict[str, list[str]]:
        """``{"attn": names, "mlp": names}`` for the placements in use, defaults filled in by model type.

        Raises:
            ValueError: a default is needed and ``model_type`` has none; the
                message names the supported types and the fields to set.
        """
        wanted = ("attn", "mlp") if self.placement == "both" else (self.placement,)
        given = {"attn": self.attn_modules, "mlp": self.mlp_modules}
        out = {}
        for kind in wanted:
            if given[kind] is None:
                if model_type not in DEFAULT_SUBLAYERS:
                    raise ValueError(
                        f"bottleneck adapters know the sublayer names of model types {sorted(DEFAULT_SUBLAYERS)}, "
                        f"not {model_type!r}; pass {kind}_modules=[...] (the name of each block's "
                        f"{'attention' if kind == 'attn' else 'feed-forward'} module) or use a supported model"
                    )
                given[kind] = [DEFAULT_SUBLAYERS[model_type][0 if kind == "attn" else 1]]
            out[kind] = list(given[kind])
        return out
