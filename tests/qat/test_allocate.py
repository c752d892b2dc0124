"""The exact allocator (qat.allocate): within budget always, optimal against brute force, the two
solvers agree; the written preset loads and reproduces the allocation; bad input names the field."""

import itertools
import os

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from qat import QATConfigError, load_plan
from qat.allocate import allocate, allocation_plan, budget_cost, escape_glob, is_mixed_precision, write_preset
from qat.sensitivity import BitOption, SensitivityTable


@st.composite
def problems(draw):
    n_layers = draw(st.integers(1, 5))
    n_opts = draw(st.integers(1, 4))
    numel = [draw(st.integers(1, 40)) for _ in range(n_layers)]
    bits = sorted(draw(st.lists(st.integers(1, 9), min_size=n_opts, max_size=n_opts, unique=True)))
    costs = {f"l{i}": [numel[i] * b for b in bits] for i in range(n_layers)}
    damage = {n: [draw(st.floats(-1, 10, allow_nan=False)) for _ in bits] for n in costs}
    cheapest = sum(min(c) for c in costs.values())
    richest = sum(max(c) for c in costs.values())
    budget = draw(st.integers(cheapest, richest + 5))
    return costs, damage, budget


def _brute(costs, damage, budget):
    best = None
    for combo in itertools.product(*(range(len(c)) for c in costs.values())):
        cost = sum(c[k] for c, k in zip(costs.values(), combo))
        if cost > budget:
            continue
        dmg = sum(d[k] for d, k in zip(damage.values(), combo))
        if best is None or dmg < best - 1e-9:
            best = dmg
    return best


@settings(max_examples=150, deadline=None)
@given(problems())
def test_never_over_budget_and_optimal_like_brute_force(problem):
    costs, damage, budget = problem
    best = _brute(costs, damage, budget)
    for solver in ("dp", "milp"):
        a = allocate(costs, damage, budget, solver=solver)
        assert a.cost <= budget
        assert a.cost == sum(costs[n][a.choice[n]] for n in costs)
        assert a.damage == pytest.approx(best, abs=1e-7), solver


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 10_000), min_size=1, max_size=12), st.floats(2.0, 8.0))
def test_average_bit_budget_is_kept(numel, avg):
    names = [f"layer{i}" for i in range(len(numel))]
    sizes = dict(zip(names, numel))
    budget = budget_cost(sizes, avg_bits=avg)
    a = allocate({n: [s * b for b in (2, 3, 4, 8)] for n, s in sizes.items()},
                 {n: [8.0 / b * (i + 1) for b in (2, 3, 4, 8)] for i, n in enumerate(names)}, budget)
    assert a.cost <= avg * sum(numel) + 1e-6


def test_large_grid_goes_to_the_integer_program():
    # widths without a common factor: the cost grid would be huge, the MILP solves it exactly
    costs = {"a": [2 * 10_000_019, 8 * 10_000_019], "b": [2 * 9_999_991, 8 * 9_999_991], "c": [2 * 7, 8 * 7]}
    damage = {"a": [3.0, 0.0], "b": [1.0, 0.0], "c": [5.0, 0.0]}
    a = allocate(costs, damage, budget=2 * 10_000_019 + 8 * 9_999_991 + 8 * 7 + 1)
    assert a.solver == "milp" and a.choice == {"a": 0, "b": 1, "c": 1}


@pytest.mark.parametrize("bad, match", [
    (dict(budget=1), "below the cheapest allocation"),
    (dict(budget=100, solver="greedy"), r"solver must be one of \['auto', 'dp', 'milp'\]"),
    (dict(budget=10.5), "budget must be an integer"),
])
def test_bad_allocation_input(bad, match):
    with pytest.raises(QATConfigError, match=match):
        allocate({"a": [2, 8]}, {"a": [1.0, 0.0]}, **bad)


def test_bad_tables():
    with pytest.raises(QATConfigError, match="non-finite damage"):
        allocate({"a": [2, 8]}, {"a": [float("nan"), 0.0]}, 8)
    with pytest.raises(QATConfigError, match="different layers"):
        allocate({"a": [2]}, {"b": [0.0]}, 8)
    with pytest.raises(QATConfigError, match="exactly one of avg_bits and bytes"):
        budget_cost({"a": 1}, avg_bits=2, bytes=3)
    with pytest.raises(QATConfigError, match="w<bits>a<bits>"):
        BitOption.parse("4bit")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 3))


def test_written_preset_loads_and_reproduces_the_allocation(tmp_path):
    model = _model()
    base = load_plan("w2a4")
    resolved = base.resolve(model)
    options = (BitOption(2, 4), BitOption(3, 4), BitOption(4, 8), BitOption(8, 8))
    layers = tuple(resolved)
    numel = {n: dict(model.named_modules())[n].weight.numel() for n in layers}
    damage = {"0": (9.0, 1.0, 0.5, 0.0), "3": (0.2, 0.1, 0.05, 0.0), "5": (4.0, 3.0, 0.1, 0.0)}
    table = SensitivityTable("measured", options, layers, numel, damage,
                             {n: (2, 4) for n in layers}, base.to_dict(), 1.0)
    alloc = table.allocate(avg_bits=3)
    assert len(set(alloc.choice.values())) > 1  # a real mix, not one option everywhere
    plan = table.to_plan(alloc.choice, "digits_mp3")
    path = write_preset(tmp_path / "quant" / "digits_mp3.yaml", plan, ["allocated"], table.reasons(alloc.choice))
    text = open(path).read()
    changed = [n for n in layers if options[alloc.choice[n]] != BitOption(2, 4)]
    assert text.count("- match:") == 1 + len(changed)  # the base rule and one rule per changed layer
    assert all(f"# {n}: " in text for n in changed)  # each with its comment
    loaded = load_plan(path)
    assert loaded == plan and is_mixed_precision(loaded)
    got = {n: (lq.weight.bits, lq.input.bits) for n, lq in loaded.resolve(model).items()}
    assert got == {n: (options[k].weight, options[k].input) for n, k in alloc.choice.items()}
    # the preset's other fields are the base plan's: granularity, observer, estimator stay
    assert loaded.resolve(model)["0"].weight.estimator == resolved["0"].weight.estimator


def test_allocation_plan_escapes_names_and_skips_unchanged():
    assert escape_glob("a*b?[c]") == "a[*]b[?][[]c]"
    plan = allocation_plan("w4a8", {"0": (4, 8), "2": (8, 4)}, "m", {"0": (4, 8), "2": (4, 8)})
    assert [(r.match, r.weight, r.input) for r in plan.rules[1:]] == [("2", {"bits": 8}, {"bits": 4})]
    assert not is_mixed_precision("w2a4")


def test_write_preset_refuses_nothing_it_cannot_read_back(tmp_path):
    plan = load_plan("w4a8")
    p = write_preset(os.path.join(tmp_path, "x.yaml"), plan)
    assert load_plan(p) == plan
