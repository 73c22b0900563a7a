"""qpeft.train: config, the training loop, checkpoints and exact resume, divergence, the CLI (issue 6)."""

from __future__ import annotations

import json

import pytest
import torch

from qpeft.train import SFTTrainer, TrainConfig, TrainingDiverged, write_curve_png

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _tiny(tok, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


def _cfg(tmp_path, **kw):
    base = dict(n_train=48, n_eval=8, eval_examples=2, max_new_tokens=2, max_steps=6, batch_size=4, warmup_steps=2,
                save_every=2, eval_every=0, lr=1e-2, out_dir=str(tmp_path / "run"), compute_dtype="float32")
    return TrainConfig(**{**base, **kw})


def _adapter(run_dir):
    return safetensors_torch.load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def test_config_validation_and_files(tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="full")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown training settings \\['bogus'\\]"):
        TrainConfig.from_dict({"bogus": 1})
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"max_steps": 7, "data": "x.jsonl"}))
    cfg = TrainConfig.from_file(path)
    assert cfg.max_steps == 7 and cfg.data == ["x.jsonl"]
    path.write_text("{nope")
    with pytest.raises(ValueError, match="c.json:1: invalid JSON"):
        TrainConfig.from_file(path)


def test_recompute_mlp_setting_resolves_per_dtype():
    with pytest.raises(ValueError, match="recompute_mlp must be one of"):
        TrainConfig(recompute_mlp="yes")
    auto = TrainConfig()
    assert auto.recomputes_mlp(torch.bfloat16) and auto.recomputes_mlp(torch.float16)
    assert not auto.recomputes_mlp(torch.float32)
    assert TrainConfig(recompute_mlp="on").recomputes_mlp(torch.float32)
    assert not TrainConfig(recompute_mlp="off").recomputes_mlp(torch.bfloat16)
    # Whole-layer checkpointing recomputes the block anyway.
    assert not TrainConfig(recompute_mlp="on", gradient_checkpointing=True).recomputes_mlp(torch.bfloat16)
    # Heap trims inside the step go with the memory-lean setting (and with checkpointing).
    assert auto.trims_heap_in_step(torch.bfloat16) and not auto.trims_heap_in_step(torch.float32)
    assert TrainConfig(recompute_mlp="on").trims_heap_in_step(torch.float32)
    assert not TrainConfig(recompute_mlp="off").trims_heap_in_step(torch.bfloat16)
    assert TrainConfig(gradient_checkpointing=True).trims_heap_in_step(torch.float32)


def test_trainer_trims_after_every_step_only_where_it_trims_inside_steps():
    from qpeft.train.heap import TrimOnGrowth, release_free_memory
    from qpeft.train.trainer import heap_trim_after_step

    assert heap_trim_after_step(TrainConfig(), torch.bfloat16) is release_free_memory
    assert heap_trim_after_step(TrainConfig(gradient_checkpointing=True), torch.float32) is release_free_memory
    assert isinstance(heap_trim_after_step(TrainConfig(), torch.float32), TrimOnGrowth)
    assert isinstance(heap_trim_after_step(TrainConfig(recompute_mlp="off"), torch.bfloat16), TrimOnGrowth)
    assert isinstance(heap_trim_after_step(TrainConfig(fast_path=False), torch.bfloat16), TrimOnGrowth)


