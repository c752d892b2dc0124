"""Weight oscillations in QAT: dampening loss and iterative freezing (Nagel et al., ICML 2022,
"Overcoming Oscillations in Quantization-Aware Training").

A latent (float) weight that sits next to a rounding boundary flips its integer code back and forth
from step to step: the straight-through gradient of one code pushes it across the boundary, the
other code's pushes it back. The network then trains against a weight that is neither value. The
paper's two fixes, on the weight quantizers of a :func:`qat.prepare`-d model:

* :func:`dampening_loss`: ``sum ||q(w) - clip(w, s (qmin - z), s (qmax - z))||^2`` over every
  quantized weight, ``q(w)`` the fake-quantized weight (the bin centre) and ``s`` / ``z`` the
  quantizer's scale and zero point, all detached: the gradient reaches the latent weights only and
  pulls each towards the centre of its bin. Weights outside the grid are clipped first, so the term
  does not fight range learning. The paper anneals its weight from 0 with a cosine schedule.
* :class:`OscillationTracker`: after each optimizer step, the integer code of every weight; an
  *oscillation* is a code change in the direction opposite to the weight's previous change. Their
  exponential moving average (momentum ``m``) is each weight's oscillation frequency; a weight whose
  frequency exceeds ``threshold`` is frozen to the rounded moving average of its codes and stays at
  that integer for the rest of training.

:class:`OscillationController` drives both from any training loop, one call after the backward and
one after the optimizer step: the cosine ramp of the dampening weight (:func:`dampening_weight`),
the dampening gradient added to the weights' ``.grad``, the tracker and when freezing starts. The
Lightning callback :class:`qat.callbacks.OscillationControl` and
:func:`qat.recipes.minilm.distill` both run on it.

"Weight" here is what the weight quantizer sees: ``weight * input_smooth`` for a smoothed layer
(:func:`qat.smooth_inputs`), ``weight.flatten(1)`` for a per-group convolution. Codes are computed
with the fake-quant op's own math (:func:`qat.spec.round_with_mode`,
``clamp(rnd(w * (1/s)) + z, qmin, qmax)`` in float32), so they are the codes the forward pass uses.

Example::

    >>> import torch, torch.nn as nn
    >>> from qat import QuantPlan, prepare
    >>> plan = QuantPlan.from_dict({"name": "w4", "rules": [{"match": "*", "weight": {
    ...     "bits": 4, "granularity": "per_group", "group_size": 8, "estimator": "lsq_plus", "symmetric": False}}]})
    >>> model = prepare(nn.Sequential(nn.Linear(16, 4)), plan)
    >>> _ = model(torch.randn(2, 16))                  # initializes the learned scales
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    >>> tracker = OscillationTracker(model, momentum=0.99, threshold=0.02)
    >>> for step in range(3):
    ...     loss = model(torch.randn(2, 16)).pow(2).mean() + 1e-3 * dampening_loss(model)
    ...     opt.zero_grad(); loss.backward(); opt.step()
    ...     tracker.step()
    >>> sorted(tracker.stats())
    ['flip_rate', 'frozen', 'osc_freq', 'osc_rate', 'steps']
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .errors import QATConfigError
from .fake_quant import FakeQuantizer
from .modules import QuantModuleMixin
from .granularity import weight_view_shape
from .microscaling import float_codes
from .observers import qparams_from_range
from .prepare import quant_layers
from .spec import round_with_mode

__all__ = ["dampening_loss", "dampening_weight", "OscillationController", "OscillationTracker", "weight_codes", "weight_layers"]


def weight_layers(model: nn.Module) -> list[tuple[str, QuantModuleMixin]]:
    """``(name, layer)`` for every quantized layer of ``model`` that has a weight quantizer.

    Args:
        model: a :func:`qat.prepare`-d model.

    Returns:
        the layers, in module order.

    Raises:
        QATConfigError: the model has none (not prepared, or a plan with activations only).

    Example::

        >>> import torch.nn as nn
        >>> from qat import prepare
        >>> [name for name, _ in weight_layers(prepare(nn.Sequential(nn.Linear(8, 4), nn.ReLU()), "w4a8"))]
        ['0']
    """
    layers = [(n, m) for n, m in quant_layers(model) if m.weight_quantizer is not None]
    if not layers:
        raise QATConfigError(
            "the model has no weight quantizers: prepare it with qat.prepare(model, plan) and a plan that quantizes weights"
        )
    return layers


# ----------------------------------------------------------------------------- shared math


def _latent(layer: QuantModuleMixin) -> torch.Tensor:
    """The tensor the weight quantizer sees, with autograd to ``weight`` (the smoothing factors
    are detached: the dampening pull is on the latent weights only)."""
    return layer.latent_weight(detach_smooth=True)


def _grid(fq: FakeQuantizer, w32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s, z, inv_s)`` of the quantizer as its forward uses them, shaped to broadcast against the
    grouped ``w32`` (``(..., K) -> (..., K // g, g)`` for per-group)."""
    spec = fq.spec
    if fq.micro is not None:
        raise QATConfigError(
            f"oscillation dampening / freezing works on integer grids; a {spec.format.value} weight is a float "
            f"format (qat.microscaling): train it without the oscillation callback"
        )
    if spec.dynamic:  # the range of the current weights, as FakeQuantizer._dynamic computes it
        s, z = qparams_from_range(*fq.layout.aminmax(w32), spec)
    else:
        if not fq.is_initialized:
            raise RuntimeError(
                "oscillation: a weight quantizer has no scale yet; calibrate the model or run one forward pass first"
            )
        s, z = fq.current_qparams()  # detached; LSQ+'s offset rounded and clamped as the forward uses it
    s = fq.layout.broadcast(s.float(), w32)
    z = fq.layout.broadcast(z.float(), w32)
    return s, z, 1.0 / s


