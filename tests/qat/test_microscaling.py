"""Microscaling and FP8 formats (qat/microscaling.py): the reference equals independent formulations
(torch's float8 casts, a nearest-on-the-grid search for E2M1, the OCP MX scale rule written with
math.log2), lies on the grid, saturates, keeps NaN; gradients (clipped STE, learned scales); the
spec checks; presets load and train; the ops equal the reference on every dtype."""

import importlib.util
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qat import QATConfigError, QuantSpec, convert, load_plan, prepare  # noqa: E402
from qat.fake_quant import FakeQuantizer  # noqa: E402
from qat.kernels import fake_quantize_float, fake_quantize_float_lsq  # noqa: E402
from qat.microscaling import (  # noqa: E402
    ELEMENTS,
    MICRO_FORMATS,
    block_amax,
    e8m0_exponent,
    fake_quantize_format,
    float_scale,
    microscaling_forward,
    microscaling_lsq_backward,
    mxfp4_codes,
    round_to_element,
)

from .bert_fixtures import SENTENCES, tiny_bert  # noqa: E402

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
CASTS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test draws the same values, run alone or after others."""
    torch.manual_seed(0)


def _random_floats(n: int, seed: int) -> torch.Tensor:
    """Random float32 bit patterns (every exponent: subnormals, huge values, infinities), NaN dropped."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    return x[~torch.isnan(x)]


def _e2m1_nearest(v: torch.Tensor) -> torch.Tensor:
    """E2M1 by search: the grid point nearest |v| (saturating), ties to the even code."""
    a = v.abs().clamp(max=6.0)
    d = (a.unsqueeze(-1) - E2M1_GRID).abs()
    best = d.min(dim=-1, keepdim=True).values
    ties = d == best
    codes = torch.arange(8)
    # among the nearest codes prefer an even one (there are at most two, adjacent)
    pick = torch.where(ties & (codes % 2 == 0), codes, torch.full_like(codes, 99)).min(dim=-1).values
    pick = torch.where(pick == 99, ties.to(torch.int64).argmax(dim=-1), pick)
    return torch.copysign(E2M1_GRID[pick], v)


# ----------------------------------------------------------------------------- element rounding


@pytest.mark.parametrize("element", ["e4m3", "e5m2"])
def test_fp8_rounding_equals_torch_cast(element):
    """Over a million float32 bit patterns of every exponent: the saturating cast of torch."""
    f = ELEMENTS[element]
    x = _random_floats(1 << 20, seed=1)
    # a second population near the format's range, where the grid is dense in x
    x = torch.cat([x, torch.randn(1 << 18) * f.max / 4, torch.randn(1 << 16) * 2.0**f.emin])
    ours = round_to_element(x, element)
    cast = x.clamp(-f.max, f.max).to(CASTS[element]).float()
    assert torch.equal(ours, cast)
    assert torch.equal(torch.signbit(ours), torch.signbit(cast))


def test_e2m1_rounding_equals_grid_search():
    x = torch.cat([torch.linspace(-8, 8, 4097), torch.randn(10000) * 3, torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])])
    assert torch.equal(round_to_element(x, "e2m1"), _e2m1_nearest(x))
    assert round_to_element(torch.tensor([0.25, 0.75, 2.5, 3.5, 5.0]), "e2m1").tolist() == [0.0, 1.0, 2.0, 4.0, 4.0]


@pytest.mark.parametrize("element", sorted(ELEMENTS))
def test_rounding_saturates_keeps_nan_and_sign(element):
    m = ELEMENTS[element].max
    y = round_to_element(torch.tensor([float("inf"), -float("inf"), 1e30, float("nan"), -0.0]), element)
    assert y[:3].tolist() == [m, -m, m]
    assert math.isnan(y[3].item()) and y[4].item() == 0.0 and torch.signbit(y[4])


# ----------------------------------------------------------------------------- block scales


def _mx_independent(x: torch.Tensor, element: str) -> torch.Tensor:
    """MX quantize-dequantize written from the OCP MX v1.0 text with Python floats (float64)."""
    f = ELEMENTS[element]
    out = torch.empty_like(x)
    rows = x.reshape(-1, 32)
    for i, blk in enumerate(rows):
        amax = max((abs(v) for v in blk.tolist() if math.isfinite(v)), default=0.0)
        e = math.floor(math.log2(amax)) - f.emax if amax >= 2.0**-126 else -127
        scale = 2.0 ** max(-127, min(127, e))
        v = blk.double() / scale
        if element == "e2m1":
            q = _e2m1_nearest(v.float()).double()
        else:
            q = v.clamp(-f.max, f.max).float().to(CASTS[element]).double()
        out.view(-1, 32)[i] = (q * scale).float()
    return out


