"""`QuantSpec`: how one tensor is quantized. A frozen dataclass of primitives and enums, so the
same class is the Python API and the Hydra schema."""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

import torch

from .errors import QATConfigError

__all__ = [
    "check_format_fields",
    "Granularity",
    "ObserverKind",
    "Estimator",
    "RoundMode",
    "ROUND_MODES",
    "round_with_mode",
    "ScaleDtype",
    "NonFinite",
    "WeightFormat",
    "QuantSpec",
    "LayerQuant",
    "check_field",
]


class _ChoiceEnum(str, enum.Enum):
    @classmethod
    def parse(cls, value: Any, field: str) -> "_ChoiceEnum":
        if isinstance(value, cls):
            return value
        choices = ", ".join(m.value for m in cls)
        if not isinstance(value, str):  # a bool or a number is never a choice (str(True) is 'True')
            raise QATConfigError(f"{field} must be one of [{choices}] (a string), got {value!r} ({type(value).__name__})")
        try:
            return cls(value.lower())
        except ValueError:
            raise QATConfigError(f"{field} must be one of [{choices}], got {value!r}") from None


class Granularity(_ChoiceEnum):
    """Which elements share one scale."""

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"  # along ``axis``
    PER_GROUP = "per_group"  # ``group_size`` consecutive elements of the last axis
    PER_TOKEN = "per_token"  # dynamic activations: one scale per row (all but the last axis)


class ObserverKind(_ChoiceEnum):
    """How statistics become a range."""

    MINMAX = "minmax"
    MOVING_AVERAGE = "moving_average"
    PERCENTILE = "percentile"
    MSE = "mse"
    GGUF_Q4_0 = "gguf_q4_0"  # GGUF Q4_0 scale: signed extreme / qmin (see observers.GGUFQ4_0Observer)


class Estimator(_ChoiceEnum):
    """The gradient estimator of the rounding step."""

    STE = "ste"  # clipped straight-through; scale from the observer
    LSQ = "lsq"  # learned step size (Esser et al. 2019)
    LSQ_PLUS = "lsq_plus"  # learned step size and offset (Bhalgat et al. 2020)
    PACT = "pact"  # learned activation clip (Choi et al. 2018), unsigned activations only


class RoundMode(_ChoiceEnum):
    """How ``x * inv_s`` is rounded to an integer code (:func:`round_with_mode`)."""

    HALF_EVEN = "half_even"  # torch.round / CUDA rintf
    HALF_AWAY = "half_away"  # C roundf: GGUF's Q8_0
    HALF_UP = "half_up"  # floor(v + 0.5): GGUF's Q4_0


#: The rounding modes as the fake-quant ops take them (strings), in the kernels' enumeration order.
ROUND_MODES = tuple(m.value for m in RoundMode)


def round_with_mode(v: torch.Tensor, round_mode: str) -> torch.Tensor:
    """Round a float32 tensor with one of :data:`ROUND_MODES`: half to even (``torch.round``, CUDA
    ``rintf``), half away from zero (C ``roundf``) or half up (``floor(v + 0.5)``).

    Example::

        >>> v = torch.tensor([0.5, 1.5, -0.5])
        >>> round_with_mode(v, "half_even"), round_with_mode(v, "half_away"), round_with_mode(v, "half_up")
        (tensor([0., 2., -0.]), tensor([ 1.,  2., -1.]), tensor([1., 2., 0.]))
    """
    if round_mode == "half_even":
        return torch.round(v)
    if round_mode == "half_away":
        return torch.sign(v) * torch.floor(torch.abs(v) + 0.5)
    if round_mode == "half_up":
        return torch.floor(v + 0.5)
    raise ValueError(f"round_mode must be one of {ROUND_MODES}, got {round_mode!r}")


