"""functional.lora_matmul_4bit: a LoRA matmul on a 4-bit weight dequantized straight into the augmented matrix."""

from __future__ import annotations

import pytest
import torch

from qpeft import functional as F


def _case(n: int, k: int, r: int, blocksize: int, nested: bool, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested)
    x = torch.randn(37, k, generator=g).to(dtype)
    A = torch.randn(r, k, generator=g) * 0.1
    B = torch.randn(n, r, generator=g) * 0.1
    return x, packed, state, A, B


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,r,blocksize,nested", [(48, 128, 8, 64, True), (33, 256, 1, 128, False),
                                                     (16, 64, 16, 64, True), (5, 512, 3, 256, True)])
def test_equals_lora_matmul_on_the_dequantized_weight(dtype, n, k, r, blocksize, nested):
    x, packed, state, A, B = _case(n, k, r, blocksize, nested, dtype)
    dense = F.dequantize_4bit(packed, state).to(dtype)
    want_y, want_h = F.lora_matmul(x, dense, A, B, 2.0)
    y, h, W = F.lora_matmul_4bit(x, packed, state, A, B, 2.0)
    assert torch.equal(y, want_y) and torch.equal(h, want_h)
    assert torch.equal(W, dense)


def test_two_slots_hold_two_weights_at_once():
    x, p0, s0, A0, B0 = _case(40, 192, 8, 64, True, torch.bfloat16, seed=1)
    _, p1, s1, A1, B1 = _case(40, 192, 4, 64, True, torch.bfloat16, seed=2)
    _, _, W0 = F.lora_matmul_4bit(x, p0, s0, A0, B0, 1.0, 0)
    y1, _, W1 = F.lora_matmul_4bit(x, p1, s1, A1, B1, 0.5, 1)
    assert torch.equal(W0, F.dequantize_4bit(p0, s0).to(torch.bfloat16))
    assert torch.equal(W1, F.dequantize_4bit(p1, s1).to(torch.bfloat16))
    assert torch.equal(y1, F.lora_matmul(x, W1.clone(), A1, B1, 0.5)[0])


def test_a_smaller_rank_after_a_larger_one_reads_no_stale_columns():
    x, packed, state, A, B = _case(24, 128, 16, 64, False, torch.bfloat16, seed=3)
    F.lora_matmul_4bit(x, packed, state, A, B, 1.0)
    y, _, _ = F.lora_matmul_4bit(x, packed, state, A[:2], B[:, :2], 1.0)
    dense = F.dequantize_4bit(packed, state).to(torch.bfloat16)
    assert torch.equal(y, F.lora_matmul(x, dense, A[:2], B[:, :2], 1.0)[0])


@pytest.mark.parametrize("k,dtype", [(96, torch.bfloat16), (128, torch.float32)])
def test_other_shapes_and_dtypes_fall_back_to_a_fresh_weight(k, dtype):
    # k not a multiple of the block size, or float32 (no augmented matrix).
    x, packed, state, A, B = _case(12, k, 4, 64, True, dtype, seed=4)
    dense = F.dequantize_4bit(packed, state).to(dtype)
    y, h, W = F.lora_matmul_4bit(x, packed, state, A, B, 2.0)
    want_y, want_h = F.lora_matmul(x, dense, A, B, 2.0)
    assert torch.equal(y, want_y) and torch.equal(h, want_h) and torch.equal(W, dense)


def test_matches_the_augmented_product_written_out_and_keeps_autograd():
    x, packed, state, A, B = _case(20, 128, 8, 64, True, torch.bfloat16, seed=5)
    dense = F.dequantize_4bit(packed, state).to(torch.bfloat16)
    h = x @ A.to(torch.bfloat16).t()
    want = torch.cat([x, h], 1) @ torch.cat([dense, (B * 0.5).to(torch.bfloat16)], 1).t()
    y, _, _ = F.lora_matmul_4bit(x, packed, state, A, B, 0.5)
    assert torch.equal(y, want)
    # Under autograd the input is a fresh tensor the matmul may keep: gradients flow.
    xg = x.clone().requires_grad_()
    yg, _ = F.lora_matmul(xg, dense, A, B, 0.5)
    assert torch.equal(yg.detach(), want)
    yg.float().sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape
