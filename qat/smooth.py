"""Per-input-channel smoothing (SmoothQuant / AWQ-style equalization) of quantized Linear layers.

A layer ``y = W x`` computes the same float function as ``y = (W diag(s)) (diag(s)^-1 x)`` for any
positive ``s``. Quantization does not: large input channels (the outlier dimensions of transformer
hidden states) amplify the rounding error of their weight columns and stretch a per-token activation
range. With ``s_j = mean|x_j|^alpha`` the weight columns that meet large inputs get more of the grid
and the inputs get flatter. A smoothed :class:`~qat.QuantLinear` keeps its float ``weight`` and
holds ``input_smooth`` (``s``, one per input channel): its forward fake-quantizes ``weight * s`` and
``x / s``. ``s`` can be a fixed buffer-like parameter or trained with the rest (learnable
equivalent transformation, as in OmniQuant). Where ``s`` cannot be folded into the previous op (a
LayerNorm whose output also feeds a residual, a GELU), a deployment applies ``x / s`` in the
activation-quantize step; :func:`qat.convert` keeps it and the ONNX export writes it as a ``Div``.

Two ways in: call :func:`smooth_inputs` on a prepared model before calibrating it; or say what to
smooth when preparing (``qat.prepare(model, plan, smooth=SmoothingSpec(...))``, which sets up
identity factors at once, before an optimizer exists) and fit them from calibration batches with
:func:`fit_smoothing`. :class:`qat.callbacks.QuantizationAwareTraining` takes the second way
(its ``smooth`` argument goes to ``prepare``, and its calibration fits the factors).

Example::

    >>> import torch, torch.nn as nn
    >>> from qat import prepare
    >>> from qat.ptq import calibrate
    >>> x = torch.randn(64, 8); x[:, 0] *= 30                    # one outlier channel
    >>> model = prepare(nn.Sequential(nn.Linear(8, 4)), "w4a8", smooth=SmoothingSpec(alpha=0.5))
    >>> factors = fit_smoothing(model, [(x, None)])               # before calibrating
    >>> calibrate(model, [(x, None)])
    1
    >>> bool(factors["0"][0] > 3 * factors["0"][1:].max())
    True
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.nn as nn

from .errors import QATConfigError
from .modules import QuantLinear
from .prepare import quant_layers
from .ptq import default_forward, float_pass

__all__ = ["SmoothingSpec", "fit_smoothing", "init_smoothing", "smooth_inputs"]


def _check_spec(alpha: Any, match: Any, learnable: Any, where: str) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise QATConfigError(f"{where}.alpha must be a number in [0, 1], got {alpha!r}")
    if not isinstance(match, str) or not match:
        raise QATConfigError(f"{where}.match must be a non-empty glob on layer names (e.g. '*'), got {match!r}")
    if not isinstance(learnable, bool):
        raise QATConfigError(f"{where}.learnable must be true or false, got {learnable!r}")


@dataclass(frozen=True)
class SmoothingSpec:
    """What to smooth, for :func:`qat.prepare` (``smooth=``) and :func:`fit_smoothing`.

    Args:
        alpha: migration strength in [0, 1] (:func:`smooth_inputs`): 0 leaves the layers as they
            are, 1 moves all of the input's range into the weight.
        match: glob on the qualified names of the quantized Linear layers to smooth.
        learnable: train the smoothing factors with the model.

    Raises:
        QATConfigError: a field outside its range.

    Example::

        >>> SmoothingSpec(alpha=0.5, match="*attention*")
        SmoothingSpec(alpha=0.5, match='*attention*', learnable=False)
        >>> SmoothingSpec.parse(0.3), SmoothingSpec.parse(None)
        (SmoothingSpec(alpha=0.3, match='*', learnable=False), None)
        >>> SmoothingSpec.parse({"alpha": 0.5, "learnable": True}).learnable
        True
    """

    alpha: float = 0.5
    match: str = "*"
    learnable: bool = False

    def __post_init__(self) -> None:
        _check_spec(self.alpha, self.match, self.learnable, "SmoothingSpec")

    @classmethod
    def parse(cls, value: "SmoothingLike", where: str = "smooth") -> Optional["SmoothingSpec"]:
        """A :class:`SmoothingSpec` from what configs and arguments give.

        Args:
            value: ``None`` / ``False`` (off), ``True`` (the defaults), a number (``alpha``), a
                mapping or ``DictConfig`` of the fields (``alpha: null`` in it: off, so a config
                can hold ``match`` / ``learnable`` with smoothing off), or a :class:`SmoothingSpec`.
            where: how error messages name the value (``f"{where}.alpha must be ..."``).

        Returns:
            the spec, or ``None`` for off.

        Raises:
            QATConfigError: another type, an unknown field, or a field outside its range.

        Example::

            >>> SmoothingSpec.parse(True)
            SmoothingSpec(alpha=0.5, match='*', learnable=False)
            >>> SmoothingSpec.parse({"alpha": None, "learnable": True}) is None    # off
            True
            >>> SmoothingSpec.parse({"alpha": 2.0}, where="QuantizationAwareTraining.smooth")
            Traceback (most recent call last):
            ...
            qat.errors.QATConfigError: QuantizationAwareTraining.smooth.alpha must be a number in [0, 1], got 2.0
        """
        if value is None or value is False:
            return None
        if isinstance(value, cls):
            return value
        if value is True:
            return cls()
        if isinstance(value, (int, float)):
            fields = {"alpha": value}
        elif isinstance(value, Mapping) or hasattr(value, "items"):  # dict, DictConfig
            fields = dict(value.items())
            unknown = sorted(set(fields) - {"alpha", "match", "learnable"})
            if unknown:
                raise QATConfigError(f"{where}: unknown field(s) {unknown}; valid fields: ['alpha', 'learnable', 'match']")
            if "alpha" in fields and fields["alpha"] is None:
                return None
        else:
            raise QATConfigError(
                f"{where} must be null, true, a number (alpha) or a mapping of alpha / match / learnable, got {value!r}"
            )
        fields = {"alpha": 0.5, "match": "*", "learnable": False, **fields}
        _check_spec(fields["alpha"], fields["match"], fields["learnable"], where)
        return cls(**fields)


SmoothingLike = Union[None, bool, float, Mapping, SmoothingSpec]


def _select(model: nn.Module, match: str, who: str) -> dict[str, QuantLinear]:
    layers = {n: m for n, m in quant_layers(model) if isinstance(m, QuantLinear) and fnmatch.fnmatchcase(n, match)}
    if not layers:
        names = [n for n, m in quant_layers(model) if isinstance(m, QuantLinear)]
        raise QATConfigError(f"{who}: match={match!r} selects no QuantLinear layer; quantized Linear layers: {names[:8]}"
                             + (" ..." if len(names) > 8 else ""))
    return layers


def init_smoothing(model: nn.Module, match: str = "*", learnable: bool = False) -> list[str]:
    """Give the matched ``QuantLinear`` layers an identity smoothing (``input_smooth`` of ones).

    The float function and the quantization are unchanged until :func:`smooth_inputs` fills the
    factors in place. It exists so that the parameters are there before an optimizer is built (a
    Lightning ``setup``), and a checkpoint of a smoothed model loads into a fresh prepared one.

    Returns:
        the names of the layers.

    Raises:
        QATConfigError: no QuantLinear layer matches.

    Example::

        >>> import torch.nn as nn
        >>> from qat import prepare
        >>> init_smoothing(prepare(nn.Sequential(nn.Linear(8, 4)), "w4a8"))
        ['0']
    """
    layers = _select(model, match, "init_smoothing")
    for m in layers.values():
        if m.input_smooth is None:
            m.input_smooth = nn.Parameter(torch.ones(m.in_features, device=m.weight.device, dtype=m.weight.dtype),
                                          requires_grad=learnable)
        else:
            m.input_smooth.requires_grad_(learnable)
    return list(layers)


def fit_smoothing(
    model: nn.Module,
    batches: Iterable[Any],
    reset_ranges: bool = False,
    num_batches: Optional[int] = None,
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
) -> dict[str, torch.Tensor]:
    """Fit the smoothing factors that ``qat.prepare(model, plan, smooth=...)`` set up, from ``batches``.

    :func:`smooth_inputs` with the :class:`SmoothingSpec` the model was prepared with (kept as
    ``model.qat_smoothing``); call it before :func:`qat.ptq.calibrate`.

    Args:
        model: a model prepared with ``smooth``.
        batches: calibration batches.
        reset_ranges / num_batches / forward_fn: as :func:`smooth_inputs`.

    Returns:
        ``{layer name: s}`` of the smoothed layers.

    Raises:
        QATConfigError: the model was not prepared with ``smooth`` (and what :func:`smooth_inputs` raises).

    Example::

        >>> import torch, torch.nn as nn
        >>> from qat import prepare
        >>> model = prepare(nn.Sequential(nn.Linear(8, 4)), "w4a8", smooth={"alpha": 0.5, "learnable": True})
        >>> s = fit_smoothing(model, [(torch.randn(16, 8), None)])
        >>> sorted(s), model[0].input_smooth.requires_grad
        (['0'], True)
    """
    spec = getattr(model, "qat_smoothing", None)
    if spec is None:
        raise QATConfigError("fit_smoothing: the model was not prepared with smoothing; use qat.prepare(model, plan, smooth=...) "
                             "or qat.smooth_inputs(model, batches, alpha=...)")
    return smooth_inputs(model, batches, alpha=spec.alpha, match=spec.match, learnable=spec.learnable,
                         reset_ranges=reset_ranges, num_batches=num_batches, forward_fn=forward_fn)


@torch.no_grad()
def smooth_inputs(
    model: nn.Module,
    batches: Iterable[Any],
    alpha: float = 0.5,
    match: str = "*",
    learnable: bool = False,
    reset_ranges: bool = False,
    num_batches: Optional[int] = None,
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
) -> dict[str, torch.Tensor]:
    """Set ``input_smooth`` of the prepared model's ``QuantLinear`` layers from activation statistics.

    Runs ``batches`` through the model with fake quantization and observers off, records each
    matched layer's mean absolute input per channel ``m``, and sets
    ``s = m**alpha / sqrt(max(m**alpha) * min(m**alpha))`` (AWQ's normalization: the geometric middle
    of ``s`` is 1). Call it after :func:`qat.prepare` and before :func:`qat.ptq.calibrate` (the weight
    ranges must be observed on ``weight * s``).

    Args:
        model: a model returned by :func:`qat.prepare`.
        batches: calibration batches.
        alpha: migration strength in [0, 1]: 0 leaves the layer as it is, 1 moves all of the
            input's range into the weight.
        match: glob on the layer's qualified name (e.g. ``"*attention.self.value"``).
        learnable: make ``input_smooth`` trainable (requires_grad) for QAT. A layer that already
            has ``input_smooth`` (:func:`init_smoothing`) is updated in place, so an optimizer
            built before keeps training the same tensor.
        reset_ranges: a matched layer whose quantizers already hold a range (calibrated, or seen
            data in a validation pass) gets its observers reset instead of an error; calibrate
            again afterwards.
        num_batches: use at most this many batches.
        forward_fn: how a batch runs through the model.

    Returns:
        ``{layer name: s}`` of the smoothed layers.

    Raises:
        QATConfigError: ``alpha`` outside [0, 1], no layer matched, a matched layer already
            calibrated (its weight range was observed without ``s``), or no batch given.

    Example::

        >>> import torch.nn as nn
        >>> from qat import prepare
        >>> from qat.ptq import calibrate
        >>> model = prepare(nn.Sequential(nn.Linear(8, 4)), "w4a8")
        >>> data = [(torch.randn(16, 8) * torch.linspace(0.1, 10, 8), None)]
        >>> s = smooth_inputs(model, data, alpha=0.5)
        >>> calibrate(model, data)
        1
        >>> sorted(s)
        ['0']
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise QATConfigError(f"smooth_inputs: alpha must be in [0, 1], got {alpha}")
    layers = _select(model, match, "smooth_inputs")
    for n, m in layers.items():
        # (a weight quantizer that tracks the current weight sets its whole range at every call: its
        # range from the unsmoothed weight is no calibration, and the next call takes s * W)
        if any(q.is_initialized for _, q in m.quantizers() if not (q.spec.dynamic or q.tracks_current_weight)) and not reset_ranges:
            raise QATConfigError(f"smooth_inputs: layer {n!r} is already calibrated; smooth it before qat.ptq.calibrate "
                                 "(or pass reset_ranges=True and calibrate again)")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(mod, inp):
            x = inp[0].detach()  # the raw input: the layer divides by its smoothing inside forward
            x = x.reshape(-1, x.shape[-1]).abs().float()
            sums[name] = sums.get(name, 0) + x.sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    seen = float_pass(model, batches, [(m, hook(n)) for n, m in layers.items()],
                      [q for _, m in quant_layers(model) for _, q in m.quantizers()], num_batches, forward_fn)
    if not seen:
        raise QATConfigError("smooth_inputs: no batch given; pass calibration batches")
    _sync(layers, sums, counts)
    out = {}
    for n, m in layers.items():
        if not counts.get(n):
            raise QATConfigError(f"smooth_inputs: layer {n!r} saw no input in the batches")
        mean = (sums[n] / counts[n]).clamp_min(1e-5)
        s = mean.pow(float(alpha))
        s = s / (s.max() * s.min()).sqrt()
        if m.input_smooth is None:
            m.input_smooth = nn.Parameter(s.to(m.weight.dtype), requires_grad=learnable)
        else:  # in place: an optimizer built on init_smoothing's parameter keeps it
            m.input_smooth.data.copy_(s)
            m.input_smooth.requires_grad_(learnable)
        for _, q in m.quantizers():  # ranges observed without s (if any) no longer apply
            if q.tracks_current_weight and q.is_initialized:
                q.init_from(m.latent_weight())  # the range of s * W now
            elif q.observer is not None and q.is_initialized and reset_ranges:
                q.observer.reset()
                q._set_flag("initialized", False)
        out[n] = s.detach().clone()
    return out


def _sync(layers: dict[str, QuantLinear], sums: dict[str, torch.Tensor], counts: dict[str, int]) -> None:
    """Under torch.distributed, sum the statistics over the ranks, so every rank computes the same
    factors from all ranks' batches (as the observers' ranges are kept identical)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for n, m in layers.items():  # the same layers, in the same order, on every rank
        dev = m.weight.device
        buf = torch.zeros(m.in_features + 1, device=dev, dtype=torch.float64)
        if n in sums:
            buf[:-1] = sums[n].to(dev, torch.float64)
            buf[-1] = counts[n]
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        sums[n] = buf[:-1].float()
        counts[n] = int(buf[-1].item())
