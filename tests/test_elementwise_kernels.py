"""The fast path's elementwise kernels (Rust on the CPU) against torch's operations:
qpeft.functional.swiglu / swiglu_backward, rmsnorm_backward, cross_entropy_grad,
causal_softmax_grad and lora_up_add_.

The forward is torch's ``F.silu(gate) * up``; the backward is the float32
arithmetic of ``swiglu_backward``'s torch fallback, checked here against
autograd through ``F.silu(gate.float()) * up.float()``. The kernels' ``exp``
is within an ulp or two of torch's, so float32 results agree to a few ulp
and 16-bit ones to one step of their rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import qpeft.functional as QF
from qpeft import _native

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One rounding step of the dtype, relative.
STEP = {torch.float32: 2.0**-22, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
# One step of the dtype's subnormals (float16's are coarse: 2^-24).
TINY = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}


def autograd_reference(gate, up, dy):
    g, u = gate.double().requires_grad_(), up.double().requires_grad_()
    h = F.silu(g) * u
    h.backward(dy.double())
    return h.detach(), g.grad, u.grad


def in_range(got, want, dtype):
    """Elements whose exact value the dtype can hold; beyond its largest value the result must be
    the infinity of the right sign (as torch's own operations give in float16)."""
    top = torch.finfo(dtype).max
    over = want.abs() > 1.01 * top
    assert (got[over].isinf() & (got[over].sign() == want[over].sign())).all(), "overflow must give inf"
    return want.abs() <= 0.99 * top


def close(got, want, dtype, scale):
    """|got - want| within one rounding step of the dtype of |want| plus a float32-sized slack of the scale."""
    err = (got.double() - want).abs()
    tol = STEP[dtype] * want.abs() + 1e-6 * scale + TINY[dtype]
    bad = (err > tol) & in_range(got, want, dtype)
    assert not bad.any(), f"{int(bad.sum())} elements off, worst {float((err - tol).max()):.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 16, 33, 32 * 1024 + 5, 3 * 32 * 1024 + 1])
def test_forward_and_backward_match_torch(dtype, n):
    g = torch.Generator().manual_seed(n)
    gate = (torch.randn(n, generator=g) * 6).to(dtype)
    up = torch.randn(n, generator=g).to(dtype)
    dy = torch.randn(n, generator=g).to(dtype)
    h = QF.swiglu(gate, up)
    assert h.dtype == dtype and h.shape == gate.shape
    # The forward is torch's own expression, rounded the same way (silu to the dtype, then the product).
    torch_h = F.silu(gate) * up
    if dtype == torch.float32:
        close(h, torch_h.double(), dtype, (gate.abs() * up.abs()).double())
    else:
        assert ((h.float() - torch_h.float()).abs() <= STEP[dtype] * torch_h.float().abs() + 1e-30).all()
    d_gate, d_up = QF.swiglu_backward(gate, up, dy)
    _, ref_dg, ref_du = autograd_reference(gate, up, dy)
    scale = (dy.abs() * (up.abs() + 1) * (gate.abs() + 1)).double()
    close(d_gate, ref_dg, dtype, scale)
    close(d_up, ref_du, dtype, scale)


def test_matches_the_torch_fallback_exactly_in_bfloat16_on_a_training_shape():
    # What the trainer's MLP block sees: [batch, tokens, 4d] in bf16.
    g = torch.Generator().manual_seed(1)
    gate = (torch.randn(4, 64, 1536, generator=g) * 3).bfloat16()
    up = torch.randn(4, 64, 1536, generator=g).bfloat16()
    dy = torch.randn(4, 64, 1536, generator=g).bfloat16()
    assert torch.equal(QF.swiglu(gate, up), F.silu(gate) * up)
    s = torch.sigmoid(gate.float())
    want_du = (dy.float() * (gate.float() * s)).bfloat16()
    want_dg = (dy.float() * up.float() * (s * (1 + gate.float() * (1 - s)))).bfloat16()
    d_gate, d_up = QF.swiglu_backward(gate, up, dy)
    # exp differs from torch's by an ulp, which moves a bf16 rounding now and then.
    assert (d_up != want_du).float().mean() < 1e-4 and (d_gate != want_dg).float().mean() < 1e-4
    assert ((d_gate.float() - want_dg.float()).abs() <= 2**-7 * want_dg.float().abs()).all()


def test_special_values_follow_torch():
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -100.0, 100.0, 88.0, -88.0, 1e-40])
    up = torch.ones_like(special)
    for dtype in (torch.float32, torch.bfloat16):
        gate = special.to(dtype)
        got, want = QF.swiglu(gate, up.to(dtype)), F.silu(gate) * up.to(dtype)
        assert torch.equal(got.isnan(), want.isnan())
        finite = ~want.isnan()
        torch.testing.assert_close(got[finite].float(), want[finite].float(), rtol=STEP[dtype], atol=1e-37)
        d_gate, d_up = QF.swiglu_backward(gate, up.to(dtype), up.to(dtype))
        fb_dg, fb_du = QF.swiglu_backward(gate.to("meta"), up.to(dtype).to("meta"), up.to(dtype).to("meta"))
        assert fb_dg.device.type == "meta"  # not the native path: the fallback takes any device
        assert d_gate[0].isnan() and d_up[0].isnan()
        torch.testing.assert_close(d_up[3:].float(), (gate[3:].float() * torch.sigmoid(gate[3:].float())).to(dtype).float(),
                                   rtol=STEP[dtype], atol=1e-37)


