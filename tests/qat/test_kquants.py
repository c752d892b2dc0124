"""llama.cpp k-quants: the fake-quantized weight equals gguf-py's dequantization of the blocks we
write, bit for bit, for every type and its fallback (property tests over shapes and value ranges);
the codes and scales stay in their ranges; the STE; the spec, plan and convert checks."""

import numpy as np
import pytest
import torch
import torch.nn as nn

gguf = pytest.importorskip("gguf")
hypothesis = pytest.importorskip("hypothesis")
from gguf.quants import dequantize  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qat import QATConfigError, QuantSpec, convert, prepare  # noqa: E402
from qat.export.gguf import gguf_blocks  # noqa: E402
from qat.kquants import (  # noqa: E402
    FALLBACK,
    KQUANTS,
    fake_quantize_kquant,
    gguf_type_of,
    kquant_blocks,
    kquant_dequantize,
    kquant_mix_plan,
    kquant_parts,
)
from qat.plan import QuantPlan  # noqa: E402

FORMATS = sorted(KQUANTS)
T = gguf.GGMLQuantizationType


def _weights(kind: str, rows: int, k: int, log_scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = 10.0**log_scale
    if kind == "normal":
        w = torch.randn(rows, k, generator=g) * s
    elif kind == "positive":  # every block min above 0 (ggml clamps the min to 0)
        w = (torch.rand(rows, k, generator=g) + 0.5) * s
    elif kind == "negative":
        w = -(torch.rand(rows, k, generator=g) + 0.5) * s
    elif kind == "outliers":  # one large element a row, small blocks beside it
        w = torch.randn(rows, k, generator=g) * s * 1e-3
        w[:, 7] = s
    elif kind == "sparse":  # whole blocks and super-blocks of zeros
        w = torch.randn(rows, k, generator=g) * s
        w[:, : k // 2] = 0.0
    else:  # constant
        w = torch.full((rows, k), s)
    return w


def _assert_exact(w: torch.Tensor, fmt: str) -> np.ndarray:
    qtype = gguf_type_of(fmt, w.shape[-1])
    blocks = kquant_blocks(w, fmt)
    ours = fake_quantize_kquant(w, fmt).numpy()
    theirs = dequantize(blocks, getattr(T, qtype))
    assert theirs.shape == ours.shape
    np.testing.assert_array_equal(theirs, ours)
    return ours


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(FORMATS),
    rows=st.integers(1, 3),
    k=st.sampled_from([256, 512, 768, 32, 96, 384]),
    kind=st.sampled_from(["normal", "positive", "negative", "outliers", "sparse", "constant"]),
    log_scale=st.floats(-6.0, 4.0),
    seed=st.integers(0, 2**16),
)
def test_fake_quantized_weight_equals_gguf_dequantization(fmt, rows, k, kind, log_scale, seed):
    w = _weights(kind, rows, k, log_scale, seed)
    ours = _assert_exact(w, fmt)
    assert np.isfinite(ours).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_codes_and_scales_in_range_and_rounding_within_half_a_step(fmt):
    kq = KQUANTS[fmt]
    w = torch.randn(4, 1024) * torch.rand(4, 1) * 3
    p = kquant_parts(w, fmt)
    assert p["type"] == kq.ggml_name
    assert p["q"].shape == (16, 256 // kq.block, kq.block)
    assert p["q"].min() >= kq.qmin and p["q"].max() <= kq.qmax
    assert torch.equal(p["d"], p["d"].half().float()) and torch.equal(p["dmin"], p["dmin"].half().float())
    lo = 0 if kq.has_min else -kq.scale_max
    hi = kq.scale_max if kq.has_min else kq.scale_max - 1
    assert p["sc"].min() >= lo and p["sc"].max() <= hi and p["m"].min() >= 0 and p["m"].max() <= hi
    y = kquant_dequantize(p, w.shape)
    step = (p["d"].unsqueeze(-1) * p["sc"]).abs().unsqueeze(-1).expand_as(p["q"]).reshape(w.shape)
    err = (y - w).abs()
    inside = p["inside"].reshape(w.shape)
    assert inside.float().mean() > 0.95  # clamping only where a rounded block code falls short
    assert bool((err[inside] <= step[inside] / 2 * (1 + 1e-5) + 1e-6).all())
    # more bits, less error (the types' order)
    errs = [float((fake_quantize_kquant(w, f) - w).pow(2).mean()) for f in FORMATS]
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fallback_type_for_rows_not_a_multiple_of_256(fmt):
    assert gguf_type_of(fmt, 512) == KQUANTS[fmt].ggml_name
    assert gguf_type_of(fmt, 384) == FALLBACK[fmt]
    w = torch.randn(3, 384)
    assert kquant_parts(w, fmt)["type"] == FALLBACK[fmt]
    assert float((fake_quantize_kquant(w, fmt) - w).abs().max()) < 0.25 * float(w.abs().max())
    with pytest.raises(QATConfigError, match="multiple of 256 .or of 32"):
        kquant_parts(torch.randn(2, 48), fmt)


def test_clipped_straight_through_gradient():
    w = torch.randn(8, 512) * 0.02
    w[0, 3] = 1.0  # the block scale codes round, and some elements fall outside their block's range
    x = w.clone().requires_grad_(True)
    y = fake_quantize_kquant(x, "q4_k")
    g = torch.randn_like(y)
    y.backward(g)
    mask = kquant_parts(w, "q4_k")["inside"].reshape(w.shape)
    assert torch.equal(x.grad, g * mask)
    # the gradient of a layer reaches the latent weight through the preset's quantizer
    layer = prepare(nn.Sequential(nn.Linear(512, 8, bias=False)), "gguf_q4_k")[0]
    layer(torch.randn(4, 512)).pow(2).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("preset", ["gguf_q2_k", "gguf_q3_k", "gguf_q4_k", "gguf_q5_k", "gguf_q6_k"])
def test_layer_blocks_are_its_fake_quantized_weight(preset):
    torch.manual_seed(0)
    lin = nn.Linear(512, 16)
    layer = prepare(nn.Sequential(lin), preset)[0]
    blocks, qtype = gguf_blocks(layer)
    assert qtype == preset[5:].upper()
    np.testing.assert_array_equal(dequantize(blocks, getattr(T, qtype)), layer.quantized_weight().detach().numpy())
    with pytest.raises(QATConfigError, match="k-quant.*no integer layer"):
        convert(nn.Sequential(layer))


def test_spec_checks_name_the_field_and_the_choices():
    with pytest.raises(QATConfigError, match=r"QuantSpec.format must be one of \[affine, q2_k, q3_k, q4_k, q5_k, q6_k, mxfp4, mxfp8, nvfp4, fp8_e4m3, fp8_e5m2\]"):
        QuantSpec(format="q4_k_m")
    ok = dict(bits=4, signed=False, symmetric=False, granularity="per_group", group_size=32, scale_dtype="float16")
    assert QuantSpec(**ok, format="q4_k").format.value == "q4_k"
    with pytest.raises(QATConfigError, match=r"format q4_k needs bits=4 \(got 3\)"):
        QuantSpec(**{**ok, "bits": 3}, format="q4_k")
    with pytest.raises(QATConfigError, match=r"format q6_k needs bits=6 .*signed=True .*group_size: 32"):
        QuantSpec(**ok, format="q6_k")
    assert QuantSpec(**ok, estimator="lsq", format="q4_k").estimator.value == "lsq"  # learned scales
    with pytest.raises(QATConfigError, match=r"estimator one of \['ste', 'lsq'\] \(got 'lsq_plus'\)"):
        QuantSpec(**ok, estimator="lsq_plus", format="q4_k")


def _bert(layers):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=512, hidden_size=256, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=512, max_position_embeddings=64)
    return transformers.BertModel(cfg)


def _llama(layers):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=4)
    return transformers.LlamaForCausalLM(cfg)