def test_heap_is_trimmed_after_a_step_only_when_the_process_grew(monkeypatch):
    from qpeft.train import heap

    rss = [1000 << 20]
    trims = []
    monkeypatch.setattr(heap, "statm_resident_bytes", lambda: rss[0])
    monkeypatch.setattr(heap, "release_free_memory", lambda: trims.append(rss[0]))
    trim = heap.TrimOnGrowth(slack_fraction=1 / 16, min_slack=16 << 20)
    assert trim() and len(trims) == 1  # the first step: what loading left behind
    assert not trim()  # the next one sets the reference: 1000 MB
    for mb in (1000, 1040, 1062, 990):  # within 1/16 (62.5 MB) of it: freed blocks stay for the next step
        rss[0] = mb << 20
        assert not trim()
    rss[0] = 1063 << 20
    assert trim() and len(trims) == 2  # grown past the slack: trimmed
    rss[0] = 1100 << 20
    assert not trim()  # a new reference after a trim
    rss[0] = 1168 << 20
    assert not trim()
    rss[0] = 1169 << 20
    assert trim() and len(trims) == 3
    # The floor of the slack applies to small processes.
    small = heap.TrimOnGrowth(slack_fraction=1 / 16, min_slack=16 << 20)
    rss[0] = 10 << 20
    small(), small()
    rss[0] = 26 << 20
    assert not small()
    rss[0] = (26 << 20) + 1
    assert small()
    # Where resident memory cannot be read, every step trims.
    monkeypatch.setattr(heap, "statm_resident_bytes", lambda: None)
    blind = heap.TrimOnGrowth()
    assert all(blind() for _ in range(3))
    with pytest.raises(ValueError, match="slack_fraction"):
        heap.TrimOnGrowth(slack_fraction=float("nan"))


@pytest.mark.parametrize("setting", ["auto", "on", "off"])
def test_build_model_and_plan_follow_recompute_mlp(tok, setting, monkeypatch):
    from qpeft.train import fastpath
    from qpeft.train import trainer as trainer_module
    from qpeft.train.plan import plan_memory
    from qpeft.train.trainer import build_model

    monkeypatch.setattr(trainer_module, "TRIM_EVERY", 1)  # the tiny model has two layers
    cfg = TrainConfig(compute_dtype="float32", recompute_mlp=setting, lora_r=4)
    model, _ = build_model(cfg, torch.float32, model=_tiny(tok), tokenizer=tok)
    recomputed = [getattr(layer.mlp.forward, "__func__", None) is fastpath._recomputed_mlp_forward
                  for layer in model.get_base_model().model.layers]
    assert recomputed == [setting == "on"] * 2
    # In-step heap trims come with recomputation (float32 "auto" keeps blocks and skips them).
    trims = ["_qpeft_trim" in layer.__dict__ for layer in model.get_base_model().model.layers]
    assert any(trims) == (setting == "on")
    plan = plan_memory(TrainConfig(compute_dtype="float32", recompute_mlp=setting), baseline=0.0)
    notes = " ".join(plan.notes)
    if setting == "on":
        assert "one layer recomputed in backward" in plan.items and "recomputed in backward" in notes
    else:
        assert "one layer recomputed in backward" not in plan.items and "kept for backward" in notes
    # Keeping the blocks costs more activation memory than it saves in recompute scratch.
    on = plan_memory(TrainConfig(compute_dtype="float32", recompute_mlp="on"), baseline=0.0)
    off = plan_memory(TrainConfig(compute_dtype="float32", recompute_mlp="off"), baseline=0.0)
    assert off.train_peak > on.train_peak


