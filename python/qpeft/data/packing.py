"""Batches: padded, or packed several examples to a sequence with no attention across them.

A packed row holds examples back to back. Each restarts its position ids at
0, and the attention mask is block-diagonal and causal (a 4-D additive mask,
which transformers' default CPU attention, SDPA, and its eager attention both
take), so every example sees only itself: its logits are those it would get
alone. The first token of every packed example carries no label, exactly as
in an unpacked row, where nothing precedes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from .encode import IGNORE_INDEX, Encoded

__all__ = ["Packed", "pack", "collate", "collate_packed", "pad_token_id"]


@dataclass
class Packed:
    """Examples concatenated into one row; ``lengths`` are theirs, in order."""

    input_ids: list[int]
    labels: list[int]
    lengths: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def pack(examples: Iterable[Encoded], max_length: int) -> list[Packed]:
    """Greedy packing in order: a row takes examples until the next one would not fit."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    rows: list[Packed] = []
    cur = Packed([], [], [])
    for ex in examples:
        n = len(ex)
        if n > max_length:
            raise ValueError(
                f"an example of {n} tokens does not fit max_length={max_length}; encode with the same max_length"
            )
        if cur.lengths and len(cur) + n > max_length:
            rows.append(cur)
            cur = Packed([], [], [])
        cur.input_ids += ex.input_ids
        cur.labels += [IGNORE_INDEX] + ex.labels[1:]
        cur.lengths.append(n)
    if cur.lengths:
        rows.append(cur)
    return rows


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS (which many causal LMs lack a pad for)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    return pad


def _pad(rows: Sequence[Sequence[int]], value: int, length: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def collate(batch: Sequence[Encoded], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding),
    as long as the longest example rounded up to a multiple of ``pad_to_multiple_of``."""
    if not batch:
        raise ValueError("an empty batch")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be at least 1, got {pad_to_multiple_of}")
    length = -(-max(len(e) for e in batch) // pad_to_multiple_of) * pad_to_multiple_of
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    for i, e in enumerate(batch):
        mask[i, : len(e)] = 1
    return {
        "input_ids": _pad([e.input_ids for e in batch], pad_token_id, length),
        "attention_mask": mask,
        "labels": _pad([e.labels for e in batch], IGNORE_INDEX, length),
    }


def collate_packed(batch: Sequence[Packed], pad_token_id: int,
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Packed rows with ``position_ids`` and a block-diagonal causal ``attention_mask``
    of shape ``[batch, 1, length, length]`` (0 where attention is allowed, the
    dtype's most negative value elsewhere; pass the model's dtype)."""
    if not batch:
        raise ValueError("an empty batch")
    length = max(len(p) for p in batch)
    positions = torch.zeros(len(batch), length, dtype=torch.long)
    segment = torch.full((len(batch), length), -1, dtype=torch.long)
    for i, p in enumerate(batch):
        start = 0
        for s, n in enumerate(p.lengths):
            positions[i, start:start + n] = torch.arange(n)
            segment[i, start:start + n] = s
            start += n
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    # Padding attends to itself only, so that no row of the softmax is empty.
    allowed |= torch.eye(length, dtype=torch.bool)
    mask = torch.zeros(len(batch), 1, length, length, dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return {
        "input_ids": _pad([p.input_ids for p in batch], pad_token_id, length),
        "attention_mask": mask,
        "position_ids": positions,
        "labels": _pad([p.labels for p in batch], IGNORE_INDEX, length),
    }
