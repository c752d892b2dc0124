"""Microscaling and FP8 number formats: MXFP4, MXFP8, NVFP4 and per-tensor / per-channel FP8
(``docs/math.md``, section 13). The pure-PyTorch math here is the reference the CuPy kernels
(``kernels/csrc/microscaling.cu``) equal bit for bit.

Element formats (sign, exponent and mantissa bits; no infinities, saturating conversion):

=========  =====  ======  ======  ==========================================
element    mbits  emin    emax    largest magnitude
=========  =====  ======  ======  ==========================================
``e2m1``   1      0       2       6     (FP4: 0, 0.5, 1, 1.5, 2, 3, 4, 6)
``e4m3``   3      -6      8       448   (``torch.float8_e4m3fn``)
``e5m2``   2      -14     15      57344 (``torch.float8_e5m2``, inf saturated)
=========  =====  ======  ======  ==========================================

A value ``v`` rounds to the element grid by :func:`round_to_element`: ``a = min(|v|, max)``,
``k = max(floor(log2 a), emin)``, ``q = sign(v) * rint(a * 2^(mbits-k)) * 2^(k-mbits)``: round to
nearest, ties to even, saturating (no infinity), NaN kept.

Formats (``QuantSpec.format``; :data:`MICRO_FORMATS`): each element ``x`` becomes
``round_to_element(x * (1 / S)) * S`` with the scale ``S`` of its block or channel:

* ``mxfp4`` / ``mxfp8``: E2M1 / E4M3 elements, blocks of 32 along the last axis, one E8M0 scale a
  block, ``S = 2^clamp(floor(log2 amax) - emax, -127, 127)`` (OCP MX v1.0; ``amax`` the block's
  largest finite magnitude; an all-zero block takes ``2^-127``). Powers of two chosen from the
  data: not learnable (straight-through only).
* ``nvfp4``: E2M1 elements, blocks of 16, ``S = c * s`` with the float32 tensor scale
  ``s = amax / (6 * 448)`` and the block code ``c = round_to_element(amax_b / (s * 6), "e4m3")``;
  ``s`` may be learned (LSQ-style, ``estimator: lsq``).
* ``fp8_e4m3`` / ``fp8_e5m2``: FP8 elements with one float32 scale per tensor or per channel,
  ``s = amax / max`` from the observer, or learned (``estimator: lsq``).

Gradients: the clipped straight-through estimator passes ``dL/dy`` where ``|x / S| <= max`` and
blocks it where the element saturated (or is NaN); the block scales are constants to it. The
learned scale gets ``dL/ds = g * sum(dL/dy * c * (q - v * inside))`` (``v = x / S``, ``c = 1``
for FP8, the block code for NVFP4; ``g`` the LSQ gradient scale), as LSQ's ``q - v`` inside the
range and ``q`` (the saturated code) outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .errors import QATConfigError
from .spec import check_format_fields

__all__ = [
    "ElementFormat",
    "MicroFormat",
    "ELEMENTS",
    "MICRO_FORMATS",
    "BLOCK_SCALES",
    "is_microscaling",
    "round_to_element",
    "e8m0_exponent",
    "pow2",
    "block_amax",
    "float_scale",
    "microscaling_forward",
    "microscaling_lsq_backward",
    "fake_quantize_format",
    "mxfp4_codes",
    "float_codes",
    "check_microscaling_spec",
    "lsq_grad_factor",
]


@dataclass(frozen=True)
class ElementFormat:
    """A small float format: ``mbits`` mantissa bits, normal exponents ``emin .. emax``, largest
    magnitude ``max`` (saturation), no infinities.

    Example::

        >>> ELEMENTS["e2m1"].max, ELEMENTS["e4m3"].max, ELEMENTS["e5m2"].max
        (6.0, 448.0, 57344.0)
    """

    name: str
    mbits: int
    emin: int
    emax: int
    max: float


#: The element formats by name.
ELEMENTS = {
    "e2m1": ElementFormat("e2m1", 1, 0, 2, 6.0),
    "e4m3": ElementFormat("e4m3", 3, -6, 8, 448.0),
    "e5m2": ElementFormat("e5m2", 2, -14, 15, 57344.0),
}

#: How a block's scale is formed: ``none`` (one float32 scale per tensor / channel), ``e8m0``
#: (a power of two from the block's amax), ``e4m3`` (NVFP4: an E4M3 code times a float32 tensor scale).
BLOCK_SCALES = ("none", "e8m0", "e4m3")


@dataclass(frozen=True)
class MicroFormat:
    """One ``QuantSpec.format``: its element, block length (0: no blocks), block-scale kind, the
    ``bits`` / granularities a spec of it takes, and whether a scale can be learned.

    Example::

        >>> f = MICRO_FORMATS["nvfp4"]
        >>> f.element, f.block_size, f.block_scale, f.learnable
        ('e2m1', 16, 'e4m3', True)
    """

    name: str
    element: str
    block_size: int
    block_scale: str
    bits: int
    learnable: bool

    @property
    def elem(self) -> ElementFormat:
        return ELEMENTS[self.element]


#: The microscaling / FP8 formats by ``QuantSpec.format`` value.
MICRO_FORMATS = {
    "mxfp4": MicroFormat("mxfp4", "e2m1", 32, "e8m0", 4, False),
    "mxfp8": MicroFormat("mxfp8", "e4m3", 32, "e8m0", 8, False),
    "nvfp4": MicroFormat("nvfp4", "e2m1", 16, "e4m3", 4, True),
    "fp8_e4m3": MicroFormat("fp8_e4m3", "e4m3", 0, "none", 8, True),
    "fp8_e5m2": MicroFormat("fp8_e5m2", "e5m2", 0, "none", 8, True),
}

_EPS = torch.finfo(torch.float32).eps
_NVFP4_RANGE = 6.0 * 448.0  # E2M1 max times E4M3 max


def is_microscaling(fmt: Any) -> bool:
    """Whether ``fmt`` (a ``QuantSpec.format`` value or enum) is one of :data:`MICRO_FORMATS`.

    Example::

        >>> is_microscaling("mxfp4"), is_microscaling("q4_k")
        (True, False)
    """
    return getattr(fmt, "value", fmt) in MICRO_FORMATS


def pow2(k: torch.Tensor) -> torch.Tensor:
    """``2.0 ** k`` in float32, exactly, for integer ``k`` in ``[-149, 127]`` (subnormal below -126).

    Example::

        >>> pow2(torch.tensor([-127, -1, 0, 3])).tolist()
        [5.877471754111438e-39, 0.5, 1.0, 8.0]
    """
    k = k.to(torch.int32)
    normal = torch.clamp(k + 127, min=1) << 23
    sub = torch.ones_like(k) << torch.clamp(k + 149, 0, 22)
    return torch.where(k >= -126, normal, sub).view(torch.float32)


def round_to_element(v: torch.Tensor, element: str) -> torch.Tensor:
    """Round float32 ``v`` onto an element format's grid: nearest, ties to even, saturating at
    ``±max`` (infinity too), NaN kept, the sign of zero kept.

    Example::

        >>> round_to_element(torch.tensor([0.25, 0.75, 2.5, 5.0, 7.0, -100.0]), "e2m1").tolist()
        [0.0, 1.0, 2.0, 4.0, 6.0, -6.0]
        >>> round_to_element(torch.tensor([464.0, 1e9]), "e4m3").tolist()
        [448.0, 448.0]
    """
    f = ELEMENTS[element]
    v = v.float()
    a = torch.clamp(v.abs(), max=f.max)  # NaN stays NaN
    _, ex = torch.frexp(a)  # a = m * 2^ex, m in [0.5, 1): floor(log2 a) = ex - 1 for a > 0
    k = torch.clamp(ex.to(torch.int32) - 1, min=f.emin)
    q = torch.round(a * pow2(f.mbits - k)) * pow2(k - f.mbits)
    return torch.copysign(q, v)


def e8m0_exponent(amax: torch.Tensor, element: str) -> torch.Tensor:
    """The E8M0 block-scale exponent of an MX block (OCP MX v1.0): ``floor(log2 amax) - emax`` of
    the element format, clamped to ``[-127, 127]``; an ``amax`` of 0 (or below ``2^-126``) gives -127.

    Example::

        >>> e8m0_exponent(torch.tensor([6.0, 8.0, 0.0, 1.0]), "e2m1").tolist()
        [0, 1, -127, -2]
    """
    amax = amax.float()
    _, ex = torch.frexp(amax)
    e = torch.clamp(ex.to(torch.int32) - 1 - ELEMENTS[element].emax, -127, 127)
    return torch.where(amax >= 2.0**-126, e, torch.full_like(e, -127))


def _finite_abs(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return torch.where(torch.isfinite(x), x.abs(), torch.zeros((), dtype=torch.float32, device=x.device))


def block_amax(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """The largest finite magnitude of each block of ``block_size`` consecutive elements along the
    last axis: shape ``x.shape[:-1] + (x.shape[-1] // block_size,)`` (NaN / Inf left out).

    Example::

        >>> block_amax(torch.tensor([[1.0, -3.0, float("inf"), 2.0]]), 2).tolist()
        [[3.0, 2.0]]
    """
    if x.shape[-1] % block_size:
        raise QATConfigError(f"the last axis ({x.shape[-1]}) must be a multiple of the block size {block_size}")
    a = _finite_abs(x)
    return a.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size).amax(dim=-1)


def float_scale(x: torch.Tensor, fmt: str, axis: Optional[int] = None) -> torch.Tensor:
    """The float32 scale a format takes from data ``x``: FP8 ``amax / max`` (per tensor, or per
    channel along ``axis``), NVFP4's tensor scale ``amax / (6 * 448)``; at least float32's eps.
    ``amax`` is over finite elements. Shape ``(1,)`` or ``(x.shape[axis],)``.

    Example::

        >>> float_scale(torch.tensor([[1.0, -896.0], [2.0, 4.0]]), "fp8_e4m3").tolist()
        [2.0]
        >>> float_scale(torch.tensor([[1.0, -896.0], [2.0, 4.0]]), "fp8_e4m3", axis=0).tolist()
        [2.0, 0.00892857...]
    """
    f = MICRO_FORMATS[fmt]
    a = _finite_abs(x.detach())
    if axis is None:
        amax = a.amax().reshape(1) if a.numel() else torch.zeros(1, device=x.device)
    else:
        amax = a.movedim(axis, 0).reshape(x.shape[axis], -1).amax(dim=1)
    div = _NVFP4_RANGE if f.block_scale == "e4m3" else f.elem.max
    return torch.clamp(amax / div, min=_EPS)


def _param_view(scale: torch.Tensor, x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    if axis is None:
        return scale.float().reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.float().reshape(shape)


def _scales(x32: torch.Tensor, element: str, block_size: int, block_scale: str, scale: Optional[torch.Tensor],
            axis: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(xb, S, c)``: ``x`` viewed so that ``S`` (the scale of each element) and ``c`` (its block code,
    1 without one) broadcast against it."""
    if block_scale == "none":
        s = _param_view(scale, x32, axis)
        return x32, s, torch.ones_like(s)
    xb = x32.reshape(*x32.shape[:-1], x32.shape[-1] // block_size, block_size)
    amax = block_amax(x32, block_size).unsqueeze(-1)
    if block_scale == "e8m0":
        s = pow2(e8m0_exponent(amax, element))
        return xb, s, torch.ones_like(s)
    st = scale.float().reshape(())
    c = round_to_element(amax / (st * 6.0), "e4m3")
    return xb, c * st, c


def _quantize(x32, element, block_size, block_scale, scale, axis):
    xb, s, c = _scales(x32, element, block_size, block_scale, scale, axis)
    inv = 1.0 / s
    v = torch.where(s != 0, xb * inv, torch.where(torch.isnan(xb), xb, torch.zeros_like(xb)))
    q = round_to_element(v, element)
    inside = v.abs() <= ELEMENTS[element].max
    return xb, v, q, s, c, inside


def _check_args(x: torch.Tensor, element: str, block_size: int, block_scale: str, scale, axis) -> None:
    if element not in ELEMENTS:
        raise ValueError(f"element must be one of {sorted(ELEMENTS)}, got {element!r}")
    if block_scale not in BLOCK_SCALES:
        raise ValueError(f"block_scale must be one of {BLOCK_SCALES}, got {block_scale!r}")
    if block_scale == "none":
        if block_size != 0:
            raise ValueError(f"block_scale 'none' takes block_size 0, got {block_size}")
        if scale is None:
            raise ValueError("block_scale 'none' needs a scale (per tensor or per channel)")
        want = 1 if axis is None else x.shape[axis]
        if scale.numel() != want:
            raise ValueError(f"scale must have {want} element(s) (axis={axis}), got shape {tuple(scale.shape)}")
        return
    if block_size not in (16, 32):
        raise ValueError(f"block_size must be 16 or 32 with block_scale {block_scale!r}, got {block_size}")
    if x.dim() == 0 or x.shape[-1] % block_size:
        raise ValueError(f"the last axis of x {tuple(x.shape)} must be a multiple of block_size {block_size}")
    if axis is not None:
        raise ValueError("block formats take axis=None (blocks run along the last axis)")
    if block_scale == "e4m3" and (scale is None or scale.numel() != 1):
        raise ValueError("block_scale 'e4m3' (NVFP4) needs a one-element float32 tensor scale")


def microscaling_forward(
    x: torch.Tensor, element: str, block_size: int = 0, block_scale: str = "none",
    scale: Optional[torch.Tensor] = None, axis: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize-dequantize ``x`` onto a microscaling / FP8 format: ``(y, inside)``, ``y`` of
    ``x``'s shape and dtype (the math in float32), ``inside`` the boolean mask ``|x / S| <= max``
    the clipped straight-through estimator passes the gradient on.

    Args:
        x: float tensor; with blocks, its last axis a multiple of ``block_size``.
        element: ``"e2m1"``, ``"e4m3"`` or ``"e5m2"``.
        block_size: 16 or 32 for block scales, 0 for ``block_scale="none"``.
        block_scale: ``"none"`` (``scale`` per tensor or per channel along ``axis``), ``"e8m0"``
            (MX: powers of two from each block) or ``"e4m3"`` (NVFP4: ``scale`` is the tensor scale).
        scale: float32 scale(s), see ``block_scale``.
        axis: the channel axis of a per-channel ``scale``.

    Example::

        >>> x = torch.tensor([[0.3, -1.0, 7.0, 0.0] * 8])
        >>> y, inside = microscaling_forward(x, "e2m1", 32, "e8m0")     # MXFP4: scale 2^(2-2) = 1
        >>> y[0, :4].tolist(), inside[0, :4].tolist()
        ([0.5, -1.0, 6.0, 0.0], [True, True, False, True])
    """
    _check_args(x, element, block_size, block_scale, scale, axis)
    x32 = x.float()
    _, _, q, s, _, inside = _quantize(x32, element, block_size, block_scale, scale, axis)
    return (q * s).reshape(x.shape).to(x.dtype), inside.reshape(x.shape)


def microscaling_lsq_backward(
    grad: torch.Tensor, x: torch.Tensor, element: str, block_size: int, block_scale: str, scale: torch.Tensor,
    axis: Optional[int], grad_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the learned-scale estimator: ``(dx, dscale)``, ``dx = grad * inside`` (``x``'s
    dtype) and ``dscale = grad_factor * sum(grad * c * (q - v * inside))`` per scale (float32, the
    scale's shape); NaN elements contribute nothing.

    Example::

        >>> x, s = torch.tensor([1.0, 5.0, 1000.0]), torch.tensor([1.0])
        >>> dx, ds = microscaling_lsq_backward(torch.ones(3), x, "e4m3", 0, "none", s, None, 1.0)
        >>> dx.tolist(), ds.tolist()      # 1000 saturates at 448: its code 448 is its gradient
        ([1.0, 1.0, 0.0], [448.0])
    """
    _check_args(x, element, block_size, block_scale, scale, axis)
    if block_scale == "e8m0":
        raise ValueError("E8M0 block scales are powers of two chosen from the data: nothing to learn")
    x32 = x.float()
    _, v, q, s, c, inside = _quantize(x32, element, block_size, block_scale, scale, axis)
    g = grad.float().reshape(v.shape)
    dx = torch.where(inside, g, torch.zeros_like(g))
    contrib = g * c * (q - torch.where(inside, v, torch.zeros_like(v)))
    contrib = torch.where(torch.isnan(v), torch.zeros_like(contrib), contrib)
    if axis is None:
        ds = contrib.sum().reshape(scale.shape)
    else:
        ds = contrib.movedim(axis, 0).reshape(x.shape[axis], -1).sum(dim=1).reshape(scale.shape)
    return dx.reshape(x.shape).to(x.dtype), (ds * grad_factor).float()


def fake_quantize_format(x: torch.Tensor, fmt: str, scale: Optional[torch.Tensor] = None,
                         axis: Optional[int] = None) -> torch.Tensor:
    """The fake-quantized value of ``x`` in format ``fmt`` (no gradient path; the reference the
    quantizers' ops equal): block formats take their scales from ``x``, FP8 and NVFP4 take ``scale``
    or, when ``None``, :func:`float_scale` of ``x``.

    Example::

        >>> fake_quantize_format(torch.tensor([[0.3, -1.0, 7.0, 0.0] * 8]), "mxfp4")[0, :4].tolist()
        [0.5, -1.0, 6.0, 0.0]
    """
    f = MICRO_FORMATS[fmt]
    if f.block_scale != "e8m0" and scale is None:
        scale = float_scale(x, fmt, axis)
    return microscaling_forward(x, f.element, f.block_size, f.block_scale, scale, axis if f.block_size == 0 else None)[0]


def float_codes(x: torch.Tensor, fmt: str, scale: Optional[torch.Tensor] = None,
                axis: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The element values and scales the fake quantization of ``x`` in format ``fmt`` uses:
    ``(q, S)``, ``q`` float32 on the element grid (shape ``x.shape``, or ``x.shape[:-1] + (nblocks,
    block)`` for block formats), ``S`` float32 broadcasting against it, ``q * S`` the fake-quantized
    value (:func:`fake_quantize_format`) exactly. ``scale`` as :func:`fake_quantize_format` takes it.

    Example::

        >>> q, S = float_codes(torch.tensor([[0.3, -1.0, 7.0, 0.0] * 8]), "mxfp4")
        >>> q.shape, S.shape, q[0, 0, :4].tolist(), S.item()
        (torch.Size([1, 1, 32]), torch.Size([1, 1, 1]), [0.5, -1.0, 6.0, 0.0], 1.0)
    """
    f = MICRO_FORMATS[fmt]
    if f.block_scale != "e8m0" and scale is None:
        scale = float_scale(x, fmt, axis)
    axis = axis if f.block_size == 0 else None
    _check_args(x, f.element, f.block_size, f.block_scale, scale, axis)
    _, _, q, s, _, _ = _quantize(x.detach().float(), f.element, f.block_size, f.block_scale, scale, axis)
    return q, s


def mxfp4_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 codes of ``w`` as GGUF stores them: ``(e, q)``, ``e`` the uint8 E8M0 byte of each
    block of 32 along the last axis (``exponent + 127``), ``q`` the 4-bit E2M1 codes (bit 3 the
    sign, bits 0-2 the index into ``0, 0.5, 1, 1.5, 2, 3, 4, 6``), uint8 of ``w``'s shape. They
    decode to :func:`fake_quantize_format` ``(w, "mxfp4")`` exactly (NaN excepted: E2M1 has none).

    Example::

        >>> e, q = mxfp4_codes(torch.tensor([[0.3, -1.0, 7.0, 0.0] * 8]))
        >>> int(e[0, 0]), q[0, :4].tolist()
        (127, [1, 10, 7, 0])
    """
    y, _ = microscaling_forward(w.float(), "e2m1", 32, "e8m0")
    amax = block_amax(w.float(), 32)
    ex = e8m0_exponent(amax, "e2m1")
    v = y.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32) / pow2(ex).unsqueeze(-1)  # the E2M1 values, exact
    mag = torch.nan_to_num(v.abs(), nan=0.0)
    idx = torch.where(mag < 2.0, mag * 2.0, torch.where(mag < 4.0, mag + 2.0, mag / 2.0 + 4.0)).to(torch.uint8)
    sign = (torch.signbit(v) & (mag > 0)).to(torch.uint8) << 3
    return (ex + 127).to(torch.uint8), (idx | sign).reshape(w.shape)


def check_microscaling_spec(spec: Any) -> None:
    """Refuse a ``QuantSpec`` whose ``format`` is a microscaling / FP8 format its other fields
    contradict: ``bits`` is the element's width, signed and symmetric, ``round_mode: half_even``;
    block formats need ``granularity: per_group`` with their ``group_size`` (mxfp4 / mxfp8 32,
    nvfp4 16); FP8 needs ``per_tensor`` or ``per_channel``; ``estimator`` is ``ste``, or ``lsq`` where
    the format has a float32 scale to learn (nvfp4, fp8_*; not the E8M0 power-of-two scales of
    mxfp4 / mxfp8), and ``ste`` when ``dynamic``.

    Example::

        >>> from qat import QuantSpec
        >>> QuantSpec(bits=4, granularity="per_group", group_size=32, format="mxfp4").format.value
        'mxfp4'
        >>> QuantSpec(bits=4, granularity="per_group", group_size=32, format="mxfp4", estimator="lsq")
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: QuantSpec.format mxfp4 needs estimator one of ['ste'] (got 'lsq'); a mxfp4 tensor is {bits: 4, signed: true, symmetric: true, round_mode: half_even, granularity: per_group, group_size: 32, estimator: ste}
    """
    fmt = spec.format.value
    f = MICRO_FORMATS[fmt]
    want: dict[str, Any] = {"bits": f.bits, "signed": True, "symmetric": True, "round_mode": "half_even"}
    if f.block_size:
        want.update(granularity="per_group", group_size=f.block_size)
    gran = spec.granularity.value
    extra_bad, extra_want = (), {}
    if not f.block_size and gran not in ("per_tensor", "per_channel"):
        extra_bad = (f"granularity per_tensor or per_channel (got {gran!r})",)
        extra_want = {"granularity": "per_tensor|per_channel"}
    estimators = ["ste", "lsq"] if f.learnable and not spec.dynamic else ["ste"]
    check_format_fields(spec, f"{fmt} tensor", want, estimators, extra_bad, extra_want)


def lsq_grad_factor(numel_per_scale: int, fmt: str) -> float:
    """LSQ's gradient scale ``1 / sqrt(N * max)`` for a format's learned scale, ``N`` the
    elements per scale and ``max`` the element format's largest magnitude.

    Example::

        >>> round(lsq_grad_factor(448, "fp8_e4m3"), 6)
        0.002232
    """
    return 1.0 / math.sqrt(max(numel_per_scale, 1) * MICRO_FORMATS[fmt].elem.max)

