"""The public fake-quant ops: ``torch.autograd.Function`` s over a backend, and the ``qat::`` ops that
a traced graph calls.

Each backend function is also one registered ``torch.library`` op (``torch.ops.qat.*``): one opaque
node for ``torch.compile`` / ``torch.export``, with a fake implementation for the output shapes (and
the argument checks). The gradients have one definition, the autograd Functions' backward methods:
in eager mode the Functions call the backend directly (no dispatcher); in a trace the forward ops
carry those formulas as their own autograd (``torch.library.register_autograd``). The backend is chosen per call from the input's device:

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
    "BoundQuant",
    "IDENTITY",
    "bind_fake_quantize",
    "bind_lsq",
    "bind_pact",
    "bind_minmax",
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


# ----------------------------------------------------------------------------- the registered ops
# Each qat:: op below is one backend function as one opaque node for torch.compile / torch.export (its
# fake implementation gives the output shapes and checks the arguments). The forward ops get their
# autograd under "traced autograd" below; eager mode calls the backend directly. They are registered
# with torch.library.Library rather than torch.library.custom_op: a call skips the custom op's Python
# layers (15 us a forward + backward pair on a CPU, benchmarks/results/op_overhead.md), and a graph
# that Inductor compiles calls twins without the Python autograd kernel (_inductor_calls_twins). The
# observer's op updates its state in place (the schema says so), so a compiled step neither copies the
# state nor allocates a new one.

_LIB = torch.library.Library("qat", "FRAGMENT")


def _op(schema: str, kernel, fake, runtime_twin: bool = False):
    """Define ``qat::<schema>`` with ``kernel`` on every device and ``fake`` as its shape function;
    returns the op's overload (what a traced graph calls). ``runtime_twin``: also ``qat::<name>_impl``,
    the same op without the autograd that _register_traced_autograd gives this one: what a graph
    that Inductor compiles calls at run time (_inductor_calls_twins)."""
    name, rest = schema.split("(", 1)
    names = (name, f"{name}_impl") if runtime_twin else (name,)
    for n in names:
        _LIB.define(f"{n}({rest}")
        _LIB.impl(n, kernel, "CompositeExplicitAutograd")
        torch.library.register_fake(f"qat::{n}", fake, lib=_LIB)
    op = getattr(torch.ops.qat, name).default
    if runtime_twin:
        _TWINS[op] = getattr(torch.ops.qat, names[1]).default
    return op


# An op with a Python autograd kernel (register_autograd, below) pays for it at every call, also in a
# compiled graph, whose autograd is compiled already: the boxed redispatch, ~16 us a call on a CPU,
# milliseconds a step, on a host that a default torch.compile step is bound by. Inductor therefore
# decomposes each such op into its twin without autograd (Inductor's decomposition table, which its
# AOT stage applies below autograd: the registered formula still makes the backward). Registered from
# the ops' fake implementations, the first time a trace runs one (Inductor is imported then anyway).
_TWINS: dict = {}
_TWINS_REGISTERED = [False]


def _inductor_calls_twins() -> None:
    if _TWINS_REGISTERED[0]:
        return
    _TWINS_REGISTERED[0] = True
    try:
        from torch._inductor import decomposition
    except ImportError:  # no Inductor: the ops themselves run
        return
    for op, twin in _TWINS.items():
        decomposition.decompositions[op] = twin
    cached = getattr(decomposition, "fast_random_decomps", None)  # a cached copy of the table (torch 2.x)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


def _mask_like(x: Tensor) -> Tensor:
    return x.new_empty((reference.mask_words(x.numel()),), dtype=torch.int32)


def _like(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return x.new_empty(x.shape, dtype=dtype or x.dtype)


# The fake implementations check the op's arguments as the public functions do (the bind_* functions
# below skip their checks inside a trace, which would cost Dynamo seconds to trace; a fake
# implementation runs natively), so a traced call fails with the eager call's message.


def _fq_fake(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode, out_dtype, owned_grad=False):
    _inductor_calls_twins()
    _check(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode, values=False)
    _check_out_dtype("fake_quantize", out_dtype)
    return _like(x, out_dtype), _mask_like(x)


def _lsq_fake(x, scale, zero_point, qmin, qmax, axis, group_size, grad_factor, round_mode, out_dtype):
    _inductor_calls_twins()
    _check_grad_factor(grad_factor)
    _check(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode, op="fake_quantize_lsq", lsq=True, values=False)
    _check_out_dtype("fake_quantize_lsq", out_dtype)
    return _like(x, out_dtype)


def _pact_fake(x, alpha, qmin, qmax, round_mode, out_dtype):
    _inductor_calls_twins()
    _check_pact(x, alpha, qmin, qmax, round_mode, values=False)
    _check_out_dtype("fake_quantize_pact", out_dtype)
    return _like(x, out_dtype)


def _minmax_fake(x, row, qmin, qmax, round_mode, state, out_dtype):
    _inductor_calls_twins()
    _check_minmax(x, row, qmin, qmax, round_mode, state)
    _check_out_dtype("fake_quantize_minmax", out_dtype)
    return _like(x, out_dtype), _mask_like(x)


_FQ = _op(
    "fake_quantize(Tensor x, Tensor scale, Tensor zero_point, SymInt qmin, SymInt qmax, SymInt? axis, "
    "SymInt? group_size, str round_mode, ScalarType? out_dtype, bool owned_grad=False) -> (Tensor, Tensor)",
    lambda x, s, z, qmin, qmax, axis, gs, rm, out_dtype, owned=False: _backend(x).fake_quantize_forward(
        x, s, z, qmin, qmax, axis, gs, rm, out_dtype),
    _fq_fake,
    runtime_twin=True,
)
_FQ_BWD = _op(
    "fake_quantize_backward(Tensor grad, Tensor mask, ScalarType? dtype) -> Tensor",
    lambda grad, *a: _backend(grad).fake_quantize_backward(grad, *a),
    lambda grad, mask, dtype: _like(grad, dtype),
)
def _fq_backward_inplace(grad: Tensor, mask: Tensor) -> None:
    _backend(grad).fake_quantize_backward_(grad, mask)


_FQ_BWD_ = _op(  # in place, for a gradient the formula owns (owned_grad)
    "fake_quantize_backward_(Tensor(a!) grad, Tensor mask) -> ()", _fq_backward_inplace, lambda grad, mask: None
)
_LSQ = _op(  # grad_factor: for the backward only (the traced autograd below reads it from the inputs)
    "fake_quantize_lsq(Tensor x, Tensor scale, Tensor zero_point, SymInt qmin, SymInt qmax, SymInt? axis, "
    "SymInt? group_size, float grad_factor, str round_mode, ScalarType? out_dtype) -> Tensor",
    lambda x, s, z, qmin, qmax, axis, gs, gf, rm, out_dtype: _backend(x).fake_quantize_lsq_forward(
        x, s, z, qmin, qmax, axis, gs, rm, out_dtype),
    _lsq_fake,
    runtime_twin=True,
)
_LSQ_BWD = _op(
    "fake_quantize_lsq_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, SymInt qmin, SymInt qmax, "
    "SymInt? axis, SymInt? group_size, float grad_factor, str round_mode) -> (Tensor, Tensor, Tensor)",
    lambda grad, x, *a: _backend(x).fake_quantize_lsq_backward(grad, x, *a),
    lambda grad, x, s, z, *a: (_like(x), _like(s), _like(z)),
)
_PACT = _op(
    "fake_quantize_pact(Tensor x, Tensor alpha, SymInt qmin, SymInt qmax, str round_mode, ScalarType? out_dtype) -> Tensor",
    lambda x, *a: _backend(x).fake_quantize_pact_forward(x, *a),
    _pact_fake,
    runtime_twin=True,
)
_PACT_BWD = _op(
    "fake_quantize_pact_backward(Tensor grad, Tensor x, Tensor alpha) -> (Tensor, Tensor)",
    lambda grad, x, alpha: _backend(x).fake_quantize_pact_backward(grad, x, alpha),
    lambda grad, x, alpha: (_like(x), _like(alpha)),
)
_MM = _op(
    "fake_quantize_minmax(Tensor x, SymInt row, SymInt qmin, SymInt qmax, bool symmetric, bool scale_f16, "
    "str round_mode, ScalarType? out_dtype, bool owned_grad=False) -> (Tensor, Tensor)",
    lambda x, row, qmin, qmax, sym, f16, rm, out_dtype, owned=False: _backend(x).fake_quantize_minmax_forward(
        x, row, qmin, qmax, sym, f16, rm, None, out_dtype),
    lambda x, row, qmin, qmax, sym, f16, rm, out_dtype, owned=False: _minmax_fake(x, row, qmin, qmax, rm, None, out_dtype),
    runtime_twin=True,
)
_MMO = _op(
    "fake_quantize_minmax_observe(Tensor x, Tensor(a!) min_val, Tensor(b!) max_val, Tensor(c!) seen, "
    "Tensor(d!) scale, Tensor(e!) zero_point, SymInt row, SymInt qmin, SymInt qmax, bool symmetric, "
    "bool scale_f16, str round_mode, ScalarType? out_dtype, bool owned_grad=False) -> (Tensor, Tensor)",
    lambda x, mn, mx, seen, s, z, row, qmin, qmax, sym, f16, rm, out_dtype, owned=False: _backend(
        x).fake_quantize_minmax_forward(x, row, qmin, qmax, sym, f16, rm, (mn, mx, seen, s, z), out_dtype),
    lambda x, mn, mx, seen, s, z, row, qmin, qmax, sym, f16, rm, out_dtype, owned=False: _minmax_fake(
        x, row, qmin, qmax, rm, (mn, mx, seen, s, z), out_dtype),
    runtime_twin=True,
)
_FF = _op(
    "fake_quantize_float(Tensor x, Tensor? scale, str element, SymInt block_size, str block_scale, SymInt? axis) "
    "-> (Tensor, Tensor)",
    lambda x, scale, element, bs, bsc, axis: _backend(x).microscaling_forward(x, element, bs, bsc, scale, axis),
    lambda x, scale, element, bs, bsc, axis: (_like(x), _mask_like(x)),
)
_FF_BWD = _op(
    "fake_quantize_float_lsq_backward(Tensor grad, Tensor x, Tensor scale, str element, SymInt block_size, "
    "str block_scale, SymInt? axis, float grad_factor) -> (Tensor, Tensor)",
    lambda grad, x, scale, element, bs, bsc, axis, gf: _backend(x).microscaling_lsq_backward(
        grad, x, element, bs, bsc, scale, axis, gf),
    lambda grad, x, scale, *a: (_like(grad), _like(scale, torch.float32)),
)

# ----------------------------------------------------------------------------- autograd
# One Function per estimator, in eager mode and traced alike: eager calls the backend function straight
# (no dispatcher), a trace the op above (_traced: torch.compile / torch.export, or meta tensors).


def _traced(x: Tensor) -> bool:
    # torch.compile / torch.export (whose AOT stage runs the backward formulas under dispatch modes,
    # where torch.compiler.is_compiling() need not be set), or meta tensors
    return torch.compiler.is_compiling() or x.is_meta or torch._C._len_torch_dispatch_stack() > 0


def _fq_forward(x, *args):
    return _FQ(x, *args) if _traced(x) else _backend(x).fake_quantize_forward(x, *args)


def _fq_backward(grad, mask, dtype, owned=False):
    # The gradient an autograd formula is given may be a view of one element (the backward of a sum),
    # or the same tensor another formula reads (an add's): not the formula's to write, unless the
    # caller said the result feeds only a matmul or convolution (owned_grad: its gradient is a fresh
    # tensor, e.g. traced QuantLinear; eager QuantLinear writes the products it makes itself).
    if _traced(grad):
        if owned and grad.is_contiguous():  # (a view of one element is not contiguous)
            _FQ_BWD_(grad, mask)  # zeroes the clipped elements: no pass over the gradient
            dx = grad
        else:
            dx = _FQ_BWD(grad, mask, None)
        # in the gradient's dtype, then a cast the compiler fuses into the consumer of dx (a float32
        # layer norm's backward under autocast): no float32 copy of a 16-bit gradient in memory
        return dx if dtype is None or dtype == dx.dtype else dx.to(dtype)
    return _backend(grad).fake_quantize_backward(grad, mask, dtype)


class _FakeQuantizeFn(torch.autograd.Function):
    """Clipped STE: the forward saves the packed clip mask, the backward passes the gradient where it is set."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, group_size, round_mode, out_dtype):
        y, mask = _fq_forward(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode, out_dtype)
        ctx.save_for_backward(mask)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (mask,) = ctx.saved_tensors
        return _fq_backward(grad_y, mask, ctx.x_dtype, getattr(ctx, "owned", False)), *(None,) * 8


