"""Per-layer sensitivity: which layers hurt the metric most when quantized, and a mixed-precision
plan that keeps those at higher precision.

Two levels:

* :func:`layer_sensitivity`: one plan, one number a layer (the metric with only that layer
  quantized); :func:`mixed_precision_plan` raises the top-k layers to 8 bits.
* :func:`bit_sensitivity`: a :class:`SensitivityTable` of the predicted damage of every layer at
  every candidate bit-width (``w2a4``, ``w4a8``, ...: weights and inputs), by one of two methods:

  - ``"measured"``: the loss on calibration batches with only that layer quantized at that option,
    minus the float loss (one forward pass a batch, layer and option);
  - ``"hessian"``: HAWQ-v2 (Dong et al. 2020): ``0.5 * Tr(H) / n * ||Q(w) - w||^2`` for the weight
    and the same for the layer's input, the Hessian traces of the loss estimated by Hutchinson's
    method (``E[v^T H v]``, Rademacher ``v``, Hessian-vector products by double backward) on the
    float model, the quantization noise measured with the calibrated quantizers.

  The table is cached on disk (``cache_dir``), keyed by the model's weights and structure, the
  calibration batches, the plan, the candidates and the method's settings, so a second budget, or
  a second run, measures nothing again. :meth:`SensitivityTable.allocate` turns it into the least
  damaging allocation under a size budget (:mod:`qat.allocate`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .errors import QATConfigError
from .plan import LayerRule, QuantPlan, load_plan
from .prepare import enable_fake_quant, prepare, quant_layers
from .ptq import calibrate, default_forward, move_batch

__all__ = ["LayerSensitivity", "layer_sensitivity", "mixed_precision_plan", "BitOption", "SensitivityTable",
           "bit_sensitivity", "sensitivity_key", "METHODS"]


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


#: the methods of :func:`bit_sensitivity`
METHODS = ("measured", "hessian")

_OPTION = re.compile(r"^w(\d+)(?:a(\d+))?$")


@dataclass(frozen=True)
class BitOption:
    """One candidate bit-width of a layer: ``weight`` bits and ``input`` bits (``None``: the input
    stays as the base plan quantizes it).

    Example::

        >>> BitOption.parse("w4a8"), BitOption.parse("w3").label
        (BitOption(weight=4, input=8), 'w3')
        >>> BitOption.parse("int4")
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: candidates: 'int4' is not a bit-width option; write w<bits> or w<bits>a<bits> (e.g. w4a8), or {weight: 4, input: 8}
    """

    weight: int
    input: Optional[int] = None

    def __post_init__(self) -> None:
        for key in ("weight", "input"):
            v = getattr(self, key)
            if v is None and key == "input":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 16:
                raise QATConfigError(f"candidates: {key} bits must be an integer in 2..16, got {v!r}")

    @property
    def label(self) -> str:
        return f"w{self.weight}" + ("" if self.input is None else f"a{self.input}")

    @classmethod
    def parse(cls, value: Any) -> "BitOption":
        """From ``"w4a8"`` / ``"w4"``, an integer (weight bits), ``(4, 8)`` or ``{weight: 4, input: 8}``."""
        if isinstance(value, BitOption):
            return value
        if isinstance(value, str):
            m = _OPTION.match(value.strip().lower())
            if m:
                return cls(int(m.group(1)), None if m.group(2) is None else int(m.group(2)))
        elif isinstance(value, int) and not isinstance(value, bool):
            return cls(value)
        elif isinstance(value, Mapping) and set(value) <= {"weight", "input"} and "weight" in value:
            return cls(value["weight"], value.get("input"))
        elif isinstance(value, (list, tuple)) and len(value) == 2:
            return cls(value[0], value[1])
        raise QATConfigError(f"candidates: {value!r} is not a bit-width option; write w<bits> or w<bits>a<bits> (e.g. w4a8), "
                             "or {weight: 4, input: 8}")


def _options(candidates: Any) -> tuple[BitOption, ...]:
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Iterable):
        raise QATConfigError(f"candidates must be a list of bit-width options (e.g. [w2a4, w4a4, w8a8]), got {candidates!r}")
    opts = tuple(BitOption.parse(c) for c in candidates)
    if not opts:
        raise QATConfigError("candidates is empty; give at least one option (e.g. [w2a4, w4a4, w8a8])")
    if len(set(opts)) != len(opts):
        raise QATConfigError(f"candidates: {[o.label for o in opts]} lists an option twice")
    return opts


@dataclass
class SensitivityTable:
    """The predicted damage of every quantized layer at every candidate option (the result of
    :func:`bit_sensitivity`), and what allocation needs: each layer's weight elements and the
    bits the base plan gives it.

    Args:
        method: ``"measured"`` or ``"hessian"``.
        options: the candidates, in order.
        layers: the quantized layers, in module order.
        numel: layer -> weight elements (0 for a layer whose weight is not quantized).
        damage: layer -> one predicted loss increase per option.
        base_bits: layer -> the base plan's ``(weight bits, input bits)`` (``None``: not quantized).
        plan: the base plan as a dict.
        base_loss: the float model's loss on the calibration batches.
        key: the cache key (:func:`sensitivity_key`).
        extra: method details (the Hessian traces, the per-option noise powers).

    Example::

        >>> t = SensitivityTable("measured", (BitOption(2), BitOption(8)), ("a", "b"), {"a": 10, "b": 30},
        ...                      {"a": (0.5, 0.0), "b": (0.1, 0.0)}, {"a": (2, None), "b": (2, None)}, {}, 1.0)
        >>> t.allocate(avg_bits=3.5).choice      # 10*8 + 30*2 = 140 <= 3.5 * 40
        {'a': 1, 'b': 0}
    """

    method: str
    options: tuple[BitOption, ...]
    layers: tuple[str, ...]
    numel: dict[str, int]
    damage: dict[str, tuple[float, ...]]
    base_bits: dict[str, tuple[Optional[int], Optional[int]]]
    plan: dict[str, Any]
    base_loss: float
    key: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def costs(self) -> dict[str, list[int]]:
        """layer -> each option's cost in bits (weight elements x weight bits)."""
        return {n: [self.numel[n] * o.weight for o in self.options] for n in self.layers}

    def budget(self, avg_bits: Optional[float] = None, bytes: Optional[int] = None) -> int:
        """A budget in bits: ``avg_bits`` x the weight elements, or ``bytes`` x 8."""
        from .allocate import budget_cost

        return budget_cost(self.numel, avg_bits=avg_bits, bytes=bytes)

    def allocate(self, avg_bits: Optional[float] = None, bytes: Optional[int] = None, solver: str = "auto"):
        """The least damaging :class:`qat.allocate.Allocation` within ``avg_bits`` average weight
        bits or ``bytes`` bytes of quantized weights (no measurement: the table is reused)."""
        from .allocate import allocate

        return allocate(self.costs(), self.damage, self.budget(avg_bits, bytes), solver=solver)

    def uniform(self, option: Any) -> dict[str, int]:
        """The choice that gives every layer ``option`` (for comparing against an allocation)."""
        opt = BitOption.parse(option)
        if opt not in self.options:
            raise QATConfigError(f"{opt.label} is not one of the candidates {[o.label for o in self.options]}")
        return {n: self.options.index(opt) for n in self.layers}

    def summary(self, choice: Mapping[str, int]) -> dict[str, float]:
        """``{"bits": ..., "avg_bits": ..., "weight_bytes": ..., "damage": ...}`` of a choice."""
        bits = sum(self.numel[n] * self.options[choice[n]].weight for n in self.layers)
        total = max(sum(self.numel.values()), 1)
        return {"bits": bits, "avg_bits": bits / total, "weight_bytes": bits / 8,
                "damage": float(sum(self.damage[n][choice[n]] for n in self.layers))}

    def to_plan(self, choice: Mapping[str, int], name: str):
        """The base plan plus one rule per layer whose chosen option differs from it
        (:func:`qat.allocate.allocation_plan`)."""
        from .allocate import allocation_plan

        bits = {n: (self.options[choice[n]].weight, self.options[choice[n]].input) for n in self.layers}
        return allocation_plan(self.plan, bits, name, self.base_bits)

    def reasons(self, choice: Mapping[str, int]) -> dict[str, str]:
        """layer -> one line saying why it got its option: its damage at every option, the bits it costs."""
        out = {}
        for n in self.layers:
            k = choice[n]
            others = ", ".join(f"{o.label} {d:.3g}" for o, d in zip(self.options, self.damage[n]))
            out[n] = (f"{n}: {self.options[k].label} ({self.numel[n]} weights) - predicted damage ({self.method}, loss "
                      f"increase) {others}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "options": [o.label for o in self.options], "layers": list(self.layers),
                "numel": self.numel, "damage": {n: list(d) for n, d in self.damage.items()},
                "base_bits": {n: list(b) for n, b in self.base_bits.items()}, "plan": self.plan,
                "base_loss": self.base_loss, "key": self.key, "extra": self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SensitivityTable":
        """The inverse of :meth:`to_dict` (a table read back from the cache or ``sensitivity.json``)."""
        return cls(d["method"], _options(d["options"]), tuple(d["layers"]), {k: int(v) for k, v in d["numel"].items()},
                   {k: tuple(float(x) for x in v) for k, v in d["damage"].items()},
                   {k: tuple(v) for k, v in d["base_bits"].items()}, dict(d["plan"]), float(d["base_loss"]),
                   d.get("key", ""), dict(d.get("extra", {})))


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous().reshape(-1)  # 0-d tensors (BatchNorm counters) cannot be viewed as bytes
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _hash_obj(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        _hash_tensor(h, obj)
    elif isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _hash_obj(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _hash_obj(h, x)
    else:
        h.update(repr(obj).encode())


def sensitivity_key(model: nn.Module, plan: Any, batches: Sequence[Any], candidates: Any, method: str,
                    settings: Optional[Mapping[str, Any]] = None) -> str:
    """The cache key of a :func:`bit_sensitivity` measurement: a SHA-256 of the model (structure
    and every parameter / buffer), the calibration batches, the plan, the candidates, the method
    and its settings. Any change to one of them is another key.

    Example::

        >>> import torch, torch.nn as nn
        >>> m = nn.Linear(4, 2)
        >>> k = sensitivity_key(m, "w4a8", [torch.ones(2, 4)], ["w4a8"], "measured")
        >>> k == sensitivity_key(m, "w4a8", [torch.ones(2, 4)], ["w4a8"], "measured")
        True
        >>> k == sensitivity_key(m, "w4a8", [torch.ones(2, 4)], ["w8a8"], "measured")
        False
    """
    h = hashlib.sha256()
    h.update(b"bit_sensitivity/1")
    h.update(repr(model).encode())
    _hash_obj(h, model.state_dict())
    _hash_obj(h, list(batches))
    h.update(json.dumps(load_plan(plan).to_dict(), sort_keys=True).encode())
    h.update(json.dumps([o.label for o in _options(candidates)]).encode())
    h.update(method.encode())
    h.update(json.dumps(dict(settings or {}), sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def _track(progress: Optional[Callable], items: list, description: str) -> Iterable:
    return items if progress is None else progress(items, description, len(items))


def _option_model(model: nn.Module, base, option: BitOption, layers: Sequence[str], batches, forward_fn):
    """A copy of ``model`` prepared with every layer at ``option``, calibrated on float values
    (fake quantization off while the observers look), fake quantization left off, eval mode."""
    from .allocate import allocation_plan

    work = copy.deepcopy(model)
    prepare(work, allocation_plan(base, {n: (option.weight, option.input) for n in layers}, f"all_{option.label}"))
    enable_fake_quant(work, False)
    calibrate(work, batches, forward_fn=forward_fn)
    work.eval()
    return work


def _mean_loss(model: nn.Module, batches, loss_fn, device) -> float:
    with torch.no_grad():
        values = [float(loss_fn(model, move_batch(b, device))) for b in batches]
    out = sum(values) / len(values)
    if not math.isfinite(out):
        raise QATConfigError(f"bit_sensitivity: the loss is not finite ({out}); check loss_fn and the calibration batches")
    return out


def bit_sensitivity(
    model: nn.Module,
    plan: Any,
    calibration: Iterable[Any],
    candidates: Any,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    method: str = "measured",
    num_batches: Optional[int] = None,
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
    probes: int = 16,
    seed: int = 0,
    progress: Optional[Callable[[Iterable, str, int], Iterable]] = None,
    cache_dir: Optional[str] = None,
) -> SensitivityTable:
    """The predicted damage of every layer the plan quantizes, at every candidate option.

    ``"measured"``: for each option the model is copied, prepared with every layer at that option
    and calibrated (observers on float values); then each layer alone is switched on and the mean
    of ``loss_fn`` over the calibration batches is compared with the float loss. ``"hessian"``:
    Hutchinson estimates (``probes`` Rademacher vectors a batch) of the trace of the loss Hessian
    with respect to each layer's weight and input, on the float model, times the quantization
    noise power of the calibrated quantizers at each option (HAWQ-v2); see the module docstring.
    Both are a loss increase, so tables of the two methods read the same way.

    Args:
        model: the float network (not modified).
        plan: the base plan (preset, path, dict, QuantPlan): which layers are quantized and how
            (granularity, observer, estimator); the options change only the bits.
        calibration: batches (the first ``num_batches`` are used, for calibration and the loss).
        candidates: the options, e.g. ``["w2a4", "w4a4", "w8a8"]`` (:meth:`BitOption.parse`).
        loss_fn: ``(model, batch) -> scalar loss tensor`` (differentiable for ``"hessian"``).
        method: ``"measured"`` or ``"hessian"``.
        num_batches: calibration batches to use (all if None).
        forward_fn: how a batch runs through the model (for calibration).
        probes: Hutchinson probe vectors per batch (``"hessian"``).
        seed: the probes' random seed.
        progress: ``(items, description, total) -> items``: wraps each loop over the work
            (``qat.recipes.progress.track`` draws a bar); None: no progress output.
        cache_dir: a directory for the table (``sens_<key>.json``); a call with the same inputs
            reads it and measures nothing. None: no cache.

    Returns:
        the :class:`SensitivityTable`.

    Raises:
        QATConfigError: an unknown method, bad candidates, no calibration batch, a plan that
            quantizes no layer, or a non-finite loss.

    Example::

        >>> import torch, torch.nn as nn, torch.nn.functional as F
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))
        >>> data = [(x, model(x).detach()) for x in torch.randn(2, 32, 8)]   # distillation: target = float output
        >>> loss = lambda m, b: F.mse_loss(m(b[0]), b[1])
        >>> table = bit_sensitivity(model, "w4a8", data, ["w2a8", "w8a8"], loss)
        >>> table.layers, table.damage["0"][0] > table.damage["0"][1] >= 0
        (('0', '2'), True)
        >>> table.allocate(avg_bits=2).choice                   # every layer at its smallest option
        {'0': 0, '2': 0}
    """
    if method not in METHODS:
        raise QATConfigError(f"bit_sensitivity: method must be one of {list(METHODS)}, got {method!r}")
    options = _options(candidates)
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise QATConfigError(f"bit_sensitivity: probes must be an integer >= 1, got {probes!r}")
    base = load_plan(plan)
    batches = []
    for b in calibration:
        if num_batches is not None and len(batches) >= num_batches:
            break
        batches.append(b)
    if not batches:
        raise QATConfigError("bit_sensitivity: no calibration batch; give at least one")
    settings = {"num_batches": len(batches), **({"probes": probes, "seed": seed} if method == "hessian" else {})}
    key = sensitivity_key(model, base, batches, options, method, settings)
    path = os.path.join(cache_dir, f"sens_{key}.json") if cache_dir else None
    if path and os.path.isfile(path):
        with open(path) as f:
            return SensitivityTable.from_dict(json.load(f))

    resolved = base.resolve(model)
    if not resolved:
        raise QATConfigError("bit_sensitivity: the plan quantizes no layer of this model")
    layers = tuple(resolved)
    modules = dict(model.named_modules())
    numel = {n: (modules[n].weight.numel() if resolved[n].weight is not None else 0) for n in layers}
    base_bits = {n: (None if lq.weight is None else lq.weight.bits, None if lq.input is None else lq.input.bits)
                 for n, lq in resolved.items()}
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        base_loss = _mean_loss(model, batches, loss_fn, device)
        if method == "measured":
            damage, extra = _measured(model, base, options, layers, batches, loss_fn, forward_fn, base_loss, device, progress)
        else:
            quant_in = [n for n in layers if resolved[n].input is not None]  # ordered: the probes are drawn in this order
            damage, extra = _hessian(model, base, options, layers, quant_in, batches, loss_fn, forward_fn, probes, seed,
                                     device, progress)
    finally:
        model.train(was_training)
    table = SensitivityTable(method, options, layers, numel, damage, base_bits, base.to_dict(), base_loss, key, extra)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(table.to_dict(), f)
        os.replace(tmp, path)
    return table


def _measured(model, base, options, layers, batches, loss_fn, forward_fn, base_loss, device, progress):
    damage: dict[str, list[float]] = {n: [0.0] * len(options) for n in layers}
    work_items = [(k, n) for k in range(len(options)) for n in layers]
    current = {}
    for k, n in _track(progress, work_items, "sensitivity (measured)"):
        if k not in current:
            current = {k: _option_model(model, base, options[k], layers, batches, forward_fn)}
        work = current[k]
        layer = dict(quant_layers(work))[n]
        for _, q in layer.quantizers():
            q.enable_fake_quant(True)
        try:
            damage[n][k] = _mean_loss(work, batches, loss_fn, device) - base_loss
        finally:
            for _, q in layer.quantizers():
                q.enable_fake_quant(False)
    return {n: tuple(d) for n, d in damage.items()}, {}


def _hessian(model, base, options, layers, quant_in, batches, loss_fn, forward_fn, probes, seed, device, progress):
    """HAWQ-v2: Hutchinson traces of the loss Hessian (weights, inputs) times the quantization noise."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    tr_w = {n: 0.0 for n in layers}  # mean over batches of Tr(H_w) / n_w
    tr_a = {n: 0.0 for n in layers}  # mean over batches of Tr(H_x) / n_x (input elements of the batch)
    work = copy.deepcopy(model).eval()
    wmods = {n: dict(work.named_modules())[n] for n in layers}
    saved = [(p, p.requires_grad) for p in work.parameters()]
    for p in work.parameters():
        p.requires_grad_(False)
    weights = {n: wmods[n].weight for n in layers}
    for w in weights.values():
        w.requires_grad_(True)
    for b in _track(progress, list(batches), "sensitivity (Hessian trace)"):
        inputs: dict[str, torch.Tensor] = {}

        def hook(name):
            def pre(_m, args):
                x = args[0]
                if not x.requires_grad:  # the network's own input: a leaf we can differentiate by
                    x = x.detach().requires_grad_(True)
                inputs[name] = x
                return (x, *args[1:])
            return pre

        handles = [wmods[n].register_forward_pre_hook(hook(n)) for n in quant_in]
        try:
            with torch.enable_grad():
                loss = loss_fn(work, move_batch(b, device))
                names = [("w", n) for n in layers] + [("a", n) for n in quant_in if n in inputs]
                tensors = [weights[n] if kind == "w" else inputs[n] for kind, n in names]
                grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
                live = [(nm, t, gr) for nm, t, gr in zip(names, tensors, grads) if gr is not None and gr.requires_grad]
                acc = {nm: 0.0 for nm, _, _ in live}
                for i in range(probes):
                    vs = [torch.randint(0, 2, t.shape, generator=g).to(t.device, t.dtype) * 2 - 1 for _, t, _ in live]
                    hv = torch.autograd.grad([gr for _, _, gr in live], [t for _, t, _ in live], grad_outputs=vs,
                                             retain_graph=i < probes - 1, allow_unused=True)
                    for (nm, t, _), v, h in zip(live, vs, hv):
                        if h is not None:
                            acc[nm] += float((v * h).sum()) / t.numel()
        finally:
            for h in handles:
                h.remove()
        for (kind, n), value in acc.items():
            (tr_w if kind == "w" else tr_a)[n] += value / probes / len(batches)
    for p, rg in saved:
        p.requires_grad_(rg)

    noise_w = {n: [0.0] * len(options) for n in layers}
    noise_a = {n: [0.0] * len(options) for n in layers}
    for k in _track(progress, list(range(len(options))), "sensitivity (quantization noise)"):
        qwork = _option_model(model, base, options[k], layers, batches, forward_fn)
        qlayers = dict(quant_layers(qwork))
        with torch.no_grad():
            for n in layers:
                layer = qlayers[n]
                if layer.weight_quantizer is not None:
                    layer.weight_quantizer.enable_fake_quant(True)
                    noise_w[n][k] = float((layer.quantized_weight() - layer.weight).pow(2).sum())
                    layer.weight_quantizer.enable_fake_quant(False)
            sums = {n: 0.0 for n in layers}

            def noise_hook(name):
                def pre(m, args):
                    q = m.input_quantizer
                    q.enable_fake_quant(True)
                    sums[name] += float((q(args[0]) - args[0]).pow(2).sum()) / len(batches)
                    q.enable_fake_quant(False)
                return pre

            handles = [qlayers[n].register_forward_pre_hook(noise_hook(n)) for n in layers
                       if qlayers[n].input_quantizer is not None]
            try:
                for b in batches:
                    forward_fn(qwork, move_batch(b, device))
            finally:
                for h in handles:
                    h.remove()
            for n in layers:
                noise_a[n][k] = sums[n]
    damage = {n: tuple(0.5 * (tr_w[n] * noise_w[n][k] + tr_a[n] * noise_a[n][k]) for k in range(len(options)))
              for n in layers}
    extra = {"trace_weight": tr_w, "trace_input": tr_a, "noise_weight": noise_w, "noise_input": noise_a}
    return damage, extra

