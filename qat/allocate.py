"""Mixed precision under a size budget: per-layer bit-widths that minimise the predicted damage.

Given, for every quantized layer, a few candidate options (``w2a4``, ``w4a8``, ...), the size each
option costs (weight elements x weight bits) and the damage each is predicted to do (a
:class:`qat.sensitivity.SensitivityTable`), :func:`allocate` picks one option per layer so that the
total size stays within the budget and the summed damage is as small as it can be. The result is a
plan (:func:`allocation_plan`) and a ``configs/quant/``-style YAML preset (:func:`write_preset`)
with one rule per layer that differs from the base plan and a comment per rule saying why.

The solver is exact. The problem is a multiple-choice knapsack (one option a layer, a budget on the
summed cost, an additive objective). Its costs are integers (bits x elements), so a dynamic program
over the cost grid is exact; dividing every cost and the budget by the costs' greatest common
divisor (the layers' widths share large factors: 147456 for MiniLM's linears) keeps the grid
small. ``solver="dp"`` runs that program: O(layers x options x grid) time, one byte a grid cell
per layer to trace the choice back. Where the grid would be too large (widths with no common
factor) ``solver="auto"`` hands the same problem to ``scipy.optimize.milp`` (HiGHS branch and
bound: one binary a layer and option, one equality a layer, one budget row), which is also exact
and needs no grid. Both return the same optimum; the tests check them against brute force.

Example::

    >>> costs = {"a": [2, 4, 8], "b": [2, 4, 8]}
    >>> damage = {"a": [5.0, 1.0, 0.0], "b": [0.5, 0.1, 0.0]}
    >>> allocate(costs, damage, budget=10).choice
    {'a': 2, 'b': 0}
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import reduce
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

from .errors import QATConfigError
from .plan import LayerRule, QuantPlan, load_plan

__all__ = ["Allocation", "allocate", "allocation_plan", "write_preset", "budget_cost", "escape_glob", "load_plan_from_text",
           "is_mixed_precision", "SOLVERS"]

#: the solvers :func:`allocate` takes
SOLVERS = ("auto", "dp", "milp")

#: grid cells (layers x reduced budget) above which ``solver="auto"`` uses the integer program
_DP_MAX_CELLS = 20_000_000


@dataclass(frozen=True)
class Allocation:
    """What :func:`allocate` chose.

    Args:
        choice: layer -> index of its chosen option.
        cost: the chosen options' summed cost (same unit as the budget: bits).
        damage: their summed predicted damage.
        budget: the budget the allocation had.
        solver: ``"dp"`` or ``"milp"``: which exact solver found it.

    Example::

        >>> Allocation({"a": 1}, 8, 0.5, 8, "dp").choice
        {'a': 1}
    """

    choice: dict[str, int]
    cost: int
    damage: float
    budget: int
    solver: str = "dp"
    extra: dict[str, Any] = field(default_factory=dict)


def escape_glob(name: str) -> str:
    """``name`` as a plan rule's ``match`` glob that matches exactly that layer (``fnmatch``'s
    special characters ``*?[`` put in brackets).

    Example::

        >>> escape_glob("encoder.layer.0.output.dense"), escape_glob("odd[name]")
        ('encoder.layer.0.output.dense', 'odd[[]name]')
    """
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _check(costs: Mapping[str, Sequence[int]], damage: Mapping[str, Sequence[float]]) -> list[str]:
    layers = list(costs)
    if not layers:
        raise QATConfigError("allocate: no layer to allocate (costs is empty)")
    if set(layers) != set(damage):
        raise QATConfigError(f"allocate: costs and damage name different layers: {sorted(set(layers) ^ set(damage))}")
    for n in layers:
        c, d = list(costs[n]), list(damage[n])
        if not c or len(c) != len(d):
            raise QATConfigError(f"allocate: layer {n!r} needs as many damages as costs (>= 1), got {len(c)} and {len(d)}")
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in c):
            raise QATConfigError(f"allocate: layer {n!r} costs must be integers >= 0 (bits), got {c}")
        if any(not math.isfinite(float(x)) for x in d):
            raise QATConfigError(f"allocate: layer {n!r} has a non-finite damage {d}; measure it again")
    return layers


def allocate(
    costs: Mapping[str, Sequence[int]],
    damage: Mapping[str, Sequence[float]],
    budget: int,
    solver: str = "auto",
) -> Allocation:
    """One option per layer, the summed cost within ``budget``, the summed damage minimal (exact).

    Args:
        costs: layer -> each option's cost (integers: weight elements x bits).
        damage: layer -> each option's predicted damage (any finite numbers; lower is better).
        budget: the largest allowed summed cost (same unit).
        solver: ``"dp"`` (dynamic program over the cost grid divided by the costs' GCD), ``"milp"``
            (``scipy.optimize.milp``), or ``"auto"``: the program unless its grid exceeds 2e7 cells.

    Returns:
        the :class:`Allocation`; ties are broken towards the smaller cost, then the earlier option.

    Raises:
        QATConfigError: an unknown solver, mismatched or invalid tables, or a budget below the
            cheapest allocation (the message names that minimum).

    Example::

        >>> allocate({"a": [4, 8]}, {"a": [1.0, 0.0]}, budget=4).choice
        {'a': 0}
        >>> allocate({"a": [4, 8]}, {"a": [1.0, 0.0]}, budget=3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: allocate: budget 3 is below the cheapest allocation (4): ...
    """
    if solver not in SOLVERS:
        raise QATConfigError(f"allocate: solver must be one of {list(SOLVERS)}, got {solver!r}")
    layers = _check(costs, damage)
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise QATConfigError(f"allocate: budget must be an integer number of bits, got {budget!r}")
    cheapest = sum(min(costs[n]) for n in layers)
    if budget < cheapest:
        raise QATConfigError(f"allocate: budget {budget} is below the cheapest allocation ({cheapest}): every layer at its "
                             "smallest option; raise the budget or add smaller candidates")
    g = reduce(math.gcd, (c for n in layers for c in costs[n] if c), 0) or 1
    grid = budget // g
    if solver == "dp" or (solver == "auto" and len(layers) * (grid + 1) <= _DP_MAX_CELLS):
        choice = _dp(layers, costs, damage, g, grid)
        used = "dp"
    else:
        choice = _milp(layers, costs, damage, budget)
        used = "milp"
    cost = sum(costs[n][choice[n]] for n in layers)
    total = float(sum(damage[n][choice[n]] for n in layers))
    return Allocation(choice, cost, total, budget, used)


def _dp(layers: list[str], costs, damage, g: int, grid: int) -> dict[str, int]:
    """Multiple-choice knapsack: best[b] = least damage of the layers so far with reduced cost <= b."""
    import numpy as np

    inf = float("inf")
    best = np.zeros(grid + 1)  # no layer yet: no damage at any budget
    picks = []
    for n in layers:
        new = np.full(grid + 1, inf)
        pick = np.zeros(grid + 1, dtype=np.int16)
        # options by cost, then index: among equal damage the cheaper (then earlier) one wins
        for k in sorted(range(len(costs[n])), key=lambda k: (costs[n][k], k)):
            c = costs[n][k] // g
            if c > grid:
                continue
            cand = np.full(grid + 1, inf)
            cand[c:] = best[: grid + 1 - c] + float(damage[n][k])  # (grid+1-c,) shifted by the option's cost
            better = cand < new
            new[better] = cand[better]
            pick[better] = k
        best = new
        picks.append(pick)
    b = grid
    choice: dict[str, int] = {}
    for n, pick in zip(reversed(layers), reversed(picks)):
        k = int(pick[b])
        choice[n] = k
        b -= costs[n][k] // g
    return {n: choice[n] for n in layers}


def _milp(layers: list[str], costs, damage, budget: int) -> dict[str, int]:
    """The same problem as a 0/1 integer program: x[l, k] in {0, 1}, sum_k x[l, k] = 1, sum cost x <= budget."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    index = [(n, k) for n in layers for k in range(len(costs[n]))]
    c = np.array([float(damage[n][k]) for n, k in index])
    one = np.zeros((len(layers), len(index)))
    for j, (n, _) in enumerate(index):
        one[layers.index(n), j] = 1.0
    cost_row = np.array([[float(costs[n][k]) for n, k in index]])
    res = milp(c, integrality=np.ones(len(index)), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one, 1, 1), LinearConstraint(cost_row, -np.inf, budget)])
    if res.x is None:
        raise QATConfigError(f"allocate: the integer program found no allocation within {budget} ({res.message})")
    choice = {}
    for j, (n, k) in enumerate(index):
        if res.x[j] > 0.5:
            choice[n] = k
    return choice


