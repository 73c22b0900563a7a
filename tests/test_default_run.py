"""The default run's path on the real model, shortened: `qpeft train` QLoRA-tunes SmolLM2-135M on the
generated set and held-out exact match and loss improve (issue 6; the full run is scripts/run.sh)."""

from __future__ import annotations

import json

import pytest

from qpeft import hf

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def test_short_default_run_improves_held_out_accuracy(tmp_path, capsys):
    try:
        hf.default_model_path()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"default model not installed: {e}")
    from qpeft.cli import main

    out = tmp_path / "run"
    code = main(["train", "--max-steps", "40", "--n-train", "400", "--n-eval", "27", "--eval-examples", "27",
                 "--max-new-tokens", "24", "--save-every", "20", "--out-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads((out / "summary.json").read_text())
    print(summary)
    assert summary["eval_loss_after"] < 0.5 * summary["eval_loss_before"]
    assert summary["accuracy_after"] >= summary["accuracy_before"] + 0.1
    assert "held-out exact match" in printed
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16

    # Acceptance 6: Hugging Face PEFT loads the adapter onto the transformers
    # model (its NF4 weights, dequantized) and generates what `qpeft generate` does.
    peft = pytest.importorskip("peft")
    import torch
    import transformers

    from qpeft import dequantize_model, quantize_model
    from qpeft.data import Example, prompt_text
    from qpeft.train.inference import generate_text, load_adapter_model

    ours, tok, settings = load_adapter_model(str(out / "adapter"), compute_dtype="float32")
    folder = hf._cached_gguf(hf.default_model_path(), hf.cache_root())
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    base = dequantize_model(quantize_model(base, compute_dtype=torch.float32))
    theirs = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    held = [json.loads(line) for line in (out / "data" / "eval.jsonl").read_text().splitlines()][:6]
    for rec in held:
        text = generate_text(ours, tok, rec["instruction"], rec["input"], settings["template"], 24, stream=False)
        prompt = prompt_text(Example.from_instruction(rec["instruction"], "", rec["input"]), "course", tok)
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = theirs.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
        assert tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True) == text, rec
