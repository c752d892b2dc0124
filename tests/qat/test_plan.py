"""QuantSpec / QuantPlan: resolution semantics and every user error, each naming the field or layer
and the valid choices."""

import pytest
import torch.nn as nn

from qat import LayerRule, QATConfigError, QuantPlan, QuantSpec, available_presets, load_plan, prepare


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.body = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 24))
        self.emb = nn.Embedding(10, 24)
        self.rnn = nn.LSTM(4, 4)
        self.head = nn.Linear(24, 5)


def _plan(*rules):
    return QuantPlan.from_dict({"name": "t", "rules": list(rules)})


def test_presets_load_by_name_and_resolve():
    assert {"w8a8", "w4a8", "w4a4", "w2a2"} <= set(available_presets())
    for name in ("w8a8", "w4a8", "w4a4", "w2a2"):
        plan = QuantPlan.preset(name)
        resolved = plan.resolve(Net())
        bits_w, bits_a = int(name[1]), int(name[3])
        assert all(lq.weight.bits == bits_w for lq in resolved.values())
        assert all(lq.input is None or lq.input.bits == bits_a for lq in resolved.values())


def test_later_rules_override_named_fields_only():
    plan = _plan(
        {"match": "*", "weight": {"bits": 4, "granularity": "per_channel"}, "input": {"bits": 8}},
        {"match": "head", "weight": {"bits": 8}},
        {"match": "body.*", "types": ["Linear"], "input": False},
    )
    r = plan.resolve(Net())
    assert r["head"].weight.bits == 8 and r["head"].weight.granularity.value == "per_channel"
    assert r["stem"].weight.bits == 4 and r["stem"].input.bits == 8
    assert r["body.0"].input is None and r["body.0"].weight.bits == 4
    assert r["emb"].input is None  # embedding inputs are indices
    assert list(r) == ["stem", "body.0", "body.2", "emb", "head"]  # module order


def test_skip_and_unskip():
    plan = _plan({"match": "*", "weight": {"bits": 4}}, {"match": "body.*", "skip": True}, {"match": "body.2", "weight": {"bits": 8}})
    r = plan.resolve(Net())
    assert "body.0" not in r and r["body.2"].weight.bits == 8


def test_plan_roundtrips_through_dict():
    plan = QuantPlan.preset("w4a8")
    assert QuantPlan.from_dict(plan.to_dict()) == plan