def test_non_contiguous_and_mixed_inputs():
    g = torch.Generator().manual_seed(3)
    gate = torch.randn(64, 48, generator=g)
    up = torch.randn(48, 64, generator=g).t()  # a transposed view
    torch.testing.assert_close(QF.swiglu(gate, up), F.silu(gate) * up, rtol=1e-6, atol=1e-7)
    # Different dtypes or shapes leave the native path; torch broadcasting and promotion apply.
    mixed = QF.swiglu(gate, up.double())
    assert mixed.dtype == torch.float64
    torch.testing.assert_close(QF.swiglu(gate, torch.ones(48)), F.silu(gate))


def test_the_native_functions_reject_mismatched_lengths_with_a_message():
    a, b, out = torch.zeros(8), torch.zeros(7), torch.zeros(8)
    with pytest.raises(ValueError, match="up has 7 elements, gate has 8"):
        _native.swiglu_forward(a.numpy(), b.numpy(), out.numpy(), "float32", 1)
    with pytest.raises(TypeError, match="int16"):
        _native.swiglu_forward(a.numpy(), a.numpy(), torch.zeros(8, dtype=torch.int16).numpy(), "float32", 1)
    with pytest.raises(ValueError, match="d_up has 7 elements"):
        _native.swiglu_backward(a.numpy(), a.numpy(), a.numpy(), a.numpy(), b.numpy(), "float32", 1)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 5000),
    spread=st.sampled_from([1e-30, 1e-3, 1.0, 20.0, 1e4]),
    dtype=st.sampled_from(DTYPES),
    threads=st.integers(1, 3),
    isa=st.sampled_from(["scalar", "avx2", "avx512", None]),
    seed=st.integers(0, 2**16),
)
def test_property_any_size_scale_isa_and_thread_count(n, spread, dtype, threads, isa, seed):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(n, generator=g) * spread).to(dtype)
    up = torch.randn(n, generator=g).to(dtype)
    dy = torch.randn(n, generator=g).to(dtype)
    name = QF._FLOAT_DTYPES[dtype]
    h = torch.empty_like(gate)
    dg, du = torch.empty_like(gate), torch.empty_like(gate)
    _native.swiglu_forward(QF._np_flat(gate), QF._np_flat(up), QF._np_flat(h), name, threads, isa=isa)
    _native.swiglu_backward(QF._np_flat(gate), QF._np_flat(up), QF._np_flat(dy), QF._np_flat(dg), QF._np_flat(du),
                            name, threads, isa=isa)
    want_h, ref_dg, ref_du = autograd_reference(gate, up, dy)
    # The forward rounds the activation before the product: one more step of slack for 16-bit types.
    step = 1 if dtype == torch.float32 else 2
    err = (h.double() - want_h).abs()
    tol = step * STEP[dtype] * want_h.abs() + 1e-6 * (gate.double().abs() * up.double().abs()) + step * TINY[dtype]
    assert ((err <= tol) | ~in_range(h, want_h, dtype)).all()
    scale = (dy.abs() * (up.abs() + 1) * (gate.abs() + 1)).double()
    close(dg, ref_dg, dtype, scale)
    close(du, ref_du, dtype, scale)