@pytest.mark.parametrize("method", ["qlora", "lora", "adapter"])
def test_a_short_run_writes_everything(tok, tmp_path, method):
    cfg = _cfg(tmp_path, method=method)
    trainer = SFTTrainer(cfg, model=_tiny(tok), tokenizer=tok, progress=lambda r: None)
    summary = trainer.train()
    run = tmp_path / "run"
    assert summary["steps"] == 6 and summary["accuracy_before"] is not None
    for name in ("metrics.jsonl", "summary.json", "config.json", "loss.png", "data/train.jsonl", "data/eval.jsonl",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/README.md",
                 "checkpoint/trainable.safetensors", "checkpoint/state.pt", "checkpoint/trainer_state.json"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    losses = _losses(run)
    assert len(losses) == 6 and all(l == l for l in losses)
    peft_type = json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"]
    assert peft_type == ("QPEFT_BOTTLENECK" if method == "adapter" else "LORA")
    assert not list(run.glob(".*tmp*"))
    if method in ("qlora", "adapter"):
        from qpeft import Linear4bit
        assert any(isinstance(m, Linear4bit) for m in trainer.model.modules())


def test_training_reduces_the_loss(tok, tmp_path):
    # The same 8 examples every step: the adapter must fit them. (With its random
    # output head, the tiny model learns fast only with LoRA on the head too.)
    cfg = _cfg(tmp_path, max_steps=20, save_every=0, eval_examples=0, lr=5e-2, n_train=8, batch_size=8,
               warmup_steps=0, lora_dropout=0.0, target_modules=["lm_head", "down_proj"])
    SFTTrainer(cfg, model=_tiny(tok), tokenizer=tok, progress=lambda r: None).train()
    losses = _losses(tmp_path / "run")
    assert losses[-1] < 0.5 * losses[0], losses


class _Stop(Exception):
    pass


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_resume_continues_exactly(tok, tmp_path, packing):
    full = _cfg(tmp_path / "a", packing=packing, lora_dropout=0.1)
    SFTTrainer(full, model=_tiny(tok), tokenizer=tok, progress=lambda r: None).train()

    def crash(record):
        if record["step"] == 5:
            raise _Stop  # after step 5 ran, before its checkpoint: step 4's is the latest
    broken = _cfg(tmp_path / "b", packing=packing, lora_dropout=0.1)
    with pytest.raises(_Stop):
        SFTTrainer(broken, model=_tiny(tok), tokenizer=tok, progress=crash).train()
    assert json.loads((tmp_path / "b" / "run" / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    resumed = _cfg(tmp_path / "b", packing=packing, lora_dropout=0.1, resume=True)
    SFTTrainer(resumed, model=_tiny(tok), tokenizer=tok, progress=lambda r: None).train()

    a, b = _adapter(tmp_path / "a" / "run"), _adapter(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)
    assert _losses(tmp_path / "a" / "run") == _losses(tmp_path / "b" / "run")


def test_resume_rejects_a_checkpoint_of_other_settings(tok, tmp_path):
    SFTTrainer(_cfg(tmp_path, max_steps=2), model=_tiny(tok), tokenizer=tok, progress=lambda r: None).train()
    with pytest.raises(ValueError, match="different trainable weights"):
        SFTTrainer(_cfg(tmp_path, max_steps=4, lora_r=4, resume=True), model=_tiny(tok), tokenizer=tok,
                   progress=lambda r: None).train()


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tok, tmp_path, monkeypatch):
    from qpeft.train import trainer as T

    real = T.token_loss_sum
    calls = {"n": 0}

    def poisoned(model, batch):
        loss, n = real(model, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 3 else loss), n
    monkeypatch.setattr(T, "token_loss_sum", poisoned)
    cfg = _cfg(tmp_path, eval_examples=0)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 4"):
        SFTTrainer(cfg, model=_tiny(tok), tokenizer=tok, progress=lambda r: None).train()
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2
    weights = safetensors_torch.load_file(str(tmp_path / "run" / "checkpoint" / "trainable.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_user_data_files_and_bad_records(tok, tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"Say {w}.", "output": w} for w in ["a", "b", "c", "d", "e", "f"] * 3]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    with pytest.raises(ValueError, match="d.jsonl:19: invalid JSON"):
        SFTTrainer(_cfg(tmp_path, data=[str(data)]), model=_tiny(tok), tokenizer=tok)
    cfg = _cfg(tmp_path, data=[str(data)], skip_bad=True, max_steps=2, eval_examples=2)
    summary = SFTTrainer(cfg, model=_tiny(tok), tokenizer=tok, progress=lambda r: None).train()
    assert summary["steps"] == 2


def test_cli_train_with_a_config_file(tok, tmp_path, capsys):
    from qpeft.cli import main

    folder = tmp_path / "tiny"
    _tiny(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"max_steps": 2, "n_train": 16, "n_eval": 4, "eval_examples": 2, "max_new_tokens": 2,
                                "batch_size": 4, "compute_dtype": "float32"}))
    code = main(["train", "--config", str(conf), "--model", str(folder), "--out-dir", str(tmp_path / "out"),
                 "--lora-r", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "held-out exact match" in out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["lora_r"] == 4
    assert main(["train", "--method", "full"]) != 0

    assert main(["plan", "--config", str(conf), "--model", str(folder), "--lora-r", "4"]) == 0
    planned = capsys.readouterr().out
    assert "planned peak resident memory" in planned and "adapter (fp32)" in planned

    # The adapter remembers its base model, method and template.
    adapter = tmp_path / "out" / "adapter"
    info = json.loads((adapter / "qpeft.json").read_text())
    assert info == {"model": str(folder), "method": "qlora", "compute_dtype": "float32", "template": "course"}
    assert main(["generate", "--adapter", str(adapter), "--prompt", "Say hi.", "--max-new-tokens", "3"]) == 0
    result = tmp_path / "eval.json"
    assert main(["eval", "--adapter", str(adapter), "--data", str(tmp_path / "out" / "data" / "eval.jsonl"),
                 "--limit", "2", "--max-new-tokens", "2", "--json", str(result)]) == 0
    assert json.loads(result.read_text())["total"] == 2
    assert "exact match" in capsys.readouterr().out
    assert main(["generate", "--adapter", str(tmp_path), "--prompt", "x"]) == 1

    # Merged exactly into a dense model: same logits as base + adapter.
    from qpeft import load_quantized
    from qpeft.train.inference import load_adapter_model

    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "dense")]) == 0
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "q4"), "--requantize"]) == 0
    assert "re-quantization added relative error" in capsys.readouterr().out
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "dense")]) == 1  # not empty
    ids = torch.randint(0, len(tok), (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load_adapter_model(str(adapter))[0](ids).logits
        dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")(ids).logits
        q4 = load_quantized(tmp_path / "q4")[0](ids).logits
    torch.testing.assert_close(dense, ref, rtol=1e-4, atol=1e-4)
    assert ((q4 - ref).norm() / ref.norm()).item() < 0.2


def test_curve_png(tmp_path):
    p = write_curve_png(tmp_path / "c.png", [1, 2, 3], {"loss": [3.0, float("nan"), 1.0]})
    data = p.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" in data[-12:]


def test_leftovers_of_a_killed_checkpoint_swap_are_tidied(tok, tmp_path):
    SFTTrainer(_cfg(tmp_path, max_steps=2), model=_tiny(tok), tokenizer=tok, progress=lambda r: None).train()
    run = tmp_path / "run"
    # Killed between the two renames of a checkpoint swap, with a half-written folder beside it.
    (run / "checkpoint").rename(run / ".checkpoint.old-123")
    (run / ".checkpoint.tmp-abc").mkdir()
    (run / ".checkpoint.tmp-abc" / "state.pt").write_bytes(b"partial")
    SFTTrainer(_cfg(tmp_path, max_steps=4, resume=True), model=_tiny(tok), tokenizer=tok,
               progress=lambda r: None).train()
    assert len(_losses(run)) == 4
    assert not list(run.glob(".checkpoint*"))


@pytest.mark.parametrize("kind", ["adamw", "adamw8bit"])
def test_paged_optimizer_trains_like_the_unpaged_one_and_resumes(tok, tmp_path, kind):
    """The trainer's paged optimizers (a budget far below the state) give the unpaged run's adapter
    bit for bit, also across a crash and resume, and leave no state file behind."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    plain = _cfg(tmp_path / "a", optimizer=kind)
    SFTTrainer(plain, model=_tiny(tok), tokenizer=tok, progress=lambda r: None).train()

    def crash(record):
        if record["step"] == 5:
            raise _Stop
    paged = dict(optimizer=f"paged_{kind}", optimizer_resident_mb=1, optimizer_state_dir=str(state_dir))
    with pytest.raises(_Stop):
        SFTTrainer(_cfg(tmp_path / "b", **paged), model=_tiny(tok), tokenizer=tok, progress=crash).train()
    trainer = SFTTrainer(_cfg(tmp_path / "b", resume=True, **paged), model=_tiny(tok), tokenizer=tok,
                         progress=lambda r: None)
    trainer.train()
    a, b = _adapter(tmp_path / "a" / "run"), _adapter(tmp_path / "b" / "run")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(tmp_path / "a" / "run") == _losses(tmp_path / "b" / "run")
    trainer.optimizer.close()
    import gc

    gc.collect()
    assert list(state_dir.iterdir()) == []
