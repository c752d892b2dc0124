"""Post-training quantization: static calibration, dynamic per-token activations, QAT from a
calibrated model (qat.ptq, qat.FakeQuantizer)."""

import pytest
import torch
import torch.nn as nn

from qat import FakeQuantizer, QATConfigError, QuantPlan, QuantSpec, prepare, quantizers
from qat.observers import qparams_from_range
from qat.ptq import calibrate


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g) * (1 + i), None) for i in range(n)]


def test_calibrate_sets_minmax_ranges_and_freezes():
    plan = QuantPlan.from_dict({"rules": [{"match": "*", "weight": {"bits": 8}, "input": {"bits": 8, "signed": False, "symmetric": False, "observer": "minmax"}}]})
    net = prepare(_mlp(), plan)
    batches = _batches(5)
    assert calibrate(net, batches, num_batches=3) == 3
    q = net[0].input_quantizer
    xs = torch.cat([b[0] for b in batches[:3]])
    s, z = qparams_from_range(xs.min().reshape(1), xs.max().reshape(1), q.spec)
    torch.testing.assert_close(q.scale, s, atol=0, rtol=0)
    torch.testing.assert_close(q.zero_point, z, atol=0, rtol=0)
    assert all(not bool(fq.observer_enabled) for _, fq in quantizers(net))
    assert net.training  # restored
    # frozen: more data does not move the range
    net.eval()
    net(torch.randn(8, 16) * 100)
    torch.testing.assert_close(q.scale, s, atol=0, rtol=0)


def test_calibrated_output_is_fake_quant_of_each_layer():
    plan = QuantPlan.from_dict({"rules": [{"match": "*", "weight": {"bits": 4, "granularity": "per_channel"}, "input": {"bits": 8, "signed": False, "symmetric": False}}]})
    net = prepare(_mlp(), plan)
    calibrate(net, _batches(2))
    net.eval()
    x = torch.randn(3, 16)
    lin = net[0]
    qi, qw = lin.input_quantizer, lin.weight_quantizer
    xq = (torch.clamp(torch.round(x * (1 / qi.scale)) + qi.zero_point, 0, 255) - qi.zero_point) * qi.scale
    s = qw.scale.reshape(-1, 1)
    wq = torch.clamp(torch.round(lin.weight * (1 / s)), -8, 7) * s
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(xq, wq, lin.bias), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("signed,symmetric", [(True, True), (False, False)])
def test_dynamic_per_token_quantizes_each_row_exactly(signed, symmetric):
    spec = QuantSpec(bits=8, signed=signed, symmetric=symmetric, dynamic=True, granularity="per_token")
    fq = FakeQuantizer(spec, (32,))
    assert fq.observer is None
    x = (torch.randn(2, 5, 32) * torch.logspace(-2, 2, 5).reshape(1, 5, 1)).requires_grad_(True)
    y = fq(x)  # no calibration needed
    mn, mx = x.detach().amin(-1, keepdim=True), x.detach().amax(-1, keepdim=True)
    s, z = qparams_from_range(mn, mx, spec)
    ref = (torch.clamp(torch.round(x.detach() * (1 / s)) + z, spec.qmin, spec.qmax) - z) * s
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    # each row keeps its own resolution: the small rows are not flushed to zero
    rel = ((y - x).abs().amax(-1) / x.abs().amax(-1)).detach()
    assert float(rel.max()) < 0.01
    y.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0.9 * x.numel()


def test_dynamic_in_a_plan_needs_no_calibration():
    plan = QuantPlan.from_dict({"rules": [{"match": "*", "weight": {"bits": 8, "granularity": "per_group", "group_size": 8},
                                            "input": {"bits": 8, "signed": False, "symmetric": False, "dynamic": True, "granularity": "per_token"}}]})
    net = prepare(_mlp(), plan)
    net.eval()
    x = torch.randn(4, 16)
    ref = _mlp()(x)
    torch.testing.assert_close(net(x), ref, atol=0.05, rtol=0.05)
    assert calibrate(net, _batches(1)) == 1  # harmless: dynamic quantizers have no observer


def test_qat_starts_from_the_calibrated_model():
    plan = QuantPlan.from_dict({"rules": [{"match": "*", "weight": {"bits": 4, "estimator": "lsq", "observer": "mse"},
                                            "input": {"bits": 4, "signed": False, "estimator": "lsq", "observer": "percentile", "percentile": 99.0}}]})
    net = prepare(_mlp(), plan)
    calibrate(net, _batches(3))
    q = net[2].input_quantizer
    calibrated = q.scale.detach().clone()
    obs_s, _ = q.observer.qparams()
    torch.testing.assert_close(calibrated, obs_s, atol=0, rtol=0)  # LSQ scale from calibration
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(16, 16)
    loss = net(x).pow(2).mean()
    torch.testing.assert_close(q.scale.detach(), calibrated, atol=0, rtol=0)  # no re-init on the first step
    opt.zero_grad()
    loss.backward()
    assert q.scale.grad is not None
    opt.step()
    assert not torch.equal(q.scale.detach(), calibrated)  # then learned


def test_pact_calibration_sets_alpha():
    plan = QuantPlan.from_dict({"rules": [{"match": "2", "input": {"bits": 4, "signed": False, "estimator": "pact"}}]})
    net = prepare(_mlp(), plan)
    batches = _batches(2)
    calibrate(net, batches)
    h = torch.cat([net[1](net[0](b[0])) for b in batches]).detach()
    torch.testing.assert_close(net[2].input_quantizer.alpha.detach(), h.max().reshape(1))


def test_per_token_needs_dynamic():
    with pytest.raises(QATConfigError, match="per_token needs dynamic: true"):
        QuantSpec(granularity="per_token")
    plan = QuantPlan.from_dict({"rules": [{"match": "*", "weight": {"bits": 8, "dynamic": True, "granularity": "per_token"}}]})
    with pytest.raises(QATConfigError, match="dynamic / per_token apply to input activations only"):
        plan.resolve(_mlp())
