"""What lightning-qat sends to the Trainer's loggers, and how, for each logger kind.

One owner for the logger-specific calls the callbacks and recipes make:

* :func:`plan_hparams`: the plan and every quantized layer's bits as flat hyperparameters
  (``qat/plan``, ``qat/bits/<layer>/weight``, ``qat/avg_weight_bits``, ...);
* :func:`log_hparams`: hyperparameters to every logger (W&B config, TensorBoard hparams, the CSV
  logger's ``hparams.yaml``);
* :func:`log_histogram`: a histogram (W&B ``wandb.Histogram``, TensorBoard ``add_histogram``; the CSV
  logger keeps its summary: min / max / mean / std as metrics);
* :func:`log_figure`: a matplotlib figure (W&B image, TensorBoard ``add_figure``; the CSV logger
  and any logger with a ``log_dir`` get a PNG file there);
* :func:`log_artifact`: files as a W&B artifact (other loggers: nothing to send, the files are on
  disk already; the call returns False).

Loggers are recognised by class from either Lightning namespace (``pytorch_lightning.loggers`` and
``lightning.pytorch.loggers``); W&B and matplotlib are imported only when used.

Example::

    >>> import torch.nn as nn
    >>> from qat import prepare
    >>> hp = plan_hparams(prepare(nn.Sequential(nn.Linear(8, 4)), "w4a8"))
    >>> hp["qat/plan"], hp["qat/bits/0/weight"], hp["qat/bits/0/input"]
    ('w4a8', 4, 8)
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Optional

import torch

from qat import quant_layers
from qat.size import float_size_bytes, model_size_bytes

from .base import NAMESPACES

__all__ = ["plan_hparams", "log_hparams", "log_histogram", "log_figure", "log_artifact", "logger_kind", "stage_logger_kwargs",
           "close_logger"]

log = logging.getLogger(__name__)


def _logger_classes(name: str) -> tuple[type, ...]:
    out = []
    for ns in NAMESPACES:
        cls = getattr(getattr(ns, "loggers", None), name, None)
        if cls is not None:
            out.append(cls)
    return tuple(out)


_WANDB = _logger_classes("WandbLogger")
_TENSORBOARD = _logger_classes("TensorBoardLogger")
_CSV = _logger_classes("CSVLogger")


def logger_kind(logger: Any) -> str:
    """``"wandb"``, ``"tensorboard"``, ``"csv"`` or ``"other"``.

    Example::

        >>> import tempfile
        >>> from pytorch_lightning.loggers import CSVLogger
        >>> logger_kind(CSVLogger(tempfile.mkdtemp()))
        'csv'
    """
    if _WANDB and isinstance(logger, _WANDB):
        return "wandb"
    if _TENSORBOARD and isinstance(logger, _TENSORBOARD):
        return "tensorboard"
    if _CSV and isinstance(logger, _CSV):
        return "csv"
    return "other"


def plan_hparams(model: torch.nn.Module, plan: Any = None) -> dict[str, Any]:
    """The plan of a prepared ``model`` (``plan``: default the one :func:`qat.prepare` recorded) as
    flat hyperparameters: ``qat/plan`` (its name), per layer
    ``qat/bits/<layer>/weight`` and ``qat/bits/<layer>/input`` (and ``.../granularity``), and the
    model's ``qat/avg_weight_bits``, ``qat/model_bytes`` and ``qat/compression`` against float32."""
    plan = plan if plan is not None else getattr(model, "qat_plan", None)
    name = getattr(plan, "name", None)
    hp: dict[str, Any] = {"qat/plan": name if name is not None else "custom"}
    weight_bits, weights = 0.0, 0
    for lname, layer in quant_layers(model):
        for kind, fq in layer.quantizers():
            hp[f"qat/bits/{lname}/{kind}"] = fq.spec.bits
            hp[f"qat/bits/{lname}/{kind}_granularity"] = fq.spec.granularity.value
            if kind == "weight":
                n = layer.weight.numel()
                weight_bits += fq.spec.bits * n
                weights += n
    hp["qat/layers"] = sum(1 for _ in quant_layers(model))
    if weights:
        hp["qat/avg_weight_bits"] = weight_bits / weights
    q_bytes = model_size_bytes(model)
    hp["qat/model_bytes"] = q_bytes
    hp["qat/compression"] = float_size_bytes(model) / max(q_bytes, 1)
    return hp


