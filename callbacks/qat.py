"""`QuantizationAwareTraining`: the Lightning callback that drives the QAT lifecycle.

It owns no math: it prepares the model (``qat.prepare``) in ``setup()``, before optimizers exist,
so learned scales are trained; optionally calibrates observers on training batches; freezes
observers and BatchNorm statistics on a step / epoch schedule; keeps observers still during
validation and test; optionally dampens and freezes oscillating weights (:mod:`qat.oscillation`);
and saves its schedule state in the checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Mapping, Optional, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from qat import QATConfigError, QuantPlan, init_smoothing, is_prepared, load_plan, prepare, quantizers, smooth_inputs
from qat.oscillation import OscillationTracker, dampening_loss, dampening_weight, weight_layers
from qat.prepare import freeze_bn_stats

__all__ = ["QuantizationAwareTraining"]

log = logging.getLogger(__name__)

PlanLike = Union[str, os.PathLike, Mapping, QuantPlan]


def _default_forward(module: torch.nn.Module, batch: Any) -> Any:
    """Run a batch through the module: ``(x, y)`` -> ``module(x)``; dict -> ``module(**batch)``."""
    if isinstance(batch, (list, tuple)):
        return module(batch[0])
    if isinstance(batch, Mapping):
        return module(**batch)
    return module(batch)


def _check_schedule(name: str, value: Optional[int]) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise QATConfigError(f"QuantizationAwareTraining.{name} must be a non-negative integer or None, got {value!r}")
    return value


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_oscillation(dampen: Any, freeze: Any, momentum: Any, freeze_start: Any) -> None:
    """Validate the ``osc_*`` arguments (QATConfigError naming the field and its valid range)."""
    name = "QuantizationAwareTraining"
    if not _is_number(dampen) or dampen < 0:
        raise QATConfigError(f"{name}.osc_dampen must be a number >= 0 (0: off), got {dampen!r}")
    if freeze is not None and (not _is_number(freeze) or not 0.0 < freeze < 1.0):
        raise QATConfigError(f"{name}.osc_freeze must be a number in (0, 1) or None (off), got {freeze!r}")
    if not _is_number(momentum) or not 0.0 < momentum < 1.0:
        raise QATConfigError(f"{name}.osc_momentum must be a number in (0, 1), got {momentum!r}")
    if not _is_number(freeze_start) or not 0.0 <= freeze_start < 1.0:
        raise QATConfigError(f"{name}.osc_freeze_start must be a number in [0, 1), got {freeze_start!r}")


class QuantizationAwareTraining(Callback):
    """Quantization-aware training in one line.

    Args:
        plan: a preset name (``"w8a8"``, ``"w4a8"``, ``"w4a4"``, ``"w2a2"``, ...), a YAML path, a
            dict / ``DictConfig``, or a :class:`qat.QuantPlan`.
        module_attr: quantize ``getattr(pl_module, module_attr)`` instead of the whole
            LightningModule (e.g. ``"student"`` when a frozen teacher must stay in float).
        calibration_batches: run this many training batches through the model (eval mode, no
            gradients) before the first step, so observers start from real ranges and learned
            scales start from calibrated ones.
        freeze_observers_step / freeze_observers_epoch: stop updating observer ranges from this
            global step / epoch on (give at most one).
        freeze_bn_step / freeze_bn_epoch: freeze BatchNorm running statistics from this global
            step / epoch on (give at most one).
        forward_fn: ``(module, batch) -> output`` for calibration; by default ``module(batch[0])``
            for tuples, ``module(**batch)`` for dicts, ``module(batch)`` otherwise.
        fold_bn: fold each BatchNorm2d that follows a quantized Conv2d into the conv weight before
            weight fake-quant (``QuantConvBn2d``), so the quantized weights are the ones a folded
            deployment model holds; pair it with ``freeze_bn_epoch`` / ``freeze_bn_step`` and
            convert with ``qat.fold_bn`` after training.
        smooth_alpha: per-input-channel smoothing of the quantized Linear layers
            (:func:`qat.smooth_inputs`, SmoothQuant / AWQ-style) with this migration strength,
            computed from the calibration batches just before calibrating; ``None``: off. Needs
            ``calibration_batches``.
        smooth_match: glob on the layer names to smooth (default all quantized Linear layers).
        smooth_learnable: train the smoothing factors with the model (they exist from ``setup``
            on, so ``configure_optimizers`` sees them).
        osc_dampen: ``lambda_max`` of the oscillation-dampening regularizer
            (:func:`qat.oscillation.dampening_loss`, Nagel et al. 2022), which pulls every latent
            weight towards the centre of its quantization bin; 0 (default): off. ``lambda`` rises from
            0 to ``osc_dampen`` on a cosine over ``trainer.estimated_stepping_batches`` optimizer
            steps (``lambda_t = osc_dampen * (1 - cos(pi * t / (T - 1))) / 2``, as
            ``recipes.minilm.distill``). A callback cannot change the loss, so the regularizer's
            gradient is added to the weights' ``.grad`` in ``on_after_backward``, after every
            backward of the task loss: with ``accumulate_grad_batches = k`` it is added once per
            micro-batch, divided by ``k`` like Lightning divides the loss, so each optimizer step
            sees ``lambda_t * grad(dampening_loss)`` once, whatever ``k`` (under 16-bit AMP it is
            multiplied by the grad scaler's scale, as the task gradient is). It goes in through
            ``torch.autograd.grad`` (no DDP hooks fire; every rank adds the same term to the already
            reduced gradient). Needs a finite number of steps (``max_steps`` or ``max_epochs``).
        osc_freeze: oscillation-frequency threshold in (0, 1) of iterative weight freezing
            (:class:`qat.oscillation.OscillationTracker`): after every optimizer step the integer
            code of each quantized weight is tracked, and a weight whose oscillation frequency
            (moving average) exceeds it is frozen on its average code for the rest of training.
            ``None`` (default): off. ``osc/frozen`` (share of frozen weights) and ``osc/flip_rate``
            (share whose code changed at the last step) are logged every
            ``trainer.log_every_n_steps`` optimizer steps. The tracker's state is not saved in
            checkpoints: after a resume, tracking starts afresh.
        osc_momentum: momentum of the tracker's moving averages, in (0, 1) (0.99: about the last 100
            steps).
        osc_freeze_start: share of the training's optimizer steps (of
            ``trainer.estimated_stepping_batches``), in [0, 1), that only track before freezing
            begins; with an unbounded run (no ``max_steps`` / ``max_epochs``) only 0 is allowed.

    Example::

        from pytorch_lightning import Trainer
        from qat.callbacks import QuantizationAwareTraining

        trainer = Trainer(callbacks=[QuantizationAwareTraining("w4a8", freeze_observers_epoch=3)])
        trainer.fit(model, datamodule)

        # with oscillation dampening and freezing (MiniLM W4A8, 2000 steps: held-out cosine 0.99633 -> 0.99662)
        qat = QuantizationAwareTraining("w4a8", osc_dampen=1e-3, osc_freeze=0.015, osc_freeze_start=0.1)
        Trainer(max_steps=2000, callbacks=[qat]).fit(model, datamodule)
        qat.oscillation_tracker.stats()   # {'frozen': 0.146, 'flip_rate': ..., ...}
    """

    def __init__(
        self,
        plan: PlanLike = "w8a8",
        *,
        module_attr: Optional[str] = None,
        calibration_batches: int = 0,
        freeze_observers_step: Optional[int] = None,
        freeze_observers_epoch: Optional[int] = None,
        freeze_bn_step: Optional[int] = None,
        freeze_bn_epoch: Optional[int] = None,
        forward_fn: Optional[Callable[[torch.nn.Module, Any], Any]] = None,
        fold_bn: bool = False,
        smooth_alpha: Optional[float] = None,
        smooth_match: str = "*",
        smooth_learnable: bool = False,
        osc_dampen: float = 0.0,
        osc_freeze: Optional[float] = None,
        osc_momentum: float = 0.99,
        osc_freeze_start: float = 0.0,
    ) -> None:
        self.plan = load_plan(plan)
        _check_oscillation(osc_dampen, osc_freeze, osc_momentum, osc_freeze_start)
        self.osc_dampen = float(osc_dampen)
        self.osc_freeze = None if osc_freeze is None else float(osc_freeze)
        self.osc_momentum = float(osc_momentum)
        self.osc_freeze_start = float(osc_freeze_start)
        self.oscillation_tracker: Optional[OscillationTracker] = None
        self._osc_total_steps: Optional[float] = None  # trainer.estimated_stepping_batches
        self._osc_freeze_from = 0
        self._osc_last_step: Optional[int] = None  # global_step at the last on_train_batch_end
        if smooth_alpha is not None:
            if isinstance(smooth_alpha, bool) or not isinstance(smooth_alpha, (int, float)) or not 0.0 <= smooth_alpha <= 1.0:
                raise QATConfigError(f"QuantizationAwareTraining.smooth_alpha must be a number in [0, 1] or None, got {smooth_alpha!r}")
            if not calibration_batches:
                raise QATConfigError("QuantizationAwareTraining.smooth_alpha needs calibration_batches > 0 (the statistics come from them)")
        self.smooth_alpha = smooth_alpha
        self.smooth_match = smooth_match
        self.smooth_learnable = bool(smooth_learnable)
        if not isinstance(fold_bn, bool):
            raise QATConfigError(f"QuantizationAwareTraining.fold_bn must be true or false, got {fold_bn!r}")
        self.fold_bn = fold_bn
        self.module_attr = module_attr
        self.calibration_batches = _check_schedule("calibration_batches", calibration_batches) or 0
        self.freeze_observers_step = _check_schedule("freeze_observers_step", freeze_observers_step)
        self.freeze_observers_epoch = _check_schedule("freeze_observers_epoch", freeze_observers_epoch)
        self.freeze_bn_step = _check_schedule("freeze_bn_step", freeze_bn_step)
        self.freeze_bn_epoch = _check_schedule("freeze_bn_epoch", freeze_bn_epoch)
        for what in ("observers", "bn"):
            if getattr(self, f"freeze_{what}_step") is not None and getattr(self, f"freeze_{what}_epoch") is not None:
                raise QATConfigError(
                    f"QuantizationAwareTraining: give freeze_{what}_step or freeze_{what}_epoch, not both"
                )
        self.forward_fn = forward_fn or _default_forward
        self.observers_frozen = False
        self.bn_frozen = False
        self.calibrated = False
        self._observer_state: dict[str, bool] = {}

    # ------------------------------------------------------------------ helpers
    def target(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        """The module that is quantized."""
        if self.module_attr is None:
            return pl_module
        if not hasattr(pl_module, self.module_attr):
            children = [n for n, _ in pl_module.named_children()]
            raise QATConfigError(
                f"QuantizationAwareTraining.module_attr={self.module_attr!r}: the LightningModule has no such attribute; "
                f"its submodules are {children}"
            )
        return getattr(pl_module, self.module_attr)

    def _set_observers(self, pl_module, enabled: bool) -> None:
        for _, q in quantizers(self.target(pl_module)):
            # a quantizer that never saw data must observe once, or it has no range at all
            q.enable_observer(enabled or not q.is_initialized)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = self.target(pl_module)
        if is_prepared(target):
            return  # fit twice, or validate after fit: already prepared
        prepare(target, self.plan, fold_bn=self.fold_bn)
        if self.smooth_alpha is not None:  # identity until calibrate() fills it; here before the optimizer exists
            init_smoothing(target, self.smooth_match, learnable=self.smooth_learnable)
        if self._oscillation_on:
            weight_layers(target)  # QATConfigError now if the plan quantizes no weights
        n = sum(1 for _ in quantizers(target))
        log.info("QAT: prepared %d layers with %d quantizers (plan %r)", len(target.qat_layers), n, self.plan.name)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._apply_schedule(trainer, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.calibration_batches and not self.calibrated:
            self.calibrate(trainer, pl_module)
        if self._oscillation_on:
            self._osc_setup(trainer)

    @torch.no_grad()
    def calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Observe ``calibration_batches`` training batches, then load learned scales from them."""
        loader = trainer.train_dataloader
        if loader is None:
            raise QATConfigError("QuantizationAwareTraining.calibration_batches needs a training dataloader")
        target = self.target(pl_module)
        run = target if self.module_attr else pl_module
        was_training = target.training
        target.eval()
        batches = []
        for batch in loader:
            if len(batches) >= self.calibration_batches:
                break
            batches.append(trainer.strategy.batch_to_device(batch))
        if self.smooth_alpha is not None:
            smooth_inputs(target, batches, alpha=self.smooth_alpha, match=self.smooth_match, learnable=self.smooth_learnable,
                          reset_ranges=True, forward_fn=lambda _m, b: self.forward_fn(run, b))
        for _, q in quantizers(target):
            q.enable_observer(True)
        seen = 0
        for batch in batches:
            self.forward_fn(run, batch)
            seen += 1
        for _, q in quantizers(target):
            q.load_from_observer()
        target.train(was_training)
        self.calibrated = True
        log.info("QAT: calibrated observers on %d batches", seen)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._apply_schedule(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._apply_schedule(trainer, pl_module)
        if self.bn_frozen:
            freeze_bn_stats(self.target(pl_module))  # Module.train() at epoch start undoes it

    def _apply_schedule(self, trainer, pl_module) -> None:
        step, epoch = trainer.global_step, trainer.current_epoch
        if not self.observers_frozen and (
            (self.freeze_observers_step is not None and step >= self.freeze_observers_step)
            or (self.freeze_observers_epoch is not None and epoch >= self.freeze_observers_epoch)
        ):
            self.observers_frozen = True
            log.info("QAT: observers frozen at step %d, epoch %d", step, epoch)
        if not self.bn_frozen and (
            (self.freeze_bn_step is not None and step >= self.freeze_bn_step)
            or (self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch)
        ):
            self.bn_frozen = True
            log.info("QAT: BatchNorm statistics frozen at step %d, epoch %d", step, epoch)
        self._set_observers(pl_module, not self.observers_frozen)
        if self.bn_frozen:
            freeze_bn_stats(self.target(pl_module))

    # ------------------------------------------------------------------ oscillations
    @property
    def _oscillation_on(self) -> bool:
        return self.osc_dampen > 0 or self.osc_freeze is not None

    def _osc_setup(self, trainer) -> None:
        """Total optimizer steps (for the dampening ramp) and the step freezing starts at."""
        total = trainer.estimated_stepping_batches
        finite = total is not None and math.isfinite(total)
        if not finite and self.osc_dampen > 0:
            raise QATConfigError(
                "QuantizationAwareTraining.osc_dampen needs a finite number of training steps for its cosine ramp "
                "(trainer.estimated_stepping_batches is infinite): set Trainer(max_steps=...) or max_epochs"
            )
        if not finite and self.osc_freeze is not None and self.osc_freeze_start != 0:
            raise QATConfigError(
                f"QuantizationAwareTraining.osc_freeze_start={self.osc_freeze_start} is a share of the training's steps, "
                "but trainer.estimated_stepping_batches is infinite: set Trainer(max_steps=...) or max_epochs, "
                "or osc_freeze_start=0 (freeze from the start)"
            )
        self._osc_total_steps = float(total) if finite else None
        self._osc_freeze_from = int(self.osc_freeze_start * total) if finite else 0
        self._osc_last_step = trainer.global_step

    def osc_lambda(self, step: int) -> float:
        """The dampening weight at optimizer step ``step`` (0-based): a cosine ramp from 0 to ``osc_dampen``."""
        if not self.osc_dampen or self._osc_total_steps is None:
            return 0.0
        return dampening_weight(self.osc_dampen, step, self._osc_total_steps)

    def on_after_backward(self, trainer, pl_module) -> None:
        if not self._oscillation_on or not pl_module.training:
            return
        target = self.target(pl_module)
        if self.osc_freeze is not None and self.oscillation_tracker is None:
            try:  # the first backward: every quantizer has its scale (calibrated, or from this forward)
                self.oscillation_tracker = OscillationTracker(target, self.osc_momentum, self.osc_freeze)
            except RuntimeError:  # a weight quantizer without a scale yet: try again after the next backward
                pass
        lam = self.osc_lambda(trainer.global_step)
        if not lam:
            return
        weights = [layer.weight for _, layer in weight_layers(target) if layer.weight.requires_grad]
        if not weights:
            return
        scale = lam
        if pl_module.automatic_optimization:  # Lightning divides each micro-batch's loss by k
            scale /= trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # 16-bit AMP: the task gradient is still scaled here
            scale *= float(scaler.get_scale())
        with torch.enable_grad():
            loss = dampening_loss(target)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
        with torch.no_grad():
            for w, g in zip(weights, grads):
                if g is None:
                    continue
                g = g.to(w.dtype).mul_(scale)
                if w.grad is None:
                    w.grad = g
                else:
                    w.grad.add_(g)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.osc_freeze is None:
            return
        step = trainer.global_step
        stepped = self._osc_last_step is not None and step > self._osc_last_step  # an optimizer step ran
        self._osc_last_step = step
        if not stepped or self.oscillation_tracker is None:
            return
        tracker = self.oscillation_tracker
        tracker.step(freeze=step - 1 >= self._osc_freeze_from)  # step - 1: the index of the step just taken
        every = max(1, int(getattr(trainer, "log_every_n_steps", 50) or 1))
        if (step - 1) % every == 0:
            st = tracker.stats()
            pl_module.log("osc/frozen", st["frozen"], on_step=True, on_epoch=False)
            pl_module.log("osc/flip_rate", st["flip_rate"], on_step=True, on_epoch=False)

    # evaluation never moves the ranges learned in training
    def _eval_start(self, trainer, pl_module) -> None:
        self._set_observers(pl_module, False)

    def _eval_end(self, trainer, pl_module) -> None:
        self._set_observers(pl_module, not self.observers_frozen)

    on_validation_start = _eval_start
    on_test_start = _eval_start
    on_predict_start = _eval_start
    on_validation_end = _eval_end
    on_test_end = _eval_end
    on_predict_end = _eval_end

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "observers_frozen": self.observers_frozen,
            "bn_frozen": self.bn_frozen,
            "calibrated": self.calibrated,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = QuantPlan.from_dict(state_dict["plan"])
        if saved != self.plan:
            raise QATConfigError(
                f"QuantizationAwareTraining: the checkpoint was trained with plan {saved.name!r} "
                f"but this callback has plan {self.plan.name!r}; pass the same plan to resume"
            )
        self.observers_frozen = bool(state_dict["observers_frozen"])
        self.bn_frozen = bool(state_dict["bn_frozen"])
        self.calibrated = bool(state_dict.get("calibrated", False))
