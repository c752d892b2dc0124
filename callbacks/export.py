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

__all__ = ["QuantizedExport", "export_atomically", "check_kquant_formats", "export_quantized"]

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


def check_kquant_formats(model: torch.nn.Module, formats: Sequence[str], where: str = "export") -> bool:
    """Whether the prepared ``model`` holds llama.cpp k-quant weights (:func:`qat.export.gguf.kquant_layers`),
    which export to GGUF only (written from the prepared model, as trained: they have no integer layer).

    Raises:
        QATConfigError: k-quant weights and a format other than ``gguf``, naming a layer, its
            format, and the valid target.

    Example::

        >>> import torch.nn as nn
        >>> from qat import prepare
        >>> net = prepare(nn.Sequential(nn.Linear(256, 32)), "gguf_q4_k")
        >>> check_kquant_formats(net, ["gguf"]), check_kquant_formats(prepare(nn.Sequential(nn.Linear(4, 4)), "w8a8"), ["onnx"])
        (True, False)
        >>> check_kquant_formats(net, ["safetensors", "gguf"])
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: export: layer '0' holds a q4_k weight (llama.cpp k-quant, 1 such layer in all): it exports to GGUF only (formats: [gguf]), got formats ['safetensors', 'gguf']; safetensors / ONNX take the affine presets (w4a8, gguf_q4_0, ...)
    """
    from qat.export.gguf import kquant_layers

    kq = kquant_layers(model)
    if not kq:
        return False
    if [f for f in formats if f != "gguf"]:
        name, fmt = next(iter(kq.items()))
        raise QATConfigError(
            f"{where}: layer {name!r} holds a {fmt} weight (llama.cpp k-quant, {len(kq)} such layer{'s' if len(kq) > 1 else ''} "
            f"in all): it exports to GGUF only (formats: [gguf]), got formats {list(formats)}; safetensors / ONNX take "
            f"the affine presets (w4a8, gguf_q4_0, ...)"
        )
    return True


def export_quantized(
    model: torch.nn.Module,
    formats: Sequence[str],
    dirpath: str,
    example_input: Optional[torch.Tensor] = None,
    tokenizer_dir: Optional[str] = None,
    filename: str = "model",
    where: str = "export",
) -> tuple[dict[str, str], Optional[torch.nn.Module]]:
    """Write a prepared (trained) model in ``formats``, atomically (:func:`export_atomically`): a
    model with llama.cpp k-quant weights straight to GGUF, as trained (its codes and both levels of
    scales, :func:`qat.export.gguf.export_gguf`); any other through ``qat.convert`` first.

    Returns:
        ``(paths, int_model)``: format -> path, and the converted model (``None`` for k-quants).

    Raises:
        QATConfigError: k-quant weights with a format other than ``gguf`` (:func:`check_kquant_formats`),
            or what ``qat.convert`` and the writers raise.

    Example::

        >>> import os, tempfile
        >>> from qat import prepare
        >>> from qat.recipes.digits import DigitsCNN
        >>> net = prepare(DigitsCNN(channels=4), "w8a8").eval()
        >>> _ = net(torch.rand(4, 1, 8, 8))
        >>> paths, int_model = export_quantized(net, ["safetensors"], tempfile.mkdtemp())
        >>> os.path.basename(paths["safetensors"]), type(int_model).__name__
        ('model.safetensors', 'Sequential')
    """
    formats = check_formats(formats)
    if check_kquant_formats(model, formats, where):
        return export_atomically(model, formats, dirpath, None, tokenizer_dir, filename), None
    int_model = convert(model).eval().cpu()  # a converted copy; the trained module is untouched
    return export_atomically(int_model, formats, dirpath, example_input, tokenizer_dir, filename), int_model


class QuantizedExport(Callback):
    """Convert the fake-quantized model (``qat.convert``) at the end of ``fit`` and export it.

    Use it after :class:`~qat.callbacks.QuantizationAwareTraining` in the callback list. The
    LightningModule itself is left as it is (a converted copy is written). The files are written
    atomically (:func:`export_atomically`): an export that fails leaves none behind. A plan with
    llama.cpp k-quant weights (``gguf_q4_k_m``, ...) goes to GGUF as trained, without ``convert``
    (:func:`export_quantized`); with any other format it is refused when ``fit`` starts.

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
            ``module_attr`` the LightningModule does not have; when ``fit`` starts, a k-quant plan
            with a format other than ``gguf``.

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

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        target = self._target(pl_module)
        if is_prepared(target):  # prepared in setup by QuantizationAwareTraining: refuse before any step
            check_kquant_formats(target, self.formats, "QuantizedExport")

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
        dirpath = self.dirpath or os.path.join(trainer.default_root_dir, "quantized")
        try:
            self.paths, _ = export_quantized(target, self.formats, dirpath, self.example_input, self.gguf_tokenizer_dir,
                                             self.filename, "QuantizedExport")
        finally:
            target.train(was_training)
        log.info("QuantizedExport wrote %s", self.paths)
        if self.log_artifact and trainer.loggers:
            plan = getattr(getattr(target, "qat_plan", None), "name", None)
            log_artifact(trainer.loggers, self.paths.values(), f"{self.filename}-quantized", "model",
                         {"formats": list(self.formats), "plan": plan})  # fmt: skip
