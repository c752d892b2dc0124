"""qat.sensitivity.bit_sensitivity: both methods rank a planted weak layer first, are cached (a second
budget or run measures nothing: counted), and report progress; bad input names the field."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qat import QATConfigError
from qat.sensitivity import bit_sensitivity


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[2].weight[0, 0] = 25.0  # an outlier: per-tensor low-bit weights of this layer lose everything else
    data = [(x, model(x).detach()) for x in torch.randn(3, 64, 8)]
    calls = {"n": 0}

    def loss(m, b):
        calls["n"] += 1
        return F.mse_loss(m(b[0]), b[1])

    return model, data, loss, calls


PLAN = {"name": "pt", "rules": [{"match": "*", "weight": {"bits": 4, "granularity": "per_tensor"}, "input": {"bits": 8}}]}


@pytest.mark.parametrize("method", ["measured", "hessian"])
def test_planted_outlier_ranks_first_and_more_bits_do_less_damage(method):
    model, data, loss, _ = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = bit_sensitivity(model, PLAN, data, ["w2a8", "w4a8", "w8a8"], loss, method=method, probes=4)
    assert max(t.layers, key=lambda n: t.damage[n][1]) == "2"  # at 4 bits the outlier layer loses most
    for n in t.layers:
        assert t.damage[n][0] > t.damage[n][2]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is not touched
    assert t.numel == {"0": 256, "2": 1024, "4": 128}


def test_the_two_methods_agree_on_the_order_of_options():
    model, data, loss, _ = _setup()
    a = bit_sensitivity(model, PLAN, data, ["w4a8", "w8a8"], loss, method="measured")
    b = bit_sensitivity(model, PLAN, data, ["w4a8", "w8a8"], loss, method="hessian", probes=8)
    assert sorted(a.layers, key=lambda n: a.damage[n][0]) == sorted(b.layers, key=lambda n: b.damage[n][0])


def test_cache_hit_measures_nothing_again(tmp_path):
    model, data, loss, calls = _setup()
    t1 = bit_sensitivity(model, PLAN, data, ["w2a8", "w8a8"], loss, cache_dir=str(tmp_path))
    first = calls["n"]
    assert first > 0
    a3, a5 = t1.allocate(avg_bits=3), t1.allocate(avg_bits=5)  # two budgets, one measurement
    assert a3.cost <= t1.budget(avg_bits=3) and a5.damage <= a3.damage
    t2 = bit_sensitivity(model, PLAN, data, ["w2a8", "w8a8"], loss, cache_dir=str(tmp_path))
    assert calls["n"] == first  # read from the cache: not one more loss evaluation
    assert t2.to_dict() == t1.to_dict()
    bit_sensitivity(model, PLAN, data, ["w2a8", "w4a8"], loss, cache_dir=str(tmp_path))  # other candidates: a miss
    assert calls["n"] > first
    with torch.no_grad():
        model[0].bias.add_(1.0)  # other weights: another key
    n = calls["n"]
    bit_sensitivity(model, PLAN, data, ["w2a8", "w8a8"], loss, cache_dir=str(tmp_path))
    assert calls["n"] > n


def test_progress_sees_every_step():
    model, data, loss, _ = _setup()
    seen = []

    def progress(items, description, total):
        seen.append((description, total))
        return items

    bit_sensitivity(model, PLAN, data, ["w2a8", "w8a8"], loss, progress=progress)
    assert seen == [("sensitivity (measured)", 6)]


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="fisher"), r"method must be one of \['measured', 'hessian'\]"),
    (dict(candidates=[]), "candidates is empty"),
    (dict(candidates=["w2a8", "w2a8"]), "lists an option twice"),
    (dict(candidates=["w1"]), r"weight bits must be an integer in 2\.\.16"),
    (dict(probes=0), "probes must be an integer >= 1"),
])
def test_bad_input_is_named(kwargs, match):
    model, data, loss, _ = _setup()
    args = dict(candidates=["w2a8", "w8a8"], loss_fn=loss) | kwargs
    with pytest.raises(QATConfigError, match=match):
        bit_sensitivity(model, PLAN, data, **args)


def test_non_finite_loss_is_an_error():
    model, data, _, _ = _setup()
    with pytest.raises(QATConfigError, match="loss is not finite"):
        bit_sensitivity(model, PLAN, data, ["w2a8"], lambda m, b: torch.tensor(float("nan")))