def budget_cost(numel: Mapping[str, int], avg_bits: Optional[float] = None, bytes: Optional[int] = None) -> int:
    """A budget in bits of quantized weights: ``avg_bits`` x the layers' weight elements, or
    ``bytes`` x 8 (exactly one of the two).

    Example::

        >>> budget_cost({"a": 100, "b": 300}, avg_bits=3), budget_cost({"a": 100}, bytes=50)
        (1200, 400)
    """
    if (avg_bits is None) == (bytes is None):
        raise QATConfigError(f"budget: give exactly one of avg_bits and bytes, got avg_bits={avg_bits!r}, bytes={bytes!r}")
    if avg_bits is not None:
        if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float)) or not math.isfinite(avg_bits) or avg_bits <= 0:
            raise QATConfigError(f"budget.avg_bits must be a finite number > 0 (average weight bits), got {avg_bits!r}")
        return int(math.floor(avg_bits * sum(numel.values()) + 1e-9))
    if isinstance(bytes, bool) or not isinstance(bytes, int) or bytes <= 0:
        raise QATConfigError(f"budget.bytes must be an integer > 0 (bytes of quantized weights), got {bytes!r}")
    return 8 * bytes


def allocation_plan(base: Any, bits: Mapping[str, tuple[int, Optional[int]]], name: str,
                    current: Optional[Mapping[str, tuple[Optional[int], Optional[int]]]] = None) -> QuantPlan:
    """The base plan plus one rule per layer whose ``(weight bits, input bits)`` in ``bits`` differ
    from what the base plan gives it (``current``: layer -> the base plan's ``(weight bits, input
    bits)``, ``None`` where it quantizes nothing; without it every layer gets a rule). Input bits
    ``None`` leave the input as the base plan says; so does a layer whose input is not quantized.

    Example::

        >>> plan = allocation_plan("w4a8", {"0": (4, 8), "2": (8, 8)}, "mixed", {"0": (4, 8), "2": (4, 8)})
        >>> [(r.match, r.weight, r.input) for r in plan.rules[1:]]
        [('2', {'bits': 8}, None)]
    """
    base = load_plan(base)
    rules = list(base.rules)
    for layer, (wb, ab) in bits.items():
        cw, ca = (current or {}).get(layer, (None, None))
        w = None if current is not None and cw == wb else {"bits": int(wb)}
        a = None
        if ab is not None and not (current is not None and (ca is None or ca == ab)):
            a = {"bits": int(ab)}
        if w is not None or a is not None:
            rules.append(LayerRule(match=escape_glob(layer), weight=w, input=a))
    return QuantPlan(rules=tuple(rules), name=name)


