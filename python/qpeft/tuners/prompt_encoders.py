"""The trainable modules of the prompt methods: they produce the virtual tokens.

Each module's ``forward()`` returns all virtual tokens at once, shape
``(num_virtual_tokens, width)`` in float32; :meth:`to_save` gives what PEFT
writes as ``prompt_embeddings``. Submodule names and layouts are PEFT's
(``embedding``, ``mlp_head``, ``lstm_head``, ``transform``), so weights move
between the two libraries with ``load_state_dict``.

A module built for inference (``trainable=False``) holds only ``embedding``:
the saved output of the encoder, which is all a loaded P-tuning or projected
prefix adapter has.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from .prompt_config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

__all__ = ["PrefixEncoder", "PromptEmbedding", "PromptEncoder", "PromptModule", "init_token_ids"]


class PromptModule(nn.Module):
    """Base of the three encoders: an ``embedding`` table, optionally re-parameterized."""

    embedding: nn.Embedding

    @property
    def reparameterized(self) -> bool:
        """Whether the virtual tokens are computed by a network (so the saved file cannot be trained further)."""
        return False

    def forward(self) -> torch.Tensor:
        return self.embedding.weight

    @torch.no_grad()
    def to_save(self) -> torch.Tensor:
        """PEFT's ``prompt_embeddings``: the virtual tokens as the model sees them, computed in eval mode."""
        was_training = self.training
        self.eval()
        try:
            return self().detach().clone()
        finally:
            self.train(was_training)

    @torch.no_grad()
    def load_saved(self, tensor: torch.Tensor) -> None:
        """Load a saved ``prompt_embeddings`` tensor (only into a module that is not re-parameterized)."""
        if self.reparameterized:
            raise ValueError(
                "the adapter file holds the prompt encoder's output, not the encoder itself, so it loads for inference "
                "only: use is_trainable=False (PEFT refuses to train such a file too)"
            )
        want = tuple(self.embedding.weight.shape)
        if tuple(tensor.shape) != want:
            raise ValueError(f"prompt_embeddings: file has shape {tuple(tensor.shape)}, this model needs {want}")
        self.embedding.weight.copy_(tensor.to(self.embedding.weight.dtype))


def init_token_ids(config: PromptTuningConfig, vocab_size: int, tokenizer: Any = None) -> Optional[torch.Tensor]:
    """The token ids whose embeddings start the prompt: ``None`` for ``"RANDOM"``.

    ``"TEXT"`` tokenizes ``prompt_tuning_init_text`` and repeats or cuts the
    ids to ``num_virtual_tokens``; ``"SAMPLE_VOCAB"`` draws ids uniformly
    (from torch's global generator, so ``torch.manual_seed`` makes it repeatable).
    """
    n = config.num_virtual_tokens
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab_size, (n,), dtype=torch.long)
    if config.prompt_tuning_init != "TEXT":
        return None
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} tokenizes to no tokens")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(
            f"the tokenizer gives ids {bad[:5]} outside the model's vocabulary of {vocab_size}; "
            "tokenizer_name_or_path must be the model's own tokenizer"
        )
    return torch.tensor((ids * math.ceil(n / len(ids)))[:n], dtype=torch.long)


class PromptEmbedding(PromptModule):
    """Prompt tuning: the virtual tokens are the rows of a trainable table.

    Args:
        config: the (model-completed) config.
        word_embeddings: the model's input embeddings, read for ``"TEXT"``
            and ``"SAMPLE_VOCAB"`` initialisation.
        init_ids: the token ids to start from (:func:`init_token_ids`), or ``None``.
    """

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module, init_ids: Optional[torch.Tensor]):
        super().__init__()
        self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
        if init_ids is not None:
            with torch.no_grad():
                start = word_embeddings(init_ids.to(word_embeddings.weight.device))
                self.embedding.weight.copy_(start.float())


class PromptEncoder(PromptModule):
    """P-tuning's encoder: table -> MLP, or table -> bidirectional LSTM -> MLP.

    Args:
        config: the (model-completed) config.
        trainable: build the encoder network; ``False`` builds only the table
            (for a saved adapter, which holds the encoder's output).
    """

    def __init__(self, config: PromptEncoderConfig, trainable: bool = True):
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(config.num_virtual_tokens, dim)
        self.mlp_head: Optional[nn.Sequential] = None
        self.lstm_head: Optional[nn.LSTM] = None
        if not trainable:
            return
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(
                input_size=dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout if config.encoder_num_layers > 1 else 0.0,
                bidirectional=True, batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
            )

    @property
    def reparameterized(self) -> bool:
        return self.mlp_head is not None

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.lstm_head is not None:
            x = self.lstm_head(x.unsqueeze(0))[0].squeeze(0)
        return x if self.mlp_head is None else self.mlp_head(x)


class PrefixEncoder(PromptModule):
    """Prefix tuning: ``num_layers * 2 * token_dim`` values per virtual token (every layer's key and value).

    With ``prefix_projection`` they are a tanh MLP of a ``token_dim``-wide
    table; otherwise the table holds them directly.

    Args:
        config: the (model-completed) config.
        trainable: build the projection MLP (when the config asks for it).
    """

    def __init__(self, config: PrefixTuningConfig, trainable: bool = True):
        super().__init__()
        dim, width = config.token_dim, config.num_layers * 2 * config.token_dim
        self.transform: Optional[nn.Sequential] = None
        if config.prefix_projection and trainable:
            self.embedding = nn.Embedding(config.num_virtual_tokens, dim)
            self.transform = nn.Sequential(
                nn.Linear(dim, config.encoder_hidden_size), nn.Tanh(), nn.Linear(config.encoder_hidden_size, width)
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    @property
    def reparameterized(self) -> bool:
        return self.transform is not None

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        return x if self.transform is None else self.transform(x)
