"""A generated instruction set whose answers can be checked exactly (the default run's data).

Task families: sorting words, arithmetic, changing case, counting words,
extracting a field, formatting a numbered list, reversing word order and
taking initials. Each record is Alpaca-style (``instruction``, ``input``,
``output``) plus its ``task``; the set is a pure function of the seed, and the
train and held-out splits never share a record.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable

__all__ = ["TASKS", "make_records", "make_splits", "write_jsonl", "exact_match", "normalize_answer"]

_WORDS = (
    "apple river stone cloud garden window silver music forest candle ocean paper mountain yellow tiger "
    "bread violin planet summer lemon castle rocket winter pencil island orange dragon meadow pillow thunder "
    "coffee marble jungle rabbit mirror velvet harbor cactus falcon copper lantern maple anchor basket "
    "cherry desert engine feather glacier hammer igloo jacket kettle ladder magnet needle oyster parrot "
    "quartz saddle tunnel umbrella valley walnut yogurt zebra bamboo canyon dolphin ember fossil gravel "
    "honey iris jasmine koala lotus mango nectar olive pepper quill raven salmon tulip urchin violet willow"
).split()
_NAMES = "Ann Bob Chen Dara Eli Fatima Goran Hana Ivan Jun Kofi Lena Mateo Nora Omar Priya Quinn Rosa Sven Tara".split()
_CITIES = "Paris Lima Oslo Cairo Delhi Tokyo Quito Rome Seoul Accra Dublin Hanoi Lagos Perth Riga Sofia".split()
_COLORS = "red green blue black white purple orange brown pink gray".split()


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return rng.sample(_WORDS, rng.randint(lo, hi))


def _sort(rng):
    w = _words(rng, 3, 6)
    return "Sort these words alphabetically.", ", ".join(w), ", ".join(sorted(w))


def _arith(rng):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    if op == "*":
        b = rng.randint(2, 12)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return "Compute the result and give only the number.", f"{a} {op} {b}", str(value)


def _upper(rng):
    w = " ".join(_words(rng, 2, 5))
    return "Convert the text to uppercase.", w, w.upper()


def _title(rng):
    w = " ".join(_words(rng, 2, 5))
    return "Capitalize the first letter of every word.", w, w.title()


def _count(rng):
    w = _words(rng, 2, 9)
    return "How many words are in the text? Answer with a number.", " ".join(w), str(len(w))


def _extract(rng):
    rec = {"name": rng.choice(_NAMES), "city": rng.choice(_CITIES), "age": str(rng.randint(18, 90)),
           "color": rng.choice(_COLORS)}
    keys = list(rec)
    rng.shuffle(keys)
    field = rng.choice(keys)
    return f"Extract the {field} from the record.", "; ".join(f"{k}={rec[k]}" for k in keys), rec[field]


def _numbered(rng):
    w = _words(rng, 2, 5)
    return "Format the items as a numbered list.", ", ".join(w), "\n".join(f"{i}. {x}" for i, x in enumerate(w, 1))


def _reverse(rng):
    w = _words(rng, 3, 6)
    return "Reverse the order of the words.", " ".join(w), " ".join(reversed(w))


def _initials(rng):
    w = _words(rng, 3, 6)
    return "Write the first letter of each word, with no spaces.", " ".join(w), "".join(x[0] for x in w)


#: Task family name -> generator of (instruction, input, output).
TASKS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "sort": _sort,
    "arithmetic": _arith,
    "uppercase": _upper,
    "titlecase": _title,
    "count": _count,
    "extract": _extract,
    "numbered_list": _numbered,
    "reverse": _reverse,
    "initials": _initials,
}


def make_records(n: int, seed: int = 0, tasks=None) -> list[dict[str, str]]:
    """``n`` distinct records, task families in turn, deterministic for a seed."""
    names = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task families {unknown}; choose from {sorted(TASKS)}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = random.Random(seed)
    out, seen = [], set()
    attempts = 0
    while len(out) < n:
        task = names[len(out) % len(names)]
        instruction, inp, output = TASKS[task](rng)
        attempts += 1
        if (instruction, inp) in seen:
            if attempts > 50 * (n + 10):
                raise ValueError(f"cannot make {n} distinct records from the task families {names}")
            continue
        seen.add((instruction, inp))
        out.append({"instruction": instruction, "input": inp, "output": output, "task": task})
    return out


def make_splits(n_train: int, n_eval: int, seed: int = 0, tasks=None) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out records (one draw, split after shuffling)."""
    records = make_records(n_train + n_eval, seed, tasks)
    random.Random(seed + 1).shuffle(records)
    return records[:n_train], records[n_train:]


def write_jsonl(records, path: "os.PathLike | str") -> Path:
    """Write records one per line (UTF-8), replacing the file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def normalize_answer(text: str) -> str:
    """Strip surrounding whitespace and trailing spaces of lines (models add both)."""
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def exact_match(prediction: str, answer: str) -> bool:
    """Whether a generated answer equals the reference after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(answer)