def is_mixed_precision(plan: Any) -> bool:
    """Whether the rules of ``plan`` give weights more than one bit-width (a mixed-precision plan,
    such as an allocated one or llama.cpp's ``gguf_q4_k_m``), not one for every layer.

    Example::

        >>> is_mixed_precision("w4a8"), is_mixed_precision("gguf_q4_k_m")
        (False, True)
    """
    bits = {r.weight["bits"] for r in load_plan(plan).rules if isinstance(r.weight, dict) and "bits" in r.weight}
    return len(bits) > 1


def write_preset(path: Union[str, os.PathLike], plan: QuantPlan, header: Sequence[str] = (),
                 why: Optional[Mapping[str, str]] = None) -> str:
    """Write ``plan`` as a ``configs/quant/``-style YAML preset: ``header`` as comment lines on top,
    and above each rule the comment ``why[<layer>]`` (the layer the rule matches). The file loads
    with :func:`qat.load_plan` (a path) or, placed in a ``quant/`` folder on Hydra's search path, as
    ``quant=<name>``. Returns the path.

    Example::

        >>> import os, tempfile
        >>> from qat import load_plan
        >>> plan = QuantPlan.from_dict({"name": "demo", "rules": [{"match": "*", "weight": {"bits": 4}},
        ...                                                    {"match": "fc", "weight": {"bits": 8}}]})
        >>> p = write_preset(os.path.join(tempfile.mkdtemp(), "demo.yaml"), plan, ["a demo"], {"fc": "the head"})
        >>> load_plan(p) == plan, "# the head" in open(p).read()
        (True, True)
    """
    why = dict(why or {})
    lines = [f"# {h}" if h else "#" for h in header]
    lines.append(f"name: {yaml.safe_dump(plan.name, default_style=None).splitlines()[0]}")
    lines.append("rules:")
    for rule in plan.rules:
        d: dict[str, Any] = {"match": rule.match}
        if rule.types:
            d["types"] = list(rule.types)
        for key in ("weight", "input"):
            if getattr(rule, key) is not None:  # False (leave in float) is kept
                d[key] = getattr(rule, key)
        for key in ("skip", "optional"):
            if getattr(rule, key):
                d[key] = True
        note = next((t for layer, t in why.items() if escape_glob(layer) == rule.match), None)
        if note:
            lines.extend(f"  # {t}" for t in note.splitlines())
        body = yaml.safe_dump([d], default_flow_style=None, sort_keys=False, width=200).rstrip().splitlines()
        lines.extend("  " + b for b in body)
    text = "\n".join(lines) + "\n"
    if load_plan_from_text(text) != plan:  # what is written must be what was allocated
        raise QATConfigError(f"write_preset: the YAML of plan {plan.name!r} does not read back as the same plan")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return os.fspath(path)


def load_plan_from_text(text: str) -> QuantPlan:
    """A plan from YAML text (what :func:`write_preset` writes).

    Example::

        >>> load_plan_from_text("name: a\\nrules:\\n  - {match: '*', weight: {bits: 4}}\\n").name
        'a'
    """
    return QuantPlan.from_dict(yaml.safe_load(text))
