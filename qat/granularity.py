"""Granularity: which elements of a tensor share one scale, and everything that follows from it.

This module alone knows how a tensor lines up with its scale and zero point. Every other file (the
reference ops, the observers, the fake quantizer, the quantized and integer layers, the exporters)
asks it:

* :class:`Layout`, the op-level form of a granularity: per-tensor, per-channel along ``axis``,
  per-group of ``group_size`` consecutive elements of the last axis, or per-row (dynamic
  per-token activations: one group spanning the whole last axis). It gives the parameter shape,
  the grouped view ``(.., K) -> (.., K/g, g)``, a parameter broadcast against that view, and the
  per-parameter reductions (min / max, mean of ``|x|``, sums of per-element gradients).
* The weight as its quantizer sees it: a per-group convolution weight is quantized as its
  ``(O, I * k)`` view, groups running along ``I * k`` (:func:`weight_view`).
* Integer codes and dequantization in float32, exactly as the fake-quant op computes them
  (:func:`quantize_codes`, :func:`dequantize`).

One index rule covers every layout on the contiguous tensor: element ``i`` belongs to parameter
``(i // inner) % C`` (``inner`` the product of the sizes after the channel axis, or the group
size; ``C`` the parameter count along it). See ``docs/math.md``.

The module imports only torch and :mod:`qat.spec`, so the kernels' reference can use it too.

Example::

    >>> import torch
    >>> from qat.spec import QuantSpec
    >>> layout = Layout.of(QuantSpec(bits=4, granularity="per_group", group_size=4))
    >>> layout.param_shape((2, 8))
    (2, 2)
    >>> x = torch.arange(16.0).reshape(2, 8)
    >>> tuple(layout.grouped(x).shape)
    (2, 2, 4)
    >>> layout.aminmax(x)[1]
    tensor([[ 3.,  7.],
            [11., 15.]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .spec import Granularity, QuantSpec, round_with_mode

__all__ = ["Layout", "weight_view", "weight_view_shape", "quantize_codes", "dequantize"]


@dataclass(frozen=True)
class Layout:
    """How a tensor's elements map to its scale / zero-point parameters.

    Args:
        axis: per-channel along this axis (negative counts from the end).
        group_size: per-group, ``group_size`` consecutive elements of the last axis a group.
        per_row: one parameter per row of the last axis (dynamic per-token activations); the
            group size is the tensor's last dimension, known only when a tensor arrives.

    All ``None`` / ``False`` is per-tensor. At most one of the three is set.

    Example::

        >>> Layout(axis=0).param_shape((16, 8))
        (16,)
        >>> Layout(per_row=True).op_args(torch.zeros(3, 5, 8))
        (None, 8)
    """

    axis: Optional[int] = None
    group_size: Optional[int] = None
    per_row: bool = False

    def __post_init__(self) -> None:
        if (self.axis is not None) + (self.group_size is not None) + bool(self.per_row) > 1:
            raise ValueError(f"a Layout is per-channel, per-group or per-row, not several: {self}")

    @classmethod
    def of(cls, spec: QuantSpec) -> "Layout":
        """The layout a :class:`~qat.QuantSpec`'s granularity gives."""
        g = spec.granularity
        if g is Granularity.PER_CHANNEL:
            return cls(axis=spec.axis)
        if g is Granularity.PER_GROUP:
            return cls(group_size=spec.group_size)
        if g is Granularity.PER_TOKEN:
            return cls(per_row=True)
        return cls()

    # ------------------------------------------------------------------ shapes
    @property
    def is_per_tensor(self) -> bool:
        return self.axis is None and self.group_size is None and not self.per_row

    def resolve(self, x: torch.Tensor) -> "Layout":
        """This layout for ``x``: per-row becomes per-group with ``x``'s last dimension as the group."""
        return Layout(group_size=x.shape[-1]) if self.per_row else self

    def op_args(self, x: torch.Tensor) -> tuple[Optional[int], Optional[int]]:
        """``(axis, group_size)`` as the fake-quant ops take them, for the tensor ``x``."""
        r = self.resolve(x)
        return r.axis, r.group_size

    def param_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the scale / zero point for a tensor of ``shape``.

        For activations, whose batch dimensions vary, pass one sample's shape with the feature axis
        where ``axis`` points.
        """
        shape = tuple(shape)
        if self.axis is not None:
            return (shape[self.axis],)
        if self.group_size is not None:
            return shape[:-1] + ((shape[-1] if shape else 1) // self.group_size,)  # a 0-d tensor is one element
        if self.per_row:
            return shape[:-1] + (1,)
        return (1,)

    def index_rule(self, shape: Sequence[int]) -> tuple[int, int]:
        """``(inner, C)`` of the one index rule: element ``i`` of the contiguous tensor belongs to
        parameter ``(i // inner) % C`` (what the CUDA kernels compute per element). A single
        parameter is ``(numel, 1)``.

        Example::

            >>> Layout(axis=1).index_rule((4, 3, 5)), Layout(group_size=8).index_rule((2, 32)), Layout().index_rule((6,))
            ((5, 3), (8, 8), (6, 1))
        """
        n = math.prod(shape)
        group = (shape[-1] if len(shape) else 1) if self.per_row else self.group_size  # per row: groups of a row
        if group is not None:
            inner, c = group, n // group
        elif self.axis is not None:
            axis = self.axis % len(shape)
            inner, c = math.prod(shape[axis + 1 :]), shape[axis]
        else:
            inner, c = n, 1
        if c <= 1:
            inner, c = max(n, 1), 1
        return max(inner, 1), max(c, 1)

    def row_length(self, shape: Sequence[int]) -> Optional[int]:
        """Elements a parameter covers when every parameter covers one contiguous run of a tensor of
        ``shape`` (per group, per row, per channel on the leading axis, per tensor): the rows that
        :func:`qat.kernels.fake_quantize_minmax` takes. ``None`` where runs repeat (per channel on a
        later axis) or the tensor is empty.

        Example::

            >>> Layout(group_size=32).row_length((4, 64)), Layout(axis=0).row_length((4, 64)), Layout(axis=1).row_length((4, 64))
            (32, 64, None)
        """
        n = math.prod(shape)
        if n == 0:
            return None
        inner, c = self.index_rule(shape)
        return inner if inner * c == n else None

    def check_shape(self, shape: Sequence[int], tensor: str = "a tensor", width: str = "the last dimension") -> Optional[str]:
        """Why a tensor of ``shape`` cannot take this layout (axis out of range, a group size that
        does not divide the last dimension), or ``None``; ``tensor`` and ``width`` name the tensor
        and its last dimension in the message.

        Example::

            >>> Layout(group_size=5).check_shape((4, 8))
            'group_size=5 does not divide the last dimension 8; valid group sizes divide 8'
        """
        shape = tuple(shape)
        if self.axis is not None and not -len(shape) <= self.axis < len(shape):
            return f"axis={self.axis} out of range for {tensor} of shape {shape}; valid axes: 0..{len(shape) - 1}"
        if self.group_size is not None and (not shape or shape[-1] % self.group_size):
            k = shape[-1] if shape else 0
            return f"group_size={self.group_size} does not divide {width} {k}; valid group sizes divide {k}"
        return None

    # ------------------------------------------------------------------ views
    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with its groups split out, ``(.., K) -> (.., K/g, g)``; ``x`` itself otherwise."""
        g = self.resolve(x).group_size
        if g is None:
            return x
        return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)  # (.., K) -> (.., K/g, g)

    def broadcast(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``p`` (scale or zero point) reshaped to broadcast against :meth:`grouped` of ``x``."""
        r = self.resolve(x)
        if r.group_size is not None:
            return p.reshape(*x.shape[:-1], x.shape[-1] // r.group_size, 1)  # (.., G) -> (.., G, 1)
        if r.axis is not None:
            shape = [1] * x.dim()
            shape[r.axis] = x.shape[r.axis]
            return p.reshape(shape)  # (C,) -> (1, .., C, .., 1)
        return p.reshape([1] * x.dim()) if x.dim() else p.reshape(())

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a ``(P, n)`` matrix, one row per parameter in the parameter's (flattened) order."""
        r = self.resolve(x)
        if r.axis is not None:
            axis = r.axis % x.dim()
            return x.movedim(axis, 0).reshape(x.shape[axis], -1)  # (.., C, ..) -> (C, rest)
        if r.group_size is not None:
            return x.reshape(-1, r.group_size)  # (.., K) -> (.. * K/g, g)
        return x.reshape(1, -1)

    # ------------------------------------------------------------------ reductions
    def _reduce(self, x: torch.Tensor, fn):
        """``fn`` (``torch.aminmax``, ``torch.amin``, ``torch.amax``, ...) per parameter, shaped
        :meth:`param_shape` of ``x`` (a per-tensor result as ``(1,)``)."""
        if self.per_row:
            return fn(x, dim=-1, keepdim=True)  # (.., K) -> (.., 1)
        if self.axis is not None:
            axis = self.axis % x.dim()
            if axis == 0 or fn not in (torch.aminmax, torch.amin, torch.amax):
                return fn(self.rows(x), dim=1)  # (C, rest) -> (C,)
            # min / max of a non-leading axis reduce in place: no (C, rest) copy (exact either way)
            dims = [d for d in range(x.dim()) if d != axis]
            if fn is torch.aminmax:
                return torch.amin(x, dim=dims), torch.amax(x, dim=dims)
            return fn(x, dim=dims)
        if self.group_size is not None:
            return fn(self.grouped(x), dim=-1)  # (.., K/g, g) -> (.., K/g)
        out = fn(x)
        return tuple(t.reshape(1) for t in out) if isinstance(out, tuple) else out.reshape(1)

    def aminmax(self, x: torch.Tensor, finite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-parameter ``(min, max)`` of ``x`` in float32, shaped :meth:`param_shape` of ``x``.

        Args:
            x: the tensor.
            finite: ignore non-finite elements (NaN, +inf, -inf): each parameter's range is that of
                its finite elements, and a parameter with none (or an empty ``x``) gets the empty
                range ``(+inf, -inf)`` (min > max), which callers read as "no data". On finite
                data the result equals ``finite=False`` bit for bit. No device sync and no value
                read on any device: the non-finite elements are replaced (``+inf`` for the min,
                ``-inf`` for the max, ``torch.nan_to_num``) before two reductions, two more
                elementwise passes over ``x`` than the plain reduction (a fused kernel could do it
                in one).

        Example::

            >>> x = torch.tensor([[1.0, float("nan"), -2.0], [float("inf"), float("nan"), 3.0]])
            >>> Layout(axis=0).aminmax(x, finite=True)
            (tensor([-2.,  3.]), tensor([1., 3.]))
            >>> Layout(axis=1).aminmax(x, finite=True)[0]   # the middle column has no finite element
            tensor([ 1., inf, -2.])
        """
        x = x.detach().float()
        if not finite:
            return self._reduce(x, torch.aminmax)
        if x.numel() == 0:
            shape = self.param_shape(x.shape)
            return x.new_full(shape, float("inf")), x.new_full(shape, float("-inf"))
        inf = float("inf")  # every non-finite element as +inf for the min, -inf for the max (one pass each)
        mn = self._reduce(torch.nan_to_num(x, nan=inf, posinf=inf, neginf=inf), torch.amin)
        mx = self._reduce(torch.nan_to_num(x, nan=-inf, posinf=-inf, neginf=-inf), torch.amax)
        return mn, mx

    def mean_abs(self, x: torch.Tensor, shape: Sequence[int], finite: bool = False) -> torch.Tensor:
        """Mean of ``|x|`` per parameter (float32), reshaped to ``shape``.

        ``finite``: average over the finite elements only (a parameter with none gets 0); on finite
        data the result equals ``finite=False`` bit for bit (the plain mean is kept wherever it is
        finite), without a device sync.

        Example::

            >>> Layout().mean_abs(torch.tensor([1.0, -3.0, float("nan")]), (1,), finite=True)
            tensor([2.])
        """
        absx = x.detach().float().abs()
        plain = self._mean(absx).reshape(shape)
        if not finite:
            return plain
        ok = absx < float("inf")  # finite (NaN compares false); faster than isfinite on the CPU
        total = self._reduce(torch.where(ok, absx, 0.0), torch.sum).reshape(shape)
        count = self._reduce(ok.float(), torch.sum).reshape(shape)
        masked = torch.where(count > 0, total / count.clamp(min=1.0), torch.zeros_like(total))
        return torch.where(torch.isfinite(plain), plain, masked)

    def _mean(self, absx: torch.Tensor) -> torch.Tensor:
        if self.axis is not None:
            return self.rows(absx).mean(dim=1)
        if self.group_size is not None:
            return self.grouped(absx).mean(dim=-1)
        return absx.mean()

    def sum_to_param(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Sum a per-element tensor, shaped like :meth:`grouped` of ``x``, down to one value per
        parameter (the reduction of a learned scale's gradient)."""
        r = self.resolve(x)
        if r.group_size is not None:
            return t.sum(dim=-1)  # (.., G, g) -> (.., G)
        if r.axis is not None:
            dims = [d for d in range(x.dim()) if d != r.axis % x.dim()]
            return t.sum(dim=dims) if dims else t
        return t.sum().reshape(1)


# ----------------------------------------------------------------------------- weights


def weight_view_shape(shape: Sequence[int], spec: QuantSpec) -> tuple[int, ...]:
    """The shape of a weight as its quantizer sees it: a per-group convolution weight
    ``(O, I, *k)`` is quantized as ``(O, I * k)``, its groups running along ``I * k``."""
    shape = tuple(shape)
    if spec.granularity is Granularity.PER_GROUP and len(shape) > 2:
        return (shape[0], int(math.prod(shape[1:])))  # (O, I, *k) -> (O, I*k)
    return shape


def weight_view(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``w`` in :func:`weight_view_shape` (a view; ``.view_as(w)`` or ``reshape`` takes it back)."""
    shape = weight_view_shape(w.shape, spec)
    return w if shape == tuple(w.shape) else w.flatten(1)  # (O, I, *k) -> (O, I*k)


# ----------------------------------------------------------------------------- codes


def quantize_codes(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec, clamp: bool = True
) -> torch.Tensor:
    """The integer codes the fake-quant op computes for ``x``: ``clamp(rnd(x * (1/s)) + z, qmin, qmax)``.

    Float32 math exactly as the reference op does it; returned as float32 (integer-valued), shaped
    like ``x``. ``clamp=False`` gives the codes before clamping (what the clip mask tests).

    Example::

        >>> spec = QuantSpec(bits=4)
        >>> quantize_codes(torch.tensor([0.26, -3.0, 1.0]), torch.tensor([0.25]), torch.tensor([0.0]), spec)
        tensor([ 1., -8.,  4.])
    """
    layout = Layout.of(spec)
    x32 = x.detach().contiguous().float()
    s = layout.broadcast(scale.detach().float(), x32)
    z = layout.broadcast(zero_point.detach().float(), x32)
    q = round_with_mode(layout.grouped(x32) * (1.0 / s), spec.round_mode.value) + z
    if clamp:
        q = torch.clamp(q, spec.qmin, spec.qmax)
    return q.reshape(x.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """``(q - z) * s`` in float32, shaped like ``q``: the fake-quant op's output for the codes ``q``
    (a missing zero point is 0).

    Example::

        >>> dequantize(torch.tensor([1, -8, 4]), torch.tensor([0.25]), None, QuantSpec(bits=4))
        tensor([ 0.2500, -2.0000,  1.0000])
    """
    layout = Layout.of(spec)
    qf = q.float()
    s = layout.broadcast(scale.float(), qf)
    z = torch.zeros_like(s) if zero_point is None else layout.broadcast(zero_point.float(), qf)
    return ((layout.grouped(qf) - z) * s).reshape(q.shape)