# ------------------------------------------------------------------ RMSNorm


def rmsnorm_reference(x, weight, dy, eps):
    """float64 autograd of transformers' RMSNorm with a frozen weight: (scale as float32, dx)."""
    x64 = x.double().requires_grad_()
    scale = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    (weight.double() * (x64 * scale)).backward(dy.double())
    return scale.detach().float(), x64.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 13), (4, 64, 576), (9000, 8)])
def test_rmsnorm_backward_matches_autograd(dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    scale, want = rmsnorm_reference(x, w, dy, 1e-5)
    got = QF.rmsnorm_backward(x, scale, w, dy)
    assert got.dtype == dtype and got.shape == x.shape
    # The float32 sums differ from float64 by a few ulp of the row's largest term.
    mag = want.abs().amax(-1, keepdim=True) + scale.double()
    err = (got.double() - want).abs()
    assert (err <= STEP[dtype] * want.abs() + 1e-5 * mag + TINY[dtype]).all()


def test_rmsnorm_backward_falls_back_for_mixed_dtypes_and_other_devices():
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    dy = torch.randn(3, 16)  # float32 gradient for a bf16 input: torch's arithmetic
    w = torch.rand(16) + 0.5
    scale, want = rmsnorm_reference(x, w, dy, 1e-6)
    got = QF.rmsnorm_backward(x, scale, w, dy)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2**-7, atol=1e-5)
    meta = QF.rmsnorm_backward(x.to("meta"), scale.to("meta"), w.to("meta"), dy.to("meta"))
    assert meta.device.type == "meta" and meta.shape == x.shape


def test_rmsnorm_backward_native_boundary_rejects_inconsistent_shapes():
    x, out = torch.zeros(12), torch.zeros(12)
    with pytest.raises(ValueError, match="output gradient has 10 elements"):
        _native.rmsnorm_backward(x.numpy(), torch.ones(3).numpy(), torch.ones(4).numpy(), torch.zeros(10).numpy(),
                                 out.numpy(), "float32", 1)
    with pytest.raises(ValueError, match="weight is empty"):
        _native.rmsnorm_backward(x.numpy(), torch.ones(3).numpy(), torch.ones(0).numpy(), x.numpy(), out.numpy(),
                                 "float32", 1)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(0, 300),
    d=st.integers(1, 300),
    spread=st.sampled_from([1e-20, 1e-3, 1.0, 1e3]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    threads=st.integers(1, 3),
    isa=st.sampled_from(["scalar", "avx2", "avx512", None]),
    seed=st.integers(0, 2**16),
)
def test_property_rmsnorm_backward_any_shape(rows, d, spread, dtype, threads, isa, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, d, generator=g) * spread).to(dtype)
    w = (torch.rand(d, generator=g) + 0.5).to(dtype)
    dy = torch.randn(rows, d, generator=g).to(dtype)
    scale, want = rmsnorm_reference(x, w, dy, 1e-6)
    out = torch.empty_like(x)
    _native.rmsnorm_backward(QF._np_flat(x), scale.reshape(-1).numpy(), w.float().numpy(), QF._np_flat(dy),
                             QF._np_flat(out), QF._FLOAT_DTYPES[dtype], threads, isa=isa)
    mag = (want.abs().amax(-1, keepdim=True) + scale.double()) if rows else 0
    assert ((out.double() - want).abs() <= STEP[dtype] * want.abs() + 1e-5 * mag + TINY[dtype]).all()


# ------------------------------------------------ cross-entropy with its gradient


