"""``qat-ptq``: post-training quantization as a first-class path.

Full-precision weights (trained here, or loaded from ``checkpoint``) -> ``qat.prepare`` ->
static calibration of the observers (``qat.ptq.calibrate``) -> test accuracy and size; optionally
QAT fine-tuning that starts from the calibrated model (``qat_epochs > 0``). Dynamic activations
(``QuantSpec(dynamic=True, granularity="per_token")`` in a preset) need no calibration: their
ranges come from each batch.

    qat-ptq                                       # digits CNN, W8A8, static calibration
    qat-ptq quant=w4a8 ptq.observer=mse           # MSE-optimal ranges for every quantizer
    qat-ptq quant=w4a4 ptq.fold_bn=true qat_epochs=3   # fold BN, calibrate, then QAT from there
    qat-ptq checkpoint=fp.pt                      # calibrate given float weights, no FP training
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
from qat.ptq import calibrate
from qat.size import float_size_bytes, model_size_bytes

from .atomic import check_checkpoint_file, save_torch, write_json
from .config import FPStage, PTQStage, build_trainer, check_int, check_lr, check_output_dir, check_plan_fits, validate_train_config
from .digits import evaluate_accuracy

__all__ = ["PTQConfig", "main", "run", "register_ptq_configs", "validate_ptq_config", "with_observer"]

log = logging.getLogger(__name__)


@dataclass
class PTQConfig:
    """The top level of ``configs/ptq.yaml`` (``ptq_schema``); the stages are
    :class:`qat.recipes.config.FPStage` and :class:`qat.recipes.config.PTQStage`, as in ``qat-train``.

    Example::

        >>> PTQConfig().ptq
        PTQStage(calibration_batches=8, observer=None, fold_bn=False)
    """

    quant: Any = None
    model: Any = None
    data: Any = None
    trainer: Any = None
    logger: Any = None
    seed: int = 0
    checkpoint: Optional[str] = None  # a float state_dict (.pt) of the LightningModule; else train fp.epochs
    fp: FPStage = field(default_factory=FPStage)
    ptq: PTQStage = field(default_factory=PTQStage)
    qat_epochs: int = 0  # > 0: QAT fine-tuning from the calibrated model
    qat_lr: float = 1e-3
    overwrite: bool = False  # true: write into a directory that already holds a finished run's results.json


def register_ptq_configs() -> None:
    """Register ``ptq_schema`` (and the shared schemas of ``qat-train``) in Hydra's ConfigStore.

    Example::

        >>> from hydra.core.config_store import ConfigStore
        >>> register_ptq_configs()
        >>> "ptq_schema.yaml" in ConfigStore.instance().list("")
        True
    """
    from hydra.core.config_store import ConfigStore

    from .config import register_configs

    register_configs()
    ConfigStore.instance().store(name="ptq_schema", node=PTQConfig)


def validate_ptq_config(cfg: DictConfig) -> None:
    """Check every number of a ``qat-ptq`` config by type and range, before any work: the keys it
    shares with ``qat-train`` (:func:`qat.recipes.config.validate_train_config`) and ``qat_epochs``
    (an integer >= 0; 0: no QAT) / ``qat_lr`` (> 0).

    Raises:
        QATConfigError: naming the key and its valid range.

    Example::

        >>> from omegaconf import OmegaConf
        >>> cfg = OmegaConf.structured(PTQConfig)
        >>> validate_ptq_config(cfg)
        >>> cfg.ptq.calibration_batches = 0
        >>> validate_ptq_config(cfg)
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: ptq.calibration_batches must be an integer >= 1, got 0
    """
    validate_train_config(cfg)
    check_int(cfg.qat_epochs, "qat_epochs", 0)
    check_lr(cfg.qat_lr, "qat_lr")


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
    ``cfg.qat_epochs > 0`` QAT continues from it. Bad plans, observers or checkpoints fail first.

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
    validate_ptq_config(cfg)  # numbers by type and range, trainer keys
    check_output_dir(output_dir, overwrite=bool(cfg.get("overwrite")))
    plan = with_observer(load_plan(cfg.quant), cfg.ptq.observer)  # a bad plan fails here, before any work
    check_plan_fits(instantiate(cfg.model), plan, "net", fold_bn=cfg.ptq.fold_bn)  # ... so does one that does not fit the model
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
        build_trainer(cfg, cfg.fp.epochs, logger, [], output_dir).fit(fp, datamodule=dm)
        save_torch(fp.state_dict(), os.path.join(output_dir, "fp_model.pt"))
    fp_acc = evaluate_accuracy(build_trainer(cfg, 1, False, [], output_dir), fp, dm)
    fp_bytes = float_size_bytes(fp.net)

    # post-training quantization: static calibration of every observer, no gradient step
    prepare(fp.net, plan, fold_bn=cfg.ptq.fold_bn)
    seen = calibrate(fp.net, dm.train_dataloader(), num_batches=cfg.ptq.calibration_batches)
    ptq_acc = evaluate_accuracy(build_trainer(cfg, 1, False, [], output_dir), fp, dm)
    q_bytes = model_size_bytes(fp.net)
    save_torch({"plan": plan.to_dict(), "state_dict": fp.net.state_dict()}, os.path.join(output_dir, "ptq_model.pt"))
    results: dict[str, Any] = {
        "plan": plan.name,
        "fp": {"test_acc": fp_acc, "bytes": fp_bytes},
        "ptq": {"test_acc": ptq_acc, "bytes": q_bytes, "calibration_batches": seen},
    }

    if cfg.qat_epochs > 0:
        # QAT from the calibrated model: the callback finds it prepared and keeps its calibrated ranges
        fp.lr = cfg.qat_lr
        cb = QuantizationAwareTraining(plan, module_attr="net")
        trainer = build_trainer(cfg, cfg.qat_epochs, logger, [cb], output_dir)
        trainer.fit(fp, datamodule=dm)
        results["qat"] = {"test_acc": evaluate_accuracy(trainer, fp, dm), "bytes": model_size_bytes(fp.net)}

    results["seconds"] = round(time.time() - t0, 1)
    results["output_dir"] = output_dir
    write_json(results, os.path.join(output_dir, "results.json"))
    if logger:
        logger.log_metrics({f"{k}/test_acc_final": results[k]["test_acc"] for k in ("fp", "ptq", "qat") if k in results})
        if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
            logger.experiment.finish()
    _print(results)
    return results


def _print(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lightning-qat PTQ: {res['plan']}")
    for col in ("method", "test acc (%)", "vs FP (pts)", "size (KiB)"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for key in ("fp", "ptq", "qat"):
        if key in res:
            r = res[key]
            diff = "" if key == "fp" else f"{100 * (r['test_acc'] - res['fp']['test_acc']):+.2f}"
            table.add_row(key.upper(), f"{100 * r['test_acc']:.2f}", diff, f"{r['bytes'] / 1024:.1f}")
    Console(width=100).print(table)


def _task(cfg: DictConfig) -> None:
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
