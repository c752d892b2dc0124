"""`QuantizationAwareTraining`: the Lightning callback that drives the QAT lifecycle.

It owns no math: it prepares the model (``qat.prepare``, smoothing included) in ``setup()``,
before optimizers exist, so learned scales are trained; optionally calibrates observers (and fits
the smoothing factors) on training batches; freezes observers and BatchNorm statistics on a step /
epoch schedule; keeps observers still during validation and test; and saves its schedule state in
the checkpoint. Oscillation control is its own callback, :class:`qat.callbacks.OscillationControl`.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Union

import torch

from qat import QATConfigError, QuantPlan, is_prepared, load_plan, prepare, quantizers
from qat.prepare import freeze_bn_stats, init_weight_quantizers
from qat.ptq import default_forward
from qat.smooth import SmoothingLike, SmoothingSpec, fit_smoothing

from .base import Callback
from .loggers import log_hparams, plan_hparams

if TYPE_CHECKING:  # either namespace works at runtime; the hints name pytorch_lightning's
    from pytorch_lightning import LightningModule, Trainer

__all__ = ["QuantizationAwareTraining", "target_module"]

log = logging.getLogger(__name__)

# The mapping comes first: jsonargparse (LightningCLI) tries a Union's types in order, and with
# ``str`` first an inline YAML mapping would be turned into its string form.
PlanLike = Union[Mapping[str, Any], str, os.PathLike, QuantPlan]


def target_module(pl_module: LightningModule, module_attr: Optional[str], owner: str) -> torch.nn.Module:
    """The module a callback works on: ``getattr(pl_module, module_attr)``, or ``pl_module`` itself.

    Args:
        pl_module: the LightningModule.
        module_attr: the attribute holding the quantized network; ``None``: the whole module.
        owner: the callback's name, for the error message.

    Raises:
        QATConfigError: ``pl_module`` has no attribute ``module_attr`` (the message lists its submodules).

    Example::

        >>> import pytorch_lightning as pl, torch.nn as nn
        >>> module = pl.LightningModule()
        >>> module.net = nn.Linear(2, 2)
        >>> target_module(module, "net", "MyCallback")
        Linear(in_features=2, out_features=2, bias=True)
        >>> target_module(module, "student", "MyCallback")
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: MyCallback.module_attr='student': the LightningModule has no such attribute; its submodules are ['net']
    """
    if module_attr is None:
        return pl_module
    if not hasattr(pl_module, module_attr):
        children = [n for n, _ in pl_module.named_children()]
        raise QATConfigError(
            f"{owner}.module_attr={module_attr!r}: the LightningModule has no such attribute; its submodules are {children}"
        )
    return getattr(pl_module, module_attr)


def _check_schedule(name: str, value: Optional[int]) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise QATConfigError(f"QuantizationAwareTraining.{name} must be a non-negative integer or None, got {value!r}")
    return value


def _quantizer_state(named: list[tuple[str, torch.nn.Module]]) -> dict[tuple[str, str], torch.Tensor]:
    """(quantizer name, tensor name) -> the quantizer's state tensor (sharing its storage), for the
    ``(name, quantizer)`` pairs of :func:`qat.quantizers`."""
    out: dict[tuple[str, str], torch.Tensor] = {}
    for name, q in named:
        if hasattr(q, "state_tensors"):  # scale, zero_point, alpha (PACT), observer.min_val / max_val
            tensors = q.state_tensors()
        else:
            tensors = {k: getattr(q, k) for k in ("scale", "zero_point", "alpha") if isinstance(getattr(q, k, None), torch.Tensor)}
        for key, t in tensors.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                out[(name, key)] = t.detach()
    return out


def _by_device(state: dict[tuple[str, str], torch.Tensor]) -> dict[Any, tuple[list, list]]:
    """device -> (the state keys on it, their sizes): one concatenation a device per check."""
    keys_by_device: dict[Any, list] = {}
    for key, t in state.items():
        keys_by_device.setdefault(t.device, []).append(key)
    return {dev: (keys, [state[k].numel() for k in keys]) for dev, keys in keys_by_device.items()}


def _nonfinite(keys: list, sizes: list, values: torch.Tensor) -> dict[str, list[str]]:
    """quantizer name -> its non-finite state tensors, from one check's concatenated ``values``
    (one device sync; read only for a check that found some)."""
    parts = values.split(sizes)
    finite = torch.stack([torch.isfinite(t).all() for t in parts]).tolist()
    out: dict[str, list[str]] = {}
    for (name, key), ok in zip(keys, finite):
        if not ok:
            out.setdefault(name, []).append(key)
    return out


def _drop_nonfinite_optimizer_state(trainer: Trainer, model: torch.nn.Module) -> None:
    """Forget the optimizer moments of quantizer parameters that hold NaN / Inf (they would re-poison the state)."""
    params = {id(p) for _, q in quantizers(model) for p in q.parameters()}
    for opt in getattr(trainer, "optimizers", []):
        for p, st in list(opt.state.items()):
            if id(p) in params and any(isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()) for v in st.values()):
                del opt.state[p]


class QuantizationAwareTraining(Callback):
    """Quantization-aware training in one line.

    Lifecycle: ``setup`` prepares the model (:func:`qat.prepare`); the start of fit, once the weights
    are on their device and wrapped by the strategy, initializes the weight quantizers from the
    weights (:func:`qat.init_weight_quantizers`: a compiled model traces its first step with its
    learned weight scales already set, one graph for every step); the start of training calibrates
    (``calibration_batches``); the schedules below freeze observers and BatchNorm statistics.

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
        forward_fn: ``(module, batch) -> output`` for calibration; by default
            :func:`qat.ptq.default_forward` (``module(batch[0])`` for tuples, ``module(**batch)``
            for mappings, ``module(batch)`` otherwise).
        fold_bn: fold each BatchNorm2d that follows a quantized Conv2d into the conv weight before
            weight fake-quant (``QuantConvBn2d``), so the quantized weights are the ones a folded
            deployment model holds; pair it with ``freeze_bn_epoch`` / ``freeze_bn_step`` and
            convert with ``qat.fold_bn`` after training. Passed to :func:`qat.prepare`.
        smooth: per-input-channel smoothing of the quantized Linear layers (SmoothQuant /
            AWQ-style): a :class:`qat.smooth.SmoothingSpec`, an ``alpha`` in [0, 1], or a mapping
            of ``alpha`` / ``match`` / ``learnable``; ``None`` (default): off. Passed to
            :func:`qat.prepare` (identity factors from ``setup`` on, so ``configure_optimizers``
            sees learnable ones) and fitted by :func:`qat.smooth.fit_smoothing` on the
            calibration batches just before calibrating. Needs ``calibration_batches``.
        skip_nonfinite: every this many optimizer steps (default 1: each step), after the step,
            check every quantizer's state (scale, zero point, PACT alpha, observer range) for NaN /
            Inf; where some is not finite, put back the last finite quantizer state, i.e. skip that
            step's update of the quantizers, then drop the optimizer's moments of those parameters
            and log a warning naming the layers. The check and the restore run on the device
            without a sync (a step's verdict is read one check later, when its work has long
            finished, and at the end of training), so they stay off the hot path of a GPU step;
            ``0`` turns it off. :meth:`check_nonfinite` is the synchronous form.
        log_plan: send the plan and each layer's bits to the Trainer's loggers as hyperparameters
            when the model is prepared (:func:`qat.callbacks.loggers.plan_hparams`: ``qat/plan``,
            ``qat/bits/<layer>/weight``, ``qat/avg_weight_bits``, ...).

    Raises:
        QATConfigError: an argument outside its range (before any training), or, in ``setup``,
            a plan that does not fit the model.

    Example::

        >>> import pytorch_lightning as pl
        >>> from qat.recipes.digits import ClassifierModule, DigitsCNN, DigitsDataModule
        >>> model = ClassifierModule(DigitsCNN(channels=4))
        >>> qat = QuantizationAwareTraining("w4a8", module_attr="net", calibration_batches=2, freeze_bn_epoch=3)
        >>> trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False, callbacks=[qat])
        >>> trainer.fit(model, DigitsDataModule())
        >>> type(model.net[0]).__name__, qat.calibrated, qat.bn_frozen
        ('QuantConv2d', True, False)
        >>> QuantizationAwareTraining("w4a8", smooth=0.5)
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: QuantizationAwareTraining.smooth needs calibration_batches > 0 (the smoothing statistics come from them)
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
        smooth: SmoothingLike = None,
        skip_nonfinite: int = 1,
        log_plan: bool = True,
    ) -> None:
        self.plan = load_plan(plan)
        if not isinstance(log_plan, bool):
            raise QATConfigError(f"QuantizationAwareTraining.log_plan must be true or false, got {log_plan!r}")
        self.log_plan = log_plan
        self.smooth = SmoothingSpec.parse(smooth, "QuantizationAwareTraining.smooth")
        if self.smooth is not None and not calibration_batches:
            raise QATConfigError(
                "QuantizationAwareTraining.smooth needs calibration_batches > 0 (the smoothing statistics come from them)"
            )
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
        self.skip_nonfinite = _check_schedule("skip_nonfinite", skip_nonfinite) or 0
        self.forward_fn = forward_fn or default_forward
        self.skipped_steps = 0  # optimizer steps whose quantizer update was undone (non-finite state)
        self._finite_state: Optional[dict[Any, tuple[list, list, torch.Tensor]]] = None
        self._quantizer_cache: Optional[tuple[weakref.ref, list]] = None
        self._pending: list = []  # per-step checks whose verdict the host has not read yet
        self._state_views: Optional[dict] = None  # device -> the quantizer state the per-step check reads (once a fit)
        self.observers_frozen = False
        self.bn_frozen = False
        self.calibrated = False

    # ------------------------------------------------------------------ helpers
    def target(self, pl_module: LightningModule) -> torch.nn.Module:
        """The module that is quantized (:func:`target_module` of ``module_attr``)."""
        return target_module(pl_module, self.module_attr, "QuantizationAwareTraining")

    def _quantizers(self, pl_module) -> list[tuple[str, torch.nn.Module]]:
        """``(name, quantizer)`` pairs of the target, found once per target module (the per-step hooks
        walk this list, not the whole module tree; preparing again, in :meth:`setup`, finds them anew)."""
        target = self.target(pl_module)
        if self._quantizer_cache is None or self._quantizer_cache[0]() is not target:
            self._quantizer_cache = (weakref.ref(target), list(quantizers(target)))
        return self._quantizer_cache[1]

    def _set_observers(self, pl_module, enabled: bool) -> None:
        for _, q in self._quantizers(pl_module):
            # a quantizer that never saw data must observe once, or it has no range at all
            q.enable_observer(enabled or not q.is_initialized)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._quantizer_cache = self._state_views = None  # prepared below, or by the user since the last fit
        target = self.target(pl_module)
        if is_prepared(target):  # fit twice, or validate after fit: already prepared
            if self.smooth is not None and getattr(target, "qat_smoothing", None) is None:
                raise QATConfigError(
                    "QuantizationAwareTraining.smooth: the model was prepared before, without smoothing; prepare it with "
                    "qat.prepare(..., smooth=...) or let the callback prepare it"
                )
            return
        # smoothing: identity factors until calibrate() fits them; here, before the optimizer exists
        prepare(target, self.plan, fold_bn=self.fold_bn, smooth=self.smooth)
        n = sum(1 for _ in quantizers(target))
        log.info("QAT: prepared %d layers with %d quantizers (plan %r)", len(target.qat_layers), n, self.plan.name)
        if self.log_plan and trainer.loggers:
            log_hparams(trainer.loggers, plan_hparams(target, self.plan))

    def on_fit_start(self, trainer, pl_module) -> None:
        n = init_weight_quantizers(self.target(pl_module))
        log.debug("QAT: %d weight quantizers hold a range at the start of fit", n)
        self._apply_schedule(trainer, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        self._state_views = None  # the model is on its device now: the per-step check gathers its state anew
        if self.calibration_batches and not self.calibrated:
            self.calibrate(trainer, pl_module)

    @torch.no_grad()
    def calibrate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Observe ``calibration_batches`` training batches, then load learned scales from them.

        With ``smooth``, the smoothing factors are fitted on the same batches first
        (:func:`qat.smooth.fit_smoothing`). Runs by itself at the start of training.
        """
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
        if getattr(target, "qat_smoothing", None) is not None:  # prepared with smooth=...
            fit_smoothing(target, batches, reset_ranges=True, forward_fn=lambda _m, b: self.forward_fn(run, b))
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

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.skip_nonfinite or trainer.global_step % self.skip_nonfinite:
            return
        self._report_pending(trainer, pl_module)  # the last check's verdict: its work finished a step ago
        self._restore_nonfinite(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._report_pending(trainer, pl_module)

    @torch.no_grad()
    def _restore_nonfinite(self, pl_module) -> None:
        """The per-step check without a device sync: where this step left a quantizer state tensor
        non-finite, the last finite state goes back on the device (``torch.where`` on the
        concatenated state, copied back with one multi-tensor copy: the identity when all is
        finite), and the verdict is copied to the host asynchronously for :meth:`_report_pending`.
        The state tensors are gathered once a fit (:meth:`on_train_start`, after Lightning moved
        the model to its device), so a step costs a handful of launches whatever the model's size."""
        if self._state_views is None:
            state = _quantizer_state(self._quantizers(pl_module))
            self._state_views = {
                dev: (keys, sizes, [state[k].view(-1) for k in keys]) for dev, (keys, sizes) in _by_device(state).items()
            }
        snapshot = self._finite_state or {}
        self._finite_state = {}
        for dev, (keys, sizes, views) in self._state_views.items():
            values = torch.cat(views).float()
            ok = torch.isfinite(values).all()
            prev = snapshot.get(dev)
            restorable = prev is not None and prev[0] == keys and prev[1] == sizes
            good = values
            if restorable:
                good = torch.where(ok, values, prev[2])
                torch._foreach_copy_(views, good.split(sizes))
            self._finite_state[dev] = (keys, sizes, good)
            if ok.is_cuda:
                host = torch.empty((), dtype=torch.bool, pin_memory=True)
                host.copy_(ok, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host, event = ok, None
            self._pending.append((host, event, keys, sizes, values, restorable))

    @torch.no_grad()
    def _report_pending(self, trainer, pl_module) -> dict[str, list[str]]:
        """Read the verdicts of :meth:`_restore_nonfinite`'s last check (waiting on its event only, not on
        the work queued since); for a non-finite one: count the skipped step, drop the optimizer's
        non-finite moments, and log the layers. Returns the non-finite state tensors by quantizer."""
        pending, self._pending = self._pending, []
        out: dict[str, list[str]] = {}
        for host, event, keys, sizes, values, restored in pending:
            if event is not None:
                event.synchronize()
            if bool(host):
                continue
            bad = _nonfinite(keys, sizes, values)
            if restored:
                _drop_nonfinite_optimizer_state(trainer, self.target(pl_module))
            self._log_skipped(trainer, bad, restored)
            for name, tensors in bad.items():
                out.setdefault(name, []).extend(tensors)
        return out

    @torch.no_grad()
    def check_nonfinite(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, list[str]]:
        """Check the quantizers' state now and restore the last finite one where some is NaN / Inf:
        the per-step check of ``skip_nonfinite``, with its verdict read at once (one device sync).
        The state is gathered anew (the model may have moved since the last check), and the
        verdicts of earlier per-step checks are read first. A finite state is kept as the one to
        restore next time.

        Returns:
            quantizer name -> the state tensors that were not finite (empty: all finite).
        """
        self._report_pending(trainer, pl_module)
        self._state_views = None
        self._restore_nonfinite(pl_module)
        return self._report_pending(trainer, pl_module)

    def _log_skipped(self, trainer, bad: dict[str, list[str]], restored: bool) -> None:
        self.skipped_steps += 1
        layers = sorted({name.rsplit(".", 1)[0] for name in bad})
        log.warning(
            "QAT: non-finite quantizer state at step %d in %s (%s); %s",
            trainer.global_step, layers, {n: v for n, v in bad.items()},
            "restored the last finite state (this step's quantizer update skipped)" if restored
            else "no finite state to restore yet",
        )

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
