"""``qat-train``: full precision -> PTQ -> QAT on one model, with a table of accuracy and size.

    qat-train                                   # digits CNN, W4A4, W&B offline
    qat-train quant=w8a8 logger=csv             # another preset, CSV logs
    qat-train callbacks.qat.freeze_bn_epoch=3 callbacks.oscillation.dampen=1e-3   # callback arguments
    qat-train -m quant=w8a8,w4a8,w4a4,w2a2      # Hydra multirun + summary table

The QAT stage's Lightning callbacks are the ``callbacks`` group's ``_target_`` nodes
(``configs/callbacks/default.yaml``), instantiated with ``hydra.utils.instantiate``
(:func:`qat.recipes.config.instantiate_callbacks`); the plan comes from the ``quant`` group.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pytorch_lightning.callbacks import ModelCheckpoint

from qat import QATConfigError, load_plan, prepare
from qat.callbacks import QuantizationAwareTraining, QuantizationTelemetry
from qat.ptq import calibrate
from qat.size import float_size_bytes, model_size_bytes

from .atomic import atomic_path, check_checkpoint_file, save_torch, write_json
from .config import (
    build_trainer, check_output_dir, check_plan_fits, instantiate_callbacks, register_configs, validate_train_config,
)
from .digits import evaluate_accuracy
from .ptq import with_observer
from .summary import SWEEP_ID_ENV

__all__ = ["main", "run", "print_results"]

log = logging.getLogger(__name__)


class _StageCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` writing ``last.ckpt`` atomically (temporary name, then ``os.replace``), so a
    run killed while saving keeps its previous complete checkpoint."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        tmp = f"{filepath}.tmp"
        super()._save_checkpoint(trainer, tmp)
        if trainer.is_global_zero and os.path.exists(tmp):
            os.replace(tmp, filepath)


def _stage_checkpoint(output_dir: str, stage: str) -> ModelCheckpoint:
    # one file a stage, replaced at the end of every epoch: the latest state is the one to resume from
    return _StageCheckpoint(
        dirpath=os.path.join(output_dir, "checkpoints", stage), filename="last", monitor=None, save_top_k=1,
        save_last=False, save_on_train_epoch_end=True, enable_version_counter=False,
    )


def _last_checkpoint(output_dir: str, stage: str, resume: bool) -> Optional[str]:
    path = os.path.join(output_dir, "checkpoints", stage, "last.ckpt")
    if not resume or not os.path.exists(path):
        return None
    return check_checkpoint_file(path, "resume")


_RUN_KEYS_NOT_COMPARED = ("resume", "overwrite")


def _check_resume(cfg: DictConfig, output_dir: str) -> None:
    """The resumed run's directory exists and was started with the same config (but resume / overwrite)."""
    if not os.path.isdir(output_dir):
        raise QATConfigError(f"resume={cfg.resume!r}: no such run directory")
    saved_path = os.path.join(output_dir, "run_config.yaml")
    if not os.path.isfile(saved_path):
        raise QATConfigError(
            f"resume={cfg.resume!r}: {saved_path} is missing; give the directory of a qat-train run (hydra.run.dir)"
        )
    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=False)
    now = OmegaConf.to_container(cfg, resolve=False)
    diff = sorted(k for k in set(saved) | set(now) if k not in _RUN_KEYS_NOT_COMPARED and saved.get(k) != now.get(k))
    if diff:
        raise QATConfigError(
            f"resume={cfg.resume!r}: the config differs from the interrupted run's ({saved_path}) in {diff}; "
            "resume with the same overrides"
        )