@FAST
@given(
    rows=st.integers(1, 4), blocks=st.integers(1, 3), log_scale=st.floats(-30, 30), seed=st.integers(0, 2**16),
    element=st.sampled_from(["e2m1", "e4m3"]),
)
def test_mx_equals_ocp_formulation(rows, blocks, log_scale, seed, element):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 32 * blocks, generator=g) * 10.0**log_scale
    y, inside = microscaling_forward(x, element, 32, "e8m0")
    assert torch.equal(y, _mx_independent(x, element))
    # on the grid: y / scale is an element value; saturated where outside
    s = 2.0 ** e8m0_exponent(block_amax(x, 32), element).double()
    v = (y.double().reshape(rows, blocks, 32) / s.unsqueeze(-1)).float()
    assert torch.equal(round_to_element(v, element), v)
    assert v.abs().max() <= ELEMENTS[element].max
    assert torch.equal(~inside, (x.double().reshape(rows, blocks, 32) / s.unsqueeze(-1)).abs().reshape(x.shape) > ELEMENTS[element].max)


def test_mx_nonfinite_elements():
    x = torch.randn(2, 32)
    x[0, 3], x[0, 5], x[1, 0] = float("nan"), float("inf"), -float("inf")
    y, inside = microscaling_forward(x, "e2m1", 32, "e8m0")
    clean = x.clone()
    clean[0, 3] = clean[0, 5] = clean[1, 0] = 0.0
    y_clean, _ = microscaling_forward(clean, "e2m1", 32, "e8m0")
    assert math.isnan(y[0, 3].item())  # NaN propagates
    s0 = 2.0 ** e8m0_exponent(block_amax(clean, 32), "e2m1")  # the scales ignore NaN / Inf
    assert y[0, 5].item() == 6.0 * s0[0, 0].item() and y[1, 0].item() == -6.0 * s0[1, 0].item()
    keep = torch.isfinite(x)
    assert torch.equal(y[keep], y_clean[keep])
    assert not inside[0, 3] and not inside[0, 5] and not inside[1, 0]
    # an all-zero block stays zero
    assert torch.equal(microscaling_forward(torch.zeros(1, 32), "e2m1", 32, "e8m0")[0], torch.zeros(1, 32))


@FAST
@given(rows=st.integers(1, 4), blocks=st.integers(1, 4), log_scale=st.floats(-20, 20), seed=st.integers(0, 2**16))
def test_nvfp4_equals_cast_formulation(rows, blocks, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 16 * blocks, generator=g) * 10.0**log_scale * torch.rand(rows, 16 * blocks, generator=g)
    s = float_scale(x, "nvfp4")
    assert torch.equal(s, torch.clamp(x.abs().max() / 2688.0, min=torch.finfo(torch.float32).eps).reshape(1))
    y, _ = microscaling_forward(x, "e2m1", 16, "e4m3", s)
    amax = x.abs().reshape(rows, blocks, 16).amax(-1, keepdim=True)
    c = (amax / (s * 6.0)).clamp(max=448.0).to(torch.float8_e4m3fn).float()
    S = c * s
    xb = x.reshape(rows, blocks, 16)
    v = torch.where(S != 0, xb * (1.0 / S), torch.zeros_like(xb))
    assert torch.equal(y, (_e2m1_nearest(v) * S).reshape(x.shape))
    assert torch.equal(y, fake_quantize_format(x, "nvfp4"))


@pytest.mark.parametrize("element", ["e4m3", "e5m2"])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_fp8_scales_equal_cast(element, axis):
    x = torch.randn(6, 40) * torch.logspace(-3, 3, 40)
    fmt = f"fp8_{element}"
    s = float_scale(x, fmt, axis)
    sv = s.reshape(()) if axis is None else s.reshape([-1 if d == axis else 1 for d in range(2)])
    want = (x * (1.0 / sv)).clamp(-ELEMENTS[element].max, ELEMENTS[element].max).to(CASTS[element]).float() * sv
    assert torch.equal(fake_quantize_format(x, fmt, axis=axis), want)
    assert torch.equal(fake_quantize_float(x, element, scale=s, axis=axis), want)