def _codes(fq: FakeQuantizer, wg: torch.Tensor, z: torch.Tensor, inv_s: torch.Tensor) -> torch.Tensor:
    """``clamp(rnd(w * inv_s) + z, qmin, qmax)``: the reference's float32 math, element for element."""
    spec = fq.spec
    return torch.clamp(round_with_mode(wg * inv_s, spec.round_mode.value) + z, spec.qmin, spec.qmax)


def weight_codes(layer: QuantModuleMixin) -> torch.Tensor:
    """The integer codes the forward pass uses for ``layer``'s weight now, shaped like the weight
    (for a float format, its element values: :func:`qat.microscaling.float_codes`).

    Computed as :class:`OscillationTracker` computes them (the fake-quant op's float32 math on what
    the weight quantizer sees, ``weight * input_smooth`` for a smoothed layer), returned as float32.

    Args:
        layer: a quantized layer with a weight quantizer that holds a scale.

    Raises:
        RuntimeError: the weight quantizer has no scale yet.

    Example::

        >>> import torch, torch.nn as nn
        >>> from qat import prepare
        >>> model = prepare(nn.Sequential(nn.Linear(8, 4)), "w4a8")
        >>> _ = model(torch.randn(2, 8))                   # the first forward sets the ranges
        >>> codes = weight_codes(model[0])
        >>> codes.shape, bool(codes.min() >= -8), bool(codes.max() <= 7)
        (torch.Size([4, 8]), True, True)
    """
    fq = layer.weight_quantizer
    with torch.no_grad():
        w32 = _latent(layer).detach().float()
        if fq.micro is not None:  # a float format: its element values (qat.microscaling.float_codes)
            scale = None if fq.micro.block_scale == "e8m0" else fq.scale.detach()
            return float_codes(w32, fq.micro.name, scale, fq.axis)[0].reshape(layer.weight.shape)
        _, z, inv_s = _grid(fq, w32)
        return _codes(fq, fq.layout.grouped(w32), z, inv_s).reshape(layer.weight.shape)


# ----------------------------------------------------------------------------- dampening


