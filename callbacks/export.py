"""`QuantizedExport`: write the trained quantized model as real integer files when ``fit`` ends."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from qat import QATConfigError, convert, is_prepared
from qat.export.formats import check_formats, export_formats

from .base import Callback
from .loggers import log_artifact
from .qat import target_module

if TYPE_CHECKING:  # either namespace works at runtime; the hints name pytorch_lightning's
    from pytorch_lightning import LightningModule, Trainer

__all__ = ["QuantizedExport", "export_atomically"]

log = logging.getLogger(__name__)


def export_atomically(
    int_model: torch.nn.Module,
    formats: Sequence[str],
    dirpath: str,
    example_input: Optional[torch.Tensor] = None,
    tokenizer_dir: Optional[str] = None,
    filename: str = "model",
) -> dict[str, str]:
    """:func:`qat.export.formats.export_formats` all at once or not at all: every file is written to
    a temporary directory inside ``dirpath``, then renamed into place (``os.replace``); on any
    error the temporary directory is removed and ``dirpath`` keeps what it held before.

    Returns:
        format -> path in ``dirpath``.

    Example::

        >>> import os, tempfile
        >>> from qat import convert, prepare
        >>> from qat.recipes.digits import DigitsCNN
        >>> net = prepare(DigitsCNN(channels=4), "w8a8").eval()
        >>> _ = net(torch.rand(4, 1, 8, 8))
        >>> out = tempfile.mkdtemp()
        >>> paths = export_atomically(convert(net), ["safetensors"], out)
        >>> sorted(os.listdir(out))
        ['model.safetensors']
    """
    import shutil
    import tempfile

    os.makedirs(dirpath, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{filename}-export-", dir=dirpath)
    try:
        written = export_formats(int_model, formats, tmp, example_input, tokenizer_dir, filename)
        names = sorted(os.listdir(tmp))  # the files of every format (an ONNX external-data file too)
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(dirpath, name))
        return {fmt: os.path.join(dirpath, os.path.basename(p)) for fmt, p in written.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class QuantizedExport(Callback):
    """Convert the fake-quantized model (``qat.convert``) at the end of ``fit`` and export it.

    Use it after :class:`~qat.callbacks.QuantizationAwareTraining` in the callback list. The
    LightningModule itself is left as it is (a converted copy is written). The files are written
    atomically (:func:`export_atomically`): an export that fails leaves none behind.

    Args:
        dirpath: the directory to write ``<filename>.safetensors`` / ``.onnx`` / ``.gguf`` to
            (default: ``<trainer.default_root_dir>/quantized``).
        formats: any of ``"safetensors"`` (packed checkpoint), ``"onnx"``, ``"gguf"`` (BERT models).
        module_attr: export ``getattr(pl_module, module_attr)`` (the quantized network), as in
            ``QuantizationAwareTraining(module_attr=...)``; default the LightningModule.
        example_input: a tensor to trace for ONNX; default the first tensor of the first training
            batch (one sample).
        filename: the files' stem.
        gguf_tokenizer_dir: the tokenizer directory for GGUF.
        log_artifact: also log the written files as one model artifact (``<filename>-quantized``,
            with the formats and the plan as metadata) to every W&B logger of the Trainer
            (:func:`qat.callbacks.loggers.log_artifact`); other loggers keep the files on disk.

    Raises:
        QATConfigError: an unknown format; at the end of ``fit``, a model that is not prepared or a
            ``module_attr`` the LightningModule does not have.

    Example::

        >>> import os, tempfile
        >>> import pytorch_lightning as pl
        >>> from qat.callbacks import QuantizationAwareTraining
        >>> from qat.recipes.digits import ClassifierModule, DigitsCNN, DigitsDataModule
        >>> out = tempfile.mkdtemp()
        >>> export = QuantizedExport(out, formats=["safetensors"], module_attr="net")
        >>> trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False,
        ...                      callbacks=[QuantizationAwareTraining("w8a8", module_attr="net"), export])
        >>> trainer.fit(ClassifierModule(DigitsCNN(channels=4)), DigitsDataModule())
        >>> sorted(export.paths), os.path.basename(export.paths["safetensors"])
        (['safetensors'], 'model.safetensors')
    """

    def __init__(
        self,
        dirpath: Optional[str] = None,
        formats: Sequence[str] = ("safetensors", "onnx"),
        *,
        module_attr: Optional[str] = None,
        example_input: Optional[torch.Tensor] = None,
        filename: str = "model",
        gguf_tokenizer_dir: Optional[str] = None,
        log_artifact: bool = True,
    ) -> None:
        formats = check_formats(formats)
        if not isinstance(log_artifact, bool):
            raise QATConfigError(f"QuantizedExport.log_artifact must be true or false, got {log_artifact!r}")
        self.log_artifact = log_artifact
        self.dirpath = dirpath
        self.formats = formats
        self.module_attr = module_attr
        self.example_input = example_input
        self.filename = filename
        self.gguf_tokenizer_dir = gguf_tokenizer_dir
        self.paths: dict[str, str] = {}

    def _target(self, pl_module: LightningModule) -> torch.nn.Module:
        return target_module(pl_module, self.module_attr, "QuantizedExport")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.example_input is None and "onnx" in self.formats:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            if isinstance(x, torch.Tensor):
                self.example_input = x[:1].detach().cpu().clone()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        target = self._target(pl_module)
        if not is_prepared(target):
            raise QATConfigError(
                "QuantizedExport: the model is not prepared for QAT at the end of fit; add QuantizationAwareTraining "
                "(with the same module_attr) before QuantizedExport in the callback list"
            )
        if not trainer.is_global_zero:
            return
        was_training = target.training
        target.eval()
        int_model = convert(target)  # a converted copy; the trained module is untouched
        int_model = int_model.eval().cpu()
        dirpath = self.dirpath or os.path.join(trainer.default_root_dir, "quantized")
        self.paths = export_atomically(int_model, self.formats, dirpath, self.example_input, self.gguf_tokenizer_dir, self.filename)
        target.train(was_training)
        log.info("QuantizedExport wrote %s", self.paths)
        if self.log_artifact and trainer.loggers:
            plan = getattr(getattr(target, "qat_plan", None), "name", None)
            log_artifact(trainer.loggers, self.paths.values(), f"{self.filename}-quantized", "model",
                         {"formats": list(self.formats), "plan": plan})  # fmt: skip
