"""Issue 15: configuration values are checked by type before range. Strings are never read as
booleans (``bool("false")`` is True), numbers given as strings, bools given as ints and the like
are refused with a QATConfigError naming the field and what it takes."""

import math
import os

import pytest
import torch.nn as nn

from qat import LayerRule, QATConfigError, QuantPlan, QuantSpec, available_presets, prepare
from qat.spec import check_field

BOOL_FIELDS = ["signed", "symmetric", "narrow_range", "dynamic"]


@pytest.mark.parametrize("field", BOOL_FIELDS)
@pytest.mark.parametrize("value", ["false", "no", "true", "False", 0, 1, None, 0.0])
def test_string_booleans_are_refused(field, value):
    """The reproduction: signed: "false" / dynamic: "false" quantized signed / dynamic."""
    with pytest.raises(QATConfigError, match=rf"QuantSpec\.{field} must be true or false .*got {value!r}"):
        QuantSpec(**{field: value})


@pytest.mark.parametrize("field,value", [("bits", True), ("bits", 4.0), ("bits", "4"), ("axis", False), ("axis", "0"),
                                         ("axis", 1.5), ("group_size", True), ("group_size", 32.0), ("group_size", "32")])
def test_integers_must_be_integers(field, value):
    extra = {"granularity": "per_group"} if field == "group_size" else {}
    with pytest.raises(QATConfigError, match=rf"QuantSpec\.{field} must be an integer, got {value!r}"):
        QuantSpec(**{field: value}, **extra)


@pytest.mark.parametrize("field", ["averaging_constant", "percentile"])
@pytest.mark.parametrize("value,match", [(True, "must be a number"), ("0.5", "must be a number"), (None, "must be a number"),
                                         (math.nan, "must be a finite number"), (math.inf, "must be a finite number")])
def test_numbers_must_be_finite_numbers(field, value, match):
    with pytest.raises(QATConfigError, match=rf"QuantSpec\.{field} {match}"):
        QuantSpec(**{field: value})


def test_numbers_accept_ints_and_store_floats():
    spec = QuantSpec(averaging_constant=1, percentile=100)
    assert spec.averaging_constant == 1.0 and isinstance(spec.averaging_constant, float)
    assert isinstance(spec.percentile, float)


@pytest.mark.parametrize("field", ["granularity", "observer", "estimator", "round_mode", "scale_dtype", "nonfinite"])
@pytest.mark.parametrize("value", [1, True, None])
def test_choices_must_be_strings(field, value):
    with pytest.raises(QATConfigError, match=rf"QuantSpec\.{field} must be one of \[.*\] \(a string\), got {value!r}"):
        QuantSpec(**{field: value})


def test_range_checks_still_follow_type_checks():
    with pytest.raises(QATConfigError, match=r"QuantSpec.bits must be in 2..16, got 17"):
        QuantSpec(bits=17)
    with pytest.raises(QATConfigError, match=r"QuantSpec.averaging_constant must be in \(0, 1\], got 0.0"):
        QuantSpec(averaging_constant=0)
    with pytest.raises(QATConfigError, match=r"group_size must be a positive integer, got 0"):
        QuantSpec(granularity="per_group", group_size=0)
    assert check_field("observer", "MSE").value == "mse"


def test_plan_rule_values_are_checked_when_the_plan_loads():
    """The saved plan kept the string: now the plan refuses it before any model is seen."""
    with pytest.raises(QATConfigError, match=r"rules\[1\]: LayerRule\(match='head'\)\.input\.signed must be true or false .*got 'no'"):
        QuantPlan.from_dict({"name": "p", "rules": [{"match": "*", "weight": {"bits": 4}},
                                                   {"match": "head", "input": {"bits": 8, "signed": "no"}}]})
    with pytest.raises(QATConfigError, match=r"weight\.bits must be an integer, got '4'"):
        QuantPlan.from_dict({"rules": [{"match": "*", "weight": {"bits": "4"}}]})
    plan = QuantPlan.from_dict({"rules": [{"match": "*", "weight": {"bits": 4, "granularity": "PER_CHANNEL", "averaging_constant": 1}}]})
    assert plan.to_dict()["rules"][0]["weight"] == {"bits": 4, "granularity": "per_channel", "averaging_constant": 1.0}


@pytest.mark.parametrize(
    "rule,match",
    [
        ({"match": "*", "skip": "false"}, r"rules\[0\]: LayerRule\(match='\*'\)\.skip must be true or false .*got 'false'"),
        ({"match": "*", "skip": 0}, r"skip must be true or false"),
        ({"match": "*", "types": 5}, r"types must be a module type name or a list of them .*got 5"),
        ({"match": "*", "types": [5]}, r"unsupported module type 5; valid choices"),
        ({"match": "*", "types": {"Linear": 1}}, r"types must be a module type name or a list"),
        ({"match": 5}, r"LayerRule.match must be a non-empty glob string, got 5"),
        ({"match": "*", "weight": "false"}, r"weight must be a mapping of QuantSpec fields, false, or null; got 'false'"),
    ],
)
def test_layer_rule_fields_are_typed(rule, match):
    with pytest.raises(QATConfigError, match=match):
        QuantPlan.from_dict({"name": "p", "rules": [rule]})


@pytest.mark.parametrize("name", [5, None, "", True])
def test_plan_name_must_be_a_string(name):
    with pytest.raises(QATConfigError, match=r"QuantPlan.name must be a non-empty string"):
        QuantPlan.from_dict({"name": name, "rules": [{"match": "*"}]})


def test_every_preset_still_loads_and_prepares():
    for name in available_presets():
        plan = QuantPlan.preset(name)
        assert QuantPlan.from_dict(plan.to_dict()) == plan
        prepare(nn.Sequential(nn.Linear(64, 32)), plan)


def test_layer_rule_accepts_what_it_always_did():
    assert LayerRule(types="Linear").types == ("Linear",)
    assert LayerRule(types=None).types == ()
    assert LayerRule(weight=True).weight == {} and LayerRule(input=False).input is False


def test_hydra_cli_signed_no_is_refused():
    """From a Hydra command line ``signed=false`` arrives as a bool and ``signed=no`` as the string
    "no": the first is a plan, the second a QATConfigError naming the field."""
    hydra = pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir

    import qat.configs
    from qat.recipes.config import register_configs

    register_configs()
    config_dir = os.path.dirname(qat.configs.__file__)
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        ok = compose(config_name="train", overrides=["quant=w8a8", "quant.rules.0.input.signed=false"])
        assert QuantPlan.from_dict(ok.quant).rules[0].input["signed"] is False
        bad = compose(config_name="train", overrides=["quant=w8a8", "quant.rules.0.input.signed=no"])
        assert bad.quant.rules[0].input.signed == "no"
        with pytest.raises(QATConfigError, match=r"input\.signed must be true or false \(a boolean\), got 'no'"):
            QuantPlan.from_dict(bad.quant)
    assert hydra
