"""Token ids and labels for supervised fine-tuning.

Each segment of a rendered example is tokenized on its own and the ids are
concatenated: the prompt's tokens are then exactly what the model sees when
it is asked the same prompt at generation time (tokenizing prompt and answer
together can merge tokens across the boundary). Labels are the ids of target
segments and -100 (no loss) everywhere else. Under the ``course`` and
``alpaca`` templates the tokenizer's EOS follows every target, so the model
learns to stop; chat templates already end each assistant turn with their
end-of-turn token, which is part of the target.

Truncation keeps the beginning (the prompt) and cuts the end; an example
whose targets are all cut off is dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from .records import Example
from .templates import render

__all__ = ["IGNORE_INDEX", "Encoded", "EncodedSet", "encode", "encode_all"]

#: Label of a token that carries no loss (PyTorch's cross-entropy default).
IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One tokenized example."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def target_tokens(self) -> int:
        return sum(1 for v in self.labels if v != IGNORE_INDEX)


@dataclass
class EncodedSet:
    """Encoded examples plus what encoding had to do to them."""

    examples: list[Encoded]
    truncated: int = 0
    dropped: int = 0
    dropped_where: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def __iter__(self):
        return iter(self.examples)

    @property
    def tokens(self) -> int:
        return sum(len(e) for e in self.examples)


def _special_prefix(tokenizer: Any) -> list[int]:
    """The tokens the tokenizer puts before any text (BOS, if it adds one)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    if n > 0 and with_special[n:] == plain:
        return list(with_special[:n])
    return []


def encode(example: Example, tokenizer: Any, template: str = "course", max_length: Optional[int] = None,
           _prefix: Optional[list[int]] = None) -> tuple[Optional[Encoded], bool]:
    """``(encoded, truncated)``; ``encoded`` is None when truncation removed every target token."""
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    segments = render(example, template, tokenizer)
    chat = template == "chat" and example.kind != "text"
    ids: list[int] = [] if chat else list(_special_prefix(tokenizer) if _prefix is None else _prefix)
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    eos = tokenizer.eos_token_id
    for text, target in segments:
        piece = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if target and not chat and eos is not None:
            piece.append(eos)
        ids += piece
        labels += piece if target else [IGNORE_INDEX] * len(piece)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    # The first label is never predicted (nothing comes before it).
    if not any(v != IGNORE_INDEX for v in labels[1:]):
        return None, truncated
    return Encoded(ids, labels), truncated


def encode_all(examples: Iterable[Example], tokenizer: Any, template: str = "course",
               max_length: Optional[int] = None) -> EncodedSet:
    """Encode many examples; see :func:`encode`. Dropped examples are counted, not raised."""
    prefix = _special_prefix(tokenizer)
    out = EncodedSet([])
    for ex in examples:
        enc, truncated = encode(ex, tokenizer, template, max_length, _prefix=prefix)
        out.truncated += int(truncated)
        if enc is None:
            out.dropped += 1
            out.dropped_where.append(ex.source)
        else:
            out.examples.append(enc)
    return out