def xent_reference(x, t, ignore=-100):
    """float64 autograd through F.cross_entropy (sum over rows, ignore_index)."""
    xd = x.double().requires_grad_()
    loss = F.cross_entropy(xd, t, ignore_index=ignore, reduction="none")
    loss.sum().backward()
    return loss.detach(), torch.logsumexp(x.double(), -1), xd.grad


def check_xent(x, t, loss, lse, grad, ignore=-100):
    want_loss, want_lse, want_grad = xent_reference(x, t, ignore)
    valid = t != ignore
    assert grad.dtype == x.dtype and loss.dtype == lse.dtype == torch.float32
    tol = 1e-5 * (want_lse.abs() + 1)
    assert ((lse.double() - want_lse)[valid].abs() <= tol[valid]).all()
    assert ((loss.double() - want_loss).abs() <= tol).all()
    assert (loss[~valid] == 0).all() and (grad[~valid] == 0).all()
    # The gradient is exp(x - lse) in float32 (x - lse is exact to |lse| ulp),
    # rounded once to the logits' dtype.
    rel = (STEP[x.dtype] if x.dtype != torch.float32 else 2.0**-21) + (want_lse.abs() + 1).unsqueeze(1) * 2.0**-22
    # Its error is relative to the softmax, which at the target is the gradient plus one.
    softmax = want_grad.abs()
    if len(t):
        rows = valid.nonzero().squeeze(1)
        softmax[rows, t[rows]] += 1
    assert ((grad.double() - want_grad).abs() <= rel * softmax + 1e-6).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 17), (85, 49152)])
def test_cross_entropy_grad_matches_autograd(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 5).to(dtype)
    t = torch.randint(0, shape[1], (shape[0],), generator=g)
    t[::3] = -100
    check_xent(x, t, *QF.cross_entropy_grad(x, t))


def test_cross_entropy_grad_native_equals_the_torch_fallback():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(40, 3001, generator=g) * 8).bfloat16()
    t = torch.randint(0, 3001, (40,), generator=g)
    t[5] = -100
    native = QF.cross_entropy_grad(x, t)
    # float64 logits take the torch expression (the kernels take 32- and 16-bit floats).
    loss, lse, grad = QF.cross_entropy_grad(x.double(), t)
    torch.testing.assert_close(native[0], loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(native[1], lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(native[2].double(), grad, rtol=2**-7, atol=1e-7)


def test_cross_entropy_grad_rejects_bad_targets_and_shapes_with_a_message():
    x = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="target 5 of row 1 is outside the vocabulary"):
        QF.cross_entropy_grad(x, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="target -1 of row 0"):
        QF.cross_entropy_grad(x, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"logits must be \[rows, vocab\]"):
        QF.cross_entropy_grad(x, torch.tensor([0]))
    with pytest.raises(ValueError, match="integer"):
        QF.cross_entropy_grad(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        _native.cross_entropy_grad(x.numpy().reshape(-1), 5, torch.tensor([0, 7]).numpy(), -100,
                                   torch.empty(10).numpy(), torch.empty(2).numpy(), torch.empty(2).numpy(),
                                   "float32", 1)
    with pytest.raises(ValueError, match="one per row"):
        _native.cross_entropy_grad(x.numpy().reshape(-1), 5, torch.tensor([0, 1]).numpy(), -100,
                                   torch.empty(10).numpy(), torch.empty(3).numpy(), torch.empty(2).numpy(),
                                   "float32", 1)


def test_cross_entropy_grad_non_finite_logits_give_non_finite_losses():
    x = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0]])
    loss, _, _ = QF.cross_entropy_grad(x, torch.tensor([0, 2]))
    assert not torch.isfinite(loss[0]) and torch.isfinite(loss[1])


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(0, 40),
    vocab=st.integers(1, 700),
    spread=st.sampled_from([1e-20, 1e-3, 1.0, 30.0]),
    dtype=st.sampled_from(DTYPES),
    threads=st.integers(1, 3),
    isa=st.sampled_from(["scalar", "avx2", "avx512", None]),
    seed=st.integers(0, 2**16),
)
def test_property_cross_entropy_grad_any_shape(rows, vocab, spread, dtype, threads, isa, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, vocab, generator=g) * spread).to(dtype)
    t = torch.randint(-1, vocab, (rows,), generator=g)
    t[t < 0] = -100
    grad, lse, loss = torch.empty_like(x), torch.empty(rows), torch.empty(rows)
    _native.cross_entropy_grad(QF._np_flat(x), vocab, t.numpy(), -100, QF._np_flat(grad), lse.numpy(), loss.numpy(),
                               QF._FLOAT_DTYPES[dtype], threads, isa=isa)
    check_xent(x, t, loss, lse, grad)


