"""Bad input gives the documented exception with a message that says what to do."""

import json

import pytest
import torch

import qpeft


def test_wrong_type_and_dtype():
    with pytest.raises(TypeError, match="torch.Tensor"):
        qpeft.quantize_4bit([1.0, 2.0])
    with pytest.raises(TypeError, match=r"float32, float16 and bfloat16.*\.float\(\)"):
        qpeft.quantize_4bit(torch.arange(10))
    with pytest.raises(TypeError, match="float64"):
        qpeft.quantize_4bit(torch.randn(10, dtype=torch.float64))


@pytest.mark.parametrize("bs", [0, 16, 48, 8192, 64.0, "64", True])
def test_bad_blocksize(bs):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        qpeft.quantize_4bit(torch.randn(100), blocksize=bs)


def test_bad_quant_type():
    with pytest.raises(ValueError, match="quant_type"):
        qpeft.quantize_4bit(torch.randn(100), quant_type="int4")


def test_wrong_device():
    with pytest.raises(ValueError, match=r"\.cpu\(\)"):
        qpeft.quantize_4bit(torch.empty(100, device="meta"))


def test_non_contiguous_input_is_copied_in_logical_order():
    w = torch.randn(64, 96)
    p1, s1 = qpeft.quantize_4bit(w.t())
    p2, s2 = qpeft.quantize_4bit(w.t().contiguous())
    assert torch.equal(p1, p2) and torch.equal(s1.absmax, s2.absmax) and s1.shape == (96, 64)


def test_out_must_be_contiguous_and_right_size():
    w = torch.randn(64, 64)
    p, s = qpeft.quantize_4bit(w)
    with pytest.raises(ValueError, match="contiguous"):
        qpeft.dequantize_4bit(p, s, out=torch.empty(64, 128)[:, ::2])
    with pytest.raises(ValueError, match="elements"):
        qpeft.dequantize_4bit(p, s, out=torch.empty(63, 64))
    with pytest.raises(TypeError, match="dtype"):
        qpeft.dequantize_4bit(p, s, out=torch.empty(64, 64, dtype=torch.bfloat16))
    out = torch.empty(64, 64)
    assert qpeft.dequantize_4bit(p, s, out=out) is out


def test_truncated_packed_data():
    p, s = qpeft.quantize_4bit(torch.randn(100))
    with pytest.raises(ValueError, match="needs 50"):
        qpeft.dequantize_4bit(p[:40], s)


def test_empty_tensor_roundtrips():
    x = torch.empty(0, 5)
    p, s = qpeft.quantize_4bit(x, compress_statistics=True)
    assert p.shape == (0, 1)
    assert qpeft.dequantize_4bit(p, s).shape == (0, 5)


def test_requires_grad_and_quant_storage():
    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    p, s = qpeft.quantize_4bit(w, quant_storage=torch.bfloat16)
    assert p.dtype == torch.bfloat16 and p.shape == (256, 1)
    # The storage dtype only relabels the bytes: the same values as a plain quantization.
    assert torch.equal(qpeft.dequantize_4bit(p, s), qpeft.dequantize_4bit(*qpeft.quantize_4bit(w.detach())))
    # Within half of NF4's widest gap (between -1 and its neighbour) of each block's absmax.
    bound = 0.5 * 0.3039 * w.detach().abs().reshape(-1, 64).amax(1, keepdim=True)
    assert ((qpeft.dequantize_4bit(p, s) - w.detach()).reshape(-1, 64).abs() <= bound).all()


def _state_dict():
    _, s = qpeft.quantize_4bit(torch.randn(100, 64), compress_statistics=True)
    return s.as_dict(packed=True)


def test_from_dict_rejects_bad_json():
    d = _state_dict()
    d["quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="not UTF-8 JSON"):
        qpeft.QuantState.from_dict(d)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("blocksize", 48, "blocksize"),
        ("dtype", "int8", "dtype must be one of"),
        ("dtype", "load", "dtype must be one of"),
        ("shape", [100, -1], "shape"),
        ("shape", [100, 65], "absmax has"),
        ("quant_type", "int4", "quant_type"),
        ("nested_offset", "x", "nested_offset"),
    ],
)
def test_from_dict_rejects_bad_fields(field, value, match):
    d = _state_dict()
    key = "quant_state.bitsandbytes__nf4"
    fields = json.loads(bytes(d[key].numpy()))
    fields[field] = value
    d[key] = torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match=match):
        qpeft.QuantState.from_dict(d)


def test_from_dict_rejects_missing_and_unknown_keys():
    d = _state_dict()
    del d["quant_map"]
    with pytest.raises(ValueError, match="missing"):
        qpeft.QuantState.from_dict(d)
    d = _state_dict()
    d["weight.surprise"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        qpeft.QuantState.from_dict(d)
    d = _state_dict()
    d["nested_absmax"] = d["nested_absmax"][:-1] if d["nested_absmax"].numel() > 1 else torch.zeros(3)
    with pytest.raises(ValueError, match="nested_absmax"):
        qpeft.QuantState.from_dict(d)


def test_quant_state_roundtrip_and_to():
    _, s = qpeft.quantize_4bit(torch.randn(70, 30), compress_statistics=True, quant_type="fp4")
    s2 = qpeft.QuantState.from_dict(s.as_dict(packed=True))
    assert s2 == s
    assert s2.to("cpu") is s2


def test_threads_do_not_change_results():
    w = torch.randn(512, 512)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        p1, s1 = qpeft.quantize_4bit(w, compress_statistics=True)
        torch.set_num_threads(2)
        p2, s2 = qpeft.quantize_4bit(w, compress_statistics=True)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(p1, p2) and s1 == s2


def test_kernels_release_the_gil():
    """Several Python threads quantizing at once get the single-thread answer."""
    from concurrent.futures import ThreadPoolExecutor

    ws = [torch.randn(256, 256) for _ in range(8)]
    expected = [qpeft.quantize_4bit(w)[0] for w in ws]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda w: qpeft.quantize_4bit(w)[0], ws))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
