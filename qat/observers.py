"""Observers: statistics of a tensor, turned into a scale and zero point.

Every observer reduces a tensor to per-parameter ``(min, max)`` with the same granularity rule as
the fake-quant op (:class:`qat.granularity.Layout`: per-tensor, per-channel along an axis,
per-group along the last axis), keeps
its state in buffers (so it checkpoints and moves with the module), and, under
``torch.distributed``, makes that state identical on every rank with one coalesced all-reduce per
update.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import QATConfigError
from .flags import FlagBuffers
from .granularity import Layout
from .spec import ObserverKind, QuantSpec, ScaleDtype

__all__ = [
    "Observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PercentileObserver",
    "MSEObserver",
    "GGUFQ4_0Observer",
    "OBSERVERS",
    "make_observer",
    "qparams_from_range",
]

_EPS = torch.finfo(torch.float32).eps


def qparams_from_range(mn: torch.Tensor, mx: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (float32, integer-valued) that cover ``[mn, mx]`` (always including 0).

    Symmetric signed ranges use ``s = max(|mn|, |mx|) / ((qmax - qmin) / 2)`` and ``z = 0`` (as
    PyTorch's observers do); symmetric unsigned ranges use ``s = mx / qmax`` and ``z = 0``;
    asymmetric ranges fit ``[mn, mx]`` onto ``[qmin, qmax]`` with an integer zero point. Scales never
    fall below float32's epsilon, so a constant or all-zero tensor gives a tiny positive scale,
    never NaN or inf.
    """
    mn = torch.clamp(mn.float(), max=0.0)
    mx = torch.clamp(mx.float(), min=0.0)
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:
        if spec.signed:
            scale = torch.maximum(-mn, mx) / ((qmax - qmin) / 2)
        else:
            scale = mx / (qmax - qmin)
        scale = _finish_scale(scale, spec)
        zp = torch.zeros_like(scale)
    else:
        scale = _finish_scale((mx - mn) / (qmax - qmin), spec)
        zp = torch.clamp(qmin - torch.round(mn / scale), qmin, qmax)
    return scale, zp


def _finish_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    scale = torch.nan_to_num(scale, nan=_EPS, posinf=torch.finfo(torch.float32).max)
    scale = torch.clamp(scale, min=_EPS)
    if spec.scale_dtype is ScaleDtype.FLOAT16:
        # stored as float16 by the target format: train with exactly the value it will hold
        scale = torch.clamp(scale, min=2.0**-14, max=65504.0).half().float()
    return scale


