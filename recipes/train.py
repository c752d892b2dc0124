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

import json
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

from qat import load_plan, prepare
from qat.callbacks import QuantizationTelemetry
from qat.ptq import calibrate
from qat.size import float_size_bytes, model_size_bytes

from .config import build_trainer, instantiate_callbacks, register_configs
from .digits import evaluate_accuracy
from .ptq import with_observer

__all__ = ["main", "run", "print_results"]

log = logging.getLogger(__name__)


def run(cfg: DictConfig, output_dir: Optional[str] = None) -> dict[str, Any]:
    """Run the three stages; returns (and writes to ``results.json``) the results.

    1. Full precision: ``cfg.model`` trained ``cfg.fp.epochs``.
    2. PTQ: a copy prepared with the ``quant`` plan (``cfg.ptq.observer`` / ``fold_bn`` applied)
       and calibrated on ``cfg.ptq.calibration_batches`` training batches.
    3. QAT: a copy trained ``cfg.qat.epochs`` with the ``cfg.callbacks`` (telemetry only with a
       logger).

    A bad plan or callback argument fails before any training. Besides ``results.json`` the
    output directory gets ``qat_model.pt`` (``{plan, state_dict}`` of the quantized network).

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
    output_dir = output_dir or os.getcwd()
    os.makedirs(output_dir, exist_ok=True)
    plan = load_plan(cfg.quant)  # a bad plan fails here, before any training
    ptq_plan = with_observer(plan, cfg.ptq.observer)
    callbacks = list(instantiate_callbacks(cfg.get("callbacks")).values())  # so do bad callback arguments
    pl.seed_everything(cfg.seed, workers=True)
    t0 = time.time()
    dm = instantiate(cfg.data)
    dm.setup()
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    else:  # nothing to send per-layer statistics to
        callbacks = [cb for cb in callbacks if not isinstance(cb, QuantizationTelemetry)]

    # 1. full precision
    fp = instantiate(cfg.model, lr=cfg.fp.lr)
    trainer = build_trainer(cfg, cfg.fp.epochs, logger, [], output_dir)
    trainer.fit(fp, datamodule=dm)
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
    trainer = build_trainer(cfg, cfg.qat.epochs, logger, callbacks, output_dir)
    trainer.fit(qat_module, datamodule=dm)
    qat_acc = evaluate_accuracy(trainer, qat_module, dm)
    qat_plan = getattr(qat_module.net, "qat_plan", plan)  # the plan the callback prepared the network with
    torch.save({"plan": qat_plan.to_dict(), "state_dict": qat_module.net.state_dict()}, os.path.join(output_dir, "qat_model.pt"))

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
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
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
