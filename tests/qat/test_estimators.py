"""Estimators (STE, LSQ, LSQ+, PACT): gradients against PyTorch's own fake-quant ops and finite
differences, and the FakeQuantizer's use of them (init, gradient scale, learned parameters)."""

import math

import pytest
import torch

from qat import FakeQuantizer, QATConfigError, QuantPlan, QuantSpec, prepare
from qat.kernels import fake_quantize, fake_quantize_lsq, fake_quantize_pact


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("bits,signed", [(2, True), (3, False), (4, True), (8, False)])
@pytest.mark.parametrize("grad_factor", [1.0, 0.037])
@pytest.mark.parametrize("zero_sign", [1, -1])
def test_lsq_per_tensor_matches_torch_learnable(bits, signed, grad_factor, zero_sign):
    torch.manual_seed(bits)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    x = torch.randn(33, 17) * 2
    zv = float(max(qmin, zero_sign * max(1, (qmax - qmin) // 3)))
    s, z = torch.tensor([0.21]), torch.tensor([zv])
    g = torch.randn_like(x)
    x1, s1, z1 = _leaf(x), _leaf(s), _leaf(z)
    y1 = fake_quantize_lsq(x1, s1, z1, qmin, qmax, grad_factor=grad_factor)
    y1.backward(g)
    # PyTorch's per-channel op on a one-channel view: per-tensor math
    x2, s2, z2 = _leaf(x.reshape(1, -1)), _leaf(s), _leaf(z)
    y2 = torch._fake_quantize_learnable_per_channel_affine(x2, s2, z2, 0, qmin, qmax, grad_factor)
    y2.backward(g.reshape(1, -1))
    torch.testing.assert_close(y1, y2.reshape(x.shape), atol=0, rtol=0)
    torch.testing.assert_close(x1.grad, x2.grad.reshape(x.shape), atol=0, rtol=0)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-5)  # summation order only
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-5, atol=1e-5)
    if zv >= 0:
        # the per-tensor op agrees too; its backward (torch 2.13) masks with the wrong zero-point
        # sign when the zero point is negative, so it is only an oracle for z >= 0
        x3, s3, z3 = _leaf(x), _leaf(s), _leaf(z)
        torch._fake_quantize_learnable_per_tensor_affine(x3, s3, z3, qmin, qmax, grad_factor).backward(g)
        torch.testing.assert_close(x1.grad, x3.grad, atol=0, rtol=0)
        torch.testing.assert_close(s1.grad, s3.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z1.grad, z3.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1])
def test_lsq_per_channel_matches_torch_learnable(axis):
    torch.manual_seed(axis)
    x = torch.randn(12, 20, 3)
    c = x.shape[axis]
    s = torch.rand(c) * 0.3 + 0.05
    z = torch.randint(-3, 3, (c,)).float()
    g = torch.randn_like(x)
    x1, s1, z1 = _leaf(x), _leaf(s), _leaf(z)
    fake_quantize_lsq(x1, s1, z1, -8, 7, axis=axis, grad_factor=0.1).backward(g)
    x2, s2, z2 = _leaf(x), _leaf(s), _leaf(z)
    torch._fake_quantize_learnable_per_channel_affine(x2, s2, z2, axis, -8, 7, 0.1).backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, atol=0, rtol=0)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-5, atol=1e-5)


def test_lsq_per_group_equals_per_channel_on_group_view():
    torch.manual_seed(1)
    x = torch.randn(6, 32)
    s = torch.rand(6, 4) * 0.2 + 0.05
    z = torch.zeros(6, 4)
    g = torch.randn_like(x)
    x1, s1 = _leaf(x), _leaf(s)
    fake_quantize_lsq(x1, s1, z, -8, 7, group_size=8, grad_factor=0.5).backward(g)
    x2, s2 = _leaf(x.reshape(24, 8)), _leaf(s.reshape(24))
    torch._fake_quantize_learnable_per_channel_affine(x2, s2, torch.zeros(24), 0, -8, 7, 0.5).backward(g.reshape(24, 8))
    torch.testing.assert_close(x1.grad, x2.grad.reshape(6, 32), atol=0, rtol=0)
    torch.testing.assert_close(s1.grad, s2.grad.reshape(6, 4), rtol=1e-5, atol=1e-6)


def test_lsq_scale_gradient_is_the_lsq_formula():
    # inside: round(x/s) - x/s; clipped: qmin - z or qmax - z; times grad_factor
    x = torch.tensor([0.26, -0.74, 5.0, -5.0, 0.0])
    s = torch.tensor([0.5], requires_grad=True)
    fake_quantize_lsq(x, s, torch.zeros(1), -4, 3, grad_factor=0.25).sum().backward()
    v = x / 0.5
    expected = ((torch.round(v[:2]) - v[:2]).sum() + 3 + (-4) + 0) * 0.25
    torch.testing.assert_close(s.grad, expected.reshape(1), atol=1e-6, rtol=0)


def test_ste_gradient_matches_torch_fake_quantize():
    torch.manual_seed(0)
    x = torch.randn(64, 8) * 3
    s, z = torch.tensor([0.2]), torch.tensor([2.0])
    g = torch.randn_like(x)
    x1, x2 = _leaf(x), _leaf(x)
    fake_quantize(x1, s, z, -8, 7).backward(g)
    torch.fake_quantize_per_tensor_affine(x2, 0.2, 2, -8, 7).backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, atol=0, rtol=0)