def _sync_minmax(mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global min / max across ranks with one all-reduce (``max`` of ``[-min, max]``)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mn, mx
    buf = torch.cat([-mn.reshape(-1), mx.reshape(-1)])
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    n = mn.numel()
    return (-buf[:n]).reshape(mn.shape), buf[n:].reshape(mx.shape)


class Observer(FlagBuffers):
    """Base observer: buffers ``min_val``, ``max_val`` and ``initialized``.

    Subclasses implement :meth:`_combine` (how a new batch's range merges into the state).

    Args:
        spec: the quantization spec (granularity, bits, ...).
        shape: the scale's shape (:meth:`qat.granularity.Layout.param_shape`).
        sync: all-reduce statistics across ranks (set for activations; weights are identical anyway).
    """

    def __init__(self, spec: QuantSpec, shape: tuple[int, ...], sync: bool = False):
        super().__init__()
        self.spec = spec
        self.layout = Layout.of(spec)
        self.sync = sync
        self.register_buffer("min_val", torch.zeros(shape))
        self.register_buffer("max_val", torch.zeros(shape))
        self._register_flag("initialized", False)

    @property
    def is_initialized(self) -> bool:
        """Whether the observer has seen data (no device sync)."""
        return self.flag("initialized")

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's per-parameter range (subclasses may replace min/max by another statistic)."""
        return self.layout.aminmax(x)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mn, mx = self.batch_range(x)
        if self.sync:
            mn, mx = _sync_minmax(mn, mx)
        mn, mx = mn.reshape(self.min_val.shape), mx.reshape(self.max_val.shape)
        if not self.is_initialized:
            self.min_val.copy_(mn)
            self.max_val.copy_(mx)
            self._set_flag("initialized", True)
        else:
            self._combine(mn, mx)
        return x

    def _combine(self, mn: torch.Tensor, mx: torch.Tensor) -> None:
        raise NotImplementedError

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` for the range seen so far."""
        return qparams_from_range(self.min_val, self.max_val, self.spec)

    def reset(self) -> None:
        self._set_flag("initialized", False)


class MinMaxObserver(Observer):
    """Running min / max over every batch seen (PyTorch's ``MinMaxObserver``)."""

    def _combine(self, mn, mx):
        torch.minimum(self.min_val, mn, out=self.min_val)
        torch.maximum(self.max_val, mx, out=self.max_val)


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of each batch's min / max, weight ``spec.averaging_constant``."""

    def _combine(self, mn, mx):
        c = self.spec.averaging_constant
        self.min_val.add_(c * (mn - self.min_val))
        self.max_val.add_(c * (mx - self.max_val))


def _subsample(rows: torch.Tensor, max_elements: int) -> torch.Tensor:
    """At most ``max_elements`` in all: a fixed stride over each row's columns (deterministic)."""
    n = rows.shape[1]
    if rows.numel() <= max_elements or n <= 1:
        return rows
    step = -(-rows.numel() // max_elements)  # ceil
    return rows[:, ::step]


class _AveragedRangeObserver(Observer):
    """Base of observers whose per-batch range is a statistic (percentile, MSE-optimal clip): the
    state is the running mean of the per-batch ranges over the batches seen (as TensorRT's
    calibrators average per-batch amax), which unlike a running min / max does not let one outlier
    batch widen the range for good."""

    #: per-batch statistics are computed on at most this many elements (a fixed-stride subsample)
    max_elements: int = 1 << 20

    def __init__(self, spec: QuantSpec, shape: tuple[int, ...], sync: bool = False):
        super().__init__(spec, shape, sync=sync)
        self.register_buffer("num_batches", torch.tensor(0, dtype=torch.long))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_initialized:
            self.num_batches.zero_()
        super().forward(x)
        self.num_batches.add_(1)
        return x

    def _combine(self, mn, mx):
        n = self.num_batches.float() + 1.0  # this batch is the n-th (a tensor: no device sync)
        self.min_val.add_((mn - self.min_val) / n)
        self.max_val.add_((mx - self.max_val) / n)

    def reset(self) -> None:
        super().reset()
        self.num_batches.zero_()


class PercentileObserver(_AveragedRangeObserver):
    """Range from percentiles: ``[q_(100-p), q_p]`` of each batch (``p = spec.percentile``), per scale,
    averaged over batches. Clips the rare outliers that make a min / max range coarse.

    Example::

        >>> spec = QuantSpec(bits=8, signed=False, symmetric=False, observer="percentile", percentile=99.0)
        >>> obs = PercentileObserver(spec, (1,))
        >>> _ = obs(torch.arange(1001.0))
        >>> obs.max_val
        tensor([990.])
    """

    @torch.no_grad()
    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = _subsample(self.layout.rows(x.detach().float()), self.max_elements)
        q = torch.tensor([1.0 - self.spec.percentile / 100.0, self.spec.percentile / 100.0], device=rows.device)
        mn, mx = torch.quantile(rows, q, dim=1)  # (2, P)
        return mn, mx


class MSEObserver(_AveragedRangeObserver):
    """MSE-optimal range: per scale, the clip ``[a * min, a * max]`` (``a`` from a grid over (0, 1])
    whose fake-quantized tensor is nearest the input in squared error, averaged over batches.

    The search uses this observer's spec (bits, symmetric / affine, narrow range), so the chosen
    range is the one that minimizes the error the quantizer will actually make.

    Example::

        >>> spec = QuantSpec(bits=3, observer="mse")
        >>> obs = MSEObserver(spec, (1,))
        >>> _ = obs(torch.randn(10000))
        >>> bool(obs.max_val < 4.0)   # far inside the min / max of 10k Gaussian samples
        True
    """

    #: candidate shrink factors of the min / max range, 1.0 (min / max) down to 0.05
    grid = tuple(1.0 - 0.01 * i for i in range(0, 96))

    @torch.no_grad()
    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = _subsample(self.layout.rows(x.detach().float()), self.max_elements)
        mn, mx = torch.aminmax(rows, dim=1)  # (P,)
        mn, mx = torch.clamp(mn, max=0.0), torch.clamp(mx, min=0.0)
        best_err = torch.full_like(mn, float("inf"))
        best_a = torch.ones_like(mn)
        qmin, qmax = self.spec.qmin, self.spec.qmax
        for a in self.grid:
            s, z = qparams_from_range(a * mn, a * mx, self.spec)  # (P,)
            s, z = s.unsqueeze(1), z.unsqueeze(1)  # (P,) -> (P, 1)
            xq = (torch.clamp(torch.round(rows * (1.0 / s)) + z, qmin, qmax) - z) * s
            err = (xq - rows).pow_(2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_a = torch.where(better, torch.full_like(best_a, a), best_a)
        return best_a * mn, best_a * mx


class GGUFQ4_0Observer(Observer):
    """GGUF Q4_0's scale rule (ggml's ``quantize_row_q4_0_ref``), for weights trained to be written
    into Q4_0 blocks as they are.

    Per scale (a 32-element block), ``m`` is the signed element of largest magnitude (the first one on
    ties, as ggml's strict ``amax < |v|`` scan keeps) and ``d = m / qmin`` (``m / -8`` at 4 bits):
    the extreme element maps to ``qmin`` exactly and ``d`` is negative when ``m`` is positive, so the
    whole of ``[qmin, qmax]`` is used on the side away from ``m``. The zero point is 0; the scale is
    rounded to float16 when ``spec.scale_dtype`` is ``float16`` (a block of zeros gets ``2^-14``). With
    ``round_mode: half_up`` the fake-quant op then computes ggml's ``(int)(x * id + 8.5) - 8`` codes.

    Raises:
        QATConfigError: the spec is not signed and symmetric.

    Example::

        >>> spec = QuantSpec(bits=4, granularity="per_group", group_size=4, observer="gguf_q4_0")
        >>> obs = GGUFQ4_0Observer(spec, (1, 1))
        >>> _ = obs(torch.tensor([[0.5, -1.0, 2.0, 0.1]]))
        >>> obs.qparams()[0]
        tensor([[-0.2500]])
    """

    def __init__(self, spec: QuantSpec, shape: tuple[int, ...], sync: bool = False):
        if not (spec.signed and spec.symmetric):
            raise QATConfigError("QuantSpec.observer gguf_q4_0 needs signed: true and symmetric: true (GGUF blocks have no zero point)")
        super().__init__(spec, shape, sync=sync)

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.layout.rows(x.detach().float())  # (P, n)
        idx = rows.abs().argmax(dim=1, keepdim=True)  # first index of the largest magnitude
        m = rows.gather(1, idx).squeeze(1)  # (P,) signed extreme
        return m, m

    def _combine(self, mn, mx):
        keep = self.max_val.abs() >= mx.abs()
        self.max_val.copy_(torch.where(keep, self.max_val, mx))
        self.min_val.copy_(self.max_val)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.max_val.float() / float(self.spec.qmin)
        if self.spec.scale_dtype is ScaleDtype.FLOAT16:
            d = torch.clamp(d, min=-65504.0, max=65504.0).half().float()
        d = torch.where(d.abs() < 2.0**-14, torch.full_like(d, 2.0**-14), d)  # no zero / subnormal scales
        return d, torch.zeros_like(d)


#: One explicit table from observer kind to class.
OBSERVERS: dict[ObserverKind, type[Observer]] = {
    ObserverKind.MINMAX: MinMaxObserver,
    ObserverKind.MOVING_AVERAGE: MovingAverageMinMaxObserver,
    ObserverKind.PERCENTILE: PercentileObserver,
    ObserverKind.MSE: MSEObserver,
    ObserverKind.GGUF_Q4_0: GGUFQ4_0Observer,
}


def make_observer(spec: QuantSpec, shape: tuple[int, ...], sync: bool = False) -> Optional[Observer]:
    """The observer ``spec`` asks for, or ``None`` for dynamic specs (ranges from each batch)."""
    if spec.dynamic:
        return None
    cls = OBSERVERS.get(spec.observer)
    if cls is None:
        raise QATConfigError(f"QuantSpec.observer {spec.observer.value!r} is not available; valid choices: {[k.value for k in OBSERVERS]}")
    return cls(spec, shape, sync=sync)
