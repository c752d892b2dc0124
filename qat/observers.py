"""Observers: statistics of a tensor, turned into a scale and zero point.

Every observer reduces a tensor to per-parameter ``(min, max)`` with the same granularity rule as
the fake-quant op (:class:`qat.granularity.Layout`: per-tensor, per-channel along an axis,
per-group along the last axis), keeps
its state in buffers (so it checkpoints and moves with the module), and, under
``torch.distributed``, makes that state identical on every rank with one coalesced all-reduce per
update.

Non-finite values (``docs/math.md``, section 11): by default (``QuantSpec.nonfinite: ignore``) a
batch's NaN / Inf elements are left out of every statistic, without a device sync; a parameter
with no finite element in a batch (or an empty batch) keeps the range it had, and its first batch
with data sets its range as a first batch would (``Observer.seen``). The stored range (``min_val``
/ ``max_val``) is always finite. ``nonfinite: raise`` raises a :class:`~qat.QATConfigError` instead. The state stays
float32 when the model is cast to float16 / bfloat16 (``.half()``, ``.to(dtype)``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import QATConfigError
from .flags import FlagBuffers
from .granularity import Layout
from .spec import NonFinite, ObserverKind, QuantSpec, ScaleDtype

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
    "range_qparams",
    "Float32State",
    "check_finite",
]

_EPS = torch.finfo(torch.float32).eps


def qparams_from_range(mn: torch.Tensor, mx: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (float32, integer-valued) that cover ``[mn, mx]`` (always including 0).

    Symmetric signed ranges use ``s = max(|mn|, |mx|) / ((qmax - qmin) / 2)`` and ``z = 0`` (as
    PyTorch's observers do); symmetric unsigned ranges use ``s = mx / qmax`` and ``z = 0``;
    asymmetric ranges fit ``[mn, mx]`` onto ``[qmin, qmax]`` with an integer zero point. Scales never
    fall below float32's epsilon, so a constant or all-zero tensor gives a tiny positive scale,
    never NaN or inf. A NaN bound counts as 0 and an empty range (``mn > mx``, such as the
    ``(+inf, -inf)`` of a parameter without finite data) gives ``[0, 0]``: the result is always
    finite.

    Example::

        >>> spec = QuantSpec(bits=8, signed=False, symmetric=False)
        >>> qparams_from_range(torch.tensor([-1.0]), torch.tensor([2.0]), spec)
        (tensor([0.0118]), tensor([85.]))
        >>> qparams_from_range(torch.tensor([float("nan")]), torch.tensor([float("nan")]), spec)
        (tensor([1.1921e-07]), tensor([0.]))
    """
    return range_qparams(mn, mx, spec.qmin, spec.qmax, spec.symmetric, spec.scale_dtype is ScaleDtype.FLOAT16)