def test_load_plan_accepts_yaml_path_dict_and_plan(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("name: mine\nrules:\n  - match: '*'\n    weight: {bits: 3}\n")
    assert load_plan(str(p)).name == "mine"
    assert load_plan({"rules": [{"match": "*"}]}).name == "custom"
    plan = QuantPlan.preset("w8a8")
    assert load_plan(plan) is plan


def test_spec_ranges():
    assert (QuantSpec(bits=4).qmin, QuantSpec(bits=4).qmax) == (-8, 7)
    assert (QuantSpec(bits=8, narrow_range=True).qmin) == -127
    assert (QuantSpec(bits=3, signed=False).qmin, QuantSpec(bits=3, signed=False).qmax) == (0, 7)


# ------------------------------------------------------------------ user errors (each names field + choices)
ERRORS = [
    (lambda: load_plan("w5a5"), r"unknown quantization preset 'w5a5'; valid presets: \[.*'w4a8'"),
    (lambda: QuantSpec(bits=1), r"QuantSpec.bits must be in 2..16, got 1"),
    (lambda: QuantSpec(bits=17), r"QuantSpec.bits must be in 2..16, got 17"),
    (lambda: QuantSpec(granularity="per_row"), r"QuantSpec.granularity must be one of \[per_tensor, per_channel, per_group"),
    (lambda: QuantSpec(observer="histogram"), r"QuantSpec.observer must be one of \[minmax, moving_average"),
    (lambda: QuantSpec(estimator="dorefa"), r"QuantSpec.estimator must be one of \[ste, lsq, lsq_plus, pact\]"),
    (lambda: QuantSpec(granularity="per_group"), r"QuantSpec.group_size must be a positive integer when granularity is per_group"),
    (lambda: QuantSpec(group_size=32), r"group_size=32 is only valid with granularity per_group"),
    (lambda: QuantSpec(signed=False, narrow_range=True), r"narrow_range applies to signed ranges only"),
    (lambda: QuantSpec(estimator="pact"), r"estimator pact clips to \[0, alpha\]: it needs signed: false"),
    (lambda: QuantSpec(granularity="per_token"), r"per_token needs dynamic: true"),
    (lambda: QuantSpec.from_dict({"bitz": 4}), r"unknown field\(s\) \['bitz'\]; valid fields: \[.*'bits'"),
    (lambda: _plan({"match": "*", "weight": {"bitz": 4}}), r"weight: unknown field\(s\) \['bitz'\]; valid fields"),
    (lambda: _plan({"match": "*", "wieght": {"bits": 4}}), r"rules\[0\]: unknown field\(s\) \['wieght'\]; valid fields: \['match', 'types'"),
    (lambda: _plan({"match": "*", "types": ["LSTM"]}), r"unsupported module type 'LSTM'; valid choices: \['Conv1d', 'Conv2d', 'Embedding', 'Linear'\]"),
    (lambda: QuantPlan.from_dict({"name": "x", "rules": []}), r"QuantPlan.rules is empty"),
    (lambda: QuantPlan.from_dict({"rules": [], "extra": 1}), r"plan: unknown field\(s\) \['extra'\]; valid fields: \['name', 'rules'\]"),
    (lambda: load_plan("/no/such/plan.yaml"), r"quantization plan file '/no/such/plan.yaml' does not exist"),
    (lambda: load_plan(42), r"must be a preset name \[.*\], a YAML path, a dict or a QuantPlan; got int"),
]


@pytest.mark.parametrize("make,match", ERRORS, ids=[m for _, m in ERRORS])
def test_user_errors(make, match):
    with pytest.raises(QATConfigError, match=match):
        make()


MODEL_ERRORS = [
    ({"match": "decoder.*", "weight": {"bits": 4}}, r"rules\[0\] \(match='decoder.\*'\) matches no quantizable layer; quantizable layers include \['stem'"),
    ({"match": "rnn", "weight": {"bits": 4}}, r"matches only layer\(s\) of unsupported type \['LSTM'\].*supported module types: \['Conv1d'"),
    ({"match": "body.0", "weight": {"bits": 4, "granularity": "per_group", "group_size": 5}}, r"layer 'body.0' \(Linear\) weight: group_size=5 does not divide the layer's input width 8"),
    ({"match": "head", "weight": {"bits": 4, "granularity": "per_channel", "axis": 3}}, r"layer 'head' \(Linear\) weight: axis=3 out of range for weight of shape \(5, 24\); valid axes: 0..1"),
    ({"match": "head", "weight": {"bits": 4, "signed": False, "estimator": "pact"}}, r"layer 'head' \(Linear\) weight: estimator pact is for activations; valid weight estimators"),
    ({"match": "head", "input": {"bits": 8, "granularity": "per_channel", "axis": 0}}, r"layer 'head' \(Linear\) input: per_channel activations need axis in \[-1\]"),
    ({"match": "head", "types": ["Conv2d"], "weight": {"bits": 4}}, r"matches no quantizable layer"),
]


@pytest.mark.parametrize("rule,match", MODEL_ERRORS, ids=[m[:40] for _, m in MODEL_ERRORS])
def test_errors_that_need_the_model(rule, match):
    with pytest.raises(QATConfigError, match=match):
        _plan(rule).resolve(Net())


def test_prepare_twice_is_an_error():
    model = prepare(nn.Sequential(nn.Linear(4, 4)), "w8a8")
    with pytest.raises(QATConfigError, match="already prepared"):
        prepare(model, "w8a8")


def test_layer_rule_accepts_spec_objects():
    rule = LayerRule(weight=QuantSpec(bits=3))
    assert rule.weight["bits"] == 3
