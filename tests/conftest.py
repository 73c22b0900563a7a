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