# ------------------------------------------------ causal attention's softmax backward


def attention_softmax_reference(q, k, v, d_out, scale):
    """float64 autograd through masked softmax attention: (scores, dp, lse, out, p, d_scores)."""
    t = q.shape[-2]
    mask = torch.ones(t, t, dtype=torch.bool).triu_(1)
    scores = (q.double() @ k.double().transpose(-1, -2)).requires_grad_()
    z = (scores * scale).masked_fill(mask, float("-inf"))
    p = torch.softmax(z, -1)
    out = p @ v.double()
    out.backward(d_out.double())
    return scores.detach(), d_out.double() @ v.double().transpose(-1, -2), torch.logsumexp(z, -1).detach(), \
        out.detach(), p.detach(), scores.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 3), (3, 33, 16), (2, 256, 64)])
def test_causal_softmax_grad_matches_autograd(dtype, shape):
    b, t, d = shape
    g = torch.Generator().manual_seed(t)
    q, k, v, d_out = (torch.randn(b, t, d, generator=g).to(dtype) for _ in range(4))
    scale = d**-0.5
    scores, dp, lse, out, want_p, want_ds = attention_softmax_reference(q, k, v, d_out, scale)
    p, ds = QF.causal_softmax_grad(scores.to(dtype), dp.to(dtype), lse.float(), out.to(dtype), d_out, scale)
    assert p.dtype == ds.dtype == dtype and p.shape == ds.shape == (b, t, t)
    above = torch.ones(t, t, dtype=torch.bool).triu_(1).expand(b, t, t)
    assert (p[above] == 0).all() and (ds[above] == 0).all()
    # Inputs rounded to the dtype move exp(s * scale - lse) by about |s * scale| steps.
    step = STEP[dtype] * (1 + (scores * scale).abs())
    assert ((p.double() - want_p).abs() <= step * want_p + 1e-7).all()
    # ds = p * (dp - delta) * scale: dp and the terms of delta = sum(d_out * out) each carry a rounding.
    terms = (d_out.double().abs() * out.abs()).sum(-1, keepdim=True)
    tol = 2 * step * (want_p * (dp.abs() + terms) * scale) + 1e-6
    assert ((ds.double() - want_ds).abs() <= tol).all()


