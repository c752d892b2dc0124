"""Issue 15: the callback skips a step whose quantizer state went NaN / Inf, and says so in the log."""

import logging

import pytorch_lightning as pl
import pytest
import torch

from qat import QATConfigError, quantizers
from qat.callbacks import QuantizationAwareTraining
from qat.recipes.digits import ClassifierModule, DigitsCNN, DigitsDataModule


class _PoisonAt(pl.Callback):
    """Sets one learned scale to NaN right after optimizer step ``step`` (what a NaN gradient does)."""

    def __init__(self, step):
        self.step = step

    def on_before_zero_grad(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            name, q = next(iter(quantizers(pl_module.net)))
            q.scale.data.fill_(float("nan"))


def _fit(qat_cb, steps=4):
    torch.manual_seed(0)
    model = ClassifierModule(DigitsCNN(channels=4))
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[qat_cb, _PoisonAt(2)])
    trainer.fit(model, DigitsDataModule())
    return model


def test_nan_scale_after_a_step_is_restored_and_logged(caplog):
    cb = QuantizationAwareTraining("w4a8", module_attr="net", calibration_batches=1)
    with caplog.at_level(logging.WARNING, logger="qat.callbacks.qat"):
        model = _fit(cb)
    assert cb.skipped_steps == 1
    assert all(torch.isfinite(q.scale).all() for _, q in quantizers(model.net))
    assert any("non-finite quantizer state" in r.message and "'0'" in r.message for r in caplog.records)


def test_skip_nonfinite_off_checks_nothing(caplog):
    cb = QuantizationAwareTraining("w4a8", module_attr="net", calibration_batches=1, skip_nonfinite=0)
    with caplog.at_level(logging.WARNING, logger="qat.callbacks.qat"):
        _fit(cb)
    assert cb.skipped_steps == 0 and not any("non-finite" in r.message for r in caplog.records)


def test_skip_nonfinite_is_checked():
    with pytest.raises(QATConfigError, match="skip_nonfinite must be a non-negative integer"):
        QuantizationAwareTraining("w8a8", skip_nonfinite=-1)
