"""The public fake-quant ops: ``torch.library`` custom ops that dispatch to a backend.

Each op is one opaque node for ``torch.compile`` / ``torch.export`` (a fake implementation gives
output shapes); in eager mode the public functions call the same backend through a plain
``torch.autograd.Function``, which skips the dispatcher's Python overhead. The backend is chosen per call from the input's device:

* CUDA tensor and CuPy importable -> :mod:`qat.kernels.cupy_backend` (fused CUDA kernels);
* anything else -> :mod:`qat.kernels.reference` (PyTorch).

The choice is logged once per backend on the ``qat.kernels`` logger, and :func:`backend_name`
reports it. Set ``QAT_KERNELS=reference`` to force the reference everywhere.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from qat.granularity import Layout

from . import reference

__all__ = [
    "fake_quantize",
    "fake_quantize_lsq",
    "fake_quantize_pact",
    "backend_name",
]

log = logging.getLogger("qat.kernels")


@functools.lru_cache(maxsize=None)
def _cupy_backend() -> Optional[ModuleType]:
    if os.environ.get("QAT_KERNELS", "").lower() == "reference":
        log.info("qat.kernels: QAT_KERNELS=reference, CUDA tensors use the PyTorch reference")
        return None
    try:
        from . import cupy_backend
    except ImportError as exc:  # CuPy missing or the backend not importable
        log.info("qat.kernels: CuPy backend unavailable (%s); CUDA tensors use the PyTorch reference", exc)
        return None
    if not cupy_backend.available():
        log.info("qat.kernels: CuPy cannot reach a GPU; CUDA tensors use the PyTorch reference")
        return None
    log.info("qat.kernels: CUDA tensors use the fused CuPy kernels")
    return cupy_backend


def _backend(x: Tensor) -> ModuleType:
    if x.is_cuda:
        cp = _cupy_backend()
        if cp is not None:
            return cp
    return reference


def backend_name(device: torch.device | str) -> str:
    """Name of the backend that runs the ops for tensors on ``device``: ``"cupy"`` or ``"reference"``.

    Example::

        >>> backend_name("cpu")
        'reference'
    """
    device = torch.device(device)
    return "cupy" if device.type == "cuda" and _cupy_backend() is not None else "reference"


# ----------------------------------------------------------------------------- clipped STE


@torch.library.custom_op("qat::fake_quantize", mutates_args=())
def _fq(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    axis: Optional[int],
    group_size: Optional[int],
    round_mode: str,
) -> tuple[Tensor, Tensor]:
    return _backend(x).fake_quantize_forward(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode)


@_fq.register_fake
def _(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode):
    return x.new_empty(x.shape), x.new_empty((reference.mask_words(x.numel()),), dtype=torch.int32)


@torch.library.custom_op("qat::fake_quantize_backward", mutates_args=())
def _fq_bwd(grad: Tensor, mask: Tensor) -> Tensor:
    return _backend(grad).fake_quantize_backward(grad, mask)


@_fq_bwd.register_fake
def _(grad, mask):
    return grad.new_empty(grad.shape)


def _fq_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _fq_grad(ctx, grad_y, grad_mask):
    (mask,) = ctx.saved_tensors
    return torch.ops.qat.fake_quantize_backward(grad_y, mask), None, None, None, None, None, None, None


_fq.register_autograd(_fq_grad, setup_context=_fq_setup)

# ----------------------------------------------------------------------------- LSQ / LSQ+


@torch.library.custom_op("qat::fake_quantize_lsq", mutates_args=())
def _lsq(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    axis: Optional[int],
    group_size: Optional[int],
    grad_factor: float,
    round_mode: str,
) -> Tensor:
    return _backend(x).fake_quantize_lsq_forward(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode)


@_lsq.register_fake
def _(x, scale, zero_point, qmin, qmax, axis, group_size, grad_factor, round_mode):
    return x.new_empty(x.shape)


@torch.library.custom_op("qat::fake_quantize_lsq_backward", mutates_args=())
def _lsq_bwd(
    grad: Tensor,
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    axis: Optional[int],
    group_size: Optional[int],
    grad_factor: float,
    round_mode: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _backend(x).fake_quantize_lsq_backward(
        grad, x, scale, zero_point, qmin, qmax, axis, group_size, grad_factor, round_mode
    )


@_lsq_bwd.register_fake
def _(grad, x, scale, zero_point, qmin, qmax, axis, group_size, grad_factor, round_mode):
    return x.new_empty(x.shape), scale.new_empty(scale.shape), zero_point.new_empty(zero_point.shape)


def _lsq_setup(ctx, inputs, output):
    x, scale, zero_point, qmin, qmax, axis, group_size, grad_factor, round_mode = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.args = (qmin, qmax, axis, group_size, grad_factor, round_mode)


def _lsq_grad(ctx, grad_y):
    x, scale, zero_point = ctx.saved_tensors
    dx, ds, dz = torch.ops.qat.fake_quantize_lsq_backward(grad_y, x, scale, zero_point, *ctx.args)
    return dx, ds, dz, None, None, None, None, None, None


_lsq.register_autograd(_lsq_grad, setup_context=_lsq_setup)

# ----------------------------------------------------------------------------- PACT


@torch.library.custom_op("qat::fake_quantize_pact", mutates_args=())
def _pact(x: Tensor, alpha: Tensor, qmin: int, qmax: int, round_mode: str) -> Tensor:
    return _backend(x).fake_quantize_pact_forward(x, alpha, qmin, qmax, round_mode)


@_pact.register_fake
def _(x, alpha, qmin, qmax, round_mode):
    return x.new_empty(x.shape)


@torch.library.custom_op("qat::fake_quantize_pact_backward", mutates_args=())
def _pact_bwd(grad: Tensor, x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    return _backend(x).fake_quantize_pact_backward(grad, x, alpha)


@_pact_bwd.register_fake
def _(grad, x, alpha):
    return x.new_empty(x.shape), alpha.new_empty(alpha.shape)


def _pact_setup(ctx, inputs, output):
    x, alpha, *_ = inputs
    ctx.save_for_backward(x, alpha)


def _pact_grad(ctx, grad_y):
    x, alpha = ctx.saved_tensors
    dx, dalpha = torch.ops.qat.fake_quantize_pact_backward(grad_y, x, alpha)
    return dx, dalpha, None, None, None


_pact.register_autograd(_pact_grad, setup_context=_pact_setup)

# ----------------------------------------------------------------------------- eager fast path
# The custom ops above are what torch.compile / torch.export see. In eager mode the dispatcher's
# Python layers around a custom op (autograd wrapper, redispatch, dynamo guards) cost ~0.2-0.4 ms
# of CPU per forward + backward, more than the fused kernels take on a 64M-element tensor; these
# autograd Functions call the same backend functions directly.


def _traced(x: Tensor) -> bool:
    return torch.compiler.is_compiling() or x.is_meta


class _FakeQuantizeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, group_size, round_mode):
        y, mask = _backend(x).fake_quantize_forward(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode)
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (mask,) = ctx.saved_tensors
        return _backend(grad_y).fake_quantize_backward(grad_y, mask), None, None, None, None, None, None, None


class _LSQFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, group_size, grad_factor, round_mode):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.args = (qmin, qmax, axis, group_size, grad_factor, round_mode)
        return _backend(x).fake_quantize_lsq_forward(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode)

    @staticmethod
    def backward(ctx, grad_y):
        x, scale, zero_point = ctx.saved_tensors
        dx, ds, dz = _backend(x).fake_quantize_lsq_backward(grad_y, x, scale, zero_point, *ctx.args)
        return dx, ds, dz, None, None, None, None, None, None


class _PACTFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, qmin, qmax, round_mode):
        ctx.save_for_backward(x, alpha)
        return _backend(x).fake_quantize_pact_forward(x, alpha, qmin, qmax, round_mode)

    @staticmethod
    def backward(ctx, grad_y):
        x, alpha = ctx.saved_tensors
        dx, dalpha = _backend(x).fake_quantize_pact_backward(grad_y, x, alpha)
        return dx, dalpha, None, None, None


# ----------------------------------------------------------------------------- public API


def _check(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis, group_size, round_mode):
    """Validate arguments before launch; returns the axis normalized to be non-negative."""
    if not x.is_floating_point():
        raise TypeError(f"fake_quantize: x must be a floating tensor, got {x.dtype}")
    for name, p in (("scale", scale), ("zero_point", zero_point)):
        if p.dtype != torch.float32:
            raise TypeError(f"fake_quantize: {name} must be float32, got {p.dtype}")
        if p.device != x.device:
            raise ValueError(f"fake_quantize: {name} is on {p.device} but x is on {x.device}")
    if not qmin < qmax:
        raise ValueError(f"fake_quantize: need qmin < qmax, got qmin={qmin}, qmax={qmax}")
    if round_mode not in reference.ROUND_MODES:
        raise ValueError(f"fake_quantize: round_mode must be one of {reference.ROUND_MODES}, got {round_mode!r}")
    if axis is not None and group_size is not None:
        raise ValueError("fake_quantize: give axis (per-channel) or group_size (per-group), not both")
    if group_size is not None:
        k = x.shape[-1] if x.dim() else 1
        if group_size <= 0 or k % group_size:
            raise ValueError(f"fake_quantize: group_size={group_size} must divide the last dimension {k}")
    elif axis is not None:
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"fake_quantize: axis={axis} out of range for a {x.dim()}-d tensor")
        axis = axis % x.dim()
    layout = Layout(axis=axis, group_size=group_size)
    expected = None if layout.is_per_tensor else layout.param_shape(x.shape)
    for name, p in (("scale", scale), ("zero_point", zero_point)):
        if expected is None:
            if p.numel() != 1:
                raise ValueError(f"fake_quantize: per-tensor {name} must have one element, got shape {tuple(p.shape)}")
        elif tuple(p.shape) != expected:
            raise ValueError(f"fake_quantize: {name} must have shape {expected}, got {tuple(p.shape)}")
    return axis


def fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    axis: Optional[int] = None,
    group_size: Optional[int] = None,
    round_mode: str = "half_even",
) -> Tensor:
    """Quantize-dequantize ``x`` with a clipped straight-through estimator in the backward pass.

    Args:
        x: float32 / float16 / bfloat16 tensor.
        scale: float32 scales: one element (per-tensor), ``(x.shape[axis],)`` (per-channel), or
            ``x.shape[:-1] + (x.shape[-1] // group_size,)`` (per-group).
        zero_point: float32, integer-valued, same shape as ``scale``.
        qmin, qmax: the integer range, e.g. ``-8, 7`` for signed 4 bits.
        axis: channel axis for per-channel scales.
        group_size: group length along the last axis for per-group scales.
        round_mode: ``"half_even"`` (default, as ``torch.round``), ``"half_away"`` or ``"half_up"``.

    Returns:
        A tensor of ``x``'s shape and dtype: ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``.

    Example::

        >>> x = torch.tensor([0.1, 0.26, -3.0])
        >>> fake_quantize(x, torch.tensor([0.25]), torch.tensor([0.0]), -8, 7)
        tensor([ 0.0000,  0.2500, -2.0000])
    """
    axis = _check(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode)
    args = (x, scale, zero_point, int(qmin), int(qmax), axis, group_size, round_mode)
    if _traced(x):
        return torch.ops.qat.fake_quantize(*args)[0]
    return _FakeQuantizeFn.apply(*args)


def fake_quantize_lsq(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    axis: Optional[int] = None,
    group_size: Optional[int] = None,
    grad_factor: float = 1.0,
    round_mode: str = "half_even",
) -> Tensor:
    """Fake quantization with a learned step size (LSQ) and, if ``zero_point`` requires grad, a
    learned offset (LSQ+).

    Same arguments as :func:`fake_quantize`, plus ``grad_factor``, the LSQ gradient scale
    (``1 / sqrt(N * qmax)`` in the paper, ``N`` the elements per scale). The backward pass returns
    gradients for ``x``, ``scale`` and ``zero_point``, matching
    ``torch._fake_quantize_learnable_per_{tensor,channel}_affine``.

    Example::

        >>> x = torch.randn(4, 8)
        >>> s = torch.full((4,), 0.1, requires_grad=True)
        >>> y = fake_quantize_lsq(x, s, torch.zeros(4), -8, 7, axis=0, grad_factor=0.1)
        >>> y.sum().backward(); s.grad.shape
        torch.Size([4])
    """
    axis = _check(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode)
    args = (x, scale, zero_point, int(qmin), int(qmax), axis, group_size, float(grad_factor), round_mode)
    if _traced(x):
        return torch.ops.qat.fake_quantize_lsq(*args)
    return _LSQFn.apply(*args)


def fake_quantize_pact(x: Tensor, alpha: Tensor, qmin: int, qmax: int, round_mode: str = "half_even") -> Tensor:
    """PACT: clip ``x`` to ``[0, alpha]`` with a learned ``alpha`` and quantize to ``[qmin, qmax]``.

    The gradient reaches ``alpha`` from elements at or above it (``dy/dalpha = 1[x >= alpha]``).

    Example::

        >>> alpha = torch.tensor([2.0], requires_grad=True)
        >>> y = fake_quantize_pact(torch.tensor([-1.0, 0.5, 3.0]), alpha, 0, 15)
        >>> y.detach()
        tensor([0.0000, 0.5333, 2.0000])
    """
    if alpha.numel() != 1 or alpha.dtype != torch.float32:
        raise ValueError(f"fake_quantize_pact: alpha must be a one-element float32 tensor, got {alpha.dtype} {tuple(alpha.shape)}")
    if not qmin < qmax:
        raise ValueError(f"fake_quantize_pact: need qmin < qmax, got qmin={qmin}, qmax={qmax}")
    if round_mode not in reference.ROUND_MODES:
        raise ValueError(f"fake_quantize_pact: round_mode must be one of {reference.ROUND_MODES}, got {round_mode!r}")
    args = (x, alpha, int(qmin), int(qmax), round_mode)
    if _traced(x):
        return torch.ops.qat.fake_quantize_pact(*args)
    return _PACTFn.apply(*args)