def test_causal_softmax_grad_native_equals_the_torch_fallback():
    g = torch.Generator().manual_seed(3)
    scores, dp = torch.randn(2, 3, 40, 40, generator=g) * 6, torch.randn(2, 3, 40, 40, generator=g)
    lse = torch.randn(2, 3, 40, generator=g) + 4
    out, d_out = torch.randn(2, 3, 40, 8, generator=g), torch.randn(2, 3, 40, 8, generator=g)
    native = QF.causal_softmax_grad(scores, dp, lse, out, d_out, 0.3)
    # float64 takes the torch expression (the kernel takes 32- and 16-bit floats).
    ref = QF.causal_softmax_grad(scores.double(), dp.double(), lse, out.double(), d_out.double(), 0.3)
    for got, want in zip(native, ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_causal_softmax_grad_inplace_overwrites_its_inputs_with_the_same_values():
    g = torch.Generator().manual_seed(4)
    scores, dp = (torch.randn(3, 17, 17, generator=g).bfloat16() for _ in range(2))
    lse = torch.randn(3, 17, generator=g) + 3
    out, d_out = (torch.randn(3, 17, 5, generator=g).bfloat16() for _ in range(2))
    want = QF.causal_softmax_grad(scores, dp, lse, out, d_out, 0.4)
    s2, dp2 = scores.clone(), dp.clone()
    got = QF.causal_softmax_grad(s2, dp2, lse, out, d_out, 0.4, inplace=True)
    assert got[0] is s2 and got[1] is dp2
    assert torch.equal(s2, want[0]) and torch.equal(dp2, want[1])
    with pytest.raises(ValueError, match="contiguous"):
        QF.causal_softmax_grad(scores.transpose(1, 2), dp, lse, out, d_out, 0.4, inplace=True)


def test_causal_softmax_grad_rejects_shapes_with_a_message():
    s = torch.zeros(2, 4, 4)
    with pytest.raises(ValueError, match=r"scores and dp must both be \[..., T, T\]"):
        QF.causal_softmax_grad(torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), torch.zeros(2, 4), torch.zeros(2, 4, 2),
                               torch.zeros(2, 4, 2), 1.0)
    with pytest.raises(ValueError, match="lse must be"):
        QF.causal_softmax_grad(s, s, torch.zeros(2, 3), torch.zeros(2, 4, 2), torch.zeros(2, 4, 2), 1.0)


@settings(max_examples=30, deadline=None)
@given(
    blocks=st.integers(1, 5),
    t=st.integers(1, 80),
    d=st.integers(1, 20),
    spread=st.sampled_from([1e-20, 1e-3, 1.0, 30.0]),
    dtype=st.sampled_from(DTYPES),
    threads=st.integers(1, 3),
    isa=st.sampled_from(["scalar", "avx2", "avx512", None]),
    seed=st.integers(0, 2**16),
)
def test_property_causal_softmax_grad_any_shape(blocks, t, d, spread, dtype, threads, isa, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = ((torch.randn(blocks, t, d, generator=g) * spread).to(dtype) for _ in range(2))
    v, d_out = (torch.randn(blocks, t, d, generator=g).to(dtype) for _ in range(2))
    scale = d**-0.5
    scores, dp, lse, out, _, _ = attention_softmax_reference(q, k, v, d_out, scale)
    sc, dpc, oc, lse = scores.to(dtype), dp.to(dtype), out.to(dtype), lse.float()
    p, ds = sc.clone(), dpc.clone()  # the kernel writes p over the scores and ds over dp
    _native.causal_softmax_grad(QF._np_flat(p), QF._np_flat(ds), lse.numpy().reshape(-1), QF._np_flat(oc),
                                QF._np_flat(d_out), t, d, scale, QF._FLOAT_DTYPES[dtype], threads, isa=isa)
    # The formula in float64 on exactly the kernel's inputs (rounding the
    # scores to the dtype moves exp(s * scale - lse) far from a softmax when
    # they are huge; that is the caller's precision, not the kernel's).
    above = torch.ones(t, t, dtype=torch.bool).triu_(1)
    z = sc.double() * scale - lse.double().unsqueeze(-1)
    want_p = z.exp().masked_fill(above, 0.0)
    terms = d_out.double() * oc.double()
    want_ds = want_p * (dpc.double() - terms.sum(-1, keepdim=True)) * scale
    assert (p[above.expand_as(p)] == 0).all() and (ds[above.expand_as(ds)] == 0).all()
    # float32 arithmetic on z (a few ulp of its parts) and exp, then one rounding to the dtype.
    # exp underflows to 0 below float32's normal range (subnormal results are flushed).
    rel = STEP[dtype] + 2.0**-21 * (1 + (sc.double() * scale).abs() + lse.double().abs().unsqueeze(-1))
    floor = max(TINY[dtype], 2.0**-126)
    assert ((p.double() - want_p).abs() <= rel * want_p + floor).all()
    sum_terms = dpc.double().abs() + terms.abs().sum(-1, keepdim=True)
    tol = (rel + 2.0**-21 * d) * want_p * sum_terms * scale + floor * (1 + sum_terms)
    assert ((ds.double() - want_ds).abs() <= tol).all()


# ------------------------------------------------------------------ LoRA up-projection


def lora_up_reference(y, h, bt, scaling):
    """float64 ``y + (h @ bt) * scaling`` and a bound on float32 arithmetic's error in it."""
    exact = y.double() + (h.double() @ bt.double()) * scaling
    mag = y.double().abs() + (h.double().abs() @ bt.double().abs()) * abs(scaling)
    return exact, mag


def lora_up_close(got, y, h, bt, scaling, dtype):
    exact, mag = lora_up_reference(y, h, bt, scaling)
    r = h.shape[-1]
    # r + 2 float32 roundings (the chain, the scale, the sum), then one to the dtype.
    tol = (r + 2) * 2.0**-24 * mag + STEP[dtype] * exact.abs() + TINY[dtype]
    assert ((got.double() - exact).abs() <= tol).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,n,r", [(1, 1, 1), (7, 33, 3), (64, 576, 8), (512, 4096, 16), (3, 130, 64)])
def test_lora_up_add_matches_torch(dtype, tokens, n, r):
    g = torch.Generator().manual_seed(tokens + n + r)
    y = torch.randn(tokens, n, generator=g).to(dtype)
    h, bt = torch.randn(tokens, r, generator=g), torch.randn(r, n, generator=g) * 0.05
    want = (y.to(torch.float32) + (h @ bt) * 2.0).to(dtype)
    got = QF.lora_up_add_(y.clone(), h, bt, 2.0)
    lora_up_close(got, y, h, bt, 2.0, dtype)
    # Where torch's BLAS forms the rank-r product as a chain of fused multiply-adds
    # from zero (MKL and oneDNN do for several rows and a short inner dimension),
    # the kernel's result is torch's, bit for bit.
    chain = torch.zeros(tokens, n, dtype=torch.float64)
    for k in range(r):
        chain = (h[:, k : k + 1].double() * bt[k].double() + chain).float().double()
    if torch.equal(chain.float(), h @ bt):
        assert torch.equal(got, want)


def test_lora_up_add_native_equals_the_torch_fallback_on_a_strided_output():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 2 * 96, generator=g).bfloat16()
    h, bt = torch.randn(40, 16, generator=g), torch.randn(16, 96, generator=g) * 0.1
    strided = base.clone()[:, ::2]  # not contiguous: the torch expression
    assert not strided.is_contiguous()
    got = QF.lora_up_add_(strided, h, bt, 0.5)
    native = QF.lora_up_add_(base[:, ::2].contiguous(), h, bt, 0.5)
    assert got.data_ptr() == strided.data_ptr()
    torch.testing.assert_close(got, native, rtol=2.0**-7, atol=1e-6)
    lora_up_close(got, base[:, ::2], h, bt, 0.5, torch.bfloat16)