class _LSQFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, group_size, grad_factor, round_mode, out_dtype):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.args = (qmin, qmax, axis, group_size, grad_factor, round_mode)
        if _traced(x):
            return _LSQ(x, scale, zero_point, qmin, qmax, axis, group_size, grad_factor, round_mode, out_dtype)
        return _backend(x).fake_quantize_lsq_forward(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode, out_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, scale, zero_point = ctx.saved_tensors
        args = (grad_y.to(x.dtype), x, scale, zero_point, *ctx.args)
        dx, ds, dz = _LSQ_BWD(*args) if _traced(x) else _backend(x).fake_quantize_lsq_backward(*args)
        return dx, ds, dz, *(None,) * 7


class _PACTFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, qmin, qmax, round_mode, out_dtype):
        ctx.save_for_backward(x, alpha)
        args = (x, alpha, qmin, qmax, round_mode, out_dtype)
        return _PACT(*args) if _traced(x) else _backend(x).fake_quantize_pact_forward(*args)

    @staticmethod
    def backward(ctx, grad_y):
        x, alpha = ctx.saved_tensors
        args = (grad_y.to(x.dtype), x, alpha)
        dx, dalpha = _PACT_BWD(*args) if _traced(x) else _backend(x).fake_quantize_pact_backward(*args)
        return dx, dalpha, None, None, None, None


