"""GPTQ: lower output error than round-to-nearest, weights exactly on the grid it reports."""

import copy

import pytest
import torch
import torch.nn as nn

from qat import QATConfigError, prepare
from qat.gptq import gptq
from qat.ptq import calibrate


def _data(n=512, d=64, seed=0):
    # correlated inputs with uneven channel scales, as real activations have; one distribution,
    # fresh samples per seed
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(1234)) / d**0.5
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) @ mix) * torch.linspace(0.2, 3.0, d)


def _plan(granularity, **kw):
    w = {"bits": 3, "granularity": granularity, **kw}
    return {"name": "w3", "rules": [{"match": "*", "weight": w}]}


@pytest.mark.parametrize("granularity,kw", [("per_channel", {}), ("per_group", {"group_size": 16}), ("per_tensor", {})])
def test_gptq_beats_round_to_nearest_and_sits_on_its_grid(granularity, kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    x_cal, x_test = _data(seed=0), _data(seed=1)
    ref = model(x_test).detach()

    rtn = prepare(copy.deepcopy(model), _plan(granularity, **kw))
    calibrate(rtn, [x_cal])
    ours = prepare(copy.deepcopy(model), _plan(granularity, **kw))
    losses = gptq(ours, [x_cal[:256], x_cal[256:]])
    assert set(losses) == {"0", "2"}

    err = lambda m: float((m(x_test) - ref).pow(2).mean())
    with torch.no_grad():
        assert err(ours) < 0.8 * err(rtn)
    # the stored weight is exactly what the weight quantizer reproduces with GPTQ's scales
    for layer in (ours[0], ours[2]):
        fq = layer.weight_quantizer
        assert not bool(fq.observer_enabled)
        torch.testing.assert_close(fq(layer.weight).detach(), layer.weight.detach(), atol=0, rtol=0)
        levels = 2**3 if granularity == "per_tensor" else None
        if levels:
            assert len(torch.unique(layer.weight.detach())) <= levels


def test_gptq_errors():
    with pytest.raises(QATConfigError, match="no prepared Linear layer with a weight spec; call qat.prepare first"):
        gptq(nn.Sequential(nn.Linear(4, 4)), [torch.randn(2, 4)])
    m = prepare(nn.Sequential(nn.Linear(4, 4)), _plan("per_channel", axis=1))
    with pytest.raises(QATConfigError, match=r"layer '0' weight is per_channel along axis 1; GPTQ needs axis 0"):
        gptq(m, [torch.randn(2, 4)])
    m = prepare(nn.Sequential(nn.Linear(4, 4)), _plan("per_channel"))
    with pytest.raises(QATConfigError, match=r"damp must be in \[0, 1\), got 2"):
        gptq(m, [torch.randn(2, 4)], damp=2)
    with pytest.raises(QATConfigError, match="calibration data produced no batch"):
        gptq(m, [])
