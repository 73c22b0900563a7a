"""Held-out evaluation: loss on the target tokens, and exact-match accuracy of greedy answers."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..data import IGNORE_INDEX, Example, collate, exact_match, pad_token_id, prompt_text, target_text
from ..data.encode import Encoded
from .fastpath import lm_loss_sum

__all__ = ["generate_answers", "exact_match_accuracy", "mean_loss", "token_loss_sum"]


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over target tokens, number of target tokens) for one batch.

    The sum (not the mean) lets gradient accumulation and several processes
    weight every token alike, whatever the split. Models :func:`lm_parts` knows
    take the chunked loss, which never forms the whole logits tensor.
    """
    fast = lm_loss_sum(model, batch)
    if fast is not None:
        return fast
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # Prompt tuning and P-tuning return logits for their virtual tokens too, in front of the real ones.
    logits = model(**inputs).logits[:, -labels.shape[1]:]
    targets = labels[:, 1:]
    n = int((targets != IGNORE_INDEX).sum())
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, n


@torch.no_grad()
def mean_loss(model: Any, examples: Sequence[Encoded], pad_token_id: int, batch_size: int = 8) -> float:
    """Mean target-token loss over encoded examples."""
    from .trainer import PAD_MULTIPLE  # here: the trainer imports this module

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            loss, n = token_loss_sum(model, collate(examples[i:i + batch_size], pad_token_id, PAD_MULTIPLE))
            total += float(loss)
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, examples: Sequence[Example], template: str,
                     max_new_tokens: int = 40, batch_size: int = 16) -> list[str]:
    """Greedy answers to the examples' prompts (batched, left padding), cut at EOS."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = pad_token_id(tokenizer)
    out: list[str] = []
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            prompts = [prompt_text(e, template, tokenizer) for e in chunk]
            chat = template == "chat"
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                out.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def exact_match_accuracy(model: Any, tokenizer: Any, examples: Sequence[Example], template: str,
                         max_new_tokens: int = 40, tasks: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """``{"accuracy": fraction, "correct": n, "total": n, "by_task": {...}, "samples": [...]}``."""
    answers = generate_answers(model, tokenizer, examples, template, max_new_tokens)
    by_task: dict[str, list[int]] = {}
    correct = 0
    samples = []
    for i, (ex, ans) in enumerate(zip(examples, answers)):
        ok = exact_match(ans, target_text(ex) or "")
        correct += ok
        task = tasks[i] if tasks else "all"
        by_task.setdefault(task, [0, 0])
        by_task[task][0] += ok
        by_task[task][1] += 1
        if len(samples) < 5:
            samples.append({"prompt_tail": (ex.instruction or ex.prompt)[-80:], "answer": ans, "reference": target_text(ex)})
    total = len(examples)
    return {
        "accuracy": correct / max(total, 1),
        "correct": correct,
        "total": total,
        "by_task": {k: v[0] / v[1] for k, v in sorted(by_task.items())},
        "samples": samples,
    }
