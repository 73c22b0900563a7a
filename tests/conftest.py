"""Shared fixtures: oracles are test-only dependencies and skip cleanly if absent."""

import logging
import warnings

import pytest
import torch


@pytest.fixture(scope="session")
def bnb():
    """bitsandbytes.functional, the byte-level oracle (CPU)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F = pytest.importorskip("bitsandbytes.functional")
    return F


def make_input(dist: str, shape, dtype, seed: int = 0) -> torch.Tensor:
    """Test weights of a named distribution."""
    g = torch.Generator().manual_seed(seed)
    if dist == "normal":
        x = torch.randn(shape, generator=g) * 0.02
    elif dist == "uniform":
        x = torch.rand(shape, generator=g) * 2 - 1
    elif dist == "heavy":
        # Student-t with 2 degrees of freedom: occasional huge outliers per block.
        z = torch.randn(shape, generator=g)
        chi = (torch.randn(shape, generator=g) ** 2 + torch.randn(shape, generator=g) ** 2) / 2
        x = z / chi.sqrt().clamp(min=1e-3)
    elif dist == "zero":
        x = torch.zeros(shape)
    else:
        raise ValueError(dist)
    return x.to(dtype)


@pytest.fixture(scope="session")
def tok():
    """The default model's tokenizer (SmolLM2), read from qpeft's local cache."""
    transformers = pytest.importorskip("transformers")
    from qpeft import hf

    try:
        folder = hf.model_folder()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"default model not installed: {e}")
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def tiny_llama_dir(tmp_path, tok):
    """A folder with a randomly initialised 2-layer Llama (SmolLM2's vocabulary) and the tokenizer."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=True)
    folder = tmp_path / "tiny"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
