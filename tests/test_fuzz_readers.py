"""Fuzzing every reader of untrusted files (issue 9): quantized checkpoints (safetensors bytes and headers,
the quant_state JSON, config.json), adapter directories, optimizer state dicts, trainer checkpoints, and
instruction data files.

A reader may raise only its documented exceptions (SECURITY.md): ``ValueError`` (``DataError`` and
``json.JSONDecodeError`` are subclasses) for bad contents and ``FileNotFoundError`` for a missing file,
each with a message; anything else (KeyError, TypeError, RecursionError, a safetensors or pickle error,
a crash, a hang) fails the test. CI runs a bounded number of cases (about a minute in all);
``QPEFT_FUZZ_EXAMPLES=N`` runs N per reader instead.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import struct
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import qpeft  # noqa: E402
from qpeft import data as D  # noqa: E402
from qpeft.optim import AdamW, AdamW8bit  # noqa: E402
from qpeft.tuners import LoraConfig, PeftModel, get_peft_model  # noqa: E402

FILE_ERRORS = (ValueError, FileNotFoundError)
_ON_REQUEST = int(os.environ.get("QPEFT_FUZZ_EXAMPLES", "0"))
CASES: Counter = Counter()


def fuzz(examples: int):
    """Hypothesis settings: ``examples`` cases in CI (derandomized, so CI is repeatable), more on request."""
    return settings(max_examples=_ON_REQUEST or examples, deadline=None, derandomize=not _ON_REQUEST,
                    database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print("\nfuzz cases run per reader: " + ", ".join(f"{k} {v}" for k, v in sorted(CASES.items())))


@contextmanager
def time_limit(seconds: float):
    """A hang is a failure too."""
    def fire(*_):
        raise TimeoutError(f"the reader did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def only_documented(reader: str, fn, allowed=FILE_ERRORS):
    CASES[reader] += 1
    with time_limit(30):
        try:
            fn()
        except allowed as e:
            assert str(e), f"{type(e).__name__} without a message"


# ------------------------------------------------------------------ strategies

KEYS = ["instruction", "input", "output", "messages", "conversations", "role", "content", "from", "value", "prompt",
        "completion", "text", "data", "system", "user", "assistant", "human", "gpt"]
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.sampled_from(KEYS)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner,
                                                                 max_size=5),
    max_leaves=30,
)


@st.composite
def mutated(draw, value):
    """``value`` (a JSON-like structure) with a few random edits: values replaced, keys dropped or added."""
    value = copy.deepcopy(value)
    for _ in range(draw(st.integers(1, 4))):
        containers = [value] if isinstance(value, (dict, list)) else []
        stack = list(containers)
        while stack:
            c = stack.pop()
            for v in (c.values() if isinstance(c, dict) else c):
                if isinstance(v, (dict, list)):
                    containers.append(v)
                    stack.append(v)
        if not containers:
            return draw(json_values)
        c = draw(st.sampled_from(containers))
        if isinstance(c, dict):
            keys = sorted(c, key=str)
            action = draw(st.sampled_from(["replace", "drop", "add"]) if keys else st.just("add"))
            if action == "replace":
                c[draw(st.sampled_from(keys))] = draw(json_values)
            elif action == "drop":
                del c[draw(st.sampled_from(keys))]
            else:
                c[draw(st.text(max_size=8))] = draw(json_values)
        elif c:
            c[draw(st.integers(0, len(c) - 1))] = draw(json_values)
        else:
            c.append(draw(json_values))
    return value


def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_safetensors(header: dict | bytes, body: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


DTYPES = ["F32", "F16", "BF16", "U8", "I8", "I16", "I32", "I64", "F64", "BOOL", "F8_E4M3", "U64", "C64", "XYZ", ""]


@st.composite
def mutated_safetensors(draw, raw: bytes):
    """A safetensors file cut short, with bytes flipped, or with a header whose entries lie."""
    kind = draw(st.sampled_from(["truncate", "flip", "header", "header-entry", "length", "garbage-header"]))
    if kind == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if kind == "flip":
        b = bytearray(raw)
        (n,) = struct.unpack("<Q", raw[:8])
        for _ in range(draw(st.integers(1, 8))):
            # Mostly in the header, where a flipped byte changes the meaning.
            i = draw(st.integers(0, min(len(b), n + 8) - 1) | st.integers(0, len(b) - 1))
            b[i] = draw(st.integers(0, 255))
        return bytes(b)
    header, body = split_safetensors(raw)
    if kind == "header":
        return join_safetensors(draw(mutated(header)), body)
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + raw[8:]
    if kind == "garbage-header":
        return join_safetensors(draw(st.binary(max_size=200)), body)
    names = sorted(k for k in header if k != "__metadata__")
    entry = header[draw(st.sampled_from(names))]
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    if field == "dtype":
        entry["dtype"] = draw(st.sampled_from(DTYPES))
    elif field == "shape":
        entry["shape"] = draw(st.lists(st.integers(-3, 2**40), max_size=4))
    else:
        entry["data_offsets"] = draw(st.lists(st.integers(-5, len(body) + 100), min_size=0, max_size=3))
    return join_safetensors(header, body)


# ------------------------------------------------------------------ fixtures


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("q4") / "ckpt"
    model = qpeft.quantize_model(tiny_llama(), compute_dtype=torch.float32)
    qpeft.save_quantized(model, folder, compute_dtype="float32")
    qpeft.load_quantized(folder)  # the unmutated checkpoint loads
    return folder


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    model.save_pretrained(folder)
    PeftModel.from_pretrained(tiny_llama(), folder)  # the unmutated adapter loads
    return folder


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


_counter = iter(range(10**9))


def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / f"case{next(_counter)}"


# ------------------------------------------------------------------ quantized checkpoints


@fuzz(60)
@given(data=st.data())
def test_fuzz_quantized_safetensors(tmp_path_factory, quantized_dir, data):
    folder = copy_dir(quantized_dir, scratch(tmp_path_factory))
    raw = (quantized_dir / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data.draw(mutated_safetensors(raw)))
    only_documented("quantized checkpoint: model.safetensors", lambda: qpeft.load_quantized(folder))


@fuzz(60)
@given(data=st.data())
def test_fuzz_quant_state_json(tmp_path_factory, quantized_dir, data):
    folder = copy_dir(quantized_dir, scratch(tmp_path_factory))
    tensors = safetensors_torch.load_file(str(quantized_dir / "model.safetensors"))
    key = data.draw(st.sampled_from(sorted(k for k in tensors if ".quant_state." in k)))
    genuine = json.loads(bytes(tensors[key].tolist()))
    if data.draw(st.booleans()):
        blob = json.dumps(data.draw(mutated(genuine))).encode()
    else:
        blob = data.draw(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
    tensors[key] = torch.tensor(list(blob), dtype=torch.uint8)
    if data.draw(st.booleans()):
        # The blob's companions too: wrong dtype or length.
        other = data.draw(st.sampled_from(sorted(k for k in tensors if k.startswith(key.split(".quant_state")[0])
                                                 and ".quant_state." not in k)))
        tensors[other] = data.draw(st.sampled_from([tensors[other][:1].clone(), tensors[other].to(torch.float16),
                                                    torch.zeros(0, dtype=tensors[other].dtype)]))
    safetensors_torch.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    only_documented("quantized checkpoint: quant_state JSON", lambda: qpeft.load_quantized(folder))


@fuzz(40)
@given(data=st.data())
def test_fuzz_quantized_config(tmp_path_factory, quantized_dir, data):
    folder = copy_dir(quantized_dir, scratch(tmp_path_factory))
    config = json.loads((quantized_dir / "config.json").read_text())
    target = data.draw(st.sampled_from(["quantization_config", "model", "bytes"]))
    if target == "quantization_config":
        config["quantization_config"] = data.draw(mutated(config["quantization_config"]))
        text = json.dumps(config).encode()
    elif target == "model":
        # Only the keys that shape the model: others are transformers' to validate.
        key = data.draw(st.sampled_from(["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
                                         "tie_word_embeddings", "architectures"]))
        config[key] = data.draw(st.sampled_from([0, 1, 32, 128, None, True, "x", ["LlamaForCausalLM"], [None]]))
        text = json.dumps(config).encode()
    else:
        text = data.draw(st.binary(max_size=200))
    (folder / "config.json").write_bytes(text)
    only_documented("quantized checkpoint: config.json", lambda: qpeft.load_quantized(folder))


# ------------------------------------------------------------------ adapters


@fuzz(60)
@given(data=st.data())
def test_fuzz_adapter_config(tmp_path_factory, adapter_dir, data):
    folder = copy_dir(adapter_dir, scratch(tmp_path_factory))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if data.draw(st.integers(0, 9)):
        text = json.dumps(data.draw(mutated(config))).encode()
    else:
        text = data.draw(st.binary(max_size=200))
    (folder / "adapter_config.json").write_bytes(text)
    only_documented("adapter: adapter_config.json", lambda: PeftModel.from_pretrained(tiny_llama(), folder))


@fuzz(60)
@given(data=st.data())
def test_fuzz_adapter_weights(tmp_path_factory, adapter_dir, data):
    folder = copy_dir(adapter_dir, scratch(tmp_path_factory))
    raw = (adapter_dir / "adapter_model.safetensors").read_bytes()
    kind = data.draw(st.sampled_from(["bytes", "tensors", "bin"]))
    if kind == "bytes":
        (folder / "adapter_model.safetensors").write_bytes(data.draw(mutated_safetensors(raw)))
    elif kind == "tensors":
        tensors = safetensors_torch.load_file(str(adapter_dir / "adapter_model.safetensors"))
        key = data.draw(st.sampled_from(sorted(tensors)))
        change = data.draw(st.sampled_from(["shape", "dtype", "drop", "rename", "extra"]))
        if change == "shape":
            tensors[key] = torch.zeros(data.draw(st.lists(st.integers(0, 9), max_size=3)))
        elif change == "dtype":
            tensors[key] = tensors[key].to(data.draw(st.sampled_from([torch.float16, torch.int64, torch.bool,
                                                                      torch.uint8, torch.float64])))
        elif change == "drop":
            del tensors[key]
        elif change == "rename":
            tensors[key + data.draw(st.sampled_from([".x", "_", ""]))] = tensors.pop(key)
        else:
            tensors["base_model.model." + data.draw(st.text(max_size=12))] = torch.zeros(2)
        safetensors_torch.save_file(tensors, str(folder / "adapter_model.safetensors"))
    else:
        # PEFT's older format: read with torch.load(weights_only=True), never a full unpickle.
        (folder / "adapter_model.safetensors").unlink()
        (folder / "adapter_model.bin").write_bytes(data.draw(st.binary(max_size=300) | st.sampled_from([
            b"\x80\x04cos\nsystem\nX\x02\x00\x00\x00idR.",  # a pickle that would run a command
            b"PK\x03\x04" + b"\x00" * 40,
        ])))
    only_documented("adapter: weights", lambda: PeftModel.from_pretrained(tiny_llama(), folder))


def test_adapter_bin_is_never_unpickled(tmp_path, adapter_dir):
    """A pickle that would run code when unpickled is refused (weights_only), and nothing runs."""
    import pickle

    folder = copy_dir(adapter_dir, tmp_path / "a")
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"base_model.model.x": Exploit()}, folder / "adapter_model.bin", pickle_module=pickle)
    with pytest.raises(ValueError, match="adapter_model.bin"):
        PeftModel.from_pretrained(tiny_llama(), folder)
    assert not marker.exists()


# ------------------------------------------------------------------ optimizer state


def _trained(cls):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(64, 80))]
    opt = cls(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return params, opt


tensor_values = st.sampled_from([
    torch.zeros(0), torch.zeros(300), torch.zeros(5120), torch.zeros(64, 80), torch.zeros(20), torch.zeros(3, 3),
    torch.zeros(300, dtype=torch.uint8), torch.zeros(5120, dtype=torch.uint8), torch.zeros(300, dtype=torch.int64),
    torch.zeros(300, dtype=torch.float16), torch.tensor(float("nan")), torch.tensor(-3.0), torch.tensor([1.0, 2.0]),
    torch.zeros(300, dtype=torch.bool), torch.zeros(20, dtype=torch.float64),
])


def _first_group(sd):
    """The first param group when an earlier mutation left one that is a non-empty dict, else None."""
    groups = sd.get("param_groups") if isinstance(sd, dict) else None
    if isinstance(groups, list) and groups and isinstance(groups[0], dict) and groups[0]:
        return groups[0]
    return None


@st.composite
def mutated_state_dict(draw, sd):
    sd = copy.deepcopy(sd)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["state-tensor", "state-drop", "step", "group", "ids", "top", "json"]))
        states = sd["state"] if isinstance(sd, dict) and isinstance(sd.get("state"), dict) else {}
        if kind == "state-tensor" and states:
            s = states[draw(st.sampled_from(sorted(states)))]
            if isinstance(s, dict) and s:
                s[draw(st.sampled_from(sorted(s)))] = draw(tensor_values | json_values)
        elif kind == "state-drop" and states:
            s = states[draw(st.sampled_from(sorted(states)))]
            if isinstance(s, dict) and s:
                del s[draw(st.sampled_from(sorted(s)))]
        elif kind == "step" and states:
            s = states[draw(st.sampled_from(sorted(states)))]
            if isinstance(s, dict):
                s["step"] = draw(tensor_values | st.integers(-2, 2**70) | st.floats() | json_values)
        elif kind == "group" and _first_group(sd) is not None:
            g = _first_group(sd)
            key = draw(st.sampled_from(sorted(g)))
            g[key] = draw(json_values | st.sampled_from([(0.9, 0.999, 0.5), (1.5, 0.9), -1.0, float("nan"),
                                                          torch.tensor(1e-3)]))
        elif kind == "ids" and _first_group(sd) is not None:
            _first_group(sd)["params"] = draw(st.lists(st.integers(-1, 3), max_size=3))
        elif kind == "top":
            key = draw(st.sampled_from(["state", "param_groups"]))
            sd[key] = draw(json_values)
        elif kind == "json":
            sd = draw(json_values)
            if not isinstance(sd, dict):
                return sd
    return sd


@pytest.mark.parametrize("cls", [AdamW, AdamW8bit])
def test_fuzz_optimizer_state(cls):
    params, opt = _trained(cls)
    genuine = opt.state_dict()

    @fuzz(120)
    @given(sd=mutated_state_dict(genuine))
    def run(sd):
        fresh_params, fresh = _trained(cls)

        def load_and_step():
            fresh.load_state_dict(sd)
            for p in fresh_params:
                p.grad = torch.randn_like(p)
            fresh.step()

        only_documented(f"optimizer state: {cls.__name__}", load_and_step, allowed=ValueError)

    run()


# ------------------------------------------------------------------ trainer checkpoints


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory):
    """A checkpoint folder as SFTTrainer writes it (its three files), from a real optimizer and scheduler."""
    from qpeft.train.trainer import read_checkpoint

    folder = tmp_path_factory.mktemp("trainer") / "checkpoint"
    folder.mkdir()
    params, opt = _trained(AdamW)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    safetensors_torch.save_file({"a.lora_A.weight": params[0].detach(), "a.lora_B.weight": params[1].detach()},
                                str(folder / "trainable.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state()},
               folder / "state.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"step": 3, "metrics_lines": 3, "before": None,
                                                           "config": {"lr": 0.01}}))
    read_checkpoint(folder)  # the unmutated checkpoint reads
    return folder


@fuzz(60)
@given(data=st.data())
def test_fuzz_trainer_checkpoint(tmp_path_factory, trainer_checkpoint, data):
    from qpeft.train.trainer import read_checkpoint

    folder = copy_dir(trainer_checkpoint, scratch(tmp_path_factory))
    name = data.draw(st.sampled_from(["trainer_state.json", "state.pt", "trainable.safetensors", "missing"]))
    if name == "trainer_state.json":
        genuine = json.loads((trainer_checkpoint / name).read_text())
        (folder / name).write_text(json.dumps(data.draw(mutated(genuine) | json_values)))
    elif name == "state.pt":
        raw = (trainer_checkpoint / name).read_bytes()
        if data.draw(st.booleans()):
            cut = data.draw(st.integers(0, len(raw) - 1))
            raw = raw[:cut] + bytes([data.draw(st.integers(0, 255))]) + raw[cut + 1:]
        else:
            raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
        (folder / name).write_bytes(raw)
    elif name == "trainable.safetensors":
        (folder / name).write_bytes(data.draw(mutated_safetensors((trainer_checkpoint / name).read_bytes())))
    else:
        (folder / data.draw(st.sampled_from(["trainer_state.json", "state.pt", "trainable.safetensors"]))).unlink()
    only_documented("trainer checkpoint", lambda: read_checkpoint(folder))


# ------------------------------------------------------------------ data files


FORMAT = st.sampled_from(D.FORMATS)


def read(path, fmt, skip):
    return lambda: D.read_records(path, fmt, skip_bad=skip)


@fuzz(150)
@given(raw=st.binary(max_size=400), suffix=st.sampled_from([".json", ".jsonl"]), fmt=FORMAT, skip=st.booleans())
def test_fuzz_data_random_bytes(tmp_path_factory, raw, suffix, fmt, skip):
    path = scratch(tmp_path_factory).with_suffix(suffix)
    path.write_bytes(raw)
    only_documented("data: random bytes", read(path, fmt, skip))


@st.composite
def record(draw):
    """A record near one of the formats: the right fields, with random values, some missing, some extra."""
    shapes = [
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"prompt": "2+2=", "completion": "4"},
        {"text": "plain text"},
    ]
    return draw(mutated(draw(st.sampled_from(shapes))) | json_values)


@fuzz(150)
@given(records=st.lists(record(), max_size=6), wrap=st.sampled_from(["array", "data", "jsonl", "bare"]), fmt=FORMAT,
       skip=st.booleans())
def test_fuzz_data_json_structures(tmp_path_factory, records, wrap, fmt, skip):
    path = scratch(tmp_path_factory).with_suffix(".jsonl" if wrap == "jsonl" else ".json")
    if wrap == "jsonl":
        text = "\n".join(json.dumps(r) for r in records)
    elif wrap == "data":
        text = json.dumps({"data": records}, indent=1)
    elif wrap == "array":
        text = json.dumps(records, indent=None if len(records) % 2 else 2)
    else:
        text = json.dumps(records[0] if records else None)
    path.write_text(text)
    only_documented("data: JSON structures", read(path, fmt, skip))


@fuzz(30)
@given(depth=st.integers(1, 200_000), opener=st.sampled_from(["[", '{"a":', '{"messages":[', '[{"text":']),
       suffix=st.sampled_from([".json", ".jsonl"]))
def test_fuzz_data_deep_nesting(tmp_path_factory, depth, opener, suffix):
    path = scratch(tmp_path_factory).with_suffix(suffix)
    path.write_text(opener * depth)
    only_documented("data: deep nesting", read(path, "auto", False))