def dampening_weight(lam_max: float, step: int, total_steps: float) -> float:
    """The paper's cosine ramp of the dampening weight: 0 at step 0, ``lam_max`` at step
    ``total_steps - 1`` (and after): ``lam_max * (1 - cos(pi * t / (T - 1))) / 2``.

    Example::

        >>> dampening_weight(1e-3, 0, 100), dampening_weight(1e-3, 99, 100)
        (0.0, 0.001)
    """
    return lam_max * 0.5 * (1 - math.cos(math.pi * min(step, total_steps - 1) / max(1, total_steps - 1)))



def dampening_loss(model: nn.Module, in_steps: bool = False, reduction: str = "sum") -> torch.Tensor:
    """Oscillation-dampening regularizer over all weight quantizers of a prepared model.

    ``sum over weights of (q(w) - clip(w, s (qmin - z), s (qmax - z)))^2`` with ``q(w) = (code - z) s``
    the fake-quantized weight: zero when every latent weight sits on its bin centre (or outside
    the grid), at most ``(s / 2)^2`` per weight. Scale, zero point and ``q(w)`` are detached, so the
    gradient, ``2 (w - q(w))`` inside the grid and 0 outside, reaches the latent weights only
    (not the learned scales / offsets, nor trainable smoothing factors).

    Args:
        model: a :func:`qat.prepare`-d model whose weight quantizers hold a scale (calibrated, or
            after one forward pass).
        in_steps: measure the distance in quantization steps (divide by ``s^2``) instead of in
            weight units as the paper does; every group then pulls with the same strength per step.
        reduction: ``"sum"`` (the paper's) or ``"mean"`` over all quantized weights.

    Returns:
        a float32 scalar with autograd to the weights; add ``lambda * dampening_loss(model)`` to the
        task loss, ``lambda`` annealed from 0 (cosine) as in the paper.

    Raises:
        QATConfigError: the model has no weight quantizers.
        ValueError: ``reduction`` is not ``"sum"`` or ``"mean"``.
        RuntimeError: a weight quantizer has no scale yet.

    Example::

        >>> import torch, torch.nn as nn
        >>> from qat import prepare
        >>> model = prepare(nn.Sequential(nn.Linear(16, 4)), "w4a8")
        >>> _ = model(torch.randn(2, 16))
        >>> loss = dampening_loss(model)
        >>> loss.backward(); model[0].weight.grad is not None
        True
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    total: Optional[torch.Tensor] = None
    n = 0
    for _, layer in weight_layers(model):
        fq = layer.weight_quantizer
        w = _latent(layer).float()
        with torch.no_grad():
            s, z, inv_s = _grid(fq, w.detach())
        term = _Dampen.apply(fq.layout.grouped(w), fq, s, z, inv_s, in_steps)
        total = term if total is None else total + term
        n += w.numel()
    return total if reduction == "sum" else total / n


class _Dampen(torch.autograd.Function):
    """``sum (clip(w) - q(w))^2`` of one layer, with its gradient computed in the forward pass.

    Outside the grid ``clip(w)`` and ``q(w)`` are the same bound (the same float arithmetic), so
    ``d = clip(w) - q(w)`` is 0 there and ``2 d`` is the whole gradient: one saved tensor and one
    multiply in the backward, instead of autograd's chain through clamp, sub and pow.
    """

    @staticmethod
    def forward(ctx, wg, fq, s, z, inv_s, in_steps):
        spec = fq.spec
        centre = _codes(fq, wg, z, inv_s).sub_(z).mul_(s)  # (code - z) * s: the fake-quantized weight
        d = torch.clamp(wg, (spec.qmin - z) * s, (spec.qmax - z) * s).sub_(centre)
        if in_steps:
            d.mul_(inv_s)  # in steps; d(loss)/dw = 2 d / s
        flat = d.reshape(-1)
        loss = torch.dot(flat, flat)
        ctx.save_for_backward(d.mul_(2.0 * inv_s) if in_steps else d.mul_(2.0))
        return loss

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        return g * grad, None, None, None, None, None


# ----------------------------------------------------------------------------- freezing


class OscillationTracker:
    """Tracks weight oscillations of a prepared model and freezes the weights that oscillate.

    Call :meth:`step` after every optimizer step. For each weight it computes the integer code the
    forward pass will use, counts an oscillation when the code moves opposite to its previous move,
    and keeps ``freq = m * freq + (1 - m) * oscillated`` (about ``1 / P`` for a weight that oscillates
    every ``P < 1 / (1 - m)`` steps). With a ``threshold``, a weight with ``freq > threshold`` is
    frozen: set to ``s * (round(ema_code) - z)`` (the bin centre of the rounded moving average of its
    code, as the paper does) and reset there after every later step, so its code stays fixed whatever
    the optimizer (and its moments) do; when the scale is learned the frozen weight follows it, in the
    integer domain. The state of all layers lives in flat tensors on the weights' device, updated
    in place (on a CPU, fresh tensors of this size cost more than the arithmetic): about 21 bytes per
    quantized weight with freezing, 16 when only tracking (code, last direction, frequency, average
    code, frozen flag and scratch), and a step is a few dozen vectorized ops.

    A weight quantizer whose range follows the current weights (STE with a live observer, dynamic
    ranges) recomputes its scale each forward: a frozen code then holds only as long as the range
    does. Learned scales (LSQ, LSQ+) and calibrated STE ranges keep it exactly.

    Args:
        model: a :func:`qat.prepare`-d model with weight quantizers that hold a scale.
        momentum: ``m`` of the moving averages, in (0, 1); the paper uses 0.99 (its "momentum
            0.01" is ``1 - m``).
        threshold: freeze weights whose oscillation frequency exceeds this, strictly (e.g.
            0.005-0.02; with ``m = 0.99`` one oscillation adds 0.01, so 0.015 freezes a weight after
            two oscillations within ~70 steps); ``None`` only tracks.

    Raises:
        QATConfigError: ``momentum`` not in (0, 1), ``threshold <= 0``, or no weight quantizers.
        RuntimeError: a weight quantizer has no scale yet.

    Example::

        >>> import torch, torch.nn as nn
        >>> from qat import prepare
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> student = prepare(nn.Sequential(nn.Linear(16, 8)), "w4a8")
        >>> _ = student(torch.randn(4, 16))
        >>> opt = torch.optim.SGD(student.parameters(), lr=0.5)
        >>> tracker = OscillationTracker(student, momentum=0.9, threshold=0.05)
        >>> for _ in range(20):
        ...     loss = student(torch.randn(4, 16)).pow(2).mean()
        ...     opt.zero_grad(); loss.backward(); opt.step()
        ...     tracker.step()
        >>> st = tracker.stats()
        >>> st["steps"], 0.0 <= st["frozen"] <= 1.0
        (20, True)
    """

    def __init__(self, model: nn.Module, momentum: float = 0.99, threshold: Optional[float] = 0.01):
        if not 0.0 < momentum < 1.0:
            raise QATConfigError(f"OscillationTracker.momentum must be in (0, 1), got {momentum}")
        if threshold is not None and not threshold > 0:
            raise QATConfigError(f"OscillationTracker.threshold must be > 0 (or None to only track), got {threshold}")
        self.momentum = float(momentum)
        self.threshold = None if threshold is None else float(threshold)
        self.layers = weight_layers(model)
        self.steps = 0
        self._freezing_started = False
        with torch.no_grad():
            codes = self._codes_now()
        # layer i owns elements [offsets[i], offsets[i + 1]) of every flat state tensor
        self._offsets = [0]
        for _, layer in self.layers:
            self._offsets.append(self._offsets[-1] + layer.weight.numel())
        self.numel = self._offsets[-1]
        wide = any(l.weight_quantizer.spec.qmin < -(2**15) or l.weight_quantizer.spec.qmax >= 2**15 for _, l in self.layers)
        itype = torch.int32 if wide else torch.int16
        # State, flat over all layers. On the CPU, fresh tensors of this size cost more (page
        # faults) than the arithmetic, so every step works in place on these buffers.
        self._prev = codes.to(itype)  # code after the last step (frozen weights: their held code)
        self._last_dir = torch.zeros_like(self._prev)  # sign of the last change (0: none yet)
        self._freq = torch.zeros_like(codes)  # EMA of oscillation events
        freezing = self.threshold is not None
        self._ema = codes.clone() if freezing else None  # EMA of the code
        self._frozen = torch.zeros_like(codes, dtype=torch.bool) if freezing else None
        self._buf = codes  # float scratch: this step's codes, then other float temporaries
        self._ibuf = torch.empty_like(self._prev)  # integer scratch: this step's codes
        self._changed = torch.zeros_like(codes, dtype=torch.bool)  # last step's: read by stats()
        self._osc = torch.zeros_like(codes, dtype=torch.bool)

    def _codes_now(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Integer codes (float32) of every tracked weight now, flat, layer after layer."""
        parts = []
        for i, (_, layer) in enumerate(self.layers):
            fq = layer.weight_quantizer
            w32 = _latent(layer).detach().float()
            _, z, inv_s = _grid(fq, w32)
            q = _codes(fq, fq.layout.grouped(w32), z, inv_s).reshape(-1)
            if out is None:
                parts.append(q)
            else:
                out[self._offsets[i] : self._offsets[i + 1]].copy_(q)
        return torch.cat(parts) if out is None else out

    @torch.no_grad()
    def step(self, freeze: bool = True) -> None:
        """Update the statistics from the current weights and freeze / hold the frozen ones.

        Args:
            freeze: ``False`` only tracks this step (no new weights are frozen; those frozen earlier
                stay held): a warm-up before freezing starts.
        """
        m = self.momentum
        codes = self._codes_now(out=self._buf)  # float32
        if self._ema is not None:
            self._ema.lerp_(codes, 1.0 - m)
        c = self._ibuf
        c.copy_(codes)
        if self._frozen is not None and self._freezing_started:
            torch.where(self._frozen, self._prev, c, out=c)  # held codes (the weights are reset below)
        delta = torch.sub(c, self._prev, out=self._prev).sign_()  # -1, 0, +1; prev's buffer is free from here
        self._prev, self._ibuf = c, delta
        torch.ne(delta, 0, out=self._changed)
        torch.lt(delta * self._last_dir, 0, out=self._osc)  # moved back: opposite to the weight's previous move
        self._buf.copy_(self._osc)
        self._freq.mul_(m).add_(self._buf, alpha=1.0 - m)
        torch.where(self._changed, delta, self._last_dir, out=self._last_dir)
        self.steps += 1
        if self._frozen is None:
            return
        if freeze:
            self._freezing_started = True
            new = torch.gt(self._freq, self.threshold)
            new &= ~self._frozen
            # hold the rounded average code (an average of codes in [qmin, qmax] rounds into it);
            # the move there from the current code is not counted as an oscillation
            self._ibuf.copy_(torch.round(self._ema, out=self._buf))
            torch.where(new, self._ibuf, self._prev, out=self._prev)
            self._frozen |= new
        if self._freezing_started:
            self._hold()

    def _hold(self) -> None:
        """Set the frozen weights to the centre of their held code's bin: ``s * (code - z)``."""
        spans = list(zip(self._offsets[:-1], self._offsets[1:]))
        # one device sync a step, to skip the layers with nothing frozen (all of them, early on)
        active = torch.stack([self._frozen[lo:hi].any() for lo, hi in spans]).tolist()
        for (_, layer), (lo, hi), todo in zip(self.layers, spans, active):
            if not todo:
                continue
            fq = layer.weight_quantizer
            w = layer.weight
            shape = weight_view_shape(layer.weight.shape, fq.spec)  # the shape of _latent(layer)
            # the grid needs the weights' values only for dynamic ranges, else their shape
            s, z, _ = _grid(fq, _latent(layer).detach().float() if fq.spec.dynamic else w.detach().view(shape))
            code = fq.layout.grouped(self._prev[lo:hi].view(shape).float())
            target = ((code - z) * s).reshape(w.shape)  # grouped view -> the weight's own shape
            if layer.input_smooth is not None:  # the quantizer sees weight * smooth
                target = target / layer.input_smooth.detach()
            w.copy_(torch.where(self._frozen[lo:hi].view(w.shape), target.to(w.dtype), w))

    # ------------------------------------------------------------------ statistics
    def frozen_share(self) -> float:
        """Share of all tracked weights that are frozen (0 when only tracking)."""
        return 0.0 if self._frozen is None else float(torch.count_nonzero(self._frozen)) / self.numel

    def frozen_by_layer(self) -> dict[str, float]:
        """Layer name -> share of its weights that are frozen."""
        out = {}
        for i, (n, _) in enumerate(self.layers):
            lo, hi = self._offsets[i], self._offsets[i + 1]
            out[n] = 0.0 if self._frozen is None else float(self._frozen[lo:hi].float().mean())
        return out

    def frequency(self, name: str) -> torch.Tensor:
        """The oscillation frequencies (EMA) of one layer's weights, shaped like its weight."""
        i = [n for n, _ in self.layers].index(name)
        return self._freq[self._offsets[i] : self._offsets[i + 1]].view(self.layers[i][1].weight.shape)

    def frozen_mask(self, name: str) -> torch.Tensor:
        """Which of one layer's weights are frozen (all ``False`` when only tracking)."""
        i = [n for n, _ in self.layers].index(name)
        w = self.layers[i][1].weight
        if self._frozen is None:
            return torch.zeros_like(w, dtype=torch.bool)
        return self._frozen[self._offsets[i] : self._offsets[i + 1]].view(w.shape)

    def stats(self) -> dict[str, float]:
        """``frozen`` (share of weights), ``flip_rate`` / ``osc_rate`` (share whose code changed /
        oscillated at the last step), ``osc_freq`` (mean oscillation frequency, the EMA), ``steps``."""
        return {
            "frozen": self.frozen_share(),
            "flip_rate": float(torch.count_nonzero(self._changed)) / self.numel,
            "osc_rate": float(torch.count_nonzero(self._osc)) / self.numel,
            "osc_freq": float(self._freq.sum()) / self.numel,
            "steps": self.steps,
        }

    def __repr__(self) -> str:
        return (f"OscillationTracker(layers={len(self.layers)}, weights={self.numel}, momentum={self.momentum}, "
                f"threshold={self.threshold}, steps={self.steps})")


# ----------------------------------------------------------------------------- the per-step driver


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


class OscillationController:
    """Oscillation dampening and iterative weight freezing for any training loop, one call after
    the backward and one after the optimizer step.

    The one implementation of the schedule that :class:`qat.callbacks.OscillationControl` (Lightning)
    and :func:`qat.recipes.minilm.distill` (a plain loop) share. With ``T`` optimizer steps and ``t``
    the 0-based index of the current one:

    * :meth:`after_backward` (after the task loss' backward, before the optimizer step) adds
      ``lambda_t * grad(dampening_loss(model))`` to the ``.grad`` of every quantized weight that
      requires a gradient, ``lambda_t = dampen * (1 - cos(pi * t / (T - 1))) / 2``
      (:func:`dampening_weight`). The regularizer's gradient goes in through
      ``torch.autograd.grad``, not through the task loss: the result equals adding
      ``lambda_t * dampening_loss(model)`` to the loss before one backward (the same float
      operations, as long as each weight enters the task loss once), and it works where the loop
      cannot change the loss. ``scale`` multiplies the term (a gradient-accumulation divisor, an AMP
      loss scale). With ``freeze`` on, the first call also creates the tracker if
      :meth:`start_tracking` has not (a quantizer without a scale yet: the next call tries again).
    * :meth:`after_step` (after the optimizer step ``t``) updates the :class:`OscillationTracker`,
      which freezes weights from step ``int(freeze_start * T)`` on and holds the frozen ones.

    Call :meth:`begin` once before training with the model and ``T``.

    Args:
        dampen: ``lambda_max`` of the dampening regularizer (Nagel et al. 2022), a number >= 0;
            0: off.
        freeze: oscillation-frequency threshold in (0, 1) above which a weight is frozen on its
            average code; ``None`` or 0: off.
        momentum: momentum of the tracker's moving averages, in (0, 1) (0.99: about the last 100
            steps).
        freeze_start: share of the ``T`` steps, in [0, 1), that only track before freezing begins.
        arg_prefix: how error messages name the arguments (``arg_prefix + "dampen"``, ...), so a
            caller reports its own argument names.

    Raises:
        QATConfigError: an argument outside its range (the message names it and the range).

    Example::

        >>> import torch, torch.nn as nn
        >>> from qat import prepare
        >>> model = prepare(nn.Sequential(nn.Linear(16, 8)), "w4a8")
        >>> _ = model(torch.randn(4, 16))                   # the weight quantizer gets its scale
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> osc = OscillationController(dampen=1e-3, freeze=0.02, momentum=0.9)
        >>> osc.begin(model, total_steps=10)
        >>> for step in range(10):
        ...     loss = model(torch.randn(4, 16)).pow(2).mean()
        ...     opt.zero_grad(); loss.backward()
        ...     osc.after_backward(step)                    # + lambda_t * grad(dampening_loss)
        ...     opt.step()
        ...     osc.after_step(step)                        # track, freeze, hold the frozen weights
        >>> osc.dampening_at(0), osc.dampening_at(9)
        (0.0, 0.001)
        >>> sorted(osc.stats())
        ['dampen', 'flip_rate', 'frozen', 'osc_freq', 'osc_rate', 'steps']
    """

    def __init__(
        self,
        dampen: float = 0.0,
        freeze: Optional[float] = None,
        momentum: float = 0.99,
        freeze_start: float = 0.0,
        *,
        arg_prefix: str = "OscillationController.",
    ) -> None:
        p = arg_prefix
        if not _is_number(dampen) or dampen < 0:
            raise QATConfigError(f"{p}dampen must be a number >= 0 (0: off), got {dampen!r}")
        if freeze is not None and (not _is_number(freeze) or not 0.0 <= freeze < 1.0):
            raise QATConfigError(f"{p}freeze must be a number in (0, 1), or 0 / None (off), got {freeze!r}")
        if not _is_number(momentum) or not 0.0 < momentum < 1.0:
            raise QATConfigError(f"{p}momentum must be a number in (0, 1), got {momentum!r}")
        if not _is_number(freeze_start) or not 0.0 <= freeze_start < 1.0:
            raise QATConfigError(f"{p}freeze_start must be a number in [0, 1), got {freeze_start!r}")
        self.dampen = float(dampen)
        self.freeze = float(freeze) if freeze else None
        self.momentum = float(momentum)
        self.freeze_start = float(freeze_start)
        self.arg_prefix = arg_prefix
        self.model: Optional[nn.Module] = None
        self.tracker: Optional[OscillationTracker] = None
        self.total_steps: Optional[float] = None
        self.freeze_from = 0
        self._last_dampen: Optional[torch.Tensor] = None

    @property
    def enabled(self) -> bool:
        """Whether dampening or freezing is on (off, every call is a no-op)."""
        return self.dampen > 0 or self.freeze is not None

    def begin(self, model: nn.Module, total_steps: Optional[float], unbounded_hint: str = "give a finite total_steps") -> None:
        """Start a run on ``model`` of ``total_steps`` optimizer steps (``None`` or infinite: unbounded).

        Forgets an earlier run's tracker and statistics. Off (:attr:`enabled` false), it only
        records its arguments.

        Args:
            model: the :func:`qat.prepare`-d model whose weights are dampened / frozen.
            total_steps: the run's optimizer steps: the dampening ramp's length and what
                ``freeze_start`` is a share of.
            unbounded_hint: what the error for an unbounded run tells the user to do.

        Raises:
            QATConfigError: the model has no weight quantizers; or the run is unbounded with
                ``dampen`` on (the ramp needs an end) or with ``freeze_start`` > 0.
        """
        p = self.arg_prefix
        finite = total_steps is not None and math.isfinite(total_steps)
        if self.enabled:
            weight_layers(model)  # QATConfigError now if the plan quantizes no weights
            if not finite and self.dampen > 0:
                raise QATConfigError(f"{p}dampen needs a finite number of training steps for its cosine ramp; {unbounded_hint}")
            if not finite and self.freeze is not None and self.freeze_start != 0:
                raise QATConfigError(
                    f"{p}freeze_start={self.freeze_start} is a share of the training's steps, but the number of steps "
                    f"is unbounded; {unbounded_hint}, or {p}freeze_start=0 (freeze from the start)"
                )
        self.model = model
        self.total_steps = float(total_steps) if finite else None
        self.freeze_from = int(self.freeze_start * total_steps) if finite else 0
        self.tracker = None
        self._last_dampen = None

    def start_tracking(self) -> Optional[OscillationTracker]:
        """Create the :class:`OscillationTracker` now from the current codes (freezing on only;
        else ``None``). Without this call the first :meth:`after_backward` creates it.

        Raises:
            RuntimeError: a weight quantizer has no scale yet (calibrate, or run a forward first).
        """
        if self.model is None:
            raise RuntimeError("OscillationController: call begin(model, total_steps) first")
        if self.freeze is not None and self.tracker is None:
            self.tracker = OscillationTracker(self.model, self.momentum, self.freeze)
        return self.tracker

    def dampening_at(self, step: int) -> float:
        """The dampening weight ``lambda_t`` at optimizer step ``step`` (0-based); 0 when off or
        before :meth:`begin`."""
        if not self.dampen or self.total_steps is None:
            return 0.0
        return dampening_weight(self.dampen, step, self.total_steps)

    def after_backward(self, step: int, scale: float = 1.0) -> None:
        """Add ``scale * lambda_step * grad(dampening_loss)`` to the weights' ``.grad``; call it
        after the task loss' backward of optimizer step ``step`` (each micro-batch's, with
        ``scale = 1 / k`` for ``k`` accumulated micro-batches)."""
        if not self.enabled or self.model is None:
            return
        if self.freeze is not None and self.tracker is None:
            try:  # every quantizer has its scale by now (calibrated, or from this forward)
                self.start_tracking()
            except RuntimeError:  # a weight quantizer without a scale yet: try again next time
                pass
        lam = self.dampening_at(step)
        if not lam:
            return
        weights = [layer.weight for _, layer in weight_layers(self.model) if layer.weight.requires_grad]
        with torch.enable_grad():
            loss = dampening_loss(self.model)
        self._last_dampen = loss.detach()  # read by stats(): no device sync a step
        if not weights:
            return
        # d(lambda * loss) through the graph: the same float operations as a backward of the loss term
        weight = torch.full((), lam * scale, dtype=loss.dtype, device=loss.device)
        grads = torch.autograd.grad(loss, weights, grad_outputs=weight, allow_unused=True)
        with torch.no_grad():
            for w, g in zip(weights, grads):
                if g is None:
                    continue
                g = g.to(w.dtype)
                if w.grad is None:
                    w.grad = g
                else:
                    w.grad.add_(g)

    def after_step(self, step: int) -> None:
        """Track the codes after optimizer step ``step`` (0-based), freezing from
        :attr:`freeze_from` on; a no-op without freezing (or before the tracker exists)."""
        if self.tracker is not None:
            self.tracker.step(freeze=step >= self.freeze_from)

    def stats(self) -> dict[str, float]:
        """The tracker's :meth:`OscillationTracker.stats` (freezing on) and ``dampen``, the last
        unweighted dampening loss (dampening on, after its first nonzero step)."""
        out: dict[str, float] = {}
        if self.tracker is not None:
            out.update(self.tracker.stats())
        if self._last_dampen is not None:
            out["dampen"] = float(self._last_dampen)
        return out

    def __repr__(self) -> str:
        return (f"OscillationController(dampen={self.dampen}, freeze={self.freeze}, momentum={self.momentum}, "
                f"freeze_start={self.freeze_start})")