# ----------------------------------------------------------------------------- gradients


def test_ste_gradient_is_the_inside_mask():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=gen) * 4
    x[0, 0] = 7000.0  # amax 7000: scale 2^(12 - 2), 7000 / 1024 = 6.8 saturates at 6
    x.requires_grad_()
    g = torch.randn(3, 64, generator=gen)
    y = fake_quantize_float(x, "e2m1", 32, "e8m0")
    y.backward(g)
    _, inside = microscaling_forward(x.detach(), "e2m1", 32, "e8m0")
    assert torch.equal(x.grad, torch.where(inside, g, torch.zeros_like(g)))
    assert (~inside).any() and inside.any()


@pytest.mark.parametrize("case", ["fp8_tensor", "fp8_channel", "nvfp4"])
def test_learned_scale_gradient_equals_autograd_of_ste_formula(case):
    torch.manual_seed(0)
    x = torch.randn(8, 32) * 3
    if case == "nvfp4":
        element, bs, kind, axis = "e2m1", 16, "e4m3", None
        s0 = float_scale(x, "nvfp4") * 0.7  # below amax / 2688: the largest blocks' codes saturate
    else:
        element, bs, kind = "e4m3", 0, "none"
        axis = None if case == "fp8_tensor" else 0
        s0 = float_scale(x, "fp8_e4m3", axis) * 0.5  # some elements saturate
    gy = torch.randn_like(x)
    s = s0.clone().requires_grad_()
    xg = x.clone().requires_grad_()
    fake_quantize_float_lsq(xg, s, element, bs, kind, axis, grad_factor=0.25).backward(gy)
    # independent: autograd through q = v + (round(v) - v).detach() inside, the saturated code outside
    s2 = s0.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    m = ELEMENTS[element].max
    if kind == "e4m3":
        xb = x2.reshape(8, 2, 16)
        amax = x.abs().reshape(8, 2, 16).amax(-1, keepdim=True)
        c = (amax / (s0 * 6.0)).clamp(max=448).to(torch.float8_e4m3fn).float()
        S = c * s2.reshape(())
    else:
        xb = x2
        S = s2.reshape(()) if axis is None else s2.reshape(-1, 1)
    v = xb / S
    inside = v.detach().abs() <= m
    q_in = v + (round_to_element(v.detach(), element) - v).detach()
    q = torch.where(inside, q_in, torch.sign(v.detach()) * m)
    (q * S).reshape(x.shape).backward(gy)
    torch.testing.assert_close(s.grad, s2.grad * 0.25, rtol=1e-4, atol=1e-5)
    assert torch.equal(xg.grad, torch.where(inside.reshape(x.shape), gy, torch.zeros_like(gy)))
    dx, ds = microscaling_lsq_backward(gy, x, element, bs, kind, s0, axis, 0.25)
    assert torch.equal(ds, s.grad) and torch.equal(dx, xg.grad)


def test_nan_contributes_no_scale_gradient():
    x = torch.tensor([1.0, float("nan"), 3.0])
    _, ds = microscaling_lsq_backward(torch.ones(3), x, "e4m3", 0, "none", torch.tensor([1.0]), None, 1.0)
    assert math.isfinite(ds.item())


# ----------------------------------------------------------------------------- dtypes, ops, checks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", sorted(MICRO_FORMATS))
def test_half_inputs_quantize_in_float32(dtype, fmt):
    x = (torch.randn(4, 64) * 5).to(dtype)
    y = fake_quantize_format(x, fmt)
    assert y.dtype == dtype
    scale = None if fmt in ("mxfp4", "mxfp8") else float_scale(x, fmt)
    assert torch.equal(y, fake_quantize_format(x.float(), fmt, scale).to(dtype))


def test_op_argument_checks():
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="element must be one of"):
        fake_quantize_float(x, "e3m2", 32, "e8m0")
    with pytest.raises(ValueError, match="multiple of block_size"):
        fake_quantize_float(torch.randn(2, 48), "e2m1", 32, "e8m0")
    with pytest.raises(ValueError, match="nothing to learn"):
        fake_quantize_float_lsq(x, torch.ones(1), "e2m1", 32, "e8m0")
    with pytest.raises(ValueError, match="scale must have 2"):
        fake_quantize_float(x, "e4m3", scale=torch.ones(3), axis=0)
    with pytest.raises(ValueError, match="finite and nonzero"):
        fake_quantize_float(x, "e4m3", scale=torch.zeros(1))
    with pytest.raises(TypeError, match="float32"):
        fake_quantize_float(x, "e2m1", 16, "e4m3", scale=torch.ones(1, dtype=torch.float64))


