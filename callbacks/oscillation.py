"""`OscillationControl`: weight-oscillation dampening and iterative freezing in a Lightning run.

A thin Lightning adapter of :class:`qat.oscillation.OscillationController`, the per-step driver
that :func:`qat.recipes.minilm.distill` runs too: it finds the run's number of optimizer steps,
adds the dampening gradient after every backward, and updates the tracker (freezing) after every
optimizer step. Use it after :class:`~qat.callbacks.QuantizationAwareTraining`, which prepares
the model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

from qat.oscillation import OscillationController, OscillationTracker

from .base import Callback
from .qat import target_module

if TYPE_CHECKING:  # either namespace works at runtime; the hints name pytorch_lightning's
    from pytorch_lightning import LightningModule, Trainer

__all__ = ["OscillationControl"]

_NAME = "OscillationControl"


class OscillationControl(Callback):
    """Dampen and freeze oscillating weights of a quantized model (Nagel et al., ICML 2022).

    Latent weights next to a rounding boundary flip their integer code back and forth from step
    to step. Two fixes, each off by default:

    * Dampening: ``lambda_t * grad(qat.oscillation.dampening_loss)`` is added to the weights'
      ``.grad`` after every backward of the task loss (a callback cannot change the loss), pulling
      every latent weight towards the centre of its quantization bin. ``lambda_t`` rises from 0 to
      ``dampen`` on a cosine over ``trainer.estimated_stepping_batches`` optimizer steps
      (:func:`qat.oscillation.dampening_weight`). With ``accumulate_grad_batches = k`` the term is
      added once per micro-batch divided by ``k``, as Lightning divides the loss, so each
      optimizer step sees it once; under 16-bit AMP it is multiplied by the grad scaler's scale, as
      the task gradient is. It goes in through ``torch.autograd.grad``: no DDP hooks fire, and every
      rank adds the same term to the already reduced gradient.
    * Freezing: after every optimizer step a :class:`qat.oscillation.OscillationTracker` tracks the
      integer code of each quantized weight; a weight whose oscillation frequency (a moving
      average) exceeds ``freeze`` is frozen on its average code for the rest of training.
      ``osc/frozen`` (share of frozen weights) and ``osc/flip_rate`` (share whose code changed at
      the last step) are logged every ``trainer.log_every_n_steps`` optimizer steps. The tracker is
      not saved in checkpoints: after a resume, tracking starts afresh.

    Args:
        dampen: ``lambda_max`` of the dampening regularizer, a number >= 0; 0: off. Needs a finite
            number of steps (``max_steps`` or ``max_epochs``).
        freeze: oscillation-frequency threshold in (0, 1) of iterative freezing; ``None`` or 0: off.
        momentum: momentum of the tracker's moving averages, in (0, 1) (0.99: about the last 100
            steps).
        freeze_start: share of the run's optimizer steps, in [0, 1), that only track before
            freezing begins; with an unbounded run only 0 is allowed.
        module_attr: the quantized submodule of the LightningModule (as
            ``QuantizationAwareTraining(module_attr=...)``); the whole module if None.

    Raises:
        QATConfigError: an argument outside its range (in the constructor); at the start of
            training, a model without weight quantizers or an unbounded run that needs a length.

    Example::

        >>> import pytorch_lightning as pl
        >>> from qat.callbacks import QuantizationAwareTraining
        >>> from qat.recipes.digits import ClassifierModule, DigitsCNN, DigitsDataModule
        >>> osc = OscillationControl(dampen=1e-3, freeze=0.015, freeze_start=0.1, module_attr="net")
        >>> trainer = pl.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False,
        ...                      callbacks=[QuantizationAwareTraining("w4a8", module_attr="net", calibration_batches=2), osc])
        >>> trainer.fit(ClassifierModule(DigitsCNN(channels=4)), DigitsDataModule())
        >>> osc.tracker.steps, sorted(osc.stats())
        (4, ['dampen', 'flip_rate', 'frozen', 'osc_freq', 'osc_rate', 'steps'])
        >>> OscillationControl(freeze=1.5)
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: OscillationControl.freeze must be a number in (0, 1), or 0 / None (off), got 1.5

    On MiniLM W4A8 (2000 distillation steps) ``dampen=1e-3, freeze=0.015`` raised the held-out
    cosine from 0.99633 to 0.99662.
    """

    def __init__(
        self,
        dampen: float = 0.0,
        freeze: Optional[float] = None,
        momentum: float = 0.99,
        freeze_start: float = 0.0,
        *,
        module_attr: Optional[str] = None,
    ) -> None:
        self.controller = OscillationController(dampen, freeze, momentum, freeze_start, arg_prefix=f"{_NAME}.")
        self.module_attr = module_attr
        self._last_step: Optional[int] = None  # global_step at the last on_train_batch_end

    @property
    def dampen(self) -> float:
        """``lambda_max`` of the dampening (0: off)."""
        return self.controller.dampen

    @property
    def freeze(self) -> Optional[float]:
        """The freezing threshold (``None``: off)."""
        return self.controller.freeze

    @property
    def tracker(self) -> Optional[OscillationTracker]:
        """The run's tracker (freezing on, from the first backward on)."""
        return self.controller.tracker

    def dampening_at(self, step: int) -> float:
        """The dampening weight at optimizer step ``step`` (0-based) of the current run."""
        return self.controller.dampening_at(step)

    def stats(self) -> dict[str, float]:
        """:meth:`qat.oscillation.OscillationController.stats`: frozen share, flip rate, last dampening loss, ..."""
        return self.controller.stats()

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.controller.enabled:
            return
        total = trainer.estimated_stepping_batches
        self.controller.begin(
            target_module(pl_module, self.module_attr, _NAME),
            total if total is not None and math.isfinite(total) else None,
            unbounded_hint="trainer.estimated_stepping_batches is infinite: set Trainer(max_steps=...) or max_epochs",
        )
        self._last_step = trainer.global_step

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.controller.enabled or not pl_module.training:
            return
        scale = 1.0
        if pl_module.automatic_optimization:  # Lightning divides each micro-batch's loss by k
            scale /= trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # 16-bit AMP: the task gradient is still scaled here
            scale *= float(scaler.get_scale())
        self.controller.after_backward(trainer.global_step, scale)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if self.controller.freeze is None:
            return
        step = trainer.global_step
        stepped = self._last_step is not None and step > self._last_step  # an optimizer step ran
        self._last_step = step
        if not stepped or self.controller.tracker is None:
            return
        self.controller.after_step(step - 1)  # step - 1: the index of the step just taken
        every = max(1, int(getattr(trainer, "log_every_n_steps", 50) or 1))
        if (step - 1) % every == 0:
            st = self.controller.tracker.stats()
            pl_module.log("osc/frozen", st["frozen"], on_step=True, on_epoch=False)
            pl_module.log("osc/flip_rate", st["flip_rate"], on_step=True, on_epoch=False)
