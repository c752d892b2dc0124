"""The learned k-quant estimator (``estimator: lsq``, :class:`qat.kquant_quantizer.KQuantQuantizer`):
its fake-quantized weight equals gguf-py's dequantization of the blocks the exporter writes, bit for
bit, for every type and its fallback, also after its scales and the weight have moved (property
tests); training through both levels lowers the loss; its state survives a state-dict round trip."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

gguf = pytest.importorskip("gguf")
hypothesis = pytest.importorskip("hypothesis")
from gguf.quants import dequantize  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qat import prepare  # noqa: E402
from qat.export.gguf import gguf_blocks  # noqa: E402
from qat.kquant_quantizer import KQuantQuantizer  # noqa: E402
from qat.kquants import KQUANTS, fake_quantize_kquant, gguf_type_of, kquant_blocks, kquant_parts  # noqa: E402
from qat.plan import QuantPlan  # noqa: E402

FORMATS = sorted(KQUANTS)
T = gguf.GGMLQuantizationType


def lsq_plan(fmt: str) -> QuantPlan:
    """The ``gguf_<fmt>`` preset with learned scales (weights only)."""
    d = QuantPlan.preset(f"gguf_{fmt}").to_dict()
    for rule in d["rules"]:
        rule["input"] = None
        rule["weight"] = {**rule["weight"], "estimator": "lsq"}
    return QuantPlan.from_dict(d)


def _weights(kind: str, rows: int, k: int, log_scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = 10.0**log_scale
    if kind == "normal":
        return torch.randn(rows, k, generator=g) * s
    if kind == "positive":  # every block min above 0
        return (torch.rand(rows, k, generator=g) + 0.5) * s
    if kind == "outliers":  # one large element a row, small blocks beside it
        w = torch.randn(rows, k, generator=g) * s * 1e-3
        w[:, 7] = s
        return w
    w = torch.randn(rows, k, generator=g) * s  # sparse: whole blocks (and super-blocks) of zeros
    w[:, : k // 2] = 0.0
    return w


def _quantizer(fmt: str, w: torch.Tensor) -> KQuantQuantizer:
    layer = prepare(nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False)), lsq_plan(fmt))[0]
    with torch.no_grad():
        layer.weight.copy_(w)
    assert isinstance(layer.weight_quantizer, KQuantQuantizer)
    return layer.weight_quantizer


@pytest.mark.parametrize("fmt", FORMATS)  # every type, each over shapes (its fallback too) and value ranges
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 3),
    k=st.sampled_from([256, 512, 768, 32, 96, 384]),
    kind=st.sampled_from(["normal", "positive", "outliers", "sparse"]),
    log_scale=st.floats(-5.0, 3.0),
    seed=st.integers(0, 2**16),
    move_scales=st.floats(0.0, 8.0),
    move_weight=st.floats(0.0, 0.5),
)
def test_learned_fake_quantized_weight_equals_gguf_dequantization(fmt, rows, k, kind, log_scale, seed, move_scales,
                                                                    move_weight):
    w = _weights(kind, rows, k, log_scale, seed)
    fq = _quantizer(fmt, w)
    y0 = fq(w)
    # the first pass starts at the searched scales: the straight-through quantizer's weight
    assert torch.equal(y0, fake_quantize_kquant(w, fmt))
    # training moves the learned scales (in code units, past the code ranges' ends) and the weight
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        fq.kq_super.add_(torch.randn(fq.kq_super.shape, generator=g) * move_scales)
        fq.kq_block.add_(torch.randn(fq.kq_block.shape, generator=g) * move_scales)
    w2 = w + torch.randn(w.shape, generator=g) * w.abs().amax() * move_weight
    ours = fq(w2).detach().numpy()
    qtype = gguf_type_of(fmt, k)
    blocks = kquant_blocks(w2, fmt, fq.learned())
    theirs = dequantize(blocks, getattr(T, qtype))
    assert np.isfinite(ours).all()
    np.testing.assert_array_equal(theirs, ours)
    assert kquant_parts(w2, fmt, fq.learned())["type"] == qtype


@pytest.mark.parametrize("fmt", FORMATS)
def test_layer_exports_its_learned_codes(fmt):
    """The exporter's blocks of a prepared layer are the learned scales' codes, not a new search."""
    torch.manual_seed(0)
    layer = prepare(nn.Sequential(nn.Linear(512, 8)), lsq_plan(fmt))[0]
    layer(torch.randn(2, 512))  # initializes the learned scales from the weight
    with torch.no_grad():
        layer.weight_quantizer.kq_block.add_(torch.randn_like(layer.weight_quantizer.kq_block) * 2)
    fq_weight = layer.quantized_weight().detach()
    assert not torch.equal(fq_weight, fake_quantize_kquant(layer.weight.detach(), fmt))  # it did move
    blocks, qtype = gguf_blocks(layer)
    assert qtype == KQUANTS[fmt].ggml_name
    np.testing.assert_array_equal(dequantize(blocks, getattr(T, qtype)), fq_weight.numpy())


class _Net(nn.Module):
    def __init__(self, hidden: int = 256):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(256, hidden), nn.GELU(), nn.Linear(hidden, 256))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_training_the_learned_scales_lowers_the_loss(fmt):
    """Distillation of a float MLP into its k-quant twin (rows of 256: the k-quant; rows of 64: its
    fallback type), only the scales trained, from super-block (fallback: block) scales 0.6 times the
    searched ones (many codes clamped): the gradient through both levels
    lowers the loss and raises the super-block scales, and the blocks written afterwards still
    dequantize to the trained fake-quantized weight."""
    torch.manual_seed(0)
    teacher = _Net(hidden=64).eval()
    student = prepare(copy.deepcopy(teacher), lsq_plan(fmt))
    x = torch.randn(128, 256)
    with torch.no_grad():
        target = teacher(x)
    student(x)  # initialize the learned scales
    scales = {n: p for n, p in student.named_parameters() if "kq_" in n}
    assert sorted(scales) == [f"body.{i}.weight_quantizer.kq_{n}" for i in (0, 2) for n in ("block", "super")]
    supers = [p for n, p in scales.items() if n.endswith("kq_super")]
    with torch.no_grad():
        for p in supers:
            p.mul_(0.6)
    start = [float(p[:, 0].mean().detach()) for p in supers]
    for p in student.parameters():
        p.requires_grad_(any(p is s for s in scales.values()))
    opt = torch.optim.Adam(scales.values(), lr=0.3)
    losses = []
    for _ in range(20):
        loss = (student(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # body.2's rows of 64 take the fallback type: one level, no block scales
    assert scales["body.2.weight_quantizer.kq_block"].numel() == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scales.values() if p.numel())
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(float(p[:, 0].mean().detach()) > s for p, s in zip(supers, start))  # d grew back toward the search's
    for layer in (student.body[0], student.body[2]):
        blocks, qtype = gguf_blocks(layer)
        np.testing.assert_array_equal(dequantize(blocks, getattr(T, qtype)), layer.quantized_weight().detach().numpy())


def test_state_dict_round_trip_keeps_the_learned_scales():
    torch.manual_seed(0)
    net = prepare(_Net(), lsq_plan("q4_k"))
    x = torch.randn(8, 256)
    net(x)
    with torch.no_grad():  # as if trained: the learned scales are not where a search would put them
        for name, p in net.named_parameters():
            if "kq_" in name:
                p.add_(torch.randn_like(p))
    keys = {k for k in net.state_dict() if "kq_" in k}
    assert keys == {f"body.{i}.weight_quantizer.kq_{n}" for i in (0, 2) for n in ("ref", "super", "block")}
    fresh = prepare(_Net(), lsq_plan("q4_k"))
    fresh.load_state_dict(net.state_dict())
    for name, q in fresh.named_modules():
        if isinstance(q, KQuantQuantizer):
            assert q.is_initialized, name  # the first forward pass keeps the loaded scales, no new search
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))
        for i in (0, 2):
            assert torch.equal(fresh.body[i].quantized_weight(), net.body[i].quantized_weight())
    np.testing.assert_array_equal(gguf_blocks(fresh.body[0])[0], gguf_blocks(net.body[0])[0])
