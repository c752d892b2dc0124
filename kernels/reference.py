"""Pure-PyTorch reference of every fake-quant op: the definition the CuPy kernels must equal.

Runs on any device. The math (written out in ``docs/math.md``):

* ``q = clamp(rnd(x * inv_s) + z, qmin, qmax)``, ``x_hat = (q - z) * s``, ``inv_s = 1 / s`` in float32.
* The clipped straight-through estimator passes the gradient where ``rnd(x * inv_s) + z`` lies in
  ``[qmin, qmax]`` (the mask is taken after rounding, as PyTorch does) and blocks it elsewhere.
* LSQ / LSQ+ (learned scale / offset) and PACT (learned clip) gradients follow PyTorch's
  ``torch._fake_quantize_learnable_*`` ops element by element.

Granularity is given the way the public op takes it: ``axis=None, group_size=None`` is per-tensor
(``scale`` of one element); ``axis=a`` is per-channel along ``a`` (``scale`` of ``x.shape[a]``
elements); ``group_size=g`` is per-group over ``g`` consecutive elements of the last axis (``scale``
of shape ``x.shape[:-1] + (x.shape[-1] // g,)``). How elements line up with parameters is
:class:`qat.granularity.Layout`'s to say; rounding modes are :func:`qat.spec.round_with_mode`'s. All arithmetic is float32; half-precision inputs
are upcast for the math and the result is cast back. ``out_dtype`` (the forwards) returns the result
cast on to another dtype, the dtype a layer computes in under autocast, as ``.to(out_dtype)`` of the
result would: the kernels write it so directly, and the STE backward takes the gradient in that dtype
and returns it in ``x``'s (``dtype``).

The clip mask saved for the backward pass is packed 32 elements to an int32 word, bit ``j`` of word
``w`` holding element ``32 * w + j`` of the contiguous input: the layout a warp ballot produces.
"""

from __future__ import annotations

from typing import Optional

import torch

from qat import microscaling
from qat.granularity import Layout
from qat.observers import range_qparams
from qat.spec import ROUND_MODES, round_with_mode

__all__ = [
    "ROUND_MODES",
    "broadcast_param",
    "fake_quantize_forward",
    "fake_quantize_backward",
    "fake_quantize_backward_",
    "fake_quantize_lsq_forward",
    "fake_quantize_lsq_backward",
    "fake_quantize_pact_forward",
    "fake_quantize_pact_backward",
    "fake_quantize_minmax_forward",
    "fake_quantize_unpacked",
    "minmax_qparams",
    "pack_mask",
    "unpack_mask",
    "round_with_mode",
    "mask_words",
    "microscaling_forward",
    "microscaling_lsq_backward",
]


def mask_words(numel: int) -> int:
    """Number of int32 words of a packed mask for ``numel`` elements."""
    return (numel + 31) // 32


def broadcast_param(
    p: torch.Tensor, x: torch.Tensor, axis: Optional[int], group_size: Optional[int]
) -> torch.Tensor:
    """Reshape a scale / zero-point tensor so it broadcasts against ``x``'s grouped view
    (:meth:`qat.granularity.Layout.broadcast`)."""
    return Layout(axis=axis, group_size=group_size).broadcast(p, x)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into int32 words, 32 elements a word, little-endian bits."""
    flat = mask.reshape(-1)
    n = flat.numel()
    pad = mask_words(n) * 32 - n
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.reshape(-1, 32).to(torch.int64)  # (W*32,) -> (W, 32)
    shifts = torch.arange(32, device=mask.device, dtype=torch.int64)
    words = (bits << shifts).sum(dim=1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32
    return words.to(torch.int32)


def unpack_mask(words: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a flat boolean tensor of ``numel`` elements."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    bits = (words.reshape(-1, 1) >> shifts) & 1  # (W,) -> (W, 32)
    return bits.reshape(-1)[:numel].to(torch.bool)


def _quantize(x32, scale, zero_point, qmin, qmax, axis, group_size, round_mode):
    """Shared forward math: returns (grouped float32 x, s, z, unclamped q, clamped q)."""
    layout = Layout(axis=axis, group_size=group_size)
    xg = layout.grouped(x32)
    s = layout.broadcast(scale, x32)
    z = layout.broadcast(zero_point, x32)
    inv_s = 1.0 / s
    q_raw = round_with_mode(xg * inv_s, round_mode) + z
    q = torch.clamp(q_raw, qmin, qmax)
    return xg, s, z, q_raw, q


def fake_quantize_forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: Optional[int] = None,
    group_size: Optional[int] = None,
    round_mode: str = "half_even",
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize-dequantize ``x``; returns ``(x_hat, packed_mask)``, ``x_hat`` in ``out_dtype``
    (default ``x``'s).

    ``packed_mask`` holds 1 where the clipped STE passes the gradient (see module docstring).
    """
    y, inside = fake_quantize_unpacked(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode, out_dtype)
    return y, pack_mask(inside)