class ScaleDtype(_ChoiceEnum):
    """The precision scales are stored in (GGUF blocks store float16 scales)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"


class NonFinite(_ChoiceEnum):
    """What an observer does with NaN / Inf elements of a batch (``docs/math.md``, section 11)."""

    IGNORE = "ignore"  # ranges over the finite elements only (no device sync)
    RAISE = "raise"  # a QATConfigError on the first batch holding one (one device sync a batch)


class WeightFormat(_ChoiceEnum):
    """The number format of a tensor: ``affine`` (integer codes, a scale and zero point a group),
    one of llama.cpp's two-level k-quants (``qat/kquants.py``; weights only), or a microscaling /
    FP8 float format (``qat/microscaling.py``; weights and activations)."""

    AFFINE = "affine"
    Q2_K = "q2_k"
    Q3_K = "q3_k"
    Q4_K = "q4_k"
    Q5_K = "q5_k"
    Q6_K = "q6_k"
    MXFP4 = "mxfp4"
    MXFP8 = "mxfp8"
    NVFP4 = "nvfp4"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"


_ENUM_FIELDS = {
    "granularity": Granularity,
    "observer": ObserverKind,
    "estimator": Estimator,
    "round_mode": RoundMode,
    "scale_dtype": ScaleDtype,
    "nonfinite": NonFinite,
    "format": WeightFormat,
}

_BOOL_FIELDS = ("signed", "symmetric", "narrow_range", "dynamic")
_INT_FIELDS = ("bits", "axis")
_FLOAT_FIELDS = ("averaging_constant", "percentile")


def _check_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):  # "false", "no", 0 and 1 are not booleans: bool("false") is True
        raise QATConfigError(f"{where} must be true or false (a boolean), got {value!r} ({type(value).__name__})")
    return value


def _check_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise QATConfigError(f"{where} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def _check_float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise QATConfigError(f"{where} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise QATConfigError(f"{where} must be a finite number, got {value!r}")
    return value


def check_format_fields(
    spec: Any, noun: str, want: Mapping[str, Any], estimators: list[str], extra_bad: tuple = (), extra_want: Optional[Mapping[str, Any]] = None
) -> None:
    """Check that ``spec`` has the field values a weight / tensor format fixes: ``want`` (field ->
    value; enums compared by value), an estimator in ``estimators``, and no ``extra_bad`` (further
    unmet requirements, already worded). What the k-quants and the float formats check
    (:func:`qat.kquants.check_kquant_spec`, :func:`qat.microscaling.check_microscaling_spec`).

    Raises:
        QATConfigError: naming each field at fault and what it got, then every field the format
            takes (``want``, ``extra_want``, the estimators) as ``a <noun> is {...}``.

    Example::

        >>> check_format_fields(QuantSpec(bits=8), "Q8 tensor", {"bits": 4}, ["ste"])
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: QuantSpec.format affine needs bits=4 (got 8); a Q8 tensor is {bits: 4, estimator: ste}
    """
    got = {k: getattr(spec, k) for k in want}
    got = {k: (v.value if hasattr(v, "value") else v) for k, v in got.items()}
    bad = [f"{k}={want[k]!r} (got {got[k]!r})" for k in want if got[k] != want[k]] + list(extra_bad)
    if spec.estimator.value not in estimators:
        bad.append(f"estimator one of {list(estimators)} (got {spec.estimator.value!r})")
    if bad:
        shown = {**want, **(extra_want or {}), "estimator": "|".join(estimators)}
        need = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in shown.items())
        raise QATConfigError(f"QuantSpec.format {spec.format.value} needs {', '.join(bad)}; a {noun} is {{{need}}}")


def check_field(name: str, value: Any, where: str = "QuantSpec") -> Any:
    """Check one :class:`QuantSpec` field's value on its own (its type, then what it alone allows)
    and return it normalized: enums parsed, integers as ``int``, numbers as ``float``. Checks that
    involve several fields (``narrow_range`` needs ``signed``, ...) are :class:`QuantSpec`'s.

    Raises:
        QATConfigError: an unknown field, or a value of the wrong type or out of range, naming
            ``where.name`` and what it takes.

    Example::

        >>> check_field("bits", 4), check_field("granularity", "PER_CHANNEL").value
        (4, 'per_channel')
        >>> check_field("signed", "no")
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: QuantSpec.signed must be true or false (a boolean), got 'no' (str)
    """
    field = f"{where}.{name}"
    if name in _ENUM_FIELDS:
        return _ENUM_FIELDS[name].parse(value, field)
    if name in _BOOL_FIELDS:
        return _check_bool(value, field)
    if name in _INT_FIELDS:
        value = _check_int(value, field)
        if name == "bits" and not 2 <= value <= 16:
            raise QATConfigError(f"{field} must be in 2..16, got {value}")
        return value
    if name == "group_size":
        if value is None:
            return None
        value = _check_int(value, field)
        if value < 1:
            raise QATConfigError(f"{field} must be a positive integer, got {value}")
        return value
    if name in _FLOAT_FIELDS:
        value = _check_float(value, field)
        if name == "averaging_constant" and not 0.0 < value <= 1.0:
            raise QATConfigError(f"{field} must be in (0, 1], got {value}")
        if name == "percentile" and not 50.0 < value <= 100.0:
            raise QATConfigError(f"{field} must be in (50, 100], got {value}")
        return value
    valid = [f.name for f in fields(QuantSpec)]
    raise QATConfigError(f"{where}: unknown field {name!r}; valid fields: {sorted(valid)}")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (a weight, or a layer's input activation) is fake-quantized.

    Args:
        bits: integer bit-width, 2..16.
        signed: signed range ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.
        symmetric: zero point fixed at 0 (signed: a range symmetric about 0; unsigned: ``[0, max]``); else
            fitted (affine).
        narrow_range: drop the most negative code (``[-(2^(b-1)-1), 2^(b-1)-1]``), signed only.
        granularity: ``per_tensor``, ``per_channel`` (along ``axis``), ``per_group`` (``group_size``
            consecutive elements of the last axis) or ``per_token`` (dynamic activations only).
        axis: channel axis for ``per_channel``.
        group_size: elements per group for ``per_group``.
        observer: ``minmax``, ``moving_average``, ``percentile`` or ``mse``.
        averaging_constant: moving-average weight of a new batch, in (0, 1].
        percentile: for ``percentile``, the kept fraction in percent, in (50, 100].
        estimator: ``ste``, ``lsq``, ``lsq_plus`` or ``pact``.
        round_mode: ``half_even`` (torch.round), ``half_away`` or ``half_up``.
        scale_dtype: ``float32``, or ``float16`` to round scales to float16 (GGUF).
        dynamic: compute the range from each batch (no observer state), for activations.
        nonfinite: what observers do with NaN / Inf elements: ``ignore`` (default: ranges over the
            finite elements only; a parameter with none keeps its range) or ``raise`` (a
            ``QATConfigError``; costs one device sync a batch on a GPU).
        format: ``affine`` (default), a llama.cpp k-quant ``q2_k`` .. ``q6_k`` (weights only; it
            fixes the other fields, see :func:`qat.kquants.check_kquant_spec`), or a float format
            ``mxfp4``, ``mxfp8``, ``nvfp4``, ``fp8_e4m3``, ``fp8_e5m2`` (weights or inputs; see
            :func:`qat.microscaling.check_microscaling_spec`).

    Every field is checked by type before range: booleans must be ``True`` / ``False`` (the
    strings ``"false"`` or ``"no"`` are refused, not read as true), integers must be integers
    (not bools, floats or strings), numbers may be ints or floats but not bools, strings, NaN or
    infinity.

    Example::

        >>> spec = QuantSpec(bits=4, granularity="per_channel", axis=0)
        >>> spec.qmin, spec.qmax
        (-8, 7)
        >>> QuantSpec(bits=8, signed=False, symmetric=False).qmax
        255
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    granularity: Granularity = Granularity.PER_TENSOR
    axis: int = 0
    group_size: Optional[int] = None
    observer: ObserverKind = ObserverKind.MINMAX
    averaging_constant: float = 0.01
    percentile: float = 99.99
    estimator: Estimator = Estimator.STE
    round_mode: RoundMode = RoundMode.HALF_EVEN
    scale_dtype: ScaleDtype = ScaleDtype.FLOAT32
    dynamic: bool = False
    nonfinite: NonFinite = NonFinite.IGNORE
    format: WeightFormat = WeightFormat.AFFINE

    def __post_init__(self) -> None:
        # every field on its own first (type, then range), in declaration order
        for f in fields(self):
            object.__setattr__(self, f.name, check_field(f.name, getattr(self, f.name)))
        if self.narrow_range and not self.signed:
            raise QATConfigError("QuantSpec.narrow_range applies to signed ranges only; set signed: true or narrow_range: false")
        if self.granularity is Granularity.PER_GROUP:
            if self.group_size is None:
                raise QATConfigError(
                    f"QuantSpec.group_size must be a positive integer when granularity is per_group, got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise QATConfigError(
                f"QuantSpec.group_size={self.group_size} is only valid with granularity per_group, got {self.granularity.value}"
            )
        if self.granularity is Granularity.PER_TOKEN and not self.dynamic:
            raise QATConfigError("QuantSpec.granularity per_token needs dynamic: true (per-token scales come from each batch)")
        if self.estimator is Estimator.PACT:
            if self.signed:
                raise QATConfigError("QuantSpec.estimator pact clips to [0, alpha]: it needs signed: false")
            if self.granularity is not Granularity.PER_TENSOR:
                raise QATConfigError("QuantSpec.estimator pact learns one clip per tensor: it needs granularity per_tensor")
        if self.dynamic and self.estimator is not Estimator.STE:
            raise QATConfigError(
                f"QuantSpec.dynamic ranges come from each batch and cannot be learned: estimator must be ste, got {self.estimator.value}"
            )
        if self.format is not WeightFormat.AFFINE:
            # the format owners (they import nothing of this module)
            from .microscaling import check_microscaling_spec, is_microscaling

            if is_microscaling(self.format):
                check_microscaling_spec(self)
            else:
                from .kquants import check_kquant_spec

                check_kquant_spec(self)

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def learned(self) -> bool:
        return self.estimator is not Estimator.STE

    def replace(self, **changes: Any) -> "QuantSpec":
        """A copy with some fields changed (validated)."""
        return QuantSpec.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain-primitive dict (enums as their string values), for YAML / checkpoints / W&B."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.value if isinstance(v, enum.Enum) else v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "QuantSpec") -> "QuantSpec":
        """Build from a mapping, rejecting unknown keys with the list of valid ones."""
        if not isinstance(data, Mapping):
            raise QATConfigError(f"{where} must be a mapping of QuantSpec fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise QATConfigError(f"{where}: unknown field(s) {unknown}; valid fields: {sorted(known)}")
        try:
            return cls(**dict(data))
        except QATConfigError as exc:
            if where != "QuantSpec":
                raise QATConfigError(f"{where}: {exc}") from None
            raise

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class LayerQuant:
    """What one layer gets: a weight spec and an input spec, each ``None`` for float.

    Example::

        >>> LayerQuant(QuantSpec(bits=4)).to_dict()["weight"]["bits"]
        4
    """

    weight: Optional[QuantSpec] = None
    input: Optional[QuantSpec] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight": None if self.weight is None else self.weight.to_dict(),
            "input": None if self.input is None else self.input.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerQuant":
        return cls(
            weight=None if data.get("weight") is None else QuantSpec.from_dict(data["weight"]),
            input=None if data.get("input") is None else QuantSpec.from_dict(data["input"]),
        )
