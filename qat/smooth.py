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
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from .errors import QATConfigError
from .modules import QuantLinear
from .prepare import quant_layers
from .ptq import default_forward, float_pass

__all__ = ["smooth_inputs", "init_smoothing"]


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
        if any(q.is_initialized for _, q in m.quantizers() if not q.spec.dynamic) and not reset_ranges:
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
            if q.observer is not None and q.is_initialized and reset_ranges:
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
