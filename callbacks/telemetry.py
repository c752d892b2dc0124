"""`QuantizationTelemetry`: per-layer quantization health, sent to whatever logger the Trainer has."""

from __future__ import annotations

import math
from typing import Optional


from qat import QATConfigError, quant_layers
from qat.size import float_size_bytes, model_size_bytes
from qat.oscillation import weight_codes
from qat.telemetry import quantizer_stats

from .base import Callback
from .loggers import log_histogram
from .qat import target_module

__all__ = ["QuantizationTelemetry"]


class QuantizationTelemetry(Callback):
    """Logs, every ``every_n_steps`` training steps, for each quantized layer and quantizer
    (``weight`` / ``input``): bits, mean scale, clip rate and SQNR (dB); and the model's size as its
    bit-widths say and its compression against float32.

    Keys look like ``qat/net.0/weight/sqnr_db`` and ``qat/model_bytes``. Statistics are measured on
    the batch passing through at that step with the parameters the forward pass used; nothing is
    updated, and on other steps the callback costs nothing.

    Args:
        every_n_steps: measure on global steps that are multiples of this.
        module_attr: the quantized submodule of the LightningModule (as in
            :class:`QuantizationAwareTraining`); the whole module if None.
        histograms: also log, on the same steps, each weight's integer codes and each quantizer's
            scales as histograms (``qat/<layer>/weight/codes``, ``qat/<layer>/<kind>/scale``): W&B
            and TensorBoard histograms; loggers without histograms (CSV) get their min / max /
            mean / std (:func:`qat.callbacks.loggers.log_histogram`).

    Raises:
        QATConfigError: ``every_n_steps`` is not a positive integer; in training, a ``module_attr``
            the LightningModule does not have.

    Example::

        >>> import csv, tempfile
        >>> import pytorch_lightning as pl
        >>> from pytorch_lightning.loggers import CSVLogger
        >>> from qat.callbacks import QuantizationAwareTraining
        >>> from qat.recipes.digits import ClassifierModule, DigitsCNN, DigitsDataModule
        >>> logger = CSVLogger(tempfile.mkdtemp(), name="telemetry")
        >>> trainer = pl.Trainer(max_steps=2, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False, callbacks=[QuantizationAwareTraining("w4a8", module_attr="net"),
        ...                                                             QuantizationTelemetry(every_n_steps=1, module_attr="net")])
        >>> trainer.fit(ClassifierModule(DigitsCNN(channels=4)), DigitsDataModule())
        >>> with open(f"{logger.log_dir}/metrics.csv") as f:
        ...     keys = next(csv.reader(f))
        >>> "qat/0/weight/sqnr_db" in keys, "qat/compression" in keys
        (True, True)
    """

    def __init__(self, every_n_steps: int = 50, module_attr: Optional[str] = None, histograms: bool = True) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise QATConfigError(f"QuantizationTelemetry.every_n_steps must be a positive integer, got {every_n_steps!r}")
        if not isinstance(histograms, bool):
            raise QATConfigError(f"QuantizationTelemetry.histograms must be true or false, got {histograms!r}")
        self.histograms = histograms
        self.every_n_steps = every_n_steps
        self.module_attr = module_attr
        self._handles: list = []
        self._metrics: dict[str, float] = {}

    def _target(self, pl_module):
        return target_module(pl_module, self.module_attr, "QuantizationTelemetry")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        self._metrics = {}
        self._step = trainer.global_step
        for name, layer in quant_layers(self._target(pl_module)):
            for kind, fq in layer.quantizers():
                self._handles.append(fq.register_forward_hook(self._hook(f"qat/{name}/{kind}", fq)))

    def _hook(self, prefix: str, fq):
        def hook(module, args, output):
            if prefix + "/sqnr_db" in self._metrics:
                return None  # first call of this step only (a layer run twice keeps its first)
            for k, v in quantizer_stats(fq, args[0], output).items():
                if math.isfinite(v):
                    self._metrics[f"{prefix}/{k}"] = v
            return None

        return hook

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._handles:
            return
        for h in self._handles:
            h.remove()
        self._handles = []
        target = self._target(pl_module)
        q_bytes = model_size_bytes(target)
        self._metrics["qat/model_bytes"] = float(q_bytes)
        self._metrics["qat/compression"] = float_size_bytes(target) / max(q_bytes, 1)
        # straight to the loggers, at the step measured (self.log would re-send stale step values)
        for logger in trainer.loggers:
            logger.log_metrics(self._metrics, step=self._step)
        if self.histograms and trainer.loggers:
            for name, layer in quant_layers(target):
                for kind, fq in layer.quantizers():
                    log_histogram(trainer.loggers, f"qat/{name}/{kind}/scale", fq.current_qparams()[0], self._step)
                    if kind == "weight":
                        log_histogram(trainer.loggers, f"qat/{name}/weight/codes", weight_codes(layer), self._step)
