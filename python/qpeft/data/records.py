"""Instruction data files: Alpaca, chat ``messages``, ShareGPT, prompt/completion, plain text.

Every record becomes an :class:`Example`, one of four kinds:

* ``instruction``: ``{"instruction", "input" (optional), "output"}`` (Alpaca);
* ``chat``: ``{"messages": [{"role", "content"}, ...]}`` or ShareGPT's
  ``{"conversations": [{"from", "value"}, ...]}`` (roles human/gpt/system);
* ``completion``: ``{"prompt", "completion"}``;
* ``text``: ``{"text"}`` (language modelling: every token is a target).

Files are JSON Lines (``.jsonl``, one record per line) or JSON (an array of
records, or an object whose ``"data"`` holds one). A bad record raises
:class:`DataError` naming the file and line; with ``skip_bad=True`` it is
skipped and counted instead.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

__all__ = ["DataError", "Example", "Records", "FORMATS", "parse_record", "read_records"]

#: Record formats :func:`read_records` understands ("auto" detects per record).
FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text")

_ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "bot": "assistant", "model": "assistant"}


class DataError(ValueError):
    """A data file or record that cannot be used; the message says where and why."""


@dataclass
class Example:
    """One training record, independent of the file format it came from.

    ``kind`` is ``"instruction"``, ``"chat"``, ``"completion"`` or ``"text"``;
    only the fields of that kind are set. ``messages`` hold
    ``{"role": "system"|"user"|"assistant", "content": str}``. ``source`` is
    ``"file:line"`` (or ``"<record N>"``) for error messages.
    """

    kind: str
    instruction: str = ""
    input: str = ""
    output: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)
    prompt: str = ""
    completion: str = ""
    text: str = ""
    source: str = ""

    @classmethod
    def from_instruction(cls, instruction: str, output: str, input: str = "", source: str = "") -> "Example":
        return cls(kind="instruction", instruction=instruction, input=input, output=output, source=source)


@dataclass
class Records:
    """The examples of one or more files, and how many bad records were skipped."""

    examples: list[Example]
    skipped: int = 0
    skipped_where: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self):
        return iter(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def _text(rec: dict, key: str, where: str, required: bool = True) -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise DataError(f"{where}: missing field {key!r} (the record has {sorted(rec)})")
        return ""
    value = rec[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _turns(items: Any, role_key: str, content_key: str, roles: dict[str, str], where: str) -> list[dict[str, str]]:
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: expected a non-empty list of turns, got {type(items).__name__}")
    out = []
    for i, turn in enumerate(items):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turn {i} must be an object, got {type(turn).__name__}")
        role = turn.get(role_key)
        if not isinstance(role, str) or role not in roles:
            raise DataError(f"{where}: turn {i} has {role_key}={role!r}; expected one of {sorted(roles)}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {i} field {content_key!r} must be a string, got {type(content).__name__}")
        out.append({"role": roles[role], "content": content})
    if not any(t["role"] == "assistant" for t in out):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn from")
    return out


def _detect(rec: dict) -> str:
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    if "prompt" in rec or "completion" in rec:
        return "prompt_completion"
    if "text" in rec:
        return "text"
    raise DataError(
        f"unknown record format with fields {sorted(rec)}; expected instruction/input/output, messages, "
        f"conversations, prompt/completion or text"
    )


def parse_record(rec: Any, format: str = "auto", where: str = "<record>") -> Example:
    """One decoded JSON record as an :class:`Example` (see the module docstring)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    try:
        fmt = _detect(rec) if format == "auto" else format
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    if fmt == "alpaca":
        return Example(kind="instruction", instruction=_text(rec, "instruction", where),
                       input=_text(rec, "input", where, required=False), output=_text(rec, "output", where),
                       source=where)
    if fmt == "messages":
        roles = {r: r for r in _ROLES}
        return Example(kind="chat", messages=_turns(rec.get("messages"), "role", "content", roles, where), source=where)
    if fmt == "sharegpt":
        return Example(kind="chat", messages=_turns(rec.get("conversations"), "from", "value", _SHAREGPT_ROLES, where),
                       source=where)
    if fmt == "prompt_completion":
        return Example(kind="completion", prompt=_text(rec, "prompt", where),
                       completion=_text(rec, "completion", where), source=where)
    return Example(kind="text", text=_text(rec, "text", where), source=where)


def _not_utf8(path: Path, e: UnicodeDecodeError, line: Optional[int] = None) -> DataError:
    where = f"{path}:{line}" if line else str(path)
    return DataError(f"{where}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); "
                     f"save the file as UTF-8")


def _too_deep(where: str) -> DataError:
    return DataError(f"{where}: JSON nested too deeply for Python's parser; records need only a few levels")


def _jsonl(path: Path) -> Iterable[tuple[Any, str]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield _not_utf8(path, e, n), where
                continue
            if not line.strip():
                continue
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as e:
                yield DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})"), where
            except RecursionError:
                yield _too_deep(where), where


def _json(path: Path) -> Iterable[tuple[Any, str]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        # The whole file is unusable: no record boundaries to skip to.
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise _too_deep(str(path)) from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        for i, rec in enumerate(doc["data"]):
            yield rec, f"{path}: data[{i}]"
        return
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON array of records (or {{\"data\": [...]}}), got {type(doc).__name__}")
    # The line of each element, for messages: walk the array element by element.
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    for rec in doc:
        while text[pos] in " \t\r\n,":
            pos += 1
        _, end = decoder.raw_decode(text, pos)
        yield rec, f"{path}:{text.count(chr(10), 0, pos) + 1}"
        pos = end


def read_records(paths: "os.PathLike | str | Iterable[os.PathLike | str]", format: str = "auto",
                 skip_bad: bool = False, limit: Optional[int] = None) -> Records:
    """Read instruction data from one or more ``.json`` / ``.jsonl`` files.

    Args:
        paths: a file or a list of files, read in order.
        format: one of :data:`FORMATS`; ``"auto"`` recognizes each record by its fields.
        skip_bad: skip (and count) bad records instead of raising.
        limit: stop after this many examples.

    Raises:
        FileNotFoundError: a file does not exist.
        DataError: a bad record (file and line in the message), unless ``skip_bad``.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = Records([])
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"data file {p} does not exist (give a .json or .jsonl file)")
        reader = _jsonl if p.suffix == ".jsonl" else _json
        for rec, where in reader(p):
            try:
                if isinstance(rec, DataError):
                    raise rec
                out.examples.append(parse_record(rec, format, where))
            except DataError:
                if not skip_bad:
                    raise
                out.skipped += 1
                out.skipped_where.append(where)
            if limit is not None and len(out.examples) >= limit:
                return out
    return out
