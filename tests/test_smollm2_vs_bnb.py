"""SmolLM2-135M quantized by qpeft against transformers + bitsandbytes (issue 3, acceptance 1).

Both sides start from the same safetensors copy of the default model. On the
bitsandbytes side its bfloat16 AVX512-BF16 kernel is switched off where the
comparison is in float32 (see tests/test_checkpoint.py's docstring): the point
is to compare the quantization and the matmul, not bitsandbytes' two CPU paths.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import qpeft
from qpeft import Linear4bit, hf, quantize_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Write a haiku about autumn leaves.",
    "def fibonacci(n):",
    "Translate to German: good morning, how are you?",
    "List three prime numbers greater than 20:",
    "Once upon a time, in a small village,",
    "What is 17 times 23?",
    "Sort these words alphabetically: pear, apple, fig",
]


@pytest.fixture(scope="module")
def bnb():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = pytest.importorskip("bitsandbytes")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return module


@pytest.fixture(scope="module")
def folder():
    try:
        gguf = hf.default_model_path()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"default model not installed: {e}")
    hf.load_model(gguf)  # converts to the cache on first use
    return hf._cached_gguf(gguf, hf.cache_root())


@pytest.fixture(scope="module")
def batch(folder):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok(PROMPTS, return_tensors="pt", padding=True)


def _theirs(folder, bnb, double_quant: bool, compute_dtype: torch.dtype, dtype: torch.dtype, exact: bool):
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, device_map="cpu", dtype=dtype)
    if exact:
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
    return model.eval()


def _ours(folder, double_quant: bool, compute_dtype: torch.dtype, dtype: torch.dtype):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return quantize_model(model.eval(), quant_type="nf4", double_quant=double_quant,
                          compute_dtype=compute_dtype)


def _last_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits[:, -1].float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _layers(theirs, ours, bnb):
    their_layers = {n: m for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    our_layers = {n: m for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    assert set(their_layers) == set(our_layers) and len(our_layers) == 30 * 7
    return [(name, their_layers[name], m) for name, m in our_layers.items()]


def test_fp32_logits_match_bitsandbytes(folder, batch, bnb):
    theirs = _theirs(folder, bnb, False, torch.float32, torch.float32, exact=True)
    ours = _ours(folder, False, torch.float32, torch.float32)
    for name, their, our in _layers(theirs, ours, bnb):
        assert torch.equal(their.weight.data.view(torch.uint8).reshape(-1), our.weight.reshape(-1)), name
        assert torch.equal(their.weight.quant_state.absmax, our.quant_state.absmax), name

    expected, got = _last_logits(theirs, batch), _last_logits(ours, batch)
    assert _rel(got, expected) <= 1e-5


def test_fp32_double_quant_logits_match_bitsandbytes(folder, batch, bnb):
    """Packed bytes are identical; the 8-bit codes of the scales follow bitsandbytes'
    CUDA rule (nearest code), which its approximate CPU encoder misses for a few
    near-ties (issue 2). The logits differ only through those codes: with
    bitsandbytes' codes substituted they agree to 1e-5."""
    theirs = _theirs(folder, bnb, True, torch.float32, torch.float32, exact=True)
    ours = _ours(folder, True, torch.float32, torch.float32)
    plain = dict(_ours(folder, False, torch.float32, torch.float32).named_modules())
    differing = total = 0
    for name, their, our in _layers(theirs, ours, bnb):
        assert torch.equal(their.weight.data.view(torch.uint8).reshape(-1), our.weight.reshape(-1)), name
        ts, qs = their.weight.quant_state, our.quant_state
        assert torch.equal(ts.offset, qs.offset) and torch.equal(ts.state2.absmax, qs.state2.absmax), name
        # The value both encoders saw, and the code values each chose for it.
        blocks = torch.arange(qs.absmax.numel()) // qs.state2.blocksize
        x = (plain[name].quant_state.absmax - qs.offset) / qs.state2.absmax[blocks]
        code = qs.state2.code
        ours_err = (code[qs.absmax.long()] - x).abs()
        theirs_err = (code[ts.absmax.long()] - x).abs()
        assert (ours_err <= theirs_err).all(), f"{name}: qpeft's nested code is not the nearest"
        differing += int((ts.absmax != qs.absmax).sum())
        total += qs.absmax.numel()
    expected, got = _last_logits(theirs, batch), _last_logits(ours, batch)
    raw = _rel(got, expected)
    print(f"\nnested codes that differ from bitsandbytes' CPU encoder: {differing} of {total}; "
          f"last-token logits relative difference {raw:.2e}")
    assert differing <= 5e-3 * total
    assert raw <= 2.5e-3
    assert torch.equal(got.argmax(-1), expected.argmax(-1))

    for _, their, our in _layers(theirs, ours, bnb):
        our.quant_state.absmax.copy_(their.weight.quant_state.absmax)
    assert _rel(_last_logits(ours, batch), expected) <= 1e-5


