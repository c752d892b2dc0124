"""`QuantPlan`: ordered rules that say which layer gets which weight and input quantization.

A rule matches layers by a glob on the qualified module name and, optionally, by module type.
Rules apply in order: a later rule overrides the fields it names of what earlier rules set, so a
plan reads like "everything W4A8, but the classifier W8 and the stem in float"::

    rules:
      - match: "*"
        weight: {bits: 4, granularity: per_channel}
        input: {bits: 8, signed: false, symmetric: false}
      - match: "classifier"
        weight: {bits: 8}          # only bits changes; granularity stays per_channel
      - match: "stem.*"
        skip: true
"""

from __future__ import annotations

import enum
import fnmatch
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping, Optional, Sequence, Union

import torch.nn as nn
import yaml

from .errors import QATConfigError
from .granularity import Layout, weight_view_shape
from .modules import LAYER_TYPES, layer_type
from .spec import Estimator, LayerQuant, QuantSpec, check_field

__all__ = ["LayerRule", "LayerQuant", "QuantPlan", "SUPPORTED_TYPES", "available_presets", "load_plan"]

#: The module types a plan can quantize, by the name rules use in ``types`` (a view of
#: :data:`qat.modules.LAYER_TYPES`).
SUPPORTED_TYPES: dict[str, type[nn.Module]] = {t.name: t.float for t in LAYER_TYPES}

_RULE_FIELDS = ("match", "types", "weight", "input", "skip", "optional")


def _spec_overrides(value: Any, where: str) -> Union[None, bool, dict]:
    """A rule's ``weight`` / ``input``: None (untouched), False (disable) or a dict of fields, each
    value checked on its own (:func:`qat.spec.check_field`) and normalized (enums as their strings),
    so a plan never holds, or saves, a value its spec would refuse."""
    if value is None or value is False:
        return value
    if value is True:
        return {}
    if isinstance(value, QuantSpec):
        return value.to_dict()
    if not isinstance(value, Mapping):
        raise QATConfigError(f"{where} must be a mapping of QuantSpec fields, false, or null; got {value!r}")
    unknown = sorted(set(value) - set(QuantSpec.field_names()))
    if unknown:
        raise QATConfigError(f"{where}: unknown field(s) {unknown}; valid fields: {sorted(QuantSpec.field_names())}")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise QATConfigError(f"{where}: field names must be strings, got {k!r}")
        v = check_field(k, v, where)
        out[k] = v.value if isinstance(v, enum.Enum) else v
    return out