def fake_quantize_unpacked(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: Optional[int] = None,
    group_size: Optional[int] = None,
    round_mode: str = "half_even",
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fake_quantize_forward` with the STE mask as a boolean tensor of ``x``'s shape (what
    ``torch.compile`` fuses into neighbouring ops, where packing bits would only cost)."""
    x32 = x.contiguous().float()
    _, s, z, q_raw, q = _quantize(x32, scale.float(), zero_point.float(), qmin, qmax, axis, group_size, round_mode)
    y = ((q - z) * s).reshape(x.shape).to(x.dtype)
    if out_dtype is not None:
        y = y.to(out_dtype)
    inside = (q_raw >= qmin) & (q_raw <= qmax)
    return y, inside.reshape(x.shape)


def fake_quantize_backward(grad: torch.Tensor, mask: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Clipped-STE backward: ``grad`` where the saved mask bit is set, 0 elsewhere, in ``dtype``
    (``x``'s, when the forward wrote ``out_dtype``; default ``grad``'s)."""
    keep = unpack_mask(mask, grad.numel()).reshape(grad.shape)
    dx = torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    return dx if dtype is None else dx.to(dtype)


def fake_quantize_backward_(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`fake_quantize_backward` in place, in ``grad``'s dtype: the elements whose mask bit is
    clear set to 0; returns ``grad``."""
    keep = unpack_mask(mask, grad.numel()).reshape(grad.shape)
    return grad.masked_fill_(~keep, 0)


def fake_quantize_lsq_forward(
    x, scale, zero_point, qmin, qmax, axis=None, group_size=None, round_mode="half_even", out_dtype=None
):
    """Forward of the learned-step (LSQ / LSQ+) quantizer.

    The zero point is learned as a float but used rounded and clamped to ``[qmin, qmax]``, as
    ``torch._fake_quantize_learnable_*`` does.
    """
    z = torch.clamp(torch.round(zero_point.float()), qmin, qmax)
    y, _ = fake_quantize_forward(x, scale, z, qmin, qmax, axis, group_size, round_mode, out_dtype)
    return y


def fake_quantize_lsq_backward(
    grad, x, scale, zero_point, qmin, qmax, axis=None, group_size=None, grad_factor=1.0, round_mode="half_even"
):
    """Gradients of the LSQ / LSQ+ quantizer: ``(dx, dscale, dzero_point)``.

    Element-wise, as PyTorch's learnable fake-quant ops define them::

        inside  (qmin <= rnd(x/s)+z <= qmax): dx = g,  ds = ((q - z) - v) * g * f,  dz = 0
        below:                                 dx = 0,  ds = (qmin - z) * g * f,     dz = -s * g * f
        above:                                 dx = 0,  ds = (qmax - z) * g * f,     dz = -s * g * f

    with ``f = grad_factor`` and ``v = x * inv_s``, the value the forward rounds. PyTorch writes the
    inside term ``(x_hat - x) / s``; ``(q - z) - v`` is the same quantity (``round(v) - v``, exact in
    float32) without a per-element division, and differs from PyTorch's by rounding only. ``ds`` and
    ``dz`` are then summed per scale (the kernels sum ``t * g`` and apply ``f`` and ``-s`` per sum).
    """
    x32 = x.contiguous().float()
    layout = Layout(axis=axis, group_size=group_size)
    g32 = layout.grouped(grad.contiguous().float())
    z_used = torch.clamp(torch.round(zero_point.float()), qmin, qmax)
    xg, s, z, q_raw, q = _quantize(x32, scale.float(), z_used, qmin, qmax, axis, group_size, round_mode)
    below = q_raw < qmin
    above = q_raw > qmax
    inside = ~(below | above)
    v = xg * (1.0 / s)  # as _quantize computes it
    ds_in = ((q - z) - v) * g32 * grad_factor
    ds_out = torch.where(below, (qmin - z) * g32, (qmax - z) * g32) * grad_factor
    ds = torch.where(inside, ds_in, ds_out)
    dz = torch.where(inside, torch.zeros_like(g32), -s * g32 * grad_factor)
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    dx = torch.where(inside.reshape(x.shape), grad.reshape(x.shape), zero)
    dscale = layout.sum_to_param(ds, x32).reshape(scale.shape)
    dzp = layout.sum_to_param(dz, x32).reshape(zero_point.shape)
    return dx, dscale, dzp


def fake_quantize_pact_forward(x, alpha, qmin, qmax, round_mode="half_even", out_dtype=None):
    """PACT: clip activations to ``[0, alpha]`` (``alpha`` learned, one element), quantize unsigned.

    ``s = alpha / (qmax - qmin)``, ``z = qmin``; equals :func:`fake_quantize_forward` with that
    scale on ``clamp(x, 0, alpha)``.
    """
    a = alpha.float().reshape(())
    s = (a / (qmax - qmin)).reshape(1)
    z = torch.full((1,), float(qmin), device=x.device)
    xc = torch.minimum(torch.clamp(x.float(), min=0.0), a)
    y, _ = fake_quantize_forward(xc, s, z, qmin, qmax, None, None, round_mode)
    y = y.to(x.dtype)
    return y if out_dtype is None else y.to(out_dtype)


def fake_quantize_pact_backward(grad, x, alpha):
    """PACT gradients ``(dx, dalpha)``: ``dx = g`` on ``0 <= x < alpha``, ``dalpha = sum(g[x >= alpha])``."""
    x32 = x.float()
    a = alpha.float().reshape(())
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    dx = torch.where((x32 >= 0) & (x32 < a), grad, zero)
    dalpha = torch.where(x32 >= a, grad.float(), torch.zeros((), device=grad.device)).sum().reshape(alpha.shape)
    return dx, dalpha


def fake_quantize_minmax_forward(
    x: torch.Tensor,
    row: int,
    qmin: int,
    qmax: int,
    symmetric: bool,
    scale_f16: bool = False,
    round_mode: str = "half_even",
    state: Optional[tuple] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-quantize each contiguous row of ``row`` elements of ``x`` with the range of its own finite
    elements: a dynamic per-token / per-group quantizer, or (``state`` given) a min/max observer's
    first batch (a weight's, whose range is its current values) with its scale and zero point.

    Per row: ``(mn, mx)`` over the finite elements (:meth:`Layout.aminmax` with ``finite=True``;
    ``(+inf, -inf)`` for a row with none), the scale and zero point of
    :func:`qat.observers.range_qparams` (signed when ``qmin < 0``), then :func:`fake_quantize_forward`.
    ``state = (min_val, max_val, seen, scale, zero_point)`` (contiguous, one entry a row) is updated
    in place as the observer's first batch updates it: ``min_val`` / ``max_val`` take the row's range
    where the row had a finite element and keep their value where it had none, ``seen |= has``, and
    the scale and zero point are those of the stored range. Returns ``(x_hat, packed_mask)``.
    """
    rows, s, z = minmax_qparams(x, row, qmin, qmax, symmetric, scale_f16, state)
    y, mask = fake_quantize_forward(rows, s, z, qmin, qmax, None, row, round_mode, out_dtype)
    return y.reshape(x.shape), mask


def minmax_qparams(
    x: torch.Tensor, row: int, qmin: int, qmax: int, symmetric: bool, scale_f16: bool = False,
    state: Optional[tuple] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first half of :func:`fake_quantize_minmax_forward`: ``(rows, scale, zero_point)``, ``rows``
    the ``(-1, row)`` view of ``x`` and the parameters shaped ``(rows, 1)`` (``state`` updated)."""
    rows = x.reshape(-1, row)
    mn, mx = Layout(group_size=row).aminmax(rows, finite=True)
    mn, mx = mn.reshape(-1), mx.reshape(-1)
    if state is not None:
        min_val, max_val, seen, scale, zero_point = (t.view(-1) for t in state)
        has = mn <= mx
        min_val.copy_(torch.where(has, mn, min_val))
        max_val.copy_(torch.where(has, mx, max_val))
        seen.logical_or_(has)
        mn, mx = min_val, max_val
    s, z = range_qparams(mn, mx, qmin, qmax, symmetric, scale_f16)
    if state is not None:
        scale.copy_(s)
        zero_point.copy_(z)
    return rows, s.reshape(-1, 1), z.reshape(-1, 1)


def microscaling_forward(x, element, block_size, block_scale, scale=None, axis=None):
    """Microscaling / FP8 quantize-dequantize (:func:`qat.microscaling.microscaling_forward`, the
    definition): ``(y, packed mask)``, the mask the clipped STE backward
    (:func:`fake_quantize_backward`) applies.

    Example::

        >>> y, mask = microscaling_forward(torch.tensor([[0.3, -1.0, 7.0, 0.0] * 8]), "e2m1", 32, "e8m0")
        >>> y[0, :4].tolist(), hex(mask.item() & 0xF)
        ([0.5, -1.0, 6.0, 0.0], '0xb')
    """
    y, inside = microscaling.microscaling_forward(x, element, block_size, block_scale, scale, axis)
    return y.contiguous(), pack_mask(inside)


def microscaling_lsq_backward(grad, x, element, block_size, block_scale, scale, axis, grad_factor):
    """``(dx, dscale)`` of the learned-scale float formats (:func:`qat.microscaling.microscaling_lsq_backward`).

    Example::

        >>> dx, ds = microscaling_lsq_backward(torch.ones(2), torch.tensor([1.0, 500.0]), "e4m3", 0, "none",
        ...                                    torch.tensor([1.0]), None, 1.0)
        >>> dx.tolist(), ds.tolist()
        ([1.0, 0.0], [448.0])
    """
    dx, ds = microscaling.microscaling_lsq_backward(grad, x, element, block_size, block_scale, scale, axis, grad_factor)
    return dx.contiguous(), ds