def _greedy(model, batch):
    """Greedy 32-token continuations and the logits each step chose from."""
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=32, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=batch["input_ids"][0, 0].item())
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits, 1).float()


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.floor(torch.log2(x.abs())) - 7)


def test_bf16_greedy_continuations_match_bitsandbytes(folder, batch, bnb, monkeypatch):
    """Same quantization and the same matmul (dequantize, bf16 ``F.linear``):
    the same 32 tokens for every prompt. (The default paths differ from it in
    the order of additions only: the fused decode kernel, and on a CPU without
    bf16 hardware the float32 matmul of widened bf16 values; the next test
    holds them to that.)"""
    theirs = _theirs(folder, bnb, False, torch.bfloat16, torch.bfloat16, exact=True)
    ours = _ours(folder, False, torch.bfloat16, torch.bfloat16)
    expected, _ = _greedy(theirs, batch)
    monkeypatch.setattr(qpeft.functional, "GEMV_MAX_TOKENS", 0)
    monkeypatch.setattr(qpeft.functional, "WIDEN_16BIT_ON_CPU", False)
    got, _ = _greedy(ours, batch)
    assert expected.shape == (len(PROMPTS), 32)
    assert torch.equal(got, expected)


def test_bf16_fused_decode_departs_from_bitsandbytes_only_at_ties(folder, batch, bnb):
    """With double quantization and qpeft's default paths -- the fused decode
    kernel (float32 accumulation of unrounded weights) and, on a CPU without
    bf16 hardware, the prompt's float32 matmul of widened bf16 weights -- the
    arithmetic differs from bitsandbytes' bf16 matmul. SmolLM2's bf16 logits often tie exactly, so a
    continuation may take the other of two tied tokens (bitsandbytes' own two
    CPU paths do the same to each other); everywhere else it must agree."""
    theirs = _theirs(folder, bnb, True, torch.bfloat16, torch.bfloat16, exact=True)
    ours = _ours(folder, True, torch.bfloat16, torch.bfloat16)
    expected, their_logits = _greedy(theirs, batch)
    got, our_logits = _greedy(ours, batch)
    same = 0
    for i in range(len(PROMPTS)):
        differ = (got[i] != expected[i]).nonzero()
        if len(differ) == 0:
            same += 1
            continue
        step = int(differ[0])
        a, b = int(expected[i, step]), int(got[i, step])
        # Both models saw the same tokens so far; each must rank the other's choice
        # within two bf16 steps of its own.
        for logits, mine, other in ((their_logits, a, b), (our_logits, b, a)):
            row = logits[i, step]
            assert row[mine] - row[other] <= 2 * _bf16_ulp(row[mine]), (PROMPTS[i], step)
    print(f"\nprompts with identical 32-token continuations: {same} of {len(PROMPTS)}")
    assert same >= 3