def test_mxfp4_codes_decode_to_the_fake_quantized_weight():
    w = torch.randn(3, 64) * 0.05
    e, q = mxfp4_codes(w)
    vals = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    mag = vals[(q & 7).long()]
    dec = torch.where((q & 8) > 0, -mag, mag).reshape(3, 2, 32) * 2.0 ** (e.float() - 127).unsqueeze(-1)
    assert torch.equal(dec.reshape(3, 64), fake_quantize_format(w, "mxfp4"))


# ----------------------------------------------------------------------------- specs, plans, training


def test_spec_checks_name_the_field_and_choices():
    with pytest.raises(QATConfigError, match=r"format mxfp4 needs estimator one of \['ste'\]"):
        QuantSpec(bits=4, granularity="per_group", group_size=32, format="mxfp4", estimator="lsq")
    with pytest.raises(QATConfigError, match="group_size=16"):
        QuantSpec(bits=4, granularity="per_group", group_size=32, format="nvfp4")
    with pytest.raises(QATConfigError, match="granularity per_tensor or per_channel"):
        QuantSpec(bits=8, granularity="per_group", group_size=32, format="fp8_e4m3")
    with pytest.raises(QATConfigError, match="bits=8"):
        QuantSpec(bits=4, format="fp8_e5m2")
    with pytest.raises(QATConfigError, match="valid choices|must be one of"):
        QuantSpec(format="fp6")
    assert QuantSpec(bits=8, granularity="per_channel", axis=0, format="fp8_e4m3", estimator="lsq").format.value == "fp8_e4m3"


PRESETS = ["mxfp4", "mxfp8", "nvfp4", "fp8_e4m3", "gguf_mxfp4"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_training_lowers_the_loss(name):
    torch.manual_seed(0)
    plan = load_plan(name)
    model = prepare(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)), plan)
    x, t = torch.randn(128, 64), torch.randn(128, 32)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = ((model(x) - t) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    wq = model[0].weight_quantizer
    fmt = name.removeprefix("gguf_")
    assert wq.spec.format.value == fmt
    # the layer's weight is what the reference gives for its format and scale
    w = model[0].weight.detach()
    scale = None if wq.micro.block_scale == "e8m0" else wq.scale.detach()
    assert torch.equal(model[0].quantized_weight().detach(), fake_quantize_format(w, fmt, scale, wq.axis))


def test_fp8_input_scale_from_observer_and_lsq_parameters():
    fq = FakeQuantizer(QuantSpec(bits=8, format="fp8_e4m3", observer="minmax"), (16,))
    x = torch.randn(4, 16) * 3
    y = fq(x)
    amax = x.abs().max()
    assert torch.equal(fq.scale, (amax / 448.0).reshape(1))
    assert torch.equal(y, fake_quantize_format(x, "fp8_e4m3", fq.scale))
    lsq = FakeQuantizer(QuantSpec(bits=8, granularity="per_channel", axis=0, format="fp8_e4m3", estimator="lsq"), (8, 16))
    w = torch.randn(8, 16)
    lsq(w).sum().backward()
    assert isinstance(lsq.scale, nn.Parameter) and lsq.scale.grad is not None and lsq.scale.grad.shape == (8,)


def test_convert_refuses_float_formats():
    model = prepare(nn.Sequential(nn.Linear(32, 8)), "mxfp4")
    model(torch.randn(2, 32))
    with pytest.raises(QATConfigError, match="float format"):
        convert(model)


# ----------------------------------------------------------------------------- GGUF MXFP4 export

gguf = pytest.importorskip("gguf")


@FAST
@given(rows=st.integers(1, 5), blocks=st.integers(1, 4), log_scale=st.floats(-35, 35), seed=st.integers(0, 2**16),
       zero_block=st.booleans())
def test_gguf_mxfp4_dequantizes_to_the_fake_quantized_weight(rows, blocks, log_scale, seed, zero_block):
    from qat.export.gguf import mxfp4_blocks

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 32 * blocks, generator=g) * 10.0**log_scale
    if zero_block:
        w[0, :32] = 0.0
    b = mxfp4_blocks(w)
    assert b.dtype == np.uint8 and b.shape == (rows, 17 * blocks)
    got = gguf.quants.dequantize(b, gguf.GGMLQuantizationType.MXFP4)
    np.testing.assert_array_equal(got, fake_quantize_format(w, "mxfp4").numpy())


