"""Configurations of the prompt methods, in PEFT's ``adapter_config.json`` keys.

* :class:`PromptTuningConfig` (``peft_type`` ``"PROMPT_TUNING"``): trainable
  virtual-token embeddings prepended to the input (Lester et al. 2021).
* :class:`PromptEncoderConfig` (``"P_TUNING"``): the virtual tokens come out of
  an MLP or bidirectional-LSTM encoder (Liu et al. 2021, "GPT understands, too").
* :class:`PrefixTuningConfig` (``"PREFIX_TUNING"``): trainable key/value
  prefixes for every attention layer (Li & Liang 2021), optionally through an
  MLP (``prefix_projection``).

Deep prompt tuning in the P-tuning v2 style (Liu et al. 2022: prompts at every
layer, no re-parameterization) is ``PrefixTuningConfig(prefix_projection=False)``:
P-tuning v2 realises its per-layer prompts exactly as key/value prefixes, which
is what prefix tuning without projection trains. :func:`deep_prompt_tuning_config`
builds that config.

Fields the model determines (``token_dim``, ``num_layers``,
``num_attention_heads``, ``num_transformer_submodules``, ``encoder_hidden_size``)
may be left ``None``; they are filled in from the model's config when the
adapter is created, as PEFT does, and written to the file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from .config import PeftConfig

__all__ = [
    "PREFIX_TUNING",
    "PROMPT_TUNING",
    "P_TUNING",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "deep_prompt_tuning_config",
]

PROMPT_TUNING = "PROMPT_TUNING"
P_TUNING = "P_TUNING"
PREFIX_TUNING = "PREFIX_TUNING"

_PROMPT_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")
_ENCODER_TYPES = ("MLP", "LSTM")
# PEFT's MLP prompt encoder always has this many hidden layers, whatever encoder_num_layers says.
_MLP_LAYERS = 2
# Keys PEFT writes that carry no meaning for qpeft, with their values as PEFT writes them.
_WRITTEN_DEFAULTS = {"auto_mapping": None, "revision": None, "modules_to_save": None}


def _positive_int(name: str, value: Any, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by prompt tuning, P-tuning and prefix tuning.

    Args:
        num_virtual_tokens: how many virtual tokens (or prefix positions) to
            train; required, > 0.
        token_dim: the width of one virtual token: the model's hidden size
            (prompt/P-tuning) or the width of one layer's keys
            (``num_key_value_heads * head_dim``, prefix tuning). Default: from
            the model.
        num_transformer_submodules: 1 for the decoder-only models qpeft
            supports (PEFT uses 2 for encoder-decoder models).
        num_attention_heads: the model's heads; for prefix tuning its
            key/value heads. Default: from the model.
        num_layers: the model's transformer layers. Default: from the model.
    """

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task_type not in (None, "CAUSAL_LM"):
            raise ValueError(
                f"qpeft implements {self.peft_type} for causal language models only: use task_type='CAUSAL_LM' "
                f"(got {self.task_type!r})"
            )
        if self.num_virtual_tokens is None:
            raise ValueError("num_virtual_tokens is required: how many virtual tokens to train, e.g. 20")
        _positive_int("num_virtual_tokens", self.num_virtual_tokens, optional=False)
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            _positive_int(name, getattr(self, name))
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError(
                f"num_transformer_submodules must be 1 for a decoder-only model (2 is for encoder-decoder models, "
                f"which qpeft does not support), got {self.num_transformer_submodules!r}"
            )

    def _peft_defaults(self) -> dict[str, Any]:
        return dict(_WRITTEN_DEFAULTS)

    @classmethod
    def _check_unsupported(cls, data: dict[str, Any]) -> None:
        if data.get("modules_to_save"):
            raise ValueError(
                f"adapter_config.json sets modules_to_save={data['modules_to_save']!r}; qpeft's {cls.peft_type} "
                "adapters train no base modules, so it cannot load this adapter"
            )


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` trainable input embeddings.

    Args:
        prompt_tuning_init: ``"RANDOM"`` (standard normal, like a fresh
            ``nn.Embedding``), ``"TEXT"`` (the embeddings of
            ``prompt_tuning_init_text``'s tokens, repeated or cut to length)
            or ``"SAMPLE_VOCAB"`` (the embeddings of tokens drawn uniformly
            from the vocabulary).
        prompt_tuning_init_text: the text for ``"TEXT"``.
        tokenizer_name_or_path: for ``"TEXT"``: a tokenizer object, or a
            local folder (or cached hub name) ``transformers.AutoTokenizer``
            loads; a tokenizer object is recorded in the file by its
            ``name_or_path``.
        tokenizer_kwargs: extra ``AutoTokenizer.from_pretrained`` arguments
            (``trust_remote_code`` is dropped, as PEFT does: an adapter file
            must not be able to run code).
    """

    peft_type: ClassVar[str] = PROMPT_TUNING
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Any = None
    tokenizer_kwargs: Optional[dict] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)  # PEFT's enum works too
        if init not in _PROMPT_INITS:
            raise ValueError(f"prompt_tuning_init must be one of {list(_PROMPT_INITS)}, got {init!r}")
        self.prompt_tuning_init = init
        if init == "TEXT":
            if not self.prompt_tuning_init_text:
                raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text, the text to start from")
            if not self.tokenizer_name_or_path:
                raise ValueError(
                    "prompt_tuning_init='TEXT' needs tokenizer_name_or_path: a tokenizer object or the folder of "
                    "the model's tokenizer"
                )
        if self.tokenizer_kwargs and init != "TEXT":
            raise ValueError("tokenizer_kwargs only applies with prompt_tuning_init='TEXT'")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        tok = self.tokenizer_name_or_path
        if tok is not None and not isinstance(tok, str):
            out["tokenizer_name_or_path"] = getattr(tok, "name_or_path", None) or None
        return out


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: the virtual tokens are an encoder's output (Liu et al. 2021).

    The encoder is PEFT's: ``"MLP"`` is three linear layers with ReLU between
    them (``encoder_num_layers`` and ``encoder_dropout`` are ignored, as in
    PEFT); ``"LSTM"`` is a bidirectional LSTM of ``encoder_num_layers``
    layers (``encoder_dropout`` between them) followed by a two-layer MLP.
    The saved file holds the encoder's output, so a loaded adapter serves
    inference only.

    Args:
        encoder_reparameterization_type: ``"MLP"`` or ``"LSTM"``.
        encoder_hidden_size: the encoder's width; default: ``token_dim``.
        encoder_num_layers: LSTM layers.
        encoder_dropout: dropout between LSTM layers, in ``[0, 1)``.
    """

    peft_type: ClassVar[str] = P_TUNING
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        if kind not in _ENCODER_TYPES:
            raise ValueError(f"encoder_reparameterization_type must be 'MLP' or 'LSTM', got {kind!r}")
        self.encoder_reparameterization_type = kind
        _positive_int("encoder_hidden_size", self.encoder_hidden_size)
        _positive_int("encoder_num_layers", self.encoder_num_layers, optional=False)
        if isinstance(self.encoder_dropout, bool) or not isinstance(self.encoder_dropout, (int, float)) or not (
            0.0 <= self.encoder_dropout < 1.0
        ):
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")
        if kind == "MLP" and not self.inference_mode:
            if self.encoder_num_layers != _MLP_LAYERS:
                warnings.warn(
                    f"encoder_num_layers={self.encoder_num_layers} is ignored by the MLP prompt encoder, which always "
                    f"has {_MLP_LAYERS} hidden layers (as in PEFT); use encoder_reparameterization_type='LSTM' to "
                    "choose the depth",
                    stacklevel=3,
                )
            if self.encoder_dropout:
                warnings.warn(
                    "encoder_dropout is ignored by the MLP prompt encoder (as in PEFT); it applies between LSTM layers",
                    stacklevel=3,
                )


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li & Liang 2021): trainable keys and values prepended in every attention layer.

    Args:
        prefix_projection: compute the prefixes with a two-layer tanh MLP from
            ``num_virtual_tokens`` embeddings of width ``token_dim``, as the
            paper does to stabilise training; without it the prefixes
            themselves are the parameters (deep prompt tuning, P-tuning v2).
        encoder_hidden_size: the MLP's hidden width; default: ``token_dim``.
        init_weights: ``None`` (random) or ``"zero"`` (prefix keys and values
            start at zero).
    """

    peft_type: ClassVar[str] = PREFIX_TUNING
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    init_weights: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("encoder_hidden_size", self.encoder_hidden_size)
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"prefix_projection must be True or False, got {self.prefix_projection!r}")
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None (random) or 'zero', got {self.init_weights!r}")


def deep_prompt_tuning_config(num_virtual_tokens: int, **kwargs: Any) -> PrefixTuningConfig:
    """Deep prompt tuning as in P-tuning v2: trainable prompts in every layer, no re-parameterization.

    P-tuning v2 puts its per-layer prompts into each attention layer's keys
    and values, which is prefix tuning without the projection MLP; the
    adapter is saved as ``PREFIX_TUNING`` and loads in PEFT as such.
    """
    if kwargs.get("prefix_projection"):
        raise ValueError(
            "deep prompt tuning (P-tuning v2) trains the prefixes directly: prefix_projection must be False"
        )
    kwargs["prefix_projection"] = False
    return PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, **kwargs)
