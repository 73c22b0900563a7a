"""Linear4bit, matmul_4bit and quantize_model (issue 3, first part)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qpeft
from qpeft import Linear4bit, dequantize_model, quantize_model

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def make_layer(in_f=96, out_f=80, bias=True, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    return dense, Linear4bit.from_linear(dense, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_forward_and_input_gradient_match_dense_dequantized(dtype, bias, quant_type):
    _, layer = make_layer(bias=bias, dtype=dtype, quant_type=quant_type)
    w = layer.dequantize()
    assert w.dtype == dtype and w.shape == (80, 96)
    x = torch.randn(3, 5, 96, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = layer(x)
    y_ref = F.linear(x_ref, w, layer.bias)
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[dtype])
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_bias_gradient_when_bias_trains():
    _, layer = make_layer()
    layer.bias.requires_grad_(True)
    x = torch.randn(7, 96)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((80,), 7.0))


def test_reconstruction_close_to_dense_and_4_13_bits():
    dense, layer = make_layer(in_f=256, out_f=256)
    err = (layer.dequantize() - dense.weight).norm() / dense.weight.norm()
    assert err < 0.12
    st = layer.quant_state
    bits = 8 * (layer.weight.numel() + st.absmax.numel() + 4 * st.state2.absmax.numel() + 4) / (256 * 256)
    assert bits < 4.13


def test_constructor_like_nn_linear():
    layer = Linear4bit(64, 32, bias=False, quant_type="fp4", blocksize=128, double_quant=False)
    assert (layer.in_features, layer.out_features, layer.bias) == (64, 32, None)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (1024, 1)
    assert layer.quant_state.blocksize == 128 and not layer.quant_state.nested
    assert "fp4" in repr(layer)


def test_conv1d_from_transformers():
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    conv = Conv1D(48, 64)  # nf=48 outputs, nx=64 inputs; weight stored [64, 48]
    nn.init.normal_(conv.weight)
    layer = Linear4bit.from_linear(conv)
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(), conv.bias), rtol=1e-5, atol=1e-5)
    assert (layer.dequantize().t() - conv.weight).norm() / conv.weight.norm() < 0.12


def test_device_moves_and_dtype_casts_keep_the_quant_state():
    _, layer = make_layer()
    before = layer.dequantize()
    layer.to("cpu").half().to(torch.float32)
    assert layer.weight.dtype == torch.uint8
    assert layer.quant_state.state2.absmax.dtype == torch.float32
    assert torch.equal(layer.dequantize(), before)


def test_state_dict_has_bitsandbytes_keys_and_round_trips():
    _, layer = make_layer()
    sd = layer.state_dict()
    assert sorted(sd) == sorted([
        "weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
        "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
    ])
    fresh = Linear4bit(96, 80, quant_type="fp4", double_quant=False)
    fresh.load_state_dict(sd)
    assert fresh.quant_type == "nf4" and fresh.double_quant
    assert torch.equal(fresh.dequantize(), layer.dequantize())


def test_load_state_dict_rejects_mis_shaped_and_corrupt_checkpoints():
    _, layer = make_layer()
    sd = layer.state_dict()
    other = Linear4bit(96, 81)
    with pytest.raises(RuntimeError, match="shape"):
        other.load_state_dict(sd)
    bad = dict(sd)
    bad["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{oops"), dtype=torch.uint8)
    fresh = Linear4bit(96, 80)
    before = fresh.dequantize()
    with pytest.raises(RuntimeError, match="JSON"):
        fresh.load_state_dict(bad)
    assert torch.equal(fresh.dequantize(), before)


def test_eval_no_grad_forward_does_not_change_training_gradients():
    """As generate() does mid-training: qpeft keeps giving input gradients."""
    _, layer = make_layer(dtype=torch.bfloat16)
    x = torch.randn(4, 96, dtype=torch.bfloat16)

    def grads():
        xi = x.clone().requires_grad_()
        layer(xi).float().pow(2).sum().backward()
        return xi.grad

    g1 = grads()
    layer.eval()
    with torch.no_grad():
        layer(x[:1])
    layer.train()
    g2 = grads()
    assert g2 is not None and torch.equal(g1, g2)


def test_backward_saves_only_packed_weights():
    """Memory probe: the autograd graph holds no dense copy of any layer."""
    torch.manual_seed(0)
    layers = nn.Sequential(*[Linear4bit(512, 512, bias=False) for _ in range(6)])
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    x = torch.randn(2, 512, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layers(x)
    dense_bytes = 512 * 512 * 4
    assert max(saved) < dense_bytes / 4, saved
    assert sum(saved) < 6 * dense_bytes / 4
    y.sum().backward()
    assert x.grad is not None


def test_gradient_checkpointing_and_autocast():
    from torch.utils.checkpoint import checkpoint

    _, layer = make_layer()
    x = torch.randn(5, 96, requires_grad=True)
    y = checkpoint(layer, x, use_reentrant=False)
    y.sum().backward()
    g_ckpt = x.grad.clone()
    x.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(g_ckpt, x.grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x).detach(), rtol=3e-2, atol=3e-2)


def test_torch_compile_gives_the_same_result():
    _, layer = make_layer()
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(4, 96)
    torch.testing.assert_close(compiled(x), layer(x))


def test_lora_style_training_through_linear4bit_reduces_loss():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    quantize_model(base, skip=[])
    r = 4
    a = nn.Parameter(torch.randn(r, 32) * 0.01)
    b = nn.Parameter(torch.zeros(64, r))
    x = torch.randn(256, 32)
    target = torch.randn(256, 8)

    def model(inp):
        h = base[0](inp) + inp @ a.t() @ b.t()
        return base[2](base[1](h))

    opt = torch.optim.Adam([a, b], lr=1e-2)
    first = None
    for _ in range(60):
        loss = F.mse_loss(model(x), target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.9 * first


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_quantize_model_skips_the_head_and_dequantize_model_undoes_it():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    quantize_model(model)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit))}
    assert kinds["lm_head"] == "Linear"
    assert sum(k == "Linear4bit" for k in kinds.values()) == 14  # 7 per layer
    with torch.no_grad():
        q = model(ids).logits
    assert (q - ref).norm() / ref.norm() < 0.2
    dequantize_model(model)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, q, rtol=1e-4, atol=1e-4)


def test_quantize_model_names_a_bad_layer_and_changes_nothing():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj"):
        quantize_model(model)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())


def test_matmul_4bit_checks_the_feature_count():
    _, layer = make_layer()
    with pytest.raises(ValueError, match="expects 96"):
        qpeft.matmul_4bit(torch.randn(2, 95), layer.weight, layer.quant_state)


def test_compute_dtype_returns_the_input_dtype():
    _, layer = make_layer()
    layer.compute_dtype = torch.bfloat16
    x = torch.randn(3, 96, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32
    ref = F.linear(x.detach().bfloat16(), layer.dequantize().bfloat16(), layer.bias.bfloat16()).float()
    # bfloat16 compute: the fused kernel keeps float32 weights, the reference rounds them.
    torch.testing.assert_close(y.detach(), ref, **TOL[torch.bfloat16])
    y.sum().backward()
    assert x.grad.dtype == torch.float32


@pytest.mark.parametrize("tokens", [1, 16, 17, 40, qpeft.functional.GEMV_MAX_TOKENS, qpeft.functional.GEMV_MAX_TOKENS + 1])
def test_linear_4bit_dispatch_agrees_on_both_sides_of_the_crossover(tokens, monkeypatch):
    _, layer = make_layer(in_f=128, out_f=64)
    x = torch.randn(tokens, 128)
    limit = qpeft.functional._gemv_max_tokens(x)
    assert limit == 16  # float32
    calls = []
    real = qpeft.functional._gemv_4bit_cpu  # the fused kernel's CPU entry, which linear_4bit calls directly
    monkeypatch.setattr(qpeft.functional, "_gemv_4bit_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = qpeft.functional.linear_4bit(x, layer.weight, layer.quant_state)
    assert bool(calls) == (tokens <= limit)
    torch.testing.assert_close(y, F.linear(x, layer.dequantize()), rtol=1e-5, atol=1e-5)


def test_the_fused_kernel_limit_is_wide_only_for_bfloat16_dot_products(monkeypatch):
    QF = qpeft.functional
    wide = QF.gemv_rounds_weights_to_bf16(torch.bfloat16, 1, 64, 64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.zeros(1, 8, dtype=dtype)
        want = QF.GEMV_MAX_TOKENS if wide and dtype == torch.bfloat16 else 16
        assert QF._gemv_max_tokens(x) == want, dtype
    monkeypatch.setattr(QF, "GEMV_MAX_TOKENS", 0)  # 0 turns the fused kernel off everywhere
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert QF._gemv_max_tokens(torch.zeros(1, 8, dtype=dtype)) == 0


def test_linear_4bit_called_under_autograd_does_not_reuse_its_buffer():
    """Outside MatMul4bit, F.linear saves the weight: the reusable buffer must not be it."""
    _, a = make_layer(in_f=128, out_f=64)
    _, b = make_layer(in_f=128, out_f=64, quant_type="fp4")
    tokens = qpeft.functional.GEMV_MAX_TOKENS + 24  # the dense path
    x = torch.randn(tokens, 128, requires_grad=True)
    y = qpeft.functional.linear_4bit(x, a.weight, a.quant_state)
    qpeft.functional.linear_4bit(x.detach(), b.weight, b.quant_state)  # would overwrite a shared buffer
    y.sum().backward()
    torch.testing.assert_close(x.grad, a.dequantize().sum(0).expand(tokens, 128), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("native", [False, True], ids=["emulated-16bit", "native-16bit"])
def test_16bit_prefill_widens_to_float32_only_without_16bit_hardware(monkeypatch, dtype, native):
    """Many tokens of 16-bit activations: on a CPU whose matmul runs them in
    hardware, the dense 16-bit matmul; without, the same weight values (rounded
    to the 16-bit dtype) in a float32 matmul, rounded once."""
    import qpeft.functional as QF

    monkeypatch.setitem(QF._FAST_16BIT, dtype, native)
    w = torch.randn(48, 96)
    packed, state = QF.quantize_4bit(w, compress_statistics=True)
    x = torch.randn(QF.GEMV_MAX_TOKENS + 7, 96).to(dtype)
    w16 = QF.dequantize_4bit(packed, state).to(dtype)
    got = QF.linear_4bit(x, packed, state)
    assert got.dtype == dtype
    if native:
        assert QF.dense_matmul_dtype(x) == dtype
        assert torch.equal(got, F.linear(x, w16))
    else:
        assert QF.dense_matmul_dtype(x) == torch.float32
        assert torch.equal(got, F.linear(x.float(), w16.float()).to(dtype))
        # Twice (the scratch buffers are reused) and with the switch off.
        assert torch.equal(QF.linear_4bit(x, packed, state), got)
        monkeypatch.setattr(QF, "WIDEN_16BIT_ON_CPU", False)
        assert torch.equal(QF.linear_4bit(x, packed, state), F.linear(x, w16))
    assert QF.dense_matmul_dtype(x.float()) == torch.float32


def test_widened_prefill_keeps_input_gradients(monkeypatch):
    import qpeft.functional as QF

    monkeypatch.setitem(QF._FAST_16BIT, torch.bfloat16, False)
    _, layer = make_layer(dtype=torch.bfloat16, compute_dtype=torch.bfloat16)
    x = torch.randn(QF.GEMV_MAX_TOKENS + 3, 96, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    w16 = layer.dequantize().bfloat16()
    torch.testing.assert_close(x.grad, torch.ones(x.shape[0], 80, dtype=torch.bfloat16) @ w16, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", [(1, 128), (2, 3, 128), "strided", (0, 128)])
@pytest.mark.parametrize("bias", [False, True])
def test_inference_keeps_shapes_bias_and_clear_errors(shape, bias):
    """Linear4bit without autograd (the fused kernel for few tokens): odd inputs work or fail clearly."""
    _, layer = make_layer(in_f=128, out_f=64, bias=bias)
    x = torch.randn(128, 4).t() if shape == "strided" else torch.randn(*shape)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (*x.shape[:-1], 64)
    torch.testing.assert_close(y, F.linear(x, layer.dequantize(), layer.bias), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), pytest.raises(ValueError, match="expects 128"):
        layer(torch.randn(1, 127))


def test_forward_reads_the_current_parameters():
    """forward reads weight and bias from the parameter dict (no nn.Module.__getattr__):
    a replaced parameter is used, and a subclass that makes ``weight`` something
    else still works."""
    _, layer = make_layer(in_f=64, out_f=32)
    _, other = make_layer(in_f=64, out_f=32, bias=False)
    torch.manual_seed(1)
    other.weight.data.copy_(torch.randint(0, 256, other.weight.shape, dtype=torch.uint8))
    x = torch.randn(3, 64)
    layer.weight = other.weight
    layer.quant_state = other.quant_state
    layer.bias = nn.Parameter(torch.full((32,), 0.5))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, other.dequantize()) + 0.5, rtol=1e-5, atol=1e-5)

    class Shared(Linear4bit):
        """The packed weight lives on another module (as with tied layers)."""

        def __init__(self, owner):
            nn.Module.__init__(self)
            self.owner = owner
            self.quant_state = owner.quant_state
            self.compute_dtype = None
            self.register_parameter("bias", None)

        @property
        def weight(self):
            return self.owner.weight

    shared = Shared(other)
    with torch.no_grad():
        torch.testing.assert_close(shared(x), other(x))


def test_autocast_is_seen_without_autograd(monkeypatch):
    """Inference under autocast computes in the autocast dtype; matmul_4bit asks
    torch whether any autocast is on before asking per device, and the per-device
    answer decides."""
    from qpeft import autograd as qa

    _, layer = make_layer()
    x = torch.randn(5, 96)
    want = F.linear(x.bfloat16(), layer.dequantize().bfloat16(), layer.bias.bfloat16())
    for any_autocast in (qa._any_autocast, lambda: True):
        monkeypatch.setattr(qa, "_any_autocast", any_autocast)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)
        with torch.no_grad():
            assert layer(x).dtype == torch.float32
    # The quick check is what the inference path relies on: were it to miss
    # autocast, the result would stay float32.
    monkeypatch.setattr(qa, "_any_autocast", lambda: False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.float32
