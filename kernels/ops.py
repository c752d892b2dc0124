"""The public fake-quant ops: ``torch.library`` custom ops that dispatch to a backend.

Each op is one opaque node for ``torch.compile`` / ``torch.export`` (a fake implementation gives
output shapes); in eager mode the public functions call the same backend through a plain
``torch.autograd.Function``, which skips the dispatcher's Python overhead. The backend is chosen per call from the input's device:

* CUDA tensor and CuPy importable -> :mod:`qat.kernels.cupy_backend` (fused CUDA kernels);
* anything else -> :mod:`qat.kernels.reference` (PyTorch).

The choice is logged once per backend on the ``qat.kernels`` logger, and :func:`backend_name`
reports it. Set ``QAT_KERNELS=reference`` to force the reference everywhere. Empty tensors always
run the reference.

Parameter checks, as PyTorch's own fake-quant ops make them, and a few more (``docs/math.md``,
section 11):

* Always (no tensor is read): ``qmin`` / ``qmax`` are Python integers (not bools or floats) with
  ``qmin < qmax``; ``axis`` / ``group_size`` integers or ``None``; ``round_mode`` one of
  :data:`~qat.spec.ROUND_MODES`; dtypes, devices and shapes of ``scale`` / ``zero_point`` /
  ``alpha``; ``grad_factor`` a finite number.
* Values (they read the parameters, which on a GPU is a device sync): every scale finite and
  nonzero with ``1 / scale`` and ``scale * (qmax - qmin)`` finite, so the math cannot make a NaN
  or Inf of a finite input (its sign is free: GGUF Q4_0's block scales are negative where the
  block's extreme is positive); for :func:`fake_quantize`, zero points integer-valued within ``[qmin, qmax]``; for
  LSQ, zero points finite (they are rounded and clamped); PACT's ``alpha`` finite and positive.
  They run when the tensors are on the CPU (reading them there costs no sync) and never inside
  ``torch.compile`` / ``torch.export`` tracing. On a GPU they are off unless asked for:
  ``QAT_CHECK_PARAMS=1`` in the environment or :func:`set_param_checks` ``(True)`` turns them on
  everywhere, ``QAT_CHECK_PARAMS=0`` / ``set_param_checks(False)`` off everywhere.

A failed check raises ``TypeError`` (a wrong type) or ``ValueError`` (a wrong value) naming the
op, the argument and what it takes. PyTorch computes a scale of 0 as 0 output (and NaN for
``x = 0`` here, as ``0 * inf``), so a zero scale is refused rather than matched.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from qat.granularity import Layout
from qat.microscaling import BLOCK_SCALES, ELEMENTS

from . import reference

__all__ = [
    "fake_quantize",
    "fake_quantize_lsq",
    "fake_quantize_pact",
    "fake_quantize_minmax",
    "fake_quantize_float",
    "fake_quantize_float_lsq",
    "backend_name",
    "set_compile_route",
    "compile_route",
    "set_param_checks",
    "param_checks",
]

log = logging.getLogger("qat.kernels")


def _env_param_checks() -> Optional[bool]:
    v = os.environ.get("QAT_CHECK_PARAMS", "").strip().lower()
    if v in ("1", "true", "yes", "on", "all"):
        return True
    if v in ("0", "false", "no", "off", "none"):
        return False
    return None  # unset / "cpu" / "auto": CPU tensors only


_PARAM_CHECKS: Optional[bool] = _env_param_checks()


def set_param_checks(enabled: Optional[bool]) -> Optional[bool]:
    """Turn the ops' value checks of their parameters (finite, nonzero scales; zero points in
    range; PACT's positive clip) on everywhere (``True``: GPU tensors too, one device sync a call),
    off everywhere (``False``), or back to the default (``None``: CPU tensors only). Overrides the
    ``QAT_CHECK_PARAMS`` environment variable. Returns the previous setting.

    Example::

        >>> previous = set_param_checks(True)
        >>> fake_quantize(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0]), -8, 7)
        Traceback (most recent call last):
        ...
        ValueError: fake_quantize: scale must be finite and nonzero, with 1 / scale and scale * (qmax - qmin) finite, got 0.0 at index 0 of 1
        >>> _ = set_param_checks(previous)
    """
    global _PARAM_CHECKS
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_param_checks: enabled must be True, False or None, got {enabled!r}")
    previous, _PARAM_CHECKS = _PARAM_CHECKS, enabled
    return previous


def param_checks() -> Optional[bool]:
    """The value-check setting: ``True`` (everywhere), ``False`` (nowhere) or ``None`` (CPU only).

    Example::

        >>> param_checks() in (None, True, False)
        True
    """
    return _PARAM_CHECKS


COMPILE_ROUTES = ("kernel", "inductor")
_COMPILE_ROUTE: str = os.environ.get("QAT_COMPILE_ROUTE", "kernel").strip().lower() or "kernel"
if _COMPILE_ROUTE not in COMPILE_ROUTES:
    raise ValueError(f"QAT_COMPILE_ROUTE must be one of {COMPILE_ROUTES}, got {_COMPILE_ROUTE!r}")


def set_compile_route(route: str) -> str:
    """How the clipped-STE ops (:func:`fake_quantize_minmax`, :func:`fake_quantize`) run inside
    ``torch.compile`` (eager always takes the fused kernels): ``"kernel"`` (the default), each fused
    kernel as one opaque custom op; or ``"inductor"``, the same math as PyTorch ops (range, scale,
    quantize-dequantize, the STE mask a boolean tensor) that Inductor fuses with the neighbouring
    ops. LSQ and PACT are the opaque op on both routes. Measured on an H200
    (``benchmarks/results/train_step_h200_inductor_route.md``), ``"inductor"`` makes the STE training
    step faster under default ``torch.compile`` (1.14x float against 1.64x; with CUDA graphs 1.14x
    against 1.13x) but compiles 5x slower, and its gradients differ from eager's more than the kernel route's
    (``benchmarks/compile_grad_check.py``: largest relative difference 0.64 against 0.006 on CUDA,
    0.03 against 0.008 on the CPU), so it is not the default. Also ``QAT_COMPILE_ROUTE`` in the
    environment; returns the previous route. Takes effect at the next compilation
    (``torch._dynamo.reset()`` to recompile a model).

    Example::

        >>> previous = set_compile_route("inductor"); _ = set_compile_route(previous)
        >>> compile_route() in COMPILE_ROUTES
        True
    """
    global _COMPILE_ROUTE
    if route not in COMPILE_ROUTES:
        raise ValueError(f"set_compile_route: route must be one of {COMPILE_ROUTES}, got {route!r}")
    previous, _COMPILE_ROUTE = _COMPILE_ROUTE, route
    return previous


def compile_route() -> str:
    """The route of :func:`set_compile_route` in effect."""
    return _COMPILE_ROUTE


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
    if x.is_cuda and x.numel() > 0:
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
    out_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor]:
    return _backend(x).fake_quantize_forward(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode, out_dtype)


def _mask_like(x: Tensor) -> Tensor:
    return x.new_empty((reference.mask_words(x.numel()),), dtype=torch.int32)


@_fq.register_fake
def _(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), _mask_like(x)


@torch.library.custom_op("qat::fake_quantize_backward", mutates_args=())
def _fq_bwd(grad: Tensor, mask: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    return _backend(grad).fake_quantize_backward(grad, mask, dtype)


@_fq_bwd.register_fake
def _(grad, mask, dtype):
    return grad.new_empty(grad.shape, dtype=dtype or grad.dtype)


def _fq_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.x_dtype = inputs[0].dtype


def _fq_grad(ctx, grad_y, grad_mask):
    (mask,) = ctx.saved_tensors
    return torch.ops.qat.fake_quantize_backward(grad_y, mask, ctx.x_dtype), *(None,) * 8


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
    out_dtype: Optional[torch.dtype],
) -> Tensor:
    return _backend(x).fake_quantize_lsq_forward(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode, out_dtype)


@_lsq.register_fake
def _(x, scale, zero_point, qmin, qmax, axis, group_size, grad_factor, round_mode, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


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
    x, scale, zero_point, qmin, qmax, axis, group_size, grad_factor, round_mode, _ = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.args = (qmin, qmax, axis, group_size, grad_factor, round_mode)


def _lsq_grad(ctx, grad_y):
    x, scale, zero_point = ctx.saved_tensors
    dx, ds, dz = torch.ops.qat.fake_quantize_lsq_backward(grad_y.to(x.dtype), x, scale, zero_point, *ctx.args)
    return dx, ds, dz, *(None,) * 7


_lsq.register_autograd(_lsq_grad, setup_context=_lsq_setup)

# ----------------------------------------------------------------------------- PACT


@torch.library.custom_op("qat::fake_quantize_pact", mutates_args=())
def _pact(x: Tensor, alpha: Tensor, qmin: int, qmax: int, round_mode: str, out_dtype: Optional[torch.dtype]) -> Tensor:
    return _backend(x).fake_quantize_pact_forward(x, alpha, qmin, qmax, round_mode, out_dtype)


@_pact.register_fake
def _(x, alpha, qmin, qmax, round_mode, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


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
    dx, dalpha = torch.ops.qat.fake_quantize_pact_backward(grad_y.to(x.dtype), x, alpha)
    return dx, dalpha, None, None, None, None


_pact.register_autograd(_pact_grad, setup_context=_pact_setup)

# ----------------------------------------------------------------------------- range of the data
# Functional for torch.compile: the observer state comes back as new tensors (the caller copies them
# into its buffers); the eager path below updates the buffers in place inside the kernel instead.


@torch.library.custom_op("qat::fake_quantize_minmax", mutates_args=())
def _mm(
    x: Tensor, row: int, qmin: int, qmax: int, symmetric: bool, scale_f16: bool, round_mode: str,
    out_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor]:
    return _backend(x).fake_quantize_minmax_forward(x, row, qmin, qmax, symmetric, scale_f16, round_mode, None, out_dtype)


@_mm.register_fake
def _(x, row, qmin, qmax, symmetric, scale_f16, round_mode, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), _mask_like(x)


@torch.library.custom_op("qat::fake_quantize_minmax_observe", mutates_args=())
def _mmo(
    x: Tensor,
    min_val: Tensor,
    max_val: Tensor,
    seen: Tensor,
    row: int,
    qmin: int,
    qmax: int,
    symmetric: bool,
    scale_f16: bool,
    round_mode: str,
    out_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    state = (min_val.clone(), max_val.clone(), seen.clone(), torch.empty_like(min_val), torch.empty_like(min_val))
    y, mask = _backend(x).fake_quantize_minmax_forward(x, row, qmin, qmax, symmetric, scale_f16, round_mode, state,
                                                       out_dtype)  # fmt: skip
    return (y, mask, *state)


@_mmo.register_fake
def _(x, min_val, max_val, seen, row, qmin, qmax, symmetric, scale_f16, round_mode, out_dtype):
    return (x.new_empty(x.shape, dtype=out_dtype or x.dtype), _mask_like(x), torch.empty_like(min_val),
            torch.empty_like(max_val), torch.empty_like(seen), torch.empty_like(min_val), torch.empty_like(min_val))  # fmt: skip


def _mm_grad(ctx, grad_y, *unused):
    (mask,) = ctx.saved_tensors
    return torch.ops.qat.fake_quantize_backward(grad_y, mask, ctx.x_dtype), *(None,) * (ctx.n_inputs - 1)


def _mm_setup(ctx, inputs, output):
    _fq_setup(ctx, inputs, output)
    ctx.n_inputs = len(inputs)


_mm.register_autograd(_mm_grad, setup_context=_mm_setup)
_mmo.register_autograd(_mm_grad, setup_context=_mm_setup)

# ----------------------------------------------------------------------------- eager fast path
# The custom ops above are what torch.compile / torch.export see. In eager mode the dispatcher's
# Python layers around a custom op (autograd wrapper, redispatch, dynamo guards) cost ~0.2-0.4 ms
# of CPU per forward + backward, more than the fused kernels take on a 64M-element tensor; these
# autograd Functions call the same backend functions directly.


def _traced(x: Tensor) -> bool:
    return torch.compiler.is_compiling() or x.is_meta


class _FakeQuantizeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, group_size, round_mode, out_dtype):
        y, mask = _backend(x).fake_quantize_forward(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode,
                                                    out_dtype)  # fmt: skip
        ctx.save_for_backward(mask)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (mask,) = ctx.saved_tensors
        return _backend(grad_y).fake_quantize_backward(grad_y, mask, ctx.x_dtype), *(None,) * 8


class _LSQFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, group_size, grad_factor, round_mode, out_dtype):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.args = (qmin, qmax, axis, group_size, grad_factor, round_mode)
        return _backend(x).fake_quantize_lsq_forward(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode,
                                                     out_dtype)  # fmt: skip

    @staticmethod
    def backward(ctx, grad_y):
        x, scale, zero_point = ctx.saved_tensors
        dx, ds, dz = _backend(x).fake_quantize_lsq_backward(grad_y.to(x.dtype), x, scale, zero_point, *ctx.args)
        return dx, ds, dz, *(None,) * 7


class _PACTFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, qmin, qmax, round_mode, out_dtype):
        ctx.save_for_backward(x, alpha)
        return _backend(x).fake_quantize_pact_forward(x, alpha, qmin, qmax, round_mode, out_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, alpha = ctx.saved_tensors
        dx, dalpha = _backend(x).fake_quantize_pact_backward(grad_y.to(x.dtype), x, alpha)
        return dx, dalpha, None, None, None, None


class _MaskedSTE(torch.autograd.Function):
    """``y`` forward, ``grad * inside`` backward: the clipped STE of an unpacked mask (traced by
    torch.compile into the neighbouring kernels)."""

    @staticmethod
    def forward(ctx, x, y, inside):
        ctx.save_for_backward(inside)
        return y.clone()

    @staticmethod
    def backward(ctx, grad_y):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad_y, torch.zeros_like(grad_y)), None, None


def _fake_quantize_inductor(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode, out_dtype):
    with torch.no_grad():
        y, inside = reference.fake_quantize_unpacked(x.detach(), scale, zero_point, qmin, qmax, axis, group_size, round_mode)
    y = _MaskedSTE.apply(x, y, inside)
    return y if out_dtype is None else y.to(out_dtype)


def _minmax_inductor(x, row, qmin, qmax, symmetric, scale_f16, round_mode, out_dtype, state):
    with torch.no_grad():
        rows, s, z = reference.minmax_qparams(x.detach(), row, qmin, qmax, symmetric, scale_f16, state)
        y, inside = reference.fake_quantize_unpacked(rows, s, z, qmin, qmax, None, row, round_mode)
    y = _MaskedSTE.apply(x, y.reshape(x.shape), inside.reshape(x.shape))
    return y if out_dtype is None else y.to(out_dtype)


class _MinMaxFn(_FakeQuantizeFn):
    """The range-of-the-data forward; the backward is :class:`_FakeQuantizeFn`'s mask (9 inputs too)."""

    @staticmethod
    def forward(ctx, x, row, qmin, qmax, symmetric, scale_f16, round_mode, out_dtype, state):
        y, mask = _backend(x).fake_quantize_minmax_forward(x, row, qmin, qmax, symmetric, scale_f16, round_mode, state,
                                                           out_dtype)  # fmt: skip
        ctx.save_for_backward(mask)
        ctx.x_dtype = x.dtype
        return y