def test_lora_up_add_rejects_mismatched_shapes_with_a_message():
    with pytest.raises(ValueError, match=r"\[\.\.\., n\], \[\.\.\., r\] and \[r, n\]"):
        QF.lora_up_add_(torch.zeros(4, 10), torch.zeros(4, 3), torch.zeros(2, 10))
    with pytest.raises(ValueError, match="must be"):
        QF.lora_up_add_(torch.zeros(4, 10), torch.zeros(5, 3), torch.zeros(3, 10))


@settings(max_examples=50, deadline=None)
@given(
    tokens=st.integers(0, 40),
    n=st.integers(1, 300),
    r=st.integers(1, 70),
    spread=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]),
    scaling=st.sampled_from([1.0, 2.0, 0.125, -3.0]),
    dtype=st.sampled_from(DTYPES),
    threads=st.integers(1, 3),
    isa=st.sampled_from(["avx2", "avx512", None]),
    seed=st.integers(0, 2**16),
)
def test_property_lora_up_add_any_shape_isa_and_thread_count(tokens, n, r, spread, scaling, dtype, threads, isa, seed):
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(tokens, n, generator=g) * spread).to(dtype)
    h, bt = torch.randn(tokens, r, generator=g) * spread, torch.randn(r, n, generator=g)
    name = QF._FLOAT_DTYPES[dtype]
    got, scalar = y.clone(), y.clone()
    _native.lora_up_add(QF._np_flat(got), h.numpy().reshape(-1), bt.numpy().reshape(-1), r, scaling, name, threads,
                        isa=isa)
    _native.lora_up_add(QF._np_flat(scalar), h.numpy().reshape(-1), bt.numpy().reshape(-1), r, scaling, name, 1,
                        isa="scalar")
    # Every instruction set and thread count does the same arithmetic.
    assert torch.equal(got.view(torch.int16) if dtype != torch.float32 else got,
                       scalar.view(torch.int16) if dtype != torch.float32 else scalar)
    # Against float64, row by row where the dtype can hold the row's values;
    # far beyond its largest value, the infinity of the right sign.
    top = torch.finfo(dtype).max
    exact, _ = lora_up_reference(y, h, bt, scaling)
    rows = (exact.abs() < top / 2).all(-1)
    lora_up_close(got[rows], y[rows], h[rows], bt, scaling, dtype)
    huge = exact.abs() > 2 * top
    assert (got[huge].double() == exact[huge].sign() * float("inf")).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 3), (3, 33, 16), (2, 256, 64)])
