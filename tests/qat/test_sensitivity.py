"""Per-layer sensitivity and the mixed-precision plan built from it."""

import pytest
import torch
import torch.nn as nn

from qat import QATConfigError, prepare
from qat.ptq import calibrate
from qat.sensitivity import LayerSensitivity, layer_sensitivity, mixed_precision_plan


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(256, 16)
    ref = model(x).detach()
    data = [(x[i : i + 64], None) for i in range(0, 256, 64)]

    def neg_mse(m):
        with torch.no_grad():
            return -float((m(x) - ref).pow(2).mean())

    return model, data, neg_mse


# every layer 8-bit but the middle one at 2 bits: it must rank first, whatever the weights
PLAN = {"name": "w8-mid2", "rules": [{"match": "*", "weight": {"bits": 8}}, {"match": "2", "weight": {"bits": 2}}]}


def test_outlier_layer_ranks_first_and_model_is_untouched():
    model, data, neg_mse = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = layer_sensitivity(model, PLAN, data, neg_mse)
    assert [s.name for s in sens][0] == "2"
    assert sens[0].delta > sens[-1].delta >= 0
    assert all(isinstance(m, nn.Linear) and type(m) is nn.Linear for m in model if not isinstance(m, nn.ReLU))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_mixed_precision_plan_beats_uniform():
    model, data, neg_mse = _setup()
    sens = layer_sensitivity(model, PLAN, data, neg_mse)
    mixed = mixed_precision_plan(PLAN, sens, keep=1, weight={"bits": 8})

    def ptq_metric(plan):
        import copy

        m = prepare(copy.deepcopy(model), plan)
        calibrate(m, data)
        return neg_mse(m)

    assert ptq_metric(mixed) > ptq_metric(PLAN)
    assert mixed.resolve(model)["2"].weight.bits == 8


def test_keep_out_of_range():
    with pytest.raises(QATConfigError, match=r"keep must be in 0..1, got 3"):
        mixed_precision_plan("w4a8", [LayerSensitivity("a", 0.0, 0.0)], keep=3)
