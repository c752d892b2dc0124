"""``qat-train``: full precision -> PTQ -> QAT on one model, with a table of accuracy and size.

    qat-train                                   # digits CNN, W4A4, W&B offline
    qat-train quant=w8a8 logger=csv             # another preset, CSV logs
    qat-train -m quant=w8a8,w4a8,w4a4,w2a2      # Hydra multirun + summary table
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
from qat.callbacks import QuantizationAwareTraining, QuantizationTelemetry
from qat.ptq import calibrate
from qat.size import float_size_bytes, model_size_bytes

from .config import register_configs

__all__ = ["main", "run", "print_results"]

log = logging.getLogger(__name__)


def _trainer(cfg: DictConfig, epochs: int, logger: Any, callbacks: list, root: str) -> pl.Trainer:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True) or {}
    return pl.Trainer(max_epochs=epochs, logger=logger, callbacks=callbacks, default_root_dir=root, **kwargs)


def _test_acc(trainer: pl.Trainer, module: pl.LightningModule, dm) -> float:
    return float(trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"])


def run(cfg: DictConfig, output_dir: Optional[str] = None) -> dict[str, Any]:
    """Run the three stages; returns (and writes to ``results.json``) the results."""
    output_dir = output_dir or os.getcwd()
    os.makedirs(output_dir, exist_ok=True)
    plan = load_plan(cfg.quant)  # a bad plan fails here, before any training
    pl.seed_everything(cfg.seed, workers=True)
    t0 = time.time()
    dm = instantiate(cfg.data)
    dm.setup()
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    # 1. full precision
    fp = instantiate(cfg.model, lr=cfg.fp.lr)
    trainer = _trainer(cfg, cfg.fp.epochs, logger, [], output_dir)
    trainer.fit(fp, datamodule=dm)
    fp_acc = _test_acc(trainer, fp, dm)
    fp_state = {k: v.detach().clone() for k, v in fp.state_dict().items()}

    # 2. post-training quantization: calibrate the observers, no training
    ptq = instantiate(cfg.model, lr=cfg.fp.lr)
    ptq.load_state_dict(fp_state)
    prepare(ptq.net, plan)
    calibrate(ptq.net, dm.train_dataloader(), num_batches=cfg.ptq.calibration_batches)
    ptq_acc = _test_acc(_trainer(cfg, 1, False, [], output_dir), ptq, dm)

    # 3. quantization-aware training, starting from the full-precision weights
    qat_module = instantiate(cfg.model, lr=cfg.qat.lr)
    qat_module.load_state_dict(fp_state)
    callback = QuantizationAwareTraining(
        plan,
        module_attr="net",
        calibration_batches=cfg.qat.calibration_batches,
        freeze_observers_epoch=cfg.qat.freeze_observers_epoch,
        freeze_bn_epoch=cfg.qat.freeze_bn_epoch,
        fold_bn=cfg.qat.fold_bn,
        smooth_alpha=cfg.qat.smooth_alpha,
        smooth_match=cfg.qat.smooth_match,
        smooth_learnable=cfg.qat.smooth_learnable,
        osc_dampen=cfg.qat.osc_dampen,
        osc_freeze=cfg.qat.osc_freeze,
        osc_momentum=cfg.qat.osc_momentum,
        osc_freeze_start=cfg.qat.osc_freeze_start,
    )
    callbacks = [callback]
    if cfg.qat.telemetry_every_n_steps and logger:
        callbacks.append(QuantizationTelemetry(cfg.qat.telemetry_every_n_steps, module_attr="net"))
    trainer = _trainer(cfg, cfg.qat.epochs, logger, callbacks, output_dir)
    trainer.fit(qat_module, datamodule=dm)
    qat_acc = _test_acc(trainer, qat_module, dm)
    torch.save({"plan": plan.to_dict(), "state_dict": qat_module.net.state_dict()}, os.path.join(output_dir, "qat_model.pt"))

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
    """A rich table of one or more runs' results."""
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
    """Console entry point ``qat-train`` (Hydra app over ``configs/train.yaml``)."""
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    register_configs()
    hydra.main(version_base="1.3", config_path="../configs", config_name="train")(_task)()


if __name__ == "__main__":
    main()