# ----------------------------------------------------------------------------- public API


def _check_ints(op: str, qmin, qmax, axis, group_size, round_mode) -> None:
    """The checks that read no tensor: argument types and the integer range."""
    for name, v in (("qmin", qmin), ("qmax", qmax)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{op}: {name} must be a Python int, got {v!r} ({type(v).__name__})")
    if not qmin < qmax:
        raise ValueError(f"{op}: need qmin < qmax, got qmin={qmin}, qmax={qmax}")
    for name, v in (("axis", axis), ("group_size", group_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
            raise TypeError(f"{op}: {name} must be an int or None, got {v!r} ({type(v).__name__})")
    if not isinstance(round_mode, str) or round_mode not in reference.ROUND_MODES:
        raise ValueError(f"{op}: round_mode must be one of {reference.ROUND_MODES}, got {round_mode!r}")


def _check_out_dtype(op: str, out_dtype) -> None:
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"{op}: out_dtype must be None or a floating dtype, got {out_dtype!r}")


def _checks_values(x: Tensor) -> bool:
    """Whether this call checks parameter values (see the module docstring)."""
    if _PARAM_CHECKS is False or _traced(x):
        return False
    return _PARAM_CHECKS is True or x.device.type == "cpu"


def _first_bad(op: str, name: str, t: Tensor, bad: Tensor, what: str) -> None:
    idx = int(bad.reshape(-1).nonzero()[0, 0])
    raise ValueError(f"{op}: {name} must be {what}, got {t.reshape(-1)[idx].item()} at index {idx} of {t.numel()}")


_SCALE_RULE = "finite and nonzero, with 1 / scale and scale * (qmax - qmin) finite"


def _check_values(op: str, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, lsq: bool) -> None:
    """Scales finite and nonzero; zero points integer-valued in [qmin, qmax] (LSQ: finite).
    One read of a boolean (a device sync on a GPU)."""
    s, z = scale.detach(), zero_point.detach()
    # finite and nonzero, and the math stays finite: 1/s (a subnormal scale's is inf, and 0 * inf is
    # NaN) and (q - z) * s with |q - z| <= qmax - qmin. (1/s) * (s * (qmax - qmin)) is finite exactly
    # then: inf * small, 0 * inf, inf * tiny and NaN all are not.
    bad_s = ~torch.isfinite(torch.reciprocal(s) * (s * float(qmax - qmin)))
    # an integer in [qmin, qmax] is its own rounded, clamped value; NaN != NaN
    bad_z = ~torch.isfinite(z) if lsq else torch.clamp(torch.round(z), qmin, qmax) != z
    if not torch.cat([bad_s.reshape(-1), bad_z.reshape(-1)]).any().item():
        return
    if bad_s.any().item():
        _first_bad(op, "scale", s, bad_s, _SCALE_RULE)
    what = "finite (it is rounded and clamped to [qmin, qmax])" if lsq else f"an integer in [qmin, qmax] = [{qmin}, {qmax}]"
    _first_bad(op, "zero_point", z, bad_z, what)


def _check(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis, group_size, round_mode, op="fake_quantize", lsq=False):
    """Validate arguments before launch; returns the axis normalized to be non-negative."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    for name, p in (("scale", scale), ("zero_point", zero_point)):
        if not isinstance(p, Tensor):
            raise TypeError(f"{op}: {name} must be a float32 tensor, got {type(p).__name__}")
        if p.dtype != torch.float32:
            raise TypeError(f"{op}: {name} must be float32, got {p.dtype}")
        if p.device != x.device:
            raise ValueError(f"{op}: {name} is on {p.device} but x is on {x.device}")
    _check_ints(op, qmin, qmax, axis, group_size, round_mode)
    if axis is not None and group_size is not None:
        raise ValueError(f"{op}: give axis (per-channel) or group_size (per-group), not both")
    if group_size is not None:
        k = x.shape[-1] if x.dim() else 1
        if group_size <= 0 or k % group_size:
            raise ValueError(f"{op}: group_size={group_size} must divide the last dimension {k}")
    elif axis is not None:
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"{op}: axis={axis} out of range for a {x.dim()}-d tensor")
        axis = axis % x.dim()
    layout = Layout(axis=axis, group_size=group_size)
    expected = None if layout.is_per_tensor else layout.param_shape(x.shape)
    for name, p in (("scale", scale), ("zero_point", zero_point)):
        if expected is None:
            if p.numel() != 1:
                raise ValueError(f"{op}: per-tensor {name} must have one element, got shape {tuple(p.shape)}")
        elif tuple(p.shape) != expected:
            raise ValueError(f"{op}: {name} must have shape {expected}, got {tuple(p.shape)}")
    if _checks_values(x):
        _check_values(op, scale, zero_point, qmin, qmax, lsq)
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
    out_dtype: Optional[torch.dtype] = None,
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
        out_dtype: the result's dtype (default ``x``'s): the result is what ``.to(out_dtype)`` of it
            would give, written so by the kernel in one pass, and the gradient comes back in ``x``'s
            dtype. What a layer under autocast passes (a float32 input feeding a bfloat16 matmul).

    Returns:
        A tensor of ``x``'s shape: ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``.

    Raises:
        TypeError: ``qmin`` / ``qmax`` not Python ints, or a tensor of the wrong dtype.
        ValueError: ``qmin >= qmax``, shapes that do not fit, or (values checked: see the module
            docstring) a scale that is 0, NaN or infinite, or a zero point that is not an integer
            in ``[qmin, qmax]``.

    Example::

        >>> x = torch.tensor([0.1, 0.26, -3.0])
        >>> fake_quantize(x, torch.tensor([0.25]), torch.tensor([0.0]), -8, 7)
        tensor([ 0.0000,  0.2500, -2.0000])
    """
    axis = _check(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode)
    _check_out_dtype("fake_quantize", out_dtype)
    out_dtype = None if out_dtype == x.dtype else out_dtype
    args = (x, scale, zero_point, int(qmin), int(qmax), axis, None if group_size is None else int(group_size), round_mode,
            out_dtype)  # fmt: skip
    if _traced(x):
        if _COMPILE_ROUTE == "inductor":
            return _fake_quantize_inductor(*args)
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
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Fake quantization with a learned step size (LSQ) and, if ``zero_point`` requires grad, a
    learned offset (LSQ+).

    Same arguments as :func:`fake_quantize` (``out_dtype`` too), plus ``grad_factor``, the LSQ gradient scale
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
    if isinstance(grad_factor, bool) or not isinstance(grad_factor, numbers.Real) or not math.isfinite(grad_factor):
        raise TypeError(f"fake_quantize_lsq: grad_factor must be a finite number, got {grad_factor!r}")
    axis = _check(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode, op="fake_quantize_lsq", lsq=True)
    _check_out_dtype("fake_quantize_lsq", out_dtype)
    out_dtype = None if out_dtype == x.dtype else out_dtype
    args = (x, scale, zero_point, int(qmin), int(qmax), axis, group_size, float(grad_factor), round_mode, out_dtype)
    if _traced(x):  # the opaque op on both routes: traced as an autograd.Function, Inductor gave wrong
        # LSQ gradients on CUDA (right on the CPU); benchmarks/compile_grad_check.py shows it
        return torch.ops.qat.fake_quantize_lsq(*args)
    return _LSQFn.apply(*args)


def fake_quantize_pact(
    x: Tensor, alpha: Tensor, qmin: int, qmax: int, round_mode: str = "half_even", out_dtype: Optional[torch.dtype] = None
) -> Tensor:
    """PACT: clip ``x`` to ``[0, alpha]`` with a learned ``alpha`` and quantize to ``[qmin, qmax]``.

    The gradient reaches ``alpha`` from elements at or above it (``dy/dalpha = 1[x >= alpha]``);
    ``out_dtype`` as :func:`fake_quantize`.

    Raises:
        TypeError / ValueError: as :func:`fake_quantize`; and ``alpha`` not a one-element float32
            tensor, or (values checked) not finite and positive.

    Example::

        >>> alpha = torch.tensor([2.0], requires_grad=True)
        >>> y = fake_quantize_pact(torch.tensor([-1.0, 0.5, 3.0]), alpha, 0, 15)
        >>> y.detach()
        tensor([0.0000, 0.5333, 2.0000])
    """
    op = "fake_quantize_pact"
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(alpha, Tensor) or alpha.numel() != 1 or alpha.dtype != torch.float32:
        raise ValueError(f"{op}: alpha must be a one-element float32 tensor, got {getattr(alpha, 'dtype', type(alpha).__name__)} {tuple(getattr(alpha, 'shape', ()))}")
    if alpha.device != x.device:
        raise ValueError(f"{op}: alpha is on {alpha.device} but x is on {x.device}")
    _check_ints(op, qmin, qmax, None, None, round_mode)
    _check_out_dtype(op, out_dtype)
    out_dtype = None if out_dtype == x.dtype else out_dtype
    if _checks_values(x):
        a = alpha.detach()
        bad = ~(torch.isfinite(a) & torch.isfinite(float(qmax - qmin) / a)) | (a <= 0)  # s = alpha / (qmax - qmin): 1/s finite
        if bad.any().item():
            _first_bad(op, "alpha", a, bad, "finite and positive (the clip [0, alpha]), with (qmax - qmin) / alpha finite")
    args = (x, alpha, int(qmin), int(qmax), round_mode, out_dtype)
    if _traced(x):  # the opaque op on both routes, as LSQ
        return torch.ops.qat.fake_quantize_pact(*args)
    return _PACTFn.apply(*args)


def fake_quantize_minmax(
    x: Tensor,
    row: int,
    qmin: int,
    qmax: int,
    symmetric: bool = False,
    scale_f16: bool = False,
    round_mode: str = "half_even",
    state: Optional[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Fake-quantize every contiguous row of ``row`` elements of ``x`` with the range of its own finite
    elements, with a clipped straight-through estimator in the backward pass: a dynamic per-token or
    per-group quantizer, or, with ``state``, a min/max observer's update together with its scale and
    zero point (a weight's quantizer, whose range is the current weight). One fused kernel on a GPU
    (rows of a multiple of 32 elements, up to 2048 float32 / 4096 16-bit), the reference elsewhere:
    :func:`qat.kernels.reference.fake_quantize_minmax_forward` says the math.

    Args:
        x: float32 / float16 / bfloat16 tensor; ``x.numel()`` a multiple of ``row``.
        row: elements a row (a token's features, a group, a channel's run).
        qmin, qmax: the integer range (signed when ``qmin < 0``).
        symmetric: zero point 0 (``s = max|x| / ((qmax - qmin) / 2)``, or ``max / (qmax - qmin)``
            unsigned); else the range ``[min, max]`` (0 included) onto ``[qmin, qmax]``.
        scale_f16: round each scale to float16 (a format that stores it so).
        round_mode: as :func:`fake_quantize`.
        state: ``(min_val, max_val, seen, scale, zero_point)``, contiguous, one entry a row
            (float32; ``seen`` bool): updated in place, as a min/max observer's first batch and
            its ``qparams()`` set them.
        out_dtype: as :func:`fake_quantize`.

    Example::

        >>> x = torch.tensor([[0.5, -1.0, 2.0, 0.25] * 8])
        >>> y = fake_quantize_minmax(x, 32, -8, 7, symmetric=True)
        >>> y[0, :4]
        tensor([ 0.5333, -1.0667,  1.8667,  0.2667])
    """
    op = "fake_quantize_minmax"
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    _check_ints(op, qmin, qmax, None, None, round_mode)
    if isinstance(row, bool) or not isinstance(row, numbers.Integral) or row <= 0 or x.numel() % row:
        raise ValueError(f"{op}: row={row!r} must be a positive int dividing x.numel() = {x.numel()}")
    if state is not None:
        names = ("min_val", "max_val", "seen", "scale", "zero_point")
        if len(state) != 5:
            raise TypeError(f"{op}: state must be the 5 tensors {names}, got {len(state)}")
        for name, t in zip(names, state):
            dtype = torch.bool if name == "seen" else torch.float32
            if not isinstance(t, Tensor) or t.dtype != dtype or t.device != x.device or not t.is_contiguous():
                raise TypeError(f"{op}: state {name} must be a contiguous {dtype} tensor on {x.device}")
            if t.numel() != x.numel() // row:
                raise ValueError(f"{op}: state {name} must have one entry a row ({x.numel() // row}), got {t.numel()}")
    _check_out_dtype(op, out_dtype)
    out_dtype = None if out_dtype == x.dtype else out_dtype
    args = (x, int(row), int(qmin), int(qmax), bool(symmetric), bool(scale_f16), round_mode, out_dtype)
    if _traced(x):
        if _COMPILE_ROUTE == "inductor":
            return _minmax_inductor(*args, state)
        if state is None:
            return torch.ops.qat.fake_quantize_minmax(*args)[0]
        min_val, max_val, seen, scale, zero_point = state
        y, _, mn, mx, sn, s, z = torch.ops.qat.fake_quantize_minmax_observe(x, min_val, max_val, seen, *args[1:])
        with torch.no_grad():
            for buf, new in zip(state, (mn, mx, sn, s, z)):
                buf.copy_(new)
        return y
    return _MinMaxFn.apply(*args, state)


# ----------------------------------------------------------------------------- microscaling / FP8
# Float element formats with block or per-tensor / per-channel scales (qat/microscaling.py is the
# definition; docs/math.md, section 13). The STE forward saves the packed clip mask of fake_quantize,
# so its backward is qat::fake_quantize_backward.

_FLOAT_ELEMENTS = tuple(ELEMENTS)  # the formats' owner is qat.microscaling


@torch.library.custom_op("qat::fake_quantize_float", mutates_args=())
def _ff(
    x: Tensor, scale: Optional[Tensor], element: str, block_size: int, block_scale: str, axis: Optional[int]
) -> tuple[Tensor, Tensor]:
    return _backend(x).microscaling_forward(x, element, block_size, block_scale, scale, axis)


@_ff.register_fake
def _(x, scale, element, block_size, block_scale, axis):
    return x.new_empty(x.shape), x.new_empty((reference.mask_words(x.numel()),), dtype=torch.int32)


def _ff_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _ff_grad(ctx, grad_y, grad_mask):
    (mask,) = ctx.saved_tensors
    return torch.ops.qat.fake_quantize_backward(grad_y, mask, None), None, None, None, None, None


_ff.register_autograd(_ff_grad, setup_context=_ff_setup)


@torch.library.custom_op("qat::fake_quantize_float_lsq", mutates_args=())
def _ffl(
    x: Tensor, scale: Tensor, element: str, block_size: int, block_scale: str, axis: Optional[int], grad_factor: float
) -> Tensor:
    return _backend(x).microscaling_forward(x, element, block_size, block_scale, scale, axis)[0]


@_ffl.register_fake
def _(x, scale, element, block_size, block_scale, axis, grad_factor):
    return x.new_empty(x.shape)


@torch.library.custom_op("qat::fake_quantize_float_lsq_backward", mutates_args=())
def _ffl_bwd(
    grad: Tensor, x: Tensor, scale: Tensor, element: str, block_size: int, block_scale: str, axis: Optional[int],
    grad_factor: float,
) -> tuple[Tensor, Tensor]:
    return _backend(x).microscaling_lsq_backward(grad, x, element, block_size, block_scale, scale, axis, grad_factor)


@_ffl_bwd.register_fake
def _(grad, x, scale, element, block_size, block_scale, axis, grad_factor):
    return grad.new_empty(grad.shape), scale.new_empty(scale.shape, dtype=torch.float32)


def _ffl_setup(ctx, inputs, output):
    x, scale = inputs[0], inputs[1]
    ctx.save_for_backward(x, scale)
    ctx.args = inputs[2:]


def _ffl_grad(ctx, grad_y):
    x, scale = ctx.saved_tensors
    element, block_size, block_scale, axis, grad_factor = ctx.args
    dx, ds = torch.ops.qat.fake_quantize_float_lsq_backward(grad_y, x, scale, element, block_size, block_scale, axis, grad_factor)
    return dx, ds, None, None, None, None, None


_ffl.register_autograd(_ffl_grad, setup_context=_ffl_setup)


class _FloatFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, element, block_size, block_scale, axis):
        y, mask = _backend(x).microscaling_forward(x, element, block_size, block_scale, scale, axis)
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (mask,) = ctx.saved_tensors
        return _backend(grad_y).fake_quantize_backward(grad_y, mask), None, None, None, None, None


class _FloatLSQFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, element, block_size, block_scale, axis, grad_factor):
        ctx.save_for_backward(x, scale)
        ctx.args = (element, block_size, block_scale, axis, grad_factor)
        return _backend(x).microscaling_forward(x, element, block_size, block_scale, scale, axis)[0]

    @staticmethod
    def backward(ctx, grad_y):
        x, scale = ctx.saved_tensors
        element, block_size, block_scale, axis, grad_factor = ctx.args
        dx, ds = _backend(x).microscaling_lsq_backward(grad_y, x, element, block_size, block_scale, scale, axis, grad_factor)
        return dx, ds, None, None, None, None, None


def _check_float(op: str, x, scale, element, block_size, block_scale, axis, learned: bool) -> Optional[int]:
    """The microscaling ops' argument checks (types, shapes; scale values on CPU / when asked);
    returns ``axis`` made non-negative."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if element not in _FLOAT_ELEMENTS:
        raise ValueError(f"{op}: element must be one of {_FLOAT_ELEMENTS}, got {element!r}")
    if block_scale not in BLOCK_SCALES:
        raise ValueError(f"{op}: block_scale must be one of {BLOCK_SCALES}, got {block_scale!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{op}: block_size must be an int, got {block_size!r}")
    if axis is not None:
        if isinstance(axis, bool) or not isinstance(axis, int) or not -x.dim() <= axis < x.dim():
            raise ValueError(f"{op}: axis must be an int in [-{x.dim()}, {x.dim()}) or None, got {axis!r}")
        axis = axis % x.dim()
    if block_scale == "e8m0":
        if learned:
            raise ValueError(f"{op}: E8M0 block scales are powers of two chosen from each block: nothing to learn")
        if scale is not None:
            raise ValueError(f"{op}: block_scale 'e8m0' takes scale=None (the scales come from the blocks)")
    else:
        if not isinstance(scale, Tensor) or scale.dtype != torch.float32:
            raise TypeError(f"{op}: scale must be a float32 tensor with block_scale {block_scale!r}, got {type(scale).__name__}")
        if scale.device != x.device:
            raise ValueError(f"{op}: scale is on {scale.device} but x is on {x.device}")
    if block_scale != "none":
        if block_size not in (16, 32):
            raise ValueError(f"{op}: block_size must be 16 or 32 with block_scale {block_scale!r}, got {block_size}")
        if x.dim() == 0 or x.shape[-1] % block_size:
            raise ValueError(f"{op}: the last axis of x {tuple(x.shape)} must be a multiple of block_size {block_size}")
        if axis is not None:
            raise ValueError(f"{op}: block formats take axis=None (their blocks run along the last axis)")
        if block_scale == "e4m3" and scale.numel() != 1:
            raise ValueError(f"{op}: NVFP4 (block_scale 'e4m3') takes a one-element tensor scale, got shape {tuple(scale.shape)}")
    else:
        if block_size != 0:
            raise ValueError(f"{op}: block_scale 'none' takes block_size 0, got {block_size}")
        want = 1 if axis is None else x.shape[axis]
        if scale.numel() != want:
            raise ValueError(f"{op}: scale must have {want} element(s) for axis={axis}, got shape {tuple(scale.shape)}")
    if scale is not None and _checks_values(x):
        s = scale.detach()
        bad = ~torch.isfinite(s) | (s == 0) | ~torch.isfinite(1.0 / s)
        if bad.any().item():
            _first_bad(op, "scale", s, bad, "finite and nonzero, with 1 / scale finite")
    return axis


def fake_quantize_float(
    x: Tensor, element: str, block_size: int = 0, block_scale: str = "none", scale: Optional[Tensor] = None,
    axis: Optional[int] = None,
) -> Tensor:
    """Quantize-dequantize ``x`` onto a float element format with block, per-tensor or per-channel
    scales (MXFP4, MXFP8, NVFP4, FP8; :mod:`qat.microscaling` is the definition), with the clipped
    straight-through estimator backward (gradient passed where ``|x / S| <= max``).

    Args:
        x: float32 / float16 / bfloat16 tensor; with blocks, the last axis a multiple of ``block_size``.
        element: ``"e2m1"``, ``"e4m3"`` or ``"e5m2"``.
        block_size: 32 (MX) or 16 (NVFP4) with block scales, 0 without.
        block_scale: ``"none"`` (``scale`` per tensor, or per channel along ``axis``), ``"e8m0"`` (MX:
            power-of-two scales from each block; ``scale=None``) or ``"e4m3"`` (NVFP4; ``scale`` the
            one-element float32 tensor scale).

    Example::

        >>> x = torch.tensor([[0.3, -1.0, 7.0, 0.0] * 8], requires_grad=True)
        >>> y = fake_quantize_float(x, "e2m1", 32, "e8m0")          # MXFP4
        >>> y[0, :4].tolist()
        [0.5, -1.0, 6.0, 0.0]
        >>> y.sum().backward(); x.grad[0, :4].tolist()               # 7 saturated at 6: no gradient
        [1.0, 1.0, 0.0, 1.0]
        >>> fake_quantize_float(torch.tensor([100.0, 0.01]), "e4m3", scale=torch.tensor([1.0])).tolist()
        [96.0, 0.009765625]
    """
    op = "fake_quantize_float"
    axis = _check_float(op, x, scale, element, block_size, block_scale, axis, learned=False)
    args = (x, scale, element, int(block_size), block_scale, axis)
    if _traced(x):
        return torch.ops.qat.fake_quantize_float(*args)[0]
    return _FloatFn.apply(*args)


def fake_quantize_float_lsq(
    x: Tensor, scale: Tensor, element: str, block_size: int = 0, block_scale: str = "none", axis: Optional[int] = None,
    grad_factor: float = 1.0,
) -> Tensor:
    """:func:`fake_quantize_float` with a learned float32 scale (FP8's per-tensor / per-channel
    scale, NVFP4's tensor scale): the backward also returns ``dL/dscale = grad_factor *
    sum(dL/dy * c * (q - v * inside))`` (``v = x / S``, ``q`` its rounded value, ``c`` NVFP4's
    block code or 1), LSQ's gradient for a float grid.

    Example::

        >>> s = torch.tensor([1.0], requires_grad=True)
        >>> y = fake_quantize_float_lsq(torch.tensor([1.0, 5.0, 1000.0]), s, "e4m3")
        >>> y.sum().backward(); y.tolist(), s.grad.tolist()
        ([1.0, 5.0, 448.0], [448.0])
    """
    op = "fake_quantize_float_lsq"
    if isinstance(grad_factor, bool) or not isinstance(grad_factor, numbers.Real) or not math.isfinite(grad_factor):
        raise TypeError(f"{op}: grad_factor must be a finite number, got {grad_factor!r}")
    axis = _check_float(op, x, scale, element, block_size, block_scale, axis, learned=True)
    args = (x, scale, element, int(block_size), block_scale, axis, float(grad_factor))
    if _traced(x):
        return torch.ops.qat.fake_quantize_float_lsq(*args)
    return _FloatLSQFn.apply(*args)