def _formats(plan, model):
    return {n: lq.weight.format.value for n, lq in plan.resolve(model).items()}


def test_mixes_follow_llama_cpp_use_more_bits():
    model = _bert(6)  # use_more_bits(i, 6): layers 2 and 5
    got = _formats(kquant_mix_plan(model, "q4_k_m"), model)
    q6 = sorted(n for n, f in got.items() if f == "q6_k")
    assert q6 == ["embeddings.word_embeddings"] + [f"encoder.layer.{i}.{t}" for i in (2, 5)
                                                   for t in ("attention.self.value", "output.dense")]
    assert got["encoder.layer.0.attention.output.dense"] == "q4_k"
    assert got["embeddings.word_embeddings"] == "q6_k"  # no output head: llama.cpp's output type
    got = _formats(kquant_mix_plan(model, "q5_k_m"), model)
    assert {got[n] for n in q6} == {"q6_k"} and got["encoder.layer.1.intermediate.dense"] == "q5_k"
    with pytest.raises(QATConfigError, match=r"valid mixes are \['q4_k_m', 'q5_k_m'\]"):
        kquant_mix_plan(model, "q4_k_s")


@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_m"])
def test_mix_presets_equal_the_plan_builder_at_their_depths(mix):
    for model in (_bert(12), _llama(32)):
        preset = _formats(QuantPlan.preset(f"gguf_{mix}"), model)
        assert preset == _formats(kquant_mix_plan(model, mix), model)
    assert preset["lm_head"] == "q6_k"
    more = sorted(int(n.split(".")[2]) for n, f in preset.items() if f == "q6_k" and n.endswith("v_proj"))
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