class _MinMaxFn(torch.autograd.Function):
    """The range-of-the-data forward (``state``: a min/max observer's five tensors, updated in place),
    the clipped-STE backward of :class:`_FakeQuantizeFn`."""

    @staticmethod
    def forward(ctx, x, row, qmin, qmax, symmetric, scale_f16, round_mode, out_dtype, *state):
        args = (row, qmin, qmax, symmetric, scale_f16, round_mode)
        if not _traced(x):
            y, mask = _backend(x).fake_quantize_minmax_forward(x, *args, state or None, out_dtype)
        elif state:
            y, mask = _MMO(x, *state, *args, out_dtype)
        else:
            y, mask = _MM(x, *args, out_dtype)
        ctx.save_for_backward(mask)
        ctx.x_dtype = x.dtype
        ctx.n_state = len(state)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (mask,) = ctx.saved_tensors
        return _fq_backward(grad_y, mask, ctx.x_dtype, getattr(ctx, "owned", False)), *(None,) * (7 + ctx.n_state)


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


# ----------------------------------------------------------------------------- traced autograd
# Under torch.compile a bound op calls the registered op itself, whose autograd is registered below
# (torch.library.register_autograd): Dynamo traces one op call per quantizer, ~1 ms on a CPU, where an
# autograd.Function costs ~12 ms to trace (both of its bodies are speculated), seconds of compile
# warm-up on a model of a hundred quantizers. Each formula saves what the Function's forward saves and
# calls the Function's backward: one definition of every gradient. (At run time a graph Inductor
# compiles calls each op's twin without this Python layer: _inductor_calls_twins.)


