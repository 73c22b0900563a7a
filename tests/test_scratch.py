"""Scratch buffers (qpeft._scratch) and the ``out=`` arguments the trainer's fast path writes through:
the same values as fresh tensors, and nothing a later call overwrites leaks into a result."""

from __future__ import annotations

import threading

import pytest
import torch

from qpeft import _scratch
from qpeft import functional as F
from qpeft._scratch import scratch


def test_scratch_is_reused_grown_and_separate_per_key_and_thread():
    a = scratch(("test", 0), (4, 8), torch.float32, "cpu")
    b = scratch(("test", 0), (2, 8), torch.float32, "cpu")
    assert a.shape == (4, 8) and b.shape == (2, 8) and a.is_contiguous()
    assert a.data_ptr() == b.data_ptr()  # the same pages, call after call
    assert scratch(("test", 1), (2, 8), torch.float32, "cpu").data_ptr() != a.data_ptr()
    big = scratch(("test", 0), (64, 64), torch.float32, "cpu")  # grows when too small
    assert big.shape == (64, 64) and big.numel() == 4096
    assert scratch(("test", 0), (3,), torch.bfloat16, "cpu").dtype == torch.bfloat16  # a new dtype: a new buffer
    other = []
    t = threading.Thread(target=lambda: other.append(scratch(("test", 0), (64, 64), torch.float32, "cpu").data_ptr()))
    t.start(), t.join()
    assert other[0] != scratch(("test", 0), (64, 64), torch.float32, "cpu").data_ptr()


def test_scratch_off_the_cpu_is_a_fresh_tensor():
    a = scratch(("test", "meta"), (4, 4), torch.float32, "meta")
    assert a.device.type == "meta" and a.shape == (4, 4)
    assert ("test", "meta") not in getattr(_scratch._local, "bufs", {})


def _case(n, k, r, dtype, tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    packed, state = F.quantize_4bit(torch.randn(n, k, generator=g), blocksize=64, compress_statistics=True)
    x = torch.randn(tokens, k, generator=g).to(dtype)
    A = torch.randn(r, k, generator=g) * 0.1
    B = torch.randn(n, r, generator=g) * 0.1
    return x, packed, state, A, B


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [3, 80])  # the fused gemv kernel, and dequantize + matmul
def test_lora_matmuls_write_the_same_values_to_out(dtype, tokens):
    x, packed, state, A, B = _case(96, 128, 4, dtype, tokens)
    y, h = F.linear_4bit_lora(x, packed, state, A, B, 0.5)
    out = torch.full_like(y, float("nan"))
    y2, h2 = F.linear_4bit_lora(x, packed, state, A, B, 0.5, out=out)
    assert y2.data_ptr() == out.data_ptr() and torch.equal(y2, y) and torch.equal(h2, h)
    y, h, W = F.lora_matmul_4bit(x, packed, state, A, B, 0.5, 1)
    y = y.clone()
    out = torch.full_like(y, float("nan"))
    y2, h2, W2 = F.lora_matmul_4bit(x, packed, state, A, B, 0.5, 1, out=out)
    assert y2.data_ptr() == out.data_ptr() and torch.equal(y2, y) and torch.equal(h2, h) and torch.equal(W2, W)
    dy = torch.randn(tokens, 96).to(dtype)
    want = F.grad_input_4bit(dy, packed, state)
    out = torch.full_like(want, float("nan"))
    assert torch.equal(F.grad_input_4bit(dy, packed, state, out=out), want) and torch.equal(out, want)


def test_products_under_autograd_leave_the_scratch_buffers_clean():
    """lora_matmul keeps autograd (its product may be recorded); that must not tie a scratch buffer
    into the graph, where a later call with ``out=`` (or a later overwrite) would break it."""
    x, packed, state, A, B = _case(24, 128, 4, torch.bfloat16, 80)
    dense = F.dequantize_4bit(packed, state).to(torch.bfloat16)
    Bg = B.clone().requires_grad_()
    xg = x.clone().requires_grad_()
    yg, _ = F.lora_matmul(xg, dense, A, Bg, 0.5)
    yg.float().sum().backward()
    assert xg.grad is not None and Bg.grad is not None
    bufs = _scratch._local.bufs
    assert not any(b is not None and b.requires_grad for b in bufs.values())
    want, _ = F.linear_4bit_lora(x, packed, state, A, B, 0.5)
    out = torch.empty_like(want)
    with torch.enable_grad():
        got, _ = F.linear_4bit_lora(xg, packed, state, A, Bg, 0.5, out=out)
        dg = F.grad_input_4bit(want.requires_grad_(), packed, state, out=torch.empty_like(x))
    assert got is out and not got.requires_grad and torch.equal(got, want) and not dg.requires_grad
    assert not any(b is not None and b.requires_grad for b in bufs.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])  # float64: the torch path