def run(cfg: DictConfig, output_dir: Optional[str] = None) -> dict[str, Any]:
    """Run the three stages; returns (and writes to ``results.json``) the results.

    1. Full precision: ``cfg.model`` trained ``cfg.fp.epochs``.
    2. PTQ: a copy prepared with the ``quant`` plan (``cfg.ptq.observer`` / ``fold_bn`` applied)
       and calibrated on ``cfg.ptq.calibration_batches`` training batches.
    3. QAT: a copy trained ``cfg.qat.epochs`` with the ``cfg.callbacks`` (telemetry only with a
       logger).

    Every value is checked before any training: the numbers by type and range
    (:func:`qat.recipes.config.validate_train_config`), the plan and callback arguments, and the
    plan against the model (:func:`qat.recipes.config.check_plan_fits`). A directory that holds
    another run's ``results.json`` is refused unless ``cfg.overwrite``.

    Each training stage checkpoints every epoch (``checkpoints/{fp,qat}/last.ckpt``, written
    atomically); with ``cfg.resume`` (the run directory) a killed run continues where it stopped:
    a finished FP stage (``fp_model.pt``) is not retrained, the QAT stage resumes from its last
    checkpoint with the quantizer and callback state. Besides ``results.json`` the output directory
    gets ``qat_model.pt`` (``{plan, state_dict}`` of the quantized network) and ``run_config.yaml``;
    all are written atomically.

    Example::

        >>> import tempfile
        >>> from hydra import compose, initialize_config_module
        >>> register_configs()
        >>> with initialize_config_module("qat.configs", version_base="1.3"):
        ...     cfg = compose("train", ["logger=none", "fp.epochs=1", "qat.epochs=1", "model.net.channels=4",
        ...                             "callbacks.qat.calibration_batches=1", "ptq.calibration_batches=1"])
        >>> import contextlib, io
        >>> with contextlib.redirect_stdout(io.StringIO()):     # the results table
        ...     res = run(cfg, tempfile.mkdtemp())
        >>> res["plan"], sorted(k for k in res if k in ("fp", "ptq", "qat"))
        ('w4a4', ['fp', 'ptq', 'qat'])
    """
    resume = cfg.get("resume")
    if resume:
        if output_dir is not None and os.path.abspath(output_dir) != os.path.abspath(resume):
            raise QATConfigError(
                f"resume={resume!r} continues the run in its own directory, but the output directory is {output_dir!r}; "
                "leave hydra.run.dir at its default when resuming"
            )
        output_dir = resume
    output_dir = os.path.abspath(output_dir or os.getcwd())
    validate_train_config(cfg)  # numbers by type and range, trainer keys: before any work
    check_output_dir(output_dir, overwrite=bool(cfg.get("overwrite")), resume=resume)
    if resume:
        _check_resume(cfg, output_dir)
    plan = load_plan(cfg.quant)  # a bad plan fails here, before any training
    ptq_plan = with_observer(plan, cfg.ptq.observer)
    named = instantiate_callbacks(cfg.get("callbacks"))  # so do bad callback arguments
    qat_cb = next((cb for cb in named.values() if isinstance(cb, QuantizationAwareTraining)), None)
    module_attr = qat_cb.module_attr if qat_cb is not None else "net"
    check_plan_fits(instantiate(cfg.model), ptq_plan, module_attr, fold_bn=cfg.ptq.fold_bn)  # ... and the plan vs the model
    if qat_cb is not None:
        check_plan_fits(instantiate(cfg.model), qat_cb.plan, module_attr, fold_bn=qat_cb.fold_bn, smooth=qat_cb.smooth)
    callbacks = list(named.values())
    os.makedirs(output_dir, exist_ok=True)
    if not resume:
        with atomic_path(os.path.join(output_dir, "run_config.yaml")) as tmp:
            OmegaConf.save(cfg, tmp)
    pl.seed_everything(cfg.seed, workers=True)
    t0 = time.time()
    dm = instantiate(cfg.data)
    dm.setup()
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    else:  # nothing to send per-layer statistics to
        callbacks = [cb for cb in callbacks if not isinstance(cb, QuantizationTelemetry)]

    # 1. full precision (a finished stage is not retrained on resume)
    fp = instantiate(cfg.model, lr=cfg.fp.lr)
    fp_model_path = os.path.join(output_dir, "fp_model.pt")
    if resume and os.path.exists(fp_model_path):
        check_checkpoint_file(fp_model_path, "resume")
        fp.load_state_dict(torch.load(fp_model_path, map_location="cpu", weights_only=True))
        log.info("resume: the full-precision stage finished before (%s); not retrained", fp_model_path)
        fp_acc = evaluate_accuracy(build_trainer(cfg, 1, False, [], output_dir), fp, dm)
    else:
        trainer = build_trainer(cfg, cfg.fp.epochs, logger, [_stage_checkpoint(output_dir, "fp")], output_dir)
        trainer.fit(fp, datamodule=dm, ckpt_path=_last_checkpoint(output_dir, "fp", bool(resume)))
        save_torch(fp.state_dict(), fp_model_path)
        fp_acc = evaluate_accuracy(trainer, fp, dm)
    fp_state = {k: v.detach().clone() for k, v in fp.state_dict().items()}

    # 2. post-training quantization: calibrate the observers, no training
    ptq = instantiate(cfg.model, lr=cfg.fp.lr)
    ptq.load_state_dict(fp_state)
    prepare(ptq.net, ptq_plan, fold_bn=cfg.ptq.fold_bn)
    calibrate(ptq.net, dm.train_dataloader(), num_batches=cfg.ptq.calibration_batches)
    ptq_acc = evaluate_accuracy(build_trainer(cfg, 1, False, [], output_dir), ptq, dm)

    # 3. quantization-aware training, starting from the full-precision weights
    qat_module = instantiate(cfg.model, lr=cfg.qat.lr)
    qat_module.load_state_dict(fp_state)
    trainer = build_trainer(cfg, cfg.qat.epochs, logger, [*callbacks, _stage_checkpoint(output_dir, "qat")], output_dir)
    trainer.fit(qat_module, datamodule=dm, ckpt_path=_last_checkpoint(output_dir, "qat", bool(resume)))
    qat_acc = evaluate_accuracy(trainer, qat_module, dm)
    qat_plan = getattr(qat_module.net, "qat_plan", plan)  # the plan the callback prepared the network with
    save_torch({"plan": qat_plan.to_dict(), "state_dict": qat_module.net.state_dict()}, os.path.join(output_dir, "qat_model.pt"))

    fp_bytes = float_size_bytes(fp.net)
    q_bytes = model_size_bytes(qat_module.net)
    results = {
        "plan": plan.name,
        "fp": {"test_acc": fp_acc, "bytes": fp_bytes},
        "ptq": {"test_acc": ptq_acc, "bytes": q_bytes},
        "qat": {"test_acc": qat_acc, "bytes": q_bytes},
        "seconds": round(time.time() - t0, 1),
        "output_dir": output_dir,
    }
    sweep_id = os.environ.get(SWEEP_ID_ENV)
    if sweep_id:
        results["sweep_id"] = sweep_id
    write_json(results, os.path.join(output_dir, "results.json"))
    if logger:
        logger.log_metrics(
            {f"{k}/test_acc_final": results[k]["test_acc"] for k in ("fp", "ptq", "qat")}
            | {"fp/bytes": fp_bytes, "qat/bytes": q_bytes}
        )
        if hasattr(logger, "log_table"):
            rows = [[k.upper(), plan.name, results[k]["test_acc"], results[k]["bytes"]] for k in ("fp", "ptq", "qat")]
            logger.log_table(key="results", columns=["method", "plan", "test_acc", "bytes"], data=rows)
        if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
            logger.experiment.finish()
    print_results([results])
    return results