def log_hparams(loggers: Iterable[Any], params: dict[str, Any]) -> None:
    """``params`` to every logger's ``log_hyperparams`` (W&B: the run config; TensorBoard: hparams;
    CSV: ``hparams.yaml``)."""
    for logger in loggers:
        logger.log_hyperparams(params)


def log_histogram(loggers: Iterable[Any], key: str, values: torch.Tensor, step: int) -> None:
    """A histogram of ``values`` at ``step``: W&B ``wandb.Histogram``, TensorBoard
    ``add_histogram``; other loggers get ``key/min``, ``key/max``, ``key/mean``, ``key/std``."""
    v = values.detach().float().reshape(-1).cpu()
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return
    for logger in loggers:
        kind = logger_kind(logger)
        if kind == "wandb":
            import wandb

            logger.experiment.log({key: wandb.Histogram(v.numpy()), "trainer/global_step": step})
        elif kind == "tensorboard":
            logger.experiment.add_histogram(key, v, step)
        else:
            std = float(v.std()) if v.numel() > 1 else 0.0
            logger.log_metrics({f"{key}/min": float(v.min()), f"{key}/max": float(v.max()),
                                f"{key}/mean": float(v.mean()), f"{key}/std": std}, step=step)  # fmt: skip


def _log_dir(logger: Any) -> Optional[str]:
    for attr in ("log_dir", "save_dir"):
        d = getattr(logger, attr, None)
        if isinstance(d, str):
            return d
    return None


def log_figure(loggers: Iterable[Any], key: str, figure: Any, step: Optional[int] = None) -> list[str]:
    """A matplotlib ``figure`` under ``key``: a W&B image, a TensorBoard figure, and a PNG file
    ``<log_dir>/<key with / as _>.png`` for every logger with a log directory (CSV, TensorBoard).
    Returns the PNG paths written. The figure is closed afterwards."""
    import matplotlib.pyplot as plt

    paths = []
    try:
        for logger in loggers:
            kind = logger_kind(logger)
            if kind == "wandb":
                import wandb

                logger.experiment.log({key: wandb.Image(figure), **({"trainer/global_step": step} if step is not None else {})})
            elif kind == "tensorboard":
                logger.experiment.add_figure(key, figure, global_step=step, close=False)
            d = _log_dir(logger) if kind != "wandb" else None
            if d is not None:
                os.makedirs(d, exist_ok=True)
                path = os.path.join(d, key.replace("/", "_") + ".png")
                figure.savefig(path, dpi=100, bbox_inches="tight")
                paths.append(path)
    finally:
        plt.close(figure)
    return paths


def log_artifact(loggers: Iterable[Any], paths: Iterable[str], name: str, kind: str = "model",
                 metadata: Optional[dict] = None) -> bool:
    """The files ``paths`` as one W&B artifact ``name`` of type ``kind`` (every W&B logger);
    returns whether one was logged (other loggers keep the files where they are)."""
    paths = [p for p in paths if os.path.isfile(p)]
    logged = False
    for logger in loggers:
        if logger_kind(logger) != "wandb" or not paths:
            continue
        import wandb

        art = wandb.Artifact(name, type=kind, metadata=metadata or {})
        for p in paths:
            art.add_file(p)
        logger.experiment.log_artifact(art)
        logged = True
    return logged


def stage_logger_kwargs(target: str, stage: str, group: str) -> dict[str, Any]:
    """Keyword arguments that keep one stage (``fp``, ``qat``) of a run apart in a logger whose class
    path is ``target``: W&B, a run of its own in the W&B group ``group`` with ``job_type=stage``;
    TensorBoard and CSV, the version folder ``stage`` (so every stage keeps its own files and steps).

    Example::

        >>> stage_logger_kwargs("pytorch_lightning.loggers.CSVLogger", "qat", "run-1")
        {'version': 'qat'}
        >>> sorted(stage_logger_kwargs("lightning.pytorch.loggers.WandbLogger", "fp", "run-1"))
        ['group', 'job_type', 'name']
    """
    cls = target.rsplit(".", 1)[-1]
    if cls == "WandbLogger":  # one run a stage (W&B makes its id), grouped
        return {"group": group, "job_type": stage, "name": f"{group}-{stage}"}
    if cls in ("TensorBoardLogger", "CSVLogger"):
        return {"version": stage}
    return {}


def close_logger(logger: Any) -> None:
    """Write what a logger buffers (the CSV logger keeps metrics in memory until saved) and end its run
    (W&B: ``finish``, so a later stage can start its own)."""
    logger.save()
    logger.finalize("success")
    if logger_kind(logger) == "wandb":
        logger.experiment.finish()
