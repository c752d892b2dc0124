"""qat-train keeps its stages apart in every logger and keeps the final results: a version folder a
stage for CSV / TensorBoard (the final metrics and the size figure in the qat stage's), a W&B run a
stage in one group (job_type fp / qat)."""

import csv
import glob
import os

import pathlib

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import qat.recipes.train as train_mod
from qat.recipes.config import register_configs
from qat.recipes.train import run

CONFIG_DIR = str(pathlib.Path(train_mod.__file__).resolve().parent.parent / "configs")

FAST = ["fp.epochs=1", "qat.epochs=1", "model.net.channels=4", "ptq.calibration_batches=1"]


def _cfg(logger, tmp_path):
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", [f"logger={logger}", *FAST], return_hydra_config=False)
    from omegaconf import OmegaConf

    OmegaConf.set_struct(cfg, False)
    cfg.logger.save_dir = str(tmp_path / "logs")
    return cfg


@pytest.mark.parametrize("logger", ["csv", "tensorboard"])
def test_file_loggers_keep_each_stage_and_the_final_results(logger, tmp_path):
    run(_cfg(logger, tmp_path), output_dir=str(tmp_path / "run"))
    base = tmp_path / "logs" / "w2a4"
    assert sorted(os.listdir(base)) == ["fp", "qat"]
    assert os.path.exists(base / "qat" / "qat_size_vs_metric.png")
    if logger == "csv":
        rows = list(csv.DictReader(open(base / "qat" / "metrics.csv")))
        finals = [r for r in rows if r.get("qat/test_acc_final")]
        assert finals and {"fp/test_acc_final", "ptq/test_acc_final"} <= set(finals[0])
        assert "stage: qat" in open(base / "qat" / "hparams.yaml").read()
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(base / "qat"))
        acc.Reload()
        assert {"qat/test_acc_final", "fp/test_acc_final", "ptq/test_acc_final"} <= set(acc.Tags()["scalars"])
        assert "qat/size_vs_metric" in acc.Tags()["images"]


def test_wandb_stages_are_runs_of_one_group(tmp_path, monkeypatch):
    for var, val in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path)), ("WANDB_CACHE_DIR", str(tmp_path / "c")),
                     ("WANDB_DATA_DIR", str(tmp_path / "d")), ("WANDB_SILENT", "true")):
        monkeypatch.setenv(var, val)
    run(_cfg("wandb", tmp_path), output_dir=str(tmp_path / "run"))
    runs = sorted(glob.glob(str(tmp_path / "logs" / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(runs) == 2
    records = [open(r, "rb").read() for r in runs]
    assert all(b"run-" in r for r in records)
    fp_run, qat_run = sorted(records, key=lambda r: b"qat/test_acc_final" in r)
    assert b"qat/test_acc_final" in qat_run and b"qat/size_vs_metric" in qat_run and b"qat/plan" in qat_run
    assert b"w2a4-qat-model" in qat_run and b"qat_model.pt" in qat_run  # the trained model as an artifact
    assert b"qat/test_acc_final" not in fp_run
