"""``qat-ptq``: post-training quantization as a first-class path.

Full-precision weights (trained here, or loaded from ``checkpoint``) -> ``qat.prepare`` ->
static calibration of the observers (``qat.ptq.calibrate``) -> test accuracy and size; optionally
QAT fine-tuning that starts from the calibrated model (``qat.epochs > 0``). Dynamic activations
(``QuantSpec(dynamic=True, granularity="per_token")`` in a preset) need no calibration: their
ranges come from each batch.

    qat-ptq                                       # digits CNN, W8A8, static calibration
    qat-ptq quant=w4a8 ptq.observer=mse           # MSE-optimal ranges for every quantizer
    qat-ptq quant=w4a4 ptq.fold_bn=true qat.epochs=3   # fold BN, calibrate, then QAT from there
    qat-ptq checkpoint=fp.pt                      # calibrate given float weights, no FP training

The keys are ``qat-train``'s (``quant=``, ``model=``, ``data=``, ``seed``, ``module_attr``, ``fp.epochs``,
``fp.lr``, ``ptq.calibration_batches``, ``ptq.observer``, ``ptq.fold_bn``, ``qat.epochs``,
``qat.lr``); the old ``qat_epochs`` / ``qat_lr`` are refused naming the new key
(:data:`RENAMED_KEYS`). ``progress`` turns the bars of the calibration pass and of Lightning's
training / test loops on (``true``), off (``false``) or on only on a terminal (``null``, the
default; :func:`qat.recipes.progress.progress_enabled`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from qat import QATConfigError, QuantPlan, load_plan, prepare
from qat.callbacks import QuantizationAwareTraining
from qat.size import float_size_bytes, model_size_bytes

from .atomic import check_checkpoint_file, save_torch, write_json
from .config import FloatStartConfig, QATStage, build_trainer, check_output_dir, check_plan_fits, validate_train_config
from .digits import evaluate_accuracy
from .entry import missing_extras
from .progress import calibrate, progress_enabled

__all__ = ["PTQConfig", "RENAMED_KEYS", "main", "run", "register_ptq_configs", "validate_ptq_config", "with_observer"]

#: keys ``qat-ptq`` had before it took ``qat-train``'s, and the key to use instead
RENAMED_KEYS = {"qat_epochs": "qat.epochs", "qat_lr": "qat.lr"}

log = logging.getLogger(__name__)


@dataclass
class PTQConfig(FloatStartConfig):
    """The top level of ``configs/ptq.yaml`` (``ptq_schema``): :class:`qat.recipes.config.FloatStartConfig`'s
    keys and ``qat``. The stages are
    :class:`qat.recipes.config.FPStage`, :class:`qat.recipes.config.PTQStage` and
    :class:`qat.recipes.config.QATStage` under the keys ``qat-train`` uses (``fp``, ``ptq``,
    ``qat``); ``qat.epochs`` is 0 by default (no QAT after calibrating).

    Example::

        >>> PTQConfig().ptq
        PTQStage(calibration_batches=8, observer=None, fold_bn=False)
        >>> PTQConfig().qat
        QATStage(epochs=0, lr=0.001)
    """

    qat: QATStage = field(default_factory=lambda: QATStage(epochs=0))  # epochs > 0: QAT from the calibrated model
    # renamed (RENAMED_KEYS): kept in the schema only so that an old command line fails naming the new key
    qat_epochs: Any = None
    qat_lr: Any = None


def register_ptq_configs() -> None:
    """Register ``ptq_schema`` (and the shared schemas of ``qat-train``) in Hydra's ConfigStore.

    Example::

        >>> from hydra.core.config_store import ConfigStore
        >>> register_ptq_configs()
        >>> "ptq_schema.yaml" in ConfigStore.instance().list("")
        True
    """
    from .config import register_configs

    register_configs(ptq_schema=PTQConfig)


def validate_ptq_config(cfg: DictConfig) -> None:
    """Check every value of a ``qat-ptq`` config by type and range, before any work: the keys it
    shares with ``qat-train`` (:func:`qat.recipes.config.validate_train_config`: ``fp.*``,
    ``ptq.*``, ``qat.epochs`` (an integer >= 0; 0: no QAT) / ``qat.lr`` (> 0), ``seed``, ...),
    ``progress``, and none of the renamed keys (:data:`RENAMED_KEYS`).

    Raises:
        QATConfigError: naming the key and its valid range, or the key that replaced an old one.

    Example::

        >>> from omegaconf import OmegaConf
        >>> cfg = OmegaConf.structured(PTQConfig)
        >>> validate_ptq_config(cfg)
        >>> cfg.ptq.calibration_batches = 0
        >>> validate_ptq_config(cfg)
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: ptq.calibration_batches must be an integer >= 1, got 0
        >>> cfg.ptq.calibration_batches, cfg.qat_epochs = 8, 3
        >>> validate_ptq_config(cfg)
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: qat_epochs was renamed to qat.epochs (the key qat-train uses): qat-ptq qat.epochs=3
    """
    for old, new in RENAMED_KEYS.items():
        value = cfg.get(old)
        if value is not None:
            raise QATConfigError(f"{old} was renamed to {new} (the key qat-train uses): qat-ptq {new}={value}")
    validate_train_config(cfg)
    progress_enabled(cfg.get("progress"))


def with_observer(plan: QuantPlan, observer: Optional[str]) -> QuantPlan:
    """The plan with every weight / input spec's observer set to ``observer`` (unchanged if None).

    Raises:
        QATConfigError: an unknown observer name.

    Example::

        >>> from qat import load_plan
        >>> plan = with_observer(load_plan("w4a8"), "mse")
        >>> plan.name, plan.rules[0].weight["observer"]
        ('w4a8_mse', 'mse')
    """
    if observer is None:
        return plan
    from qat.spec import ObserverKind

    ObserverKind.parse(observer, "ptq.observer")
    rules = []
    for r in plan.to_dict()["rules"]:
        r = dict(r)
        for key in ("weight", "input"):
            if isinstance(r.get(key), dict):
                r[key] = {**r[key], "observer": observer}
        rules.append(r)
    return QuantPlan.from_dict({"name": f"{plan.name}_{observer}", "rules": rules})


def run(cfg: DictConfig, output_dir: Optional[str] = None) -> dict[str, Any]:
    """FP -> PTQ (-> QAT from the calibrated model); returns (and writes ``results.json``) the results.

    The float weights come from ``cfg.checkpoint`` or ``cfg.fp.epochs`` of training; the PTQ
    model (``ptq_model.pt``) is calibrated on ``cfg.ptq.calibration_batches`` batches; with
    ``cfg.qat.epochs > 0`` QAT continues from it. Bad plans, observers or checkpoints fail first.
    With ``cfg.progress`` on, the calibration pass and Lightning's loops draw progress bars.

    Example::

        >>> import tempfile
        >>> from hydra import compose, initialize_config_module
        >>> register_ptq_configs()
        >>> with initialize_config_module("qat.configs", version_base="1.3"):
        ...     cfg = compose("ptq", ["logger=none", "fp.epochs=1", "model.net.channels=4", "ptq.calibration_batches=1"])
        >>> import contextlib, io
        >>> with contextlib.redirect_stdout(io.StringIO()):     # the results table
        ...     res = run(cfg, tempfile.mkdtemp())
        >>> res["plan"], res["ptq"]["calibration_batches"]
        ('w8a8', 1)
    """
    output_dir = os.path.abspath(output_dir or os.getcwd())
    validate_ptq_config(cfg)  # numbers by type and range, trainer keys, renamed keys
    bars = progress_enabled(cfg.get("progress"))
    tcfg = _with_progress_bar(cfg, bars)
    check_output_dir(output_dir, overwrite=bool(cfg.get("overwrite")))
    plan = with_observer(load_plan(cfg.quant), cfg.ptq.observer)  # a bad plan fails here, before any work
    from .train import resolve_module_attr

    probe = instantiate(cfg.model)
    module_attr = resolve_module_attr(probe, cfg.get("module_attr", "auto"))  # auto: net if the model has one
    check_plan_fits(probe, plan, module_attr, fold_bn=cfg.ptq.fold_bn)  # ... so does one that does not fit the model
    if cfg.checkpoint is not None:
        if not os.path.isfile(cfg.checkpoint):
            raise QATConfigError(f"checkpoint {cfg.checkpoint!r} does not exist; give a float state_dict (.pt) or checkpoint=null")
        check_checkpoint_file(cfg.checkpoint, "checkpoint")
    os.makedirs(output_dir, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    t0 = time.time()
    dm = instantiate(cfg.data)
    dm.setup()
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    fp = instantiate(cfg.model)
    if cfg.checkpoint is not None:
        state = torch.load(cfg.checkpoint, map_location="cpu", weights_only=True)
        fp.load_state_dict(state.get("state_dict", state))
    else:
        fp.lr = cfg.fp.lr
        build_trainer(tcfg, cfg.fp.epochs, logger, [], output_dir).fit(fp, datamodule=dm)
        save_torch(fp.state_dict(), os.path.join(output_dir, "fp_model.pt"))
    fp_acc = evaluate_accuracy(build_trainer(tcfg, 1, False, [], output_dir), fp, dm)
    net = fp if module_attr is None else getattr(fp, module_attr)
    fp_bytes = float_size_bytes(net)

    # post-training quantization: static calibration of every observer, no gradient step
    prepare(net, plan, fold_bn=cfg.ptq.fold_bn)
    seen = calibrate(net, dm.train_dataloader(), num_batches=cfg.ptq.calibration_batches, enabled=bars)
    ptq_acc = evaluate_accuracy(build_trainer(tcfg, 1, False, [], output_dir), fp, dm)
    q_bytes = model_size_bytes(net)
    save_torch({"plan": plan.to_dict(), "state_dict": net.state_dict()}, os.path.join(output_dir, "ptq_model.pt"))
    results: dict[str, Any] = {
        "plan": plan.name,
        "fp": {"test_acc": fp_acc, "bytes": fp_bytes},
        "ptq": {"test_acc": ptq_acc, "bytes": q_bytes, "calibration_batches": seen},
    }

    if cfg.qat.epochs > 0:
        # QAT from the calibrated model: the callback finds it prepared and keeps its calibrated ranges
        fp.lr = cfg.qat.lr
        cb = QuantizationAwareTraining(plan, module_attr=module_attr)
        trainer = build_trainer(tcfg, cfg.qat.epochs, logger, [cb], output_dir)
        trainer.fit(fp, datamodule=dm)
        results["qat"] = {"test_acc": evaluate_accuracy(trainer, fp, dm), "bytes": model_size_bytes(net)}

    results["seconds"] = round(time.time() - t0, 1)
    results["output_dir"] = output_dir
    write_json(results, os.path.join(output_dir, "results.json"))
    if logger:
        logger.log_metrics({f"{k}/test_acc_final": results[k]["test_acc"] for k in ("fp", "ptq", "qat") if k in results})
        if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
            logger.experiment.finish()
    _print(results)
    return results


def _with_progress_bar(cfg: DictConfig, bars: bool) -> DictConfig:
    """``cfg`` for :func:`build_trainer`: with ``progress`` on, Lightning's bar too (an explicit
    ``trainer.enable_progress_bar=true`` keeps it on either way)."""
    if not bars:
        return cfg
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True) if cfg.get("trainer") is not None else {}
    return OmegaConf.create({"trainer": {**(trainer or {}), "enable_progress_bar": True}})


def _print(res: dict[str, Any]) -> None:
    columns = ("method", "test acc (%)", "vs FP (pts)", "size (KiB)")
    rows = []
    for key in ("fp", "ptq", "qat"):
        if key in res:
            r = res[key]
            diff = "" if key == "fp" else f"{100 * (r['test_acc'] - res['fp']['test_acc']):+.2f}"
            rows.append((key.upper(), f"{100 * r['test_acc']:.2f}", diff, f"{r['bytes'] / 1024:.1f}"))
    title = f"lightning-qat PTQ: {res['plan']}"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is in the recipes extra: a plain table without it
        print(title)
        for row in (columns, *rows):
            print("  ".join(f"{c:<8}" if i == 0 else f"{c:>12}" for i, c in enumerate(row)))
        return
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=100).print(table)


def _task(cfg: DictConfig) -> None:
    with missing_extras("qat-ptq"):  # also when run as python -m qat.recipes.ptq
        run(cfg, HydraConfig.get().runtime.output_dir)


def main() -> None:
    """Console entry point ``qat-ptq`` (Hydra app over ``configs/ptq.yaml``).

    Example::

        >>> import subprocess, sys
        >>> out = subprocess.run([sys.executable, "-m", "qat.recipes.ptq", "--cfg", "job"], capture_output=True, text=True)
        >>> "calibration_batches: 8" in out.stdout
        True
    """
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    register_ptq_configs()
    hydra.main(version_base="1.3", config_path="../configs", config_name="ptq")(_task)()


if __name__ == "__main__":
    main()