def test_swiglu_backward_writes_the_same_values_to_out(dtype):
    g = torch.Generator().manual_seed(3)
    gate, up, dy = (torch.randn(5, 33, generator=g).to(dtype) for _ in range(3))
    want = F.swiglu_backward(gate, up, dy)
    out = (torch.full_like(gate, float("nan")), torch.full_like(up, float("nan")))
    got = F.swiglu_backward(gate, up, dy, out=out)
    assert got[0].data_ptr() == out[0].data_ptr() and got[1].data_ptr() == out[1].data_ptr()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="contiguous tensors of the gate's shape"):
        F.swiglu_backward(gate, up, dy, out=(torch.empty(5, 32, dtype=dtype), out[1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_cross_entropy_grad_writes_the_same_gradient_to_out(dtype):
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(7, 50, generator=g) * 3).to(dtype)
    t = torch.tensor([0, 49, -100, 3, 3, 17, 8])
    loss, lse, grad = F.cross_entropy_grad(logits, t)
    out = torch.full_like(logits, float("nan"))
    loss2, lse2, grad2 = F.cross_entropy_grad(logits, t, out=out)
    assert grad2.data_ptr() == out.data_ptr()
    assert torch.equal(grad2, grad) and torch.equal(loss2, loss) and torch.equal(lse2, lse)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        F.cross_entropy_grad(logits, t, out=torch.empty(50, 7, dtype=dtype).t())


@pytest.mark.parametrize("recompute_mlp", [True, False])
def test_fast_path_step_is_the_same_with_fresh_tensors_for_scratch(tiny_llama_dir, monkeypatch, recompute_mlp):
    """A bf16 QLoRA step of the fast path (recomputed MLP, chunked loss, more tokens than the gemv
    kernel takes) gives bit for bit the loss and gradients it gives when every scratch buffer is a
    fresh tensor, step after step: no result still points into a buffer a later call overwrites."""
    import transformers

    from qpeft import quantize_model
    from qpeft.train import chunked_loss, mlp_block, token_loss_sum
    from qpeft.train.fastpath import enable_fast_path
    from qpeft.tuners import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    model = quantize_model(model, compute_dtype=torch.bfloat16)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.train()
    switched = enable_fast_path(model, recompute_mlp=recompute_mlp, trim_every=0)
    assert ("recompute-mlp" in switched) == recompute_mlp and "chunked-loss" in switched
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, model.config.vocab_size, (2, 40), generator=g) for _ in range(3)]

    def run():
        out = []
        for ids in batches:
            loss, n = token_loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
            (loss / n).backward()
            out.append((loss.detach().clone(), {k: p.grad.clone() for k, p in model.named_parameters()
                                                if p.requires_grad}))
            model.zero_grad(set_to_none=True)
        return out

    with_scratch = run()
    fresh = lambda key, shape, dtype, device: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731
    for module in (F, mlp_block, chunked_loss):
        monkeypatch.setattr(module, "scratch", fresh)
    without = run()
    for (loss, grads), (loss2, grads2) in zip(with_scratch, without):
        assert torch.equal(loss, loss2)
        assert grads.keys() == grads2.keys()
        for k in grads:
            assert torch.equal(grads[k], grads2[k]), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_loss_keeps_scratch_logits_only_in_16_bit(dtype):
    from qpeft.train.chunked_loss import chunked_lm_loss_sum

    bufs = getattr(_scratch._local, "bufs", {})
    bufs.pop("loss-logits", None)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 9, 16, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(40, 16, generator=g).to(dtype)
    labels = torch.randint(0, 40, (2, 9), generator=g)
    loss, n = chunked_lm_loss_sum(hidden, weight, labels)
    loss.backward()
    kept = getattr(_scratch._local, "bufs", {}).get("loss-logits")
    # float32 chunks are large (64 MB each by default) and come from recycled heap: not held all step.
    assert (kept is not None) == (dtype != torch.float32)
    want = torch.nn.functional.cross_entropy(
        (hidden[:, :-1].reshape(-1, 16) @ weight.t()).float(), labels[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(loss, want, rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=0)