def test_pact_gradients_match_finite_differences_and_definition():
    torch.manual_seed(0)
    x = torch.rand(200) * 4 - 1  # [-1, 3)
    alpha = torch.tensor([2.0], requires_grad=True)
    g = torch.randn(200)
    xl = _leaf(x)
    y = fake_quantize_pact(xl, alpha, 0, 15)
    (y * g).sum().backward()
    clipped = x >= 2.0
    torch.testing.assert_close(alpha.grad, g[clipped].sum().reshape(1), atol=1e-5, rtol=0)
    inside = (x >= 0) & (x < 2.0)
    torch.testing.assert_close(xl.grad, torch.where(inside, g, torch.zeros_like(g)), atol=0, rtol=0)
    # finite differences over the clipped elements, whose output is exactly alpha
    eps = 1e-3
    f = lambda a: float(fake_quantize_pact(x[clipped], torch.tensor([a]), 0, 15).sum())
    fd = (f(2.0 + eps) - f(2.0 - eps)) / (2 * eps)
    assert fd == pytest.approx(float(clipped.sum()), rel=1e-3)
    # forward: clip to [0, alpha], 16 levels
    s = 2.0 / 15
    torch.testing.assert_close(y.detach(), torch.round(x.clamp(0, 2.0) / s) * s, atol=1e-6, rtol=0)


def test_lsq_fake_quantizer_init_and_grad_factor():
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, granularity="per_channel", axis=0, estimator="lsq")
    w = torch.randn(8, 24, requires_grad=True)
    fq = FakeQuantizer(spec, (8, 24), track_history=False)
    g = torch.randn(8, 24)
    (fq(w) * g).sum().backward()
    init = 2 * w.detach().abs().mean(dim=1) / math.sqrt(7)
    torch.testing.assert_close(fq.scale.detach(), init, atol=0, rtol=0)
    assert fq.grad_factor(w) == pytest.approx(1 / math.sqrt(24 * 7))
    s2 = _leaf(init)
    torch._fake_quantize_learnable_per_channel_affine(w.detach(), s2, torch.zeros(8), 0, -8, 7, 1 / math.sqrt(24 * 7)).backward(g)
    torch.testing.assert_close(fq.scale.grad, s2.grad, rtol=1e-5, atol=1e-6)
    assert isinstance(fq.scale, torch.nn.Parameter) and not isinstance(fq.zero_point, torch.nn.Parameter)


def test_lsq_plus_learns_offset():
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, signed=False, symmetric=False, estimator="lsq_plus")
    fq = FakeQuantizer(spec, (16,))
    x = torch.randn(64, 16) - 2.0  # mostly negative: the affine range needs a large zero point
    fq(x)
    assert isinstance(fq.zero_point, torch.nn.Parameter)
    opt = torch.optim.Adam(fq.parameters(), lr=0.05)
    err0 = float((fq(x) - x).detach().pow(2).mean())
    for _ in range(60):
        loss = (fq(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fq.zero_point.grad is not None
    assert float((fq(x) - x).pow(2).mean()) < err0
    s, z = fq.current_qparams()
    assert float(z) == round(float(z)) and 0 <= float(z) <= 15


@pytest.mark.parametrize("estimator", ["lsq", "lsq_plus"])
def test_learned_scale_reduces_error_at_2_bits(estimator):
    torch.manual_seed(0)
    spec = QuantSpec(bits=2, estimator=estimator, symmetric=estimator == "lsq")
    fq = FakeQuantizer(spec, (256,), track_history=False)
    x = torch.randn(256)
    fq(x)
    opt = torch.optim.Adam(fq.parameters(), lr=0.02)
    errs = []
    for _ in range(50):
        loss = (fq(x) - x).pow(2).sum()
        errs.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert errs[-1] < errs[0]


def test_pact_fake_quantizer_learns_alpha_in_a_model():
    torch.manual_seed(0)
    plan = QuantPlan.from_dict({"rules": [{"match": "*", "weight": {"bits": 8}, "input": {"bits": 4, "signed": False, "estimator": "pact"}}]})
    net = prepare(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(8, 2)), plan)
    x = torch.randn(32, 8) * 3
    net(x).sum().backward()
    q = net[1].input_quantizer
    torch.testing.assert_close(q.alpha.detach(), x.relu().max().reshape(1))  # init: observed max
    assert q.alpha.grad is not None


def test_estimator_config_errors():
    with pytest.raises(QATConfigError, match="pact clips to \\[0, alpha\\]: it needs signed: false"):
        QuantSpec(estimator="pact")
    with pytest.raises(QATConfigError, match="estimator must be one of"):
        QuantSpec(estimator="dorefa")
    with pytest.raises(QATConfigError, match="cannot be learned: estimator must be ste"):
        QuantSpec(dynamic=True, estimator="lsq")
    plan = QuantPlan.from_dict({"rules": [{"match": "*", "weight": {"bits": 4, "signed": False, "estimator": "pact"}}]})
    with pytest.raises(QATConfigError, match="estimator pact is for activations"):
        plan.resolve(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_lsq_asymmetric_init_anchors_the_minimum_at_qmin():
    # affine LSQ: the zero point must match the LSQ scale, not the observer's own scale
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, signed=False, symmetric=False, estimator="lsq")
    fq = FakeQuantizer(spec, (32,))
    x = torch.randn(256, 32) - 1.0  # mostly negative
    y = fq(x)
    s, z = fq.scale.detach(), fq.zero_point
    torch.testing.assert_close(s, (2 * x.abs().mean() / math.sqrt(15)).reshape(1))
    torch.testing.assert_close(z, torch.clamp(-torch.round(x.min() / s), 0, 15))
    # the representable range starts at (or just below) the observed minimum, not far above it
    assert float((0 - z) * s) <= float(x.min()) + float(s)
    assert float((y - x).abs().median()) <= float(s) / 2 + 1e-6
