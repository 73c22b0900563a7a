"""Prompt templates: an :class:`~qpeft.data.records.Example` as text segments, each a target or not.

Named templates (see FORMATS.md §7):

* ``"course"``: ``### Instruction:`` / ``### Output:``, with the input (when
  there is one) right after the instruction, as the course material writes it;
* ``"alpaca"``: Stanford Alpaca's ``### Instruction:`` / ``### Input:`` /
  ``### Response:``;
* ``"chat"``: the tokenizer's own chat template. The target spans (every
  assistant turn, with the template's end-of-turn text) are found by rendering
  each prefix of the conversation, so the template needs no special markers;
  it must render a conversation as an extension of its prefixes, which every
  common template does (a clear error says otherwise).

Plain ``text`` examples are one target segment under every template.
"""

from __future__ import annotations

from typing import Any, Optional

from .records import Example

__all__ = ["TEMPLATES", "Segment", "render", "prompt_text", "target_text"]

#: Template names :func:`render` accepts.
TEMPLATES = ("course", "alpaca", "chat")

#: (text, is_target)
Segment = tuple[str, bool]

_INSTRUCTION = "\n### Instruction:\n"
_OUTPUT = "\n### Output:\n"
_COURSE_NO_INPUT = ("Below is an instruction that describes a task. "
                    "Write a response that appropriately completes the request.")
_COURSE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.")

_ALPACA_NO_INPUT = ("Below is an instruction that describes a task. "
                    "Write a response that appropriately completes the request.\n\n"
                    "### Instruction:\n{instruction}\n\n### Response:\n")
_ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def _course(instruction: str, input: str = "") -> str:
    head = _COURSE_INPUT if input else _COURSE_NO_INPUT
    return head + _INSTRUCTION + instruction + input + _OUTPUT


def _alpaca(instruction: str, input: str = "") -> str:
    return (_ALPACA_INPUT if input else _ALPACA_NO_INPUT).format(instruction=instruction, input=input)


_PROMPTS = {"course": _course, "alpaca": _alpaca}


def _check(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")


def _as_messages(ex: Example) -> list[dict[str, str]]:
    if ex.kind == "chat":
        return ex.messages
    if ex.kind == "instruction":
        user = ex.instruction + ("\n\n" + ex.input if ex.input else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": ex.output}]
    return [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.completion}]


def _chat(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'chat' needs a tokenizer with a chat template; use 'course' or 'alpaca' instead")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _render_chat(ex: Example, tokenizer: Any) -> list[Segment]:
    messages = _as_messages(ex)
    segments: list[Segment] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _chat(tokenizer, messages[:i], True) if i else ""
        full = _chat(tokenizer, messages[: i + 1], False)
        if not before.startswith(done) or not full.startswith(before):
            raise ValueError(
                f"{ex.source or 'example'}: the tokenizer's chat template does not render a conversation as an "
                f"extension of its prefixes, so assistant turns cannot be located; use template 'course' or 'alpaca'"
            )
        segments.append((before[len(done):], False))
        segments.append((full[len(before):], True))
        done = full
    rest = _chat(tokenizer, messages, False)[len(done):]
    if rest:
        segments.append((rest, False))
    return [s for s in segments if s[0]]


def render(ex: Example, template: str = "course", tokenizer: Any = None) -> list[Segment]:
    """The example as text segments ``(text, is_target)``; joined, they are the training text.

    For ``course``/``alpaca``, targets are the outputs (EOS is added by the
    encoder, not here). A chat example under those templates becomes one
    instruction/output pair per assistant turn (a system turn goes first, as
    plain text). ``chat`` needs the tokenizer.
    """
    _check(template)
    if ex.kind == "text":
        return [(ex.text, True)]
    if template == "chat":
        return _render_chat(ex, tokenizer)
    make = _PROMPTS[template]
    if ex.kind == "instruction":
        return [(make(ex.instruction, ex.input), False), (ex.output, True)]
    if ex.kind == "completion":
        return [(ex.prompt, False), (ex.completion, True)]
    segments: list[Segment] = []
    pending: list[str] = []
    for m in ex.messages:
        if m["role"] == "system":
            segments.append((m["content"] + "\n", False))
        elif m["role"] == "user":
            pending.append(m["content"])
        else:
            segments.append((make("\n".join(pending)), False))
            segments.append((m["content"], True))
            pending = []
    return segments


def prompt_text(ex: Example, template: str = "course", tokenizer: Any = None) -> str:
    """The text a model is given to produce the example's (last) target, for generation and evaluation."""
    _check(template)
    if ex.kind == "text":
        raise ValueError("a plain-text example has no prompt")
    if template == "chat":
        messages = _as_messages(ex)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return _chat(tokenizer, messages[:last], True)
    segments = render(ex, template, tokenizer)
    last = max(i for i, (_, target) in enumerate(segments) if target)
    return "".join(text for text, _ in segments[:last])


def target_text(ex: Example) -> Optional[str]:
    """The reference answer of a single-target example (for exact-match evaluation)."""
    if ex.kind == "instruction":
        return ex.output
    if ex.kind == "completion":
        return ex.completion
    if ex.kind == "chat":
        return [m for m in ex.messages if m["role"] == "assistant"][-1]["content"]
    return None
