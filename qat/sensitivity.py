"""Per-layer sensitivity: which layers hurt the metric most when quantized, and a mixed-precision
plan that keeps those at higher precision."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch.nn as nn

from .errors import QATConfigError
from .plan import LayerRule, QuantPlan, load_plan
from .prepare import enable_fake_quant, prepare, quant_layers
from .ptq import calibrate, default_forward

__all__ = ["LayerSensitivity", "layer_sensitivity", "mixed_precision_plan"]


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's result: the metric with only this layer quantized, and its change from float."""

    name: str
    metric: float
    delta: float


def layer_sensitivity(
    model: nn.Module,
    plan: Any,
    calibration: Iterable[Any],
    eval_fn: Callable[[nn.Module], float],
    num_batches: Optional[int] = None,
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
    higher_is_better: bool = True,
) -> list[LayerSensitivity]:
    """Quantize one layer at a time (post-training, calibrated) and measure ``eval_fn``.

    The model is copied once and prepared once; observers are calibrated with every quantizer
    passing values through unchanged (so each layer sees float inputs), then each layer's
    quantizers are switched on alone for one evaluation. ``model`` itself is not modified.

    Args:
        model: a float model.
        plan: what each layer would get (preset name, YAML path, dict or QuantPlan).
        calibration: batches for the observers.
        eval_fn: ``model -> metric`` (accuracy, cosine, negative loss, ...).
        num_batches: calibration batches to use (all if None).
        forward_fn: how a batch runs through the model.
        higher_is_better: the metric's direction; ``delta`` is always "damage" (>= 0 is worse).

    Returns:
        One :class:`LayerSensitivity` per quantized layer, most damaging first.

    Example::

        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = [(torch.randn(16, 8), None)] * 2
        >>> ev = lambda m: -float((m(data[0][0]) - model(data[0][0])).pow(2).mean())
        >>> [r.name for r in layer_sensitivity(model, "w2a2", data, ev)]  # doctest: +SKIP
        ['2', '0']
    """
    work = copy.deepcopy(model)
    prepare(work, load_plan(plan))
    layers = list(quant_layers(work))
    if not layers:
        raise QATConfigError("layer_sensitivity: the plan quantizes no layer of this model")
    enable_fake_quant(work, False)
    base = float(eval_fn(work))
    # with fake quant off every observer sees float activations
    calibrate(work, calibration, num_batches=num_batches, forward_fn=forward_fn)
    results = []
    for name, layer in layers:
        for _, q in layer.quantizers():
            q.enable_fake_quant(True)
        metric = float(eval_fn(work))
        for _, q in layer.quantizers():
            q.enable_fake_quant(False)
        delta = (base - metric) if higher_is_better else (metric - base)
        results.append(LayerSensitivity(name, metric, delta))
    return sorted(results, key=lambda r: r.delta, reverse=True)


def mixed_precision_plan(
    plan: Any, sensitivity: list[LayerSensitivity], keep: int, weight: Optional[dict] = None, input: Any = None
) -> QuantPlan:
    """``plan`` plus one rule per most-sensitive layer that raises its precision.

    Args:
        plan: the base plan.
        sensitivity: the output of :func:`layer_sensitivity`.
        keep: how many of the most damaging layers to treat.
        weight: QuantSpec fields for those layers' weights (default ``{"bits": 8}``); ``input`` the
            same for their inputs (default: unchanged). Give ``weight=False`` and ``input=False`` to
            leave them in float.

    Example::

        >>> sens = [LayerSensitivity("head", 0.5, 0.3), LayerSensitivity("body", 0.7, 0.1)]
        >>> [r.match for r in mixed_precision_plan("w4a8", sens, keep=1).rules]
        ['*', 'head']
    """
    base = load_plan(plan)
    if keep < 0 or keep > len(sensitivity):
        raise QATConfigError(f"mixed_precision_plan.keep must be in 0..{len(sensitivity)}, got {keep}")
    weight = {"bits": 8} if weight is None else weight
    extra = tuple(LayerRule(match=r.name, weight=weight, input=input) for r in sensitivity[:keep])
    return QuantPlan(rules=base.rules + extra, name=f"{base.name}+{keep}x{'float' if weight is False else 'hi'}")
