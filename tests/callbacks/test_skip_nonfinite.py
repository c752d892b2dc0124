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


def test_nan_at_the_last_step_is_reported_at_train_end(caplog):
    cb = QuantizationAwareTraining("w4a8", module_attr="net", calibration_batches=1)
    with caplog.at_level(logging.WARNING, logger="qat.callbacks.qat"):
        model = _fit(cb, steps=3)  # poisoned after optimizer step 2, the last one: read in on_train_end
    assert cb.skipped_steps == 1 and cb._pending == []
    assert all(torch.isfinite(q.scale).all() for _, q in quantizers(model.net))


def test_per_step_check_restores_on_the_device_and_reports_one_check_later():
    """The hook's restore needs no host read of the verdict: the state is finite again right after the
    check, and the skipped step is counted (and the optimizer's moments dropped) when the verdict is read."""
    torch.manual_seed(0)
    model = ClassifierModule(DigitsCNN(channels=4))
    cb = QuantizationAwareTraining("w4a8", module_attr="net", calibration_batches=1)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb])
    trainer.fit(model, DigitsDataModule())
    name, q = next(iter(quantizers(model.net)))
    before = q.scale.detach().clone()
    cb._state_views = None  # as on_train_start does
    cb._restore_nonfinite(model)  # a finite state: the snapshot to restore from
    assert torch.equal(q.scale.detach(), before)
    q.scale.data.fill_(float("nan"))
    cb._restore_nonfinite(model)
    assert torch.equal(q.scale.detach(), before) and cb.skipped_steps == 0 and len(cb._pending) == 2
    cb._report_pending(trainer, model)
    assert cb.skipped_steps == 1 and cb._pending == []


def test_check_nonfinite_reads_its_verdict_at_once():
    torch.manual_seed(0)
    model = ClassifierModule(DigitsCNN(channels=4))
    cb = QuantizationAwareTraining("w4a8", module_attr="net", calibration_batches=1)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb])
    trainer.fit(model, DigitsDataModule())
    assert cb.check_nonfinite(trainer, model) == {}
    name, q = next(iter(quantizers(model.net)))
    before = q.scale.detach().clone()
    q.scale.data.fill_(float("nan"))
    assert cb.check_nonfinite(trainer, model) == {name: ["scale"]}
    assert torch.equal(q.scale.detach(), before) and cb.skipped_steps == 1 and cb._pending == []