def _save_mask(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.x_dtype = inputs[0].dtype
    ctx.owned = inputs[-1]  # owned_grad
    ctx.n_state = 0  # _MinMaxFn.backward's count of state tensors (fake_quantize_minmax has none)


def _save_lsq(ctx, inputs, output):
    x, scale, zero_point, *args = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.args = tuple(args[:6])  # qmin, qmax, axis, group_size, grad_factor, round_mode


def _save_pact(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


def _save_observe(ctx, inputs, output):
    _save_mask(ctx, inputs, output)
    ctx.n_state = 5  # min_val, max_val, seen, scale, zero_point: inputs of the op, no gradient


def _register_traced_autograd() -> bool:
    """Register the traced ops' autograd; returns whether the observer's op has its own (else a trace
    runs it through _MinMaxFn)."""
    def fq(ctx, grad_y, grad_mask):
        return *_FakeQuantizeFn.backward(ctx, grad_y), None  # owned_grad: none

    def minmax(ctx, grad_y, grad_mask):
        return *_MinMaxFn.backward(ctx, grad_y), None

    torch.library.register_autograd("qat::fake_quantize", fq, setup_context=_save_mask, lib=_LIB)
    torch.library.register_autograd("qat::fake_quantize_minmax", minmax, setup_context=_save_mask, lib=_LIB)
    torch.library.register_autograd("qat::fake_quantize_lsq", _LSQFn.backward, setup_context=_save_lsq, lib=_LIB)
    torch.library.register_autograd("qat::fake_quantize_pact", _PACTFn.backward, setup_context=_save_pact, lib=_LIB)
    # The observer's op updates its state in place, and torch.library.register_autograd refuses a
    # mutating op, for mutated tensors that take a gradient; this op's state takes none (buffers, and
    # its formula returns None for them), so its autograd kernel is made by the same torch function
    # register_autograd calls. A compiled graph then runs the op in place, as before, and Dynamo traces
    # one op call rather than an autograd.Function (~35 ms each on a CPU; a weight quantizer each).
    try:
        from torch._library.autograd import Info, make_autograd_impl

        kernel = make_autograd_impl(_MMO, Info(minmax, _save_observe))
    except (ImportError, AttributeError, TypeError):  # another torch: the Function it is
        return False
    _LIB.impl("fake_quantize_minmax_observe", kernel, "Autograd", with_keyset=True)
    return True


_OBSERVE_AUTOGRAD = _register_traced_autograd()


# ----------------------------------------------------------------------------- bound ops
# A quantizer's op with its arguments checked and bound. apply() is the op as the public functions run
# it (the autograd Functions above; traced: the registered ops). forward() / backward() are the same
# backend calls without an autograd node of their own, for a layer that fuses its quantizers and its
# matmul into one node in eager mode (qat.QuantLinear): the gradient math stays the backend's.


def _cast(x: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    return x if dtype is None or x.dtype == dtype else x.to(dtype)


class BoundQuant:
    """One fake-quant op with its arguments checked and bound (``bind_*`` make them; a
    :class:`qat.FakeQuantizer` binds its own with :meth:`~qat.FakeQuantizer.bind`).

    * :meth:`apply` runs it with autograd, exactly as the public function would.
    * :meth:`forward` / :meth:`backward` run its forward and its gradient eagerly, with no autograd
      node of their own: what a layer calls inside its own ``torch.autograd.Function`` to be one node
      in the graph rather than three (:class:`qat.QuantLinear`).

    Attributes:
        tensors: the tensors it reads (scale, zero point, observer state, alpha).
        args: its scalar arguments.

    Example::

        >>> x = torch.tensor([0.1, 0.26, -3.0])
        >>> b = bind_fake_quantize(x, torch.tensor([0.25]), torch.tensor([0.0]), -8, 7)
        >>> y, saved = b.forward(x)
        >>> y, b.backward(torch.ones(3), saved, x.dtype)[0]
        (tensor([ 0.0000,  0.2500, -2.0000]), tensor([1., 1., 0.]))
    """

    __slots__ = ("tensors", "args")

    def __init__(self, tensors: tuple, args: tuple) -> None:
        self.tensors, self.args = tensors, args

    @property
    def learned(self) -> tuple:
        """The tensors :meth:`backward` returns gradients for, after ``x``'s."""
        return ()

    def check_values(self, x: Tensor) -> None:
        """Its bind function's checks of parameter values, where they apply to ``x`` (the module
        docstring says when): what a caller re-using a bound op runs at each use, since learned
        parameters move."""

    def apply(self, x: Tensor, out_dtype: Optional[torch.dtype] = None, owned_grad: bool = False) -> Tensor:
        """The fake-quantized ``x`` (in ``out_dtype``), differentiable as the public function's.
        ``owned_grad``: the caller feeds the result only to a matmul or convolution, whose gradient is
        a fresh tensor that nothing else reads, so in a traced graph the clipped STE may zero its
        clipped elements in place (no pass over the gradient); ignored in eager mode."""
        raise NotImplementedError

    def forward(self, x: Tensor, out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, tuple]:
        """``(y, saved)``: the result, and the tensors :meth:`backward` takes. Eager only."""
        raise NotImplementedError

    def backward(self, grad: Tensor, saved: tuple, x_dtype: torch.dtype, owned: bool = False) -> tuple:
        """``(dx, *d_learned)`` from the gradient of the result; ``dx`` in ``x_dtype``. ``owned``: the
        caller made ``grad`` and nothing else reads it, so an op may write ``dx`` into it (the
        clipped STE then only zeroes the clipped elements, no pass over the gradient)."""
        raise NotImplementedError


class _BoundFQ(BoundQuant):  # (scale, zero_point); (qmin, qmax, axis, group_size, round_mode)
    __slots__ = ()

    def check_values(self, x):
        if _checks_values(x):
            _check_values("fake_quantize", *self.tensors, *self.args[:2], lsq=False)

    def apply(self, x, out_dtype=None, owned_grad=False):
        out_dtype = None if out_dtype == x.dtype else out_dtype
        if _traced(x):
            if _COMPILE_ROUTE == "inductor":
                return _fake_quantize_inductor(x, *self.tensors, *self.args, out_dtype)
            return _FQ(x, *self.tensors, *self.args, out_dtype, owned_grad)[0]
        return _FakeQuantizeFn.apply(x, *self.tensors, *self.args, out_dtype)

    def forward(self, x, out_dtype=None):
        y, mask = _backend(x).fake_quantize_forward(x, *self.tensors, *self.args, None if out_dtype == x.dtype else out_dtype)
        return y, (mask,)

    def backward(self, grad, saved, x_dtype, owned=False):
        if owned and grad.dtype == x_dtype and grad.is_contiguous():
            return (_backend(grad).fake_quantize_backward_(grad, saved[0]),)
        return (_backend(grad).fake_quantize_backward(grad, saved[0], x_dtype),)


class _BoundMinMax(_BoundFQ):  # observer state (5) or (); (row, qmin, qmax, symmetric, scale_f16, round_mode)
    __slots__ = ()

    def check_values(self, x):
        pass  # the range comes from x

    def apply(self, x, out_dtype=None, owned_grad=False):
        out_dtype = None if out_dtype == x.dtype else out_dtype
        if _traced(x):
            if _COMPILE_ROUTE == "inductor":
                return _minmax_inductor(x, *self.args, out_dtype, self.tensors or None)
            if not self.tensors:
                return _MM(x, *self.args, out_dtype, owned_grad)[0]
            if _OBSERVE_AUTOGRAD:
                return _MMO(x, *self.tensors, *self.args, out_dtype, owned_grad)[0]
        return _MinMaxFn.apply(x, *self.args, out_dtype, *self.tensors)

    def forward(self, x, out_dtype=None):
        out_dtype = None if out_dtype == x.dtype else out_dtype
        y, mask = _backend(x).fake_quantize_minmax_forward(x, *self.args, self.tensors or None, out_dtype)
        return y, (mask,)


class _BoundLearned(BoundQuant):
    """An op whose tensors are all learned (their gradients follow x's), checked by ``_check``."""

    __slots__ = ()

    @property
    def learned(self):
        return self.tensors

    def check_values(self, x):
        if _checks_values(x):
            self._check()


class _BoundLSQ(_BoundLearned):  # (scale, zero_point); (qmin, qmax, axis, group_size, grad_factor, round_mode)
    __slots__ = ()

    def _check(self):
        _check_values("fake_quantize_lsq", *self.tensors, *self.args[:2], lsq=True)

    def apply(self, x, out_dtype=None, owned_grad=False):
        # the opaque op on both compile routes: LSQ's math as PyTorch ops gave Inductor wrong gradients
        # on CUDA (right on the CPU); benchmarks/compile_grad_check.py shows it
        out_dtype = None if out_dtype == x.dtype else out_dtype
        if _traced(x):
            return _LSQ(x, *self.tensors, *self.args, out_dtype)
        return _LSQFn.apply(x, *self.tensors, *self.args, out_dtype)

    def forward(self, x, out_dtype=None):
        qmin, qmax, axis, group_size, _, round_mode = self.args
        y = _backend(x).fake_quantize_lsq_forward(x, *self.tensors, qmin, qmax, axis, group_size, round_mode,
                                                  None if out_dtype == x.dtype else out_dtype)  # fmt: skip
        return y, (x,)

    def backward(self, grad, saved, x_dtype, owned=False):
        (x,) = saved
        return _backend(x).fake_quantize_lsq_backward(grad.to(x.dtype), x, *self.tensors, *self.args)


class _BoundPACT(_BoundLearned):  # (alpha,); (qmin, qmax, round_mode)
    __slots__ = ()

    def _check(self):
        _check_alpha(self.tensors[0], *self.args[:2])

    def apply(self, x, out_dtype=None, owned_grad=False):
        # the opaque op on both compile routes, as LSQ
        out_dtype = None if out_dtype == x.dtype else out_dtype
        if _traced(x):
            return _PACT(x, *self.tensors, *self.args, out_dtype)
        return _PACTFn.apply(x, *self.tensors, *self.args, out_dtype)

    def forward(self, x, out_dtype=None):
        return _backend(x).fake_quantize_pact_forward(x, *self.tensors, *self.args, None if out_dtype == x.dtype else out_dtype), (x,)

    def backward(self, grad, saved, x_dtype, owned=False):
        (x,) = saved
        return _backend(x).fake_quantize_pact_backward(grad.to(x.dtype), x, *self.tensors)


class _BoundIdentity(BoundQuant):
    __slots__ = ()

    def apply(self, x, out_dtype=None, owned_grad=False):
        return _cast(x, out_dtype)

    def forward(self, x, out_dtype=None):
        return _cast(x, out_dtype), ()

    def backward(self, grad, saved, x_dtype, owned=False):
        return (_cast(grad, x_dtype),)


#: The bound op that passes ``x`` through (cast to ``out_dtype``): a quantizer with nothing to do yet.
IDENTITY = _BoundIdentity((), ())


# ----------------------------------------------------------------------------- public API


_ROUND_MODES = frozenset(reference.ROUND_MODES)


def _check_ints(op: str, qmin, qmax, axis, group_size, round_mode) -> None:
    """The checks that read no tensor: argument types and the integer range."""
    if (type(qmin) is int and type(qmax) is int and qmin < qmax and (axis is None or type(axis) is int)
            and (group_size is None or type(group_size) is int) and type(round_mode) is str and round_mode in _ROUND_MODES):
        return  # the common call, without the abstract-class checks below (a training step makes ~200)
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


def _check(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis, group_size, round_mode, op="fake_quantize",
           lsq=False, values=True):
    """Validate arguments before launch (``values``: the parameter values too, where
    :func:`_checks_values` says so); returns the axis normalized to be non-negative."""
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
    if values and _checks_values(x):
        _check_values(op, scale, zero_point, qmin, qmax, lsq)
    return axis


def _bind_axis(x: Tensor, axis):
    """``axis`` as :func:`_check` returns it, without the checks: a trace binds an op without checking
    its arguments, since the op's fake implementation checks them (natively, where Dynamo would trace
    every line of the checks, seconds of compile warm-up on a model of a hundred quantizers)."""
    return axis if axis is None else axis % x.dim()


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
    _check_out_dtype("fake_quantize", out_dtype)
    return bind_fake_quantize(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode).apply(x, out_dtype)


def bind_fake_quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: Optional[int] = None,
    group_size: Optional[int] = None, round_mode: str = "half_even",
) -> "BoundQuant":
    """:func:`fake_quantize`'s arguments checked against ``x`` and bound (:class:`BoundQuant`).

    Example::

        >>> x = torch.tensor([0.1, 0.26, -3.0])
        >>> bind_fake_quantize(x, torch.tensor([0.25]), torch.tensor([0.0]), -8, 7).apply(x)
        tensor([ 0.0000,  0.2500, -2.0000])
    """
    if torch.compiler.is_compiling() and _COMPILE_ROUTE == "kernel":
        axis = _bind_axis(x, axis)  # the op checks (_fq_fake)
    else:
        axis = _check(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode)
    return _BoundFQ((scale, zero_point), (int(qmin), int(qmax), axis, None if group_size is None else int(group_size), round_mode))


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
    _check_out_dtype("fake_quantize_lsq", out_dtype)
    return bind_lsq(x, scale, zero_point, qmin, qmax, axis, group_size, grad_factor, round_mode).apply(x, out_dtype)


def bind_lsq(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: Optional[int] = None,
    group_size: Optional[int] = None, grad_factor: float = 1.0, round_mode: str = "half_even",
) -> "BoundQuant":
    """:func:`fake_quantize_lsq`'s arguments checked against ``x`` and bound (:class:`BoundQuant`);
    its ``learned`` tensors are ``(scale, zero_point)``.

    Example::

        >>> s = torch.full((1,), 0.1, requires_grad=True)
        >>> b = bind_lsq(torch.randn(8), s, torch.zeros(1), -8, 7, grad_factor=0.1)
        >>> b.learned[0] is s
        True
    """
    if torch.compiler.is_compiling():
        axis = _bind_axis(x, axis)  # the op checks (_lsq_fake)
    else:
        _check_grad_factor(grad_factor)
        axis = _check(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode, op="fake_quantize_lsq", lsq=True)
    return _BoundLSQ((scale, zero_point), (int(qmin), int(qmax), axis, group_size, float(grad_factor), round_mode))


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
    _check_out_dtype("fake_quantize_pact", out_dtype)
    return bind_pact(x, alpha, qmin, qmax, round_mode).apply(x, out_dtype)


def bind_pact(x: Tensor, alpha: Tensor, qmin: int, qmax: int, round_mode: str = "half_even") -> "BoundQuant":
    """:func:`fake_quantize_pact`'s arguments checked against ``x`` and bound (:class:`BoundQuant`);
    its ``learned`` tensor is ``alpha``.

    Example::

        >>> bind_pact(torch.ones(3), torch.tensor([2.0]), 0, 15).apply(torch.tensor([-1.0, 0.5, 3.0]))
        tensor([0.0000, 0.5333, 2.0000])
    """
    if not torch.compiler.is_compiling():  # else the op checks (_pact_fake)
        _check_pact(x, alpha, qmin, qmax, round_mode)
    return _BoundPACT((alpha,), (int(qmin), int(qmax), round_mode))


def _check_pact(x: Tensor, alpha: Tensor, qmin: int, qmax: int, round_mode: str, values: bool = True) -> None:
    op = "fake_quantize_pact"
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(alpha, Tensor) or alpha.numel() != 1 or alpha.dtype != torch.float32:
        raise ValueError(f"{op}: alpha must be a one-element float32 tensor, got {getattr(alpha, 'dtype', type(alpha).__name__)} {tuple(getattr(alpha, 'shape', ()))}")
    if alpha.device != x.device:
        raise ValueError(f"{op}: alpha is on {alpha.device} but x is on {x.device}")
    _check_ints(op, qmin, qmax, None, None, round_mode)
    if values and _checks_values(x):
        _check_alpha(alpha, qmin, qmax)


def _check_grad_factor(grad_factor) -> None:
    if isinstance(grad_factor, bool) or not isinstance(grad_factor, numbers.Real) or not math.isfinite(grad_factor):
        raise TypeError(f"fake_quantize_lsq: grad_factor must be a finite number, got {grad_factor!r}")


def _check_alpha(alpha: Tensor, qmin: int, qmax: int) -> None:
    a = alpha.detach()
    bad = ~(torch.isfinite(a) & torch.isfinite(float(qmax - qmin) / a)) | (a <= 0)  # s = alpha / (qmax - qmin): 1/s finite
    if bad.any().item():
        _first_bad("fake_quantize_pact", "alpha", a, bad, "finite and positive (the clip [0, alpha]), with (qmax - qmin) / alpha finite")


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
    _check_out_dtype("fake_quantize_minmax", out_dtype)
    return bind_minmax(x, row, qmin, qmax, symmetric, scale_f16, round_mode, state).apply(x, out_dtype)


def bind_minmax(
    x: Tensor, row: int, qmin: int, qmax: int, symmetric: bool = False, scale_f16: bool = False,
    round_mode: str = "half_even", state: Optional[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = None,
) -> "BoundQuant":
    """:func:`fake_quantize_minmax`'s arguments checked against ``x`` and bound (:class:`BoundQuant`).

    Example::

        >>> x = torch.tensor([[0.5, -1.0, 2.0, 0.25] * 8])
        >>> bind_minmax(x, 32, -8, 7, symmetric=True).apply(x)[0, :2]
        tensor([ 0.5333, -1.0667])
    """
    if not (torch.compiler.is_compiling() and _COMPILE_ROUTE == "kernel"):  # else the op checks (_minmax_fake)
        _check_minmax(x, row, qmin, qmax, round_mode, state)
    return _BoundMinMax(tuple(state or ()), (int(row), int(qmin), int(qmax), bool(symmetric), bool(scale_f16), round_mode))


def _check_minmax(x: Tensor, row: int, qmin: int, qmax: int, round_mode: str, state) -> None:
    op = "fake_quantize_minmax"
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    _check_ints(op, qmin, qmax, None, None, round_mode)
    n = x.numel()
    if not (type(row) is int or (isinstance(row, numbers.Integral) and not isinstance(row, bool))) or row <= 0 or n % row:
        raise ValueError(f"{op}: row={row!r} must be a positive int dividing x.numel() = {n}")
    if state is not None:
        names = ("min_val", "max_val", "seen", "scale", "zero_point")
        if len(state) != 5:
            raise TypeError(f"{op}: state must be the 5 tensors {names}, got {len(state)}")
        device, nrows = x.device, n // row
        for name, t in zip(names, state):
            dtype = torch.bool if name == "seen" else torch.float32
            if not isinstance(t, Tensor) or t.dtype != dtype or t.device != device or not t.is_contiguous():
                raise TypeError(f"{op}: state {name} must be a contiguous {dtype} tensor on {device}")
            if t.numel() != nrows:
                raise ValueError(f"{op}: state {name} must have one entry a row ({nrows}), got {t.numel()}")


# ----------------------------------------------------------------------------- microscaling / FP8
# Float element formats with block or per-tensor / per-channel scales (qat/microscaling.py is the
# definition; docs/math.md, section 13). The STE forward saves the packed clip mask of fake_quantize,
# so its backward is qat::fake_quantize_backward.

_FLOAT_ELEMENTS = tuple(ELEMENTS)  # the formats' owner is qat.microscaling


def _float_forward(x, scale, element, block_size, block_scale, axis):
    if _traced(x):
        return _FF(x, scale, element, block_size, block_scale, axis)
    return _backend(x).microscaling_forward(x, element, block_size, block_scale, scale, axis)


class _FloatFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, element, block_size, block_scale, axis):
        y, mask = _float_forward(x, scale, element, block_size, block_scale, axis)
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (mask,) = ctx.saved_tensors
        return _fq_backward(grad_y, mask, None), None, None, None, None, None


class _FloatLSQFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, element, block_size, block_scale, axis, grad_factor):
        ctx.save_for_backward(x, scale)
        ctx.args = (element, block_size, block_scale, axis, grad_factor)
        return _float_forward(x, scale, element, block_size, block_scale, axis)[0]

    @staticmethod
    def backward(ctx, grad_y):
        x, scale = ctx.saved_tensors
        element, block_size, block_scale, axis, grad_factor = ctx.args
        if _traced(x):
            dx, ds = _FF_BWD(grad_y, x, scale, element, block_size, block_scale, axis, grad_factor)
        else:
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
    return _FloatLSQFn.apply(*args)
