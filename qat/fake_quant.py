"""`FakeQuantizer`: observer + scale / zero-point state + estimator, for one tensor.

Non-finite values and dtypes (``docs/math.md``, section 11): observers leave NaN / Inf elements out
of their ranges (or raise, ``QuantSpec.nonfinite: raise``), an empty batch is skipped, the state
(scale, zero point, ranges, PACT's clip) stays float32 when the model is cast to float16 /
bfloat16, and :func:`nonfinite_quantizers` names the quantizers whose state is not finite (what
``qat.convert`` refuses).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from qat.kernels import (
    IDENTITY, BoundQuant, bind_fake_quantize, bind_lsq, bind_minmax, bind_pact, fake_quantize, fake_quantize_float,
    fake_quantize_float_lsq,
)

from .flags import FlagBuffers
from .kquants import fake_quantize_kquant
from .granularity import Layout
from .microscaling import MICRO_FORMATS, float_scale, lsq_grad_factor
from .observers import Float32State, check_finite, make_observer, qparams_from_range
from .spec import Estimator, NonFinite, QuantSpec, ScaleDtype, WeightFormat

__all__ = ["FakeQuantizer", "bind_dynamic", "fake_quantize_dynamic", "nonfinite_quantizers"]


def _sync_mean(t: torch.Tensor, sync: bool) -> torch.Tensor:
    if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


class FakeQuantizer(Float32State, FlagBuffers):
    """Fake-quantizes one tensor per a :class:`~qat.QuantSpec`.

    State (all in ``state_dict``): ``scale`` and ``zero_point`` (buffers, or parameters for the
    learned estimators), the observer's statistics, and three flags: ``fake_quant_enabled``,
    ``observer_enabled`` and ``initialized``.

    * ``ste``: the observer updates the range on every forward while ``observer_enabled``; the
      range is frozen once it is disabled. The gradient is the clipped straight-through estimate.
    * ``lsq`` / ``lsq_plus``: the scale (and, for LSQ+, the zero point) is a parameter, initialized
      once from calibration statistics if the observer has seen data, else from the first batch
      (``2 * mean|x| / sqrt(qmax)`` per scale, as in the LSQ paper), then learned with gradient
      scale ``1 / sqrt(N * qmax)``, ``N`` the elements per scale.
    * ``pact``: a learned clip ``alpha`` (initialized to the observed max) for unsigned activations.
    * ``dynamic``: the range of each batch (per tensor, per token or per group), nothing stored.

    Ranges come from the finite elements only (``QuantSpec.nonfinite``): a batch without a finite
    value leaves them as they were (the ``[0, 0]`` of a fresh observer gives the smallest scale),
    and a learned quantizer initializes from its first batch with data, passing its input through
    until then. The state stays float32 under ``.half()`` / ``.bfloat16()``, and float16 / bfloat16
    inputs are fake-quantized in float32 and cast back.

    Args:
        spec: how to quantize.
        shape: the tensor's shape (for activations: of one sample, feature axis where
            ``spec.axis`` points), which fixes the scale's shape.
        sync: all-reduce observer statistics across ranks (activations under DDP / FSDP).
        track_history: observers accumulate statistics over batches (activations). ``False`` for
            weights: the range is that of the current weights on each step, since the weights
            themselves are the statistic and they move as they train.

    Example::

        >>> fq = FakeQuantizer(QuantSpec(bits=4, granularity="per_channel", axis=0), (16, 8))
        >>> w = torch.randn(16, 8)
        >>> y = fq(w)                       # observes, then fake-quantizes
        >>> bool((y - w).abs().max() <= fq.scale.max() / 2 + 1e-6)
        True
    """

    def __init__(self, spec: QuantSpec, shape: tuple[int, ...], sync: bool = False, track_history: bool = True):
        super().__init__()
        self.spec = spec
        self.layout = Layout.of(spec)
        self.sync = sync
        self.track_history = track_history
        # a microscaling / FP8 format (qat/microscaling.py): block formats keep one float32 scale (NVFP4's
        # tensor scale; unused by MX's E8M0 blocks, which come from the data) and no observer
        self.micro = MICRO_FORMATS.get(spec.format.value)
        pshape = (1,) if spec.dynamic else self.layout.param_shape(shape)
        if self.micro is not None and self.micro.block_size:
            pshape = (1,)
        self.observer = None if self.micro is not None and self.micro.block_size else make_observer(spec, pshape, sync=sync)
        scale, zp = torch.ones(pshape), torch.zeros(pshape)
        if spec.estimator in (Estimator.LSQ, Estimator.LSQ_PLUS):
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        if spec.estimator is Estimator.LSQ_PLUS:
            self.zero_point = nn.Parameter(zp)
        else:
            self.register_buffer("zero_point", zp)
        if spec.estimator is Estimator.PACT:
            self.alpha = nn.Parameter(torch.ones(1))
        self._bound = None  # (key, the op bound at the last call): bind() re-uses it (_reuse)
        # a weight's STE quantizer whose observer holds the current min / max: observer update, scale,
        # zero point and fake quantization in one fused op (rows of this many elements), else None
        self._minmax_row = None
        if (spec.estimator is Estimator.STE and not spec.dynamic and not track_history and self.micro is None
                and spec.format is WeightFormat.AFFINE):
            if self.observer.first_batch_is_minmax:
                self._minmax_row = self.layout.row_length(tuple(shape))
        # the op's scalar arguments, fixed by the (frozen) spec: bind() reads them rather than deriving
        # them per call (under torch.compile, every line bind() runs is traced, per quantizer)
        self._qrange = (spec.qmin, spec.qmax)
        self._round = spec.round_mode.value
        self._register_flag("fake_quant_enabled", True)
        self._register_flag("observer_enabled", True)
        self._register_flag("initialized", False)

    # ------------------------------------------------------------------ lifecycle switches
    def enable_observer(self, enabled: bool = True) -> "FakeQuantizer":
        self._set_flag("observer_enabled", enabled)
        return self

    def enable_fake_quant(self, enabled: bool = True) -> "FakeQuantizer":
        self._set_flag("fake_quant_enabled", enabled)
        return self

    def mark_initialized(self) -> "FakeQuantizer":
        """Declare scale / zero point set from outside (e.g. by GPTQ)."""
        self._set_flag("initialized", True)
        return self

    @property
    def tracks_current_weight(self) -> bool:
        """Whether each forward pass sets the whole state from the tensor it is given, as a weight's
        STE quantizer with a min / max observer does (one fused op): initializing it early
        (:meth:`init_from`) can then never leave a stale range, and the layer does it when made."""
        return self._minmax_row is not None

    @property
    def is_initialized(self) -> bool:
        """Whether scale / zero point hold a range yet (read without a device sync)."""
        return self.flag("initialized")

    @property
    def axis(self) -> Optional[int]:
        """The per-channel axis the op takes (``None`` unless per-channel)."""
        return self.layout.axis

    @property
    def group_size(self) -> Optional[int]:
        """The group size the op takes (``None`` unless per-group; per-token sets it per batch)."""
        return self.layout.group_size

    def grad_factor(self, x: torch.Tensor) -> float:
        """LSQ gradient scale ``1 / sqrt(N * qmax)``, ``N`` the elements of ``x`` per scale."""
        n = max(x.numel() // self.scale.numel(), 1)
        return 1.0 / math.sqrt(n * max(self.spec.qmax, 1))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``x`` fake-quantized (observed first where the observer is on), in ``out_dtype``.

        Args:
            x: the tensor.
            out_dtype: the result's dtype (default ``x``'s): exactly ``.to(out_dtype)`` of the
                result, which the fused kernels write directly (one pass fewer, and the gradient
                comes back in ``x``'s dtype in the same pass). A layer under autocast passes the
                dtype its matmul runs in (:meth:`qat.QuantModuleMixin.compute_dtype`).
        """
        b = self.bind(x)
        if b is not None:
            return b.apply(x, out_dtype)
        spec, flags = self.spec, self._flags
        if not flags["fake_quant_enabled"]:
            # observers still observe (as PyTorch's FakeQuantize): calibration on float values
            if flags["observer_enabled"] and self.observer is not None:
                self._observe(x)
            return _cast(x, out_dtype)
        if self.micro is not None:
            return _cast(self._microscaling(x, flags["observer_enabled"] and self.observer is not None), out_dtype)
        if spec.dynamic:
            return fake_quantize_dynamic(x, spec, self.layout, out_dtype)
        # llama.cpp k-quant: both scale levels from the current weight
        self._set_flag("initialized", True)
        return _cast(fake_quantize_kquant(x, spec.format.value), out_dtype)

    def bind(self, x: torch.Tensor) -> Optional[BoundQuant]:
        """The op this quantizer runs on ``x`` now, with its arguments bound
        (:class:`qat.kernels.BoundQuant`), after what comes first: the observer's update, a learned
        quantizer's initialization. :meth:`forward` is ``bind(x).apply(x, out_dtype)`` where this
        is not ``None``; a layer that fuses its quantizers into one autograd node calls it and runs
        the op's ``forward`` / ``backward`` itself (:class:`qat.QuantLinear`). Call it once per use
        of ``x``: it observes.

        Returns ``None``, having done nothing, where :meth:`forward` does something else: fake
        quantization off, a microscaling / FP8 or k-quant format, or a dynamic range that is not one
        contiguous run a scale.

        Example::

            >>> fq = FakeQuantizer(QuantSpec(bits=8), (4,))
            >>> x = torch.tensor([0.5, -1.0, 2.0, 0.25])
            >>> bool(torch.equal(fq.bind(x).apply(x), fq(x)))
            True
        """
        spec, flags = self.spec, self._flags  # Python mirrors of the flag buffers: no device sync per step
        if not flags["fake_quant_enabled"] or self.micro is not None:
            return None
        if spec.dynamic:
            if spec.nonfinite is not NonFinite.RAISE:
                return self._reuse(x, "dynamic", (), bind_dynamic, x, spec, self.layout)
            return bind_dynamic(x, spec, self.layout)
        if spec.format is not WeightFormat.AFFINE:
            return None
        (qmin, qmax), rm = self._qrange, self._round
        observing = flags["observer_enabled"] and self.observer is not None
        if spec.estimator is Estimator.STE:
            row = self._minmax_row
            if observing and row is not None and x.numel() == self.scale.numel() * row:
                # the observer's update (reset, then this batch), the scale and zero point, and the fake
                # quantization in one op: what _observe then fake_quantize compute, bit for bit
                obs = self.observer
                state = (obs.min_val, obs.max_val, obs.seen, self.scale, self.zero_point)
                b = self._reuse(x, "minmax", state, bind_minmax, x, row, qmin, qmax, spec.symmetric,
                                spec.scale_dtype is ScaleDtype.FLOAT16, rm, state)  # fmt: skip
                if not (torch.compiler.is_compiling() and flags["initialized"] and obs.is_initialized):
                    # (a compiled graph of an initialized quantizer, the usual case: the layer observes
                    # its weight when made, tracks_current_weight, writes no flags each step)
                    obs.mark_observed()
                    self._set_flag("initialized", True)
                return b
            if observing:
                self._observe(x)
            elif not flags["initialized"]:
                raise RuntimeError(
                    "FakeQuantizer: observer disabled before it saw any data; calibrate or enable the observer first"
                )
            return self._reuse(x, "ste", (self.scale, self.zero_point), bind_fake_quantize,
                               x, self.scale, self.zero_point, qmin, qmax, self.layout.axis, self.layout.group_size, rm)  # fmt: skip
        if not flags["initialized"]:
            self._init_learned(x)
            if not flags["initialized"]:
                return IDENTITY  # no finite value seen yet: nothing to initialize from
        elif observing and not self.training:
            self.observer(x)  # calibration statistics; the learned values stay as they are
        if spec.estimator is Estimator.PACT:
            return self._reuse(x, "pact", (self.alpha,), bind_pact, x, self.alpha, qmin, qmax, rm)
        return self._reuse(x, "lsq", (self.scale, self.zero_point), bind_lsq, x, self.scale, self.zero_point,
                           qmin, qmax, self.layout.axis, self.layout.group_size, self.grad_factor(x), rm)  # fmt: skip

    def _reuse(self, x: torch.Tensor, kind: str, tensors: tuple, bind, *args) -> Optional[BoundQuant]:
        """The op bound at the previous call where it was bound for the same kind of op, the same
        shape, dtype and device of ``x`` and the same state tensors (their values are read at each
        launch; their checks run again, :meth:`~qat.kernels.BoundQuant.check_values`), else
        ``bind(*args)``: a training step binds each quantizer's op once and re-uses it, without the
        checks of its arguments that cannot have changed (a few microseconds of host time a call).
        Not under torch.compile."""
        if torch.compiler.is_compiling():
            return bind(*args)  # a traced graph binds once anyway; a cache would only add guards on it
        key = (kind, x.shape, x.dtype, x.device)
        cached = self._bound
        if cached is not None and cached[0] == key and all(a is b for a, b in zip(cached[1].tensors, tensors)):
            cached[1].check_values(x)
            return cached[1]
        b = bind(*args)
        self._bound = None if b is None or b is IDENTITY else (key, b)
        return b

    def _microscaling(self, x: torch.Tensor, observing: bool) -> torch.Tensor:
        """A microscaling / FP8 format (``docs/math.md``, section 13): MX blocks take their E8M0
        scales from the data; NVFP4's tensor scale and FP8's scales come from the data (``ste``,
        weights and dynamic inputs), the observer (``ste`` inputs) or are learned (``lsq``)."""
        f, spec = self.micro, self.spec
        if x.numel() == 0:
            return x
        if f.block_scale == "e8m0":
            self._set_flag("initialized", True)
            return fake_quantize_float(x, f.element, f.block_size, "e8m0")
        axis = None if f.block_size else self.axis
        if spec.estimator is Estimator.LSQ:
            if not self._flags["initialized"]:
                self._init_float_scale(x)
            g = lsq_grad_factor(x.numel() // self.scale.numel(), f.name)
            return fake_quantize_float_lsq(x, self.scale, f.element, f.block_size, f.block_scale, axis, g)
        with torch.no_grad():
            if self.observer is None or not self.track_history:
                s = float_scale(x, f.name, axis)  # the range of this tensor (a weight, a dynamic input, NVFP4)
            else:
                if observing:
                    self.observer(x)
                elif not self._flags["initialized"]:
                    raise RuntimeError(
                        "FakeQuantizer: observer disabled before it saw any data; calibrate or enable the observer first"
                    )
                obs = self.observer
                amax = torch.maximum(-obs.min_val, obs.max_val).reshape(self.scale.shape)
                s = torch.clamp(amax / f.elem.max, min=torch.finfo(torch.float32).eps)
            if not spec.dynamic:
                self.scale.copy_(s.reshape(self.scale.shape))
        self._set_flag("initialized", True)
        return fake_quantize_float(x, f.element, f.block_size, f.block_scale, s, axis)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """Set the state the first forward pass would set from ``x``, now: a learned scale and zero
        point (PACT: ``alpha``; a float format's learned scale) from their initializers, an STE
        quantizer's from its observer. A format whose scales come from each call's data (dynamic
        inputs, MX blocks, k-quants with searched scales) keeps nothing, and nothing changes.

        A weight's quantizer initialized before the first step (:func:`qat.init_weight_quantizers`,
        which the :class:`~qat.callbacks.QuantizationAwareTraining` callback runs at the start of
        fit) gives ``torch.compile`` one graph from the first step: the flag the forward pass branches
        on no longer flips between step 1 and step 2 (a recompile, and a second compile's warm-up).

        Example::

            >>> fq = FakeQuantizer(QuantSpec(bits=4, estimator="lsq"), (8,))
            >>> fq.init_from(torch.linspace(-1.0, 1.0, 8)); fq.is_initialized
            True
        """
        spec = self.spec
        if self.micro is not None:
            if spec.estimator is Estimator.LSQ and self.micro.block_scale != "e8m0":
                self._init_float_scale(x)
        elif spec.dynamic or spec.format is not WeightFormat.AFFINE:
            return
        elif spec.estimator is Estimator.STE:
            self._observe(x)
        else:
            self._init_learned(x)

    @torch.no_grad()
    def _init_float_scale(self, x: torch.Tensor) -> None:
        """A float format's learned scale from the range of ``x`` (per block format's tensor, or
        per channel)."""
        f = self.micro
        axis = None if f.block_size else self.axis
        self.scale.copy_(float_scale(x, f.name, axis).reshape(self.scale.shape))
        self._set_flag("initialized", True)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        """Update the observer; an STE quantizer also takes its scale / zero point from it."""
        if not self.track_history:
            self.observer.reset()  # a parameter without finite values keeps its last range
        self.observer(x)
        if self.spec.estimator is Estimator.STE and self.micro is None:  # a float format's scale: _microscaling
            s, z = self.observer.qparams()
            self.scale.copy_(s)
            self.zero_point.copy_(z)
            self._set_flag("initialized", True)

    @torch.no_grad()
    def _init_learned(self, x: torch.Tensor) -> None:
        spec = self.spec
        if self.observer is not None:
            self.observer(x)
            # no finite value yet (an empty or all-NaN / Inf batch): initialize from a later batch. One
            # read, on the first step only, and not while torch.compile traces (no graph break): there
            # the parameters without data keep their construction values (below)
            if not torch.compiler.is_compiling() and not bool(self.observer.seen.any()):
                return
        seen = self.observer.seen
        if spec.estimator is Estimator.PACT:
            alpha = torch.clamp(self.observer.max_val.max().reshape(1), min=1e-3)
            self.alpha.copy_(torch.where(seen.any(), alpha, self.alpha))
        else:
            s_obs, z_obs = self.observer.qparams()
            if spec.estimator is Estimator.LSQ:
                # LSQ paper init: 2 <|x|> / sqrt(qmax), per scale
                mean_abs = self.layout.mean_abs(x, self.scale.shape, finite=True)
                s = _sync_mean(2.0 * mean_abs / math.sqrt(max(spec.qmax, 1)), self.sync)
                s = torch.clamp(s, min=torch.finfo(torch.float32).eps)
                self.scale.copy_(torch.where(seen.reshape(s.shape), s, self.scale))
                if spec.symmetric:
                    self.zero_point.copy_(z_obs)
                else:
                    # the observer's zero point belongs to its own scale: re-anchor the observed
                    # minimum at qmin for the LSQ scale, or the range shifts by (s_obs - s) * z
                    mn = torch.clamp(self.observer.min_val.reshape(s.shape), max=0.0)
                    self.zero_point.copy_(torch.clamp(spec.qmin - torch.round(mn / s), spec.qmin, spec.qmax))
            else:  # LSQ+: start from the observed affine range
                self.scale.copy_(s_obs)
                self.zero_point.copy_(z_obs)
        self._set_flag("initialized", True)

    @torch.no_grad()
    def load_from_observer(self) -> None:
        """Set scale / zero point (or PACT's alpha) from the observer's statistics (after calibration);
        nothing when the observer never saw a finite value."""
        if self.observer is None or not self.observer.is_initialized or not bool(self.observer.seen.any()):
            return
        if self.spec.estimator is Estimator.PACT:
            self.alpha.copy_(torch.clamp(self.observer.max_val.max().reshape(1), min=1e-3))
        elif self.micro is not None:  # FP8: amax / the element's largest magnitude
            amax = torch.maximum(-self.observer.min_val, self.observer.max_val).reshape(self.scale.shape)
            self.scale.copy_(torch.clamp(amax / self.micro.elem.max, min=torch.finfo(torch.float32).eps))
        else:
            s, z = self.observer.qparams()
            self.scale.copy_(s)
            self.zero_point.copy_(z)
        self._set_flag("initialized", True)

    def current_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` as the forward pass uses them (detached; PACT's derived from alpha)."""
        if self.spec.estimator is Estimator.PACT:
            s = (self.alpha.detach().float() / (self.spec.qmax - self.spec.qmin)).reshape(1)
            return s, torch.full_like(s, float(self.spec.qmin))
        z = self.zero_point.detach()
        if self.spec.estimator is Estimator.LSQ_PLUS:
            z = torch.clamp(torch.round(z), self.spec.qmin, self.spec.qmax)
        return self.scale.detach(), z

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The quantizer's state by name: ``scale``, ``zero_point``, ``alpha`` (PACT) and the
        observer's ``observer.min_val`` / ``observer.max_val`` (detached)."""
        out = {"scale": self.scale.detach(), "zero_point": self.zero_point.detach()}
        if self.spec.estimator is Estimator.PACT:
            out["alpha"] = self.alpha.detach()
        if self.observer is not None:
            out["observer.min_val"] = self.observer.min_val
            out["observer.max_val"] = self.observer.max_val
        return out

    def nonfinite_state(self) -> list[str]:
        """Names of the state tensors (:meth:`state_tensors`) that hold a NaN or Inf; empty when
        the state is finite. One device sync.

        Example::

            >>> fq = FakeQuantizer(QuantSpec(bits=8), (4,))
            >>> _ = fq(torch.tensor([1.0, float("nan"), -2.0, 0.5]))   # NaN is left out of the range
            >>> fq.nonfinite_state()
            []
            >>> _ = fq.scale.fill_(float("inf")); fq.nonfinite_state()
            ['scale']
        """
        return _nonfinite_names(self.state_tensors())

    def extra_repr(self) -> str:
        s = self.spec
        g = s.granularity.value + (f"(axis={s.axis})" if self.axis is not None else "") + (
            f"(g={s.group_size})" if self.group_size is not None else ""
        )
        fmt = "" if s.format is WeightFormat.AFFINE else f", format={s.format.value}"
        return f"bits={s.bits}, {'signed' if s.signed else 'unsigned'}, {g}{fmt}, estimator={s.estimator.value}" + (
            ", dynamic" if s.dynamic else f", observer={s.observer.value}"
        )


def _cast(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return x if dtype is None or x.dtype == dtype else x.to(dtype)


def fake_quantize_dynamic(
    x: torch.Tensor, spec: QuantSpec, layout: Optional[Layout] = None, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Fake-quantize ``x`` with the range of ``x`` itself (a dynamic spec: per tensor, per token or
    per group), as the quantizer does in training and the converted layer does in inference; the
    result in ``out_dtype`` (default ``x``'s; :meth:`FakeQuantizer.forward`).

    Example::

        >>> spec = QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_token", dynamic=True)
        >>> x = torch.randn(2, 3, 16)
        >>> bool((fake_quantize_dynamic(x, spec) - x).abs().max() < 0.05)
        True
    """
    layout = Layout.of(spec) if layout is None else layout
    b = bind_dynamic(x, spec, layout)
    if b is not None:
        return b.apply(x, out_dtype)
    if spec.nonfinite is NonFinite.RAISE:
        check_finite(x, spec, "dynamic quantizer")
    with torch.no_grad():  # the range of the finite elements: a NaN row does not poison the others
        s, z = qparams_from_range(*layout.aminmax(x, finite=True), spec)
    axis, group_size = layout.op_args(x)  # per token: one group spanning the last axis
    return fake_quantize(x, s, z, spec.qmin, spec.qmax, axis, group_size, spec.round_mode.value, out_dtype)


def bind_dynamic(x: torch.Tensor, spec: QuantSpec, layout: Optional[Layout] = None) -> Optional[BoundQuant]:
    """:func:`fake_quantize_dynamic` of ``x`` as one bound op (:class:`qat.kernels.BoundQuant`) where
    every scale covers one contiguous run of ``x`` (per token, per group, per tensor: range, qparams
    and quantization fused), the identity for an empty ``x``; ``None`` otherwise (nothing checked).

    Example::

        >>> spec = QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_token", dynamic=True)
        >>> x = torch.randn(2, 3, 16)
        >>> bool(torch.equal(bind_dynamic(x, spec).apply(x), fake_quantize_dynamic(x, spec)))
        True
    """
    if x.numel() == 0:
        return IDENTITY
    row = (Layout.of(spec) if layout is None else layout).row_length(x.shape)
    if row is None:
        return None
    if spec.nonfinite is NonFinite.RAISE:
        check_finite(x, spec, "dynamic quantizer")
    return bind_minmax(x, row, spec.qmin, spec.qmax, spec.symmetric, spec.scale_dtype is ScaleDtype.FLOAT16, spec.round_mode.value)


def _nonfinite_names(tensors: dict) -> list:
    """The keys of ``tensors`` whose values are not all finite (one device sync a device)."""
    if not tensors:
        return []
    flags = [torch.isfinite(t.detach()).all() for t in tensors.values()]
    if len({f.device for f in flags}) == 1:
        ok = torch.stack(flags).tolist()
    else:
        ok = [bool(f) for f in flags]
    return [n for n, good in zip(tensors, ok) if not good]


def nonfinite_quantizers(model: nn.Module) -> dict[str, list[str]]:
    """The fake quantizers of ``model`` whose state is not finite: qualified quantizer name -> the
    state tensors at fault (``scale``, ``zero_point``, ``alpha``, ``observer.min_val``,
    ``observer.max_val``). Empty when every quantizer is healthy.

    What a training loop (or a Lightning callback) calls to skip a step, or stop, once a learned
    scale or clip has gone NaN / Inf; :func:`qat.convert` refuses such a model. One device sync
    in all.

    Example::

        >>> import torch.nn as nn
        >>> from qat import prepare
        >>> model = prepare(nn.Sequential(nn.Linear(4, 2)), "w8a8")
        >>> _ = model(torch.tensor([[1.0, float("nan"), 2.0, -1.0]]))
        >>> nonfinite_quantizers(model)
        {}
        >>> _ = model[0].input_quantizer.zero_point.fill_(float("nan"))
        >>> nonfinite_quantizers(model)
        {'0.input_quantizer': ['zero_point']}
    """
    tensors = {
        (name, key): t
        for name, mod in model.named_modules()
        if isinstance(mod, FakeQuantizer)
        for key, t in mod.state_tensors().items()
    }
    out: dict[str, list[str]] = {}
    for name, key in _nonfinite_names(tensors):
        out.setdefault(name, []).append(key)
    return out
