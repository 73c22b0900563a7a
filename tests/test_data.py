"""qpeft.data: readers, templates, label masking, truncation, packing, generated tasks (issue 6)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from qpeft import data as D

transformers = pytest.importorskip("transformers")

ALPACA = [
    {"instruction": "Sort these words.", "input": "pear, apple", "output": "apple, pear"},
    {"instruction": "Say hi.", "output": "Hi there!"},
]
CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6, of course."},
]}
SHAREGPT = {"conversations": [
    {"from": "human", "value": "Name a color."}, {"from": "gpt", "value": "Blue."},
    {"from": "human", "value": "Another?"}, {"from": "gpt", "value": "Green."},
]}
COMPLETION = {"prompt": "The sky is", "completion": " blue."}
TEXT = {"text": "Plain language modelling text."}


def _write_jsonl(path, records, raw_lines=()):
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------- readers


def test_every_format_from_jsonl_and_json(tmp_path):
    records = ALPACA + [CHAT, SHAREGPT, COMPLETION, TEXT]
    for path in (_write_jsonl(tmp_path / "d.jsonl", records), tmp_path / "d.json"):
        if path.suffix == ".json":
            path.write_text(json.dumps(records, indent=2))
        got = D.read_records(path)
        assert [e.kind for e in got] == ["instruction", "instruction", "chat", "chat", "completion", "text"]
        assert got[0].input == "pear, apple" and got[1].input == ""
        assert got[3].messages[1] == {"role": "assistant", "content": "Blue."}
        assert got[4].completion == " blue." and got[5].text == TEXT["text"]
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"data": ALPACA}))
    assert len(D.read_records(wrapped)) == 2
    assert len(D.read_records([path, wrapped], limit=7)) == 7


@pytest.mark.parametrize("bad, message", [
    ({"instruction": "x"}, "missing field 'output'"),
    ({"instruction": 3, "output": "y"}, "'instruction' must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role='robot'"),
    ({"conversations": "nope"}, "list of turns"),
    ({"foo": 1}, "unknown record format"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_records_name_file_and_line(tmp_path, bad, message):
    path = _write_jsonl(tmp_path / "d.jsonl", ALPACA + [bad] + ALPACA)
    with pytest.raises(D.DataError, match=re.escape(f"d.jsonl:3")) as e:
        D.read_records(path)
    assert message in str(e.value)
    got = D.read_records(path, skip_bad=True)
    assert len(got) == 4 and got.skipped == 1 and got.skipped_where[0].endswith("d.jsonl:3")


def test_invalid_json(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ALPACA, raw_lines=['{"instruction": "x", '])
    with pytest.raises(D.DataError, match=r"d\.jsonl:3: invalid JSON"):
        D.read_records(path)
    assert D.read_records(path, skip_bad=True).skipped == 1
    broken = tmp_path / "d.json"
    broken.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": }\n]')
    with pytest.raises(D.DataError, match=r"d\.json:3: invalid JSON"):
        D.read_records(broken)


def test_json_array_errors_give_the_line_of_the_record(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "a"}\n]')
    with pytest.raises(D.DataError, match=r"d\.json:4: missing field 'output'"):
        D.read_records(path)


def test_reader_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.read_records(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="format must be one of"):
        D.read_records(tmp_path / "x.jsonl", format="csv")
    path = _write_jsonl(tmp_path / "d.jsonl", [COMPLETION])
    with pytest.raises(D.DataError, match="missing field 'instruction'"):
        D.read_records(path, format="alpaca")


# ---------------------------------------------------------- label masking


def _targets(enc, tok):
    """Decoded runs of consecutive loss-carrying tokens."""
    runs, cur = [], []
    for i, l in zip(enc.input_ids, enc.labels):
        if l == D.IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert l == i
            cur.append(i)
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


@pytest.mark.parametrize("template", ["course", "alpaca"])
def test_single_turn_targets_are_the_output_and_eos(tok, template):
    for rec in ALPACA:
        ex = D.parse_record(rec)
        enc, truncated = D.encode(ex, tok, template)
        assert not truncated
        assert _targets(enc, tok) == [rec["output"] + tok.eos_token]
        prompt = tok.decode([i for i, l in zip(enc.input_ids, enc.labels) if l == D.IGNORE_INDEX])
        assert prompt == D.prompt_text(ex, template)
        assert ("### Output:" in prompt) == (template == "course")
        assert ("### Response:" in prompt) == (template == "alpaca")
        assert ("### Input:\npear, apple" in prompt) == (template == "alpaca" and bool(rec.get("input")))


def test_course_template_is_the_contract():
    ex = D.parse_record(ALPACA[1])
    assert D.prompt_text(ex, "course") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n### Instruction:\nSay hi.\n### Output:\n")
    ex = D.parse_record(ALPACA[0])
    assert D.prompt_text(ex, "course").endswith(
        "paired with an input that provides further context. Write a response that appropriately completes the "
        "request.\n### Instruction:\nSort these words.pear, apple\n### Output:\n")


@pytest.mark.parametrize("rec", [CHAT, SHAREGPT], ids=["messages", "sharegpt"])
def test_multi_turn_chat_template_targets_every_assistant_turn(tok, rec):
    ex = D.parse_record(rec)
    enc, _ = D.encode(ex, tok, "chat")
    answers = [m["content"] for m in ex.messages if m["role"] == "assistant"]
    assert _targets(enc, tok) == [a + "<|im_end|>\n" for a in answers]
    # The whole sequence is the chat template's rendering, token for token.
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(ex.messages, tokenize=False)


@pytest.mark.parametrize("template", ["course", "alpaca"])
def test_multi_turn_under_instruction_templates(tok, template):
    ex = D.parse_record(CHAT)
    enc, _ = D.encode(ex, tok, template)
    assert _targets(enc, tok) == ["4" + tok.eos_token, "6, of course." + tok.eos_token]
    assert tok.decode(enc.input_ids).startswith("Be brief.\n")


def test_instruction_record_under_the_chat_template(tok):
    enc, _ = D.encode(D.parse_record(ALPACA[0]), tok, "chat")
    assert _targets(enc, tok) == ["apple, pear<|im_end|>\n"]
    assert "Sort these words.\n\npear, apple" in tok.decode(enc.input_ids)


def test_completion_and_text(tok):
    enc, _ = D.encode(D.parse_record(COMPLETION), tok)
    assert _targets(enc, tok) == [" blue." + tok.eos_token]
    enc, _ = D.encode(D.parse_record(TEXT), tok, "chat")
    # Everything but the first token (which nothing predicts) is a target.
    assert tok.decode(enc.input_ids) == TEXT["text"] + tok.eos_token
    assert all(l != D.IGNORE_INDEX for l in enc.labels)


def test_truncation_keeps_the_prompt_and_drops_lost_targets(tok):
    long_output = D.Example.from_instruction("Repeat.", " ".join(["word"] * 200))
    long_prompt = D.Example.from_instruction(" ".join(["word"] * 200), "short")
    ok = D.Example.from_instruction("Say hi.", "Hi")
    out = D.encode_all([long_output, long_prompt, ok], tok, "course", max_length=64)
    assert len(out) == 2 and out.dropped == 1 and out.truncated == 2
    kept = out[0]
    assert len(kept) == 64 and kept.input_ids[:10] == D.encode(long_output, tok)[0].input_ids[:10]
    assert 0 < kept.target_tokens < 64
    with pytest.raises(ValueError, match="max_length"):
        D.encode(ok, tok, max_length=1)


def test_chat_template_required_for_chat(tok):
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        D.encode(D.parse_record(CHAT), None, "chat")
    with pytest.raises(ValueError, match="template must be one of"):
        D.render(D.parse_record(CHAT), "vicuna")


# ------------------------------------------------------------------ packing


def _tiny_model(vocab):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=vocab)
    return transformers.LlamaForCausalLM(cfg).eval()


def _token_losses(model, batch):
    with torch.no_grad():
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**kwargs).logits
    labels = batch["labels"]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    return loss, labels[:, 1:] != D.IGNORE_INDEX


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_unpacked_give_the_same_per_example_losses(tok, attn):
    records = [D.parse_record(r) for r in ALPACA + [CHAT, SHAREGPT, COMPLETION, TEXT]]
    encoded = D.encode_all(records, tok, "chat", max_length=96)
    model = _tiny_model(len(tok))
    model.config._attn_implementation = attn

    unpacked = []
    for e in encoded:
        loss, mask = _token_losses(model, D.collate([e], tok.pad_token_id))
        unpacked.append(loss[0][mask[0]])
    rows = D.pack(encoded, max_length=160)
    assert 1 < len(rows) < len(encoded)
    loss, mask = _token_losses(model, D.collate_packed(rows, tok.pad_token_id))
    packed = []
    for i, row in enumerate(rows):
        start = 0
        for n in row.lengths:
            seg = slice(start, start + n - 1)  # predictions of the example's tokens 2..n
            packed.append(loss[i, seg][mask[i, seg]])
            start += n
    assert len(packed) == len(unpacked)
    for a, b in zip(packed, unpacked):
        assert a.shape == b.shape and len(a) > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Same targets either way.
    assert sum(r.labels.count(D.IGNORE_INDEX) for r in rows) >= sum(e.labels.count(D.IGNORE_INDEX) for e in encoded)


def test_pack_and_collate_shapes():
    ex = [D.Encoded([1, 2, 3], [-100, 2, 3]), D.Encoded([4, 5], [-100, 5]), D.Encoded([6, 7, 8, 9], [6, 7, 8, 9])]
    rows = D.pack(ex, max_length=5)
    assert [r.lengths for r in rows] == [[3, 2], [4]]
    assert rows[1].labels == [-100, 7, 8, 9]
    b = D.collate_packed(rows, pad_token_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    allowed = b["attention_mask"][0, 0] == 0
    assert allowed.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert b["labels"][1].tolist() == [-100, 7, 8, 9, -100]
    with pytest.raises(ValueError, match="does not fit"):
        D.pack(ex, max_length=3)
    u = D.collate(ex, pad_token_id=0)
    assert u["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    # Rounded up to a multiple: padding carries no attention and no loss.
    u8 = D.collate(ex, pad_token_id=0, pad_to_multiple_of=3)
    assert u8["input_ids"].tolist() == [[1, 2, 3, 0, 0, 0], [4, 5, 0, 0, 0, 0], [6, 7, 8, 9, 0, 0]]
    assert u8["attention_mask"].sum().item() == 9 and u8["labels"][2].tolist() == [6, 7, 8, 9, -100, -100]
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        D.collate(ex, pad_token_id=0, pad_to_multiple_of=0)


# --------------------------------------------------------- generated tasks


def _check_answer(r):
    task, inp, out = r["task"], r["input"], r["output"]
    words = inp.split()
    expect = {
        "sort": lambda: ", ".join(sorted(inp.split(", "))),
        "arithmetic": lambda: str(eval(inp)),  # noqa: S307 - digits and one operator, made by the test's subject
        "uppercase": lambda: inp.upper(),
        "titlecase": lambda: " ".join(w.capitalize() for w in words),
        "count": lambda: str(len(words)),
        "extract": lambda: dict(kv.split("=") for kv in inp.split("; "))[r["instruction"].split()[2]],
        "numbered_list": lambda: "\n".join(f"{i}. {w}" for i, w in enumerate(inp.split(", "), 1)),
        "reverse": lambda: " ".join(reversed(words)),
        "initials": lambda: "".join(w[0] for w in words),
    }[task]()
    assert out == expect, r


def test_generated_records_are_deterministic_distinct_and_correct(tmp_path):
    a = D.make_records(500, seed=3)
    assert a == D.make_records(500, seed=3) and a != D.make_records(500, seed=4)
    assert len({(r["instruction"], r["input"]) for r in a}) == 500
    assert {r["task"] for r in a} == set(D.TASKS)
    for r in a:
        _check_answer(r)
    train, held_out = D.make_splits(400, 100, seed=1)
    assert len(train) == 400 and len(held_out) == 100
    assert not {(r["instruction"], r["input"]) for r in train} & {(r["instruction"], r["input"]) for r in held_out}
    path = D.write_jsonl(train, tmp_path / "sub" / "train.jsonl")
    assert [e.output for e in D.read_records(path)] == [r["output"] for r in train]
    with pytest.raises(ValueError, match="unknown task families"):
        D.make_records(3, tasks=["poetry"])


def test_exact_match_normalizes_whitespace_only():
    assert D.exact_match("  1. a\n2. b  \n", "1. a\n2. b")
    assert not D.exact_match("1. A\n2. b", "1. a\n2. b")
    assert not D.exact_match("apple, pear.", "apple, pear")