def test_gguf_bert_file_holds_the_mxfp4_weights(tmp_path):
    from qat.export.gguf import export_gguf

    model, _, tokdir = tiny_bert()
    prepare(model, "gguf_mxfp4")
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer_dir=tokdir)
    r = gguf.GGUFReader(path)
    by_name = {t.name: t for t in r.tensors}
    assert by_name["blk.0.attn_q.weight"].tensor_type.name == by_name["blk.1.ffn_down.weight"].tensor_type.name == "MXFP4"
    assert by_name["token_embd.weight"].tensor_type.name == "F32"
    kv = {f.name: f for f in r.fields.values()}
    assert int(kv["general.file_type"].parts[-1][0]) == int(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
    mod = model.encoder.layer[1].output.dense
    t = by_name["blk.1.ffn_down.weight"]
    got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(mod.weight.shape)
    np.testing.assert_array_equal(got, mod.quantized_weight().detach().numpy())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_runs_the_mxfp4_file(tmp_path):
    """llama.cpp's embeddings of the exported MXFP4 file against our fake-quantized model (about 20 s)."""
    from qat.export.gguf import export_gguf, llama_embed
    from qat.recipes.minilm import embed

    model, tok, tokdir = tiny_bert(hidden=256)
    prepare(model, "gguf_mxfp4")
    model.eval()
    ours = embed(model, tok, SENTENCES, max_length=128)
    theirs = llama_embed(export_gguf(model, tmp_path / "m.gguf", tokenizer_dir=tokdir), SENTENCES)
    cos = (ours * theirs).sum(-1)
    assert cos.min() >= 0.999, cos


# ----------------------------------------------------------------------------- ONNX float8 QDQ

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

_ONNX_PLANS = {
    "fp8_e4m3": "fp8_e4m3",
    "fp8_e5m2_lsq": {"rules": [{"match": "*", "types": ["Linear"],
                                "weight": {"bits": 8, "format": "fp8_e5m2", "estimator": "lsq"},
                                "input": {"bits": 8, "format": "fp8_e5m2", "estimator": "lsq"}}]},
    "mxfp8_weights": {"rules": [{"match": "*", "types": ["Linear"],
                                 "weight": {"bits": 8, "granularity": "per_group", "group_size": 32, "format": "mxfp8"},
                                 "input": {"bits": 8, "format": "fp8_e4m3"}}]},
}


@pytest.mark.parametrize("case", sorted(_ONNX_PLANS))
def test_onnx_float8_qdq_runs_in_onnxruntime_as_trained(tmp_path, case):
    from qat.export.onnx_float import export_onnx_float

    torch.manual_seed(0)
    model = prepare(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)), _ONNX_PLANS[case])
    x = torch.randn(16, 64) * 2
    opt = torch.optim.SGD(model.parameters(), 1e-2)
    for _ in range(3):  # move weights (and learned scales) away from their start
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.apply(lambda m: m.enable_observer(False) if isinstance(m, FakeQuantizer) else None)
    model.eval()
    ours = model(x).detach()
    path = export_onnx_float(model, x, tmp_path / "m.onnx", input_names=["x"], output_names=["y"])
    proto = onnx.load(path)
    assert sum(n.op_type == "DequantizeLinear" for n in proto.graph.node) == 4
    dq = [n.output[0] for n in proto.graph.node if n.name.endswith("weight_dq")]
    proto.graph.output.extend([onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in dq])
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    y, w0, w2 = sess.run(None, {"x": x.numpy()})
    # the weights ORT dequantizes are the fake-quantized weights, bit for bit
    np.testing.assert_array_equal(w0, model[0].quantized_weight().detach().numpy())
    np.testing.assert_array_equal(w2, model[2].quantized_weight().detach().numpy())
    # the outputs: the same float8 inputs and weights, ORT's Gemm summing in its own order
    np.testing.assert_allclose(y, ours.numpy(), rtol=0, atol=1e-5 * float(ours.abs().max()))