def range_qparams(
    mn: torch.Tensor, mx: torch.Tensor, qmin: int, qmax: int, symmetric: bool, scale_f16: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`qparams_from_range` with the spec's fields spelled out (signed when ``qmin < 0``;
    ``scale_f16``: ``ScaleDtype.FLOAT16``), as the fused kernels take them.

    Example::

        >>> range_qparams(torch.tensor([-1.0]), torch.tensor([2.0]), 0, 255, symmetric=False)
        (tensor([0.0118]), tensor([85.]))
    """
    mn = torch.clamp(torch.nan_to_num(mn.float(), nan=0.0, posinf=float("inf"), neginf=float("-inf")), max=0.0)
    mx = torch.clamp(torch.nan_to_num(mx.float(), nan=0.0, posinf=float("inf"), neginf=float("-inf")), min=0.0)
    if symmetric:
        if qmin < 0:
            scale = torch.maximum(-mn, mx) / ((qmax - qmin) / 2)
        else:
            scale = mx / (qmax - qmin)
        scale = _finish_scale(scale, scale_f16)
        zp = torch.zeros_like(scale)
    else:
        scale = _finish_scale((mx - mn) / (qmax - qmin), scale_f16)
        zp = torch.clamp(qmin - torch.round(mn / scale), qmin, qmax)
    return scale, zp


def _finish_scale(scale: torch.Tensor, scale_f16: bool) -> torch.Tensor:
    scale = torch.nan_to_num(scale, nan=_EPS, posinf=torch.finfo(torch.float32).max)
    scale = torch.clamp(scale, min=_EPS)
    if scale_f16:
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


class Float32State(nn.Module):
    """Keeps a module's float32 parameters and buffers float32 when the model is cast to another
    float dtype (``.half()``, ``.bfloat16()``, ``.to(torch.float16)``): quantization state
    (scales, zero points, ranges, clips) is float32 whatever the model computes in, as the fake-quant
    ops take it. Device moves apply as usual.

    Example::

        >>> obs = MinMaxObserver(QuantSpec(bits=8), (1,)).half()
        >>> obs.min_val.dtype
        torch.float32
    """

    def _apply(self, fn, recurse=True):
        def keep_float32(t):
            out = fn(t)
            if t.dtype == torch.float32 and isinstance(out, torch.Tensor) and out.is_floating_point() and out.dtype != torch.float32:
                return out.float()
            return out

        return super()._apply(keep_float32, recurse)


def check_finite(x: torch.Tensor, spec: QuantSpec, who: str) -> None:
    """What ``QuantSpec(nonfinite="raise")`` does with a batch: a :class:`~qat.QATConfigError`
    naming ``who`` if ``x`` holds NaN / Inf (one device sync).

    Example::

        >>> check_finite(torch.ones(3), QuantSpec(nonfinite="raise"), "input")
        >>> check_finite(torch.tensor([1.0, float("nan")]), QuantSpec(nonfinite="raise"), "input")
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: input (8-bit per_tensor): a batch of shape (2,) holds 1 non-finite value(s) ...
    """
    bad = ~torch.isfinite(x.detach())
    if bool(bad.any()):
        n = int(bad.sum())
        raise QATConfigError(
            f"{who} ({spec.bits}-bit {spec.granularity.value}): a batch of shape {tuple(x.shape)} holds {n} non-finite "
            f"value(s) (NaN or Inf) and QuantSpec.nonfinite is raise; valid choices: [ignore, raise] "
            f"(ignore: ranges over the finite values only)"
        )


class Observer(Float32State, FlagBuffers):
    """Base observer: buffers ``min_val``, ``max_val`` and ``initialized`` (in the state dict), and
    ``seen`` (not in it): which parameters hold a range that came from finite data.

    Subclasses implement :meth:`_merge` (how a new batch's range merges into the state). Non-finite
    elements and empty batches are handled here, for all of them, with no device sync and no
    data-dependent Python branch (a ``torch.compile`` graph stays whole): a batch's range comes from
    :meth:`batch_range`, a parameter that saw no finite element having the empty range
    ``(+inf, -inf)``; such a parameter keeps its stored range, and a parameter's first batch with
    data sets its range as a first batch does (``seen``), however many batches without data came
    before.

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
        self.register_buffer("seen", torch.zeros(shape, dtype=torch.bool), persistent=False)
        self._register_flag("initialized", False)

    @property
    def is_initialized(self) -> bool:
        """Whether the observer has seen a batch since it was made or reset (no device sync);
        :attr:`seen` says which parameters have seen a finite value."""
        return self.flag("initialized")

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's per-parameter range over its finite elements (subclasses may replace min/max
        by another statistic); ``(+inf, -inf)`` for a parameter with no finite element."""
        return self.layout.aminmax(x, finite=True)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.nonfinite is NonFinite.RAISE and x.numel():
            check_finite(x, self.spec, f"{type(self).__name__}")
        if x.numel() == 0:  # an empty batch: no data (still takes part in the all-reduce)
            mn = torch.full_like(self.min_val, float("inf"))
            mx = torch.full_like(self.max_val, float("-inf"))
        else:
            mn, mx = self.batch_range(x)
        if self.sync:
            mn, mx = _sync_minmax(mn, mx)
        mn, mx = mn.reshape(self.min_val.shape), mx.reshape(self.max_val.shape)
        has = mn <= mx  # parameters that saw a finite value in this batch (on every rank, after the sync)
        if torch.compiler.is_compiling():
            # the same rule as a select on the flag's buffer, not a Python branch on its mirror: a
            # branch makes torch.compile guard on the flag, and its flip at the first batch would
            # recompile the graph at the second (_on_start has nothing to do then: reset and a new
            # observer leave the state as it sets it)
            m_mn, m_mx = self._merge(mn, mx)
            keep = self.seen & self.initialized
            new_mn, new_mx = torch.where(keep, m_mn, mn), torch.where(keep, m_mx, mx)
        elif not self.is_initialized:  # the first batch since made or reset: its range replaces the state
            self._on_start()
            new_mn, new_mx = mn, mx
        else:  # merged where the parameter has a range from data, the batch's own where it is the first
            m_mn, m_mx = self._merge(mn, mx)
            new_mn, new_mx = torch.where(self.seen, m_mn, mn), torch.where(self.seen, m_mx, mx)
        self.min_val.copy_(torch.where(has, new_mn, self.min_val))  # no data: the stored range stays
        self.max_val.copy_(torch.where(has, new_mx, self.max_val))
        self.seen.logical_or_(has)
        self._set_flag("initialized", True)
        self._on_batch(has)
        return x

    @property
    def first_batch_is_minmax(self) -> bool:
        """Whether a first batch (after :meth:`reset`) leaves this observer holding the batch's finite
        min / max and gives :func:`qparams_from_range` of it, with nothing else to update: what
        :func:`qat.kernels.fake_quantize_minmax` computes in one pass with ``state=``. True for
        :class:`MinMaxObserver` and :class:`MovingAverageMinMaxObserver` without ``sync`` or
        ``nonfinite: raise``; False for statistics other than min / max.

        Example::

            >>> MinMaxObserver(QuantSpec(bits=8), (1,)).first_batch_is_minmax
            True
        """
        cls = type(self)
        return (
            cls.batch_range is Observer.batch_range and cls.qparams is Observer.qparams
            and cls._on_start is Observer._on_start and cls._on_batch is Observer._on_batch
            and not self.sync and self.spec.nonfinite is not NonFinite.RAISE
        )

    def mark_observed(self) -> None:
        """Record that a batch was observed outside :meth:`forward` (by the fused kernel, which
        updated ``min_val`` / ``max_val`` / ``seen`` itself)."""
        self._set_flag("initialized", True)

    def _merge(self, mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The state after a batch with range ``(mn, mx)`` (used where the batch had data)."""
        raise NotImplementedError

    def _on_start(self) -> None:
        """Called on the first batch since the observer was made or reset."""

    def _on_batch(self, has: torch.Tensor) -> None:
        """Called after each batch; ``has`` marks the parameters that saw a finite value."""

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` for the range seen so far."""
        return qparams_from_range(self.min_val, self.max_val, self.spec)

    def reset(self) -> None:
        """Forget the batches seen: the next batch's range replaces the state. The stored range stays
        as the fallback of parameters that batch gives no finite value."""
        self._set_flag("initialized", False)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        # a loaded range counts as data where it is finite; a non-finite one (a checkpoint written
        # before these rules) is replaced by the next finite batch instead of poisoning it
        self.seen.copy_(torch.isfinite(self.min_val) & torch.isfinite(self.max_val) & self.flag("initialized"))


class MinMaxObserver(Observer):
    """Running min / max over every batch seen (PyTorch's ``MinMaxObserver``)."""

    def _merge(self, mn, mx):
        return torch.minimum(self.min_val, mn), torch.maximum(self.max_val, mx)


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of each batch's min / max, weight ``spec.averaging_constant``."""

    def _merge(self, mn, mx):
        c = self.spec.averaging_constant
        return self.min_val + c * (mn - self.min_val), self.max_val + c * (mx - self.max_val)


def _finite(t: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite(t)`` (NaN compares false), in two fast passes where isfinite is slow on the CPU."""
    return t.abs() < float("inf")


def _mark_empty(mn: torch.Tensor, mx: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mn, mx)`` with the parameters whose row of ``ok`` is all false set to the empty range."""
    empty = ~ok.any(dim=1)
    return mn.masked_fill(empty, float("inf")), mx.masked_fill(empty, float("-inf"))


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

    def _on_start(self) -> None:
        self.num_batches.zero_()

    def _on_batch(self, has: torch.Tensor) -> None:
        self.num_batches.add_(has.any().to(self.num_batches.dtype))  # a batch without data does not count

    def _merge(self, mn, mx):
        n = self.num_batches.float() + 1.0  # this batch is the n-th (a tensor: no device sync)
        return self.min_val + (mn - self.min_val) / n, self.max_val + (mx - self.max_val) / n

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
        ok = _finite(rows)
        # percentiles of the finite elements (nanquantile equals quantile bit for bit on finite rows)
        mn, mx = torch.nanquantile(torch.where(ok, rows, float("nan")), q, dim=1)  # (2, P)
        return _mark_empty(mn, mx, ok)


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
        ok = _finite(rows)
        rows = torch.where(ok, rows, 0.0)  # a non-finite element counts as 0: inside every clip, no error
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
        return _mark_empty(best_a * mn, best_a * mx, ok)


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
        ok = _finite(rows)
        rows = torch.where(ok, rows, 0.0)  # non-finite elements are never the extreme
        idx = rows.abs().argmax(dim=1, keepdim=True)  # first index of the largest magnitude
        m = rows.gather(1, idx).squeeze(1)  # (P,) signed extreme
        return _mark_empty(m, m, ok)

    def _merge(self, mn, mx):
        keep = self.max_val.abs() >= mx.abs()
        m = torch.where(keep, self.max_val, mx)
        return m, m

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