def print_results(all_results: list[dict[str, Any]], title: str = "lightning-qat: full precision vs PTQ vs QAT") -> None:
    """Print a rich table of one or more runs' results (what :func:`run` returns).

    Example::

        >>> r = {"plan": "w4a4", "fp": {"test_acc": 0.99, "bytes": 4096}, "ptq": {"test_acc": 0.98, "bytes": 1024},
        ...      "qat": {"test_acc": 0.985, "bytes": 1024}}
        >>> import contextlib, io
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     print_results([r], title="demo")
        >>> "demo" in out.getvalue() and "99.00" in out.getvalue()
        True
    """
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("plan", "method", "test acc (%)", "vs FP (pts)", "size (KiB)", "compression"):
        table.add_column(col, justify="right" if col not in ("plan", "method") else "left")
    for res in all_results:
        fp = res["fp"]
        for key in ("fp", "ptq", "qat"):
            r = res[key]
            table.add_row(
                res["plan"] if key == "fp" else "",
                key.upper(),
                f"{100 * r['test_acc']:.2f}",
                "" if key == "fp" else f"{100 * (r['test_acc'] - fp['test_acc']):+.2f}",
                f"{r['bytes'] / 1024:.1f}",
                f"{fp['bytes'] / r['bytes']:.2f}x",
            )
        table.add_section()
    Console(width=100).print(table)


def _task(cfg: DictConfig) -> None:
    run(cfg, HydraConfig.get().runtime.output_dir)


def main() -> None:
    """Console entry point ``qat-train`` (Hydra app over ``configs/train.yaml``).

    Example::

        >>> import subprocess, sys
        >>> out = subprocess.run([sys.executable, "-m", "qat.recipes.train", "--help"], capture_output=True, text=True)
        >>> "callbacks: default" in out.stdout
        True
    """
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    register_configs()
    hydra.main(version_base="1.3", config_path="../configs", config_name="train")(_task)()


if __name__ == "__main__":
    main()