def test_onnx_float_refuses_what_has_no_float8_qdq_form(tmp_path):
    from qat.export.onnx_float import export_onnx_float

    for preset, match in (("mxfp4", "NOT_IMPLEMENTED"), ("mxfp8", "no float8 QuantizeLinear form"), ("w8a8", "not a float8 format")):
        model = prepare(nn.Sequential(nn.Linear(64, 8)), preset)
        model(torch.randn(2, 64))
        with pytest.raises(QATConfigError, match=match):
            export_onnx_float(model, torch.randn(2, 64), tmp_path / "m.onnx")


def test_onnxruntime_has_no_fp4_dequantize_kernel():
    """What the FP4 refusal above rests on: a valid FLOAT4E2M1 DequantizeLinear (opset 23) that ONNX
    Runtime cannot run. When this fails, ORT has gained the kernel and MXFP4 / NVFP4 can export."""
    from onnx import TensorProto, helper, numpy_helper

    packed = np.arange(64, dtype=np.uint8).reshape(2, 32)  # 2 x 64 codes, two a byte
    w = helper.make_tensor("w", TensorProto.FLOAT4E2M1, [2, 64], vals=packed.tobytes(), raw=True)
    s = numpy_helper.from_array(np.ones((2, 2), dtype=np.float32), "s")
    node = helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=1, block_size=32)
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
                              initializer=[w, s])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    proto.ir_version = 11
    onnx.checker.check_model(proto)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["mxfp4", "nvfp4", "fp8_e4m3"])
def test_compiled_model_equals_eager(preset):
    torch.manual_seed(0)
    model = prepare(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)), preset)
    x = torch.randn(8, 64)
    model(x)  # initialize, then freeze the input observers (a compiled run would update them again)
    model.apply(lambda m: m.enable_observer(False) if isinstance(m, FakeQuantizer) and m.track_history else None)
    y = model(x)
    y.sum().backward()
    grad = model[0].weight.grad.clone()
    model.zero_grad()
    yc = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    yc.sum().backward()
    assert torch.equal(yc, y) and torch.equal(model[0].weight.grad, grad)


@pytest.mark.parametrize("preset", ["mxfp4", "nvfp4", "fp8_e4m3"])
def test_telemetry_counts_saturated_elements(preset):
    from qat.telemetry import quantizer_stats

    model = prepare(nn.Sequential(nn.Linear(64, 32)), preset)
    x = torch.randn(8, 64)
    model(x)
    for kind, fq in model[0].quantizers():
        t = x if kind == "input" else model[0].weight.detach()
        stats = quantizer_stats(fq, t)
        assert 0.0 <= stats["clip_rate"] < 0.5 and stats["sqnr_db"] > 10.0 and stats["bits"] == fq.spec.bits
    outlier = torch.zeros(1, 64)
    outlier[0, :4] = torch.tensor([7.0, 1.0, 1.0, 1.0])  # MX: amax 7 -> scale 1, 7 saturates at 6
    if preset == "mxfp4":
        assert quantizer_stats(model[0].input_quantizer, outlier)["clip_rate"] == 0.0  # MXFP8 input: 7 fits
        assert quantizer_stats(model[0].weight_quantizer, outlier.expand(32, 64).contiguous())["clip_rate"] == 1 / 64


def test_weight_codes_are_element_values_and_oscillation_refuses_float_formats():
    from qat.oscillation import dampening_loss, weight_codes

    model = prepare(nn.Sequential(nn.Linear(64, 32)), "mxfp4")
    model(torch.randn(2, 64))
    codes = weight_codes(model[0])
    assert codes.shape == (32, 64) and torch.equal(round_to_element(codes, "e2m1"), codes) and codes.abs().max() <= 6
    with pytest.raises(QATConfigError, match="float format"):
        dampening_loss(model)


def test_model_size_counts_block_scales():
    from qat.size import model_size_bytes

    mx = prepare(nn.Sequential(nn.Linear(64, 64, bias=False)), "mxfp4")
    assert model_size_bytes(mx) == 64 * 64 // 2 + 64 * 64 // 32  # 4.25 bits a weight; MXFP8 inputs store nothing
    nv = prepare(nn.Sequential(nn.Linear(64, 64, bias=False)), "nvfp4")
    assert model_size_bytes(nv) == 64 * 64 // 2 + 64 * 64 // 16 + 4 + 4  # + the two float32 tensor scales
    fp8 = prepare(nn.Sequential(nn.Linear(64, 64, bias=False)), "fp8_e4m3")
    assert model_size_bytes(fp8) == 64 * 64 + 4 * 64 + 4
    assert "format=mxfp4" in repr(mx[0].weight_quantizer)