@dataclass(frozen=True)
class LayerRule:
    """One rule of a :class:`QuantPlan`.

    Args:
        match: glob on the qualified module name (``fnmatch``; ``*`` also crosses dots).
        types: module type names the rule is limited to (see :data:`SUPPORTED_TYPES`); empty = all.
        weight: QuantSpec fields for the weight, ``False`` to leave the weight in float, ``None``
            to leave whatever earlier rules said.
        input: the same for the layer's input activation (ignored for ``Embedding``, whose input is
            integer indices).
        skip: leave the matched layers in float altogether (a later rule that gives the layer a
            ``weight`` or ``input`` brings it back).
        optional: a rule that may match no layer (a preset's rule for layer names only some models
            have, such as the per-architecture rules of the k-quant mixes); otherwise that is an error.

    Example::

        >>> LayerRule(match="encoder.*", types=("Linear",), weight={"bits": 4})
        LayerRule(match='encoder.*', types=('Linear',), weight={'bits': 4}, input=None, skip=False, optional=False)
    """

    match: str = "*"
    types: tuple[str, ...] = ()
    weight: Any = None
    input: Any = None
    skip: bool = False
    optional: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.match, str) or not self.match:
            raise QATConfigError(f"LayerRule.match must be a non-empty glob string, got {self.match!r}")
        if self.types is None:
            types = ()
        elif isinstance(self.types, str):
            types = (self.types,)
        elif isinstance(self.types, (list, tuple)):
            types = tuple(self.types)
        else:
            raise QATConfigError(
                f"LayerRule(match={self.match!r}).types must be a module type name or a list of them "
                f"(valid choices: {sorted(SUPPORTED_TYPES)}), got {self.types!r} ({type(self.types).__name__})"
            )
        for t in types:
            if not isinstance(t, str) or t not in SUPPORTED_TYPES:
                raise QATConfigError(
                    f"LayerRule(match={self.match!r}).types: unsupported module type {t!r}; valid choices: {sorted(SUPPORTED_TYPES)}"
                )
        object.__setattr__(self, "types", types)
        object.__setattr__(self, "weight", _spec_overrides(self.weight, f"LayerRule(match={self.match!r}).weight"))
        object.__setattr__(self, "input", _spec_overrides(self.input, f"LayerRule(match={self.match!r}).input"))
        if not isinstance(self.skip, bool):  # "false" / "no" are strings, and bool("false") is True
            raise QATConfigError(
                f"LayerRule(match={self.match!r}).skip must be true or false (a boolean), got {self.skip!r} ({type(self.skip).__name__})"
            )
        if not isinstance(self.optional, bool):
            raise QATConfigError(
                f"LayerRule(match={self.match!r}).optional must be true or false (a boolean), got {self.optional!r} ({type(self.optional).__name__})"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], index: int = 0) -> "LayerRule":
        if not isinstance(data, Mapping):
            raise QATConfigError(f"rules[{index}] must be a mapping with fields {list(_RULE_FIELDS)}, got {data!r}")
        unknown = sorted(set(data) - set(_RULE_FIELDS))
        if unknown:
            raise QATConfigError(f"rules[{index}]: unknown field(s) {unknown}; valid fields: {list(_RULE_FIELDS)}")
        try:
            return cls(**dict(data))
        except QATConfigError as exc:
            raise QATConfigError(f"rules[{index}]: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"match": self.match, "types": list(self.types), "weight": self.weight, "input": self.input, "skip": self.skip, "optional": self.optional}

    def applies_to(self, name: str, module: nn.Module) -> bool:
        if not fnmatch.fnmatchcase(name, self.match):
            return False
        return not self.types or any(type(module) is SUPPORTED_TYPES[t] for t in self.types)


def _check_layer(name: str, module: nn.Module, lq: LayerQuant) -> None:
    """Shape checks that need the layer: group sizes, axes, activation granularity."""
    kind = type(module).__name__
    w = lq.weight
    if w is not None:
        where = f"layer {name!r} ({kind}) weight"
        if w.estimator is Estimator.PACT:
            raise QATConfigError(f"{where}: estimator pact is for activations; valid weight estimators: [ste, lsq, lsq_plus]")
        layout = Layout.of(w)
        if w.dynamic or layout.per_row:
            raise QATConfigError(f"{where}: dynamic / per_token apply to input activations only")
        why = layout.check_shape(weight_view_shape(module.weight.shape, w), "weight", "the layer's input width")
        if why:
            raise QATConfigError(f"{where}: {why}")
    a = lq.input
    if a is not None:
        where = f"layer {name!r} ({kind}) input"
        layout = Layout.of(a)
        linear = isinstance(module, nn.Linear)
        if layout.axis is not None:
            valid = (-1,) if linear else (1,)
            if a.axis not in valid:
                raise QATConfigError(f"{where}: per_channel activations need axis in {list(valid)} (the feature axis), got {a.axis}")
        if layout.group_size is not None:
            if not a.dynamic:
                raise QATConfigError(f"{where}: per_group activations need dynamic: true")
            if not linear:
                raise QATConfigError(f"{where}: per_group activations are supported for Linear layers only")
            why = layout.check_shape((module.in_features,), "the input", "in_features")
            if why:
                raise QATConfigError(f"{where}: {why}")


@dataclass(frozen=True)
class QuantPlan:
    """Ordered rules mapping layers to weight / input quantization.

    Args:
        rules: the rules, applied in order (later ones override the fields they name).
        name: a label for logs and checkpoints.

    Example::

        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> plan = QuantPlan.from_dict({"rules": [
        ...     {"match": "*", "weight": {"bits": 4}, "input": {"bits": 8}},
        ...     {"match": "2", "weight": {"bits": 8}}]})
        >>> {k: v.weight.bits for k, v in plan.resolve(model).items()}
        {'0': 4, '2': 8}
    """

    rules: tuple[LayerRule, ...] = ()
    name: str = "custom"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise QATConfigError(f"QuantPlan.name must be a non-empty string, got {self.name!r} ({type(self.name).__name__})")
        if isinstance(self.rules, (str, bytes, Mapping)) or not isinstance(self.rules, Sequence):
            raise QATConfigError(f"QuantPlan.rules must be a list of rules, got {self.rules!r}")
        rules = tuple(r if isinstance(r, LayerRule) else LayerRule.from_dict(r, i) for i, r in enumerate(self.rules))
        if not rules:
            raise QATConfigError("QuantPlan.rules is empty; give at least one rule (e.g. {match: '*', weight: {bits: 8}})")
        object.__setattr__(self, "rules", rules)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantPlan":
        """From ``{"name": ..., "rules": [...]}`` (a plain dict or an OmegaConf container)."""
        data = _to_container(data)
        if not isinstance(data, Mapping):
            raise QATConfigError(f"a quantization plan must be a mapping with fields ['name', 'rules'], got {type(data).__name__}")
        unknown = sorted(set(data) - {"name", "rules"})
        if unknown:
            raise QATConfigError(f"plan: unknown field(s) {unknown}; valid fields: ['name', 'rules']")
        rules = data.get("rules")
        if not isinstance(rules, Sequence) or isinstance(rules, (str, bytes)):
            raise QATConfigError(f"plan.rules must be a list of rules, got {rules!r}")
        return cls(rules=tuple(LayerRule.from_dict(r, i) for i, r in enumerate(rules)), name=data.get("name", "custom"))

    @classmethod
    def from_yaml(cls, path: Union[str, os.PathLike]) -> "QuantPlan":
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f))

    @classmethod
    def preset(cls, name: str) -> "QuantPlan":
        """A preset shipped in ``configs/quant/`` (the same files Hydra's ``quant=`` group uses)."""
        presets = available_presets()
        if name not in presets:
            raise QATConfigError(f"unknown quantization preset {name!r}; valid presets: {presets}")
        text = resources.files("qat.configs").joinpath("quant", f"{name}.yaml").read_text()
        return cls.from_dict(yaml.safe_load(text))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rules": [r.to_dict() for r in self.rules]}

    # ------------------------------------------------------------------ resolving
    def resolve(self, model: nn.Module) -> dict[str, LayerQuant]:
        """What each layer of ``model`` gets, in module order; layers left in float are absent.

        Raises:
            QATConfigError: a rule matches no layer, matches only unsupported layers, or a spec
                does not fit a layer's shape.
        """
        named = [(n, m) for n, m in model.named_modules() if n]
        candidates = [(n, m) for n, m in named if type(m) in SUPPORTED_TYPES.values()]
        state: dict[str, dict[str, Any]] = {n: {"weight": None, "input": None, "skip": False} for n, _ in candidates}
        for i, rule in enumerate(self.rules):
            hits = [n for n, m in candidates if rule.applies_to(n, m)]
            if not hits:
                if rule.optional:
                    continue
                _raise_no_match(i, rule, named, candidates)
            for n in hits:
                st = state[n]
                if rule.skip:
                    st["skip"] = True
                    continue
                if rule.weight is not None or rule.input is not None:
                    st["skip"] = False  # a later rule that names a layer's specs takes it back from a skip
                for key in ("weight", "input"):
                    over = getattr(rule, key)
                    if over is False:
                        st[key] = None
                    elif over is not None:
                        st[key] = {**(st[key] or {}), **over}
        out: dict[str, LayerQuant] = {}
        for n, m in candidates:
            st = state[n]
            if st["skip"]:
                continue
            weight = None if st["weight"] is None else QuantSpec.from_dict(st["weight"], f"layer {n!r} weight")
            inp = None if st["input"] is None or not layer_type(m).quantizes_input else QuantSpec.from_dict(st["input"], f"layer {n!r} input")
            if weight is None and inp is None:
                continue
            lq = LayerQuant(weight, inp)
            _check_layer(n, m, lq)
            out[n] = lq
        return out