def test_causal_softmax_matches_a_float64_softmax(dtype, shape):
    b, t, d = shape
    g = torch.Generator().manual_seed(t + 100)
    q, k, v, d_out = (torch.randn(b, t, d, generator=g).to(dtype) for _ in range(4))
    scale = d**-0.5
    scores, _, want_lse, _, want_p, _ = attention_softmax_reference(q, k, v, d_out, scale)
    p, lse = QF.causal_softmax(scores.to(dtype), scale)
    assert p.dtype == dtype and p.shape == (b, t, t) and lse.dtype == torch.float32 and lse.shape == (b, t)
    above = torch.ones(t, t, dtype=torch.bool).triu_(1).expand(b, t, t)
    assert (p[above] == 0).all()
    step = STEP[dtype] * (1 + (scores * scale).abs())
    assert ((p.double() - want_p).abs() <= step * want_p + 1e-7).all()
    # The scores rounded to the dtype move the log-sum-exp by at most the largest of their changes.
    assert ((lse.double() - want_lse).abs() <= STEP[dtype] * (1 + (scores * scale).abs().amax(-1)) + 1e-5).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_softmax_gives_the_probabilities_its_backward_recomputes(dtype):
    g = torch.Generator().manual_seed(8)
    scores = (torch.randn(2, 3, 45, 45, generator=g) * 5).to(dtype)
    p, lse = QF.causal_softmax(scores, 0.25)
    zeros = torch.zeros(2, 3, 45, 4, dtype=dtype)
    again, _ = QF.causal_softmax_grad(scores, torch.zeros_like(scores), lse, zeros, zeros, 0.25)
    assert torch.equal(p, again)


def test_causal_softmax_native_equals_the_torch_fallback_and_works_in_place():
    g = torch.Generator().manual_seed(9)
    scores = torch.randn(2, 3, 40, 40, generator=g) * 6
    p, lse = QF.causal_softmax(scores, 0.3)
    ref_p, ref_lse = QF.causal_softmax(scores.double(), 0.3)  # float64: the torch expression
    torch.testing.assert_close(p.double(), ref_p, rtol=1e-5, atol=1e-7)
    assert ref_lse.dtype == torch.float32
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    s2 = scores.bfloat16()
    want = QF.causal_softmax(s2, 0.3)
    got = QF.causal_softmax(s2, 0.3, inplace=True)
    assert got[0] is s2 and torch.equal(s2, want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="contiguous"):
        QF.causal_softmax(scores.transpose(-1, -2), 0.3, inplace=True)
    with pytest.raises(ValueError, match=r"scores must be \[..., T, T\]"):
        QF.causal_softmax(torch.zeros(2, 4, 3), 1.0)
    empty, empty_lse = QF.causal_softmax(torch.zeros(0, 5, 5), 1.0)
    assert empty.shape == (0, 5, 5) and empty_lse.shape == (0, 5)