def _raise_no_match(i: int, rule: LayerRule, named, candidates) -> None:
    by_name = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, rule.match)]
    if by_name and not any(type(m) in SUPPORTED_TYPES.values() for _, m in by_name):
        kinds = sorted({type(m).__name__ for _, m in by_name})
        raise QATConfigError(
            f"rules[{i}] (match={rule.match!r}) matches only layer(s) of unsupported type {kinds}: "
            f"{[n for n, _ in by_name][:5]}; supported module types: {sorted(SUPPORTED_TYPES)}"
        )
    some = [n for n, _ in candidates][:8]
    types = f" and types={list(rule.types)}" if rule.types else ""
    raise QATConfigError(
        f"rules[{i}] (match={rule.match!r}{types}) matches no quantizable layer; "
        f"quantizable layers include {some}{' ...' if len(candidates) > 8 else ''}"
    )


def _to_container(data: Any) -> Any:
    """OmegaConf containers to plain Python, without importing OmegaConf in the core."""
    if hasattr(data, "_metadata") and type(data).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf  # optional: only reached when given an OmegaConf object

        return OmegaConf.to_container(data, resolve=True)
    return data


def available_presets() -> list[str]:
    """Names of the presets in ``configs/quant/``.

    Example::

        >>> "w4a8" in available_presets()
        True
    """
    root = resources.files("qat.configs").joinpath("quant")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_plan(plan: Union[str, os.PathLike, Mapping, QuantPlan]) -> QuantPlan:
    """Coerce a preset name, a YAML path, a dict / DictConfig, or a :class:`QuantPlan` to a plan.

    Example::

        >>> load_plan("w8a8").name
        'w8a8'
    """
    if isinstance(plan, QuantPlan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        s = os.fspath(plan)
        if s.endswith((".yaml", ".yml")) or os.sep in s:
            if not os.path.isfile(s):
                raise QATConfigError(f"quantization plan file {s!r} does not exist")
            return QuantPlan.from_yaml(s)
        return QuantPlan.preset(s)
    data = _to_container(plan)
    if isinstance(data, Mapping):
        return QuantPlan.from_dict(data)
    raise QATConfigError(
        f"a quantization plan must be a preset name {available_presets()}, a YAML path, a dict or a QuantPlan; got {type(plan).__name__}"
    )
